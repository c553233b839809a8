//! The HTTP/1.1 proxy path: each request head and each response head is
//! parsed once ([`head`]) and the bytes are forwarded, not rebuilt.
//!
//! Life of a client connection: wait for bytes holding no buffer; take a
//! buffer from the thread's pool, read the head, check it; pick a backend,
//! take an idle connection to it from this thread's pool (or connect),
//! write the edited head and the body bytes already read in one vectored
//! write; relay the rest of the body while waiting for the answer's head;
//! write the answer's head, relay its body by its framing; give the backend
//! connection back to the pool and the buffers back to the thread; wait for
//! the next request.
//!
//! Retries follow nginx's rules: a request that never reached a backend
//! goes to another one whatever its method; one that was sent goes again
//! only if it is idempotent and has no body; nothing is retried once
//! answer bytes have reached the client. An idle pooled connection that
//! the backend closed is replaced by a fresh one without counting against
//! the backend.
//!
//! Long on purpose: a connection's whole life (head, exchange, body relay,
//! retries, lingering close) reads top to bottom in one file.

use std::io::{self, IoSlice};
use std::net::IpAddr;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use super::backend::Conn;

use super::chunked::{self, Chunked};
use super::deadline::{self, Deadline, Woke};
use super::head::{self, Asked, Framing, H2_PREFACE, Refusal, Response};
use super::{HttpProxy, Key, conns};
use crate::os::lazy::{LazyStream, Socket};
use crate::upstream::Target;

/// Attempts per request, as nginx's `proxy_next_upstream_tries` but bounded.
const MAX_TRIES: usize = 3;
/// How long a refused client may keep sending before the connection is
/// closed (nginx's lingering close): closing with unread input resets the
/// connection, and the client would lose the answer.
pub(super) const LINGER: Duration = Duration::from_secs(2);
/// A parked partial head (see [`Inbox::park`]) is at most half this; the
/// thread's buffers are far larger.
const PARKED_MAX: usize = 4096;
/// Body bytes up to this size are copied behind the head they go with and
/// sent in one `send`; larger ones go beside it in a `writev`. The copy is
/// cheaper than the kernel's work for a second `iovec` below a few KiB.
const JOIN_MAX: usize = 4096;
/// How long a wait on the backend (for an answer's head, or for more of its
/// body) lasts before the client is watched for leaving too (see
/// [`watching`]). Quicker waits, nearly all, spare the watch: it would cost
/// an `epoll_ctl` for a client socket that is not registered yet.
const WATCH_CLIENT_AFTER: Duration = Duration::from_secs(1);

/// Bytes read from the client and not yet used. Holds no memory while the
/// connection is idle.
#[derive(Default)]
struct Inbox {
    v: Vec<u8>,
    start: usize,
}

impl Inbox {
    fn pending(&self) -> &[u8] {
        &self.v[self.start..]
    }

    fn consume(&mut self, n: usize) {
        self.start += n;
        if self.start >= self.v.len() {
            self.v.clear();
            self.start = 0;
        }
    }

    /// Gives the buffer back to the thread when nothing is pending.
    fn release_if_empty(&mut self) {
        if self.start >= self.v.len() {
            self.give_back();
        }
    }

    /// Lets go of the buffer: a thread's one goes back to it, a parked
    /// one is freed.
    fn give_back(&mut self) {
        let v = std::mem::take(&mut self.v);
        if v.capacity() >= PARKED_MAX {
            conns::give_back(v);
        }
        self.start = 0;
    }

    /// Before a wait with part of a head: keeps just those bytes in a
    /// buffer of their size and gives the thread's buffer back, so a slow
    /// client (or a slowloris one) holds about what it sent. The next read
    /// takes a thread buffer again.
    fn park(&mut self) {
        let n = self.v.len() - self.start;
        if n == 0 || n > PARKED_MAX / 2 || self.v.capacity() < PARKED_MAX {
            return;
        }
        let parked = self.pending().to_vec();
        conns::give_back(std::mem::replace(&mut self.v, parked));
        self.start = 0;
    }

    /// One read from `io`; `Ok(0)` is EOF. A read with no room left is a
    /// caller's error (heads are bounded below the capacity).
    fn try_fill(&mut self, io: &LazyStream, cap: usize) -> io::Result<usize> {
        if self.v.capacity() < cap {
            // None, or a parked one: the bytes kept move to a thread buffer.
            let mut v = conns::buffer(cap);
            v.extend_from_slice(self.pending());
            self.v = v;
            self.start = 0;
        }
        if self.v.len() == self.v.capacity() && self.start > 0 {
            self.v.drain(..self.start);
            self.start = 0;
        }
        if self.v.len() == self.v.capacity() {
            return Err(io::Error::other("request buffer full"));
        }
        read_drained(io, &mut self.v)
    }
}

/// Capacity of every buffer: a whole head of the largest size allowed,
/// and room to read body bytes behind it.
fn buffer_size(p: &HttpProxy) -> usize {
    p.cfg.limits.max_head.max(8192) + 8192
}

enum Head {
    Complete(usize),
    H2,
    Close,
    Refuse(Refusal),
    /// Between requests, to be served on another proxy thread (see
    /// [`super::spread`]).
    Move(usize),
}

enum Outcome {
    KeepAlive,
    Close,
    /// Close, after discarding what the client is still sending.
    Linger,
    /// The backend switched protocols (101): relay bytes both ways, with
    /// the exchange's state gone (an idle WebSocket holds only the tunnel).
    Tunnel(Box<(Conn, crate::upstream::Held, Arc<Target>)>),
}

/// Serves one client connection until it closes, or until its thread
/// stops accepting ([`super::stopping`]) and the request in flight (which
/// is answered with `Connection: close`) is done.
/// `active` counts the connection until then. `first`: no request was
/// served on it yet (else it was handed over between requests).
///
/// A plain `fn` returning an `async move` block, not an `async fn`: an
/// `async fn` keeps each argument twice in its state (rustc issue 62958),
/// and this state is what every idle connection holds.
#[allow(clippy::manual_async_fn)] // on purpose, as said above
pub fn serve(
    p: Arc<HttpProxy>,
    mut io: LazyStream,
    peer: IpAddr,
    active: super::ActiveGuard,
    first: bool,
) -> impl Future<Output = ()> + Send {
    // TCP_NODELAY comes from the listening socket (see `listen`).
    async move {
        let mut active = active;
        let mut inbox = Inbox::default();
        let mut first = first;
        // Once refused by the thread it was to move to (stopping), it stays.
        let mut movable = true;
        loop {
            let len = match read_head(&p, &io, &mut inbox, first, movable).await {
                Head::Complete(len) => len,
                Head::H2 => {
                    // Boxed: rare, and the connection's task stays small.
                    let prefix = inbox.pending().to_vec();
                    inbox.release_if_empty();
                    inbox.give_back();
                    if let Ok(io) = io.into_tokio() {
                        let stop = super::stop_token();
                        Box::pin(super::h2::serve(p, io, prefix, peer, stop)).await;
                    }
                    return;
                }
                Head::Close => break,
                Head::Move(to) => {
                    inbox.give_back();
                    let h = super::spread::Handed {
                        client: io,
                        peer: std::net::SocketAddr::new(peer, 0),
                        guard: active,
                        fresh: false,
                    };
                    match super::spread::hand(to, h) {
                        Ok(()) => return,
                        Err(h) => (io, active) = (h.client, h.guard),
                    }
                    movable = false;
                    continue;
                }
                Head::Refuse(r) => {
                    // Boxed, like every rare path: an idle task stays small.
                    Box::pin(refuse(&p, &mut io, &mut inbox, r, peer)).await;
                    break;
                }
            };
            first = false;
            // Boxed, so an idle connection's task holds only this loop's state.
            let exchanged = {
                // (A `move` closure: one that borrowed `len` and `peer`
                // would keep them in every idle connection's state.)
                let (p, io, inbox) = (&p, &mut io, &mut inbox);
                boxed(move || exchange(p, io, inbox, len, peer))
            };
            match exchanged.await {
                Outcome::KeepAlive => inbox.release_if_empty(),
                Outcome::Close if inbox.pending().is_empty() => {
                    // The FIN goes out now, with the answer `write_answer`
                    // held back: a close with unread input would send a
                    // reset instead and drop that answer.
                    let _ = io.shutdown_write();
                    break;
                }
                // Boxed, like the exchange, and given the outcome by value:
                // nothing of it stays in an idle connection's future.
                end => {
                    Box::pin(finish(&mut io, &mut inbox, end, buffer_size(&p))).await;
                    break;
                }
            }
        }
        inbox.give_back();
    }
}

/// The future `make` returns, built in its place on the heap. `Box::pin`
/// of a future builds all of it on the stack and then copies it, whatever
/// its state holds so far: the exchange's future is 3.5 KB, and that copy
/// came to about 2% of a request's user-space instructions (callgrind).
#[inline(always)]
fn boxed<F: Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::into_pin(Box::write(Box::new_uninit(), make()))
}

