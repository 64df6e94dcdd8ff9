//! Flow spec parsing and validation: every problem is reported at the exact JSON
//! pointer of the offending spot, with a clear message.

use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use snfc_compiler::spec::{
    load_spec, parse_spec, FlowSpec, GradientMode, LayerSpec, LinearInit, LinearSpec, Preprocess,
    ReconTrains, SmoothLeakyReluSpec, SpecError, SpecErrors,
};

fn spec_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join("specs")
        .join(name)
}

/// A path for a scratch file in cargo's per-target temp dir.
fn scratch_file(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("spec_errors");
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir.join(name)
}

/// The example spec of the docs (same as specs/mnist_fc2.json).
fn base() -> Value {
    json!({
      "name": "mnist_fc2",
      "input": {"shape": [784], "preprocess": "dequantize_logit"},
      "layers": [
        {"type": "linear", "bias": true},
        {"type": "smooth_leaky_relu", "alpha": 0.3},
        {"type": "linear", "bias": true}
      ],
      "objective": {"gradient": "self_normalizing", "lambda": 1.0},
      "train": {"batch_size": 100, "epochs": 100, "warmup_epochs": 10, "seed": 0,
                "optimizer": {"adam": {"lr": 1e-4, "betas": [0.9, 0.999]}}}
    })
}

/// The base spec with `pointer` set to `value`.
fn with(pointer: &str, value: Value) -> String {
    let mut v = base();
    *v.pointer_mut(pointer)
        .expect("pointer exists in the base spec") = value;
    v.to_string()
}

/// The base spec with the object member at `pointer` removed.
fn without(pointer: &str) -> String {
    let mut v = base();
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a parent");
    let obj = v
        .pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent is an object");
    obj.remove(key).expect("member exists");
    v.to_string()
}

/// The base spec with `key: value` inserted into the object at `parent`.
fn with_extra(parent: &str, key: &str, value: Value) -> String {
    let mut v = base();
    v.pointer_mut(parent)
        .and_then(Value::as_object_mut)
        .expect("parent is an object")
        .insert(key.to_string(), value);
    v.to_string()
}

fn errors_of(text: &str) -> SpecErrors {
    match parse_spec(text) {
        Ok(spec) => panic!("expected errors, parsed fine: {spec:?}\n{text}"),
        Err(e) => e,
    }
}

/// Asserts that parsing `text` gives an error at `pointer` whose message contains
/// `phrase`; returns that error.
#[track_caller]
fn assert_error(text: &str, pointer: &str, phrase: &str) -> SpecError {
    let errs = errors_of(text);
    match errs
        .errors
        .iter()
        .find(|e| e.pointer == pointer && e.message.contains(phrase))
    {
        Some(e) => e.clone(),
        None => panic!("no error at {pointer:?} containing {phrase:?}; got:\n{errs}\n{errs:?}"),
    }
}

/// Like [`assert_error`], and that it is the only error.
#[track_caller]
fn assert_only_error(text: &str, pointer: &str, phrase: &str) -> SpecError {
    let e = assert_error(text, pointer, phrase);
    let errs = errors_of(text);
    assert_eq!(
        errs.errors.len(),
        1,
        "expected a single error, got:\n{errs}"
    );
    e
}

// ---------------------------------------------------------------- valid specs

#[test]
fn base_spec_parses() {
    let spec = parse_spec(&base().to_string()).expect("base spec is valid");
    assert_eq!(spec.name, "mnist_fc2");
    assert_eq!(spec.input.shape, vec![784]);
    assert_eq!(spec.input.dim(), 784);
    assert_eq!(spec.input.preprocess, Preprocess::DequantizeLogit);
    assert_eq!(spec.input.logit_alpha, 1e-6);
    assert_eq!(spec.layers.len(), 3);
    assert_eq!(
        spec.layers[0],
        LayerSpec::Linear(LinearSpec {
            bias: true,
            init: LinearInit::IdentityNoise
        })
    );
    assert_eq!(
        spec.layers[1],
        LayerSpec::SmoothLeakyRelu(SmoothLeakyReluSpec { alpha: 0.3 })
    );
    assert_eq!(spec.objective.gradient, GradientMode::SelfNormalizing);
    assert_eq!(spec.objective.lambda.initial(), 1.0);
    assert_eq!(spec.train.batch_size, 100);
    assert_eq!(spec.train.epochs, 100);
    assert_eq!(spec.train.warmup_epochs, 10);
    assert_eq!(spec.train.seed, 0);
    assert_eq!(spec.train.optimizer.adam.lr, 1e-4);
    assert_eq!(spec.train.optimizer.adam.betas, [0.9, 0.999]);
    assert_eq!(spec.train.optimizer.adam.eps, 1e-8);
}

