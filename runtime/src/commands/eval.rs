//! Exact log-likelihood (paper eq. 7): the data-independent Σ_k ln|det W_k| is computed once per
//! evaluation by LU and added to every example's data-dependent terms.

use crate::backend::open;
use crate::batch::{fill_columns, fill_uniform_columns};
use crate::cube::matmul::MatmulPrecision;
use crate::cube::probe::Chosen;
use crate::data::Split;
use crate::host::exec::ExecError;
use crate::host::linalg::{slogdet, Real};
use crate::host::shape_ops::toeplitz;
use crate::model::Model;
use crate::progress::Progress;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use snfc_compiler::ir::lower::{eval_graph, ParamKind, INPUT_NOISE, INPUT_X};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::{FlowSpec, LayerShape, Preprocess};

/// Exact negative log-likelihood of a data split.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct EvalResult {
    /// −mean ln p(x), nats per example, on the [0, 256)^D scale for 8-bit data.
    pub nll_nats: f64,
    /// nll / (D ln 2).
    pub bits_per_dim: f64,
    pub examples: usize,
    /// mean over examples of Σ_k ‖R_k W_k h_k − h_k‖² (self-normalizing specs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recon: Option<f64>,
}

/// Σ_k ln|det W_k| over the linear layers, and ln|det T(w_k)| of the dense Toeplitz matrix of
/// each conv layer (one LU each, in f64 whatever the model's precision; for a 1×1 conv
/// H·W·ln|det W| of its C × C matrix, since T(w) is block diagonal).
pub fn logdet_sum<T: Real>(model: &Model<T>) -> f64 {
    let shapes = model.spec.layer_shapes();
    model
        .params
        .iter()
        .filter(|p| p.kind == ParamKind::Weight)
        .map(|p| {
            let w: Vec<f64> = model.get(&p.name).iter().map(|v| v.as_f64()).collect();
            match shapes[p.layer] {
                LayerShape::Image { c, h, w: width } if p.shape.len() == 4 && p.shape[2] == 1 => {
                    (h * width) as f64 * slogdet(&w, c).1
                }
                LayerShape::Image { c, h, w: width } if p.shape.len() == 4 => {
                    let t = toeplitz(&w, &p.shape, h, width);
                    slogdet(&t, c * h * width).1
                }
                _ => slogdet(&w, p.shape[0]).1,
            }
        })
        .sum()
}

/// The memory an evaluation's values may take; batches are cut to fit it.
pub const EVAL_MEMORY_BYTES: usize = 4 << 30;

/// The largest batch, at most `max`, whose evaluation plan allocates at most
/// [`EVAL_MEMORY_BYTES`] of `T` values. The plan's buffers grow linearly with the batch (from
/// the plans at batch 1 and 2): a width-512 Glow holds about 20 MB per example in f64, so `snfc
/// eval`'s batch of 500 needed more memory than this machine has and was killed.
pub fn eval_batch<T: Real>(spec: &FlowSpec, max: usize) -> usize {
    batch_within::<T>(spec, max, EVAL_MEMORY_BYTES)
}

/// [`eval_batch`] for a memory budget of `bytes`.
fn batch_within<T: Real>(spec: &FlowSpec, max: usize, bytes: usize) -> usize {
    graph_batch_within::<T>(|b| eval_graph(spec, b), max, bytes)
}

/// The largest batch, at most `max`, whose plan of `graph(batch)` allocates at most `bytes` of
/// `T` values (the evaluation's and the sampling's batches).
pub(crate) fn graph_batch_within<T: Real>(
    graph: impl Fn(usize) -> snfc_compiler::ir::Graph,
    max: usize,
    bytes: usize,
) -> usize {
    let elements = |b: usize| {
        let plan = Plan::new(&graph(b));
        plan.buffers.footprint(&plan).0
    };
    let (one, two) = (elements(1), elements(2));
    let per_example = two.saturating_sub(one).max(1);
    let fixed = one.saturating_sub(per_example);
    let fit = (bytes / std::mem::size_of::<T>()).saturating_sub(fixed) / per_example;
    fit.clamp(1, max.max(1))
}

