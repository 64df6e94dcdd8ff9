//! The `snfc` binary end to end: `compile` output, error messages for bad input, a short
//! `train` → `eval` → `sample` round trip on the embedded MNIST subset, and `grad` files.

use snfc_compiler::spec::parse_spec;
use snfc_runtime::cube::probe::DeviceKind;
use snfc_runtime::data::Split;
use snfc_runtime::model::Model;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run `snfc` in the repository root.
fn snfc<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_snfc"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("running snfc")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Assert success and return stdout.
fn ok(o: Output) -> String {
    assert!(
        o.status.success(),
        "snfc failed ({}):\nstdout:\n{}\nstderr:\n{}",
        o.status,
        stdout(&o),
        stderr(&o)
    );
    stdout(&o)
}

/// Assert failure (non-zero exit, no panic) and return stderr.
fn fails(o: Output) -> String {
    let err = stderr(&o);
    assert!(
        !o.status.success() && o.status.code().is_some(),
        "snfc should have failed ({}):\nstdout:\n{}\nstderr:\n{err}",
        o.status,
        stdout(&o)
    );
    assert!(
        !err.contains("panicked"),
        "snfc panicked instead of reporting an error:\n{err}"
    );
    err
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 temp path")
}

/// A minimal safetensors reader (the format: u64 LE header length, JSON header, raw data), so the
/// files are checked independently of the crate that wrote them.
struct SafeTensorsFile {
    tensors: BTreeMap<String, (String, Vec<usize>, Vec<f64>)>,
    metadata: HashMap<String, String>,
}

fn read_safetensors(path: &Path) -> SafeTensorsFile {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n]).expect("JSON header");
    let data = &bytes[8 + n..];
    let mut tensors = BTreeMap::new();
    let mut metadata = HashMap::new();
    for (name, info) in header.as_object().expect("header object") {
        if name == "__metadata__" {
            for (k, v) in info.as_object().unwrap() {
                metadata.insert(k.clone(), v.as_str().unwrap().to_string());
            }
            continue;
        }
        let dtype = info["dtype"].as_str().unwrap().to_string();
        let shape: Vec<usize> = info["shape"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        let off = info["data_offsets"].as_array().unwrap();
        let raw = &data[off[0].as_u64().unwrap() as usize..off[1].as_u64().unwrap() as usize];
        let values: Vec<f64> = match dtype.as_str() {
            "F32" => raw
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            "F64" => raw
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                .collect(),
            "U32" => raw
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap()) as f64)
                .collect(),
            other => panic!("unexpected dtype {other}"),
        };
        assert_eq!(
            values.len(),
            shape.iter().product::<usize>(),
            "{name}: data size vs shape"
        );
        tensors.insert(name.clone(), (dtype, shape, values));
    }
    SafeTensorsFile { tensors, metadata }
}

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', b'\r', b'\n', 0x1a, b'\n'];

/// Check the PNG signature and return (width, height) from the IHDR chunk.
fn png_size(path: &Path) -> (u32, u32) {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(b.len() > 24, "{}: too short for a PNG", path.display());
    assert_eq!(b[..8], PNG_SIGNATURE, "{}: not a PNG", path.display());
    assert_eq!(&b[12..16], b"IHDR");
    let be = |s: &[u8]| u32::from_be_bytes(s.try_into().unwrap());
    (be(&b[16..20]), be(&b[20..24]))
}

fn small_spec_json(name: &str, d: usize, gradient: &str) -> String {
    format!(
        r#"{{
  "name": "{name}",
  "input": {{"shape": [{d}], "preprocess": "none"}},
  "layers": [
    {{"type": "linear", "bias": true}},
    {{"type": "smooth_leaky_relu", "alpha": 0.3}},
    {{"type": "linear", "bias": true}}
  ],
  "objective": {{"gradient": "{gradient}", "lambda": 1.0}},
  "train": {{"batch_size": 3, "epochs": 1, "warmup_epochs": 0, "seed": 0}}
}}
"#
    )
}

/// Write a small spec, parameters (perturbed away from the initialization so that no gradient
/// is trivially zero) and a [3, d] input batch into `dir`.
fn small_grad_setup(
    dir: &Path,
    name: &str,
    d: usize,
    gradient: &str,
) -> (PathBuf, PathBuf, PathBuf, Vec<f64>) {
    let json = small_spec_json(name, d, gradient);
    let spec_path = dir.join(format!("{name}.json"));
    std::fs::write(&spec_path, &json).unwrap();
    let spec = parse_spec(&json).unwrap();
    let mut model = Model::<f64>::init(&spec, 7);
    let mut k = 0u64;
    for info in model.params.clone() {
        let v: Vec<f64> = model.values[&info.name]
            .iter()
            .map(|x| {
                k += 1;
                x + 0.1 * ((k as f64 * 0.7).sin())
            })
            .collect();
        model.values.insert(info.name.clone(), Arc::new(v));
    }
    let params = dir.join(format!("{name}.safetensors"));
    model.save(&params, &[], HashMap::new()).unwrap();
    // Quarter steps: exact in f32, so an f32 `Split` of the same rows is the same batch.
    let rows: Vec<f64> = (0..3 * d)
        .map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0)
        .collect();
    let input = dir.join(format!("{name}_x.npy"));
    snfc_runtime::npy::write_npy_f64(&input, &[3, d], &rows).unwrap();
    (spec_path, params, input, rows)
}

// ---------------------------------------------------------------------------------------------
// compile
// ---------------------------------------------------------------------------------------------

#[test]
fn compile_emits_exact_and_optimized_ir() {
    let ir = ok(snfc(["compile", "specs/mnist_fc2.json", "--emit", "ir"]));
    assert!(
        ir.starts_with("graph mnist_fc2.train {"),
        "{}",
        &ir[..ir.len().min(200)]
    );
    assert!(
        ir.contains(" = inverse %"),
        "the exact graph has inverse nodes"
    );
    assert!(
        ir.contains(" = logdet %"),
        "the exact graph has logdet nodes"
    );
    for out in [
        "output loss =",
        "output objective =",
        "output grad.layers.0.weight =",
        "output grad.layers.0.weight_inv =",
        "output grad.layers.2.bias =",
    ] {
        assert!(ir.contains(out), "missing `{out}` in --emit ir");
    }

    let opt = ok(snfc([
        "compile",
        "specs/mnist_fc2.json",
        "--emit",
        "ir-opt",
    ]));
    assert!(opt.starts_with("graph "));
    assert!(
        !opt.contains("= inverse "),
        "the optimized step still has an inverse"
    );
    assert!(
        !opt.contains("= logdet "),
        "the optimized step still has a logdet"
    );
    assert!(opt.contains("output grad.layers.0.weight ="));
    assert!(!opt.contains("output objective"));
}

#[test]
fn compile_stats_are_written_and_printed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("build");
    let text = ok(snfc([
        "compile",
        "specs/mnist_fc2.json",
        "--emit",
        "stats",
        "-o",
        p(&out),
    ]));
    let printed: serde_json::Value = serde_json::from_str(&text).expect("stats JSON on stdout");
    let file = std::fs::read_to_string(out.join("stats.json")).expect("DIR/stats.json");
    let written: serde_json::Value = serde_json::from_str(&file).unwrap();
    assert_eq!(printed, written);
    assert_eq!(printed["spec"], "mnist_fc2");
    assert_eq!(printed["batch"], 100);
    assert_eq!(printed["after"]["inverse"], 0);
    assert!(
        printed["before"]["inverse"].as_u64().unwrap() >= 2,
        "{}",
        printed["before"]
    );
    assert!(
        printed["after"]["flops"].as_f64().unwrap() < printed["before"]["flops"].as_f64().unwrap()
    );
    // The optimizer's target form: 6 GEMMs per fully connected layer, no O(D³) op left, and
    // fewer kernels after fusion.
    assert_eq!(printed["after"]["gemm"], 12, "{}", printed["after"]);
    assert_eq!(printed["after"]["logdet"], 0);
    assert!(
        printed["after"]["kernels"].as_u64().unwrap()
            < printed["before"]["kernels"].as_u64().unwrap()
    );
    let eg = &printed["egraph"];
    for key in ["nodes", "classes", "iterations", "millis"] {
        assert!(
            eg[key].as_f64().is_some_and(|v| v > 0.0),
            "egraph.{key}: {eg}"
        );
    }
    assert!(eg["stop_reason"].is_string(), "{eg}");
    assert!(eg["limits"]["nodes"].as_u64().is_some(), "{eg}");

    // ir and ir-opt go to files too, and nothing else is printed for them.
    let out2 = dir.path().join("build2");
    let text = ok(snfc([
        "compile",
        "specs/mnist_fc2.json",
        "--emit",
        "ir,ir-opt",
        "-o",
        p(&out2),
    ]));
    assert!(text.is_empty(), "unexpected stdout: {text}");
    assert!(std::fs::read_to_string(out2.join("ir.txt"))
        .unwrap()
        .contains("= inverse "));
    assert!(!std::fs::read_to_string(out2.join("ir-opt.txt"))
        .unwrap()
        .contains("= inverse "));
}

#[test]
fn compile_exact_spec_keeps_its_inverses() {
    let text = ok(snfc([
        "compile",
        "specs/mnist_fc2_exact.json",
        "--emit",
        "stats",
    ]));
    let s: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(
        s["after"]["inverse"].as_u64().unwrap() >= 2,
        "{}",
        s["after"]
    );
}

// ---------------------------------------------------------------------------------------------
// Errors
// ---------------------------------------------------------------------------------------------

