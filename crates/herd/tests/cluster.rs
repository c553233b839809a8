//! The real `herd` binary supervising real workers on loopback.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::Duration;

use common::*;

const MODES: [&str; 4] = ["proxy", "shared", "reuseport", "dispatch"];
const T: Duration = Duration::from_secs(20);

fn env_of(body: &str) -> BTreeMap<String, String> {
    body.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

#[test]
fn every_mode_serves_with_every_worker() {
    for mode in MODES {
        let h = Herd::start(&["-i", "3", "--mode", mode], &[DEMO]);
        h.wait_ready(3);
        let pids = h.worker_pids(3);
        assert_eq!(pids.iter().collect::<BTreeSet<_>>().len(), 3, "{mode}");
        // Each worker got its own contract: slot id, PM2's alias, and in fd
        // modes LISTEN_PID equal to its own pid (strict readers check it).
        let mut seen = BTreeSet::new();
        assert!(wait_until(T, || {
            let (_, body) = h.get("/env").unwrap();
            let env = env_of(&body);
            assert_eq!(env["HERD_WORKER_ID"], env["NODE_APP_INSTANCE"]);
            assert_eq!(env["HERD_WORKERS"], "3");
            assert!(!env["NOTIFY_SOCKET"].is_empty());
            assert_eq!(env["HERD_MODE"], mode);
            if mode == "proxy" {
                assert!(env["PORT"].parse::<u16>().is_ok());
                assert_eq!(env["LISTEN_FDS"], "");
            } else if mode == "dispatch" {
                assert_eq!(env["LISTEN_FDS"], "");
                assert_eq!(env["HERD_DISPATCH_FD"], "3");
            } else {
                assert_eq!(env["LISTEN_FDS"], "1");
                assert_eq!(env["LISTEN_PID"], env["pid"], "{mode}");
                assert_eq!(env["LISTEN_FDNAMES"], "herd");
            }
            seen.insert(env["HERD_WORKER_ID"].clone());
            seen.len() == 3
        }));
        // Worker output comes out prefixed with the worker id.
        let says = if mode == "dispatch" {
            "taking connections"
        } else {
            "listening on"
        };
        for id in 0..3 {
            assert!(h.log().contains(&format!("[{id}] {says}")), "{}", h.log());
        }
    }
}

#[test]
fn proxy_spreads_connections_round_robin() {
    let h = Herd::start(&["-i", "3"], &[DEMO]);
    h.wait_ready(3);
    let mut counts = BTreeMap::new();
    for _ in 0..30 {
        let (status, body) = h.get("/").unwrap();
        assert_eq!(status, 200);
        *counts.entry(parse_hello(&body).0).or_insert(0) += 1;
    }
    assert_eq!(counts.values().copied().collect::<Vec<_>>(), [10, 10, 10]);
}

/// A lone worker (`-i 1`, or any count on a 1-CPU container) that crashes:
/// until the supervisor has seen the exit, the dead worker is still in the
/// proxy's pool. The requests of that moment wait for its replacement, as
/// those that come once it is gone do, rather than getting a 502 or 503.
/// A stopped (or stuck) worker still completes TCP handshakes in its
/// kernel, so a connect check passed it and every other request waited on
/// it for `--response-timeout`. It must accept the check's connection too,
/// and requests it has not read go to the other worker once it is out.
#[test]
fn a_stopped_worker_is_taken_out_and_back_when_it_goes_on() {
    // herd-demo listens on the Unix socket herd offers (`auto`).
    stopped_worker_taken_out("auto");
}

/// The same over TCP, which servers that know no `HERD_SOCKET` get.
#[test]
fn a_stopped_worker_on_a_port_is_taken_out_and_back_when_it_goes_on() {
    stopped_worker_taken_out("tcp");
}

fn stopped_worker_taken_out(socket: &str) {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let h = Herd::spawn(
        herd_cmd()
            .env("HERD_LOG", "info,herd::upstream=debug")
            .args(["run", "--listen", &listen, "-i", "2"])
            .args(["--health-interval", "200ms", "--response-timeout", "60s"])
            .args(["--worker-socket", socket])
            .args(["--", DEMO]),
        port,
    );
    h.wait_ready(2);
    let pids = h.worker_pids(2);
    signal(pids[0], "STOP");
    // Round-robin sends some of these to the stopped worker.
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let t0 = std::time::Instant::now();
                (
                    read_response(s).map(|(st, b)| (st, parse_hello(&b).0)),
                    t0.elapsed(),
                )
            })
        })
        .collect();
    let out =
        "worker 0 is unhealthy (3 checks failed, last: accepted no connection and answered nothing";
    let taken_out = h.wait_log(out, T);
    if !taken_out {
        signal(pids[0], "CONT");
    }
    assert!(taken_out, "{}", h.log());
    for w in waiting {
        let (got, took) = w.join().unwrap();
        assert_eq!(got.unwrap(), (200, 1), "after {took:?}");
        assert!(took < Duration::from_secs(20), "{took:?}");
    }
    assert!(
        h.log()
            .contains("was taken out as stopped or stuck while a request waited on it"),
        "{}",
        h.log()
    );
    for _ in 0..20 {
        let (status, body) = h.get("/").unwrap();
        assert_eq!((status, parse_hello(&body).0), (200, 1), "{body}");
    }
    // The last one in stays in, stuck or not: out, it would leave every
    // request a 503 (a CPU-bound app with every worker busy for long).
    signal(pids[1], "STOP");
    let kept = h.wait_log("worker 1: accepted no connection and answered nothing", T);
    signal(pids[1], "CONT");
    assert!(kept, "{}", h.log());
    assert!(h.log().contains("kept in, as no other is"), "{}", h.log());
    signal(pids[0], "CONT");
    assert!(h.wait_log("worker 0 is healthy again", T), "{}", h.log());
    assert!(wait_until(T, || h
        .get("/")
        .is_ok_and(|(_, b)| parse_hello(&b).0 == 0)));
    // Busy is not stuck: the other worker stayed in throughout.
    assert!(!h.log().contains("worker 1 is unhealthy"), "{}", h.log());
}

/// A worker whose event loop one request blocks: the requests behind it go
/// to the other worker once it is out, and the one it is busy with is not
/// sent again (it would block the other worker too).
#[test]
fn a_request_that_blocks_its_worker_runs_once_and_the_others_go_elsewhere() {
    const SPIN: &str = "const http = require('http'); let spins = 0;
        http.createServer((q, r) => {
          if (q.url === '/spin') { spins++; const end = Date.now() + 8000; while (Date.now() < end) {} }
          r.end(`worker ${process.env.HERD_WORKER_ID} spins=${spins}\\n`);
        }).listen(Number(process.env.PORT));";
    let n = name("spin");
    let h = Herd::start(
        &["--name", &n, "-i", "2", "--health-interval", "200ms"],
        &["node", "-e", SPIN],
    );
    h.wait_ready(2);
    let spins = |body: &str| -> u32 {
        body.trim()
            .rsplit("spins=")
            .next()
            .and_then(|n| n.parse().ok())
            .unwrap_or(99)
    };
    let port = h.port;
    let spin = std::thread::spawn(move || http_get(port, "/spin"));
    // /spin is in flight on its worker; some of these then wait behind it.
    assert!(wait_until(T, || {
        let v: serde_json::Value =
            serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"])))
                .unwrap_or_default();
        v["workers"]
            .as_array()
            .is_some_and(|w| w.iter().any(|w| w["connections"] == 1))
    }));
    let waiting: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                let t0 = std::time::Instant::now();
                (http_get(port, "/"), t0.elapsed())
            })
        })
        .collect();
    let (status, body) = spin.join().unwrap().unwrap();
    assert_eq!(status, 200, "{body}");
    let busy = parse_hello(&body).0;
    assert_eq!(spins(&body), 1, "{body}");
    for w in waiting {
        let (got, took) = w.join().unwrap();
        let (status, body) = got.unwrap();
        assert_eq!(status, 200, "{body}");
        assert_ne!(parse_hello(&body).0, busy, "{body} after {took:?}");
    }
    assert!(
        h.log()
            .contains("was taken out as stopped or stuck while a request waited on it"),
        "{}",
        h.log()
    );
    // /spin ran once: the other worker never had it.
    assert!(h.wait_log("is healthy again", T), "{}", h.log());
    let mut seen = BTreeMap::new();
    assert!(wait_until(T, || {
        if let Ok((200, b)) = h.get("/") {
            seen.insert(parse_hello(&b).0, spins(&b));
        }
        seen.len() == 2
    }));
    assert_eq!(seen.values().sum::<u32>(), 1, "{seen:?}");
}

#[test]
fn a_lone_workers_crash_under_keepalive_load_fails_no_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let h = Herd::start(&["-i", "1", "--min-uptime", "200ms"], &[DEMO]);
    h.wait_ready(1);
    // Odd rounds kill a worker that ran past --min-uptime (restarted at
    // once), even ones a young one (restarted after the back-off); never
    // two young ones in a row, which would be a crash loop.
    // Each round first waits for `more` answers since the last one.
    // `why` says what the client saw, should its answers stop.
    let crash = |round: usize, count: &dyn Fn() -> usize, more: usize, why: &dyn Fn() -> String| {
        let (seen, up) = (count(), std::time::Instant::now());
        let grown = Duration::from_millis(if round % 2 == 1 { 300 } else { 0 });
        assert!(
            wait_until(T, || count() >= seen + more && up.elapsed() >= grown),
            "round {round}: {} answers, {seen} before it; {}; log:\n{}",
            count(),
            why(),
            h.log()
        );
        let pid = h.worker_pids(1)[0];
        signal(pid, "KILL");
        assert!(
            wait_until(T, || h.worker_pids(1)[0] != pid),
            "round {round}: not replaced; log:\n{}",
            h.log()
        );
    };
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let clients = load(h.port, true, stop.clone(), done.clone());
    let answered = || done.load(Ordering::Relaxed);
    for round in 0..4 {
        crash(round, &answered, 200, &String::new);
    }
    let seen = done.load(Ordering::Relaxed);
    assert!(wait_until(T, || done.load(Ordering::Relaxed) > seen + 200));
    // A GET the worker had read when it died is retried on its replacement
    // too; nothing here is lost.
    no_failures(&stop, clients);

    // The same over h2c (hyper's path): requests in a row on one
    // connection (Python's h2; curl 7.88 does not reuse an h2c one).
    let stop_file = std::env::temp_dir().join(format!("herd-lone-{}", h.port));
    let client = std::process::Command::new("python3")
        .args(["-c", H2_IN_A_ROW, &h.port.to_string(), s(&stop_file)])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    // Its count so far, which it writes beside the stop file.
    let count_file = std::path::PathBuf::from(format!("{}.n", s(&stop_file)));
    let answered = || {
        std::fs::read_to_string(&count_file)
            .ok()
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0)
    };
    let why_file = std::path::PathBuf::from(format!("{}.why", s(&stop_file)));
    let why = || std::fs::read_to_string(&why_file).unwrap_or_else(|_| "client running".into());
    for round in 1..3 {
        crash(round, &answered, 20, &why);
    }
    let last = answered();
    assert!(
        wait_until(T, || answered() >= last + 20),
        "h2c: no answers after the last crash"
    );
    std::fs::write(&stop_file, "").unwrap();
    let out = client.wait_with_output().expect("python3");
    let _ = std::fs::remove_file(&stop_file);
    let _ = std::fs::remove_file(&count_file);
    let _ = std::fs::remove_file(&why_file);
    let said = String::from_utf8_lossy(&out.stdout);
    let ok: usize = said
        .strip_prefix("ok ")
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("h2c: {said}\nlog:\n{}", h.log()));
    assert!(ok >= last + 20, "{said}");
}

/// GETs over one h2c connection, one after another, until the file named
/// by the second argument exists: `ok N`, or what went wrong (also in that
/// name plus `.why`). Every 10 answers, the count so far goes to that name
/// plus `.n`. Bodies read are acknowledged: without it the connection's
/// receive window (64 KiB) ends the answers' DATA after about 2,000 of
/// them, and 128 streams then wait open.
const H2_IN_A_ROW: &str = r#"
import os, socket, sys, h2.connection, h2.config, h2.events
port, stop = int(sys.argv[1]), sys.argv[2]
def end(why):
    with open(stop + ".why", "w") as f:
        f.write(why)
    sys.exit(print(why))
