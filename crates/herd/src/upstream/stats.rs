//! What the proxy counts of the answers it relays: by status class and
//! latency (half-octave buckets, atomics, no lock), per target for
//! `/metrics` and `herd status`, per version during a deploy; and the
//! windows the supervisor takes of them.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use super::{Pool, Target};

/// Answers by status class and latency: of one version during a deploy
/// (the analysis samples them), or of one target (for `/metrics`).
pub struct AnswerStats {
    pub requests: AtomicU64,
    pub errors: AtomicU64,
    /// 1xx … 5xx.
    pub classes: [AtomicU64; 5],
    /// Time to the answer's head, in half-octaves of microseconds.
    pub latency: [AtomicU64; LATENCY_BUCKETS],
    /// Bytes relayed from the backend to clients (HTTP: answer bodies) and
    /// from clients to it (HTTP: request bodies); both ways, upgraded
    /// tunnels and TCP mode's connections.
    pub bytes_to_client: AtomicU64,
    pub bytes_to_backend: AtomicU64,
}

pub const LATENCY_BUCKETS: usize = 64;

impl Default for AnswerStats {
    fn default() -> Self {
        AnswerStats {
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            classes: std::array::from_fn(|_| AtomicU64::new(0)),
            latency: std::array::from_fn(|_| AtomicU64::new(0)),
            bytes_to_client: AtomicU64::new(0),
            bytes_to_backend: AtomicU64::new(0),
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
}
