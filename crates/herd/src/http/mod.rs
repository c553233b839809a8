//! The HTTP proxy (proxy mode, `--protocol http`): balances per request
//! over keep-alive connections to each target, HTTP/1.1 and h2c from
//! clients, websockets through upgrades.

pub mod guard;
pub mod pool;

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use herd_balance::{Backend, Ctx, KeySource, PickError};
use hyper::body::{Body, Incoming};
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::upstream::{Target, Upstreams};
use pool::{ReqBody, RespBody, Sender};

/// Timeouts and limits of the HTTP proxy.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    pub connect_timeout: Duration,
    /// Time for a backend to start answering (response headers).
    pub response_timeout: Duration,
    pub limits: guard::Limits,
    /// How long a request waits for a first worker to be ready.
    pub wait_for_backend: Duration,
}

pub struct HttpProxy {
    pub up: Arc<Upstreams>,
    pub cfg: HttpConfig,
}

/// Headers hyper parses without a `max_headers` setting.
const HYPER_MAX_HEADERS: usize = 100;

/// Serves `conn` until it ends; once `stop` is cancelled it is told to
/// finish what is in flight, close idle keep-alive at once, and is awaited.
async fn drive<F: Future>(conn: F, shutdown: impl FnOnce(Pin<&mut F>), stop: &CancellationToken) {
    tokio::pin!(conn);
    tokio::select! {
        _ = conn.as_mut() => {}
        _ = stop.cancelled() => {
            shutdown(conn.as_mut());
            let _ = conn.await;
        }
    }
}

/// Attempts per request, as nginx's `proxy_next_upstream_tries` but bounded.
const MAX_TRIES: usize = 3;

impl HttpProxy {
    /// Serves one client connection until it closes or `stop` asks it to
    /// finish its in-flight requests and close.
    pub async fn serve_conn(
        self: Arc<Self>,
        stream: TcpStream,
        peer: SocketAddr,
        stop: CancellationToken,
    ) {
        let _ = stream.set_nodelay(true);
        let mut guard = guard::Guard::new(stream, self.cfg.limits);
        // The guard reads the first bytes anyway: it tells h2c from HTTP/1,
        // where hyper-util's `auto` would read and replay them, which made
        // hyper's first read short and regrow its buffer on every connection.
        let h2 = tokio::select! {
            h2 = std::future::poll_fn(|cx| guard.poll_is_h2(cx)) => h2,
            _ = stop.cancelled() => return, // nothing sent yet: close
        };
        let io = TokioIo::new(guard);
        let me = self.clone();
        let svc = hyper::service::service_fn(move |req| {
            let me = me.clone();
            async move { Ok::<_, std::convert::Infallible>(me.handle(req, peer).await) }
        });
        if h2 {
            // Boxed: it is rare, and the connection's task stays small.
            let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .max_header_list_size(self.cfg.limits.max_head as u32)
                .serve_connection(io, svc);
            drive(
                Box::pin(conn),
                |c| c.get_mut().as_mut().graceful_shutdown(),
                &stop,
            )
            .await;
            return;
        }
        let mut b = hyper::server::conn::http1::Builder::new();
        b
            // A client may shut down its sending side and still await answers.
            .half_close(true)
            .writev(false)
            .timer(TokioTimer::new())
            // The guard times request heads (and answers 408): no second
            // timer per request in hyper.
            .header_read_timeout(None)
            .max_buf_size(self.cfg.limits.max_head.max(8192) + 8192);
        // The guard refuses heads with more headers than the limit. Within
        // hyper's default of 100 hyper needs no setting, which spares it
        // building a 100-entry array by value for every request.
        if self.cfg.limits.max_headers > HYPER_MAX_HEADERS {
            b.max_headers(self.cfg.limits.max_headers);
        }
        let conn = b.serve_connection(io, svc).with_upgrades();
        drive(conn, |c| c.graceful_shutdown(), &stop).await;
    }

