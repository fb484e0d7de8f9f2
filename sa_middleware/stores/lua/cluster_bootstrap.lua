#!lua flags=allow-cross-slot-keys
-- sa-middleware Redis store, cluster bootstrap: mark the store as brand-new on one master. KEYS[1] routes the call;
-- ARGV are the epoch markers of all the slots that master serves (0: no state loss to answer for).
local n = 0
for _, key in ipairs(ARGV) do
  if redis.call('SET', key, '0', 'NX') then n = n + 1 end
end
return n
