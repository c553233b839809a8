//! Operating a running cluster through the control socket and signals.

mod common;

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

#[test]
fn rolling_reload_under_load_loses_nothing_in_every_mode() {
    for mode in ["proxy", "shared", "reuseport", "dispatch"] {
        let n = name(&format!("reload-{mode}"));
        let h = Herd::start(&["--name", &n, "-i", "3", "--mode", mode], &[DEMO]);
        h.wait_ready(3);
        let before: BTreeSet<u32> = h.worker_pids(3).into_iter().collect();
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        // Keep-alive clients in every mode: the demo drains with herd_sdk::Drain.
        let clients = load(h.port, true, stop.clone(), done.clone());
        // The load is running before the reload begins.
        assert!(wait_until(T, || done.load(Ordering::Relaxed) >= 40));
        let out = herd(&["reload", "--name", &n]);
        let text = ok(&out);
        assert!(text.contains("reloaded 3 workers"), "{text}");
        assert!(text.contains("worker 2: pid"), "progress per slot: {text}");
        stop.store(true, Ordering::Relaxed);
        let mut good = 0;
        for c in clients {
            let (g, bad) = c.join().unwrap();
            assert!(
                bad.is_empty(),
                "{mode}: failed requests during reload: {bad:?}"
            );
            good += g;
        }
        assert!(good > 50, "{mode}: only {good} requests made");
        let after: BTreeSet<u32> = h.worker_pids(3).into_iter().collect();
        assert!(
            before.is_disjoint(&after),
            "{mode}: not every worker was replaced"
        );
    }
}

/// A Node app written for PM2 that stops on SIGINT by itself, closing its
/// server and ending each idle keep-alive connection at once.
const PM2_STOP_JS: &str = r#"const http = require('http');
const idle = new Set();
const server = http.createServer((req, res) => {
  idle.delete(req.socket);
  res.on('finish', () => idle.add(req.socket));
  res.end(`hello from worker ${process.env.HERD_WORKER_ID} (pid ${process.pid})\n`);
});
server.on('connection', (s) => { idle.add(s); s.on('close', () => idle.delete(s)); });
server.listen(process.env.PORT || 3000);
process.on('SIGINT', () => {
  server.close(() => process.exit(0));
  for (const s of idle) s.end();
});
"#;