    async fn handle(&self, mut req: Request<Incoming>, peer: SocketAddr) -> Response<RespBody> {
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        prepare_request_head(&mut parts, peer, upgrade);
        let idempotent = matches!(
            parts.method,
            Method::GET
                | Method::HEAD
                | Method::OPTIONS
                | Method::PUT
                | Method::DELETE
                | Method::TRACE
        );
        let has_body = !body.is_end_stream();
        let body_failed = has_body.then(|| Arc::new(AtomicBool::new(false)));
        // A request without a body can be replayed on another backend if
        // the first dies before answering; one with a body cannot.
        let replay = (idempotent && !has_body && !upgrade).then(|| clone_head(&parts));
        let mut next = Some(Request::from_parts(
            parts,
            if has_body {
                ReqBody::Client {
                    inner: body,
                    failed: body_failed.clone().unwrap_or_default(),
                }
            } else {
                ReqBody::Empty
            },
        ));
        let key_source = self.up.kind().key_source();
        let mut avoid: Option<Arc<Backend>> = None;
        // What the client gets if no retry succeeds (nginx answers 502 then).
        let mut last = (StatusCode::BAD_GATEWAY, "no backend could answer\n");
        for _ in 0..MAX_TRIES {
            if !self.some_target().await {
                return error(StatusCode::SERVICE_UNAVAILABLE, "no worker is ready\n");
            }
            let Some(req) = next.take() else { break };
            let (lease, target) = {
                let pool = self.up.peek();
                let key = hash_key(&key_source, req.headers(), peer);
                let ctx = Ctx {
                    now: self.up.now(),
                    rand: fastrand::u64(..),
                    key: key.as_ref().map(|k| k.as_slice()),
                };
                match pool.balancer.pick_except(&ctx, avoid.as_deref()) {
                    Ok(l) => {
                        let t = pool.targets[l.index()].clone();
                        (l, t)
                    }
                    Err(PickError::AllDown | PickError::Empty) if avoid.is_some() => {
                        return error(last.0, last.1);
                    }
                    Err(PickError::AllDown | PickError::Empty) => {
                        return error(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n");
                    }
                }
            };
            let outcome = self.send(&target, req, upgrade).await;
            let now = self.up.now();
            match outcome {
                Sent::Answer(mut resp, sender) => {
                    lease.success(now);
                    target.count_served();
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    strip_hop_by_hop(resp.headers_mut(), switching);
                    if switching {
                        if let Some(client) = client_upgrade {
                            let backend = hyper::upgrade::on(&mut resp);
                            tokio::spawn(tunnel(client, backend, lease));
                        }
                        return resp.map(|_| RespBody::Full(None));
                    }
                    let back = sender.map(|s| (s, target));
                    return resp.map(|inner| RespBody::Backend {
                        inner,
                        lease: Some(lease),
                        back,
                    });
                }
                Sent::Unsent(req, why) => {
                    // Nothing reached the backend: any request may go elsewhere.
                    tracing::debug!("{}: {why}; trying another backend", target.label);
                    last = (StatusCode::BAD_GATEWAY, "could not connect to a backend\n");
                    lease.failure(now);
                    avoid = Some(lease.backend().clone());
                    next = Some(req);
                }
                Sent::Failed(why, timed_out) => {
                    // (A stalled body was already answered 408 by the guard.)
                    if body_failed
                        .as_ref()
                        .is_some_and(|f| f.load(Ordering::Relaxed))
                    {
                        return error(StatusCode::BAD_REQUEST, "bad request body\n");
                    }
                    lease.failure(now);
                    tracing::debug!("{}: {why}", target.label);
                    last = if timed_out {
                        (
                            StatusCode::GATEWAY_TIMEOUT,
                            "backend did not answer in time\n",
                        )
                    } else {
                        (StatusCode::BAD_GATEWAY, "backend failed\n")
                    };
                    match &replay {
                        Some(head) => {
                            avoid = Some(lease.backend().clone());
                            next = Some(Request::from_parts(clone_head(head), ReqBody::Empty));
                        }
                        None => return error(last.0, last.1),
                    }
                }
            }
        }
        error(last.0, last.1)
    }

    /// Whether there is a target; while there is none (no worker ready
    /// yet), waits a bounded time for one.
    async fn some_target(&self) -> bool {
        if !self.up.peek().targets.is_empty() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + self.cfg.wait_for_backend;
        loop {
            let changed = self.up.changed();
            if !self.up.peek().targets.is_empty() {
                return true;
            }
            if tokio::time::timeout_at(deadline, changed).await.is_err() {
                return false;
            }
        }
    }

    async fn send(&self, target: &Arc<Target>, mut req: Request<ReqBody>, upgrade: bool) -> Sent {
        // A pooled connection the backend has meanwhile closed gives the
        // request back unsent; then one fresh connection is tried.
        let mut pooled = if upgrade { None } else { target.conns.take() };
        loop {
            let from_pool = pooled.is_some();
            let mut sender = match pooled.take() {
                Some(s) => s,
                None => match pool::connect(target, self.cfg.connect_timeout, upgrade).await {
                    Ok(s) => s,
                    Err(e) => return Sent::Unsent(req, e.to_string()),
                },
            };
            let sending = sender.try_send_request(req);
            let res = match tokio::time::timeout(self.cfg.response_timeout, sending).await {
                Ok(r) => r,
                Err(_) => {
                    return Sent::Failed(
                        format!("no response within {:?}", self.cfg.response_timeout),
                        true,
                    );
                }
            };
            match res {
                Ok(resp) => {
                    let reusable = !upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
                    if resp.body().is_end_stream() && reusable {
                        target.conns.put(sender);
                        return Sent::Answer(resp, None);
                    }
                    return Sent::Answer(resp, reusable.then_some(sender));
                }
                Err(mut e) => match e.take_message() {
                    Some(back) if from_pool => req = back,
                    Some(back) => return Sent::Unsent(back, e.into_error().to_string()),
                    None => {
                        let err = e.into_error();
                        return Sent::Failed(err.to_string(), err.is_timeout());
                    }
                },
            }
        }
    }
}

enum Sent {
    /// Response headers arrived; the sender goes back to the pool when the
    /// body ends (`None`: it already went back, or cannot be reused).
    Answer(Response<Incoming>, Option<Sender>),
    /// The request never left: safe to send elsewhere.
    Unsent(Request<ReqBody>, String),
    /// Sent, then failed (reset, malformed response, timeout).
    Failed(String, bool),
}

async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    lease: herd_balance::Lease,
) {
    if let (Ok(c), Ok(b)) = (client.await, backend.await) {
        let (mut c, mut b) = (TokioIo::new(c), TokioIo::new(b));
        let _ = tokio::io::copy_bidirectional(&mut c, &mut b).await;
    }
    drop(lease); // Counted as in flight for as long as the tunnel lasts.
}

