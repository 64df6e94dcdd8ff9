//! The plan: a graph lowered to kernels — what every backend executes.
//!
//! One instruction per graph node (its *slot*); instructions folded into a fused group or a GEMM
//! epilogue are marked `skip`. The plan fixes the kernel list (GEMMs with their epilogues, fused
//! elementwise groups with reduction tails, the remaining single ops), the launch order, the
//! last use of every value and a static buffer assignment that reuses a buffer once its value
//! is dead. It is plain data (serde), so `snfc compile -o DIR` writes it to `DIR/plan.json` and
//! `snfc train DIR/plan.json` runs it without compiling the spec again.
//!
//! This file holds the plan's data and its construction; `fusion.rs` forms the kernels,
//! `schedule.rs` orders them and assigns buffers, `text.rs` prints a plan, `file.rs` reads and
//! writes `plan.json`, and `validate.rs` checks a plan read from a file.

use crate::compile::OptLevel;
use crate::ir::{Graph, NodeIndex, Op, Shape};
use crate::spec::FlowSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

mod file;
mod fusion;
mod schedule;
#[cfg(test)]
mod tests;
mod text;
mod validate;

pub use file::TrainPlan;
pub use fusion::single_op_kernel;
use fusion::*;
use schedule::*;

/// Where a fused member's operand comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Src {
    /// An earlier member of the group.
    Reg(usize),
    /// The group's k-th external input (an instruction argument).
    Ext(usize),
}

/// One op of a fused group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub op: Op,
    pub args: Vec<Src>,
}

/// A fusion group as one kernel: its members evaluated in one pass over `[rows, cols]`
/// (a vector is one row, a scalar one element), reductions accumulated on the fly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FusedKernel {
    pub rows: usize,
    pub cols: usize,
    pub members: Vec<Member>,
    /// Members whose values leave the group, with their shapes.
    pub outputs: Vec<(usize, Shape)>,
}

/// A GEMM that also adds a third operand: `alpha·(a·b) + beta·c`, args `[a, b, c]`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Epilogue {
    pub alpha: f64,
    pub beta: f64,
}

/// A fused group, placed at its last member's instruction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub kernel: FusedKernel,
    /// The slots its outputs define, in `kernel.outputs` order.
    pub slots: Vec<usize>,
}

/// One node of the graph as the backends see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Instr {
    pub op: Op,
    pub args: Vec<usize>,
    pub shape: Shape,
    /// Values whose last use is this instruction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub release: Vec<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epilogue: Option<Epilogue>,
    /// Folded into a later instruction's epilogue or a fused group; not executed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub skip: bool,
    /// A fused elementwise group: `args` are its external inputs and it writes `group.slots`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<Group>,
}

impl Instr {
    /// Whether running the instruction launches a kernel that writes a buffer (leaves and
    /// views do not; see [`KernelClass`](crate::ir::KernelClass)).
    pub fn is_kernel(&self) -> bool {
        self.group.is_some() || self.op.kernel_class().launches()
    }
}

/// Static buffer assignment: every value computed by a kernel gets a buffer; a buffer is
/// reused once the value in it is dead. Leaves live in buffers the caller feeds, transposes
/// share their operand's buffer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Buffers {
    /// Elements of each buffer.
    pub sizes: Vec<usize>,
    /// The buffer of each slot, where a kernel writes it.
    pub of_slot: Vec<Option<usize>>,
}

impl Buffers {
    /// Elements allocated, and elements that one buffer per value would need.
    pub fn footprint(&self, p: &Plan) -> (usize, usize) {
        let total = self.sizes.iter().sum();
        let naive = self
            .of_slot
            .iter()
            .enumerate()
            .filter(|(_, b)| b.is_some())
            .map(|(s, _)| numel(&p.instrs[s].shape))
            .sum();
        (total, naive)
    }
}

/// A graph lowered to kernels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Plan {
    pub name: String,
    pub instrs: Vec<Instr>,
    /// Launch order of the instructions that run.
    pub order: Vec<usize>,
    pub outputs: Vec<(String, usize)>,
    pub buffers: Buffers,
    /// A training step's gradient average over the ranks of a data-parallel run, after the
    /// kernels (none for other plans; nothing to do for a process that runs alone).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all_reduce: Option<AllReduce>,
}

/// The mean over the ranks of every gradient output, packed into one buffer and sent in one
/// collective call (Horovod's tensor fusion), before the divergence check and Adam.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AllReduce {
    /// The outputs averaged, in the order they are packed.
    pub outputs: Vec<String>,
    /// Values in the packed buffer.
    pub elements: usize,
}

