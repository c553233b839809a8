//! Balancing strategies: small types behind [`Strategy`]. Each picks an
//! available backend by index; none allocates or locks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use crate::backend::Backend;
use crate::ring::Ring;
use crate::{Ctx, Nanos};

/// Picks one available backend of `backends`, or `None` if none is.
///
/// Strategies that precompute something (a weighted cycle, a hash ring)
/// are built for one backend list and used only with that list.
pub trait Strategy: Send + Sync {
    fn pick(&self, backends: &[Arc<Backend>], ctx: &Ctx<'_>) -> Option<usize>;
}

/// Maps 32 random bits onto `0..n` without a division (Lemire).
#[inline]
fn below(r: u32, n: usize) -> usize {
    ((u64::from(r) * n as u64) >> 32) as usize
}

/// Whose turn it is among `n` backends: the rotating start of a scan.
#[inline]
fn turn(next: &AtomicUsize, n: usize) -> Option<usize> {
    (n > 0).then(|| next.fetch_add(1, Relaxed) % n)
}

/// The first available backend at or after `start`, wrapping around.
#[inline]
fn first_available(backends: &[Arc<Backend>], start: usize, now: Nanos) -> Option<usize> {
    let n = backends.len();
    (start..n)
        .chain(0..start.min(n))
        .find(|&i| backends[i].available(now))
}

/// Each available backend in turn, weights ignored.
#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl Strategy for RoundRobin {
    #[inline]
    fn pick(&self, backends: &[Arc<Backend>], ctx: &Ctx<'_>) -> Option<usize> {
        let n = backends.len();
        let start = turn(&self.next, n)?;
        let i = first_available(backends, start, ctx.now)?;
        if i != start {
            // Move the turn past the skipped ones, or the backend after a
            // down one would get its turns too.
            self.next.fetch_add((i + n - start) % n, Relaxed);
        }
        Some(i)
    }
}

/// nginx's smooth weighted round-robin, pick for pick (e.g. weights 5,1,1
/// give a a b a c a a).
///
/// nginx recomputes `current += weight; take the max; max -= total` under a
/// lock per request. The sequence repeats every `sum(weights)` picks, so it
/// is computed once and a pick is one atomic increment. An unavailable
/// backend's turns go to the next available one in the cycle.
#[derive(Debug)]
pub struct Weighted {
    cycle: Vec<u32>,
    next: AtomicUsize,
}

/// Longest cycle kept; larger weight sums are scaled down proportionally.
const MAX_CYCLE: u64 = 1 << 20;

impl Weighted {
    pub fn new(backends: &[Arc<Backend>]) -> Weighted {
        Self::from_weights(&backends.iter().map(|b| b.weight()).collect::<Vec<_>>())
    }

