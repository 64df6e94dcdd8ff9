//! Snapshots of the compiled IR for every spec in `specs/`: the exact training graph (`ir`) and
//! the rewritten step (`ir-opt`) and its kernel plan (`plan`). A change in lowering, autodiff or the rewrites shows up here
//! as a readable diff (`cargo insta review`).

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::rewrite::op_counts;
use snfc_compiler::spec::load_spec;
use std::path::Path;

/// Specs whose exact graph has more nodes are snapshotted as op counts, not text.
const MAX_TEXT_NODES: usize = 3000;

#[test]
fn ir_of_every_spec() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../specs");
    let mut specs: Vec<_> = std::fs::read_dir(&dir)
        .expect("specs/ exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    specs.sort();
    assert!(!specs.is_empty());
    for path in specs {
        let spec = load_spec(&path).unwrap_or_else(|e| panic!("{e}"));
        let stem = path
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("spec")
            .to_string();
        let c =
            compile_train(&spec, spec.train.batch_size, OptLevel::Full).expect("the spec compiles");
        let plan = snfc_compiler::plan::Plan::new(&c.step);
        if c.exact.nodes().len() > MAX_TEXT_NODES {
            // A deep flow (Glow): thousands of lines of text show no readable diff; its op
            // counts before and after the rewrites do.
            let summary = format!(
                "exact: {:?}\nstep: {:?}\nplan: {} kernels\n",
                op_counts(&c.exact),
                op_counts(&c.step),
                plan.kernels()
            );
            insta::assert_snapshot!(format!("{stem}.counts"), summary);
            continue;
        }
        insta::assert_snapshot!(format!("{stem}.ir"), c.exact.to_text());
        insta::assert_snapshot!(format!("{stem}.ir-opt"), c.step.to_text());
        insta::assert_snapshot!(format!("{stem}.plan"), plan.to_text());
    }
}
