//! Timing of the compiled training step (`snfc bench`): median over repeated steps after
//! warm-up, and the achieved GFLOP/s from the graph's own FLOP count.

use crate::backend::{open, Draw};
use crate::batch::fill_uniform;
use crate::cube::matmul::MatmulPrecision;
use crate::cube::probe::Chosen;
use crate::host::exec::ExecError;
use crate::host::linalg::{GemmShape, Real};
use crate::model::Model;
use crate::profile::{ProfileRow, Work};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::{INPUT_NOISE, INPUT_X};
use snfc_compiler::plan::Plan;
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::{FlowSpec, Preprocess};
use std::collections::BTreeMap;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub spec: String,
    pub gradient: String,
    pub device: String,
    pub dtype: String,
    /// The global batch (over all ranks).
    pub batch: usize,
    pub steps: usize,
    pub threads: usize,
    /// Processes taking part (`mpirun -n`), each stepping `batch / ranks` rows.
    pub ranks: usize,
    /// Median milliseconds per step of the gradient all-reduce (more than one rank).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_reduce_ms: Option<f64>,
    /// `all_reduce_ms / median_step_ms`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub all_reduce_share: Option<f64>,
    pub median_step_ms: f64,
    pub min_step_ms: f64,
    pub examples_per_sec: f64,
    pub gflop_per_step: f64,
    pub gflops: f64,
    pub gemm: usize,
    pub inverse: usize,
    /// What each timed step did ([`STEP_INCLUDES`]).
    pub includes: String,
    /// Kernel launches per step (after fusion).
    pub kernels: usize,
    /// Blocking device-to-host reads per timed step (GPU backends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host_reads_per_step: Option<f64>,
    /// Host-to-device uploads per timed step (GPU backends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uploads_per_step: Option<f64>,
    /// Kernel launches per timed step, the optimizer's and the gradient check's included
    /// (GPU backends).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub launches_per_step: Option<f64>,
    /// Time per sample through the learned inverse and the exact one (host, f64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingTime>,
    /// Seconds and launches per step by kernel kind (with `profile`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<ProfileRow>,
    /// Where a profiled step's time goes, per kind of work; the entries add up to
    /// `profiled_step_ms` (with `profile`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub breakdown: Vec<WorkTime>,
    /// The mean time of the profiled steps (on the host, the timed steps themselves).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiled_step_ms: Option<f64>,
    /// The GFLOP/s the step's own matrix products reach (with `profile`): on the host each
    /// timed alone, in cache; on a GPU as the profiled steps launched them, each waited for.
    /// The rate the step is measured against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gemm_rate_gflops: Option<f64>,
    /// `gflops / gemm_rate_gflops`: the step's share of its GEMMs' rate.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub share_of_gemm_rate: Option<f64>,
}

/// Milliseconds per step spent on one kind of work.
#[derive(Debug, Clone, Serialize)]
pub struct WorkTime {
    pub work: Work,
    pub ms: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct SamplingTime {
    pub samples: usize,
    /// None for an exact-gradient spec: it has no learned inverse to time.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub learned_ms_per_sample: Option<f64>,
    pub exact_ms_per_sample: f64,
}

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub steps: usize,
    pub warmup: usize,
    pub level: OptLevel,
    /// Time per op kind (host backend only).
    pub profile: bool,
    pub device: Chosen,
    /// The arithmetic of matrix products on a GPU.
    pub matmul: MatmulPrecision,
    /// Also time sampling through the learned and the exact inverses.
    pub sampling: bool,
    /// The processes timing the step together (data-parallel, as `train` runs it).
    pub comm: crate::distributed::Comm,
}

/// What a timed step does: the same work as a step of `snfc train`.
pub const STEP_INCLUDES: &str = "batch upload, fresh dequantization noise (8-bit specs), forward and backward pass, read-back of the loss and the gradients' health (non-finite check), gradient all-reduce (more than one rank), Adam update of every parameter";

