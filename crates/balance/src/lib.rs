//! herd's balancing core: which backend gets the next connection or request.
//!
//! A pure library — no I/O, no clock, no global state, no allocation per
//! pick — shared by herd's proxy and by Rust services balancing their own
//! outgoing calls across remote nodes (see `examples/rpc_client.rs`).
//!
//! - [`Backend`]: state that outlives pool changes (in-flight and its
//!   `max_conns` limit, passive health, draining, response-time estimate),
//!   behind `Arc`.
//! - [`Strategy`]: how one backend is chosen; small types, one per strategy.
//! - [`Balancer`]: a backend list plus a strategy, with nginx-style backups.
//!
//! Time and randomness come in through [`Ctx`], so tests replay exactly.
#![forbid(unsafe_code)]

mod backend;
mod ring;
mod strategy;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

pub use backend::{Backend, BackendConfig, Lease};
pub use strategy::{ConsistentHash, Ewma, LeastConn, Random2, RoundRobin, Strategy, Weighted};

/// Nanoseconds on the caller's monotonic clock.
pub type Nanos = u64;

/// What a pick may depend on besides backend state.
#[derive(Debug, Clone, Copy, Default)]
pub struct Ctx<'a> {
    /// Now, on the same clock as every other call.
    pub now: Nanos,
    /// Fresh random bits (`random2`, `ewma`).
    pub rand: u64,
    /// The hash key (`ip-hash`, `hash:*`): client address, header or cookie value.
    pub key: Option<&'a [u8]>,
}

/// A strategy by name, as written on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrategyKind {
    RoundRobin,
    Weighted,
    LeastConn,
    Random2,
    Ewma,
    IpHash,
    HeaderHash(String),
    CookieHash(String),
    /// The TLS server name a client asks for (`--protocol tcp`, pass-through).
    SniHash,
}

/// Where a hashing strategy's key comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    None,
    ClientIp,
    /// A request header, name in lower case.
    Header(String),
    Cookie(String),
    /// The server name (SNI) of a TLS ClientHello.
    Sni,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown strategy {0:?}: use round-robin, weighted, least-conn, random2, ewma, ip-hash, hash:header:NAME, hash:cookie:NAME or hash:sni"
)]
pub struct UnknownStrategy(pub String);

impl StrategyKind {
    /// The strategies that take no parameter (the hashes on a header, a
    /// cookie or the TLS server name take one).
    pub const PLAIN: [StrategyKind; 6] = [
        StrategyKind::RoundRobin,
        StrategyKind::Weighted,
        StrategyKind::LeastConn,
        StrategyKind::Random2,
        StrategyKind::Ewma,
        StrategyKind::IpHash,
    ];
}

impl FromStr for StrategyKind {
    type Err = UnknownStrategy;
    fn from_str(s: &str) -> Result<Self, UnknownStrategy> {
        let bad = || UnknownStrategy(s.to_string());
        Ok(match s {
            "round-robin" => StrategyKind::RoundRobin,
            "weighted" => StrategyKind::Weighted,
            "least-conn" => StrategyKind::LeastConn,
            "random2" => StrategyKind::Random2,
            "ewma" => StrategyKind::Ewma,
            "ip-hash" => StrategyKind::IpHash,
            "hash:sni" => StrategyKind::SniHash,
            _ => match s.split_once(':') {
                Some(("hash", rest)) => match rest.split_once(':') {
                    Some(("header", name)) if valid_token(name) => {
                        StrategyKind::HeaderHash(name.to_ascii_lowercase())
                    }
                    Some(("cookie", name)) if valid_token(name) => {
                        StrategyKind::CookieHash(name.to_string())
                    }
                    _ => return Err(bad()),
                },
                _ => return Err(bad()),
            },
        })
    }
}

fn valid_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

