//! The plan: a graph lowered to kernels — what every backend executes.
//!
//! One instruction per graph node (its *slot*); instructions folded into a fused group or a GEMM
//! epilogue are marked `skip`. The plan fixes the kernel list (GEMMs with their epilogues, fused
//! elementwise groups with reduction tails, the remaining single ops), the launch order, the
//! last use of every value and a static buffer assignment that reuses a buffer once its value
//! is dead. It is plain data (serde), so `snfc compile -o DIR` writes it to `DIR/plan.json` and
//! `snfc train DIR/plan.json` runs it without compiling the spec again.

use crate::compile::OptLevel;
use crate::ir::{Graph, NodeIndex, Op, Shape};
use crate::spec::FlowSpec;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};

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
    /// Whether running the instruction launches a kernel (leaves and transposes do not).
    pub fn is_kernel(&self) -> bool {
        self.group.is_some()
            || !matches!(
                self.op,
                Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Transpose
            )
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

/// The training step of a spec as a file: what `snfc train DIR/plan.json` runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainPlan {
    /// Format marker and version.
    pub snfc_plan: u32,
    pub spec: FlowSpec,
    pub batch: usize,
    /// `none`, `substitution` or `full`.
    pub opt_level: String,
    pub step: Plan,
}

pub const PLAN_FORMAT: u32 = 1;

impl TrainPlan {
    /// The training step of `spec` at `batch`, compiled at `level`.
    pub fn compile(
        spec: &FlowSpec,
        batch: usize,
        level: OptLevel,
    ) -> Result<TrainPlan, crate::rewrite::RewriteError> {
        let c = crate::compile::compile_train(spec, batch, level)?;
        Ok(TrainPlan {
            snfc_plan: PLAN_FORMAT,
            spec: spec.clone(),
            batch,
            opt_level: level_name(level).to_string(),
            step: Plan::for_level(&c.step, level),
        })
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("plans serialize") + "\n"
    }

    /// Whether a JSON file holds a plan (rather than a spec).
    pub fn is_plan_text(text: &str) -> bool {
        serde_json::from_str::<serde_json::Value>(text)
            .map(|v| v.get("snfc_plan").is_some())
            .unwrap_or(false)
    }

    /// Parse and check a plan file's text: the format, the spec (as a spec file is checked),
    /// the step plan, and that the plan reads exactly the spec's parameters and batch. Every
    /// error starts with the JSON path of the offending spot.
    pub fn parse(text: &str) -> Result<TrainPlan, String> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))?;
        let Some(obj) = value.as_object() else {
            return Err(
                "/: expected a JSON object (a plan from `snfc compile --emit plan`)".into(),
            );
        };
        let field = |key: &str| obj.get(key).ok_or_else(|| format!("/{key}: missing"));
        match obj.get("snfc_plan").and_then(|v| v.as_u64()) {
            Some(v) if v == PLAN_FORMAT as u64 => {}
            Some(v) => {
                return Err(format!(
                "/snfc_plan: format {v}, this snfc reads format {PLAN_FORMAT}; recompile the spec"
            ))
            }
            None => return Err("/snfc_plan: missing or not a number".into()),
        }
        let spec = crate::spec::parse_spec(&field("spec")?.to_string())
            .map_err(|e| format!("/spec: {e}"))?;
        let batch = field("batch")?;
        let batch = batch
            .as_u64()
            .and_then(|b| usize::try_from(b).ok())
            .filter(|b| *b > 0)
            .ok_or_else(|| format!("/batch: expected a positive integer, got {batch}"))?;
        let opt_level = field("opt_level")?;
        let opt_level = opt_level
            .as_str()
            .filter(|l| level_of(l).is_some())
            .ok_or_else(|| {
                format!("/opt_level: {opt_level}; expected \"none\", \"substitution\" or \"full\"")
            })?
            .to_string();
        let step = plan_from_json(field("step")?, "/step")?;
        let plan = TrainPlan {
            snfc_plan: PLAN_FORMAT,
            spec,
            batch,
            opt_level,
            step,
        };
        plan.spec
            .check_batch(plan.batch)
            .map_err(|e| format!("/batch: {e}"))?;
        plan.step.validate("/step")?;
        let want: BTreeMap<String, Shape> = crate::ir::lower::parameters(&plan.spec)
            .into_iter()
            .map(|p| (p.name, p.shape))
            .collect();
        let d = plan.spec.input.dim();
        let geco = plan.spec.objective.lambda.geco().is_some();
        let is_lambda = |name: &str| {
            geco && (0..plan.spec.layers.len())
                .any(|k| crate::ir::lower::geco_lambda_input(k) == name)
        };
        for (kind, name, shape) in plan.step.feeds() {
            use crate::ir::lower::{INPUT_NOISE, INPUT_X};
            let expected = match kind {
                "param" => want.get(&name).cloned(),
                _ if name == INPUT_X || name == INPUT_NOISE => Some(vec![d, plan.batch]),
                // A GECO layer's λ, a scalar fed each step.
                _ if is_lambda(&name) => Some(vec![]),
                _ => None,
            };
            match expected {
                Some(e) if e == shape => {}
                Some(e) => {
                    return Err(format!(
                        "/step: {kind} `{name}` has shape {shape:?}, but the spec and /batch give {e:?}"
                    ))
                }
                None => {
                    return Err(format!(
                        "/step: {kind} `{name}` is not a {} of spec `{}`",
                        if kind == "param" { "parameter" } else { "graph input" },
                        plan.spec.name
                    ))
                }
            }
        }
        Ok(plan)
    }

    /// Read a plan file; errors name the file.
    pub fn load(path: &std::path::Path) -> Result<TrainPlan, String> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{}: cannot read plan: {e}", path.display()))?;
        Self::parse(&text).map_err(|e| format!("{}: {e}", path.display()))
    }
}

