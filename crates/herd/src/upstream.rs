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

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

/// One place a connection or request can be sent.
pub struct Target {
    pub addr: SocketAddr,
    pub backend: Arc<Backend>,
    /// For logs: `worker 2` or `upstream 10.0.0.5:80`.
    pub label: String,
    /// Unique for the process's life: the proxy threads' idle connections
    /// to this target are filed under it.
    pub id: u64,
    ok_streak: AtomicU32,
    fail_streak: AtomicU32,
    /// Requests (HTTP) or connections (TCP) it has been given.
    served: AtomicU64,
    /// Its answers, when the proxy records them (`--admin`).
    pub answers: AnswerStats,
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
            ok_streak: AtomicU32::new(0),
            fail_streak: AtomicU32::new(0),
            served: AtomicU64::new(0),
            answers: AnswerStats::default(),
        }
    }

    pub fn count_served(&self) {
        self.served.fetch_add(1, Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.served.load(Relaxed)
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
    pub lease: Lease,
    pub target: Arc<Target>,
    pub stats: Option<Arc<AnswerStats>>,
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
                lease,
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
                        lease,
                        target,
                        stats: Some(stats.clone()),
                    });
                }
                Err(e) => err = e,
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

/// Answers by status class and latency: of one version during a deploy
/// (the analysis samples them), or of one target (for `/metrics`).
pub struct AnswerStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// 1xx … 5xx.
    pub classes: [AtomicU64; 5],
    /// Time to the answer's head, in half-octaves of microseconds.
    pub latency: [AtomicU64; LATENCY_BUCKETS],
}

pub const LATENCY_BUCKETS: usize = 64;

impl Default for AnswerStats {
    fn default() -> Self {
        AnswerStats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            classes: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }
}

impl AnswerStats {
    /// One answer: its status (or 502/504 when none came) and its latency.
    pub fn record(&self, status: u16, micros: u64) {
        self.requests.fetch_add(1, Relaxed);
        if status >= 500 {
            self.errors.fetch_add(1, Relaxed);
        }
        let class = usize::from(status / 100).clamp(1, 5) - 1;
        self.classes[class].fetch_add(1, Relaxed);
        self.latency[latency_bucket(micros)].fetch_add(1, Relaxed);
    }

    pub fn snapshot(&self) -> Sample {
        Sample {
            requests: self.requests.load(Relaxed),
            errors: self.errors.load(Relaxed),
            latency: std::array::from_fn(|i| self.latency[i].load(Relaxed)),
        }
    }
}

/// [`AnswerStats`] at one moment; differences of two are a window's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub requests: u64,
    pub errors: u64,
    pub latency: [u64; LATENCY_BUCKETS],
}

impl Default for Sample {
    fn default() -> Self {
        Sample {
            requests: 0,
            errors: 0,
            latency: [0; LATENCY_BUCKETS],
        }
    }
}

impl Sample {
    /// What happened between `earlier` and this one.
    pub fn since(&self, earlier: &Sample) -> Sample {
        Sample {
            requests: self.requests.saturating_sub(earlier.requests),
            errors: self.errors.saturating_sub(earlier.errors),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(earlier.latency[i])),
        }
    }

    /// 5xx answers per request, in percent.
    pub fn error_rate(&self) -> f64 {
        if self.requests == 0 {
            return 0.0;
        }
        self.errors as f64 * 100.0 / self.requests as f64
    }

    /// The 99th percentile latency, as the upper bound of its bucket.
    pub fn p99(&self) -> Option<std::time::Duration> {
        self.quantile(99)
    }

    /// The `pct`th percentile latency, as the upper bound of its bucket.
    pub fn quantile(&self, pct: u64) -> Option<std::time::Duration> {
        let total: u64 = self.latency.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = (total * pct).div_ceil(100).max(1);
        let mut seen = 0;
        for (i, n) in self.latency.iter().enumerate() {
            seen += n;
            if seen >= rank {
                return Some(std::time::Duration::from_micros(bucket_top(i)));
            }
        }
        None
    }
}

/// Classic Prometheus histogram buckets from the half-octave ones: one
/// bound per power of two from 64 µs to about 16.8 s, in seconds, with the
/// count of answers at or under it.
pub fn octave_buckets(latency: &[u64; LATENCY_BUCKETS]) -> Vec<(f64, u64)> {
    let mut out = Vec::new();
    let mut seen = 0;
    for (i, n) in latency.iter().enumerate() {
        seen += n;
        // Bucket 2l+1 ends just under 2^(l+1) µs.
        if i % 2 == 1 && (13..=49).contains(&i) {
            out.push(((1u64 << (i / 2 + 1)) as f64 / 1e6, seen));
        }
    }
    out.push((f64::INFINITY, seen));
    out
}

/// Latency counts of each target, sampled by the supervisor every few
/// seconds, so `herd status` can give p50 and p99 over the last minute.
#[derive(Default)]
pub struct LatencyWindow {
    samples: std::collections::HashMap<u64, std::collections::VecDeque<(Instant, Sample)>>,
}

impl LatencyWindow {
    /// How far back the window reaches.
    pub const SPAN: std::time::Duration = std::time::Duration::from_secs(60);

    /// Takes a sample of every target of `pool`; forgets targets gone.
    pub fn sample(&mut self, pool: &Pool, now: Instant) {
        let live: Vec<_> = pool.all_targets().collect();
        self.samples
            .retain(|id, _| live.iter().any(|t| t.id == *id));
        for t in live {
            let q = self.samples.entry(t.id).or_default();
            q.push_back((now, t.answers.snapshot()));
            while q.len() > 1
                && q.front()
                    .is_some_and(|(at, _)| now.duration_since(*at) > Self::SPAN)
            {
                q.pop_front();
            }
        }
    }

