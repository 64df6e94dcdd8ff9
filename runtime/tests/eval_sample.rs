//! Exact evaluation and sampling against independent computations written here with plain
//! loops: a forward pass of the f-flow, determinants by Gaussian elimination with partial
//! pivoting and inverses by Gauss–Jordan elimination (none of the runtime's linear algebra).
//!
//! Layouts follow the runtime: matrices are row-major, `z = W h + b`; `sample` draws z as a
//! `[D, n]` array (one column per sample) from `ChaCha8Rng::seed_from_u64(seed)` with
//! `StandardNormal`, and returns the samples as rows.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use snfc_compiler::spec::{parse_spec, FlowSpec, LayerSpec, Preprocess};
use snfc_runtime::batch::fill_uniform;
use snfc_runtime::data::Split;
use snfc_runtime::eval::{evaluate, log_likelihoods, log_likelihoods_of, logdet_sum};
use snfc_runtime::model::Model;
use snfc_runtime::sample::{invert, sample};
use std::sync::Arc;

mod common;
use common::Rng;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A small flow: linear(bias) → smooth leaky ReLU(α) → linear(bias), input shape [d].
fn small_spec(d: usize, preprocess: &str, alpha: f64, gradient: &str) -> FlowSpec {
    parse_spec(&format!(
        r#"{{
            "name": "small_{d}_{preprocess}",
            "input": {{"shape": [{d}], "preprocess": "{preprocess}"}},
            "layers": [
                {{"type": "linear", "bias": true}},
                {{"type": "smooth_leaky_relu", "alpha": {alpha}}},
                {{"type": "linear", "bias": true}}
            ],
            "objective": {{"gradient": "{gradient}", "lambda": 1.0}},
            "train": {{"batch_size": 4, "epochs": 1, "warmup_epochs": 0, "seed": 3}}
        }}"#
    ))
    .expect("valid test spec")
}

/// `Model::init` with every parameter perturbed well away from the identity initialization:
/// W = I + `w_noise`·N(0,1), R = I + 0.2·N(0,1) (unrelated to W), b = 0.5·N(0,1).
fn perturbed_model(spec: &FlowSpec, seed: u64, w_noise: f64) -> Model<f64> {
    let mut model = Model::<f64>::init(spec, seed);
    let d = spec.input.dim();
    let mut rng = Rng::new(seed);
    for p in model.params.clone() {
        let v: Vec<f64> = if p.name.ends_with(".bias") {
            (0..d).map(|_| 0.5 * rng.normal()).collect()
        } else {
            let noise = if p.name.ends_with(".weight") {
                w_noise
            } else {
                0.2
            };
            (0..d * d)
                .map(|i| if i / d == i % d { 1.0 } else { 0.0 } + noise * rng.normal())
                .collect()
        };
        model.values.insert(p.name.clone(), Arc::new(v));
    }
    model
}

fn param(model: &Model<f64>, name: &str) -> Vec<f64> {
    model.values[name].to_vec()
}

/// ln|det A| of a row-major n×n matrix by Gaussian elimination with partial pivoting.
fn ln_abs_det(a: &[f64], n: usize) -> f64 {
    let mut m = a.to_vec();
    let mut acc = 0.0;
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| m[i * n + col].abs().total_cmp(&m[j * n + col].abs()))
            .unwrap();
        assert!(m[piv * n + col] != 0.0, "singular matrix");
        if piv != col {
            for k in 0..n {
                m.swap(piv * n + k, col * n + k);
            }
        }
        let p = m[col * n + col];
        acc += p.abs().ln();
        for i in col + 1..n {
            let f = m[i * n + col] / p;
            for k in col..n {
                m[i * n + k] -= f * m[col * n + k];
            }
        }
    }
    acc
}

