//! The CubeCL kernels every GPU backend runs: a GEMM with transposed operands and a fused
//! `alpha·a·b + beta·c` epilogue, one generic fused elementwise kernel specialized at JIT time by
//! a `comptime` op list (each fusion group of the plan becomes one kernel), a partial-sum
//! finisher for whole-tensor reductions and the Adam update.

use crate::executors::elementwise::gpu_unary;
use cubecl::prelude::*;
use snfc_compiler::ir::Unary;

/// How a fused kernel reads one of its inputs at element `(r, c)` of its iteration space.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Access {
    /// `x[r·cols + c]`
    Elem,
    /// The buffer holds the transpose: `x[c·rows + r]`.
    ElemT,
    /// `x[0]`
    Scalar,
    /// A vector repeated along rows: `x[c]`.
    Row,
    /// A vector repeated along columns: `x[r]`.
    Col,
}

/// One register of a fused kernel; operands name earlier registers.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum KOp {
    Load(usize, Access),
    /// An f32 constant, as bits (the op list is hashed into the kernel cache key).
    Const(u32),
    Add(usize, usize),
    Sub(usize, usize),
    Mul(usize, usize),
    Neg(usize),
    /// An elementwise function (its formula: `executors/elementwise.rs`).
    Unary(usize, Unary),
}

/// What a fused kernel does with an output register.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Store {
    /// One value per element.
    Elem,
    /// Sum over each line the unit walks (per column in `Columns` mode, per row in `Rows`).
    LineSum,
}

/// How the units of a fused kernel cover `[rows, cols]`.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Mode {
    /// One unit per element.
    Elements,
    /// One unit per column, walking its rows (sums over axis 0).
    Columns,
    /// One unit per row, walking its columns (sums over axis 1).
    Rows,
}

/// A fusion group as a kernel specialization.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct FusedProgram {
    pub mode: Mode,
    pub rows: usize,
    pub cols: usize,
    pub ops: Vec<KOp>,
    /// Register and store kind of each output array, in order.
    pub outputs: Vec<(usize, Store)>,
}

#[cube]
fn load<F: Float>(
    x: &Array<F>,
    r: usize,
    c: usize,
    #[comptime] access: Access,
    #[comptime] rows: usize,
    #[comptime] cols: usize,
) -> F {
    match comptime![access] {
        Access::Elem => x[r * cols + c],
        Access::ElemT => x[c * rows + r],
        Access::Scalar => x[0],
        Access::Row => x[c],
        Access::Col => x[r],
    }
}

/// Every register of `p` at element `(r, c)`.
#[cube]
fn eval<F: Float>(
    inputs: &Sequence<Array<F>>,
    r: usize,
    c: usize,
    #[comptime] p: FusedProgram,
) -> Sequence<F> {
    let mut regs = Sequence::<F>::new();
    #[unroll]
    for i in 0..p.ops.len() {
        let op = comptime![p.ops[i]];
        let v = match op {
            KOp::Load(k, access) => load::<F>(inputs.index(k), r, c, access, p.rows, p.cols),
            KOp::Const(bits) => F::new(comptime![f32::from_bits(bits)]),
            KOp::Add(a, b) => *regs.index(a) + *regs.index(b),
            KOp::Sub(a, b) => *regs.index(a) - *regs.index(b),
            KOp::Mul(a, b) => *regs.index(a) * *regs.index(b),
            KOp::Neg(a) => F::new(0.0) - *regs.index(a),
            KOp::Unary(a, u) => gpu_unary::<F>(*regs.index(a), u),
        };
        regs.push(v);
    }
    regs
}

/// One fusion group: elementwise members, broadcasts of its inputs and sums ending it.
/// (The entry points are f32, not generic, so their source can be generated without a device.)
#[cube(launch)]
pub fn fused(
    inputs: &Sequence<Array<f32>>,
    outputs: &mut Sequence<Array<f32>>,
    #[comptime] p: FusedProgram,
) {
    fused_body::<f32>(inputs, outputs, p);
}