/// Per-example ln p(x) for every example of `split`, and per-example reconstruction errors,
/// in batches of at most `batch` (fewer where [`eval_batch`] says the memory calls for it).
pub fn log_likelihoods<T: Real + 'static>(
    model: &Model<T>,
    split: &Split,
    batch: usize,
    noise_seed: u64,
) -> Result<(Vec<f64>, Option<Vec<f64>>), ExecError> {
    log_likelihoods_of(model, split, 0..split.n, batch, noise_seed)
}

/// [`log_likelihoods`] of the examples `range` of `split` only, each with the noise it gets in
/// the whole split's evaluation (the stream is positioned at the range's first example), so
/// ranges evaluated apart (one per rank) give the whole split's values.
pub fn log_likelihoods_of<T: Real + 'static>(
    model: &Model<T>,
    split: &Split,
    range: std::ops::Range<usize>,
    batch: usize,
    noise_seed: u64,
) -> Result<(Vec<f64>, Option<Vec<f64>>), ExecError> {
    let logdets = logdet_sum(model);
    let options = EvalOptions {
        batch,
        noise_seed,
        device: &Chosen::Host,
        comm: &crate::distributed::Solo,
        progress: &Progress::hidden(),
    };
    log_likelihoods_showing(model, logdets, split, range, &options)
}

/// Where and how an evaluation runs: everything but the model and the data.
pub struct EvalOptions<'a> {
    /// The most examples per batch (fewer where [`eval_batch`] says the memory calls for it).
    pub batch: usize,
    /// Seed of the dequantization noise, drawn example by example (the same numbers at any
    /// batch size and on any device).
    pub noise_seed: u64,
    /// Where every example's terms run (a GPU in f32: its products in full f32); the
    /// log-dets stay the host's f64.
    pub device: &'a Chosen,
    /// The ranks sharing the examples (`Solo` for one process).
    pub comm: &'a dyn crate::distributed::Communicator,
    /// Counts this rank's examples.
    pub progress: &'a Progress,
}

/// [`log_likelihoods_of`] given the model's [`logdet_sum`], as `options` say (their `comm` is
/// not read: the caller picks the range).
fn log_likelihoods_showing<T: Real + 'static>(
    model: &Model<T>,
    ld: f64,
    split: &Split,
    range: std::ops::Range<usize>,
    options: &EvalOptions,
) -> Result<(Vec<f64>, Option<Vec<f64>>), ExecError> {
    let EvalOptions {
        batch,
        noise_seed,
        device,
        progress,
        ..
    } = *options;
    let spec = &model.spec;
    let d = spec.input.dim();
    let batch = eval_batch::<T>(spec, batch.min(range.len()).max(1));
    let plan = Plan::new(&eval_graph(spec, batch));
    let has_recon = plan.outputs.iter().any(|(n, _)| n == "recon");
    let mut backend = open::<T>(device, plan, MatmulPrecision::F32)?;
    for (name, v) in &model.values {
        backend.set(name, v)?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(noise_seed);
    // Each example's D uniforms are D `u64` draws: two 32-bit words each.
    rng.set_word_pos(2 * (d * range.start) as u128);
    let mut logp = Vec::with_capacity(range.len());
    let mut recon: Option<Vec<f64>> = None;
    let mut start = range.start;
    while start < range.end {
        let idx: Vec<usize> = (start..(start + batch).min(range.end)).collect();
        let mut x = vec![T::zero(); d * batch];
        fill_columns(split, &idx, batch, &mut x);
        backend.set(INPUT_X, &x)?;
        // The noise comes from the host's stream on every device, so an evaluation gives the
        // same numbers wherever it runs (to the device's precision).
        if spec.input.preprocess == Preprocess::DequantizeLogit {
            let mut u = vec![T::zero(); d * batch];
            fill_uniform_columns(&mut rng, &mut u, batch, idx.len());
            backend.set(INPUT_NOISE, &u)?;
        }
        backend.run()?;
        let data = backend.output("logp_data")?.data;
        logp.extend(data[..idx.len()].iter().map(|v| v.as_f64() + ld));
        if has_recon {
            let r = backend.output("recon")?.data;
            recon
                .get_or_insert_with(Vec::new)
                .extend(r[..idx.len()].iter().map(|v| v.as_f64()));
        }
        progress.inc(idx.len() as u64);
        start += batch;
    }
    Ok((logp, recon))
}

/// Exact NLL of `split` (dequantization noise drawn from `noise_seed`, example by example, so
/// repeatable and the same at any batch size).
pub fn evaluate<T: Real + 'static>(
    model: &Model<T>,
    split: &Split,
    batch: usize,
    noise_seed: u64,
) -> Result<EvalResult, ExecError> {
    evaluate_sharded(
        model,
        split,
        batch,
        noise_seed,
        &crate::distributed::Solo,
        &Progress::hidden(),
    )
}

