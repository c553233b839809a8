// An HTTP/2-only (h2c) server for `herd run --backend-protocol h2`: answers
// with the protocol version it was reached with, its worker id and the
// scheme herd says the client used.
const http2 = require('node:http2');

const handler = (req, res) => {
  if (req.url === '/healthz') return res.end('ok\n');
  if (req.url === '/big') {
    // 64 MiB in 64 KiB writes, as fast as the reader takes them.
    const chunk = Buffer.alloc(64 * 1024, 120);
    let left = 1024;
    const pump = () => {
      while (left-- > 0) if (!res.write(chunk)) return res.once('drain', pump);
      res.end();
    };
    return pump();
  }
  if (req.url === '/missing') {
    res.statusCode = 404;
    return res.end();
  }
  res.setHeader('content-type', 'text/plain');
  res.end(`HTTP/${req.httpVersion} worker ${process.env.HERD_WORKER_ID} ${req.headers['x-forwarded-proto']}\n`);
};
// With TLS_CERT and TLS_KEY (PEM files): h2 over TLS only, as a remote
// upstream `ADDR,h2,tls` would be.
const fs = require('node:fs');
const server = process.env.TLS_CERT
  ? http2.createSecureServer({ cert: fs.readFileSync(process.env.TLS_CERT), key: fs.readFileSync(process.env.TLS_KEY) }, handler)
  : http2.createServer(handler);
server.listen(Number(process.env.PORT || 8000), '127.0.0.1');
