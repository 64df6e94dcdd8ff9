//! ARCHITECTURE.md's recipe for an elementwise function, carried out: `cube` (x³) exists only
//! under the cargo feature `example-op`, which adds its `Unary` variant with its derivative
//! (`compiler/src/ir/op/mod.rs`) and its host and GPU evaluation
//! (`runtime/src/executors/elementwise.rs`), nothing else. Here it parses, differentiates,
//! fuses and runs like every other function. Run with
//! `cargo test -p snfc-runtime --features example-op --test example_op`.
#![cfg(feature = "example-op")]

use snfc_compiler::autodiff;
use snfc_compiler::ir::{Graph, GraphBuilder, Op, Unary};
use snfc_compiler::plan::Plan;
use snfc_runtime::backend::open;
use snfc_runtime::cube::matmul::MatmulPrecision;
use snfc_runtime::cube::probe::{choose, device_for_test, DeviceKind};
use snfc_runtime::host::exec::{Executor, Feeds, Program};
use std::collections::HashMap;
use std::sync::Arc;

mod common;
use common::Rng;

/// `j = Σ cube(W x) · c`, with its gradient with respect to `W`, through autodiff.
fn graph() -> Graph {
    let mut b = GraphBuilder::new("example_op");
    let x = b.input("x", vec![5, 3]);
    let w = b.param("w", vec![4, 5]);
    let c = b.input("c", vec![4, 3]);
    let wx = b.matmul(w, x);
    let cubed = b.unary(Unary::Cube, wx);
    let weighted = b.mul(cubed, c);
    let j = b.sum(weighted, None);
    let grads = autodiff::gradients(&mut b, j, &[w]);
    b.output("j", j);
    b.output("grad.w", grads[0].expect("j depends on w"));
    b.output("cubed", cubed);
    b.finish()
}

fn feeds(seed: u64) -> Feeds<f64> {
    let mut rng = Rng::new(seed);
    let mut f: Feeds<f64> = HashMap::new();
    for (name, n) in [("x", 15), ("w", 20), ("c", 12)] {
        f.insert(
            name.into(),
            Arc::new((0..n).map(|_| rng.normal()).collect()),
        );
    }
    f
}

fn run(g: &Graph, feeds: &Feeds<f64>) -> HashMap<String, Vec<f64>> {
    Executor::<f64>::new()
        .run(&Program::new(g), feeds)
        .expect("host run")
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect()
}

#[test]
fn its_token_is_its_name_in_ir_text_and_e_graph() {
    assert_eq!("cube".parse::<Op>(), Ok(Op::Unary(Unary::Cube)));
    let g = graph();
    let text = g.to_text();
    assert!(text.contains("= cube %"), "{text}");
    assert_eq!(Graph::from_text(&text).expect("parses").to_text(), text);
}

#[test]
fn values_and_gradient_match_the_formula_and_finite_differences() {
    let g = graph();
    let f = feeds(3);
    let out = run(&g, &f);
    // The value against x³ written out.
    let (x, w) = (&f["x"], &f["w"]);
    for i in 0..4 {
        for n in 0..3 {
            let z: f64 = (0..5).map(|k| w[i * 5 + k] * x[k * 3 + n]).sum();
            let got = out["cubed"][i * 3 + n];
            assert!((got - z * z * z).abs() <= 1e-12 * (1.0 + z.abs().powi(3)));
        }
    }
    // The gradient (3 z² c xᵀ by autodiff) against central differences.
    let h = 1e-6;
    for k in 0..20 {
        let mut plus = f.clone();
        let mut minus = f.clone();
        let mut wp = w.to_vec();
        wp[k] += h;
        plus.insert("w".into(), Arc::new(wp));
        let mut wm = w.to_vec();
        wm[k] -= h;
        minus.insert("w".into(), Arc::new(wm));
        let fd = (run(&g, &plus)["j"][0] - run(&g, &minus)["j"][0]) / (2.0 * h);
        let got = out["grad.w"][k];
        assert!(
            (got - fd).abs() <= 1e-6 * (1.0 + fd.abs()),
            "grad.w[{k}]: autodiff {got}, finite differences {fd}"
        );
    }
}

/// The fused plan on f32 on the host and on the wgpu backend (skipped with a message where no
/// adapter exists) against the host in f64.
#[test]
fn runs_fused_in_f32_on_the_host_and_the_gpu_backends() {
    let g = graph();
    let plan = Plan::new(&g);
    assert!(
        plan.instrs
            .iter()
            .filter_map(|i| i.group.as_ref())
            .any(|gr| gr
                .kernel
                .members
                .iter()
                .any(|m| m.op == Op::Unary(Unary::Cube))),
        "cube joins a fused group"
    );
    let f = feeds(5);
    let want = run(&g, &f);
    let mut backends = vec![choose(DeviceKind::Host).expect("host")];
    backends.extend(device_for_test(DeviceKind::Wgpu, "example_op"));
    for chosen in backends {
        let mut b =
            open::<f32>(&chosen, plan.clone(), MatmulPrecision::F32).expect("backend opens");
        for (name, v) in &f {
            let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
            b.set(name, &v32).expect("set");
        }
        b.run().expect("run");
        for (name, t) in b.outputs().expect("outputs") {
            let scale = want[&name].iter().fold(1.0f64, |m, v| m.max(v.abs()));
            for (k, (got, w)) in t.data.iter().zip(&want[&name]).enumerate() {
                assert!(
                    (*got as f64 - w).abs() <= 1e-4 * scale,
                    "{} {name}[{k}]: {got} against {w}",
                    b.device()
                );
            }
        }
    }
}
