//! The compiler pipeline as one function: spec → exact training graph → rewritten step graph
//! (the rewrite passes run by [`crate::passes::PassManager`]).

use crate::ir::{lower, Graph};
use crate::passes::{PassContext, PassManager};
use crate::rewrite::{EGraphStats, Limits, RewriteError};
use crate::spec::FlowSpec;
use crate::verify;

/// How far to rewrite the training step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OptLevel {
    /// The exact gradient graph, as differentiated (inverses everywhere).
    None,
    /// Only the self-normalizing substitution (for self-normalizing specs).
    Substitution,
    /// Substitution, then exact algebra extracted by cost.
    Full,
}

/// Everything the compiler produced for one spec at one batch size.
#[derive(Debug, Clone)]
pub struct Compiled {
    pub spec: FlowSpec,
    pub batch: usize,
    /// The exact training graph (`--emit ir`): loss, objective, recon and every gradient.
    pub exact: Graph,
    /// The graph one training step runs: outputs `loss`, `recon` (if any) and `grad.*`.
    pub step: Graph,
    /// One entry per e-graph run.
    pub egraph: Vec<EGraphStats>,
}

/// Compile the training step of `spec` at batch size `batch`. Fails when a rewrite phase
/// cannot finish (a limit reached) or a pass's post-condition ([`crate::verify`]) does not hold:
/// the step would not be the algorithm the spec asks for.
pub fn compile_train(
    spec: &FlowSpec,
    batch: usize,
    level: OptLevel,
) -> Result<Compiled, RewriteError> {
    let exact = lower::train_graph(spec, batch);
    verify::pairs_resolve(&exact, "lowering")?;
    // The step reports the loss without the data-independent log-dets: dropping the full
    // objective drops every `logdet` node (their gradients stay, as inverses or substitutes).
    let step = exact.without_outputs(&["objective"]);
    let cx = PassContext {
        spec: Some(spec),
        limits: Limits::default(),
    };
    let (step, egraph) = PassManager::for_level(spec, level).run(&step, &cx)?;
    Ok(Compiled {
        spec: spec.clone(),
        batch,
        exact,
        step,
        egraph,
    })
}
