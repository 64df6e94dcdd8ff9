//! The sampling graph: the flow run backwards, from latents to data, as one tensor program
//! that every backend runs like the training graph (DESIGN.md: "samples through the learned
//! inverse").
//!
//! Each layer is undone by its inverse, in reverse order: a linear or conv layer by its
//! learned inverse R (or by W⁻¹ where the exact inverse is asked for), the spline by its inverse
//! part, the smooth leaky ReLU by Newton's method unrolled into elementwise ops, a coupling by
//! its network of the conditioning half, actnorm by its scale and shift, a split by taking its
//! factored half back from the latent, and the 8-bit preprocessing by the logistic function.
//! The runtime's host inverse (`runtime::sample::invert`, in f64 with Newton to tolerance) is the
//! independent reference the tests hold this graph to.

use super::lower::{
    channel_bias, coupling_param_nodes, coupling_scale_shift, param_name, per_channel, spline_part,
    ParamKind,
};
use super::{Graph, GraphBuilder, NodeIndex, Op, Region, SplinePart, Unary};
use crate::spec::{FlowSpec, LayerSpec, Preprocess};

/// The latent fed to the last layer's inverse (`[D_out, B]`).
pub const INPUT_LATENT: &str = "z";
/// The sampling graph's output: samples in data space (`[D, B]`; on the [0, 256) scale for
/// 8-bit specs).
pub const OUTPUT_SAMPLES: &str = "x";

/// Newton steps that invert the smooth leaky ReLU. From x₀ = y the iteration converges
/// monotonically after its first step (s is increasing and convex, s' ∈ (α, 1)); over
/// y ∈ [−100, 100] and α ∈ [0.01, 0.99], 9 steps reach a relative step of 1e-12 in f64, so
/// 12 leave a margin (each is a few fused elementwise operations); `runtime/tests/eval_sample.rs`
/// holds them to the host's iteration at α = 0.001 and |y| up to about 250.
pub const SLRELU_NEWTON_STEPS: usize = 12;

/// The latent inputs of the sampling graph, with their rows per example, in the order of one
/// latent column `[D, B]` of `runtime::sample::invert`: the flow's final output first, then each
/// split's factored half from the last split to the first. They add up to the spec's input
/// dimension.
pub fn latent_inputs(spec: &FlowSpec) -> Vec<(String, usize)> {
    let shapes = spec.layer_shapes();
    let d_out = shapes.last().map_or(spec.input.dim(), |s| s.numel());
    let mut inputs = vec![(INPUT_LATENT.to_string(), d_out)];
    for (i, layer) in spec.layers.iter().enumerate().rev() {
        if let LayerSpec::Split(_) = layer {
            inputs.push((split_latent(i), shapes[i].numel() / 2));
        }
    }
    inputs
}

/// The latent input of split layer `i`'s factored half.
pub fn split_latent(i: usize) -> String {
    format!("z.layers.{i}")
}

