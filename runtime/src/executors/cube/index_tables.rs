//! Index tables of the ops that only move, repeat, sum or scale elements, for the one
//! [`gather`](super::tensor_kernels::gather) kernel: output `o` is
//! `Σ_{j ∈ ptr[o]..ptr[o+1]} input[idx[j]] · weight[j]`. Built once per plan on the host, from
//! the shapes alone, and uploaded with the plan.

use crate::executors::conv_taps::{multiplicity, taps};
use snfc_compiler::ir::Op;

/// A compressed-row table: the input elements (and weights) each output sums.
#[derive(Debug, Clone, PartialEq)]
pub struct IndexTable {
    pub ptr: Vec<u32>,
    pub idx: Vec<u32>,
    pub weight: Option<Vec<f32>>,
}

impl IndexTable {
    pub fn outputs(&self) -> usize {
        self.ptr.len() - 1
    }

    /// Long sums in two passes, so that no unit walks more than `chunk` entries (a GPU has
    /// thousands of units; one per output of a bias gradient would leave it idle): the first
    /// table sums chunks of each output's entries into a scratch array, the second sums each
    /// output's chunks. `None` when no output has more than `chunk` entries.
    pub fn split(&self, chunk: usize) -> Option<(IndexTable, IndexTable)> {
        let longest = (0..self.outputs())
            .map(|o| (self.ptr[o + 1] - self.ptr[o]) as usize)
            .max()
            .unwrap_or(0);
        if longest <= chunk {
            return None;
        }
        let mut first = IndexTable {
            ptr: vec![0],
            idx: self.idx.clone(),
            weight: self.weight.clone(),
        };
        let mut second = IndexTable {
            ptr: vec![0],
            idx: Vec::new(),
            weight: None,
        };
        for o in 0..self.outputs() {
            let (start, end) = (self.ptr[o] as usize, self.ptr[o + 1] as usize);
            let mut at = start;
            while at < end {
                at = (at + chunk).min(end);
                second.idx.push((first.ptr.len() - 1) as u32);
                first.ptr.push(at as u32);
            }
            second.ptr.push(second.idx.len() as u32);
        }
        Some((first, second))
    }

    /// One input element per output (a permutation or a repetition).
    fn gather(src: Vec<usize>) -> IndexTable {
        IndexTable {
            ptr: (0..=src.len() as u32).collect(),
            idx: src.into_iter().map(|i| i as u32).collect(),
            weight: None,
        }
    }

    /// `(output, input)` pairs, any order, grouped by output (outputs without a pair are 0).
    fn from_pairs(outputs: usize, pairs: &[(usize, usize)]) -> IndexTable {
        let mut ptr = vec![0u32; outputs + 1];
        for &(o, _) in pairs {
            ptr[o + 1] += 1;
        }
        for o in 0..outputs {
            ptr[o + 1] += ptr[o];
        }
        let mut fill: Vec<u32> = ptr[..outputs].to_vec();
        let mut idx = vec![0u32; pairs.len()];
        for &(o, i) in pairs {
            idx[fill[o] as usize] = i as u32;
            fill[o] += 1;
        }
        IndexTable {
            ptr,
            idx,
            weight: None,
        }
    }
}

/// Row-major strides of `shape`.
fn strides(shape: &[usize]) -> Vec<usize> {
    let mut s = vec![1; shape.len()];
    for i in (0..shape.len().saturating_sub(1)).rev() {
        s[i] = s[i + 1] * shape[i + 1];
    }
    s
}

/// Coordinates of flat index `k` in `shape`.
fn coords(mut k: usize, shape: &[usize]) -> Vec<usize> {
    let mut c = vec![0; shape.len()];
    for a in (0..shape.len()).rev() {
        c[a] = k % shape[a];
        k /= shape[a];
    }
    c
}

/// Every `(matrix index, kernel index)` of the Toeplitz matrix of a `C → C`, K × K conv on
/// `H × W` maps (flattened (c, h, w); matrix `[n, n]` row-major; kernel `[C, C, K, K]`), from
/// the host's tap walk.
fn toeplitz_entries(c: usize, h: usize, w: usize, kk: usize) -> Vec<(usize, usize)> {
    let n = c * h * w;
    let mut out = Vec::new();
    for o in 0..c {
        for y in 0..h {
            for x in 0..w {
                let row = (o * h + y) * w + x;
                taps(c, h, w, kk, y, x, |col, tap| {
                    out.push((row * n + col, o * c * kk * kk + tap))
                });
            }
        }
    }
    out
}

