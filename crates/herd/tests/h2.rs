//! HTTP/2 towards backends and gRPC through herd, with real servers and
//! clients: Node's `http2` module as an h2c worker and upstream, curl over
//! HTTP/1.1, h2c and TLS, Python's grpcio for unary and streaming calls
//! (balanced per call, errors and deadlines, cancellation, reloads and
//! stops during a stream), and raw HTTP/2 frames for a rapid-reset flood.

mod common;

use std::io::{Read, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(30);

fn example(p: &str) -> String {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(p)
        .display()
        .to_string()
}

fn curl(args: &[&str]) -> String {
    output_ok(
        Command::new("curl")
            .args(["-sS", "--max-time", "10"])
            .args(args),
    )
}

#[test]
fn h2c_workers_and_upstreams_serve_http1_h2c_and_are_health_checked_over_http2() {
    let js = example("node/h2.js");
    let h = Herd::start(
        &[
            "-i",
            "2",
            "--backend-protocol",
            "h2",
            "--access-log",
            "-",
            "--access-log-format",
            "json",
        ],
        &["node", &js],
    );
    h.wait_ready(2);
    let url = format!("http://127.0.0.1:{}/", h.port);
    // An HTTP/1.1 client and an h2c one; the worker is reached over HTTP/2.
    let one = curl(&["--http1.1", &url]);
    assert!(one.starts_with("HTTP/2.0 worker"), "{one}");
    assert!(one.trim_end().ends_with(" http"), "{one}");
    let two = curl(&["--http2-prior-knowledge", "-w", "%{http_version}", &url]);
    assert!(
        two.starts_with("HTTP/2.0 worker") && two.ends_with('2'),
        "{two}"
    );
    // Each request is balanced on its own (round-robin: both workers).
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        let (status, body) = h.get("/").unwrap();
        assert_eq!(status, 200);
        // (Chunked: the worker's answer had no length.)
        seen.insert(body.contains("worker 0"));
    }
    assert_eq!(seen.len(), 2, "{seen:?}");
    // Each request has its access log line, with its protocol and worker.
    for protocol in ["HTTP/1.1", "HTTP/2.0"] {
        let want = format!(r#""protocol":"{protocol}","status":200"#);
        assert!(h.wait_log(&want, T), "{}", h.log());
    }
    assert!(h.wait_log(r#""worker":"worker-1""#, T), "{}", h.log());

    // An upstream marked h2, health-checked with GET over HTTP/2: a 404
    // takes it out (an HTTP/1.1 check would get no answer at all).
    let (port, _node) = node_h2("up", &[]);
    let lb = Herd::start(
        &[
            &format!("--upstream=127.0.0.1:{port},h2"),
            "--health-path",
            "/missing",
            "--health-interval",
            "200ms",
        ],
        &[],
    );
    assert!(lb.wait_log("listening on", T), "{}", lb.log());
    assert!(lb.wait_log("GET /missing answered 404", T), "{}", lb.log());
    let lb2 = Herd::start(
        &[
            &format!("--upstream=127.0.0.1:{port},h2"),
            "--health-path",
            "/healthz",
        ],
        &[],
    );
    assert!(lb2.wait_log("listening on", T));
    let body = curl(&[&format!("http://127.0.0.1:{}/", lb2.port)]);
    assert!(body.starts_with("HTTP/2.0 worker up"), "{body}");
}

/// An h2c upstream on a Unix socket (`--upstream unix:PATH,h2`): reached
/// over HTTP/2 there, and health-checked over HTTP/2 (a 404 takes it out).
#[test]
fn an_h2c_upstream_on_a_unix_socket_is_served_and_checked_over_http2() {
    let dir = std::env::temp_dir().join(name("h2-unix"));
    std::fs::create_dir_all(&dir).unwrap();
    let sock = dir.join("h2.sock");
    let js = "require('node:http2').createServer((q, s) => { \
              if (q.url === '/missing') { s.statusCode = 404; return s.end(); } \
              s.end(`HTTP/${q.httpVersion} on unix\\n`); }).listen(process.argv[1]);";
    let _node = Killed(
        Command::new("node")
            .args(["-e", js])
            .arg(&sock)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(T, || std::os::unix::net::UnixStream::connect(
        &sock
    )
    .is_ok()));
    let spec = format!("--upstream=unix:{},h2", sock.display());
    let h = Herd::start(&[&spec], &[]);
    assert!(h.wait_log("listening on", T), "{}", h.log());
    let url = format!("http://127.0.0.1:{}/", h.port);
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let body = curl(&[version, &url]);
        assert!(body.starts_with("HTTP/2.0 on unix"), "{version}: {body}");
    }
    let checked = Herd::start(
        &[
            &spec,
            "--health-path",
            "/missing",
            "--health-interval",
            "200ms",
        ],
        &[],
    );
    assert!(
        checked.wait_log("GET /missing answered 404", T),
        "{}",
        checked.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// An h2 upstream added by a reload (the config file's list read again):
/// HTTP/1.1 clients, served until then by herd's own engine, which speaks
/// neither HTTP/2 nor TLS to backends, reach it on their next connection.
/// A keep-alive connection open across the reload still gets its answer
/// (from a backend that engine can reach), told to close.
#[test]
fn an_h2_upstream_added_by_a_reload_is_reached_by_http1_clients() {
    let plain = free_port();
    let _demo = Killed(
        Command::new(DEMO)
            .env("PORT", plain.to_string())
            .env_remove("HERD_WORKER_ID")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    assert!(wait_until(T, || std::net::TcpStream::connect((
        "127.0.0.1",
        plain
    ))
    .is_ok()));
    let (h2, _node) = node_h2("up", &[]);
    let dir = std::env::temp_dir().join(format!("herd-h2-reload-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("herd.toml");
    std::fs::write(&file, format!("upstream = [\"127.0.0.1:{plain}\"]\n")).unwrap();
    let n = name("h2-reload");
    let lb = Herd::start(&["--name", &n, "--config", file.to_str().unwrap()], &[]);
    assert!(lb.wait_log("listening on", T), "{}", lb.log());
    // Keep-alive connections open across the reload, each asking once
    // before and once after; a POST is not retried elsewhere, so one sent
    // to the h2 upstream over HTTP/1.1 would be a 502.
    let mut open: Vec<std::net::TcpStream> = (0..4)
        .map(|_| {
            let s = std::net::TcpStream::connect(("127.0.0.1", lb.port)).unwrap();
            s.set_read_timeout(Some(T)).unwrap();
            s
        })
        .collect();
    let ask = |s: &mut std::net::TcpStream| -> String {
        s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi")
            .unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        // One answer: its head, then its Content-Length's worth of body.
        loop {
            let n = s.read(&mut buf).unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&got));
            got.extend_from_slice(&buf[..n]);
            let text = String::from_utf8_lossy(&got).to_string();
            if let Some((head, body)) = text.split_once("\r\n\r\n") {
                let len: usize = head
                    .lines()
                    .find_map(|l| {
                        let l = l.to_ascii_lowercase();
                        l.strip_prefix("content-length:")
                            .map(|v| v.trim().parse().unwrap())
                    })
                    .unwrap();
                if body.len() >= len {
                    return text;
                }
            }
        }
    };
    for s in &mut open {
        let first = ask(s);
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    }
    std::fs::write(
        &file,
        format!("upstream = [\"127.0.0.1:{plain}\", \"127.0.0.1:{h2},h2\"]\n"),
    )
    .unwrap();
    let out = ok(&herd(&["reload", &n]));
    assert!(
        out.contains("upstreams read again: 1 came, 0 went"),
        "{out}"
    );
    for s in &mut open {
        let answer = ask(s);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(
            answer.to_ascii_lowercase().contains("connection: close"),
            "{answer}"
        );
    }
    let bodies: Vec<String> = (0..4)
        .map(|_| curl(&[&format!("http://127.0.0.1:{}/", lb.port)]))
        .collect();
    assert!(
        bodies.iter().any(|b| b.starts_with("HTTP/2.0 worker up")),
        "{bodies:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A process killed when the test ends.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// examples/node/h2.js outside herd, as worker ID, with extra environment;
/// its port once it listens.
fn node_h2(id: &str, env: &[(&str, &std::path::Path)]) -> (u16, Killed) {
    let port = free_port();
    let node = Command::new("node")
        .arg(example("node/h2.js"))
        .env("PORT", port.to_string())
        .env("HERD_WORKER_ID", id)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let node = Killed(node);
    assert!(wait_until(T, || std::net::TcpStream::connect((
        "127.0.0.1",
        port
    ))
    .is_ok()));
    (port, node)
}

/// Runs examples/grpc/client.py against PORT; its JSON report.
fn grpc_client(port: u16) -> serde_json::Value {
    let out = Command::new("python3")
        .arg(example("grpc/client.py"))
        .arg(format!("127.0.0.1:{port}"))
        .stdin(Stdio::null())
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}

/// One long server stream (N messages, 50 ms apart) in the background.
fn long_stream(port: u16, n: usize) -> std::process::Child {
    let mut c = Command::new("python3")
        .arg(example("grpc/client.py"))
        .args([format!("127.0.0.1:{port}"), "long".into(), n.to_string()])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for "started": the stream is in flight (its first message came).
    let mut first = [0u8; 8];
    c.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    assert_eq!(&first, b"started\n");
    c
}

fn stream_result(c: std::process::Child) -> String {
    let out = c.wait_with_output().unwrap();
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn grpc_calls_are_balanced_per_call_with_trailers_deadlines_and_cancellation() {
    let py = example("grpc/server.py");
    let n = name("grpc");
    let h = Herd::start(
        &["--name", &n, "-i", "2", "--backend-protocol", "h2"],
        &["python3", &py],
    );
    h.wait_ready(2);
    let r = grpc_client(h.port);
    // One channel (one HTTP/2 connection to herd), yet every call picks.
    assert_eq!(r["unary"]["worker 0"], 10, "{r}");
    assert_eq!(r["unary"]["worker 1"], 10, "{r}");
    assert_eq!(
        r["stream_lengths"],
        serde_json::json!([5, 5, 5, 5, 5, 5]),
        "{r}"
    );
    assert_eq!(r["stream_workers"]["worker 0"], 3, "{r}");
    assert_eq!(
        r["stream_mixed"], false,
        "a stream stays on its worker: {r}"
    );
    // The status and message travel in the trailers, intact.
    assert_eq!(
        r["error"],
        serde_json::json!(["NOT_FOUND", "no such thing"]),
        "{r}"
    );
    assert_eq!(r["deadline"][0], "DEADLINE_EXCEEDED", "{r}");
    assert!(r["deadline"][1].as_f64().unwrap() < 2.0, "{r}");
    // The client's RST_STREAM reaches the worker: its stream stops.
    assert_eq!(r["cancelled_after"], 2, "{r}");
    assert!(h.wait_log("stream cancelled after", T), "{}", h.log());

    // A reload during a stream: the stream finishes on its old worker.
    let c = long_stream(h.port, 40);
    let start = Instant::now();
    ok(&herd(&["reload", "--name", &n]));
    assert_eq!(stream_result(c), "40");
    assert!(start.elapsed() > Duration::from_millis(1500));
}

#[test]
fn a_stop_lets_an_http2_stream_finish() {
    let py = example("grpc/server.py");
    let n = name("grpc-stop");
    let mut h = Herd::start(
        &["--name", &n, "-i", "1", "--backend-protocol", "h2"],
        &["python3", &py],
    );
    h.wait_ready(1);
    let c = long_stream(h.port, 30);
    h.signal("TERM");
    assert_eq!(stream_result(c), "30");
    assert_eq!(h.wait_exit(T).and_then(|s| s.code()), Some(0));
}

/// An HTTP/2 frame: length, type, flags, stream id, payload.
fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// Whether HTTP/2 frames `got` (from a connection's start) hold a GOAWAY.
fn has_goaway(got: &[u8]) -> bool {
    let mut at = 0;
    while at + 9 <= got.len() {
        if got[at + 3] == 7 {
            return true;
        }
        let len = (got[at] as usize) << 16 | (got[at + 1] as usize) << 8 | got[at + 2] as usize;
        at += 9 + len;
    }
    false
}

#[test]
fn a_rapid_reset_flood_closes_that_connection_only() {
    let js = example("node/h2.js");
    let h = Herd::start(&["-i", "1", "--backend-protocol", "h2"], &["node", &js]);
    h.wait_ready(1);
    let mut s = std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[])); // SETTINGS
    // GET / (HPACK: :method GET, :scheme http, :path /, :authority a),
    // reset at once, 5,000 times.
    let block = [0x82, 0x86, 0x84, 0x41, 0x01, b'a'];
    for i in 0..5000u32 {
        let id = 2 * i + 1;
        out.extend(frame(1, 0x4 | 0x1, id, &block)); // HEADERS, END_HEADERS|END_STREAM
        out.extend(frame(3, 0, id, &8u32.to_be_bytes())); // RST_STREAM CANCEL
    }
    let _ = s.write_all(&out);
    // herd answers with GOAWAY and closes this connection.
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(has_goaway(&got), "no GOAWAY in {} bytes", got.len());
    // Everyone else is served.
    let body = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{}/", h.port),
    ]);
    assert!(body.starts_with("HTTP/2.0 worker 0"), "{body}");
}

#[test]
fn upstreams_over_tls_get_h2_or_http1_by_alpn_and_their_certificates_checked() {
    let pki = Pki::new("upstream");
    let (cert, key) = pki.leaf("localhost");
    // An h2-over-TLS upstream: Node's secure HTTP/2 server (no HTTP/1.1).
    let (port, _node) = node_h2("tls", &[("TLS_CERT", &cert), ("TLS_KEY", &key)]);
    let ca = pki.path("ca.crt");
    let lb = Herd::start(
        &[
            &format!("--upstream=localhost:{port},h2,tls"),
            "--upstream-ca",
            s(&ca),
        ],
        &[],
    );
    assert!(lb.wait_log("listening on", T), "{}", lb.log());
    let body = curl(&["--http1.1", &format!("http://127.0.0.1:{}/", lb.port)]);
    assert!(body.starts_with("HTTP/2.0 worker tls"), "{body}");
    // HTTP/1.1 over TLS: herd itself as the TLS backend, in front of the demo.
    let backend = Herd::start(
        &["-i", "1", "--tls-cert", s(&cert), "--tls-key", s(&key)],
        &[DEMO],
    );
    backend.wait_ready(1);
    let lb1 = Herd::start(
        &[
            &format!("--upstream=localhost:{},tls", backend.port),
            "--upstream-ca",
            s(&ca),
        ],
        &[],
    );
    assert!(lb1.wait_log("listening on", T));
    let (status, body) = lb1.get("/headers").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("HTTP/1.1"), "{body}");
    // The backend herd terminated TLS: it told the demo so.
    assert!(body.contains("x-forwarded-proto: https"), "{body}");
    // A certificate from another CA is refused: the client gets a 502.
    let other = Pki::new("other");
    let lb2 = Herd::start(
        &[
            &format!("--upstream=localhost:{},tls", backend.port),
            "--upstream-ca",
            s(&other.path("ca.crt")),
        ],
        &[],
    );
    assert!(lb2.wait_log("listening on", T));
    let (status, _) = lb2.get("/").unwrap();
    assert_eq!(status, 502);
}

/// The master's resident memory in KiB.
#[test]
fn continuation_settings_and_ping_floods_cost_only_their_connection() {
    let js = example("node/h2.js");
    let h = Herd::start(&["-i", "1", "--backend-protocol", "h2"], &["node", &js]);
    h.wait_ready(1);
    let preface = || {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        out.extend(frame(4, 0, 0, &[]));
        out
    };
    // CONTINUATION flood: one header block that never ends. herd stops
    // reading it at the header-list limit and closes with GOAWAY.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_write_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut out = preface();
    out.extend(frame(1, 0x1, 1, &[0x82, 0x86, 0x84, 0x41, 0x01, b'a'])); // HEADERS, no END_HEADERS
    let mut literal = vec![0x00, 0x03, b'x', b'-', b'a', 0x7f, 0x00];
    literal.extend(std::iter::repeat_n(b'a', 127));
    for _ in 0..2000 {
        out.extend(frame(9, 0, 1, &literal)); // CONTINUATION, no END_HEADERS
    }
    let _ = s.write_all(&out);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    assert!(got.len() >= 9, "no answer to the CONTINUATION flood");

    // Ping and settings floods, written without reading a single answer:
    // herd keeps at most one answer pending per connection, so the flood
    // runs into TCP back-pressure instead of herd's memory.
    let before = rss_kib(h.child.id());
    let flooders: Vec<_> = [6u8, 4u8]
        .into_iter()
        .map(|kind| {
            let port = h.port;
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
                s.set_write_timeout(Some(Duration::from_secs(3))).unwrap();
                let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
                out.extend(frame(4, 0, 0, &[]));
                let payload: &[u8] = if kind == 6 {
                    &[7u8; 8]
                } else {
                    &[0, 3, 0, 0, 0, 100]
                };
                let one = frame(kind, 0, 0, payload);
                for _ in 0..20_000 {
                    out.extend_from_slice(&one);
                }
                let mut sent = 0;
                for _ in 0..20 {
                    if s.write_all(&out).is_err() {
                        break;
                    }
                    sent += 1;
                }
                (s, sent)
            })
        })
        .collect();
    // Meanwhile everyone else is served.
    for _ in 0..20 {
        let body = curl(&[
            "--http2-prior-knowledge",
            &format!("http://127.0.0.1:{}/", h.port),
        ]);
        assert!(body.starts_with("HTTP/2.0 worker 0"), "{body}");
    }
    let held: Vec<_> = flooders.into_iter().map(|t| t.join().unwrap()).collect();
    let grown = rss_kib(h.child.id()).saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "the master grew by {grown} KiB under the floods"
    );
    drop(held);
    let body = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{}/", h.port),
    ]);
    assert!(body.starts_with("HTTP/2.0 worker 0"), "{body}");
}

