//! What the speed examples share (`#[path = "common/mod.rs"] mod common;` in each).

use snfc_runtime::host::linalg::Real;

/// `len` values uniform in `[-scale, scale)` from a xorshift generator seeded with `seed`:
/// reproducible, and cheap enough not to show in the timings.
pub fn uniform<T: Real>(len: usize, seed: u64, scale: f64) -> Vec<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::of_f64(scale * ((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0))
        })
        .collect()
}
