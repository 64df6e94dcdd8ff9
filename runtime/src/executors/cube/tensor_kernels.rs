//! The CubeCL kernels of the IR's tensor ops of any rank that cubek has no counterpart for: one
//! index-table kernel for every op that only moves, repeats, sums or scales elements
//! (`reshape`, `permute`, `expand`, `reduce_sum`, `flip_kernel`, `toeplitz`,
//! `toeplitz_adjoint`, `multiplicity`; cubek's kernels are products, reductions along one axis,
//! convolutions and random numbers, no gathers), and the rational-quadratic spline with its
//! vector-Jacobian product. (Convolutions: im2col in `kernels.rs` and cubek-matmul.)
//!
//! Layouts are the IR's: row-major, batch last (`x [C, H, W, B]`, kernels `[O, I, K, K]`, spline
//! activations `[D, B]` and parameters `[D, K]`, `[D, K−1]`).

use cubecl::prelude::*;

/// `out[o] = Σ_{j ∈ ptr[o]..ptr[o+1]} input[idx[j]] (· weight[j])`: the compiled form of every
/// index op. A gather has one entry per output (none for a zero), a sum many.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GatherConfig {
    pub outputs: usize,
    pub weighted: bool,
}

#[cube(launch)]
pub fn gather(
    input: &Array<f32>,
    ptr: &Array<u32>,
    idx: &Array<u32>,
    weight: &Array<f32>,
    out: &mut Array<f32>,
    #[comptime] g: GatherConfig,
) {
    let o = ABSOLUTE_POS;
    if o < comptime![g.outputs] {
        let start = ptr[o] as usize;
        let end = ptr[o + 1] as usize;
        let mut acc = 0.0f32;
        for j in start..end {
            let v = input[idx[j] as usize];
            if comptime![g.weighted] {
                acc += v * weight[j];
            } else {
                acc += v;
            }
        }
        out[o] = acc;
    }
}

/// What a spline launch computes (see [`SplineConfig`]).
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum SplineOut {
    /// `y`, per element.
    Value,
    /// `ln |dy/dx|`, per element.
    LogDet,
    /// `x = s⁻¹(y)`, per element (the operand is `y`).
    Inverse,
    /// The VJP with respect to `x`, per element.
    GradX,
    /// The VJP with respect to parameter array 1 (widths), 2 (heights) or 3 (derivatives),
    /// summed over the batch: one unit per parameter element.
    GradParam(usize),
}

/// A spline launch: `d` elements, batch `n`, `bins` bins, tail bound `bound` (f32 bits), what
/// it writes, and for gradients which cotangents it reads: of the value (`g_y`, the first
/// cotangent array) and/or of the log-det (`g_l`, the second).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct SplineConfig {
    pub d: usize,
    pub n: usize,
    pub bins: usize,
    pub bound: u32,
    pub out: SplineOut,
    pub g_y: bool,
    pub g_l: bool,
}

/// nflows' defaults, as the host spline (`host::spline`).
const MIN_BIN: f32 = 1e-3;
const MIN_DERIVATIVE: f32 = 1e-3;