pub const PLAN_FORMAT: u32 = 1;

pub fn numel(shape: &Shape) -> usize {
    shape.iter().product::<usize>().max(1)
}

pub fn level_name(level: OptLevel) -> &'static str {
    match level {
        OptLevel::None => "none",
        OptLevel::Substitution => "substitution",
        OptLevel::Full => "full",
    }
}

pub fn level_of(name: &str) -> Option<OptLevel> {
    match name {
        "none" => Some(OptLevel::None),
        "substitution" => Some(OptLevel::Substitution),
        "full" => Some(OptLevel::Full),
        _ => None,
    }
}

impl Plan {
    /// Lower `g` with elementwise fusion and GEMM epilogues.
    pub fn new(g: &Graph) -> Plan {
        Self::with_fusion(g, true)
    }

    /// One kernel per node (the reference fused plans are tested against).
    pub fn unfused(g: &Graph) -> Plan {
        Self::with_fusion(g, false)
    }

    /// The plan for a step compiled at `level`: fused only when the graph was optimized
    /// (`--no-fusion` means neither algebraic factoring nor kernel fusion).
    pub fn for_level(g: &Graph, level: OptLevel) -> Plan {
        Self::with_fusion(g, level == OptLevel::Full)
    }

    pub fn with_fusion(g: &Graph, fuse: bool) -> Plan {
        let nodes = g.nodes();
        let slot: HashMap<_, _> = nodes.iter().enumerate().map(|(i, n)| (*n, i)).collect();
        let mut instrs: Vec<Instr> = nodes
            .iter()
            .map(|n| Instr {
                op: g.node(*n).op.clone(),
                args: g.inputs(*n).iter().map(|a| slot[a]).collect(),
                shape: g.node(*n).shape.clone(),
                release: Vec::new(),
                epilogue: None,
                skip: false,
                group: None,
            })
            .collect();
        let outputs: Vec<(String, usize)> = g
            .outputs
            .iter()
            .map(|(name, n)| (name.clone(), slot[n]))
            .collect();
        if fuse {
            fuse_groups(g, &slot, &mut instrs, &outputs);
            fuse_gemm_epilogues(g, &slot, &mut instrs);
        }
        let order = schedule(&instrs).expect("fusion keeps the graph acyclic");
        set_releases(&mut instrs, &order, &outputs);
        let mut plan = Plan {
            name: g.name.clone(),
            instrs,
            order,
            outputs,
            buffers: Buffers {
                sizes: Vec::new(),
                of_slot: Vec::new(),
            },
            all_reduce: None,
        };
        plan.buffers = assign_buffers(&plan);
        let grads: Vec<&(String, usize)> = plan
            .outputs
            .iter()
            .filter(|(name, _)| name.starts_with("grad."))
            .collect();
        if !grads.is_empty() {
            plan.all_reduce = Some(AllReduce {
                outputs: grads.iter().map(|(name, _)| name.clone()).collect(),
                elements: grads
                    .iter()
                    .map(|(_, s)| numel(&plan.instrs[*s].shape))
                    .sum(),
            });
        }
        plan
    }

    /// Kernel launches per run.
    pub fn kernels(&self) -> usize {
        self.order
            .iter()
            .filter(|i| self.instrs[**i].is_kernel())
            .count()
    }

    /// Names and shapes of the inputs (`input`) and parameters (`param`) the plan reads.
    pub fn feeds(&self) -> Vec<(&'static str, String, Shape)> {
        self.instrs
            .iter()
            .filter_map(|i| match &i.op {
                Op::Input { name, shape } => Some(("input", name.clone(), shape.clone())),
                Op::Param { name, shape } => Some(("param", name.clone(), shape.clone())),
                _ => None,
            })
            .collect()
    }

    /// The slot whose value an instruction's result aliases: a transpose's operand, followed
    /// through chains of transposes (a transpose is a view, not a kernel).
    pub fn storage_slot(&self, s: usize) -> usize {
        self.view(s).0
    }

    /// The slot whose storage `s` reads, and whether it reads it transposed (an odd number of
    /// transposes in the chain).
    pub fn view(&self, mut s: usize) -> (usize, bool) {
        let mut transposed = false;
        while self.instrs[s].op == Op::Transpose && !self.instrs[s].skip {
            transposed = !transposed;
            s = self.instrs[s].args[0];
        }
        (s, transposed)
    }
}
