//! E-graph rewriting (egg): the self-normalizing substitution and the algebra after it.
//!
//! Rules are data ([`RuleSpec`]: a name and two s-expression patterns). Two phases run on
//! separate e-graphs, because the substitution is an *approximation* (R ≈ W⁻¹) that must not be
//! mixed with exact identities such as `A A⁻¹ = I` (together they would prove `R W = I` and erase
//! the reconstruction error):
//!
//! 1. [`self_normalize`]: the rules of DESIGN.md §2, instantiated for each layer's pair (W, R).
//!    After `(inverse R) ⇒ W` the g-flow's forward pass is congruent to the f-flow's, so the
//!    e-graph merges them and the g-flow's backpropagated error *is* δ^f (paper A.1).
//! 2. [`optimize`]: exact algebra ([`ALGEBRA`]: associativity, transposes, signs, sum
//!    reordering, factoring, scalars), so that `−Wᵀ (δ hᵀ) Wᵀ` becomes `−(Wᵀ δ)(W h)ᵀ` — O(D²B)
//!    instead of O(D³), reusing backprop's `Wᵀδ` and the forward `W h` — and each gradient's
//!    sum of products sharing a factor becomes one GEMM.
//!
//! Extraction ([`DagExtraction`]) picks one node per e-class under the cost model of
//! [`op_cost`] (FLOPs + elements moved + launches), counting shared work once.

mod extract;
mod lang;

pub use extract::DagExtraction;
pub use lang::{op_cost, ShapeAnalysis, TensorNode, LAUNCH_COST};

use crate::ir::{Graph, GraphBuilder, Op};
use egg::{ConditionalApplier, EGraph, Id, Pattern, Rewrite, Runner, Var};
use petgraph::stable_graph::NodeIndex;
use serde::Serialize;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// When a rule may fire.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum When {
    Always,
    /// The pattern variable is bound to a scalar (shape `[]`).
    Scalar(&'static str),
    /// The matched term is a matrix. Keeps sum reordering to the gradient sums, where factoring
    /// needs it, and away from the long scalar sums of the loss (whose every reordering an AC
    /// rule would otherwise enumerate).
    Matrix,
}

/// A rewrite rule as data: `lhs ⇒ rhs` (and back when `bidirectional`), when `when` holds.
#[derive(Debug, Clone, Copy)]
pub struct RuleSpec {
    pub name: &'static str,
    pub lhs: &'static str,
    pub rhs: &'static str,
    pub bidirectional: bool,
    pub when: When,
}

const fn rule(name: &'static str, lhs: &'static str, rhs: &'static str) -> RuleSpec {
    RuleSpec {
        name,
        lhs,
        rhs,
        bidirectional: false,
        when: When::Always,
    }
}

const fn both(name: &'static str, lhs: &'static str, rhs: &'static str) -> RuleSpec {
    RuleSpec {
        name,
        lhs,
        rhs,
        bidirectional: true,
        when: When::Always,
    }
}

const fn when(r: RuleSpec, when: When) -> RuleSpec {
    RuleSpec { when, ..r }
}

/// DESIGN.md §2, for one forward/inverse pair: `?W` and `?R` are replaced by the two parameters.
pub const SUBSTITUTION: &[RuleSpec] = &[
    // eq. 10: the log-det gradient W⁻ᵀ becomes Rᵀ.
    rule(
        "snf-logdet-gradient",
        "(transpose (inverse ?W))",
        "(transpose ?R)",
    ),
    // eq. 11 and δ_z^g ≈ δ_z^f (A.1): the inverse of the learned inverse is the forward weight.
    rule("snf-inverse-of-inverse", "(inverse ?R)", "?W"),
];

