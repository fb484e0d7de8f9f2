-- sa-middleware Redis store: shared helpers.
--
-- The store's code is loaded once as a Redis function library (Redis 7 and later: RedisStore._library) whose
-- functions `<library>_main` and `<library>_release` are called with FCALL; before Redis 7 it runs as scripts, each a
-- concatenation of these files (RedisStore: _SCRIPTS), called with EVALSHA: the admission script (lib.lua,
-- admission.lua, main.lua), the renewal script (lib.lua, renew.lua, main.lua), the operations script (lib.lua,
-- admission.lua, cluster.lua, operations.lua, main.lua) and the release script (release.lua). A script re-runs its
-- top-level definitions on every call, so the scripts of the hot path define only what they use.
--
-- A call (sa.main): ARGV[1] names the operation, ARGV[2] is a clock override for tests ('' = the server's TIME),
-- ARGV[3] the key prefix, ARGV[4] the operation's payload (JSON), ARGV[5] the constants shared with Python (never
-- copied here), a JSON list of numbers written as strings: the audit trail's maximum records, its retention
-- (seconds), rules.STATUS_RETENTION, rules.FENCE_SLACK, how many milliseconds a key outlives its records,
-- rules.SEEN_PRECISION; then what the operation takes besides its payload (the admission: its policy and its token's
-- fields). KEYS[1] is the epoch marker of the slot the call runs in; the other KEYS only route the call (in a cluster
-- every key a call touches lives in KEYS[1]'s slot).
--
-- Times are seconds (floats) of the server's clock. Records are JSON; numbers inside them are written as strings
-- with 17 significant digits, because cjson keeps only 14 and a watermark must compare exactly.

local sa = {ops = {}}

-- a JSON text decoded (and made into what `make` makes of it) once per distinct text while the function library
-- stays loaded (a script decodes it on every call); at most `size` texts are kept, then the cache starts afresh. The
-- tables are shared by the calls given the same text: never modify them.
local function decoder(size, make)
  local known, count = {}, 0
  return function(text)
    local value = known[text]
    if value == nil then
      value = cjson.decode(text)
      if make ~= nil then value = make(value) end
      if count >= size then known, count = {}, 0 end
      known[text], count = value, count + 1
    end
    return value
  end
end

-- a route's policy from its JSON
sa.policy = decoder(512)
-- the fields an admission takes from its token (RedisStore._spec_args), as the metatable that lends them to the
-- admission's own table (its request's fields)
sa.token = decoder(2048, function(fields) return {__index = fields} end)
-- the constants of a call (ARGV[5])
local constants = decoder(16, function(c)
  return {c[1], tonumber(c[2]), tonumber(c[3]), tonumber(c[4]), tonumber(c[5]), tonumber(c[6])}
end)

-- the context of the current call (sa.begin)
local PREFIX, CLOCK, EPOCH, AUDIT_MAX, AUDIT_RETENTION, RET, FENCE_SLACK, SLACK, SEEN, PKEYS
-- principals' key names (sa.pkey) by prefix: kept while the function library stays loaded (a script computes them
-- again on every call), at most PKEY_MAX of them (then started afresh)
local PKEY_CACHE, PKEY_COUNT, PKEY_MAX = {}, 0, 4096

function sa.begin(keys, argv)
  EPOCH, CLOCK, PREFIX = keys[1], argv[2], argv[3]
  local c = constants(argv[5])
  -- RET: rules.STATUS_RETENTION, a status outlives the token it was set on
  AUDIT_MAX, AUDIT_RETENTION, RET, FENCE_SLACK, SLACK, SEEN = c[1], c[2], c[3], c[4], c[5], c[6]
  sa.RET, sa.FENCE_SLACK, sa.SLACK, sa.SEEN, sa.EPOCH = RET, FENCE_SLACK, SLACK, SEEN, EPOCH
  PKEYS = PKEY_CACHE[PREFIX]
  if PKEYS == nil then
    PKEYS = {}
    PKEY_CACHE[PREFIX] = PKEYS
  end
end

