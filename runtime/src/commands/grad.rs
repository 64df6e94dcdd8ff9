//! One training step's gradients for given parameters and a given batch (`snfc grad`).

use crate::backend::open;
use crate::batch::fill_uniform;
use crate::cube::matmul::MatmulPrecision;
use crate::cube::probe::Chosen;
use crate::eval::logdet_sum;
use crate::host::exec::{ExecError, Executor, Feeds, Program};
use crate::host::linalg::Real;
use crate::model::Model;
use crate::progress::Progress;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::{eval_graph, INPUT_NOISE, INPUT_X};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::Preprocess;
use std::sync::Arc;

/// Named tensors: the gradient of every parameter (zeros where the objective does not depend on
/// it, e.g. R under the exact gradient), then the scalars `loss`, `nll` (exact −mean ln p^f over
/// the batch, nats) and `recon` (mean over the batch of Σ_k ‖R_k W_k h_k − h_k‖²).
pub type NamedTensors<T> = Vec<(String, Vec<usize>, Vec<T>)>;

/// Dequantization noise for 8-bit specs: drawn from a seed, or given as `B × D` rows in [0, 1).
#[derive(Debug, Clone, Copy)]
pub enum Noise<'a> {
    Seed(u64),
    Rows(&'a [f64]),
}

/// `rows` holds the batch as `B × D` (one example per row).
pub fn gradients<T: Real + 'static>(
    model: &Model<T>,
    rows: &[f64],
    batch: usize,
    noise: Noise,
    level: OptLevel,
    device: &Chosen,
    progress: &Progress,
) -> Result<NamedTensors<T>, ExecError> {
    let spec = &model.spec;
    let d = spec.input.dim();
    let columns = |rows: &[f64]| -> Vec<T> {
        let mut x = vec![T::zero(); d * batch];
        for b in 0..batch {
            for k in 0..d {
                x[k * batch + b] = T::of_f64(rows[b * d + k]);
            }
        }
        x
    };
    let mut feeds: Feeds<T> = model.values.clone();
    feeds.insert(INPUT_X.into(), Arc::new(columns(rows)));
    // GECO specs: every layer's λ at its initial value.
    for (name, v) in crate::train::Geco::new(spec)
        .zip(spec.objective.lambda.geco())
        .map(|(g, gs)| g.feeds(gs))
        .unwrap_or_default()
    {
        feeds.insert(name, Arc::new(vec![T::of_f64(v)]));
    }
    if spec.input.preprocess == Preprocess::DequantizeLogit {
        let u = match noise {
            Noise::Seed(seed) => {
                let mut u = vec![T::zero(); d * batch];
                fill_uniform(&mut ChaCha8Rng::seed_from_u64(seed), &mut u);
                u
            }
            Noise::Rows(r) => columns(r),
        };
        feeds.insert(INPUT_NOISE.into(), Arc::new(u));
    }
    progress.set_message("compiling the step".into());
    let compiled = compile_train(spec, batch, level)?;
    progress.inc(1);
    progress.set_message("running the step".into());
    // The step on the chosen device; the exact NLL and reconstruction error on the host.
    // Full f32 products: `grad` is the tool that checks gradients.
    let mut backend = open::<T>(
        device,
        Plan::for_level(&compiled.step, level),
        MatmulPrecision::F32,
    )?;
    for (name, v) in &feeds {
        backend.set(name, v)?;
    }
    backend.run()?;
    let step = backend.outputs()?;
    progress.inc(1);
    progress.set_message("the exact NLL".into());
    let mut exec = Executor::<T>::new();
    let eval = exec.run(&Program::new(&eval_graph(spec, batch)), &feeds)?;
    let mut out: NamedTensors<T> = Vec::new();
    for p in &model.params {
        let g = step
            .iter()
            .find(|(n, _)| n.strip_prefix("grad.") == Some(p.name.as_str()))
            .map(|(_, t)| t.data.clone())
            .unwrap_or_else(|| vec![T::zero(); p.shape.iter().product()]);
        out.push((p.name.clone(), p.shape.clone(), g));
    }
    let scalar = |name: &str, v: f64| (name.to_string(), vec![], vec![T::of_f64(v)]);
    let mean = |name: &str, outs: &[(String, crate::host::exec::Tensor<T>)]| {
        outs.iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.data.iter().map(|v| v.as_f64()).sum::<f64>() / t.data.len() as f64)
    };
    if let Some(l) = mean("loss", &step) {
        out.push(scalar("loss", l));
    }
    let ld = logdet_sum(model);
    if let Some(lp) = mean("logp_data", &eval) {
        out.push(scalar("nll", -(lp + ld)));
    }
    let recon = mean("recon", &eval).unwrap_or(0.0);
    out.push(scalar("recon", recon));
    progress.inc(1);
    progress.finish();
    Ok(out)
}
