//! Convolutional self-normalizing flows (paper §4.2, A.2) through the whole pipeline — spec,
//! lowering, autodiff, the rewrites, the host executor — in f64:
//!
//! 1. the exact conv flow's gradients against central finite differences of its objective;
//! 2. the self-normalizing conv step against an independent dense formulation: the same flow as
//!    fully connected layers with W = T(w), R = T(r) (whose step is checked against the paper's
//!    closed forms in `gradients.rs`); the conv gradients must be its gradients gathered onto the
//!    kernels (`toeplitz_adjoint`) and summed per channel for the bias;
//! 3. the optimized step equals the substituted one, and keeps no inverse, log-det or dense
//!    Toeplitz matrix;
//! 4. evaluation's log-det and the exact inverse used in sampling agree with the dense flow;
//! 5. squeeze follows the pinned space-to-depth layout.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::Op;
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::{parse_spec, FlowSpec, Lambda, ReconTrains};
use snfc_runtime::eval::logdet_sum;
use snfc_runtime::host::exec::Feeds;
use snfc_runtime::host::shape_ops::{toeplitz, toeplitz_adjoint};
use snfc_runtime::model::Model;
use snfc_runtime::sample::invert;
use std::sync::Arc;

mod common;
use common::{check_gradients_fd, run_f64 as run, Rng};

const C: usize = 2;
const H: usize = 4;
const W: usize = 3;
const N: usize = C * H * W;
const K: usize = 3;
const BATCH: usize = 3;

fn spec(text: &str) -> FlowSpec {
    parse_spec(text).unwrap_or_else(|e| panic!("{e}"))
}

fn conv_spec(gradient: &str) -> FlowSpec {
    spec(&format!(
        r#"{{"name": "conv2", "input": {{"shape": [{C}, {H}, {W}], "preprocess": "none"}},
            "layers": [{{"type": "conv", "kernel_size": {K}}}, {{"type": "smooth_leaky_relu"}},
                       {{"type": "conv", "kernel_size": {K}}}],
            "objective": {{"gradient": "{gradient}", "lambda": 0.7}}}}"#
    ))
}

fn dense_spec() -> FlowSpec {
    spec(&format!(
        r#"{{"name": "dense2", "input": {{"shape": [{N}], "preprocess": "none"}},
            "layers": [{{"type": "linear"}}, {{"type": "smooth_leaky_relu"}}, {{"type": "linear"}}],
            "objective": {{"gradient": "self_normalizing", "lambda": 0.7}}}}"#
    ))
}

/// Conv parameters near their initialization (invertible), plus a batch `x`.
fn conv_feeds(spec: &FlowSpec, rng: &mut Rng) -> Feeds<f64> {
    let model = Model::<f64>::init(spec, 11);
    let mut feeds = Feeds::new();
    for p in &model.params {
        let sd = if p.name.ends_with(".bias") { 0.5 } else { 0.15 };
        let v: Vec<f64> = model
            .get(&p.name)
            .iter()
            .map(|x| x + sd * rng.normal())
            .collect();
        feeds.insert(p.name.clone(), Arc::new(v));
    }
    let x: Vec<f64> = (0..N * BATCH).map(|_| 1.5 * rng.normal()).collect();
    feeds.insert("x".into(), Arc::new(x));
    feeds
}

/// The dense flow's parameters: W = T(w), R = T(r), bias repeated over each channel's pixels.
fn dense_feeds(conv: &Feeds<f64>) -> Feeds<f64> {
    let mut out = Feeds::new();
    for layer in [0, 2] {
        for kind in ["weight", "weight_inv"] {
            let name = format!("layers.{layer}.{kind}");
            out.insert(
                name.clone(),
                Arc::new(toeplitz(&conv[&name], &[C, C, K, K], H, W)),
            );
        }
        let name = format!("layers.{layer}.bias");
        let b: Vec<f64> = (0..N).map(|i| conv[&name][i / (H * W)]).collect();
        out.insert(name, Arc::new(b));
    }
    out.insert("x".into(), conv["x"].clone());
    out
}

fn assert_close(what: &str, got: &[f64], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    let scale = want.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert!(
            (g - w).abs() <= tol * scale,
            "{what}[{i}]: {g} vs {w} (scale {scale})"
        );
    }
}