/// hyper keeps an HTTP/2 connection with no stream open for as long as the
/// client does; herd closes it after `--idle-timeout` (GOAWAY), so clients
/// that vanished without a FIN do not hold sockets for good. A request
/// that takes longer than the time-out is not cut, nor a quiet answer.
#[test]
fn idle_http2_connections_close_after_the_idle_timeout_but_slow_requests_finish() {
    let h = Herd::start(&["-i", "1", "--idle-timeout", "1s"], &[DEMO]);
    h.wait_ready(1);
    // A client that says hello and then nothing (it never answers the
    // PING of hyper's graceful GOAWAY either, as a vanished one would not).
    let mut s = std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    hello.extend(frame(4, 0, 0, &[])); // SETTINGS
    s.write_all(&hello).unwrap();
    let t = Instant::now();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let took = t.elapsed();
    assert!(has_goaway(&got), "no GOAWAY in {} bytes", got.len());
    // The time-out, then as long again for the GOAWAY's answer.
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(6),
        "closed after {took:?}"
    );
    let body = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{}/slow?ms=2500", h.port),
    ]);
    assert!(body.starts_with("slow done by worker 0"), "{body}");
    // Nor an answer whose body goes quiet for longer (a gRPC subscription,
    // server-sent events): its stream keeps the connection busy.
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && c.read_exact(&mut byte).is_ok() {
                head.push(byte[0]);
            }
            let _ = c
                .write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst \r\n");
            std::thread::sleep(Duration::from_millis(2500));
            let _ = c.write_all(b"4\r\nlast\r\n0\r\n\r\n");
        }
    });
    let up = format!("--upstream=127.0.0.1:{port}");
    let quiet = Herd::start(
        &["--idle-timeout", "1s", "--health-interval", "0", &up],
        &[],
    );
    quiet.wait_ready(0);
    let body = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{}/", quiet.port),
    ]);
    assert_eq!(body, "first last");
}

