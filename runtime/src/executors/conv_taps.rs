//! Where a K × K convolution's kernel entries sit in its dense (Toeplitz) matrix: the geometry
//! the host's conv kernels and the GPU's index tables share.

/// The taps of output pixel `(y, x)` of a `C → C`, K × K conv on `H × W` maps: for each input
/// channel `i` and kernel offset `(u, v)` that lands inside the map, `f(column of the input
/// pixel in the flat (c, h, w) order, index (i, u, v) within the output channel's kernel)`.
/// The one walk [`toeplitz`] and [`toeplitz_adjoint`] share.
pub fn taps(
    c: usize,
    h: usize,
    w: usize,
    kk: usize,
    y: usize,
    x: usize,
    mut f: impl FnMut(usize, usize),
) {
    let p = kk / 2;
    for i in 0..c {
        for u in 0..kk {
            for v in 0..kk {
                let (sy, sx) = (y + u, x + v);
                if sy < p || sy - p >= h || sx < p || sx - p >= w {
                    continue;
                }
                f((i * h + sy - p) * w + sx - p, (i * kk + u) * kk + v);
            }
        }
    }
}

/// How often each element `(u, v)` of a K × K kernel appears in the Toeplitz matrix of its conv
/// on `H × W` maps (per input/output channel pair): `(H − |u − p|)(W − |v − p|)` (paper A.2).
pub fn multiplicity(h: usize, w: usize, kk: usize) -> Vec<usize> {
    let p = kk / 2;
    let count = |n: usize, u: usize| n.saturating_sub(u.abs_diff(p));
    (0..kk * kk)
        .map(|i| count(h, i / kk) * count(w, i % kk))
        .collect()
}
