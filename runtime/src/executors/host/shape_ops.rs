//! Host kernels of the IR's shape and convolution-operator ops, on contiguous row-major
//! buffers: `permute`, `reduce_sum`, `expand` (any rank), and `conv2d`, `flip_kernel`,
//! `conv_kernel_grad`, `toeplitz`, `toeplitz_adjoint` in the IR's batch-last layout
//! (`x [C, H, W, B]`, kernels `[O, I, K, K]`, zero padding (K − 1)/2, cross-correlation as
//! PyTorch's `conv2d`). Shapes were checked by the IR's shape rules; a mismatch here is an
//! internal error.
//!
//! `permute` and `expand` are one strided gather that copies (or fills) whole contiguous inner
//! runs; `reduce_sum` walks coalesced axes. `conv2d` and `conv_kernel_grad` take one of three
//! forms ([`conv_form`]) by their channel counts: with few channels on both sides a direct
//! convolution (the batch axis is innermost, so every kernel tap is a shifted contiguous run of a
//! zero-padded copy of the input, and a register tile of outputs accumulates over all taps);
//! with few input channels one GEMM over the im2col matrix; with few output channels one GEMM
//! of the per-tap kernels with the input, whose products are added shifted into place. 1 × 1
//! kernels are one GEMM with no im2col at all.

use super::linalg::{matmul, MatRef, Real};
pub use crate::executors::conv_taps::{multiplicity, taps};
use rayon::prelude::*;

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Below this many elements the layout ops run on one thread (rayon costs more than it saves).
const PAR_MIN: usize = 1 << 16;

/// `out[k] = a[Σ_j idx_j(k) · stride[j]]` for the row-major index `idx(k)` of `shape`: the one
/// walk behind [`permute`] (strides of the operand's axes) and [`expand`] (stride 0 along the
/// new axes). Axes of size 1 are dropped and neighbours that are one run in `a` merged, so the
/// innermost remaining axis is copied (stride 1) or filled (stride 0) as a whole run.
fn gather<T: Real>(a: &[T], shape: &[usize], stride: &[usize]) -> Vec<T> {
    let total: usize = shape.iter().product();
    if total == 0 {
        return Vec::new();
    }
    // (size, stride), outermost first.
    let mut dims: Vec<(usize, usize)> = Vec::with_capacity(shape.len());
    for (&n, &s) in shape.iter().zip(stride) {
        if n == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.1 == s * n => *last = (last.0 * n, s),
            _ => dims.push((n, s)),
        }
    }
    let (run, run_stride) = dims.pop().unwrap_or((1, 0));
    let outer = dims;
    let rows = total / run;
    let mut out = vec![T::zero(); total];
    // Fill rows `r0..` of the result into `dst` (a whole number of rows).
    let fill = |r0: usize, dst: &mut [T]| {
        // Odometer over the outer axes, starting at row r0.
        let mut idx = vec![0; outer.len()];
        let mut base = 0;
        let mut r = r0;
        for (d, &(n, s)) in outer.iter().enumerate().rev() {
            idx[d] = r % n;
            base += idx[d] * s;
            r /= n;
        }
        for row in dst.chunks_exact_mut(run) {
            match run_stride {
                0 => row.fill(a[base]),
                1 => row.copy_from_slice(&a[base..base + run]),
                s => {
                    for (j, o) in row.iter_mut().enumerate() {
                        *o = a[base + j * s];
                    }
                }
            }
            for (d, &(n, s)) in outer.iter().enumerate().rev() {
                idx[d] += 1;
                base += s;
                if idx[d] < n {
                    break;
                }
                idx[d] = 0;
                base -= n * s;
            }
        }
    };
    if total < PAR_MIN || rows == 1 {
        fill(0, &mut out);
    } else {
        let tasks = 4 * rayon::current_num_threads();
        let rows_per_task = rows.div_ceil(tasks).max(PAR_MIN / 8 / run).max(1);
        out.par_chunks_mut(rows_per_task * run)
            .enumerate()
            .for_each(|(t, dst)| fill(t * rows_per_task, dst));
    }
    out
}

/// Result axis `i` is operand axis `perm[i]`.
pub fn permute<T: Real>(a: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let in_strides = strides(shape);
    // The operand stride of each result axis.
    let walk: Vec<usize> = perm.iter().map(|&p| in_strides[p]).collect();
    gather(a, &out_shape, &walk)
}

/// Repeat `a` along the new axes `axes` of `to`.
pub fn expand<T: Real>(a: &[T], to: &[usize], axes: &[usize]) -> Vec<T> {
    let kept: Vec<usize> = (0..to.len()).filter(|i| !axes.contains(i)).collect();
    let kept_strides = strides(&kept.iter().map(|&i| to[i]).collect::<Vec<_>>());
    let mut walk = vec![0; to.len()];
    for (&i, &s) in kept.iter().zip(&kept_strides) {
        walk[i] = s;
    }
    gather(a, to, &walk)
}

