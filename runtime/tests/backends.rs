//! One backend test suite, instantiated for `host`, `wgpu` and `cuda`: every kernel kind and
//! whole training steps against the host executor in f64, on fresh random inputs, with every
//! device buffer first filled with NaN so that an output element no kernel wrote shows up.
//!
//! `wgpu` runs wherever an adapter exists (in CI: Mesa's lavapipe on the CPU, installed by
//! `.ci/run`); `cuda` where a CUDA driver and device exist. A backend that is absent skips its
//! tests with a message on stderr (run with `--nocapture` to see it), unless `SNFC_REQUIRE_GPU`
//! names it (`probe::device_for_test`): `.ci/run` requires wgpu and lists the skips at the end.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::ir::lower::eval_graph;
use snfc_compiler::ir::{Graph, GraphBuilder, Op, SplinePart, Unary};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::{parse_spec, FlowSpec};
use snfc_runtime::backend::{open, open_variant, Backend, Draw};
use snfc_runtime::cube::matmul::{MatmulKernel, MatmulOptions, MatmulPrecision};
use snfc_runtime::cube::probe::{device_for_test, Chosen, DeviceKind};
use snfc_runtime::host::exec::{Executor, Feeds, Program};
use snfc_runtime::model::Model;
use std::sync::Arc;

mod common;
use common::Rng;

/// Relative error allowed in f32 against the f64 host.
const TOL: f64 = 1e-4;

/// Relative error allowed for products on tensor cores, whose operands are rounded to TF32
/// (a 10-bit mantissa: 2⁻¹¹ ≈ 5e-4 per operand, summed over the inner dimension).
const TF32_TOL: f64 = 1e-2;

/// Full f32 products, the first kernel that runs (no timing).
fn exact_products() -> MatmulOptions {
    MatmulOptions {
        precision: MatmulPrecision::F32,
        tune: false,
        only: None,
    }
}

/// Random feeds for every input and parameter of `g`, in `[lo, hi)`.
fn random_feeds(g: &Graph, rng: &mut Rng, lo: f64, hi: f64) -> Feeds<f64> {
    let p = Plan::new(g);
    p.feeds()
        .into_iter()
        .map(|(_, name, shape)| {
            let n = shape.iter().product::<usize>();
            let v: Vec<f64> = (0..n).map(|_| lo + (hi - lo) * rng.uniform()).collect();
            (name, Arc::new(v))
        })
        .collect()
}

/// Run `plan` on the device and compare every output with the host f64 run of the same plan.
fn check_plan(chosen: &Chosen, plan: Plan, feeds: &Feeds<f64>, what: &str) {
    check_variant(chosen, plan, feeds, what, exact_products())
}

fn check_variant(
    chosen: &Chosen,
    plan: Plan,
    feeds: &Feeds<f64>,
    what: &str,
    matmul: MatmulOptions,
) {
    let tol = if matmul.precision == MatmulPrecision::Tf32 {
        TF32_TOL
    } else {
        TOL
    };
    let want = Executor::<f64>::new()
        .run(&Program::from_plan(plan.clone()), feeds)
        .expect("host f64 run");
    let mut b: Box<dyn Backend<f32>> =
        open_variant(chosen, plan, true, matmul).expect("backend opens");
    for (name, v) in feeds {
        let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
        b.set(name, &v32).expect("set");
    }
    b.run().expect("device run");
    let got = b.outputs().expect("outputs");
    assert_eq!(got.len(), want.len(), "{what}: outputs");
    for ((gn, gt), (wn, wt)) in got.iter().zip(&want) {
        assert_eq!(gn, wn);
        assert_eq!(gt.shape, wt.shape, "{what}: {gn} shape");
        assert_eq!(gt.data.len(), wt.data.len(), "{what}: {gn} length");
        if let Some(k) = gt.data.iter().position(|v| v.is_nan()) {
            panic!(
                "{what} on {}: output {gn} element {k} was never written (NaN)",
                b.device()
            );
        }
        // Relative to the output's largest value, or absolute near 1e-6 for an output that is
        // zero in exact arithmetic (f32 rounding of ln 1, say).
        let scale = wt.data.iter().fold(1e-2f64, |m, v| m.max(v.abs()));
        let err = gt
            .data
            .iter()
            .zip(&wt.data)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err / scale <= tol,
            "{what} on {}: output {gn}: max error {err:.3e} relative to {scale:.3e}",
            b.device()
        );
    }
}

/// Whether the GEMM test runs `kernel` on `chosen`: tensor-core kernels on CUDA only (WGSL
/// has no cooperative matrices); the host has one GEMM, checked once.
fn runs_on(chosen: &Chosen, kernel: MatmulKernel) -> bool {
    match chosen {
        Chosen::Host => kernel == MatmulKernel::SimpleUnit,
        Chosen::Wgpu { .. } => !kernel.tensor_cores(),
        Chosen::Cuda { .. } => true,
    }
}

fn check_graph(chosen: &Chosen, g: &Graph, rng: &mut Rng, lo: f64, hi: f64, what: &str) {
    let feeds = random_feeds(g, rng, lo, hi);
    check_plan(chosen, Plan::new(g), &feeds, &format!("{what} (fused)"));
    check_plan(
        chosen,
        Plan::unfused(g),
        &feeds,
        &format!("{what} (unfused)"),
    );
}