#[test]
fn exact_conv_gradients_match_finite_differences() {
    let spec = conv_spec("exact");
    let mut rng = Rng::new(5);
    let feeds = conv_feeds(&spec, &mut rng);
    let c = compile_train(&spec, BATCH, OptLevel::None).expect("the spec compiles");
    let outs = run(&c.exact, &feeds);
    let checked: usize = check_gradients_fd(&c.exact, &feeds, 1e-6)
        .iter()
        .map(|(_, n)| n)
        .sum();
    // 2 layers × (w 36 + b 2); an exact spec's weight_inv gets no gradient.
    assert_eq!(checked, 2 * (C * C * K * K + C));
    // The exact step keeps the O(N³) inverse of each layer's Toeplitz matrix.
    let full = compile_train(&spec, BATCH, OptLevel::Full).expect("the spec compiles");
    assert_eq!(op_counts(&full.step).inverse, 2);
    let step = run(&full.step, &feeds);
    for (name, g) in outs.iter().filter(|(k, _)| k.starts_with("grad.")) {
        assert_close(name, &step[name], g, 1e-10);
    }
}

#[test]
fn self_normalizing_conv_step_is_the_dense_step_gathered_onto_kernels() {
    let spec = conv_spec("self_normalizing");
    let mut rng = Rng::new(9);
    let feeds = conv_feeds(&spec, &mut rng);
    let dense = compile_train(&dense_spec(), BATCH, OptLevel::Full).expect("the spec compiles");
    let want = run(&dense.step, &dense_feeds(&feeds));
    for level in [OptLevel::Substitution, OptLevel::Full] {
        let c = compile_train(&spec, BATCH, level).expect("the spec compiles");
        let got = run(&c.step, &feeds);
        assert_close("loss", &got["loss"], &want["loss"], 1e-11);
        assert_close("recon", &got["recon"], &want["recon"], 1e-11);
        for layer in [0, 2] {
            for kind in ["weight", "weight_inv"] {
                let name = format!("grad.layers.{layer}.{kind}");
                let gathered = toeplitz_adjoint(&want[&name], N, H, W, K);
                assert_close(&format!("{level:?} {name}"), &got[&name], &gathered, 1e-10);
            }
            let name = format!("grad.layers.{layer}.bias");
            let per_channel: Vec<f64> = (0..C)
                .map(|c| want[&name][c * H * W..(c + 1) * H * W].iter().sum())
                .collect();
            assert_close(
                &format!("{level:?} {name}"),
                &got[&name],
                &per_channel,
                1e-10,
            );
        }
        if level == OptLevel::Full {
            let counts = op_counts(&c.step);
            assert_eq!((counts.inverse, counts.logdet), (0, 0), "{counts:?}");
            let dense_ops = c.step.count(|op| {
                matches!(
                    op,
                    Op::Toeplitz { .. } | Op::ToeplitzAdjoint { .. } | Op::MatMul
                )
            });
            assert_eq!(dense_ops, 0, "{}", c.step.to_text());
        }
    }
}

/// `"recon_trains": "inverse"` on conv layers: the forward kernels get the gradient they get
/// with λ = 0, the inverse kernels and biases the gradient they get with the reconstruction.
#[test]
fn recon_trains_inverse_keeps_the_reconstruction_off_the_forward_kernels() {
    let both = conv_spec("self_normalizing");
    let mut inverse = both.clone();
    inverse.objective.recon_trains = ReconTrains::Inverse;
    let mut no_recon = both.clone();
    no_recon.objective.lambda = Lambda::Fixed(0.0);
    let mut rng = Rng::new(19);
    let feeds = conv_feeds(&both, &mut rng);
    let step = |spec: &FlowSpec| {
        let c = compile_train(spec, BATCH, OptLevel::Full).expect("the spec compiles");
        run(&c.step, &feeds)
    };
    let (got, with_recon, without_recon) = (step(&inverse), step(&both), step(&no_recon));
    for layer in [0, 2] {
        for (kind, want) in [
            ("weight", &without_recon),
            ("weight_inv", &with_recon),
            ("bias", &with_recon),
        ] {
            let name = format!("grad.layers.{layer}.{kind}");
            assert_close(&name, &got[&name], &want[&name], 1e-11);
        }
        // The comparison can fail: the reconstruction does move the forward kernel by default.
        let name = format!("grad.layers.{layer}.weight");
        let gap = with_recon[&name]
            .iter()
            .zip(&without_recon[&name])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(gap > 1e-4, "{name}: λ changes nothing ({gap})");
    }
    assert_close("recon", &got["recon"], &with_recon["recon"], 1e-12);
}