#[test]
fn invalid_spec_value_names_file_and_json_pointer() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(root().join("specs/mnist_fc2.json")).unwrap();
    assert!(text.contains(r#""alpha": 0.3"#));
    let bad = dir.path().join("bad_alpha.json");
    std::fs::write(&bad, text.replace(r#""alpha": 0.3"#, r#""alpha": 1.5"#)).unwrap();
    for cmd in ["compile", "train"] {
        let mut args = vec![cmd, p(&bad)];
        if cmd == "train" {
            args.extend(["--out", p(dir.path()), "--quiet"]);
        }
        let err = fails(snfc(&args));
        assert!(err.contains("bad_alpha.json"), "{cmd}: {err}");
        assert!(err.contains("/layers/1/alpha"), "{cmd}: {err}");
        assert!(err.contains("1.5"), "{cmd}: {err}");
    }
    assert!(!dir.path().join("checkpoint.safetensors").exists());
}

#[test]
fn malformed_json_reports_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("malformed.json");
    // The missing comma is on line 3, column 26 (where serde_json notices it).
    std::fs::write(
        &bad,
        "{\n  \"name\": \"x\",\n  \"input\": {\"shape\": [4] \"preprocess\": \"none\"}\n}\n",
    )
    .unwrap();
    let err = fails(snfc(["compile", p(&bad)]));
    assert!(err.contains("malformed.json"), "{err}");
    assert!(err.contains("line 3"), "{err}");
    assert!(err.contains("column 26"), "{err}");
}

#[test]
fn missing_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let ckpt = dir.path().join("no_such_checkpoint.safetensors");
    for args in [
        vec!["eval", p(&ckpt)],
        vec!["sample", p(&ckpt), "-n", "2", "-o", "x.png"],
    ] {
        let err = fails(snfc(&args));
        assert!(
            err.contains("no_such_checkpoint.safetensors"),
            "{args:?}: {err}"
        );
    }
    let spec = dir.path().join("no_such_spec.json");
    let err = fails(snfc(["compile", p(&spec)]));
    assert!(err.contains("no_such_spec.json"), "{err}");

    // A file that is not a safetensors file.
    let junk = dir.path().join("junk.safetensors");
    std::fs::write(&junk, b"not a checkpoint").unwrap();
    let err = fails(snfc(["eval", p(&junk)]));
    assert!(err.contains("junk.safetensors"), "{err}");
}

#[test]
fn grad_input_of_wrong_width_names_file_and_expected_shape() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, params, _, _) = small_grad_setup(dir.path(), "small4", 4, "self_normalizing");
    let wrong = dir.path().join("wrong_width.npy");
    snfc_runtime::npy::write_npy_f64(&wrong, &[3, 5], &[0.5; 15]).unwrap();
    let out = dir.path().join("g.safetensors");
    let err = fails(snfc([
        "grad",
        p(&spec),
        "--params",
        p(&params),
        "--input",
        p(&wrong),
        "-o",
        p(&out),
    ]));
    assert!(err.contains("wrong_width.npy"), "{err}");
    assert!(err.contains("[B, 4]"), "{err}");
    assert!(err.contains("[3, 5]"), "{err}");
    assert!(!out.exists());

    // Parameters of another width are named too.
    let (_, params5, _, _) = small_grad_setup(dir.path(), "small5", 5, "self_normalizing");
    let (_, _, input4, _) = small_grad_setup(dir.path(), "other4", 4, "self_normalizing");
    let err = fails(snfc([
        "grad",
        p(&spec),
        "--params",
        p(&params5),
        "--input",
        p(&input4),
        "-o",
        p(&out),
    ]));
    assert!(err.contains("small5.safetensors"), "{err}");
    assert!(!out.exists());
}

#[test]
fn missing_gpu_devices_are_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    if snfc_runtime::cube::probe::cuda_devices().is_ok() {
        return; // a CUDA machine: nothing to refuse
    }
    let err = fails(snfc([
        "train",
        "specs/mnist_fc2.json",
        "--device",
        "cuda",
        "--steps",
        "1",
        "--out",
        p(&out),
        "--quiet",
    ]));
    assert!(err.contains("--device cuda"), "{err}");
    assert!(err.contains("CUDA"), "{err}");
    assert!(!out.join("checkpoint.safetensors").exists());
    let err = fails(snfc(["bench", "specs/mnist_fc2.json", "--device", "cuda"]));
    assert!(err.contains("--device cuda"), "{err}");
    // The device is checked before the checkpoint is read.
    let err = fails(snfc(["sample", "no.safetensors", "--device", "cuda"]));
    assert!(err.contains("--device cuda"), "{err}");
}

/// Whether a wgpu adapter exists here (lavapipe in CI); says so when not, and fails when
/// `SNFC_REQUIRE_GPU` requires wgpu.
fn wgpu_present(test: &str) -> bool {
    snfc_runtime::cube::probe::device_for_test(DeviceKind::Wgpu, test).is_some()
}

#[test]
fn compile_emits_plan_and_kernel_sources() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fc2");
    ok(snfc([
        "compile",
        "specs/mnist_fc2.json",
        "-o",
        p(&out),
        "--emit",
        "plan,cuda,wgsl,stats",
        "--batch",
        "16",
    ]));
    let plan = snfc_compiler::plan::TrainPlan::load(&out.join("plan.json")).expect("plan loads");
    assert_eq!(plan.batch, 16);
    assert_eq!(plan.spec.name, "mnist_fc2");
    // One file per kernel launch of the plan (the products, the fused groups and the
    // partial-sum finishers of whole-tensor sums), in both languages; a product's file names
    // its cubek-matmul shape, since its kernel is chosen on the device.
    let list = |sub: &str| -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(out.join(sub))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        v.sort();
        v
    };
    let cu = list("cuda");
    let wgsl = list("wgsl");
    assert_eq!(cu.len(), wgsl.len());
    // cubek's kernels (products and sums) are built on the device.
    let is_library = |f: &String| {
        let stem = f.rsplit_once('.').map_or(f.as_str(), |(s, _)| s);
        stem.ends_with("_matmul") || stem.ends_with("_reduce")
    };
    let products = cu.iter().filter(|f| f.ends_with("_matmul.cu")).count();
    assert_eq!(products, 12, "{cu:?}");
    assert!(
        cu.len() >= plan.step.kernels(),
        "{} sources, {} kernels",
        cu.len(),
        plan.step.kernels()
    );
    for f in &cu {
        let text = std::fs::read_to_string(out.join("cuda").join(f)).unwrap();
        if is_library(f) {
            assert!(text.starts_with("// cubek-"), "{f}:\n{text}");
        } else {
            assert!(text.contains("extern \"C\" __global__"), "{f}:\n{text}");
        }
    }
    for f in &wgsl {
        let text = std::fs::read_to_string(out.join("wgsl").join(f)).unwrap();
        assert!(is_library(f) || text.contains("@compute"), "{f}:\n{text}");
    }
    let stats: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("stats.json")).unwrap()).unwrap();
    assert_eq!(stats["plan"]["kernels"], plan.step.kernels());
    // Kernel sources are files, one per kernel: stdout is no place for them.
    let err = fails(snfc(["compile", "specs/mnist_fc2.json", "--emit", "cuda"]));
    assert!(err.contains("-o"), "{err}");
}

#[test]
fn train_runs_a_compiled_plan_and_rejects_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fc2");
    ok(snfc([
        "compile",
        "specs/mnist_fc2.json",
        "-o",
        p(&out),
        "--emit",
        "plan",
        "--batch",
        "50",
    ]));
    let plan_path = out.join("plan.json");
    let run = dir.path().join("run");
    let text = ok(snfc([
        "train",
        p(&plan_path),
        "--device",
        "host",
        "--steps",
        "2",
        "--epochs",
        "1",
        "--out",
        p(&run),
        "--quiet",
    ]));
    assert!(text.contains("best validation NLL"), "{text}");
    let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
    assert_eq!(line["steps"], 2);
    // Broken plans: an index out of range, and a plan whose batch does not fit its step.
    let text = std::fs::read_to_string(&plan_path).unwrap();
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["step"]["order"][3] = serde_json::json!(100000);
    let bad = dir.path().join("bad.json");
    std::fs::write(&bad, v.to_string()).unwrap();
    let run2 = dir.path().join("run2");
    let args = |f: &Path| {
        vec![
            "train".to_string(),
            p(f).to_string(),
            "--steps".into(),
            "1".into(),
            "--out".into(),
            p(&run2).to_string(),
            "--quiet".into(),
        ]
    };
    let err = fails(snfc(args(&bad)));
    assert!(
        err.contains("bad.json") && err.contains("/step/order/3"),
        "{err}"
    );
    let mut v: serde_json::Value = serde_json::from_str(&text).unwrap();
    v["batch"] = serde_json::json!(7);
    std::fs::write(&bad, v.to_string()).unwrap();
    let err = fails(snfc(args(&bad)));
    assert!(
        err.contains("bad.json") && err.contains("[784, 7]"),
        "{err}"
    );
    assert!(!run2.join("checkpoint.safetensors").exists());
}

/// `train --device wgpu` (lavapipe in CI) follows the host's curve within f32 rounding when
/// both draw the dequantization noise on the host, and within the spread of other noise when
/// the GPU draws its own; either lowers the validation NLL.
#[test]
fn wgpu_training_follows_the_host_curve() {
    if !wgpu_present("wgpu_training_follows_the_host_curve") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("fc2_b20.json");
    let mut v: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("specs/mnist_fc2.json")).unwrap(),
    )
    .unwrap();
    // A smaller batch and no warm-up keep a lavapipe run short; lr 1e-3 moves the NLL within
    // a few dozen steps.
    v["train"]["batch_size"] = serde_json::json!(20);
    v["train"]["warmup_epochs"] = serde_json::json!(0);
    v["train"]["optimizer"]["adam"]["lr"] = serde_json::json!(1e-3);
    std::fs::write(&spec, v.to_string()).unwrap();
    let mut records = Vec::new();
    // The same noise on both (drawn on the host), then the GPU drawing its own.
    for (device, noise) in [("host", "host"), ("wgpu", "host"), ("wgpu", "device")] {
        let run = dir.path().join(format!("{device}-{noise}"));
        ok(snfc([
            "train",
            p(&spec),
            "--device",
            device,
            "--noise",
            noise,
            "--steps",
            "30",
            "--epochs",
            "1",
            "--out",
            p(&run),
            "--quiet",
        ]));
        let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
        records.push(line);
    }
    let (host, gpu) = (&records[0], &records[1]);
    for key in [
        "train_objective_data_terms",
        "train_nll_nats",
        "val_nll_nats",
    ] {
        let (a, b) = (host[key].as_f64().unwrap(), gpu[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-3 * a.abs(),
            "{key}: host {a} vs wgpu {b}"
        );
    }
    // Lower than where training started.
    let s = parse_spec(&std::fs::read_to_string(&spec).unwrap()).unwrap();
    let data = snfc_runtime::data::embedded_mnist().unwrap();
    let initial =
        snfc_runtime::eval::evaluate(&Model::<f64>::init(&s, 0), &data.valid, 100, 0).unwrap();
    for run in &records[1..] {
        let trained = run["val_nll_nats"].as_f64().unwrap();
        assert!(
            trained < initial.nll_nats - 50.0,
            "wgpu run: {trained} vs initial {}",
            initial.nll_nats
        );
    }
    // Noise drawn on the device: other numbers, the same distribution, so the same curve
    // within what 30 steps of different noise move it (0.3–0.7 % on lavapipe).
    let own = &records[2];
    for key in ["train_nll_nats", "val_nll_nats"] {
        let (a, b) = (host[key].as_f64().unwrap(), own[key].as_f64().unwrap());
        assert!(a != b, "{key}: device noise gives the host's numbers");
        assert!(
            (a - b).abs() <= 0.03 * a.abs(),
            "{key}: host {a} vs wgpu with device noise {b}"
        );
    }
}

#[test]
fn gpu_backends_refuse_f64_before_writing_anything() {
    if !wgpu_present("gpu_backends_refuse_f64_before_writing_anything") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    let err = fails(snfc([
        "train",
        "specs/mnist_fc2.json",
        "--device",
        "wgpu",
        "--dtype",
        "f64",
        "--steps",
        "1",
        "--out",
        p(&out),
        "--quiet",
    ]));
    assert!(err.contains("f32"), "{err}");
    assert!(!out.exists(), "a run that cannot start creates nothing");
}

