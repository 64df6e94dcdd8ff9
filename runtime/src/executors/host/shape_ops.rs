//! Host kernels of the IR's shape and convolution-operator ops, on contiguous row-major
//! buffers: `permute`, `reduce_sum`, `expand` (any rank), and `conv2d`, `flip_kernel`,
//! `conv_kernel_grad`, `toeplitz`, `toeplitz_adjoint` in the IR's batch-last layout
//! (`x [C, H, W, B]`, kernels `[O, I, K, K]`, zero padding (K − 1)/2, cross-correlation as
//! PyTorch's `conv2d`). Shapes were checked by the IR's shape rules; a mismatch here is an
//! internal error.

use super::linalg::{matmul, MatRef, Real};
use rayon::prelude::*;

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Result axis `i` is operand axis `perm[i]`.
pub fn permute<T: Real>(a: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides = strides(shape);
    // The operand stride of each result axis.
    let walk: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    let out_strides = strides(&out_shape);
    let mut out = vec![T::zero(); a.len()];
    out.par_iter_mut().enumerate().for_each(|(k, o)| {
        let mut src = 0;
        for (axis, s) in out_strides.iter().enumerate() {
            src += (k / s % out_shape[axis]) * walk[axis];
        }
        *o = a[src];
    });
    out
}

/// Sum over `axes` (strictly increasing).
pub fn reduce_sum<T: Real>(a: &[T], shape: &[usize], axes: &[usize]) -> Vec<T> {
    let kept: Vec<usize> = (0..shape.len()).filter(|i| !axes.contains(i)).collect();
    let out_len: usize = kept.iter().map(|&i| shape[i]).product();
    let in_strides = strides(shape);
    let mut out = vec![T::zero(); out_len.max(1)];
    // Walk the operand once; each element lands in the result index of its kept axes.
    for (k, &v) in a.iter().enumerate() {
        let mut dst = 0;
        for &i in &kept {
            dst = dst * shape[i] + k / in_strides[i] % shape[i];
        }
        out[dst] += v;
    }
    out
}

/// Repeat `a` along the new axes `axes` of `to`.
pub fn expand<T: Real>(a: &[T], to: &[usize], axes: &[usize]) -> Vec<T> {
    let kept: Vec<usize> = (0..to.len()).filter(|i| !axes.contains(i)).collect();
    let out_strides = strides(to);
    let total: usize = to.iter().product();
    let mut out = vec![T::zero(); total];
    out.par_iter_mut().enumerate().for_each(|(k, o)| {
        let mut src = 0;
        for &i in &kept {
            src = src * to[i] + k / out_strides[i] % to[i];
        }
        *o = a[src];
    });
    out
}

/// `k [O, I, K, K] → [I, O, K, K]`, both spatial axes reversed.
pub fn flip_kernel<T: Real>(k: &[T], shape: &[usize]) -> Vec<T> {
    let (o, i, kk) = (shape[0], shape[1], shape[2]);
    let mut out = vec![T::zero(); k.len()];
    for a in 0..o {
        for b in 0..i {
            for u in 0..kk {
                for v in 0..kk {
                    out[((b * o + a) * kk + (kk - 1 - u)) * kk + (kk - 1 - v)] =
                        k[((a * i + b) * kk + u) * kk + v];
                }
            }
        }
    }
    out
}

/// The columns of `x [C, H, W, B]` for a K × K kernel: `[C·K·K, H·W·B]`, row (c, u, v), column
/// (h, w, b) holding `x[c, h + u − p, w + v − p, b]` (zero outside).
fn im2col<T: Real>(x: &[T], c: usize, h: usize, w: usize, b: usize, k: usize) -> Vec<T> {
    let p = k / 2;
    let cols = h * w * b;
    let mut out = vec![T::zero(); c * k * k * cols];
    out.par_chunks_mut(cols).enumerate().for_each(|(row, dst)| {
        let (ch, u, v) = (row / (k * k), row / k % k, row % k);
        for y in 0..h {
            let sy = y + u;
            if sy < p || sy - p >= h {
                continue;
            }
            for xx in 0..w {
                let sx = xx + v;
                if sx < p || sx - p >= w {
                    continue;
                }
                let src = ((ch * h + sy - p) * w + sx - p) * b;
                let d = (y * w + xx) * b;
                dst[d..d + b].copy_from_slice(&x[src..src + b]);
            }
        }
    });
    out
}

/// `conv2d(x [C_in, H, W, B], k [C_out, C_in, K, K]) → [C_out, H, W, B]`: one GEMM
/// `k [C_out, C_in·K·K] × im2col(x) [C_in·K·K, H·W·B]` over the whole batch.
pub fn conv2d<T: Real>(x: &[T], x_shape: &[usize], k: &[T], k_shape: &[usize]) -> Vec<T> {
    let (ci, h, w, b) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    let (co, kk) = (k_shape[0], k_shape[2]);
    let cols = im2col(x, ci, h, w, b, kk);
    let rows = ci * kk * kk;
    let mut out = vec![T::zero(); co * h * w * b];
    matmul(
        MatRef::row_major(k, co, rows),
        MatRef::row_major(&cols, rows, h * w * b),
        &mut out,
        T::one(),
        T::zero(),
        false,
    );
    out
}

