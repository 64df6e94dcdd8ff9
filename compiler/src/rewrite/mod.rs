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

pub use extract::{DagExtraction, PathExtraction};
pub use lang::{op_cost, ShapeAnalysis, TensorNode, LAUNCH_COST};

use crate::ir::{Graph, GraphBuilder, Op, Region, Shape, SplinePart};
use egg::{Applier, ConditionalApplier, EGraph, Id, Pattern, Rewrite, Runner, Var};
use petgraph::stable_graph::NodeIndex;
use serde::Serialize;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::rc::Rc;
use std::sync::Arc;
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
    /// Every listed pattern variable is bound to a matrix.
    Matrices(&'static [&'static str]),
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

/// A rule whose right-hand side names the declared learned inverse of a matched parameter:
/// `?R` is bound to the partner of the parameter in `?W`'s e-class, from the graph's
/// [`InversePair`]s (both directions: R ≈ W⁻¹ and W ≈ R⁻¹).
#[derive(Debug, Clone, Copy)]
pub struct PairRule {
    pub name: &'static str,
    pub lhs: &'static str,
    pub rhs: &'static str,
}

/// DESIGN.md §2: the self-normalizing substitution, one rule for every declared pair. With
/// `inverse(W) ⇒ R`, the log-det gradient `W⁻ᵀ` becomes `Rᵀ` (eq. 10) by congruence; with
/// `inverse(R) ⇒ W`, the g-flow's forward pass becomes the f-flow's (eq. 11), so the e-graph
/// merges them and the g-flow's backpropagated error *is* δ^f (A.1).
pub const SUBSTITUTION: &[PairRule] = &[PairRule {
    name: "snf-inverse-of-pair",
    lhs: "(inverse ?W)",
    rhs: "?R",
}];

/// The substitution for convolutions: `inverse(op(W)) ⇒ op(R)` with `op` the Toeplitz matrix
/// of a conv (placeholders as in [`CONV_OPERATOR`]).
pub const CONV_SUBSTITUTION: &[PairRule] = &[PairRule {
    name: "snf-inverse-of-pair-conv",
    lhs: "(inverse ({T} ?W))",
    rhs: "({T} ?R)",
}];

/// A convolution identity, written with placeholders that [`conv_rules`] fills in for each
/// convolution of the graph: `{T}` its Toeplitz op (`toeplitz:HxW`), `{ADJ}` the adjoint
/// (`toeplitz_adjoint:HxW:K`), `{IMG}` / `{FLAT}` the reshapes between the flat batch
/// `[C·H·W, B]` and the image batch `[C, H, W, B]`, `{KG}` the kernel gradient
/// (`conv_kernel_grad:K`), `{MULT}` the multiplicity (`multiplicity:HxW`), `{MAT}` / `{KER}`
/// the reshapes between a 1×1 kernel `[C, C, 1, 1]` and its `C × C` matrix, `{HW}` the constant
/// H·W. `flat` and `image` name the variables that must have those shapes (so the reshapes are
/// well-formed), `kernel` the variables that must be this conv's kernel shape, `scalar` the
/// scalar ones; a `pointwise` rule holds for 1×1 convolutions only.
#[derive(Debug, Clone, Copy)]
pub struct ConvRule {
    pub name: &'static str,
    pub lhs: &'static str,
    pub rhs: &'static str,
    pub flat: &'static [&'static str],
    pub image: &'static [&'static str],
    pub kernel: &'static [&'static str],
    pub scalar: &'static [&'static str],
    pub pointwise: bool,
}

const fn conv_rule(name: &'static str, lhs: &'static str, rhs: &'static str) -> ConvRule {
    ConvRule {
        name,
        lhs,
        rhs,
        flat: &[],
        image: &[],
        kernel: &[],
        scalar: &[],
        pointwise: false,
    }
}

/// DESIGN.md §7: a convolution is a linear operator. These identities turn its dense Toeplitz
/// form (which the exact graph and the substitution produce) back into convolutions; they run
/// with the substitution, so the g-flow's layers merge into the f-flow's, and with the algebra.
pub const CONV_OPERATOR: &[ConvRule] = &[
    // T(k) x = conv(x, k) on each example.
    ConvRule {
        flat: &["?x"],
        kernel: &["?K"],
        ..conv_rule(
            "toeplitz-is-conv",
            "(matmul ({T} ?K) ?x)",
            "({FLAT} (conv2d ({IMG} ?x) ?K))",
        )
    },
    // T(k)ᵀ = T(flip_kernel(k)).
    conv_rule(
        "transpose-of-toeplitz",
        "(transpose ({T} ?K))",
        "({T} (flip_kernel ?K))",
    ),
    conv_rule("flip-involution", "(flip_kernel (flip_kernel ?K))", "?K"),
    ConvRule {
        image: &["?y"],
        ..conv_rule("reshape-round-trip-image", "({IMG} ({FLAT} ?y))", "?y")
    },
    ConvRule {
        flat: &["?x"],
        ..conv_rule("reshape-round-trip-flat", "({FLAT} ({IMG} ?x))", "?x")
    },
];