#[test]
fn spec_files_parse() {
    let sn = load_spec(&spec_path("mnist_fc2.json")).expect("mnist_fc2.json is valid");
    assert_eq!(sn.name, "mnist_fc2");
    assert_eq!(sn.objective.gradient, GradientMode::SelfNormalizing);
    // The README's example with the learned inverses stepping 10× faster.
    let mut fast = base();
    fast["train"]["optimizer"]["adam"]["inverse_lr_scale"] = json!(10.0);
    assert_eq!(sn, parse_spec(&fast.to_string()).expect("valid"));
    // The paper's setting is the docs' example itself.
    let paper = load_spec(&spec_path("mnist_fc2_paper.json")).expect("mnist_fc2_paper.json");
    let mut named = base();
    named["name"] = json!("mnist_fc2_paper");
    assert_eq!(paper, parse_spec(&named.to_string()).expect("valid"));

    let exact = load_spec(&spec_path("mnist_fc2_exact.json")).expect("mnist_fc2_exact.json valid");
    assert_eq!(exact.name, "mnist_fc2_exact");
    assert_eq!(exact.objective.gradient, GradientMode::Exact);
    // Otherwise identical.
    let mut renamed = exact.clone();
    renamed.name = "mnist_fc2".into();
    renamed.objective.gradient = GradientMode::SelfNormalizing;
    renamed.train.optimizer.adam.inverse_lr_scale = 10.0;
    assert_eq!(renamed, sn);
}

#[test]
fn to_json_pretty_round_trips() {
    for file in ["mnist_fc2.json", "mnist_fc2_exact.json"] {
        let spec = load_spec(&spec_path(file)).expect("valid spec file");
        let text = spec.to_json_pretty();
        assert_eq!(
            parse_spec(&text).expect("pretty JSON parses"),
            spec,
            "{file}"
        );
    }
    // Non-default values survive too.
    let spec = FlowSpec::builder("odd")
        .input(&[2, 3], Preprocess::None)
        .logit_alpha(0.05)
        .layer(LayerSpec::Linear(LinearSpec {
            bias: false,
            init: LinearInit::Identity,
        }))
        .smooth_leaky_relu(0.123456789)
        .exact()
        .lambda(0.0)
        .seed(u64::MAX)
        .adam(3e-3, [0.0, 0.5])
        .adam_eps(1e-12)
        .build()
        .expect("valid");
    assert_eq!(parse_spec(&spec.to_json_pretty()).expect("parses"), spec);
}

#[test]
fn builder_equals_spec_files() {
    let built = FlowSpec::builder("mnist_fc2")
        .input(&[784], Preprocess::DequantizeLogit)
        .linear(true)
        .smooth_leaky_relu(0.3)
        .linear(true)
        .self_normalizing(1.0)
        .batch_size(100)
        .epochs(100)
        .warmup_epochs(10)
        .seed(0)
        .adam(1e-4, [0.9, 0.999])
        .inverse_lr_scale(10.0)
        .build()
        .expect("builder spec is valid");
    assert_eq!(
        built,
        load_spec(&spec_path("mnist_fc2.json")).expect("valid")
    );

    let exact = FlowSpec::builder("mnist_fc2_exact")
        .input(&[784], Preprocess::DequantizeLogit)
        .linear(true)
        .smooth_leaky_relu(0.3)
        .linear(true)
        .exact()
        .build()
        .expect("valid");
    assert_eq!(
        exact,
        load_spec(&spec_path("mnist_fc2_exact.json")).expect("valid")
    );
}