/// The kernel adjoint: `Σ_{h,w,b} dy[o,h,w,b] x[i,h+u−p,w+v−p,b]` as one GEMM
/// `dy [C_out, H·W·B] × im2col(x)ᵀ`.
pub fn conv_kernel_grad<T: Real>(
    dy: &[T],
    dy_shape: &[usize],
    x: &[T],
    x_shape: &[usize],
    k: usize,
) -> Vec<T> {
    let (co, h, w, b) = (dy_shape[0], dy_shape[1], dy_shape[2], dy_shape[3]);
    let ci = x_shape[0];
    let cols = im2col(x, ci, h, w, b, k);
    let (n, rows) = (h * w * b, ci * k * k);
    let mut out = vec![T::zero(); co * rows];
    matmul(
        MatRef::row_major(dy, co, n),
        MatRef::row_major(&cols, rows, n).t(),
        &mut out,
        T::one(),
        T::zero(),
        false,
    );
    out
}

/// The taps of output pixel `(y, x)` of a `C → C`, K × K conv on `H × W` maps: for each input
/// channel `i` and kernel offset `(u, v)` that lands inside the map, `f(column of the input
/// pixel in the flat (c, h, w) order, index (i, u, v) within the output channel's kernel)`.
/// The one walk [`toeplitz`] and [`toeplitz_adjoint`] share.
fn taps(
    c: usize,
    h: usize,
    w: usize,
    kk: usize,
    y: usize,
    x: usize,
    mut f: impl FnMut(usize, usize),
) {
    let p = kk / 2;
    for i in 0..c {
        for u in 0..kk {
            for v in 0..kk {
                let (sy, sx) = (y + u, x + v);
                if sy < p || sy - p >= h || sx < p || sx - p >= w {
                    continue;
                }
                f((i * h + sy - p) * w + sx - p, (i * kk + u) * kk + v);
            }
        }
    }
}

/// The dense `[C·H·W, C·H·W]` matrix of the `C → C` convolution `k` on one `H × W` example.
pub fn toeplitz<T: Real>(k: &[T], k_shape: &[usize], h: usize, w: usize) -> Vec<T> {
    let (c, kk) = (k_shape[0], k_shape[2]);
    let n = c * h * w;
    let mut t = vec![T::zero(); n * n];
    t.par_chunks_mut(n).enumerate().for_each(|(row, dst)| {
        let (o, y, x) = (row / (h * w), row / w % h, row % w);
        let kernel = &k[o * c * kk * kk..(o + 1) * c * kk * kk];
        taps(c, h, w, kk, y, x, |col, tap| dst[col] = kernel[tap]);
    });
    t
}

/// How often each element `(u, v)` of a K × K kernel appears in the Toeplitz matrix of its conv
/// on `H × W` maps (per input/output channel pair): `(H − |u − p|)(W − |v − p|)` (paper A.2).
pub fn multiplicity(h: usize, w: usize, kk: usize) -> Vec<usize> {
    let p = kk / 2;
    let count = |n: usize, u: usize| n.saturating_sub(u.abs_diff(p));
    (0..kk * kk)
        .map(|i| count(h, i / kk) * count(w, i % kk))
        .collect()
}

/// `k ⊙ m` for a kernel `[O, I, K, K]` on `H × W` maps (see [`multiplicity`]).
pub fn mul_multiplicity<T: Real>(k: &[T], kk: usize, h: usize, w: usize) -> Vec<T> {
    let m = multiplicity(h, w, kk);
    k.iter()
        .enumerate()
        .map(|(i, &v)| v * T::of_f64(m[i % (kk * kk)] as f64))
        .collect()
}

