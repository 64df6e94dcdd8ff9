//! Time of an n × n inverse on a GPU backend: by the device's blocked Gauss–Jordan elimination
//! (what an exact-gradient step runs on a GPU) and, on a CPU adapter, by the host's LU that it
//! takes instead, with the kernel launches of each and the largest difference from the host's f64 LU.
//!
//! `cargo run --release -p snfc-runtime --example gpu_inverse_speed [-- wgpu|cuda [N...]]`
//!
//! The matrix is the identity plus uniform noise of 0.1 / √n, with its rows in reverse order
//! (so every column needs a row swap). Each way runs once to compile its kernels, then
//! `max(3, 2000 / n)` times; the mean time per inverse is printed.

use snfc_compiler::ir::GraphBuilder;
use snfc_compiler::plan::Plan;
use snfc_runtime::backend::{open, open_variant};
use snfc_runtime::cube::matmul::{MatmulOptions, MatmulPrecision};
use snfc_runtime::cube::probe::{choose, DeviceKind};
use snfc_runtime::host::linalg::inverse;
use std::time::Instant;

#[path = "common/mod.rs"]
mod common;

fn main() {
    let mut args = std::env::args().skip(1);
    let kind = match args.next().as_deref() {
        None | Some("wgpu") => DeviceKind::Wgpu,
        Some("cuda") => DeviceKind::Cuda,
        Some(other) => panic!("unknown device `{other}` (wgpu or cuda)"),
    };
    let sizes: Vec<usize> = args
        .map(|a| a.parse().expect("a matrix size"))
        .collect::<Vec<_>>();
    let sizes = if sizes.is_empty() {
        vec![256, 784]
    } else {
        sizes
    };
    let chosen = choose(kind).expect("the device");
    println!("device: {chosen}");
    for n in sizes {
        let mut b = GraphBuilder::new("inverse");
        let w = b.param("w", vec![n, n]);
        let inv = b.inverse(w);
        b.output("inverse", inv);
        let g = b.finish();
        let mut w: Vec<f32> = common::uniform(n * n, 7, 0.1 / (n as f64).sqrt());
        for i in 0..n {
            w[(n - 1 - i) * n + i] += 1.0;
        }
        let w64: Vec<f64> = w.iter().map(|v| *v as f64).collect();
        let reference = inverse(&w64, n).expect("an invertible matrix");
        let runs = (2000 / n).max(3);
        // `open` gives a CPU adapter the host's LU; on a GPU it runs the elimination too.
        let ways: &[bool] = if chosen.is_cpu_adapter() {
            &[true, false]
        } else {
            &[true]
        };
        for &elimination in ways {
            let plan = Plan::new(&g);
            let mut dev = if elimination {
                let matmul = MatmulOptions {
                    precision: MatmulPrecision::F32,
                    tune: !chosen.is_cpu_adapter(),
                    only: None,
                };
                open_variant::<f32>(&chosen, plan, false, matmul)
            } else {
                open::<f32>(&chosen, plan, MatmulPrecision::F32)
            }
            .expect("the backend");
            dev.set("w", &w).expect("set");
            dev.run().expect("run");
            dev.sync().expect("sync");
            let started = Instant::now();
            for _ in 0..runs {
                dev.run().expect("run");
            }
            dev.sync().expect("sync");
            let ms = started.elapsed().as_secs_f64() * 1e3 / runs as f64;
            let out = dev.output("inverse").expect("the inverse");
            let err = out
                .data
                .iter()
                .zip(&reference)
                .map(|(a, b)| (*a as f64 - b).abs())
                .fold(0.0, f64::max);
            let how = if elimination {
                "device elimination"
            } else {
                "host LU (CPU adapter)"
            };
            println!(
                "n = {n:5}  {how:24} {ms:10.2} ms per inverse  {:5} launches  max |error| {err:.2e}",
                dev.kernels()
            );
        }
    }
}
