-- wrk: print the figures bench/herdbench.py reads (latencies in µs).
-- With BENCH_POST_KIB set every request is a POST of that many KiB
-- (bench/bodies).
local kib = tonumber(os.getenv("BENCH_POST_KIB") or "")
if kib then
  wrk.method = "POST"
  wrk.body = string.rep("x", kib * 1024)
  wrk.headers["Content-Type"] = "application/octet-stream"
end

done = function(summary, latency, requests)
  io.write(string.format("LAT %d %d %d %d\n", latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), summary.requests))
  local e = summary.errors
  io.write(string.format("ERR %d %d %d %d %d\n", e.connect, e.read, e.write, e.status, e.timeout))
end
