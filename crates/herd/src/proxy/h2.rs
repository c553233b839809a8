//! The proxy path through hyper: prior-knowledge h2c clients, TLS clients
//! ([`super::tls`]), and every client when some backend speaks HTTP/2.
//! Each request (each HTTP/2 stream) is balanced on its own and sent to a
//! backend with hyper's client: HTTP/1.1, or HTTP/2 (h2c, one multiplexed
//! connection per backend and proxy thread) to a backend marked `h2`.
//! Otherwise HTTP/1 clients take the engine in [`super::h1`].
//!
//! Long because hyper's body types and client pool live here too, used by
//! nothing else.

use std::cell::RefCell;
use std::net::{IpAddr, SocketAddr};

use crate::os::diag::Ours;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use herd_balance::{Backend, Ctx, KeySource, PickError};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode, Uri, Version};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use super::conns::IdleMap;
use super::head;
use super::idle::{Busy, Seen, Watched};
use super::{HttpProxy, Key, ip_key};
use crate::upstream::Target;

/// A hyper HTTP/1 connection to a backend, with what its [`Wire`] has read
/// of the current answer before its head.
pub struct Sender {
    send: SendRequest<ReqBody>,
    head: Arc<HeadWatch>,
    /// The connection's local end, to a worker (see `head_within`).
    ours: Option<Ours>,
}

/// hyper skips any number of interim (1xx) answers: a backend sending them
/// without end would keep the thread parsing them until
/// `--response-timeout`. The [`Wire`] counts the bytes a request's answer
/// brings before its head is delivered, and past [`BEFORE_HEAD`] fails the
/// connection. Per request this costs two stores; per read, a load (and
/// an add until the head).
#[derive(Default)]
struct HeadWatch {
    /// The current request's answer head was delivered (or none is awaited).
    seen: AtomicBool,
    bytes: AtomicUsize,
}

/// hyper parses no head larger than its buffer ([`BACKEND_BUF`], 64 KiB),
/// so a real answer brings less than that before its head is delivered.
const BEFORE_HEAD: usize = 512 * 1024;

impl std::ops::Deref for Sender {
    type Target = SendRequest<ReqBody>;
    fn deref(&self) -> &Self::Target {
        &self.send
    }
}

impl std::ops::DerefMut for Sender {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.send
    }
}

impl Sender {
    /// An answer's head is awaited (`false`) or was delivered (`true`).
    fn head_seen(&self, seen: bool) {
        if !seen {
            self.head.bytes.store(0, Ordering::Relaxed);
        }
        self.head.seen.store(seen, Ordering::Relaxed);
    }
}

/// Attempts per request, as nginx's `proxy_next_upstream_tries` but bounded.
const MAX_TRIES: usize = 3;

/// Serves an h2c connection whose first bytes (`prefix`) were already read.
pub async fn serve(
    p: Arc<HttpProxy>,
    io: TcpStream,
    prefix: Vec<u8>,
    peer: IpAddr,
    stop: CancellationToken,
) {
    let seen = Seen::new();
    let local = io.local_addr().ok();
    let io = TokioIo::new(Watched::new(Prefixed { prefix, at: 0, io }, &seen));
    let svc = service(p.clone(), peer, local, Via::Plain, seen.clone());
    let conn = http2_server(&p).serve_connection(io, svc);
    serve_gracefully!(conn, stop, seen, p.cfg.limits.idle_timeout, None);
}

/// Serves a plain connection through hyper, HTTP/1.1 or h2c by its first
/// bytes: the path when some backend speaks HTTP/2, which herd's own
/// HTTP/1.1 engine does not.
pub async fn serve_any(p: Arc<HttpProxy>, io: TcpStream, peer: IpAddr, stop: CancellationToken) {
    let seen = Seen::new();
    let svc = service(
        p.clone(),
        peer,
        io.local_addr().ok(),
        Via::Plain,
        seen.clone(),
    );
    let mut b = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    // The header time-out is `idle::watch`'s (hyper's also runs while idle).
    b.http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(p.cfg.limits.max_head.max(8192));
    // The same limits as `http2_server` (the auto builder has its own type).
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buf_size(SEND_BUF)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(p.cfg.limits.max_head as u32)
        .max_pending_accept_reset_streams(Some(32));
    let conn = b.serve_connection_with_upgrades(TokioIo::new(Watched::new(io, &seen)), svc);
    let limits = p.cfg.limits;
    serve_gracefully!(
        conn,
        stop,
        seen,
        limits.idle_timeout,
        Some(limits.header_timeout)
    );
}

