//! One backend test suite, instantiated for `host`, `wgpu` and `cuda`: every kernel kind and
//! whole training steps against the host executor in f64, on fresh random inputs, with every
//! device buffer first filled with NaN so that an output element no kernel wrote shows up.
//!
//! `wgpu` runs wherever an adapter exists (in CI: Mesa's lavapipe on the CPU, installed by
//! `.ci/run`); `cuda` where a CUDA driver and device exist. A backend that is absent skips its
//! tests with a message on stderr (run with `--nocapture` to see it).

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::eval_graph;
use snfc_compiler::ir::{Graph, GraphBuilder, Unary};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::{parse_spec, FlowSpec};
use snfc_runtime::backend::{open, open_variant, Backend};
use snfc_runtime::cube::probe::{choose, Chosen, DeviceKind};
use snfc_runtime::host::exec::{Executor, Feeds, Program};
use snfc_runtime::model::Model;
use std::sync::Arc;

mod common;
use common::Rng;

/// Relative error allowed in f32 against the f64 host.
const TOL: f64 = 1e-4;

fn device(kind: DeviceKind) -> Option<Chosen> {
    match choose(kind) {
        Ok(c) => Some(c),
        Err(e) => {
            eprintln!("skipped: {e}");
            None
        }
    }
}

/// Random feeds for every input and parameter of `g`, in `[lo, hi)`.
fn random_feeds(g: &Graph, rng: &mut Rng, lo: f64, hi: f64) -> Feeds<f64> {
    let p = Plan::new(g);
    p.feeds()
        .into_iter()
        .map(|(_, name, shape)| {
            let n = shape.iter().product::<usize>().max(1);
            let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect();
            (name, Arc::new(v))
        })
        .collect()
}

/// Run `plan` on the device and compare every output with the host f64 run of the same plan.
fn check_plan(chosen: &Chosen, plan: Plan, feeds: &Feeds<f64>, what: &str) {
    check_variant(chosen, plan, feeds, what, None)
}

fn check_variant(
    chosen: &Chosen,
    plan: Plan,
    feeds: &Feeds<f64>,
    what: &str,
    staged: Option<bool>,
) {
    let want = Executor::<f64>::new()
        .run(&Program::from_plan(plan.clone()), feeds)
        .expect("host f64 run");
    let mut b: Box<dyn Backend<f32>> =
        open_variant(chosen, plan, true, staged).expect("backend opens");
    for (name, v) in feeds {
        let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
        b.set(name, &v32).expect("set");
    }
    b.run().expect("device run");
    let got = b.outputs().expect("outputs");
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for ((gn, gt), (wn, wt)) in got.iter().zip(&want) {
        assert_eq!(gn, wn);
        assert_eq!(gt.shape, wt.shape, "{what}: {gn} shape");
        assert_eq!(gt.data.len(), wt.data.len(), "{what}: {gn} length");
        if let Some(k) = gt.data.iter().position(|v| v.is_nan()) {
            panic!(
                "{what} on {}: output {gn} element {k} was never written (NaN)",
                b.device()
            );
        }
        let scale = wt.data.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        let err = gt
            .data
            .iter()
            .zip(&wt.data)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err / scale <= TOL,
            "{what} on {}: output {gn}: max error {err:.3e} relative to {scale:.3e}",
            b.device()
        );
    }
}

fn check_graph(chosen: &Chosen, g: &Graph, rng: &mut Rng, lo: f64, hi: f64, what: &str) {
    let feeds = random_feeds(g, rng, lo, hi);
    check_plan(chosen, Plan::new(g), &feeds, &format!("{what} (fused)"));
    check_plan(
        chosen,
        Plan::unfused(g),
        &feeds,
        &format!("{what} (unfused)"),
    );
}

/// GEMMs in all four operand layouts, with and without an epilogue into a plain or
/// transposed addend, at sizes that are not multiples of the tile.
fn gemm(chosen: &Chosen) {
    let mut rng = Rng::new(11);
    for (m, k, n) in [(5, 7, 3), (17, 33, 20), (40, 16, 1), (70, 41, 130)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for epilogue in 0..3 {
                    let mut b = GraphBuilder::new("gemm");
                    let a = if ta {
                        let s = b.input("a", vec![k, m]);
                        b.transpose(s)
                    } else {
                        b.input("a", vec![m, k])
                    };
                    let bb = if tb {
                        let s = b.input("b", vec![n, k]);
                        b.transpose(s)
                    } else {
                        b.input("b", vec![k, n])
                    };
                    let p = b.matmul(a, bb);
                    let out = match epilogue {
                        0 => p,
                        1 => {
                            let c = b.input("c", vec![m, n]);
                            b.sub(c, p)
                        }
                        _ => {
                            let c = b.input("c", vec![n, m]);
                            let ct = b.transpose(c);
                            b.add2(p, ct)
                        }
                    };
                    b.output("out", out);
                    let g = b.finish();
                    let feeds = random_feeds(&g, &mut rng, -1.0, 1.0);
                    // Both GEMM kernels on every device: operands staged in shared memory
                    // (GPUs) and read directly (CPU adapters).
                    for staged in [true, false] {
                        let what = format!(
                            "gemm {m}x{k}x{n} ta={ta} tb={tb} epilogue={epilogue} staged={staged}"
                        );
                        for plan in [Plan::new(&g), Plan::unfused(&g)] {
                            check_variant(chosen, plan, &feeds, &what, Some(staged));
                        }
                    }
                }
            }
        }
    }
}

