//! The exact CNN step inverts the dense Toeplitz matrix of every conv. At initialization the
//! kernel is near the identity, so the inverse's entries decay geometrically away from the band
//! and most of them are subnormal in f32: without flushing them to zero an Intel core ran this
//! inverse ten times slower than the same inverse of random data. This test compares the two in
//! one run (a ratio, not a time) and checks that the matrix really is the subnormal case.
//!
//! It is the only test in its binary, so no other test shares the cores while it times.

use snfc_compiler::spec::parse_spec;
use snfc_runtime::host::{linalg, shape_ops};
use snfc_runtime::model::Model;
use std::time::Instant;

fn min_seconds(reps: usize, mut f: impl FnMut()) -> f64 {
    (0..reps)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

#[test]
fn exact_conv_inverse_runs_within_2x_of_a_random_inverse() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../specs/mnist_cnn9_exact.json"
    ))
    .expect("spec");
    let spec = parse_spec(&text).expect("valid spec");
    let model = Model::<f32>::init(&spec, 0);
    let conv = model
        .params
        .iter()
        .find(|p| p.shape.len() == 4)
        .expect("a conv kernel");
    let (h, w) = (spec.input.shape[1], spec.input.shape[2]);
    let toeplitz = shape_ops::toeplitz(model.get(&conv.name), &conv.shape, h, w);
    let n = h * w;

    // The subnormal case: in exact arithmetic over a fifth of the inverse's entries lie in
    // (0, f32::MIN_POSITIVE).
    let exact: Vec<f64> = toeplitz.iter().map(|&v| v as f64).collect();
    let inverse64 = linalg::inverse(&exact, n).expect("invertible");
    let subnormal = inverse64
        .iter()
        .filter(|v| v.abs() > 0.0 && v.abs() < f32::MIN_POSITIVE as f64)
        .count();
    assert!(
        subnormal * 5 > n * n,
        "only {subnormal} of {} entries of the inverse are subnormal in f32",
        n * n
    );

    // Random data of the same size, well conditioned: I + N(0, 1)/√n (a fixed LCG, no crate).
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut uniform = || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let random: Vec<f32> = (0..n * n)
        .map(|i| {
            let gauss: f64 = (0..12).map(|_| uniform()).sum::<f64>() - 6.0;
            (gauss / (n as f64).sqrt() + if i % (n + 1) == 0 { 1.0 } else { 0.0 }) as f32
        })
        .collect();

    let mut check = linalg::inverse(&toeplitz, n).expect("invertible");
    // The flushed f32 inverse still inverts: T · T⁻¹ = I to f32 precision.
    let mut product = vec![0f32; n * n];
    linalg::matmul(
        linalg::MatRef::row_major(&toeplitz, n, n),
        linalg::MatRef::row_major(&check, n, n),
        &mut product,
        1.0,
        0.0,
        false,
    );
    let worst = product
        .iter()
        .enumerate()
        .map(|(i, v)| (v - if i % (n + 1) == 0 { 1.0 } else { 0.0 }).abs())
        .fold(0f32, f32::max);
    assert!(worst < 1e-4, "‖T·T⁻¹ − I‖∞ = {worst}");

    let (mut toeplitz_s, mut random_s) = (f64::INFINITY, f64::INFINITY);
    for _ in 0..3 {
        toeplitz_s = toeplitz_s.min(min_seconds(2, || {
            check = linalg::inverse(&toeplitz, n).expect("invertible");
        }));
        random_s = random_s.min(min_seconds(2, || {
            std::hint::black_box(linalg::inverse(&random, n).expect("invertible"));
        }));
    }
    let ratio = toeplitz_s / random_s;
    eprintln!(
        "784×784 f32 inverse: Toeplitz {:.1} ms, random {:.1} ms, ratio {ratio:.2}",
        toeplitz_s * 1e3,
        random_s * 1e3
    );
    assert!(
        ratio < 2.0,
        "the Toeplitz inverse took {ratio:.1}× as long as a random one (subnormals not flushed?)"
    );
}