fn error(status: StatusCode, body: &'static str) -> Response<RespBody> {
    let mut r = Response::new(RespBody::text(body));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req.headers().contains_key(header::UPGRADE)
        && req
            .headers()
            .get_all(header::CONNECTION)
            .iter()
            .any(|v| has_token(v, "upgrade"))
}

fn has_token(v: &HeaderValue, token: &str) -> bool {
    v.to_str()
        .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
        .unwrap_or(false)
}

const HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
];

/// Removes headers meant for one hop only, including those the sender
/// listed in `Connection`; an upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if h.contains_key(header::CONNECTION) {
        strip_listed(h, keep_upgrade);
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    } else {
        h.remove(header::UPGRADE);
    }
}

/// Removes the headers named in `Connection` (it allocates, so only when
/// there is one).
fn strip_listed(h: &mut HeaderMap, keep_upgrade: bool) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        if !(keep_upgrade && name == header::UPGRADE) {
            h.remove(&name);
        }
    }
}

/// Turns the client's request head into the one sent to a backend.
fn prepare_request_head(parts: &mut hyper::http::request::Parts, peer: SocketAddr, upgrade: bool) {
    // h2 clients give the host as :authority; HTTP/1.1 backends want Host.
    if !parts.headers.contains_key(header::HOST)
        && let Some(a) = parts.uri.authority()
        && let Ok(v) = HeaderValue::from_str(a.as_str())
    {
        parts.headers.insert(header::HOST, v);
    }
    // Origin form for the backend; PathAndQuery is shared bytes, no copy.
    let mut uri = hyper::http::uri::Parts::default();
    uri.path_and_query = parts.uri.path_and_query().cloned();
    parts.uri = Uri::from_parts(uri).unwrap_or_else(|_| Uri::from_static("/"));
    parts.version = Version::HTTP_11;
    strip_hop_by_hop(&mut parts.headers, upgrade);
    add_forwarding(&mut parts.headers, peer);
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// `X-Forwarded-For` and `Forwarded` get this hop appended; an
/// `X-Forwarded-Proto`/`-Host` set by a proxy in front is kept. Each value
/// is written once into a buffer the header then owns (no copy).
fn add_forwarding(h: &mut HeaderMap, peer: SocketAddr) {
    use std::fmt::Write;
    let ip = peer.ip().to_canonical();
    let mut xff = String::with_capacity(48);
    if let Some(prev) = h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    let _ = write!(xff, "{ip}");
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR, v);
    }
    if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    let host = h.get(header::HOST).cloned();
    if let Some(host) = &host
        && !h.contains_key(&X_FORWARDED_HOST)
    {
        h.insert(X_FORWARDED_HOST, host.clone());
    }
    let mut fwd = String::with_capacity(96);
    if let Some(prev) = h.get(header::FORWARDED).and_then(|v| v.to_str().ok()) {
        fwd.push_str(prev);
        fwd.push_str(", ");
    }
    let _ = if ip.is_ipv6() {
        write!(fwd, "for=\"[{ip}]\";proto=http")
    } else {
        write!(fwd, "for={ip};proto=http")
    };
    if let Some(host) = host.as_ref().and_then(|h| h.to_str().ok()) {
        fwd.push_str(";host=\"");
        fwd.extend(host.chars().filter(|c| !matches!(c, '"' | '\\')));
        fwd.push('"');
    }
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(fwd)) {
        h.insert(header::FORWARDED, v);
    }
}