impl fmt::Display for StrategyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StrategyKind::RoundRobin => f.write_str("round-robin"),
            StrategyKind::Weighted => f.write_str("weighted"),
            StrategyKind::LeastConn => f.write_str("least-conn"),
            StrategyKind::Random2 => f.write_str("random2"),
            StrategyKind::Ewma => f.write_str("ewma"),
            StrategyKind::IpHash => f.write_str("ip-hash"),
            StrategyKind::HeaderHash(h) => write!(f, "hash:header:{h}"),
            StrategyKind::CookieHash(c) => write!(f, "hash:cookie:{c}"),
            StrategyKind::SniHash => f.write_str("hash:sni"),
        }
    }
}

impl StrategyKind {
    pub fn build(&self, backends: &[Arc<Backend>]) -> Box<dyn Strategy> {
        match self {
            StrategyKind::RoundRobin => Box::new(RoundRobin::default()),
            StrategyKind::Weighted => Box::new(Weighted::new(backends)),
            StrategyKind::LeastConn => Box::new(LeastConn::default()),
            StrategyKind::Random2 => Box::new(Random2),
            StrategyKind::Ewma => Box::new(Ewma),
            StrategyKind::IpHash
            | StrategyKind::HeaderHash(_)
            | StrategyKind::CookieHash(_)
            | StrategyKind::SniHash => Box::new(ConsistentHash::new(backends)),
        }
    }

    pub fn key_source(&self) -> KeySource {
        match self {
            StrategyKind::IpHash => KeySource::ClientIp,
            StrategyKind::HeaderHash(h) => KeySource::Header(h.clone()),
            StrategyKind::CookieHash(c) => KeySource::Cookie(c.clone()),
            StrategyKind::SniHash => KeySource::Sni,
            _ => KeySource::None,
        }
    }
}

/// Why no backend could be picked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PickError {
    #[error("no backends configured")]
    Empty,
    #[error("every backend is down or draining")]
    AllDown,
    /// Some backend would take the work but holds its `max_conns`: worth
    /// waiting for (HAProxy queues such requests), unlike [`AllDown`](Self::AllDown).
    #[error("every backend that is up holds its max_conns")]
    Full,
}

/// A backend list with its strategy. Rebuild it when the list changes; the
/// `Arc<Backend>`s carry their state over.
pub struct Balancer {
    primaries: Vec<Arc<Backend>>,
    backups: Vec<Arc<Backend>>,
    strategy: Box<dyn Strategy>,
    backup_strategy: RoundRobin,
    kind: StrategyKind,
    scanned: AtomicUsize,
}

impl Balancer {
    pub fn new(kind: StrategyKind, backends: Vec<Arc<Backend>>) -> Balancer {
        let (backups, primaries): (Vec<_>, Vec<_>) =
            backends.into_iter().partition(|b| b.config().backup);
        Balancer {
            strategy: kind.build(&primaries),
            primaries,
            backups,
            backup_strategy: RoundRobin::default(),
            kind,
            scanned: AtomicUsize::new(0),
        }
    }

    pub fn kind(&self) -> &StrategyKind {
        &self.kind
    }

    /// Primaries first, then backups.
    pub fn backends(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.primaries.iter().chain(self.backups.iter())
    }

    pub fn is_empty(&self) -> bool {
        self.primaries.is_empty() && self.backups.is_empty()
    }

    /// Picks an available backend and takes a lease on it. Backups are
    /// used only when no primary is available; when nothing is, this fails
    /// at once rather than returning a backend known to be down. As in
    /// nginx, a lone backend (one primary, no backups) is never down by
    /// passive health: failing fast would only turn its errors into 503s
    /// for `fail_timeout` with nowhere else to go.
    pub fn pick(&self, ctx: &Ctx<'_>) -> Result<Lease, PickError> {
        self.pick_except(ctx, None)
    }

