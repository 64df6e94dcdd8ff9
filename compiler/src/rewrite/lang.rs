//! The IR as an egg language: an e-node is an [`Op`] and its operand e-classes.

use crate::ir::{Graph, Op, Shape};
use egg::{Analysis, DidMerge, EGraph, FromOp, Id, Language};
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TensorNode {
    pub op: Op,
    pub children: Vec<Id>,
}

impl Language for TensorNode {
    type Discriminant = Op;

    fn discriminant(&self) -> Op {
        self.op.clone()
    }

    fn matches(&self, other: &Self) -> bool {
        self.op == other.op && self.children.len() == other.children.len()
    }

    fn children(&self) -> &[Id] {
        &self.children
    }

    fn children_mut(&mut self) -> &mut [Id] {
        &mut self.children
    }
}

impl fmt::Display for TensorNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.op)
    }
}

impl FromOp for TensorNode {
    type Error = String;
    fn from_op(op: &str, children: Vec<Id>) -> Result<Self, String> {
        let op: Op = op.parse()?;
        if op.arity() != children.len() {
            return Err(format!("{op} takes {} operands", op.arity()));
        }
        Ok(TensorNode { op, children })
    }
}

/// Every e-class knows its shape; rewrites only ever merge classes of equal shape.
#[derive(Debug, Default)]
pub struct ShapeAnalysis;

impl Analysis<TensorNode> for ShapeAnalysis {
    type Data = Shape;

    fn make(egraph: &mut EGraph<TensorNode, Self>, enode: &TensorNode, _id: Id) -> Shape {
        let shapes: Vec<Shape> = enode
            .children
            .iter()
            .map(|c| egraph[*c].data.clone())
            .collect();
        match enode.op.infer_shape(&shapes) {
            Ok(s) => s,
            Err(e) => panic!("snfc internal error: a rewrite built an ill-shaped {enode}: {e}"),
        }
    }

    fn merge(&mut self, a: &mut Shape, b: Shape) -> DidMerge {
        assert_eq!(
            *a, b,
            "snfc internal error: a rewrite equated tensors of different shapes"
        );
        DidMerge(false, false)
    }
}

fn numel(s: &Shape) -> f64 {
    s.iter().product::<usize>() as f64
}

/// Floating-point operations of one op given its operand shapes and result shape
/// ([`Op::flops`], part of the op's definition).
pub fn op_flops(op: &Op, ins: &[&Shape], out: &Shape) -> f64 {
    op.flops(ins, out)
}

/// Fixed cost of launching a non-elementwise kernel, in FLOP-equivalents: about 2 µs of a
/// 50 GFLOP/s host GEMM (a GPU launch costs more still). Too low a figure lets extraction trade
/// one D×D×B GEMM for two D×D×D ones wherever the batch is wider than the layer, which saves
/// nothing real.
pub const LAUNCH_COST: f64 = 100_000.0;

/// Elements one op reads and writes, by its [`KernelClass`](crate::ir::KernelClass): nothing for leaves and views (a
/// transpose is a stride change), the value written for fused elementwise work, operands and
/// result for every other kernel.
pub fn op_bytes(op: &Op, ins: &[&Shape], out: &Shape) -> f64 {
    let class = op.kernel_class();
    if !class.launches() {
        0.0
    } else if class.fusable() {
        numel(out)
    } else {
        ins.iter().map(|s| numel(s)).sum::<f64>() + numel(out)
    }
}

/// Kernel launches of one op, by its [`KernelClass`](crate::ir::KernelClass): none for leaves and views, a fraction for
/// fused elementwise work.
pub fn op_launches(op: &Op) -> f64 {
    let class = op.kernel_class();
    if !class.launches() {
        0.0
    } else if class.fusable() {
        0.1
    } else {
        1.0
    }
}

/// The price of a dense Toeplitz matrix of a convolution (or its adjoint) in a step, on top of
/// its work: the spec asked for a convolution, so its dense `(C·H·W)²` form is chosen only where
/// no convolution form exists (the exact step's inverses and log-dets). Without it, a small
/// image (4×4) makes dense products look cheaper than convolutions at some batch sizes, and the
/// step's algorithm would change with the batch.
pub const DENSE_OPERATOR_COST: f64 = 1e12;

/// The cost model of extraction: FLOPs + elements moved + launches × [`LAUNCH_COST`], and
/// [`DENSE_OPERATOR_COST`] for a dense Toeplitz form.
pub fn op_cost(op: &Op, ins: &[&Shape], out: &Shape) -> f64 {
    let dense = match op {
        Op::Toeplitz { .. } | Op::ToeplitzAdjoint { .. } => DENSE_OPERATOR_COST,
        _ => 0.0,
    };
    op_flops(op, ins, out) + op_bytes(op, ins, out) + op_launches(op) * LAUNCH_COST + dense
}

/// [`op_cost`] of an e-node, with shapes from the analysis.
pub fn node_cost(eg: &EGraph<TensorNode, ShapeAnalysis>, enode: &TensorNode) -> f64 {
    let shapes: Vec<&Shape> = enode.children.iter().map(|c| &eg[*c].data).collect();
    let owned: Vec<Shape> = shapes.iter().map(|s| (*s).clone()).collect();
    let out = enode.op.infer_shape(&owned).unwrap_or_default();
    op_cost(&enode.op, &shapes, &out)
}

/// FLOPs of one evaluation of a whole graph (every node once).
pub fn graph_flops(g: &Graph) -> f64 {
    g.nodes()
        .into_iter()
        .map(|n| {
            let ins = g.inputs(n);
            let shapes: Vec<&Shape> = ins.iter().map(|i| &g.node(*i).shape).collect();
            op_flops(&g.node(n).op, &shapes, &g.node(n).shape)
        })
        .sum()
}
