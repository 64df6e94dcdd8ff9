//! Throughput of the host executor's dense linear algebra on the training-step shapes.
//!
//! `cargo run --release -p snfc-runtime --example gemm_speed [-- SECONDS_PER_CASE]`
//!
//! Prints GFLOP/s of `matmul` for the three products of a 784-wide layer on a batch of 100
//! (W·X, X·Xᵀ-like and Wᵀ·G), and the time of `inverse` / `slogdet` for n = 784, in f32 and
//! f64, on 1 thread and on every thread of the machine.

use std::time::{Duration, Instant};

use snfc_runtime::host::linalg::{inverse, matmul, slogdet, threads, MatRef, Real};

fn data<T: Real>(len: usize, seed: u64) -> Vec<T> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            T::of_f64((s >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0)
        })
        .collect()
}

/// Runs `f` repeatedly for about `budget` (after one warm-up call); returns (best, median).
fn time(budget: Duration, mut f: impl FnMut()) -> (Duration, Duration) {
    f();
    let mut times = Vec::new();
    let start = Instant::now();
    while times.len() < 3 || (start.elapsed() < budget && times.len() < 10_000) {
        let t = Instant::now();
        f();
        times.push(t.elapsed());
    }
    times.sort();
    (times[0], times[times.len() / 2])
}

fn gemm_cases<T: Real>(budget: Duration) {
    let (d, b) = (784, 100);
    let w: Vec<T> = data(d * d, 1); // d×d
    let x: Vec<T> = data(d * b, 2); // d×b
    let y: Vec<T> = data(d * b, 3); // d×b
    let mut out_db = vec![T::zero(); d * b];
    let mut out_dd = vec![T::zero(); d * d];
    let (one, zero) = (T::one(), T::zero());
    let names = [
        "W·X      784x784 · 784x100",
        "X·Yᵀ     784x100 · (784x100)ᵀ",
        "Wᵀ·X     (784x784)ᵀ · 784x100",
    ];
    let flop = 2.0 * (d * d * b) as f64; // the same for all three
    let mut run = |case: usize| match case {
        0 => matmul(
            MatRef::row_major(&w, d, d),
            MatRef::row_major(&x, d, b),
            &mut out_db,
            one,
            zero,
            false,
        ),
        1 => matmul(
            MatRef::row_major(&x, d, b),
            MatRef::row_major(&y, d, b).t(),
            &mut out_dd,
            one,
            zero,
            false,
        ),
        _ => matmul(
            MatRef::row_major(&w, d, d).t(),
            MatRef::row_major(&x, d, b),
            &mut out_db,
            one,
            zero,
            false,
        ),
    };
    // Interleave the cases (round-robin) so that background load hits all of them alike.
    let mut times: [Vec<Duration>; 3] = Default::default();
    (0..3).for_each(&mut run);
    let start = Instant::now();
    while times[0].len() < 3 || start.elapsed() < budget * 3 {
        for (case, t) in times.iter_mut().enumerate() {
            let t0 = Instant::now();
            run(case);
            t.push(t0.elapsed());
        }
    }
    for (name, mut t) in names.into_iter().zip(times) {
        t.sort();
        let (best, med) = (t[0], t[t.len() / 2]);
        println!(
            "  {} {name:<32} best {:7.1} GFLOP/s ({:8.1} µs)   median {:7.1} GFLOP/s",
            T::NAME,
            flop / best.as_secs_f64() * 1e-9,
            best.as_secs_f64() * 1e6,
            flop / med.as_secs_f64() * 1e-9,
        );
    }
}

fn lu_cases<T: Real>(budget: Duration) {
    let n = 784;
    let mut a: Vec<T> = data(n * n, 4);
    for i in 0..n {
        a[i * n + i] += T::of_f64((n as f64).sqrt());
    }
    let (best, med) = time(budget, || {
        std::hint::black_box(inverse(&a, n).unwrap());
    });
    println!(
        "  {} inverse n=784   best {:8.2} ms   median {:8.2} ms",
        T::NAME,
        best.as_secs_f64() * 1e3,
        med.as_secs_f64() * 1e3
    );
    let (best, med) = time(budget, || {
        std::hint::black_box(slogdet(&a, n));
    });
    println!(
        "  {} slogdet n=784   best {:8.2} ms   median {:8.2} ms",
        T::NAME,
        best.as_secs_f64() * 1e3,
        med.as_secs_f64() * 1e3
    );
}

fn main() {
    let secs: f64 = std::env::args()
        .nth(1)
        .map(|s| s.parse().expect("SECONDS_PER_CASE must be a number"))
        .unwrap_or(1.0);
    let budget = Duration::from_secs_f64(secs);
    let all = threads();
    let mut counts = vec![1];
    if all > 1 {
        counts.push(all);
    }
    for t in counts {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(t)
            .build()
            .expect("thread pool");
        pool.install(|| {
            println!("{t} thread(s):");
            gemm_cases::<f32>(budget);
            gemm_cases::<f64>(budget);
            lu_cases::<f32>(budget);
            lu_cases::<f64>(budget);
        });
    }
}
