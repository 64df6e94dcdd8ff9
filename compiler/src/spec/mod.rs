//! The flow spec: a JSON declaration of a self-normalizing flow, its objective
//! and its training setup.
//!
//! ```json
//! {
//!   "name": "mnist_fc2",
//!   "input": {"shape": [784], "preprocess": "dequantize_logit"},
//!   "layers": [
//!     {"type": "linear", "bias": true},
//!     {"type": "smooth_leaky_relu", "alpha": 0.3},
//!     {"type": "linear", "bias": true}
//!   ],
//!   "objective": {"gradient": "self_normalizing", "lambda": 1.0},
//!   "train": {"batch_size": 100, "epochs": 100, "warmup_epochs": 10, "seed": 0,
//!             "optimizer": {"adam": {"lr": 1e-4, "betas": [0.9, 0.999]}}}
//! }
//! ```
//!
//! [`parse_spec`] / [`load_spec`] check the structure of the JSON themselves
//! (walking a [`serde_json::Value`]) so that every problem — unknown field,
//! wrong type, missing field, unknown layer type or enum string — is reported
//! with the exact JSON pointer of the offending spot, and all problems of a file
//! are reported at once. Semantic checks (ranges, non-empty lists) live in
//! [`FlowSpec::validate`], which the builder also runs.
//!
//! The types also derive `serde::Deserialize` with the same defaults, so
//! `serde_json::from_str::<FlowSpec>` accepts exactly the same valid specs
//! (without validation and with less precise error locations).

mod builder;
mod errors;
mod validate;
mod walk;

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use builder::FlowSpecBuilder;
pub use errors::{SpecError, SpecErrors};
pub use walk::LAYER_TYPES;

/// A complete flow declaration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FlowSpec {
    /// Name of the flow; must not be empty.
    pub name: String,
    /// What the flow is trained on.
    pub input: InputSpec,
    /// The layers, applied in order from data to latent; must not be empty.
    pub layers: Vec<LayerSpec>,
    /// The training objective (default: self-normalizing, λ = 1).
    #[serde(default)]
    pub objective: ObjectiveSpec,
    /// The training setup (defaults follow the paper's MNIST setup).
    #[serde(default)]
    pub train: TrainSpec,
}

/// The most elements any tensor of a training step may have (a parameter, a batch of
/// activations, a coupling network's hidden maps): 2^40, 8 TiB in f64 — beyond any machine,
/// and small enough that no size, byte count or FLOP count computed from shapes overflows.
pub const MAX_TENSOR_ELEMENTS: usize = 1 << 40;

/// Default α of the logit transform.
pub const DEFAULT_LOGIT_ALPHA: f64 = 1e-6;

fn default_logit_alpha() -> f64 {
    DEFAULT_LOGIT_ALPHA
}

/// The data the flow models.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InputSpec {
    /// Shape of one sample (without the batch dimension); every entry ≥ 1.
    pub shape: Vec<usize>,
    /// How raw data is turned into the flow's input.
    pub preprocess: Preprocess,
    /// α of the logit transform s = α + (1-2α) y; default 1e-6; must be in (0, 0.5)
    #[serde(default = "default_logit_alpha")]
    pub logit_alpha: f64,
}

impl InputSpec {
    /// Number of scalars in one sample: the product of `shape`
    /// (saturating; [`FlowSpec::validate`] rejects shapes whose product overflows).
    pub fn dim(&self) -> usize {
        self.shape
            .iter()
            .fold(1usize, |acc, &d| acc.saturating_mul(d))
    }
}

/// Preprocessing of the raw input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Preprocess {
    /// Uniform dequantization of 8-bit pixels, scaling to [0, 1] and the logit
    /// transform with `logit_alpha` (the transform's log-det is accounted for).
    DequantizeLogit,
    /// The data is used as is.
    None,
}

/// One layer of the flow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum LayerSpec {
    /// A square (self-normalizing) linear layer `z = W x + b`.
    Linear(LinearSpec),
    /// The elementwise smooth leaky ReLU activation.
    SmoothLeakyRelu(SmoothLeakyReluSpec),
    /// A self-normalizing convolution `C → C` on an image input `[C, H, W]`.
    Conv(ConvSpec),
    /// Space-to-depth: `[C, H, W] → [4C, H/2, W/2]` (log-det 0).
    Squeeze(SqueezeSpec),
    /// The rational-quadratic spline activation with per-element parameters.
    Spline(SplineSpec),
    /// Per-channel affine normalization `y = (x − t)·exp(−s)` (Glow), initialized from the
    /// first training batch.
    Actnorm(ActnormSpec),
    /// Glow's affine coupling: a conv network of the first half of the channels scales and
    /// shifts the second half.
    AffineCoupling(AffineCouplingSpec),
    /// Multiscale: the second half of the channels leaves the flow, scored under N(0, I).
    Split(SplitSpec),
}

