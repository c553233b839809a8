//! herd's balancing core: which backend gets the next connection or request.
//!
//! Pure library — no I/O, no clocks, no global state — so the master's proxy
//! and any Rust service doing client-side balancing share the same picks.
//! Strategies are small types behind [`Pick`].
#![forbid(unsafe_code)]

use std::sync::atomic::{AtomicUsize, Ordering};

/// A balancing strategy over `n` eligible backends, indexed `0..n`.
///
/// `pick` takes `&self` so one strategy is shared by every connection
/// without a lock; strategies keep their own state in atomics.
pub trait Pick: Send + Sync {
    /// The index of the backend to use, or `None` when `n == 0`.
    fn pick(&self, n: usize) -> Option<usize>;
}

/// Each backend in turn.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Pick for RoundRobin {
    fn pick(&self, n: usize) -> Option<usize> {
        if n == 0 {
            return None;
        }
        Some(self.next.fetch_add(1, Ordering::Relaxed) % n)
    }
}

/// nginx's smooth weighted round-robin, picks for picks.
///
/// nginx recomputes `current += weight; pick max; current -= total` under a
/// lock on every request. The sequence is periodic with period `sum(weights)`,
/// so it is computed once here and a pick is an atomic increment and a load.
#[derive(Debug)]
pub struct SmoothWeighted {
    backends: usize,
    cycle: Vec<u32>,
    next: AtomicUsize,
}

impl SmoothWeighted {
    /// Weights of zero are treated as 1, as nginx does not accept 0.
    pub fn new(weights: &[u32]) -> Self {
        let weights: Vec<i64> = weights.iter().map(|&w| i64::from(w.max(1))).collect();
        let total: i64 = weights.iter().sum();
        let mut current = vec![0i64; weights.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..weights.len() {
                current[i] += weights[i];
                // Strictly greater: on a tie the earlier backend wins, like nginx.
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            cycle.push(best as u32);
        }
        SmoothWeighted {
            backends: weights.len(),
            cycle,
            next: AtomicUsize::new(0),
        }
    }

    /// How many backends the weights were given for.
    pub fn len(&self) -> usize {
        self.backends
    }

    pub fn is_empty(&self) -> bool {
        self.backends == 0
    }
}

impl Pick for SmoothWeighted {
    /// `n` must equal the number of weights given to [`SmoothWeighted::new`].
    fn pick(&self, n: usize) -> Option<usize> {
        if n == 0 || self.cycle.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.cycle.len();
        Some(self.cycle[i] as usize % n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_robin_visits_each_in_turn() {
        let rr = RoundRobin::default();
        let got: Vec<_> = (0..7).map(|_| rr.pick(3).unwrap()).collect();
        assert_eq!(got, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(rr.pick(0), None);
    }

    #[test]
    fn weighted_shares_are_exact_over_a_cycle() {
        let w = SmoothWeighted::new(&[5, 1, 1]);
        let mut counts = [0; 3];
        for _ in 0..700 {
            counts[w.pick(3).unwrap()] += 1;
        }
        assert_eq!(counts, [500, 100, 100]);
    }
}
