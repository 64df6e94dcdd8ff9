//! `snfc bench`: the step's time (and its profile), or one layer's scaling with D.

use crate::commands::common::*;
use crate::*;
use anyhow::{anyhow, bail, Context, Result};
use snfc_compiler::compile::OptLevel;
use snfc_compiler::spec::GradientMode;
use snfc_runtime::distributed;

/// `snfc bench` with its arguments.
pub fn run(args: BenchArgs, comm: &distributed::Comm) -> Result<()> {
    match args {
        BenchArgs {
            scaling: Some(kind),
            dims,
            out,
            steps,
            warmup,
            dtype,
            device,
            matmul,
            ..
        } => {
            let chosen = resolve_device(device)?;
            if steps == 0 || dims.is_empty() {
                bail!("--steps and --dims need at least one each");
            }
            let opts = snfc_runtime::bench::BenchOptions {
                steps,
                warmup,
                level: OptLevel::Full,
                profile: false,
                device: chosen,
                matmul: matmul.precision(),
                sampling: false,
                comm: distributed::solo(),
            };
            let layer = match kind {
                ScalingKind::Fc => snfc_runtime::bench::ScalingLayer::Fc,
                ScalingKind::Conv => snfc_runtime::bench::ScalingLayer::Conv,
            };
            for &d in &dims {
                snfc_runtime::bench::scaling_spec(layer, d, false).map_err(|e| anyhow!(e))?;
            }
            let name = format!("{kind:?}").to_lowercase();
            println!(
                "{:>6}  {:>14}  {:>12}  {:>12}  {:>7}",
                "D", "shape", "SNF ms", "exact ms", "ratio"
            );
            let show = |r: &snfc_runtime::bench::ScalingRow| {
                println!(
                    "{:>6}  {:>14}  {:>12.3}  {:>12.3}  {:>6.2}×",
                    r.dim,
                    format!("{:?}", r.shape),
                    r.snf_ms,
                    r.exact_ms,
                    r.ratio
                )
            };
            let rows = match dtype {
                Dtype::F32 => snfc_runtime::bench::scaling::<f32>(layer, &dims, &opts, show)?,
                Dtype::F64 => snfc_runtime::bench::scaling::<f64>(layer, &dims, &opts, show)?,
            };
            std::fs::create_dir_all(&out)
                .with_context(|| format!("{}: cannot create", out.display()))?;
            let json = out.join(format!("scaling-{name}.json"));
            let text = serde_json::to_string_pretty(&serde_json::json!({
                "layer": name, "batch": 128, "dtype": format!("{dtype:?}").to_lowercase(),
                "steps": steps, "includes": snfc_runtime::bench::STEP_INCLUDES, "rows": rows
            }))?;
            snfc_runtime::atomic::write_atomically(&json, text.as_bytes())?;
            let png = out.join(format!("scaling-{name}.png"));
            snfc_runtime::plot::plot_scaling(
                &rows,
                &format!("One {name} layer: step time vs dimension (batch 128)"),
                &png,
            )?;
            println!("wrote {} and {}", json.display(), png.display());
            Ok(())
        }
        BenchArgs {
            spec: Some(spec),
            steps,
            warmup,
            dtype,
            compare_exact,
            profile,
            json,
            device,
            matmul,
            ..
        } => {
            // Under `mpirun`, every rank times its share of the batch and rank 0 reports.
            let leader = comm.rank() == 0;
            let chosen = resolve_device_on(device, comm, false)?;
            let spec = spec_from(&spec)?;
            if steps == 0 {
                bail!("--steps must be at least 1");
            }
            let mut specs = vec![spec.clone()];
            if compare_exact && spec.objective.gradient != GradientMode::Exact {
                let mut e = spec.clone();
                e.objective.gradient = GradientMode::Exact;
                e.name = format!("{}(exact)", spec.name);
                specs.push(e);
            }
            for s in &specs {
                let opts = snfc_runtime::bench::BenchOptions {
                    steps,
                    warmup,
                    level: OptLevel::Full,
                    profile,
                    device: chosen.clone(),
                    matmul: matmul.precision(),
                    // Sampling is timed alone, not over the ranks.
                    sampling: comm.size() == 1,
                    comm: comm.clone(),
                };
                let r = match dtype {
                    Dtype::F32 => snfc_runtime::bench::bench_step::<f32>(s, &opts)?,
                    Dtype::F64 => snfc_runtime::bench::bench_step::<f64>(s, &opts)?,
                };
                if !leader {
                    continue;
                }
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                } else {
                    println!(
                    "{} [{} gradient, {} {}, B={}, {} threads]: median step {:.2} ms (min {:.2}), {:.0} examples/s, {:.2} GFLOP/step, {:.1} GFLOP/s, {} GEMMs, {} inverses, {} kernels",
                    r.spec, r.gradient, r.device, r.dtype, r.batch, r.threads, r.median_step_ms, r.min_step_ms,
                    r.examples_per_sec, r.gflop_per_step, r.gflops, r.gemm, r.inverse, r.kernels
                );
                    if let (Some(ms), Some(share)) = (r.all_reduce_ms, r.all_reduce_share) {
                        println!(
                        "  {} ranks of B={} each; gradient all-reduce {ms:.2} ms per step ({:.1} % of the step)",
                        r.ranks,
                        r.batch / r.ranks,
                        share * 100.0
                    );
                    }
                    if let Some(smp) = &r.sampling {
                        // An exact-gradient spec has no learned inverse: only W⁻¹ is timed.
                        let learned = smp
                            .learned_ms_per_sample
                            .map(|ms| format!("learned inverse {ms:.3} ms/sample, "))
                            .unwrap_or_default();
                        println!(
                        "  sampling ({} samples, host f64): {learned}exact inverse {:.3} ms/sample",
                        smp.samples, smp.exact_ms_per_sample
                    );
                    }
                    print_profile(&r);
                }
            }
            Ok(())
        }
        BenchArgs { spec: None, .. } => bail!("bench: give a SPEC or --scaling fc|conv"),
    }
}

/// `bench --profile`: the step's time per kind of work (adding up to the profiled step), the
/// step's share of its GEMMs' own rate, then every kernel kind.
fn print_profile(r: &snfc_runtime::bench::BenchResult) {
    use snfc_runtime::profile::Work;
    let Some(step_ms) = r.profiled_step_ms else {
        return;
    };
    println!("  where a step's {step_ms:.2} ms go (mean of the profiled steps):");
    // Kinds of work the step does not have are left out; `other` is always shown.
    for w in r
        .breakdown
        .iter()
        .filter(|w| w.ms != 0.0 || w.work == Work::Other)
    {
        println!(
            "  {:>9.3} ms  {:>5.1} %  {}",
            w.ms,
            100.0 * w.ms / step_ms,
            w.work.name()
        );
    }
    if let (Some(rate), Some(share)) = (r.gemm_rate_gflops, r.share_of_gemm_rate) {
        println!(
            "  the step's GEMMs alone, in cache: {rate:.1} GFLOP/s; the step runs at {:.1} GFLOP/s, {:.0} % of that",
            r.gflops,
            100.0 * share
        );
    }
    println!("  per kernel kind:");
    for row in &r.profile {
        println!(
            "  {:>9.3} ms  {:>4}×  {:<11}  {}",
            row.seconds * 1e3,
            row.count,
            row.work.name(),
            row.kind
        );
    }
}
