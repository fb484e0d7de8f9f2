-- sa-middleware Redis store: the entry point of a call. Every call checks the slot's epoch marker first (a missing
-- marker is a detected state loss: see the "Stores" page of the documentation), then runs the operation named by
-- argv[1]. The listings (READ_ONLY) only read the marker.

local READ_ONLY = {now = true, sessions = true, locks = true}
-- operations whose payload is a plain text, not JSON (the admission: its ticket id)
local PLAIN = {admit = true}

function sa.main(keys, argv)
  local handler = sa.ops[argv[1]]
  if handler == nil then return redis.error_reply('sa-middleware: unknown operation ' .. tostring(argv[1])) end
  sa.begin(keys, argv)
  local now = sa.clock()
  local since, lost
  if READ_ONLY[argv[1]] then
    -- a listing never writes: without the marker (a store never used, or one that lost its state) it answers from
    -- what is there, and the next write detects the loss
    since, lost = tonumber(redis.call('GET', keys[1])), false
  else
    since, lost = sa.epoch(now)
  end
  local payload = argv[4]
  if not PLAIN[argv[1]] then payload = cjson.decode(payload) end
  local result = handler(payload, now, since, argv)
  result.now = sa.fmt(now)
  result.since = sa.fmt(result.since or since)
  if lost then
    result.lost = 1
    sa.audit({{k = 'change', c = 'state_loss', s = 'store',
               d = 'the epoch marker was missing: Redis lost this state (flushed, or restarted without ' ..
                   'persistence); tokens issued before ' .. sa.fmt(now) .. ' are refused'}}, now)
  end
  return cjson.encode(result)
end
