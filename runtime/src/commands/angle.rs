//! The angle between the self-normalizing gradient and the exact one (the paper's Fig. 3): at
//! the same parameters and batch, the gradient of the spec's objective as the optimized step
//! computes it (Rᵀ in place of W⁻ᵀ) and the exact gradient of the same objective (the training
//! graph before any rewrite: W⁻ᵀ from an LU), per self-normalizing layer over W and b.

use crate::host::exec::{ExecError, Executor, Feeds, Program, Tensor};
use crate::host::linalg::Real;
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::{parameters, ParamKind};
use snfc_compiler::plan::Plan;
use snfc_compiler::rewrite::RewriteError;
use snfc_compiler::spec::{FlowSpec, GradientMode};
use std::collections::BTreeMap;

/// The two steps, compiled once, run in f64 on the host whatever the training device.
pub struct AngleProbe {
    snf: Program,
    exact: Program,
    /// `layers.{k}` → the names of its parameters that both steps train.
    layers: BTreeMap<String, Vec<String>>,
}

/// The angle in degrees between `a` and `b`, accurate for tiny angles too:
/// θ = 2·atan2(‖â − b̂‖, ‖â + b̂‖) with â, b̂ the unit vectors (NaN if either is zero).
pub fn angle_degrees(a: &[f64], b: &[f64]) -> f64 {
    let na = a.iter().map(|x| x * x).sum::<f64>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f64>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return f64::NAN;
    }
    let (mut diff, mut sum) = (0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        let (u, v) = (x / na, y / nb);
        diff += (u - v) * (u - v);
        sum += (u + v) * (u + v);
    }
    2.0 * diff.sqrt().atan2(sum.sqrt()).to_degrees()
}

impl AngleProbe {
    /// `None` for a spec without self-normalizing layers or trained with the exact gradient
    /// already (nothing to compare).
    pub fn new(spec: &FlowSpec, batch: usize) -> Result<Option<AngleProbe>, RewriteError> {
        if spec.objective.gradient != GradientMode::SelfNormalizing {
            return Ok(None);
        }
        let params = parameters(spec);
        let mut layers: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let inverse_layers: Vec<usize> = params
            .iter()
            .filter(|p| p.kind == ParamKind::WeightInv)
            .map(|p| p.layer)
            .collect();
        for p in &params {
            if inverse_layers.contains(&p.layer)
                && matches!(p.kind, ParamKind::Weight | ParamKind::Bias)
            {
                layers
                    .entry(format!("layers.{}", p.layer))
                    .or_default()
                    .push(p.name.clone());
            }
        }
        if layers.is_empty() {
            return Ok(None);
        }
        let snf = compile_train(spec, batch, OptLevel::Full)?.step;
        // No rewrite at all: the exact gradient, inverses included.
        let exact = compile_train(spec, batch, OptLevel::None)?.step;
        Ok(Some(AngleProbe {
            snf: Program::from_plan(Plan::for_level(&snf, OptLevel::Full)),
            exact: Program::from_plan(Plan::for_level(&exact, OptLevel::None)),
            layers,
        }))
    }

    /// The self-normalizing layers (`layers.{k}`) whose angles [`measure`](Self::measure) reports.
    pub fn layers(&self) -> impl Iterator<Item = &str> {
        self.layers.keys().map(String::as_str)
    }

    /// Per layer, the angle in degrees between the two gradients at `feeds` (parameters, the
    /// batch `x`, its dequantization `noise` and GECO's λ inputs, as the training step takes).
    pub fn measure(&self, feeds: &Feeds<f64>) -> Result<BTreeMap<String, f64>, ExecError> {
        let mut exec = Executor::<f64>::new();
        let snf = exec.run(&self.snf, feeds)?;
        let exact = exec.run(&self.exact, feeds)?;
        let grad = |outs: &[(String, Tensor<f64>)], name: &str| -> Result<Vec<f64>, ExecError> {
            outs.iter()
                .find(|(n, _)| n.strip_prefix("grad.") == Some(name))
                .map(|(_, t)| t.data.clone())
                .ok_or_else(|| ExecError::Missing {
                    graph: "angle".into(),
                    kind: "output",
                    name: format!("grad.{name}"),
                })
        };
        let mut angles = BTreeMap::new();
        for (layer, names) in &self.layers {
            let (mut a, mut b) = (Vec::new(), Vec::new());
            for n in names {
                a.extend(grad(&snf, n)?);
                b.extend(grad(&exact, n)?);
            }
            angles.insert(layer.clone(), angle_degrees(&a, &b));
        }
        Ok(angles)
    }
}

/// The feeds of a step in f64, from feeds in any precision.
pub fn feeds_f64<T: Real>(feeds: &Feeds<T>) -> Feeds<f64> {
    feeds
        .iter()
        .map(|(k, v)| {
            (
                k.clone(),
                std::sync::Arc::new(v.iter().map(|x| x.as_f64()).collect()),
            )
        })
        .collect()
}

/// The angles measured over an epoch: their mean over layers and measurements, the standard
/// deviation, and each layer's mean (a `metrics.jsonl` field).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct AngleStats {
    pub mean: f64,
    pub std: f64,
    pub measurements: usize,
    pub layers: BTreeMap<String, f64>,
}

impl AngleStats {
    pub fn of(samples: &[BTreeMap<String, f64>]) -> Option<AngleStats> {
        let all: Vec<f64> = samples.iter().flat_map(|s| s.values().copied()).collect();
        if all.is_empty() {
            return None;
        }
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|a| (a - mean) * (a - mean)).sum::<f64>() / all.len() as f64;
        let mut layers = BTreeMap::new();
        for s in samples {
            for (l, a) in s {
                *layers.entry(l.clone()).or_insert(0.0) += a / samples.len() as f64;
            }
        }
        Some(AngleStats {
            mean,
            std: var.sqrt(),
            measurements: samples.len(),
            layers,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn angles_of_known_vectors() {
        assert!((angle_degrees(&[1.0, 0.0], &[0.0, 2.0]) - 90.0).abs() < 1e-12);
        assert!((angle_degrees(&[1.0, 1.0], &[-3.0, -3.0]) - 180.0).abs() < 1e-12);
        assert_eq!(angle_degrees(&[2.0, 5.0], &[4.0, 10.0]), 0.0);
        // A tiny angle keeps its digits (acos of the cosine would round it to 0).
        let t = 1e-9f64;
        let a = angle_degrees(&[1.0, 0.0], &[t.cos(), t.sin()]);
        assert!((a - t.to_degrees()).abs() < 1e-6 * t.to_degrees(), "{a}");
        assert!(angle_degrees(&[0.0, 0.0], &[1.0, 0.0]).is_nan());
    }

    #[test]
    fn stats_average_layers_and_measurements() {
        let s = |a: f64, b: f64| BTreeMap::from([("layers.0".into(), a), ("layers.2".into(), b)]);
        let st = AngleStats::of(&[s(1.0, 3.0), s(3.0, 5.0)]).unwrap();
        assert_eq!((st.mean, st.measurements), (3.0, 2));
        assert!((st.std - 2f64.sqrt()).abs() < 1e-12);
        assert_eq!(st.layers["layers.0"], 2.0);
        assert_eq!(st.layers["layers.2"], 4.0);
        assert!(AngleStats::of(&[]).is_none());
    }
}
