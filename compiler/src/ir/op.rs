//! The primitive op set, its text form and its shape rules.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Dimensions of a tensor, row-major (C order): `[]` scalar, `[n]` vector, `[rows, cols]`
/// matrix, and any rank beyond. Batches put the batch last: `[D, B]` for flat layers,
/// `[C, H, W, B]` for images, so `reshape` between the two is free.
pub type Shape = Vec<usize>;

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
}

impl Unary {
    pub const ALL: [Unary; 9] = [
        Unary::Exp,
        Unary::Log,
        Unary::Softplus,
        Unary::Sigmoid,
        Unary::Square,
        Unary::Recip,
        Unary::Relu,
        Unary::Step,
        Unary::Tanh,
    ];
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
            SplinePart::Both => "both",
        }
    }

    fn parse(s: &str) -> Result<SplinePart, String> {
        match s {
            "value" => Ok(SplinePart::Value),
            "logdet" => Ok(SplinePart::LogDet),
            "both" => Ok(SplinePart::Both),
            _ => Err(format!("spline part {s:?}: value, logdet or both")),
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

    pub fn is_elementwise(&self) -> bool {
        matches!(
            self,
            Op::Add | Op::Sub | Op::Mul | Op::Neg | Op::Unary(_) | Op::StopGrad
        )
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

    /// The result shape, or why the operands do not fit.
    pub fn infer_shape(&self, ins: &[Shape]) -> Result<Shape, String> {
        if ins.len() != self.arity() {
            return Err(format!(
                "{self} takes {} operands, got {}",
                self.arity(),
                ins.len()
            ));
        }
        let matrix = |s: &Shape| -> Result<(usize, usize), String> {
            match s.as_slice() {
                [r, c] => Ok((*r, *c)),
                _ => Err(format!("{self} needs a matrix operand, got {s:?}")),
            }
        };
        match self {
            Op::Input { shape, .. } | Op::Param { shape, .. } => Ok(shape.clone()),
            Op::Const { .. } => Ok(vec![]),
            Op::MatMul => {
                let (m, k) = matrix(&ins[0])?;
                let (k2, n) = matrix(&ins[1])?;
                if k != k2 {
                    return Err(format!("matmul of {:?} by {:?}", ins[0], ins[1]));
                }
                Ok(vec![m, n])
            }
            Op::Transpose => {
                let (r, c) = matrix(&ins[0])?;
                Ok(vec![c, r])
            }
            Op::Inverse | Op::LogDet => {
                let (r, c) = matrix(&ins[0])?;
                if r != c {
                    return Err(format!("{self} of a non-square {:?}", ins[0]));
                }
                Ok(if *self == Op::Inverse {
                    vec![r, c]
                } else {
                    vec![]
                })
            }
            Op::Add | Op::Sub | Op::Mul => {
                let (a, b) = (&ins[0], &ins[1]);
                if a == b || b.is_empty() {
                    Ok(a.clone())
                } else if a.is_empty() {
                    Ok(b.clone())
                } else {
                    Err(format!("{self} of {a:?} and {b:?}"))
                }
            }
            Op::Neg | Op::Unary(_) | Op::StopGrad => Ok(ins[0].clone()),
            Op::Sum { axis: None } => Ok(vec![]),
            Op::Sum { axis: Some(ax) } => {
                let (r, c) = matrix(&ins[0])?;
                match ax {
                    0 => Ok(vec![c]),
                    1 => Ok(vec![r]),
                    _ => Err(format!("sum over axis {ax} of a matrix")),
                }
            }
            Op::Reshape { to } => {
                if numel(&ins[0]) != numel(to) {
                    return Err(format!("reshape of {:?} to {to:?}", ins[0]));
                }
                Ok(to.clone())
            }
            Op::Permute { perm } => {
                let mut seen = vec![false; perm.len()];
                let ok = perm.len() == ins[0].len()
                    && perm.iter().all(|&p| p < seen.len() && !std::mem::replace(&mut seen[p], true));
                if !ok {
                    return Err(format!("permute {perm:?} of {:?}", ins[0]));
                }
                Ok(perm.iter().map(|&p| ins[0][p]).collect())
            }
            Op::ReduceSum { axes } => {
                if !increasing_below(axes, ins[0].len()) {
                    return Err(format!("reduce_sum over axes {axes:?} of {:?}", ins[0]));
                }
                Ok(without_axes(&ins[0], axes))
            }
            Op::Expand { to, axes } => {
                if !increasing_below(axes, to.len()) || without_axes(to, axes) != ins[0] {
                    return Err(format!("expand of {:?} to {to:?} along {axes:?}", ins[0]));
                }
                Ok(to.clone())
            }
            Op::Conv2d => match (ins[0].as_slice(), ins[1].as_slice()) {
                ([ci, h, w, b], [co, ci2, k, k2]) if ci == ci2 && k == k2 && k % 2 == 1 => {
                    Ok(vec![*co, *h, *w, *b])
                }
                _ => Err(format!(
                    "conv2d of x {:?} ([C_in, H, W, B]) by kernel {:?} ([C_out, C_in, K, K], K odd)",
                    ins[0], ins[1]
                )),
            },
            Op::FlipKernel => match ins[0].as_slice() {
                [o, i, k, k2] if k == k2 => Ok(vec![*i, *o, *k, *k]),
                s => Err(format!("flip_kernel of {s:?}: expected [O, I, K, K]")),
            },
            Op::ConvKernelGrad { k } => match (ins[0].as_slice(), ins[1].as_slice()) {
                ([co, h, w, b], [ci, h2, w2, b2]) if (h, w, b) == (h2, w2, b2) && k % 2 == 1 => {
                    Ok(vec![*co, *ci, *k, *k])
                }
                _ => Err(format!(
                    "conv_kernel_grad of dy {:?} and x {:?}: expected [C_out, H, W, B] and [C_in, H, W, B]",
                    ins[0], ins[1]
                )),
            },
            Op::Toeplitz { h, w } => match ins[0].as_slice() {
                [c, c2, k, k2] if c == c2 && k == k2 && k % 2 == 1 => {
                    let n = c * h * w;
                    Ok(vec![n, n])
                }
                s => Err(format!("toeplitz of {s:?}: expected a C → C kernel [C, C, K, K]")),
            },
            Op::Spline { bins, .. } | Op::SplineGrad { bins, .. } => {
                let k = *bins;
                let (x, w, h, d) = (&ins[0], &ins[1], &ins[2], &ins[3]);
                let ok = k >= 1
                    && x.len() == 2
                    && *w == vec![x[0], k]
                    && *h == vec![x[0], k]
                    && *d == vec![x[0], k - 1];
                if !ok {
                    return Err(format!(
                        "{self} of x {x:?}, widths {w:?}, heights {h:?}, derivatives {d:?}: \
                         expected [D, B], [D, {k}], [D, {k}], [D, {}]",
                        k.saturating_sub(1)
                    ));
                }
                match self {
                    Op::SplineGrad { wrt, .. } => {
                        if ins[4..].iter().any(|g| g != x) || *wrt > 3 {
                            return Err(format!(
                                "{self}: cotangents {:?} for x {x:?}",
                                &ins[4..]
                            ));
                        }
                        Ok(ins[*wrt].clone())
                    }
                    Op::Spline {
                        part: SplinePart::Both,
                        ..
                    } => Err(format!("{self}: a spline value is its value or its log-det")),
                    _ => Ok(x.clone()),
                }
            }
            Op::Take { axis, index } => {
                if *axis < ins[0].len() && *index < ins[0][*axis] {
                    let mut s = ins[0].clone();
                    s.remove(*axis);
                    Ok(s)
                } else {
                    Err(format!("take index {index} of axis {axis} of {:?}", ins[0]))
                }
            }
            Op::Embed { axis, index, size } => {
                if *axis <= ins[0].len() && index < size {
                    let mut s = ins[0].clone();
                    s.insert(*axis, *size);
                    Ok(s)
                } else {
                    Err(format!(
                        "embed of {:?} at index {index} of a new axis {axis} of size {size}",
                        ins[0]
                    ))
                }
            }
            Op::Multiplicity { .. } => match ins[0].as_slice() {
                [_, _, k, k2] if k == k2 => Ok(ins[0].clone()),
                s => Err(format!("multiplicity of {s:?}: expected a kernel [O, I, K, K]")),
            },
            Op::ToeplitzAdjoint { h, w, k } => match ins[0].as_slice() {
                [n, n2] if n == n2 && h * w > 0 && n % (h * w) == 0 && k % 2 == 1 => {
                    let c = n / (h * w);
                    Ok(vec![c, c, *k, *k])
                }
                s => Err(format!("toeplitz_adjoint of {s:?} for {h}×{w} maps")),
            },
            Op::Broadcast { to, new_axis } => {
                let expect: Shape = match new_axis {
                    None => vec![],
                    Some(ax) if to.len() == 2 && *ax < 2 => vec![to[1 - ax]],
                    Some(ax) => return Err(format!("broadcast along axis {ax} to {to:?}")),
                };
                if ins[0] != expect {
                    return Err(format!("broadcast of {:?} to {to:?}", ins[0]));
                }
                Ok(to.clone())
            }
        }
    }
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

fn increasing_below(axes: &[usize], rank: usize) -> bool {
    axes.windows(2).all(|p| p[0] < p[1]) && axes.iter().all(|&a| a < rank)
}

fn without_axes(s: &[usize], axes: &[usize]) -> Shape {
    s.iter()
        .enumerate()
        .filter(|(i, _)| !axes.contains(i))
        .map(|(_, d)| *d)
        .collect()
}

fn list(v: &[usize]) -> String {
    v.iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(".")
}

fn parse_list(s: &str) -> Result<Vec<usize>, String> {
    if s.is_empty() {
        return Ok(vec![]);
    }
    s.split('.')
        .map(|d| {
            d.parse::<usize>()
                .map_err(|e| format!("bad index {d:?}: {e}"))
        })
        .collect()
}

fn dims(s: &Shape) -> String {
    if s.is_empty() {
        "scalar".into()
    } else {
        s.iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("x")
    }
}

fn parse_dims(s: &str) -> Result<Shape, String> {
    if s == "scalar" {
        return Ok(vec![]);
    }
    s.split('x')
        .map(|d| {
            d.parse::<usize>()
                .map_err(|e| format!("bad dimension {d:?}: {e}"))
        })
        .collect()
}

/// The one-token text of an op, used by the IR printer and as the e-graph operator name.
/// Leaves embed their attributes: `param:layers.0.weight:784x784`, `const:0.5`, `bcast1:784x100`.
impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Input { name, shape } => write!(f, "input:{name}:{}", dims(shape)),
            Op::Param { name, shape } => write!(f, "param:{name}:{}", dims(shape)),
            Op::Const { bits } => write!(f, "const:{:?}", f64::from_bits(*bits)),
            Op::MatMul => write!(f, "matmul"),
            Op::Transpose => write!(f, "transpose"),
            Op::Inverse => write!(f, "inverse"),
            Op::LogDet => write!(f, "logdet"),
            Op::Add => write!(f, "add"),
            Op::Sub => write!(f, "sub"),
            Op::Mul => write!(f, "mul"),
            Op::Neg => write!(f, "neg"),
            Op::Unary(u) => write!(f, "{}", u.name()),
            Op::Sum { axis: None } => write!(f, "sum"),
            Op::Sum { axis: Some(a) } => write!(f, "sum{a}"),
            Op::Broadcast { to, new_axis: None } => write!(f, "bcast:{}", dims(to)),
            Op::Broadcast {
                to,
                new_axis: Some(a),
            } => write!(f, "bcast{a}:{}", dims(to)),
            Op::StopGrad => write!(f, "stop_grad"),
            Op::Reshape { to } => write!(f, "reshape:{}", dims(to)),
            Op::Permute { perm } => write!(f, "permute:{}", list(perm)),
            Op::Take { axis, index } => write!(f, "take:{axis}:{index}"),
            Op::Embed { axis, index, size } => write!(f, "embed:{axis}:{index}:{size}"),
            Op::ReduceSum { axes } => write!(f, "reduce_sum:{}", list(axes)),
            Op::Expand { to, axes } => write!(f, "expand:{}:{}", list(axes), dims(to)),
            Op::Conv2d => write!(f, "conv2d"),
            Op::FlipKernel => write!(f, "flip_kernel"),
            Op::ConvKernelGrad { k } => write!(f, "conv_kernel_grad:{k}"),
            Op::Toeplitz { h, w } => write!(f, "toeplitz:{h}x{w}"),
            Op::ToeplitzAdjoint { h, w, k } => write!(f, "toeplitz_adjoint:{h}x{w}:{k}"),
            Op::Multiplicity { h, w } => write!(f, "multiplicity:{h}x{w}"),
            Op::Spline { bins, bound, part } => {
                write!(
                    f,
                    "spline:{bins}:{:?}:{}",
                    f64::from_bits(*bound),
                    part.name()
                )
            }
            Op::SplineGrad {
                bins,
                bound,
                part,
                wrt,
            } => write!(
                f,
                "spline_grad:{bins}:{:?}:{}:{wrt}",
                f64::from_bits(*bound),
                part.name()
            ),
        }
    }
}

