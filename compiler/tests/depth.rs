//! Rewriting scales with depth (DESIGN.md §7): every self-normalizing FC flow from 2 to 512
//! layers, at D = 64 and D = 784, compiles to exactly 6 GEMMs per linear layer with no inverse
//! or log-det left, and the exact baseline keeps one inverse per layer — no silent fallback at
//! any depth. A rewrite phase that reaches a limit is an error naming the phase and region.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::rewrite::{self, op_counts, Limits, RewriteError};
use snfc_compiler::spec::{FlowSpec, Preprocess};
use std::time::Duration;

fn fc_spec(d: usize, layers: usize, self_normalizing: bool) -> FlowSpec {
    let mut b =
        FlowSpec::builder(&format!("fc{layers}_d{d}")).input(&[d], Preprocess::DequantizeLogit);
    for i in 0..layers {
        if i > 0 {
            b = b.smooth_leaky_relu(0.3);
        }
        b = b.linear(true);
    }
    let b = if self_normalizing {
        b.self_normalizing(1.0)
    } else {
        b.exact()
    };
    b.batch_size(100)
        .build()
        .unwrap_or_else(|e| panic!("fc{layers}: {e}"))
}

#[test]
fn self_normalizing_fc_has_six_gemms_per_layer_at_every_depth() {
    for d in [64, 784] {
        for layers in [2, 8, 32, 128, 512] {
            let spec = fc_spec(d, layers, true);
            let c = compile_train(&spec, 100, OptLevel::Full)
                .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
            let before = op_counts(&c.exact);
            let after = op_counts(&c.step);
            assert!(before.inverse >= 2 * layers, "{}: {before:?}", spec.name);
            assert_eq!(after.gemm, 6 * layers, "{}: {after:?}", spec.name);
            assert_eq!(after.inverse, 0, "{}: {after:?}", spec.name);
            assert_eq!(after.logdet, 0, "{}: {after:?}", spec.name);
            for phase in &c.egraph {
                assert_eq!(phase.stop_reason, "saturated", "{}: {phase:?}", spec.name);
            }
            // Identical layers are one rewrite problem: the distinct regions do not grow with
            // depth (first layer, middle layers, activations, last layer, input, loss).
            let optimize = c.egraph.iter().find(|p| p.phase == "optimize");
            let distinct = optimize.map(|p| p.distinct_regions).unwrap_or(0);
            assert!(
                (1..=8).contains(&distinct),
                "{}: {distinct} distinct regions",
                spec.name
            );
        }
    }
}

#[test]
fn exact_fc_keeps_one_inverse_per_layer_at_depth() {
    for layers in [2, 128] {
        let spec = fc_spec(64, layers, false);
        let c = compile_train(&spec, 100, OptLevel::Full)
            .unwrap_or_else(|e| panic!("{}: {e}", spec.name));
        let after = op_counts(&c.step);
        assert_eq!(after.inverse, layers, "{}: {after:?}", spec.name);
        assert_eq!(after.logdet, 0, "{}: {after:?}", spec.name);
        // Per layer W h, δ hᵀ and backprop's Wᵀ δ; the first layer's input needs no gradient.
        assert_eq!(after.gemm, 3 * layers - 1, "{}: {after:?}", spec.name);
    }
}

#[test]
fn a_rewrite_phase_that_reaches_a_limit_is_an_error() {
    let spec = fc_spec(64, 2, true);
    let c = compile_train(&spec, 100, OptLevel::Substitution).expect("the spec compiles");
    let tight = Limits {
        nodes: 40,
        iterations: 30,
        time: Duration::from_secs(30),
    };
    match rewrite::optimize(&c.step, tight) {
        Err(RewriteError::Limit {
            phase,
            region,
            reason,
            ..
        }) => {
            assert_eq!(phase, "optimize");
            assert!(region.starts_with("layers."), "{region}");
            assert!(reason.starts_with("node limit"), "{reason}");
        }
        other => panic!("expected a limit error, got {:?}", other.map(|(_, s)| s)),
    }
    let one_iteration = Limits {
        iterations: 1,
        ..Limits::default()
    };
    let err = rewrite::optimize(&c.step, one_iteration)
        .map(|(_, stats)| stats)
        .expect_err("one iteration cannot saturate a layer");
    let text = err.to_string();
    assert!(
        text.contains("iteration limit") && text.contains("does not run"),
        "{text}"
    );
}

#[test]
fn a_128_layer_conv_flow_keeps_no_inverse_or_dense_operator() {
    let mut b = FlowSpec::builder("conv128").input(&[2, 6, 6], Preprocess::DequantizeLogit);
    for i in 0..128 {
        if i > 0 {
            b = b.smooth_leaky_relu(0.3);
        }
        b = b.conv(3, true);
    }
    let spec = b
        .self_normalizing(1.0)
        .batch_size(100)
        .build()
        .unwrap_or_else(|e| panic!("{e}"));
    let c = compile_train(&spec, 100, OptLevel::Full).unwrap_or_else(|e| panic!("{e}"));
    let before = op_counts(&c.exact);
    let after = op_counts(&c.step);
    assert!(before.inverse >= 2 * 128, "{before:?}");
    assert_eq!(
        (after.inverse, after.logdet, after.gemm),
        (0, 0, 0),
        "{after:?}"
    );
    let dense = c.step.count(|op| {
        matches!(
            op,
            snfc_compiler::ir::Op::Toeplitz { .. } | snfc_compiler::ir::Op::ToeplitzAdjoint { .. }
        )
    });
    assert_eq!(dense, 0);
    // Per layer: the forward conv, the reconstruction conv, backprop's transposed conv and the
    // kernel gradients of W and R.
    let convs = c.step.count(|op| *op == snfc_compiler::ir::Op::Conv2d);
    assert!(convs <= 4 * 128, "{convs} convolutions for 128 layers");
}