s = socket.create_connection(("127.0.0.1", port))
s.settimeout(30)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection()
s.sendall(c.data_to_send())
ok = 0
while not os.path.exists(stop) and ok < 100000:
    sid = c.get_next_available_stream_id()
    c.send_headers(sid, [(":method", "GET"), (":path", "/"), (":scheme", "http"),
                         (":authority", "test")], end_stream=True)
    s.sendall(c.data_to_send())
    status = None
    while status is None:
        data = s.recv(65536)
        if not data:
            end(f"closed after {ok}")
        for e in c.receive_data(data):
            if isinstance(e, h2.events.ResponseReceived) and e.stream_id == sid:
                status = dict(e.headers)[b":status"]
            elif isinstance(e, h2.events.StreamReset) and e.stream_id == sid:
                end(f"stream reset after {ok}")
            elif isinstance(e, h2.events.ConnectionTerminated):
                end(f"GOAWAY after {ok}")
            elif isinstance(e, h2.events.DataReceived):
                c.acknowledge_received_data(e.flow_controlled_length, e.stream_id)
        s.sendall(c.data_to_send())
    if status != b"200":
        end(f"status {status.decode()} after {ok}")
    ok += 1
    if ok % 10 == 0:
        with open(stop + ".n.tmp", "w") as f:
            f.write(str(ok))
        os.replace(stop + ".n.tmp", stop + ".n")
print(f"ok {ok}")
"#;

#[test]
fn killed_worker_is_replaced_in_its_slot() {
    for mode in ["proxy", "reuseport", "dispatch"] {
        let h = Herd::start(&["-i", "2", "--mode", mode], &[DEMO]);
        h.wait_ready(2);
        let before = h.worker_pids(2);
        signal(before[1], "KILL");
        assert!(h.wait_log("worker 1 (pid", T));
        assert!(
            h.wait_log("was killed by SIGKILL", T),
            "exit reason not logged:\n{}",
            h.log()
        );
        assert!(
            wait_until(T, || {
                let now = h.worker_pids(2);
                now[0] == before[0] && now[1] != before[1] && alive(now[1])
            }),
            "slot 1 not replaced in {mode} mode; log:\n{}",
            h.log()
        );
    }
}

#[test]
fn reuseport_serves_connections_queued_on_a_dead_workers_socket() {
    let h = Herd::start(&["-i", "2", "--mode", "reuseport"], &[DEMO]);
    h.wait_ready(2);
    let before = h.worker_pids(2);
    // Freeze worker 0: connections the kernel hashes to its socket now wait
    // in that socket's accept queue.
    signal(before[0], "STOP");
    let conns: Vec<TcpStream> = (0..24)
        .map(|_| {
            let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
            write!(s, "GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").unwrap();
            s
        })
        .collect();
    // Kill it while they are queued; the master keeps the socket and hands
    // it to the replacement, which must serve every one of them.
    signal(before[0], "KILL");
    let mut served_by = BTreeMap::new();
    for s in conns {
        let (status, body) = read_response(s).expect("a queued connection was lost");
        assert_eq!(status, 200);
        *served_by.entry(parse_hello(&body)).or_insert(0) += 1;
    }
    let replacement_served = served_by
        .keys()
        .any(|&(id, pid)| id == 0 && pid != before[0]);
    assert!(
        replacement_served,
        "no connection was served by the replacement: {served_by:?}"
    );
}

#[test]
fn graceful_stop_completes_an_in_flight_slow_request() {
    for mode in MODES {
        let mut h = Herd::start(&["-i", "2", "--mode", mode], &[DEMO]);
        h.wait_ready(2);
        let pids = h.worker_pids(2);
        let port = h.port;
        let req = std::thread::spawn(move || http_get(port, "/slow?ms=1500"));
        assert!(h.wait_log("slow request started", T), "{}", h.log());
        h.signal("TERM");
        if mode == "proxy" {
            // While draining, the proxy refuses new connections at once.
            assert!(
                wait_until(T, || TcpStream::connect(("127.0.0.1", port)).is_err()),
                "still accepting while draining"
            );
        }
        let (status, body) = req.join().unwrap().expect("in-flight request failed");
        assert_eq!(status, 200, "{mode}");
        assert!(body.starts_with("slow done"), "{mode}: {body}");
        let st = h.wait_exit(T).expect("master did not exit");
        assert_eq!(st.code(), Some(0), "{mode}; log:\n{}", h.log());
        assert!(pids.iter().all(|&p| !alive(p)));
        // New connections are refused once stopped.
        assert!(TcpStream::connect(("127.0.0.1", h.port)).is_err());
    }
}

/// While it drains, the master still answers `herd status` and `herd list`,
/// saying it is stopping, and refuses other requests, rather than leaving
/// them without an answer (`herd list` hanging) until it exits.
#[test]
fn a_stopping_cluster_answers_status_and_refuses_other_requests() {
    let n = name("stopping");
    let mut h = Herd::start(&["-i", "1", "-n", &n, "--drain-timeout", "30s"], &[DEMO]);
    h.wait_ready(1);
    let port = h.port;
    let req = std::thread::spawn(move || http_get(port, "/slow?ms=6000"));
    assert!(h.wait_log("slow request started", T), "{}", h.log());
    h.signal("TERM");
    assert!(
        h.wait_log("waiting for 1 open connections", T),
        "{}",
        h.log()
    );
    let status = ok(&herd(&["status", &n]));
    assert!(status.contains("(stopping)"), "{status}");
    let list = ok(&herd(&["list"]));
    assert!(
        list.lines()
            .any(|l| l.starts_with(n.as_str()) && l.ends_with("stopping")),
        "{list}"
    );
    let reload = herd(&["reload", &n]);
    let err = String::from_utf8_lossy(&reload.stderr);
    assert!(!reload.status.success(), "{err}");
    assert!(err.contains("is stopping"), "{err}");
    // All answered while the slow request was still being served.
    assert!(
        !req.is_finished(),
        "the drain ended before the answers came"
    );
    let (code, body) = req.join().unwrap().expect("in-flight request failed");
    assert_eq!(code, 200, "{body}");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
}

/// Workers close their sockets as they stop, some time before they exit:
/// the health checks end with the cluster's stop, rather than log each
/// worker unhealthy on its way out.
#[test]
fn a_stop_logs_no_worker_unhealthy() {
    const SLOW_EXIT: &str = "const s = require('http').createServer((q, r) => r.end('ok'))
          .listen(Number(process.env.PORT));
        process.on('SIGTERM', () => { s.close(); setTimeout(() => process.exit(0), 2000); });";
    let mut h = Herd::start(
        &["-i", "2", "--health-interval", "200ms"],
        &["node", "-e", SLOW_EXIT],
    );
    h.wait_ready(2);
    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
    assert!(!h.log().contains("unhealthy"), "{}", h.log());
}

/// A stop that comes while `herd upgrade` drains wins, as `systemctl stop`
/// or `docker stop` expect: the master answers `status` during the drain,
/// then stops instead of re-executing, and the request in flight gets its
/// answer. By a signal and by `herd stop`.
#[test]
fn a_stop_during_an_upgrade_stops_the_cluster_instead() {
    for by in ["TERM", "stop"] {
        let n = name("upstop");
        let mut h = Herd::start(&["-i", "1", "-n", &n, "--drain-timeout", "30s"], &[DEMO]);
        h.wait_ready(1);
        let port = h.port;
        let req = std::thread::spawn(move || http_get(port, "/slow?ms=6000"));
        assert!(h.wait_log("slow request started", T), "{}", h.log());
        let upgrade = {
            let n = n.clone();
            std::thread::spawn(move || herd(&["upgrade", &n]))
        };
        assert!(h.wait_log("upgrading in place", T), "{}", h.log());
        let status = ok(&herd(&["status", &n]));
        assert!(status.contains(&n), "{status}");
        assert!(
            !req.is_finished(),
            "{by}: status was answered only after the drain"
        );
        if by == "stop" {
            ok(&herd(&["stop", &n]));
        } else {
            h.signal(by);
        }
        let (code, body) = req.join().unwrap().expect("in-flight request failed");
        assert_eq!(code, 200, "{body}");
        let st = h.wait_exit(T).expect("master did not exit");
        assert_eq!(st.code(), Some(0), "{}", h.log());
        let log = h.log();
        assert!(log.contains("the upgrade is abandoned"), "{log}");
        assert!(!log.contains("upgraded in place"), "{log}");
        let out = upgrade.join().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{by}: {err}");
        assert!(err.contains("is stopping instead"), "{by}: {err}");
    }
}

/// Signals that come while `herd upgrade` runs. A handler does not survive
/// the exec: until the new master had its own, a SIGHUP ended the master
/// (workers already gone); before the exec they were dropped unsaid. Now
/// they wait pending through the exec, a scale is carried over to the new
/// master, and the others are logged.
#[test]
fn signals_during_an_upgrade_neither_end_the_master_nor_vanish() {
    let n = name("upsig");
    let mut h = Herd::start(&["-i", "1", "-n", &n, "--drain-timeout", "30s"], &[DEMO]);
    h.wait_ready(1);
    let port = h.port;
    let req = std::thread::spawn(move || http_get(port, "/slow?ms=1500"));
    assert!(h.wait_log("slow request started", T), "{}", h.log());
    let upgrade = {
        let n = n.clone();
        std::thread::spawn(move || herd(&["upgrade", &n]))
    };
    assert!(h.wait_log("upgrading in place", T), "{}", h.log());
    h.signal("TTIN");
    h.signal("USR2");
    // SIGHUPs every millisecond, through the exec, until the upgrade is done.
    let master = nix::unistd::Pid::from_raw(h.child.id() as i32);
    let mut sent = 0;
    while !upgrade.is_finished() && sent < 20_000 {
        let _ = nix::sys::signal::kill(master, nix::sys::signal::Signal::SIGHUP);
        sent += 1;
        std::thread::sleep(Duration::from_millis(1));
    }
    let out = upgrade.join().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{said} {}", h.log());
    assert!(
        h.wait_exit(Duration::from_millis(500)).is_none(),
        "{}",
        h.log()
    );
    let (code, _) = req.join().unwrap().expect("in-flight request failed");
    assert_eq!(code, 200);
    let log = h.log();
    assert!(
        log.contains("SIGTTIN during the upgrade: the new master starts 2 workers"),
        "{log}"
    );
    assert!(
        log.contains("SIGUSR2 during the upgrade: already upgrading"),
        "{log}"
    );
    assert!(log.contains("SIGHUP during the upgrade"), "{log}");
    // The new master runs the 2 workers (after the reload the pending
    // SIGHUP asks for) and serves.
    assert!(
        wait_until(T, || {
            let st = herd(&["status", &n, "--json"]);
            serde_json::from_slice::<serde_json::Value>(&st.stdout).is_ok_and(|v| {
                v["workers"]
                    .as_array()
                    .is_some_and(|w| w.len() == 2 && w.iter().all(|w| w["state"] == "ready"))
            })
        }),
        "{}",
        h.log()
    );
    assert_eq!(http_get(port, "/").map(|r| r.0).ok(), Some(200));
    // Nothing stays blocked: not in the master, nor in what it started
    // (its guardian, its workers), which would inherit the mask.
    let pid = h.child.id();
    let kids = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap();
    let pids: Vec<String> = kids
        .split_whitespace()
        .map(str::to_string)
        .chain([pid.to_string()])
        .collect();
    assert!(pids.len() >= 4, "guardian and 2 workers: {kids}");
    for p in &pids {
        let status = std::fs::read_to_string(format!("/proc/{p}/status")).unwrap_or_default();
        let blocked = status.lines().find(|l| l.starts_with("SigBlk:"));
        assert!(
            blocked.is_none_or(|b| b.ends_with("0000000000000000")),
            "{p}: {blocked:?}"
        );
    }
    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
}

/// A keep-alive client whose request is in flight when a stop begins gets
/// its answer with `Connection: close`, then the close, rather than an
/// answer that invites another request.
#[test]
fn an_answer_in_flight_during_a_stop_closes_its_keep_alive_connection() {
    let mut h = Herd::start(&["-i", "1"], &[DEMO]);
    h.wait_ready(1);
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /slow?ms=1500 HTTP/1.1\r\nHost: herd\r\n\r\n")
        .unwrap();
    assert!(h.wait_log("slow request started", T), "{}", h.log());
    h.signal("TERM");
    // Read to the end: returns only once herd closed the connection.
    let mut got = String::new();
    s.read_to_string(&mut got)
        .expect("no close after the answer");
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
    let head = got
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .to_ascii_lowercase();
    assert!(head.contains("\r\nconnection: close"), "{got}");
    assert!(got.contains("slow done"), "{got}");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
}