-- a number as text with 17 significant digits. Formatting is slow next to a lookup and a call writes the same few
-- times several times (the clock, a session's creation and expiry, a ticket's expiry), so the texts are kept while
-- the function library stays loaded, at most FMT_MAX of them (then started afresh)
local FMT_CACHE, FMT_COUNT, FMT_MAX = {}, 0, 4096
local function fmt(x)
  local text = FMT_CACHE[x]
  if text == nil then
    text = string.format('%.17g', x)
    if x ~= x then return text end -- NaN is no table key
    if FMT_COUNT >= FMT_MAX then FMT_CACHE, FMT_COUNT = {}, 0 end
    FMT_CACHE[x], FMT_COUNT = text, FMT_COUNT + 1
  end
  return text
end

function sa.fmt(x)
  if x == nil then return nil end
  return fmt(x)
end

-- at most `n` bytes of a UTF-8 string, never ending inside a character (a cut character is left out)
function sa.cut(text, n)
  if #text <= n then return text end
  local cut = string.sub(text, 1, n)
  local lead = string.find(cut, '[\192-\255][\128-\191]*$')
  if lead ~= nil then
    local b = string.byte(cut, lead)
    local size = b >= 240 and 4 or (b >= 224 and 3 or 2)
    if #cut - lead + 1 < size then cut = string.sub(cut, 1, lead - 1) end
  end
  return cut
end