/// Everything one element of the spline yields: `r[0] = y`, `r[1] = ln|dy/dx|`, `r[2] = g_x`,
/// `r[3..3+K]` the widths' gradient, `r[3+K..3+2K]` the heights', `r[3+2K..2+3K]` the
/// derivatives' (each only this element's contribution), for cotangents `(g_y, g_l)`; with
/// `inverse`, only `r[0] = s⁻¹(xv)` (the root in [0, 1] of the bin's quadratic, as the host's
/// `inverse_inside`).
/// Knots are recomputed per element from the row's parameters: `K` is small and the loads are
/// shared by the units of a row.
#[cube]
#[allow(clippy::too_many_arguments)]
fn spline_element<F: Float>(
    xv: F,
    widths: &Array<F>,
    heights: &Array<F>,
    derivs: &Array<F>,
    row: usize,
    g_y: F,
    g_l: F,
    r: &mut Array<F>,
    #[comptime] bins: usize,
    #[comptime] bound_bits: u32,
    #[comptime] grads: bool,
    #[comptime] inverse: bool,
) {
    let kk = bins;
    let bound = F::new(comptime![f32::from_bits(bound_bits)]);
    let one = F::new(1.0);
    let two = F::new(2.0);
    let zero = F::new(0.0);
    #[unroll]
    for q in 0..comptime![3 + 3 * bins - 1] {
        r[q] = zero;
    }
    if xv > zero - bound && xv < bound {
        // Softmax of the widths and heights, knots as cumulative sums scaled to [−B, B].
        let mut sw = Array::<F>::new(comptime![bins]);
        let mut sh = Array::<F>::new(comptime![bins]);
        let mut xs = Array::<F>::new(comptime![bins + 1]);
        let mut ys = Array::<F>::new(comptime![bins + 1]);
        let mut ds = Array::<F>::new(comptime![bins + 1]);
        let mut sig = Array::<F>::new(comptime![bins + 1]);
        let mut mw = widths[row * kk];
        let mut mh = heights[row * kk];
        #[unroll]
        for i in 1..bins {
            mw = F::max(mw, widths[row * kk + i]);
            mh = F::max(mh, heights[row * kk + i]);
        }
        let mut tw = zero;
        let mut th = zero;
        #[unroll]
        for i in 0..bins {
            let a = F::exp(widths[row * kk + i] - mw);
            let b = F::exp(heights[row * kk + i] - mh);
            sw[i] = a;
            sh[i] = b;
            tw += a;
            th += b;
        }
        let scale = F::new(comptime![1.0 - MIN_BIN * bins as f32]);
        let span = bound + bound;
        let mut cw = zero;
        let mut ch = zero;
        xs[0] = zero - bound;
        ys[0] = zero - bound;
        #[unroll]
        for i in 0..bins {
            sw[i] = sw[i] / tw;
            sh[i] = sh[i] / th;
            cw += F::new(MIN_BIN) + scale * sw[i];
            ch += F::new(MIN_BIN) + scale * sh[i];
            xs[i + 1] = span * cw - bound;
            ys[i + 1] = span * ch - bound;
        }
        xs[kk] = bound;
        ys[kk] = bound;
        ds[0] = one;
        ds[kk] = one;
        sig[0] = zero;
        #[unroll]
        for j in 0..comptime![bins - 1] {
            let v = derivs[row * (kk - 1) + j];
            // softplus(v) = max(v, 0) + ln(1 + e^−|v|); its derivative is sigmoid(v).
            ds[j + 1] =
                F::max(v, zero) + F::log1p(F::exp(zero - F::abs(v))) + F::new(MIN_DERIVATIVE);
            sig[j] = one / (one + F::exp(zero - v));
        }
        // The bin: the last inner knot ≤ x (an input on a knot lies in the bin it starts); of
        // the output knots for the inverse.
        let mut k = 0usize;
        #[unroll]
        for j in 1..bins {
            if comptime![inverse] {
                if ys[j] <= xv {
                    k = j;
                }
            } else if xs[j] <= xv {
                k = j;
            }
        }
        let x0 = xs[k];
        let dx = xs[k + 1] - x0;
        let y0 = ys[k];
        let dy = ys[k + 1] - y0;
        let d0 = ds[k];
        let d1 = ds[k + 1];
        let s = dy / dx;
        let beta = d0 + d1 - two * s;
        if comptime![inverse] {
            // a ξ² + b ξ + c = 0 for the bin's rational quadratic, solved in the stable form.
            let eta = xv - y0;
            let qa = dy * (s - d0) + eta * beta;
            let qb = dy * d0 - eta * beta;
            let qc = zero - s * eta;
            let disc = F::max(qb * qb - F::new(4.0) * qa * qc, zero);
            let denom = zero - qb - F::sqrt(disc);
            let mut root = zero;
            if denom < zero {
                root = F::min(F::max(two * qc / denom, zero), one);
            }
            r[0] = x0 + root * dx;
        } else {
            let xi = F::min(F::max((xv - x0) / dx, zero), one);
            let omega = xi * (one - xi);
            let nn = s * xi * xi + d0 * omega;
            let den = s + beta * omega;
            let pp = d1 * xi * xi + two * s * omega + d0 * (one - xi) * (one - xi);
            r[0] = y0 + dy * nn / den;
            r[1] = two * F::ln(s) + F::ln(pp) - two * F::ln(den);
            if comptime![grads] {
                let inv_den = one / den;
                let a_n = g_y * dy * inv_den;
                let a_den = zero - g_y * dy * nn * inv_den * inv_den - two * g_l * inv_den;
                let a_p = g_l / pp;
                let w1 = one - two * xi;
                let g_xi = a_n * (two * s * xi + d0 * w1)
                    + a_den * beta * w1
                    + a_p * (two * d1 * xi + two * s * w1 - two * d0 * (one - xi));
                let g_s =
                    a_n * xi * xi + a_den * (one - two * omega) + a_p * two * omega + two * g_l / s;
                let g_d0 = (a_n + a_den) * omega + a_p * (one - xi) * (one - xi);
                let g_d1 = a_den * omega + a_p * xi * xi;
                let g_dy = g_y * nn * inv_den + g_s / dx;
                let g_dx = zero - (g_s * s + g_xi * xi) / dx;
                let g_x = g_xi / dx;
                r[2] = g_x;
                // Knot cotangents (only inner knots carry parameters).
                let g_x0 = zero - g_x - g_dx;
                let g_y0 = g_y - g_dy;
                let mut lo_x = zero;
                let mut lo_y = zero;
                if k >= 1 {
                    lo_x = span * g_x0;
                    lo_y = span * g_y0;
                }
                let mut hi_x = zero;
                let mut hi_y = zero;
                if k + 1 < kk {
                    hi_x = span * g_dx;
                    hi_y = span * g_dy;
                }
                // Bin size i feeds every knot after it: d knot_j / d size_i = 2B·[i < j].
                let mut dot_w = zero;
                let mut dot_h = zero;
                let mut gsw = Array::<F>::new(comptime![bins]);
                let mut gsh = Array::<F>::new(comptime![bins]);
                #[unroll]
                for i in 0..bins {
                    let mut a = zero;
                    let mut b = zero;
                    if i < k {
                        a += lo_x;
                        b += lo_y;
                    }
                    if i < k + 1 {
                        a += hi_x;
                        b += hi_y;
                    }
                    gsw[i] = a * scale;
                    gsh[i] = b * scale;
                    dot_w += sw[i] * gsw[i];
                    dot_h += sh[i] * gsh[i];
                }
                #[unroll]
                for i in 0..bins {
                    r[3 + i] = sw[i] * (gsw[i] - dot_w);
                    r[3 + kk + i] = sh[i] * (gsh[i] - dot_h);
                }
                // Inner-knot derivative j + 1 is softplus(v_j) + min.
                #[unroll]
                for j in 0..comptime![bins - 1] {
                    let mut g = zero;
                    if j + 1 == k {
                        g += g_d0;
                    }
                    if j == k {
                        g += g_d1;
                    }
                    r[3 + 2 * kk + j] = g * sig[j];
                }
            }
        }
    } else {
        // The identity tails: the spline's arithmetic never sees an out-of-bound input.
        r[0] = xv;
        r[2] = g_y;
    }
}

