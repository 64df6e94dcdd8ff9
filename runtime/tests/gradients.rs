//! Gradient checks in f64 (DESIGN.md §6), through the whole pipeline: spec → compiled graph →
//! host executor.
//!
//! 1. The exact gradient outputs of `Compiled::exact` against central finite differences of its
//!    `objective` output.
//! 2. The self-normalizing step (`Compiled::step`, substitution on) against the paper's closed
//!    forms (A.1, eqs. 17 and 20), computed here by hand with plain loops.
//! 3. With R = W⁻¹ exactly, the self-normalizing step equals the exact maximum-likelihood gradient
//!    (½ of it for W, all of it for b).
//! 4. `OptLevel::Full` (substitution + reassociation) computes the same values as
//!    `OptLevel::Substitution`.
//! 5. `objective − loss` is exactly the data-independent log-det terms.
//!
//! Layouts: a batch is `[D, B]` row-major with one column per example, matrices are row-major.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::Graph;
use snfc_compiler::spec::{parse_spec, FlowSpec, LayerSpec, ReconTrains};
use snfc_runtime::host::exec::{Executor, Feeds, Program, Tensor};
use snfc_runtime::host::linalg::{inverse, slogdet};
use snfc_runtime::model::Model;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

mod common;
use common::Rng;

// ---------------------------------------------------------------------------------------------
// Helpers: a deterministic RNG, dense matrices, specs, parameters and runs.
// ---------------------------------------------------------------------------------------------

/// A dense row-major matrix for the hand-written references (plain loops, no GEMM library).
#[derive(Debug, Clone, PartialEq)]
struct Mat {
    r: usize,
    c: usize,
    a: Vec<f64>,
}

impl Mat {
    fn new(r: usize, c: usize, a: Vec<f64>) -> Mat {
        assert_eq!(a.len(), r * c);
        Mat { r, c, a }
    }

    fn zeros(r: usize, c: usize) -> Mat {
        Mat::new(r, c, vec![0.0; r * c])
    }

    fn at(&self, i: usize, j: usize) -> f64 {
        self.a[i * self.c + j]
    }

    fn mm(&self, o: &Mat) -> Mat {
        assert_eq!(self.c, o.r);
        let mut out = Mat::zeros(self.r, o.c);
        for i in 0..self.r {
            for j in 0..o.c {
                let mut s = 0.0;
                for k in 0..self.c {
                    s += self.at(i, k) * o.at(k, j);
                }
                out.a[i * o.c + j] = s;
            }
        }
        out
    }

    fn t(&self) -> Mat {
        let mut out = Mat::zeros(self.c, self.r);
        for i in 0..self.r {
            for j in 0..self.c {
                out.a[j * self.r + i] = self.at(i, j);
            }
        }
        out
    }

    fn zip(&self, o: &Mat, f: impl Fn(f64, f64) -> f64) -> Mat {
        assert_eq!((self.r, self.c), (o.r, o.c));
        Mat::new(
            self.r,
            self.c,
            self.a.iter().zip(&o.a).map(|(x, y)| f(*x, *y)).collect(),
        )
    }

    fn add(&self, o: &Mat) -> Mat {
        self.zip(o, |x, y| x + y)
    }

    fn sub(&self, o: &Mat) -> Mat {
        self.zip(o, |x, y| x - y)
    }

    fn hadamard(&self, o: &Mat) -> Mat {
        self.zip(o, |x, y| x * y)
    }

    fn map(&self, f: impl Fn(f64) -> f64) -> Mat {
        Mat::new(self.r, self.c, self.a.iter().map(|x| f(*x)).collect())
    }

    fn scale(&self, s: f64) -> Mat {
        self.map(|x| s * x)
    }

    /// Adds the vector `v` (length `r`) to every column.
    fn add_col(&self, v: &[f64]) -> Mat {
        assert_eq!(v.len(), self.r);
        let mut out = self.clone();
        for (row, vi) in out.a.chunks_mut(self.c).zip(v) {
            row.iter_mut().for_each(|o| *o += vi);
        }
        out
    }

    /// The mean of the columns (a vector of length `r`).
    fn col_mean(&self) -> Vec<f64> {
        (0..self.r)
            .map(|i| (0..self.c).map(|j| self.at(i, j)).sum::<f64>() / self.c as f64)
            .collect()
    }
}

