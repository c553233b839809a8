//! Where proxied traffic goes: the targets (ready workers and remote
//! upstreams), the balancer over them, and their active health checks.
//!
//! The supervisor republishes the pool whenever a worker becomes ready or
//! goes away; each `Target` (with its `Arc<Backend>` state and its idle
//! connections) lives on across those rebuilds.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use arc_swap::ArcSwap;
use herd_balance::{
    Backend, BackendConfig, Balancer, Ctx, KeySource, Lease, PickError, StrategyKind,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::config::{HealthConfig, UpstreamSpec};

pub mod discover;
pub mod reuse;
mod stats;
pub use stats::{AnswerStats, LATENCY_BUCKETS, LatencyWindow, Sample, octave_buckets};

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// How long a request or connection that no target can take waits for the
/// pool to change after a worker failed it: see [`Upstreams::replaced`].
const REPLACE_WAIT: std::time::Duration = std::time::Duration::from_millis(500);

/// Where a target is reached, as logs show it (nginx's `$upstream_addr`):
/// `127.0.0.1:41915`, or `unix:/run/…/s0.1` for a worker on its socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place<'a> {
    Tcp(SocketAddr),
    Unix(&'a std::path::Path),
}

impl std::fmt::Display for Place<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Place::Tcp(a) => a.fmt(f),
            Place::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

impl serde::Serialize for Place<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// One place a connection or request can be sent.
pub struct Target {
    pub addr: SocketAddr,
    pub backend: Arc<Backend>,
    /// For logs: `worker 2` or `upstream 10.0.0.5:80`.
    pub label: String,
    /// Unique for the process's life: the proxy threads' idle connections
    /// to this target are filed under it.
    pub id: u64,
    /// It speaks HTTP/2 (h2c, or h2 by ALPN over TLS), not HTTP/1.1.
    pub h2: bool,
    /// `Some(name)`: herd speaks TLS to it, checking its certificate for `name`.
    pub tls: Option<String>,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Out by health checks that found it stopped or stuck (a worker).
    stuck: std::sync::atomic::AtomicBool,
    /// [`Target::progress`] when its last health check began.
    checked_progress: AtomicU64,
    /// Requests (HTTP) or connections (TCP) it has been given.
    served: AtomicU64,
    /// Its answers by status class and latency (for `/metrics` and the
    /// p50/p99 of `herd status`: three atomic adds per request).
    pub answers: AnswerStats,
    /// Whether idle connections to it are kept: shared by one program's
    /// workers, and held by the proxy threads' idle lists.
    pub reuse: Arc<reuse::Reuse>,
    /// A worker's process (not a remote upstream's).
    pub pid: Option<u32>,
    /// Once connections to it are not kept (see [`reuse`]): the most
    /// herd opens at once, its backlog less one, read once.
    pub slots: std::sync::OnceLock<Option<Arc<tokio::sync::Semaphore>>>,
    /// A worker that serves on a Unix socket (`--worker-socket`): its
    /// path, connected to instead of `addr`.
    pub unix: Option<Arc<std::path::Path>>,
}

impl Target {
    /// `name` is the backend's identity for consistent hashing: a worker's
    /// is its slot, so a restarted worker keeps its keys.
    pub fn new(addr: SocketAddr, name: String, label: String, cfg: BackendConfig) -> Target {
        Target {
            addr,
            backend: Arc::new(Backend::new(name, cfg)),
            label,
            id: NEXT_ID.fetch_add(1, Relaxed),
            h2: false,
            tls: None,
            ok_streak: AtomicU32::new(0),
            stuck: std::sync::atomic::AtomicBool::new(false),
            checked_progress: AtomicU64::new(0),
            fail_streak: AtomicU32::new(0),
            served: AtomicU64::new(0),
            answers: AnswerStats::default(),
            reuse: Arc::default(),
            pid: None,
            slots: std::sync::OnceLock::new(),
            unix: None,
        }
    }

    /// The same worker (name, settings, shared [`Reuse`](reuse::Reuse)),
    /// run by `pid`, reached at `addr` or on the Unix socket `unix`: a new
    /// target, with counts and idle connections of its own.
    pub fn reached_at(
        &self,
        addr: SocketAddr,
        unix: Option<Arc<std::path::Path>>,
        pid: u32,
    ) -> Arc<Target> {
        let (name, label) = (self.backend.name().to_string(), self.label.clone());
        Arc::new(
            Target::new(addr, name, label, self.backend.config().clone())
                .speaking_h2(self.h2)
                .reusing(self.reuse.clone())
                .run_by(pid)
                .on_unix(unix),
        )
    }

    /// A worker serving on the Unix socket at `path`.
    pub fn on_unix(mut self, path: Option<Arc<std::path::Path>>) -> Target {
        self.unix = path;
        self
    }

    /// Where it is reached, for logs.
    pub fn place(&self) -> Place<'_> {
        match &self.unix {
            Some(p) => Place::Unix(p),
            None => Place::Tcp(self.addr),
        }
    }

    /// Marks it as an h2c backend (`,h2`, `--backend-protocol h2`).
    pub fn speaking_h2(mut self, h2: bool) -> Target {
        self.h2 = h2;
        self
    }

    /// A worker, run by process `pid`.
    pub fn run_by(mut self, pid: u32) -> Target {
        self.pid = Some(pid);
        self
    }

    /// Shares `reuse` with other targets (one program's workers).
    pub fn reusing(mut self, reuse: Arc<reuse::Reuse>) -> Target {
        self.reuse = reuse;
        self
    }

    /// How herd speaks to it (`,h2`, `,tls`).
    pub fn speaking(mut self, d: Dialect) -> Target {
        self.h2 = d.h2;
        self.tls = d.tls;
        self
    }

    pub fn count_served(&self) {
        self.served.fetch_add(1, Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.served.load(Relaxed)
    }

    /// Out by health checks that found it stopped or stuck: requests
    /// waiting on it that may be sent again go to another (`proxy::h1`).
    pub fn is_stuck(&self) -> bool {
        self.stuck.load(Relaxed)
    }

    /// Moves whenever it answers: answers other than 5xx (herd's own 502
    /// and 504 for it are counted there too), and bytes of answers, tunnels
    /// and TCP mode it sent. Not bytes sent to it: its kernel takes those
    /// while it is stopped.
    fn progress(&self) -> u64 {
        let a = &self.answers;
        a.classes[..4].iter().map(|c| c.load(Relaxed)).sum::<u64>()
            + a.bytes_to_client.load(Relaxed)
    }
}

/// A target shows as its label (`worker 2`, `upstream 10.0.0.5:80`).
impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.label)
    }
}

