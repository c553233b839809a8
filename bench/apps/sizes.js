// Answers of real sizes for bench/bodies: GET /N answers N KiB (one
// buffer, made once per size; chunked, as Node frames a body that follows
// writeHead without a Content-Length; GET /N?length with one), and any
// request with a body reads it all and answers how many bytes it got. The port comes from $PORT; with
// $BENCH_DIR set it records that it listens and its request count, as
// hello.js does.
const http = require('node:http');
const fs = require('node:fs');

const port = Number(process.env.PORT || 3000);
const answers = new Map();
let served = 0;

function answer(kib) {
  let b = answers.get(kib);
  if (!b) {
    b = Buffer.alloc(kib * 1024, 'x');
    answers.set(kib, b);
  }
  return b;
}

const server = http.createServer((req, res) => {
  served++;
  let got = 0;
  req.on('data', (d) => { got += d.length; });
  req.on('end', () => {
    if (req.method === 'GET' || req.method === 'HEAD') {
      const kib = Math.min(Math.max(parseInt(req.url.slice(1), 10) || 1, 1), 16384);
      const body = answer(kib);
      const head = { 'Content-Type': 'application/octet-stream' };
      if (req.url.endsWith('?length')) head['Content-Length'] = body.length;
      res.writeHead(200, head);
      res.end(body);
    } else {
      res.writeHead(200, { 'Content-Type': 'text/plain' });
      res.end(`${got} bytes\n`);
    }
  });
});

server.listen(port, '127.0.0.1', () => {
  const dir = process.env.BENCH_DIR;
  if (!dir) return;
  fs.writeFileSync(`${dir}/ready/${process.pid}`, '');
  setInterval(() => fs.writeFileSync(`${dir}/count/${process.pid}`, String(served)), 100).unref();
});
