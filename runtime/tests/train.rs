//! End-to-end training on the embedded MNIST subset (DESIGN.md §6): a short run lowers the
//! validation NLL, writes a checkpoint that loads back on its own (spec from the metadata) and
//! one `metrics.jsonl` line per epoch; the exact-gradient spec trains too.

use snfc_compiler::compile::OptLevel;
use snfc_compiler::spec::{load_spec, parse_spec, FlowSpec};
use snfc_runtime::data::{embedded_mnist, load_npy_dataset};
use snfc_runtime::eval::evaluate;
use snfc_runtime::model::Model;
use snfc_runtime::train::{train, TrainOptions};
use std::path::{Path, PathBuf};

fn spec_file(name: &str) -> FlowSpec {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../specs")
        .join(name);
    load_spec(&path).unwrap_or_else(|e| panic!("{e}"))
}

fn options(out: PathBuf, steps: usize) -> TrainOptions {
    TrainOptions {
        epochs: Some(1),
        steps: Some(steps),
        ..TrainOptions::new(out)
    }
}

fn metrics_lines(dir: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(dir.join("metrics.jsonl")).expect("metrics.jsonl");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("metrics line {l:?}: {e}")))
        .collect()
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key)
        .unwrap_or_else(|| panic!("metrics line has no `{key}`: {v}"))
        .as_f64()
        .unwrap_or_else(|| panic!("`{key}` is not a number: {v}"))
}

#[test]
fn short_mnist_run_lowers_validation_nll_and_writes_a_loadable_checkpoint() {
    let spec = spec_file("mnist_fc2.json");
    let data = embedded_mnist().expect("embedded MNIST");
    let d = spec.input.dim() as f64;

    // The model training starts from: same seed (the spec's), evaluated like `train` does.
    let initial = evaluate(
        &Model::<f32>::init(&spec, spec.train.seed).cast::<f64>(),
        &data.valid,
        100,
        0,
    )
    .expect("initial evaluation");

    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let steps = 40;
    let summary = train::<f32>(&spec, &data, &options(out.clone(), steps)).expect("training");
    let best = summary.best.clone().expect("one epoch ran");
    assert_eq!(summary.best_epoch, 1);
    assert_eq!(summary.records.len(), 1);
    eprintln!(
        "validation NLL: {} nats at init, {} after {steps} steps",
        initial.nll_nats, best.nll_nats
    );
    assert!(
        best.nll_nats < initial.nll_nats - 1.0,
        "validation NLL did not go down: {} nats before, {} after {steps} steps",
        initial.nll_nats,
        best.nll_nats
    );

    // The checkpoint loads without a spec argument and reproduces the reported validation NLL.
    assert_eq!(summary.checkpoint, out.join("checkpoint.safetensors"));
    let (model, meta) = Model::<f64>::load(&summary.checkpoint, None).expect("checkpoint loads");
    assert_eq!(model.spec, spec, "spec in the checkpoint metadata");
    assert_eq!(meta.get("epoch").map(String::as_str), Some("1"));
    assert_eq!(meta.get("steps").map(String::as_str), Some("40"));
    assert_eq!(meta.get("dtype").map(String::as_str), Some("f32"));
    let again = evaluate(&model, &data.valid, 100, 0).unwrap();
    assert!(
        (again.nll_nats - best.nll_nats).abs() <= 1e-9 * best.nll_nats.abs(),
        "reloaded checkpoint: {} nats, training reported {}",
        again.nll_nats,
        best.nll_nats
    );
    // The parameters moved away from the initialization.
    let init = Model::<f32>::init(&spec, spec.train.seed);
    assert!(model.params.iter().all(|p| model
        .get(&p.name)
        .iter()
        .zip(init.get(&p.name))
        .any(|(a, b)| *a != *b as f64)));

    // metrics.jsonl: one line with the documented fields.
    let lines = metrics_lines(&out);
    assert_eq!(lines.len(), 1, "one epoch, one line");
    let m = &lines[0];
    assert_eq!(m["epoch"], 1);
    assert_eq!(m["steps"], steps);
    assert!(num(m, "train_objective_data_terms").is_finite());
    let train_nll = num(m, "train_nll_nats");
    assert!(train_nll.is_finite());
    let train_bpd = num(m, "train_bits_per_dim");
    assert!((train_bpd - train_nll / (d * std::f64::consts::LN_2)).abs() < 1e-9);
    assert!((num(m, "val_nll_nats") - best.nll_nats).abs() <= 1e-9 * best.nll_nats.abs());
    let bpd = num(m, "val_bits_per_dim");
    assert!((bpd - num(m, "val_nll_nats") / (d * std::f64::consts::LN_2)).abs() < 1e-9);
    let recon = num(m, "val_recon");
    assert!(recon.is_finite() && recon >= 0.0);
    assert!(num(m, "seconds") > 0.0);
    assert!(num(m, "examples_per_sec") > 0.0);
    let r = &summary.records[0];
    assert_eq!((r.epoch, r.steps), (1, steps));

    // A second run into the same directory without `force` is refused and changes nothing.
    let before = std::fs::read(&summary.checkpoint).unwrap();
    let metrics_before = std::fs::read(out.join("metrics.jsonl")).unwrap();
    let err =
        train::<f32>(&spec, &data, &options(out.clone(), 1)).expect_err("must refuse to overwrite");
    assert!(err.to_string().contains("already holds a run"), "{err}");
    assert_eq!(std::fs::read(&summary.checkpoint).unwrap(), before);
    assert_eq!(
        std::fs::read(out.join("metrics.jsonl")).unwrap(),
        metrics_before
    );
}

