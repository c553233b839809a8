//! Test harness: runs the real `herd` binary against real worker programs
//! on loopback. Every wait polls a condition with a deadline.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const HERD: &str = env!("CARGO_BIN_EXE_herd");

/// A connection to 127.0.0.1:`port` from `ip` (another loopback address
/// of 127/8), as from another host; reads time out after 20 s.
pub fn connect_from(ip: &str, port: u16) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    let from = std::net::SocketAddr::new(ip.parse().unwrap(), 0);
    s.bind(&from.into()).unwrap();
    s.connect(&std::net::SocketAddr::from(([127, 0, 0, 1], port)).into())
        .unwrap();
    let s = TcpStream::from(s);
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    s
}

/// Sends `bytes` from `ip` and reads until the other side closes.
pub fn exchange_from(ip: &str, port: u16, bytes: &[u8]) -> String {
    let mut c = connect_from(ip, port);
    c.write_all(bytes).unwrap();
    let mut all = Vec::new();
    let _ = c.read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

/// `herd`, with a state directory of this test binary's own unless the
/// test gives one: `herd stop` records what it stopped there, and a test's
/// clusters must not show up in the `herd list` of the user running it (or
/// of another test).
pub fn herd_cmd() -> Command {
    let mut c = Command::new(HERD);
    c.env("XDG_STATE_HOME", test_state());
    c
}

pub fn test_state() -> PathBuf {
    std::env::temp_dir().join(format!("herd-test-state-{}", std::process::id()))
}
pub const DEMO: &str = env!("CARGO_BIN_EXE_herd-demo");

/// Polls `cond` every 20 ms until it holds or `timeout` passes.
pub fn wait_until(timeout: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A port for herd to listen on, free when checked. Taken below the
/// kernel's ephemeral range: a port from `bind(0)` is in that range, where
/// any outgoing connection (tests make thousands) may take it before herd
/// binds it ("Address already in use"). No two tests of a run get the same.
pub fn free_port() -> u16 {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<usize>().ok())
        .unwrap_or(32768);
    if low > 12_000 {
        let span = low - 10_000;
        // Each test binary starts elsewhere, so two runs rarely meet either.
        let start = std::process::id() as usize * 7_919 % span;
        for _ in 0..span {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let port = (10_000 + (start + n) % span) as u16;
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running `herd run`, its output collected as it comes.
pub struct Herd {
    pub child: Child,
    pub port: u16,
    log: Arc<Mutex<String>>,
}

impl Herd {
    /// `herd run --listen 127.0.0.1:PORT ARGS... -- CMD...`
    pub fn start(args: &[&str], cmd: &[&str]) -> Herd {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let mut all = vec!["run", "--listen", &listen];
        all.extend_from_slice(args);
        all.push("--");
        all.extend_from_slice(cmd);
        Self::spawn(herd_cmd().args(&all), port)
    }

    /// [`Herd::start`] under `prlimit --nofile=SOFT:HARD` (util-linux).
    pub fn start_with_nofile(nofile: &str, args: &[&str], cmd: &[&str]) -> Herd {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        let limit = format!("--nofile={nofile}");
        let mut c = Command::new("prlimit");
        c.env("XDG_STATE_HOME", test_state());
        c.args([&limit, HERD, "run", "--listen", &listen])
            .args(args)
            .arg("--")
            .args(cmd);
        Self::spawn(&mut c, port)
    }

    pub fn spawn(cmd: &mut Command, port: u16) -> Herd {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn herd");
        let log = Arc::new(Mutex::new(String::new()));
        for r in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let log = log.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(r).lines() {
                    let Ok(line) = line else { break };
                    let mut l = log.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        Herd { child, port, log }
    }

    /// A herd whose output the test reads (or closes) itself.
    pub fn adopt(child: Child, port: u16) -> Herd {
        Herd {
            child,
            port,
            log: Arc::default(),
        }
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }

    /// Waits until the output contains `needle` at least `times` times.
    pub fn wait_log_n(&self, needle: &str, times: usize, timeout: Duration) -> bool {
        wait_until(timeout, || self.log().matches(needle).count() >= times)
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) -> bool {
        self.wait_log_n(needle, 1, timeout)
    }

    /// Waits for "all workers ready (N)", failing the test with the log if not.
    pub fn wait_ready(&self, n: usize) {
        let needle = format!("all workers ready ({n})");
        assert!(
            self.wait_log(&needle, Duration::from_secs(20)),
            "cluster not ready; log:\n{}",
            self.log()
        );
    }

    pub fn get(&self, path: &str) -> std::io::Result<(u16, String)> {
        http_get(self.port, path)
    }

    pub fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }

    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let mut status = None;
        wait_until(timeout, || {
            status = self.child.try_wait().unwrap();
            status.is_some()
        });
        status
    }

    /// Asks until every one of `n` worker ids has answered `/`; returns pid per id.
    pub fn worker_pids(&self, n: usize) -> Vec<u32> {
        let mut pids = vec![0u32; n];
        let ok = wait_until(Duration::from_secs(20), || {
            if let Ok((200, body)) = self.get("/") {
                let (id, pid) = parse_hello(&body);
                if id < n {
                    pids[id] = pid;
                }
            }
            pids.iter().all(|&p| p != 0)
        });
        assert!(
            ok,
            "not every worker answered: {pids:?}\nlog:\n{}",
            self.log()
        );
        pids
    }
}

impl Drop for Herd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            self.signal("TERM");
            if self.wait_exit(Duration::from_secs(10)).is_none() {
                let _ = self.child.kill();
                let _ = self.child.wait();
            }
        }
    }
}

