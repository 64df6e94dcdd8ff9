//! Glow's layers through the pipeline, in f64: actnorm's log-density against an independent
//! formula, its inverse round trip, exact gradients against finite differences, the
//! data-dependent initialization (normalized outputs, constant channels reported, the
//! "initialized" state kept in checkpoints).

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::eval_graph;
use snfc_compiler::spec::{parse_spec, FlowSpec};
use snfc_runtime::host::exec::Feeds;
use snfc_runtime::model::{Model, DATA_INITIALIZED};
use snfc_runtime::sample::invert;
use snfc_runtime::train::data_init;
use std::collections::HashMap;
use std::sync::Arc;

mod common;
use common::{check_gradients_fd, perturbed_feeds, run_f64 as run, Rng};

fn spec(text: &str) -> FlowSpec {
    parse_spec(text).unwrap_or_else(|e| panic!("{e}"))
}

fn image_spec(layers: &str, gradient: &str) -> FlowSpec {
    spec(&format!(
        r#"{{"name": "glowish", "input": {{"shape": [2, 4, 4], "preprocess": "none"}},
            "layers": {layers}, "objective": {{"gradient": "{gradient}", "lambda": 1.0}},
            "train": {{"batch_size": 5}}}}"#
    ))
}

/// Parameters away from their initialization, and a batch of shifted, scaled data.
fn feeds(spec: &FlowSpec, batch: usize, rng: &mut Rng) -> Feeds<f64> {
    perturbed_feeds(spec, batch, rng, (0.05, 0.5), |r| 1.5 + 2.0 * r.normal())
}

const LN_2PI: f64 = 1.8378770664093453;

#[test]
fn actnorm_density_is_the_per_channel_affine_map() {
    let s = image_spec(r#"[{"type": "actnorm"}]"#, "exact");
    let batch = 5;
    let mut rng = Rng::new(31);
    let f = feeds(&s, batch, &mut rng);
    let out = run(&eval_graph(&s, batch), &f);
    let (t, ls, x) = (
        &f["layers.0.translation"],
        &f["layers.0.log_scale"],
        &f["x"],
    );
    let (c, hw, d) = (2, 16, 32);
    for n in 0..batch {
        let mut want = -0.5 * d as f64 * LN_2PI;
        for k in 0..c {
            for p in 0..hw {
                let z = (x[(k * hw + p) * batch + n] - t[k]) * (-ls[k]).exp();
                want -= 0.5 * z * z;
            }
            // log |det| of the diagonal Jacobian: H·W entries e^{−s_k} per channel.
            want -= hw as f64 * ls[k];
        }
        let got = out["logp_data"][n];
        assert!((got - want).abs() < 1e-10, "example {n}: {got} vs {want}");
    }
    // Sampling's inverse undoes the forward map.
    let model = Model::<f64> {
        values: f.clone(),
        ..Model::init(&s, 0)
    };
    let mut z = vec![0.0; d * batch];
    for k in 0..c {
        for p in 0..hw {
            for n in 0..batch {
                let i = (k * hw + p) * batch + n;
                z[i] = (x[i] - t[k]) * (-ls[k]).exp();
            }
        }
    }
    let back = invert(&model, &z, batch, false).expect("invertible");
    for (a, b) in back.iter().zip(x.iter()) {
        assert!((a - b).abs() < 1e-12);
    }
}

#[test]
fn glow_like_gradients_match_finite_differences() {
    // actnorm, a self-normalizing conv, actnorm again on the squeezed map: the exact gradients.
    let s = image_spec(
        r#"[{"type": "actnorm"}, {"type": "conv", "kernel_size": 3},
            {"type": "squeeze"}, {"type": "actnorm"}]"#,
        "exact",
    );
    let batch = 3;
    let mut rng = Rng::new(32);
    let f = feeds(&s, batch, &mut rng);
    let c = compile_train(&s, batch, OptLevel::None).expect("compiles");
    let checked = check_gradients_fd(&c.exact, &f, 1e-5);
    for want in [
        "layers.0.translation",
        "layers.0.log_scale",
        "layers.3.log_scale",
    ] {
        assert!(checked.iter().any(|(p, _)| p == want), "{want} not checked");
    }
    // The optimized self-normalizing step equals its unoptimized graph.
    let snf = image_spec(
        r#"[{"type": "actnorm"}, {"type": "conv", "kernel_size": 3},
            {"type": "squeeze"}, {"type": "actnorm"}]"#,
        "self_normalizing",
    );
    let sub = compile_train(&snf, batch, OptLevel::Substitution).expect("compiles");
    let full = compile_train(&snf, batch, OptLevel::Full).expect("compiles");
    let (a, b) = (run(&sub.step, &f), run(&full.step, &f));
    for (name, v) in &a {
        for (x, y) in v.iter().zip(&b[name]) {
            assert!((x - y).abs() < 1e-9 * (1.0 + x.abs()), "{name}: {x} vs {y}");
        }
    }
}

