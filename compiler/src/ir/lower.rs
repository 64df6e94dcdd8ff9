//! Lowering: a validated [`FlowSpec`] to the tensor graphs of training and evaluation.
//!
//! Sign conventions follow DESIGN.md §3 (minimization, mean over the batch):
//!
//! - f-flow: `z = W h + b`, smooth leaky ReLU `s(z) = αz + (1-α) softplus(z)`, base N(0, I);
//! - g-flow (the density induced by the learned inverse, paper eq. 3): the same flow with
//!   `g⁻¹(h) = R⁻¹ h + b`, so its log-det is `-ln|det R|`;
//! - reconstruction `Σ_k ‖R_k W_k h_k − h_k‖²` with `h_k` gradient-stopped (eq. 3), and `W_k h_k`
//!   too when the spec says `"recon_trains": "inverse"`;
//! - self-normalizing objective `J = −mean[½ ln p^f + ½ ln p^g] + λ·recon`, exact objective
//!   `J = −mean ln p^f`.
//!
//! The reported `loss` is `J` without the data-independent `ln|det|` terms (like the paper's
//! code); `objective` is all of `J`. Both are outputs of the exact training graph; the training
//! step drops `objective`, which is what removes every `logdet` from the step.

use super::{Graph, GraphBuilder, Region, Shape, Unary};
use super::{Op, SplinePart};
use crate::autodiff;
use crate::spec::{
    AffineCouplingSpec, ConvSpec, FlowSpec, GecoSpec, GradientMode, Lambda, LayerShape, LayerSpec,
    LinearSpec, Preprocess, ReconTrains, SmoothLeakyReluSpec, SplineSpec,
};
use petgraph::stable_graph::NodeIndex;

/// What a parameter is to its layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    /// W of `z = W h + b`.
    Weight,
    /// R of the learned inverse `h = R (z − b)`.
    WeightInv,
    Bias,
    /// A spline's unnormalized bin widths `[D, K]`.
    SplineWidths,
    /// A spline's unnormalized bin heights `[D, K]`.
    SplineHeights,
    /// A spline's unnormalized inner-knot derivatives `[D, K−1]`.
    SplineDerivatives,
    /// An actnorm's per-channel translation t `[C]`.
    ActnormTranslation,
    /// An actnorm's per-channel log-scale s `[C]` (y = (x − t)·exp(−s)).
    ActnormLogScale,
    /// Conv `k` (0, 1, 2) of a coupling network: its kernel `[out, in, K, K]`.
    CouplingWeight(u8),
    /// Conv `k` of a coupling network: its bias `[out]`.
    CouplingBias(u8),
    /// The per-channel log-scale of a coupling network's last conv `[C]` (applied as
    /// exp(3·logs)).
    CouplingLogs,
}

/// A trained tensor, named as in checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamInfo {
    pub name: String,
    pub shape: Shape,
    pub layer: usize,
    pub kind: ParamKind,
}

/// The checkpoint name of layer `layer`'s parameter of `kind`: `layers.{i}.weight`,
/// `layers.{i}.weight_inv` or `layers.{i}.bias`.
pub fn param_name(layer: usize, kind: ParamKind) -> String {
    let suffix = match kind {
        ParamKind::CouplingWeight(k) => return format!("layers.{layer}.net.{k}.weight"),
        ParamKind::CouplingBias(k) => return format!("layers.{layer}.net.{k}.bias"),
        ParamKind::CouplingLogs => return format!("layers.{layer}.net.2.logs"),
        ParamKind::Weight => "weight",
        ParamKind::WeightInv => "weight_inv",
        ParamKind::Bias => "bias",
        ParamKind::SplineWidths => "widths",
        ParamKind::SplineHeights => "heights",
        ParamKind::SplineDerivatives => "derivatives",
        ParamKind::ActnormTranslation => "translation",
        ParamKind::ActnormLogScale => "log_scale",
    };
    format!("layers.{layer}.{suffix}")
}

/// Every parameter of the spec, in layer order (weight, weight_inv, bias). A linear layer's
/// weights are `[D, D]` and its bias `[D]`; a conv layer's kernels are `[C, C, K, K]` (out, in,
/// kh, kw) and its bias `[C]`.
pub fn parameters(spec: &FlowSpec) -> Vec<ParamInfo> {
    let shapes = spec.layer_shapes();
    let mut out = Vec::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        if let LayerSpec::AffineCoupling(a) = layer {
            let (c, _) = shapes[i].channels();
            for (kind, shape) in coupling_params(c, a.width) {
                out.push(ParamInfo {
                    name: param_name(i, kind),
                    shape,
                    layer: i,
                    kind,
                });
            }
            continue;
        }
        if let LayerSpec::Actnorm(_) = layer {
            let (c, _) = shapes[i].channels();
            for kind in [ParamKind::ActnormTranslation, ParamKind::ActnormLogScale] {
                out.push(ParamInfo {
                    name: param_name(i, kind),
                    shape: vec![c],
                    layer: i,
                    kind,
                });
            }
            continue;
        }
        if let LayerSpec::Spline(sp) = layer {
            let d = shapes[i].numel();
            for (kind, k) in [
                (ParamKind::SplineWidths, sp.bins),
                (ParamKind::SplineHeights, sp.bins),
                (ParamKind::SplineDerivatives, sp.bins - 1),
            ] {
                out.push(ParamInfo {
                    name: param_name(i, kind),
                    shape: vec![d, k],
                    layer: i,
                    kind,
                });
            }
            continue;
        }
        let (weight, bias, has_bias) = match (layer, shapes[i]) {
            (LayerSpec::Linear(l), s) => (vec![s.numel(), s.numel()], s.numel(), l.bias),
            (LayerSpec::Conv(c), LayerShape::Image { c: ch, .. }) => {
                (vec![ch, ch, c.kernel_size, c.kernel_size], ch, c.bias)
            }
            _ => continue,
        };
        let mut p = |kind, shape: Shape| {
            out.push(ParamInfo {
                name: param_name(i, kind),
                shape,
                layer: i,
                kind,
            })
        };
        p(ParamKind::Weight, weight.clone());
        p(ParamKind::WeightInv, weight);
        if has_bias {
            p(ParamKind::Bias, vec![bias]);
        }
    }
    out
}

