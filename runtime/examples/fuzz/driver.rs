//! The fuzz driver shared by `cargo run --release -p snfc-runtime --example fuzz -- N [SEED]`
//! and the smoke test `runtime/tests/fuzz_smoke.rs` (which includes this file with `#[path]`).
//!
//! Every input is a mutation of a valid file — byte-level (bit flips, truncation, insertion,
//! deletion, integer fields) and structure-aware (JSON values replaced, keys deleted or
//! duplicated; npy, IDX and safetensors headers rewritten) — fed to one reader:
//!
//! * `spec`: [`snfc_compiler::spec::parse_spec`] on mutated `specs/*.json`;
//! * `plan`: [`snfc_compiler::plan::TrainPlan::parse`] on mutated compiled plans (an accepted
//!   plan is also run once on the host executor);
//! * `npy`: [`snfc_runtime::npy::parse_npy`] and the npy data set loaders;
//! * `idx`: the IDX (MNIST) image and label readers, an MNIST directory's files together, and
//!   the CIFAR-10 batch reader;
//! * `safetensors`: [`snfc_runtime::model::Model::from_bytes`] (what `Model::load` does with a
//!   file's bytes).
//!
//! A reader may accept or reject an input, never panic; what it accepts must satisfy simple
//! properties (sizes agree, values are finite, a spec or plan survives a round trip). Input `i`
//! of seed `s` depends on `(s, i)` only, so any input can be made again.

#![allow(dead_code)] // each includer uses part of it

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{json, Value};
use snfc_compiler::compile::OptLevel;
use snfc_compiler::plan::TrainPlan;
use snfc_compiler::spec::{parse_spec, FlowSpec, Preprocess};
use snfc_runtime::data::{mnist_from_files, IdxFile, MnistFiles};
use snfc_runtime::model::{Model, RawTensor};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

/// The readers under test.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Spec,
    Plan,
    Npy,
    Idx,
    Safetensors,
}

pub const TARGETS: [Target; 5] = [
    Target::Spec,
    Target::Plan,
    Target::Npy,
    Target::Idx,
    Target::Safetensors,
];

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Spec => "spec",
            Target::Plan => "plan",
            Target::Npy => "npy",
            Target::Idx => "idx",
            Target::Safetensors => "safetensors",
        }
    }

    pub fn from_name(name: &str) -> Option<Target> {
        TARGETS.into_iter().find(|t| t.name() == name)
    }
}

// ---------------------------------------------------------------------------------------------
// Random choices
// ---------------------------------------------------------------------------------------------

/// The random source of one input.
pub struct Gen(ChaCha8Rng);

impl Gen {
    /// Input `index` of run `seed`: its own ChaCha stream, independent of every other input.
    pub fn for_input(seed: u64, index: u64) -> Gen {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(index);
        Gen(rng)
    }

    /// Uniform in `0..n` (`n` ≥ 1).
    pub fn below(&mut self, n: usize) -> usize {
        self.0.random_range(0..n.max(1))
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.0.random_bool(p)
    }

    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len())]
    }

    pub fn byte(&mut self) -> u8 {
        self.0.random()
    }

    pub fn u64(&mut self) -> u64 {
        self.0.random()
    }

    /// How many mutations to stack: one half of the time (so that many inputs get past the
    /// first check), else two to four.
    pub fn count(&mut self) -> usize {
        if self.chance(0.5) {
            1
        } else {
            2 + self.below(3)
        }
    }
}

