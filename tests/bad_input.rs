//! Malformed input of every kind through the `snfc` binary, as one table: broken specs and
//! compiled plans, `.npy` arrays, IDX and CIFAR files, safetensors checkpoints and command-line
//! arguments. Every row must fail with an exit code (no signal, no panic), print one error that
//! names the file and the spot (JSON pointer, tensor, index), and leave its directory exactly as
//! it was: no output written over, no file left behind.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

// ---------------------------------------------------------------------------------------------
// Running snfc
// ---------------------------------------------------------------------------------------------

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Run `snfc` in the repository root.
fn snfc<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_snfc"))
        .args(args)
        .current_dir(root())
        .output()
        .expect("running snfc")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

// ---------------------------------------------------------------------------------------------
// Valid files, byte for byte (written here, independently of the code that reads them)
// ---------------------------------------------------------------------------------------------

/// Values per example of the small spec.
const D: usize = 4;

/// A small flow on 4 values (batch 3): what most rows feed a broken file of some kind.
fn small_spec() -> Value {
    json!({
        "name": "small",
        "input": {"shape": [D], "preprocess": "none"},
        "layers": [
            {"type": "linear", "bias": true},
            {"type": "smooth_leaky_relu", "alpha": 0.3},
            {"type": "linear", "bias": true}
        ],
        "objective": {"gradient": "self_normalizing", "lambda": 1.0},
        "train": {"batch_size": 3, "epochs": 1, "warmup_epochs": 0, "seed": 0}
    })
}

/// `small_spec` with the value at JSON pointer `at` set (or the member removed if `None`).
fn spec_with(at: &str, v: Option<Value>) -> Vec<u8> {
    let mut s = small_spec();
    let (parent, key) = at.rsplit_once('/').expect("a member");
    let parent = s.pointer_mut(parent).expect("pointer into the small spec");
    match (parent, v) {
        (Value::Array(a), Some(v)) => a[key.parse::<usize>().expect("an index")] = v,
        (Value::Object(o), Some(v)) => {
            o.insert(key.to_string(), v);
        }
        (Value::Object(o), None) => {
            o.remove(key);
        }
        _ => panic!("cannot edit {at}"),
    }
    s.to_string().into_bytes()
}