/// [`evaluate`] over the ranks of `comm`: each rank evaluates its contiguous share of the
/// examples, and the f64 sums (ln p, reconstruction error, count) are summed over the ranks, so
/// every rank gets the whole split's result. `progress` counts this rank's examples.
pub fn evaluate_sharded<T: Real + 'static>(
    model: &Model<T>,
    split: &Split,
    batch: usize,
    noise_seed: u64,
    comm: &dyn crate::distributed::Communicator,
    progress: &Progress,
) -> Result<EvalResult, ExecError> {
    let options = EvalOptions {
        batch,
        noise_seed,
        device: &Chosen::Host,
        comm,
        progress,
    };
    evaluate_on(model, split, &options)
}

/// The exact NLL of `split` as `options` say (a GPU evaluates in f32: the model is f32
/// there); Σ ln|det W| is computed once, by LU on the host in f64.
pub fn evaluate_on<T: Real + 'static>(
    model: &Model<T>,
    split: &Split,
    options: &EvalOptions,
) -> Result<EvalResult, ExecError> {
    let logdets = logdet_sum(model);
    evaluate_given_logdets(model, logdets, split, options)
}

/// [`evaluate_on`] given the model's [`logdet_sum`] (computed once by a caller that needs it
/// too: training adds it to the training batches' data terms).
pub fn evaluate_given_logdets<T: Real + 'static>(
    model: &Model<T>,
    logdets: f64,
    split: &Split,
    options: &EvalOptions,
) -> Result<EvalResult, ExecError> {
    let comm = options.comm;
    let range = crate::distributed::shard(split.n, comm.rank(), comm.size());
    let (logp, recon) = log_likelihoods_showing(model, logdets, split, range, options)?;
    options.progress.finish();
    let has_recon = recon.is_some();
    let mut sums = vec![
        logp.iter().sum::<f64>(),
        recon.map(|r| r.iter().sum::<f64>()).unwrap_or(0.0),
        logp.len() as f64,
    ];
    crate::distributed::all_reduce_sum(comm, &mut sums);
    let examples = sums[2] as usize;
    let n = sums[2].max(1.0);
    let nll = -sums[0] / n;
    let d = model.spec.input.dim() as f64;
    Ok(EvalResult {
        nll_nats: nll,
        bits_per_dim: nll / (d * std::f64::consts::LN_2),
        examples,
        recon: has_recon.then(|| sums[1] / n),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use snfc_compiler::spec::parse_spec;

    /// The batch shrinks with the budget, in proportion to the plan's buffers per example,
    /// and never below one.
    #[test]
    fn the_evaluation_batch_fits_the_memory_budget() {
        let spec = parse_spec(include_str!("../../../specs/mnist_fc2.json")).unwrap();
        let per = |b: usize| {
            let plan = Plan::new(&eval_graph(&spec, b));
            plan.buffers.footprint(&plan).0
        };
        let budget = per(40) * 8;
        let b = batch_within::<f64>(&spec, 500, budget);
        assert!((38..=42).contains(&b), "{b}");
        // f32 values take half the bytes: about twice the batch.
        let b32 = batch_within::<f32>(&spec, 500, budget);
        assert!((2 * b - 4..=2 * b + 4).contains(&b32), "{b} {b32}");
        assert_eq!(batch_within::<f64>(&spec, 10, budget), 10);
        assert_eq!(batch_within::<f64>(&spec, 500, 1), 1);
        assert_eq!(eval_batch::<f64>(&spec, 500), 500);
    }
}