/// The operator identities of the substitution phase: each convolution of the graph gains its
/// dense form `T(k) x` (the reverse of `toeplitz-is-conv`), so the g-flow's `T(R)⁻¹ x`, which
/// the substitution makes `T(W) x`, merges into the f-flow's convolution of the same `x`.
/// Products that are not convolutions (a gradient's `T(W)ᵀ (δ hᵀ)`) stay products here: turned
/// into convolutions this early, they would hide from the algebra phase the reassociation to
/// `(T(W)ᵀ δ)(T(W) h)ᵀ` — and at a batch equal to C·H·W a `[C·H·W, C·H·W]` product has the
/// shape of a batch.
pub const CONV_MERGE: &[ConvRule] = &[
    ConvRule {
        flat: &["?x"],
        kernel: &["?K"],
        ..conv_rule(
            "conv-is-toeplitz",
            "({FLAT} (conv2d ({IMG} ?x) ?K))",
            "(matmul ({T} ?K) ?x)",
        )
    },
    conv_rule(
        "transpose-of-toeplitz",
        "(transpose ({T} ?K))",
        "({T} (flip_kernel ?K))",
    ),
    conv_rule("flip-involution", "(flip_kernel (flip_kernel ?K))", "?K"),
];

/// The 1×1 convolution's Toeplitz matrix is block diagonal, I_{H·W} ⊗ W (in the (c, h, w)
/// order, a permutation of it): ln|det T| = H·W·ln|det W| and T⁻¹ = T(W⁻¹) — C × C work, not
/// (C·H·W)³ (Glow's invertible 1×1 convolution; the exact baseline's step and log-dets). With
/// the algebra only (region by region): in the global substitution phase they would only grow
/// the e-graph of a self-normalizing step, whose inverses the substitution removes anyway.
pub const CONV_POINTWISE: &[ConvRule] = &[
    ConvRule {
        kernel: &["?K"],
        pointwise: true,
        ..conv_rule(
            "logdet-of-pointwise-conv",
            "(logdet ({T} ?K))",
            "(mul {HW} (logdet ({MAT} ?K)))",
        )
    },
    ConvRule {
        kernel: &["?K"],
        pointwise: true,
        ..conv_rule(
            "inverse-of-pointwise-conv",
            "(inverse ({T} ?K))",
            "({T} ({KER} (inverse ({MAT} ?K))))",
        )
    },
];

