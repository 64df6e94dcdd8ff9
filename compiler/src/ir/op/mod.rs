//! The primitive op set, its text form and its shape rules.

mod shape;
#[cfg(test)]
mod tests;
mod text;
mod vjp;

use serde::{Deserialize, Serialize};

/// Dimensions of a tensor, row-major (C order): `[]` scalar, `[n]` vector, `[rows, cols]`
/// matrix, and any rank beyond. Batches put the batch last: `[D, B]` for flat layers,
/// `[C, H, W, B]` for images, so `reshape` between the two is free.
pub type Shape = Vec<usize>;

/// The shipped functions, then `$extra`.
macro_rules! unary_list {
    ($($extra:expr),*) => {
        &[
            Unary::Exp,
            Unary::Log,
            Unary::Softplus,
            Unary::Sigmoid,
            Unary::Square,
            Unary::Recip,
            Unary::Relu,
            Unary::Step,
            Unary::Tanh,
            $($extra),*
        ]
    };
}

/// Elementwise functions of one argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Unary {
    Exp,
    Log,
    /// ln(1 + eˣ)
    Softplus,
    /// 1 / (1 + e⁻ˣ)
    Sigmoid,
    Square,
    Recip,
    /// max(x, 0)
    Relu,
    /// 1 for x > 0, else 0 (ReLU's derivative; its own derivative is 0).
    Step,
    Tanh,
    /// x³: the recipe for an elementwise function carried out (`runtime/tests/example_op.rs`).
    #[cfg(feature = "example-op")]
    Cube,
}

impl Unary {
    /// Every function, in the order of `Unary`'s variants.
    #[cfg(not(feature = "example-op"))]
    pub const ALL: &'static [Unary] = unary_list!();
    #[cfg(feature = "example-op")]
    pub const ALL: &'static [Unary] = unary_list!(Unary::Cube);

    pub fn name(self) -> &'static str {
        match self {
            Unary::Exp => "exp",
            Unary::Log => "log",
            Unary::Softplus => "softplus",
            Unary::Sigmoid => "sigmoid",
            Unary::Square => "square",
            Unary::Recip => "recip",
            Unary::Relu => "relu",
            Unary::Step => "step",
            Unary::Tanh => "tanh",
            #[cfg(feature = "example-op")]
            Unary::Cube => "cube",
        }
    }

    /// `dy/dx` as a graph, for `y = self(x)` (the node `y` may be reused): the one place an
    /// elementwise function's derivative is written (autodiff multiplies it by the cotangent).
    /// The function itself is evaluated by the runtime's `executors/elementwise.rs`, on the host
    /// and in the GPU kernels alike.
    pub fn derivative(
        self,
        b: &mut super::GraphBuilder,
        x: super::NodeIndex,
        y: super::NodeIndex,
    ) -> super::NodeIndex {
        match self {
            Unary::Exp => y,
            Unary::Log => b.unary(Unary::Recip, x),
            Unary::Softplus => b.unary(Unary::Sigmoid, x),
            Unary::Sigmoid => {
                let one = b.constant(1.0);
                let om = b.sub(one, y);
                b.mul(y, om)
            }
            Unary::Square => b.scale(x, 2.0),
            Unary::Recip => {
                let sq = b.unary(Unary::Square, y);
                b.neg(sq)
            }
            Unary::Relu => b.unary(Unary::Step, x),
            // Zero almost everywhere (a step has no useful gradient).
            Unary::Step => {
                let zero = b.constant(0.0);
                b.mul(x, zero)
            }
            Unary::Tanh => {
                let one = b.constant(1.0);
                let sq = b.unary(Unary::Square, y);
                b.sub(one, sq)
            }
            #[cfg(feature = "example-op")]
            Unary::Cube => {
                let sq = b.unary(Unary::Square, x);
                b.scale(sq, 3.0)
            }
        }
    }
}

