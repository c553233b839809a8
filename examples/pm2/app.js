// The app the ecosystem file runs: it listens on PORT, as PM2 apps do.
const http = require('node:http');

const server = http.createServer((req, res) => {
  res.end(`${process.env.GREETING} (${process.env.NODE_ENV || 'development'}) from worker ${process.env.NODE_APP_INSTANCE}\n`);
});
server.listen(process.env.PORT || 3000, () => {
  console.log(`listening on ${process.env.PORT}`);
  console.warn(`started in ${process.env.NODE_ENV || 'development'} mode`); // stderr
});
process.on('SIGTERM', () => server.close(() => process.exit(0)));
