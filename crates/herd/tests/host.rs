//! herd in its host: a subreaper that reaps and cleans up what workers
//! leave behind, and a container's PID 1 (in a PID namespace of its own,
//! made with `unshare`) that leaves no zombie.

mod common;

use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// Children of `pid` (every thread's), with their state letter.
fn children(pid: u32) -> Vec<(u32, char, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let Ok(list) = std::fs::read_to_string(t.path().join("children")) else {
            continue;
        };
        for c in list
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{c}/stat")) else {
                continue;
            };
            let name = stat
                .split_once('(')
                .and_then(|(_, r)| r.rsplit_once(')'))
                .map_or("", |(n, _)| n)
                .to_string();
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, r)| r.trim_start().chars().next())
                .unwrap_or('?');
            out.push((c, state, name));
        }
    }
    out
}

fn read_pid(path: &std::path::Path) -> u32 {
    let mut pid = 0;
    assert!(
        wait_until(T, || {
            pid = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            pid != 0
        }),
        "{} was not written",
        path.display()
    );
    pid
}

#[test]
fn what_a_worker_leaves_behind_is_reaped_or_killed_with_it() {
    let dir = std::env::temp_dir().join(format!("herd-reaper-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (short, daemon) = (dir.join("short"), dir.join("daemon"));
    // Each subshell exits at once, so its child is orphaned and comes to
    // herd: a sleep that ends soon, and one that left the worker's process
    // group (`setsid`, as daemons do).
    let script = format!(
        "(sleep 0.3 & echo $! > {s}); (setsid sleep 1000 & echo $! > {d}); exec {DEMO}",
        s = short.display(),
        d = daemon.display()
    );
    let h = Herd::start(&["-i", "1"], &["sh", "-c", &script]);
    h.wait_ready(1);
    let master = h.child.id();
    let (short_pid, daemon_pid) = (read_pid(&short), read_pid(&daemon));
    assert!(
        wait_until(T, || children(master).iter().any(|c| c.0 == daemon_pid)),
        "the daemonized sleep was not reparented to herd: {:?}",
        children(master)
    );
    // The short one exits; herd, its parent now, reaps it: no zombie.
    assert!(
        wait_until(T, || !alive(short_pid)),
        "pid {short_pid} stays a zombie: {:?}",
        children(master)
    );
    // Replacing the worker kills what it left behind, though it left the group.
    let _ = std::fs::remove_file(&daemon);
    let out = herd(&["reload", "--name", &status_name(&h)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        wait_until(T, || !alive(daemon_pid)),
        "the old worker's daemon {daemon_pid} survived the reload"
    );
    // The new worker's is killed when the cluster stops.
    let next = read_pid(&daemon);
    drop(h);
    assert!(
        wait_until(T, || !alive(next)),
        "{next} outlived the cluster"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The name `herd run` derived (the only cluster this test started).
fn status_name(h: &Herd) -> String {
    let log = h.log();
    log.split(": 1 worker")
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("")
        .to_string()
}

#[test]
fn as_pid_1_of_a_pid_namespace_herd_leaves_no_zombie() {
    let ok = Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "true"])
        .stdin(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        eprintln!("skipped: this machine does not allow PID namespaces (unshare --pid)");
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    // Orphans, as `docker run herd …` would make them: each subshell exits
    // and leaves a short sleep to PID 1.
    let script = format!("for i in 1 2 3 4 5; do (sleep 0.2 &); done; exec {DEMO}");
    let mut cmd = Command::new("unshare");
    cmd.args([
        "--pid",
        "--fork",
        "--mount-proc",
        "--kill-child",
        HERD,
        "run",
    ])
    .args(["--listen", &listen, "-i", "2", "--", "sh", "-c", &script]);
    let h = Herd::spawn(&mut cmd, port);
    h.wait_ready(2);
    // unshare's child is herd, PID 1 inside.
    let mut herd_pid = 0;
    assert!(wait_until(T, || {
        herd_pid = children(h.child.id()).first().map_or(0, |c| c.0);
        herd_pid != 0
    }));
    assert_eq!(h.get("/").unwrap().0, 200);
    // Ten sleeps came to PID 1 and ended: none is left, not even as a zombie.
    assert!(
        wait_until(T, || !children(herd_pid).iter().any(|c| c.2 == "sleep")),
        "left under PID 1: {:?}",
        children(herd_pid)
    );
    assert!(
        children(herd_pid).iter().all(|c| c.1 != 'Z'),
        "{:?}",
        children(herd_pid)
    );
    // docker stop: SIGTERM to PID 1 stops the cluster gracefully.
    signal(herd_pid, "TERM");
    let mut h = h;
    let status = h
        .wait_exit(T)
        .expect("herd, PID 1, did not stop on SIGTERM");
    assert!(status.success(), "{status:?}\n{}", h.log());
    assert!(h.log().contains("stopped"), "{}", h.log());
}

/// `systemd-socket-activate` (from Debian's systemd) holds the port and
/// starts herd on the first connection, passing the socket as fd 3.
fn activated(mode: &str) -> (Herd, u16) {
    let port = free_port();
    let mut cmd = Command::new("systemd-socket-activate");
    cmd.args(["-l", &format!("127.0.0.1:{port}"), HERD, "run"])
        .args([
            "--mode",
            mode,
            "-i",
            "2",
            "--name",
            &name(&format!("act-{mode}")),
            "--",
            DEMO,
        ]);
    let h = Herd::spawn(&mut cmd, port);
    (h, port)
}

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

#[test]
fn under_socket_activation_herd_serves_on_the_socket_it_was_given() {
    if !have("systemd-socket-activate") {
        panic!("this test needs systemd-socket-activate (apt-get install systemd)");
    }
    for mode in ["proxy", "shared", "dispatch"] {
        let (h, port) = activated(mode);
        // The first connection starts herd; it is answered once a worker is up.
        let mut first = None;
        assert!(wait_until(T, || {
            first = http_get(port, "/").ok();
            first.is_some()
        }));
        let (code, body) = first.unwrap_or_default();
        assert_eq!(code, 200, "{mode}: {body}\n{}", h.log());
        assert!(
            h.wait_log("(the socket systemd passed)", T),
            "{mode}: {}",
            h.log()
        );
        for _ in 0..10 {
            assert_eq!(http_get(port, "/").unwrap().0, 200, "{mode}");
        }
    }
    // Reuseport mode needs sockets of its own on the port: only with
    // ReusePort=yes on the passed one, which systemd-socket-activate lacks.
    let (mut h, port) = activated("reuseport");
    assert!(wait_until(T, || TcpStream::connect(("127.0.0.1", port)).is_ok()));
    let status = h.wait_exit(T).expect("exits");
    assert!(!status.success());
    assert!(h.log().contains("ReusePort=yes"), "{}", h.log());
}

use std::net::TcpStream;

#[test]
fn with_the_socket_held_outside_a_killed_master_loses_no_queued_request() {
    held_socket_outlives_the_master("proxy", false);
}

#[test]
fn in_reuseport_mode_too_a_killed_master_loses_no_request_sent_after_it_died() {
    held_socket_outlives_the_master("reuseport", true);
}

fn held_socket_outlives_the_master(mode: &str, reuse_port: bool) {
    // A holder keeps the listening socket, as a systemd .socket unit does,
    // and starts a master on it (fd 3, LISTEN_FDS) each time it is asked.
    let port = free_port();
    let holder = format!(
        r#"
import os, socket, subprocess, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
if {reuse}:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
s.bind(("127.0.0.1", {port}))
s.listen(4096)
os.dup2(s.fileno(), 3)
cmd = 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" run --mode {mode} -i 2 --name {name} -- "$1"'
for line in sys.stdin:
    p = subprocess.Popen(["sh", "-c", cmd, "{herd}", "{demo}"], pass_fds=(3,),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    print(p.pid, flush=True)
"#,
        name = name(&format!("held-{mode}")),
        reuse = if reuse_port { "True" } else { "False" },
        herd = HERD,
        demo = DEMO,
    );
    let mut py = Command::new("python3")
        .args(["-c", &holder])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut ask = py.stdin.take().unwrap();
    let mut pids = std::io::BufReader::new(py.stdout.take().unwrap());
    // Whatever happens, the holder and the masters it started go with the test.
    let _cleanup = Cleanup(py);
    let mut start = || -> u32 {
        use std::io::{BufRead, Write};
        writeln!(ask, "start").unwrap();
        let mut line = String::new();
        pids.read_line(&mut line).unwrap();
        line.trim().parse().unwrap()
    };
    let first = start();
    let mut workers = std::collections::BTreeMap::new();
    assert!(
        wait_until(T, || {
            if let Ok((200, body)) = http_get(port, "/") {
                let (id, pid) = parse_hello(&body);
                workers.insert(id, pid);
            }
            workers.len() == 2
        }),
        "{mode}: the first master does not serve both workers"
    );
    // kill -9: the master and (through the guardian) its workers go; the
    // port stays open in the holder. A reuseport worker's own socket lives
    // until the last thread of that worker has exited, which can be after
    // its main thread shows as a zombie: a connection the kernel queues on
    // it meanwhile is reset when it closes. So wait until the holder's is
    // the one socket listening, as systemd waits until the dead service's
    // cgroup is empty before it restarts it.
    signal(first, "KILL");
    assert!(wait_until(T, || !alive(first) && workers.values().all(|&p| !alive(p))));
    assert!(
        wait_until(T, || listeners(port) == 1),
        "{mode}: {} sockets listen after the master died",
        listeners(port)
    );
    // Requests sent meanwhile wait in the kernel's queue…
    let waiting: Vec<_> = (0..20)
        .map(|_| std::thread::spawn(move || http_get(port, "/")))
        .collect();
    // …and the next master answers every one.
    let second = start();
    for w in waiting {
        let (code, body) = w
            .join()
            .unwrap()
            .unwrap_or_else(|e| panic!("{mode}: a queued request was lost: {e}"));
        assert_eq!(code, 200, "{mode}: {body}");
    }
    signal(second, "TERM");
    assert!(wait_until(T, || !alive(second)));
}

/// Stops the masters the holder started, then the holder, so that a failed
/// assertion leaves nothing running.
struct Cleanup(std::process::Child);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let holder = self.0.id();
        // The masters are the holder's children: stop them gracefully.
        let kids = std::fs::read_to_string(format!("/proc/{holder}/task/{holder}/children"))
            .unwrap_or_default();
        for pid in kids
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
        {
            signal(pid, "TERM");
            wait_until(T, || !alive(pid));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn under_systemd_herd_says_ready_pings_the_watchdog_and_says_stopping() {
    let dir = std::env::temp_dir().join(format!("herd-notify-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("notify");
    let _ = std::fs::remove_file(&path);
    let sock = std::os::unix::net::UnixDatagram::bind(&path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let port = free_port();
    let mut cmd = herd_cmd();
    cmd.args([
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "-i",
        "2",
        "--",
        DEMO,
    ])
    .env("NOTIFY_SOCKET", &path)
    .env("WATCHDOG_USEC", "2000000");
    let mut h = Herd::spawn(&mut cmd, port);
    let mut got: Vec<String> = Vec::new();
    let mut buf = [0u8; 256];
    let mut next = |got: &mut Vec<String>| {
        // A receive with a time-out ends with EINTR when the process is
        // stopped and continued (or frozen and thawed): not a failure.
        let n = loop {
            match sock.recv(&mut buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r.expect("a notification"),
            }
        };
        got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    };
    while !got.iter().any(|m| m.contains("READY=1")) {
        next(&mut got);
    }
    // READY=1 came once every worker was: herd logs that just before.
    assert!(h.wait_log("all workers ready (2)", T), "{}", h.log());
    let pings = |got: &Vec<String>| got.iter().filter(|m| m.contains("WATCHDOG=1")).count();
    while pings(&got) < 3 {
        next(&mut got);
    }
    h.signal("TERM");
    while !got.iter().any(|m| m.contains("STOPPING=1")) {
        next(&mut got);
    }
    assert!(h.wait_exit(T).is_some_and(|s| s.success()));
    // The workers got herd's own NOTIFY_SOCKET, not systemd's.
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn herd_systemd_writes_units_that_systemd_accepts() {
    let dir = std::env::temp_dir().join(format!("herd-units-{}", std::process::id()));
    let out = herd(&[
        "systemd",
        "shop",
        "--dir",
        dir.to_str().unwrap(),
        "--listen",
        "127.0.0.1:9123",
        "-i",
        "2",
        "--",
        DEMO,
        "--flag with space",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let service = std::fs::read_to_string(dir.join("shop.service")).unwrap();
    let socket = std::fs::read_to_string(dir.join("shop.socket")).unwrap();
    assert!(socket.contains("ListenStream=127.0.0.1:9123"), "{socket}");
    for line in [
        "Type=notify",
        "KillMode=mixed",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "Requires=shop.socket",
    ] {
        assert!(service.contains(line), "{line} missing:\n{service}");
    }
    assert!(
        service.contains(" run --name shop --listen 127.0.0.1:9123 -i 2 -- ")
            && service.contains("\"--flag with space\""),
        "{service}"
    );
    if have("systemd-analyze") {
        let v = Command::new("systemd-analyze")
            .arg("verify")
            .arg(dir.join("shop.socket"))
            .arg(dir.join("shop.service"))
            .output()
            .unwrap();
        assert!(
            v.status.success() && v.stderr.is_empty(),
            "{}",
            String::from_utf8_lossy(&v.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn herd_upgrade_re_executes_in_place_under_load_in_every_mode() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    for mode in ["proxy", "shared", "reuseport", "dispatch"] {
        let n = name(&format!("up-{mode}"));
        let h = Herd::start(&["--mode", mode, "-i", "2", "--name", &n], &[DEMO]);
        h.wait_ready(2);
        let master = h.child.id();
        let before = h.worker_pids(2);
        let stop = Arc::new(AtomicBool::new(false));
        let done = Arc::new(AtomicUsize::new(0));
        let clients = load(h.port, true, stop.clone(), done.clone());
        assert!(wait_until(T, || done.load(Ordering::Relaxed) > 200));
        let out = herd(&["upgrade", &n]);
        let said = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{mode}: {said}{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            h.log()
        );
        assert!(
            said.contains(&format!("upgraded in place (master pid {master} kept)")),
            "{said}"
        );
        // Requests go on through the new workers.
        let at = done.load(Ordering::Relaxed);
        assert!(
            wait_until(T, || done.load(Ordering::Relaxed) > at + 200),
            "{mode}: stalled"
        );
        stop.store(true, Ordering::Relaxed);
        let mut failed = Vec::new();
        for c in clients {
            failed.extend(c.join().unwrap().1);
        }
        assert!(
            failed.is_empty(),
            "{mode}: {} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
        assert!(alive(master) && h.child.id() == master);
        let after = h.worker_pids(2);
        assert!(
            after.iter().all(|p| !before.contains(p)),
            "{mode}: {before:?} → {after:?}"
        );
        assert!(h.log().contains("upgraded in place"), "{}", h.log());
    }
}

#[test]
fn an_upgrade_to_a_binary_that_cannot_run_the_cluster_changes_nothing() {
    // A copy of herd runs the cluster; then a broken build replaces it on
    // disk (renamed over it, as deploys do): the check refuses the upgrade.
    let dir = std::env::temp_dir().join(format!("herd-up-bad-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let bin = dir.join("herd");
    std::fs::copy(HERD, &bin).unwrap();
    let n = name("up-bad");
    let port = free_port();
    let mut cmd = Command::new(&bin);
    cmd.args([
        "run",
        "--listen",
        &format!("127.0.0.1:{port}"),
        "-i",
        "1",
        "--name",
        &n,
        "--",
        DEMO,
    ]);
    let h = Herd::spawn(&mut cmd, port);
    h.wait_ready(1);
    let before = h.worker_pids(1);
    let broken = dir.join("herd.new");
    std::fs::write(&broken, "#!/bin/sh\necho 'broken build' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&broken, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    std::fs::rename(&broken, &bin).unwrap();
    let out = herd(&["upgrade", &n]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot run this cluster") && err.contains("broken build"),
        "{err}"
    );
    assert_eq!(h.get("/").unwrap().0, 200, "the old master serves on");
    assert_eq!(h.worker_pids(1), before, "its workers were not touched");
    assert!(!h.log().contains("re-executing"), "{}", h.log());
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sigusr2_upgrades_in_place_as_nginx_does() {
    let h = Herd::start(&["-i", "2", "--name", &name("usr2")], &[DEMO]);
    h.wait_ready(2);
    let before = h.worker_pids(2);
    h.signal("USR2");
    assert!(h.wait_log("upgraded in place", T), "{}", h.log());
    assert!(h.wait_log_n("all workers ready (2)", 2, T), "{}", h.log());
    let after = h.worker_pids(2);
    assert!(
        after.iter().all(|p| !before.contains(p)),
        "{before:?} → {after:?}"
    );
    assert!(alive(h.child.id()));
}
