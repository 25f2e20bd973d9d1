-- wrk script for lab/soak: mixed traffic, every response counted by what was sent.
--
--   wrk -t T -c T -s lab/load/soak.lua URL -- VALID UNKNOWN REVOKED EXPIRED DELAY_MS SEED [RANDOM_LOG]
--
-- Run it with as many connections as threads (-c = -t): each thread then has one request in
-- flight at a time, so a response always belongs to the request made last and can be
-- counted under that request's class. Per request it picks (percent):
--
--   valid      52  GET /orders with soak-valid-<i>, i uniform over 0..VALID-1 (the key
--                  service gives i < 20 a small limit, 20 <= i < 40 no limit of their own
--                  so the configured default applies, the rest a generous one); counted as
--                  valid_small, valid_default, valid_big
--   bearer      3  the same, as "Authorization: Bearer <key>"
--   scope       5  GET /admin/... with a valid key: a rule wants scope "admin" (403)
--   unknown    12  soak-unknown-<j>, j uniform over 0..UNKNOWN-1: never known, repeated
--   random     10  soak-rnd-<thread>-<n>-<random>: never seen before, never seen again
--   revoked     7  soak-revoked-<j>, j over 0..REVOKED-1
--   expired     2  soak-expired-<j>, j over 0..EXPIRED-1
--   missing     6  no key at all
--   duplicate   3  x-api-key twice
--
-- delay() waits DELAY_MS between a response and the next request of that connection, so
-- the load is a steady stream, not a saturation test. done() prints, merged over threads,
-- one line per (second, class, status, code):
--   SOAK_COUNT <unix second> <class> <status> <code>  <n>
-- where code is the filter's error code, "-" for a 200, or "other:<body start>" when the
-- body holds no code (an Envoy local reply, e.g. an upstream failure or a dead wasm VM).

local threads = {}
local next_thread_id = 0

function setup(thread)
  thread:set("thread_id", next_thread_id)
  next_thread_id = next_thread_id + 1
  table.insert(threads, thread)
end

local valid_n, unknown_n, revoked_n, expired_n, delay_ms
local random_n = 0
local random_log = nil
local last_class = "none"
counts = {}  -- global: done() reads it from every thread

function init(args)
  valid_n = tonumber(args[1]) or 200
  unknown_n = tonumber(args[2]) or 300
  revoked_n = tonumber(args[3]) or 10
  expired_n = tonumber(args[4]) or 5
  delay_ms = tonumber(args[5]) or 0
  local seed = tonumber(args[6]) or 1
  math.randomseed(seed * 1000003 + thread_id * 7919)
  if args[7] then
    -- the random keys sent, "<unix second> <key>" a line, so that lab/soak can tell
    -- which of them shared a cache slot with a valid key
    random_log = io.open(args[7] .. "." .. thread_id, "w")
    random_log:setvbuf("line")
  end
end

local function valid_class(i)
  if i < 20 then return "valid_small" end
  if i < 40 then return "valid_default" end
  return "valid_big"
end

local function get(path, headers)
  return wrk.format("GET", path, headers)
end

function request()
  local r = math.random(100)
  if r <= 52 then
    local i = math.random(0, valid_n - 1)
    last_class = valid_class(i)
    return get("/orders", { ["x-api-key"] = "soak-valid-" .. i })
  elseif r <= 55 then
    last_class = "bearer"
    return get("/orders", { ["authorization"] = "Bearer soak-valid-" .. math.random(40, valid_n - 1) })
  elseif r <= 60 then
    last_class = "scope"
    return get("/admin/users", { ["x-api-key"] = "soak-valid-" .. math.random(40, valid_n - 1) })
  elseif r <= 72 then
    last_class = "unknown"
    return get("/orders", { ["x-api-key"] = "soak-unknown-" .. math.random(0, unknown_n - 1) })
  elseif r <= 82 then
    last_class = "random"
    random_n = random_n + 1
    local key = string.format("soak-rnd-%d-%d-%08x", thread_id, random_n, math.random(0, 0x7fffffff))
    if random_log then random_log:write(os.time(), " ", key, "\n") end
    return get("/orders", { ["x-api-key"] = key })
  elseif r <= 89 then
    last_class = "revoked"
    return get("/orders", { ["x-api-key"] = "soak-revoked-" .. math.random(0, revoked_n - 1) })
  elseif r <= 91 then
    last_class = "expired"
    return get("/orders", { ["x-api-key"] = "soak-expired-" .. math.random(0, expired_n - 1) })
  elseif r <= 97 then
    last_class = "missing"
    return get("/orders", {})
  else
    last_class = "duplicate"
    local req = get("/orders", { ["x-api-key"] = "soak-valid-" .. math.random(40, valid_n - 1) })
    -- a table cannot hold a header twice: add the second one to the formatted request
    return (req:gsub("\r\n\r\n$", "\r\nx-api-key: soak-valid-41\r\n\r\n"))
  end
end

function response(status, headers, body)
  local code = "-"
  if status ~= 200 then
    code = body and body:match('"code"%s*:%s*"([%w_]+)"')
    if not code then
      local start = body and body:sub(1, 24) or ""
      code = "other:" .. (start:gsub("[^%w]", "_"))
    end
  end
  local k = os.time() .. " " .. last_class .. " " .. status .. " " .. code
  counts[k] = (counts[k] or 0) + 1
end

function delay()
  return delay_ms
end

function done(summary, latency, requests)
  local merged = {}
  for _, t in ipairs(threads) do
    local c = t:get("counts") or {}
    for k, v in pairs(c) do
      merged[k] = (merged[k] or 0) + v
    end
  end
  for k, v in pairs(merged) do
    io.write("SOAK_COUNT ", k, " ", v, "\n")
  end
  local e = summary.errors
  io.write(string.format(
    'SOAK_SUMMARY {"requests": %d, "duration_us": %d, "p50_us": %d, "p99_us": %d, "max_us": %d, ' ..
    '"err_connect": %d, "err_read": %d, "err_write": %d, "err_status": %d, "err_timeout": %d}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99), latency.max,
    e.connect, e.read, e.write, e.status, e.timeout))
end
