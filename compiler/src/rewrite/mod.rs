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
//!
//! `rules.rs` holds the rules as data, `instantiate.rs` makes them egg rewrites for a graph,
//! `lang.rs` the e-graph language and its shape analysis, `extract.rs` the extraction; this file
//! runs the two phases and counts what they produced.

mod extract;
mod holes;
mod instantiate;
mod lang;
mod rules;

pub use extract::{DagExtraction, PathExtraction};
pub use holes::{conv_rule_instance, spline_rule_instance};
use holes::{conv_rules, pair_rules, spline_rules};
use instantiate::*;
pub use lang::{op_cost, ShapeAnalysis, TensorNode, LAUNCH_COST};
pub use rules::*;

use crate::ir::{Graph, GraphBuilder, Op, Region, Shape, SplinePart};
use egg::{
    Applier, ConditionalApplier, EGraph, Id, Pattern, Rewrite, Runner, SearchMatches, Searcher,
    Subst, Var,
};
use petgraph::stable_graph::NodeIndex;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Bounds on one saturation run. Reaching any of them is an error ([`RewriteError::Limit`]),
/// never a result: a phase that stops early would hand back a different algorithm than the spec
/// asked for (an exact O(D³) step under a self-normalizing spec, say).
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Limits {
    /// E-nodes of one region's e-graph (the substitution phase, which runs on the whole graph
    /// and only ever shrinks it, gets this many on top of the graph's own nodes).
    pub nodes: usize,
    pub iterations: usize,
    /// A safety net against a runaway rule set; well above what any region needs.
    pub time: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            nodes: 20_000,
            iterations: 30,
            time: Duration::from_secs(30),
        }
    }
}

/// Why rewriting failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum RewriteError {
    #[error(
        "rewrite phase {phase}: the e-graph of region {region} stopped on its {reason} before \
         saturating (limits: {} e-nodes, {} iterations, {} s per region); snfc does not run a \
         step it has not fully rewritten",
        limits.nodes, limits.iterations, limits.time.as_secs_f64()
    )]
    Limit {
        phase: String,
        region: String,
        reason: String,
        limits: Limits,
    },
    #[error("snfc internal error in rewrite phase {phase}: {what}")]
    Internal { phase: String, what: String },
    /// A pass's post-condition failed ([`crate::verify`]): the step is not what the spec asks.
    #[error("compile error {0}")]
    Postcondition(#[from] crate::verify::Violation),
}

/// What one rewrite phase did. `optimize` saturates each region of the graph on its own; its
/// figures are the largest region's (nodes, classes, iterations) and totals (times).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EGraphStats {
    pub phase: String,
    pub rules: usize,
    pub nodes: usize,
    pub classes: usize,
    pub iterations: usize,
    pub stop_reason: String,
    /// Regions saturated, and how many of them were distinct problems (identical layers are
    /// one problem, solved once).
    pub regions: usize,
    pub distinct_regions: usize,
    /// Total time of the phase; `extract_millis` of it went to extraction.
    pub millis: f64,
    pub extract_millis: f64,
    /// Extractions that stopped on a work budget (`layers.3: branch_and_bound`): their result
    /// is the cheapest form found, not proven the cheapest. Empty when every search finished.
    pub extraction_budgets_exhausted: Vec<String>,
}

type TEGraph = EGraph<TensorNode, ShapeAnalysis>;
type TRewrite = Rewrite<TensorNode, ShapeAnalysis>;

fn stop_reason_text(reason: &Option<egg::StopReason>) -> String {
    match reason {
        Some(egg::StopReason::Saturated) => "saturated".to_string(),
        Some(egg::StopReason::IterationLimit(n)) => format!("iteration limit ({n})"),
        Some(egg::StopReason::NodeLimit(n)) => format!("node limit ({n})"),
        Some(egg::StopReason::TimeLimit(s)) => format!("time limit ({s:.1} s)"),
        Some(egg::StopReason::Other(s)) => s.clone(),
        None => "not run".to_string(),
    }
}