/// hyper's service for one client connection: each request is handled by
/// [`HttpProxy::handle_h2`] and keeps the connection busy (`seen`) until
/// its answer has been sent whole, so a quiet stream (a gRPC subscription,
/// a long poll) is never taken for an idle connection.
pub(super) fn service(
    me: Arc<HttpProxy>,
    peer: IpAddr,
    local: Option<SocketAddr>,
    via: Via,
    seen: Arc<Seen>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<Tracked>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<Tracked>, std::convert::Infallible>> + Send,
> + Clone {
    hyper::service::service_fn(move |req| {
        let (me, busy, via) = (me.clone(), seen.busy(), via.clone());
        async move {
            let (answer, ending) = me.handle_h2(req, peer, local, &via).await;
            Ok(answer.map(|body| Tracked {
                body,
                ending,
                _busy: busy,
            }))
        }
    })
}

/// How a client reached herd: in plain text (h2c, or HTTP/1.1 while a
/// backend speaks HTTP/2), or through herd's TLS listener, with the client
/// certificate `--tls-client-ca` verified as RFC 9440's `Client-Cert`
/// value (`:` base64 DER `:`), made once per connection.
#[derive(Clone)]
pub(super) enum Via {
    Plain,
    Tls(Option<HeaderValue>),
}

/// An answer's body that counts its connection busy until hyper drops it
/// (sent whole, or its stream ended), and its bytes for its [`Ending`].
pub(super) struct Tracked {
    body: RespBody,
    ending: Ending,
    _busy: Busy,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let me = self.get_mut();
        let frame = Pin::new(&mut me.body).poll_frame(cx);
        if let Poll::Ready(Some(Ok(f))) = &frame
            && let Some(data) = f.data_ref()
        {
            me.ending.sent += data.len() as u64;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// HTTP/2 flow-control windows, both ways, as nginx sets them: a stream
/// may hold 256 KiB its reader has not taken yet, the connection as a whole
/// is not limited. With one window for the whole connection, a stream whose
/// reader stalls uses it up and every other stream stalls behind it:
/// towards a backend, three clients that stopped reading a streamed answer
/// (hyper's defaults there: 2 MiB a stream, 5 MiB the connection); from a
/// client, one upload its backend was slow to take (1 MiB each), which held
/// up every other request body on that connection (a gRPC channel's unary
/// calls). A stream's 256 KiB is 25 MB/s at 10 ms of round trip.
const STREAM_WINDOW: u32 = 256 * 1024;
const CONNECTION_WINDOW: u32 = (1 << 31) - 1;

/// Streams one HTTP/2 client may have open at once (nginx's default).
const MAX_STREAMS: u32 = 128;
/// What hyper may hold of each stream's answer while its client does not
/// read (hyper's default is about 400 KiB): a client that opened its
/// streams, gave them large windows and then stopped reading grew herd by
/// 117 MB with 200 streams.
const SEND_BUF: usize = 64 * 1024;

/// hyper's HTTP/2 server as herd runs it for clients: at most 128 streams
/// at once, 64 KiB of each one's answer held, a header list no larger than `--max-head` (a CONTINUATION
/// flood ends there), and h2's limit on streams a client resets before
/// they are served (a rapid-reset flood gets GOAWAY). Settings and ping
/// floods are bounded by h2's own queues of pending acks.
pub(super) fn http2_server(p: &HttpProxy) -> hyper::server::conn::http2::Builder<TokioExecutor> {
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(MAX_STREAMS)
        .max_send_buf_size(SEND_BUF)
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(p.cfg.limits.max_head as u32)
        .max_pending_accept_reset_streams(Some(32));
    b
}

/// The socket, with the bytes already read from it put back in front.
struct Prefixed {
    prefix: Vec<u8>,
    at: usize,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        if self.at < self.prefix.len() {
            let n = (self.prefix.len() - self.at).min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.prefix[at..at + n]);
            self.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl HttpProxy {
    /// One request from an h2c client, or (`tls`) from a client of herd's
    /// TLS listener over HTTP/2 or HTTP/1.1, and what its [`Ending`] will
    /// report once its answer is sent whole (or nginx's 499 if this is
    /// dropped unanswered: hyper drops it when the client leaves).
    pub(super) async fn handle_h2(
        &self,
        mut req: Request<Incoming>,
        peer: IpAddr,
        local: Option<SocketAddr>,
        via: &Via,
    ) -> (Response<RespBody>, Ending) {
        // As a trusted balancer in front names the client (`--real-ip-from`);
        // from anyone else, the scheme and host are herd's to say (as in
        // `head::request`).
        let peer = match &self.cfg.real_ip {
            Some(r) => {
                if !super::real_ip::trusts(r, peer) {
                    req.headers_mut().remove(&X_FORWARDED_PROTO);
                    req.headers_mut().remove(&X_FORWARDED_HOST);
                }
                super::real_ip::client(
                    r,
                    peer,
                    req.headers()
                        .get_all(r.header.as_str())
                        .iter()
                        .map(|v| v.as_bytes()),
                )
            }
            None => peer,
        };
        let mut ending = Ending {
            line: self
                .log
                .as_ref()
                .map(|log| Box::new(Line::of(&req, log, peer))),
            served: Served::default(),
            status: 499,
            sent: 0,
        };
        let resp = self
            .forward(req, peer, local, via, &mut ending.served)
            .await;
        ending.status = resp.status().as_u16();
        (resp, ending)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        peer: IpAddr,
        local: Option<SocketAddr>,
        via: &Via,
        served: &mut Served,
    ) -> Response<RespBody> {
        if let Some(why) = refused_h1(&req) {
            let mut r = error(StatusCode::BAD_REQUEST, why);
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
        // Not a proxy for tunnels, as herd's engine answers (`Refusal::NotAllowed`):
        // an HTTP/2 CONNECT has no path, and would reach the backend as
        // `CONNECT  HTTP/1.1`.
        if req.method() == Method::CONNECT {
            let mut r = error(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, POST, PUT, DELETE, PATCH, OPTIONS"),
            );
            if req.version() != Version::HTTP_2 {
                r.headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            return r;
        }
        // Over its rate (`--rate-limit`), as in herd's own engine.
        if let Some(rate) = &self.rate
            && let Err(wait) = rate.check(peer, self.up.now())
        {
            let why = "over --rate-limit; answered 429";
            super::Told::RateLimited.warn(format_args!("a client at {peer}"), &why);
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, super::head::RATE_LIMITED.2);
            let secs = super::rate::retry_after(wait);
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
            return r;
        }
        let upgrade = is_upgrade(&req);
        let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));
        let (mut parts, body) = req.into_parts();
        let version = parts.version;
        // gRPC needs `te: trailers` on HTTP/2; every other TE is hop-by-hop.
        let te_trailers = parts
            .headers
            .get_all(header::TE)
            .iter()
            .any(|v| has_token(v, "trailers"));
        prepare_request_head(&mut parts, peer, local, upgrade, via);
        if te_trailers {
            parts.extensions.insert(TeTrailers);
        }
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
        let max = self.cfg.limits.max_body;
        if max.is_some_and(|max| body.size_hint().lower() > max) {
            // Its length says so: refused before any backend hears of it.
            // A client waiting for `100 Continue` sends nothing more (and
            // reading the body would ask hyper to send one).
            let waits = parts
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"));
            if !waits {
                tokio::spawn(discard(body));
            }
            return too_large(version);
        }
        // As herd's own engine does (`h1::buffer_body`, nginx's
        // `proxy_request_buffering`): a body of a known length up to
        // `--request-buffer` is read whole before a backend is picked, so a
        // slow upload never holds one. (A length-less body, a gRPC stream
        // among them, streams.)
        let buffer = self.cfg.limits.request_buffer as u64;
        let (body, whole) = match body.size_hint().exact() {
            Some(n) if has_body && !upgrade && n <= buffer => {
                // Reading it lets hyper say `100 Continue`; the backend then
                // gets the body with the head.
                parts.headers.remove(header::EXPECT);
                match read_whole(body, self.cfg.limits.idle_timeout, version).await {
                    Ok(whole) => (None, Some(whole)),
                    Err(refused) => return refused,
                }
            }
            _ => (Some(body), None),
        };
        let upload = has_body.then(|| {
            Arc::new(Upload {
                max,
                bytes: AtomicU64::new(whole.as_ref().map_or(0, |(d, _)| d.len() as u64)),
                ..Upload::default()
            })
        });
        served.upload = upload.clone();
        // A request without a body can be replayed on another backend if
        // the first dies before answering; one with a body cannot.
        let replay = (idempotent && !has_body && !upgrade).then(|| clone_head(&parts));
        let mut next = Some(Request::from_parts(
            parts,
            match (whole, body) {
                (Some((data, trailers)), _) => ReqBody::Whole {
                    data: Some(data),
                    trailers,
                },
                (None, Some(body)) if has_body => ReqBody::Client {
                    inner: Some(body),
                    upload: upload.clone().unwrap_or_default(),
                },
                _ => ReqBody::Empty,
            },
        ));
        let key_source = &self.key_source;
        let mut avoid: Option<Arc<Backend>> = None;
        // What the client gets if no retry succeeds (nginx answers 502 then).
        let mut last = (StatusCode::BAD_GATEWAY, "no backend could answer\n");
        let mut replace_by = None;
        let mut queued = super::Queued::default();
        for tries in 0..MAX_TRIES {
            served.retries = tries as u32;
            let Some(req) = next.take() else { break };
            let (lease, target, stats) = loop {
                if !self.some_target().await {
                    return error(StatusCode::SERVICE_UNAVAILABLE, "no worker is ready\n");
                }
                if queued.barging() {
                    queued.wait(self.cfg.connect_timeout).await;
                }
                let picked = {
                    let pool = self.up.peek();
                    let key = hash_key(key_source, req.headers(), peer);
                    let split = hash_key(pool.split_source(), req.headers(), peer);
                    let ctx = Ctx {
                        now: self.up.now(),
                        rand: fastrand::u64(..),
                        key: key.as_ref().map(|k| k.as_slice()),
                    };
                    pool.pick(&ctx, avoid.as_deref(), split.as_ref().map(|k| k.as_slice()))
                };
                match picked {
                    // Back to the worker that just failed, as the only one left.
                    Ok(p)
                        if crate::upstream::Upstreams::came_back(&avoid, p.lease.backend())
                            && self.up.replaced(avoid.as_deref(), &mut replace_by).await =>
                    {
                        avoid = None;
                    }
                    Ok(p) => {
                        queued.served();
                        break (p.lease, p.target, p.stats);
                    }
                    Err(PickError::Full) if queued.wait(self.cfg.connect_timeout).await => {}
                    Err(PickError::Full) => {
                        super::Told::all_full(self.cfg.connect_timeout, "answering 503");
                        return error(StatusCode::SERVICE_UNAVAILABLE, super::ALL_FULL);
                    }
                    Err(_) if self.up.replaced(avoid.as_deref(), &mut replace_by).await => {
                        avoid = None;
                    }
                    Err(_) if avoid.is_some() => {
                        return error(last.0, last.1);
                    }
                    Err(_) => {
                        super::Told::none_available();
                        return error(StatusCode::SERVICE_UNAVAILABLE, "no healthy backend\n");
                    }
                }
            };
            let started = self.up.now();
            let outcome = self.send(&target, req, upgrade, replay.is_some()).await;
            let now = self.up.now();
            // As the HTTP/1.1 path counts: per backend, and per version
            // during a deploy.
            let record = |status: u16| {
                let micros = now.saturating_sub(started) / 1000;
                if let Some(s) = &stats {
                    s.record(status, micros);
                }
                target.answers.record(status, micros);
            };
            match outcome {
                Sent::Answer(mut resp, sender) => {
                    lease.success(now);
                    target.count_served();
                    served.upstream_time = Some(Duration::from_nanos(now.saturating_sub(started)));
                    served.target = Some(target.clone());
                    record(resp.status().as_u16());
                    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
                    let status = resp.status();
                    fix_length(status, resp.headers_mut());
                    // herd's own version, not the backend's (RFC 9110, 6.2);
                    // hyper answers an HTTP/1.0 client as such by itself.
                    *resp.version_mut() = Version::HTTP_11;
                    strip_hop_by_hop(resp.headers_mut(), switching);
                    if switching {
                        if let Some(client) = client_upgrade {
                            let backend = hyper::upgrade::on(&mut resp);
                            tokio::spawn(tunnel(client, backend, lease, target.clone()));
                        }
                        return resp.map(|_| RespBody::Full(None));
                    }
                    return resp.map(|inner| RespBody::Backend {
                        inner,
                        lease: Some(lease),
                        back: sender,
                        target,
                    });
                }
                Sent::Shortage => {
                    return error(StatusCode::SERVICE_UNAVAILABLE, super::SHORTAGE);
                }
                // Only a replayable request is given up this way; the
                // worker is out by health already, so nothing is counted.
                Sent::Stuck => {
                    super::Told::Failed.warn(&target.label, &super::STUCK_WHY);
                    last = (StatusCode::BAD_GATEWAY, "backend failed\n");
                    record(last.0.as_u16());
                    let Some(head) = &replay else {
                        return error(last.0, last.1);
                    };
                    avoid = Some(lease.backend().clone());
                    next = Some(Request::from_parts(clone_head(head), ReqBody::Empty));
                }
                Sent::Unsent(req, why) => {
                    // Nothing reached the backend: any request may go elsewhere.
                    last = (StatusCode::BAD_GATEWAY, "could not connect to a backend\n");
                    super::backend_failed(&self.up, &lease, &target.label, &why);
                    avoid = Some(lease.backend().clone());
                    next = Some(req);
                }
                Sent::Failed(why, timed_out) => {
                    if upload
                        .as_ref()
                        .is_some_and(|u| u.too_large.load(Ordering::Relaxed))
                    {
                        return too_large(version);
                    }
                    // (A stalled body was already answered 408 by the guard.)
                    if upload
                        .as_ref()
                        .is_some_and(|u| u.failed.load(Ordering::Relaxed))
                    {
                        return error(StatusCode::BAD_REQUEST, "bad request body\n");
                    }
                    super::backend_failed(&self.up, &lease, &target.label, &why);
                    last = if timed_out {
                        (
                            StatusCode::GATEWAY_TIMEOUT,
                            "backend did not answer in time\n",
                        )
                    } else {
                        (StatusCode::BAD_GATEWAY, "backend failed\n")
                    };
                    record(last.0.as_u16());
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

    /// Awaits a backend's answer head for at most `--response-timeout`.
    /// With `stuck` (a request that may be sent again, on a plain
    /// connection to a worker from `ours`), it looks each second whether
    /// health checks took the worker out as stopped or stuck and the
    /// worker has not read the request: then [`Sent::Stuck`], as herd's own
    /// engine does (`h1::unless_stuck`). One timer either way until then.
    async fn head_within<T>(
        &self,
        sending: impl Future<Output = T>,
        stuck: Option<(&Target, Ours)>,
    ) -> Result<T, Sent> {
        let until = tokio::time::Instant::now() + self.cfg.response_timeout;
        let timed_out = || {
            Sent::Failed(
                format!("no response within {:?}", self.cfg.response_timeout),
                true,
            )
        };
        let Some((target, ours)) = stuck.filter(|(t, _)| t.pid.is_some()) else {
            return tokio::time::timeout_at(until, sending)
                .await
                .map_err(|_| timed_out());
        };
        tokio::pin!(sending);
        loop {
            let look = (tokio::time::Instant::now() + super::STUCK_LOOK_EVERY).min(until);
            if let Ok(v) = tokio::time::timeout_at(look, &mut sending).await {
                return Ok(v);
            }
            if look >= until {
                return Err(timed_out());
            }
            if target.is_stuck() {
                return match crate::os::diag::end_of(ours, target.addr) {
                    Ok(Some(e)) if !e.accepted || e.unread > 0 => Err(Sent::Stuck),
                    // Read (or not known): it waits, as in nginx.
                    _ => tokio::time::timeout_at(until, sending)
                        .await
                        .map_err(|_| timed_out()),
                };
            }
        }
    }

    /// To an h2c backend: on this thread's connection to it, or a new one
    /// (once more if the pooled one turns out closed).
    async fn send_h2(&self, target: &Arc<Target>, mut req: Request<ReqBody>) -> Sent {
        to_h2(&mut req, target);
        let mut fresh = false;
        let mut pooled = H2.with(|m| m.borrow().get(&target.id).cloned());
        loop {
            let mut sender = match pooled.take() {
                Some(s) if !s.is_closed() => s,
                _ => {
                    fresh = true;
                    match connect_h2(target, self.cfg.connect_timeout, &self.client_tls).await {
                        Ok(s) => s,
                        Err(e) if e.shortage(target) => return Sent::Shortage,
                        Err(e) => return Sent::Unsent(req, e.to_string()),
                    }
                }
            };
            if let Err(e) = sender.ready().await {
                if fresh {
                    return Sent::Unsent(req, e.to_string());
                }
                continue;
            }
            let sending = sender.try_send_request(req);
            H2.with(|m| m.borrow_mut().insert(target.id, sender));
            let res = match self.head_within(sending, None).await {
                Ok(r) => r,
                Err(timed_out) => return timed_out,
            };
            match res {
                Ok(mut resp) => {
                    // What the client's hyper server writes (HTTP/2 ignores it).
                    *resp.version_mut() = Version::HTTP_11;
                    return Sent::Answer(resp, None);
                }
                Err(e) => match unsent_or_failed(e, !fresh) {
                    Next::Again(back) => req = back,
                    Next::Give(outcome) => return outcome,
                },
            }
        }
    }

    /// `replayable`: the request may be sent twice (see [`Sent::Stuck`]).
    async fn send(
        &self,
        target: &Arc<Target>,
        mut req: Request<ReqBody>,
        upgrade: bool,
        replayable: bool,
    ) -> Sent {
        if target.h2 {
            if upgrade {
                return Sent::Failed("an upgrade cannot go to an HTTP/2 backend".into(), false);
            }
            return self.send_h2(target, req).await;
        }
        // A pooled connection the backend has meanwhile closed gives the
        // request back unsent; then one fresh connection is tried.
        let mut pooled = if upgrade { None } else { take(target.id) };
        loop {
            let from_pool = pooled.is_some();
            let (mut sender, fresh) = match pooled.take() {
                Some(s) => (s, None),
                None => match connect(target, &self.cfg, upgrade, &self.client_tls).await {
                    Ok((s, ours)) => {
                        if !upgrade && !target.reuse.keeps(super::deadline::now()) {
                            // As herd's own engine does (`head::add_close`).
                            req.headers_mut()
                                .insert(header::CONNECTION, HeaderValue::from_static("close"));
                        }
                        (s, ours.map(|o| (&**target, o)))
                    }
                    Err(e) if e.shortage(target) => return Sent::Shortage,
                    Err(e) => return Sent::Unsent(req, e.to_string()),
                },
            };
            sender.head_seen(false);
            let stuck = sender.ours.filter(|_| replayable).map(|o| (&**target, o));
            let sending = accept_checked(sender.try_send_request(req), fresh);
            let res = match self.head_within(sending, stuck).await {
                Ok(r) => r,
                Err(timed_out) => return timed_out,
            };
            sender.head_seen(true);
            match res {
                // A switch nobody asked for would hand the client's
                // connection to whatever the backend speaks next: a 502, as
                // herd's own engine answers (`head::response`).
                Ok(resp) if resp.status() == StatusCode::SWITCHING_PROTOCOLS && !upgrade => {
                    return Sent::Failed(
                        "switched protocols (101) though the request asked for no upgrade".into(),
                        false,
                    );
                }
                Ok(resp) => {
                    let reusable = !upgrade && resp.status() != StatusCode::SWITCHING_PROTOCOLS;
                    if resp.body().is_end_stream() && reusable {
                        put(target, sender);
                        return Sent::Answer(resp, None);
                    }
                    return Sent::Answer(resp, reusable.then_some(sender));
                }
                Err(e) => match unsent_or_failed(e, from_pool) {
                    Next::Again(back) => req = back,
                    Next::Give(outcome) => return outcome,
                },
            }
        }
    }
}

/// Awaits `fut`, an answer on a connection just opened (`fresh`: the target
/// and the connection's local end), and asks the kernel whether the backend
/// accepted it if that takes a moment, as herd's own engine does (see
/// [`super::conns::check_accepted`]).
async fn accept_checked<T>(fut: impl Future<Output = T>, fresh: Option<(&Target, Ours)>) -> T {
    let Some((target, ours)) = fresh.filter(|(t, _)| super::conns::looked_at(t)) else {
        return fut.await;
    };
    tokio::pin!(fut);
    for _ in 0..super::conns::ACCEPT_CHECKS {
        tokio::select! {
            v = &mut fut => return v,
            _ = tokio::time::sleep(super::conns::ACCEPT_CHECK_AFTER) => {}
        }
        if !super::conns::check_accepted(target, || crate::os::diag::end_of(ours, target.addr)) {
            break;
        }
    }
    fut.await
}

/// What a hyper-served exchange reports when its answer's body is dropped
/// (sent whole, or its stream or connection ended) or, unanswered, when
/// the request is: the answer's bytes to its backend's counts and, with
/// `--access-log`, its line, timed to the end as herd's engine does.
pub(super) struct Ending {
    line: Option<Box<Line>>,
    served: Served,
    /// 499 until the answer's head is known.
    status: u16,
    /// Body bytes handed to hyper for the client.
    sent: u64,
}

impl Drop for Ending {
    fn drop(&mut self) {
        let t = self.served.target.as_ref();
        if let Some(t) = t {
            t.answers
                .bytes_to_client
                .fetch_add(self.sent, std::sync::atomic::Ordering::Relaxed);
            if let Some(u) = &self.served.upload {
                let up = u.bytes.load(Ordering::Relaxed);
                t.answers.bytes_to_backend.fetch_add(up, Ordering::Relaxed);
            }
        }
        let Some(l) = &self.line else { return };
        l.log.write(&super::access::Entry {
            at: l.at,
            client: l.client,
            method: l.method.as_str(),
            path: &l.path,
            protocol: l.protocol,
            status: self.status,
            bytes: self.sent,
            duration: l.started.elapsed(),
            upstream: t.map(|t| t.place()),
            upstream_time: self.served.upstream_time,
            worker: t.map(|t| t.backend.name()),
            retries: self.served.retries,
            referer: l.referer.as_deref(),
            user_agent: l.user_agent.as_deref(),
        });
    }
}

/// What the access log needs of a request, copied before it goes on.
struct Line {
    log: Arc<super::access::AccessLog>,
    at: std::time::SystemTime,
    started: std::time::Instant,
    client: IpAddr,
    method: Method,
    path: String,
    protocol: &'static str,
    referer: Option<String>,
    user_agent: Option<String>,
}

impl Line {
    fn of(req: &Request<Incoming>, log: &Arc<super::access::AccessLog>, client: IpAddr) -> Line {
        let text = |n: header::HeaderName| {
            let v = req.headers().get(n)?;
            v.to_str().ok().map(str::to_string)
        };
        Line {
            log: log.clone(),
            at: std::time::SystemTime::now(),
            started: std::time::Instant::now(),
            client,
            method: req.method().clone(),
            path: req
                .uri()
                .path_and_query()
                .map_or_else(|| "/".to_string(), |p| p.as_str().to_string()),
            protocol: match req.version() {
                Version::HTTP_2 => "HTTP/2.0",
                Version::HTTP_10 => "HTTP/1.0",
                _ => "HTTP/1.1",
            },
            referer: text(header::REFERER),
            user_agent: text(header::USER_AGENT),
        }
    }
}

/// For the access log: the backend that answered, when, after how many retries.
#[derive(Default)]
struct Served {
    target: Option<Arc<Target>>,
    upstream_time: Option<Duration>,
    retries: u32,
    /// The request body, if it has one.
    upload: Option<Arc<Upload>>,
}

/// What follows a send that failed.
enum Next {
    /// It never left, and one more try on a fresh connection is allowed.
    Again(Request<ReqBody>),
    Give(Sent),
}

/// A failed send: `retry` allows one more try of a request that never left.
fn unsent_or_failed(
    mut e: hyper::client::conn::TrySendError<Request<ReqBody>>,
    retry: bool,
) -> Next {
    match e.take_message() {
        Some(back) if retry => Next::Again(back),
        Some(back) => Next::Give(Sent::Unsent(back, said(&e.into_error()))),
        None => {
            let err = e.into_error();
            Next::Give(Sent::Failed(said(&err), err.is_timeout()))
        }
    }
}

/// hyper's error with its cause, for the log: `connection error: Connection
/// reset by peer (os error 104)`, not `connection error` alone.
fn said(e: &hyper::Error) -> String {
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

enum Sent {
    /// Response headers arrived; the sender goes back to the pool when the
    /// body ends (`None`: it already went back, or cannot be reused).
    Answer(Response<Incoming>, Option<Sender>),
    /// The request never left: safe to send elsewhere.
    Unsent(Request<ReqBody>, String),
    /// herd could not open a connection ([`super::own_shortage`]).
    Shortage,
    /// Sent, then failed (reset, malformed response, timeout).
    Failed(String, bool),
    /// Sent to a worker that health checks then took out as stopped or
    /// stuck, which has not read it: it may go to another.
    Stuck,
}

async fn tunnel(
    client: hyper::upgrade::OnUpgrade,
    backend: hyper::upgrade::OnUpgrade,
    lease: crate::upstream::Held,
    target: Arc<Target>,
) {
    if let (Ok(c), Ok(b)) = (client.await, backend.await)
        && let Ok((to_backend, to_client)) =
            super::tunnel::relay_io(TokioIo::new(c), TokioIo::new(b)).await
    {
        let a = &target.answers;
        a.bytes_to_backend.fetch_add(to_backend, Ordering::Relaxed);
        a.bytes_to_client.fetch_add(to_client, Ordering::Relaxed);
    }
    drop(lease); // Counted as in flight for as long as the tunnel lasts.
}

/// Reads and drops the rest of a refused body for a while (nginx's
/// lingering close), so the client, still sending, reads its 413 rather
/// than a reset.
async fn discard(mut body: Incoming) {
    use http_body_util::BodyExt;
    let _ = tokio::time::timeout(super::h1::LINGER, async {
        while let Some(Ok(_)) = body.frame().await {}
    })
    .await;
}

/// Reads a client's body whole, waiting at most `idle` for each frame
/// (then 408, as for a stalled upload); its trailers are kept.
async fn read_whole(
    mut body: Incoming,
    idle: Duration,
    version: Version,
) -> Result<(Bytes, Option<HeaderMap>), Response<RespBody>> {
    let mut data = bytes::BytesMut::new();
    let mut trailers = None;
    loop {
        match tokio::time::timeout(idle, http_body_util::BodyExt::frame(&mut body)).await {
            Ok(None) => return Ok((data.freeze(), trailers)),
            Ok(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => trailers = frame.into_trailers().ok(),
            },
            Ok(Some(Err(_))) => {
                return Err(closing(
                    StatusCode::BAD_REQUEST,
                    "bad request body\n",
                    version,
                ));
            }
            Err(_) => {
                return Err(closing(
                    StatusCode::REQUEST_TIMEOUT,
                    "request timeout\n",
                    version,
                ));
            }
        }
    }
}

/// An error answer that also closes an HTTP/1 connection (an HTTP/2 one
/// keeps its other streams).
fn closing(status: StatusCode, body: &'static str, version: Version) -> Response<RespBody> {
    let mut r = error(status, body);
    if version != Version::HTTP_2 {
        r.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    r
}

/// `--max-body-size`'s 413; an HTTP/1.1 client's connection closes after it.
fn too_large(version: Version) -> Response<RespBody> {
    closing(
        StatusCode::PAYLOAD_TOO_LARGE,
        "request body too large\n",
        version,
    )
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

/// What herd's own engine refuses in a request and hyper's parser lets
/// through: an HTTP/1.1 request without `Host`, and two or an invalid one
/// (RFC 9112, 3.2). (hyper refuses obfuscated codings, duplicate lengths and
/// bad chunks itself; `Transfer-Encoding` beside `Content-Length` it frames
/// by the chunks and then closes.) Also an HTTP/2 request whose `Host`
/// differs from its `:authority` (RFC 9113, 8.3.1: malformed): the backend
/// would route by a host other than the one the request names (and a
/// cache or the TLS name in front saw).
fn refused_h1<B>(req: &Request<B>) -> Option<&'static str> {
    let mut hosts = req.headers().get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (None, _) if req.version() == Version::HTTP_11 => Some("missing Host header\n"),
        (Some(_), Some(_)) => Some("more than one Host header\n"),
        (Some(h), None) if !head::valid_host(h.as_bytes()) => Some("invalid Host header\n"),
        (Some(h), None)
            if req.version() == Version::HTTP_2
                && req
                    .uri()
                    .authority()
                    .is_some_and(|a| !a.as_str().as_bytes().eq_ignore_ascii_case(h.as_bytes())) =>
        {
            Some("Host header differs from :authority\n")
        }
        _ => None,
    }
}

/// An HTTP/1.1 upgrade herd relays: not to HTTP/2 (see `head::is_h2_upgrade`).
fn is_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get_all(header::UPGRADE)
            .iter()
            .any(|v| head::tokens(v.as_bytes()).any(|t| !head::is_h2_upgrade(t)))
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

const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    HeaderName::from_static("http2-settings"),
];

/// Leaves the answer's `Content-Length` true of what the client gets, as
/// herd's own engine writes it (`head::response`): none beside a
/// `Transfer-Encoding`, which frames the body instead (RFC 9112, 6.3), or on
/// a 1xx or 204, which has no body (RFC 9110, 8.6), and repeats of one
/// length (hyper's client took them only if they agree) as one. hyper would
/// pass them on as they are: a client then waits for a body that never
/// comes, or, over HTTP/2, resets the stream.
fn fix_length(status: StatusCode, h: &mut HeaderMap) {
    let mut values = h.get_all(header::CONTENT_LENGTH).iter();
    let Some(first) = values.next() else {
        return;
    };
    if h.contains_key(header::TRANSFER_ENCODING)
        || status == StatusCode::NO_CONTENT
        || status.is_informational()
    {
        h.remove(header::CONTENT_LENGTH);
    } else if values.next().is_some() || first.as_bytes().contains(&b',') {
        let one = first
            .as_bytes()
            .split(|&b| b == b',')
            .next()
            .map(head::trim)
            .and_then(|v| HeaderValue::from_bytes(v).ok());
        h.remove(header::CONTENT_LENGTH);
        if let Some(v) = one {
            h.insert(header::CONTENT_LENGTH, v);
        }
    }
}

/// Removes headers meant for one hop only, including those the sender
/// listed in `Connection`; an upgrade keeps `Connection: upgrade` and `Upgrade`.
fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) {
    if h.contains_key(header::CONNECTION) {
        strip_listed(h);
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        if h.get_all(header::UPGRADE)
            .iter()
            .any(|v| head::tokens(v.as_bytes()).any(head::is_h2_upgrade))
        {
            let kept: Vec<HeaderValue> = h
                .get_all(header::UPGRADE)
                .iter()
                .map(|v| head::upgrade_protocols(v.as_bytes()))
                .filter(|v| !v.is_empty())
                .filter_map(|v| HeaderValue::from_bytes(&v).ok())
                .collect();
            h.remove(header::UPGRADE);
            for v in kept {
                h.append(header::UPGRADE, v);
            }
        }
    } else {
        h.remove(header::UPGRADE);
    }
}

/// Removes the headers named in `Connection` (it allocates, so only when
/// there is one).
fn strip_listed(h: &mut HeaderMap) {
    let listed: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for name in listed {
        // As herd's own engine: `Connection: host` keeps the `Host`.
        if head::listable(name.as_str()) {
            h.remove(&name);
        }
    }
}

/// Turns the client's request head into the one sent to a backend.
fn prepare_request_head(
    parts: &mut hyper::http::request::Parts,
    peer: IpAddr,
    local: Option<SocketAddr>,
    upgrade: bool,
    via: &Via,
) {
    // h2 clients give the host as :authority; HTTP/1.1 backends want Host.
    // An HTTP/1.1 request in absolute form names its host in the target,
    // which wins over its Host header (RFC 9112, 3.2.2), as in herd's engine.
    if let Some(a) = parts.uri.authority()
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
    strip_underscore_aliases(&mut parts.headers);
    add_forwarding(&mut parts.headers, peer, matches!(via, Via::Tls(_)));
    // Only herd, the TLS edge, says which certificate a client presented.
    if let Via::Tls(cert) = via {
        parts.headers.remove(&CLIENT_CERT);
        parts.headers.remove(&CLIENT_CERT_CHAIN);
        if let Some(v) = cert {
            parts.headers.insert(CLIENT_CERT, v.clone());
        }
    }
    // None at all (HTTP/1.0 allows that; HTTP/1.1 does not): the address
    // the client reached, as in herd's engine (`head::add_host`); not a
    // forwarded host, since the client named none.
    if !parts.headers.contains_key(header::HOST)
        && let Some(v) = local.and_then(|a| HeaderValue::from_str(&a.to_string()).ok())
    {
        parts.headers.insert(header::HOST, v);
    }
}

/// Drops `content_length`, `x_forwarded_for` and the like, as the HTTP/1.1
/// path does (see `head::underscore_alias`); allocates only when one is there.
fn strip_underscore_aliases(h: &mut HeaderMap) {
    let alias = |k: &HeaderName| head::underscore_alias(k.as_str());
    if h.keys().any(alias) {
        let names: Vec<HeaderName> = h.keys().filter(|k| alias(k)).cloned().collect();
        for name in names {
            h.remove(&name);
        }
    }
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const CLIENT_CERT: HeaderName = HeaderName::from_static("client-cert");
const CLIENT_CERT_CHAIN: HeaderName = HeaderName::from_static("client-cert-chain");

/// `X-Forwarded-For` and `Forwarded` get this hop appended; an
/// `X-Forwarded-Proto`/`-Host` set by a proxy in front is kept, except
/// that herd's own TLS listener says `https` (it is the edge). Each value
/// is written once into a buffer the header then owns (no copy).
fn add_forwarding(h: &mut HeaderMap, peer: IpAddr, tls: bool) {
    use std::fmt::Write;
    let ip = peer.to_canonical();
    let mut xff = String::with_capacity(48);
    if let Some(prev) = h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        xff.push_str(prev);
        xff.push_str(", ");
    }
    let _ = write!(xff, "{ip}");
    if let Ok(v) = HeaderValue::from_maybe_shared(bytes::Bytes::from(xff)) {
        h.insert(X_FORWARDED_FOR, v);
    }
    if tls {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("https"));
    } else if !h.contains_key(&X_FORWARDED_PROTO) {
        h.insert(X_FORWARDED_PROTO, HeaderValue::from_static("http"));
    }
    let proto = if tls { "https" } else { "http" };
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
        write!(fwd, "for=\"[{ip}]\";proto={proto}")
    } else {
        write!(fwd, "for={ip};proto={proto}")
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

fn hash_key<'a>(src: &KeySource, h: &'a HeaderMap, peer: IpAddr) -> Option<Key<'a>> {
    match src {
        KeySource::None | KeySource::Sni => None,
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

thread_local! {
    /// This thread's idle hyper client connections, by target id.
    static IDLE: RefCell<IdleMap<Sender>> = const { RefCell::new(IdleMap::new()) };
    /// This thread's HTTP/2 connection to each h2c backend (multiplexed:
    /// shared by its requests, replaced once closed).
    static H2: RefCell<std::collections::HashMap<u64, H2Sender>> =
        RefCell::new(std::collections::HashMap::new());
}

type H2Sender = hyper::client::conn::http2::SendRequest<ReqBody>;

/// Closes this thread's hyper client connections idle too long (the tick,
/// with [`super::conns::sweep`]), and forgets HTTP/2 connections that closed.
/// Closes this thread's idle hyper connections to targets no longer kept.
pub fn release(now: std::time::Instant) {
    IDLE.with(|m| m.borrow_mut().release(now));
}

pub fn sweep() {
    thread_local! {
        static GENERATION: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
    }
    let now = super::deadline::now();
    let generation = TLS_GENERATION.load(Ordering::Relaxed);
    if GENERATION.with(|g| g.replace(generation)) != generation {
        // Upstreams' revocation lists changed: no connection checked
        // under the old ones is used again (streams under way finish).
        IDLE.with(|m| m.borrow_mut().clear());
        H2.with(|m| m.borrow_mut().clear());
        return;
    }
    IDLE.with(|m| m.borrow_mut().sweep(now));
    H2.with(|m| m.borrow_mut().retain(|_, s| !s.is_closed()));
}

/// The client asked for trailers (`te: trailers`), as gRPC clients do.
#[derive(Clone, Copy)]
struct TeTrailers;

/// An HTTP/1.1-shaped request head made fit for HTTP/2: the host goes to
/// `:authority` (from `Host`, else the backend's address), `te: trailers`
/// is kept when the client sent it.
fn to_h2(req: &mut Request<ReqBody>, target: &Target) {
    let authority = req
        .headers_mut()
        .remove(header::HOST)
        .and_then(|h| h.to_str().ok().map(str::to_string))
        .unwrap_or_else(|| match target.unix {
            Some(_) => "localhost".to_string(),
            None => target.addr.to_string(),
        });
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    if let Ok(uri) = Uri::builder()
        .scheme("http")
        .authority(authority.as_str())
        .path_and_query(path)
        .build()
    {
        *req.uri_mut() = uri;
    }
    *req.version_mut() = Version::HTTP_2;
    if req.extensions().get::<TeTrailers>().is_some() {
        req.headers_mut()
            .insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// Opens an HTTP/2 connection to `target` (h2c, or h2 over TLS).
async fn connect_h2(
    target: &Target,
    timeout: Duration,
    tls: &ClientTls,
) -> Result<H2Sender, ConnectError> {
    let stream = open(target, timeout, tls).await?;
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .handshake::<_, ReqBody>(TokioIo::new(stream))
        .await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// A pooled connection ready for a request, if one is.
fn take(target: u64) -> Option<Sender> {
    IDLE.with(|m| {
        m.borrow_mut().take(target, super::deadline::now(), |s| {
            // Ready unless closed or its last response is still being wound up.
            let waker = std::task::Waker::noop();
            !s.is_closed()
                && matches!(
                    s.poll_ready(&mut Context::from_waker(waker)),
                    Poll::Ready(Ok(()))
                )
        })
    })
}

fn put(target: &Target, s: Sender) {
    if !s.is_closed() {
        let now = super::deadline::now();
        IDLE.with(|m| m.borrow_mut().put(target.id, &target.reuse, s, now));
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("connect failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("handshake failed: {0}")]
    Handshake(#[from] hyper::Error),
}

impl ConnectError {
    /// herd's own shortage, not `target`'s failure ([`super::own_shortage`]).
    fn shortage(&self, target: &Target) -> bool {
        matches!(self, ConnectError::Io(e) if super::own_shortage(&target.label, e))
    }
}

/// A connection to a backend: plain, or TLS for one marked `tls`.
struct Wire {
    io: WireIo,
    /// HTTP/1 (whose servers may write an answer in pieces under Nagle's
    /// algorithm), not HTTP/2.
    http1: bool,
    /// This backend has sent an answer in pieces: see `poll_read`.
    in_pieces: bool,
    /// When the last read since herd last wrote brought bytes (looked at
    /// until `in_pieces`).
    read_at: Option<std::time::Instant>,
    /// A small read brought part of an answer since herd last wrote.
    answering: bool,
    /// HTTP/1 through hyper: what came before the answer's head.
    head: Option<Arc<HeadWatch>>,
}

/// Two reads of one answer this far apart, with no write between, mean
/// the backend sent it in pieces (a delayed ACK holds one for 40 ms).
const PIECE_GAP: Duration = Duration::from_millis(20);

enum WireIo {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(tokio::net::UnixStream),
}

impl Wire {
    fn new(io: WireIo, target: &Target) -> Wire {
        Wire {
            io,
            http1: !target.h2,
            in_pieces: false,
            read_at: None,
            answering: false,
            head: None,
        }
    }

    /// herd's end, for the socket-table looks (`os::diag`).
    fn ours(&self) -> Option<Ours> {
        match &self.io {
            WireIo::Unix(s) => {
                use std::os::fd::AsFd;
                crate::os::diag::inode(s.as_fd()).ok().map(Ours::Unix)
            }
            _ => self.tcp()?.local_addr().ok().map(Ours::Tcp),
        }
    }

    fn tcp(&self) -> Option<&TcpStream> {
        match &self.io {
            WireIo::Plain(s) => Some(s),
            WireIo::Tls(s) => Some(s.get_ref().0),
            WireIo::Unix(_) => None,
        }
    }
}

impl AsyncRead for Wire {
    /// A backend that writes an answer's head and body apart under Nagle's
    /// algorithm (Java's `HttpServer`, Perl's `HTTP::Daemon`) holds the body
    /// until herd acknowledges the head, which the kernel delays by 40 ms
    /// on a keep-alive connection. herd's own HTTP/1.1 engine knows when an
    /// answer is unfinished and acknowledges at once (`TCP_QUICKACK`); hyper
    /// does not say, and it reads again after every answer (to notice a
    /// close), so acknowledging whenever a small read is followed by nothing
    /// would cost a syscall per answer (5% more CPU, measured). Instead a
    /// connection learns: once two reads with no write between came
    /// [`PIECE_GAP`] apart, every small read (under
    /// [`super::h1::QUICKACK_BELOW`]) followed by nothing is acknowledged
    /// at once. Such a backend's first answer in pieces on each connection
    /// still waits.
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = self.get_mut();
        let before = buf.filled().len();
        let r = match &mut me.io {
            WireIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            WireIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            WireIo::Unix(s) => Pin::new(s).poll_read(cx, buf),
        };
        if let (Poll::Ready(Ok(())), Some(h)) = (&r, &me.head)
            && !h.seen.load(Ordering::Relaxed)
        {
            let n = buf.filled().len() - before;
            if h.bytes.fetch_add(n, Ordering::Relaxed) + n > BEFORE_HEAD {
                let e =
                    "sent 512 KiB with no final answer head (interim (1xx) answers without end)";
                return Poll::Ready(Err(std::io::Error::other(e)));
            }
        }
        match &r {
            Poll::Ready(Ok(())) if me.http1 => {
                let n = buf.filled().len() - before;
                if n > 0 && !me.in_pieces {
                    let now = std::time::Instant::now();
                    me.in_pieces = me.read_at.is_some_and(|t| now - t >= PIECE_GAP);
                    me.read_at = Some(now);
                }
                me.answering = me.in_pieces && n > 0 && n < super::h1::QUICKACK_BELOW;
            }
            Poll::Pending if me.answering => {
                me.answering = false;
                if let Some(s) = me.tcp() {
                    let _ = socket2::SockRef::from(s).set_tcp_quickack(true);
                }
            }
            _ => {}
        }
        r
    }
}

impl AsyncWrite for Wire {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let me = self.get_mut();
        me.answering = false;
        me.read_at = None;
        match &mut me.io {
            WireIo::Plain(s) => Pin::new(s).poll_write(cx, data),
            WireIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
            WireIo::Unix(s) => Pin::new(s).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            WireIo::Plain(s) => Pin::new(s).poll_flush(cx),
            WireIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            WireIo::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match &mut self.get_mut().io {
            WireIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            WireIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            WireIo::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// Connects to `target`, with TLS if it is marked `tls` (ALPN: `h2` for
/// an h2 backend, else `http/1.1`).
async fn open(target: &Target, timeout: Duration, tls: &ClientTls) -> Result<Wire, ConnectError> {
    let work = async {
        if let Some(path) = &target.unix {
            let s = crate::os::connect_unix(path, &mut false).await?;
            return Ok(Wire::new(WireIo::Unix(s), target));
        }
        let stream = TcpStream::connect(target.addr).await?;
        let _ = stream.set_nodelay(true);
        let Some(name) = &target.tls else {
            return Ok(Wire::new(WireIo::Plain(stream), target));
        };
        let cfg = tls.config(target.h2);
        let name = rustls::pki_types::ServerName::try_from(name.clone())
            .map_err(|e| std::io::Error::other(format!("TLS name {name:?}: {e}")))?;
        let s = tokio_rustls::TlsConnector::from(cfg)
            .connect(name, stream)
            .await?;
        Ok(Wire::new(WireIo::Tls(Box::new(s)), target))
    };
    tokio::time::timeout(timeout, work)
        .await
        .map_err(|_| ConnectError::Timeout(timeout))?
}

/// The TLS client settings for backends marked `tls`: the roots their
/// certificates must chain to (`--upstream-ca`, else the system's), the
/// revocation lists they are checked against (`--upstream-crl`), the
/// certificate herd shows those that ask for one (`--upstream-cert`), and
/// ALPN for each protocol. Lists expire and are replaced, so a change of
/// their file is loaded while herd runs ([`ClientTls::reload`]).
pub struct ClientTls {
    made: arc_swap::ArcSwap<Made>,
    files: std::sync::Mutex<ClientTlsFiles>,
    crl_stamp: std::sync::Mutex<Option<(std::time::SystemTime, u64)>>,
}

/// What [`ClientTls`] is made from.
#[derive(Debug, Clone, Default)]
pub struct ClientTlsFiles {
    pub ca: Option<std::path::PathBuf>,
    /// Load the system's roots (only when some backend is `tls` and no
    /// `--upstream-ca` is given).
    pub system: bool,
    pub client: Option<crate::config::TlsPair>,
    pub crl: Option<std::path::PathBuf>,
}

struct Made {
    h1: Arc<rustls::ClientConfig>,
    h2: Arc<rustls::ClientConfig>,
}

/// Bumped by each reload of a [`ClientTls`]: proxy threads then drop their
/// pooled backend connections, which were checked under the old lists.
static TLS_GENERATION: AtomicU64 = AtomicU64::new(0);

impl ClientTls {
    pub fn new(files: ClientTlsFiles) -> Result<ClientTls, String> {
        let crl_stamp = files.crl.as_deref().and_then(super::tls::stamp);
        let made = Self::make(&files)?;
        Ok(ClientTls {
            made: arc_swap::ArcSwap::from_pointee(made),
            files: std::sync::Mutex::new(files),
            crl_stamp: std::sync::Mutex::new(crl_stamp),
        })
    }

    fn files(&self) -> ClientTlsFiles {
        self.files
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    pub fn has_crl(&self) -> bool {
        self.files().crl.is_some()
    }

    /// A `tls` upstream came by a reload: without `--upstream-ca`, the
    /// system's roots are loaded now if they were not at start.
    pub fn trust_system_roots(&self) -> Result<(), String> {
        let mut files = self.files();
        if files.system || files.ca.is_some() {
            return Ok(());
        }
        files.system = true;
        self.made.store(Arc::new(Self::make(&files)?));
        if let Ok(mut f) = self.files.lock() {
            *f = files;
        }
        Ok(())
    }

    /// Whether `--upstream-crl`'s file changed (time or size) since it was
    /// last read.
    pub fn changed(&self) -> bool {
        let Some(path) = self.files().crl else {
            return false;
        };
        let now = super::tls::stamp(&path);
        self.crl_stamp.lock().map(|s| *s != now).unwrap_or(false)
    }

    /// Reads the files again. On an error the settings in use stay, and the
    /// file is not read again until it changes once more. On success new
    /// connections are checked under the new lists, and each proxy thread
    /// closes its idle pooled ones on its next tick.
    pub fn reload(&self) -> Result<(), String> {
        let files = self.files();
        if let Ok(mut s) = self.crl_stamp.lock() {
            *s = files.crl.as_deref().and_then(super::tls::stamp);
        }
        self.made.store(Arc::new(Self::make(&files)?));
        TLS_GENERATION.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    fn config(&self, h2: bool) -> Arc<rustls::ClientConfig> {
        let made = self.made.load();
        if h2 { &made.h2 } else { &made.h1 }.clone()
    }

    fn make(f: &ClientTlsFiles) -> Result<Made, String> {
        let mut roots = rustls::RootCertStore::empty();
        match &f.ca {
            Some(path) => {
                roots = super::tls::load_roots(path)
                    .map_err(|e| format!("--upstream-ca {}: {e}", path.display()))?;
            }
            None if f.system => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
            }
            None => {}
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = match &f.client {
            Some(p) => Some(Arc::new(
                super::tls::load_pair(p, &provider, super::tls::UPSTREAM)
                    .map_err(|e| e.to_string())?,
            )),
            None => None,
        };
        // As nginx's `proxy_ssl_crl` (OpenSSL's checks): every certificate
        // of the chain below the root needs its issuer's list, and an
        // expired list fails every handshake until a fresh one replaces it.
        // (No roots, as when `herd run --check` leaves out the system's:
        // the file is checked, and no upstream could be trusted anyway.)
        let verifier = match &f.crl {
            Some(path) => {
                let crls = super::tls::load_crls(path)
                    .map_err(|e| format!("--upstream-crl {}: {e}", path.display()))?;
                if roots.is_empty() {
                    None
                } else {
                    let v = rustls::client::WebPkiServerVerifier::builder_with_provider(
                        Arc::new(roots.clone()),
                        provider.clone(),
                    )
                    .with_crls(crls)
                    .enforce_revocation_expiration()
                    .build()
                    .map_err(|e| format!("--upstream-crl {}: {e}", path.display()))?;
                    Some(v)
                }
            }
            None => None,
        };
        let make = |alpn: &[u8]| -> Result<Arc<rustls::ClientConfig>, String> {
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())?;
            let builder = match &verifier {
                Some(v) => builder.with_webpki_verifier(v.clone()),
                None => builder.with_root_certificates(roots.clone()),
            };
            let mut c = match &client {
                Some(key) => builder.with_client_cert_resolver(Arc::new(ClientCert(key.clone()))),
                None => builder.with_no_client_auth(),
            };
            c.alpn_protocols = vec![alpn.to_vec()];
            Ok(Arc::new(c))
        };
        Ok(Made {
            h1: make(b"http/1.1")?,
            h2: make(b"h2")?,
        })
    }
}

/// `--upstream-cert`: the one certificate herd shows every upstream that
/// asks for one.
#[derive(Debug)]
struct ClientCert(Arc<rustls::sign::CertifiedKey>);

impl rustls::client::ResolvesClientCert for ClientCert {
    fn resolve(
        &self,
        _hints: &[&[u8]],
        _schemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        Some(self.0.clone())
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// The most hyper buffers of a backend's answer (its default, about
/// 400 KiB, is what a client that stops reading a large answer held).
const BACKEND_BUF: usize = 64 * 1024;

/// Opens an HTTP/1.1 connection to `target`; `upgrades` keeps it usable for
/// a `101 Switching Protocols` tunnel.
async fn connect(
    target: &Target,
    cfg: &crate::config::HttpConfig,
    upgrades: bool,
    tls: &ClientTls,
) -> Result<(Sender, Option<Ours>), ConnectError> {
    // Held by the connection's task: until it closes.
    let slot = super::conns::serial_slot(target, cfg.response_timeout).await;
    let mut stream = open(target, cfg.connect_timeout, tls).await?;
    // Only a worker's connections are looked at (a syscall saved otherwise).
    let ours = target.pid.and_then(|_| stream.ours());
    // (TLS to a worker: its socket's unread bytes are not the request's.)
    let plain = ours.filter(|_| target.tls.is_none());
    let head = Arc::new(HeadWatch::default());
    stream.head = Some(head.clone());
    let (send, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .max_buf_size(BACKEND_BUF)
        .handshake::<_, ReqBody>(TokioIo::new(stream))
        .await?;
    if upgrades {
        tokio::spawn(async move {
            let _ = conn.with_upgrades().await;
            drop(slot);
        });
    } else {
        tokio::spawn(async move {
            let _ = conn.await;
            drop(slot);
        });
    }
    Ok((
        Sender {
            send,
            head,
            ours: plain,
        },
        ours,
    ))
}

/// The body of a request on its way to a backend.
pub enum ReqBody {
    Empty,
    /// Read whole from the client first (`--request-buffer`).
    Whole {
        data: Option<Bytes>,
        trailers: Option<HeaderMap>,
    },
    Client {
        /// `None` once it passed `--max-body-size` (then it is discarded).
        inner: Option<Incoming>,
        upload: Arc<Upload>,
    },
}

/// What became of a client's request body: `failed` is set if reading it
/// fails, so a broken upload is told apart from a broken backend, and
/// `too_large` once it passes `max` (`--max-body-size`); `bytes` counts
/// what went to the backend (its data frames), for its counts.
#[derive(Default)]
pub struct Upload {
    failed: AtomicBool,
    too_large: AtomicBool,
    max: Option<u64>,
    bytes: AtomicU64,
}

impl Body for ReqBody {
    type Data = Bytes;
    /// The client's error, or its body's passing `--max-body-size`: either
    /// way the request to the backend is broken off, never ended early.
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            ReqBody::Empty => Poll::Ready(None),
            ReqBody::Whole { data, trailers } => Poll::Ready(
                data.take()
                    .filter(|d| !d.is_empty())
                    .map(Frame::data)
                    .or_else(|| trailers.take().map(Frame::trailers))
                    .map(Ok),
            ),
            ReqBody::Client { inner, upload } => match inner
                .as_mut()
                .map(|b| Pin::new(b).poll_frame(cx))
                .unwrap_or(Poll::Ready(None))
            {
                Poll::Ready(Some(Err(e))) => {
                    upload.failed.store(true, Ordering::Relaxed);
                    Poll::Ready(Some(Err(e.into())))
                }
                Poll::Ready(Some(Ok(f))) => {
                    if let Some(d) = f.data_ref() {
                        // One poller: a load and an add cannot race.
                        let n = d.len() as u64;
                        let total = upload.bytes.load(Ordering::Relaxed) + n;
                        if upload.max.is_some_and(|max| total > max) {
                            upload.too_large.store(true, Ordering::Relaxed);
                            if let Some(rest) = inner.take() {
                                tokio::spawn(discard(rest));
                            }
                            return Poll::Ready(Some(Err("request body too large".into())));
                        }
                        upload.bytes.store(total, Ordering::Relaxed);
                    }
                    Poll::Ready(Some(Ok(f)))
                }
                other => other.map_err(Into::into),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ReqBody::Empty => true,
            ReqBody::Whole { data, trailers } => {
                data.as_ref().is_none_or(Bytes::is_empty) && trailers.is_none()
            }
            ReqBody::Client { inner, .. } => inner.as_ref().is_none_or(Body::is_end_stream),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ReqBody::Empty => SizeHint::with_exact(0),
            ReqBody::Whole { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
            ReqBody::Client { inner, .. } => inner
                .as_ref()
                .map_or_else(|| SizeHint::with_exact(0), Body::size_hint),
        }
    }
}

/// The body of a response on its way to a client.
pub enum RespBody {
    /// A short answer of herd's own (errors).
    Full(Option<Bytes>),
    /// A backend's body. The lease is held until it ends, so in-flight
    /// counts cover the whole transfer; then the connection goes back to
    /// its pool.
    Backend {
        inner: Incoming,
        lease: Option<crate::upstream::Held>,
        back: Option<Sender>,
        target: Arc<Target>,
    },
}

impl RespBody {
    pub fn text(s: &'static str) -> RespBody {
        RespBody::Full(Some(Bytes::from_static(s.as_bytes())))
    }
}

impl Body for RespBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            RespBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            RespBody::Backend {
                inner,
                lease,
                back,
                target,
            } => {
                let r = Pin::new(&mut *inner).poll_frame(cx);
                match &r {
                    Poll::Ready(None) => {
                        if let Some(s) = back.take() {
                            put(target, s);
                        }
                        lease.take();
                    }
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => {
                        // hyper stops polling once the length is reached.
                        if let Some(s) = back.take() {
                            put(target, s);
                        }
                    }
                    Poll::Ready(Some(Err(e))) => {
                        // Broken mid-body: the connection is not reusable,
                        // and the log says so, as herd's own engine does.
                        back.take();
                        if lease.take().is_some() {
                            let why = format_args!("broke off its answer's body: {e}");
                            super::Told::Cut.warn(&target.label, &why);
                        }
                    }
                    _ => {}
                }
                r
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RespBody::Full(b) => b.is_none(),
            RespBody::Backend { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RespBody::Full(Some(b)) => SizeHint::with_exact(b.len() as u64),
            RespBody::Full(None) => SizeHint::with_exact(0),
            RespBody::Backend { inner, .. } => inner.size_hint(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn underscore_aliases_are_dropped() {
        let mut h = HeaderMap::new();
        h.insert("x_forwarded_for", HeaderValue::from_static("6.6.6.6"));
        h.insert("transfer_encoding", HeaderValue::from_static("chunked"));
        h.insert("my_header", HeaderValue::from_static("kept"));
        strip_underscore_aliases(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["my_header"], "kept");
    }

    #[test]
    fn hosts_are_checked() {
        let with = |hosts: &[&'static str]| {
            let mut b = Request::builder().uri("/");
            for h in hosts {
                b = b.header(header::HOST, *h);
            }
            refused_h1(&b.body(()).unwrap())
        };
        assert_eq!(with(&["a.test:8443"]), None);
        assert!(with(&[]).is_some());
        assert!(with(&["a", "b"]).is_some());
        assert!(with(&["a/b"]).is_some());
        assert!(with(&["a b"]).is_some());
        let h2 = |authority: &str, host: &'static str| {
            let req = Request::builder()
                .version(Version::HTTP_2)
                .uri(format!("https://{authority}/"))
                .header(header::HOST, host)
                .body(())
                .unwrap();
            refused_h1(&req)
        };
        assert_eq!(h2("a.test", "A.test"), None);
        assert!(h2("good.test", "evil.test").is_some());
    }

    #[test]
    fn h2c_upgrades_are_not_relayed() {
        let upgrade_req = |values: &[&'static str]| {
            let mut b = Request::builder()
                .uri("/")
                .header(header::HOST, "h")
                .header(header::CONNECTION, "Upgrade, HTTP2-Settings")
                .header("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA");
            for v in values {
                b = b.header(header::UPGRADE, *v);
            }
            b.body(()).unwrap()
        };
        assert!(!is_upgrade(&upgrade_req(&["h2c"])));
        assert!(!is_upgrade(&upgrade_req(&["H2C, h2"])));
        let req = upgrade_req(&["h2c", "websocket, h2c"]);
        assert!(is_upgrade(&req));
        let mut h = req.headers().clone();
        strip_hop_by_hop(&mut h, true);
        let ups: Vec<_> = h.get_all(header::UPGRADE).iter().collect();
        assert_eq!(ups, ["websocket"]);
        assert!(!h.contains_key("http2-settings"));
        let mut h = upgrade_req(&["h2c"]).headers().clone();
        strip_hop_by_hop(&mut h, false);
        assert!(!h.contains_key(header::UPGRADE) && !h.contains_key("http2-settings"));
    }

    #[test]
    fn forwarding_appends_this_hop_in_each_form() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a\"b\\c:80"));
        h.insert(header::FORWARDED, HeaderValue::from_static("for=10.0.0.1"));
        add_forwarding(&mut h, "2001:db8::7".parse().unwrap(), false);
        assert_eq!(h[&X_FORWARDED_FOR], "2001:db8::7");
        assert_eq!(
            h[header::FORWARDED],
            "for=10.0.0.1, for=\"[2001:db8::7]\";proto=http;host=\"abc:80\""
        );
        assert_eq!(h[&X_FORWARDED_HOST], "a\"b\\c:80");
        // An IPv4 client seen through a v4-mapped address is written as v4.
        let mut h = HeaderMap::new();
        add_forwarding(&mut h, "::ffff:192.0.2.9".parse().unwrap(), false);
        assert_eq!(h[&X_FORWARDED_FOR], "192.0.2.9");
        assert_eq!(h[header::FORWARDED], "for=192.0.2.9;proto=http");
        assert_eq!(h[&X_FORWARDED_PROTO], "http");
        // Behind herd's TLS listener the client's own claim is replaced.
        let mut h = HeaderMap::new();
        h.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        add_forwarding(&mut h, "192.0.2.9".parse().unwrap(), true);
        assert_eq!(h[&X_FORWARDED_PROTO], "https");
        assert_eq!(h[header::FORWARDED], "for=192.0.2.9;proto=https");
    }

    #[test]
    fn only_herd_s_tls_listener_says_which_client_certificate_came() {
        let sent = |via: &Via| {
            let (mut parts, ()) = Request::builder()
                .uri("/")
                .header(header::HOST, "a.test")
                .header("client-cert", ":Zm9v:")
                .header("client-cert-chain", ":YmFy:")
                .body(())
                .unwrap()
                .into_parts();
            prepare_request_head(&mut parts, "192.0.2.9".parse().unwrap(), None, false, via);
            let get = |n: &str| {
                parts
                    .headers
                    .get(n)
                    .map(|v| v.to_str().unwrap().to_string())
            };
            (get("client-cert"), get("client-cert-chain"))
        };
        // A proxy in front of a plain listener may have set them.
        let kept = (Some(":Zm9v:".into()), Some(":YmFy:".into()));
        assert_eq!(sent(&Via::Plain), kept);
        assert_eq!(sent(&Via::Tls(None)), (None, None));
        let verified = Via::Tls(Some(HeaderValue::from_static(":cXV4:")));
        assert_eq!(sent(&verified), (Some(":cXV4:".into()), None));
    }

    #[test]
    fn an_absolute_target_names_the_host_the_backend_gets() {
        let head = |uri: &str| {
            let (mut parts, ()) = Request::builder()
                .uri(uri)
                .header(header::HOST, "evil.test")
                .body(())
                .unwrap()
                .into_parts();
            let via = Via::Tls(None);
            prepare_request_head(&mut parts, "192.0.2.9".parse().unwrap(), None, false, &via);
            (parts.uri.to_string(), parts.headers[header::HOST].clone())
        };
        assert_eq!(
            head("http://good.test/x?y"),
            ("/x?y".to_string(), HeaderValue::from_static("good.test"))
        );
        assert_eq!(
            head("/x"),
            ("/x".to_string(), HeaderValue::from_static("evil.test"))
        );
    }
}
