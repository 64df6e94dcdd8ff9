//! Property test of the algebra phase (`OptLevel::Full`): over random small flows, the rewritten
//! training step computes the same values, in f64, as the step before the algebra.
//!
//! For every random case (a flow, a batch size, parameters and a batch):
//!
//! - every output of the step (`loss`, `recon`, every `grad.*`) under `OptLevel::Full` equals the
//!   one under `OptLevel::Substitution` to 1e-9 relative to the tensor's largest magnitude (the
//!   algebra is exact: only float rounding may differ);
//! - for `gradient: exact` specs (no substitution), it also equals `OptLevel::None`;
//! - the Full step never has more FLOPs than the Substitution step (extraction never makes the
//!   step worse under the cost model it optimizes).
//!
//! A seeded loop (SplitMix64) rather than a property-testing crate: the cases are reproducible
//! from the printed seed. Compilation (e-graph saturation) dominates the cost, so each compiled
//! flow is run on a few random parameter/batch draws: `FLOWS × DRAWS` = 2000 cases.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::Graph;
use snfc_compiler::rewrite::{op_cost, op_counts};
use snfc_compiler::spec::{FlowSpec, GradientMode, Preprocess};
use snfc_runtime::host::exec::{Executor, Feeds, Program, Tensor};
use snfc_runtime::model::Model;
use std::collections::BTreeMap;
use std::sync::Arc;

mod common;
use common::Rng;

/// Random flows compiled (each at all levels).
const FLOWS: u64 = 1000;
/// Random parameter/input draws per compiled flow.
const DRAWS: u64 = 2;
/// Agreement required, relative to the reference tensor's largest magnitude.
const REL: f64 = 1e-9;

/// A random flow: D ∈ 2..=5, 1–3 linear layers (bias per layer at random), a smooth leaky ReLU
/// with random α between some of them, λ ∈ [0, 3] (sometimes exactly 0), either gradient mode
/// and either preprocessing. Returns the spec and a batch size B ∈ 1..=4.
fn random_flow(rng: &mut Rng) -> (FlowSpec, usize) {
    let d = rng.int(2, 5);
    let batch = rng.int(1, 4);
    let preprocess = if rng.coin() {
        Preprocess::None
    } else {
        Preprocess::DequantizeLogit
    };
    let mut b = FlowSpec::builder("prop").input(&[d], preprocess);
    let depth = rng.int(1, 3);
    for i in 0..depth {
        if i > 0 && rng.coin() {
            b = b.smooth_leaky_relu(rng.range(0.05, 0.95));
        }
        b = b.linear(rng.coin());
    }
    let lambda = if rng.int(0, 7) == 0 {
        0.0
    } else {
        rng.range(0.0, 3.0)
    };
    b = if rng.coin() {
        b.self_normalizing(lambda)
    } else {
        b.exact().lambda(lambda)
    };
    let spec = b
        .batch_size(batch)
        .build()
        .unwrap_or_else(|e| panic!("random spec: {e}"));
    (spec, batch)
}

/// The spec's initial parameters (paper A.3), perturbed so nothing is special: W and R get
/// independent 0.3·N/√D noise (so R is not W⁻¹), b = 0.5·N. Plus one random batch: `x` ~
/// N(0, 1.5²) for `preprocess: none`, 8-bit integers and uniform `noise` for `dequantize_logit`.
fn random_feeds(spec: &FlowSpec, batch: usize, rng: &mut Rng) -> Feeds<f64> {
    let d = spec.input.dim();
    let model = Model::<f64>::init(spec, rng.next_u64());
    let mut feeds = Feeds::new();
    for p in &model.params {
        let sd = if p.name.ends_with(".bias") {
            0.5
        } else {
            0.3 / (d as f64).sqrt()
        };
        let v: Vec<f64> = model
            .get(&p.name)
            .iter()
            .map(|x| x + sd * rng.normal())
            .collect();
        feeds.insert(p.name.clone(), Arc::new(v));
    }
    let n = d * batch;
    match spec.input.preprocess {
        Preprocess::None => {
            let x: Vec<f64> = (0..n).map(|_| 1.5 * rng.normal()).collect();
            feeds.insert("x".into(), Arc::new(x));
        }
        Preprocess::DequantizeLogit => {
            let x: Vec<f64> = (0..n).map(|_| rng.int(0, 255) as f64).collect();
            let u: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
            feeds.insert("x".into(), Arc::new(x));
            feeds.insert("noise".into(), Arc::new(u));
        }
    }
    feeds
}

fn run(program: &Program, feeds: &Feeds<f64>) -> BTreeMap<String, Tensor<f64>> {
    Executor::<f64>::new()
        .run(program, feeds)
        .unwrap_or_else(|e| panic!("running {}: {e}", program.name()))
        .into_iter()
        .collect()
}

