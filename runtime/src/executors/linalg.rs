//! Dense linear algebra of the CPU ("host") executor, in `f32` and `f64`.
//!
//! * [`matmul`]: BLAS-class, multithreaded GEMM on strided views (the `gemm` crate with rayon
//!   parallelism). Transposes are free: [`MatRef::t`] only swaps strides.
//! * [`slogdet`], [`inverse`], [`solve`]: LU with partial pivoting (faer), with subnormals
//!   flushed to zero ([`flush_denormals`]): the inverse of a banded matrix is full of them.
//!
//! All matrices that are passed as plain slices are **row-major** and contiguous. faer works on
//! column-major matrices; a row-major `A` read as column-major is `Aᵀ`, so we factor `M = Aᵀ`
//! (one `memcpy` of `A`) and use `det(Aᵀ) = det(A)`, `(Aᵀ)⁻¹ = (A⁻¹)ᵀ` (the column-major `M⁻¹`
//! is exactly the row-major `A⁻¹`, written straight into the output) and `A X = B ⇔ Mᵀ X = B`
//! (faer's transposed LU solve, run on a row-major view of `X`).

use faer::dyn_stack::{MemBuffer, MemStack};
use faer::linalg::lu::partial_pivoting as plu;
use faer::Par;

use super::denormals::flush_denormals;
pub use crate::executors::values::{LinalgError, Real};

/// A read-only strided matrix view: element `(i, j)` is `data[i * row_stride + j * col_stride]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a, T> {
    pub data: &'a [T],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a, T> MatRef<'a, T> {
    /// A contiguous row-major `rows × cols` matrix. Panics if `data.len() != rows * cols`.
    #[track_caller]
    pub fn row_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "MatRef::row_major: slice of length {} is not {rows}×{cols}",
            data.len()
        );
        MatRef {
            data,
            rows,
            cols,
            row_stride: cols,
            col_stride: 1,
        }
    }

    /// A contiguous column-major `rows × cols` matrix. Panics if `data.len() != rows * cols`.
    #[track_caller]
    pub fn col_major(data: &'a [T], rows: usize, cols: usize) -> Self {
        MatRef::row_major(data, cols, rows).t()
    }

    /// A general strided view; panics if some element would lie outside `data`.
    #[track_caller]
    pub fn new(
        data: &'a [T],
        rows: usize,
        cols: usize,
        row_stride: usize,
        col_stride: usize,
    ) -> Self {
        let m = MatRef {
            data,
            rows,
            cols,
            row_stride,
            col_stride,
        };
        m.check_bounds();
        m
    }

    /// The transposed view (no copy: swaps shape and strides).
    #[inline]
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }

    /// Element `(i, j)` (bounds-checked through the slice).
    #[inline]
    pub fn get(&self, i: usize, j: usize) -> T
    where
        T: Copy,
    {
        debug_assert!(i < self.rows && j < self.cols);
        self.data[i * self.row_stride + j * self.col_stride]
    }

    /// One past the largest index the view touches (0 for an empty view), or `None` on overflow.
    fn extent(&self) -> Option<usize> {
        if self.rows == 0 || self.cols == 0 {
            return Some(0);
        }
        (self.rows - 1)
            .checked_mul(self.row_stride)?
            .checked_add((self.cols - 1).checked_mul(self.col_stride)?)?
            .checked_add(1)
    }

    #[track_caller]
    fn check_bounds(&self) {
        match self.extent() {
            Some(e) if e <= self.data.len() => {}
            _ => panic!(
                "MatRef {}×{} with strides ({}, {}) does not fit in a slice of length {}",
                self.rows,
                self.cols,
                self.row_stride,
                self.col_stride,
                self.data.len()
            ),
        }
    }
}

