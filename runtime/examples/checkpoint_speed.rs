//! Time of the per-epoch `last.safetensors` write (parameters, Adam moments, data order; atomic
//! with fsync) for a spec, to compare with its epoch time:
//! `cargo run --release -p snfc-runtime --example checkpoint_speed -- specs/mnist_fc2.json`.

use rand::SeedableRng;
use snfc_compiler::spec::load_spec;
use snfc_runtime::model::Model;
use snfc_runtime::train::{save_last, AdamState, RunState};
use std::time::Instant;

fn main() {
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
    };
    let dir = tempfile::tempdir().expect("temporary directory");
    let out = dir.path().join("last.safetensors");
    let mut times = Vec::new();
    for _ in 0..10 {
        let t = Instant::now();
        save_last(&out, &model, &state).expect("write");
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let bytes = std::fs::metadata(&out).map(|m| m.len()).unwrap_or(0);
    println!(
        "{}: last.safetensors {:.1} MB, median write {:.1} ms (min {:.1}, max {:.1}) over 10",
        spec.name,
        bytes as f64 / 1e6,
        times[5],
        times[0],
        times[9]
    );
}