/// A⁻¹ of a row-major n×n matrix by Gauss–Jordan elimination with partial pivoting.
fn gauss_jordan_inverse(a: &[f64], n: usize) -> Vec<f64> {
    let mut m = a.to_vec();
    let mut inv: Vec<f64> = (0..n * n)
        .map(|i| if i / n == i % n { 1.0 } else { 0.0 })
        .collect();
    for col in 0..n {
        let piv = (col..n)
            .max_by(|&i, &j| m[i * n + col].abs().total_cmp(&m[j * n + col].abs()))
            .unwrap();
        for k in 0..n {
            m.swap(piv * n + k, col * n + k);
            inv.swap(piv * n + k, col * n + k);
        }
        let p = m[col * n + col];
        assert!(p != 0.0, "singular matrix");
        for k in 0..n {
            m[col * n + k] /= p;
            inv[col * n + k] /= p;
        }
        for i in 0..n {
            if i != col {
                let f = m[i * n + col];
                for k in 0..n {
                    m[i * n + k] -= f * m[col * n + k];
                    inv[i * n + k] -= f * inv[col * n + k];
                }
            }
        }
    }
    inv
}

fn softplus(x: f64) -> f64 {
    if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The f-flow applied to one preprocessed example `h0`: returns z_K, the sum of the
/// per-example activation log-derivatives, and Σ_k ‖R_k W_k h_k − h_k‖².
fn forward(model: &Model<f64>, h0: &[f64]) -> (Vec<f64>, f64, f64) {
    let d = h0.len();
    let mut h = h0.to_vec();
    let mut act_logdet = 0.0;
    let mut recon = 0.0;
    for (i, layer) in model.spec.layers.iter().enumerate() {
        match layer {
            LayerSpec::Linear(l) => {
                let w = param(model, &format!("layers.{i}.weight"));
                let r = param(model, &format!("layers.{i}.weight_inv"));
                let wh: Vec<f64> = (0..d)
                    .map(|a| (0..d).map(|c| w[a * d + c] * h[c]).sum())
                    .collect();
                for a in 0..d {
                    let rwh: f64 = (0..d).map(|c| r[a * d + c] * wh[c]).sum();
                    recon += (rwh - h[a]).powi(2);
                }
                let b = if l.bias {
                    param(model, &format!("layers.{i}.bias"))
                } else {
                    vec![0.0; d]
                };
                h = (0..d).map(|a| wh[a] + b[a]).collect();
            }
            LayerSpec::SmoothLeakyRelu(a) => {
                let al = a.alpha;
                for v in h.iter_mut() {
                    act_logdet += (al + (1.0 - al) * sigmoid(*v)).ln();
                    *v = al * *v + (1.0 - al) * softplus(*v);
                }
            }
            other => panic!("this reference covers FC flows only, not {other:?}"),
        }
    }
    (h, act_logdet, recon)
}

/// Σ_k ln|det W_k| with this file's own elimination.
fn own_logdet_sum(model: &Model<f64>) -> f64 {
    let d = model.spec.input.dim();
    model
        .spec
        .layers
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l, LayerSpec::Linear(_)))
        .map(|(i, _)| ln_abs_det(&param(model, &format!("layers.{i}.weight")), d))
        .sum()
}

/// Independent ln p(x) of one raw example (`u` = its dequantization noise for 8-bit specs) and
/// its reconstruction error.
fn reference_logp(model: &Model<f64>, x: &[f64], u: Option<&[f64]>) -> (f64, f64) {
    let d = x.len();
    let (h0, pre_logdet) = match model.spec.input.preprocess {
        Preprocess::None => (x.to_vec(), 0.0),
        Preprocess::DequantizeLogit => {
            let a = model.spec.input.logit_alpha;
            let u = u.expect("noise for an 8-bit spec");
            let mut h0 = Vec::with_capacity(d);
            let mut ld = 0.0;
            for k in 0..d {
                let y = (x[k] + u[k]) / 256.0;
                let s = a + (1.0 - 2.0 * a) * y;
                h0.push(s.ln() - (1.0 - s).ln());
                ld += -(256f64.ln()) + (1.0 - 2.0 * a).ln() - s.ln() - (1.0 - s).ln();
            }
            (h0, ld)
        }
    };
    let (z, act, recon) = forward(model, &h0);
    let base = -0.5 * z.iter().map(|v| v * v).sum::<f64>()
        - 0.5 * d as f64 * (2.0 * std::f64::consts::PI).ln();
    (base + act + own_logdet_sum(model) + pre_logdet, recon)
}

fn split_of(rows: &[f64], d: usize) -> Split {
    Split {
        n: rows.len() / d,
        dim: d,
        values: rows.iter().map(|&v| v as f32).collect(),
    }
}

fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
    assert!(
        (got - want).abs() <= tol * want.abs().max(1.0),
        "{what}: got {got}, expected {want} (difference {:e})",
        (got - want).abs()
    );
}

// ---------------------------------------------------------------------------------------------
// Evaluation
// ---------------------------------------------------------------------------------------------

#[test]
fn logdet_sum_matches_gaussian_elimination() {
    let spec = small_spec(5, "none", 0.3, "self_normalizing");
    for seed in 0..4 {
        let model = perturbed_model(&spec, seed, 0.4);
        assert_close(
            logdet_sum(&model),
            own_logdet_sum(&model),
            1e-10,
            "Σ ln|det W|",
        );
    }
    // A negative determinant (two rows of W swapped): ln|det| is unchanged.
    let mut model = perturbed_model(&spec, 9, 0.4);
    let before = own_logdet_sum(&model);
    let mut w = param(&model, "layers.0.weight");
    for k in 0..5 {
        w.swap(k, 5 + k);
    }
    model.values.insert("layers.0.weight".into(), Arc::new(w));
    assert_close(
        own_logdet_sum(&model),
        before,
        1e-12,
        "own ln|det| after a row swap",
    );
    assert_close(
        logdet_sum(&model),
        before,
        1e-10,
        "Σ ln|det W| with det W < 0",
    );
}

#[test]
fn evaluate_matches_independent_log_likelihood_without_preprocessing() {
    let d = 5;
    let spec = small_spec(d, "none", 0.3, "self_normalizing");
    let model = perturbed_model(&spec, 11, 0.4);
    // Some W has a negative determinant for this seed or not: either way ln|det| must match.
    let mut rng = Rng::new(99);
    let n = 7;
    // Values exactly representable in f32 (the split stores f32).
    let rows: Vec<f64> = (0..n * d)
        .map(|_| ((2.0 * rng.normal()) as f32) as f64)
        .collect();
    let split = split_of(&rows, d);

    // batch 3 over 7 examples: two full batches and a padded one.
    let (logp, recon) = log_likelihoods(&model, &split, 3, 0).expect("log-likelihoods");
    assert_eq!(logp.len(), n);
    let recon = recon.expect("self-normalizing specs report recon");
    assert_eq!(recon.len(), n);
    let mut want_sum = 0.0;
    let mut recon_sum = 0.0;
    for e in 0..n {
        let (want, want_recon) = reference_logp(&model, &rows[e * d..(e + 1) * d], None);
        assert_close(logp[e], want, 1e-9, &format!("ln p(x) of example {e}"));
        assert_close(recon[e], want_recon, 1e-9, &format!("recon of example {e}"));
        want_sum += want;
        recon_sum += want_recon;
    }

    // Batch size must not matter.
    for batch in [1, 7, 100] {
        let (other, _) = log_likelihoods(&model, &split, batch, 0).expect("log-likelihoods");
        for e in 0..n {
            assert_close(
                other[e],
                logp[e],
                1e-12,
                &format!("batch {batch}, example {e}"),
            );
        }
    }

    let r = evaluate(&model, &split, 3, 0).expect("evaluate");
    assert_eq!(r.examples, n);
    assert_close(r.nll_nats, -want_sum / n as f64, 1e-9, "nll_nats");
    assert_close(
        r.bits_per_dim,
        r.nll_nats / (d as f64 * std::f64::consts::LN_2),
        1e-12,
        "bits/dim",
    );
    assert_close(
        r.recon.expect("recon"),
        recon_sum / n as f64,
        1e-9,
        "mean recon",
    );
}

#[test]
fn evaluate_exact_spec_has_no_recon() {
    let d = 4;
    let spec = small_spec(d, "none", 0.5, "exact");
    let model = perturbed_model(&spec, 5, 0.3);
    let rows: Vec<f64> = (0..3 * d).map(|i| (i as f64 - 5.0) / 4.0).collect();
    let split = split_of(&rows, d);
    let (logp, recon) = log_likelihoods(&model, &split, 2, 0).expect("log-likelihoods");
    assert!(recon.is_none());
    for e in 0..3 {
        let (want, _) = reference_logp(&model, &rows[e * d..(e + 1) * d], None);
        assert_close(logp[e], want, 1e-9, &format!("ln p(x) of example {e}"));
    }
    assert!(evaluate(&model, &split, 2, 0).unwrap().recon.is_none());
}

