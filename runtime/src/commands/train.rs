//! The training loop: shuffled mini-batches, the compiled step on the host executor, Adam with
//! linear learning-rate warm-up, per-epoch exact validation NLL, metrics as JSON lines and the
//! best-validation checkpoint.

use crate::angle::{feeds_f64, AngleProbe, AngleStats};
use crate::backend::{open, Draw};
use crate::batch::{fill_columns, fill_uniform, hflip, pad_crop};
use crate::cube::matmul::MatmulPrecision;
use crate::cube::probe::Chosen;
use crate::data::Dataset;
use crate::eval::{evaluate_given_logdets, logdet_sum, EvalOptions, EvalResult};
use crate::host::exec::ExecError;
use crate::host::exec::{Executor, Program};
use crate::host::linalg::Real;
use crate::model::{tensor_values, Model, ModelError, RawTensor};
use indicatif::{ProgressBar, ProgressStyle};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::{
    actnorm_init_graph, geco_layer_key, geco_layers, next_output, ParamKind, ACTNORM_EPS,
    GECO_EMA_PREFIX, GECO_EMA_WEIGHT_INPUT, GECO_LAMBDA_PREFIX, GECO_RECON_PREFIX, INPUT_NOISE,
    INPUT_X,
};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::{FlowSpec, GecoSpec, GradientMode, Preprocess};
use std::collections::BTreeMap;
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use crate::distributed::{all_reduce_sum, columns, shard, Comm};
pub use crate::executors::adam::{Adam, AdamState, LearningRates};

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
    /// A non-finite loss or gradient stopped the run.
    #[error("{0}")]
    Diverged(String),
    // Not named `source`: thiserror would chain it, and the OS error would print twice.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |error| TrainError::Io {
        path: path.display().to_string(),
        error,
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
    /// Start over in an `out` that holds an earlier run (its files are moved to
    /// `out/previous-N`).
    pub force: bool,
    /// Continue the run in `out` from its `last.safetensors`.
    pub resume: bool,
    /// Every this many steps, the angle between the self-normalizing and the exact gradient
    /// per layer at the step's parameters and batch (`grad_angle_deg` in metrics.jsonl).
    pub angle_every: Option<usize>,
    /// Where the step runs.
    pub device: Chosen,
    /// The arithmetic of matrix products on a GPU (TF32 tensor cores allowed, or full f32).
    pub matmul: MatmulPrecision,
    /// Draw the dequantization noise on the device where the backend can (a GPU); otherwise
    /// on the host from the run's generator, the same numbers on every backend.
    pub device_noise: bool,
    /// A step plan compiled earlier (`plan.json`); compiled from the spec when `None`.
    pub plan: Option<Plan>,
    /// What `--data` named (recorded in `last.safetensors`; none: the embedded digits).
    pub data: Option<String>,
    /// The processes training together (data-parallel): each takes `batch_size / ranks` rows
    /// of every global batch, gradients are averaged over them, and rank 0 alone writes.
    pub comm: Comm,
    /// Set (by a SIGINT or SIGTERM handler, say) to stop after the step in progress: the run
    /// writes `last.safetensors` at that step, mid-epoch, and `--resume` continues from it
    /// exactly. Under MPI the ranks agree on the step (the flags are summed with the loss).
    pub interrupt: Arc<AtomicBool>,
}

impl TrainOptions {
    /// A run into `out` as the spec describes it: its epochs and seed, every rewrite, on the
    /// host, no progress bar, refusing a directory that holds a run. Change fields as needed
    /// (`TrainOptions { resume: true, ..TrainOptions::new(out) }`).
    pub fn new(out: PathBuf) -> TrainOptions {
        TrainOptions {
            out,
            epochs: None,
            steps: None,
            seed: None,
            level: OptLevel::Full,
            progress: false,
            force: false,
            resume: false,
            angle_every: None,
            device: Chosen::Host,
            matmul: MatmulPrecision::default(),
            device_noise: true,
            plan: None,
            data: None,
            comm: crate::distributed::solo(),
            interrupt: Arc::new(AtomicBool::new(false)),
        }
    }
}

/// One line of `metrics.jsonl`.
#[derive(Debug, Clone, Serialize)]
pub struct EpochRecord {
    pub epoch: usize,
    pub steps: usize,
    /// Exact −mean ln p(x) of the epoch's training batches, nats per example like
    /// `val_nll_nats`: the data terms of every step (`nll_data`) averaged, plus the
    /// data-independent −Σ ln|det W| of the parameters at the epoch's end (one LU per weight,
    /// once per epoch).
    pub train_nll_nats: f64,
    /// `train_nll_nats` / (D ln 2).
    pub train_bits_per_dim: f64,
    /// Mean over the epoch's steps of what the step minimizes, less its data-independent
    /// ln|det| terms (for a self-normalizing spec the mean of the f- and g-flow terms plus
    /// λ·reconstruction): the training objective as the paper's code reports it. It is not a
    /// likelihood, and rises while the model improves when the log-dets grow.
    pub train_objective_data_terms: f64,
    pub val_nll_nats: f64,
    pub val_bits_per_dim: f64,
    /// Mean Σ_k ‖R_k W_k h_k − h_k‖² on the validation split (self-normalizing specs).
    pub val_recon: Option<f64>,
    pub lr: f64,
    pub seconds: f64,
    pub examples_per_sec: f64,
    /// GECO's λ per self-normalizing layer at the end of the epoch (GECO specs only), written
    /// in layer order (`layers.2` before `layers.10`).
    #[serde(
        skip_serializing_if = "Option::is_none",
        serialize_with = "in_layer_order"
    )]
    pub lambda: Option<BTreeMap<String, f64>>,
    /// Angles between the self-normalizing and the exact gradient over the epoch's
    /// measurements (`--angle-every`), in degrees.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grad_angle_deg: Option<AngleStats>,
    /// The processes that trained together (data-parallel; 1 alone).
    pub ranks: usize,
    /// Seconds of the epoch spent averaging gradients over the ranks (more than one rank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_reduce_seconds: Option<f64>,
    /// The epoch stopped before its last step (`--steps`): the line measures the steps taken,
    /// and a resumed run replaces it with the whole epoch's.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub partial: bool,
}

/// Where a run stands within an epoch that it stopped in the middle of (`--steps`, a signal):
/// what the epoch's line in `metrics.jsonl` needs from the steps already taken.
#[derive(Debug, Clone, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct EpochProgress {
    /// Steps of the epoch taken.
    pub steps: usize,
    pub loss_sum: f64,
    pub nll_data_sum: f64,
    /// Seconds the epoch has run, and of them training steps and averaging over ranks.
    pub seconds: f64,
    pub train_seconds: f64,
    pub all_reduce_seconds: f64,
    /// The epoch's gradient-angle measurements (`--angle-every`).
    pub angles: Vec<BTreeMap<String, f64>>,
}