#[test]
fn data_init_normalizes_each_actnorm_input() {
    let s = image_spec(
        r#"[{"type": "actnorm"}, {"type": "conv", "kernel_size": 3}, {"type": "actnorm"}]"#,
        "self_normalizing",
    );
    let batch = 5;
    let mut rng = Rng::new(33);
    let f = feeds(&s, batch, &mut rng);
    let mut model = Model::<f64> {
        values: f.clone(),
        ..Model::init(&s, 0)
    };
    assert!(!model.data_initialized);
    let x = f["x"].to_vec();
    let warnings = data_init(&mut model, &x, None, batch).expect("init");
    assert!(warnings.is_empty(), "{warnings:?}");
    assert!(model.data_initialized);
    // The first actnorm: the batch's per-channel mean and ln(std + ε), computed here.
    let (hw, n) = (16, batch);
    for k in 0..2 {
        let vals: Vec<f64> = (0..hw * n).map(|j| x[k * hw * n + j]).collect();
        let mean = vals.iter().sum::<f64>() / vals.len() as f64;
        let var = vals.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / vals.len() as f64;
        let t = model.get("layers.0.translation")[k];
        let ls = model.get("layers.0.log_scale")[k];
        assert!((t - mean).abs() < 1e-12, "channel {k}: t {t} vs {mean}");
        assert!((ls - (var.sqrt() + 1e-6).ln()).abs() < 1e-12);
    }
    // Every actnorm's output is normalized: in a spec with one more actnorm after each, the
    // extra actnorm's data statistics are the identity's (t ≈ 0, s ≈ ln(1 + ε) ≈ 0).
    let probe = image_spec(
        r#"[{"type": "actnorm"}, {"type": "actnorm"}, {"type": "conv", "kernel_size": 3},
            {"type": "actnorm"}, {"type": "actnorm"}]"#,
        "self_normalizing",
    );
    let mut pm = Model::<f64>::init(&probe, 0);
    let conv = model.values["layers.1.weight"].clone();
    pm.values.insert("layers.2.weight".to_string(), conv);
    data_init(&mut pm, &x, None, batch).expect("init");
    for name in ["layers.1", "layers.4"] {
        for v in pm.get(&format!("{name}.translation")) {
            assert!(v.abs() < 1e-9, "{name}: mean {v}");
        }
        for v in pm.get(&format!("{name}.log_scale")) {
            assert!(v.abs() < 1e-5, "{name}: log std {v}");
        }
    }
    // A constant channel is reported, and its scale stays finite.
    let mut flat = Model::<f64>::init(&s, 0);
    let mut xc = x.clone();
    xc[..hw * n].iter_mut().for_each(|v| *v = 3.0);
    let warnings = data_init(&mut flat, &xc, None, batch).expect("init");
    assert!(
        warnings
            .iter()
            .any(|w| w.contains("layers.0") && w.contains("channel 0")),
        "{warnings:?}"
    );
    assert!(flat.get("layers.0.log_scale").iter().all(|v| v.is_finite()));
}