fn run_rules(
    eg: TEGraph,
    rules: &[TRewrite],
    limits: Limits,
) -> egg::Runner<TensorNode, ShapeAnalysis> {
    Runner::default()
        .with_egraph(eg)
        .with_node_limit(limits.nodes)
        .with_iter_limit(limits.iterations)
        .with_time_limit(limits.time)
        .run(rules)
}

/// Phase 1: the self-normalizing substitution for every declared pair, on the whole graph (the
/// g-flow merges into the f-flow across all layers). The rules only ever shrink the graph, so
/// this phase is linear in depth; a limit reached is still an error.
pub fn self_normalize(g: &Graph, limits: Limits) -> Result<(Graph, EGraphStats), RewriteError> {
    let phase = "self_normalize";
    let start = Instant::now();
    // A pair that named no parameter would leave its layer unsubstituted without a word.
    crate::verify::pairs_resolve(g, "the graph given to self_normalize")?;
    let mut rules = pair_rules(SUBSTITUTION, g);
    rules.extend(pair_rules(CONV_SUBSTITUTION, g));
    rules.extend(conv_rules(CONV_MERGE));
    let mut eg = TEGraph::default();
    let mut ids: HashMap<NodeIndex, Id> = HashMap::new();
    let mut regions: HashMap<Id, Region> = HashMap::new();
    for n in g.nodes() {
        let node = TensorNode {
            op: g.node(n).op.clone(),
            children: g.inputs(n).iter().map(|i| ids[i]).collect(),
        };
        let id = eg.add(node);
        ids.insert(n, id);
        let region = regions.entry(id).or_insert(g.node(n).region);
        *region = (*region).min(g.node(n).region);
    }
    let initial = eg.total_size();
    let runner = run_rules(
        eg,
        &rules,
        Limits {
            nodes: initial + limits.nodes,
            ..limits
        },
    );
    check_saturated(&runner, phase, "(whole graph)", limits)?;
    let eg = &runner.egraph;
    let extract_start = Instant::now();
    let ex = PathExtraction::new(eg);
    let mut class_region: HashMap<Id, Region> = HashMap::new();
    for (id, r) in regions {
        let e = class_region.entry(eg.find(id)).or_insert(r);
        *e = (*e).min(r);
    }
    let mut b = GraphBuilder::new(&g.name);
    b.set_pairs(g.pairs.clone());
    let mut built: HashMap<Id, NodeIndex> = HashMap::new();
    for (name, n) in &g.outputs {
        let root = eg.find(ids[n]);
        let out = build_extracted(
            eg,
            root,
            &mut b,
            &mut built,
            |id| ex.node(id),
            |id, parent| class_region.get(&id).copied().unwrap_or(parent),
        )
        .map_err(|what| RewriteError::Internal {
            phase: phase.into(),
            what,
        })?;
        b.output(name, out);
    }
    let extract_millis = extract_start.elapsed().as_secs_f64() * 1e3;
    let stats = EGraphStats {
        phase: phase.into(),
        rules: rules.len(),
        nodes: runner.egraph.total_size(),
        classes: runner.egraph.number_of_classes(),
        iterations: runner.iterations.len(),
        stop_reason: stop_reason_text(&runner.stop_reason),
        regions: 1,
        distinct_regions: 1,
        millis: start.elapsed().as_secs_f64() * 1e3,
        extract_millis,
        extraction_budgets_exhausted: Vec::new(),
    };
    Ok((b.finish(), stats))
}

fn check_saturated(
    runner: &egg::Runner<TensorNode, ShapeAnalysis>,
    phase: &str,
    region: &str,
    limits: Limits,
) -> Result<(), RewriteError> {
    match &runner.stop_reason {
        Some(egg::StopReason::Saturated) => Ok(()),
        other => Err(RewriteError::Limit {
            phase: phase.into(),
            region: region.into(),
            reason: stop_reason_text(other),
            limits,
        }),
    }
}