/// GEMMs in all four operand layouts, with and without an epilogue into a plain or
/// transposed addend, at sizes that are not multiples of the tile.
fn gemm(chosen: &Chosen) {
    let mut rng = Rng::new(11);
    for (m, k, n) in [(5, 7, 3), (17, 33, 20), (40, 16, 1), (70, 41, 130)] {
        for ta in [false, true] {
            for tb in [false, true] {
                for epilogue in 0..3 {
                    let mut b = GraphBuilder::new("gemm");
                    let a = if ta {
                        let s = b.input("a", vec![k, m]);
                        b.transpose(s)
                    } else {
                        b.input("a", vec![m, k])
                    };
                    let bb = if tb {
                        let s = b.input("b", vec![n, k]);
                        b.transpose(s)
                    } else {
                        b.input("b", vec![k, n])
                    };
                    let p = b.matmul(a, bb);
                    let out = match epilogue {
                        0 => p,
                        1 => {
                            let c = b.input("c", vec![m, n]);
                            b.sub(c, p)
                        }
                        _ => {
                            let c = b.input("c", vec![n, m]);
                            let ct = b.transpose(c);
                            b.add2(p, ct)
                        }
                    };
                    b.output("out", out);
                    let g = b.finish();
                    let feeds = random_feeds(&g, &mut rng, -1.0, 1.0);
                    // Every cubek-matmul kernel the device runs (tensor-core kernels at
                    // TF32 tolerance; a kernel the device lacks is skipped by name).
                    for kernel in MatmulKernel::ALL {
                        let matmul = MatmulOptions {
                            precision: if kernel.tensor_cores() {
                                MatmulPrecision::Tf32
                            } else {
                                MatmulPrecision::F32
                            },
                            tune: false,
                            only: Some(kernel),
                        };
                        if !runs_on(chosen, kernel) {
                            continue;
                        }
                        let what = format!(
                            "gemm {m}x{k}x{n} ta={ta} tb={tb} epilogue={epilogue} {kernel:?}"
                        );
                        for plan in [Plan::new(&g), Plan::unfused(&g)] {
                            check_variant(chosen, plan, &feeds, &what, matmul.clone());
                        }
                    }
                }
            }
        }
    }
}

/// Every elementwise op, scalars and broadcasts, in one fused group and one by one.
fn elementwise(chosen: &Chosen) {
    let mut rng = Rng::new(12);
    let (r, c) = (13, 37);
    let mut b = GraphBuilder::new("elementwise");
    let x = b.input("x", vec![r, c]);
    let y = b.input("y", vec![r, c]);
    let row = b.input("row", vec![c]);
    let col = b.input("col", vec![r]);
    let s = b.input("s", vec![]);
    let e = b.unary(Unary::Exp, x);
    let l = b.unary(Unary::Log, e);
    let sp = b.unary(Unary::Softplus, y);
    let sg = b.unary(Unary::Sigmoid, x);
    let sq = b.unary(Unary::Square, y);
    let one = b.constant(1.5);
    let shifted = b.add2(sq, one);
    let rc = b.unary(Unary::Recip, shifted);
    let br = b.broadcast(row, vec![r, c], Some(0));
    let bc = b.broadcast(col, vec![r, c], Some(1));
    let bs = b.broadcast(s, vec![r, c], None);
    let t1 = b.mul(l, br);
    let t2 = b.sub(sp, bc);
    let t3 = b.mul(sg, bs);
    let t4 = b.add2(t1, t2);
    let t5 = b.add2(t4, t3);
    let t6 = b.mul(t5, rc);
    let t7 = b.neg(t6);
    let t8 = b.mul(t7, s);
    let xt = b.transpose(y);
    let yt = b.input("yt", vec![c, r]);
    let t9 = b.add2(xt, yt);
    // Glow's coupling network: relu (and its derivative, step) and tanh.
    let relu = b.unary(Unary::Relu, x);
    let step = b.unary(Unary::Step, y);
    let tanh = b.unary(Unary::Tanh, x);
    let rs = b.mul(relu, step);
    let glow = b.add2(rs, tanh);
    b.output("glow_units", glow);
    b.output("out", t8);
    b.output("recip", rc);
    b.output("transposed_sum", t9);
    let g = b.finish();
    check_graph(chosen, &g, &mut rng, -2.0, 2.0, "elementwise");
}

/// Sums over everything, over rows (per column) and over columns (per row), alone, as tails
/// of a fused group, and mixed in one group (which splits into separate launches).
fn reductions(chosen: &Chosen) {
    let mut rng = Rng::new(13);
    for (r, c) in [(9, 300), (300, 7), (1, 5)] {
        let mut b = GraphBuilder::new("sums");
        let x = b.input("x", vec![r, c]);
        let sq = b.unary(Unary::Square, x);
        let all = b.sum(sq, None);
        let per_col = b.sum(sq, Some(0));
        let e = b.unary(Unary::Exp, x);
        let per_row = b.sum(e, Some(1));
        let total = b.sum(x, None);
        b.output("all", all);
        b.output("per_col", per_col);
        b.output("per_row", per_row);
        b.output("total", total);
        let g = b.finish();
        check_graph(chosen, &g, &mut rng, -1.0, 1.0, &format!("sums {r}x{c}"));
        // One group per axis.
        for axis in [None, Some(0), Some(1)] {
            let mut b = GraphBuilder::new("sum");
            let x = b.input("x", vec![r, c]);
            let y = b.input("y", vec![r, c]);
            let m = b.mul(x, y);
            let s = b.sum(m, axis);
            b.output("m", m);
            b.output("s", s);
            let g = b.finish();
            check_graph(
                chosen,
                &g,
                &mut rng,
                -1.0,
                1.0,
                &format!("sum {axis:?} of {r}x{c}"),
            );
        }
    }
}

