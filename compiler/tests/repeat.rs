//! `{"type": "repeat", "times": n, "layers": [...]}` expands in place before anything else:
//! parameter names use the expanded index, the expanded spec is the hand-written one, nested
//! blocks multiply, and problems are reported once at the JSON pointer they are written at.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::spec::{parse_spec, FlowSpec, Preprocess};

fn spec_with_layers(layers: &str) -> String {
    format!(
        r#"{{"name": "r", "input": {{"shape": [1, 4, 4], "preprocess": "none"}},
            "layers": {layers}, "train": {{"batch_size": 2}}}}"#
    )
}

fn errors(text: &str) -> Vec<(String, String)> {
    parse_spec(text)
        .expect_err("invalid spec")
        .errors
        .into_iter()
        .map(|e| (e.pointer, e.message))
        .collect()
}

#[test]
fn repeat_expands_in_place_with_expanded_parameter_names() {
    let repeated = parse_spec(&spec_with_layers(
        r#"[{"type": "squeeze"},
            {"type": "repeat", "times": 3, "layers": [
                {"type": "conv", "kernel_size": 1, "bias": false},
                {"type": "spline", "bins": 4, "tail_bound": 3}]},
            {"type": "conv", "kernel_size": 3}]"#,
    ))
    .expect("valid");
    let unrolled = parse_spec(&spec_with_layers(
        r#"[{"type": "squeeze"},
            {"type": "conv", "kernel_size": 1, "bias": false},
            {"type": "spline", "bins": 4, "tail_bound": 3},
            {"type": "conv", "kernel_size": 1, "bias": false},
            {"type": "spline", "bins": 4, "tail_bound": 3},
            {"type": "conv", "kernel_size": 1, "bias": false},
            {"type": "spline", "bins": 4, "tail_bound": 3},
            {"type": "conv", "kernel_size": 3}]"#,
    ))
    .expect("valid");
    assert_eq!(repeated, unrolled);
    assert_eq!(repeated.layers.len(), 8);
    let a = compile_train(&repeated, 2, OptLevel::Full).expect("compiles");
    let b = compile_train(&unrolled, 2, OptLevel::Full).expect("compiles");
    assert_eq!(a.step.to_text(), b.step.to_text());
    let text = a.exact.to_text();
    // The third copy's conv is layer 5 of the expanded list; the last conv is layer 7.
    for name in ["layers.5.weight", "layers.6.widths", "layers.7.bias"] {
        assert!(text.contains(name), "no parameter {name}");
    }
    // The expanded spec round-trips through its JSON (checkpoints store it).
    let json = repeated.to_json_pretty();
    assert!(!json.contains("repeat"));
    assert_eq!(parse_spec(&json).expect("valid"), repeated);
    // The builder's repeat gives the same spec.
    let built = FlowSpec::builder("r")
        .input(&[1, 4, 4], Preprocess::None)
        .squeeze()
        .repeat(3, |b| b.conv(1, false).spline(4, 3.0))
        .conv(3, true)
        .batch_size(2)
        .build()
        .expect("valid");
    assert_eq!(built, repeated);
}

#[test]
fn nested_repeats_multiply() {
    let s = parse_spec(&spec_with_layers(
        r#"[{"type": "repeat", "times": 2, "layers": [
                {"type": "conv", "kernel_size": 1},
                {"type": "repeat", "times": 3, "layers": [{"type": "spline"}]}]}]"#,
    ))
    .expect("valid");
    let kinds: Vec<String> = s
        .layers
        .iter()
        .map(|l| format!("{l:?}").split('(').next().unwrap_or("").to_string())
        .collect();
    assert_eq!(
        kinds,
        ["Conv", "Spline", "Spline", "Spline", "Conv", "Spline", "Spline", "Spline"]
    );
}

#[test]
fn repeat_problems_are_named_once_at_their_pointer() {
    let e = errors(&spec_with_layers(
        r#"[{"type": "repeat", "times": 0, "layers": [{"type": "squeeze"}]}]"#,
    ));
    assert!(e.iter().any(|(p, _)| p == "/layers/0/times"), "{e:?}");
    let e = errors(&spec_with_layers(r#"[{"type": "repeat", "times": 2}]"#));
    assert!(
        e.iter()
            .any(|(p, m)| p == "/layers/0/layers" && m.contains("missing")),
        "{e:?}"
    );
    let e = errors(&spec_with_layers(
        r#"[{"type": "repeat", "times": 2, "layers": [], "extra": 1}]"#,
    ));
    assert!(e.iter().any(|(p, _)| p == "/layers/0/extra"), "{e:?}");
    assert!(
        e.iter()
            .any(|(p, m)| p == "/layers/0/layers" && m.contains("empty")),
        "{e:?}"
    );
    // A bad layer inside the block: reported once, at its place in the block.
    let e = errors(&spec_with_layers(
        r#"[{"type": "repeat", "times": 4, "layers": [{"type": "conv", "kernel_size": 2}]}]"#,
    ));
    let at: Vec<&(String, String)> = e
        .iter()
        .filter(|(p, _)| p == "/layers/0/layers/0/kernel_size")
        .collect();
    assert_eq!(at.len(), 1, "{e:?}");
    // The third squeeze of a 1×4×4 input meets a 16×1×1 map: reported at the squeeze.
    let e = errors(&spec_with_layers(
        r#"[{"type": "repeat", "times": 3, "layers": [{"type": "squeeze"}]}]"#,
    ));
    assert!(e.iter().any(|(p, _)| p == "/layers/0/layers/0"), "{e:?}");
    // A typo that would make billions of layers is an error, not an allocation.
    let e = errors(&spec_with_layers(
        r#"[{"type": "repeat", "times": 10000000000, "layers": [{"type": "spline"}]}]"#,
    ));
    assert!(
        e.iter()
            .any(|(p, m)| p == "/layers/0/times" && m.contains("100000")),
        "{e:?}"
    );
}