/// Ends a connection after its last exchange: relays an upgraded one
/// (after a 101) until both ways end, or closes with a lingering read
/// (unread pipelined requests: closing at once would reset the
/// connection, and the client could lose the last answer).
async fn finish(io: &mut LazyStream, inbox: &mut Inbox, end: Outcome, cap: usize) {
    match end {
        Outcome::Tunnel(t) => {
            let (mut b, lease, target) = *t;
            if let Ok(io) = io.registered_mut()
                && let Ok((to_backend, to_client)) = super::tunnel::relay_to(io, &mut b).await
            {
                let a = &target.answers;
                a.bytes_to_backend
                    .fetch_add(to_backend, std::sync::atomic::Ordering::Relaxed);
                a.bytes_to_client
                    .fetch_add(to_client, std::sync::atomic::Ordering::Relaxed);
            }
            drop(lease); // In flight for as long as the tunnel lasts.
            let _ = io.shutdown_write();
        }
        _ => linger(io, inbox, cap).await,
    }
}

/// Answers a refused request and closes after a lingering read.
async fn refuse(p: &HttpProxy, io: &mut LazyStream, inbox: &mut Inbox, r: Refusal, peer: IpAddr) {
    note_refused(p, peer, r);
    if r == Refusal::ProxyHeader {
        let why = match p.accept_proxy.as_ref().map(|a| &a.from) {
            None => {
                "it began with a PROXY protocol header (a load balancer in front sends them?): \
                 --accept-proxy reads them; answered 400"
            }
            Some(crate::config::AcceptProxy::From(_)) => {
                "it began with a PROXY protocol header, but not from an address \
                 --accept-proxy names; answered 400"
            }
            Some(_) => "a second PROXY protocol header; answered 400",
        };
        super::Told::UnexpectedProxyHeader.warn(format_args!("a connection from {peer}"), &why);
    }
    let _ = write_all(io, r.response(), p.cfg.limits.idle_timeout).await;
    linger(io, inbox, buffer_size(p)).await;
}

/// Reads until `inbox` holds a complete request head. The wait holds no
/// timer and no buffer: a deadline slot (see [`Deadline`]) and the socket.
async fn read_head(
    p: &HttpProxy,
    io: &LazyStream,
    inbox: &mut Inbox,
    first: bool,
    movable: bool,
) -> Head {
    let limits = &p.cfg.limits;
    let idle_until = deadline::after(if first {
        limits.header_timeout
    } else {
        limits.idle_timeout
    });
    let mut wait: Option<Deadline> = None;
    // Once a head has begun, the header timeout runs from then.
    let mut begun = false;
    let mut scanned = 0;
    loop {
        // Empty lines before a request line are skipped (RFC 9112, 2.2), as
        // nginx and llhttp do: some clients send a CRLF after a POST body.
        // (Scoped to the `if`: a local living across the wait below would
        // grow every idle connection's future in debug builds.)
        // A balancer's PROXY header, unasked for (version 2's begins with
        // blank lines), or where one was read already: a 400 that the log
        // explains.
        if first
            && !begun
            && matches!(
                super::proxy_protocol::parse(inbox.pending()),
                Ok(super::proxy_protocol::Parsed::Header { .. })
            )
        {
            return Head::Refuse(Refusal::ProxyHeader);
        }
        if let blank @ 1.. = head::leading_blank_lines(inbox.pending()) {
            inbox.consume(blank);
            scanned = 0;
        }
        let pending = inbox.pending();
        if !pending.is_empty() {
            let n = pending.len().min(H2_PREFACE.len());
            let maybe_h2 = first && pending[..n] == H2_PREFACE[..n];
            if maybe_h2 && n == H2_PREFACE.len() {
                return Head::H2;
            }
            if !maybe_h2 && let Some(end) = head::head_end(pending, scanned) {
                if end > limits.max_head {
                    return Head::Refuse(head::too_large(pending, limits.max_head));
                }
                return Head::Complete(end);
            }
            if pending.len() >= limits.max_head {
                return Head::Refuse(head::too_large(pending, limits.max_head));
            }
            if scanned < 32 && head::cannot_begin_request(pending) {
                return Head::Refuse(Refusal::BadRequest);
            }
            scanned = pending.len();
            if !begun {
                begun = true;
                let until = deadline::after(limits.header_timeout);
                match &wait {
                    Some(w) => w.reset(until, false),
                    None => wait = Some(Deadline::new(until, false)),
                }
            }
        }
        // Read what is there first: the readiness tokio cached makes this
        // free when nothing is.
        match inbox.try_fill(io, buffer_size(p)) {
            Ok(0) => return Head::Close,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Between requests, before it joins this thread's event
                // loop: the connection stays, and may move to a less busy
                // thread.
                if movable
                    && !first
                    && !begun
                    && !io.is_registered()
                    && let Some(to) = super::spread::elsewhere()
                {
                    return Head::Move(to);
                }
                inbox.release_if_empty();
                inbox.park();
            }
            Err(_) => return Head::Close,
        }
        // Idle (nothing begun): a graceful stop closes the connection at once.
        let w = wait.get_or_insert_with(|| Deadline::new(idle_until, true));
        let woke = std::future::poll_fn(|cx| match io.poll_read_ready(cx) {
            Poll::Ready(r) => Poll::Ready(r.map_err(|_| Woke::Expired).map(|()| None)),
            Poll::Pending => w.poll(cx).map(|why| Ok(Some(why))),
        })
        .await;
        match woke {
            Ok(None) => {}
            // Nothing sent at all: close quietly; a head begun: 408.
            Ok(Some(Woke::Expired)) if begun => return Head::Refuse(Refusal::Timeout),
            Ok(Some(_)) | Err(_) => return Head::Close,
        }
    }
}

/// What is left of the request body after the bytes sent with the head.
#[derive(Clone, Copy)]
enum BodyLeft {
    Done,
    Length(u64),
    /// And the payload bytes seen so far, for `--max-body-size`.
    Chunked(Chunked, u64),
}

/// How relaying the rest of the request body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Done,
    /// The client closed before the end of its body.
    ClientGone,
    /// The client sent nothing for `--idle-timeout`.
    ClientStalled,
    BadChunk,
    /// Past `--max-body-size` (a chunked body; a length is checked first).
    TooLarge,
    /// The backend stopped taking it (it may still have answered).
    BackendGone,
}

