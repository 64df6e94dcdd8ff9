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

/// Mirror each image of a `[C·H·W, batch]` batch of images `[C, H, W]` left to right with
/// probability ½, in place: one draw per example, in column order (so every rank of a
/// data-parallel run, drawing the global batch, flips the same examples one process would).
pub fn hflip<T: Real>(x: &mut [T], [c, h, w]: [usize; 3], batch: usize, rng: &mut ChaCha8Rng) {
    for b in 0..batch {
        if rng.random::<f64>() < 0.5 {
            for row in 0..c * h {
                for xx in 0..w / 2 {
                    let (l, r) = (row * w + xx, row * w + w - 1 - xx);
                    x.swap(l * batch + b, r * batch + b);
                }
            }
        }
    }
}

/// The reference code's augmentation for Glow on MNIST, in place on a `[C·H·W, batch]` batch of
/// images `[C, H, W]`: each example is reflect-padded by one pixel (as PyTorch's `reflect`
/// mode: index −1 reads 1, index H reads H − 2) and cropped back to H × W at a random offset
/// (0, 1 or 2 in each direction; offset (1, 1) is the identity).
pub fn pad_crop<T: Real>(x: &mut [T], [c, h, w]: [usize; 3], batch: usize, rng: &mut ChaCha8Rng) {
    let reflect = |i: isize, n: usize| -> usize {
        let n = n as isize;
        let r = if i < 0 {
            -i
        } else if i >= n {
            2 * n - 2 - i
        } else {
            i
        };
        r as usize
    };
    let mut image = vec![T::zero(); c * h * w];
    for b in 0..batch {
        let (dy, dx) = (
            rng.random_range(0..3i32) as isize,
            rng.random_range(0..3i32) as isize,
        );
        for (k, v) in image.iter_mut().enumerate() {
            *v = x[k * batch + b];
        }
        for ch in 0..c {
            for y in 0..h {
                let sy = reflect(y as isize + dy - 1, h);
                for xx in 0..w {
                    let sx = reflect(xx as isize + dx - 1, w);
                    x[((ch * h + y) * w + xx) * batch + b] = image[(ch * h + sy) * w + sx];
                }
            }
        }
    }
}

/// Uniform [0, 1) dequantization noise.
pub fn fill_uniform<T: Real>(rng: &mut ChaCha8Rng, out: &mut [T]) {
    for o in out.iter_mut() {
        *o = T::of_f64(rng.random::<f64>());
    }
}

/// Uniform noise for the first `count` columns of a column-major `[D, batch]` batch, drawn
/// example by example (each column's D values in a row), so that the noise an example gets
/// depends only on its position in the stream, not on how the examples are cut into batches:
/// an evaluation at batch 100 and one at batch 500 see the same noise. Columns past `count`
/// (padding of a last, partial batch) are set to ½ and draw nothing.
pub fn fill_uniform_columns<T: Real>(
    rng: &mut ChaCha8Rng,
    out: &mut [T],
    batch: usize,
    count: usize,
) {
    let d = out.len() / batch.max(1);
    for b in 0..batch {
        for k in 0..d {
            out[k * batch + b] = if b < count {
                T::of_f64(rng.random::<f64>())
            } else {
                T::of_f64(0.5)
            };
        }
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
