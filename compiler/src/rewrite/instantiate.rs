//! Rules made egg rewrites: patterns parsed, conditions attached, and the pair, conv and spline
//! rules instantiated for the layers, sizes and kernels of the graph at hand.

use super::*;

pub(super) fn parse_var(var: &str) -> Var {
    var.parse()
        .unwrap_or_else(|e| panic!("snfc internal error: {var}: {e:?}"))
}

pub(super) type Cond =
    Box<dyn Fn(&mut EGraph<TensorNode, ShapeAnalysis>, Id, &egg::Subst) -> bool + Send + Sync>;

pub(super) fn condition(when: When) -> Option<Cond> {
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

pub(super) fn parse_pattern(p: &str, rule: &str) -> Pattern<TensorNode> {
    p.parse()
        .unwrap_or_else(|e| panic!("snfc internal error: rule {rule}: {p}: {e}"))
}

pub(super) fn compile_rules(specs: &[RuleSpec]) -> Vec<TRewrite> {
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
pub(super) struct PairApplier {
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

/// `rules` instantiated for every spline of `g` (bins, bound) and every operand `wrt`.
pub(super) fn spline_rules(rules: &[RuleSpec], g: &Graph) -> Vec<TRewrite> {
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
pub(super) struct ConvInstance {
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
pub(super) fn conv_instances(g: &Graph) -> Vec<ConvInstance> {
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
pub(super) fn conv_rules(rules: &[ConvRule], g: &Graph) -> Vec<TRewrite> {
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
pub(super) fn compile_pair_rules(rules: &[PairRule], g: &Graph) -> Vec<TRewrite> {
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
