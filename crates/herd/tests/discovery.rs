//! Backends from DNS: a real DNS server (dnsmasq, from Debian's packages)
//! on loopback serves A and SRV records for backends on 127.0.0.x; herd
//! follows the records as they change, keeps the last good set when the
//! server goes away, and two front herds agree on every consistent-hash pick.

mod common;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// A dnsmasq answering on 127.0.0.1:PORT from a hosts file (TTL 1 s),
/// stopped on drop.
struct Dns {
    child: Child,
    port: u16,
    hosts: PathBuf,
    dir: PathBuf,
}

impl Dns {
    fn start(tag: &str, hosts: &str, extra: &[String]) -> Dns {
        let dir = std::env::temp_dir().join(format!("herd-dns-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, hosts).unwrap();
        let port = free_port();
        let child = Command::new("dnsmasq")
            .args(DNSMASQ)
            .arg("--listen-address=127.0.0.1")
            .arg(format!("--port={port}"))
            .arg(format!("--addn-hosts={}", file.display()))
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq (apt-get install dnsmasq-base)");
        Dns {
            child,
            port,
            hosts: file,
            dir,
        }
    }

    /// New records; dnsmasq reads its hosts file again on SIGHUP.
    fn set(&self, hosts: &str) {
        std::fs::write(&self.hosts, hosts).unwrap();
        signal(self.child.id(), "HUP");
    }

    fn resolver(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A process stopped when the test ends, whether it passed or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// HTTP servers on each of `addrs` (127.0.0.x:port) in one Python process,
/// each answering "served by ADDR".
fn backends(addrs: &[String]) -> Killed {
    let script = r#"
import http.server, sys, threading
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body go out in two writes: without this, Nagle holds the
    # body for the proxy's delayed ACK (40 ms a request).
    disable_nagle_algorithm = True
    def do_GET(self):
        b = ("served by %s:%d\n" % self.server.server_address).encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a):
        pass
servers = []
for a in sys.argv[1:]:
    host, port = a.rsplit(":", 1)
    servers.append(http.server.ThreadingHTTPServer((host, int(port)), H))
for s in servers:
    threading.Thread(target=s.serve_forever, daemon=True).start()
print("up", flush=True)
sys.stdin.read()
"#;
    let mut c = Command::new("python3")
        .arg("-c")
        .arg(script)
        .args(addrs)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(c.stdout.take().unwrap()),
        &mut line,
    )
    .unwrap();
    assert_eq!(line.trim(), "up");
    Killed(c)
}

fn served_by(port: u16, key: &str) -> Option<String> {
    let (code, body) = get_with(port, "/", &format!("X-User: {key}\r\n")).ok()?;
    (code == 200).then(|| body.trim().trim_start_matches("served by ").to_string())
}

/// Which backend serves each of 1,000 keys (over one keep-alive connection).
fn picks(port: u16) -> BTreeMap<String, String> {
    use std::io::{BufRead, Read, Write};
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    let mut s = std::io::BufReader::new(s);
    (0..1000)
        .map(|i| {
            let k = format!("user-{i}");
            // One write: a head in pieces waits on Nagle and delayed ACKs.
            let req = format!("GET / HTTP/1.1\r\nHost: t\r\nX-User: {k}\r\n\r\n");
            s.get_mut().write_all(req.as_bytes()).unwrap();
            let mut len = 0;
            loop {
                let mut line = String::new();
                s.read_line(&mut line).unwrap();
                if line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    len = v.trim().parse().unwrap();
                }
            }
            let mut body = vec![0; len];
            s.read_exact(&mut body).unwrap();
            let b = String::from_utf8_lossy(&body);
            (k, b.trim().trim_start_matches("served by ").to_string())
        })
        .collect()
}

#[test]
fn backends_follow_the_dns_records_and_two_fronts_agree_on_every_key() {
    let bport = free_port();
    let addr = |i: u8| format!("127.0.0.{i}:{bport}");
    let _servers = backends(&[addr(2), addr(3), addr(4), addr(5)]);
    let dns = Dns::start(
        "a",
        "127.0.0.2 api.test\n127.0.0.3 api.test\n127.0.0.4 api.test\n",
        &[],
    );
    let discover = format!("api.test:{bport}");
    let front = |tag: &str| {
        Herd::start(
            &[
                "--name",
                &name(tag),
                "--upstream-dns",
                &discover,
                "--resolver",
                &dns.resolver(),
                "--balance",
                "hash:header:X-User",
                "--health-interval",
                "0",
            ],
            &[],
        )
    };
    let (a, b) = (front("dns-a"), front("dns-b"));
    for h in [&a, &b] {
        assert!(
            wait_until(T, || served_by(h.port, "x").is_some()),
            "{}",
            h.log()
        );
    }
    // Two front herds over the same records pick the same backend per key.
    let (pa, pb) = (picks(a.port), picks(b.port));
    assert_eq!(pa, pb, "the fronts disagree");
    let used: std::collections::BTreeSet<_> = pa.values().cloned().collect();
    assert_eq!(used.len(), 3, "{used:?}");

    // .2 leaves, .5 joins: the fronts follow within a few TTLs, and only
    // the keys of the backends that changed move.
    dns.set("127.0.0.3 api.test\n127.0.0.4 api.test\n127.0.0.5 api.test\n");
    for h in [&a, &b] {
        assert!(
            wait_until(T, || {
                let seen: std::collections::BTreeSet<_> = (0..40)
                    .filter_map(|i| served_by(h.port, &format!("k{i}")))
                    .collect();
                seen.contains(&addr(5)) && !seen.contains(&addr(2))
            }),
            "{}",
            h.log()
        );
        assert!(
            h.log().contains("DNS: 1 backends came, 1 went"),
            "{}",
            h.log()
        );
    }
    // `herd status` lists them, named by address and by the DNS name.
    let st = herd(&["status", "--name", &name("dns-a"), "--json"]);
    let st: serde_json::Value = serde_json::from_slice(&st.stdout).unwrap();
    let mut listed: Vec<String> = st["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap().to_string())
        .collect();
    listed.sort();
    let want: Vec<String> = [3, 4, 5]
        .iter()
        .map(|i| format!("upstream {} (api.test)", addr(*i)))
        .collect();
    assert_eq!(listed, want);
    let (qa, qb) = (picks(a.port), picks(b.port));
    assert_eq!(qa, qb, "the fronts disagree after the change");
    for (k, before) in &pa {
        if *before != addr(2) {
            assert!(
                qa[k] == *before || qa[k] == addr(5),
                "{k} moved from {before} to {} though its backend stayed",
                qa[k]
            );
        }
    }

    // The DNS server goes away: the last good set keeps serving.
    drop(dns);
    assert!(
        a.wait_log("keeping the 3 backends it gave last", T),
        "{}",
        a.log()
    );
    assert_eq!(picks(a.port), qa);
}

#[test]
fn srv_records_give_ports_weights_and_backups() {
    let (p1, p2, p3) = (free_port(), free_port(), free_port());
    let _servers = backends(&[
        format!("127.0.0.6:{p1}"),
        format!("127.0.0.7:{p2}"),
        format!("127.0.0.8:{p3}"),
    ]);
    // Weights 1 and 3 at priority 0; a backup at priority 10.
    let dns = Dns::start(
        "srv",
        "127.0.0.6 b1.test\n127.0.0.7 b2.test\n127.0.0.8 b3.test\n",
        &[
            format!("--srv-host=_web._tcp.svc.test,b1.test,{p1},0,1"),
            format!("--srv-host=_web._tcp.svc.test,b2.test,{p2},0,3"),
            format!("--srv-host=_web._tcp.svc.test,b3.test,{p3},10,1"),
        ],
    );
    let h = Herd::start(
        &[
            "--upstream-srv",
            "_web._tcp.svc.test",
            "--resolver",
            &dns.resolver(),
            "--balance",
            "weighted",
            "--health-interval",
            "0",
        ],
        &[],
    );
    assert!(
        wait_until(T, || served_by(h.port, "x").is_some()),
        "{}",
        h.log()
    );
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..400 {
        *counts
            .entry(served_by(h.port, &i.to_string()).unwrap())
            .or_default() += 1;
    }
    assert_eq!(
        counts.get(&format!("127.0.0.6:{p1}")),
        Some(&100),
        "{counts:?}"
    );
    assert_eq!(
        counts.get(&format!("127.0.0.7:{p2}")),
        Some(&300),
        "{counts:?}"
    );
    assert_eq!(
        counts.get(&format!("127.0.0.8:{p3}")),
        None,
        "the backup serves only when needed"
    );
}

#[test]
fn discovery_flags_are_checked() {
    let (code, err) = run_fail(&["run", "--upstream-dns", "api.test"]);
    assert_ne!(code, 0);
    assert!(err.contains("expected NAME:PORT"), "{err}");
    let (_, err) = run_fail(&["run", "--upstream-srv", "web.test"]);
    assert!(err.contains("_SERVICE._PROTO.NAME"), "{err}");
    let (code, err) = run_fail(&["run", "--upstream-dns", "api..test:80"]);
    assert_ne!(code, 0);
    assert!(err.contains("not a DNS name (an empty label)"), "{err}");
    assert_eq!(err.trim().lines().count(), 1, "one line: {err}");
    let (_, err) = run_fail(&["run", "--upstream-srv", "_http._tcp.web test"]);
    assert!(err.contains("letters, digits, - and _ only"), "{err}");
    let (_, err) = run_fail(&["run", "--upstream-dns", "a.test:80", "--resolver", "nope"]);
    assert!(err.contains("--resolver"), "{err}");
    let (_, err) = run_fail(&[
        "run",
        "--mode",
        "shared",
        "--upstream-dns",
        "a.test:80",
        "--",
        DEMO,
    ]);
    assert!(err.contains("needs --mode proxy"), "{err}");
}
