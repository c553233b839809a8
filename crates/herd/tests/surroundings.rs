//! The master never dies of its surroundings: a closed terminal or log
//! pipe, a stray signal. Each test runs the real binary and checks that
//! the cluster goes on serving and ends cleanly.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// Waits until worker 0 answers with a pid other than `old`; returns it.
fn new_pid_of_worker_0(h: &Herd, old: u32) -> u32 {
    let mut pid = 0;
    let ok = wait_until(T, || {
        if let Ok((200, body)) = h.get("/") {
            pid = parse_hello(&body).1;
        }
        pid != 0 && pid != old
    });
    assert!(ok, "worker 0 was not replaced (still pid {old})");
    pid
}

#[test]
fn closed_stdout_and_stderr_do_not_stop_the_master() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut child = herd_cmd()
        .args(["run", "--listen", &listen, "-i", "1", "--", DEMO])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // stdout closed at once; stderr read until the cluster is ready, then
    // closed too, as `herd run … 2>&1 | head -3` does.
    drop(child.stdout.take());
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let mut seen = String::new();
    while !seen.contains("all workers ready (1)") {
        line.clear();
        if err.read_line(&mut line).unwrap_or(0) == 0 {
            panic!("herd ended before it was ready:\n{seen}");
        }
        seen.push_str(&line);
    }
    drop(err);
    let h = Herd::adopt(child, port);

    // Each of these makes the master and the workers write.
    let first = h.worker_pids(1)[0];
    signal(first, "KILL");
    let second = new_pid_of_worker_0(&h, first);
    h.signal("HUP");
    new_pid_of_worker_0(&h, second);
    let mut h = h;
    assert!(
        h.child.try_wait().unwrap().is_none(),
        "the master died when its output pipes closed"
    );

    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not stop");
    assert_eq!(st.code(), Some(0), "master exit: {st}");
}

/// herd's output is a pipe whose reader stopped reading (a paused
/// `| less`, a stuck log shipper), and a worker floods it: the master still
/// restarts, reloads and stops, the workers still serve, and once the pipe
/// is read again a note says how many lines were dropped.
#[test]
fn an_output_nobody_reads_stops_nothing() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let (reader, writer) = std::io::pipe().unwrap();
    // `yes` fills the pipe at once and goes on writing.
    let flood = format!("yes flood & exec {DEMO}");
    let child = herd_cmd()
        .args([
            "run", "--listen", &listen, "-i", "1", "--", "sh", "-c", &flood,
        ])
        .stdin(Stdio::null())
        .stdout(writer.try_clone().unwrap())
        .stderr(writer)
        .spawn()
        .unwrap();
    let mut h = Herd::adopt(child, port);
    let first = h.worker_pids(1)[0];
    // The master logs this exit and the restart into the full pipe.
    signal(first, "KILL");
    let second = new_pid_of_worker_0(&h, first);
    h.signal("HUP");
    new_pid_of_worker_0(&h, second);
    assert!(
        h.child.try_wait().unwrap().is_none(),
        "the master died with its output stuck"
    );
    // Lines are dropped only once herd has waited its patience (0.5 s) on
    // the full pipe, which the restarts above may have taken less than;
    // nothing outside herd shows it, so the flood goes on that long.
    let stuck = std::time::Instant::now();
    wait_until(T, || stuck.elapsed() > Duration::from_secs(1));
    // Stopped with its output still stuck, then read: the note comes with
    // the next line herd writes, or on its way out. (Read to the end, when
    // herd and its guardian are gone.)
    h.signal("TERM");
    let reading = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = std::io::Read::read_to_end(&mut { reader }, &mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    let st = h
        .wait_exit(T)
        .expect("the master did not stop with its output stuck");
    assert_eq!(st.code(), Some(0), "master exit: {st}");
    let out = reading.join().unwrap();
    assert!(
        out.contains("lines of output were dropped: nobody read herd's output"),
        "no note of the dropped lines in {} bytes",
        out.len()
    );
}

