//! The HTTP/1.1 proxy engine against scripted raw backends: the protocol
//! corners (pipelining, half-close, 100-continue, bodiless answers,
//! HTTP/1.0 clients, trailers) and backend connection reuse.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(20);

type Handler = dyn Fn(&str, &mut BufReader<TcpStream>, &mut TcpStream) -> bool + Send + Sync;

/// A backend that reads each request head on a connection and lets
/// `handle` answer it; `handle` returns whether to keep the connection.
/// Returns the port and counts of connections accepted and closed.
fn backend(handle: Arc<Handler>) -> (u16, Arc<AtomicUsize>) {
    let (port, conns, _) = backend_counting(handle);
    (port, conns)
}

fn backend_counting(handle: Arc<Handler>) -> (u16, Arc<AtomicUsize>, Arc<AtomicUsize>) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let conns = Arc::new(AtomicUsize::new(0));
    let closed = Arc::new(AtomicUsize::new(0));
    let (counted, closes) = (conns.clone(), closed.clone());
    std::thread::spawn(move || {
        for c in l.incoming() {
            let Ok(mut c) = c else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let (handle, closes) = (handle.clone(), closes.clone());
            std::thread::spawn(move || {
                let mut r = BufReader::new(c.try_clone().unwrap());
                serve_one(&handle, &mut r, &mut c);
                drop((r, c));
                closes.fetch_add(1, Ordering::SeqCst);
            });
        }
    });
    (port, conns, closed)
}

fn serve_one(handle: &Arc<Handler>, r: &mut BufReader<TcpStream>, c: &mut TcpStream) {
    loop {
        let mut head = String::new();
        let mut line = String::new();
        loop {
            line.clear();
            if r.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            head.push_str(&line);
            if line == "\r\n" {
                break;
            }
        }
        if !handle(&head, r, c) {
            return;
        }
    }
}

fn lb(port: u16, extra: &[&str]) -> Herd {
    let up = format!("--upstream=127.0.0.1:{port}");
    // No health checks: they would count as backend connections.
    let mut args = vec![up.as_str(), "--health-interval", "0"];
    args.extend_from_slice(extra);
    let h = Herd::start(&args, &[]);
    assert!(
        wait_until(T, || TcpStream::connect(("127.0.0.1", h.port)).is_ok()),
        "herd did not listen; log:\n{}",
        h.log()
    );
    h
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s
}

/// Sends `request` on a new connection and reads until herd closes it.
fn whole_exchange(port: u16, request: &[u8]) -> String {
    let mut s = connect(port);
    s.write_all(request).unwrap();
    let mut all = Vec::new();
    let _ = s.read_to_end(&mut all);
    String::from_utf8_lossy(&all).into_owned()
}

/// Reads one response (head and a Content-Length or chunked body) from `r`.
fn read_one(r: &mut BufReader<TcpStream>) -> (String, Vec<u8>) {
    let mut head = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        assert!(r.read_line(&mut line).unwrap() > 0, "EOF in head: {head:?}");
        head.push_str(&line);
        if line == "\r\n" {
            break;
        }
    }
    let lower = head.to_ascii_lowercase();
    let mut body = Vec::new();
    if let Some(v) = lower.split("content-length:").nth(1) {
        let n: usize = v.lines().next().unwrap().trim().parse().unwrap();
        let bodiless = head.starts_with("HTTP/1.1 204") || head.starts_with("HTTP/1.1 304");
        if !bodiless {
            body.resize(n, 0);
            r.read_exact(&mut body).unwrap();
        }
    } else if lower.contains("transfer-encoding: chunked") {
        // Keep the raw chunked bytes, trailers included.
        loop {
            line.clear();
            r.read_line(&mut line).unwrap();
            body.extend_from_slice(line.as_bytes());
            let size =
                usize::from_str_radix(line.trim_end().split(';').next().unwrap(), 16).unwrap();
            if size == 0 {
                loop {
                    line.clear();
                    r.read_line(&mut line).unwrap();
                    body.extend_from_slice(line.as_bytes());
                    if line == "\r\n" {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0; size + 2];
            r.read_exact(&mut chunk).unwrap();
            body.extend_from_slice(&chunk);
        }
    }
    (head, body)
}

fn ok(c: &mut TcpStream, body: &str) {
    let _ = write!(
        c,
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
}

fn content_length(head: &str) -> usize {
    head.to_ascii_lowercase()
        .split("content-length:")
        .nth(1)
        .and_then(|v| v.lines().next())
        .map_or(0, |v| v.trim().parse().unwrap())
}

#[test]
fn pipelined_requests_are_answered_in_order_on_one_backend_connection() {
    let (port, conns) = backend(Arc::new(
        |head: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let mut body = vec![0; content_length(head)];
            r.read_exact(&mut body).unwrap();
            let path = head.split_whitespace().nth(1).unwrap().to_string();
            ok(c, &format!("{path} {}", String::from_utf8_lossy(&body)));
            true
        },
    ));
    let h = lb(port, &[]);
    let mut s = connect(h.port);
    s.write_all(
        // Empty lines before a request are skipped (RFC 9112, 2.2), as
        // after a POST body from clients that end it with a CRLF.
        b"\r\n\r\nGET /1 HTTP/1.1\r\nHost: t\r\n\r\nPOST /2 HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\n\r\nbody\r\n\r\n\nGET /3 HTTP/1.1\r\nHost: t\r\n\r\n",
    )
    .unwrap();
    let mut r = BufReader::new(s);
    for want in ["/1 ", "/2 body", "/3 "] {
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(String::from_utf8_lossy(&body), want);
    }
    assert_eq!(
        conns.load(Ordering::SeqCst),
        1,
        "the backend connection was not reused"
    );
}

/// A head that arrives in pieces, as from a slow client: between pieces
/// herd keeps only the bytes so far (the thread's buffer goes back), then
/// reads on behind them. Short pieces, a long one, and a body behind.
#[test]
fn a_head_arriving_in_pieces_is_read_whole() {
    let (port, _) = backend(Arc::new(
        |head: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let mut body = vec![0; content_length(head)];
            r.read_exact(&mut body).unwrap();
            let x = head
                .lines()
                .find(|l| l.starts_with("X-Long: "))
                .unwrap_or("");
            ok(
                c,
                &format!(
                    "{} {} {}",
                    head.lines().next().unwrap(),
                    x.len(),
                    String::from_utf8_lossy(&body)
                ),
            );
            true
        },
    ));
    let h = lb(port, &[]);
    let mut s = connect(h.port);
    let long = format!("X-Long: {}\r\n", "v".repeat(3000));
    let pieces = [
        "PO".to_string(),
        "ST /slow HTTP/1.1\r\nHo".to_string(),
        "st: t\r\nContent-Length: 4\r\n".to_string(),
        long,
        "\r\nbo".to_string(),
        "dy".to_string(),
    ];
    for p in &pieces {
        s.write_all(p.as_bytes()).unwrap();
        // A slow client: each piece its own read, and a wait between.
        std::thread::sleep(Duration::from_millis(30));
    }
    let mut r = BufReader::new(s);
    let (head, body) = read_one(&mut r);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(
        String::from_utf8_lossy(&body),
        "POST /slow HTTP/1.1 3008 body"
    );
}

#[test]
fn a_half_closed_client_still_gets_its_answer() {
    let (quick, _) = backend(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            ok(c, "answer");
            true
        },
    ));
    // An answer slow enough that herd watches the client meanwhile: the
    // client's FIN comes through, and this backend answers anyway.
    let (slow, _) = backend(Arc::new(
        |_: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            std::thread::sleep(Duration::from_millis(300));
            ok(c, "late answer");
            false
        },
    ));
    for (port, want) in [(quick, "answer"), (slow, "late answer")] {
        let h = lb(port, &[]);
        let mut s = connect(h.port);
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        assert!(
            all.starts_with("HTTP/1.1 200") && all.ends_with(want),
            "{all:?}"
        );
    }
}

/// A backend that answers `/quick` at once with NAME and never answers
/// anything else: it says when such a request came, then waits for its
/// connection's EOF and says when that came (as a long poll whose client is
/// gone would want to know).
fn backend_seeing_eof(name: &'static str, tx: std::sync::mpsc::Sender<std::time::Instant>) -> u16 {
    let tx = std::sync::Mutex::new(tx);
    let (port, _) = backend(Arc::new(
        move |head: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            if head.starts_with("GET /quick") {
                ok(c, name);
                return true;
            }
            let _ = tx.lock().unwrap().send(std::time::Instant::now());
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            let _ = tx.lock().unwrap().send(std::time::Instant::now());
            false
        },
    ));
    port
}

