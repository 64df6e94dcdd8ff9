//! `snfc train`: the run directory and options a run resumes with, signals, and what a run says
//! when it ends.

use crate::commands::common::*;
use crate::*;
use anyhow::{anyhow, bail, Result};
use snfc_compiler::compile::OptLevel;
use snfc_compiler::plan::level_of;
use snfc_runtime::data::load_data;
use snfc_runtime::distributed;
use std::path::{Path, PathBuf};

/// `snfc train` with its arguments.
pub fn run(args: TrainArgs, comm: &distributed::Comm) -> Result<()> {
    let TrainArgs {
        spec,
        epochs,
        out,
        data,
        steps,
        seed,
        device,
        matmul,
        noise,
        dtype,
        force,
        resume,
        angle_every,
        no_fusion,
        exact,
        quiet,
        json,
    } = args;
    let leader = comm.rank() == 0;
    if force && resume.is_some() {
        usage_error("--force starts over and --resume continues: give one of them");
    }
    // `--resume RUN` names the run directory (or its last.safetensors).
    let resume_dir = match &resume {
        Some(Some(run)) => Some(run_directory(run)?),
        _ => None,
    };
    let out = match (out, resume_dir) {
        (Some(o), Some(r)) if o != r => bail!(
            "--out {} and --resume {} name different runs; --resume RUN alone names the run",
            o.display(),
            r.display()
        ),
        (o, r) => o.or(r),
    };
    let (spec, plan) = match (&spec, &out) {
        (Some(path), _) => spec_or_plan(path)?,
        // The run's own spec, from its last.safetensors (rank 0 reads, all get it).
        (None, Some(dir)) if resume.is_some() => {
            let last = dir.join(snfc_runtime::train::LAST_CHECKPOINT);
            let mut text = Vec::new();
            if leader {
                let read = if last.exists() {
                    snfc_runtime::train::recorded_spec(&last)
                        .map(|s| s.to_json_pretty())
                        .map_err(anyhow::Error::from)
                } else {
                    Err(anyhow!(
                        "--resume: {} does not exist ({} holds no run to continue)",
                        last.display(),
                        dir.display()
                    ))
                };
                match read {
                    Ok(t) => text = t.into_bytes(),
                    Err(e) if comm.size() > 1 => {
                        for line in format!("{e:#}").lines() {
                            eprintln!("error: {line}");
                        }
                        comm.abort(1);
                    }
                    Err(e) => return Err(e),
                }
            }
            comm.broadcast_bytes(0, &mut text);
            let text = String::from_utf8(text)?;
            (
                snfc_compiler::spec::parse_spec(&text).map_err(|e| anyhow!("{e}"))?,
                None,
            )
        }
        _ => usage_error(
            "train needs a SPEC (a flow spec or plan.json), or --resume RUN to continue a run",
        ),
    };
    let chosen = resolve_device_on(device, comm, quiet)?;
    if leader && comm.size() > 1 && !quiet {
        eprintln!(
            "data-parallel: {}, each taking an equal share of every batch",
            comm.describe()
        );
    }
    if plan.is_some() && (no_fusion || exact) {
        bail!("--no-fusion/--exact: the plan was compiled already; train the spec instead");
    }
    let out = out.unwrap_or_else(|| PathBuf::from("runs").join(&spec.name));
    if out.exists() && !out.is_dir() {
        bail!(
            "--out {}: is a file; --out names the run's directory (it holds metrics.jsonl and the checkpoints)",
            out.display()
        );
    }
    // --resume continues with the run's own options: what the flags leave out comes
    // from last.safetensors; a flag that differs is refused by the run itself.
    let last = out.join(snfc_runtime::train::LAST_CHECKPOINT);
    // Rank 0's run directory is the run's: the other ranks take its recorded options.
    let mut recorded_json = Vec::new();
    if leader {
        let recorded = if resume.is_some() && last.exists() {
            snfc_runtime::train::recorded_options(&last)
        } else {
            Ok(None)
        };
        if let Err(e) = &recorded {
            if comm.size() > 1 {
                for line in format!("{e:#}").lines() {
                    eprintln!("error: {line}");
                }
                comm.abort(1);
            }
        }
        recorded_json = serde_json::to_vec(&recorded?)?;
    }
    comm.broadcast_bytes(0, &mut recorded_json);
    let recorded: Option<snfc_runtime::train::RunOptions> = serde_json::from_slice(&recorded_json)?;
    let data = data
        .map(|d| d.display().to_string())
        .or_else(|| recorded.as_ref().and_then(|r| r.data.clone()));
    let flag_level = if exact {
        Some(OptLevel::None)
    } else if no_fusion {
        Some(OptLevel::Substitution)
    } else {
        None
    };
    let recorded_level = recorded.as_ref().and_then(|r| level_of(&r.level));
    let dtype = dtype
        .or(match recorded.as_ref().map(|r| r.dtype.as_str()) {
            Some("f64") => Some(Dtype::F64),
            Some("f32") => Some(Dtype::F32),
            _ => None,
        })
        .unwrap_or(Dtype::F32);
    let loaded = load_data(data.as_deref().map(Path::new))?;
    let opts = snfc_runtime::train::TrainOptions {
        out: out.clone(),
        epochs,
        steps,
        seed,
        level: flag_level
            .or_else(|| plan.as_ref().and_then(|p| level_of(&p.opt_level)))
            .or(recorded_level)
            .unwrap_or(OptLevel::Full),
        progress: !quiet,
        force,
        resume: resume.is_some(),
        angle_every,
        device: chosen,
        matmul: matmul.precision(),
        device_noise: noise == NoiseSource::Device,
        plan: plan.map(|p| p.step),
        data,
        comm: comm.clone(),
        interrupt: stop_on_signals()?,
    };
    let summary = match dtype {
        Dtype::F32 => snfc_runtime::train::train::<f32>(&spec, &loaded, &opts)?,
        Dtype::F64 => snfc_runtime::train::train::<f64>(&spec, &loaded, &opts)?,
    };
    if !leader {
        return match &summary.stopped {
            Some(s) if s.interrupted => Err(Interrupted(String::new()).into()),
            _ => Ok(()),
        };
    }
    report_training(&summary, &out, json)
}

