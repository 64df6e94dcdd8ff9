// TEMPORARY experiment (will be deleted): Wᵀ·X via row-major dst vs col-major temp + transpose.
use std::time::{Duration, Instant};
fn main() {
    exp::<f32>();
    exp::<f64>();
}
fn exp<T: snfc_runtime::host::linalg::Real>() {
    let (d, b) = (784usize, 100usize);
    let w: Vec<T> = (0..d * d)
        .map(|i| T::of_f64(((i * 7919) % 1000) as f64 / 1000.0 - 0.5))
        .collect();
    let x: Vec<T> = (0..d * b)
        .map(|i| T::of_f64(((i * 104729) % 1000) as f64 / 1000.0 - 0.5))
        .collect();
    let mut out = vec![T::zero(); d * b];
    let mut tmp = vec![T::zero(); d * b];
    for threads in [1, 2] {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .build()
            .unwrap();
        pool.install(|| {
            let mut times = [vec![], vec![], vec![]];
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                for v in 0..3 {
                    let t0 = Instant::now();
                    unsafe {
                        match v {
                            0 => gemm::gemm(
                                d,
                                b,
                                d,
                                out.as_mut_ptr(),
                                1,
                                b as isize,
                                false,
                                w.as_ptr(),
                                1,
                                d as isize,
                                x.as_ptr(),
                                1,
                                b as isize,
                                T::zero(),
                                T::one(),
                                false,
                                false,
                                false,
                                gemm::Parallelism::Rayon(0),
                            ),
                            1 => gemm::gemm(
                                d,
                                b,
                                d,
                                out.as_mut_ptr(),
                                1,
                                b as isize,
                                false,
                                w.as_ptr(),
                                d as isize,
                                1,
                                x.as_ptr(),
                                1,
                                b as isize,
                                T::zero(),
                                T::one(),
                                false,
                                false,
                                false,
                                gemm::Parallelism::Rayon(0),
                            ),
                            _ => {
                                // col-major temp (d×b, col stride d)
                                gemm::gemm(
                                    d,
                                    b,
                                    d,
                                    tmp.as_mut_ptr(),
                                    d as isize,
                                    1,
                                    false,
                                    w.as_ptr(),
                                    d as isize,
                                    1,
                                    x.as_ptr(),
                                    1,
                                    b as isize,
                                    T::zero(),
                                    T::one(),
                                    false,
                                    false,
                                    false,
                                    gemm::Parallelism::Rayon(0),
                                );
                                for j in 0..b {
                                    for i in 0..d {
                                        out[i * b + j] = tmp[j * d + i];
                                    }
                                }
                            }
                        }
                    }
                    times[v].push(t0.elapsed());
                }
            }
            for (v, mut t) in times.into_iter().enumerate() {
                t.sort();
                let f = 2.0 * (d * d * b) as f64;
                println!(
                    "{} thr={threads} variant {v}: best {:.1} median {:.1} GFLOP/s",
                    T::NAME,
                    f / t[0].as_secs_f64() * 1e-9,
                    f / t[t.len() / 2].as_secs_f64() * 1e-9
                );
            }
        });
    }
}