#[test]
fn minimal_spec_takes_defaults() {
    let text = r#"{"name": "m", "input": {"shape": [4], "preprocess": "none"},
                   "layers": [{"type": "linear"}, {"type": "smooth_leaky_relu"}]}"#;
    let spec = parse_spec(text).expect("minimal spec is valid");
    assert_eq!(spec.layers[0], LayerSpec::Linear(LinearSpec::default()));
    assert_eq!(
        spec.layers[1],
        LayerSpec::SmoothLeakyRelu(SmoothLeakyReluSpec { alpha: 0.3 })
    );
    assert_eq!(spec.objective, Default::default());
    assert_eq!(spec.train, Default::default());
    // Partial nested objects take defaults for the rest.
    let spec = parse_spec(&with(
        "/train",
        json!({"optimizer": {"adam": {"lr": 0.01}}}),
    ))
    .expect("valid");
    assert_eq!(spec.train.batch_size, 100);
    assert_eq!(spec.train.optimizer.adam.lr, 0.01);
    assert_eq!(spec.train.optimizer.adam.betas, [0.9, 0.999]);
}

#[test]
fn serde_derive_agrees_with_parse_spec() {
    let texts = [
        base().to_string(),
        r#"{"name": "m", "input": {"shape": [4], "preprocess": "none"},
            "layers": [{"type": "linear", "init": "identity"}]}"#
            .to_string(),
        with("/objective", json!({"lambda": 0.5})),
    ];
    for text in texts {
        let via_serde: FlowSpec = serde_json::from_str(&text).expect("serde accepts it");
        assert_eq!(via_serde, parse_spec(&text).expect("valid"));
    }
    // serde's derive also rejects unknown layer fields (the tag is not one of them).
    assert!(serde_json::from_str::<FlowSpec>(&with(
        "/layers/0",
        json!({"type": "linear", "biass": true})
    ))
    .is_err());
}

#[test]
fn warmup_may_exceed_epochs() {
    let text = with("/train/warmup_epochs", json!(1000));
    assert_eq!(parse_spec(&text).expect("valid").train.warmup_epochs, 1000);
}

#[test]
fn integers_are_accepted_for_floats() {
    let spec = parse_spec(&with("/objective/lambda", json!(2))).expect("valid");
    assert_eq!(spec.objective.lambda.initial(), 2.0);
}

// ---------------------------------------------------------------- malformed JSON

#[test]
fn trailing_comma_reports_line_and_column() {
    let text = "{\n  \"name\": \"x\",\n  \"layers\": [1, 2,],\n}";
    let e = assert_only_error(text, "", "malformed JSON");
    assert_eq!(e.line, Some(3));
    assert!(e.column.is_some());
    let shown = errors_of(text).to_string();
    assert!(shown.contains("line 3 column"), "{shown}");
    assert!(!shown.contains(" at line"), "position given once: {shown}");
}

#[test]
fn missing_brace_reports_line_and_column() {
    let text = "{\n  \"name\": \"x\",\n  \"input\": {\"shape\": [1], \"preprocess\": \"none\"\n";
    let e = assert_only_error(text, "", "EOF");
    assert!(e.line.is_some() && e.column.is_some(), "{e:?}");
}

#[test]
fn non_object_root() {
    assert_only_error("[1, 2]", "", "expected a JSON object");
    assert_only_error("null", "", "expected a JSON object");
}

// ---------------------------------------------------------------- unknown names

#[test]
fn unknown_layer_type() {
    let text = with("/layers/2", json!({"type": "conv2d", "bias": true}));
    let e = assert_only_error(&text, "/layers/2/type", "unknown layer type `conv2d`");
    assert!(e.message.contains("linear, smooth_leaky_relu"), "{e:?}");
}

#[test]
fn misspelled_layer_type_gets_a_suggestion() {
    let text = with("/layers/1/type", json!("smooth_leaky_reLu"));
    assert_only_error(&text, "/layers/1/type", "did you mean `smooth_leaky_relu`?");
}

#[test]
fn missing_or_mistyped_layer_type() {
    assert_only_error(
        &with("/layers/0", json!({"bias": true})),
        "/layers/0/type",
        "missing field `type`",
    );
    assert_only_error(
        &with("/layers/0/type", json!(3)),
        "/layers/0/type",
        "expected a string",
    );
    assert_only_error(
        &with("/layers/0", json!("linear")),
        "/layers/0",
        "expected an object",
    );
}