/// The adjoint side (paper A.2): the kernel gradient of a rank-B outer product is a
/// convolution's kernel gradient, and `adjoint(T(k)) = k ⊙ m`.
pub const CONV_ADJOINT: &[ConvRule] = &[
    ConvRule {
        flat: &["?a", "?c"],
        ..conv_rule(
            "adjoint-of-outer-product",
            "({ADJ} (matmul ?a (transpose ?c)))",
            "({KG} ({IMG} ?a) ({IMG} ?c))",
        )
    },
    conv_rule("adjoint-of-toeplitz", "({ADJ} ({T} ?K))", "({MULT} ?K)"),
    ConvRule {
        scalar: &["?s"],
        ..conv_rule(
            "scalar-out-of-adjoint",
            "({ADJ} (mul ?s ?A))",
            "(mul ?s ({ADJ} ?A))",
        )
    },
    conv_rule("neg-out-of-adjoint", "({ADJ} (neg ?A))", "(neg ({ADJ} ?A))"),
    conv_rule(
        "adjoint-of-sum",
        "({ADJ} (add ?A ?B))",
        "(add ({ADJ} ?A) ({ADJ} ?B))",
    ),
    conv_rule(
        "adjoint-of-difference",
        "({ADJ} (sub ?A ?B))",
        "(sub ({ADJ} ?A) ({ADJ} ?B))",
    ),
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
    // Only for matrix summands: `(transpose (add A 1.0))` has a scalar summand, whose
    // transpose would be ill-shaped.
    when(
        both(
            "transpose-of-sum",
            "(transpose (add ?a ?b))",
            "(add (transpose ?a) (transpose ?b))",
        ),
        When::Matrices(&["?a", "?b"]),
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

fn parse_var(var: &str) -> Var {
    var.parse()
        .unwrap_or_else(|e| panic!("snfc internal error: {var}: {e:?}"))
}

type Cond =
    Box<dyn Fn(&mut EGraph<TensorNode, ShapeAnalysis>, Id, &egg::Subst) -> bool + Send + Sync>;

fn condition(when: When) -> Option<Cond> {
    match when {
        When::Always => None,
        When::Scalar(var) => {
            let v = parse_var(var);
            Some(Box::new(move |eg, _, subst| eg[subst[v]].data.is_empty()))
        }
        When::Matrix => Some(Box::new(|eg, id, _| eg[id].data.len() == 2)),
        When::Matrices(vars) => {
            let vars: Vec<Var> = vars.iter().map(|v| parse_var(v)).collect();
            Some(Box::new(move |eg, _, subst| {
                vars.iter().all(|v| eg[subst[*v]].data.len() == 2)
            }))
        }
    }
}

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

fn parse_pattern(p: &str, rule: &str) -> Pattern<TensorNode> {
    p.parse()
        .unwrap_or_else(|e| panic!("snfc internal error: rule {rule}: {p}: {e}"))
}

fn compile_rules(specs: &[RuleSpec]) -> Vec<TRewrite> {
    let mut out = Vec::new();
    for s in specs {
        let mut dirs = vec![(s.name.to_string(), s.lhs, s.rhs)];
        if s.bidirectional {
            dirs.push((format!("{}-rev", s.name), s.rhs, s.lhs));
        }
        for (name, from, to) in dirs {
            let (from, to) = (parse_pattern(from, &name), parse_pattern(to, &name));
            let rw = match condition(s.when) {
                None => Rewrite::new(name.clone(), from, to),
                Some(condition) => Rewrite::new(
                    name.clone(),
                    from,
                    ConditionalApplier {
                        condition,
                        applier: to,
                    },
                ),
            };
            out.push(rw.unwrap_or_else(|e| panic!("snfc internal error: rule {name}: {e}")));
        }
    }
    out
}

/// Applies a [`PairRule`]'s right-hand side with `?R` bound to the declared partner of the
/// parameter in `?W`'s e-class; does nothing where `?W` holds no paired parameter.
struct PairApplier {
    w: Var,
    r: Var,
    rhs: Pattern<TensorNode>,
    partners: Arc<HashMap<Op, Op>>,
}

impl Applier<TensorNode, ShapeAnalysis> for PairApplier {
    fn apply_one(
        &self,
        eg: &mut TEGraph,
        eclass: Id,
        subst: &egg::Subst,
        searcher_ast: Option<&egg::PatternAst<TensorNode>>,
        rule_name: egg::Symbol,
    ) -> Vec<Id> {
        let partner = eg[subst[self.w]]
            .nodes
            .iter()
            .find_map(|n| self.partners.get(&n.op).cloned());
        let Some(op) = partner else {
            return vec![];
        };
        let r = eg.add(TensorNode {
            op,
            children: vec![],
        });
        let mut subst = subst.clone();
        subst.insert(self.r, r);
        self.rhs
            .apply_one(eg, eclass, &subst, searcher_ast, rule_name)
    }
}

/// A spline identity, with placeholders that [`spline_rules`] fills in for each spline op of the
/// graph and each operand: `{VALUE}`, `{LOGDET}` and `{BOTH}` are its `spline_grad` ops of one
/// `wrt` for the value's cotangent, the log-det's, and both at once.
pub const SPLINE: &[RuleSpec] = &[rule(
    // The VJP is linear in the cotangents: the value's and the log-det's VJPs, summed, are one
    // pass over the spline with both cotangents.
    "spline-vjps-merge",
    "(add ({VALUE} ?x ?w ?h ?d ?a) ({LOGDET} ?x ?w ?h ?d ?b))",
    "({BOTH} ?x ?w ?h ?d ?a ?b)",
)];

/// `rules` instantiated for every spline of `g` (bins, bound) and every operand `wrt`.
fn spline_rules(rules: &[RuleSpec], g: &Graph) -> Vec<TRewrite> {
    let mut splines: Vec<(usize, u64)> = g
        .nodes()
        .into_iter()
        .filter_map(|n| match g.node(n).op {
            Op::Spline { bins, bound, .. } | Op::SplineGrad { bins, bound, .. } => {
                Some((bins, bound))
            }
            _ => None,
        })
        .collect();
    splines.sort();
    splines.dedup();
    let mut specs: Vec<(String, String, String)> = Vec::new();
    for (bins, bound) in splines {
        for wrt in 0..4 {
            for r in rules {
                let (lhs, rhs) = spline_rule_instance(r, bins, bound, wrt);
                let both = Op::SplineGrad {
                    bins,
                    bound,
                    part: SplinePart::Both,
                    wrt,
                };
                specs.push((format!("{}[{both}]", r.name), lhs, rhs));
            }
        }
    }
    specs
        .into_iter()
        .map(|(name, lhs, rhs)| {
            let (from, to) = (parse_pattern(&lhs, &name), parse_pattern(&rhs, &name));
            Rewrite::new(name.clone(), from, to)
                .unwrap_or_else(|e| panic!("snfc internal error: rule {name}: {e}"))
        })
        .collect()
}

/// One convolution of a graph, as the conv rules need it: its Toeplitz size, channels, kernel
/// size and a batch size it is applied at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
struct ConvInstance {
    h: usize,
    w: usize,
    c: usize,
    k: usize,
    b: usize,
}

impl ConvInstance {
    fn n(&self) -> usize {
        self.c * self.h * self.w
    }

    fn fill(&self, pattern: &str) -> String {
        let (h, w, c, k, b, n) = (self.h, self.w, self.c, self.k, self.b, self.n());
        pattern
            .replace("{T}", &format!("toeplitz:{h}x{w}"))
            .replace("{ADJ}", &format!("toeplitz_adjoint:{h}x{w}:{k}"))
            .replace("{IMG}", &format!("reshape:{c}x{h}x{w}x{b}"))
            .replace("{FLAT}", &format!("reshape:{n}x{b}"))
            .replace("{KG}", &format!("conv_kernel_grad:{k}"))
            .replace("{MULT}", &format!("multiplicity:{h}x{w}"))
            .replace("{MAT}", &format!("reshape:{c}x{c}"))
            .replace("{KER}", &format!("reshape:{c}x{c}x1x1"))
            .replace("{HW}", &format!("const:{:?}", (h * w) as f64))
    }
}

/// A convolution rule written out for one convolution — `C` channels of `H × W` maps, a
/// `K × K` kernel, batch `B` — exactly as the rewriter instantiates it: its two sides in the
/// IR's op tokens (for the rule-by-rule soundness tests).
pub fn conv_rule_instance(rule: &ConvRule, [c, h, w, k, b]: [usize; 5]) -> (String, String) {
    let inst = ConvInstance { h, w, c, k, b };
    (inst.fill(rule.lhs), inst.fill(rule.rhs))
}

/// A spline rule written out for splines of `bins` bins and tail bound `bound` (its bits) and
/// the operand `wrt` a gradient is taken with respect to, as the rewriter instantiates it.
pub fn spline_rule_instance(
    rule: &RuleSpec,
    bins: usize,
    bound: u64,
    wrt: usize,
) -> (String, String) {
    let op = |part| {
        Op::SplineGrad {
            bins,
            bound,
            part,
            wrt,
        }
        .to_string()
    };
    let fill = |p: &str| {
        p.replace("{VALUE}", &op(SplinePart::Value))
            .replace("{LOGDET}", &op(SplinePart::LogDet))
            .replace("{BOTH}", &op(SplinePart::Both))
    };
    (fill(rule.lhs), fill(rule.rhs))
}

/// The convolutions of `g`: every `toeplitz` node's (H, W, C, K), at each of the graph's batch
/// sizes. The batch is the last axis of every value by the IR's convention, so it is read from
/// the data inputs (`[D, B]`) and the convolutions (`[C, H, W, B]`), never inferred from
/// matrix shapes: a batch equal to C·H·W (a square `[C·H·W, B]` batch) is a batch like any other.
fn conv_instances(g: &Graph) -> Vec<ConvInstance> {
    let mut convs = Vec::new();
    let mut batches = std::collections::BTreeSet::new();
    for n in g.nodes() {
        let node = g.node(n);
        match (&node.op, node.shape.as_slice()) {
            (Op::Toeplitz { h, w }, _) => {
                let k = g.node(g.inputs(n)[0]).shape.clone();
                convs.push((*h, *w, k[0], k[2]));
            }
            (Op::Input { .. }, [_, .., b]) | (Op::Conv2d, [_, _, _, b]) => {
                batches.insert(*b);
            }
            _ => {}
        }
    }
    let mut out: Vec<ConvInstance> = Vec::new();
    for (h, w, c, k) in convs {
        for &b in &batches {
            out.push(ConvInstance { h, w, c, k, b });
        }
    }
    out.sort();
    out.dedup();
    out
}

/// `rules` instantiated for every convolution of `g`, each with its shape conditions.
fn conv_rules(rules: &[ConvRule], g: &Graph) -> Vec<TRewrite> {
    let mut out = Vec::new();
    for inst in conv_instances(g) {
        for r in rules.iter().filter(|r| !r.pointwise || inst.k == 1) {
            let name = format!(
                "{}[{}x{}x{}:{}:{}]",
                r.name, inst.c, inst.h, inst.w, inst.k, inst.b
            );
            let mut checks: Vec<(Var, Shape)> = Vec::new();
            let mut add = |vars: &[&str], shape: Shape| {
                checks.extend(vars.iter().map(|v| (parse_var(v), shape.clone())));
            };
            add(r.flat, vec![inst.n(), inst.b]);
            add(r.image, vec![inst.c, inst.h, inst.w, inst.b]);
            add(r.kernel, vec![inst.c, inst.c, inst.k, inst.k]);
            add(r.scalar, vec![]);
            let (lhs, rhs) = (
                parse_pattern(&inst.fill(r.lhs), &name),
                parse_pattern(&inst.fill(r.rhs), &name),
            );
            let condition = move |eg: &mut TEGraph, _: Id, subst: &egg::Subst| {
                checks.iter().all(|(v, s)| eg[subst[*v]].data == *s)
            };
            out.push(
                Rewrite::new(
                    name.clone(),
                    lhs,
                    ConditionalApplier {
                        condition,
                        applier: rhs,
                    },
                )
                .unwrap_or_else(|e| panic!("snfc internal error: rule {name}: {e}")),
            );
        }
    }
    out
}

/// The pair rules over the declared pairs of `g` (each pair in both directions); rules with
/// convolution placeholders are instantiated for each convolution of `g`.
fn compile_pair_rules(rules: &[PairRule], g: &Graph) -> Vec<TRewrite> {
    let params: HashMap<&str, &Op> = g
        .nodes()
        .into_iter()
        .filter_map(|n| match &g.node(n).op {
            op @ Op::Param { name, .. } => Some((name.as_str(), op)),
            _ => None,
        })
        .collect();
    let mut partners = HashMap::new();
    for p in &g.pairs {
        if let (Some(w), Some(r)) = (
            params.get(p.forward.as_str()),
            params.get(p.inverse.as_str()),
        ) {
            partners.insert((*w).clone(), (*r).clone());
            partners.insert((*r).clone(), (*w).clone());
        }
    }
    let partners = Arc::new(partners);
    let mut convs: Vec<ConvInstance> = conv_instances(g);
    // The pair rules only need each distinct Toeplitz op once.
    convs.dedup_by_key(|c| (c.h, c.w));
    let mut out = Vec::new();
    for s in rules {
        let forms: Vec<(String, String, String)> = if s.lhs.contains('{') {
            convs
                .iter()
                .map(|c| {
                    (
                        format!("{}[{}x{}]", s.name, c.h, c.w),
                        c.fill(s.lhs),
                        c.fill(s.rhs),
                    )
                })
                .collect()
        } else {
            vec![(s.name.to_string(), s.lhs.to_string(), s.rhs.to_string())]
        };
        for (name, lhs, rhs) in forms {
            let applier = PairApplier {
                w: parse_var("?W"),
                r: parse_var("?R"),
                rhs: parse_pattern(&rhs, &name),
                partners: partners.clone(),
            };
            out.push(
                Rewrite::new(name.clone(), parse_pattern(&lhs, &name), applier)
                    .unwrap_or_else(|e| panic!("snfc internal error: rule {name}: {e}")),
            );
        }
    }
    out
}

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
    let mut rules = compile_pair_rules(SUBSTITUTION, g);
    rules.extend(compile_pair_rules(CONV_SUBSTITUTION, g));
    rules.extend(conv_rules(CONV_MERGE, g));
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
    rules.extend(conv_rules(CONV_OPERATOR, g));
    rules.extend(conv_rules(CONV_ADJOINT, g));
    rules.extend(conv_rules(CONV_POINTWISE, g));
    rules.extend(spline_rules(SPLINE, g));
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
