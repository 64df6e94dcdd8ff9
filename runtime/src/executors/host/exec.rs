//! The host executor: runs a [`Plan`] on the CPU in f32 or f64.
//!
//! Each run walks the plan's launch order, keeping one value per live slot and recycling
//! buffers after their last use (a dynamic pool: values may also take over a dying operand's
//! buffer in place, which the static assignment the GPU backends use does not do).
//! Transposes are views (a flag, no copy) that GEMMs read through strides.

use super::fused::{self, Ext};
use super::linalg::{self, GemmShape, MatRef, Real};
use super::shape_ops;
use super::spline::{Spline, SplineGrads, SplineParams};
use crate::executors::elementwise::{host_unary_in_place, host_unary_slice};
use crate::executors::profile::{Profile, ProfileRow, Work};
pub use crate::executors::values::{ExecError, Feeds, Tensor};
use rayon::prelude::*;
use snfc_compiler::ir::{Graph, Op, Shape, SplinePart};
use snfc_compiler::plan::{FusedKernel, Instr, Plan};
use std::collections::HashMap;
use std::sync::Arc;

/// The spline parameters among an op's operands `(x, widths, heights, derivatives, …)`.
fn spline_params<T>(args: &[Arc<Vec<T>>]) -> SplineParams<'_, T> {
    SplineParams {
        widths: &args[1],
        heights: &args[2],
        derivatives: &args[3],
    }
}

/// A plan ready for the host executor.
pub struct Program {
    plan: Plan,
}

impl Program {
    /// Lower `g` with elementwise fusion and GEMM epilogues.
    pub fn new(g: &Graph) -> Program {
        Self::from_plan(Plan::new(g))
    }

    /// One kernel per node (the reference the fused program is tested against).
    pub fn unfused(g: &Graph) -> Program {
        Self::from_plan(Plan::unfused(g))
    }

    /// The program for a step compiled at `level` (see [`Plan::for_level`]).
    pub fn for_level(g: &Graph, level: snfc_compiler::compile::OptLevel) -> Program {
        Self::from_plan(Plan::for_level(g, level))
    }

    /// Run a plan as it is (one read from `plan.json`, say; validate it first).
    pub fn from_plan(plan: Plan) -> Program {
        Program { plan }
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn name(&self) -> &str {
        &self.plan.name
    }

    /// Kernel launches per run: instructions that compute (not leaves or transposes).
    pub fn kernels(&self) -> usize {
        self.plan.kernels()
    }

    /// Names and shapes of the inputs (`input`) and parameters (`param`) the graph reads.
    pub fn feeds(&self) -> Vec<(&'static str, String, Shape)> {
        self.plan.feeds()
    }
}

/// Take `slot`'s value out of `donors` as a writable buffer of `len` elements, if nothing else
/// holds it and it is laid out plainly.
fn take_donor<T: Real>(
    donors: &mut Vec<(usize, Value<T>)>,
    slot: usize,
    len: usize,
    transposed: bool,
) -> Option<Vec<T>> {
    let pos = donors
        .iter()
        .position(|(s, v)| *s == slot && v.transposed == transposed && v.data.len() == len)?;
    let (s, v) = donors.swap_remove(pos);
    match Arc::try_unwrap(v.data) {
        Ok(buf) => Some(buf),
        Err(data) => {
            donors.push((s, Value { data, ..v }));
            None
        }
    }
}

/// `buf[k] = f(buf[k], other[k])` (or `other[0]` for a scalar), in place.
fn zip_inplace<T: Real>(buf: &mut [T], other: &[T], f: impl Fn(T, T) -> T + Sync) {
    if other.len() == 1 && buf.len() > 1 {
        let y = other[0];
        if buf.len() >= PAR_MIN {
            buf.par_chunks_mut(CHUNK)
                .for_each(|c| c.iter_mut().for_each(|x| *x = f(*x, y)));
        } else {
            buf.iter_mut().for_each(|x| *x = f(*x, y));
        }
    } else if buf.len() >= PAR_MIN {
        buf.par_chunks_mut(CHUNK)
            .zip(other.par_chunks(CHUNK))
            .for_each(|(c, o)| c.iter_mut().zip(o).for_each(|(x, y)| *x = f(*x, *y)));
    } else {
        buf.iter_mut().zip(other).for_each(|(x, y)| *x = f(*x, *y));
    }
}

/// A value during a run: a shared buffer, possibly read transposed.
#[derive(Clone)]
struct Value<T> {
    data: Arc<Vec<T>>,
    shape: Shape,
    /// The buffer holds the row-major transpose of the logical matrix.
    transposed: bool,
}

impl<T: Real> Value<T> {
    fn mat(&self) -> MatRef<'_, T> {
        let (r, c) = (self.shape[0], self.shape[1]);
        if self.transposed {
            MatRef::row_major(&self.data, c, r).t()
        } else {
            MatRef::row_major(&self.data, r, c)
        }
    }
}

/// Runs programs, recycling buffers between runs.
#[derive(Default)]
pub struct Executor<T> {
    pool: HashMap<usize, Vec<Vec<T>>>,
    /// Buffers of each size the pool may keep for the program being run: as many as the plan's
    /// static buffer assignment has of that size (values of that size live at once), plus
    /// [`POOL_SLACK`]. Ops that build their result in a fresh buffer (the convolutions) give
    /// theirs back too, and an unbounded pool held 64 buffers of every size: 24 GB for a
    /// width-512 Glow evaluated at batch 500.
    pool_cap: HashMap<usize, usize>,
    /// Seconds and count per op kind, when profiling.
    profile: Option<Profile>,
    /// Every matrix product of the runs since profiling began, as called.
    gemm_calls: Vec<GemmShape>,
    /// One spline VJP gives the gradients of all four operands; the graph asks for them in four
    /// `spline_grad` ops with the same operands. The first computes all four and leaves the
    /// others here (keyed by operand slots and part) for its siblings, within one run.
    spline_grads: HashMap<SplineKey, [Option<Vec<T>>; 4]>,
    /// Likewise the spline's value and log-derivative, computed together.
    spline_values: HashMap<Vec<usize>, [Option<Vec<T>>; 2]>,
}