/// Time `steps` whole training steps (the compiled graph: forward, loss and every gradient; then
/// the Adam update of every parameter) after `warmup` untimed ones.
pub fn bench_step<T: Real + 'static>(
    spec: &FlowSpec,
    opts: &BenchOptions,
) -> Result<BenchResult, ExecError> {
    let BenchOptions {
        steps,
        warmup,
        level,
        profile,
        ..
    } = *opts;
    let global_batch = spec.train.batch_size;
    let comm = opts.comm.clone();
    let ranks = comm.size();
    if !global_batch.is_multiple_of(ranks) {
        return Err(ExecError::Device {
            graph: spec.name.clone(),
            message: format!(
                "/train/batch_size {global_batch} is the global batch: it must be a multiple of the {ranks} ranks of this job"
            ),
        });
    }
    // Each rank steps its share of the batch, as `train` does.
    let batch = global_batch / ranks;
    let d = spec.input.dim();
    let compiled = compile_train(spec, batch, level)?;
    let counts = op_counts(&compiled.step);
    let plan = Plan::for_level(&compiled.step, level);
    // On the host the timers cost nanoseconds per kernel, so the timed steps themselves are
    // profiled; a GPU backend synchronizes after every launch when profiling, so it gets
    // separate profiled steps after the timed ones.
    let profile_timed = profile && opts.device == Chosen::Host;
    let mut backend = open::<T>(&opts.device, plan, opts.matmul)?;
    let model = Model::<T>::init(spec, 0);
    for (name, v) in &model.values {
        backend.set(name, v)?;
    }
    for (name, v) in crate::train::Geco::new(spec)
        .zip(spec.objective.lambda.geco())
        .map(|(g, gs)| g.feeds(gs))
        .unwrap_or_default()
    {
        backend.set(&name, &[T::of_f64(v)])?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut x = vec![T::zero(); d * batch];
    let dequantize = spec.input.preprocess == Preprocess::DequantizeLogit;
    if dequantize {
        // 8-bit-like data in [0, 256).
        fill_uniform(&mut rng, &mut x);
        x.iter_mut()
            .for_each(|v| *v = (*v * T::of_f64(256.0)).floor());
    } else {
        // Continuous specs: N(0, 1) data, like the reference code's timing runs.
        let normal = rand_distr::StandardNormal;
        x.iter_mut()
            .for_each(|v| *v = T::of_f64(rand::RngExt::sample::<f64, _>(&mut rng, normal)));
    }
    let mut noise = vec![T::zero(); d * batch];
    fill_uniform(&mut rng, &mut noise);
    let adam = &spec.train.optimizer.adam;
    let rates = crate::train::LearningRates::for_spec(spec, 1e-4);
    let mut times = Vec::with_capacity(steps);
    let mut reduce_times = Vec::with_capacity(steps);
    // The step's read-back as `train` asks for it: the loss, and GECO's errors and next λ.
    let geco = crate::train::Geco::new(spec);
    let mut read_back = vec!["loss".to_string()];
    read_back.extend(geco.iter().flat_map(crate::train::Geco::read_back));
    let carry = geco.is_some() && ranks == 1;
    let mut step =
        |backend: &mut Box<dyn crate::backend::Backend<T>>| -> Result<(f64, f64), ExecError> {
            backend.sync()?;
            let t = Instant::now();
            // A step as `train` runs it: upload the batch and fresh noise, run, read the loss
            // back, update.
            backend.set(INPUT_X, &x)?;
            if dequantize && backend.draws_on_device() {
                backend.draw(INPUT_NOISE, rand::RngExt::random(&mut rng), Draw::Uniform)?;
            } else if dequantize {
                fill_uniform(&mut rng, &mut noise);
                backend.set(INPUT_NOISE, &noise)?;
            }
            backend.run()?;
            let read = backend.step_readback(&read_back, false)?;
            std::hint::black_box(read);
            if carry {
                backend.carry()?;
            }
            let reduce_started = Instant::now();
            backend.all_reduce_grads(comm.as_ref())?;
            let reduce = reduce_started.elapsed().as_secs_f64();
            backend.adam_step(&rates, adam.betas, adam.eps, 1.0)?;
            backend.sync()?;
            Ok((t.elapsed().as_secs_f64(), reduce))
        };
    let mut traffic_before = None;
    for i in 0..warmup + steps {
        if profile_timed && i == warmup {
            backend.enable_profile();
        }
        if i == warmup {
            traffic_before = backend.traffic();
        }
        let (seconds, reduce) = step(&mut backend)?;
        if i >= warmup {
            times.push(seconds);
            reduce_times.push(reduce);
        }
    }
    // Per timed step: what the device was asked to do.
    let traffic = traffic_before.zip(backend.traffic()).map(|(a, b)| {
        let per = |x: u64, y: u64| (y - x) as f64 / steps as f64;
        (
            per(a.reads, b.reads),
            per(a.uploads, b.uploads),
            per(a.launches, b.launches),
        )
    });
    reduce_times.sort_by(|a, b| a.total_cmp(b));
    let reduce_median = reduce_times.get(reduce_times.len() / 2).copied();
    let mut profiled_seconds = times.iter().sum::<f64>();
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    if profile && !profile_timed {
        backend.enable_profile();
        profiled_seconds = 0.0;
        for _ in 0..steps {
            profiled_seconds += step(&mut backend)?.0;
        }
    }
    let per_step = |v: f64| v / steps as f64;
    let (mut profile_rows, mut breakdown, mut profiled_step_ms) = (Vec::new(), Vec::new(), None);
    let (mut gemm_rate_gflops, mut share_of_gemm_rate) = (None, None);
    if profile {
        profile_rows = backend.profile();
        for row in profile_rows.iter_mut() {
            row.seconds = per_step(row.seconds);
            row.count = row.count.div_ceil(steps);
        }
        let step_ms = per_step(profiled_seconds) * 1e3;
        let mut accounted = 0.0;
        for work in Work::ALL {
            let ms = if work == Work::Other {
                step_ms - accounted
            } else {
                let w = profile_rows.iter().filter(|r| r.work == work);
                w.fold(0.0, |sum, r| sum + r.seconds) * 1e3
            };
            accounted += ms;
            breakdown.push(WorkTime { work, ms });
        }
        profiled_step_ms = Some(step_ms);
        // The step's products, each timed alone: what its GEMMs could reach.
        let mut calls: BTreeMap<GemmShape, usize> = BTreeMap::new();
        for shape in backend.gemm_calls() {
            *calls.entry(shape).or_default() += 1;
        }
        let (mut flops, mut seconds) = (0.0, 0.0);
        for (shape, count) in &calls {
            flops += shape.flops() * *count as f64;
            seconds += shape.best_time::<T>(10) * *count as f64;
        }
        // On a GPU: the products as the profiled steps ran them, each launch waited for.
        if let Some((f, s)) = backend.product_time() {
            (flops, seconds) = (f, s);
        }
        if seconds > 0.0 {
            let rate = flops / seconds / 1e9;
            gemm_rate_gflops = Some(rate);
            share_of_gemm_rate = Some(counts.flops / 1e9 / median / rate);
        }
    }
    let sampling = if opts.sampling {
        sampling_time(spec, batch)
    } else {
        None
    };
    Ok(BenchResult {
        spec: spec.name.clone(),
        gradient: format!("{:?}", spec.objective.gradient),
        device: backend.device(),
        dtype: T::NAME.into(),
        batch: global_batch,
        steps,
        threads: crate::host::linalg::threads(),
        ranks,
        all_reduce_ms: reduce_median.filter(|_| ranks > 1).map(|r| r * 1e3),
        all_reduce_share: reduce_median.filter(|_| ranks > 1).map(|r| r / median),
        median_step_ms: median * 1e3,
        min_step_ms: times[0] * 1e3,
        examples_per_sec: global_batch as f64 / median,
        // Every rank's step together.
        gflop_per_step: counts.flops * ranks as f64 / 1e9,
        gflops: counts.flops * ranks as f64 / 1e9 / median,
        gemm: counts.gemm,
        inverse: counts.inverse,
        includes: STEP_INCLUDES.to_string(),
        kernels: backend.kernels(),
        host_reads_per_step: traffic.map(|t| t.0),
        uploads_per_step: traffic.map(|t| t.1),
        launches_per_step: traffic.map(|t| t.2),
        sampling,
        profile: profile_rows,
        breakdown,
        profiled_step_ms,
        gemm_rate_gflops,
        share_of_gemm_rate,
    })
}

/// Time per sample of a batch drawn through the learned inverse and through W⁻¹ (host, f64).
fn sampling_time(spec: &FlowSpec, n: usize) -> Option<SamplingTime> {
    let model = Model::<f64>::init(spec, 0);
    let time = |exact: bool| -> Option<f64> {
        crate::sample::sample(&model, n, 0, exact).ok()?;
        let t = Instant::now();
        crate::sample::sample(&model, n, 1, exact).ok()?;
        Some(t.elapsed().as_secs_f64() * 1e3 / n as f64)
    };
    let learned = if spec.objective.gradient == snfc_compiler::spec::GradientMode::Exact {
        None
    } else {
        Some(time(false)?)
    };
    Some(SamplingTime {
        samples: n,
        learned_ms_per_sample: learned,
        exact_ms_per_sample: time(true)?,
    })
}

/// Which layer `snfc bench --scaling` times.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScalingLayer {
    /// A D × D linear layer on `[D]` inputs.
    Fc,
    /// A 3 × 3 conv on `[C, S, S]` images with C·S² = D.
    Conv,
}