/// A map keyed by layer name (`layers.{k}`) as a JSON object in the order of `k` (a
/// `BTreeMap` orders the names as text: `layers.10` before `layers.2`).
fn in_layer_order<S: serde::Serializer>(
    map: &Option<BTreeMap<String, f64>>,
    s: S,
) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let Some(map) = map else {
        return s.serialize_none();
    };
    let number = |k: &str| -> Option<usize> { k.strip_prefix("layers.")?.parse().ok() };
    let mut entries: Vec<(&String, &f64)> = map.iter().collect();
    entries.sort_by_key(|(k, _)| (number(k), k.to_string()));
    let mut out = s.serialize_map(Some(entries.len()))?;
    for (k, v) in entries {
        out.serialize_entry(k, v)?;
    }
    out.end()
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
        let layers: Vec<String> = geco_layers(spec).into_iter().map(geco_layer_key).collect();
        if layers.is_empty() {
            return None;
        }
        Some(Geco {
            lambda: layers.iter().map(|l| (l.clone(), g.lambda0)).collect(),
            ema: layers.iter().map(|l| (l.clone(), None)).collect(),
        })
    }

    /// The step's GECO inputs and their values: λ_k and EMA_k per layer (0 before the first
    /// error), and the EMA's decay (0 until every layer has an EMA, so that the first update
    /// starts it at the error).
    pub fn feeds(&self, spec: &GecoSpec) -> Vec<(String, f64)> {
        let mut feeds: Vec<(String, f64)> = self
            .lambda
            .iter()
            .map(|(l, v)| (format!("{GECO_LAMBDA_PREFIX}{l}"), *v))
            .collect();
        feeds.extend(
            self.ema
                .iter()
                .map(|(l, e)| (format!("{GECO_EMA_PREFIX}{l}"), e.unwrap_or(0.0))),
        );
        let started = self.ema.values().all(Option::is_some);
        feeds.push((
            GECO_EMA_WEIGHT_INPUT.to_string(),
            if started { spec.ema } else { 0.0 },
        ));
        feeds
    }

    /// What a step reads back for GECO, in order: each layer's reconstruction error, then its
    /// next λ and EMA as the step computed them (the `next.*` outputs).
    pub fn read_back(&self) -> Vec<String> {
        let layers = || self.lambda.keys();
        layers()
            .map(|l| format!("{GECO_RECON_PREFIX}{l}"))
            .chain(layers().flat_map(|l| {
                [
                    next_output(&format!("{GECO_LAMBDA_PREFIX}{l}")),
                    next_output(&format!("{GECO_EMA_PREFIX}{l}")),
                ]
            }))
            .collect()
    }

    /// Take λ and the EMA from a step's `next.*` outputs (the values after [`read_back`]'s
    /// reconstruction errors).
    ///
    /// [`read_back`]: Self::read_back
    pub fn take_next(&mut self, next: &[f64]) {
        let layers: Vec<String> = self.lambda.keys().cloned().collect();
        for (layer, pair) in layers.iter().zip(next.chunks(2)) {
            self.lambda.insert(layer.clone(), pair[0]);
            self.ema.insert(layer.clone(), Some(pair[1]));
        }
    }

    /// One update from each layer's reconstruction error of the last step (`recon.layers.k`):
    /// EMA ← ema·EMA + (1 − ema)·r, λ ← λ·exp(lr·(EMA − κ)) within the spec's [min, max].
    pub fn update(&mut self, spec: &GecoSpec, recon: &BTreeMap<String, f64>) {
        for (layer, lambda) in self.lambda.iter_mut() {
            let Some(&r) = recon.get(layer) else { continue };
            let ema = self.ema.entry(layer.clone()).or_insert(None);
            let e = match *ema {
                Some(e) => spec.ema * e + (1.0 - spec.ema) * r,
                None => r,
            };
            *ema = Some(e);
            *lambda = spec.updated(*lambda, e);
        }
    }
}

#[derive(Debug, Clone)]
pub struct TrainSummary {
    pub records: Vec<EpochRecord>,
    pub best: Option<EvalResult>,
    pub best_epoch: usize,
    pub checkpoint: PathBuf,
    /// Set when a resumed run had already reached its target (epochs or `--steps`), so that
    /// nothing was trained and no file was touched.
    pub reached: Option<Reached>,
    /// Set when the run stopped before its last epoch ended: by `--steps`, or interrupted.
    pub stopped: Option<Stopped>,
}

/// Where a run stopped before the end of its last epoch.
#[derive(Debug, Clone, PartialEq)]
pub struct Stopped {
    /// The epoch in progress, and the steps of it taken (`steps_per_epoch`: it had ended).
    pub epoch: usize,
    pub step: usize,
    pub steps_per_epoch: usize,
    /// Optimizer steps of the whole run.
    pub total_steps: usize,
    /// Stopped by `TrainOptions::interrupt` (else by `--steps`).
    pub interrupted: bool,
    /// `last.safetensors` holds the run at this point (false: nothing was trained since the
    /// run started or resumed, so nothing was written).
    pub saved: bool,
}