/// A version-1.0 `.npy` file with a hand-written header.
fn npy(descr: &str, fortran: bool, shape: &str, body: &[u8]) -> Vec<u8> {
    let mut header = format!(
        "{{'descr': '{descr}', 'fortran_order': {}, 'shape': {shape}, }}",
        if fortran { "True" } else { "False" }
    );
    while !(10 + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut v = b"\x93NUMPY\x01\x00".to_vec();
    v.extend_from_slice(&(header.len() as u16).to_le_bytes());
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(body);
    v
}

fn f64s(values: &[f64]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A float64 array `[rows, D]` of ordinary values.
fn rows_npy(rows: usize) -> Vec<u8> {
    let v: Vec<f64> = (0..rows * D).map(|i| (i % 7) as f64 / 7.0).collect();
    npy("<f8", false, &format!("({rows}, {D})"), &f64s(&v))
}

/// `rows_npy(n)` with value `v` at flat index `at`.
/// [`small_spec`] on 8-bit data (`dequantize_logit`): the same parameters.
fn eight_bit_spec() -> Vec<u8> {
    let mut s = small_spec();
    s["input"]["preprocess"] = json!("dequantize_logit");
    s.to_string().into_bytes()
}

/// Three rows of 8-bit values (integers 0..=255) with `v` at `at`.
fn eight_bit_rows_with(at: usize, v: f64) -> Vec<u8> {
    let mut vals: Vec<f64> = (0..3 * D).map(|i| (i * 37 % 256) as f64).collect();
    vals[at] = v;
    npy("<f8", false, &format!("(3, {D})"), &f64s(&vals))
}

fn rows_npy_with(rows: usize, at: usize, v: f64) -> Vec<u8> {
    let mut vals: Vec<f64> = (0..rows * D).map(|i| (i % 7) as f64 / 7.0).collect();
    vals[at] = v;
    npy("<f8", false, &format!("({rows}, {D})"), &f64s(&vals))
}

/// One tensor of a safetensors file: dtype, shape, raw bytes.
type Tensor = (&'static str, Vec<usize>, Vec<u8>);

/// A safetensors file: u64 LE header length, the JSON header, the data.
fn safetensors(tensors: &BTreeMap<String, Tensor>, metadata: Option<Value>) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut data = Vec::new();
    for (name, (dtype, shape, bytes)) in tensors {
        let start = data.len();
        data.extend_from_slice(bytes);
        header.insert(
            name.clone(),
            json!({"dtype": dtype, "shape": shape, "data_offsets": [start, data.len()]}),
        );
    }
    if let Some(m) = metadata {
        header.insert("__metadata__".into(), m);
    }
    let mut h = Value::Object(header).to_string().into_bytes();
    while !h.len().is_multiple_of(8) {
        h.push(b' ');
    }
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    out
}

/// The small spec's parameters (identities, zero biases) in f64, and its metadata.
fn small_params() -> BTreeMap<String, Tensor> {
    let eye: Vec<f64> = (0..D * D)
        .map(|i| if i / D == i % D { 1.0 } else { 0.0 })
        .collect();
    let mut t = BTreeMap::new();
    for l in [0, 2] {
        t.insert(
            format!("layers.{l}.weight"),
            ("F64", vec![D, D], f64s(&eye)),
        );
        t.insert(
            format!("layers.{l}.weight_inv"),
            ("F64", vec![D, D], f64s(&eye)),
        );
        t.insert(
            format!("layers.{l}.bias"),
            ("F64", vec![D], f64s(&[0.0; D])),
        );
    }
    t
}

fn small_meta() -> Value {
    json!({"spec": small_spec().to_string(), "format": "snfc-params-v1"})
}

/// A checkpoint of the small spec with one tensor replaced (or removed if `None`).
fn ckpt_with(name: &str, t: Option<Tensor>) -> Vec<u8> {
    let mut p = small_params();
    match t {
        Some(t) => p.insert(name.to_string(), t),
        None => p.remove(name),
    };
    safetensors(&p, Some(small_meta()))
}

fn ckpt() -> Vec<u8> {
    safetensors(&small_params(), Some(small_meta()))
}

/// An IDX file of 8-bit images (magic 0x803) with `body` after the header.
fn idx_images(n: u32, rows: u32, cols: u32, body: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [0x803, n, rows, cols] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

fn idx_labels(n: u32) -> Vec<u8> {
    let mut v = 0x801u32.to_be_bytes().to_vec();
    v.extend_from_slice(&n.to_be_bytes());
    v.extend(std::iter::repeat_n(3u8, n as usize));
    v
}

fn blank_images(n: u32, side: u32) -> Vec<u8> {
    idx_images(n, side, side, &vec![0; (n * side * side) as usize])
}

/// CRC-32 (IEEE), for the gzip trailer.
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// `data` as a gzip file of one stored (uncompressed) deflate block.
fn gzip_stored(data: &[u8]) -> Vec<u8> {
    assert!(data.len() < 65_536);
    let mut v = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff, 1];
    let len = data.len() as u16;
    v.extend_from_slice(&len.to_le_bytes());
    v.extend_from_slice(&(!len).to_le_bytes());
    v.extend_from_slice(data);
    v.extend_from_slice(&crc32(data).to_le_bytes());
    v.extend_from_slice(&(data.len() as u32).to_le_bytes());
    v
}

/// The plan `snfc compile --emit plan` writes for the small spec (compiled once).
fn small_plan() -> &'static Value {
    static PLAN: OnceLock<Value> = OnceLock::new();
    PLAN.get_or_init(|| {
        let dir = tempfile::tempdir().expect("temp dir");
        let spec = dir.path().join("small.json");
        std::fs::write(&spec, small_spec().to_string()).expect("write spec");
        let out = dir.path().join("plan");
        let o = snfc(&[
            "compile".as_ref(),
            spec.as_os_str(),
            "--emit".as_ref(),
            "plan".as_ref(),
            "-o".as_ref(),
            out.as_os_str(),
        ]);
        assert!(o.status.success(), "compile: {}", text(&o.stderr));
        let t = std::fs::read_to_string(out.join("plan.json")).expect("plan.json");
        serde_json::from_str(&t).expect("plan JSON")
    })
}

/// The small plan with one edit.
fn plan_with(edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let mut v = small_plan().clone();
    edit(&mut v);
    v.to_string().into_bytes()
}

/// The first instruction of the small plan matching `pred`.
fn instr_where(pred: impl Fn(&Value) -> bool) -> usize {
    small_plan()["step"]["instrs"]
        .as_array()
        .expect("instrs")
        .iter()
        .position(pred)
        .expect("such an instruction")
}

/// A value read twice: the first instruction (in launch order) that reads it, and the slot.
fn early_reader() -> (usize, u64) {
    let step = &small_plan()["step"];
    let order: Vec<usize> = serde_json::from_value(step["order"].clone()).expect("order");
    let args = |i: usize| -> Vec<u64> {
        serde_json::from_value(step["instrs"][i]["args"].clone()).unwrap_or_default()
    };
    for (k, &i) in order.iter().enumerate() {
        for a in args(i) {
            if order[k + 1..].iter().any(|&j| args(j).contains(&a)) {
                return (i, a);
            }
        }
    }
    panic!("no value is read twice")
}

// ---------------------------------------------------------------------------------------------
// The table
// ---------------------------------------------------------------------------------------------

/// One malformed input: `args` (a word `@name` is the path of `name` in the row's directory),
/// the files to create there (`dir/name` creates the directory), and what stderr must say.
struct Case {
    name: &'static str,
    args: Vec<&'static str>,
    files: Vec<(&'static str, Vec<u8>)>,
    expect: Vec<&'static str>,
}

fn case(
    name: &'static str,
    args: &[&'static str],
    files: Vec<(&'static str, Vec<u8>)>,
    expect: &[&'static str],
) -> Case {
    Case {
        name,
        args: args.to_vec(),
        files,
        expect: expect.to_vec(),
    }
}

/// Bytes an output path holds before the run; they must still be there after it.
const PRECIOUS: &[u8] = b"precious: snfc must not overwrite this";

/// `compile @s.json --emit plan -o @out` with `s`: the spec rows (out/plan.json pre-exists).
fn spec_case(name: &'static str, s: Vec<u8>, expect: &[&'static str]) -> Case {
    case(
        name,
        &["compile", "@s.json", "--emit", "plan", "-o", "@out"],
        vec![("s.json", s), ("out/plan.json", PRECIOUS.to_vec())],
        expect,
    )
}

/// `train @plan.json` on a small data set: the plan rows (the run directory pre-exists).
fn plan_case(name: &'static str, plan: Vec<u8>, expect: &[&'static str]) -> Case {
    case(
        name,
        &[
            "train",
            "@plan.json",
            "--data",
            "@x.npy",
            "--device",
            "host",
            "--steps",
            "1",
            "--epochs",
            "1",
            "--out",
            "@run",
            "--quiet",
        ],
        vec![
            ("plan.json", plan),
            ("x.npy", rows_npy(30)),
            ("run/metrics.jsonl", PRECIOUS.to_vec()),
        ],
        expect,
    )
}

/// `grad` of the small spec with `input` as the batch (the output pre-exists).
fn grad_case(name: &'static str, input: Vec<u8>, expect: &[&'static str]) -> Case {
    case(
        name,
        &[
            "grad",
            "@s.json",
            "--params",
            "@p.safetensors",
            "--input",
            "@x.npy",
            "-o",
            "@g.safetensors",
        ],
        vec![
            ("s.json", small_spec().to_string().into_bytes()),
            ("p.safetensors", ckpt()),
            ("x.npy", input),
            ("g.safetensors", PRECIOUS.to_vec()),
        ],
        expect,
    )
}

/// `train` of the small spec on `data` as a `.npy` file.
fn npy_data_case(name: &'static str, data: Vec<u8>, expect: &[&'static str]) -> Case {
    case(
        name,
        &[
            "train",
            "@s.json",
            "--data",
            "@data.npy",
            "--device",
            "host",
            "--steps",
            "1",
            "--out",
            "@run",
            "--quiet",
        ],
        vec![
            ("s.json", small_spec().to_string().into_bytes()),
            ("data.npy", data),
            ("run/metrics.jsonl", PRECIOUS.to_vec()),
        ],
        expect,
    )
}

/// `train specs/mnist_fc2.json --data @mnist` with these files in `mnist/`.
fn idx_case(
    name: &'static str,
    files: Vec<(&'static str, Vec<u8>)>,
    expect: &[&'static str],
) -> Case {
    let mut files = files;
    files.push(("run/metrics.jsonl", PRECIOUS.to_vec()));
    case(
        name,
        &[
            "train",
            "specs/mnist_fc2.json",
            "--data",
            "@mnist",
            "--device",
            "host",
            "--steps",
            "1",
            "--out",
            "@run",
            "--quiet",
        ],
        files,
        expect,
    )
}

/// `sample` from `ckpt` (the output pre-exists).
fn ckpt_case(name: &'static str, ckpt: Vec<u8>, expect: &[&'static str]) -> Case {
    case(
        name,
        &["sample", "@c.safetensors", "-n", "2", "-o", "@s.npy"],
        vec![("c.safetensors", ckpt), ("s.npy", PRECIOUS.to_vec())],
        expect,
    )
}

fn cases() -> Vec<Case> {
    let spec = |s: &str| s.as_bytes().to_vec();
    let good_train = || blank_images(12, 28);
    let good_test = || blank_images(3, 28);
    let mnist = |train: Vec<u8>, test: Vec<u8>| {
        vec![
            ("mnist/train-images-idx3-ubyte", train),
            ("mnist/t10k-images-idx3-ubyte", test),
        ]
    };
    let max = u32::MAX;
    vec![
        // ---- spec JSON ------------------------------------------------------------------
        spec_case(
            "spec: JSON syntax error",
            spec("{\"name\": \"x\",\n  \"input\": {"),
            &["s.json", "malformed JSON", "line 2"],
        ),
        spec_case("spec: empty file", spec(""), &["s.json", "malformed JSON"]),
        spec_case(
            "spec: not an object",
            spec("[1, 2]"),
            &["s.json", "expected a JSON object"],
        ),
        spec_case(
            "spec: shape of wrong type",
            spec_with("/input/shape", Some(json!("784"))),
            &["s.json", "/input/shape", "expected an array"],
        ),
        spec_case(
            "spec: bias of wrong type",
            spec_with("/layers/0/bias", Some(json!("yes"))),
            &["s.json", "/layers/0/bias", "boolean"],
        ),
        spec_case(
            "spec: unknown layer type",
            spec_with("/layers/0/type", Some(json!("linar"))),
            &["s.json", "/layers/0/type", "did you mean `linear`"],
        ),
        spec_case(
            "spec: layer without a type",
            spec_with("/layers/0/type", None),
            &["s.json", "/layers/0/type", "missing field"],
        ),
        spec_case(
            "spec: unknown field",
            spec_with("/train/lerning_rate", Some(json!(1))),
            &["s.json", "/train/lerning_rate", "unknown field"],
        ),
        spec_case(
            "spec: missing input",
            spec_with("/input", None),
            &["s.json", "/input", "missing field"],
        ),
        spec_case(
            "spec: negative dimension",
            spec_with("/input/shape/0", Some(json!(-4))),
            &["s.json", "/input/shape/0", "non-negative integer"],
        ),
        spec_case(
            "spec: zero dimension",
            spec_with("/input/shape/0", Some(json!(0))),
            &["s.json", "/input/shape/0", "positive"],
        ),
        spec_case(
            "spec: shape product overflows",
            spec_with(
                "/input/shape",
                Some(json!([4294967296u64, 4294967296u64, 2])),
            ),
            &["s.json", "/input/shape", "too large"],
        ),
        spec_case(
            "spec: weight beyond 2^40 elements",
            spec_with("/input/shape", Some(json!([100000, 100000]))),
            &["s.json", "/layers/0", "2^40"],
        ),
        spec_case(
            "spec: zero batch size",
            spec_with("/train/batch_size", Some(json!(0))),
            &["s.json", "/train/batch_size", "at least 1"],
        ),
        spec_case(
            "spec: batch beyond 2^40 elements",
            spec_with("/train/batch_size", Some(json!(1u64 << 45))),
            &["s.json", "/train/batch_size", "2^40"],
        ),
        spec_case(
            "spec: negative learning rate",
            spec_with("/train/optimizer", Some(json!({"adam": {"lr": -1}}))),
            &["s.json", "/train/optimizer/adam/lr"],
        ),
        spec_case(
            "spec: huge repeat count",
            spec_with(
                "/layers",
                Some(
                    json!([{"type": "repeat", "times": 1_000_000_000_000u64, "layers": [{"type": "linear"}]}]),
                ),
            ),
            &["s.json", "/layers/0/times", "100000 layers"],
        ),
        spec_case(
            "spec: empty repeat with a huge count",
            spec_with(
                "/layers",
                Some(
                    json!([{"type": "linear"}, {"type": "repeat", "times": u64::MAX, "layers": []}]),
                ),
            ),
            &["s.json", "/layers/1/layers", "must not be empty"],
        ),
        spec_case(
            "spec: repeat count not an integer",
            spec_with(
                "/layers",
                Some(json!([{"type": "repeat", "times": 2.5, "layers": [{"type": "linear"}]}])),
            ),
            &["s.json", "/layers/0/times", "non-negative integer"],
        ),
        spec_case(
            "spec: lambda a string",
            spec_with("/objective/lambda", Some(json!("big"))),
            &["s.json", "/objective/lambda", "a number or an object"],
        ),
        spec_case(
            "spec: negative lambda",
            spec_with("/objective/lambda", Some(json!(-1.0))),
            &["s.json", "/objective/lambda", ">= 0"],
        ),
        spec_case(
            "spec: lambda beyond f64",
            spec(
                &small_spec()
                    .to_string()
                    .replace("\"lambda\":1.0", "\"lambda\":1e999"),
            ),
            &["s.json", "number out of range", "line 1"],
        ),
        spec_case(
            "spec: GECO ema out of range",
            spec_with("/objective/lambda", Some(json!({"geco": {"ema": 1.5}}))),
            &["s.json", "/objective/lambda/geco/ema", "[0, 1)"],
        ),
        spec_case(
            "spec: conv on a flat input",
            spec_with("/layers/0", Some(json!({"type": "conv", "kernel_size": 3}))),
            &["s.json", "/layers/0", "image input"],
        ),
        spec_case(
            "spec: huge conv kernel",
            spec(
                r#"{"name":"c","input":{"shape":[2,8,8],"preprocess":"none"},"layers":[{"type":"conv","kernel_size":4294967297}]}"#,
            ),
            &["s.json", "/layers/0", "2^40"],
        ),
        spec_case(
            "spec: huge coupling width",
            spec(
                r#"{"name":"c","input":{"shape":[2,8,8],"preprocess":"none"},"layers":[{"type":"affine_coupling","width":1000000000000}]}"#,
            ),
            &["s.json", "/layers/0", "coupling kernel"],
        ),
        case(
            "spec: several problems, one error line each",
            &["compile", "@s.json"],
            vec![("s.json", {
                let mut s = small_spec();
                s["layers"][1]["alpha"] = json!(1.5);
                s["train"]["batch_size"] = json!(0);
                s.to_string().into_bytes()
            })],
            &["s.json: /layers/1/alpha", "s.json: /train/batch_size"],
        ),
        case(
            "spec: file does not exist",
            &["compile", "@nope.json"],
            vec![],
            &["nope.json", "cannot read"],
        ),
        // ---- compiled plan.json ---------------------------------------------------------
        plan_case(
            "plan: truncated",
            {
                let p = plan_with(|_| {});
                p[..p.len() / 2].to_vec()
            },
            &["plan.json", "malformed JSON"],
        ),
        plan_case(
            "plan: format 2",
            plan_with(|v| v["snfc_plan"] = json!(2)),
            &["plan.json", "/snfc_plan", "format 2"],
        ),
        plan_case(
            "plan: invalid spec",
            plan_with(|v| v["spec"]["objective"]["lambda"] = json!(-1)),
            &["plan.json", "/spec: /objective/lambda"],
        ),
        plan_case(
            "plan: negative batch",
            plan_with(|v| v["batch"] = json!(-1)),
            &["plan.json", "/batch", "positive integer"],
        ),
        plan_case(
            "plan: batch does not fit the step",
            plan_with(|v| v["batch"] = json!(7)),
            &["plan.json", "[4, 7]"],
        ),
        plan_case(
            "plan: unknown opt_level",
            plan_with(|v| v["opt_level"] = json!("turbo")),
            &["plan.json", "/opt_level", "turbo"],
        ),
        plan_case(
            "plan: operand out of range",
            plan_with(|v| v["step"]["instrs"][5]["args"] = json!([99999])),
            &["plan.json", "/step/instrs/5/args/0", "out of range"],
        ),
        plan_case(
            "plan: unknown op",
            plan_with(|v| v["step"]["instrs"][10]["op"] = json!("Frobnicate")),
            &["plan.json", "/step/instrs/10", "Frobnicate"],
        ),
        plan_case(
            "plan: shape beyond 2^40 elements",
            plan_with(|v| v["step"]["instrs"][0]["shape"] = json!([1u64 << 40, 1u64 << 40])),
            &["plan.json", "/step/instrs/0/shape", "2^40"],
        ),
        plan_case(
            "plan: order reversed",
            plan_with(|v| {
                let o = v["step"]["order"].as_array_mut().expect("order");
                o.reverse();
            }),
            &["plan.json", "/step/order/0", "before it is computed"],
        ),
        plan_case(
            "plan: value released while still read",
            {
                let (i, a) = early_reader();
                plan_with(|v| v["step"]["instrs"][i]["release"] = json!([a]))
            },
            &["plan.json", "/step/order/", "released"],
        ),
        plan_case(
            "plan: buffer smaller than its value",
            plan_with(|v| {
                let n = v["step"]["buffers"]["sizes"]
                    .as_array()
                    .expect("sizes")
                    .len();
                v["step"]["buffers"]["sizes"] = json!(vec![1; n]);
            }),
            &["plan.json", "/step/buffers/sizes/0"],
        ),
        plan_case(
            "plan: unknown parameter",
            plan_with(|v| {
                let i = instr_where(|x| x["op"].get("Param").is_some());
                v["step"]["instrs"][i]["op"]["Param"]["name"] = json!("layers.9.weight");
            }),
            &["plan.json", "layers.9.weight", "not a parameter"],
        ),
        plan_case(
            "plan: fused group output too small",
            plan_with(|v| {
                let i = instr_where(|x| x.get("group").is_some());
                v["step"]["instrs"][i]["group"]["kernel"]["outputs"][0][1] = json!([1]);
            }),
            &["plan.json", "/group/"],
        ),
        case(
            "plan: --no-fusion on a compiled plan",
            &[
                "train",
                "@plan.json",
                "--no-fusion",
                "--device",
                "host",
                "--out",
                "@run",
                "--quiet",
            ],
            vec![("plan.json", plan_with(|_| {}))],
            &["--no-fusion", "compiled already"],
        ),
        // ---- .npy arrays ----------------------------------------------------------------
        grad_case(
            "npy: truncated data",
            {
                let b = rows_npy(3);
                b[..b.len() - 5].to_vec()
            },
            &["x.npy", "truncated", "[3, 4]"],
        ),
        grad_case(
            "npy: truncated header",
            rows_npy(3)[..40].to_vec(),
            &["x.npy", "ends inside its header"],
        ),
        grad_case(
            "npy: bad magic",
            {
                let mut b = rows_npy(3);
                b[1] = b'X';
                b
            },
            &["x.npy", "magic"],
        ),
        grad_case(
            "npy: unicode dtype <U4",
            npy("<U4", false, "(3,)", &[0; 48]),
            &["x.npy", "unsupported dtype", "<U4"],
        ),
        grad_case(
            "npy: complex dtype",
            npy("<c16", false, "(3, 4)", &[0; 192]),
            &["x.npy", "unsupported dtype", "<c16"],
        ),
        grad_case(
            "npy: Fortran order",
            npy("<f8", true, "(3, 4)", &f64s(&[0.5; 12])),
            &["x.npy", "Fortran order"],
        ),
        grad_case(
            "npy: NaN in the batch",
            rows_npy_with(3, 5, f64::NAN),
            &["x.npy", "NaN", "[1, 1]"],
        ),
        grad_case(
            "npy: wrong width",
            npy("<f8", false, "(3, 5)", &f64s(&[0.5; 15])),
            &["x.npy", "[B, 4]", "[3, 5]"],
        ),
        grad_case(
            "npy: huge declared shape",
            npy("<f8", false, "(1099511627776, 784)", &f64s(&[0.5; 12])),
            &["x.npy", "truncated", "[1099511627776, 784]"],
        ),
        grad_case(
            "npy: shape product overflows",
            npy("<f8", false, "(4294967296, 4294967296, 4294967296)", &[]),
            &["x.npy", "too large"],
        ),
        grad_case(
            "npy: bytes after the data",
            {
                let mut b = rows_npy(3);
                b.extend_from_slice(&[0; 8]);
                b
            },
            &["x.npy", "8 bytes follow"],
        ),
        grad_case(
            "npy: header not a dict",
            {
                let mut b = rows_npy(3);
                b[10] = b'[';
                b
            },
            &["x.npy", "bad header"],
        ),
        grad_case(
            "npy: header length beyond the file",
            {
                let mut b = rows_npy(3);
                b[8] = 0xff;
                b[9] = 0xff;
                b
            },
            &["x.npy", "ends inside its header"],
        ),
        npy_data_case(
            "npy: infinity in the data set",
            rows_npy_with(30, 17, f64::INFINITY),
            &["data.npy", "inf", "[4, 1]"],
        ),
        npy_data_case(
            "npy: value beyond float32",
            rows_npy_with(30, 9, 1e300),
            &["data.npy", "example 2, component 1", "float32"],
        ),
        npy_data_case(
            "npy: no examples and huge rows",
            npy("<f8", false, "(0, 4294967296, 4294967296)", &[]),
            &["data.npy", "too large"],
        ),
        npy_data_case(
            "npy: 0-dimensional",
            npy("<f8", false, "()", &f64s(&[1.0])),
            &["data.npy", "0-dimensional"],
        ),
        npy_data_case(
            "npy: 2 examples cannot be split",
            rows_npy(2),
            &["data.npy", "at least 3"],
        ),
        case(
            "npy: eval of a file with no examples",
            &["eval", "@c.safetensors", "--data", "@x.npy"],
            vec![
                ("c.safetensors", ckpt()),
                ("x.npy", npy("<f8", false, "(0, 4)", &[])),
            ],
            &["x.npy", "examples"],
        ),
        case(
            "npy: noise out of [0, 1)",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "--input",
                "@x.npy",
                "--noise",
                "@u.npy",
                "-o",
                "@g.safetensors",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("p.safetensors", ckpt()),
                ("x.npy", rows_npy(3)),
                ("u.npy", npy("<f8", false, "(3, 4)", &f64s(&[1.5; 12]))),
                ("g.safetensors", PRECIOUS.to_vec()),
            ],
            &["u.npy", "[0, 1)", "1.5"],
        ),
        case(
            "npy: noise of another shape",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "--input",
                "@x.npy",
                "--noise",
                "@u.npy",
                "-o",
                "@g.safetensors",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("p.safetensors", ckpt()),
                ("x.npy", rows_npy(3)),
                ("u.npy", npy("<f8", false, "(2, 4)", &f64s(&[0.5; 8]))),
                ("g.safetensors", PRECIOUS.to_vec()),
            ],
            &["u.npy", "[2, 4]", "[3, 4]"],
        ),
        // ---- IDX (MNIST) and CIFAR-10 directories ----------------------------------------
        idx_case(
            "idx: truncated images",
            mnist(good_train()[..1000].to_vec(), good_test()),
            &[
                "train-images-idx3-ubyte",
                "expected 9408 pixel bytes",
                "found 984",
            ],
        ),
        idx_case(
            "idx: label magic in the image file",
            mnist(idx_labels(12), good_test()),
            &[
                "train-images-idx3-ubyte",
                "wrong magic number",
                "label file",
            ],
        ),
        idx_case(
            "idx: huge declared count",
            mnist(idx_images(max, 28, 28, &[]), good_test()),
            &["train-images-idx3-ubyte", "4294967295 images"],
        ),
        idx_case(
            "idx: dimensions overflow",
            mnist(idx_images(max, max, max, &[]), good_test()),
            &["train-images-idx3-ubyte", "too large"],
        ),
        idx_case(
            "idx: short header",
            mnist(good_train()[..10].to_vec(), good_test()),
            &["train-images-idx3-ubyte", "header is truncated"],
        ),
        idx_case(
            "idx: empty file",
            mnist(vec![], good_test()),
            &["train-images-idx3-ubyte", "empty"],
        ),
        idx_case(
            "idx: label count differs from image count",
            {
                let mut f = mnist(good_train(), good_test());
                f.push(("mnist/train-labels-idx1-ubyte", idx_labels(7)));
                f
            },
            &["train-labels-idx1-ubyte", "7 labels", "12 images"],
        ),
        idx_case(
            "idx: corrupt gzip",
            {
                let mut f = mnist(vec![], good_test());
                f[0] = (
                    "mnist/train-images-idx3-ubyte.gz",
                    gzip_stored(&good_train()[..2000])[..900].to_vec(),
                );
                f
            },
            &["train-images-idx3-ubyte.gz", "gzip"],
        ),
        idx_case(
            "idx: gzip declaring 2^32 images",
            {
                let mut f = mnist(vec![], good_test());
                f[0] = (
                    "mnist/train-images-idx3-ubyte.gz",
                    gzip_stored(&idx_images(max, 28, 28, &[7; 5000])),
                );
                f
            },
            &[
                "train-images-idx3-ubyte.gz",
                "4294967295 images",
                "found 5000",
            ],
        ),
        idx_case(
            "idx: no test images",
            vec![("mnist/train-images-idx3-ubyte", good_train())],
            &["mnist", "no MNIST test images file"],
        ),
        idx_case(
            "idx: test images of another size",
            mnist(good_train(), blank_images(3, 14)),
            &["t10k-images-idx3-ubyte", "14x14"],
        ),
        idx_case(
            "idx: a single training image",
            mnist(blank_images(1, 28), good_test()),
            &["train-images-idx3-ubyte", "at least 2"],
        ),
        idx_case(
            "cifar: batch of a partial record",
            vec![
                ("mnist/data_batch_1.bin", vec![0; 3073 * 2 + 5]),
                ("mnist/test_batch.bin", vec![0; 3073]),
            ],
            &["data_batch_1.bin", "3073-byte record"],
        ),
        idx_case(
            "cifar: label out of range",
            vec![
                ("mnist/data_batch_1.bin", {
                    let mut b = vec![0; 3073 * 2];
                    b[3073] = 42;
                    b
                }),
                ("mnist/test_batch.bin", vec![0; 3073]),
            ],
            &["data_batch_1.bin", "record 1", "label 42"],
        ),
        case(
            "data: path does not exist",
            &[
                "train",
                "specs/mnist_fc2.json",
                "--data",
                "@nope",
                "--device",
                "host",
                "--out",
                "@run",
                "--quiet",
            ],
            vec![],
            &["nope", "does not exist"],
        ),
        case(
            "data: a directory with neither MNIST nor CIFAR files",
            &[
                "train",
                "specs/mnist_fc2.json",
                "--data",
                "@stuff",
                "--device",
                "host",
                "--out",
                "@run",
                "--quiet",
            ],
            vec![("stuff/readme.txt", b"not data".to_vec())],
            &["stuff", "no MNIST training images", "CIFAR-10", ".npy"],
        ),
        case(
            "data: a file that is no data set",
            &[
                "train",
                "specs/mnist_fc2.json",
                "--data",
                "@data.csv",
                "--device",
                "host",
                "--out",
                "@run",
                "--quiet",
            ],
            vec![("data.csv", b"1,2,3\n".to_vec())],
            &[
                "data.csv",
                "unsupported data set",
                "MNIST IDX",
                "CIFAR-10",
                ".npy",
            ],
        ),
        // ---- safetensors checkpoints ---------------------------------------------------
        ckpt_case(
            "safetensors: truncated",
            {
                let c = ckpt();
                c[..c.len() - 20].to_vec()
            },
            &["c.safetensors", "not a safetensors file"],
        ),
        ckpt_case(
            "safetensors: I64 tensor",
            ckpt_with("layers.0.bias", Some(("I64", vec![D], vec![0; 8 * D]))),
            &["c.safetensors", "layers.0.bias", "I64"],
        ),
        ckpt_case(
            "safetensors: BF16 tensor",
            ckpt_with(
                "layers.2.weight",
                Some(("BF16", vec![D, D], vec![0; 2 * D * D])),
            ),
            &["c.safetensors", "layers.2.weight", "BF16"],
        ),
        ckpt_case(
            "safetensors: wrong shape",
            ckpt_with(
                "layers.0.bias",
                Some(("F64", vec![D + 1], f64s(&[0.0; D + 1]))),
            ),
            &["c.safetensors", "layers.0.bias", "[5]", "[4]"],
        ),
        ckpt_case(
            "safetensors: missing tensor",
            ckpt_with("layers.2.weight_inv", None),
            &["c.safetensors", "layers.2.weight_inv", "missing"],
        ),
        ckpt_case(
            "safetensors: NaN weight",
            ckpt_with(
                "layers.0.weight",
                Some(("F64", vec![D, D], f64s(&[f64::NAN; D * D]))),
            ),
            &["c.safetensors", "layers.0.weight", "NaN"],
        ),
        ckpt_case(
            "safetensors: huge header length",
            {
                let mut b = (1u64 << 62).to_le_bytes().to_vec();
                b.extend_from_slice(b"{}");
                b
            },
            &["c.safetensors", "header too large"],
        ),
        ckpt_case(
            "safetensors: header not JSON",
            {
                let mut b = 8u64.to_le_bytes().to_vec();
                b.extend_from_slice(b"notjson!");
                b
            },
            &["c.safetensors", "invalid JSON"],
        ),
        ckpt_case(
            "safetensors: overlapping offsets",
            {
                let mut c = ckpt();
                let at = c.windows(3).position(|w| w == b"[0,").expect("offsets");
                c[at + 1] = b'8';
                c
            },
            &["c.safetensors", "not a safetensors file"],
        ),
        ckpt_case(
            "safetensors: metadata spec invalid",
            safetensors(
                &small_params(),
                Some(
                    json!({"spec": String::from_utf8(spec_with("/layers/0/type", Some(json!("linar")))).expect("UTF-8")}),
                ),
            ),
            &["c.safetensors", "metadata `spec`", "/layers/0/type"],
        ),
        ckpt_case(
            "safetensors: metadata spec not JSON",
            safetensors(&small_params(), Some(json!({"spec": "{not json"}))),
            &["c.safetensors", "metadata `spec`", "malformed JSON"],
        ),
        ckpt_case(
            "safetensors: no spec in the metadata",
            safetensors(&small_params(), None),
            &["c.safetensors", "--spec"],
        ),
        case(
            "safetensors: value beyond f32 (grad --dtype f32)",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "--input",
                "@x.npy",
                "-o",
                "@g.safetensors",
                "--dtype",
                "f32",
                "--device",
                "host",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                (
                    "p.safetensors",
                    ckpt_with(
                        "layers.0.bias",
                        Some(("F64", vec![D], f64s(&[0.0, 1e300, 0.0, 0.0]))),
                    ),
                ),
                ("x.npy", rows_npy(3)),
                ("g.safetensors", PRECIOUS.to_vec()),
            ],
            &["p.safetensors", "layers.0.bias", "f32"],
        ),
        case(
            "safetensors: --spec of another flow",
            &["eval", "@c.safetensors", "--spec", "specs/mnist_fc2.json"],
            vec![("c.safetensors", ckpt())],
            &["c.safetensors", "layers.0.weight", "[784, 784]"],
        ),
        // ---- command-line arguments -----------------------------------------------------
        case(
            "cli: sample -n 0",
            &["sample", "@c.safetensors", "-n", "0", "-o", "@s.npy"],
            vec![("c.safetensors", ckpt()), ("s.npy", PRECIOUS.to_vec())],
            &["-n must be at least 1"],
        ),
        case(
            "cli: sample -n beyond any allocation",
            &[
                "sample",
                "@c.safetensors",
                "-n",
                "1000000000000",
                "-o",
                "@s.npy",
            ],
            vec![("c.safetensors", ckpt()), ("s.npy", PRECIOUS.to_vec())],
            &["-n 1000000000000", "exceed"],
        ),
        case(
            "cli: compile --batch beyond any allocation",
            &[
                "compile",
                "@s.json",
                "--batch",
                "10000000000000000",
                "--emit",
                "plan",
                "-o",
                "@out",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("out/plan.json", PRECIOUS.to_vec()),
            ],
            &["--batch 10000000000000000"],
        ),
        case(
            "cli: grad --dtype f32 with a value beyond f32",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "--input",
                "@x.npy",
                "-o",
                "@g.safetensors",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("p.safetensors", ckpt()),
                ("x.npy", rows_npy_with(3, 5, 1e300)),
                ("g.safetensors", PRECIOUS.to_vec()),
            ],
            &["x.npy", "[5]", "--dtype f64"],
        ),
        case(
            "cli: sample -o with a format sample does not write",
            &["sample", "@c.safetensors", "-n", "2", "-o", "@s.jpg"],
            vec![("c.safetensors", ckpt()), ("s.jpg", PRECIOUS.to_vec())],
            &["s.jpg", "unsupported output format", ".png", ".npy"],
        ),
        case(
            "cli: sample -o .png for a flow that is not an image",
            &["sample", "@c.safetensors", "-n", "2", "-o", "@s.png"],
            vec![("c.safetensors", ckpt()), ("s.png", PRECIOUS.to_vec())],
            &["s.png", "image spec", ".npy"],
        ),
        case(
            "cli: grad of an 8-bit spec on values above 255",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "--input",
                "@x.npy",
                "-o",
                "@g.safetensors",
            ],
            vec![
                ("s.json", eight_bit_spec()),
                ("p.safetensors", ckpt()),
                ("x.npy", eight_bit_rows_with(7, 300.0)),
                ("g.safetensors", PRECIOUS.to_vec()),
            ],
            &["x.npy", "[7] = 300", "0..=255"],
        ),
        case(
            "cli: grad of an 8-bit spec on negative values",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "--input",
                "@x.npy",
                "-o",
                "@g.safetensors",
            ],
            vec![
                ("s.json", eight_bit_spec()),
                ("p.safetensors", ckpt()),
                ("x.npy", eight_bit_rows_with(0, -3.5)),
                ("g.safetensors", PRECIOUS.to_vec()),
            ],
            &["x.npy", "[0] = -3.5", "0..=255"],
        ),
        case(
            "cli: train given a checkpoint",
            &["train", "@c.safetensors", "--out", "@run"],
            vec![
                ("c.safetensors", ckpt()),
                ("run/metrics.jsonl", PRECIOUS.to_vec()),
            ],
            &["c.safetensors", "is a checkpoint", "snfc eval", "--resume"],
        ),
        case(
            "cli: compile given a plan",
            &["compile", "@p.json", "--emit", "plan", "-o", "@out"],
            vec![
                ("p.json", small_plan().to_string().into_bytes()),
                ("out/plan.json", PRECIOUS.to_vec()),
            ],
            &["p.json", "compiled plan", "snfc train"],
        ),
        case(
            "cli: sample given a run directory",
            &["sample", "@run", "-o", "@s.npy"],
            vec![
                ("run/checkpoint.safetensors", ckpt()),
                ("s.npy", PRECIOUS.to_vec()),
            ],
            &["run", "is a directory", "checkpoint.safetensors"],
        ),
        case(
            "cli: eval given a run directory",
            &["eval", "@run"],
            vec![("run/last.safetensors", ckpt())],
            &["run", "is a directory", "last.safetensors"],
        ),
        case(
            "cli: train --out naming a file",
            &["train", "@s.json", "--out", "@run.txt", "--steps", "1"],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("run.txt", PRECIOUS.to_vec()),
            ],
            &["--out", "run.txt", "is a file", "directory"],
        ),
        case(
            "cli: eval --split of a .npy file",
            &[
                "eval",
                "@c.safetensors",
                "--data",
                "@x.npy",
                "--split",
                "valid",
            ],
            vec![("c.safetensors", ckpt()), ("x.npy", rows_npy(4))],
            &["--split valid", "x.npy", "evaluated whole"],
        ),
        case(
            "cli: negative temperature",
            &[
                "sample",
                "@c.safetensors",
                "--temperature=-1",
                "-o",
                "@s.npy",
            ],
            vec![("c.safetensors", ckpt()), ("s.npy", PRECIOUS.to_vec())],
            &["--temperature", "-1"],
        ),
        case(
            "cli: NaN temperature",
            &[
                "sample",
                "@c.safetensors",
                "--temperature",
                "nan",
                "-o",
                "@s.npy",
            ],
            vec![("c.safetensors", ckpt()), ("s.npy", PRECIOUS.to_vec())],
            &["--temperature", "NaN"],
        ),
        case(
            "cli: unknown device",
            &["sample", "@c.safetensors", "--device", "gpu"],
            vec![("c.safetensors", ckpt())],
            &["'gpu'", "--device"],
        ),
        case(
            "cli: checkpoint does not exist",
            &["eval", "@nope.safetensors"],
            vec![],
            &["nope.safetensors", "cannot read"],
        ),
        case(
            "cli: grad without --input",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "-o",
                "@g.safetensors",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("p.safetensors", ckpt()),
            ],
            &["--input"],
        ),
        case(
            "cli: grad params do not exist",
            &[
                "grad",
                "@s.json",
                "--params",
                "@nope.safetensors",
                "--input",
                "@x.npy",
                "-o",
                "@g.safetensors",
                "--device",
                "host",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("x.npy", rows_npy(3)),
                ("g.safetensors", PRECIOUS.to_vec()),
            ],
            &["nope.safetensors", "cannot read"],
        ),
        case(
            "cli: compile --batch 0",
            &["compile", "@s.json", "--batch", "0"],
            vec![("s.json", small_spec().to_string().into_bytes())],
            &["--batch"],
        ),
        case(
            "cli: compile --emit bogus",
            &["compile", "@s.json", "--emit", "bogus", "-o", "@out"],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("out/plan.json", PRECIOUS.to_vec()),
            ],
            &["--emit bogus"],
        ),
        case(
            "cli: kernel sources without -o",
            &["compile", "@s.json", "--emit", "cuda"],
            vec![("s.json", small_spec().to_string().into_bytes())],
            &["--emit cuda", "-o"],
        ),
        case(
            "cli: bench --steps 0",
            &["bench", "@s.json", "--steps", "0", "--device", "host"],
            vec![("s.json", small_spec().to_string().into_bytes())],
            &["--steps"],
        ),
        case(
            "cli: eval --split bogus",
            &[
                "eval",
                "@c.safetensors",
                "--data",
                "@mnist",
                "--split",
                "bogus",
            ],
            {
                let s = json!({"name": "tiny", "input": {"shape": [1, 5, 5], "preprocess": "dequantize_logit"}, "layers": [{"type": "linear"}]});
                let eye: Vec<f64> = (0..625)
                    .map(|i| if i / 25 == i % 25 { 1.0 } else { 0.0 })
                    .collect();
                let mut p = BTreeMap::new();
                p.insert(
                    "layers.0.weight".to_string(),
                    ("F64", vec![25, 25], f64s(&eye)),
                );
                p.insert(
                    "layers.0.weight_inv".to_string(),
                    ("F64", vec![25, 25], f64s(&eye)),
                );
                p.insert(
                    "layers.0.bias".to_string(),
                    ("F64", vec![25], f64s(&[0.0; 25])),
                );
                vec![
                    (
                        "c.safetensors",
                        safetensors(&p, Some(json!({"spec": s.to_string()}))),
                    ),
                    ("mnist/train-images-idx3-ubyte", blank_images(12, 5)),
                    ("mnist/t10k-images-idx3-ubyte", blank_images(3, 5)),
                ]
            },
            &["--split bogus", "test, valid or train"],
        ),
        case(
            "cli: sample into a directory",
            &["sample", "@c.safetensors", "-n", "2", "-o", "@dir.npy"],
            vec![
                ("c.safetensors", ckpt()),
                ("dir.npy/keep", PRECIOUS.to_vec()),
            ],
            &["dir.npy", "Is a directory"],
        ),
        case(
            "cli: gradients into a directory",
            &[
                "grad",
                "@s.json",
                "--params",
                "@p.safetensors",
                "--input",
                "@x.npy",
                "-o",
                "@g",
                "--device",
                "host",
            ],
            vec![
                ("s.json", small_spec().to_string().into_bytes()),
                ("p.safetensors", ckpt()),
                ("x.npy", rows_npy(3)),
                ("g/keep", PRECIOUS.to_vec()),
            ],
            &["g", "Is a directory"],
        ),
        case(
            "cli: output under a file",
            &[
                "sample",
                "@c.safetensors",
                "-n",
                "2",
                "-o",
                "@c.safetensors/s.npy",
            ],
            vec![("c.safetensors", ckpt())],
            &["c.safetensors", "cannot create the directory"],
        ),
    ]
}