/// Exact identities of matrix algebra, valid for any operands. Grouped by family: products
/// (associativity), transposes, signs, sums (commutativity, associativity), factoring
/// (distributivity of matmul over add/sub) and scalars.
pub const ALGEBRA: &[RuleSpec] = &[
    both(
        "matmul-assoc",
        "(matmul (matmul ?a ?b) ?c)",
        "(matmul ?a (matmul ?b ?c))",
    ),
    both(
        "transpose-of-product",
        "(transpose (matmul ?a ?b))",
        "(matmul (transpose ?b) (transpose ?a))",
    ),
    rule("transpose-involution", "(transpose (transpose ?a))", "?a"),
    rule("inverse-involution", "(inverse (inverse ?a))", "?a"),
    both(
        "neg-out-of-matmul-left",
        "(matmul (neg ?a) ?b)",
        "(neg (matmul ?a ?b))",
    ),
    both(
        "neg-out-of-matmul-right",
        "(matmul ?a (neg ?b))",
        "(neg (matmul ?a ?b))",
    ),
    rule("neg-involution", "(neg (neg ?a))", "?a"),
    when(
        both("sub-is-add-neg", "(sub ?a ?b)", "(add ?a (neg ?b))"),
        When::Matrix,
    ),
    when(
        rule("add-commute", "(add ?a ?b)", "(add ?b ?a)"),
        When::Matrix,
    ),
    when(
        both("add-assoc", "(add (add ?a ?b) ?c)", "(add ?a (add ?b ?c))"),
        When::Matrix,
    ),
    rule(
        "factor-right",
        "(add (matmul ?a ?c) (matmul ?b ?c))",
        "(matmul (add ?a ?b) ?c)",
    ),
    rule(
        "factor-left",
        "(add (matmul ?a ?b) (matmul ?a ?c))",
        "(matmul ?a (add ?b ?c))",
    ),
    rule(
        "factor-right-sub",
        "(sub (matmul ?a ?c) (matmul ?b ?c))",
        "(matmul (sub ?a ?b) ?c)",
    ),
    rule(
        "factor-left-sub",
        "(sub (matmul ?a ?b) (matmul ?a ?c))",
        "(matmul ?a (sub ?b ?c))",
    ),
    both(
        "transpose-of-sum",
        "(transpose (add ?a ?b))",
        "(add (transpose ?a) (transpose ?b))",
    ),
    when(
        rule("mul-commute", "(mul ?a ?b)", "(mul ?b ?a)"),
        When::Matrix,
    ),
    when(
        both(
            "scalar-into-matmul",
            "(mul ?k (matmul ?a ?b))",
            "(matmul (mul ?k ?a) ?b)",
        ),
        When::Scalar("?k"),
    ),
    when(
        both(
            "scalar-into-matmul-right",
            "(mul ?k (matmul ?a ?b))",
            "(matmul ?a (mul ?k ?b))",
        ),
        When::Scalar("?k"),
    ),
    when(
        both(
            "scalar-through-neg",
            "(mul ?k (neg ?a))",
            "(neg (mul ?k ?a))",
        ),
        When::Scalar("?k"),
    ),
];

type Cond =
    Box<dyn Fn(&mut EGraph<TensorNode, ShapeAnalysis>, Id, &egg::Subst) -> bool + Send + Sync>;

fn condition(when: When) -> Option<Cond> {
    match when {
        When::Always => None,
        When::Scalar(var) => {
            let v: Var = var
                .parse()
                .unwrap_or_else(|e| panic!("snfc internal error: {var}: {e:?}"));
            Some(Box::new(move |eg, _, subst| eg[subst[v]].data.is_empty()))
        }
        When::Matrix => Some(Box::new(|eg, id, _| eg[id].data.len() == 2)),
    }
}

/// Bounds on saturation; the run stops at whichever comes first.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub nodes: usize,
    pub iterations: usize,
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: 20_000,
            iterations: 30,
            time: Duration::from_secs(2),
        }
    }
}

/// What one saturation run did.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EGraphStats {
    pub phase: String,
    pub rules: usize,
    pub nodes: usize,
    pub classes: usize,
    pub iterations: usize,
    pub stop_reason: String,
    /// Total time of the phase; `extract_millis` of it went to extraction.
    pub millis: f64,
    pub extract_millis: f64,
}

type TEGraph = EGraph<TensorNode, ShapeAnalysis>;

fn compile_rules(
    specs: &[RuleSpec],
    subst: &[(&str, String)],
) -> Vec<Rewrite<TensorNode, ShapeAnalysis>> {
    let mut out = Vec::new();
    for s in specs {
        let inst = |p: &str| {
            let mut p = p.to_string();
            for (var, text) in subst {
                p = p.replace(var, text);
            }
            p
        };
        let (lhs, rhs) = (inst(s.lhs), inst(s.rhs));
        let suffix = subst
            .first()
            .map(|(_, t)| format!("[{t}]"))
            .unwrap_or_default();
        let parse = |p: &str| -> Pattern<TensorNode> {
            p.parse()
                .unwrap_or_else(|e| panic!("snfc internal error: rule {}: {p}: {e}", s.name))
        };
        let name = format!("{}{suffix}", s.name);
        let mut dirs = vec![(name.clone(), lhs.clone(), rhs.clone())];
        if s.bidirectional {
            dirs.push((format!("{name}-rev"), rhs, lhs));
        }
        for (name, from, to) in dirs {
            let rw = match condition(s.when) {
                None => Rewrite::new(name.clone(), parse(&from), parse(&to)),
                Some(condition) => Rewrite::new(
                    name.clone(),
                    parse(&from),
                    ConditionalApplier {
                        condition,
                        applier: parse(&to),
                    },
                ),
            };
            out.push(rw.unwrap_or_else(|e| panic!("snfc internal error: rule {name}: {e}")));
        }
    }
    out
}

/// Add a graph to an e-graph; returns the e-class of each output.
/// Also returns the input graph's own e-nodes, so extraction can fall back to the graph it was given.
/// Named output e-classes.
type Roots = Vec<(String, Id)>;

fn to_egraph(g: &Graph) -> (TEGraph, Roots, Vec<(Id, TensorNode)>) {
    let mut eg = TEGraph::default();
    let mut ids: HashMap<NodeIndex, Id> = HashMap::new();
    let mut original = Vec::new();
    for n in g.nodes() {
        let node = TensorNode {
            op: g.node(n).op.clone(),
            children: g.inputs(n).iter().map(|i| ids[i]).collect(),
        };
        let id = eg.add(node.clone());
        original.push((id, node));
        ids.insert(n, id);
    }
    let roots = g
        .outputs
        .iter()
        .map(|(name, n)| (name.clone(), ids[n]))
        .collect();
    (eg, roots, original)
}