/// Factor out half of an image's channels (Glow's multiscale architecture): `[C, H, W] →
/// [C/2, H, W]`; the second half `[C/2, H, W]` is scored under N(0, I) and joins the latent
/// (the latent of a flow with splits lists the final output first, then each factored half,
/// from the last split to the first).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {}

/// Glow's affine coupling on an image `[C, H, W]` (C even): x1 = the first C/2 channels, x2 the
/// rest; h = conv3×3(x1; `net.0`) → ReLU → conv1×1(`net.1`) → ReLU → conv3×3(`net.2`)·exp(3·
/// `net.2.logs`) (per output channel, `C` of them; zero padding "same", each conv with a bias);
/// log_s = 2·tanh(h[0::2] / 2), t = h[1::2]; output [x1, x2·exp(log_s) + t]; log-det Σ log_s.
/// `net.2.*` start at zero, so a fresh coupling is the identity.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffineCouplingSpec {
    /// Channels of the network's hidden layers (Glow: 512).
    pub width: usize,
}

/// Glow's activation normalization: per channel (per element of a flat input),
/// `y = (x − t)·exp(−s)` with `layers.{i}.translation` (t) and `layers.{i}.log_scale` (s), both
/// `[C]`; log-det `−H·W·Σ s`. Data-dependent initialization: before the first training step,
/// t and s are set from the first batch so that y has zero mean and unit standard deviation per
/// channel (s = ln(std + 1e-6)).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActnormSpec {}

/// A rational-quadratic spline activation (Durkan et al. 2019): `bins` bins on
/// `[−tail_bound, tail_bound]`, identity (linear tails) outside, parameters per element of the
/// layer's input (`widths`, `heights` `[D, K]`, `derivatives` `[D, K−1]`, unnormalized).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplineSpec {
    /// Number of bins K (default 5).
    #[serde(default = "default_bins")]
    pub bins: usize,
    /// Tail bound B (default 10).
    #[serde(default = "default_tail_bound")]
    pub tail_bound: f64,
}

fn default_bins() -> usize {
    5
}

fn default_tail_bound() -> f64 {
    10.0
}

impl Default for SplineSpec {
    fn default() -> Self {
        SplineSpec {
            bins: default_bins(),
            tail_bound: default_tail_bound(),
        }
    }
}

/// A self-normalizing convolution: `z = w ⋆ h + b`, learned inverse `h = r ⋆ (z − b)`, both
/// `C → C` with the same odd kernel size, stride 1 and zero padding (K − 1)/2 (PyTorch's
/// `conv2d`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConvSpec {
    /// Kernel size K (odd).
    pub kernel_size: usize,
    /// Whether the layer has a per-channel bias (default true).
    #[serde(default = "default_true")]
    pub bias: bool,
}

/// Space-to-depth as the reference code's `space_to_depth`: view `[C, H/2, 2, W/2, 2]`,
/// permute to `[C, 2, 2, H/2, W/2]`, reshape to `[4C, H/2, W/2]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SqueezeSpec {}

/// The per-example shape a layer sees: an image `[C, H, W]` or a flat vector `[D]`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LayerShape {
    Image { c: usize, h: usize, w: usize },
    Flat(usize),
}

impl LayerShape {
    /// `(C, H, W)` of an image shape. Only for layers that validation guarantees an image
    /// input (conv, squeeze): a flat shape here is a compiler bug.
    #[track_caller]
    pub fn image(self) -> (usize, usize, usize) {
        match self {
            LayerShape::Image { c, h, w } => (c, h, w),
            LayerShape::Flat(d) => {
                panic!("snfc internal error: an image layer got the flat input [{d}]")
            }
        }
    }

    /// Elements of one example (saturating: [`FlowSpec::validate`] rejects a spec whose sizes
    /// overflow, but it computes them first).
    pub fn numel(self) -> usize {
        match self {
            LayerShape::Image { c, h, w } => c.saturating_mul(h).saturating_mul(w),
            LayerShape::Flat(d) => d,
        }
    }

