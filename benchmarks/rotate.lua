-- wrk script: every request carries the bearer token of the next principal (round robin over a file of tokens,
-- one per line); on the lock route the object id also rotates.
--   wrk -t1 -c32 -d6s --latency -s rotate.lua http://127.0.0.1:PORT -- TOKENS_FILE METHOD PATH [OBJECTS]
-- PATH is used as it is, or, with OBJECTS > 0, followed by the object number (0 .. OBJECTS-1).
-- done() prints one line "WRKJSON {...}" with the counts and latency percentiles (microseconds).

local tokens = {}
local method = "GET"
local path = "/plain"
local objects = 0
local counter = 0

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then tokens[#tokens + 1] = "Bearer " .. line end
  end
  method = args[2] or method
  path = args[3] or path
  objects = tonumber(args[4] or "0")
end

function request()
  counter = counter + 1
  local target = path
  if objects > 0 then target = path .. (counter % objects) end
  return wrk.format(method, target, {Authorization = tokens[(counter % #tokens) + 1]}, nil)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests": %d, "duration_us": %d, "non_2xx": %d, "connect_errors": %d, "read_errors": %d, ' ..
    '"write_errors": %d, "timeouts": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, "max_us": %d}\n',
    summary.requests, summary.duration, e.status, e.connect, e.read, e.write, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
