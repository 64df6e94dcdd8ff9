//! The hand-written CubeCL kernels every GPU backend runs, where cubek has no counterpart: one
//! generic fused elementwise kernel specialized at JIT time by a `comptime` op list (each
//! fusion group of the plan becomes one kernel; cubek has no elementwise fusion), the im2col
//! gather feeding convolutions to cubek-matmul, the gradients' sums of squares and the Adam
//! update. (Matrix products: `matmul.rs`; sums, per line or of a whole tensor: cubek-reduce,
//! in `mod.rs`.)

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

/// A fusion group as a kernel specialization.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct FusedProgram {
    pub rows: usize,
    pub cols: usize,
    pub ops: Vec<KOp>,
    /// The register of each output array, in order (one value per element: sums that end a
    /// group are cubek-reduce launches of their own).
    pub outputs: Vec<usize>,
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

/// One fusion group: elementwise members and broadcasts of its inputs, one unit per element.
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
    if t < rows * cols {
        let regs = eval::<F>(inputs, t / cols, t % cols, p.clone());
        #[unroll]
        for k in 0..n_out {
            let reg = comptime![p.outputs[k]];
            let out = outputs.index_mut(k);
            out[t] = *regs.index(reg);
        }
    }
}

/// Tensors handled by one launch, one cube row (`CUBE_POS_Y`) each: their lengths, and
/// where each tensor's results start in a shared output.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct Segments {
    pub sizes: Vec<usize>,
    pub offsets: Vec<usize>,
}

impl Segments {
    /// `per(n)` output slots for a tensor of `n` values, packed in order.
    pub fn new(sizes: Vec<usize>, per: impl Fn(usize) -> usize) -> Segments {
        let mut offsets = Vec::with_capacity(sizes.len());
        let mut at = 0;
        for &n in &sizes {
            offsets.push(at);
            at += per(n);
        }
        offsets.push(at);
        Segments { sizes, offsets }
    }

    /// Output slots in all.
    pub fn total(&self) -> usize {
        self.offsets.last().copied().unwrap_or(0)
    }

    /// Cubes of 256 units along x that cover the longest segment of `per(n)` units.
    pub fn grid(&self, per: impl Fn(usize) -> usize) -> (CubeCount, CubeDim) {
        let units = self.sizes.iter().map(|&n| per(n)).max().unwrap_or(0).max(1);
        let rows = self.sizes.len().max(1) as u32;
        (
            CubeCount::Static((units as u32).div_ceil(256), rows, 1),
            CubeDim::new_1d(256),
        )
    }
}

/// `partials[offsets[j] + u] = Σ g_j[k]²` over chunk `u` of gradient `j`, `k ∈ [u·chunk,
/// (u+1)·chunk) ∩ [0, n_j)`: every gradient's squared norm in partial sums, in one launch (a
/// NaN or ∞ anywhere makes its partial non-finite). The square is fused into the sum, which
/// cubek-reduce cannot do, and the partials are read back with the step's scalars.
#[cube(launch)]
pub fn sum_squares_partials(
    grads: &Sequence<Array<f32>>,
    partials: &mut Array<f32>,
    #[comptime] seg: Segments,
    #[comptime] chunk: usize,
) {
    let u = CUBE_POS_X as usize * 256 + UNIT_POS_X as usize;
    let row = CUBE_POS_Y as usize;
    #[unroll]
    for j in 0..seg.sizes.len() {
        let n = comptime![seg.sizes[j]];
        let offset = comptime![seg.offsets[j]];
        if row == j && u * chunk < n {
            let g = grads.index(j);
            let start = u * chunk;
            let mut acc = 0.0f32;
            for c in 0..chunk {
                let k = start + c;
                if k < n {
                    let v = g[k];
                    acc += v * v;
                }
            }
            partials[offset + u] = acc;
        }
    }
}

