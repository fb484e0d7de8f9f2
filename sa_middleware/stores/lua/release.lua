-- sa-middleware Redis store: release of tickets (its own function, or a script of its own: nothing else runs on
-- this path).
--
-- argv: per ticket, its id, '1' when its last key is a one-time token's jti claim (deleted if it still names this
-- ticket), and how many of the keys are its own; keys: those keys in order, the hashes that hold the ticket (its
-- principal's tickets, the holders of its locks), all in one slot. A release only deletes, so it neither reads the
-- clock nor the epoch marker: a lost state is detected by the next admission.

function sa.release(keys, argv)
  local k = 0
  for i = 1, #argv, 3 do
    local tid, n = argv[i], tonumber(argv[i + 2])
    local last = k + n
    if argv[i + 1] == '1' then
      if redis.call('GET', keys[last]) == tid then redis.call('DEL', keys[last]) end
      last = last - 1
    end
    for j = k + 1, last do redis.call('HDEL', keys[j], tid) end
    k = k + n
  end
  return 1
end
