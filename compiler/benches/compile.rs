//! Compile-time benchmark: `cargo bench -p snfc-compiler --bench compile`.
//!
//! FC stacks of 2, 8, 32, 128 and 512 linear layers (input [784], dequantize_logit, smooth leaky ReLU
//! between the layers, self-normalizing, batch 100), compiled with `OptLevel::Full`. Prints, per
//! depth, the median total time of a few runs and, for the median run, each e-graph phase
//! (nodes and classes of the largest e-graph, iterations, stop reason, regions saturated and how
//! many were distinct, time and extraction time) and the GEMM counts of the
//! step before and after rewriting. No benchmark framework: `std::time::Instant` and a table.

use snfc_compiler::compile::{compile_train, Compiled, OptLevel};
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::{FlowSpec, Preprocess};
use std::time::Instant;

const DEPTHS: [usize; 5] = [2, 8, 32, 128, 512];
const BATCH: usize = 100;

fn fc_spec(layers: usize) -> FlowSpec {
    let mut b =
        FlowSpec::builder(&format!("fc{layers}")).input(&[784], Preprocess::DequantizeLogit);
    for i in 0..layers {
        if i > 0 {
            b = b.smooth_leaky_relu(0.3);
        }
        b = b.linear(true);
    }
    b.self_normalizing(1.0)
        .batch_size(BATCH)
        .build()
        .unwrap_or_else(|e| panic!("fc{layers}: {e}"))
}

/// Runs per depth: more for the cheap ones. `SNFC_BENCH_RUNS` overrides.
fn runs(layers: usize) -> usize {
    if let Some(n) = std::env::var("SNFC_BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
    {
        return n;
    }
    if layers >= 32 {
        3
    } else {
        5
    }
}

fn main() {
    // `cargo bench` passes `--bench`; a name filter selects depths (`fc8`), as with libtest.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    println!(
        "{:>6} {:>5} {:>10} | {:<15} {:>7} {:>7} {:>5} {:<22} {:>9} {:>9} {:>10} | {:>11} {:>10}",
        "layers",
        "runs",
        "median ms",
        "phase",
        "nodes",
        "classes",
        "iters",
        "stop reason",
        "regions",
        "phase ms",
        "extract ms",
        "GEMMs exact",
        "GEMMs step"
    );
    for layers in DEPTHS {
        let spec = fc_spec(layers);
        if !filter.is_empty() && !filter.iter().any(|f| spec.name.contains(f.as_str())) {
            continue;
        }
        let n = runs(layers);
        let mut results: Vec<(f64, Compiled)> = (0..n)
            .map(|_| {
                let start = Instant::now();
                let c = compile_train(&spec, BATCH, OptLevel::Full).expect("the spec compiles");
                (start.elapsed().as_secs_f64() * 1e3, c)
            })
            .collect();
        results.sort_by(|a, b| a.0.total_cmp(&b.0));
        let (ms, c) = &results[n / 2];
        let before = op_counts(&c.exact.without_outputs(&["objective"])).gemm;
        let after = op_counts(&c.step).gemm;
        for (i, s) in c.egraph.iter().enumerate() {
            let lead = if i == 0 {
                format!("{layers:>6} {n:>5} {ms:>10.1}")
            } else {
                format!("{:>6} {:>5} {:>10}", "", "", "")
            };
            let gemms = if i == 0 {
                format!("{before:>11} {after:>10}")
            } else {
                String::new()
            };
            let row = format!(
                "{lead} | {:<15} {:>7} {:>7} {:>5} {:<22} {:>9} {:>9.1} {:>10.1} | {gemms}",
                s.phase,
                s.nodes,
                s.classes,
                s.iterations,
                s.stop_reason,
                format!("{}/{}", s.distinct_regions, s.regions),
                s.millis,
                s.extract_millis
            );
            println!("{}", row.trim_end());
        }
    }
}