/// The `:status` of the answer to a GET over h2c naming `authority`, with a
/// `Host` header too when given: the first byte of the answer's header
/// block (hyper indexes 200 as 0x88 and 400 as 0x8c in HPACK's table).
fn h2c_status_byte(port: u16, authority: &str, host: Option<&str>) -> u8 {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // :method GET, :scheme http, :path / (indexed), then literals.
    let mut block = vec![0x82, 0x86, 0x84, 0x41, authority.len() as u8];
    block.extend_from_slice(authority.as_bytes());
    if let Some(host) = host {
        block.extend_from_slice(&[0x00, 4]);
        block.extend_from_slice(b"host");
        block.push(host.len() as u8);
        block.extend_from_slice(host.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[])); // SETTINGS
    out.extend(frame(1, 0x4 | 0x1, 1, &block)); // HEADERS, END_HEADERS|END_STREAM
    s.write_all(&out).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "closed before an answer: {got:?}");
        got.extend_from_slice(&buf[..n]);
        let mut at = 0;
        while at + 9 <= got.len() {
            let len = (got[at] as usize) << 16 | (got[at + 1] as usize) << 8 | got[at + 2] as usize;
            let stream = u32::from_be_bytes([got[at + 5], got[at + 6], got[at + 7], got[at + 8]]);
            if got[at + 3] == 1 && stream == 1 && at + 9 < got.len() {
                return got[at + 9];
            }
            at += 9 + len;
        }
    }
}