/// `hello from worker N (pid P)` → (N, P).
pub fn parse_hello(body: &str) -> (usize, u32) {
    let id = body
        .split("worker ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(usize::MAX);
    let pid = body
        .split("pid ")
        .nth(1)
        .and_then(|s| {
            s.trim_end_matches(|c: char| !c.is_ascii_digit())
                .parse()
                .ok()
        })
        .unwrap_or(0);
    (id, pid)
}

/// One request on a fresh connection; returns status and body.
pub fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    // One write: `write!` on a bare socket sends each piece of the format
    // separately, and a minimal server may answer (and close) after the first.
    let req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes())?;
    read_response(s)
}

pub fn read_response(mut s: TcpStream) -> std::io::Result<(u16, String)> {
    let mut buf = Vec::new();
    s.read_to_end(&mut buf)?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no HTTP response: {text:?}")))?;
    let body = text
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

pub fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Alive and not a zombie (a reparented zombie may never be reaped here).
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// How many sockets listen on `port` (IPv4 and IPv6), from the kernel's
/// tables: a process whose main thread is a zombie may still have threads
/// exiting that hold its sockets open, so `alive` alone cannot tell that
/// its listeners are gone.
pub fn listeners(port: u16) -> usize {
    let local = format!(":{port:04X} ");
    ["/proc/net/tcp", "/proc/net/tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(t).ok())
        .map(|table| {
            table
                .lines()
                .skip(1)
                .filter(|l| {
                    let mut f = l.split_whitespace();
                    let addr = f.nth(1).unwrap_or("");
                    let state = f.nth(1).unwrap_or("");
                    format!("{addr} ").ends_with(&local) && state == "0A"
                })
                .count()
        })
        .sum()
}

/// Runs `herd ARGS` expecting a quick failure; returns (exit code, stderr).
/// A herd still running after 15 s is killed and reported as code 0, so a
/// test expecting failure fails instead of hanging.
pub fn run_fail(args: &[&str]) -> (i32, String) {
    let mut child = herd_cmd()
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut status = None;
    wait_until(Duration::from_secs(15), || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    let code = match status {
        Some(st) => st.code().unwrap_or(-1),
        None => {
            let _ = child.kill();
            let _ = child.wait();
            0
        }
    };
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    (code, err)
}

/// A unique cluster name per test, so tests running at once do not meet.
pub fn name(tag: &str) -> String {
    format!("t-{tag}-{}", std::process::id())
}

pub fn herd(args: &[&str]) -> Output {
    herd_cmd().args(args).stdin(Stdio::null()).output().unwrap()
}

/// The CLI with its own run directories (`XDG_RUNTIME_DIR`, and `TMPDIR`,
/// where herd looks too), as on another host.
pub fn herd_in(dir: &Path, args: &[&str]) -> Output {
    herd_cmd()
        .env("XDG_RUNTIME_DIR", dir)
        .env("TMPDIR", dir)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

/// After an `Upgrade: echo` request on `s`: reads the answer's head (it
/// must be `101` switching to `echo`), then checks that the tunnel echoes.
pub fn expect_echo_tunnel(s: &mut (impl Read + Write)) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).unwrap();
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: echo"), "{head}");
    for msg in [&b"ping"[..], b"second message"] {
        s.write_all(msg).unwrap();
        let mut got = vec![0u8; msg.len()];
        s.read_exact(&mut got).unwrap();
        assert_eq!(got, msg);
    }
}

/// dnsmasq as the tests run it: in the foreground, answering only from the
/// hosts file given with `--addn-hosts`, with a 1 s TTL.
pub const DNSMASQ: [&str; 8] = [
    "--keep-in-foreground",
    "--bind-interfaces",
    "--no-resolv",
    "--no-hosts",
    "--local-ttl=1",
    "--conf-file=/dev/null",
    "--pid-file=",
    "--user=root",
];

pub fn ok(out: &Output) -> String {
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

/// One request on a keep-alive connection: status, body, and whether the
/// server said `Connection: close`.
pub fn keepalive_get(s: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String, bool)> {
    s.get_mut()
        .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")?;
    read_answer(s)
}

/// The next answer on a keep-alive connection: status, body, and whether
/// the server said `Connection: close`.
pub fn read_answer(s: &mut BufReader<TcpStream>) -> std::io::Result<(u16, String, bool)> {
    let mut line = String::new();
    s.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {line:?}")))?;
    let (mut len, mut close, mut chunked) = (0, false, false);
    loop {
        let mut h = String::new();
        if s.read_line(&mut h)? == 0 {
            return Err(std::io::Error::other("closed inside an answer's head"));
        }
        if h == "\r\n" {
            break;
        }
        let h = h.to_ascii_lowercase();
        if let Some(v) = h.strip_prefix("content-length:") {
            len = v.trim().parse().unwrap_or(0);
        }
        close |= h.starts_with("connection:") && h.contains("close");
        chunked |= h.starts_with("transfer-encoding:") && h.contains("chunked");
    }
    let mut body = Vec::new();
    if chunked {
        // (No extensions or trailers: the tests' backends send none.)
        loop {
            let mut size = String::new();
            s.read_line(&mut size)?;
            let n = usize::from_str_radix(size.trim_end(), 16)
                .map_err(|_| std::io::Error::other(format!("bad chunk size {size:?}")))?;
            let mut chunk = vec![0; n + 2];
            s.read_exact(&mut chunk)?;
            if n == 0 {
                break;
            }
            body.extend_from_slice(&chunk[..n]);
        }
    } else {
        body.resize(len, 0);
        s.read_exact(&mut body)?;
    }
    Ok((status, String::from_utf8_lossy(&body).into_owned(), close))
}

/// 8 clients requesting in a loop until `stop`, counting answers in
/// `done`; each returns (ok, failures). Keep-alive clients behave as wrk
/// does: a connection the server closes between two requests is a failure
/// unless the server said `Connection: close`.
pub fn load(
    port: u16,
    keepalive: bool,
    stop: Arc<AtomicBool>,
    done: Arc<AtomicUsize>,
) -> Vec<std::thread::JoinHandle<(usize, Vec<String>)>> {
    (0..8)
        .map(|_| {
            let (stop, done) = (stop.clone(), done.clone());
            std::thread::spawn(move || {
                let (mut good, mut bad) = (0, Vec::new());
                let mut conn: Option<BufReader<TcpStream>> = None;
                while !stop.load(Ordering::Relaxed) && good + bad.len() < 100_000 {
                    let res = if keepalive {
                        if conn.is_none() {
                            let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
                            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                            conn = Some(BufReader::new(s));
                        }
                        let r = keepalive_get(conn.as_mut().unwrap());
                        if matches!(r, Ok((_, _, true))) {
                            conn = None;
                        }
                        r.map(|(status, body, _)| (status, body))
                    } else {
                        http_get(port, "/")
                    };
                    done.fetch_add(1, Ordering::Relaxed);
                    match res {
                        Ok((200, _)) => good += 1,
                        Ok((code, body)) => bad.push(format!("{code} {body}")),
                        Err(e) => {
                            bad.push(e.to_string());
                            conn = None;
                        }
                    }
                }
                (good, bad)
            })
        })
        .collect()
}

/// Stops [`load`]'s clients and asserts that none of their requests failed.
pub fn no_failures(stop: &AtomicBool, clients: Vec<std::thread::JoinHandle<(usize, Vec<String>)>>) {
    stop.store(true, Ordering::Relaxed);
    let mut bad = Vec::new();
    for c in clients {
        bad.extend(c.join().unwrap().1);
    }
    assert!(
        bad.is_empty(),
        "{} failed: {:?}",
        bad.len(),
        &bad[..bad.len().min(5)]
    );
}

/// GET `path` with extra header lines (each ending in CRLF) on a new
/// connection: (status, body).
pub fn get_with(port: u16, path: &str, headers: &str) -> std::io::Result<(u16, String)> {
    get_host(port, path, "test", headers)
}

/// `GET /` on a connection of its own, given up after `within`: the body
/// of a 200 answer, else `None` (no answer in time, or another status).
pub fn get_within(port: u16, within: Duration) -> Option<String> {
    let mut text = String::new();
    TcpStream::connect(("127.0.0.1", port))
        .and_then(|mut s| {
            s.set_read_timeout(Some(within))?;
            s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")?;
            s.read_to_string(&mut text)
        })
        .ok()?;
    let (head, body) = text.split_once("\r\n\r\n")?;
    head.starts_with("HTTP/1.1 200").then(|| body.to_string())
}

/// [`get_with`] naming `host` in the `Host` header.
pub fn get_host(
    port: u16,
    path: &str,
    host: &str,
    headers: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(Duration::from_secs(30)))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\n{headers}Connection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map_or("", |b| b.1).to_string();
    Ok((status, body))
}

/// A private CA and leaf certificates for chosen names, in a temp dir.
pub struct Pki {
    dir: PathBuf,
}

/// Runs `cmd` with no input and asserts that it succeeded; its output.
pub fn output_ok(cmd: &mut Command) -> String {
    let out = cmd.stdin(Stdio::null()).output().expect("a test tool");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn openssl(dir: &Path, args: &[&str]) {
    output_ok(Command::new("openssl").current_dir(dir).args(args));
}

/// A new P-256 key without a passphrase, for `openssl req`.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

impl Pki {
    pub fn new(tag: &str) -> Pki {
        let dir = std::env::temp_dir().join(format!("herd-tls-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        openssl(
            &dir,
            &[
                &["req", "-x509"][..],
                &EC_KEY,
                &[
                    "-keyout",
                    "ca.key",
                    "-out",
                    "ca.crt",
                    "-subj",
                    "/CN=herd test CA",
                    "-days",
                    "2",
                ],
            ]
            .concat(),
        );
        Pki { dir }
    }

    /// `NAME.crt` and `NAME.key` for the DNS name `NAME`, signed by the CA.
    pub fn leaf(&self, name: &str) -> (PathBuf, PathBuf) {
        std::fs::write(
            self.dir.join(format!("{name}.ext")),
            format!("subjectAltName=DNS:{name}\n"),
        )
        .unwrap();
        openssl(
            &self.dir,
            &[
                &["req"][..],
                &EC_KEY,
                &[
                    "-keyout",
                    &format!("{name}.key"),
                    "-out",
                    &format!("{name}.csr"),
                    "-subj",
                    &format!("/CN={name}"),
                ],
            ]
            .concat(),
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-out",
                &format!("{name}.crt"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        (
            self.path(&format!("{name}.crt")),
            self.path(&format!("{name}.key")),
        )
    }

    pub fn path(&self, f: &str) -> PathBuf {
        self.dir.join(f)
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

pub fn s(p: &std::path::Path) -> &str {
    p.to_str().unwrap()
}

/// A fresh directory named after `what` and this test process, holding
/// `asgi.py`: an ASGI app (uvicorn's `asgi:app`) that answers `asgi ok`.
pub fn asgi_app_dir(what: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("herd-{what}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("asgi.py"),
        "async def app(scope, receive, send):\n    if scope['type'] != 'http':\n        return\n    await send({'type': 'http.response.start', 'status': 200, 'headers': [(b'content-length', b'7')]})\n    await send({'type': 'http.response.body', 'body': b'asgi ok'})\n",
    )
    .unwrap();
    dir
}

/// Writes `mojo.pl`, a Mojolicious::Lite app answering `mojo ok`, into `dir`.
pub fn write_mojo_app(dir: &Path) {
    std::fs::write(
        dir.join("mojo.pl"),
        "use Mojolicious::Lite;\nget '/' => sub { shift->render(text => 'mojo ok') };\napp->start;\n",
    )
    .unwrap();
}

/// A process's resident memory, in KiB (0 once it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// A plain TCP backend on a free port: each connection on its own thread,
/// handed to `serve` with the request head read off it.
pub fn raw_backend(serve: impl Fn(std::net::TcpStream, Vec<u8>) + Send + Sync + 'static) -> u16 {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = backend.local_addr().unwrap().port();
    let serve = Arc::new(serve);
    std::thread::spawn(move || {
        for c in backend.incoming() {
            let Ok(mut c) = c else { break };
            let serve = serve.clone();
            std::thread::spawn(move || {
                if let Some(head) = read_head(&mut c) {
                    serve(c, head);
                }
            });
        }
    });
    port
}

/// A [`raw_backend`] that answers each request with the `Host` it got
/// (`none` without one), so a test sees what herd sent on.
pub fn host_echo_backend() -> u16 {
    raw_backend(|mut c, head| {
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let host = head
            .lines()
            .find_map(|l| l.strip_prefix("host: "))
            .unwrap_or("none")
            .to_string();
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{host}",
            host.len()
        );
    })
}

/// A request head read off `c` byte by byte (so nothing after it is
/// taken); `None` if the connection ends first.
pub fn read_head(c: &mut std::net::TcpStream) -> Option<Vec<u8>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        c.read_exact(&mut byte).ok()?;
        head.push(byte[0]);
    }
    Some(head)
}

/// Python's `HTTPServer` with HTTP/1.1: keep-alive, one connection at a
/// time, as Perl's `HTTP::Daemon` loop serves.
pub const ONE_AT_A_TIME: &str = r#"
import os
from http.server import HTTPServer, BaseHTTPRequestHandler
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        b = f"pid {os.getpid()} connection {self.headers.get('Connection', '-')}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(b)))
        self.end_headers()
        self.wfile.write(b)
    def log_message(self, *a): pass
HTTPServer(("127.0.0.1", int(os.environ["PORT"])), H).serve_forever()
"#;

/// A backend that serves one connection at a time, one request on each
/// (gunicorn's sync worker, a preforking server): it reads a head and the
/// body its `Content-Length` gives, answers `got N` with `Connection:
/// close`, and sends each head it served on the channel.
pub fn one_at_a_time_backend() -> (u16, std::sync::mpsc::Receiver<String>) {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let (heads_tx, heads) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            let Some(head) = read_head(&mut c) else {
                continue;
            };
            let head = String::from_utf8_lossy(&head).into_owned();
            let len = head
                .to_ascii_lowercase()
                .lines()
                .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                .unwrap_or(0);
            let mut body = vec![0; len];
            if c.read_exact(&mut body).is_err() {
                continue;
            }
            let said = format!("got {}", body.len());
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{said}",
                said.len()
            );
            let _ = heads_tx.send(head);
        }
    });
    (port, heads)
}
