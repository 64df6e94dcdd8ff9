//! The sampling graph (`ir::inverse`) of every shipped spec: it builds (every shape rule holds),
//! its latents add up to the input, and it runs the algorithm asked for: through the learned
//! inverses it has no `inverse` node (an O(D²) sample), through W⁻¹ one per linear and conv
//! layer, of the C × C matrix for a 1×1 conv and of the Toeplitz matrix otherwise. Its values
//! are checked against the host's own inverse in `runtime/tests/eval_sample.rs`.

use snfc_compiler::ir::inverse::{latent_inputs, sample_graph, OUTPUT_SAMPLES};
use snfc_compiler::ir::Op;
use snfc_compiler::spec::{load_spec, LayerSpec};
use std::path::Path;

#[test]
fn every_shipped_spec_has_a_sampling_graph_of_the_asked_algorithm() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut names: Vec<_> = std::fs::read_dir(&dir)
        .expect("specs/")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    names.sort();
    assert!(names.len() >= 9, "{names:?}");
    for path in names {
        let spec = load_spec(&path).unwrap_or_else(|e| panic!("{e}"));
        let d = spec.input.dim();
        let latents = latent_inputs(&spec);
        let splits = spec
            .layers
            .iter()
            .filter(|l| matches!(l, LayerSpec::Split(_)))
            .count();
        assert_eq!(latents.len(), 1 + splits, "{}", spec.name);
        assert_eq!(
            latents.iter().map(|(_, n)| n).sum::<usize>(),
            d,
            "{}",
            spec.name
        );
        let (mut toeplitz_convs, mut pointwise_convs, mut linears) = (0, 0, 0);
        for layer in &spec.layers {
            match layer {
                LayerSpec::Conv(c) if c.kernel_size == 1 => pointwise_convs += 1,
                LayerSpec::Conv(_) => toeplitz_convs += 1,
                LayerSpec::Linear(_) => linears += 1,
                _ => {}
            }
        }
        for exact in [false, true] {
            let g = sample_graph(&spec, 3, exact);
            let out = g.output(OUTPUT_SAMPLES).expect("samples output");
            assert_eq!(g.node(out).shape, vec![d, 3], "{}", spec.name);
            for (name, rows) in &latents {
                let input = g
                    .nodes()
                    .into_iter()
                    .find(|&n| matches!(&g.node(n).op, Op::Input { name: m, .. } if m == name))
                    .unwrap_or_else(|| panic!("{}: latent {name}", spec.name));
                assert_eq!(g.node(input).shape, vec![*rows, 3], "{}", spec.name);
            }
            let inverses = g.count(|op| *op == Op::Inverse);
            let toeplitz = g.count(|op| matches!(op, Op::Toeplitz { .. }));
            let logdets = g.count(|op| *op == Op::LogDet);
            assert_eq!(logdets, 0, "{}: sampling needs no log-det", spec.name);
            if exact {
                assert_eq!(
                    inverses,
                    linears + pointwise_convs + toeplitz_convs,
                    "{}",
                    spec.name
                );
                assert_eq!(toeplitz, toeplitz_convs, "{}", spec.name);
            } else {
                assert_eq!(
                    (inverses, toeplitz),
                    (0, 0),
                    "{}: O(D²) sampling",
                    spec.name
                );
            }
        }
    }
}