#[test]
fn a_client_leaving_a_slow_answer_is_passed_on_to_the_backend() {
    let (tx, eof) = std::sync::mpsc::channel();
    let (a, b) = (
        backend_seeing_eof("a", tx.clone()),
        backend_seeing_eof("b", tx),
    );
    let log = std::env::temp_dir().join(format!("herd-engine-499-{}", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let second = format!("--upstream=127.0.0.1:{b}");
    let h = lb(
        a,
        &[
            &second,
            "--response-timeout",
            "60s",
            "--access-log",
            log.to_str().unwrap(),
        ],
    );
    // One client closes (FIN), the other resets its connection; round-robin
    // gives each backend one of them.
    for reset in [false, true] {
        let mut s = connect(h.port);
        s.write_all(b"GET /poll HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        eof.recv_timeout(T)
            .expect("the request never reached the backend");
        if reset {
            socket2::SockRef::from(&s)
                .set_linger(Some(Duration::ZERO))
                .unwrap();
        }
        let left = std::time::Instant::now();
        drop(s);
        // Without the watch the backend would wait for the 60 s time-out.
        let seen = eof
            .recv_timeout(Duration::from_secs(10))
            .expect("the backend never saw its client leave");
        assert!(
            seen.duration_since(left) < Duration::from_secs(3),
            "seen after {:?}",
            seen.duration_since(left)
        );
    }
    // Logged as nginx does (499)...
    assert!(
        wait_until(T, || std::fs::read_to_string(&log)
            .is_ok_and(|l| l.matches("\" 499 ").count() == 2)),
        "{:?}",
        std::fs::read_to_string(&log)
    );
    // ...and not counted against either backend (one failure would take a
    // backend out for 10 s): both still get their turns.
    let mut r = BufReader::new(connect(h.port));
    let mut served = String::new();
    for _ in 0..4 {
        r.get_mut()
            .write_all(b"GET /quick HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        served.push_str(&String::from_utf8_lossy(&body));
    }
    assert!(
        served.matches('a').count() == 2 && served.matches('b').count() == 2,
        "{served}"
    );
}

#[test]
fn a_client_leaving_a_quiet_stream_is_passed_on_to_the_backend() {
    // An event stream: one event, then silence until the client goes.
    let (tx, eof) = std::sync::mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let (port, _) = backend(Arc::new(
        move |_: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\
                  Transfer-Encoding: chunked\r\n\r\n9\r\ndata: 1\n\n\r\n",
            );
            let mut rest = Vec::new();
            let _ = r.read_to_end(&mut rest);
            let _ = tx.lock().unwrap().send(std::time::Instant::now());
            false
        },
    ));
    let h = lb(port, &["--response-timeout", "60s"]);
    let s = connect(h.port);
    (&s).write_all(b"GET /events HTTP/1.1\r\nHost: t\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s);
    let mut seen = String::new();
    while !seen.ends_with("data: 1\n\n\r\n") {
        assert!(r.read_line(&mut seen).unwrap() > 0, "{seen:?}");
    }
    let left = std::time::Instant::now();
    drop(r);
    // Without the watch the backend would keep the stream until its next
    // event or the 60 s time-out.
    let at = eof
        .recv_timeout(Duration::from_secs(10))
        .expect("the backend never saw its client leave");
    assert!(
        at.duration_since(left) < Duration::from_secs(3),
        "seen after {:?}",
        at.duration_since(left)
    );
}

#[test]
fn expect_100_continue_is_relayed_before_the_body() {
    let (port, _) = backend(Arc::new(
        |head: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            if head.to_ascii_lowercase().contains("expect: 100-continue") {
                c.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").unwrap();
            }
            let mut body = vec![0; content_length(head)];
            r.read_exact(&mut body).unwrap();
            ok(c, &format!("got {}", String::from_utf8_lossy(&body)));
            true
        },
    ));
    // Streamed: with the body read first, herd says `100` itself (see
    // `a_slow_upload_does_not_hold_a_one_at_a_time_backend`).
    let h = lb(port, &["--request-buffer", "0"]);
    let mut s = connect(h.port);
    s.write_all(b"PUT /f HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n")
        .unwrap();
    let mut r = BufReader::new(s.try_clone().unwrap());
    let mut line = String::new();
    r.read_line(&mut line).unwrap();
    assert_eq!(line, "HTTP/1.1 100 Continue\r\n");
    r.read_line(&mut line).unwrap();
    s.write_all(b"hello").unwrap();
    let (head, body) = read_one(&mut r);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"got hello");
}

#[test]
fn head_204_and_304_answers_have_no_body_and_keep_the_connection() {
    let (port, conns) = backend(Arc::new(
        |head: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let answer: &[u8] = match head.split_whitespace().nth(1).unwrap() {
                "/204" => b"HTTP/1.1 204 No Content\r\n\r\n",
                "/304" => b"HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n",
                // HEAD: the length of the body a GET would get, and no body.
                _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n",
            };
            c.write_all(answer).unwrap();
            true
        },
    ));
    let h = lb(port, &[]);
    let mut s = connect(h.port);
    s.write_all(
        b"GET /204 HTTP/1.1\r\nHost: t\r\n\r\nGET /304 HTTP/1.1\r\nHost: t\r\n\r\nHEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /204 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let heads: Vec<&str> = all.split("\r\n\r\n").filter(|p| !p.is_empty()).collect();
    assert_eq!(heads.len(), 4, "{all:?}");
    for (h, want) in heads.iter().zip(["204", "304", "200", "204"]) {
        assert!(h.starts_with(&format!("HTTP/1.1 {want}")), "{all:?}");
    }
    assert!(heads[2].contains("Content-Length: 5"), "{all:?}");
    assert_eq!(conns.load(Ordering::SeqCst), 1);
}

#[test]
fn an_http10_client_gets_a_chunked_answer_without_chunks() {
    let (port, _) = backend(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            c.write_all(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7;ext=1\r\n, world\r\n0\r\nX-T: 1\r\n\r\n",
        )
        .unwrap();
            true
        },
    ));
    let h = lb(port, &[]);
    let mut s = connect(h.port);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut all = String::new();
    s.read_to_string(&mut all).unwrap();
    let (head, body) = all.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("HTTP/1.1 200"), "{all:?}");
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{all:?}");
    assert_eq!(body, "hello, world");
}

/// The payload of a raw chunked body (no extensions or trailers).
fn dechunk(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut rest = raw;
    loop {
        let nl = rest.windows(2).position(|w| w == b"\r\n").unwrap();
        let size = usize::from_str_radix(std::str::from_utf8(&rest[..nl]).unwrap(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&rest[nl + 2..nl + 2 + size]);
        rest = &rest[nl + 2 + size + 2..];
    }
}

/// An answer whose end is the backend's close (an HTTP/1.0 server, Python's
/// `BaseHTTPRequestHandler` by default) goes to an HTTP/1.1 client chunked,
/// so that client keeps its connection, as nginx does; an HTTP/1.0 client
/// gets it as it came, and a backend reset shows as a body without its end.
#[test]
fn an_answer_ending_at_close_reaches_http11_clients_chunked() {
    let (port, _) = backend(Arc::new(
        |head: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            c.write_all(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nhello")
                .unwrap();
            std::thread::sleep(Duration::from_millis(30));
            if head.starts_with("GET /cut") {
                socket2::SockRef::from(&*c)
                    .set_linger(Some(Duration::ZERO))
                    .unwrap();
                return false;
            }
            let _ = c.write_all(b", world");
            std::thread::sleep(Duration::from_millis(30));
            let _ = c.write_all(&[b'!'; 100_000]);
            false
        },
    ));
    let h = lb(port, &[]);
    let want = [&b"hello, world"[..], &[b'!'; 100_000]].concat();
    let mut r = BufReader::new(connect(h.port));
    for path in ["/a", "/b"] {
        write!(r.get_mut(), "GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
        assert!(!head.to_ascii_lowercase().contains("connection"), "{head}");
        assert!(dechunk(&body) == want, "{path}: {} bytes", body.len());
    }

    let mut s = connect(h.port);
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).unwrap();
    let at = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&all[..at]);
    assert!(head.contains("Connection: close\r\n"), "{head}");
    assert!(!head.to_ascii_lowercase().contains("chunked"), "{head}");
    assert!(all[at..] == want[..], "{} bytes", all.len() - at);

    let text = whole_exchange(h.port, b"GET /cut HTTP/1.1\r\nHost: t\r\n\r\n");
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        text.ends_with("\r\n\r\n5\r\nhello\r\n"),
        "no last chunk after a reset: {text:?}"
    );
}