-- the audit trail: a stream in the slot of the epoch marker (next to it), at most AUDIT_MAX records, kept
-- AUDIT_RETENTION seconds (the first two constants of ARGV[5])
function sa.audit(records, now)
  if #records == 0 then return end
  local key = (string.gsub(EPOCH, 'epoch$', 'audit'))
  -- `w`: when the record arrived (the server's microseconds), which orders the streams of a cluster's slots
  local t = redis.call('TIME')
  local arrival = t[1] .. string.format('%06d', tonumber(t[2]))
  for _, r in ipairs(records) do
    local fields = {'t', sa.fmt(r.t or now), 'w', arrival, 'k', r.k, 'c', r.c, 's', r.s}
    if r.u ~= nil then fields[#fields + 1] = 'u'; fields[#fields + 1] = r.u end
    if r.i ~= nil then fields[#fields + 1] = 'i'; fields[#fields + 1] = r.i end
    if r.r ~= nil then fields[#fields + 1] = 'r'; fields[#fields + 1] = r.r end
    fields[#fields + 1] = 'd'
    fields[#fields + 1] = sa.cut(r.d or '', 512)
    redis.call('XADD', key, 'MAXLEN', '~', AUDIT_MAX, '*', unpack(fields))
  end
  -- the stream's ids are the server's milliseconds: drop what is past the retention
  local cutoff = tonumber(t[1]) * 1000 - math.floor(AUDIT_RETENTION * 1000)
  if cutoff > 0 then redis.call('XTRIM', key, 'MINID', '~', cutoff) end
end

-- whether times are the server's clock (not a test clock): a key's expiry is then an instant on the same clock as
-- its records' expiries
function sa.real_clock()
  return CLOCK == nil or CLOCK == ''
end

function sa.clock()
  if CLOCK ~= nil and CLOCK ~= '' then return tonumber(CLOCK) end
  local t = redis.call('TIME')
  return tonumber(t[1]) + tonumber(t[2]) / 1000000
end

-- key names: PREFIX:{kind:id}suffix, with '%', '{' and '}' escaped so the hash tag is always the whole id
local ESC = {['%'] = '%25', ['{'] = '%7B', ['}'] = '%7D'}
function sa.key(kind, id, suffix)
  return PREFIX .. ':{' .. kind .. ':' .. string.gsub(id, '[%%{}]', ESC) .. '}' .. (suffix or '')
end

-- a principal's keys: issuer and subject share one hash tag (RedisStore._principal). The empty issuer (tokens
-- without `iss`) keeps the tag of the subject alone, as stored before issuers were recorded. Computed once per
-- principal (PKEYS: issuer -> subject -> key without suffix, for the prefix of the call).
function sa.pkey(sub, iss, suffix)
  iss = iss or ''
  local known = PKEYS[iss]
  if known == nil then
    known = {}
    PKEYS[iss] = known
  end
  local base = known[sub]
  if base == nil then
    if iss == '' then base = sa.key('p', sub)
    else base = sa.key('pi', string.gsub(string.gsub(iss, '%%', '%%25'), '|', '%%7C') .. '|' .. sub) end
    if PKEY_COUNT >= PKEY_MAX then
      PKEY_CACHE, PKEY_COUNT, known = {}, 0, {}
      PKEYS = {[iss] = known}
      PKEY_CACHE[PREFIX] = PKEYS
    end
    known[sub], PKEY_COUNT = base, PKEY_COUNT + 1
  end
  if suffix == nil then return base end
  return base .. suffix
end

-- on one server (`lg`): an issuer's principal seen for the first time takes the state its subject had before
-- issuers were recorded (generation, watermarks, markers...). A cluster keeps those keys in other slots.
function sa.adopt(sub, iss, lg)
  if not lg or iss == nil or iss == '' then return end
  local key = sa.pkey(sub, iss)
  if redis.call('EXISTS', key) == 1 then return end
  local old = redis.call('HGETALL', sa.key('p', sub))
  if #old > 0 then redis.call('HSET', key, unpack(old)) end
end

-- who uses a device or a credential: [issuer, subject] pairs (a plain subject: stored before issuers)
function sa.member(sub, iss)
  return cjson.encode({iss or '', sub})
end

function sa.unmember(m)
  if string.sub(m, 1, 1) == '[' then
    local ok, v = pcall(cjson.decode, m)
    if ok and type(v) == 'table' and #v == 2 then return v end
  end
  return {'', m}
end

-- the epoch marker: present since the store was first used (value: the time of a detected state loss, 0 for a
-- store bootstrapped as new). A missing marker means the state was lost: record the loss time and recreate it.
function sa.epoch(now)
  local v = redis.call('GET', EPOCH)
  if v then return tonumber(v), false end
  redis.call('SET', EPOCH, sa.fmt(now))
  return now, true
end

-- make a key live at least `seconds` more (never shortens a TTL; keys without one get one). Records carry their own
-- expiry; a key outlives its records by SLACK milliseconds (the fifth constant of ARGV[5]; RedisStore: a second, a
-- minute under a test clock).
-- `fresh`: the key was created by this call (it did not exist when read), so it has no TTL yet.
function sa.keep(key, seconds, fresh)
  local ms = math.ceil(seconds * 1000) + SLACK
  if fresh then
    redis.call('PEXPIRE', key, ms)
    return
  end
  local ttl = redis.call('PTTL', key)
  if ttl == -2 then return end
  if ttl == -1 or ttl < ms then redis.call('PEXPIRE', key, ms) end
end

function sa.hdel(key, fields)
  for i = 1, #fields, 500 do
    redis.call('HDEL', key, unpack(fields, i, math.min(i + 499, #fields)))
  end
end

-- a record's numbers are stored as strings (17 significant digits): c, l, e, ma, mg, ca, ix, f
local function decode_record(raw)
  local r = cjson.decode(raw)
  local v = r.c if v ~= nil then r.c = tonumber(v) end
  v = r.l if v ~= nil then r.l = tonumber(v) end
  v = r.e if v ~= nil then r.e = tonumber(v) end
  v = r.ma if v ~= nil then r.ma = tonumber(v) end
  v = r.mg if v ~= nil then r.mg = tonumber(v) end
  v = r.ca if v ~= nil then r.ca = tonumber(v) end
  v = r.ix if v ~= nil then r.ix = tonumber(v) end
  v = r.f if v ~= nil then r.f = tonumber(v) end
  return r
end

-- a record decoded from its JSON: a copy of its fields, decoded once per distinct text while the function library
-- stays loaded (a session seen again is stored unchanged, and each admission of a principal reads its tickets in
-- flight again), at most DEC_MAX texts (then started afresh). The copy is the caller's to change; its values are
-- shared with the decoded one, and the record's lists (tags, conflicts) are never changed.
local DEC_CACHE, DEC_COUNT, DEC_MAX = {}, 0, 2048
function sa.dec(raw)
  local decoded = DEC_CACHE[raw]
  if decoded == nil then
    decoded = decode_record(raw)
    if DEC_COUNT >= DEC_MAX then DEC_CACHE, DEC_COUNT = {}, 0 end
    DEC_CACHE[raw], DEC_COUNT = decoded, DEC_COUNT + 1
  end
  local r = {}
  for k, x in pairs(decoded) do r[k] = x end
  return r
end

-- the JSON of a record (without its `id` and `raw`): the record's own table is encoded with its numbers formatted,
-- then given back its values (no copy: this runs several times per admission)
function sa.enc(r)
  local id, raw, c, l, e, ma, mg, ca, ix, f = r.id, r.raw, r.c, r.l, r.e, r.ma, r.mg, r.ca, r.ix, r.f
  r.id, r.raw = nil, nil
  if c ~= nil then r.c = fmt(c) end
  if l ~= nil then r.l = fmt(l) end
  if e ~= nil then r.e = fmt(e) end
  if ma ~= nil then r.ma = fmt(ma) end
  if mg ~= nil then r.mg = fmt(mg) end
  if ca ~= nil then r.ca = fmt(ca) end
  if ix ~= nil then r.ix = fmt(ix) end
  if f ~= nil then r.f = fmt(f) end
  local out = cjson.encode(r)
  r.id, r.raw, r.c, r.l, r.e, r.ma, r.mg, r.ca, r.ix, r.f = id, raw, c, l, e, ma, mg, ca, ix, f
  return out
end

-- live records of a hash (field = id, value = JSON with an expiry `e`); dead ones are deleted when `prune`
function sa.records(key, now, prune)
  local h = redis.call('HGETALL', key)
  local live, dead = {}, {}
  for i = 1, #h, 2 do
    local r = sa.dec(h[i + 1])
    r.id, r.raw = h[i], h[i + 1]
    if r.e > now then live[#live + 1] = r else dead[#dead + 1] = h[i] end
  end
  if prune and #dead > 0 then sa.hdel(key, dead) end
  return live
end

function sa.set(list)
  local s = {}
  if list then for _, x in ipairs(list) do s[x] = true end end
  return s
end

function sa.intersects(list, set)
  if list then for _, x in ipairs(list) do if set[x] then return true end end end
  return false
end

-- a principal's state: generation, not-before watermark, risk, privileges, compromise marker, and what security
-- events set: sessions revoked before a time, disabled, assurance level
function sa.principal(sub, iss)
  local h = redis.call('HGETALL', sa.pkey(sub, iss))
  local p = {g = 0, risk = {}, exists = #h > 0}
  for i = 1, #h, 2 do
    local f, v = h[i], h[i + 1]
    if f == 'g' then p.g = tonumber(v)
    elseif f == 'nb' then p.nb = tonumber(v)
    elseif f == 'pa' then p.pa = tonumber(v)
    elseif f == 'ma' then p.ma = tonumber(v)
    elseif f == 'mg' then p.mg = tonumber(v)
    elseif f == 'sb' then p.sb = tonumber(v)
    elseif f == 'da' then p.da = tonumber(v)
    elseif f == 'as' then p.as = v
    elseif f == 'aa' then p.aa = tonumber(v)
    elseif f == 'pv' then p.pv = sa.set(cjson.decode(v))
    elseif f == 'rk' then
      for _, e in ipairs(cjson.decode(v)) do p.risk[#p.risk + 1] = {tonumber(e[1]), tonumber(e[2]), e[3]} end
    end
  end
  return p
end

function sa.encode_risk(risk)
  local out = {}
  for _, e in ipairs(risk) do out[#out + 1] = {sa.fmt(e[1]), sa.fmt(e[2]), e[3]} end
  return cjson.encode(out)
end

-- the principal row exists from its first write on (SQLite: INSERT ... generation 0)
function sa.touch_principal(sub, iss)
  redis.call('HSETNX', sa.pkey(sub, iss), 'g', '0')
end

-- statuses a session may move from (sqlite._FROM_STATES)
sa.FROM = {
  paused = {active = true, paused = true},
  revoked = {active = true, paused = true, compromised = true, revoked = true},
  compromised = {active = true, paused = true, compromised = true},
  active = {active = true},
}

-- set a session's status if its current status allows it; returns the previous record (raw JSON) when changed
function sa.update_status(sub, iss, sid, status, now, writer)
  local key = sa.pkey(sub, iss, ':ss')
  local raw = redis.call('HGET', key, sid)
  if not raw then return nil end
  local r = sa.dec(raw)
  if not sa.FROM[status][r.st] then return nil end
  r.st = status
  r.e = math.max(r.e, now + RET)
  if writer ~= nil then r.w = writer end
  redis.call('HSET', key, sid, sa.enc(r))
  sa.keep(key, r.e - now)
  return raw
end

-- lock holders (live) and the fencing counter of one lock key; after a state loss the counter starts above every
-- fencing token issued before it (the loss time in microseconds; 0 for a bootstrapped store). The counter lives
-- FENCE_SLACK seconds past its key's last lease (rules.FENCE_SLACK): a token is never below the clock in
-- microseconds (sa.next_fence, rules.next_fence), so a forgotten counter restarts above every token issued before.
function sa.holders(lock, now)
  return sa.records(sa.key('l', lock), now, true)
end

-- the last fencing token of a lock key, and whether its counter exists
function sa.fence(lock, since)
  local raw = redis.call('GET', sa.key('l', lock, ':f'))
  local f = tonumber(raw or '0')
  return math.max(f, math.floor(since * 1000000)), raw ~= false -- a restored (older) counter also resumes above the loss
end

function sa.next_fence(last, now)
  return math.max(last + 1, math.floor(now * 1000000))
end

function sa.blocking(holders, mode, tid)
  local out = {}
  for _, h in ipairs(holders) do
    if h.id ~= tid and (mode == 'exclusive' or h.m == 'exclusive') then out[#out + 1] = h end
  end
  return out
end

-- grant a lock; `no_holders`: its holders hash does not exist (no live holder was found), `no_counter`: neither
-- does its fencing counter
function sa.grant(lock, mode, fence, who, expires, now, no_holders, no_counter)
  local hk = sa.key('l', lock)
  local fk = sa.key('l', lock, ':f')
  if no_counter then
    redis.call('SET', fk, sa.fmt(fence), 'PX', math.ceil((expires - now + FENCE_SLACK) * 1000) + SLACK)
  else
    redis.call('SET', fk, sa.fmt(fence), 'KEEPTTL')
    sa.keep(fk, expires - now + FENCE_SLACK)
  end
  redis.call('HSET', hk, who.tid, sa.enc({key = lock, m = mode, s = who.sub, is = who.iss, sid = who.sid,
                                          k = who.kind, f = fence, e = expires}))
  sa.keep(hk, expires - now, no_holders)
end

function sa.seconds(x)
  return math.max(1, math.ceil(x))
end

-- facts that live outside the principal's slot: a device, a credential, an actor, a one-time jti. In a cluster the
-- store reads them with the `facts` operation on their own slot before the principal step; on one server the
-- admission script reads them itself. Devices, credentials and actors also index the principals that use them,
-- so a compromise can find every related context. Marker times stay strings (as stored, 17 significant digits):
-- in a cluster they travel through cjson, which keeps only 14; sa.snapshot converts them.
function sa.fact(item, sub, iss, keep_for, out)
  local t, id = item[1], item[2]
  if t == 'dev' then
    local key = sa.key('d', id)
    local v = redis.call('HMGET', key, 'ok', 'ma')
    if v[1] then out.dev_ok = (v[1] == '1') end
    if v[2] then out.dev_ma = v[2] end
    if sub ~= nil then
      redis.call('SADD', key .. ':ix', sa.member(sub, iss))
      sa.keep(key .. ':ix', keep_for)
    end
  elseif t == 'cred' then
    local key = sa.key('c', id)
    local v = redis.call('HGET', key, 'ma')
    if v then out.cred_ma = v end
    if sub ~= nil then
      redis.call('SADD', key .. ':ix', sa.member(sub, iss))
      sa.keep(key .. ':ix', keep_for)
    end
  elseif t == 'actor' then -- the actor is a subject of the same issuer
    local v = redis.call('HGET', sa.pkey(id, iss), 'ma')
    if v then out.actor_ma = v end
    if sub ~= nil then
      local ax = sa.pkey(id, iss, ':ax')
      redis.call('SADD', ax, sub)
      sa.keep(ax, keep_for)
    end
  elseif t == 'jti' then
    out.jti = redis.call('EXISTS', sa.key('j', id)) == 1
  end
end
