//! `snfc`: compile, train, evaluate and sample self-normalizing flows.

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::plan::{level_of, TrainPlan};
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::{load_spec, FlowSpec, GradientMode};
use snfc_runtime::cube::probe::{choose, Chosen, DeviceKind};
use snfc_runtime::cube::source::Target;
use snfc_runtime::data::{load_data, Split};
use snfc_runtime::distributed;
use snfc_runtime::host::linalg::Real;
use snfc_runtime::model::{write_safetensors, Model};
use snfc_runtime::progress::Progress;
use std::path::{Path, PathBuf};

#[derive(Parser)]
#[command(
    name = "snfc",
    version,
    about = "The self-normalizing flow compiler",
    after_help = "Exit status: 0 done; 1 error (bad input, I/O, a run that cannot start); 2 usage \
                  (unknown flag or command); 3 the training run diverged (a non-finite loss, \
                  gradient or parameter; the checkpoints written before are kept); 130 \
                  interrupted (Ctrl-C or SIGTERM: `train` finishes the step in progress and \
                  writes last.safetensors there, which --resume continues from)."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// Which layer `bench --scaling` times.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum ScalingKind {
    /// A D × D linear layer.
    Fc,
    /// A 3 × 3 convolution on C × S × S images.
    Conv,
}

/// Where to run: `auto` picks CUDA, else a wgpu adapter that is a real GPU, else the host.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Device {
    Auto,
    Host,
    Wgpu,
    Cuda,
}

impl Device {
    fn kind(self) -> DeviceKind {
        match self {
            Device::Auto => DeviceKind::Auto,
            Device::Host => DeviceKind::Host,
            Device::Wgpu => DeviceKind::Wgpu,
            Device::Cuda => DeviceKind::Cuda,
        }
    }
}

#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Dtype {
    F32,
    F64,
}