    /// `(channels, positions per channel)`: `(C, H·W)` of an image, `(D, 1)` of a flat vector
    /// (each element its own channel), for per-channel layers such as actnorm.
    pub fn channels(self) -> (usize, usize) {
        match self {
            LayerShape::Image { c, h, w } => (c, h.saturating_mul(w)),
            LayerShape::Flat(d) => (d, 1),
        }
    }
}

impl std::fmt::Display for LayerShape {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LayerShape::Image { c, h, w } => write!(f, "[{c}, {h}, {w}]"),
            LayerShape::Flat(d) => write!(f, "[{d}]"),
        }
    }
}

fn default_true() -> bool {
    true
}

/// A square linear layer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinearSpec {
    /// Whether the layer has a bias (default true).
    #[serde(default = "default_true")]
    pub bias: bool,
    /// Initialization of the weight (default identity plus noise).
    #[serde(default)]
    pub init: LinearInit,
}

impl Default for LinearSpec {
    fn default() -> Self {
        LinearSpec {
            bias: true,
            init: LinearInit::default(),
        }
    }
}

/// Initialization of a linear layer's weight.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LinearInit {
    /// W = I + Xavier-normal noise, gain 0.01 (paper A.3)
    #[default]
    IdentityNoise,
    /// W = I exactly
    Identity,
}

/// Default negative slope of the smooth leaky ReLU.
pub const DEFAULT_SLRELU_ALPHA: f64 = 0.3;

fn default_slrelu_alpha() -> f64 {
    DEFAULT_SLRELU_ALPHA
}

/// The smooth leaky ReLU activation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SmoothLeakyReluSpec {
    /// Negative slope; default 0.3, must be in (0, 1).
    #[serde(default = "default_slrelu_alpha")]
    pub alpha: f64,
}

impl Default for SmoothLeakyReluSpec {
    fn default() -> Self {
        SmoothLeakyReluSpec {
            alpha: DEFAULT_SLRELU_ALPHA,
        }
    }
}

/// The training objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ObjectiveSpec {
    /// How the gradient of the log-likelihood is computed (default self-normalizing).
    pub gradient: GradientMode,
    /// Weight of the reconstruction term: a number (default 1.0, finite and ≥ 0) or GECO.
    pub lambda: Lambda,
    /// Which parameters the reconstruction term trains (default both W and R, as eq. 3).
    #[serde(skip_serializing_if = "ReconTrains::is_both")]
    pub recon_trains: ReconTrains,
}

impl Default for ObjectiveSpec {
    fn default() -> Self {
        ObjectiveSpec {
            gradient: GradientMode::SelfNormalizing,
            lambda: Lambda::Fixed(1.0),
            recon_trains: ReconTrains::Both,
        }
    }
}

/// The parameters the reconstruction error ‖R W h − h‖² sends gradients to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconTrains {
    /// W and R (paper eq. 3): the constraint also pulls W off the likelihood's path.
    #[default]
    Both,
    /// R only (the reference code's `only_R_recon`): W h is held fixed in the reconstruction,
    /// so W follows the (approximate) likelihood gradient alone and R tracks W⁻¹.
    Inverse,
}

impl ReconTrains {
    pub fn is_both(&self) -> bool {
        *self == ReconTrains::Both
    }
}

/// The reconstruction weight λ: fixed, or adapted per layer by GECO.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Lambda {
    Fixed(f64),
    Geco { geco: GecoSpec },
}

impl Lambda {
    /// λ at the start of training (the fixed value, or GECO's λ₀).
    pub fn initial(&self) -> f64 {
        match self {
            Lambda::Fixed(v) => *v,
            Lambda::Geco { geco } => geco.lambda0,
        }
    }

    pub fn geco(&self) -> Option<&GecoSpec> {
        match self {
            Lambda::Geco { geco } => Some(geco),
            Lambda::Fixed(_) => None,
        }
    }
}

/// GECO (paper A.5; Rezende & Viola 2018): one λ per self-normalizing layer, updated after each
/// step from that layer's reconstruction error r: `EMA ← ema·EMA + (1 − ema)·r` (the first
/// step sets EMA = r), `λ ← λ·exp(lr·(EMA − kappa))`. With `kappa` = 0 λ only grows, as in the
/// reference code. `min` and `max`, when given, bound λ after every update: without a ceiling
/// one reconstruction spike can raise λ by e^40 within an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GecoSpec {
    #[serde(default = "default_geco_lambda0")]
    pub lambda0: f64,
    #[serde(default = "default_geco_lr")]
    pub lr: f64,
    #[serde(default = "default_geco_ema")]
    pub ema: f64,
    #[serde(default)]
    pub kappa: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
}