/// A spline op's operand slots and part: the siblings that share one computation.
type SplineKey = (Vec<usize>, SplinePart);

/// Buffers of one size the pool keeps between uses, at most (see `Executor::recycle`).
const POOL_PER_SIZE: usize = 64;
/// Buffers of one size the pool keeps beyond the plan's own count of that size (the dynamic
/// pool hands buffers out in another order than the static assignment).
const POOL_SLACK: usize = 2;

/// Elementwise work below this many elements runs on one thread.
const PAR_MIN: usize = 1 << 15;
const CHUNK: usize = 1 << 13;

fn map_into<T: Real>(out: &mut [T], f: impl Fn(usize) -> T + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK)
            .enumerate()
            .for_each(|(c, chunk)| {
                for (j, o) in chunk.iter_mut().enumerate() {
                    *o = f(c * CHUNK + j);
                }
            });
    } else {
        for (j, o) in out.iter_mut().enumerate() {
            *o = f(j);
        }
    }
}

/// `out[k] = f(a[k])`, in parallel chunks for large tensors.
fn map1<T: Real>(out: &mut [T], a: &[T], f: impl Fn(T) -> T + Sync) {
    if out.len() >= PAR_MIN {
        out.par_chunks_mut(CHUNK)
            .zip(a.par_chunks(CHUNK))
            .for_each(|(o, a)| o.iter_mut().zip(a).for_each(|(o, a)| *o = f(*a)));
    } else {
        out.iter_mut().zip(a).for_each(|(o, a)| *o = f(*a));
    }
}

/// `out[k] = f(a[k], b[k])` where either operand may be a scalar.
fn map2<T: Real>(out: &mut [T], a: &[T], b: &[T], f: impl Fn(T, T) -> T + Sync) {
    match (a.len() == 1 && out.len() > 1, b.len() == 1 && out.len() > 1) {
        (true, _) => {
            let x = a[0];
            map1(out, b, |y| f(x, y))
        }
        (_, true) => {
            let y = b[0];
            map1(out, a, |x| f(x, y))
        }
        _ => {
            if out.len() >= PAR_MIN {
                out.par_chunks_mut(CHUNK)
                    .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
                    .for_each(|(o, (a, b))| {
                        for ((o, x), y) in o.iter_mut().zip(a).zip(b) {
                            *o = f(*x, *y);
                        }
                    });
            } else {
                for ((o, x), y) in out.iter_mut().zip(a).zip(b) {
                    *o = f(*x, *y);
                }
            }
        }
    }
}

/// Row-major `src` (`rows × cols`) transposed into `out` (`cols × rows`): f32 on AVX-512 in
/// 16 × 16 register blocks ([`transpose_f32_avx512`]), everything else in tiles
/// ([`transpose_tiles`]). A weight gradient's transposed term is one such transpose per step.
fn transpose_into<T: Real>(src: &[T], rows: usize, cols: usize, out: &mut [T]) {
    assert!(src.len() >= rows * cols && out.len() >= rows * cols);
    #[cfg(target_arch = "x86_64")]
    if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
        && is_x86_feature_detected!("avx512f")
    {
        // SAFETY: T is f32 (so the casts are identities), and the CPU has AVX-512F.
        unsafe {
            let src = std::slice::from_raw_parts(src.as_ptr().cast::<f32>(), src.len());
            let out = std::slice::from_raw_parts_mut(out.as_mut_ptr().cast::<f32>(), out.len());
            transpose_f32_avx512(src, rows, cols, out);
        }
        return;
    }
    transpose_tiles(src, rows, cols, out);
}

/// [`transpose_into`] without AVX-512: 32 × 32 tiles, f32 in 4 × 4 SSE blocks (a scalar
/// element-by-element walk ran at half the speed).
fn transpose_tiles<T: Real>(src: &[T], rows: usize, cols: usize, out: &mut [T]) {
    const TILE: usize = 32;
    assert!(src.len() >= rows * cols && out.len() >= rows * cols);
    // Parallel over bands of output rows (= source columns).
    out.par_chunks_mut(TILE * rows)
        .enumerate()
        .for_each(|(band, o)| {
            let c0 = band * TILE;
            let c1 = (c0 + TILE).min(cols);
            for r0 in (0..rows).step_by(TILE) {
                let r1 = (r0 + TILE).min(rows);
                // The 4 × 4 blocks of the tile, then what is left at its right and bottom.
                let (mut c4, mut r4) = (c0, r0);
                #[cfg(target_arch = "x86_64")]
                if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
                    (c4, r4) = (c0 + (c1 - c0) / 4 * 4, r0 + (r1 - r0) / 4 * 4);
                    for c in (c0..c4).step_by(4) {
                        for r in (r0..r4).step_by(4) {
                            // SAFETY: T is f32; rows r..r+4 and columns c..c+4 lie inside
                            // `src` (r + 3 < rows, c + 3 < cols, asserted sizes) and the
                            // output rows c−c0..c−c0+4, columns r..r+4 inside this band.
                            unsafe {
                                transpose_4x4_f32(
                                    src.as_ptr().cast::<f32>().add(r * cols + c),
                                    cols,
                                    o.as_mut_ptr().cast::<f32>().add((c - c0) * rows + r),
                                    rows,
                                );
                            }
                        }
                    }
                }
                for c in c0..c1 {
                    let orow = &mut o[(c - c0) * rows..(c - c0 + 1) * rows];
                    // Rows already moved as blocks (r < r4) only for columns below c4.
                    let from = if c < c4 { r4 } else { r0 };
                    for r in from..r1 {
                        orow[r] = src[r * cols + c];
                    }
                }
            }
        });
}