/// The parameters of a coupling on `c` channels with `width` hidden channels, in order:
/// conv 3×3 `c/2 → width`, conv 1×1 `width → width`, conv 3×3 `width → c`, and the last conv's
/// per-channel log-scale.
pub fn coupling_params(c: usize, width: usize) -> Vec<(ParamKind, Shape)> {
    vec![
        (ParamKind::CouplingWeight(0), vec![width, c / 2, 3, 3]),
        (ParamKind::CouplingBias(0), vec![width]),
        (ParamKind::CouplingWeight(1), vec![width, width, 1, 1]),
        (ParamKind::CouplingBias(1), vec![width]),
        (ParamKind::CouplingWeight(2), vec![c, width, 3, 3]),
        (ParamKind::CouplingBias(2), vec![c]),
        (ParamKind::CouplingLogs, vec![c]),
    ]
}

/// The layers GECO weighs, by index: every linear and conv layer (the ones with a
/// reconstruction error) of a GECO spec trained with the self-normalizing gradient; none for
/// other specs.
pub fn geco_layers(spec: &FlowSpec) -> Vec<usize> {
    if spec.objective.lambda.geco().is_none()
        || spec.objective.gradient != GradientMode::SelfNormalizing
    {
        return Vec::new();
    }
    spec.layers
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l, LayerSpec::Linear(_) | LayerSpec::Conv(_)))
        .map(|(k, _)| k)
        .collect()
}

/// A GECO layer's key in logs and checkpoints (`layers.k`); its inputs and outputs are named
/// by a prefix before it.
pub fn geco_layer_key(layer: usize) -> String {
    Region::Layer(layer).to_string()
}

/// The prefixes before a layer's key that name its GECO inputs (λ, the EMA of its
/// reconstruction error) and its reconstruction-error output.
pub const GECO_LAMBDA_PREFIX: &str = "lambda.";
pub const GECO_EMA_PREFIX: &str = "ema.";
pub const GECO_RECON_PREFIX: &str = "recon.";

/// The graph input of layer `layer`'s GECO weight λ (a scalar fed each step).
pub fn geco_lambda_input(layer: usize) -> String {
    format!("{GECO_LAMBDA_PREFIX}{}", geco_layer_key(layer))
}

/// The scalar inputs of a GECO training step: λ and the reconstruction EMA of each
/// self-normalizing layer, and the EMA's decay. Empty for other specs.
pub fn geco_inputs(spec: &FlowSpec) -> Vec<String> {
    let layers = geco_layers(spec);
    if layers.is_empty() {
        return Vec::new();
    }
    let mut names: Vec<String> = layers
        .into_iter()
        .flat_map(|k| [geco_lambda_input(k), geco_ema_input(k)])
        .collect();
    names.push(GECO_EMA_WEIGHT_INPUT.to_string());
    names
}

/// The graph input of layer `layer`'s EMA of its reconstruction error (GECO specs).
pub fn geco_ema_input(layer: usize) -> String {
    format!("{GECO_EMA_PREFIX}{}", geco_layer_key(layer))
}

/// The graph input of the EMA's decay for this step: 0 before the first step (the EMA starts at
/// the first error), the spec's `ema` after.
pub const GECO_EMA_WEIGHT_INPUT: &str = "ema_weight";

/// Outputs named `next.<input>` hold the value of `<input>` for the next step: a backend
/// carries them over without a round trip through the host (GECO's λ and EMA).
const NEXT_PREFIX: &str = "next.";

/// The output that carries `input`'s value for the next step.
pub fn next_output(input: &str) -> String {
    format!("{NEXT_PREFIX}{input}")
}

/// The input an output carries its value into, if it is a `next.*` output.
pub fn carried_input(output: &str) -> Option<&str> {
    output.strip_prefix(NEXT_PREFIX)
}