/// Number of threads the executor uses (the size of the current rayon pool: the global pool,
/// or the pool of an enclosing `ThreadPool::install`).
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// `out` (m×n, row-major, contiguous) `= alpha · a·b + (if accumulate { beta · out } else { 0 })`,
/// with `a` m×k and `b` k×n arbitrary strided views (use [`MatRef::t`] for transposes; no copies).
///
/// When `accumulate` is false, `out` is never read (NaNs in it do not propagate); `k = 0` gives
/// `alpha · 0`. Runs on the `gemm` crate, parallelised over the current rayon pool (it stays
/// single-threaded below `gemm`'s work threshold, so tiny products stay cheap).
///
/// Panics on shape mismatch, if `out.len() != m·n`, or if a view does not fit in its slice.
#[track_caller]
pub fn matmul<T: Real>(
    a: MatRef<T>,
    b: MatRef<T>,
    out: &mut [T],
    alpha: T,
    beta: T,
    accumulate: bool,
) {
    let (m, k, n) = (a.rows, a.cols, b.cols);
    assert_eq!(
        b.rows, k,
        "matmul: inner dimensions differ ({m}×{k} · {}×{n})",
        b.rows
    );
    assert_eq!(
        out.len(),
        m * n,
        "matmul: output has length {} but the product is {m}×{n}",
        out.len()
    );
    a.check_bounds();
    b.check_bounds();
    if m == 0 || n == 0 {
        return;
    }
    if cpu_packs_transposed_left_slowly() && runs_better_transposed(&a, n) {
        matmul_transposed(a, b, out, alpha, beta, accumulate);
        return;
    }
    // Safety: every element (i, j) with i < rows, j < cols of `a`, `b` lies in its slice
    // (checked above), and `out` is exactly m×n row-major; `out` is a unique borrow so it cannot
    // alias `a` or `b`. With k = 0, `gemm` does not read `a`/`b`.
    // `gemm` computes dst := alpha·dst + beta·lhs·rhs, i.e. its alpha/beta are our beta/alpha.
    unsafe {
        gemm::gemm::<T>(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,          // dst column stride
            n as isize, // dst row stride
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            beta,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::Rayon(0),
        );
    }
}

/// [`matmul`] as `out = (bᵀ·aᵀ)ᵀ`: the product computed transposed into a scratch buffer, then
/// one transposing pass over the result. A large column-major `a` is then read in the layout
/// `gemm` streams without packing it, and only the small product is transposed.
fn matmul_transposed<T: Real>(
    a: MatRef<T>,
    b: MatRef<T>,
    out: &mut [T],
    alpha: T,
    beta: T,
    accumulate: bool,
) {
    let (m, n) = (a.rows, b.cols);
    let mut product = vec![T::zero(); n * m];
    matmul(b.t(), a.t(), &mut product, T::one(), T::zero(), false);
    add_transposed(&product, n, m, out, alpha, beta, accumulate);
}

/// Bytes of a transposed left operand from which [`matmul`] computes the transposed product.
const TRANSPOSED_LEFT_BYTES: usize = 16 << 20;

/// Whether `gemm` runs a product on a large column-major left operand at a fraction of its
/// rate on a row-major one, on this CPU: measured so on an Intel Xeon (AVX-512; the figures
/// are at [`runs_better_transposed`]); not so on an AMD EPYC
/// (Zen 4, AVX-512), where the direct call was the faster one (2 threads, 3072²: 11.3 ms
/// direct, 11.9 ms for the row-major product, 14.4 ms transposed; 784² to 2048² alike).
/// Other CPUs are unmeasured and keep the direct call, `gemm`'s own choice. Decided by the
/// CPU, never by timing, so that a run and its resumption take the same path.
fn cpu_packs_transposed_left_slowly() -> bool {
    static SLOW: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SLOW.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            // `__cpuid` became a safe function only in recent Rust; the block keeps the
            // declared minimum version building.
            #[allow(unused_unsafe)]
            // SAFETY: every x86-64 CPU has the `cpuid` instruction.
            let id = unsafe { std::arch::x86_64::__cpuid(0) };
            let vendor: Vec<u8> = [id.ebx, id.edx, id.ecx]
                .iter()
                .flat_map(|r| r.to_le_bytes())
                .collect();
            vendor == b"GenuineIntel"
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    })
}

/// Whether `out (m×n) = a·b` runs faster as `outᵀ = bᵀ·aᵀ` and one transposing pass over the
/// m×n result, on a CPU where [`cpu_packs_transposed_left_slowly`]: when `a` is a large
/// column-major (transposed) matrix and `n` is a batch (≥ 64, and below `m`). `gemm` computes
/// a row-major `out` as `outᵀ`, reading `a` row by row: a column-major `a` is then packed for
/// every block of the product, which on the step's shapes ran at a third to a half of the
/// rate of the same product on a row-major `a` (Intel Xeon, AVX-512: 3072×3072ᵀ · 3072×128
/// in 33 ms against 14.8 ms transposed, 2048² in 10.0 against 6.3 ms; 1536² and smaller
/// were faster as they were).
fn runs_better_transposed<T>(a: &MatRef<T>, n: usize) -> bool {
    let column_major = a.row_stride == 1 && a.col_stride != 1;
    column_major
        && n >= 64
        && n < a.rows
        && a.rows * a.cols * std::mem::size_of::<T>() >= TRANSPOSED_LEFT_BYTES
}

