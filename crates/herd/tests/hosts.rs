//! Several hosts, built as Linux network namespaces on a private subnet
//! (10.77.0.0/24) joined by veth pairs to a bridge in a "switch" namespace:
//! a front herd balancing over the hosts that DNS (dnsmasq) names, two app
//! hosts each running herd with workers and `--redis`, and dnsmasq and
//! redis-server on an infrastructure host. Nothing leaves those namespaces.
//! Needs root (CI runs as root); without namespaces the test says so and
//! passes.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);
const FRONT: &str = "10.77.0.1";
const INFRA: &str = "10.77.0.10";

/// Runs `ip ARGS`; the error output if it fails.
fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The namespaces and links, and a scratch directory; removed on drop
/// (removing a namespace removes its veths).
struct Net {
    tag: String,
    made: Vec<String>,
    dir: PathBuf,
}

impl Net {
    /// `None` (with the reason) where namespaces cannot be made.
    fn build(hosts: &[(&str, &str)]) -> Result<Net, String> {
        let tag = format!("hd{}", std::process::id());
        let dir = std::env::temp_dir().join(format!("herd-{tag}"));
        std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
        let mut net = Net {
            tag,
            made: Vec::new(),
            dir,
        };
        let sw = net.ns("sw");
        ip(&["netns", "add", &sw])?;
        net.made.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for (host, addr) in hosts {
            let ns = net.ns(host);
            ip(&["netns", "add", &ns])?;
            net.made.push(ns.clone());
            let port = format!("p-{host}");
            ip(&[
                "link", "add", &port, "netns", &sw, "type", "veth", "peer", "name", "eth0",
                "netns", &ns,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(net)
    }

    fn ns(&self, host: &str) -> String {
        format!("{}{host}", self.tag)
    }

    /// The host's link to the switch, up or down (a cable pulled).
    fn link(&self, host: &str, up: bool) {
        ip(&[
            "-n",
            &self.ns("sw"),
            "link",
            "set",
            &format!("p-{host}"),
            if up { "up" } else { "down" },
        ])
        .unwrap();
    }

    /// `cmd` run in `host`'s namespace.
    fn exec(&self, host: &str, program: &str) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(host), program]);
        c
    }