/// `train_nll_nats` is the exact NLL of the epoch's training batches: with parameters that do
/// not move (a learning rate far below f64's resolution), it equals the exact evaluation of the
/// training split (each of whose examples the epoch's batches hold once), while the objective's
/// data terms, which leave out the log-dets, are another number.
#[test]
fn the_training_nll_is_the_exact_nll_of_the_training_batches() {
    let spec = parse_spec(
        r#"{"name": "nll", "input": {"shape": [6], "preprocess": "none"},
            "layers": [{"type": "linear"}, {"type": "smooth_leaky_relu"}, {"type": "linear"}],
            "train": {"batch_size": 10, "epochs": 1, "seed": 3,
                      "optimizer": {"adam": {"lr": 1e-300}}}}"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("data.npy");
    let rows: Vec<f64> = (0..300 * 6)
        .map(|i| ((i * 7919 % 1000) as f64 / 500.0 - 1.0) * (1.0 + (i % 6) as f64))
        .collect();
    snfc_runtime::npy::write_npy_f64(&path, &[300, 6], &rows).unwrap();
    let data = load_npy_dataset(&path).unwrap();
    assert_eq!(
        data.train.n % 10,
        0,
        "every training example in one batch of the epoch"
    );
    let summary = train::<f64>(
        &spec,
        &data,
        &TrainOptions {
            epochs: Some(1),
            ..TrainOptions::new(dir.path().join("run"))
        },
    )
    .unwrap();
    let record = &summary.records[0];
    let exact = evaluate(&Model::<f64>::init(&spec, 3), &data.train, 50, 0).unwrap();
    assert!(
        (record.train_nll_nats - exact.nll_nats).abs() <= 1e-9 * exact.nll_nats.abs(),
        "train_nll_nats {} vs the exact NLL of the training split {}",
        record.train_nll_nats,
        exact.nll_nats
    );
    assert!(
        (record.train_objective_data_terms - record.train_nll_nats).abs() > 1e-3,
        "{record:?}"
    );
}