#[cube]
fn fused_body<F: Float>(
    inputs: &Sequence<Array<F>>,
    outputs: &mut Sequence<Array<F>>,
    #[comptime] p: FusedProgram,
) {
    let t = ABSOLUTE_POS;
    let rows = comptime![p.rows];
    let cols = comptime![p.cols];
    let n_out = comptime![p.outputs.len()];
    match comptime![p.mode] {
        Mode::Elements => {
            if t < rows * cols {
                let regs = eval::<F>(inputs, t / cols, t % cols, p.clone());
                #[unroll]
                for k in 0..n_out {
                    let reg = comptime![p.outputs[k].0];
                    let out = outputs.index_mut(k);
                    out[t] = *regs.index(reg);
                }
            }
        }
        // One unit per line — a column (sums over rows) or a row (sums over columns) —
        // walking it and accumulating the line sums in place.
        _ => {
            let columns = comptime![p.mode == Mode::Columns];
            let lines = comptime![if columns { cols } else { rows }];
            let length = comptime![if columns { rows } else { cols }];
            if t < lines {
                #[unroll]
                for k in 0..n_out {
                    if comptime![p.outputs[k].1 == Store::LineSum] {
                        let out = outputs.index_mut(k);
                        out[t] = F::new(0.0);
                    }
                }
                for w in 0..length {
                    let (r, c) = if comptime![columns] { (w, t) } else { (t, w) };
                    let regs = eval::<F>(inputs, r, c, p.clone());
                    #[unroll]
                    for k in 0..n_out {
                        let reg = comptime![p.outputs[k].0];
                        let out = outputs.index_mut(k);
                        if comptime![p.outputs[k].1 == Store::LineSum] {
                            out[t] += *regs.index(reg);
                        } else {
                            out[r * cols + c] = *regs.index(reg);
                        }
                    }
                }
            }
        }
    }
}

/// `out[0] = Σ partials` (the second pass of a whole-tensor sum).
#[cube(launch)]
pub fn sum_partials(partials: &Array<f32>, out: &mut Array<f32>, #[comptime] n: usize) {
    if ABSOLUTE_POS == 0 {
        let mut acc = 0.0f32;
        for i in 0..n {
            acc += partials[i];
        }
        out[0] = acc;
    }
}

/// `partials[u] = Σ g[k]²` over the unit's chunk `k ∈ [u·chunk, (u+1)·chunk) ∩ [0, n)`: the
/// first pass of a gradient's squared norm (a NaN or ∞ anywhere makes its partial non-finite).
#[cube(launch)]
pub fn sum_squares_partials(
    g: &Array<f32>,
    partials: &mut Array<f32>,
    #[comptime] n: usize,
    #[comptime] chunk: usize,
) {
    let start = ABSOLUTE_POS * chunk;
    if start < n {
        let mut acc = 0.0f32;
        for j in 0..chunk {
            let k = start + j;
            if k < n {
                let v = g[k];
                acc += v * v;
            }
        }
        partials[ABSOLUTE_POS] = acc;
    }
}

/// A GEMM specialization: logical `A` is `m × k`, `B` is `k × n`; a `*_t` flag means the
/// buffer holds the row-major transpose (a view, no copy was made).
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct GemmConfig {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_t: bool,
    pub b_t: bool,
    /// `out = alpha·a·b + beta·c` (f32 bits) when set; `c_t` as for `a_t`.
    pub epilogue: Option<(u32, u32, bool)>,
    /// Stage A and B slices in shared memory (GPUs); without, every unit reads its operands
    /// straight from memory — faster on CPU adapters (lavapipe), where workgroup barriers are
    /// emulated and caches do the staging.
    pub staged: bool,
    /// An implicit-GEMM convolution: `B` is not stored but gathered from the image (the
    /// im2col matrix, never materialized; with `b_t` its transpose, as a kernel gradient
    /// `dy · im2col(x)ᵀ` reads it); `None` for a plain GEMM.
    pub im2col: Option<Im2col>,
    /// Split the inner dimension into this many slices, one cube layer (`CUBE_POS_Z`) each:
    /// a product with a long inner dimension and few output tiles (a kernel gradient sums
    /// over every pixel of the batch) then still fills the device. With more than one slice
    /// `out` is `[m·n, split_k]` partial sums (no epilogue), finished by a row sum.
    pub split_k: usize,
}

impl GemmConfig {
    /// The inner-dimension slice of each cube layer: a multiple of [`DEPTH`].
    pub fn k_per_split(&self) -> usize {
        self.k.div_ceil(self.split_k.max(1)).div_ceil(DEPTH) * DEPTH
    }
}

/// The image behind an implicit GEMM's `B`: `x` is `[ci, h, w, b]` (batch last) and
/// `B[(i·k + u)·k + v, (y·w + x)·b + bb] = x[i, y + u − k/2, x + v − k/2, bb]`, zero outside
/// the image ("same" zero padding). With the kernel `[co, ci, k, k]` as `A` (`m = co`,
/// `k = ci·k²`, `n = h·w·b`), `A·B` is the convolution `[co, h, w, b]`.
#[derive(Clone, Debug, Default, Hash, PartialEq, Eq)]
pub struct Im2col {
    pub ci: usize,
    pub h: usize,
    pub w: usize,
    pub b: usize,
    pub k: usize,
}