/// Where a resumed run stood when it had nothing left to train.
#[derive(Debug, Clone, PartialEq)]
pub struct Reached {
    pub epoch: usize,
    pub steps: usize,
    pub epochs: usize,
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
    let first_continuous = || {
        let v = &data.train.values;
        crate::data::first_non_eight_bit(v)
            .map(|k| {
                format!(
                    " (training value [{k}] = {} is not an integer 0..=255)",
                    v[k]
                )
            })
            .unwrap_or_default()
    };
    match spec.input.preprocess {
        Preprocess::DequantizeLogit if !data.discrete => {
            return Err(TrainError::Setup(format!(
                "spec `{}` dequantizes 8-bit data (/input/preprocess = \"dequantize_logit\"), but data set {} is continuous{}; for continuous data use \"preprocess\": \"none\"",
                spec.name,
                data.name,
                first_continuous()
            )));
        }
        // Raw 8-bit values as continuous data give a density on the wrong scale (millions of
        // nats): the likelihood of 8-bit data needs the dequantization.
        Preprocess::None if data.discrete => {
            return Err(TrainError::Setup(format!(
                "data set {} is 8-bit data (every value an integer 0..=255), but spec `{}` treats it as continuous (/input/preprocess = \"none\"); use \"preprocess\": \"dequantize_logit\"",
                data.name, spec.name
            )));
        }
        _ => {}
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

/// The best-validation checkpoint of a run directory.
pub const BEST_CHECKPOINT: &str = "checkpoint.safetensors";
/// The checkpoint written after every epoch, from which `--resume` continues.
pub const LAST_CHECKPOINT: &str = "last.safetensors";
/// One JSON line per epoch ([`EpochRecord`]).
pub const METRICS: &str = "metrics.jsonl";

/// Everything besides the parameters that a run carries from epoch to epoch; with the model
/// it is `last.safetensors`.
#[derive(Debug, Clone)]
pub struct RunState<T> {
    /// Epochs completed.
    pub epoch: usize,
    /// Optimizer steps taken.
    pub total_steps: usize,
    pub adam: AdamState<T>,
    /// The data-order and noise generator.
    pub rng: ChaCha8Rng,
    /// The training split's order (each epoch shuffles it further).
    pub order: Vec<usize>,
    pub geco: Option<Geco>,
    pub best: Option<EvalResult>,
    pub best_epoch: usize,
    /// What the run's steps compute and read, recorded for `--resume`.
    pub options: Option<RunOptions>,
    /// The epoch after `epoch`, when the run stopped in its middle.
    pub partial: Option<EpochProgress>,
}

/// The options of a run that change what a step computes or reads: `--exact` / `--no-fusion`
/// (the rewrite level), `--dtype` and `--data`. `last.safetensors` records them, so that
/// `--resume` continues the same run without repeating them and refuses a flag that differs.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct RunOptions {
    /// `full`, `substitution` (`--no-fusion`) or `none` (`--exact`).
    pub level: String,
    /// `f32` or `f64`.
    pub dtype: String,
    /// What `--data` named (a path), or none for the embedded MNIST digits.
    pub data: Option<String>,
}

/// How `now` differs from the `recorded` options of a run, in the flags' words.
pub fn options_differ(recorded: &RunOptions, now: &RunOptions) -> Option<String> {
    let level = |l: &str| match l {
        "none" => "the exact gradient (--exact)",
        "substitution" => "--no-fusion",
        _ => "the optimized self-normalizing step (neither --exact nor --no-fusion)",
    };
    let data = |d: &Option<String>| match d {
        Some(d) => format!("--data {d}"),
        None => "the embedded MNIST digits (no --data)".to_string(),
    };
    if recorded.level != now.level {
        return Some(format!(
            "the run was trained with {}, not {}",
            level(&recorded.level),
            level(&now.level)
        ));
    }
    if recorded.dtype != now.dtype {
        return Some(format!(
            "the run was trained with --dtype {}, not --dtype {}",
            recorded.dtype, now.dtype
        ));
    }
    if recorded.data != now.data {
        return Some(format!(
            "the run was trained on {}, not {}",
            data(&recorded.data),
            data(&now.data)
        ));
    }
    None
}

/// The options recorded in a run's `last.safetensors` (`None` for a file written before they
/// were recorded).
pub fn recorded_options(last: &Path) -> Result<Option<RunOptions>, TrainError> {
    let bad = |message: String| TrainError::Setup(format!("{}: {message}", last.display()));
    let meta = crate::io::model::header_metadata(last).map_err(bad)?;
    let Some(json) = meta.get(RUN_META) else {
        return Err(bad(format!(
            "has no metadata `{RUN_META}`: not a `last` checkpoint"
        )));
    };
    let run: RunMeta = serde_json::from_str(json)
        .map_err(|e| bad(format!("metadata `{RUN_META}` is invalid: {e}")))?;
    Ok(run.options)
}

/// The spec a run was started with: its `last.safetensors`' metadata `spec` (so that `snfc
/// train --resume RUN` needs no spec).
pub fn recorded_spec(last: &Path) -> Result<FlowSpec, TrainError> {
    let bad = |message: String| TrainError::Setup(format!("{}: {message}", last.display()));
    let meta = crate::io::model::header_metadata(last).map_err(bad)?;
    let text = meta.get("spec").ok_or_else(|| {
        bad("has no metadata `spec`; give the run's spec: `snfc train SPEC --resume RUN`".into())
    })?;
    snfc_compiler::spec::parse_spec(text)
        .map_err(|e| bad(format!("metadata `spec` is invalid: {e}")))
}

/// `last.safetensors`' metadata `run` (JSON), besides the model's own keys.
#[derive(Debug, Serialize, serde::Deserialize)]
struct RunMeta {
    epoch: usize,
    total_steps: usize,
    adam_t: i32,
    /// The generator's key (hex), stream and position (decimal: a u128).
    rng_seed: String,
    rng_stream: u64,
    rng_word_pos: String,
    geco: Option<Geco>,
    best: Option<EvalResult>,
    best_epoch: usize,
    #[serde(default)]
    options: Option<RunOptions>,
    /// Set when the run stopped within an epoch: `order` is then that epoch's, already
    /// shuffled, and the generator stands after its last step's draws.
    #[serde(default)]
    partial: Option<EpochProgress>,
}

const RUN_META: &str = "run";

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<[u8; 32]> {
    let mut out = [0u8; 32];
    if s.len() != 64 {
        return None;
    }
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

/// Write `last.safetensors`: the parameters, Adam's moments (`adam.m.NAME`, `adam.v.NAME`),
/// the data order (`order`, u32) and the rest of `state` as metadata.
pub fn save_last<T: Real>(
    path: &Path,
    model: &Model<T>,
    state: &RunState<T>,
) -> Result<(), TrainError> {
    let bytes = last_bytes(path, model, state)?;
    crate::atomic::write_atomically(path, &bytes).map_err(crate::model::write_error)?;
    Ok(())
}

/// The bytes of [`save_last`]'s file (`path` names it in errors).
pub fn last_bytes<T: Real>(
    path: &Path,
    model: &Model<T>,
    state: &RunState<T>,
) -> Result<Vec<u8>, TrainError> {
    let mut extra = Vec::new();
    for (name, (m, v)) in &state.adam.moments {
        extra.push(RawTensor::of(&format!("adam.m.{name}"), &[m.len()], m));
        extra.push(RawTensor::of(&format!("adam.v.{name}"), &[v.len()], v));
    }
    let order: Vec<u32> = state.order.iter().map(|&i| i as u32).collect();
    extra.push(RawTensor::of_u32("order", &order));
    let meta = RunMeta {
        epoch: state.epoch,
        total_steps: state.total_steps,
        adam_t: state.adam.t,
        rng_seed: hex(&state.rng.get_seed()),
        rng_stream: state.rng.get_stream(),
        rng_word_pos: state.rng.get_word_pos().to_string(),
        geco: state.geco.clone(),
        best: state.best.clone(),
        best_epoch: state.best_epoch,
        options: state.options.clone(),
        partial: state.partial.clone(),
    };
    let json = serde_json::to_string(&meta)
        .map_err(|e| TrainError::Setup(format!("cannot encode the run state: {e}")))?;
    let metadata = HashMap::from([
        (RUN_META.to_string(), json),
        ("dtype".to_string(), T::NAME.to_string()),
        ("epoch".to_string(), state.epoch.to_string()),
        ("steps".to_string(), state.total_steps.to_string()),
    ]);
    Ok(model.to_bytes(path, &extra, metadata)?)
}

/// Where the spec a run was started with (`run`) and the spec given now differ, one entry per
/// JSON leaf: `/train/optimizer/adam/lr: 0.0001 in the run, 0.0003 now` (at most ten, then a
/// count). The epoch count is not compared: raising it is what resuming is for.
pub fn spec_differences(run: &FlowSpec, now: &FlowSpec) -> Vec<String> {
    fn walk(path: &str, a: &serde_json::Value, b: &serde_json::Value, out: &mut Vec<String>) {
        use serde_json::Value;
        match (a, b) {
            (Value::Object(x), Value::Object(y)) => {
                let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
                for k in keys {
                    let at = format!("{path}/{}", k.replace('~', "~0").replace('/', "~1"));
                    match (x.get(k), y.get(k)) {
                        (Some(u), Some(v)) => walk(&at, u, v, out),
                        (Some(u), None) => out.push(format!("{at}: {u} in the run, absent now")),
                        (None, Some(v)) => out.push(format!("{at}: absent in the run, {v} now")),
                        (None, None) => {}
                    }
                }
            }
            (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
                for (i, (u, v)) in x.iter().zip(y).enumerate() {
                    walk(&format!("{path}/{i}"), u, v, out);
                }
            }
            (Value::Array(x), Value::Array(y)) => out.push(format!(
                "{path}: {} entries in the run, {} now",
                x.len(),
                y.len()
            )),
            _ if a != b => out.push(format!("{path}: {a} in the run, {b} now")),
            _ => {}
        }
    }
    let json = |s: &FlowSpec| {
        let mut s = s.clone();
        s.train.epochs = 0;
        serde_json::to_value(&s).unwrap_or(serde_json::Value::Null)
    };
    let mut out = Vec::new();
    walk("", &json(run), &json(now), &mut out);
    if out.len() > 10 {
        let more = out.len() - 10;
        out.truncate(10);
        out.push(format!("and {more} more"));
    }
    out
}

/// Rank 0's parameter values on every rank, in name order, through one broadcast of their f64
/// bytes (exact for f32 values too).
fn broadcast_parameters<T: Real>(
    model: &mut Model<T>,
    comm: &dyn crate::distributed::Communicator,
) {
    let mut names: Vec<String> = model.values.keys().cloned().collect();
    names.sort();
    let mut bytes = Vec::new();
    if comm.rank() == 0 {
        for name in &names {
            for v in model.values[name].iter() {
                bytes.extend_from_slice(&v.as_f64().to_le_bytes());
            }
        }
    }
    comm.broadcast_bytes(0, &mut bytes);
    let mut words = bytes.chunks_exact(8).map(|c| {
        let mut word = [0u8; 8];
        word.copy_from_slice(c);
        T::of_f64(f64::from_le_bytes(word))
    });
    for name in &names {
        let len = model.values[name].len();
        let values: Vec<T> = words.by_ref().take(len).collect();
        model.values.insert(name.clone(), Arc::new(values));
    }
}

/// The drift guard of data-parallel training: every rank applied the same averaged gradients
/// to the same parameters, so their parameters are bit for bit rank 0's. A rank whose are not
/// stops the job rather than train on as another model.
fn same_parameters_on_every_rank<T: Real>(
    model: &Model<T>,
    comm: &dyn crate::distributed::Communicator,
    epoch: usize,
) -> Result<(), TrainError> {
    // FNV-1a over every parameter's values, in name order.
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut names: Vec<&String> = model.values.keys().collect();
    names.sort();
    for name in names {
        for v in model.values[name].iter() {
            hash = (hash ^ v.as_f64().to_bits()).wrapping_mul(0x0100_0000_01b3);
        }
    }
    let mut leader = hash.to_le_bytes().to_vec();
    comm.broadcast_bytes(0, &mut leader);
    if leader != hash.to_le_bytes() {
        return Err(TrainError::Setup(format!(
            "rank {} of {}: after epoch {epoch} its parameters differ from rank 0's; the ranks \
             no longer train one model (the last complete checkpoint is intact)",
            comm.rank(),
            comm.size()
        )));
    }
    Ok(())
}

/// Read `last.safetensors` back for a run of `spec` on a training split of `n_train`
/// examples; every mismatch is an error naming the file and what differs.
pub fn load_last<T: Real>(
    path: &Path,
    spec: &FlowSpec,
    n_train: usize,
) -> Result<(Model<T>, RunState<T>), TrainError> {
    // One read: the model and Adam's moments come from the same bytes.
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    load_last_bytes(&bytes, path, spec, n_train)
}

/// [`load_last`] of the bytes of `path` (read on rank 0 and broadcast to the other ranks).
pub fn load_last_bytes<T: Real>(
    bytes: &[u8],
    path: &Path,
    spec: &FlowSpec,
    n_train: usize,
) -> Result<(Model<T>, RunState<T>), TrainError> {
    let bad = |message: String| TrainError::Setup(format!("{}: {message}", path.display()));
    let (model, meta) = Model::<T>::from_bytes(bytes, path, None)?;
    // The epoch count may grow between runs (that is what resuming is for); nothing else.
    let same_spec = {
        let (mut a, mut b) = (model.spec.clone(), spec.clone());
        a.train.epochs = 0;
        b.train.epochs = 0;
        a == b
    };
    if !same_spec {
        return Err(bad(format!(
            "was written by a run of a different spec (`{}`): {}; resume with the spec the run \
             started with (it is stored in this file's metadata `spec`), or start over with --force",
            model.spec.name,
            spec_differences(&model.spec, spec).join("; ")
        )));
    }
    match meta.get("dtype").map(String::as_str) {
        Some(d) if d == T::NAME => {}
        other => {
            return Err(bad(format!(
                "was written by a {} run; resume with --dtype {}",
                other.unwrap_or("(unknown dtype)"),
                other.unwrap_or("f32")
            )))
        }
    }
    let run: RunMeta = meta
        .get(RUN_META)
        .ok_or_else(|| {
            bad(format!(
                "has no metadata `{RUN_META}`: not a `last` checkpoint"
            ))
        })
        .and_then(|j| {
            serde_json::from_str(j)
                .map_err(|e| bad(format!("metadata `{RUN_META}` is invalid: {e}")))
        })?;
    let seed = unhex(&run.rng_seed).ok_or_else(|| {
        bad(format!(
            "metadata `{RUN_META}`: rng_seed is not 64 hex digits"
        ))
    })?;
    let word_pos: u128 = run
        .rng_word_pos
        .parse()
        .map_err(|e| bad(format!("metadata `{RUN_META}`: rng_word_pos: {e}")))?;
    let mut rng = ChaCha8Rng::from_seed(seed);
    rng.set_stream(run.rng_stream);
    rng.set_word_pos(word_pos);

    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| bad(format!("not a safetensors file: {e}")))?;
    let mut moments = BTreeMap::new();
    for p in &model.params {
        let (m_name, v_name) = (format!("adam.m.{}", p.name), format!("adam.v.{}", p.name));
        let (Ok(m), Ok(v)) = (st.tensor(&m_name), st.tensor(&v_name)) else {
            continue;
        };
        let n = p.shape.iter().product::<usize>();
        moments.insert(
            p.name.clone(),
            (
                tensor_values(path, &m_name, &m, &[n])?,
                tensor_values(path, &v_name, &v, &[n])?,
            ),
        );
    }
    if run.adam_t > 0 && moments.is_empty() && !model.params.is_empty() {
        return Err(bad(format!(
            "Adam took {} steps but no `adam.m.*` moments are stored",
            run.adam_t
        )));
    }
    let order_view = st
        .tensor("order")
        .map_err(|_| bad("has no tensor `order` (the data order)".into()))?;
    if order_view.dtype() != safetensors::Dtype::U32 || order_view.shape().len() != 1 {
        return Err(bad(format!(
            "tensor `order` has dtype {:?} and shape {:?}; expected U32 [n]",
            order_view.dtype(),
            order_view.shape()
        )));
    }
    let order: Vec<usize> = order_view
        .data()
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    let mut seen = vec![false; n_train];
    let permutation = order.len() == n_train
        && order
            .iter()
            .all(|&i| i < n_train && !std::mem::replace(&mut seen[i], true));
    if !permutation {
        return Err(bad(format!(
            "the run trained on {} examples, this training split has {n_train}; resume with \
             the same --data",
            order.len()
        )));
    }
    let steps_per_epoch = n_train / spec.train.batch_size.max(1);
    if let Some(p) = &run.partial {
        if p.steps == 0 || p.steps >= steps_per_epoch {
            return Err(bad(format!(
                "metadata `{RUN_META}`: stopped after step {} of an epoch of {steps_per_epoch} \
                 steps",
                p.steps
            )));
        }
    }
    Ok((
        model,
        RunState {
            epoch: run.epoch,
            total_steps: run.total_steps,
            adam: AdamState {
                t: run.adam_t,
                moments,
            },
            rng,
            order,
            geco: run.geco,
            best: run.best,
            best_epoch: run.best_epoch,
            options: run.options,
            partial: run.partial,
        },
    ))
}

/// Keep the lines of `metrics.jsonl` up to epoch `epoch` (a run killed after writing an
/// epoch's line but before its `last` checkpoint repeats that epoch) and drop a torn last line.
fn truncate_metrics(path: &Path, epoch: usize) -> Result<(), TrainError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(path)(e)),
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("epoch")?.as_u64())
                .is_some_and(|e| e as usize <= epoch)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    if kept != text {
        crate::atomic::write_atomically(path, kept.as_bytes())
            .map_err(|e| TrainError::Setup(e.to_string()))?;
    }
    Ok(())
}