/// Inverse and log-determinant (Gauss–Jordan on a GPU, LU on the host) of matrices whose
/// rows must be swapped (the identity plus noise with its rows in reverse order, so every
/// diagonal entry is small), at sizes below, at and beyond the pivot search's 256 units, and
/// of a transposed view.
fn linalg(chosen: &Chosen) {
    let mut rng = Rng::new(14);
    for n in [1, 2, 12, 256, 301] {
        let mut b = GraphBuilder::new("linalg");
        let w = b.param("w", vec![n, n]);
        let inv = b.inverse(w);
        let ld = b.logdet(w);
        let wt = b.transpose(w);
        let inv_t = b.inverse(wt);
        let x = b.input("x", vec![n, 3]);
        let y = b.matmul(inv, x);
        b.output("y", y);
        b.output("inverse", inv);
        b.output("inverse_of_transpose", inv_t);
        b.output("logdet", ld);
        let g = b.finish();
        let mut feeds = random_feeds(&g, &mut rng, -0.1, 0.1);
        let mut wv = (*feeds["w"]).clone();
        for i in 0..n {
            // Row n−1−i holds the unit entry of column i; some rows change sign.
            wv[(n - 1 - i) * n + i] += if i % 3 == 0 { -1.0 } else { 1.0 };
        }
        feeds.insert("w".into(), Arc::new(wv));
        check_plan(
            chosen,
            Plan::new(&g),
            &feeds,
            &format!("inverse and logdet n={n}"),
        );
    }
}

/// A singular matrix: LU (on the host, or the host's LU that `open` gives a CPU adapter)
/// refuses it with a zero pivot; the device's Gauss–Jordan gives no finite entry, which a
/// step's non-finite check catches.
fn singular_inverse(chosen: &Chosen) {
    let n = 4;
    let mut b = GraphBuilder::new("singular");
    let w = b.param("w", vec![n, n]);
    let inv = b.inverse(w);
    b.output("inverse", inv);
    let g = b.finish();
    // Rows 0 and 2 equal: rank 3.
    let w: Vec<f32> = vec![
        1.0, 2.0, 0.5, -1.0, 0.0, 1.0, 3.0, 2.0, 1.0, 2.0, 0.5, -1.0, 4.0, 0.0, 1.0, 1.0,
    ];
    for elimination_everywhere in [true, false] {
        let plan = Plan::new(&g);
        let mut dev: Box<dyn Backend<f32>> = if elimination_everywhere {
            open_variant(chosen, plan, false, exact_products())
        } else {
            open(chosen, plan, MatmulPrecision::F32)
        }
        .expect("device");
        let by_lu = *chosen == Chosen::Host || (!elimination_everywhere && chosen.is_cpu_adapter());
        dev.set("w", &w).expect("set");
        match dev.run() {
            Err(e) => {
                assert!(by_lu, "the device's elimination gives no error: {e}");
                assert!(e.to_string().contains("singular"), "{e}");
            }
            Ok(()) => {
                assert!(!by_lu, "LU refuses a singular matrix");
                let out = dev.output("inverse").expect("output");
                assert!(
                    out.data.iter().all(|v| !v.is_finite()),
                    "inverse of a singular matrix on {}: {:?}",
                    dev.device(),
                    out.data
                );
            }
        }
    }
}

fn spec(text: &str) -> FlowSpec {
    parse_spec(text).expect("spec")
}

fn small_spec(gradient: &str) -> FlowSpec {
    spec(&format!(
        r#"{{"name": "small", "input": {{"shape": [24], "preprocess": "none"}},
            "layers": [{{"type": "linear", "bias": true}}, {{"type": "smooth_leaky_relu", "alpha": 0.3}},
                       {{"type": "linear", "bias": true}}, {{"type": "smooth_leaky_relu", "alpha": 0.3}},
                       {{"type": "linear", "bias": false}}],
            "objective": {{"gradient": "{gradient}", "lambda": 1.0}},
            "train": {{"batch_size": 10}}}}"#
    ))
}

fn step_feeds(spec: &FlowSpec, batch: usize, seed: u64, eight_bit: bool) -> Feeds<f64> {
    let mut rng = Rng::new(seed);
    let model = Model::<f64>::init(spec, seed);
    let mut f: Feeds<f64> = model.values.clone();
    // Perturb R away from W⁻¹ so the reconstruction terms are not zero.
    for (name, v) in f.iter_mut() {
        if name.ends_with("weight_inv") {
            let p: Vec<f64> = v.iter().map(|x| x + 0.01 * (rng.uniform() - 0.5)).collect();
            *v = Arc::new(p);
        }
    }
    let d = spec.input.dim();
    let x: Vec<f64> = (0..d * batch)
        .map(|_| {
            if eight_bit {
                (rng.uniform() * 256.0).floor()
            } else {
                rng.uniform() * 2.0 - 1.0
            }
        })
        .collect();
    let u: Vec<f64> = (0..d * batch).map(|_| rng.uniform()).collect();
    f.insert("x".into(), Arc::new(x));
    f.insert("noise".into(), Arc::new(u));
    f
}

