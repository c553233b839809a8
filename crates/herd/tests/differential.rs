//! Differential test of the proxy's framing against a real backend parser:
//! Node's `http` (llhttp) behind herd. Valid, pipelined and hostile byte
//! sequences go through herd; the requests Node parsed to their end must be
//! exactly the backend answers the client got. A request smuggled past herd
//! would show as one more parsed than answered (or the reverse).

mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

/// Counts each request whose body ended, answers it with `X-Backend: 1`;
/// llhttp's parse errors are counted and answered 400 without it.
const NODE_BACKEND: &str = r#"
const http = require('http');
let done = 0, errors = 0;
const server = http.createServer((req, res) => {
  if (req.url === '/__count') {
    res.end(JSON.stringify({done, errors}));
    return;
  }
  req.resume();
  req.on('end', () => {
    done++;
    const body = 'n' + done;
    res.writeHead(200, {'X-Backend': '1', 'Content-Length': body.length});
    res.end(body);
  });
});
server.on('clientError', (err, socket) => {
  errors++;
  if (socket.writable) socket.end('HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n');
});
server.listen(+process.env.PORT, '127.0.0.1', () => console.log('listening'));
"#;

struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn node_backend() -> Option<(Node, u16)> {
    let port = free_port();
    let child = Command::new("node")
        .args(["-e", NODE_BACKEND])
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .ok()?;
    Some((listening(child), port))
}

/// Waits for Node's `listening` line. A connect to its port is no proof:
/// in about one run in 30, one went through before Node had a socket at
/// all (its descriptors showed none), and herd's first request was refused.
fn listening(mut child: std::process::Child) -> Node {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::BufRead::read_line(&mut std::io::BufReader::new(out), &mut line);
        let _ = tx.send(line);
    });
    let node = Node(child);
    let line = rx.recv_timeout(T).unwrap_or_default();
    assert_eq!(line.trim(), "listening", "node backend did not listen");
    node
}

/// The Node backend, and herd listening in front of it.
fn herd_before_node() -> Option<(Node, u16, Herd)> {
    let (node, nport) = node_backend()?;
    let h = Herd::start(
        &[
            &format!("--upstream=127.0.0.1:{nport}"),
            "--health-interval",
            "0",
        ],
        &[],
    );
    assert!(wait_until(T, || TcpStream::connect(("127.0.0.1", h.port)).is_ok()));
    Some((node, nport, h))
}

fn count(port: u16) -> (u64, u64) {
    let (_, body) = http_get(port, "/__count").unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    (v["done"].as_u64().unwrap(), v["errors"].as_u64().unwrap())
}

/// Answers in `bytes` that came from the backend, and all answers.
fn answers(bytes: &[u8]) -> (u64, u64) {
    let text = String::from_utf8_lossy(bytes);
    let mut backend = 0;
    let mut all = 0;
    let mut rest = &text[..];
    while let Some(at) = rest.find("HTTP/1.1 ") {
        rest = &rest[at..];
        let Some(end) = rest.find("\r\n\r\n") else {
            break;
        };
        let head = rest[..end].to_ascii_lowercase();
        all += 1;
        if head.contains("x-backend: 1") {
            backend += 1;
        }
        let len: usize = head
            .split("content-length:")
            .nth(1)
            .and_then(|v| v.lines().next())
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        rest = &rest[(end + 4 + len).min(rest.len())..];
    }
    (backend, all)
}

/// Request heads and bodies, valid and hostile, to be combined.
const HEADS: &[&str] = &[
    "GET / HTTP/1.1\r\nHost: h\r\n\r\n",
    "GET /a HTTP/1.1\r\nHost: h\r\nConnection: keep-alive\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\n\r\nhello",
    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5;ext=v\r\nhello\r\n0\r\nT: 1\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: h\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 5, 5\r\n\r\nhello",
    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: +5\r\n\r\nhello",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: Chunked\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:  chunked\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nX: y\r\nTransfer-Encoding: chunked\r\n\r\n5\nhello\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5 \r\nhello\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffffffffff\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\n",
    "POST / HTTP/1.1\r\nHost: h\r\nX-Fold: a\r\n Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nContent-Length: 5\r\n\r\nhello",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX: a\r\n b\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n",
    "GET / HTTP/1.1\nHost: h\n\n",
    "GET / HTTP/1.1\r\nHost: h\r\nX: a\0b\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: h\r\nHost: i\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: evil.test/x?\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
    "GET / HTTP/1.1\r\n\r\n",
    "GET / HTTP/1.0\r\n\r\n",
    "GET http://h/abs HTTP/1.1\r\nHost: other\r\n\r\n",
    "GET / HTTP/1.1 X\r\nHost: h\r\n\r\n",
    "G\x01T / HTTP/1.1\r\nHost: h\r\n\r\n",
    "GET /\x7f HTTP/1.1\r\nHost: h\r\n\r\n",
    "GET / HTTP/1.1\r\nHost: h\r\nConnection: close\r\n\r\n",
    "POST / HTTP/1.1\r\nHost: h\r\nContent-Length: 10\r\n\r\nshort",
];

