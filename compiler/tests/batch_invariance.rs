//! A spec's optimized step is the same algorithm at every batch size: the same ops, in the same
//! numbers, and FLOPs linear in the batch — including a batch equal to the layer width D or to a
//! convolution's C·H·W, where a `[C·H·W, B]` batch is a square matrix like the layer's own.
//! Every step also passes the compiler's post-conditions (no inverse, log-det or dense Toeplitz
//! matrix in a self-normalizing step), which `compile_train` checks.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::{Graph, Op};
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::{parse_spec, FlowSpec};
use std::collections::BTreeMap;

fn spec(input: &str, layers: &str) -> FlowSpec {
    parse_spec(&format!(
        r#"{{"name": "b", "input": {{"shape": {input}, "preprocess": "none"}},
            "layers": {layers}, "train": {{"batch_size": 10}}}}"#
    ))
    .unwrap_or_else(|e| panic!("{e}"))
}

/// How many nodes of each kind of op the step holds (constants aside: `0.5/B` may coincide
/// with another constant at one batch and be one node there).
fn histogram(g: &Graph) -> BTreeMap<String, usize> {
    let mut h = BTreeMap::new();
    for n in g.nodes() {
        let op = &g.node(n).op;
        if matches!(op, Op::Const { .. }) {
            continue;
        }
        let token = op.to_string();
        let kind = token.split(':').next().unwrap_or_default().to_string();
        *h.entry(kind).or_default() += 1;
    }
    h
}

#[track_caller]
fn assert_batch_invariant(what: &str, spec: &FlowSpec, batches: &[usize]) {
    let (b0, b1) = (batches[0], batches[1]);
    let step = |b: usize| {
        compile_train(spec, b, OptLevel::Full)
            .unwrap_or_else(|e| panic!("{what} at batch {b}: {e}"))
            .step
    };
    let (g0, g1) = (step(b0), step(b1));
    let reference = histogram(&g0);
    let (f0, f1) = (op_counts(&g0).flops, op_counts(&g1).flops);
    let per_example = (f1 - f0) / (b1 - b0) as f64;
    assert!(
        per_example > 0.0,
        "{what}: FLOPs do not grow with the batch"
    );
    for &b in &batches[1..] {
        let g = step(b);
        assert_eq!(
            histogram(&g),
            reference,
            "{what}: the step at batch {b} holds other ops than at batch {b0}"
        );
        let flops = op_counts(&g).flops;
        let linear = f0 + per_example * (b - b0) as f64;
        assert!(
            (flops - linear).abs() <= 1e-9 * linear,
            "{what}: {flops} FLOPs at batch {b}, {linear} on the line through batches {b0} and {b1}"
        );
    }
}

#[test]
fn a_conv_step_is_the_same_at_every_batch_including_c_h_w() {
    // C·H·W = 16: batches on both sides of it and at it, and twice it.
    let s = spec(
        "[1, 4, 4]",
        r#"[{"type": "conv", "kernel_size": 3}, {"type": "smooth_leaky_relu", "alpha": 0.3},
            {"type": "conv", "kernel_size": 3}]"#,
    );
    assert_batch_invariant("1x4x4 conv", &s, &[3, 5, 4, 8, 15, 16, 17, 32]);
    // Two channels, C·H·W = 18, no bias on the second.
    let s = spec(
        "[2, 3, 3]",
        r#"[{"type": "conv", "kernel_size": 3}, {"type": "smooth_leaky_relu", "alpha": 0.3},
            {"type": "conv", "kernel_size": 3, "bias": false}]"#,
    );
    assert_batch_invariant("2x3x3 conv", &s, &[3, 5, 9, 17, 18, 19, 36]);
}

#[test]
fn a_pointwise_conv_step_is_the_same_at_every_batch() {
    // A 1×1 conv of 4 channels on 2×2 maps: C·H·W = 16, C = 4.
    let s = spec(
        "[4, 2, 2]",
        r#"[{"type": "conv", "kernel_size": 1}, {"type": "smooth_leaky_relu", "alpha": 0.3},
            {"type": "conv", "kernel_size": 1}]"#,
    );
    assert_batch_invariant("1x1 conv", &s, &[3, 5, 4, 15, 16, 17]);
}

#[test]
fn a_fully_connected_step_is_the_same_at_every_batch_including_d() {
    let s = spec(
        "[6]",
        r#"[{"type": "linear"}, {"type": "smooth_leaky_relu", "alpha": 0.3},
            {"type": "linear"}, {"type": "spline", "bins": 4, "tail_bound": 3.0}]"#,
    );
    assert_batch_invariant("fc + spline", &s, &[3, 5, 4, 6, 7, 12]);
}

#[test]
fn a_glow_step_is_the_same_at_every_batch() {
    // squeeze [1, 4, 4] → [4, 2, 2] (C·H·W = 16), actnorm, 1×1 conv, coupling, split, 3×3 conv.
    let s = spec(
        "[1, 4, 4]",
        r#"[{"type": "squeeze"}, {"type": "actnorm"}, {"type": "conv", "kernel_size": 1},
            {"type": "affine_coupling", "width": 4}, {"type": "split"},
            {"type": "conv", "kernel_size": 3}]"#,
    );
    assert_batch_invariant("glow", &s, &[3, 5, 8, 16, 17]);
}