impl GecoSpec {
    /// λ after one GECO update from the reconstruction EMA, kept between `min` and `max`.
    pub fn updated(&self, lambda: f64, ema: f64) -> f64 {
        let next = lambda * (self.lr * (ema - self.kappa)).exp();
        let next = self.min.map_or(next, |lo| next.max(lo));
        self.max.map_or(next, |hi| next.min(hi))
    }
}

fn default_geco_lambda0() -> f64 {
    1.0
}
fn default_geco_lr() -> f64 {
    1e-3
}
fn default_geco_ema() -> f64 {
    0.9
}

impl Default for GecoSpec {
    fn default() -> Self {
        GecoSpec {
            lambda0: default_geco_lambda0(),
            lr: default_geco_lr(),
            ema: default_geco_ema(),
            kappa: 0.0,
            min: None,
            max: None,
        }
    }
}

/// How the gradient of the log-determinant is obtained.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum GradientMode {
    /// Self-normalizing: the learned inverse replaces W^{-T}.
    #[default]
    SelfNormalizing,
    /// Exact gradient of log|det W|.
    Exact,
}

/// The training setup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TrainSpec {
    /// Samples per step; default 100, must be ≥ 1.
    pub batch_size: usize,
    /// Training epochs; default 100, must be ≥ 1.
    pub epochs: usize,
    /// Learning-rate warmup epochs; default 10 (may exceed `epochs`).
    pub warmup_epochs: usize,
    /// Random seed; default 0.
    pub seed: u64,
    /// The optimizer (default Adam with the paper's settings).
    pub optimizer: OptimizerSpec,
    /// Clip the gradient by its global norm to at most this (> 0) before each optimizer step;
    /// none by default (the reference code uses 10,000 for CIFAR Glow).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grad_clip_norm: Option<f64>,
    /// Augmentation of training batches (image inputs); none by default.
    #[serde(default, skip_serializing_if = "Augment::is_none")]
    pub augment: Augment,
}

/// Augmentation of the training batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Augment {
    #[default]
    None,
    /// The reference code's for Glow on MNIST: reflect-pad each image by 1 pixel, then crop it
    /// back to its size at a random offset (0 to 2 in each direction).
    PadCrop,
    /// Mirror each image left to right with probability ½.
    Hflip,
    /// `hflip`, then `pad_crop`: the paper's CIFAR-10 recipe (random horizontal flips and
    /// 1-pixel jitter).
    HflipPadCrop,
}

impl Augment {
    pub fn is_none(&self) -> bool {
        *self == Augment::None
    }

    /// Whether images are mirrored at random.
    pub fn flips(self) -> bool {
        matches!(self, Augment::Hflip | Augment::HflipPadCrop)
    }

    /// Whether images are padded and cropped at a random offset.
    pub fn pad_crops(self) -> bool {
        matches!(self, Augment::PadCrop | Augment::HflipPadCrop)
    }
}

impl Default for TrainSpec {
    fn default() -> Self {
        TrainSpec {
            batch_size: 100,
            epochs: 100,
            warmup_epochs: 10,
            seed: 0,
            optimizer: OptimizerSpec::default(),
            grad_clip_norm: None,
            augment: Augment::None,
        }
    }
}

/// The optimizer.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OptimizerSpec {
    /// Adam settings.
    pub adam: AdamSpec,
}

/// Adam hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamSpec {
    /// Learning rate; default 1e-4, must be finite and > 0.
    pub lr: f64,
    /// (β₁, β₂); default [0.9, 0.999], each in [0, 1).
    pub betas: [f64; 2],
    /// ε; default 1e-8, must be finite and > 0.
    pub eps: f64,
    /// The learned inverses' (R's) learning rate as a multiple of `lr`; default 1, must be
    /// finite and > 0. Adam moves each entry by about lr per step, and R must follow W⁻¹,
    /// which can move faster than W does.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub inverse_lr_scale: f64,
}

fn one() -> f64 {
    1.0
}

fn is_one(v: &f64) -> bool {
    *v == 1.0
}