/// `out (m×n) = alpha · productᵀ + (if accumulate { beta · out } else { 0 })`, with `product`
/// n×m row-major; in tiles, in parallel over bands of `out`'s rows.
fn add_transposed<T: Real>(
    product: &[T],
    n: usize,
    m: usize,
    out: &mut [T],
    alpha: T,
    beta: T,
    accumulate: bool,
) {
    use rayon::prelude::*;
    const TILE: usize = 32;
    out.par_chunks_mut(TILE * n)
        .enumerate()
        .for_each(|(band, rows)| {
            let i0 = band * TILE;
            for j0 in (0..n).step_by(TILE) {
                for (di, row) in rows.chunks_mut(n).enumerate() {
                    let i = i0 + di;
                    for j in j0..(j0 + TILE).min(n) {
                        let v = alpha * product[j * m + i];
                        row[j] = if accumulate { v + beta * row[j] } else { v };
                    }
                }
            }
        });
}

/// The shape and layout of one [`matmul`] call: `out (m×n) = a (m×k) · b (k×n)`, each operand
/// stored row-major or, when `*_t`, column-major (a transposed view).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GemmShape {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub a_t: bool,
    pub b_t: bool,
    pub accumulate: bool,
}

impl GemmShape {
    pub fn of<T>(a: &MatRef<T>, b: &MatRef<T>, accumulate: bool) -> GemmShape {
        let column_major = |m: &MatRef<T>| m.row_stride == 1 && m.col_stride != 1;
        GemmShape {
            m: a.rows,
            k: a.cols,
            n: b.cols,
            a_t: column_major(a),
            b_t: column_major(b),
            accumulate,
        }
    }

    pub fn flops(&self) -> f64 {
        2.0 * (self.m * self.k * self.n) as f64
    }

    /// The best of `reps` timed runs of this product alone, in seconds, on operands that stay
    /// in cache between runs (after one untimed run): the rate the GEMM itself reaches.
    pub fn best_time<T: Real>(&self, reps: usize) -> f64 {
        let fill = |len: usize, seed: usize| -> Vec<T> {
            (0..len)
                .map(|i| T::of_f64(((i * 7919 + seed * 104_729) % 1000) as f64 / 1000.0 - 0.5))
                .collect()
        };
        let (m, k, n) = (self.m, self.k, self.n);
        let a = fill(m * k, 1);
        let b = fill(k * n, 2);
        let mut out = fill(m * n, 3);
        fn view<T>(data: &[T], rows: usize, cols: usize, t: bool) -> MatRef<'_, T> {
            if t {
                MatRef::col_major(data, rows, cols)
            } else {
                MatRef::row_major(data, rows, cols)
            }
        }
        let mut run = || {
            matmul(
                view(&a, m, k, self.a_t),
                view(&b, k, n, self.b_t),
                &mut out,
                T::one(),
                T::one(),
                self.accumulate,
            )
        };
        run();
        (0..reps.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                run();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    }
}

/// faer parallelism for an n×n factorization: sequential when small (rayon overhead dominates).
fn lu_par(n: usize) -> Par {
    if n < 96 || threads() <= 1 {
        Par::Seq
    } else {
        Par::rayon(0)
    }
}

/// LU with partial pivoting of `M = Aᵀ` (the row-major `A` read as column-major).
struct Lu<T> {
    /// Column-major n×n, unit-lower `L` below the diagonal, `U` on and above it.
    lu: Vec<T>,
    perm: Vec<usize>,
    perm_inv: Vec<usize>,
    transpositions: usize,
    n: usize,
    par: Par,
}

impl<T: Real> Lu<T> {
    #[track_caller]
    fn new(a: &[T], n: usize) -> Self {
        assert_eq!(
            a.len(),
            n * n,
            "LU: slice of length {} is not {n}×{n}",
            a.len()
        );
        let par = lu_par(n);
        let mut lu = a.to_vec();
        let mut perm = vec![0usize; n];
        let mut perm_inv = vec![0usize; n];
        let mut buf = MemBuffer::new(plu::factor::lu_in_place_scratch::<usize, T>(
            n,
            n,
            par,
            Default::default(),
        ));
        let (info, _) = plu::factor::lu_in_place(
            faer::MatMut::from_column_major_slice_mut(&mut lu, n, n),
            &mut perm,
            &mut perm_inv,
            par,
            MemStack::new(&mut buf),
            Default::default(),
        );
        Lu {
            lu,
            perm,
            perm_inv,
            transpositions: info.transposition_count,
            n,
            par,
        }
    }

    #[inline]
    fn pivot(&self, i: usize) -> T {
        self.lu[i * self.n + i]
    }

    /// Ok if every pivot is finite and non-zero.
    fn check(&self) -> Result<(), LinalgError> {
        for index in 0..self.n {
            let p = self.pivot(index);
            if p == T::zero() {
                return Err(LinalgError::Singular { index });
            }
            if !p.is_finite() {
                return Err(LinalgError::NonFinite {
                    index,
                    value: p.as_f64(),
                });
            }
        }
        Ok(())
    }