/// One GECO update as graph nodes, the same as [`GecoSpec::updated`] after the EMA step:
/// EMA' = r + w·(EMA − r), λ' = λ·exp(lr·(EMA' − κ)) kept within the spec's [min, max]
/// (max(x, lo) = lo + relu(x − lo), min(x, hi) = hi − relu(hi − x)).
fn geco_update(
    b: &mut GraphBuilder,
    geco: &GecoSpec,
    lambda: NodeIndex,
    ema: NodeIndex,
    weight: NodeIndex,
    recon: NodeIndex,
) -> (NodeIndex, NodeIndex) {
    // Neither is differentiated: they only feed the next step.
    let recon = b.stop_grad(recon);
    let lambda = b.stop_grad(lambda);
    let neg_recon = b.neg(recon);
    let gap = b.add2(ema, neg_recon);
    let decayed = b.mul(weight, gap);
    let ema_next = b.add2(recon, decayed);
    let mut exponent = b.scale(ema_next, geco.lr);
    if geco.kappa != 0.0 {
        let offset = b.constant(-geco.lr * geco.kappa);
        exponent = b.add2(exponent, offset);
    }
    let factor = b.unary(Unary::Exp, exponent);
    let mut next = b.mul(lambda, factor);
    if let Some(lo) = geco.min {
        let shift = b.constant(-lo);
        let above = b.add2(next, shift);
        let above = b.unary(Unary::Relu, above);
        let floor = b.constant(lo);
        next = b.add2(floor, above);
    }
    if let Some(hi) = geco.max {
        let neg = b.neg(next);
        let room = b.constant(hi);
        let room = b.add2(room, neg);
        let room = b.unary(Unary::Relu, room);
        let room = b.neg(room);
        let ceil = b.constant(hi);
        next = b.add2(ceil, room);
    }
    (next, ema_next)
}

/// `W h` inside the reconstruction error: gradient-stopped when only R is to learn from it
/// (a stop is an identity after autodiff, so `W h` is still shared with the forward pass).
fn recon_w_term(b: &mut GraphBuilder, wh: NodeIndex, recon_trains: ReconTrains) -> NodeIndex {
    match recon_trains {
        ReconTrains::Both => wh,
        ReconTrains::Inverse => b.stop_grad(wh),
    }
}

/// The graph output of layer `layer`'s mean reconstruction error (GECO specs).
pub fn geco_recon_output(layer: usize) -> String {
    format!("{GECO_RECON_PREFIX}{}", geco_layer_key(layer))
}

/// Names of the graph inputs fed each step.
pub const INPUT_X: &str = "x";
pub const INPUT_NOISE: &str = "noise";

/// Per-example and constant pieces of one flow's log-density.
struct FlowTerms {
    /// ln p(x) per example without the data-independent terms: `[B]`.
    logp_data: NodeIndex,
    /// Σ of the data-independent ln|det| terms (a scalar), if any layer has one.
    logdet_const: Option<NodeIndex>,
    /// Σ_k ‖R_k W_k h_k − h_k‖² per example (`[B]`), when asked for.
    recon: Option<NodeIndex>,
    /// The same per layer: `(layer index, Σ‖·‖² per example)`, for GECO's per-layer λ.
    recon_layers: Vec<(usize, NodeIndex)>,
}

/// The terms one flow's layers contribute, gathered in layer order.
#[derive(Default)]
struct FlowTermParts {
    /// Per-example log-det terms (`[B]`).
    data: Vec<NodeIndex>,
    /// Data-independent ln|det| terms (scalars).
    consts: Vec<NodeIndex>,
    /// Per-example reconstruction errors, and the same by layer index.
    recon: Vec<NodeIndex>,
    recon_layers: Vec<(usize, NodeIndex)>,
}

/// Where a layer sits in the flow being lowered, and how the flow is lowered.
#[derive(Clone, Copy)]
struct LayerAt {
    /// The layer's index in the spec.
    i: usize,
    /// Its input's size per example, and shape.
    d: usize,
    layer: LayerShape,
    batch: usize,
    inverse_model: bool,
    with_recon: bool,
    recon_trains: ReconTrains,
    learns_inverses: bool,
}

struct Lowering<'a> {
    spec: &'a FlowSpec,
    b: GraphBuilder,
    d: usize,
    batch: usize,
    /// Actnorm layers compute their translation and log-scale from the batch (data-dependent
    /// initialization) instead of reading their parameters, and record them in `init_outputs`.
    actnorm_from_data: bool,
    init_outputs: Vec<(String, NodeIndex)>,
}

/// The standard deviation floor of actnorm's data-dependent initialization: s = ln(std + ε).
pub const ACTNORM_EPS: f64 = 1e-6;

impl<'a> Lowering<'a> {
    fn new(spec: &'a FlowSpec, batch: usize, kind: &str) -> Self {
        Lowering {
            spec,
            b: GraphBuilder::new(&format!("{}.{kind}", spec.name)),
            d: spec.input.dim(),
            batch,
            actnorm_from_data: false,
            init_outputs: Vec::new(),
        }
    }

    fn batch_shape(&self) -> Shape {
        vec![self.d, self.batch]
    }

    /// Preprocessed input `h0` and its per-example log-det (`[B]`), if any.
    fn preprocess(&mut self) -> (NodeIndex, Option<NodeIndex>) {
        self.b.set_region(Region::Input);
        let shape = self.batch_shape();
        let x = self.b.input(INPUT_X, shape.clone());
        match self.spec.input.preprocess {
            Preprocess::None => (x, None),
            Preprocess::DequantizeLogit => {
                let b = &mut self.b;
                let alpha = self.spec.input.logit_alpha;
                // y = (x + u) / 256, s = α + (1 − 2α) y, h0 = ln s − ln(1 − s)
                let u = b.input(INPUT_NOISE, shape);
                let xu = b.add2(x, u);
                let y = b.scale(xu, 1.0 / 256.0);
                let sy = b.scale(y, 1.0 - 2.0 * alpha);
                let a = b.constant(alpha);
                let s = b.add2(a, sy);
                let one = b.constant(1.0);
                let one_minus_s = b.sub(one, s);
                let ln_s = b.unary(Unary::Log, s);
                let ln_1ms = b.unary(Unary::Log, one_minus_s);
                let h0 = b.sub(ln_s, ln_1ms);
                // log-det: Σ_d [−ln 256 + ln(1 − 2α) − ln s_d − ln(1 − s_d)]
                let both = b.add2(ln_s, ln_1ms);
                let per_ex = b.sum(both, Some(0));
                let neg = b.neg(per_ex);
                let c = b.constant(self.d as f64 * ((1.0 - 2.0 * alpha).ln() - 256f64.ln()));
                let ld = b.add2(neg, c);
                (h0, Some(ld))
            }
        }
    }

