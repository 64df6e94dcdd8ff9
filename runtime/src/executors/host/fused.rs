//! One fused elementwise kernel on the host: a group of the fusion plan
//! ([`snfc_compiler::fuse`]) evaluated in one pass over its iteration space, a row chunk at a
//! time, with reductions accumulated on the fly. Intermediate values live in small per-thread
//! registers (a chunk of a row each) instead of full buffers.

use super::linalg::Real;
use crate::executors::elementwise::{host_unary, host_unary_slice};
use rayon::prelude::*;
use snfc_compiler::ir::Op;
use snfc_compiler::plan::{FusedKernel, Src};

const CHUNK: usize = 256;

/// Elements per chunk when rows are shorter than [`CHUNK`]: whole rows are taken together, so
/// that a batch of 100 columns is not evaluated 100 elements at a time (the per-op dispatch of
/// each chunk was a large part of a small group's time).
const ROWS_CHUNK: usize = 512;

/// External operand, contiguous in the logical layout.
pub struct Ext<'a, T> {
    pub data: &'a [T],
}

struct SendPtr<T>(*mut T);
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

impl<T> SendPtr<T> {
    /// The pointer (a method, so closures capture the whole `Sync` wrapper).
    fn get(&self) -> *mut T {
        self.0
    }
}

/// Run the group; `out` holds one zeroed buffer per entry of `k.outputs`.
pub fn run<T: Real>(k: &FusedKernel, ext: &[Ext<T>], out: &mut [Vec<T>]) {
    Runner(k).run(ext, out)
}

struct Runner<'k>(&'k FusedKernel);

impl std::ops::Deref for Runner<'_> {
    type Target = FusedKernel;
    fn deref(&self) -> &FusedKernel {
        self.0
    }
}

