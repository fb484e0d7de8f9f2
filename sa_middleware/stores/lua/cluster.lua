-- sa-middleware Redis store: the steps of an admission in a Redis Cluster, where a principal's keys, its locks and
-- the facts of other slots (device, credential, actor, jti) live on different slots (RedisStore._admit_cluster).

-- cluster, step 1 (the principal's slot): every check but the locks; on success the ticket is written, pending
-- its locks. Returns {need = 'index'} when the session is new to the principal and the index was not claimed yet.
sa.ops.principal = function(p, now, since)
  local a = p.a
  local s = sa.snapshot(a, now, since, p.f)
  if s == nil then return {need = 'index'} end
  local v = sa.evaluate(a, s, false)
  local before = {}
  if #v.status_order > 0 then before = sa.before(v) end
  local undo, touch = sa.apply_principal(a, s, v, now, a.tid)
  if v.ticket ~= nil then
    v.ticket.u = undo
    local tkey = sa.pkey(a.sub, a.iss, ':tk')
    redis.call('HSET', tkey, a.tid, sa.enc(v.ticket))
    sa.keep(tkey, v.ticket.e - now)
  end
  local r = sa.result(v)
  if touch ~= nil and not (v.new_session and p.f.idx) then r.touch = sa.fmt(touch) end
  if v.code ~= nil then
    sa.audit(sa.admission_audit(a, v, before, false), now)
  else -- written by the store once the later steps succeed (a compensation would make them untrue)
    r.au = sa.admission_audit(a, v, before, false)
  end
  return r
end

-- cluster: the facts of other slots (device, credential, actor, jti), read on their own slot
sa.ops.facts = function(p, now, since)
  local out = {since = since}
  for _, item in ipairs(p.items) do sa.fact(item, p.sub, p.iss, p.exp - now + sa.RET, out) end
  return out
end

-- cluster: claim a session id for a principal in the session index (or extend the claim)
sa.ops.claim = function(p, now, since)
  local key = sa.key('s', p.sid)
  local h = redis.call('HMGET', key, 'o', 'st', 'oi')
  if not h[1] then
    redis.call('HSET', key, 'o', p.sub)
    h[1] = p.sub
  end
  if h[1] == p.sub and p.iss ~= '' and (h[3] or '') == '' then -- claimed (or stored before issuers): this issuer's
    redis.call('HSET', key, 'oi', p.iss)
    h[3] = p.iss
  end
  if h[1] == p.sub and (h[3] or '') == p.iss then sa.keep(key, p.ttl and tonumber(p.ttl) or (p.exp - now + sa.RET)) end
  return {since = since, idx = {o = h[1], st = h[2] or nil, oi = h[3] or nil}}
end

-- cluster: claim a one-time token's jti
sa.ops.jti = function(p, now, since)
  local ms = math.ceil((p.exp - now) * 1000)
  if ms <= 0 then return {ok = 1} end
  if redis.call('SET', sa.key('j', p.jti), p.tid, 'PX', ms, 'NX') then return {ok = 1} end
  return {ok = 0}
end

-- cluster, step 2 (one lock slot): all the locks of this slot, or none
sa.ops.lock = function(p, now, since)
  local fences, expires = {}, now + p.lease
  local checked = {}
  for _, req in ipairs(p.locks) do
    local lock, mode = req[1], req[2]
    local blocking = sa.blocking(sa.holders(lock, now), mode, p.tid)
    if #blocking > 0 then
      local soonest, who = nil, {}
      for _, h in ipairs(blocking) do
        if soonest == nil or h.e < soonest then soonest = h.e end
        who[#who + 1] = {h.s, h.sid, h.k, h.is or ''}
      end
      return {ok = 0, key = lock, r = sa.seconds(soonest - now), h = who}
    end
    checked[#checked + 1] = {lock, mode, sa.next_fence(sa.fence(lock, since), now)}
  end
  for _, g in ipairs(checked) do
    sa.grant(g[1], g[2], g[3], p, expires, now)
    fences[g[1]] = sa.fmt(g[3])
  end
  return {ok = 1, f = fences}
end

-- cluster: compensate step 1 when a later step refused: remove the ticket and restore what it changed (unless a
-- later admission changed it since); optionally pause the requesting session (on_lock_conflict="pause")
sa.ops.undo = function(p, now, since)
  local a = p.a
  local tkey, skey = sa.pkey(a.sub, a.iss, ':tk'), sa.pkey(a.sub, a.iss, ':ss')
  local raw = redis.call('HGET', tkey, a.tid)
  if raw then
    redis.call('HDEL', tkey, a.tid)
    local u = cjson.decode(raw).u or {}
    local cur = redis.call('HGET', skey, a.sid)
    if cur and cjson.decode(cur).w == a.tid then
      if u.s then redis.call('HSET', skey, a.sid, u.s) else redis.call('HDEL', skey, a.sid) end
    end
    for sid, prev in pairs(u.ev or {}) do
      local c = redis.call('HGET', skey, sid)
      if c and cjson.decode(c).w == a.tid then redis.call('HSET', skey, sid, prev) end
    end
    if u.r then
      local pkey = sa.pkey(a.sub, a.iss)
      local rk = redis.call('HGET', pkey, 'rk')
      if rk then
        local kept = {}
        for _, e in ipairs(cjson.decode(rk)) do if e[3] ~= a.tid then kept[#kept + 1] = e end end
        redis.call('HSET', pkey, 'rk', cjson.encode(kept))
      end
    end
  end
  local records = p.audit or {}
  if p.pause then
    local raw = redis.call('HGET', skey, a.sid)
    local was = nil
    if raw then was = cjson.decode(raw).st end
    if not sa.update_status(a.sub, a.iss, a.sid, 'paused', now) and not raw then
      local rec = sa.new_session(a, now, 'paused')
      redis.call('HSET', skey, a.sid, sa.enc(rec))
      sa.keep(skey, rec.e - now)
    end
    if was == nil or was == 'active' then
      records[#records + 1] = {k = 'change', c = 'session_paused', s = 'middleware', u = a.sub, i = a.sid,
                               r = a.route, d = 'paused by a lock conflict: ' .. p.detail}
    end
  end
  sa.audit(records, now)
  return {ok = 1}
end
