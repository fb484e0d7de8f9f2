-- sa-middleware Redis store: release of a ticket, a script of its own (nothing else is defined on this path).
--
-- KEYS: the hashes that hold the ticket ARGV[1] (its principal's tickets, the holders of its locks), all in one slot;
-- when ARGV[2] is '1', the last key is a one-time token's jti claim, deleted if it still names this ticket. A release
-- only deletes, so it neither reads the clock nor the epoch marker: a lost state is detected by the next admission.

local tid, n = ARGV[1], #KEYS
if ARGV[2] == '1' then
  if redis.call('GET', KEYS[n]) == tid then redis.call('DEL', KEYS[n]) end
  n = n - 1
end
for i = 1, n do redis.call('HDEL', KEYS[i], tid) end
return 1
