// Node's own cluster module running bench/apps/hello.js as N workers
// ($WORKERS, default 2), with the scheduling policy from
// NODE_CLUSTER_SCHED_POLICY (rr, Node's default on Linux, or none), and
// workers restarted when they die, as the cluster docs show.
const cluster = require('node:cluster');
const path = require('node:path');

if (cluster.isPrimary) {
  const n = Number(process.env.WORKERS || 2);
  for (let i = 0; i < n; i++) cluster.fork();
  cluster.on('exit', () => cluster.fork());
} else {
  require(path.join(__dirname, 'hello.js'));
}
