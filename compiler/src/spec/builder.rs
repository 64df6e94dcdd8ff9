//! A Rust builder producing the same [`FlowSpec`] as the JSON form.

use super::errors::{merge_semantic, SpecError, SpecErrors};
use super::validate::semantic_errors;
use super::{
    AdamSpec, FlowSpec, GradientMode, InputSpec, LayerSpec, LinearSpec, ObjectiveSpec, Preprocess,
    SmoothLeakyReluSpec, TrainSpec, DEFAULT_LOGIT_ALPHA,
};

/// Builds a [`FlowSpec`]; unset parts take the same defaults as the JSON form.
///
/// ```
/// use snfc_compiler::spec::{FlowSpec, Preprocess};
/// let spec = FlowSpec::builder("mnist_fc2")
///     .input(&[784], Preprocess::DequantizeLogit)
///     .linear(true)
///     .smooth_leaky_relu(0.3)
///     .linear(true)
///     .self_normalizing(1.0)
///     .batch_size(100)
///     .epochs(100)
///     .warmup_epochs(10)
///     .seed(0)
///     .adam(1e-4, [0.9, 0.999])
///     .build()
///     .expect("valid spec");
/// assert_eq!(spec.input.dim(), 784);
/// ```
#[derive(Debug, Clone)]
#[must_use]
pub struct FlowSpecBuilder {
    name: String,
    input: Option<(Vec<usize>, Preprocess)>,
    logit_alpha: f64,
    layers: Vec<LayerSpec>,
    objective: ObjectiveSpec,
    train: TrainSpec,
}

impl FlowSpecBuilder {
    /// A builder for a flow called `name` (same as [`FlowSpec::builder`]).
    pub fn new(name: &str) -> Self {
        FlowSpecBuilder {
            name: name.to_string(),
            input: None,
            logit_alpha: DEFAULT_LOGIT_ALPHA,
            layers: Vec::new(),
            objective: ObjectiveSpec::default(),
            train: TrainSpec::default(),
        }
    }

    /// The input's shape and preprocessing (required).
    pub fn input(mut self, shape: &[usize], preprocess: Preprocess) -> Self {
        self.input = Some((shape.to_vec(), preprocess));
        self
    }

    /// α of the logit transform (default 1e-6).
    pub fn logit_alpha(mut self, alpha: f64) -> Self {
        self.logit_alpha = alpha;
        self
    }

    /// Appends any layer.
    pub fn layer(mut self, layer: LayerSpec) -> Self {
        self.layers.push(layer);
        self
    }

    /// Appends a linear layer with the default initialization.
    pub fn linear(self, bias: bool) -> Self {
        self.layer(LayerSpec::Linear(LinearSpec {
            bias,
            ..LinearSpec::default()
        }))
    }

    /// Appends a self-normalizing `kernel_size × kernel_size` convolution (`C → C`).
    pub fn conv(self, kernel_size: usize, bias: bool) -> Self {
        self.layer(LayerSpec::Conv(super::ConvSpec { kernel_size, bias }))
    }

    /// Appends a rational-quadratic spline activation with `bins` bins on
    /// `[−tail_bound, tail_bound]`.
    pub fn spline(self, bins: usize, tail_bound: f64) -> Self {
        self.layer(LayerSpec::Spline(super::SplineSpec { bins, tail_bound }))
    }

    /// `times` copies of the layers `body` adds to a fresh builder, in place (the JSON form's
    /// `{"type": "repeat", "times": n, "layers": [...]}`): e.g. Glow's steps,
    /// `.repeat(32, |b| b.conv(1, false).spline(5, 10.0))`.
    pub fn repeat(mut self, times: usize, body: impl FnOnce(Self) -> Self) -> Self {
        let inner = body(FlowSpecBuilder::new(&self.name));
        for _ in 0..times {
            self.layers.extend(inner.layers.iter().cloned());
        }
        self
    }

    /// Appends a squeeze (space-to-depth, `[C, H, W] → [4C, H/2, W/2]`).
    pub fn squeeze(self) -> Self {
        self.layer(LayerSpec::Squeeze(super::SqueezeSpec {}))
    }

    /// Factor out half of the channels (multiscale).
    pub fn split(self) -> Self {
        self.layer(LayerSpec::Split(super::SplitSpec {}))
    }

