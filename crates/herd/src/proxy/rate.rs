//! `--rate-limit`: requests per client address, as nginx's `limit_req`
//! (`burst=N nodelay`) and HAProxy's `http_req_rate` stick tables are used
//! in front of an app: a client over its rate gets a `429` with
//! `Retry-After`, and its requests never reach a backend.
//!
//! The generic cell rate algorithm: one number per client, the time its
//! next request is due (its "theoretical arrival time"), which a request
//! moves on by one interval. A client may be up to `burst` intervals ahead
//! of the clock. Time is passed in (ns on the balancer's clock), so every
//! rule is unit tested; the table is split in shards, each behind its own
//! lock, and a client whose due time has passed is as good as absent, so
//! each shard forgets those now and then: memory follows the clients of
//! the last moments, not all clients ever seen.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::config::RateLimit;

/// Requests refused so far, for `/metrics` (one limiter per process).
pub static REFUSED: AtomicU64 = AtomicU64::new(0);

/// Shards of the table: enough that the proxy threads rarely meet on one.
const SHARDS: usize = 64;
/// How often a shard drops the clients whose due time has passed; and
/// sooner once it holds twice as many as after its last sweep (at least
/// `SWEEP_AT`), so many new clients at once (an IPv6 network's addresses)
/// cost memory only while each is ahead of the clock, at amortized O(1).
const SWEEP_EVERY: u64 = 10_000_000_000;
const SWEEP_AT: usize = 1024;

pub struct Limiter {
    /// ns between two requests at the steady rate.
    interval: u64,
    /// How far ahead of the clock a client's due time may be.
    tolerance: u64,
    shards: Box<[Mutex<Shard>]>,
}

struct Shard {
    due: HashMap<IpAddr, u64>,
    swept: u64,
    /// The size that calls for a sweep.
    mark: usize,
}

impl Default for Shard {
    fn default() -> Shard {
        Shard {
            due: HashMap::new(),
            swept: 0,
            mark: SWEEP_AT,
        }
    }
}

impl Limiter {
    pub fn new(r: &RateLimit) -> Limiter {
        let interval = r.interval.as_nanos().max(1) as u64;
        Limiter {
            interval,
            tolerance: interval.saturating_mul(u64::from(r.burst.max(1))),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    /// `Ok` if a request from `client` at `now` may go on; else how long
    /// until one would (ns).
    pub fn check(&self, client: IpAddr, now: u64) -> Result<(), u64> {
        let client = client.to_canonical();
        let mut shard = self.shards[shard_of(client)]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if now.saturating_sub(shard.swept) >= SWEEP_EVERY || shard.due.len() >= shard.mark {
            shard.due.retain(|_, due| *due > now);
            shard.swept = now;
            shard.mark = (shard.due.len() * 2).max(SWEEP_AT);
        }
        let due = shard.due.get(&client).map_or(now, |&d| d.max(now));
        let next = due.saturating_add(self.interval);
        if next - now > self.tolerance {
            REFUSED.fetch_add(1, Ordering::Relaxed);
            return Err(next - now - self.tolerance);
        }
        shard.due.insert(client, next);
        Ok(())
    }

    #[cfg(test)]
    fn clients(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap().due.len())
            .sum()
    }
}

/// `Retry-After` for a wait of `ns`: whole seconds, rounded up, at least 1.
pub fn retry_after(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000).max(1)
}

/// The shard of an address: a multiplicative hash of its bits (addresses
/// of one network differ in their last bits).
fn shard_of(ip: IpAddr) -> usize {
    let bits: u64 = match ip {
        IpAddr::V4(v4) => u64::from(u32::from(v4)),
        IpAddr::V6(v6) => {
            let b = u128::from(v6);
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 58) as usize % SHARDS
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    const MS: u64 = 1_000_000;

    fn limiter(per_second: u32, burst: u32) -> Limiter {
        Limiter::new(&RateLimit {
            interval: Duration::from_secs(1) / per_second,
            burst,
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn a_burst_then_the_steady_rate() {
        let l = limiter(10, 5);
        let a = ip("203.0.113.1");
        let t0 = 1_000 * MS;
        for _ in 0..5 {
            assert_eq!(l.check(a, t0), Ok(()));
        }
        // The sixth at once waits one interval (100 ms): try again in 1 s.
        assert_eq!(l.check(a, t0), Err(100 * MS));
        assert_eq!(retry_after(100 * MS), 1);
        assert_eq!(retry_after(2_000 * MS + 1), 3);
        assert_eq!(l.check(a, t0 + 40 * MS), Err(60 * MS));
        // A refused request costs nothing: one interval on, one more goes.
        assert_eq!(l.check(a, t0 + 100 * MS), Ok(()));
        assert!(l.check(a, t0 + 100 * MS).is_err());
        // At the steady rate, every request goes.
        for i in 2..50 {
            assert_eq!(l.check(a, t0 + i * 100 * MS), Ok(()), "{i}");
        }
        // After a quiet second, a whole burst again.
        let later = t0 + 50 * 100 * MS + 1_000 * MS;
        for _ in 0..5 {
            assert_eq!(l.check(a, later), Ok(()));
        }
        assert!(l.check(a, later).is_err());
    }

    #[test]
    fn clients_are_counted_apart_and_ipv4_mapped_is_ipv4() {
        let l = limiter(1, 1);
        assert_eq!(l.check(ip("203.0.113.1"), 0), Ok(()));
        assert!(l.check(ip("::ffff:203.0.113.1"), 0).is_err());
        assert_eq!(l.check(ip("203.0.113.2"), 0), Ok(()));
        assert_eq!(l.check(ip("2001:db8::1"), 0), Ok(()));
    }

    #[test]
    fn clients_whose_due_time_passed_are_forgotten() {
        let l = limiter(100, 1);
        for i in 0..1000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            assert_eq!(l.check(a, 0), Ok(()));
        }
        assert_eq!(l.clients(), 1000);
        // Each shard forgets on its first request after SWEEP_EVERY.
        for i in 0..1000u32 {
            let a = IpAddr::V4(std::net::Ipv4Addr::from(0x0b00_0000 + i));
            assert_eq!(l.check(a, SWEEP_EVERY), Ok(()));
        }
        assert_eq!(l.clients(), 1000);
    }

    #[test]
    fn many_new_clients_at_once_are_forgotten_as_their_due_time_passes() {
        // One request each from 200,000 addresses of one IPv6 network, 10
        // µs apart: each is due again 10 ms later (100/s).
        let l = limiter(100, 1);
        let net = u128::from("2001:db8::".parse::<std::net::Ipv6Addr>().unwrap());
        for i in 0..200_000u64 {
            let a = IpAddr::V6(std::net::Ipv6Addr::from(net + u128::from(i)));
            assert_eq!(l.check(a, i * 10_000), Ok(()));
        }
        // About 1,000 are ahead of the clock at the end; the table holds a
        // few times that, not 200,000.
        assert!(l.clients() < 20 * SWEEP_AT, "{}", l.clients());
    }

    #[test]
    fn addresses_of_one_network_spread_over_the_shards() {
        let used: std::collections::HashSet<usize> = (0..256u32)
            .map(|i| shard_of(IpAddr::V4(std::net::Ipv4Addr::from(0xc000_0200 + i))))
            .collect();
        assert!(used.len() > SHARDS / 2, "{}", used.len());
    }
}