/// How waiting for the answer's head ended.
enum HeadWait {
    Got(usize, Response),
    TimedOut,
    /// The connection ended or broke; `quiet`: before any answer byte.
    Closed {
        quiet: bool,
    },
    /// Not an answer that can be relayed; why, for the log.
    Malformed(&'static str),
    /// An interim (1xx) answer could not be passed on: the client left.
    ClientGone,
    /// The health checks took the worker out as stopped or stuck while a
    /// request that may be sent again waited on it (see [`unless_stuck`]).
    Stuck,
}

/// Interim (1xx) answers relayed for one request: a backend that sends
/// them without end (a `100 Continue` in a loop) would keep a proxy thread
/// busy relaying them, the response time-out never met. Real servers send
/// one or two (`100`, `103`).
const MAX_INTERIM: usize = 16;

/// One request: sent to a backend (again, if allowed), answered.
async fn exchange(
    p: &HttpProxy,
    io: &mut LazyStream,
    inbox: &mut Inbox,
    head_len: usize,
    peer: IpAddr,
) -> Outcome {
    let cap = buffer_size(p);
    let limits = p.cfg.limits;
    let mut out = conns::buffer(cap);
    let pool = p.up.peek();
    let split_source = pool.split_source();
    let from = head::Sender {
        peer,
        real_ip: p.cfg.real_ip.as_ref(),
    };
    let parsed = head::request(
        &inbox.pending()[..head_len],
        limits.max_headers,
        from,
        &p.key_source,
        split_source,
        p.log.is_some(),
        &mut out,
    );
    let split_by_ip = *split_source == herd_balance::KeySource::ClientIp;
    drop(pool);
    let req = match parsed {
        Ok(r) => r,
        Err(refusal) => {
            conns::give_back(out);
            note_refused(p, peer, refusal);
            let _ = write_all(io, refusal.response(), limits.idle_timeout).await;
            return Outcome::Linger;
        }
    };
    let peer = req.client;
    if req.no_host
        && let Ok(a) = io.local_addr()
    {
        head::add_host(&mut out, a.to_string().as_bytes());
    }
    // What the access log needs of the head, copied before it goes.
    let logged = p.log.as_ref().map(|_| {
        let h = &inbox.pending()[..head_len];
        let s = |(a, b): (usize, usize)| String::from_utf8_lossy(&h[a..b]).into_owned();
        Logged {
            method: s(req.method),
            target: s(req.target),
            referer: req.referer.map(s),
            user_agent: req.user_agent.map(s),
            http10: req.http10,
            peer,
            at: std::time::SystemTime::now(),
            started: p.up.now(),
        }
    });
    // The key outlives the head's bytes (the buffer is reused for the body).
    let key_bytes = req.key.map(|(a, b)| inbox.pending()[a..b].to_vec());
    let key = match &key_bytes {
        Some(b) => Some(Key::Bytes(b)),
        None if p.key_source == herd_balance::KeySource::ClientIp => Some(super::ip_key(peer)),
        None => None,
    };
    // Only during a deploy that splits by a key.
    let split_bytes = req.split_key.map(|(a, b)| inbox.pending()[a..b].to_vec());
    let split = match &split_bytes {
        Some(b) => Some(Key::Bytes(b)),
        None if split_by_ip => Some(super::ip_key(peer)),
        None => None,
    };
    inbox.consume(head_len);

    // Over its rate (`--rate-limit`): answered here, no backend hears of it.
    if let Some(rate) = &p.rate
        && let Err(wait) = rate.check(peer, p.up.now())
    {
        let why = "over --rate-limit; answered 429";
        super::Told::RateLimited.warn(format_args!("a client at {peer}"), &why);
        let keep = req.keep_alive && req.body == Framing::None && !req.upgrade;
        let secs = super::rate::retry_after(wait);
        head::own_answer(
            &mut out,
            head::RATE_LIMITED,
            format_args!("Retry-After: {secs}\r\n"),
            keep,
            req.head_method,
        );
        note(p, &logged, 429, head::RATE_LIMITED.2.len() as u64, None, 0);
        return send_own(io, out, keep, limits.idle_timeout).await;
    }

    // Body bytes that came with the head go out with it.
    let pending = inbox.pending();
    let too_large = |n: u64| limits.max_body.is_some_and(|max| n > max);
    let (in_buf, left) = match req.body {
        Framing::None | Framing::UntilClose => (0, BodyLeft::Done),
        // Refused before any backend hears of it, as nginx does (and
        // before `Expect: 100-continue` lets the body come).
        Framing::Length(n) if too_large(n) => {
            conns::give_back(out);
            let (status, bytes) = Refusal::BodyTooLarge.logged();
            note(p, &logged, status, bytes, None, 0);
            let _ = write_all(io, Refusal::BodyTooLarge.response(), limits.idle_timeout).await;
            return Outcome::Linger;
        }
        Framing::Length(n) => {
            let k = (pending.len() as u64).min(n);
            let left = if k == n {
                BodyLeft::Done
            } else {
                BodyLeft::Length(n - k)
            };
            (k as usize, left)
        }
        Framing::Chunked => {
            let mut c = Chunked::new(limits.max_head);
            let mut seen = 0u64;
            let r = match c.scan(pending, |d| seen += d.len() as u64) {
                Ok(_) if too_large(seen) => Err(Refusal::BodyTooLarge),
                Ok(k) if c.is_done() => Ok((k, BodyLeft::Done)),
                Ok(k) => Ok((k, BodyLeft::Chunked(c, seen))),
                Err(_) => Err(Refusal::BadRequest),
            };
            match r {
                Ok(r) => r,
                Err(r) => {
                    conns::give_back(out);
                    let (status, bytes) = r.logged();
                    note(p, &logged, status, bytes, None, 0);
                    let _ = write_all(io, r.response(), limits.idle_timeout).await;
                    return Outcome::Linger;
                }
            }
        }
    };
    let mut left = left;
    // The body read whole (or its first --request-buffer bytes), instead
    // of the `in_buf` bytes at the inbox's front.
    let mut whole: Option<Vec<u8>> = None;
    let fits = match left {
        BodyLeft::Done => false,
        BodyLeft::Length(n) => in_buf as u64 + n <= limits.request_buffer as u64,
        BodyLeft::Chunked(..) => limits.request_buffer > 0,
    };
    if fits && !req.upgrade {
        if req.expect_continue && !req.http10 {
            // The client waits for this before its body; the backend then
            // gets the body with the head and no `Expect`.
            let go_on = b"HTTP/1.1 100 Continue\r\n\r\n";
            if write_all(io, go_on, limits.idle_timeout).await.is_err() {
                conns::give_back(out);
                return Outcome::Close;
            }
            head::drop_expect(&mut out);
        }
        // The backend's head waits in a buffer of its size, not a thread's.
        let parked = out.to_vec();
        conns::give_back(std::mem::replace(&mut out, parked));
        let read = buffer_body(io, inbox, in_buf, &mut left, cap, &limits).await;
        let mut unparked = conns::buffer(cap);
        unparked.extend_from_slice(&out);
        out = unparked;
        match read {
            Ok(v) => whole = Some(v),
            Err(None) => {
                conns::give_back(out);
                return Outcome::Close;
            }
            Err(Some(r)) => {
                conns::give_back(out);
                let (status, bytes) = r.logged();
                note(p, &logged, status, bytes, None, 0);
                let _ = write_all(io, r.response(), limits.idle_timeout).await;
                return Outcome::Linger;
            }
        }
    }
    let in_buf = if whole.is_some() { 0 } else { in_buf };
    let bodiless = req.body == Framing::None;
    let replay = req.idempotent && bodiless;
    let asked = Asked {
        head_method: req.head_method,
        upgrade: req.upgrade,
        http10: req.http10,
        // Once an upstream that speaks HTTP/2 or TLS came by a reload, the
        // next request goes through hyper, on a new connection.
        keep_alive: req.keep_alive
            && !super::stopping()
            && !p.h2_backends.load(std::sync::atomic::Ordering::Relaxed),
    };
    // Our own answers keep the connection if the whole request was read.
    let own = Own {
        keep: asked.keep_alive && matches!(left, BodyLeft::Done),
        head_method: asked.head_method,
        timeout: limits.idle_timeout,
    };

    // A small body already at hand joins the head: one `send`, not a `writev`.
    let at_hand = whole.as_ref().map_or(in_buf, Vec::len);
    let joined = at_hand > 0 && at_hand <= JOIN_MAX;
    if joined {
        out.extend_from_slice(whole.as_deref().unwrap_or(&inbox.pending()[..in_buf]));
    }
    let mut avoid: Option<Arc<herd_balance::Backend>> = None;
    let mut last: (u16, &str, &str) = (502, "Bad Gateway", "no backend could answer\n");
    let mut tries = 0;
    let mut stale_retries = 0;
    let mut skip_pool = req.upgrade;
    // `out` says `Connection: close` (to a backend whose connections are
    // not kept; a retry elsewhere then keeps its connection no more).
    let mut said_close = false;
    let mut replace_by = None;
    let mut queued = super::Queued::default();
    'attempt: loop {
        if tries >= MAX_TRIES {
            note(p, &logged, last.0, 0, None, tries);
            return answer(io, out, last, own).await;
        }
        if !p.some_target().await {
            let no = (503, "Service Unavailable", "no worker is ready\n");
            note(p, &logged, no.0, 0, None, tries);
            return answer(io, out, no, own).await;
        }
        if tries > 0 {
            p.up.retries
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        if queued.barging() {
            queued.wait(p.cfg.connect_timeout).await;
        }
        // One clock read: the pick's time is when the attempt starts.
        let (picked, started) = loop {
            let now = p.up.now();
            match p.pick(now, key.as_ref(), split.as_ref(), avoid.as_deref()) {
                Err(herd_balance::PickError::Full) if queued.wait(p.cfg.connect_timeout).await => {}
                picked => break (picked, now),
            }
        };
        queued.served();
        let (lease, target, stats) = match picked {
            // Back to the worker that just failed, as the only one left.
            Ok(x)
                if crate::upstream::Upstreams::came_back(&avoid, x.lease.backend())
                    && p.up.replaced(avoid.as_deref(), &mut replace_by).await =>
            {
                avoid = None;
                continue 'attempt;
            }
            Ok(x) => (x.lease, x.target, x.stats),
            Err(herd_balance::PickError::Full) => {
                super::Told::all_full(p.cfg.connect_timeout, "answering 503");
                let no = (503, "Service Unavailable", super::ALL_FULL);
                note(p, &logged, no.0, 0, None, tries);
                return answer(io, out, no, own).await;
            }
            Err(_) if p.up.replaced(avoid.as_deref(), &mut replace_by).await => {
                avoid = None;
                continue 'attempt;
            }
            Err(_) if avoid.is_some() => {
                note(p, &logged, last.0, 0, None, tries);
                return answer(io, out, last, own).await;
            }
            Err(_) => {
                super::Told::none_available();
                let no = (503, "Service Unavailable", "no healthy backend\n");
                note(p, &logged, no.0, 0, None, tries);
                return answer(io, out, no, own).await;
            }
        };
        tries += 1;
        if target.h2 || target.tls.is_some() {
            // Came by a reload: this engine speaks neither (see `asked`).
            avoid = Some(lease.backend().clone());
            continue 'attempt;
        }

        // A connection, and the head (with the body bytes at hand) on it.
        let mut pooled = if skip_pool {
            None
        } else {
            conns::take(target.id)
        };
        // Held until the exchange ends and its connection is closed.
        let _slot = match pooled {
            None => conns::serial_slot(&target, p.cfg.response_timeout).await,
            Some(_) => None,
        };
        if pooled.is_none() && !said_close && !req.upgrade && !target.reuse.keeps(deadline::now()) {
            head::add_close(&mut out);
            said_close = true;
        }
        let (b, was_pooled) = loop {
            let (b, was_pooled) = match pooled.take() {
                // A request that cannot be sent twice does not go out on a
                // connection the backend has already closed (one that
                // closes after each answer without saying so): a fresh one.
                Some(b) if !replay && closed_by_peer(&b) => continue,
                Some(b) => (b, true),
                None => match super::backend::connect(&target, p.cfg.connect_timeout).await {
                    Ok(b) => (b, false),
                    Err(e) if super::own_shortage(&target.label, &e) => {
                        let no = (503, "Service Unavailable", super::SHORTAGE);
                        note(p, &logged, no.0, 0, None, tries);
                        return answer(io, out, no, Own { keep: false, ..own }).await;
                    }
                    Err(e) => {
                        let why = format_args!("cannot connect: {e}");
                        super::backend_failed(&p.up, &lease, &target.label, &why);
                        avoid = Some(lease.backend().clone());
                        last = (502, "Bad Gateway", "could not connect to a backend\n");
                        continue 'attempt;
                    }
                },
            };
            let body = if joined {
                &[][..]
            } else if let Some(w) = &whole {
                w
            } else {
                &inbox.pending()[..in_buf]
            };
            match write_two(&b, &out, body, p.cfg.response_timeout).await {
                Ok(()) => break (b, was_pooled),
                // Closed while idle: a fresh connection, not a failure.
                Err(_) if was_pooled => continue,
                Err(e) => {
                    let why = format_args!("sending the request failed: {e}");
                    super::backend_failed(&p.up, &lease, &target.label, &why);
                    avoid = Some(lease.backend().clone());
                    last = (502, "Bad Gateway", "backend failed\n");
                    continue 'attempt;
                }
            }
        };

        // The rest of the body, while the answer's head is awaited.
        let mut rbuf = conns::buffer(cap);
        // The answer's head for the client: `out` keeps the request's head
        // for a retry, even after a 1xx went to the client.
        let mut rout = conns::buffer(cap);
        let client: &LazyStream = io;
        let mut body_end = BodyEnd::Done;
        let mut left_us = Client::Here;
        // The request body's bytes sent to this backend (after the head's).
        let mut uploaded = at_hand as u64;
        let wait = {
            let head_fut = read_answer_head(
                &b,
                &mut rbuf,
                client,
                asked,
                &mut rout,
                p.cfg.response_timeout,
            );
            tokio::pin!(head_fut);
            if matches!(left, BodyLeft::Done) {
                inbox.consume(in_buf);
                let gone = || HeadWait::Closed { quiet: false };
                let fresh = (!was_pooled).then_some(&*target);
                let head_fut = accept_checked(head_fut, fresh, &b);
                let head_fut =
                    unless_stuck(head_fut, replay.then_some(&*target), &b, || HeadWait::Stuck);
                watching(head_fut, client, &b, &mut left_us, gone).await
            } else {
                let body_fut = send_body(client, inbox, in_buf, &b, left, cap, p, &mut uploaded);
                tokio::pin!(body_fut);
                tokio::select! {
                    w = &mut head_fut => {
                        body_end = BodyEnd::BackendGone; // answered early: the rest is not sent
                        w
                    }
                    e = &mut body_fut => {
                        body_end = e;
                        match e {
                            BodyEnd::Done | BodyEnd::BackendGone => head_fut.await,
                            BodyEnd::ClientGone => HeadWait::Closed { quiet: false },
                            // The client's doing: answered by `body_end` below.
                            BodyEnd::ClientStalled | BodyEnd::BadChunk | BodyEnd::TooLarge => {
                                HeadWait::Malformed("")
                            }
                        }
                    }
                }
            }
        };
        // A chunked answer whose first bytes already break its framing is
        // as malformed as a bad head: the backend's failure and a 502 (or a
        // retry), counted as such, before anything reaches the client.
        let wait = match wait {
            HeadWait::Got(len, resp)
                if resp.body == Framing::Chunked
                    && Chunked::new(p.cfg.limits.max_head)
                        .scan(&rbuf[len..], |_| {})
                        .is_err() =>
            {
                HeadWait::Malformed("sent a malformed chunked body")
            }
            wait => wait,
        };
        let now = p.up.now();
        let (len, mut resp) = match wait {
            HeadWait::Got(len, resp) => (len, resp),
            // The client left while its answer was awaited: nginx's 499. Not
            // the backend's failure, and not to be retried.
            w if left_us != Client::Here || matches!(w, HeadWait::ClientGone) => {
                conns::give_back(rbuf);
                conns::give_back(rout);
                conns::give_back(out);
                note(p, &logged, 499, 0, None, tries);
                return Outcome::Close;
            }
            _ if matches!(body_end, BodyEnd::ClientGone) => {
                conns::give_back(rbuf);
                conns::give_back(rout);
                conns::give_back(out);
                return Outcome::Close;
            }
            _ if matches!(
                body_end,
                BodyEnd::ClientStalled | BodyEnd::BadChunk | BodyEnd::TooLarge
            ) =>
            {
                // The backend got part of a body: its connection closes.
                conns::give_back(rbuf);
                conns::give_back(rout);
                conns::give_back(out);
                let r = match body_end {
                    BodyEnd::BadChunk => Refusal::BadRequest,
                    BodyEnd::TooLarge => Refusal::BodyTooLarge,
                    _ => Refusal::Timeout,
                };
                let (status, bytes) = r.logged();
                note(p, &logged, status, bytes, None, tries);
                let _ = write_all(io, r.response(), limits.idle_timeout).await;
                return Outcome::Linger;
            }
            HeadWait::Closed { quiet: true } if was_pooled && replay && stale_retries == 0 => {
                // The backend closed the idle connection as the request went
                // out: once more on a fresh connection, not a failure.
                conns::give_back(rbuf);
                conns::give_back(rout);
                stale_retries += 1;
                tries -= 1;
                skip_pool = true;
                drop(lease);
                continue 'attempt;
            }
            wait => {
                conns::give_back(rbuf);
                conns::give_back(rout);
                let timeout = p.cfg.response_timeout;
                let why = match wait {
                    HeadWait::TimedOut => format!("no answer within {timeout:?}"),
                    HeadWait::Stuck => super::STUCK_WHY.into(),
                    HeadWait::Malformed(why) => why.to_owned(),
                    HeadWait::Closed { quiet: true } if was_pooled => {
                        "closed a kept-alive connection as a request that cannot be sent twice went out on it".into()
                    }
                    HeadWait::Closed { quiet: true } => {
                        "closed the connection before answering".into()
                    }
                    _ => "closed the connection in the middle of its answer's head".into(),
                };
                if (was_pooled && matches!(wait, HeadWait::Closed { quiet: true }))
                    || matches!(wait, HeadWait::Stuck)
                {
                    // A server that closes after each answer without saying
                    // so, or an idle time-out met by this request: not ill
                    // health, and not counted (as nginx does not count an
                    // error on a cached connection). A stuck worker is out
                    // by health already.
                    super::Told::Failed.warn(&target.label, &why);
                } else {
                    super::backend_failed(&p.up, &lease, &target.label, &why);
                }
                last = match wait {
                    HeadWait::TimedOut => {
                        (504, "Gateway Timeout", "backend did not answer in time\n")
                    }
                    _ => (502, "Bad Gateway", "backend failed\n"),
                };
                let micros = now.saturating_sub(started) / 1000;
                if let Some(s) = &stats {
                    s.record(last.0, micros);
                }
                target.answers.record(last.0, micros);
                if replay {
                    avoid = Some(lease.backend().clone());
                    continue 'attempt;
                }
                let keep = own.keep && body_end == BodyEnd::Done;
                note(p, &logged, last.0, 0, None, tries);
                return answer(io, out, last, Own { keep, ..own }).await;
            }
        };
        lease.success(now);
        target.count_served();
        let micros = now.saturating_sub(started) / 1000;
        if let Some(s) = &stats {
            s.record(resp.status, micros);
        }
        target.answers.record(resp.status, micros);
        let body_sent = body_end == BodyEnd::Done;
        if !body_sent && resp.client_keep_alive {
            // Answered before the whole body came: the connection cannot
            // find the next request, so this answer closes it.
            let closing = Asked {
                keep_alive: false,
                ..asked
            };
            // (A body until close is then not sent chunked either.)
            if let Ok(Some((_, closed))) = head::response(&rbuf, closing, &mut rout) {
                resp = closed;
            }
        }
        conns::give_back(out);

        let upstream = Some((&*target, micros));
        if resp.status == 101 {
            note(p, &logged, 101, 0, upstream, tries);
            let ok = write_two(io, &rout, &rbuf[len..], limits.idle_timeout)
                .await
                .is_ok()
                && write_all(&b, inbox.pending(), p.cfg.response_timeout)
                    .await
                    .is_ok();
            conns::give_back(rbuf);
            conns::give_back(rout);
            inbox.give_back();
            if !ok {
                return Outcome::Close;
            }
            return Outcome::Tunnel(Box::new((b, lease, target)));
        }

        let mut sent = 0;
        let relayed = relay_answer(
            p,
            io,
            &b,
            &mut rbuf,
            len,
            &mut rout,
            &resp,
            &mut sent,
            &mut left_us,
        )
        .await;
        target
            .answers
            .bytes_to_client
            .fetch_add(sent, std::sync::atomic::Ordering::Relaxed);
        if uploaded > 0 {
            target
                .answers
                .bytes_to_backend
                .fetch_add(uploaded, std::sync::atomic::Ordering::Relaxed);
        }
        conns::give_back(rbuf);
        note(p, &logged, resp.status, sent, upstream, tries);
        conns::give_back(rout);
        // A request that asked for an upgrade and got an ordinary answer
        // can leave the backend's parser expecting no more HTTP on that
        // connection (Node's then neither answers nor closes on a bad next
        // request): its connection is not kept.
        let reusable = body_sent && left_us == Client::Here && !asked.upgrade;
        if relayed == Relayed::Complete && resp.backend_keep_alive && reusable {
            conns::put(&target, b);
        }
        drop(lease);
        return match relayed {
            Relayed::Failed => Outcome::Close,
            Relayed::Cut(why) => {
                super::Told::Cut.warn(&target.label, &why);
                Outcome::Close
            }
            // Half-closed: no request can follow.
            _ if left_us != Client::Here => Outcome::Close,
            _ if !body_sent => Outcome::Linger,
            _ if resp.client_keep_alive => Outcome::KeepAlive,
            _ => Outcome::Close,
        };
    }
}

/// Whether an idle backend connection has been closed (or has sent bytes
/// nobody asked for): one `recv` with `MSG_PEEK`, which would block on a
/// live connection.
fn closed_by_peer(b: &Conn) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    !matches!(
        b.sock().peek(&mut byte),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// nginx's `proxy_request_buffering` (HAProxy's `http-buffer-request`):
/// reads a body of at most `--request-buffer` bytes whole before a backend
/// is picked, so a slow upload holds herd's memory, not a worker that
/// serves one request at a time (gunicorn's sync workers, preforking Perl
/// or Ruby servers). Returns the body's bytes, from the `in_buf` at the
/// inbox's front on; a chunked body found larger stops there, and `left`
/// says what is still to stream. `Err(None)`: the client left;
/// `Err(Some(_))`: refused.
async fn buffer_body(
    io: &LazyStream,
    inbox: &mut Inbox,
    in_buf: usize,
    left: &mut BodyLeft,
    cap: usize,
    limits: &crate::config::Limits,
) -> Result<Vec<u8>, Option<Refusal>> {
    // The most this can hold: a length's exact size, else the limit and
    // one read past it.
    let most = match *left {
        BodyLeft::Length(n) => in_buf + n as usize,
        _ => limits.request_buffer + cap,
    };
    // Grown as bytes come, not sized up front: a client that declares
    // 64 KiB and sends a byte holds a byte.
    let mut whole = Vec::with_capacity(in_buf.max(512).min(most));
    whole.extend_from_slice(&inbox.pending()[..in_buf]);
    inbox.consume(in_buf);
    let mut until = None;
    while !matches!(left, BodyLeft::Done) && whole.len() < limits.request_buffer {
        if inbox.pending().is_empty() {
            match inbox.try_fill(io, cap) {
                Ok(0) => return Err(None),
                Ok(_) => until = None,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Waits holding no thread buffer, only what was sent.
                    inbox.release_if_empty();
                    let by = *until.get_or_insert_with(|| deadline::after(limits.idle_timeout));
                    match ready_by(by, |cx| io.poll_read_ready(cx)).await {
                        Ok(()) => continue,
                        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                            return Err(Some(Refusal::Timeout));
                        }
                        Err(_) => return Err(None),
                    }
                }
                Err(_) => return Err(None),
            }
        }
        let pending = inbox.pending();
        let (k, done) = match left {
            BodyLeft::Done => (0, true),
            BodyLeft::Length(n) => {
                let k = (pending.len() as u64).min(*n);
                *n -= k;
                (k as usize, *n == 0)
            }
            BodyLeft::Chunked(c, seen) => match c.scan(pending, |d| *seen += d.len() as u64) {
                Ok(_) if limits.max_body.is_some_and(|max| *seen > max) => {
                    return Err(Some(Refusal::BodyTooLarge));
                }
                Ok(k) => (k, c.is_done()),
                Err(_) => return Err(Some(Refusal::BadRequest)),
            },
        };
        let need = whole.len() + k;
        if need > whole.capacity() {
            let grown = need.max(whole.capacity() * 2).min(most.max(need));
            whole.reserve_exact(grown - whole.len());
        }
        whole.extend_from_slice(&pending[..k]);
        inbox.consume(k);
        if done {
            *left = BodyLeft::Done;
        }
    }
    Ok(whole)
}

