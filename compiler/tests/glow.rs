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