pub fn numel(shape: &Shape) -> usize {
    shape.iter().product::<usize>().max(1)
}

/// The exact product of `shape` (0 for a shape with an empty axis), `None` if it overflows.
fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A shape read from a file, at `path`: an error unless its size is at most
/// [`crate::spec::MAX_TENSOR_ELEMENTS`] (so no size computed from it overflows).
fn check_size(shape: &[usize], path: &str) -> Result<(), String> {
    match elements(shape) {
        Some(n) if n <= crate::spec::MAX_TENSOR_ELEMENTS => Ok(()),
        _ => Err(format!(
            "{path}: shape {shape:?} has more than 2^40 elements (the most any tensor may have)"
        )),
    }
}

/// The shapes an op carries itself (besides its operands'), checked with [`check_size`], and
/// the sizes its shape inference multiplies, so that [`Op::infer_shape`] cannot overflow.
fn check_op_sizes(op: &Op, ins: &[Shape], path: &str) -> Result<(), String> {
    match op {
        Op::Input { shape, .. } | Op::Param { shape, .. } => check_size(shape, path),
        Op::Broadcast { to, .. } | Op::Reshape { to } | Op::Expand { to, .. } => {
            check_size(to, path)
        }
        Op::Toeplitz { h, w } => {
            let c = ins.first().and_then(|s| s.first()).copied().unwrap_or(1);
            let n = c
                .checked_mul(*h)
                .and_then(|n| n.checked_mul(*w))
                .unwrap_or(usize::MAX);
            check_size(&[n, n], path)
        }
        Op::ToeplitzAdjoint { h, w, .. } | Op::Multiplicity { h, w } => check_size(&[*h, *w], path),
        _ => Ok(()),
    }
}