#[test]
fn second_signal_stops_at_once() {
    let mut h = Herd::start(&["-i", "1", "--drain-timeout", "30s"], &[DEMO]);
    h.wait_ready(1);
    let port = h.port;
    let req = std::thread::spawn(move || http_get(port, "/slow?ms=20000"));
    assert!(h.wait_log("slow request started", T));
    h.signal("INT");
    assert!(
        h.wait_log("waiting for 1 open connections", T),
        "{}",
        h.log()
    );
    h.signal("INT");
    let st = h
        .wait_exit(Duration::from_secs(10))
        .expect("did not stop at once");
    assert_eq!(st.code(), Some(0));
    let res = req.join().unwrap();
    assert!(
        !matches!(res, Ok((200, _))),
        "the slow request cannot have completed: {res:?}"
    );
}

#[test]
fn a_retiring_worker_gets_sigterm_after_the_drain_timeout_and_sigkill_after_the_kill_timeout() {
    // The demo drains on SIGTERM: it would wait for its 20 s request.
    let mut h = Herd::start(
        &[
            "-i",
            "1",
            "--drain-timeout",
            "300ms",
            "--kill-timeout",
            "1s",
        ],
        &[DEMO],
    );
    h.wait_ready(1);
    let old = h.worker_pids(1);
    let port = h.port;
    let req = std::thread::spawn(move || http_get(port, "/slow?ms=20000"));
    assert!(h.wait_log("slow request started", T), "{}", h.log());
    let started = std::time::Instant::now();
    h.signal("HUP");
    assert!(h.wait_log("reload done", T), "{}", h.log());
    let took = started.elapsed();
    let log = h.log();
    assert!(
        log.contains("still busy after 300ms of draining; SIGTERM"),
        "{log}"
    );
    assert!(
        log.contains("still running 1s after SIGTERM; SIGKILL"),
        "{log}"
    );
    assert!(
        took < Duration::from_secs(8),
        "the retirement took {took:?}"
    );
    assert!(!alive(old[0]), "the old worker is gone");
    // The request itself is retried on the new worker (a GET, as nginx
    // does): it is not waited for here.
    drop(req);
    h.signal("TERM");
    assert_eq!(h.wait_exit(T).and_then(|s| s.code()), Some(0));
}

#[test]
fn a_worker_ignoring_sigterm_is_killed_after_the_kill_timeout() {
    let mut h = Herd::start(
        &["-i", "1", "--mode", "shared", "--kill-timeout", "300ms"],
        &[
            "sh",
            "-c",
            "trap '' TERM; echo up; while :; do sleep 0.05; done",
        ],
    );
    h.wait_ready(1);
    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0));
    let log = h.log();
    assert!(
        log.contains("still running 300ms after SIGTERM; SIGKILL"),
        "{log}"
    );
    assert!(log.contains("was killed by SIGKILL"), "{log}");
}

#[test]
fn master_raises_its_open_file_limit() {
    let h = Herd::start_with_nofile("256:4096", &["-i", "1"], &[DEMO]);
    h.wait_ready(1);
    let pid = h.worker_pids(1)[0];
    for p in [h.child.id(), pid] {
        let limits = std::fs::read_to_string(format!("/proc/{p}/limits")).unwrap();
        let line = limits
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .unwrap();
        let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
        assert_eq!(nums, ["4096", "4096"], "pid {p}: {line}");
    }
}

#[test]
fn no_worker_survives_kill_9_of_the_master() {
    // Directly in every mode, and behind a shell that stays as the worker's
    // parent (the `npm start` case), so the real server is the master's
    // grandchild. The wrapper runs in proxy mode: behind a forking wrapper
    // LISTEN_PID names the shell, and strict readers rightly ignore fd 3.
    let wrapped = format!("{DEMO}; exit 0");
    let cases = MODES
        .iter()
        .map(|&m| (m, vec![DEMO]))
        .chain([("proxy", vec!["sh", "-c", wrapped.as_str()])]);
    for (mode, cmd) in cases {
        {
            let mut h = Herd::start(&["-i", "2", "--mode", mode], &cmd);
            h.wait_ready(2);
            let pids = h.worker_pids(2);
            h.signal("KILL");
            h.wait_exit(T).unwrap();
            assert!(
                wait_until(Duration::from_secs(5), || pids.iter().all(|&p| !alive(p))),
                "workers {pids:?} outlived the master ({mode}, {cmd:?})"
            );
            assert!(
                wait_until(Duration::from_secs(5), || TcpStream::connect((
                    "127.0.0.1",
                    h.port
                ))
                .is_err()),
                "port still served after the master died ({mode})"
            );
        }
    }
}

#[test]
fn crash_loop_stops_with_a_clear_message() {
    let mut h = Herd::start(
        &["-i", "2", "--max-restarts", "3", "--restart-delay", "10ms"],
        &["sh", "-c", "echo booting; exit 3"],
    );
    let st = h.wait_exit(T).expect("crash loop did not stop the cluster");
    assert_eq!(st.code(), Some(1));
    let log = h.log();
    assert!(log.contains("crash loop"), "{log}");
    assert!(log.contains("exited with code 3"), "{log}");
    assert!(log.contains("[0] booting"), "{log}");
}

/// The pids of the processes whose whole command line is `cmdline`.
fn running(cmdline: &str) -> Vec<u32> {
    let out = std::process::Command::new("pgrep")
        .args(["-f", &format!("^{cmdline}$")])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect()
}

/// A server run by a shell script without `exec` (or by `go run`): the
/// shell dies of herd's SIGTERM at once, and the server it started was
/// killed with its group then, its requests in flight failed. It is now
/// given until its SIGKILL was due, as systemd waits for a whole cgroup,
/// on a reload and on the cluster's stop.
#[test]
fn a_server_behind_a_wrapper_finishes_its_requests_when_stopped() {
    // Proxy mode, whose drain herd cuts short here: the demo behind a
    // forking wrapper rightly ignores fd 3 (LISTEN_PID names the shell).
    let wrapped = format!("{DEMO}; exit 0");
    let n = name("wrapped");
    let mut h = Herd::start(
        &["--name", &n, "-i", "1", "--drain-timeout", "100ms"],
        &["sh", "-c", &wrapped],
    );
    h.wait_ready(1);
    let old = h.worker_pids(1)[0];
    let port = h.port;
    let slow = move || std::thread::spawn(move || http_get(port, "/slow?ms=1500"));
    let client = slow();
    assert!(h.wait_log("slow request started", T), "{}", h.log());
    ok(&herd(&["reload", "--name", &n]));
    let (status, body) = client.join().unwrap().expect("the answer, on a reload");
    assert_eq!(status, 200, "{body}");
    // From the old worker, not a retry on the new one.
    assert!(
        body.contains(&format!("slow done by worker 0 (pid {old})")),
        "{body}"
    );
    let client = slow();
    assert!(h.wait_log_n("slow request started", 2, T), "{}", h.log());
    h.signal("TERM");
    let (status, body) = client.join().unwrap().expect("the answer, on a stop");
    assert!(
        status == 200 && body.contains("slow done"),
        "{status} {body}"
    );
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
}

/// What is left of a worker's group that ignores SIGTERM is still killed
/// at the kill time-out, on a reload (which waits for it, as for a worker
/// that is slow to stop) and on the stop, which waits for it, no longer.
#[test]
fn what_a_wrapper_leaves_behind_is_killed_at_the_kill_timeout() {
    let secs = 200_000 + std::process::id();
    let sleep = format!("sleep {secs}");
    // The subshell ignores SIGTERM and its `sleep` inherits that; the shell
    // dies of the SIGTERM, the demo stops at once (no request in flight).
    let script = format!("(trap '' TERM; exec {sleep}) & {DEMO}; exit 0");
    let n = name("left-behind");
    let mut h = Herd::start(
        &["--name", &n, "-i", "1", "--kill-timeout", "1s"],
        &["sh", "-c", &script],
    );
    h.wait_ready(1);
    let old = running(&sleep);
    assert_eq!(old.len(), 1, "{old:?}");
    let asked = std::time::Instant::now();
    ok(&herd(&["reload", "--name", &n]));
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "not waited for: {took:?}"
    );
    assert!(wait_until(T, || !alive(old[0])), "it outlived the reload");
    assert!(h.log().contains("1s after SIGTERM; SIGKILL"), "{}", h.log());
    // The log says why the reload waits, though the worker's pid is gone.
    let log = h.log();
    let shell = log
        .split("worker 0 started (pid ")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .unwrap_or_default();
    assert!(
        log.contains(&format!(
            "worker 0: its main process (pid {shell}) ended; waiting for the processes it started"
        )),
        "{log}"
    );
    let new = running(&sleep);
    assert_eq!(new.len(), 1, "{new:?}");
    let asked = std::time::Instant::now();
    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
    let took = asked.elapsed();
    assert!(
        took >= Duration::from_millis(900),
        "not waited for: {took:?}"
    );
    assert!(wait_until(T, || !alive(new[0])), "it outlived the stop");
}

/// A program that daemonizes (its launcher exits 0 while the server runs
/// on in a session of its own) is named as such, once, rather than only
/// as a crash loop of exits with code 0; what it left behind dies with
/// it, children of the daemon included.
#[test]
fn a_worker_that_daemonizes_is_told_to_stay_in_the_foreground() {
    let secs = 100_000 + std::process::id();
    let daemon = format!("sleep {secs}");
    let script = format!("setsid sh -c '{daemon}; exit 0' & sleep 0.3; exit 0");
    // Two workers, so two exits: the log names the first only.
    let mut h = Herd::start(
        &["-i", "2", "--restart-delay", "60s"],
        &["sh", "-c", &script],
    );
    assert!(h.wait_log_n("exited with code 0", 2, T), "{}", h.log());
    assert!(h.wait_log("it daemonized", T), "{}", h.log());
    assert!(h.log().contains("running in the background"), "{}", h.log());
    // Gone with the worker's exit, while the cluster waits to restart it.
    assert!(
        wait_until(T, || running(&daemon).is_empty()),
        "the daemon's child runs on"
    );
    assert!(h.child.try_wait().unwrap().is_none(), "{}", h.log());
    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
    assert_eq!(h.log().matches("it daemonized").count(), 1, "{}", h.log());
}

/// A client waiting for the first worker when a crash loop stops the
/// cluster gets its 503 (TCP mode: the close) at once: a stopping cluster
/// starts no worker, so the wait no longer holds the drain until it ends.
#[test]
fn a_client_waiting_for_a_worker_is_answered_when_a_crash_loop_stops_the_cluster() {
    for proto in ["http", "tcp"] {
        let mut h = Herd::start(
            &[
                "-i",
                "1",
                "--protocol",
                proto,
                "--max-restarts",
                "3",
                "--restart-delay",
                "300ms",
                "--drain-timeout",
                "60s",
                "--ready-timeout",
                "60s",
            ],
            &["sh", "-c", "sleep 0.2; exit 3"],
        );
        let port = h.port;
        assert!(wait_until(T, || TcpStream::connect(("127.0.0.1", port)).is_ok()));
        let mut c = TcpStream::connect(("127.0.0.1", port)).unwrap();
        c.set_read_timeout(Some(T)).unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: herd\r\n\r\n")
            .unwrap();
        let st = h.wait_exit(T).expect("the cluster did not stop");
        assert_eq!(st.code(), Some(1), "{proto}: {}", h.log());
        let mut got = String::new();
        let _ = c.read_to_string(&mut got);
        if proto == "http" {
            assert!(got.starts_with("HTTP/1.1 503"), "{got}");
        } else {
            assert!(got.is_empty(), "{got}");
        }
    }
}