#[test]
fn chunked_bodies_and_trailers_pass_both_ways() {
    // The backend answers with the raw chunked body it received, as chunked.
    let (port, _) = backend(Arc::new(
        |head: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            assert!(head.contains("Transfer-Encoding: chunked\r\n"), "{head}");
            let mut raw = Vec::new();
            while !raw.ends_with(b"\r\n\r\n") {
                let mut line = Vec::new();
                r.read_until(b'\n', &mut line).unwrap();
                raw.extend_from_slice(&line);
            }
            let _ = write!(
                c,
                "HTTP/1.1 200 OK\r\nTrailer: X-Sum\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                raw.len()
            );
            c.write_all(&raw).unwrap();
            c.write_all(b"\r\n0\r\nX-Sum: 42\r\n\r\n").unwrap();
            true
        },
    ));
    let h = lb(port, &[]);
    let mut s = connect(h.port);
    let sent = b"4\r\nabcd\r\n3;x=y\r\nefg\r\n0\r\nX-Client-Trailer: yes\r\n\r\n";
    s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n")
        .unwrap();
    s.write_all(sent).unwrap();
    let mut r = BufReader::new(s);
    let (head, body) = read_one(&mut r);
    assert!(head.contains("Trailer: X-Sum"), "{head}");
    let body = String::from_utf8_lossy(&body);
    assert!(
        body.contains(&String::from_utf8_lossy(sent).into_owned()),
        "{body:?}"
    );
    assert!(body.ends_with("0\r\nX-Sum: 42\r\n\r\n"), "{body:?}");
}

#[test]
fn a_backend_closing_idle_connections_costs_no_request() {
    // One answer per connection, keep-alive advertised, then the backend
    // closes: the pooled connection is stale by the next request.
    let (port, conns, closed) = backend_counting(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            ok(c, "fine");
            false
        },
    ));
    // One failure would take the backend out for 10 s, and requests would
    // then go to the backup, where nothing listens. (Without a backup a
    // lone backend is never taken out, as in nginx.)
    let up = format!("--upstream=127.0.0.1:{port},max_fails=1,fail_timeout=10s");
    let backup = format!("--upstream=127.0.0.1:{},backup", free_port());
    let h = Herd::start(&[&up, &backup, "--health-interval", "0"], &[]);
    assert!(wait_until(T, || TcpStream::connect(("127.0.0.1", h.port)).is_ok()));
    let mut s = connect(h.port);
    let mut r = BufReader::new(s.try_clone().unwrap());
    for i in 0..6 {
        s.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "request {i}: {head}");
        assert_eq!(body, b"fine");
        // The backend has closed the connection herd pooled.
        assert!(wait_until(T, || closed.load(Ordering::SeqCst) > i));
    }
    assert_eq!(conns.load(Ordering::SeqCst), 6);
}

#[test]
fn a_client_sending_a_large_refused_request_still_reads_the_answer() {
    let (port, _) = backend(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            ok(c, "x");
            true
        },
    ));
    let h = lb(port, &[]);
    let mut s = connect(h.port);
    // A bad framing answered 400 at once, while 256 KiB of body follow.
    s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        .unwrap();
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        let chunk = [b'a'; 16 * 1024];
        for _ in 0..16 {
            if w.write_all(&chunk).is_err() {
                break;
            }
        }
    });
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let _ = writer.join();
    assert!(
        answer.starts_with(b"HTTP/1.1 400"),
        "{:?}",
        String::from_utf8_lossy(&answer)
    );
}

#[test]
fn herd_stop_answers_for_a_cluster_of_upstreams_only() {
    let (port, _) = backend(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            ok(c, "x");
            true
        },
    ));
    let name = format!("ups-{}", std::process::id());
    let mut h = lb(port, &["--name", &name]);
    // The port opens before the control socket: wait for the latter.
    assert!(wait_until(T, || herd(&["status", "--name", &name])
        .status
        .success()));
    // `herd list` sums no worker's CPU to 0.0%, not -0.0% (an empty f64 sum).
    let list = String::from_utf8_lossy(&herd(&["list"]).stdout).into_owned();
    let line = list.lines().find(|l| l.starts_with(&name)).unwrap_or("");
    assert!(line.contains(" 0.0% ") && !line.contains("-0"), "{list}");
    let out = herd_cmd().args(["stop", "--name", &name]).output().unwrap();
    assert!(
        out.status.success(),
        "herd stop: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let st = h.wait_exit(T).expect("the master did not stop");
    assert_eq!(st.code(), Some(0));
}

#[test]
fn a_retry_after_an_interim_answer_sends_the_request_itself() {
    // A sends 103 Early Hints and dies; B checks that what it gets is the
    // client's request (not the 103 head) and answers.
    let (a, a_hits) = backend(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let _ = c.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </s.css>\r\n\r\n");
            false
        },
    ));
    let (b, _) = backend(Arc::new(
        |head: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            if head.starts_with("GET /page HTTP/1.1\r\n") {
                ok(c, "from b");
            } else {
                let _ = c.write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
            }
            true
        },
    ));
    let ua = format!("--upstream=127.0.0.1:{a}");
    let ub = format!("--upstream=127.0.0.1:{b}");
    let h = Herd::start(&[&ua, &ub, "--health-interval", "0"], &[]);
    assert!(wait_until(T, || TcpStream::connect(("127.0.0.1", h.port)).is_ok()));
    for _ in 0..4 {
        let mut s = connect(h.port);
        s.write_all(b"GET /page HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut all = String::new();
        s.read_to_string(&mut all).unwrap();
        assert!(
            all.contains("HTTP/1.1 200") && all.ends_with("from b"),
            "{all:?}"
        );
    }
    assert!(
        a_hits.load(Ordering::SeqCst) >= 1,
        "backend A was never tried"
    );
}

#[test]
fn a_backend_writing_head_and_body_apart_is_not_held_by_delayed_acks() {
    // Nagle's algorithm stays on (the default), as in Java's `HttpServer`:
    // the body leaves only once the head is acknowledged.
    let (port, conns) = backend(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                .is_ok()
                && c.write_all(b"hello").is_ok()
        },
    ));
    let h = lb(port, &[]);
    let s = connect(h.port);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut took = Vec::new();
    // More than the kernel's first quick ACKs of a new connection.
    for _ in 0..40 {
        let t = std::time::Instant::now();
        w.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"hello");
        took.push(t.elapsed());
    }
    assert_eq!(conns.load(Ordering::SeqCst), 1, "one backend connection");
    took.sort();
    // A delayed ACK waits at least 40 ms on Linux.
    assert!(
        took[took.len() / 2] < Duration::from_millis(20),
        "answers waited for delayed ACKs: {took:?}"
    );
}

/// An `Upgrade: h2c` request (what `curl --http2` sends) reaches the backend
/// as a plain request: a backend that switched would own the connection's
/// later requests, past herd's balancing, forwarding headers and log.
#[test]
fn h2c_upgrades_are_not_passed_to_the_backend() {
    let (port, _) = backend(Arc::new(
        |head: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let lower = head.to_ascii_lowercase();
            if lower.contains("upgrade: h2c") {
                let _ = c.write_all(
                    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
                );
                return false;
            }
            ok(c, &lower);
            true
        },
    ));
    let h = lb(port, &[]);
    let mut c = connect(h.port);
    let mut r = BufReader::new(c.try_clone().unwrap());
    for _ in 0..2 {
        c.write_all(
            b"GET / HTTP/1.1\r\nHost: t\r\nConnection: Upgrade, HTTP2-Settings\r\n\
              Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
        )
        .unwrap();
        let (head, body) = read_one(&mut r);
        let seen = String::from_utf8_lossy(&body);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert!(
            !seen.contains("upgrade") && !seen.contains("http2-settings"),
            "the backend saw: {seen}"
        );
        assert!(seen.contains("x-forwarded-for: 127.0.0.1"), "{seen}");
    }
}

/// As in nginx, the only backend is not taken out by one bad answer: the
/// next request goes to it again instead of getting 503 for `fail_timeout`.
#[test]
fn a_lone_backend_is_not_taken_out_by_one_bad_answer() {
    let bad = Arc::new(AtomicUsize::new(1));
    let left = bad.clone();
    let (port, _) = backend(Arc::new(
        move |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            if left
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                let _ = c.write_all(b"this is not HTTP\r\n\r\n");
                return false;
            }
            ok(c, "fine");
            true
        },
    ));
    let h = lb(port, &[]);
    let get = || {
        let mut c = connect(h.port);
        c.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
            .unwrap();
        read_one(&mut BufReader::new(c)).0
    };
    let first = get();
    assert!(first.starts_with("HTTP/1.1 502"), "{first}");
    let second = get();
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
}

