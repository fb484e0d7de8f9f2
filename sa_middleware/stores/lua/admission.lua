-- sa-middleware Redis store: admission.
--
-- sa.evaluate is sa_middleware/rules.py's `evaluate`, line for line: the same checks in the same order with the same
-- codes, details and Retry-After values (tests/stores/test_rule_agreement.py runs both on the same cases). The
-- admission `a` carries the route's policy as `a.policy`: the fields of records.EffectivePolicy under their Python
-- names (a field that is None is absent). On one server `a` holds only the request's own fields and borrows its
-- token's fields from a table shared by the calls of that token (sa.token, through `__index`): never iterate it,
-- encode it or read it with rawget, and never write into the tables it lends.

local COMPROMISED = 'this context is related to a reported compromise; re-authenticate'

local function listed(list)
  if list ~= nil and #list > 0 then return list end
  return nil
end

local function deny(v, code, detail, retry)
  v.code, v.detail, v.retry = code, detail, retry
  return v
end

function sa.is_newer(m_at, m_gen, iat, gen)
  if m_gen ~= nil and gen ~= nil then return gen > m_gen end
  return iat ~= nil and iat > m_at
end

function sa.new_session(a, now, status)
  local e = a.exp
  if status ~= 'active' then e = math.max(a.exp, now + sa.RET) end
  return {id = a.sid, s = a.sub, is = sa.nonempty(a.iss), k = a.kind, st = status, c = now, l = now, e = e,
          cl = a.client, ua = a.ua, dv = a.dev, cr = a.cred, ac = a.actor}
end

function sa.nonempty(x)
  if x == '' then return nil end
  return x
end

