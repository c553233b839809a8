//! Per-backend state shared by every pick and every pool version: in-flight
//! count, passive health (nginx's `max_fails`/`fail_timeout`), draining,
//! active-check health, and the peak-EWMA response time. All atomics, so a
//! pick takes no lock; a pool rebuilt when workers come and go keeps the
//! same `Arc<Backend>`s and therefore their counts.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU32, AtomicU64, Ordering::Relaxed};

use crate::Nanos;

const DRAINING: u8 = 1;
const UNHEALTHY: u8 = 2;
const FAILED: u8 = 4;
const BUSY: u8 = 8;

/// Response-time estimate used before a backend has answered anything.
const DEFAULT_RTT_NS: f64 = 1_000_000.0;
/// Floor of the estimate, so in-flight counts still matter after long idling.
const MIN_RTT_NS: f64 = 1_000.0;

/// How a backend takes part in balancing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Relative share for `weighted`, `least-conn`, `random2`, `ewma` and hashing (≥ 1).
    pub weight: u32,
    /// Failures within `fail_timeout` that mark the backend down; 0 disables passive health.
    pub max_fails: u32,
    /// The failure window, and how long a failed backend stays down.
    pub fail_timeout: Nanos,
    /// Used only when no primary backend is available.
    pub backup: bool,
    /// How fast the response-time estimate forgets (peak-EWMA time constant).
    pub ewma_decay: Nanos,
    /// The most leases it holds at once (nginx's `max_conns`, HAProxy's
    /// server `maxconn`); a full backend is skipped like a draining one.
    /// 0: no limit.
    pub max_conns: u32,
}

impl Default for BackendConfig {
    /// nginx's defaults: weight 1, `max_fails=1`, `fail_timeout=10s`.
    fn default() -> Self {
        BackendConfig {
            weight: 1,
            max_fails: 1,
            fail_timeout: 10_000_000_000,
            backup: false,
            ewma_decay: 10_000_000_000,
            max_conns: 0,
        }
    }
}

#[derive(Debug)]
pub struct Backend {
    name: String,
    cfg: BackendConfig,
    in_flight: AtomicU32,
    status: AtomicU8,
    fails: AtomicU32,
    window_start: AtomicU64,
    down_until: AtomicU64,
    /// f64 bits of the estimate in ns; 0 = nothing observed yet.
    ewma: AtomicU64,
    ewma_at: AtomicU64,
}

