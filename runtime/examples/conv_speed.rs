//! Throughput of the host convolutions on the shapes of a Glow coupling (mnist_glow, B = 100)
//! and of mnist_cnn9's convolutions.
//!
//! `cargo run --release -p snfc-runtime --example conv_speed [-- ROUNDS]`
//!
//! For each (C_in → C_out, K, H × W) of the coupling network prints GFLOP/s of the forward conv
//! (`conv2d`), its input adjoint (a conv with the flipped kernel) and the kernel adjoint
//! (`conv_kernel_grad`), best of ROUNDS (default 5), next to a plain GEMM of the same flop count.

use std::time::Instant;

use snfc_runtime::host::linalg::{matmul, MatRef, Real};
use snfc_runtime::host::shape_ops::{conv2d, conv_kernel_grad};

#[path = "common/mod.rs"]
mod common;

fn data<T: Real>(len: usize, seed: u64) -> Vec<T> {
    common::uniform(len, seed, 1.0)
}

fn best(rounds: usize, mut f: impl FnMut()) -> f64 {
    f();
    (0..rounds)
        .map(|_| {
            let t = Instant::now();
            f();
            t.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() {
    // As the `snfc` binary runs.
    snfc_runtime::keep_freed_memory();
    let rounds: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(5);
    let b = 100;
    // (C_in, C_out, K, H = W) of mnist_glow's coupling convs at both levels.
    let shapes = [
        (2, 512, 3, 14),
        (512, 512, 1, 14),
        (512, 4, 3, 14),
        (4, 512, 3, 7),
        (512, 512, 1, 7),
        (512, 8, 3, 7),
        // The self-normalizing 1 × 1 convs of mnist_glow (C → C at each level).
        (4, 4, 1, 14),
        (8, 8, 1, 7),
        // mnist_cnn9's C → C convs.
        (1, 1, 3, 28),
        (4, 4, 3, 14),
        (16, 16, 3, 7),
    ];
    for (ci, co, k, hw) in shapes {
        let form = snfc_runtime::host::shape_ops::conv_form(ci, co, k);
        let x: Vec<f32> = data(ci * hw * hw * b, 1);
        let dy: Vec<f32> = data(co * hw * hw * b, 2);
        let w: Vec<f32> = data(co * ci * k * k, 3);
        let wt: Vec<f32> = data(co * ci * k * k, 4);
        let flop = 2.0 * (ci * co * k * k * hw * hw * b) as f64;
        let xs = [ci, hw, hw, b];
        let dys = [co, hw, hw, b];
        let fwd = best(rounds, || {
            std::hint::black_box(conv2d(&x, &xs, &w, &[co, ci, k, k]));
        });
        let adj = best(rounds, || {
            std::hint::black_box(conv2d(&dy, &dys, &wt, &[ci, co, k, k]));
        });
        let kg = best(rounds, || {
            std::hint::black_box(conv_kernel_grad(&dy, &dys, &x, &xs, k));
        });
        // The same flops as one GEMM [C_out, C_in·K²] × [C_in·K², H·W·B].
        let (m, kd, n) = (co, ci * k * k, hw * hw * b);
        let a: Vec<f32> = data(m * kd, 5);
        let bm: Vec<f32> = data(kd * n, 6);
        let mut o = vec![0f32; m * n];
        let gemm = best(rounds, || {
            matmul(
                MatRef::row_major(&a, m, kd),
                MatRef::row_major(&bm, kd, n),
                &mut o,
                1.0,
                0.0,
                false,
            )
        });
        let r = |t: f64| flop / t / 1e9;
        println!(
            "{ci:>3} -> {co:>3} {k}x{k} {hw:>2}x{hw:<2} {:<6} {:>6.2} GFLOP: conv {:>6.1} ms {:>6.1} GFLOP/s | input adjoint {:>6.1} ms {:>6.1} | kernel adjoint {:>6.1} ms {:>6.1} | GEMM {:>6.1} ms {:>6.1}",
            format!("{form:?}"),
            flop / 1e9,
            fwd * 1e3,
            r(fwd),
            adj * 1e3,
            r(adj),
            kg * 1e3,
            r(kg),
            gemm * 1e3,
            r(gemm)
        );
    }
}
