//! The source code CubeCL generates for a plan's kernels — CUDA C++ and WGSL — produced
//! without a device (`snfc compile --emit cuda,wgsl`).

use super::kernels::{self, FusedProgram, Im2col};
use super::matmul::Product;
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

/// The source of one im2col gather.
pub fn im2col(c: &Im2col, target: Target) -> Result<String, String> {
    let mut b = builder(target);
    let arg = ArrayCompilationArg { inplace: None };
    let x = <Array<f32> as LaunchArg>::expand(&arg, &mut b);
    let out = <Array<f32> as LaunchArg>::expand_output(&arg, &mut b);
    kernels::im2col_matrix::expand(&mut b.scope, x, out, c.clone());
    compile(b.build(settings("im2col")), target)
}

/// A matrix product's entry: cubek-matmul picks its kernel (tile sizes, tensor cores) from
/// the device at the first launch, so there is no source before a device runs it.
fn product(p: &Product) -> String {
    format!(
        "// cubek-matmul: out[s] = A[s]·B[s], s < {}, A {}x{} (strides {:?}), B {}x{} \
         (strides {:?}), out contiguous; kernel chosen on the device at first launch\n",
        p.batch, p.m, p.k, p.a_strides, p.k, p.n, p.b_strides
    )
}

/// A whole-tensor sum's last pass: a cubek-reduce kernel, chosen on the device.
fn reduce(rows: usize, cols: usize, axis: Option<usize>) -> String {
    let what = match axis {
        None => "out[0] = the sum of every value".to_string(),
        Some(0) => format!("out[c] = sum over the {rows} rows of column c ({cols} outputs)"),
        Some(_) => format!("out[r] = sum over the {cols} columns of row r ({rows} outputs)"),
    };
    format!("// cubek-reduce of [{rows} x {cols}]: {what}, one cube per output; kernel built on the device\n")
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

/// The hand-written kernels of an n × n inverse (`with_x`) or log-determinant by blocked
/// Gauss–Jordan elimination: the copy into scratch, then per panel of b columns the panel's
/// elimination (one cube) and, after the cubek-matmul product of its row operations with its
/// pivot rows, the update.
pub fn gauss_jordan(n: usize, with_x: bool, target: Target) -> Result<String, String> {
    use super::gauss_jordan::{gj_combine, gj_init, gj_panel, PANEL};
    let arg = ArrayCompilationArg { inplace: None };
    let mut b = builder(target);
    let mut a = array_args(&mut b, 1).into_iter();
    let input = a.next().expect("one");
    let [a_, x, ld] = [(); 3].map(|_| <Array<f32> as LaunchArg>::expand_output(&arg, &mut b));
    gj_init::expand(&mut b.scope, input, a_, x, ld, n, with_x);
    let init = compile(b.build(settings("gauss_jordan_init")), target)?;

    let mut b = builder(target);
    let [a_, x] = [(); 2].map(|_| <Array<f32> as LaunchArg>::expand(&arg, &mut b));
    let [panel, ops] = [(); 2].map(|_| <Array<f32> as LaunchArg>::expand_output(&arg, &mut b));
    let src = <Array<u32> as LaunchArg>::expand_output(&arg, &mut b);
    let [rows, ld] = [(); 2].map(|_| <Array<f32> as LaunchArg>::expand_output(&arg, &mut b));
    let [k, bk] = [(); 2].map(|_| <u32 as LaunchArg>::expand(&(), &mut b));
    gj_panel::expand(
        &mut b.scope,
        a_,
        x,
        panel,
        ops,
        src,
        rows,
        ld,
        k,
        bk,
        n,
        with_x,
    );
    let panel = compile(b.build(settings("gauss_jordan_panel")), target)?;

    let mut b = builder(target);
    let [a_, x, t] = [(); 3].map(|_| <Array<f32> as LaunchArg>::expand(&arg, &mut b));
    let src = <Array<u32> as LaunchArg>::expand(&arg, &mut b);
    let [a_next, x_next] = [(); 2].map(|_| <Array<f32> as LaunchArg>::expand_output(&arg, &mut b));
    gj_combine::expand(&mut b.scope, a_, x, t, src, a_next, x_next, n, with_x);
    let combine = compile(b.build(settings("gauss_jordan_combine")), target)?;
    let what = if with_x { "inverse" } else { "log-determinant" };
    let panels = n.div_ceil(PANEL);
    Ok(format!(
        "// {what} of a {n}x{n} matrix: gauss_jordan_init once, then for each of the {panels} \
         panels of {PANEL} columns gauss_jordan_panel, a cubek-matmul product in f32 and \
         gauss_jordan_combine\n{init}\n{panel}\n{combine}"
    ))
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
            KernelSpec::Matmul { product: p, what } => (what, product(&p)),
            KernelSpec::Im2col(c) => ("im2col", im2col(&c, target)?),
            KernelSpec::Reduce { rows, cols, axis } => ("reduce", reduce(rows, cols, axis)),
            KernelSpec::Gather(g) => ("gather", gather(&g, target)?),
            KernelSpec::Spline(c) => ("spline", spline(&c, target)?),
            KernelSpec::GaussJordan { n, inverse } => {
                ("gauss_jordan", gauss_jordan(n, inverse, target)?)
            }
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
    /// A cubek-matmul product, named by what it computes.
    Matmul {
        product: Product,
        what: &'static str,
    },
    Im2col(Im2col),
    /// A cubek-reduce sum (see `Launch::Reduce`).
    Reduce {
        rows: usize,
        cols: usize,
        axis: Option<usize>,
    },
    Gather(GatherConfig),
    Spline(SplineConfig),
    /// An n × n inverse (or, when not `inverse`, log-determinant) by Gauss–Jordan.
    GaussJordan {
        n: usize,
        inverse: bool,
    },
}
