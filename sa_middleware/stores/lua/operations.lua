-- sa-middleware Redis store: operations (rotate, revoke, pause, resume, compromise, device, privileges) and listings.
-- Each call touches one slot; the store sequences the calls of an operation that spans several.

-- every operation on a principal names it by subject and issuer (`iss`; "" for tokens without one); `lg`: adopt the
-- state stored before issuers were recorded (sa.adopt)

sa.ops.rotate = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  return {g = sa.fmt(redis.call('HINCRBY', sa.pkey(p.sub, p.iss), 'g', 1))}
end

sa.ops.revoke_principal = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local pkey = sa.pkey(p.sub, p.iss)
  sa.touch_principal(p.sub, p.iss)
  local nb = tonumber(redis.call('HGET', pkey, 'nb') or '0')
  if now > nb then redis.call('HSET', pkey, 'nb', sa.fmt(now)) end
  return {at = sa.fmt(now)}
end

sa.ops.privileges = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local pkey = sa.pkey(p.sub, p.iss)
  sa.touch_principal(p.sub, p.iss)
  if p.scopes ~= nil then
    redis.call('HSET', pkey, 'pv', cjson.encode(p.scopes), 'pa', sa.fmt(now))
  else
    redis.call('HDEL', pkey, 'pv')
    redis.call('HSET', pkey, 'pa', sa.fmt(now))
  end
  return {ok = 1}
end

sa.ops.device = function(p, now, since)
  redis.call('HSET', sa.key('d', p.id), 'ok', p.ok and '1' or '0', 'at', sa.fmt(now))
  return {ok = 1}
end

-- the session index: who holds a session id. `revoke` remembers a revocation of an id never seen yet.
sa.ops.index = function(p, now, since)
  local key = sa.key('s', p.sid)
  local h = redis.call('HMGET', key, 'o', 'st', 'oi')
  if p.op == 'revoke' then
    if not h[1] or h[1] == '' then
      redis.call('HSET', key, 'o', '', 'st', 'revoked')
      redis.call('PEXPIRE', key, math.ceil(sa.RET * 1000) + sa.SLACK)
      return {known = h[1] == '' and 1 or 0}
    end
  end
  if h[1] and h[1] ~= '' then sa.keep(key, 2 * sa.RET) end -- a status change keeps the record a day longer
  return {o = h[1] or nil, st = h[2] or nil, oi = h[3] or nil}
end

-- a status change of one session in its principal's slot
sa.ops.status = function(p, now, since)
  local skey = sa.pkey(p.sub, p.iss, ':ss')
  if p.st == 'active' then -- resume
    local raw = redis.call('HGET', skey, p.sid)
    if not raw then return {ok = 0} end
    local r = sa.dec(raw)
    if r.st ~= 'paused' and r.st ~= 'compromised' then return {ok = 0} end
    r.st, r.ca, r.ma, r.mg, r.w = 'active', now, nil, nil, nil
    redis.call('HSET', skey, p.sid, sa.enc(r))
    return {ok = 1}
  end
  local prev = sa.update_status(p.sub, p.iss, p.sid, p.st, now)
  local was_active = prev and cjson.decode(prev).st == 'active'
  if p.audit ~= nil and (was_active or (not prev and redis.call('HEXISTS', skey, p.sid) == 0)) then
    sa.audit({{k = 'change', c = 'session_paused', s = 'middleware', u = p.sub, i = p.sid, r = p.audit.r,
               d = p.audit.d}}, now)
  end
  if prev then return {ok = 1} end
  if p.st == 'revoked' and redis.call('HEXISTS', skey, p.sid) == 0 then
    local e = now + sa.RET
    redis.call('HSET', skey, p.sid, sa.enc({s = p.sub, is = sa.nonempty(p.iss), k = '', st = 'revoked', c = now,
                                            l = now, e = e, cl = '', ua = ''}))
    sa.keep(skey, e - now)
  end
  return {ok = 0}
end

-- one session's record (its credential and device), for a compromise reported on a session of another principal
sa.ops.session = function(p, now, since)
  local raw = redis.call('HGET', sa.pkey(p.sub, p.iss, ':ss'), p.sid)
  if not raw then return {none = 1} end
  local r = sa.dec(raw)
  return {cr = r.cr or false, dv = r.dv or false}
end

-- security events (sa_middleware.events) -------------------------------------------------------------------------