/// [`transpose_into`] for f32 on AVX-512: 16 × 16 blocks transposed in registers, so that each
/// block reads 16 whole cache lines and writes 16 (with the 4 × 4 blocks a 3072 × 3072
/// transpose took about six times as long as a copy of the same matrix; this way, about four
/// times: its source rows are read 256 bytes at a time). Parallel over bands of output
/// rows; in each band the blocks go row block by row block of the source, so the band's output
/// pages are reused throughout.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn transpose_f32_avx512(src: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const BAND: usize = 64;
    const B: usize = 16;
    // Source rows prefetched ahead of the block being transposed: a band reads 256 bytes of
    // each source row, too little for the hardware prefetchers to follow.
    const AHEAD: usize = 2 * B;
    assert!(src.len() >= rows * cols && out.len() >= rows * cols);
    let (rows_b, cols_b) = (rows / B * B, cols / B * B);
    out.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, o)| {
            let c0 = band * BAND;
            let c1 = (c0 + BAND).min(cols);
            let cb = c1.min(cols_b).max(c0);
            for r in (0..rows_b).step_by(B) {
                for ahead in (r + AHEAD..r + AHEAD + B).take_while(|&ahead| ahead < rows) {
                    for c in (c0..cb).step_by(B) {
                        let line = src[ahead * cols + c..].as_ptr().cast::<i8>();
                        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>(line);
                    }
                }
                for c in (c0..cb).step_by(B) {
                    // SAFETY: rows r..r+16 and columns c..c+16 lie inside `src` (r + 16 ≤
                    // rows, c + 16 ≤ cols); output rows c−c0..c−c0+16 (columns r..r+16) lie
                    // inside this band (c + 16 ≤ c1). AVX-512F is enabled on this function.
                    unsafe {
                        transpose_16x16_f32(
                            src.as_ptr().add(r * cols + c),
                            cols,
                            o.as_mut_ptr().add((c - c0) * rows + r),
                            rows,
                        );
                    }
                }
            }
            // What the blocks left: the last rows of the block columns, and the columns of a
            // band's partial block.
            for c in c0..c1 {
                let orow = &mut o[(c - c0) * rows..(c - c0 + 1) * rows];
                let from = if c < cb { rows_b } else { 0 };
                for (r, slot) in orow.iter_mut().enumerate().skip(from) {
                    *slot = src[r * cols + c];
                }
            }
        });
}

/// Transpose the 16 × 16 f32 block at `src` (row stride `src_stride`) into `dst` (row stride
/// `dst_stride`): 32-bit then 64-bit interleaves leave 4 × 4 blocks transposed in each 128-bit
/// lane, and two lane shuffles put the lanes in place.
///
/// # Safety
/// Sixteen rows of sixteen floats must be readable at `src` and writable at `dst`, and the CPU
/// must have AVX-512F.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
#[inline]
unsafe fn transpose_16x16_f32(
    src: *const f32,
    src_stride: usize,
    dst: *mut f32,
    dst_stride: usize,
) {
    use std::arch::x86_64::*;
    let r: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(src.add(i * src_stride)));
    // t[2k], t[2k+1]: rows 2k and 2k+1 interleaved element by element, in each lane.
    let mut t = [_mm512_setzero_ps(); 16];
    for k in 0..8 {
        t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
        t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
    }
    // u[4k+j], lane L: column 4L+j of rows 4k..4k+4.
    let mut u = [_mm512_setzero_ps(); 16];
    let pd = _mm512_castps_pd;
    let ps = _mm512_castpd_ps;
    for k in 0..4 {
        let (a, b, c, d) = (t[4 * k], t[4 * k + 1], t[4 * k + 2], t[4 * k + 3]);
        u[4 * k] = ps(_mm512_unpacklo_pd(pd(a), pd(c)));
        u[4 * k + 1] = ps(_mm512_unpackhi_pd(pd(a), pd(c)));
        u[4 * k + 2] = ps(_mm512_unpacklo_pd(pd(b), pd(d)));
        u[4 * k + 3] = ps(_mm512_unpackhi_pd(pd(b), pd(d)));
    }
    // Output row 4L+j is lane L of u[j], u[4+j], u[8+j], u[12+j].
    for j in 0..4 {
        let v0 = _mm512_shuffle_f32x4::<0x88>(u[j], u[4 + j]);
        let v1 = _mm512_shuffle_f32x4::<0xDD>(u[j], u[4 + j]);
        let w0 = _mm512_shuffle_f32x4::<0x88>(u[8 + j], u[12 + j]);
        let w1 = _mm512_shuffle_f32x4::<0xDD>(u[8 + j], u[12 + j]);
        _mm512_storeu_ps(
            dst.add(j * dst_stride),
            _mm512_shuffle_f32x4::<0x88>(v0, w0),
        );
        _mm512_storeu_ps(
            dst.add((4 + j) * dst_stride),
            _mm512_shuffle_f32x4::<0x88>(v1, w1),
        );
        _mm512_storeu_ps(
            dst.add((8 + j) * dst_stride),
            _mm512_shuffle_f32x4::<0xDD>(v0, w0),
        );
        _mm512_storeu_ps(
            dst.add((12 + j) * dst_stride),
            _mm512_shuffle_f32x4::<0xDD>(v1, w1),
        );
    }
}