/// A balancer with the targets it picks from, in the balancer's order,
/// and, during a deploy, the new version's beside them.
pub struct Pool {
    pub balancer: Balancer,
    pub targets: Vec<Arc<Target>>,
    canary: Option<Canary>,
}

/// A deploy's share of the traffic: `percent` of the requests (or
/// connections) go to the new version's workers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Split {
    pub percent: u8,
    /// What keeps a user on one version: a hash of the client address, a
    /// header or a cookie; `KeySource::None` splits at random.
    pub by: KeySource,
}

struct Canary {
    balancer: Balancer,
    targets: Vec<Arc<Target>>,
    split: Split,
    /// The stable version's, then the new one's.
    stats: [Arc<AnswerStats>; 2],
}

/// What a pick chose: the lease counts the request in flight; `stats` is
/// its version's, during a deploy.
pub struct Picked {
    pub lease: Held,
    pub target: Arc<Target>,
    pub stats: Option<Arc<AnswerStats>>,
}

/// Wakes a request waiting for room under `max_conns` when a lease on a
/// backend that has one ends: one at a time, the longest waiting first
/// (tokio's `Notify` is first in, first out), as HAProxy's queue serves.
/// One for the process, which serves one cluster.
pub static ROOM: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// Requests waiting on [`ROOM`]: while there are any, a new request waits
/// behind them rather than taking a place that frees before they wake.
pub static WAITING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// A pick's lease. Its end wakes one waiting request ([`ROOM`]) if its
/// backend has a `max_conns`, after the count went down: fields are
/// dropped in order, the lease first.
pub struct Held {
    lease: Lease,
    _room: Roomed,
}

impl Held {
    fn new(lease: Lease) -> Held {
        let limited = lease.backend().config().max_conns != 0;
        Held {
            lease,
            _room: Roomed(limited),
        }
    }
}

impl std::ops::Deref for Held {
    type Target = Lease;
    fn deref(&self) -> &Lease {
        &self.lease
    }
}