    /// Runs `f` on a thread inside `host`'s network namespace (sockets it
    /// opens live there).
    fn within<R: Send + 'static>(
        &self,
        host: &str,
        f: impl FnOnce() -> R + Send + 'static,
    ) -> std::thread::JoinHandle<R> {
        let path = format!("/run/netns/{}", self.ns(host));
        std::thread::spawn(move || {
            let fd = std::fs::File::open(&path).unwrap();
            nix::sched::setns(fd, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
            f()
        })
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.made.iter().rev() {
            let _ = ip(&["netns", "del", ns]);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Each client request: when it ended, and the host that answered or the error.
type Outcomes = Vec<(Instant, Result<String, String>)>;

/// A process killed when the test ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn quiet(mut c: Command) -> Killed {
    Killed(
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// GET `path` from `addr`:8080, from inside the front's namespace.
fn get(net: &Net, addr: &'static str, path: &'static str) -> std::io::Result<(u16, String)> {
    net.within("f", move || {
        let mut s = std::net::TcpStream::connect_timeout(
            &format!("{addr}:8080").parse().unwrap(),
            Duration::from_secs(2),
        )?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        std::io::Write::write_all(
            &mut s,
            format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
        )?;
        read_response(s)
    })
    .join()
    .unwrap()
}

/// The `HOST WORKER` pairs that answered the front over `n` requests.
fn served(net: &Net, n: usize) -> BTreeSet<String> {
    (0..n)
        .filter_map(|_| get(net, FRONT, "/").ok())
        .filter(|(s, _)| *s == 200)
        .map(|(_, body)| {
            body.split_whitespace()
                .take(2)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect()
}

/// An app host: herd with the example app, its own run directory, --redis.
struct AppHost {
    herd: Herd,
    dir: PathBuf,
}

impl AppHost {
    fn start(net: &Net, host: &str, addr: &str) -> AppHost {
        let dir = net.dir.join(host);
        std::fs::create_dir_all(&dir).unwrap();
        let app = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../examples/hosts/app.py");
        let mut cmd = net.exec(host, HERD);
        cmd.env("XDG_RUNTIME_DIR", &dir)
            .env("TMPDIR", &dir)
            .args(["run", "--name", "app", "-i", "1", "--host-name", host])
            .args(["--listen", &format!("{addr}:8080")])
            .args(["--redis", &format!("redis://{INFRA}:6379")])
            .args(["--", "python3"])
            .arg(app);
        let herd = Herd::spawn(&mut cmd, 8080);
        herd.wait_ready(1);
        AppHost { herd, dir }
    }

    fn cli(&self, args: &[&str]) -> Output {
        herd_in(&self.dir, args)
    }
}

impl Drop for AppHost {
    fn drop(&mut self) {
        self.herd.signal("TERM");
        self.herd.wait_exit(T);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn a_front_follows_dns_over_hosts_survives_a_cut_link_and_hosts_share_redis() {
    let net = match Net::build(&[
        ("f", FRONT),
        ("a", "10.77.0.2"),
        ("b", "10.77.0.3"),
        ("i", INFRA),
    ]) {
        Ok(n) => n,
        Err(e) => {
            eprintln!("skipped: cannot build network namespaces here ({e}); run as root");
            return;
        }
    };
    // Infrastructure: DNS naming only host a for now, and Redis.
    let records = net.dir.join("records");
    std::fs::write(&records, "10.77.0.2 app.test\n").unwrap();
    let mut dns = net.exec("i", "dnsmasq");
    dns.args(DNSMASQ)
        .arg("--port=53")
        .arg(format!("--listen-address={INFRA}"))
        .arg(format!("--addn-hosts={}", records.display()));
    let dns = quiet(dns);
    let mut redis = net.exec("i", "redis-server");
    redis.args([
        "--bind",
        INFRA,
        "--port",
        "6379",
        "--save",
        "",
        "--appendonly",
        "no",
    ]);
    // Redis refuses non-loopback clients without a password otherwise.
    redis.args(["--protected-mode", "no"]);
    let _redis = quiet(redis);

    let a = AppHost::start(&net, "a", "10.77.0.2");
    let b = AppHost::start(&net, "b", "10.77.0.3");
    let mut front = net.exec("f", HERD);
    front
        .env("XDG_RUNTIME_DIR", &net.dir)
        .env("TMPDIR", &net.dir)
        .args([
            "run",
            "--name",
            "front",
            "--listen",
            &format!("{FRONT}:8080"),
        ])
        .args([
            "--upstream-dns",
            "app.test:8080,fail_timeout=2s",
            "--resolver",
            INFRA,
        ])
        .args(["--health-interval", "300ms", "--health-timeout", "300ms"])
        .args(["--health-fall", "2", "--health-rise", "1"])
        .args(["--connect-timeout", "300ms", "--response-timeout", "1s"]);
    let front = Herd::spawn(&mut front, 8080);

    // The front serves host a's worker.
    assert!(
        wait_until(T, || served(&net, 4) == BTreeSet::from(["a 0".to_string()])),
        "{}",
        front.log()
    );
    // Host a scales up: the front reaches its new worker through a's herd.
    ok(&a.cli(&["scale", "app", "3"]));
    assert!(
        wait_until(T, || served(&net, 12).len() == 3),
        "{:?}",
        served(&net, 12)
    );
    // DNS adds host b: the front picks it up without a reload.
    std::fs::write(&records, "10.77.0.2 app.test\n10.77.0.3 app.test\n").unwrap();
    signal(dns.0.id(), "HUP");
    assert!(
        wait_until(T, || served(&net, 12).contains("b 0")),
        "{}",
        front.log()
    );

    // Redis across hosts: b lists both hosts' workers, and a broadcast from
    // a's CLI reaches b's worker.
    let mut listed = String::new();
    assert!(
        wait_until(T, || {
            listed =
                String::from_utf8_lossy(&b.cli(&["status", "--all-hosts"]).stdout).into_owned();
            listed.contains("a/app: proxy mode") && listed.contains("b/app: proxy mode")
        }),
        "{listed}"
    );
    let out = ok(&a.cli(&["broadcast", "from-host-a"]));
    assert!(out.contains("and sent to 1 other host"), "{out}");
    assert!(
        b.herd
            .wait_log(r#"[0] got {"data":"from-host-a","from":"a/cli""#, T),
        "{}",
        b.herd.log()
    );

    // Host a's cable is pulled under load: the front stops sending to it
    // within the health-check bounds, and clients lose nothing beyond the
    // requests in flight on a (retried elsewhere: they are GETs).
    let stop = Arc::new(AtomicBool::new(false));
    let log: Arc<Mutex<Outcomes>> = Arc::default();
    let clients: Vec<_> = (0..4)
        .map(|_| {
            let (stop, log) = (stop.clone(), log.clone());
            net.within("f", move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 20_000 {
                    n += 1;
                    let r =
                        std::net::TcpStream::connect(format!("{FRONT}:8080")).and_then(|mut s| {
                            s.set_read_timeout(Some(Duration::from_secs(10)))?;
                            std::io::Write::write_all(
                                &mut s,
                                b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                            )?;
                            read_response(s)
                        });
                    let r = match r {
                        Ok((200, body)) => {
                            Ok(body.split_whitespace().next().unwrap_or("").to_string())
                        }
                        Ok((code, body)) => Err(format!("{code} {body}")),
                        Err(e) => Err(e.to_string()),
                    };
                    log.lock().unwrap().push((Instant::now(), r));
                }
            })
        })
        .collect();
    let count = |host: &str, since: Instant| {
        log.lock()
            .unwrap()
            .iter()
            .filter(|(t, r)| *t >= since && r.as_deref() == Ok(host))
            .count()
    };
    let start = Instant::now();
    assert!(wait_until(T, || count("a", start) > 20 && count("b", start) > 20));
    let cut = Instant::now();
    net.link("a", false);
    // Bound: 2 failed checks 300 ms apart, each up to 300 ms, plus a
    // response time-out for what was in flight: about 2 s.
    let bound = cut + Duration::from_secs(3);
    assert!(wait_until(T, || Instant::now() > bound + Duration::from_secs(2)));
    assert_eq!(count("a", bound), 0, "a still served after the bound");
    assert!(count("b", bound) > 20, "b did not take the load");
    // Host a is cut off from Redis too: a send to it fails, with the reason.
    let out = b.cli(&["send", "a/0", "x"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(err.contains("host a"), "{err}");
    // A broadcast while a is away waits in the stream for it.
    ok(&b.cli(&["broadcast", "while-a-was-away"]));
    // The cable goes back: a serves again, its master rejoins Redis and
    // reads what it missed.
    let back = Instant::now();
    net.link("a", true);
    assert!(
        wait_until(T, || count("a", back) > 10),
        "a not back: {}",
        front.log()
    );
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    let failed: Vec<String> = log
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(_, r)| r.clone().err())
        .collect();
    // At most the 4 clients' requests in flight at the cut.
    eprintln!(
        "{} requests failed around the cut: {failed:?}",
        failed.len()
    );
    assert!(failed.len() <= 4, "{} failed: {:?}", failed.len(), failed);
    let mut last = String::new();
    assert!(
        wait_until(Duration::from_secs(30), || {
            let o = b.cli(&["send", "a/0", "welcome-back"]);
            last = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            o.status.success()
        }),
        "{last}"
    );
    assert!(a.herd.wait_log("welcome-back", T), "{}", a.herd.log());
    assert!(
        a.herd
            .wait_log(r#"[0] got {"data":"while-a-was-away","from":"b/cli""#, T),
        "{}",
        a.herd.log()
    );
}