local function set_status(v, sid, sub, iss, status)
  if v.status[sid] == nil then v.status_order[#v.status_order + 1] = sid end
  v.status[sid] = {sub = sub, iss = iss or '', st = status}
end

-- rules.owns: a session serves the same subject under the same issuer (one stored without an issuer: any issuer;
-- one without a subject, revoked before it was seen: anyone)
function sa.owns(x, a)
  return x.s == '' or (x.s == a.sub and (x.is == nil or x.is == '' or x.is == a.iss))
end

-- rules.is_active: seen within session_idle, token not expired, not revoked (paused and compromised count)
function sa.is_active(x, idle, now)
  return x.st ~= 'revoked' and x.l + idle > now and x.e > now
end

local function older(x, y)
  if x.c ~= y.c then return x.c < y.c end
  return x.id < y.id
end

-- the state one admission is decided on. `facts` come from other slots (cluster) or are read here (one server).
-- Returns nil when the session is unknown to the principal and the session index was not consulted yet.
function sa.snapshot(a, now, since, facts)
  local s = {now = now, since = since, markers = {}}
  s.p = sa.principal(a.sub, a.iss)
  if not s.p.exists and a.lg then -- seen for the first time under this issuer
    sa.adopt(a.sub, a.iss, a.lg)
    s.p = sa.principal(a.sub, a.iss)
  end
  if a.actor ~= nil then sa.adopt(a.actor, a.iss, a.lg) end
  s.sessions = sa.records(sa.pkey(a.sub, a.iss, ':ss'), now, true)
  for _, x in ipairs(s.sessions) do
    if x.id == a.sid then s.session = x end
  end
  s.tickets = sa.records(sa.pkey(a.sub, a.iss, ':tk'), now, true)
  if facts == nil then -- one server: read the other facts here
    facts = {}
    local keep_for = a.exp - now + sa.RET
    if a.dev ~= nil then sa.fact({'dev', a.dev}, nil, a.iss, keep_for, facts) end
    if a.cred ~= nil then sa.fact({'cred', a.cred}, nil, a.iss, keep_for, facts) end
    if a.actor ~= nil then sa.fact({'actor', a.actor}, nil, a.iss, keep_for, facts) end
    if a.policy.one_time and a.jti ~= nil then sa.fact({'jti', a.jti}, nil, a.iss, keep_for, facts) end
    if s.session == nil then
      local h = redis.call('HMGET', sa.key('s', a.sid), 'o', 'st', 'oi')
      if h[1] then facts.idx = {o = h[1], st = h[2] or nil, oi = h[3] or nil} else facts.idx = false end
    end
  elseif s.session == nil and facts.idx == nil then
    return nil
  end
  s.facts = facts
  if (facts.since or 0) > s.since then s.since = facts.since end
  local idx = facts.idx
  if s.session == nil and idx and a.lg and idx.o == a.sub and (idx.oi or '') == '' then
    -- one server: the session as stored before issuers were recorded, adopted by this issuer's principal (the
    -- session index is rewritten: ix = nil)
    local raw = redis.call('HGET', sa.key('p', a.sub, ':ss'), a.sid)
    if raw then
      local x = sa.dec(raw)
      if x.e > now then
        x.id, x.raw, x.ix = a.sid, nil, nil
        s.session = x
      end
    end
  end
  -- a session id held by another principal (or revoked before it was ever seen) stands in for the session
  if s.session == nil and idx and (idx.o ~= a.sub or not sa.owns({s = idx.o, is = idx.oi}, a)) then
    s.session = {id = a.sid, s = idx.o, is = idx.oi, st = idx.st or 'active', l = 0, e = 0, c = 0}
  end
  if s.p.ma ~= nil then s.markers[#s.markers + 1] = {at = s.p.ma, gen = s.p.mg} end
  if facts.actor_ma ~= nil then s.markers[#s.markers + 1] = {at = tonumber(facts.actor_ma)} end
  if facts.cred_ma ~= nil then s.markers[#s.markers + 1] = {at = tonumber(facts.cred_ma)} end
  if facts.dev_ma ~= nil then s.markers[#s.markers + 1] = {at = tonumber(facts.dev_ma)} end
  s.dev_ok = facts.dev_ok
  s.jti_seen = facts.jti == true
  return s
end

function sa.evaluate(a, s, with_locks)
  local now, p = s.now, s.p
  local v = {status = {}, status_order = {}, grants = {}}

  -- generation ratchet and not-before watermark (a detected state loss is a watermark too)
  local gen = a.gen or 0
  if gen < p.g then
    if a.gen == nil then
      return deny(v, 'stale_generation', "the principal's credential generation was rotated and this token " ..
                  'carries no generation claim; a new token will not help until an operator resets it')
    end
    return deny(v, 'stale_generation', 'the credential generation was superseded; obtain a new token')
  end
  if gen > p.g then v.gen = gen end
  if p.nb ~= nil and (a.iat == nil or a.iat < p.nb) then
    return deny(v, 'token_revoked', "tokens issued before the principal's revocation are refused")
  end
  if s.since > 0 and (a.iat == nil or a.iat < s.since) then
    return deny(v, 'token_revoked', 'tokens issued before the authorisation store lost its state are refused')
  end
  if p.da ~= nil then return deny(v, 'token_revoked', "the principal's account is disabled") end

  -- session status
  local session = s.session
  if session ~= nil and not sa.owns(session, a) then
    return deny(v, 'invalid_token', 'the session id belongs to another principal')
  end
  if p.sb ~= nil and (a.iat == nil or a.iat <= p.sb) then
    return deny(v, 'session_revoked', "the principal's sessions were revoked; sign in again")
  end
  if session ~= nil then
    if session.st == 'revoked' then return deny(v, 'session_revoked', 'this session was revoked or evicted') end
    if session.st == 'paused' then
      return deny(v, 'session_paused', 'this session is paused until an operator resumes it')
    end
    if session.st == 'compromised' and not sa.is_newer(session.ma or now, session.mg, a.iat, a.gen) then
      return deny(v, 'credential_compromised', COMPROMISED)
    end
  end

  -- compromise markers (principal, actor, credential, device)
  local cleared = nil
  if session ~= nil then cleared = session.ca end
  for _, m in ipairs(s.markers) do
    if not (cleared ~= nil and m.at <= cleared) and not sa.is_newer(m.at, m.gen, a.iat, a.gen) then
      return deny(v, 'credential_compromised', COMPROMISED)
    end
  end

  -- reuse and replay
  local client = a.client .. '|' .. a.ua
  for _, t in ipairs(s.tickets) do
    if t.th == a.th and t.cl ~= client then return deny(v, 'token_reuse', 'this token is in use by another client') end
  end
  if a.policy.one_time and s.jti_seen then return deny(v, 'token_replayed', 'this one-time token was already used') end

  -- scopes and step-up
  if #a.policy.scopes > 0 then
    local granted = sa.set(a.tscopes)
    if p.pv ~= nil and (a.iat == nil or p.pa == nil or a.iat < p.pa) then
      local kept = {}
      for x in pairs(granted) do if p.pv[x] then kept[x] = true end end
      granted = kept
    end
    for _, x in ipairs(a.policy.scopes) do
      if not granted[x] then return deny(v, 'insufficient_scope', 'required scope missing or withdrawn') end
    end
  end
  if a.policy.max_auth_age ~= nil and (a.auth_time == nil or now - a.auth_time > a.policy.max_auth_age) then
    return deny(v, 'step_up_required', 'a more recent authentication is required')
  end
  local acr = a.acr
  if p.aa ~= nil and (a.iat == nil or a.iat < p.aa) then
    acr = p.as -- the assurance level reported since the token was issued replaces its acr
  end
  if #a.policy.acr_values > 0 then
    local met = false
    for _, x in ipairs(a.policy.acr_values) do if x == acr then met = true end end
    if not met then return deny(v, 'step_up_required', 'a stronger authentication is required') end
  end

  -- device posture
  if a.policy.require_compliant_device then
    if a.dev == nil then return deny(v, 'device_noncompliant', 'the token names no device') end
    if s.dev_ok == false then return deny(v, 'device_noncompliant', 'the device is marked non-compliant') end
  end

  -- parallel sessions: whichever route made them active, the requesting session must be among the principal's
  -- max_sessions oldest active sessions ("reject"); "evict_oldest" evicts the oldest others until it is one of at
  -- most max_sessions. A session that is not active yet counts as the newest.
  local evict = {}
  if a.policy.max_sessions ~= nil then
    local others = {}
    for _, x in ipairs(s.sessions) do
      if x.id ~= a.sid and sa.is_active(x, a.idle, now) then others[#others + 1] = x end
    end
    table.sort(others, older)
    if a.policy.on_session_limit == 'evict_oldest' then
      for i = 1, #others - a.policy.max_sessions + 1 do evict[#evict + 1] = others[i].id end
    else
      local count = #others
      if session ~= nil and sa.is_active(session, a.idle, now) then
        count = 0
        for _, x in ipairs(others) do if older(x, session) then count = count + 1 end end
      end
      if count >= a.policy.max_sessions then
        return deny(v, 'too_many_sessions', 'at most ' .. a.policy.max_sessions ..
          (a.policy.max_sessions == 1 and ' active session is allowed' or ' active sessions are allowed'))
      end
    end
  end

  -- actions in flight
  if a.policy.max_in_flight ~= nil and #s.tickets >= a.policy.max_in_flight then
    return deny(v, 'too_many_in_flight', 'at most ' .. a.policy.max_in_flight ..
      (a.policy.max_in_flight == 1 and ' request may be in flight' or ' requests may be in flight'), 1)
  end
  if #s.tickets > 0 then
    local tags, conflicts = sa.set(a.policy.tags), sa.set(a.policy.conflicts)
    for _, t in ipairs(s.tickets) do
      if a.policy.exclusive or t.x then
        return deny(v, 'conflicting_action', 'another action of this principal is in flight', 1)
      end
      if sa.intersects(t.tg, conflicts) or sa.intersects(t.cf, tags) then
        return deny(v, 'conflicting_action', 'a conflicting action of this principal is in flight', 1)
      end
    end
  end

  -- risk
  local risk = {}
  for _, e in ipairs(p.risk) do if e[2] > now then risk[#risk + 1] = e end end
  if a.policy.max_risk ~= nil then
    local level, last = 0, nil
    for _, e in ipairs(risk) do
      level = level + e[1]
      if last == nil or e[2] > last then last = e[2] end
    end
    if level > a.policy.max_risk then
      return deny(v, 'risk_too_high', "a recent action raised this principal's risk", sa.seconds(last - now))
    end
  end

  -- object locks (in a cluster they are decided by the lock step, on the locks' own slots)
  if with_locks then
    for _, req in ipairs(a.locks) do
      local lock, mode = req[1], req[2]
      local blocking = sa.blocking(s.holders[lock], mode, a.tid)
      if #blocking > 0 then
        local soonest = nil
        for _, h in ipairs(blocking) do if soonest == nil or h.e < soonest then soonest = h.e end end
        if a.policy.on_lock_conflict == 'pause' then
          if a.kind ~= 'human' then
            set_status(v, a.sid, a.sub, a.iss, 'paused')
            if session == nil then v.session = sa.new_session(a, now, 'paused') end
            return deny(v, 'session_paused', lock .. ' is being modified by another principal; this session is ' ..
                                             'paused until an operator resumes it')
          end
          for _, h in ipairs(blocking) do
            if h.k ~= 'human' then set_status(v, h.sid, h.s, h.is, 'paused') end
          end
        end
        return deny(v, 'object_locked', lock .. ' is locked by another request', sa.seconds(soonest - now))
      end
      v.grants[#v.grants + 1] = {lock, mode, sa.next_fence(s.fences[lock], now)}
    end
  end

  -- admitted
  for _, sid in ipairs(evict) do set_status(v, sid, a.sub, a.iss, 'revoked') end
  if session == nil then
    v.session = sa.new_session(a, now, 'active')
    v.new_session = true
  else
    v.session = {id = session.id, s = a.sub, is = sa.nonempty(a.iss), k = a.kind, st = 'active', c = session.c, l = now,
                 e = math.max(session.e, a.exp), cl = a.client, ua = a.ua, dv = a.dev, cr = a.cred, ac = a.actor,
                 ca = session.ca, ix = session.ix}
  end
  if a.policy.raises_risk ~= 0 then
    risk[#risk + 1] = {a.policy.raises_risk, now + a.policy.risk_window, a.tid}
    v.risk = risk
  end
  v.jti = a.policy.one_time
  -- what later admissions of the principal read of it (an empty list or a false flag is left out)
  v.ticket = {sid = a.sid, th = a.th, cl = client, tg = listed(a.policy.tags), cf = listed(a.policy.conflicts),
              x = a.policy.exclusive or nil, e = now + a.lease}
  return v
end

-- rules.seen_again: a session record left as stored, because nothing but its last-seen time changed and the stored
-- one is less than min(SEEN_PRECISION, session_idle / 100) seconds old
local function seen_again(rec, old, now, idle)
  if old == nil or not old.raw or now - old.l >= math.min(sa.SEEN, idle / 100) then return false end
  for k, x in pairs(rec) do
    if k ~= 'l' and old[k] ~= x then return false end
  end
  for k in pairs(old) do
    if rec[k] == nil and k ~= 'raw' then return false end
  end
  return true
end

-- the principal-slot writes of a verdict. Returns the undo record (what a compensation restores) and, when the
-- session index's lease must be extended, the seconds it must live from now.
function sa.apply_principal(a, s, v, now, writer)
  local pkey = sa.pkey(a.sub, a.iss)
  local undo = {ev = {}}
  if v.gen ~= nil or v.risk ~= nil then
    if v.gen ~= nil and v.gen > s.p.g then redis.call('HSET', pkey, 'g', sa.fmt(v.gen)) end
    sa.touch_principal(a.sub, a.iss)
    if v.risk ~= nil then
      redis.call('HSET', pkey, 'rk', sa.encode_risk(v.risk))
      undo.r = true
    end
  end
  local touch = nil
  if v.session ~= nil then
    local rec, skey = v.session, sa.pkey(a.sub, a.iss, ':ss')
    undo.s = (s.session ~= nil and s.session.raw) or false
    if v.new_session or rec.ix == nil or rec.ix < rec.e + sa.RET / 2 then
      rec.ix = rec.e + sa.RET
      touch = rec.ix - now
    end
    rec.w = writer
    if not seen_again(rec, s.session, now, a.idle) then
      redis.call('HSET', skey, rec.id, sa.enc(rec))
      -- the key already outlives a stored record that expires no earlier (on the server's clock)
      local stored = s.session ~= nil and s.session.raw ~= nil and s.session.raw ~= false
      if not (stored and rec.e <= s.session.e and sa.real_clock()) then sa.keep(skey, rec.e - now, #s.sessions == 0) end
    end
  end
  for _, sid in ipairs(v.status_order) do
    local st = v.status[sid]
    if not (v.session ~= nil and sid == v.session.id) then
      local prev = sa.update_status(st.sub, st.iss, sid, st.st, now, writer)
      if prev ~= nil and st.sub == a.sub and st.iss == a.iss then undo.ev[sid] = prev end
    end
  end
  return undo, touch
end

-- the audit records of an admission (stores/sqlite.py `_admission_audit`): its denial (or, when asked, the
-- admission) and the sessions it paused or evicted, judged by their status before the verdict was applied
function sa.before(v)
  local out = {}
  for _, sid in ipairs(v.status_order) do
    local raw = redis.call('HGET', sa.pkey(v.status[sid].sub, v.status[sid].iss, ':ss'), sid)
    if raw then out[sid] = cjson.decode(raw).st end
  end
  return out
end

function sa.admitted_detail(a, fences)
  local keys, parts = {}, {}
  for key in pairs(fences) do keys[#keys + 1] = key end
  table.sort(keys)
  for _, key in ipairs(keys) do parts[#parts + 1] = key .. '#' .. fences[key] end
  local detail = a.kind .. '; ticket ' .. a.tid
  if #parts > 0 then detail = detail .. '; locks ' .. table.concat(parts, ' ') end
  return detail
end

function sa.admission_audit(a, v, before, with_admitted)
  local out = {}
  if v.code ~= nil then
    if a.audit_locked or v.code ~= 'object_locked' then
      out[#out + 1] = {k = 'denial', c = v.code, s = 'middleware', u = a.sub, i = a.sid, r = a.route, d = v.detail}
    end
  elseif v.ticket ~= nil and a.audit_admitted and with_admitted then
    local fences = {}
    for _, g in ipairs(v.grants) do fences[g[1]] = sa.fmt(g[3]) end
    out[#out + 1] = {k = 'admission', c = 'admitted', s = 'middleware', u = a.sub, i = a.sid, r = a.route,
                     d = sa.admitted_detail(a, fences)}
  end
  for _, sid in ipairs(v.status_order) do
    local st, was = v.status[sid], before[sid]
    if st.st == 'paused' and (was == nil or was == 'active') then
      local why
      if sid == a.sid then why = 'paused by a lock conflict: ' .. v.detail
      else why = 'paused by a lock conflict with session ' .. a.sid .. ' of ' .. a.sub .. ' on ' .. a.route end
      out[#out + 1] = {k = 'change', c = 'session_paused', s = 'middleware', u = st.sub, i = sid, r = a.route, d = why}
    elseif st.st == 'revoked' and was ~= nil and was ~= 'revoked' then
      out[#out + 1] = {k = 'change', c = 'session_evicted', s = 'middleware', u = st.sub, i = sid, r = a.route,
                       d = 'evicted by session ' .. a.sid .. ' (max_sessions=' .. a.policy.max_sessions .. ')'}
    end
  end
  return out
end

function sa.result(v)
  if v.code ~= nil then return {d = v.code, m = v.detail, r = v.retry} end
  local fences = {}
  for _, g in ipairs(v.grants) do fences[g[1]] = sa.fmt(g[3]) end
  return {ok = 1, e = sa.fmt(v.ticket.e), f = fences}
end

-- one server: the whole admission, one call, one round trip. The payload is the ticket id; argv[6] is the route's
-- policy (JSON, see sa.policy), argv[7] the fields of the token (JSON, see sa.token), argv[8] to argv[11] the
-- request's own fields: client, user agent, route, locks (a JSON list, '' for none); then the releases this
-- process made since its last call, applied first (per ticket: its id, the number of its keys, those keys:
-- RedisStore._release_args)
local NO_LOCKS = {}
sa.ops.admit = function(tid, now, since, argv)
  local locks = NO_LOCKS
  if argv[11] ~= '' then locks = cjson.decode(argv[11]) end
  local a = setmetatable({tid = tid, client = argv[8], ua = argv[9], route = argv[10], locks = locks},
                         sa.token(argv[7]))
  a.policy = sa.policy(argv[6])
  local i = 12
  while argv[i] ~= nil do
    local tid, n = argv[i], tonumber(argv[i + 1])
    for j = i + 2, i + 1 + n do redis.call('HDEL', argv[j], tid) end
    i = i + 2 + n
  end
  local s = sa.snapshot(a, now, since, nil)
  s.holders, s.fences = {}, {}
  local counters = {}
  for _, req in ipairs(a.locks) do
    s.holders[req[1]] = sa.holders(req[1], now)
    s.fences[req[1]], counters[req[1]] = sa.fence(req[1], s.since)
  end
  local v = sa.evaluate(a, s, true)
  local before = {}
  if #v.status_order > 0 then before = sa.before(v) end
  local _, touch = sa.apply_principal(a, s, v, now, nil)
  if v.session ~= nil then
    local rec = v.session
    local keep_for = rec.e - now + sa.RET
    if touch ~= nil then
      local ikey = sa.key('s', a.sid)
      redis.call('HSET', ikey, 'o', a.sub)
      redis.call('HDEL', ikey, 'st')
      if a.iss ~= '' then redis.call('HSET', ikey, 'oi', a.iss) else redis.call('HDEL', ikey, 'oi') end
      redis.call('PEXPIRE', ikey, math.ceil(touch * 1000) + sa.SLACK)
    end
    local out = {}
    if rec.dv ~= nil then sa.fact({'dev', rec.dv}, a.sub, a.iss, keep_for, out) end
    if rec.cr ~= nil then sa.fact({'cred', rec.cr}, a.sub, a.iss, keep_for, out) end
    if rec.ac ~= nil then sa.fact({'actor', rec.ac}, a.sub, a.iss, keep_for, out) end
  end
  if v.ticket ~= nil then
    local tkey = sa.pkey(a.sub, a.iss, ':tk')
    redis.call('HSET', tkey, a.tid, sa.enc(v.ticket))
    sa.keep(tkey, v.ticket.e - now, #s.tickets == 0)
    for _, g in ipairs(v.grants) do
      sa.grant(g[1], g[2], g[3], a, v.ticket.e, now, #s.holders[g[1]] == 0, not counters[g[1]])
    end
    if v.jti and a.jti ~= nil then
      local ms = math.ceil((a.exp - now) * 1000)
      if ms > 0 then redis.call('SET', sa.key('j', a.jti), a.tid, 'PX', ms) end
    end
  end
  sa.audit(sa.admission_audit(a, v, before, true), now)
  return sa.result(v)
end