/// Transpose the 4 × 4 f32 block at `src` (row stride `src_stride`) into `dst` (row stride
/// `dst_stride`).
///
/// # Safety
/// Four rows of four floats must be readable at `src` and writable at `dst`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
unsafe fn transpose_4x4_f32(src: *const f32, src_stride: usize, dst: *mut f32, dst_stride: usize) {
    use std::arch::x86_64::*;
    let mut a = _mm_loadu_ps(src);
    let mut b = _mm_loadu_ps(src.add(src_stride));
    let mut c = _mm_loadu_ps(src.add(2 * src_stride));
    let mut d = _mm_loadu_ps(src.add(3 * src_stride));
    _MM_TRANSPOSE4_PS(&mut a, &mut b, &mut c, &mut d);
    _mm_storeu_ps(dst, a);
    _mm_storeu_ps(dst.add(dst_stride), b);
    _mm_storeu_ps(dst.add(2 * dst_stride), c);
    _mm_storeu_ps(dst.add(3 * dst_stride), d);
}

impl<T: Real> Executor<T> {
    pub fn new() -> Self {
        Executor {
            pool: HashMap::new(),
            pool_cap: HashMap::new(),
            profile: None,
            gemm_calls: Vec::new(),
            spline_grads: HashMap::new(),
            spline_values: HashMap::new(),
        }
    }

    /// Elements held in the buffer pool (for diagnostics and tests: it must not grow run after
    /// run).
    pub fn pooled_elements(&self) -> usize {
        self.pool.values().flatten().map(Vec::len).sum()
    }

    /// Record the time spent per op kind from now on.
    pub fn enable_profile(&mut self) {
        self.profile = Some(Profile::default());
        self.gemm_calls.clear();
    }

    /// The matrix products of the runs since [`enable_profile`](Self::enable_profile), one
    /// entry per call (to time them in isolation: the step's GEMM rate).
    pub fn gemm_calls(&self) -> &[GemmShape] {
        &self.gemm_calls
    }

    /// A matrix product of the plan, recorded when profiling.
    fn gemm(&mut self, a: MatRef<T>, b: MatRef<T>, out: &mut [T], alpha: T, beta: T, acc: bool) {
        if self.profile.is_some() {
            self.gemm_calls.push(GemmShape::of(&a, &b, acc));
        }
        linalg::matmul(a, b, out, alpha, beta, acc);
    }

    /// Seconds and launches per op kind since [`enable_profile`](Self::enable_profile), most
    /// expensive first.
    pub fn profile(&self) -> Vec<ProfileRow> {
        self.profile.as_ref().map(Profile::rows).unwrap_or_default()
    }

    /// Take back a buffer handed out as an output of an earlier run (a gradient the optimizer
    /// has used), so the next run fills it instead of zeroing fresh memory.
    pub fn reuse(&mut self, data: Vec<T>) {
        self.recycle(Value {
            data: Arc::new(data),
            shape: Vec::new(),
            transposed: false,
        });
    }

    fn alloc(&mut self, len: usize) -> Vec<T> {
        match self.pool.get_mut(&len).and_then(|v| v.pop()) {
            Some(b) => b,
            None => vec![T::zero(); len],
        }
    }

    /// Keep a dead value's buffer for a later allocation of its size. Ops that build their
    /// result in a fresh buffer (an inverse, a Toeplitz matrix) return buffers of sizes that
    /// nothing may allocate again, so each size keeps at most [`POOL_PER_SIZE`]: the pool stays
    /// bounded over any number of runs.
    fn recycle(&mut self, v: Value<T>) {
        if let Ok(buf) = Arc::try_unwrap(v.data) {
            if buf.len() > 1 {
                let cap = self
                    .pool_cap
                    .get(&buf.len())
                    .copied()
                    .unwrap_or(POOL_SLACK)
                    .min(POOL_PER_SIZE);
                let kept = self.pool.entry(buf.len()).or_default();
                if kept.len() < cap {
                    kept.push(buf);
                }
            }
        }
    }

    /// The buffer of an elementwise operand in the layout the op computes in.
    fn operand(&mut self, v: &Value<T>, layout_t: bool) -> Arc<Vec<T>> {
        if v.data.len() == 1 || v.transposed == layout_t {
            v.data.clone()
        } else {
            self.contiguous(v)
        }
    }

    /// A contiguous (not transposed) buffer with the value's logical layout.
    fn contiguous(&mut self, v: &Value<T>) -> Arc<Vec<T>> {
        if !v.transposed {
            return v.data.clone();
        }
        let (r, c) = (v.shape[0], v.shape[1]);
        let mut out = self.alloc(r * c);
        // The buffer is the row-major c × r transpose of the logical r × c matrix.
        transpose_into(&v.data, c, r, &mut out);
        Arc::new(out)
    }

    /// Run `p` on `feeds`; returns the outputs by name, in the graph's output order.
    /// Subnormals are flushed to zero meanwhile ([`flush_denormals`](super::denormals)).
    pub fn run(
        &mut self,
        p: &Program,
        feeds: &Feeds<T>,
    ) -> Result<Vec<(String, Tensor<T>)>, ExecError> {
        // The plan runs on a thread of the rayon pool, so each parallel kernel starts where a
        // worker is already awake instead of waking the pool from outside for every kernel.
        super::denormals::flush_denormals(|| rayon::scope(|_| self.run_plan(&p.plan, feeds)))
    }

