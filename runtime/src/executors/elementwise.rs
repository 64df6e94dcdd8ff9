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
        #[cfg(feature = "example-op")]
        Unary::Cube => x * x * x,
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
            // A function without an arm of its own above runs too, dispatching per element.
            #[allow(unreachable_patterns)]
            other => {
                let $f = |x| host_unary(other, x);
                $body
            }
        }
    }};
}

/// `dst[k] = u(src[k])` on the host: in f32 the transcendentals (exp, log, softplus, sigmoid,
/// tanh) go through the vectorized [`vmath`](super::host::vmath) (a scalar libm call per
/// element was most of a fused group's time), everything else and all of f64 through
/// [`host_unary`] in a loop of its own per function.
pub fn host_unary_slice<T: Real>(u: Unary, src: &[T], dst: &mut [T]) {
    use std::any::TypeId;
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: T is f32 (same type, so same layout); the slices are only reinterpreted.
        let (s, d) = unsafe {
            (
                std::slice::from_raw_parts(src.as_ptr().cast::<f32>(), src.len()),
                std::slice::from_raw_parts_mut(dst.as_mut_ptr().cast::<f32>(), dst.len()),
            )
        };
        if super::host::vmath::unary_f32(u, s, d) {
            return;
        }
    }
    with_unary!(u, |f| dst.iter_mut().zip(src).for_each(|(d, x)| *d = f(*x)))
}

/// [`host_unary_slice`] in place.
pub fn host_unary_in_place<T: Real>(u: Unary, data: &mut [T]) {
    use std::any::TypeId;
    if TypeId::of::<T>() == TypeId::of::<f32>() {
        // SAFETY: as in `host_unary_slice`.
        let d =
            unsafe { std::slice::from_raw_parts_mut(data.as_mut_ptr().cast::<f32>(), data.len()) };
        if super::host::vmath::unary_f32_in_place(u, d) {
            return;
        }
    }
    with_unary!(u, |f| data.iter_mut().for_each(|x| *x = f(*x)))
}

/// Defines `gpu_unary`, `u(x)` in a CubeCL kernel, with the arms of every shipped function and
/// `$extra` (the `#[cube]` macro does not honour `#[cfg]` on a match arm, so the feature
/// `example-op` passes its arm in here).
macro_rules! gpu_unary_with {
    ($x:ident; $($extra:tt)*) => {
        /// `u(x)` in a CubeCL kernel (`u` is known when the kernel is compiled).
        #[cube]
        pub fn gpu_unary<F: Float>($x: F, #[comptime] u: Unary) -> F {
            match comptime![u] {
                Unary::Exp => F::exp($x),
                Unary::Log => F::ln($x),
                Unary::Softplus => {
                    F::max($x, F::new(0.0)) + F::log1p(F::exp(F::new(0.0) - F::abs($x)))
                }
                Unary::Sigmoid => F::new(1.0) / (F::new(1.0) + F::exp(F::new(0.0) - $x)),
                Unary::Square => $x * $x,
                Unary::Recip => F::new(1.0) / $x,
                Unary::Relu => F::max($x, F::new(0.0)),
                Unary::Step => select($x > F::new(0.0), F::new(1.0), F::new(0.0)),
                Unary::Tanh => F::tanh($x),
                $($extra)*
            }
        }
    };
}

#[cfg(not(feature = "example-op"))]
gpu_unary_with!(x;);
#[cfg(feature = "example-op")]
gpu_unary_with!(x; Unary::Cube => x * x * x,);
