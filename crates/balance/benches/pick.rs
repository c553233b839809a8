//! Cost of one pick (and dropping its lease) per strategy and pool size.
//! `cargo bench -p herd-balance` — target: < 50 ns at 1,000 backends.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use herd_balance::{Backend, BackendConfig, Balancer, Ctx, StrategyKind};

fn picks(c: &mut Criterion) {
    let mut group = c.benchmark_group("pick");
    for n in [10usize, 100, 1000] {
        let backends: Vec<_> = (0..n)
            .map(|i| {
                let b = Arc::new(Backend::new(
                    format!("10.{}.{}.{}:80", i >> 16, (i >> 8) & 255, i & 255),
                    BackendConfig {
                        weight: 1 + (i % 5) as u32,
                        ..Default::default()
                    },
                ));
                // Some history, so ewma has estimates to compare.
                b.lease(0).success(1_000_000 + (i as u64 % 7) * 100_000);
                b
            })
            .collect();
        // Keep some requests in flight so least-conn has real work.
        let held: Vec<_> = backends.iter().step_by(3).map(|b| b.lease(0)).collect();
        for kind in StrategyKind::PLAIN {
            let name = kind.to_string();
            let bal = Balancer::new(kind, backends.clone());
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            group.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let key = x.to_le_bytes();
                    let ctx = Ctx {
                        now: 2_000_000,
                        rand: x,
                        key: Some(&key),
                    };
                    black_box(bal.pick(black_box(&ctx)).is_ok())
                })
            });
        }
        drop(held);
    }
    group.finish();
}

criterion_group!(benches, picks);
criterion_main!(benches);
