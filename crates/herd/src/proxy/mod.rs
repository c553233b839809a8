//! Proxy mode: the master accepts on the public port on one thread per
//! CPU and either relays bytes to a target (`--protocol tcp`, one pick per
//! connection, [`tcp`]) or proxies HTTP (one pick per request): HTTP/1.1
//! through herd's own engine ([`h1`], heads parsed once by [`head`]),
//! prior-knowledge h2c through hyper ([`h2`]).

/// Runs a hyper server connection until it ends; once `stop` is
/// cancelled, or the connection has been idle (`seen`, see [`idle`]) for
/// `--idle-timeout`, it finishes its requests in flight (HTTP/2 clients get
/// GOAWAY) and closes; with a header time-out (HTTP/1), a head that takes
/// longer closes it. A macro: hyper's connection types share no trait that
/// covers the upgradeable ones.
macro_rules! serve_gracefully {
    ($conn:expr, $stop:expr, $seen:expr, $idle:expr, $header:expr) => {{
        let conn = $conn;
        tokio::pin!(conn);
        tokio::select! {
            _ = conn.as_mut() => {}
            _ = $stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = conn.await;
            }
            ended = $crate::proxy::idle::watch(&$seen, $idle, $header) => {
                // A head too slow: dropped, the connection closes.
                if ended == $crate::proxy::idle::Ended::Idle {
                    conn.as_mut().graceful_shutdown();
                    // A client that vanished never acknowledges HTTP/2's
                    // GOAWAY (hyper waits for its PING's answer): bounded.
                    let _ = tokio::time::timeout($idle, conn).await;
                }
            }
        }
    }};
}

pub mod access;
mod backend;
mod chunked;
mod conns;
mod deadline;
mod h1;
pub mod h2;
pub mod head;
mod idle;
#[cfg(test)]
mod props;
pub mod proxy_protocol;
pub mod rate;
pub mod real_ip;
pub mod spread;
mod tcp;
pub mod tls;
mod tunnel;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::Poll;
use std::time::Duration;

