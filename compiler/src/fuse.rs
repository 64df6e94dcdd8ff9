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

/// `n = alpha·(a·b) + beta·c`: an `add`/`sub` of a GEMM result that nothing else reads, which
/// the GEMM computes by accumulating into `c` (one pass over the output and one buffer saved).
#[derive(Debug, Clone, PartialEq)]
pub struct GemmEpilogue {
    /// The `add`/`sub` that becomes the GEMM.
    pub sum: NodeIndex,
    /// The `matmul a b` it consumes.
    pub product: NodeIndex,
    /// The value accumulated into.
    pub c: NodeIndex,
    pub alpha: f64,
    pub beta: f64,
    /// Negations and constant multiples between the sum and `c`, each read by nothing else,
    /// folded into `beta` (a weight gradient's −½ Rᵀ is read by the GEMM, not scaled in a pass).
    pub folded: Vec<NodeIndex>,
}

/// Every GEMM epilogue of `g`, in node order: the one definition that fusion, the kernel count
/// and the plan use.
pub fn gemm_epilogues(g: &Graph) -> Vec<GemmEpilogue> {
    let nodes = g.nodes();
    let mut uses: HashMap<NodeIndex, usize> = HashMap::new();
    for &n in &nodes {
        for i in g.inputs(n) {
            *uses.entry(i).or_default() += 1;
        }
    }
    for (_, o) in &g.outputs {
        *uses.entry(*o).or_default() += 1;
    }
    let single_use = |n: NodeIndex| uses.get(&n) == Some(&1);
    // Products consumed and scalings folded by an epilogue found earlier.
    let mut taken: HashSet<NodeIndex> = HashSet::new();
    let mut found = Vec::new();
    for &n in &nodes {
        let op = &g.node(n).op;
        if !matches!(op, Op::Add | Op::Sub) {
            continue;
        }
        let ins = g.inputs(n);
        let shape = &g.node(n).shape;
        for pos in 0..2 {
            let (product, other) = (ins[pos], ins[1 - pos]);
            let fits = g.node(product).op == Op::MatMul
                && !taken.contains(&product)
                && single_use(product)
                && other != product
                && g.node(other).shape == *shape;
            if !fits {
                continue;
            }
            // add: ab + c; sub with the product first: ab − c; second: c − ab.
            let (alpha, mut beta) = match (op, pos) {
                (Op::Add, _) => (1.0, 1.0),
                (_, 0) => (1.0, -1.0),
                _ => (-1.0, 1.0),
            };
            let (mut c, mut folded) = (other, Vec::new());
            while single_use(c) && !taken.contains(&c) {
                let args = g.inputs(c);
                let scaled = match g.node(c).op {
                    Op::Neg => Some((args[0], -1.0)),
                    Op::Mul => (0..2).find_map(|k| {
                        let factor = g.node(args[k]).op.const_value()?;
                        let y = args[1 - k];
                        (g.node(y).shape == *shape).then_some((y, factor))
                    }),
                    _ => None,
                };
                let Some((y, factor)) = scaled else { break };
                taken.insert(c);
                folded.push(c);
                c = y;
                beta *= factor;
            }
            taken.insert(product);
            found.push(GemmEpilogue {
                sum: n,
                product,
                c,
                alpha,
                beta,
                folded,
            });
            break;
        }
    }
    found
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
    // GEMM epilogues run inside their GEMM: their sums and folded scalings join no group.
    let epilogues = gemm_epilogues(g);
    let in_epilogue: HashSet<NodeIndex> = epilogues
        .iter()
        .flat_map(|e| std::iter::once(e.sum).chain(e.folded.iter().copied()))
        .collect();
    for &n in &nodes {
        let node = g.node(n);
        let ins = g.inputs(n);
        if in_epilogue.contains(&n) {
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
        if node.op.kernel_class().fusable() && matrices {
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
                && g.node(**n).op.kernel_class().launches()
                && !in_epilogue.contains(n)
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