/// `train` stopped by Ctrl-C or SIGTERM: exit status 130, after this message.
#[derive(Debug)]
pub struct Interrupted(pub String);

impl std::fmt::Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Interrupted {}

/// The run directory that `--resume RUN` names: RUN itself, or the directory of its
/// last.safetensors.
fn run_directory(run: &Path) -> Result<PathBuf> {
    if run.is_dir() || !run.exists() {
        return Ok(run.to_path_buf());
    }
    let name = run.file_name().and_then(|n| n.to_str()).unwrap_or("");
    if name == snfc_runtime::train::LAST_CHECKPOINT {
        let dir = run.parent().unwrap_or(Path::new(""));
        return Ok(if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir.to_path_buf()
        });
    }
    if run.extension().is_some_and(|e| e == "json") {
        bail!(
            "--resume {}: this is a spec; --resume takes the run to continue (its directory or its last.safetensors): `snfc train {} --resume DIR`",
            run.display(),
            run.display()
        );
    }
    bail!(
        "--resume {}: not a run; --resume takes the run directory or its {} (the file that holds the run's state; {} holds only the best parameters)",
        run.display(),
        snfc_runtime::train::LAST_CHECKPOINT,
        snfc_runtime::train::BEST_CHECKPOINT
    )
}

/// Stop `train` after the step in progress on SIGINT or SIGTERM (the flag is
/// `TrainOptions::interrupt`); a second signal ends the process at once with status 130.
fn stop_on_signals() -> Result<std::sync::Arc<std::sync::atomic::AtomicBool>> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let asked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as the earlier signal left it.
        signal_hook::flag::register_conditional_shutdown(signal, 130, asked.clone())?;
        signal_hook::flag::register(signal, asked.clone())?;
    }
    Ok(asked)
}

/// What `train` says when it ends: the best epoch, where it stopped, or (`--json`) one object.
/// An interrupted run is an [`Interrupted`] error (exit status 130).
fn report_training(
    summary: &snfc_runtime::train::TrainSummary,
    out: &Path,
    json: bool,
) -> Result<()> {
    let resume_hint = format!("`snfc train --resume {}`", out.display());
    let stopped_at = summary.stopped.as_ref().map(|s| {
        if s.step == s.steps_per_epoch {
            format!(
                "after epoch {} (step {} of the run)",
                s.epoch, s.total_steps
            )
        } else {
            format!(
                "after step {} of {} in epoch {} (step {} of the run)",
                s.step, s.steps_per_epoch, s.epoch, s.total_steps
            )
        }
    });
    if json {
        let last = summary.records.last();
        let v = serde_json::json!({
            "out": out.display().to_string(),
            "epochs_run": summary.records.iter().filter(|r| !r.partial).count(),
            "steps": summary.stopped.as_ref().map(|s| s.total_steps)
                .or(summary.reached.as_ref().map(|r| r.steps))
                .or(last.map(|r| r.steps)),
            "best_epoch": summary.best.as_ref().map(|_| summary.best_epoch),
            "best_val_nll_nats": summary.best.as_ref().map(|b| b.nll_nats),
            "best_val_bits_per_dim": summary.best.as_ref().map(|b| b.bits_per_dim),
            "checkpoint": summary.best.as_ref().map(|_| summary.checkpoint.display().to_string()),
            "last": last,
            "stopped": summary.stopped.as_ref().map(|s| serde_json::json!({
                "epoch": s.epoch,
                "step_in_epoch": s.step,
                "steps_per_epoch": s.steps_per_epoch,
                "interrupted": s.interrupted,
                "saved": s.saved,
            })),
            "already_reached": summary.reached.is_some(),
        });
        println!("{v}");
    } else {
        if let Some(r) = &summary.reached {
            println!(
                "the run already reached epoch {} of {} (step {}): nothing to train; raise {} to continue",
                r.epoch,
                r.epochs,
                r.steps,
                if r.epoch < r.epochs {
                    "--steps"
                } else {
                    "--epochs (or /train/epochs)"
                }
            );
        }
        match &summary.best {
            Some(b) => println!(
                "best validation NLL {:.2} nats ({:.4} bits/dim) at epoch {}; checkpoint {}",
                b.nll_nats,
                b.bits_per_dim,
                summary.best_epoch,
                summary.checkpoint.display()
            ),
            None if summary.stopped.as_ref().is_some_and(|s| s.saved) => {
                println!("no epoch was validated yet")
            }
            None => println!("no epoch ran (nothing saved)"),
        }
        if let (Some(s), Some(at)) = (&summary.stopped, &stopped_at) {
            if !s.interrupted {
                println!("stopped by --steps {at}; {resume_hint} with a higher --steps (or none) continues from there");
            }
        }
    }
    match (&summary.stopped, stopped_at) {
        (Some(s), Some(at)) if s.interrupted && s.saved => Err(Interrupted(format!(
            "interrupted: stopped {at}; {} holds the run there, and {resume_hint} continues it",
            out.join(snfc_runtime::train::LAST_CHECKPOINT).display()
        ))
        .into()),
        (Some(s), _) if s.interrupted => Err(Interrupted(
            "interrupted before the first step: nothing was trained or written".to_string(),
        )
        .into()),
        _ => Ok(()),
    }
}
