//! Throughput of the host rational-quadratic spline on a training step's shape.
//!
//! `cargo run --release -p snfc-runtime --example spline_speed [-- SECONDS [FILTER]]`
//!
//! D = 784 elements × N = 100 examples, K = 5 bins, tail bound 10, inputs spread over about
//! ±1.3 bounds (some out of bound): `forward_batch`, and `vjp_batch` as the host executor calls
//! it, for the value part (`g_l = 0`) and for the log-det part (`g_y = 0`, one `g_l` per
//! example). Prints ns per element, best (median) of round-robin runs for about SECONDS
//! (default 10), on 1 thread and on all threads of the rayon pool, in f32 and f64 (only the cases
//! whose name contains FILTER, if given). The best time is the most meaningful figure on a shared
//! machine; `perf stat` on one case gives its cycles, which background load does not inflate.

use std::time::{Duration, Instant};

use rayon::ThreadPool;
use snfc_runtime::host::linalg::{threads, Real};
use snfc_runtime::host::spline::{Spline, SplineGrads, SplineParams};

const D: usize = 784;
const N: usize = 100;
const K: usize = 5;

#[path = "common/mod.rs"]
mod common;
use common::uniform as data;

type Case = (String, Box<dyn FnMut() + Send>);

fn cases<T: Real>() -> Vec<Case> {
    let s = Spline::new(K, T::of_f64(10.0));
    let (w, h, dv) = (
        data::<T>(D * K, 1, 2.0),
        data::<T>(D * K, 2, 2.0),
        data::<T>(D * (K - 1), 3, 2.0),
    );
    let x = data::<T>(D * N, 4, 13.0);
    let g = data::<T>(D * N, 5, 1.0);
    let g_col = data::<T>(N, 6, 1.0);
    let name = |v: &str| format!("{} {v}", T::NAME);
    let mut out: Vec<Case> = Vec::new();
    {
        let (w, h, dv, x) = (w.clone(), h.clone(), dv.clone(), x.clone());
        let (mut y, mut l) = (vec![T::zero(); D * N], vec![T::zero(); D * N]);
        out.push((
            name("forward_batch"),
            Box::new(move || {
                let p = SplineParams {
                    widths: &w,
                    heights: &h,
                    derivatives: &dv,
                };
                s.forward_batch(&x, N, p, &mut y, &mut l);
            }),
        ));
    }
    for (what, g_y, g_l) in [
        ("vjp_batch value  ", g.clone(), vec![T::zero(); N]),
        ("vjp_batch log-det", vec![T::zero(); D * N], g_col.clone()),
        ("vjp_batch both   ", g.clone(), g_col.clone()),
    ] {
        let (w, h, dv, x) = (w.clone(), h.clone(), dv.clone(), x.clone());
        let mut g_x = vec![T::zero(); D * N];
        let (mut gw, mut gh, mut gd) = (
            vec![T::zero(); D * K],
            vec![T::zero(); D * K],
            vec![T::zero(); D * (K - 1)],
        );
        out.push((
            name(what),
            Box::new(move || {
                let p = SplineParams {
                    widths: &w,
                    heights: &h,
                    derivatives: &dv,
                };
                let grads = SplineGrads {
                    widths: &mut gw,
                    heights: &mut gh,
                    derivatives: &mut gd,
                };
                s.vjp_batch(&x, N, p, &g_y, &g_l, &mut g_x, grads);
            }),
        ));
    }
    out
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS must be a number"))
        .unwrap_or(10.0);
    let budget = Duration::from_secs_f64(secs);
    let mut counts = vec![1];
    if threads() > 1 {
        counts.push(threads());
    }
    let pools: Vec<ThreadPool> = counts
        .iter()
        .map(|&t| {
            rayon::ThreadPoolBuilder::new()
                .num_threads(t)
                .build()
                .expect("thread pool")
        })
        .collect();
    let filter = std::env::args().nth(2).unwrap_or_default();
    let mut all = cases::<f32>();
    all.extend(cases::<f64>());
    all.retain(|(name, _)| name.contains(&filter));
    let mut times = vec![vec![Vec::<Duration>::new(); pools.len()]; all.len()];
    for (_, f) in all.iter_mut() {
        pools.iter().for_each(|p| p.install(&mut *f));
    }
    let start = Instant::now();
    while times[0][0].len() < 3 || start.elapsed() < budget {
        for ((_, f), t) in all.iter_mut().zip(times.iter_mut()) {
            for (p, tp) in pools.iter().zip(t.iter_mut()) {
                let t0 = Instant::now();
                p.install(&mut *f);
                tp.push(t0.elapsed());
            }
        }
    }
    println!(
        "D={D} N={N} K={K}: {} rounds; ns per element, best (median)",
        times[0][0].len()
    );
    for ((name, _), t) in all.iter().zip(times.iter_mut()) {
        let mut line = format!("{name:<24}");
        for (c, tp) in counts.iter().zip(t.iter_mut()) {
            tp.sort();
            let per = |d: Duration| d.as_secs_f64() * 1e9 / (D * N) as f64;
            line += &format!(
                "  {c} thr: {:6.2} ({:6.2})",
                per(tp[0]),
                per(tp[tp.len() / 2])
            );
        }
        println!("{line}");
    }
}