#[test]
fn a_linear_layer_after_a_conv_flattens_the_image_in_c_order() {
    // [conv, linear] on an image: the linear layer sees the flat (c, h, w) vector.
    let spec = spec(&format!(
        r#"{{"name": "conv_linear", "input": {{"shape": [{C}, {H}, {W}], "preprocess": "none"}},
            "layers": [{{"type": "conv", "kernel_size": {K}}}, {{"type": "smooth_leaky_relu"}},
                       {{"type": "linear"}}],
            "objective": {{"gradient": "exact"}}}}"#
    ));
    let model = Model::<f64>::init(&spec, 1);
    let shapes: Vec<Vec<usize>> = model.params.iter().map(|p| p.shape.clone()).collect();
    assert_eq!(
        shapes,
        vec![
            vec![C, C, K, K],
            vec![C, C, K, K],
            vec![C],
            vec![N, N],
            vec![N, N],
            vec![N]
        ]
    );
    let mut rng = Rng::new(23);
    let mut feeds = Feeds::new();
    for p in &model.params {
        let v: Vec<f64> = model
            .get(&p.name)
            .iter()
            .map(|x| x + 0.1 * rng.normal())
            .collect();
        feeds.insert(p.name.clone(), Arc::new(v));
    }
    let x: Vec<f64> = (0..N * BATCH).map(|_| rng.normal()).collect();
    feeds.insert("x".into(), Arc::new(x));
    let c = compile_train(&spec, BATCH, OptLevel::None).expect("the spec compiles");
    let checked = check_gradients_fd(&c.exact, &feeds, 1e-6);
    assert_eq!(checked.len(), 4, "{checked:?}");
}

#[test]
fn repeated_steps_do_not_grow_the_executors_memory() {
    // The exact step builds Toeplitz matrices and their inverses in fresh buffers of a size
    // nothing else allocates; the pool must not keep every one of them (an mnist_cnn9_exact run
    // once grew by 44 MB a step).
    let spec = conv_spec("exact");
    let mut rng = Rng::new(17);
    let feeds = conv_feeds(&spec, &mut rng);
    let c = compile_train(&spec, BATCH, OptLevel::Full).expect("the spec compiles");
    let program = snfc_runtime::host::exec::Program::new(&c.step);
    let mut ex = snfc_runtime::host::exec::Executor::<f64>::new();
    let mut pooled = Vec::new();
    for _ in 0..200 {
        ex.run(&program, &feeds).expect("the step runs");
        pooled.push(ex.pooled_elements());
    }
    assert!(
        pooled[199] <= pooled[99],
        "the pool grew from {} to {} elements",
        pooled[99],
        pooled[199]
    );
    // And it keeps at most the plan's own buffers of each size plus two: the convolutions
    // build their results in fresh buffers, and a pool that kept every one of them (64 per
    // size) took 24 GB to evaluate a width-512 Glow at batch 500.
    let plan = program.plan();
    let mut bound = std::collections::HashMap::new();
    for &size in &plan.buffers.sizes {
        *bound.entry(size).or_insert(2usize) += 1;
    }
    let limit: usize = bound.iter().map(|(size, n)| size * n).sum();
    assert!(
        pooled[199] <= limit,
        "the pool holds {} elements, more than the plan's buffers plus slack ({limit})",
        pooled[199]
    );
}

