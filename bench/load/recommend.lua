-- wrk script: POST a JSON body per request, for a random user id from a file.
--   wrk -t1 -c64 -d10s -s bench/load/recommend.lua URL -- PATH USERS_FILE INTERVAL_MS [K] [BEAM]
-- PATH: /recommend (the service) or /noop (the ceiling app). INTERVAL_MS > 0 paces each wrk thread
-- to one request every INTERVAL_MS (a fixed rate of threads * 1000 / INTERVAL_MS req/s, spread over
-- that thread's connections); 0 = closed loop, as fast as the connections allow. wrk 4 has no -R
-- (that is wrk2), so the pacing is done here with a monotonic clock through LuaJIT's ffi.
-- done() prints one line "RESULT {json}" for run_load_bench.py.

local ffi = require("ffi")
ffi.cdef [[
  typedef struct { long tv_sec; long tv_nsec; } fair_timespec;
  int clock_gettime(int clk_id, fair_timespec *tp);
]]
local ts = ffi.new("fair_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local thread_id = 0
function setup(thread)
  thread:set("id", thread_id)
  thread_id = thread_id + 1
end

local users, path, interval, k, beam, next_send = {}, "/recommend", 0, 10, 20, nil

function init(args)
  path = args[1] or "/recommend"
  for line in io.lines(args[2]) do
    users[#users + 1] = line
  end
  interval = tonumber(args[3] or "0")
  k = tonumber(args[4] or "10")
  beam = tonumber(args[5] or "20")
  math.randomseed(os.time() * 1000 + (id or 0))
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function delay()
  if interval <= 0 then
    return 0
  end
  local t = now_ms()
  if next_send == nil then
    next_send = t
  end
  local wait = next_send - t
  next_send = math.max(next_send, t - 10 * interval) + interval -- no catch-up bursts after a stall
  if wait < 0 then
    wait = 0
  end
  return wait
end

function request()
  local user = users[math.random(#users)]
  local body = string.format('{"user_id":"%s","k":%d,"beam_size":%d}', user, k, beam)
  return wrk.format(nil, path, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'RESULT {"requests":%d,"duration_us":%d,"p50_us":%d,"p95_us":%d,"p99_us":%d,"max_us":%d,' ..
    '"errors_connect":%d,"errors_read":%d,"errors_write":%d,"errors_status":%d,"errors_timeout":%d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(95),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
