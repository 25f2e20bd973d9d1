-- wrk script for lab/bench: every request carries an API key in x-api-key.
--
--   wrk ... -s bench/wrk/keys.lua URL -- HOT_KEYS COLD_EVERY COLD_POOL THREADS
--
-- HOT_KEYS    requests rotate over the keys bench-hot-0 .. bench-hot-(HOT_KEYS-1)
-- COLD_EVERY  0: hot keys only; N: every Nth request of a thread carries a key never sent
--             before in this run, bench-cold-<i> (the key service knows them all)
-- COLD_POOL   how many bench-cold-<i> keys exist; a thread that runs out wraps around
--             (those repeats are cache hits: lab/bench reports the real miss share
--             from Envoy's counters)
-- THREADS     wrk's -t, so that threads take disjoint cold keys
--
-- Every configuration runs this same script, so the load generator does the same work
-- whatever is measured. done() prints one line "BENCH_JSON {...}" for lab/bench.

local next_thread_id = 0

function setup(thread)
  thread:set("thread_id", next_thread_id)
  next_thread_id = next_thread_id + 1
end

local hot_requests = {}
local hot_count, cold_every, cold_pool, threads
local n, cold_n = 0, 0

function init(args)
  hot_count = tonumber(args[1]) or 100
  cold_every = tonumber(args[2]) or 0
  cold_pool = tonumber(args[3]) or 0
  threads = tonumber(args[4]) or 1
  -- Hot requests are formatted once: per request, the script only picks one.
  for i = 0, hot_count - 1 do
    hot_requests[i] = wrk.format("GET", nil, { ["x-api-key"] = "bench-hot-" .. i })
  end
end

function request()
  n = n + 1
  if cold_every > 0 and n % cold_every == 0 then
    local i = (thread_id + threads * cold_n) % cold_pool
    cold_n = cold_n + 1
    return wrk.format("GET", nil, { ["x-api-key"] = "bench-cold-" .. i })
  end
  return hot_requests[n % hot_count]
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "p50_us": %d, "p90_us": %d, "p99_us": %d, ' ..
    '"max_us": %d, "err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, ' ..
    '"err_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, e.connect, e.read, e.write, e.status, e.timeout))
end
