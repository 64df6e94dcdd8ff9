//! The rational-quadratic spline activation (Durkan et al. 2019, "Neural Spline Flows") as
//! standalone host math: forward, analytic inverse, and the exact vector-Jacobian product with
//! respect to the input and the three *unnormalized* parameter arrays. Generic over [`Real`]
//! (`f32` and `f64`).
//!
//! # The pinned format
//!
//! A spline layer with `K` bins ([`Spline::bins`]) and tail bound `B` ([`Spline::tail_bound`]) is
//! elementwise over `D` elements and the identity outside `[−B, B]`. Element `d` has
//!
//! * `widths[d, 0..K]`, `heights[d, 0..K]`: unnormalized bin sizes. Bin size
//!   `w = 1e-3 + (1 − 1e-3·K)·softmax(u)` ([`MIN_BIN_WIDTH`], [`MIN_BIN_HEIGHT`]);
//! * `derivatives[d, 0..K−1]`: unnormalized derivatives at the `K − 1` inner knots,
//!   `δ = softplus(v) + 1e-3` ([`MIN_DERIVATIVE`]). The two boundary derivatives are exactly 1,
//!   so the spline joins the linear (identity) tails with a continuous derivative.
//!
//! Knots are the cumulative sums of the bin sizes, scaled to `[−B, B]`:
//! `x_j = 2B·Σ_{i<j} w_i − B` for the inner knots, and `x_0 = −B`, `x_K = B` exactly (same for
//! `y`). This is nflows' `unconstrained_rational_quadratic_spline` with `tails="linear"` and
//! `min_bin_width = min_bin_height = min_derivative = 1e-3` (nflows pads the unnormalized
//! derivatives with a constant whose softplus plus `1e-3` is 1, which is the same thing), with the
//! same bin search (an input on a knot `x_k` lies in bin `k`) and the same numerically stable
//! root of the inverse quadratic.
//!
//! # The bound
//!
//! An input is handed to the spline only when it lies strictly inside `(−B, B)`; everything else
//! (including `±B` themselves, `±1e6`, `±∞` and NaN) takes the identity branch: `y = x`,
//! `ln|dy/dx| = 0`, `g_x = g_y`, zero parameter gradients. The spline's arithmetic never sees an
//! out-of-bound input (branch first, then compute), so huge inputs cannot produce NaN values or
//! gradients. At `±B` both branches agree exactly in exact arithmetic (`y(±B) = ±B`, the
//! boundary derivatives are 1, so `ln|dy/dx| = 0`, and the parameter gradients vanish there);
//! taking the identity branch makes `y(±B) = ±B` hold exactly in floating point too.
//!
//! # Layout of the batch versions
//!
//! Activations are `[D, N]` matrices stored row-major with one column per example: element `d`
//! of example `n` is at index `d·N + n`. Parameters are `[D, K]` (widths, heights) and
//! `[D, K−1]` (derivatives), row-major, one row per element. The batch functions parallelise
//! over the `D` rows (rayon); the knots of a row are computed once and reused for its `N` inputs,
//! and the VJP sums its inputs' cotangents of the bin quantities (knots, slope, knot derivatives)
//! per bin and runs the backward to the unnormalized parameters once per row (it is linear).
//!
//! Length mismatches are internal misuse (the compiler sizes every buffer) and panic with a
//! message naming the offending argument.

use super::linalg::Real;
use crate::executors::elementwise::host_unary_in_place;
use crate::executors::simd::call_on_widest_simd;
use rayon::prelude::*;
use snfc_compiler::ir::Unary;

/// Minimum bin width, as a fraction of the interval `[−B, B]` (nflows' default).
pub const MIN_BIN_WIDTH: f64 = 1e-3;
/// Minimum bin height, as a fraction of the interval `[−B, B]` (nflows' default).
pub const MIN_BIN_HEIGHT: f64 = 1e-3;
/// Minimum inner-knot derivative (nflows' default).
pub const MIN_DERIVATIVE: f64 = 1e-3;

/// A rational-quadratic spline activation: `bins` bins on `[−tail_bound, tail_bound]`,
/// identity (linear tails) outside.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Spline<T> {
    /// Number of bins `K` (at least 1; `K·1e-3 < 1`).
    pub bins: usize,
    /// Tail bound `B > 0`: the spline acts on `(−B, B)`, the identity elsewhere.
    pub tail_bound: T,
}

/// The unnormalized parameters: of one element (lengths `K`, `K`, `K−1`) for the per-element
/// functions, or of `D` elements (`[D, K]`, `[D, K]`, `[D, K−1]`, row-major) for the batch ones.
#[derive(Clone, Copy, Debug)]
pub struct SplineParams<'a, T> {
    /// Unnormalized bin widths (softmax logits).
    pub widths: &'a [T],
    /// Unnormalized bin heights (softmax logits).
    pub heights: &'a [T],
    /// Unnormalized inner-knot derivatives (softplus arguments).
    pub derivatives: &'a [T],
}

/// Gradients with respect to the unnormalized parameters, same shapes as [`SplineParams`].
/// Every function that takes one **overwrites** it.
#[derive(Debug)]
pub struct SplineGrads<'a, T> {
    pub widths: &'a mut [T],
    pub heights: &'a mut [T],
    pub derivatives: &'a mut [T],
}

/// The normalized spline of one element: `K + 1` knots `(xs[j], ys[j])` with `xs[0] = ys[0] =
/// −B`, `xs[K] = ys[K] = B`, and the derivatives at the knots (`derivatives[0] =
/// derivatives[K] = 1`).
#[derive(Clone, Debug, PartialEq)]
pub struct Knots<T> {
    pub xs: Vec<T>,
    pub ys: Vec<T>,
    pub derivatives: Vec<T>,
}

impl<'a, T> SplineParams<'a, T> {
    /// Element `d`'s parameters, out of `[D, K]` / `[D, K−1]` arrays.
    /// Panics (internal misuse) if the arrays are too short.
    #[track_caller]
    pub fn row(&self, d: usize, bins: usize) -> SplineParams<'a, T> {
        let (k, kd) = (bins, bins.saturating_sub(1));
        assert!(
            self.widths.len() >= (d + 1) * k
                && self.heights.len() >= (d + 1) * k
                && self.derivatives.len() >= (d + 1) * kd,
            "spline: no parameter row {d} for {bins} bins in arrays of lengths {}, {}, {}",
            self.widths.len(),
            self.heights.len(),
            self.derivatives.len()
        );
        SplineParams {
            widths: &self.widths[d * k..(d + 1) * k],
            heights: &self.heights[d * k..(d + 1) * k],
            derivatives: &self.derivatives[d * kd..(d + 1) * kd],
        }
    }
}

#[inline]
fn c<T: Real>(v: f64) -> T {
    T::of_f64(v)
}

/// `(softplus(x), sigmoid(x)) = (ln(1 + eˣ), 1 / (1 + e⁻ˣ))`, stable for large `|x|`, from one
/// exponential.
#[inline]
fn softplus_sigmoid<T: Real>(x: T) -> (T, T) {
    if x > T::zero() {
        let e = (-x).exp();
        (x + e.ln_1p(), T::one() / (T::one() + e))
    } else {
        let e = x.exp();
        (e.ln_1p(), e / (T::one() + e))
    }
}

/// Softmax of `u` into `out` (max-subtracted).
fn softmax<T: Real>(u: &[T], out: &mut [T]) {
    let m = u.iter().copied().fold(T::neg_infinity(), T::max);
    let mut sum = T::zero();
    for (o, &v) in out.iter_mut().zip(u) {
        *o = (v - m).exp();
        sum += *o;
    }
    for o in out.iter_mut() {
        *o /= sum;
    }
}

/// Knots of one axis from the softmax `sm` of the unnormalized sizes: bin sizes
/// `min + (1 − min·K)·sm`, cumulative sums, scaled to `[−B, B]`, ends pinned.
fn knots_from_softmax<T: Real>(sm: &[T], min: f64, bound: T, out: &mut [T]) {
    let k = sm.len();
    let (lo, span) = (-bound, bound + bound);
    let (minv, scale) = (c::<T>(min), c::<T>(1.0 - min * k as f64));
    let mut cum = T::zero();
    out[0] = lo;
    for j in 1..k {
        cum += minv + scale * sm[j - 1];
        out[j] = span * cum + lo;
    }
    out[k] = bound;
}

/// Rows per rayon job at least (a row is `N` inputs).
const ROWS_PER_JOB: usize = 8;

/// Up to this many bins the bin search is a branch-free count of the inner knots `≤ v` (the
/// same index as a binary search, the knots being sorted); above it, a binary search.
const LINEAR_SEARCH_MAX_BINS: usize = 16;

/// Up to this many bins a row's bin constants fit [`BinTable`]'s 16-entry tables, and the row
/// loops run vectorized.
const TABLE_BINS: usize = 16;