/// Extract the cheapest graph for all outputs together: one best node per e-class, shared.
fn extract(
    eg: &TEGraph,
    roots: &[(String, Id)],
    original: &[(Id, TensorNode)],
    name: &str,
) -> Graph {
    let ids: Vec<Id> = roots.iter().map(|(_, id)| *id).collect();
    let extractor = DagExtraction::new(eg, &ids, original);
    let mut b = GraphBuilder::new(name);
    let mut built: HashMap<Id, NodeIndex> = HashMap::new();
    for (out, root) in roots {
        let n = build(eg, &extractor, *root, &mut b, &mut built);
        b.output(out, n);
    }
    b.finish()
}

fn build(
    eg: &TEGraph,
    ex: &DagExtraction,
    id: Id,
    b: &mut GraphBuilder,
    built: &mut HashMap<Id, NodeIndex>,
) -> NodeIndex {
    let id = eg.find(id);
    if let Some(n) = built.get(&id) {
        return *n;
    }
    let node = ex.node(eg, id).clone();
    let ins: Vec<NodeIndex> = node
        .children
        .iter()
        .map(|c| build(eg, ex, *c, b, built))
        .collect();
    let n = b.add(node.op, &ins);
    built.insert(id, n);
    n
}

fn saturate(
    g: &Graph,
    rules: &[Rewrite<TensorNode, ShapeAnalysis>],
    limits: Limits,
    phase: &str,
) -> (Graph, EGraphStats) {
    let start = Instant::now();
    let (eg, roots, original) = to_egraph(g);
    let runner = Runner::default()
        .with_egraph(eg)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .run(rules);
    let extract_start = Instant::now();
    let out = extract(&runner.egraph, &roots, &original, &g.name);
    let extract_millis = extract_start.elapsed().as_secs_f64() * 1e3;
    let stop_reason = match &runner.stop_reason {
        Some(egg::StopReason::Saturated) => "saturated".to_string(),
        Some(egg::StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(egg::StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(egg::StopReason::TimeLimit(s)) => format!("time limit ({s:.1} s)"),
        Some(egg::StopReason::Other(s)) => s.clone(),
        None => "not run".to_string(),
    };
    let stats = EGraphStats {
        phase: phase.to_string(),
        rules: rules.len(),
        nodes: runner.egraph.total_size(),
        classes: runner.egraph.number_of_classes(),
        iterations: runner.iterations.len(),
        stop_reason,
        millis: start.elapsed().as_secs_f64() * 1e3,
        extract_millis,
    };
    (out, stats)
}

/// The (W, R) parameter pairs of a graph: `layers.i.weight` with `layers.i.weight_inv`.
pub fn snf_pairs(g: &Graph) -> Vec<(Op, Op)> {
    let params: Vec<Op> = g
        .nodes()
        .into_iter()
        .map(|n| g.node(n).op.clone())
        .filter(|op| matches!(op, Op::Param { .. }))
        .collect();
    let mut pairs = Vec::new();
    for w in &params {
        if let Op::Param { name, .. } = w {
            if let Some(prefix) = name.strip_suffix(".weight") {
                let inv = format!("{prefix}.weight_inv");
                if let Some(r) = params
                    .iter()
                    .find(|p| matches!(p, Op::Param { name, .. } if *name == inv))
                {
                    pairs.push((w.clone(), r.clone()));
                }
            }
        }
    }
    pairs
}

/// Phase 1: apply the self-normalizing substitution for every (W, R) pair.
pub fn self_normalize(g: &Graph, limits: Limits) -> (Graph, EGraphStats) {
    let mut rules = Vec::new();
    for (w, r) in snf_pairs(g) {
        rules.extend(compile_rules(
            SUBSTITUTION,
            &[("?W", w.to_string()), ("?R", r.to_string())],
        ));
    }
    saturate(g, &rules, limits, "self_normalize")
}

/// Phase 2: exact algebra, extracted by FLOP cost.
pub fn optimize(g: &Graph, limits: Limits) -> (Graph, EGraphStats) {
    saturate(g, &compile_rules(ALGEBRA, &[]), limits, "optimize")
}

/// The number of nodes of each kind that matter for cost, for reports and tests.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OpCounts {
    pub gemm: usize,
    pub inverse: usize,
    pub logdet: usize,
    /// Kernel launches per run after elementwise fusion grouping ([`crate::fuse`]).
    pub kernels: usize,
    pub nodes: usize,
    /// Floating-point operations per run (one training step at the compiled batch size).
    pub flops: f64,
}

pub fn op_counts(g: &Graph) -> OpCounts {
    OpCounts {
        gemm: g.count(|o| *o == Op::MatMul),
        inverse: g.count(|o| *o == Op::Inverse),
        logdet: g.count(|o| *o == Op::LogDet),
        kernels: crate::fuse::kernel_count(g),
        nodes: g.node_count(),
        flops: lang::graph_flops(g),
    }
}