fn make_spec(d: usize, preprocess: &str, layers: &str, gradient: &str, lambda: f64) -> FlowSpec {
    let json = format!(
        r#"{{"name":"gradcheck","input":{{"shape":[{d}],"preprocess":"{preprocess}"}},
            "layers":{layers},
            "objective":{{"gradient":"{gradient}","lambda":{lambda:?}}}}}"#
    );
    parse_spec(&json).unwrap_or_else(|e| panic!("spec {json}: {e}"))
}

/// linear(bias) → smooth leaky ReLU(α = 0.3) → linear(bias)
const FC2: &str = r#"[{"type":"linear","bias":true},{"type":"smooth_leaky_relu","alpha":0.3},
                     {"type":"linear","bias":true}]"#;

/// The spec's initial parameters (paper A.3), perturbed so nothing is special: W += 0.3·N/√D,
/// R += 0.3·N/√D independently (so R is not W⁻¹), b = 0.5·N.
fn random_params(spec: &FlowSpec, rng: &mut Rng) -> Feeds<f64> {
    let d = spec.input.dim();
    let model = Model::<f64>::init(spec, rng.next_u64());
    let mut out = Feeds::new();
    for p in &model.params {
        let name = &p.name;
        let base = model.get(name);
        let sd = if name.ends_with(".bias") {
            0.5
        } else {
            0.3 / (d as f64).sqrt()
        };
        let v: Vec<f64> = base.iter().map(|x| x + sd * rng.normal()).collect();
        out.insert(name.clone(), Arc::new(v));
    }
    out
}

/// The inputs of one batch: `x` ~ N(0, 1.5²) for `preprocess: none`; 8-bit integers plus a fixed
/// uniform `noise` for `dequantize_logit`.
fn random_inputs(spec: &FlowSpec, batch: usize, rng: &mut Rng, feeds: &mut Feeds<f64>) {
    let n = spec.input.dim() * batch;
    match spec.input.preprocess {
        snfc_compiler::spec::Preprocess::None => {
            let x: Vec<f64> = (0..n).map(|_| 1.5 * rng.normal()).collect();
            feeds.insert("x".into(), Arc::new(x));
        }
        snfc_compiler::spec::Preprocess::DequantizeLogit => {
            let x: Vec<f64> = (0..n).map(|_| rng.int(0, 255) as f64).collect();
            let u: Vec<f64> = (0..n).map(|_| rng.uniform()).collect();
            feeds.insert("x".into(), Arc::new(x));
            feeds.insert("noise".into(), Arc::new(u));
        }
    }
}

fn run(graph: &Graph, feeds: &Feeds<f64>) -> BTreeMap<String, Tensor<f64>> {
    let p = Program::new(graph);
    let mut ex = Executor::<f64>::new();
    ex.run(&p, feeds)
        .unwrap_or_else(|e| panic!("running {}: {e}", graph.name))
        .into_iter()
        .collect()
}

/// The outputs of the spec's compiled training step at `level` on `feeds`.
fn step_outputs(
    spec: &FlowSpec,
    batch: usize,
    level: OptLevel,
    feeds: &Feeds<f64>,
) -> BTreeMap<String, Tensor<f64>> {
    let compiled = compile_train(spec, batch, level).expect("the spec compiles");
    run(&compiled.step, feeds)
}

fn mat_of(feeds: &Feeds<f64>, name: &str, r: usize, c: usize) -> Mat {
    Mat::new(r, c, feeds[name].to_vec())
}

/// Indices of the linear layers of a spec.
fn linear_layers(spec: &FlowSpec) -> Vec<usize> {
    spec.layers
        .iter()
        .enumerate()
        .filter(|(_, l)| matches!(l, LayerSpec::Linear(_)))
        .map(|(i, _)| i)
        .collect()
}

fn has_bias(spec: &FlowSpec, layer: usize) -> bool {
    matches!(&spec.layers[layer], LayerSpec::Linear(l) if l.bias)
}

/// Asserts `|got − want| ≤ rel·|want| + abs` for every element.
#[track_caller]
fn assert_close(what: &str, got: &[f64], want: &[f64], rel: f64, abs: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = rel * w.abs() + abs;
        assert!(
            (g - w).abs() <= tol && g.is_finite(),
            "{what}[{i}]: got {g:.15e}, expected {w:.15e} (difference {:.3e} > tolerance {tol:.3e})",
            (g - w).abs()
        );
    }
}