/// Whether `op` runs as a gather through an [`IndexTable`].
pub fn is_index_op(op: &Op) -> bool {
    matches!(
        op,
        Op::Permute { .. }
            | Op::Take { .. }
            | Op::Embed { .. }
            | Op::Expand { .. }
            | Op::ReduceSum { .. }
            | Op::FlipKernel
            | Op::Toeplitz { .. }
            | Op::ToeplitzAdjoint { .. }
            | Op::Multiplicity { .. }
    )
}

/// The table of an index op with operand shape `input` (None for any other op).
pub fn table(op: &Op, input: &[usize]) -> Option<IndexTable> {
    let numel = |s: &[usize]| s.iter().product::<usize>();
    Some(match op {
        Op::Permute { perm } => {
            let out_shape: Vec<usize> = perm.iter().map(|&p| input[p]).collect();
            let st = strides(input);
            IndexTable::gather(
                (0..numel(input))
                    .map(|k| {
                        let c = coords(k, &out_shape);
                        (0..perm.len()).map(|a| c[a] * st[perm[a]]).sum()
                    })
                    .collect(),
            )
        }
        Op::Take { axis, index } => {
            let (outer, n, inner) = (
                input[..*axis].iter().product::<usize>(),
                input[*axis],
                input[axis + 1..].iter().product::<usize>(),
            );
            IndexTable::gather(
                (0..outer * inner)
                    .map(|k| (k / inner * n + index) * inner + k % inner)
                    .collect(),
            )
        }
        Op::Embed { axis, index, size } => {
            let outer: usize = input[..*axis].iter().product();
            let inner: usize = input[*axis..].iter().product();
            let pairs: Vec<(usize, usize)> = (0..outer * inner)
                .map(|k| ((k / inner * size + index) * inner + k % inner, k))
                .collect();
            IndexTable::from_pairs(outer * size * inner, &pairs)
        }
        Op::Expand { to, axes } => {
            let kept: Vec<usize> = (0..to.len()).filter(|a| !axes.contains(a)).collect();
            IndexTable::gather(
                (0..numel(to))
                    .map(|k| {
                        let c = coords(k, to);
                        kept.iter().fold(0, |src, &a| src * to[a] + c[a])
                    })
                    .collect(),
            )
        }
        Op::ReduceSum { axes } => {
            let kept: Vec<usize> = (0..input.len()).filter(|a| !axes.contains(a)).collect();
            let outputs = kept.iter().map(|&a| input[a]).product::<usize>();
            let pairs: Vec<(usize, usize)> = (0..numel(input))
                .map(|k| {
                    let c = coords(k, input);
                    (kept.iter().fold(0, |dst, &a| dst * input[a] + c[a]), k)
                })
                .collect();
            IndexTable::from_pairs(outputs, &pairs)
        }
        Op::FlipKernel => {
            let (o, i, kk) = (input[0], input[1], input[2]);
            let mut src = vec![0; numel(input)];
            for a in 0..o {
                for b in 0..i {
                    for u in 0..kk {
                        for v in 0..kk {
                            src[((b * o + a) * kk + (kk - 1 - u)) * kk + (kk - 1 - v)] =
                                ((a * i + b) * kk + u) * kk + v;
                        }
                    }
                }
            }
            IndexTable::gather(src)
        }
        Op::Toeplitz { h, w } => {
            let (c, kk) = (input[0], input[2]);
            let n = c * h * w;
            IndexTable::from_pairs(n * n, &toeplitz_entries(c, *h, *w, kk))
        }
        Op::ToeplitzAdjoint { h, w, k } => {
            let c = input[0] / (h * w);
            let pairs: Vec<(usize, usize)> = toeplitz_entries(c, *h, *w, *k)
                .into_iter()
                .map(|(m, kern)| (kern, m))
                .collect();
            IndexTable::from_pairs(c * c * k * k, &pairs)
        }
        Op::Multiplicity { h, w } => {
            let kk = input[2];
            let m = multiplicity(*h, *w, kk);
            let n = numel(input);
            let mut t = IndexTable::gather((0..n).collect());
            t.weight = Some((0..n).map(|e| m[e % (kk * kk)] as f32).collect());
            t
        }
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::shape_ops;

    /// Apply a table on the host.
    fn apply(t: &IndexTable, x: &[f64]) -> Vec<f64> {
        (0..t.outputs())
            .map(|o| {
                (t.ptr[o] as usize..t.ptr[o + 1] as usize)
                    .map(|j| x[t.idx[j] as usize] * t.weight.as_ref().map_or(1.0, |w| w[j] as f64))
                    .sum()
            })
            .collect()
    }

    fn ramp(n: usize) -> Vec<f64> {
        (0..n).map(|i| ((i as f64 + 0.3) * 0.917).sin()).collect()
    }

    #[test]
    fn split_sums_equal_the_one_pass_sums() {
        let shape = [3, 50, 7];
        let x = ramp(3 * 50 * 7);
        for axes in [vec![1, 2], vec![0, 1, 2], vec![1]] {
            let t = table(&Op::ReduceSum { axes: axes.clone() }, &shape).unwrap();
            let want = apply(&t, &x);
            let (first, second) = t.split(16).expect("rows longer than 16");
            assert!((0..first.outputs()).all(|o| first.ptr[o + 1] - first.ptr[o] <= 16));
            let got = apply(&second, &apply(&first, &x));
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "{axes:?}");
            }
        }
        let t = table(&Op::ReduceSum { axes: vec![0] }, &shape).unwrap();
        assert!(t.split(16).is_none(), "rows of 3 need no split");
    }

    #[test]
    fn tables_agree_with_the_host_ops() {
        let x = ramp(3 * 4 * 2 * 5);
        let shape = [3, 4, 2, 5];
        let perm = vec![2, 0, 3, 1];
        let t = table(&Op::Permute { perm: perm.clone() }, &shape).unwrap();
        assert_eq!(apply(&t, &x), shape_ops::permute(&x, &shape, &perm));
        for axis in 0..4 {
            let index = shape[axis] - 1;
            let t = table(&Op::Take { axis, index }, &shape).unwrap();
            let taken = shape_ops::take(&x, &shape, axis, index);
            assert_eq!(apply(&t, &x), taken);
            let mut rest = shape.to_vec();
            rest.remove(axis);
            let size = shape[axis];
            let t = table(&Op::Embed { axis, index, size }, &rest).unwrap();
            let back = shape_ops::embed(&taken, &rest, axis, index, size);
            assert_eq!(apply(&t, &taken), back);
            // Embedding what was taken restores those elements and zeros the rest.
            let mut want = vec![0.0; x.len()];
            let (outer, inner) = (
                shape[..axis].iter().product::<usize>(),
                shape[axis + 1..].iter().product::<usize>(),
            );
            for o in 0..outer {
                for j in 0..inner {
                    let k = (o * size + index) * inner + j;
                    want[k] = x[k];
                }
            }
            assert_eq!(back, want);
        }
        for axes in [vec![0], vec![1, 3], vec![0, 1, 2, 3], vec![]] {
            let t = table(&Op::ReduceSum { axes: axes.clone() }, &shape).unwrap();
            let want = shape_ops::reduce_sum(&x, &shape, &axes);
            let got = apply(&t, &x);
            assert_eq!(got.len(), want.len());
            for (a, b) in got.iter().zip(&want) {
                assert!((a - b).abs() < 1e-12, "reduce_sum {axes:?}");
            }
        }
        let small = ramp(4 * 5);
        let to = vec![4, 3, 5, 2];
        let axes = vec![1, 3];
        let t = table(
            &Op::Expand {
                to: to.clone(),
                axes: axes.clone(),
            },
            &[4, 5],
        )
        .unwrap();
        assert_eq!(apply(&t, &small), shape_ops::expand(&small, &to, &axes));
        let kshape = [2, 3, 3, 3];
        let k = ramp(2 * 3 * 9);
        let t = table(&Op::FlipKernel, &kshape).unwrap();
        assert_eq!(apply(&t, &k), shape_ops::flip_kernel(&k, &kshape));
        let (h, w) = (4, 3);
        let ck = ramp(2 * 2 * 9);
        let cshape = [2, 2, 3, 3];
        let t = table(&Op::Toeplitz { h, w }, &cshape).unwrap();
        let dense = shape_ops::toeplitz(&ck, &cshape, h, w);
        assert_eq!(apply(&t, &ck), dense);
        let n = 2 * h * w;
        let g = ramp(n * n);
        let t = table(&Op::ToeplitzAdjoint { h, w, k: 3 }, &[n, n]).unwrap();
        let want = shape_ops::toeplitz_adjoint(&g, n, h, w, 3);
        for (a, b) in apply(&t, &g).iter().zip(&want) {
            assert!((a - b).abs() < 1e-12);
        }
        let t = table(&Op::Multiplicity { h, w }, &cshape).unwrap();
        assert_eq!(apply(&t, &ck), shape_ops::mul_multiplicity(&ck, 3, h, w));
    }
}