/// The sum of `x` in eight interleaved partial sums (vectorizes; also rounds better than one
/// running sum).
#[inline]
fn sum_run<T: Real>(x: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let mut chunks = x.chunks_exact(8);
    for c in &mut chunks {
        for l in 0..8 {
            acc[l] += c[l];
        }
    }
    let tail = chunks.remainder().iter().fold(T::zero(), |s, &v| s + v);
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// One coalesced axis of a reduction: its size, and its result stride (0 when summed over).
#[derive(Clone, Copy)]
struct RDim {
    n: usize,
    out_stride: usize,
    summed: bool,
}

/// Add the sums of the contiguous `a` (axes `dims`) into `out`.
fn reduce_into<T: Real>(a: &[T], dims: &[RDim], out: &mut [T]) {
    let Some((inner, outer)) = dims.split_last() else {
        out[0] += a[0];
        return;
    };
    let mut idx = vec![0; outer.len()];
    let mut dst = 0;
    for run in a.chunks_exact(inner.n) {
        if inner.summed {
            out[dst] += sum_run(run);
        } else {
            for (o, &v) in out[dst..dst + inner.n].iter_mut().zip(run) {
                *o += v;
            }
        }
        for (d, od) in outer.iter().enumerate().rev() {
            idx[d] += 1;
            dst += od.out_stride;
            if idx[d] < od.n {
                break;
            }
            idx[d] = 0;
            dst -= od.n * od.out_stride;
        }
    }
}

/// Sum over `axes` (strictly increasing).
pub fn reduce_sum<T: Real>(a: &[T], shape: &[usize], axes: &[usize]) -> Vec<T> {
    let out_len: usize = (0..shape.len())
        .filter(|i| !axes.contains(i))
        .map(|i| shape[i])
        .product();
    let mut out = vec![T::zero(); out_len.max(1)];
    if a.is_empty() {
        return out;
    }
    // Drop axes of size 1 and merge neighbours that are both summed or both kept.
    let mut dims: Vec<RDim> = Vec::with_capacity(shape.len());
    for (i, &n) in shape.iter().enumerate() {
        let summed = axes.contains(&i);
        if n == 1 {
            continue;
        }
        match dims.last_mut() {
            Some(last) if last.summed == summed => last.n *= n,
            _ => dims.push(RDim {
                n,
                out_stride: 0,
                summed,
            }),
        }
    }
    let mut s = 1;
    for d in dims.iter_mut().rev() {
        if !d.summed {
            d.out_stride = s;
            s *= d.n;
        }
    }
    let parallel = a.len() >= PAR_MIN && !dims.is_empty() && dims[0].n > 1;
    if !parallel {
        reduce_into(a, &dims, &mut out);
    } else if !dims[0].summed {
        // Each index of the outermost (kept) axis owns its slice of the result.
        let in_block = a.len() / dims[0].n;
        out.par_chunks_mut(dims[0].out_stride)
            .zip(a.par_chunks(in_block))
            .for_each(|(o, x)| reduce_into(x, &dims[1..], o));
    } else {
        // Split the outermost (summed) axis; add the partial results.
        let n0 = dims[0].n;
        let parts = n0.min(rayon::current_num_threads()).max(1);
        let per = n0.div_ceil(parts);
        let in_block = a.len() / n0;
        let partials: Vec<Vec<T>> = a
            .par_chunks(per * in_block)
            .map(|x| {
                let mut d = dims.clone();
                d[0].n = x.len() / in_block;
                let mut o = vec![T::zero(); out.len()];
                reduce_into(x, &d, &mut o);
                o
            })
            .collect();
        for p in partials {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
    }
    out
}

/// `(outer, n, inner)`: the sizes before `axis`, of `axis` and after it.
fn around(shape: &[usize], axis: usize) -> (usize, usize, usize) {
    let outer = shape[..axis].iter().product();
    let inner = shape[axis + 1..].iter().product();
    (outer, shape[axis], inner)
}

/// Element `index` along `axis` of `a` (shape `shape`), the axis removed.
pub fn take<T: Real>(a: &[T], shape: &[usize], axis: usize, index: usize) -> Vec<T> {
    let (outer, n, inner) = around(shape, axis);
    let mut out = Vec::with_capacity(outer * inner);
    for o in 0..outer {
        let start = (o * n + index) * inner;
        out.extend_from_slice(&a[start..start + inner]);
    }
    out
}

/// `a` (shape `shape`) placed at `index` of a new axis `axis` of `size`, zeros elsewhere.
pub fn embed<T: Real>(a: &[T], shape: &[usize], axis: usize, index: usize, size: usize) -> Vec<T> {
    let outer: usize = shape[..axis].iter().product();
    let inner: usize = shape[axis..].iter().product();
    let mut out = vec![T::zero(); outer * size * inner];
    for o in 0..outer {
        let dst = (o * size + index) * inner;
        out[dst..dst + inner].copy_from_slice(&a[o * inner..(o + 1) * inner]);
    }
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
    let mut out = scratch_zeroed(c * k * k * cols);
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

/// How a K × K convolution (K > 1) runs on the host, chosen from its channel counts. Every form
/// computes the same sums; they differ in which operand a GEMM reads and what extra memory they
/// write (measured with `cargo run --release -p snfc-runtime --example conv_speed`, f32, B = 100,
/// on the shapes of mnist_glow's couplings and mnist_cnn9's convs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvForm {
    /// Direct register-tiled loops: both channel counts small (the CNN's 1–48 channels), where a
    /// GEMM would have too few rows or too short a reduction to run at its rate.
    Direct,
    /// A GEMM over the im2col matrix (`C_in·K²` rows): few input channels, many outputs (a
    /// coupling's first conv, 2 → 512), or many of both.
    Im2col,
    /// A GEMM of the `C_out·K²` per-tap kernels with the input itself, then each tap's plane
    /// added shifted into place: few output channels, many inputs (a coupling's last conv,
    /// 512 → C), where im2col would write `C_in·K²·H·W·B` values (361 MB for 512 channels of
    /// 14 × 14 × 100) for a GEMM with a handful of rows.
    Taps,
}

/// Channel count from which a side of a convolution feeds a GEMM well (below it on both sides
/// the direct loops win: about 2× at C = 16 and 48 on 14 × 14; at C = 64 on 7 × 7 the direct
/// kernel adjoint is already 1.4× slower).
pub const GEMM_MIN_CHANNELS: usize = 64;

/// The form of a `C_in → C_out`, K × K convolution (its kernel adjoint uses the same).
pub fn conv_form(ci: usize, co: usize, kk: usize) -> ConvForm {
    if kk == 1 || (co >= GEMM_MIN_CHANNELS && ci <= co) {
        ConvForm::Im2col
    } else if ci >= GEMM_MIN_CHANNELS {
        ConvForm::Taps
    } else {
        ConvForm::Direct
    }
}

/// The geometry of a direct convolution over the zero-padded input.
#[derive(Clone, Copy)]
struct Geom {
    /// Input channels, map height, `W·B` (one row of a map), batch, kernel size.
    ci: usize,
    h: usize,
    wb: usize,
    b: usize,
    kk: usize,
    /// One row of the padded map, `(W + 2p)·B`, and one padded map, `(H + 2p)·(W + 2p)·B`.
    pwb: usize,
    pplane: usize,
}

/// `x [C_in, H, W, B]` padded for a K × K kernel, and the geometry of the direct loops over it.
fn padded<T: Real>(x: &[T], ci: usize, h: usize, w: usize, b: usize, kk: usize) -> (Vec<T>, Geom) {
    let p = kk / 2;
    let g = Geom {
        ci,
        h,
        wb: w * b,
        b,
        kk,
        pwb: (w + 2 * p) * b,
        pplane: (h + 2 * p) * (w + 2 * p) * b,
    };
    (pad(x, ci, h, w, b, p), g)
}

/// Scratch buffers (padded images, im2col matrices) kept between calls of the same shape: a
/// training step convolves the same shapes every time, and a fresh allocation of tens of MB is
/// page-faulted in again on every call. At most [`SCRATCH_KEPT`] are kept, of any type.
static SCRATCH: std::sync::Mutex<Vec<ScratchBuffer>> = std::sync::Mutex::new(Vec::new());
/// A kept buffer: its element type, its length and the `Vec` itself.
type ScratchBuffer = (std::any::TypeId, usize, Box<dyn std::any::Any + Send>);
const SCRATCH_KEPT: usize = 8;

/// A zeroed buffer of `len` values, reused from [`SCRATCH`] when one of that size is there.
fn scratch_zeroed<T: Real>(len: usize) -> Vec<T> {
    let kept = SCRATCH.lock().ok().and_then(|mut kept| {
        let i = kept
            .iter()
            .position(|(t, l, _)| *t == std::any::TypeId::of::<T>() && *l == len)?;
        Some(kept.swap_remove(i).2)
    });
    match kept.and_then(|b| b.downcast::<Vec<T>>().ok()) {
        Some(mut v) => {
            v.par_chunks_mut(1 << 16).for_each(|c| c.fill(T::zero()));
            *v
        }
        None => vec![T::zero(); len],
    }
}

/// Keep a scratch buffer for the next call of its size.
fn give_back<T: Real>(v: Vec<T>) {
    if v.len() < PAR_MIN {
        return;
    }
    if let Ok(mut kept) = SCRATCH.lock() {
        if kept.len() >= SCRATCH_KEPT {
            kept.remove(0);
        }
        kept.push((std::any::TypeId::of::<T>(), v.len(), Box::new(v)));
    }
}

/// `x [C, H, W, B]` zero-padded by `p` on both spatial axes: `[C, H + 2p, (W + 2p)·B]`.
fn pad<T: Real>(x: &[T], c: usize, h: usize, w: usize, b: usize, p: usize) -> Vec<T> {
    let (ph, pwb, wb) = (h + 2 * p, (w + 2 * p) * b, w * b);
    let mut out = scratch_zeroed(c * ph * pwb);
    let copy = |(ch, dst): (usize, &mut [T])| {
        for y in 0..h {
            let src = &x[(ch * h + y) * wb..][..wb];
            dst[(y + p) * pwb + p * b..][..wb].copy_from_slice(src);
        }
    };
    if out.len() < PAR_MIN {
        out.chunks_mut(ph * pwb).enumerate().for_each(copy);
    } else {
        out.par_chunks_mut(ph * pwb).enumerate().for_each(copy);
    }
    out
}

#[inline(always)]
fn fmadd<T: Real, const FMA: bool>(a: T, b: T, c: T) -> T {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

/// Output row `y` of `OB` output channels, lanes `c0..c0 + L` of the row: `out[j][c0 + l] =
/// Σ_{i,u,v} kp[((i·K + u)·K + v)·OB + j] · xp[i, y + u, c0 + v·B + l]`.
///
/// Safety: every index named above lies inside `xp`, `kp` and `out[j]` (checked by
/// [`conv_row`] for its whole row).
#[inline(always)]
unsafe fn conv_tile<T: Real, const OB: usize, const L: usize, const FMA: bool>(
    g: &Geom,
    xp: *const T,
    kp: *const T,
    y: usize,
    c0: usize,
    out: &[*mut T; OB],
) {
    let mut acc = [[T::zero(); L]; OB];
    let mut kw = kp;
    for i in 0..g.ci {
        for u in 0..g.kk {
            let src = xp.add(i * g.pplane + (y + u) * g.pwb + c0);
            for v in 0..g.kk {
                let s = src.add(v * g.b);
                for (j, a) in acc.iter_mut().enumerate() {
                    let kj = *kw.add(j);
                    for (l, a) in a.iter_mut().enumerate() {
                        *a = fmadd::<T, FMA>(kj, *s.add(l), *a);
                    }
                }
                kw = kw.add(OB);
            }
        }
    }
    for (o, a) in out.iter().zip(&acc) {
        std::ptr::copy_nonoverlapping(a.as_ptr(), o.add(c0), L);
    }
}

/// One output row `y` of `OB` output channels (`rows`, each `W·B` long), in tiles of `L` lanes
/// (of 8, 4 or 1 when the row is shorter than `L`).
#[inline(always)]
fn conv_row<T: Real, const OB: usize, const L: usize, const FMA: bool>(
    g: &Geom,
    xp: &[T],
    kp: &[T],
    y: usize,
    rows: &mut [&mut [T]],
) {
    // The bounds of every access of `conv_tile` over this row.
    assert!(rows.len() == OB && rows.iter().all(|r| r.len() == g.wb));
    assert_eq!(kp.len(), g.ci * g.kk * g.kk * OB);
    assert!(
        g.wb > 0
            && (g.ci - 1) * g.pplane + (y + g.kk - 1) * g.pwb + (g.kk - 1) * g.b + g.wb <= xp.len()
    );
    let out: [*mut T; OB] = std::array::from_fn(|j| rows[j].as_mut_ptr());
    let (xp, kp) = (xp.as_ptr(), kp.as_ptr());
    // Safety: the asserts above bound every index of every tile (c0 + tile width ≤ W·B).
    unsafe {
        if g.wb >= L {
            conv_tiles::<T, OB, L, FMA>(g, xp, kp, y, &out);
        } else if g.wb >= 8 {
            conv_tiles::<T, OB, 8, FMA>(g, xp, kp, y, &out);
        } else if g.wb >= 4 {
            conv_tiles::<T, OB, 4, FMA>(g, xp, kp, y, &out);
        } else {
            conv_tiles::<T, OB, 1, FMA>(g, xp, kp, y, &out);
        }
    }
}

/// [`conv_tile`] over a whole row (`L ≤ W·B`), the last tile overlapping its neighbour when `L`
/// does not divide the row (it rewrites the same values).
///
/// Safety: as for [`conv_tile`] with every `c0 ≤ W·B − L`.
#[inline(always)]
unsafe fn conv_tiles<T: Real, const OB: usize, const L: usize, const FMA: bool>(
    g: &Geom,
    xp: *const T,
    kp: *const T,
    y: usize,
    out: &[*mut T; OB],
) {
    let mut c0 = 0;
    while c0 + L <= g.wb {
        conv_tile::<T, OB, L, FMA>(g, xp, kp, y, c0, out);
        c0 += L;
    }
    if c0 < g.wb {
        conv_tile::<T, OB, L, FMA>(g, xp, kp, y, g.wb - L, out);
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn conv_row_avx2<T: Real, const OB: usize, const L: usize>(
    g: &Geom,
    xp: &[T],
    kp: &[T],
    y: usize,
    rows: &mut [&mut [T]],
) {
    conv_row::<T, OB, L, true>(g, xp, kp, y, rows)
}

/// Whether the CPU has AVX2 and FMA (the direct convolutions then run a build of their inner
/// loops for them).
fn avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// [`conv_row`] for `OB` channels with `OB·L` lanes of 256 bytes (eight AVX2 accumulators).
fn conv_row_dispatch<T: Real, const OB: usize>(
    fast: bool,
    g: &Geom,
    xp: &[T],
    kp: &[T],
    y: usize,
    rows: &mut [&mut [T]],
) {
    macro_rules! lanes {
        ($f:ident $(, $fma:literal)?) => {{
            // Lanes per output channel: 64 / OB f32 or 32 / OB f64, rounded to a power of 2.
            match (std::mem::size_of::<T>() <= 4, OB) {
                (true, 1) => $f::<T, OB, 64 $(, $fma)?>(g, xp, kp, y, rows),
                (true, 2) | (false, 1) => $f::<T, OB, 32 $(, $fma)?>(g, xp, kp, y, rows),
                (true, _) | (false, 2) => $f::<T, OB, 16 $(, $fma)?>(g, xp, kp, y, rows),
                (false, _) => $f::<T, OB, 8 $(, $fma)?>(g, xp, kp, y, rows),
            }
        }};
    }
    #[cfg(target_arch = "x86_64")]
    if fast {
        // Safety: `fast` is true only when the CPU has AVX2 and FMA.
        unsafe { lanes!(conv_row_avx2) };
        return;
    }
    let _ = fast;
    lanes!(conv_row, false)
}

/// Output channels per register tile of the direct convolution.
const OUT_BLOCK: usize = 4;

/// The direct `conv2d`: parallel over (block of up to [`OUT_BLOCK`] output channels, output row);
/// `fast` runs the AVX2 + FMA build of the inner loops.
fn conv2d_direct<T: Real>(
    x: &[T],
    x_shape: &[usize],
    k: &[T],
    co: usize,
    kk: usize,
    fast: bool,
) -> Vec<T> {
    let (ci, h, w, b) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    let (xp, g) = padded(x, ci, h, w, b, kk);
    let taps = ci * kk * kk;
    // Kernel blocks of OB output channels, tap-major: kp[block][tap][j].
    let blocks: Vec<(usize, usize)> = (0..co)
        .step_by(OUT_BLOCK)
        .map(|o0| (o0, OUT_BLOCK.min(co - o0)))
        .collect();
    let kp: Vec<Vec<T>> = blocks
        .iter()
        .map(|&(o0, nb)| {
            let mut packed = Vec::with_capacity(taps * nb);
            for t in 0..taps {
                for j in 0..nb {
                    packed.push(k[(o0 + j) * taps + t]);
                }
            }
            packed
        })
        .collect();
    let mut out = vec![T::zero(); co * h * g.wb];
    // Tasks: (block, y) with the block's rows y, one per output channel.
    let mut tasks: Vec<(usize, usize, Vec<&mut [T]>)> = Vec::with_capacity(blocks.len() * h);
    for (bi, &(_, nb)) in blocks.iter().enumerate() {
        for y in 0..h {
            tasks.push((bi, y, Vec::with_capacity(nb)));
        }
    }
    for (r, row) in out.chunks_mut(g.wb).enumerate() {
        let (o, y) = (r / h, r % h);
        tasks[(o / OUT_BLOCK) * h + y].2.push(row);
    }
    tasks.into_par_iter().for_each(|(bi, y, mut rows)| {
        let kp = &kp[bi];
        match blocks[bi].1 {
            4 => conv_row_dispatch::<T, 4>(fast, &g, &xp, kp, y, &mut rows),
            3 => conv_row_dispatch::<T, 3>(fast, &g, &xp, kp, y, &mut rows),
            2 => conv_row_dispatch::<T, 2>(fast, &g, &xp, kp, y, &mut rows),
            _ => conv_row_dispatch::<T, 1>(fast, &g, &xp, kp, y, &mut rows),
        }
    });
    give_back(xp);
    out
}

/// `conv2d(x [C_in, H, W, B], k [C_out, C_in, K, K]) → [C_out, H, W, B]`: direct for small
/// kernels, else one GEMM `k [C_out, C_in·K·K] × im2col(x) [C_in·K·K, H·W·B]`.
pub fn conv2d<T: Real>(x: &[T], x_shape: &[usize], k: &[T], k_shape: &[usize]) -> Vec<T> {
    let (co, ci, kk) = (k_shape[0], k_shape[1], k_shape[2]);
    if x.is_empty() || k.is_empty() {
        return vec![T::zero(); co * x_shape[1..].iter().product::<usize>()];
    }
    match conv_form(ci, co, kk) {
        ConvForm::Direct => conv2d_direct(x, x_shape, k, co, kk, avx2_fma()),
        ConvForm::Im2col => conv2d_gemm(x, x_shape, k, co, kk),
        ConvForm::Taps => conv2d_taps(x, x_shape, k, co, kk),
    }
}

/// The columns `[x0, x1)` of an output row that tap offset `v` (of a K × K kernel, padding
/// `p`) reads from the input row, and the input column of `x0`: `0 ≤ x + v − p < W`.
fn tap_columns(w: usize, p: usize, v: usize) -> Option<(usize, usize, usize)> {
    let x0 = p.saturating_sub(v);
    let x1 = (w + p).saturating_sub(v).min(w);
    (x0 < x1).then(|| (x0, x1, x0 + v - p))
}

/// [`conv2d`] as one GEMM `k' [C_out·K², C_in] × x [C_in, H·W·B]` (every tap's kernel against
/// every input pixel; `x` is read as it is), then `out[o, y, x] = Σ_{u,v} P[(o, u, v), y + u − p,
/// x + v − p]`: each tap's plane added shifted into place, a contiguous run per row.
fn conv2d_taps<T: Real>(x: &[T], x_shape: &[usize], k: &[T], co: usize, kk: usize) -> Vec<T> {
    let (ci, h, w, b) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    let (n, t, p, wb) = (h * w * b, kk * kk, kk / 2, w * b);
    // kt[(o, tap), i] = k[o, i, tap]
    let mut kt = vec![T::zero(); co * t * ci];
    for o in 0..co {
        for i in 0..ci {
            for tap in 0..t {
                kt[(o * t + tap) * ci + i] = k[(o * ci + i) * t + tap];
            }
        }
    }
    let mut prod = scratch_zeroed(co * t * n);
    matmul(
        MatRef::row_major(&kt, co * t, ci),
        MatRef::row_major(x, ci, n),
        &mut prod,
        T::one(),
        T::zero(),
        false,
    );
    let mut out = vec![T::zero(); co * n];
    let add_taps = |(row, dst): (usize, &mut [T])| {
        let (o, y) = (row / h, row % h);
        for u in 0..kk {
            let sy = y + u;
            if sy < p || sy - p >= h {
                continue;
            }
            for v in 0..kk {
                let Some((x0, x1, sx0)) = tap_columns(w, p, v) else {
                    continue;
                };
                let plane = (o * t + u * kk + v) * n + (sy - p) * wb;
                let src = &prod[plane + sx0 * b..plane + (sx0 + x1 - x0) * b];
                for (d, s) in dst[x0 * b..x1 * b].iter_mut().zip(src) {
                    *d += *s;
                }
            }
        }
    };
    if out.len() < PAR_MIN {
        out.chunks_mut(wb).enumerate().for_each(add_taps);
    } else {
        out.par_chunks_mut(wb).enumerate().for_each(add_taps);
    }
    give_back(prod);
    out
}

/// [`conv2d`] as one GEMM over the im2col matrix (over `x` itself for a 1 × 1 kernel).
fn conv2d_gemm<T: Real>(x: &[T], x_shape: &[usize], k: &[T], co: usize, kk: usize) -> Vec<T> {
    let (ci, h, w, b) = (x_shape[0], x_shape[1], x_shape[2], x_shape[3]);
    let (n, rows) = (h * w * b, ci * kk * kk);
    let mut out = vec![T::zero(); co * n];
    let cols = (kk > 1).then(|| im2col(x, ci, h, w, b, kk));
    let cols_ref = MatRef::row_major(cols.as_deref().unwrap_or(x), rows, n);
    matmul(
        MatRef::row_major(k, co, rows),
        cols_ref,
        &mut out,
        T::one(),
        T::zero(),
        false,
    );
    if let Some(cols) = cols {
        give_back(cols);
    }
    out
}

/// `Σ_l x[l] · y[l]` in eight interleaved partial sums (vectorizes).
#[inline]
fn dot<T: Real>(x: &[T], y: &[T]) -> T {
    let mut acc = [T::zero(); 8];
    let (xc, yc) = (x.chunks_exact(8), y.chunks_exact(8));
    let tail = xc
        .remainder()
        .iter()
        .zip(yc.remainder())
        .fold(T::zero(), |s, (&a, &b)| s + a * b);
    for (a, b) in xc.zip(yc) {
        for l in 0..8 {
            acc[l] += a[l] * b[l];
        }
    }
    sum_run(&acc) + tail
}

/// `x` as a slice of `U` when `T` is `U`.
fn cast<T: 'static, U: 'static>(x: &[T]) -> Option<&[U]> {
    // Safety: T and U are the same type.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>())
        .then(|| unsafe { &*(x as *const [T] as *const [U]) })
}

/// `x` as a mutable slice of `U` when `T` is `U`.
fn cast_mut<T: 'static, U: 'static>(x: &mut [T]) -> Option<&mut [U]> {
    // Safety: T and U are the same type.
    (std::any::TypeId::of::<T>() == std::any::TypeId::of::<U>())
        .then(|| unsafe { &mut *(x as *mut [T] as *mut [U]) })
}

/// The kernel adjoint's inner loops in AVX2 + FMA vectors (f32 and f64): `acc[u][v]` holds
/// lanes of the sum for tap (u, v), so one load of `dy` feeds `U·V` FMAs. (Written with
/// intrinsics: LLVM's SLP vectorizer groups the unrolled taps of the generic loop the wrong way.)
#[cfg(target_arch = "x86_64")]
mod avx {
    use super::Geom;
    use std::arch::x86_64::*;

    macro_rules! kgrad_block {
        ($name:ident, $t:ty, $lanes:literal, $zero:ident, $load:ident, $fma:ident, $store:ident) => {
            /// Add `Σ_{y < rows, c < W·B} d[y·W·B + c] · src[(y + u)·pwb + v·B + c]` to
            /// `out[u·V + v]` for `u < U`, `v < V`.
            ///
            /// Safety: the CPU has AVX2 and FMA, and every index named lies inside `d` and `src`.
            #[target_feature(enable = "avx2,fma")]
            pub unsafe fn $name<const U: usize, const V: usize>(
                g: &Geom,
                d: *const $t,
                src: *const $t,
                rows: usize,
                out: &mut [$t],
            ) {
                let mut acc = [[$zero(); V]; U];
                let mut tail = [[0.0; V]; U];
                let tiles_end = g.wb / $lanes * $lanes;
                for y in 0..rows {
                    let dr = d.add(y * g.wb);
                    let sr = src.add(y * g.pwb);
                    let mut c = 0;
                    while c < tiles_end {
                        let dv = $load(dr.add(c));
                        for (u, acc_u) in acc.iter_mut().enumerate() {
                            for (v, a) in acc_u.iter_mut().enumerate() {
                                *a = $fma(dv, $load(sr.add(u * g.pwb + v * g.b + c)), *a);
                            }
                        }
                        c += $lanes;
                    }
                    for c in tiles_end..g.wb {
                        let dc = *dr.add(c);
                        for (u, t_u) in tail.iter_mut().enumerate() {
                            for (v, t) in t_u.iter_mut().enumerate() {
                                *t += dc * *sr.add(u * g.pwb + v * g.b + c);
                            }
                        }
                    }
                }
                for u in 0..U {
                    for v in 0..V {
                        let mut lanes = [0.0; $lanes];
                        $store(lanes.as_mut_ptr(), acc[u][v]);
                        out[u * V + v] += lanes.iter().sum::<$t>() + tail[u][v];
                    }
                }
            }
        };
    }

    kgrad_block!(
        kgrad_f32,
        f32,
        8,
        _mm256_setzero_ps,
        _mm256_loadu_ps,
        _mm256_fmadd_ps,
        _mm256_storeu_ps
    );
    kgrad_block!(
        kgrad_f64,
        f64,
        4,
        _mm256_setzero_pd,
        _mm256_loadu_pd,
        _mm256_fmadd_pd,
        _mm256_storeu_pd
    );
}

/// Add the K·K sums `Σ_{y ∈ ys, x, b} dy[o, y, x, b] · xp[i, y + u, x + v, b]` of one (output
/// channel, input channel) pair over the rows `ys` into `out[u·K + v]`; `fast` runs the AVX2
/// loops (when the CPU has them) for f32 and f64 with K = 3 or 5.
#[allow(clippy::too_many_arguments)]
fn kgrad_pair<T: Real>(
    fast: bool,
    g: &Geom,
    dy: &[T],
    xp: &[T],
    o: usize,
    i: usize,
    ys: std::ops::Range<usize>,
    out: &mut [T],
) {
    let kk = g.kk;
    if ys.is_empty() || g.wb == 0 {
        return;
    }
    let dy = &dy[(o * g.h + ys.start) * g.wb..(o * g.h + ys.end) * g.wb];
    // Tap (u, v) of row y reads src[(y + u)·pwb + v·B ..][..W·B].
    let src = &xp[i * g.pplane + ys.start * g.pwb..][..(ys.len() + kk - 1) * g.pwb];
    let rows = ys.len();
    #[cfg(target_arch = "x86_64")]
    if fast && (kk == 3 || kk == 5) {
        assert!(out.len() == kk * kk && (kk - 1) * g.b + g.wb <= g.pwb);
        macro_rules! run {
            ($f:ident, $d:expr, $s:expr, $o:expr) => {
                // Safety: `fast` only when the CPU has AVX2 and FMA; `dy` holds `rows` rows of
                // W·B and `src` rows + K − 1 rows of pwb ≥ (K − 1)·B + W·B (asserted).
                unsafe {
                    if kk == 3 {
                        avx::$f::<3, 3>(g, $d.as_ptr(), $s.as_ptr(), rows, $o)
                    } else {
                        for u in 0..5 {
                            let s = $s.as_ptr().add(u * g.pwb);
                            avx::$f::<1, 5>(g, $d.as_ptr(), s, rows, &mut $o[u * 5..][..5])
                        }
                    }
                }
            };
        }
        if let (Some(d), Some(s)) = (cast::<T, f32>(dy), cast::<T, f32>(src)) {
            let o = cast_mut::<T, f32>(out).unwrap();
            run!(kgrad_f32, d, s, o);
            return;
        }
        if let (Some(d), Some(s)) = (cast::<T, f64>(dy), cast::<T, f64>(src)) {
            let o = cast_mut::<T, f64>(out).unwrap();
            run!(kgrad_f64, d, s, o);
            return;
        }
    }
    let _ = fast;
    for u in 0..kk {
        for v in 0..kk {
            let mut s = T::zero();
            for y in 0..rows {
                let d_row = &dy[y * g.wb..][..g.wb];
                s += dot(d_row, &src[(y + u) * g.pwb + v * g.b..][..g.wb]);
            }
            out[u * kk + v] += s;
        }
    }
}

/// The direct kernel adjoint: parallel over (output channel, input channel) pairs, each split
/// into row ranges when there are too few pairs to share out; `fast` runs the AVX2 + FMA loops
/// (f32 and f64, K = 3 or 5).
fn kgrad_direct<T: Real>(
    dy: &[T],
    dy_shape: &[usize],
    x: &[T],
    ci: usize,
    kk: usize,
    fast: bool,
) -> Vec<T> {
    let (co, h, w, b) = (dy_shape[0], dy_shape[1], dy_shape[2], dy_shape[3]);
    let (xp, g) = padded(x, ci, h, w, b, kk);
    let pairs = co * ci;
    let splits = (4 * rayon::current_num_threads())
        .div_ceil(pairs)
        .min(h)
        .max(1);
    let per = h.div_ceil(splits);
    let splits = h.div_ceil(per);
    let kk2 = kk * kk;
    let mut partial = vec![T::zero(); pairs * splits * kk2];
    partial
        .par_chunks_mut(kk2)
        .enumerate()
        .for_each(|(t, dst)| {
            let (pair, s) = (t / splits, t % splits);
            let (o, i) = (pair / ci, pair % ci);
            let ys = s * per..((s + 1) * per).min(h);
            kgrad_pair(fast, &g, dy, &xp, o, i, ys, dst);
        });
    give_back(xp);
    if splits == 1 {
        return partial;
    }
    let mut out = vec![T::zero(); pairs * kk2];
    for (pair, dst) in out.chunks_mut(kk2).enumerate() {
        for s in 0..splits {
            let src = &partial[(pair * splits + s) * kk2..][..kk2];
            for (d, &v) in dst.iter_mut().zip(src) {
                *d += v;
            }
        }
    }
    out
}

/// The kernel adjoint `g[o, i, u, v] = Σ_{h,w,b} dy[o,h,w,b] x[i,h+u−p,w+v−p,b]`: direct for
/// small kernels, else one GEMM `dy [C_out, H·W·B] × im2col(x)ᵀ`.
pub fn conv_kernel_grad<T: Real>(
    dy: &[T],
    dy_shape: &[usize],
    x: &[T],
    x_shape: &[usize],
    k: usize,
) -> Vec<T> {
    let (co, ci) = (dy_shape[0], x_shape[0]);
    if dy.is_empty() || x.is_empty() {
        return vec![T::zero(); co * ci * k * k];
    }
    match conv_form(ci, co, k) {
        ConvForm::Direct => kgrad_direct(dy, dy_shape, x, ci, k, avx2_fma()),
        ConvForm::Im2col => kgrad_gemm(dy, dy_shape, x, ci, k),
        ConvForm::Taps => kgrad_taps(dy, dy_shape, x, ci, k),
    }
}

/// [`conv_kernel_grad`] as one GEMM of the `K²` shifted copies of `dy`, stacked as
/// `D [C_out·K², H·W·B]` with `D[(o, u, v), y, x] = dy[o, y − u + p, x − v + p]` (zero outside),
/// with `xᵀ`: `g[o, i, u, v] = Σ D[(o, u, v), ·] · x[i, ·]`. `D` is small when `C_out` is.
fn kgrad_taps<T: Real>(dy: &[T], dy_shape: &[usize], x: &[T], ci: usize, kk: usize) -> Vec<T> {
    let (co, h, w, b) = (dy_shape[0], dy_shape[1], dy_shape[2], dy_shape[3]);
    let (n, t, p, wb) = (h * w * b, kk * kk, kk / 2, w * b);
    let mut shifted = scratch_zeroed(co * t * n);
    let shift = |(r, dst): (usize, &mut [T])| {
        let (o, u, v) = (r / t, r / kk % kk, r % kk);
        // The input column of x' is x' + p − v: the same run as a forward tap at 2p − v.
        let Some((x0, x1, sx0)) = tap_columns(w, p, kk - 1 - v) else {
            return;
        };
        for y in 0..h {
            let sy = y + p;
            if sy < u || sy - u >= h {
                continue;
            }
            let src = (o * h + sy - u) * wb;
            dst[y * wb + x0 * b..y * wb + x1 * b]
                .copy_from_slice(&dy[src + sx0 * b..src + (sx0 + x1 - x0) * b]);
        }
    };
    if shifted.len() < PAR_MIN {
        shifted.chunks_mut(n).enumerate().for_each(shift);
    } else {
        shifted.par_chunks_mut(n).enumerate().for_each(shift);
    }
    let mut g = vec![T::zero(); co * t * ci];
    matmul(
        MatRef::row_major(&shifted, co * t, n),
        MatRef::row_major(x, ci, n).t(),
        &mut g,
        T::one(),
        T::zero(),
        false,
    );
    give_back(shifted);
    let mut out = vec![T::zero(); co * ci * t];
    for o in 0..co {
        for tap in 0..t {
            for i in 0..ci {
                out[(o * ci + i) * t + tap] = g[(o * t + tap) * ci + i];
            }
        }
    }
    out
}

/// [`conv_kernel_grad`] as one GEMM with the im2col matrix (with `x` itself for 1 × 1).
fn kgrad_gemm<T: Real>(dy: &[T], dy_shape: &[usize], x: &[T], ci: usize, k: usize) -> Vec<T> {
    let (co, h, w, b) = (dy_shape[0], dy_shape[1], dy_shape[2], dy_shape[3]);
    let (n, rows) = (h * w * b, ci * k * k);
    let mut out = vec![T::zero(); co * rows];
    let cols = (k > 1).then(|| im2col(x, ci, h, w, b, k));
    let cols_ref = MatRef::row_major(cols.as_deref().unwrap_or(x), rows, n);
    matmul(
        MatRef::row_major(dy, co, n),
        cols_ref.t(),
        &mut out,
        T::one(),
        T::zero(),
        false,
    );
    if let Some(cols) = cols {
        give_back(cols);
    }
    out
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

    use crate::host::test_rng::Rng;

    fn random(rng: &mut Rng, n: usize) -> Vec<f64> {
        (0..n).map(|_| rng.uniform()).collect()
    }

    #[track_caller]
    fn assert_close(got: &[f64], want: &[f64], tol: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (j, (a, e)) in got.iter().zip(want).enumerate() {
            assert!(
                (a - e).abs() <= tol * e.abs().max(1.0),
                "{what}[{j}]: {a} vs {e}"
            );
        }
    }

    /// Naive kernel adjoint in the batch-last layout.
    fn naive_kgrad(dy: &[f64], ys: [usize; 4], x: &[f64], ci: usize, kk: usize) -> Vec<f64> {
        let [co, h, w, b] = ys;
        let p = kk as isize / 2;
        let mut g = vec![0.0; co * ci * kk * kk];
        for o in 0..co {
            for i in 0..ci {
                for u in 0..kk {
                    for v in 0..kk {
                        let mut s = 0.0;
                        for yy in 0..h {
                            for xx in 0..w {
                                let sy = yy as isize + u as isize - p;
                                let sx = xx as isize + v as isize - p;
                                if sy < 0 || sx < 0 || sy >= h as isize || sx >= w as isize {
                                    continue;
                                }
                                for n in 0..b {
                                    s += dy[((o * h + yy) * w + xx) * b + n]
                                        * x[((i * h + sy as usize) * w + sx as usize) * b + n];
                                }
                            }
                        }
                        g[((o * ci + i) * kk + u) * kk + v] = s;
                    }
                }
            }
        }
        g
    }

    /// (C_in, C_out, H, W, B, K): C_in ≠ C_out, K = 1, 3, 5 (also wider than the map), odd
    /// sizes, B = 1, rows shorter and longer than a register tile, output-channel blocks of 4
    /// with remainders 1, 2 and 3.
    const CONV_SHAPES: [(usize, usize, usize, usize, usize, usize); 17] = [
        // Many inputs, few outputs (a coupling's last conv): the tap-product GEMM; and the
        // reverse (its first conv, and that conv's adjoint): im2col.
        (70, 3, 4, 3, 5, 3),
        (3, 66, 5, 4, 3, 3),
        (65, 2, 2, 6, 3, 5),
        (24, 2, 3, 3, 4, 5),
        (1, 1, 5, 7, 1, 3),
        (2, 3, 5, 4, 3, 3),
        (3, 2, 6, 5, 1, 5),
        (4, 5, 3, 3, 7, 1),
        (5, 7, 4, 6, 17, 3),
        (6, 4, 7, 3, 2, 5),
        (3, 3, 9, 11, 5, 3),
        (1, 2, 2, 2, 33, 3),
        (2, 2, 3, 3, 1, 5),
        (9, 6, 5, 5, 20, 3),
        (7, 9, 4, 4, 3, 3),
        (2, 1, 1, 9, 4, 3),
        (1, 3, 6, 2, 9, 5),
    ];

    /// A reused scratch buffer comes back zeroed, and only as its own type and size.
    #[test]
    fn scratch_buffers_come_back_zeroed() {
        let n = PAR_MIN * 3 + 5;
        give_back(vec![7.0f64; n]);
        give_back(vec![9.0f32; n]);
        let a: Vec<f64> = scratch_zeroed(n);
        let b: Vec<f32> = scratch_zeroed(n);
        let c: Vec<f64> = scratch_zeroed(n);
        assert_eq!(a.len(), n);
        assert!(a.iter().all(|&v| v == 0.0) && b.iter().all(|&v| v == 0.0));
        assert!(c.iter().all(|&v| v == 0.0) && c.len() == n);
        // A padded image after a call that left other values in a buffer of its size.
        let (ci, h, w, bsz) = (4, 16, 16, 64);
        let pad_len = ci * 18 * 18 * bsz;
        give_back(vec![3.0f64; pad_len]);
        let x = vec![1.0f64; ci * h * w * bsz];
        let p = pad(&x, ci, h, w, bsz, 1);
        assert_eq!(p.iter().filter(|&&v| v == 1.0).count(), x.len());
        assert_eq!(p.iter().filter(|&&v| v == 0.0).count(), pad_len - x.len());
    }

    #[test]
    fn conv_paths_match_naive() {
        let mut rng = Rng(11);
        for (ci, co, h, w, b, kk) in CONV_SHAPES {
            let x = random(&mut rng, ci * h * w * b);
            let k = random(&mut rng, co * ci * kk * kk);
            let xs = [ci, h, w, b];
            let want = naive(&x, xs, &k, [co, ci, kk, kk]);
            let what = format!("conv2d {xs:?} * {:?}", [co, ci, kk, kk]);
            assert_close(&conv2d(&x, &xs, &k, &[co, ci, kk, kk]), &want, 1e-12, &what);
            assert_close(&conv2d_gemm(&x, &xs, &k, co, kk), &want, 1e-12, &what);
            assert_close(&conv2d_taps(&x, &xs, &k, co, kk), &want, 1e-12, &what);
            if kk > 1 {
                for fast in [false, avx2_fma()] {
                    let got = conv2d_direct(&x, &xs, &k, co, kk, fast);
                    assert_close(&got, &want, 1e-12, &format!("{what} direct fast={fast}"));
                }
            }
            // f32 (the build the executor trains with) against the f64 reference.
            let (x32, k32): (Vec<f32>, Vec<f32>) = (
                x.iter().map(|&v| v as f32).collect(),
                k.iter().map(|&v| v as f32).collect(),
            );
            let got: Vec<f64> = conv2d(&x32, &xs, &k32, &[co, ci, kk, kk])
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert_close(&got, &want, 1e-4, &format!("{what} f32"));
        }
    }

    #[test]
    fn kernel_grad_paths_match_naive() {
        let mut rng = Rng(12);
        for (ci, co, h, w, b, kk) in CONV_SHAPES {
            let x = random(&mut rng, ci * h * w * b);
            let dy = random(&mut rng, co * h * w * b);
            let (xs, ys) = ([ci, h, w, b], [co, h, w, b]);
            let want = naive_kgrad(&dy, ys, &x, ci, kk);
            let what = format!("conv_kernel_grad {ys:?}, {xs:?}, K = {kk}");
            assert_close(
                &conv_kernel_grad(&dy, &ys, &x, &xs, kk),
                &want,
                1e-12,
                &what,
            );
            assert_close(&kgrad_gemm(&dy, &ys, &x, ci, kk), &want, 1e-12, &what);
            assert_close(&kgrad_taps(&dy, &ys, &x, ci, kk), &want, 1e-12, &what);
            if kk > 1 {
                for fast in [false, avx2_fma()] {
                    let got = kgrad_direct(&dy, &ys, &x, ci, kk, fast);
                    assert_close(&got, &want, 1e-12, &format!("{what} direct fast={fast}"));
                }
            }
            let (x32, dy32): (Vec<f32>, Vec<f32>) = (
                x.iter().map(|&v| v as f32).collect(),
                dy.iter().map(|&v| v as f32).collect(),
            );
            let got: Vec<f64> = conv_kernel_grad(&dy32, &ys, &x32, &xs, kk)
                .iter()
                .map(|&v| v as f64)
                .collect();
            assert_close(&got, &want, 1e-4, &format!("{what} f32"));
        }
    }

    /// The row-major multi-index of `k` in `shape`.
    fn unravel(mut k: usize, shape: &[usize]) -> Vec<usize> {
        let mut idx = vec![0; shape.len()];
        for (d, &n) in shape.iter().enumerate().rev() {
            idx[d] = k % n;
            k /= n;
        }
        idx
    }

    fn ravel(idx: &[usize], shape: &[usize]) -> usize {
        idx.iter().zip(shape).fold(0, |acc, (&i, &n)| acc * n + i)
    }

    #[test]
    fn layout_ops_match_naive() {
        let mut rng = Rng(13);
        // Small, with size-1 axes, the squeeze of mnist_cnn9 and its inverse (large enough to
        // run in parallel), and a large transpose of the innermost axis.
        let permutes: [(&[usize], &[usize]); 7] = [
            (&[2, 3, 4], &[2, 0, 1]),
            (&[3, 1, 4, 2], &[1, 3, 0, 2]),
            (&[4, 7, 2, 7, 2, 100], &[0, 2, 4, 1, 3, 5]),
            (&[4, 2, 2, 7, 7, 100], &[0, 3, 1, 4, 2, 5]),
            (&[300, 257], &[1, 0]),
            (&[5], &[0]),
            (&[1, 1], &[1, 0]),
        ];
        for (shape, perm) in permutes {
            let a = random(&mut rng, shape.iter().product());
            let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
            let want: Vec<f64> = (0..a.len())
                .map(|k| {
                    let o = unravel(k, &out_shape);
                    let mut src = vec![0; shape.len()];
                    for (j, &p) in perm.iter().enumerate() {
                        src[p] = o[j];
                    }
                    a[ravel(&src, shape)]
                })
                .collect();
            assert_eq!(
                permute(&a, shape, perm),
                want,
                "permute {shape:?} by {perm:?}"
            );
        }
        let expands: [(&[usize], &[usize]); 8] = [
            (&[3, 4, 5], &[0]),
            (&[3, 4, 5], &[1]),
            (&[3, 4, 5], &[2]),
            (&[3, 4, 5], &[0, 2]),
            (&[16, 49, 100], &[1, 2]),
            (&[7, 300, 40], &[0, 2]),
            (&[2, 3], &[0, 1]),
            (&[3, 1, 2], &[1]),
        ];
        for (to, axes) in expands {
            let kept: Vec<usize> = (0..to.len()).filter(|i| !axes.contains(i)).collect();
            let kept_shape: Vec<usize> = kept.iter().map(|&i| to[i]).collect();
            let a = random(&mut rng, kept_shape.iter().product());
            let want: Vec<f64> = (0..to.iter().product())
                .map(|k| {
                    let o = unravel(k, to);
                    let src: Vec<usize> = kept.iter().map(|&i| o[i]).collect();
                    a[ravel(&src, &kept_shape)]
                })
                .collect();
            assert_eq!(
                expand(&a, to, axes),
                want,
                "expand to {to:?} along {axes:?}"
            );
        }
        let reduces: [(&[usize], &[usize]); 11] = [
            (&[3, 4, 5], &[0]),
            (&[3, 4, 5], &[1]),
            (&[3, 4, 5], &[2]),
            (&[3, 4, 5], &[0, 2]),
            (&[3, 4, 5], &[0, 1, 2]),
            (&[3, 4, 5], &[]),
            (&[16, 49, 100], &[1, 2]),
            (&[700, 120], &[0]),
            (&[3, 1, 5], &[1]),
            (&[2, 70000], &[1]),
            (&[1, 70000], &[0, 1]),
        ];
        for (shape, axes) in reduces {
            let a = random(&mut rng, shape.iter().product());
            let kept: Vec<usize> = (0..shape.len()).filter(|i| !axes.contains(i)).collect();
            let kept_shape: Vec<usize> = kept.iter().map(|&i| shape[i]).collect();
            let mut want = vec![0.0; kept_shape.iter().product::<usize>()];
            for (k, &v) in a.iter().enumerate() {
                let idx = unravel(k, shape);
                let dst: Vec<usize> = kept.iter().map(|&i| idx[i]).collect();
                want[ravel(&dst, &kept_shape)] += v;
            }
            let what = format!("reduce_sum {shape:?} over {axes:?}");
            assert_close(&reduce_sum(&a, shape, axes), &want, 1e-12, &what);
        }
    }
}