    /// Like [`Balancer::pick`], avoiding `avoid` (the backend that just
    /// failed, on a retry) unless it is the only one available.
    pub fn pick_except(&self, ctx: &Ctx<'_>, avoid: Option<&Backend>) -> Result<Lease, PickError> {
        // A pick that lost a race for the last place gives its lease back
        // and looks once more: the winner may already be done, and nobody
        // else would take the room it left until a waiter's next look.
        for _ in 0..2 {
            match self.pick_any(ctx, avoid) {
                Ok(l) if l.over_limit() => continue,
                Err(PickError::AllDown) if self.full() => return Err(PickError::Full),
                other => return other,
            }
        }
        Err(PickError::Full)
    }

    /// Whether a backend is up but for its `max_conns`.
    fn full(&self) -> bool {
        let full = |b: &Arc<Backend>| b.is_full() && !b.is_draining() && b.is_healthy();
        self.primaries.iter().chain(&self.backups).any(full)
    }

    fn pick_any(&self, ctx: &Ctx<'_>, avoid: Option<&Backend>) -> Result<Lease, PickError> {
        if self.is_empty() {
            return Err(PickError::Empty);
        }
        let is_avoided = |b: &Backend| avoid.is_some_and(|a| std::ptr::eq(a, b));
        let mut candidate = None;
        if let Some(i) = self.strategy.pick(&self.primaries, ctx) {
            let b = &self.primaries[i];
            if !is_avoided(b) {
                return Ok(b.lease_at(i, ctx.now));
            }
            candidate = Some(i);
            // Look for any other available primary, round the list.
            let n = self.primaries.len();
            let start = self.scanned.fetch_add(1, Relaxed) % n;
            for k in 0..n {
                let j = (start + k) % n;
                let b = &self.primaries[j];
                if !is_avoided(b) && b.available(ctx.now) {
                    return Ok(b.lease_at(j, ctx.now));
                }
            }
        }
        if let Some(i) = self.backup_strategy.pick(&self.backups, ctx) {
            return Ok(self.backups[i].lease_at(self.primaries.len() + i, ctx.now));
        }
        if let ([only], []) = (&self.primaries[..], &self.backups[..])
            && candidate.is_none()
            && only.usable_despite_failures()
        {
            return Ok(only.lease_at(0, ctx.now));
        }
        candidate
            .map(|i| self.primaries[i].lease_at(i, ctx.now))
            .ok_or(PickError::AllDown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(weights: &[u32]) -> Vec<Arc<Backend>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                Arc::new(Backend::new(
                    format!("10.0.0.{i}:80"),
                    BackendConfig {
                        weight: w,
                        ..Default::default()
                    },
                ))
            })
            .collect()
    }

    fn names(b: &Balancer, n: usize) -> String {
        (0..n)
            .map(|_| {
                let l = b.pick(&Ctx::default()).unwrap();
                let last = l.backend().name().split('.').nth(3).unwrap();
                (b'a' + last.split(':').next().unwrap().parse::<u8>().unwrap()) as char
            })
            .collect()
    }

    #[test]
    fn parses_strategy_names() {
        let hashes = ["hash:header:x-user", "hash:cookie:session", "hash:sni"];
        let plain = StrategyKind::PLAIN.map(|k| k.to_string());
        assert_eq!(
            plain,
            [
                "round-robin",
                "weighted",
                "least-conn",
                "random2",
                "ewma",
                "ip-hash"
            ]
        );
        for s in plain.iter().map(String::as_str).chain(hashes) {
            assert_eq!(s.parse::<StrategyKind>().unwrap().to_string(), s);
        }
        assert!("hash:header:".parse::<StrategyKind>().is_err());
        assert!("hash:body:x".parse::<StrategyKind>().is_err());
        assert!("fastest".parse::<StrategyKind>().is_err());
    }

    /// `max_conns`: a full backend is skipped by every strategy, even the
    /// lone one; with all full the pick says `Full` (worth a wait), and a
    /// lease given back makes room.
    #[test]
    fn max_conns_skips_a_full_backend_and_says_full() {
        let limited = |n: usize| -> Vec<Arc<Backend>> {
            (0..n)
                .map(|i| {
                    let cfg = BackendConfig {
                        max_conns: 2,
                        ..Default::default()
                    };
                    Arc::new(Backend::new(format!("10.0.0.{i}:80"), cfg))
                })
                .collect()
        };
        for kind in StrategyKind::PLAIN {
            let bs = limited(2);
            let b = Balancer::new(kind.clone(), bs.clone());
            let ctx = Ctx {
                key: Some(b"k"),
                ..Ctx::default()
            };
            let held: Vec<Lease> = (0..4).map(|_| b.pick(&ctx).unwrap()).collect();
            assert_eq!((bs[0].in_flight(), bs[1].in_flight()), (2, 2), "{kind}");
            assert_eq!(b.pick(&ctx).unwrap_err(), PickError::Full, "{kind}");
            drop(held);
            assert!(b.pick(&ctx).is_ok(), "{kind}");
        }
        // The lone backend too, which passive health never takes out.
        let bs = limited(1);
        let b = Balancer::new(StrategyKind::RoundRobin, bs.clone());
        let held = (
            b.pick(&Ctx::default()).unwrap(),
            b.pick(&Ctx::default()).unwrap(),
        );
        assert_eq!(b.pick(&Ctx::default()).unwrap_err(), PickError::Full);
        // Draining is not a wait: the backend is leaving.
        bs[0].set_draining(true);
        assert_eq!(b.pick(&Ctx::default()).unwrap_err(), PickError::AllDown);
        drop(held);
    }

    /// Stands for another thread: on the first pick it takes the last
    /// place between the look and the lease; on the next, it is done.
    struct Racer {
        winner: std::sync::Mutex<Option<Lease>>,
        leaves: bool,
    }

    impl Strategy for Racer {
        fn pick(&self, backends: &[Arc<Backend>], _: &Ctx<'_>) -> Option<usize> {
            let mut w = self.winner.lock().unwrap();
            if w.is_none() {
                *w = Some(backends[0].lease(0));
            } else if self.leaves {
                *w = None;
            }
            Some(0)
        }
    }

    #[test]
    fn a_pick_that_loses_the_race_for_the_last_place_looks_again() {
        for leaves in [true, false] {
            let one = Arc::new(Backend::new(
                "10.0.0.1:80",
                BackendConfig {
                    max_conns: 1,
                    ..Default::default()
                },
            ));
            let mut b = Balancer::new(StrategyKind::RoundRobin, vec![one.clone()]);
            b.strategy = Box::new(Racer {
                winner: Default::default(),
                leaves,
            });
            let got = b.pick(&Ctx::default());
            if leaves {
                // The winner left before the second look: its place is taken.
                assert!(got.is_ok_and(|l| !l.over_limit()));
                assert_eq!(one.in_flight(), 0);
            } else {
                assert_eq!(got.unwrap_err(), PickError::Full);
                assert_eq!(one.in_flight(), 1, "the loser's lease was given back");
            }
        }
    }

    #[test]
    fn a_lone_backend_is_not_taken_out_by_passive_health() {
        let ctx = |now| Ctx {
            now,
            ..Ctx::default()
        };
        let bs = pool(&[1]);
        let b = Balancer::new(StrategyKind::RoundRobin, bs.clone());
        b.pick(&ctx(1)).unwrap().failure(2);
        assert!(bs[0].is_failed());
        // Picked anyway, and one success brings it back.
        b.pick(&ctx(3)).unwrap().success(4);
        assert!(!bs[0].is_failed());
        // Draining or unhealthy still counts.
        bs[0].set_healthy(false);
        assert_eq!(b.pick(&ctx(5)).unwrap_err(), PickError::AllDown);
        // With two, a failed one is skipped as before.
        let bs = pool(&[1, 1]);
        let b = Balancer::new(StrategyKind::RoundRobin, bs.clone());
        bs[0].set_healthy(false);
        b.pick(&ctx(1)).unwrap().failure(2);
        assert_eq!(b.pick(&ctx(3)).unwrap_err(), PickError::AllDown);
    }

    #[test]
    fn round_robin_visits_each_in_turn_and_skips_down_ones() {
        let bs = pool(&[1, 1, 1]);
        let b = Balancer::new(StrategyKind::RoundRobin, bs.clone());
        assert_eq!(names(&b, 6), "abcabc");
        bs[1].set_draining(true);
        assert_eq!(names(&b, 4), "acac");
    }

    #[test]
    fn weighted_is_nginx_sequence() {
        let b = Balancer::new(StrategyKind::Weighted, pool(&[5, 1, 1]));
        assert_eq!(names(&b, 7), "aabacaa");
    }

    #[test]
    fn backups_only_when_primaries_are_down() {
        let mut bs = pool(&[1, 1]);
        bs.push(Arc::new(Backend::new(
            "10.0.0.2:80",
            BackendConfig {
                backup: true,
                ..Default::default()
            },
        )));
        let b = Balancer::new(StrategyKind::RoundRobin, bs.clone());
        assert_eq!(names(&b, 4), "abab");
        bs[0].set_healthy(false);
        bs[1].set_healthy(false);
        assert_eq!(names(&b, 2), "cc");
        bs[2].set_healthy(false);
        assert_eq!(b.pick(&Ctx::default()).unwrap_err(), PickError::AllDown);
        let empty = Balancer::new(StrategyKind::RoundRobin, vec![]);
        assert_eq!(empty.pick(&Ctx::default()).unwrap_err(), PickError::Empty);
    }

    #[test]
    fn pick_except_avoids_the_failed_backend() {
        let bs = pool(&[1, 1]);
        let b = Balancer::new(StrategyKind::RoundRobin, bs.clone());
        for _ in 0..4 {
            let l = b.pick_except(&Ctx::default(), Some(&bs[0])).unwrap();
            assert!(Arc::ptr_eq(l.backend(), &bs[1]));
        }
        bs[1].set_draining(true);
        // The avoided one is still better than nothing.
        let l = b.pick_except(&Ctx::default(), Some(&bs[0])).unwrap();
        assert!(Arc::ptr_eq(l.backend(), &bs[0]));
    }

    #[test]
    fn least_conn_prefers_the_idle_backend() {
        let bs = pool(&[1, 1, 1]);
        let b = Balancer::new(StrategyKind::LeastConn, bs.clone());
        let _busy: Vec<_> = (0..3)
            .map(|_| bs[0].lease(0))
            .chain([bs[2].lease(0)])
            .collect();
        for _ in 0..3 {
            let l = b.pick(&Ctx::default()).unwrap();
            assert!(Arc::ptr_eq(l.backend(), &bs[1]));
        }
    }

    #[test]
    fn ewma_steers_away_from_a_slow_backend() {
        let bs = pool(&[1, 1]);
        let b = Balancer::new(StrategyKind::Ewma, bs.clone());
        bs[0].lease(0).success(200_000_000); // 200ms
        bs[1].lease(0).success(1_000_000); // 1ms
        let ctx = Ctx {
            now: 200_000_000,
            rand: 0x0000_0001_0000_0000,
            key: None,
        };
        for r in 0..50u64 {
            let l = b
                .pick(&Ctx {
                    rand: r.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    ..ctx
                })
                .unwrap();
            assert!(Arc::ptr_eq(l.backend(), &bs[1]));
        }
    }

    #[test]
    fn hash_keys_stick_and_fall_back_without_a_key() {
        let b = Balancer::new("hash:header:x-user".parse().unwrap(), pool(&[1, 1, 1]));
        let pick = |k: &str| {
            b.pick(&Ctx {
                key: Some(k.as_bytes()),
                ..Default::default()
            })
            .unwrap()
            .backend()
            .name()
            .to_string()
        };
        let first = pick("alice");
        for _ in 0..10 {
            assert_eq!(pick("alice"), first);
        }
        assert!(b.pick(&Ctx::default()).is_ok());
    }
}
