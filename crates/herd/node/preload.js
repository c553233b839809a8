// herd's Node preload, loaded into workers with NODE_OPTIONS=--require.
//
// It lets an unmodified app that calls `server.listen(3000)` take part in
// herd's port sharing. The first listen() on a TCP port (not 0) is the
// app's public server, and depends on HERD_MODE:
//   dispatch   the server binds nothing; connections arrive on Node's IPC
//              channel (NODE_CHANNEL_FD) as handles the master accepted
//   shared,    the server listens on the inherited socket, fd 3
//   reuseport
//   proxy      the server listens on the Unix socket $HERD_SOCKET (else on
//              127.0.0.1:$HERD_PORT), where herd relays to it; its sockets
//              still show 127.0.0.1 and that port as on TCP.
//              With no PORT set (herd serves the app on the port its
//              code names, as PM2's cluster mode does), a listen() that
//              names no port (`listen(process.env.PORT)`) is that server too.
// On SIGTERM/SIGINT (when the app has no handler of its own) that server
// stops taking connections, finishes the ones it has, and the process exits.
// An app that handles SIGINT only (PM2's stop signal) gets SIGINT for SIGTERM.
// Under --kill-signal none (PM2's shutdown_with_message) herd's shutdown
// notice comes as process.on('message') 'shutdown', with no signal after it.
// Whoever stops an HTTP server, its keep-alive clients are let go without
// an error: each answer from then on says `Connection: close`, and a
// connection idle for a second is closed (see drainHttp).
//
// Messages, as a PM2 or cluster app expects them: process.send(msg) goes
// to herd's message channel (fd 4) in every mode, as {"type":"send"|
// "broadcast"|"master",…} when msg is one of those, else as a "master"
// message; and once the app listens for process 'message' events, herd's
// messages (herd send, herd broadcast, other workers) arrive as them.
'use strict';
(() => {
  const mode = process.env.HERD_MODE;
  if (!mode || process.env.HERD_WORKER_ID === undefined) return;
  // A Node program the worker started after taking its port (a helper
  // server) is not the worker: it listens where it asks.
  if (process.env.HERD_PORT_TAKEN) return;
  const net = require('net');
  const origListen = net.Server.prototype.listen;
  const servers = new Set();
  let claimed = false;
  let stopping = false;
  let dispatch = null; // { server, handle }
  let open = 0;
  const reportOpen = process.env.HERD_REPORT_OPEN === '1';
  // Proxy mode: the worker's private port. Without PORT (read now, before
  // the app's dotenv may set it) the app's own port is the public one.
  const privatePort = process.env.HERD_PORT || process.env.PORT;
  const appPort = mode === 'proxy' && !process.env.PORT && !!privatePort;
  const unixPath = mode === 'proxy' ? process.env.HERD_SOCKET : undefined;

  // Node's own channel: in dispatch mode the dispatch socket, for the
  // dispatch protocol only (the app's process.send goes to fd 4, below).
  const nodeSend = typeof process.send === 'function' ? process.send.bind(process) : null;
  // Only the process herd started has the dispatch socket as its channel.
  // Its Node children (cluster workers, fork()s) have a channel to it, and
  // must not take that for herd's: the variable goes before any is started.
  const dispatchChannel = mode === 'dispatch' && !!process.env.HERD_DISPATCH_FD && !!process.channel;
  if (dispatchChannel) delete process.env.HERD_DISPATCH_FD;
  const send = (msg) => {
    if (process.connected && nodeSend) {
      try { nodeSend(msg); } catch (_) { /* the master is gone */ }
    }
  };

  // herd's message channel, opened only when the app uses messages (an
  // app that reads fd 4 itself, as examples/node/ipc.js does, keeps it).
  // Checked now, before the app opens anything: a Node program started
  // without it (its fds closed) may have another file at that number later,
  // which herd's lines must not go into.
  const ipcFd = (() => {
    const fd = Number(process.env.HERD_IPC_FD);
    // bigint: a plain fstatSync of a socket leaves its type in the stat
    // buffer that realpathSync reads (nodejs/node#51142), and Node then took
    // a symlinked main script (npm's and yarn's bins) at its link's path, so
    // its relative require()s failed.
    try { return fd && require('fs').fstatSync(fd, { bigint: true }).isSocket() ? fd : 0; } catch (_) { return 0; }
  })();
  // Where herd's listening socket is in the fd modes: 3 (LISTEN_FDS), or
  // where a wrapper above passed it (below).
  const listenFd = Number(process.env.HERD_LISTEN_FD) || 3;

  // --kill-signal none (PM2's shutdown_with_message): no signal follows
  // herd's shutdown notice, so the channel is read from the start.
  const byMessage = process.env.HERD_SHUTDOWN_MESSAGE === '1';
  let channel = null;
  const openChannel = () => {
    if (channel || !ipcFd) return channel;
    if (typeof Bun === 'undefined') {
      channel = new net.Socket({ fd: ipcFd, readable: true, writable: true });
      channel.unref();
    } else {
      // Bun's net.Socket reads nothing from a descriptor it is given; a
      // read stream does (and, as Node's IPC, keeps the process alive).
      const fs = require('fs');
      channel = fs.createReadStream(null, { fd: ipcFd, autoClose: false, encoding: 'utf8' });
      channel.write = (line) => {
        try { fs.writeSync(ipcFd, line); return true; } catch (_) { return false; }
      };
    }
    let buf = '';
    channel.on('data', (d) => {
      buf += d;
      for (let i; (i = buf.indexOf('\n')) >= 0; buf = buf.slice(i + 1)) {
        let m;
        try { m = JSON.parse(buf.slice(0, i)); } catch (_) { continue; }
        if (m && m.type === 'message') process.emit('message', m.data, undefined, m.from);
        else if (m && m.type === 'undeliverable') process.emit('message', m, undefined);
        else if (m && m.type === 'shutdown' && byMessage) onShutdownMessage();
      }
    });
    channel.on('error', () => { /* the master is gone */ });
    return channel;
  };
  if (ipcFd) {
    process.send = (msg, handle, options, cb) => {
      const done = [handle, options, cb].find((f) => typeof f === 'function');
      const herdTypes = ['send', 'broadcast', 'master', 'ready', 'replace'];
      // process.send('ready') is PM2's wait_ready signal.
      const line = msg === 'ready' ? { type: 'ready' }
        : msg && typeof msg === 'object' && herdTypes.includes(msg.type) ? msg
        : { type: 'master', data: msg };
      const ch = openChannel();
      const ok = ch ? ch.write(JSON.stringify(line) + '\n') : false;
      if (done) process.nextTick(done, ch ? null : new Error('no herd channel'));
      return ok;
    };
    process.on('newListener', (event) => { if (event === 'message') openChannel(); });
    if (byMessage) openChannel();
  }

  // The TCP port a listen() call asks for, or null (path, fd, handle, none).
  const portOf = (args) => {
    const a = args[0];
    const isPort = (p) => (typeof p === 'number' || (typeof p === 'string' && /^\d+$/.test(p))) && Number(p) > 0;
    if (isPort(a)) return Number(a);
    if (a && typeof a === 'object' && !Array.isArray(a) && a.path === undefined &&
        a.fd === undefined && a.handle === undefined && a._handle === undefined && isPort(a.port)) {
      return Number(a.port);
    }
    return null;
  };
  // The host a listen() call names, if any.
  const hostOf = (args) => {
    const a = args[0];
    if (a && typeof a === 'object') return typeof a.host === 'string' ? a.host : undefined;
    return typeof args[1] === 'string' ? args[1] : undefined;
  };
  // A listen() that names no port, path, fd or handle: none, 0, or the
  // NaN of `Number(process.env.PORT)` (which alone would throw).
  const noPort = (p) => p === undefined || p === null ||
    (typeof p === 'number' && (p === 0 || Number.isNaN(p))) || p === '0';
  const namesNothing = (args) => {
    const a = args[0];
    if (typeof a === 'function' || noPort(a)) return true;
    return !!a && typeof a === 'object' && a.path === undefined && a.fd === undefined &&
      a.handle === undefined && a._handle === undefined && noPort(a.port);
  };

  // Ready: Node cannot send sd_notify's Unix datagram, so the line goes
  // on herd's message channel (fd 4), written without taking the fd over
  // (the app may read that channel itself).
  // `asked`: the port the app's own listen() named, for herd to say where
  // the app is served when that is elsewhere (a port written in its code).
  // (`port` says only that, where readiness comes by another road.)
  const tell = (type, asked, host) => {
    if (!ipcFd) return;
    const msg = JSON.stringify(asked ? { type, port: asked, host } : { type });
    try { require('fs').writeSync(ipcFd, msg + '\n'); } catch (_) { /* no channel */ }
  };
  const sayReady = (asked, host) => tell('listening', asked, host);
  // The worker's public server is this process's: mark it for its children.
  const claim = () => {
    claimed = true;
    process.env.HERD_PORT_TAKEN = String(process.pid);
  };

  // A wrapper (`npm start`, a launcher script, tsx) runs the app as a child
  // that shares its stdio; Node gives a child only fds 0 to 2, so the app
  // would lose herd's socket (fd 3, shared and reuseport) and the channel
  // its listen() is reported on (fd 4; without it herd cannot serve the
  // app on the port its code names). Until this process serves the port
  // itself, such a child gets them, after its stdio: at 3 and 4, or at 4
  // and 5 when the child also has Node's IPC at 3 (tsx forks so once this
  // module gives it a process.send), and HERD_LISTEN_FD and HERD_IPC_FD
  // say where. Children with stdio of their own (exec, pipes) and cluster
  // workers (NODE_UNIQUE_ID; their listen() goes through their primary)
  // are left alone.
  const passFds = [
    (mode === 'shared' || mode === 'reuseport') && process.env.LISTEN_FDS ? listenFd : 'ignore',
    ipcFd || 'ignore',
  ];
  if (mode !== 'dispatch' && passFds.some((f) => f !== 'ignore')) {
    const { ChildProcess } = require('child_process');
    const origSpawn = ChildProcess.prototype.spawn;
    // Our own stdout and stderr: 'inherit', the fd, or process.stdout.
    const ours = (io, i) => io === 'inherit' || io === i || (!!io && io.fd === i);
    ChildProcess.prototype.spawn = function herdSpawn(options) {
      const io = options && options.stdio === 'inherit' ? ['inherit', 'inherit', 'inherit'] : options && options.stdio;
      const env = options && options.envPairs;
      const shared = !claimed && Array.isArray(io) && ours(io[1], 1) && ours(io[2], 2) &&
        (io.length === 3 || (io.length === 4 && io[3] === 'ipc' && Array.isArray(env) &&
          !env.some((kv) => kv.startsWith('NODE_UNIQUE_ID='))));
      if (!shared) return origSpawn.call(this, options);
      options = { ...options, stdio: [...io, ...passFds] };
      if (Array.isArray(env)) {
        const at = (i) => (passFds[i] === 'ignore' ? [] : [`${i ? 'HERD_IPC_FD' : 'HERD_LISTEN_FD'}=${io.length + i}`]);
        options.envPairs = env.filter((kv) => !kv.startsWith('HERD_LISTEN_FD=') && !kv.startsWith('HERD_IPC_FD='))
          .concat(at(0), at(1));
      }
      return origSpawn.call(this, options);
    };
  }

  // Keep-alive clients across a stop (HAProxy's soft stop): once an HTTP
  // server stops (herd's SIGTERM, or the app's own server.close(), which
  // since Node 19 closes idle connections at once), every answer says
  // `Connection: close`, so each client closes after its next request
  // rather than send it on a connection the server is closing; a
  // connection still idle after a grace is closed then.
  // In proxy mode the only client is herd, which has already stopped
  // sending to this worker and retries a pooled connection that closes.
  const IDLE_GRACE_MS = mode === 'proxy' ? 0 : 1000;
  const drained = new WeakSet();
  // Nothing is kept per request: each socket that carried a request is
  // remembered once (a Set lookup per request), and at the stop the answer
  // it is writing (Node's socket._httpMessage) is found through it. A Set
  // and two listeners per request cost a Node hello-world 5% to 13% of its
  // keep-alive throughput. An answer queued behind a pipelined one has no
  // socket yet: those few are kept, by connection, until they finish or
  // their connection closes.
  const drainHttp = (server) => {
    const closeIdle = server.closeIdleConnections;
    if (typeof closeIdle !== 'function') return; // not HTTP, or Node < 18.2
    if (drained.has(server)) return;
    drained.add(server);
    const sockets = new Set();
    // Answers waiting their turn behind a pipelined one, by connection.
    const queued = new Map();
    function forgetSocket() {
      sockets.delete(this);
      queued.delete(this);
    }
    let draining = false;
    let graceOver = false;
    server.prependListener('request', (req, res) => {
      if (draining) {
        res.setHeader('Connection', 'close');
        return;
      }
      const socket = res.socket || req.socket;
      if (!socket) return;
      if (!sockets.has(socket)) {
        sockets.add(socket);
        socket.once('close', forgetSocket);
      }
      if (!res.socket) {
        // Let go when it finishes, or with its connection: Node emits
        // neither `finish` nor `close` on an answer that never got its
        // socket, and the request's `close` comes as soon as its body is
        // read.
        let waiting = queued.get(socket);
        if (!waiting) queued.set(socket, (waiting = new Set()));
        waiting.add(res);
        res.once('finish', () => waiting.delete(res));
      }
    });
    const closeAfter = (res) => {
      if (res && !res.headersSent) res.setHeader('Connection', 'close');
    };
    server.closeIdleConnections = function herdCloseIdle() {
      if (!draining) {
        draining = true;
        for (const socket of sockets) closeAfter(socket._httpMessage);
        for (const waiting of queued.values()) for (const res of waiting) closeAfter(res);
        sockets.clear();
        queued.clear();
        setTimeout(() => { graceOver = true; closeIdle.call(server); }, IDLE_GRACE_MS).unref();
      }
      if (graceOver) closeIdle.call(server);
    };
  };

  const track = (server) => {
    servers.add(server);
    server.on('connection', (socket) => {
      open++;
      socket.once('close', () => {
        open--;
        if (reportOpen && dispatch) send({ herd: 'open', open });
      });
    });
  };

  // A server on herd's Unix socket looks to the app as it would on its
  // loopback port: address() names that port, and each connection's peer
  // is 127.0.0.1 (Express's req.ip, rate limiters and loggers read it).
  const asLoopback = (server) => {
    const port = Number(privatePort);
    server.address = () => ({ address: '127.0.0.1', family: 'IPv4', port });
    const peer = { configurable: true, enumerable: true };
    server.prependListener('connection', (socket) => {
      Object.defineProperties(socket, {
        remoteAddress: { ...peer, value: '127.0.0.1' },
        remoteFamily: { ...peer, value: 'IPv4' },
        remotePort: { ...peer, value: 0 },
        localAddress: { ...peer, value: '127.0.0.1' },
        localPort: { ...peer, value: port },
      });
    });
  };

  const parseAddr = (s) => {
    const m = /^\[?([^\]]*)\]?:(\d+)$/.exec(s || '');
    if (!m) return { address: '0.0.0.0', family: 'IPv4', port: 0 };
    const v6 = m[1].includes(':');
    return { address: m[1], family: v6 ? 'IPv6' : 'IPv4', port: Number(m[2]) };
  };

  // Dispatch: a stand-in for the listening handle, as Node's cluster
  // round-robin gives its workers; net's own connection handler is
  // attached to it by _listen2, so sockets are counted and closed as usual.
  // In a cluster primary this is the round-robin handle its workers'
  // listen() asked for: each worker checks that the port it was given is
  // the one it asked for (else EADDRINUSE), so the handle names that one.
  const listenDispatch = (server, port, cb) => {
    if (typeof server._listen2 !== 'function') {
      throw new Error('herd: this Node version has no net.Server._listen2; use --mode shared or proxy');
    }
    const addr = parseAddr(process.env.HERD_LISTEN);
    const cluster = require('cluster');
    if (cluster.isPrimary && Object.keys(cluster.workers || {}).length > 0) addr.port = port;
    const handle = {
      listen: () => 0,
      close: () => { stopDispatch(); },
      getsockname: (out) => { Object.assign(out, addr); return 0; },
      ref: () => {},
      unref: () => {},
    };
    if (cb) server.once('listening', cb);
    server._handle = handle;
    server._listen2(addr.address, addr.port, addr.family === 'IPv6' ? 6 : 4, 511);
    dispatch = { server, handle };
    process.channel.ref();
    send({ herd: 'listening' });
  };

  const stopDispatch = () => {
    if (!dispatch || dispatch.stopped) return;
    dispatch.stopped = true;
    send({ herd: 'closed' });
    // Handles already on their way are still served (see below); then the
    // channel no longer keeps the process alive.
    setTimeout(() => { if (process.channel) process.channel.unref(); }, 100).unref();
  };

  process.on('internalMessage', (msg, handle) => {
    if (!msg || msg.cmd !== 'NODE_HERD_CONN' || !handle) return;
    if (!dispatch) { handle.close(); return; }
    // Even after the app closed its server: an accepted connection is served.
    // Looked up each time: a cluster primary's round-robin handle replaces
    // it with its own, which hands the connection to a cluster worker.
    dispatch.handle.onconnection(0, handle);
  });

  // A node:cluster worker under Bun listens by itself (Bun's cluster shares
  // a TCP port through SO_REUSEPORT, not through its primary), and two
  // processes cannot bind one Unix socket: it takes the worker's port.
  const bunClusterWorker = () => typeof Bun !== 'undefined' && require('cluster').isWorker;
  const herdListenOver = (origListen) => function herdListen(...args) {
    // Every HTTP server the app starts, whatever it listens on (an app
    // may take fd 3 itself), lets its keep-alive clients go gently.
    drainHttp(this);
    const a0 = args[0];
    if (!claimed && (mode === 'shared' || mode === 'reuseport') &&
        a0 && typeof a0 === 'object' && Number(a0.fd) === listenFd) {
      // The app takes herd's socket itself: it is the public server.
      claim();
      track(this);
      this.once('listening', () => sayReady());
      return origListen.apply(this, args);
    }
    const port = claimed ? null : portOf(args);
    if (port === null && !(appPort && !claimed && namesNothing(args))) {
      return origListen.apply(this, args);
    }
    claim();
    const cb = typeof args[args.length - 1] === 'function' ? args[args.length - 1] : undefined;
    const backlog = args.find((a, i) => i > 0 && typeof a === 'number');
    track(this);
    // Only the process with herd's channel takes dispatched connections.
    // A cluster worker's listen() comes here in its primary (Node's
    // round-robin handle), which takes them and hands them on.
    const host = hostOf(args);
    if (dispatchChannel && !dispatch) {
      listenDispatch(this, port, cb);
      tell('port', port, host);
      return this;
    }
    if (mode !== 'dispatch') this.once('listening', () => sayReady(port, host));
    if ((mode === 'shared' || mode === 'reuseport') && process.env.LISTEN_FDS) {
      // A wrapper that forked the app with Node's IPC and without herd's
      // socket left Node's channel where the socket belongs (a cluster
      // worker's listen() goes through its primary, which has the socket).
      if (process.channel && process.channel.fd === listenFd && !require('cluster').isWorker) {
        throw new Error(`herd: fd ${listenFd} is Node's IPC channel here, not herd's socket: a wrapper forked this process without it. In ${mode} mode run the app with node itself (node --import tsx app.ts), or use --mode proxy`);
      }
      delete process.env.LISTEN_FDS;
      delete process.env.LISTEN_PID;
      delete process.env.LISTEN_FDNAMES;
      return origListen.call(this, { fd: listenFd, backlog }, cb);
    }
    if (unixPath && !bunClusterWorker()) {
      asLoopback(this);
      return origListen.call(this, { path: unixPath, backlog }, cb);
    }
    if (mode === 'proxy' && privatePort) {
      return origListen.call(this, { port: Number(privatePort), host: '127.0.0.1', backlog }, cb);
    }
    return origListen.apply(this, args);
  };
  net.Server.prototype.listen = herdListenOver(origListen);

  // Bun runs this module too (BUN_OPTIONS=--preload), in proxy and fork
  // mode only: it cannot serve a socket it inherits or is handed (it
  // ignores `listen({fd: 3})`), so herd refuses the other modes for it. Its
  // node:http Server is not a net.Server, and Bun.serve() (also what an
  // entry file's `export default { fetch }` calls) binds by itself.
  const bunServers = [];
  const patchBun = () => {
    const http = require('http');
    const httpListen = http.Server.prototype.listen;
    if (httpListen !== net.Server.prototype.listen) http.Server.prototype.listen = herdListenOver(httpListen);
    const serve = Bun.serve;
    Bun.serve = function herdServe(options, ...rest) {
      if (claimed || !options || typeof options !== 'object' || options.unix !== undefined ||
        Number(options.port) === 0 && options.port !== undefined && options.port !== null) {
        return serve.call(this, options, ...rest);
      }
      // Bun's own default port: $BUN_PORT, $PORT, $NODE_PORT, else 3000.
      const env = process.env;
      const port = Number(options.port || env.BUN_PORT || env.PORT || env.NODE_PORT || 3000);
      const host = typeof options.hostname === 'string' ? options.hostname : undefined;
      // Fork mode: where the app asked.
      const at = mode !== 'proxy' ? {}
        : unixPath && !bunClusterWorker() ? { unix: unixPath, port: undefined, hostname: undefined }
          : { port: Number(privatePort) || port, hostname: '127.0.0.1', reusePort: true };
      const props = {};
      for (const [k, v] of Object.entries(at)) props[k] = { value: v, enumerable: true };
      const server = serve.call(this, Object.create(options, props), ...rest);
      claim();
      bunServers.push(server);
      servers.add({ close: () => server.stop() });
      sayReady(port, host);
      return server;
    };
  };
  if (typeof Bun !== 'undefined' && (mode === 'proxy' || mode === 'fork')) patchBun();
  // Connections still open on the servers herd stops.
  const busy = () => bunServers.reduce((n, s) => n + s.pendingRequests + s.pendingWebSockets, open);

  const onSignal = (sig) => {
    if (stopping) return;
    stopping = true;
    // An app written for PM2 handles SIGINT, PM2's stop signal, and leaves
    // SIGTERM, herd's, to Node's default (dying at once): it gets a SIGINT.
    const relay = sig === 'SIGTERM' && process.listenerCount(sig) === 1 &&
      process.listenerCount('SIGINT') > 1;
    const theirs = relay || process.listenerCount(sig) > 1;
    const cluster = require('cluster');
    const forked = cluster.isPrimary ? Object.values(cluster.workers || {}) : [];
    if (servers.size === 0 && !theirs && forked.length === 0) {
      // Not a server herd knows of: die of the signal, as without us.
      process.removeAllListeners(sig);
      process.kill(process.pid, sig);
      return;
    }
    stopDispatch();
    for (const s of servers) {
      try { s.close(); } catch (_) { /* already closed */ }
    }
    // The SIGINT comes once the keep-alive clients were told (the grace):
    // a PM2 app's own stop may end idle connections at once (hapi's does),
    // under a client sending its next request.
    if (relay) setTimeout(() => process.emit('SIGINT', 'SIGINT'), servers.size > 0 ? IDLE_GRACE_MS : 0);
    if (theirs) return; // the app's own handler decides when to exit
    // A cluster primary (an app that forks its own Node workers) serves
    // through them: without a handler of its own it would die and take
    // their requests in flight along. Disconnected, each worker stops
    // taking connections, finishes the ones it has and exits (cluster
    // forgets a worker as it is disconnected: they are watched here).
    if (forked.length > 0) cluster.disconnect();
    // Busy connections close once they answer, idle ones after the grace.
    setInterval(() => {
      for (const s of servers) {
        if (typeof s.closeIdleConnections === 'function') s.closeIdleConnections();
      }
      if (busy() === 0 && forked.every((w) => w.isDead())) process.exit(0);
    }, 20);
  };
  // The notice without a signal: an app written for PM2's
  // shutdown_with_message gets process.on('message') 'shutdown' and exits
  // by itself once its servers stopped taking connections; one that does
  // not listen for messages is stopped as on SIGTERM.
  const onShutdownMessage = () => {
    if (process.listenerCount('message') === 0) return onSignal('SIGTERM');
    if (stopping) return;
    stopping = true;
    stopDispatch();
    for (const s of servers) {
      try { s.close(); } catch (_) { /* already closed */ }
    }
    process.emit('message', 'shutdown');
  };
  process.on('SIGTERM', () => onSignal('SIGTERM'));
  process.on('SIGINT', () => onSignal('SIGINT'));
})();
