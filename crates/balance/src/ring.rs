//! The consistent-hash ring behind `ip-hash` and `hash:*`.
//!
//! 160 points per unit of weight (as ketama and nginx's `hash … consistent`),
//! hashed with xxh3 and a fixed seed from the backend's *name*, so the ring
//! does not depend on backend order or on the process. A 64Ki-entry index
//! on the top 16 bits of the hash makes a lookup a short scan instead of a
//! binary search over every point.

const SEED: u64 = 0x6865_7264_5f72_696e; // "herd_rin"
const POINTS_PER_WEIGHT: u32 = 160;
const INDEX_BITS: u32 = 16;

pub fn hash(key: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64_with_seed(key, SEED)
}

#[derive(Debug)]
pub struct Ring {
    /// (point hash, backend index), sorted by hash.
    points: Vec<(u64, u32)>,
    /// `index[b]` = first point whose hash has top bits ≥ b.
    index: Vec<u32>,
}

impl Ring {
    pub fn new<'a>(backends: impl Iterator<Item = (&'a str, u32)>) -> Ring {
        let mut points = Vec::new();
        let mut buf = Vec::new();
        for (i, (name, weight)) in backends.enumerate() {
            for v in 0..weight.max(1).saturating_mul(POINTS_PER_WEIGHT).min(1 << 16) {
                buf.clear();
                buf.extend_from_slice(name.as_bytes());
                buf.push(b'#');
                buf.extend_from_slice(&v.to_le_bytes());
                points.push((hash(&buf), i as u32));
            }
        }
        points.sort_unstable();
        let mut index = vec![0u32; (1 << INDEX_BITS) + 1];
        let mut p = 0usize;
        for (b, slot) in index.iter_mut().enumerate() {
            while p < points.len() && ((points[p].0 >> (64 - INDEX_BITS)) as usize) < b {
                p += 1;
            }
            *slot = p as u32;
        }
        Ring { points, index }
    }

    /// The backend owning hash `h`: the first point at or after `h`,
    /// clockwise, whose backend is `ok`. Skipping unavailable backends this
    /// way moves only their keys.
    #[inline]
    pub fn lookup(&self, h: u64, ok: impl Fn(usize) -> bool) -> Option<usize> {
        let n = self.points.len();
        if n == 0 {
            return None;
        }
        let mut p = self.index[(h >> (64 - INDEX_BITS)) as usize] as usize;
        while p < n && self.points[p].0 < h {
            p += 1;
        }
        for k in 0..n {
            let (_, b) = self.points[(p + k) % n];
            if ok(b as usize) {
                return Some(b as usize);
            }
        }
        None
    }
}
