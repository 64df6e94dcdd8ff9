//! The rewrite passes behind one trait, and the manager that runs them in order and checks what
//! each promises ([`crate::verify`]) before the next one starts. `compile` (and so every
//! `--emit`) and the `.ir` file tests run their passes through it, so a pass means one thing
//! wherever it is named.

use crate::compile::OptLevel;
use crate::ir::Graph;
use crate::rewrite::{self, EGraphStats, Limits, RewriteError};
use crate::spec::{FlowSpec, GradientMode};
use crate::verify;

/// What a pass may consult besides the graph: the spec it was lowered from (absent for a graph
/// read from text, whose spec-specific post-conditions are then not checked) and the e-graph
/// limits.
#[derive(Debug, Clone, Copy)]
pub struct PassContext<'a> {
    pub spec: Option<&'a FlowSpec>,
    pub limits: Limits,
}

impl PassContext<'_> {
    /// [`verify::self_normalized`] after `pass`, for a spec that trains with the
    /// self-normalizing gradient (nothing to check otherwise, or without a spec).
    fn check_self_normalized(
        &self,
        after: &Graph,
        pass: &str,
        dense_convolutions: bool,
    ) -> Result<(), verify::Violation> {
        match self.spec {
            Some(spec) if spec.objective.gradient == GradientMode::SelfNormalizing => {
                verify::self_normalized(after, spec, pass, dense_convolutions)
            }
            _ => Ok(()),
        }
    }
}

/// One stage that rewrites the training step.
pub trait Pass {
    /// The name errors, stats and the file tests' `; run:` lines use.
    fn name(&self) -> &'static str;
    /// The rewritten graph, and the e-graph run's statistics.
    fn run(&self, g: &Graph, cx: &PassContext) -> Result<(Graph, EGraphStats), RewriteError>;
    /// What holds after the pass, beyond keeping every output at its shape (which the manager
    /// checks for every pass).
    fn post_condition(&self, after: &Graph, cx: &PassContext) -> Result<(), verify::Violation>;
}

/// The self-normalizing substitution (DESIGN.md §2): every pair's `inverse` becomes its learned
/// inverse, so the step holds no O(D³) inverse or log-determinant.
pub struct SelfNormalize;

impl Pass for SelfNormalize {
    fn name(&self) -> &'static str {
        "self_normalize"
    }
    fn run(&self, g: &Graph, cx: &PassContext) -> Result<(Graph, EGraphStats), RewriteError> {
        rewrite::self_normalize(g, cx.limits)
    }
    fn post_condition(&self, after: &Graph, cx: &PassContext) -> Result<(), verify::Violation> {
        cx.check_self_normalized(after, self.name(), true)
    }
}

/// Exact algebra extracted by cost: products reassociated and factored, convolutions in their
/// operator forms.
pub struct Optimize;

impl Pass for Optimize {
    fn name(&self) -> &'static str {
        "optimize"
    }
    fn run(&self, g: &Graph, cx: &PassContext) -> Result<(Graph, EGraphStats), RewriteError> {
        rewrite::optimize(g, cx.limits)
    }
    fn post_condition(&self, after: &Graph, cx: &PassContext) -> Result<(), verify::Violation> {
        cx.check_self_normalized(after, self.name(), false)
    }
}

/// Passes in the order they run.
pub struct PassManager {
    passes: Vec<Box<dyn Pass>>,
}

/// The pass names [`PassManager::named`] knows.
pub const PASS_NAMES: &[&str] = &["self_normalize", "optimize"];

impl PassManager {
    /// The passes `compile` runs for `spec` at `level`: the substitution for a self-normalizing
    /// spec (unless `None`), then the algebra (at `Full`).
    pub fn for_level(spec: &FlowSpec, level: OptLevel) -> PassManager {
        let mut passes: Vec<Box<dyn Pass>> = Vec::new();
        let self_normalizing = spec.objective.gradient == GradientMode::SelfNormalizing;
        if level != OptLevel::None && self_normalizing {
            passes.push(Box::new(SelfNormalize));
        }
        if level == OptLevel::Full {
            passes.push(Box::new(Optimize));
        }
        PassManager { passes }
    }

    /// The passes of these names, in this order (an unknown name is an error listing the
    /// known ones).
    pub fn named(names: &[impl AsRef<str>]) -> Result<PassManager, String> {
        let passes = names
            .iter()
            .map(|n| -> Result<Box<dyn Pass>, String> {
                match n.as_ref() {
                    "self_normalize" => Ok(Box::new(SelfNormalize)),
                    "optimize" => Ok(Box::new(Optimize)),
                    other => Err(format!(
                        "unknown pass {other:?} (known: {})",
                        PASS_NAMES.join(", ")
                    )),
                }
            })
            .collect::<Result<_, _>>()?;
        Ok(PassManager { passes })
    }

    /// The names of the passes, in order.
    pub fn names(&self) -> Vec<&'static str> {
        self.passes.iter().map(|p| p.name()).collect()
    }

    /// Run every pass in order; after each, check that it kept every output at its shape and
    /// its own post-condition. Returns the last graph and one statistics entry per pass.
    pub fn run(
        &self,
        g: &Graph,
        cx: &PassContext,
    ) -> Result<(Graph, Vec<EGraphStats>), RewriteError> {
        let mut current = g.clone();
        let mut stats = Vec::new();
        for pass in &self.passes {
            let (next, s) = pass.run(&current, cx)?;
            verify::outputs_kept(&current, &next, pass.name())?;
            pass.post_condition(&next, cx)?;
            current = next;
            stats.push(s);
        }
        Ok((current, stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_pipeline_follows_the_level_and_the_gradient() {
        let spec = |gradient: &str| {
            crate::spec::parse_spec(&format!(
                r#"{{"name": "p", "input": {{"shape": [4], "preprocess": "none"}},
                    "layers": [{{"type": "linear"}}],
                    "objective": {{"gradient": "{gradient}"}}}}"#
            ))
            .unwrap()
        };
        let snf = spec("self_normalizing");
        let exact = spec("exact");
        let names = |s: &FlowSpec, l| PassManager::for_level(s, l).names();
        assert_eq!(names(&snf, OptLevel::Full), ["self_normalize", "optimize"]);
        assert_eq!(names(&snf, OptLevel::Substitution), ["self_normalize"]);
        assert!(names(&snf, OptLevel::None).is_empty());
        assert_eq!(names(&exact, OptLevel::Full), ["optimize"]);
        assert_eq!(
            PassManager::named(&["optimize", "self_normalize"])
                .unwrap()
                .names(),
            ["optimize", "self_normalize"]
        );
        let e = PassManager::named(&["fuse"]).err().unwrap();
        assert!(
            e.contains("\"fuse\"") && e.contains("self_normalize, optimize"),
            "{e}"
        );
    }
}
