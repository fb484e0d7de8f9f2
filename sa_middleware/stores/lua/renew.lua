-- sa-middleware Redis store: lease renewal of tickets (their principal's record and their lock holders).

-- renew: extend live records (tickets and lock holders) by `lease` from now; expired ones stay expired
sa.ops.renew = function(p, now, since)
  local expires = now + p.lease
  for _, item in ipairs(p.items) do
    local key
    if item[1] == 'p' then key = sa.pkey(item[2], item[4], ':tk') else key = sa.key('l', item[2]) end
    local tids = item[3]
    local values = redis.call('HMGET', key, unpack(tids))
    local renewed = false
    for i, raw in ipairs(tids) do
      local value = values[i]
      if value then
        local r = sa.dec(value)
        if r.e > now then
          r.e = expires
          redis.call('HSET', key, raw, sa.enc(r))
          renewed = true
        end
      end
    end
    if renewed then
      sa.keep(key, p.lease)
      if item[1] == 'l' then sa.keep(sa.key('l', item[2], ':f'), p.lease + sa.FENCE_SLACK) end
    end
  end
  return {ok = 1}
end