#[test]
fn grad_on_wgpu_matches_the_host() {
    if !wgpu_present("grad_on_wgpu_matches_the_host") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let (spec, params, input, _) = small_grad_setup(dir.path(), "g", 10, "self_normalizing");
    let host = grad_run(
        &spec,
        &params,
        &input,
        &dir.path().join("h.safetensors"),
        &["--device", "host"],
    );
    let gpu = grad_run(
        &spec,
        &params,
        &input,
        &dir.path().join("w.safetensors"),
        &["--device", "wgpu"],
    );
    for name in PARAM_NAMES {
        let (a, b) = (&host.tensors[name].2, &gpu.tensors[name].2);
        let scale = a.iter().fold(1e-30f64, |m, v| m.max(v.abs()));
        let err = a
            .iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err <= 1e-4 * scale, "{name}: {err:e} of {scale:e}");
    }
}

// ---------------------------------------------------------------------------------------------
// train → eval → sample
// ---------------------------------------------------------------------------------------------

#[test]
fn train_eval_sample_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let run = dir.path().join("run");
    let train_args = [
        "train",
        "specs/mnist_fc2.json",
        "--steps",
        "3",
        "--epochs",
        "1",
        "--out",
        p(&run),
        "--quiet",
    ];
    let o = snfc(train_args);
    let text = ok(o);
    assert!(text.contains("best validation NLL"), "{text}");
    let ckpt = run.join("checkpoint.safetensors");
    let metrics = run.join("metrics.jsonl");
    assert!(ckpt.is_file() && metrics.is_file());
    let m = std::fs::read_to_string(&metrics).unwrap();
    assert_eq!(m.lines().count(), 1, "{m}");
    let line: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
    assert_eq!(line["steps"], 3);
    assert_eq!(line["epoch"], 1);
    let val_nll = line["val_nll_nats"].as_f64().unwrap();

    // The checkpoint: every parameter in f32 and the spec in the metadata.
    let st = read_safetensors(&ckpt);
    let names: Vec<&str> = st.tensors.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "layers.0.bias",
            "layers.0.weight",
            "layers.0.weight_inv",
            "layers.2.bias",
            "layers.2.weight",
            "layers.2.weight_inv"
        ]
    );
    assert!(st.tensors.values().all(|(dt, _, _)| dt == "F32"));
    assert_eq!(st.tensors["layers.0.weight"].1, [784, 784]);
    assert_eq!(parse_spec(&st.metadata["spec"]).unwrap().name, "mnist_fc2");

    // A second run into the same directory without --force fails and leaves the files alone.
    let ckpt_bytes = std::fs::read(&ckpt).unwrap();
    let metrics_bytes = std::fs::read(&metrics).unwrap();
    let err = fails(snfc(train_args));
    assert!(err.contains("checkpoint.safetensors"), "{err}");
    assert!(err.contains("--force") && err.contains("--resume"), "{err}");
    assert_eq!(
        std::fs::read(&ckpt).unwrap(),
        ckpt_bytes,
        "checkpoint changed"
    );
    assert_eq!(
        std::fs::read(&metrics).unwrap(),
        metrics_bytes,
        "metrics.jsonl changed"
    );

    // eval --json on the test split.
    let text = ok(snfc(["eval", p(&ckpt), "--json"]));
    let r: serde_json::Value = serde_json::from_str(text.trim()).expect("one JSON object");
    assert_eq!(r["examples"], 1000);
    let nll = r["nll_nats"].as_f64().unwrap();
    let bpd = r["bits_per_dim"].as_f64().unwrap();
    assert!(nll.is_finite() && nll > 0.0, "{r}");
    assert!(
        (bpd - nll / (784.0 * std::f64::consts::LN_2)).abs() <= 1e-12 * bpd,
        "{r}"
    );
    assert!(r["recon"].as_f64().is_some_and(|x| x >= 0.0), "{r}");
    // The same as the library on the embedded test split.
    let (model, _) = Model::<f64>::load(&ckpt, None).unwrap();
    let data = snfc_runtime::data::embedded_mnist().unwrap();
    let lib = snfc_runtime::eval::evaluate(&model, &data.test, 500, 0).unwrap();
    assert!(
        (lib.nll_nats - nll).abs() <= 1e-9 * nll,
        "library {} vs CLI {nll}",
        lib.nll_nats
    );
    // The validation split is another split; the same parameters, data and dequantization
    // noise as training's validation give training's figure (only the batches differ).
    let text = ok(snfc(["eval", p(&ckpt), "--json", "--split", "valid"]));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    let v_nll = v["nll_nats"].as_f64().unwrap();
    assert!(
        (v_nll - val_nll).abs() <= 1e-9 * val_nll,
        "eval --split valid {v_nll} vs training {val_nll}"
    );
    assert_ne!(v_nll, nll);
    // On a GPU (lavapipe in CI): the same figure within f32 precision.
    if wgpu_present("the wgpu part of train_eval_sample_round_trip") {
        let text = ok(snfc([
            "eval",
            p(&ckpt),
            "--json",
            "--split",
            "valid",
            "--device",
            "wgpu",
        ]));
        let g: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        let g_nll = g["nll_nats"].as_f64().unwrap();
        assert!(
            (g_nll - v_nll).abs() <= 1e-4 * v_nll,
            "eval on wgpu {g_nll} vs host {v_nll}"
        );
        assert_eq!(g["examples"], v["examples"]);
    }
    // The human-readable form.
    let text = ok(snfc(["eval", p(&ckpt)]));
    assert!(
        text.contains("bits/dim") && text.contains("1000 examples of the test split of"),
        "{text}"
    );
    // The split measured is named, in the text and in the JSON.
    let text = ok(snfc(["eval", p(&ckpt), "--split", "valid", "--json"]));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert!(
        v["data"]
            .as_str()
            .unwrap()
            .starts_with("the validation split of"),
        "{text}"
    );

    // Samples as PNG grids: 4 digits → 2×2 cells of 28×28 with a 2-pixel gutter.
    for (file, extra) in [("x.png", None), ("x_exact.png", Some("--exact-inverse"))] {
        let png = dir.path().join(file);
        let mut args = vec!["sample", p(&ckpt), "-n", "4", "-o", p(&png)];
        args.extend(extra);
        ok(snfc(&args));
        assert_eq!(png_size(&png), (2 * 28 + 3 * 2, 2 * 28 + 3 * 2), "{file}");
    }
    // ... or as .npy values in [0, 256).
    let npy = dir.path().join("s.npy");
    ok(snfc([
        "sample",
        p(&ckpt),
        "-n",
        "3",
        "-o",
        p(&npy),
        "--seed",
        "5",
    ]));
    let (shape, values) = snfc_runtime::npy::read_npy(&npy).unwrap();
    assert_eq!(shape, [3, 784]);
    assert!(values
        .iter()
        .all(|v| v.is_finite() && (-1e-3..=256.001).contains(v)));
    if wgpu_present("the wgpu sampling of train_eval_sample_round_trip") {
        // The same latent (the host's stream) through the compiled sampling graph on the
        // GPU: the host's samples to f32 precision; a latent drawn there gives other samples.
        let sample_on_gpu = |noise: &str, file: &str| {
            let out = dir.path().join(file);
            ok(snfc([
                "sample",
                p(&ckpt),
                "-n",
                "3",
                "-o",
                p(&out),
                "--seed",
                "5",
                "--device",
                "wgpu",
                "--noise",
                noise,
            ]));
            let (shape, v) = snfc_runtime::npy::read_npy(&out).unwrap();
            assert_eq!(shape, [3, 784]);
            v
        };
        let same = sample_on_gpu("host", "s_wgpu.npy");
        for (g, w) in same.iter().zip(&values) {
            assert!(
                (g - w).abs() <= 1e-3 * w.abs().max(1.0),
                "wgpu {g} vs host {w}"
            );
        }
        let drawn = sample_on_gpu("device", "s_wgpu_drawn.npy");
        assert!(drawn
            .iter()
            .all(|v| v.is_finite() && (-1e-3..=256.001).contains(v)));
        assert_ne!(drawn, same);
    }
}

// ---------------------------------------------------------------------------------------------
// grad
// ---------------------------------------------------------------------------------------------

fn grad_run(
    spec: &Path,
    params: &Path,
    input: &Path,
    out: &Path,
    extra: &[&str],
) -> SafeTensorsFile {
    let mut args = vec![
        "grad",
        p(spec),
        "--params",
        p(params),
        "--input",
        p(input),
        "-o",
        p(out),
    ];
    args.extend(extra);
    let text = ok(snfc(&args));
    assert!(text.contains("wrote"), "{text}");
    read_safetensors(out)
}

const PARAM_NAMES: [&str; 6] = [
    "layers.0.weight",
    "layers.0.weight_inv",
    "layers.0.bias",
    "layers.2.weight",
    "layers.2.weight_inv",
    "layers.2.bias",
];

#[test]
fn grad_writes_every_parameter_and_the_scalars() {
    let dir = tempfile::tempdir().unwrap();
    let d = 4;
    let (spec, params, input, rows) = small_grad_setup(dir.path(), "g4", d, "self_normalizing");
    let out = dir.path().join("g.safetensors");
    let f32_run = grad_run(&spec, &params, &input, &out, &[]);
    let mut names: Vec<&str> = PARAM_NAMES.to_vec();
    names.extend(["loss", "nll", "recon"]);
    names.sort_unstable();
    assert_eq!(
        f32_run
            .tensors
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>(),
        names
    );
    for name in PARAM_NAMES {
        let (dt, shape, v) = &f32_run.tensors[name];
        assert_eq!(dt, "F32", "{name}");
        let want: Vec<usize> = if name.ends_with("bias") {
            vec![d]
        } else {
            vec![d, d]
        };
        assert_eq!(*shape, want, "{name}");
        assert!(v.iter().all(|x| x.is_finite()), "{name}");
        assert!(v.iter().any(|x| *x != 0.0), "{name}: all-zero gradient");
    }
    for s in ["loss", "nll", "recon"] {
        let (_, shape, v) = &f32_run.tensors[s];
        assert!(shape.is_empty(), "{s} is a scalar, got shape {shape:?}");
        assert!(v[0].is_finite(), "{s}");
    }
    assert!(f32_run.metadata["spec"].contains("\"g4\""));

    // f64, with and without the algebraic optimization: the same numbers.
    let fused = grad_run(
        &spec,
        &params,
        &input,
        &dir.path().join("g64.safetensors"),
        &["--dtype", "f64"],
    );
    let plain = grad_run(
        &spec,
        &params,
        &input,
        &dir.path().join("g64_nofusion.safetensors"),
        &["--dtype", "f64", "--no-fusion"],
    );
    for name in fused.tensors.keys() {
        let (dt, _, a) = &fused.tensors[name];
        let (_, _, b) = &plain.tensors[name];
        assert_eq!(dt, "F64", "{name}");
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff <= 1e-10 * scale,
            "{name}: fused vs --no-fusion differ by {diff} (scale {scale})"
        );
        // f32 agrees with f64 loosely.
        let (_, _, c) = &f32_run.tensors[name];
        let diff32 = a
            .iter()
            .zip(c)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(
            diff32 <= 1e-4 * scale.max(1.0),
            "{name}: f32 vs f64 differ by {diff32}"
        );
    }

    // nll is the exact −mean ln p(x) of the batch.
    let json = std::fs::read_to_string(&spec).unwrap();
    let model = Model::<f64>::load(&params, Some(&parse_spec(&json).unwrap()))
        .unwrap()
        .0;
    let split = Split {
        n: 3,
        dim: d,
        values: rows.iter().map(|&v| v as f32).collect(),
    };
    let lib = snfc_runtime::eval::evaluate(&model, &split, 3, 0).unwrap();
    let nll = fused.tensors["nll"].2[0];
    assert!(
        (nll - lib.nll_nats).abs() <= 1e-9 * nll.abs().max(1.0),
        "grad nll {nll} vs evaluate {}",
        lib.nll_nats
    );
    let recon = fused.tensors["recon"].2[0];
    assert!(
        (recon - lib.recon.unwrap()).abs() <= 1e-9 * recon.max(1.0),
        "recon {recon} vs {:?}",
        lib.recon
    );
}