/// One element of the im2col matrix (see [`Im2col`]); `gk < ci·k²` and `gj < h·w·b`.
#[cube]
fn im2col_value<F: Float>(x: &Array<F>, gk: usize, gj: usize, #[comptime] c: Im2col) -> F {
    let (h, w, bs, k) = comptime![(c.h, c.w, c.b, c.k)];
    let p = comptime![c.k / 2];
    let i = gk / (k * k);
    let u = gk / k % k;
    let v = gk % k;
    let bb = gj % bs;
    let xx = gj / bs % w;
    let y = gj / (bs * w);
    let sy = y + u;
    let sx = xx + v;
    let mut value = F::new(0.0);
    if sy >= p && sy < h + p && sx >= p && sx < w + p {
        value = x[((i * h + sy - p) * w + sx - p) * bs + bb];
    }
    value
}

/// Output tile of one cube (`TILE × TILE`), computed by `UNITS × UNITS` units holding
/// `WORK × WORK` accumulators each; `DEPTH` is the slice of the inner dimension staged in
/// shared memory per step.
pub const TILE: usize = 64;
pub const UNITS: usize = 16;
pub const WORK: usize = TILE / UNITS;
pub const DEPTH: usize = 16;

/// `out = A·B` or `alpha·A·B + beta·C`: `TILE × TILE` output tiles, `A` and `B` slices staged
/// through shared memory, `WORK × WORK` register-blocked outputs per unit.
#[cube(launch, launch_unchecked)]
pub fn gemm(
    a: &Array<f32>,
    b: &Array<f32>,
    c: &Array<f32>,
    out: &mut Array<f32>,
    #[comptime] g: GemmConfig,
) {
    gemm_body::<f32>(a, b, c, out, g);
}