/// Relays the rest of the request body from the client to the backend,
/// adding what it sends to `sent`. `in_buf` bytes at the inbox's front were
/// already sent with the head.
#[allow(clippy::too_many_arguments)]
async fn send_body(
    client: &LazyStream,
    inbox: &mut Inbox,
    in_buf: usize,
    b: &Conn,
    mut left: BodyLeft,
    cap: usize,
    p: &HttpProxy,
    sent: &mut u64,
) -> BodyEnd {
    inbox.consume(in_buf);
    let idle = p.cfg.limits.idle_timeout;
    let mut held = false;
    loop {
        if matches!(left, BodyLeft::Done) {
            return BodyEnd::Done;
        }
        if inbox.pending().is_empty() {
            // As for an answer (see `read_after_held`): what the backend's
            // socket holds goes out before herd waits for the client.
            let read = if held {
                match inbox.try_fill(client, cap) {
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                        if b.push_held().is_err() {
                            return BodyEnd::BackendGone;
                        }
                        read_some(client, inbox, cap, idle).await
                    }
                    r => r,
                }
            } else {
                read_some(client, inbox, cap, idle).await
            };
            match read {
                Ok(0) => return BodyEnd::ClientGone,
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::TimedOut => return BodyEnd::ClientStalled,
                Err(_) => return BodyEnd::ClientGone,
            }
        }
        // A read that filled the buffer left more queued.
        let full = inbox.v.len() == inbox.v.capacity();
        let pending = inbox.pending();
        let k = match &mut left {
            BodyLeft::Done => 0,
            BodyLeft::Length(n) => {
                let k = (pending.len() as u64).min(*n);
                *n -= k;
                if *n == 0 {
                    left = BodyLeft::Done;
                }
                k as usize
            }
            BodyLeft::Chunked(c, seen) => match c.scan(pending, |d| *seen += d.len() as u64) {
                // What broke the limit is not sent.
                Ok(_) if p.cfg.limits.max_body.is_some_and(|max| *seen > max) => {
                    return BodyEnd::TooLarge;
                }
                Ok(k) => {
                    if c.is_done() {
                        left = BodyLeft::Done;
                    }
                    k
                }
                Err(_) => return BodyEnd::BadChunk,
            },
        };
        held = full && k == inbox.pending().len() && !matches!(left, BodyLeft::Done);
        let data = &inbox.pending()[..k];
        let w = if held {
            write_held(b, data, p.cfg.response_timeout).await
        } else {
            write_all(b, data, p.cfg.response_timeout).await
        };
        if w.is_err() {
            return BodyEnd::BackendGone;
        }
        *sent += k as u64;
        inbox.consume(k);
    }
}