#[test]
fn grad_of_exact_spec_leaves_r_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, params, input, _) = small_grad_setup(dir.path(), "e4", 4, "exact");
    let g = grad_run(
        &spec,
        &params,
        &input,
        &dir.path().join("ge.safetensors"),
        &["--dtype", "f64"],
    );
    for name in PARAM_NAMES {
        let (_, _, v) = g
            .tensors
            .get(name)
            .unwrap_or_else(|| panic!("missing {name}"));
        if name.ends_with("weight_inv") {
            assert!(
                v.iter().all(|x| *x == 0.0),
                "{name} should have a zero gradient: {v:?}"
            );
        } else {
            assert!(v.iter().any(|x| *x != 0.0), "{name}: all-zero gradient");
        }
    }
    assert_eq!(g.tensors["recon"].2, [0.0]);
    // The exact gradient does not depend on fusion settings either.
    let plain = grad_run(
        &spec,
        &params,
        &input,
        &dir.path().join("ge_nofusion.safetensors"),
        &["--dtype", "f64", "--no-fusion"],
    );
    for name in PARAM_NAMES {
        let (a, b) = (&g.tensors[name].2, &plain.tensors[name].2);
        let scale = a.iter().fold(0.0f64, |m, x| m.max(x.abs()));
        let diff = a
            .iter()
            .zip(b)
            .fold(0.0f64, |m, (x, y)| m.max((x - y).abs()));
        assert!(diff <= 1e-10 * scale.max(1e-300), "{name}: {diff}");
    }
}

// ---------------------------------------------------------------------------------------------
// A continuous data set from .npy
// ---------------------------------------------------------------------------------------------

#[test]
fn small_spec_on_npy_data_trains_evaluates_and_samples_npy() {
    let dir = tempfile::tempdir().unwrap();
    let d = 4;
    let spec = dir.path().join("small.json");
    std::fs::write(
        &spec,
        small_spec_json("small", d, "self_normalizing")
            .replace(r#""batch_size": 3"#, r#""batch_size": 5"#),
    )
    .unwrap();
    let data = dir.path().join("data.npy");
    let rows: Vec<f64> = (0..50 * d)
        .map(|i| ((i * 37 % 23) as f64 - 11.0) / 8.0)
        .collect();
    snfc_runtime::npy::write_npy_f64(&data, &[50, d], &rows).unwrap();
    let run = dir.path().join("run");
    ok(snfc([
        "train",
        p(&spec),
        "--data",
        p(&data),
        "--epochs",
        "2",
        "--out",
        p(&run),
        "--dtype",
        "f64",
        "--quiet",
    ]));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{metrics}");
    // 50 examples: 40 train / 5 valid / 5 test; batch 5 → 8 steps per epoch.
    assert_eq!(lines[1]["steps"], 16);
    let ckpt = run.join("checkpoint.safetensors");
    let st = read_safetensors(&ckpt);
    assert!(st.tensors.values().all(|(dt, _, _)| dt == "F64"));
    assert_eq!(st.metadata.get("dtype").map(String::as_str), Some("f64"));

    // A .npy file is evaluated whole.
    let text = ok(snfc(["eval", p(&ckpt), "--data", p(&data), "--json"]));
    let r: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(r["examples"], 50);
    let nll = r["nll_nats"].as_f64().unwrap();
    assert!(
        (r["bits_per_dim"].as_f64().unwrap() - nll / (d as f64 * std::f64::consts::LN_2)).abs()
            < 1e-12
    );

    // The default data (MNIST, 784 values per example) does not fit a D=4 spec.
    let err = fails(snfc(["eval", p(&ckpt)]));
    assert!(err.contains("784") && err.contains("[4]"), "{err}");

    // A non-image spec's samples are .npy rows: a .png is refused (writing nothing, and not
    // another file instead), and the default name is samples.npy.
    let png = dir.path().join("s.png");
    let err = fails(snfc(["sample", p(&ckpt), "-n", "3", "-o", p(&png)]));
    assert!(err.contains("s.png") && err.contains(".npy"), "{err}");
    assert!(!png.exists() && !dir.path().join("s.npy").exists());
    let text = ok(Command::new(env!("CARGO_BIN_EXE_snfc"))
        .args(["sample", p(&ckpt), "-n", "2"])
        .current_dir(dir.path())
        .output()
        .unwrap());
    assert!(text.contains("samples.npy"), "{text}");
    assert!(dir.path().join("samples.npy").exists());
    let npy = dir.path().join("s.npy");
    let text = ok(snfc(["sample", p(&ckpt), "-n", "3", "-o", p(&npy)]));
    assert!(text.contains("s.npy"), "{text}");
    let (shape, values) = snfc_runtime::npy::read_npy(&npy).unwrap();
    assert_eq!(shape, [3, d]);
    assert!(values.iter().all(|v| v.is_finite()));
}

#[test]
fn grad_takes_dequantization_noise_from_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = 4;
    let json =
        small_spec_json("q4", d, "self_normalizing").replace("\"none\"", "\"dequantize_logit\"");
    let spec_path = dir.path().join("q4.json");
    std::fs::write(&spec_path, &json).unwrap();
    let spec = parse_spec(&json).unwrap();
    let params = dir.path().join("q4.safetensors");
    Model::<f64>::init(&spec, 3)
        .save(&params, &[], HashMap::new())
        .unwrap();
    let rows: Vec<f64> = (0..3 * d).map(|i| ((i * 37) % 256) as f64).collect();
    let input = dir.path().join("x.npy");
    snfc_runtime::npy::write_npy_f64(&input, &[3, d], &rows).unwrap();
    let noise = |name: &str, shape: &[usize], f: &dyn Fn(usize) -> f64| {
        let path = dir.path().join(name);
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(f).collect();
        snfc_runtime::npy::write_npy_f64(&path, shape, &v).unwrap();
        path
    };
    let u1 = noise("u1.npy", &[3, d], &|i| (i as f64 * 0.37).fract());
    let u2 = noise("u2.npy", &[3, d], &|i| (i as f64 * 0.61).fract());
    let out = |n: &str| dir.path().join(n);
    let a = grad_run(
        &spec_path,
        &params,
        &input,
        &out("a.safetensors"),
        &["--dtype", "f64", "--noise", p(&u1)],
    );
    let b = grad_run(
        &spec_path,
        &params,
        &input,
        &out("b.safetensors"),
        &["--dtype", "f64", "--noise", p(&u1)],
    );
    let c = grad_run(
        &spec_path,
        &params,
        &input,
        &out("c.safetensors"),
        &["--dtype", "f64", "--noise", p(&u2)],
    );
    assert_eq!(
        a.tensors, b.tensors,
        "the same noise gives the same gradients"
    );
    assert_ne!(
        a.tensors["nll"], c.tensors["nll"],
        "other noise, other likelihood"
    );
    let wrong = noise("wrong.npy", &[3, d + 1], &|_| 0.5);
    let err = fails(snfc([
        "grad",
        p(&spec_path),
        "--params",
        p(&params),
        "--input",
        p(&input),
        "-o",
        p(&out("w.safetensors")),
        "--noise",
        p(&wrong),
    ]));
    assert!(err.contains("wrong.npy") && err.contains("shape"), "{err}");
    let outside = noise("outside.npy", &[3, d], &|_| 1.5);
    let err = fails(snfc([
        "grad",
        p(&spec_path),
        "--params",
        p(&params),
        "--input",
        p(&input),
        "-o",
        p(&out("o.safetensors")),
        "--noise",
        p(&outside),
    ]));
    assert!(
        err.contains("outside.npy") && err.contains("[0, 1)"),
        "{err}"
    );
}

/// A spec with an image input takes `[B, C, H, W]` arrays in `grad` and `eval` (flattened in C
/// order, so the same numbers as `[B, C·H·W]` give the same results), names the file and shape
/// when neither fits, and its gradients on wgpu match the host.
#[test]
fn image_specs_take_bchw_arrays_and_their_gradients_match_on_wgpu() {
    let dir = tempfile::tempdir().unwrap();
    let json = r#"{
  "name": "tiny_image",
  "input": {"shape": [1, 4, 4], "preprocess": "none"},
  "layers": [
    {"type": "conv", "kernel_size": 3, "bias": true},
    {"type": "spline", "bins": 4, "tail_bound": 3},
    {"type": "squeeze"},
    {"type": "conv", "kernel_size": 1, "bias": true}
  ],
  "objective": {"gradient": "self_normalizing", "lambda": 1.0},
  "train": {"batch_size": 3, "epochs": 1, "warmup_epochs": 0, "seed": 0}
}
"#;
    let spec_path = dir.path().join("tiny_image.json");
    std::fs::write(&spec_path, json).unwrap();
    let spec = parse_spec(json).unwrap();
    let mut model = Model::<f64>::init(&spec, 3);
    let mut k = 0u64;
    for info in model.params.clone() {
        let v: Vec<f64> = model.values[&info.name]
            .iter()
            .map(|x| {
                k += 1;
                x + 0.05 * ((k as f64 * 0.7).sin())
            })
            .collect();
        model.values.insert(info.name.clone(), Arc::new(v));
    }
    let params = dir.path().join("tiny_image.safetensors");
    let meta = HashMap::from([("spec".to_string(), spec.to_json_pretty())]);
    model.save(&params, &[], meta).unwrap();
    let rows: Vec<f64> = (0..3 * 16)
        .map(|i| ((i * 7 % 11) as f64 - 5.0) / 4.0)
        .collect();
    let bchw = dir.path().join("x_bchw.npy");
    let flat = dir.path().join("x_flat.npy");
    snfc_runtime::npy::write_npy_f64(&bchw, &[3, 1, 4, 4], &rows).unwrap();
    snfc_runtime::npy::write_npy_f64(&flat, &[3, 16], &rows).unwrap();
    let run = |input: &Path, out: &str, device: &str| {
        grad_run(
            &spec_path,
            &params,
            input,
            &dir.path().join(out),
            &["--device", device],
        )
    };
    let a = run(&bchw, "a.safetensors", "host");
    let b = run(&flat, "b.safetensors", "host");
    assert_eq!(
        a.tensors, b.tensors,
        "[B, C, H, W] and [B, C·H·W] are the same batch"
    );
    assert!(a.tensors.contains_key("layers.0.weight_inv"));
    let eval = |data: &Path| {
        let text = ok(snfc([
            "eval",
            p(&params),
            "--spec",
            p(&spec_path),
            "--data",
            p(data),
            "--json",
        ]));
        let mut v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        // The file evaluated is named; the figures must agree.
        assert_eq!(v["data"], format!("all of {}", p(data)), "{v}");
        v.as_object_mut().unwrap().remove("data");
        v
    };
    assert_eq!(eval(&bchw), eval(&flat));
    let wrong = dir.path().join("x_wrong.npy");
    snfc_runtime::npy::write_npy_f64(&wrong, &[3, 1, 4, 5], &[0.5; 60]).unwrap();
    let err = fails(snfc([
        "grad",
        p(&spec_path),
        "--params",
        p(&params),
        "--input",
        p(&wrong),
        "-o",
        p(&dir.path().join("w.safetensors")),
    ]));
    assert!(
        err.contains("x_wrong.npy") && err.contains("[1, 4, 4]"),
        "{err}"
    );
    if !wgpu_present(
        "the wgpu half of image_specs_take_bchw_arrays_and_their_gradients_match_on_wgpu",
    ) {
        return;
    }
    let g = run(&bchw, "g.safetensors", "wgpu");
    for (name, (_, _, want)) in &a.tensors {
        let got = &g.tensors[name].2;
        let scale = want.iter().fold(1e-2f64, |m, v| m.max(v.abs()));
        let err = want
            .iter()
            .zip(got)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f64::max);
        assert!(err <= 1e-4 * scale, "{name}: {err:e} of {scale:e}");
    }
}