    /// The flow from `h0`: the f-flow, or with `inverse_model` the g-flow `R⁻¹ h + b`; each layer
    /// type is lowered by its own method below.
    fn flow(&mut self, h0: NodeIndex, inverse_model: bool, with_recon: bool) -> FlowTerms {
        // Every layer's activations are the flat batch [D_i, B] (D_i its input's size: a split
        // halves it); image layers reshape (a view).
        let batch = self.batch;
        let shapes = self.spec.layer_shapes();
        let recon_trains = self.spec.objective.recon_trains;
        let learns_inverses = self.spec.objective.gradient == GradientMode::SelfNormalizing;
        let mut h = h0;
        let mut terms = FlowTermParts::default();
        for (i, layer) in self.spec.layers.iter().enumerate() {
            self.b.set_region(Region::Layer(i));
            let at = LayerAt {
                i,
                d: shapes[i].numel(),
                layer: shapes[i],
                batch,
                inverse_model,
                with_recon,
                recon_trains,
                learns_inverses,
            };
            h = match layer {
                LayerSpec::Linear(l) => self.linear(l, h, &at, &mut terms),
                LayerSpec::Conv(c) => self.conv(c, h, &at, &mut terms),
                LayerSpec::Squeeze(_) => self.squeeze(h, &at),
                LayerSpec::Spline(sp) => self.spline(sp, h, &at, &mut terms),
                LayerSpec::Split(_) => self.split(h, &at, &mut terms),
                LayerSpec::AffineCoupling(a) => self.affine_coupling(a, h, &at, &mut terms),
                LayerSpec::Actnorm(_) => self.actnorm(h, &at, &mut terms),
                LayerSpec::SmoothLeakyRelu(a) => self.smooth_leaky_relu(a, h, &mut terms),
            };
        }
        // Base density: ln N(z) = −½‖z‖² − (D/2) ln 2π per example, D what is left after the
        // splits.
        let d = shapes.last().map_or(self.d, |s| s.numel());
        let b = &mut self.b;
        b.set_region(Region::Loss);
        let z2 = b.unary(Unary::Square, h);
        let zz = b.sum(z2, Some(0));
        let half = b.scale(zz, -0.5);
        let c = b.constant(-0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln());
        let mut logp = b.add2(half, c);
        for t in terms.data {
            logp = b.add2(logp, t);
        }
        FlowTerms {
            logp_data: logp,
            logdet_const: sum_all(b, terms.consts),
            recon: sum_all(b, terms.recon),
            recon_layers: terms.recon_layers,
        }
    }

    /// `z = W h + b` (or the g-flow's `R⁻¹ h + b`), its log-det and reconstruction term.
    fn linear(
        &mut self,
        l: &LinearSpec,
        h: NodeIndex,
        at: &LayerAt,
        terms: &mut FlowTermParts,
    ) -> NodeIndex {
        let b = &mut self.b;
        let LayerAt {
            i,
            d,
            inverse_model,
            ..
        } = *at;
        let shape = vec![at.d, at.batch];
        let (w, r) = learned_pair(b, at, vec![d, d], h, terms, |b, m, x| b.matmul(m, x));
        let const_terms = &mut terms.consts;
        let z = if inverse_model {
            let r_inv = b.inverse(r);
            let ld = b.logdet(r);
            const_terms.push(b.neg(ld));
            b.matmul(r_inv, h)
        } else {
            const_terms.push(b.logdet(w));
            b.matmul(w, h)
        };
        if l.bias {
            let bias = b.param(&param_name(i, ParamKind::Bias), vec![d]);
            let bb = b.broadcast(bias, shape.clone(), Some(1));
            b.add2(z, bb)
        } else {
            z
        }
    }

    /// The `C → C` convolution as a flat-batch op, its Toeplitz log-det and reconstruction term.
    fn conv(
        &mut self,
        c: &ConvSpec,
        h: NodeIndex,
        at: &LayerAt,
        terms: &mut FlowTermParts,
    ) -> NodeIndex {
        let b = &mut self.b;
        let LayerAt {
            i,
            batch,
            inverse_model,
            ..
        } = *at;
        let shape = vec![at.d, at.batch];
        let (ch, hh, ww) = at.layer.image();
        let k = c.kernel_size;
        let image = vec![ch, hh, ww, batch];
        // conv(K) applied to a flat batch [C·H·W, B]: free reshapes around conv2d.
        let conv = |b: &mut GraphBuilder, x: NodeIndex, kernel: NodeIndex| {
            let img = b.add(Op::Reshape { to: image.clone() }, &[x]);
            let y = b.add(Op::Conv2d, &[img, kernel]);
            b.add(Op::Reshape { to: shape.clone() }, &[y])
        };
        let (w, r) = learned_pair(b, at, vec![ch, ch, k, k], h, terms, |b, k, x| conv(b, x, k));
        let const_terms = &mut terms.consts;
        let z = if inverse_model {
            // g⁻¹(h) = T(r)⁻¹ h: the exact inverse of the learned inverse conv.
            let t = b.add(Op::Toeplitz { h: hh, w: ww }, &[r]);
            let t_inv = b.inverse(t);
            let ld = b.logdet(t);
            const_terms.push(b.neg(ld));
            b.matmul(t_inv, h)
        } else {
            let t = b.add(Op::Toeplitz { h: hh, w: ww }, &[w]);
            const_terms.push(b.logdet(t));
            conv(b, h, w)
        };
        if c.bias {
            let bb = channel_bias(b, i, ch, hh * ww, batch);
            b.add2(z, bb)
        } else {
            z
        }
    }