/// RFC 9113, 8.3.1: a `Host` that differs from `:authority` makes a request
/// malformed; forwarded, the backend would route by a host other than the
/// one the request names.
#[test]
fn an_http2_host_header_that_differs_from_the_authority_gets_400() {
    let h = Herd::start(&["-i", "1"], &[DEMO]);
    h.wait_ready(1);
    assert_eq!(h2c_status_byte(h.port, "good", None), 0x88, "200");
    assert_eq!(h2c_status_byte(h.port, "good", Some("good")), 0x88, "200");
    assert_eq!(h2c_status_byte(h.port, "good", Some("evil")), 0x8c, "400");
}

#[test]
fn an_http2_client_that_leaves_before_its_answer_is_logged_499() {
    let log = std::env::temp_dir().join(format!("herd-h2-499-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let h = Herd::start(&["-i", "1", "--access-log", log.to_str().unwrap()], &[DEMO]);
    h.wait_ready(1);
    // curl gives up after 0.5 s on an answer that takes 5.
    let gave_up = Command::new("curl")
        .args(["-sS", "--max-time", "0.5", "--http2-prior-knowledge"])
        .arg(format!("http://127.0.0.1:{}/slow?ms=5000", h.port))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(!gave_up.success());
    let body = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{}/", h.port),
    ]);
    assert!(body.contains("worker 0"), "{body}");
    assert!(
        wait_until(T, || std::fs::read_to_string(&log).is_ok_and(|l| {
            l.contains("\"GET /slow?ms=5000 HTTP/2.0\" 499 0")
                && l.contains("\"GET / HTTP/2.0\" 200")
        })),
        "{:?}",
        std::fs::read_to_string(&log)
    );
    let _ = std::fs::remove_file(&log);
}