/// A small Glow (squeeze, 2 steps of [actnorm, 1×1 self-normalizing conv, affine coupling],
/// split, squeeze, 2 more steps) trains on the embedded MNIST from the command line: the
/// actnorm layers are initialized from the first batch, the validation NLL falls from the first
/// epoch to the second, the checkpoint records the initialization, and `sample` writes a grid
/// through the learned and the exact inverses.
#[test]
fn a_small_glow_trains_evaluates_and_samples() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tiny_glow.json");
    std::fs::write(
        &spec,
        r#"{
  "name": "tiny_glow",
  "input": {"shape": [1, 28, 28], "preprocess": "dequantize_logit"},
  "layers": [
    {"type": "squeeze"},
    {"type": "repeat", "times": 2, "layers": [
      {"type": "actnorm"},
      {"type": "conv", "kernel_size": 1, "bias": false},
      {"type": "affine_coupling", "width": 8}]},
    {"type": "split"},
    {"type": "squeeze"},
    {"type": "repeat", "times": 2, "layers": [
      {"type": "actnorm"},
      {"type": "conv", "kernel_size": 1, "bias": false},
      {"type": "affine_coupling", "width": 8}]}
  ],
  "objective": {"gradient": "self_normalizing", "lambda": 100.0},
  "train": {"batch_size": 200, "epochs": 2, "warmup_epochs": 0, "seed": 0,
            "optimizer": {"adam": {"lr": 0.001}}}
}"#,
    )
    .unwrap();
    let run = dir.path().join("run");
    ok(snfc(["train", p(&spec), "--out", p(&run), "-q"]));
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let nll: Vec<f64> = metrics
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["val_nll_nats"].as_f64().unwrap()
        })
        .collect();
    assert_eq!(nll.len(), 2, "{metrics}");
    assert!(nll[1] < nll[0], "validation NLL by epoch: {nll:?}");
    let ckpt = run.join("checkpoint.safetensors");
    let file = read_safetensors(&ckpt);
    assert_eq!(
        file.metadata.get("data_initialized").map(String::as_str),
        Some("true")
    );
    // Initialized from data: the first actnorm's translation is no longer zero.
    assert!(file.tensors["layers.1.translation"]
        .2
        .iter()
        .any(|v| *v != 0.0));
    let text = ok(snfc(["eval", p(&ckpt)]));
    assert!(text.contains("nats"), "{text}");
    for extra in [&[][..], &["--exact-inverse"][..]] {
        let png = dir.path().join(format!("s{}.png", extra.len()));
        let mut args = vec!["sample", p(&ckpt), "-n", "4", "-o", p(&png)];
        args.extend(extra);
        ok(snfc(args));
        assert_eq!(png_size(&png).0, png_size(&png).1);
    }
}

/// The small Glow trains on wgpu as on the host — actnorm's initialization, the coupling's
/// take/embed/relu/tanh kernels, GECO's per-layer λ and gradient clipping included: the
/// same loss, validation NLL and λ after a few steps.
#[test]
fn a_small_glow_trains_on_wgpu_like_the_host() {
    if !wgpu_present("a_small_glow_trains_on_wgpu_like_the_host") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("tiny_glow_gpu.json");
    std::fs::write(
        &spec,
        r#"{
  "name": "tiny_glow_gpu",
  "input": {"shape": [1, 28, 28], "preprocess": "dequantize_logit"},
  "layers": [
    {"type": "squeeze"},
    {"type": "repeat", "times": 2, "layers": [
      {"type": "actnorm"},
      {"type": "conv", "kernel_size": 1, "bias": false},
      {"type": "affine_coupling", "width": 4}]},
    {"type": "split"},
    {"type": "conv", "kernel_size": 3}
  ],
  "objective": {"gradient": "self_normalizing",
                "lambda": {"geco": {"lambda0": 10.0, "lr": 1e-3, "ema": 0.9}}},
  "train": {"batch_size": 50, "epochs": 1, "warmup_epochs": 0, "seed": 0,
            "grad_clip_norm": 1000.0, "optimizer": {"adam": {"lr": 0.001}}}
}"#,
    )
    .unwrap();
    let mut records = Vec::new();
    for device in ["host", "wgpu"] {
        let run = dir.path().join(device);
        ok(snfc([
            "train",
            p(&spec),
            "--device",
            device,
            "--steps",
            "4",
            "--out",
            p(&run),
            "-q",
        ]));
        let m = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
        records.push(serde_json::from_str::<serde_json::Value>(m.lines().next().unwrap()).unwrap());
    }
    let (host, gpu) = (&records[0], &records[1]);
    for key in [
        "train_objective_data_terms",
        "train_nll_nats",
        "val_nll_nats",
    ] {
        let (a, b) = (host[key].as_f64().unwrap(), gpu[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-3 * a.abs(),
            "{key}: host {a} vs wgpu {b}"
        );
    }
    let lambdas = host["lambda"].as_object().expect("GECO λ logged");
    assert_eq!(lambdas.len(), 3, "{lambdas:?}");
    for (layer, a) in lambdas {
        let (a, b) = (a.as_f64().unwrap(), gpu["lambda"][layer].as_f64().unwrap());
        assert!(
            a > 10.0 && (a - b).abs() <= 1e-3 * a,
            "{layer}: λ host {a} vs wgpu {b}"
        );
    }
}

/// A first run without a runtime directory (`XDG_RUNTIME_DIR` unset, as over ssh) prints no
/// Vulkan-loader error while `--device auto` probes for a GPU.
#[test]
fn auto_device_probe_prints_no_runtime_dir_error() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_snfc"))
        .args([
            "train",
            "specs/mnist_fc2.json",
            "--steps",
            "1",
            "--epochs",
            "1",
            "--out",
            p(&dir.path().join("run")),
            "--quiet",
        ])
        .env_remove("XDG_RUNTIME_DIR")
        .current_dir(root())
        .output()
        .expect("running snfc");
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(!err.contains("XDG_RUNTIME_DIR"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// Surviving faults: SIGKILL at random moments and in the middle of a checkpoint write
// ---------------------------------------------------------------------------------------------

/// A run killed (SIGKILL) at several random moments, and aborted in the middle of a checkpoint
/// write (after its temporary file, before the rename), then resumed each time with `--resume`,
/// ends with checkpoints bit-identical to an uninterrupted run of the same seed, and the same
/// metrics.
/// A small spec of `epochs` epochs and its data (300 rows of 6 values; batches of 10, so 24
/// steps an epoch on the 240 training rows) for the tests that stop and resume runs.
fn resumable_run(dir: &Path, epochs: usize) -> (PathBuf, PathBuf) {
    let spec = dir.join("small.json");
    std::fs::write(
        &spec,
        format!(
            r#"{{"name": "small", "input": {{"shape": [6], "preprocess": "none"}},
            "layers": [{{"type": "linear"}}, {{"type": "smooth_leaky_relu"}}, {{"type": "linear"}}],
            "train": {{"batch_size": 10, "epochs": {epochs}, "warmup_epochs": 3, "seed": 5,
                      "optimizer": {{"adam": {{"lr": 3e-3}}}}}}}}"#
        ),
    )
    .unwrap();
    let data = dir.join("data.npy");
    let rows: Vec<f64> = (0..300 * 6)
        .map(|i| ((i * 7919 % 1000) as f64 / 500.0 - 1.0) * (1.0 + (i % 6) as f64))
        .collect();
    snfc_runtime::npy::write_npy_f64(&data, &[300, 6], &rows).unwrap();
    (spec, data)
}

/// Lines of a run's metrics.jsonl without the timings.
fn metrics_without_timings(run: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(run.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            let o = v.as_object_mut().unwrap();
            o.remove("seconds");
            o.remove("examples_per_sec");
            v
        })
        .collect()
}

/// Two runs' checkpoint `file` holds the same tensors, bit for bit.
fn assert_same_tensors(a: &Path, b: &Path, file: &str) {
    let (x, y) = (
        read_safetensors(&a.join(file)),
        read_safetensors(&b.join(file)),
    );
    assert_eq!(
        x.tensors.keys().collect::<Vec<_>>(),
        y.tensors.keys().collect::<Vec<_>>()
    );
    for (name, (_, _, v)) in &x.tensors {
        let w = &y.tensors[name].2;
        assert!(
            v.iter().zip(w).all(|(p, q)| p.to_bits() == q.to_bits()),
            "{file}: `{name}` differs"
        );
    }
}