/// Reads the answer's head into `rbuf`; interim (1xx) answers go on to
/// the client as they come (an HTTP/1.0 client gets none).
async fn read_answer_head(
    b: &Conn,
    rbuf: &mut Vec<u8>,
    client: &LazyStream,
    asked: Asked,
    out: &mut Vec<u8>,
    timeout: Duration,
) -> HeadWait {
    let cap = rbuf.capacity();
    let mut quiet = true;
    let mut interim = 0;
    loop {
        // The first wait (for the answer to begin) acknowledges as usual.
        let read = if rbuf.is_empty() {
            read_some_vec(b, rbuf, timeout).await
        } else {
            read_more(b, rbuf, timeout).await
        };
        match read {
            Ok(0) => return HeadWait::Closed { quiet },
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return HeadWait::TimedOut,
            Err(_) => return HeadWait::Closed { quiet },
        }
        // A stop that began while the request was out: this answer is the
        // connection's last, and says so (as nginx's do once it is exiting).
        let asked = Asked {
            keep_alive: asked.keep_alive && !super::stopping(),
            ..asked
        };
        loop {
            match head::response(rbuf, asked, out) {
                Ok(Some((len, resp))) if resp.interim => {
                    quiet = false;
                    interim += 1;
                    if interim > MAX_INTERIM {
                        return HeadWait::Malformed("sent more than 16 interim (1xx) answers");
                    }
                    if !asked.http10 && write_all(client, out, timeout).await.is_err() {
                        return HeadWait::ClientGone;
                    }
                    rbuf.drain(..len);
                }
                Ok(Some((len, resp))) => return HeadWait::Got(len, resp),
                Ok(None) if rbuf.len() >= cap => {
                    return HeadWait::Malformed(
                        "sent an answer head over --max-header-size plus 8 KiB",
                    );
                }
                Ok(None) => break,
                Err(_) => {
                    return HeadWait::Malformed(
                        "sent an invalid answer head (or over 128 headers)",
                    );
                }
            }
        }
    }
}