/// The files of an earlier run in `out` (checkpoints, metrics).
fn earlier_run_files(out: &Path) -> Vec<PathBuf> {
    [BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS]
        .iter()
        .map(|f| out.join(f))
        // An empty metrics file is a run that never finished an epoch (`--epochs 0`, or
        // stopped during its first): nothing to keep, so it does not block the directory.
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| !(p.ends_with(METRICS) && m.len() == 0)))
        .collect()
}

/// `--force`: move an earlier run's files into `out/previous-N` (the first free N), so
/// nothing is destroyed; returns that directory.
fn keep_aside(out: &Path, files: &[PathBuf]) -> Result<PathBuf, TrainError> {
    let dir = (1..)
        .map(|n| out.join(format!("previous-{n}")))
        .find(|d| !d.exists())
        .unwrap_or_else(|| out.join("previous"));
    std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    for f in files {
        if let Some(name) = f.file_name() {
            std::fs::rename(f, dir.join(name)).map_err(io_err(f))?;
        }
    }
    Ok(dir)
}

/// Remove temporary files that a run killed in the middle of a checkpoint write left behind.
fn remove_stale_temporaries(out: &Path) {
    let Ok(entries) = std::fs::read_dir(out) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().to_string();
        let ours = [BEST_CHECKPOINT, LAST_CHECKPOINT, METRICS]
            .iter()
            .any(|f| name.starts_with(&format!(".{f}.tmp-")));
        if ours {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What a run has on disk: where `last.safetensors` stands and the best checkpoint's epoch.
#[derive(Debug, Clone, Default)]
struct OnDisk {
    /// "after epoch 3, step 270 of the run" (none: not written by this run).
    last: Option<String>,
    best_epoch: Option<usize>,
}

impl OnDisk {
    fn last_at(state_epoch: usize, total_steps: usize, partial: Option<&EpochProgress>) -> String {
        match partial {
            Some(p) => format!(
                "at step {} of epoch {}, step {total_steps} of the run",
                p.steps,
                state_epoch + 1
            ),
            None => format!("after epoch {state_epoch}, step {total_steps} of the run"),
        }
    }

    /// The files that hold the run, in words.
    fn describe(&self, out: &Path) -> String {
        let mut files = Vec::new();
        if let Some(at) = &self.last {
            files.push(format!("{} ({at})", out.join(LAST_CHECKPOINT).display()));
        }
        if let Some(e) = self.best_epoch {
            files.push(format!(
                "{} (epoch {e}, the best validation NLL)",
                out.join(BEST_CHECKPOINT).display()
            ));
        }
        match files.len() {
            0 => "nothing was saved".to_string(),
            1 => format!("{} is intact", files[0]),
            _ => format!("{} are intact", files.join(" and ")),
        }
    }
}

/// A non-finite loss or gradient: the error that stops the run, with where and why.
fn diverged(
    spec: &FlowSpec,
    out: &Path,
    on_disk: &OnDisk,
    geco: Option<&Geco>,
    (epoch, step, total): (usize, usize, usize),
    what: &str,
) -> TrainError {
    let lambda = match spec.objective.lambda.geco() {
        Some(_) => "GECO λ".to_string(),
        None => format!("λ = {}", spec.objective.lambda.initial()),
    };
    // GECO's multiplicative update has no ceiling: a λ grown huge is the likelier cause.
    let grown = geco.and_then(|g| {
        g.lambda
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .filter(|(_, v)| **v > 1e6 || !v.is_finite())
    });
    let cause = if let Some((layer, v)) = grown {
        format!(
            "GECO's λ for {layer} has grown to {v:.3e}, so the reconstruction term swamps the loss: the reconstruction error stayed above κ = {} (/objective/lambda/geco/kappa) and λ ← λ·exp(lr·(EMA − κ)) grew without bound; raise κ or lower /objective/lambda/geco/lr",
            spec.objective.lambda.geco().map(|g| g.kappa).unwrap_or(0.0)
        )
    } else if spec.objective.gradient == GradientMode::SelfNormalizing {
        format!(
            "the self-normalizing layers' learned inverses may have drifted from W⁻¹: {lambda} \
             (/objective/lambda) may be too small (the paper's Table 4 finds small λ unstable), \
             or the learning rate /train/optimizer/adam/lr = {} too large",
            spec.train.optimizer.adam.lr
        )
    } else {
        format!(
            "the learning rate /train/optimizer/adam/lr = {} may be too large (try warm-up or \
             /train/grad_clip_norm)",
            spec.train.optimizer.adam.lr
        )
    };
    let kept = on_disk.describe(out);
    TrainError::Diverged(format!(
        "training diverged at epoch {epoch}, step {step} (step {total} of the run): {what}; \
         {cause}; {kept}"
    ))
}

/// Train `spec` on `data` in precision `T`, writing `metrics.jsonl`, the best-validation
/// `checkpoint.safetensors` and, after every epoch, `last.safetensors` into `opts.out`
/// (continued from there with `opts.resume`).
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
    let comm = opts.comm.clone();
    let (rank, ranks) = (comm.rank(), comm.size());
    if !batch.is_multiple_of(ranks) {
        return Err(TrainError::Setup(format!(
            "/train/batch_size {batch} is the global batch, split evenly over the {ranks} ranks \
             of this job: it must be a multiple of {ranks} (each rank takes batch_size / {ranks} \
             rows)"
        )));
    }
    if ranks > 1 && opts.angle_every.is_some() {
        return Err(TrainError::Setup(format!(
            "--angle-every measures one process's batch: run it without mpirun ({})",
            comm.describe()
        )));
    }
    // This rank's rows of each global batch, and the batch its plan runs at.
    let rows = shard(batch, rank, ranks);
    let local_batch = rows.len();
    // Rank 0 alone reports and writes.
    let leader = rank == 0;
    let progress = opts.progress && leader;
    let left_out = data.train.n % batch;
    if left_out > 0 && progress {
        eprintln!(
            "note: /train/batch_size {batch} does not divide the {} training examples of {}: each epoch runs {steps_per_epoch} full batches and leaves out {left_out} examples (different ones each epoch, as the order is shuffled)",
            data.train.n, data.name
        );
    }
    let checkpoint = opts.out.join(BEST_CHECKPOINT);
    let last_path = opts.out.join(LAST_CHECKPOINT);
    let metrics_path = opts.out.join(METRICS);
    // One run per directory: rank 0 holds the lock for the run's life, before it looks at
    // what the directory holds (a run that cannot start removes a directory it created).
    let _lock = if leader {
        let lock = crate::run_lock::RunLock::acquire(&opts.out)
            .map_err(|e| TrainError::Setup(e.to_string()))?;
        if let (Some(pid), true) = (lock.stale_pid, progress) {
            eprintln!(
                "note: {}: the run of pid {pid} did not end cleanly (killed?); this run takes \
                 the directory over",
                opts.out.display()
            );
        }
        Some(lock)
    } else {
        None
    };
    // Rank 0 looks at the directory (the others may not see it) and tells them what it found.
    let earlier = if leader {
        earlier_run_files(&opts.out)
    } else {
        Vec::new()
    };
    let mut last_bytes_read = Vec::new();
    let mut found = vec![0u8; 2];
    if leader {
        found = vec![
            u8::from(opts.resume && last_path.exists()),
            u8::from(!earlier.is_empty()),
        ];
    }
    comm.broadcast_bytes(0, &mut found);
    let (resume, has_earlier) = (found[0] == 1, found[1] == 1);
    if opts.resume && !resume {
        let holds = if earlier.is_empty() {
            "no run".to_string()
        } else {
            format!(
                "{} but no run to continue",
                earlier
                    .iter()
                    .filter_map(|p| p.file_name())
                    .map(|n| n.to_string_lossy().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        return Err(TrainError::Setup(format!(
            "--resume: {} does not exist ({} holds {holds}); start the run without --resume{}",
            last_path.display(),
            opts.out.display(),
            if earlier.is_empty() {
                ""
            } else {
                " and with --force (the files there are moved to previous-N)"
            }
        )));
    }
    if !opts.resume && !opts.force && has_earlier {
        return Err(TrainError::Setup(format!(
            "{} already holds a run ({}); pass --resume to continue it, or --force to start over \
             (the earlier files are moved to {}/previous-N, not deleted)",
            opts.out.display(),
            earlier
                .iter()
                .filter_map(|p| p.file_name())
                .map(|n| n.to_string_lossy().to_string())
                .collect::<Vec<_>>()
                .join(", "),
            opts.out.display()
        )));
    }
    let seed = opts.seed.unwrap_or(tr.seed);
    let resumed = if resume {
        // Rank 0 reads the run's state and every rank continues from the same bytes, so a run
        // may be resumed with another number of ranks (the state is global).
        let mut ok = vec![1u8];
        if leader {
            match std::fs::read(&last_path) {
                Ok(b) => last_bytes_read = b,
                Err(e) => {
                    ok[0] = 0;
                    comm.broadcast_bytes(0, &mut ok);
                    return Err(io_err(&last_path)(e));
                }
            }
        }
        comm.broadcast_bytes(0, &mut ok);
        if ok[0] == 0 {
            return Err(TrainError::Setup(format!(
                "{}: rank 0 could not read it",
                last_path.display()
            )));
        }
        comm.broadcast_bytes(0, &mut last_bytes_read);
        Some(load_last_bytes::<T>(
            &last_bytes_read,
            &last_path,
            spec,
            data.train.n,
        )?)
    } else {
        None
    };
    if let (Some(seed), true) = (opts.seed, resume) {
        return Err(TrainError::Setup(format!(
            "--seed {seed}: {} continues its own random stream (data order, noise and \
             augmentation are stored in it), so a seed has no effect; leave --seed out, or start \
             over with --force",
            last_path.display()
        )));
    }
    // A resumed run computes and reads what it did before, or is refused by name.
    let run_options = RunOptions {
        level: snfc_compiler::plan::level_name(opts.level).to_string(),
        dtype: T::NAME.to_string(),
        data: opts.data.clone(),
    };
    if let Some(recorded) = resumed.as_ref().and_then(|(_, s)| s.options.as_ref()) {
        if let Some(what) = options_differ(recorded, &run_options) {
            return Err(TrainError::Setup(format!(
                "{}: {what}; resume without the differing option (the run's own are reused), or start over with --force",
                last_path.display()
            )));
        }
    }
    // The step on its device first: a run that cannot start leaves the output directory alone.
    let plan = match &opts.plan {
        Some(p) if ranks > 1 => {
            return Err(TrainError::Setup(format!(
                "--plan: a plan is compiled for one process's batch; under {} each rank \
                 compiles its step at batch {local_batch} (leave --plan out)",
                comm.describe()
            )))
        }
        Some(p) => p.clone(),
        None => Plan::for_level(
            &compile_train(spec, local_batch, opts.level)?.step,
            opts.level,
        ),
    };
    let mut backend = open::<T>(&opts.device, plan, opts.matmul)?;
    if leader {
        std::fs::create_dir_all(&opts.out).map_err(io_err(&opts.out))?;
        remove_stale_temporaries(&opts.out);
    }
    if leader && !resume && !earlier.is_empty() {
        let dir = keep_aside(&opts.out, &earlier)?;
        eprintln!(
            "--force: moved the earlier run's files to {}",
            dir.display()
        );
    }

    let epochs = opts.epochs.unwrap_or(tr.epochs);
    let max_steps = opts.steps.unwrap_or(usize::MAX);
    let (mut model, mut state) = match resumed {
        Some((_, state)) if state.epoch >= epochs || state.total_steps >= max_steps => {
            // Nothing to train: the files stay as they are.
            return Ok(TrainSummary {
                records: Vec::new(),
                best: state.best,
                best_epoch: state.best_epoch,
                checkpoint,
                reached: Some(Reached {
                    epoch: state.epoch,
                    steps: state.total_steps,
                    epochs,
                }),
                stopped: None,
            });
        }
        Some((model, state)) => {
            if leader {
                truncate_metrics(&metrics_path, state.epoch)?;
            }
            backend.set_adam_state(&state.adam)?;
            if progress {
                eprintln!(
                    "resuming {} {}",
                    last_path.display(),
                    OnDisk::last_at(state.epoch, state.total_steps, state.partial.as_ref())
                );
            }
            (model, state)
        }
        None => (
            Model::<T>::init(spec, seed),
            RunState {
                epoch: 0,
                total_steps: 0,
                adam: AdamState::default(),
                rng: ChaCha8Rng::seed_from_u64(seed ^ 0x5eed_da7a),
                order: (0..data.train.n).collect(),
                geco: Geco::new(spec),
                best: None,
                best_epoch: 0,
                options: None,
                partial: None,
            },
        ),
    };
    if ranks > 1 && !resume {
        // Horovod's broadcast_parameters: every rank starts from rank 0's model (a resumed run
        // already read rank 0's bytes).
        broadcast_parameters(&mut model, comm.as_ref());
    }
    state.options = Some(run_options);
    let mut metrics = if leader {
        Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics_path)
                .map_err(io_err(&metrics_path))?,
        )
    } else {
        None
    };
    for (name, v) in &model.values {
        backend.set(name, v)?;
    }
    if let (Some(g), Some(gs)) = (&state.geco, spec.objective.lambda.geco()) {
        for (name, v) in g.feeds(gs) {
            backend.set(&name, &[T::of_f64(v)])?;
        }
    }
    let adam_spec = &tr.optimizer.adam;
    let warmup_steps = (tr.warmup_epochs * steps_per_epoch) as f64;
    let d = spec.input.dim();
    let dequantize = spec.input.preprocess == Preprocess::DequantizeLogit;
    // The global batch (every rank draws it, so data order, noise and augmentation are those
    // of one process), and this rank's rows of it.
    let mut x = vec![T::zero(); d * batch];
    let mut noise = vec![T::zero(); d * batch];
    let mut records = Vec::new();
    let mut writer = crate::atomic::BackgroundWriter::new();
    // Read back after every step, in one read: the loss, the f-flow's data terms of the NLL,
    // and GECO's per-layer reconstruction errors and next λ and EMA (GECO's layers are fixed
    // for the run).
    let mut read_back = vec!["loss".to_string(), "nll_data".to_string()];
    if let Some(g) = &state.geco {
        read_back.extend(g.read_back());
    }
    let probe = match opts.angle_every {
        Some(0) => {
            return Err(TrainError::Setup(
                "--angle-every must be at least 1".to_string(),
            ))
        }
        Some(_) => Some(AngleProbe::new(spec, batch)?.ok_or_else(|| {
            TrainError::Setup(format!(
                "--angle-every: spec `{}` has no self-normalizing layer to compare with the exact gradient",
                spec.name
            ))
        })?),
        None => None,
    };
    let mut on_disk = match resume {
        true => OnDisk {
            last: Some(OnDisk::last_at(
                state.epoch,
                state.total_steps,
                state.partial.as_ref(),
            )),
            best_epoch: state.best.is_some().then_some(state.best_epoch),
        },
        false => OnDisk::default(),
    };

    // Each step sets the schedule's rate; which parameters are R is fixed for the run.
    let mut rates = LearningRates::for_spec(spec, adam_spec.lr);
    // A stop asked for by `opts.interrupt`: alone, read before every step; with several ranks,
    // summed over them with every step's loss, so that all stop after the same step.
    let mut stop_asked = false;
    let interrupt = || opts.interrupt.load(Ordering::Relaxed);
    let mut steps_this_run = 0;
    let mut stopped = None;
    for epoch in state.epoch + 1..=epochs {
        if state.total_steps >= max_steps {
            break;
        }
        stop_asked |= ranks == 1 && interrupt();
        if stop_asked {
            // Between epochs: the last epoch's files are written (or being written).
            stopped = Some(Stopped {
                epoch: epoch - 1,
                step: steps_per_epoch,
                steps_per_epoch,
                total_steps: state.total_steps,
                interrupted: true,
                saved: steps_this_run > 0,
            });
            break;
        }
        let started = Instant::now();
        // An epoch that a stopped run left in its middle goes on from there: its order is
        // shuffled already and the generator stands after the last step's draws.
        let earlier = state.partial.take().unwrap_or_default();
        if earlier.steps == 0 {
            state.order.shuffle(&mut state.rng);
        }
        let bar = if progress {
            ProgressBar::new(steps_per_epoch as u64)
        } else {
            ProgressBar::hidden()
        };
        bar.set_style(
            ProgressStyle::with_template(
                "epoch {prefix} [{bar:30}] step {pos}/{len} {msg} {elapsed_precise} (ETA {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("{epoch}/{epochs}"));
        bar.set_position(earlier.steps as u64);
        let mut loss_sum = earlier.loss_sum;
        let mut nll_data_sum = earlier.nll_data_sum;
        let mut steps = earlier.steps;
        let mut reduce_secs = earlier.all_reduce_seconds;
        let mut angles = earlier.angles;
        let mut lr = adam_spec.lr;
        let mut interrupted = false;
        for s in earlier.steps..steps_per_epoch {
            if state.total_steps >= max_steps {
                break;
            }
            stop_asked |= ranks == 1 && interrupt();
            if stop_asked {
                interrupted = true;
                break;
            }
            fill_columns(
                &data.train,
                &state.order[s * batch..(s + 1) * batch],
                batch,
                &mut x,
            );
            if let [c, h, w] = spec.input.shape.as_slice() {
                if tr.augment.flips() {
                    hflip(&mut x, [*c, *h, *w], batch, &mut state.rng);
                }
                if tr.augment.pad_crops() {
                    pad_crop(&mut x, [*c, *h, *w], batch, &mut state.rng);
                }
            }
            if ranks == 1 {
                backend.set(INPUT_X, &x)?;
            } else {
                backend.set(INPUT_X, &columns(&x, batch, rows.clone()))?;
            }
            // A GPU draws the noise itself from a seed of the run's generator (so a resumed
            // run draws the same), except for Actnorm's initializing batch, whose noise the
            // host needs too, and under MPI, where every rank takes its rows of one draw.
            let device_noise = opts.device_noise
                && backend.draws_on_device()
                && model.data_initialized
                && ranks == 1;
            if dequantize && device_noise {
                backend.draw(
                    INPUT_NOISE,
                    rand::RngExt::random(&mut state.rng),
                    Draw::Uniform,
                )?;
            } else if dequantize {
                fill_uniform(&mut state.rng, &mut noise);
                if ranks == 1 {
                    backend.set(INPUT_NOISE, &noise)?;
                } else {
                    backend.set(INPUT_NOISE, &columns(&noise, batch, rows.clone()))?;
                }
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
            if let (Some(probe), Some(every)) = (&probe, opts.angle_every) {
                if (state.total_steps + 1).is_multiple_of(every) {
                    let mut feeds: crate::host::exec::Feeds<T> = HashMap::new();
                    for name in model.values.keys() {
                        feeds.insert(name.clone(), Arc::new(backend.fed(name)?));
                    }
                    feeds.insert(INPUT_X.to_string(), Arc::new(x.clone()));
                    if dequantize {
                        feeds.insert(INPUT_NOISE.to_string(), Arc::new(noise.clone()));
                    }
                    if let (Some(g), Some(gs)) = (&state.geco, spec.objective.lambda.geco()) {
                        for (name, v) in g.feeds(gs) {
                            feeds.insert(name, Arc::new(vec![T::of_f64(v)]));
                        }
                    }
                    angles.push(probe.measure(&feeds_f64(&feeds))?);
                }
            }
            backend.run()?;
            // The loss, the reconstruction errors and the gradients' health, read back
            // together (on a GPU, the step's one device read). With clipping
            // (`train.grad_clip_norm`) the global norm is one reduction over every gradient,
            // and a finite norm means finite gradients; without it the gradients are checked
            // for non-finite values (host: a scan of memory the step just wrote; GPU: the
            // device-side sums of squares).
            let clip = tr.grad_clip_norm.is_some();
            // Every rank's gradients, loss and reconstruction errors are means over its rows:
            // their mean over the ranks is the global batch's, so with several ranks the
            // gradients are checked after their all-reduce.
            let mut checked = if ranks == 1 {
                Some(backend.step_readback(&read_back, clip)?)
            } else {
                None
            };
            let mut values = match checked.as_mut() {
                Some(c) => std::mem::take(&mut c.scalars),
                None => backend.scalars(&read_back)?,
            };
            if ranks > 1 {
                let reduce_started = Instant::now();
                backend.all_reduce_grads(comm.as_ref())?;
                values.push(f64::from(u8::from(interrupt())));
                all_reduce_sum(comm.as_ref(), &mut values);
                stop_asked |= values.pop().is_some_and(|asked| asked > 0.0);
                values.iter_mut().for_each(|v| *v /= ranks as f64);
                reduce_secs += reduce_started.elapsed().as_secs_f64();
            }
            state.total_steps += 1;
            lr = if warmup_steps > 0.0 {
                adam_spec.lr * (state.total_steps as f64 / warmup_steps).min(1.0)
            } else {
                adam_spec.lr
            };
            let loss = values[0];
            let checked = match checked {
                Some(c) => c,
                None => backend.step_readback(&[], clip)?,
            };
            let norm = checked.norm;
            let problem = if !loss.is_finite() {
                Some(format!("the loss is {loss}"))
            } else if let Some(name) = checked.nonfinite {
                Some(format!("the gradient of `{name}` has a non-finite value"))
            } else {
                norm.filter(|n| !n.is_finite())
                    .map(|n| format!("the gradient norm is {n}"))
            };
            if let Some(what) = problem {
                bar.finish_and_clear();
                return Err(diverged(
                    spec,
                    &opts.out,
                    &on_disk,
                    state.geco.as_ref(),
                    (epoch, s + 1, state.total_steps),
                    &what,
                ));
            }
            loss_sum += loss;
            nll_data_sum += values[1];
            if let (Some(g), Some(gs)) = (state.geco.as_mut(), spec.objective.lambda.geco()) {
                let layers = g.lambda.len();
                if ranks == 1 {
                    // The step computed λ and the EMA on the device: keep them there for the
                    // next step, and a copy here for the log and the checkpoint. The EMA's
                    // decay is fed once, after the first step.
                    let first = g.ema.values().any(Option::is_none);
                    g.take_next(&values[2 + layers..2 + 3 * layers]);
                    backend.carry()?;
                    if first {
                        backend.set(GECO_EMA_WEIGHT_INPUT, &[T::of_f64(gs.ema)])?;
                    }
                } else {
                    // Each rank's step saw its own rows: the update follows the global
                    // batch's errors (the mean over the ranks), the same on every rank.
                    let recon: BTreeMap<String, f64> = g
                        .lambda
                        .keys()
                        .cloned()
                        .zip(values[2..2 + layers].iter().copied())
                        .collect();
                    g.update(gs, &recon);
                    for (name, v) in g.feeds(gs) {
                        backend.set(&name, &[T::of_f64(v)])?;
                    }
                }
            }
            // Clipping by global norm: every gradient scaled by min(1, clip / ‖g‖).
            let grad_scale = match (tr.grad_clip_norm, norm) {
                (Some(clip), Some(norm)) => (clip / norm).min(1.0),
                _ => 1.0,
            };
            rates.base = lr;
            backend.adam_step(&rates, adam_spec.betas, adam_spec.eps, grad_scale)?;
            steps += 1;
            steps_this_run += 1;
            let secs = earlier.train_seconds + started.elapsed().as_secs_f64();
            bar.set_message(format!(
                "loss {:.2}  {:.0} ex/s",
                loss_sum / steps as f64,
                (steps * batch) as f64 / secs
            ));
            bar.inc(1);
        }
        let train_secs = earlier.train_seconds + started.elapsed().as_secs_f64();
        bar.finish_and_clear();
        let complete = steps == steps_per_epoch;
        if interrupted && steps_this_run == 0 {
            // Nothing trained since the run started or resumed: nothing to write.
            stopped = Some(Stopped {
                epoch,
                step: steps,
                steps_per_epoch,
                total_steps: state.total_steps,
                interrupted: true,
                saved: false,
            });
            break;
        }
        // The parameters as trained (on a GPU they live on the device).
        let names: Vec<String> = model.values.keys().cloned().collect();
        for name in names {
            let v = backend.fed(&name)?;
            if v.iter().any(|x| !x.as_f64().is_finite()) {
                // Finite gradients, but an update overflowed: nothing of this epoch is saved.
                let what = format!("parameter `{name}` became non-finite in an Adam update");
                return Err(diverged(
                    spec,
                    &opts.out,
                    &on_disk,
                    state.geco.as_ref(),
                    (epoch, steps, state.total_steps),
                    &what,
                ));
            }
            model.values.insert(name, Arc::new(v));
        }
        if ranks > 1 {
            same_parameters_on_every_rank(&model, comm.as_ref(), epoch)?;
        }
        let mut files = Vec::new();
        // An interrupted run writes its state at once; an epoch's end, or a `--steps` stop
        // within one, is validated and logged first.
        if !interrupted {
            // The data-independent Σ ln|det W| of the parameters as they are now, once for the
            // validation NLL and the training NLL both.
            let logdets = logdet_sum(&model);
            let counter = crate::progress::Progress::new(
                data.valid.n as u64,
                &format!("epoch {epoch}/{epochs}: validation"),
                "examples",
                progress,
            );
            let options = EvalOptions {
                batch: batch.max(100),
                noise_seed: 0,
                device: &Chosen::Host,
                comm: comm.as_ref(),
                progress: &counter,
            };
            let val = evaluate_given_logdets(&model.cast::<f64>(), logdets, &data.valid, &options)?;
            let train_nll = nll_data_sum / steps.max(1) as f64 - logdets;
            let record = EpochRecord {
                epoch,
                steps: state.total_steps,
                train_nll_nats: train_nll,
                train_bits_per_dim: train_nll / (d as f64 * std::f64::consts::LN_2),
                train_objective_data_terms: loss_sum / steps.max(1) as f64,
                val_nll_nats: val.nll_nats,
                val_bits_per_dim: val.bits_per_dim,
                val_recon: val.recon,
                lr,
                seconds: earlier.seconds + started.elapsed().as_secs_f64(),
                examples_per_sec: (steps * batch) as f64 / train_secs,
                lambda: state.geco.as_ref().map(|g| g.lambda.clone()),
                grad_angle_deg: AngleStats::of(&angles),
                ranks,
                all_reduce_seconds: (ranks > 1).then_some(reduce_secs),
                partial: !complete,
            };
            if let Some(metrics) = metrics.as_mut() {
                let line = serde_json::to_string(&record).unwrap_or_default();
                writeln!(metrics, "{line}")
                    .and_then(|()| metrics.sync_data())
                    .map_err(io_err(&metrics_path))?;
            }
            if progress {
                eprintln!(
                    "epoch {epoch}/{epochs}{}: train NLL {:.2}, validation NLL {:.2} nats ({:.4} bits/dim){}{}, {:.1} s, {:.0} examples/s",
                    if complete {
                        String::new()
                    } else {
                        format!(" (steps 1–{steps} of {steps_per_epoch})")
                    },
                    record.train_nll_nats,
                    val.nll_nats,
                    val.bits_per_dim,
                    val.recon.map(|r| format!(", recon {r:.3e}")).unwrap_or_default(),
                    record
                        .grad_angle_deg
                        .as_ref()
                        .map(|a| format!(", gradient angle {:.3}°", a.mean))
                        .unwrap_or_default(),
                    record.seconds,
                    record.examples_per_sec
                );
            }
            let improved = state
                .best
                .as_ref()
                .is_none_or(|b| val.nll_nats < b.nll_nats)
                && val.nll_nats.is_finite();
            if improved {
                let mut meta = HashMap::from([
                    ("epoch".to_string(), epoch.to_string()),
                    ("steps".to_string(), state.total_steps.to_string()),
                    ("val_nll_nats".to_string(), val.nll_nats.to_string()),
                    ("dtype".to_string(), T::NAME.to_string()),
                ]);
                if let Some(g) = &state.geco {
                    // GECO's λ and EMA per layer, as they were at this epoch.
                    meta.insert(
                        "geco".to_string(),
                        serde_json::to_string(g).unwrap_or_default(),
                    );
                }
                if leader {
                    files.push((checkpoint.clone(), model.to_bytes(&checkpoint, &[], meta)?));
                }
                state.best = Some(val);
                state.best_epoch = epoch;
                on_disk.best_epoch = Some(epoch);
            }
            records.push(record);
        }
        if complete {
            state.epoch = epoch;
        } else {
            state.partial = Some(EpochProgress {
                steps,
                loss_sum,
                nll_data_sum,
                seconds: earlier.seconds + started.elapsed().as_secs_f64(),
                train_seconds: train_secs,
                all_reduce_seconds: reduce_secs,
                angles,
            });
        }
        state.adam = backend.adam_state()?;
        if leader {
            files.push((last_path.clone(), last_bytes(&last_path, &model, &state)?));
        }
        on_disk.last = Some(OnDisk::last_at(
            state.epoch,
            state.total_steps,
            state.partial.as_ref(),
        ));
        // The disk work (tens of ms with fsync) overlaps the next epoch; the previous epoch's
        // files are complete before these start, and before any return (the writer's drop).
        writer.submit(files).map_err(crate::model::write_error)?;
        stop_asked |= ranks == 1 && interrupt();
        if !complete || stop_asked {
            stopped = Some(Stopped {
                epoch,
                step: steps,
                steps_per_epoch,
                total_steps: state.total_steps,
                interrupted: interrupted || stop_asked,
                saved: true,
            });
            break;
        }
    }
    writer.wait().map_err(crate::model::write_error)?;
    Ok(TrainSummary {
        records,
        best: state.best,
        best_epoch: state.best_epoch,
        checkpoint,
        reached: None,
        stopped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GECO's λ per layer is written in layer order, not in the text order of the names.
    #[test]
    fn lambda_is_written_in_layer_order() {
        let lambda: BTreeMap<String, f64> = [10, 2, 0, 34]
            .iter()
            .map(|k| (format!("layers.{k}"), *k as f64))
            .collect();
        let text = serde_json::to_string(&EpochRecord {
            epoch: 1,
            steps: 1,
            train_nll_nats: 0.0,
            train_bits_per_dim: 0.0,
            train_objective_data_terms: 0.0,
            val_nll_nats: 0.0,
            val_bits_per_dim: 0.0,
            val_recon: None,
            lr: 0.0,
            seconds: 0.0,
            examples_per_sec: 0.0,
            lambda: Some(lambda),
            grad_angle_deg: None,
            ranks: 1,
            all_reduce_seconds: None,
            partial: false,
        })
        .unwrap();
        let at = |k: usize| text.find(&format!("\"layers.{k}\"")).unwrap();
        assert!(at(0) < at(2) && at(2) < at(10) && at(10) < at(34), "{text}");
    }

    /// The divergence message names the likely cause: a small fixed λ, or a GECO λ that grew
    /// without bound.
    #[test]
    fn divergence_names_the_likely_cause() {
        let dir = tempfile::tempdir().unwrap();
        let text = |lambda: &str| {
            format!(
                r#"{{"name": "d", "input": {{"shape": [4], "preprocess": "none"}},
                    "layers": [{{"type": "linear"}}], "objective": {{"lambda": {lambda}}}}}"#
            )
        };
        let fixed = snfc_compiler::spec::parse_spec(&text("0.01")).unwrap();
        let e = diverged(
            &fixed,
            &dir.path().join("r"),
            &OnDisk::default(),
            None,
            (3, 7, 167),
            "the loss is NaN",
        );
        let m = e.to_string();
        assert!(
            m.contains("epoch 3, step 7 (step 167") && m.contains("λ = 0.01"),
            "{m}"
        );
        assert!(
            m.contains("Table 4") && m.contains("nothing was saved"),
            "{m}"
        );

        let spec = snfc_compiler::spec::parse_spec(&text(
            r#"{"geco": {"lambda0": 1.0, "lr": 1e-3, "ema": 0.9, "kappa": 5.0}}"#,
        ))
        .unwrap();
        let mut geco = Geco::new(&spec).unwrap();
        geco.lambda.insert("layers.0".into(), 2.5e20);
        let on_disk = OnDisk {
            last: Some(OnDisk::last_at(76, 6080, None)),
            best_epoch: Some(70),
        };
        let m = diverged(
            &spec,
            &dir.path().join("r"),
            &on_disk,
            Some(&geco),
            (77, 62, 6142),
            "x",
        )
        .to_string();
        assert!(
            m.contains("layers.0 has grown to 2.500e20") && m.contains("κ = 5"),
            "{m}"
        );
        assert!(
            m.contains("last.safetensors (after epoch 76, step 6080 of the run) and ")
                && m.contains(
                    "checkpoint.safetensors (epoch 70, the best validation NLL) are intact"
                ),
            "{m}"
        );
        let only_last = OnDisk {
            last: Some(OnDisk::last_at(
                0,
                37,
                Some(&EpochProgress {
                    steps: 37,
                    ..Default::default()
                }),
            )),
            best_epoch: None,
        };
        let m = only_last.describe(Path::new("r"));
        assert_eq!(
            m,
            "r/last.safetensors (at step 37 of epoch 1, step 37 of the run) is intact"
        );
    }
}
