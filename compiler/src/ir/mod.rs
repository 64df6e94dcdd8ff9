//! The tensor IR: a petgraph DAG of a small set of primitive tensor ops with shapes.
//!
//! Tensors have any rank, row-major. The batch is always the last axis: `[D, B]` for flat
//! layers (one column per example, so a fully connected layer is `matmul W X`) and
//! `[C, H, W, B]` for images, so flattening an image batch to `[C·H·W, B]` is a free `reshape`.
//! Nodes are hash-consed by the [`GraphBuilder`] (one node per distinct op and operands) and are
//! always created after their operands, so node index order is a topological order.

pub mod inverse;
pub mod lower;
mod op;
pub mod parse;
pub(crate) mod print;

pub use op::{KernelClass, Op, Shape, SplinePart, Unary};

pub use petgraph::stable_graph::NodeIndex;
use petgraph::stable_graph::StableDiGraph;
use petgraph::visit::EdgeRef;
use petgraph::Direction;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;

/// The part of a flow a node was built for: the rewriter saturates each region on its own
/// (DESIGN.md §7, "rewrite locally, compose globally"), so its work grows linearly with depth.
/// Lowering sets the region of the forward nodes; autodiff puts each vector-Jacobian product
/// in the region of the node it differentiates, so one layer's forward and backward algebra
/// (shared `W h`, factored gradient GEMMs) stays together.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Region {
    /// Preprocessing, and every node of a graph built without regions.
    #[default]
    Input,
    /// Layer `k` of the spec's (expanded) layer list.
    Layer(usize),
    /// The base density and the objective.
    Loss,
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Region::Input => write!(f, "input"),
            Region::Layer(k) => write!(f, "layers.{k}"),
            Region::Loss => write!(f, "loss"),
        }
    }
}

impl FromStr for Region {
    type Err = String;
    fn from_str(s: &str) -> Result<Region, String> {
        match s {
            "input" => Ok(Region::Input),
            "loss" => Ok(Region::Loss),
            _ => s
                .strip_prefix("layers.")
                .and_then(|k| k.parse().ok())
                .map(Region::Layer)
                .ok_or_else(|| format!("unknown region {s:?} (input, layers.K or loss)")),
        }
    }
}

/// A learned inverse declared by lowering: the parameter `inverse` is trained to invert the
/// linear operator of parameter `forward` (R ≈ W⁻¹). The self-normalizing substitution matches
/// these declarations, never parameter names.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct InversePair {
    pub forward: String,
    pub inverse: String,
}

/// One tensor operation, the shape of its result and the region it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    pub op: Op,
    pub shape: Shape,
    pub region: Region,
}

/// A tensor program: nodes, operand edges (weight = operand position), named outputs and the
/// declared learned-inverse pairs of its parameters.
#[derive(Debug, Clone)]
pub struct Graph {
    pub name: String,
    graph: StableDiGraph<Node, usize>,
    pub outputs: Vec<(String, NodeIndex)>,
    pub pairs: Vec<InversePair>,
}

impl Graph {
    pub fn node(&self, n: NodeIndex) -> &Node {
        &self.graph[n]
    }

    /// Operands of `n` in order.
    pub fn inputs(&self, n: NodeIndex) -> Vec<NodeIndex> {
        let mut edges: Vec<(usize, NodeIndex)> = self
            .graph
            .edges_directed(n, Direction::Incoming)
            .map(|e| (*e.weight(), e.source()))
            .collect();
        edges.sort();
        edges.into_iter().map(|(_, s)| s).collect()
    }

    /// Node indices in topological order (operands before users).
    pub fn nodes(&self) -> Vec<NodeIndex> {
        let mut ids: Vec<NodeIndex> = self.graph.node_indices().collect();
        ids.sort();
        ids
    }

    pub fn node_count(&self) -> usize {
        self.graph.node_count()
    }