    fn lu_ref(&self) -> faer::MatRef<'_, T> {
        faer::MatRef::from_column_major_slice(&self.lu, self.n, self.n)
    }

    fn perm_ref(&self) -> faer::perm::PermRef<'_, usize> {
        faer::perm::PermRef::new_checked(&self.perm, &self.perm_inv, self.n)
    }
}

/// `(sign, ln|det A|)` of a square row-major n×n matrix by LU with partial pivoting (faer);
/// `sign ∈ {-1, +1}`. A singular matrix (an exactly zero pivot) gives `(0, -inf)`, not an error.
/// Like LAPACK/NumPy, no rank tolerance is applied: a numerically rank-deficient matrix whose
/// elimination does not hit an exact zero gives a large negative log instead. Non-finite input
/// gives NaNs. The log is accumulated in f64. `n = 0` gives `(1, 0)`.
#[track_caller]
pub fn slogdet<T: Real>(a: &[T], n: usize) -> (T, T) {
    let lu = flush_denormals(|| Lu::new(a, n));
    let mut negative = lu.transpositions % 2 == 1;
    let mut logabs = 0.0f64;
    let mut nan = false;
    for i in 0..n {
        let p = lu.pivot(i);
        if p == T::zero() {
            return (T::zero(), T::neg_infinity());
        }
        if p.is_nan() {
            nan = true;
        }
        if p < T::zero() {
            negative = !negative;
        }
        logabs += p.as_f64().abs().ln();
    }
    if nan {
        return (T::nan(), T::nan());
    }
    let sign = if negative { -T::one() } else { T::one() };
    (sign, T::of_f64(logabs))
}

/// `A⁻¹` (row-major) of a square row-major n×n matrix via LU with partial pivoting (faer).
/// An exactly zero pivot gives [`LinalgError::Singular`], a non-finite one
/// [`LinalgError::NonFinite`].
#[track_caller]
pub fn inverse<T: Real>(a: &[T], n: usize) -> Result<Vec<T>, LinalgError> {
    flush_denormals(|| inverse_flushed(a, n))
}

fn inverse_flushed<T: Real>(a: &[T], n: usize) -> Result<Vec<T>, LinalgError> {
    let lu = Lu::new(a, n);
    lu.check()?;
    let mut out = vec![T::zero(); n * n];
    let mut buf = MemBuffer::new(plu::inverse::inverse_scratch::<usize, T>(n, lu.par));
    // The column-major inverse of M = Aᵀ is (A⁻¹)ᵀ column-major = A⁻¹ row-major.
    plu::inverse::inverse(
        faer::MatMut::from_column_major_slice_mut(&mut out, n, n),
        lu.lu_ref(),
        lu.lu_ref(),
        lu.perm_ref(),
        lu.par,
        MemStack::new(&mut buf),
    );
    Ok(out)
}

/// Solves `A X = B` for `X` (`A` n×n, `B` n×m, both row-major; `X` is returned row-major n×m)
/// via LU with partial pivoting. Errors as [`inverse`].
#[track_caller]
pub fn solve<T: Real>(a: &[T], n: usize, b: &[T], m: usize) -> Result<Vec<T>, LinalgError> {
    assert_eq!(
        b.len(),
        n * m,
        "solve: right-hand side of length {} is not {n}×{m}",
        b.len()
    );
    flush_denormals(|| solve_flushed(a, n, b, m))
}