/// Every tensor op of rank above 2 — reshape (also of a transposed view), permute, expand,
/// reduce_sum, conv2d (C_in ≠ C_out, K = 1, 3, 5), its kernel gradient, flip_kernel, toeplitz,
/// toeplitz_adjoint, multiplicity and a rank-4 elementwise product.
fn tensor_ops(chosen: &Chosen) {
    let mut rng = Rng::new(15);
    // The last two have enough pixels (h·w·batch ≥ 1024) that the GPU kernel gradient splits
    // them across cube layers (2 and 6 slices, neither a multiple of the staged depth) and
    // more than one 64-row tile of output channels.
    for (ci, co, h, w, batch, k) in [
        (2, 3, 5, 4, 3, 3),
        (3, 2, 4, 4, 2, 1),
        (1, 2, 6, 5, 4, 5),
        (3, 70, 8, 7, 25, 3),
        (5, 2, 9, 9, 40, 1),
    ] {
        let mut b = GraphBuilder::new("conv");
        let x = b.input("x", vec![ci, h, w, batch]);
        let kern = b.param("k", vec![co, ci, k, k]);
        let dy = b.input("dy", vec![co, h, w, batch]);
        let y = b.add(Op::Conv2d, &[x, kern]);
        let flipped = b.add(Op::FlipKernel, &[kern]);
        // The input gradient of the conv: dy convolved with the flipped kernel.
        let dx = b.add(Op::Conv2d, &[dy, flipped]);
        let dk = b.add(Op::ConvKernelGrad { k }, &[dy, x]);
        let m = b.add(Op::Multiplicity { h, w }, &[kern]);
        let prod = b.mul(y, dy);
        b.output("y", y);
        b.output("dx", dx);
        b.output("dk", dk);
        b.output("flipped", flipped);
        b.output("k_times_m", m);
        b.output("y_dy", prod);
        let g = b.finish();
        check_graph(
            chosen,
            &g,
            &mut rng,
            -1.0,
            1.0,
            &format!("conv {ci}->{co} {h}x{w} k{k} b{batch}"),
        );
    }
    // The dense operator of a C → C conv and its adjoint.
    let (c, h, w) = (2, 3, 4);
    let mut b = GraphBuilder::new("toeplitz");
    let kern = b.param("k", vec![c, c, 3, 3]);
    let n = c * h * w;
    let gm = b.input("g", vec![n, n]);
    let t = b.add(Op::Toeplitz { h, w }, &[kern]);
    let adj = b.add(Op::ToeplitzAdjoint { h, w, k: 3 }, &[gm]);
    let gt = b.transpose(gm);
    let adj_t = b.add(Op::ToeplitzAdjoint { h, w, k: 3 }, &[gt]);
    b.output("t", t);
    b.output("adjoint", adj);
    b.output("adjoint_of_transpose", adj_t);
    let g = b.finish();
    check_graph(chosen, &g, &mut rng, -1.0, 1.0, "toeplitz and adjoint");
    // Shape ops of any rank, and reshapes of a transposed view.
    let mut b = GraphBuilder::new("shapes");
    let x = b.input("x", vec![3, 4, 2, 5]);
    let v = b.input("v", vec![4, 5]);
    let p = b.add(
        Op::Permute {
            perm: vec![2, 0, 3, 1],
        },
        &[x],
    );
    let e = b.add(
        Op::Expand {
            to: vec![3, 4, 2, 5],
            axes: vec![0, 2],
        },
        &[v],
    );
    let prod = b.mul(x, e);
    let r1 = b.add(Op::ReduceSum { axes: vec![1, 3] }, &[prod]);
    let r2 = b.add(
        Op::ReduceSum {
            axes: vec![0, 1, 2, 3],
        },
        &[x],
    );
    let r3 = b.add(Op::ReduceSum { axes: vec![0] }, &[x]);
    let m = b.input("m", vec![6, 7]);
    let mt = b.transpose(m);
    let flat = b.add(Op::Reshape { to: vec![7, 3, 2] }, &[mt]);
    let back = b.add(Op::Reshape { to: vec![6, 7] }, &[flat]);
    // Long sums (1,200 entries per output) take two gather passes.
    let big = b.input("big", vec![2, 40, 30]);
    let long_sum = b.add(Op::ReduceSum { axes: vec![1, 2] }, &[big]);
    b.output("long_sum", long_sum);
    b.output("permuted", p);
    b.output("expanded_product", prod);
    b.output("sum_1_3", r1);
    b.output("sum_all", r2);
    b.output("sum_0", r3);
    b.output("reshaped_transpose", flat);
    b.output("reshaped_back", back);
    let g = b.finish();
    check_graph(chosen, &g, &mut rng, -1.0, 1.0, "shape ops");
}

/// The spline's value, log-det and every VJP, with inputs inside and beyond the tail bound.
fn spline_ops(chosen: &Chosen) {
    let mut rng = Rng::new(16);
    for (bins, d, n) in [(5, 7, 9), (1, 3, 4), (8, 4, 33)] {
        let bound = 3.0f64;
        let mut b = GraphBuilder::new("spline");
        let x = b.input("x", vec![d, n]);
        let wd = b.param("widths", vec![d, bins]);
        let ht = b.param("heights", vec![d, bins]);
        let dv = b.param("derivatives", vec![d, bins - 1]);
        let g = b.input("g", vec![d, n]);
        let args = [x, wd, ht, dv];
        for part in [SplinePart::Value, SplinePart::LogDet] {
            let op = Op::Spline {
                bins,
                bound: bound.to_bits(),
                part,
            };
            let v = b.add(op, &args);
            b.output(&format!("{part:?}"), v);
            for wrt in 0..4 {
                if bins == 1 && wrt == 3 {
                    continue;
                }
                let op = Op::SplineGrad {
                    bins,
                    bound: bound.to_bits(),
                    part,
                    wrt,
                };
                let v = b.add(op, &[x, wd, ht, dv, g]);
                b.output(&format!("grad {part:?} wrt {wrt}"), v);
            }
        }
        // Both cotangents in one pass.
        let gl = b.input("gl", vec![d, n]);
        for wrt in 0..if bins == 1 { 3 } else { 4 } {
            let op = Op::SplineGrad {
                bins,
                bound: bound.to_bits(),
                part: SplinePart::Both,
                wrt,
            };
            let v = b.add(op, &[x, wd, ht, dv, g, gl]);
            b.output(&format!("grad of both wrt {wrt}"), v);
        }
        let graph = b.finish();
        // x in [−4, 4): some inputs take the identity tails.
        let feeds = random_feeds(&graph, &mut rng, -4.0, 4.0);
        let what = format!("spline {bins} bins {d}x{n}");
        check_plan(chosen, Plan::new(&graph), &feeds, &what);
    }
}

