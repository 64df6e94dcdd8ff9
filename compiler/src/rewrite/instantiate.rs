//! The algebra's rules made egg rewrites: patterns parsed and conditions attached. (Rules whose
//! ops carry sizes, and the pair rules, are `holes.rs`.)

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