#[test]
fn keepalive_clients_see_no_failure_across_reloads_of_node_python_perl_and_go_apps() {
    // Issue 14: the old worker closed idle keep-alive connections while
    // clients were sending on them (about 40 errors per reload in fd modes).
    // hello.js is unmodified and calls server.close() on SIGTERM itself
    // (herd's Node preload does the rest); app.py and examples/go drain by
    // themselves; plain uvicorn and hypercorn close idle connections at
    // once when they stop (hypercorn's spawned process dies of the SIGTERM
    // herd sends the group), as does aiohttp, Tornado, waitress and the
    // standard library's servers (Flask's `flask run`, `http.server`) die of
    // it, and
    // herd's Python preload makes them drain in the fd modes; Starman's
    // processes and Mojolicious' daemon end at once, and herd's Perl
    // preload makes them drain; Mojolicious' prefork server drains on
    // SIGQUIT. pm2stop.js, written for PM2,
    // handles SIGINT only and ends
    // its idle keep-alive connections itself at once, as hapi's
    // `server.stop()` does: the preload gives it the SIGINT once its
    // clients were told (about 10 failed per reload).
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let node = format!("{examples}/node/hello.js");
    let python = format!("{examples}/python/app.py");
    let dir = asgi_app_dir("karl-asgi");
    let asgi_dir = dir.to_string_lossy().into_owned();
    let all = ["proxy", "shared", "reuseport", "dispatch"];
    // app.py and uvicorn take a listening socket, not dispatched ones.
    let fd = ["proxy", "shared", "reuseport"];
    // Both of uvicorn's HTTP implementations (`uvicorn[standard]` brings
    // httptools; .ci/run installs it).
    let uvicorn = |http| {
        [
            "uvicorn",
            "--http",
            http,
            "--app-dir",
            &asgi_dir,
            "asgi:app",
        ]
    };
    let (h11, httptools) = (uvicorn("h11"), uvicorn("httptools"));
    // hypercorn takes fd 3 only when told, and its app from the cwd.
    let hypercorn = ["hypercorn", "--bind", "fd://3", "asgi:app"];
    // Mojolicious' prefork server drains on SIGQUIT, which the README gives
    // for the fd modes.
    write_mojo_app(&dir);
    let prefork = ["perl", "mojo.pl", "prefork", "-w", "2"];
    // Its daemon stops at once on SIGTERM (10 to 19 failed in two reloads
    // by hand) unless herd's Perl preload makes it drain.
    let daemon = ["perl", "mojo.pl", "daemon"];
    let quit = ["--kill-signal", "QUIT"];
    std::fs::write(dir.join("pm2stop.js"), PM2_STOP_JS).unwrap();
    let pm2stop = ["node", "pm2stop.js"];
    // aiohttp's run_app() binds the port its code names (the preload puts
    // it on herd's socket) and closes idle connections at once when it
    // stops (8 to 11 failed per reload before the preload made it drain).
    std::fs::write(
        dir.join("aio.py"),
        format!(
            "import os\n\
             from aiohttp import web\n\
             async def hello(request):\n\
             \x20   return web.Response(text='hello from worker %s (pid %d)' % (os.environ['HERD_WORKER_ID'], os.getpid()))\n\
             app = web.Application()\n\
             app.router.add_get('/', hello)\n\
             web.run_app(app, port={}, print=None)\n",
            free_port()
        ),
    )
    .unwrap();
    let aiohttp = ["python3", "aio.py"];
    // Tornado's `listen()` binds the port its code names, and the process
    // dies of SIGTERM with its requests (15 to 19 failed per two reloads
    // of 300 ms requests by hand before the preload made it drain).
    std::fs::write(
        dir.join("tor.py"),
        format!(
            "import asyncio, os, tornado.web\n\
             class Hello(tornado.web.RequestHandler):\n\
             \x20   def get(self):\n\
             \x20       self.write('hello from worker %s (pid %d)' % (os.environ['HERD_WORKER_ID'], os.getpid()))\n\
             async def main():\n\
             \x20   tornado.web.Application([(r'/', Hello)]).listen({})\n\
             \x20   await asyncio.Event().wait()\n\
             asyncio.run(main())\n",
            free_port()
        ),
    )
    .unwrap();
    let tornado = ["python3", "tor.py"];
    // The standard library's threaded servers died of SIGTERM with their
    // requests in flight (their threads end with the process): Flask's
    // development server (a new connection per request), an HTTP/1.1
    // keep-alive `ThreadingHTTPServer` (as Django's runserver is) and
    // `python3 -m http.server`, here with keep-alive too (5 to 7 failed per
    // two reloads under `wrk -c8` by hand before the preload made them
    // drain).
    std::fs::write(
        dir.join("fl.py"),
        "import os\n\
         from flask import Flask\n\
         app = Flask(__name__)\n\
         @app.get('/')\n\
         def hi():\n\
         \x20   return 'flask from worker %s (pid %d)' % (os.environ['HERD_WORKER_ID'], os.getpid())\n",
    )
    .unwrap();
    let flask = ["flask", "--app", "fl", "run"];
    std::fs::write(
        dir.join("ka.py"),
        format!(
            "import os\n\
             from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler\n\
             class H(BaseHTTPRequestHandler):\n\
             \x20   protocol_version = 'HTTP/1.1'\n\
             \x20   def do_GET(self):\n\
             \x20       body = b'hello from worker %d' % os.getpid()\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', str(len(body)))\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(body)\n\
             \x20   def log_message(self, *args):\n\
             \x20       pass\n\
             ThreadingHTTPServer(('', {}), H).serve_forever()\n",
            free_port()
        ),
    )
    .unwrap();
    let threaded_keepalive = ["python3", "ka.py"];
    let http_server_port = free_port().to_string();
    let http_server = [
        "python3",
        "-m",
        "http.server",
        "--protocol",
        "HTTP/1.1",
        &http_server_port,
    ];
    // waitress sets no SIGTERM handler (20 failed in two reloads under
    // `wrk -c8` by hand before the preload made it drain).
    std::fs::write(
        dir.join("wsgi.py"),
        "import os\n\
         def app(environ, start_response):\n\
         \x20   body = b'hello from worker %d' % os.getpid()\n\
         \x20   start_response('200 OK', [('Content-Length', str(len(body)))])\n\
         \x20   return [body]\n",
    )
    .unwrap();
    let waitress_port = format!("--port={}", free_port());
    let waitress = ["waitress-serve", &waitress_port, "wsgi:app"];
    // Starman ends its processes at once on SIGTERM (13 to 27 failed in
    // two reloads under `wrk -c8` by hand before herd's Perl preload made
    // it drain); a process serves one connection at a time, so each worker
    // has as many as there are clients.
    std::fs::write(
        dir.join("app.psgi"),
        "sub { [200, ['Content-Length' => 5], ['hello']] }\n",
    )
    .unwrap();
    let starman = ["starman", "--workers", "8", "app.psgi"];
    let server_starter = ["--env", "SERVER_STARTER_PORT=8000=3"];
    // examples/go/main.go, built with Go's own toolchain: net/http's
    // Shutdown alone fails clients of the fd modes (15 to 22 per two
    // reloads by hand); the example drains first.
    let go_bin = dir.join("hello-go");
    let built = Command::new("go")
        .args(["build", "-o"])
        .arg(&go_bin)
        .arg(format!("{examples}/go/main.go"))
        .env("GOCACHE", concat!(env!("CARGO_TARGET_TMPDIR"), "/gocache"))
        .output()
        .expect("go, to build examples/go (.ci/run installs Debian's golang-go)");
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let go_bin = go_bin.to_string_lossy().into_owned();
    // (name, command, modes, herd's extra flags)
    type App<'a> = (&'a str, &'a [&'a str], &'a [&'a str], &'a [&'a str]);
    // app.py run by a shell without `exec`: the shell dies of the SIGTERM
    // at once, and its group is left to finish the drain.
    let wrapped = format!("python3 {python}; exit 0");
    let apps: [App; 17] = [
        ("node", &["node", &node], &all, &[]),
        ("node-sigint", &pm2stop, &all, &[]),
        ("python3", &["python3", &python], &fd, &[]),
        (
            "python3-behind-sh",
            &["sh", "-c", &wrapped],
            &["shared"],
            &[],
        ),
        ("uvicorn-h11", &h11, &fd, &[]),
        ("uvicorn-httptools", &httptools, &["shared"], &[]),
        ("hypercorn", &hypercorn, &["shared", "reuseport"], &[]),
        ("mojo-prefork", &prefork, &["shared"], &quit),
        ("mojo-daemon", &daemon, &["shared", "reuseport"], &[]),
        ("aiohttp", &aiohttp, &["shared", "reuseport"], &[]),
        ("tornado", &tornado, &["shared", "reuseport"], &[]),
        ("flask-run", &flask, &["shared"], &[]),
        (
            "threading-http-server",
            &threaded_keepalive,
            &["shared", "reuseport"],
            &[],
        ),
        ("python3-m-http.server", &http_server, &["reuseport"], &[]),
        ("waitress", &waitress, &["shared", "reuseport"], &[]),
        (
            "starman",
            &starman,
            &["shared", "reuseport"],
            &server_starter,
        ),
        ("go", &[&go_bin], &fd, &[]),
    ];
    for (lang, cmd, modes, flags) in apps {
        for &mode in modes {
            let n = name(&format!("karl-{lang}-{mode}"));
            let mut args = vec!["--name", &n, "-i", "2", "--mode", mode, "--cwd", &asgi_dir];
            args.extend_from_slice(flags);
            let h = Herd::start(&args, cmd);
            h.wait_ready(2);
            let stop = Arc::new(AtomicBool::new(false));
            let done = Arc::new(AtomicUsize::new(0));
            let clients = load(h.port, true, stop.clone(), done.clone());
            assert!(wait_until(T, || done.load(Ordering::Relaxed) >= 40));
            for _ in 0..3 {
                let text = ok(&herd(&["reload", "--name", &n]));
                assert!(text.contains("reloaded 2 workers"), "{text}");
            }
            stop.store(true, Ordering::Relaxed);
            let (mut good, mut bad) = (0, Vec::new());
            for c in clients {
                let (g, b) = c.join().unwrap();
                good += g;
                bad.extend(b);
            }
            assert!(
                bad.is_empty(),
                "{lang} {mode}: {} of {} keep-alive requests failed across 3 reloads: {:?}",
                bad.len(),
                good + bad.len(),
                &bad[..bad.len().min(5)]
            );
            assert!(good > 100, "{lang} {mode}: only {good} requests made");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// hypercorn runs the app in a process it spawns, which SIGTERM killed at
/// once: herd signals the worker's whole group, so the app's lifespan
/// shutdown (closing pools, flushing) never ran, in every mode. herd's
/// Python preload, which every worker gets in these modes, makes that
/// process stop as hypercorn's parent would make it stop.
#[test]
fn hypercorn_apps_run_their_lifespan_shutdown_when_herd_stops_them() {
    let dir = asgi_app_dir("hc-lifespan");
    std::fs::write(
        dir.join("life.py"),
        "import os\nasync def app(scope, receive, send):\n    if scope['type'] == 'lifespan':\n        while True:\n            m = await receive()\n            if m['type'] == 'lifespan.startup':\n                await send({'type': 'lifespan.startup.complete'})\n            else:\n                open(os.path.join(os.path.dirname(__file__), 'shut-%d' % os.getpid()), 'w').close()\n                await send({'type': 'lifespan.shutdown.complete'})\n                return\n    await send({'type': 'http.response.start', 'status': 200, 'headers': [(b'content-length', b'2')]})\n    await send({'type': 'http.response.body', 'body': b'ok'})\n",
    )
    .unwrap();
    let cwd = dir.to_string_lossy().into_owned();
    let shut = || {
        std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("shut-")
            })
            .count()
    };
    let proxy: &[&str] = &["sh", "-c", "exec hypercorn --bind 127.0.0.1:$PORT life:app"];
    let fd: &[&str] = &["hypercorn", "--bind", "fd://3", "life:app"];
    for (mode, cmd) in [("proxy", proxy), ("shared", fd)] {
        let mut h = Herd::start(&["-i", "2", "--mode", mode, "--cwd", &cwd], cmd);
        h.wait_ready(2);
        // (In the fd modes a worker is ready after 1 s, app started or
        // not; a process killed while it starts runs no shutdown.)
        assert!(h.wait_log_n("Running on", 2, T), "{}", h.log());
        assert!(
            wait_until(T, || matches!(h.get("/"), Ok((200, _)))),
            "{}",
            h.log()
        );
        let before = shut();
        h.signal("TERM");
        assert!(
            h.wait_exit(T).is_some(),
            "{mode}: herd did not stop\n{}",
            h.log()
        );
        assert_eq!(
            shut() - before,
            2,
            "{mode}: lifespan shutdowns run\n{}",
            h.log()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// herd's Node preload at a stop, where clients reach Node themselves: an
/// answer in flight says `Connection: close` and the connection closes
/// after it; behind an answer whose head had already gone out, the
/// pipelined one waiting its turn says it, even once its handler has read
/// its body. (The preload keeps nothing per request: it finds the answers
/// through the sockets.)
#[test]
fn node_answers_in_flight_at_a_stop_close_their_keep_alive_connections() {
    let dir = std::env::temp_dir().join(format!("herd-node-inflight-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = dir.join("app.js");
    std::fs::write(
        &app,
        r#"const http = require('http');
http.createServer((req, res) => {
  if (req.url === '/slow') {
    console.log('slow started');
    setTimeout(() => res.end('slow done'), 1500);
  } else if (req.url === '/stream') {
    res.writeHead(200, { 'Content-Type': 'text/plain' });
    res.write('part ');
    console.log('stream started');
    setTimeout(() => res.end('streamed'), 1500);
  } else if (req.url === '/read') {
    // Node ends (and closes) the request once its body is read, long
    // before the answer.
    let n = 0;
    req.on('data', (d) => { n += d.length; });
    req.on('end', () => {
      setImmediate(() => console.log('slow started'));
      setTimeout(() => res.end(`read ${n}`), 1500);
    });
  } else {
    res.end('quick');
  }
}).listen(3000);
"#,
    )
    .unwrap();
    // (An answer the app has ended is rendered at once, head and all, even
    // while it waits its turn: it is too late to change.)
    for mode in ["shared", "dispatch"] {
        let pipelined = [
            ("/slow", "GET /quick HTTP/1.1\r\nHost: t\r\n\r\n", ""),
            (
                "/stream",
                "GET /slow HTTP/1.1\r\nHost: t\r\n\r\n",
                "slow done",
            ),
            (
                "/stream",
                "POST /read HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody",
                "read 4",
            ),
        ];
        for (path, next, queued) in pipelined {
            let mut h = Herd::start(&["-i", "1", "--mode", mode], &["node", s(&app)]);
            h.wait_ready(1);
            let c = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
            c.set_read_timeout(Some(T)).unwrap();
            let mut c = BufReader::new(c);
            // Kept alive before the stop.
            let (status, body, close) = keepalive_get(&mut c).unwrap();
            assert_eq!((status, body.as_str(), close), (200, "quick", false));
            let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n{next}");
            c.get_mut().write_all(req.as_bytes()).unwrap();
            assert!(h.wait_log("slow started", T), "{}", h.log());
            h.signal("TERM");
            let (status, body, close) = read_answer(&mut c).unwrap();
            if path == "/slow" {
                // Its head was still unsent: it closes the connection, and
                // the pipelined request is not answered.
                assert_eq!(
                    (status, body.as_str(), close),
                    (200, "slow done", true),
                    "{mode}"
                );
            } else {
                // Its head had gone out: the next answer says it.
                assert_eq!(
                    (status, body.as_str(), close),
                    (200, "part streamed", false),
                    "{mode}"
                );
                let (status, body, close) = read_answer(&mut c).unwrap();
                assert_eq!(
                    (status, body.as_str(), close),
                    (200, queued, true),
                    "{mode}"
                );
            }
            let mut rest = Vec::new();
            let n = std::io::Read::read_to_end(&mut c, &mut rest);
            assert_eq!(
                n.ok(),
                Some(0),
                "{mode} {path}: not closed after the last answer: {rest:?}"
            );
            let st = h.wait_exit(T).expect("master did not exit");
            assert_eq!(st.code(), Some(0), "{mode} {path}: {}", h.log());
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// The preload keeps each answer waiting behind a pipelined one until it
/// finishes; one whose connection dies first (Node then emits neither its
/// `finish` nor its `close`) must be let go too, or a server leaks them.
/// Node runs the preload from the source tree, with its set made visible.
#[test]
fn node_preload_lets_go_of_queued_answers_whose_connection_died() {
    let dir = std::env::temp_dir().join(format!("herd-node-queued-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let source = include_str!("../node/preload.js");
    let marker = "const queued = new Map();";
    assert!(
        source.contains(marker),
        "the preload changed: update this test"
    );
    let preload = dir.join("preload.js");
    let shown = source.replace(marker, &format!("{marker} global.__herdQueued = queued;"));
    std::fs::write(&preload, shown).unwrap();
    let app = dir.join("app.js");
    std::fs::write(
        &app,
        r#"const http = require('http'), net = require('net');
let waited = 0;
const srv = http.createServer((req, res) => {
  if (!res.socket) waited++;
  if (req.url === '/slow') setTimeout(() => res.end('slow'), 50); else res.end('quick');
});
srv.listen(3000, () => {
  const port = srv.address().port;
  let n = 0;
  const one = () => {
    const c = net.connect(port, () => {
      c.write('GET /slow HTTP/1.1\r\nHost: t\r\n\r\nGET /next HTTP/1.1\r\nHost: t\r\n\r\n');
      setTimeout(() => c.destroy(), 10);
    });
    c.on('error', () => {});
    c.on('close', () => { if (++n < 40) one(); else settle(Date.now()); });
  };
  const settle = (t0) => {
    const left = global.__herdQueued ? global.__herdQueued.size : -1;
    if (left === 0 || Date.now() - t0 > 5000) {
      console.log(`waited ${waited} left ${left}`);
      process.exit(0);
    }
    setTimeout(settle, 20, t0);
  };
  one();
});
"#,
    )
    .unwrap();
    let out = Command::new("node")
        .args(["-r", s(&preload), s(&app)])
        .env("HERD_MODE", "proxy")
        .env("HERD_WORKER_ID", "0")
        .env("HERD_PORT", free_port().to_string())
        .env_remove("PORT")
        .env_remove("HERD_SOCKET")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let counts: Vec<u32> = text
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert!(
        matches!(counts[..], [waited, 0] if waited > 0),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// PM2's `cron_restart`, as a rolling reload: here every 2 s (six fields,
/// seconds first), with keep-alive clients that see nothing of it.
#[test]
fn cron_restart_reloads_on_schedule_without_a_failed_request() {
    let h = Herd::start(&["-i", "2", "--cron-restart", "*/2 * * * * *"], &[DEMO]);
    h.wait_ready(2);
    assert!(
        h.log()
            .contains("cron-restart */2 * * * * *: first reload at"),
        "{}",
        h.log()
    );
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(h.port, true, stop.clone(), done.clone());
    let before = h.worker_pids(2);
    let reloads = h.log().matches("reload done").count();
    assert!(h.wait_log_n("reload done", reloads + 2, T), "{}", h.log());
    assert!(h.log().contains("cron-restart: rolling reload; next at"));
    no_failures(&stop, clients);
    let after = h.worker_pids(2);
    assert!(
        before.iter().all(|p| !after.contains(p)),
        "{before:?} {after:?}"
    );
    let (code, err) = run_fail(&["run", "--cron-restart", "at 3", "--", DEMO]);
    assert!(code != 0 && err.contains("is not a cron pattern"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

/// A master that does not answer (stopped here with SIGSTOP) gets a
/// one-line error after a while, not a `herd status` that waits forever.
#[test]
fn status_of_a_stuck_master_says_so() {
    let n = name("stuck");
    let mut h = Herd::start(&["--name", &n, "-i", "1"], &[DEMO]);
    h.wait_ready(1);
    signal(h.child.id(), "STOP");
    let (code, err) = run_fail(&["status", "--name", &n]);
    signal(h.child.id(), "CONT");
    assert_ne!(code, 0);
    assert!(
        err.contains(&format!("the master of {n:?} did not answer within 10s")),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    h.signal("TERM");
    assert!(h.wait_exit(T).is_some_and(|st| st.success()));
}

#[test]
fn status_reports_every_worker() {
    let n = name("status");
    let h = Herd::start(&["--name", &n, "-i", "2"], &[DEMO]);
    h.wait_ready(2);
    let pids = h.worker_pids(2);
    let out = herd(&["status", "--name", &n, "--json"]);
    let v: serde_json::Value = serde_json::from_str(&ok(&out)).unwrap();
    let workers = v["workers"].as_array().unwrap();
    assert_eq!(workers.len(), 2);
    for (i, w) in workers.iter().enumerate() {
        for key in [
            "pid",
            "state",
            "uptime",
            "restarts",
            "cpu",
            "memory",
            "connections",
            "requests",
        ] {
            assert!(w.get(key).is_some(), "missing {key} in {w}");
        }
        assert_eq!(w["pid"].as_u64(), Some(pids[i] as u64));
        assert_eq!(w["state"], "ready");
        assert!(w["memory"].as_u64().unwrap() > 0);
        assert!(w["requests"].as_u64().unwrap() >= 1);
    }
    // What runs where, as `pm2 describe` shows it.
    assert_eq!(v["command"], DEMO, "{v}");
    let here = std::env::current_dir().unwrap();
    assert_eq!(v["cwd"].as_str(), here.to_str(), "{v}");
    let table = ok(&herd(&["status", "--name", &n]));
    assert!(
        table.contains("ready") && table.contains(&pids[0].to_string()),
        "{table}"
    );
    assert!(
        table.contains(&format!("command: {DEMO}; cwd: {}; log: ", here.display())),
        "{table}"
    );
    // p50 and p99 over the last minute (proxy mode): slow answers raise the p99.
    for _ in 0..20 {
        h.get("/").unwrap();
    }
    let slow: Vec<_> = (0..2)
        .map(|_| {
            let port = h.port;
            std::thread::spawn(move || http_get(port, "/slow?ms=300"))
        })
        .collect();
    for t in slow {
        t.join().unwrap().unwrap();
    }
    let v: serde_json::Value =
        serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"]))).unwrap();
    let p99: Vec<f64> = v["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            let (p50, p99) = (w["p50_ms"].as_f64().unwrap(), w["p99_ms"].as_f64().unwrap());
            assert!(p50 < 100.0 && p50 <= p99, "{w}");
            p99
        })
        .collect();
    assert!(
        p99.iter().any(|&p| p >= 300.0),
        "a slow answer in some p99: {p99:?}"
    );
    assert!(ok(&herd(&["status", "--name", &n])).contains("p99 ms"));
    // The only cluster of this name is found by `list` too.
    assert!(ok(&herd(&["list"])).contains(&n));
}

#[test]
fn scale_up_and_down_and_signals() {
    let n = name("scale");
    let mut h = Herd::start(&["--name", &n, "-i", "2", "--mode", "reuseport"], &[DEMO]);
    h.wait_ready(2);
    assert!(ok(&herd(&["scale", "--name", &n, "4"])).contains("4 workers"));
    h.worker_pids(4);
    assert!(ok(&herd(&["scale", "--name", &n, "-1"])).contains("3 workers"));
    // One worker reads as one (issue 18, item 12); back to 3 after.
    assert!(ok(&herd(&["scale", "--name", &n, "1"])).ends_with(": 1 worker\n"));
    assert!(ok(&herd(&["scale", "--name", &n, "3"])).contains("3 workers"));
    let count = || {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"]))).unwrap();
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["state"] == "ready")
            .count()
    };
    assert!(wait_until(T, || count() == 3));
    h.signal("TTIN");
    assert!(wait_until(T, || count() == 4), "SIGTTIN adds a worker");
    h.signal("TTOU");
    assert!(wait_until(T, || count() == 3), "SIGTTOU removes one");
    let before: BTreeSet<u32> = h.worker_pids(3).into_iter().collect();
    h.signal("HUP");
    assert!(h.wait_log("reload done", T), "SIGHUP reloads: {}", h.log());
    let after: BTreeSet<u32> = h.worker_pids(3).into_iter().collect();
    assert!(before.is_disjoint(&after));
    assert!(ok(&herd(&["stop", "--name", &n])).contains("stopping"));
    assert_eq!(h.wait_exit(T).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_reload_whose_new_worker_fails_leaves_the_old_ones_serving() {
    let n = name("badreload");
    let mark = std::env::temp_dir().join(format!("herd-fail-{}", std::process::id()));
    let _ = std::fs::remove_file(&mark);
    let script = format!(
        "if [ -e {} ]; then echo broken; exit 3; fi; exec {DEMO}",
        mark.display()
    );
    let h = Herd::start(&["--name", &n, "-i", "2"], &["sh", "-c", &script]);
    h.wait_ready(2);
    let before = h.worker_pids(2);
    std::fs::write(&mark, "").unwrap();
    let out = herd(&["reload", "--name", &n]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload aborted") && err.contains("old workers keep serving"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    for _ in 0..10 {
        let (status, body) = h.get("/").unwrap();
        assert_eq!(status, 200);
        assert!(before.contains(&parse_hello(&body).1));
    }
    std::fs::remove_file(&mark).unwrap();
    // Nothing is left behind: a stop is prompt.
    let mut h = h;
    h.signal("TERM");
    assert!(
        h.wait_exit(Duration::from_secs(3)).is_some(),
        "stop waited for a ghost worker"
    );
}

#[test]
fn a_reload_during_a_reload_is_refused() {
    let n = name("twice");
    let mark = std::env::temp_dir().join(format!("herd-slow-{}", std::process::id()));
    let _ = std::fs::remove_file(&mark);
    let script = format!(
        "if [ -e {} ]; then sleep 1; fi; exec {DEMO}",
        mark.display()
    );
    let h = Herd::start(&["--name", &n, "-i", "2"], &["sh", "-c", &script]);
    h.wait_ready(2);
    std::fs::write(&mark, "").unwrap();
    let first = {
        let n = n.clone();
        std::thread::spawn(move || herd(&["reload", "--name", &n]))
    };
    assert!(h.wait_log("rolling reload of 2 workers", T));
    let second = herd(&["reload", "--name", &n]);
    assert!(!second.status.success());
    assert!(String::from_utf8_lossy(&second.stderr).contains("already running"));
    ok(&first.join().unwrap());
    assert_eq!(h.get("/").unwrap().0, 200);
    std::fs::remove_file(&mark).unwrap();
}

#[test]
fn bad_control_input_gets_a_clear_error() {
    let n = name("badctl");
    let h = Herd::start(&["--name", &n, "-i", "1"], &[DEMO]);
    h.wait_ready(1);
    let err = |args: &[&str]| {
        let out = herd(args);
        assert!(!out.status.success(), "{args:?} succeeded");
        let e = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(e.trim_end().lines().count(), 1, "{args:?}: {e}");
        e
    };
    assert!(err(&["frobnicate"]).contains("unrecognized subcommand"));
    assert!(err(&["status", "--name", "no-such-cluster"]).contains("no herd cluster is running"));
    assert!(err(&["scale", "--name", &n, "0"]).contains("at least 1 worker"));
    assert!(err(&["scale", "--name", &n, "lots"]).contains("not a count"));
    // Raw protocol: malformed JSON, an unknown command, an oversized line.
    let sock = herd::control::socket_path(&n);
    let ask = |line: &[u8]| {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        let _ = s.write_all(line);
        let mut answer = String::new();
        let _ = BufReader::new(s).read_line(&mut answer);
        answer
    };
    assert!(ask(b"{not json\n").contains("\"ok\":false"));
    assert!(ask(b"{\"cmd\":\"explode\"}\n").contains("bad request"));
    let mut big = vec![b'x'; 100_000];
    big.push(b'\n');
    assert!(ask(&big).contains("longer than"));
    // The cluster keeps serving through all of it.
    assert_eq!(h.get("/").unwrap().0, 200);
}

#[test]
fn two_clusters_cannot_share_a_name() {
    let n = name("dup");
    let h = Herd::start(&["--name", &n, "-i", "1"], &[DEMO]);
    h.wait_ready(1);
    let (code, err) = run_fail(&["run", "--name", &n, "--listen", "127.0.0.1:0", "--", DEMO]);
    assert_ne!(code, 0);
    assert!(err.contains("already running"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn a_derived_name_in_use_gets_a_suffix() {
    let base = name("derived");
    // Copy the demo under a unique name so the derived name is this test's own.
    let dir = std::env::temp_dir().join(format!("herd-derived-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join(&base);
    std::fs::copy(DEMO, &prog).unwrap();
    let a = Herd::start(&["-i", "1"], &[prog.to_str().unwrap()]);
    a.wait_ready(1);
    let b = Herd::start(&["-i", "1"], &[prog.to_str().unwrap()]);
    b.wait_ready(1);
    assert!(
        a.log().contains(&format!("{base}: 1 worker")),
        "{}",
        a.log()
    );
    assert!(
        b.log().contains(&format!("{base}-2: 1 worker")),
        "{}",
        b.log()
    );
    assert!(ok(&herd(&["status", "--name", &format!("{base}-2")])).contains("ready"));
    drop((a, b));
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_worker_above_max_memory_is_replaced_gracefully() {
    let h = Herd::start(&["-i", "1", "--max-memory", "48M"], &[DEMO]);
    h.wait_ready(1);
    let before = h.worker_pids(1)[0];
    let (status, body) = h.get("/alloc?mb=80").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(h.wait_log("above --max-memory", T), "{}", h.log());
    assert!(
        wait_until(T, || h.worker_pids(1)[0] != before),
        "not replaced: {}",
        h.log()
    );
    assert_eq!(h.get("/").unwrap().0, 200);
}

/// A worker is its whole process group: behind a wrapper shell, whose own
/// process holds a MB or two, the server it started is what `--max-memory`
/// and `herd status` (memory, connections) count, as systemd counts a
/// unit's cgroup. Before, both looked at the shell alone.
#[test]
fn memory_and_connections_of_a_server_behind_a_wrapper_are_the_workers() {
    let status = |n: &str| -> serde_json::Value {
        serde_json::from_str(&ok(&herd(&["status", "--name", n, "--json"]))).unwrap()
    };
    let wrapped = format!("{DEMO}; exit 0");
    let n = name("wrapped-memory");
    let h = Herd::start(
        &["--name", &n, "-i", "1", "--max-memory", "64M"],
        &["sh", "-c", &wrapped],
    );
    h.wait_ready(1);
    let before = h.worker_pids(1)[0];
    let (code, body) = h.get("/alloc?mb=80").unwrap();
    assert_eq!(code, 200, "{body}");
    let memory = || status(&n)["workers"][0]["memory"].as_u64().unwrap_or(0);
    assert!(
        wait_until(T, || memory() > 80 << 20),
        "status shows {} bytes",
        memory()
    );
    assert!(h.wait_log("above --max-memory", T), "{}", h.log());
    assert!(
        wait_until(T, || h.worker_pids(1)[0] != before),
        "not replaced: {}",
        h.log()
    );

    // Connections, in an fd mode: the Python example behind a shell.
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let app = format!("python3 {examples}/python/app.py; exit 0");
    let n = name("wrapped-conns");
    let h = Herd::start(
        &["--name", &n, "-i", "1", "--mode", "shared"],
        &["sh", "-c", &app],
    );
    h.wait_ready(1);
    let s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut kept = BufReader::new(s);
    assert_eq!(keepalive_get(&mut kept).unwrap().0, 200);
    let conns = || status(&n)["workers"][0]["connections"].as_u64();
    assert_eq!(conns(), Some(1), "one keep-alive connection is open");
    drop(kept);
    assert!(wait_until(T, || conns() == Some(0)));
}

#[test]
fn a_workers_cpu_counter_does_not_step_back_when_a_process_of_it_is_orphaned() {
    // A process of the worker's group whose parent ends goes to herd (the
    // subreaper) and out of the walk from the main process, with the CPU
    // time it used: the counter must keep it (Prometheus reads a drop as a
    // restart).
    let dir = std::env::temp_dir().join(format!("herd-orphan-cpu-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (go, pid_file, script) = (dir.join("go"), dir.join("pid"), dir.join("spin.py"));
    std::fs::write(
        &script,
        r#"import os, sys, time
go, pid_file = sys.argv[1], sys.argv[2]
if os.fork() == 0:
    t = time.process_time()
    while time.process_time() - t < 0.6:
        pass
    with open(pid_file + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(pid_file + ".tmp", pid_file)
    time.sleep(30)
    os._exit(0)
end = time.time() + 30
while not os.path.exists(go) and time.time() < end:
    time.sleep(0.02)
"#,
    )
    .unwrap();
    let cmd = format!(
        "python3 {} {} {} & exec {DEMO}",
        script.display(),
        go.display(),
        pid_file.display()
    );
    let n = name("orphan-cpu");
    let h = Herd::start(&["--name", &n, "-i", "1"], &["sh", "-c", &cmd]);
    h.wait_ready(1);
    let cpu = || {
        let s: serde_json::Value =
            serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"]))).unwrap();
        s["workers"][0]["cpu_seconds"].as_f64().unwrap_or(0.0)
    };
    assert!(wait_until(T, || pid_file.exists()), "{}", h.log());
    let spinner = std::fs::read_to_string(&pid_file).unwrap();
    let before = cpu();
    assert!(before >= 0.5, "the spinner's time is counted: {before}");
    std::fs::write(&go, "").unwrap();
    // Its parent ended: it belongs to herd now.
    let parent = || {
        let stat = std::fs::read_to_string(format!("/proc/{spinner}/stat")).unwrap_or_default();
        let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
        after.split_whitespace().nth(1).unwrap_or("").to_string()
    };
    assert!(
        wait_until(T, || parent() == h.child.id().to_string()),
        "the spinner's parent is {}",
        parent()
    );
    let after = cpu();
    assert!(
        after >= before,
        "the counter stepped back: {before} then {after}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_that_stops_pinging_its_watchdog_is_replaced() {
    let script = r#"
import os, socket, time
print("watchdog", os.environ.get("WATCHDOG_USEC"), flush=True)
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
for _ in range(3):
    s.sendto(b"WATCHDOG=1", os.environ["NOTIFY_SOCKET"])
    time.sleep(0.1)
print("hanging", flush=True)
time.sleep(3600)
"#;
    let h = Herd::start(
        &[
            "-i",
            "1",
            "--mode",
            "shared",
            "--watchdog",
            "500ms",
            "--min-uptime",
            "100ms",
        ],
        &["python3", "-c", script],
    );
    assert!(h.wait_log("[0] watchdog 500000", T), "{}", h.log());
    assert!(h.wait_log("missed its watchdog", T), "{}", h.log());
    assert!(
        h.wait_log_n("[0] hanging", 2, T),
        "not replaced: {}",
        h.log()
    );
}

#[test]
fn start_runs_in_the_background_and_logs_to_a_rotated_file() {
    let n = name("start");
    let state = std::env::temp_dir().join(format!("herd-state-{}", std::process::id()));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // The worker prints ~3 KiB at start, so a 1 KiB limit must rotate.
    let script = format!(
        "i=0; while [ $i -lt 100 ]; do echo \"line $i of start-up noise\"; i=$((i+1)); done; exec {DEMO}"
    );
    let herd_env = |args: &[&str]| {
        herd_cmd()
            .args(args)
            .env("XDG_STATE_HOME", &state)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = herd_env(&[
        "start",
        "--name",
        &n,
        "--listen",
        &listen,
        "-i",
        "2",
        "--log-max-size",
        "1k",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let text = ok(&out);
    assert!(
        text.contains("started") && text.contains("2 workers"),
        "{text}"
    );
    // `herd start` has returned; the cluster serves on.
    assert_eq!(http_get(port, "/").unwrap().0, 200);
    let log = state.join("herd").join(format!("{n}.log"));
    assert!(log.is_file());
    let rotated = state.join("herd").join(format!("{n}.log.1"));
    assert!(rotated.is_file(), "no rotation at 1k");
    let shown = ok(&herd_env(&["logs", "--name", &n, "-n", "5"]));
    assert_eq!(shown.lines().count(), 5, "{shown}");
    // `pm2 logs --json`: one object per line, each naming its app.
    let json = ok(&herd_env(&["logs", "--name", &n, "-n", "5", "--json"]));
    assert_eq!(json.lines().count(), 5, "{json}");
    for line in json.lines() {
        let v: serde_json::Value = serde_json::from_str(line).unwrap();
        assert!(
            v["app_name"] == n.as_str() && v["message"].is_string(),
            "{line}"
        );
    }
    // `herd stop` returns once the master is gone (issue 18, item 2), so
    // the same name and port start again at once, as with `pm2 stop`.
    let start_again = [
        "start", "--name", &n, "--listen", &listen, "-i", "1", "--", DEMO,
    ];
    for _ in 0..2 {
        let stopped = ok(&herd_env(&["stop", "--name", &n]));
        assert!(
            stopped.contains("stopping") && stopped.contains("stopped"),
            "{stopped}"
        );
        assert!(TcpStream::connect(("127.0.0.1", port)).is_err());
        let text = ok(&herd_env(&start_again));
        assert!(text.contains("started"), "{text}");
    }
    assert!(ok(&herd_env(&["stop", "--name", &n])).contains("stopped"));
    // With no cluster running, `herd logs` shows the one log there is
    // (issue 18, item 8). A runtime dir of its own: no other test's cluster.
    let runtime = state.join("run");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let out = herd_cmd()
        .args(["logs", "-n", "3"])
        .env("XDG_STATE_HOME", &state)
        .env("XDG_RUNTIME_DIR", &runtime)
        .env("TMPDIR", &runtime)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let shown = ok(&out);
    assert_eq!(shown.lines().count(), 3, "{shown}");
    assert!(shown.contains("stopped"), "{shown}");
    let _ = std::fs::remove_dir_all(&state);
}

#[test]
fn workers_exchange_messages_in_python_and_node() {
    let examples = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let py = examples.join("python/ipc.py");
    let js = examples.join("node/ipc.js");
    for (lang, cmd) in [
        ("python", ["python3", py.to_str().unwrap()]),
        ("node", ["node", js.to_str().unwrap()]),
    ] {
        let n = name(&format!("ipc-{lang}"));
        let mut h = Herd::start(&["--name", &n, "-i", "2", "--mode", "shared"], &cmd);
        h.wait_ready(2);
        assert!(h.wait_log("[1] ready", T));
        // CLI → one worker.
        assert!(
            ok(&herd(&["send", "--name", &n, "0", r#"{"hello":1}"#]))
                .contains("delivered to worker 0")
        );
        let got = |slot: usize, needle: &str| {
            let prefix = format!("[{slot}] got");
            wait_until(T, || {
                h.log()
                    .lines()
                    .any(|l| l.starts_with(&prefix) && l.contains(needle))
            })
        };
        assert!(got(0, "hello") && got(0, "cli"), "{lang}: {}", h.log());
        // CLI → everyone.
        assert!(
            ok(&herd(&["broadcast", "--name", &n, "all-hands"])).contains("delivered to 2 workers")
        );
        assert!(
            got(0, "all-hands") && got(1, "all-hands"),
            "{lang}: {}",
            h.log()
        );
        // Worker → worker, and a worker's broadcast (the config-update pattern).
        ok(&herd(&[
            "send",
            "--name",
            &n,
            "0",
            r#"{"do":"send","to":1,"data":"psst"}"#,
        ]));
        assert!(got(1, "psst"), "{lang}: {}", h.log());
        ok(&herd(&[
            "send",
            "--name",
            &n,
            "1",
            r#"{"do":"broadcast","data":"config-v2"}"#,
        ]));
        assert!(got(0, "config-v2"), "{lang}: {}", h.log());
        // A message to a worker that is not there comes back to its sender.
        ok(&herd(&[
            "send",
            "--name",
            &n,
            "0",
            r#"{"do":"send","to":9,"data":"lost"}"#,
        ]));
        assert!(got(0, "worker 9 is not running"), "{lang}: {}", h.log());
        let out = herd(&["send", "--name", &n, "7", "hi"]);
        assert!(!out.status.success());
        assert!(String::from_utf8_lossy(&out.stderr).contains("worker 7 is not running"));
        // A stop is announced on the channel before SIGTERM.
        h.signal("TERM");
        assert!(
            got(0, "shutdown") && got(1, "shutdown"),
            "{lang}: {}",
            h.log()
        );
        assert_eq!(h.wait_exit(T).and_then(|s| s.code()), Some(0));
    }
}

#[test]
fn the_demo_hears_messages_through_the_rust_sdk() {
    let n = name("ipc-rust");
    let h = Herd::start(&["--name", &n, "-i", "1"], &[DEMO]);
    h.wait_ready(1);
    ok(&herd(&[
        "send",
        "--name",
        &n,
        "0",
        r#"{"reload-config":true}"#,
    ]));
    assert!(
        h.wait_log(r#"[0] message from "cli": {"reload-config":true}"#, T),
        "{}",
        h.log()
    );
}

#[test]
fn restart_replaces_every_worker_at_once() {
    let n = name("restart");
    let h = Herd::start(&["--name", &n, "-i", "2"], &[DEMO]);
    h.wait_ready(2);
    let before: BTreeSet<u32> = h.worker_pids(2).into_iter().collect();
    assert!(ok(&herd(&["restart", "--name", &n])).contains("restarted 2 workers"));
    assert!(wait_until(T, || {
        let now: BTreeSet<u32> = h.worker_pids(2).into_iter().collect();
        before.is_disjoint(&now)
    }));
    let v: serde_json::Value =
        serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"]))).unwrap();
    assert!(
        v["workers"]
            .as_array()
            .unwrap()
            .iter()
            .all(|w| w["restarts"] == 1),
        "{v}"
    );
    // A name no cluster has: the error names the ones that run.
    let out = herd(&["restart", "no-such-cluster"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("(running: ") && err.contains(&n),
        "{err}"
    );
    // `pm2 restart app --update-env`: the caller's environment reaches the
    // new workers; without the flag they keep the one they were started in.
    let tag = |h: &Herd| {
        let (_, body) = h.get("/env").unwrap_or_default();
        body.lines()
            .find_map(|l| l.strip_prefix("HERD_DEMO_TAG="))
            .map(str::to_string)
    };
    assert_eq!(tag(&h).as_deref(), Some(""));
    let with_tag = |args: &[&str]| {
        let out = herd_cmd()
            .args(args)
            .env("HERD_DEMO_TAG", "updated")
            .stdin(Stdio::null())
            .output()
            .unwrap();
        ok(&out)
    };
    assert!(with_tag(&["restart", "--name", &n]).contains("restarted 2 workers"));
    assert_eq!(tag(&h).as_deref(), Some(""));
    assert!(with_tag(&["restart", "--name", &n, "--update-env"]).contains("restarted 2 workers"));
    // Both workers: two answers in a row from the new environment.
    assert!(wait_until(T, || {
        tag(&h).as_deref() == Some("updated") && tag(&h).as_deref() == Some("updated")
    }));
}

#[test]
fn killing_workers_under_load_fails_no_request_in_proxy_mode() {
    let n = name("chaos");
    let h = Herd::start(&["--name", &n, "-i", "3"], &[DEMO]);
    h.wait_ready(3);
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(h.port, true, stop.clone(), done.clone());
    for round in 1..=3 {
        let at = done.load(Ordering::Relaxed);
        assert!(wait_until(T, || done.load(Ordering::Relaxed) >= at + 100));
        let victim = h.worker_pids(3)[round % 3];
        signal(victim, "KILL");
        // Wait until its replacement serves before the next round.
        assert!(wait_until(T, || !h.worker_pids(3).contains(&victim)));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        let (_, bad) = c.join().unwrap();
        assert!(
            bad.is_empty(),
            "failed requests while workers were killed: {bad:?}"
        );
    }
}

#[test]
fn status_counts_open_connections_in_fd_modes() {
    let n = name("conns");
    let h = Herd::start(&["--name", &n, "-i", "1", "--mode", "shared"], &[DEMO]);
    h.wait_ready(1);
    let conns = || {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"]))).unwrap();
        v["workers"][0]["connections"].as_u64()
    };
    assert_eq!(conns(), Some(0));
    let s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut kept = BufReader::new(s);
    assert_eq!(keepalive_get(&mut kept).unwrap().0, 200);
    assert_eq!(conns(), Some(1), "one keep-alive connection is open");
    drop(kept);
    assert!(wait_until(T, || conns() == Some(0)));
}

/// `conns` counts the connections clients opened to the worker, not the
/// worker's own (a database, a queue): a fork-mode program that holds one
/// outgoing connection and serves a port of its own.
#[test]
fn status_counts_only_client_connections() {
    const PROGRAM: &str = r#"
import os, socket
db = socket.create_connection(('127.0.0.1', int(os.environ['DB_PORT'])))
s = socket.socket()
s.bind(('127.0.0.1', int(os.environ['OWN_PORT'])))
s.listen()
held = []
while True:
    held.append(s.accept()[0])
"#;
    let db = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let db_port = db.local_addr().unwrap().port().to_string();
    let own = free_port();
    let n = name("clientconns");
    let h = Herd::spawn(
        herd_cmd()
            .env("DB_PORT", &db_port)
            .env("OWN_PORT", own.to_string())
            .args(["run", "--mode", "fork", "--name", &n, "--"])
            .args(["python3", "-c", PROGRAM]),
        0,
    );
    db.set_nonblocking(true).unwrap();
    let mut db_side = None;
    assert!(
        wait_until(T, || {
            db_side = db_side.take().or_else(|| db.accept().ok());
            db_side.is_some()
        }),
        "{}",
        h.log()
    );
    h.wait_ready(1);
    let conns = || {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"]))).unwrap();
        v["workers"][0]["connections"].as_u64()
    };
    assert_eq!(
        conns(),
        Some(0),
        "its outgoing connection is not a client's"
    );
    let _client = TcpStream::connect(("127.0.0.1", own)).unwrap();
    assert!(wait_until(T, || conns() == Some(1)), "{:?}", conns());
}

#[test]
fn masters_starting_at_once_under_one_name_all_get_a_name() {
    let base = name("race");
    let dir = std::env::temp_dir().join(format!("herd-race-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let prog = dir.join(&base);
    std::fs::copy(DEMO, &prog).unwrap();
    let prog = prog.to_str().unwrap().to_string();
    let herds: Vec<Herd> = (0..4)
        .map(|_| Herd::start(&["-i", "1"], &[&prog]))
        .collect();
    let mut names = BTreeSet::new();
    for h in &herds {
        h.wait_ready(1);
        let log = h.log();
        let line = log.lines().find(|l| l.contains(": 1 worker,")).unwrap();
        let name = line.split_whitespace().find(|w| w.ends_with(':')).unwrap();
        names.insert(name.trim_end_matches(':').to_string());
    }
    assert_eq!(names.len(), 4, "{names:?}");
    drop(herds);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn start_on_a_port_in_use_shows_only_its_own_log_lines() {
    // Issue 18, item 5: the failure showed the end of an older run first.
    let n = name("inuse");
    let state = std::env::temp_dir().join(format!("herd-state-inuse-{}", std::process::id()));
    let dir = state.join("herd");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join(format!("{n}.log")),
        "an older run said this\n".repeat(20),
    )
    .unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let out = herd_cmd()
        .args(["start", "--name", &n, "--listen", &addr, "--", DEMO])
        .env("XDG_STATE_HOME", &state)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains(&format!("in use by pid {} (", std::process::id())),
        "who holds the port: {err}"
    );
    assert!(!err.contains("older run"), "{err}");
    let _ = std::fs::remove_dir_all(&state);
}

/// `herd start other.js` on the port a running cluster has (both on the
/// default port): the line names that cluster and the way out.
#[test]
fn a_port_another_cluster_holds_names_that_cluster() {
    let n = name("holder");
    let h = Herd::start(&["--name", &n, "-i", "1"], &[DEMO]);
    h.wait_ready(1);
    let listen = format!("127.0.0.1:{}", h.port);
    let out = herd_cmd()
        .args(["run", "--listen", &listen, "-i", "1", "--", DEMO])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success()
            && err.contains(&format!(
                "in use by herd cluster \"{n}\"; give this one a port of its own with --listen"
            )),
        "{err}"
    );
    assert_eq!(h.get("/").map(|r| r.0).ok(), Some(200));
}

/// `herd logs --name N -f -n 0`, and the numbers of its `seq K` lines as
/// they come.
fn follow_seqs(
    n: &str,
    env: &dyn Fn(&mut Command),
) -> (std::process::Child, std::sync::mpsc::Receiver<u32>) {
    let mut follow = herd_cmd();
    follow
        .args(["logs", "--name", n, "-f", "-n", "0"])
        .stdout(Stdio::piped());
    env(&mut follow);
    let mut child = follow.spawn().unwrap();
    let out = BufReader::new(child.stdout.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in out.lines().map_while(Result::ok) {
            if let Some(k) = line
                .split("seq ")
                .nth(1)
                .and_then(|k| k.trim().parse::<u32>().ok())
            {
                let _ = tx.send(k);
            }
        }
    });
    (child, rx)
}

/// Ends the follower, stops cluster `n` and removes its state directory.
fn end_follow(
    mut follower: std::process::Child,
    n: &str,
    env: &dyn Fn(&mut Command),
    state: &std::path::Path,
) {
    let _ = follower.kill();
    let _ = follower.wait();
    let mut stop = herd_cmd();
    stop.args(["stop", "--name", n]);
    env(&mut stop);
    let _ = stop.output();
    let _ = std::fs::remove_dir_all(state);
}

/// `herd flush` empties the log in place; a follower goes on from its
/// beginning (as `tail -F`), where it waited past the old end before.
#[test]
fn logs_follow_goes_on_after_a_flush() {
    let n = name("flushfollow");
    let state = std::env::temp_dir().join(format!("herd-state-flush-{}", std::process::id()));
    // 600 lines at once, so the follower starts far into the file, then
    // one every 5 ms.
    let script = format!(
        "(i=0; while [ $i -lt 3000 ]; do echo \"seq $i\"; i=$((i+1)); [ $i -gt 600 ] && sleep 0.005; done) & exec {DEMO}"
    );
    let env = |c: &mut Command| {
        c.env("XDG_STATE_HOME", &state).stdin(Stdio::null());
    };
    let listen = format!("127.0.0.1:{}", free_port());
    let mut start = herd_cmd();
    start.args([
        "start", "--name", &n, "--listen", &listen, "-i", "1", "--", "sh", "-c", &script,
    ]);
    env(&mut start);
    ok(&start.output().unwrap());
    let (child, rx) = follow_seqs(&n, &env);
    let first = rx.recv_timeout(T).expect("no line followed");
    let mut flush = herd_cmd();
    flush.args(["flush", &n]);
    env(&mut flush);
    ok(&flush.output().unwrap());
    let mut seen = vec![first];
    let deadline = std::time::Instant::now() + T;
    while seen.last() < Some(&(first + 300)) && std::time::Instant::now() < deadline {
        if let Ok(k) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(k);
        }
    }
    end_follow(child, &n, &env, &state);
    assert!(first > 600, "the follower started at seq {first}");
    let last = seen.last().copied().unwrap_or(first);
    assert!(last >= first + 300, "the follower stopped at seq {last}");
    // Lines written between the follower's last read and the flush are
    // gone with it (a 100 ms poll: some 20); none after it may be.
    let gap = seen.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
    assert!(gap < 60, "{gap} lines skipped after the flush: {seen:?}");
}

#[test]
fn logs_follow_loses_no_line_at_a_rotation() {
    // Issue 18, item 4: `herd logs -f` skipped the lines written between
    // its last read and each rotation.
    let n = name("follow");
    let state = std::env::temp_dir().join(format!("herd-state-follow-{}", std::process::id()));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // A background loop in the worker prints numbered lines for a while;
    // with a 1 KiB limit the log rotates every ~80 lines.
    let script = format!(
        "(i=0; while [ $i -lt 1500 ]; do echo \"seq $i\"; i=$((i+1)); sleep 0.002; done) & exec {DEMO}"
    );
    let env = |c: &mut Command| {
        c.env("XDG_STATE_HOME", &state).stdin(Stdio::null());
    };
    let mut start = herd_cmd();
    start.args([
        "start",
        "--name",
        &n,
        "--listen",
        &listen,
        "-i",
        "1",
        "--log-max-size",
        "1k",
        "--log-keep",
        "50",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    env(&mut start);
    ok(&start.output().unwrap());
    let (child, rx) = follow_seqs(&n, &env);
    let mut seen = Vec::new();
    let deadline = std::time::Instant::now() + T;
    while seen.last() != Some(&1499) && std::time::Instant::now() < deadline {
        if let Ok(k) = rx.recv_timeout(Duration::from_millis(200)) {
            seen.push(k);
        }
    }
    end_follow(child, &n, &env, &state);
    assert_eq!(seen.last(), Some(&1499), "the follower never saw the end");
    let first = seen[0];
    let expected: Vec<u32> = (first..=1499).collect();
    assert!(
        seen == expected,
        "lines missing or out of order after seq {first}: {} seen of {}",
        seen.len(),
        expected.len()
    );
    assert!(1499 - first > 300, "followed too little to cross rotations");
}

#[test]
fn a_node_app_uses_process_send_and_message_in_every_mode() {
    // Issue 18, item 6: process.send was dropped in dispatch mode, and
    // process.on('message') never fired in any mode.
    let app = r#"
        const http = require('http');
        let last = 'none';
        process.on('message', (m) => { last = JSON.stringify(m); });
        http.createServer((req, res) => {
          if (req.url === '/tell') process.send({ note: 'from the app' });
          res.end(last);
        }).listen(3000);
    "#;
    for mode in ["dispatch", "proxy", "shared"] {
        let n = name(&format!("nodemsg-{mode}"));
        let h = Herd::start(
            &["--name", &n, "-i", "1", "--mode", mode],
            &["node", "-e", app],
        );
        h.wait_ready(1);
        ok(&herd(&["send", "--name", &n, "0", r#"{"x":1}"#]));
        let mut body = String::new();
        assert!(
            wait_until(T, || {
                body = h.get("/").map(|r| r.1).unwrap_or_default();
                body.contains(r#"{"x":1}"#)
            }),
            "{mode}: the message never arrived: {body:?}\n{}",
            h.log()
        );
        let _ = h.get("/tell");
        assert!(
            h.wait_log(r#"worker 0 says: {"note":"from the app"}"#, T),
            "{mode}: process.send was lost:\n{}",
            h.log()
        );
    }
}

#[test]
fn a_node_process_send_broadcast_reaches_the_other_workers_in_every_mode() {
    // The seed's config-update pattern, unmodified Node.
    let app = r#"
        const id = process.env.HERD_WORKER_ID;
        let heard = 'nothing';
        process.on('message', (m, _h, from) => { heard = `${JSON.stringify(m)} from ${from}`; });
        require('http').createServer((req, res) => {
          if (req.url === '/tell') process.send({ type: 'broadcast', data: { config: 'v2' } });
          res.end(`worker ${id} heard ${heard}`);
        }).listen(3000);
    "#;
    for mode in ["proxy", "shared", "dispatch"] {
        let n = name(&format!("nodebcast-{mode}"));
        let h = Herd::start(
            &["--name", &n, "-i", "2", "--mode", mode],
            &["node", "-e", app],
        );
        h.wait_ready(2);
        let (_, body) = h.get("/tell").unwrap();
        let teller: usize = body["worker ".len()..]
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let other = format!(
            "worker {} heard {{\"config\":\"v2\"}} from {teller}",
            1 - teller
        );
        let mut last = String::new();
        assert!(
            wait_until(T, || {
                last = h.get("/").map(|r| r.1).unwrap_or_default();
                last == other
            }),
            "{mode}: {last:?}, wanted {other:?}\n{}",
            h.log()
        );
    }
}

#[test]
fn process_send_ready_counts_as_ready_as_under_pm2_wait_ready() {
    // With --wait-ready the preload's own `listening` does not count: only
    // the app's word does, here PM2's idiom, in every mode.
    let app = r#"
        require('http').createServer((req, res) => res.end('up'))
          .listen(3000, () => setTimeout(() => process.send('ready'), 200));
    "#;
    for mode in ["proxy", "shared", "dispatch"] {
        let n = name(&format!("pm2ready-{mode}"));
        let h = Herd::start(
            &[
                "--name",
                &n,
                "-i",
                "1",
                "--mode",
                mode,
                "--wait-ready",
                "--ready-timeout",
                "20s",
            ],
            &["node", "-e", app],
        );
        assert!(h.wait_log("worker 0 ready", T), "{mode}:\n{}", h.log());
        assert_eq!(h.get("/").map(|r| r.1).unwrap_or_default(), "up", "{mode}");
    }
}

#[test]
fn a_worker_that_asks_to_be_replaced_hands_over_without_a_failed_request() {
    // The Node idiom: process.send({type: 'replace'}), here on GET /replace.
    let app = r#"
        const id = process.env.HERD_WORKER_ID;
        require('http').createServer((req, res) => {
          if (req.url === '/replace' && id === '1') process.send({ type: 'replace' });
          res.end(`hello from worker ${id} (pid ${process.pid})
`);
        }).listen(3000);
    "#;
    for mode in ["proxy", "shared"] {
        let n = name(&format!("replace-{mode}"));
        let h = Herd::start(
            &["--name", &n, "-i", "2", "--mode", mode],
            &["node", "-e", app],
        );
        h.wait_ready(2);
        let before = h.worker_pids(2);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let clients = load(h.port, true, stop.clone(), done.clone());
        assert!(wait_until(T, || done.load(Ordering::Relaxed) >= 40));
        assert!(
            wait_until(T, || {
                let _ = h.get("/replace");
                h.log().contains("worker 1 (pid") && h.log().contains("asked to be replaced")
            }),
            "{mode}: {}",
            h.log()
        );
        assert!(
            h.wait_log("reload done: 1 worker replaced", T),
            "{mode}: {}",
            h.log()
        );
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let (_, bad) = c.join().unwrap();
            assert!(bad.is_empty(), "{mode}: {bad:?}");
        }
        assert!(!alive(before[1]), "{mode}: the asking worker is gone");
        let after = h.worker_pids(2);
        assert_eq!(after[0], before[0], "{mode}: worker 0 untouched");
        assert_ne!(after[1], before[1]);
    }
}

#[test]
fn watch_reloads_on_a_change_and_not_on_an_ignored_one() {
    let dir = std::env::temp_dir().join(format!("herd-watch-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("node_modules/dep")).unwrap();
    std::fs::create_dir_all(dir.join("tmp")).unwrap();
    let app =
        |v: &str| format!("require('http').createServer((q, r) => r.end('{v}')).listen(3000);\n");
    std::fs::write(dir.join("server.js"), app("v1")).unwrap();
    let n = name("watch");
    let dir_s = dir.to_str().unwrap();
    let h = Herd::start(
        &[
            "--name",
            &n,
            "-i",
            "2",
            "--cwd",
            dir_s,
            "--watch",
            "--watch-ignore",
            "tmp",
            "--watch-delay",
            "300ms",
        ],
        &["node", "server.js"],
    );
    h.wait_ready(2);
    assert!(h.wait_log("for changes", T), "{}", h.log());
    assert_eq!(h.get("/").unwrap().1, "v1");
    // Ignored writes first: were they seen, the reload would name them.
    std::fs::write(dir.join("node_modules/dep/index.js"), "x").unwrap();
    std::fs::write(dir.join("tmp/scratch"), "x").unwrap();
    std::fs::write(dir.join("app.log"), "x").unwrap();
    std::fs::write(dir.join("server.js"), app("v2")).unwrap();
    assert!(h.wait_log("reload done", T), "{}", h.log());
    let log = h.log();
    assert!(log.contains("server.js changed: rolling reload"), "{log}");
    assert_eq!(
        log.matches("rolling reload of").count(),
        1,
        "one reload: {log}"
    );
    assert!(wait_until(T, || h.get("/").is_ok_and(|r| r.1 == "v2")));
    // A directory created after the start is a change, and is watched too.
    std::fs::create_dir_all(dir.join("src/new")).unwrap();
    assert!(h.wait_log_n("reload done", 2, T), "{}", h.log());
    std::fs::write(dir.join("src/new/lib.js"), "x").unwrap();
    assert!(
        h.wait_log("lib.js changed: rolling reload", T),
        "{}",
        h.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn herd_signal_reaches_one_worker_or_all() {
    let app = r#"
        process.on('SIGUSR2', () => console.log('got SIGUSR2'));
        require('http').createServer((req, res) => res.end('up')).listen(3000);
    "#;
    let n = name("signal");
    let h = Herd::start(&["--name", &n, "-i", "2"], &["node", "-e", app]);
    h.wait_ready(2);
    let out = ok(&herd(&["signal", "--name", &n, "SIGUSR2", "1"]));
    assert!(out.contains("SIGUSR2 sent to 1 worker"), "{out}");
    assert!(h.wait_log("[1] got SIGUSR2", T), "{}", h.log());
    assert!(!h.log().contains("[0] got SIGUSR2"), "only worker 1");
    let out = ok(&herd(&["signal", "--name", &n, "usr2"]));
    assert!(out.contains("SIGUSR2 sent to 2 workers"), "{out}");
    assert!(h.wait_log("[0] got SIGUSR2", T), "{}", h.log());
    // As `pm2 sendSignal SIGUSR2 api` is typed: the name where the id goes.
    let out = ok(&herd(&["signal", "SIGUSR2", &n]));
    assert!(out.contains("SIGUSR2 sent to 2 workers"), "{out}");
    assert!(h.wait_log_n("[0] got SIGUSR2", 2, T), "{}", h.log());
    for (args, why) in [
        (vec!["signal", "--name", &n, "SIGNOPE"], "not a signal"),
        (
            vec!["signal", "--name", &n, "USR2", "7"],
            "there is no worker 7",
        ),
        (vec!["signal", "--name", &n, "USR2", "x"], "not a worker id"),
    ] {
        let out = herd(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            !out.status.success() && err.contains(why),
            "{args:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "one line: {err}");
    }
    assert_eq!(
        h.get("/").map(|r| r.1).unwrap_or_default(),
        "up",
        "both still serve"
    );
}

#[test]
fn clusters_are_named_as_pm2_users_type_them_and_all_means_every_one() {
    // Issue 18's PM2 habits: `herd stop api`, `herd reload all`,
    // `herd list --json`. Runtime and state dirs of its own: `all` means
    // only these, and `herd list` shows no cluster other tests stopped.
    let runtime = std::env::temp_dir().join(format!("herd-run-all-{}", std::process::id()));
    let state = runtime.join("state");
    std::fs::create_dir_all(&runtime).unwrap();
    std::fs::set_permissions(
        &runtime,
        std::os::unix::fs::PermissionsExt::from_mode(0o700),
    )
    .unwrap();
    let cli = |args: &[&str]| {
        herd_cmd()
            .args(args)
            .env("XDG_RUNTIME_DIR", &runtime)
            .env("TMPDIR", &runtime)
            .env("XDG_STATE_HOME", &state)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    assert_eq!(ok(&cli(&["status", "--json"])).trim(), "[]");
    let mut clusters: Vec<Herd> = ["alpha", "beta"]
        .iter()
        .map(|n| {
            let port = free_port();
            let listen = format!("127.0.0.1:{port}");
            let h = Herd::spawn(
                herd_cmd()
                    .args([
                        "run", "--name", n, "--listen", &listen, "-i", "1", "--", DEMO,
                    ])
                    .env("XDG_RUNTIME_DIR", &runtime)
                    .env("TMPDIR", &runtime)
                    .env("XDG_STATE_HOME", &state),
                port,
            );
            h.wait_ready(1);
            h
        })
        .collect();
    assert!(ok(&cli(&["status", "alpha"])).starts_with("alpha: proxy mode"));
    let list: serde_json::Value = serde_json::from_str(&ok(&cli(&["list", "--json"]))).unwrap();
    let names: BTreeSet<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, BTreeSet::from(["alpha", "beta"]));
    let reloaded = ok(&cli(&["reload", "all"]));
    assert!(
        reloaded.contains("alpha: reloaded 1 worker")
            && reloaded.contains("beta: reloaded 1 worker"),
        "{reloaded}"
    );
    let stopped = ok(&cli(&["stop", "all"]));
    assert!(
        stopped.contains("alpha: stopped") && stopped.contains("beta: stopped"),
        "{stopped}"
    );
    for h in &mut clusters {
        assert_eq!(h.wait_exit(T).and_then(|s| s.code()), Some(0));
    }
    let _ = std::fs::remove_dir_all(&runtime);
}

/// Runs tmux on a socket of this test's own.
fn tmux(sock: &str, args: &[&str]) -> std::process::Output {
    Command::new("tmux")
        .arg("-L")
        .arg(sock)
        .args(args)
        .output()
        .expect("tmux")
}

#[test]
fn herd_monit_shows_the_workers_and_scales_and_quits_from_its_keys() {
    let n = name("monit");
    let h = Herd::start(&["--name", &n, "-i", "2"], &[DEMO]);
    h.wait_ready(2);
    let pids = h.worker_pids(2);
    let sock = format!("herd-monit-{}", std::process::id());
    let mut cmd = format!("exec env TERM=xterm-256color {HERD} monit {n}");
    if let Some(x) = std::env::var_os("XDG_RUNTIME_DIR") {
        cmd = format!(
            "exec env XDG_RUNTIME_DIR={} TERM=xterm-256color {HERD} monit {n}",
            x.to_string_lossy()
        );
    }
    let out = tmux(
        &sock,
        &[
            "new-session",
            "-d",
            "-s",
            "m",
            "-x",
            "140",
            "-y",
            "40",
            &cmd,
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let screen = || {
        String::from_utf8_lossy(&tmux(&sock, &["capture-pane", "-p", "-t", "m"]).stdout)
            .into_owned()
    };
    let mut seen = String::new();
    assert!(
        wait_until(T, || {
            seen = screen();
            seen.contains(&pids[0].to_string()) && seen.contains(&pids[1].to_string())
        }),
        "{seen}"
    );
    assert!(
        seen.contains(&format!("{n}: proxy mode")) && seen.contains("req/s"),
        "{seen}"
    );
    // `+` scales up: a third worker row appears.
    tmux(&sock, &["send-keys", "-t", "m", "+"]);
    assert!(h.wait_log("worker 2 ready", T), "{}", h.log());
    assert!(
        wait_until(T, || {
            seen = screen();
            seen.lines().any(|l| l.trim_start().starts_with("2 "))
        }),
        "{seen}"
    );
    // ↓ then `R` replaces worker 1 (its successor first); `r` reloads all.
    tmux(&sock, &["send-keys", "-t", "m", "Down", "R"]);
    assert!(
        h.wait_log("reload done: 1 worker replaced", T),
        "{}",
        h.log()
    );
    assert!(h.log().contains("worker 1: pid"), "{}", h.log());
    tmux(&sock, &["send-keys", "-t", "m", "r"]);
    assert!(
        h.wait_log("reload done: 3 workers replaced", T),
        "{}",
        h.log()
    );
    // `q` quits and gives the terminal back.
    tmux(&sock, &["send-keys", "-t", "m", "q"]);
    assert!(
        wait_until(T, || !tmux(&sock, &["has-session", "-t", "m"])
            .status
            .success()),
        "monit did not quit: {}",
        screen()
    );
    let _ = tmux(&sock, &["kill-server"]);
}

/// Reuseport mode: the kernel spreads new connections over every slot's
/// socket, whether a worker accepts on it or not, so a slot whose worker is
/// down for good (`--autorestart=false`) had its share wait until the
/// client gave up. herd steers them to the serving workers' sockets, and
/// back once the slot serves again.
/// A server that `shutdown()`s its listening socket (fd 3) on SIGTERM and
/// exits, or with `LINGER` set, says how long the socket took to listen
/// again (`SO_ACCEPTCONN`) and lingers that many seconds more.
const SHUTTING_WORKER: &str = r#"
import os, signal, socket, time
s = socket.socket(fileno=3)
wid = os.environ["HERD_WORKER_ID"]
def stop(*_):
    s.shutdown(socket.SHUT_RDWR)
    linger = os.environ.get("LINGER")
    if linger:
        t0 = time.monotonic()
        while not s.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) and time.monotonic() - t0 < 5:
            time.sleep(0.002)
        print(f"dead for {(time.monotonic() - t0) * 1000:.0f} ms", flush=True)
        time.sleep(float(linger))
    os._exit(0)
signal.signal(signal.SIGTERM, stop)
while True:
    try:
        c, _ = s.accept()
    except OSError:
        time.sleep(0.01)
        continue
    c.recv(65536)
    body = f"worker {wid} pid {os.getpid()}\n".encode()
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    c.close()
"#;

/// A worker that `shutdown()`s its listening socket as it stops, as C
/// servers do to wake threads blocked in `accept`: that ends listening for
/// every process holding the socket, so a rolling reload left the whole
/// port (shared mode) or every slot's socket (reuseport) dead for good.
/// herd listens on it again; in reuseport mode that reorders the kernel's
/// group, which the steering must follow.
#[test]
fn a_worker_that_shuts_its_listening_socket_down_does_not_end_the_port() {
    for mode in ["shared", "reuseport"] {
        let n = name(&format!("shutl-{mode}"));
        let h = Herd::start(
            &[
                "--name",
                &n,
                "-i",
                "3",
                "--mode",
                mode,
                "--autorestart=false",
            ],
            &["python3", "-c", SHUTTING_WORKER],
        );
        h.wait_ready(3);
        let text = ok(&herd(&["reload", "--name", &n]));
        assert!(text.contains("reloaded 3 workers"), "{mode}: {text}");
        assert!(
            h.wait_log("herd listens on it again", T),
            "{mode}: {}",
            h.log()
        );
        assert!(
            wait_until(T, || each_answers(h.port, 3)),
            "{mode}: {:?}\n{}",
            worker_ids(h.port, 30),
            h.log()
        );
        if mode != "reuseport" {
            continue;
        }
        // A new master takes the sockets in the group's order (its old
        // workers shut them down once more as they stop).
        ok(&herd(&["upgrade", "--name", &n]));
        assert!(wait_until(T, || each_answers(h.port, 3)), "{}", h.log());
        // Wherever the kernel's group now has the sockets.
        only_serving_slots_get_connections(&h);
    }
}

/// As above, from a worker that goes on draining for a while after its
/// `shutdown()`: herd looks at the socket often while a worker stops, so
/// the port is dead for milliseconds, not up to its once-a-second tick.
#[test]
fn a_socket_shut_down_by_a_stopping_worker_listens_again_within_milliseconds() {
    let n = name("shutfast");
    let h = Herd::start(
        &[
            "--name",
            &n,
            "-i",
            "3",
            "--mode",
            "shared",
            "--env",
            "LINGER=1.5",
        ],
        &["python3", "-c", SHUTTING_WORKER],
    );
    h.wait_ready(3);
    let text = ok(&herd(&["reload", "--name", &n]));
    assert!(text.contains("reloaded 3 workers"), "{text}");
    assert!(h.wait_log_n("dead for", 3, T), "{}", h.log());
    let dead: Vec<u64> = h
        .log()
        .lines()
        .filter_map(|l| {
            l.split("dead for ")
                .nth(1)?
                .strip_suffix(" ms")?
                .parse()
                .ok()
        })
        .collect();
    assert!(
        dead.len() == 3 && dead.iter().all(|&ms| ms < 400),
        "ms each socket was dead: {dead:?}\n{}",
        h.log()
    );
}

/// The worker ids that answered `count` GETs, each on a connection of its
/// own, or usize::MAX for one that got no answer within 2 s.
fn worker_ids(port: u16, count: usize) -> Vec<usize> {
    (0..count)
        .map(|_| {
            get_within(port, Duration::from_secs(2)).map_or(usize::MAX, |body| parse_hello(&body).0)
        })
        .collect()
}

/// Each of workers `0..n` answered one of 30 new connections, and every
/// connection got an answer.
fn each_answers(port: u16, n: usize) -> bool {
    let got = worker_ids(port, 30);
    got.iter().all(|&w| w < n) && (0..n).all(|w| got.contains(&w))
}

/// Reuseport, 3 workers under `--autorestart=false`: with worker 1 killed,
/// new connections go to the other slots' sockets only (none hangs).
fn only_serving_slots_get_connections(h: &Herd) {
    let pids = h.worker_pids(3);
    signal(pids[1], "KILL");
    assert!(
        h.wait_log("worker 1 stays down (--autorestart=false)", T),
        "{}",
        h.log()
    );
    let got = worker_ids(h.port, 40);
    assert!(
        got.iter().all(|&w| w == 0 || w == 2),
        "{got:?}\n{}",
        h.log()
    );
}

#[test]
fn in_reuseport_mode_a_slot_without_a_worker_gets_no_new_connection() {
    let n = name("rpdown");
    let h = Herd::start(
        &[
            "--name",
            &n,
            "-i",
            "3",
            "--mode",
            "reuseport",
            "--autorestart=false",
        ],
        &[DEMO],
    );
    h.wait_ready(3);
    // Scaled down and up again before the leaving workers exited: their
    // sockets come back in their places in the kernel's group, which
    // steering names by place (see supervise::steer).
    ok(&herd(&["scale", &n, "1"]));
    ok(&herd(&["scale", &n, "3"]));
    assert!(
        wait_until(T, || h.log().matches("(retired)").count() == 2),
        "{}",
        h.log()
    );
    only_serving_slots_get_connections(&h);
    // `herd restart` starts the slot again, and it gets its share again.
    ok(&herd(&["restart", &n]));
    assert!(
        wait_until(T, || worker_ids(h.port, 20).contains(&1)),
        "{}",
        h.log()
    );
    let got = worker_ids(h.port, 40);
    assert!(got.iter().all(|&w| w < 3), "{got:?}\n{}", h.log());
}