/// Awaits `fut`, the answer's head on a connection just opened to `fresh`
/// (`None`: a pooled one, nothing more to do). If the wait lasts
/// [`conns::ACCEPT_CHECK_AFTER`] (to within the thread's tick), the worker
/// is looked at ([`conns::check_accepted`]): one that serves a connection at
/// a time has not accepted this one while herd keeps another open to it
/// (see [`crate::upstream::reuse`]). Quicker answers, nearly all, cost a
/// deadline slot. A request whose body is still being sent is not looked
/// at (its wait is on the body).
async fn accept_checked<T>(
    fut: impl std::future::Future<Output = T>,
    fresh: Option<&Target>,
    b: &Conn,
) -> T {
    let mut fresh = fresh.filter(|t| conns::looked_at(t));
    let mut timer: Option<Deadline> = None;
    let mut looks = 0;
    tokio::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        while let Some(t) = fresh {
            let d = timer.get_or_insert_with(|| {
                Deadline::new(deadline::now() + conns::ACCEPT_CHECK_AFTER, false)
            });
            if d.poll(cx).is_pending() {
                break;
            }
            timer = None;
            looks += 1;
            if !conns::check_accepted(t, || b.server_end(t)) || looks >= conns::ACCEPT_CHECKS {
                fresh = None;
            }
        }
        Poll::Pending
    })
    .await
}

/// Ends the wait `fut` with `stuck()` once the health checks have taken
/// `target` out as stopped or stuck ([`Target::is_stuck`]) and the worker
/// has not read the request (on `b`) yet: a request that may be sent again
/// then goes to another worker, rather than waiting on one that serves
/// nothing until `--response-timeout`. The request a stuck worker has read
/// is left to wait, as in nginx: it may be what keeps the worker busy, and
/// sent on it would hold the next one too. Free for an answer within
/// [`WATCH_CLIENT_AFTER`]: the first look waits for [`watching`]'s wake-up
/// then, and only then is a deadline of its own taken. `None`: a request
/// that cannot be sent twice.
async fn unless_stuck<T>(
    fut: impl std::future::Future<Output = T>,
    target: Option<&Target>,
    b: &Conn,
    stuck: impl FnOnce() -> T,
) -> T {
    let target = target.filter(|t| t.pid.is_some());
    let since = deadline::now();
    let mut timer: Option<Deadline> = None;
    let mut stuck = Some(stuck);
    tokio::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        let (Some(t), true) = (target, stuck.is_some()) else {
            return Poll::Pending;
        };
        if timer.is_none() && deadline::now() < since + WATCH_CLIENT_AFTER {
            return Poll::Pending;
        }
        loop {
            if t.is_stuck() {
                let unread = b.server_end(t).ok().flatten();
                let take = stuck.take();
                return match (unread, take) {
                    (Some(e), Some(s)) if !e.accepted || e.unread > 0 => Poll::Ready(s()),
                    // Read (or not known): this one waits, and is not
                    // looked at again.
                    _ => Poll::Pending,
                };
            }
            let d = timer.get_or_insert_with(|| {
                Deadline::new(deadline::after(super::STUCK_LOOK_EVERY), false)
            });
            if d.poll(cx).is_pending() {
                return Poll::Pending;
            }
            timer = None;
        }
    })
    .await
}

/// Whether the client is still there while its answer is awaited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Client {
    Here,
    /// It closed its sending side; the FIN went on to the backend.
    HalfClosed,
    /// Its connection broke (reset).
    Gone,
}

