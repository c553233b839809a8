// An app written for Node's cluster module, unmodified: its primary forks
// two workers, which serve. Under herd each herd worker runs one such
// primary; herd's preload takes part in the cluster's mode through the
// primary's round-robin handle, and at a stop has it disconnect its
// workers, which finish their requests first (see the README).
const cluster = require('node:cluster');
const http = require('node:http');

if (cluster.isPrimary) {
  for (let i = 0; i < 2; i++) cluster.fork();
  cluster.on('exit', (worker, code, signal) => {
    if (!worker.exitedAfterDisconnect) {
      console.log(`worker ${worker.process.pid} died (${signal || code}); forking another`);
      cluster.fork();
    }
  });
} else {
  http.createServer((req, res) => {
    if (req.url === '/slow') {
      console.log(`slow request in ${process.pid}`);
      setTimeout(() => res.end(`slow answer from ${process.pid}\n`), 1000);
      return;
    }
    res.end(`hello from cluster worker ${process.pid}\n`);
  }).listen(process.env.PORT || 3000);
}
