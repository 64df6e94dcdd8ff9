//! Throughput of the host executor's dense linear algebra on the training-step shapes.
//!
//! `cargo run --release -p snfc-runtime --example gemm_speed [-- SECONDS]`
//!
//! Prints GFLOP/s of `matmul` for the three products of a 784-wide layer on a batch of 100
//! (W·X, X·Yᵀ and Wᵀ·X, in f32 and f64), and the time of `inverse` / `slogdet` for n = 784,
//! on 1 thread and on all threads of the rayon pool. All cases and thread counts are run
//! round-robin for about SECONDS (default 10) so that background load hits them alike; the
//! best time is the most meaningful figure on a shared machine, the median is printed too.

use std::time::{Duration, Instant};

use rayon::ThreadPool;
use snfc_runtime::host::linalg::{inverse, matmul, slogdet, threads, MatRef, Real};

#[path = "common/mod.rs"]
mod common;

fn data<T: Real>(len: usize, seed: u64) -> Vec<T> {
    common::uniform(len, seed, 1.0)
}

/// A benchmark case: a name, its flop count (for GFLOP/s) if meaningful, and the work.
type Case = (String, Option<f64>, Box<dyn FnMut() + Send>);

fn cases<T: Real>() -> Vec<Case> {
    let (d, b) = (784, 100);
    let w: Vec<T> = data(d * d, 1); // d×d
    let x: Vec<T> = data(d * b, 2); // d×b
    let y: Vec<T> = data(d * b, 3); // d×b
    let flop = 2.0 * (d * d * b) as f64; // the same for all three products
    let (one, zero) = (T::one(), T::zero());
    let name = |s: &str| format!("{} {s}", T::NAME);
    let mut out: Vec<Case> = Vec::new();
    {
        let (w, x) = (w.clone(), x.clone());
        let mut o = vec![zero; d * b];
        out.push((
            name("matmul W·X    784x784 · 784x100"),
            Some(flop),
            Box::new(move || {
                let (a, bm) = (MatRef::row_major(&w, d, d), MatRef::row_major(&x, d, b));
                matmul(a, bm, &mut o, one, zero, false)
            }),
        ));
    }
    {
        let x = x.clone();
        let mut o = vec![zero; d * d];
        out.push((
            name("matmul X·Yᵀ   784x100 · (784x100)ᵀ"),
            Some(flop),
            Box::new(move || {
                let (a, bm) = (MatRef::row_major(&x, d, b), MatRef::row_major(&y, d, b).t());
                matmul(a, bm, &mut o, one, zero, false)
            }),
        ));
    }
    {
        let (w, x) = (w.clone(), x.clone());
        let mut o = vec![zero; d * b];
        out.push((
            name("matmul Wᵀ·X   (784x784)ᵀ · 784x100"),
            Some(flop),
            Box::new(move || {
                let (a, bm) = (MatRef::row_major(&w, d, d).t(), MatRef::row_major(&x, d, b));
                matmul(a, bm, &mut o, one, zero, false)
            }),
        ));
    }
    let mut a = w;
    for i in 0..d {
        a[i * d + i] += T::of_f64((d as f64).sqrt());
    }
    let a2 = a.clone();
    out.push((
        name("inverse n=784"),
        None,
        Box::new(move || {
            std::hint::black_box(inverse(&a, d).unwrap());
        }),
    ));
    out.push((
        name("slogdet n=784"),
        None,
        Box::new(move || {
            std::hint::black_box(slogdet(&a2, d));
        }),
    ));
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
    let mut all = cases::<f32>();
    all.extend(cases::<f64>());
    let mut times = vec![vec![Vec::<Duration>::new(); pools.len()]; all.len()];
    // Warm-up, then round-robin.
    for (_, _, f) in all.iter_mut() {
        pools.iter().for_each(|p| p.install(&mut *f));
    }
    let start = Instant::now();
    while times[0][0].len() < 3 || start.elapsed() < budget {
        for ((_, _, f), t) in all.iter_mut().zip(times.iter_mut()) {
            for (p, tp) in pools.iter().zip(t.iter_mut()) {
                let t0 = Instant::now();
                p.install(&mut *f);
                tp.push(t0.elapsed());
            }
        }
    }
    println!("{} rounds; best (median)", times[0][0].len());
    for ((name, flop, _), t) in all.iter().zip(times.iter_mut()) {
        let mut line = format!("{name:<42}");
        for (c, tp) in counts.iter().zip(t.iter_mut()) {
            tp.sort();
            let (best, med) = (tp[0].as_secs_f64(), tp[tp.len() / 2].as_secs_f64());
            line += &match flop {
                Some(f) => format!(
                    "  {c} thr: {:6.1} ({:6.1}) GFLOP/s",
                    f / best * 1e-9,
                    f / med * 1e-9
                ),
                None => format!("  {c} thr: {:6.2} ({:6.2}) ms     ", best * 1e3, med * 1e3),
            };
        }
        println!("{line}");
    }
}
