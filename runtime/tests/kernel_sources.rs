//! The CUDA C++ CubeCL generates for every kernel of a small plan, produced without a GPU and
//! snapshot-tested: a change in the kernels or in their specialization shows up as a diff
//! (`cargo insta review`). The WGSL of the same kernels is checked to be generated too.

use snfc_compiler::compile::{compile_train, OptLevel};
use snfc_compiler::plan::Plan;
use snfc_compiler::spec::parse_spec;
use snfc_runtime::cube::source::{plan_sources, Target};

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
    for k in &cuda {
        assert!(k.source.contains("extern \"C\" __global__"), "{}", k.name);
        insta::assert_snapshot!(format!("tiny.{}.cu", k.name), stable(&k.source));
    }
    let wgsl = plan_sources(&plan, Target::Wgsl).expect("WGSL source");
    assert_eq!(wgsl.len(), cuda.len());
    assert!(wgsl.iter().all(|k| k.source.contains("@compute")));
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
            .all(|k| k.source.contains("extern \"C\" __global__")));
        assert!(wgsl.iter().all(|k| k.source.contains("@compute")));
        let kinds: std::collections::BTreeSet<&str> = cuda
            .iter()
            .map(|k| k.name.split_once('_').map_or("", |(_, kind)| kind))
            .collect();
        // Convolutions are implicit GEMMs (the im2col matrix gathered tile by tile).
        for kind in [
            "gather",
            "conv2d_gemm",
            "conv_kernel_grad_gemm",
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
