//! Glow-shaped flows (`specs/mnist_glow*.json`, `specs/cifar_glow.json`): written with `repeat`,
//! they compile, and the self-normalizing steps keep no inverse and no log-determinant — 32 and
//! 96 self-normalizing 1×1 convolutions, each with its Toeplitz inverse substituted by its
//! learned inverse. The exact baseline keeps one inverse per convolution.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::{load_spec, LayerSpec};
use std::path::Path;

fn spec(name: &str) -> snfc_compiler::spec::FlowSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../specs")
        .join(name);
    load_spec(&path).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn glow_specs_compile_without_inverses() {
    for (name, steps, levels) in [("mnist_glow.json", 16, 2), ("cifar_glow.json", 32, 3)] {
        let s = spec(name);
        let convs = s
            .layers
            .iter()
            .filter(|l| matches!(l, LayerSpec::Conv(_)))
            .count();
        assert_eq!(convs, steps * levels, "{name}");
        let c = compile_train(&s, 4, OptLevel::Full).expect("compiles");
        let (exact, step) = (op_counts(&c.exact), op_counts(&c.step));
        assert_eq!(exact.inverse, 2 * convs, "{name}: exact graph {exact:?}");
        assert_eq!(
            (step.inverse, step.logdet, step.gemm),
            (0, 0, 0),
            "{name}: {step:?}"
        );
        assert!(c.egraph.iter().all(|p| p.stop_reason == "saturated"));
    }
    // The exact baseline: one inverse per 1×1 conv, of its C × C matrix (4 × 4 and 8 × 8 at
    // the two levels) rather than of the 784 × 784 / 392 × 392 Toeplitz matrix
    // (`inverse-of-pointwise-conv`); the exact graph's log-dets likewise become H·W·ln|det W|.
    let exact = spec("mnist_glow_exact.json");
    let c = compile_train(&exact, 4, OptLevel::Full).expect("compiles");
    assert_eq!(op_counts(&c.step).inverse, 32, "one inverse per 1×1 conv");
    for n in c.step.nodes() {
        if c.step.node(n).op == snfc_compiler::ir::Op::Inverse {
            let s = &c.step.node(n).shape;
            assert!(s == &vec![4, 4] || s == &vec![8, 8], "an inverse of {s:?}");
        }
    }
}

/// The Glow layers' shape requirements, at their edges: a coupling or a split needs an image
/// with an even number of channels, a coupling a width of at least 1; each problem names the
/// layer's JSON pointer.
#[test]
fn glow_layers_refuse_shapes_they_cannot_split() {
    use snfc_compiler::spec::parse_spec;
    let spec = |shape: &str, layers: &str| {
        format!(
            r#"{{"name": "e", "input": {{"shape": {shape}, "preprocess": "none"}},
                "layers": {layers}}}"#
        )
    };
    let err = |text: String| parse_spec(&text).expect_err("invalid").to_string();
    let e = err(spec(
        "[3, 4, 4]",
        r#"[{"type": "affine_coupling", "width": 4}]"#,
    ));
    assert!(e.contains("/layers/0") && e.contains("C even"), "{e}");
    let e = err(spec("[16]", r#"[{"type": "affine_coupling", "width": 4}]"#));
    assert!(e.contains("/layers/0") && e.contains("[16]"), "{e}");
    let e = err(spec(
        "[2, 4, 4]",
        r#"[{"type": "affine_coupling", "width": 0}]"#,
    ));
    assert!(e.contains("/layers/0/width"), "{e}");
    let e = err(spec("[2, 4, 4]", r#"[{"type": "affine_coupling"}]"#));
    assert!(
        e.contains("/layers/0/width") && e.contains("missing"),
        "{e}"
    );
    // Two splits of 2 channels: the second meets 1 channel.
    let e = err(spec(
        "[2, 4, 4]",
        r#"[{"type": "split"}, {"type": "split"}]"#,
    ));
    assert!(e.contains("/layers/1") && e.contains("[1, 4, 4]"), "{e}");
    let e = err(spec("[8]", r#"[{"type": "split"}]"#));
    assert!(e.contains("/layers/0"), "{e}");
    // The smallest legal coupling and split: 2 channels of 1 × 1.
    parse_spec(&spec(
        "[2, 1, 1]",
        r#"[{"type": "affine_coupling", "width": 1}, {"type": "split"}]"#,
    ))
    .expect("2 × 1 × 1 splits");
}
