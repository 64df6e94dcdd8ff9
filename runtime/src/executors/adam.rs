//! Adam (Kingma & Ba) with bias correction, where the parameters live on the host: one
//! parallel pass over every parameter per step, each chunk compiled for the widest vector
//! instructions the CPU has. The GPU executors run the same update as a kernel; both take the
//! per-parameter learning rates of [`LearningRates`].

use crate::executors::simd::call_on_widest_simd;
use crate::executors::values::{Real, Tensor};
use crate::model::Model;
use rayon::prelude::*;
use snfc_compiler::ir::lower::{parameters, ParamKind};
use snfc_compiler::spec::FlowSpec;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

/// Each parameter's learning rate in one step: `base` (the schedule's lr), times
/// `inverse_scale` for the learned inverses R (`train.optimizer.adam.inverse_lr_scale`).
#[derive(Debug, Clone, PartialEq)]
pub struct LearningRates {
    pub base: f64,
    pub inverse_scale: f64,
    inverses: BTreeSet<String>,
}

impl LearningRates {
    /// One learning rate for every parameter.
    pub fn uniform(lr: f64) -> Self {
        LearningRates {
            base: lr,
            inverse_scale: 1.0,
            inverses: BTreeSet::new(),
        }
    }

    /// The spec's rates at base rate `lr`: its inverse parameters (each self-normalizing
    /// layer's R) scaled by `inverse_lr_scale`.
    pub fn for_spec(spec: &FlowSpec, lr: f64) -> Self {
        LearningRates {
            base: lr,
            inverse_scale: spec.train.optimizer.adam.inverse_lr_scale,
            inverses: parameters(spec)
                .into_iter()
                .filter(|p| p.kind == ParamKind::WeightInv)
                .map(|p| p.name)
                .collect(),
        }
    }

    /// The learning rate of parameter `name`.
    pub fn of(&self, name: &str) -> f64 {
        if self.inverses.contains(name) {
            self.base * self.inverse_scale
        } else {
            self.base
        }
    }
}

/// One parameter's Adam constants for a step.
#[derive(Clone, Copy)]
struct AdamCoeffs<T> {
    b1: T,
    b2: T,
    /// lr / (1 − β₁ᵗ)
    step: T,
    /// 1 / √(1 − β₂ᵗ)
    c2s: T,
    eps: T,
    grad_scale: T,
}

/// The Adam update of one chunk, compiled for the widest vector instructions the CPU has
/// (AVX-512 or AVX2, detected at run time; the same IEEE operations in the same order on
/// every path, so the result does not depend on which runs).
fn adam_chunk<T: Real>(c: AdamCoeffs<T>, p: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
    #[inline(always)]
    fn update<T: Real>(c: AdamCoeffs<T>, p: &mut [T], g: &[T], m: &mut [T], v: &mut [T]) {
        let one = T::one();
        let n = p.len().min(g.len()).min(m.len()).min(v.len());
        let (p, g, m, v) = (&mut p[..n], &g[..n], &mut m[..n], &mut v[..n]);
        for i in 0..n {
            let g = g[i] * c.grad_scale;
            m[i] = c.b1 * m[i] + (one - c.b1) * g;
            v[i] = c.b2 * v[i] + (one - c.b2) * g * g;
            p[i] -= c.step * m[i] / (v[i].sqrt() * c.c2s + c.eps);
        }
    }
    call_on_widest_simd!(update [T: Real] [T] (
        c: AdamCoeffs<T> = c,
        p: &mut [T] = p,
        g: &[T] = g,
        m: &mut [T] = m,
        v: &mut [T] = v,
    ) -> ())
}

/// Adam (Kingma & Ba) with bias correction; state per parameter.
pub struct Adam<T> {
    pub(crate) betas: [f64; 2],
    pub(crate) eps: f64,
    t: i32,
    state: HashMap<String, (Vec<T>, Vec<T>)>,
}

/// What Adam carries from step to step: the steps taken and the moments (m, v) per
/// parameter, as a resumed run needs them.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AdamState<T> {
    pub t: i32,
    pub moments: BTreeMap<String, (Vec<T>, Vec<T>)>,
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

    /// The state a resumed run restores with [`restore`](Self::restore).
    pub fn state(&self) -> AdamState<T> {
        AdamState {
            t: self.t,
            moments: self
                .state
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        }
    }

    pub fn restore(&mut self, state: &AdamState<T>) {
        self.t = state.t;
        self.state = state
            .moments
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
    }

    /// One update of every parameter that has a `grad.<name>` output, at learning rate `lr`;
    /// returns the step's `loss` output.
    pub fn update(&mut self, model: &mut Model<T>, outs: &[(String, Tensor<T>)], lr: f64) -> f64 {
        self.update_values(&mut model.values, outs, &LearningRates::uniform(lr), 1.0)
    }

    /// [`update`](Self::update) on named parameter values, with every gradient multiplied by
    /// `grad_scale` first (clipping by global norm).
    pub fn update_values(
        &mut self,
        values: &mut HashMap<String, Arc<Vec<T>>>,
        outs: &[(String, Tensor<T>)],
        lr: &LearningRates,
        grad_scale: f64,
    ) -> f64 {
        self.t += 1;
        let mut loss = f64::NAN;
        let mut grads: HashMap<&str, &[T]> = HashMap::new();
        for (name, t) in outs {
            if let Some(p) = name.strip_prefix("grad.") {
                if values.contains_key(p) {
                    grads.insert(p, &t.data);
                }
            } else if name == "loss" {
                loss = t.scalar().as_f64();
            }
        }
        for (name, g) in &grads {
            self.state
                .entry(name.to_string())
                .or_insert_with(|| (vec![T::zero(); g.len()], vec![T::zero(); g.len()]));
        }
        let mut moments: HashMap<&str, (&mut Vec<T>, &mut Vec<T>)> = self
            .state
            .iter_mut()
            .map(|(k, (m, v))| (k.as_str(), (m, v)))
            .collect();
        let [b1, b2] = self.betas;
        let (c1, c2) = (1.0 - b1.powi(self.t), 1.0 - b2.powi(self.t));
        // Every parameter's chunks in one parallel pass (one fork-join per step, not one per
        // parameter); each chunk is updated by `adam_chunk`.
        const CHUNK: usize = 4096;
        let mut chunks = Vec::new();
        for (name, param) in values.iter_mut() {
            let (Some(grad), Some((m, v))) =
                (grads.get(name.as_str()), moments.remove(name.as_str()))
            else {
                continue;
            };
            // p −= lr · m̂ / (√v̂ + ε), with m̂ = m / c1, v̂ = v / c2
            let coeffs = AdamCoeffs {
                b1: T::of_f64(b1),
                b2: T::of_f64(b2),
                step: T::of_f64(lr.of(name) / c1),
                c2s: T::of_f64(1.0 / c2.sqrt()),
                eps: T::of_f64(self.eps),
                grad_scale: T::of_f64(grad_scale),
            };
            let param: &mut Vec<T> = Arc::make_mut(param);
            chunks.extend(
                param
                    .chunks_mut(CHUNK)
                    .zip(grad.chunks(CHUNK))
                    .zip(m.chunks_mut(CHUNK).zip(v.chunks_mut(CHUNK)))
                    .map(move |((p, g), (m, v))| (coeffs, p, g, m, v)),
            );
        }
        chunks
            .into_par_iter()
            .for_each(|(coeffs, p, g, m, v)| adam_chunk(coeffs, p, g, m, v));
        loss
    }
}