/// A chunked answer malformed before any of it reached the client is a
/// 502, as a malformed head is, not a connection closed without a word.
#[test]
fn a_chunked_answer_malformed_from_its_start_is_a_502() {
    let (port, _) = backend(Arc::new(
        |_: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let _ = c.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
            );
            false
        },
    ));
    let admin = free_port();
    let at = format!("127.0.0.1:{admin}");
    let h = lb(port, &["--admin", &at]);
    let mut c = connect(h.port);
    c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
    let mut all = String::new();
    let _ = c.read_to_string(&mut all);
    assert!(all.starts_with("HTTP/1.1 502"), "{all:?}");
    assert!(!all.contains("hello"), "{all:?}");
    // Counted as what the client got, as a malformed head is: a 5xx.
    let (_, m) = http_get(admin, "/metrics").unwrap();
    let count = |class: &str| -> f64 {
        m.lines()
            .filter(|l| l.starts_with("herd_backend_requests_total{"))
            .filter(|l| l.contains(&format!("code=\"{class}\"")))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(count("5xx") >= 1.0 && count("2xx") == 0.0, "{m}");
}

/// A 64 KiB message in two parts, as a sender that pauses between them
/// sends it: `start` (its start line and headers but the framing), the
/// framing (with, for a chunked body, its one chunk's size line) and `a`s
/// filling exactly two of herd's reads (its buffer is 24 KiB with the
/// default --max-header-size), then `b`s to the end (and the last chunk).
/// Returns the parts and how many body bytes the first holds.
fn paused_body(start: &str, chunked: bool) -> (Vec<u8>, Vec<u8>, usize) {
    const BUF: usize = 24 * 1024;
    let framing = if chunked {
        "Transfer-Encoding: chunked\r\n\r\n10000\r\n"
    } else {
        "Content-Length: 65536\r\n\r\n"
    };
    let mut first = format!("{start}{framing}").into_bytes();
    let before = 2 * BUF - first.len();
    first.resize(2 * BUF, b'a');
    let mut rest = vec![b'b'; 0x10000 - before];
    if chunked {
        rest.extend_from_slice(b"\r\n0\r\n\r\n");
    }
    (first, rest, before)
}

/// A body larger than herd's buffers goes to the client in pieces, each
/// but the last sent with `MSG_MORE` when the read before it filled the
/// buffer (the kernel joins it with the next). A backend that pauses just
/// after such a piece must not leave it held in the kernel (which would
/// let it go only after 40 to 200 ms): herd pushes it before it waits.
#[test]
fn a_body_piece_is_not_held_back_while_the_backend_pauses() {
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let go_rx = std::sync::Mutex::new(go_rx);
    let (port, _) = backend(Arc::new(
        move |head: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let (first, rest, _) =
                paused_body("HTTP/1.1 200 OK\r\n", head.starts_with("GET /chunked"));
            // No Nagle here: its wait for herd's (delayed) ACK is not what
            // this test is about.
            let _ = c.set_nodelay(true);
            if c.write_all(&first).is_err() {
                return false;
            }
            // Paused until the client has had every byte so far.
            let _ = go_rx.lock().unwrap().recv_timeout(T);
            c.write_all(&rest).is_ok()
        },
    ));
    let h = lb(port, &[]);
    let s = connect(h.port);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut took = Vec::new();
    for chunked in [false, true, false, true, false, true] {
        let (_, rest, before) = paused_body("HTTP/1.1 200 OK\r\n", chunked);
        let t = std::time::Instant::now();
        let path = if chunked { "/chunked" } else { "/length" };
        // One write: pieces would wait for ACKs under the client's Nagle.
        w.write_all(format!("GET {path} HTTP/1.1\r\nHost: t\r\n\r\n").as_bytes())
            .unwrap();
        let mut line = String::new();
        loop {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "EOF in the head");
            if line == "\r\n" {
                break;
            }
        }
        if chunked {
            line.clear();
            r.read_line(&mut line).unwrap();
            assert_eq!(line, "10000\r\n");
        }
        let mut body = vec![0; before];
        r.read_exact(&mut body).unwrap();
        took.push(t.elapsed());
        assert!(body.iter().all(|&b| b == b'a'));
        go_tx.send(()).unwrap();
        let mut got = vec![0; rest.len()];
        r.read_exact(&mut got).unwrap();
        assert!(got == rest, "the rest of the answer differs");
    }
    took.sort();
    assert!(
        took[took.len() / 2] < Duration::from_millis(30),
        "a piece waited in the kernel: {took:?}\nlog:\n{}",
        h.log()
    );
}

/// The same for an upload: a client that pauses after a piece that filled
/// herd's buffer does not leave that piece held in the kernel on its way
/// to the backend.
#[test]
fn an_upload_piece_is_not_held_back_while_the_client_pauses() {
    // The backend reports how many body bytes it has after each read.
    let (have_tx, have_rx) = std::sync::mpsc::channel::<usize>();
    let have_tx = std::sync::Mutex::new(have_tx);
    let (port, _) = backend(Arc::new(
        move |h: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let chunked = h
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked");
            if chunked {
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
            }
            let mut body = vec![0; 0x10000];
            let mut have = 0;
            while have < body.len() {
                match r.read(&mut body[have..]) {
                    Ok(0) | Err(_) => return false,
                    Ok(n) => have += n,
                }
                let _ = have_tx.lock().unwrap().send(have);
            }
            if chunked {
                let mut end = [0u8; 7];
                if r.read_exact(&mut end).is_err() {
                    return false;
                }
            }
            ok(c, "got");
            true
        },
    ));
    // (Streamed, not read whole first.)
    let h = lb(port, &["--request-buffer", "0"]);
    let s = connect(h.port);
    let mut w = s.try_clone().unwrap();
    let mut r = BufReader::new(s);
    let mut took = Vec::new();
    for chunked in [false, true, false, true, false, true] {
        let (first, rest, before) = paused_body("POST /up HTTP/1.1\r\nHost: t\r\n", chunked);
        let t = std::time::Instant::now();
        w.write_all(&first).unwrap();
        // Paused until the backend has every byte so far.
        loop {
            let have = have_rx.recv_timeout(T).expect("the backend got too little");
            if have >= before {
                break;
            }
        }
        took.push(t.elapsed());
        w.write_all(&rest).unwrap();
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        assert_eq!(body, b"got");
        while have_rx.try_recv().is_ok() {}
    }
    took.sort();
    assert!(
        took[took.len() / 2] < Duration::from_millis(30),
        "a piece waited in the kernel: {took:?}\nlog:\n{}",
        h.log()
    );
}

/// A backend that serves one connection at a time (gunicorn's sync
/// worker, a preforking Perl server) is not held by a slow upload: herd
/// reads a body of up to `--request-buffer` whole first, saying
/// `100 Continue` itself to a client that waits for it, as nginx does.
#[test]
fn a_slow_upload_does_not_hold_a_one_at_a_time_backend() {
    let (port, heads) = one_at_a_time_backend();
    let h = lb(port, &[]);
    let mut slow = connect(h.port);
    slow.write_all(
        b"POST /up HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n",
    )
    .unwrap();
    let mut go_on = [0u8; 25];
    slow.read_exact(&mut go_on).unwrap();
    assert_eq!(&go_on, b"HTTP/1.1 100 Continue\r\n\r\n");
    slow.write_all(b"a").unwrap();
    // While that body trickles, another client is served.
    for _ in 0..3 {
        let (status, body) = http_get(h.port, "/").unwrap();
        assert_eq!((status, body.as_str()), (200, "got 0"));
        assert!(!heads.recv_timeout(T).unwrap().contains("/up"));
    }
    slow.write_all(b"bcd").unwrap();
    let (head, body) = read_one(&mut BufReader::new(slow));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert_eq!(body, b"got 4");
    let head = heads.recv_timeout(T).unwrap().to_ascii_lowercase();
    assert!(
        head.starts_with("post /up") && !head.contains("expect"),
        "{head}"
    );
}