struct Roomed(bool);

impl Drop for Roomed {
    fn drop(&mut self) {
        if self.0 {
            ROOM.notify_one();
        }
    }
}

impl Pool {
    fn new(kind: &StrategyKind, targets: Vec<Arc<Target>>) -> Pool {
        let (balancer, targets) = balanced(kind, targets);
        Pool {
            balancer,
            targets,
            canary: None,
        }
    }

    /// No target at all, of any version.
    pub fn is_empty(&self) -> bool {
        self.targets.is_empty() && self.canary.as_ref().is_none_or(|c| c.targets.is_empty())
    }

    pub fn all_targets(&self) -> impl Iterator<Item = &Arc<Target>> {
        self.targets
            .iter()
            .chain(self.canary.iter().flat_map(|c| c.targets.iter()))
    }

    /// What the deploy's split hashes on (`None` without a deploy).
    pub fn split_source(&self) -> &KeySource {
        self.canary
            .as_ref()
            .map_or(&KeySource::None, |c| &c.split.by)
    }

    /// Picks a target. During a deploy the split chooses the version first
    /// (by `split_key`, else at random) and the strategy a target in it; a
    /// version with nothing to pick gives way to the other.
    pub fn pick(
        &self,
        ctx: &Ctx<'_>,
        avoid: Option<&Backend>,
        split_key: Option<&[u8]>,
    ) -> Result<Picked, PickError> {
        let Some(c) = &self.canary else {
            let lease = self.balancer.pick_except(ctx, avoid)?;
            let target = self.targets[lease.index()].clone();
            return Ok(Picked {
                lease: Held::new(lease),
                target,
                stats: None,
            });
        };
        let bucket = split_key.map_or_else(next_bucket, |k| bucket_hash(k) % 100);
        let new_first = bucket < u64::from(c.split.percent);
        let mut err = PickError::Empty;
        for new in [new_first, !new_first] {
            let (b, t, stats) = if new {
                (&c.balancer, &c.targets, &c.stats[1])
            } else {
                (&self.balancer, &self.targets, &c.stats[0])
            };
            match b.pick_except(ctx, avoid) {
                Ok(lease) => {
                    let target = t[lease.index()].clone();
                    return Ok(Picked {
                        lease: Held::new(lease),
                        target,
                        stats: Some(stats.clone()),
                    });
                }
                // Worth a wait if either version only needs room.
                Err(e) if err != PickError::Full => err = e,
                Err(_) => {}
            }
        }
        Err(err)
    }
}

thread_local! {
    static TURN: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
}

/// The split's bucket (0..100) for a request without a key: each run of
/// 100 on a thread takes every bucket once (37 is prime to 100, so the
/// order interleaves), so the new version gets its share exactly, not
/// just on average.
pub(crate) fn next_bucket() -> u64 {
    TURN.with(|t| {
        let n = t.get();
        t.set(n.wrapping_add(1));
        n % 100 * 37 % 100
    })
}

/// FNV-1a: stable across runs and hosts, so a key keeps its version.
pub(crate) fn bucket_hash(key: &[u8]) -> u64 {
    key.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// The balancer lists primaries, then backups, each in given order.
fn balanced(kind: &StrategyKind, targets: Vec<Arc<Target>>) -> (Balancer, Vec<Arc<Target>>) {
    let (backups, mut ordered): (Vec<_>, Vec<_>) =
        targets.into_iter().partition(|t| t.backend.config().backup);
    ordered.extend(backups);
    let balancer = Balancer::new(
        kind.clone(),
        ordered.iter().map(|t| t.backend.clone()).collect(),
    );
    (balancer, ordered)
}

/// What `set_workers` takes: the ready workers, and a deploy's new ones.
type WorkerSet = (Vec<Arc<Target>>, Option<(Vec<Arc<Target>>, Split)>);

/// The remote backends: given on the command line, and found in DNS.
struct Remote {
    fixed: Vec<Arc<Target>>,
    found: Vec<Arc<Target>>,
}

/// The current pool, swapped whole when it changes; readers never lock.
pub struct Upstreams {
    kind: StrategyKind,
    /// `--upstream`s, then the backends DNS gave (`discover`).
    remote: std::sync::Mutex<Remote>,
    /// What the last `set_workers` was given, to rebuild the pool when
    /// DNS changes the remote backends.
    last: std::sync::Mutex<WorkerSet>,
    /// The versions' counts during a deploy, kept across pool rebuilds.
    stats: std::sync::Mutex<Option<[Arc<AnswerStats>; 2]>>,
    /// Requests sent again to another backend (or a fresh connection).
    pub retries: AtomicU64,
    pool: ArcSwap<Pool>,
    changed: Notify,
    /// The clock every pick, lease and health check uses.
    epoch: Instant,
}

/// How herd speaks to a remote backend: HTTP/2 or not, TLS (and the name
/// its certificate must hold) or not.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Dialect {
    pub h2: bool,
    pub tls: Option<String>,
}