/// A plan's JSON, field by field, so that an error names the instruction (or list entry) it
/// is in rather than only what serde expected.
fn plan_from_json(v: &serde_json::Value, at: &str) -> Result<Plan, String> {
    fn part<T: serde::de::DeserializeOwned>(
        v: &serde_json::Value,
        path: &str,
    ) -> Result<T, String> {
        T::deserialize(v).map_err(|e| format!("{path}: {e}"))
    }
    let Some(obj) = v.as_object() else {
        return Err(format!("{at}: expected an object"));
    };
    let field = |key: &str| obj.get(key).ok_or_else(|| format!("{at}/{key}: missing"));
    let instrs = field("instrs")?
        .as_array()
        .ok_or_else(|| format!("{at}/instrs: expected an array"))?
        .iter()
        .enumerate()
        .map(|(i, ins)| part(ins, &format!("{at}/instrs/{i}")))
        .collect::<Result<Vec<Instr>, String>>()?;
    Ok(Plan {
        name: part(field("name")?, &format!("{at}/name"))?,
        instrs,
        order: part(field("order")?, &format!("{at}/order"))?,
        outputs: part(field("outputs")?, &format!("{at}/outputs"))?,
        buffers: part(field("buffers")?, &format!("{at}/buffers"))?,
        all_reduce: match obj.get("all_reduce") {
            Some(v) => part(v, &format!("{at}/all_reduce"))?,
            None => None,
        },
    })
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
            fuse_gemm_epilogues(&mut instrs, &outputs);
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

    /// The stable text form: one line per kernel in launch order, slots numbered as in the
    /// graph's text (`snfc compile --emit ir-opt`), each written value with its buffer.
    ///
    /// ```text
    /// k4 = gemm %1, %0ᵀ, +1·%3 -> %5 in b2 : [784, 100]
    /// k5 = fused [784 x 100] (%5, %6) { .0 = softplus e0; .1 = sum axis=0 .0 } -> %9 = .1 in b3
    /// ```
    pub fn to_text(&self) -> String {
        use crate::ir::print::{op_text, shape_text};
        use std::fmt::Write;
        let mut out = String::new();
        let (total, naive) = self.buffers.footprint(self);
        let _ = writeln!(out, "plan {} {{", self.name);
        let _ = writeln!(
            out,
            "  {} kernels, {} buffers ({total} elements; {naive} without reuse)",
            self.kernels(),
            self.buffers.sizes.len()
        );
        let view = |s: usize| -> String {
            // Transposes are views: name the stored slot and mark the transpose.
            let (st, t) = self.view(s);
            format!("%{st}{}", if t { "ᵀ" } else { "" })
        };
        let buf = |s: usize| match self.buffers.of_slot.get(s).copied().flatten() {
            Some(b) => format!("b{b}"),
            None => "-".into(),
        };
        let mut k = 0;
        for &i in &self.order {
            let ins = &self.instrs[i];
            if !ins.is_kernel() {
                continue;
            }
            let args: Vec<String> = ins.args.iter().map(|a| view(*a)).collect();
            let line = match (&ins.group, &ins.epilogue) {
                (Some(g), _) => {
                    let members: Vec<String> = g
                        .kernel
                        .members
                        .iter()
                        .enumerate()
                        .map(|(m, mem)| {
                            let a: Vec<String> = mem
                                .args
                                .iter()
                                .map(|s| match s {
                                    Src::Reg(r) => format!(".{r}"),
                                    Src::Ext(e) => format!("e{e}"),
                                })
                                .collect();
                            format!(".{m} = {} {}", op_text(&mem.op), a.join(", "))
                        })
                        .collect();
                    let outs: Vec<String> = g
                        .kernel
                        .outputs
                        .iter()
                        .zip(&g.slots)
                        .map(|((m, _), s)| format!("%{s} = .{m} in {}", buf(*s)))
                        .collect();
                    format!(
                        "fused [{} x {}] ({}) {{ {} }} -> {}",
                        g.kernel.rows,
                        g.kernel.cols,
                        args.join(", "),
                        members.join("; "),
                        outs.join(", ")
                    )
                }
                (None, Some(e)) => format!(
                    "gemm {}, {}, {:+}·(product) {:+}·{} -> %{i} in {} : {}",
                    args[0],
                    args[1],
                    e.alpha,
                    e.beta,
                    args[2],
                    buf(i),
                    shape_text(&ins.shape)
                ),
                (None, None) => format!(
                    "{} {} -> %{i} in {} : {}",
                    if ins.op == Op::MatMul {
                        "gemm".to_string()
                    } else {
                        op_text(&ins.op)
                    },
                    args.join(", "),
                    buf(i),
                    shape_text(&ins.shape)
                ),
            };
            let _ = writeln!(out, "  k{k} = {line}");
            k += 1;
        }
        if let Some(r) = &self.all_reduce {
            let slots: Vec<String> = r
                .outputs
                .iter()
                .filter_map(|name| self.outputs.iter().find(|(n, _)| n == name))
                .map(|(_, s)| view(*s))
                .collect();
            let _ = writeln!(
                out,
                "  all_reduce mean ({}) : {} gradients in one buffer of {} values (over the ranks; nothing alone)",
                slots.join(", "),
                r.outputs.len(),
                r.elements
            );
        }
        for (name, s) in &self.outputs {
            let _ = writeln!(out, "  output {name} = {}", view(*s));
        }
        out.push_str("}\n");
        out
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

    /// Check a plan read from a file: every index in range, shapes consistent with the ops,
    /// the order a schedule of the instructions that run. Errors name the JSON path.
    pub fn validate(&self, at: &str) -> Result<(), String> {
        let n = self.instrs.len();
        let slot_ok = |s: usize, path: String| {
            if s < n {
                Ok(())
            } else {
                Err(format!("{path}: slot {s} out of range (the plan has {n})"))
            }
        };
        // Sizes first: every check below multiplies them.
        for (i, ins) in self.instrs.iter().enumerate() {
            check_size(&ins.shape, &format!("{at}/instrs/{i}/shape"))?;
        }
        for (i, ins) in self.instrs.iter().enumerate() {
            let here = format!("{at}/instrs/{i}");
            for (k, a) in ins.args.iter().enumerate() {
                slot_ok(*a, format!("{here}/args/{k}"))?;
            }
            let shapes: Vec<Shape> = ins
                .args
                .iter()
                .map(|a| self.instrs[*a].shape.clone())
                .collect();
            check_op_sizes(&ins.op, &shapes, &format!("{here}/op"))?;
            for (k, r) in ins.release.iter().enumerate() {
                slot_ok(*r, format!("{here}/release/{k}"))?;
            }
            if let Some(gr) = &ins.group {
                validate_group(gr, ins, &self.instrs, &format!("{here}/group"))?;
                continue;
            }
            if ins.skip {
                continue;
            }
            let arity = if ins.epilogue.is_some() {
                3
            } else {
                ins.op.arity()
            };
            if ins.args.len() != arity {
                return Err(format!(
                    "{here}/args: {} takes {arity} operands, got {}",
                    ins.op,
                    ins.args.len()
                ));
            }
            let shapes: Vec<Shape> = ins.args[..ins.op.arity()]
                .iter()
                .map(|a| self.instrs[*a].shape.clone())
                .collect();
            let want = ins
                .op
                .infer_shape(&shapes)
                .map_err(|e| format!("{here}: {e}"))?;
            if want != ins.shape {
                return Err(format!(
                    "{here}/shape: {:?}, but {} of {shapes:?} gives {want:?}",
                    ins.shape, ins.op
                ));
            }
            if ins.epilogue.is_some() {
                if ins.op != Op::MatMul {
                    return Err(format!("{here}/epilogue: only a matmul has an epilogue"));
                }
                if self.instrs[ins.args[2]].shape != ins.shape {
                    return Err(format!(
                        "{here}/args/2: the epilogue operand has shape {:?}, the product {:?}",
                        self.instrs[ins.args[2]].shape, ins.shape
                    ));
                }
            }
        }
        for (k, (name, s)) in self.outputs.iter().enumerate() {
            slot_ok(*s, format!("{at}/outputs/{k}"))
                .map_err(|e| format!("{e} (output `{name}`)"))?;
        }
        // The order must run every live instruction once, each after what it reads.
        // A released value is gone (the executors recycle its buffer): nothing reads it later.
        let mut defined = vec![false; n];
        let mut released = vec![false; n];
        let mut ran = vec![false; n];
        for (k, &i) in self.order.iter().enumerate() {
            let here = format!("{at}/order/{k}");
            slot_ok(i, here.clone())?;
            let ins = &self.instrs[i];
            if ins.skip || ran[i] {
                return Err(format!("{here}: instruction {i} is skipped or runs twice"));
            }
            ran[i] = true;
            for a in &ins.args {
                if !defined[*a] {
                    return Err(format!(
                        "{here}: instruction {i} reads slot {a} before it is computed"
                    ));
                }
                if released[*a] {
                    return Err(format!(
                        "{here}: instruction {i} reads slot {a} after an earlier instruction released it"
                    ));
                }
            }
            match &ins.group {
                Some(gr) => gr.slots.iter().for_each(|s| defined[*s] = true),
                None => defined[i] = true,
            }
            ins.release.iter().for_each(|r| released[*r] = true);
        }
        if let Some(i) = (0..n).find(|i| !self.instrs[*i].skip && !ran[*i]) {
            return Err(format!("{at}/order: instruction {i} never runs"));
        }
        if let Some((name, s)) = self.outputs.iter().find(|(_, s)| !defined[*s]) {
            return Err(format!(
                "{at}/outputs: `{name}` (slot {s}) is never computed"
            ));
        }
        if let Some((name, s)) = self.outputs.iter().find(|(_, s)| released[*s]) {
            return Err(format!(
                "{at}/outputs: `{name}` (slot {s}) is released before the step ends"
            ));
        }
        if self.buffers.of_slot.len() != n {
            return Err(format!(
                "{at}/buffers/of_slot: {} entries for {n} instructions",
                self.buffers.of_slot.len()
            ));
        }
        // Each buffer exactly as large as the largest value it holds: the backends allocate
        // these sizes, so a file cannot make them allocate more than the step needs.
        let mut largest: Vec<Option<usize>> = vec![None; self.buffers.sizes.len()];
        for (s, b) in self.buffers.of_slot.iter().enumerate() {
            if let Some(b) = b {
                let most = largest.get_mut(*b).ok_or_else(|| {
                    format!("{at}/buffers/of_slot/{s}: buffer {b} does not exist")
                })?;
                let len = numel(&self.instrs[s].shape);
                *most = Some(most.map_or(len, |m| m.max(len)));
            }
        }
        for (b, (size, most)) in self.buffers.sizes.iter().zip(&largest).enumerate() {
            match most {
                Some(m) if m == size => {}
                Some(m) => {
                    return Err(format!(
                        "{at}/buffers/sizes/{b}: buffer {b} holds {size} elements, but its largest value has {m}"
                    ))
                }
                None => {
                    return Err(format!(
                        "{at}/buffers/sizes/{b}: buffer {b} holds no value"
                    ))
                }
            }
        }
        // The all-reduce averages outputs of this plan, and packs exactly their values.
        if let Some(r) = &self.all_reduce {
            let mut elements = 0;
            for (i, name) in r.outputs.iter().enumerate() {
                let (_, s) = self
                    .outputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| {
                        format!(
                            "{at}/all_reduce/outputs/{i}: `{name}` is not an output of the plan"
                        )
                    })?;
                elements += numel(&self.instrs[*s].shape);
            }
            if elements != r.elements {
                return Err(format!(
                    "{at}/all_reduce/elements: {} values, but its outputs hold {elements}",
                    r.elements
                ));
            }
        }
        Ok(())
    }
}