// ---------------------------------------------------------------------------------------------
// Checking a row
// ---------------------------------------------------------------------------------------------

/// Every file under `dir` with its bytes (directories as `name/`), to compare before and after.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("list the case directory") {
            let p = e.expect("entry").path();
            let rel = p.strip_prefix(dir).expect("under dir").to_path_buf();
            if p.is_dir() {
                out.insert(rel.join(""), Vec::new());
                stack.push(p);
            } else {
                out.insert(rel, std::fs::read(&p).expect("read a case file"));
            }
        }
    }
    out
}

/// Run one row in a fresh directory; the problems found, if any.
fn check(c: &Case) -> Result<(), String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    for (name, bytes) in &c.files {
        let p = dir.path().join(name);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent).map_err(|e| e.to_string())?;
        }
        std::fs::write(&p, bytes).map_err(|e| e.to_string())?;
    }
    let args: Vec<String> = c
        .args
        .iter()
        .map(|a| match a.strip_prefix('@') {
            Some(name) => dir.path().join(name).display().to_string(),
            None => a.to_string(),
        })
        .collect();
    let before = snapshot(dir.path());
    let o = snfc(&args);
    let after = snapshot(dir.path());
    let err = text(&o.stderr);
    let mut problems = Vec::new();
    match o.status.code() {
        Some(0) => problems.push("exited with status 0".to_string()),
        Some(_) => {}
        None => problems.push(format!("killed by a signal ({})", o.status)),
    }
    if err.contains("panicked") || err.contains("stack backtrace") {
        problems.push("panicked".into());
    }
    // The report: one or more lines (one per problem), each starting with `error:`, and
    // nothing after it. (A usage error, exit status 2, is clap's: one `error:` line with
    // the usage after it.)
    let lines: Vec<&str> = err.lines().collect();
    match lines.iter().position(|l| l.starts_with("error:")) {
        None => problems.push("no line starts with `error:`".into()),
        Some(_) if o.status.code() == Some(2) => {}
        Some(first) => {
            if let Some(l) = lines[first..].iter().find(|l| !l.starts_with("error:")) {
                problems.push(format!("a line of the report lacks `error:`: {l:?}"));
            }
        }
    }
    for want in &c.expect {
        if !err.contains(want) {
            problems.push(format!("stderr lacks {want:?}"));
        }
    }
    if before != after {
        let changed: Vec<_> = before
            .keys()
            .chain(after.keys())
            .filter(|k| before.get(*k) != after.get(*k))
            .collect();
        problems.push(format!("the directory changed: {changed:?}"));
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "{}\n  args: {:?}\n  problems: {}\n  stderr:\n{}\n  stdout:\n{}",
            c.name,
            c.args,
            problems.join("; "),
            err,
            text(&o.stdout)
        ))
    }
}