    /// A Glow affine coupling with a network of `width` hidden channels.
    pub fn affine_coupling(self, width: usize) -> Self {
        self.layer(LayerSpec::AffineCoupling(super::AffineCouplingSpec {
            width,
        }))
    }

    /// A Glow activation normalization, per channel (initialized from the first batch).
    pub fn actnorm(self) -> Self {
        self.layer(LayerSpec::Actnorm(super::ActnormSpec {}))
    }

    /// Appends a smooth leaky ReLU with negative slope `alpha`.
    pub fn smooth_leaky_relu(self, alpha: f64) -> Self {
        self.layer(LayerSpec::SmoothLeakyRelu(SmoothLeakyReluSpec { alpha }))
    }

    /// Self-normalizing gradient with reconstruction weight `lambda`.
    pub fn self_normalizing(mut self, lambda: f64) -> Self {
        self.objective.gradient = GradientMode::SelfNormalizing;
        self.objective.lambda = super::Lambda::Fixed(lambda);
        self
    }

    /// Which parameters the reconstruction term trains (default both W and R).
    pub fn recon_trains(mut self, recon_trains: super::ReconTrains) -> Self {
        self.objective.recon_trains = recon_trains;
        self
    }

    /// Exact gradient (λ is left as it is).
    pub fn exact(mut self) -> Self {
        self.objective.gradient = GradientMode::Exact;
        self
    }

    /// Reconstruction weight λ (default 1.0).
    pub fn lambda(mut self, lambda: f64) -> Self {
        self.objective.lambda = super::Lambda::Fixed(lambda);
        self
    }

    /// GECO: one λ per self-normalizing layer, adapted during training (see `GecoSpec`).
    pub fn geco(mut self, geco: super::GecoSpec) -> Self {
        self.objective.lambda = super::Lambda::Geco { geco };
        self
    }

    /// Samples per step (default 100).
    pub fn batch_size(mut self, batch_size: usize) -> Self {
        self.train.batch_size = batch_size;
        self
    }

    /// Training epochs (default 100).
    pub fn epochs(mut self, epochs: usize) -> Self {
        self.train.epochs = epochs;
        self
    }

    /// Warmup epochs (default 10).
    pub fn warmup_epochs(mut self, warmup_epochs: usize) -> Self {
        self.train.warmup_epochs = warmup_epochs;
        self
    }

    /// Random seed (default 0).
    pub fn seed(mut self, seed: u64) -> Self {
        self.train.seed = seed;
        self
    }

    /// Adam learning rate and betas (ε and the inverses' scale keep their values).
    pub fn adam(mut self, lr: f64, betas: [f64; 2]) -> Self {
        self.train.optimizer.adam = AdamSpec {
            lr,
            betas,
            ..self.train.optimizer.adam
        };
        self
    }

    /// The learned inverses' learning rate as a multiple of Adam's `lr` (default 1).
    pub fn inverse_lr_scale(mut self, scale: f64) -> Self {
        self.train.optimizer.adam.inverse_lr_scale = scale;
        self
    }

    /// Clip the gradient by its global norm to at most `norm` before each step.
    pub fn grad_clip_norm(mut self, norm: f64) -> Self {
        self.train.grad_clip_norm = Some(norm);
        self
    }

    /// Adam ε (default 1e-8).
    pub fn adam_eps(mut self, eps: f64) -> Self {
        self.train.optimizer.adam.eps = eps;
        self
    }

    /// The spec, validated like a parsed one (errors name the JSON pointers).
    pub fn build(self) -> Result<FlowSpec, SpecErrors> {
        let mut errors = Vec::new();
        let (shape, preprocess) = match self.input {
            Some(input) => input,
            None => {
                errors.push(SpecError::new(
                    "/input",
                    "missing field `input` (call .input(shape, preprocess))",
                ));
                (Vec::new(), Preprocess::None)
            }
        };
        let spec = FlowSpec {
            name: self.name,
            input: InputSpec {
                shape,
                preprocess,
                logit_alpha: self.logit_alpha,
            },
            layers: self.layers,
            objective: self.objective,
            train: self.train,
        };
        merge_semantic(&mut errors, semantic_errors(&spec, None));
        if errors.is_empty() {
            Ok(spec)
        } else {
            Err(SpecErrors::new(errors))
        }
    }
}
