//! Where a step's time goes: every executor records the seconds of each kernel under the kind
//! of [`Work`] it does, and `snfc bench --profile` adds them up, so that every millisecond of a
//! step lands in one category (what no kernel accounts for is [`Work::Other`]).

use serde::Serialize;
use snfc_compiler::ir::{KernelClass, Op};
use std::collections::HashMap;
use std::time::Instant;

/// The kinds of work a training step is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Work {
    /// Matrix products (dense layers, their gradients, Toeplitz products of exact convs).
    Gemm,
    /// Convolutions, their kernel gradients and the kernel-shaped ops around them.
    Conv,
    /// The rational-quadratic spline and its vector-Jacobian products.
    Spline,
    /// Elementwise work and reductions: fused groups and single elementwise ops.
    Elementwise,
    /// Layout changes: transposes, reshapes, permutes, slices, broadcasts along new axes, sums
    /// over axes of a higher-rank tensor (`reduce_sum`).
    Shape,
    /// LU-based inverses and log-determinants (exact steps).
    Linalg,
    /// The optimizer's update of every parameter.
    Adam,
    /// Everything outside the kernels: batch upload, noise, loss read-back, scheduling.
    Other,
}

impl Work {
    /// Every category, in report order.
    pub const ALL: [Work; 8] = [
        Work::Gemm,
        Work::Conv,
        Work::Spline,
        Work::Elementwise,
        Work::Shape,
        Work::Linalg,
        Work::Adam,
        Work::Other,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Work::Gemm => "gemm",
            Work::Conv => "conv",
            Work::Spline => "spline",
            Work::Elementwise => "elementwise",
            Work::Shape => "shape",
            Work::Linalg => "inverse/logdet",
            Work::Adam => "adam",
            Work::Other => "other",
        }
    }

    /// The work one op of the plan does when it runs as a kernel of its own: its
    /// [`KernelClass`].
    pub fn of(op: &Op) -> Work {
        match op.kernel_class() {
            KernelClass::Gemm => Work::Gemm,
            KernelClass::Conv => Work::Conv,
            KernelClass::Spline => Work::Spline,
            KernelClass::Linalg => Work::Linalg,
            KernelClass::Elementwise | KernelClass::Reduction => Work::Elementwise,
            KernelClass::Broadcast | KernelClass::View | KernelClass::Layout => Work::Shape,
            KernelClass::Leaf => Work::Other,
        }
    }
}

/// One line of a profile: a kernel kind, its category, and its time and launches in total.
#[derive(Debug, Clone, Serialize)]
pub struct ProfileRow {
    pub work: Work,
    pub kind: String,
    pub seconds: f64,
    pub count: usize,
}

/// Seconds and launches per (category, kernel kind).
#[derive(Debug, Default, Clone)]
pub struct Profile {
    rows: HashMap<(Work, String), (f64, usize)>,
}

impl Profile {
    /// Count one launch of `kind` that started at `started`.
    pub fn add(&mut self, work: Work, kind: impl Into<String>, started: Instant) {
        let e = self.rows.entry((work, kind.into())).or_insert((0.0, 0));
        e.0 += started.elapsed().as_secs_f64();
        e.1 += 1;
    }

    /// The rows, most expensive first.
    pub fn rows(&self) -> Vec<ProfileRow> {
        let mut rows: Vec<ProfileRow> = self
            .rows
            .iter()
            .map(|((work, kind), (seconds, count))| ProfileRow {
                work: *work,
                kind: kind.clone(),
                seconds: *seconds,
                count: *count,
            })
            .collect();
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }
}
