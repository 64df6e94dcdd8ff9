//! Rules whose ops carry sizes (a convolution's Toeplitz op `toeplitz:HxW`, the reshapes between
//! a flat and an image batch, a spline's `spline_grad:BINS:BOUND:PART:WRT`), written once for
//! every size. A rule's text names such an op by a *hole* (`{T}`, `{IMG}`, …, see
//! [`ConvRule`]): on the left-hand side a hole matches any op of its kind and binds the sizes
//! it carries, and the shape analysis binds the rest from the rule's variables (a flat batch
//! `[C·H·W, B]` gives B); every binding must agree. The right-hand side's holes are then built
//! from those sizes. So a rule fires wherever its shapes fit, at any batch, without a list of
//! the graph's convolutions, string templates or guesses.

use super::*;

/// An op with sizes, as a rule names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hole {
    /// `toeplitz:HxW`, the dense `[C·H·W, C·H·W]` matrix of a `C → C` convolution.
    Toeplitz,
    /// `toeplitz_adjoint:HxW:K`.
    Adjoint,
    /// `reshape:CxHxWxB` of a flat batch `[C·H·W, B]`.
    Image,
    /// `reshape:NxB` (N = C·H·W) of an image batch `[C, H, W, B]`.
    Flat,
    /// `conv_kernel_grad:K`.
    KernelGrad,
    /// `multiplicity:HxW`.
    Multiplicity,
    /// `reshape:CxC` of a 1×1 kernel `[C, C, 1, 1]`.
    Matrix,
    /// `reshape:CxCx1x1` of a `C × C` matrix.
    Kernel,
    /// The constant H·W.
    MapSize,
    /// `spline_grad` of the value's, the log-det's or both cotangents.
    SplineGrad(SplinePart),
}

impl Hole {
    fn parse(name: &str) -> Option<Hole> {
        Some(match name {
            "T" => Hole::Toeplitz,
            "ADJ" => Hole::Adjoint,
            "IMG" => Hole::Image,
            "FLAT" => Hole::Flat,
            "KG" => Hole::KernelGrad,
            "MULT" => Hole::Multiplicity,
            "MAT" => Hole::Matrix,
            "KER" => Hole::Kernel,
            "HW" => Hole::MapSize,
            "VALUE" => Hole::SplineGrad(SplinePart::Value),
            "LOGDET" => Hole::SplineGrad(SplinePart::LogDet),
            "BOTH" => Hole::SplineGrad(SplinePart::Both),
            _ => return None,
        })
    }
}

/// The sizes a match binds: a convolution's channels, map and kernel size and the batch, or
/// a spline's bins, bound and operand.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(super) struct Sizes {
    c: Option<usize>,
    h: Option<usize>,
    w: Option<usize>,
    k: Option<usize>,
    b: Option<usize>,
    bins: Option<usize>,
    bound: Option<u64>,
    wrt: Option<usize>,
}

/// Bind `slot` to `v`, or check that it already holds `v`.
fn bind<T: PartialEq + Copy>(slot: &mut Option<T>, v: T) -> bool {
    match slot {
        Some(old) => *old == v,
        None => {
            *slot = Some(v);
            true
        }
    }
}

impl Sizes {
    /// A convolution's sizes as the rule-by-rule tests give them.
    pub(super) fn conv([c, h, w, k, b]: [usize; 5]) -> Sizes {
        Sizes {
            c: Some(c),
            h: Some(h),
            w: Some(w),
            k: Some(k),
            b: Some(b),
            ..Sizes::default()
        }
    }

    pub(super) fn spline(bins: usize, bound: u64, wrt: usize) -> Sizes {
        Sizes {
            bins: Some(bins),
            bound: Some(bound),
            wrt: Some(wrt),
            ..Sizes::default()
        }
    }

    fn image(&mut self, s: &[usize]) -> bool {
        match *s {
            [c, h, w, b] => {
                bind(&mut self.c, c) && bind(&mut self.h, h) && bind(&mut self.w, w) && {
                    bind(&mut self.b, b)
                }
            }
            _ => false,
        }
    }

    /// A flat batch `[C·H·W, B]`: B, and C where the map size is known.
    fn flat(&mut self, s: &[usize]) -> bool {
        let [n, b] = *s else { return false };
        if !bind(&mut self.b, b) {
            return false;
        }
        match (self.h, self.w) {
            (Some(h), Some(w)) if h * w > 0 && n % (h * w) == 0 => bind(&mut self.c, n / (h * w)),
            _ => false,
        }
    }