/// Asserts `max|got − want| ≤ rel · max(max|want|, 1e-300)`: agreement relative to the tensor's
/// scale (element-wise relative error is meaningless for elements that cancel to ~0).
#[track_caller]
fn assert_close_norm(what: &str, got: &[f64], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len(), "{what}: lengths differ");
    let scale = want.iter().fold(1e-300f64, |m, w| m.max(w.abs()));
    let (i, err) = got
        .iter()
        .zip(want)
        .map(|(g, w)| {
            if g.is_finite() {
                (g - w).abs()
            } else {
                f64::INFINITY
            }
        })
        .enumerate()
        .fold(
            (0, 0.0f64),
            |acc, (i, e)| if e > acc.1 { (i, e) } else { acc },
        );
    assert!(
        err <= rel * scale,
        "{what}: max difference {err:.3e} at [{i}] (got {:.15e}, expected {:.15e}) exceeds {rel:e} × scale {scale:.3e}",
        got[i],
        want[i]
    );
}

/// The input `h_k` (D×B) of every linear layer of the f-flow, by a hand-written forward pass
/// (preprocessing included).
fn linear_inputs(spec: &FlowSpec, feeds: &Feeds<f64>, batch: usize) -> Vec<Mat> {
    let d = spec.input.dim();
    let mut h = mat_of(feeds, "x", d, batch);
    if spec.input.preprocess == snfc_compiler::spec::Preprocess::DequantizeLogit {
        let a = spec.input.logit_alpha;
        let u = mat_of(feeds, "noise", d, batch);
        h = h.add(&u).map(|v| {
            let s = a + (1.0 - 2.0 * a) * v / 256.0;
            s.ln() - (1.0 - s).ln()
        });
    }
    let mut out = Vec::new();
    for (i, layer) in spec.layers.iter().enumerate() {
        match layer {
            LayerSpec::Linear(l) => {
                out.push(h.clone());
                h = mat_of(feeds, &format!("layers.{i}.weight"), d, d).mm(&h);
                if l.bias {
                    h = h.add_col(&feeds[&format!("layers.{i}.bias")]);
                }
            }
            LayerSpec::SmoothLeakyRelu(s) => h = h.map(|v| slrelu(s.alpha, v)),
            other => panic!("this reference covers FC flows only, not {other:?}"),
        }
    }
    out
}

/// ‖R_i W_i h − h‖² / B for linear layer `i` with input `h`.
fn recon_of(feeds: &Feeds<f64>, i: usize, h: &Mat) -> f64 {
    let d = h.r;
    let w = mat_of(feeds, &format!("layers.{i}.weight"), d, d);
    let r = mat_of(feeds, &format!("layers.{i}.weight_inv"), d, d);
    let e = r.mm(&w.mm(h)).sub(h);
    e.a.iter().map(|v| v * v).sum::<f64>() / h.c as f64
}

// ---------------------------------------------------------------------------------------------
// 1. Exact gradients against central finite differences of the objective.
// ---------------------------------------------------------------------------------------------