#[test]
fn unknown_layer_field() {
    let text = with("/layers/0", json!({"type": "linear", "biass": true}));
    let e = assert_only_error(&text, "/layers/0/biass", "unknown field `biass`");
    assert!(e.message.contains("expected one of: bias, init"), "{e:?}");
    assert!(e.message.contains("did you mean `bias`?"), "{e:?}");
    // A field of another layer type is unknown too.
    let text = with(
        "/layers/1",
        json!({"type": "smooth_leaky_relu", "bias": true}),
    );
    assert_only_error(&text, "/layers/1/bias", "expected one of: alpha");
}

#[test]
fn unknown_adam_field() {
    let text = with(
        "/train/optimizer/adam",
        json!({"lrr": 1e-4, "betas": [0.9, 0.999]}),
    );
    let e = assert_only_error(&text, "/train/optimizer/adam/lrr", "unknown field `lrr`");
    assert!(
        e.message.contains("expected one of: lr, betas, eps"),
        "{e:?}"
    );
}

#[test]
fn unknown_top_level_field() {
    let text = with_extra("", "optimiser", json!({}));
    let e = assert_only_error(&text, "/optimiser", "unknown field `optimiser`");
    assert!(
        e.message
            .contains("expected one of: name, input, layers, objective, train"),
        "{e:?}"
    );
}

#[test]
fn unknown_fields_in_every_object() {
    for parent in ["/input", "/objective", "/train", "/train/optimizer"] {
        let text = with_extra(parent, "bogus", json!(1));
        assert_only_error(&text, &format!("{parent}/bogus"), "unknown field `bogus`");
    }
}

#[test]
fn unknown_field_pointer_is_escaped() {
    let text = with_extra("/input", "a/b~c", json!(1));
    assert_only_error(&text, "/input/a~1b~0c", "unknown field `a/b~c`");
}

#[test]
fn unknown_preprocess() {
    let e = assert_only_error(
        &with("/input/preprocess", json!("dequantize")),
        "/input/preprocess",
        "unknown preprocess `dequantize`",
    );
    assert!(e.message.contains("dequantize_logit, none"), "{e:?}");
    assert_only_error(
        &with("/input/preprocess", json!(null)),
        "/input/preprocess",
        "expected a string",
    );
}

#[test]
fn unknown_gradient_mode() {
    let e = assert_only_error(
        &with("/objective/gradient", json!("approximate")),
        "/objective/gradient",
        "unknown gradient mode `approximate`",
    );
    assert!(e.message.contains("self_normalizing, exact"), "{e:?}");
}

/// The base spec with `/objective/recon_trains` (not in the base) set to `value`.
fn with_recon_trains(value: Value) -> String {
    let mut v = base();
    v["objective"]["recon_trains"] = value;
    v.to_string()
}

#[test]
fn inverse_learning_rate_scale_is_checked() {
    let scale = |v: Value| {
        let mut spec = base();
        spec["train"]["optimizer"]["adam"]["inverse_lr_scale"] = v;
        spec.to_string()
    };
    let spec = parse_spec(&scale(json!(10.0))).expect("a valid spec");
    assert_eq!(spec.train.optimizer.adam.inverse_lr_scale, 10.0);
    assert_eq!(
        parse_spec(&spec.to_json_pretty()).expect("round trip"),
        spec
    );
    assert_eq!(
        parse_spec(&base().to_string())
            .expect("the base spec")
            .train
            .optimizer
            .adam
            .inverse_lr_scale,
        1.0
    );
    assert_only_error(
        &scale(json!(0.0)),
        "/train/optimizer/adam/inverse_lr_scale",
        "inverse_lr_scale must be finite and > 0, got 0",
    );
    assert_error(
        &scale(json!("fast")),
        "/train/optimizer/adam/inverse_lr_scale",
        "expected a number",
    );
}

#[test]
fn unknown_reconstruction_target() {
    let e = assert_only_error(
        &with_recon_trains(json!("forward")),
        "/objective/recon_trains",
        "unknown reconstruction target `forward`",
    );
    assert!(e.message.contains("both, inverse"), "{e:?}");
}