#[test]
fn answers_served_through_hyper_are_logged_when_sent_whole_and_their_bytes_counted() {
    // A chunked answer (no Content-Length) in two pieces 300 ms apart,
    // after the request's body of 12 bytes.
    let port = raw_backend(|mut c, _head| {
        let mut body = [0u8; 12];
        if c.read_exact(&mut body).is_err() {
            return;
        }
        let _ =
            c.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nfirst \r\n");
        std::thread::sleep(Duration::from_millis(300));
        let _ = c.write_all(b"4\r\nlast\r\n0\r\n\r\n");
    });
    let log = std::env::temp_dir().join(format!("herd-h2-bytes-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let admin = free_port();
    let (up, admin_at) = (
        format!("--upstream=127.0.0.1:{port}"),
        format!("127.0.0.1:{admin}"),
    );
    let h = Herd::start(
        &[
            "--health-interval",
            "0",
            &up,
            "--admin",
            &admin_at,
            "--access-log",
            log.to_str().unwrap(),
            "--access-log-format",
            "json",
        ],
        &[],
    );
    h.wait_ready(0);
    let body = curl(&[
        "--http2-prior-knowledge",
        "--data-binary",
        "twelve bytes",
        &format!("http://127.0.0.1:{}/", h.port),
    ]);
    assert_eq!(body, "first last");
    let mut line = serde_json::Value::Null;
    assert!(
        wait_until(T, || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            match text.lines().next().map(serde_json::from_str) {
                Some(Ok(v)) => {
                    line = v;
                    true
                }
                _ => false,
            }
        }),
        "no access log line"
    );
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["protocol"], "HTTP/2.0", "{line}");
    // The body's bytes (it has no Content-Length), and the time to its end.
    assert_eq!(line["bytes"], 10, "{line}");
    assert!(line["duration"].as_f64().unwrap() >= 0.29, "{line}");
    let (code, metrics) = http_get(admin, "/metrics").unwrap();
    assert_eq!(code, 200);
    let bytes = |direction: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with("herd_backend_bytes_total{") && l.contains(direction))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{metrics}"))
    };
    assert_eq!(bytes("to_client"), 10.0, "{metrics}");
    assert_eq!(bytes("to_backend"), 12.0, "the request's body; {metrics}");
    let _ = std::fs::remove_file(&log);
}