/// Checks every element of every `grad.*` output of `compiled.exact` against
/// (J(θ + h e_i) − J(θ − h e_i)) / 2h with h = 1e-6, and that the gradient outputs are exactly
/// the ones expected for the spec.
fn check_exact_gradient_fd(spec: &FlowSpec, batch: usize, seed: u64) {
    let mut rng = Rng::new(seed);
    let compiled = compile_train(spec, batch, OptLevel::None).expect("the spec compiles");
    let mut feeds = random_params(spec, &mut rng);
    random_inputs(spec, batch, &mut rng, &mut feeds);

    let outs = run(&compiled.exact, &feeds);
    let snf = spec.objective.gradient == snfc_compiler::spec::GradientMode::SelfNormalizing;
    let mut expected: Vec<String> = Vec::new();
    for i in linear_layers(spec) {
        expected.push(format!("grad.layers.{i}.weight"));
        if snf {
            expected.push(format!("grad.layers.{i}.weight_inv"));
        }
        if has_bias(spec, i) {
            expected.push(format!("grad.layers.{i}.bias"));
        }
    }
    expected.sort();
    let mut got: Vec<String> = outs
        .keys()
        .filter(|k| k.starts_with("grad."))
        .cloned()
        .collect();
    got.sort();
    assert_eq!(got, expected, "gradient outputs of the exact graph");

    // The reconstruction term differentiates with every h_k gradient-stopped (eq. 3), so the
    // function whose finite differences the gradient must match is J with the recon term's
    // h_k frozen at the unperturbed parameters: J(θ) − λ recon(θ) + λ recon(θ; h_k(θ₀)).
    let lambda = spec.objective.lambda.initial();
    let frozen = linear_inputs(spec, &feeds, batch);
    let frozen_recon = |f: &Feeds<f64>| -> f64 {
        linear_layers(spec)
            .iter()
            .zip(&frozen)
            .map(|(i, h)| recon_of(f, *i, h))
            .sum()
    };
    if snf {
        assert_close(
            &format!("{}: recon vs hand-computed", spec.name),
            &[outs["recon"].scalar()],
            &[frozen_recon(&feeds)],
            1e-12,
            1e-14,
        );
    }
    let objective_only = compiled.exact.with_outputs(&["objective", "recon"]);
    let program = Program::new(&objective_only);
    let mut ex = Executor::<f64>::new();
    let mut objective = |f: &Feeds<f64>| -> f64 {
        let o: HashMap<String, Tensor<f64>> = ex
            .run(&program, f)
            .expect("objective runs")
            .into_iter()
            .collect();
        let j = o["objective"].scalar();
        match o.get("recon") {
            Some(r) => j - lambda * r.scalar() + lambda * frozen_recon(f),
            None => j,
        }
    };
    let j0 = objective(&feeds);
    assert!(j0.is_finite(), "objective {j0}");
    assert!(
        (j0 - outs["objective"].scalar()).abs() <= 1e-12 * (1.0 + j0.abs()),
        "objective-only graph disagrees with the full exact graph"
    );

    let h = 1e-6;
    for name in &expected {
        let param = name.strip_prefix("grad.").unwrap();
        let analytic = &outs[name.as_str()].data;
        let base = feeds[param].clone();
        assert_eq!(analytic.len(), base.len(), "{name}: shape");
        let mut numeric = Vec::with_capacity(base.len());
        for i in 0..base.len() {
            let mut f = feeds.clone();
            let mut v = base.to_vec();
            v[i] = base[i] + h;
            f.insert(param.to_string(), Arc::new(v.clone()));
            let jp = objective(&f);
            v[i] = base[i] - h;
            f.insert(param.to_string(), Arc::new(v));
            let jm = objective(&f);
            numeric.push((jp - jm) / (2.0 * h));
        }
        assert_close(
            &format!("{} ({name} vs finite differences)", spec.name),
            analytic,
            &numeric,
            1e-6,
            1e-6,
        );
    }
}

#[test]
fn exact_gradient_matches_finite_differences_self_normalizing() {
    // λ = 0: the stop-gradient on h_k is irrelevant, plain finite differences of J apply.
    for (d, b, seed, lambda) in [
        (3, 2, 1, 0.7),
        (4, 3, 2, 0.7),
        (5, 4, 3, 0.7),
        (4, 3, 4, 0.0),
    ] {
        let spec = make_spec(d, "none", FC2, "self_normalizing", lambda);
        check_exact_gradient_fd(&spec, b, seed);
    }
}

#[test]
fn exact_gradient_matches_finite_differences_dequantize_logit() {
    for (d, b, seed) in [(3, 3, 11), (4, 2, 12)] {
        let spec = make_spec(d, "dequantize_logit", FC2, "self_normalizing", 1.3);
        check_exact_gradient_fd(&spec, b, seed);
    }
}

#[test]
fn exact_gradient_matches_finite_differences_exact_spec() {
    for (d, b, seed, pre) in [
        (3, 2, 21, "none"),
        (5, 3, 22, "none"),
        (4, 4, 23, "dequantize_logit"),
    ] {
        let spec = make_spec(d, pre, FC2, "exact", 1.0);
        check_exact_gradient_fd(&spec, b, seed);
    }
}

#[test]
fn exact_gradient_matches_finite_differences_without_bias() {
    let layers = r#"[{"type":"linear","bias":false},{"type":"smooth_leaky_relu","alpha":0.2},
                     {"type":"linear","bias":true},{"type":"smooth_leaky_relu"},
                     {"type":"linear","bias":false}]"#;
    check_exact_gradient_fd(
        &make_spec(3, "none", layers, "self_normalizing", 0.5),
        3,
        31,
    );
    check_exact_gradient_fd(&make_spec(3, "none", layers, "exact", 0.5), 3, 32);
}

