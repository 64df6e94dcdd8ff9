//! Timing of the compiled training step (`snfc bench`): median over repeated steps after
//! warm-up, and the achieved GFLOP/s from the graph's own FLOP count.

use crate::backend::open;
use crate::batch::fill_uniform;
use crate::cube::probe::Chosen;
use crate::host::exec::{ExecError, Executor, Feeds, Program};
use crate::host::linalg::Real;
use crate::model::Model;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::{INPUT_NOISE, INPUT_X};
use snfc_compiler::plan::Plan;
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::{FlowSpec, Preprocess};
use std::sync::Arc;
use std::time::Instant;

#[derive(Debug, Clone, Serialize)]
pub struct BenchResult {
    pub spec: String,
    pub gradient: String,
    pub device: String,
    pub dtype: String,
    pub batch: usize,
    pub steps: usize,
    pub threads: usize,
    pub median_step_ms: f64,
    pub min_step_ms: f64,
    pub examples_per_sec: f64,
    pub gflop_per_step: f64,
    pub gflops: f64,
    pub gemm: usize,
    pub inverse: usize,
    /// Kernel launches per step (after fusion).
    pub kernels: usize,
    /// Time per sample through the learned inverse and the exact one (host, f64).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sampling: Option<SamplingTime>,
    /// Seconds per step by op kind (with `profile`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<(String, f64, usize)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct SamplingTime {
    pub samples: usize,
    pub learned_ms_per_sample: f64,
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
}

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
    let batch = spec.train.batch_size;
    let d = spec.input.dim();
    let compiled = compile_train(spec, batch, level)?;
    let counts = op_counts(&compiled.step);
    let plan = Plan::for_level(&compiled.step, level);
    // Profiling needs the host executor's hooks; it is a host-only view.
    let mut host =
        (profile && opts.device == Chosen::Host).then(|| Program::from_plan(plan.clone()));
    let mut exec = Executor::<T>::new();
    let mut backend = open::<T>(&opts.device, plan)?;
    let model = Model::<T>::init(spec, 0);
    for (name, v) in &model.values {
        backend.set(name, v)?;
    }
    for (name, v) in crate::train::Geco::new(spec)
        .map(|g| g.feeds())
        .unwrap_or_default()
    {
        backend.set(&name, &[T::of_f64(v)])?;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut x = vec![T::zero(); d * batch];
    // 8-bit-like data in [0, 256).
    fill_uniform(&mut rng, &mut x);
    x.iter_mut()
        .for_each(|v| *v = (*v * T::of_f64(256.0)).floor());
    let mut noise = vec![T::zero(); d * batch];
    fill_uniform(&mut rng, &mut noise);
    backend.set(INPUT_X, &x)?;
    if spec.input.preprocess == Preprocess::DequantizeLogit {
        backend.set(INPUT_NOISE, &noise)?;
    }
    let adam = &spec.train.optimizer.adam;
    let mut times = Vec::with_capacity(steps);
    for i in 0..warmup + steps {
        backend.sync()?;
        let t = Instant::now();
        backend.run()?;
        backend.adam_step(1e-4, adam.betas, adam.eps, 1.0)?;
        backend.sync()?;
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    // The profile: the same steps again through the host executor with its timers on.
    let mut profile_rows = Vec::new();
    if let Some(program) = host.as_mut() {
        let mut feeds: Feeds<T> = model.values.clone();
        feeds.insert(INPUT_X.into(), Arc::new(x.clone()));
        feeds.insert(INPUT_NOISE.into(), Arc::new(noise.clone()));
        for (name, v) in crate::train::Geco::new(spec)
            .map(|g| g.feeds())
            .unwrap_or_default()
        {
            feeds.insert(name, Arc::new(vec![T::of_f64(v)]));
        }
        exec.run(program, &feeds)?;
        exec.enable_profile();
        for _ in 0..steps {
            exec.run(program, &feeds)?;
        }
        profile_rows = exec
            .profile()
            .into_iter()
            .map(|(k, t, n)| (k, t / steps as f64, n / steps))
            .collect();
    }
    if profile && host.is_none() {
        backend.enable_profile();
        for _ in 0..steps {
            backend.run()?;
        }
        profile_rows = backend
            .profile()
            .into_iter()
            .map(|(k, t, n)| (k, t / steps as f64, n / steps))
            .collect();
    }
    let sampling = sampling_time(spec, batch);
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    Ok(BenchResult {
        spec: spec.name.clone(),
        gradient: format!("{:?}", spec.objective.gradient),
        device: backend.device(),
        dtype: T::NAME.into(),
        batch,
        steps,
        threads: crate::host::linalg::threads(),
        median_step_ms: median * 1e3,
        min_step_ms: times[0] * 1e3,
        examples_per_sec: batch as f64 / median,
        gflop_per_step: counts.flops / 1e9,
        gflops: counts.flops / 1e9 / median,
        gemm: counts.gemm,
        inverse: counts.inverse,
        kernels: backend.kernels(),
        sampling,
        profile: profile_rows,
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
        f64::NAN
    } else {
        time(false)?
    };
    Some(SamplingTime {
        samples: n,
        learned_ms_per_sample: learned,
        exact_ms_per_sample: time(true)?,
    })
}