/// A body being read whole holds what the client sent, not what it
/// declared, and no thread buffer while it waits: 800 clients that each
/// declare 64 KiB and send 100 bytes grow herd by far less than 800 buffers.
#[test]
fn bodies_being_read_whole_hold_what_was_sent() {
    let posts = Arc::new(AtomicUsize::new(0));
    let seen = posts.clone();
    let (port, _) = backend(Arc::new(
        move |head: &str, _: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            if head.starts_with("POST") {
                seen.fetch_add(1, Ordering::SeqCst);
            }
            ok(c, "late");
            true
        },
    ));
    let h = lb(port, &[]);
    // Warm up the thread's buffers and runtime.
    assert_eq!(http_get(h.port, "/").unwrap().0, 200);
    let before = rss_kib(h.child.id());
    let mut held = Vec::new();
    let head = b"POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: 65536\r\n\r\n";
    for _ in 0..800 {
        let mut s = connect(h.port);
        s.write_all(head).unwrap();
        s.write_all(&[b'x'; 100]).unwrap();
        held.push(s);
    }
    // Each is being read (its 100 bytes taken) once probes behind them
    // are answered: each proxy thread serves its connections in order.
    for _ in 0..10 {
        assert_eq!(http_get(h.port, "/").unwrap().0, 200);
    }
    // About 5 KB each here (nginx: 14 KB); a thread buffer held by each
    // would make it 9 KB or more.
    let grown = rss_kib(h.child.id()).saturating_sub(before);
    eprintln!("800 bodies in waiting grew herd by {grown} KiB");
    assert!(
        grown < 6 * 1024,
        "800 bodies in waiting grew herd by {grown} KiB"
    );
    assert_eq!(posts.load(Ordering::SeqCst), 0, "no backend heard of them");
}

/// A kept-alive connection that the backend closes as a request that
/// cannot be sent twice goes out on it (a server that closes after each
/// answer without saying so, or an idle time-out met just then) costs that
/// request a 502, but is not the backend's ill health: it is not taken out
/// (as nginx does not count an error on a cached connection).
#[test]
fn a_kept_alive_connection_closed_under_a_post_does_not_take_the_backend_out() {
    let handle: Arc<Handler> = Arc::new(
        |head: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            if head.starts_with("POST") {
                return false; // closed with the request unanswered
            }
            let mut body = vec![0; content_length(head)];
            let _ = r.read_exact(&mut body);
            ok(c, "fine");
            true
        },
    );
    let (a, _) = backend(handle.clone());
    let (b, _) = backend(handle);
    let up = format!("--upstream=127.0.0.1:{b}");
    let h = lb(a, &[&up]);
    let mut r = BufReader::new(connect(h.port));
    let mut statuses = Vec::new();
    for req in [
        "GET /", "GET /", "POST /", "POST /", "GET /", "GET /", "GET /",
    ] {
        write!(
            r.get_mut(),
            "{req} HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\nhi"
        )
        .unwrap();
        let (head, _) = read_one(&mut r);
        statuses.push(head[9..12].to_string());
        if head.to_ascii_lowercase().contains("connection: close") {
            r = BufReader::new(connect(h.port));
        }
    }
    assert_eq!(statuses, ["200", "200", "502", "502", "200", "200", "200"]);
    assert!(
        wait_until(T, || h.log().contains("closed a kept-alive connection")),
        "{}",
        h.log()
    );
    assert!(!h.log().contains("taken out"), "{}", h.log());
}

/// `herd_backend_bytes_total` counts request bodies (joined to the head,
/// and relayed after it) and upgraded tunnels' bytes both ways, per backend.
#[test]
fn request_bodies_and_tunnels_are_counted_per_backend() {
    let port = raw_backend(|mut c, head| {
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        if head.contains("upgrade: websocket") {
            let _ = c.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
            );
            let mut b = [0u8; 7];
            if c.read_exact(&mut b).is_ok() {
                let _ = c.write_all(&b);
            }
            return;
        }
        let len = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        let mut body = vec![0u8; len];
        if c.read_exact(&mut body).is_ok() {
            let _ =
                c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok");
        }
    });
    let admin = free_port();
    let at = format!("127.0.0.1:{admin}");
    let h = lb(port, &["--admin", &at]);
    for n in [1000, 10_000] {
        let mut s = connect(h.port);
        let head = format!("POST /up HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n");
        s.write_all(head.as_bytes()).unwrap();
        s.write_all(&vec![b'x'; n]).unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(
            answer.starts_with("HTTP/1.1 200") && answer.ends_with("ok"),
            "{answer}"
        );
    }
    let mut s = connect(h.port);
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    )
    .unwrap();
    let head = read_head(&mut s).unwrap();
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    s.write_all(b"7 bytes").unwrap();
    let mut echo = [0u8; 7];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"7 bytes");
    drop(s);
    let counted = |dir: &str| -> f64 {
        let (_, m) = http_get(admin, "/metrics").unwrap_or_default();
        m.lines()
            .filter(|l| l.starts_with("herd_backend_bytes_total{") && l.contains(dir))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    assert!(
        wait_until(T, || counted("to_backend") == 11_007.0
            && counted("to_client") == 11.0),
        "to_backend {} (want 11007), to_client {} (want 11)",
        counted("to_backend"),
        counted("to_client")
    );
}

/// Reads a chunked body from `r` to its end; its payload length, or `None`
/// if the connection ended first.
fn read_chunked(r: &mut BufReader<TcpStream>) -> Option<usize> {
    let mut total = 0;
    let mut line = String::new();
    loop {
        line.clear();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let size = usize::from_str_radix(line.trim_end(), 16).ok()?;
        if size == 0 {
            loop {
                line.clear();
                if r.read_line(&mut line).ok()? == 0 {
                    return None;
                }
                if line == "\r\n" {
                    return Some(total);
                }
            }
        }
        let mut chunk = vec![0; size + 2];
        r.read_exact(&mut chunk).ok()?;
        total += size;
    }
}

#[test]
fn bodies_past_max_body_size_get_413_and_never_reach_the_backend_whole() {
    // The backend reads each body whole before it answers, and counts
    // the bodies it got whole.
    let whole = Arc::new(AtomicUsize::new(0));
    let counted = whole.clone();
    let (port, conns, _) = backend_counting(Arc::new(
        move |head: &str, r: &mut BufReader<TcpStream>, c: &mut TcpStream| {
            let got = if head
                .to_ascii_lowercase()
                .contains("transfer-encoding: chunked")
            {
                match read_chunked(r) {
                    Some(n) => n,
                    None => return false,
                }
            } else {
                let mut body = vec![0; content_length(head)];
                if r.read_exact(&mut body).is_err() {
                    return false;
                }
                body.len()
            };
            counted.fetch_add(1, Ordering::SeqCst);
            ok(c, &format!("got {got}"));
            true
        },
    ));
    let h = lb(port, &["--max-body-size", "64k"]);
    let limit = 64 * 1024;
    // Sends HEAD, then BODY from another thread (the answer may come
    // first); the whole answer, up to the connection's end.
    let exchange = |head: String, body: Vec<u8>| -> String {
        let mut s = connect(h.port);
        s.write_all(head.as_bytes()).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            for piece in body.chunks(16 * 1024) {
                if w.write_all(piece).is_err() {
                    break;
                }
            }
        });
        let mut r = BufReader::new(s);
        let (head, body) = read_one(&mut r);
        let _ = writer.join();
        format!("{head}{}", String::from_utf8_lossy(&body))
    };
    let sized = |n: usize| {
        exchange(
            format!("POST / HTTP/1.1\r\nHost: t\r\nContent-Length: {n}\r\n\r\n"),
            vec![b'a'; n],
        )
    };
    let chunked = |n: usize| {
        let mut body = Vec::new();
        for piece in vec![b'a'; n].chunks(8 * 1024) {
            body.extend_from_slice(format!("{:x}\r\n", piece.len()).as_bytes());
            body.extend_from_slice(piece);
            body.extend_from_slice(b"\r\n");
        }
        body.extend_from_slice(b"0\r\n\r\n");
        exchange(
            "POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
            body,
        )
    };
    let answer = sized(limit);
    assert!(answer.ends_with(&format!("got {limit}")), "{answer}");
    let answer = chunked(limit);
    assert!(answer.ends_with(&format!("got {limit}")), "{answer}");
    assert_eq!(whole.load(Ordering::SeqCst), 2);
    let backend_conns = conns.load(Ordering::SeqCst);
    // A length past the limit: 413 before any backend hears of it, read by
    // a client still sending.
    let answer = sized(limit + 1);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("Connection: close"), "{answer}");
    // With `Expect: 100-continue`, at once and without a 100.
    let mut s = connect(h.port);
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 10000000\r\nExpect: 100-continue\r\n\r\n",
    )
    .unwrap();
    let (head, _) = read_one(&mut BufReader::new(s));
    assert!(head.starts_with("HTTP/1.1 413"), "{head}");
    assert_eq!(conns.load(Ordering::SeqCst), backend_conns);
    // A chunked body is cut where it passes the limit: the backend never
    // gets it whole, and the client gets the 413.
    let answer = chunked(1024 * 1024);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert_eq!(whole.load(Ordering::SeqCst), 2);
    // Everyone else is served as before.
    assert!(sized(10).ends_with("got 10"));
    assert_eq!(whole.load(Ordering::SeqCst), 3);
}

