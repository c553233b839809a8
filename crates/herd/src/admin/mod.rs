//! The admin listener (`--admin`): the web dashboard at `/` (live over
//! Server-Sent Events at `/events`, actions at `/api/*`), `/metrics` in
//! Prometheus' text format (built with `prometheus-client`) and `/status`
//! (the JSON of `herd status --json`). It asks the supervisor as the control
//! socket does, so a scrape costs the supervisor one status answer, and it
//! reads the proxy's per-backend counts.
//!
//! Auth: with a token, every request but the page itself needs
//! `Authorization: Bearer TOKEN` (and `/metrics` not with
//! `--admin-public-metrics`); without one the listener must be on loopback
//! (the configuration refuses otherwise) and, but for `/metrics`, the `Host`
//! must name loopback, so a web page elsewhere cannot reach it by DNS
//! rebinding. Actions need a
//! JSON body and a same-origin `Origin`, so another site's form cannot post.

mod dashboard;
mod metrics;

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::registry::Registry;
use tokio::sync::mpsc::UnboundedSender;

use crate::config::AdminConfig;
use crate::control::{Call, Line, Request as Ask, Status};
use crate::upstream::Upstreams;

type Body = BoxBody<Bytes, Infallible>;

/// How long an admin client may take to send a request head.
const HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Serves the admin listener until the master ends.
pub async fn serve(
    listener: tokio::net::TcpListener,
    cfg: AdminConfig,
    calls: UnboundedSender<Call>,
    up: Arc<Upstreams>,
) {
    let cfg = Arc::new(cfg);
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            // Out of descriptors, the connection stays queued and accept
            // fails again at once: wait rather than spin the supervisor's thread.
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            continue;
        };
        let (cfg, calls, up) = (cfg.clone(), calls.clone(), up.clone());
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let (cfg, calls, up) = (cfg.clone(), calls.clone(), up.clone());
                async move { Ok::<_, Infallible>(answer(req, &cfg, calls, up).await) }
            });
            // A client that never finishes a head (or sits idle between
            // requests) is let go: the listener may face the network.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    cfg: &AdminConfig,
    calls: UnboundedSender<Call>,
    up: Arc<Upstreams>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    if cfg.token.is_none() && path != "/metrics" && !host_is_loopback(&req) {
        return reply(
            StatusCode::FORBIDDEN,
            "text/plain",
            "the Host header must name a loopback address (set --admin-token to serve other names)\n",
        );
    }
    // The page holds no data; it asks for the token when it needs one.
    if path == "/" && req.method() == Method::GET {
        return dashboard::page();
    }
    let open = path == "/metrics" && cfg.public_metrics;
    if let Some(token) = &cfg.token
        && !open
        && !bearer_is(&req, token)
    {
        let mut res = reply(
            StatusCode::UNAUTHORIZED,
            "text/plain",
            "a bearer token is required\n",
        );
        res.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            hyper::header::HeaderValue::from_static("Bearer"),
        );
        return res;
    }
    if let Some(action) = path.strip_prefix("/api/") {
        if req.method() != Method::POST {
            return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "POST only\n");
        }
        let action = action.to_string();
        return dashboard::act(&action, req, &calls).await;
    }
    if req.method() != Method::GET {
        return reply(StatusCode::METHOD_NOT_ALLOWED, "text/plain", "GET only\n");
    }
    match path.as_str() {
        "/events" => dashboard::events(calls, up),
        "/metrics" | "/status" => {
            let Some(status) = status(&calls).await else {
                return stopping();
            };
            if path == "/status" {
                let json = serde_json::to_string(&status).unwrap_or_default();
                return reply(StatusCode::OK, "application/json", json);
            }
            let port = status
                .listen
                .parse::<std::net::SocketAddr>()
                .map_or(0, |a| a.port());
            let kernel = tokio::task::spawn_blocking(move || metrics::Kernel::read(port))
                .await
                .unwrap_or_default();
            scrape(status, kernel, &up)
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "/, /events, /metrics, /status or POST /api/reload|scale|replace\n",
        ),
    }
}

fn scrape(status: Status, kernel: metrics::Kernel, up: &Upstreams) -> Response<Body> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(metrics::Scrape {
        targets: up.current().all_targets().cloned().collect(),
        retries: up.retries.load(std::sync::atomic::Ordering::Relaxed),
        status,
        kernel,
    }));
    let mut text = String::new();
    match prometheus_client::encoding::prometheus_text::encode(&mut text, &registry) {
        Ok(()) => reply(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            text,
        ),
        Err(_) => reply(
            StatusCode::INTERNAL_SERVER_ERROR,
            "text/plain",
            "/metrics: cannot encode\n",
        ),
    }
}

fn stopping() -> Response<Body> {
    reply(
        StatusCode::SERVICE_UNAVAILABLE,
        "text/plain",
        "the master is stopping\n",
    )
}

/// The supervisor's `herd status` answer.
async fn status(calls: &UnboundedSender<Call>) -> Option<Status> {
    match call(calls, Ask::Status).await? {
        Line::Status(s) => Some(*s),
        _ => None,
    }
}

/// Sends `req` to the supervisor; its last answer line (progress skipped).
async fn call(calls: &UnboundedSender<Call>, req: Ask) -> Option<Line> {
    let (reply, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (_written, written) = tokio::sync::oneshot::channel();
    calls
        .send(Call {
            req,
            reply,
            written,
        })
        .ok()?;
    let mut last = None;
    while let Some(line) = rx.recv().await {
        match line {
            Line::Progress { .. } => {}
            Line::Done(_) | Line::Status(_) => {
                last = Some(line);
                break;
            }
        }
    }
    last
}

/// Without a token the listener is loopback-only; so must the name the
/// browser used be (an IP literal or `localhost`), or a page on another
/// site could rebind its DNS name to 127.0.0.1 and read the answers.
fn host_is_loopback(req: &Request<Incoming>) -> bool {
    let Some(host) = req
        .headers()
        .get(hyper::header::HOST)
        .and_then(|h| h.to_str().ok())
    else {
        return true; // HTTP/1.0 clients (curl -0, probes) send none
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Compares the bearer token in constant time.
fn bearer_is(req: &Request<Incoming>, token: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "))
    else {
        return false;
    };
    given.len() == token.len()
        && given
            .iter()
            .zip(token.as_bytes())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
}

fn reply(status: StatusCode, kind: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut res = Response::new(Full::new(body.into()).boxed());
    *res.status_mut() = status;
    if let Ok(v) = hyper::header::HeaderValue::from_str(kind) {
        res.headers_mut().insert(hyper::header::CONTENT_TYPE, v);
    }
    res
}
