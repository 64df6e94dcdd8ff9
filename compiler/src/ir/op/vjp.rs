//! The vector-Jacobian product of every op, as more IR: the textbook ones, and the two that make
//! flows expensive, `inverse` (`∂A = −Mᵀ G Mᵀ` for `M = A⁻¹`) and `logdet` (`∂A = g · A⁻ᵀ`),
//! exactly.

use super::{Op, SplinePart};
use crate::ir::GraphBuilder;
use petgraph::stable_graph::NodeIndex;

impl Op {
    /// The contribution to operand `pos` of node `n = op(ins)` given its cotangent `g`.
    pub fn vjp(
        &self,
        b: &mut GraphBuilder,
        n: NodeIndex,
        ins: &[NodeIndex],
        pos: usize,
        g: NodeIndex,
    ) -> Option<NodeIndex> {
        let x = ins[pos];
        Some(match self {
            Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::StopGrad => return None,
            Op::Add => g,
            Op::Sub => {
                if pos == 0 {
                    g
                } else {
                    b.neg(g)
                }
            }
            Op::Mul => b.mul(g, ins[1 - pos]),
            Op::Neg => b.neg(g),
            Op::MatMul => {
                if pos == 0 {
                    let bt = b.transpose(ins[1]);
                    b.matmul(g, bt)
                } else {
                    let at = b.transpose(ins[0]);
                    b.matmul(at, g)
                }
            }
            Op::Transpose => b.transpose(g),
            Op::Inverse => {
                // d(A⁻¹) = −M dA M  ⇒  ∂A = −Mᵀ G Mᵀ
                let mt = b.transpose(n);
                let mg = b.matmul(mt, g);
                let mgm = b.matmul(mg, mt);
                b.neg(mgm)
            }
            Op::LogDet => {
                // ∂ ln|det A| / ∂A = A⁻ᵀ
                let inv = b.inverse(x);
                let inv_t = b.transpose(inv);
                b.mul(g, inv_t)
            }
            Op::Unary(u) => {
                let d = u.derivative(b, x, n);
                b.mul(g, d)
            }
            Op::Sum { axis } => {
                let to = b.shape(x).clone();
                // Summing axis 0 of [R, C] gives [C]; its gradient repeats along the new axis 0.
                b.broadcast(g, to, *axis)
            }
            Op::Broadcast { new_axis, .. } => b.sum(g, *new_axis),
            Op::Reshape { .. } => {
                let to = b.shape(x).clone();
                b.add(Op::Reshape { to }, &[g])
            }
            Op::Take { axis, index } => {
                let size = b.shape(x)[*axis];
                b.add(
                    Op::Embed {
                        axis: *axis,
                        index: *index,
                        size,
                    },
                    &[g],
                )
            }
            Op::Embed { axis, index, .. } => b.add(
                Op::Take {
                    axis: *axis,
                    index: *index,
                },
                &[g],
            ),
            Op::Permute { perm } => {
                let mut inverse = vec![0; perm.len()];
                for (i, &p) in perm.iter().enumerate() {
                    inverse[p] = i;
                }
                b.add(Op::Permute { perm: inverse }, &[g])
            }
            Op::ReduceSum { axes } => {
                let to = b.shape(x).clone();
                b.add(
                    Op::Expand {
                        to,
                        axes: axes.clone(),
                    },
                    &[g],
                )
            }
            Op::Expand { axes, .. } => b.add(Op::ReduceSum { axes: axes.clone() }, &[g]),
            Op::Conv2d => {
                let k = b.shape(ins[1])[2];
                if pos == 0 {
                    // conv(k)ᵀ = conv(flip_kernel(k))
                    let flipped = b.add(Op::FlipKernel, &[ins[1]]);
                    b.add(Op::Conv2d, &[g, flipped])
                } else {
                    b.add(Op::ConvKernelGrad { k }, &[g, ins[0]])
                }
            }
            // A permutation that is its own inverse.
            Op::FlipKernel => b.add(Op::FlipKernel, &[g]),
            Op::ConvKernelGrad { .. } => {
                // ⟨G, kgrad(dy, x)⟩ = ⟨dy, conv(x, G)⟩ = ⟨x, conv(dy, flip_kernel(G))⟩
                if pos == 0 {
                    b.add(Op::Conv2d, &[ins[1], g])
                } else {
                    let flipped = b.add(Op::FlipKernel, &[g]);
                    b.add(Op::Conv2d, &[ins[0], flipped])
                }
            }
            Op::Toeplitz { h, w } => {
                let k = b.shape(x)[2];
                b.add(Op::ToeplitzAdjoint { h: *h, w: *w, k }, &[g])
            }
            Op::ToeplitzAdjoint { h, w, .. } => b.add(Op::Toeplitz { h: *h, w: *w }, &[g]),
            Op::Spline {
                part: SplinePart::Inverse,
                ..
            } => panic!(
                "snfc internal error: the inverse spline is not differentiated (it only samples)"
            ),
            Op::Spline { bins, bound, part } => b.add(
                Op::SplineGrad {
                    bins: *bins,
                    bound: *bound,
                    part: *part,
                    wrt: pos,
                },
                &[ins[0], ins[1], ins[2], ins[3], g],
            ),
            Op::SplineGrad { .. } => panic!(
                "snfc internal error: second derivatives of the spline are not implemented \
                 (no training objective needs them)"
            ),
            // A diagonal linear map: its own adjoint.
            Op::Multiplicity { h, w } => b.add(Op::Multiplicity { h: *h, w: *w }, &[g]),
        })
    }
}