/// Wait until a run has written `lines` lines of metrics (at most 60 s).
fn wait_for_epochs(run: &Path, lines: usize) {
    let start = std::time::Instant::now();
    while std::fs::read_to_string(run.join("metrics.jsonl"))
        .map(|t| t.lines().count())
        .unwrap_or(0)
        < lines
    {
        assert!(
            start.elapsed().as_secs() < 60,
            "{} did not reach {lines} epochs",
            run.display()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn send_signal(signal: &str, pid: u32) {
    let status = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .expect("running kill");
    assert!(status.success());
}

#[test]
fn killed_and_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = resumable_run(dir.path(), 300);
    let args = |out: &Path| -> Vec<String> {
        [
            "train",
            p(&spec),
            "--data",
            p(&data),
            "--dtype",
            "f64",
            "--out",
            p(out),
            "-q",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = dir.path().join("whole");
    let started = std::time::Instant::now();
    ok(snfc(args(&whole)));
    let run_ms = started.elapsed().as_millis() as u64;

    let parts = dir.path().join("parts");
    let mut resume = args(&parts);
    resume.push("--resume".into());
    // Crashes in the middle of a write of each checkpoint: the file keeps its previous content.
    // The first starts the run; the second, and every start after it, resumes.
    for (target, args) in [
        ("last.safetensors:4", args(&parts)),
        ("checkpoint.safetensors:3", resume.clone()),
    ] {
        let o = Command::new(env!("CARGO_BIN_EXE_snfc"))
            .args(&args)
            .env("SNFC_ABORT_BEFORE_RENAME", target)
            .current_dir(root())
            .output()
            .expect("running snfc");
        assert!(
            !o.status.success(),
            "{target}: the injected abort did not happen"
        );
        let last = read_safetensors(&parts.join("last.safetensors"));
        assert!(
            last.metadata["epoch"].parse::<usize>().unwrap() >= 3,
            "{target}"
        );
    }
    let stale = std::fs::read_dir(&parts)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .contains(".tmp-")
        })
        .count();
    assert!(stale >= 1, "the aborted writes left their temporary files");

    // SIGKILL at pseudo-random moments, 5–20 % of an uninterrupted run's time after each
    // start, five times; then the run finishes. (At up to 40 % two kills could leave so little
    // work that the third start finished before its kill.)
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut kills = 0;
    for attempt in 0.. {
        let mut child = Command::new(env!("CARGO_BIN_EXE_snfc"))
            .args(&resume)
            .current_dir(root())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("spawning snfc");
        if attempt < 5 {
            state = state.wrapping_mul(6364136223846793005).wrapping_add(1);
            let delay = run_ms / 20 + (state >> 33) % (run_ms * 3 / 20 + 1);
            std::thread::sleep(std::time::Duration::from_millis(delay));
        }
        let finished = if attempt < 5 {
            child.try_wait().unwrap()
        } else {
            Some(child.wait().unwrap())
        };
        if let Some(status) = finished {
            assert!(status.success(), "resumed run failed: {status}");
            break;
        }
        child.kill().unwrap();
        child.wait().unwrap();
        kills += 1;
    }
    assert!(
        kills >= 3,
        "only {kills} kills landed before the run finished"
    );

    for file in ["last.safetensors", "checkpoint.safetensors"] {
        assert_same_tensors(&whole, &parts, file);
    }
    assert_eq!(
        metrics_without_timings(&whole),
        metrics_without_timings(&parts),
        "after {kills} kills"
    );
    let leftovers: Vec<_> = std::fs::read_dir(&parts)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A run stopped within an epoch, by `--steps` or by SIGINT, saves the exact step; resumed
/// (with the spec left out: the run's own is stored) it finishes that epoch and ends bit for
/// bit where an uninterrupted run ends: parameters, Adam's moments, data order and generator,
/// and every metrics line. SIGINT exits 130; a second start under the same lock is refused.
#[test]
fn a_run_stopped_within_an_epoch_resumes_there_bit_identically() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = resumable_run(dir.path(), 150);
    let start = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["train", p(&spec), "--data", p(&data), "--dtype", "f64"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(["-o".to_string(), p(out).to_string()]);
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let whole = dir.path().join("whole");
    ok(snfc(start(&whole, &["-q"])));

    let parts = dir.path().join("parts");
    // 30 steps: the 6th of epoch 2, validated and logged as a partial epoch.
    let text = ok(snfc(start(&parts, &["--steps", "30", "-q"])));
    assert!(text.contains("after step 6 of 24 in epoch 2"), "{text}");
    let lines = metrics_without_timings(&parts);
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[1]["partial"], true);
    assert_eq!(lines[1]["steps"], 30);
    let run: serde_json::Value =
        serde_json::from_str(&read_safetensors(&parts.join("last.safetensors")).metadata["run"])
            .unwrap();
    assert_eq!(
        (run["epoch"].as_u64(), run["partial"]["steps"].as_u64()),
        (Some(1), Some(6))
    );
    // Resumed from the file, without the spec, to another stop within an epoch.
    let last = parts.join("last.safetensors");
    ok(snfc([
        "train",
        "--resume",
        p(&last),
        "--steps",
        "100",
        "-q",
    ]));
    let lines = metrics_without_timings(&parts);
    assert_eq!(lines.len(), 5, "the partial line of epoch 2 was replaced");
    assert_eq!(lines[1], metrics_without_timings(&whole)[1]);

    // SIGINT after a few more epochs: the step in progress ends, saved, and the status is 130.
    let child = Command::new(env!("CARGO_BIN_EXE_snfc"))
        .args(["train", "--resume", p(&parts)])
        .current_dir(root())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning snfc");
    wait_for_epochs(&parts, 10);
    // The directory is the running run's: a second start is refused, naming its pid.
    let err = fails(snfc(["train", "--resume", p(&parts), "-q"]));
    assert!(
        err.contains("in use") && err.contains(&format!("pid {}", child.id())),
        "{err}"
    );
    send_signal("-INT", child.id());
    let o = child.wait_with_output().unwrap();
    assert_eq!(o.status.code(), Some(130), "{}", stderr(&o));
    let err = stderr(&o);
    assert!(
        err.contains("interrupted: stopped after") && err.contains("--resume"),
        "{err}"
    );
    let run: serde_json::Value =
        serde_json::from_str(&read_safetensors(&last).metadata["run"]).unwrap();
    let stopped_at = run["total_steps"].as_u64().unwrap();
    assert!((240..150 * 24).contains(&stopped_at), "{run}");

    ok(snfc(["train", "--resume", p(&parts), "-q"]));
    for file in ["last.safetensors", "checkpoint.safetensors"] {
        assert_same_tensors(&whole, &parts, file);
    }
    let run_of = |d: &Path| -> serde_json::Value {
        serde_json::from_str(&read_safetensors(&d.join("last.safetensors")).metadata["run"])
            .unwrap()
    };
    assert_eq!(run_of(&whole), run_of(&parts));
    assert_eq!(
        metrics_without_timings(&whole),
        metrics_without_timings(&parts)
    );
}

/// A run killed with SIGKILL leaves its lock file behind with its pid; the next run takes the
/// directory over and says so. `--force` on a directory in use moves nothing.
#[test]
fn a_killed_runs_lock_is_taken_over() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = resumable_run(dir.path(), 100_000);
    let out = dir.path().join("run");
    let args = |extra: &[&str]| -> Vec<String> {
        let mut a: Vec<String> = ["train", p(&spec), "--data", p(&data), "-o", p(&out)]
            .iter()
            .map(|s| s.to_string())
            .collect();
        a.extend(extra.iter().map(|s| s.to_string()));
        a
    };
    let mut child = Command::new(env!("CARGO_BIN_EXE_snfc"))
        .args(args(&["-q"]))
        .current_dir(root())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawning snfc");
    wait_for_epochs(&out, 2);
    let err = fails(snfc(args(&["--force", "-q"])));
    assert!(err.contains(&format!("pid {}", child.id())), "{err}");
    assert!(
        !out.join("previous-1").exists(),
        "--force moved a live run's files"
    );
    child.kill().unwrap();
    child.wait().unwrap();
    let lock = std::fs::read_to_string(out.join(".lock")).unwrap();
    assert_eq!(lock.trim(), child.id().to_string());
    let done = metrics_without_timings(&out).len();
    let epochs = (done + 1).to_string();
    let o = snfc(args(&["--resume", "--epochs", &epochs]));
    let err = stderr(&o);
    ok(o);
    assert!(
        err.contains(&format!(
            "the run of pid {} did not end cleanly",
            child.id()
        )),
        "{err}"
    );
    assert_eq!(std::fs::read_to_string(out.join(".lock")).unwrap(), "");
}

/// What `--resume` takes: a run directory or its last.safetensors, never a spec or a directory
/// without a run; `train` with neither a spec nor `--resume RUN` is a usage error.
#[test]
fn resume_names_what_it_continues() {
    let dir = tempfile::tempdir().unwrap();
    let (spec, data) = resumable_run(dir.path(), 1);
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let err = fails(snfc([
        "train",
        p(&spec),
        "--data",
        p(&data),
        "--resume",
        "-o",
        p(&empty),
        "-q",
    ]));
    assert!(
        err.contains(&format!("{}/last.safetensors does not exist", p(&empty))),
        "{err}"
    );
    let err = fails(snfc(["train", "--resume", p(&spec)]));
    assert!(err.contains("this is a spec"), "{err}");
    let o = snfc(["train"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--resume RUN"), "{}", stderr(&o));
    let run = dir.path().join("run");
    ok(snfc([
        "train",
        p(&spec),
        "--data",
        p(&data),
        "-o",
        p(&run),
        "-q",
    ]));
    let err = fails(snfc([
        "train",
        "--resume",
        p(&run.join("checkpoint.safetensors")),
    ]));
    assert!(err.contains("last.safetensors"), "{err}");
    let err = fails(snfc(["train", "--resume", p(&run), "-o", p(&empty)]));
    assert!(err.contains("different runs"), "{err}");
    // The run's own spec, read from last.safetensors.
    let text = ok(snfc([
        "train",
        "--resume",
        p(&run),
        "--epochs",
        "2",
        "--json",
        "-q",
    ]));
    let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
    assert_eq!(v["epochs_run"], 1);
    assert_eq!(v["last"]["epoch"], 2);
    assert!(v["best_val_nll_nats"].as_f64().unwrap().is_finite(), "{v}");
}

// ---------------------------------------------------------------------------------------------
// Gradient angle (the paper's Fig. 3)
// ---------------------------------------------------------------------------------------------

/// The angle the library measures (`snfc_runtime::angle`, what `train --angle-every` logs)
/// equals the angle between `snfc grad` and `snfc grad --exact` (every rewrite off) of the
/// self-normalizing spec, on a fixed batch and noise, per layer over W and b; and `grad --exact`
/// of the self-normalizing spec differs from `grad` of the exact-gradient spec, whose objective
/// has no reconstruction term.
#[test]
fn gradient_angle_matches_the_angle_between_snfc_grad_outputs() {
    use snfc_runtime::angle::{angle_degrees, AngleProbe};
    let dir = tempfile::tempdir().unwrap();
    let data = snfc_runtime::data::embedded_mnist().unwrap();
    let spec = snfc_compiler::spec::load_spec(&root().join("specs/mnist_fc2.json")).unwrap();
    // Initial parameters with R moved off Wᵀ, so the two gradients differ measurably.
    let mut model = Model::<f64>::init(&spec, 3);
    for (name, v) in model.values.iter_mut() {
        if name.ends_with("weight_inv") {
            *v = Arc::new(
                v.iter()
                    .enumerate()
                    .map(|(i, x)| x + 2e-3 * ((i as f64 * 0.37).sin()))
                    .collect(),
            );
        }
    }
    let params = dir.path().join("p.safetensors");
    model.save(&params, &[], HashMap::new()).unwrap();
    let batch = 8;
    let rows: Vec<f64> = (0..batch)
        .flat_map(|i| data.train.example(i).iter().map(|&v| v as f64))
        .collect();
    let input = dir.path().join("x.npy");
    snfc_runtime::npy::write_npy_f64(&input, &[batch, 784], &rows).unwrap();
    let grads = |spec_file: &str, out: &str, exact: bool| {
        let out = dir.path().join(out);
        let mut args = vec![
            "grad",
            spec_file,
            "--params",
            p(&params),
            "--input",
            p(&input),
            "--seed",
            "11",
            "--dtype",
            "f64",
            "--out",
            p(&out),
        ];
        if exact {
            args.push("--exact");
        }
        ok(snfc(args));
        read_safetensors(&out).tensors
    };
    let snf = grads("specs/mnist_fc2.json", "snf.safetensors", false);
    let exact = grads("specs/mnist_fc2.json", "exact.safetensors", true);
    let exact_spec = grads(
        "specs/mnist_fc2_exact.json",
        "exact_spec.safetensors",
        false,
    );
    let w = "layers.0.weight";
    assert!(
        exact[w].2.iter().zip(&exact_spec[w].2).any(|(a, b)| (a - b).abs() > 1e-9),
        "grad --exact is the exact gradient of the self-normalizing objective, not the exact spec's"
    );
    let from_grad_files = |layer: usize| {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        for n in ["weight", "bias"] {
            let name = format!("layers.{layer}.{n}");
            a.extend(&snf[&name].2);
            b.extend(&exact[&name].2);
        }
        angle_degrees(&a, &b)
    };

    // The library's measurement on the same batch and noise (`snfc grad --seed 11`).
    let probe = AngleProbe::new(&spec, batch)
        .unwrap()
        .expect("a self-normalizing spec");
    let mut feeds = model.values.clone();
    let mut x = vec![0.0; 784 * batch];
    for b in 0..batch {
        for k in 0..784 {
            x[k * batch + b] = rows[b * 784 + k];
        }
    }
    feeds.insert("x".into(), Arc::new(x));
    let mut noise = vec![0.0f64; 784 * batch];
    snfc_runtime::batch::fill_uniform(
        &mut <rand_chacha::ChaCha8Rng as rand::SeedableRng>::seed_from_u64(11),
        &mut noise,
    );
    feeds.insert("noise".into(), Arc::new(noise));
    let angles = probe.measure(&feeds).unwrap();
    assert_eq!(angles.keys().collect::<Vec<_>>(), ["layers.0", "layers.2"]);
    for (layer, k) in [("layers.0", 0), ("layers.2", 2)] {
        let (lib, files) = (angles[layer], from_grad_files(k));
        assert!(files > 1e-3 && files < 90.0, "{layer}: {files}°");
        assert!(
            (lib - files).abs() <= 1e-9 * files,
            "{layer}: {lib}° vs {files}°"
        );
    }

    // `train --angle-every 2` logs them: two measurements in a 4-step epoch.
    let out = dir.path().join("run");
    ok(snfc([
        "train",
        "specs/mnist_fc2.json",
        "--steps",
        "4",
        "--epochs",
        "1",
        "--angle-every",
        "2",
        "--device",
        "host",
        "--out",
        p(&out),
        "-q",
    ]));
    let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let line: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
    let a = &line["grad_angle_deg"];
    assert_eq!(a["measurements"], 2, "{line}");
    let mean = a["mean"].as_f64().unwrap();
    let layers = a["layers"].as_object().unwrap();
    assert_eq!(layers.len(), 2, "{a}");
    let layer_mean = layers.values().map(|v| v.as_f64().unwrap()).sum::<f64>() / 2.0;
    assert!(
        (mean - layer_mean).abs() < 1e-9 && mean > 0.0 && mean < 90.0,
        "{a}"
    );
    // grad --exact and --no-fusion are two different things.
    let err = fails(snfc([
        "grad",
        "specs/mnist_fc2.json",
        "--exact",
        "--no-fusion",
        "--params",
        p(&params),
        "--input",
        p(&input),
        "-o",
        p(&dir.path().join("x.safetensors")),
    ]));
    assert!(err.contains("cannot be used with"), "{err}");
    // An exact spec has nothing to compare.
    let err = fails(snfc([
        "train",
        "specs/mnist_fc2_exact.json",
        "--steps",
        "1",
        "--angle-every",
        "1",
        "--out",
        p(&dir.path().join("exact")),
        "-q",
    ]));
    assert!(err.contains("no self-normalizing layer"), "{err}");
}

// ---------------------------------------------------------------------------------------------
// plot
// ---------------------------------------------------------------------------------------------

/// `snfc plot` of two runs writes a PNG of the documented size (two 640×400 panels per row:
/// four panels always, plus reconstruction, λ and angle when logged) with both runs' colours
/// drawn; a directory without metrics is one clear error.
#[test]
fn plot_draws_runs_into_a_png_of_the_expected_size() {
    let dir = tempfile::tempdir().unwrap();
    let write_run = |name: &str, with_extras: bool| {
        let d = dir.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        let mut text = String::new();
        for e in 1..=12 {
            let nll = 1500.0 - 400.0 * (e as f64).ln() + if with_extras { 5.0 } else { 0.0 };
            let mut line = serde_json::json!({
                "epoch": e, "steps": e * 80, "train_loss": nll - 50.0,
                "val_nll_nats": nll, "val_bits_per_dim": nll / (784.0 * std::f64::consts::LN_2),
                "lr": 1e-3, "seconds": 2.5, "examples_per_sec": 3000.0
            });
            if with_extras {
                // Today's fields; the other run has an older file's `train_loss` alone.
                let o = line.as_object_mut().unwrap();
                o.remove("train_loss");
                o.insert("train_objective_data_terms".into(), (nll - 50.0).into());
                o.insert("train_nll_nats".into(), (nll + 20.0).into());
                o.insert(
                    "train_bits_per_dim".into(),
                    ((nll + 20.0) / (784.0 * std::f64::consts::LN_2)).into(),
                );
                line["val_recon"] = serde_json::json!(30.0 / e as f64);
                line["lambda"] =
                    serde_json::json!({"layers.0": e as f64, "layers.2": 2.0 * e as f64});
                line["grad_angle_deg"] = serde_json::json!({
                    "mean": 1.0 / e as f64, "std": 0.1, "measurements": 4,
                    "layers": {"layers.0": 1.0 / e as f64}
                });
            }
            text.push_str(&format!("{line}\n"));
        }
        std::fs::write(d.join("metrics.jsonl"), text).unwrap();
        d
    };
    let snf = write_run("snf", true);
    let exact = write_run("exact", false);
    let out = dir.path().join("curves.png");
    let said = ok(snfc(["plot", p(&snf), p(&exact), "-o", p(&out)]));
    assert!(said.contains("1280×1600"), "{said}");
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out).unwrap()));
    let mut reader = decoder.read_info().expect("a valid PNG");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).expect("PNG data");
    assert_eq!(
        (info.width, info.height),
        (1280, 1600),
        "7 panels: 4 rows of 2"
    );
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let count = |rgb: [u8; 3]| buf.chunks_exact(3).filter(|px| *px == rgb).count();
    assert!(
        count([31, 119, 180]) > 500,
        "the first run's curves are drawn"
    );
    assert!(
        count([214, 39, 40]) > 500,
        "the second run's curves are drawn"
    );

    // One run without the optional curves: 4 panels, 2 rows.
    let out2 = dir.path().join("one.png");
    ok(snfc(["plot", p(&exact), "-o", p(&out2)]));
    let reader = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&out2).unwrap()))
        .read_info()
        .unwrap();
    assert_eq!((reader.info().width, reader.info().height), (1280, 800));

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = fails(snfc(["plot", p(&snf), p(&empty), "-o", p(&out)]));
    assert!(
        err.contains("empty/metrics.jsonl") && err.contains("cannot read"),
        "{err}"
    );
    std::fs::write(empty.join("metrics.jsonl"), "{\"epoch\": 1}\n").unwrap();
    let err = fails(snfc(["plot", p(&empty), "-o", p(&out)]));
    assert!(err.contains("line 1") && err.contains("seconds"), "{err}");
}