use herd_balance::{Backend, Ctx, KeySource, PickError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{AcceptProxy, HttpConfig};
use crate::os::lazy::{LazyStream, Listener};
use crate::upstream::{Picked, Upstreams};
pub use tcp::TcpProxy;

/// Open client connections, so a graceful stop can wait for them.
#[derive(Default)]
pub struct Active {
    count: AtomicUsize,
    idle: Notify,
}

impl Active {
    pub fn get(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }

    /// Resolves once no connection is open.
    pub async fn drained(&self) {
        loop {
            let idle = self.idle.notified();
            if self.get() == 0 {
                return;
            }
            idle.await;
        }
    }
}

/// Counts a connection in [`Active`], and on the proxy thread that holds
/// it (see [`spread`]: a guard is dropped on the thread it is counted on),
/// for as long as it lives.
pub(crate) struct ActiveGuard(Arc<Active>);

impl ActiveGuard {
    pub(crate) fn new(active: Arc<Active>) -> ActiveGuard {
        active.count.fetch_add(1, Ordering::AcqRel);
        spread::add(spread::me());
        ActiveGuard(active)
    }
}

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        spread::sub(spread::me());
        if self.0.count.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

#[derive(Clone)]
pub enum Protocol {
    Http(Arc<HttpProxy>),
    Tcp(Arc<TcpProxy>),
}

impl Protocol {
    fn accept_proxy(&self) -> Option<&ExpectProxy> {
        match self {
            Protocol::Http(h) => h.accept_proxy.as_ref(),
            Protocol::Tcp(t) => t.accept_proxy.as_ref(),
        }
    }
}

/// `--accept-proxy`: the connections that begin with a PROXY header, and
/// the time one may take to arrive whole (`--header-timeout`).
#[derive(Debug, Clone)]
pub struct ExpectProxy {
    pub from: AcceptProxy,
    pub within: Duration,
}

impl ExpectProxy {
    /// `None` when the flag is off.
    pub fn new(from: &AcceptProxy, within: Duration) -> Option<ExpectProxy> {
        from.is_on().then(|| ExpectProxy {
            from: from.clone(),
            within,
        })
    }
}

thread_local! {
    /// Which proxy thread this is (0 elsewhere): picks the connection-pool shard.
    static THREAD: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// This thread's accept loop ended: answers close their connections.
    static STOPPING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// The stop, for the rare connection handed to hyper (h2c), which
    /// needs to await it. HTTP/1.1 connections read [`stopping`] instead
    /// of holding a clone each (a lock pair on a node every thread shares).
    static STOP: std::cell::OnceCell<CancellationToken> = const { std::cell::OnceCell::new() };
}

/// Whether this proxy thread stopped accepting (a graceful stop began).
pub fn stopping() -> bool {
    STOPPING.with(|s| s.get())
}

/// The stop this proxy thread serves under.
fn stop_token() -> CancellationToken {
    STOP.with(|s| s.get().cloned().unwrap_or_default())
}

/// This thread's index among the proxy threads, 1-based; 0 off them.
pub fn thread_index() -> usize {
    THREAD.with(|t| t.get())
}

/// What `herd run --check` and `herd start` check of TLS before anything
/// starts, as the master does when it starts: the listener's certificates
/// and `--upstream-ca`/`--upstream-cert`/`--upstream-crl`'s files (not the system's roots).
pub fn check_tls(s: &crate::config::Settings) -> Result<(), String> {
    if let Some(t) = &s.tls {
        tls::Tls::load(t).map_err(|e| e.to_string())?;
    }
    h2::ClientTls::new(upstream_tls_files(s, false))?;
    Ok(())
}

/// `--upstream-ca`, `--upstream-cert`/`--upstream-key` and `--upstream-crl`;
/// `system`: the system's roots when there is no `--upstream-ca`.
pub fn upstream_tls_files(s: &crate::config::Settings, system: bool) -> h2::ClientTlsFiles {
    h2::ClientTlsFiles {
        ca: s.upstream_ca.clone(),
        system: system && s.upstream_ca.is_none(),
        client: s.upstream_client.clone(),
        crl: s.upstream_crl.clone(),
    }
}

/// Runs the proxy on one thread per listener, each with its own
/// single-threaded runtime, as nginx runs one event loop per worker: a
/// client connection, its backend connections and their tasks then stay
/// on one thread, and a request never waits for a cross-thread wake-up.
pub fn start_threads(
    listeners: Vec<std::net::TcpListener>,
    proto: Protocol,
    active: Arc<Active>,
    stop: CancellationToken,
    close_idle: CancellationToken,
) -> std::io::Result<()> {
    let ends = spread::channels(listeners.len());
    for ((i, l), inbound) in listeners.into_iter().enumerate().zip(ends) {
        // A balancer in front sends its PROXY header first, in TCP mode too
        // (unless other clients come directly: they may wait for the server).
        let first = matches!(proto, Protocol::Http(_))
            || proto
                .accept_proxy()
                .is_some_and(|a| a.from == AcceptProxy::All);
        for set in [
            crate::os::listen::client_speaks_first(&l, first),
            crate::os::listen::probe_idle_peers(&l),
        ] {
            if let Err(e) = set {
                // Only packets, wake-ups or dead peers' sockets are at
                // stake: serve anyway.
                tracing::debug!("listener options: {e}");
            }
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (proto, active, stop) = (proto.clone(), active.clone(), stop.clone());
        let close_idle = close_idle.clone();
        std::thread::Builder::new()
            .name(format!("herd-proxy-{i}"))
            .spawn(move || {
                THREAD.with(|t| t.set(i + 1));
                inbound.join();
                STOP.with(|s| {
                    let _ = s.set(stop.clone());
                });
                rt.block_on(async move {
                    // tokio wakes its driver through an eventfd whenever a new
                    // timer is due sooner than the driver's next planned wake.
                    // Every request sets a time-out timer; a steady short tick
                    // keeps them all later than that, and saves a syscall each.
                    // The same tick ends the connections' waits whose deadline
                    // passed, and closes idle backend connections now and then.
                    tokio::spawn(async {
                        let mut tick = tokio::time::interval(Duration::from_millis(100));
                        for n in 0u64.. {
                            tick.tick().await;
                            deadline::sweep(std::time::Instant::now());
                            access::flush();
                            conns::release();
                            if n % 10 == 0 {
                                conns::sweep();
                                h2::sweep();
                            }
                        }
                    });
                    match Listener::new(l) {
                        Ok(l) => serve(l, proto, active.clone(), stop, inbound).await,
                        Err(e) => {
                            tracing::error!("proxy thread {i} cannot listen: {e}");
                            // Others may have handed it connections already.
                            let mut inbound = inbound;
                            for h in inbound.close() {
                                start(h, &proto, &stop);
                            }
                        }
                    }
                    STOPPING.with(|s| s.set(true));
                    // Stopping: this thread's idle connections close now (on
                    // an upgrade, once the others had their drain time).
                    tokio::select! {
                        _ = close_idle.cancelled() => {}
                        _ = active.drained() => {}
                    }
                    deadline::stop();
                    // Connections this thread still serves live on its runtime:
                    // keep it running while they drain (the master exits when
                    // they are done or its drain time-out passes).
                    active.drained().await;
                });
            })?;
    }
    Ok(())
}

/// Accepts until `stop` is cancelled, then drops the listener; HTTP
/// connections are told to finish in-flight requests and close. Serves
/// too what other threads hand this one, and hands over what this one
/// accepts while it holds clearly more than another ([`spread`]).
async fn serve(
    listener: Listener,
    proto: Protocol,
    active: Arc<Active>,
    stop: CancellationToken,
    mut inbound: spread::Inbound,
) {
    // One wait for the stop, not one per accepted connection (each joins
    // and leaves the token's waiter list under its lock).
    let stopped = stop.cancelled();
    tokio::pin!(stopped);
    let mut errors = crate::os::listen::AcceptErrors::default();
    // Accepts since the stop and the hand-overs were last looked at.
    let mut run = 0u32;
    let mut handed_open = true;
    loop {
        // Accepting comes first: the stop and what other threads handed
        // this one are looked at when the accept queue is empty or after
        // `ACCEPT_RUN` accepts, rather than at each (a look at the
        // channel, and the `select!`'s, cost about 1% of a new
        // connection's instructions).
        let next = std::future::poll_fn(|cx| {
            let accept_first = run < ACCEPT_RUN;
            if accept_first && let Poll::Ready(a) = listener.poll_accept(cx) {
                run += 1;
                return Poll::Ready(Next::Accepted(a));
            }
            run = 0;
            if stopped.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Next::Stop);
            }
            if handed_open {
                match inbound.poll_next(cx) {
                    Poll::Ready(Some(h)) => return Poll::Ready(Next::Handed(h)),
                    Poll::Ready(None) => handed_open = false,
                    Poll::Pending => {}
                }
            }
            if accept_first {
                // Polled above, and pending: it will wake this task.
                return Poll::Pending;
            }
            listener.poll_accept(cx).map(Next::Accepted)
        })
        .await;
        let accepted = match next {
            Next::Stop => break,
            Next::Handed(h) => {
                start(h, &proto, &stop);
                continue;
            }
            Next::Accepted(a) => a,
        };
        match accepted {
            Ok((client, peer)) => {
                // An IPv4 client of a dual-stack `[::]` listener arrives as
                // `::ffff:a.b.c.d`: its plain address, for headers and logs.
                let peer = std::net::SocketAddr::new(peer.ip().to_canonical(), peer.port());
                let mut h = spread::Handed {
                    client,
                    peer,
                    guard: ActiveGuard::new(active.clone()),
                    fresh: true,
                };
                // HTTP/1.1 connections move, if they must, once they stay.
                if !plain_h1(&proto)
                    && let Some(to) = spread::elsewhere()
                {
                    match spread::hand(to, h) {
                        Ok(()) => continue,
                        Err(back) => h = back,
                    }
                }
                start(h, &proto, &stop);
            }
            Err(e) => {
                // EMFILE and friends: back off briefly instead of spinning.
                errors.warn(&e);
                tokio::time::sleep(crate::os::listen::AcceptErrors::BACKOFF).await;
            }
        }
    }
    // What another thread handed this one before it stopped taking any.
    for h in inbound.close() {
        start(h, &proto, &stop);
    }
}

