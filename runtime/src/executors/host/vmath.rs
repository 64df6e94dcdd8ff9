//! Vectorized f32 transcendentals for the host executor: whole slices at the widest SIMD width
//! the CPU has (AVX-512, AVX2 or NEON, chosen at run time by `rten-simd`). `exp`, `sigmoid` and
//! `tanh` are `rten-vecmath`'s (≤ 1, 4 and 3 ULP); the natural log and softplus, which it does
//! not have, are written here on the same `rten-simd` operations.
//!
//! f64 keeps the standard library's scalar functions: the f64 executor is the reference that
//! tests compare everything else with.

#![allow(clippy::excessive_precision)]

use rten_simd::ops::{BitOps, FloatOps, IntOps, NumOps, ToFloat};
use rten_simd::{Isa, Simd, SimdUnaryOp};
use rten_vecmath::Exp;
use snfc_compiler::ir::Unary;
use std::mem::MaybeUninit;

/// `ln 2` split so that `e · LN2_HI` is exact for the exponents of f32.
const LN2_HI: f32 = 0.693_359_375;
const LN2_LO: f32 = -2.121_944_4e-4;

/// Coefficients of `P` in `ln(1 + f) ≈ f − f²/2 + f³·P(f)` for `f ∈ [√½ − 1, √2 − 1]`
/// (the Cephes `logf` minimax fit), highest degree first.
const LOG_POLY: [f32; 9] = [
    7.037_683_6e-2,
    -1.151_461_0e-1,
    1.167_699_9e-1,
    -1.242_014_1e-1,
    1.424_932_3e-1,
    -1.666_805_8e-1,
    2.000_071_4e-1,
    -2.499_999_4e-1,
    3.333_333_1e-1,
];

/// The natural logarithm: `ln x`, `−∞` at 0, NaN below 0 and for NaN, `+∞` at `+∞`.
/// Subnormal inputs are read as zero (as the executor's flush-to-zero mode does).
#[derive(Default)]
pub struct Log {}

impl SimdUnaryOp<f32> for Log {
    #[inline(always)]
    fn eval<I: Isa>(&self, isa: I, x: I::F32) -> I::F32 {
        let ops = isa.f32();
        let int_ops = isa.i32();
        // x = m · 2^e with m ∈ [1, 2): the exponent and mantissa bits.
        let bits: I::I32 = x.reinterpret_cast();
        let biased = int_ops.and(int_ops.shift_right::<23>(bits), int_ops.splat(0xff));
        let exponent = int_ops.sub(biased, int_ops.splat(127));
        let mantissa_bits = int_ops.or(
            int_ops.and(bits, int_ops.splat(0x007f_ffff)),
            int_ops.splat(0x3f80_0000),
        );
        let m: I::F32 = mantissa_bits.reinterpret_cast();
        let e = int_ops.to_float(exponent);
        // m ∈ [√2, 2) moves to [√½, 1) with e + 1, so that f = m − 1 stays small.
        let high = ops.ge(m, ops.splat(std::f32::consts::SQRT_2));
        let m = ops.select(ops.mul(m, ops.splat(0.5)), m, high);
        let e = ops.select(ops.add(e, ops.one()), e, high);
        let f = ops.sub(m, ops.one());
        let z = ops.mul(f, f);
        let mut p = ops.splat(LOG_POLY[0]);
        for c in &LOG_POLY[1..] {
            p = ops.mul_add(p, f, ops.splat(*c));
        }
        // ln x = f − f²/2 + f³·P(f) + e·ln 2, the small terms first.
        let mut y = ops.mul(ops.mul(p, f), z);
        y = ops.mul_add(e, ops.splat(LN2_LO), y);
        y = ops.mul_add(z, ops.splat(-0.5), y);
        let mut r = ops.add(f, y);
        r = ops.mul_add(e, ops.splat(LN2_HI), r);
        // Zero and subnormals (biased exponent 0) give −∞, +∞ stays, negatives and NaN are NaN.
        let tiny = ops.lt(x, ops.splat(f32::MIN_POSITIVE));
        r = ops.select(ops.splat(f32::NEG_INFINITY), r, tiny);
        let inf = ops.eq(x, ops.splat(f32::INFINITY));
        r = ops.select(x, r, inf);
        let invalid = ops.lt(x, ops.zero());
        r = ops.select(ops.splat(f32::NAN), r, invalid);
        // NaN compares false everywhere: the checks above left it to the polynomial of its
        // bits; pass it through.
        let nan = ops.eq(x, x);
        ops.select(r, x, nan)
    }
}

/// `softplus(x) = ln(1 + eˣ)`, computed as `max(x, 0) + ln(1 + e^−|x|)` (no overflow), with
/// `ln(1 + u)` accurate for small `u`.
#[derive(Default)]
pub struct Softplus {}

impl SimdUnaryOp<f32> for Softplus {
    #[inline(always)]
    fn eval<I: Isa>(&self, isa: I, x: I::F32) -> I::F32 {
        let ops = isa.f32();
        let u = Exp::apply(isa, ops.neg(ops.abs(x)));
        // ln(1 + u) = ln(w) · u / (w − 1) with w = 1 + u rounded: exact to rounding even when
        // 1 + u loses most of u's digits; u itself when w rounds to 1.
        let w = ops.add(ops.one(), u);
        let wm1 = ops.sub(w, ops.one());
        let lnw = Log::apply(isa, w);
        let exact = ops.eq(wm1, ops.zero());
        let log1p = ops.select(u, ops.mul(lnw, ops.div(u, wm1)), exact);
        ops.add(ops.max(x, ops.zero()), log1p)
    }
}