/// Add the extracted term of e-class `root` to `b` (post-order, without recursion: a deep
/// flow's graph is thousands of nodes deep). `region(class, parent_region)` gives each new
/// node's region.
fn build_extracted<'a>(
    eg: &TEGraph,
    root: Id,
    b: &mut GraphBuilder,
    built: &mut HashMap<Id, NodeIndex>,
    choose: impl Fn(Id) -> Result<&'a TensorNode, String>,
    region: impl Fn(Id, Region) -> Region,
) -> Result<NodeIndex, String> {
    let root = eg.find(root);
    let mut stack: Vec<(Id, Region, bool)> = vec![(root, region(root, Region::Input), false)];
    while let Some((id, r, expanded)) = stack.pop() {
        if built.contains_key(&id) {
            continue;
        }
        let node = choose(id)?;
        if expanded {
            let ins: Vec<NodeIndex> = node
                .children
                .iter()
                .map(|c| built.get(&eg.find(*c)).copied())
                .collect::<Option<_>>()
                .ok_or_else(|| format!("e-class {id} extracted before its operands (a cycle)"))?;
            b.set_region(r);
            let shape = eg[id].data.clone();
            built.insert(id, b.add_shaped(node.op.clone(), &ins, shape));
        } else {
            stack.push((id, r, true));
            for c in node.children.iter().rev() {
                let c = eg.find(*c);
                if !built.contains_key(&c) {
                    stack.push((c, region(c, r), false));
                }
            }
        }
    }
    Ok(built[&root])
}

/// One region's rewrite problem in canonical form: its nodes in topological order, each operand
/// either another node of the problem or a *leaf* — a parameter, input or node of another region,
/// numbered in order of first use (constants stay constants). Identical layers give identical
/// problems, solved once.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Problem {
    /// (op, operands); operands index `nodes`. Leaves are `Op::Input { name: "$j" }`.
    nodes: Vec<(Op, Vec<usize>)>,
    roots: Vec<usize>,
}

/// The extracted form of a [`Problem`]: nodes in topological order (leaves `$j` as in the
/// problem), and the node computing each root.
#[derive(Debug)]
struct Solution {
    nodes: Vec<(Op, Vec<usize>)>,
    roots: Vec<usize>,
    stats: EGraphStats,
}

fn leaf_index(op: &Op) -> Option<usize> {
    match op {
        Op::Input { name, .. } => name.strip_prefix('$').and_then(|j| j.parse().ok()),
        _ => None,
    }
}

fn solve(
    p: &Problem,
    rules: &[TRewrite],
    limits: Limits,
    region: Region,
) -> Result<Solution, RewriteError> {
    let phase = "optimize";
    let start = Instant::now();
    let mut eg = TEGraph::default();
    let mut ids = Vec::with_capacity(p.nodes.len());
    let mut original = Vec::with_capacity(p.nodes.len());
    for (op, ins) in &p.nodes {
        let node = TensorNode {
            op: op.clone(),
            children: ins.iter().map(|i| ids[*i]).collect(),
        };
        let id = eg.add(node.clone());
        original.push((id, node));
        ids.push(id);
    }
    let runner = run_rules(eg, rules, limits);
    check_saturated(&runner, phase, &region.to_string(), limits)?;
    let eg = &runner.egraph;
    let extract_start = Instant::now();
    let roots: Vec<Id> = p.roots.iter().map(|r| eg.find(ids[*r])).collect();
    let ex = DagExtraction::new(eg, &roots, &original);
    // Number the extracted nodes through a scratch builder-free post-order.
    let mut index: HashMap<Id, usize> = HashMap::new();
    let mut nodes: Vec<(Op, Vec<usize>)> = Vec::new();
    let mut out_roots = Vec::with_capacity(roots.len());
    for &root in &roots {
        let mut stack = vec![(root, false)];
        while let Some((id, expanded)) = stack.pop() {
            if index.contains_key(&id) {
                continue;
            }
            let node = ex.node(eg, id).map_err(|what| RewriteError::Internal {
                phase: phase.into(),
                what,
            })?;
            if expanded {
                let ins: Vec<usize> = node
                    .children
                    .iter()
                    .map(|c| index.get(&eg.find(*c)).copied())
                    .collect::<Option<_>>()
                    .ok_or_else(|| RewriteError::Internal {
                        phase: phase.into(),
                        what: format!("region {region}: a cycle in the extracted graph"),
                    })?;
                index.insert(id, nodes.len());
                nodes.push((node.op.clone(), ins));
            } else {
                stack.push((id, true));
                for c in node.children.iter().rev() {
                    stack.push((eg.find(*c), false));
                }
            }
        }
        out_roots.push(index[&root]);
    }
    let stats = EGraphStats {
        phase: phase.into(),
        rules: rules.len(),
        nodes: eg.total_size(),
        classes: eg.number_of_classes(),
        iterations: runner.iterations.len(),
        stop_reason: stop_reason_text(&runner.stop_reason),
        regions: 1,
        distinct_regions: 1,
        millis: start.elapsed().as_secs_f64() * 1e3,
        extract_millis: extract_start.elapsed().as_secs_f64() * 1e3,
        extraction_budgets_exhausted: ex
            .budgets_exhausted
            .iter()
            .map(|search| format!("{region}: {search}"))
            .collect(),
    };
    Ok(Solution {
        nodes,
        roots: out_roots,
        stats,
    })
}