    /// A `C → C` kernel `[C, C, K, K]`.
    fn kernel(&mut self, s: &[usize]) -> bool {
        match *s {
            [c, c2, k, k2] if c == c2 && k == k2 => bind(&mut self.c, c) && bind(&mut self.k, k),
            _ => false,
        }
    }

    /// Bind what an e-node of `hole`'s kind carries (`op`, its shape `out` and its operands'
    /// shapes `ins`); false where it is not of the kind or disagrees with what is bound.
    fn bind_hole(&mut self, hole: Hole, op: &Op, out: &[usize], ins: &[&Shape]) -> bool {
        match (hole, op) {
            (Hole::Toeplitz, Op::Toeplitz { h, w }) => {
                bind(&mut self.h, *h) && bind(&mut self.w, *w) && self.kernel(ins[0])
            }
            (Hole::Adjoint, Op::ToeplitzAdjoint { h, w, k: _ }) => {
                bind(&mut self.h, *h) && bind(&mut self.w, *w) && self.kernel(out)
            }
            (Hole::Image, Op::Reshape { to }) => {
                self.image(to) && ins[0].len() == 2 && self.flat(ins[0])
            }
            (Hole::Flat, Op::Reshape { to }) => {
                to.len() == 2 && self.image(ins[0]) && self.flat(to)
            }
            (Hole::KernelGrad, Op::ConvKernelGrad { k }) => {
                bind(&mut self.k, *k) && self.image(ins[1]) && bind(&mut self.c, out[1])
            }
            (Hole::Multiplicity, Op::Multiplicity { h, w }) => {
                bind(&mut self.h, *h) && bind(&mut self.w, *w) && self.kernel(out)
            }
            (Hole::Matrix, Op::Reshape { to }) => {
                matches!(to[..], [c, c2] if c == c2) && self.kernel(ins[0]) && self.k == Some(1)
            }
            (Hole::Kernel, Op::Reshape { to }) => self.kernel(to) && self.k == Some(1),
            (Hole::MapSize, Op::Const { bits }) => match (self.h, self.w) {
                (Some(h), Some(w)) => f64::from_bits(*bits) == (h * w) as f64,
                _ => false,
            },
            (
                Hole::SplineGrad(want),
                Op::SplineGrad {
                    bins,
                    bound,
                    part,
                    wrt,
                },
            ) => {
                want == *part
                    && bind(&mut self.bins, *bins)
                    && bind(&mut self.bound, *bound)
                    && bind(&mut self.wrt, *wrt)
            }
            _ => false,
        }
    }

    /// The op `hole` stands for at these sizes (`None` where one is not bound).
    fn op(&self, hole: Hole) -> Option<Op> {
        Some(match hole {
            Hole::Toeplitz => Op::Toeplitz {
                h: self.h?,
                w: self.w?,
            },
            Hole::Adjoint => Op::ToeplitzAdjoint {
                h: self.h?,
                w: self.w?,
                k: self.k?,
            },
            Hole::Image => Op::Reshape {
                to: vec![self.c?, self.h?, self.w?, self.b?],
            },
            Hole::Flat => Op::Reshape {
                to: vec![self.c? * self.h? * self.w?, self.b?],
            },
            Hole::KernelGrad => Op::ConvKernelGrad { k: self.k? },
            Hole::Multiplicity => Op::Multiplicity {
                h: self.h?,
                w: self.w?,
            },
            Hole::Matrix => Op::Reshape {
                to: vec![self.c?, self.c?],
            },
            Hole::Kernel => Op::Reshape {
                to: vec![self.c?, self.c?, 1, 1],
            },
            Hole::MapSize => Op::constant((self.h? * self.w?) as f64),
            Hole::SplineGrad(part) => Op::SplineGrad {
                bins: self.bins?,
                bound: self.bound?,
                part,
                wrt: self.wrt?,
            },
        })
    }
}

/// A rule side: variables, ops, and holes.
#[derive(Debug, Clone)]
enum Pat {
    Var(Var),
    Op(Op, Vec<Pat>),
    Hole(Hole, Vec<Pat>),
}

impl Pat {
    /// Read an s-expression in the IR's op tokens, with `{HOLE}`s.
    fn parse(text: &str, rule: &str) -> Pat {
        let spaced = text.replace('(', " ( ").replace(')', " ) ");
        let mut tokens = spaced.split_whitespace().peekable();
        let pat = Self::read(&mut tokens, rule);
        assert!(
            tokens.next().is_none(),
            "snfc internal error: rule {rule}: text after the pattern {text}"
        );
        pat
    }

