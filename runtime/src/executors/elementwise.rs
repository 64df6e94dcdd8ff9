//! What each elementwise function computes, written once for every executor: [`host_unary`]
//! for the host executor and its fused-group interpreter (f32 and f64), [`gpu_unary`] for the
//! CubeCL fused kernel, side by side. The compiler holds the rest of an op's definition
//! (`Unary` in `compiler/src/ir/op.rs`: name, text form, derivative; shape rule and FLOPs are
//! those of every elementwise op). Adding a function: a `Unary` variant with its name and
//! derivative there, one arm in each function here; the backend suite's `elementwise` check
//! and the finite-difference gradient tests cover it.

use super::host::linalg::Real;
use cubecl::prelude::*;
use snfc_compiler::ir::Unary;

/// `u(x)` on the host, numerically stable.
#[inline]
pub fn host_unary<T: Real>(u: Unary, x: T) -> T {
    let one = T::one();
    match u {
        Unary::Exp => x.exp(),
        Unary::Log => x.ln(),
        // max(x, 0) + ln(1 + e^−|x|): no overflow for large |x|.
        Unary::Softplus => {
            if x > T::zero() {
                x + (-x).exp().ln_1p()
            } else {
                x.exp().ln_1p()
            }
        }
        Unary::Sigmoid => {
            if x >= T::zero() {
                one / (one + (-x).exp())
            } else {
                let e = x.exp();
                e / (one + e)
            }
        }
        Unary::Square => x * x,
        Unary::Recip => one / x,
        Unary::Relu => x.max(T::zero()),
        Unary::Step => {
            if x > T::zero() {
                one
            } else {
                T::zero()
            }
        }
        Unary::Tanh => x.tanh(),
    }
}

/// `u(x)` in a CubeCL kernel (`u` is known when the kernel is compiled).
#[cube]
pub fn gpu_unary<F: Float>(x: F, #[comptime] u: Unary) -> F {
    match comptime![u] {
        Unary::Exp => F::exp(x),
        Unary::Log => F::ln(x),
        Unary::Softplus => F::max(x, F::new(0.0)) + F::log1p(F::exp(F::new(0.0) - F::abs(x))),
        Unary::Sigmoid => F::new(1.0) / (F::new(1.0) + F::exp(F::new(0.0) - x)),
        Unary::Square => x * x,
        Unary::Recip => F::new(1.0) / x,
        Unary::Relu => F::max(x, F::new(0.0)),
        Unary::Step => select(x > F::new(0.0), F::new(1.0), F::new(0.0)),
        Unary::Tanh => F::tanh(x),
    }
}