/// How many connections a proxy thread accepts in a row before it looks
/// for its stop and for connections handed to it ([`serve`]).
const ACCEPT_RUN: u32 = 16;

/// What [`serve`]'s wait ended with.
enum Next {
    Stop,
    Accepted(std::io::Result<(LazyStream, std::net::SocketAddr)>),
    Handed(spread::Handed),
}

/// Whether clients are served by herd's own HTTP/1.1 engine ([`h1`]).
fn plain_h1(proto: &Protocol) -> bool {
    matches!(proto, Protocol::Http(h) if h.tls.is_none() && !h.h2_backends.load(Ordering::Relaxed))
}

/// Serves one client connection on this thread; with `--accept-proxy`
/// (and from an address it names), once its PROXY header named the client
/// (a connection handed on between requests had it read already).
fn start(mut h: spread::Handed, proto: &Protocol, stop: &CancellationToken) {
    let Some(within) = proto
        .accept_proxy()
        .filter(|a| h.fresh && a.from.expects(h.peer.ip()))
        .map(|a| a.within)
    else {
        return start_now(h, proto, stop);
    };
    let (proto, stop) = (proto.clone(), stop.clone());
    tokio::spawn(async move {
        match proxy_protocol::read(&h.client, h.peer, within).await {
            Ok(client) => {
                h.peer = client;
                start_now(h, &proto, &stop);
            }
            // Closed having sent nothing: a balancer's TCP health check.
            Err(proxy_protocol::ProxyHeaderError::Closed) => {}
            Err(e) => Told::NoProxyHeader.warn(format_args!("a connection from {}", h.peer), &e),
        }
    });
}

