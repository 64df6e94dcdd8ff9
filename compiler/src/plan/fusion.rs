//! Kernel formation: elementwise groups with reduction tails, and GEMM epilogues.

use super::*;

/// Fold `add`/`sub` of a GEMM result that has no other use into the GEMM (accumulating into the
/// other operand), saving a pass over the output and a buffer.
pub(super) fn fuse_gemm_epilogues(instrs: &mut [Instr], outputs: &[(String, usize)]) {
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
pub(super) fn fuse_groups(
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