impl Dialect {
    /// A discovered backend's, its certificate checked for `name`.
    pub fn of(l: &crate::config::Discovery, name: &str) -> Dialect {
        Dialect {
            h2: l.h2,
            tls: l.tls.then(|| name.to_string()),
        }
    }

    /// An `--upstream`'s: the name is its host, without the port (one on a
    /// Unix socket is never `tls`).
    fn of_spec(u: &UpstreamSpec) -> Dialect {
        let host = match u.name.rsplit_once(':') {
            Some((h, _)) => h.trim_start_matches('[').trim_end_matches(']'),
            None => u.name.as_str(),
        };
        Dialect {
            h2: u.h2,
            tls: u.tls.then(|| host.to_string()),
        }
    }
}

/// An `--upstream`'s target.
fn fixed_target(u: &UpstreamSpec) -> Target {
    Target::new(
        u.addr,
        u.name.clone(),
        format!("upstream {}", u.name),
        u.config.clone(),
    )
    .speaking(Dialect::of_spec(u))
    .on_unix(u.unix.as_deref().map(Arc::from))
}

impl Upstreams {
    pub fn new(kind: StrategyKind, remote: &[UpstreamSpec]) -> Upstreams {
        let remote: Vec<Arc<Target>> = remote.iter().map(|u| Arc::new(fixed_target(u))).collect();
        let pool = Pool::new(&kind, remote.clone());
        Upstreams {
            kind,
            remote: std::sync::Mutex::new(Remote {
                fixed: remote,
                found: Vec::new(),
            }),
            last: std::sync::Mutex::new((Vec::new(), None)),
            stats: std::sync::Mutex::new(None),
            retries: AtomicU64::new(0),
            pool: ArcSwap::from_pointee(pool),
            changed: Notify::new(),
            epoch: Instant::now(),
        }
    }

    pub fn kind(&self) -> &StrategyKind {
        &self.kind
    }

    /// Ready workers first, then the remote upstreams; during a deploy,
    /// the new version's ready workers and the split.
    pub fn set_workers(&self, workers: Vec<Arc<Target>>, new: Option<(Vec<Arc<Target>>, Split)>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = (workers.clone(), new.clone());
        let mut all = workers;
        {
            let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            all.extend(remote.fixed.iter().cloned());
            all.extend(remote.found.iter().cloned());
        }
        let mut pool = Pool::new(&self.kind, all);
        let mut kept = self.stats.lock().unwrap_or_else(|e| e.into_inner());
        match new {
            Some((targets, split)) => {
                let stats = kept.get_or_insert_with(Default::default).clone();
                let (balancer, targets) = balanced(&self.kind, targets);
                pool.canary = Some(Canary {
                    balancer,
                    targets,
                    split,
                    stats,
                });
            }
            None => *kept = None,
        }
        self.pool.store(Arc::new(pool));
        self.changed.notify_waiters();
    }

    /// `--upstream`s read again (`herd reload`): one whose address,
    /// parameters and protocol did not change keeps its target (health,
    /// counts); others come and go as DNS-found ones do. Returns how many
    /// came and went.
    pub fn set_fixed(&self, specs: &[UpstreamSpec]) -> (usize, usize) {
        self.replace(
            |r| &mut r.fixed,
            specs,
            |t, u| {
                let d = Dialect::of_spec(u);
                t.addr == u.addr
                    && t.unix.as_deref() == u.unix.as_deref()
                    && t.backend.name() == u.name
                    && *t.backend.config() == u.config
                    && t.h2 == d.h2
                    && t.tls == d.tls
            },
            fixed_target,
        )
    }

