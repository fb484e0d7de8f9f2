#!lua flags=allow-cross-slot-keys
-- sa-middleware Redis store, a state loss declared by an operator on one master of a cluster: every epoch marker of
-- the slots it serves (ARGV; KEYS[1] routes the call) becomes its clock, so tokens issued before are refused.
local t = redis.call('TIME')
local now = string.format('%.17g', tonumber(t[1]) + tonumber(t[2]) / 1000000)
for _, key in ipairs(ARGV) do redis.call('SET', key, now) end
return now
