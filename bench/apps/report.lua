-- wrk: print the figures bench/herdbench.py reads (latencies in µs).
done = function(summary, latency, requests)
  io.write(string.format("LAT %d %d %d %d\n", latency:percentile(50), latency:percentile(99),
    latency:percentile(99.9), summary.requests))
  local e = summary.errors
  io.write(string.format("ERR %d %d %d %d %d\n", e.connect, e.read, e.write, e.status, e.timeout))
end