    /// The backends DNS gives now (`discover`): a backend already known by
    /// its address keeps its target (in-flight count, EWMA, health); one
    /// that went drains through the leases its requests hold. Returns how
    /// many came and went.
    pub fn set_found(
        &self,
        found: Vec<(SocketAddr, String, BackendConfig, Dialect)>,
    ) -> (usize, usize) {
        self.replace(
            |r| &mut r.found,
            found,
            |t, (addr, _, cfg, d)| {
                t.addr == *addr && *t.backend.config() == *cfg && t.h2 == d.h2 && t.tls == d.tls
            },
            |(addr, label, cfg, d)| {
                Target::new(
                    addr,
                    addr.to_string(),
                    format!("upstream {addr} ({label})"),
                    cfg,
                )
                .speaking(d)
            },
        )
    }

    /// Replaces one list of remote targets with `wanted`: a wanted one that
    /// `same` finds among the old keeps its target, others are made anew.
    /// The pool is rebuilt if any came or went; returns how many.
    fn replace<W>(
        &self,
        list: fn(&mut Remote) -> &mut Vec<Arc<Target>>,
        wanted: impl IntoIterator<Item = W>,
        same: impl Fn(&Target, &W) -> bool,
        make: impl Fn(W) -> Target,
    ) -> (usize, usize) {
        let (came, went) = {
            let mut remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
            let list = list(&mut remote);
            let old = std::mem::take(list);
            let next: Vec<Arc<Target>> = wanted
                .into_iter()
                .map(|w| match old.iter().find(|t| same(t, &w)) {
                    Some(t) => t.clone(),
                    None => Arc::new(make(w)),
                })
                .collect();
            let came = next
                .iter()
                .filter(|t| !old.iter().any(|o| Arc::ptr_eq(o, t)))
                .count();
            let went = old
                .iter()
                .filter(|o| !next.iter().any(|t| Arc::ptr_eq(o, t)))
                .count();
            *list = next;
            (came, went)
        };
        if came + went > 0 {
            let (workers, new) = self.last.lock().unwrap_or_else(|e| e.into_inner()).clone();
            self.set_workers(workers, new);
        }
        (came, went)
    }

    /// The remote backends as `herd status` lists them.
    pub fn remote_rows(&self) -> Vec<crate::control::UpstreamRow> {
        let remote = self.remote.lock().unwrap_or_else(|e| e.into_inner());
        remote
            .fixed
            .iter()
            .chain(&remote.found)
            .map(|t| crate::control::UpstreamRow {
                name: t.label.clone(),
                healthy: t.backend.is_healthy(),
                taken_out: t.backend.is_failed(),
                in_flight: t.backend.in_flight(),
                max_conns: t.backend.config().max_conns,
                requests: t.requests(),
            })
            .collect()
    }

    /// The versions' counts (stable, new) during a deploy.
    pub fn version_stats(&self) -> Option<[Arc<AnswerStats>; 2]> {
        self.stats.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The pool, to hold across awaits (costs a shared refcount bump).
    pub fn current(&self) -> Arc<Pool> {
        self.pool.load_full()
    }

    /// The pool for a moment, without touching its shared refcount: the
    /// per-request path picks under this and keeps only the target.
    pub fn peek(&self) -> arc_swap::Guard<Arc<Pool>> {
        self.pool.load()
    }

    /// Resolves after the next `set_workers`. Create it before looking at
    /// the pool so a change in between is not missed.
    pub fn changed(&self) -> tokio::sync::futures::Notified<'_> {
        self.changed.notified()
    }

    /// Whether a retry's pick gave back `avoid`, the backend that just
    /// failed it, as the only one left (then see [`Upstreams::replaced`]).
    pub fn came_back(avoid: &Option<Arc<Backend>>, picked: &Arc<Backend>) -> bool {
        avoid.as_ref().is_some_and(|a| Arc::ptr_eq(a, picked))
    }

