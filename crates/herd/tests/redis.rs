//! Messages across hosts through a real Redis (`redis-server` from Debian's
//! packages) on loopback: two masters of one cluster name, each with its
//! own run directory as two machines would have, share broadcasts, `send
//! HOST/ID` and `status --all-hosts`; with Redis stopped or hung the
//! clusters keep serving and cross-host requests fail with the reason.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);

/// A redis-server on 127.0.0.1:PORT, without persistence, killed on drop.
struct Redis {
    child: Child,
    port: u16,
}

impl Redis {
    fn start(port: u16) -> Redis {
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .args(["--port", &port.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (apt-get install redis-server)");
        assert!(
            wait_until(T, || std::net::TcpStream::connect(("127.0.0.1", port))
                .is_ok()),
            "redis-server did not start"
        );
        Redis { child, port }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        signal(self.child.id(), "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One "host": a herd with its own run directory.
struct Host {
    herd: Herd,
    dir: PathBuf,
}

impl Host {
    fn start(tag: &str, host: &str, redis: &str) -> Host {
        let dir =
            std::env::temp_dir().join(format!("herd-redis-{tag}-{host}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hosts/app.py");
        let herd = Herd::spawn(
            herd_cmd()
                .env("XDG_RUNTIME_DIR", &dir)
                .env("TMPDIR", &dir)
                .args(["run", "--name", "app", "-i", "2", "--host-name", host])
                .args(["--redis", redis, "--listen", &format!("127.0.0.1:{port}")])
                .args(["--", "python3"])
                .arg(app),
            port,
        );
        herd.wait_ready(2);
        assert!(
            herd.wait_log("connected as host", T),
            "not connected to redis: {}",
            herd.log()
        );
        Host { herd, dir }
    }

    fn cli(&self, args: &[&str]) -> Output {
        herd_in(&self.dir, args)
    }

    /// Waits until worker `id` printed a received message containing every needle.
    fn got(&self, id: usize, needles: &[&str]) -> bool {
        let prefix = format!("[{id}] got");
        wait_until(T, || {
            self.herd
                .log()
                .lines()
                .any(|l| l.starts_with(&prefix) && needles.iter().all(|n| l.contains(n)))
        })
    }
}

impl Drop for Host {
    fn drop(&mut self) {
        self.herd.signal("TERM");
        self.herd.wait_exit(T);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn workers_on_two_hosts_share_broadcasts_sends_and_status_through_redis() {
    let redis = Redis::start(free_port());
    let a = Host::start("msg", "a", &redis.url());
    let b = Host::start("msg", "b", &redis.url());

    // Every host's workers, from either host (reports come every 2 s).
    let mut listed = String::new();
    assert!(
        wait_until(T, || {
            let o = b.cli(&["status", "--all-hosts", "--json"]);
            listed = String::from_utf8_lossy(&o.stdout).into_owned();
            let Ok(v) = serde_json::from_str::<serde_json::Value>(&listed) else {
                return false;
            };
            let hosts = v["hosts"].as_array().cloned().unwrap_or_default();
            let workers = |h: &str| {
                hosts
                    .iter()
                    .find(|r| r["host"] == h)
                    .and_then(|r| r["status"]["workers"].as_array().map(Vec::len))
            };
            v["host"] == "b" && workers("a") == Some(2) && workers("b") == Some(2)
        }),
        "{listed}"
    );

    // The CLI on host a: every worker of both hosts hears a broadcast.
    let out = ok(&a.cli(&["broadcast", "hello-all"]));
    assert!(
        out.contains("delivered to 2 workers here and sent to 1 other host"),
        "{out}"
    );
    for id in [0, 1] {
        assert!(
            a.got(id, &["hello-all", r#""from":"cli""#]),
            "{}",
            a.herd.log()
        );
        assert!(
            b.got(id, &["hello-all", r#""from":"a/cli""#]),
            "{}",
            b.herd.log()
        );
    }
    // One worker of the other host, by HOST/ID.
    let out = ok(&a.cli(&["send", "b/1", "just-b1"]));
    assert!(out.contains("delivered to worker 1 on b"), "{out}");
    assert!(b.got(1, &["just-b1", "a/cli"]), "{}", b.herd.log());
    assert!(
        !b.herd
            .log()
            .lines()
            .any(|l| l.starts_with("[0] got") && l.contains("just-b1"))
    );
    // A worker's broadcast (GET /broadcast/…) reaches the workers of both hosts.
    let (status, _) = b.herd.get("/broadcast/config-v2").unwrap();
    assert_eq!(status, 200);
    assert!(
        a.got(0, &["config-v2", "\"from\":\"b/"]),
        "{}",
        a.herd.log()
    );
    assert!(
        a.got(1, &["config-v2", "\"from\":\"b/"]),
        "{}",
        a.herd.log()
    );
    // Failures say why: no such worker there, no such host.
    let out = a.cli(&["send", "b/7", "x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("on host b: worker 7 is not running"),
        "{}",
        stderr(&out)
    );
    let out = a.cli(&["send", "c/1", "x"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("host c is not connected to redis"),
        "{}",
        stderr(&out)
    );

    let table = ok(&a.cli(&["status", "--all-hosts"]));
    assert!(
        table.contains("a/app: proxy mode") && table.contains("b/app: proxy mode"),
        "{table}"
    );
}

#[test]
fn without_redis_the_clusters_keep_serving_and_cross_host_requests_fail_with_the_reason() {
    let port = free_port();
    let redis = Redis::start(port);
    let a = Host::start("down", "a", &redis.url());
    let b = Host::start("down", "b", &redis.url());

    // Hung (SIGSTOP): nothing answers, nothing is refused.
    signal(redis.child.id(), "STOP");
    let start = Instant::now();
    let out = a.cli(&["broadcast", "while-hung"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("delivered to 2 workers here, but other hosts not reached"),
        "{}",
        stderr(&out)
    );
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert!(a.got(1, &["while-hung"]), "{}", a.herd.log());
    // Requests and local control go on as before, at once.
    for _ in 0..50 {
        let t = Instant::now();
        assert_eq!(a.herd.get("/").unwrap().0, 200);
        assert!(t.elapsed() < Duration::from_millis(500));
    }
    ok(&a.cli(&["send", "0", "local-still"]));
    assert!(a.got(0, &["local-still"]));
    assert!(ok(&a.cli(&["status"])).contains("ready"));
    // The ping notices the hung link and the master says so.
    assert!(
        a.herd.wait_log("other hosts are out of reach", T),
        "{}",
        a.herd.log()
    );

    // Gone (killed): refused at once, with the reason.
    drop(redis);
    let out = a.cli(&["send", "b/0", "x"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("is unreachable"), "{}", stderr(&out));
    let out = a.cli(&["status", "--all-hosts"]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("--all-hosts: redis at"),
        "{}",
        stderr(&out)
    );
    assert_eq!(a.herd.get("/").unwrap().0, 200);

    // Back: both masters reconnect by themselves (back-off at most 10 s).
    let _redis = Redis::start(port);
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let o = a.cli(&["broadcast", "back-again"]);
            last = format!("{}{}", String::from_utf8_lossy(&o.stdout), stderr(&o));
            last.contains("and sent to 1 other host")
        }),
        "{last}"
    );
    assert!(b.got(0, &["back-again", "a/cli"]), "{}", b.herd.log());
}

#[test]
fn redis_flags_are_checked() {
    for (args, want) in [
        (vec!["--redis", "http://x"], "--redis \"http://x\""),
        (
            vec!["--redis", "rediss://x"],
            "TLS (rediss://) is not supported",
        ),
        (vec!["--host-name", "a"], "--host-name needs --redis"),
        (
            vec!["--redis", "redis://127.0.0.1:1", "--host-name", "a/b"],
            "--host-name \"a/b\"",
        ),
    ] {
        let mut all = vec!["run", "--check"];
        all.extend(args);
        all.extend(["--", "true"]);
        let (code, err) = run_fail(&all);
        assert_eq!(code, 1, "{err}");
        assert!(err.contains(want), "{all:?}: {err}");
        assert_eq!(err.trim().lines().count(), 1, "{err}");
    }
}
