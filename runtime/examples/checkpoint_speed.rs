//! Time of the per-epoch `last.safetensors` write (parameters, Adam moments, data order; atomic
//! with fsync) for a spec, to compare with its epoch time. `train` encodes the file on the
//! training thread and writes it on a background thread while the next epoch runs, so the
//! training loop pays the encoding (the first figure); the write itself is the second:
//! `cargo run --release -p snfc-runtime --example checkpoint_speed -- specs/mnist_fc2.json`.

use rand::SeedableRng;
use snfc_compiler::spec::load_spec;
use snfc_runtime::atomic::write_atomically;
use snfc_runtime::model::Model;
use snfc_runtime::train::{last_bytes, AdamState, RunState};
use std::time::Instant;

fn main() {
    // As the `snfc` binary runs.
    snfc_runtime::keep_freed_memory();
    let path = std::env::args()
        .nth(1)
        .unwrap_or("specs/mnist_fc2.json".into());
    let spec = load_spec(std::path::Path::new(&path)).unwrap_or_else(|e| panic!("{e}"));
    let model = Model::<f32>::init(&spec, 0);
    let moments = model
        .values
        .iter()
        .map(|(k, v)| (k.clone(), (v.to_vec(), v.to_vec())))
        .collect();
    let state = RunState {
        epoch: 1,
        total_steps: 80,
        adam: AdamState { t: 80, moments },
        rng: rand_chacha::ChaCha8Rng::seed_from_u64(0),
        order: (0..8000).collect(),
        geco: None,
        best: None,
        best_epoch: 0,
        options: None,
        partial: None,
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("last.safetensors");
    let (mut encode, mut write) = (Vec::new(), Vec::new());
    for _ in 0..10 {
        let t = Instant::now();
        let bytes = last_bytes(&out, &model, &state).expect("encode");
        encode.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        write_atomically(&out, &bytes).expect("write");
        write.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(|a, b| a.total_cmp(b));
        format!("median {:.1} ms (min {:.1}, max {:.1})", v[5], v[0], v[9])
    };
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}: last.safetensors {:.1} MB over 10 writes; encoding on the training thread {}; \
         write + fsync on the background thread {}",
        spec.name,
        bytes as f64 / 1e6,
        stats(&mut encode),
        stats(&mut write)
    );
}