/// `bench --scaling` times one layer both ways per size and writes the JSON rows and a
/// 640×400 log-log PNG; the ratio is exact / self-normalizing; a size a conv cannot take is
/// refused before anything runs.
#[test]
fn bench_scaling_writes_rows_and_a_picture() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("scaling");
    let text = ok(snfc([
        "bench",
        "--scaling",
        "conv",
        "--dims",
        "64,128",
        "--steps",
        "2",
        "--warmup",
        "0",
        "--device",
        "host",
        "-o",
        p(&out),
    ]));
    assert!(text.contains("[2, 8, 8]"), "{text}");
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("scaling-conv.json")).unwrap())
            .unwrap();
    let rows = json["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 2);
    for (r, d) in rows.iter().zip([64, 128]) {
        assert_eq!(r["dim"], d);
        let (s, e) = (
            r["snf_ms"].as_f64().unwrap(),
            r["exact_ms"].as_f64().unwrap(),
        );
        assert!(s > 0.0 && e > 0.0);
        assert!((r["ratio"].as_f64().unwrap() - e / s).abs() < 1e-9 * e / s);
    }
    assert!(json["includes"]
        .as_str()
        .unwrap()
        .contains("read-back of the loss"));
    let reader = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(out.join("scaling-conv.png")).unwrap(),
    ))
    .read_info()
    .expect("a valid PNG");
    assert_eq!((reader.info().width, reader.info().height), (640, 400));
    let err = fails(snfc([
        "bench",
        "--scaling",
        "conv",
        "--dims",
        "100",
        "-o",
        p(&out),
    ]));
    assert!(err.contains("100 is not C·S²"), "{err}");
}

/// 60 rows of 4 continuous values (48 train, 6 validation, 6 test) as `dir/name`.
fn continuous_npy(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let rows: Vec<f64> = (0..60 * 4)
        .map(|i| ((i * 37 % 100) as f64) / 50.0 - 1.0)
        .collect();
    snfc_runtime::npy::write_npy_f64(&path, &[60, 4], &rows).unwrap();
    path
}

/// A run that never finished an epoch (`--epochs 0`, `--steps 0`) leaves nothing that blocks
/// its directory: the next `train` there starts without `--force` or `--resume`.
#[test]
fn an_empty_run_does_not_block_its_directory() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("small.json");
    std::fs::write(&spec, small_spec_json("small", 4, "self_normalizing")).unwrap();
    let data = continuous_npy(dir.path(), "data.npy");
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            p(&spec),
            "--data",
            p(&data),
            "--out",
            p(&out),
            "-q",
        ];
        args.extend(extra);
        snfc(args)
    };
    for empty in [&["--epochs", "0"][..], &["--steps", "0"][..]] {
        ok(train(empty));
        ok(train(empty));
    }
    ok(train(&["--epochs", "1"]));
    assert!(out.join("metrics.jsonl").metadata().unwrap().len() > 0);
    assert!(!out.join("previous-1").exists(), "nothing was moved aside");
    // A run with a finished epoch still does.
    let err = fails(train(&["--epochs", "1"]));
    assert!(err.contains("already holds a run"), "{err}");
}

