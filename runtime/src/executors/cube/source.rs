//! The source code CubeCL generates for a plan's kernels — CUDA C++ and WGSL — produced
//! without a device (`snfc compile --emit cuda,wgsl`).

use super::kernels::{self, FusedProgram, GemmConfig};
use super::tensor_kernels::{self, GatherConfig, SplineConfig};
use super::GpuProgram;
use cubecl::cuda::{CudaCompiler, CudaRuntime};
use cubecl::prelude::*;
use cubecl::wgpu::{WgpuRuntime, WgslCompiler};
use cubecl::{Compiler, ExecutionMode};
use snfc_compiler::plan::Plan;

/// Which language to generate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Target {
    Cuda,
    Wgsl,
}

impl Target {
    pub fn extension(self) -> &'static str {
        match self {
            Target::Cuda => "cu",
            Target::Wgsl => "wgsl",
        }
    }
}

/// One generated kernel: a file stem (`k03_fused`) and its source.
#[derive(Debug, Clone)]
pub struct KernelSource {
    pub name: String,
    pub source: String,
}

fn builder(target: Target) -> KernelBuilder {
    let mut b = KernelBuilder::default();
    match target {
        Target::Cuda => b.runtime_properties(CudaRuntime::target_properties()),
        Target::Wgsl => b.runtime_properties(WgpuRuntime::target_properties()),
    }
    AddressType::U32.register(&mut b.scope);
    b
}

fn arrays(n: usize) -> SequenceCompilationArg<Array<f32>> {
    SequenceCompilationArg {
        values: (0..n)
            .map(|_| ArrayCompilationArg { inplace: None })
            .collect(),
    }
}

fn compile(def: KernelDefinition, target: Target) -> Result<String, String> {
    let addr = AddressType::U32.unsigned_type();
    match target {
        Target::Cuda => CudaCompiler::default()
            .compile(def, &Default::default(), ExecutionMode::Checked, addr)
            .map(|r| r.to_string())
            .map_err(|e| format!("{e:?}")),
        Target::Wgsl => WgslCompiler::default()
            .compile(def, &Default::default(), ExecutionMode::Checked, addr)
            .map(|r| r.to_string())
            .map_err(|e| format!("{e:?}")),
    }
}

/// The source of one fused-kernel specialization with `inputs` input arrays.
pub fn fused(p: &FusedProgram, inputs: usize, target: Target) -> Result<String, String> {
    let mut b = builder(target);
    let ins = <Sequence<Array<f32>> as LaunchArg>::expand(&arrays(inputs), &mut b);
    let outs = <Sequence<Array<f32>> as LaunchArg>::expand_output(&arrays(p.outputs.len()), &mut b);
    kernels::fused::expand(&mut b.scope, ins, outs, p.clone());
    let settings = KernelSettings::default()
        .kernel_name("fused")
        .cube_dim(CubeDim::new_1d(256));
    compile(b.build(settings), target)
}

/// The source of one GEMM specialization.
pub fn gemm(g: &GemmConfig, target: Target) -> Result<String, String> {
    let mut b = builder(target);
    let arg = ArrayCompilationArg { inplace: None };
    let a = <Array<f32> as LaunchArg>::expand(&arg, &mut b);
    let bb = <Array<f32> as LaunchArg>::expand(&arg, &mut b);
    let c = <Array<f32> as LaunchArg>::expand(&arg, &mut b);
    let out = <Array<f32> as LaunchArg>::expand_output(&arg, &mut b);
    kernels::gemm::expand(&mut b.scope, a, bb, c, out, g.clone());
    let u = kernels::UNITS as u32;
    let settings = KernelSettings::default()
        .kernel_name("gemm")
        .cube_dim(CubeDim::new_2d(u, u));
    compile(b.build(settings), target)
}