impl Runner<'_> {
    fn run<T: Real>(&self, ext: &[Ext<T>], out: &mut [Vec<T>]) {
        let (rows, cols) = (self.rows, self.cols);
        // Reductions over rows (axis 0) and over everything accumulate per task, then combine.
        let reduce_all: Vec<usize> = self.outputs_where(|op| {
            matches!(
                op,
                Op::Sum {
                    axis: None | Some(0)
                }
            )
        });
        let ptrs: Vec<SendPtr<T>> = out.iter_mut().map(|b| SendPtr(b.as_mut_ptr())).collect();
        let work = rows * cols;
        let tasks = if work >= 1 << 15 {
            rows.min(rayon::current_num_threads() * 4)
        } else {
            1
        };
        let per = rows.div_ceil(tasks.max(1)).max(1);
        let partials: Vec<Vec<Vec<T>>> = (0..rows.div_ceil(per))
            .into_par_iter()
            .map(|t| {
                let r0 = t * per;
                let r1 = (r0 + per).min(rows);
                // Rows evaluated together: one when a row fills a chunk.
                let together = if cols < CHUNK {
                    (ROWS_CHUNK / cols.max(1)).max(1)
                } else {
                    1
                };
                let width = CHUNK.min(cols);
                let mut regs: Vec<Vec<T>> =
                    vec![vec![T::zero(); width * together]; self.members.len()];
                let mut acc: Vec<Vec<T>> = reduce_all
                    .iter()
                    .map(|&o| vec![T::zero(); self.out_len(o)])
                    .collect();
                let mut r = r0;
                while r < r1 {
                    // Rows r..r + n, whole when taken together.
                    let n = together.min(r1 - r);
                    let mut c0 = 0;
                    while c0 < cols {
                        let w = CHUNK.min(cols - c0);
                        let at = Span { r, n, c0, w };
                        self.chunk(ext, &mut regs, at);
                        for (oi, (m, _)) in self.outputs.iter().enumerate() {
                            let reg = &regs[*m][..n * w];
                            match self.members[*m].op {
                                Op::Sum { axis: None } => {
                                    let k = reduce_all.iter().position(|x| *x == oi).unwrap_or(0);
                                    acc[k][0] += reg.iter().copied().sum::<T>();
                                }
                                Op::Sum { axis: Some(0) } => {
                                    let k = reduce_all.iter().position(|x| *x == oi).unwrap_or(0);
                                    for row in reg.chunks_exact(w) {
                                        for (a, v) in acc[k][c0..c0 + w].iter_mut().zip(row) {
                                            *a += *v;
                                        }
                                    }
                                }
                                Op::Sum { axis: Some(_) } => {
                                    // Row sums: this task owns rows r..r + n.
                                    for (i, row) in reg.chunks_exact(w).enumerate() {
                                        let s: T = row.iter().copied().sum();
                                        unsafe { *ptrs[oi].get().add(r + i) += s };
                                    }
                                }
                                _ => {
                                    // One contiguous run: n whole rows, or part of one row.
                                    let dst = unsafe {
                                        std::slice::from_raw_parts_mut(
                                            ptrs[oi].get().add(r * cols + c0),
                                            n * w,
                                        )
                                    };
                                    dst.copy_from_slice(reg);
                                }
                            }
                        }
                        c0 += w;
                    }
                    r += n;
                }
                acc
            })
            .collect();
        for part in partials {
            for (k, &oi) in reduce_all.iter().enumerate() {
                for (o, v) in out[oi].iter_mut().zip(&part[k]) {
                    *o += *v;
                }
            }
        }
    }

    fn outputs_where(&self, pred: impl Fn(&Op) -> bool) -> Vec<usize> {
        self.outputs
            .iter()
            .enumerate()
            .filter(|(_, (m, _))| pred(&self.members[*m].op))
            .map(|(i, _)| i)
            .collect()
    }

    fn out_len(&self, oi: usize) -> usize {
        self.outputs[oi].1.iter().product::<usize>().max(1)
    }

    /// Evaluate every member on rows `at.r..at.r + at.n`, columns `at.c0..at.c0 + at.w`
    /// (several rows only when they are whole: `c0 = 0`, `w = cols`).
    fn chunk<T: Real>(&self, ext: &[Ext<T>], regs: &mut [Vec<T>], at: Span) {
        let (rows, cols) = (self.rows, self.cols);
        let Span { r, n, c0, w } = at;
        let len = n * w;
        for (i, m) in self.members.iter().enumerate() {
            let (done, rest) = regs.split_at_mut(i);
            let dst = &mut rest[0][..len];
            // An operand as a chunk slice or a scalar.
            let read = |s: Src| -> Operand<'_, T> {
                match s {
                    Src::Reg(k) => Operand::Slice(&done[k][..len]),
                    Src::Ext(k) => {
                        let d = ext[k].data;
                        if d.len() == 1 {
                            Operand::Scalar(d[0])
                        } else {
                            Operand::Slice(&d[r * cols + c0..r * cols + c0 + len])
                        }
                    }
                }
            };
            match &m.op {
                Op::Add | Op::Sub | Op::Mul => {
                    let (a, b) = (read(m.args[0]), read(m.args[1]));
                    match m.op {
                        Op::Add => zip(dst, a, b, |x, y| x + y),
                        Op::Sub => zip(dst, a, b, |x, y| x - y),
                        _ => zip(dst, a, b, |x, y| x * y),
                    }
                }
                Op::Neg => map(dst, read(m.args[0]), |x| -x),
                Op::StopGrad => map(dst, read(m.args[0]), |x| x),
                Op::Unary(u) => match read(m.args[0]) {
                    Operand::Slice(src) => host_unary_slice(*u, src, dst),
                    Operand::Scalar(x) => dst.fill(host_unary(*u, x)),
                },
                Op::Broadcast { new_axis, .. } => {
                    let Src::Ext(k) = m.args[0] else {
                        unreachable!("a broadcast reads a value from outside its group")
                    };
                    let v = ext[k].data;
                    match new_axis {
                        None => dst.fill(v[0]),
                        // [C] repeated along rows: element (r, c) is v[c].
                        Some(0) => dst
                            .chunks_exact_mut(w)
                            .for_each(|row| row.copy_from_slice(&v[c0..c0 + w])),
                        // [R] repeated along columns: element (r, c) is v[r].
                        Some(_) => dst
                            .chunks_exact_mut(w)
                            .enumerate()
                            .for_each(|(i, row)| row.fill(v[(r + i).min(rows - 1)])),
                    }
                }
                // The reduction itself happens in `run`; its register holds the summands.
                Op::Sum { .. } => map(dst, read(m.args[0]), |x| x),
                other => unreachable!("{other} is not fusable"),
            }
        }
    }
}

/// Where a chunk lies: `n` rows from `r`, columns `c0..c0 + w` of each.
#[derive(Clone, Copy)]
struct Span {
    r: usize,
    n: usize,
    c0: usize,
    w: usize,
}

enum Operand<'a, T> {
    Slice(&'a [T]),
    Scalar(T),
}

fn map<T: Real>(dst: &mut [T], a: Operand<T>, f: impl Fn(T) -> T) {
    match a {
        Operand::Slice(s) => dst.iter_mut().zip(s).for_each(|(d, x)| *d = f(*x)),
        Operand::Scalar(x) => dst.fill(f(x)),
    }
}

fn zip<T: Real>(dst: &mut [T], a: Operand<T>, b: Operand<T>, f: impl Fn(T, T) -> T) {
    match (a, b) {
        (Operand::Slice(a), Operand::Slice(b)) => {
            for ((d, x), y) in dst.iter_mut().zip(a).zip(b) {
                *d = f(*x, *y);
            }
        }
        (Operand::Slice(a), Operand::Scalar(y)) => {
            dst.iter_mut().zip(a).for_each(|(d, x)| *d = f(*x, y))
        }
        (Operand::Scalar(x), Operand::Slice(b)) => {
            dst.iter_mut().zip(b).for_each(|(d, y)| *d = f(x, *y))
        }
        (Operand::Scalar(x), Operand::Scalar(y)) => dst.fill(f(x, y)),
    }
}