#[test]
fn evaluate_matches_independent_log_likelihood_with_dequantization() {
    let d = 5;
    let spec = small_spec(d, "dequantize_logit", 0.3, "self_normalizing");
    let model = perturbed_model(&spec, 21, 0.3);
    let n = 7;
    let batch = 3;
    let mut rng = Rng::new(5);
    // 8-bit values including both extremes.
    let mut rows: Vec<f64> = (0..n * d).map(|_| (rng.next_u64() % 256) as f64).collect();
    rows[0] = 0.0;
    rows[1] = 255.0;
    rows[d] = 255.0;
    rows[d + 1] = 0.0;
    let split = split_of(&rows, d);
    let seed = 1234;

    // The noise the runtime draws: D uniforms per example, example after example, from
    // ChaCha8Rng::seed_from_u64(seed), whatever the batch.
    let mut noise_rng = ChaCha8Rng::seed_from_u64(seed);
    let noise: Vec<Vec<f64>> = (0..n)
        .map(|_| {
            let mut u = vec![0.0f64; d];
            fill_uniform(&mut noise_rng, &mut u);
            u
        })
        .collect();

    let (logp, recon) = log_likelihoods(&model, &split, batch, seed).expect("log-likelihoods");
    let recon = recon.expect("recon");
    let mut want_sum = 0.0;
    for e in 0..n {
        let (want, want_recon) = reference_logp(&model, &rows[e * d..(e + 1) * d], Some(&noise[e]));
        assert_close(
            logp[e],
            want,
            1e-9,
            &format!("ln p(x) of 8-bit example {e}"),
        );
        assert_close(
            recon[e],
            want_recon,
            1e-9,
            &format!("recon of 8-bit example {e}"),
        );
        want_sum += want;
    }

    // Same seed, same noise: repeatable. Another seed: other noise, other values.
    let (again, _) = log_likelihoods(&model, &split, batch, seed).unwrap();
    assert_eq!(again, logp);
    let (other, _) = log_likelihoods(&model, &split, batch, seed + 1).unwrap();
    assert!(
        other.iter().zip(&logp).any(|(a, b)| a != b),
        "the noise seed has no effect"
    );

    // Any batch, including one past the data and the whole data in one batch, sees the same
    // noise per example, so the same likelihoods.
    for other_batch in [1, 2, 4, n, n + 5] {
        let (at, _) = log_likelihoods(&model, &split, other_batch, seed).unwrap();
        for e in 0..n {
            assert_close(
                at[e],
                logp[e],
                1e-12,
                &format!("example {e} at batch {other_batch}"),
            );
        }
    }

    // Ranges evaluated apart (one per rank) see the noise the whole split's examples see.
    let (head, _) = log_likelihoods_of(&model, &split, 0..3, 2, seed).unwrap();
    let (tail, _) = log_likelihoods_of(&model, &split, 3..n, 2, seed).unwrap();
    for (e, v) in head.iter().chain(&tail).enumerate() {
        assert_close(
            *v,
            logp[e],
            1e-12,
            &format!("example {e} evaluated in a range"),
        );
    }

    let r = evaluate(&model, &split, batch, seed).unwrap();
    assert_close(r.nll_nats, -want_sum / n as f64, 1e-9, "nll_nats (8-bit)");
    assert_close(
        r.bits_per_dim,
        r.nll_nats / (d as f64 * std::f64::consts::LN_2),
        1e-12,
        "bits/dim",
    );
}

// ---------------------------------------------------------------------------------------------
// Sampling
// ---------------------------------------------------------------------------------------------

/// The z that `sample(model, n, seed, _)` draws, as rows (sample j = row j).
fn drawn_z(d: usize, n: usize, seed: u64) -> Vec<Vec<f64>> {
    use rand::RngExt;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let cols: Vec<f64> = (0..d * n)
        .map(|_| rng.sample(rand_distr::StandardNormal))
        .collect();
    (0..n)
        .map(|j| (0..d).map(|k| cols[k * n + j]).collect())
        .collect()
}

