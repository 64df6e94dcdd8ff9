//! Runs that survive interruption and divergence: a run continued from its
//! `last.safetensors` ends bit-identical to an uninterrupted one (parameters, Adam moments,
//! data order, noise, λ), and a diverging run stops with an error naming where and why,
//! keeping the checkpoints of its last good epoch.

use snfc_compiler::spec::{parse_spec, FlowSpec};
use snfc_runtime::data::{embedded_mnist, Dataset};
use snfc_runtime::train::{train, TrainError, TrainOptions, LAST_CHECKPOINT, METRICS};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn options(out: PathBuf, epochs: usize, resume: bool) -> TrainOptions {
    TrainOptions {
        epochs: Some(epochs),
        resume,
        ..TrainOptions::new(out)
    }
}

/// A small image flow that draws on every piece of carried state: dequantization noise and
/// pad-crop offsets (RNG), actnorm's data-dependent initialization, GECO's λ and EMA,
/// clipping and Adam with warm-up.
fn stateful_spec() -> FlowSpec {
    parse_spec(
        r#"{
            "name": "resume_probe",
            "input": {"shape": [1, 28, 28], "preprocess": "dequantize_logit"},
            "layers": [
                {"type": "squeeze"},
                {"type": "actnorm"},
                {"type": "conv", "kernel_size": 1},
                {"type": "affine_coupling", "width": 4},
                {"type": "conv", "kernel_size": 3}
            ],
            "objective": {"lambda": {"geco": {"lambda0": 1.0, "lr": 0.01, "ema": 0.9}}},
            "train": {"batch_size": 20, "epochs": 6, "warmup_epochs": 2, "seed": 3,
                      "grad_clip_norm": 50.0, "augment": "pad_crop",
                      "optimizer": {"adam": {"lr": 1e-3}}}
        }"#,
    )
    .expect("spec")
}

fn small_mnist() -> Dataset {
    let mut data = embedded_mnist().expect("embedded MNIST");
    data.train = data.train.take(60);
    data.valid = data.valid.take(40);
    data
}

/// Every tensor of a safetensors file, by name, as raw bytes (dtype included).
fn tensors(path: &Path) -> BTreeMap<String, (String, Vec<u8>)> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes).expect("safetensors");
    st.tensors()
        .into_iter()
        .map(|(n, v)| (n, (format!("{:?}", v.dtype()), v.data().to_vec())))
        .collect()
}

/// metrics.jsonl without its wall-clock fields.
fn metrics(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join(METRICS))
        .expect("metrics.jsonl")
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).expect("JSON line");
            let o = v.as_object_mut().expect("object");
            o.remove("seconds");
            o.remove("examples_per_sec");
            v
        })
        .collect()
}

#[test]
fn a_resumed_run_ends_bit_identical_to_an_uninterrupted_one() {
    let spec = stateful_spec();
    let data = small_mnist();
    let dir = tempfile::tempdir().unwrap();
    let whole = dir.path().join("whole");
    let parts = dir.path().join("parts");
    train::<f64>(&spec, &data, &options(whole.clone(), 6, false)).expect("uninterrupted run");
    // 2 epochs, then resumed to 3 (raising --epochs), then to 6.
    train::<f64>(&spec, &data, &options(parts.clone(), 2, false)).expect("first part");
    let second = train::<f64>(&spec, &data, &options(parts.clone(), 3, true)).expect("resumed");
    assert_eq!(
        second.records.len(),
        1,
        "the resumed run trains epoch 3 only"
    );
    let third = train::<f64>(&spec, &data, &options(parts.clone(), 6, true)).expect("resumed");
    assert_eq!(third.records.first().map(|r| r.epoch), Some(4));

    let (a, b) = (
        tensors(&whole.join(LAST_CHECKPOINT)),
        tensors(&parts.join(LAST_CHECKPOINT)),
    );
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(a.contains_key("adam.m.layers.2.weight") && a.contains_key("order"));
    for (name, value) in &a {
        assert!(b[name] == *value, "`{name}` differs after resuming");
    }
    assert_eq!(
        tensors(&whole.join("checkpoint.safetensors")),
        tensors(&parts.join("checkpoint.safetensors"))
    );
    let (ma, mb) = (metrics(&whole), metrics(&parts));
    assert_eq!(ma.len(), 6);
    assert_eq!(ma, mb, "metrics (λ, NLLs, losses) after resuming");
    // GECO's λ moved, so its state really was carried.
    assert_ne!(ma[5]["lambda"]["layers.2"], 1.0);

    // Resuming a finished run trains nothing and keeps the best result.
    let again = train::<f64>(&spec, &data, &options(parts.clone(), 6, true)).expect("no-op");
    assert!(again.records.is_empty());
    assert_eq!(again.best, third.best);
    let reached = again.reached.expect("the target is said to be reached");
    assert_eq!((reached.epoch, reached.epochs), (6, 6));
}

