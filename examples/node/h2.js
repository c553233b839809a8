// An HTTP/2-only (h2c) server for `herd run --backend-protocol h2`: answers
// with the protocol version it was reached with, its worker id and the
// scheme herd says the client used.
const http2 = require('node:http2');

const server = http2.createServer((req, res) => {
  if (req.url === '/healthz') return res.end('ok\n');
  if (req.url === '/missing') {
    res.statusCode = 404;
    return res.end();
  }
  res.setHeader('content-type', 'text/plain');
  res.end(`HTTP/${req.httpVersion} worker ${process.env.HERD_WORKER_ID} ${req.headers['x-forwarded-proto']}\n`);
});
server.listen(Number(process.env.PORT || 8000), '127.0.0.1');
