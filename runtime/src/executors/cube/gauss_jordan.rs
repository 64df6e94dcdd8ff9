//! Inverses and log-determinants on the device: blocked Gauss–Jordan elimination with partial
//! pivoting, so that an exact-gradient step neither reads its matrices back nor uploads their
//! inverses. cubek 0.2 has no factorization to build on; its matrix product does the bulk.
//!
//! The matrix `A` (n × n, row-major) is copied into scratch with `X = I` beside it: `M = [A | X]`.
//! Panel `k` (columns `k..k+b` of `A`, `b =` [`PANEL`]) is eliminated by one cube
//! ([`gj_panel`]): column by column it picks the row with the largest `|a|` at or below the
//! diagonal, swaps, scales and clears that column from every other row of the panel, and
//! records the row operations as `C` (n × b) and the row order `src`. Applied to all of `M` they
//! are `M' = (P·M) + C·(P·M)[k..k+b, :]`, with `P` the panel's row swaps: the cube also gathers
//! the panel's pivot rows `R = (P·M)[k..k+b, :]`, cubek-matmul computes `T = C·R` in full f32,
//! and [`gj_combine`] writes `M' = (P·M) + T` into the other buffer of a ping-pong pair. After
//! `⌈n/b⌉` panels `A = I` and `X = A⁻¹`; `ln|det A|` is the sum of `ln|pivot|`. That is
//! `1 + 3⌈n/b⌉` launches per matrix, and the bulk of the arithmetic (`2n³`) in products.
//!
//! How `C` is kept: `G = I[:, k..k+b] + C` starts as those identity columns and takes every
//! scaling and elimination the panel takes, while a row swap at column `j` moves only its
//! columns `< j` (the only ones where `C` is not yet zero), so that the composed operations are
//! `I + C·[rows k..k+b]` after the swaps.

use cubecl::prelude::*;

/// Units of the one cube that eliminates a panel.
pub const PANEL_UNITS: usize = 256;
/// Columns per panel (at most [`PANEL_UNITS`]: one unit per column swaps and scales).
pub const PANEL: usize = 32;
/// Units per cube along a row in [`gj_init`] and [`gj_combine`] (one cube row per matrix row).
pub const ROW_UNITS: usize = 256;

/// `a = input`, `x = I` (when `with_x`), `logdet[0] = 0`. Grid: `⌈n/256⌉ × n` cubes of 256.
#[cube(launch)]
pub fn gj_init(
    input: &Array<f32>,
    a: &mut Array<f32>,
    x: &mut Array<f32>,
    logdet: &mut Array<f32>,
    #[comptime] n: usize,
    #[comptime] with_x: bool,
) {
    let i = CUBE_POS_Y as usize;
    let j = CUBE_POS_X as usize * ROW_UNITS + UNIT_POS_X as usize;
    if j < n {
        a[i * n + j] = input[i * n + j];
        if comptime![with_x] {
            x[i * n + j] = select(i == j, f32::new(1.0), f32::new(0.0));
        }
        if i == 0 && j == 0 {
            logdet[0] = f32::new(0.0);
        }
    }
}