/// PM2's `--no-autorestart` (`autorestart: false`): a worker that ends
/// stays down, the others serve, and the cluster ends with the last one.
#[test]
fn without_autorestart_ended_workers_stay_down_and_the_last_ends_the_cluster() {
    let n = name("noauto");
    let mut h = Herd::start(&["-i", "2", "--no-autorestart", "--name", &n], &[DEMO]);
    h.wait_ready(2);
    let pids = h.worker_pids(2);
    signal(pids[0], "KILL");
    assert!(
        h.wait_log("worker 0 stays down (--autorestart=false)", T),
        "{}",
        h.log()
    );
    // `herd status` lists the empty slot, as `pm2 ls` lists a stopped app.
    let st: serde_json::Value =
        serde_json::from_str(&ok(&herd(&["status", "--name", &n, "--json"]))).unwrap();
    let w0 = &st["workers"][0];
    assert!(
        w0["id"] == 0 && w0["state"] == "stopped" && w0["pid"] == 0,
        "{st}"
    );
    assert!(
        w0["last_exit"]
            .as_str()
            .is_some_and(|e| e.contains("SIGKILL")),
        "{st}"
    );
    assert_eq!(st["workers"][1]["state"], "ready", "{st}");
    let table = ok(&herd(&["status", "--name", &n]));
    assert!(
        table.contains("stopped: no process, and none starts"),
        "{table}"
    );
    for _ in 0..4 {
        let (code, body) = h.get("/").unwrap();
        assert!(code == 200 && body.contains("worker 1"), "{code} {body}");
    }
    signal(pids[1], "KILL");
    let st = h.wait_exit(T).expect("the cluster did not end");
    assert_eq!(st.code(), Some(0), "{}", h.log());
    assert!(h.log().contains("no worker is left"), "{}", h.log());
    assert!(!h.log().contains("restarting worker"), "{}", h.log());
}