#[test]
fn resume_refuses_another_spec_dtype_or_data_and_changes_nothing() {
    let spec = stateful_spec();
    let data = small_mnist();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("run");
    train::<f64>(&spec, &data, &options(out.clone(), 1, false)).expect("first epoch");
    let before = tensors(&out.join(LAST_CHECKPOINT));
    let metrics_before = std::fs::read(out.join(METRICS)).unwrap();

    let mut other = spec.clone();
    other.train.optimizer.adam.lr = 5e-4;
    let e = train::<f64>(&other, &data, &options(out.clone(), 2, true)).unwrap_err();
    assert!(e.to_string().contains("different spec"), "{e}");
    // Field by field, with both values; the epoch count is not a difference.
    assert!(
        e.to_string()
            .contains("/train/optimizer/adam/lr: 0.001 in the run, 0.0005 now"),
        "{e}"
    );
    assert!(!e.to_string().contains("/train/epochs"), "{e}");
    assert!(e.to_string().contains(LAST_CHECKPOINT), "{e}");

    let e = train::<f32>(&spec, &data, &options(out.clone(), 2, true)).unwrap_err();
    assert!(e.to_string().contains("--dtype f64"), "{e}");

    let mut fewer = data.clone();
    fewer.train = fewer.train.take(40);
    let e = train::<f64>(&spec, &fewer, &options(out.clone(), 2, true)).unwrap_err();
    assert!(e.to_string().contains("same --data"), "{e}");

    // Neither resuming nor starting over without --force touched the run.
    let e = train::<f64>(&spec, &data, &options(out.clone(), 2, false)).unwrap_err();
    assert!(
        e.to_string().contains("--resume") && e.to_string().contains("--force"),
        "{e}"
    );
    assert_eq!(tensors(&out.join(LAST_CHECKPOINT)), before);
    assert_eq!(std::fs::read(out.join(METRICS)).unwrap(), metrics_before);

    // --force keeps the earlier files aside.
    let mut force = options(out.clone(), 1, false);
    force.force = true;
    train::<f64>(&spec, &data, &force).expect("forced run");
    assert_eq!(
        std::fs::read(out.join("previous-1").join(METRICS)).unwrap(),
        metrics_before
    );
    assert_eq!(
        tensors(&out.join("previous-1").join(LAST_CHECKPOINT)),
        before
    );
}

/// A self-normalizing FC flow on the embedded digits whose learning rate is large enough to
/// diverge: the first step with a non-finite loss or gradient stops the run.
#[test]
fn a_diverging_run_stops_naming_epoch_step_and_cause() {
    let data = small_mnist();
    let text = |lr: f64| {
        format!(
            r#"{{"name": "diverges", "input": {{"shape": [784], "preprocess": "dequantize_logit"}},
                "layers": [{{"type": "linear"}}, {{"type": "smooth_leaky_relu"}}, {{"type": "linear"}}],
                "objective": {{"lambda": 0.0}},
                "train": {{"batch_size": 20, "epochs": 40, "warmup_epochs": 10, "seed": 0,
                          "optimizer": {{"adam": {{"lr": {lr:e}}}}}}}}}"#
        )
    };
    // The learning rate grows over the warm-up: find one that survives the first epoch, so
    // there is a good checkpoint to keep.
    let mut found = false;
    for lr in [1e5, 1e6, 1e4, 1e3] {
        let spec = parse_spec(&text(lr)).expect("spec");
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("run");
        // f32, where values overflow to infinity long before f64's would.
        let e = match train::<f32>(&spec, &data, &options(out.clone(), 40, false)) {
            Ok(s) => {
                eprintln!("lr {lr}: no divergence in 40 epochs, best {:?}", s.best);
                continue;
            }
            Err(e) => e,
        };
        eprintln!("lr {lr}: {e}");
        assert!(matches!(e, TrainError::Diverged(_)), "{e}");
        let m = e.to_string();
        assert!(m.contains("diverged at epoch") && m.contains("step"), "{m}");
        assert!(m.contains("λ = 0") && m.contains("Table 4"), "{m}");
        let epochs_done = std::fs::read_to_string(out.join(METRICS))
            .map(|t| t.lines().count())
            .unwrap_or(0);
        if epochs_done == 0 {
            assert!(m.contains("nothing was saved"), "{m}");
            continue;
        }
        assert!(
            m.contains(&format!("diverged at epoch {}", epochs_done + 1)),
            "{m}"
        );
        assert!(m.contains("intact"), "{m}");
        // The good epochs' checkpoints load and are finite.
        let (model, meta) =
            snfc_runtime::model::Model::<f32>::load(&out.join(LAST_CHECKPOINT), None)
                .expect("last checkpoint loads");
        assert!(model
            .values
            .values()
            .all(|v| v.iter().all(|x| x.is_finite())));
        assert!(meta["epoch"] == epochs_done.to_string());
        found = true;
        break;
    }
    assert!(found, "no learning rate diverged after a good first epoch");
}