/// Phase 2: exact algebra, saturated region by region (DESIGN.md §7) and extracted by cost.
/// A region sees the values of other regions as opaque leaves; its *roots* are the values other
/// regions or the graph's outputs use. Work grows linearly with depth, and identical layers are
/// one problem, solved once.
pub fn optimize(g: &Graph, limits: Limits) -> Result<(Graph, EGraphStats), RewriteError> {
    let phase = "optimize";
    let start = Instant::now();
    let mut rules = compile_rules(ALGEBRA);
    rules.extend(conv_rules(CONV_OPERATOR));
    rules.extend(conv_rules(CONV_ADJOINT));
    rules.extend(conv_rules(CONV_POINTWISE));
    rules.extend(spline_rules(SPLINE));
    let order = g.nodes();
    let is_leaf = |n: NodeIndex| g.node(n).op.arity() == 0;
    // Roots: values used outside their region, and outputs.
    let mut is_root: HashMap<NodeIndex, bool> = HashMap::new();
    for &n in &order {
        for i in g.inputs(n) {
            if !is_leaf(i) && g.node(i).region != g.node(n).region {
                is_root.insert(i, true);
            }
        }
    }
    for (_, n) in &g.outputs {
        if !is_leaf(*n) {
            is_root.insert(*n, true);
        }
    }
    let mut members: BTreeMap<Region, Vec<NodeIndex>> = BTreeMap::new();
    for &n in &order {
        if !is_leaf(n) {
            members.entry(g.node(n).region).or_default().push(n);
        }
    }
    // Each region: its canonical problem, its leaves (the nodes behind `$j`), and the position
    // of each root in the problem's root list.
    struct RegionWork {
        solution: Rc<Solution>,
        leaves: Vec<NodeIndex>,
        root_pos: HashMap<NodeIndex, usize>,
        built: HashMap<usize, NodeIndex>,
    }
    let mut solved: HashMap<Problem, Rc<Solution>> = HashMap::new();
    let mut work: HashMap<Region, RegionWork> = HashMap::new();
    let mut total = EGraphStats {
        phase: phase.into(),
        rules: rules.len(),
        nodes: 0,
        classes: 0,
        iterations: 0,
        // Every region saturated (a region that stops on a limit is an error), so this is
        // what each of them reported.
        stop_reason: String::new(),
        regions: members.len(),
        distinct_regions: 0,
        millis: 0.0,
        extract_millis: 0.0,
        extraction_budgets_exhausted: Vec::new(),
    };
    let mut stop_reasons = BTreeSet::new();
    for (region, nodes) in &members {
        let mut local: HashMap<NodeIndex, usize> = HashMap::new();
        let mut leaves: Vec<NodeIndex> = Vec::new();
        let mut p = Problem {
            nodes: Vec::new(),
            roots: Vec::new(),
        };
        let mut root_pos = HashMap::new();
        for &n in nodes {
            let mut ins = Vec::new();
            for i in g.inputs(n) {
                if let Some(&k) = local.get(&i) {
                    ins.push(k);
                    continue;
                }
                let op = match &g.node(i).op {
                    c @ Op::Const { .. } => c.clone(),
                    _ => {
                        leaves.push(i);
                        Op::Input {
                            name: format!("${}", leaves.len() - 1),
                            shape: g.node(i).shape.clone(),
                        }
                    }
                };
                local.insert(i, p.nodes.len());
                ins.push(p.nodes.len());
                p.nodes.push((op, vec![]));
            }
            local.insert(n, p.nodes.len());
            p.nodes.push((g.node(n).op.clone(), ins));
            if is_root.contains_key(&n) {
                root_pos.insert(n, p.roots.len());
                p.roots.push(p.nodes.len() - 1);
            }
        }
        let solution = match solved.get(&p) {
            Some(s) => s.clone(),
            None => {
                let s = Rc::new(solve(&p, &rules, limits, *region)?);
                let st = &s.stats;
                total.nodes = total.nodes.max(st.nodes);
                total.classes = total.classes.max(st.classes);
                total.iterations = total.iterations.max(st.iterations);
                total.extract_millis += st.extract_millis;
                total.distinct_regions += 1;
                stop_reasons.insert(st.stop_reason.clone());
                total
                    .extraction_budgets_exhausted
                    .extend(st.extraction_budgets_exhausted.iter().cloned());
                solved.insert(p, s.clone());
                s
            }
        };
        work.insert(
            *region,
            RegionWork {
                solution,
                leaves,
                root_pos,
                built: HashMap::new(),
            },
        );
    }
    // Assemble: walk the original nodes in topological order; each root is built from its
    // region's solution, whose leaves are earlier nodes (rewrites keep every term's leaves), so
    // they are already resolved.
    let mut b = GraphBuilder::new(&g.name);
    b.set_pairs(g.pairs.clone());
    let mut resolved: HashMap<NodeIndex, NodeIndex> = HashMap::new();
    for &n in &order {
        let node = g.node(n);
        if is_leaf(n) {
            resolved.insert(n, b.add_shaped(node.op.clone(), &[], node.shape.clone()));
            continue;
        }
        let Some(w) = work.get_mut(&node.region) else {
            continue;
        };
        let Some(&pos) = w.root_pos.get(&n) else {
            continue;
        };
        b.set_region(node.region);
        let sol = w.solution.clone();
        let target = sol.roots[pos];
        let mut stack = vec![(target, false)];
        while let Some((k, expanded)) = stack.pop() {
            if w.built.contains_key(&k) {
                continue;
            }
            let (op, ins) = &sol.nodes[k];
            if let Some(j) = leaf_index(op) {
                let leaf = w.leaves[j];
                let Some(&r) = resolved.get(&leaf) else {
                    return Err(RewriteError::Internal {
                        phase: phase.into(),
                        what: format!(
                            "region {}: a rewritten value depends on a value computed after it",
                            node.region
                        ),
                    });
                };
                w.built.insert(k, r);
            } else if expanded || ins.is_empty() {
                let args: Vec<NodeIndex> = ins.iter().map(|i| w.built[i]).collect();
                w.built.insert(k, b.add(op.clone(), &args));
            } else {
                stack.push((k, true));
                stack.extend(ins.iter().rev().map(|i| (*i, false)));
            }
        }
        resolved.insert(n, w.built[&target]);
    }
    for (name, n) in &g.outputs {
        b.output(name, resolved[n]);
    }
    total.millis = start.elapsed().as_secs_f64() * 1e3;
    total.stop_reason = if stop_reasons.is_empty() {
        "no region to rewrite".to_string()
    } else {
        stop_reasons.into_iter().collect::<Vec<_>>().join(", ")
    };
    Ok((b.finish(), total))
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