#[test]
fn reconstruction_target_is_parsed_and_kept_out_of_default_specs() {
    let spec = parse_spec(&with_recon_trains(json!("inverse"))).expect("a valid spec");
    assert_eq!(spec.objective.recon_trains, ReconTrains::Inverse);
    let round = parse_spec(&serde_json::to_string(&spec).expect("serializes")).expect("parses");
    assert_eq!(round, spec);
    // The default is not written out, so the specs saved before the field existed are unchanged.
    let default = parse_spec(&base().to_string()).expect("a valid spec");
    let text = serde_json::to_string(&default).expect("serializes");
    assert!(!text.contains("recon_trains"), "{text}");
}

#[test]
fn unknown_linear_init() {
    assert_only_error(
        &with("/layers/0", json!({"type": "linear", "init": "xavier"})),
        "/layers/0/init",
        "unknown init `xavier`",
    );
}

// ---------------------------------------------------------------- wrong types

#[test]
fn batch_size_wrong_types() {
    for (value, phrase) in [
        (json!("100"), "string \"100\""),
        (json!(-1), "number `-1`"),
        (json!(1.5), "number `1.5`"),
        (json!(null), "null"),
    ] {
        let e = assert_only_error(
            &with("/train/batch_size", value),
            "/train/batch_size",
            "expected a non-negative integer",
        );
        assert!(e.message.contains(phrase), "{e:?}");
    }
}

#[test]
fn bias_as_number() {
    assert_only_error(
        &with("/layers/0/bias", json!(1)),
        "/layers/0/bias",
        "expected a boolean, got number `1`",
    );
}

#[test]
fn other_wrong_types() {
    let cases = [
        ("/name", json!(5), "expected a string"),
        ("/input", json!([784]), "expected an object"),
        ("/input/shape", json!(784), "expected an array"),
        (
            "/input/shape/0",
            json!("784"),
            "expected a non-negative integer",
        ),
        ("/layers", json!({}), "expected an array"),
        ("/layers/1/alpha", json!("0.3"), "expected a number"),
        ("/objective", json!("exact"), "expected an object"),
        ("/objective/lambda", json!(true), "expected a number"),
        ("/train", json!(null), "expected an object"),
        ("/train/seed", json!(-5), "expected a non-negative integer"),
        (
            "/train/epochs",
            json!(2.5),
            "expected a non-negative integer",
        ),
        ("/train/optimizer/adam", json!(1), "expected an object"),
        (
            "/train/optimizer/adam/lr",
            json!("1e-4"),
            "expected a number",
        ),
        (
            "/train/optimizer/adam/betas",
            json!(0.9),
            "expected an array of 2 numbers",
        ),
        (
            "/train/optimizer/adam/betas",
            json!([0.9]),
            "expected an array of 2 numbers",
        ),
        (
            "/train/optimizer/adam/betas/0",
            json!("0.9"),
            "expected a number",
        ),
    ];
    for (pointer, value, phrase) in cases {
        assert_only_error(&with(pointer, value), pointer, phrase);
    }
}

// ---------------------------------------------------------------- missing fields

#[test]
fn missing_required_fields() {
    for pointer in [
        "/name",
        "/input",
        "/layers",
        "/input/shape",
        "/input/preprocess",
    ] {
        let field = pointer.rsplit('/').next().unwrap_or_default();
        assert_only_error(
            &without(pointer),
            pointer,
            &format!("missing field `{field}`"),
        );
    }
}

#[test]
fn optional_fields_may_be_missing() {
    for pointer in [
        "/objective",
        "/train",
        "/objective/gradient",
        "/objective/lambda",
        "/train/batch_size",
        "/train/optimizer",
        "/train/optimizer/adam",
        "/train/optimizer/adam/betas",
        "/layers/0/bias",
        "/layers/1/alpha",
    ] {
        let text = without(pointer);
        if let Err(e) = parse_spec(&text) {
            panic!("{pointer} should be optional: {e}");
        }
    }
}

// ---------------------------------------------------------------- ranges