impl Backend {
    /// `name` identifies the backend for consistent hashing (e.g. its
    /// address), so every process that names its backends alike agrees.
    pub fn new(name: impl Into<String>, mut cfg: BackendConfig) -> Backend {
        cfg.weight = cfg.weight.max(1);
        cfg.ewma_decay = cfg.ewma_decay.max(1);
        Backend {
            name: name.into(),
            cfg,
            in_flight: AtomicU32::new(0),
            status: AtomicU8::new(0),
            fails: AtomicU32::new(0),
            window_start: AtomicU64::new(0),
            down_until: AtomicU64::new(0),
            ewma: AtomicU64::new(0),
            ewma_at: AtomicU64::new(0),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn config(&self) -> &BackendConfig {
        &self.cfg
    }

    pub fn weight(&self) -> u32 {
        self.cfg.weight
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Relaxed)
    }

    /// Whether a pick may return this backend now.
    ///
    /// A backend whose `fail_timeout` has passed after being marked failed
    /// comes back gradually: one request at a time until one succeeds.
    #[inline]
    pub fn available(&self, now: Nanos) -> bool {
        let s = self.status.load(Relaxed);
        if s == 0 {
            return !self.is_full();
        }
        if s & (DRAINING | UNHEALTHY | BUSY) != 0 {
            return false;
        }
        now >= self.down_until.load(Relaxed) && self.in_flight.load(Relaxed) == 0
    }

    /// Whether it could take work if passive health were ignored: not
    /// draining, not unhealthy by active checks, not busy. (nginx never
    /// takes the only server of a group out; see [`crate::Balancer`].)
    #[inline]
    pub fn usable_despite_failures(&self) -> bool {
        self.status.load(Relaxed) & (DRAINING | UNHEALTHY | BUSY) == 0 && !self.is_full()
    }

    /// Whether it holds its `max_conns` leases (never without a limit).
    #[inline]
    pub fn is_full(&self) -> bool {
        self.cfg.max_conns != 0 && self.in_flight.load(Relaxed) >= self.cfg.max_conns
    }

    /// Draining backends get no new picks; leases already taken run on.
    pub fn set_draining(&self, on: bool) {
        self.set_flag(DRAINING, on);
    }

    /// A backend that cannot take more for now (its queue is full) is
    /// skipped like a draining one until this is cleared.
    pub fn set_busy(&self, on: bool) {
        self.set_flag(BUSY, on);
    }

    /// For callers that learn a backend's load from the backend itself
    /// (herd's dispatch mode: counts its workers report) instead of
    /// holding leases: sets what `in_flight` and least-conn see. Do not mix
    /// with outstanding leases on the same backend.
    pub fn set_load(&self, n: u32) {
        self.in_flight.store(n, Relaxed);
    }

    /// Set by active health checks.
    pub fn set_healthy(&self, healthy: bool) {
        self.set_flag(UNHEALTHY, !healthy);
    }

    pub fn is_healthy(&self) -> bool {
        self.status.load(Relaxed) & UNHEALTHY == 0
    }

    pub fn is_draining(&self) -> bool {
        self.status.load(Relaxed) & DRAINING != 0
    }

    /// Down by passive health (failed and not yet recovered).
    pub fn is_failed(&self) -> bool {
        self.status.load(Relaxed) & FAILED != 0
    }

    fn set_flag(&self, flag: u8, on: bool) {
        if on {
            self.status.fetch_or(flag, Relaxed);
        } else {
            self.status.fetch_and(!flag, Relaxed);
        }
    }

    /// Takes one in-flight slot; the lease gives it back when dropped.
    pub fn lease(self: &Arc<Self>, now: Nanos) -> Lease {
        self.lease_at(usize::MAX, now)
    }

    pub(crate) fn lease_at(self: &Arc<Self>, index: usize, now: Nanos) -> Lease {
        let before = self.in_flight.fetch_add(1, Relaxed);
        Lease {
            backend: self.clone(),
            index,
            started: now,
            over: self.cfg.max_conns != 0 && before >= self.cfg.max_conns,
        }
    }

    /// The peak-EWMA response-time estimate at `now`, decayed toward zero
    /// since the last observation (as tower and linkerd do), in ns.
    #[inline]
    pub fn rtt_estimate(&self, now: Nanos) -> f64 {
        let bits = self.ewma.load(Relaxed);
        if bits == 0 {
            return DEFAULT_RTT_NS;
        }
        let est = f64::from_bits(bits);
        let elapsed = now.saturating_sub(self.ewma_at.load(Relaxed)) as f64;
        (est * (-elapsed / self.cfg.ewma_decay as f64).exp()).max(MIN_RTT_NS)
    }

    /// `ewma` cost: estimated response time × (in-flight + 1).
    #[inline]
    pub fn ewma_cost(&self, now: Nanos) -> f64 {
        self.rtt_estimate(now) * f64::from(self.in_flight() + 1)
    }

    fn observe_rtt(&self, rtt: Nanos, now: Nanos) {
        let rtt = rtt as f64;
        let bits = self.ewma.load(Relaxed);
        let next = if bits == 0 {
            rtt
        } else {
            let prev = f64::from_bits(bits);
            if rtt > prev {
                rtt // peak: react to a slowdown at once
            } else {
                let elapsed = now.saturating_sub(self.ewma_at.load(Relaxed)) as f64;
                let decay = (-elapsed / self.cfg.ewma_decay as f64).exp();
                prev * decay + rtt * (1.0 - decay)
            }
        };
        // Racing updates may lose one sample; an estimate tolerates that.
        self.ewma.store(next.max(MIN_RTT_NS).to_bits(), Relaxed);
        self.ewma_at.store(now, Relaxed);
    }

    /// A success of a request picked at `started`. A backend taken out
    /// comes back only by a request picked after it went down (the probe,
    /// or the lone backend's next): requests in flight when it went down
    /// that succeed do not bring it back early (nginx's `accessed < checked`).
    fn record_success(&self, started: Nanos) {
        if self.status.load(Relaxed) & FAILED != 0 {
            let went_down = self
                .down_until
                .load(Relaxed)
                .saturating_sub(self.cfg.fail_timeout);
            if started <= went_down {
                return;
            }
            self.set_flag(FAILED, false);
        }
        self.fails.store(0, Relaxed);
    }

    /// Whether this failure marked the backend failed (its `max_fails`
    /// reached, or failing again while coming back).
    fn record_failure(&self, now: Nanos) -> bool {
        if self.cfg.max_fails == 0 {
            return false;
        }
        if self.status.load(Relaxed) & FAILED != 0 {
            // Failed again: down for another period. Only news if it was
            // coming back; requests in flight when it went down that fail
            // too are the same outage.
            let was_down = self.down_until.load(Relaxed) > now;
            self.down_until
                .store(now.saturating_add(self.cfg.fail_timeout), Relaxed);
            return !was_down;
        }
        let start = self.window_start.load(Relaxed);
        let fails = if now.saturating_sub(start) > self.cfg.fail_timeout || start == 0 {
            self.window_start.store(now.max(1), Relaxed);
            self.fails.store(1, Relaxed);
            1
        } else {
            self.fails.fetch_add(1, Relaxed) + 1
        };
        if fails >= self.cfg.max_fails {
            self.down_until
                .store(now.saturating_add(self.cfg.fail_timeout), Relaxed);
            self.fails.store(0, Relaxed);
            self.set_flag(FAILED, true);
            return true;
        }
        false
    }
}

/// One unit of in-flight work on a backend. Dropping it ends the work;
/// [`Lease::success`] and [`Lease::failure`] also feed the backend's
/// response-time estimate and passive health. It owns an `Arc` of its
/// backend, so it can travel with a streamed response.
#[derive(Debug)]
pub struct Lease {
    backend: Arc<Backend>,
    index: usize,
    started: Nanos,
    /// Taken past the backend's `max_conns`: picks on two threads both saw
    /// room for one, and this one counted second.
    over: bool,
}

impl Lease {
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// Position of the backend in [`crate::Balancer::backends`] order
    /// (`usize::MAX` for a lease taken directly with [`Backend::lease`]).
    pub fn index(&self) -> usize {
        self.index
    }

