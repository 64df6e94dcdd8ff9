//! The training loop: shuffled mini-batches, the compiled step on the host executor, Adam with
//! linear learning-rate warm-up, per-epoch exact validation NLL, metrics as JSON lines and the
//! best-validation checkpoint.

use crate::backend::open;
use crate::batch::{fill_columns, fill_uniform, pad_crop};
use crate::cube::probe::Chosen;
use crate::data::Dataset;
use crate::eval::{evaluate, EvalResult};
use crate::host::exec::ExecError;
use crate::host::exec::{Executor, Program};
use crate::host::linalg::Real;
use crate::model::{Model, ModelError};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::{actnorm_init_graph, ParamKind, ACTNORM_EPS, INPUT_NOISE, INPUT_X};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::{Augment, FlowSpec, GecoSpec, GradientMode, LayerSpec, Preprocess};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Exec(#[from] ExecError),
    #[error(transparent)]
    Compile(#[from] snfc_compiler::rewrite::RewriteError),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Options a run takes on top of the spec's `train` section.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub out: PathBuf,
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    pub steps: Option<usize>,
    pub seed: Option<u64>,
    pub level: OptLevel,
    pub progress: bool,
    /// Overwrite an existing checkpoint in `out`.
    pub force: bool,
    /// Where the step runs.
    pub device: Chosen,
    /// A step plan compiled earlier (`plan.json`); compiled from the spec when `None`.
    pub plan: Option<Plan>,
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub steps: usize,
    /// Mean training loss over the epoch's steps (without the data-independent log-dets).
    pub train_loss: f64,
    pub val_nll_nats: f64,
    pub val_bits_per_dim: f64,
    /// Mean Σ_k ‖R_k W_k h_k − h_k‖² on the validation split (self-normalizing specs).
    pub val_recon: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
    pub examples_per_sec: f64,
    /// GECO's λ per self-normalizing layer at the end of the epoch (GECO specs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lambda: Option<BTreeMap<String, f64>>,
}

/// GECO's state: λ and the EMA of the reconstruction error, per self-normalizing layer (by
/// its `layers.{k}` name).
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct Geco {
    pub lambda: BTreeMap<String, f64>,
    pub ema: BTreeMap<String, Option<f64>>,
}

impl Geco {
    /// λ₀ for every layer with a reconstruction term (none unless the spec uses GECO with the
    /// self-normalizing gradient).
    pub fn new(spec: &FlowSpec) -> Option<Geco> {
        let g = spec.objective.lambda.geco()?;
        if spec.objective.gradient != GradientMode::SelfNormalizing {
            return None;
        }
        let layers: Vec<String> = spec
            .layers
            .iter()
            .enumerate()
            .filter(|(_, l)| matches!(l, LayerSpec::Linear(_) | LayerSpec::Conv(_)))
            .map(|(k, _)| format!("layers.{k}"))
            .collect();
        Some(Geco {
            lambda: layers.iter().map(|l| (l.clone(), g.lambda0)).collect(),
            ema: layers.iter().map(|l| (l.clone(), None)).collect(),
        })
    }

    /// The graph inputs λ_k and their values.
    pub fn feeds(&self) -> Vec<(String, f64)> {
        self.lambda
            .iter()
            .map(|(l, v)| (format!("lambda.{l}"), *v))
            .collect()
    }

    /// One update from each layer's reconstruction error of the last step (`recon.layers.k`):
    /// EMA ← ema·EMA + (1 − ema)·r, λ ← λ·exp(lr·(EMA − κ)).
    pub fn update(&mut self, spec: &GecoSpec, recon: &BTreeMap<String, f64>) {
        for (layer, lambda) in self.lambda.iter_mut() {
            let Some(&r) = recon.get(layer) else { continue };
            let ema = self.ema.entry(layer.clone()).or_insert(None);
            let e = match *ema {
                Some(e) => spec.ema * e + (1.0 - spec.ema) * r,
                None => r,
            };
            *ema = Some(e);
            *lambda *= (spec.lr * (e - spec.kappa)).exp();
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub records: Vec<EpochRecord>,
    pub best: Option<EvalResult>,
    pub best_epoch: usize,
    pub checkpoint: PathBuf,
}

/// Adam (Kingma & Ba) with bias correction; state per parameter.
pub struct Adam<T> {
    betas: [f64; 2],
    eps: f64,
    t: i32,
    state: HashMap<String, (Vec<T>, Vec<T>)>,
}

impl<T: Real> Adam<T> {
    pub fn new(spec: &snfc_compiler::spec::AdamSpec) -> Self {
        Self::with(spec.betas, spec.eps)
    }

    pub fn with(betas: [f64; 2], eps: f64) -> Self {
        Adam {
            betas,
            eps,
            t: 0,
            state: HashMap::new(),
        }
    }

    /// One update of every parameter that has a `grad.<name>` output, at learning rate `lr`;
    /// returns the step's `loss` output.
    pub fn update(
        &mut self,
        model: &mut Model<T>,
        outs: &[(String, crate::host::exec::Tensor<T>)],
        lr: f64,
    ) -> f64 {
        self.update_values(&mut model.values, outs, lr, 1.0)
    }

    /// [`update`](Self::update) on named parameter values, with every gradient multiplied by
    /// `grad_scale` first (clipping by global norm).
    pub fn update_values(
        &mut self,
        values: &mut HashMap<String, Arc<Vec<T>>>,
        outs: &[(String, crate::host::exec::Tensor<T>)],
        lr: f64,
        grad_scale: f64,
    ) -> f64 {
        self.t += 1;
        let mut loss = f64::NAN;
        for (name, t) in outs {
            if let Some(p) = name.strip_prefix("grad.") {
                let Some(param) = values.get_mut(p) else {
                    continue;
                };
                let param: &mut Vec<T> = Arc::make_mut(param);
                self.step(param, &t.data, p, lr, grad_scale);
            } else if name == "loss" {
                loss = t.scalar().as_f64();
            }
        }
        loss
    }

    fn step(&mut self, param: &mut [T], grad: &[T], name: &str, lr: f64, grad_scale: f64) {
        let (m, v) = self
            .state
            .entry(name.to_string())
            .or_insert_with(|| (vec![T::zero(); param.len()], vec![T::zero(); param.len()]));
        let [b1, b2] = self.betas;
        let t = self.t;
        let c1 = 1.0 - b1.powi(t);
        let c2 = 1.0 - b2.powi(t);
        // p -= lr · m̂ / (√v̂ + ε), with m̂ = m / c1, v̂ = v / c2
        let (b1, b2) = (T::of_f64(b1), T::of_f64(b2));
        let (step, c2s, eps) = (
            T::of_f64(lr / c1),
            T::of_f64(1.0 / c2.sqrt()),
            T::of_f64(self.eps),
        );
        let one = T::one();
        let gs = T::of_f64(grad_scale);
        param
            .par_chunks_mut(4096)
            .zip(grad.par_chunks(4096))
            .zip(m.par_chunks_mut(4096).zip(v.par_chunks_mut(4096)))
            .for_each(|((p, g), (m, v))| {
                for i in 0..p.len() {
                    let g = g[i] * gs;
                    m[i] = b1 * m[i] + (one - b1) * g;
                    v[i] = b2 * v[i] + (one - b2) * g * g;
                    p[i] -= step * m[i] / (v[i].sqrt() * c2s + eps);
                }
            });
    }
}

/// Check that the data fits the spec.
pub fn check_data(spec: &FlowSpec, data: &Dataset) -> Result<(), TrainError> {
    if data.dim != spec.input.dim() {
        return Err(TrainError::Setup(format!(
            "data set {} has {} values per example, but spec `{}` has input shape {:?} ({} values)",
            data.name,
            data.dim,
            spec.name,
            spec.input.shape,
            spec.input.dim()
        )));
    }
    if spec.input.preprocess == Preprocess::DequantizeLogit && !data.discrete {
        return Err(TrainError::Setup(format!(
            "spec `{}` dequantizes 8-bit data (/input/preprocess = \"dequantize_logit\"), but data set {} is continuous; use \"preprocess\": \"none\"",
            spec.name, data.name
        )));
    }
    Ok(())
}

/// Whether a parameter of `kind` is set by the data-dependent initialization.
fn is_data_initialized(kind: ParamKind) -> bool {
    matches!(
        kind,
        ParamKind::ActnormTranslation | ParamKind::ActnormLogScale
    )
}

/// The data-dependent initialization of `model` (its actnorm layers) on one batch `x` (`[D,
/// batch]` columns, with its dequantization `noise` for 8-bit specs): each actnorm's translation
/// and log-scale become the per-channel mean and ln(std + ε) of its input, in layer order (see
/// `snfc_compiler::ir::lower::actnorm_init_graph`). Returns a warning for every channel that
/// is constant on the batch (its scale is then 1/ε, never NaN).
pub fn data_init<T: Real + 'static>(
    model: &mut Model<T>,
    x: &[T],
    noise: Option<&[T]>,
    batch: usize,
) -> Result<Vec<String>, TrainError> {
    let g = actnorm_init_graph(&model.spec, batch);
    let mut feeds = model.values.clone();
    feeds.insert(INPUT_X.to_string(), Arc::new(x.to_vec()));
    if let Some(n) = noise {
        feeds.insert(INPUT_NOISE.to_string(), Arc::new(n.to_vec()));
    }
    let mut warnings = Vec::new();
    let outs = if g.outputs.is_empty() {
        Vec::new()
    } else {
        Executor::<T>::new().run(&Program::new(&g), &feeds)?
    };
    for (name, t) in outs {
        match name.strip_suffix(".variance") {
            Some(layer) => {
                for (c, v) in t.data.iter().enumerate() {
                    // Zero (or NaN) variance: a constant channel.
                    if v.as_f64().partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                        warnings.push(format!(
                            "{layer} (actnorm): channel {c} has variance {} on the first batch; \
                             its scale starts at 1/{} (s = ln {})",
                            v.as_f64(),
                            ACTNORM_EPS,
                            ACTNORM_EPS
                        ));
                    }
                }
            }
            None => {
                if let Some(k) = t.data.iter().position(|v| !v.as_f64().is_finite()) {
                    return Err(TrainError::Setup(format!(
                        "actnorm initialization: {name}[{k}] is {} (non-finite data in the \
                         first batch?)",
                        t.data[k].as_f64()
                    )));
                }
                model.values.insert(name, Arc::new(t.data));
            }
        }
    }
    model.data_initialized = true;
    Ok(warnings)
}

/// Train `spec` on `data` in precision `T`, writing `metrics.jsonl` and `checkpoint.safetensors`
/// into `opts.out`.
pub fn train<T: Real + 'static>(
    spec: &FlowSpec,
    data: &Dataset,
    opts: &TrainOptions,
) -> Result<TrainSummary, TrainError> {
    check_data(spec, data)?;
    let tr = &spec.train;
    let batch = tr.batch_size;
    let steps_per_epoch = data.train.n / batch;
    if steps_per_epoch == 0 {
        return Err(TrainError::Setup(format!(
            "/train/batch_size {batch} is larger than the training split ({} examples of {})",
            data.train.n, data.name
        )));
    }
    let checkpoint = opts.out.join("checkpoint.safetensors");
    if checkpoint.exists() && !opts.force {
        return Err(TrainError::Setup(format!(
            "{} already exists; pass --force to overwrite it or choose another --out",
            checkpoint.display()
        )));
    }
    // The step on its device first: a run that cannot start leaves the output directory alone.
    let plan = match &opts.plan {
        Some(p) => p.clone(),
        None => Plan::for_level(&compile_train(spec, batch, opts.level)?.step, opts.level),
    };
    let mut backend = open::<T>(&opts.device, plan)?;
    std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
    let metrics_path = opts.out.join("metrics.jsonl");
    let mut metrics = std::fs::File::create(&metrics_path).map_err(io_err(&metrics_path))?;

    let seed = opts.seed.unwrap_or(tr.seed);
    let epochs = opts.epochs.unwrap_or(tr.epochs);
    let mut model = Model::<T>::init(spec, seed);
    for (name, v) in &model.values {
        backend.set(name, v)?;
    }
    let mut geco = Geco::new(spec);
    if let Some(g) = &geco {
        for (name, v) in g.feeds() {
            backend.set(&name, &[T::of_f64(v)])?;
        }
    }
    let adam_spec = &tr.optimizer.adam;
    let warmup_steps = (tr.warmup_epochs * steps_per_epoch) as f64;
    let d = spec.input.dim();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a);
    let mut order: Vec<usize> = (0..data.train.n).collect();
    let dequantize = spec.input.preprocess == Preprocess::DequantizeLogit;
    let mut x = vec![T::zero(); d * batch];
    let mut noise = vec![T::zero(); d * batch];
    let mut records = Vec::new();
    let mut best: Option<EvalResult> = None;
    let mut best_epoch = 0;
    let mut total_steps = 0usize;
    let max_steps = opts.steps.unwrap_or(usize::MAX);

    for epoch in 1..=epochs {
        if total_steps >= max_steps {
            break;
        }
        let started = Instant::now();
        order.shuffle(&mut rng);
        let bar = if opts.progress {
            ProgressBar::new(steps_per_epoch as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template("epoch {prefix} [{bar:30}] {pos}/{len} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar())
                .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        let mut loss_sum = 0.0;
        let mut steps = 0;
        let mut lr = adam_spec.lr;
        for s in 0..steps_per_epoch {
            if total_steps >= max_steps {
                break;
            }
            fill_columns(
                &data.train,
                &order[s * batch..(s + 1) * batch],
                batch,
                &mut x,
            );
            if let (Augment::PadCrop, [c, h, w]) = (tr.augment, spec.input.shape.as_slice()) {
                pad_crop(&mut x, [*c, *h, *w], batch, &mut rng);
            }
            backend.set(INPUT_X, &x)?;
            if dequantize {
                fill_uniform(&mut rng, &mut noise);
                backend.set(INPUT_NOISE, &noise)?;
            }
            if !model.data_initialized {
                // Actnorm's data-dependent initialization, on the first training batch.
                let warnings = data_init(&mut model, &x, dequantize.then_some(&noise[..]), batch)?;
                for w in warnings {
                    eprintln!("warning: {w}");
                }
                for p in model.params.iter().filter(|p| is_data_initialized(p.kind)) {
                    backend.set(&p.name, &model.values[&p.name])?;
                }
            }
            backend.run()?;
            total_steps += 1;
            lr = if warmup_steps > 0.0 {
                adam_spec.lr * (total_steps as f64 / warmup_steps).min(1.0)
            } else {
                adam_spec.lr
            };
            loss_sum += backend.output("loss")?.scalar().as_f64();
            if let (Some(g), Some(gs)) = (geco.as_mut(), spec.objective.lambda.geco()) {
                let mut recon = BTreeMap::new();
                for layer in g.lambda.keys() {
                    let name = format!("recon.{layer}");
                    recon.insert(layer.clone(), backend.output(&name)?.scalar().as_f64());
                }
                g.update(gs, &recon);
                for (name, v) in g.feeds() {
                    backend.set(&name, &[T::of_f64(v)])?;
                }
            }
            // Clipping by global norm (`train.grad_clip_norm`): every gradient scaled by
            // min(1, clip / ‖g‖).
            let grad_scale = match tr.grad_clip_norm {
                Some(clip) => {
                    let norm = backend.grad_norm()?;
                    if !norm.is_finite() {
                        1.0
                    } else {
                        (clip / norm).min(1.0)
                    }
                }
                None => 1.0,
            };
            backend.adam_step(lr, adam_spec.betas, adam_spec.eps, grad_scale)?;
            steps += 1;
            let secs = started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.2}  {:.0} ex/s",
                loss_sum / steps as f64,
                (steps * batch) as f64 / secs
            ));
            bar.inc(1);
        }
        let train_secs = started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        // The parameters as trained (on a GPU they live on the device).
        let names: Vec<String> = model.values.keys().cloned().collect();
        for name in names {
            let v = backend.fed(&name)?;
            model.values.insert(name, Arc::new(v));
        }
        let val = evaluate(&model.cast::<f64>(), &data.valid, batch.max(100), 0)?;
        let record = EpochRecord {
            epoch,
            steps: total_steps,
            train_loss: loss_sum / steps.max(1) as f64,
            val_nll_nats: val.nll_nats,
            val_bits_per_dim: val.bits_per_dim,
            val_recon: val.recon,
            lr,
            seconds: started.elapsed().as_secs_f64(),
            examples_per_sec: (steps * batch) as f64 / train_secs,
            lambda: geco.as_ref().map(|g| g.lambda.clone()),
        };
        let line = serde_json::to_string(&record).unwrap_or_default();
        writeln!(metrics, "{line}").map_err(io_err(&metrics_path))?;
        metrics.flush().map_err(io_err(&metrics_path))?;
        if opts.progress {
            eprintln!(
                "epoch {epoch}/{epochs}: train loss {:.2}, validation NLL {:.2} nats ({:.4} bits/dim){}, {:.1} s, {:.0} examples/s",
                record.train_loss,
                val.nll_nats,
                val.bits_per_dim,
                val.recon.map(|r| format!(", recon {r:.3e}")).unwrap_or_default(),
                record.seconds,
                record.examples_per_sec
            );
        }
        let improved =
            best.as_ref().is_none_or(|b| val.nll_nats < b.nll_nats) && val.nll_nats.is_finite();
        if improved {
            let mut meta = HashMap::from([
                ("epoch".to_string(), epoch.to_string()),
                ("steps".to_string(), total_steps.to_string()),
                ("val_nll_nats".to_string(), val.nll_nats.to_string()),
                ("dtype".to_string(), T::NAME.to_string()),
            ]);
            if let Some(g) = &geco {
                // GECO's λ and EMA per layer, so a resumed run continues them.
                meta.insert(
                    "geco".to_string(),
                    serde_json::to_string(g).unwrap_or_default(),
                );
            }
            model.save(&checkpoint, &[], meta)?;
            best = Some(val);
            best_epoch = epoch;
        }
        records.push(record);
    }
    Ok(TrainSummary {
        records,
        best,
        best_epoch,
        checkpoint,
    })
}