#[test]
fn zero_shape_dimension() {
    assert_only_error(
        &with("/input/shape", json!([28, 0])),
        "/input/shape/1",
        "must be positive, got 0",
    );
    assert_only_error(
        &with("/input/shape", json!([0])),
        "/input/shape/0",
        "must be positive",
    );
}

#[test]
fn empty_shape() {
    assert_only_error(
        &with("/input/shape", json!([])),
        "/input/shape",
        "must not be empty",
    );
}

#[test]
fn overflowing_shape() {
    let big = u64::MAX / 2;
    assert_only_error(
        &with("/input/shape", json!([big, big])),
        "/input/shape",
        "too large",
    );
}

#[test]
fn batch_size_zero() {
    assert_only_error(
        &with("/train/batch_size", json!(0)),
        "/train/batch_size",
        "batch_size must be at least 1",
    );
}

#[test]
fn epochs_zero() {
    assert_only_error(
        &with("/train/epochs", json!(0)),
        "/train/epochs",
        "epochs must be at least 1",
    );
}

#[test]
fn geco_lambda_fields_are_checked() {
    let geco = |g: Value| with("/objective/lambda", json!({ "geco": g }));
    parse_spec(&geco(json!({}))).expect("every GECO field has a default");
    assert_only_error(
        &geco(json!({"ema": 1.0})),
        "/objective/lambda/geco/ema",
        "ema must be in [0, 1), got 1",
    );
    assert_only_error(
        &geco(json!({"lambda0": 0.0})),
        "/objective/lambda/geco/lambda0",
        "lambda0 must be > 0",
    );
    let bounded = parse_spec(&geco(json!({"min": 0.1, "max": 10.0}))).expect("bounds");
    let g = bounded.objective.lambda.geco().expect("GECO");
    assert_eq!((g.min, g.max), (Some(0.1), Some(10.0)));
    assert_eq!(
        parse_spec(&bounded.to_json_pretty()).expect("round trip"),
        bounded
    );
    assert_only_error(
        &geco(json!({"min": 2.0, "max": 1.0, "lambda0": 1.5})),
        "/objective/lambda/geco/min",
        "min (2) must not exceed max (1)",
    );
    assert_only_error(
        &geco(json!({"max": 0.5})),
        "/objective/lambda/geco/lambda0",
        "lambda0 (1) must lie within [min, max] = [0, 0.5]",
    );
    assert_only_error(
        &geco(json!({"min": -1.0})),
        "/objective/lambda/geco/min",
        "min must be >= 0, got -1",
    );
    assert_error(
        &geco(json!({"max": "big"})),
        "/objective/lambda/geco/max",
        "expected a number",
    );
    assert_error(
        &geco(json!({"eta": 1e-3})),
        "/objective/lambda/geco/eta",
        "unknown field",
    );
    assert_error(
        &with("/objective/lambda", json!({"gecko": {}})),
        "/objective/lambda/gecko",
        "unknown field",
    );
    assert_error(
        &with("/objective/lambda", json!("big")),
        "/objective/lambda",
        "expected a number",
    );
}

#[test]
fn negative_lambda() {
    assert_only_error(
        &with("/objective/lambda", json!(-0.5)),
        "/objective/lambda",
        "lambda must be finite and >= 0, got -0.5",
    );
    // λ = 0 is allowed (no reconstruction term).
    parse_spec(&with("/objective/lambda", json!(0.0))).expect("λ = 0 is valid");
}

#[test]
fn non_positive_lr() {
    for lr in [json!(0.0), json!(-1e-3)] {
        assert_only_error(
            &with("/train/optimizer/adam/lr", lr),
            "/train/optimizer/adam/lr",
            "lr must be finite and > 0",
        );
    }
}

#[test]
fn betas_out_of_range() {
    assert_only_error(
        &with("/train/optimizer/adam/betas", json!([0.9, 1.0])),
        "/train/optimizer/adam/betas/1",
        "betas[1] must be in [0, 1), got 1",
    );
    assert_only_error(
        &with("/train/optimizer/adam/betas", json!([-0.1, 0.999])),
        "/train/optimizer/adam/betas/0",
        "must be in [0, 1)",
    );
    parse_spec(&with("/train/optimizer/adam/betas", json!([0.0, 0.0]))).expect("0 is allowed");
}

