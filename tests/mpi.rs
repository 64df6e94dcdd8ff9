//! Data-parallel training under `mpirun` (feature `mpi`): N ranks train the model one process
//! trains, to 1e-9 relative in f64 (summation order is the only difference); a run resumes with
//! N ranks bit-identically and with another N; a non-finite value on one rank stops every rank;
//! a killed rank ends the job and leaves the last checkpoint intact.
//!
//! Each test launches the `snfc` binary under `mpirun` (MPI initializes once per process, so not
//! inside this test binary), always under `timeout`: a rank that dies can leave others waiting.
//! Skipped, saying so, where `mpirun` is not installed.
#![cfg(feature = "mpi")]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn mpirun_available() -> bool {
    let found = Command::new("mpirun")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        eprintln!("skipped: mpirun is not installed (apt-get install openmpi-bin libopenmpi-dev)");
    }
    found
}

fn p(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

/// `snfc ARGS` under `mpirun -n RANKS` (or alone for `ranks` 0), one thread per rank.
fn launch(ranks: usize, args: &[&str]) -> Command {
    let exe = env!("CARGO_BIN_EXE_snfc");
    let mut c = if ranks == 0 {
        let mut c = Command::new("timeout");
        c.args(["300", exe]);
        c
    } else {
        let mut c = Command::new("timeout");
        c.args(["300", "mpirun", "-n", &ranks.to_string()]).args([
            "--oversubscribe",
            "--bind-to",
            "none",
            exe,
        ]);
        c
    };
    c.args(args)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env("OMPI_MCA_btl_vader_single_copy_mechanism", "none")
        .env("RAYON_NUM_THREADS", "1");
    c
}

fn run(ranks: usize, args: &[&str]) -> Output {
    launch(ranks, args).output().expect("launch")
}

#[track_caller]
fn ok(ranks: usize, args: &[&str]) -> String {
    let o = run(ranks, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        o.status.success(),
        "{ranks} ranks, {args:?}: {}\n{text}",
        o.status
    );
    text
}

/// 8-bit images `[N, 1, 8, 8]` (integer values in 0..=255, stored as f64).
fn images(dir: &Path, n: usize) -> PathBuf {
    let path = dir.join("images.npy");
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let values: Vec<f64> = (0..n * 64)
        .map(|i| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            // A bright blob in the middle, noise around it.
            let (y, x) = ((i % 64) / 8, i % 8);
            let blob = if (2..6).contains(&y) && (2..6).contains(&x) {
                160
            } else {
                0
            };
            ((state % 96) as usize + blob).min(255) as f64
        })
        .collect();
    snfc_runtime::npy::write_npy_f64(&path, &[n, 1, 8, 8], &values).unwrap();
    path
}

fn spec_file(dir: &Path, name: &str, layers: &str, extra_train: &str, objective: &str) -> PathBuf {
    let path = dir.join(format!("{name}.json"));
    std::fs::write(
        &path,
        format!(
            r#"{{"name": "{name}", "input": {{"shape": [1, 8, 8], "preprocess": "dequantize_logit"}},
                "layers": {layers}, "objective": {objective},
                "train": {{"batch_size": 8, "epochs": 2, "seed": 5, "warmup_epochs": 1,
                          "grad_clip_norm": 40.0 {extra_train}}}}}"#
        ),
    )
    .unwrap();
    path
}

/// Every tensor of a safetensors file as f64 values.
fn tensors(path: &Path) -> BTreeMap<String, Vec<f64>> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(name, v)| {
            let values = match v.dtype() {
                safetensors::Dtype::F64 => v
                    .data()
                    .chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                safetensors::Dtype::F32 => v
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                    .collect(),
                _ => v.data().iter().map(|b| *b as f64).collect(),
            };
            (name, values)
        })
        .collect()
}

fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[track_caller]
fn assert_close_tensors(a: &Path, b: &Path, tol: f64) {
    let (ta, tb) = (tensors(a), tensors(b));
    assert_eq!(
        ta.keys().collect::<Vec<_>>(),
        tb.keys().collect::<Vec<_>>(),
        "{} vs {}",
        a.display(),
        b.display()
    );
    for (name, va) in &ta {
        let vb = &tb[name];
        assert_eq!(va.len(), vb.len(), "{name}");
        let scale = va.iter().fold(1e-300f64, |m, v| m.max(v.abs()));
        for (i, (x, y)) in va.iter().zip(vb).enumerate() {
            assert!(
                (x - y).abs() <= tol * scale,
                "{name}[{i}]: {x} vs {y} ({} vs {})",
                a.display(),
                b.display()
            );
        }
    }
}

