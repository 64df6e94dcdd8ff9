//! The IR's shape and convolution-operator ops (`reshape`, `permute`, `reduce_sum`, `expand`,
//! `conv2d`, `flip_kernel`, `conv_kernel_grad`, `toeplitz`, `toeplitz_adjoint`) through autodiff
//! and the host executor: every gradient against central finite differences in f64, and the
//! identities the convolutional flows rest on (`T(k)ᵀ = T(flip_kernel(k))`,
//! `conv(x, k)` = `T(k)` applied to each example).

use snfc_compiler::autodiff;
use snfc_compiler::ir::{Graph, GraphBuilder, NodeIndex, Op, Shape, Unary};
use snfc_runtime::host::exec::{Executor, Feeds, Program};
use std::collections::HashMap;
use std::sync::Arc;

mod common;
use common::Rng;

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// A test problem: parameters with shapes, and a function building a scalar objective.
struct Case {
    name: &'static str,
    params: Vec<(&'static str, Shape)>,
    build: fn(&mut GraphBuilder, &[NodeIndex]) -> NodeIndex,
    /// Values near the identity keep `toeplitz` invertible.
    near_identity: bool,
}

fn graph(case: &Case) -> Graph {
    let mut b = GraphBuilder::new(case.name);
    let ps: Vec<NodeIndex> = case
        .params
        .iter()
        .map(|(n, s)| b.param(n, s.clone()))
        .collect();
    let j = (case.build)(&mut b, &ps);
    let grads = autodiff::gradients(&mut b, j, &ps);
    b.output("j", j);
    for ((n, _), g) in case.params.iter().zip(grads) {
        b.output(
            &format!("grad.{n}"),
            g.expect("the objective depends on every parameter"),
        );
    }
    b.finish()
}

fn run(g: &Graph, feeds: &Feeds<f64>) -> HashMap<String, Vec<f64>> {
    let mut ex = Executor::<f64>::new();
    ex.run(&Program::new(g), feeds)
        .unwrap_or_else(|e| panic!("{}: {e}", g.name))
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect()
}

fn check(case: &Case) {
    let g = graph(case);
    let mut rng = Rng::new(7);
    let mut feeds: Feeds<f64> = HashMap::new();
    for (n, s) in &case.params {
        let v: Vec<f64> = if case.near_identity && n.starts_with('k') {
            // dirac kernel + noise: an invertible convolution
            let (o, i, k) = (s[0], s[1], s[2]);
            let mut v: Vec<f64> = (0..numel(s)).map(|_| 0.1 * rng.normal()).collect();
            for c in 0..o.min(i) {
                v[((c * i + c) * k + k / 2) * k + k / 2] += 1.0;
            }
            v
        } else {
            (0..numel(s)).map(|_| rng.normal()).collect()
        };
        feeds.insert(n.to_string(), Arc::new(v));
    }
    let out = run(&g, &feeds);
    let f = |feeds: &Feeds<f64>| run(&g, feeds)["j"][0];
    for (n, _) in &case.params {
        let grad = &out[&format!("grad.{n}")];
        let base = feeds[*n].to_vec();
        let mut worst: f64 = 0.0;
        for e in 0..base.len() {
            let h = 1e-6;
            let mut v = base.clone();
            v[e] += h;
            let mut fp = feeds.clone();
            fp.insert(n.to_string(), Arc::new(v.clone()));
            v[e] -= 2.0 * h;
            let mut fm = feeds.clone();
            fm.insert(n.to_string(), Arc::new(v));
            let fd = (f(&fp) - f(&fm)) / (2.0 * h);
            let err = (fd - grad[e]).abs() / (1.0 + fd.abs());
            worst = worst.max(err);
        }
        assert!(
            worst < 1e-6,
            "{}: d/d{n}: worst relative error {worst:e}",
            case.name
        );
    }
}

/// `Σ c · square(a)` with a fixed weight per element, so every element's gradient differs.
fn weighted_square_sum(b: &mut GraphBuilder, a: NodeIndex) -> NodeIndex {
    let s = b.shape(a).clone();
    let rank = s.len();
    let sq = b.unary(Unary::Square, a);
    let t = b.unary(Unary::Sigmoid, a);
    let m = b.mul(sq, t);
    let all = b.add(
        Op::ReduceSum {
            axes: (0..rank).collect(),
        },
        &[m],
    );
    b.scale(all, 0.5)
}

#[test]
fn conv2d_gradients_match_finite_differences() {
    check(&Case {
        name: "conv2d",
        params: vec![("x", vec![2, 4, 3, 2]), ("k", vec![3, 2, 3, 3])],
        build: |b, p| {
            let y = b.add(Op::Conv2d, &[p[0], p[1]]);
            weighted_square_sum(b, y)
        },
        near_identity: false,
    });
    check(&Case {
        name: "conv2d_5x5_then_1x1",
        params: vec![
            ("x", vec![1, 5, 4, 1]),
            ("k", vec![2, 1, 5, 5]),
            ("k1", vec![3, 2, 1, 1]),
        ],
        build: |b, p| {
            let y = b.add(Op::Conv2d, &[p[0], p[1]]);
            let z = b.add(Op::Conv2d, &[y, p[2]]);
            weighted_square_sum(b, z)
        },
        near_identity: false,
    });
}

#[test]
fn shape_op_gradients_match_finite_differences() {
    check(&Case {
        name: "expand_permute_reshape_reduce",
        params: vec![("v", vec![3]), ("x", vec![2, 3, 4])],
        build: |b, p| {
            let e = b.add(
                Op::Expand {
                    to: vec![2, 3, 4],
                    axes: vec![0, 2],
                },
                &[p[0]],
            );
            let m = b.mul(e, p[1]);
            let t = b.add(
                Op::Permute {
                    perm: vec![2, 0, 1],
                },
                &[m],
            );
            let r = b.add(Op::Reshape { to: vec![8, 3] }, &[t]);
            let s = b.add(Op::ReduceSum { axes: vec![0] }, &[r]);
            let r2 = b.add(Op::Reshape { to: vec![1, 3] }, &[s]);
            weighted_square_sum(b, r2)
        },
        near_identity: false,
    });
}

#[test]
fn toeplitz_logdet_and_inverse_gradients_match_finite_differences() {
    // ln|det T(k)| + Σ weighted (T(k)⁻¹ x)²: the exact log-det and inverse of a conv layer.
    check(&Case {
        name: "toeplitz",
        params: vec![("k", vec![2, 2, 3, 3]), ("x", vec![2, 3, 3, 2])],
        build: |b, p| {
            let t = b.add(Op::Toeplitz { h: 3, w: 3 }, &[p[0]]);
            let ld = b.logdet(t);
            let ti = b.inverse(t);
            let flat = b.add(Op::Reshape { to: vec![18, 2] }, &[p[1]]);
            let z = b.matmul(ti, flat);
            let s = weighted_square_sum(b, z);
            b.add2(ld, s)
        },
        near_identity: true,
    });
}

#[test]
fn toeplitz_is_the_convolution_and_its_transpose_is_the_flipped_kernel() {
    let (c, h, w, k, batch) = (2, 4, 3, 3, 2);
    let mut b = GraphBuilder::new("identities");
    let kp = b.param("k", vec![c, c, k, k]);
    let x = b.param("x", vec![c, h, w, batch]);
    let conv = b.add(Op::Conv2d, &[x, kp]);
    let t = b.add(Op::Toeplitz { h, w }, &[kp]);
    let flat = b.add(
        Op::Reshape {
            to: vec![c * h * w, batch],
        },
        &[x],
    );
    let tx = b.matmul(t, flat);
    let conv_flat = b.add(
        Op::Reshape {
            to: vec![c * h * w, batch],
        },
        &[conv],
    );
    b.output("tx", tx);
    b.output("conv", conv_flat);
    let tt = b.transpose(t);
    let flipped = b.add(Op::FlipKernel, &[kp]);
    let tf = b.add(Op::Toeplitz { h, w }, &[flipped]);
    b.output("t_transposed", tt);
    b.output("t_of_flip", tf);
    let g = b.finish();
    let mut rng = Rng::new(3);
    let mut feeds: Feeds<f64> = HashMap::new();
    feeds.insert(
        "k".into(),
        Arc::new((0..c * c * k * k).map(|_| rng.normal()).collect()),
    );
    feeds.insert(
        "x".into(),
        Arc::new((0..c * h * w * batch).map(|_| rng.normal()).collect()),
    );
    let out = run(&g, &feeds);
    for (a, e) in out["tx"].iter().zip(&out["conv"]) {
        assert!((a - e).abs() < 1e-12, "{a} vs {e}");
    }
    assert_eq!(out["t_transposed"], out["t_of_flip"]);
}

#[test]
fn shape_rules_reject_what_does_not_fit() {
    let bad: Vec<(Op, Vec<Shape>)> = vec![
        (Op::Reshape { to: vec![5] }, vec![vec![2, 3]]),
        (Op::Permute { perm: vec![0, 0] }, vec![vec![2, 3]]),
        (Op::ReduceSum { axes: vec![1, 0] }, vec![vec![2, 3]]),
        (
            Op::Expand {
                to: vec![2, 3],
                axes: vec![0],
            },
            vec![vec![2]],
        ),
        (Op::Conv2d, vec![vec![2, 4, 4, 1], vec![3, 3, 3, 3]]),
        (Op::Conv2d, vec![vec![2, 4, 4, 1], vec![3, 2, 2, 2]]),
        (Op::Toeplitz { h: 4, w: 4 }, vec![vec![3, 2, 3, 3]]),
        (
            Op::ConvKernelGrad { k: 3 },
            vec![vec![3, 4, 4, 2], vec![2, 4, 5, 2]],
        ),
    ];
    for (op, ins) in bad {
        assert!(
            op.infer_shape(&ins).is_err(),
            "{op} of {ins:?} should not type-check"
        );
    }
    assert_eq!(
        Op::Conv2d.infer_shape(&[vec![2, 28, 28, 100], vec![16, 2, 3, 3]]),
        Ok(vec![16, 28, 28, 100])
    );
}

#[test]
fn the_gpu_backends_have_a_kernel_for_every_op_of_the_image_flows() {
    let mut b = GraphBuilder::new("conv");
    let x = b.input("x", vec![1, 4, 4, 2]);
    let k = b.param("k", vec![1, 1, 3, 3]);
    let y = b.add(Op::Conv2d, &[x, k]);
    b.output("y", y);
    let plan = snfc_compiler::plan::Plan::new(&b.finish());
    assert_eq!(snfc_runtime::cube::unsupported_op(&plan), None);
    for text in [
        include_str!("../../specs/mnist_cnn9.json"),
        include_str!("../../specs/mnist_cnn9_exact.json"),
    ] {
        let spec = snfc_compiler::spec::parse_spec(text).expect("spec");
        let c =
            snfc_compiler::compile::compile_train(&spec, 4, snfc_compiler::compile::OptLevel::Full)
                .expect("compiles");
        let plan = snfc_compiler::plan::Plan::new(&c.step);
        let op = snfc_runtime::cube::unsupported_op(&plan).map(|o| o.to_string());
        assert_eq!(op, None, "{}", spec.name);
    }
}

/// The 1×1-conv identities the rewriter uses (`logdet-of-pointwise-conv`,
/// `inverse-of-pointwise-conv`), both sides evaluated in f64: ln|det T(w)| = H·W·ln|det W| and
/// T(w)⁻¹ = T(W⁻¹) for a kernel `[C, C, 1, 1]` on H × W maps.
#[test]
fn a_pointwise_conv_is_block_diagonal() {
    let (c, h, w) = (3, 4, 5);
    let mut b = GraphBuilder::new("pointwise");
    let k = b.param("k", vec![c, c, 1, 1]);
    let t = b.add(Op::Toeplitz { h, w }, &[k]);
    let ld_dense = b.logdet(t);
    let inv_dense = b.inverse(t);
    let m = b.add(Op::Reshape { to: vec![c, c] }, &[k]);
    let ld_small = b.logdet(m);
    let hw = b.constant((h * w) as f64);
    let ld_block = b.mul(hw, ld_small);
    let inv_small = b.inverse(m);
    let kk = b.add(
        Op::Reshape {
            to: vec![c, c, 1, 1],
        },
        &[inv_small],
    );
    let inv_block = b.add(Op::Toeplitz { h, w }, &[kk]);
    b.output("ld_dense", ld_dense);
    b.output("ld_block", ld_block);
    b.output("inv_dense", inv_dense);
    b.output("inv_block", inv_block);
    let g = b.finish();
    let mut rng = Rng::new(41);
    let kv: Vec<f64> = (0..c * c)
        .map(|i| if i % (c + 1) == 0 { 1.5 } else { 0.0 } + 0.4 * rng.normal())
        .collect();
    let feeds: Feeds<f64> = HashMap::from([("k".to_string(), Arc::new(kv))]);
    let out = run(&g, &feeds);
    assert!((out["ld_dense"][0] - out["ld_block"][0]).abs() < 1e-9);
    for (a, b) in out["inv_dense"].iter().zip(&out["inv_block"]) {
        assert!((a - b).abs() < 1e-9, "{a} vs {b}");
    }
}