#[test]
fn every_malformed_input_is_one_clear_error_and_changes_nothing() {
    let cases = cases();
    assert!(cases.len() >= 40, "{} rows", cases.len());
    let mut names: Vec<&str> = cases.iter().map(|c| c.name).collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), cases.len(), "row names must be unique");
    // Rows are independent processes: run a few at a time.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let failures = std::sync::Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let Some(c) = cases.get(i) else { break };
                if let Err(e) = check(c) {
                    failures.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
            });
        }
    });
    let failures = failures.into_inner().unwrap_or_else(|p| p.into_inner());
    assert!(
        failures.is_empty(),
        "{} of {} rows failed:\n\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n\n")
    );
}

/// `snfc eval --data FILE.npy` evaluates the whole file, so it needs no train / validation /
/// test split and any number of examples will do (two rows are not refused).
#[test]
fn eval_of_a_two_row_npy_file_evaluates_both_rows() {
    let dir = tempfile::tempdir().expect("temp dir");
    let c = dir.path().join("c.safetensors");
    std::fs::write(&c, ckpt()).expect("write checkpoint");
    let x = dir.path().join("x.npy");
    std::fs::write(&x, rows_npy(2)).expect("write data");
    let o = snfc(&[
        "eval".as_ref(),
        c.as_os_str(),
        "--data".as_ref(),
        x.as_os_str(),
        "--json".as_ref(),
    ]);
    assert!(o.status.success(), "{}", text(&o.stderr));
    let r: Value = serde_json::from_str(text(&o.stdout).trim()).expect("JSON result");
    assert_eq!(r["examples"], 2);
    assert!(r["nll_nats"].as_f64().is_some_and(f64::is_finite), "{r}");
}
