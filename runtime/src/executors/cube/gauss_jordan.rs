//! Inverses and log-determinants on the device: Gauss–Jordan elimination with partial
//! pivoting, one column per step, so that an exact-gradient step neither reads its matrices
//! back nor uploads their inverses. cubek 0.2 has no factorization to build on.
//!
//! The matrix `A` (n × n, row-major) is copied into scratch with `X = I` beside it. Step `k`
//! picks the row `p ≥ k` with the largest `|A[p, k]|` ([`gj_pivot`], one cube), swaps rows `k`
//! and `p`, scales row `k` by `1/A[p, k]` and clears column `k` from every other row of `A` and
//! `X` ([`gj_update`]). After `n` steps `A = I` and `X = A⁻¹`; `ln|det A|` is the sum of
//! `ln|A[p, k]|` over the steps. Every update reads one pair of buffers and writes the other
//! (ping-pong), so no unit reads what another writes in the same launch. That is `2n + 1`
//! launches per matrix: enough for the exact plans (a data-independent inverse per layer and
//! step), not a blocked factorization.

use cubecl::prelude::*;

/// Units of the one cube that searches a column for its pivot.
pub const PIVOT_UNITS: usize = 256;
/// Units per cube along a row in [`gj_init`] and [`gj_update`] (one cube row per matrix row).
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

/// Step `k`'s pivot, by one cube of [`PIVOT_UNITS`] units: `piv[0] = p`, the row `≥ k` with
/// the largest `|a[p, k]|` (the first such row on a tie, as LU with partial pivoting picks);
/// `scale[0] = 1/a[p, k]`; `logdet[0] += ln|a[p, k]|`; and the factor each row's update
/// subtracts the scaled pivot row with, `f[i] = a[i, k]` as the row stands after the swap
/// (`f[p] = a[k, k]`, `f[k] = 0`).
#[cube(launch)]
pub fn gj_pivot(
    a: &Array<f32>,
    f: &mut Array<f32>,
    piv: &mut Array<u32>,
    scale: &mut Array<f32>,
    logdet: &mut Array<f32>,
    k: u32,
    #[comptime] n: usize,
) {
    let u = UNIT_POS_X as usize;
    let k = k as usize;
    // Each unit's best row among k + u, k + u + 256, …; a NaN never wins, so a column of
    // NaNs keeps row k and its NaN pivot spreads to the result.
    let mut best = f32::new(-1.0);
    let mut row = k;
    let mut i = k + u;
    while i < n {
        let v = f32::abs(a[i * n + k]);
        if v > best {
            best = v;
            row = i;
        }
        i += PIVOT_UNITS;
    }
    let mut values = SharedMemory::<f32>::new(PIVOT_UNITS);
    let mut rows = SharedMemory::<u32>::new(PIVOT_UNITS);
    values[u] = best;
    rows[u] = row as u32;
    sync_cube();
    // A tree over the 256 units' candidates, halving each time.
    keep_larger(&mut values, &mut rows, u, 128usize);
    keep_larger(&mut values, &mut rows, u, 64usize);
    keep_larger(&mut values, &mut rows, u, 32usize);
    keep_larger(&mut values, &mut rows, u, 16usize);
    keep_larger(&mut values, &mut rows, u, 8usize);
    keep_larger(&mut values, &mut rows, u, 4usize);
    keep_larger(&mut values, &mut rows, u, 2usize);
    keep_larger(&mut values, &mut rows, u, 1usize);
    let p = rows[0] as usize;
    let mut i = u;
    while i < n {
        let src = if i == p { k } else { i };
        let factor = a[src * n + k];
        f[i] = select(i == k, f32::new(0.0), factor);
        i += PIVOT_UNITS;
    }
    if u == 0 {
        let pivot = a[p * n + k];
        piv[0] = p as u32;
        scale[0] = f32::new(1.0) / pivot;
        logdet[0] += f32::ln(f32::abs(pivot));
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

/// Step `k`'s elimination: `a_next`, `x_next` are `a`, `x` with rows `k` and `p` swapped, row
/// `k` scaled by `1/pivot` and `f[i]` times it taken from every other row `i`. Columns of `a`
/// before `k` are left unwritten: they hold unit vectors that no later step reads. Grid:
/// `⌈(2n − k)/256⌉ × n` cubes (per matrix row, the columns `k..n` of `a`, then those of `x`;
/// `⌈(n − k)/256⌉` without `x`).
#[cube(launch)]
#[allow(clippy::too_many_arguments)]
pub fn gj_update(
    a: &Array<f32>,
    x: &Array<f32>,
    a_next: &mut Array<f32>,
    x_next: &mut Array<f32>,
    f: &Array<f32>,
    piv: &Array<u32>,
    scale: &Array<f32>,
    k: u32,
    #[comptime] n: usize,
    #[comptime] with_x: bool,
) {
    let i = CUBE_POS_Y as usize;
    let k = k as usize;
    let j = k + CUBE_POS_X as usize * ROW_UNITS + UNIT_POS_X as usize;
    let p = piv[0] as usize;
    let s = scale[0];
    // Row i after the swap holds row `src` before it.
    let src = if i == p { k } else { i };
    if j < n {
        let pivot_row = a[p * n + j] * s;
        let eliminated = select(j == k, f32::new(0.0), a[src * n + j] - f[i] * pivot_row);
        a_next[i * n + j] = select(i == k, pivot_row, eliminated);
    } else if comptime![with_x] {
        let c = j - n;
        if c < n {
            let pivot_row = x[p * n + c] * s;
            let eliminated = x[src * n + c] - f[i] * pivot_row;
            x_next[i * n + c] = select(i == k, pivot_row, eliminated);
        }
    }
}