impl FromStr for Op {
    type Err = String;
    fn from_str(s: &str) -> Result<Op, String> {
        let (head, rest) = match s.split_once(':') {
            Some((h, r)) => (h, Some(r)),
            None => (s, None),
        };
        let leaf = |r: Option<&str>| -> Result<(String, Shape), String> {
            let r = r.ok_or_else(|| format!("{s}: missing name"))?;
            let (name, d) = r
                .rsplit_once(':')
                .ok_or_else(|| format!("{s}: missing shape"))?;
            Ok((name.to_string(), parse_dims(d)?))
        };
        Ok(match (head, rest) {
            ("input", r) => {
                let (name, shape) = leaf(r)?;
                Op::Input { name, shape }
            }
            ("param", r) => {
                let (name, shape) = leaf(r)?;
                Op::Param { name, shape }
            }
            ("const", Some(v)) => Op::constant(v.parse::<f64>().map_err(|e| format!("{s}: {e}"))?),
            ("matmul", None) => Op::MatMul,
            ("transpose", None) => Op::Transpose,
            ("inverse", None) => Op::Inverse,
            ("logdet", None) => Op::LogDet,
            ("add", None) => Op::Add,
            ("sub", None) => Op::Sub,
            ("mul", None) => Op::Mul,
            ("neg", None) => Op::Neg,
            ("sum", None) => Op::Sum { axis: None },
            ("sum0", None) => Op::Sum { axis: Some(0) },
            ("sum1", None) => Op::Sum { axis: Some(1) },
            ("bcast", Some(d)) => Op::Broadcast {
                to: parse_dims(d)?,
                new_axis: None,
            },
            ("bcast0", Some(d)) => Op::Broadcast {
                to: parse_dims(d)?,
                new_axis: Some(0),
            },
            ("bcast1", Some(d)) => Op::Broadcast {
                to: parse_dims(d)?,
                new_axis: Some(1),
            },
            ("stop_grad", None) => Op::StopGrad,
            ("reshape", Some(d)) => Op::Reshape { to: parse_dims(d)? },
            ("permute", Some(p)) => Op::Permute {
                perm: parse_list(p)?,
            },
            ("reduce_sum", Some(a)) => Op::ReduceSum {
                axes: parse_list(a)?,
            },
            ("take", Some(r)) | ("embed", Some(r)) => {
                let v: Vec<usize> = r
                    .split(':')
                    .map(|x| x.parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|e| format!("{s}: {e}"))?;
                match (head, v.as_slice()) {
                    ("take", [axis, index]) => Op::Take {
                        axis: *axis,
                        index: *index,
                    },
                    ("embed", [axis, index, size]) => Op::Embed {
                        axis: *axis,
                        index: *index,
                        size: *size,
                    },
                    _ => {
                        return Err(format!(
                            "{s}: expected take:AXIS:INDEX or embed:AXIS:INDEX:SIZE"
                        ))
                    }
                }
            }
            ("expand", Some(r)) => {
                let (a, d) = r
                    .split_once(':')
                    .ok_or_else(|| format!("{s}: expected expand:AXES:SHAPE"))?;
                Op::Expand {
                    to: parse_dims(d)?,
                    axes: parse_list(a)?,
                }
            }
            ("conv2d", None) => Op::Conv2d,
            ("flip_kernel", None) => Op::FlipKernel,
            ("conv_kernel_grad", Some(k)) => Op::ConvKernelGrad {
                k: k.parse().map_err(|e| format!("{s}: {e}"))?,
            },
            ("toeplitz", Some(hw)) => {
                let hw = parse_dims(hw)?;
                match hw.as_slice() {
                    [h, w] => Op::Toeplitz { h: *h, w: *w },
                    _ => return Err(format!("{s}: expected toeplitz:HxW")),
                }
            }
            ("spline", Some(r)) | ("spline_grad", Some(r)) => {
                let parts: Vec<&str> = r.split(':').collect();
                let bad = || {
                    format!(
                        "{s}: expected spline:BINS:BOUND:PART or spline_grad:BINS:BOUND:PART:WRT"
                    )
                };
                let (bins, bound, part) = match parts.as_slice() {
                    [b, t, p] | [b, t, p, _] => (
                        b.parse::<usize>().map_err(|_| bad())?,
                        t.parse::<f64>().map_err(|_| bad())?.to_bits(),
                        SplinePart::parse(p)?,
                    ),
                    _ => return Err(bad()),
                };
                match (head, parts.as_slice()) {
                    ("spline", [_, _, _]) => Op::Spline { bins, bound, part },
                    ("spline_grad", [_, _, _, w]) => Op::SplineGrad {
                        bins,
                        bound,
                        part,
                        wrt: w.parse().map_err(|_| bad())?,
                    },
                    _ => return Err(bad()),
                }
            }
            ("multiplicity", Some(hw)) => match parse_dims(hw)?.as_slice() {
                [h, w] => Op::Multiplicity { h: *h, w: *w },
                _ => return Err(format!("{s}: expected multiplicity:HxW")),
            },
            ("toeplitz_adjoint", Some(r)) => {
                let (hw, k) = r
                    .split_once(':')
                    .ok_or_else(|| format!("{s}: expected toeplitz_adjoint:HxW:K"))?;
                match parse_dims(hw)?.as_slice() {
                    [h, w] => Op::ToeplitzAdjoint {
                        h: *h,
                        w: *w,
                        k: k.parse().map_err(|e| format!("{s}: {e}"))?,
                    },
                    _ => return Err(format!("{s}: expected toeplitz_adjoint:HxW:K")),
                }
            }
            (h, None) => match Unary::ALL.iter().find(|u| u.name() == h) {
                Some(u) => Op::Unary(*u),
                None => return Err(format!("unknown op {s:?}")),
            },
            _ => return Err(format!("unknown op {s:?}")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_round_trips() {
        let ops = vec![
            Op::Input {
                name: "x".into(),
                shape: vec![784, 100],
            },
            Op::Param {
                name: "layers.0.weight".into(),
                shape: vec![784, 784],
            },
            Op::constant(-0.5),
            Op::constant(1e-6),
            Op::MatMul,
            Op::Sum { axis: Some(0) },
            Op::Broadcast {
                to: vec![3, 4],
                new_axis: Some(1),
            },
            Op::Broadcast {
                to: vec![],
                new_axis: None,
            },
            Op::Unary(Unary::Softplus),
            Op::StopGrad,
            Op::Reshape {
                to: vec![2, 28, 28],
            },
            Op::Permute {
                perm: vec![0, 2, 4, 1, 3, 5],
            },
            Op::Take { axis: 1, index: 0 },
            Op::Embed {
                axis: 0,
                index: 1,
                size: 2,
            },
            Op::Unary(Unary::Relu),
            Op::Unary(Unary::Step),
            Op::Unary(Unary::Tanh),
            Op::ReduceSum {
                axes: vec![0, 1, 2],
            },
            Op::Expand {
                to: vec![4, 14, 14, 100],
                axes: vec![1, 2, 3],
            },
            Op::Conv2d,
            Op::FlipKernel,
            Op::ConvKernelGrad { k: 3 },
            Op::Toeplitz { h: 28, w: 27 },
            Op::ToeplitzAdjoint { h: 7, w: 7, k: 5 },
            Op::Multiplicity { h: 28, w: 28 },
            Op::Spline {
                bins: 5,
                bound: 10f64.to_bits(),
                part: SplinePart::LogDet,
            },
            Op::SplineGrad {
                bins: 5,
                bound: 3.5f64.to_bits(),
                part: SplinePart::Value,
                wrt: 3,
            },
        ];
        for op in ops {
            assert_eq!(op.to_string().parse::<Op>(), Ok(op.clone()), "{op}");
        }
        assert!("frobnicate".parse::<Op>().is_err());
    }

    #[test]
    fn shapes() {
        assert_eq!(
            Op::MatMul.infer_shape(&[vec![3, 4], vec![4, 5]]),
            Ok(vec![3, 5])
        );
        assert!(Op::MatMul.infer_shape(&[vec![3, 4], vec![5, 4]]).is_err());
        assert_eq!(Op::Add.infer_shape(&[vec![], vec![2, 3]]), Ok(vec![2, 3]));
        assert!(Op::Add.infer_shape(&[vec![3], vec![2, 3]]).is_err());
        assert_eq!(
            Op::Sum { axis: Some(0) }.infer_shape(&[vec![7, 9]]),
            Ok(vec![9])
        );
        let b = Op::Broadcast {
            to: vec![7, 9],
            new_axis: Some(1),
        };
        assert_eq!(b.infer_shape(&[vec![7]]), Ok(vec![7, 9]));
        assert!(b.infer_shape(&[vec![9]]).is_err());
        assert!(Op::LogDet.infer_shape(&[vec![2, 3]]).is_err());
    }
}