/// PM2's `--stop-exit-codes 0`: a job that ends with a code of the list is
/// done and stays down; another code is restarted as usual. Worker 0
/// fails once (code 3, restarted), then ends with 0; the cluster ends
/// once both did.
#[test]
fn a_stop_exit_code_ends_a_worker_for_good_and_others_restart_it() {
    let dir = std::env::temp_dir().join(format!("herd-stopcodes-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let job = format!(
        "if [ \"$HERD_WORKER_ID\" = 0 ] && mkdir {}/failed-once 2>/dev/null; then exit 3; fi; sleep 0.3; exit 0",
        dir.display()
    );
    let mut h = Herd::start(
        &[
            "-i",
            "2",
            "--stop-exit-codes",
            "0,7",
            "--restart-delay",
            "10ms",
        ],
        &["sh", "-c", &job],
    );
    let st = h.wait_exit(T).expect("the cluster did not end");
    let log = h.log();
    assert_eq!(st.code(), Some(0), "{log}");
    assert_eq!(log.matches("restarting worker 0").count(), 1, "{log}");
    assert!(!log.contains("restarting worker 1"), "{log}");
    assert_eq!(
        log.matches("stays down (--stop-exit-codes)").count(),
        2,
        "{log}"
    );
    assert!(
        log.contains("no worker is left (--stop-exit-codes)"),
        "{log}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_worker_that_never_gets_ready_is_replaced() {
    // --wait-ready: only READY=1 counts, and `sleep` never sends it.
    let mut h = Herd::start(
        &[
            "-i",
            "1",
            "--wait-ready",
            "--ready-timeout",
            "300ms",
            "--max-restarts",
            "1",
            "--restart-delay",
            "10ms",
            // It runs longer than this before it is killed: the crash loop
            // must not blame --min-uptime (issue 18, item 3).
            "--min-uptime",
            "100ms",
        ],
        &["sleep", "60"],
    );
    assert!(h.wait_log("not ready within", T), "{}", h.log());
    let st = h
        .wait_exit(T)
        .expect("never-ready workers must end in a crash loop");
    assert_eq!(st.code(), Some(1));
    let log = h.log();
    assert!(
        log.contains("crash loop: worker 0 was not ready within 300ms, 2 times in a row")
            && log.contains("--ready-timeout")
            && !log.contains("--min-uptime"),
        "{log}"
    );
}

/// A program that listens nowhere (a queue consumer started without
/// `--mode fork`, as `pm2 start worker.js` would run it) is pointed at fork
/// mode long before `--ready-timeout` ends the wait, once for the cluster.
#[test]
fn a_worker_that_listens_nowhere_is_pointed_at_fork_mode() {
    let h = Herd::start(&["-i", "2", "--ready-timeout", "30s"], &["sleep", "60"]);
    let said = || h.log().matches("it listens on no port yet").count();
    assert!(wait_until(T, || said() > 0), "{}", h.log());
    let log = h.log();
    assert!(
        log.contains("runs with --mode fork") && !log.contains("killing it"),
        "{log}"
    );
    // Both workers reach the hint's time together; the second stays quiet.
    assert!(
        !wait_until(Duration::from_secs(2), || said() > 1),
        "{}",
        h.log()
    );
}

/// A server on a port of its own choosing (written in its code, a
/// framework's default) is never ready: the log names the port it took and
/// the one herd waits on, in time to read before the crash loop.
#[test]
fn a_worker_on_a_port_of_its_own_is_named() {
    for (mode, says) in [
        ("proxy", "Make it listen on $PORT"),
        ("dispatch", "use --mode proxy, shared or reuseport"),
    ] {
        let own = free_port().to_string();
        let h = Herd::start(
            &["-i", "1", "--mode", mode],
            &["python3", "-m", "http.server", "--bind", "127.0.0.1", &own],
        );
        let said = format!("it listens on 127.0.0.1:{own}");
        assert!(h.wait_log(&said, T), "{mode}: {}", h.log());
        assert!(h.log().contains(says), "{mode}: {}", h.log());
    }
    // One that binds late (a JVM) is named when it does.
    let own = free_port().to_string();
    let late = format!("sleep 3; exec python3 -m http.server --bind 127.0.0.1 {own}");
    let h = Herd::start(&["-i", "1"], &["sh", "-c", &late]);
    let said = format!("is not ready after 7s: it listens on 127.0.0.1:{own}");
    assert!(h.wait_log(&said, T), "{}", h.log());
    drop(h);
    // Shared mode takes it as ready after its grace; the clients that
    // wait on herd's port, never accepted, name it. (Without herd's Python
    // preload, which would put its bind() on herd's socket.)
    let own = free_port().to_string();
    let h = Herd::start(
        &["-i", "1", "--mode", "shared", "--no-node-shim"],
        &["python3", "-m", "http.server", "--bind", "127.0.0.1", &own],
    );
    h.wait_ready(1);
    let mut waiting = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    waiting
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let said = format!("1 connection waited on 127.0.0.1:{}", h.port);
    assert!(h.wait_log(&said, T), "{}", h.log());
    let line = format!("worker 0 listens on 127.0.0.1:{own}. In shared mode");
    assert!(h.log().contains(&line), "{}", h.log());
}

/// A command run without a shell names each worker's port and id as
/// `$PORT` and `${HERD_WORKER_ID}` in its arguments (as `redis-server --port
/// '$PORT'` would), and herd puts that worker's values there.
#[test]
fn per_worker_values_reach_a_command_run_without_a_shell() {
    const ARGV_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        b = ("%s %s\n" % (sys.argv[2], sys.argv[3])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"#;
    let h = Herd::start(
        &["-i", "2"],
        &[
            "python3",
            "-c",
            ARGV_SERVER,
            "$PORT",
            "w${HERD_WORKER_ID}",
            "$HOME",
        ],
    );
    h.wait_ready(2);
    let mut seen = BTreeSet::new();
    assert!(
        wait_until(T, || {
            if let Ok((200, body)) = h.get("/") {
                // Only herd's per-worker variables: `$HOME` stays as it is.
                assert!(body.ends_with(" $HOME\n"), "{body}");
                seen.insert(body);
            }
            seen.len() == 2
        }),
        "{seen:?} {}",
        h.log()
    );
    assert!(
        seen.contains("w0 $HOME\n") && seen.contains("w1 $HOME\n"),
        "{seen:?}"
    );
}

/// A Python server that knows only `HERD_SOCKET`, on a Unix socket.
const UNIX_SERVER: &str = r#"
import http.server, os, socketserver
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def address_string(self): return "unix"
    def do_GET(self):
        b = ("unix %s %s\n" % (os.environ["HERD_WORKER_ID"], self.headers["X-Forwarded-For"])).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
class S(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
S(os.environ["HERD_SOCKET"], H).serve_forever()
"#;

/// `--worker-socket`: a worker that listens on the Unix socket herd offers
/// (`HERD_SOCKET`) is proxied there, by default (`auto`) as with `unix`,
/// and relayed there in TCP mode; `unix` names the port of a worker that
/// listens on one instead; and the modes with no proxy hop refuse it.
#[test]
fn workers_are_proxied_on_the_unix_socket_they_listen_on() {
    for (socket, proto) in [("auto", "http"), ("unix", "http"), ("auto", "tcp")] {
        let h = Herd::start(
            &["-i", "2", "--worker-socket", socket, "--protocol", proto],
            &["python3", "-c", UNIX_SERVER],
        );
        h.wait_ready(2);
        // (A TCP relay adds no X-Forwarded-For.)
        let from = if proto == "tcp" { "None" } else { "127.0.0.1" };
        let mut seen = [false; 2];
        assert!(
            wait_until(T, || {
                let Ok((200, body)) = h.get("/") else {
                    return false;
                };
                let id = if body.starts_with("unix 0 ") { 0 } else { 1 };
                assert!(body.starts_with(&format!("unix {id} {from}")), "{body}");
                seen[id] = true;
                seen == [true, true]
            }),
            "{socket} {proto}: {}",
            h.log()
        );
        // Keep-alive through herd, with a new connection to the worker
        // per request (it closes none) or the same one.
        for _ in 0..20 {
            let (status, body) = h.get("/").unwrap();
            assert_eq!(status, 200, "{body}");
        }
    }
    let own = free_port().to_string();
    let h = Herd::start(
        &["-i", "1", "--worker-socket", "unix"],
        &["python3", "-m", "http.server", "--bind", "127.0.0.1", &own],
    );
    let said =
        format!("it listens on 127.0.0.1:{own}, but herd sends it requests on the Unix socket");
    assert!(h.wait_log(&said, T), "{}", h.log());
    assert!(
        h.log().contains("uvicorn --uds $HERD_SOCKET"),
        "{}",
        h.log()
    );
    drop(h);
    for bad in [&["--mode", "shared"][..], &["--backend-protocol", "h2"]] {
        let out = herd_cmd()
            .args(["run", "--worker-socket", "unix"])
            .args(bad)
            .args(["--", DEMO])
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{bad:?}: {err}");
        assert!(
            err.contains("--worker-socket unix is for proxy mode"),
            "{bad:?}: {err}"
        );
        assert_eq!(err.lines().count(), 1, "{bad:?}: {err}");
    }
}

/// Two workers of a server on a fixed port: the second cannot bind, and
/// herd says why it crash-loops (once) with the `'… $PORT'` way out, which
/// then serves.
#[test]
fn a_worker_that_cannot_bind_gets_a_hint() {
    let own = free_port().to_string();
    let h = Herd::start(
        &["-i", "2"],
        &["python3", "-m", "http.server", "--bind", "127.0.0.1", &own],
    );
    assert!(
        h.wait_log("says an address is already in use", T),
        "{}",
        h.log()
    );
    assert!(h.wait_log_n("exited with code 1", 3, T), "{}", h.log());
    let log = h.log();
    let way_out = "python3 -m http.server --bind 127.0.0.1 $PORT";
    assert!(
        log.contains("herd run -- 'python3 -m http.server $PORT'"),
        "{log}"
    );
    assert_eq!(
        log.matches("says an address is already in use").count(),
        1,
        "{log}"
    );
    drop(h);
    // The way out, as the hint writes it: one word, through `sh -c`.
    let h = Herd::start(&["-i", "2"], &[way_out]);
    h.wait_ready(2);
    assert!(matches!(http_get(h.port, "/"), Ok((200, _))), "{}", h.log());
}

/// In the fd modes the way out is not `$PORT` (herd sets none there) but
/// the socket herd hands over, or proxy mode. (Without herd's Python
/// preload, which would put the server's bind() on herd's socket.)
#[test]
fn a_worker_that_cannot_bind_in_shared_mode_gets_the_fd_hint() {
    let own = free_port().to_string();
    let h = Herd::start(
        &["-i", "2", "--mode", "shared", "--no-node-shim"],
        &["python3", "-m", "http.server", "--bind", "127.0.0.1", &own],
    );
    assert!(
        h.wait_log("says an address is already in use", T),
        "{}",
        h.log()
    );
    let log = h.log();
    assert!(log.contains("In shared mode herd holds the port"), "{log}");
    assert!(log.contains("accept on fd 3"), "{log}");
    assert!(!log.contains("Make it listen on $PORT"), "{log}");
}

/// A worker given fd 3 gets connections with `TCP_NODELAY` set, from the
/// listening socket: one that writes an answer in two pieces without
/// setting it (uvicorn takes fd 3 for a Unix socket) would otherwise wait
/// on a delayed ACK, 40 ms per keep-alive answer.
#[test]
fn workers_given_fd_3_accept_connections_with_nodelay() {
    const APP: &str = r#"
import socket
s = socket.socket(fileno=3)
while True:
    c, _ = s.accept()
    c.recv(65536)
    body = b"nodelay=%d" % c.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
    c.close()
"#;
    for mode in ["shared", "reuseport"] {
        let h = Herd::start(&["-i", "1", "--mode", mode], &["python3", "-c", APP]);
        h.wait_ready(1);
        let (status, body) = h.get("/").unwrap();
        assert_eq!((status, body.as_str()), (200, "nodelay=1"), "{mode}");
    }
}

/// herd's Node preload serves an app on the Unix socket herd offers, and
/// the app sees what it would on its loopback port: `address()` names the
/// port, each connection's peer is 127.0.0.1 (Express's `req.ip`).
#[test]
fn a_node_app_on_herds_unix_socket_sees_a_loopback_peer() {
    const APP: &str = "const s = require('http').createServer((q, r) => r.end(JSON.stringify({\
        pipe: s._pipeName !== undefined, ip: q.socket.remoteAddress, family: q.socket.remoteFamily,\
        port: s.address().port === Number(process.env.HERD_PORT) })));\
        s.listen(process.env.PORT || 3000);";
    for (socket, pipe) in [("auto", true), ("tcp", false)] {
        let h = Herd::start(
            &["-i", "1", "--worker-socket", socket],
            &["node", "-e", APP],
        );
        h.wait_ready(1);
        let (status, body) = h.get("/").unwrap();
        let want = format!(r#"{{"pipe":{pipe},"ip":"127.0.0.1","family":"IPv4","port":true}}"#);
        assert_eq!((status, body), (200, want), "{socket}: {}", h.log());
    }
}

#[test]
fn node_and_python_apps_serve_in_every_mode() {
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples");
    let node = examples.join("node/hello.js");
    let python = examples.join("python/app.py");
    let apps = [
        (["node", node.to_str().unwrap()], "hello from node worker"),
        (
            ["python3", python.to_str().unwrap()],
            "hello from python worker",
        ),
    ];
    for (cmd, greeting) in apps {
        for mode in MODES {
            if mode == "dispatch" && greeting.contains("python") {
                continue; // app.py binds its own socket; see tests/dispatch.rs
            }
            let h = Herd::start(&["-i", "2", "--mode", mode], &cmd);
            h.wait_ready(2);
            let pids = h.worker_pids(2);
            assert_ne!(pids[0], pids[1]);
            let (_, body) = h.get("/").unwrap();
            assert!(body.starts_with(greeting), "{mode}: {body}");
        }
    }
}

/// In the fd modes herd's Python preload makes the first `bind()` of a
/// script's server take herd's socket (fd 3), as the Node preload makes
/// `listen()` take it: a script written for one process (`HTTPServer(("",
/// 5000))`, asyncio's server on both address families, Flask's `app.run`
/// with its reloader) runs as N workers on herd's port instead of fighting
/// for its own. A script that takes fd 3 itself binds its other servers
/// where it asks, and so does a Python program a worker starts.
#[test]
fn python_scripts_that_bind_their_port_serve_on_herds_socket_in_the_fd_modes() {
    let dir = std::env::temp_dir().join(format!("herd-pyfd-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    const ANSWER: &str = "def answer(what):\n\
        \x20   import os\n\
        \x20   b = ('%s from worker %s (pid %d)' % (what, os.environ['HERD_WORKER_ID'], os.getpid())).encode()\n\
        \x20   return b'HTTP/1.1 200 OK\\r\\nContent-Length: %d\\r\\nConnection: close\\r\\n\\r\\n%s' % (len(b), b)\n";
    const HANDLER: &str = "from http.server import HTTPServer, BaseHTTPRequestHandler\n\
        class H(BaseHTTPRequestHandler):\n\
        \x20   def do_GET(self):\n\
        \x20       self.wfile.write(answer(self.server.what))\n";
    let (own, child, helper) = (free_port(), free_port(), free_port());
    let apps = [
        (
            "plain.py",
            format!(
                "{ANSWER}{HANDLER}import os, subprocess, sys\n\
                 server = HTTPServer(('', {own}), H)\n\
                 server.what = 'plain'\n\
                 if os.environ['HERD_WORKER_ID'] == '0':\n\
                 \x20   code = 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", {child})); print(s.getsockname()[1])'\n\
                 \x20   server.what = 'child=' + subprocess.run([sys.executable, '-c', code], capture_output=True, text=True).stdout.strip()\n\
                 server.serve_forever()\n"
            ),
        ),
        (
            "own.py",
            format!(
                "{ANSWER}{HANDLER}import os, socket, threading\n\
                 main = HTTPServer(None, H, bind_and_activate=False)\n\
                 main.socket, main.what = socket.fromfd(3, socket.AF_INET, socket.SOCK_STREAM), 'own'\n\
                 if os.environ['HERD_WORKER_ID'] == '0':\n\
                 \x20   side = HTTPServer(('127.0.0.1', {helper}), H)\n\
                 \x20   side.what = 'helper'\n\
                 \x20   threading.Thread(target=side.serve_forever, daemon=True).start()\n\
                 main.serve_forever()\n"
            ),
        ),
        (
            "dual.py",
            format!(
                "{ANSWER}import asyncio\n\
                 async def handle(reader, writer):\n\
                 \x20   await reader.readuntil(b'\\r\\n\\r\\n')\n\
                 \x20   writer.write(answer('asyncio'))\n\
                 \x20   await writer.drain()\n\
                 \x20   writer.close()\n\
                 async def main():\n\
                 \x20   server = await asyncio.start_server(handle, port={own})\n\
                 \x20   await server.serve_forever()\n\
                 asyncio.run(main())\n"
            ),
        ),
        (
            "site.py",
            format!(
                "{ANSWER}from flask import Flask\n\
                 app = Flask(__name__)\n\
                 @app.get('/')\n\
                 def root():\n\
                 \x20   return answer('flask').split(b'\\r\\n\\r\\n', 1)[1]\n\
                 app.run(port={own}, use_reloader=True)\n"
            ),
        ),
    ];
    for (file, code) in &apps {
        std::fs::write(dir.join(file), code).unwrap();
    }
    for mode in ["shared", "reuseport"] {
        for (file, _) in &apps {
            let path = dir.join(file);
            let h = Herd::start(&["-i", "2", "--mode", mode], &["python3", s(&path)]);
            h.wait_ready(2);
            let pids = h.worker_pids(2);
            assert_ne!(pids[0], pids[1], "{mode} {file}");
            let (_, body) = h.get("/").unwrap();
            let what = file.trim_end_matches(".py");
            match what {
                "own" => {
                    assert!(body.starts_with("own from worker"), "{mode}: {body}");
                    let (status, side) = http_get(helper, "/").unwrap();
                    assert_eq!(
                        (status, side.starts_with("helper from worker 0")),
                        (200, true)
                    );
                }
                "plain" => {
                    let worker0 = format!("child={child} from worker 0");
                    assert!(
                        wait_until(T, || h.get("/").is_ok_and(|(_, b)| b.starts_with(&worker0))),
                        "{mode}: worker 0's own program binds the port it asks for\n{}",
                        h.log()
                    );
                }
                "dual" => assert!(body.starts_with("asyncio from worker"), "{mode}: {body}"),
                _ => assert!(body.starts_with("flask from worker"), "{mode}: {body}"),
            }
            if what != "own" {
                // The one-line note that the app's own port is not served.
                let note = format!("the app asks for port {own} in its code");
                assert!(h.log().contains(&note), "{mode} {file}: {}", h.log());
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// A stdlib HTTP server (`http.server`, one request per connection in its
/// main thread) died of the SIGTERM, its request in flight with it: in the
/// fd modes, where clients reach it directly, herd's Python preload now
/// makes it stop as its `shutdown()` would, after that request.
#[test]
fn a_python_http_server_finishes_its_request_in_flight_at_a_stop_in_the_fd_modes() {
    let dir = std::env::temp_dir().join(format!("herd-pyslow-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = dir.join("slow.py");
    std::fs::write(
        &app,
        format!(
            "import time\n\
             from http.server import HTTPServer, BaseHTTPRequestHandler\n\
             class H(BaseHTTPRequestHandler):\n\
             \x20   def do_GET(self):\n\
             \x20       print('got', self.path, flush=True)\n\
             \x20       time.sleep(1)\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', '9')\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(b'slow done')\n\
             HTTPServer(('', {}), H).serve_forever()\n",
            free_port()
        ),
    )
    .unwrap();
    for mode in ["shared", "reuseport"] {
        let mut h = Herd::start(&["-i", "1", "--mode", mode], &["python3", s(&app)]);
        h.wait_ready(1);
        let port = h.port;
        let slow = std::thread::spawn(move || http_get(port, "/slow"));
        assert!(h.wait_log("got /slow", T), "{mode}: {}", h.log());
        h.signal("TERM");
        let answer = slow.join().unwrap();
        assert!(
            matches!(&answer, Ok((200, b)) if b == "slow done"),
            "{mode}: {answer:?}\n{}",
            h.log()
        );
        let status = h.wait_exit(T).expect("herd did not stop");
        assert!(status.success(), "{mode}: {status:?}\n{}", h.log());
        assert!(
            h.log().contains("exited with code 0"),
            "{mode}: {}",
            h.log()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Mojolicious' daemon, drained by herd's Perl preload at a stop in the fd
/// modes, tells an open WebSocket that it is going away (a close frame,
/// 1001) and exits with 0 at once (before, the SIGTERM dropped the
/// connection without one; a graceful stop that only waited would have
/// kept it until herd's SIGKILL).
#[test]
fn mojolicious_daemon_closes_its_websockets_with_going_away_at_a_stop_in_the_fd_modes() {
    let dir = std::env::temp_dir().join(format!("herd-mojo-ws-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("ws.pl"),
        "use Mojolicious::Lite;\n\
         websocket '/ws' => sub {\n\
         \x20   my $c = shift;\n\
         \x20   $c->inactivity_timeout(300);\n\
         \x20   $c->on(message => sub { $c->send(pop) });\n\
         };\n\
         app->start;\n",
    )
    .unwrap();
    let app = dir.join("ws.pl");
    let mut h = Herd::start(
        &["-i", "1", "--mode", "shared"],
        &["perl", s(&app), "daemon"],
    );
    h.wait_ready(1);
    let mut ws = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    ws.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    ws.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .unwrap();
    let mut c = BufReader::new(ws);
    let mut line = String::new();
    std::io::BufRead::read_line(&mut c, &mut line).unwrap();
    assert!(line.starts_with("HTTP/1.1 101"), "{line:?}");
    while line != "\r\n" {
        line.clear();
        std::io::BufRead::read_line(&mut c, &mut line).unwrap();
    }
    h.signal("TERM");
    let mut frame = Vec::new();
    let read = c.read_to_end(&mut frame);
    assert!(read.is_ok(), "{read:?}");
    assert!(
        frame.starts_with(&[0x88, 0x02, 0x03, 0xe9]),
        "{frame:?}\n{}",
        h.log()
    );
    let status = h.wait_exit(T).expect("herd did not stop");
    let log = h.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(log.contains("exited with code 0"), "{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sends `GET /slow` on `c` and, once the app says it got it, stops herd:
/// the answer is in flight at the stop.
fn term_during_slow_request(h: &Herd, c: &mut BufReader<TcpStream>) {
    c.get_mut()
        .write_all(b"GET /slow HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    assert!(h.wait_log("got /slow", T), "{}", h.log());
    h.signal("TERM");
}

/// A keep-alive (HTTP/1.1) stdlib server in one thread at a stop in the fd
/// modes: the answer in flight says `Connection: close`, an idle
/// keep-alive connection is closed (not reset) after the grace, and the
/// worker exits with 0 (it died of the SIGTERM before).
#[test]
fn a_keep_alive_python_http_server_closes_its_connections_at_a_stop_in_the_fd_modes() {
    let dir = std::env::temp_dir().join(format!("herd-pyka-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let app = dir.join("ka.py");
    std::fs::write(
        &app,
        format!(
            "import time\n\
             from http.server import HTTPServer, BaseHTTPRequestHandler\n\
             class H(BaseHTTPRequestHandler):\n\
             \x20   protocol_version = 'HTTP/1.1'\n\
             \x20   def do_GET(self):\n\
             \x20       print('got', self.path, flush=True)\n\
             \x20       if self.path == '/slow':\n\
             \x20           time.sleep(1)\n\
             \x20       self.send_response(200)\n\
             \x20       self.send_header('Content-Length', '4')\n\
             \x20       self.end_headers()\n\
             \x20       self.wfile.write(b'done')\n\
             HTTPServer(('', {}), H).serve_forever()\n",
            free_port()
        ),
    )
    .unwrap();
    let connect = |port: u16| {
        let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        BufReader::new(s)
    };
    for idle in [false, true] {
        let mut h = Herd::start(&["-i", "1", "--mode", "shared"], &["python3", s(&app)]);
        h.wait_ready(1);
        let mut c = connect(h.port);
        assert_eq!(keepalive_get(&mut c).unwrap(), (200, "done".into(), false));
        if idle {
            // The server waits for this connection's next request.
            h.signal("TERM");
        } else {
            term_during_slow_request(&h, &mut c);
            let answer = read_answer(&mut c).unwrap();
            assert_eq!(answer, (200, "done".into(), true), "{}", h.log());
        }
        let mut rest = Vec::new();
        let read = c.read_to_end(&mut rest);
        assert!(matches!(read, Ok(0)), "idle={idle}: {read:?} {rest:?}");
        let status = h.wait_exit(T).expect("herd did not stop");
        let log = h.log();
        assert!(status.success(), "{status:?}\n{log}");
        assert!(log.contains("exited with code 0"), "idle={idle}: {log}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Starman (on fd 3 through `SERVER_STARTER_PORT`) and Mojolicious'
/// daemon at a stop in the fd modes, with herd's Perl preload: the answer
/// in flight is given, with `Connection: close`, a request sent on an idle
/// keep-alive connection once the stop began is answered so too, and the
/// worker exits with 0 and without SIGKILL (before, each ended at once on
/// the SIGTERM, and both requests were lost).
#[test]
fn perl_servers_answer_what_they_were_sent_with_connection_close_at_a_stop_in_the_fd_modes() {
    let dir = std::env::temp_dir().join(format!("herd-perl-stop-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("app.psgi"),
        "sub {\n\
         \x20   my $env = shift;\n\
         \x20   print STDERR \"got $env->{PATH_INFO}\\n\";\n\
         \x20   sleep 1 if $env->{PATH_INFO} eq '/slow';\n\
         \x20   [200, ['Content-Length' => 4], ['done']];\n\
         }\n",
    )
    .unwrap();
    // The event loop's `finish` event is its graceful stop's first step.
    std::fs::write(
        dir.join("mojo.pl"),
        "use Mojolicious::Lite;\n\
         Mojo::IOLoop->singleton->on(finish => sub { print STDERR \"finishing\\n\" });\n\
         get '/' => sub { shift->render(text => 'done') };\n\
         get '/slow' => sub {\n\
         \x20   my $c = shift;\n\
         \x20   print STDERR \"got /slow\\n\";\n\
         \x20   $c->render_later;\n\
         \x20   Mojo::IOLoop->timer(1 => sub { $c->render(text => 'done') });\n\
         };\n\
         app->start;\n",
    )
    .unwrap();
    let (psgi, mojo) = (dir.join("app.psgi"), dir.join("mojo.pl"));
    let starman = ["starman", "--workers", "2", s(&psgi)];
    let daemon = ["perl", s(&mojo), "daemon"];
    let server_starter = ["--env", "SERVER_STARTER_PORT=8000=3"];
    // (command, herd's extra flags, the log line that says the stop began:
    // Starman's first process says it as its others get the signal)
    let servers: [(&[&str], &[&str], &str); 2] = [
        (&starman, &server_starter, "Server closing!"),
        (&daemon, &[], "finishing"),
    ];
    for (cmd, extra, stopping) in servers {
        for idle in [false, true] {
            let mut flags = vec!["-i", "1", "--mode", "shared"];
            flags.extend_from_slice(extra);
            let mut h = Herd::start(&flags, cmd);
            h.wait_ready(1);
            let conn = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(10)))
                .unwrap();
            let mut c = BufReader::new(conn);
            assert_eq!(keepalive_get(&mut c).unwrap(), (200, "done".into(), false));
            if idle {
                h.signal("TERM");
                assert!(h.wait_log(stopping, T), "{}", h.log());
                c.get_mut()
                    .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                    .unwrap();
            } else {
                term_during_slow_request(&h, &mut c);
            }
            let answer = read_answer(&mut c);
            assert!(
                matches!(&answer, Ok((200, body, true)) if body == "done"),
                "{} idle={idle}: {answer:?}\n{}",
                cmd[0],
                h.log()
            );
            let mut rest = Vec::new();
            let read = c.read_to_end(&mut rest);
            assert!(
                matches!(read, Ok(0)),
                "{} idle={idle}: {read:?} {rest:?}",
                cmd[0]
            );
            let status = h.wait_exit(T).expect("herd did not stop");
            let log = h.log();
            assert!(status.success(), "{status:?}\n{log}");
            assert!(
                log.contains("exited with code 0"),
                "{} idle={idle}: {log}",
                cmd[0]
            );
            assert!(!log.contains("SIGKILL"), "{} idle={idle}: {log}", cmd[0]);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Two workers of `python3 -m http.server` (threaded) on the shared
/// socket: each connection wakes both from select(), one accepts it and
/// the other waited in accept() for the next, through the SIGTERM too, until
/// herd's SIGKILL 5 s later (before that, the threaded server died of the
/// SIGTERM at once). Now both stop by themselves at once, with 0.
#[test]
fn threaded_python_http_servers_on_the_shared_socket_stop_at_once_with_0() {
    let dir = std::env::temp_dir().join(format!("herd-pyshared-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("file.txt"), "a file").unwrap();
    let port = free_port().to_string();
    let cmd = [
        "python3",
        "-m",
        "http.server",
        &port,
        "--directory",
        s(&dir),
    ];
    let mut h = Herd::start(&["-i", "2", "--mode", "shared"], &cmd);
    h.wait_ready(2);
    for _ in 0..4 {
        assert_eq!(h.get("/file.txt").unwrap(), (200, "a file".to_string()));
    }
    let asked = std::time::Instant::now();
    h.signal("TERM");
    let status = h.wait_exit(T).expect("herd did not stop");
    let log = h.log();
    assert!(status.success(), "{status:?}\n{log}");
    assert!(!log.contains("SIGKILL"), "{log}");
    assert_eq!(log.matches("exited with code 0").count(), 2, "{log}");
    assert!(asked.elapsed() < Duration::from_secs(3), "{log}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// As `python_scripts_that_bind_their_port_serve_on_herds_socket_in_the_fd_modes`,
/// for a Python program that is not a script, as long as it is
/// the process herd started (after any exec: a module, a console script,
/// pyenv's shim): fd 3 is that process's (`LISTEN_PID`). A Python helper
/// that another program starts (here a Node app, before it listens) binds
/// the port it asks for.
#[test]
fn python_programs_herd_starts_bind_herds_socket_in_the_fd_modes_and_helpers_do_not() {
    let dir = std::env::temp_dir().join(format!("herd-pyprog-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("file.txt"), "a file").unwrap();
    let (own, helper) = (free_port(), free_port());
    std::fs::write(
        dir.join("app.js"),
        format!(
            "const id = Number(process.env.HERD_WORKER_ID);\n\
             const code = 'import socket; s = socket.socket(); s.bind((\"127.0.0.1\", {helper})); print(s.getsockname()[1])';\n\
             const bound = id ? 'none' : require('child_process').spawnSync('python3', ['-c', code]).stdout.toString().trim();\n\
             require('http').createServer((q, r) => r.end(`helper=${{bound}} from worker ${{id}} (pid ${{process.pid}})`)).listen(3000);\n"
        ),
    )
    .unwrap();
    let own_s = own.to_string();
    let module = [
        "python3",
        "-m",
        "http.server",
        &own_s,
        "--directory",
        s(&dir),
    ];
    // A shell that execs it stands for a console script's shim (pyenv's).
    let shim = format!("exec {}", module.join(" "));
    let node = dir.join("app.js");
    let commands = [&module[..], &["sh", "-c", &shim], &["node", s(&node)]];
    for mode in ["shared", "reuseport"] {
        for (i, cmd) in commands.iter().enumerate() {
            let h = Herd::start(&["-i", "2", "--mode", mode], cmd);
            h.wait_ready(2);
            if i < 2 {
                assert_eq!(
                    h.get("/file.txt").unwrap(),
                    (200, "a file".to_string()),
                    "{mode} {cmd:?}"
                );
                let note = format!("the app asks for port {own} in its code");
                assert!(h.log().contains(&note), "{mode} {cmd:?}: {}", h.log());
            } else {
                h.worker_pids(2);
                let want = format!("helper={helper} from worker 0");
                assert!(
                    wait_until(T, || h.get("/").is_ok_and(|(_, b)| b.starts_with(&want))),
                    "{mode}: worker 0's helper binds the port it asks for\n{}",
                    h.log()
                );
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn instances_max_honours_the_affinity_mask() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let h = Herd::spawn(
        std::process::Command::new("taskset").args([
            "-c", "0", HERD, "run", "--listen", &listen, "-i", "max", "--", DEMO,
        ]),
        port,
    );
    h.wait_ready(1);
    assert!(h.log().contains(": 1 worker, proxy mode"), "{}", h.log());
}

#[test]
fn instances_minus_n_leaves_n_cpus_free() {
    // PM2's `-i -1`: all usable CPUs but one; two CPUs give one worker.
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let h = Herd::spawn(
        std::process::Command::new("taskset").args([
            "-c", "0,1", HERD, "run", "--listen", &listen, "-i", "-1", "--", DEMO,
        ]),
        port,
    );
    h.wait_ready(1);
    assert!(h.log().contains(": 1 worker, proxy mode"), "{}", h.log());
}

/// A cgroup with a CPU quota of half a CPU, where this machine allows
/// creating one (root, writable cgroup v1 `cpu` or v2 controller).
fn half_cpu_cgroup() -> Option<(PathBuf, PathBuf)> {
    let name = format!("herd-test-{}", std::process::id());
    let v1 = PathBuf::from("/sys/fs/cgroup/cpu").join(&name);
    if std::fs::create_dir(&v1).is_ok() {
        if std::fs::write(v1.join("cpu.cfs_quota_us"), "50000").is_ok() {
            return Some((v1.clone(), v1.join("cgroup.procs")));
        }
        let _ = std::fs::remove_dir(&v1);
    }
    let v2 = PathBuf::from("/sys/fs/cgroup").join(&name);
    if std::fs::create_dir(&v2).is_ok() {
        if std::fs::write(v2.join("cpu.max"), "50000 100000").is_ok() {
            return Some((v2.clone(), v2.join("cgroup.procs")));
        }
        let _ = std::fs::remove_dir(&v2);
    }
    None
}

#[test]
fn instances_max_honours_a_cgroup_cpu_quota() {
    let Some((dir, procs)) = half_cpu_cgroup() else {
        eprintln!("not checked here: cannot create a cgroup with a CPU quota (needs root)");
        return;
    };
    let port = free_port();
    let script = format!(
        "echo $$ > {} && exec {HERD} run --listen 127.0.0.1:{port} -i max -- {DEMO}",
        procs.display()
    );
    let mut h = Herd::spawn(std::process::Command::new("sh").args(["-c", &script]), port);
    h.wait_ready(1);
    assert!(h.log().contains(": 1 worker, proxy mode"), "{}", h.log());
    assert_eq!(h.get("/").unwrap().0, 200);
    h.signal("TERM");
    h.wait_exit(T).expect("master did not stop");
    // The cgroup can be removed once its processes are gone.
    assert!(wait_until(T, || std::fs::remove_dir(&dir).is_ok()));
}

#[test]
fn config_file_is_read_and_flags_override_it() {
    let dir = std::env::temp_dir().join(format!("herd-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("herd.toml");
    let port = free_port();
    std::fs::write(
        &cfg,
        format!(
            "name = \"fromfile\"\nlisten = \"127.0.0.1:{port}\"\ninstances = 3\nmode = \"shared\"\n\
             command = [\"{DEMO}\"]\n[env]\nGREETING = \"hi\"\n"
        ),
    )
    .unwrap();
    let h = Herd::spawn(
        herd_cmd().args(["run", "--config", cfg.to_str().unwrap(), "-i", "2"]),
        port,
    );
    h.wait_ready(2);
    let log = h.log();
    assert!(log.contains("fromfile: 2 workers, shared mode"), "{log}");
    let (_, body) = h.get("/env").unwrap();
    assert!(body.contains("HERD_NAME=fromfile"), "{body}");
    drop(h);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Every bad input: one line on stderr, a non-zero exit, no panic.
fn assert_one_line_error(args: &[&str], expect: &str) {
    let (code, err) = run_fail(args);
    assert_ne!(code, 0, "{args:?} succeeded");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert_eq!(err.trim_end().lines().count(), 1, "{args:?} gave:\n{err}");
    assert!(
        err.contains(expect),
        "{args:?}: expected {expect:?} in {err:?}"
    );
}

#[test]
fn bad_input_gets_one_clear_line() {
    assert_one_line_error(
        &["logs", "no-such-cluster"],
        "no cluster named \"no-such-cluster\" is running or has logged to ",
    );
    // The cause is said once, not once per layer that carries it.
    assert_one_line_error(
        &["start", "no/such/ecosystem.config.js"],
        "herd: error: cannot read no/such/ecosystem.config.js: No such file or directory (os error 2)\n",
    );
    assert_one_line_error(
        &["run", "--watch=no/such/dir", "--", DEMO],
        "--watch no/such/dir: no such file or directory",
    );
    // npm's Node would take the connections meant for the app, which then
    // never became ready: a crash loop.
    assert_one_line_error(
        &["run", "--mode", "dispatch", "--", "npm", "start"],
        "npm is a Node program that would take dispatch mode's channel",
    );
    // A time-out of nothing would end at once what it times.
    assert_one_line_error(
        &["run", "--idle-timeout", "0s", "--", DEMO],
        "--idle-timeout 0: keep-alive connections would close",
    );
    assert_one_line_error(
        &["run", "--ready-timeout=0", "--", DEMO],
        "--ready-timeout 0: every worker would be killed before it could listen; give it a length (default 30s)",
    );
    // PM2's `pm2 env ID` takes an id; a cluster's name there is told where it goes.
    assert_one_line_error(
        &["env", "api"],
        "not a worker id (0, 1, …); a cluster is named with --name: herd env 0 --name api",
    );
    // The --interpreter of `--interpreter '' app.js` is missing, not the command.
    assert_one_line_error(
        &["run", "--interpreter", "", "app.js"],
        "a value is required for '--interpreter <PROGRAM>'",
    );
    assert_one_line_error(
        &["run", "--watch", "--watch-ignore", "a[", "--", DEMO],
        "--watch-ignore \"a[\"",
    );
    assert_one_line_error(
        &["run", "--watch", "--upstream", "127.0.0.1:1"],
        "--watch needs a command",
    );
    assert_one_line_error(
        &["run", "--admin", "0.0.0.0:9100", "--", DEMO],
        "is not a loopback address: give --admin-token",
    );
    assert_one_line_error(
        &["run", "--mode", "bogus", "--", DEMO],
        "invalid value 'bogus'",
    );
    assert_one_line_error(
        &["run", "--bogus", "--", DEMO],
        "unexpected argument '--bogus'",
    );
    // PM2 habits get the way out in the same line (issue 18, item 10).
    assert_one_line_error(
        &["run", "--mode", "cluster", "--", DEMO],
        "valid: proxy, reuseport, shared, dispatch, fork; PM2's cluster mode is herd's default",
    );
    assert_one_line_error(&["run", "-w", "4", "--", DEMO], "-i N (--instances)");
    assert_one_line_error(
        &["run", "--mode", "fork", "--listen", "9000", "--", DEMO],
        "in fork mode herd opens no port",
    );
    assert_one_line_error(&["stauts"], "`status`");
    // Limits past any use, which would overflow a deadline or exhaust
    // memory at the first request or stop, are refused at the start.
    assert_one_line_error(
        &[
            "run",
            "--drain-timeout",
            "18446744073709551615s",
            "--",
            DEMO,
        ],
        "18446744073709551615s is too long: at most 3650d",
    );
    assert_one_line_error(
        &["run", "--max-headers", "4294967295", "--", DEMO],
        "--max-headers 4294967295: 1 to 32767",
    );
    assert_one_line_error(
        &["run", "--max-headers", "0", "--", DEMO],
        "--max-headers 0: 1 to 32767",
    );
    // clap lists what is missing on lines of their own: kept on the one.
    assert_one_line_error(
        &["send"],
        "the following required arguments were not provided: <[HOST/]ID>, <MESSAGE>",
    );
    // PM2 habits: herd's flags after the script are not passed on unseen,
    // and a missing script file is named.
    assert_one_line_error(
        &["run", DEMO, "--listen", "9000"],
        "--listen comes after the command",
    );
    assert_one_line_error(&["run", "nope.js"], "script not found: nope.js");
    // PM2 flags herd has no use for say what herd does instead.
    assert_one_line_error(
        &["start", "app.js", "--namespace", "web"],
        "unexpected argument '--namespace' found; herd has no namespaces",
    );
    assert_one_line_error(
        &["start", "app.js", "--exp-backoff-restart-delay=100"],
        "herd always backs off: --restart-delay DUR",
    );
    assert_one_line_error(&["kill"], "`herd stop all` ends every one");
    assert_one_line_error(
        &["deploy", "ecosystem.config.js", "production", "update"],
        "PM2's deploy (a git pull and a reload over SSH) is left to your CI",
    );
    // PM2's --uid with a user that does not exist.
    assert_one_line_error(
        &["run", "--uid", "no-such-user-xyz", "--", DEMO],
        "--user no-such-user-xyz: no such user",
    );
    assert_one_line_error(&["init"], "herd reads PM2's ecosystem files as they are");
    assert_one_line_error(
        &["install", "pm2-logrotate"],
        "herd has no modules: what pm2-logrotate does is built in (--log-max-size, --log-keep",
    );
    assert_one_line_error(
        &["start", "app.js", "--no-vizion"],
        "unexpected argument '--no-vizion' found; herd has no PM2 agent",
    );
    assert_one_line_error(
        &["flush", "no-such-cluster-xyz"],
        "no log to flush: no cluster named \"no-such-cluster-xyz\"",
    );
    // A missing script: one line before anything starts (issue 18, item 9).
    assert_one_line_error(
        &["run", "--", "node", "nope.js"],
        "script not found: nope.js",
    );
    assert_one_line_error(&["run", "--instance", "2", "--", DEMO], "`--instances`");
    assert_one_line_error(
        &["run", "-i", "0", "--", DEMO],
        "positive number, `max`, or -N (all CPUs but N); PM2's 0 is `max` here",
    );
    assert_one_line_error(&["run", "-i", "abc", "--", DEMO], "positive number");
    assert_one_line_error(&["run", "-i", "100000", "--", DEMO], "at most 4096");
    assert_one_line_error(&["run", "--listen", "99999", "--", DEMO], "not PORT");
    assert_one_line_error(
        &["run", "--kill-timeout", "3000", "--", DEMO],
        "a duration needs a unit: 3000ms (PM2's numbers are milliseconds) or 3000s",
    );
    assert_one_line_error(&["run", "--kill-timeout", "5x", "--", DEMO], "500ms");
    assert_one_line_error(&["run"], "no command given");
    assert_one_line_error(
        &["run", "--", "no-such-program-xyz"],
        "command not found: no-such-program-xyz",
    );
    let plain = std::env::temp_dir().join(format!("herd-noexec-{}", std::process::id()));
    std::fs::write(&plain, "not a program").unwrap();
    assert_one_line_error(
        &["run", "--", plain.to_str().unwrap()],
        "not an executable file",
    );
    std::fs::remove_file(&plain).unwrap();
    assert_one_line_error(
        &["run", "--cwd", "/no/such/dir", "--", DEMO],
        "not a directory",
    );
    assert_one_line_error(&["frobnicate"], "unrecognized subcommand");
    assert_one_line_error(
        &["run", "--mode", "dispatch", "--balance", "ewma", "--", DEMO],
        "--balance ewma needs per-request information",
    );
    assert_one_line_error(
        &[
            "run",
            "--mode",
            "shared",
            "--balance",
            "least-conn",
            "--",
            DEMO,
        ],
        "--balance needs --mode proxy",
    );
    assert_one_line_error(
        &["run", "--mode", "reuseport", "--accept-proxy", "--", DEMO],
        "--accept-proxy needs --mode proxy",
    );
    assert_one_line_error(
        &["run", "--send-proxy", "--", DEMO],
        "--send-proxy is for --protocol tcp",
    );
    assert_one_line_error(
        &["run", "--real-ip-from", "10.0.0.0/33", "--", DEMO],
        "\"10.0.0.0/33\" is not an address or a network",
    );
    assert_one_line_error(
        &["run", "--accept-proxy=yes", "--", DEMO],
        "\"yes\" is not an address or a network (10.0.0.0/8, 192.0.2.1, 2001:db8::/32); or true, false",
    );
    assert_one_line_error(
        &["run", "--rate-limit", "10/h", "--", DEMO],
        "\"10/h\" is not a rate: write N/s or N/m",
    );
    assert_one_line_error(
        &[
            "run",
            "--rate-limit",
            "10/s",
            "--protocol",
            "tcp",
            "--",
            DEMO,
        ],
        "--rate-limit counts or reads HTTP requests: it is for --protocol http",
    );
    assert_one_line_error(
        &[
            "run",
            "--mode",
            "dispatch",
            "--rate-limit",
            "10/s",
            "--",
            DEMO,
        ],
        "--rate-limit needs --mode proxy",
    );
    assert_one_line_error(
        &["run", "--real-ip-header", "X-Real-IP", "--", DEMO],
        "--real-ip-header needs --real-ip-from",
    );
    assert_one_line_error(
        &[
            "run",
            "--real-ip-from",
            "10.0.0.1",
            "--real-ip-header",
            "X Real",
            "--",
            DEMO,
        ],
        "--real-ip-header \"X Real\" is not a header name",
    );
    assert_one_line_error(
        &[
            "run",
            "--real-ip-from",
            "10.0.0.1",
            "--protocol",
            "tcp",
            "--",
            DEMO,
        ],
        "--real-ip-from counts or reads HTTP requests: it is for --protocol http",
    );
    assert_one_line_error(
        &[
            "run",
            "--mode",
            "shared",
            "--real-ip-from",
            "10.0.0.1",
            "--",
            DEMO,
        ],
        "--real-ip-from needs --mode proxy",
    );
}

#[test]
fn port_in_use_is_an_error_before_any_worker_starts() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    for mode in MODES {
        let (code, err) = run_fail(&["run", "--listen", &addr, "--mode", mode, "--", DEMO]);
        assert_ne!(code, 0);
        assert_eq!(err.trim_end().lines().count(), 1, "{mode}: {err}");
        assert!(
            err.contains("cannot listen on") && err.contains("in use"),
            "{err}"
        );
    }
    // Nor can a second herd share a port through SO_REUSEPORT.
    for mode in MODES {
        let first = Herd::start(&["-i", "1", "--mode", mode], &[DEMO]);
        first.wait_ready(1);
        let addr = format!("127.0.0.1:{}", first.port);
        let (code, err) = run_fail(&["run", "--listen", &addr, "--mode", mode, "--", DEMO]);
        assert_ne!(code, 0, "{mode}: a second herd bound the same port");
        assert!(err.contains("in use"), "{mode}: {err}");
    }
}

#[test]
fn malformed_config_names_the_line() {
    let dir = std::env::temp_dir().join(format!("herd-badcfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(&cfg, "mode = \"proxy\"\ninstances = \n").unwrap();
    let (code, err) = run_fail(&["run", "--config", cfg.to_str().unwrap(), "--", DEMO]);
    assert_ne!(code, 0);
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.contains("bad.toml:2:"), "{err}");
    std::fs::write(&cfg, "mode = \"fast\"\n").unwrap();
    let (_, err) = run_fail(&["run", "--config", cfg.to_str().unwrap(), "--", DEMO]);
    assert!(
        err.contains("bad.toml:1:") && err.contains("proxy"),
        "{err}"
    );
    let (_, err) = run_fail(&["run", "--config", "/no/such.toml", "--", DEMO]);
    assert!(err.contains("cannot read /no/such.toml"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_worker_listening_on_ipv6_loopback_only_is_proxied_there() {
    // As a Node app binding `localhost` does where that resolves to ::1.
    let script = r#"
import os, socket
from http.server import HTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        body = b"hello over ::1\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
class V6(HTTPServer):
    address_family = socket.AF_INET6
V6(("::1", int(os.environ["PORT"])), H).serve_forever()
"#;
    let h = Herd::start(
        &["-i", "1", "--ready-timeout", "10s"],
        &["python3", "-c", script],
    );
    h.wait_ready(1);
    let (status, body) = h.get("/").unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, "hello over ::1\n");
}

/// Whether `cmd` runs here (the Python servers come from PyPI; `.ci/run`
/// installs them).
fn installed(cmd: &str) -> bool {
    std::process::Command::new(cmd)
        .arg("--version")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn the_readmes_python_and_perl_commands_serve() {
    // Issue 18, item 11: every third-party command the README shows runs.
    if !installed("gunicorn") || !installed("uvicorn") || !installed("flask") {
        panic!(
            "gunicorn, uvicorn and flask are needed (pip install gunicorn uvicorn flask; .ci/run does)"
        );
    }
    let mojolicious = std::process::Command::new("perl")
        .args(["-MMojolicious", "-e1"])
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        mojolicious,
        "Mojolicious is needed (Debian's libmojolicious-perl; .ci/run installs it)"
    );
    let dir = asgi_app_dir("wsgi");
    std::fs::write(
        dir.join("wsgi.py"),
        "def app(environ, start_response):\n    start_response('200 OK', [('Content-Type', 'text/plain')])\n    return [b'wsgi ok']\n",
    )
    .unwrap();
    std::fs::write(
        dir.join("fl.py"),
        "from flask import Flask\napp = Flask(__name__)\n@app.get('/')\ndef hi():\n    return 'flask ok'\n",
    )
    .unwrap();
    write_mojo_app(&dir);
    let cwd = dir.to_string_lossy().into_owned();
    // Plain `uvicorn app:app`, `flask run` and a Mojolicious daemon, two
    // workers: each would bind its framework's default port but for
    // UVICORN_PORT, UVICORN_FD, FLASK_RUN_PORT and MOJO_LISTEN.
    let mojo: &[&str] = &["perl", "mojo.pl", "daemon"];
    let plain: [(&str, &[&str], &str); 7] = [
        ("proxy", &["uvicorn", "asgi:app"], "asgi ok"),
        ("shared", &["uvicorn", "asgi:app"], "asgi ok"),
        ("reuseport", &["uvicorn", "asgi:app"], "asgi ok"),
        ("proxy", &["flask", "--app", "fl", "run"], "flask ok"),
        ("proxy", mojo, "mojo ok"),
        ("shared", mojo, "mojo ok"),
        ("reuseport", mojo, "mojo ok"),
    ];
    for (mode, cmd, want) in plain {
        let h = Herd::start(&["-i", "2", "--mode", mode, "--cwd", &cwd], cmd);
        h.wait_ready(2);
        for _ in 0..4 {
            let got = h.get("/");
            assert!(
                matches!(&got, Ok((200, b)) if b.contains(want)),
                "{mode} {cmd:?}: {got:?}\n{}",
                h.log()
            );
        }
        assert!(!h.log().contains("already in use"), "{}", h.log());
    }
    let cases: [(&str, &[&str], &str); 6] = [
        ("shared", &["gunicorn", "wsgi:app"], "wsgi ok"),
        ("reuseport", &["gunicorn", "wsgi:app"], "wsgi ok"),
        ("proxy", &["gunicorn", "wsgi:app"], "wsgi ok"),
        ("shared", &["uvicorn", "--fd", "3", "asgi:app"], "asgi ok"),
        (
            "reuseport",
            &["uvicorn", "--fd", "3", "asgi:app"],
            "asgi ok",
        ),
        (
            "proxy",
            &["sh", "-c", "exec uvicorn --port $PORT asgi:app"],
            "asgi ok",
        ),
    ];
    for (mode, cmd, want) in cases {
        let h = Herd::start(&["-i", "1", "--mode", mode, "--cwd", &cwd], cmd);
        let mut body = String::new();
        let served = wait_until(T, || {
            if let Ok((200, b)) = h.get("/") {
                body = b;
                return true;
            }
            false
        });
        assert!(
            served && body.contains(want),
            "{mode} {cmd:?}: {body:?}\n{}",
            h.log()
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Deno: `Deno.serve()` with a port written in the code, and `deno serve`
/// on an entry file, answer on each worker's port in proxy mode (Deno's own
/// `DENO_SERVE_ADDRESS`, which needs no permission beyond `--allow-net`),
/// so two workers serve on herd's port, and a reload swaps them.
#[test]
fn deno_serve_answers_on_the_workers_port_whatever_its_code_names() {
    std::process::Command::new("deno")
        .arg("--version")
        .output()
        .expect("deno (.ci/run installs it from npm)");
    let dir = std::env::temp_dir().join(format!("herd-deno-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let own = free_port();
    let srv = dir.join("srv.ts");
    std::fs::write(
        &srv,
        format!("Deno.serve({{ port: {own} }}, () => new Response('srv ' + Deno.pid));\n"),
    )
    .unwrap();
    let main = dir.join("main.ts");
    std::fs::write(
        &main,
        "export default { fetch: () => new Response('main ' + Deno.pid) };\n",
    )
    .unwrap();
    for (sub, file, want) in [("run", &srv, "srv "), ("serve", &main, "main ")] {
        let n = name("deno");
        let cmd = ["deno", sub, "--allow-net", s(file)];
        let h = Herd::start(&["-i", "2", "--name", &n], &cmd);
        h.wait_ready(2);
        let answers = |h: &Herd| {
            let mut got = std::collections::BTreeSet::new();
            wait_until(T, || {
                if let Ok((200, b)) = h.get("/") {
                    got.insert(b);
                }
                got.len() >= 2
            });
            got
        };
        let before = answers(&h);
        assert_eq!(before.len(), 2, "{sub}: {before:?}\n{}", h.log());
        assert!(before.iter().all(|b| b.starts_with(want)), "{before:?}");
        assert!(
            http_get(own, "/").is_err(),
            "{sub}: nothing on the code's port"
        );
        ok(&herd(&["reload", "--name", &n]));
        let after = answers(&h);
        assert!(after.is_disjoint(&before), "{sub}: {before:?} {after:?}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_script_runs_with_the_interpreter_its_extension_names() {
    // `herd start app.js`, as `pm2 start app.js`: no `node` needed, and
    // herd's options may follow the script, as PM2's do.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/node/hello.js");
    let h = Herd::start(&["-i", "1"], &[script]);
    h.wait_ready(1);
    let (status, body) = h.get("/").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(h.log().contains("hello: 1 worker"), "{}", h.log());
    // It listens on its PORT, as herd asks: no hint about a port of its own.
    assert!(!h.log().contains("asks for port"), "{}", h.log());
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let pm2_order = Herd::spawn(
        herd_cmd().args([
            "run", script, "-i", "1", "--listen", &listen, "--name", "pm2ish",
        ]),
        port,
    );
    pm2_order.wait_ready(1);
    assert!(
        pm2_order.log().contains("pm2ish: 1 worker"),
        "{}",
        pm2_order.log()
    );
    assert_eq!(pm2_order.get("/").unwrap().0, 200);
}

#[test]
fn a_stop_closes_idle_keep_alive_connections_at_once() {
    // A long drain time-out: a stop that waited on the idle connection
    // would take it whole.
    let mut h = Herd::start(&["-i", "1", "--drain-timeout", "30s"], &[DEMO]);
    h.wait_ready(1);
    let s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut idle = BufReader::new(s);
    let (code, _, _) = keepalive_get(&mut idle).unwrap();
    assert_eq!(code, 200);
    let asked = std::time::Instant::now();
    h.signal("TERM");
    let mut rest = Vec::new();
    let _ = idle.read_to_end(&mut rest);
    assert!(rest.is_empty(), "{rest:?}");
    assert!(
        h.wait_exit(Duration::from_secs(30))
            .is_some_and(|s| s.success())
    );
    assert!(
        asked.elapsed() < Duration::from_secs(10),
        "the stop waited {:?} on an idle connection",
        asked.elapsed()
    );
}

/// In fork mode herd serves no port: a Node app's `listen()` keeps the
/// port it names, and the log says nothing about serving it elsewhere.
#[test]
fn fork_mode_leaves_a_node_apps_port_alone_and_says_nothing_of_it() {
    let own = free_port();
    let js = format!("require('http').createServer((q, r) => r.end('own')).listen({own});");
    let h = Herd::spawn(
        herd_cmd()
            .args(["run", "--mode", "fork", "--name", &name("forkport"), "--"])
            .args(["node", "-e", &js]),
        0,
    );
    h.wait_ready(1);
    assert_eq!(http_get(own, "/").ok(), Some((200, "own".to_string())));
    assert!(!h.log().contains("asks for port"), "{}", h.log());
}

/// Fork mode (PM2's): a program that serves no port runs as it is, with its
/// own `PORT` untouched, and a reload or restart stops each worker before
/// its successor starts, so even one that binds a fixed port of its own
/// (two at once would fail) is reloaded and restarted. Written for PM2, it
/// stops on SIGINT: `--kill-signal INT`.
#[test]
fn fork_mode_runs_programs_as_they_are_and_stops_each_worker_before_its_successor() {
    const PROGRAM: &str = r#"
import os, socket, time
me = os.environ['HERD_WORKER_ID'] + ' ' + str(os.getpid())
def say(what):
    with open(os.environ['JOURNAL'], 'a') as f:
        f.write(what + ' ' + me + '\n')
s = socket.socket()
s.bind(('127.0.0.1', int(os.environ['PORT'])))
s.listen()
say('start port=%s listen=%s' % (os.environ['PORT'], os.environ.get('HERD_LISTEN', '-')))
try:
    while True:
        time.sleep(1)
except KeyboardInterrupt:  # SIGINT, as PM2 stops a program
    say('stop')
"#;
    let journal = std::env::temp_dir().join(format!("herd-fork-{}", std::process::id()));
    let _ = std::fs::remove_file(&journal);
    let read = || std::fs::read_to_string(&journal).unwrap_or_default();
    let port = free_port().to_string();
    let cluster = name("fork");
    let h = Herd::spawn(
        herd_cmd()
            .env("PORT", &port)
            .env("JOURNAL", &journal)
            .args(["run", "--mode", "fork", "--kill-signal", "INT"])
            .args(["--name", &cluster, "--"])
            .args(["python3", "-c", PROGRAM]),
        0,
    );
    h.wait_ready(1);
    assert!(
        h.log().contains("1 worker, fork mode (no port)"),
        "{}",
        h.log()
    );
    assert!(
        wait_until(T, || read()
            .starts_with(&format!("start port={port} listen=- 0 "))),
        "its own PORT, no HERD_LISTEN: {}",
        read()
    );
    let said = ok(&herd(&["reload", &cluster]));
    assert!(said.contains("reloaded 1 worker"), "{said}\n{}", h.log());
    let said = ok(&herd(&["restart", &cluster]));
    assert!(said.contains("restarted 1 worker"), "{said}");
    assert!(
        wait_until(T, || read().lines().count() == 5),
        "{}\n{}",
        read(),
        h.log()
    );
    // Each stop before the next start: start A, stop A, start B, stop B, start C.
    let words: Vec<Vec<String>> = read()
        .lines()
        .map(|l| l.split(' ').map(str::to_string).collect())
        .collect();
    let kinds: Vec<&str> = words.iter().map(|w| w[0].as_str()).collect();
    assert_eq!(
        kinds,
        ["start", "stop", "start", "stop", "start"],
        "{}",
        read()
    );
    let pid = |i: usize| words[i].last().cloned().unwrap_or_default();
    assert!(pid(0) == pid(1) && pid(2) == pid(3) && pid(0) != pid(2) && pid(2) != pid(4));
    assert!(!h.log().contains("Address already in use"), "{}", h.log());
    let listed = ok(&herd(&["list"]));
    let row = listed
        .lines()
        .find(|l| l.starts_with(&cluster))
        .unwrap_or("");
    assert!(row.contains(" fork ") && row.contains(" - "), "{listed}");
    // Deploys split traffic, which fork mode has none of.
    let refused = herd(&["deploy", "--name", &cluster, "--canary", "10"]);
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        !refused.status.success() && err.contains("fork mode has no traffic"),
        "{err}"
    );
    let _ = std::fs::remove_file(&journal);
}