/// Which output of a rational-quadratic spline an op computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SplinePart {
    /// `y = s(x)`.
    Value,
    /// `ln |s'(x)|`, elementwise.
    LogDet,
    /// `s⁻¹(x)`, elementwise: the sampling direction (never differentiated: no objective
    /// reads a sample's gradient).
    Inverse,
    /// Only for [`Op::SplineGrad`]: the VJP of the value and of the log-det together, with a
    /// cotangent for each (`g_y`, `g_l`) — one pass instead of two (the optimizer merges the sum
    /// of the two VJPs into it).
    Both,
}

impl SplinePart {
    pub fn name(self) -> &'static str {
        match self {
            SplinePart::Value => "value",
            SplinePart::LogDet => "logdet",
            SplinePart::Inverse => "inverse",
            SplinePart::Both => "both",
        }
    }

    fn parse(s: &str) -> Result<SplinePart, String> {
        match s {
            "value" => Ok(SplinePart::Value),
            "logdet" => Ok(SplinePart::LogDet),
            "inverse" => Ok(SplinePart::Inverse),
            "both" => Ok(SplinePart::Both),
            _ => Err(format!("spline part {s:?}: value, logdet, inverse or both")),
        }
    }
}

/// A tensor operation. Leaves (`Input`, `Param`, `Const`) carry their shape or value; every other
/// op's shape follows from its operands (see [`Op::infer_shape`]).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Op {
    /// Data fed per step (the batch `x`, the dequantization noise `noise`).
    Input {
        name: String,
        shape: Shape,
    },
    /// A trained parameter, named as in checkpoints (`layers.0.weight`).
    Param {
        name: String,
        shape: Shape,
    },
    /// A scalar constant, stored as f64 bits so that ops hash and compare exactly.
    Const {
        bits: u64,
    },
    MatMul,
    Transpose,
    /// Matrix inverse (O(n³), via LU).
    Inverse,
    /// ln |det A| of a square matrix: a scalar (O(n³), via LU).
    LogDet,
    /// Elementwise; one operand may be a scalar, broadcast to the other's shape.
    Add,
    Sub,
    Mul,
    Neg,
    Unary(Unary),
    /// Sum over every element (`axis: None`, giving a scalar) or over one axis of a matrix
    /// (axis 0: `[D, B] → [B]`, per-example sums; axis 1: `[D, B] → [D]`).
    Sum {
        axis: Option<usize>,
    },
    /// Repeat a scalar (`new_axis: None`) or a vector along a new axis, giving shape `to`.
    Broadcast {
        to: Shape,
        new_axis: Option<usize>,
    },
    /// Identity whose operand receives no gradient (paper eq. 3: the reconstruction input h_k).
    StopGrad,
    /// The same elements (row-major order) under another shape of equal size.
    Reshape {
        to: Shape,
    },
    /// Axes reordered: result axis `i` is operand axis `perm[i]`.
    Permute {
        perm: Vec<usize>,
    },
    /// Sum over the listed axes (strictly increasing), which leave the shape.
    ReduceSum {
        axes: Vec<usize>,
    },
    /// Repeat along new axes `axes` (strictly increasing positions in `to`): the inverse shape
    /// map of [`Op::ReduceSum`], and its adjoint.
    Expand {
        to: Shape,
        axes: Vec<usize>,
    },
    /// 2-D cross-correlation as PyTorch's `conv2d`, stride 1, zero padding (K − 1)/2:
    /// `x [C_in, H, W, B]`, `k [C_out, C_in, K, K]` (K odd) → `[C_out, H, W, B]`.
    Conv2d,
    /// `k [O, I, K, K] → [I, O, K, K]`, both spatial axes reversed: the kernel of the transposed
    /// convolution, `conv(k)ᵀ = conv(flip_kernel(k))`.
    FlipKernel,
    /// The kernel adjoint of [`Op::Conv2d`]: `(dy [C_out, H, W, B], x [C_in, H, W, B]) →
    /// [C_out, C_in, K, K]`, `Σ_{h,w,b} dy[o,h,w,b] x[i,h+u−p,w+v−p,b]`.
    ConvKernelGrad {
        k: usize,
    },
    /// The dense matrix `T(k)` `[C·H·W, C·H·W]` of a `C → C` convolution on one `H × W` example,
    /// flattened (c, h, w): `vec(conv(x, k)) = T(k) vec(x)`. Only for exact log-dets and inverses.
    Toeplitz {
        h: usize,
        w: usize,
    },
    /// `k ⊙ m` for a kernel `[O, I, K, K]` on `H × W` maps, where `m` counts how often each kernel
    /// element appears in the Toeplitz matrix (paper A.2): `(H − |u − p|)(W − |v − p|)`.
    /// `toeplitz_adjoint(toeplitz(k)) = multiplicity(k)`.
    Multiplicity {
        h: usize,
        w: usize,
    },
    /// The rational-quadratic spline activation (Durkan et al. 2019) with linear tails,
    /// elementwise with per-element parameters: `(x [D, B], widths [D, K], heights [D, K],
    /// derivatives [D, K−1]) → [D, B]`, its value or its log-derivative. The identity outside
    /// `[−bound, bound]` (`bound` stored as f64 bits).
    Spline {
        bins: usize,
        bound: u64,
        part: SplinePart,
    },
    /// The vector-Jacobian product of [`Op::Spline`] (`part`) with respect to operand `wrt`:
    /// `(x, widths, heights, derivatives, g [D, B]) →` the shape of operand `wrt`; with
    /// `part = both`, two cotangents `(…, g_y, g_l)`: the sum of the value's and the log-det's.
    SplineGrad {
        bins: usize,
        bound: u64,
        part: SplinePart,
        wrt: usize,
    },
    /// Element `index` along `axis`, the axis removed (`[…, n, …] → […, …]`): a slice of a
    /// channel group (coupling halves, even/odd channels).
    Take {
        axis: usize,
        index: usize,
    },
    /// The adjoint of [`Op::Take`]: a new axis `axis` of `size` holding the operand at `index`
    /// and zeros elsewhere (so a concatenation is a sum of embeddings).
    Embed {
        axis: usize,
        index: usize,
        size: usize,
    },
    /// The adjoint of [`Op::Toeplitz`]: each kernel element sums the matrix entries it occupies
    /// (`[C·H·W, C·H·W] → [C, C, K, K]`).
    ToeplitzAdjoint {
        h: usize,
        w: usize,
        k: usize,
    },
}