#[derive(Subcommand)]
enum Command {
    /// Compile a spec and print or write what was compiled.
    #[command(after_help = "Examples:
  snfc compile specs/mnist_fc2.json                      # the optimized step's IR
  snfc compile specs/mnist_cnn9.json --emit stats        # op counts, FLOPs, e-graph phases
  snfc compile specs/mnist_fc2.json --emit plan,cuda -o build/fc2")]
    Compile {
        /// The flow spec (JSON) to compile.
        spec: PathBuf,
        /// Comma-separated: ir (exact training graph), ir-opt (the rewritten step), stats (JSON),
        /// plan (plan.json, which `snfc train` runs), plan-text (the plan, one line per kernel),
        /// cuda and wgsl (one generated kernel source
        /// per kernel of the plan, in cuda/ and wgsl/; needs -o).
        #[arg(long, default_value = "ir-opt", value_delimiter = ',')]
        emit: Vec<String>,
        /// Write each emitted artifact into this directory instead of stdout.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Batch size of the compiled step (default: the spec's /train/batch_size).
        #[arg(long)]
        batch: Option<usize>,
    },
    /// Train a spec (or a compiled plan.json); writes OUT/metrics.jsonl,
    /// OUT/checkpoint.safetensors (best validation epoch) and OUT/last.safetensors (where
    /// --resume continues). Ctrl-C or SIGTERM stops after the step in progress, saved (exit
    /// 130); a second one stops at once.
    #[command(after_help = "Examples:
  snfc train specs/mnist_fc2.json --epochs 5          # into runs/mnist_fc2
  snfc train specs/mnist_cnn9.json --data ~/mnist -o runs/cnn9
  snfc train --resume runs/cnn9 --epochs 100          # continue, with a higher target")]
    Train {
        /// The flow spec (JSON), or a plan.json from `snfc compile --emit plan`; with `--resume
        /// RUN` it may be left out (the run's spec is stored in its last.safetensors).
        spec: Option<PathBuf>,
        /// Epochs to train (default: the spec's /train/epochs); with --resume, the new target.
        #[arg(long)]
        epochs: Option<usize>,
        /// Output directory (default runs/<spec name>); one run at a time may use it.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// MNIST directory (IDX files), CIFAR-10 directory (data_batch_*.bin, test_batch.bin) or a .npy file; default: the embedded 10,000 MNIST digits.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Stop after this many optimizer steps (of the whole run), validating where it stops;
        /// a stop within an epoch is saved there, and --resume finishes that epoch.
        #[arg(long)]
        steps: Option<usize>,
        /// Seed of the initialization, data order and noise (default: the spec's /train/seed).
        #[arg(long)]
        seed: Option<u64>,
        /// Where the step runs: auto picks CUDA, else a real GPU through wgpu, else the host.
        #[arg(long, value_enum, default_value = "auto")]
        device: Device,
        /// Precision of the step (the GPU backends run f32 only); default f32, or with
        /// --resume the run's own.
        #[arg(long, value_enum)]
        dtype: Option<Dtype>,
        /// Start over in an output directory that holds an earlier run; its checkpoints and
        /// metrics are moved to OUT/previous-N, never deleted.
        #[arg(long, conflicts_with = "resume")]
        force: bool,
        /// Continue a run from its last.safetensors (parameters, Adam state, data order, RNG,
        /// λ, best NLL so far, the step within an unfinished epoch): RUN is the run directory
        /// or its last.safetensors; bare, the --out directory. --epochs may raise the target.
        #[arg(long, value_name = "RUN", num_args = 0..=1)]
        resume: Option<Option<PathBuf>>,
        /// Every N steps, compute the exact gradient at the same parameters and batch and log
        /// the angle (degrees) between it and the self-normalizing gradient, per layer and
        /// mean (metrics.jsonl `grad_angle_deg`; the paper's Fig. 3).
        #[arg(long, value_name = "N")]
        angle_every: Option<usize>,
        /// Run the graph with only the substitution rules: no algebraic optimization, no fusion.
        #[arg(long)]
        no_fusion: bool,
        /// Train the same objective with its exact gradient (every rewrite off: W⁻ᵀ from an
        /// LU each step, O(D³)): the control that separates the self-normalizing
        /// approximation from the objective itself.
        #[arg(long, conflicts_with = "no_fusion")]
        exact: bool,
        /// No progress bar, device line or per-epoch lines.
        #[arg(long, short)]
        quiet: bool,
        /// Print one JSON object summarizing the run on stdout when it ends.
        #[arg(long)]
        json: bool,
    },
    /// Exact negative log-likelihood of a checkpoint on the test split.
    #[command(after_help = "Examples:
  snfc eval runs/mnist_fc2/checkpoint.safetensors
  snfc eval runs/mnist_fc2/checkpoint.safetensors --split valid --json
  snfc eval runs/cnn9/checkpoint.safetensors --data ~/mnist        # the full MNIST test set")]
    Eval {
        /// A checkpoint (.safetensors) written by `snfc train`.
        checkpoint: PathBuf,
        /// MNIST or CIFAR-10 directory, or a .npy file (evaluated whole); default: the embedded test split.
        #[arg(long)]
        data: Option<PathBuf>,
        /// Override the spec stored in the checkpoint.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Which split of an MNIST or CIFAR data set: test (the default), valid or train. A
        /// .npy file has no splits: it is evaluated whole.
        #[arg(long)]
        split: Option<String>,
        /// Print the result as one JSON object.
        #[arg(long)]
        json: bool,
        /// Evaluation runs on the host in f64 (exact log-determinants by LU).
        #[arg(long, value_enum, default_value = "host")]
        device: Device,
    },
    /// Draw samples: z ~ N(0, I) through the learned inverse (or the exact one).
    #[command(after_help = "Examples:
  snfc sample runs/mnist_fc2/checkpoint.safetensors -n 64 -o samples.png
  snfc sample runs/glow/checkpoint.safetensors --temperature 0.7 -o cold.png
  snfc sample runs/mnist_fc2/checkpoint.safetensors --exact-inverse -o exact.npy")]
    Sample {
        /// A checkpoint (.safetensors) written by `snfc train`.
        checkpoint: PathBuf,
        /// Number of samples.
        #[arg(short, default_value_t = 64)]
        n: usize,
        /// Output file; its extension decides the format: .png (a grid, for image specs with
        /// 8-bit data) or .npy (float rows, any spec). Default: samples.png where a grid can
        /// be drawn, else samples.npy.
        #[arg(short, long)]
        out: Option<PathBuf>,
        /// Invert with W⁻¹ (LU) instead of the learned R.
        #[arg(long)]
        exact_inverse: bool,
        /// Seed of the latent draw.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Draw the latent from N(0, T²): T < 1 gives smoother, less varied samples.
        #[arg(long, default_value_t = 1.0)]
        temperature: f64,
        /// Override the spec stored in the checkpoint.
        #[arg(long)]
        spec: Option<PathBuf>,
        /// Sampling runs on the host in f64.
        #[arg(long, value_enum, default_value = "host")]
        device: Device,
    },
    /// One step's gradients for given parameters and batch, as safetensors.
    #[command(after_help = "Examples:
  snfc grad specs/mnist_fc2.json --params runs/mnist_fc2/checkpoint.safetensors --input x.npy -o g.safetensors
  snfc grad specs/mnist_fc2.json --params p.safetensors --input x.npy --noise u.npy --dtype f64 -o g.safetensors")]
    Grad {
        /// The flow spec (JSON) whose step to run.
        spec: PathBuf,
        /// Parameters (.safetensors, e.g. a checkpoint) with the names the spec implies.
        #[arg(long)]
        params: PathBuf,
        /// Batch as .npy, shape [B, D...] (one example per row).
        #[arg(long)]
        input: PathBuf,
        /// Where to write the gradients, loss, nll and recon (.safetensors).
        #[arg(short, long)]
        out: PathBuf,
        /// Precision of the step.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Seed of the dequantization noise (8-bit specs).
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// The dequantization noise itself, .npy of the input's shape with values in [0, 1).
        #[arg(long)]
        noise: Option<PathBuf>,
        /// Run the graph with only the substitution rules: no algebraic optimization, no fusion.
        #[arg(long)]
        no_fusion: bool,
        /// The exact gradient of the same objective: every rewrite off, W⁻ᵀ from an LU where
        /// the self-normalizing step uses Rᵀ (what `train --angle-every` compares against).
        #[arg(long, conflicts_with = "no_fusion")]
        exact: bool,
        /// Where the step runs.
        #[arg(long, value_enum, default_value = "host")]
        device: Device,
    },
    /// Time the training step: median step time, examples/s, GFLOP/s.
    #[command(after_help = "Examples:
  snfc bench specs/mnist_fc2.json --compare-exact
  snfc bench specs/mnist_cnn9.json --profile          # where the step's time goes
  snfc bench --scaling fc --dims 256,784,3072 -o bench/scaling")]
    Bench {
        /// The spec to time (not with --scaling).
        #[arg(required_unless_present = "scaling")]
        spec: Option<PathBuf>,
        /// Instead of a spec: time one self-normalizing layer against its exact counterpart
        /// at each of --dims (batch 128, N(0, 1) data; the paper's Fig. 4), writing
        /// scaling-KIND.json and a log-log scaling-KIND.png into --out.
        #[arg(long, value_enum, conflicts_with = "spec")]
        scaling: Option<ScalingKind>,
        /// Input dimensions for --scaling (conv: C·S² with S of 32, 28, 16, 8 or 4).
        #[arg(
            long,
            value_delimiter = ',',
            default_value = "256,512,784,1024,2048,3072"
        )]
        dims: Vec<usize>,
        /// Output directory for --scaling.
        #[arg(short, long, default_value = "bench/scaling")]
        out: PathBuf,
        /// Timed steps (the median is reported).
        #[arg(long, default_value_t = 30)]
        steps: usize,
        /// Untimed steps first.
        #[arg(long, default_value_t = 5)]
        warmup: usize,
        /// Precision of the step.
        #[arg(long, value_enum, default_value = "f32")]
        dtype: Dtype,
        /// Also time the exact-gradient version of the spec.
        #[arg(long)]
        compare_exact: bool,
        /// Print where a step's time goes, per op kind.
        #[arg(long)]
        profile: bool,
        /// Print each result as one JSON object.
        #[arg(long)]
        json: bool,
        /// Where the step runs.
        #[arg(long, value_enum, default_value = "host")]
        device: Device,
    },
    /// Draw the curves of one or more runs into a PNG: the validation NLL (solid) and training
    /// NLL (dashed) in nats and bits/dim against epoch, the validation NLL against wall-clock
    /// time, the training objective, and the reconstruction error, λ and gradient angles where
    /// logged. One colour per run.
    #[command(after_help = "Examples:
  snfc plot runs/mnist_fc2 -o curves.png
  snfc plot runs/mnist_fc2 runs/mnist_fc2_exact -o compare.png      # overlaid, one colour each")]
    Plot {
        /// Run directories (each with a metrics.jsonl), or metrics files (named by their file name
        /// unless it is metrics.jsonl).
        #[arg(required = true)]
        runs: Vec<PathBuf>,
        /// The PNG to write.
        #[arg(short, long, default_value = "curves.png")]
        out: PathBuf,
    },
}