#[test]
fn exact_inverse_samples_map_forward_to_the_drawn_z() {
    let d = 5;
    let spec = small_spec(d, "none", 0.3, "self_normalizing");
    let model = perturbed_model(&spec, 8, 0.3);
    let (n, seed) = (9, 42);
    let rows = sample(&model, n, seed, true).expect("sample");
    assert_eq!(rows.len(), n * d);
    assert!(rows.iter().all(|v| v.is_finite()), "non-finite sample");
    let z = drawn_z(d, n, seed);
    for j in 0..n {
        let (fx, _, _) = forward(&model, &rows[j * d..(j + 1) * d]);
        for k in 0..d {
            assert_close(fx[k], z[j][k], 1e-9, &format!("f(sample {j})[{k}]"));
        }
    }
    // Deterministic in the seed, different across seeds.
    assert_eq!(sample(&model, n, seed, true).unwrap(), rows);
    assert_ne!(sample(&model, n, seed + 1, true).unwrap(), rows);
}

#[test]
fn learned_inverse_equals_exact_inverse_when_r_is_w_inverse() {
    let d = 5;
    let spec = small_spec(d, "none", 0.3, "self_normalizing");
    let mut model = perturbed_model(&spec, 13, 0.3);
    for i in [0, 2] {
        let w = param(&model, &format!("layers.{i}.weight"));
        model.values.insert(
            format!("layers.{i}.weight_inv"),
            Arc::new(gauss_jordan_inverse(&w, d)),
        );
    }
    let (n, seed) = (6, 7);
    let learned = sample(&model, n, seed, false).expect("learned-inverse sample");
    let exact = sample(&model, n, seed, true).expect("exact-inverse sample");
    assert!(learned.iter().chain(&exact).all(|v| v.is_finite()));
    for (i, (a, b)) in learned.iter().zip(&exact).enumerate() {
        assert_close(*a, *b, 1e-9, &format!("sample value {i}"));
    }
    // With R = W⁻¹ the reconstruction error vanishes.
    let split = split_of(&learned, d);
    let r = evaluate(&model, &split, n, 0).unwrap();
    assert!(r.recon.unwrap() < 1e-18, "recon {:?}", r.recon);

    // And `invert` is the inverse of the forward pass on arbitrary z (columns).
    let z: Vec<f64> = (0..d * 2).map(|i| (i as f64 - 4.5) / 2.0).collect();
    let x = invert(&model, &z, 2, false).unwrap();
    for j in 0..2 {
        let xj: Vec<f64> = (0..d).map(|k| x[k * 2 + j]).collect();
        let (fx, _, _) = forward(&model, &xj);
        for k in 0..d {
            assert_close(
                fx[k],
                z[k * 2 + j],
                1e-9,
                &format!("f(invert(z))[{k}] of column {j}"),
            );
        }
    }
}

#[test]
fn learned_inverse_differs_from_exact_when_r_is_not_w_inverse() {
    // Guards the previous test against `exact` being ignored.
    let d = 4;
    let spec = small_spec(d, "none", 0.3, "self_normalizing");
    let model = perturbed_model(&spec, 2, 0.3);
    let learned = sample(&model, 3, 1, false).unwrap();
    let exact = sample(&model, 3, 1, true).unwrap();
    assert!(learned.iter().all(|v| v.is_finite()));
    let diff = learned
        .iter()
        .zip(&exact)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0, f64::max);
    assert!(
        diff > 1e-3,
        "learned and exact inverse agree although R ≠ W⁻¹ (max diff {diff})"
    );
}

#[test]
fn dequantized_samples_are_finite_and_in_pixel_range() {
    let d = 16;
    let spec = small_spec(d, "dequantize_logit", 0.3, "self_normalizing");
    for model in [Model::<f64>::init(&spec, 0), perturbed_model(&spec, 4, 0.1)] {
        for exact in [false, true] {
            let rows = sample(&model, 5, 3, exact).expect("sample");
            assert_eq!(rows.len(), 5 * d);
            for v in &rows {
                assert!(
                    v.is_finite() && (-1e-6..=256.0 + 1e-6).contains(v),
                    "sample value {v}"
                );
            }
        }
    }
}

