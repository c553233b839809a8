//! Smooth weighted round-robin must reproduce sequences recorded from a real
//! nginx 1.22.1 (see `tests/data/nginx_swrr.json`, copied from `shared/testdata`).

use herd_balance::{Pick, SmoothWeighted};

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
        let want = case["sequence"].as_str().unwrap();
        let swrr = SmoothWeighted::new(&weights);
        let got: String = want
            .chars()
            .map(|_| (b'a' + swrr.pick(weights.len()).unwrap() as u8) as char)
            .collect();
        assert_eq!(got, want, "weights {weights:?}");
    }
}