#[test]
fn exact_gradient_spec_trains_a_few_steps() {
    let spec = spec_file("mnist_fc2_exact.json");
    let data = embedded_mnist().expect("embedded MNIST");
    let dir = tempfile::tempdir().unwrap();
    let summary =
        train::<f32>(&spec, &data, &options(dir.path().to_path_buf(), 3)).expect("training");
    let best = summary.best.expect("one epoch ran");
    assert!(best.nll_nats.is_finite());
    assert!(
        best.recon.is_none(),
        "the exact spec has no reconstruction term"
    );
    let lines = metrics_lines(dir.path());
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["steps"], 3);
    assert!(lines[0]["val_recon"].is_null());
    let (model, _) = Model::<f64>::load(&summary.checkpoint, None).unwrap();
    assert_eq!(model.spec, spec);
}

/// The exact-gradient spec trains on a GPU (lavapipe in CI; skipped without a wgpu adapter
/// unless `SNFC_REQUIRE_GPU` names it) and reports the host's validation NLL to f32 precision.
/// Its step does not read the learned inverses the model still holds: the checkpoint keeps
/// them as they were initialized, as a host run does (the device once refused to hand back a
/// parameter its plan does not read, and the run failed at its first checkpoint).
#[test]
fn exact_gradient_spec_trains_on_a_gpu() {
    use snfc_runtime::cube::probe::{device_for_test, DeviceKind};
    let Some(gpu) = device_for_test(DeviceKind::Wgpu, "exact_gradient_spec_trains_on_a_gpu") else {
        return;
    };
    let spec = spec_file("mnist_fc2_exact.json");
    let mut data = embedded_mnist().expect("embedded MNIST");
    data.train = data.train.take(200);
    data.valid = data.valid.take(100);
    let run = |device| {
        let dir = tempfile::tempdir().unwrap();
        let opts = TrainOptions {
            device,
            device_noise: false,
            ..options(dir.path().join("run"), 2)
        };
        let summary = train::<f32>(&spec, &data, &opts).expect("training");
        let (model, _) = Model::<f64>::load(&summary.checkpoint, None).unwrap();
        (summary.best.expect("one epoch ran").nll_nats, model)
    };
    let (host_nll, host) = run(snfc_runtime::cube::probe::Chosen::Host);
    let (gpu_nll, trained) = run(gpu);
    assert!(
        (gpu_nll - host_nll).abs() <= 1e-4 * host_nll.abs(),
        "validation NLL on the GPU {gpu_nll}, on the host {host_nll}"
    );
    let initial = Model::<f32>::init(&spec, spec.train.seed).cast::<f64>();
    let mut inverses = 0;
    for p in &spec_params(&spec) {
        if p.ends_with(".weight_inv") {
            inverses += 1;
            assert_eq!(
                trained.values[p], initial.values[p],
                "{p} changed on the GPU"
            );
            assert_eq!(host.values[p], initial.values[p], "{p} changed on the host");
        } else {
            assert_ne!(trained.values[p], initial.values[p], "{p} did not train");
        }
    }
    assert!(
        inverses > 0,
        "the exact spec's model holds learned inverses"
    );
}

fn spec_params(spec: &FlowSpec) -> Vec<String> {
    snfc_compiler::ir::lower::parameters(spec)
        .into_iter()
        .map(|p| p.name)
        .collect()
}