#[test]
fn evaluation_and_exact_inverse_agree_with_the_dense_flow() {
    let spec = conv_spec("self_normalizing");
    let mut rng = Rng::new(13);
    let feeds = conv_feeds(&spec, &mut rng);
    let to_model = |spec: &FlowSpec, feeds: &Feeds<f64>| {
        let mut m = Model::<f64>::init(spec, 0);
        for p in &m.params.clone() {
            m.values.insert(p.name.clone(), feeds[&p.name].clone());
        }
        m
    };
    let conv = to_model(&spec, &feeds);
    let dense = to_model(&dense_spec(), &dense_feeds(&feeds));
    let (a, b) = (logdet_sum(&conv), logdet_sum(&dense));
    assert!((a - b).abs() < 1e-10, "{a} vs {b}");
    let z: Vec<f64> = (0..N * BATCH).map(|_| rng.normal()).collect();
    for exact in [true, false] {
        let x_conv = invert(&conv, &z, BATCH, exact).expect("invertible");
        let x_dense = invert(&dense, &z, BATCH, exact).expect("invertible");
        assert_close(&format!("invert exact={exact}"), &x_conv, &x_dense, 1e-10);
    }
}

#[test]
fn squeeze_is_space_to_depth() {
    let spec = spec(
        r#"{"name": "sq", "input": {"shape": [2, 4, 6], "preprocess": "none"},
            "layers": [{"type": "squeeze"}]}"#,
    );
    assert_eq!(
        spec.layer_shapes().last().map(|s| s.to_string()),
        Some("[8, 2, 3]".into())
    );
    let model = Model::<f64>::init(&spec, 0);
    let n = 2;
    let d = 48;
    // z indexed [c·4 + a·2 + b, i, j] (batch last) must come from x[c, 2i + a, 2j + b].
    let z: Vec<f64> = (0..d * n).map(|v| v as f64).collect();
    let x = invert(&model, &z, n, false).expect("a permutation");
    for c in 0..2 {
        for a in 0..2 {
            for b in 0..2 {
                for i in 0..2 {
                    for j in 0..3 {
                        for e in 0..n {
                            let zi = (((c * 4 + a * 2 + b) * 2 + i) * 3 + j) * n + e;
                            let xi = ((c * 4 + 2 * i + a) * 6 + 2 * j + b) * n + e;
                            assert_eq!(x[xi], z[zi]);
                        }
                    }
                }
            }
        }
    }
    // The squeeze's log-det is 0: ln p(x) is the base density of the permuted vector.
    let c = compile_train(&spec, n, OptLevel::Full).expect("the spec compiles");
    let mut feeds = Feeds::new();
    feeds.insert("x".to_string(), Arc::new(z.clone()));
    let loss = run(&c.step, &feeds)["loss"][0];
    let want = 0.5 * z.iter().map(|v| v * v).sum::<f64>() / n as f64
        + 0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln();
    assert!((loss - want).abs() < 1e-9 * want, "{loss} vs {want}");
}

#[test]
fn conv_specs_that_do_not_fit_are_rejected_with_their_path() {
    let cases = [
        (
            r#"{"name": "t", "input": {"shape": [784], "preprocess": "none"}, "layers": [{"type": "conv", "kernel_size": 3}]}"#,
            "/layers/0",
            "image input",
        ),
        (
            r#"{"name": "t", "input": {"shape": [1, 28, 28], "preprocess": "none"}, "layers": [{"type": "conv", "kernel_size": 4}]}"#,
            "/layers/0/kernel_size",
            "odd",
        ),
        (
            r#"{"name": "t", "input": {"shape": [1, 28, 28], "preprocess": "none"}, "layers": [{"type": "squeeze"}, {"type": "squeeze"}, {"type": "squeeze"}]}"#,
            "/layers/2",
            "odd",
        ),
        (
            r#"{"name": "t", "input": {"shape": [1, 4, 4], "preprocess": "none"}, "layers": [{"type": "linear"}, {"type": "squeeze"}]}"#,
            "/layers/1",
            "flat",
        ),
        (
            r#"{"name": "t", "input": {"shape": [1, 4, 4], "preprocess": "none"}, "layers": [{"type": "conv"}]}"#,
            "/layers/0/kernel_size",
            "missing",
        ),
        (
            r#"{"name": "t", "input": {"shape": [1, 4, 4], "preprocess": "none"}, "layers": [{"type": "conv", "kernel_size": 3, "stride": 2}]}"#,
            "/layers/0/stride",
            "unknown",
        ),
    ];
    for (text, pointer, word) in cases {
        let err = parse_spec(text).expect_err(text).to_string();
        assert!(
            err.contains(pointer) && err.contains(word),
            "{text}\n→ {err}"
        );
    }
}