    pub fn output(&self, name: &str) -> Option<NodeIndex> {
        self.outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, i)| *i)
    }

    /// Number of nodes whose op satisfies `pred`.
    pub fn count(&self, pred: impl Fn(&Op) -> bool) -> usize {
        self.graph.node_weights().filter(|n| pred(&n.op)).count()
    }

    /// The same graph with only the outputs in `keep` (in that order) and without dead nodes.
    pub fn with_outputs(&self, keep: &[&str]) -> Graph {
        let outputs: Vec<(String, NodeIndex)> = keep
            .iter()
            .filter_map(|k| self.output(k).map(|n| (k.to_string(), n)))
            .collect();
        self.rebuild(outputs, |_, _| None)
    }

    /// The same graph without the outputs named in `drop` and without dead nodes.
    pub fn without_outputs(&self, drop: &[&str]) -> Graph {
        let outputs = self
            .outputs
            .iter()
            .filter(|(n, _)| !drop.contains(&n.as_str()))
            .cloned()
            .collect();
        self.rebuild(outputs, |_, _| None)
    }

    /// Copy the nodes reachable from `outputs` into a fresh hash-consed builder. `replace` may map
    /// a node (given its op and already-copied operands) to an existing copied node instead.
    pub fn rebuild(
        &self,
        outputs: Vec<(String, NodeIndex)>,
        mut replace: impl FnMut(&Op, &[NodeIndex]) -> Option<NodeIndex>,
    ) -> Graph {
        let live = self.live(outputs.iter().map(|(_, n)| *n));
        let mut b = GraphBuilder::new(&self.name);
        b.graph.pairs = self.pairs.clone();
        let mut map: HashMap<NodeIndex, NodeIndex> = HashMap::new();
        for n in self.nodes() {
            if !live.contains_key(&n) {
                continue;
            }
            let ins: Vec<NodeIndex> = self.inputs(n).iter().map(|i| map[i]).collect();
            let node = &self.graph[n];
            b.region = node.region;
            let new = match replace(&node.op, &ins) {
                Some(r) => r,
                None => b.add_shaped(node.op.clone(), &ins, node.shape.clone()),
            };
            map.insert(n, new);
        }
        for (name, n) in outputs {
            b.output(&name, map[&n]);
        }
        b.finish()
    }

    fn live(&self, roots: impl Iterator<Item = NodeIndex>) -> HashMap<NodeIndex, ()> {
        let mut live = HashMap::new();
        let mut stack: Vec<NodeIndex> = roots.collect();
        while let Some(n) = stack.pop() {
            if live.insert(n, ()).is_none() {
                stack.extend(self.graph.neighbors_directed(n, Direction::Incoming));
            }
        }
        live
    }

    /// The stable text form (see [`print`]).
    pub fn to_text(&self) -> String {
        print::to_text(self)
    }

    /// Read the text form back (see [`parse`]): `from_text(&g.to_text())` prints as `g` does.
    pub fn from_text(text: &str) -> Result<Graph, parse::ParseError> {
        parse::parse(text)
    }
}

/// Builds a [`Graph`], hash-consing nodes and inferring shapes. New nodes go into the current
/// [`Region`] (leaves into none: they belong to every region that reads them).
#[derive(Debug, Clone)]
pub struct GraphBuilder {
    graph: Graph,
    memo: HashMap<(Op, Vec<NodeIndex>), NodeIndex>,
    region: Region,
}

impl GraphBuilder {
    pub fn new(name: &str) -> Self {
        GraphBuilder {
            graph: Graph {
                name: name.to_string(),
                graph: StableDiGraph::new(),
                outputs: Vec::new(),
                pairs: Vec::new(),
            },
            memo: HashMap::new(),
            region: Region::Input,
        }
    }

    /// The region of the nodes created from now on.
    pub fn set_region(&mut self, region: Region) {
        self.region = region;
    }

    pub fn region(&self) -> Region {
        self.region
    }

    pub fn region_of(&self, n: NodeIndex) -> Region {
        self.graph.graph[n].region
    }

    /// Replace the declared pairs (copying them from a graph this one is rewritten from).
    pub fn set_pairs(&mut self, pairs: Vec<InversePair>) {
        self.graph.pairs = pairs;
    }

    /// Declare parameter `inverse` the learned inverse of parameter `forward` (once).
    pub fn declare_inverse_pair(&mut self, forward: &str, inverse: &str) {
        let pair = InversePair {
            forward: forward.to_string(),
            inverse: inverse.to_string(),
        };
        if !self.graph.pairs.contains(&pair) {
            self.graph.pairs.push(pair);
        }
    }

    pub fn shape(&self, n: NodeIndex) -> &Shape {
        &self.graph.graph[n].shape
    }