fn validate_group(gr: &Group, ins: &Instr, instrs: &[Instr], at: &str) -> Result<(), String> {
    let k = &gr.kernel;
    if gr.slots.len() != k.outputs.len() {
        return Err(format!(
            "{at}/slots: {} slots for {} outputs",
            gr.slots.len(),
            k.outputs.len()
        ));
    }
    for (m, mem) in k.members.iter().enumerate() {
        if !(mem.op.is_elementwise() || matches!(mem.op, Op::Broadcast { .. } | Op::Sum { .. })) {
            return Err(format!(
                "{at}/kernel/members/{m}: {} cannot be fused",
                mem.op
            ));
        }
        if mem.args.len() != mem.op.arity() {
            return Err(format!(
                "{at}/kernel/members/{m}/args: {} takes {} operands",
                mem.op,
                mem.op.arity()
            ));
        }
        for (j, a) in mem.args.iter().enumerate() {
            let ok = match a {
                Src::Reg(r) => *r < m,
                Src::Ext(e) => *e < ins.args.len(),
            };
            if !ok {
                return Err(format!(
                    "{at}/kernel/members/{m}/args/{j}: {a:?} out of range"
                ));
            }
            if let (Op::Broadcast { .. }, Src::Reg(_)) = (&mem.op, a) {
                return Err(format!(
                    "{at}/kernel/members/{m}: a broadcast must read an external input"
                ));
            }
        }
    }
    let space = k
        .rows
        .checked_mul(k.cols)
        .filter(|n| *n <= crate::spec::MAX_TENSOR_ELEMENTS)
        .ok_or_else(|| {
            format!(
                "{at}/kernel: {} × {} is more than 2^40 elements",
                k.rows, k.cols
            )
        })?;
    // What the kernel reads from each external input and writes to each output must fit them
    // (the host kernel writes its outputs through raw pointers).
    for (m, mem) in k.members.iter().enumerate() {
        for (j, a) in mem.args.iter().enumerate() {
            let Src::Ext(e) = a else { continue };
            let slot = ins.args[*e];
            let len = elements(&instrs[slot].shape).unwrap_or(usize::MAX);
            let (ok, want) = match &mem.op {
                Op::Broadcast { new_axis: None, .. } => (len == 1, "1".to_string()),
                Op::Broadcast {
                    new_axis: Some(0), ..
                } => (len == k.cols, format!("{} (the columns)", k.cols)),
                Op::Broadcast { .. } => (len == k.rows, format!("{} (the rows)", k.rows)),
                _ => (
                    len == 1 || len == space,
                    format!("1 or {} × {}", k.rows, k.cols),
                ),
            };
            if !ok {
                return Err(format!(
                    "{at}/kernel/members/{m}/args/{j}: external input {e} (slot {slot}) has {len} elements; expected {want}"
                ));
            }
        }
    }
    for (j, (m, shape)) in k.outputs.iter().enumerate() {
        if *m >= k.members.len() {
            return Err(format!("{at}/kernel/outputs/{j}: member {m} out of range"));
        }
        let want = match k.members[*m].op {
            Op::Sum { axis: None } => 1,
            Op::Sum { axis: Some(0) } => k.cols,
            Op::Sum { axis: Some(_) } => k.rows,
            _ => space,
        };
        if elements(shape) != Some(want) {
            return Err(format!(
                "{at}/kernel/outputs/{j}: shape {shape:?}, but member {m} ({}) gives {want} elements",
                k.members[*m].op
            ));
        }
        let s = gr.slots[j];
        if s >= instrs.len() || instrs[s].shape != *shape {
            return Err(format!(
                "{at}/slots/{j}: slot {s} does not have the output's shape {shape:?}"
            ));
        }
    }
    Ok(())
}

