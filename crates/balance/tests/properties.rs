//! Invariants of the strategies, over generated pools.

use std::collections::HashMap;
use std::sync::Arc;

use herd_balance::{Backend, BackendConfig, Balancer, Ctx, StrategyKind};
use proptest::prelude::*;

fn pool(weights: &[u32]) -> Vec<Arc<Backend>> {
    weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| {
            Arc::new(Backend::new(
                format!("node-{i}"),
                BackendConfig {
                    weight,
                    ..Default::default()
                },
            ))
        })
        .collect()
}

fn pick_name(b: &Balancer, key: &[u8]) -> String {
    b.pick(&Ctx {
        key: Some(key),
        ..Default::default()
    })
    .unwrap()
    .backend()
    .name()
    .to_string()
}

proptest! {
    #[test]
    fn weighted_shares_are_exact_over_a_cycle(weights in prop::collection::vec(1u32..20, 1..10)) {
        let b = Balancer::new(StrategyKind::Weighted, pool(&weights));
        let total: u32 = weights.iter().sum();
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..total {
            let l = b.pick(&Ctx::default()).unwrap();
            *counts.entry(l.backend().name().to_string()).or_default() += 1;
        }
        for (i, w) in weights.iter().enumerate() {
            prop_assert_eq!(counts.get(&format!("node-{i}")).copied().unwrap_or(0), *w);
        }
    }

    #[test]
    fn round_robin_is_even_over_the_available(n in 1usize..12, down in prop::collection::vec(any::<bool>(), 12), rounds in 1u32..5) {
        let bs = pool(&vec![1; n]);
        for (b, &d) in bs.iter().zip(&down) {
            b.set_draining(d);
        }
        let avail: Vec<_> = bs.iter().filter(|b| !b.is_draining()).map(|b| b.name().to_string()).collect();
        prop_assume!(!avail.is_empty());
        let b = Balancer::new(StrategyKind::RoundRobin, bs);
        let mut counts: HashMap<String, u32> = HashMap::new();
        for _ in 0..rounds as usize * avail.len() {
            *counts.entry(b.pick(&Ctx::default()).unwrap().backend().name().to_string()).or_default() += 1;
        }
        for name in avail {
            prop_assert_eq!(counts[&name], rounds);
        }
    }

    #[test]
    fn hashing_ignores_backend_order(n in 1usize..20, keys in prop::collection::vec(any::<u64>(), 1..50)) {
        let forward = pool(&vec![1; n]);
        let mut reversed: Vec<_> = pool(&vec![1; n]);
        reversed.reverse();
        let a = Balancer::new(StrategyKind::IpHash, forward);
        let b = Balancer::new(StrategyKind::IpHash, reversed);
        for k in keys {
            prop_assert_eq!(pick_name(&a, &k.to_le_bytes()), pick_name(&b, &k.to_le_bytes()));
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys(n in 2usize..20, gone in 0usize..20, keys in prop::collection::vec(any::<u64>(), 1..200)) {
        let gone = gone % n;
        let all = pool(&vec![1; n]);
        let before = Balancer::new("hash:cookie:sid".parse().unwrap(), all.clone());
        let mut rest = all.clone();
        let removed = rest.remove(gone);
        let after = Balancer::new("hash:cookie:sid".parse().unwrap(), rest);
        for k in keys {
            let k = k.to_le_bytes();
            removed.set_healthy(true);
            let was = pick_name(&before, &k);
            let now = pick_name(&after, &k);
            if was != removed.name() {
                prop_assert_eq!(&was, &now);
            }
            // Marking it down instead of removing it moves keys the same way.
            removed.set_healthy(false);
            prop_assert_eq!(pick_name(&before, &k), now);
        }
    }

    #[test]
    fn least_conn_never_picks_a_busier_backend(
        spec in prop::collection::vec((1u32..5, 0u32..6, any::<bool>()), 1..12)
    ) {
        let bs = pool(&spec.iter().map(|s| s.0).collect::<Vec<_>>());
        let mut held = Vec::new();
        for (b, &(_, load, down)) in bs.iter().zip(&spec) {
            for _ in 0..load {
                held.push(b.lease(0));
            }
            b.set_draining(down);
        }
        prop_assume!(bs.iter().any(|b| !b.is_draining()));
        let bal = Balancer::new(StrategyKind::LeastConn, bs.clone());
        let l = bal.pick(&Ctx::default()).unwrap();
        let p = l.backend();
        prop_assert!(!p.is_draining());
        // The lease itself added one; compare the load before it.
        let (pl, pw) = (u64::from(p.in_flight() - 1), u64::from(p.weight()));
        for q in bs.iter().filter(|q| !q.is_draining()) {
            let (ql, qw) = (u64::from(q.in_flight()), u64::from(q.weight()));
            if Arc::ptr_eq(q, p) { continue; }
            prop_assert!(pl * qw <= ql * pw, "picked {}/{} over {}/{}", pl, pw, ql, qw);
        }
    }

    #[test]
    fn random_choices_never_return_an_unavailable_backend(
        down in prop::collection::vec(any::<bool>(), 1..12), rand in any::<u64>()
    ) {
        let bs = pool(&vec![1; down.len()]);
        for (b, &d) in bs.iter().zip(&down) {
            b.set_healthy(!d);
        }
        for kind in [StrategyKind::Random2, StrategyKind::Ewma] {
            let bal = Balancer::new(kind, bs.clone());
            match bal.pick(&Ctx { rand, ..Default::default() }) {
                Ok(l) => prop_assert!(l.backend().is_healthy()),
                Err(_) => prop_assert!(down.iter().all(|&d| d)),
            }
        }
    }
}
