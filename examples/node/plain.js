// The hello-world server from Node's documentation, unmodified: it listens
// on port 3000 itself. Under herd, herd's preload module makes that
// listen() take part in the cluster's mode (see the README).
const http = require('node:http');

const hostname = '127.0.0.1';
const port = 3000;

const server = http.createServer((req, res) => {
  res.statusCode = 200;
  res.setHeader('Content-Type', 'text/plain');
  res.end('Hello, World!\n');
});

server.listen(port, hostname, () => {
  console.log(`Server running at http://${hostname}:${port}/`);
});