/// The adjoint of [`toeplitz`]: each kernel element sums the entries of `g` it occupies.
pub fn toeplitz_adjoint<T: Real>(g: &[T], n: usize, h: usize, w: usize, kk: usize) -> Vec<T> {
    let c = n / (h * w);
    let mut out = vec![T::zero(); c * c * kk * kk];
    out.par_chunks_mut(c * kk * kk)
        .enumerate()
        .for_each(|(o, dst)| {
            for y in 0..h {
                for x in 0..w {
                    let row = &g[((o * h + y) * w + x) * n..][..n];
                    taps(c, h, w, kk, y, x, |col, tap| dst[tap] += row[col]);
                }
            }
        });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(n: usize, seed: f64) -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + seed) * 0.7312).sin()).collect()
    }

    /// Naive conv2d in the batch-last layout.
    fn naive(x: &[f64], xs: [usize; 4], k: &[f64], ks: [usize; 4]) -> Vec<f64> {
        let [ci, h, w, b] = xs;
        let [co, _, kk, _] = ks;
        let p = kk as isize / 2;
        let mut y = vec![0.0; co * h * w * b];
        for o in 0..co {
            for yy in 0..h {
                for xx in 0..w {
                    for n in 0..b {
                        let mut s = 0.0;
                        for i in 0..ci {
                            for u in 0..kk {
                                for v in 0..kk {
                                    let (sy, sx) = (
                                        yy as isize + u as isize - p,
                                        xx as isize + v as isize - p,
                                    );
                                    if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                        continue;
                                    }
                                    s += k[((o * ci + i) * kk + u) * kk + v]
                                        * x[((i * h + sy as usize) * w + sx as usize) * b + n];
                                }
                            }
                        }
                        y[((o * h + yy) * w + xx) * b + n] = s;
                    }
                }
            }
        }
        y
    }

    fn dot(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| x * y).sum()
    }

    #[test]
    fn conv_matches_naive_and_its_adjoints_are_adjoint() {
        for (ci, co, h, w, b, kk) in [(2, 3, 5, 4, 3, 3), (3, 3, 4, 4, 1, 1), (1, 2, 6, 5, 2, 5)] {
            let x = ramp(ci * h * w * b, 0.3);
            let k = ramp(co * ci * kk * kk, 1.7);
            let y = conv2d(&x, &[ci, h, w, b], &k, &[co, ci, kk, kk]);
            let want = naive(&x, [ci, h, w, b], &k, [co, ci, kk, kk]);
            for (a, e) in y.iter().zip(&want) {
                assert!((a - e).abs() < 1e-12, "{a} vs {e}");
            }
            let dy = ramp(co * h * w * b, 2.9);
            // ⟨conv(x, k), dy⟩ = ⟨x, conv(dy, flip(k))⟩ = ⟨k, kgrad(dy, x)⟩
            let flipped = flip_kernel(&k, &[co, ci, kk, kk]);
            let dx = conv2d(&dy, &[co, h, w, b], &flipped, &[ci, co, kk, kk]);
            let dk = conv_kernel_grad(&dy, &[co, h, w, b], &x, &[ci, h, w, b], kk);
            let lhs = dot(&y, &dy);
            assert!((lhs - dot(&x, &dx)).abs() < 1e-10 * lhs.abs().max(1.0));
            assert!((lhs - dot(&k, &dk)).abs() < 1e-10 * lhs.abs().max(1.0));
        }
    }

    #[test]
    fn toeplitz_is_the_conv_and_its_adjoint_is_adjoint() {
        let (c, h, w, kk) = (2, 4, 3, 3);
        let k = ramp(c * c * kk * kk, 0.9);
        let t = toeplitz(&k, &[c, c, kk, kk], h, w);
        let n = c * h * w;
        let x = ramp(n, 4.1);
        let y = conv2d(&x, &[c, h, w, 1], &k, &[c, c, kk, kk]);
        for r in 0..n {
            let tx: f64 = (0..n).map(|j| t[r * n + j] * x[j]).sum();
            assert!((tx - y[r]).abs() < 1e-12);
        }
        // Tᵀ = T(flip k)
        let tf = toeplitz(&flip_kernel(&k, &[c, c, kk, kk]), &[c, c, kk, kk], h, w);
        for r in 0..n {
            for j in 0..n {
                assert_eq!(t[r * n + j], tf[j * n + r]);
            }
        }
        let g = ramp(n * n, 7.7);
        let adj = toeplitz_adjoint(&g, n, h, w, kk);
        assert!((dot(&t, &g) - dot(&k, &adj)).abs() < 1e-10);
        // adjoint(T(k)) = k ⊙ m
        let m = mul_multiplicity(&k, kk, h, w);
        for (a, e) in toeplitz_adjoint(&t, n, h, w, kk).iter().zip(&m) {
            assert!((a - e).abs() < 1e-12);
        }
        // 3×3 on 28×28: the centre appears 784 times, a corner 27·27 = 729
        let m28 = multiplicity(28, 28, 3);
        assert_eq!((m28[4], m28[0]), (784, 729));
    }

    #[test]
    fn permute_reduce_and_expand() {
        let shape = [2, 3, 4];
        let a = ramp(24, 0.1);
        let p = permute(&a, &shape, &[2, 0, 1]);
        // p[k, i, j] = a[i, j, k]
        assert_eq!(p[(3 * 2 + 1) * 3 + 2], a[(3 + 2) * 4 + 3]);
        let s = reduce_sum(&a, &shape, &[0, 2]);
        for j in 0..3 {
            let want: f64 = (0..2)
                .flat_map(|i| (0..4).map(move |k| (i, k)))
                .map(|(i, k)| a[(i * 3 + j) * 4 + k])
                .sum();
            assert!((s[j] - want).abs() < 1e-12);
        }
        // ⟨expand(v), g⟩ = ⟨v, reduce_sum(g)⟩
        let v = ramp(3, 5.0);
        let e = expand(&v, &shape, &[0, 2]);
        let g = ramp(24, 9.0);
        assert!((dot(&e, &g) - dot(&v, &reduce_sum(&g, &shape, &[0, 2]))).abs() < 1e-12);
    }
}