/// A row's [`BinC`] constants as one 16-entry table per constant (entries past the row's bins
/// repeat its last bin), so that a vectorized loop gathers them by bin index without bounds
/// checks.
struct BinTable<T> {
    x0: [T; TABLE_BINS],
    dx: [T; TABLE_BINS],
    inv_dx: [T; TABLE_BINS],
    y0: [T; TABLE_BINS],
    dy: [T; TABLE_BINS],
    s: [T; TABLE_BINS],
    inv_s: [T; TABLE_BINS],
    d0: [T; TABLE_BINS],
    d1: [T; TABLE_BINS],
    beta: [T; TABLE_BINS],
}

impl<T: Real> BinTable<T> {
    fn new(bins: &[BinC<T>]) -> BinTable<T> {
        let zero = [T::zero(); TABLE_BINS];
        let mut t = BinTable {
            x0: zero,
            dx: zero,
            inv_dx: zero,
            y0: zero,
            dy: zero,
            s: zero,
            inv_s: zero,
            d0: zero,
            d1: zero,
            beta: zero,
        };
        let last = bins.len() - 1;
        for j in 0..TABLE_BINS {
            let b = &bins[j.min(last)];
            t.x0[j] = b.x0;
            t.dx[j] = b.dx;
            t.inv_dx[j] = b.inv_dx;
            t.y0[j] = b.y0;
            t.dy[j] = b.dy;
            t.s[j] = b.s;
            t.inv_s[j] = b.inv_s;
            t.d0[j] = b.d0;
            t.d1[j] = b.d1;
            t.beta[j] = b.beta;
        }
        t
    }

    /// Bin `j`'s constants (any `j`: taken modulo the table's size).
    #[inline(always)]
    fn get(&self, j: u32) -> BinC<T> {
        let j = j as usize % TABLE_BINS;
        BinC {
            x0: self.x0[j],
            dx: self.dx[j],
            inv_dx: self.inv_dx[j],
            y0: self.y0[j],
            dy: self.dy[j],
            s: self.s[j],
            inv_s: self.inv_s[j],
            d0: self.d0[j],
            d1: self.d1[j],
            beta: self.beta[j],
        }
    }

    /// Each of `x`'s bin indices into `bin`: the count of the inner knots `≤ x` (the
    /// per-element search's index, branch-free).
    #[inline(always)]
    fn search(inner_knots: &[T], x: &[T], bin: &mut [u32]) {
        bin.fill(0);
        for &knot in inner_knots {
            for (j, &v) in bin.iter_mut().zip(x) {
                *j += u32::from(knot <= v);
            }
        }
    }
}

/// Elements a vectorized row loop takes at a time (their bin indices live on the stack).
const TABLE_CHUNK: usize = 64;

/// [`Row::forward_row`] before its `ln`, for rows of at most [`TABLE_BINS`] bins: `y` and the
/// slope `dy/dx` (1 outside the bound) of each input, by [`BinC::eval`] as the per-element path
/// computes them. Branch-free (every element is evaluated, the outside ones then replaced), so
/// that it vectorizes; compiled for AVX-512 and AVX2, the widest the CPU has chosen at run time.
fn forward_by_table<T: Real>(
    table: &BinTable<T>,
    inner_knots: &[T],
    bound: T,
    x: &[T],
    y: &mut [T],
    slope: &mut [T],
) {
    #[inline(always)]
    fn body<T: Real>(t: &BinTable<T>, knots: &[T], bound: T, x: &[T], y: &mut [T], sl: &mut [T]) {
        for ((x, y), slope) in x
            .chunks(TABLE_CHUNK)
            .zip(y.chunks_mut(TABLE_CHUNK))
            .zip(sl.chunks_mut(TABLE_CHUNK))
        {
            let m = x.len().min(y.len()).min(slope.len());
            let mut bin = [0u32; TABLE_CHUNK];
            BinTable::search(knots, &x[..m], &mut bin[..m]);
            for i in 0..m {
                let (v, b) = (x[i], t.get(bin[i]));
                let (value, q) = b.eval(b.xi(v));
                let inside = v > -bound && v < bound;
                y[i] = if inside { value } else { v };
                slope[i] = if inside { b.slope(q) } else { T::one() };
            }
        }
    }
    call_on_widest_simd!(body [T: Real] [T] (
        t: &BinTable<T> = table,
        k: &[T] = inner_knots,
        b: T = bound,
        x: &[T] = x,
        y: &mut [T] = y,
        s: &mut [T] = slope,
    ) -> ())
}

/// The inputs of one row's VJP: `x`, `g_y`, `g_l`.
type VjpInputs<'a, T> = (&'a [T], &'a [T], &'a [T]);

/// [`Row::vjp_row`] for rows of at most [`TABLE_BINS`] bins: each input's [`BinC::vjp`] in a
/// branch-free vectorized loop (compiled as [`forward_by_table`] is), then its terms added to
/// its bin's sums in input order (the per-element path's sums, to the bit).
fn vjp_by_table<T: Real, const GY: bool, const GL: bool>(
    table: &BinTable<T>,
    inner_knots: &[T],
    bound: T,
    inputs: VjpInputs<T>,
    g_x: &mut [T],
    acc: &mut [[T; ACC]],
) -> bool {
    #[inline(always)]
    fn body<T: Real, const GY: bool, const GL: bool>(
        t: &BinTable<T>,
        knots: &[T],
        bound: T,
        (x, g_y, g_l): VjpInputs<T>,
        g_x: &mut [T],
        acc: &mut [[T; ACC]],
    ) -> bool {
        let mut any = false;
        let chunks = x
            .chunks(TABLE_CHUNK)
            .zip(g_y.chunks(TABLE_CHUNK))
            .zip(g_l.chunks(TABLE_CHUNK))
            .zip(g_x.chunks_mut(TABLE_CHUNK));
        for (((x, g_y), g_l), g_x) in chunks {
            let m = x.len().min(g_y.len()).min(g_l.len()).min(g_x.len());
            let mut bin = [0u32; TABLE_CHUNK];
            BinTable::search(knots, &x[..m], &mut bin[..m]);
            // Per term, the chunk's values (inside inputs only; 0 elsewhere).
            let mut terms = [[T::zero(); TABLE_CHUNK]; ACC - 1];
            for i in 0..m {
                let (v, b) = (x[i], t.get(bin[i]));
                let (g, ts) = b.vjp::<GY, GL>(v, g_y[i], g_l[i]);
                let inside = v > -bound && v < bound;
                g_x[i] = if inside { g } else { g_y[i] };
                for (column, term) in terms.iter_mut().zip(ts) {
                    column[i] = if inside { term } else { T::zero() };
                }
            }
            for i in 0..m {
                if x[i] > -bound && x[i] < bound {
                    any = true;
                    let sums = &mut acc[bin[i] as usize];
                    for (a, column) in sums.iter_mut().zip(&terms) {
                        *a += column[i];
                    }
                }
            }
        }
        any
    }
    call_on_widest_simd!(body [T: Real, const GY: bool, const GL: bool] [T, GY, GL] (
        t: &BinTable<T> = table,
        k: &[T] = inner_knots,
        b: T = bound,
        i: VjpInputs<T> = inputs,
        g: &mut [T] = g_x,
        a: &mut [[T; ACC]] = acc,
    ) -> bool)
}

/// Per-bin sums of the VJP's element cotangents, accumulated over a row's inputs (see
/// [`BinC::vjp`]); the parameter backward then runs once per row on them ([`Row::finish`]).
/// Seven are used, the eighth is padding.
const ACC: usize = 8;

/// The constants of one bin, computed once per row: `s = dy/dx`, `β = δ₀ + δ₁ − 2s`.
#[derive(Clone, Copy, Debug, Default)]
struct BinC<T> {
    x0: T,
    dx: T,
    inv_dx: T,
    y0: T,
    dy: T,
    s: T,
    inv_s: T,
    d0: T,
    d1: T,
    beta: T,
}

impl<T: Real> BinC<T> {
    fn new(x0: T, x1: T, y0: T, y1: T, d0: T, d1: T) -> BinC<T> {
        let (dx, dy) = (x1 - x0, y1 - y0);
        let s = dy / dx;
        BinC {
            x0,
            dx,
            inv_dx: T::one() / dx,
            y0,
            dy,
            s,
            inv_s: T::one() / s,
            d0,
            d1,
            beta: d0 + d1 - c::<T>(2.0) * s,
        }
    }

    /// The position `ξ ∈ [0, 1]` of an inside `x` in the bin.
    #[inline(always)]
    fn xi(&self, x: T) -> T {
        ((x - self.x0) * self.inv_dx).max(T::zero()).min(T::one())
    }