/// The numbers of two runs' metrics agree to `tol` relative (times, ranks and all-reduce
/// seconds aside).
#[track_caller]
fn assert_close_metrics(a: &[serde_json::Value], b: &[serde_json::Value], tol: f64) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        for key in [
            "train_objective_data_terms",
            "train_nll_nats",
            "val_nll_nats",
            "val_recon",
            "lr",
        ] {
            let (u, v) = (x[key].as_f64().unwrap(), y[key].as_f64().unwrap());
            assert!(
                (u - v).abs() <= tol * u.abs().max(1e-300),
                "{key}: {u} vs {v}"
            );
        }
        assert_eq!(x["steps"], y["steps"]);
        if let Some(lambda) = x["lambda"].as_object() {
            for (layer, u) in lambda {
                let (u, v) = (u.as_f64().unwrap(), y["lambda"][layer].as_f64().unwrap());
                assert!((u - v).abs() <= tol * u.abs(), "λ {layer}: {u} vs {v}");
            }
        }
    }
}

/// `snfc ARGS --out DIR/NAME1` alone and `--out DIR/NAME2` on two ranks; the two runs' last
/// parameters and metrics agree to `tol` relative. Returns the two directories and what the
/// 2-rank job printed.
fn alone_and_on_two_ranks(
    dir: &Path,
    name: &str,
    args: &[&str],
    tol: f64,
) -> (PathBuf, PathBuf, String) {
    let (one, two) = (dir.join(format!("{name}1")), dir.join(format!("{name}2")));
    let with_out = |out: &Path| {
        let mut a = args.to_vec();
        a.extend(["--out", p(out)]);
        a.iter().map(|s| s.to_string()).collect::<Vec<_>>()
    };
    let (a1, a2) = (with_out(&one), with_out(&two));
    ok(0, &a1.iter().map(String::as_str).collect::<Vec<_>>());
    let text = ok(2, &a2.iter().map(String::as_str).collect::<Vec<_>>());
    assert_close_tensors(
        &one.join("last.safetensors"),
        &two.join("last.safetensors"),
        tol,
    );
    assert_close_metrics(&metrics(&one), &metrics(&two), tol);
    (one, two, text)
}

const FC: &str = r#"[{"type": "linear"}, {"type": "smooth_leaky_relu", "alpha": 0.3},
                    {"type": "linear"}]"#;
const CNN: &str = r#"[{"type": "conv", "kernel_size": 3}, {"type": "smooth_leaky_relu", "alpha": 0.3},
                     {"type": "conv", "kernel_size": 3}, {"type": "spline", "bins": 4}]"#;
const GLOW: &str = r#"[{"type": "squeeze"}, {"type": "actnorm"}, {"type": "conv", "kernel_size": 1},
                      {"type": "affine_coupling", "width": 4}, {"type": "split"},
                      {"type": "conv", "kernel_size": 3}]"#;
const GECO: &str = r#"{"lambda": {"geco": {"lambda0": 1.0, "lr": 0.01, "ema": 0.9}}}"#;

/// Two ranks train what one process trains: parameters, Adam moments, λ, losses and
/// validation NLLs to 1e-9, for a fully connected, a convolutional and a Glow flow (actnorm's
/// data-dependent init, GECO, clipping by global norm, flips and pad-crop augmentation).
#[test]
fn two_ranks_train_what_one_process_trains() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = images(dir.path(), 120);
    for (name, layers, train, objective) in [
        ("fc", FC, "", "{}"),
        ("cnn", CNN, "", "{}"),
        ("glow", GLOW, r#", "augment": "hflip_pad_crop""#, GECO),
    ] {
        let spec = spec_file(dir.path(), name, layers, train, objective);
        let args = [
            "train",
            p(&spec),
            "--data",
            p(&data),
            "--dtype",
            "f64",
            "-q",
        ];
        let (one, two, text) = alone_and_on_two_ranks(dir.path(), name, &args, 1e-9);
        // One rank reports and writes.
        assert_eq!(
            text.matches("best validation NLL").count(),
            1,
            "{name}: {text}"
        );
        assert_close_tensors(
            &one.join("checkpoint.safetensors"),
            &two.join("checkpoint.safetensors"),
            1e-9,
        );
        let (m1, m2) = (metrics(&one), metrics(&two));
        assert_eq!(
            (m1[0]["ranks"].as_u64(), m2[0]["ranks"].as_u64()),
            (Some(1), Some(2))
        );
        assert!(
            m2[1]["all_reduce_seconds"]
                .as_f64()
                .is_some_and(|s| s > 0.0),
            "{name}"
        );
        assert!(m1[1].get("all_reduce_seconds").is_none());
    }
}

