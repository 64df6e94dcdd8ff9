//! Reverse-mode differentiation on the IR: exact gradients, expressed as more IR.
//!
//! Each op's vector-Jacobian product is part of its definition (`Op::vjp`, in `ir/op/vjp.rs`);
//! this module walks the graph backwards and accumulates them. The two that make flows
//! expensive, `inverse` and `logdet`, are emitted exactly; the self-normalizing substitution is
//! a later rewrite.

use crate::ir::{Graph, GraphBuilder, Op};
use petgraph::stable_graph::NodeIndex;
use std::collections::HashMap;

/// Gradients of the scalar `objective` with respect to each node of `wrt` (`None` where the
/// objective does not depend on it). New nodes are added to `b`.
pub fn gradients(
    b: &mut GraphBuilder,
    objective: NodeIndex,
    wrt: &[NodeIndex],
) -> Vec<Option<NodeIndex>> {
    let order = b.graph().nodes();
    // Which nodes depend on a differentiated leaf (through anything but stop_grad).
    let mut needs: HashMap<NodeIndex, bool> = HashMap::new();
    for &n in &order {
        let v = wrt.contains(&n)
            || (*b.op(n) != Op::StopGrad && b.graph().inputs(n).iter().any(|i| needs[i]));
        needs.insert(n, v);
    }
    let outer_region = b.region();
    let mut cot: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    let one = b.constant(1.0);
    cot.insert(objective, one);
    for &n in order.iter().rev() {
        let Some(&g) = cot.get(&n) else { continue };
        if !needs[&n] {
            continue;
        }
        let ins = b.graph().inputs(n);
        let op = b.op(n).clone();
        // A node's vector-Jacobian products belong to its region (see `ir::Region`).
        b.set_region(b.region_of(n));
        for (pos, &x) in ins.iter().enumerate() {
            if !needs[&x] {
                continue;
            }
            if let Some(c) = op.vjp(b, n, &ins, pos, g) {
                let c = unbroadcast(b, c, x);
                let acc = match cot.get(&x) {
                    Some(&prev) => b.add2(prev, c),
                    None => c,
                };
                cot.insert(x, acc);
            }
        }
    }
    b.set_region(outer_region);
    wrt.iter().map(|w| cot.get(w).copied()).collect()
}

/// Sum a contribution back to a scalar operand's shape (implicit scalar broadcasting).
fn unbroadcast(b: &mut GraphBuilder, c: NodeIndex, x: NodeIndex) -> NodeIndex {
    if b.shape(x).is_empty() && !b.shape(c).is_empty() {
        b.sum(c, None)
    } else {
        c
    }
}

/// Replace every `stop_grad x` by `x` (after differentiation it is the identity).
pub fn strip_stop_grad(g: &Graph) -> Graph {
    g.rebuild(g.outputs.clone(), |op, ins| {
        if *op == Op::StopGrad {
            Some(ins[0])
        } else {
            None
        }
    })
}