    /// Space-to-depth: a permutation, log-det 0.
    fn squeeze(&mut self, h: NodeIndex, at: &LayerAt) -> NodeIndex {
        let b = &mut self.b;
        let LayerAt { batch, .. } = *at;
        let shape = vec![at.d, at.batch];
        let (ch, hh, ww) = at.layer.image();
        // [C, H/2, 2, W/2, 2, B] → [C, 2, 2, H/2, W/2, B]: a permutation, log-det 0.
        let split = b.add(
            Op::Reshape {
                to: vec![ch, hh / 2, 2, ww / 2, 2, batch],
            },
            &[h],
        );
        let moved = b.add(
            Op::Permute {
                perm: vec![0, 2, 4, 1, 3, 5],
            },
            &[split],
        );
        b.add(Op::Reshape { to: shape.clone() }, &[moved])
    }

    /// The rational-quadratic spline and its per-example log-det.
    fn spline(
        &mut self,
        sp: &SplineSpec,
        h: NodeIndex,
        at: &LayerAt,
        terms: &mut FlowTermParts,
    ) -> NodeIndex {
        let b = &mut self.b;
        let LayerAt { i, d, .. } = *at;
        let data_terms = &mut terms.data;
        let ld = spline_part(b, sp, i, d, h, SplinePart::LogDet);
        data_terms.push(b.sum(ld, Some(0)));
        spline_part(b, sp, i, d, h, SplinePart::Value)
    }

    /// Half the channels leave the flow under N(0, I); the other half goes on.
    fn split(&mut self, mut h: NodeIndex, at: &LayerAt, terms: &mut FlowTermParts) -> NodeIndex {
        let b = &mut self.b;
        let LayerAt { d, batch, .. } = *at;
        let data_terms = &mut terms.data;
        // The second half of the channels leaves the flow under N(0, I); the first
        // goes on. In the flat (c, h, w) order the halves are the two row blocks.
        let halves = b.add(
            Op::Reshape {
                to: vec![2, d / 2, batch],
            },
            &[h],
        );
        let out = b.add(Op::Take { axis: 0, index: 1 }, &[halves]);
        h = b.add(Op::Take { axis: 0, index: 0 }, &[halves]);
        let sq = b.unary(Unary::Square, out);
        let ss = b.sum(sq, Some(0));
        let half = b.scale(ss, -0.5);
        let c = b.constant(-0.25 * d as f64 * (2.0 * std::f64::consts::PI).ln());
        data_terms.push(b.add2(half, c));
        h
    }

    /// Glow's affine coupling: a conv network of one half scales and shifts the other.
    fn affine_coupling(
        &mut self,
        a: &AffineCouplingSpec,
        mut h: NodeIndex,
        at: &LayerAt,
        terms: &mut FlowTermParts,
    ) -> NodeIndex {
        let b = &mut self.b;
        let LayerAt { i, batch, .. } = *at;
        let shape = vec![at.d, at.batch];
        let data_terms = &mut terms.data;
        let (c, hh, ww) = at.layer.image();
        let c2 = c / 2;
        let params = coupling_param_nodes(b, i, c, a.width);
        let halves = b.add(
            Op::Reshape {
                to: vec![2, c2, hh, ww, batch],
            },
            &[h],
        );
        let x1 = b.add(Op::Take { axis: 0, index: 0 }, &[halves]);
        let x2 = b.add(Op::Take { axis: 0, index: 1 }, &[halves]);
        let (log_s, t) = coupling_scale_shift(b, &params, x1, [c, hh, ww, batch], a.width);
        let s = b.unary(Unary::Exp, log_s);
        let scaled = b.mul(x2, s);
        let z2 = b.add2(scaled, t);
        let first = b.add(
            Op::Embed {
                axis: 0,
                index: 0,
                size: 2,
            },
            &[x1],
        );
        let second = b.add(
            Op::Embed {
                axis: 0,
                index: 1,
                size: 2,
            },
            &[z2],
        );
        let joined = b.add2(first, second);
        h = b.add(Op::Reshape { to: shape.clone() }, &[joined]);
        let ld = b.add(
            Op::ReduceSum {
                axes: vec![0, 1, 2],
            },
            &[log_s],
        );
        data_terms.push(ld);
        h
    }

