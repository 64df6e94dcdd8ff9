//! Fused execution (elementwise groups as one kernel, GEMM epilogues) computes what one kernel
//! per node computes, and launches as many kernels as the compiler's fusion plan counts.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::fuse::kernel_count;
use snfc_compiler::ir::lower::eval_graph;
use snfc_compiler::spec::{load_spec, parse_spec, FlowSpec};
use snfc_runtime::host::exec::{Executor, Feeds, Program};
use snfc_runtime::model::Model;
use std::path::Path;
use std::sync::Arc;

fn feeds(spec: &FlowSpec, batch: usize, seed: u64) -> Feeds<f64> {
    let mut model = Model::<f64>::init(spec, seed);
    let mut k = seed as f64;
    for v in model.values.values_mut() {
        let p: Vec<f64> = v
            .iter()
            .map(|x| {
                k += 1.0;
                x + 0.05 * (k * 0.37).sin()
            })
            .collect();
        *v = Arc::new(p);
    }
    let d = spec.input.dim();
    let mut f = model.values.clone();
    let x: Vec<f64> = (0..d * batch)
        .map(|i| ((i * 97 + seed as usize) % 256) as f64)
        .collect();
    let u: Vec<f64> = (0..d * batch)
        .map(|i| ((i as f64) * 0.618).fract())
        .collect();
    f.insert("x".into(), Arc::new(x));
    f.insert("noise".into(), Arc::new(u));
    f
}

fn assert_same(spec: &FlowSpec, batch: usize, seed: u64) {
    let f = feeds(spec, batch, seed);
    let mut graphs = vec![eval_graph(spec, batch)];
    for level in [OptLevel::None, OptLevel::Substitution, OptLevel::Full] {
        graphs.push(
            compile_train(spec, batch, level)
                .expect("the spec compiles")
                .step,
        );
    }
    for g in graphs {
        let fused = Program::new(&g);
        let plain = Program::unfused(&g);
        assert_eq!(
            fused.kernels(),
            kernel_count(&g),
            "{}: kernels run vs planned",
            g.name
        );
        assert!(fused.kernels() <= plain.kernels());
        let a = Executor::<f64>::new().run(&fused, &f).unwrap();
        let b = Executor::<f64>::new().run(&plain, &f).unwrap();
        for ((na, ta), (nb, tb)) in a.iter().zip(&b) {
            assert_eq!(na, nb);
            let scale = tb.data.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
            for (x, y) in ta.data.iter().zip(&tb.data) {
                assert!(
                    (x - y).abs() <= 1e-12 * scale,
                    "{} {na}: fused {x} vs unfused {y}",
                    g.name
                );
            }
        }
    }
}

#[test]
fn fused_equals_unfused_on_every_spec() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    for name in ["mnist_fc2.json", "mnist_fc2_exact.json"] {
        let spec = load_spec(&dir.join(name)).unwrap();
        assert_same(&spec, 7, 1);
    }
}

#[test]
fn fused_equals_unfused_on_small_flows() {
    for (i, pre) in ["none", "dequantize_logit"].iter().enumerate() {
        for grad in ["self_normalizing", "exact"] {
            let json = format!(
                r#"{{"name":"f","input":{{"shape":[5],"preprocess":"{pre}"}},
                "layers":[{{"type":"linear"}},{{"type":"smooth_leaky_relu","alpha":0.2}},{{"type":"linear","bias":false}},
                          {{"type":"smooth_leaky_relu","alpha":0.6}},{{"type":"linear"}}],
                "objective":{{"gradient":"{grad}","lambda":0.7}}}}"#
            );
            let spec = parse_spec(&json).unwrap();
            for batch in [1, 3, 300] {
                assert_same(&spec, batch, i as u64 + batch as u64);
            }
        }
    }
}

#[test]
fn fusion_cuts_kernels_of_the_mnist_step() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let spec = load_spec(&dir.join("mnist_fc2.json")).unwrap();
    let step = compile_train(&spec, 100, OptLevel::Full)
        .expect("the spec compiles")
        .step;
    let fused = Program::new(&step).kernels();
    let plain = Program::unfused(&step).kernels();
    assert!(fused * 2 < plain, "fused {fused} kernels, unfused {plain}");
}