#[test]
fn non_positive_eps() {
    let text = with_extra("/train/optimizer/adam", "eps", json!(0));
    assert_only_error(
        &text,
        "/train/optimizer/adam/eps",
        "eps must be finite and > 0",
    );
}

#[test]
fn alpha_out_of_range() {
    for alpha in [1.5, 1.0, 0.0, -0.3] {
        assert_only_error(
            &with("/layers/1/alpha", json!(alpha)),
            "/layers/1/alpha",
            "alpha must be in (0, 1)",
        );
    }
    let e = assert_only_error(
        &with("/layers/1/alpha", json!(1.5)),
        "/layers/1/alpha",
        "got 1.5",
    );
    assert_eq!(e.message, "alpha must be in (0, 1), got 1.5");
}

#[test]
fn logit_alpha_out_of_range() {
    for a in [0.0, 0.5, -1e-6, 2.0] {
        assert_only_error(
            &with_extra("/input", "logit_alpha", json!(a)),
            "/input/logit_alpha",
            "logit_alpha must be in (0, 0.5)",
        );
    }
    let spec = parse_spec(&with_extra("/input", "logit_alpha", json!(0.05))).expect("valid");
    assert_eq!(spec.input.logit_alpha, 0.05);
}

#[test]
fn empty_layers() {
    assert_only_error(&with("/layers", json!([])), "/layers", "must not be empty");
}

#[test]
fn empty_name() {
    assert_only_error(&with("/name", json!("")), "/name", "name must not be empty");
    assert_only_error(
        &with("/name", json!("  ")),
        "/name",
        "name must not be empty",
    );
}

#[test]
fn name_is_one_safe_path_component() {
    for bad in [
        "../../escape/x",
        "a/b",
        "..",
        ".",
        "run name",
        "x\\y",
        "naïve",
    ] {
        assert_only_error(&with("/name", json!(bad)), "/name", "one path component");
    }
    for good in ["mnist_fc2", "glow-512.v2", "a"] {
        parse_spec(&with("/name", json!(good))).expect("a safe name");
    }
}

#[test]
fn huge_numbers_are_malformed_json() {
    // JSON has no NaN/inf; a number too big for f64 is a parse error.
    let text = base().to_string().replace("1.0}", "1e999}");
    assert_only_error(&text, "", "number out of range");
}

// ---------------------------------------------------------------- many problems

#[test]
fn independent_problems_are_all_reported() {
    let text = json!({
      "name": "",
      "input": {"shape": [0, "x"], "preprocess": "raw", "logit_alpha": 0.7},
      "layers": [
        {"type": "linear", "biass": true},
        {"type": "smooth_leaky_relu", "alpha": 1.5},
        {"type": "convolution"}
      ],
      "objective": {"gradient": "exact", "lambda": -1},
      "train": {"batch_size": 0, "epochs": "ten",
                "optimizer": {"adam": {"lr": 0, "betas": [0.9, 1.5], "eps": -1}}},
      "extra": 1
    })
    .to_string();
    let errs = errors_of(&text);
    let mut pointers: Vec<&str> = errs.errors.iter().map(|e| e.pointer.as_str()).collect();
    pointers.sort_unstable();
    assert_eq!(
        pointers,
        vec![
            "/extra",
            "/input/logit_alpha",
            "/input/preprocess",
            "/input/shape/0",
            "/input/shape/1",
            "/layers/0/biass",
            "/layers/1/alpha",
            "/layers/2/type",
            "/name",
            "/objective/lambda",
            "/train/batch_size",
            "/train/epochs",
            "/train/optimizer/adam/betas/1",
            "/train/optimizer/adam/eps",
            "/train/optimizer/adam/lr",
        ],
        "{errs}"
    );
}

#[test]
fn placeholder_values_do_not_add_errors() {
    // Missing name: only "missing field", not also "must not be empty".
    assert_only_error(&without("/name"), "/name", "missing field");
    // Unusable shape: only the type error, not also "must not be empty".
    assert_only_error(
        &with("/input/shape", json!("784")),
        "/input/shape",
        "expected an array",
    );
    // Unusable layers: no "layers must not be empty".
    assert_only_error(
        &with("/layers", json!(null)),
        "/layers",
        "expected an array",
    );
}

