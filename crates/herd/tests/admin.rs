//! The admin listener: `/metrics` read by Prometheus' own parser (the
//! `prometheus_client` Python package), `/status`, and the token rules.

mod common;

use std::io::{BufReader, Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use common::*;

const T: Duration = Duration::from_secs(30);

/// GET `path` on `port` with an optional bearer token: (status, body).
fn admin_get(port: u16, path: &str, token: Option<&str>) -> (u16, String) {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    get_host(port, path, &format!("127.0.0.1:{port}"), &auth).unwrap()
}

/// The samples of a Prometheus text exposition as Prometheus' own client
/// library parses it: one `name{labels} value` line per sample, labels
/// sorted, or the parser's error.
fn parse_metrics(text: &str) -> Vec<String> {
    let script = r#"
import sys
from prometheus_client.parser import text_string_to_metric_families
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        print(f"{s.name}{{{labels}}} {s.value}")
"#;
    let mut child = std::process::Command::new("python3")
        .args(["-c", script])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "the Prometheus parser refused it: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

fn value(samples: &[String], series: &str) -> f64 {
    samples
        .iter()
        .find_map(|s| s.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {series} in {samples:#?}"))
}

fn sum(samples: &[String], prefix: &str, label: &str) -> f64 {
    samples
        .iter()
        .filter(|s| s.starts_with(prefix) && s.contains(label))
        .filter_map(|s| s.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_parse_with_prometheus_own_parser_and_move_under_load() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(&["-i", "2", "--admin", &addr], &[DEMO]);
    h.wait_ready(2);
    for _ in 0..50 {
        assert_eq!(h.get("/").unwrap().0, 200);
    }
    let (code, text) = admin_get(admin, "/metrics", None);
    assert_eq!(code, 200, "{text}");
    let m = parse_metrics(&text);
    assert_eq!(value(&m, "herd_workers{state=ready}"), 2.0);
    assert!(value(&m, "herd_worker_resident_memory_bytes{worker=0}") > 1e5);
    assert_eq!(value(&m, "herd_reloads_total{outcome=done}"), 0.0);
    let ok_before = sum(&m, "herd_backend_requests_total", "code=2xx");
    assert!(ok_before >= 50.0, "{ok_before}");
    let count = sum(
        &m,
        "herd_backend_request_duration_seconds_count",
        "backend=worker-",
    );
    assert_eq!(count, ok_before, "every answer is in the histogram");
    assert!(m.iter().any(|s| {
        s.starts_with("herd_backend_request_duration_seconds_bucket{backend=worker-0,le=+Inf}")
    }));
    // Each answer of the demo has a body of a few dozen bytes.
    let bytes = sum(&m, "herd_backend_bytes_total", "direction=to_client");
    assert!(bytes >= 50.0 * 10.0, "{bytes}");
    assert_eq!(
        sum(&m, "herd_backend_bytes_total", "direction=to_backend"),
        0.0
    );
    assert_eq!(value(&m, "herd_listen_queue{}"), 0.0);
    assert!(value(&m, "herd_listen_overflows_total{}") >= 0.0);

    // Under more load, and after a reload, the values move.
    for _ in 0..30 {
        h.get("/").unwrap();
    }
    let slow = std::thread::spawn({
        let port = h.port;
        move || http_get(port, "/slow?ms=1500")
    });
    assert!(h.wait_log("slow request started", T));
    let m = parse_metrics(&admin_get(admin, "/metrics", None).1);
    assert!(sum(&m, "herd_backend_requests_total", "code=2xx") >= ok_before + 30.0);
    assert_eq!(
        sum(&m, "herd_backend_in_flight", "backend=worker-"),
        1.0,
        "the slow one"
    );
    slow.join().unwrap().unwrap();
    let out = herd(&["reload", "--name", &status_name(admin)]);
    assert!(out.status.success());
    let m = parse_metrics(&admin_get(admin, "/metrics", None).1);
    assert_eq!(value(&m, "herd_reloads_total{outcome=done}"), 1.0);
    assert_eq!(value(&m, "herd_restarts_total{cause=reload}"), 2.0);
    assert_eq!(value(&m, "herd_restarts_total{cause=exit}"), 0.0);
    assert_eq!(value(&m, "herd_worker_restarts_total{worker=1}"), 1.0);
}

/// The cluster's name, from `/status`.
fn status_name(admin: u16) -> String {
    let (_, body) = admin_get(admin, "/status", None);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["name"].as_str().unwrap().to_string()
}

#[test]
fn with_a_token_everything_needs_it_but_public_metrics() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(
        &["-i", "1", "--admin", &addr, "--admin-token", "s3cret"],
        &[DEMO],
    );
    h.wait_ready(1);
    assert_eq!(admin_get(admin, "/metrics", None).0, 401);
    assert_eq!(admin_get(admin, "/metrics", Some("wrong!")).0, 401);
    assert_eq!(admin_get(admin, "/metrics", Some("s3cret")).0, 200);
    let (code, body) = admin_get(admin, "/status", Some("s3cret"));
    assert_eq!(code, 200);
    assert!(body.contains(r#""workers":[{"#), "{body}");
    drop(h);

    let admin = free_port();
    let addr = format!("0.0.0.0:{admin}");
    let h = Herd::spawn(
        herd_cmd()
            .args([
                "run",
                "-i",
                "1",
                "--admin",
                &addr,
                "--admin-public-metrics",
                "--listen",
            ])
            .arg(format!("127.0.0.1:{}", free_port()))
            .args(["--", DEMO])
            .env("HERD_ADMIN_TOKEN", "from-env"),
        0,
    );
    assert!(h.wait_log("all workers ready", T), "{}", h.log());
    assert_eq!(admin_get(admin, "/metrics", None).0, 200, "public metrics");
    assert_eq!(admin_get(admin, "/status", None).0, 401);
    assert_eq!(admin_get(admin, "/status", Some("from-env")).0, 200);
    assert_eq!(admin_get(admin, "/nope", Some("from-env")).0, 404);
}

/// The access log's lines, once there are `n`.
fn log_lines(path: &std::path::Path, n: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let ok = wait_until(T, || {
        lines = std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect();
        lines.len() >= n
    });
    assert!(ok, "{} lines, not {n}: {lines:?}", lines.len());
    lines
}

fn temp(tag: &str) -> std::path::PathBuf {
    let p = std::env::temp_dir().join(format!("herd-access-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn the_access_log_has_every_field_in_json_and_in_nginx_combined() {
    let json = temp("json");
    let h = Herd::start(
        &[
            "-i",
            "1",
            "--access-log",
            json.to_str().unwrap(),
            "--access-log-format",
            "json",
        ],
        &[DEMO],
    );
    h.wait_ready(1);
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"GET /slow?ms=60 HTTP/1.1\r\nHost: t\r\nUser-Agent: probe/1\r\nReferer: http://r/\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    s.read_to_string(&mut answer).unwrap();
    let body_len = answer.split_once("\r\n\r\n").unwrap().1.len() as u64;
    let line = &log_lines(&json, 1)[0];
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    assert_eq!(v["client"], "127.0.0.1", "{line}");
    assert_eq!(
        (v["method"].as_str(), v["path"].as_str()),
        (Some("GET"), Some("/slow?ms=60"))
    );
    assert_eq!(
        (v["protocol"].as_str(), v["status"].as_u64()),
        (Some("HTTP/1.1"), Some(200))
    );
    assert_eq!(v["bytes"].as_u64(), Some(body_len), "{line}");
    assert!(v["duration"].as_f64().unwrap() >= 0.06, "{line}");
    let up = v["upstream_time"].as_f64().unwrap();
    assert!(
        up >= 0.06 && up <= v["duration"].as_f64().unwrap(),
        "{line}"
    );
    // herd-demo serves on the Unix socket herd offers it, as nginx logs one.
    let up = v["upstream"].as_str().unwrap();
    assert!(up.starts_with("unix:/") && up.ends_with("/s0.1"), "{line}");
    assert_eq!(
        (v["worker"].as_str(), v["retries"].as_u64()),
        (Some("worker-0"), Some(0))
    );
    assert_eq!(v["user_agent"], "probe/1");
    assert_eq!(v["referer"], "http://r/");
    let time = v["time"].as_str().unwrap();
    assert!(
        time.len() == 24 && time.ends_with('Z') && time.as_bytes()[10] == b'T',
        "{time}"
    );
    drop(h);

    let combined = temp("combined");
    let h = Herd::start(
        &["-i", "1", "--access-log", combined.to_str().unwrap()],
        &[DEMO],
    );
    h.wait_ready(1);
    let (status, body) = h.get("/a%22b").unwrap();
    let line = &log_lines(&combined, 1)[0];
    let expect = format!(
        "\"GET /a%22b HTTP/1.1\" {status} {} \"-\" \"-\"",
        body.len()
    );
    assert!(line.starts_with("127.0.0.1 - - ["), "{line}");
    assert!(
        line.contains(" +0000] ") && line.ends_with(&expect),
        "{line}\n{expect}"
    );
    // A smuggling probe is refused, and logged as nginx logs what it could
    // not read: "-" for the request.
    let mut s = TcpStream::connect(("127.0.0.1", h.port)).unwrap();
    s.set_read_timeout(Some(T)).unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let line = &log_lines(&combined, 2)[1];
    assert!(line.ends_with("] \"-\" 400 12 \"-\" \"-\""), "{line}");
    let _ = std::fs::remove_file(&json);
    let _ = std::fs::remove_file(&combined);
}

#[test]
fn the_access_log_has_a_line_per_tcp_connection_and_for_herds_own_answers() {
    let path = temp("tcp");
    let h = Herd::start(
        &[
            "-i",
            "1",
            "--protocol",
            "tcp",
            "--access-log",
            path.to_str().unwrap(),
            "--access-log-format",
            "json",
        ],
        &[DEMO],
    );
    h.wait_ready(1);
    let (_, body) = h.get("/").unwrap();
    let v: serde_json::Value = serde_json::from_str(&log_lines(&path, 1)[0]).unwrap();
    assert_eq!(
        (v["protocol"].as_str(), v["method"].as_str()),
        (Some("TCP"), Some("-"))
    );
    assert_eq!(v["worker"], "worker-0");
    assert!(
        v["bytes"].as_u64().unwrap() > body.len() as u64,
        "both ways: {v}"
    );
    drop(h);

    // No backend answers: herd's own 502 is logged, with no worker.
    let own = temp("own");
    let h = Herd::start(
        &[
            "--upstream",
            "127.0.0.1:1",
            "--access-log",
            own.to_str().unwrap(),
            "--access-log-format",
            "json",
        ],
        &[],
    );
    assert!(h.wait_log("listening on", T), "{}", h.log());
    assert_eq!(h.get("/x").unwrap().0, 502);
    let v: serde_json::Value = serde_json::from_str(&log_lines(&own, 1)[0]).unwrap();
    assert_eq!(
        (v["status"].as_u64(), v["worker"].is_null()),
        (Some(502), true),
        "{v}"
    );
    let _ = std::fs::remove_file(&path);
    let _ = std::fs::remove_file(&own);
}

#[test]
fn the_accept_queue_shows_connections_no_worker_took_yet() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(&["-i", "1", "--mode", "shared", "--admin", &addr], &[DEMO]);
    h.wait_ready(1);
    let pid = h.worker_pids(1)[0];
    let queued = |admin| {
        value(
            &parse_metrics(&admin_get(admin, "/metrics", None).1),
            "herd_listen_queue{}",
        )
    };
    assert_eq!(queued(admin), 0.0);
    // A stopped worker accepts nothing: the kernel queues the connections.
    signal(pid, "STOP");
    let conns: Vec<TcpStream> = (0..20)
        .map(|_| TcpStream::connect(("127.0.0.1", h.port)).unwrap())
        .collect();
    assert!(
        wait_until(T, || queued(admin) >= 20.0),
        "queue: {}",
        queued(admin)
    );
    signal(pid, "CONT");
    for mut c in conns {
        c.set_read_timeout(Some(T)).unwrap();
        write!(c, "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
        let mut answer = String::new();
        c.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    assert!(wait_until(T, || queued(admin) == 0.0));
}

#[test]
fn without_a_token_only_loopback_names_reach_the_admin_listener() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(&["-i", "1", "--admin", &addr], &[DEMO]);
    h.wait_ready(1);
    // A page on another site that rebinds its name to 127.0.0.1 is refused.
    let (code, body) = get_host(admin, "/status", "evil.example:80", "").unwrap();
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("loopback"), "{body}");
    assert_eq!(
        get_host(admin, "/events", "evil.example", "").unwrap().0,
        403
    );
    // Scrapers may name the host as they like: /metrics holds no secret.
    assert_eq!(
        get_host(admin, "/metrics", "metrics.internal:9100", "")
            .unwrap()
            .0,
        200
    );
    for host in ["localhost:1", "127.0.0.1", "[::1]:9"] {
        assert_eq!(
            get_host(admin, "/status", host, "").unwrap().0,
            200,
            "{host}"
        );
    }
    // Actions need JSON from the page's own origin.
    let post = |headers: &str| {
        let mut s = TcpStream::connect(("127.0.0.1", admin)).unwrap();
        s.set_read_timeout(Some(T)).unwrap();
        write!(
            s,
            "POST /api/scale HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\n{headers}Content-Length: 10\r\nConnection: close\r\n\r\n{{\"n\":\"+1\"}}"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    let form = post("Content-Type: application/x-www-form-urlencoded\r\n");
    assert!(form.starts_with("HTTP/1.1 403"), "{form}");
    let cross = post("Content-Type: application/json\r\nOrigin: http://evil.example\r\n");
    assert!(cross.starts_with("HTTP/1.1 403"), "{cross}");
    let own = post(&format!(
        "Content-Type: application/json\r\nOrigin: http://127.0.0.1:{admin}\r\n"
    ));
    assert!(
        own.starts_with("HTTP/1.1 200") && own.contains("\"workers\":2"),
        "{own}"
    );
}

/// The admin listener may face the network (with a token): a client that
/// sends half a head, or none, is let go after 10 s, and others are served
/// meanwhile.
#[test]
fn admin_clients_that_never_finish_a_head_are_let_go() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(&["-i", "1", "--admin", &addr], &[DEMO]);
    h.wait_ready(1);
    let idle = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    let mut half = TcpStream::connect(("127.0.0.1", admin)).unwrap();
    half.write_all(b"GET /status HTTP/1.1\r\nHo").unwrap();
    let since = std::time::Instant::now();
    assert_eq!(admin_get(admin, "/status", None).0, 200);
    for mut s in [idle, half] {
        s.set_read_timeout(Some(T)).unwrap();
        let n = s.read(&mut [0u8; 64]).unwrap_or(usize::MAX);
        assert_eq!(n, 0, "not closed");
    }
    let took = since.elapsed();
    assert!(
        took > Duration::from_secs(9) && took < Duration::from_secs(15),
        "{took:?}"
    );
}

/// `herd_proxy_queued`: requests waiting for room under `max_conns`.
#[test]
fn the_queue_under_max_conns_is_in_the_metrics() {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(
        &["-i", "1", "--worker-max-conns", "1", "--admin", &addr],
        &[DEMO],
    );
    h.wait_ready(1);
    let queued = |admin| {
        value(
            &parse_metrics(&admin_get(admin, "/metrics", None).1),
            "herd_proxy_queued{}",
        )
    };
    assert_eq!(queued(admin), 0.0);
    let port = h.port;
    let slow = std::thread::spawn(move || http_get(port, "/slow?ms=1500"));
    assert!(h.wait_log("slow request started", T));
    let behind = std::thread::spawn(move || http_get(port, "/"));
    assert!(wait_until(T, || queued(admin) == 1.0));
    assert_eq!(slow.join().unwrap().unwrap().0, 200);
    assert_eq!(behind.join().unwrap().unwrap().0, 200);
    assert_eq!(queued(admin), 0.0);
}

/// `herd_proxy_connections`, per proxy thread, from `/metrics`.
fn thread_loads(admin: u16) -> Vec<u64> {
    admin_get(admin, "/metrics", None)
        .1
        .lines()
        .filter(|l| l.starts_with("herd_proxy_connections{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
        .collect()
}

/// The kernel spreads connections over the proxy threads' sockets by a hash
/// of their addresses; herd hands a keep-alive connection to a less busy
/// thread when it first waits for a next request. After each new client
/// the threads' counts (`herd_proxy_connections`) stay within the rule (an
/// eighth and two); hashed alone, they drift further apart as clients
/// come. Moved connections keep serving, pipelined requests too. With
/// `--protocol tcp` a connection is handed over as it is accepted.
#[test]
fn keep_alive_clients_are_spread_evenly_over_the_proxy_threads() {
    for protocol in ["http", "tcp"] {
        clients_are_spread(protocol);
    }
}

fn clients_are_spread(protocol: &str) {
    let admin = free_port();
    let addr = format!("127.0.0.1:{admin}");
    let h = Herd::start(
        &["-i", "2", "--protocol", protocol, "--admin", &addr],
        &[DEMO],
    );
    h.wait_ready(2);
    if thread_loads(admin).len() < 2 {
        eprintln!("one proxy thread on this machine: nothing to spread");
        return;
    }
    let even = |l: &[u64]| {
        let (min, max) = (l.iter().min().copied(), l.iter().max().copied());
        min.zip(max)
            .is_some_and(|(min, max)| max - min <= 2 + min / 8)
    };
    let mut clients = Vec::new();
    for n in 1..=48u64 {
        let mut c = BufReader::new(TcpStream::connect(("127.0.0.1", h.port)).unwrap());
        c.get_mut().set_read_timeout(Some(T)).unwrap();
        assert_eq!(keepalive_get(&mut c).unwrap().0, 200);
        clients.push(c);
        assert!(
            wait_until(Duration::from_secs(5), || {
                let l = thread_loads(admin);
                l.iter().sum::<u64>() == n && even(&l)
            }),
            "{protocol}, {n} clients: {:?}",
            thread_loads(admin)
        );
    }
    for c in &mut clients {
        assert_eq!(keepalive_get(c).unwrap().0, 200);
        c.get_mut()
            .write_all(b"GET /a HTTP/1.1\r\nHost: t\r\n\r\nGET /b HTTP/1.1\r\nHost: t\r\n\r\n")
            .unwrap();
        for _ in 0..2 {
            assert_eq!(read_answer(c).unwrap().0, 200);
        }
    }
    drop(clients);
    assert!(wait_until(T, || thread_loads(admin).iter().sum::<u64>() == 0));
}