/// A 2-rank run resumed with 2 ranks ends bit-identical to an uninterrupted 2-rank run; the
/// same run resumed with 1 rank ends where one process would have (the saved state is global).
#[test]
fn a_run_resumes_with_the_same_or_another_number_of_ranks() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = images(dir.path(), 120);
    let spec = spec_file(dir.path(), "glow", GLOW, r#", "augment": "pad_crop""#, GECO);
    let train = |ranks: usize, out: &Path, extra: &[&str]| {
        let mut args = vec![
            "train",
            p(&spec),
            "--data",
            p(&data),
            "--dtype",
            "f64",
            "-q",
        ];
        args.extend(["--out", p(out)]);
        args.extend(extra);
        ok(ranks, &args)
    };
    let whole2 = dir.path().join("whole2");
    train(2, &whole2, &[]);
    let parts2 = dir.path().join("parts2");
    train(2, &parts2, &["--epochs", "1"]);
    std::fs::copy(
        parts2.join("last.safetensors"),
        dir.path().join("after1.safetensors"),
    )
    .unwrap();
    let parts1 = dir.path().join("parts1");
    std::fs::create_dir(&parts1).unwrap();
    for f in [
        "last.safetensors",
        "checkpoint.safetensors",
        "metrics.jsonl",
    ] {
        std::fs::copy(parts2.join(f), parts1.join(f)).unwrap();
    }
    train(2, &parts2, &["--resume"]);
    assert_eq!(
        tensors(&whole2.join("last.safetensors")),
        tensors(&parts2.join("last.safetensors")),
        "2 ranks resumed with 2 ranks"
    );
    // The second epoch on one process: what one process gets from the same first epoch.
    train(0, &parts1, &["--resume"]);
    assert_close_tensors(
        &whole2.join("last.safetensors"),
        &parts1.join("last.safetensors"),
        1e-9,
    );
    assert_close_metrics(&metrics(&whole2), &metrics(&parts1), 1e-9);
}