    /// After a worker failed a request or connection (`failed`, the
    /// backend its retry avoids) and no other target can take it (the
    /// pick gave `failed` back as the only one left, or nothing): whether
    /// the pool changed by `until` (set on first use, [`REPLACE_WAIT`] on),
    /// so the retry may go. A worker that died stays in the pool until the
    /// supervisor has seen its exit, some milliseconds; retrying at once
    /// sent every retry of that moment to it again, and then a 502, though
    /// a replacement was on its way. A remote upstream is retried at once,
    /// as in nginx, and a request that no worker has failed yet is not
    /// held (every worker out by health: a 503 at once, as before).
    pub async fn replaced(
        &self,
        failed: Option<&Backend>,
        until: &mut Option<tokio::time::Instant>,
    ) -> bool {
        let Some(failed) = failed else {
            return false;
        };
        let changed = self.changed();
        match self
            .peek()
            .all_targets()
            .find(|t| std::ptr::eq(&*t.backend, failed))
        {
            // Gone already: go again at once.
            None => return true,
            Some(t) if t.pid.is_none() => return false,
            Some(_) => {}
        }
        let by = *until.get_or_insert_with(|| tokio::time::Instant::now() + REPLACE_WAIT);
        tokio::time::timeout_at(by, changed).await.is_ok()
    }