/// `dst[i] = u(src[i])` through the vectorized implementation, when `u` has one: exp, log,
/// softplus, sigmoid and tanh (the rest are a plain loop that compiles to SIMD by itself).
/// Returns whether it did.
pub fn unary_f32(u: Unary, src: &[f32], dst: &mut [f32]) -> bool {
    debug_assert_eq!(src.len(), dst.len());
    // SAFETY: `f32` and `MaybeUninit<f32>` have the same layout, and every element of `dst`
    // is initialized already; the ops only write initialized values into it.
    let out = unsafe {
        std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<MaybeUninit<f32>>(), dst.len())
    };
    match u {
        Unary::Exp => {
            Exp {}.map(src, out);
        }
        Unary::Log => {
            Log {}.map(src, out);
        }
        Unary::Softplus => {
            Softplus {}.map(src, out);
        }
        Unary::Sigmoid => {
            rten_vecmath::Sigmoid {}.map(src, out);
        }
        Unary::Tanh => {
            rten_vecmath::Tanh {}.map(src, out);
        }
        // Square, recip, relu and step: the plain loop is as fast.
        _ => return false,
    }
    true
}

/// [`unary_f32`] in place.
pub fn unary_f32_in_place(u: Unary, data: &mut [f32]) -> bool {
    match u {
        Unary::Exp => Exp {}.map_mut(data),
        Unary::Log => Log {}.map_mut(data),
        Unary::Softplus => Softplus {}.map_mut(data),
        Unary::Sigmoid => rten_vecmath::Sigmoid {}.map_mut(data),
        Unary::Tanh => rten_vecmath::Tanh {}.map_mut(data),
        // Square, recip, relu and step: the plain loop is as fast.
        _ => return false,
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Inputs across the range each function is used on, with its edges.
    fn sweep(lo: f32, hi: f32) -> Vec<f32> {
        let n = 200_003;
        let mut v: Vec<f32> = (0..n)
            .map(|i| lo + (hi - lo) * (i as f32 / (n - 1) as f32))
            .collect();
        v.extend([
            0.0,
            -0.0,
            1.0,
            -1.0,
            f32::MIN_POSITIVE,
            1e-30,
            1e-10,
            88.0,
            -88.0,
        ]);
        v.retain(|x| *x >= lo && *x <= hi);
        v
    }

    /// The largest error of `u` on `xs` against the f64 reference, in units of the f32 result's
    /// last place (relative to the reference's magnitude, at least f32::MIN_POSITIVE).
    fn worst_ulps(u: Unary, xs: &[f32], reference: impl Fn(f64) -> f64) -> f64 {
        let mut out = vec![0f32; xs.len()];
        assert!(unary_f32(u, xs, &mut out));
        let mut in_place = xs.to_vec();
        assert!(unary_f32_in_place(u, &mut in_place));
        xs.iter()
            .zip(&out)
            .zip(&in_place)
            .map(|((x, y), z)| {
                assert_eq!(y.to_bits(), z.to_bits(), "{u:?}({x}): in place differs");
                let want = reference(*x as f64);
                let ulp = (want.abs().max(f32::MIN_POSITIVE as f64) as f32).to_bits();
                let ulp = f32::from_bits(ulp + 1) as f64 - f32::from_bits(ulp) as f64;
                ((*y as f64 - want) / ulp).abs()
            })
            .fold(0.0, f64::max)
    }

    #[test]
    fn log_within_2_ulp() {
        let xs: Vec<f32> = sweep(1e-6, 4.0)
            .into_iter()
            .chain(sweep(1.0, 1e30))
            .chain([f32::MIN_POSITIVE, f32::MAX, 1e-37])
            .collect();
        let worst = worst_ulps(Unary::Log, &xs, f64::ln);
        assert!(worst <= 2.0, "log: {worst} ULP");
    }

    #[test]
    fn log_special_values() {
        let xs = [0.0, -0.0, -1.0, f32::INFINITY, f32::NAN, f32::NEG_INFINITY];
        let mut out = [0f32; 6];
        unary_f32(Unary::Log, &xs, &mut out);
        assert_eq!(out[0], f32::NEG_INFINITY);
        assert_eq!(out[1], f32::NEG_INFINITY);
        assert!(out[2].is_nan());
        assert_eq!(out[3], f32::INFINITY);
        assert!(out[4].is_nan());
        assert!(out[5].is_nan());
    }

    #[test]
    fn softplus_within_4_ulp_and_finite_at_the_edges() {
        let xs = sweep(-80.0, 80.0);
        let reference = |x: f64| x.max(0.0) + (-x.abs()).exp().ln_1p();
        let worst = worst_ulps(Unary::Softplus, &xs, reference);
        assert!(worst <= 4.0, "softplus: {worst} ULP");
        let mut out = [0f32; 2];
        unary_f32(Unary::Softplus, &[1e30, -1e30], &mut out);
        assert_eq!(out, [1e30, 0.0]);
    }

    #[test]
    fn exp_sigmoid_tanh_within_their_bounds() {
        let xs = sweep(-80.0, 80.0);
        assert!(worst_ulps(Unary::Exp, &xs, f64::exp) <= 2.0);
        let sigmoid = |x: f64| 1.0 / (1.0 + (-x).exp());
        assert!(worst_ulps(Unary::Sigmoid, &sweep(-15.0, 80.0), sigmoid) <= 5.0);
        assert!(worst_ulps(Unary::Tanh, &sweep(-10.0, 10.0), f64::tanh) <= 4.0);
    }

    #[test]
    fn the_rest_is_left_to_the_caller() {
        let mut out = [0f32; 1];
        for u in [Unary::Square, Unary::Recip, Unary::Relu, Unary::Step] {
            assert!(!unary_f32(u, &[1.0], &mut out));
        }
    }
}
