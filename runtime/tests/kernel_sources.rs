//! The CUDA C++ CubeCL generates for every kernel of a small plan, produced without a GPU and
//! snapshot-tested: a change in the kernels or in their specialization shows up as a diff
//! (`cargo insta review`). The WGSL of the same kernels is checked to be generated too.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::parse_spec;
use snfc_runtime::cube::source::{plan_sources, Target};

/// A matrix product's entry (`k003_matmul`, `k007_conv2d_matmul`) or a sum
/// (`k005_reduce`): cubek kernels, built on the device, so no source of ours.
fn is_library(name: &str) -> bool {
    name.ends_with("matmul") || name.ends_with("reduce")
}

fn small_plan() -> Plan {
    let spec = parse_spec(
        r#"{"name": "tiny", "input": {"shape": [4], "preprocess": "none"},
            "layers": [{"type": "linear", "bias": true},
                       {"type": "smooth_leaky_relu", "alpha": 0.3}],
            "train": {"batch_size": 3}}"#,
    )
    .expect("spec");
    let c = compile_train(&spec, 3, OptLevel::Full).expect("the spec compiles");
    Plan::new(&c.step)
}

/// CubeCL places and declares shared arrays and mutable locals in hash-map order: drop the
/// arrays' size comments and offsets and sort each run of declarations so the snapshot depends
/// only on the kernel.
fn stable(source: &str) -> String {
    let mut out: Vec<String> = Vec::new();
    let mut decls: Vec<String> = Vec::new();
    for line in source.lines() {
        if line.starts_with("// Shared array size") {
            continue;
        }
        if let (true, Some(at)) = (
            line.contains("*shared_memory_"),
            line.find("&dynamic_shared_mem["),
        ) {
            decls.push(format!("{}&dynamic_shared_mem[offset]);", &line[..at]));
            continue;
        }
        // `float l_mut_20;`: a mutable local declared without a value.
        let local = line.split_once(" l_mut_").is_some_and(|(ty, rest)| {
            !ty.contains(' ')
                && rest
                    .strip_suffix(';')
                    .is_some_and(|n| n.parse::<u32>().is_ok())
        });
        if local {
            decls.push(line.to_string());
            continue;
        }
        if !decls.is_empty() {
            decls.sort();
            out.append(&mut decls);
        }
        out.push(line.to_string());
    }
    decls.sort();
    out.append(&mut decls);
    out.join("\n") + "\n"
}

#[test]
fn cuda_sources_of_a_small_plan() {
    let plan = small_plan();
    let cuda = plan_sources(&plan, Target::Cuda).expect("CUDA source");
    assert!(cuda.len() >= plan.kernels());
    insta::assert_snapshot!("tiny.plan", plan.to_text());
    let mut products = 0;
    for k in &cuda {
        if is_library(&k.name) {
            // cubek's kernels depend on the device: the entry says so, with the shape.
            assert!(k.source.starts_with("// cubek-"), "{}", k.source);
            products += usize::from(k.name.ends_with("matmul"));
        } else {
            assert!(k.source.contains("extern \"C\" __global__"), "{}", k.name);
        }
        insta::assert_snapshot!(format!("tiny.{}.cu", k.name), stable(&k.source));
    }
    // The tiny flow's forward product, its two gradient products and the inverse's ones.
    assert!(products >= 3, "{products} products");
    let wgsl = plan_sources(&plan, Target::Wgsl).expect("WGSL source");
    assert_eq!(wgsl.len(), cuda.len());
    assert!(wgsl
        .iter()
        .all(|k| is_library(&k.name) || k.source.contains("@compute")));
}

/// Every kernel kind of the image flows (gathers, convolutions, kernel gradients, splines)
/// generates CUDA and WGSL without a device, for the paper's CNN in both gradient modes.
#[test]
fn cuda_and_wgsl_sources_of_the_cnn_plans() {
    for text in [
        include_str!("../../specs/mnist_cnn9.json"),
        include_str!("../../specs/mnist_cnn9_exact.json"),
    ] {
        let spec = parse_spec(text).expect("spec");
        let c = compile_train(&spec, 2, OptLevel::Full).expect("the spec compiles");
        let plan = Plan::new(&c.step);
        let cuda = plan_sources(&plan, Target::Cuda).expect("CUDA source");
        let wgsl = plan_sources(&plan, Target::Wgsl).expect("WGSL source");
        assert_eq!(wgsl.len(), cuda.len());
        assert!(cuda
            .iter()
            .all(|k| is_library(&k.name) || k.source.contains("extern \"C\" __global__")));
        assert!(wgsl
            .iter()
            .all(|k| is_library(&k.name) || k.source.contains("@compute")));
        let kinds: std::collections::BTreeSet<&str> = cuda
            .iter()
            .map(|k| k.name.split_once('_').map_or("", |(_, kind)| kind))
            .collect();
        // Convolutions are im2col gathers feeding cubek-matmul products.
        for kind in [
            "gather",
            "im2col",
            "conv2d_matmul",
            "conv_kernel_grad_matmul",
            "spline",
            "fused",
        ] {
            assert!(
                kinds.contains(kind),
                "{}: no {kind} kernel in {kinds:?}",
                spec.name
            );
        }
    }
}