/// A small continuous data set: a D=4 flow trained from a .npy file in f64, where the NLL must
/// drop quickly (the data are far from the N(0, I) the identity initialization models).
#[test]
fn small_npy_spec_trains_in_f64_and_lowers_nll() {
    let d = 4;
    let spec = parse_spec(
        r#"{
            "name": "small_npy",
            "input": {"shape": [4], "preprocess": "none"},
            "layers": [
                {"type": "linear", "bias": true},
                {"type": "smooth_leaky_relu", "alpha": 0.3},
                {"type": "linear", "bias": true}
            ],
            "train": {"batch_size": 20, "epochs": 5, "warmup_epochs": 0, "seed": 1,
                      "optimizer": {"adam": {"lr": 0.01}}}
        }"#,
    )
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let npy = dir.path().join("data.npy");
    // Examples x = 3 + 2·(correlated noise): mean and scale far from the base density.
    let n = 400;
    let mut state = 12345u64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut rows = Vec::with_capacity(n * d);
    for _ in 0..n {
        let a = uniform() - 0.5;
        for k in 0..d {
            rows.push(3.0 + 2.0 * (a + 0.3 * (uniform() - 0.5)) * (k as f64 + 1.0));
        }
    }
    snfc_runtime::npy::write_npy_f64(&npy, &[n, d], &rows).unwrap();
    let data = load_npy_dataset(&npy).unwrap();
    let initial = evaluate(&Model::<f64>::init(&spec, 1), &data.valid, 100, 0).unwrap();
    let opts = TrainOptions::new(dir.path().join("run"));
    let summary = train::<f64>(&spec, &data, &opts).expect("training");
    assert_eq!(summary.records.len(), 5);
    let lines = metrics_lines(&opts.out);
    assert_eq!(lines.len(), 5, "one metrics line per epoch");
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["epoch"], i + 1);
        assert_eq!(l["steps"], (i + 1) * 16);
    }
    let best = summary.best.unwrap();
    eprintln!(
        "validation NLL: {} nats at init, {} after 5 epochs",
        initial.nll_nats, best.nll_nats
    );
    assert!(
        best.nll_nats < initial.nll_nats - 1.0,
        "NLL {} → {}",
        initial.nll_nats,
        best.nll_nats
    );
    // The checkpoint holds the best epoch.
    let best_line = lines
        .iter()
        .min_by(|a, b| num(a, "val_nll_nats").total_cmp(&num(b, "val_nll_nats")))
        .unwrap();
    assert_eq!(best_line["epoch"], summary.best_epoch);
    let (model, meta) = Model::<f64>::load(&summary.checkpoint, None).unwrap();
    assert_eq!(meta.get("dtype").map(String::as_str), Some("f64"));
    assert_eq!(meta.get("epoch"), Some(&summary.best_epoch.to_string()));
    let again = evaluate(&model, &data.valid, 100, 0).unwrap();
    assert!((again.nll_nats - best.nll_nats).abs() <= 1e-9 * best.nll_nats.abs().max(1.0));
}

/// `train.grad_clip_norm`: a bound far above the gradient norm changes nothing (bit for bit); a
/// tiny one clips every step, so the parameters move differently (Adam's first step, lr ·
/// m̂/√v̂, is invariant to a constant scale, but the ε and the changing scales are not) and
/// the run still trains.
#[test]
fn gradient_clipping_by_global_norm() {
    let data = embedded_mnist().expect("embedded MNIST");
    let base = spec_file("mnist_fc2.json");
    let run = |clip: Option<f64>, name: &str| {
        let mut spec = base.clone();
        spec.train.grad_clip_norm = clip;
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join(name);
        let summary = train::<f64>(&spec, &data, &options(out, 5)).expect("training");
        let (model, _) = Model::<f64>::load(&summary.checkpoint, None).expect("loads");
        (model, summary.best.expect("one epoch").nll_nats)
    };
    let (plain, _) = run(None, "plain");
    let (loose, _) = run(Some(1e12), "loose");
    let (tight, nll) = run(Some(1e-3), "tight");
    for p in &plain.params {
        assert_eq!(plain.get(&p.name), loose.get(&p.name), "{}", p.name);
    }
    assert!(plain
        .params
        .iter()
        .any(|p| plain.get(&p.name) != tight.get(&p.name)));
    assert!(nll.is_finite());
}