/// Awaits `fut` (a wait on the backend: for the answer's head, or for more
/// of its body) and, once it has taken [`WATCH_CLIENT_AFTER`], watches the
/// client as well, so that a client who gives up on a slow answer (a long
/// poll, a report, a quiet event stream) does not leave its backend working
/// for no one until the answer or `--response-timeout`. Quicker waits, nearly
/// all, cost a deadline slot and no syscall.
///
/// A client that closes its side has its FIN passed on to the backend, which
/// decides, as with no proxy between: most servers take it for the client
/// leaving (Node's, uvicorn, Go's: the request is aborted, its handler told)
/// and close; others answer, and the answer reaches the half-closed client.
/// A reset client ends the wait at once with `gone` (the caller closes the
/// backend connection). Pipelined bytes end the watch: they wait their turn
/// unread. `state` says what was seen; a client seen leaving is not watched
/// again.
async fn watching<T>(
    fut: impl std::future::Future<Output = T>,
    client: &LazyStream,
    b: &Conn,
    state: &mut Client,
    gone: impl FnOnce() -> T,
) -> T {
    #[derive(PartialEq)]
    enum Watch {
        NotYet,
        On,
        Off,
    }
    let mut watch = if *state == Client::Here {
        Watch::NotYet
    } else {
        Watch::Off
    };
    let mut timer: Option<Deadline> = None;
    let mut gone = Some(gone);
    tokio::pin!(fut);
    std::future::poll_fn(|cx| {
        if let Poll::Ready(v) = fut.as_mut().poll(cx) {
            return Poll::Ready(v);
        }
        loop {
            match watch {
                Watch::Off => return Poll::Pending,
                Watch::NotYet => {
                    let t = timer.get_or_insert_with(|| {
                        Deadline::new(deadline::after(WATCH_CLIENT_AFTER), false)
                    });
                    if t.poll(cx).is_pending() {
                        return Poll::Pending;
                    }
                    timer = None;
                    watch = Watch::On;
                }
                Watch::On => {
                    let mut one = [std::mem::MaybeUninit::uninit(); 1];
                    let mut buf = tokio::io::ReadBuf::uninit(&mut one);
                    let peeked = match client.registered() {
                        Ok(s) => s.poll_peek(cx, &mut buf),
                        Err(e) => Poll::Ready(Err(e)),
                    };
                    match peeked {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(Ok(0)) => {
                            let _ = b.sock().shutdown(std::net::Shutdown::Write);
                            *state = Client::HalfClosed;
                            watch = Watch::Off;
                        }
                        Poll::Ready(Ok(_)) => watch = Watch::Off,
                        Poll::Ready(Err(_)) => {
                            *state = Client::Gone;
                            if let Some(g) = gone.take() {
                                return Poll::Ready(g());
                            }
                            return Poll::Pending;
                        }
                    }
                }
            }
        }
    })
    .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relayed {
    /// The body ended where its framing said, nothing after it.
    Complete,
    /// Delivered, but the backend connection cannot be reused.
    Unreusable,
    /// Broken off: the client connection must close.
    Failed,
    /// Broken off by the backend (why, for the log); as `Failed`.
    Cut(&'static str),
}

/// How a read of an answer's body that returned `got` ended it: the
/// backend's doing unless the client left first.
fn broken(got: &io::Result<usize>, left_us: Client) -> Relayed {
    match got {
        Ok(_) => Relayed::Cut("closed the connection before its answer's body ended"),
        Err(_) if left_us != Client::Here => Relayed::Failed,
        Err(e) if e.kind() == io::ErrorKind::TimedOut => {
            Relayed::Cut("sent nothing more of its answer's body within --response-timeout")
        }
        Err(_) => Relayed::Cut("broke off its answer's body"),
    }
}

/// Writes the answer's head (`out`) and relays its body by its framing.
// Each piece is borrowed apart from the others, so the caller keeps the rest.
#[allow(clippy::too_many_arguments)]
async fn relay_answer(
    p: &HttpProxy,
    client: &LazyStream,
    b: &Conn,
    rbuf: &mut Vec<u8>,
    head_len: usize,
    out: &mut Vec<u8>,
    resp: &Response,
    sent: &mut u64,
    left_us: &mut Client,
) -> Relayed {
    let to_client = p.cfg.limits.idle_timeout;
    let from_backend = p.cfg.response_timeout;
    let gone = || Err(io::ErrorKind::ConnectionReset.into());
    match resp.body {
        Framing::None => {
            let extra = rbuf.len() > head_len;
            if write_answer(client, out, resp.client_keep_alive, to_client)
                .await
                .is_err()
            {
                return Relayed::Failed;
            }
            if extra {
                Relayed::Unreusable
            } else {
                Relayed::Complete
            }
        }
        Framing::Length(n) => {
            let first = ((rbuf.len() - head_len) as u64).min(n) as usize;
            let extra = rbuf.len() - head_len > first;
            let mut body = &rbuf[head_len..head_len + first];
            let mut left = n - first as u64;
            if body.len() <= JOIN_MAX {
                out.extend_from_slice(body);
                body = &[];
            }
            let w = if body.is_empty() && left == 0 {
                write_answer(client, out, resp.client_keep_alive, to_client).await
            } else {
                write_two(client, out, body, to_client).await
            };
            if w.is_err() {
                return Relayed::Failed;
            }
            *sent += first as u64;
            let mut extra = extra;
            let mut held = false;
            while left > 0 {
                let last = rbuf.len();
                rbuf.clear();
                let got = if held {
                    let read = read_after_held(b, rbuf, from_backend, client);
                    watching(read, client, b, left_us, gone).await
                } else {
                    let read = read_rest(b, rbuf, from_backend, last);
                    watching(read, client, b, left_us, gone).await
                };
                match got {
                    Ok(0) | Err(_) => return broken(&got, *left_us),
                    Ok(got) => {
                        let k = (got as u64).min(left) as usize;
                        extra |= got > k;
                        left -= k as u64;
                        // A read that filled the buffer left more queued:
                        // this piece may wait in the kernel for the next.
                        held = left > 0 && got == rbuf.capacity();
                        let w = if held {
                            write_held(client, &rbuf[..k], to_client).await
                        } else {
                            write_all(client, &rbuf[..k], to_client).await
                        };
                        if w.is_err() {
                            return Relayed::Failed;
                        }
                        *sent += k as u64;
                    }
                }
            }
            if extra {
                Relayed::Unreusable
            } else {
                Relayed::Complete
            }
        }
        Framing::Chunked => {
            let body_sent = sent;
            let mut c = Chunked::new(p.cfg.limits.max_head);
            let mut spans: Vec<std::ops::Range<usize>> = Vec::new();
            let mut from = head_len;
            let mut head: &[u8] = out;
            let mut held;
            loop {
                spans.clear();
                // As for a length: a read that filled the buffer left more queued.
                let full = rbuf.len() == rbuf.capacity();
                let data = &rbuf[from..];
                let k = match c.scan(data, |r| {
                    if resp.dechunk {
                        spans.push(r)
                    }
                }) {
                    Ok(k) => k,
                    // (Not at the start: the caller checked that.)
                    Err(_) => return Relayed::Cut("sent a malformed chunked body"),
                };
                held = full && head.is_empty() && !resp.dechunk && !c.is_done();
                let sent = if resp.dechunk {
                    let mut w = write_all(client, head, to_client).await;
                    for r in &spans {
                        if w.is_ok() {
                            w = write_all(client, &data[r.clone()], to_client).await;
                        }
                    }
                    w
                } else if held {
                    write_held(client, &data[..k], to_client).await
                } else {
                    write_two(client, head, &data[..k], to_client).await
                };
                if sent.is_err() {
                    return Relayed::Failed;
                }
                *body_sent += if resp.dechunk {
                    spans.iter().map(|r| r.len() as u64).sum::<u64>()
                } else {
                    k as u64
                };
                head = &[];
                if c.is_done() {
                    return if k < data.len() {
                        Relayed::Unreusable
                    } else {
                        Relayed::Complete
                    };
                }
                let last = rbuf.len();
                rbuf.clear();
                from = 0;
                let got = if held {
                    let read = read_after_held(b, rbuf, from_backend, client);
                    watching(read, client, b, left_us, gone).await
                } else {
                    let read = read_rest(b, rbuf, from_backend, last);
                    watching(read, client, b, left_us, gone).await
                };
                match got {
                    Ok(0) | Err(_) => return broken(&got, *left_us),
                    Ok(_) => {}
                }
            }
        }
        Framing::UntilClose => {
            let mut head: &[u8] = out;
            let mut from = head_len;
            loop {
                let w = if resp.rechunk {
                    write_chunk(client, head, &rbuf[from..], to_client).await
                } else {
                    write_two(client, head, &rbuf[from..], to_client).await
                };
                if w.is_err() {
                    return Relayed::Failed;
                }
                *sent += (rbuf.len() - from) as u64;
                head = &[];
                from = 0;
                let last = rbuf.len();
                rbuf.clear();
                let read = read_rest(b, rbuf, from_backend, last);
                match watching(read, client, b, left_us, gone).await {
                    // The end; a client that got it chunked gets the last chunk.
                    Ok(0) if resp.rechunk => {
                        return match write_all(client, b"0\r\n\r\n", to_client).await {
                            Ok(()) => Relayed::Unreusable,
                            Err(_) => Relayed::Failed,
                        };
                    }
                    Ok(0) => return Relayed::Unreusable,
                    got @ Err(_) => return broken(&got, *left_us),
                    Ok(_) => {}
                }
            }
        }
    }
}

/// How herd's own answer to a request goes out.
#[derive(Clone, Copy)]
struct Own {
    /// The connection may serve another request (the request was read whole).
    keep: bool,
    /// It answers a `HEAD`: the head alone.
    head_method: bool,
    timeout: Duration,
}

/// A short answer of herd's own; gives `out` back.
async fn answer(io: &LazyStream, mut out: Vec<u8>, what: (u16, &str, &str), own: Own) -> Outcome {
    head::own_answer(&mut out, what, format_args!(""), own.keep, own.head_method);
    send_own(io, out, own.keep, own.timeout).await
}

/// Writes an answer of herd's own, `out`, and gives `out` back; `keep`:
/// the connection may serve another request (else it lingers, then closes).
async fn send_own(io: &LazyStream, out: Vec<u8>, keep: bool, timeout: Duration) -> Outcome {
    let ok = write_all(io, &out, timeout).await.is_ok();
    conns::give_back(out);
    match (ok, keep) {
        (true, true) => Outcome::KeepAlive,
        (true, false) => Outcome::Linger,
        (false, _) => Outcome::Close,
    }
}

/// Waits until `ready` is, or `until` passes (`TimedOut`).
async fn ready_by(
    until: Instant,
    mut ready: impl FnMut(&mut Context<'_>) -> Poll<io::Result<()>>,
) -> io::Result<()> {
    let d = Deadline::new(until, false);
    std::future::poll_fn(|cx| match ready(cx) {
        Poll::Ready(r) => Poll::Ready(r),
        Poll::Pending => d
            .poll(cx)
            .map(|_| Err(io::Error::from(io::ErrorKind::TimedOut))),
    })
    .await
}

/// One read into the inbox, waiting up to `timeout` for bytes.
async fn read_some(
    io: &LazyStream,
    inbox: &mut Inbox,
    cap: usize,
    timeout: Duration,
) -> io::Result<usize> {
    let mut until = None;
    loop {
        match inbox.try_fill(io, cap) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        let until = *until.get_or_insert_with(|| deadline::after(timeout));
        ready_by(until, |cx| io.poll_read_ready(cx)).await?;
    }
}

/// One read appended to `v` (which has room). A read shorter than the
/// room emptied the socket's queue: the socket forgets its readiness then
/// (see [`Socket::forget_readable`]), which spares the read that would only
/// say "would block" (half of the reads of a keep-alive request). Safe with
/// edge-triggered epoll: bytes arriving after the read raise a new event,
/// tokio never clears the "closed" readiness, and a bare client socket is
/// registered before it waits, when epoll reports a FIN already there.
fn read_drained(io: &impl Socket, v: &mut Vec<u8>) -> io::Result<usize> {
    let room = v.capacity() - v.len();
    let n = io.try_read_buf(v)?;
    if n > 0 && n < room {
        io.forget_readable();
    }
    Ok(n)
}

/// One read appended to `v` (which has room), waiting up to `timeout`.
async fn read_some_vec(io: &impl Socket, v: &mut Vec<u8>, timeout: Duration) -> io::Result<usize> {
    if v.len() == v.capacity() {
        return Err(io::Error::other("buffer full"));
    }
    let mut until = None;
    loop {
        match read_drained(io, v) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            r => return r,
        }
        let until = *until.get_or_insert_with(|| deadline::after(timeout));
        ready_by(until, |cx| io.poll_read_ready(cx)).await?;
    }
}

/// A last read from a backend shorter than this may have been a small
/// write that the backend follows with another (see [`read_more`]).
pub(super) const QUICKACK_BELOW: usize = 16 * 1024;

/// More of an answer's body, after a read of `last` bytes: [`read_more`]
/// when that read was small, else a plain [`read_some_vec`].
async fn read_rest(b: &Conn, v: &mut Vec<u8>, timeout: Duration, last: usize) -> io::Result<usize> {
    if last < QUICKACK_BELOW {
        read_more(b, v, timeout).await
    } else {
        read_some_vec(b, v, timeout).await
    }
}

/// One read of more of an answer that has begun. If nothing is queued,
/// herd acknowledges what it has at once (`TCP_QUICKACK`) before it waits:
/// a backend that writes its head and body apart under Nagle's algorithm
/// (Java's `HttpServer`, Perl's `HTTP::Daemon`) holds the body until that
/// ACK, which the kernel would otherwise delay by 40 ms on a keep-alive
/// connection. One syscall, only when an answer arrives in pieces.
async fn read_more(b: &Conn, v: &mut Vec<u8>, timeout: Duration) -> io::Result<usize> {
    if v.len() < v.capacity() {
        match read_drained(b, v) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                b.quickack();
            }
            r => return r,
        }
    }
    read_some_vec(b, v, timeout).await
}