#[test]
fn what_herd_forwards_node_parses_as_herd_did() {
    let Some((_node, nport, h)) = herd_before_node() else {
        eprintln!("skipped: node is not installed");
        return;
    };
    // Every head alone, then seeded random sequences of two or three.
    let mut cases: Vec<Vec<u8>> = HEADS.iter().map(|h| h.as_bytes().to_vec()).collect();
    let mut rng = fastrand::Rng::with_seed(0x4e52_4421);
    for _ in 0..300 {
        let n = rng.usize(2..=3);
        cases.push(
            (0..n)
                .flat_map(|_| HEADS[rng.usize(..HEADS.len())].bytes())
                .collect(),
        );
    }
    let mut total_backend = 0;
    for case in &cases {
        let (before, errors_before) = count(nport);
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(case).unwrap();
        let _ = s.shutdown(Shutdown::Write);
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let (backend, all) = answers(&got);
        let (after, errors_after) = count(nport);
        // The /__count request itself is not counted by the backend.
        let parsed = after - before;
        let shown = String::from_utf8_lossy(case);
        assert_eq!(
            parsed,
            backend,
            "Node parsed {parsed} requests, the client got {backend} of its answers ({all} in all) for {shown:?}:\n{}",
            String::from_utf8_lossy(&got)
        );
        // A body the client cut short reaches Node cut short: its error then
        // is about the truncation, not the framing.
        if !shown.contains("short") {
            assert_eq!(
                errors_after, errors_before,
                "Node refused what herd forwarded for {shown:?}"
            );
        }
        assert!(
            all > 0 || case.ends_with(b"short"),
            "no answer at all for {shown:?}"
        );
        total_backend += backend;
    }
    // Not vacuous: about half the sequences hold a hostile request.
    assert!(
        total_backend > 100,
        "too few requests reached the backend: {total_backend}"
    );
}

#[test]
fn an_http10_request_without_host_is_answered_by_node() {
    // HTTP/1.0 may leave out `Host`; herd sends it on as HTTP/1.1, which
    // must have one, or Node answers 400 itself (not a parse error).
    let Some((_node, _, h)) = herd_before_node() else {
        eprintln!("skipped: node is not installed");
        return;
    };
    for head in [
        "GET / HTTP/1.0\r\n\r\n",
        "OPTIONS / HTTP/1.0\r\nUser-Agent: check\r\n\r\n",
    ] {
        let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        s.write_all(head.as_bytes()).unwrap();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        let text = String::from_utf8_lossy(&got);
        // (herd's log says why, should a connect to Node fail: seen once
        // in CI as a 502 "could not connect to a backend".)
        assert!(
            text.starts_with("HTTP/1.1 200") && answers(&got) == (1, 1),
            "{head:?}: {text}\nherd's log:\n{}",
            h.log()
        );
    }
}

/// Node's own `clientError` handling (not the counting one above): after a
/// request that asked for an upgrade and got an ordinary answer, Node
/// neither answers nor closes on a malformed next request on that
/// connection. herd does not keep such a connection, so the next request
/// (here one Node cannot parse) gets Node's 400 at once, not a wait for
/// `--response-timeout`.
#[test]
fn a_connection_that_asked_for_an_upgrade_is_not_reused() {
    let port = free_port();
    let plain = r#"
require('http').createServer((q, r) => r.end('ok'))
  .listen(+process.env.PORT, '127.0.0.1', () => console.log('listening'));
"#;
    let node = Command::new("node")
        .args(["-e", plain])
        .env("PORT", port.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn();
    let Ok(node) = node else {
        eprintln!("skipped: node is not installed");
        return;
    };
    let _node = listening(node);
    let h = Herd::start(&[&format!("--upstream=127.0.0.1:{port}")], &[]);
    assert!(wait_until(T, || TcpStream::connect(("127.0.0.1", h.port)).is_ok()));
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = s.read(&mut buf).unwrap();
    let first = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(
        first.starts_with("HTTP/1.1 200") && first.ends_with("ok"),
        "{first}"
    );
    // Same client connection, so the same proxy thread and its pool.
    s.write_all(b"FOO / HTTP/1.1\r\nHost: a\r\n\r\n").unwrap();
    let n = s.read(&mut buf).expect("no answer within 5 s");
    let second = String::from_utf8_lossy(&buf[..n]).into_owned();
    assert!(second.starts_with("HTTP/1.1 400"), "{second}");
}
