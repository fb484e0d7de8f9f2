-- sa-middleware Redis store: the entry point. Every call checks the slot's epoch marker first (a missing marker is
-- a detected state loss: see the "Stores" page of the documentation), then runs the operation named by ARGV[1].

local handler = sa.ops[ARGV[1]]
if handler == nil then return redis.error_reply('sa-middleware: unknown operation ' .. tostring(ARGV[1])) end
local now = sa.clock()
local since, lost = sa.epoch(now)
local result = handler(cjson.decode(ARGV[4]), now, since)
result.now = sa.fmt(now)
result.since = sa.fmt(result.since or since)
if lost then
  result.lost = 1
  sa.audit({{k = 'change', c = 'state_loss', s = 'store',
             d = 'the epoch marker was missing: Redis lost this state (flushed, or restarted without persistence); ' ..
                 'tokens issued before ' .. sa.fmt(now) .. ' are refused'}}, now)
end
return cjson.encode(result)