    fn read<'a>(
        tokens: &mut std::iter::Peekable<impl Iterator<Item = &'a str>>,
        rule: &str,
    ) -> Pat {
        let bad = |what: &str| -> ! { panic!("snfc internal error: rule {rule}: {what}") };
        let head = tokens
            .next()
            .unwrap_or_else(|| bad("the pattern ends early"));
        let (head, list) = if head == "(" {
            (
                tokens.next().unwrap_or_else(|| bad("empty parentheses")),
                true,
            )
        } else {
            (head, false)
        };
        let mut kids = Vec::new();
        if list {
            while tokens.peek() != Some(&")") {
                kids.push(Self::read(tokens, rule));
            }
            tokens.next();
        }
        if let Some(var) = head.strip_prefix('?') {
            assert!(
                kids.is_empty(),
                "snfc internal error: rule {rule}: ?{var} takes no operands"
            );
            return Pat::Var(parse_var(head));
        }
        if let Some(name) = head.strip_prefix('{').and_then(|h| h.strip_suffix('}')) {
            let hole = Hole::parse(name).unwrap_or_else(|| bad(&format!("unknown hole {head}")));
            return Pat::Hole(hole, kids);
        }
        let op: Op = head
            .parse()
            .unwrap_or_else(|e| bad(&format!("{head}: {e}")));
        Pat::Op(op, kids)
    }

    fn vars(&self, out: &mut Vec<Var>) {
        match self {
            Pat::Var(v) => {
                if !out.contains(v) {
                    out.push(*v)
                }
            }
            Pat::Op(_, kids) | Pat::Hole(_, kids) => kids.iter().for_each(|k| k.vars(out)),
        }
    }

    /// Every way this pattern matches e-class `id`, extending each of `states`.
    fn matches(&self, eg: &TEGraph, id: Id, states: Vec<(Subst, Sizes)>) -> Vec<(Subst, Sizes)> {
        let id = eg.find(id);
        let mut out = Vec::new();
        match self {
            Pat::Var(v) => {
                for (mut subst, sizes) in states {
                    match subst.get(*v) {
                        Some(bound) if eg.find(*bound) != id => {}
                        Some(_) => out.push((subst, sizes)),
                        None => {
                            subst.insert(*v, id);
                            out.push((subst, sizes));
                        }
                    }
                }
            }
            Pat::Op(_, kids) | Pat::Hole(_, kids) => {
                for (subst, sizes) in states {
                    for node in &eg[id].nodes {
                        if node.children.len() != kids.len() {
                            continue;
                        }
                        let mut sizes = sizes;
                        let fits = match self {
                            Pat::Op(op, _) => node.op == *op,
                            Pat::Hole(hole, _) => {
                                let ins: Vec<&Shape> =
                                    node.children.iter().map(|c| &eg[*c].data).collect();
                                sizes.bind_hole(*hole, &node.op, &eg[id].data, &ins)
                            }
                            Pat::Var(_) => unreachable!(),
                        };
                        if !fits {
                            continue;
                        }
                        let mut found = vec![(subst.clone(), sizes)];
                        for (kid, child) in kids.iter().zip(&node.children) {
                            found = kid.matches(eg, *child, found);
                            if found.is_empty() {
                                break;
                            }
                        }
                        out.extend(found);
                    }
                }
            }
        }
        out
    }

    /// This side as an egg pattern at `sizes` (`None` where a hole's size is not bound).
    fn pattern(&self, sizes: &Sizes) -> Option<Pattern<TensorNode>> {
        let mut ast = egg::RecExpr::default();
        self.add_to(sizes, &mut ast)?;
        Some(Pattern::new(ast))
    }

    fn add_to(&self, sizes: &Sizes, ast: &mut egg::PatternAst<TensorNode>) -> Option<Id> {
        let (op, kids) = match self {
            Pat::Var(v) => return Some(ast.add(egg::ENodeOrVar::Var(*v))),
            Pat::Op(op, kids) => (op.clone(), kids),
            Pat::Hole(hole, kids) => (sizes.op(*hole)?, kids),
        };
        let children = kids
            .iter()
            .map(|k| k.add_to(sizes, ast))
            .collect::<Option<Vec<Id>>>()?;
        Some(ast.add(egg::ENodeOrVar::ENode(TensorNode { op, children })))
    }
}

