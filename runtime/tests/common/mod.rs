//! Helpers shared by the runtime's integration tests.
#![allow(dead_code)] // each test crate uses its own subset

/// SplitMix64 with Box–Muller normals: deterministic and independent of the `rand` version.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [lo, hi).
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    pub fn normal(&mut self) -> f64 {
        let u1 = 1.0 - self.uniform(); // (0, 1]
        let u2 = self.uniform();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    /// Uniform integer in `lo..=hi`.
    pub fn int(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }

    pub fn coin(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
}

use snfc_compiler::ir::Graph;
use snfc_runtime::host::exec::{Executor, Feeds, Program};
use std::collections::BTreeMap;
use std::sync::Arc;

/// Run `graph` on the host in f64; outputs by name.
pub fn run_f64(graph: &Graph, feeds: &Feeds<f64>) -> BTreeMap<String, Vec<f64>> {
    let mut ex = Executor::<f64>::new();
    ex.run(&Program::new(graph), feeds)
        .unwrap_or_else(|e| panic!("running {}: {e}", graph.name))
        .into_iter()
        .map(|(k, t)| (k, t.data))
        .collect()
}

/// Check every `grad.P` output of `graph` against central finite differences (step 1e-6) of its
/// `objective` output, to `tol` relative to `1 + |fd|`. Returns the parameters checked and how
/// many elements each had.
pub fn check_gradients_fd(graph: &Graph, feeds: &Feeds<f64>, tol: f64) -> Vec<(String, usize)> {
    let outs = run_f64(graph, feeds);
    let objective = |f: &Feeds<f64>| run_f64(graph, f)["objective"][0];
    let mut checked = Vec::new();
    for (name, grad) in outs.iter().filter(|(k, _)| k.starts_with("grad.")) {
        let p = name.trim_start_matches("grad.");
        for e in 0..grad.len() {
            let h = 1e-6;
            let mut v = feeds[p].to_vec();
            v[e] += h;
            let mut plus = feeds.clone();
            plus.insert(p.into(), Arc::new(v.clone()));
            v[e] -= 2.0 * h;
            let mut minus = feeds.clone();
            minus.insert(p.into(), Arc::new(v));
            let fd = (objective(&plus) - objective(&minus)) / (2.0 * h);
            assert!(
                (fd - grad[e]).abs() < tol * (1.0 + fd.abs()),
                "{name}[{e}]: {} vs finite difference {fd}",
                grad[e]
            );
        }
        checked.push((p.to_string(), grad.len()));
    }
    checked
}

/// Feeds for `spec`: its initial parameters (seed 3) plus normal noise — `weight_sd` on the
/// `weight` / `weight_inv` kernels, `other_sd` on the rest — and a batch `x` of `value(rng)`.
pub fn perturbed_feeds(
    spec: &snfc_compiler::spec::FlowSpec,
    batch: usize,
    rng: &mut Rng,
    (weight_sd, other_sd): (f64, f64),
    value: impl Fn(&mut Rng) -> f64,
) -> Feeds<f64> {
    let model = snfc_runtime::model::Model::<f64>::init(spec, 3);
    let mut out = Feeds::new();
    for p in &model.params {
        let sd = if p.name.ends_with("weight") || p.name.ends_with("weight_inv") {
            weight_sd
        } else {
            other_sd
        };
        let v: Vec<f64> = model
            .get(&p.name)
            .iter()
            .map(|x| x + sd * rng.normal())
            .collect();
        out.insert(p.name.clone(), Arc::new(v));
    }
    let x: Vec<f64> = (0..spec.input.dim() * batch).map(|_| value(rng)).collect();
    out.insert("x".into(), Arc::new(x));
    out
}