/// GECO (`objective.lambda = {"geco": …}`): the step takes one λ per self-normalizing layer
/// and reports each layer's reconstruction error; fed λ₀ everywhere it is the fixed-λ step; in
/// training λ follows λ ← λ·exp(lr·(EMA(recon) − κ)), is logged per layer in metrics.jsonl and
/// saved in the checkpoint.
#[test]
fn geco_adapts_lambda_per_layer() {
    use snfc_compiler::compile::compile_train;
    use snfc_compiler::spec::{parse_spec, GecoSpec, Lambda};
    use snfc_runtime::host::exec::{Executor, Feeds, Program};
    use snfc_runtime::train::Geco;
    use std::sync::Arc;
    let text = |lambda: &str| {
        format!(
            r#"{{"name": "g", "input": {{"shape": [784], "preprocess": "dequantize_logit"}},
                "layers": [{{"type": "linear"}}, {{"type": "smooth_leaky_relu"}}, {{"type": "linear"}}],
                "objective": {{"lambda": {lambda}}},
                "train": {{"batch_size": 50, "warmup_epochs": 0, "optimizer": {{"adam": {{"lr": 1e-3}}}}}}}}"#
        )
    };
    let geco = parse_spec(&text(
        r#"{"geco": {"lambda0": 2.0, "lr": 1e-3, "ema": 0.9}}"#,
    ))
    .unwrap();
    let fixed = parse_spec(&text("2.0")).unwrap();
    assert_eq!(
        geco.objective.lambda,
        Lambda::Geco {
            geco: GecoSpec {
                lambda0: 2.0,
                lr: 1e-3,
                ema: 0.9,
                kappa: 0.0,
                min: None,
                max: None,
            }
        }
    );
    // The spec round-trips through its JSON (checkpoints store it).
    assert_eq!(parse_spec(&geco.to_json_pretty()).unwrap(), geco);
    // One step: GECO fed λ₀ = the fixed-λ step.
    let batch = 4;
    let g = compile_train(&geco, batch, OptLevel::Full).unwrap().step;
    let f = compile_train(&fixed, batch, OptLevel::Full).unwrap().step;
    let model = Model::<f64>::init(&fixed, 1);
    let mut feeds: Feeds<f64> = model.values.clone();
    for (name, v) in &mut feeds {
        if name.ends_with("weight_inv") {
            *v = Arc::new(
                v.iter()
                    .enumerate()
                    .map(|(i, x)| x + 1e-3 * ((i % 7) as f64 - 3.0))
                    .collect(),
            );
        }
    }
    feeds.insert(
        "x".into(),
        Arc::new((0..784 * batch).map(|i| (i * 37 % 256) as f64).collect()),
    );
    feeds.insert("noise".into(), Arc::new(vec![0.5; 784 * batch]));
    let state = Geco::new(&geco).expect("GECO state");
    assert_eq!(
        state.lambda.keys().collect::<Vec<_>>(),
        ["layers.0", "layers.2"]
    );
    let gs = geco.objective.lambda.geco().unwrap();
    for (name, v) in state.feeds(gs) {
        feeds.insert(name, Arc::new(vec![v]));
    }
    let run = |graph| -> std::collections::HashMap<String, Vec<f64>> {
        Executor::<f64>::new()
            .run(&Program::new(graph), &feeds)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.data))
            .collect()
    };
    let (a, b) = (run(&g), run(&f));
    for (name, v) in &b {
        for (x, y) in v.iter().zip(&a[name]) {
            assert!(
                (x - y).abs() <= 1e-10 * (1.0 + x.abs()),
                "{name}: {x} vs {y}"
            );
        }
    }
    let r0 = a["recon.layers.0"][0];
    let r2 = a["recon.layers.2"][0];
    assert!((r0 + r2 - b["recon"][0]).abs() < 1e-12 * (1.0 + b["recon"][0].abs()));
    // The step's own update (its `next.*` outputs, which a backend carries into the inputs)
    // is the host's rule applied to the step's errors: from a fresh state (the EMA starts at
    // the error), from a running EMA, and against each bound.
    let bounded = |min, max, kappa| GecoSpec {
        min,
        max,
        kappa,
        ..*gs
    };
    let cases = [
        (*gs, None, [2.0, 2.0]),
        (*gs, Some([0.3, 0.1]), [1.5, 0.7]),
        (
            bounded(Some(0.5), Some(3.0), 10.0),
            Some([0.3, 0.1]),
            [0.5001, 2.9],
        ),
        (
            bounded(Some(0.5), Some(3.0), -1e4),
            Some([0.3, 0.1]),
            [0.5001, 2.9],
        ),
    ];
    for (case, (gspec, ema, lambda)) in cases.into_iter().enumerate() {
        let mut spec = geco.clone();
        spec.objective.lambda = Lambda::Geco { geco: gspec };
        let graph = compile_train(&spec, batch, OptLevel::Full).unwrap().step;
        let mut host = state.clone();
        for (k, layer) in ["layers.0", "layers.2"].into_iter().enumerate() {
            host.lambda.insert(layer.into(), lambda[k]);
            host.ema.insert(layer.into(), ema.map(|e| e[k]));
        }
        let mut fed = feeds.clone();
        for (name, v) in host.feeds(&gspec) {
            fed.insert(name, Arc::new(vec![v]));
        }
        let out: std::collections::HashMap<String, Vec<f64>> = Executor::<f64>::new()
            .run(&Program::new(&graph), &fed)
            .unwrap()
            .into_iter()
            .map(|(k, t)| (k, t.data))
            .collect();
        let names = host.read_back();
        let values: Vec<f64> = names.iter().map(|n| out[n][0]).collect();
        let recon = std::collections::BTreeMap::from([
            ("layers.0".to_string(), values[0]),
            ("layers.2".to_string(), values[1]),
        ]);
        let mut from_graph = host.clone();
        from_graph.take_next(&values[2..]);
        host.update(&gspec, &recon);
        for layer in ["layers.0", "layers.2"] {
            let (want, got) = (host.lambda[layer], from_graph.lambda[layer]);
            assert!(
                (want - got).abs() <= 1e-12 * want,
                "case {case}, {layer}: λ {got}, host {want}"
            );
            let (want, got) = (host.ema[layer].unwrap(), from_graph.ema[layer].unwrap());
            assert!(
                (want - got).abs() <= 1e-12 * want.abs(),
                "case {case}, {layer}: EMA {got}, host {want}"
            );
        }
        if case >= 2 {
            let hit = if gspec.kappa > 0.0 { 0.5 } else { 3.0 };
            assert_eq!(host.lambda["layers.0"], hit, "case {case}: a bound is met");
        }
    }
    // The update rule, by hand.
    let mut s = state.clone();
    let recon = std::collections::BTreeMap::from([
        ("layers.0".to_string(), 0.4),
        ("layers.2".to_string(), 0.2),
    ]);
    s.update(gs, &recon);
    assert!((s.lambda["layers.0"] - 2.0 * (1e-3f64 * 0.4).exp()).abs() < 1e-12);
    s.update(gs, &recon);
    assert_eq!(s.ema["layers.2"], Some(0.2));
    // Bounds: a reconstruction spike stops λ at `max`, a long quiet stretch at `min`.
    let bounded = GecoSpec {
        min: Some(0.5),
        max: Some(3.0),
        kappa: 10.0,
        ..*gs
    };
    let mut s = state.clone();
    let spike = std::collections::BTreeMap::from([
        ("layers.0".to_string(), 5e4),
        ("layers.2".to_string(), 1.0),
    ]);
    s.update(&bounded, &spike);
    assert_eq!(
        s.lambda["layers.0"],
        3.0,
        "unbounded: {}",
        2.0 * 50f64.exp()
    );
    for _ in 0..2000 {
        s.update(&bounded, &recon);
    }
    assert_eq!(s.lambda["layers.2"], 0.5);
    // Within the bounds the update is the unbounded one.
    let mut t = state.clone();
    t.update(&bounded, &recon);
    let want = 2.0 * (1e-3f64 * (0.4 - 10.0)).exp();
    assert!((t.lambda["layers.0"] - want).abs() < 1e-12);
    // Training: λ grows (κ = 0), is logged per layer and saved.
    let data = embedded_mnist().expect("embedded MNIST");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("geco");
    let summary = train::<f32>(&geco, &data, &options(out.clone(), 5)).expect("training");
    let lines = metrics_lines(&out);
    let logged = &lines[0]["lambda"];
    for layer in ["layers.0", "layers.2"] {
        let l = logged[layer]
            .as_f64()
            .unwrap_or_else(|| panic!("λ logged per layer: {}", lines[0]));
        assert!(l > 2.0, "{layer}: λ {l}");
    }
    let (_, meta) = Model::<f64>::load(&summary.checkpoint, None).unwrap();
    let saved: Geco = serde_json::from_str(&meta["geco"]).expect("GECO state saved");
    assert_eq!(
        saved.lambda["layers.0"],
        logged["layers.0"].as_f64().unwrap()
    );
}