/// Panel `k`'s elimination by one cube of [`PANEL_UNITS`] units. Reads columns `k..k+bk` of
/// `a` (`bk = min(b, n − k)`), works in `panel` (n × b), and writes the row operations `c`
/// (n × b, columns from `bk` on zero), the row order `src` (row `i` of `P·M` is row `src[i]`
/// of `M`), the pivot rows `rows` (b × w: row `l < bk` is row `src[k + l]` of `[a | x]`, the
/// rest zero; `w = 2n` with `x`, `n` without) and adds `ln|pivot|` to `logdet[0]`. A pivot is
/// the largest `|a|` at or below the diagonal, the first such row on a tie (as LU with partial
/// pivoting picks); a NaN never wins, so a column of NaNs keeps its row and spreads.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gj_panel(
    a: &Array<f32>,
    x: &Array<f32>,
    panel: &mut Array<f32>,
    c: &mut Array<f32>,
    src: &mut Array<u32>,
    rows: &mut Array<f32>,
    logdet: &mut Array<f32>,
    k: u32,
    bk: u32,
    #[comptime] n: usize,
    #[comptime] with_x: bool,
) {
    let b = comptime![PANEL];
    let u = UNIT_POS_X as usize;
    let (k, bk) = (k as usize, bk as usize);
    let mut e = u;
    while e < n * b {
        let (i, j) = (e / b, e % b);
        // `select` reads both sides: past the last column (j ≥ bk) read an in-bounds one.
        panel[e] = select(j < bk, a[i * n + (k + j) % n], f32::new(0.0));
        c[e] = select(j < bk && i == k + j, f32::new(1.0), f32::new(0.0));
        e += PANEL_UNITS;
    }
    let mut i = u;
    while i < n {
        src[i] = i as u32;
        i += PANEL_UNITS;
    }
    let mut values = SharedMemory::<f32>::new(PANEL_UNITS);
    let mut best_rows = SharedMemory::<u32>::new(PANEL_UNITS);
    let mut pivot_row = SharedMemory::<f32>::new(PANEL);
    let mut pivot_ops = SharedMemory::<f32>::new(PANEL);
    sync_storage();
    let mut j = 0usize;
    while j < bk {
        let r = k + j;
        // Each unit's best row among r + u, r + u + 256, …, then a tree over the units.
        let mut best = f32::new(-1.0);
        let mut row = r;
        let mut i = r + u;
        while i < n {
            let v = f32::abs(panel[i * b + j]);
            if v > best {
                best = v;
                row = i;
            }
            i += PANEL_UNITS;
        }
        values[u] = best;
        best_rows[u] = row as u32;
        sync_cube();
        keep_larger(&mut values, &mut best_rows, u, 128usize);
        keep_larger(&mut values, &mut best_rows, u, 64usize);
        keep_larger(&mut values, &mut best_rows, u, 32usize);
        keep_larger(&mut values, &mut best_rows, u, 16usize);
        keep_larger(&mut values, &mut best_rows, u, 8usize);
        keep_larger(&mut values, &mut best_rows, u, 4usize);
        keep_larger(&mut values, &mut best_rows, u, 2usize);
        keep_larger(&mut values, &mut best_rows, u, 1usize);
        let p = best_rows[0] as usize;
        let pivot = panel[p * b + j];
        sync_storage();
        // Swap rows r and p: the panel's every column, the operations' columns before j.
        if u < b {
            let (at_r, at_p) = (panel[r * b + u], panel[p * b + u]);
            panel[r * b + u] = at_p;
            panel[p * b + u] = at_r;
            if u < j {
                let (at_r, at_p) = (c[r * b + u], c[p * b + u]);
                c[r * b + u] = at_p;
                c[p * b + u] = at_r;
            }
        }
        if u == 0 {
            let (at_r, at_p) = (src[r], src[p]);
            src[r] = at_p;
            src[p] = at_r;
            logdet[0] += f32::ln(f32::abs(pivot));
        }
        sync_storage();
        let scale = f32::new(1.0) / pivot;
        if u < b {
            pivot_row[u] = panel[r * b + u] * scale;
            pivot_ops[u] = c[r * b + u] * scale;
        }
        sync_cube();
        // Row r becomes the scaled pivot row; every other row loses f times it.
        let mut i = u;
        while i < n {
            let f = select(i == r, f32::new(0.0), panel[i * b + j]);
            for col in 0..b {
                let (pv, ov) = (pivot_row[col], pivot_ops[col]);
                let (pe, oe) = (panel[i * b + col], c[i * b + col]);
                panel[i * b + col] = select(i == r, pv, pe - f * pv);
                c[i * b + col] = select(i == r, ov, oe - f * ov);
            }
            i += PANEL_UNITS;
        }
        sync_storage();
        j += 1;
    }
    // C = G − I[:, k..k+bk], and the pivot rows of [a | x] in their new order.
    let mut l = u;
    while l < bk {
        c[(k + l) * b + l] -= f32::new(1.0);
        l += PANEL_UNITS;
    }
    let w = comptime![if with_x { 2 * n } else { n }];
    let mut e = u;
    while e < b * w {
        let (l, col) = (e / w, e % w);
        let mut v = f32::new(0.0);
        if l < bk {
            let from = src[k + l] as usize;
            if col < n {
                v = a[from * n + col];
            } else if comptime![with_x] {
                v = x[from * n + col - n];
            }
        }
        rows[e] = v;
        e += PANEL_UNITS;
    }
}

/// One level of the pivot search's tree: unit `u < half` keeps the larger of its candidate
/// and that of unit `u + half` (the lower row on a tie).
#[cube]
fn keep_larger(
    values: &mut SharedMemory<f32>,
    rows: &mut SharedMemory<u32>,
    u: usize,
    #[comptime] half: usize,
) {
    if u < half {
        let (v, r) = (values[u + half], rows[u + half]);
        if v > values[u] || (v == values[u] && r < rows[u]) {
            values[u] = v;
            rows[u] = r;
        }
    }
    sync_cube();
}

/// `[a_next | x_next] = P·[a | x] + t` after a panel: row `i` of the result is row `src[i]`
/// of `[a | x]` plus row `i` of `t = C·R` (n × w). Grid: `⌈w/256⌉ × n` cubes (one cube row per
/// matrix row). Columns of `a` left of the panel hold unit vectors that no later panel reads;
/// they are rewritten all the same, so every product has one shape.
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gj_combine(
    a: &Array<f32>,
    x: &Array<f32>,
    t: &Array<f32>,
    src: &Array<u32>,
    a_next: &mut Array<f32>,
    x_next: &mut Array<f32>,
    #[comptime] n: usize,
    #[comptime] with_x: bool,
) {
    let i = CUBE_POS_Y as usize;
    let col = CUBE_POS_X as usize * ROW_UNITS + UNIT_POS_X as usize;
    let w = comptime![if with_x { 2 * n } else { n }];
    let from = src[i] as usize;
    if col < n {
        a_next[i * n + col] = a[from * n + col] + t[i * w + col];
    } else if comptime![with_x] && col < w {
        x_next[i * n + col - n] = x[from * n + col - n] + t[i * w + col];
    }
}