    /// Whether it was taken past the backend's `max_conns` (it is given
    /// back: only the later of two racing picks is, so one of them wins).
    pub(crate) fn over_limit(&self) -> bool {
        self.over
    }

    /// The backend answered; `now` is when the answer (headers) arrived.
    /// The lease stays held until dropped.
    pub fn success(&self, now: Nanos) {
        self.backend
            .observe_rtt(now.saturating_sub(self.started), now);
        self.backend.record_success(self.started);
    }

    /// The backend failed (connect error, reset, timeout, malformed answer).
    /// `true` when this failure marked it failed for `fail_timeout`, so the
    /// caller can say so once rather than with every failure.
    pub fn failure(&self, now: Nanos) -> bool {
        self.backend.record_failure(now)
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Nanos = 1_000_000_000;

    #[test]
    fn lease_counts_in_flight() {
        let b = Arc::new(Backend::new("a", BackendConfig::default()));
        let l1 = b.lease(0);
        let l2 = b.lease(0);
        assert_eq!(b.in_flight(), 2);
        drop(l1);
        l2.success(5);
        assert_eq!(b.in_flight(), 1, "reporting does not end the lease");
        drop(l2);
        assert_eq!(b.in_flight(), 0);
    }

    /// Leases taken at once on a `max_conns=1` backend, all held before any
    /// looks: exactly one is within the limit. (Judged by the count after
    /// the fact, every one was over it, each racing pick gave its lease
    /// back, and two requests at once could both wait out their time in
    /// the queue.)
    #[test]
    fn of_racing_leases_past_max_conns_exactly_one_wins() {
        let cfg = BackendConfig {
            max_conns: 1,
            ..BackendConfig::default()
        };
        let b = Arc::new(Backend::new("a", cfg));
        let all = Arc::new(std::sync::Barrier::new(8));
        let racers: Vec<_> = (0..8)
            .map(|_| {
                let (b, all) = (b.clone(), all.clone());
                std::thread::spawn(move || {
                    let l = b.lease(0);
                    all.wait();
                    !l.over_limit()
                })
            })
            .collect();
        let won = racers
            .into_iter()
            .filter_map(|r| r.join().ok())
            .filter(|w| *w)
            .count();
        assert_eq!(won, 1);
        assert_eq!(b.in_flight(), 0);
        let (first, second) = (b.lease(0), b.lease(0));
        assert!(!first.over_limit() && second.over_limit());
    }

    #[test]
    fn passive_health_like_nginx() {
        let cfg = BackendConfig {
            max_fails: 2,
            fail_timeout: 10 * S,
            ..Default::default()
        };
        let b = Arc::new(Backend::new("a", cfg));
        assert!(!b.lease(S).failure(S));
        assert!(b.available(S), "one failure of two allowed");
        // A second failure outside the window starts a new window.
        assert!(!b.lease(12 * S).failure(12 * S));
        assert!(b.available(12 * S));
        let (in_flight, done_later) = (b.lease(13 * S), b.lease(13 * S));
        assert!(b.lease(13 * S).failure(13 * S), "this one marks it failed");
        assert!(!b.available(13 * S), "two failures within 10s: down");
        assert!(
            !in_flight.failure(13 * S),
            "one in flight that fails too is not news"
        );
        drop(in_flight);
        done_later.success(14 * S);
        drop(done_later);
        assert!(
            !b.available(14 * S),
            "one in flight that succeeds does not bring it back early"
        );
        assert!(!b.available(22 * S));
        // Back after fail_timeout, one request at a time.
        assert!(b.available(23 * S));
        let probe = b.lease(23 * S);
        assert!(!b.available(23 * S), "only one probe while recovering");
        assert!(
            probe.failure(24 * S),
            "a failed probe marks it failed again"
        );
        drop(probe);
        assert!(!b.available(30 * S), "failed probe: down again");
        let probe = b.lease(35 * S);
        probe.success(35 * S);
        drop(probe);
        let (_x, _y) = (b.lease(36 * S), b.lease(36 * S));
        assert!(b.available(36 * S), "recovered fully after a success");
    }

    #[test]
    fn max_fails_zero_disables_passive_health() {
        let cfg = BackendConfig {
            max_fails: 0,
            ..Default::default()
        };
        let b = Arc::new(Backend::new("a", cfg));
        for i in 0..10 {
            assert!(!b.lease(i).failure(i));
        }
        assert!(b.available(10));
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays() {
        let b = Arc::new(Backend::new("a", BackendConfig::default()));
        b.lease(0).success(S / 1000); // 1ms
        b.lease(S).success(S + S / 10); // 100ms: peak
        let now = S + S / 10;
        assert!((b.rtt_estimate(now) - 1e8).abs() < 1.0);
        assert!(b.rtt_estimate(now + 30 * S) < 1e7, "decays when idle");
    }

    #[test]
    fn draining_and_unhealthy_are_unavailable() {
        let b = Arc::new(Backend::new("a", BackendConfig::default()));
        b.set_draining(true);
        assert!(!b.available(0));
        b.set_draining(false);
        b.set_healthy(false);
        assert!(!b.available(0));
        b.set_healthy(true);
        assert!(b.available(0));
    }
}