    pub fn op(&self, n: NodeIndex) -> &Op {
        &self.graph.graph[n].op
    }

    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// Add `op` applied to `inputs`; panics if the shapes do not fit, which is a compiler bug
    /// (user input is validated before lowering).
    pub fn add(&mut self, op: Op, inputs: &[NodeIndex]) -> NodeIndex {
        let shapes: Vec<Shape> = inputs.iter().map(|i| self.shape(*i).clone()).collect();
        let shape = match op.infer_shape(&shapes) {
            Ok(s) => s,
            Err(e) => panic!("snfc internal error: building {op}: {e}"),
        };
        self.add_shaped(op, inputs, shape)
    }

    /// Add a node whose shape is already known (copying a checked graph, or parsing one).
    pub fn add_shaped(&mut self, op: Op, inputs: &[NodeIndex], shape: Shape) -> NodeIndex {
        let key = (op, inputs.to_vec());
        if let Some(n) = self.memo.get(&key) {
            return *n;
        }
        let region = if key.0.arity() == 0 {
            Region::Input
        } else {
            self.region
        };
        let n = self.graph.graph.add_node(Node {
            op: key.0.clone(),
            shape,
            region,
        });
        for (pos, i) in inputs.iter().enumerate() {
            self.graph.graph.add_edge(*i, n, pos);
        }
        self.memo.insert(key, n);
        n
    }

    pub fn output(&mut self, name: &str, n: NodeIndex) {
        self.graph.outputs.push((name.to_string(), n));
    }

    pub fn finish(self) -> Graph {
        self.graph
    }

    // Small constructors that keep the lowering and autodiff code readable.

    pub fn input(&mut self, name: &str, shape: Shape) -> NodeIndex {
        self.add(
            Op::Input {
                name: name.into(),
                shape,
            },
            &[],
        )
    }
    pub fn param(&mut self, name: &str, shape: Shape) -> NodeIndex {
        self.add(
            Op::Param {
                name: name.into(),
                shape,
            },
            &[],
        )
    }
    pub fn constant(&mut self, v: f64) -> NodeIndex {
        self.add(Op::constant(v), &[])
    }
    pub fn matmul(&mut self, a: NodeIndex, b: NodeIndex) -> NodeIndex {
        self.add(Op::MatMul, &[a, b])
    }
    pub fn transpose(&mut self, a: NodeIndex) -> NodeIndex {
        self.add(Op::Transpose, &[a])
    }
    pub fn inverse(&mut self, a: NodeIndex) -> NodeIndex {
        self.add(Op::Inverse, &[a])
    }
    pub fn logdet(&mut self, a: NodeIndex) -> NodeIndex {
        self.add(Op::LogDet, &[a])
    }
    pub fn add2(&mut self, a: NodeIndex, b: NodeIndex) -> NodeIndex {
        self.add(Op::Add, &[a, b])
    }
    pub fn sub(&mut self, a: NodeIndex, b: NodeIndex) -> NodeIndex {
        self.add(Op::Sub, &[a, b])
    }
    /// Elementwise product; multiplying by the constant 1 returns the other operand, and two
    /// constants fold, so scale factors stay readable in the printed IR.
    pub fn mul(&mut self, a: NodeIndex, b: NodeIndex) -> NodeIndex {
        match (self.op(a).const_value(), self.op(b).const_value()) {
            (Some(x), Some(y)) => self.constant(x * y),
            (Some(1.0), _) => b,
            (_, Some(1.0)) => a,
            _ => self.add(Op::Mul, &[a, b]),
        }
    }
    pub fn scale(&mut self, a: NodeIndex, c: f64) -> NodeIndex {
        let k = self.constant(c);
        self.mul(a, k)
    }
    pub fn neg(&mut self, a: NodeIndex) -> NodeIndex {
        if let Some(x) = self.op(a).const_value() {
            return self.constant(-x);
        }
        self.add(Op::Neg, &[a])
    }
    pub fn unary(&mut self, u: Unary, a: NodeIndex) -> NodeIndex {
        self.add(Op::Unary(u), &[a])
    }
    /// Sum over all elements (`None`) or over one axis of a matrix.
    pub fn sum(&mut self, a: NodeIndex, axis: Option<usize>) -> NodeIndex {
        self.add(Op::Sum { axis }, &[a])
    }
    /// Broadcast to `to`, adding axis `new_axis` to a vector, or from a scalar when `None`.
    pub fn broadcast(&mut self, a: NodeIndex, to: Shape, new_axis: Option<usize>) -> NodeIndex {
        self.add(Op::Broadcast { to, new_axis }, &[a])
    }
    pub fn stop_grad(&mut self, a: NodeIndex) -> NodeIndex {
        self.add(Op::StopGrad, &[a])
    }
}