    /// Nanoseconds since the pool was created: the balancer's clock.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Checks every target of the current pool each interval, taking targets
/// out after `fall` failures in a row and back after `rise` passes. While a
/// target is on its way out or back (a streak begun, not yet complete),
/// the next check comes after a quarter of the interval, as HAProxy's
/// `fastinter`: a stopped worker, which every request sent to it waits on,
/// goes out about twice as soon, and a target that recovered comes back
/// as soon, while a steady pool is checked no more often.
///
/// It ends when `stop` is cancelled (the cluster stops or upgrades): the
/// workers then close their sockets as they stop, and checks would only
/// log them unhealthy.
pub async fn health_loop(
    up: Arc<Upstreams>,
    cfg: HealthConfig,
    stop: tokio_util::sync::CancellationToken,
) {
    stop.run_until_cancelled(check_loop(up, cfg)).await;
}

async fn check_loop(up: Arc<Upstreams>, cfg: HealthConfig) {
    if cfg.interval.is_zero() {
        return;
    }
    let fast = cfg.interval / 4;
    let mut next = tokio::time::Instant::now();
    loop {
        tokio::time::sleep_until(next).await;
        let began = tokio::time::Instant::now();
        let pool = up.current();
        // A stuck worker goes out only while another backend stays in to
        // take its requests: with every worker busy for long (a CPU-bound
        // app under load), taking them all out would answer 503 to all.
        let staying = Arc::new(std::sync::atomic::AtomicUsize::new(
            pool.all_targets()
                .filter(|t| t.backend.is_healthy())
                .count(),
        ));
        let mut checks = tokio::task::JoinSet::new();
        for t in pool.all_targets() {
            let (t, cfg, staying) = (t.clone(), cfg.clone(), staying.clone());
            // Each check says whether its target is now on its way (a
            // streak it advanced, not yet complete).
            checks.spawn(async move {
                match check(&t, &cfg).await {
                    Err(Failure::NotMade(e)) => {
                        tracing::debug!("{}: check not made: {e}", t.label);
                        return false;
                    }
                    Err(Failure::Backend(why)) => record(&t, Err((why, false)), &cfg),
                    Err(Failure::Stuck(why)) => {
                        let goes_out =
                            t.backend.is_healthy() && t.fail_streak.load(Relaxed) + 1 >= cfg.fall;
                        if goes_out
                            && staying
                                .fetch_update(Relaxed, Relaxed, |n| (n > 1).then(|| n - 1))
                                .is_err()
                        {
                            // Not counted: no quicker checks of it either.
                            tracing::debug!("{}: {why}; kept in, as no other is", t.label);
                            return false;
                        }
                        record(&t, Err((why, true)), &cfg)
                    }
                    Ok(()) => record(&t, Ok(()), &cfg),
                }
                if t.backend.is_healthy() {
                    t.fail_streak.load(Relaxed) > 0
                } else {
                    t.ok_streak.load(Relaxed) > 0
                }
            });
        }
        let mut moving = false;
        while let Some(on_its_way) = checks.join_next().await {
            moving |= on_its_way.unwrap_or(false);
        }
        next = began + if moving { fast } else { cfg.interval };
    }
}

/// `Err((why, stuck))`: `stuck` when the worker was found stopped or stuck.
fn record(t: &Target, res: Result<(), (String, bool)>, cfg: &HealthConfig) {
    match res {
        Ok(()) => {
            t.fail_streak.store(0, Relaxed);
            let n = t.ok_streak.fetch_add(1, Relaxed) + 1;
            if !t.backend.is_healthy() && n >= cfg.rise {
                t.stuck.store(false, Relaxed);
                t.backend.set_healthy(true);
                tracing::info!("{} is healthy again ({n} checks passed)", t.label);
            }
        }
        Err((why, stuck)) => {
            t.ok_streak.store(0, Relaxed);
            let n = t.fail_streak.fetch_add(1, Relaxed) + 1;
            if t.backend.is_healthy() && n >= cfg.fall {
                t.backend.set_healthy(false);
                tracing::warn!(
                    "{} is unhealthy ({n} checks failed, last: {why}); taken out",
                    t.label
                );
            }
            if !t.backend.is_healthy() {
                t.stuck.store(stuck, Relaxed);
            }
        }
    }
}

/// Why a check did not pass.
enum Failure {
    /// The target's doing (or its network's): counts toward `fall`.
    Backend(String),
    /// A worker that accepted nothing and answered nothing: the same, and
    /// requests waiting on it are sent to another once it is out.
    Stuck(String),
    /// herd could not open a connection (short of descriptors or ports):
    /// nothing learnt of the target, nothing counted.
    NotMade(std::io::Error),
}

impl From<String> for Failure {
    fn from(why: String) -> Failure {
        Failure::Backend(why)
    }
}

async fn check(t: &Target, cfg: &HealthConfig) -> Result<(), Failure> {
    let started = tokio::time::Instant::now();
    // What it answered since the last check began counts, not only during
    // this one: a worker busy with answers that take longer than a check
    // is not stuck.
    let progress = t.checked_progress.swap(t.progress(), Relaxed);
    let work = async {
        let refused = |e: std::io::Error| {
            if crate::os::short_of_resources(&e) {
                Failure::NotMade(e)
            } else {
                Failure::Backend(e.to_string())
            }
        };
        let on = Checked {
            t,
            cfg,
            progress,
            started,
        };
        match &t.unix {
            Some(unix) => {
                let s = crate::os::connect_unix(unix, &mut false)
                    .await
                    .map_err(refused)?;
                let look = |s: &tokio::net::UnixStream| {
                    use std::os::fd::AsFd;
                    crate::os::diag::unix_server_end(s.as_fd())
                };
                on.connection(s, look, "localhost").await
            }
            None => {
                let s = TcpStream::connect(t.addr).await.map_err(refused)?;
                let look = |s: &TcpStream| match s.local_addr() {
                    Ok(ours) => crate::os::diag::server_end(ours, t.addr),
                    Err(_) => Ok(None),
                };
                on.connection(s, look, &t.addr.to_string()).await
            }
        }
    };
    tokio::time::timeout(cfg.timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", cfg.timeout).into()))
}

/// `GET PATH` over HTTP/1.1 on `s`: 2xx or 3xx passes.
async fn get<S>(mut s: S, host: &str, path: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: herd-health-check\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| e.to_string())?;
    let mut buf = [0u8; 64];
    let mut got = 0;
    while got < 12 {
        let n = s.read(&mut buf[got..]).await.map_err(|e| e.to_string())?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = String::from_utf8_lossy(&buf[..got]);
    match head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse::<u16>().ok())
    {
        Some(code) if (200..400).contains(&code) => Ok(()),
        Some(code) => Err(format!("GET {path} answered {code}")),
        None => Err(format!("GET {path}: no HTTP answer")),
    }
}

/// A worker's TCP check: the kernel completes the handshake for a process
/// that is stopped (SIGSTOP) or stuck in a loop, so a connect alone passes
/// for a worker that serves nothing, and every request sent to it waits
/// for `--response-timeout`. The worker must also accept the connection by
/// `window` (most of `--health-timeout`; read from the socket table,
/// `os::diag`). One that does not passes all the same if it answered
/// anything meanwhile (busy, not stuck), or if it sleeps (a server of one
/// connection at a time, waiting on another).
async fn accepted_within(
    server_end: impl Fn() -> Result<Option<crate::os::diag::ServerEnd>, crate::os::diag::DiagError>,
    t: &Target,
    pid: u32,
    progress: u64,
    started: tokio::time::Instant,
    window: std::time::Duration,
) -> Result<(), String> {
    const LOOK_EVERY: std::time::Duration = std::time::Duration::from_millis(25);
    loop {
        match server_end() {
            Ok(Some(e)) if !e.accepted => {}
            // Accepted, not a socket of this host, or not known: passed.
            _ => return Ok(()),
        }
        if started.elapsed() + LOOK_EVERY > window {
            break;
        }
        tokio::time::sleep(LOOK_EVERY).await;
    }
    if t.progress() != progress || crate::os::diag::asleep(pid) != Some(false) {
        return Ok(());
    }
    Err(format!(
        "accepted no connection and answered nothing for {window:?}: stopped or stuck"
    ))
}

/// One health check of `t`, and when it began.
struct Checked<'a> {
    t: &'a Target,
    cfg: &'a HealthConfig,
    /// [`Target::progress`] when the last check began.
    progress: u64,
    started: tokio::time::Instant,
}

