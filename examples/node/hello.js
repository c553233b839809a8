// An ordinary Node server that works under herd in every mode: it serves on
// the inherited socket (fd 3) when herd passes one, else on $PORT.
const http = require('node:http');

const server = http.createServer((req, res) => {
  res.end(`hello from node worker ${process.env.HERD_WORKER_ID} (pid ${process.pid})\n`);
});

const where = process.env.LISTEN_FDS ? { fd: 3 } : Number(process.env.PORT || 3000);
server.listen(where, () => console.log('listening'));

// Graceful stop: finish in-flight requests, then exit.
process.on('SIGTERM', () => server.close(() => process.exit(0)));