/// A small image flow of every image layer (actnorm, conv, spline, squeeze, affine coupling,
/// split, a linear layer on the flattened image), self-normalizing and exact: whole steps at every optimization level.
fn image_spec(gradient: &str) -> FlowSpec {
    spec(&format!(
        r#"{{"name": "tiny_cnn", "input": {{"shape": [1, 4, 4], "preprocess": "none"}},
            "layers": [{{"type": "actnorm"}},
                       {{"type": "conv", "kernel_size": 3, "bias": true}},
                       {{"type": "spline", "bins": 4, "tail_bound": 3}},
                       {{"type": "squeeze"}},
                       {{"type": "affine_coupling", "width": 3}},
                       {{"type": "split"}},
                       {{"type": "conv", "kernel_size": 3, "bias": true}},
                       {{"type": "spline", "bins": 4, "tail_bound": 3}},
                       {{"type": "conv", "kernel_size": 1, "bias": false}},
                       {{"type": "linear", "bias": true}}],
            "objective": {{"gradient": "{gradient}", "lambda": 1.0}},
            "train": {{"batch_size": 6}}}}"#
    ))
}

fn image_steps(chosen: &Chosen) {
    for s in [image_spec("self_normalizing"), image_spec("exact")] {
        let batch = 6;
        let feeds = step_feeds(&s, batch, 17, false);
        for level in [OptLevel::None, OptLevel::Substitution, OptLevel::Full] {
            let c = compile_train(&s, batch, level).expect("the spec compiles");
            check_plan(
                chosen,
                Plan::for_level(&c.step, level),
                &feeds,
                &format!("{} {:?} step at {level:?}", s.name, s.objective.gradient),
            );
        }
        check_plan(
            chosen,
            Plan::new(&eval_graph(&s, batch)),
            &feeds,
            &format!("{} eval", s.name),
        );
    }
}

/// Whole training steps (every level of optimization), and the evaluation graph.
fn training_steps(chosen: &Chosen) {
    for (s, batch, eight_bit) in [
        (small_spec("self_normalizing"), 10, false),
        (small_spec("exact"), 10, false),
        (spec(include_str!("../../specs/mnist_fc2.json")), 8, true),
    ] {
        let feeds = step_feeds(&s, batch, 5, eight_bit);
        for level in [OptLevel::None, OptLevel::Substitution, OptLevel::Full] {
            let c = compile_train(&s, batch, level).expect("the spec compiles");
            check_plan(
                chosen,
                Plan::for_level(&c.step, level),
                &feeds,
                &format!("{} step at {level:?}", s.name),
            );
        }
        check_plan(
            chosen,
            Plan::new(&eval_graph(&s, batch)),
            &feeds,
            &format!("{} eval", s.name),
        );
    }
}

/// Adam on the device equals Adam on the host over several steps, for the FC flow and for the
/// paper's 9-layer CNN (`specs/mnist_cnn9.json`): a few training steps on the device match the
/// host.
fn adam(chosen: &Chosen) {
    // Adam divides by √v: an element whose gradient is rounding noise moves by up to the
    // learning rate in either direction, so the CNN's updates agree only to 10% of the largest
    // one (a wrong sign misses by 200%); its first-step gradients and its loss after the steps
    // are compared at the strict tolerance.
    for (s, batch, steps, tol) in [
        (small_spec("self_normalizing"), 10, 3, TOL),
        (spec(include_str!("../../specs/mnist_cnn9.json")), 4, 3, 0.1),
    ] {
        train_like_host(chosen, &s, batch, steps, tol);
    }
}

