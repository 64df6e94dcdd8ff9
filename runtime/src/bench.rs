//! Timing of the compiled training step (`snfc bench`): median over repeated steps after
//! warm-up, and the achieved GFLOP/s from the graph's own FLOP count.

use crate::batch::fill_uniform;
use crate::host::exec::{ExecError, Executor, Feeds, Program};
use crate::host::linalg::Real;
use crate::model::Model;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::{INPUT_NOISE, INPUT_X};
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
    /// Seconds per step by op kind (with `profile`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub profile: Vec<(String, f64, usize)>,
}

/// Time `steps` whole training steps (the compiled graph: forward, loss and every gradient; then
/// the Adam update of every parameter) after `warmup` untimed ones.
pub fn bench_step<T: Real>(
    spec: &FlowSpec,
    steps: usize,
    warmup: usize,
    level: OptLevel,
    profile: bool,
) -> Result<BenchResult, ExecError> {
    let batch = spec.train.batch_size;
    let d = spec.input.dim();
    let compiled = compile_train(spec, batch, level);
    let counts = op_counts(&compiled.step);
    let program = Program::for_level(&compiled.step, level);
    let mut exec = Executor::<T>::new();
    let mut model = Model::<T>::init(spec, 0);
    let mut adam = crate::train::Adam::<T>::new(&spec.train.optimizer.adam);
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut x = vec![T::zero(); d * batch];
    // 8-bit-like data in [0, 256) or standard-normal-ish continuous data.
    fill_uniform(&mut rng, &mut x);
    x.iter_mut()
        .for_each(|v| *v = (*v * T::of_f64(256.0)).floor());
    let mut noise = vec![T::zero(); d * batch];
    fill_uniform(&mut rng, &mut noise);
    let (x, noise) = (Arc::new(x), Arc::new(noise));
    let mut times = Vec::with_capacity(steps);
    let mut adam_secs = 0.0;
    for i in 0..warmup + steps {
        let t = Instant::now();
        let mut feeds: Feeds<T> = model.values.clone();
        feeds.insert(INPUT_X.into(), x.clone());
        if spec.input.preprocess == Preprocess::DequantizeLogit {
            feeds.insert(INPUT_NOISE.into(), noise.clone());
        }
        let outs = exec.run(&program, &feeds)?;
        drop(feeds);
        let t_adam = Instant::now();
        adam.update(&mut model, &outs, 1e-4);
        if i >= warmup {
            adam_secs += t_adam.elapsed().as_secs_f64();
        }
        if i + 1 == warmup && profile {
            exec.enable_profile();
        }
        if i >= warmup {
            times.push(t.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let median = times[times.len() / 2];
    Ok(BenchResult {
        spec: spec.name.clone(),
        gradient: format!("{:?}", spec.objective.gradient),
        device: "host".into(),
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
        kernels: program.kernels(),
        profile: exec
            .profile()
            .into_iter()
            .map(|(k, t, n)| (k, t / steps as f64, n / steps))
            .chain(profile.then(|| ("adam update".to_string(), adam_secs / steps as f64, 1)))
            .collect(),
    })
}