/// A backend that sends `100 Continue` without end: herd relays 16 interim
/// answers at most per try (a GET is tried 3 times, as after any malformed
/// answer), then answers 502 and drops the connection, on its own
/// engine and on hyper's (h2c), instead of relaying them until
/// `--response-timeout` at a whole CPU.
#[test]
fn a_backend_sending_interim_answers_without_end_gets_a_502_at_once() {
    let port = raw_backend(|mut c, _head| {
        let flood = b"HTTP/1.1 100 Continue\r\n\r\n".repeat(1000);
        while c.write_all(&flood).is_ok() {}
    });
    let h = lb(port, &["--response-timeout", "60s"]);
    let started = std::time::Instant::now();
    let answer = whole_exchange(
        h.port,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    let interim = answer.matches("HTTP/1.1 100 Continue").count();
    assert!(interim <= 3 * 16, "{interim} interim answers relayed");
    assert!(
        answer.contains("HTTP/1.1 502"),
        "{}",
        &answer[answer.len().saturating_sub(300)..]
    );
    let h2c = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
        ])
        .arg(format!("http://127.0.0.1:{}/", h.port))
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&h2c.stdout), "502");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    assert!(
        h.wait_log("sent more than 16 interim (1xx) answers", T),
        "{}",
        h.log()
    );
    // Nothing is left spinning: the master is idle.
    let cpu = || {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", h.child.id())).unwrap();
        let f: Vec<u64> = stat
            .rsplit(')')
            .next()
            .unwrap()
            .split_whitespace()
            .skip(11)
            .take(2)
            .map(|v| v.parse().unwrap())
            .collect();
        f[0] + f[1]
    };
    let (before, at) = (cpu(), std::time::Instant::now());
    assert!(wait_until(T, || at.elapsed() >= Duration::from_secs(1)));
    assert!(cpu() - before < 30, "{} ticks in 1 s", cpu() - before);
}

/// A chunk size line whose extension never ends (`1;aaaa…`): a malformed
/// body (a 502, or the answer cut if its head had gone out), not an
/// answer streamed on with no data in it.
#[test]
fn an_endless_chunk_extension_is_a_malformed_answer() {
    let port = raw_backend(|mut c, _head| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n1;");
        let ext = vec![b'a'; 64 * 1024];
        while c.write_all(&ext).is_ok() {}
    });
    let h = lb(port, &[]);
    let answer = whole_exchange(
        h.port,
        b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    );
    assert!(
        answer.starts_with("HTTP/1.1 502") || answer.len() < 20 * 1024,
        "{} bytes: {}",
        answer.len(),
        &answer[..answer.len().min(300)]
    );
    assert!(
        h.wait_log("sent a malformed chunked body", T),
        "{}",
        h.log()
    );
}

