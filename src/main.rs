//! `snfc`: compile, train, evaluate and sample self-normalizing flows.

//!
//! This file holds the command line (what each command takes) and hands each command to its
//! module under `commands/`.

mod commands;

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use snfc_runtime::cube::probe::DeviceKind;
use snfc_runtime::distributed;
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

/// Where a GPU run draws its random numbers (`train`'s dequantization noise, `sample`'s latent).
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum NoiseSource {
    Device,
    Host,
}

/// The arithmetic of f32 matrix products on a GPU.
#[derive(Clone, Copy, Debug, ValueEnum, PartialEq)]
enum Matmul {
    /// Tensor cores where the device has them (operands rounded to TF32, f32 sums).
    Tf32,
    /// Full f32 products on every device.
    F32,
}

impl Matmul {
    fn precision(self) -> snfc_runtime::cube::matmul::MatmulPrecision {
        match self {
            Matmul::Tf32 => snfc_runtime::cube::matmul::MatmulPrecision::Tf32,
            Matmul::F32 => snfc_runtime::cube::matmul::MatmulPrecision::F32,
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
    Compile(CompileArgs),
    /// Train a spec (or a compiled plan.json); writes OUT/metrics.jsonl,
    /// OUT/checkpoint.safetensors (best validation epoch) and OUT/last.safetensors (where
    /// --resume continues). Ctrl-C or SIGTERM stops after the step in progress, saved (exit
    /// 130); a second one stops at once.
    #[command(after_help = "Examples:
  snfc train specs/mnist_fc2.json --epochs 5          # into runs/mnist_fc2
  snfc train specs/mnist_cnn9.json --data ~/mnist -o runs/cnn9
  snfc train --resume runs/cnn9 --epochs 100          # continue, with a higher target")]
    Train(TrainArgs),
    /// Exact negative log-likelihood of a checkpoint on the test split.
    #[command(after_help = "Examples:
  snfc eval runs/mnist_fc2/checkpoint.safetensors
  snfc eval runs/mnist_fc2/checkpoint.safetensors --split valid --json
  snfc eval runs/cnn9/checkpoint.safetensors --data ~/mnist        # the full MNIST test set")]
    Eval(EvalArgs),
    /// Draw samples: z ~ N(0, I) through the learned inverse (or the exact one).
    #[command(after_help = "Examples:
  snfc sample runs/mnist_fc2/checkpoint.safetensors -n 64 -o samples.png
  snfc sample runs/glow/checkpoint.safetensors --temperature 0.7 -o cold.png
  snfc sample runs/mnist_fc2/checkpoint.safetensors --exact-inverse -o exact.npy")]
    Sample(SampleArgs),
    /// One step's gradients for given parameters and batch, as safetensors.
    #[command(after_help = "Examples:
  snfc grad specs/mnist_fc2.json --params runs/mnist_fc2/checkpoint.safetensors --input x.npy -o g.safetensors
  snfc grad specs/mnist_fc2.json --params p.safetensors --input x.npy --noise u.npy --dtype f64 -o g.safetensors")]
    Grad(GradArgs),
    /// Time the training step: median step time, examples/s, GFLOP/s.
    #[command(after_help = "Examples:
  snfc bench specs/mnist_fc2.json --compare-exact
  snfc bench specs/mnist_cnn9.json --profile          # where the step's time goes
  snfc bench --scaling fc --dims 256,784,3072 -o bench/scaling")]
    Bench(BenchArgs),
    /// Draw the curves of one or more runs into a PNG: the validation NLL (solid) and training
    /// NLL (dashed) in nats and bits/dim against epoch, the validation NLL against wall-clock
    /// time, the training objective, and the reconstruction error, λ and gradient angles where
    /// logged. One colour per run.
    #[command(after_help = "Examples:
  snfc plot runs/mnist_fc2 -o curves.png
  snfc plot runs/mnist_fc2 runs/mnist_fc2_exact -o compare.png      # overlaid, one colour each")]
    Plot(PlotArgs),
}

/// The arguments of `snfc compile`.
#[derive(clap::Args)]
struct CompileArgs {
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
}

/// The arguments of `snfc train`.
#[derive(clap::Args)]
struct TrainArgs {
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
    /// Matrix products on a GPU: tf32 lets tensor cores round their operands to TF32 (where
    /// the device has them); f32 keeps full f32 products. The host ignores it.
    #[arg(long, value_enum, default_value = "tf32")]
    matmul: Matmul,
    /// Where the dequantization noise of 8-bit specs is drawn: device (a GPU draws it from a
    /// seed of the run's generator, and the step uploads only its batch) or host (the run's
    /// generator on the CPU: the same numbers on every device, uploaded each step). The host
    /// backend always draws on the host.
    #[arg(long, value_enum, default_value = "device")]
    noise: NoiseSource,
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
}

/// The arguments of `snfc eval`.
#[derive(clap::Args)]
struct EvalArgs {
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
    /// Where the examples are evaluated: the host in f64, or a GPU in f32 (every example's
    /// terms on the device; Σ ln|det W| once, by LU on the host in f64).
    #[arg(long, value_enum, default_value = "host")]
    device: Device,
}

/// The arguments of `snfc sample`.
#[derive(clap::Args)]
struct SampleArgs {
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
    /// Where the flow runs backwards: the host in f64 (LU solves, Newton's method to
    /// tolerance), or a GPU in f32 (the compiled sampling graph; an exact inverse's W⁻¹ by
    /// LU on the host).
    #[arg(long, value_enum, default_value = "host")]
    device: Device,
    /// Where a GPU draws the latent: device (cubek-random, from --seed) or host (the host's
    /// stream: the same samples as --device host, to f32 precision). The host ignores it.
    #[arg(long, value_enum, default_value = "device")]
    noise: NoiseSource,
}

/// The arguments of `snfc grad`.
#[derive(clap::Args)]
struct GradArgs {
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
}

/// The arguments of `snfc bench`.
#[derive(clap::Args)]
struct BenchArgs {
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
    /// Matrix products on a GPU: tf32 (tensor cores where the device has them) or f32.
    #[arg(long, value_enum, default_value = "tf32")]
    matmul: Matmul,
}

/// The arguments of `snfc plot`.
#[derive(clap::Args)]
struct PlotArgs {
    /// Run directories (each with a metrics.jsonl), or metrics files (named by their file name
    /// unless it is metrics.jsonl).
    #[arg(required = true)]
    runs: Vec<PathBuf>,
    /// The PNG to write.
    #[arg(short, long, default_value = "curves.png")]
    out: PathBuf,
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
        Command::Train(_)
        | Command::Bench(BenchArgs {
            spec: Some(_),
            scaling: None,
            ..
        }) => distributed::world(),
        _ => distributed::solo(),
    };
    if let Err(e) = run(cli, &comm) {
        let (rank, ranks) = (comm.rank(), comm.size());
        if let Some(commands::train::Interrupted(message)) =
            e.downcast_ref::<commands::train::Interrupted>()
        {
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

/// Hand each command to its module.
fn run(cli: Cli, comm: &distributed::Comm) -> Result<()> {
    match cli.command {
        Command::Compile(args) => commands::compile::run(args, comm),
        Command::Train(args) => commands::train::run(args, comm),
        Command::Eval(args) => commands::eval::run(args, comm),
        Command::Sample(args) => commands::sample::run(args, comm),
        Command::Grad(args) => commands::grad::run(args, comm),
        Command::Plot(args) => commands::plot::run(args, comm),
        Command::Bench(args) => commands::bench::run(args, comm),
    }
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