/// Every elementwise op, scalars and broadcasts, in one fused group and one by one.
fn elementwise(chosen: &Chosen) {
    let mut rng = Rng::new(12);
    let (r, c) = (13, 37);
    let mut b = GraphBuilder::new("elementwise");
    let x = b.input("x", vec![r, c]);
    let y = b.input("y", vec![r, c]);
    let row = b.input("row", vec![c]);
    let col = b.input("col", vec![r]);
    let s = b.input("s", vec![]);
    let e = b.unary(Unary::Exp, x);
    let l = b.unary(Unary::Log, e);
    let sp = b.unary(Unary::Softplus, y);
    let sg = b.unary(Unary::Sigmoid, x);
    let sq = b.unary(Unary::Square, y);
    let one = b.constant(1.5);
    let shifted = b.add2(sq, one);
    let rc = b.unary(Unary::Recip, shifted);
    let br = b.broadcast(row, vec![r, c], Some(0));
    let bc = b.broadcast(col, vec![r, c], Some(1));
    let bs = b.broadcast(s, vec![r, c], None);
    let t1 = b.mul(l, br);
    let t2 = b.sub(sp, bc);
    let t3 = b.mul(sg, bs);
    let t4 = b.add2(t1, t2);
    let t5 = b.add2(t4, t3);
    let t6 = b.mul(t5, rc);
    let t7 = b.neg(t6);
    let t8 = b.mul(t7, s);
    let xt = b.transpose(y);
    let yt = b.input("yt", vec![c, r]);
    let t9 = b.add2(xt, yt);
    b.output("out", t8);
    b.output("recip", rc);
    b.output("transposed_sum", t9);
    let g = b.finish();
    check_graph(chosen, &g, &mut rng, -2.0, 2.0, "elementwise");
}

/// Sums over everything, over rows (per column) and over columns (per row), alone, as tails
/// of a fused group, and mixed in one group (which splits into separate launches).
fn reductions(chosen: &Chosen) {
    let mut rng = Rng::new(13);
    for (r, c) in [(9, 300), (300, 7), (1, 5)] {
        let mut b = GraphBuilder::new("sums");
        let x = b.input("x", vec![r, c]);
        let sq = b.unary(Unary::Square, x);
        let all = b.sum(sq, None);
        let per_col = b.sum(sq, Some(0));
        let e = b.unary(Unary::Exp, x);
        let per_row = b.sum(e, Some(1));
        let total = b.sum(x, None);
        b.output("all", all);
        b.output("per_col", per_col);
        b.output("per_row", per_row);
        b.output("total", total);
        let g = b.finish();
        check_graph(chosen, &g, &mut rng, -1.0, 1.0, &format!("sums {r}x{c}"));
        // One group per axis.
        for axis in [None, Some(0), Some(1)] {
            let mut b = GraphBuilder::new("sum");
            let x = b.input("x", vec![r, c]);
            let y = b.input("y", vec![r, c]);
            let m = b.mul(x, y);
            let s = b.sum(m, axis);
            b.output("m", m);
            b.output("s", s);
            let g = b.finish();
            check_graph(
                chosen,
                &g,
                &mut rng,
                -1.0,
                1.0,
                &format!("sum {axis:?} of {r}x{c}"),
            );
        }
    }
}

/// Inverse and log-determinant (run by LU on the host inside a device plan).
fn linalg(chosen: &Chosen) {
    let mut rng = Rng::new(14);
    let n = 12;
    let mut b = GraphBuilder::new("linalg");
    let w = b.param("w", vec![n, n]);
    let inv = b.inverse(w);
    let ld = b.logdet(w);
    let x = b.input("x", vec![n, 3]);
    let y = b.matmul(inv, x);
    b.output("y", y);
    b.output("logdet", ld);
    let g = b.finish();
    // A well-conditioned W: identity plus noise.
    let mut feeds = random_feeds(&g, &mut rng, -0.1, 0.1);
    let mut wv = (*feeds["w"]).clone();
    for i in 0..n {
        wv[i * n + i] += 1.0;
    }
    feeds.insert("w".into(), Arc::new(wv));
    check_plan(chosen, Plan::new(&g), &feeds, "inverse and logdet");
}