// ---------------------------------------------------------------------------------------------
// 2. The self-normalizing step against the paper's closed forms (A.1, eqs. 17 and 20).
// ---------------------------------------------------------------------------------------------

/// The closed-form self-normalizing gradients of one fully connected layer (minimization form,
/// batch mean) given its input `h` (D×B), its output error `delta` = ∂ ln p/∂(W h + b) and the
/// parameters: returns (G_W, G_R, G_b).
fn snf_layer_grads(w: &Mat, r: &Mat, h: &Mat, delta: &Mat, lambda: f64) -> (Mat, Mat, Vec<f64>) {
    let b = h.c as f64;
    let z = w.mm(h); // W h without the bias
    let e = r.mm(&z).sub(h); // R W h − h
                             // eq. 17: G_W = −½ (δ hᵀ / B + Rᵀ) + 2λ Rᵀ E hᵀ / B
    let g_w = delta
        .mm(&h.t())
        .scale(1.0 / b)
        .add(&r.t())
        .scale(-0.5)
        .add(&r.t().mm(&e).mm(&h.t()).scale(2.0 * lambda / b));
    // eq. 20: G_R = ½ (Wᵀ δ zᵀ / B + Wᵀ) + 2λ E zᵀ / B
    let g_r = w
        .t()
        .mm(delta)
        .mm(&z.t())
        .scale(1.0 / b)
        .add(&w.t())
        .scale(0.5)
        .add(&e.mm(&z.t()).scale(2.0 * lambda / b));
    let g_b = delta.col_mean().iter().map(|v| -v).collect();
    (g_w, g_r, g_b)
}

fn snf_levels() -> [OptLevel; 2] {
    [OptLevel::Substitution, OptLevel::Full]
}

#[test]
fn snf_step_matches_closed_form_single_linear_layer() {
    for (d, batch, lambda, seed) in [(3, 2, 0.0, 41), (4, 3, 0.8, 42), (5, 4, 2.5, 43)] {
        let spec = make_spec(
            d,
            "none",
            r#"[{"type":"linear","bias":true}]"#,
            "self_normalizing",
            lambda,
        );
        let mut rng = Rng::new(seed);
        let mut feeds = random_params(&spec, &mut rng);
        random_inputs(&spec, batch, &mut rng, &mut feeds);
        let x = mat_of(&feeds, "x", d, batch);
        let w = mat_of(&feeds, "layers.0.weight", d, d);
        let r = mat_of(&feeds, "layers.0.weight_inv", d, d);
        let bias = feeds["layers.0.bias"].to_vec();

        // δ = ∂ ln N(z)/∂z = −(W x + b)
        let zb = w.mm(&x).add_col(&bias);
        let delta = zb.scale(-1.0);
        let (g_w, g_r, g_b) = snf_layer_grads(&w, &r, &x, &delta, lambda);
        let e = r.mm(&w.mm(&x)).sub(&x);
        let recon = e.a.iter().map(|v| v * v).sum::<f64>() / batch as f64;

        for level in snf_levels() {
            let compiled = compile_train(&spec, batch, level).expect("the spec compiles");
            let outs = run(&compiled.step, &feeds);
            assert!(!outs.contains_key("objective"), "the step has no objective");
            let what = |n: &str| format!("{level:?} d={d} λ={lambda}: {n}");
            assert_close(
                &what("grad W"),
                &outs["grad.layers.0.weight"].data,
                &g_w.a,
                1e-10,
                1e-10,
            );
            assert_close(
                &what("grad R"),
                &outs["grad.layers.0.weight_inv"].data,
                &g_r.a,
                1e-10,
                1e-10,
            );
            assert_close(
                &what("grad b"),
                &outs["grad.layers.0.bias"].data,
                &g_b,
                1e-10,
                1e-10,
            );
            assert_close(&what("recon"), &outs["recon"].data, &[recon], 1e-10, 1e-12);
        }
    }
}