/// `train.optimizer.adam.inverse_lr_scale`: after Adam's first step (a sign step: every entry
/// moves by its learning rate, less ε's share) each learned inverse R has moved 4× as far as
/// its W, and the other parameters as far as W. The same spec with scale 1 moves R like W.
#[test]
fn inverse_lr_scale_speeds_up_only_the_learned_inverses() {
    use snfc_runtime::train::LAST_CHECKPOINT;
    let data = embedded_mnist().expect("embedded MNIST");
    let text = |scale: f64| {
        format!(
            r#"{{"name": "s", "input": {{"shape": [784], "preprocess": "dequantize_logit"}},
                "layers": [{{"type": "linear"}}, {{"type": "smooth_leaky_relu"}}, {{"type": "linear"}}],
                "train": {{"batch_size": 50, "warmup_epochs": 0,
                          "optimizer": {{"adam": {{"lr": 1e-3, "inverse_lr_scale": {scale:?}}}}}}}}}"#
        )
    };
    let dir = tempfile::tempdir().unwrap();
    // The median |Δ| over a parameter's entries after one step.
    let moved = |scale: f64| {
        let spec = parse_spec(&text(scale)).unwrap_or_else(|e| panic!("{e}"));
        let before = Model::<f32>::init(&spec, spec.train.seed);
        let out = dir.path().join(format!("scale{scale}"));
        train::<f32>(&spec, &data, &options(out.clone(), 1)).expect("training");
        let (after, _) = Model::<f32>::load(&out.join(LAST_CHECKPOINT), None).expect("last");
        let median = |name: &str| {
            let mut d: Vec<f64> = before
                .get(name)
                .iter()
                .zip(after.get(name).iter())
                .map(|(a, b)| (*a as f64 - *b as f64).abs())
                .collect();
            d.sort_by(f64::total_cmp);
            d[d.len() / 2]
        };
        (
            median("layers.0.weight"),
            median("layers.0.weight_inv"),
            median("layers.2.weight_inv"),
            median("layers.2.bias"),
        )
    };
    let (w, r0, r2, b) = moved(4.0);
    assert!((w / 1e-3 - 1.0).abs() < 0.05, "W moved {w}");
    assert!((b / 1e-3 - 1.0).abs() < 0.05, "bias moved {b}");
    for r in [r0, r2] {
        assert!((r / 4e-3 - 1.0).abs() < 0.05, "R moved {r}, W {w}");
    }
    let (w, r0, _, _) = moved(1.0);
    assert!((r0 / w - 1.0).abs() < 0.05, "scale 1: R {r0}, W {w}");
}

/// The inverse parameters are each self-normalizing layer's R (linear and conv), nothing else:
/// not a coupling network's convs, actnorm or biases.
#[test]
fn learning_rates_scale_exactly_the_learned_inverses() {
    use snfc_runtime::train::LearningRates;
    let spec = spec_file("mnist_glow_geco5x5.json");
    let mut rates = LearningRates::for_spec(&spec, 2.0);
    rates.inverse_scale = 5.0;
    let model = Model::<f32>::init(&spec, 0);
    let mut scaled = 0;
    for p in &model.params {
        let want = if p.name.ends_with(".weight_inv") {
            scaled += 1;
            10.0
        } else {
            2.0
        };
        assert_eq!(rates.of(&p.name), want, "{}", p.name);
    }
    assert_eq!(scaled, 8, "one R per 5×5 conv (2 levels × 4 steps)");
}