/// Pick the device and say which (on stderr).
fn resolve_device(d: Device) -> Result<Chosen> {
    let chosen = choose(d.kind()).map_err(|e| anyhow!(e))?;
    eprintln!("device: {chosen}");
    Ok(chosen)
}

/// [`resolve_device`] for a rank of a data-parallel job: only rank 0 says which device, and
/// not under `--quiet`.
fn resolve_device_on(d: Device, comm: &distributed::Comm, quiet: bool) -> Result<Chosen> {
    if comm.rank() == 0 && !quiet {
        resolve_device(d)
    } else {
        choose(d.kind()).map_err(|e| anyhow!(e))
    }
}

/// `train` stopped by Ctrl-C or SIGTERM: exit status 130, after this message.
#[derive(Debug)]
struct Interrupted(String);

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

/// Evaluation and sampling run in f64 on the host (exact log-determinants by LU).
fn host_only(d: Device, what: &str) -> Result<()> {
    if matches!(d, Device::Wgpu | Device::Cuda) {
        bail!("--device {d:?}: `snfc {what}` runs on the host in f64 (exact log-determinants by LU); use --device host or auto");
    }
    Ok(())
}

/// A spec file, or a plan file from `snfc compile --emit plan` with its spec (whose batch size
/// becomes the plan's).
fn spec_or_plan(path: &Path) -> Result<(FlowSpec, Option<TrainPlan>)> {
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

fn spec_from(path: &Path) -> Result<FlowSpec> {
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
fn not_a_checkpoint(path: &Path) -> Result<()> {
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
fn checkpoint_path(path: &Path) -> Result<()> {
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

fn level(no_fusion: bool) -> OptLevel {
    if no_fusion {
        OptLevel::Substitution
    } else {
        OptLevel::Full
    }
}

/// Vulkan loaders print "error: XDG_RUNTIME_DIR is invalid or not set in the environment."
/// while `--device auto` probes for a GPU, which reads like a failure of the run. Without a
/// usable runtime directory, point them at a private one (created 0700 under the temporary
/// directory). Called first in `main`, before any thread exists.
fn ensure_runtime_dir() {
    let usable = std::env::var_os("XDG_RUNTIME_DIR").is_some_and(|d| Path::new(&d).is_dir());
    if usable {
        return;
    }
    let user = std::env::var("USER").unwrap_or_else(|_| "user".to_string());
    let dir = std::env::temp_dir().join(format!("snfc-runtime-{user}"));
    #[cfg(unix)]
    let made = {
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new().mode(0o700).create(&dir).is_ok() || dir.is_dir()
    };
    #[cfg(not(unix))]
    let made = std::fs::create_dir_all(&dir).is_ok();
    if made {
        std::env::set_var("XDG_RUNTIME_DIR", &dir);
    }
}

fn main() {
    snfc_runtime::keep_freed_memory();
    ensure_runtime_dir();
    let cli = Cli::parse();
    // Training joins the other processes of an `mpirun` job (with the `mpi` feature); alone,
    // or for any other command, the process is the only rank.
    let comm = match cli.command {
        Command::Train { .. }
        | Command::Bench {
            spec: Some(_),
            scaling: None,
            ..
        } => distributed::world(),
        _ => distributed::solo(),
    };
    if let Err(e) = run(cli, &comm) {
        let (rank, ranks) = (comm.rank(), comm.size());
        if let Some(Interrupted(message)) = e.downcast_ref::<Interrupted>() {
            // Every rank stopped after the same step, and the run is saved: end normally.
            if rank == 0 {
                eprintln!("{message}");
            }
            drop(comm);
            std::process::exit(130);
        }
        if rank > 0 {
            // Most failures happen on every rank at once (a bad spec, a diverged step): rank 0
            // reports them and ends the job; a rank that failed alone says so after a moment.
            std::thread::sleep(std::time::Duration::from_secs(2));
        }
        // Several problems (a spec's, say) are one line each, every one marked as an error.
        for line in format!("{e:#}").lines() {
            if rank > 0 {
                eprintln!("error: rank {rank} of {ranks}: {line}");
            } else {
                eprintln!("error: {line}");
            }
        }
        let code = exit_code(&e);
        if ranks > 1 {
            // The other ranks may be waiting in a collective: end them too.
            comm.abort(code);
        }
        std::process::exit(code);
    }
}

/// A usage error (exit status 2), in clap's words and format.
fn usage_error(message: &str) -> ! {
    use clap::CommandFactory;
    let mut cli = Cli::command();
    cli.build();
    let train = cli.find_subcommand_mut("train").cloned();
    train
        .unwrap_or(cli)
        .error(clap::error::ErrorKind::MissingRequiredArgument, message)
        .exit()
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

/// The exit status of a failure: 3 for a diverged training run (so that a script can tell it
/// from a typo), 1 for every other error (usage errors are clap's, 2).
fn exit_code(e: &anyhow::Error) -> i32 {
    let diverged = e.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<snfc_runtime::train::TrainError>(),
            Some(snfc_runtime::train::TrainError::Diverged(_))
        )
    });
    if diverged {
        3
    } else {
        1
    }
}

fn run(cli: Cli, comm: &distributed::Comm) -> Result<()> {
    match cli.command {
        Command::Compile {
            spec,
            emit,
            out,
            batch,
        } => compile(&spec, &emit, out.as_deref(), batch),
        Command::Train {
            spec,
            epochs,
            out,
            data,
            steps,
            seed,
            device,
            dtype,
            force,
            resume,
            angle_every,
            no_fusion,
            exact,
            quiet,
            json,
        } => {
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
                    (snfc_compiler::spec::parse_spec(&text).map_err(|e| anyhow!("{e}"))?, None)
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
            let recorded: Option<snfc_runtime::train::RunOptions> =
                serde_json::from_slice(&recorded_json)?;
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
        Command::Eval {
            checkpoint,
            data,
            spec,
            split,
            json,
            device,
        } => {
            host_only(device, "eval")?;
            let spec = spec.as_deref().map(spec_from).transpose()?;
            checkpoint_path(&checkpoint)?;
            let (model, _) = Model::<f64>::load(&checkpoint, spec.as_ref())?;
            let (split, measured) = eval_split(&model.spec, data.as_deref(), split.as_deref())?;
            let progress = Progress::new(split.n as u64, "evaluating", "examples", !json);
            let r = snfc_runtime::eval::evaluate_sharded(
                &model,
                &split,
                500,
                0,
                &distributed::Solo,
                &progress,
            )?;
            if json {
                let mut v = serde_json::to_value(&r)?;
                v["data"] = serde_json::Value::String(measured);
                println!("{v}");
            } else {
                println!(
                    "{}: NLL {:.3} nats, {:.5} bits/dim over {} examples of {measured}{}",
                    model.spec.name,
                    r.nll_nats,
                    r.bits_per_dim,
                    r.examples,
                    r.recon
                        .map(|x| format!(" (reconstruction error {x:.3e})"))
                        .unwrap_or_default()
                );
            }
            Ok(())
        }
        Command::Sample {
            checkpoint,
            n,
            out,
            exact_inverse,
            seed,
            temperature,
            spec,
            device,
        } => {
            host_only(device, "sample")?;
            if n == 0 {
                bail!("-n must be at least 1");
            }
            if !(temperature.is_finite() && temperature > 0.0) {
                bail!("--temperature must be a positive number, got {temperature}");
            }
            let spec = spec.as_deref().map(spec_from).transpose()?;
            checkpoint_path(&checkpoint)?;
            let (model, _) = Model::<f64>::load(&checkpoint, spec.as_ref())?;
            let exact = exact_inverse || model.spec.objective.gradient == GradientMode::Exact;
            if exact && !exact_inverse {
                eprintln!("spec `{}` was trained with the exact gradient (R is not trained): sampling with W⁻¹", model.spec.name);
            }
            let limit = snfc_compiler::spec::MAX_TENSOR_ELEMENTS;
            if n.checked_mul(model.spec.input.dim())
                .is_none_or(|v| v > limit)
            {
                bail!(
                    "-n {n}: {n} samples of {} values exceed the largest tensor snfc allocates ({limit} values)",
                    model.spec.input.dim()
                );
            }
            let d = model.spec.input.dim();
            let image = snfc_runtime::sample::image_shape(&model.spec.input.shape);
            let eight_bit =
                model.spec.input.preprocess == snfc_compiler::spec::Preprocess::DequantizeLogit;
            let grid = image.filter(|_| eight_bit);
            // The file's extension decides its format, checked before anything is drawn.
            let out = out.unwrap_or_else(|| {
                PathBuf::from(if grid.is_some() {
                    "samples.png"
                } else {
                    "samples.npy"
                })
            });
            let extension = out
                .extension()
                .map(|e| e.to_string_lossy().to_ascii_lowercase());
            match (extension.as_deref(), grid) {
                (Some("npy"), _) | (Some("png"), Some(_)) => {}
                (Some("png"), None) => bail!(
                    "{}: a .png grid needs an image spec with 8-bit data (`{}` has shape {:?} and preprocess {:?}); write .npy instead",
                    out.display(),
                    model.spec.name,
                    model.spec.input.shape,
                    model.spec.input.preprocess
                ),
                _ => bail!(
                    "{}: unsupported output format; sample writes .png (a grid, for image specs with 8-bit data) or .npy (float rows)",
                    out.display()
                ),
            }
            let progress =
                Progress::new(model.spec.layers.len() as u64, "sampling", "layers", true);
            let rows = snfc_runtime::sample::sample_showing(
                &model,
                n,
                seed,
                exact,
                temperature,
                &progress,
            )?;
            match grid {
                Some([c, h, w]) if extension.as_deref() == Some("png") => {
                    let pixels = snfc_runtime::sample::to_pixels(&rows);
                    snfc_runtime::image::write_png_grid(&out, &pixels, n, c, h, w)?;
                    println!("wrote {n} samples to {}", out.display());
                }
                _ => {
                    snfc_runtime::npy::write_npy_f64(&out, &[n, d], &rows)?;
                    println!("wrote {n} samples of dimension {d} to {}", out.display());
                }
            }
            Ok(())
        }
        Command::Grad {
            spec,
            params,
            input,
            out,
            dtype,
            seed,
            noise,
            no_fusion,
            exact,
            device,
        } => {
            let chosen = resolve_device(device)?;
            let spec = spec_from(&spec)?;
            let args = GradArgs {
                device: chosen,
                params: &params,
                input: &input,
                noise: noise.as_deref(),
                out: &out,
                seed,
                level: if exact {
                    OptLevel::None
                } else {
                    level(no_fusion)
                },
            };
            match dtype {
                Dtype::F32 => grad::<f32>(&spec, &args),
                Dtype::F64 => grad::<f64>(&spec, &args),
            }
        }
        Command::Plot { runs, out } => {
            let (w, h) = snfc_runtime::plot::plot_runs(&runs, &out)?;
            println!("wrote {} ({w}×{h}, {} run(s))", out.display(), runs.len());
            Ok(())
        }
        Command::Bench {
            scaling: Some(kind),
            dims,
            out,
            steps,
            warmup,
            dtype,
            device,
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
        Command::Bench {
            spec: Some(spec),
            steps,
            warmup,
            dtype,
            compare_exact,
            profile,
            json,
            device,
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
        Command::Bench { spec: None, .. } => bail!("bench: give a SPEC or --scaling fc|conv"),
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

fn eval_split(
    spec: &FlowSpec,
    data: Option<&Path>,
    split: Option<&str>,
) -> Result<(Split, String)> {
    if let Some(p) = data {
        if p.extension().is_some_and(|e| e == "npy") {
            if let Some(s) = split {
                bail!(
                    "--split {s}: {} is evaluated whole (a .npy file has no splits); leave --split out",
                    p.display()
                );
            }
            // A .npy file is evaluated whole: any number of rows, no split.
            let all = snfc_runtime::data::load_npy_examples(p)?;
            let ds = snfc_runtime::data::Dataset {
                name: p.display().to_string(),
                dim: all.dim,
                image_shape: None,
                discrete: snfc_runtime::data::first_non_eight_bit(&all.values).is_none(),
                train: all.clone(),
                valid: all.take(0),
                test: all.take(0),
            };
            snfc_runtime::train::check_data(spec, &ds)?;
            return Ok((all, format!("all of {}", p.display())));
        }
    }
    let ds = load_data(data)?;
    snfc_runtime::train::check_data(spec, &ds)?;
    let split = split.unwrap_or("test");
    let (chosen, name) = match split {
        "test" => (ds.test, "test"),
        "valid" | "validation" => (ds.valid, "validation"),
        "train" => (ds.train, "training"),
        other => bail!("--split {other}: expected test, valid or train"),
    };
    Ok((chosen, format!("the {name} split of {}", ds.name)))
}

struct GradArgs<'a> {
    device: Chosen,
    params: &'a Path,
    input: &'a Path,
    noise: Option<&'a Path>,
    out: &'a Path,
    seed: u64,
    level: OptLevel,
}

fn grad<T: Real + 'static>(spec: &FlowSpec, args: &GradArgs) -> Result<()> {
    let GradArgs {
        params, input, out, ..
    } = *args;
    let (model, _) = Model::<T>::load(params, Some(spec))?;
    let (shape, values) = snfc_runtime::npy::read_npy(input)?;
    if let Some(k) = values
        .iter()
        .position(|v| !T::of_f64(*v).as_f64().is_finite())
    {
        bail!(
            "{}: value [{k}] = {} is not finite in {} (pass --dtype f64 for values beyond f32's range)",
            input.display(),
            values[k],
            T::NAME
        );
    }
    let d = spec.input.dim();
    let batch = shape.first().copied().unwrap_or(0);
    let per: usize = shape.iter().skip(1).product();
    if shape.len() < 2 || per != d || batch == 0 {
        bail!(
            "{}: expected a batch of shape [B, {}] (spec `{}` input shape {:?}), got {:?}",
            input.display(),
            d,
            spec.name,
            spec.input.shape,
            shape
        );
    }
    // 8-bit data, as `train` takes it: integers 0..=255 (anything else dequantizes to values
    // outside (0, 1) and every gradient is NaN).
    if spec.input.preprocess == snfc_compiler::spec::Preprocess::DequantizeLogit {
        if let Some(k) = values
            .iter()
            .position(|v| !(v.fract() == 0.0 && (0.0..=255.0).contains(v)))
        {
            bail!(
                "{}: value [{k}] = {} is not 8-bit data: spec `{}` dequantizes (/input/preprocess = \"dequantize_logit\"), which needs integers 0..=255",
                input.display(),
                values[k],
                spec.name
            );
        }
    }
    let noise_rows = match args.noise {
        Some(path) => {
            let (nshape, nvals) = snfc_runtime::npy::read_npy(path)?;
            if nshape != shape {
                bail!(
                    "{}: noise has shape {nshape:?}, but the input {} has shape {shape:?}",
                    path.display(),
                    input.display()
                );
            }
            if let Some(v) = nvals.iter().find(|v| !(0.0..1.0).contains(*v)) {
                bail!(
                    "{}: noise values must be in [0, 1), found {v}",
                    path.display()
                );
            }
            Some(nvals)
        }
        None => None,
    };
    let noise = match &noise_rows {
        Some(r) => snfc_runtime::grad::Noise::Rows(r),
        None => snfc_runtime::grad::Noise::Seed(args.seed),
    };
    let named = snfc_runtime::grad::gradients(
        &model,
        &values,
        batch,
        noise,
        args.level,
        &args.device,
        &Progress::new(3, "grad", "stages", true),
    )?;
    let meta = std::collections::HashMap::from([
        ("spec".to_string(), spec.to_json_pretty()),
        ("format".to_string(), "snfc-grad-v1".to_string()),
    ]);
    write_safetensors(out, &named, meta).with_context(|| "writing gradients")?;
    let scalar = |n: &str| {
        named
            .iter()
            .find(|(k, _, _)| k == n)
            .map(|(_, _, v)| v[0].as_f64())
            .unwrap_or(f64::NAN)
    };
    println!(
        "wrote {} gradients to {} (batch {batch}, nll {:.4} nats, recon {:.4e})",
        model.params.len(),
        out.display(),
        scalar("nll"),
        scalar("recon")
    );
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand and every argument of it says what it is for in `--help`.
    #[test]
    fn every_argument_has_help_text() {
        let cli = Cli::command();
        let mut missing = Vec::new();
        for sub in cli.get_subcommands() {
            if sub.get_about().is_none() {
                missing.push(sub.get_name().to_string());
            }
            for arg in sub.get_arguments() {
                let id = arg.get_id().as_str();
                if id != "help" && arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{} {id}", sub.get_name()));
                }
            }
        }
        assert!(missing.is_empty(), "no help text: {missing:?}");
    }
}
