-- wrk script for lab/flood: every request carries a key never sent before.
--
--   wrk -t T -c C -s lab/load/flood.lua URL -- QUOTA SEED [plain|format]
--
-- Each thread sends QUOTA requests with keys flood-<thread>-<n>-<random hex> ("format":
-- flood_ and 36 random base62 characters, a key of the filter's key_format in shape
-- whose checksum is right only by chance), then stops
-- (wrk.thread:stop(); a request or so per connection may still go out, with a new key
-- too). wrk's main thread only ends at -d or on SIGINT: lab/flood watches Envoy's
-- counters and sends SIGINT once the flood is through. done() prints one line
-- "FLOOD_SUMMARY {...}".

local next_thread_id = 0

function setup(thread)
  thread:set("thread_id", next_thread_id)
  next_thread_id = next_thread_id + 1
end

local quota, n, in_format = 0, 0, false
local BASE62 = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"

function init(args)
  quota = tonumber(args[1]) or 1000
  local seed = tonumber(args[2]) or 1
  in_format = args[3] == "format"
  math.randomseed(seed * 1000003 + thread_id * 7919)
end

local function formatted_key()
  local chars = {}
  for i = 1, 36 do
    local d = math.random(1, 62)
    chars[i] = BASE62:sub(d, d)
  end
  return "flood_" .. table.concat(chars)
end

function request()
  n = n + 1
  if n > quota then
    wrk.thread:stop()
  end
  local key
  if in_format then
    key = formatted_key()
  else
    key = string.format("flood-%d-%d-%08x", thread_id, n, math.random(0, 0x7fffffff))
  end
  return wrk.format("GET", "/flood", { ["x-api-key"] = key })
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'FLOOD_SUMMARY {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