    /// `(y, P/den²)` at position `ξ`, with `ω = ξ(1 − ξ)`, `N = sξ² + δ₀ω`, `den = s + βω`,
    /// `P = δ₁ξ² + 2sω + δ₀(1 − ξ)²`: `y = y0 + dy·N/den`, and `ln dy/dx = 2 ln s + ln(P/den²)`
    /// ([`BinC::logdet`]).
    #[inline(always)]
    fn eval(&self, xi: T) -> (T, T) {
        let (one, two) = (T::one(), c::<T>(2.0));
        let xi1 = one - xi;
        let omega = xi * xi1;
        let n = self.s * xi * xi + self.d0 * omega;
        let r = one / (self.s + self.beta * omega);
        let p = self.d1 * xi * xi + two * self.s * omega + self.d0 * xi1 * xi1;
        // den ≥ s/2 > 0 and P/den is moderate, so P·r·r neither overflows nor underflows.
        (self.y0 + self.dy * n * r, p * r * r)
    }

    /// `dy/dx = s²·P/den²` from [`BinC::eval`]'s `P/den²` (moderate: no overflow in f32).
    #[inline(always)]
    fn slope(&self, p_den2: T) -> T {
        self.s * self.s * p_den2
    }

    /// `ln dy/dx` from [`BinC::eval`]'s `P/den²`.
    #[inline(always)]
    fn logdet(&self, p_den2: T) -> T {
        self.slope(p_den2).ln()
    }

    /// `(y, ln dy/dx)` at an inside `x`.
    #[inline(always)]
    fn forward(&self, x: T) -> (T, T) {
        let (y, q) = self.eval(self.xi(x));
        (y, self.logdet(q))
    }

    /// The VJP of `(y, ln dy/dx)` at an inside `x` with cotangents `(g_y, g_l)`: returns `g_x`
    /// and the terms whose sums over the bin's inputs [`Row::finish`] turns into the knots'
    /// cotangents: `[g_ξ, g_ξ·ξ, g_s, g_y·N/den, g_y, g_δ₀, g_δ₁, 0]`.
    ///
    /// `GY = false` / `GL = false` leave out the `g_y` / `g_l` terms: exact (up to the sign of
    /// zeros) when that cotangent is zero, since every factor it multiplies is finite inside.
    #[inline(always)]
    fn vjp<const GY: bool, const GL: bool>(&self, x: T, g_y: T, g_l: T) -> (T, [T; ACC]) {
        let mut acc = [T::zero(); ACC];
        let (one, two) = (T::one(), c::<T>(2.0));
        let (s, d0, d1, beta) = (self.s, self.d0, self.d1, self.beta);
        let xi = self.xi(x);
        let xi1 = one - xi;
        let omega = xi * xi1;
        let w1 = one - two * xi; // dω/dξ
        let w2 = one - two * omega; // d den/ds
        let n = s * xi * xi + d0 * omega;
        let r = one / (s + beta * omega);
        let q = n * r;
        // y = y0 + dy·N/den,  l = 2 ln s + ln P − 2 ln den: the cotangents of N, den and P.
        let a_n = if GY { g_y * self.dy * r } else { T::zero() };
        let a_den = match (GY, GL) {
            (true, true) => -(a_n * q) - two * g_l * r,
            (true, false) => -(a_n * q),
            (false, true) => -(two * g_l * r),
            (false, false) => T::zero(),
        };
        let mut g_xi = a_den * beta * w1;
        let mut g_s = a_den * w2;
        let mut g_d0 = a_den * omega;
        let mut g_d1 = a_den * omega;
        if GY {
            g_xi += a_n * (two * s * xi + d0 * w1);
            g_s += a_n * xi * xi;
            g_d0 += a_n * omega;
            acc[3] = g_y * q;
            acc[4] = g_y;
        }
        if GL {
            let p = d1 * xi * xi + two * s * omega + d0 * xi1 * xi1;
            let a_p = g_l / p;
            g_xi += a_p * two * (d1 * xi + s * w1 - d0 * xi1);
            g_s += a_p * two * omega + two * g_l * self.inv_s;
            g_d0 += a_p * xi1 * xi1;
            g_d1 += a_p * xi * xi;
        }
        acc[0] = g_xi;
        acc[1] = g_xi * xi;
        acc[2] = g_s;
        acc[5] = g_d0;
        acc[6] = g_d1;
        (g_xi * self.inv_dx, acc)
    }
}

/// One element's spline with what the VJP needs. Reusable: [`Row::fill`] overwrites it without
/// allocating once its buffers have grown, so the batch functions keep one per rayon job.
#[derive(Default)]
struct Row<T> {
    bound: T,
    /// knots and knot derivatives, `K + 1` each
    xs: Vec<T>,
    ys: Vec<T>,
    ds: Vec<T>,
    bins: Vec<BinC<T>>,
    /// softmax of the unnormalized widths / heights (f64, for the parameter backward)
    sw: Vec<f64>,
    sh: Vec<f64>,
    /// sigmoid of the unnormalized derivatives (d softplus / dv)
    sig: Vec<f64>,
    /// per-bin VJP sums ([`BinC::vjp`])
    acc: Vec<[T; ACC]>,
    /// scratch: f64 inputs and knots, then the knots' cotangents
    f64s: Vec<f64>,
}

impl<T: Real> Row<T> {
    fn new(spline: &Spline<T>, p: SplineParams<T>) -> Row<T> {
        let mut r = Row::default();
        r.fill(spline, p);
        r
    }

    /// Overwrites the row with element `p`'s spline. The knots are computed in `f64` and
    /// rounded once to `T`: in `f32`, the cumulative sums scaled to `[−B, B]` would otherwise
    /// carry an error of several ulps of `B` into every knot, which the bin-relative position
    /// `ξ` and the log-det amplify by `1 / bin size`. (For `T = f64` this is exactly the nflows
    /// computation.)
    fn fill(&mut self, spline: &Spline<T>, p: SplineParams<T>) {
        let k = spline.bins;
        let bound = spline.tail_bound.as_f64();
        self.bound = spline.tail_bound;
        // scratch layout: [u (K) | xs (K + 1) | ys (K + 1) | ds (K + 1)]
        let f = &mut self.f64s;
        f.clear();
        f.resize(4 * k + 3, 0.0);
        let (u, rest) = f.split_at_mut(k);
        let (xs, rest) = rest.split_at_mut(k + 1);
        let (ys, ds) = rest.split_at_mut(k + 1);
        self.sw.resize(k, 0.0);
        self.sh.resize(k, 0.0);
        for (o, v) in u.iter_mut().zip(p.widths) {
            *o = v.as_f64();
        }
        softmax(u, &mut self.sw);
        for (o, v) in u.iter_mut().zip(p.heights) {
            *o = v.as_f64();
        }
        softmax(u, &mut self.sh);
        knots_from_softmax(&self.sw, MIN_BIN_WIDTH, bound, xs);
        knots_from_softmax(&self.sh, MIN_BIN_HEIGHT, bound, ys);
        ds.fill(1.0);
        self.sig.clear();
        for (j, v) in p.derivatives.iter().enumerate() {
            let v = v.as_f64();
            let (sp, sig) = softplus_sigmoid(v);
            ds[j + 1] = sp + MIN_DERIVATIVE;
            self.sig.push(sig);
        }
        let to_t = |out: &mut Vec<T>, v: &[f64]| {
            out.clear();
            out.extend(v.iter().map(|&x| T::of_f64(x)));
        };
        to_t(&mut self.xs, xs);
        to_t(&mut self.ys, ys);
        to_t(&mut self.ds, ds);
        let (xs, ys, ds) = (&self.xs, &self.ys, &self.ds);
        self.bins.clear();
        self.bins.extend(
            (0..k).map(|j| BinC::new(xs[j], xs[j + 1], ys[j], ys[j + 1], ds[j], ds[j + 1])),
        );
    }

    #[inline(always)]
    fn inside(&self, v: T) -> bool {
        v > -self.bound && v < self.bound
    }

    fn k(&self) -> usize {
        self.bins.len()
    }

    /// The bin of `v` among `knots` (the last knot `≤ v`, at most `K − 1`).
    #[inline(always)]
    fn search(knots: &[T], v: T) -> usize {
        let k = knots.len() - 1;
        let inner = &knots[1..k];
        if k <= LINEAR_SEARCH_MAX_BINS {
            inner.iter().map(|&t| (t <= v) as usize).sum()
        } else {
            inner.partition_point(|&t| t <= v)
        }
    }

    #[inline(always)]
    fn forward(&self, x: T) -> (T, T) {
        if self.inside(x) {
            self.bins[Self::search(&self.xs, x)].forward(x)
        } else {
            (x, T::zero())
        }
    }

    /// `forward` of a row's inputs `x` into `y`, `logdet`: each element's slope first, then
    /// one vectorized `ln` over the row (a scalar `ln` per element was a third of an f32
    /// spline's time). Up to [`TABLE_BINS`] bins the slopes come from [`forward_by_table`]'s
    /// vectorized loop, the same operations per element.
    fn forward_row(&self, x: &[T], y: &mut [T], logdet: &mut [T]) {
        if self.k() <= TABLE_BINS {
            let table = BinTable::new(&self.bins);
            forward_by_table(&table, &self.xs[1..self.k()], self.bound, x, y, logdet);
            host_unary_in_place(Unary::Log, logdet);
            return;
        }
        for ((&x, y), l) in x.iter().zip(y.iter_mut()).zip(logdet.iter_mut()) {
            (*y, *l) = if self.inside(x) {
                let b = &self.bins[Self::search(&self.xs, x)];
                let (v, q) = b.eval(b.xi(x));
                (v, b.slope(q))
            } else {
                (x, T::one())
            };
        }
        host_unary_in_place(Unary::Log, logdet);
    }