/// `None` if every output of `got` equals the one of `want` (same names, shapes, and
/// `max|got − want| ≤ REL · max|want|`), else what differs.
fn compare(
    got: &BTreeMap<String, Tensor<f64>>,
    want: &BTreeMap<String, Tensor<f64>>,
) -> Option<String> {
    let names = |m: &BTreeMap<String, Tensor<f64>>| m.keys().cloned().collect::<Vec<_>>();
    if names(got) != names(want) {
        return Some(format!(
            "outputs differ: {:?} vs {:?}",
            names(got),
            names(want)
        ));
    }
    for (name, w) in want {
        let g = &got[name];
        if g.shape != w.shape {
            return Some(format!("{name}: shape {:?} vs {:?}", g.shape, w.shape));
        }
        if w.data.iter().any(|v| !v.is_finite()) {
            return Some(format!("{name}: the reference is not finite: {:?}", w.data));
        }
        let scale = w
            .data
            .iter()
            .fold(0.0f64, |m, v| m.max(v.abs()))
            .max(1e-300);
        let err = g
            .data
            .iter()
            .zip(&w.data)
            .map(|(a, b)| (a - b).abs())
            .fold(
                0.0f64,
                |m, e| if e.is_nan() { f64::INFINITY } else { m.max(e) },
            );
        if err > REL * scale {
            return Some(format!(
                "{name}: max |difference| {err:.3e} > {REL:e} × max |reference| {scale:.3e}\n  \
                 got  {:?}\n  want {:?}",
                g.data, w.data
            ));
        }
    }
    None
}

fn describe(spec: &FlowSpec, batch: usize) -> String {
    format!(
        "D={} B={batch} preprocess={:?} layers={:?} objective={:?}",
        spec.input.dim(),
        spec.input.preprocess,
        spec.layers,
        spec.objective
    )
}

/// The step graphs of one random flow: Full, then the references it must agree with
/// (Substitution always; None too for exact specs, where no substitution applies. For a
/// self-normalizing spec, None is the exact gradient, a different function).
struct Compiled {
    spec: FlowSpec,
    batch: usize,
    full: Graph,
    refs: Vec<(&'static str, Graph)>,
}

fn compile_flow(flow: u64) -> (Compiled, Rng) {
    let mut rng = Rng::new(0x5eed_0000 + flow);
    let (spec, batch) = random_flow(&mut rng);
    let full = compile_train(&spec, batch, OptLevel::Full)
        .expect("the spec compiles")
        .step;
    let mut refs = vec![(
        "Substitution",
        compile_train(&spec, batch, OptLevel::Substitution)
            .expect("the spec compiles")
            .step,
    )];
    if spec.objective.gradient == GradientMode::Exact {
        refs.push((
            "None",
            compile_train(&spec, batch, OptLevel::None)
                .expect("the spec compiles")
                .step,
        ));
    }
    let c = Compiled {
        spec,
        batch,
        full,
        refs,
    };
    (c, rng)
}

/// The extraction cost model ([`op_cost`]) summed over a graph's nodes.
fn model_cost(g: &Graph) -> f64 {
    g.nodes()
        .into_iter()
        .map(|n| {
            let ins = g.inputs(n);
            let shapes: Vec<&Vec<usize>> = ins.iter().map(|i| &g.node(*i).shape).collect();
            op_cost(&g.node(n).op, &shapes, &g.node(n).shape)
        })
        .sum()
}

#[test]
fn full_optimization_preserves_every_output_of_random_flows() {
    let mut failures: Vec<String> = Vec::new();
    let mut cases = 0;
    for flow in 0..FLOWS {
        let (c, mut rng) = compile_flow(flow);
        let p_full = Program::new(&c.full);
        let p_refs: Vec<(&str, Program)> =
            c.refs.iter().map(|(l, g)| (*l, Program::new(g))).collect();
        for draw in 0..DRAWS {
            cases += 1;
            let feeds = random_feeds(&c.spec, c.batch, &mut rng);
            let got = run(&p_full, &feeds);
            for (level, p) in &p_refs {
                if let Some(why) = compare(&got, &run(p, &feeds)) {
                    failures.push(format!(
                        "flow {flow} draw {draw} ({}): Full vs {level}: {why}",
                        describe(&c.spec, c.batch)
                    ));
                }
            }
        }
    }
    assert!(cases >= 1000, "only {cases} cases");
    assert!(
        failures.is_empty(),
        "{} of {cases} cases differ; the first ones:\n{}",
        failures.len(),
        failures
            .iter()
            .take(5)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Extraction starts from an e-graph that contains the Substitution step itself, so it should
/// never return a step with more FLOPs (or, under its own cost model, a higher cost).
#[test]
fn full_optimization_never_adds_flops() {
    let mut regressions: Vec<String> = Vec::new();
    for flow in 0..FLOWS {
        let (c, _) = compile_flow(flow);
        let subst = &c.refs[0].1;
        let (full, sub) = (op_counts(&c.full), op_counts(subst));
        if full.flops > sub.flops {
            regressions.push(format!(
                "flow {flow} ({}): FLOPs {} (Full) > {} (Substitution); cost model {} > {}; \
                 GEMMs {} vs {}, kernels {} vs {}",
                describe(&c.spec, c.batch),
                full.flops,
                sub.flops,
                model_cost(&c.full),
                model_cost(subst),
                full.gemm,
                sub.gemm,
                full.kernels,
                sub.kernels,
            ));
        }
    }
    assert!(
        regressions.is_empty(),
        "{} of {FLOWS} flows have more FLOPs under Full than under Substitution:\n{}",
        regressions.len(),
        regressions.join("\n")
    );
}