/// `steps` training steps (run + Adam) on the device and on the host in f64: the first step's
/// loss and gradients and every parameter's total update agree.
fn train_like_host(chosen: &Chosen, s: &FlowSpec, batch: usize, steps: usize, tol: f64) {
    let c = compile_train(s, batch, OptLevel::Full).expect("the spec compiles");
    let plan = Plan::new(&c.step);
    let eight_bit = s.input.preprocess != snfc_compiler::spec::Preprocess::None;
    let feeds = step_feeds(s, batch, 9, eight_bit);
    let mut host: Box<dyn Backend<f64>> =
        open(&Chosen::Host, plan.clone(), MatmulPrecision::F32).expect("host");
    let mut dev: Box<dyn Backend<f32>> = open(chosen, plan, MatmulPrecision::F32).expect("device");
    for (name, v) in &feeds {
        host.set(name, v).expect("set");
        let v32: Vec<f32> = v.iter().map(|x| *x as f32).collect();
        dev.set(name, &v32).expect("set");
    }
    let device = dev.device();
    let close = |got: &[f32], want: &[f64], tol: f64, what: &str| {
        let scale = want.iter().fold(1e-12f64, |m, v| m.max(v.abs()));
        let err = got
            .iter()
            .zip(want)
            .map(|(a, b)| (*a as f64 - b).abs())
            .fold(0.0, f64::max);
        assert!(
            err / scale <= tol,
            "{} on {device}: {what}: error {err:.3e} of {scale:.3e}",
            s.name,
        );
    };
    for step in 1..=steps {
        host.run().expect("run");
        dev.run().expect("run");
        if step == 1 {
            for (name, want) in host.outputs().expect("outputs") {
                let got = dev.output(&name).expect("output");
                close(&got.data, &want.data, TOL, &format!("first step, {name}"));
            }
        }
        // The learned inverses step 3× faster (inverse_lr_scale), the same on every backend.
        let mut lr = snfc_runtime::train::LearningRates::for_spec(s, 1e-3 * step as f64);
        lr.inverse_scale = 3.0;
        // The global gradient norm (for clipping) agrees; the last step scales the gradients
        // by ½ (as clipping would) on both.
        let (hn, dn) = (
            host.grad_norm().expect("norm"),
            dev.grad_norm().expect("norm"),
        );
        assert!((hn - dn).abs() <= TOL * hn, "grad norm {hn} vs {dn}");
        let scale = if step == steps { 0.5 } else { 1.0 };
        host.adam_step(&lr, [0.9, 0.999], 1e-8, scale)
            .expect("adam");
        dev.adam_step(&lr, [0.9, 0.999], 1e-8, scale).expect("adam");
    }
    host.run().expect("run");
    dev.run().expect("run");
    let (want, got) = (
        host.output("loss").expect("loss"),
        dev.output("loss").expect("loss"),
    );
    close(
        &got.data,
        &want.data,
        TOL,
        &format!("loss after {steps} Adam steps"),
    );
    // Several scalars in one read-back (the loss and GECO's reconstruction errors): each is
    // the first value of its output; an unknown name is an error naming it.
    let names: Vec<String> = ["loss", "loss"]
        .iter()
        .map(|s| s.to_string())
        .chain(host.outputs().expect("outputs").into_iter().map(|(n, _)| n))
        .collect();
    let (hv, dv) = (
        host.scalars(&names).expect("scalars"),
        dev.scalars(&names).expect("scalars"),
    );
    assert_eq!((hv.len(), dv.len()), (names.len(), names.len()));
    assert_eq!(dv[0], got.data[0] as f64);
    for (k, name) in names.iter().enumerate() {
        let first = dev.output(name).expect("output").data[0] as f64;
        assert_eq!(dv[k], first, "{name}");
        // Against the host, at the tolerance the steps' outputs agree to (relative to the
        // output's largest value: after Adam steps, an element that was rounding noise may
        // differ by more than its own size).
        let scale = host
            .output(name)
            .expect("output")
            .data
            .iter()
            .fold(1.0f64, |m, v| m.max(v.abs()));
        assert!(
            (hv[k] - dv[k]).abs() <= tol.max(1e-3) * scale,
            "{name}: host {} vs {device} {}",
            hv[k],
            dv[k]
        );
    }
    let e = dev.scalars(&["no_such_output".to_string()]).unwrap_err();
    assert!(e.to_string().contains("no_such_output"), "{e}");
    // Adam's state as a resumed run reads it back: the same step count and moments.
    let (hs, ds) = (
        host.adam_state().expect("state"),
        dev.adam_state().expect("state"),
    );
    assert_eq!((hs.t, hs.moments.len()), (ds.t, ds.moments.len()));
    for (name, (m, v)) in &hs.moments {
        let (dm, dv) = &ds.moments[name];
        close(dm, m, 1e-3, &format!("Adam m of {name}"));
        close(dv, v, 1e-3, &format!("Adam v of {name}"));
    }
    // The divergence guard: finite gradients pass; a NaN in the batch is reported by both.
    assert_eq!(host.first_nonfinite_grad().expect("check"), None);
    assert_eq!(dev.first_nonfinite_grad().expect("check"), None);
    let mut x = feeds["x"].to_vec();
    x[0] = f64::NAN;
    host.set("x", &x).expect("set");
    dev.set("x", &x.iter().map(|v| *v as f32).collect::<Vec<_>>())
        .expect("set");
    host.run().expect("run");
    dev.run().expect("run");
    assert!(host.first_nonfinite_grad().expect("check").is_some());
    assert!(
        dev.first_nonfinite_grad().expect("check").is_some(),
        "{device}"
    );
    // The step's read-back names the same parameter on both, with a non-finite norm.
    let loss = ["loss".to_string()];
    let (hr, dr) = (
        host.step_readback(&loss, true).expect("read-back"),
        dev.step_readback(&loss, true).expect("read-back"),
    );
    assert_eq!(hr.nonfinite, dr.nonfinite, "{device}");
    assert!(!dr.norm.expect("norm").is_finite(), "{device}");
    for name in Model::<f64>::init(s, 0).values.keys() {
        let start = &feeds[name];
        let want: Vec<f64> = host
            .fed(name)
            .expect("param")
            .iter()
            .zip(start.iter())
            .map(|(p, p0)| p - p0)
            .collect();
        let got: Vec<f32> = dev
            .fed(name)
            .expect("param")
            .iter()
            .zip(start.iter())
            .map(|(p, p0)| (*p as f64 - p0) as f32)
            .collect();
        close(
            &got,
            &want,
            tol,
            &format!("update of {name} after {steps} Adam steps"),
        );
    }
}

/// A training step as `train` runs it talks to the device once each way: one upload (the
/// batch) and one read (the loss with every gradient's Σ g², from which the norm and the
/// non-finite check come); its launches are the plan's kernels, the gradient sums' one and
/// Adam's one (five parameters: within one launch's bindings on lavapipe too). So does an
/// exact step: its inverses are computed on the device, not read back and uploaded — except
/// where `open` gives a CPU adapter the host's LU (one read and one upload per inverse, no
/// launch). The host has no device traffic.
fn step_traffic(chosen: &Chosen) {
    step_traffic_of(chosen, "self_normalizing", false);
    step_traffic_of(chosen, "exact", false);
    step_traffic_of(chosen, "exact", true);
}