/// Smooth leaky ReLU and its first two derivatives.
fn slrelu(alpha: f64, x: f64) -> f64 {
    let softplus = if x > 0.0 {
        x + (-x).exp().ln_1p()
    } else {
        x.exp().ln_1p()
    };
    alpha * x + (1.0 - alpha) * softplus
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

fn slrelu_d1(alpha: f64, x: f64) -> f64 {
    alpha + (1.0 - alpha) * sigmoid(x)
}

fn slrelu_d2(alpha: f64, x: f64) -> f64 {
    let s = sigmoid(x);
    (1.0 - alpha) * s * (1.0 - s)
}

/// The hand-written self-normalizing gradients of linear(bias) → slrelu(α) → linear(bias),
/// keyed like the step's outputs.
fn fc2_closed_form(
    feeds: &Feeds<f64>,
    d: usize,
    batch: usize,
    alpha: f64,
    lambda: f64,
) -> HashMap<String, Vec<f64>> {
    let x = mat_of(feeds, "x", d, batch);
    let w1 = mat_of(feeds, "layers.0.weight", d, d);
    let r1 = mat_of(feeds, "layers.0.weight_inv", d, d);
    let b1 = feeds["layers.0.bias"].to_vec();
    let w2 = mat_of(feeds, "layers.2.weight", d, d);
    let r2 = mat_of(feeds, "layers.2.weight_inv", d, d);
    let b2 = feeds["layers.2.bias"].to_vec();

    // Forward pass of the f-flow.
    let a1 = w1.mm(&x).add_col(&b1);
    let h1 = a1.map(|v| slrelu(alpha, v));
    let a2 = w2.mm(&h1).add_col(&b2);
    // Backward: ln p = ln N(a2) + Σ ln s'(a1) (+ constants).
    let delta2 = a2.scale(-1.0);
    let delta_h1 = w2.t().mm(&delta2);
    let delta1 = delta_h1
        .hadamard(&a1.map(|v| slrelu_d1(alpha, v)))
        .add(&a1.map(|v| slrelu_d2(alpha, v) / slrelu_d1(alpha, v)));

    let (gw1, gr1, gb1) = snf_layer_grads(&w1, &r1, &x, &delta1, lambda);
    let (gw2, gr2, gb2) = snf_layer_grads(&w2, &r2, &h1, &delta2, lambda);
    HashMap::from([
        ("grad.layers.0.weight".to_string(), gw1.a),
        ("grad.layers.0.weight_inv".to_string(), gr1.a),
        ("grad.layers.0.bias".to_string(), gb1),
        ("grad.layers.2.weight".to_string(), gw2.a),
        ("grad.layers.2.weight_inv".to_string(), gr2.a),
        ("grad.layers.2.bias".to_string(), gb2),
    ])
}

#[test]
fn snf_step_matches_closed_form_two_layers_with_activation() {
    for (d, batch, alpha, lambda, seed) in [
        (3, 2, 0.3, 1.0, 51),
        (4, 4, 0.3, 0.25, 52),
        (5, 3, 0.1, 3.0, 53),
    ] {
        let layers = format!(
            r#"[{{"type":"linear","bias":true}},{{"type":"smooth_leaky_relu","alpha":{alpha:?}}},
                {{"type":"linear","bias":true}}]"#
        );
        let spec = make_spec(d, "none", &layers, "self_normalizing", lambda);
        let mut rng = Rng::new(seed);
        let mut feeds = random_params(&spec, &mut rng);
        random_inputs(&spec, batch, &mut rng, &mut feeds);
        let want = fc2_closed_form(&feeds, d, batch, alpha, lambda);
        for level in snf_levels() {
            let outs = step_outputs(&spec, batch, level, &feeds);
            let grads: Vec<&String> = outs.keys().filter(|k| k.starts_with("grad.")).collect();
            assert_eq!(
                grads.len(),
                want.len(),
                "{level:?}: gradient outputs {grads:?}"
            );
            for (name, w) in &want {
                let what = format!("{level:?} d={d} α={alpha} λ={lambda}: {name}");
                assert_close(&what, &outs[name].data, w, 1e-10, 1e-10);
            }
        }
    }
}

