-- sa-middleware Redis store: release of a ticket (its own function, or a script of its own: nothing else runs on
-- this path).
--
-- keys: the hashes that hold the ticket argv[1] (its principal's tickets, the holders of its locks), all in one slot;
-- when argv[2] is '1', the last key is a one-time token's jti claim, deleted if it still names this ticket. A release
-- only deletes, so it neither reads the clock nor the epoch marker: a lost state is detected by the next admission.

function sa.release(keys, argv)
  local tid, n = argv[1], #keys
  if argv[2] == '1' then
    if redis.call('GET', keys[n]) == tid then redis.call('DEL', keys[n]) end
    n = n - 1
  end
  for i = 1, n do redis.call('HDEL', keys[i], tid) end
  return 1
end