    /// Per-channel `(x − t)·exp(−s)`, with t and s from the batch during the data-dependent
    /// initialization.
    fn actnorm(&mut self, mut h: NodeIndex, at: &LayerAt, terms: &mut FlowTermParts) -> NodeIndex {
        let b = &mut self.b;
        let LayerAt { i, batch, .. } = *at;
        let shape = vec![at.d, at.batch];
        let data_terms = &mut terms.data;
        let (c, hw) = at.layer.channels();
        let grid = vec![c, hw, batch];
        let per_channel = |b: &mut GraphBuilder, v: NodeIndex| per_channel(b, v, &grid);
        let x = b.add(Op::Reshape { to: grid.clone() }, &[h]);
        let (t, s) = if self.actnorm_from_data {
            // t = mean, s = ln(std + ε) per channel over the positions and batch.
            let n = (hw * batch) as f64;
            let sum = b.add(Op::ReduceSum { axes: vec![1, 2] }, &[x]);
            let t = b.scale(sum, 1.0 / n);
            let tt = per_channel(b, t);
            let centered = b.sub(x, tt);
            let sq = b.unary(Unary::Square, centered);
            let ss = b.add(Op::ReduceSum { axes: vec![1, 2] }, &[sq]);
            let var = b.scale(ss, 1.0 / n);
            // std = exp(½ ln var): 0 for a constant channel, which ε keeps finite.
            let log_var = b.unary(Unary::Log, var);
            let half = b.scale(log_var, 0.5);
            let std = b.unary(Unary::Exp, half);
            let eps = b.constant(ACTNORM_EPS);
            let std_eps = b.add2(std, eps);
            let s = b.unary(Unary::Log, std_eps);
            let out = &mut self.init_outputs;
            out.push((param_name(i, ParamKind::ActnormTranslation), t));
            out.push((param_name(i, ParamKind::ActnormLogScale), s));
            out.push((format!("layers.{i}.variance"), var));
            (t, s)
        } else {
            (
                b.param(&param_name(i, ParamKind::ActnormTranslation), vec![c]),
                b.param(&param_name(i, ParamKind::ActnormLogScale), vec![c]),
            )
        };
        let tt = per_channel(b, t);
        let centered = b.sub(x, tt);
        let neg_s = b.neg(s);
        let inv_scale = b.unary(Unary::Exp, neg_s);
        let ss = per_channel(b, inv_scale);
        let y = b.mul(centered, ss);
        h = b.add(Op::Reshape { to: shape.clone() }, &[y]);
        // log-det −H·W·Σ s, the same for every example (cheap: kept per example,
        // so it is part of the reported loss and of the evaluation graph).
        let total = b.add(Op::ReduceSum { axes: vec![0] }, &[s]);
        let ld = b.scale(total, -(hw as f64));
        data_terms.push(b.broadcast(ld, vec![batch], None));
        h
    }

    /// `s(z) = αz + (1−α) softplus(z)` and its log-derivative.
    fn smooth_leaky_relu(
        &mut self,
        a: &SmoothLeakyReluSpec,
        h: NodeIndex,
        terms: &mut FlowTermParts,
    ) -> NodeIndex {
        let b = &mut self.b;
        let data_terms = &mut terms.data;
        let alpha = a.alpha;
        // s(z) = αz + (1−α) softplus(z); ln s'(z) = ln(α + (1−α) σ(z))
        let az = b.scale(h, alpha);
        let sp = b.unary(Unary::Softplus, h);
        let bsp = b.scale(sp, 1.0 - alpha);
        let sig = b.unary(Unary::Sigmoid, h);
        let bsig = b.scale(sig, 1.0 - alpha);
        let ac = b.constant(alpha);
        let deriv = b.add2(ac, bsig);
        let ln_deriv = b.unary(Unary::Log, deriv);
        data_terms.push(b.sum(ln_deriv, Some(0)));
        b.add2(az, bsp)
    }
}

/// A layer's W and R as parameters of `param_shape`, declared an inverse pair where R is learned
/// (an exact spec has no R to pair), and, when the flow asks for it, the layer's reconstruction
/// term ‖R W h − h‖² with h gradient-stopped, `apply(b, K, x)` being the layer's product `K x`.
fn learned_pair(
    b: &mut GraphBuilder,
    at: &LayerAt,
    param_shape: Shape,
    h: NodeIndex,
    terms: &mut FlowTermParts,
    apply: impl Fn(&mut GraphBuilder, NodeIndex, NodeIndex) -> NodeIndex,
) -> (NodeIndex, NodeIndex) {
    let (w_name, r_name) = (
        param_name(at.i, ParamKind::Weight),
        param_name(at.i, ParamKind::WeightInv),
    );
    let w = b.param(&w_name, param_shape.clone());
    let r = b.param(&r_name, param_shape);
    if at.learns_inverses {
        b.declare_inverse_pair(&w_name, &r_name);
    }
    if at.with_recon {
        let hs = b.stop_grad(h);
        let wh = apply(b, w, hs);
        let wh = recon_w_term(b, wh, at.recon_trains);
        let rwh = apply(b, r, wh);
        let e = b.sub(rwh, hs);
        let e2 = b.unary(Unary::Square, e);
        let error = b.sum(e2, Some(0));
        terms.recon.push(error);
        terms.recon_layers.push((at.i, error));
    }
    (w, r)
}

/// Part `part` of layer `i`'s spline (`d` elements) of `h`: its value, log-derivative or
/// inverse, with the layer's widths, heights and derivatives as operands.
pub(crate) fn spline_part(
    b: &mut GraphBuilder,
    sp: &SplineSpec,
    i: usize,
    d: usize,
    h: NodeIndex,
    part: SplinePart,
) -> NodeIndex {
    let params: Vec<NodeIndex> = [
        (ParamKind::SplineWidths, sp.bins),
        (ParamKind::SplineHeights, sp.bins),
        (ParamKind::SplineDerivatives, sp.bins - 1),
    ]
    .into_iter()
    .map(|(kind, k)| b.param(&param_name(i, kind), vec![d, k]))
    .collect();
    let op = Op::Spline {
        bins: sp.bins,
        bound: sp.tail_bound.to_bits(),
        part,
    };
    b.add(op, &[h, params[0], params[1], params[2]])
}

