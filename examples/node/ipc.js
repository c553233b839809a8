// herd's message channel from Node: prints what it receives, and acts on
// {"do":"broadcast","data":…} and {"do":"send","to":N,"data":…}.
const net = require('node:net');
const ch = new net.Socket({ fd: Number(process.env.HERD_IPC_FD), readable: true, writable: true });
const send = (m) => ch.write(JSON.stringify(m) + '\n');
let buf = '';
ch.on('data', (d) => {
  buf += d;
  for (let i; (i = buf.indexOf('\n')) >= 0; buf = buf.slice(i + 1)) {
    const m = JSON.parse(buf.slice(0, i));
    console.log('got', JSON.stringify(m));
    if (m.type === 'shutdown') process.exit(0);
    const c = m.data || {};
    if (c.do === 'broadcast') send({ type: 'broadcast', data: c.data });
    if (c.do === 'send') send({ type: 'send', to: c.to, data: c.data });
  }
});
process.on('SIGTERM', () => {}); // it stops on herd's shutdown notice, sent first
console.log('ready');