    fn run_plan(
        &mut self,
        p: &Plan,
        feeds: &Feeds<T>,
    ) -> Result<Vec<(String, Tensor<T>)>, ExecError> {
        self.spline_grads.clear();
        self.spline_values.clear();
        self.pool_cap.clear();
        for &size in &p.buffers.sizes {
            *self.pool_cap.entry(size).or_insert(POOL_SLACK) += 1;
        }
        // A pool kept from another program holds nothing beyond this one's caps.
        for (size, kept) in self.pool.iter_mut() {
            kept.truncate(self.pool_cap.get(size).copied().unwrap_or(POOL_SLACK));
        }
        let mut vals: Vec<Option<Value<T>>> = vec![None; p.instrs.len()];
        let mut donors: Vec<(usize, Value<T>)> = Vec::new();
        for &i in &p.order {
            let ins = &p.instrs[i];
            // Operands used for the last time here may lend their buffer to the result.
            for r in &ins.release {
                if ins.args.iter().filter(|a| *a == r).count() == 1 {
                    if let Some(v) = vals[*r].take() {
                        donors.push((*r, v));
                    }
                }
            }
            let layouts: String = if self.profile.is_some() && ins.op == Op::MatMul {
                ins.args[..2]
                    .iter()
                    .map(|a| {
                        let t = vals[*a]
                            .as_ref()
                            .or_else(|| donors.iter().find(|d| d.0 == *a).map(|d| &d.1));
                        if t.is_some_and(|v| v.transposed) {
                            "T"
                        } else {
                            "N"
                        }
                    })
                    .collect()
            } else {
                String::new()
            };
            let started = self.profile.is_some().then(std::time::Instant::now);
            if let Some(group) = &ins.group {
                let (kernel, slots) = (&group.kernel, &group.slots);
                let produced = self.exec_group(kernel, ins, &vals, &donors);
                for (_, d) in donors.drain(..) {
                    self.recycle(d);
                }
                if let (Some(t), Some(prof)) = (started, self.profile.as_mut()) {
                    let kind = format!("fused group ({} ops)", kernel.members.len());
                    prof.add(Work::Elementwise, kind, t);
                }
                for (slot, v) in slots.iter().zip(produced) {
                    vals[*slot] = Some(v);
                }
                for r in &ins.release {
                    if let Some(v) = vals[*r].take() {
                        self.recycle(v);
                    }
                }
                continue;
            }
            let v = self.exec(p, i, ins, &vals, &mut donors, feeds)?;
            for (_, d) in donors.drain(..) {
                self.recycle(d);
            }
            if let (Some(t), Some(prof)) = (started, self.profile.as_mut()) {
                let kind = match &ins.op {
                    Op::MatMul => format!(
                        "matmul{} {:?} ({})",
                        if ins.epilogue.is_some() { "+acc" } else { "" },
                        ins.shape,
                        layouts
                    ),
                    Op::Input { .. } | Op::Param { .. } | Op::Const { .. } => "leaf".to_string(),
                    op => op.to_string().split(':').next().unwrap_or("?").to_string(),
                };
                prof.add(Work::of(&ins.op), kind, t);
            }
            vals[i] = Some(v);
            for r in &ins.release {
                if let Some(v) = vals[*r].take() {
                    self.recycle(v);
                }
            }
        }
        let mut out = Vec::with_capacity(p.outputs.len());
        for (k, (name, slot)) in p.outputs.iter().enumerate() {
            // The last output of a slot takes its value, so a buffer nothing else holds is
            // handed out as it is: cloning it copied every gradient (75 MB per step for one
            // 3072-wide layer's W and R).
            let last_use = !p.outputs[k + 1..].iter().any(|(_, s)| s == slot);
            let v = if last_use {
                vals[*slot].take()
            } else {
                vals[*slot].clone()
            }
            .expect("output computed");
            // (`contiguous` of a plain value clones the Arc: unwrapping that clone while `v`
            // still held the buffer copied every gradient.)
            let Value {
                data,
                shape,
                transposed,
            } = v;
            let data = if transposed {
                self.contiguous(&Value {
                    data,
                    shape: shape.clone(),
                    transposed,
                })
            } else {
                data
            };
            let data = Arc::try_unwrap(data).unwrap_or_else(|a| (*a).clone());
            out.push((name.clone(), Tensor { shape, data }));
        }
        for v in vals.into_iter().flatten() {
            self.recycle(v);
        }
        Ok(out)
    }

    fn exec_group(
        &mut self,
        kernel: &FusedKernel,
        ins: &Instr,
        vals: &[Option<Value<T>>],
        donors: &[(usize, Value<T>)],
    ) -> Vec<Value<T>> {
        let inputs: Vec<Arc<Vec<T>>> = ins
            .args
            .iter()
            .map(|a| {
                let v = donors
                    .iter()
                    .find(|(s, _)| s == a)
                    .map(|(_, v)| v.clone())
                    .or_else(|| vals[*a].clone())
                    .expect("group input computed");
                self.contiguous(&v)
            })
            .collect();
        let ext: Vec<Ext<T>> = inputs.iter().map(|d| Ext { data: d }).collect();
        // Sums accumulate into their output, so it starts at zero; every other output is
        // overwritten whole (zeroing those too was most of the memset time of a CNN step).
        let mut outs: Vec<Vec<T>> = kernel
            .outputs
            .iter()
            .map(|(member, shape)| {
                let mut b = self.alloc(shape.iter().product::<usize>().max(1));
                if matches!(kernel.members[*member].op, Op::Sum { .. }) {
                    b.fill(T::zero());
                }
                b
            })
            .collect();
        fused::run(kernel, &ext, &mut outs);
        outs.into_iter()
            .zip(&kernel.outputs)
            .map(|(data, (_, shape))| Value {
                data: Arc::new(data),
                shape: shape.clone(),
                transposed: false,
            })
            .collect()
    }