/// A `[C]` vector repeated over the positions and examples of `grid` = `[C, H·W, B]`.
pub(crate) fn per_channel(b: &mut GraphBuilder, v: NodeIndex, grid: &[usize]) -> NodeIndex {
    b.add(
        Op::Expand {
            to: grid.to_vec(),
            axes: vec![1, 2],
        },
        &[v],
    )
}

/// Layer `i`'s bias of `ch` channels, each repeated over its `positions` pixels of every example:
/// the flat batch `[ch·positions, batch]` a conv layer adds.
pub(crate) fn channel_bias(
    b: &mut GraphBuilder,
    i: usize,
    ch: usize,
    positions: usize,
    batch: usize,
) -> NodeIndex {
    let bias = b.param(&param_name(i, ParamKind::Bias), vec![ch]);
    let per_channel = b.add(
        Op::Expand {
            to: vec![ch, positions, batch],
            axes: vec![1, 2],
        },
        &[bias],
    );
    b.add(
        Op::Reshape {
            to: vec![ch * positions, batch],
        },
        &[per_channel],
    )
}

/// The parameters of layer `i`'s affine coupling network, in [`coupling_params`] order.
pub(crate) fn coupling_param_nodes(
    b: &mut GraphBuilder,
    i: usize,
    c: usize,
    width: usize,
) -> Vec<NodeIndex> {
    coupling_params(c, width)
        .into_iter()
        .map(|(kind, s)| b.param(&param_name(i, kind), s))
        .collect()
}

/// The coupling network of Glow's affine coupling: from the conditioning half `x1`
/// `[C/2, H, W, B]`, `(log_s, t)`, each `[C/2, H, W, B]` (a conv network whose last layer's
/// gain is exp(3·logs); even output channels scale, odd ones shift, and log_s = 2 tanh(raw/2)).
/// The forward flow and the sampling graph both build it here.
pub(crate) fn coupling_scale_shift(
    b: &mut GraphBuilder,
    params: &[NodeIndex],
    x1: NodeIndex,
    [c, hh, ww, batch]: [usize; 4],
    width: usize,
) -> (NodeIndex, NodeIndex) {
    let c2 = c / 2;
    // conv + per-channel bias on [C_in, H, W, B] → [C_out, H, W, B].
    let conv_bias = |b: &mut GraphBuilder, x, k, bias, cout: usize| {
        let y = b.add(Op::Conv2d, &[x, k]);
        let bb = b.add(
            Op::Expand {
                to: vec![cout, hh, ww, batch],
                axes: vec![1, 2, 3],
            },
            &[bias],
        );
        b.add2(y, bb)
    };
    let a0 = conv_bias(b, x1, params[0], params[1], width);
    let r0 = b.unary(Unary::Relu, a0);
    let a1 = conv_bias(b, r0, params[2], params[3], width);
    let r1 = b.unary(Unary::Relu, a1);
    let a2 = conv_bias(b, r1, params[4], params[5], c);
    let logs3 = b.scale(params[6], 3.0);
    let gain = b.unary(Unary::Exp, logs3);
    let gain = b.add(
        Op::Expand {
            to: vec![c, hh, ww, batch],
            axes: vec![1, 2, 3],
        },
        &[gain],
    );
    let net = b.mul(a2, gain);
    // Even channels scale, odd channels shift.
    let pairs = b.add(
        Op::Reshape {
            to: vec![c2, 2, hh, ww, batch],
        },
        &[net],
    );
    let raw = b.add(Op::Take { axis: 1, index: 0 }, &[pairs]);
    let t = b.add(Op::Take { axis: 1, index: 1 }, &[pairs]);
    let half = b.scale(raw, 0.5);
    let th = b.unary(Unary::Tanh, half);
    (b.scale(th, 2.0), t)
}

fn sum_all(b: &mut GraphBuilder, terms: Vec<NodeIndex>) -> Option<NodeIndex> {
    terms.into_iter().reduce(|acc, t| b.add2(acc, t))
}