fn start_now(h: spread::Handed, proto: &Protocol, stop: &CancellationToken) {
    let spread::Handed {
        client,
        peer,
        guard,
        fresh,
    } = h;
    if let Protocol::Http(h) = proto
        && plain_h1(proto)
    {
        // Joins the event loop only if it has to wait (a
        // `Connection: close` request seldom does): no wrapper
        // future, so an idle connection's task holds `serve`'s
        // state alone.
        tokio::spawn(h1::serve(h.clone(), client, peer.ip(), guard, fresh));
        return;
    }
    let client = match client.into_tokio() {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!("cannot serve a connection: {e}");
            return;
        }
    };
    match proto {
        Protocol::Http(h) if h.tls.is_some() => {
            if let Some(tls) = h.tls.clone() {
                let (h, stop) = (h.clone(), stop.clone());
                tokio::spawn(async move {
                    tls::serve(h, tls, client, peer.ip(), stop).await;
                    drop(guard);
                });
            }
        }
        Protocol::Http(h) => {
            let (h, stop) = (h.clone(), stop.clone());
            tokio::spawn(async move {
                h2::serve_any(h, client, peer.ip(), stop).await;
                drop(guard);
            });
        }
        Protocol::Tcp(t) => {
            let t = t.clone();
            tokio::spawn(async move {
                t.relay(client, peer).await;
                drop(guard);
            });
        }
    }
}

/// The HTTP proxy's shared state: where requests go, and its limits.
pub struct HttpProxy {
    pub up: Arc<Upstreams>,
    pub cfg: HttpConfig,
    /// Where the strategy's hash key comes from, worked out once.
    key_source: KeySource,
    /// `--access-log`.
    pub log: Option<Arc<access::AccessLog>>,
    /// `--tls-cert`: the listener speaks TLS.
    pub tls: Option<Arc<tls::Tls>>,
    /// Some backend speaks HTTP/2 or TLS: every client goes through hyper.
    /// Set once such an upstream comes (at start, or by a reload); never
    /// cleared, as connections served by hyper may still send to one.
    pub h2_backends: AtomicBool,
    /// For backends marked `tls`.
    pub client_tls: Arc<h2::ClientTls>,
    /// `--accept-proxy`: which connections begin with a PROXY header.
    pub accept_proxy: Option<ExpectProxy>,
    /// `--rate-limit`: requests per client address.
    pub rate: Option<rate::Limiter>,
}