    pub fn from_weights(weights: &[u32]) -> Weighted {
        let g = weights.iter().fold(0u32, |g, &w| gcd(g, w.max(1)));
        let mut w: Vec<i64> = weights
            .iter()
            .map(|&x| i64::from(x.max(1) / g.max(1)))
            .collect();
        let sum: i64 = w.iter().sum();
        if sum as u64 > MAX_CYCLE {
            let scale = MAX_CYCLE as f64 / sum as f64;
            for x in &mut w {
                *x = ((*x as f64 * scale) as i64).max(1);
            }
        }
        let total: i64 = w.iter().sum();
        let mut current = vec![0i64; w.len()];
        let mut cycle = Vec::with_capacity(total as usize);
        for _ in 0..total {
            let mut best = 0;
            for i in 0..w.len() {
                current[i] += w[i];
                // Strictly greater: on a tie the earlier backend wins, as in nginx.
                if current[i] > current[best] {
                    best = i;
                }
            }
            current[best] -= total;
            cycle.push(best as u32);
        }
        Weighted {
            cycle,
            next: AtomicUsize::new(0),
        }
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Strategy for Weighted {
    #[inline]
    fn pick(&self, backends: &[Arc<Backend>], ctx: &Ctx<'_>) -> Option<usize> {
        let len = self.cycle.len();
        if len == 0 || backends.is_empty() {
            return None;
        }
        let start = self.next.fetch_add(1, Relaxed) % len;
        let first = self.cycle[start] as usize;
        if backends.get(first).is_some_and(|b| b.available(ctx.now)) {
            return Some(first);
        }
        let k = (1..len).find(|&k| {
            let i = self.cycle[(start + k) % len] as usize;
            backends.get(i).is_some_and(|b| b.available(ctx.now))
        })?;
        self.next.fetch_add(k, Relaxed); // as in RoundRobin
        Some(self.cycle[(start + k) % len] as usize)
    }
}

/// Fewest in-flight requests per unit of weight; ties go round the list.
#[derive(Debug, Default)]
pub struct LeastConn {
    next: AtomicUsize,
}

impl Strategy for LeastConn {
    #[inline]
    fn pick(&self, backends: &[Arc<Backend>], ctx: &Ctx<'_>) -> Option<usize> {
        let n = backends.len();
        let start = turn(&self.next, n)?;
        let mut best: Option<(usize, u64, u64)> = None;
        for i in (start..n).chain(0..start) {
            let b = &backends[i];
            if !b.available(ctx.now) {
                continue;
            }
            let (load, w) = (u64::from(b.in_flight()), u64::from(b.weight()));
            // load/w < best_load/best_w, without dividing.
            if best.is_none_or(|(_, bl, bw)| load * bw < bl * w) {
                best = Some((i, load, w));
            }
        }
        best.map(|(i, _, _)| i)
    }
}

/// Power of two choices: two random backends, the one with fewer in-flight
/// requests per unit of weight.
#[derive(Debug, Default)]
pub struct Random2;

/// Power of two choices on peak-EWMA response time × (in-flight + 1), as
/// tower and linkerd balance.
#[derive(Debug, Default)]
pub struct Ewma;

#[inline]
fn two_choices(
    backends: &[Arc<Backend>],
    ctx: &Ctx<'_>,
    better: impl Fn(&Backend, &Backend) -> bool,
) -> Option<usize> {
    let n = backends.len();
    match n {
        0 => return None,
        1 => return backends[0].available(ctx.now).then_some(0),
        _ => {}
    }
    let i = below(ctx.rand as u32, n);
    let j = (i + 1 + below((ctx.rand >> 32) as u32, n - 1)) % n;
    let (a, b) = (&backends[i], &backends[j]);
    match (a.available(ctx.now), b.available(ctx.now)) {
        (true, true) => Some(if better(b, a) { j } else { i }),
        (true, false) => Some(i),
        (false, true) => Some(j),
        (false, false) => first_available(backends, j, ctx.now),
    }
}

impl Strategy for Random2 {
    #[inline]
    fn pick(&self, backends: &[Arc<Backend>], ctx: &Ctx<'_>) -> Option<usize> {
        two_choices(backends, ctx, |x, y| {
            u64::from(x.in_flight()) * u64::from(y.weight())
                < u64::from(y.in_flight()) * u64::from(x.weight())
        })
    }
}

impl Strategy for Ewma {
    #[inline]
    fn pick(&self, backends: &[Arc<Backend>], ctx: &Ctx<'_>) -> Option<usize> {
        two_choices(backends, ctx, |x, y| {
            x.ewma_cost(ctx.now) / f64::from(x.weight())
                < y.ewma_cost(ctx.now) / f64::from(y.weight())
        })
    }
}

/// Consistent hashing of `ctx.key` on a ring with a fixed seed: every
/// process and every restart map a key to the same backend, and taking one
/// backend away moves only the keys it had. Without a key it falls back to
/// round-robin.
#[derive(Debug)]
pub struct ConsistentHash {
    ring: Ring,
    fallback: RoundRobin,
}

impl ConsistentHash {
    pub fn new(backends: &[Arc<Backend>]) -> ConsistentHash {
        ConsistentHash {
            ring: Ring::new(backends.iter().map(|b| (b.name(), b.weight()))),
            fallback: RoundRobin::default(),
        }
    }
}

impl Strategy for ConsistentHash {
    #[inline]
    fn pick(&self, backends: &[Arc<Backend>], ctx: &Ctx<'_>) -> Option<usize> {
        match ctx.key {
            Some(key) => self.ring.lookup(crate::ring::hash(key), |i| {
                backends.get(i).is_some_and(|b| b.available(ctx.now))
            }),
            None => self.fallback.pick(backends, ctx),
        }
    }
}
