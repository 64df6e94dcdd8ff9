//! The one-token text of every op: the IR's op names and the e-graph's operators.

use super::{Op, Shape, SplinePart, Unary};
use std::fmt;
use std::str::FromStr;

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
