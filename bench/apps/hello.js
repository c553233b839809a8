// The hello-world server from Node's documentation, with two changes for
// the benchmark: the port comes from $PORT (default 3000, as in the docs)
// so several can run side by side, and with $BENCH_DIR set it records its
// request count (for fairness) and that it is listening (for the chaos runs).
const http = require('node:http');
const fs = require('node:fs');

const hostname = '127.0.0.1';
const port = Number(process.env.PORT || 3000);
let served = 0;

const server = http.createServer((req, res) => {
  served++;
  res.statusCode = 200;
  res.setHeader('Content-Type', 'text/plain');
  res.end('Hello, World!\n');
});

server.listen(port, hostname, () => {
  const dir = process.env.BENCH_DIR;
  if (!dir) return;
  fs.writeFileSync(`${dir}/ready/${process.pid}`, '');
  setInterval(() => fs.writeFileSync(`${dir}/count/${process.pid}`, String(served)), 100).unref();
});