#[test]
fn clients_that_stop_reading_an_http2_backends_answer_do_not_stall_the_others() {
    let (port, _node) = node_h2("0", &[]);
    let up = format!("--upstream=127.0.0.1:{port},h2");
    let h = Herd::start(&["--health-interval", "0", &up], &[]);
    h.wait_ready(0);
    let before = rss_kib(h.child.id());
    // 20 clients ask for 64 MiB each and then stop reading: over the two
    // proxy threads' connections to the backend, several streams each.
    let stalled: Vec<std::net::TcpStream> = (0..20)
        .map(|_| {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap();
            socket2::SockRef::from(&s)
                .set_recv_buffer_size(4096)
                .unwrap();
            s.write_all(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
                .unwrap();
            let mut first = [0u8; 12];
            s.read_exact(&mut first).unwrap();
            assert_eq!(&first, b"HTTP/1.1 200");
            s
        })
        .collect();
    // Their streams' windows fill (256 KiB each here; hyper's default of
    // 2 MiB let three of them use up a connection's 5 MiB).
    assert!(
        wait_until(T, || rss_kib(h.child.id()) > before + 4 * 1024),
        "the stalled answers never filled their windows: {} KiB more",
        rss_kib(h.child.id()) - before
    );
    for _ in 0..4 {
        let t = Instant::now();
        let body = curl(&[&format!("http://127.0.0.1:{}/", h.port)]);
        assert!(body.starts_with("HTTP/2.0 worker 0"), "{body}");
        assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    }
    // And they hold little: at most their windows and herd's buffers.
    let grew = rss_kib(h.child.id()).saturating_sub(before);
    assert!(grew < 20 * 700, "20 stalled answers hold {grew} KiB");
    drop(stalled);
}

#[test]
fn an_http2_client_that_opens_many_streams_and_stops_reading_holds_little() {
    // Every request but /small gets a 200 MiB answer, written as fast as it goes.
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = accepted.clone();
    let port = raw_backend(move |mut c, head| {
        counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        if head.starts_with(b"GET /small") {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nsmall");
            return;
        }
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 209715200\r\n\r\n");
        let chunk = vec![b'x'; 64 * 1024];
        while c.write_all(&chunk).is_ok() {}
    });
    let up = format!("--upstream=127.0.0.1:{port}");
    let h = Herd::start(&["--health-interval", "0", &up], &[]);
    h.wait_ready(0);
    let before = rss_kib(h.child.id());
    // An h2c client that grants the largest windows, opens 200 streams and
    // reads nothing.
    let mut s = std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    socket2::SockRef::from(&s)
        .set_recv_buffer_size(4096)
        .unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(frame(4, 0, 0, &[0, 4, 0x7f, 0xff, 0xff, 0xff])); // INITIAL_WINDOW_SIZE
    out.extend(frame(8, 0, 0, &(0x7fff_ffffu32 - 65_535).to_be_bytes()));
    // GET http://x/big: indexed :method and :scheme, literal :authority and :path.
    let block = [0x82, 0x86, 0x01, 1, b'x', 0x04, 4, b'/', b'b', b'i', b'g'];
    for i in 0..200u32 {
        out.extend(frame(1, 0x5, 2 * i + 1, &block)); // END_STREAM | END_HEADERS
    }
    s.write_all(&out).unwrap();
    // At most 128 streams are taken up (the rest are refused).
    assert!(
        wait_until(T, || accepted.load(std::sync::atomic::Ordering::SeqCst)
            >= 128),
        "{} backend connections",
        accepted.load(std::sync::atomic::Ordering::SeqCst)
    );
    // Once herd has filled what it holds for them, it stops growing.
    let mut last = 0;
    assert!(wait_until(T, || {
        let now = rss_kib(h.child.id());
        let steady = now == last;
        last = now;
        std::thread::sleep(Duration::from_millis(300));
        steady
    }));
    let grew = last.saturating_sub(before);
    // About 28 MB; hyper's default of about 400 KiB held per stream: 117 MB.
    assert!(grew < 50 * 1024, "{grew} KiB for 128 stalled streams");
    // Others are served meanwhile.
    let body = curl(&[
        "--http2-prior-knowledge",
        &format!("http://127.0.0.1:{}/small", h.port),
    ]);
    assert_eq!(body, "small");
    drop(s);
}

/// An h2c client (Python's `h2`): one upload to /slow, sent until flow
/// control stops it, then a 5-byte POST to /fast on the same connection;
/// prints how long that one took to be answered, or that it was not.
const UPLOAD_THEN_SMALL: &str = r#"
import socket, sys, time
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); s.settimeout(0.2)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
c.initiate_connection(); s.sendall(c.data_to_send())
def events():
    try: d = s.recv(65536)
    except socket.timeout: return []
    ev = c.receive_data(d); s.sendall(c.data_to_send()); return ev