/// A backend answering each request with the forwarding headers it got.
fn forwarded_echo_backend() -> u16 {
    raw_backend(|mut c, head| {
        let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let field = |name: &str| {
            head.lines()
                .find_map(|l| l.strip_prefix(name))
                .unwrap_or("-")
                .trim()
                .to_string()
        };
        let body = format!(
            "xff={} forwarded={} xfp={}",
            field("x-forwarded-for:"),
            field("forwarded:"),
            field("x-forwarded-proto:")
        );
        let _ = write!(
            c,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
    })
}

/// A TCP backend that sends back every byte it gets.
fn echo_backend() -> u16 {
    let echo = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = echo.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for c in echo.incoming() {
            let Ok(mut c) = c else { continue };
            std::thread::spawn(move || {
                let mut b = [0u8; 128];
                while let Ok(n) = c.read(&mut b) {
                    if n == 0 || c.write_all(&b[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    port
}

/// A PROXY protocol version 2 header: `PROXY` from `from` (TCP over IPv4),
/// or `LOCAL` when `None`.
fn proxy_v2(from: Option<std::net::SocketAddrV4>) -> Vec<u8> {
    let mut h = b"\r\n\r\n\0\r\nQUIT\n".to_vec();
    match from {
        Some(a) => {
            h.extend_from_slice(&[0x21, 0x11, 0, 12]);
            h.extend_from_slice(&a.ip().octets());
            h.extend_from_slice(&[127, 0, 0, 1]);
            h.extend_from_slice(&a.port().to_be_bytes());
            h.extend_from_slice(&8000u16.to_be_bytes());
        }
        None => h.extend_from_slice(&[0x20, 0x00, 0, 0]),
    }
    h
}

const GET_CLOSE: &[u8] = b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";

#[test]
fn accept_proxy_takes_the_client_address_from_the_proxy_header() {
    let port = forwarded_echo_backend();
    let dir = std::env::temp_dir().join(format!("herd-accept-proxy-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let access = dir.join("access.log");
    let h = lb(
        port,
        &[
            "--accept-proxy",
            "--access-log",
            s(&access),
            "--header-timeout",
            "1s",
        ],
    );

    assert!(
        h.wait_log(
            "(each connection must begin with a PROXY protocol header)",
            T
        ),
        "{}",
        h.log()
    );
    // Version 1, with the request in the same packet.
    let v1 = [
        &b"PROXY TCP4 203.0.113.9 127.0.0.1 41000 8000\r\n"[..],
        GET_CLOSE,
    ]
    .concat();
    let answer = whole_exchange(h.port, &v1);
    assert!(
        answer.contains("xff=203.0.113.9 forwarded=for=203.0.113.9"),
        "{answer}"
    );
    // Version 1 over IPv6, arriving in two pieces.
    let mut c = connect(h.port);
    c.write_all(b"PROXY TCP6 2001:db8::7 ::1 41000").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.write_all(b" 8000\r\n").unwrap();
    c.write_all(GET_CLOSE).unwrap();
    let mut answer = String::new();
    let _ = c.read_to_string(&mut answer);
    assert!(answer.contains("xff=2001:db8::7 "), "{answer}");
    // Version 2, two requests on one kept-alive connection.
    let from = "198.51.100.4:5000".parse().unwrap();
    let mut c = connect(h.port);
    c.write_all(&proxy_v2(Some(from))).unwrap();
    let mut r = BufReader::new(c.try_clone().unwrap());
    for _ in 0..2 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").unwrap();
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        let body = String::from_utf8_lossy(&body);
        assert!(body.contains("xff=198.51.100.4 "), "{body}");
    }
    drop((r, c));
    // Version 2's LOCAL (a balancer's health check): the peer's own address.
    let answer = whole_exchange(h.port, &[proxy_v2(None), GET_CLOSE.to_vec()].concat());
    assert!(answer.contains("xff=127.0.0.1 "), "{answer}");

    // Without a header (a client that skipped the balancer), or with a bad
    // one: closed unanswered, and said in the log (the first; then at most
    // once every 10 s).
    assert_eq!(whole_exchange(h.port, GET_CLOSE), "");
    assert!(h.wait_log("no PROXY protocol header", T), "{}", h.log());
    let bad = [
        &b"PROXY TCP4 203.0.113.9 127.0.0.1 99999 8000\r\n"[..],
        GET_CLOSE,
    ]
    .concat();
    assert_eq!(whole_exchange(h.port, &bad), "");
    // A connection whose header never ends is closed at --header-timeout;
    // the others are served meanwhile.
    let mut silent = connect(h.port);
    silent.write_all(b"PROXY TCP4").unwrap();
    let answer = whole_exchange(h.port, &v1);
    assert!(answer.contains("xff=203.0.113.9 "), "{answer}");
    // Closed (its unread bytes make it a reset), not timed out.
    let end = silent.read(&mut [0u8; 1]);
    assert!(
        matches!(&end, Ok(0))
            || matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "{end:?}"
    );
    assert!(
        wait_until(T, || std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("203.0.113.9 "))
            .count()
            == 2),
        "access log: {}",
        std::fs::read_to_string(&access).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_proxy_header_without_accept_proxy_gets_a_400_and_a_hint() {
    let port = forwarded_echo_backend();
    let v1 = [
        &b"PROXY TCP4 203.0.113.9 127.0.0.1 41000 8000\r\n"[..],
        GET_CLOSE,
    ]
    .concat();
    let v2 = [
        proxy_v2(Some("198.51.100.4:5000".parse().unwrap())),
        GET_CLOSE.to_vec(),
    ]
    .concat();
    // Requests whose first word begins alike are not taken for one.
    let propfind = b"PROPFIND / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n";
    for header in [v1, v2] {
        // A herd each: the warning is said once every 10 s.
        let h = lb(port, &[]);
        let answer = whole_exchange(h.port, &header);
        assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
        assert!(
            h.wait_log("it began with a PROXY protocol header", T),
            "{}",
            h.log()
        );
        assert!(whole_exchange(h.port, propfind).starts_with("HTTP/1.1 200"));
    }
}

/// Sends `HEAD` twice then `GET` on one connection and reads until the
/// `GET`'s answer is whole: herd's own answers to a `HEAD` are heads alone,
/// so the body text comes once, and the connection stays in step.
fn heads_then_get(port: u16, headers: &str, body: &str) -> String {
    let mut c = connect(port);
    let req = |m: &str| format!("{m} / HTTP/1.1\r\nHost: t\r\n{headers}\r\n");
    c.write_all(format!("{}{}{}", req("HEAD"), req("HEAD"), req("GET")).as_bytes())
        .unwrap();
    let mut all = String::new();
    let mut b = [0u8; 4096];
    while all.matches("HTTP/1.1 ").count() < 3 || !all.ends_with(body) {
        match c.read(&mut b) {
            Ok(n) if n > 0 => all.push_str(&String::from_utf8_lossy(&b[..n])),
            _ => break,
        }
    }
    all
}

#[test]
fn herds_own_answers_to_head_have_no_body() {
    // Nothing listens on port 1: each request gets herd's own 502.
    let h = lb(1, &[]);
    let all = heads_then_get(h.port, "", "could not connect to a backend\n");
    assert_eq!(all.matches("HTTP/1.1 502").count(), 3, "{all}");
    assert_eq!(all.matches("could not connect").count(), 1, "{all}");
}

#[test]
fn rate_limit_answers_429_past_a_clients_burst_and_spares_the_others() {
    let port = forwarded_echo_backend();
    let dir = std::env::temp_dir().join(format!("herd-rate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let access = dir.join("access.log");
    let admin = format!("127.0.0.1:{}", free_port());
    // The clients are named by the balancer in front (here, the test).
    let h = lb(
        port,
        &[
            "--admin",
            &admin,
            "--rate-limit",
            "1/m,burst=3",
            "--real-ip-from",
            "127.0.0.1",
            "--real-ip-header",
            "X-Real-IP",
            "--access-log",
            s(&access),
        ],
    );
    let ask = |client: &str| {
        let req = format!(
            "GET / HTTP/1.1\r\nHost: t\r\nX-Real-IP: {client}\r\nConnection: close\r\n\r\n"
        );
        whole_exchange(h.port, req.as_bytes())
    };
    // A burst of three; the fourth waits a minute.
    for _ in 0..3 {
        let answer = ask("203.0.113.1");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    let answer = ask("203.0.113.1");
    assert!(answer.starts_with("HTTP/1.1 429"), "{answer}");
    assert!(answer.contains("Retry-After: 60\r\n"), "{answer}");
    // Another client is not held back by the first.
    assert!(ask("203.0.113.2").starts_with("HTTP/1.1 200"));
    // A bodiless request's 429 keeps the connection; one with a body closes it.
    let mut c = connect(h.port);
    let mut r = BufReader::new(c.try_clone().unwrap());
    for _ in 0..2 {
        c.write_all(b"GET / HTTP/1.1\r\nHost: t\r\nX-Real-IP: 203.0.113.1\r\n\r\n")
            .unwrap();
        let (head, body) = read_one(&mut r);
        assert!(head.starts_with("HTTP/1.1 429"), "{head}");
        assert_eq!(body, b"too many requests\n");
    }
    c.write_all(
        b"POST / HTTP/1.1\r\nHost: t\r\nX-Real-IP: 203.0.113.1\r\nContent-Length: 3\r\n\r\nabc",
    )
    .unwrap();
    let (head, _) = read_one(&mut r);
    assert!(
        head.starts_with("HTTP/1.1 429") && head.contains("Connection: close"),
        "{head}"
    );
    drop((r, c));
    let all = heads_then_get(h.port, "X-Real-IP: 203.0.113.1\r\n", "too many requests\n");
    assert_eq!(all.matches("HTTP/1.1 429").count(), 3, "{all}");
    assert_eq!(all.matches("too many requests").count(), 1, "{all}");
    // Over h2c, served through hyper: the same client, the same answer.
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "-i",
            "--http2-prior-knowledge",
            "-H",
            "X-Real-IP: 203.0.113.1",
        ])
        .arg(format!("http://127.0.0.1:{}/", h.port))
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(answer.starts_with("HTTP/2 429"), "{answer}");
    assert!(answer.contains("retry-after: "), "{answer}");
    assert!(
        h.wait_log("a client at 203.0.113.1: over --rate-limit", T),
        "{}",
        h.log()
    );
    let metrics = whole_exchange(
        admin.rsplit(':').next().unwrap().parse().unwrap(),
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert!(
        metrics.contains("\nherd_rate_limited_total 8\n"),
        "{metrics}"
    );
    assert!(
        wait_until(T, || std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.starts_with("203.0.113.1 ") && l.contains("\" 429 "))
            .count()
            >= 4),
        "access log: {}",
        std::fs::read_to_string(&access).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn accept_proxy_from_some_addresses_serves_the_others_directly() {
    let port = forwarded_echo_backend();
    let h = lb(
        port,
        &[
            "--accept-proxy=127.0.0.9,10.0.0.0/8",
            "--header-timeout",
            "1s",
        ],
    );
    let said =
        "(each connection from 127.0.0.9/32, 10.0.0.0/8 must begin with a PROXY protocol header)";
    assert!(h.wait_log(said, T), "{}", h.log());
    let v1 = [
        &b"PROXY TCP4 203.0.113.9 127.0.0.1 41000 8000\r\n"[..],
        GET_CLOSE,
    ]
    .concat();
    // The balancer's connections begin with a header naming the client;
    // one without is closed.
    let answer = exchange_from("127.0.0.9", h.port, &v1);
    assert!(answer.contains("xff=203.0.113.9 "), "{answer}");
    assert_eq!(exchange_from("127.0.0.9", h.port, GET_CLOSE), "");
    // A client that reaches herd directly is served as itself, and a PROXY
    // header from it is not believed: a 400, and the log says why.
    let answer = exchange_from("127.0.0.1", h.port, GET_CLOSE);
    assert!(answer.contains("xff=127.0.0.1 "), "{answer}");
    let answer = exchange_from("127.0.0.1", h.port, &v1);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        h.wait_log("but not from an address --accept-proxy names", T),
        "{}",
        h.log()
    );
    drop(h);

    // TCP mode, before a backend that speaks first (as SMTP, MySQL do): a
    // direct client is not kept waiting for bytes of its own (TCP mode
    // defers accepting when every connection begins with a header).
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let greeter = l.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for mut c in l.incoming().flatten() {
            let _ = c.write_all(b"220 hello\r\n");
        }
    });
    let h = lb(greeter, &["--protocol", "tcp", "--accept-proxy=127.0.0.9"]);
    for (from, first) in [
        ("127.0.0.1", &b""[..]),
        (
            "127.0.0.9",
            b"PROXY TCP4 203.0.113.9 127.0.0.1 41000 8000\r\n",
        ),
    ] {
        let mut c = connect_from(from, h.port);
        c.write_all(first).unwrap();
        c.set_read_timeout(Some(Duration::from_millis(800)))
            .unwrap();
        let mut got = [0u8; 11];
        let read = c.read_exact(&mut got);
        assert!(read.is_ok() && &got == b"220 hello\r\n", "{from}: {read:?}");
    }
}

#[test]
fn accept_proxy_in_tcp_mode_passes_on_what_follows_the_header() {
    let port = echo_backend();
    let dir = std::env::temp_dir().join(format!("herd-accept-proxy-tcp-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let access = dir.join("access.log");
    let h = lb(
        port,
        &[
            "--protocol",
            "tcp",
            "--accept-proxy",
            "--access-log",
            s(&access),
        ],
    );
    let mut c = connect(h.port);
    let from = "198.51.100.4:5000".parse().unwrap();
    c.write_all(&[proxy_v2(Some(from)), b"hello".to_vec()].concat())
        .unwrap();
    let mut back = [0u8; 5];
    c.read_exact(&mut back).unwrap();
    assert_eq!(
        &back, b"hello",
        "the backend got what followed the header, only that"
    );
    drop(c);
    assert!(
        wait_until(T, || std::fs::read_to_string(&access)
            .unwrap_or_default()
            .starts_with("198.51.100.4 ")),
        "access log: {}",
        std::fs::read_to_string(&access).unwrap_or_default()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn accept_proxy_behind_haproxy_and_from_curl() {
    let port = forwarded_echo_backend();
    let h = lb(port, &["--accept-proxy"]);
    // curl's own version 1 header, from another loopback address.
    let out = std::process::Command::new("curl")
        .args(["-s", "--haproxy-protocol", "--interface", "127.0.0.8"])
        .arg(format!("http://127.0.0.1:{}/", h.port))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("xff=127.0.0.8 "), "{body}");

    // HAProxy in front, sending version 2 (`send-proxy-v2`).
    let haproxy = HaProxy::start("front", "", h.port, "send-proxy-v2", false);
    let out = std::process::Command::new("curl")
        .args(["-s", "--interface", "127.0.0.7"])
        .arg(format!("http://127.0.0.1:{}/", haproxy.port))
        .output()
        .expect("curl");
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("xff=127.0.0.7 "), "{body}");
}

/// HAProxy in HTTP mode on a free port, sending to `backend`; `bind` and
/// `server` are extra words for its `bind` and `server` lines; with
/// `forwardfor`, it adds `X-Forwarded-For`. Killed on drop.
struct HaProxy {
    child: std::process::Child,
    port: u16,
    dir: std::path::PathBuf,
}

impl HaProxy {
    fn start(tag: &str, bind: &str, backend: u16, server: &str, forwardfor: bool) -> HaProxy {
        let dir = std::env::temp_dir().join(format!("herd-haproxy-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = free_port();
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(
            &cfg,
            format!(
                "global\n  maxconn 100\ndefaults\n  mode http\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
                 frontend f\n  bind 127.0.0.1:{port} {bind}\n  default_backend b\n\
                 backend b\n  {}\n  server s 127.0.0.1:{backend} {server}\n",
                if forwardfor { "option forwardfor" } else { "" }
            ),
        )
        .unwrap();
        let child = std::process::Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&cfg)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy (.ci/run installs Debian's haproxy)");
        assert!(wait_until(T, || TcpStream::connect(("127.0.0.1", port)).is_ok()));
        HaProxy { child, port, dir }
    }
}

impl Drop for HaProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn real_ip_from_takes_the_client_a_trusted_balancer_names() {
    let port = forwarded_echo_backend();
    let dir = std::env::temp_dir().join(format!("herd-real-ip-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let access = dir.join("access.log");
    let ask = |port: u16, header: &str| {
        let req = format!("GET / HTTP/1.1\r\nHost: t\r\n{header}Connection: close\r\n\r\n");
        whole_exchange(port, req.as_bytes())
    };
    // herd's peer here, 127.0.0.1, is the balancer in front; 10.0.0.2 another
    // one before it. What the client wrote itself (1.1.1.1) is not taken.
    let h = lb(
        port,
        &[
            "--real-ip-from",
            "127.0.0.1,10.0.0.0/8",
            "--access-log",
            s(&access),
        ],
    );
    let answer = ask(
        h.port,
        "X-Forwarded-For: 1.1.1.1, 203.0.113.9, 10.0.0.2\r\nX-Forwarded-Proto: https\r\n",
    );
    // A balancer named also says which scheme the client used.
    assert!(answer.contains(" xfp=https"), "{answer}");
    assert!(
        answer
            .contains("xff=1.1.1.1, 203.0.113.9, 10.0.0.2, 203.0.113.9 forwarded=for=203.0.113.9;"),
        "{answer}"
    );
    // No header, or a word that is not an address: the peer.
    assert!(ask(h.port, "").contains("xff=127.0.0.1 "));
    let answer = ask(h.port, "X-Forwarded-For: 203.0.113.9, unknown\r\n");
    assert!(
        answer.contains("xff=203.0.113.9, unknown, 127.0.0.1 "),
        "{answer}"
    );
    assert!(
        wait_until(T, || std::fs::read_to_string(&access)
            .unwrap_or_default()
            .lines()
            .any(|l| l.starts_with("203.0.113.9 "))),
        "access log: {}",
        std::fs::read_to_string(&access).unwrap_or_default()
    );
    drop(h);

    // A header from a peer not listed is the client's own word: not taken.
    let h = lb(
        port,
        &[
            "--real-ip-from",
            "10.0.0.0/8",
            "--real-ip-header",
            "X-Real-IP",
        ],
    );
    let answer = ask(
        h.port,
        "X-Real-IP: 203.0.113.9\r\nX-Forwarded-Proto: https\r\n",
    );
    assert!(answer.contains("xff=127.0.0.1 "), "{answer}");
    assert!(answer.ends_with(" xfp=http"), "{answer}");
    // The same over h2c (served through hyper).
    let out = std::process::Command::new("curl")
        .args([
            "-s",
            "--http2-prior-knowledge",
            "-H",
            "X-Real-IP: 203.0.113.9",
        ])
        .args(["-H", "X-Forwarded-Proto: https"])
        .arg(format!("http://127.0.0.1:{}/", h.port))
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.starts_with("xff=127.0.0.1 ") && answer.ends_with(" xfp=http"),
        "{answer}"
    );
    drop(h);

    // ip-hash on the client each request names: one client always reaches
    // the same backend, and the clients are spread over both.
    let lettered = |letter: &'static str| {
        backend(Arc::new(move |_, _, c| {
            write!(c, "HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{letter}").is_ok()
        }))
        .0
    };
    let (a, b) = (lettered("A"), lettered("B"));
    let other = format!("--upstream=127.0.0.1:{b}");
    let h = lb(
        a,
        &[
            &other,
            "--balance",
            "ip-hash",
            "--real-ip-from",
            "127.0.0.1",
            "--real-ip-header",
            "X-Real-IP",
        ],
    );
    let mut seen = std::collections::BTreeSet::new();
    for i in 1..=16 {
        let header = format!("X-Real-IP: 203.0.113.{i}\r\n");
        let answers: Vec<String> = (0..3)
            .map(|_| {
                let answer = ask(h.port, &header);
                answer.rsplit("\r\n\r\n").next().unwrap_or("").to_string()
            })
            .collect();
        assert!(answers.iter().all(|x| x == &answers[0]), "{i}: {answers:?}");
        seen.insert(answers[0].clone());
    }
    assert_eq!(
        seen,
        ["A", "B"].map(String::from).into_iter().collect(),
        "{}",
        h.log()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn send_proxy_in_tcp_mode_tells_the_backend_the_client() {
    // The exact bytes: a backend that echoes what it gets.
    let port = echo_backend();
    let h = lb(
        port,
        &["--protocol", "tcp", "--accept-proxy", "--send-proxy=v2"],
    );
    let mut c = connect(h.port);
    let v1 = format!("PROXY TCP4 203.0.113.9 127.0.0.1 41000 {}\r\nhello", h.port);
    c.write_all(v1.as_bytes()).unwrap();
    let mut want = b"\r\n\r\n\0\r\nQUIT\n\x21\x11\x00\x0c".to_vec();
    want.extend_from_slice(&[203, 0, 113, 9, 127, 0, 0, 1]);
    want.extend_from_slice(&41000u16.to_be_bytes());
    want.extend_from_slice(&h.port.to_be_bytes());
    want.extend_from_slice(b"hello");
    let mut got = vec![0u8; want.len()];
    c.read_exact(&mut got).unwrap();
    assert_eq!(got, want);
    drop((c, h));

    // A real reader of each version: HAProxy with `accept-proxy`, whose
    // `option forwardfor` then names the client to the app.
    let app = forwarded_echo_backend();
    for version in ["v1", "v2"] {
        let haproxy = HaProxy::start(version, "accept-proxy", app, "", true);
        let flag = format!("--send-proxy={version}");
        let h = lb(haproxy.port, &["--protocol", "tcp", &flag]);
        let out = std::process::Command::new("curl")
            .args(["-s", "--interface", "127.0.0.6"])
            .arg(format!("http://127.0.0.1:{}/", h.port))
            .output()
            .expect("curl");
        let body = String::from_utf8_lossy(&out.stdout);
        assert!(body.contains("xff=127.0.0.6 "), "{version}: {body}");
    }
}