    fn exec(
        &mut self,
        p: &Plan,
        i: usize,
        ins: &Instr,
        vals: &[Option<Value<T>>],
        donors: &mut Vec<(usize, Value<T>)>,
        feeds: &Feeds<T>,
    ) -> Result<Value<T>, ExecError> {
        let get = |donors: &Vec<(usize, Value<T>)>, k: usize| -> Value<T> {
            let slot = ins.args[k];
            match donors.iter().find(|(s, _)| *s == slot) {
                Some((_, v)) => v.clone(),
                None => vals[slot].clone().unwrap_or_else(|| {
                    panic!(
                        "snfc internal error: {} reads %{slot} before it is computed",
                        ins.op
                    )
                }),
            }
        };
        macro_rules! arg {
            ($k:expr) => {
                get(donors, $k)
            };
        }
        let numel: usize = ins.shape.iter().product();
        let value = |data: Vec<T>| Value {
            data: Arc::new(data),
            shape: ins.shape.clone(),
            transposed: false,
        };
        Ok(match &ins.op {
            Op::Input { name, shape } | Op::Param { name, shape } => {
                let kind = if matches!(ins.op, Op::Input { .. }) {
                    "input"
                } else {
                    "param"
                };
                let data = feeds.get(name).ok_or_else(|| ExecError::Missing {
                    graph: p.name.clone(),
                    kind,
                    name: name.clone(),
                })?;
                if data.len() != numel {
                    return Err(ExecError::BadShape {
                        graph: p.name.clone(),
                        kind,
                        name: name.clone(),
                        got: data.len(),
                        shape: shape.clone(),
                    });
                }
                Value {
                    data: data.clone(),
                    shape: shape.clone(),
                    transposed: false,
                }
            }
            Op::Const { bits } => value(vec![T::of_f64(f64::from_bits(*bits))]),
            Op::MatMul => {
                let (a, b) = (arg!(0), arg!(1));
                match ins.epilogue {
                    None => {
                        let mut out = self.alloc(numel);
                        self.gemm(a.mat(), b.mat(), &mut out, T::one(), T::zero(), false);
                        value(out)
                    }
                    Some(snfc_compiler::plan::Epilogue { alpha, beta }) => {
                        // A `c` taken over in place keeps its layout: a transposed one takes
                        // (a·b)ᵀ = bᵀ·aᵀ. A `c` that must be copied (a parameter's transposed
                        // view, say) is copied into row-major order: the same one pass, and
                        // the result needs no transposing copy later (as a gradient output).
                        let c_stored_t = get(donors, 2).transposed;
                        let (mut out, c_t) =
                            match take_donor(donors, ins.args[2], numel, c_stored_t) {
                                Some(buf) => (buf, c_stored_t),
                                None => {
                                    let c = get(donors, 2);
                                    let mut out = self.alloc(numel);
                                    if c.transposed {
                                        transpose_into(&c.data, c.shape[1], c.shape[0], &mut out);
                                    } else {
                                        out.copy_from_slice(&c.data);
                                    }
                                    (out, false)
                                }
                            };
                        let (alpha, beta) = (T::of_f64(alpha), T::of_f64(beta));
                        if c_t {
                            self.gemm(b.mat().t(), a.mat().t(), &mut out, alpha, beta, true);
                        } else {
                            self.gemm(a.mat(), b.mat(), &mut out, alpha, beta, true);
                        }
                        Value {
                            data: Arc::new(out),
                            shape: ins.shape.clone(),
                            transposed: c_t,
                        }
                    }
                }
            }
            Op::Transpose => {
                let a = arg!(0);
                Value {
                    data: a.data.clone(),
                    shape: ins.shape.clone(),
                    transposed: !a.transposed,
                }
            }
            Op::Inverse | Op::LogDet => {
                let a = arg!(0).clone();
                let n = a.shape[0];
                let data = self.contiguous(&a);
                if ins.op == Op::LogDet {
                    let (_sign, ld) = linalg::slogdet(&data, n);
                    value(vec![ld])
                } else {
                    let inv = linalg::inverse(&data, n).map_err(|source| ExecError::Linalg {
                        graph: p.name.clone(),
                        node: i,
                        op: ins.op.to_string(),
                        source,
                    })?;
                    value(inv)
                }
            }
            Op::Add | Op::Sub | Op::Mul | Op::Neg | Op::Unary(_) | Op::StopGrad => {
                // Elementwise ops do not care about layout: when every matrix operand is stored
                // transposed, compute on the stored buffers and keep the result transposed.
                let metas: Vec<(usize, bool)> = (0..ins.args.len())
                    .map(|k| {
                        let v = arg!(k);
                        (v.data.len(), v.transposed)
                    })
                    .collect();
                let layout_t = numel > 1 && metas.iter().filter(|m| m.0 > 1).all(|m| m.1);
                let out_value = |data: Vec<T>| Value {
                    data: Arc::new(data),
                    shape: ins.shape.clone(),
                    transposed: layout_t,
                };
                let op = ins.op.clone();
                let f2 = move |x: T, y: T| match op {
                    Op::Add => x + y,
                    Op::Sub => x - y,
                    _ => x * y,
                };
                if ins.args.len() == 1 {
                    if let Some(mut buf) = take_donor(donors, ins.args[0], numel, layout_t) {
                        match ins.op {
                            Op::Neg => buf.iter_mut().for_each(|x| *x = -*x),
                            Op::Unary(u) => {
                                if buf.len() >= PAR_MIN {
                                    buf.par_chunks_mut(CHUNK)
                                        .for_each(|c| host_unary_in_place(u, c))
                                } else {
                                    host_unary_in_place(u, &mut buf)
                                }
                            }
                            _ => {}
                        }
                        return Ok(out_value(buf));
                    }
                    let a = arg!(0);
                    let a = self.operand(&a, layout_t);
                    let mut out = self.alloc(numel);
                    match ins.op {
                        Op::Neg => map1(&mut out, &a, |x| -x),
                        Op::Unary(u) if out.len() >= PAR_MIN => out
                            .par_chunks_mut(CHUNK)
                            .zip(a.par_chunks(CHUNK))
                            .for_each(|(o, a)| host_unary_slice(u, a, o)),
                        Op::Unary(u) => host_unary_slice(u, &a, &mut out),
                        _ => out.copy_from_slice(&a),
                    }
                    return Ok(out_value(out));
                }
                if let Some(mut buf) = take_donor(donors, ins.args[0], numel, layout_t) {
                    let b = arg!(1);
                    let b = self.operand(&b, layout_t);
                    zip_inplace(&mut buf, &b, f2);
                    return Ok(out_value(buf));
                }
                if let Some(mut buf) = take_donor(donors, ins.args[1], numel, layout_t) {
                    let a = arg!(0);
                    let a = self.operand(&a, layout_t);
                    zip_inplace(&mut buf, &a, |y, x| f2(x, y));
                    return Ok(out_value(buf));
                }
                let (a, b) = (arg!(0), arg!(1));
                let (a, b) = (self.operand(&a, layout_t), self.operand(&b, layout_t));
                let mut out = self.alloc(numel);
                match ins.op {
                    Op::Add => map2(&mut out, &a, &b, |x, y| x + y),
                    Op::Sub => map2(&mut out, &a, &b, |x, y| x - y),
                    _ => map2(&mut out, &a, &b, |x, y| x * y),
                }
                out_value(out)
            }
            Op::Sum { axis } => {
                let a = arg!(0).clone();
                let a = self.contiguous(&a);
                let mut out = self.alloc(numel.max(1));
                match axis {
                    None => out[0] = a.iter().copied().sum(),
                    Some(0) => {
                        let c = ins.shape[0];
                        let r = a.len() / c;
                        out.iter_mut().for_each(|o| *o = T::zero());
                        for row in 0..r {
                            let src = &a[row * c..(row + 1) * c];
                            for (o, s) in out.iter_mut().zip(src) {
                                *o += *s;
                            }
                        }
                    }
                    Some(_) => {
                        let r = ins.shape[0];
                        let c = a.len() / r;
                        map_into(&mut out, |row| {
                            a[row * c..(row + 1) * c].iter().copied().sum()
                        });
                    }
                }
                value(out)
            }
            Op::Reshape { .. } => {
                let a = arg!(0).clone();
                Value {
                    data: self.contiguous(&a),
                    shape: ins.shape.clone(),
                    transposed: false,
                }
            }
            Op::Take { axis, index } => {
                let a = arg!(0).clone();
                value(shape_ops::take(
                    &self.contiguous(&a),
                    &a.shape,
                    *axis,
                    *index,
                ))
            }
            Op::Embed { axis, index, size } => {
                let a = arg!(0).clone();
                value(shape_ops::embed(
                    &self.contiguous(&a),
                    &a.shape,
                    *axis,
                    *index,
                    *size,
                ))
            }
            Op::Permute { perm } => {
                let a = arg!(0).clone();
                value(shape_ops::permute(&self.contiguous(&a), &a.shape, perm))
            }
            Op::ReduceSum { axes } => {
                let a = arg!(0).clone();
                value(shape_ops::reduce_sum(&self.contiguous(&a), &a.shape, axes))
            }
            Op::Expand { to, axes } => {
                let a = arg!(0).clone();
                value(shape_ops::expand(&self.contiguous(&a), to, axes))
            }
            Op::Conv2d => {
                let (x, k) = (arg!(0).clone(), arg!(1).clone());
                let (xd, kd) = (self.contiguous(&x), self.contiguous(&k));
                value(shape_ops::conv2d(&xd, &x.shape, &kd, &k.shape))
            }
            Op::FlipKernel => {
                let a = arg!(0).clone();
                value(shape_ops::flip_kernel(&self.contiguous(&a), &a.shape))
            }
            Op::ConvKernelGrad { k } => {
                let (dy, x) = (arg!(0).clone(), arg!(1).clone());
                let (dyd, xd) = (self.contiguous(&dy), self.contiguous(&x));
                value(shape_ops::conv_kernel_grad(
                    &dyd, &dy.shape, &xd, &x.shape, *k,
                ))
            }
            Op::Toeplitz { h, w } => {
                let a = arg!(0).clone();
                value(shape_ops::toeplitz(&self.contiguous(&a), &a.shape, *h, *w))
            }
            Op::Spline { bins, bound, part } => {
                let slot = match part {
                    SplinePart::Value | SplinePart::Inverse => 0,
                    SplinePart::LogDet => 1,
                    SplinePart::Both => unreachable!("a spline value has one part (shape rule)"),
                };
                // The value and the log-det of one input are computed together (the cache holds
                // the other); an inverse is its own pass.
                let inverse = *part == SplinePart::Inverse;
                if let Some(done) = self
                    .spline_values
                    .get_mut(&ins.args)
                    .filter(|_| !inverse)
                    .and_then(|both| both[slot].take())
                {
                    return Ok(value(done));
                }
                let args: Vec<Arc<Vec<T>>> = (0..4)
                    .map(|k| {
                        let a = arg!(k).clone();
                        self.contiguous(&a)
                    })
                    .collect();
                let n = ins.shape[1];
                let sp = Spline::new(*bins, T::of_f64(f64::from_bits(*bound)));
                let (mut y, mut ld) = (vec![T::zero(); numel], vec![T::zero(); numel]);
                if inverse {
                    sp.inverse_batch(&args[0], n, spline_params(&args), &mut y, &mut ld);
                    return Ok(value(y));
                }
                sp.forward_batch(&args[0], n, spline_params(&args), &mut y, &mut ld);
                let mut both = [Some(y), Some(ld)];
                let mine = both[slot].take().unwrap_or_default();
                self.spline_values.insert(ins.args.clone(), both);
                value(mine)
            }
            Op::SplineGrad {
                bins,
                bound,
                part,
                wrt,
            } => {
                let key = (ins.args.clone(), *part);
                if let Some(done) = self
                    .spline_grads
                    .get_mut(&key)
                    .and_then(|all| all[*wrt].take())
                {
                    return Ok(value(done));
                }
                let args: Vec<Arc<Vec<T>>> = (0..ins.args.len())
                    .map(|k| {
                        let a = arg!(k).clone();
                        self.contiguous(&a)
                    })
                    .collect();
                let x_shape = &arg!(0).shape;
                let (d, n) = (x_shape[0], x_shape[1]);
                let sp = Spline::new(*bins, T::of_f64(f64::from_bits(*bound)));
                // The other part's cotangent is zero (a `[N]` g_l is broadcast over the rows).
                let zeros = vec![
                    T::zero();
                    match part {
                        SplinePart::Value => n,
                        SplinePart::LogDet => d * n,
                        SplinePart::Both | SplinePart::Inverse => 0,
                    }
                ];
                let (g_y, g_l): (&[T], &[T]) = match part {
                    SplinePart::Value => (&args[4], &zeros),
                    SplinePart::LogDet => (&zeros, &args[4]),
                    SplinePart::Both => (&args[4], &args[5]),
                    SplinePart::Inverse => {
                        unreachable!("the inverse spline has no gradient (shape rule)")
                    }
                };
                let mut g_x = vec![T::zero(); d * n];
                let mut gw = vec![T::zero(); d * bins];
                let mut gh = vec![T::zero(); d * bins];
                let mut gd = vec![T::zero(); d * (bins - 1)];
                let grads = SplineGrads {
                    widths: &mut gw,
                    heights: &mut gh,
                    derivatives: &mut gd,
                };
                sp.vjp_batch(&args[0], n, spline_params(&args), g_y, g_l, &mut g_x, grads);
                let mut all = [Some(g_x), Some(gw), Some(gh), Some(gd)];
                let mine = all[*wrt].take().unwrap_or_default();
                self.spline_grads.insert(key, all);
                value(mine)
            }
            Op::Multiplicity { h, w } => {
                let a = arg!(0).clone();
                let kk = a.shape[2];
                value(shape_ops::mul_multiplicity(
                    &self.contiguous(&a),
                    kk,
                    *h,
                    *w,
                ))
            }
            Op::ToeplitzAdjoint { h, w, k } => {
                let a = arg!(0).clone();
                value(shape_ops::toeplitz_adjoint(
                    &self.contiguous(&a),
                    a.shape[0],
                    *h,
                    *w,
                    *k,
                ))
            }
            Op::Broadcast { to, new_axis } => {
                let a = arg!(0).clone();
                let a = self.contiguous(&a);
                let mut out = self.alloc(numel);
                match new_axis {
                    None => out.iter_mut().for_each(|o| *o = a[0]),
                    // [C] repeated as every row of [R, C]
                    Some(0) => {
                        let c = to[1];
                        map_into(&mut out, |k| a[k % c]);
                    }
                    // [R] repeated as every column of [R, C]
                    Some(_) => {
                        let c = to[1];
                        map_into(&mut out, |k| a[k / c]);
                    }
                }
                value(out)
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_transpose<T: Real>(rows: usize, cols: usize) {
        let src: Vec<T> = (0..rows * cols).map(|i| T::of_f64(i as f64)).collect();
        // The path this CPU takes, and the tiled one it falls back to without AVX-512.
        for (path, transpose) in [
            (
                "chosen",
                transpose_into::<T> as fn(&[T], usize, usize, &mut [T]),
            ),
            ("tiles", transpose_tiles::<T>),
        ] {
            let mut out = vec![T::zero(); rows * cols];
            transpose(&src, rows, cols, &mut out);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        out[c * rows + r],
                        src[r * cols + c],
                        "{path}: {rows}×{cols} at ({r}, {c})"
                    );
                }
            }
        }
    }

    /// Shapes with whole 4 × 4 blocks and tiles, and with every kind of remainder.
    #[test]
    fn transpose_matches_the_definition() {
        for (rows, cols) in [
            (1, 1),
            (3, 5),
            (4, 4),
            (33, 35),
            (64, 7),
            (100, 784),
            (67, 129),
            (16, 16),
            (32, 48),
            (47, 200),
            (130, 66),
            (784, 784),
        ] {
            check_transpose::<f32>(rows, cols);
            check_transpose::<f64>(rows, cols);
        }
    }
}
