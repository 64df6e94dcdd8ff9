//! The rational-quadratic spline layer through the pipeline, in f64: exact gradients (of the
//! input and of the three parameter arrays, through the value and the log-det) against finite
//! differences, and sampling's analytic inverse against the forward op.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::{GraphBuilder, Op, SplinePart};
use snfc_compiler::spec::{parse_spec, FlowSpec};
use snfc_runtime::host::exec::Feeds;
use snfc_runtime::model::Model;
use snfc_runtime::sample::invert;

mod common;
use common::{check_gradients_fd, perturbed_feeds, run_f64 as run, Rng};

fn spec(text: &str) -> FlowSpec {
    parse_spec(text).unwrap_or_else(|e| panic!("{e}"))
}

/// Parameters away from the identity, and a batch with inputs inside and beyond the bound.
fn feeds(spec: &FlowSpec, batch: usize, rng: &mut Rng) -> Feeds<f64> {
    perturbed_feeds(spec, batch, rng, (0.1, 0.8), |r| 2.0 * r.normal())
}

#[test]
fn exact_spline_flow_gradients_match_finite_differences() {
    let spec = spec(
        r#"{"name": "spl", "input": {"shape": [4], "preprocess": "none"},
            "layers": [{"type": "linear"}, {"type": "spline", "bins": 5, "tail_bound": 3.0},
                       {"type": "linear"}],
            "objective": {"gradient": "exact"}}"#,
    );
    let batch = 6;
    let mut rng = Rng::new(21);
    let feeds = feeds(&spec, batch, &mut rng);
    let c = compile_train(&spec, batch, OptLevel::None).expect("the spec compiles");
    let outs = run(&c.exact, &feeds);
    let checked: Vec<String> = check_gradients_fd(&c.exact, &feeds, 1e-5)
        .into_iter()
        .map(|(p, _)| p)
        .collect();
    for want in [
        "layers.1.widths",
        "layers.1.heights",
        "layers.1.derivatives",
    ] {
        assert!(checked.iter().any(|c| c == want), "{want} not checked");
    }
    // Some inputs lie beyond the bound: the identity branch is covered too.
    assert!(feeds["x"].iter().any(|v| v.abs() > 3.0));
    let step = compile_train(&spec, batch, OptLevel::Full).expect("the spec compiles");
    // The optimizer merged the value's and the log-det's VJPs into one pass each
    // (`spline-vjps-merge`): the comparison below checks the merged form.
    let text = step.step.to_text();
    let vjps = |part: &str| {
        text.lines()
            .filter(|l| l.contains("spline_grad:") && l.contains(&format!(":{part}:")))
            .count()
    };
    assert_eq!(vjps("both"), 4, "{text}");
    assert_eq!(vjps("value") + vjps("logdet"), 0, "{text}");
    let s = run(&step.step, &feeds);
    for (name, g) in outs.iter().filter(|(k, _)| k.starts_with("grad.")) {
        for (a, b) in s[name].iter().zip(g) {
            assert!((a - b).abs() < 1e-9 * (1.0 + b.abs()), "{name}: {a} vs {b}");
        }
    }
}

#[test]
fn sampling_inverts_the_spline() {
    let spec = spec(
        r#"{"name": "spl", "input": {"shape": [3], "preprocess": "none"},
            "layers": [{"type": "spline", "bins": 4, "tail_bound": 2.0}]}"#,
    );
    let n = 5;
    let mut rng = Rng::new(2);
    let feeds = feeds(&spec, n, &mut rng);
    let mut b = GraphBuilder::new("forward");
    let x = b.input("x", vec![3, n]);
    let w = b.param("layers.0.widths", vec![3, 4]);
    let h = b.param("layers.0.heights", vec![3, 4]);
    let d = b.param("layers.0.derivatives", vec![3, 3]);
    let y = b.add(
        Op::Spline {
            bins: 4,
            bound: 2f64.to_bits(),
            part: SplinePart::Value,
        },
        &[x, w, h, d],
    );
    b.output("y", y);
    let y = run(&b.finish(), &feeds)["y"].clone();
    let mut model = Model::<f64>::init(&spec, 0);
    for p in model.params.clone() {
        model.values.insert(p.name.clone(), feeds[&p.name].clone());
    }
    let back = invert(&model, &y, n, false).expect("invertible");
    for (a, e) in back.iter().zip(feeds["x"].iter()) {
        assert!((a - e).abs() < 1e-10, "{a} vs {e}");
    }
}

#[test]
fn a_fresh_spline_is_the_identity() {
    let spec = spec(
        r#"{"name": "spl", "input": {"shape": [3], "preprocess": "none"},
            "layers": [{"type": "spline"}]}"#,
    );
    let model = Model::<f64>::init(&spec, 0);
    let z: Vec<f64> = vec![-12.0, -9.9, -3.0, -0.5, 0.0, 0.7, 4.2, 9.99, 15.0];
    let x = invert(&model, &z, 3, false).expect("invertible");
    for (a, e) in x.iter().zip(&z) {
        assert!((a - e).abs() < 1e-12, "{a} vs {e}");
    }
}