#[cube]
fn gemm_body<F: Float>(
    a: &Array<F>,
    b: &Array<F>,
    c: &Array<F>,
    out: &mut Array<F>,
    #[comptime] g: GemmConfig,
) {
    let m = comptime![g.m];
    let n = comptime![g.n];
    let k = comptime![g.k];
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let tid = ty * UNITS + tx;
    let row0 = CUBE_POS_Y as usize * TILE;
    let col0 = CUBE_POS_X as usize * TILE;
    // a_tile[kk·TILE + i] = A[row0 + i, p + kk]; b_tile[kk·TILE + j] = B[p + kk, col0 + j].
    let mut a_tile = SharedMemory::<F>::new(TILE * DEPTH);
    let mut b_tile = SharedMemory::<F>::new(TILE * DEPTH);
    let mut acc = Array::<F>::new(WORK * WORK);
    let mut av = Array::<F>::new(WORK);
    let mut bv = Array::<F>::new(WORK);
    #[unroll]
    for q in 0..WORK * WORK {
        acc[q] = F::new(0.0);
    }
    // This cube layer's slice of the inner dimension.
    let kc = comptime![g.k_per_split()];
    let k_begin = CUBE_POS_Z as usize * kc;
    let mut k_end = k_begin + kc;
    if k_end > k {
        k_end = k;
    }
    if comptime![!g.staged] {
        for p in k_begin..k_end {
            #[unroll]
            for r in 0..WORK {
                let i = row0 + ty + r * UNITS;
                let j = col0 + tx + r * UNITS;
                let mut x = F::new(0.0);
                if i < m {
                    if comptime![g.a_t] {
                        x = a[p * m + i];
                    } else {
                        x = a[i * k + p];
                    }
                }
                av[r] = x;
                let mut y = F::new(0.0);
                if j < n {
                    if comptime![g.im2col.is_some() && g.b_t] {
                        y = im2col_value::<F>(
                            b,
                            j,
                            p,
                            comptime![g.im2col.clone().unwrap_or_default()],
                        );
                    } else if comptime![g.im2col.is_some()] {
                        y = im2col_value::<F>(
                            b,
                            p,
                            j,
                            comptime![g.im2col.clone().unwrap_or_default()],
                        );
                    } else if comptime![g.b_t] {
                        y = b[j * k + p];
                    } else {
                        y = b[p * n + j];
                    }
                }
                bv[r] = y;
            }
            #[unroll]
            for r in 0..WORK {
                #[unroll]
                for q in 0..WORK {
                    acc[r * WORK + q] += av[r] * bv[q];
                }
            }
        }
    }
    let steps = comptime![if g.staged { kc / DEPTH } else { 0 }];
    let loads = comptime![TILE * DEPTH / (UNITS * UNITS)];
    for t in 0..steps {
        let p = k_begin + t * DEPTH;
        #[unroll]
        for s in 0..loads {
            let e = tid + s * UNITS * UNITS;
            // A: consecutive units walk the inner dimension (contiguous when A is plain),
            // or the rows (contiguous when A is stored transposed).
            let (i, kk) = if comptime![g.a_t] {
                (e % TILE, e / TILE)
            } else {
                (e / DEPTH, e % DEPTH)
            };
            let (gi, gk) = (row0 + i, p + kk);
            let mut v = F::new(0.0);
            if gi < m && gk < k_end {
                if comptime![g.a_t] {
                    v = a[gk * m + gi];
                } else {
                    v = a[gi * k + gk];
                }
            }
            a_tile[kk * TILE + i] = v;
            let (kk, j) = if comptime![g.b_t] {
                (e % DEPTH, e / DEPTH)
            } else {
                (e / TILE, e % TILE)
            };
            let (gk, gj) = (p + kk, col0 + j);
            let mut w = F::new(0.0);
            if gk < k_end && gj < n {
                if comptime![g.im2col.is_some() && g.b_t] {
                    w = im2col_value::<F>(
                        b,
                        gj,
                        gk,
                        comptime![g.im2col.clone().unwrap_or_default()],
                    );
                } else if comptime![g.im2col.is_some()] {
                    w = im2col_value::<F>(
                        b,
                        gk,
                        gj,
                        comptime![g.im2col.clone().unwrap_or_default()],
                    );
                } else if comptime![g.b_t] {
                    w = b[gj * k + gk];
                } else {
                    w = b[gk * n + gj];
                }
            }
            b_tile[kk * TILE + j] = w;
        }
        sync_cube();
        #[unroll]
        for kk in 0..DEPTH {
            #[unroll]
            for r in 0..WORK {
                av[r] = a_tile[kk * TILE + ty + r * UNITS];
                bv[r] = b_tile[kk * TILE + tx + r * UNITS];
            }
            #[unroll]
            for r in 0..WORK {
                #[unroll]
                for q in 0..WORK {
                    acc[r * WORK + q] += av[r] * bv[q];
                }
            }
        }
        sync_cube();
    }
    #[unroll]
    for r in 0..WORK {
        #[unroll]
        for q in 0..WORK {
            let i = row0 + ty + r * UNITS;
            let j = col0 + tx + q * UNITS;
            if i < m && j < n {
                let v = acc[r * WORK + q];
                match comptime![g.epilogue] {
                    Some((alpha, beta, c_t)) => {
                        let cv = if comptime![c_t] {
                            c[j * m + i]
                        } else {
                            c[i * n + j]
                        };
                        out[i * n + j] = F::new(comptime![f32::from_bits(alpha)]) * v
                            + F::new(comptime![f32::from_bits(beta)]) * cv;
                    }
                    None => {
                        if comptime![g.split_k > 1] {
                            out[(i * n + j) * comptime![g.split_k] + CUBE_POS_Z as usize] = v;
                        } else {
                            out[i * n + j] = v;
                        }
                    }
                }
            }
        }
    }
}

/// One Adam step on a parameter: `m, v` updated in place, `p -= step · m / (√v · c2s + eps)`.
#[cube(launch)]
pub fn adam(
    param: &mut Array<f32>,
    grad: &Array<f32>,
    m: &mut Array<f32>,
    v: &mut Array<f32>,
    step: f32,
    c2s: f32,
    grad_scale: f32,
    #[comptime] b1: u32,
    #[comptime] b2: u32,
    #[comptime] eps: u32,
    #[comptime] n: usize,
) {
    adam_body::<f32>(param, grad, m, v, step, c2s, grad_scale, b1, b2, eps, n);
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn adam_body<F: Float>(
    param: &mut Array<F>,
    grad: &Array<F>,
    m: &mut Array<F>,
    v: &mut Array<F>,
    step: F,
    c2s: F,
    grad_scale: F,
    #[comptime] b1: u32,
    #[comptime] b2: u32,
    #[comptime] eps: u32,
    #[comptime] n: usize,
) {
    let i = ABSOLUTE_POS;
    if i < n {
        let b1 = F::new(comptime![f32::from_bits(b1)]);
        let b2 = F::new(comptime![f32::from_bits(b2)]);
        let g = grad[i] * grad_scale;
        let mi = b1 * m[i] + (F::new(1.0) - b1) * g;
        let vi = b2 * v[i] + (F::new(1.0) - b2) * g * g;
        m[i] = mi;
        v[i] = vi;
        param[i] -= step * mi / (F::sqrt(vi) * c2s + F::new(comptime![f32::from_bits(eps)]));
    }
}
