//! TLS termination with real clients: certificates made by `openssl` for
//! a private CA, `curl --http1.1` and `--http2` through herd to the demo,
//! `openssl s_client` for SNI, resumption and refused protocol versions,
//! certificate reloads under load, the plain-HTTP redirect, clients'
//! certificates, and bad certificates refused before anything starts.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::*;

const T: Duration = Duration::from_secs(20);

/// `curl` to `https://NAME:PORT/PATH` (resolved to loopback), trusting the CA.
fn curl(pki: &Pki, name: &str, port: u16, path: &str, extra: &[&str]) -> Output {
    Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "10",
            "--cacert",
            s(&pki.path("ca.crt")),
        ])
        .args(["--resolve", &format!("{name}:{port}:127.0.0.1")])
        .args(["-w", "\nhttp_version=%{http_version}"])
        .args(extra)
        .arg(format!("https://{name}:{port}{path}"))
        .stdin(Stdio::null())
        .output()
        .expect("curl")
}

/// `openssl s_client` against 127.0.0.1:PORT with ARGS; its output.
fn s_client(port: u16, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("openssl");
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn tls_args(pairs: &[&(PathBuf, PathBuf)]) -> Vec<String> {
    pairs
        .iter()
        .flat_map(|(c, k)| {
            [
                "--tls-cert".into(),
                s(c).to_string(),
                "--tls-key".into(),
                s(k).to_string(),
            ]
        })
        .collect()
}

#[test]
fn accept_proxy_over_tls_and_on_the_redirect_listener() {
    let pki = Pki::new("pp");
    let a = pki.leaf("a.test");
    // A herd with `accept` (`--accept-proxy` or `--accept-proxy=…`) and a
    // redirect listener; its port.
    let start = |accept: &str| {
        let redirect = free_port();
        let mut args = tls_args(&[&a]);
        args.extend([
            accept.into(),
            "--redirect-http".into(),
            format!("127.0.0.1:{redirect}"),
            "-i".into(),
            "1".into(),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let h = Herd::start(&args, &[DEMO]);
        h.wait_ready(1);
        (h, redirect)
    };
    let get = b"GET /p HTTP/1.1\r\nHost: a.test\r\n\r\n";
    let header = b"PROXY TCP4 203.0.113.9 127.0.0.1 41000 80\r\n";
    let with_header = [&header[..], get].concat();

    let (h, redirect) = start("--accept-proxy");
    // curl's PROXY header, then the TLS handshake, HTTP/1.1 and HTTP/2.
    for flag in ["--http1.1", "--http2"] {
        let extra = ["--haproxy-protocol", "--interface", "127.0.0.9", flag];
        let out = curl(&pki, "a.test", h.port, "/headers", &extra);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            text.contains("x-forwarded-for: 127.0.0.9"),
            "{flag}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    // Without the header: no handshake.
    assert!(!curl(&pki, "a.test", h.port, "/", &[]).status.success());
    // The redirect listener skips the header too, and closes a connection without one.
    let answer = exchange_from("127.0.0.1", redirect, &with_header);
    assert!(answer.starts_with("HTTP/1.1 301"), "{answer}");
    assert!(answer.contains("Location: https://a.test:"), "{answer}");
    assert_eq!(exchange_from("127.0.0.1", redirect, get), "");
    drop(h);

    // With the balancer named, the redirect listener expects the header
    // from it only: another client is redirected as it comes.
    let (_h, redirect) = start("--accept-proxy=127.0.0.9");
    let answer = exchange_from("127.0.0.1", redirect, get);
    assert!(answer.starts_with("HTTP/1.1 301"), "{answer}");
    let answer = exchange_from("127.0.0.9", redirect, &with_header);
    assert!(answer.starts_with("HTTP/1.1 301"), "{answer}");
    assert_eq!(exchange_from("127.0.0.9", redirect, get), "");
}

#[test]
fn real_ip_from_over_tls_with_http1_and_http2() {
    let pki = Pki::new("ri");
    let a = pki.leaf("a.test");
    let mut args = tls_args(&[&a]);
    args.extend(["--real-ip-from", "127.0.0.9", "-i", "1"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    // From the balancer listed (127.0.0.9), its header names the client; from
    // another address (127.0.0.10), the header is the client's own word.
    for flag in ["--http1.1", "--http2"] {
        for (from, xff) in [
            ("127.0.0.9", "203.0.113.9, 203.0.113.9"),
            ("127.0.0.10", "203.0.113.9, 127.0.0.10"),
        ] {
            let extra = [
                "--interface",
                from,
                "-H",
                "X-Forwarded-For: 203.0.113.9",
                flag,
            ];
            let out = curl(&pki, "a.test", h.port, "/headers", &extra);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains(&format!("x-forwarded-for: {xff}\n")),
                "{flag} from {from}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

#[test]
fn https_with_alpn_sni_resumption_and_a_redirect_from_plain_http() {
    let pki = Pki::new("main");
    let a = pki.leaf("a.test");
    let b = pki.leaf("b.test");
    let redirect = free_port();
    let mut args = tls_args(&[&a, &b]);
    args.extend([
        "--redirect-http".into(),
        format!("127.0.0.1:{redirect}"),
        "-i".into(),
        "2".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(2);
    let port = h.port;

    // HTTP/1.1 and HTTP/2 by ALPN; the backend hears that the client used TLS.
    for (flag, version) in [("--http1.1", "1.1"), ("--http2", "2")] {
        let out = curl(&pki, "a.test", port, "/headers", &[flag]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{flag}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(text.contains(&format!("http_version={version}")), "{text}");
        assert!(text.contains("x-forwarded-proto: https"), "{text}");
        assert!(text.contains("proto=https"), "{text}");
    }
    // Both workers serve TLS clients.
    let mut seen = std::collections::BTreeSet::new();
    assert!(wait_until(T, || {
        let out = curl(&pki, "a.test", port, "/", &["--http2"]);
        seen.insert(parse_hello(&String::from_utf8_lossy(&out.stdout)).0);
        seen.len() == 2
    }));
    // SNI picks b's certificate (curl checks it against b.test); without
    // SNI, or with a name no certificate has, the first pair answers.
    let out = curl(&pki, "b.test", port, "/", &[]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(s_client(port, &["-servername", "b.test"]).contains("CN = b.test"));
    assert!(s_client(port, &["-noservername"]).contains("CN = a.test"));
    assert!(s_client(port, &["-servername", "other.test"]).contains("CN = a.test"));
    // An IP address as the name, as wrk sends: the first pair too, and no
    // line in herd's log per connection (rustls warns about each one).
    for _ in 0..3 {
        assert!(s_client(port, &["-servername", "127.0.0.1"]).contains("CN = a.test"));
    }
    assert!(!h.log().contains("SNI"), "{}", h.log());
    // Resumption: TLS 1.2 by ticket.
    let sess = pki.path("sess.pem");
    let first = s_client(
        port,
        &["-tls1_2", "-servername", "a.test", "-sess_out", s(&sess)],
    );
    assert!(first.contains("New, TLSv1.2"), "{first}");
    let again = s_client(
        port,
        &["-tls1_2", "-servername", "a.test", "-sess_in", s(&sess)],
    );
    assert!(again.contains("Reused, TLSv1.2"), "{again}");
    // Old versions and garbage get an alert; the listener serves on.
    let old = s_client(port, &["-tls1_1", "-cipher", "DEFAULT@SECLEVEL=0"]);
    assert!(
        old.contains("alert handshake failure") || old.contains("alert protocol version"),
        "{old}"
    );
    // (Plain HTTP gets a 400 it can read: plain_http_on_the_tls_port_is_told_so.)
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    std::io::Write::write_all(&mut raw, b"\x00\x01garbage\r\n\r\n").unwrap();
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut got = Vec::new();
    let _ = std::io::Read::read_to_end(&mut raw, &mut got);
    assert!(
        got.is_empty() || got[0] == 0x15,
        "garbage on the TLS port: {got:?}"
    );
    assert!(curl(&pki, "a.test", port, "/", &[]).status.success());

    // Plain HTTP on --redirect-http: a 301 to the same host and path.
    let mut c = std::net::TcpStream::connect(("127.0.0.1", redirect)).unwrap();
    std::io::Write::write_all(&mut c, b"GET / HTTP/1.1\r\n\r\n").unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut c, &mut answer).unwrap();
    assert!(
        answer.starts_with("HTTP/1.1 400"),
        "no Host header: {answer}"
    );
    let mut c = std::net::TcpStream::connect(("127.0.0.1", redirect)).unwrap();
    std::io::Write::write_all(
        &mut c,
        b"GET /some/path?q=1 HTTP/1.1\r\nHost: a.test:80\r\n\r\n",
    )
    .unwrap();
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut c, &mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 301"), "{answer}");
    assert!(
        answer.contains(&format!(
            "Location: https://a.test:{port}/some/path?q=1\r\n"
        )),
        "{answer}"
    );
    let out = Command::new("curl")
        .args([
            "-sS",
            "-L",
            "--max-time",
            "10",
            "--cacert",
            s(&pki.path("ca.crt")),
        ])
        .args(["--resolve", &format!("a.test:{redirect}:127.0.0.1")])
        .args(["--resolve", &format!("a.test:{port}:127.0.0.1")])
        .arg(format!("http://a.test:{redirect}/"))
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("hello from worker"),
        "{out:?}"
    );
}

#[test]
fn certificates_reload_when_their_files_change_without_failing_a_request() {
    let pki = Pki::new("reload");
    let a = pki.leaf("a.test");
    let c = pki.leaf("c.test");
    let (cert, key) = (pki.path("live.crt"), pki.path("live.key"));
    std::fs::copy(&a.0, &cert).unwrap();
    std::fs::copy(&a.1, &key).unwrap();
    let mut args = tls_args(&[&(cert.clone(), key.clone())]);
    args.extend(["-i".into(), "1".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    let port = h.port;
    assert!(s_client(port, &["-servername", "a.test"]).contains("CN = a.test"));

    // Clients keep coming (new TLS connections) while the files change.
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let clients: Vec<_> = (0..2)
        .map(|_| {
            let (stop, failed, done) = (stop.clone(), failed.clone(), done.clone());
            let ca = pki.path("ca.crt");
            std::thread::spawn(move || {
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) && n < 5000 {
                    n += 1;
                    // Either name: the certificate in use has one of them.
                    let out = Command::new("curl")
                        .args(["-sS", "--max-time", "10", "--cacert", s(&ca), "-k"])
                        .arg(format!("https://127.0.0.1:{port}/"))
                        .output()
                        .unwrap();
                    if !String::from_utf8_lossy(&out.stdout).starts_with("hello from worker") {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    assert!(wait_until(T, || done.load(Ordering::Relaxed) > 20));

    // A new pair (as certbot renews): served from the next handshake.
    std::fs::copy(&c.1, &key).unwrap();
    std::fs::copy(&c.0, &cert).unwrap();
    assert!(
        wait_until(T, || s_client(port, &["-servername", "c.test"])
            .contains("CN = c.test")),
        "{}",
        h.log()
    );
    assert!(h.wait_log("TLS certificates reloaded", T));
    // A key that does not match: refused, the certificate in use stays.
    let refused = h.log().matches("does not match").count();
    std::fs::copy(&a.1, &key).unwrap();
    assert!(
        h.wait_log_n("does not match", refused + 1, T),
        "{}",
        h.log()
    );
    assert!(s_client(port, &["-servername", "c.test"]).contains("CN = c.test"));
    // Fixed, and reloaded by `herd reload` too.
    std::fs::copy(&c.1, &key).unwrap();
    let before = h.log().matches("TLS certificates reloaded").count();
    h.signal("HUP");
    assert!(
        h.wait_log_n("TLS certificates reloaded", before + 1, T),
        "{}",
        h.log()
    );
    let counted = done.load(Ordering::Relaxed);
    assert!(wait_until(T, || done.load(Ordering::Relaxed) > counted + 20));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "of {}",
        done.load(Ordering::Relaxed)
    );
}

#[test]
fn bad_certificates_are_one_line_errors_before_anything_starts() {
    let pki = Pki::new("bad");
    let a = pki.leaf("a.test");
    let b = pki.leaf("b.test");
    let junk = pki.path("junk.pem");
    std::fs::write(&junk, "not a certificate\n").unwrap();
    let missing = pki.path("missing.pem");
    let cases: Vec<(Vec<String>, &str)> = vec![
        (tls_args(&[&(missing.clone(), a.1.clone())]), "--tls-cert"),
        (tls_args(&[&(junk.clone(), a.1.clone())]), "no CERTIFICATE"),
        (tls_args(&[&(a.0.clone(), junk.clone())]), "--tls-key"),
        (tls_args(&[&(a.0.clone(), b.1.clone())]), "does not match"),
        (vec!["--tls-cert".into(), s(&a.0).into()], "come in pairs"),
        (
            vec!["--redirect-http".into(), "8080".into()],
            "need --tls-cert",
        ),
        (vec!["--tls-strict-sni".into()], "need --tls-cert"),
        (
            vec!["--tls-client-ca".into(), s(&a.0).into()],
            "need --tls-cert",
        ),
        (
            [tls_args(&[&a]), vec!["--tls-client-optional".into()]].concat(),
            "needs --tls-client-ca",
        ),
        (
            [
                tls_args(&[&a]),
                vec!["--tls-client-ca".into(), s(&junk).into()],
            ]
            .concat(),
            "--tls-client-ca",
        ),
        (
            [
                tls_args(&[&a]),
                vec!["--tls-client-crl".into(), s(&junk).into()],
            ]
            .concat(),
            "needs --tls-client-ca",
        ),
        (
            [
                tls_args(&[&a]),
                [
                    "--tls-client-ca",
                    s(&pki.path("ca.crt")),
                    "--tls-client-crl",
                    s(&junk),
                ]
                .map(String::from)
                .to_vec(),
            ]
            .concat(),
            "--tls-client-crl",
        ),
        (
            vec!["--upstream-cert".into(), s(&a.0).into()],
            "go together",
        ),
        (
            ["--upstream-cert", s(&a.0), "--upstream-key", s(&b.1)]
                .map(String::from)
                .to_vec(),
            "does not match --upstream-cert",
        ),
        (
            ["--upstream-cert", s(&junk), "--upstream-key", s(&a.1)]
                .map(String::from)
                .to_vec(),
            "--upstream-cert",
        ),
        (
            vec!["--upstream-crl".into(), s(&junk).into()],
            "--upstream-crl",
        ),
        (
            [tls_args(&[&a]), vec!["--mode".into(), "shared".into()]].concat(),
            "proxy mode with --protocol http only",
        ),
    ];
    for (args, want) in cases {
        for check in [true, false] {
            let mut all: Vec<&str> = vec!["run", "--listen", "127.0.0.1:0"];
            if check {
                all.push("--check");
            }
            all.extend(args.iter().map(String::as_str));
            all.extend(["--", DEMO]);
            let (code, err) = run_fail(&all);
            assert_eq!(code, 1, "{all:?}: {err}");
            assert!(err.contains(want), "{all:?}: {err}");
            assert_eq!(err.trim().lines().count(), 1, "{err}");
        }
    }
}

/// A TLS client (rustls) to 127.0.0.1:PORT for NAME, trusting the test CA.
fn tls_client(
    pki: &Pki,
    port: u16,
    name: &str,
) -> rustls::StreamOwned<rustls::ClientConnection, std::net::TcpStream> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(pki.path("ca.crt")).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let conn =
        rustls::ClientConnection::new(Arc::new(config), name.to_string().try_into().unwrap())
            .unwrap();
    let tcp = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    tcp.set_read_timeout(Some(T)).unwrap();
    rustls::StreamOwned::new(conn, tcp)
}

/// herd terminating TLS for `a.test` in front of the backend on BPORT.
fn tls_in_front_of(name: &str, bport: u16) -> (Pki, Herd, u16) {
    let pki = Pki::new(name);
    let a = pki.leaf("a.test");
    let mut args = tls_args(&[&a]);
    args.push(format!("--upstream=127.0.0.1:{bport}"));
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut all: Vec<&str> = vec!["run", "--listen", &listen, "--health-interval", "0"];
    all.extend(args.iter().map(String::as_str));
    let h = Herd::spawn(herd_cmd().args(&all), port);
    assert!(h.wait_log("listening on", T), "{}", h.log());
    (pki, h, port)
}

#[test]
fn websocket_style_upgrades_are_tunnelled_over_tls() {
    use std::io::{Read, Write};
    // A backend that switches protocols, then echoes.
    let bport = raw_backend(|mut c, head| {
        if !String::from_utf8_lossy(&head)
            .to_ascii_lowercase()
            .contains("upgrade: echo")
        {
            let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
            return;
        }
        let _ = c.write_all(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
        );
        let mut buf = [0u8; 1024];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 || c.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    let (pki, _h, port) = tls_in_front_of("upgrade", bport);

    let mut s = tls_client(&pki, port, "a.test");
    s.write_all(
        b"GET /ws HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n",
    )
    .unwrap();
    expect_echo_tunnel(&mut s);
}

#[test]
fn h2c_upgrades_over_tls_are_not_passed_to_the_backend() {
    use std::io::Write;
    let bport = raw_backend(|mut c, head| {
        let lower = String::from_utf8_lossy(&head).to_ascii_lowercase();
        let _ = if lower.contains("upgrade") || lower.contains("http2-settings") {
            c.write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n",
            )
        } else {
            c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nplain\n")
        };
    });
    let (pki, _h, port) = tls_in_front_of("h2c", bport);
    let text = tls_exchange(
        &pki,
        port,
        b"GET / HTTP/1.1\r\nHost: a.test\r\nConnection: Upgrade, HTTP2-Settings, close\r\n\
          Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    );
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("plain\n"),
        "{text}"
    );
}

#[test]
fn an_http10_request_without_host_reaches_the_backend_with_one() {
    // Sent on as HTTP/1.1, which must name a host: the backend gets the
    // address the client reached (a strict server answers 400 without).
    let bport = host_echo_backend();
    let (pki, _h, port) = tls_in_front_of("http10", bport);
    let text = tls_exchange(&pki, port, b"GET / HTTP/1.0\r\n\r\n");
    assert!(
        text.starts_with("HTTP/1.0 200") && text.ends_with(&format!("\r\n\r\n127.0.0.1:{port}")),
        "{text}"
    );
}

/// Over TLS (hyper's path) as over plain HTTP: a backend that breaks off
/// its answer's body is named in the log, and the client sees the cut.
#[test]
fn an_answer_broken_off_over_tls_is_logged() {
    use std::io::Write;
    let bport = raw_backend(|mut c, _head| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b");
    });
    let (pki, h, port) = tls_in_front_of("cut", bport);
    let text = tls_exchange(&pki, port, b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n");
    assert!(
        text.starts_with("HTTP/1.1 200") && text.ends_with("only ten b"),
        "{text}"
    );
    let said = format!("upstream 127.0.0.1:{bport}: broke off its answer's body");
    assert!(h.wait_log(&said, T), "{}", h.log());
}

/// Over TLS (hyper's path) as through herd's own engine: odd answers reach
/// the client as herd's engine passes them. A `Content-Length` only where it
/// is true: passed on as it came, a 204's or one beside chunked framing made
/// curl wait for a body (HTTP/1.1: "Empty reply from server") or reset the
/// stream (HTTP/2). A protocol switch nobody asked for is a 502, not a 101
/// handed to the client. An HTTP/1.0 answer goes on as HTTP/1.1, herd's own
/// version; and `curl --http1.0`, which offers only `http/1.0` by ALPN, is
/// served (the handshake failed).
#[test]
fn odd_backend_answers_reach_tls_clients_as_herds_engine_passes_them() {
    use std::io::Write;
    let bport = raw_backend(|mut c, head| {
        let head = String::from_utf8_lossy(&head).into_owned();
        let path = head.split(' ').nth(1).unwrap_or("").to_string();
        let answer: &[u8] = match path.as_str() {
            "/204" => b"HTTP/1.1 204 No Content\r\nContent-Length: 5\r\nConnection: close\r\n\r\n",
            "/both" => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
            "/switch" => b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\nConnection: upgrade\r\n\r\nraw bytes",
            "/old" => b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok",
            _ => b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
        };
        let _ = c.write_all(answer);
    });
    let (pki, h, port) = tls_in_front_of("odd", bport);
    for flag in ["--http1.1", "--http2", "--http1.0"] {
        for (path, status, lengths, body) in [
            ("/204", "204", 0, ""),
            ("/both", "200", 0, "ok"),
            ("/twice", "200", 1, "hello"),
            ("/switch", "502", 1, "backend failed\n"),
            ("/old", "200", 1, "ok"),
        ] {
            let out = curl(&pki, "a.test", port, path, &[flag, "-i"]);
            let text = String::from_utf8_lossy(&out.stdout).replace('\r', "");
            let said = format!(
                "{flag} {path}: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(out.status.success(), "{said}");
            let version = match flag {
                "--http2" => "2 ",
                "--http1.0" => "1.0 ",
                _ => "1.1 ",
            };
            assert!(text.starts_with(&format!("HTTP/{version}")), "{said}");
            assert!(text.lines().next().unwrap_or("").contains(status), "{said}");
            let seen = text
                .lines()
                .filter(|l| l.to_ascii_lowercase().starts_with("content-length:"))
                .count();
            assert_eq!(seen, lengths, "{said}");
            assert!(
                text.contains(&format!("\n\n{body}\nhttp_version=")),
                "{said}"
            );
        }
    }
    let said = format!(
        "upstream 127.0.0.1:{bport}: switched protocols (101) though the request asked for no upgrade"
    );
    assert!(h.wait_log(&said, T), "{}", h.log());
}

/// Over TLS (hyper's path) as over plain HTTP (balancer.rs): a worker that
/// serves one connection at a time is found, and requests on herd's
/// other proxy thread do not wait for the idle connection it keeps.
/// hyper's path too: requests a stopped worker has not read go to the
/// other worker once health checks take it out (see cluster.rs).
#[test]
fn requests_waiting_on_a_stopped_worker_go_to_the_other_over_tls() {
    let pki = Pki::new("stopped");
    let a = pki.leaf("a.test");
    let mut args = tls_args(&[&a]);
    args.extend(["-i", "2", "--health-interval", "200ms"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(2);
    let mut pids = [0u32; 2];
    assert!(wait_until(T, || {
        let out = curl(&pki, "a.test", h.port, "/", &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        let (id, pid) = parse_hello(text.lines().next().unwrap_or_default());
        if id < 2 {
            pids[id] = pid;
        }
        pids.iter().all(|&p| p != 0)
    }));
    signal(pids[0], "STOP");
    let pki = Arc::new(pki);
    let port = h.port;
    // Round-robin sends some of each to the stopped worker.
    let waiting: Vec<_> = ["--http1.1", "--http2", "--http1.1", "--http2"]
        .into_iter()
        .map(|v| {
            let pki = pki.clone();
            std::thread::spawn(move || curl(&pki, "a.test", port, "/", &[v]))
        })
        .collect();
    let outs: Vec<Output> = waiting.into_iter().map(|w| w.join().unwrap()).collect();
    signal(pids[0], "CONT");
    for out in outs {
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && parse_hello(&text).0 == 1,
            "{text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let log = h.log();
    assert!(
        log.contains("unhealthy (3 checks failed, last: accepted no connection"),
        "{log}"
    );
    assert!(
        log.contains("was taken out as stopped or stuck while a request waited"),
        "{log}"
    );
}

#[test]
fn a_worker_serving_one_connection_at_a_time_is_found_over_tls() {
    let pki = Pki::new("serial");
    let a = pki.leaf("a.test");
    let mut args = tls_args(&[&a]);
    args.extend(["-i".into(), "2".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &["python3", "-c", ONE_AT_A_TIME]);
    h.wait_ready(2);
    let mut slowest = Duration::ZERO;
    for _ in 0..12 {
        let t = Instant::now();
        let out = curl(&pki, "a.test", h.port, "/", &[]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success() && text.starts_with("pid "), "{text}");
        slowest = slowest.max(t.elapsed());
    }
    assert!(
        slowest < Duration::from_millis(900),
        "a request took {slowest:?}"
    );
    let log = h.log();
    assert!(log.contains("serves one connection at a time"), "{log}");
    assert!(!log.contains("unhealthy"), "{log}");
    // Told so, it closes each connection after its answer (balancer.rs).
    let out = curl(&pki, "a.test", h.port, "/", &[]);
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or_default();
    assert!(first.ends_with("connection close"), "{text}");
}

/// Over TLS as through herd's own engine: a `Connection` header that names
/// `Host` or a forwarding header does not remove it (it removed the `Host`,
/// and the backend got herd's own address instead); other names it lists go.
#[test]
fn connection_cannot_strip_host_or_forwarding_headers_over_tls() {
    let pki = Pki::new("listed");
    let h = tls_demo(&pki.leaf("a.test"), &[]);
    let text = tls_exchange(
        &pki,
        h.port,
        b"GET /headers HTTP/1.1\r\nHost: a.test\r\nConnection: close, Host, X-Forwarded-For, X-Gone\r\nX-Forwarded-For: 192.0.2.1\r\nX-Gone: 1\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("\nhost: a.test\n"), "{text}");
    assert!(text.contains("\nx-forwarded-host: a.test\n"), "{text}");
    assert!(
        text.contains("\nx-forwarded-for: 192.0.2.1, 127.0.0.1\n"),
        "{text}"
    );
    assert!(!text.contains("x-gone"), "{text}");
}

/// `http://` sent to the TLS port gets nginx's readable 400, a body too
/// (read away before the close), rather than an empty reply.
#[test]
fn plain_http_on_the_tls_port_is_told_so() {
    use std::io::{Read, Write};
    let pki = Pki::new("plain");
    let h = tls_demo(&pki.leaf("a.test"), &[]);
    let body = "a".repeat(100_000);
    for req in [
        "GET / HTTP/1.1\r\nHost: a.test\r\n\r\n".to_string(),
        format!("POST / HTTP/1.1\r\nHost: a.test\r\nContent-Length: 100000\r\n\r\n{body}"),
    ] {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", h.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        assert!(out.starts_with("HTTP/1.1 400"), "{out}");
        assert!(
            out.ends_with("The plain HTTP request was sent to an HTTPS port.\r\n"),
            "{out}"
        );
    }
    let out = curl(&pki, "a.test", h.port, "/", &[]);
    assert!(out.status.success());
}

#[test]
fn hostile_http1_over_tls_gets_a_400_and_others_are_served() {
    let pki = Pki::new("hostile");
    let h = tls_demo(&pki.leaf("a.test"), &[]);
    // Transfer-Encoding beside Content-Length: framed by the chunks (the
    // backend gets a request framed again), and the connection closes.
    let text = tls_exchange(
        &pki,
        h.port,
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .to_ascii_lowercase();
    assert!(text.contains("connection: close"), "{text}");
    assert_eq!(text.matches("http/1.1 ").count(), 1, "{text}");
    for raw in [
        &b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n"[..],
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"GET / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\n\r\n",
        b"GET / HTTP/1.1\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nBad Header: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: evil.test/x?\r\n\r\n",
    ] {
        let text = tls_exchange(&pki, h.port, raw);
        assert!(
            text.starts_with("HTTP/1.1 400"),
            "{:?}: {text}",
            String::from_utf8_lossy(raw)
        );
    }
    let out = curl(&pki, "a.test", h.port, "/", &[]);
    assert!(out.status.success());
}

#[test]
fn tls_passes_through_tcp_mode_balanced_by_server_name() {
    let pki = Pki::new("sni");
    let (cert, key) = pki.leaf("localhost");
    let js = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples/node/h2.js");
    let envs = [
        format!("TLS_CERT={}", s(&cert)),
        format!("TLS_KEY={}", s(&key)),
    ];
    let h = Herd::start(
        &[
            "-i",
            "3",
            "--protocol",
            "tcp",
            "--balance",
            "hash:sni",
            "--env",
            &envs[0],
            "--env",
            &envs[1],
        ],
        &["node", s(&js)],
    );
    h.wait_ready(3);
    // The workers terminate TLS themselves: herd only reads the name.
    let worker = |name: &str| {
        let out = curl(&pki, name, h.port, "/", &["--http2", "-k"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            text.starts_with("HTTP/2.0 worker"),
            "{name}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text.split_whitespace().nth(2).unwrap_or("").to_string()
    };
    let mut by_name = std::collections::BTreeMap::new();
    for i in 0..12 {
        let name = format!("site{i}.test");
        let first = worker(&name);
        for _ in 0..3 {
            assert_eq!(worker(&name), first, "{name} moved");
        }
        by_name.insert(name, first);
    }
    let used: std::collections::BTreeSet<_> = by_name.values().collect();
    assert!(used.len() >= 2, "every name on one worker: {by_name:?}");
    // Only TCP connections carry a name to pick by.
    let flags = ["run", "--check", "--balance", "hash:sni", "--", DEMO];
    let (code, err) = run_fail(&flags);
    assert_eq!(code, 1);
    assert!(err.contains("add --protocol tcp"), "{err}");
}

#[test]
fn strict_sni_refuses_clients_without_a_known_name() {
    let pki = Pki::new("strict");
    let a = pki.leaf("a.test");
    let mut args = tls_args(&[&a]);
    args.extend(["--tls-strict-sni".into(), "-i".into(), "1".into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    assert!(s_client(h.port, &["-servername", "a.test"]).contains("CN = a.test"));
    for refused in [&["-noservername"][..], &["-servername", "other.test"]] {
        let out = s_client(h.port, refused);
        assert!(out.contains("alert"), "{refused:?}: {out}");
        assert!(!out.contains("CN = a.test"), "{refused:?}: {out}");
    }
    assert!(curl(&pki, "a.test", h.port, "/", &[]).status.success());
}

/// `--tls-client-ca`: only clients with a certificate that CA signed get
/// through (over HTTP/1.1 and HTTP/2, TLS 1.3 and 1.2); the backend is told
/// which one in RFC 9440's `Client-Cert`, which no client can set itself.
#[test]
fn client_certificates_are_required_and_passed_on() {
    use base64::Engine;
    let pki = Pki::new("mtls");
    let a = pki.leaf("a.test");
    let alice = pki.leaf("alice");
    let stranger = Pki::new("mtls-stranger").leaf("alice");
    let mut owned = tls_args(&[&a]);
    owned.extend(["--tls-client-ca", s(&pki.path("ca.crt")), "-i", "1"].map(String::from));
    let mut args: Vec<&str> = owned.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    let der = Command::new("openssl")
        .args(["x509", "-outform", "DER", "-in", s(&alice.0)])
        .output()
        .expect("openssl")
        .stdout;
    let field = format!(
        "client-cert: :{}:",
        base64::engine::general_purpose::STANDARD.encode(der)
    );
    let with = |cert: &(PathBuf, PathBuf), extra: &[&str]| {
        let mut all = vec!["--cert", s(&cert.0), "--key", s(&cert.1)];
        all.extend_from_slice(extra);
        curl(&pki, "a.test", h.port, "/headers", &all)
    };
    for version in [&["--http1.1"][..], &["--http2"], &["--tls-max", "1.2"]] {
        let out = curl(&pki, "a.test", h.port, "/", version);
        assert!(
            !out.status.success(),
            "{version:?}: no certificate, yet served"
        );
        let out = with(&stranger, version);
        assert!(
            !out.status.success(),
            "{version:?}: another CA's, yet served"
        );
        // A client's own Client-Cert is replaced by the one it presented.
        let spoof = [version, &["-H", "Client-Cert: :Zm9v:"]].concat();
        let out = with(&alice, &spoof);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{version:?}: {text}");
        assert!(text.contains(&field), "{version:?}: {text}");
        assert!(!text.contains("Zm9v"), "{version:?}: {text}");
    }
    // --tls-client-optional: no certificate is let through, without the
    // field (and without the one the client sent); another CA's is not.
    args.push("--tls-client-optional");
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    let out = curl(
        &pki,
        "a.test",
        h.port,
        "/headers",
        &["-H", "Client-Cert: :Zm9v:"],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(!text.contains("client-cert"), "{text}");
    let stranger = ["--cert", s(&stranger.0), "--key", s(&stranger.1)];
    assert!(
        !curl(&pki, "a.test", h.port, "/", &stranger)
            .status
            .success()
    );
    let alice = ["--cert", s(&alice.0), "--key", s(&alice.1)];
    let out = curl(&pki, "a.test", h.port, "/headers", &alice);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&field));
}

/// A revocation list of PKI's CA, `NAME.crl`, revoking `revoked` (`openssl ca`
/// with a database of its own) and valid for `secs` seconds.
fn crl(pki: &Pki, name: &str, revoked: &[&PathBuf], secs: u32) -> PathBuf {
    let db = pki.path(&format!("{name}.db"));
    std::fs::create_dir_all(&db).unwrap();
    std::fs::write(db.join("index.txt"), "").unwrap();
    std::fs::write(db.join("crlnumber"), "01\n").unwrap();
    let cnf = db.join("ca.cnf");
    std::fs::write(
        &cnf,
        format!(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = {0}/index.txt\ncrlnumber = {0}/crlnumber\ndefault_md = sha256\n",
            db.display()
        ),
    )
    .unwrap();
    let ca = [
        "-batch",
        "-config",
        s(&cnf),
        "-keyfile",
        "ca.key",
        "-cert",
        "ca.crt",
    ];
    for cert in revoked {
        openssl(
            &pki.path(""),
            &[&["ca"][..], &ca, &["-revoke", s(cert)]].concat(),
        );
    }
    let out = format!("{name}.crl");
    let secs = secs.to_string();
    openssl(
        &pki.path(""),
        &[
            &["ca"][..],
            &ca,
            &["-gencrl", "-crlsec", &secs, "-out", &out],
        ]
        .concat(),
    );
    pki.path(&out)
}

/// `--tls-client-crl`, nginx's `ssl_crl`: a revoked certificate fails its
/// handshake once the list that names it is in place (read again when it
/// changes, as the certificates are), and so does every certificate once
/// the list has expired or when it is not its CA's, as under OpenSSL.
#[test]
fn revoked_client_certificates_are_refused() {
    let pki = Pki::new("crl");
    let a = pki.leaf("a.test");
    let alice = pki.leaf("alice");
    let bob = pki.leaf("bob");
    let live = pki.path("live.crl");
    std::fs::copy(crl(&pki, "none", &[], 3600), &live).unwrap();
    let mut args = tls_args(&[&a]);
    args.extend(
        [
            "--tls-client-ca",
            s(&pki.path("ca.crt")),
            "--tls-client-crl",
            s(&live),
            "-i",
            "1",
        ]
        .map(String::from),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    let served = |who: &(PathBuf, PathBuf), version: &[&str]| {
        let all = [&["--cert", s(&who.0), "--key", s(&who.1)][..], version].concat();
        curl(&pki, "a.test", h.port, "/", &all).status.success()
    };
    assert!(served(&alice, &[]) && served(&bob, &[]));
    let reloads = |n: usize| {
        wait_until(T, || {
            h.log().matches("TLS certificates reloaded").count() >= n
        })
    };
    std::fs::copy(crl(&pki, "alice-out", &[&alice.0], 3600), &live).unwrap();
    assert!(reloads(1), "{}", h.log());
    for version in [&["--http1.1"][..], &["--http2"], &["--tls-max", "1.2"]] {
        assert!(!served(&alice, version), "{version:?}: revoked, yet served");
        assert!(served(&bob, version), "{version:?}: {}", h.log());
    }
    // Said in the log, once per 10 s at most.
    assert!(
        h.wait_log("refused the client certificate of 127.0.0.1", T),
        "{}",
        h.log()
    );
    assert_eq!(h.log().matches("refused the client certificate").count(), 1);
    // Another CA's list says nothing of bob's certificate: refused.
    std::fs::copy(crl(&Pki::new("crl-other"), "theirs", &[], 3600), &live).unwrap();
    assert!(reloads(2), "{}", h.log());
    assert!(!served(&bob, &[]));
    // A list that expires a second after it was made: refused once it has.
    std::fs::copy(crl(&pki, "brief", &[], 1), &live).unwrap();
    assert!(reloads(3), "{}", h.log());
    assert!(wait_until(T, || !served(&bob, &[])), "{}", h.log());
}

/// A resumed session keeps the client certificate it was made with, unchecked:
/// once `--tls-client-ca`'s file changes (a CA removed), sessions made
/// before do not resume, so every client is checked against the new one.
#[test]
fn sessions_made_before_the_client_ca_changed_do_not_resume() {
    let pki = Pki::new("mtls-resume");
    let a = pki.leaf("a.test");
    let alice = pki.leaf("alice");
    let other = Pki::new("mtls-resume-other");
    let live = pki.path("live-ca.crt");
    std::fs::copy(pki.path("ca.crt"), &live).unwrap();
    let mut args = tls_args(&[&a]);
    args.extend(["--tls-client-ca", s(&live), "-i", "1"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    let sess = pki.path("session.pem");
    let cert = ["-cert", s(&alice.0), "-key", s(&alice.1)];
    let first = s_client(
        h.port,
        &[&["-tls1_2", "-sess_out", s(&sess)][..], &cert].concat(),
    );
    assert!(first.contains("New,"), "{first}");
    let resume = ["-tls1_2", "-sess_in", s(&sess)];
    let again = s_client(h.port, &resume);
    assert!(again.contains("Reused,"), "{again}");
    std::fs::copy(other.path("ca.crt"), &live).unwrap();
    assert!(h.wait_log("TLS certificates reloaded", T), "{}", h.log());
    let after = s_client(h.port, &resume);
    assert!(!after.contains("Reused,"), "{after}");
}

/// RAW written to herd over TLS (`a.test`), and all it answers until it closes.
fn tls_exchange(pki: &Pki, port: u16, raw: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = tls_client(pki, port, "a.test");
    s.write_all(raw).unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// One demo worker behind herd speaking TLS with `pair`, and `extra`
/// flags; ready.
fn tls_demo(pair: &(PathBuf, PathBuf), extra: &[&str]) -> Herd {
    let mut args = vec!["-i", "1", "--tls-cert", s(&pair.0), "--tls-key", s(&pair.1)];
    args.extend_from_slice(extra);
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    h
}

/// `--upstream-cert`: herd shows its certificate to a `tls` upstream that
/// asks for one (here herd itself with `--tls-client-ca`), as nginx's
/// `proxy_ssl_certificate`; without it that upstream refuses herd (502).
#[test]
fn herd_presents_its_client_certificate_to_upstreams_that_ask() {
    let pki = Pki::new("upcert");
    let server = pki.leaf("localhost");
    let client = pki.leaf("front");
    let ca = pki.path("ca.crt");
    let backend = tls_demo(&server, &["--tls-client-ca", s(&ca)]);
    let upstream = format!("--upstream=localhost:{},tls", backend.port);
    let front = |cert: &[&str]| {
        let mut args = vec![upstream.as_str(), "--upstream-ca", s(&ca)];
        args.extend_from_slice(cert);
        let h = Herd::start(&args, &[]);
        assert!(h.wait_log("listening on", T), "{}", h.log());
        h
    };
    let with = front(&[
        "--upstream-cert",
        s(&client.0),
        "--upstream-key",
        s(&client.1),
    ]);
    let (status, body) = with.get("/headers").unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("client-cert: :"), "{body}");
    let without = front(&[]);
    assert_eq!(without.get("/").unwrap().0, 502);
}

/// `--upstream-crl`, nginx's `proxy_ssl_crl`: a `tls` upstream whose
/// certificate a list revokes is refused (502, and the log says why) once
/// that list is in place, read again when its file changes; connections
/// opened before are not used again; a list of another CA refuses every
/// upstream, as under OpenSSL.
#[test]
fn revoked_upstream_certificates_are_refused() {
    let pki = Pki::new("upcrl");
    let server = pki.leaf("localhost");
    let backend = tls_demo(&server, &[]);
    let live = pki.path("live.crl");
    std::fs::copy(crl(&pki, "none", &[], 3600), &live).unwrap();
    let upstream = format!("--upstream=localhost:{},tls", backend.port);
    let ca = pki.path("ca.crt");
    let h = Herd::start(
        &[
            upstream.as_str(),
            "--upstream-ca",
            s(&ca),
            "--upstream-crl",
            s(&live),
        ],
        &[],
    );
    assert!(h.wait_log("listening on", T), "{}", h.log());
    assert_eq!(h.get("/").unwrap().0, 200, "{}", h.log());
    let reloads = |n: usize| {
        wait_until(T, || {
            h.log()
                .matches("upstream revocation lists reloaded")
                .count()
                >= n
        })
    };
    std::fs::copy(crl(&pki, "revoked", &[&server.0], 3600), &live).unwrap();
    assert!(reloads(1), "{}", h.log());
    // The pooled connection is dropped on the proxy thread's next tick.
    assert!(
        wait_until(T, || h.get("/").is_ok_and(|(status, _)| status == 502)),
        "{}",
        h.log()
    );
    assert!(h.wait_log("Revoked", T), "{}", h.log());
    std::fs::copy(crl(&pki, "clean", &[], 3600), &live).unwrap();
    assert!(reloads(2), "{}", h.log());
    assert!(
        wait_until(T, || h.get("/").is_ok_and(|(status, _)| status == 200)),
        "{}",
        h.log()
    );
    // Another CA's list says nothing of the upstream's certificate.
    std::fs::copy(crl(&Pki::new("upcrl-other"), "theirs", &[], 3600), &live).unwrap();
    assert!(reloads(3), "{}", h.log());
    assert!(
        wait_until(T, || h.get("/").is_ok_and(|(status, _)| status == 502)),
        "{}",
        h.log()
    );
}

/// A backend that writes an answer's head and body apart under Nagle's
/// algorithm (Java's `HttpServer`, Perl's `HTTP::Daemon`) sends the body
/// only once herd acknowledges the head; behind TLS (served through hyper)
/// each answer waited 40 ms for the kernel's delayed ACK (22 req/s on a
/// connection); now only the first on a backend connection, which teaches
/// it to acknowledge at once.
#[test]
fn a_backend_writing_head_and_body_apart_is_not_held_by_delayed_acks_over_tls() {
    use std::io::{Read, Write};
    let bport = raw_backend(|mut c, _head| {
        // Nagle stays on, as in those servers; one connection, keep-alive.
        loop {
            if c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n")
                .and_then(|()| c.write_all(b"hello"))
                .is_err()
            {
                return;
            }
            if read_head(&mut c).is_none() {
                return;
            }
        }
    });
    let (pki, _h, port) = tls_in_front_of("nagle", bport);
    let mut s = tls_client(&pki, port, "a.test");
    let mut took = Vec::new();
    // More than the kernel's first quick ACKs of a new connection.
    for _ in 0..40 {
        let t = Instant::now();
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        let mut got = Vec::new();
        let mut byte = [0u8; 1];
        while !got.ends_with(b"\r\n\r\nhello") {
            s.read_exact(&mut byte).unwrap();
            got.push(byte[0]);
        }
        assert!(got.starts_with(b"HTTP/1.1 200"), "{got:?}");
        took.push(t.elapsed());
    }
    took.sort();
    // A delayed ACK waits at least 40 ms on Linux.
    assert!(
        took[took.len() / 2] < Duration::from_millis(20),
        "answers waited for delayed ACKs: {took:?}"
    );
}

#[test]
fn idle_backend_connections_of_tls_clients_are_closed_after_a_while() {
    use std::io::{Read, Write};
    // A backend that answers one request with keep-alive, then reports when
    // herd closes the connection.
    let (closed_tx, closed) = std::sync::mpsc::channel();
    let bport = raw_backend(move |mut c, _head| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n");
        let at = Instant::now();
        let mut buf = [0u8; 64];
        while let Ok(n) = c.read(&mut buf) {
            if n == 0 {
                let _ = closed_tx.send(at.elapsed());
                break;
            }
        }
    });
    let (pki, _h, port) = tls_in_front_of("idle-backend", bport);

    let out = curl(&pki, "a.test", port, "/", &[]);
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with("ok\n"),
        "{out:?}"
    );
    // Kept for reuse for 2 s, then closed by the thread's sweep (once a second).
    let idle = closed
        .recv_timeout(Duration::from_secs(10))
        .expect("herd kept the idle backend connection open");
    assert!(idle >= Duration::from_millis(1500), "closed after {idle:?}");
}

/// TLS clients that stop reading a large answer hold back-pressure, not
/// memory: 20 of them grew herd by about 22 MB while hyper buffered up to
/// 400 KiB of each backend answer, about 7 MB with that capped at 64 KiB.
#[test]
fn tls_clients_that_stop_reading_a_large_answer_hold_little_memory() {
    use std::io::{Read, Write};
    let bport = raw_backend(|mut c, _head| {
        let _ = c.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 200000000\r\n\r\n");
        let chunk = vec![b'x'; 64 * 1024];
        while c.write_all(&chunk).is_ok() {}
    });
    let (pki, h, port) = tls_in_front_of("stalled", bport);
    let before = rss_kib(h.child.id());
    let mut clients = Vec::new();
    for _ in 0..20 {
        let mut s = tls_client(&pki, port, "a.test");
        s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")
            .unwrap();
        let mut first = [0u8; 100];
        s.read_exact(&mut first).unwrap();
        assert!(first.starts_with(b"HTTP/1.1 200"));
        clients.push(s); // and read no more
    }
    // Until every buffer on the way has filled: the RSS stops growing.
    let mut last = rss_kib(h.child.id());
    let settled = wait_until(T, || {
        std::thread::sleep(Duration::from_millis(500));
        let now = rss_kib(h.child.id());
        let steady = now <= last + 256;
        last = now;
        steady
    });
    assert!(settled, "herd kept growing: {last} KiB");
    let grown = last.saturating_sub(before);
    assert!(
        grown < 14 * 1024,
        "20 stalled clients grew herd by {grown} KiB"
    );
}

/// One keep-alive request on `s`: its status line, read through the body
/// (`Content-Length`).
fn keepalive_request(s: &mut (impl std::io::Read + std::io::Write)) -> std::io::Result<String> {
    s.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\n\r\n")?;
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        if s.read(&mut byte)? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        got.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&got).to_string();
    let len: usize = head
        .to_ascii_lowercase()
        .split("content-length:")
        .nth(1)
        .and_then(|v| v.lines().next()?.trim().parse().ok())
        .unwrap_or(0);
    let mut body = vec![0; len];
    s.read_exact(&mut body)?;
    Ok(head.lines().next().unwrap_or("").to_string())
}

#[test]
fn https_keepalive_clients_stay_for_the_idle_timeout_and_slow_heads_are_cut() {
    use std::io::{Read, Write};
    let pki = Pki::new("idlehead");
    let a = pki.leaf("a.test");
    let mut args = tls_args(&[&a]);
    args.extend(["-i", "1", "--header-timeout", "1s", "--idle-timeout", "30s"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let h = Herd::start(&args, &[DEMO]);
    h.wait_ready(1);
    // Idle past the header time-out, then a second request on the same
    // connection (hyper's own header timer closed it after 1 s).
    let mut s = tls_client(&pki, h.port, "a.test");
    assert_eq!(keepalive_request(&mut s).unwrap(), "HTTP/1.1 200 OK");
    let quiet = Instant::now();
    while quiet.elapsed() < Duration::from_millis(2500) {
        // Nothing arrives meanwhile (no close, no alert): a read times out.
        s.sock
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let mut b = [0u8; 1];
        match s.read(&mut b) {
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
            other => panic!("the idle connection ended: {other:?}"),
        }
    }
    s.sock.set_read_timeout(Some(T)).unwrap();
    assert_eq!(keepalive_request(&mut s).unwrap(), "HTTP/1.1 200 OK");
    // A head begun and not finished (slowloris) is still cut after the
    // header time-out, on a fresh connection and between requests alike.
    let mut fresh = tls_client(&pki, h.port, "a.test");
    let mut kept = s;
    for c in [&mut fresh, &mut kept] {
        c.write_all(b"GET / HTTP/1.1\r\nHost: a.test\r\nX-Slow: ")
            .unwrap();
        c.flush().unwrap();
    }
    let t = Instant::now();
    for c in [&mut fresh, &mut kept] {
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    }
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(5),
        "slow heads closed after {took:?}"
    );
}

/// `--max-body-size` on hyper's path (TLS clients): a length past it gets
/// 413 over HTTP/1.1 and HTTP/2 before the backend hears of it, and the
/// client, still sending, reads it (the rest is read and dropped for a
/// while, as nginx's lingering close); a chunked body is cut where it
/// passes the limit.
/// Over TLS (hyper's path) too, a body of a known length up to
/// `--request-buffer` is read whole before a backend is picked: a slow
/// upload does not hold a backend that serves one connection at a time,
/// over HTTP/1.1 or HTTP/2.
#[test]
fn tls_clients_slow_uploads_do_not_hold_a_one_at_a_time_backend() {
    use std::io::{Read, Write};
    let (bport, heads) = one_at_a_time_backend();
    let (pki, _h, port) = tls_in_front_of("slowup", bport);
    let mut slow = tls_client(&pki, port, "a.test");
    slow.write_all(b"POST /up HTTP/1.1\r\nHost: a.test\r\nContent-Length: 4\r\n\r\na")
        .unwrap();
    slow.flush().unwrap();
    // While that body trickles, other clients are served.
    for version in ["--http1.1", "--http2"] {
        let out = curl(&pki, "a.test", port, "/", &[version]);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(text.starts_with("got 0"), "{version}: {text}");
        assert!(!heads.recv_timeout(T).unwrap().contains("/up"));
    }
    slow.write_all(b"bcd").unwrap();
    slow.flush().unwrap();
    let mut answer = Vec::new();
    let mut buf = [0u8; 1024];
    while !answer.ends_with(b"got 4") {
        let n = slow.read(&mut buf).unwrap();
        assert!(n > 0, "closed: {}", String::from_utf8_lossy(&answer));
        answer.extend_from_slice(&buf[..n]);
    }
    assert!(answer.starts_with(b"HTTP/1.1 200"));
    assert!(heads.recv_timeout(T).unwrap().starts_with("POST /up"));
}

#[test]
fn tls_clients_bodies_past_max_body_size_get_413() {
    let pki = Pki::new("maxbody");
    let a = pki.leaf("a.test");
    let mut args = tls_args(&[&a]);
    args.extend(["--max-body-size", "64k", "-i", "1"].map(String::from));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    // A backend that reads each body whole before it answers (the demo
    // answers at once, and hyper's client can lose an answer that comes
    // before the body is sent).
    let reader = "require('http').createServer((q, s) => { let n = 0; \
                  q.on('data', d => n += d.length); q.on('end', () => s.end('got ' + n)); \
                  }).listen(process.env.PORT)";
    let h = Herd::start(&args, &["node", "-e", reader]);
    h.wait_ready(1);
    let file = |n: usize| {
        let p = pki.path(&format!("body-{n}"));
        std::fs::write(&p, vec![b'a'; n]).unwrap();
        p
    };
    let (fits, over, big) = (file(64 * 1024), file(64 * 1024 + 1), file(4 << 20));
    let status = |body: &PathBuf, extra: &[&str]| {
        let data = format!("@{}", body.display());
        let all = [
            &["-o", "/dev/null", "-w", "%{http_code}", "-H", "Expect:"][..],
            extra,
            &["--data-binary", &data],
        ]
        .concat();
        // `-w` is given twice (curl()'s, then this one): the last wins.
        let out = curl(&pki, "a.test", h.port, "/", &all);
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    };
    for version in ["--http1.1", "--http2"] {
        assert_eq!(status(&fits, &[version]), "200", "{version}");
        assert_eq!(status(&over, &[version]), "413", "{version}");
        assert_eq!(status(&big, &[version]), "413", "{version}");
    }
    // curl sends `Expect: 100-continue` with a large body: the 413 comes
    // without a `100 Continue` first, so the body is never sent.
    let out = curl(
        &pki,
        "a.test",
        h.port,
        "/",
        &[
            "--http1.1",
            "-v",
            "-o",
            "/dev/null",
            "--data-binary",
            &format!("@{}", big.display()),
        ],
    );
    let trace = String::from_utf8_lossy(&out.stderr);
    assert!(trace.contains("Expect: 100-continue"), "{trace}");
    assert!(trace.contains("< HTTP/1.1 413"), "{trace}");
    assert!(!trace.contains("100 Continue"), "{trace}");
    // A chunked body, cut where it passes the limit.
    let chunked = ["--http1.1", "-H", "Transfer-Encoding: chunked"];
    assert_eq!(status(&big, &chunked), "413");
    assert_eq!(status(&fits, &chunked), "200");
}