impl Op {
    pub fn constant(v: f64) -> Op {
        // One zero: -0.0 and 0.0 are the same constant.
        let v = if v == 0.0 { 0.0 } else { v };
        Op::Const { bits: v.to_bits() }
    }

    pub fn const_value(&self) -> Option<f64> {
        match self {
            Op::Const { bits } => Some(f64::from_bits(*bits)),
            _ => None,
        }
    }

    /// Whether the op is an elementwise function of its operands (a scalar operand broadcast).
    pub fn is_elementwise(&self) -> bool {
        self.kernel_class() == KernelClass::Elementwise
    }

    /// How the op runs: the one answer the cost model, fusion, the plan and the profile read.
    pub fn kernel_class(&self) -> KernelClass {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => KernelClass::Leaf,
            Op::Transpose => KernelClass::View,
            Op::Add | Op::Sub | Op::Mul | Op::Neg | Op::Unary(_) | Op::StopGrad => {
                KernelClass::Elementwise
            }
            Op::Broadcast { .. } => KernelClass::Broadcast,
            Op::Sum { .. } => KernelClass::Reduction,
            Op::MatMul => KernelClass::Gemm,
            Op::Inverse | Op::LogDet => KernelClass::Linalg,
            Op::Conv2d
            | Op::ConvKernelGrad { .. }
            | Op::FlipKernel
            | Op::Toeplitz { .. }
            | Op::ToeplitzAdjoint { .. }
            | Op::Multiplicity { .. } => KernelClass::Conv,
            Op::Spline { .. } | Op::SplineGrad { .. } => KernelClass::Spline,
            Op::Reshape { .. }
            | Op::Permute { .. }
            | Op::ReduceSum { .. }
            | Op::Expand { .. }
            | Op::Take { .. }
            | Op::Embed { .. } => KernelClass::Layout,
        }
    }

    /// Floating-point operations of one evaluation, given the operand shapes and the result
    /// shape (the work term of the extraction cost model, and the FLOPs `stats` report).
    pub fn flops(&self, ins: &[&Shape], out: &Shape) -> f64 {
        let numel = |s: &Shape| s.iter().product::<usize>() as f64;
        match self {
            Op::MatMul => 2.0 * ins[0][0] as f64 * ins[0][1] as f64 * ins[1][1] as f64,
            // LU with partial pivoting is (2/3)n³; the inverse from it another (4/3)n³.
            Op::Inverse => 2.0 * (ins[0][0] as f64).powi(3),
            Op::LogDet => 2.0 / 3.0 * (ins[0][0] as f64).powi(3),
            // 2 · (output elements) · (C_in · K²): one multiply-add per kernel tap.
            Op::Conv2d => 2.0 * numel(out) * (ins[1][1] * ins[1][2] * ins[1][3]) as f64,
            Op::ConvKernelGrad { .. } => {
                2.0 * numel(out) * (ins[0][1] * ins[0][2] * ins[0][3]) as f64
            }
            Op::ToeplitzAdjoint { h, w, .. } => numel(out) * (*h * *w) as f64,
            // A bin search and a rational function per element (about 40 operations); the
            // vector-Jacobian product about twice that.
            Op::Spline { .. } => 40.0 * numel(out),
            Op::SplineGrad {
                part: SplinePart::Both,
                ..
            } => 100.0 * numel(ins[0]),
            Op::SplineGrad { .. } => 80.0 * numel(ins[0]),
            Op::Sum { .. } => numel(ins[0]),
            // Fed values, and a transpose and a reshape, which move nothing the cost model
            // counts as work (their traffic is `KernelClass::moves_operands`).
            Op::Input { .. }
            | Op::Param { .. }
            | Op::Const { .. }
            | Op::Transpose
            | Op::Reshape { .. } => 0.0,
            _ => numel(out),
        }
    }

    /// Number of operands the op takes.
    pub fn arity(&self) -> usize {
        match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => 0,
            Op::MatMul | Op::Add | Op::Sub | Op::Mul | Op::Conv2d | Op::ConvKernelGrad { .. } => 2,
            Op::Spline { .. } => 4,
            Op::SplineGrad {
                part: SplinePart::Both,
                ..
            } => 6,
            Op::SplineGrad { .. } => 5,
            _ => 1,
        }
    }
}