    /// `(x, ln dx/dy)`; `y` must be inside.
    #[inline(always)]
    fn inverse_inside(&self, y: T) -> (T, T) {
        let b = &self.bins[Self::search(&self.ys, y)];
        let two = c::<T>(2.0);
        let s = b.s;
        let eta = y - b.y0;
        let a = b.dy * (s - b.d0) + eta * b.beta;
        let bq = b.dy * b.d0 - eta * b.beta;
        let cc = -s * eta;
        let disc = (bq * bq - c::<T>(4.0) * a * cc).max(T::zero());
        let denom = -bq - disc.sqrt();
        let xi = if denom < T::zero() {
            (two * cc / denom).max(T::zero()).min(T::one())
        } else {
            T::zero()
        };
        (b.x0 + xi * b.dx, -b.logdet(b.eval(xi).1))
    }

    #[inline(always)]
    fn inverse(&self, y: T) -> (T, T) {
        if self.inside(y) {
            self.inverse_inside(y)
        } else {
            (y, T::zero())
        }
    }

    /// The VJP of a row's inputs `x` (cotangents `g_y`, and `g_l` of the same length): writes
    /// `g_x` and accumulates the per-bin sums; returns whether any input was inside (if none,
    /// the parameter gradients are exactly zero). See [`BinC::vjp`] for `GY`, `GL`.
    fn vjp_row<const GY: bool, const GL: bool>(
        &mut self,
        x: &[T],
        g_y: &[T],
        g_l: &[T],
        g_x: &mut [T],
    ) -> bool {
        let mut acc = std::mem::take(&mut self.acc);
        acc.clear();
        acc.resize(self.k(), [T::zero(); ACC]);
        if self.k() <= TABLE_BINS {
            let table = BinTable::new(&self.bins);
            let inner = &self.xs[1..self.k()];
            let any =
                vjp_by_table::<T, GY, GL>(&table, inner, self.bound, (x, g_y, g_l), g_x, &mut acc);
            self.acc = acc;
            return any;
        }
        let mut any = false;
        for (((gx, &v), &gy), &gl) in g_x.iter_mut().zip(x).zip(g_y).zip(g_l) {
            *gx = if self.inside(v) {
                any = true;
                let j = Self::search(&self.xs, v);
                let (g, terms) = self.bins[j].vjp::<GY, GL>(v, gy, gl);
                for (a, t) in acc[j].iter_mut().zip(&terms) {
                    *a += *t;
                }
                g
            } else {
                gy
            };
        }
        self.acc = acc;
        any
    }

    /// The parameter gradients from the per-bin sums of [`Row::vjp_row`], **overwriting**
    /// `gw`, `gh`, `gd` (lengths `K`, `K`, `K − 1`). In `f64`: first the cotangents of the
    /// knots `x_j`, `y_j` and knot derivatives `δ_j`, then their backward to the unnormalized
    /// parameters (which is linear, so once per row is the sum of once per input).
    fn finish(&mut self, gw: &mut [T], gh: &mut [T], gd: &mut [T]) {
        let k = self.k();
        let f = &mut self.f64s;
        f.clear();
        f.resize(3 * (k + 1), 0.0);
        let (gx, rest) = f.split_at_mut(k + 1);
        let (gy, gdk) = rest.split_at_mut(k + 1);
        for (j, (b, a)) in self.bins.iter().zip(&self.acc).enumerate() {
            let a = a.map(|v| v.as_f64());
            let (s, inv_dx) = (b.s.as_f64(), b.inv_dx.as_f64());
            // s = dy/dx, ξ = (x − x0)/dx, dx = x1 − x0, dy = y1 − y0.
            let g_dx = -(s * a[2] + a[1]) * inv_dx;
            gx[j] += -(a[0] * inv_dx) - g_dx;
            gx[j + 1] += g_dx;
            let g_dy = a[3] + a[2] * inv_dx;
            gy[j] += a[4] - g_dy;
            gy[j + 1] += g_dy;
            gdk[j] += a[5];
            gdk[j + 1] += a[6];
        }
        let bound = self.bound.as_f64();
        cum_softmax_backward(&self.sw, MIN_BIN_WIDTH, bound, gx, gw);
        cum_softmax_backward(&self.sh, MIN_BIN_HEIGHT, bound, gy, gh);
        // δ_j = softplus(v_{j−1}) + min for the inner knots 1 ≤ j ≤ K − 1.
        for (o, (g, sig)) in gd.iter_mut().zip(gdk[1..k].iter().zip(&self.sig)) {
            *o = T::of_f64(g * sig);
        }
    }
}

/// Backward of knots `x_j = 2B·Σ_{i<j}(min + (1 − min·K)·softmax(u)_i) − B` for the cotangents
/// `g_knots` of the `K + 1` knots (those of the pinned ends `x_0`, `x_K` are ignored);
/// **overwrites** `out` with the gradient of `u`.
fn cum_softmax_backward<T: Real>(sm: &[f64], min: f64, bound: f64, g_knots: &[f64], out: &mut [T]) {
    let kk = sm.len();
    let f = 2.0 * bound * (1.0 - min * kk as f64);
    // gradient of the bin size i: f·Σ over the inner knots j > i, a suffix sum.
    let mut suffix = 0.0;
    let mut dot = 0.0;
    for i in (0..kk).rev() {
        dot += sm[i] * (f * suffix);
        if i >= 1 {
            suffix += g_knots[i];
        }
    }
    let mut suffix = 0.0;
    for i in (0..kk).rev() {
        out[i] = T::of_f64(sm[i] * (f * suffix - dot));
        if i >= 1 {
            suffix += g_knots[i];
        }
    }
}

impl<T: Real> Spline<T> {
    /// A spline with `bins` bins and tail bound `tail_bound`.
    /// Panics (internal misuse) unless `bins ≥ 1`, `bins·1e-3 < 1` and `tail_bound > 0` is finite.
    #[track_caller]
    pub fn new(bins: usize, tail_bound: T) -> Spline<T> {
        assert!(
            bins >= 1 && (bins as f64) * MIN_BIN_WIDTH.max(MIN_BIN_HEIGHT) < 1.0,
            "spline: {bins} bins is not in 1..{}",
            (1.0 / MIN_BIN_WIDTH) as usize
        );
        assert!(
            tail_bound > T::zero() && tail_bound.is_finite(),
            "spline: tail bound {tail_bound} is not a positive finite number"
        );
        Spline { bins, tail_bound }
    }

    #[track_caller]
    fn check_element(&self, p: &SplineParams<T>) {
        assert!(self.bins >= 1, "spline: a spline needs at least one bin");
        let k = self.bins;
        assert!(
            p.widths.len() == k && p.heights.len() == k && p.derivatives.len() + 1 == k,
            "spline: one element with {k} bins needs {k} widths, {k} heights and {} derivatives, \
             got {}, {}, {}",
            k - 1,
            p.widths.len(),
            p.heights.len(),
            p.derivatives.len()
        );
    }

    /// Number of elements `D` of `[D, K]` / `[D, K−1]` parameter arrays (checks their lengths).
    #[track_caller]
    fn check_rows(&self, p: &SplineParams<T>) -> usize {
        assert!(self.bins >= 1, "spline: a spline needs at least one bin");
        let k = self.bins;
        let d = p.widths.len() / k;
        assert!(
            p.widths.len() == d * k
                && p.heights.len() == d * k
                && p.derivatives.len() == d * (k - 1),
            "spline: parameters of D elements with {k} bins are [D, {k}], [D, {k}], [D, {}]; got \
             lengths {}, {}, {}",
            k - 1,
            p.widths.len(),
            p.heights.len(),
            p.derivatives.len()
        );
        d
    }

    /// The knots and knot derivatives of one element.
    #[track_caller]
    pub fn knots(&self, p: SplineParams<T>) -> Knots<T> {
        self.check_element(&p);
        let r = Row::new(self, p);
        Knots {
            xs: r.xs,
            ys: r.ys,
            derivatives: r.ds,
        }
    }

    /// One element: `(y, ln|dy/dx|)`. Identity (log-det 0) unless `−B < x < B`.
    #[track_caller]
    pub fn forward(&self, x: T, p: SplineParams<T>) -> (T, T) {
        self.check_element(&p);
        Row::new(self, p).forward(x)
    }

    /// One element: the inverse, `(x, ln|dx/dy|)`, from the analytic root of the bin's
    /// quadratic (`ln|dx/dy| = −ln|dy/dx|` at that `x`). Identity unless `−B < y < B`.
    #[track_caller]
    pub fn inverse(&self, y: T, p: SplineParams<T>) -> (T, T) {
        self.check_element(&p);
        Row::new(self, p).inverse(y)
    }