/// The im2col matrix of a convolution's image: `x` is `[ci, h, w, b]` (batch last) and
/// `B[(i·k + u)·k + v, (y·w + x)·b + bb] = x[i, y + u − k/2, x + v − k/2, bb]`, zero outside
/// the image ("same" zero padding). With the kernel `[co, ci, k, k]` as `A` (`co × ci·k²`),
/// `A·B` is the convolution `[co, h, w, b]`.
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

impl Im2col {
    /// Rows of the matrix: `ci·k²`.
    pub fn rows(&self) -> usize {
        self.ci * self.k * self.k
    }
    /// Columns of the matrix: every pixel of the batch, `h·w·b`.
    pub fn positions(&self) -> usize {
        self.h * self.w * self.b
    }
}

/// The im2col matrix stored row-major, one unit per element. cubek has convolutions on
/// tensor cores only (none on plain units, so none on lavapipe or WGSL devices) and in
/// channels-last layout; an explicit im2col feeding cubek-matmul runs on every device.
#[cube(launch)]
pub fn im2col_matrix(x: &Array<f32>, out: &mut Array<f32>, #[comptime] c: Im2col) {
    let n = comptime![c.h * c.w * c.b];
    let t = ABSOLUTE_POS;
    if t < comptime![c.ci * c.k * c.k * n] {
        out[t] = im2col_value::<f32>(x, t / n, t % n, c);
    }
}

/// One Adam step of every parameter in one launch, cube row `j` updating parameter `j`
/// (`params`, `grads`, `m`, `v` in the same order): `step` is the learning rate over Adam's
/// first bias correction, `step_inverse` the same for learned inverses (`inverse[j]`), `c2s`
/// 1/√(second bias correction); the gradients are scaled by `grad_scale` first (clipping).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn adam(
    params: &mut Sequence<Array<f32>>,
    grads: &Sequence<Array<f32>>,
    m: &mut Sequence<Array<f32>>,
    v: &mut Sequence<Array<f32>>,
    step: f32,
    step_inverse: f32,
    c2s: f32,
    grad_scale: f32,
    #[comptime] c: AdamConfig,
) {
    let i = CUBE_POS_X as usize * 256 + UNIT_POS_X as usize;
    let row = CUBE_POS_Y as usize;
    #[unroll]
    for j in 0..c.sizes.len() {
        let n = comptime![c.sizes[j]];
        let inverse = comptime![c.inverse[j]];
        if row == j && i < n {
            let lr = if comptime![inverse] {
                step_inverse
            } else {
                step
            };
            adam_element::<f32>(
                params.index_mut(j),
                grads.index(j),
                m.index_mut(j),
                v.index_mut(j),
                i,
                lr,
                c2s,
                grad_scale,
                c.b1,
                c.b2,
                c.eps,
            );
        }
    }
}

/// The parameters of one [`adam`] launch.
#[derive(Clone, Debug, Hash, PartialEq, Eq)]
pub struct AdamConfig {
    /// Each parameter's length.
    pub sizes: Vec<usize>,
    /// Whether each parameter is a learned inverse (its own learning rate).
    pub inverse: Vec<bool>,
    /// β₁, β₂ and ε as f32 bits.
    pub b1: u32,
    pub b2: u32,
    pub eps: u32,
}

#[cube]
#[allow(clippy::too_many_arguments)]
fn adam_element<F: Float>(
    param: &mut Array<F>,
    grad: &Array<F>,
    m: &mut Array<F>,
    v: &mut Array<F>,
    i: usize,
    step: F,
    c2s: F,
    grad_scale: F,
    #[comptime] b1: u32,
    #[comptime] b2: u32,
    #[comptime] eps: u32,
) {
    let b1 = F::new(comptime![f32::from_bits(b1)]);
    let b2 = F::new(comptime![f32::from_bits(b2)]);
    let g = grad[i] * grad_scale;
    let mi = b1 * m[i] + (F::new(1.0) - b1) * g;
    let vi = b2 * v[i] + (F::new(1.0) - b2) * g * g;
    m[i] = mi;
    v[i] = vi;
    param[i] -= step * mi / (F::sqrt(vi) * c2s + F::new(comptime![f32::from_bits(eps)]));
}
