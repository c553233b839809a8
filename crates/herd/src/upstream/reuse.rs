//! Whether the proxy keeps idle keep-alive connections to a target.
//!
//! A server that serves one connection at a time (a Perl `HTTP::Daemon`
//! loop, Python's `HTTPServer`) reads the next request from the
//! connection herd keeps idle and accepts no other until herd closes it:
//! a request on another proxy thread, or a second one at once, waited for
//! that connection's idle time-out (2 s), and once the server's short
//! accept queue filled, its health checks failed and it was taken out.
//! When a fresh connection's request is found still unaccepted while the
//! worker sleeps (`os::diag`), and it holds no more connections than it has
//! processes (a pool of threads holds several, each waiting a moment on its
//! own), the proxy stops keeping connections to that target (and to the
//! other workers of its program, which share this) for a while and closes
//! each after its answer (its requests say `Connection: close`), which is
//! what nginx does with every backend unless told `keepalive`; meanwhile
//! new connections to it are held to its backlog (`Target::slots`,
//! `proxy::conns::serial_slot`), so the kernel drops none of their
//! handshakes. Each relapse doubles the while, so a server that does this
//! for good is asked again ever more rarely, and one that only stalled
//! once gets its keep-alive back.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering::Relaxed};
use std::time::{Duration, Instant};

/// Keep-alive stays off this long after the first time.
pub const OFF_FIRST: Duration = Duration::from_secs(30);
/// The longest it stays off.
pub const OFF_MOST: Duration = Duration::from_secs(600);
/// A program found to be a pool of threads is not looked at again for this
/// long: what a look costs (a dump of the host's connections) is not paid
/// again at each of its stalls.
pub const POOL_FOR: Duration = Duration::from_secs(30);
/// At most one look at a program's workers this often, however many
/// requests wait: a look reads `/proc` for each of their threads, and a
/// burst of requests to a hung worker must not turn into a burst of those.
pub const LOOK_EVERY: Duration = Duration::from_millis(50);

static START: LazyLock<Instant> = LazyLock::new(Instant::now);
/// Bumped each time a target stops being kept: every proxy thread's tick
/// then closes the idle connections it holds to such targets.
static TURNED_OFF: AtomicU64 = AtomicU64::new(0);

#[derive(Debug, Default)]
pub struct Reuse {
    /// Milliseconds since `START` (plus one) until which no connection is
    /// kept; 0: kept, the one load the per-request path makes.
    off_until: AtomicU64,
    relapses: AtomicU32,
    /// When its workers were last looked at (as `off_until`).
    looked_at: AtomicU64,
    /// Until when (as `off_until`) its workers are not looked at: a pool
    /// of threads ([`Reuse::found_pool`]).
    pool_until: AtomicU64,
}

impl Reuse {
    pub fn keeps(&self, now: Instant) -> bool {
        let until = self.off_until.load(Relaxed);
        until == 0 || ms(now) >= until
    }

    /// Whether its workers' stalls are worth a look `now`: its connections
    /// are kept and it was not found to be a pool of threads a while ago.
    pub fn looked_at(&self, now: Instant) -> bool {
        self.keeps(now) && ms(now) >= self.pool_until.load(Relaxed)
    }

    /// Its workers were found to hold several connections each, a pool of
    /// threads: not looked at for [`POOL_FOR`].
    pub fn found_pool(&self, now: Instant) {
        self.pool_until
            .store(ms(now) + POOL_FOR.as_millis() as u64, Relaxed);
    }

    /// Whether a look at its workers may be taken `now` (then it is
    /// counted as taken), at most one per [`LOOK_EVERY`].
    pub fn may_look(&self, now: Instant) -> bool {
        let (t, last) = (ms(now), self.looked_at.load(Relaxed));
        (last == 0 || t >= last + LOOK_EVERY.as_millis() as u64)
            && self
                .looked_at
                .compare_exchange(last, t, Relaxed, Relaxed)
                .is_ok()
    }

    /// Stops keeping connections from `now`; returns for how long, or
    /// `None` if they were already off (another thread found it first).
    pub fn stop_keeping(&self, now: Instant) -> Option<Duration> {
        if !self.keeps(now) {
            return None;
        }
        let d = off_for(self.relapses.fetch_add(1, Relaxed));
        self.off_until
            .store(ms(now) + d.as_millis() as u64, Relaxed);
        TURNED_OFF.fetch_add(1, Relaxed);
        Some(d)
    }
}

/// How long keep-alive stays off after `relapses` earlier times.
pub fn off_for(relapses: u32) -> Duration {
    OFF_FIRST
        .saturating_mul(1 << relapses.min(16))
        .min(OFF_MOST)
}

/// Changes whenever some target stops being kept.
pub fn turned_off() -> u64 {
    TURNED_OFF.load(Relaxed)
}

fn ms(t: Instant) -> u64 {
    t.saturating_duration_since(*START).as_millis() as u64 + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_for_a_while_that_doubles_up_to_a_bound() {
        assert_eq!(off_for(0), OFF_FIRST);
        assert_eq!(off_for(1), OFF_FIRST * 2);
        assert_eq!(off_for(2), OFF_FIRST * 4);
        assert_eq!(off_for(5), OFF_MOST);
        assert_eq!(off_for(u32::MAX), OFF_MOST);
    }

    #[test]
    fn a_pool_is_not_looked_at_for_a_while() {
        let r = Reuse::default();
        ms(Instant::now()); // the clock's start, before `t`
        let t = Instant::now();
        assert!(r.looked_at(t));
        r.found_pool(t);
        assert!(!r.looked_at(t + POOL_FOR - Duration::from_millis(1)));
        assert!(r.looked_at(t + POOL_FOR));
        assert!(r.keeps(t), "still kept");
    }

    #[test]
    fn one_look_per_while() {
        let r = Reuse::default();
        ms(Instant::now()); // the clock's start, before `t`
        let t = Instant::now();
        assert!(r.may_look(t));
        assert!(!r.may_look(t));
        assert!(!r.may_look(t + LOOK_EVERY - Duration::from_millis(1)));
        assert!(r.may_look(t + LOOK_EVERY));
    }

    #[test]
    fn kept_until_stopped_then_again_once_the_while_is_over() {
        let r = Reuse::default();
        ms(Instant::now()); // the clock's start, before `t`
        let t = Instant::now();
        assert!(r.keeps(t));
        let seen = turned_off();
        assert_eq!(r.stop_keeping(t), Some(OFF_FIRST));
        assert!(turned_off() > seen);
        assert_eq!(r.stop_keeping(t), None, "already off");
        assert!(!r.keeps(t + OFF_FIRST - Duration::from_millis(1)));
        assert!(r.keeps(t + OFF_FIRST));
        let later = t + OFF_FIRST;
        assert_eq!(r.stop_keeping(later), Some(OFF_FIRST * 2));
        assert!(!r.keeps(later + OFF_FIRST));
    }
}
