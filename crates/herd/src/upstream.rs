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
use herd_balance::{Backend, BackendConfig, Balancer, StrategyKind};
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
        }
    }

    pub fn count_served(&self) {
        self.served.fetch_add(1, Relaxed);
    }

    pub fn requests(&self) -> u64 {
        self.served.load(Relaxed)
    }
}

/// A balancer with the targets it picks from, in the balancer's order.
pub struct Pool {
    pub balancer: Balancer,
    pub targets: Vec<Arc<Target>>,
}

impl Pool {
    fn new(kind: &StrategyKind, targets: Vec<Arc<Target>>) -> Pool {
        // The balancer lists primaries, then backups, each in given order.
        let (backups, mut ordered): (Vec<_>, Vec<_>) =
            targets.into_iter().partition(|t| t.backend.config().backup);
        ordered.extend(backups);
        let balancer = Balancer::new(
            kind.clone(),
            ordered.iter().map(|t| t.backend.clone()).collect(),
        );
        Pool {
            balancer,
            targets: ordered,
        }
    }
}

/// The current pool, swapped whole when it changes; readers never lock.
pub struct Upstreams {
    kind: StrategyKind,
    remote: Vec<Arc<Target>>,
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
            pool: ArcSwap::from_pointee(pool),
            changed: Notify::new(),
            epoch: Instant::now(),
        }
    }

    pub fn kind(&self) -> &StrategyKind {
        &self.kind
    }

    /// Ready workers first, then the remote upstreams.
    pub fn set_workers(&self, workers: Vec<Arc<Target>>) {
        let mut all = workers;
        all.extend(self.remote.iter().cloned());
        self.pool.store(Arc::new(Pool::new(&self.kind, all)));
        self.changed.notify_waiters();
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
        for t in &pool.targets {
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