fn step_traffic_of(chosen: &Chosen, gradient: &str, elimination_everywhere: bool) {
    let s = spec(&format!(
        r#"{{"name": "two", "input": {{"shape": [24], "preprocess": "none"}},
            "layers": [{{"type": "linear", "bias": true}}, {{"type": "smooth_leaky_relu", "alpha": 0.3}},
                       {{"type": "linear", "bias": false}}],
            "objective": {{"gradient": "{gradient}"}},
            "train": {{"batch_size": 10}}}}"#
    ));
    let batch = 10;
    let c = compile_train(&s, batch, OptLevel::Full).expect("the spec compiles");
    let inverses = c.step.count(|op| *op == snfc_compiler::ir::Op::Inverse);
    assert_eq!(
        inverses > 0,
        gradient == "exact",
        "{gradient}: inverses in the step"
    );
    let feeds = step_feeds(&s, batch, 4, false);
    let plan = Plan::new(&c.step);
    let mut dev: Box<dyn Backend<f32>> = if elimination_everywhere {
        open_variant(chosen, plan, false, exact_products())
    } else {
        open(chosen, plan, MatmulPrecision::F32)
    }
    .expect("device");
    for (name, v) in &feeds {
        dev.set(name, &v.iter().map(|x| *x as f32).collect::<Vec<_>>())
            .expect("set");
    }
    let x: Vec<f32> = feeds["x"].iter().map(|v| *v as f32).collect();
    let host_lus = if chosen.is_cpu_adapter() && !elimination_everywhere {
        inverses as u64
    } else {
        0
    };
    let lr = snfc_runtime::train::LearningRates::for_spec(&s, 1e-3);
    let names = ["loss".to_string()];
    let step = |dev: &mut Box<dyn Backend<f32>>| {
        dev.set("x", &x).expect("set");
        dev.run().expect("run");
        let read = dev.step_readback(&names, true).expect("read-back");
        dev.adam_step(&lr, [0.9, 0.999], 1e-8, 1.0).expect("adam");
        read
    };
    // The first step also creates Adam's moments and picks the products' kernels.
    step(&mut dev);
    let Some(before) = dev.traffic() else {
        assert_eq!(*chosen, Chosen::Host, "a GPU backend counts its traffic");
        return;
    };
    let steps = 3;
    for _ in 0..steps {
        let read = step(&mut dev);
        assert!(read.scalars[0].is_finite() && read.nonfinite.is_none());
        assert!(read.norm.is_some_and(|n| n.is_finite() && n > 0.0));
    }
    let after = dev.traffic().expect("traffic");
    let device = dev.device();
    assert_eq!(
        after.reads - before.reads,
        steps * (1 + host_lus),
        "{gradient}: reads on {device}"
    );
    assert_eq!(
        after.uploads - before.uploads,
        steps * (1 + host_lus),
        "{gradient}: uploads on {device}"
    );
    assert_eq!(
        after.launches - before.launches,
        steps * (dev.kernels() as u64 + 2),
        "{gradient}: launches on {device}"
    );
}

/// GECO's λ and reconstruction EMA stay where the step runs: the step computes their update
/// (its `next.*` outputs), `carry` hands them to the next step's inputs, and the values read
/// back with the loss follow the host's rule (f64, from the same step's errors) within f32
/// rounding. After the first step, which feeds the EMA's decay once, a step uploads only the
/// batch and reads once. A `set` after `carry` wins for its input.
fn geco_state_carried(chosen: &Chosen) {
    use snfc_compiler::ir::lower::GECO_EMA_WEIGHT_INPUT;
    use snfc_runtime::train::Geco;
    use std::collections::BTreeMap;
    let s = spec(
        r#"{"name": "geco", "input": {"shape": [24], "preprocess": "none"},
            "layers": [{"type": "linear"}, {"type": "smooth_leaky_relu", "alpha": 0.3},
                       {"type": "linear"}],
            "objective": {"lambda": {"geco": {"lambda0": 2.0, "lr": 30.0, "ema": 0.8,
                                              "min": 0.5, "max": 3.0}}},
            "train": {"batch_size": 10}}"#,
    );
    let batch = 10;
    let c = compile_train(&s, batch, OptLevel::Full).expect("the spec compiles");
    let feeds = step_feeds(&s, batch, 5, false);
    let mut dev: Box<dyn Backend<f32>> =
        open(chosen, Plan::new(&c.step), MatmulPrecision::F32).expect("device");
    for (name, v) in &feeds {
        dev.set(name, &v.iter().map(|x| *x as f32).collect::<Vec<_>>())
            .expect("set");
    }
    let gs = *s.objective.lambda.geco().expect("GECO");
    let mut state = Geco::new(&s).expect("GECO layers");
    for (name, v) in state.feeds(&gs) {
        dev.set(&name, &[v as f32]).expect("set");
    }
    let mut names = vec!["loss".to_string()];
    names.extend(state.read_back());
    let layers = state.lambda.len();
    let x: Vec<f32> = feeds["x"].iter().map(|v| *v as f32).collect();
    let lr = snfc_runtime::train::LearningRates::for_spec(&s, 1e-3);
    let device = dev.device();
    // One step; the device's λ and EMA against the host's rule from `state`.
    let step = |dev: &mut Box<dyn Backend<f32>>, state: &Geco, what: &str| -> Geco {
        dev.set("x", &x).expect("set");
        dev.run().expect("run");
        let read = dev.step_readback(&names, false).expect("read-back");
        let recon: BTreeMap<String, f64> = state
            .lambda
            .keys()
            .cloned()
            .zip(read.scalars[1..=layers].iter().copied())
            .collect();
        let mut host = state.clone();
        host.update(&gs, &recon);
        let mut got = state.clone();
        got.take_next(&read.scalars[1 + layers..]);
        for layer in host.lambda.keys() {
            let (want, have) = (host.lambda[layer], got.lambda[layer]);
            assert!(
                (want - have).abs() <= 1e-5 * want,
                "{what}, {layer} on {device}: λ {have}, host rule {want}"
            );
            let (want, have) = (host.ema[layer].unwrap(), got.ema[layer].unwrap());
            assert!(
                (want - have).abs() <= 1e-5 * want.abs() + 1e-9,
                "{what}, {layer} on {device}: EMA {have}, host rule {want}"
            );
        }
        dev.adam_step(&lr, [0.9, 0.999], 1e-8, 1.0).expect("adam");
        got
    };
    state = step(&mut dev, &state, "step 1");
    dev.carry().expect("carry");
    dev.set(GECO_EMA_WEIGHT_INPUT, &[gs.ema as f32])
        .expect("set");
    let before = dev.traffic();
    let steps = 4;
    for k in 0..steps {
        state = step(&mut dev, &state, &format!("step {}", k + 2));
        dev.carry().expect("carry");
    }
    if let (Some(before), Some(after)) = (before, dev.traffic()) {
        assert_eq!(after.uploads - before.uploads, steps, "uploads on {device}");
        assert_eq!(after.reads - before.reads, steps, "reads on {device}");
    }
    assert!(
        state.lambda.values().all(|l| (l - 2.0).abs() > 1e-3),
        "λ moved: {:?}",
        state.lambda
    );
    // A carried input reads as its carried value before the next run.
    let carried = dev.fed("lambda.layers.0").expect("fed");
    assert_eq!(f64::from(carried[0]), state.lambda["layers.0"]);
    // A set after carry wins for its input; the other keeps its carried value.
    dev.carry().expect("carry");
    dev.set("lambda.layers.0", &[1.0]).expect("set");
    state.lambda.insert("layers.0".into(), 1.0);
    step(&mut dev, &state, "after a set");
}

