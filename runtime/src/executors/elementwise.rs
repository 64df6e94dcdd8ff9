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

/// `$body` with `$f` bound to `|x| host_unary(u, x)` for the `u` that `$u` holds, fixed in each
/// match arm: every function gets its own loop, inlined and vectorized (`step` as a blend),
/// instead of one loop that dispatches per element (an unpredictable `x > 0` branch made `step`
/// 5× slower than `relu` on a 40 MB tensor).
macro_rules! with_unary {
    ($u:expr, |$f:ident| $body:expr) => {{
        use snfc_compiler::ir::Unary as U;
        use $crate::executors::elementwise::host_unary;
        match $u {
            U::Exp => {
                let $f = |x| host_unary(U::Exp, x);
                $body
            }
            U::Log => {
                let $f = |x| host_unary(U::Log, x);
                $body
            }
            U::Softplus => {
                let $f = |x| host_unary(U::Softplus, x);
                $body
            }
            U::Sigmoid => {
                let $f = |x| host_unary(U::Sigmoid, x);
                $body
            }
            U::Square => {
                let $f = |x| host_unary(U::Square, x);
                $body
            }
            U::Recip => {
                let $f = |x| host_unary(U::Recip, x);
                $body
            }
            U::Relu => {
                let $f = |x| host_unary(U::Relu, x);
                $body
            }
            U::Step => {
                let $f = |x| host_unary(U::Step, x);
                $body
            }
            U::Tanh => {
                let $f = |x| host_unary(U::Tanh, x);
                $body
            }
        }
    }};
}
pub(crate) use with_unary;

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