/// Shape requirements on a rule's variables, beyond what its holes bind.
#[derive(Debug, Clone, Default)]
struct VarShapes {
    flat: Vec<Var>,
    image: Vec<Var>,
    kernel: Vec<Var>,
    scalar: Vec<Var>,
    /// 1×1 convolutions only.
    pointwise: bool,
}

/// A rule with holes, as one egg rewrite: its own searcher (holes bind sizes) and applier
/// (the right-hand side built at those sizes; for a pair rule, `?R` bound to the declared
/// partner of the parameter in `?W`'s class).
pub(super) struct HoleRule {
    lhs: Pat,
    rhs: Pat,
    vars: Vec<Var>,
    shapes: VarShapes,
    partners: Option<Arc<HashMap<Op, Op>>>,
}

impl HoleRule {
    fn new(lhs: &str, rhs: &str, shapes: VarShapes, rule: &str) -> HoleRule {
        let lhs = Pat::parse(lhs, rule);
        let mut vars = Vec::new();
        lhs.vars(&mut vars);
        HoleRule {
            lhs,
            rhs: Pat::parse(rhs, rule),
            vars,
            shapes,
            partners: None,
        }
    }

    /// The matches in e-class `id` whose shapes fit and whose right-hand side can be built.
    fn matches_in(&self, eg: &TEGraph, id: Id) -> Vec<(Subst, Sizes)> {
        let found = self
            .lhs
            .matches(eg, id, vec![(Subst::default(), Sizes::default())]);
        let mut out: Vec<(Subst, Sizes)> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        for (subst, mut sizes) in found {
            let shape = |v: &Var| &eg[subst[*v]].data;
            let s = &self.shapes;
            let fits = s.image.iter().all(|v| sizes.image(shape(v)))
                && s.kernel.iter().all(|v| sizes.kernel(shape(v)))
                && s.flat.iter().all(|v| sizes.flat(shape(v)))
                && s.scalar.iter().all(|v| shape(v).is_empty())
                && (!s.pointwise || sizes.k == Some(1));
            let key: Vec<Id> = self.vars.iter().map(|v| eg.find(subst[*v])).collect();
            if fits && self.rhs.pattern(&sizes).is_some() && seen.insert((key, sizes)) {
                out.push((subst, sizes));
            }
        }
        out
    }

    fn same_match(&self, eg: &TEGraph, a: &Subst, b: &Subst) -> bool {
        self.vars.iter().all(|v| eg.find(a[*v]) == eg.find(b[*v]))
    }

    /// Both sides written out at `sizes` (for the rule-by-rule soundness tests).
    fn instance(&self, sizes: &Sizes, rule: &str) -> (String, String) {
        let side = |p: &Pat| {
            p.pattern(sizes)
                .unwrap_or_else(|| panic!("rule {rule}: a size its holes need is not given"))
                .to_string()
        };
        (side(&self.lhs), side(&self.rhs))
    }
}

fn rewrite(name: &str, rule: HoleRule) -> TRewrite {
    // One value searches and applies: egg takes them as two, so the rule is shared.
    let rule = Arc::new(rule);
    Rewrite::new(name, SharedRule(rule.clone()), SharedRule(rule))
        .unwrap_or_else(|e| panic!("snfc internal error: rule {name}: {e}"))
}

/// A [`HoleRule`] behind an `Arc`, so that the searcher and the applier are one rule.
struct SharedRule(Arc<HoleRule>);

impl Searcher<TensorNode, ShapeAnalysis> for SharedRule {
    fn search_eclass_with_limit(
        &self,
        eg: &TEGraph,
        eclass: Id,
        limit: usize,
    ) -> Option<SearchMatches<'_, TensorNode>> {
        let substs: Vec<Subst> = self
            .0
            .matches_in(eg, eclass)
            .into_iter()
            .map(|(s, _)| s)
            .take(limit)
            .collect();
        (!substs.is_empty()).then_some(SearchMatches {
            eclass,
            substs,
            ast: None,
        })
    }

    fn search_with_limit(&self, eg: &TEGraph, limit: usize) -> Vec<SearchMatches<'_, TensorNode>> {
        // A rule rooted at a fixed op looks only where that op is; one rooted at a hole looks
        // everywhere (its op's sizes are what it binds).
        let classes: Vec<Id> = match &self.0.lhs {
            Pat::Op(op, _) => eg
                .classes_for_op(op)
                .map(|c| c.collect())
                .unwrap_or_default(),
            _ => eg.classes().map(|c| c.id).collect(),
        };
        let mut out = Vec::new();
        let mut left = limit;
        for id in classes {
            if left == 0 {
                break;
            }
            if let Some(m) = self.search_eclass_with_limit(eg, id, left) {
                left -= m.substs.len();
                out.push(m);
            }
        }
        out
    }

    fn vars(&self) -> Vec<Var> {
        self.0.vars.clone()
    }
}

