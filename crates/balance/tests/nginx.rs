//! `weighted` must reproduce sequences recorded from a real nginx 1.22.1
//! (`tests/data/nginx_swrr.json`, copied from `shared/testdata`).

use std::sync::Arc;

use herd_balance::{Backend, BackendConfig, Balancer, Ctx, StrategyKind};

#[test]
fn matches_nginx_sequences() {
    let text = include_str!("data/nginx_swrr.json");
    let cases: serde_json::Value = serde_json::from_str(text).unwrap();
    let cases = cases.as_array().unwrap();
    assert!(cases.len() >= 5);
    for case in cases {
        let weights: Vec<u32> = case["weights"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_u64().unwrap() as u32)
            .collect();
        let backends: Vec<_> = weights
            .iter()
            .enumerate()
            .map(|(i, &weight)| {
                let name = ((b'a' + i as u8) as char).to_string();
                Arc::new(Backend::new(
                    name,
                    BackendConfig {
                        weight,
                        ..Default::default()
                    },
                ))
            })
            .collect();
        let b = Balancer::new(StrategyKind::Weighted, backends);
        let want = case["sequence"].as_str().unwrap();
        let got: String = want
            .chars()
            .map(|_| {
                b.pick(&Ctx::default())
                    .unwrap()
                    .backend()
                    .name()
                    .to_string()
            })
            .collect();
        assert_eq!(got, want, "weights {weights:?}");
    }
}