#[test]
fn deeper_flow_with_and_without_biases() {
    // linear(no bias) → s(0.1) → linear(bias) → s(0.7) → linear(no bias), D = 6.
    let d = 6;
    let spec = parse_spec(
        r#"{
            "name": "deeper",
            "input": {"shape": [2, 3], "preprocess": "none"},
            "layers": [
                {"type": "linear", "bias": false},
                {"type": "smooth_leaky_relu", "alpha": 0.1},
                {"type": "linear"},
                {"type": "smooth_leaky_relu", "alpha": 0.7},
                {"type": "linear", "bias": false, "init": "identity"}
            ]
        }"#,
    )
    .unwrap();
    assert_eq!(spec.input.dim(), d);
    let model = perturbed_model(&spec, 31, 0.25);
    assert!(
        !model.values.contains_key("layers.0.bias") && model.values.contains_key("layers.2.bias")
    );
    let mut rng = Rng::new(3);
    let rows: Vec<f64> = (0..5 * d)
        .map(|_| ((1.5 * rng.normal()) as f32) as f64)
        .collect();
    let split = split_of(&rows, d);
    let (logp, recon) = log_likelihoods(&model, &split, 2, 0).unwrap();
    let recon = recon.unwrap();
    for e in 0..5 {
        let (want, want_recon) = reference_logp(&model, &rows[e * d..(e + 1) * d], None);
        assert_close(logp[e], want, 1e-9, &format!("ln p(x) of example {e}"));
        assert_close(recon[e], want_recon, 1e-9, &format!("recon of example {e}"));
    }
    let (n, seed) = (4, 77);
    let samples = sample(&model, n, seed, true).unwrap();
    let z = drawn_z(d, n, seed);
    for j in 0..n {
        let (fx, _, _) = forward(&model, &samples[j * d..(j + 1) * d]);
        for k in 0..d {
            assert_close(fx[k], z[j][k], 1e-9, &format!("f(sample {j})[{k}]"));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Evaluation on a GPU
// ---------------------------------------------------------------------------------------------

/// `evaluate_on` a GPU (lavapipe in CI) gives the host's f64 result within f32 precision, for
/// the paper's FC and CNN flows and a small Glow (actnorm, 1×1 convs, affine couplings, a
/// split): every example's terms run on the device, the log-dets once on the host. The noise
/// comes from the same host stream, so the two evaluate the same numbers.
#[test]
fn evaluation_on_a_gpu_matches_the_host() {
    use snfc_runtime::cube::probe::{device_for_test, DeviceKind};
    let Some(gpu) = device_for_test(
        DeviceKind::Wgpu,
        "eval_sample::evaluation_on_a_gpu_matches_the_host",
    ) else {
        return;
    };
    let glow = parse_spec(
        r#"{"name": "glow_small", "input": {"shape": [1, 28, 28], "preprocess": "dequantize_logit"},
            "layers": [{"type": "squeeze"},
                       {"type": "repeat", "times": 2, "layers": [
                           {"type": "actnorm"}, {"type": "conv", "kernel_size": 1, "bias": false},
                           {"type": "affine_coupling", "width": 16}]},
                       {"type": "split"}, {"type": "squeeze"},
                       {"type": "actnorm"}, {"type": "conv", "kernel_size": 1, "bias": false},
                       {"type": "affine_coupling", "width": 16}],
            "objective": {"gradient": "self_normalizing", "lambda": 1.0},
            "train": {"batch_size": 4}}"#,
    )
    .expect("spec");
    let data = snfc_runtime::data::embedded_mnist().expect("embedded digits");
    let split = data.valid.take(11);
    for spec in [
        parse_spec(include_str!("../../specs/mnist_fc2.json")).expect("spec"),
        parse_spec(include_str!("../../specs/mnist_cnn9.json")).expect("spec"),
        glow,
    ] {
        let host = Model::<f64>::init(&spec, 5);
        let want = evaluate(&host, &split, 4, 7).expect("host evaluation");
        let options = snfc_runtime::eval::EvalOptions {
            batch: 4,
            noise_seed: 7,
            device: &gpu,
            comm: &snfc_runtime::distributed::Solo,
            progress: &snfc_runtime::progress::Progress::hidden(),
        };
        let got = snfc_runtime::eval::evaluate_on(&host.cast::<f32>(), &split, &options)
            .expect("GPU evaluation");
        assert_eq!(got.examples, want.examples);
        assert_close(
            got.nll_nats,
            want.nll_nats,
            1e-4,
            &format!("{}: NLL", spec.name),
        );
        let (w, g) = (want.recon.expect("recon"), got.recon.expect("recon"));
        assert!(
            (w - g).abs() <= 1e-3 * w.abs().max(1e-3),
            "{}: recon host {w} vs {gpu} {g}",
            spec.name
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Sampling by the compiled sampling graph
// ---------------------------------------------------------------------------------------------

/// The flows the sampling graph is checked on: a flat flow with a spline (some latents beyond
/// its tail bound) and a smooth leaky ReLU, the paper's FC and CNN flows, and a small Glow
/// (squeezes, actnorm, 1×1 convs, affine couplings, a split, 8-bit data).
fn sampling_specs() -> Vec<FlowSpec> {
    let flat = parse_spec(
        r#"{"name": "spline_flat", "input": {"shape": [12], "preprocess": "none"},
            "layers": [{"type": "linear", "bias": true}, {"type": "spline", "bins": 6, "tail_bound": 2.0},
                       {"type": "linear", "bias": true}, {"type": "smooth_leaky_relu", "alpha": 0.2},
                       {"type": "linear", "bias": true}],
            "objective": {"gradient": "self_normalizing", "lambda": 1.0},
            "train": {"batch_size": 4}}"#,
    )
    .expect("spec");
    let glow = parse_spec(
        r#"{"name": "glow_small", "input": {"shape": [1, 28, 28], "preprocess": "dequantize_logit"},
            "layers": [{"type": "squeeze"},
                       {"type": "repeat", "times": 2, "layers": [
                           {"type": "actnorm"}, {"type": "conv", "kernel_size": 1, "bias": false},
                           {"type": "affine_coupling", "width": 8}]},
                       {"type": "split"}, {"type": "squeeze"},
                       {"type": "actnorm"}, {"type": "conv", "kernel_size": 1, "bias": true},
                       {"type": "affine_coupling", "width": 8}],
            "objective": {"gradient": "self_normalizing", "lambda": 1.0},
            "train": {"batch_size": 4}}"#,
    )
    .expect("spec");
    vec![
        flat,
        parse_spec(include_str!("../../specs/mnist_fc2.json")).expect("spec"),
        parse_spec(include_str!("../../specs/mnist_cnn9.json")).expect("spec"),
        glow,
    ]
}

/// A fresh model of `spec` with every parameter moved off its initial value (weights by about
/// 0.3 of their fan-in's scale, everything else by N(0, 0.3²), coupling log-scales by 0.1), so
/// that no layer's inverse is the identity: fresh splines, couplings and actnorms are.
fn moved_model(spec: &FlowSpec, seed: u64) -> Model<f64> {
    use snfc_compiler::ir::lower::ParamKind;
    let mut model = Model::<f64>::init(spec, seed);
    let mut rng = Rng::new(seed ^ 0x5eed);
    for p in model.params.clone() {
        let std = match p.kind {
            ParamKind::Weight | ParamKind::WeightInv => {
                0.3 / (p.shape[1..].iter().product::<usize>() as f64).sqrt()
            }
            ParamKind::CouplingWeight(_) => {
                0.3 / (p.shape[1..].iter().product::<usize>() as f64).sqrt()
            }
            ParamKind::CouplingLogs => 0.1,
            _ => 0.3,
        };
        let moved: Vec<f64> = model
            .get(&p.name)
            .iter()
            .map(|v| v + std * rng.normal())
            .collect();
        model.values.insert(p.name.clone(), Arc::new(moved));
    }
    model
}

fn sample_options(n: usize, exact: bool, batch: usize) -> snfc_runtime::sample::SampleOptions {
    snfc_runtime::sample::SampleOptions {
        n,
        seed: 11,
        exact,
        temperature: 0.8,
        batch,
        latent_on_device: false,
    }
}

/// Largest |got − want| / max(|want|, scale) over two sample sets.
fn worst_relative(got: &[f64], want: &[f64], scale: f64) -> f64 {
    assert_eq!(got.len(), want.len());
    got.iter()
        .zip(want)
        .map(|(g, w)| (g - w).abs() / w.abs().max(scale))
        .fold(0.0, f64::max)
}

/// The compiled sampling graph, run by the host executor in f64, gives the host's own inverse
/// (`sample_at`: LU solves, Newton to tolerance, the spline's inverse) to 1e-9, through the
/// learned inverse and through W⁻¹, in batches of 2 (the last one padded).
#[test]
fn the_sampling_graph_inverts_as_the_host_does() {
    use snfc_runtime::cube::probe::Chosen;
    use snfc_runtime::progress::Progress;
    for spec in sampling_specs() {
        let model = moved_model(&spec, 3);
        for exact in [false, true] {
            let want = snfc_runtime::sample::sample_at(&model, 5, 11, exact, 0.8).expect("host");
            let got = snfc_runtime::sample::sample_on(
                &model,
                &sample_options(5, exact, 2),
                &Chosen::Host,
                &Progress::hidden(),
            )
            .expect("sampling graph");
            let worst = worst_relative(&got, &want, 1.0);
            assert!(
                worst < 1e-9,
                "{} (exact {exact}): the graph's samples differ from the host inverse by {worst:e}",
                spec.name
            );
        }
    }
}

/// `sample_on` a GPU (lavapipe in CI) with the host's latent gives the host's f64 samples within
/// f32 precision, every layer's inverse on the device; with the latent drawn on the device,
/// the samples are finite, the same seed gives the same samples and another seed others.
#[test]
fn sampling_on_a_gpu_matches_the_host() {
    use snfc_runtime::cube::probe::{device_for_test, DeviceKind};
    use snfc_runtime::progress::Progress;
    let Some(gpu) = device_for_test(
        DeviceKind::Wgpu,
        "eval_sample::sampling_on_a_gpu_matches_the_host",
    ) else {
        return;
    };
    for spec in sampling_specs() {
        let model = moved_model(&spec, 4);
        let model32 = model.cast::<f32>();
        for exact in [false, true] {
            let want = snfc_runtime::sample::sample_at(&model, 6, 11, exact, 0.8).expect("host");
            let opts = sample_options(6, exact, 4);
            let got = snfc_runtime::sample::sample_on(&model32, &opts, &gpu, &Progress::hidden())
                .expect("GPU sampling");
            let worst = worst_relative(&got, &want, 1.0);
            assert!(
                worst < 5e-4,
                "{} (exact {exact}): {gpu} samples differ from the host's by {worst:e}",
                spec.name
            );
        }
        let drawn = |seed: u64| {
            let opts = snfc_runtime::sample::SampleOptions {
                seed,
                latent_on_device: true,
                ..sample_options(6, false, 4)
            };
            snfc_runtime::sample::sample_on(&model32, &opts, &gpu, &Progress::hidden())
                .expect("GPU sampling")
        };
        let first = drawn(1);
        assert!(first.iter().all(|v| v.is_finite()), "{}", spec.name);
        assert_eq!(drawn(1), first, "{}: the same seed", spec.name);
        assert_ne!(drawn(2), first, "{}: another seed", spec.name);
    }
}

/// The unrolled Newton steps of the sampling graph at the edges of the smooth leaky ReLU: the
/// smallest slopes (α = 0.01, 0.001) and latents far out (temperature 60: |z| up to about
/// 250), against the host's Newton iteration to tolerance, in f64.
#[test]
fn the_sampling_graphs_newton_steps_hold_at_small_slopes_and_far_latents() {
    use snfc_runtime::cube::probe::Chosen;
    use snfc_runtime::progress::Progress;
    for alpha in [0.001, 0.01, 0.99] {
        let spec = parse_spec(&format!(
            r#"{{"name": "slrelu", "input": {{"shape": [8], "preprocess": "none"}},
                "layers": [{{"type": "smooth_leaky_relu", "alpha": {alpha}}}],
                "train": {{"batch_size": 4}}}}"#
        ))
        .expect("spec");
        let model = Model::<f64>::init(&spec, 1);
        let want = snfc_runtime::sample::sample_at(&model, 64, 3, false, 60.0).expect("host");
        let opts = snfc_runtime::sample::SampleOptions {
            temperature: 60.0,
            seed: 3,
            ..sample_options(64, false, 64)
        };
        let got =
            snfc_runtime::sample::sample_on(&model, &opts, &Chosen::Host, &Progress::hidden())
                .expect("sampling graph");
        let worst = worst_relative(&got, &want, 1.0);
        assert!(worst < 1e-9, "α = {alpha}: {worst:e}");
    }
}