impl Applier<TensorNode, ShapeAnalysis> for SharedRule {
    fn apply_one(
        &self,
        eg: &mut TEGraph,
        eclass: Id,
        subst: &Subst,
        _searcher_ast: Option<&egg::PatternAst<TensorNode>>,
        rule_name: egg::Symbol,
    ) -> Vec<Id> {
        // The sizes of this match: matched again (the search returns only substitutions).
        let Some(sizes) = self
            .0
            .matches_in(eg, eclass)
            .into_iter()
            .find(|(s, _)| self.0.same_match(eg, s, subst))
            .map(|(_, z)| z)
        else {
            return vec![];
        };
        let mut subst = subst.clone();
        if let Some(partners) = &self.0.partners {
            let partner = eg[subst[parse_var("?W")]]
                .nodes
                .iter()
                .find_map(|n| partners.get(&n.op).cloned());
            let Some(op) = partner else {
                return vec![];
            };
            let r = eg.add(TensorNode {
                op,
                children: vec![],
            });
            subst.insert(parse_var("?R"), r);
        }
        match self.0.rhs.pattern(&sizes) {
            Some(rhs) => rhs.apply_one(eg, eclass, &subst, None, rule_name),
            None => vec![],
        }
    }
}

fn conv_hole_rule(r: &ConvRule) -> HoleRule {
    let vars = |names: &[&str]| names.iter().map(|v| parse_var(v)).collect();
    let shapes = VarShapes {
        flat: vars(r.flat),
        image: vars(r.image),
        kernel: vars(r.kernel),
        scalar: vars(r.scalar),
        pointwise: r.pointwise,
    };
    HoleRule::new(r.lhs, r.rhs, shapes, r.name)
}

/// The convolution rules, each one rewrite for every convolution size.
pub(super) fn conv_rules(rules: &[ConvRule]) -> Vec<TRewrite> {
    rules
        .iter()
        .map(|r| rewrite(r.name, conv_hole_rule(r)))
        .collect()
}

/// The spline rules, each one rewrite for every spline (bins, bound) and operand.
pub(super) fn spline_rules(rules: &[RuleSpec]) -> Vec<TRewrite> {
    rules
        .iter()
        .map(|r| {
            assert!(
                !r.bidirectional && r.when == When::Always,
                "snfc internal error: spline rule {} must be one-way and unconditional",
                r.name
            );
            rewrite(
                r.name,
                HoleRule::new(r.lhs, r.rhs, VarShapes::default(), r.name),
            )
        })
        .collect()
}

/// The pair rules over the declared pairs of `g` (each pair in both directions): `?R` is bound
/// to the partner of the parameter in `?W`'s e-class; holes bind sizes as in every rule.
pub(super) fn pair_rules(rules: &[PairRule], g: &Graph) -> Vec<TRewrite> {
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
    rules
        .iter()
        .map(|s| {
            let mut rule = HoleRule::new(s.lhs, s.rhs, VarShapes::default(), s.name);
            rule.partners = Some(partners.clone());
            rewrite(s.name, rule)
        })
        .collect()
}

/// A convolution rule written out for one convolution — `C` channels of `H × W` maps, a
/// `K × K` kernel, batch `B` — in the IR's op tokens (for the rule-by-rule soundness tests).
pub fn conv_rule_instance(rule: &ConvRule, sizes: [usize; 5]) -> (String, String) {
    conv_hole_rule(rule).instance(&Sizes::conv(sizes), rule.name)
}