/// The source of the partial-sum finisher over `n` partials.
pub fn sum_partials(n: usize, target: Target) -> Result<String, String> {
    let mut b = builder(target);
    let arg = ArrayCompilationArg { inplace: None };
    let partials = <Array<f32> as LaunchArg>::expand(&arg, &mut b);
    let out = <Array<f32> as LaunchArg>::expand_output(&arg, &mut b);
    kernels::sum_partials::expand(&mut b.scope, partials, out, n);
    let settings = KernelSettings::default()
        .kernel_name("sum_partials")
        .cube_dim(CubeDim::new_1d(1));
    compile(b.build(settings), target)
}

fn array_args(b: &mut KernelBuilder, inputs: usize) -> Vec<<Array<f32> as CubeType>::ExpandType> {
    let arg = ArrayCompilationArg { inplace: None };
    (0..inputs)
        .map(|_| <Array<f32> as LaunchArg>::expand(&arg, b))
        .collect()
}

fn settings(name: &str) -> KernelSettings {
    KernelSettings::default()
        .kernel_name(name)
        .cube_dim(CubeDim::new_1d(256))
}

/// The source of one index-table gather.
pub fn gather(g: &GatherConfig, target: Target) -> Result<String, String> {
    let mut b = builder(target);
    let arg = ArrayCompilationArg { inplace: None };
    let input = <Array<f32> as LaunchArg>::expand(&arg, &mut b);
    let ptr = <Array<u32> as LaunchArg>::expand(&arg, &mut b);
    let idx = <Array<u32> as LaunchArg>::expand(&arg, &mut b);
    let weight = <Array<f32> as LaunchArg>::expand(&arg, &mut b);
    let out = <Array<f32> as LaunchArg>::expand_output(&arg, &mut b);
    tensor_kernels::gather::expand(&mut b.scope, input, ptr, idx, weight, out, g.clone());
    compile(b.build(settings("gather")), target)
}

/// The source of one spline launch.
pub fn spline(c: &SplineConfig, target: Target) -> Result<String, String> {
    let mut b = builder(target);
    let mut a = array_args(&mut b, 6).into_iter();
    let mut next = || a.next().expect("six");
    let (x, w, h, d, gy, gl) = (next(), next(), next(), next(), next(), next());
    let arg = ArrayCompilationArg { inplace: None };
    let out = <Array<f32> as LaunchArg>::expand_output(&arg, &mut b);
    tensor_kernels::spline::expand(&mut b.scope, x, w, h, d, gy, gl, out, c.clone());
    compile(b.build(settings("spline")), target)
}

/// Every kernel a plan launches, in launch order, as `target` source.
pub fn plan_sources(plan: &Plan, target: Target) -> Result<Vec<KernelSource>, String> {
    if let Some(op) = super::unsupported_op(plan) {
        return Err(format!("the GPU backends have no kernel for `{op}` yet"));
    }
    let mut out = Vec::new();
    for (k, launch) in GpuProgram::<WgpuRuntime>::kernel_specs(plan)
        .into_iter()
        .enumerate()
    {
        let (kind, src) = match launch {
            KernelSpec::Fused { program, inputs } => ("fused", fused(&program, inputs, target)?),
            KernelSpec::Gemm(g) if g.im2col.is_some() && g.b_t => {
                ("conv_kernel_grad_gemm", gemm(&g, target)?)
            }
            KernelSpec::Gemm(g) if g.im2col.is_some() => ("conv2d_gemm", gemm(&g, target)?),
            KernelSpec::Gemm(g) => ("gemm", gemm(&g, target)?),
            KernelSpec::SumPartials(n) => ("sum_partials", sum_partials(n, target)?),
            KernelSpec::Gather(g) => ("gather", gather(&g, target)?),
            KernelSpec::Spline(c) => ("spline", spline(&c, target)?),
        };
        out.push(KernelSource {
            name: format!("k{k:03}_{kind}"),
            source: src,
        });
    }
    Ok(out)
}

/// A kernel specialization of a plan (what its source depends on).
#[derive(Debug, Clone)]
pub enum KernelSpec {
    Fused {
        program: FusedProgram,
        inputs: usize,
    },
    Gemm(GemmConfig),
    SumPartials(usize),
    Gather(GatherConfig),
    Spline(SplineConfig),
}