fn spec(text: &str) -> FlowSpec {
    parse_spec(text).expect("spec")
}

fn small_spec(gradient: &str) -> FlowSpec {
    spec(&format!(
        r#"{{"name": "small", "input": {{"shape": [24], "preprocess": "none"}},
            "layers": [{{"type": "linear", "bias": true}}, {{"type": "smooth_leaky_relu", "alpha": 0.3}},
                       {{"type": "linear", "bias": true}}, {{"type": "smooth_leaky_relu", "alpha": 0.3}},
                       {{"type": "linear", "bias": false}}],
            "objective": {{"gradient": "{gradient}", "lambda": 1.0}},
            "train": {{"batch_size": 10}}}}"#
    ))
}

fn step_feeds(spec: &FlowSpec, batch: usize, seed: u64, eight_bit: bool) -> Feeds<f64> {
    let mut rng = Rng::new(seed);
    let model = Model::<f64>::init(spec, seed);
    let mut f: Feeds<f64> = model.values.clone();
    // Perturb R away from W⁻¹ so the reconstruction terms are not zero.
    for (name, v) in f.iter_mut() {
        if name.ends_with("weight_inv") {
            let p: Vec<f64> = v.iter().map(|x| x + 0.01 * (rng.uniform() - 0.5)).collect();
            *v = Arc::new(p);
        }
    }
    let d = spec.input.dim();
    let x: Vec<f64> = (0..d * batch)
        .map(|_| {
            if eight_bit {
                (rng.uniform() * 256.0).floor()
            } else {
                rng.uniform() * 2.0 - 1.0
            }
        })
        .collect();
    let u: Vec<f64> = (0..d * batch).map(|_| rng.uniform()).collect();
    f.insert("x".into(), Arc::new(x));
    f.insert("noise".into(), Arc::new(u));
    f
}

/// Whole training steps (every level of optimization), and the evaluation graph.
fn training_steps(chosen: &Chosen) {
    for (s, batch, eight_bit) in [
        (small_spec("self_normalizing"), 10, false),
        (small_spec("exact"), 10, false),
        (spec(include_str!("../../specs/mnist_fc2.json")), 8, true),
    ] {
        let feeds = step_feeds(&s, batch, 5, eight_bit);
        for level in [OptLevel::None, OptLevel::Substitution, OptLevel::Full] {
            let c = compile_train(&s, batch, level).expect("the spec compiles");
            check_plan(
                chosen,
                Plan::for_level(&c.step, level),
                &feeds,
                &format!("{} step at {level:?}", s.name),
            );
        }
        check_plan(
            chosen,
            Plan::new(&eval_graph(&s, batch)),
            &feeds,
            &format!("{} eval", s.name),
        );
    }
}

/// Adam on the device equals Adam on the host over several steps.
fn adam(chosen: &Chosen) {
    let s = small_spec("self_normalizing");
    let batch = 10;
    let c = compile_train(&s, batch, OptLevel::Full).expect("the spec compiles");
    let plan = Plan::new(&c.step);
    let feeds = step_feeds(&s, batch, 9, false);
    let mut host: Box<dyn Backend<f64>> = open(&Chosen::Host, plan.clone()).expect("host");
    let mut dev: Box<dyn Backend<f32>> = open(chosen, plan).expect("device");
    for (name, v) in &feeds {
        host.set(name, v).expect("set");
        let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
        dev.set(name, &v32).expect("set");
    }
    for step in 1..=3 {
        host.run().expect("run");
        dev.run().expect("run");
        let lr = 1e-3 * step as f64;
        host.adam_step(lr, [0.9, 0.999], 1e-8).expect("adam");
        dev.adam_step(lr, [0.9, 0.999], 1e-8).expect("adam");
    }
    for name in Model::<f64>::init(&s, 0).values.keys() {
        let want = host.fed(name).expect("param");
        let got = dev.fed(name).expect("param");
        let scale = want.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(&want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err / scale <= TOL,
            "adam on {}: {name} error {err:.3e} of {scale:.3e}",
            dev.device()
        );
    }
}

/// One `#[test]` per check, run on the device of `$kind` (skipped when it is absent).
macro_rules! backend_suite {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;
            backend_suite!(@tests $kind;
                gemm_layouts_and_epilogues => gemm,
                fused_elementwise_ops => elementwise,
                sums_and_fused_reduction_tails => reductions,
                inverse_and_logdet => linalg,
                whole_training_steps_and_eval => training_steps,
                adam_update => adam);
        }
    };
    (@tests $kind:expr; $($name:ident => $check:ident),*) => {
        $(
            #[test]
            fn $name() {
                if let Some(d) = device($kind) {
                    $check(&d)
                }
            }
        )*
    };
}

backend_suite!(host, DeviceKind::Host);
backend_suite!(wgpu, DeviceKind::Wgpu);
backend_suite!(cuda, DeviceKind::Cuda);