/// `"recon_trains": "inverse"` (the reference code's `only_R_recon`): the reconstruction term
/// trains R alone. So G_W is the closed form without its 2λ Rᵀ E hᵀ term (the λ = 0 form),
/// while G_R and G_b are unchanged.
#[test]
fn recon_trains_inverse_leaves_w_out_of_the_reconstruction() {
    for (d, batch, lambda, seed) in [(3, 2, 1.0, 54), (4, 3, 2.5, 55)] {
        let mut spec = make_spec(d, "none", FC2, "self_normalizing", lambda);
        spec.objective.recon_trains = ReconTrains::Inverse;
        let mut rng = Rng::new(seed);
        let mut feeds = random_params(&spec, &mut rng);
        random_inputs(&spec, batch, &mut rng, &mut feeds);
        let with_recon = fc2_closed_form(&feeds, d, batch, 0.3, lambda);
        let without_recon = fc2_closed_form(&feeds, d, batch, 0.3, 0.0);
        for level in snf_levels() {
            let outs = step_outputs(&spec, batch, level, &feeds);
            for (name, want) in &with_recon {
                let want = if name.ends_with(".weight") {
                    &without_recon[name]
                } else {
                    want
                };
                let what = format!("{level:?} d={d} λ={lambda} recon_trains=inverse: {name}");
                assert_close(&what, &outs[name].data, want, 1e-10, 1e-10);
            }
            // The reconstruction error itself is the same value.
            let inputs = linear_inputs(&spec, &feeds, batch);
            let recon = recon_of(&feeds, 0, &inputs[0]) + recon_of(&feeds, 2, &inputs[1]);
            assert_close("recon", &outs["recon"].data, &[recon], 1e-10, 1e-12);
        }
        // And the weight gradient does change with λ under the default (both), so the
        // comparison above can fail.
        let both = make_spec(d, "none", FC2, "self_normalizing", lambda);
        let outs = step_outputs(&both, batch, OptLevel::Full, &feeds);
        let name = "grad.layers.0.weight";
        let gap: f64 = outs[name]
            .data
            .iter()
            .zip(&without_recon[name])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max);
        assert!(
            gap > 1e-3,
            "λ moves G_W under recon_trains = both (gap {gap})"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 3. With R = W⁻¹ the self-normalizing gradient is the exact maximum-likelihood gradient.
// ---------------------------------------------------------------------------------------------

#[test]
fn snf_step_with_exact_inverse_equals_maximum_likelihood_gradient() {
    for (d, batch, pre, lambda, seed) in [
        (3, 2, "none", 1.0, 61),
        (5, 4, "none", 0.3, 62),
        (4, 3, "dequantize_logit", 2.0, 63),
    ] {
        let snf = make_spec(d, pre, FC2, "self_normalizing", lambda);
        let exact = make_spec(d, pre, FC2, "exact", lambda);
        let mut rng = Rng::new(seed);
        let mut feeds = random_params(&snf, &mut rng);
        for i in linear_layers(&snf) {
            let w = feeds[&format!("layers.{i}.weight")].clone();
            let r = inverse(&w, d).expect("W is invertible");
            feeds.insert(format!("layers.{i}.weight_inv"), Arc::new(r));
        }
        random_inputs(&snf, batch, &mut rng, &mut feeds);

        // The exact-mode step has no R: feed it only what it reads (extra feeds are harmless).
        let ml = run(
            &compile_train(&exact, batch, OptLevel::None)
                .expect("the spec compiles")
                .step,
            &feeds,
        );
        for level in snf_levels() {
            let outs = run(
                &compile_train(&snf, batch, level)
                    .expect("the spec compiles")
                    .step,
                &feeds,
            );
            assert!(
                outs["recon"].scalar().abs() < 1e-20,
                "recon {}",
                outs["recon"].scalar()
            );
            for i in linear_layers(&snf) {
                let name = format!("grad.layers.{i}.weight");
                let half: Vec<f64> = ml[&name].data.iter().map(|v| 0.5 * v).collect();
                let what = format!("{level:?} {pre} d={d}: {name} vs ½ exact");
                assert_close(&what, &outs[&name].data, &half, 1e-8, 1e-8);
                let name = format!("grad.layers.{i}.bias");
                let what = format!("{level:?} {pre} d={d}: {name} vs exact");
                assert_close(&what, &outs[&name].data, &ml[&name].data, 1e-8, 1e-8);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Full (substitution + reassociation) computes what Substitution computes.
// ---------------------------------------------------------------------------------------------

/// A random flow: 1–3 linear layers (bias on or off), a smooth leaky ReLU between consecutive
/// ones, random preprocessing and λ ∈ {0, 0.5, 2}.
fn random_flow(rng: &mut Rng) -> FlowSpec {
    let depth = rng.int(1, 3);
    let mut layers = Vec::new();
    for k in 0..depth {
        if k > 0 {
            let alpha = 0.1 + 0.5 * rng.uniform();
            layers.push(format!(
                r#"{{"type":"smooth_leaky_relu","alpha":{alpha:?}}}"#
            ));
        }
        let bias = rng.int(0, 1) == 1;
        layers.push(format!(r#"{{"type":"linear","bias":{bias}}}"#));
    }
    let lambda = [0.0, 0.5, 2.0][rng.int(0, 2)];
    let pre = if rng.int(0, 3) == 0 {
        "dequantize_logit"
    } else {
        "none"
    };
    let d = rng.int(2, 6);
    make_spec(
        d,
        pre,
        &format!("[{}]", layers.join(",")),
        "self_normalizing",
        lambda,
    )
}

#[test]
fn full_optimization_agrees_with_substitution() {
    for seed in 0..12 {
        let mut rng = Rng::new(1000 + seed);
        let spec = random_flow(&mut rng);
        let batch = rng.int(1, 5);
        let mut feeds = random_params(&spec, &mut rng);
        random_inputs(&spec, batch, &mut rng, &mut feeds);
        let sub = run(
            &compile_train(&spec, batch, OptLevel::Substitution)
                .expect("the spec compiles")
                .step,
            &feeds,
        );
        let full = run(
            &compile_train(&spec, batch, OptLevel::Full)
                .expect("the spec compiles")
                .step,
            &feeds,
        );
        let names = |m: &BTreeMap<String, Tensor<f64>>| m.keys().cloned().collect::<Vec<_>>();
        assert_eq!(names(&full), names(&sub), "seed {seed}: outputs differ");
        for (name, want) in &sub {
            let got = &full[name];
            assert_eq!(got.shape, want.shape, "seed {seed}: {name} shape");
            let what = format!(
                "seed {seed} ({} linear layers, B={batch}): {name}",
                linear_layers(&spec).len()
            );
            assert_close_norm(&what, &got.data, &want.data, 1e-10);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. objective − loss is the data-independent log-det terms.
// ---------------------------------------------------------------------------------------------

#[test]
fn objective_minus_loss_is_the_logdet_terms() {
    let layers = r#"[{"type":"linear","bias":true},{"type":"smooth_leaky_relu"},
                     {"type":"linear","bias":false},{"type":"smooth_leaky_relu"},
                     {"type":"linear","bias":true}]"#;
    let mut seed = 70;
    for gradient in ["self_normalizing", "exact"] {
        for pre in ["none", "dequantize_logit"] {
            seed += 1;
            let d = 4;
            let batch = 3;
            let spec = make_spec(d, pre, layers, gradient, 0.9);
            let mut rng = Rng::new(seed);
            let mut feeds = random_params(&spec, &mut rng);
            random_inputs(&spec, batch, &mut rng, &mut feeds);
            let outs = run(
                &compile_train(&spec, batch, OptLevel::None)
                    .expect("the spec compiles")
                    .exact,
                &feeds,
            );

            let mut want = 0.0;
            for i in linear_layers(&spec) {
                let (_, ld_w) = slogdet(&feeds[&format!("layers.{i}.weight")], d);
                if gradient == "exact" {
                    want -= ld_w;
                } else {
                    let (_, ld_r) = slogdet(&feeds[&format!("layers.{i}.weight_inv")], d);
                    want -= 0.5 * (ld_w - ld_r);
                }
            }
            let (objective, loss) = (outs["objective"].scalar(), outs["loss"].scalar());
            assert_close(
                &format!("{gradient} {pre}: objective − loss"),
                &[objective - loss],
                &[want],
                1e-10,
                1e-10 * (1.0 + objective.abs()),
            );
            // The unsubstituted step reports the exact graph's loss. (With the substitution on,
            // a self-normalizing step's g-flow forward pass becomes the f-flow's, so its loss is
            // a different number by design; the exact spec is never substituted.)
            let levels: &[OptLevel] = if gradient == "exact" {
                &[OptLevel::None, OptLevel::Substitution, OptLevel::Full]
            } else {
                &[OptLevel::None]
            };
            for &level in levels {
                let step = run(
                    &compile_train(&spec, batch, level)
                        .expect("the spec compiles")
                        .step,
                    &feeds,
                );
                assert_close(
                    &format!("{gradient} {pre} {level:?}: step loss"),
                    &[step["loss"].scalar()],
                    &[loss],
                    1e-10,
                    1e-12,
                );
            }
        }
    }
}