/// The sampling graph at batch `batch`: inputs [`latent_inputs`], output [`OUTPUT_SAMPLES`].
/// With `exact`, linear and conv layers are undone by W⁻¹ (an `inverse` node; for a conv, of its
/// C × C matrix when 1×1, else of its Toeplitz matrix), otherwise by the learned R.
pub fn sample_graph(spec: &FlowSpec, batch: usize, exact: bool) -> Graph {
    let kind = if exact { "sample_exact" } else { "sample" };
    let mut b = GraphBuilder::new(&format!("{}.{kind}", spec.name));
    let shapes = spec.layer_shapes();
    b.set_region(Region::Loss);
    let d_out = shapes.last().map_or(spec.input.dim(), |s| s.numel());
    let mut h = b.input(INPUT_LATENT, vec![d_out, batch]);
    for (i, layer) in spec.layers.iter().enumerate().rev() {
        b.set_region(Region::Layer(i));
        let shape = shapes[i];
        let d = shape.numel();
        let flat = vec![d, batch];
        h = match layer {
            LayerSpec::Split(_) => {
                let half = b.input(&split_latent(i), vec![d / 2, batch]);
                join_halves(&mut b, h, half, flat)
            }
            LayerSpec::Linear(l) => {
                if l.bias {
                    let bias = b.param(&param_name(i, ParamKind::Bias), vec![d]);
                    let bb = b.broadcast(bias, flat.clone(), Some(1));
                    h = b.sub(h, bb);
                }
                let m = if exact {
                    let w = b.param(&param_name(i, ParamKind::Weight), vec![d, d]);
                    b.inverse(w)
                } else {
                    b.param(&param_name(i, ParamKind::WeightInv), vec![d, d])
                };
                b.matmul(m, h)
            }
            LayerSpec::Conv(c) => {
                let (ch, hh, ww) = shape.image();
                let k = c.kernel_size;
                if c.bias {
                    let bb = channel_bias(&mut b, i, ch, hh * ww, batch);
                    h = b.sub(h, bb);
                }
                let kernel_shape = vec![ch, ch, k, k];
                let image = vec![ch, hh, ww, batch];
                let conv = |b: &mut GraphBuilder, h: NodeIndex, kernel: NodeIndex| {
                    let img = b.add(Op::Reshape { to: image.clone() }, &[h]);
                    let y = b.add(Op::Conv2d, &[img, kernel]);
                    b.add(Op::Reshape { to: flat.clone() }, &[y])
                };
                if !exact {
                    let r = b.param(&param_name(i, ParamKind::WeightInv), kernel_shape);
                    conv(&mut b, h, r)
                } else if k == 1 {
                    // T(w)⁻¹ = T(W⁻¹) for a 1×1 conv: one C × C inverse.
                    let w = b.param(&param_name(i, ParamKind::Weight), kernel_shape.clone());
                    let m = b.add(Op::Reshape { to: vec![ch, ch] }, &[w]);
                    let m_inv = b.inverse(m);
                    let w_inv = b.add(Op::Reshape { to: kernel_shape }, &[m_inv]);
                    conv(&mut b, h, w_inv)
                } else {
                    let w = b.param(&param_name(i, ParamKind::Weight), kernel_shape);
                    let t = b.add(Op::Toeplitz { h: hh, w: ww }, &[w]);
                    let t_inv = b.inverse(t);
                    b.matmul(t_inv, h)
                }
            }
            LayerSpec::Spline(sp) => spline_part(&mut b, sp, i, d, h, SplinePart::Inverse),
            LayerSpec::Squeeze(_) => {
                let (ch, hh, ww) = shape.image();
                // The forward [C, H/2, 2, W/2, 2] → [C, 2, 2, H/2, W/2], undone.
                let moved = b.add(
                    Op::Reshape {
                        to: vec![ch, 2, 2, hh / 2, ww / 2, batch],
                    },
                    &[h],
                );
                let back = b.add(
                    Op::Permute {
                        perm: vec![0, 3, 1, 4, 2, 5],
                    },
                    &[moved],
                );
                b.add(Op::Reshape { to: flat }, &[back])
            }
            LayerSpec::SmoothLeakyRelu(a) => smooth_leaky_relu_inverse(&mut b, h, a.alpha),
            LayerSpec::AffineCoupling(a) => {
                // z = [x1, x2·exp(log_s(x1)) + t(x1)]  ⇒  x2 = (z2 − t)·exp(−log_s).
                let (c, hh, ww) = shape.image();
                let params = coupling_param_nodes(&mut b, i, c, a.width);
                let halves = b.add(
                    Op::Reshape {
                        to: vec![2, c / 2, hh, ww, batch],
                    },
                    &[h],
                );
                let x1 = b.add(Op::Take { axis: 0, index: 0 }, &[halves]);
                let z2 = b.add(Op::Take { axis: 0, index: 1 }, &[halves]);
                let (log_s, t) =
                    coupling_scale_shift(&mut b, &params, x1, [c, hh, ww, batch], a.width);
                let shifted = b.sub(z2, t);
                let neg = b.neg(log_s);
                let inv_s = b.unary(Unary::Exp, neg);
                let x2 = b.mul(shifted, inv_s);
                join_halves(&mut b, x1, x2, flat)
            }
            LayerSpec::Actnorm(_) => {
                // y = (x − t)·exp(−s)  ⇒  x = y·exp(s) + t, per channel.
                let (c, hw) = shape.channels();
                let grid = vec![c, hw, batch];
                let t = b.param(&param_name(i, ParamKind::ActnormTranslation), vec![c]);
                let s = b.param(&param_name(i, ParamKind::ActnormLogScale), vec![c]);
                let y = b.add(Op::Reshape { to: grid.clone() }, &[h]);
                let scale = b.unary(Unary::Exp, s);
                let scale = per_channel(&mut b, scale, &grid);
                let shift = per_channel(&mut b, t, &grid);
                let scaled = b.mul(y, scale);
                let x = b.add2(scaled, shift);
                b.add(Op::Reshape { to: flat }, &[x])
            }
        };
    }
    b.set_region(Region::Input);
    if spec.input.preprocess == Preprocess::DequantizeLogit {
        // h0 = logit(s), s = α + (1 − 2α)·x/256  ⇒  x = 256·(σ(h0) − α)/(1 − 2α).
        let a = spec.input.logit_alpha;
        let s = b.unary(Unary::Sigmoid, h);
        let shift = b.constant(-a);
        let centered = b.add2(s, shift);
        h = b.scale(centered, 256.0 / (1.0 - 2.0 * a));
    }
    b.output(OUTPUT_SAMPLES, h);
    b.finish()
}

/// `[first; second]`, two `[D/2, B]` row blocks stacked into `flat` = `[D, B]` (a concatenation
/// is a sum of embeddings).
fn join_halves(
    b: &mut GraphBuilder,
    first: NodeIndex,
    second: NodeIndex,
    flat: Vec<usize>,
) -> NodeIndex {
    let top = b.add(
        Op::Embed {
            axis: 0,
            index: 0,
            size: 2,
        },
        &[first],
    );
    let bottom = b.add(
        Op::Embed {
            axis: 0,
            index: 1,
            size: 2,
        },
        &[second],
    );
    let joined = b.add2(top, bottom);
    b.add(Op::Reshape { to: flat }, &[joined])
}

/// x with s(x) = y for s(x) = αx + (1−α) softplus(x): [`SLRELU_NEWTON_STEPS`] Newton steps
/// x ← x − (s(x) − y)/s'(x) from x₀ = y, with s'(x) = α + (1−α) σ(x).
fn smooth_leaky_relu_inverse(b: &mut GraphBuilder, y: NodeIndex, alpha: f64) -> NodeIndex {
    let mut x = y;
    let a = b.constant(alpha);
    for _ in 0..SLRELU_NEWTON_STEPS {
        let ax = b.scale(x, alpha);
        let sp = b.unary(Unary::Softplus, x);
        let bsp = b.scale(sp, 1.0 - alpha);
        let s = b.add2(ax, bsp);
        let sig = b.unary(Unary::Sigmoid, x);
        let bsig = b.scale(sig, 1.0 - alpha);
        let ds = b.add2(a, bsig);
        let residual = b.sub(s, y);
        let inv_ds = b.unary(Unary::Recip, ds);
        let step = b.mul(residual, inv_ds);
        x = b.sub(x, step);
    }
    x
}
