-- POST one body, read from the file named after wrk's "--", on every request.
--
--   wrk ... -s post.lua URL -- BODY_FILE [unique|static] ["Header: value" ...]
--
-- With "unique", each request replaces the token __N__ in the body by a fresh integer, so that no two
-- requests carry the same input and no cache can answer them. The integers stay below 2^24 (thread i
-- counts from i * 2^22, at most four threads), so they stay distinct after a cast to float32.
-- The body is split once in init(); a request costs one string concatenation, which keeps wrk far
-- from being the bottleneck (the benchmark reports wrk's own CPU use).
--
--   wrk -t1 -c64 -d20s -s loadtests/wrk/post.lua http://127.0.0.1:8000/predict -- body.json unique
--
-- The content type is application/json unless a header argument sets another.
--
-- done() prints one line, "WRK_JSON {...}", that the harness parses: requests, duration, errors and
-- latency percentiles in microseconds.

local threads = {}
local prefix, suffix, static
local counter = 0

function setup(thread)
  thread:set("id", #threads)
  table.insert(threads, thread)
end

function init(args)
  local file = assert(io.open(args[1], "rb"), "usage: wrk ... -s post.lua URL -- BODY_FILE [unique|static]")
  local body = file:read("*a")
  file:close()
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
  for i = 3, #args do
    local name, value = string.match(args[i], "^([^:]+):%s*(.*)$")
    wrk.headers[name] = value
  end
  local first, last = string.find(body, "__N__", 1, true)
  if args[2] == "unique" and first then
    prefix = string.sub(body, 1, first - 1)
    suffix = string.sub(body, last + 1)
    counter = (id or 0) * 4194304
  else
    wrk.body = body
    static = wrk.format()
  end
end

function request()
  if static then
    return static
  end
  counter = counter + 1
  return wrk.format(nil, nil, nil, prefix .. counter .. suffix)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"p50":%d,"p90":%d,"p99":%d,"max":%d,"mean":%.1f}}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, latency.mean))
end