/// A batch size that does not divide the training split is said once: how many examples each
/// epoch leaves out (a full batch of 3 over 48 training examples leaves none, 5 leaves 3).
#[test]
fn a_batch_that_does_not_divide_the_data_is_said_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = continuous_npy(dir.path(), "data.npy");
    for (batch, left) in [(3, None), (5, Some(3))] {
        let spec = dir.path().join(format!("b{batch}.json"));
        let text = small_spec_json("small", 4, "self_normalizing")
            .replace("\"batch_size\": 3", &format!("\"batch_size\": {batch}"));
        std::fs::write(&spec, text).unwrap();
        let out = dir.path().join(format!("run{batch}"));
        let o = snfc([
            "train",
            p(&spec),
            "--data",
            p(&data),
            "--out",
            p(&out),
            "--epochs",
            "2",
        ]);
        let err = stderr(&o);
        ok(o);
        match left {
            None => assert!(!err.contains("does not divide"), "{err}"),
            Some(n) => {
                assert_eq!(err.matches("does not divide").count(), 1, "{err}");
                assert!(err.contains(&format!("leaves out {n} examples")), "{err}");
            }
        }
    }
}

/// A run's options are part of the run: `--resume` continues an `--exact --dtype f64` run on
/// its own data without repeating the flags (and with the exact gradient, as recorded), and
/// refuses a flag that differs, by name, changing nothing.
#[test]
fn resume_reuses_the_runs_options_and_refuses_different_ones() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("small.json");
    std::fs::write(&spec, small_spec_json("small", 4, "self_normalizing")).unwrap();
    let data = continuous_npy(dir.path(), "data.npy");
    let other = continuous_npy(dir.path(), "other.npy");
    let out = dir.path().join("run");
    let train = |extra: &[&str]| {
        let mut args = vec![
            "train",
            p(&spec),
            "--out",
            p(&out),
            "-q",
            "--device",
            "host",
        ];
        args.extend(extra);
        snfc(args)
    };
    ok(train(&[
        "--exact",
        "--dtype",
        "f64",
        "--data",
        p(&data),
        "--epochs",
        "1",
    ]));
    let last = out.join("last.safetensors");
    let recorded = || {
        snfc_runtime::train::recorded_options(&last)
            .unwrap()
            .expect("options recorded")
    };
    let first = recorded();
    assert_eq!(
        (first.level.as_str(), first.dtype.as_str()),
        ("none", "f64")
    );
    assert_eq!(first.data.as_deref(), Some(p(&data)));
    // No flags: the same run goes on (exact, f64, the same data).
    ok(train(&["--resume", "--epochs", "2"]));
    assert_eq!(recorded(), first);
    let metrics = || std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    assert_eq!(metrics().lines().count(), 2);
    // A flag that differs is refused by name; nothing changes.
    let before = (std::fs::read(&last).unwrap(), metrics());
    for (flags, named) in [
        (&["--no-fusion"][..], "--no-fusion"),
        (&["--dtype", "f32"][..], "--dtype"),
        (&["--data", p(&other)][..], "other.npy"),
    ] {
        let mut args = vec!["--resume", "--epochs", "3"];
        args.extend(flags);
        let err = fails(train(&args));
        assert!(
            err.contains(named) && err.contains("resume"),
            "{flags:?}: {err}"
        );
        assert_eq!((std::fs::read(&last).unwrap(), metrics()), before);
    }
    // Repeating the run's own flags is fine.
    ok(train(&[
        "--resume",
        "--epochs",
        "3",
        "--exact",
        "--data",
        p(&data),
    ]));
    assert_eq!(metrics().lines().count(), 3);

    // A target already reached is said, changes nothing and is not a failure.
    let before = (std::fs::read(&last).unwrap(), metrics());
    let text = ok(train(&["--resume", "--epochs", "3"]));
    assert!(
        text.contains("already reached epoch 3 of 3") && text.contains("--epochs"),
        "{text}"
    );
    assert_eq!((std::fs::read(&last).unwrap(), metrics()), before);
    // --seed has no effect on a resumed run's stream: refused, by name.
    let err = fails(train(&["--resume", "--epochs", "4", "--seed", "7"]));
    assert!(
        err.contains("--seed 7") && err.contains("last.safetensors"),
        "{err}"
    );
    // A spec that differs is refused field by field, with both values.
    let json = small_spec_json("small", 4, "self_normalizing");
    let changed: serde_json::Value = {
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        v["train"]["optimizer"] = serde_json::json!({"adam": {"lr": 0.0003}});
        v
    };
    std::fs::write(&spec, changed.to_string()).unwrap();
    let err = fails(train(&["--resume", "--epochs", "4"]));
    assert!(
        err.contains("/train/optimizer/adam/lr: ") && err.contains("0.0003 now"),
        "{err}"
    );
    assert_eq!((std::fs::read(&last).unwrap(), metrics()), before);
}

/// `bench --profile` accounts for every millisecond of a step: the kinds of work add up to the
/// profiled step, only `other` is a remainder, and the step's GEMMs are timed alone for the
/// rate it is measured against. An exact-gradient spec has no learned inverse to time.
#[test]
fn bench_profile_adds_up_to_the_step() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("small.json");
    std::fs::write(&spec, small_spec_json("small", 16, "self_normalizing")).unwrap();
    let args = [
        "bench",
        p(&spec),
        "--steps",
        "4",
        "--warmup",
        "1",
        "--profile",
        "--compare-exact",
        "--device",
        "host",
    ];
    let text = ok(snfc(args.iter().chain(&["--json"])));
    let lines: Vec<serde_json::Value> = text
        .lines()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 2, "{text}");
    for r in &lines {
        let step = r["profiled_step_ms"].as_f64().unwrap();
        let breakdown = r["breakdown"].as_array().unwrap();
        let works: Vec<&str> = breakdown
            .iter()
            .map(|w| w["work"].as_str().unwrap())
            .collect();
        assert_eq!(
            works,
            [
                "gemm",
                "conv",
                "spline",
                "elementwise",
                "shape",
                "linalg",
                "adam",
                "other"
            ]
        );
        let sum: f64 = breakdown.iter().map(|w| w["ms"].as_f64().unwrap()).sum();
        assert!((sum - step).abs() <= 1e-9 * step, "{sum} vs {step}");
        for w in &breakdown[..7] {
            assert!(w["ms"].as_f64().unwrap() >= 0.0, "{w}");
        }
        let ms = |work: &str| {
            breakdown[works.iter().position(|w| *w == work).unwrap()]["ms"]
                .as_f64()
                .unwrap()
        };
        assert!(
            ms("gemm") > 0.0 && ms("adam") > 0.0 && ms("conv") == 0.0,
            "{r}"
        );
        // Every kernel kind is listed with its category; their times are the categories'.
        let rows = r["profile"].as_array().unwrap();
        let gemm_rows: f64 = rows
            .iter()
            .filter(|row| row["work"] == "gemm")
            .map(|row| row["seconds"].as_f64().unwrap() * 1e3)
            .sum();
        assert!((gemm_rows - ms("gemm")).abs() <= 1e-9 * step);
        assert!(r["gemm_rate_gflops"].as_f64().unwrap() > 0.0);
        let share = r["share_of_gemm_rate"].as_f64().unwrap();
        let expected = r["gflops"].as_f64().unwrap() / r["gemm_rate_gflops"].as_f64().unwrap();
        assert!((share - expected).abs() <= 1e-9 * expected);
    }
    assert!(
        lines[0]["sampling"]["learned_ms_per_sample"]
            .as_f64()
            .unwrap()
            > 0.0
    );
    assert!(lines[1]["sampling"].get("learned_ms_per_sample").is_none());
    assert!(
        lines[1]["breakdown"][5]["ms"].as_f64().unwrap() > 0.0,
        "the exact step's LU"
    );
    let text = ok(snfc(args));
    assert!(
        text.contains("where a step's") && text.contains("% of that"),
        "{text}"
    );
    assert!(!text.contains("NaN"), "{text}");
}

/// `train --exact` trains the same objective with its exact gradient: one step from the same
/// initialization reports the same loss as the self-normalizing step up to the substitution
/// R⁻¹ ≈ W in the reported value (same objective, same batch; 7e-5 apart here), but moves the
/// weights differently (different gradient).
#[test]
fn train_exact_follows_the_same_objective_with_the_exact_gradient() {
    let dir = tempfile::tempdir().unwrap();
    let run = |name: &str, exact: bool| {
        let out = dir.path().join(name);
        let mut args = vec![
            "train",
            "specs/mnist_fc2.json",
            "--steps",
            "1",
            "--epochs",
            "1",
            "--dtype",
            "f64",
            "--device",
            "host",
            "-q",
            "--out",
            p(&out),
        ];
        if exact {
            args.push("--exact");
        }
        ok(snfc(args));
        let m = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let line: serde_json::Value = serde_json::from_str(m.lines().next().unwrap()).unwrap();
        let ckpt = read_safetensors(&out.join("checkpoint.safetensors"));
        (
            line["train_objective_data_terms"].as_f64().unwrap(),
            ckpt.tensors["layers.0.weight"].2.clone(),
        )
    };
    let (snf_loss, snf_w) = run("snf", false);
    let (exact_loss, exact_w) = run("exact", true);
    assert!(
        (snf_loss - exact_loss).abs() <= 1e-3 * snf_loss.abs(),
        "{snf_loss} vs {exact_loss}"
    );
    assert_ne!(snf_loss, exact_loss, "the exact step computes R⁻¹ itself");
    assert!(
        snf_w.iter().zip(&exact_w).any(|(a, b)| a != b),
        "the gradients differ"
    );
    let err = fails(snfc([
        "train",
        "specs/mnist_fc2.json",
        "--exact",
        "--no-fusion",
    ]));
    assert!(err.contains("cannot be used with"), "{err}");
}

/// Exit statuses a script can tell apart: a diverged run exits 3 (with its message), a bad
/// input 1, an unknown flag 2.
#[test]
fn a_diverged_run_exits_3_a_bad_input_1_and_a_usage_error_2() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("small.json");
    std::fs::write(&spec, small_spec_json("small", 4, "self_normalizing")).unwrap();
    // One example overflows f32 when squared: the step's loss is infinite.
    let data = dir.path().join("x.npy");
    let mut rows: Vec<f64> = (0..40 * 4)
        .map(|i| ((i * 37 % 100) as f64) / 50.0 - 1.0)
        .collect();
    rows[4 * 7 + 2] = 1e30;
    snfc_runtime::npy::write_npy_f64(&data, &[40, 4], &rows).unwrap();
    let out = dir.path().join("run");
    let status = |args: &[&str]| {
        let o = snfc(args);
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stderr).to_string(),
        )
    };
    let (code, err) = status(&[
        "train",
        p(&spec),
        "--data",
        p(&data),
        "--out",
        p(&out),
        "-q",
        "--device",
        "host",
    ]);
    assert_eq!(code, Some(3), "{err}");
    assert!(err.contains("error: training diverged"), "{err}");
    let (code, err) = status(&["train", p(&dir.path().join("nope.json"))]);
    assert_eq!(code, Some(1), "{err}");
    let (code, err) = status(&["train", p(&spec), "--no-such-flag"]);
    assert_eq!(code, Some(2), "{err}");
    let help = String::from_utf8_lossy(&snfc(["--help"]).stdout).to_string();
    assert!(
        help.contains("Exit status") && help.contains("3 the training run diverged"),
        "{help}"
    );
}