    /// One element: the vector-Jacobian product of `(y, ln|dy/dx|)` at `x` with cotangents
    /// `(g_y, g_l)`. Returns `g_x` and **overwrites** `grads` (lengths `K`, `K`, `K−1`) with the
    /// gradients of `g_y·y + g_l·ln|dy/dx|` with respect to the unnormalized parameters.
    /// Outside `(−B, B)`: `g_x = g_y` and zero parameter gradients.
    #[track_caller]
    pub fn vjp(&self, x: T, p: SplineParams<T>, g_y: T, g_l: T, grads: SplineGrads<T>) -> T {
        self.check_element(&p);
        let mut g = grads;
        assert!(
            g.widths.len() == self.bins
                && g.heights.len() == self.bins
                && g.derivatives.len() + 1 == self.bins,
            "spline::vjp: gradient buffers must have lengths {0}, {0}, {1}; got {2}, {3}, {4}",
            self.bins,
            self.bins - 1,
            g.widths.len(),
            g.heights.len(),
            g.derivatives.len()
        );
        let mut row = Row::new(self, p);
        let mut g_x = [T::zero()];
        if row.vjp_row::<true, true>(&[x], &[g_y], &[g_l], &mut g_x) {
            row.finish(g.widths, g.heights, g.derivatives);
        } else {
            zero_grads(&mut g);
        }
        g_x[0]
    }

    /// `[D, N]` batch forward: `y[d·N + n], logdet[d·N + n] = forward(x[d·N + n], row d)`
    /// (per-element log-dets; sum a column for an example's log-det).
    #[track_caller]
    pub fn forward_batch(
        &self,
        x: &[T],
        n: usize,
        p: SplineParams<T>,
        y: &mut [T],
        logdet: &mut [T],
    ) {
        self.batch_map(x, n, p, y, logdet, "forward_batch", Row::forward_row);
    }

    /// `[D, N]` batch inverse: `x[d·N + n], logdet[d·N + n] = inverse(y[d·N + n], row d)`
    /// (`logdet` is `ln|dx/dy|` per element).
    #[track_caller]
    pub fn inverse_batch(
        &self,
        y: &[T],
        n: usize,
        p: SplineParams<T>,
        x: &mut [T],
        logdet: &mut [T],
    ) {
        self.batch_map(y, n, p, x, logdet, "inverse_batch", |r, y, x, l| {
            for ((&y, x), l) in y.iter().zip(x).zip(l) {
                (*x, *l) = r.inverse(y);
            }
        });
    }

    #[track_caller]
    #[allow(clippy::too_many_arguments)]
    fn batch_map<F: Fn(&Row<T>, &[T], &mut [T], &mut [T]) + Sync>(
        &self,
        input: &[T],
        n: usize,
        p: SplineParams<T>,
        out: &mut [T],
        logdet: &mut [T],
        what: &str,
        f: F,
    ) {
        let d = self.check_rows(&p);
        assert!(
            input.len() == d * n && out.len() == d * n && logdet.len() == d * n,
            "spline::{what}: D = {d} elements × N = {n} examples needs buffers of length {}; got \
             input {}, output {}, logdet {}",
            d * n,
            input.len(),
            out.len(),
            logdet.len()
        );
        if n == 0 {
            return;
        }
        out.par_chunks_mut(n)
            .zip(logdet.par_chunks_mut(n))
            .zip(input.par_chunks(n))
            .enumerate()
            .with_min_len(ROWS_PER_JOB)
            .for_each_init(Row::default, |r, (row, ((o, l), i))| {
                r.fill(self, p.row(row, self.bins));
                f(r, i, o, l);
            });
    }

    /// `[D, N]` batch VJP: `g_x[d·N + n]` for each input, and the parameter gradients summed over
    /// the `N` examples, **overwriting** `grads` (`[D, K]`, `[D, K]`, `[D, K−1]`). `g_y` is
    /// `[D, N]`; `g_l` is `[D, N]` (per-element log-dets) or `[N]` (one cotangent per example,
    /// broadcast over `d`: the cotangent of a per-example summed log-det).
    #[track_caller]
    #[allow(clippy::too_many_arguments)] // inputs, cotangents and outputs, each named
    pub fn vjp_batch(
        &self,
        x: &[T],
        n: usize,
        p: SplineParams<T>,
        g_y: &[T],
        g_l: &[T],
        g_x: &mut [T],
        grads: SplineGrads<T>,
    ) {
        let d = self.check_rows(&p);
        let k = self.bins;
        assert!(
            x.len() == d * n
                && g_y.len() == d * n
                && g_x.len() == d * n
                && (g_l.len() == d * n || g_l.len() == n),
            "spline::vjp_batch: D = {d} elements × N = {n} examples needs x, g_y, g_x of length \
             {} and g_l of length {} or {n}; got {}, {}, {}, {}",
            d * n,
            d * n,
            x.len(),
            g_y.len(),
            g_x.len(),
            g_l.len()
        );
        assert!(
            grads.widths.len() == d * k
                && grads.heights.len() == d * k
                && grads.derivatives.len() == d * (k - 1),
            "spline::vjp_batch: gradient buffers must be [{d}, {k}], [{d}, {k}], [{d}, {}]; got \
             lengths {}, {}, {}",
            k - 1,
            grads.widths.len(),
            grads.heights.len(),
            grads.derivatives.len()
        );
        let per_example = g_l.len() == n && d != 1;
        let SplineGrads {
            widths: gw,
            heights: gh,
            derivatives: gd,
        } = grads;
        gw.iter_mut()
            .chain(gh.iter_mut())
            .chain(gd.iter_mut())
            .for_each(|v| *v = T::zero());
        if n == 0 || d == 0 {
            return;
        }
        // With K = 1 there are no derivative parameters: hand each row an empty slice.
        let gd_rows: Vec<&mut [T]> = if k == 1 {
            (0..d).map(|_| <&mut [T]>::default()).collect()
        } else {
            gd.chunks_mut(k - 1).collect()
        };
        // Leave out the terms of a cotangent that is all zero (see `BinC::vjp`): the executor
        // asks for the value part (g_l = 0) and the log-det part (g_y = 0) separately.
        let zero = |v: &[T]| v.iter().all(|&g| g == T::zero());
        let g_l_zero = per_example && zero(g_l);
        g_x.par_chunks_mut(n)
            .zip(gw.par_chunks_mut(k))
            .zip(gh.par_chunks_mut(k))
            .zip(gd_rows.into_par_iter())
            .enumerate()
            .with_min_len(ROWS_PER_JOB)
            .for_each_init(Row::default, |r, (row, (((gx, gw), gh), gd))| {
                r.fill(self, p.row(row, k));
                let rows = row * n..(row + 1) * n;
                let (x, g_y) = (&x[rows.clone()], &g_y[rows.clone()]);
                let g_l = if per_example { g_l } else { &g_l[rows] };
                let gl_zero = if per_example { g_l_zero } else { zero(g_l) };
                let any = match (zero(g_y), gl_zero) {
                    (false, false) => r.vjp_row::<true, true>(x, g_y, g_l, gx),
                    (false, true) => r.vjp_row::<true, false>(x, g_y, g_l, gx),
                    (true, false) => r.vjp_row::<false, true>(x, g_y, g_l, gx),
                    (true, true) => r.vjp_row::<false, false>(x, g_y, g_l, gx),
                };
                // (the gradients are already zero where no input was inside)
                if any {
                    r.finish(gw, gh, gd);
                }
            });
    }
}