#[test]
fn checkpoints_keep_the_initialized_state() {
    let s = image_spec(r#"[{"type": "actnorm"}]"#, "exact");
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("m.safetensors");
    let fresh = Model::<f64>::init(&s, 0);
    assert!(!fresh.data_initialized);
    fresh.save(&path, &[], HashMap::new()).expect("save");
    let (loaded, meta) = Model::<f64>::load(&path, None).expect("load");
    assert_eq!(
        meta.get(DATA_INITIALIZED).map(String::as_str),
        Some("false")
    );
    assert!(!loaded.data_initialized);
    let mut done = fresh.clone();
    done.data_initialized = true;
    done.save(&path, &[], HashMap::new()).expect("save");
    let (loaded, _) = Model::<f64>::load(&path, None).expect("load");
    assert!(loaded.data_initialized);
    // A spec without actnorm needs no initialization.
    let plain = image_spec(r#"[{"type": "conv", "kernel_size": 1}]"#, "exact");
    assert!(Model::<f64>::init(&plain, 0).data_initialized);
}

/// The coupling's forward map, from the runtime's own host formula (`sample::coupling_net`,
/// written apart from the IR lowering): `(z, log_s)` for one batch `x` `[C·H·W, n]`.
fn coupling_forward(
    f: &Feeds<f64>,
    layer: usize,
    x: &[f64],
    (c, hh, ww, n): (usize, usize, usize, usize),
    width: usize,
) -> (Vec<f64>, Vec<f64>) {
    use snfc_compiler::ir::lower::param_name;
    let param = |kind| f[&param_name(layer, kind)].to_vec();
    let half = (c / 2) * hh * ww * n;
    let (x1, x2) = x.split_at(half);
    let (log_s, t) = snfc_runtime::sample::coupling_net(&param, x1, (c, hh, ww, n), width);
    let mut z = x1.to_vec();
    z.extend(
        x2.iter()
            .zip(&log_s)
            .zip(&t)
            .map(|((x, l), t)| x * l.exp() + t),
    );
    (z, log_s)
}

#[test]
fn affine_coupling_density_log_det_and_inverse() {
    let s = image_spec(r#"[{"type": "affine_coupling", "width": 3}]"#, "exact");
    let batch = 4;
    let mut rng = Rng::new(34);
    let f = feeds(&s, batch, &mut rng);
    let dims = (2, 4, 4, batch);
    let x = f["x"].to_vec();
    let (z, log_s) = coupling_forward(&f, 0, &x, dims, 3);
    // The flow's log-density against ln N(z) + Σ log_s per example.
    let out = run(&eval_graph(&s, batch), &f);
    for n in 0..batch {
        let col = |v: &[f64], j: usize| v[j * batch + n];
        let zz: f64 = (0..32).map(|j| col(&z, j).powi(2)).sum();
        let ld: f64 = (0..16).map(|j| col(&log_s, j)).sum();
        let want = -0.5 * zz - 16.0 * LN_2PI + ld;
        let got = out["logp_data"][n];
        assert!((got - want).abs() < 1e-9, "example {n}: {got} vs {want}");
    }
    // Σ log_s is ln|det| of the map's Jacobian (central differences, one example).
    let one = |x1: &[f64]| coupling_forward(&f, 0, x1, (2, 4, 4, 1), 3).0;
    let x0: Vec<f64> = (0..32).map(|j| x[j * batch]).collect();
    let mut jac = vec![0.0; 32 * 32];
    let h = 1e-6;
    for j in 0..32 {
        let (mut a, mut b) = (x0.clone(), x0.clone());
        a[j] += h;
        b[j] -= h;
        let (fa, fb) = (one(&a), one(&b));
        for i in 0..32 {
            jac[i * 32 + j] = (fa[i] - fb[i]) / (2.0 * h);
        }
    }
    let (_, ln_det) = snfc_runtime::host::linalg::slogdet(&jac, 32);
    let (_, ls1) = coupling_forward(&f, 0, &x0, (2, 4, 4, 1), 3);
    let want: f64 = ls1.iter().sum();
    assert!((ln_det - want).abs() < 1e-6, "{ln_det} vs {want}");
    // Sampling's inverse undoes the forward map.
    let model = Model::<f64> {
        values: f.clone(),
        ..Model::init(&s, 0)
    };
    let back = invert(&model, &z, batch, false).expect("invertible");
    for (a, b) in back.iter().zip(&x) {
        assert!((a - b).abs() < 1e-10, "{a} vs {b}");
    }
    // A fresh coupling (net.2 at zero) is the identity.
    let fresh = Model::<f64>::init(&s, 1);
    let mut ff = fresh.values.clone();
    ff.insert("x".into(), f["x"].clone());
    let (z0, ls0) = coupling_forward(&ff, 0, &x, dims, 3);
    assert_eq!(z0, x);
    assert!(ls0.iter().all(|v| *v == 0.0));
}

#[test]
fn glow_step_gradients_match_finite_differences() {
    // One Glow step on a squeezed map: actnorm, 1×1 self-normalizing conv, affine coupling.
    let layers = r#"[{"type": "squeeze"}, {"type": "actnorm"},
                     {"type": "conv", "kernel_size": 1, "bias": false},
                     {"type": "affine_coupling", "width": 4}]"#;
    let s = image_spec(layers, "exact");
    let batch = 3;
    let mut rng = Rng::new(35);
    let f = feeds(&s, batch, &mut rng);
    let c = compile_train(&s, batch, OptLevel::None).expect("compiles");
    let checked = check_gradients_fd(&c.exact, &f, 1e-5);
    for want in [
        "layers.3.net.0.weight",
        "layers.3.net.1.bias",
        "layers.3.net.2.weight",
        "layers.3.net.2.logs",
        "layers.2.weight",
        "layers.1.log_scale",
    ] {
        assert!(checked.iter().any(|(p, _)| p == want), "{want} not checked");
    }
    // The self-normalizing step: optimized equals substituted, and no inverse is left.
    let snf = image_spec(layers, "self_normalizing");
    let sub = compile_train(&snf, batch, OptLevel::Substitution).expect("compiles");
    let full = compile_train(&snf, batch, OptLevel::Full).expect("compiles");
    let text = full.step.to_text();
    assert!(
        !text.contains("= inverse") && !text.contains("= logdet"),
        "{text}"
    );
    let (a, b) = (run(&sub.step, &f), run(&full.step, &f));
    for (name, v) in &a {
        for (x, y) in v.iter().zip(&b[name]) {
            assert!((x - y).abs() < 1e-9 * (1.0 + x.abs()), "{name}: {x} vs {y}");
        }
    }
}

#[test]
fn split_scores_the_factored_half_and_sampling_draws_it_back() {
    // A split alone: every coordinate ends under N(0, I) — the constants must add up.
    let s = image_spec(r#"[{"type": "split"}]"#, "exact");
    let batch = 3;
    let mut rng = Rng::new(36);
    let f = feeds(&s, batch, &mut rng);
    let out = run(&eval_graph(&s, batch), &f);
    let x = &f["x"];
    for n in 0..batch {
        let xx: f64 = (0..32).map(|j| x[j * batch + n].powi(2)).sum();
        let want = -0.5 * xx - 16.0 * LN_2PI;
        assert!((out["logp_data"][n] - want).abs() < 1e-10);
    }
    // split then actnorm: latent = [actnorm(x1); x2]; sampling puts x2 back after x1.
    let s = image_spec(r#"[{"type": "split"}, {"type": "actnorm"}]"#, "exact");
    let f = feeds(&s, batch, &mut rng);
    assert_eq!(s.layer_shapes()[1].numel(), 16);
    let model = Model::<f64> {
        values: f.clone(),
        ..Model::init(&s, 0)
    };
    let z: Vec<f64> = (0..32 * batch).map(|_| rng.normal()).collect();
    let x = invert(&model, &z, batch, false).expect("invertible");
    let (t, ls) = (&f["layers.1.translation"], &f["layers.1.log_scale"]);
    for j in 0..16 {
        for n in 0..batch {
            let k = j / 16; // one channel of 16 positions in the kept half
            let want = z[j * batch + n] * ls[k].exp() + t[k];
            assert!((x[j * batch + n] - want).abs() < 1e-12);
            assert_eq!(x[(16 + j) * batch + n], z[(16 + j) * batch + n]);
        }
    }
    // The evaluated density of the sample is that of its latent plus the actnorm's log-det.
    let mut fx = f.clone();
    fx.insert("x".into(), Arc::new(x));
    let out = run(&eval_graph(&s, batch), &fx);
    for n in 0..batch {
        let zz: f64 = (0..32).map(|j| z[j * batch + n].powi(2)).sum();
        let want = -0.5 * zz - 16.0 * LN_2PI - 16.0 * ls[0];
        assert!((out["logp_data"][n] - want).abs() < 1e-9);
    }
    // Exact gradients through a multiscale flow.
    let s = image_spec(
        r#"[{"type": "squeeze"}, {"type": "affine_coupling", "width": 2}, {"type": "split"},
            {"type": "conv", "kernel_size": 1}, {"type": "actnorm"}]"#,
        "exact",
    );
    let f = feeds(&s, batch, &mut rng);
    let c = compile_train(&s, batch, OptLevel::None).expect("compiles");
    let checked = check_gradients_fd(&c.exact, &f, 1e-5);
    assert!(checked.iter().any(|(p, _)| p == "layers.1.net.2.weight"));
    assert!(checked.iter().any(|(p, _)| p == "layers.3.weight"));
}

#[test]
fn pointwise_conv_log_det_and_exact_inverse_take_the_small_matrix() {
    use snfc_runtime::host::linalg::slogdet;
    use snfc_runtime::host::shape_ops::{conv2d, toeplitz};
    let s = image_spec(
        r#"[{"type": "conv", "kernel_size": 1, "bias": false}]"#,
        "exact",
    );
    let mut rng = Rng::new(37);
    let f = feeds(&s, 2, &mut rng);
    let model = Model::<f64> {
        values: f.clone(),
        ..Model::init(&s, 0)
    };
    let w = f["layers.0.weight"].to_vec();
    // H·W·ln|det W| against one LU of the dense 32 × 32 Toeplitz matrix.
    let dense = slogdet(&toeplitz(&w, &[2, 2, 1, 1], 4, 4), 32).1;
    let got = snfc_runtime::eval::logdet_sum(&model);
    assert!((got - dense).abs() < 1e-10, "{got} vs {dense}");
    // The exact inverse, applied forward again, gives back z.
    let n = 3;
    let z: Vec<f64> = (0..32 * n).map(|_| rng.normal()).collect();
    let x = invert(&model, &z, n, true).expect("invertible");
    let back = conv2d(&x, &[2, 4, 4, n], &w, &[2, 2, 1, 1]);
    for (a, b) in back.iter().zip(&z) {
        assert!((a - b).abs() < 1e-10);
    }
}

#[test]
fn temperature_scales_the_latent() {
    // Through an actnorm (x = z·e^s + t), temperature T scales each sample's offset from t.
    let s = image_spec(r#"[{"type": "actnorm"}]"#, "exact");
    let mut rng = Rng::new(38);
    let f = feeds(&s, 1, &mut rng);
    let model = Model::<f64> {
        values: f.clone(),
        ..Model::init(&s, 0)
    };
    let one = snfc_runtime::sample::sample_at(&model, 4, 9, false, 1.0).unwrap();
    let cold = snfc_runtime::sample::sample_at(&model, 4, 9, false, 0.25).unwrap();
    assert_eq!(
        one,
        snfc_runtime::sample::sample(&model, 4, 9, false).unwrap()
    );
    let t = &f["layers.0.translation"];
    for (i, (a, b)) in one.iter().zip(&cold).enumerate() {
        let tc = t[i % 32 / 16];
        assert!(((b - tc) - 0.25 * (a - tc)).abs() < 1e-12);
    }
}

/// The self-normalizing Glow step composes the closed forms: with every learned inverse exact
/// (R = W⁻¹ for each 1×1 conv) the reconstruction vanishes and the g-flow is the f-flow, so the
/// SNF gradient of each conv's W is half the exact gradient (−½(δ xᵀ + Rᵀ) with Rᵀ = W⁻ᵀ),
/// and every parameter both flows share (actnorm, coupling networks) gets the exact gradient.
#[test]
fn snf_glow_gradients_compose_the_closed_forms() {
    let layers = r#"[{"type": "squeeze"}, {"type": "actnorm"},
                     {"type": "conv", "kernel_size": 1, "bias": false},
                     {"type": "affine_coupling", "width": 3}, {"type": "split"},
                     {"type": "conv", "kernel_size": 1, "bias": false}, {"type": "actnorm"}]"#;
    let (exact, snf) = (
        image_spec(layers, "exact"),
        image_spec(layers, "self_normalizing"),
    );
    let batch = 3;
    let mut rng = Rng::new(39);
    let mut f = feeds(&exact, batch, &mut rng);
    for (layer, c) in [(2, 8), (5, 4)] {
        let w = f[&format!("layers.{layer}.weight")].to_vec();
        let r = snfc_runtime::host::linalg::inverse(&w, c).expect("invertible");
        f.insert(format!("layers.{layer}.weight_inv"), Arc::new(r));
    }
    let want = run(
        &compile_train(&exact, batch, OptLevel::None)
            .expect("compiles")
            .exact,
        &f,
    );
    let got = run(
        &compile_train(&snf, batch, OptLevel::Full)
            .expect("compiles")
            .step,
        &f,
    );
    let mut compared = 0;
    for (name, g) in &got {
        let Some(p) = name.strip_prefix("grad.") else {
            continue;
        };
        if p.ends_with("weight_inv") {
            continue;
        }
        let half = if p == "layers.2.weight" || p == "layers.5.weight" {
            0.5
        } else {
            1.0
        };
        let e = &want[name];
        let scale = e.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        for (a, b) in g.iter().zip(e) {
            assert!(
                (a - half * b).abs() <= 1e-8 * scale,
                "{p}: {a} vs {half}·{b}"
            );
        }
        compared += 1;
    }
    assert!(compared >= 10, "{compared} gradients compared");
}

/// Actnorm on a flat input normalizes each element (its own channel): the density formula with
/// H·W = 1, and the data-dependent initialization per element.
#[test]
fn actnorm_on_a_flat_input_is_per_element() {
    let s = spec(
        r#"{"name": "flat", "input": {"shape": [5], "preprocess": "none"},
            "layers": [{"type": "actnorm"}], "objective": {"gradient": "exact"}}"#,
    );
    let batch = 4;
    let mut rng = Rng::new(40);
    let f = feeds(&s, batch, &mut rng);
    assert_eq!(f["layers.0.log_scale"].len(), 5);
    let out = run(&eval_graph(&s, batch), &f);
    let (t, ls, x) = (
        &f["layers.0.translation"],
        &f["layers.0.log_scale"],
        &f["x"],
    );
    for n in 0..batch {
        let mut want = -2.5 * LN_2PI;
        for k in 0..5 {
            let z = (x[k * batch + n] - t[k]) * (-ls[k]).exp();
            want -= 0.5 * z * z + ls[k];
        }
        assert!((out["logp_data"][n] - want).abs() < 1e-10);
    }
    let mut m = Model::<f64>::init(&s, 0);
    data_init(&mut m, &x.to_vec(), None, batch).expect("init");
    for k in 0..5 {
        let mean = (0..batch).map(|n| x[k * batch + n]).sum::<f64>() / batch as f64;
        assert!((m.get("layers.0.translation")[k] - mean).abs() < 1e-12);
    }
}
