//! A pick, and the lease it returns, must not allocate: it is on the path
//! of every request.

use std::sync::Arc;

use herd_balance::{Backend, BackendConfig, Balancer, Ctx, StrategyKind};

#[test]
fn picks_do_not_allocate() {
    let backends: Vec<_> = (0..100)
        .map(|i| {
            Arc::new(Backend::new(
                format!("10.1.0.{i}:80"),
                BackendConfig::default(),
            ))
        })
        .collect();
    let header = StrategyKind::HeaderHash("x-user".into());
    for kind in StrategyKind::PLAIN.into_iter().chain([header]) {
        let name = kind.to_string();
        let b = Balancer::new(kind, backends.clone());
        let info = allocation_counter::measure(|| {
            for i in 0..1000u64 {
                let key = i.to_le_bytes();
                let ctx = Ctx {
                    now: i,
                    rand: i.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                    key: Some(&key),
                };
                let lease = b.pick(&ctx).unwrap();
                if i % 2 == 0 {
                    lease.success(i + 1);
                }
            }
        });
        assert_eq!(info.count_total, 0, "{name} allocated");
    }
}