/// One size of the scaling benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    pub dim: usize,
    pub shape: Vec<usize>,
    pub snf_ms: f64,
    pub exact_ms: f64,
    /// exact / self-normalizing step time.
    pub ratio: f64,
}

/// The image shape `[C, S, S]` for D values: the largest side S of 32, 28, 16, 8, 4 with
/// S² dividing D.
pub fn conv_shape(dim: usize) -> Option<Vec<usize>> {
    [32, 28, 16, 8, 4]
        .iter()
        .find(|&&s| dim.is_multiple_of(s * s) && dim >= s * s)
        .map(|&s| vec![dim / (s * s), s, s])
}

/// The one-layer spec the scaling benchmark times at `dim` (batch 128, N(0, 1) data).
pub fn scaling_spec(layer: ScalingLayer, dim: usize, exact: bool) -> Result<FlowSpec, String> {
    let (shape, layer_json) = match layer {
        ScalingLayer::Fc => (vec![dim], r#"{"type": "linear"}"#),
        ScalingLayer::Conv => (
            conv_shape(dim).ok_or_else(|| {
                format!("--scaling conv: {dim} is not C·S² for a side S of 32, 28, 16, 8 or 4")
            })?,
            r#"{"type": "conv", "kernel_size": 3}"#,
        ),
    };
    let text = format!(
        r#"{{"name": "scaling_{kind}_{dim}", "input": {{"shape": {shape:?}, "preprocess": "none"}},
            "layers": [{layer_json}],
            "objective": {{"gradient": "{gradient}", "lambda": 1.0}},
            "train": {{"batch_size": 128}}}}"#,
        kind = if layer == ScalingLayer::Fc {
            "fc"
        } else {
            "conv"
        },
        gradient = if exact { "exact" } else { "self_normalizing" },
    );
    snfc_compiler::spec::parse_spec(&text).map_err(|e| e.to_string())
}

/// Time one self-normalizing layer against its exact counterpart at each of `dims`.
pub fn scaling<T: Real + 'static>(
    layer: ScalingLayer,
    dims: &[usize],
    opts: &BenchOptions,
    mut progress: impl FnMut(&ScalingRow),
) -> Result<Vec<ScalingRow>, ExecError> {
    let mut rows = Vec::new();
    for &dim in dims {
        let spec_of = |exact| {
            scaling_spec(layer, dim, exact).map_err(|message| ExecError::Device {
                graph: "scaling".into(),
                message,
            })
        };
        let snf_spec = spec_of(false)?;
        let snf = bench_step::<T>(&snf_spec, opts)?;
        let exact = bench_step::<T>(&spec_of(true)?, opts)?;
        let row = ScalingRow {
            dim,
            shape: snf_spec.input.shape.clone(),
            snf_ms: snf.median_step_ms,
            exact_ms: exact.median_step_ms,
            ratio: exact.median_step_ms / snf.median_step_ms,
        };
        progress(&row);
        rows.push(row);
    }
    Ok(rows)
}