/// Integers that sit on edges: zero, one, powers of two and their neighbours, limits.
const INTERESTING: &[u64] = &[
    0,
    1,
    2,
    3,
    4,
    7,
    255,
    256,
    65_535,
    65_536,
    99_999,
    100_000,
    100_001,
    (1 << 31) - 1,
    1 << 31,
    (1 << 32) - 1,
    1 << 32,
    (1 << 32) + 1,
    1 << 40,
    (1 << 40) + 1,
    1 << 53,
    1 << 62,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

fn interesting(g: &mut Gen) -> u64 {
    if g.chance(0.2) {
        g.u64() >> g.below(64)
    } else {
        *g.pick(INTERESTING)
    }
}

/// Words a spec, plan or header might (almost) contain: every layer type the parser knows
/// (so a new layer is fuzzed without touching this file) and [`OTHER_WORDS`].
static WORDS: std::sync::LazyLock<Vec<&str>> = std::sync::LazyLock::new(|| {
    snfc_compiler::spec::LAYER_TYPES
        .iter()
        .chain(OTHER_WORDS)
        .copied()
        .collect()
});

const OTHER_WORDS: &[&str] = &[
    "dequantize_logit",
    "none",
    "self_normalizing",
    "exact",
    "identity",
    "identity_noise",
    "pad_crop",
    "geco",
    "full",
    "substitution",
    "F32",
    "F64",
    "I64",
    "BF16",
    "U8",
    "U32",
    "BOOL",
    "F16",
    "spec",
    "data_initialized",
    "false",
    "true",
    "type",
    "",
    "x",
    "noise",
    "layers.0.weight",
    "layers.0.weight_inv",
    "layers.1.bias",
    "lambda.layers.0",
    "\u{0}",
    "é",
];

/// Field names a mutation may add: known ones (in the wrong place, or twice) and near misses.
const KEYS: &[&str] = &[
    "type",
    "times",
    "layers",
    "shape",
    "preprocess",
    "width",
    "kernel_size",
    "bins",
    "tail_bound",
    "alpha",
    "bias",
    "lambda",
    "geco",
    "batch_size",
    "epochs",
    "optimizer",
    "adam",
    "betas",
    "lr",
    "snfc_plan",
    "spec",
    "batch",
    "opt_level",
    "step",
    "instrs",
    "order",
    "outputs",
    "buffers",
    "sizes",
    "of_slot",
    "release",
    "skip",
    "group",
    "epilogue",
    "dtype",
    "data_offsets",
    "__metadata__",
    "lerning_rate",
];

/// A JSON value of any kind, often an edge.
fn any_value(g: &mut Gen) -> Value {
    match g.below(12) {
        0 => Value::Null,
        1 => json!(g.chance(0.5)),
        2 | 3 => json!(interesting(g)),
        4 => json!((interesting(g) as i64).wrapping_neg()),
        5 => json!(*g.pick(&[0.5, -0.0, 1e-300, 1e300, f64::MAX, -1.5, 0.999_999, 2.5])),
        6 | 7 => json!(*g.pick(&WORDS)),
        8 => json!("z".repeat(g.below(3) * 500)),
        9 => json!([]),
        10 => json!({}),
        _ => json!([interesting(g), interesting(g)]),
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

/// One byte-level mutation of `b`.
fn mutate_bytes(b: &mut Vec<u8>, g: &mut Gen) {
    let len = b.len();
    match g.below(9) {
        0 if len > 0 => {
            for _ in 0..1 + g.below(8) {
                let i = g.below(len);
                b[i] ^= 1 << g.below(8);
            }
        }
        1 if len > 0 => {
            let i = g.below(len);
            let random = g.byte();
            b[i] = *g.pick(&[
                0, 0xff, 0x7f, 0x80, b'"', b'{', b'[', b',', b'9', b'-', random,
            ]);
        }
        2 => b.truncate(g.below(len + 1)),
        3 => {
            let at = g.below(len + 1);
            let n = 1 + g.below(16);
            let ins: Vec<u8> = (0..n).map(|_| g.byte()).collect();
            b.splice(at..at, ins);
        }
        4 if len > 0 => {
            let at = g.below(len);
            let n = (1 + g.below(64)).min(len - at);
            b.drain(at..at + n);
        }
        5 if len > 0 => {
            // An integer field overwritten with an edge value, little- or big-endian.
            let v = interesting(g);
            let bytes = if g.chance(0.5) {
                v.to_le_bytes()
            } else {
                v.to_be_bytes()
            };
            let w = *g.pick(&[1usize, 2, 4, 8]);
            let at = g.below(len);
            let end = (at + w).min(len);
            let src = if g.chance(0.5) {
                &bytes[..w]
            } else {
                &bytes[8 - w..]
            };
            b[at..end].copy_from_slice(&src[..end - at]);
        }
        6 if len > 0 => {
            // A chunk copied elsewhere.
            let from = g.below(len);
            let n = (1 + g.below(256)).min(len - from);
            let chunk = b[from..from + n].to_vec();
            let at = g.below(len + 1);
            b.splice(at..at, chunk);
        }
        7 if len > 0 => {
            // Digits in text: a number made huge or negative.
            let at = g.below(len);
            let s = *g.pick(&[
                "99999999999999999999",
                "-1",
                "1e999",
                "18446744073709551616",
                "0",
            ]);
            b.splice(at..at, s.bytes());
        }
        _ => b.extend((0..1 + g.below(8)).map(|_| g.byte())),
    }
}

/// Every JSON pointer in `v` (the root is "").
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(o) => {
            for (k, c) in o {
                pointers(
                    c,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(a) => {
            for (i, c) in a.iter().enumerate() {
                pointers(c, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// The op of a plan instruction: ones the small plans use, and others with edge fields.
fn any_op(g: &mut Gen) -> Value {
    let n = interesting(g);
    match g.below(14) {
        0 => json!("MatMul"),
        1 => json!("Transpose"),
        2 => json!("Inverse"),
        3 => json!("LogDet"),
        4 => json!(*g.pick(&[
            "Add",
            "Sub",
            "Mul",
            "Neg",
            "StopGrad",
            "Conv2d",
            "FlipKernel"
        ])),
        5 => {
            json!({"Unary": *g.pick(&["Exp", "Log", "Softplus", "Sigmoid", "Tanh", "Square", "Recip", "Relu", "Step", "Bogus"])})
        }
        6 => json!({"Sum": {"axis": *g.pick(&[json!(null), json!(0), json!(1), json!(n)])}}),
        7 => {
            json!({"Broadcast": {"to": [n, 3], "new_axis": *g.pick(&[json!(null), json!(0), json!(1), json!(n)])}})
        }
        8 => json!({"Reshape": {"to": [n, interesting(g)]}}),
        9 => json!({"Toeplitz": {"h": n, "w": interesting(g)}}),
        10 => json!({"ToeplitzAdjoint": {"h": n, "w": interesting(g), "k": 3}}),
        11 => json!({"Const": {"bits": g.u64()}}),
        12 => json!({"Param": {"name": *g.pick(&WORDS), "shape": [n, 4]}}),
        _ => {
            json!({"Input": {"name": *g.pick(&["x", "noise", "lambda.layers.0"]), "shape": [4, n]}})
        }
    }
}

/// One structure-aware mutation of a JSON document.
fn mutate_json(v: &mut Value, g: &mut Gen, plan: bool) {
    let mut ps = Vec::new();
    pointers(v, String::new(), &mut ps);
    let p = g.pick(&ps).clone();
    let other = v
        .pointer(g.pick(&ps).as_str())
        .cloned()
        .unwrap_or(Value::Null);
    let (parent, key) = match p.rsplit_once('/') {
        Some((parent, key)) => (
            parent.to_string(),
            key.replace("~1", "/").replace("~0", "~"),
        ),
        None => (String::new(), String::new()),
    };
    let Some(node) = v.pointer_mut(&p) else {
        return;
    };
    match g.below(11) {
        0 | 1 => *node = any_value(g),
        2 => {
            if let Some(x) = node.as_u64() {
                *node = json!(match g.below(5) {
                    0 => x.wrapping_add(1),
                    1 => x.wrapping_sub(1),
                    2 => x.wrapping_mul(2),
                    3 => x.wrapping_mul(1000),
                    _ => interesting(g),
                });
            } else if let Some(x) = node.as_f64() {
                *node = json!(*g.pick(&[-x, x * 1e10, x + 0.5, x.floor()]));
            } else {
                *node = json!(interesting(g));
            }
        }
        3 => {
            // Delete the member or element.
            match v.pointer_mut(&parent) {
                Some(Value::Object(o)) => {
                    o.remove(&key);
                }
                Some(Value::Array(a)) => {
                    if let Ok(i) = key.parse::<usize>() {
                        if i < a.len() {
                            a.remove(i);
                        }
                    }
                }
                _ => {}
            }
        }
        4 => {
            // A member added: a known key (perhaps misplaced) or a near miss.
            if let Value::Object(o) = node {
                o.insert(g.pick(KEYS).to_string(), other);
            } else {
                *node = other;
            }
        }
        5 => match node {
            Value::Array(a) if !a.is_empty() => {
                let i = g.below(a.len());
                let copy = a[i].clone();
                let n = if g.chance(0.1) { 100 } else { 1 };
                for _ in 0..n {
                    a.insert(g.below(a.len() + 1), copy.clone());
                }
            }
            Value::Array(a) => a.push(other),
            _ => *node = json!([node.clone()]),
        },
        6 => {
            if let Value::Array(a) = node {
                if a.len() > 1 {
                    let (i, j) = (g.below(a.len()), g.below(a.len()));
                    a.swap(i, j);
                }
            } else {
                *node = json!({ g.pick(KEYS).to_string(): node.clone() });
            }
        }
        7 => *node = json!(*g.pick(&WORDS)),
        8 if plan => *node = any_op(g),
        9 if plan => *node = json!([interesting(g) % 200, interesting(g)]),
        _ => *node = other,
    }
}

/// `v` as text, sometimes with one object's first key written twice (which a `Value` cannot
/// hold): `{"k": a, "k": b, ...}`.
fn json_text(v: &Value, g: &mut Gen) -> String {
    let text = v.to_string();
    if !g.chance(0.15) {
        return text;
    }
    let starts: Vec<usize> = text.match_indices("{\"").map(|(i, _)| i).collect();
    if starts.is_empty() {
        return text;
    }
    let at = *g.pick(&starts) + 1;
    let key_end = text[at + 1..].find('"').map(|e| at + 1 + e + 1);
    match key_end {
        Some(end) => {
            let dup = format!("{}: {}, ", &text[at..end], any_value(g));
            format!("{}{dup}{}", &text[..at], &text[at..])
        }
        None => text,
    }
}

/// A mutated JSON document (a spec, or a plan if `plan`).
fn mutated_json(seed: &[u8], g: &mut Gen, plan: bool) -> Vec<u8> {
    if g.chance(0.25) {
        let mut b = seed.to_vec();
        for _ in 0..g.count() {
            mutate_bytes(&mut b, g);
        }
        return b;
    }
    let mut v: Value = serde_json::from_slice(seed).unwrap_or(Value::Null);
    for _ in 0..g.count() {
        mutate_json(&mut v, g, plan);
    }
    json_text(&v, g).into_bytes()
}

// ---------------------------------------------------------------------------------------------
// Valid files to start from
// ---------------------------------------------------------------------------------------------

/// A version `major`.0 `.npy` file with a hand-written header.
fn npy_file(major: u8, header_dict: &str, body: &[u8]) -> Vec<u8> {
    let mut header = header_dict.to_string();
    let pre = if major == 1 { 10 } else { 12 };
    while !(pre + header.len() + 1).is_multiple_of(64) {
        header.push(' ');
    }
    header.push('\n');
    let mut v = b"\x93NUMPY".to_vec();
    v.extend_from_slice(&[major, 0]);
    if major == 1 {
        v.extend_from_slice(&(header.len() as u16).to_le_bytes());
    } else {
        v.extend_from_slice(&(header.len() as u32).to_le_bytes());
    }
    v.extend_from_slice(header.as_bytes());
    v.extend_from_slice(body);
    v
}

fn npy_dict(descr: &str, fortran: &str, shape: &str) -> String {
    format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}")
}

fn idx(magic: u32, dims: &[u32], body: &[u8]) -> Vec<u8> {
    let mut v = magic.to_be_bytes().to_vec();
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(body);
    v
}

fn gzip(b: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = e.write_all(b);
    e.finish().unwrap_or_default()
}

/// A safetensors file of a model's parameters in `T` with its spec in the metadata.
fn checkpoint<T: snfc_runtime::host::linalg::Real>(spec: &FlowSpec) -> Vec<u8> {
    let model = Model::<T>::init(spec, 1);
    let raw: Vec<RawTensor> = model
        .params
        .iter()
        .map(|p| RawTensor::of(&p.name, &p.shape, &model.values[&p.name]))
        .collect();
    let views = raw
        .iter()
        .map(|t| {
            let view = safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                .unwrap_or_else(|e| panic!("seed tensor {}: {e}", t.name));
            (t.name.clone(), view)
        })
        .collect::<Vec<_>>();
    let meta = HashMap::from([
        ("spec".to_string(), spec.to_json_pretty()),
        ("format".to_string(), "snfc-params-v1".to_string()),
        ("data_initialized".to_string(), "true".to_string()),
    ]);
    safetensors::serialize(views, Some(meta)).unwrap_or_else(|e| panic!("seed checkpoint: {e}"))
}

/// The valid files every mutation starts from.
pub struct Seeds {
    specs: Vec<Vec<u8>>,
    plans: Vec<Vec<u8>>,
    npys: Vec<Vec<u8>>,
    idx_images: Vec<Vec<u8>>,
    idx_labels: Vec<Vec<u8>>,
    cifar: Vec<u8>,
    checkpoints: Vec<(Vec<u8>, FlowSpec)>,
}

/// Small specs of every layer kind (the example specs are large: their plans and checkpoints
/// would make each input slow).
const SMALL_SPECS: &[&str] = &[
    r#"{"name": "fc", "input": {"shape": [4], "preprocess": "none"},
        "layers": [{"type": "linear"}, {"type": "smooth_leaky_relu", "alpha": 0.3}, {"type": "linear", "bias": false}],
        "train": {"batch_size": 3, "epochs": 1}}"#,
    r#"{"name": "img", "input": {"shape": [2, 4, 4], "preprocess": "dequantize_logit"},
        "layers": [{"type": "conv", "kernel_size": 3}, {"type": "spline", "bins": 3},
                   {"type": "squeeze"}, {"type": "actnorm"},
                   {"type": "affine_coupling", "width": 2}, {"type": "split"}, {"type": "linear"}],
        "objective": {"lambda": {"geco": {"lambda0": 1.0, "lr": 0.01}}},
        "train": {"batch_size": 2, "epochs": 1}}"#,
    r#"{"name": "rep", "input": {"shape": [1, 2, 2], "preprocess": "none"},
        "layers": [{"type": "repeat", "times": 2, "layers": [{"type": "conv", "kernel_size": 1, "bias": false}, {"type": "actnorm"}]}],
        "objective": {"gradient": "exact"}, "train": {"batch_size": 2, "augment": "pad_crop", "grad_clip_norm": 10}}"#,
];

impl Seeds {
    pub fn new() -> Seeds {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        names.sort();
        let mut specs: Vec<Vec<u8>> = names
            .iter()
            .map(|p| std::fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display())))
            .collect();
        specs.extend(SMALL_SPECS.iter().map(|s| s.as_bytes().to_vec()));
        let small: Vec<FlowSpec> = SMALL_SPECS
            .iter()
            .map(|s| parse_spec(s).unwrap_or_else(|e| panic!("seed spec: {e}")))
            .collect();
        let plans = small
            .iter()
            .zip([OptLevel::Full, OptLevel::Full, OptLevel::None])
            .map(|(s, level)| {
                TrainPlan::compile(s, s.train.batch_size, level)
                    .unwrap_or_else(|e| panic!("seed plan: {e}"))
                    .to_json()
                    .into_bytes()
            })
            .collect();
        let f64s = |n: usize| -> Vec<u8> {
            (0..n)
                .flat_map(|i| (i as f64 / 7.0).to_le_bytes())
                .collect()
        };
        let npys = vec![
            npy_file(1, &npy_dict("<f8", "False", "(5, 4)"), &f64s(20)),
            npy_file(1, &npy_dict("<f4", "False", "(3, 2, 2)"), &[0x3f; 48]),
            npy_file(1, &npy_dict("|u1", "False", "(4, 3)"), &[7; 12]),
            npy_file(
                1,
                &npy_dict("<i4", "False", "(3,)"),
                &[1, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0],
            ),
            npy_file(
                2,
                &npy_dict(">i8", "False", "(1, 2)"),
                &[0, 0, 0, 0, 0, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 1],
            ),
            npy_file(
                3,
                &npy_dict(">f8", "False", "(2, 1)"),
                &[0x3f, 0xf0, 0, 0, 0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0],
            ),
        ];
        let pixels: Vec<u8> = (0..12 * 5 * 5).map(|i| (i * 37 % 256) as u8).collect();
        let images = idx(0x803, &[12, 5, 5], &pixels);
        let test = idx(0x803, &[3, 5, 5], &pixels[..75]);
        let labels = idx(0x801, &[12], &[1; 12]);
        let idx_images = vec![gzip(&images), images, test];
        let idx_labels = vec![gzip(&labels), labels];
        let mut cifar = vec![3u8; 2 * 3073];
        cifar[3073] = 9;
        let checkpoints = vec![
            (checkpoint::<f64>(&small[0]), small[0].clone()),
            (checkpoint::<f32>(&small[0]), small[0].clone()),
            (checkpoint::<f32>(&small[1]), small[1].clone()),
        ];
        Seeds {
            specs,
            plans,
            npys,
            idx_images,
            idx_labels,
            cifar,
            checkpoints,
        }
    }
}

impl Default for Seeds {
    fn default() -> Self {
        Self::new()
    }
}

// ---------------------------------------------------------------------------------------------
// Generating inputs
// ---------------------------------------------------------------------------------------------

/// A mutated `.npy` file: a rewritten header (dtype, order, shape, version) over a body of
/// about the right length, or byte mutations of a valid file.
fn mutated_npy(s: &Seeds, g: &mut Gen) -> Vec<u8> {
    if g.chance(0.5) {
        let descr = *g.pick(&[
            "<f8",
            "<f4",
            ">f8",
            "|u1",
            "<i4",
            ">i8",
            "<i8",
            "<i2",
            "<U4",
            "<c16",
            "|O",
            "|b1",
            "<f16",
            "f8",
            "<<f8",
            "[('a', '<f8')]",
        ]);
        let fortran = *g.pick(&["False", "True", "false", "0", "None"]);
        let dims: Vec<String> = (0..g.below(4))
            .map(|_| {
                if g.chance(0.7) {
                    (1 + g.below(6)).to_string()
                } else {
                    interesting(g).to_string()
                }
            })
            .collect();
        let shape = match dims.len() {
            1 if g.chance(0.8) => format!("({},)", dims[0]),
            _ => format!("({})", dims.join(", ")),
        };
        let mut dict = npy_dict(descr, fortran, &shape);
        if g.chance(0.1) {
            let with = *g.pick(&["'shap'", "\"shape\"", "'shape': (1,), 'shape'"]);
            dict = dict.replace("'shape'", with);
        }
        let count: usize = dims
            .iter()
            .map(|d| d.parse::<usize>().unwrap_or(1).min(1 << 12))
            .product::<usize>()
            .min(1 << 14);
        let width = *g.pick(&[1usize, 4, 8, 16]);
        let mut body: Vec<u8> = (0..count * width).map(|i| (i * 13 % 251) as u8).collect();
        if g.chance(0.3) {
            let n = g.below(body.len() + 1);
            body.truncate(n);
        }
        let major = *g.pick(&[1u8, 1, 2, 3]);
        let mut b = npy_file(major, &dict, &body);
        if g.chance(0.2) {
            mutate_bytes(&mut b, g);
        }
        return b;
    }
    let mut b = g.pick(&s.npys).clone();
    for _ in 0..g.count() {
        mutate_bytes(&mut b, g);
    }
    b
}

/// A mutated IDX file: rewritten header fields over a body of some length, maybe gzipped, or
/// byte mutations of a valid (raw or gzipped) file.
fn mutated_idx(seeds: &[Vec<u8>], g: &mut Gen) -> Vec<u8> {
    if g.chance(0.5) {
        let random = g.u64() as u32;
        let magic = *g.pick(&[0x803u32, 0x803, 0x801, 0x802, 0x808, 0x0803_0000, random]);
        let ndims = (magic & 0xff).min(4) as usize;
        let dims: Vec<u32> = (0..ndims)
            .map(|_| {
                if g.chance(0.6) {
                    g.below(13) as u32
                } else {
                    interesting(g) as u32
                }
            })
            .collect();
        let want: usize = dims
            .iter()
            .map(|&d| (d as usize).min(64))
            .product::<usize>()
            .min(4096);
        let len = match g.below(3) {
            0 => want,
            1 => g.below(want + 2),
            _ => want + g.below(8),
        };
        let body: Vec<u8> = (0..len).map(|i| i as u8).collect();
        let raw = idx(magic, &dims, &body);
        return if g.chance(0.4) { gzip(&raw) } else { raw };
    }
    let mut b = g.pick(seeds).clone();
    for _ in 0..g.count() {
        mutate_bytes(&mut b, g);
    }
    b
}

/// A mutated safetensors file: its header's JSON mutated (dtype, shape, offsets, names, the
/// metadata's spec) and re-framed, the data cut or extended, or plain byte mutations.
fn mutated_safetensors(file: &[u8], g: &mut Gen) -> Vec<u8> {
    let split = file
        .get(..8)
        .map(|n| u64::from_le_bytes(n.try_into().unwrap_or([0; 8])) as usize)
        .filter(|n| n.checked_add(8).is_some_and(|end| end <= file.len()));
    let Some(n) = split.filter(|_| g.chance(0.7)) else {
        let mut b = file.to_vec();
        for _ in 0..g.count() {
            mutate_bytes(&mut b, g);
        }
        return b;
    };
    let mut header: Value = serde_json::from_slice(&file[8..8 + n]).unwrap_or(Value::Null);
    let mut data = file[8 + n..].to_vec();
    match g.below(4) {
        0 => {
            // The spec in the metadata, mutated as a spec.
            if let Some(Value::String(spec)) = header.pointer_mut("/__metadata__/spec") {
                *spec =
                    String::from_utf8_lossy(&mutated_json(spec.as_bytes(), g, false)).into_owned();
            }
        }
        1 => {
            if g.chance(0.5) {
                data.truncate(g.below(data.len() + 1));
            } else {
                data.extend((0..1 + g.below(16)).map(|_| g.byte()));
            }
        }
        _ => {
            for _ in 0..g.count() {
                mutate_json(&mut header, g, false);
            }
        }
    }
    let text = json_text(&header, g).into_bytes();
    let mut len = text.len() as u64;
    if g.chance(0.1) {
        len = interesting(g);
    }
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(&data);
    out
}

/// Input `index` of run `seed`: its target and bytes.
pub fn generate(s: &Seeds, seed: u64, index: u64) -> (Target, Vec<u8>) {
    let target = TARGETS[(index % TARGETS.len() as u64) as usize];
    let mut g = Gen::for_input(seed, index);
    let bytes = match target {
        Target::Spec => mutated_json(g.pick(&s.specs).clone().as_slice(), &mut g, false),
        Target::Plan => mutated_json(g.pick(&s.plans).clone().as_slice(), &mut g, true),
        Target::Npy => mutated_npy(s, &mut g),
        Target::Idx => {
            // Four files (train and test images, train and test labels) in one input, split
            // by a separator; or a CIFAR batch.
            if g.chance(0.15) {
                let mut b = s.cifar.clone();
                for _ in 0..g.count() {
                    mutate_bytes(&mut b, &mut g);
                }
                let mut out = b"CIFAR".to_vec();
                out.extend_from_slice(&b);
                out
            } else {
                let train = mutated_idx(&s.idx_images, &mut g);
                let test = if g.chance(0.3) {
                    mutated_idx(&s.idx_images, &mut g)
                } else {
                    s.idx_images[2].clone()
                };
                let labels = if g.chance(0.5) {
                    mutated_idx(&s.idx_labels, &mut g)
                } else {
                    g.pick(&s.idx_labels).clone()
                };
                join_files(&[&train, &test, &labels])
            }
        }
        Target::Safetensors => {
            let (file, _) = g.pick(&s.checkpoints);
            let mut b = mutated_safetensors(file, &mut g);
            if g.chance(0.2) {
                b = mutated_safetensors(&b, &mut g);
            }
            // The first byte says which seed spec to pass as an override (or none).
            let mut out = vec![g.byte()];
            out.extend_from_slice(&b);
            out
        }
    };
    (target, bytes)
}

const SEPARATOR: &[u8] = b"\n--snfc-fuzz-file--\n";

/// Several files in one input (so a crash file holds everything to replay it).
fn join_files(files: &[&[u8]]) -> Vec<u8> {
    files.join(SEPARATOR)
}

fn split_files(b: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut rest = b;
    while let Some(i) = rest.windows(SEPARATOR.len()).position(|w| w == SEPARATOR) {
        out.push(&rest[..i]);
        rest = &rest[i + SEPARATOR.len()..];
    }
    out.push(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Running the readers
// ---------------------------------------------------------------------------------------------

/// What a reader did with an input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Accepted,
    Rejected,
}

fn outcome<T, E>(r: &Result<T, E>) -> Outcome {
    if r.is_ok() {
        Outcome::Accepted
    } else {
        Outcome::Rejected
    }
}

/// The most elements of any tensor of a plan the fuzzer runs on the host.
const RUN_LIMIT: usize = 1 << 16;

/// Run an accepted plan once on the host with the initial parameters of its spec: a plan that
/// passes validation must not make the executor panic.
fn run_plan(plan: &TrainPlan) {
    let elements = |s: &[usize]| s.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let small = plan
        .step
        .instrs
        .iter()
        .all(|i| elements(&i.shape).is_some_and(|n| n <= RUN_LIMIT));
    let params = snfc_compiler::ir::lower::parameters(&plan.spec);
    let small = small
        && params
            .iter()
            .all(|p| elements(&p.shape).is_some_and(|n| n <= RUN_LIMIT));
    if !small {
        return;
    }
    let model = Model::<f64>::init(&plan.spec, 0);
    let mut feeds = model.values.clone();
    for (kind, name, shape) in plan.step.feeds() {
        if kind == "input" {
            let n = elements(&shape).unwrap_or(0);
            let v: Vec<f64> = (0..n).map(|i| ((i * 7) % 10) as f64 / 10.0).collect();
            let v = if plan.spec.input.preprocess == Preprocess::DequantizeLogit && name == "x" {
                v.iter().map(|x| (x * 255.0).floor()).collect()
            } else {
                v
            };
            feeds.insert(name, Arc::new(v));
        }
    }
    let program = snfc_runtime::host::exec::Program::from_plan(plan.step.clone());
    let _ = snfc_runtime::host::exec::Executor::<f64>::new().run(&program, &feeds);
}

/// Feed one input to its reader(s); a violated property panics like a reader would.
pub fn run_one(s: &Seeds, target: Target, bytes: &[u8]) -> Outcome {
    match target {
        Target::Spec => {
            let text = String::from_utf8_lossy(bytes);
            let r = parse_spec(&text);
            if let Ok(spec) = &r {
                // What is accepted survives its own round trip and has sound shapes.
                let again = parse_spec(&spec.to_json_pretty())
                    .unwrap_or_else(|e| panic!("an accepted spec's JSON is rejected: {e}"));
                assert_eq!(&again, spec, "spec changed in a round trip");
                let shapes = spec.layer_shapes();
                assert_eq!(shapes.len(), spec.layers.len() + 1);
                let _ = snfc_compiler::ir::lower::parameters(spec);
                let _ = spec.check_batch(bytes.len());
            }
            outcome(&r)
        }
        Target::Plan => {
            let text = String::from_utf8_lossy(bytes);
            let _ = TrainPlan::is_plan_text(&text);
            let r = TrainPlan::parse(&text);
            if let Ok(plan) = &r {
                let again = TrainPlan::parse(&plan.to_json())
                    .unwrap_or_else(|e| panic!("an accepted plan's JSON is rejected: {e}"));
                assert_eq!(&again, plan, "plan changed in a round trip");
                let _ = plan.step.to_text();
                let _ = plan.step.kernels();
                run_plan(plan);
            }
            outcome(&r)
        }
        Target::Npy => {
            let r = snfc_runtime::npy::parse_npy(bytes, "fuzz.npy");
            if let Ok((shape, values)) = &r {
                assert_eq!(values.len(), shape.iter().product::<usize>());
                assert!(values.iter().all(|v| v.is_finite()));
            }
            let ds = snfc_runtime::data::npy_dataset(bytes, "fuzz.npy", "fuzz");
            if let Ok(d) = &ds {
                for split in [&d.train, &d.valid, &d.test] {
                    assert!(split.n >= 1);
                    assert_eq!(split.values.len(), split.n * d.dim);
                }
            }
            let _ = snfc_runtime::data::npy_examples(bytes, "fuzz.npy");
            outcome(&r)
        }
        Target::Idx => {
            if let Some(cifar) = bytes.strip_prefix(b"CIFAR") {
                let r = snfc_runtime::data::parse_cifar_batch(cifar, "data_batch_1.bin");
                if let Ok(p) = &r {
                    assert_eq!(p.len() * 3073, cifar.len() * 3072);
                }
                return outcome(&r);
            }
            let files = split_files(bytes);
            let (train, test, labels) = (
                files[0],
                files.get(1).copied().unwrap_or_default(),
                files.get(2).copied().unwrap_or_default(),
            );
            let r = snfc_runtime::data::parse_idx_images(train, "train-images-idx3-ubyte");
            if let Ok(im) = &r {
                assert_eq!(im.pixels.len(), im.n * im.rows * im.cols);
            }
            let _ = snfc_runtime::data::parse_idx_labels(labels, "train-labels-idx1-ubyte");
            fn file<'a>(bytes: &'a [u8], origin: &'a str) -> IdxFile<'a> {
                IdxFile { bytes, origin }
            }
            let ds = mnist_from_files(&MnistFiles {
                train_images: file(train, "train-images-idx3-ubyte"),
                test_images: file(test, "t10k-images-idx3-ubyte"),
                train_labels: Some(file(labels, "train-labels-idx1-ubyte")),
                test_labels: None,
            });
            if let Ok(d) = &ds {
                assert!(d.train.n >= 1 && d.valid.n >= 1 && d.test.n >= 1);
                assert_eq!(d.train.values.len(), d.train.n * d.dim);
            }
            outcome(&r)
        }
        Target::Safetensors => {
            let Some((&which, file)) = bytes.split_first() else {
                return Outcome::Rejected;
            };
            let spec = match which % 4 {
                0 | 1 => None,
                k => s.checkpoints.get(k as usize).map(|(_, spec)| spec),
            };
            let path = Path::new("fuzz.safetensors");
            let check = |params: &[snfc_compiler::ir::lower::ParamInfo],
                         len: &dyn Fn(&str) -> usize| {
                for p in params {
                    assert_eq!(
                        len(&p.name),
                        p.shape.iter().product::<usize>(),
                        "{}",
                        p.name
                    );
                }
            };
            if which % 2 == 0 {
                let r = Model::<f64>::from_bytes(file, path, spec);
                if let Ok((m, _)) = &r {
                    check(&m.params, &|n| m.values[n].len());
                    assert!(m.values.values().all(|v| v.iter().all(|x| x.is_finite())));
                }
                outcome(&r)
            } else {
                let r = Model::<f32>::from_bytes(file, path, spec);
                if let Ok((m, _)) = &r {
                    check(&m.params, &|n| m.values[n].len());
                    assert!(m.values.values().all(|v| v.iter().all(|x| x.is_finite())));
                }
                outcome(&r)
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The run
// ---------------------------------------------------------------------------------------------

/// Counts of one target.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    pub inputs: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub panics: u64,
}

/// A panic: which input, what it said, and where the input was written.
#[derive(Debug, Clone)]
pub struct Crash {
    pub target: Target,
    pub index: u64,
    pub message: String,
    pub file: PathBuf,
}

#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    pub inputs: u64,
    pub seconds: f64,
    pub counts: Vec<(Target, Counts)>,
    pub crashes: Vec<Crash>,
}

impl Report {
    pub fn panics(&self) -> u64 {
        self.counts.iter().map(|(_, c)| c.panics).sum()
    }

    pub fn summary(&self) -> String {
        let mut s = format!(
            "fuzz: seed {}, {} inputs in {:.1} s ({:.0} inputs/s), {} panics\n",
            self.seed,
            self.inputs,
            self.seconds,
            self.inputs as f64 / self.seconds.max(1e-9),
            self.panics()
        );
        for (t, c) in &self.counts {
            s.push_str(&format!(
                "  {:<12} {:>9} inputs  {:>9} accepted  {:>9} rejected  {} panics\n",
                t.name(),
                c.inputs,
                c.accepted,
                c.rejected,
                c.panics
            ));
        }
        for c in &self.crashes {
            s.push_str(&format!(
                "  PANIC {} input {}: {} (input written to {})\n",
                c.target.name(),
                c.index,
                c.message,
                c.file.display()
            ));
        }
        s
    }
}

/// Where crash inputs go: `target/fuzz-crashes/` of the workspace.
pub fn crash_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fuzz-crashes")
}

/// A panicking input: its index, the panic's message and the input's bytes.
type Panicked = (u64, String, Vec<u8>);

thread_local! {
    static LAST_PANIC: std::cell::RefCell<String> = const { std::cell::RefCell::new(String::new()) };
}

/// Run `n` inputs of `seed` (in parallel; each input's bytes depend only on seed and index).
/// Panics are caught, their inputs written to `crashes`; `progress` is called after each chunk
/// with the inputs done so far.
pub fn run(n: u64, seed: u64, crashes: &Path, progress: &(dyn Fn(u64, f64) + Sync)) -> Report {
    use rayon::prelude::*;
    let seeds = Seeds::new();
    // Keep panics quiet (the message is kept per thread and reported with its input).
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|info| {
        let msg = match info.payload().downcast_ref::<&str>() {
            Some(s) => s.to_string(),
            None => info
                .payload()
                .downcast_ref::<String>()
                .cloned()
                .unwrap_or_else(|| "(non-string panic)".into()),
        };
        let at = info
            .location()
            .map(|l| format!(" at {}:{}", l.file(), l.line()))
            .unwrap_or_default();
        LAST_PANIC.with(|p| *p.borrow_mut() = format!("{msg}{at}"));
    }));
    let start = Instant::now();
    let mut counts: Vec<(Target, Counts)> =
        TARGETS.iter().map(|t| (*t, Counts::default())).collect();
    let mut found = Vec::new();
    const CHUNK: u64 = 20_000;
    let mut done = 0;
    while done < n {
        let end = (done + CHUNK).min(n);
        let results: Vec<(Target, Result<Outcome, Panicked>)> = (done..end)
            .into_par_iter()
            .map(|i| {
                let last = || LAST_PANIC.with(|p| p.borrow().clone());
                let target = TARGETS[(i % TARGETS.len() as u64) as usize];
                // A panic of the generator is a bug of the fuzzer, reported all the same.
                let Ok((target, bytes)) =
                    catch_unwind(AssertUnwindSafe(|| generate(&seeds, seed, i)))
                else {
                    return (
                        target,
                        Err((i, format!("generator: {}", last()), Vec::new())),
                    );
                };
                let r = catch_unwind(AssertUnwindSafe(|| run_one(&seeds, target, &bytes)));
                match r {
                    Ok(o) => (target, Ok(o)),
                    Err(_) => (target, Err((i, last(), bytes))),
                }
            })
            .collect();
        for (target, r) in results {
            let c = &mut counts[TARGETS.iter().position(|t| *t == target).unwrap_or(0)].1;
            c.inputs += 1;
            match r {
                Ok(Outcome::Accepted) => c.accepted += 1,
                Ok(Outcome::Rejected) => c.rejected += 1,
                Err((index, message, bytes)) => {
                    c.panics += 1;
                    let _ = std::fs::create_dir_all(crashes);
                    let file = crashes.join(format!("{}-seed{seed}-{index}.bin", target.name()));
                    if let Err(e) = std::fs::write(&file, &bytes) {
                        eprintln!("fuzz: cannot write {}: {e}", file.display());
                    }
                    found.push(Crash {
                        target,
                        index,
                        message,
                        file,
                    });
                }
            }
        }
        done = end;
        progress(done, start.elapsed().as_secs_f64());
    }
    std::panic::set_hook(previous);
    Report {
        seed,
        inputs: n,
        seconds: start.elapsed().as_secs_f64(),
        counts,
        crashes: found,
    }
}

/// Run one saved input without catching its panic (for its backtrace).
pub fn replay(target: Target, file: &Path) -> Outcome {
    let bytes = std::fs::read(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    run_one(&Seeds::new(), target, &bytes)
}