/// The exact training graph at batch size `batch`: outputs `loss`, `objective`, `nll_data`
/// (−mean ln p^f without Σ ln|det W|: the training NLL once the parameters' log-dets are
/// added), `recon` (self-normalizing only) and `grad.<param>` for every parameter the objective
/// depends on.
/// Gradients are exact (they contain `inverse` nodes); the self-normalizing substitution is the
/// job of [`crate::rewrite`].
pub fn train_graph(spec: &FlowSpec, batch: usize) -> Graph {
    let mut lw = Lowering::new(spec, batch, "train");
    let (h0, pre_ld) = lw.preprocess();
    let snf = spec.objective.gradient == GradientMode::SelfNormalizing;
    let f = lw.flow(h0, false, snf);
    let bsz = batch as f64;
    let (loss, objective, recon, nll_data) = if snf {
        let g = lw.flow(h0, true, false);
        let b = &mut lw.b;
        // −mean ln p^f without Σ ln|det W| (the f-flow's data terms alone, what the exact
        // likelihood adds the parameters' log-dets to).
        let f_lp = match pre_ld {
            Some(p) => b.add2(f.logp_data, p),
            None => f.logp_data,
        };
        let f_total = b.sum(f_lp, None);
        let nll_data = b.scale(f_total, -1.0 / bsz);
        let mut lp = b.add2(f.logp_data, g.logp_data);
        if let Some(p) = pre_ld {
            // Both densities include the preprocessing log-det.
            let p2 = b.scale(p, 2.0);
            lp = b.add2(lp, p2);
        }
        let total = b.sum(lp, None);
        let mut loss = b.scale(total, -0.5 / bsz);
        let recon = f.recon.map(|r| {
            let total = b.sum(r, None);
            b.scale(total, 1.0 / bsz)
        });
        match spec.objective.lambda {
            Lambda::Fixed(lambda) => {
                if let Some(r) = recon {
                    if lambda != 0.0 {
                        let lr = b.scale(r, lambda);
                        loss = b.add2(loss, lr);
                    }
                }
            }
            // GECO: λ_k an input, each layer's mean reconstruction error reported, and the
            // step's update of λ_k and of the error's EMA computed in the graph: outputs
            // `next.*`, carried into the inputs on the device (see `carried_input`).
            Lambda::Geco { geco } => {
                let ema_weight = b.input(GECO_EMA_WEIGHT_INPUT, vec![]);
                for (k, r) in &f.recon_layers {
                    let total = b.sum(*r, None);
                    let mean = b.scale(total, 1.0 / bsz);
                    b.output(&geco_recon_output(*k), mean);
                    let lambda = b.input(&geco_lambda_input(*k), vec![]);
                    let weighted = b.mul(lambda, mean);
                    loss = b.add2(loss, weighted);
                    let ema = b.input(&geco_ema_input(*k), vec![]);
                    let (lambda_next, ema_next) =
                        geco_update(b, &geco, lambda, ema, ema_weight, mean);
                    b.output(&next_output(&geco_lambda_input(*k)), lambda_next);
                    b.output(&next_output(&geco_ema_input(*k)), ema_next);
                }
            }
        }
        let consts = sum_all(
            b,
            f.logdet_const.into_iter().chain(g.logdet_const).collect(),
        );
        let objective = match consts {
            Some(c) => {
                let hc = b.scale(c, -0.5);
                b.add2(loss, hc)
            }
            None => loss,
        };
        (loss, objective, recon, nll_data)
    } else {
        let b = &mut lw.b;
        let mut lp = f.logp_data;
        if let Some(p) = pre_ld {
            lp = b.add2(lp, p);
        }
        let total = b.sum(lp, None);
        let loss = b.scale(total, -1.0 / bsz);
        let objective = match f.logdet_const {
            Some(c) => b.sub(loss, c),
            None => loss,
        };
        (loss, objective, None, loss)
    };
    let params: Vec<(String, NodeIndex)> = parameters(spec)
        .into_iter()
        .map(|p| {
            let n = lw.b.param(&p.name, p.shape.clone());
            (p.name, n)
        })
        .collect();
    let wrt: Vec<NodeIndex> = params.iter().map(|(_, n)| *n).collect();
    let grads = autodiff::gradients(&mut lw.b, objective, &wrt);
    let b = &mut lw.b;
    b.output("loss", loss);
    b.output("objective", objective);
    b.output("nll_data", nll_data);
    if let Some(r) = recon {
        b.output("recon", r);
    }
    for ((name, _), g) in params.iter().zip(grads) {
        if let Some(g) = g {
            b.output(&format!("grad.{name}"), g);
        }
    }
    // The training graph is a program of values: the stop_grad markers have done their job in
    // autodiff and become identities (so `W h_k` in the reconstruction is the forward product).
    autodiff::strip_stop_grad(&lw.b.finish())
}

/// The data-dependent initialization of a spec's actnorm layers on one batch: the f-flow
/// forward, in which every actnorm layer computes its translation (the per-channel mean of its
/// input) and log-scale (ln(std + ε)) from the batch and applies them, so later layers see
/// normalized inputs. Outputs `layers.{i}.translation`, `layers.{i}.log_scale` and
/// `layers.{i}.variance` for each actnorm layer `i` (none without actnorm layers).
pub fn actnorm_init_graph(spec: &FlowSpec, batch: usize) -> Graph {
    let mut lw = Lowering::new(spec, batch, "actnorm_init");
    lw.actnorm_from_data = true;
    let (h0, _) = lw.preprocess();
    lw.flow(h0, false, false);
    for (name, n) in std::mem::take(&mut lw.init_outputs) {
        lw.b.output(&name, n);
    }
    lw.b.finish()
}

/// The evaluation graph: `logp_data` per example (`[B]`, exact ln p^f without Σ ln|det W|, which
/// the runtime adds once per evaluation, paper eq. 7) and, for self-normalizing specs, `recon`
/// per example (`[B]`).
pub fn eval_graph(spec: &FlowSpec, batch: usize) -> Graph {
    let mut lw = Lowering::new(spec, batch, "eval");
    let (h0, pre_ld) = lw.preprocess();
    let snf = spec.objective.gradient == GradientMode::SelfNormalizing;
    let f = lw.flow(h0, false, snf);
    let b = &mut lw.b;
    let lp = match pre_ld {
        Some(p) => b.add2(f.logp_data, p),
        None => f.logp_data,
    };
    b.output("logp_data", lp);
    if let Some(r) = f.recon {
        b.output("recon", r);
    }
    autodiff::strip_stop_grad(&lw.b.finish())
}