    /// `t`'s answers since the oldest sample in the window (or its start).
    pub fn of(&self, t: &Target) -> Sample {
        let now = t.answers.snapshot();
        match self.samples.get(&t.id).and_then(|q| q.front()) {
            Some((_, first)) => now.since(first),
            None => now,
        }
    }
}

/// Bucket of a latency: two per power of two.
fn latency_bucket(us: u64) -> usize {
    if us < 2 {
        return us as usize;
    }
    let l = 63 - us.leading_zeros() as usize; // floor(log2)
    let half = ((us >> (l - 1)) & 1) as usize;
    (2 * l + half).min(LATENCY_BUCKETS - 1)
}

/// The largest latency in bucket `i`.
fn bucket_top(i: usize) -> u64 {
    if i < 2 {
        return i as u64;
    }
    if i == LATENCY_BUCKETS - 1 {
        return u64::MAX; // everything longer
    }
    let (l, half) = (i / 2, i % 2);
    // Bucket (l, 0) holds [2^l, 1.5*2^l), (l, 1) holds [1.5*2^l, 2^(l+1)).
    let base = 1u64 << l.min(62);
    if half == 0 {
        base + base / 2 - 1
    } else {
        2 * base - 1
    }
}

/// The current pool, swapped whole when it changes; readers never lock.
pub struct Upstreams {
    kind: StrategyKind,
    remote: Vec<Arc<Target>>,
    /// The versions' counts during a deploy, kept across pool rebuilds.
    stats: std::sync::Mutex<Option<[Arc<AnswerStats>; 2]>>,
    /// Requests sent again to another backend (or a fresh connection), when
    /// the proxy records (`--admin`).
    pub retries: AtomicU64,
    pool: ArcSwap<Pool>,
    changed: Notify,
    /// The clock every pick, lease and health check uses.
    epoch: Instant,
}

impl Upstreams {
    pub fn new(kind: StrategyKind, remote: &[UpstreamSpec]) -> Upstreams {
        let remote: Vec<Arc<Target>> = remote
            .iter()
            .map(|u| {
                Arc::new(Target::new(
                    u.addr,
                    u.name.clone(),
                    format!("upstream {}", u.name),
                    u.config.clone(),
                ))
            })
            .collect();
        let pool = Pool::new(&kind, remote.clone());
        Upstreams {
            kind,
            remote,
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
        let mut all = workers;
        all.extend(self.remote.iter().cloned());
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

    /// Nanoseconds since the pool was created: the balancer's clock.
    pub fn now(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }
}

/// Checks every target of the current pool each interval, taking targets
/// out after `fall` failures in a row and back after `rise` passes.
pub async fn health_loop(up: Arc<Upstreams>, cfg: HealthConfig) {
    if cfg.interval.is_zero() {
        return;
    }
    let mut tick = tokio::time::interval(cfg.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let pool = up.current();
        let mut checks = tokio::task::JoinSet::new();
        for t in pool.all_targets() {
            let (t, cfg) = (t.clone(), cfg.clone());
            checks.spawn(async move {
                let res = check(&t, &cfg).await;
                record(&t, res, &cfg);
            });
        }
        while checks.join_next().await.is_some() {}
    }
}

fn record(t: &Target, res: Result<(), String>, cfg: &HealthConfig) {
    match res {
        Ok(()) => {
            t.fail_streak.store(0, Relaxed);
            let n = t.ok_streak.fetch_add(1, Relaxed) + 1;
            if !t.backend.is_healthy() && n >= cfg.rise {
                t.backend.set_healthy(true);
                tracing::info!("{} is healthy again ({n} checks passed)", t.label);
            }
        }
        Err(why) => {
            t.ok_streak.store(0, Relaxed);
            let n = t.fail_streak.fetch_add(1, Relaxed) + 1;
            if t.backend.is_healthy() && n >= cfg.fall {
                t.backend.set_healthy(false);
                tracing::warn!(
                    "{} is unhealthy ({n} checks failed, last: {why}); taken out",
                    t.label
                );
            }
        }
    }
}

async fn check(t: &Target, cfg: &HealthConfig) -> Result<(), String> {
    let work = async {
        let mut s = TcpStream::connect(t.addr)
            .await
            .map_err(|e| e.to_string())?;
        let Some(path) = &cfg.path else {
            return Ok(());
        };
        let req = format!(
            "GET {path} HTTP/1.1\r\nHost: {}\r\nUser-Agent: herd-health-check\r\nConnection: close\r\n\r\n",
            t.addr
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
    };
    tokio::time::timeout(cfg.timeout, work)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {:?}", cfg.timeout)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_hold_what_they_say() {
        for us in [0u64, 1, 2, 3, 5, 100, 1_000, 12_345, 1 << 40] {
            let b = latency_bucket(us);
            assert!(us <= bucket_top(b), "{us} above its bucket {b}");
            assert!(
                b == 0 || us > bucket_top(b - 1),
                "{us} belongs lower than {b}"
            );
        }
    }

    #[test]
    fn p99_and_error_rate_of_a_window() {
        let s = AnswerStats::default();
        for _ in 0..990 {
            s.record(200, 1_000);
        }
        for _ in 0..10 {
            s.record(503, 100_000);
        }
        let before = Sample::default();
        let w = s.snapshot().since(&before);
        assert_eq!(w.requests, 1000);
        assert!((w.error_rate() - 1.0).abs() < 1e-9);
        let p99 = w.p99().unwrap().as_micros() as u64;
        assert!((1_000..1_600).contains(&p99), "{p99}");
        s.record(200, 100_000);
        let p99 = s.snapshot().since(&before).p99().unwrap().as_micros();
        assert!(p99 >= 100_000, "the slow 1% now: {p99}");
    }

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
