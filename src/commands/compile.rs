//! `snfc compile`: the IR before and after the rewrites, stats, the plan and kernel sources.

use crate::commands::common::*;
use crate::*;
use anyhow::{anyhow, bail, Context, Result};
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::plan::TrainPlan;
use snfc_compiler::rewrite::op_counts;
use snfc_runtime::cube::source::Target;
use snfc_runtime::distributed;
use std::path::Path;

/// `snfc compile` with its arguments.
pub fn run(args: CompileArgs, _comm: &distributed::Comm) -> Result<()> {
    let CompileArgs {
        spec,
        emit,
        out,
        batch,
    } = args;
    compile(&spec, &emit, out.as_deref(), batch)
}

/// The e-graph work of a compile: largest e-graph, total iterations and time, how the last
/// phase stopped, the limits, and each phase in full.
fn egraph_summary(phases: &[snfc_compiler::rewrite::EGraphStats]) -> serde_json::Value {
    let limits = snfc_compiler::rewrite::Limits::default();
    serde_json::json!({
        "nodes": phases.iter().map(|p| p.nodes).max().unwrap_or(0),
        "classes": phases.iter().map(|p| p.classes).max().unwrap_or(0),
        "iterations": phases.iter().map(|p| p.iterations).sum::<usize>(),
        "stop_reason": phases.last().map(|p| p.stop_reason.clone()).unwrap_or_else(|| "not run".into()),
        "millis": phases.iter().map(|p| p.millis).sum::<f64>(),
        "extract_millis": phases.iter().map(|p| p.extract_millis).sum::<f64>(),
        "limits": {
            "nodes": limits.nodes,
            "iterations": limits.iterations,
            "seconds": limits.time.as_secs_f64(),
        },
        "phases": phases,
    })
}

fn compile(
    spec_path: &Path,
    emit: &[String],
    out: Option<&Path>,
    batch: Option<usize>,
) -> Result<()> {
    let spec = spec_from(spec_path)?;
    let batch = batch.unwrap_or(spec.train.batch_size);
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    if let Err(e) = spec.check_batch(batch) {
        bail!("--batch {batch}: {e}");
    }
    let c = compile_train(&spec, batch, OptLevel::Full)
        .with_context(|| format!("compiling {}", spec_path.display()))?;
    if let Some(dir) = out {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let plan = TrainPlan {
        snfc_plan: snfc_compiler::plan::PLAN_FORMAT,
        spec: spec.clone(),
        batch,
        opt_level: "full".into(),
        step: snfc_compiler::plan::Plan::new(&c.step),
    };
    for what in emit {
        if let Some(target) = match what.as_str() {
            "cuda" => Some(Target::Cuda),
            "wgsl" => Some(Target::Wgsl),
            _ => None,
        } {
            let Some(dir) = out else {
                bail!("--emit {what} writes one file per kernel: give an output directory with -o");
            };
            let sub = dir.join(what);
            std::fs::create_dir_all(&sub).with_context(|| format!("creating {}", sub.display()))?;
            let sources = snfc_runtime::cube::source::plan_sources(&plan.step, target)
                .map_err(|e| anyhow!("generating {what} source: {e}"))?;
            for k in &sources {
                let path = sub.join(format!("{}.{}", k.name, target.extension()));
                std::fs::write(&path, &k.source)
                    .with_context(|| format!("writing {}", path.display()))?;
            }
            eprintln!(
                "wrote {} {what} kernels to {}",
                sources.len(),
                sub.display()
            );
            continue;
        }
        let (file, text) = match what.as_str() {
            "ir" => ("ir.txt", c.exact.to_text()),
            "ir-opt" => ("ir-opt.txt", c.step.to_text()),
            "stats" => {
                let before = c.exact.without_outputs(&[]);
                let (total, naive) = plan.step.buffers.footprint(&plan.step);
                let stats = serde_json::json!({
                    "spec": spec.name,
                    "batch": batch,
                    "before": op_counts(&before),
                    "after": op_counts(&c.step),
                    "egraph": egraph_summary(&c.egraph),
                    "plan": {
                        "kernels": plan.step.kernels(),
                        "buffers": plan.step.buffers.sizes.len(),
                        "buffer_elements": total,
                        "buffer_elements_without_reuse": naive,
                    },
                });
                ("stats.json", serde_json::to_string_pretty(&stats)? + "\n")
            }
            "plan" => ("plan.json", plan.to_json()),
            "plan-text" => ("plan.txt", plan.step.to_text()),
            other => {
                bail!("--emit {other}: expected ir, ir-opt, stats, plan, plan-text, cuda or wgsl")
            }
        };
        match out {
            Some(dir) => {
                let path = dir.join(file);
                std::fs::write(&path, &text)
                    .with_context(|| format!("writing {}", path.display()))?;
                eprintln!("wrote {}", path.display());
                if what == "stats" {
                    print!("{text}");
                }
            }
            None => print!("{text}"),
        }
    }
    Ok(())
}