/// Uniform noise drawn on the device (cubek-random): every value in [0, 1), mean ½ and
/// variance 1/12 within 5 standard errors over 300,000 draws, no two neighbours correlated
/// beyond noise; the same seed draws the same values, another seed others. Then a normal
/// latent (below). The host draws on the host (the caller's generator), so it has nothing to
/// check.
fn device_noise(chosen: &Chosen) {
    let (d, batch) = (300, 1000);
    let mut b = GraphBuilder::new("noise");
    let u = b.input("noise", vec![d, batch]);
    let two = b.constant(2.0);
    let out = b.mul(u, two);
    b.output("twice", out);
    let g = b.finish();
    let mut dev: Box<dyn Backend<f32>> =
        open(chosen, Plan::new(&g), MatmulPrecision::F32).expect("device");
    if !dev.draws_on_device() {
        assert_eq!(*chosen, Chosen::Host);
        assert!(dev.draw("noise", 1, Draw::Uniform).is_err());
        return;
    }
    let mut draw = |seed: u64| -> Vec<f64> {
        dev.draw("noise", seed, Draw::Uniform).expect("draw");
        dev.run().expect("run");
        let twice = dev.output("twice").expect("output").data;
        twice.iter().map(|v| f64::from(*v) / 2.0).collect()
    };
    let first = draw(7);
    let n = first.len() as f64;
    assert!(first.iter().all(|v| (0.0..1.0).contains(v)));
    let mean = first.iter().sum::<f64>() / n;
    let var = first.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    // Standard errors: of the mean √(1/12/n); of the variance √(1/180/n) for U(0, 1).
    assert!(
        (mean - 0.5).abs() < 5.0 * (1.0 / 12.0 / n).sqrt(),
        "mean {mean}"
    );
    assert!(
        (var - 1.0 / 12.0).abs() < 5.0 * (1.0 / 180.0 / n).sqrt(),
        "variance {var}"
    );
    let lag1 = first
        .windows(2)
        .map(|w| (w[0] - mean) * (w[1] - mean))
        .sum::<f64>()
        / (n - 1.0)
        / var;
    assert!(lag1.abs() < 5.0 / n.sqrt(), "neighbour correlation {lag1}");
    assert_eq!(draw(7), first, "the same seed draws the same values");
    let other = draw(8);
    let same = other.iter().zip(&first).filter(|(a, b)| a == b).count();
    assert!(
        same < first.len() / 100,
        "another seed: {same} equal values"
    );
    // A sampling latent: N(0, σ²) with σ = 0.7; mean, variance and the share beyond 2σ
    // (4.55 %) within 5 standard errors.
    let sigma = 0.7f64;
    dev.draw("noise", 9, Draw::Normal { std: sigma as f32 })
        .expect("draw");
    dev.run().expect("run");
    let normal: Vec<f64> = dev
        .output("twice")
        .expect("output")
        .data
        .iter()
        .map(|v| f64::from(*v) / 2.0)
        .collect();
    let mean = normal.iter().sum::<f64>() / n;
    let var = normal.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
    assert!(mean.abs() < 5.0 * sigma / n.sqrt(), "normal mean {mean}");
    assert!(
        (var - sigma * sigma).abs() < 5.0 * sigma * sigma * (2.0 / n).sqrt(),
        "normal variance {var}"
    );
    let p = 0.0455;
    let tails = normal.iter().filter(|v| v.abs() > 2.0 * sigma).count() as f64 / n;
    assert!(
        (tails - p).abs() < 5.0 * (p * (1.0 - p) / n).sqrt(),
        "share beyond 2σ {tails}"
    );
}

/// One `#[test]` per check, run on the device of `$kind` (skipped when it is absent).
macro_rules! backend_suite {
    ($module:ident, $kind:expr) => {
        mod $module {
            use super::*;
            backend_suite!(@tests $kind;
                gemm_layouts_and_epilogues => gemm,
                fused_elementwise_ops => elementwise,
                sums_and_fused_reduction_tails => reductions,
                inverse_and_logdet => linalg,
                inverse_of_a_singular_matrix => singular_inverse,
                tensor_ops_of_any_rank => tensor_ops,
                spline_values_and_vjps => spline_ops,
                image_flow_steps_and_eval => image_steps,
                whole_training_steps_and_eval => training_steps,
                adam_update_fc_and_cnn => adam,
                one_read_and_one_upload_per_step => step_traffic,
                geco_state_carried_on_the_device => geco_state_carried,
                noise_drawn_on_the_device => device_noise);
        }
    };
    (@tests $kind:expr; $($name:ident => $check:ident),*) => {
        $(
            #[test]
            fn $name() {
                let test = concat!(module_path!(), "::", stringify!($name));
                if let Some(d) = device_for_test($kind, test) {
                    $check(&d)
                }
            }
        )*
    };
}

backend_suite!(host, DeviceKind::Host);
backend_suite!(wgpu, DeviceKind::Wgpu);
backend_suite!(cuda, DeviceKind::Cuda);