impl Checked<'_> {
    /// The check on a connection made to the target (TCP or Unix): with no
    /// `--health-path`, that a worker accepts it (`look` reads the server's
    /// end from the socket table); else `GET PATH` as `host`, over HTTP/2
    /// for an h2 target. A TLS target's check is the connect.
    async fn connection<S>(
        &self,
        s: S,
        look: impl Fn(&S) -> Result<Option<crate::os::diag::ServerEnd>, crate::os::diag::DiagError>,
        host: &str,
    ) -> Result<(), Failure>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        let (t, cfg) = (self.t, self.cfg);
        let Some(path) = &cfg.path else {
            let Some(pid) = t.pid else {
                return Ok(());
            };
            let window = cfg.timeout.mul_f64(0.9);
            return accepted_within(|| look(&s), t, pid, self.progress, self.started, window)
                .await
                .map_err(Failure::Stuck);
        };
        if t.tls.is_some() {
            // (`--health-path` is not sent.)
            return Ok(());
        }
        if t.h2 {
            return Ok(check_h2(s, host, path).await?);
        }
        Ok(get(s, host, path).await?)
    }
}

/// `GET PATH` to an h2c backend.
async fn check_h2<S>(s: S, host: &str, path: &str) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .handshake::<_, http_body_util::Empty<bytes::Bytes>>(TokioIo::new(s))
        .await
        .map_err(|e| format!("HTTP/2 handshake: {e}"))?;
    tokio::spawn(conn);
    let req = hyper::Request::get(format!("http://{host}{path}"))
        .header(hyper::header::USER_AGENT, "herd-health-check")
        .body(http_body_util::Empty::new())
        .map_err(|e| e.to_string())?;
    let code = send
        .send_request(req)
        .await
        .map_err(|e| format!("GET {path}: {e}"))?
        .status()
        .as_u16();
    if (200..400).contains(&code) {
        Ok(())
    } else {
        Err(format!("GET {path} answered {code}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_split_sends_its_percent_and_a_key_always_the_same_way() {
        let t = |name: &str| {
            Arc::new(Target::new(
                "127.0.0.1:1".parse().unwrap(),
                name.into(),
                name.into(),
                BackendConfig::default(),
            ))
        };
        let up = Upstreams::new(StrategyKind::RoundRobin, &[]);
        let split = Split {
            percent: 20,
            by: KeySource::None,
        };
        up.set_workers(vec![t("old")], Some((vec![t("new")], split)));
        let pool = up.current();
        let mut rng = fastrand::Rng::with_seed(7);
        let mut new = 0;
        for _ in 0..10_000 {
            let ctx = Ctx {
                now: 0,
                rand: rng.u64(..),
                key: None,
            };
            let p = pool.pick(&ctx, None, None).unwrap();
            new += usize::from(p.target.label == "new");
        }
        assert_eq!(new, 2_000, "exactly the share");
        let ctx = Ctx {
            now: 0,
            rand: 0,
            key: None,
        };
        let first = pool
            .pick(&ctx, None, Some(b"user-42"))
            .unwrap()
            .target
            .label
            .clone();
        for r in 0..100u64 {
            let ctx = Ctx {
                now: 0,
                rand: r.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                key: None,
            };
            assert_eq!(
                pool.pick(&ctx, None, Some(b"user-42"))
                    .unwrap()
                    .target
                    .label,
                first
            );
        }
    }
}