/// A topological order of the instructions that run, as close to node order as possible
/// (a fused group runs once all its inputs exist). `None` if the groups form a cycle.
fn schedule(instrs: &[Instr]) -> Option<Vec<usize>> {
    use std::cmp::Reverse;
    use std::collections::BinaryHeap;
    // Which instruction produces each slot.
    let mut producer: Vec<usize> = (0..instrs.len()).collect();
    for (i, ins) in instrs.iter().enumerate() {
        if let Some(gr) = &ins.group {
            for s in &gr.slots {
                producer[*s] = i;
            }
        }
    }
    let live: Vec<usize> = (0..instrs.len()).filter(|i| !instrs[*i].skip).collect();
    let mut waiting = vec![0usize; instrs.len()];
    let mut users: Vec<Vec<usize>> = vec![Vec::new(); instrs.len()];
    for &i in &live {
        let mut deps: Vec<usize> = instrs[i].args.iter().map(|a| producer[*a]).collect();
        deps.sort();
        deps.dedup();
        waiting[i] = deps.len();
        for d in deps {
            users[d].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = live
        .iter()
        .filter(|i| waiting[**i] == 0)
        .map(|i| Reverse(*i))
        .collect();
    let mut order = Vec::with_capacity(live.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &u in &users[i] {
            waiting[u] -= 1;
            if waiting[u] == 0 {
                ready.push(Reverse(u));
            }
        }
    }
    (order.len() == live.len()).then_some(order)
}

fn set_releases(instrs: &mut [Instr], order: &[usize], outputs: &[(String, usize)]) {
    let mut last_use = vec![None; instrs.len()];
    for &i in order {
        for a in &instrs[i].args {
            last_use[*a] = Some(i);
        }
    }
    for (_, o) in outputs {
        last_use[*o] = None; // outputs live to the end
    }
    for ins in instrs.iter_mut() {
        ins.release.clear();
    }
    for (v, lu) in last_use.iter().enumerate() {
        if let Some(i) = lu {
            instrs[*i].release.push(v);
        }
    }
}

/// Give every kernel-written value a buffer, reusing a dead value's buffer of the same size.
/// A buffer dies when the last value viewing it (through transposes) is released.
fn assign_buffers(p: &Plan) -> Buffers {
    let n = p.instrs.len();
    let mut of_slot: Vec<Option<usize>> = vec![None; n];
    let mut sizes: Vec<usize> = Vec::new();
    let mut free: BTreeMap<usize, Vec<usize>> = BTreeMap::new();
    // Live views of each storage slot (itself and its transposes).
    let mut views: HashMap<usize, usize> = HashMap::new();
    let outputs: Vec<usize> = p.outputs.iter().map(|(_, s)| p.storage_slot(*s)).collect();
    for &i in &p.order {
        let ins = &p.instrs[i];
        let defined: Vec<usize> = match &ins.group {
            Some(gr) => gr.slots.clone(),
            None => vec![i],
        };
        for &s in &defined {
            *views.entry(p.storage_slot(s)).or_default() += 1;
            let writes = ins.group.is_some()
                || !matches!(
                    ins.op,
                    Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Transpose
                );
            if !writes {
                continue;
            }
            let len = numel(&p.instrs[s].shape);
            let b = match free.get_mut(&len).and_then(|v| v.pop()) {
                Some(b) => b,
                None => {
                    sizes.push(len);
                    sizes.len() - 1
                }
            };
            of_slot[s] = Some(b);
        }
        for r in &ins.release {
            let st = p.storage_slot(*r);
            let v = views.entry(st).or_default();
            *v = v.saturating_sub(1);
            if *v == 0 && !outputs.contains(&st) {
                if let Some(b) = of_slot[st] {
                    free.entry(sizes[b]).or_default().push(b);
                }
            }
        }
    }
    Buffers { sizes, of_slot }
}

/// Fold `add`/`sub` of a GEMM result that has no other use into the GEMM (accumulating into the
/// other operand), saving a pass over the output and a buffer.
fn fuse_gemm_epilogues(instrs: &mut [Instr], outputs: &[(String, usize)]) {
    let mut uses = vec![0usize; instrs.len()];
    for ins in instrs.iter() {
        for a in &ins.args {
            uses[*a] += 1;
        }
    }
    for (_, o) in outputs {
        uses[*o] += 1;
    }
    for n in 0..instrs.len() {
        if !matches!(instrs[n].op, Op::Add | Op::Sub) || instrs[n].skip || instrs[n].group.is_some()
        {
            continue;
        }
        for pos in 0..2 {
            let m = instrs[n].args[pos];
            let other = instrs[n].args[1 - pos];
            let fusable = instrs[m].op == Op::MatMul
                && !instrs[m].skip
                && instrs[m].epilogue.is_none()
                && uses[m] == 1
                && other != m
                && instrs[other].shape == instrs[n].shape;
            if !fusable {
                continue;
            }
            // add: ab + c; sub with the product first: ab − c; second: c − ab.
            let (alpha, beta) = match (&instrs[n].op, pos) {
                (Op::Add, _) => (1.0, 1.0),
                (_, 0) => (1.0, -1.0),
                _ => (-1.0, 1.0),
            };
            // A constant multiple (or negation) of a value that nothing else reads scales
            // `beta` instead of taking a pass of its own over the matrix (the −½ Rᵀ of a
            // weight gradient): ab + k·y is ab + k·y with y read by the GEMM.
            let (mut other, mut beta) = (other, beta);
            while uses[other] == 1 && !instrs[other].skip && instrs[other].group.is_none() {
                let scaled = match instrs[other].op {
                    Op::Neg => Some((instrs[other].args[0], -1.0)),
                    Op::Mul => (0..2).find_map(|k| {
                        let (c, y) = (instrs[other].args[k], instrs[other].args[1 - k]);
                        let factor = instrs[c].op.const_value()?;
                        (instrs[y].shape == instrs[n].shape).then_some((y, factor))
                    }),
                    _ => None,
                };
                let Some((y, factor)) = scaled else { break };
                instrs[other].skip = true;
                other = y;
                beta *= factor;
            }
            let (a, b) = (instrs[m].args[0], instrs[m].args[1]);
            instrs[m].skip = true;
            let ins = &mut instrs[n];
            ins.op = Op::MatMul;
            ins.args = vec![a, b, other];
            ins.epilogue = Some(Epilogue { alpha, beta });
            break;
        }
    }
}

/// Turn each fusion group of two or more ops into one fused instruction at the position of its
/// last member (its other members are skipped).
fn fuse_groups(
    g: &Graph,
    slot: &HashMap<NodeIndex, usize>,
    instrs: &mut [Instr],
    outputs: &[(String, usize)],
) {
    let plan = crate::fuse::plan(g);
    let mut used_outside = vec![false; instrs.len()];
    for (_, o) in outputs {
        used_outside[*o] = true;
    }
    for group in plan.groups.iter().filter(|gr| gr.nodes.len() >= 2) {
        let members: Vec<usize> = group.nodes.iter().map(|n| slot[n]).collect();
        let index: HashMap<usize, usize> =
            members.iter().enumerate().map(|(k, m)| (*m, k)).collect();
        for (i, ins) in instrs.iter().enumerate() {
            if !index.contains_key(&i) {
                for a in &ins.args {
                    if index.contains_key(a) {
                        used_outside[*a] = true;
                    }
                }
            }
        }
        let first = &instrs[members[0]];
        let space = if matches!(first.op, Op::Sum { .. }) {
            g.node(g.inputs(group.nodes[0])[0]).shape.clone()
        } else {
            first.shape.clone()
        };
        let (rows, cols) = match space.as_slice() {
            [r, c] => (*r, *c),
            [n] => (1, *n),
            _ => (1, 1),
        };
        let mut ext: Vec<usize> = Vec::new();
        let kernel_members: Vec<Member> = members
            .iter()
            .map(|&m| Member {
                op: instrs[m].op.clone(),
                args: instrs[m]
                    .args
                    .iter()
                    .map(|a| match index.get(a) {
                        Some(k) => Src::Reg(*k),
                        None => Src::Ext(match ext.iter().position(|e| e == a) {
                            Some(p) => p,
                            None => {
                                ext.push(*a);
                                ext.len() - 1
                            }
                        }),
                    })
                    .collect(),
            })
            .collect();
        let outs: Vec<usize> = members
            .iter()
            .copied()
            .filter(|m| used_outside[*m])
            .collect();
        let kernel = FusedKernel {
            rows,
            cols,
            members: kernel_members,
            outputs: outs
                .iter()
                .map(|m| (index[m], instrs[*m].shape.clone()))
                .collect(),
        };
        let last = *members.last().expect("non-empty group");
        for &m in &members {
            instrs[m].skip = m != last;
        }
        instrs[last].args = ext;
        instrs[last].group = Some(Group {
            kernel,
            slots: outs,
        });
    }
}

/// A single elementwise, broadcast or sum instruction as a one-member fused kernel (backends
/// that run every elementwise op through the fused kernel use this for unfused plans).
pub fn single_op_kernel(ins: &Instr, instrs: &[Instr]) -> Option<FusedKernel> {
    let fusable =
        ins.op.is_elementwise() || matches!(ins.op, Op::Broadcast { .. } | Op::Sum { .. });
    if !fusable || ins.group.is_some() {
        return None;
    }
    let space = if matches!(ins.op, Op::Sum { .. }) {
        instrs[ins.args[0]].shape.clone()
    } else {
        ins.shape.clone()
    };
    // Elementwise ops of other ranks have operands of one shape (or scalars): one flat row.
    let (rows, cols) = match space.as_slice() {
        [r, c] => (*r, *c),
        s => (1, s.iter().product()),
    };
    Some(FusedKernel {
        rows,
        cols,
        members: vec![Member {
            op: ins.op.clone(),
            args: (0..ins.args.len()).map(Src::Ext).collect(),
        }],
        outputs: vec![(0, ins.shape.clone())],
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compile::{compile_train, OptLevel};
    use crate::spec::FlowSpec;

    fn fc2() -> FlowSpec {
        let text = include_str!("../../specs/mnist_fc2.json");
        crate::spec::parse_spec(text).expect("spec")
    }

    #[test]
    fn plans_validate_and_round_trip_through_json() {
        for level in [OptLevel::None, OptLevel::Substitution, OptLevel::Full] {
            let c = compile_train(&fc2(), 16, level).expect("the spec compiles");
            let p = Plan::for_level(&c.step, level);
            p.validate("").expect("valid plan");
            let text = serde_json::to_string(&p).expect("serialize");
            let back: Plan = serde_json::from_str(&text).expect("parse");
            assert_eq!(back, p);
        }
    }

    #[test]
    fn buffers_are_reused_and_never_shared_by_live_values() {
        let c = compile_train(&fc2(), 16, OptLevel::Full).expect("the spec compiles");
        let p = Plan::new(&c.step);
        let (total, naive) = p.buffers.footprint(&p);
        assert!(total < naive, "reuse saves memory: {total} vs {naive}");
        // Simulate: a buffer written while another live value still needs it is an error.
        let mut holder: HashMap<usize, usize> = HashMap::new(); // buffer -> storage slot
        let mut alive: HashMap<usize, usize> = HashMap::new(); // storage slot -> live views
        let outs: Vec<usize> = p.outputs.iter().map(|(_, s)| p.storage_slot(*s)).collect();
        for &i in &p.order {
            let ins = &p.instrs[i];
            let defined = match &ins.group {
                Some(gr) => gr.slots.clone(),
                None => vec![i],
            };
            for s in defined {
                *alive.entry(p.storage_slot(s)).or_default() += 1;
                if let Some(b) = p.buffers.of_slot[s] {
                    if let Some(prev) = holder.get(&b) {
                        let live = alive.get(prev).copied().unwrap_or(0);
                        assert_eq!(live, 0, "buffer {b} reused while slot {prev} is live");
                    }
                    holder.insert(b, s);
                }
            }
            for r in &ins.release {
                let st = p.storage_slot(*r);
                if !outs.contains(&st) {
                    let a = alive.entry(st).or_default();
                    *a = a.saturating_sub(1);
                }
            }
        }
    }

    #[test]
    fn train_plans_round_trip_and_bad_files_name_the_spot() {
        let tp = TrainPlan::compile(&fc2(), 8, OptLevel::Full).expect("the spec compiles");
        let text = tp.to_json();
        assert!(TrainPlan::is_plan_text(&text));
        assert_eq!(TrainPlan::parse(&text).expect("parses"), tp);
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["batch"] = serde_json::json!(9);
        let e = TrainPlan::parse(&v.to_string()).unwrap_err();
        assert!(e.contains("input `x`") && e.contains("[784, 9]"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["spec"]["train"]["batch_size"] = serde_json::json!(0);
        let e = TrainPlan::parse(&v.to_string()).unwrap_err();
        assert!(e.starts_with("/spec:"), "{e}");
        let mut v: serde_json::Value = serde_json::from_str(&text).expect("json");
        v["snfc_plan"] = serde_json::json!(99);
        assert!(TrainPlan::parse(&v.to_string())
            .unwrap_err()
            .contains("format 99"));
    }

    /// The stricter checks of files (sizes, releases, group bounds, exact buffer sizes) accept
    /// every plan the compiler makes: each spec of specs/ at every optimization level.
    #[test]
    fn every_example_spec_compiles_to_a_plan_that_validates() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
        let mut names: Vec<_> = std::fs::read_dir(&dir)
            .expect("specs/")
            .map(|e| e.expect("entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "json"))
            .collect();
        names.sort();
        assert!(names.len() >= 5, "{names:?}");
        for path in names {
            let spec = crate::spec::load_spec(&path).expect("example spec");
            for level in [OptLevel::None, OptLevel::Full] {
                let tp = TrainPlan::compile(&spec, 2, level).expect("compiles");
                let back = TrainPlan::parse(&tp.to_json())
                    .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
                assert_eq!(back, tp);
            }
        }
    }

    /// Corruptions that would make an executor read or write out of bounds, or allocate
    /// without limit, are errors naming the spot.
    #[test]
    fn corrupt_sizes_releases_and_groups_are_rejected() {
        let tp = TrainPlan::compile(&fc2(), 4, OptLevel::Full).expect("the spec compiles");
        let v: serde_json::Value = serde_json::from_str(&tp.to_json()).expect("json");
        let err = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut v = v.clone();
            edit(&mut v);
            TrainPlan::parse(&v.to_string()).unwrap_err()
        };
        let e =
            err(&|v| v["step"]["instrs"][0]["shape"] = serde_json::json!([1u64 << 40, 1u64 << 40]));
        assert!(
            e.starts_with("/step/instrs/0/shape:") && e.contains("2^40"),
            "{e}"
        );
        let e = err(&|v| v["batch"] = serde_json::json!(-1));
        assert!(e.starts_with("/batch:"), "{e}");
        let e = err(&|v| v["step"]["instrs"][3]["op"] = serde_json::json!("Frobnicate"));
        assert!(
            e.starts_with("/step/instrs/3:") && e.contains("Frobnicate"),
            "{e}"
        );
        let e = err(&|v| v["step"]["buffers"]["sizes"][0] = serde_json::json!(1u64 << 50));
        assert!(e.starts_with("/step/buffers/sizes/0:"), "{e}");
        // The all-reduce packs outputs of the plan, exactly their values.
        let reduce = tp
            .step
            .all_reduce
            .as_ref()
            .expect("a training step averages its gradients");
        assert_eq!(reduce.outputs.len(), 6);
        assert_eq!(reduce.elements, 2 * (784 * 784 * 2 + 784));
        let e = err(&|v| v["step"]["all_reduce"]["outputs"][1] = serde_json::json!("grad.nope"));
        assert!(
            e.starts_with("/step/all_reduce/outputs/1:") && e.contains("grad.nope"),
            "{e}"
        );
        let e = err(&|v| v["step"]["all_reduce"]["elements"] = serde_json::json!(7));
        assert!(e.starts_with("/step/all_reduce/elements:"), "{e}");
        // A value released by the first instruction that reads it, though later ones read it too.
        let p = &tp.step;
        let (reader, slot) = p
            .order
            .iter()
            .flat_map(|&i| p.instrs[i].args.iter().map(move |&a| (i, a)))
            .find(|&(i, a)| {
                let later = p.order.iter().skip_while(|&&j| j != i).skip(1);
                later.clone().any(|&j| p.instrs[j].args.contains(&a))
            })
            .expect("a value read twice");
        let e = err(&|v| {
            v["step"]["instrs"][reader]["release"] = serde_json::json!([slot]);
        });
        assert!(
            e.contains("after an earlier instruction released it"),
            "{e}"
        );
        // A fused group that claims a smaller output than its iteration space.
        let g = p
            .instrs
            .iter()
            .position(|i| {
                i.group.as_ref().is_some_and(|g| {
                    let k = &g.kernel;
                    k.rows * k.cols > 1 && !matches!(k.members[k.outputs[0].0].op, Op::Sum { .. })
                })
            })
            .expect("an elementwise group");
        let e = err(&|v| {
            v["step"]["instrs"][g]["group"]["kernel"]["outputs"][0][1] = serde_json::json!([1]);
        });
        assert!(
            e.starts_with(&format!("/step/instrs/{g}/group/kernel/outputs/0:")),
            "{e}"
        );
    }

    #[test]
    fn broken_plans_are_rejected_with_a_path() {
        let c = compile_train(&fc2(), 4, OptLevel::Full).expect("the spec compiles");
        let p = Plan::new(&c.step);
        let mut bad = p.clone();
        let i = bad.order[bad.order.len() - 1];
        bad.instrs[i].args.push(10_000);
        let e = bad.validate("/step").unwrap_err();
        assert!(e.starts_with(&format!("/step/instrs/{i}")), "{e}");
        let mut bad = p.clone();
        let last = bad.order.len() - 1;
        bad.order.swap(0, last);
        assert!(bad.validate("/step").unwrap_err().contains("/step/order/"));
    }
}