/// `herd ARGS` with its stdout a pipe nobody reads any more.
fn cli_into_closed_pipe(args: &[&str], xdg: &Path) -> std::process::Child {
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    herd_cmd()
        .args(args)
        .env("XDG_RUNTIME_DIR", xdg)
        .env("TMPDIR", xdg)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// A closed pipe is a reader that had enough (`| head`): a quiet exit. Any
/// other lost output (a full disk) is an error, as coreutils' `cat` says.
#[test]
fn cli_output_into_a_closed_pipe_ends_quietly_and_onto_a_full_disk_fails() {
    let dir = tempdir("cli-pipe");
    let name = format!("pipe-{}", std::process::id());
    let log = dir.join("herd.log");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let log_arg = log.to_string_lossy().into_owned();
    let args = [
        "run",
        "--name",
        &name,
        "--listen",
        &listen,
        "-i",
        "1",
        "--log-file",
        &log_arg,
        "--",
        DEMO,
    ];
    let h = Herd::spawn(
        herd_cmd()
            .args(args)
            .env("XDG_RUNTIME_DIR", &dir)
            .env("TMPDIR", &dir),
        port,
    );
    let pid0 = h.worker_pids(1)[0];

    for args in [
        vec!["list"],
        vec!["status", "--name", &name],
        vec!["status", "--name", &name, "--json"],
        vec!["logs", "--name", &name],
    ] {
        let mut c = cli_into_closed_pipe(&args, &dir);
        assert_quiet_exit(&mut c, &args);
    }
    for args in [
        vec!["list"],
        vec!["status", "--name", &name, "--json"],
        vec!["jlist"],
        vec!["logs", "--name", &name],
        vec!["--help"],
    ] {
        let out = herd_cmd()
            .args(&args)
            .env("XDG_RUNTIME_DIR", &dir)
            .env("TMPDIR", &dir)
            .stdin(Stdio::null())
            .stdout(std::fs::File::create("/dev/full").unwrap())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            out.status.code() == Some(1)
                && err.trim()
                    == "herd: error: cannot write the output: No space left on device (os error 28)",
            "`herd {}` onto a full disk: {}, stderr: {err}",
            args.join(" "),
            out.status
        );
    }

    // A follower whose reader leaves ends, though the log stays quiet
    // (`herd logs -f | head -1`), as `tail -f` does.
    let args = ["logs", "--name", &name, "-f", "--lines", "1"];
    let mut c = herd_cmd()
        .args(args)
        .env("XDG_RUNTIME_DIR", &dir)
        .env("TMPDIR", &dir)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(c.stdout.as_mut().unwrap(), &mut first).unwrap();
    drop(c.stdout.take());
    assert_quiet_exit(&mut c, &args);

    // One that finds the pipe closed ends at its first write.
    let args = ["logs", "--name", &name, "-f"];
    let mut c = cli_into_closed_pipe(&args, &dir);
    h.signal("HUP"); // a reload writes log lines
    new_pid_of_worker_0(&h, pid0);
    assert_quiet_exit(&mut c, &args);
}