c.send_headers(1, [(":method", "POST"), (":path", "/slow"), (":scheme", "http"), (":authority", "x"), ("content-length", str(64 << 20))])
sent, start = 0, time.time()
while time.time() - start < 3:
    while True:
        n = min(c.local_flow_control_window(1), c.max_outbound_frame_size, 16384)
        if n <= 0: break
        c.send_data(1, b"x" * n); sent += n
    s.sendall(c.data_to_send()); events()
c.send_headers(3, [(":method", "POST"), (":path", "/fast"), (":scheme", "http"), (":authority", "x"), ("content-length", "5")])
start, body_sent = time.time(), False
while time.time() - start < 5:
    if not body_sent and c.local_flow_control_window(3) >= 5:
        c.send_data(3, b"hello", end_stream=True); body_sent = True
    s.sendall(c.data_to_send())
    for e in events():
        if isinstance(e, h2.events.ResponseReceived) and e.stream_id == 3:
            print(f"answered after {time.time() - start:.2f} s (upload stalled after {sent} bytes)"); sys.exit(0)
print(f"not answered (its body sent: {body_sent}; upload stalled after {sent} bytes)")
"#;

#[test]
fn an_upload_its_backend_is_slow_to_take_does_not_stall_the_connections_other_requests() {
    // /slow takes its request's head and then nothing; /fast reads its body.
    let port = raw_backend(|mut c, head| {
        if head.starts_with(b"POST /slow") {
            std::thread::sleep(Duration::from_secs(30));
            return;
        }
        let mut body = [0u8; 5];
        let _ = c.read_exact(&mut body);
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
    });
    let up = format!("--upstream=127.0.0.1:{port}");
    let h = Herd::start(&["--health-interval", "0", &up], &[]);
    h.wait_ready(0);
    let out = output_ok(
        Command::new("python3")
            .args(["-c", UPLOAD_THEN_SMALL])
            .arg(h.port.to_string()),
    );
    // hyper's default (one 1 MiB window for the whole connection, used up
    // by the stalled upload) left the small request's body unsent.
    assert!(out.starts_with("answered after 0."), "{out}");
}