/// A spline rule written out for splines of `bins` bins and tail bound `bound` (its bits) and
/// the operand `wrt` a gradient is taken with respect to.
pub fn spline_rule_instance(
    rule: &RuleSpec,
    bins: usize,
    bound: u64,
    wrt: usize,
) -> (String, String) {
    HoleRule::new(rule.lhs, rule.rhs, VarShapes::default(), rule.name)
        .instance(&Sizes::spline(bins, bound, wrt), rule.name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(name: &str, shape: Shape) -> String {
        format!(
            "input:{name}:{}",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join("x")
        )
    }

    /// Run `rules` on `expr` (an s-expression in op tokens); whether the e-graph then holds
    /// `want` in the same class.
    fn rewrites_to(rules: &[TRewrite], expr: &str, want: &str) -> bool {
        let expr: egg::RecExpr<TensorNode> = expr.parse().expect("expression parses");
        let want: egg::RecExpr<TensorNode> = want.parse().expect("expression parses");
        let mut eg = TEGraph::default();
        let root = eg.add_expr(&expr);
        let runner = Runner::default()
            .with_egraph(eg)
            .with_iter_limit(5)
            .run(rules);
        runner.egraph.lookup_expr(&want) == Some(runner.egraph.find(root))
    }

    /// A rule fires at any size its shapes fit, with the sizes read from the match: a 5×3 map of
    /// 2 channels at batch 7, and at batch 30 = C·H·W, sizes no graph was asked about.
    #[test]
    fn conv_rules_fire_at_every_size_and_only_where_shapes_fit() {
        let rules = conv_rules(CONV_OPERATOR);
        let k = leaf("k", vec![2, 2, 3, 3]);
        for b in [7, 30] {
            let x = leaf("x", vec![30, b]);
            assert!(rewrites_to(
                &rules,
                &format!("(matmul (toeplitz:5x3 {k}) {x})"),
                &format!("(reshape:30x{b} (conv2d (reshape:2x5x3x{b} {x}) {k}))"),
            ));
        }
        // The merge direction: a C → C convolution gains its Toeplitz form; one that changes
        // the channel count has none.
        let merge = conv_rules(CONV_MERGE);
        let x = leaf("x", vec![30, 7]);
        assert!(rewrites_to(
            &merge,
            &format!("(reshape:30x7 (conv2d (reshape:2x5x3x7 {x}) {k}))"),
            &format!("(matmul (toeplitz:5x3 {k}) {x})"),
        ));
        let widen = leaf("k", vec![3, 2, 3, 3]);
        let expr: egg::RecExpr<TensorNode> =
            format!("(reshape:45x7 (conv2d (reshape:2x5x3x7 {x}) {widen}))")
                .parse()
                .unwrap();
        let mut eg = TEGraph::default();
        eg.add_expr(&expr);
        let runner = Runner::default()
            .with_egraph(eg)
            .with_iter_limit(5)
            .run(&merge);
        assert!(runner
            .egraph
            .classes()
            .all(|c| c.nodes.iter().all(|n| !matches!(n.op, Op::Toeplitz { .. }))));
    }

    /// The pointwise rules hold for 1×1 kernels only.
    #[test]
    fn pointwise_rules_need_a_one_by_one_kernel() {
        let rules = conv_rules(CONV_POINTWISE);
        let k1 = leaf("k", vec![3, 3, 1, 1]);
        assert!(rewrites_to(
            &rules,
            &format!("(logdet (toeplitz:4x2 {k1}))"),
            &format!("(mul const:8.0 (logdet (reshape:3x3 {k1})))"),
        ));
        let k3 = leaf("k", vec![3, 3, 3, 3]);
        assert!(!rewrites_to(
            &rules,
            &format!("(logdet (toeplitz:4x2 {k3}))"),
            &format!("(mul const:8.0 (logdet (reshape:3x3 {k3})))"),
        ));
    }

    /// The spline rule binds its bins, bound and operand from the ops it matches, and needs both
    /// VJPs to be of one spline and one operand.
    #[test]
    fn spline_rule_binds_its_spline() {
        let rules = spline_rules(SPLINE);
        let args = [
            leaf("x", vec![4, 6]),
            leaf("w", vec![4, 3]),
            leaf("h", vec![4, 3]),
            leaf("d", vec![4, 2]),
        ]
        .join(" ");
        let (a, b) = (leaf("a", vec![4, 6]), leaf("b", vec![4, 6]));
        let vjp = |part: &str, wrt: usize, g: &str| {
            format!("(spline_grad:3:2.5:{part}:{wrt} {args} {g})")
        };
        assert!(rewrites_to(
            &rules,
            &format!("(add {} {})", vjp("value", 2, &a), vjp("logdet", 2, &b)),
            &format!("(spline_grad:3:2.5:both:2 {args} {a} {b})"),
        ));
        assert!(!rewrites_to(
            &rules,
            &format!("(add {} {})", vjp("value", 2, &a), vjp("logdet", 1, &b)),
            &format!("(spline_grad:3:2.5:both:2 {args} {a} {b})"),
        ));
    }
}
