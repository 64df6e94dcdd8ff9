//! Laying examples out as graph inputs: `x` is `[D, B]` with one column per example, and
//! `noise` (for dequantization) is uniform in [0, 1) with the same shape.

use crate::data::Split;
use crate::host::linalg::Real;
use rand::RngExt;
use rand_chacha::ChaCha8Rng;

/// Write the examples `idx` of `split` as the columns of `out` (`[D, B]`, row-major). Indices
/// past the end of `idx` (a padded last batch) repeat the first example.
pub fn fill_columns<T: Real>(split: &Split, idx: &[usize], batch: usize, out: &mut [T]) {
    let d = split.dim;
    debug_assert_eq!(out.len(), d * batch);
    for b in 0..batch {
        let ex = split.example(idx.get(b).copied().unwrap_or(idx[0]));
        for (k, v) in ex.iter().enumerate() {
            out[k * batch + b] = T::of_f64(*v as f64);
        }
    }
}

/// Uniform [0, 1) dequantization noise.
pub fn fill_uniform<T: Real>(rng: &mut ChaCha8Rng, out: &mut [T]) {
    for o in out.iter_mut() {
        *o = T::of_f64(rng.random::<f64>());
    }
}

/// Column-major `[D, B]` batch back to rows of examples (`B × D`).
pub fn columns_to_rows<T: Copy>(cols: &[T], d: usize, batch: usize) -> Vec<T> {
    let mut rows = Vec::with_capacity(cols.len());
    for b in 0..batch {
        for k in 0..d {
            rows.push(cols[k * batch + b]);
        }
    }
    rows
}