fn zero_grads<T: Real>(g: &mut SplineGrads<T>) {
    g.widths
        .iter_mut()
        .chain(g.heights.iter_mut())
        .chain(g.derivatives.iter_mut())
        .for_each(|v| *v = T::zero());
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::host::test_rng::Rng;

    /// Owned unnormalized parameters of one element (or of `D` elements, row-major).
    #[derive(Clone, Debug)]
    struct Owned {
        w: Vec<f64>,
        h: Vec<f64>,
        d: Vec<f64>,
    }

    impl Owned {
        fn random(rng: &mut Rng, rows: usize, k: usize, scale: f64) -> Owned {
            let mut v = |n: usize| (0..n).map(|_| rng.range(-scale, scale)).collect::<Vec<_>>();
            Owned {
                w: v(rows * k),
                h: v(rows * k),
                d: v(rows * (k - 1)),
            }
        }
        fn zeros(k: usize) -> Owned {
            Owned {
                w: vec![0.0; k],
                h: vec![0.0; k],
                d: vec![0.0; k - 1],
            }
        }
        fn p(&self) -> SplineParams<'_, f64> {
            SplineParams {
                widths: &self.w,
                heights: &self.h,
                derivatives: &self.d,
            }
        }
        fn f32(&self) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
            let cv = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
            (cv(&self.w), cv(&self.h), cv(&self.d))
        }
    }

    /// (bins, tail bound) configurations exercised by the randomized tests.
    const CONFIGS: [(usize, f64); 6] =
        [(5, 10.0), (1, 3.0), (2, 1.0), (5, 3.0), (8, 10.0), (3, 0.5)];

    /// Interior test points: a grid, random points, and points `±off` around each inner knot.
    fn interior_points(rng: &mut Rng, s: &Spline<f64>, kn: &Knots<f64>, off: f64) -> Vec<f64> {
        let b = s.tail_bound;
        let mut xs: Vec<f64> = (1..40).map(|i| -b + 2.0 * b * i as f64 / 40.0).collect();
        xs.extend((0..20).map(|_| rng.range(-b, b)));
        for &k in &kn.xs[1..s.bins] {
            xs.push(k - off);
            xs.push(k + off);
        }
        xs.push(-b + off);
        xs.push(b - off);
        xs
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * (1.0 + a.abs().max(b.abs()))
    }

    #[test]
    fn matches_nflows_reference_values() {
        // From a plain-Python float64 transliteration of nflows 0.14's
        // `unconstrained_rational_quadratic_spline(tails="linear", tail_bound=10)`, with its
        // padding constant for the boundary derivatives and its `searchsorted`.
        let p = Owned {
            w: vec![0.3, -1.2, 0.8, 0.05, -0.4],
            h: vec![-0.7, 0.9, 0.1, 1.5, -0.2],
            d: vec![0.5, -1.0, 2.0, -0.3],
        };
        let s = Spline::new(5, 10.0);
        let fwd = [
            (-9.5, -9.719161180501178, -1.1419365670039836),
            (-3.3, -3.5170157550059353, -1.9923898504726612),
            (0.0, -3.1833403723636913, -2.1030925361949664),
            (0.7, -3.086448617767261, -1.8459555386418667),
            (4.2, -0.4576728319875444, 0.9521977178807444),
            (9.99, 9.990016217079333, -0.0032457254256040846),
        ];
        for (x, y, l) in fwd {
            let (yy, ll) = s.forward(x, p.p());
            assert!(
                close(yy, y, 1e-12) && close(ll, l, 1e-9),
                "forward({x}) = {yy}, {ll}; want {y}, {l}"
            );
        }
        let inv = [
            (-9.5, -8.101121464793314, 2.4076436207478142),
            (-3.3, -1.1028504990570567, 2.364211114092697),
            (0.0, 4.369708579386365, -1.0297060787186874),
            (0.7, 4.608102149490032, -1.1202166801354925),
            (4.2, 5.649140469943975, -1.2153825111080785),
            (9.99, 9.989983730156055, 0.0032510003000844057),
        ];
        for (y, x, l) in inv {
            let (xx, ll) = s.inverse(y, p.p());
            assert!(
                close(xx, x, 1e-12) && close(ll, l, 1e-9),
                "inverse({y}) = {xx}, {ll}; want {x}, {l}"
            );
        }
    }

    #[test]
    fn round_trip() {
        let mut rng = Rng(1);
        for &(k, b) in &CONFIGS {
            let s = Spline::new(k, b);
            for _ in 0..20 {
                let p = Owned::random(&mut rng, 1, k, 3.0);
                let kn = s.knots(p.p());
                let mut xs = interior_points(&mut rng, &s, &kn, 1e-9);
                xs.extend((0..=80).map(|i| -2.0 * b + 4.0 * b * i as f64 / 80.0));
                xs.extend(kn.xs.iter().copied());
                xs.extend([-b, b, 1e6, -1e6, 2.0 * b, -2.0 * b]);
                for &x in &xs {
                    let (y, l) = s.forward(x, p.p());
                    let (xx, li) = s.inverse(y, p.p());
                    assert!((xx - x).abs() <= 1e-10, "K={k} B={b}: x={x} → y={y} → {xx}");
                    assert!(
                        (l + li).abs() <= 1e-9,
                        "K={k} B={b}: x={x}: logdets {l} vs {li}"
                    );
                    assert!(y.is_finite() && l.is_finite());
                }
                // and y → x → y, on the y knots too
                let mut ys: Vec<f64> = (0..=80)
                    .map(|i| -2.0 * b + 4.0 * b * i as f64 / 80.0)
                    .collect();
                ys.extend(kn.ys.iter().copied());
                for &y in &ys {
                    let (x, _) = s.inverse(y, p.p());
                    let (yy, _) = s.forward(x, p.p());
                    assert!((yy - y).abs() <= 1e-10, "K={k} B={b}: y={y} → x={x} → {yy}");
                }
            }
        }
    }

    #[test]
    fn logdet_matches_finite_difference() {
        let mut rng = Rng(2);
        for &(k, b) in &CONFIGS {
            let s = Spline::new(k, b);
            // bins are at least 2B·1e-3 wide: keep the step well below that
            let h = 1e-7 * b;
            for _ in 0..10 {
                let p = Owned::random(&mut rng, 1, k, 3.0);
                let kn = s.knots(p.p());
                for x in interior_points(&mut rng, &s, &kn, 1e-4) {
                    if kn.xs.iter().any(|&t| (t - x).abs() < 2.0 * h) {
                        continue;
                    }
                    let (_, l) = s.forward(x, p.p());
                    let fd = (s.forward(x + h, p.p()).0 - s.forward(x - h, p.p()).0) / (2.0 * h);
                    assert!(
                        close(l.exp(), fd, 1e-6),
                        "K={k} B={b} x={x}: dy/dx {} vs fd {fd}",
                        l.exp()
                    );
                }
            }
        }
    }

    /// `L = g_y·y + g_l·ln|dy/dx|` at one element.
    fn loss(s: &Spline<f64>, x: f64, p: &Owned, gy: f64, gl: f64) -> f64 {
        let (y, l) = s.forward(x, p.p());
        gy * y + gl * l
    }

    fn vjp_of(s: &Spline<f64>, x: f64, p: &Owned, gy: f64, gl: f64) -> (f64, Owned) {
        let mut g = Owned::zeros(s.bins);
        let gx = s.vjp(
            x,
            p.p(),
            gy,
            gl,
            SplineGrads {
                widths: &mut g.w,
                heights: &mut g.h,
                derivatives: &mut g.d,
            },
        );
        (gx, g)
    }

    fn check_vjp_fd(s: &Spline<f64>, x: f64, p: &Owned, gy: f64, gl: f64, h: f64, tol: f64) {
        let (gx, g) = vjp_of(s, x, p, gy, gl);
        let fd_x = (loss(s, x + h, p, gy, gl) - loss(s, x - h, p, gy, gl)) / (2.0 * h);
        let ctx = format!("K={} B={} x={x} gy={gy} gl={gl}", s.bins, s.tail_bound);
        assert!(close(gx, fd_x, tol), "{ctx}: g_x {gx} vs fd {fd_x}");
        for which in 0..3 {
            let n = [p.w.len(), p.h.len(), p.d.len()][which];
            for i in 0..n {
                let mut pp = p.clone();
                let mut pm = p.clone();
                let (vp, vm, got) = match which {
                    0 => (&mut pp.w[i], &mut pm.w[i], g.w[i]),
                    1 => (&mut pp.h[i], &mut pm.h[i], g.h[i]),
                    _ => (&mut pp.d[i], &mut pm.d[i], g.d[i]),
                };
                *vp += h;
                *vm -= h;
                let fd = (loss(s, x, &pp, gy, gl) - loss(s, x, &pm, gy, gl)) / (2.0 * h);
                let name = ["widths", "heights", "derivatives"][which];
                assert!(
                    close(got, fd, tol),
                    "{ctx}: d/d{name}[{i}] {got} vs fd {fd}"
                );
            }
        }
    }

    #[test]
    fn vjp_matches_finite_differences_inside() {
        let mut rng = Rng(3);
        for &(k, b) in &CONFIGS {
            let s = Spline::new(k, b);
            for _ in 0..6 {
                let p = Owned::random(&mut rng, 1, k, 2.0);
                let kn = s.knots(p.p());
                // near-knot points sit 1e-4 from the knot; FD steps move x and the knots by
                // well under that.
                for x in interior_points(&mut rng, &s, &kn, 1e-4) {
                    let (gy, gl) = (rng.range(-2.0, 2.0), rng.range(-2.0, 2.0));
                    check_vjp_fd(&s, x, &p, gy, gl, 1e-6, 2e-5);
                }
            }
        }
    }

    #[test]
    fn vjp_outside_is_identity() {
        let mut rng = Rng(4);
        for &(k, b) in &CONFIGS {
            let s = Spline::new(k, b);
            let p = Owned::random(&mut rng, 1, k, 3.0);
            for x in [
                b,
                -b,
                b + 0.5,
                -b - 0.5,
                1e6,
                -1e6,
                2.0 * b,
                f64::INFINITY,
                f64::NEG_INFINITY,
            ] {
                let (y, l) = s.forward(x, p.p());
                assert_eq!((y, l), (x, 0.0), "K={k} B={b}: forward({x})");
                let (xx, li) = s.inverse(x, p.p());
                assert_eq!((xx, li), (x, 0.0), "K={k} B={b}: inverse({x})");
                let (gy, gl) = (rng.range(-2.0, 2.0), rng.range(-2.0, 2.0));
                let (gx, g) = vjp_of(&s, x, &p, gy, gl);
                assert_eq!(gx, gy, "K={k} B={b}: g_x at {x}");
                assert!(
                    g.w.iter().chain(&g.h).chain(&g.d).all(|&v| v == 0.0),
                    "K={k} B={b}: nonzero parameter gradient at {x}: {g:?}"
                );
                if x.is_finite() && x.abs() > b {
                    check_vjp_fd(&s, x, &p, gy, gl, 1e-6 * x.abs().max(1.0), 1e-6);
                }
            }
            // NaN propagates through the identity branch and leaves the parameters alone.
            let (y, l) = s.forward(f64::NAN, p.p());
            assert!(y.is_nan() && l == 0.0);
            let (_, g) = vjp_of(&s, f64::NAN, &p, 1.0, 1.0);
            assert!(g.w.iter().chain(&g.h).chain(&g.d).all(|&v| v == 0.0));
        }
    }

    #[test]
    fn monotone_and_continuous() {
        let mut rng = Rng(5);
        for &(k, b) in &CONFIGS {
            let s = Spline::new(k, b);
            for _ in 0..10 {
                let p = Owned::random(&mut rng, 1, k, 3.0);
                let kn = s.knots(p.p());
                // strictly increasing on [−2B, 2B], finite positive slope
                let n = 8000;
                let mut prev = f64::NEG_INFINITY;
                for i in 0..=n {
                    let x = -2.0 * b + 4.0 * b * i as f64 / n as f64;
                    let (y, l) = s.forward(x, p.p());
                    assert!(
                        y > prev,
                        "K={k} B={b}: not increasing at x={x}: {prev} then {y}"
                    );
                    assert!(l.is_finite(), "K={k} B={b}: ln dy/dx = {l} at {x}");
                    prev = y;
                }
                // knots: the spline passes through them with slope δ_j, from both sides
                let eps = 1e-11;
                for j in 0..=k {
                    let (xj, yj, dj) = (kn.xs[j], kn.ys[j], kn.derivatives[j]);
                    let (y, l) = s.forward(xj, p.p());
                    assert!(
                        (y - yj).abs() <= 1e-12 * b,
                        "K={k} B={b}: y(x_{j}) = {y} ≠ {yj}"
                    );
                    assert!(
                        (l - dj.ln()).abs() <= 1e-9,
                        "K={k} B={b}: ln y'(x_{j}) {l} vs {}",
                        dj.ln()
                    );
                    for side in [-1.0, 1.0] {
                        let (ys, ls) = s.forward(xj + side * eps, p.p());
                        assert!(
                            (ys - (yj + side * eps * dj)).abs() <= 1e-12 * b,
                            "K={k} B={b}: jump at x_{j} side {side}: {ys} vs {yj}"
                        );
                        assert!(
                            (ls - dj.ln()).abs() <= 1e-5,
                            "K={k} B={b}: slope jump at x_{j}: {ls} vs {}",
                            dj.ln()
                        );
                    }
                }
                assert_eq!((kn.xs[0], kn.xs[k], kn.ys[0], kn.ys[k]), (-b, b, -b, b));
                assert_eq!((kn.derivatives[0], kn.derivatives[k]), (1.0, 1.0));
            }
        }
    }

    #[test]
    fn zero_params_are_pinned_at_the_bounds() {
        for &(k, b) in &CONFIGS {
            let s = Spline::new(k, b);
            let p = Owned::zeros(k);
            let kn = s.knots(p.p());
            // equal bins, equal heights: the knots are the identity's
            for j in 0..=k {
                let want = -b + 2.0 * b * j as f64 / k as f64;
                assert!(
                    (kn.xs[j] - want).abs() <= 1e-12 * b && (kn.ys[j] - want).abs() <= 1e-12 * b
                );
            }
            let d_inner = 2f64.ln() + 1e-3;
            for &d in &kn.derivatives[1..k] {
                assert!((d - d_inner).abs() < 1e-15);
            }
            assert_eq!(s.forward(-b, p.p()), (-b, 0.0));
            assert_eq!(s.forward(b, p.p()), (b, 0.0));
            for eps in [1e-6, 1e-9, 1e-12] {
                let (lo, llo) = s.forward(-b + eps, p.p());
                let (hi, lhi) = s.forward(b - eps, p.p());
                assert!((lo - (-b + eps)).abs() <= 1e-5 * eps + 1e-14 * b, "{lo}");
                assert!((hi - (b - eps)).abs() <= 1e-5 * eps + 1e-14 * b, "{hi}");
                assert!(llo.abs() < 1e-4 && lhi.abs() < 1e-4);
            }
            // close to the identity everywhere on [−B, B]: within a fraction of a bin
            for i in 0..=200 {
                let x = -b + 2.0 * b * i as f64 / 200.0;
                let (y, _) = s.forward(x, p.p());
                assert!(
                    (y - x).abs() <= 0.1 * 2.0 * b / k as f64,
                    "K={k} B={b}: y({x}) = {y}"
                );
            }
        }
    }

    #[test]
    fn f32_agrees_with_f64() {
        let mut rng = Rng(6);
        for &(k, b) in &CONFIGS {
            let s64 = Spline::new(k, b);
            let s32 = Spline::new(k, b as f32);
            for _ in 0..10 {
                let p = Owned::random(&mut rng, 1, k, 2.0);
                let (w, h, d) = p.f32();
                let p32 = SplineParams {
                    widths: &w,
                    heights: &h,
                    derivatives: &d,
                };
                // the f32 parameters, back in f64: compare like with like
                let p64 = Owned {
                    w: w.iter().map(|&v| v as f64).collect(),
                    h: h.iter().map(|&v| v as f64).collect(),
                    d: d.iter().map(|&v| v as f64).collect(),
                };
                let kn = s64.knots(p64.p());
                for x in interior_points(&mut rng, &s64, &kn, 1e-2) {
                    let x32 = x as f32;
                    let x = x32 as f64;
                    let (y, l) = s64.forward(x, p64.p());
                    let (y32, l32) = s32.forward(x32, p32);
                    // f32 knots are the f64 knots rounded once (off by ≤ ½ ulp(B) ≲ ε₃₂·B), which
                    // moves y by up to the slope times that
                    let knot_err = 2.0 * f32::EPSILON as f64 * b * (1.0 + l.exp());
                    // ... and the bin sizes (knot differences) by ε₃₂·B / size, relatively
                    let j = kn.xs[1..k].partition_point(|&t| t <= x);
                    let (dx, dy) = (kn.xs[j + 1] - kn.xs[j], kn.ys[j + 1] - kn.ys[j]);
                    let size_err = 2.0 * f32::EPSILON as f64 * b * (1.0 / dx + 1.0 / dy);
                    assert!(
                        (y32 as f64 - y).abs() <= 1e-4 * (1.0 + y.abs()).min(2.0) + knot_err
                            && (l32 as f64 - l).abs() <= 1e-4 + size_err,
                        "K={k} B={b} x={x}: {y32} {l32} vs {y} {l}"
                    );
                    // The inverse is ill-conditioned where the spline is flat (dx/dy up to
                    // ~1e3): check it backward-stably, through the f64 forward.
                    let (xi32, li32) = s32.inverse(y as f32, p32);
                    let (yb, lb) = s64.forward(xi32 as f64, p64.p());
                    assert!(
                        (yb - y).abs() <= 1e-4 * (1.0 + y.abs()).min(2.0) + knot_err
                            && (li32 as f64 + lb).abs() <= 1e-4 + size_err,
                        "K={k} B={b} y={y}: x = {xi32}, ln dx/dy = {li32}; forward: {yb} {lb}"
                    );
                    let (gy, gl) = (rng.range(-2.0, 2.0), rng.range(-2.0, 2.0));
                    let (gx, g) = vjp_of(&s64, x, &p64, gy, gl);
                    let (mut gw, mut gh, mut gd) =
                        (vec![0f32; k], vec![0f32; k], vec![0f32; k - 1]);
                    let gx32 = s32.vjp(
                        x32,
                        p32,
                        gy as f32,
                        gl as f32,
                        SplineGrads {
                            widths: &mut gw,
                            heights: &mut gh,
                            derivatives: &mut gd,
                        },
                    );
                    // gradients can be large (1/bin width²): compare relative to their scale, with the
                    // allowance for the f32 knots (their second derivatives amplify it more)
                    let scale =
                        g.w.iter()
                            .chain(&g.h)
                            .chain(&g.d)
                            .chain([&gx])
                            .fold(1f64, |m, v| m.max(v.abs()));
                    let ok =
                        |a: f32, b: f64| (a as f64 - b).abs() <= (1e-4 + 10.0 * size_err) * scale;
                    assert!(ok(gx32, gx), "K={k} B={b} x={x}: g_x {gx32} vs {gx}");
                    for (a, b) in gw
                        .iter()
                        .zip(&g.w)
                        .chain(gh.iter().zip(&g.h))
                        .chain(gd.iter().zip(&g.d))
                    {
                        assert!(
                            ok(*a, *b),
                            "K={k} x={x}: param grad {a} vs {b} (scale {scale})"
                        );
                    }
                }
            }
        }
    }

    /// Exactly, value by value, for rows shorter than one vectorized chunk and rows of several
    /// chunks with a partial last one, up to the table's bin limit and past it.
    #[test]
    fn batch_matches_per_element() {
        let mut rng = Rng(7);
        let configs = CONFIGS
            .iter()
            .copied()
            .chain([(TABLE_BINS, 3.0), (TABLE_BINS + 1, 3.0)]);
        for ((k, b), n) in configs.flat_map(|c| [(c, 7), (c, 2 * TABLE_CHUNK + 5)]) {
            let s = Spline::new(k, b);
            let dd = 4;
            let p = Owned::random(&mut rng, dd, k, 2.0);
            let mut x: Vec<f64> = (0..dd * n).map(|_| rng.range(-1.5 * b, 1.5 * b)).collect();
            x[0] = b;
            x[1] = -1e6;
            let gy: Vec<f64> = (0..dd * n).map(|_| rng.range(-1.0, 1.0)).collect();
            let gl_full: Vec<f64> = (0..dd * n).map(|_| rng.range(-1.0, 1.0)).collect();
            let gl_col: Vec<f64> = (0..n).map(|_| rng.range(-1.0, 1.0)).collect();

            let (mut y, mut l) = (vec![0.0; dd * n], vec![0.0; dd * n]);
            s.forward_batch(&x, n, p.p(), &mut y, &mut l);
            let (mut xi, mut li) = (vec![0.0; dd * n], vec![0.0; dd * n]);
            s.inverse_batch(&y, n, p.p(), &mut xi, &mut li);
            for d in 0..dd {
                let row = p.p().row(d, k);
                for j in 0..n {
                    let i = d * n + j;
                    assert_eq!((y[i], l[i]), s.forward(x[i], row));
                    assert_eq!((xi[i], li[i]), s.inverse(y[i], row));
                    assert!((xi[i] - x[i]).abs() <= 1e-10);
                }
            }

            for gl in [&gl_full, &gl_col] {
                let mut gx = vec![0.0; dd * n];
                let mut g = Owned {
                    w: vec![f64::NAN; dd * k],
                    h: vec![f64::NAN; dd * k],
                    d: vec![f64::NAN; dd * (k - 1)],
                };
                let grads = SplineGrads {
                    widths: &mut g.w,
                    heights: &mut g.h,
                    derivatives: &mut g.d,
                };
                s.vjp_batch(&x, n, p.p(), &gy, gl, &mut gx, grads);
                for d in 0..dd {
                    let row = Owned {
                        w: p.w[d * k..(d + 1) * k].to_vec(),
                        h: p.h[d * k..(d + 1) * k].to_vec(),
                        d: p.d[d * (k - 1)..(d + 1) * (k - 1)].to_vec(),
                    };
                    let mut sum = Owned::zeros(k);
                    for j in 0..n {
                        let i = d * n + j;
                        let g_l = if gl.len() == n { gl[j] } else { gl[i] };
                        let (gxi, gi) = vjp_of(&s, x[i], &row, gy[i], g_l);
                        assert_eq!(gx[i], gxi);
                        for (a, v) in sum.w.iter_mut().zip(&gi.w) {
                            *a += v;
                        }
                        for (a, v) in sum.h.iter_mut().zip(&gi.h) {
                            *a += v;
                        }
                        for (a, v) in sum.d.iter_mut().zip(&gi.d) {
                            *a += v;
                        }
                    }
                    let got = g.w[d * k..(d + 1) * k]
                        .iter()
                        .chain(&g.h[d * k..(d + 1) * k])
                        .chain(&g.d[d * (k - 1)..(d + 1) * (k - 1)]);
                    for (a, b) in got.zip(sum.w.iter().chain(&sum.h).chain(&sum.d)) {
                        assert!(
                            (a - b).abs() <= 1e-12 * (1.0 + b.abs()),
                            "row {d}: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    /// `vjp_batch` against the per-element `vjp` (which always takes the general path) when
    /// `g_y` or `g_l` is all zero (the executor's two calls), with inputs out of bound and
    /// rows all out of bound, and more bins than the linear bin search takes.
    fn check_zero_cotangent_paths<T: Real>(seed: u64, tol: f64) {
        let mut rng = Rng(seed);
        let configs = CONFIGS.iter().copied().chain([(20, 4.0), (40, 2.0)]);
        for (k, b) in configs {
            let s = Spline::new(k, T::of_f64(b));
            let (dd, n) = (5, 11);
            let p = Owned::random(&mut rng, dd, k, 2.0);
            let (w, h, d) = (conv::<T>(&p.w), conv::<T>(&p.h), conv::<T>(&p.d));
            let p = SplineParams {
                widths: &w,
                heights: &h,
                derivatives: &d,
            };
            let mut x: Vec<T> = (0..dd * n)
                .map(|_| T::of_f64(rng.range(-1.3 * b, 1.3 * b)))
                .collect();
            let outside = [b, -b, 1e6, -1e30, f64::INFINITY, f64::NAN];
            for (i, &v) in outside.iter().enumerate() {
                x[3 * i] = T::of_f64(v);
            }
            // row 2 entirely out of bound
            for (j, v) in x[2 * n..3 * n].iter_mut().enumerate() {
                *v = T::of_f64(if j % 2 == 0 { 2.0 * b } else { -b });
            }
            let rand = |rng: &mut Rng, len: usize| -> Vec<T> {
                (0..len).map(|_| T::of_f64(rng.uniform())).collect()
            };
            let gy = rand(&mut rng, dd * n);
            let (gl_full, gl_col) = (rand(&mut rng, dd * n), rand(&mut rng, n));
            let (zero_full, zero_col) = (vec![T::zero(); dd * n], vec![T::zero(); n]);
            let cases: [(&[T], &[T]); 5] = [
                (&gy, &zero_col),
                (&gy, &zero_full),
                (&zero_full, &gl_full),
                (&zero_full, &gl_col),
                (&zero_full, &zero_col),
            ];
            for (case, (gy, gl)) in cases.into_iter().enumerate() {
                let ctx = format!("{} K={k} B={b} case {case}", T::NAME);
                let mut gx = vec![T::zero(); dd * n];
                let (mut gw, mut gh, mut gd) = (
                    vec![T::nan(); dd * k],
                    vec![T::nan(); dd * k],
                    vec![T::nan(); dd * (k - 1)],
                );
                let grads = SplineGrads {
                    widths: &mut gw,
                    heights: &mut gh,
                    derivatives: &mut gd,
                };
                s.vjp_batch(&x, n, p, gy, gl, &mut gx, grads);
                for r in 0..dd {
                    let row = p.row(r, k);
                    let mut sum = vec![0f64; 3 * k - 1];
                    for j in 0..n {
                        let i = r * n + j;
                        let g_l = if gl.len() == n { gl[j] } else { gl[i] };
                        let mut g = vec![T::zero(); 3 * k - 1];
                        let (g_w, rest) = g.split_at_mut(k);
                        let (g_h, g_d) = rest.split_at_mut(k);
                        let grads = SplineGrads {
                            widths: g_w,
                            heights: g_h,
                            derivatives: g_d,
                        };
                        let want = s.vjp(x[i], row, gy[i], g_l, grads);
                        assert_eq!(gx[i], want, "{ctx}: g_x at x = {}", x[i]);
                        for (a, v) in sum.iter_mut().zip(&g) {
                            *a += v.as_f64();
                        }
                    }
                    let got = gw[r * k..(r + 1) * k]
                        .iter()
                        .chain(&gh[r * k..(r + 1) * k])
                        .chain(&gd[r * (k - 1)..(r + 1) * (k - 1)]);
                    let scale = sum.iter().fold(1f64, |m, v| m.max(v.abs()));
                    for (a, want) in got.zip(&sum) {
                        let a = a.as_f64();
                        if r == 2 || case == 4 {
                            assert_eq!(a, 0.0, "{ctx}: row {r}: gradient {a} not zero");
                        }
                        assert!(
                            (a - want).abs() <= tol * scale,
                            "{ctx}: row {r}: {a} vs {want} (scale {scale})"
                        );
                    }
                }
            }
        }
    }

    fn conv<T: Real>(v: &[f64]) -> Vec<T> {
        v.iter().map(|&x| T::of_f64(x)).collect()
    }

    #[test]
    fn batch_with_a_zero_cotangent_matches_per_element() {
        check_zero_cotangent_paths::<f64>(8, 1e-12);
        check_zero_cotangent_paths::<f32>(9, 1e-4);
    }

    #[test]
    #[should_panic(expected = "needs 5 widths")]
    fn wrong_lengths_panic_with_a_message() {
        let s = Spline::new(5, 10.0);
        let p = Owned::zeros(4);
        let _ = s.forward(0.0, p.p());
    }
}
