//! Elementwise fusion: group chains of elementwise ops (with the broadcasts that feed them and
//! the reductions that end them) so that each group runs as one kernel — one pass over its
//! iteration space instead of one pass, and one buffer, per op.
//!
//! A group has one iteration shape. A node joins the group of one of its elementwise operands
//! of the same shape, unless one of its other operands depends on that group (running the group
//! as one kernel would then need that operand mid-kernel: a cycle). A `sum` joins its operand's
//! group as a reduction tail; nothing downstream of a tail joins the group. GEMMs, inverses and
//! log-dets are kernels of their own; leaves, constants and transposes (views) are no kernels.

use crate::ir::{Graph, Op};
use petgraph::stable_graph::NodeIndex;
use std::collections::{BTreeSet, HashMap, HashSet};

/// One fused kernel.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// Members in topological order.
    pub nodes: Vec<NodeIndex>,
}

#[derive(Debug, Clone)]
pub struct FusionPlan {
    pub groups: Vec<Group>,
    /// The group of each fused node.
    pub group_of: HashMap<NodeIndex, usize>,
    /// Kernel launches per run: groups plus every other computing node.
    pub kernels: usize,
}

fn fusable(op: &Op) -> bool {
    op.is_elementwise() || matches!(op, Op::Broadcast { .. } | Op::Sum { .. })
}

fn is_kernel(op: &Op) -> bool {
    !matches!(
        op,
        Op::Input { .. } | Op::Param { .. } | Op::Const { .. } | Op::Transpose
    )
}

/// Group the elementwise work of `g`.
pub fn plan(g: &Graph) -> FusionPlan {
    let nodes = g.nodes();
    let mut groups: Vec<Group> = Vec::new();
    let mut group_of: HashMap<NodeIndex, usize> = HashMap::new();
    // Members that end a group (reductions): their users may not join it.
    let mut tail: HashMap<NodeIndex, bool> = HashMap::new();
    // Groups a non-member node's value needs (directly, through non-member nodes).
    let mut deps: HashMap<NodeIndex, BTreeSet<usize>> = HashMap::new();
    // Groups each group's kernel needs before it can run.
    let mut gdeps: Vec<BTreeSet<usize>> = Vec::new();
    let mut iter_shape: Vec<Vec<usize>> = Vec::new();
    // The groups a value needs: its own group, or what it was computed from.
    let needs = |x: NodeIndex,
                 group_of: &HashMap<NodeIndex, usize>,
                 deps: &HashMap<NodeIndex, BTreeSet<usize>>|
     -> BTreeSet<usize> {
        match group_of.get(&x) {
            Some(&gx) => BTreeSet::from([gx]),
            None => deps[&x].clone(),
        }
    };
    // Whether anything in `start` needs group `target`, following group dependencies.
    let reaches = |start: BTreeSet<usize>, target: usize, gdeps: &[BTreeSet<usize>]| -> bool {
        let mut seen = BTreeSet::new();
        let mut stack: Vec<usize> = start.into_iter().collect();
        while let Some(k) = stack.pop() {
            if k == target {
                return true;
            }
            if seen.insert(k) {
                stack.extend(gdeps[k].iter().copied());
            }
        }
        false
    };
    let mut uses: HashMap<NodeIndex, usize> = HashMap::new();
    for &n in &nodes {
        for i in g.inputs(n) {
            *uses.entry(i).or_default() += 1;
        }
    }
    for (_, o) in &g.outputs {
        *uses.entry(*o).or_default() += 1;
    }
    // `A·B ± C` with the product used nowhere else is a GEMM epilogue: the GEMM accumulates
    // into C, so the add is no elementwise kernel of its own.
    let epilogue = |n: NodeIndex| {
        matches!(g.node(n).op, Op::Add | Op::Sub)
            && g.inputs(n).iter().any(|i| {
                g.node(*i).op == Op::MatMul && uses[i] == 1 && g.node(*i).shape == g.node(n).shape
            })
    };
    // A constant multiple or negation whose only use is the added operand of such an epilogue
    // (or of another such node) scales the GEMM's `beta` instead (`Plan::new` folds it): no
    // kernel either. Users come after their operands, so walk the nodes backwards.
    let mut users: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    for &n in &nodes {
        for i in g.inputs(n) {
            users.insert(i, n);
        }
    }
    let mut folded: HashSet<NodeIndex> = HashSet::new();
    for &n in nodes.iter().rev() {
        if uses.get(&n) != Some(&1) {
            continue;
        }
        let Some(&user) = users.get(&n) else {
            continue;
        };
        let ins = g.inputs(n);
        let scaled = match g.node(n).op {
            Op::Neg => Some(ins[0]),
            Op::Mul => (0..2).find_map(|k| {
                g.node(ins[k]).op.const_value()?;
                Some(ins[1 - k])
            }),
            _ => None,
        };
        let Some(y) = scaled else { continue };
        let into_epilogue = epilogue(user) && g.node(user).shape == g.node(y).shape;
        if (into_epilogue || folded.contains(&user)) && g.node(y).shape == g.node(n).shape {
            folded.insert(n);
        }
    }
    for &n in &nodes {
        let node = g.node(n);
        let ins = g.inputs(n);
        if epilogue(n) || folded.contains(&n) {
            let mut d = BTreeSet::new();
            for &x in &ins {
                d.extend(needs(x, &group_of, &deps));
            }
            deps.insert(n, d);
            continue;
        }
        // Fused kernels walk matrices (rows × columns); values of higher rank (convolution
        // kernels, image batches) run their elementwise ops one kernel each.
        let matrices = node.shape.len() <= 2 && ins.iter().all(|i| g.node(*i).shape.len() <= 2);
        if fusable(&node.op) && matrices {
            // The shape the node iterates over: its output, or for a sum its operand.
            let shape = if matches!(node.op, Op::Sum { .. }) {
                g.node(ins[0]).shape.clone()
            } else {
                node.shape.clone()
            };
            let mut joined = None;
            for &o in &ins {
                let Some(&gid) = group_of.get(&o) else {
                    continue;
                };
                if tail[&o] || iter_shape[gid] != shape {
                    continue;
                }
                let cyclic = ins.iter().any(|&x| {
                    group_of.get(&x) != Some(&gid)
                        && reaches(needs(x, &group_of, &deps), gid, &gdeps)
                });
                if !cyclic {
                    joined = Some(gid);
                    break;
                }
            }
            let gid = joined.unwrap_or_else(|| {
                groups.push(Group { nodes: Vec::new() });
                gdeps.push(BTreeSet::new());
                iter_shape.push(shape);
                groups.len() - 1
            });
            for &x in &ins {
                if group_of.get(&x) != Some(&gid) {
                    let nx = needs(x, &group_of, &deps);
                    gdeps[gid].extend(nx);
                }
            }
            groups[gid].nodes.push(n);
            group_of.insert(n, gid);
            tail.insert(n, matches!(node.op, Op::Sum { .. }));
        } else {
            let mut d = BTreeSet::new();
            for &x in &ins {
                d.extend(needs(x, &group_of, &deps));
            }
            deps.insert(n, d);
        }
    }
    let others = nodes
        .iter()
        .filter(|n| {
            !group_of.contains_key(n)
                && is_kernel(&g.node(**n).op)
                && !epilogue(**n)
                && !folded.contains(n)
        })
        .count();
    FusionPlan {
        kernels: groups.len() + others,
        groups,
        group_of,
    }
}

/// Kernel launches of one run of `g` after fusion grouping.
pub fn kernel_count(g: &Graph) -> usize {
    plan(g).kernels
}