fn solve_flushed<T: Real>(a: &[T], n: usize, b: &[T], m: usize) -> Result<Vec<T>, LinalgError> {
    let lu = Lu::new(a, n);
    lu.check()?;
    let mut x = b.to_vec();
    let mut buf = MemBuffer::new(plu::solve::solve_transpose_in_place_scratch::<usize, T>(
        n, m, lu.par,
    ));
    // A = Mᵀ: solve Mᵀ X = B in place on a row-major view of X.
    plu::solve::solve_transpose_in_place(
        lu.lu_ref(),
        lu.lu_ref(),
        lu.perm_ref(),
        faer::MatMut::from_row_major_slice_mut(&mut x, n, m),
        lu.par,
        MemStack::new(&mut buf),
    );
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::host::test_rng::Rng;

    impl Rng {
        fn vec<T: Real>(&mut self, len: usize) -> Vec<T> {
            (0..len).map(|_| T::of_f64(self.uniform())).collect()
        }
    }

    /// A row-major storage of `op` (m×k) either directly or as its transpose (k×m, viewed with
    /// `.t()`), optionally padded (row stride larger than the row length).
    fn stored<T: Real>(
        rng: &mut Rng,
        rows: usize,
        cols: usize,
        transposed: bool,
        pad: usize,
    ) -> (Vec<T>, usize, usize, usize) {
        let (sr, sc) = if transposed {
            (cols, rows)
        } else {
            (rows, cols)
        };
        let stride = sc + pad;
        let data = rng.vec::<T>(sr * stride);
        (data, sr, sc, stride)
    }

    fn view<T>(data: &[T], sr: usize, sc: usize, stride: usize, transposed: bool) -> MatRef<'_, T> {
        let v = MatRef::new(data, sr, sc, stride, 1);
        if transposed {
            v.t()
        } else {
            v
        }
    }

    /// Naive reference in f64 for entry (i, j): returns (value, magnitude bound for the error).
    fn reference<T: Real>(
        a: MatRef<T>,
        b: MatRef<T>,
        out0: &[T],
        (i, j): (usize, usize),
        (alpha, beta, acc): (f64, f64, bool),
    ) -> (f64, f64) {
        let n = b.cols;
        let mut s = 0.0;
        let mut mag = 0.0;
        for l in 0..a.cols {
            let p = a.get(i, l).as_f64() * b.get(l, j).as_f64();
            s += p;
            mag += p.abs();
        }
        let mut v = alpha * s;
        mag *= alpha.abs();
        if acc {
            let o = out0[i * n + j].as_f64();
            v += beta * o;
            mag += (beta * o).abs();
        }
        (v, mag)
    }

    fn check_matmul<T: Real>(m: usize, k: usize, n: usize, rel: f64, samples: Option<usize>) {
        check_product(matmul::<T>, m, k, n, rel, samples)
    }

    type Product<T> = fn(MatRef<T>, MatRef<T>, &mut [T], T, T, bool);

    /// `product` against the reference on every layout, α, β and accumulation.
    fn check_product<T: Real>(
        product: Product<T>,
        m: usize,
        k: usize,
        n: usize,
        rel: f64,
        samples: Option<usize>,
    ) {
        let mut rng = Rng(0x5eed ^ (m * 1_000_003 + k * 1009 + n) as u64);
        for ta in [false, true] {
            for tb in [false, true] {
                for &(alpha, beta, acc) in &[
                    (1.0, 0.0, false),
                    (-0.75, 0.0, false),
                    (1.0, 1.0, true),
                    (0.5, -2.0, true),
                    (2.0, 0.0, true),
                ] {
                    let pad_a = if ta { 0 } else { 3 };
                    let pad_b = if tb { 2 } else { 0 };
                    let (da, sra, sca, sta) = stored::<T>(&mut rng, m, k, ta, pad_a);
                    let (db, srb, scb, stb) = stored::<T>(&mut rng, k, n, tb, pad_b);
                    let a = view(&da, sra, sca, sta, ta);
                    let b = view(&db, srb, scb, stb, tb);
                    assert_eq!((a.rows, a.cols, b.rows, b.cols), (m, k, k, n));
                    let mut out: Vec<T> = rng.vec(m * n);
                    if !acc {
                        // Must not be read when not accumulating.
                        out.iter_mut().step_by(7).for_each(|x| *x = T::nan());
                    }
                    let out0 = out.clone();
                    product(a, b, &mut out, T::of_f64(alpha), T::of_f64(beta), acc);
                    let check = |i: usize, j: usize| {
                        let (want, mag) = reference(a, b, &out0, (i, j), (alpha, beta, acc));
                        let got = out[i * n + j].as_f64();
                        let tol = rel * mag.max(1e-30) + 1e-300;
                        assert!(
                            (got - want).abs() <= tol,
                            "{} matmul {m}x{k}x{n} ta={ta} tb={tb} alpha={alpha} beta={beta} acc={acc}: out[{i},{j}] = {got}, want {want} (tol {tol})",
                            T::NAME
                        );
                    };
                    match samples {
                        None => (0..m).for_each(|i| (0..n).for_each(|j| check(i, j))),
                        Some(s) => {
                            for _ in 0..s {
                                let i = (rng.next_u64() % m as u64) as usize;
                                let j = (rng.next_u64() % n as u64) as usize;
                                check(i, j);
                            }
                            check(0, 0);
                            check(m - 1, n - 1);
                        }
                    }
                }
            }
        }
    }

    const SHAPES: &[(usize, usize, usize)] = &[
        (1, 1, 1),
        (3, 5, 2),
        (37, 64, 13),
        (1, 40, 9),
        (9, 40, 1),
        (16, 1, 33),
        (65, 130, 70),
    ];

    #[test]
    fn matmul_f64_matches_naive() {
        for &(m, k, n) in SHAPES {
            check_matmul::<f64>(m, k, n, 1e-13, None);
        }
        check_matmul::<f64>(784, 784, 100, 1e-13, Some(300));
        check_matmul::<f64>(784, 100, 784, 1e-13, Some(300));
    }

    #[test]
    fn matmul_f32_matches_naive() {
        for &(m, k, n) in SHAPES {
            check_matmul::<f32>(m, k, n, 1e-5, None);
        }
        check_matmul::<f32>(784, 784, 100, 1e-5, Some(300));
    }

    /// A transposed left operand this large takes the transposed formulation (`outᵀ = bᵀ·aᵀ`
    /// and a transposing pass) on the CPUs where it pays: that formulation, and `matmul`
    /// whichever way this CPU goes, on every layout, α, β and accumulation against the
    /// reference.
    #[test]
    fn matmul_large_transposed_left_matches_naive() {
        let (m, k, n) = (2100, 2000, 70);
        let a32 = vec![0f32; m * k];
        assert!(runs_better_transposed(
            &MatRef::row_major(&a32, k, m).t(),
            n
        ));
        assert!(!runs_better_transposed(&MatRef::row_major(&a32, m, k), n));
        assert!(!runs_better_transposed(
            &MatRef::row_major(&a32, k, m).t(),
            63
        ));
        check_matmul::<f32>(m, k, n, 1e-5, Some(200));
        check_matmul::<f64>(m, k, n, 1e-13, Some(200));
        check_product::<f32>(matmul_transposed, m, k, n, 1e-5, Some(200));
        check_product::<f64>(matmul_transposed, m, k, n, 1e-13, Some(200));
    }

    #[test]
    fn matmul_k0_and_empty() {
        let a: Vec<f64> = vec![];
        let b: Vec<f64> = vec![];
        let mut out = vec![f64::NAN; 6];
        matmul(
            MatRef::row_major(&a, 2, 0),
            MatRef::row_major(&b, 0, 3),
            &mut out,
            2.0,
            5.0,
            false,
        );
        assert_eq!(out, vec![0.0; 6]);
        let mut out = vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        matmul(
            MatRef::row_major(&a, 2, 0),
            MatRef::row_major(&b, 0, 3),
            &mut out,
            2.0,
            0.5,
            true,
        );
        assert_eq!(out, vec![0.5, 1.0, 1.5, 2.0, 2.5, 3.0]);
        let mut none: Vec<f32> = vec![];
        matmul(
            MatRef::new(&[1.0f32, 2.0], 0, 2, 2, 1).t().t(),
            MatRef::row_major(&[1.0f32, 2.0], 2, 1),
            &mut none,
            1.0,
            0.0,
            false,
        );
    }

    #[test]
    fn matmul_small_exact() {
        // [1 2 3; 4 5 6] · [1 0; 0 1; 1 1] = [4 5; 10 11]
        let a = [1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0];
        let b = [1.0f32, 0.0, 0.0, 1.0, 1.0, 1.0];
        let mut out = [0.0f32; 4];
        matmul(
            MatRef::row_major(&a, 2, 3),
            MatRef::row_major(&b, 3, 2),
            &mut out,
            1.0,
            0.0,
            false,
        );
        assert_eq!(out, [4.0, 5.0, 10.0, 11.0]);
        // aᵀ·a (3×3) through the transposed view.
        let mut out = [0.0f32; 9];
        matmul(
            MatRef::row_major(&a, 2, 3).t(),
            MatRef::row_major(&a, 2, 3),
            &mut out,
            1.0,
            0.0,
            false,
        );
        assert_eq!(out, [17.0, 22.0, 27.0, 22.0, 29.0, 36.0, 27.0, 36.0, 45.0]);
    }

    #[test]
    #[should_panic(expected = "does not fit")]
    fn matref_out_of_bounds_panics() {
        let d = [0.0f64; 5];
        let _ = MatRef::new(&d, 2, 3, 3, 1);
    }

    fn assert_close(got: f64, want: f64, tol: f64, what: &str) {
        assert!(
            (got - want).abs() <= tol * want.abs().max(1.0),
            "{what}: got {got}, want {want}"
        );
    }

    #[test]
    fn slogdet_hand_computed_3x3_negative() {
        // det [1 2 3; 4 5 6; 7 8 10] = 1·2 − 2·(−2) + 3·(−3) = −3
        let a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0];
        let (s, l) = slogdet::<f64>(&a, 3);
        assert_eq!(s, -1.0);
        assert_close(l, 3f64.ln(), 1e-14, "ln|det|");
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let (s, l) = slogdet::<f32>(&a32, 3);
        assert_eq!(s, -1.0);
        assert_close(l as f64, 3f64.ln(), 1e-5, "ln|det| f32");
        // Swapping two rows flips the sign.
        let b = [4.0, 5.0, 6.0, 1.0, 2.0, 3.0, 7.0, 8.0, 10.0];
        let (s, l) = slogdet::<f64>(&b, 3);
        assert_eq!(s, 1.0);
        assert_close(l, 3f64.ln(), 1e-14, "ln|det| swapped");
    }

    #[test]
    fn slogdet_triangular_is_diagonal_product() {
        let n = 7;
        let diag = [2.0, -0.5, 3.0, -1.5, 0.25, 4.0, -7.0];
        let mut rng = Rng(7);
        for upper in [true, false] {
            let mut a = vec![0.0f64; n * n];
            for i in 0..n {
                for j in 0..n {
                    if (upper && j > i) || (!upper && j < i) {
                        a[i * n + j] = 5.0 * rng.uniform();
                    }
                }
                a[i * n + i] = diag[i];
            }
            let prod: f64 = diag.iter().product();
            let (s, l) = slogdet::<f64>(&a, n);
            assert_eq!(s, prod.signum(), "upper={upper}");
            assert_close(l, prod.abs().ln(), 1e-13, "triangular ln|det|");
        }
    }

    #[test]
    fn slogdet_random_matches_inverse() {
        let n = 50;
        let mut rng = Rng(50);
        let a: Vec<f64> = rng.vec(n * n);
        let (s, l) = slogdet(&a, n);
        let inv = inverse(&a, n).unwrap();
        let (si, li) = slogdet(&inv, n);
        assert!(s == 1.0 || s == -1.0);
        assert_eq!(s, si);
        assert_close(l, -li, 1e-10, "ln|det A| vs -ln|det A⁻¹|");
        // f32 agrees with f64.
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let (s32, l32) = slogdet(&a32, n);
        assert_eq!(s32 as f64, s);
        assert_close(l32 as f64, l, 1e-4, "f32 vs f64 ln|det|");
        // A large matrix (parallel path) whose determinant over/underflows the plain product.
        let n = 300;
        let mut a: Vec<f64> = rng.vec(n * n);
        let inv = inverse(&a, n).unwrap();
        let (s, l) = slogdet(&a, n);
        let (si, li) = slogdet(&inv, n);
        assert_eq!(s, si);
        assert_close(l, -li, 1e-9, "300×300");
        // Scaling a row by -3 flips the sign and adds ln 3.
        a[..n].iter_mut().for_each(|x| *x *= -3.0);
        let (s3, l3) = slogdet(&a, n);
        assert_eq!(s3, -s);
        assert_close(l3, l + 3f64.ln(), 1e-10, "row scaling");
    }

    #[test]
    fn slogdet_singular_and_empty() {
        // Row 2 = 2 · row 1; chosen so that the elimination is exact in floating point (pivots and
        // multipliers are powers of two), giving an exactly zero pivot.
        let a = [1.0, 2.0, 4.0, 2.0, 4.0, 8.0, 1.0, 0.0, 1.0];
        assert_eq!(slogdet::<f64>(&a, 3), (0.0, f64::NEG_INFINITY));
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        assert_eq!(slogdet::<f32>(&a32, 3), (0.0, f32::NEG_INFINITY));
        assert_eq!(slogdet::<f64>(&[0.0; 16], 4), (0.0, f64::NEG_INFINITY));
        assert_eq!(slogdet::<f64>(&[], 0), (1.0, 0.0));
        let (s, l) = slogdet::<f64>(&[-2.5], 1);
        assert_eq!(s, -1.0);
        assert_close(l, 2.5f64.ln(), 1e-15, "1×1");
        let (s, l) = slogdet::<f64>(&[1.0, f64::NAN, 2.0, 3.0], 2);
        assert!(s.is_nan() && l.is_nan());
    }

    /// max |A·A⁻¹ − I|
    fn identity_error<T: Real>(a: &[T], inv: &[T], n: usize) -> f64 {
        let mut prod = vec![T::zero(); n * n];
        matmul(
            MatRef::row_major(a, n, n),
            MatRef::row_major(inv, n, n),
            &mut prod,
            T::one(),
            T::zero(),
            false,
        );
        let mut err = 0.0f64;
        for i in 0..n {
            for j in 0..n {
                let want = if i == j { 1.0 } else { 0.0 };
                err = err.max((prod[i * n + j].as_f64() - want).abs());
            }
        }
        err
    }

    fn random_well_conditioned<T: Real>(rng: &mut Rng, n: usize) -> Vec<T> {
        let mut a: Vec<f64> = (0..n * n).map(|_| rng.uniform()).collect();
        for i in 0..n {
            a[i * n + i] += (n as f64).sqrt();
        }
        a.into_iter().map(T::of_f64).collect()
    }

    #[test]
    fn inverse_small_exact() {
        // [4 7; 2 6]⁻¹ = [0.6 −0.7; −0.2 0.4]
        let inv = inverse::<f64>(&[4.0, 7.0, 2.0, 6.0], 2).unwrap();
        let want = [0.6, -0.7, -0.2, 0.4];
        for (g, w) in inv.iter().zip(want) {
            assert!((g - w).abs() < 1e-15, "{inv:?}");
        }
        assert_eq!(inverse::<f32>(&[], 0).unwrap(), Vec::<f32>::new());
    }

    #[test]
    fn inverse_random_gives_identity() {
        let n = 100;
        let mut rng = Rng(100);
        let a: Vec<f64> = random_well_conditioned(&mut rng, n);
        let inv = inverse(&a, n).unwrap();
        let e = identity_error(&a, &inv, n);
        assert!(e < 1e-10, "f64 |A·A⁻¹ − I| = {e}");
        let a32: Vec<f32> = a.iter().map(|&x| x as f32).collect();
        let inv32 = inverse(&a32, n).unwrap();
        let e = identity_error(&a32, &inv32, n);
        assert!(e < 1e-4, "f32 |A·A⁻¹ − I| = {e}");
        // Plain uniform entries (worse conditioned), larger n: the parallel path.
        let n = 300;
        let a: Vec<f64> = rng.vec(n * n);
        let inv = inverse(&a, n).unwrap();
        let e = identity_error(&a, &inv, n);
        assert!(e < 1e-9, "f64 300×300 |A·A⁻¹ − I| = {e}");
    }

    #[test]
    fn inverse_singular_is_error() {
        // Row 2 = 2 · row 1; chosen so that the elimination is exact in floating point (pivots and
        // multipliers are powers of two), giving an exactly zero pivot.
        let a = [1.0, 2.0, 4.0, 2.0, 4.0, 8.0, 1.0, 0.0, 1.0];
        assert!(matches!(
            inverse::<f64>(&a, 3),
            Err(LinalgError::Singular { .. })
        ));
        let z = [0.0f32; 4];
        assert_eq!(
            inverse::<f32>(&z, 2),
            Err(LinalgError::Singular { index: 0 })
        );
        assert!(matches!(
            inverse::<f64>(&[1.0, f64::INFINITY, 0.0, 1.0], 2),
            Err(LinalgError::NonFinite { .. })
        ));
        let msg = LinalgError::Singular { index: 3 }.to_string();
        assert_eq!(msg, "matrix is singular (LU pivot 3 is zero)");
    }

    #[test]
    fn solve_matches_inverse_times_b() {
        let mut rng = Rng(30);
        for (n, m) in [(1, 1), (4, 1), (30, 7), (200, 50)] {
            let a: Vec<f64> = rng.vec(n * n);
            let b: Vec<f64> = rng.vec(n * m);
            let x = solve(&a, n, &b, m).unwrap();
            let inv = inverse(&a, n).unwrap();
            let mut want = vec![0.0; n * m];
            matmul(
                MatRef::row_major(&inv, n, n),
                MatRef::row_major(&b, n, m),
                &mut want,
                1.0,
                0.0,
                false,
            );
            let scale = want.iter().fold(1.0f64, |s, v| s.max(v.abs()));
            for (g, w) in x.iter().zip(&want) {
                assert!((g - w).abs() <= 1e-10 * scale, "solve {n}×{m}: {g} vs {w}");
            }
            // And the residual A·X − B is small.
            let mut r = b.clone();
            matmul(
                MatRef::row_major(&a, n, n),
                MatRef::row_major(&x, n, m),
                &mut r,
                1.0,
                -1.0,
                true,
            );
            let res = r.iter().fold(0.0f64, |s, v| s.max(v.abs()));
            assert!(res < 1e-10 * scale, "solve {n}×{m}: residual {res}");
        }
        // f32
        let (n, m) = (40, 3);
        let a: Vec<f32> = random_well_conditioned(&mut rng, n);
        let b: Vec<f32> = rng.vec(n * m);
        let x = solve(&a, n, &b, m).unwrap();
        let mut r = b.clone();
        matmul(
            MatRef::row_major(&a, n, n),
            MatRef::row_major(&x, n, m),
            &mut r,
            1.0,
            -1.0,
            true,
        );
        let res = r.iter().fold(0.0f32, |s, v| s.max(v.abs()));
        assert!(res < 1e-5, "f32 solve residual {res}");
        // Singular.
        let s = [1.0, 2.0, 2.0, 4.0];
        assert!(matches!(
            solve::<f64>(&s, 2, &[1.0, 1.0], 1),
            Err(LinalgError::Singular { .. })
        ));
    }

    #[test]
    fn threads_is_positive() {
        assert!(threads() >= 1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .unwrap();
        assert_eq!(pool.install(threads), 3);
    }
}