/// An h2c client (Python's `h2`) that sends one request per stream with the
/// pseudo-headers given as `name=value` arguments after the port, and prints
/// each answer as `STATUS BODY` on a line.
const REQUESTS: &str = r#"
import socket, sys
import h2.connection, h2.config, h2.events
s = socket.create_connection(("127.0.0.1", int(sys.argv[1]))); s.settimeout(10)
c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, validate_outbound_headers=False))
c.initiate_connection()
for i, req in enumerate(sys.argv[2:]):
    c.send_headers(2 * i + 1, [tuple(p.split("=", 1)) for p in req.split(",")], end_stream=True)
s.sendall(c.data_to_send())
status, body, done = {}, {}, 0
while done < len(sys.argv) - 2:
    d = s.recv(65536)
    if not d: break
    for e in c.receive_data(d):
        if isinstance(e, h2.events.ResponseReceived): status[e.stream_id] = dict(e.headers)[b":status"].decode()
        if isinstance(e, h2.events.DataReceived): body[e.stream_id] = body.get(e.stream_id, b"") + e.data
        if isinstance(e, (h2.events.StreamEnded, h2.events.StreamReset)): done += 1
    s.sendall(c.data_to_send())
for k in sorted(status): print(status[k], body.get(k, b"").decode().strip())
"#;

/// An HTTP/2 request without `:authority` reaches an HTTP/1.1 backend with
/// a `Host` (the address the client reached), which HTTP/1.1 requires; a
/// CONNECT is refused with 405, as herd's HTTP/1.1 engine refuses it,
/// instead of reaching the backend as `CONNECT  HTTP/1.1`.
#[test]
fn http2_requests_without_authority_get_a_host_and_connect_is_refused() {
    let port = host_echo_backend();
    let up = format!("--upstream=127.0.0.1:{port}");
    let h = Herd::start(&["--health-interval", "0", &up], &[]);
    h.wait_ready(0);
    let out = output_ok(
        Command::new("python3")
            .args(["-c", REQUESTS])
            .arg(h.port.to_string())
            .arg(":method=GET,:scheme=http,:path=/")
            .arg(":method=CONNECT,:authority=example.test:443"),
    );
    assert_eq!(
        out,
        format!("200 127.0.0.1:{}\n405 method not allowed\n", h.port)
    );
}
