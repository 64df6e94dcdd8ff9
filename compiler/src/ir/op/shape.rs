//! The shape rule of every op: what its result's shape is, or why its operands do not fit.

use super::{Op, Shape, SplinePart};

impl Op {
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
                    Op::SplineGrad {
                        part: SplinePart::Inverse,
                        ..
                    } => Err(format!("{self}: the inverse spline has no gradient")),
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