/// The spline (value or log-det) or one of its vector-Jacobian products. Operands: `x [D, N]`,
/// widths and heights `[D, K]`, derivatives `[D, K−1]`, and (gradients only) the cotangents
/// `[D, N]` of the value and of the per-element log-det (an unread one binds any array).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn spline(
    x: &Array<f32>,
    widths: &Array<f32>,
    heights: &Array<f32>,
    derivs: &Array<f32>,
    cot_y: &Array<f32>,
    cot_l: &Array<f32>,
    out: &mut Array<f32>,
    #[comptime] c: SplineConfig,
) {
    spline_body::<f32>(x, widths, heights, derivs, cot_y, cot_l, out, c);
}

/// The cotangents `(g_y, g_l)` of element `e`.
#[cube]
fn cotangents<F: Float>(
    cot_y: &Array<F>,
    cot_l: &Array<F>,
    e: usize,
    #[comptime] c: SplineConfig,
) -> (F, F) {
    let mut g_y = F::new(0.0);
    let mut g_l = F::new(0.0);
    if comptime![c.g_y] {
        g_y = cot_y[e];
    }
    if comptime![c.g_l] {
        g_l = cot_l[e];
    }
    (g_y, g_l)
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn spline_body<F: Float>(
    x: &Array<F>,
    widths: &Array<F>,
    heights: &Array<F>,
    derivs: &Array<F>,
    cot_y: &Array<F>,
    cot_l: &Array<F>,
    out: &mut Array<F>,
    #[comptime] c: SplineConfig,
) {
    let t = ABSOLUTE_POS;
    let n = comptime![c.n];
    let kk = comptime![c.bins];
    let mut r = Array::<F>::new(comptime![3 + 3 * c.bins - 1]);
    match comptime![c.out] {
        SplineOut::GradParam(which) => {
            // One unit per parameter element (row, j), summing over the batch.
            let per_row = comptime![if which == 3 { c.bins - 1 } else { c.bins }];
            let base = comptime![match which {
                1 => 3,
                2 => 3 + c.bins,
                _ => 3 + 2 * c.bins,
            }];
            if t < comptime![c.d * per_row] {
                let row = t / per_row;
                let j = t % per_row;
                let mut acc = F::new(0.0);
                for col in 0..n {
                    let e = row * n + col;
                    let (g_y, g_l) = cotangents::<F>(cot_y, cot_l, e, c.clone());
                    spline_element::<F>(
                        x[e], widths, heights, derivs, row, g_y, g_l, &mut r, kk, c.bound, true,
                        false,
                    );
                    acc += r[base + j];
                }
                out[t] = acc;
            }
        }
        _ => {
            if t < comptime![c.d * c.n] {
                let row = t / n;
                let grads = comptime![c.out == SplineOut::GradX];
                let inverse = comptime![c.out == SplineOut::Inverse];
                let (g_y, g_l) = cotangents::<F>(cot_y, cot_l, t, c.clone());
                spline_element::<F>(
                    x[t], widths, heights, derivs, row, g_y, g_l, &mut r, kk, c.bound, grads,
                    inverse,
                );
                let slot = comptime![match c.out {
                    SplineOut::Value | SplineOut::Inverse => 0,
                    SplineOut::LogDet => 1,
                    _ => 2,
                }];
                out[t] = r[slot];
            }
        }
    }
}
