//! [`Plan::validate`]: everything a backend relies on, checked for a plan read from a file (slots,
//! operands, sizes, groups, releases, buffers), each failure naming its JSON path.

use super::*;

impl Plan {
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

/// The exact product of `shape` (0 for a shape with an empty axis), `None` if it overflows.
pub(super) fn elements(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |acc, &d| acc.checked_mul(d))
}

/// A shape read from a file, at `path`: an error unless its size is at most
/// [`crate::spec::MAX_TENSOR_ELEMENTS`] (so no size computed from it overflows).
pub(super) fn check_size(shape: &[usize], path: &str) -> Result<(), String> {
    match elements(shape) {
        Some(n) if n <= crate::spec::MAX_TENSOR_ELEMENTS => Ok(()),
        _ => Err(format!(
            "{path}: shape {shape:?} has more than 2^40 elements (the most any tensor may have)"
        )),
    }
}

/// The shapes an op carries itself (besides its operands'), checked with [`check_size`], and
/// the sizes its shape inference multiplies, so that [`Op::infer_shape`] cannot overflow.
pub(super) fn check_op_sizes(op: &Op, ins: &[Shape], path: &str) -> Result<(), String> {
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

pub(super) fn validate_group(
    gr: &Group,
    ins: &Instr,
    instrs: &[Instr],
    at: &str,
) -> Result<(), String> {
    let k = &gr.kernel;
    if gr.slots.len() != k.outputs.len() {
        return Err(format!(
            "{at}/slots: {} slots for {} outputs",
            gr.slots.len(),
            k.outputs.len()
        ));
    }
    for (m, mem) in k.members.iter().enumerate() {
        if !mem.op.kernel_class().fusable() {
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