sa.ops.revoke_sessions = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local pkey, skey = sa.pkey(p.sub, p.iss), sa.pkey(p.sub, p.iss, ':ss')
  local cut = now
  if p.before ~= nil and p.before < now then cut = p.before end
  sa.touch_principal(p.sub, p.iss)
  local sb = tonumber(redis.call('HGET', pkey, 'sb') or '')
  if sb == nil or cut > sb then redis.call('HSET', pkey, 'sb', sa.fmt(cut)) end
  local hits, latest = {}, now
  for _, x in ipairs(sa.records(skey, now, false)) do
    if x.c <= cut and x.st ~= 'revoked' then
      x.st, x.e = 'revoked', math.max(x.e, now + sa.RET)
      redis.call('HSET', skey, x.id, sa.enc(x))
      hits[#hits + 1] = x.id
      if x.e > latest then latest = x.e end
    end
  end
  if #hits > 0 then sa.keep(skey, latest - now) end
  table.sort(hits)
  return {hits = hits}
end

sa.ops.disable = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local pkey = sa.pkey(p.sub, p.iss)
  sa.touch_principal(p.sub, p.iss)
  redis.call('HSETNX', pkey, 'da', sa.fmt(now))
  local nb = tonumber(redis.call('HGET', pkey, 'nb') or '0')
  if now > nb then redis.call('HSET', pkey, 'nb', sa.fmt(now)) end
  return {at = sa.fmt(now)}
end

sa.ops.enable = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  return {ok = redis.call('HDEL', sa.pkey(p.sub, p.iss), 'da')}
end

sa.ops.assurance = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local pkey = sa.pkey(p.sub, p.iss)
  sa.touch_principal(p.sub, p.iss)
  if p.level == nil then
    redis.call('HDEL', pkey, 'as', 'aa')
  else
    local at = now
    if p.at ~= nil and p.at < now then at = p.at end
    redis.call('HSET', pkey, 'as', p.level, 'aa', sa.fmt(at))
  end
  return {ok = 1}
end

sa.ops.raise_risk = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local principal = sa.principal(p.sub, p.iss)
  local risk = {}
  for _, e in ipairs(principal.risk) do if e[2] > now then risk[#risk + 1] = e end end
  risk[#risk + 1] = {p.amount, now + p.window, ''}
  sa.touch_principal(p.sub, p.iss)
  redis.call('HSET', sa.pkey(p.sub, p.iss), 'rk', sa.encode_risk(risk))
  return {ok = 1}
end

-- the events seen (replay protection): true when `key` was recorded and has not expired
sa.ops.seen_event = function(p, now, since)
  local key = sa.key('ev', p.key)
  local until_ = tonumber(redis.call('GET', key) or '')
  if until_ ~= nil and until_ > now then return {seen = 1} end
  redis.call('SET', key, sa.fmt(now + p.ttl), 'PX', math.ceil(p.ttl * 1000) + sa.SLACK)
  return {seen = 0}
end

sa.ops.forget_event = function(p, now, since)
  redis.call('DEL', sa.key('ev', p.key))
  return {ok = 1}
end

local function mark(x, at, gen, now)
  x.st, x.ma, x.mg = 'compromised', at, gen
  x.e = math.max(x.e, now + sa.RET)
end

local function sorted_keys(set)
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return out
end

-- compromise, step 1 (the principal's slot): the marker, the principal's own contexts, and what relates to them
-- (credentials and devices of the reported context or of all live contexts; principals that delegated to it)
sa.ops.compromise = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local sub, skey = p.sub, sa.pkey(p.sub, p.iss, ':ss')
  local origins = p.origins
  if p.sid ~= nil and origins == nil then
    local raw = redis.call('HGET', skey, p.sid)
    if raw then
      local r = sa.dec(raw)
      origins = {{r.cr or false, r.dv or false}}
    elseif p.strict then
      return {none = 1}
    end
  end
  local sessions = sa.records(skey, now, false)
  if origins == nil then
    origins = {}
    for _, x in ipairs(sessions) do origins[#origins + 1] = {x.cr or false, x.dv or false} end
  end
  local pkey = sa.pkey(sub, p.iss)
  sa.touch_principal(sub, p.iss)
  local g = tonumber(redis.call('HGET', pkey, 'g'))
  redis.call('HSET', pkey, 'ma', sa.fmt(now), 'mg', sa.fmt(g))
  local hits, latest = {}, now
  for _, x in ipairs(sessions) do
    if x.st ~= 'revoked' then
      mark(x, now, g, now)
      redis.call('HSET', skey, x.id, sa.enc(x))
      hits[#hits + 1] = x.id
      if x.e > latest then latest = x.e end
    end
  end
  if #hits > 0 then sa.keep(skey, latest - now) end
  local creds, devs = {}, {}
  for _, o in ipairs(origins) do
    if o[1] and o[1] ~= '' then creds[o[1]] = true end
    if o[2] and o[2] ~= '' then devs[o[2]] = true end
  end
  return {at = sa.fmt(now), creds = sorted_keys(creds), devs = sorted_keys(devs), hits = hits,
          ax = redis.call('SMEMBERS', sa.pkey(sub, p.iss, ':ax'))}
end

-- compromise, step 2 (a credential's or a device's slot): its marker; returns the principals that use it, as
-- [issuer, subject] pairs
sa.ops.marker = function(p, now, since)
  local key = sa.key(p.kind, p.id)
  redis.call('HSET', key, 'ma', p.at)
  local out = {}
  for _, m in ipairs(redis.call('SMEMBERS', key .. ':ix')) do out[#out + 1] = sa.unmember(m) end
  return {subs = out}
end

-- compromise, step 3 (another principal's slot): its contexts that act for the principal or share a credential
-- or a device with the reported contexts
sa.ops.related = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local skey = sa.pkey(p.sub, p.iss, ':ss')
  local g = redis.call('HGET', sa.pkey(p.sub, p.iss), 'g')
  g = g and tonumber(g) or nil
  local creds, devs, at = sa.set(p.creds), sa.set(p.devs), tonumber(p.at)
  local hits, latest = {}, now
  for _, x in ipairs(sa.records(skey, now, false)) do
    local acts_for = x.ac == p.actor and p.iss == p.actor_iss -- the actor is a subject of the same issuer
    if x.st ~= 'revoked' and (acts_for or (x.cr ~= nil and creds[x.cr]) or (x.dv ~= nil and devs[x.dv])) then
      mark(x, at, g, now)
      redis.call('HSET', skey, x.id, sa.enc(x))
      hits[#hits + 1] = x.id
      if x.e > latest then latest = x.e end
    end
  end
  if #hits > 0 then sa.keep(skey, latest - now) end
  return {hits = hits}
end

-- an operator declares a state loss (a restored backup, a failover that lost writes): as if the marker had gone
sa.ops.declare_loss = function(p, now, since)
  redis.call('SET', sa.EPOCH, sa.fmt(now))
  sa.audit({{k = 'change', c = 'state_loss', s = 'operator',
             d = 'state loss declared by an operator; tokens issued before ' .. sa.fmt(now) .. ' are refused'}}, now)
  return {at = sa.fmt(now), since = now}
end

-- the store's time (main.lua adds `now` to every answer)
sa.ops.now = function(p, now, since)
  return {}
end

local SESSION_FIELDS = {'s', 'is', 'k', 'st', 'cl', 'ua', 'dv', 'cr', 'ac'}
local SESSION_TIMES = {'c', 'l', 'e', 'ma', 'mg', 'ca'}

sa.ops.sessions = function(p, now, since)
  local live = {}
  for _, x in ipairs(sa.records(sa.pkey(p.sub, p.iss, ':ss'), now, false)) do
    if x.l > now - p.idle then live[#live + 1] = x end
  end
  table.sort(live, function(x, y)
    if x.c ~= y.c then return x.c < y.c end
    return x.id < y.id
  end)
  local out = {}
  for _, x in ipairs(live) do
    local o = {id = x.id}
    for _, f in ipairs(SESSION_FIELDS) do o[f] = x[f] end
    for _, f in ipairs(SESSION_TIMES) do o[f] = sa.fmt(x[f]) end
    out[#out + 1] = o
  end
  return {sessions = out}
end

-- live holders of the lock hashes named in the payload (raw key names, all in this call's slot)
sa.ops.locks = function(p, now, since)
  local out = {}
  for _, key in ipairs(p.keys) do
    local h = redis.call('HGETALL', key)
    for i = 1, #h, 2 do
      local r = sa.dec(h[i + 1])
      if r.e > now then
        out[#out + 1] = {r.key, r.m, sa.fmt(r.f), h[i], r.s, r.sid, sa.fmt(r.e), r.is or ''}
      end
    end
  end
  return {locks = out}
end

-- signing keys: what operators asked every Guard to do (field g: the generation; d:<kid>: a dropped key id)
sa.ops.note_keys = function(p, now, since)
  local key = sa.key('keys', 'notes')
  local g = redis.call('HINCRBY', key, 'g', 1)
  if p.drop ~= nil then redis.call('HSETNX', key, 'd:' .. p.drop, sa.fmt(now)) end
  return {g = sa.fmt(g)}
end

sa.ops.key_notes = function(p, now, since)
  local h = redis.call('HGETALL', sa.key('keys', 'notes'))
  local g, dropped = 0, {}
  for i = 1, #h, 2 do
    if h[i] == 'g' then g = tonumber(h[i + 1])
    elseif string.sub(h[i], 1, 2) == 'd:' then dropped[#dropped + 1] = string.sub(h[i], 3) end
  end
  table.sort(dropped)
  return {g = sa.fmt(g), dropped = dropped}
end

-- whether a principal's latest token carried a generation claim (field gc: '1' or '0')
sa.ops.gen_claim_note = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  sa.touch_principal(p.sub, p.iss)
  redis.call('HSET', sa.pkey(p.sub, p.iss), 'gc', p.present and '1' or '0')
  return {ok = 1}
end

sa.ops.gen_claim = function(p, now, since)
  return {gc = redis.call('HGET', sa.pkey(p.sub, p.iss), 'gc') or ''}
end

sa.ops.reset_generation = function(p, now, since)
  sa.adopt(p.sub, p.iss, p.lg)
  local key = sa.pkey(p.sub, p.iss)
  local g = tonumber(redis.call('HGET', key, 'g') or '0')
  if g ~= 0 then redis.call('HSET', key, 'g', '0') end
  return {g = sa.fmt(g)}
end

-- append audit records (in this call's slot)
sa.ops.record = function(p, now, since)
  sa.audit(p.records, now)
  return {ok = 1}
end