/// A value that overflows in f32 on the rank that holds one example (1e30 in a continuous data
/// set, squared in the base density)
/// stops every rank with the divergence message and a failure status, without hanging.
#[test]
fn a_non_finite_value_on_one_rank_stops_every_rank() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("x.npy");
    let mut rows: Vec<f64> = (0..40 * 4)
        .map(|i| ((i * 37 % 100) as f64) / 50.0 - 1.0)
        .collect();
    rows[4 * 7 + 2] = 1e30;
    snfc_runtime::npy::write_npy_f64(&data, &[40, 4], &rows).unwrap();
    let spec = dir.path().join("s.json");
    std::fs::write(
        &spec,
        r#"{"name": "s", "input": {"shape": [4], "preprocess": "none"},
            "layers": [{"type": "linear"}, {"type": "smooth_leaky_relu", "alpha": 0.3}],
            "train": {"batch_size": 4, "epochs": 2, "seed": 0}}"#,
    )
    .unwrap();
    let out = dir.path().join("run");
    let started = Instant::now();
    let o = run(
        2,
        &[
            "train",
            p(&spec),
            "--data",
            p(&data),
            "--dtype",
            "f32",
            "-q",
            "--out",
            p(&out),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    // The diverged run's status (3), through MPI_Abort and mpirun.
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert!(
        err.contains("error:")
            && (err.contains("non-finite") || err.contains("inf") || err.contains("NaN")),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}

/// The arguments of a 150-epoch f64 run of the FC spec on 120 images written into `dir`, into
/// the `--out` given, with `extra` flags: the long runs that are stopped and resumed.
fn fc_run_150_epochs(dir: &Path, extra: &[&str]) -> impl Fn(&Path) -> Vec<String> {
    let data = images(dir, 120);
    let spec = spec_file(dir, "fc", FC, "", "{}");
    let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    move |out: &Path| {
        let mut a: Vec<String> = [
            "train",
            p(&spec),
            "--data",
            p(&data),
            "--dtype",
            "f64",
            "--epochs",
            "150",
            "--out",
            p(out),
        ]
        .map(String::from)
        .to_vec();
        a.extend(extra.iter().cloned());
        a
    }
}

/// A rank killed with SIGKILL ends the job with a failure status within a bounded time; the
/// last complete checkpoint is intact, and resuming from it ends bit-identical to a run that
/// was never interrupted.
#[test]
fn a_killed_rank_ends_the_job_and_the_run_resumes() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = fc_run_150_epochs(dir.path(), &["-q"]);
    let whole = dir.path().join("whole");
    let a = args(&whole);
    ok(2, &a.iter().map(String::as_str).collect::<Vec<_>>());

    let killed = dir.path().join("killed");
    let a = args(&killed);
    let mut job = launch(2, &a.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("launch");
    // Wait for a few epochs, then kill one rank.
    let waited = Instant::now();
    while std::fs::read_to_string(killed.join("metrics.jsonl"))
        .map(|m| m.lines().count())
        .unwrap_or(0)
        < 3
    {
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "no epoch finished"
        );
        assert!(
            job.try_wait().unwrap().is_none(),
            "the job ended before it was killed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = rank_pids(&killed);
    let victim = pids.last().unwrap();
    assert!(Command::new("kill")
        .args(["-KILL", victim])
        .status()
        .unwrap()
        .success());
    let killed_at = Instant::now();
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        assert!(
            killed_at.elapsed() < Duration::from_secs(60),
            "the job outlived a killed rank by 60 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "{status}");
    let epochs_done = metrics(&killed).len();
    eprintln!("killed rank {victim} of {pids:?}: the job ended ({status}) after {:?}, with {epochs_done} epochs saved", killed_at.elapsed());
    assert!(epochs_done < 150, "the run finished before the kill");
    // The last complete checkpoint resumes, to the uninterrupted run's end.
    let mut a = args(&killed);
    a.push("--resume".into());
    ok(2, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        tensors(&whole.join("last.safetensors")),
        tensors(&killed.join("last.safetensors"))
    );
}

/// The pids of the ranks training into `out` (not `timeout` or `mpirun`, whose command lines
/// match too).
fn rank_pids(out: &Path) -> Vec<String> {
    let ranks = Command::new("pgrep")
        .args(["-f", &format!("snfc train .*{}", p(out))])
        .output()
        .expect("pgrep");
    let pids: Vec<String> = String::from_utf8_lossy(&ranks.stdout)
        .lines()
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "snfc")
        })
        .map(str::to_string)
        .collect();
    assert!(!pids.is_empty(), "no rank found");
    pids
}

/// SIGINT to one rank stops every rank after the same step (the stop flags are summed with the
/// step's loss): the job exits 130 with `last.safetensors` at that step, and resuming it ends bit
/// for bit where an uninterrupted run ends, metrics included.
#[test]
fn an_interrupted_rank_stops_every_rank_after_the_same_step() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let args = fc_run_150_epochs(dir.path(), &[]);
    let whole = dir.path().join("whole");
    let a = args(&whole);
    ok(2, &a.iter().map(String::as_str).collect::<Vec<_>>());

    let stopped = dir.path().join("stopped");
    let a = args(&stopped);
    let job = launch(2, &a.iter().map(String::as_str).collect::<Vec<_>>())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("launch");
    let waited = Instant::now();
    while metrics_lines(&stopped) < 3 {
        assert!(
            waited.elapsed() < Duration::from_secs(120),
            "no epoch finished"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let pids = rank_pids(&stopped);
    assert!(Command::new("kill")
        .args(["-INT", pids.last().unwrap()])
        .status()
        .unwrap()
        .success());
    let o = job.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(130), "{err}");
    assert!(err.contains("interrupted: stopped"), "{err}");
    assert!(
        metrics_lines(&stopped) < 150,
        "the run finished before the signal"
    );
    let mut a = args(&stopped);
    a.push("--resume".into());
    ok(2, &a.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(
        tensors(&whole.join("last.safetensors")),
        tensors(&stopped.join("last.safetensors"))
    );
    assert_close_metrics(&metrics(&whole), &metrics(&stopped), 0.0);
}

/// Lines in a run's metrics.jsonl (0 before the first).
fn metrics_lines(out: &Path) -> usize {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

/// `snfc bench --json` under `mpirun` times the step as training runs it (each rank its share
/// of the batch, the gradient all-reduce included) and rank 0 alone reports it, with the
/// all-reduce's time and share of the step.
#[test]
fn bench_under_mpirun_reports_the_all_reduce() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = spec_file(dir.path(), "fc", FC, "", "{}");
    let o = run(
        2,
        &[
            "bench",
            p(&spec),
            "--json",
            "--steps",
            "3",
            "--warmup",
            "1",
            "--device",
            "host",
        ],
    );
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 1, "one report, from rank 0: {text}");
    let r: serde_json::Value = serde_json::from_str(lines[0]).unwrap();
    assert_eq!(
        (r["ranks"].as_u64(), r["batch"].as_u64()),
        (Some(2), Some(8))
    );
    let (reduce, step) = (
        r["all_reduce_ms"].as_f64().unwrap(),
        r["median_step_ms"].as_f64().unwrap(),
    );
    assert!(reduce > 0.0 && reduce < step, "{r}");
    let share = r["all_reduce_share"].as_f64().unwrap();
    assert!((share - reduce / step).abs() < 1e-9, "{r}");
    assert!(
        r["includes"].as_str().unwrap().contains("all-reduce"),
        "{r}"
    );
}

/// GPU ranks (wgpu; on CI the CPU through lavapipe) stage the packed gradients through the
/// host for MPI: two wgpu ranks train what one wgpu process trains, within f32 rounding.
#[test]
fn two_wgpu_ranks_train_what_one_wgpu_process_trains() {
    if !mpirun_available() {
        return;
    }
    let wgpu = snfc_runtime::cube::probe::DeviceKind::Wgpu;
    if snfc_runtime::cube::probe::device_for_test(
        wgpu,
        "two_wgpu_ranks_train_what_one_wgpu_process_trains",
    )
    .is_none()
    {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = images(dir.path(), 40);
    let spec = spec_file(dir.path(), "fc", FC, "", "{}");
    let args = [
        "train",
        p(&spec),
        "--data",
        p(&data),
        "--device",
        "wgpu",
        // One process would draw the noise on the device, two ranks take their rows of one
        // host draw: the host's noise for both, so they see the same numbers.
        "--noise",
        "host",
        "--epochs",
        "1",
        "-q",
    ];
    alone_and_on_two_ranks(dir.path(), "wgpu", &args, 1e-4);
}

/// The shipped specs themselves, a few steps on the embedded digits: mnist_fc2 and mnist_cnn9
/// under `mpirun -n 2` end with the parameters and validation NLL of one process (f64, 1e-9).
#[test]
fn shipped_fc2_and_cnn9_train_alike_on_two_ranks() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for name in ["mnist_fc2", "mnist_cnn9"] {
        let spec = root.join("specs").join(format!("{name}.json"));
        let args = [
            "train",
            p(&spec),
            "--steps",
            "4",
            "--dtype",
            "f64",
            "-q",
            "--device",
            "host",
        ];
        alone_and_on_two_ranks(dir.path(), name, &args, 1e-9);
    }
}

/// A global batch that does not split evenly over the ranks is one clear error before anything
/// runs or is written.
#[test]
fn a_batch_that_does_not_split_over_the_ranks_is_refused() {
    if !mpirun_available() {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let data = images(dir.path(), 40);
    let spec = dir.path().join("odd.json");
    std::fs::write(
        &spec,
        r#"{"name": "odd", "input": {"shape": [1, 8, 8], "preprocess": "dequantize_logit"},
            "layers": [{"type": "linear"}], "train": {"batch_size": 9}}"#,
    )
    .unwrap();
    let out = dir.path().join("run");
    let o = run(
        2,
        &[
            "train",
            p(&spec),
            "--data",
            p(&data),
            "-q",
            "--out",
            p(&out),
        ],
    );
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("error: /train/batch_size 9 is the global batch")
            && err.contains("multiple of 2"),
        "{err}"
    );
    assert!(!out.exists(), "the run directory was created");
}