fn clone_head(p: &hyper::http::request::Parts) -> hyper::http::request::Parts {
    let mut r = Request::new(());
    *r.method_mut() = p.method.clone();
    *r.uri_mut() = p.uri.clone();
    *r.version_mut() = p.version;
    *r.headers_mut() = p.headers.clone();
    r.into_parts().0
}

/// The key a hashing strategy balances on: borrowed from the request, or
/// the client address on the stack.
pub enum Key<'a> {
    Ip([u8; 16], usize),
    Bytes(&'a [u8]),
}

impl Key<'_> {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            Key::Ip(b, n) => &b[..*n],
            Key::Bytes(b) => b,
        }
    }
}

pub fn ip_key(peer: SocketAddr) -> Key<'static> {
    let mut b = [0u8; 16];
    match peer.ip().to_canonical() {
        std::net::IpAddr::V4(v4) => {
            b[..4].copy_from_slice(&v4.octets());
            Key::Ip(b, 4)
        }
        std::net::IpAddr::V6(v6) => Key::Ip(v6.octets(), 16),
    }
}

fn hash_key<'a>(src: &KeySource, h: &'a HeaderMap, peer: SocketAddr) -> Option<Key<'a>> {
    match src {
        KeySource::None => None,
        KeySource::ClientIp => Some(ip_key(peer)),
        KeySource::Header(name) => h.get(name.as_str()).map(|v| Key::Bytes(v.as_bytes())),
        KeySource::Cookie(name) => h
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|s| s.split(';'))
            .find_map(|kv| {
                let (k, v) = kv.trim().split_once('=')?;
                (k == name).then_some(Key::Bytes(v.as_bytes()))
            }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarding_appends_this_hop_in_each_form() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a\"b\\c:80"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=10.0.0.1"));
        add_forwarding(&mut h, "[2001:db8::7]:5000".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::7");
        assert_eq!(
            h[header::FORWARDED],
            "for=10.0.0.1, for=\"[2001:db8::7]\";proto=http;host=\"abc:80\""
        );
        assert_eq!(h[&X_FORWARDED_HOST], "a\"b\\c:80");
        // An IPv4 client seen through a v4-mapped address is written as v4.
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, "[::ffff:192.0.2.9]:1".parse().unwrap());
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.9");
        assert_eq!(h[header::FORWARDED], "for=192.0.2.9;proto=http");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
    }
}