fn assert_quiet_exit(c: &mut std::process::Child, args: &[&str]) {
    let mut status = None;
    wait_until(T, || {
        status = c.try_wait().unwrap();
        status.is_some()
    });
    let Some(st) = status else {
        let _ = c.kill();
        panic!("`herd {}` kept running with nobody reading", args.join(" "));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(c.stderr.as_mut().unwrap(), &mut err).unwrap();
    assert!(
        st.success() && !err.contains("panicked"),
        "`herd {}` into a closed pipe: {st}, stderr: {err}",
        args.join(" ")
    );
}

#[test]
fn signals_herd_does_not_use_are_logged_and_ignored() {
    let dir = tempdir("signals");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let h = Herd::spawn(
        herd_cmd()
            .args(["run", "--listen", &listen, "-i", "1", "--", DEMO])
            .env("XDG_RUNTIME_DIR", &dir)
            .env("TMPDIR", &dir),
        port,
    );
    h.wait_ready(1);
    let master = h.child.id();
    let rundir = dir.join("herd").join(master.to_string());
    assert!(rundir.is_dir(), "no run directory {}", rundir.display());

    // (SIGUSR2 upgrades herd in place: see tests/host.rs; SIGUSR1 reopens
    // the log files: see below.)
    for sig in ["ALRM", "PWR", "VTALRM", "RTMIN+3", "SYS", "TRAP", "ABRT"] {
        h.signal(sig);
    }
    for name in [
        "SIGALRM",
        "SIGPWR",
        "SIGVTALRM",
        "SIGRTMIN+3",
        "SIGSYS",
        "SIGTRAP",
        "SIGABRT",
    ] {
        assert!(
            h.wait_log(&format!("{name} received"), T),
            "{name} not logged:\n{}",
            h.log()
        );
    }
    // The guardian, which must outlive the master, ignores them too.
    let guardian = children(master)
        .into_iter()
        .find(|p| cmdline(*p).contains("__guard"))
        .expect("no guardian process");
    for sig in ["USR2", "TERM", "INT", "HUP", "SYS", "ABRT"] {
        signal(guardian, sig);
    }
    assert!(alive(master), "a stray signal killed the master");
    assert_eq!(h.get("/").map(|r| r.0).ok(), Some(200));
    assert!(alive(guardian), "a stray signal killed the guardian");

    // SIGQUIT stops gracefully, as in nginx, and the run directory goes.
    let mut h = h;
    h.signal("QUIT");
    let st = h.wait_exit(T).expect("SIGQUIT did not stop the master");
    assert_eq!(st.code(), Some(0), "exit after SIGQUIT: {st}\n{}", h.log());
    assert!(h.log().contains("SIGQUIT: stopping gracefully"));
    assert!(!rundir.exists(), "run directory left behind");
    assert!(
        wait_until(T, || !alive(guardian)),
        "the guardian outlived the master"
    );
}

/// logrotate (without `copytruncate`) renames the log files: herd writes
/// to new files at their paths, by itself within a second (the access
/// log here), and at once on SIGUSR1, as nginx does (the main log).
#[test]
fn log_files_moved_away_are_reopened_at_their_paths() {
    let dir = tempdir("logrotate");
    let (log, access) = (dir.join("herd.log"), dir.join("access.log"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let h = Herd::spawn(
        herd_cmd()
            .args(["run", "--listen", &listen, "-i", "1", "--log-file"])
            .arg(&log)
            .arg("--access-log")
            .arg(&access)
            .args(["--", DEMO])
            .env("XDG_RUNTIME_DIR", &dir)
            .env("TMPDIR", &dir),
        port,
    );
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    assert!(
        wait_until(T, || read(&log).contains("all workers ready (1)")),
        "{}",
        read(&log)
    );
    assert_eq!(h.get("/").map(|r| r.0).ok(), Some(200));
    assert!(wait_until(T, || read(&access).contains("GET / ")));
    std::fs::rename(&access, dir.join("access.log.1")).unwrap();
    std::fs::rename(&log, dir.join("herd.log.1")).unwrap();

    assert!(
        wait_until(T, || {
            let _ = h.get("/moved");
            read(&access).contains("GET /moved ")
        }),
        "no new access log at {}",
        access.display()
    );
    h.signal("USR1");
    assert!(
        wait_until(T, || read(&log)
            .contains("SIGUSR1 received: log files reopened")),
        "no new log at {}; the old one:\n{}",
        log.display(),
        read(&dir.join("herd.log.1"))
    );
    assert_eq!(h.get("/").map(|r| r.0).ok(), Some(200));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Someone kills the guardian: the master starts another at once (not at
/// the next worker start), so a `kill -9` of the master afterwards still
/// takes the workers' own children with it.
#[test]
fn a_killed_guardian_is_replaced_at_once() {
    // The demo runs under a shell, as with `npm start`: only the guardian
    // kills such a grandchild when the master dies.
    let wrapped = format!("{DEMO}; exit 0");
    let mut h = Herd::start(&["-i", "1"], &["sh", "-c", wrapped.as_str()]);
    h.wait_ready(1);
    let demo = h.worker_pids(1)[0];
    let master = h.child.id();
    let guardians = || -> Vec<u32> {
        children(master)
            .into_iter()
            .filter(|&p| alive(p) && cmdline(p).contains("__guard"))
            .collect()
    };
    let old = guardians();
    assert_eq!(old.len(), 1, "guardians: {old:?}");
    signal(old[0], "KILL");
    let mut new = Vec::new();
    assert!(
        wait_until(T, || {
            new = guardians();
            new.len() == 1 && new != old
        }),
        "no new guardian after the old one was killed: {new:?}\n{}",
        h.log()
    );
    // The line is written before the new guardian starts, but reaches
    // this test's reader through the master's output thread: it may lag.
    assert!(h.wait_log("the guardian process died", T), "{}", h.log());
    h.signal("KILL");
    h.wait_exit(T).expect("kill -9 did not end the master");
    assert!(
        wait_until(T, || !alive(demo)),
        "the worker's child {demo} outlived the master"
    );
}

fn tempdir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("herd-test-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::set_permissions(&d, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    d
}

fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Ok(s) = std::fs::read_to_string(task.path().join("children")) {
            out.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
    }
    out
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
        .unwrap_or_default()
}

/// Out of file descriptors: the proxy stops accepting for a moment instead
/// of spinning, warns with a count instead of ~50 lines a second, does not
/// take its workers for unhealthy (its checks could not be made; nginx
/// counts no failure for its own shortage either), and serves again once
/// descriptors are free.
#[test]
fn running_out_of_descriptors_is_survived_and_not_a_log_flood() {
    use std::io::{Read, Write};
    if Command::new("prlimit").arg("--version").output().is_err() {
        eprintln!("skipped: prlimit (util-linux) is not installed");
        return;
    }
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut c = Command::new("prlimit");
    c.args([
        "--nofile=96:96",
        HERD,
        "run",
        "--listen",
        &listen,
        "-i",
        "1",
    ])
    .args([
        "--health-interval",
        "100ms",
        "--health-fall",
        "2",
        "--",
        DEMO,
    ])
    .env("HERD_LOG", "info,herd::upstream=debug");
    let h = Herd::spawn(&mut c, port);
    h.wait_ready(1);
    // Each held client costs herd a descriptor, so these run it out.
    let mut held = Vec::new();
    for _ in 0..150 {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            break;
        };
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        held.push(s);
    }
    assert!(
        h.wait_log("Too many open files", T),
        "descriptors did not run out; log:\n{}",
        h.log()
    );
    // The window: one more client waits up to 2 s in the queue herd cannot
    // accept from. Out of descriptors that long, the old loop logged about
    // 100 lines.
    if let Ok(mut probe) = std::net::TcpStream::connect(("127.0.0.1", port)) {
        let _ = probe.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = probe.write_all(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n");
        let _ = probe.read(&mut [0u8; 64]);
    }
    let warnings = h.log().matches("accept failed").count();
    assert!(warnings <= 4, "{warnings} warnings:\n{}", h.log());
    // Checks every 100 ms, two failures take a worker out: three checks
    // that could not be made must not.
    assert!(
        wait_until(T, || h.log().matches("check not made").count() >= 3),
        "{}",
        h.log()
    );
    assert!(!h.log().contains("unhealthy"), "{}", h.log());
    drop(held);
    // Served again once descriptors are free.
    let ok = wait_until(T, || {
        let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n");
        let mut got = String::new();
        let _ = s.read_to_string(&mut got);
        got.starts_with("HTTP/1.1 200")
    });
    assert!(
        ok,
        "not served after descriptors were freed; log:\n{}",
        h.log()
    );
    assert!(!h.log().contains("unhealthy"), "{}", h.log());
}

/// A worker that floods its message channel (here as fast as Python can
/// write, each message one the master logs): the master reads no faster
/// than it handles them, so its memory stays flat, and it keeps serving
/// requests and `herd status`.
#[test]
fn a_worker_flooding_its_channel_costs_the_master_no_memory() {
    let flood = format!(
        r#"import os, subprocess
subprocess.Popen(["{DEMO}"], pass_fds=(3,) if os.environ.get("LISTEN_FDS") else ())
line = b'{{"type":"master","data":"{}"}}\n' * 1000
while True:
    os.write(int(os.environ["HERD_IPC_FD"]), line)
"#,
        "x".repeat(200)
    );
    let n = name("flood");
    let h = Herd::start(&["-i", "1", "--name", &n], &["python3", "-c", &flood]);
    h.wait_ready(1);
    assert!(h.wait_log("worker 0 says: \"xxx", T), "{}", h.log());
    // Unbounded, this grew by hundreds of MB in 3 s.
    let (before, most) = rss_over_3s(h.child.id());
    assert!(
        most < before + 32 * 1024,
        "master RSS {before} KiB → {most} KiB"
    );
    assert!(matches!(http_get(h.port, "/"), Ok((200, _))));
    let status = ok(&herd(&["status", "--name", &n]));
    assert!(status.contains("ready"), "{status}");
}

/// A worker that sends `WATCHDOG=1` in a loop, hundreds to a datagram:
/// the master tells its supervisor at most every 50 ms, so its memory
/// stays flat (it grew by 2 GB in 6 s before).
#[test]
fn a_worker_pinging_in_a_loop_costs_the_master_no_memory() {
    let ping = format!(
        r#"import os, socket, subprocess
subprocess.Popen(["{DEMO}"])
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
msg = b"WATCHDOG=1\n" * 372
while True:
    try: s.sendto(msg, os.environ["NOTIFY_SOCKET"])
    except BlockingIOError: pass
"#
    );
    let h = Herd::start(&["-i", "1", "--watchdog", "5s"], &["python3", "-c", &ping]);
    h.wait_ready(1);
    let (before, most) = rss_over_3s(h.child.id());
    assert!(
        most < before + 32 * 1024,
        "master RSS {before} KiB → {most} KiB"
    );
    assert!(matches!(http_get(h.port, "/"), Ok((200, _))));
}

/// `pid`'s RSS (KiB) now, and the most it reaches over the next 3 s of
/// sampling: what a flood from a worker costs the master.
fn rss_over_3s(pid: u32) -> (u64, u64) {
    let before = rss_kib(pid);
    let since = std::time::Instant::now();
    let mut most = before;
    wait_until(T, || {
        most = most.max(rss_kib(pid));
        since.elapsed() > Duration::from_secs(3)
    });
    (before, most)
}

/// A parent may start herd with signals blocked (the mask is inherited
/// through exec). The master unblocks those it handles, so SIGHUP still
/// reloads, and its workers start with none blocked, as Node's children do.
#[test]
fn signals_blocked_by_the_parent_neither_mute_the_master_nor_reach_workers() {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut c = Command::new("python3");
    c.env("XDG_STATE_HOME", test_state()).args([
        "-c",
        "import os, signal, sys\n\
             signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGHUP, signal.SIGWINCH})\n\
             os.execv(sys.argv[1], sys.argv[1:])",
        HERD,
        "run",
        "--listen",
        &listen,
        "-i",
        "1",
        "--",
        DEMO,
    ]);
    let mut h = Herd::spawn(&mut c, port);
    h.wait_ready(1);
    let blocked = |pid: u32| {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        status
            .lines()
            .find_map(|l| l.strip_prefix("SigBlk:"))
            .map(|m| u64::from_str_radix(m.trim(), 16).unwrap_or(0))
            .unwrap_or(0)
    };
    let master = h.child.id();
    // SIGHUP is signal 1: bit 0 of the mask.
    assert_eq!(blocked(master) & 1, 0, "SIGHUP blocked");
    let worker = parse_hello(&h.get("/").unwrap().1).1;
    assert_eq!(blocked(worker), 0, "the worker's mask");
    h.signal("HUP");
    new_pid_of_worker_0(&h, worker);
    assert!(h.log().contains("SIGHUP: rolling reload"), "{}", h.log());
    h.signal("TERM");
    let st = h.wait_exit(T).expect("master did not exit");
    assert_eq!(st.code(), Some(0), "{}", h.log());
}

/// systemd-tmpfiles ages `/tmp` (10 days on Fedora, RHEL and Debian 13),
/// where herd keeps its run directory without `XDG_RUNTIME_DIR`. After a
/// real `systemd-tmpfiles --clean` over it with every file 20 days old, a
/// Node cluster still restarts a killed worker (herd's preload, which node
/// loads at each start, is still there), serves on every worker, and its
/// name is still taken (its lock file is still there).
#[test]
fn a_long_running_cluster_survives_tmpfiles_aging() {
    if Command::new("systemd-tmpfiles")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("skipped: no systemd-tmpfiles");
        return;
    }
    let dir = std::env::temp_dir().join(format!("herd-aging-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let in_tmp = |c: &mut Command| {
        c.env_remove("XDG_RUNTIME_DIR").env("TMPDIR", &dir);
    };
    let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/node/hello.js");
    let name = name("aging");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = herd_cmd();
    cmd.args([
        "run", "--listen", &listen, "-i", "2", "--name", &name, "--", "node",
    ])
    .arg(&app);
    in_tmp(&mut cmd);
    let h = Herd::spawn(&mut cmd, port);
    h.wait_ready(2);

    let aged = Command::new("sh")
        .arg("-c")
        .arg("find \"$1\" -mindepth 1 -exec touch -h -a -m -d '20 days ago' {} +")
        .args(["sh", dir.to_str().unwrap()])
        .status()
        .unwrap();
    assert!(aged.success());
    let conf = dir.with_extension("conf");
    std::fs::write(&conf, format!("e {} - - - am:10d\n", dir.display())).unwrap();
    let cleaned = Command::new("systemd-tmpfiles")
        .arg("--clean")
        .arg(&conf)
        .output()
        .unwrap();
    assert!(cleaned.status.success(), "{cleaned:?}");
    let _ = std::fs::remove_file(&conf);

    let old = h.worker_pids(2);
    for &pid in &old {
        signal(pid, "KILL");
    }
    let mut seen = [false; 2];
    assert!(
        wait_until(T, || {
            if let Ok((200, body)) = h.get("/") {
                let worker = body
                    .split("worker ")
                    .nth(1)
                    .and_then(|w| w.split(' ').next());
                let pid = body
                    .split("pid ")
                    .nth(1)
                    .and_then(|p| p.trim_end_matches(")\n").parse::<u32>().ok());
                if let (Some(w), Some(p)) = (worker.and_then(|w| w.parse::<usize>().ok()), pid) {
                    seen[w] |= !old.contains(&p);
                }
            }
            seen == [true, true]
        }),
        "the killed workers did not come back:\n{}",
        h.log()
    );
    // The name is still held: a second cluster under it is refused.
    let port2 = free_port();
    let listen2 = format!("127.0.0.1:{port2}");
    let mut again = herd_cmd();
    again.args([
        "run", "--listen", &listen2, "-i", "1", "--name", &name, "--", DEMO,
    ]);
    in_tmp(&mut again);
    let out = again.stdin(Stdio::null()).output().unwrap();
    assert!(!out.status.success(), "a second {name} ran");
    let mut status = herd_cmd();
    status.args(["status", "--name", &name]);
    in_tmp(&mut status);
    let out = status.output().unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("master pid {}", h.child.id())),
        "herd status: {out:?}"
    );
    drop(h);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A cluster started without `XDG_RUNTIME_DIR` (from cron, a boot unit)
/// keeps its control socket in `/tmp/herd-UID`; `herd` run where
/// `XDG_RUNTIME_DIR` is set (a login session) still finds it, and a second
/// cluster of the same name started there is refused.
#[test]
fn clusters_are_found_whichever_runtime_directory_they_started_with() {
    let tmp = std::env::temp_dir().join(format!("herd-bases-{}", std::process::id()));
    let xdg = tmp.join("xdg");
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&xdg).unwrap();
    let name = name("bases");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut cmd = herd_cmd();
    cmd.args([
        "run", "--listen", &listen, "-i", "1", "--name", &name, "--", DEMO,
    ])
    .env_remove("XDG_RUNTIME_DIR")
    .env("TMPDIR", &tmp);
    let h = Herd::spawn(&mut cmd, port);
    h.wait_ready(1);
    let in_session = |args: &[&str]| {
        herd_cmd()
            .args(args)
            .env("XDG_RUNTIME_DIR", &xdg)
            .env("TMPDIR", &tmp)
            .stdin(Stdio::null())
            .output()
            .unwrap()
    };
    let out = in_session(&["status", "--name", &name]);
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("master pid {}", h.child.id())),
        "herd status: {out:?}"
    );
    let listed = in_session(&["list"]);
    assert!(
        String::from_utf8_lossy(&listed.stdout).contains(&name),
        "{listed:?}"
    );
    let other = format!("127.0.0.1:{}", free_port());
    let again = in_session(&["run", "--listen", &other, "--name", &name, "--", DEMO]);
    assert!(!again.status.success(), "a second {name} ran: {again:?}");
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already"),
        "{again:?}"
    );
    drop(h);
    let _ = std::fs::remove_dir_all(&tmp);
}