// ---------------------------------------------------------------- display, files

#[test]
fn display_names_file_and_pointer() {
    let path = scratch_file("x.json");
    std::fs::write(&path, with("/layers/1/alpha", json!(1.5))).expect("write");
    let errs = load_spec(&path).expect_err("invalid");
    assert_eq!(errs.file.as_deref(), Some(path.as_path()));
    assert_eq!(
        errs.to_string(),
        format!(
            "{}: /layers/1/alpha: alpha must be in (0, 1), got 1.5",
            path.display()
        )
    );
    // Without a file: no prefix; several errors: one line each.
    let errs = errors_of(&with("/train", json!({"batch_size": 0, "epochs": 0})));
    let shown = errs.to_string();
    assert_eq!(
        shown.lines().collect::<Vec<_>>(),
        vec![
            "/train/batch_size: batch_size must be at least 1, got 0",
            "/train/epochs: epochs must be at least 1, got 0",
        ]
    );
}

#[test]
fn display_of_malformed_json_has_position() {
    let path = scratch_file("bad.json");
    std::fs::write(&path, "{\"name\": \"x\",}").expect("write");
    let errs = load_spec(&path).expect_err("malformed");
    let shown = errs.to_string();
    assert!(
        shown.starts_with(&format!("{}: line 1 column ", path.display())),
        "{shown}"
    );
    assert!(shown.contains("malformed JSON"), "{shown}");
}

#[test]
fn unreadable_file_names_the_file() {
    let path = Path::new("/nonexistent/dir/spec.json");
    let errs = load_spec(path).expect_err("no such file");
    assert_eq!(errs.file.as_deref(), Some(path));
    let shown = errs.to_string();
    assert!(
        shown.starts_with("/nonexistent/dir/spec.json: cannot read spec file"),
        "{shown}"
    );
    // SpecErrors is a std error (usable with `?` into anyhow/Box<dyn Error>).
    let _: Box<dyn std::error::Error> = Box::new(errs);
}

// ---------------------------------------------------------------- builder

#[test]
fn builder_validates() {
    let errs = FlowSpec::builder("")
        .input(&[4], Preprocess::None)
        .smooth_leaky_relu(2.0)
        .batch_size(0)
        .adam(0.0, [0.9, 0.999])
        .build()
        .expect_err("invalid");
    for pointer in [
        "/name",
        "/layers/0/alpha",
        "/train/batch_size",
        "/train/optimizer/adam/lr",
    ] {
        assert!(errs.has(pointer), "missing {pointer}: {errs}");
    }
    assert_eq!(errs.errors.len(), 4, "{errs}");

    let errs = FlowSpec::builder("x")
        .linear(true)
        .build()
        .expect_err("no input");
    assert_eq!(errs.errors.len(), 1, "{errs}");
    assert!(errs.errors[0].pointer == "/input" && errs.errors[0].message.contains("missing"));

    let errs = FlowSpec::builder("x")
        .input(&[4], Preprocess::None)
        .build()
        .expect_err("no layers");
    assert!(errs.has("/layers"), "{errs}");
}

#[test]
fn validate_rejects_non_finite_values() {
    let mut spec = load_spec(&spec_path("mnist_fc2.json")).expect("valid");
    spec.objective.lambda = snfc_compiler::spec::Lambda::Fixed(f64::INFINITY);
    spec.train.optimizer.adam.lr = f64::NAN;
    spec.train.optimizer.adam.betas[0] = f64::NAN;
    spec.layers[1] = LayerSpec::SmoothLeakyRelu(SmoothLeakyReluSpec { alpha: f64::NAN });
    spec.input.logit_alpha = f64::NAN;
    let errs = spec.validate().expect_err("invalid");
    for pointer in [
        "/objective/lambda",
        "/train/optimizer/adam/lr",
        "/train/optimizer/adam/betas/0",
        "/layers/1/alpha",
        "/input/logit_alpha",
    ] {
        assert!(errs.has(pointer), "missing {pointer}: {errs}");
    }
}