impl Default for AdamSpec {
    fn default() -> Self {
        AdamSpec {
            lr: 1e-4,
            betas: [0.9, 0.999],
            eps: 1e-8,
            inverse_lr_scale: 1.0,
        }
    }
}

/// Parses and validates a flow spec from JSON text; every problem found is
/// reported with the JSON pointer of its spot.
pub fn parse_spec(text: &str) -> Result<FlowSpec, SpecErrors> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| SpecErrors::new(vec![SpecError::from_json(&e)]))?;
    let walk::Walked {
        spec,
        errors: structural,
        layer_paths,
        layer_values,
    } = walk::walk_flow(&value);
    let mut errors = structural;
    let semantic = validate::semantic_errors(&spec, Some(&layer_paths));
    errors::merge_semantic(&mut errors, semantic);
    if !errors.is_empty() {
        return Err(SpecErrors::new(errors));
    }
    // The walker and serde's derive must agree on every valid spec (with `repeat` expanded:
    // the spec is its expanded form from here on).
    let mut value = value;
    value["layers"] = serde_json::Value::Array(layer_values);
    match serde_json::from_value::<FlowSpec>(value) {
        Ok(serde_spec) => {
            debug_assert_eq!(serde_spec, spec, "spec walker and serde derive disagree");
            Ok(spec)
        }
        Err(e) => Err(SpecErrors::new(vec![SpecError::new(
            "",
            format!("spec rejected by the deserializer: {e}"),
        )])),
    }
}

/// Reads, parses and validates a flow spec file; errors carry the file's path.
pub fn load_spec(path: &Path) -> Result<FlowSpec, SpecErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        SpecErrors::new(vec![SpecError::new(
            "",
            format!("cannot read spec file: {e}"),
        )])
        .with_file(path)
    })?;
    parse_spec(&text).map_err(|e| e.with_file(path))
}

impl FlowSpec {
    /// The input shape of every layer, and the shape after the last one. An input of rank 3 is
    /// an image `[C, H, W]`; a `linear` layer flattens it (C order). A layer that does not fit
    /// its input (a conv on a flat input, a squeeze of an odd size) is reported by
    /// [`FlowSpec::validate`]; here its output keeps its input's shape.
    pub fn layer_shapes(&self) -> Vec<LayerShape> {
        let mut shape = match self.input.shape.as_slice() {
            [c, h, w] => LayerShape::Image {
                c: *c,
                h: *h,
                w: *w,
            },
            _ => LayerShape::Flat(self.input.dim()),
        };
        let mut out = Vec::with_capacity(self.layers.len() + 1);
        for layer in &self.layers {
            out.push(shape);
            shape = match (layer, shape) {
                (LayerSpec::Linear(_), s) => LayerShape::Flat(s.numel()),
                (LayerSpec::Split(_), LayerShape::Image { c, h, w }) if c % 2 == 0 => {
                    LayerShape::Image { c: c / 2, h, w }
                }
                (LayerSpec::Squeeze(_), LayerShape::Image { c, h, w })
                    if h % 2 == 0 && w % 2 == 0 =>
                {
                    LayerShape::Image {
                        c: c.saturating_mul(4),
                        h: h / 2,
                        w: w / 2,
                    }
                }
                (_, s) => s,
            };
        }
        out.push(shape);
        out
    }

    /// Semantic checks (ranges, non-empty lists, names); all problems are collected.
    pub fn validate(&self) -> Result<(), SpecErrors> {
        let errors = validate::semantic_errors(self, None);
        if errors.is_empty() {
            Ok(())
        } else {
            Err(SpecErrors::new(errors))
        }
    }

    /// Whether a training step of `batch` examples (a batch size given on the command line
    /// rather than the spec's `/train/batch_size`) keeps every tensor within
    /// [`MAX_TENSOR_ELEMENTS`]; the error says which activations would not.
    pub fn check_batch(&self, batch: usize) -> Result<(), String> {
        validate::batch_fits(self, &self.layer_shapes(), batch)
    }

    /// Pretty JSON of the spec (all defaults written out); round-trips through [`parse_spec`].
    pub fn to_json_pretty(&self) -> String {
        // Serializing these plain structs cannot fail (no maps with non-string keys).
        serde_json::to_string_pretty(self).expect("FlowSpec serialization is infallible")
    }

    /// Starts a [`FlowSpecBuilder`] for a flow called `name`.
    pub fn builder(name: &str) -> FlowSpecBuilder {
        FlowSpecBuilder::new(name)
    }
}
