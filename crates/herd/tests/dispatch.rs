//! Dispatch mode: the master accepts and passes each connection's fd to a
//! worker. Real processes, real sockets, real signals.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

fn example(rel: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(rel)
        .to_string_lossy()
        .into_owned()
}

/// One request on a connection that stays open: the worker id that answered.
fn request_on(s: &mut BufReader<TcpStream>) -> usize {
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut len = 0;
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    assert!(line.contains(" 200 "), "{line}");
    loop {
        let mut h = String::new();
        s.read_line(&mut h).unwrap();
        if h == "\r\n" || h.is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("content-length:") {
            len = v.trim().parse().unwrap();
        }
    }
    let mut body = vec![0; len];
    s.read_exact(&mut body).unwrap();
    parse_hello(&String::from_utf8_lossy(&body)).0
}

fn open_conn(port: u16) -> BufReader<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    BufReader::new(s)
}

#[test]
fn round_robin_spread_is_exact_over_1000_connections() {
    let h = Herd::start(&["-i", "3", "--mode", "dispatch"], &[DEMO]);
    h.wait_ready(3);
    let mut counts = BTreeMap::new();
    for _ in 0..1000 {
        let (status, body) = h.get("/").unwrap();
        assert_eq!(status, 200);
        *counts.entry(parse_hello(&body).0).or_insert(0) += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (id, n) in &counts {
        assert!((333..=334).contains(n), "worker {id} got {n}: {counts:?}");
    }
}

#[test]
fn least_conn_steers_new_connections_away_from_a_busy_worker() {
    let name = format!("t-lc-{}", std::process::id());
    let h = Herd::start(
        &[
            "--name",
            &name,
            "-i",
            "1",
            "--mode",
            "dispatch",
            "--balance",
            "least-conn",
        ],
        &[DEMO],
    );
    h.wait_ready(1);
    // Worker 0 holds 12 open connections.
    let mut held: Vec<_> = (0..12).map(|_| open_conn(h.port)).collect();
    for c in held.iter_mut() {
        assert_eq!(request_on(c), 0);
    }
    let out = herd_cmd()
        .args(["scale", "--name", &name, "2"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    // Ready in the supervisor's answer, so the dispatcher has it too (the
    // log line comes a moment before the set is published).
    assert!(
        wait_until(T, || {
            let out = herd(&["status", "--name", &name, "--json"]);
            String::from_utf8_lossy(&out.stdout)
                .matches("\"state\": \"ready\"")
                .count()
                == 2
        }),
        "{}",
        h.log()
    );
    // Every new connection goes to the idle newcomer until it holds as many.
    let mut fresh: Vec<_> = (0..8).map(|_| open_conn(h.port)).collect();
    let ids: Vec<usize> = fresh.iter_mut().map(request_on).collect();
    assert_eq!(ids, vec![1; 8], "{}", h.log());
    // Closed connections are reported: once worker 0 drops to 2 open, new
    // connections go back to it.
    held.truncate(2);
    assert!(wait_until(T, || {
        let mut c = open_conn(h.port);
        let id = request_on(&mut c);
        fresh.push(c);
        id == 0
    }));
}

#[test]
fn a_worker_killed_with_connections_handed_but_not_taken_loses_none() {
    let h = Herd::start(&["-i", "2", "--mode", "dispatch"], &[DEMO]);
    h.wait_ready(2);
    let pids = h.worker_pids(2);
    // Worker 0 freezes: what the master hands it stays unanswered.
    signal(pids[0], "STOP");
    let port = h.port;
    let clients: Vec<_> = (0..10)
        .map(|_| std::thread::spawn(move || http_get(port, "/")))
        .collect();
    // Round-robin gives worker 1 its half, which it answers.
    assert!(wait_until(T, || clients
        .iter()
        .filter(|c| c.is_finished())
        .count()
        >= 5));
    assert!(
        clients.iter().filter(|c| c.is_finished()).count() < 10,
        "the frozen worker cannot have answered"
    );
    signal(pids[0], "KILL");
    for c in clients {
        let (status, body) = c.join().unwrap().expect("an accepted connection was lost");
        assert_eq!(status, 200);
        assert_ne!(
            parse_hello(&body).1,
            pids[0],
            "answered by the killed worker"
        );
    }
    assert!(h.wait_log("worker 0 ready", T));
}

#[test]
fn unmodified_node_app_serves_in_every_mode() {
    let app = example("node/plain.js");
    for mode in ["dispatch", "shared", "reuseport", "proxy"] {
        let h = Herd::start(&["-i", "2", "--mode", mode], &["node", &app]);
        h.wait_ready(2);
        for _ in 0..20 {
            let (status, body) = h.get("/").unwrap();
            assert_eq!((status, body.as_str()), (200, "Hello, World!\n"), "{mode}");
        }
        let log = h.log();
        // Both workers run: neither failed to bind port 3000.
        assert!(log.contains("[0] Server running"), "{mode}: {log}");
        assert!(log.contains("[1] Server running"), "{mode}: {log}");
        assert!(!log.contains("exited"), "{mode}: {log}");
        assert!(!log.contains("EADDRINUSE"), "{mode}: {log}");
        // Its code names 3000 (proxy mode gave it a PORT, which it
        // ignores): where it is served instead is said once, in every mode.
        let hint = format!(
            "the app asks for port 3000 in its code; herd serves it on 127.0.0.1:{} (--listen)",
            h.port
        );
        assert!(h.wait_log(&hint, T), "{mode}: {log}");
        assert_eq!(h.log().matches("asks for port").count(), 1, "{mode}: {log}");
    }
}

/// An app that forks its own cluster workers: in dispatch mode they took
/// the preload's variables for theirs and the cluster was never ready (its
/// primary then gave them herd's port, which they had not asked for); at a
/// stop the primary died of the signal and its workers' requests with it.
#[test]
fn node_cluster_app_serves_in_every_mode_and_finishes_its_requests_at_a_stop() {
    let app = example("node/cluster.js");
    for mode in ["dispatch", "shared", "reuseport", "proxy"] {
        let mut h = Herd::start(&["-i", "1", "--mode", mode], &["node", &app]);
        h.wait_ready(1);
        // Node's round-robin spreads connections over the cluster workers
        // that have listened (the first makes herd's worker ready); herd's
        // proxy may keep one connection.
        let want = if mode == "proxy" { 1 } else { 2 };
        let mut pids = std::collections::BTreeSet::new();
        let spread = wait_until(T, || {
            let (status, body) = h.get("/").unwrap();
            assert_eq!(status, 200, "{mode}: {body}");
            let pid = body.trim().rsplit(' ').next().unwrap();
            pids.insert(pid.parse::<u32>().unwrap());
            pids.len() >= want
        });
        assert!(spread, "{mode}: {pids:?}");
        let port = h.port;
        let slow = std::thread::spawn(move || http_get(port, "/slow"));
        assert!(h.wait_log("slow request in", T), "{mode}: {}", h.log());
        h.signal("TERM");
        let (status, body) = slow.join().unwrap().unwrap();
        assert_eq!(status, 200, "{mode}: {body}\n{}", h.log());
        assert!(body.starts_with("slow answer from"), "{mode}: {body}");
        let st = h.wait_exit(T).expect("master did not exit");
        assert_eq!(st.code(), Some(0), "{mode}: {}", h.log());
        assert!(pids.iter().all(|&p| !alive(p)), "{mode}: {pids:?}");
        assert!(!h.log().contains("died"), "{mode}: {}", h.log());
    }
}

#[test]
fn node_app_spreads_and_stops_gracefully_in_dispatch_mode() {
    let app = example("node/hello.js");
    let mut h = Herd::start(&["-i", "2", "--mode", "dispatch"], &["node", &app]);
    h.wait_ready(2);
    let pids = h.worker_pids(2);
    let mut seen = BTreeMap::new();
    for _ in 0..10 {
        let (_, body) = h.get("/").unwrap();
        *seen.entry(parse_hello(&body).0).or_insert(0) += 1;
    }
    assert_eq!(seen.values().copied().collect::<Vec<_>>(), [5, 5]);
    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
    assert!(pids.iter().all(|&p| !alive(p)));
}

/// Bytes the master has read through syscalls (`rchar` of /proc/PID/io).
fn bytes_read(pid: u32) -> u64 {
    let io = std::fs::read_to_string(format!("/proc/{pid}/io")).unwrap();
    io.lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// The look at a worker's sockets that explains a worker not yet ready
/// (every process's stat and the TCP tables, about 30 KB per look here)
/// ends once it is ready. In dispatch mode readiness comes from the
/// dispatcher, and the look went on every 5 s for the worker's whole life,
/// at a cost that grows with the connections on the machine.
#[test]
fn a_ready_dispatch_worker_is_not_looked_at_again() {
    let app = example("node/hello.js");
    let h = Herd::start(&["-i", "2", "--mode", "dispatch"], &["node", &app]);
    h.wait_ready(2);
    let pid = h.child.id();
    let before = bytes_read(pid);
    // The first look would come 2 s after a worker's start, the next 5 s
    // later: over 8 s, the old code read at least 30 KB.
    let end = std::time::Instant::now() + Duration::from_secs(8);
    while std::time::Instant::now() < end {
        let read = bytes_read(pid) - before;
        assert!(
            read < 8192,
            "the master read {read} bytes while idle: {}",
            h.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn python_example_serves_through_dispatch() {
    let app = example("python/dispatch.py");
    let h = Herd::start(&["-i", "2", "--mode", "dispatch"], &["python3", &app]);
    h.wait_ready(2);
    let pids = h.worker_pids(2);
    assert_ne!(pids[0], pids[1]);
    let (_, body) = h.get("/").unwrap();
    assert!(body.starts_with("hello from python worker"), "{body}");
}

#[test]
fn a_worker_that_never_takes_connections_is_not_ready_in_dispatch_mode() {
    // app.py says READY=1 but binds its own port: it would strand every
    // connection handed to it, so it never counts as ready.
    let app = example("python/app.py");
    let h = Herd::start(
        &[
            "-i",
            "1",
            "--mode",
            "dispatch",
            "--ready-timeout",
            "1s",
            "--max-restarts",
            "0",
        ],
        &["python3", &app],
    );
    assert!(h.wait_log("not ready within", T), "{}", h.log());
    assert!(h.log().contains("HERD_DISPATCH_FD"), "{}", h.log());
}

#[test]
fn reloading_an_unmodified_node_app_fails_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let app = example("node/plain.js");
    let name = format!("t-nodereload-{}", std::process::id());
    for mode in ["dispatch", "shared"] {
        let h = Herd::start(
            &["--name", &name, "-i", "2", "--mode", mode],
            &["node", &app],
        );
        h.wait_ready(2);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let clients: Vec<_> = (0..6)
            .map(|_| {
                let (stop, done, port) = (stop.clone(), done.clone(), h.port);
                std::thread::spawn(move || {
                    let mut bad = Vec::new();
                    while !stop.load(Ordering::Relaxed) && bad.len() < 100 {
                        match http_get(port, "/") {
                            Ok((200, _)) => {}
                            Ok((code, body)) => bad.push(format!("{code} {body}")),
                            Err(e) => bad.push(e.to_string()),
                        }
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    bad
                })
            })
            .collect();
        assert!(wait_until(T, || done.load(Ordering::Relaxed) >= 50));
        let out = herd_cmd()
            .args(["reload", "--name", &name])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert!(out.status.success(), "{mode}: {out:?}\n{}", h.log());
        let before = done.load(Ordering::Relaxed);
        assert!(wait_until(T, || done.load(Ordering::Relaxed) >= before + 50));
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            let bad = c.join().unwrap();
            assert!(
                bad.is_empty(),
                "{mode}: failed during reload: {bad:?}\n{}",
                h.log()
            );
        }
        // The old workers left through the preload's graceful stop.
        assert_eq!(
            h.log().matches("exited with code 0 (retired)").count(),
            2,
            "{mode}: {}",
            h.log()
        );
    }
}

#[test]
fn node_shim_reaches_node_behind_a_wrapper_when_asked() {
    let app = example("node/plain.js");
    let script = format!("exec node {app}");
    let h = Herd::start(
        &["-i", "2", "--mode", "dispatch", "--node-shim"],
        &["sh", "-c", &script],
    );
    h.wait_ready(2);
    let (status, body) = h.get("/").unwrap();
    assert_eq!((status, body.as_str()), (200, "Hello, World!\n"));
}

#[test]
fn the_preloads_listening_is_not_ready_under_wait_ready_but_a_ready_message_is() {
    // The preload says `listening` (as weak as a port probe): --wait-ready
    // waits for the app's own word.
    let app = example("node/plain.js");
    let h = Herd::start(
        &[
            "-i",
            "1",
            "--mode",
            "shared",
            "--wait-ready",
            "--ready-timeout",
            "1s",
            "--max-restarts",
            "0",
        ],
        &["node", &app],
    );
    assert!(h.wait_log("not ready within", T), "{}", h.log());
    // A worker that writes {"type":"ready"} on its message channel is ready.
    let py = "import os, socket\n\
              s = socket.socket(fileno=3)\n\
              os.write(4, b'{\"type\":\"ready\"}\\n')\n\
              while True:\n\
              \x20   c, _ = s.accept()\n\
              \x20   c.recv(4096)\n\
              \x20   c.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 3\\r\\nConnection: close\\r\\n\\r\\nok\\n')\n\
              \x20   c.close()\n";
    let h = Herd::start(
        &["-i", "1", "--mode", "shared", "--wait-ready"],
        &["python3", "-c", py],
    );
    h.wait_ready(1);
    assert_eq!(h.get("/").unwrap(), (200, "ok\n".to_string()));
}

/// A dispatch worker that answers correctly but mixes junk into its
/// answers: lines longer than the master reads, invalid JSON and UTF-8,
/// acks and nacks for nothing, open counts out of range.
const JUNK_WORKER: &str = r#"
import os, socket, threading
JUNK = [b"x" * 10000 + b"\n", b"not json\n", b"\xff\xfe\x00\n", b'{"herd":null}\n',
        b'{"cmd":"NODE_HANDLE_ACK"}\n' * 3, b'{"cmd":"NODE_HANDLE_NACK"}\n' * 3,
        b'{"herd":"open","open":-5}\n', b'{"herd":"open","open":"many"}\n',
        b'{"herd":"open","open":4294967295}\n', b'{"cmd":1,"herd":[]}\n']
chan = socket.socket(fileno=int(os.environ["HERD_DISPATCH_FD"]))
lock = threading.Lock()
def send(b):
    with lock:
        chan.sendall(b)
for j in JUNK:
    send(j)
send(b'{"herd":"listening"}\n')
def serve(conn):
    body = f"hello from worker {os.environ['HERD_WORKER_ID']} (pid {os.getpid()})\n".encode()
    conn.recv(4096)
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
    conn.close()
buf, fds, n = b"", [], 0
while True:
    data, new, _, _ = socket.recv_fds(chan, 4096, 16)
    if not data and not new:
        break
    fds.extend(new)
    buf += data
    while b"\n" in buf:
        line, buf = buf.split(b"\n", 1)
        if b"NODE_HANDLE" in line and fds:
            conn = socket.socket(fileno=fds.pop(0))
            # The ack, then junk right behind it, in one write.
            send(b'{"cmd":"NODE_HANDLE_ACK"}\n' + JUNK[n % len(JUNK)])
            n += 1
            threading.Thread(target=serve, args=(conn,)).start()
"#;

#[test]
fn junk_from_a_worker_neither_stops_the_master_nor_loses_a_connection() {
    for balance in ["round-robin", "least-conn"] {
        let mut h = Herd::start(
            &["-i", "2", "--mode", "dispatch", "--balance", balance],
            &["python3", "-c", JUNK_WORKER],
        );
        h.wait_ready(2);
        let mut seen = BTreeMap::new();
        for _ in 0..40 {
            let (status, body) = h.get("/").expect("a connection was lost");
            assert_eq!(status, 200, "{balance}: {body}");
            *seen.entry(parse_hello(&body).0).or_insert(0) += 1;
        }
        // Round-robin stays exact; least-conn follows the (junk) counts the
        // workers report, so there only the answers are checked.
        if balance == "round-robin" {
            assert_eq!(
                seen.values().copied().collect::<Vec<_>>(),
                [20, 20],
                "{seen:?}"
            );
        }
        assert!(
            matches!(h.child.try_wait(), Ok(None)),
            "{balance}: the master exited\n{}",
            h.log()
        );
        assert!(!h.log().contains("panicked"), "{balance}: {}", h.log());
    }
}