/// Writes all of `data`, waiting up to `timeout` each time the socket is full.
async fn write_all(io: &impl Socket, data: &[u8], timeout: Duration) -> io::Result<()> {
    write_two(io, data, &[], timeout).await
}

/// Writes `a` then `b`, in one `writev` when the socket takes them (one
/// `send` when either is empty: cheaper in the kernel than a `writev`).
async fn write_two(io: &impl Socket, a: &[u8], b: &[u8], timeout: Duration) -> io::Result<()> {
    let mut bufs = [IoSlice::new(a), IoSlice::new(b)];
    let slices: &mut [IoSlice<'_>] = match (a.is_empty(), b.is_empty()) {
        (_, true) => &mut bufs[..1],
        (true, false) => &mut bufs[1..],
        (false, false) => &mut bufs,
    };
    write_slices(io, slices, timeout).await
}

/// Writes `head` (may be empty), then `data` as one chunk of a chunked
/// body (nothing when `data` is empty: an empty chunk would end the body),
/// in one `writev`.
async fn write_chunk(
    io: &impl Socket,
    head: &[u8],
    data: &[u8],
    timeout: Duration,
) -> io::Result<()> {
    if data.is_empty() {
        return write_all(io, head, timeout).await;
    }
    let mut size = [0u8; 18];
    let n = chunked::size_line(data.len(), &mut size);
    let mut bufs = [
        IoSlice::new(head),
        IoSlice::new(&size[..n]),
        IoSlice::new(data),
        IoSlice::new(b"\r\n"),
    ];
    let from = usize::from(head.is_empty());
    write_slices(io, &mut bufs[from..], timeout).await
}

/// Writes all of `slices`, waiting up to `timeout` each time the socket is full.
async fn write_slices(
    io: &impl Socket,
    mut slices: &mut [IoSlice<'_>],
    timeout: Duration,
) -> io::Result<()> {
    IoSlice::advance_slices(&mut slices, 0);
    while !slices.is_empty() {
        let r = if slices.len() == 1 {
            io.try_write(&slices[0])
        } else {
            io.try_write_vectored(slices)
        };
        match r {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut slices, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                ready_by(deadline::after(timeout), |cx| io.poll_write_ready(cx)).await?;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes `data`, a piece of a body that more follows at once, with
/// `MSG_MORE` (as HAProxy forwards a body of known length): the kernel
/// joins it with the next into full segments, so a large answer takes
/// fewer packets, each waking the client once. What the socket does not
/// take at once is written as [`write_all`] does, which sends it all.
async fn write_held(io: &impl Socket, data: &[u8], timeout: Duration) -> io::Result<()> {
    let n = match io.try_write_more(data) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if n == data.len() {
        return Ok(());
    }
    write_all(io, &data[n..], timeout).await
}

/// The next read of a body after a [`write_held`] to `to`: if the sender
/// has nothing more queued after all, what the kernel holds goes out
/// before herd waits, so a sender that pauses never delays it.
async fn read_after_held(
    from: &Conn,
    v: &mut Vec<u8>,
    timeout: Duration,
    to: &impl Socket,
) -> io::Result<usize> {
    match read_drained(from, v) {
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            to.push_held()?;
            read_some_vec(from, v, timeout).await
        }
        r => r,
    }
}

/// Writes a whole answer. One after which the connection closes goes with
/// `MSG_MORE`: the kernel holds it until the shutdown that follows at once,
/// and the FIN leaves in the same segment, which the client acknowledges
/// with one ACK (two packets fewer per closed connection). What the socket
/// does not take at once is written as [`write_all`] does.
async fn write_answer(
    io: &LazyStream,
    data: &[u8],
    keep: bool,
    timeout: Duration,
) -> io::Result<()> {
    if keep {
        return write_all(io, data, timeout).await;
    }
    let n = match io.try_send_flags(data, libc::MSG_MORE) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    write_all(io, &data[n..], timeout).await
}

/// Closes the sending side, then reads and drops what the client still
/// sends for up to [`LINGER`], so the answer reaches it before the close.
async fn linger(io: &mut LazyStream, inbox: &mut Inbox, cap: usize) {
    let _ = io.shutdown_write();
    let until = deadline::after(LINGER);
    loop {
        inbox.v.clear();
        inbox.start = 0;
        match inbox.try_fill(io, cap) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => break,
        }
        if ready_by(until, |cx| io.poll_read_ready(cx)).await.is_err() {
            break;
        }
    }
    inbox.give_back();
}

/// What the access log keeps of a request's head.
struct Logged {
    method: String,
    target: String,
    referer: Option<String>,
    user_agent: Option<String>,
    http10: bool,
    peer: IpAddr,
    at: std::time::SystemTime,
    /// On the balancer's clock, ns.
    started: u64,
}

/// The access log line of a request refused before its head was read
/// whole or understood: nginx's `"-"` for the request line.
fn note_refused(p: &HttpProxy, peer: IpAddr, r: Refusal) {
    let Some(log) = &p.log else {
        return;
    };
    let (status, bytes) = r.logged();
    log.write(&super::access::Entry {
        at: std::time::SystemTime::now(),
        client: peer,
        method: "-",
        path: "-",
        protocol: "-",
        status,
        bytes,
        duration: Duration::ZERO,
        upstream: None,
        upstream_time: None,
        worker: None,
        retries: 0,
        referer: None,
        user_agent: None,
    });
}

/// One access log line, if the log is on: the answer's status and body
/// bytes, the backend that gave it (and its time in µs), and the tries.
fn note(
    p: &HttpProxy,
    l: &Option<Logged>,
    status: u16,
    bytes: u64,
    backend: Option<(&Target, u64)>,
    tries: usize,
) {
    let (Some(log), Some(l)) = (&p.log, l) else {
        return;
    };
    log.write(&super::access::Entry {
        at: l.at,
        client: l.peer,
        method: &l.method,
        path: &l.target,
        protocol: if l.http10 { "HTTP/1.0" } else { "HTTP/1.1" },
        status,
        bytes,
        duration: Duration::from_nanos(p.up.now().saturating_sub(l.started)),
        upstream: backend.map(|(t, _)| t.place()),
        upstream_time: backend.map(|(_, us)| Duration::from_micros(us)),
        worker: backend.map(|(t, _)| t.backend.name()),
        retries: tries.saturating_sub(1) as u32,
        referer: l.referer.as_deref(),
        user_agent: l.user_agent.as_deref(),
    });
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use crate::config::{HttpConfig, Limits};
    use crate::upstream::Upstreams;

    /// What an idle client connection's task holds is this future, a
    /// socket and a deadline slot: keep it small (the memory benchmark
    /// measures the rest).
    #[tokio::test]
    async fn an_idle_connection_holds_a_small_future() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let s = std::net::TcpStream::connect(addr).unwrap();
        s.set_nonblocking(true).unwrap();
        let s = crate::os::lazy::LazyStream::new_for_test(mio::net::TcpStream::from_std(s));
        let secs = Duration::from_secs(1);
        let cfg = HttpConfig {
            connect_timeout: secs,
            response_timeout: secs,
            limits: Limits {
                max_head: 16384,
                max_headers: 100,
                max_body: None,
                request_buffer: 0,
                header_timeout: secs,
                idle_timeout: secs,
            },
            wait_for_backend: secs,
            real_ip: None,
            rate_limit: None,
        };
        let up = Arc::new(Upstreams::new(herd_balance::StrategyKind::RoundRobin, &[]));
        let tls = Arc::new(crate::proxy::h2::ClientTls::new(Default::default()).unwrap());
        let p = Arc::new(super::HttpProxy::new(up, cfg, None, tls));
        let active = crate::proxy::ActiveGuard::new(Arc::default());
        let f = super::serve(p, s, addr.ip(), active, true);
        let size = std::mem::size_of_val(&f);
        // With tokio's task header and trailer (112 bytes) the task then
        // fits in 384 bytes (tasks are 128-aligned); bench/idle measures all.
        assert!(size <= 256, "the connection future grew to {size} bytes");
    }
}