/// What kind of kernel an op is, which decides whether it launches one, whether it joins a
/// fused elementwise group, what it costs beyond its FLOPs, and where a profile files its time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum KernelClass {
    /// Fed by the caller (`input`, `param`, `const`): no kernel, no buffer of its own.
    Leaf,
    /// A stride change its users read through (`transpose`): no kernel, its operand's buffer.
    View,
    /// Elementwise arithmetic: fused into groups, one pass per group.
    Elementwise,
    /// A repeat along a new axis: joins a fused group as an indexed read.
    Broadcast,
    /// A sum (`sum`): joins a fused group as its reduction tail.
    Reduction,
    /// A matrix product, with an optional `alpha·a·b + beta·c` epilogue.
    Gemm,
    /// LU-based `inverse` and `logdet`.
    Linalg,
    /// A convolution, its adjoints and the kernel-shaped ops around them.
    Conv,
    /// The rational-quadratic spline and its vector-Jacobian products.
    Spline,
    /// Moves, repeats or sums elements into another layout (reshape, permute, take, …).
    Layout,
}

impl KernelClass {
    /// Whether running the op launches a kernel that writes a buffer of its own.
    pub fn launches(self) -> bool {
        !matches!(self, KernelClass::Leaf | KernelClass::View)
    }

    /// Whether the op can be a member of a fused elementwise group.
    pub fn fusable(self) -> bool {
        matches!(
            self,
            KernelClass::Elementwise | KernelClass::Broadcast | KernelClass::Reduction
        )
    }
}
