//! The vocabulary every executor shares: the scalar types a plan runs in ([`Real`]: f32 or f64),
//! the named tensors fed to and read from a plan ([`Tensor`], [`Feeds`]) and the errors of a run
//! ([`ExecError`], [`LinalgError`]). The host and the GPU executors both speak it; neither imports
//! the other's internals for it.

use snfc_compiler::ir::Shape;
use std::collections::HashMap;
use std::sync::Arc;

/// Scalar type the host executor computes in (`f32` or `f64`).
///
/// The `faer::traits::RealField` supertrait lets the LU routines run directly on `T`; its
/// methods are all suffixed `_impl`, so it does not clash with `num_traits::Float` methods.
/// `matmul` panics for any other type than `f32` / `f64` (a `gemm` crate restriction), so do not
/// implement this trait for other types.
pub trait Real:
    num_traits::Float
    + num_traits::FromPrimitive
    + Copy
    + Send
    + Sync
    + Default
    + std::fmt::Debug
    + std::fmt::Display
    + std::iter::Sum
    + faer::traits::RealField
    + 'static
{
    /// `"f32"` or `"f64"`.
    const NAME: &'static str;
    /// Lossless (f32) / identity (f64) conversion to `f64`.
    /// (Not `to_f64`: that name is taken by `num_traits::ToPrimitive`.)
    fn as_f64(self) -> f64;
    /// Conversion from `f64` (rounding for f32).
    /// (Not `from_f64`: that name is taken by `num_traits::FromPrimitive`.)
    fn of_f64(v: f64) -> Self;
}

impl Real for f32 {
    const NAME: &'static str = "f32";
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self as f64
    }
    #[inline(always)]
    fn of_f64(v: f64) -> Self {
        v as f32
    }
}

impl Real for f64 {
    const NAME: &'static str = "f64";
    #[inline(always)]
    fn as_f64(self) -> f64 {
        self
    }
    #[inline(always)]
    fn of_f64(v: f64) -> Self {
        v
    }
}

/// Errors of the LU-based routines.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum LinalgError {
    #[error("matrix is singular (LU pivot {index} is zero)")]
    Singular { index: usize },
    #[error("matrix is not finite (LU pivot {index} is {value})")]
    NonFinite { index: usize, value: f64 },
}

/// A named tensor handed to or returned from the executor (row-major).
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor<T> {
    pub shape: Shape,
    pub data: Vec<T>,
}

impl<T: Real> Tensor<T> {
    pub fn scalar(&self) -> T {
        self.data[0]
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExecError {
    #[error("graph {graph}: no value fed for {kind} `{name}`")]
    Missing {
        graph: String,
        kind: &'static str,
        name: String,
    },
    #[error("graph {graph}: {kind} `{name}` has {got} elements, expected shape {shape:?}")]
    BadShape {
        graph: String,
        kind: &'static str,
        name: String,
        got: usize,
        shape: Shape,
    },
    #[error("graph {graph}: node %{node} ({op}): {source}")]
    Linalg {
        graph: String,
        node: usize,
        op: String,
        source: LinalgError,
    },
    #[error("graph {graph}: device error: {message}")]
    Device { graph: String, message: String },
    /// The step could not be compiled (a rewrite phase reached a limit).
    #[error(transparent)]
    Compile(#[from] snfc_compiler::rewrite::RewriteError),
}

/// Tensors fed to a run, by name (inputs and parameters share one namespace).
pub type Feeds<T> = HashMap<String, Arc<Vec<T>>>;