impl HttpProxy {
    pub fn new(
        up: Arc<Upstreams>,
        cfg: HttpConfig,
        log: Option<Arc<access::AccessLog>>,
        client_tls: Arc<h2::ClientTls>,
    ) -> HttpProxy {
        let key_source = up.kind().key_source();
        let rate = cfg.rate_limit.as_ref().map(rate::Limiter::new);
        HttpProxy {
            rate,
            client_tls,
            up,
            cfg,
            key_source,
            log,
            tls: None,
            h2_backends: AtomicBool::new(false),
            accept_proxy: None,
        }
    }

    /// Whether there is a target; while there is none (no worker ready
    /// yet), waits a bounded time for one.
    async fn some_target(&self) -> bool {
        if !self.up.peek().is_empty() {
            return true;
        }
        let deadline = tokio::time::Instant::now() + self.cfg.wait_for_backend;
        loop {
            let changed = self.up.changed();
            if !self.up.peek().is_empty() {
                return true;
            }
            if !pool_changed(deadline, changed).await {
                return false;
            }
        }
    }

    /// Picks a target for one request at `now` (`Upstreams::now`); the
    /// lease counts it in flight. `split` is what a deploy's split hashes on,
    /// if it has a key.
    fn pick(
        &self,
        now: u64,
        key: Option<&Key<'_>>,
        split: Option<&Key<'_>>,
        avoid: Option<&Backend>,
    ) -> Result<Picked, PickError> {
        let pool = self.up.peek();
        let ctx = Ctx {
            now,
            rand: fastrand::u64(..),
            key: key.map(Key::as_slice),
        };
        pool.pick(&ctx, avoid, split.map(Key::as_slice))
    }
}

