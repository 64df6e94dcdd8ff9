//! What several commands share: the device choice, and the checks that a path is the kind of file a
//! command takes.

use crate::*;
use anyhow::{anyhow, bail, Context, Result};
use snfc_compiler::compile::OptLevel;
use snfc_compiler::plan::TrainPlan;
use snfc_compiler::spec::load_spec;
use snfc_compiler::spec::FlowSpec;
use snfc_runtime::cube::probe::choose;
use snfc_runtime::cube::probe::Chosen;
use snfc_runtime::distributed;
use std::path::Path;

/// Pick the device and say which (on stderr).
pub fn resolve_device(d: Device) -> Result<Chosen> {
    let chosen = choose(d.kind()).map_err(|e| anyhow!(e))?;
    eprintln!("device: {chosen}");
    Ok(chosen)
}

/// [`resolve_device`], saying nothing when `quiet` (`--json`).
pub fn resolve_device_quietly(d: Device, quiet: bool) -> Result<Chosen> {
    if quiet {
        choose(d.kind()).map_err(|e| anyhow!(e))
    } else {
        resolve_device(d)
    }
}

/// [`resolve_device`] for a rank of a data-parallel job: only rank 0 says which device, and
/// not under `--quiet`.
pub fn resolve_device_on(d: Device, comm: &distributed::Comm, quiet: bool) -> Result<Chosen> {
    if comm.rank() == 0 && !quiet {
        resolve_device(d)
    } else {
        choose(d.kind()).map_err(|e| anyhow!(e))
    }
}

/// A spec file, or a plan file from `snfc compile --emit plan` with its spec (whose batch size
/// becomes the plan's).
pub fn spec_or_plan(path: &Path) -> Result<(FlowSpec, Option<TrainPlan>)> {
    not_a_checkpoint(path)?;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{}: cannot read", path.display()))?;
    if TrainPlan::is_plan_text(&text) {
        let plan = TrainPlan::parse(&text).map_err(|e| anyhow!("{}: {e}", path.display()))?;
        let mut spec = plan.spec.clone();
        spec.train.batch_size = plan.batch;
        return Ok((spec, Some(plan)));
    }
    Ok((spec_from(path)?, None))
}

pub fn spec_from(path: &Path) -> Result<FlowSpec> {
    not_a_checkpoint(path)?;
    if let Ok(text) = std::fs::read_to_string(path) {
        if TrainPlan::is_plan_text(&text) {
            bail!(
                "{}: this is a compiled plan (`snfc compile --emit plan`), not a spec: `snfc train {}` runs it; give the spec it came from here",
                path.display(),
                path.display()
            );
        }
    }
    load_spec(path).map_err(|e| anyhow!("{e}"))
}

/// A checkpoint where a spec belongs: say what takes it.
pub fn not_a_checkpoint(path: &Path) -> Result<()> {
    if path.extension().is_some_and(|e| e == "safetensors") {
        bail!(
            "{}: this is a checkpoint, not a spec: `snfc eval {}` or `snfc sample {}` use it; to continue its run, `snfc train SPEC --resume --out DIR`",
            path.display(),
            path.display(),
            path.display()
        );
    }
    Ok(())
}

/// A run directory where a checkpoint belongs: point to the checkpoints inside.
pub fn checkpoint_path(path: &Path) -> Result<()> {
    if path.is_dir() {
        let inside: Vec<String> = ["checkpoint.safetensors", "last.safetensors"]
            .iter()
            .map(|f| path.join(f))
            .filter(|f| f.exists())
            .map(|f| f.display().to_string())
            .collect();
        if inside.is_empty() {
            bail!(
                "{}: is a directory, not a checkpoint (.safetensors)",
                path.display()
            );
        }
        bail!(
            "{}: is a directory, not a checkpoint: give the checkpoint inside ({}; checkpoint.safetensors is the best validation epoch, last.safetensors the latest)",
            path.display(),
            inside.join(" or ")
        );
    }
    Ok(())
}

pub fn level(no_fusion: bool) -> OptLevel {
    if no_fusion {
        OptLevel::Substitution
    } else {
        OptLevel::Full
    }
}
