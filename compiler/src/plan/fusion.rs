//! Kernel formation: elementwise groups with reduction tails, and GEMM epilogues.

use super::*;

/// Make each GEMM epilogue of `g` ([`crate::fuse::gemm_epilogues`]) one GEMM instruction at
/// its sum, `alpha·a·b + beta·c`; its product and folded scalings are skipped.
pub(super) fn fuse_gemm_epilogues(
    g: &Graph,
    slot: &HashMap<NodeIndex, usize>,
    instrs: &mut [Instr],
) {
    for e in crate::fuse::gemm_epilogues(g) {
        let product = slot[&e.product];
        let (a, b) = (instrs[product].args[0], instrs[product].args[1]);
        instrs[product].skip = true;
        for f in &e.folded {
            instrs[slot[f]].skip = true;
        }
        let ins = &mut instrs[slot[&e.sum]];
        ins.op = Op::MatMul;
        ins.args = vec![a, b, slot[&e.c]];
        ins.epilogue = Some(Epilogue {
            alpha: e.alpha,
            beta: e.beta,
        });
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
    if !ins.op.kernel_class().fusable() || ins.group.is_some() {
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