/// Waits for the pool to change (`changed`) until `deadline`; false then,
/// and at once when a stop begins (or has begun): a stopping cluster starts
/// no worker, so a request that waits for the first one (a crash loop that
/// gave up) gets its 503 now instead of holding the drain until `deadline`.
async fn pool_changed(
    deadline: tokio::time::Instant,
    changed: tokio::sync::futures::Notified<'_>,
) -> bool {
    let stop = stop_token();
    tokio::select! {
        r = tokio::time::timeout_at(deadline, changed) => r.is_ok(),
        _ = stop.cancelled() => false,
    }
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

/// Whether a failed connect to `label` was herd's own shortage
/// ([`crate::os::short_of_resources`]): then it is not the backend's
/// failure, no other backend would do better, and the client gets a 503.
/// Warns with a count at most once per 10 s process-wide, as the accept
/// loops do when descriptors run short (it comes with load).
pub(crate) fn own_shortage(label: &str, e: &std::io::Error) -> bool {
    use crate::os::listen::AcceptErrors;
    static FAILED: std::sync::Mutex<AcceptErrors> = std::sync::Mutex::new(AcceptErrors::new());
    if !crate::os::short_of_resources(e) {
        return false;
    }
    let due = FAILED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .failed(std::time::Instant::now());
    let why = "answering 503 (herd's own shortage, not counted against a backend)";
    match due {
        Some(1) => tracing::warn!("cannot open a connection to {label}: {e}; {why}"),
        Some(n) => tracing::warn!(
            "{n} connections could not be opened since the last warning, the last to {label}: {e}; {why}"
        ),
        None => {}
    }
    true
}

/// A backend failed a request (`why`): passive health counts it (nginx's
/// `max_fails`), and the operator is told, as nginx's error log tells
/// "upstream timed out" or "upstream prematurely closed connection". A
/// backend marked failed by it (at most once per `fail_timeout` each) is
/// always told; other failures are throttled ([`Told`]).
pub(crate) fn backend_failed(
    up: &Upstreams,
    lease: &herd_balance::Lease,
    label: &str,
    why: &dyn std::fmt::Display,
) {
    let marked = lease.failure(up.now());
    // A lone backend is never taken out (see `Balancer::pick`).
    if marked && up.peek().all_targets().nth(1).is_some() {
        let cfg = lease.backend().config();
        let out = Duration::from_nanos(cfg.fail_timeout);
        tracing::warn!(
            "{label}: {why}; taken out for {out:?} (max_fails={})",
            cfg.max_fails
        );
        return;
    }
    Told::Failed.warn(label, why);
}

/// How often a request that has waited a second on a worker's answer looks
/// whether health checks took the worker out as stopped or stuck
/// (`upstream::Target::is_stuck`); then, if the worker has not read it and
/// it may be sent twice, it goes to another worker.
pub(super) const STUCK_LOOK_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// The log's word for such a request.
pub(super) const STUCK_WHY: &str =
    "was taken out as stopped or stuck while a request waited on it; the request goes to another";

/// What the proxy tells of its backends' trouble. Each kind warns at once
/// the first time, then at most once per 10 s process-wide with how many
/// since, so a backend down under load costs a line per 10 s rather than
/// one per request, and one kind does not hide another.
#[derive(Clone, Copy)]
pub(crate) enum Told {
    /// A request failed on a backend before its answer began.
    Failed,
    /// A backend broke off an answer under way.
    Cut,
    /// No backend could be picked: a 503.
    NoneAvailable,
    /// Every backend held its `max_conns` for the whole wait: a 503.
    AllFull,
    /// `--accept-proxy`: a connection without a good PROXY header, closed.
    NoProxyHeader,
    /// A PROXY header herd did not expect (no `--accept-proxy`, an address
    /// it does not name, or a second one): a 400.
    UnexpectedProxyHeader,
    /// `--rate-limit`: a client over its rate, answered 429.
    RateLimited,
}

impl Told {
    /// `label` is formatted only when said (a flood of refusals costs no
    /// allocation each).
    pub(crate) fn warn(self, label: impl std::fmt::Display, why: &dyn std::fmt::Display) {
        use crate::os::listen::AcceptErrors;
        type Throttle = std::sync::Mutex<AcceptErrors>;
        static TOLD: [Throttle; 7] = [const { Throttle::new(AcceptErrors::new()) }; 7];
        let due = TOLD[self as usize]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .failed(std::time::Instant::now());
        let what = match self {
            Told::Failed => "backend failures",
            Told::Cut => "answers broken off",
            Told::NoneAvailable => "requests without a backend",
            Told::AllFull => "requests that waited in vain for room",
            Told::NoProxyHeader => "connections closed for their PROXY header",
            Told::UnexpectedProxyHeader => "PROXY headers answered 400",
            Told::RateLimited => "requests over --rate-limit answered 429",
        };
        match due {
            Some(1) => tracing::warn!("{label}: {why}"),
            Some(n) => {
                tracing::warn!("{n} {what} since the last warning, the last: {label}: {why}")
            }
            None => {}
        }
    }

    /// Every backend is taken out, unhealthy or draining: a 503, told as
    /// nginx tells "no live upstreams".
    pub(crate) fn none_available() {
        Told::NoneAvailable.warn(
            "no backend is available",
            &"all are taken out, unhealthy or draining; answering 503",
        );
    }

    /// A request (or TCP connection) waited `limit` for room under
    /// `max_conns`, as HAProxy logs a queue time-out; `then`, what it got.
    pub(crate) fn all_full(limit: Duration, then: &str) {
        let why = format_args!("none had room within {limit:?} (--connect-timeout); {then}");
        Told::AllFull.warn("every backend is at its max_conns", &why);
    }
}

/// The 503 of [`own_shortage`].
pub(crate) const SHORTAGE: &str = "herd is short of descriptors or ports\n";

/// A 503's body when every backend held its `max_conns` for the whole wait.
pub(crate) const ALL_FULL: &str = "every backend is at its max_conns\n";

/// How long a waiting request sleeps at most between two looks, should
/// room come without a lease ending (a backend back from a health check).
const QUEUE_LOOK: Duration = Duration::from_millis(50);

/// A request (or TCP connection) waiting for room at a backend that is up
/// but holds its `max_conns` (HAProxy's queue, where nginx answers 502 at
/// once). The end of a lease on such a backend wakes the longest waiting
/// one ([`upstream::ROOM`](crate::upstream::ROOM)), which picks again; it
/// waits at most `limit` in all (`--connect-timeout`, as HAProxy's
/// `timeout queue` defaults to its `timeout connect`).
#[derive(Default)]
pub(crate) struct Queued {
    until: Option<tokio::time::Instant>,
    /// Counted in [`WAITING`](crate::upstream::WAITING).
    counted: bool,
    /// Its place in the line for [`ROOM`](crate::upstream::ROOM), kept
    /// across looks so that one does not send it to the back.
    place: Option<std::pin::Pin<Box<tokio::sync::futures::Notified<'static>>>>,
}

impl Queued {
    /// Whether this request, which has not waited, would get ahead of
    /// requests already waiting: it waits once behind them first.
    pub(crate) fn barging(&self) -> bool {
        self.until.is_none() && crate::upstream::WAITING.load(Ordering::Relaxed) > 0
    }

    /// Waits for room; `false` once `limit` has passed since the first wait.
    pub(crate) async fn wait(&mut self, limit: Duration) -> bool {
        let now = tokio::time::Instant::now();
        let until = *self.until.get_or_insert(now + limit);
        if now >= until {
            self.served();
            return false;
        }
        if !self.counted {
            self.counted = true;
            crate::upstream::WAITING.fetch_add(1, Ordering::Relaxed);
        }
        let next = (now + QUEUE_LOOK).min(until);
        let place = self
            .place
            .get_or_insert_with(|| Box::pin(crate::upstream::ROOM.notified()));
        place.as_mut().enable();
        if tokio::time::timeout_at(next, place.as_mut()).await.is_ok() {
            self.place = None; // Woken: its turn is taken.
        }
        true
    }

    /// Waits no more: picked, or given up. (A turn it was given and did
    /// not take goes to the next in line when its place is dropped.)
    pub(crate) fn served(&mut self) {
        self.place = None;
        if std::mem::take(&mut self.counted) {
            crate::upstream::WAITING.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

impl Drop for Queued {
    fn drop(&mut self) {
        self.served();
    }
}

pub fn ip_key(ip: std::net::IpAddr) -> Key<'static> {
    let mut b = [0u8; 16];
    match ip.to_canonical() {
        std::net::IpAddr::V4(v4) => {
            b[..4].copy_from_slice(&v4.octets());
            Key::Ip(b, 4)
        }
        std::net::IpAddr::V6(v6) => Key::Ip(v6.octets(), 16),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::{ROOM, WAITING};

    /// Yields until `cond` holds, a bounded number of times.
    async fn until(cond: impl Fn() -> bool) -> bool {
        for _ in 0..100_000 {
            if cond() {
                return true;
            }
            tokio::task::yield_now().await;
        }
        cond()
    }

    /// Requests waiting for room are woken first come, first served, one
    /// per place freed; one that comes while others wait is behind them.
    #[tokio::test]
    async fn queued_requests_are_served_in_turn() {
        let order = Arc::new(std::sync::Mutex::new(Vec::new()));
        let mut tasks = Vec::new();
        for i in 0..4 {
            let order = order.clone();
            tasks.push(tokio::spawn(async move {
                let mut q = Queued::default();
                assert_eq!(q.barging(), i > 0, "request {i}");
                // Woken by a place freed, not by a look on its own (50 ms).
                while q.wait(Duration::from_secs(30)).await && q.place.is_some() {}
                order.lock().unwrap().push(i);
                q.served();
            }));
            // Each in line before the next comes.
            assert!(until(|| WAITING.load(Ordering::Relaxed) == i + 1).await);
        }
        for served in 1..=4 {
            ROOM.notify_one();
            assert!(until(|| order.lock().unwrap().len() == served).await);
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(*order.lock().unwrap(), [0, 1, 2, 3]);
        assert_eq!(WAITING.load(Ordering::Relaxed), 0);
    }
}
