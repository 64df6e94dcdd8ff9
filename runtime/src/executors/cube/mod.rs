//! GPU backends: a [`Plan`] executed with CubeCL kernels, on CUDA (`cubecl-cuda`, NVRTC) or on
//! any GPU through wgpu (and, for checking kernels on a CPU, Mesa's lavapipe).
//!
//! Every fused group and every remaining elementwise, broadcast or sum instruction becomes one
//! specialization of the generic [`kernels::fused`] kernel; GEMMs run [`kernels::gemm`] with
//! their epilogue; the ops that only move, repeat, sum or scale elements (permute, expand,
//! reduce_sum, flip_kernel, toeplitz and its adjoint, multiplicity) run one
//! [`tensor_kernels::gather`] kernel through an index table built from the shapes; convolutions,
//! kernel gradients and splines have kernels of their own ([`tensor_kernels`]); inverses and
//! log-determinants (only in exact-gradient and evaluation plans,
//! O(D³) and rare) run on the host by LU and are copied back. Buffers follow the plan's static
//! assignment; parameters and Adam moments stay resident on the device between steps.

pub mod index_tables;
pub mod kernels;
pub mod probe;
pub mod source;
pub mod tensor_kernels;

use crate::executors::adam::AdamState;
use crate::executors::linalg;
use crate::executors::values::{ExecError, Tensor};
use crate::profile::{Profile, ProfileRow, Work};
use cubecl::prelude::*;
use cubecl::server::Handle;
use index_tables::IndexTable;
use kernels::{Access, FusedProgram, GemmConfig, KOp, Mode, Store};
use snfc_compiler::ir::{Op, SplinePart};
use snfc_compiler::plan::{numel, FusedKernel, Instr, Plan, Src};
use std::collections::{BTreeMap, HashMap};
use tensor_kernels as kernels_t;
use tensor_kernels::{GatherConfig, SplineConfig, SplineOut};

/// Where a kernel argument lives at run time.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Buf {
    /// The storage of a plan slot (a plan buffer, a fed tensor or a constant).
    Slot(usize),
    /// A scratch buffer of the program (partial sums, split reductions).
    Temp(usize),
}

/// One launch of the compiled program.
#[derive(Debug, Clone)]
enum Launch {
    Fused {
        program: FusedProgram,
        inputs: Vec<Buf>,
        outputs: Vec<Buf>,
    },
    SumPartials {
        n: usize,
        from: Buf,
        to: Buf,
    },
    Gemm {
        config: GemmConfig,
        args: Vec<Buf>,
        out: Buf,
    },
    /// An index op through its table (`tables[table]`).
    Gather {
        config: GatherConfig,
        table: usize,
        input: Buf,
        out: Buf,
    },
    /// A spline value, log-det or VJP: operands x, widths, heights, derivatives, and the
    /// cotangents of the value and of the log-det.
    Spline {
        config: SplineConfig,
        args: [Buf; 6],
        out: Buf,
    },
    /// Inverse or log-determinant on the host (LU in f64).
    HostLinalg {
        slot: usize,
        op: Op,
        arg: Buf,
    },
}

/// A plan compiled for one CubeCL runtime: launches, buffers and resident tensors.
pub struct GpuProgram<R: Runtime> {
    client: ComputeClient<R>,
    plan: Plan,
    launches: Vec<Launch>,
    buffers: Vec<Handle>,
    temps: Vec<Handle>,
    /// Index tables of the gather launches: `ptr`, `idx`, weights (or `None`).
    tables: Vec<(Handle, Handle, Option<Handle>)>,
    /// Fed tensors (inputs and parameters) and constants, by storage slot.
    leaves: HashMap<usize, Handle>,
    /// Adam moments per parameter name.
    moments: HashMap<String, (Handle, Handle)>,
    adam_t: i32,
    /// Seconds and launches per kernel kind, when profiling (each launch is then waited for).
    profile: Option<Profile>,
}

fn f32_bits(v: f64) -> u32 {
    (v as f32).to_bits()
}

impl<R: Runtime> GpuProgram<R> {
    /// Compile `plan` for `client` (kernels are JIT-compiled at their first launch).
    pub fn new(client: ComputeClient<R>, plan: Plan) -> GpuProgram<R> {
        Self::with_staging(client, plan, true)
    }

    /// [`new`](Self::new), choosing whether GEMMs stage operands in shared memory (`false`
    /// for CPU adapters such as lavapipe).
    pub fn with_staging(client: ComputeClient<R>, plan: Plan, staged: bool) -> GpuProgram<R> {
        let Lowered {
            launches,
            temps,
            tables,
        } = lower_plan(&plan, staged);
        let tables = tables
            .iter()
            .map(|t| {
                (
                    client.create_from_slice(u32::as_bytes(&t.ptr)),
                    client.create_from_slice(u32::as_bytes(&t.idx)),
                    t.weight
                        .as_ref()
                        .map(|w| client.create_from_slice(f32::as_bytes(w))),
                )
            })
            .collect();
        let buffers = plan
            .buffers
            .sizes
            .iter()
            .map(|n| client.empty(n * 4))
            .collect();
        let temps = temps.iter().map(|n| client.empty(n.max(&1) * 4)).collect();
        let mut leaves = HashMap::new();
        for (s, ins) in plan.instrs.iter().enumerate() {
            if let Some(v) = ins.op.const_value() {
                leaves.insert(s, client.create_from_slice(f32::as_bytes(&[v as f32])));
            }
        }
        GpuProgram {
            client,
            plan,
            launches,
            buffers,
            temps,
            tables,
            leaves,
            moments: HashMap::new(),
            adam_t: 0,
            profile: None,
        }
    }

    /// Fill every buffer with NaN, so that an element a kernel fails to write shows in the
    /// outputs (the backend test suite's "every element written" check).
    pub fn poison(&mut self) {
        let fill = |client: &ComputeClient<R>, h: &Handle| {
            let n = h.size() as usize / 4;
            client.create_from_slice(f32::as_bytes(&vec![f32::NAN; n]))
        };
        self.buffers = self.buffers.iter().map(|h| fill(&self.client, h)).collect();
        self.temps = self.temps.iter().map(|h| fill(&self.client, h)).collect();
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Kernel launches per run.
    pub fn kernels(&self) -> usize {
        self.launches
            .iter()
            .filter(|l| !matches!(l, Launch::HostLinalg { .. }))
            .count()
    }

    /// Upload a fed tensor (an input or a parameter, by name); it stays until replaced. A
    /// name the plan does not read (noise for a plan without dequantization) is ignored, as
    /// the host executor ignores unused feeds.
    pub fn set(&mut self, name: &str, data: &[f32]) -> Result<(), ExecError> {
        for (s, ins) in self.plan.instrs.iter().enumerate() {
            if let Op::Input { name: n, shape } | Op::Param { name: n, shape } = &ins.op {
                if n == name {
                    if data.len() != shape.iter().product::<usize>() {
                        return Err(ExecError::BadShape {
                            graph: self.plan.name.clone(),
                            kind: kind_of(&ins.op),
                            name: name.to_string(),
                            got: data.len(),
                            shape: shape.clone(),
                        });
                    }
                    // An empty tensor (a one-bin spline's derivatives) still binds a buffer.
                    let data = if data.is_empty() { &[0.0][..] } else { data };
                    self.leaves
                        .insert(s, self.client.create_from_slice(f32::as_bytes(data)));
                }
            }
        }
        Ok(())
    }

    fn handle(&self, b: Buf) -> Result<Handle, ExecError> {
        match b {
            Buf::Temp(t) => Ok(self.temps[t].clone()),
            Buf::Slot(s) => {
                let st = self.plan.storage_slot(s);
                if let Some(b) = self.plan.buffers.of_slot[st] {
                    return Ok(self.buffers[b].clone());
                }
                self.leaves.get(&st).cloned().ok_or_else(|| {
                    let ins = &self.plan.instrs[st];
                    let name = match &ins.op {
                        Op::Input { name, .. } | Op::Param { name, .. } => name.clone(),
                        op => op.to_string(),
                    };
                    ExecError::Missing {
                        graph: self.plan.name.clone(),
                        kind: kind_of(&ins.op),
                        name,
                    }
                })
            }
        }
    }

    /// Replace the stored values of the named outputs by `f` of all of them packed into one
    /// host buffer (in their stored layout, the same on every rank of a data-parallel run): one
    /// read-back of every buffer, `f` (the all-reduce), one upload per buffer, which then
    /// serves the next run in place of the old one.
    pub fn map_outputs(
        &mut self,
        names: &[String],
        f: impl FnOnce(&mut Vec<f32>),
    ) -> Result<(), ExecError> {
        let slots: Vec<usize> = names
            .iter()
            .map(|n| Ok(self.plan.storage_slot(self.output_slot(n)?)))
            .collect::<Result<_, ExecError>>()?;
        let handles: Vec<Handle> = slots
            .iter()
            .map(|&s| self.handle(Buf::Slot(s)))
            .collect::<Result<_, _>>()?;
        let mut whole: Vec<Vec<f32>> = self
            .client
            .read(handles)
            .iter()
            .map(|b| f32::from_bytes(b).to_vec())
            .collect();
        let lens: Vec<usize> = slots
            .iter()
            .map(|&s| numel(&self.plan.instrs[s].shape))
            .collect();
        let mut packed = Vec::with_capacity(lens.iter().sum());
        for (values, &n) in whole.iter().zip(&lens) {
            packed.extend_from_slice(&values[..n]);
        }
        f(&mut packed);
        let mut at = 0;
        for ((values, &n), &s) in whole.iter_mut().zip(&lens).zip(&slots) {
            values[..n].copy_from_slice(&packed[at..at + n]);
            at += n;
            let handle = self.client.create_from_slice(f32::as_bytes(values));
            match self.plan.buffers.of_slot[s] {
                Some(b) => self.buffers[b] = handle,
                None => {
                    self.leaves.insert(s, handle);
                }
            }
        }
        Ok(())
    }

    fn len_of(&self, b: Buf) -> usize {
        match b {
            Buf::Temp(t) => self.temps[t].size() as usize / 4,
            Buf::Slot(s) => numel(&self.plan.instrs[s].shape),
        }
    }

    /// Launch every kernel of the plan once.
    pub fn run(&mut self) -> Result<(), ExecError> {
        let launches = std::mem::take(&mut self.launches);
        let result = self.run_launches(&launches);
        self.launches = launches;
        result
    }

    /// Time every launch from now on (synchronizing after each: slower, but per kernel).
    pub fn enable_profile(&mut self) {
        self.profile = Some(Profile::default());
    }

    /// Seconds and launches per kernel kind since [`enable_profile`](Self::enable_profile).
    pub fn profile(&self) -> Vec<ProfileRow> {
        self.profile.as_ref().map(Profile::rows).unwrap_or_default()
    }

    fn run_launches(&mut self, launches: &[Launch]) -> Result<(), ExecError> {
        for l in launches {
            let started = if self.profile.is_some() {
                self.sync()?;
                Some(std::time::Instant::now())
            } else {
                None
            };
            self.launch(l)?;
            if let Some(t) = started {
                self.sync()?;
                if let Some(p) = self.profile.as_mut() {
                    p.add(launch_work(l), launch_kind(l), t);
                }
            }
        }
        Ok(())
    }

    fn launch(&mut self, l: &Launch) -> Result<(), ExecError> {
        {
            match l {
                Launch::Fused {
                    program,
                    inputs,
                    outputs,
                } => {
                    let units = match program.mode {
                        Mode::Elements => program.rows * program.cols,
                        Mode::Columns => program.cols,
                        Mode::Rows => program.rows,
                    };
                    let mut ins = SequenceArg::<R, Array<f32>>::new();
                    for b in inputs {
                        let h = self.handle(*b)?;
                        ins.push(unsafe { ArrayArg::from_raw_parts(h, self.len_of(*b)) });
                    }
                    let mut outs = SequenceArg::<R, Array<f32>>::new();
                    for b in outputs {
                        let h = self.handle(*b)?;
                        outs.push(unsafe { ArrayArg::from_raw_parts(h, self.len_of(*b)) });
                    }
                    let (count, dim) = grid_1d(units);
                    kernels::fused::launch::<R>(
                        &self.client,
                        count,
                        dim,
                        ins,
                        outs,
                        program.clone(),
                    );
                }
                Launch::SumPartials { n, from, to } => {
                    let (f, t) = (self.handle(*from)?, self.handle(*to)?);
                    kernels::sum_partials::launch::<R>(
                        &self.client,
                        CubeCount::Static(1, 1, 1),
                        CubeDim::new_1d(1),
                        unsafe { ArrayArg::from_raw_parts(f, *n) },
                        unsafe { ArrayArg::from_raw_parts(t, 1) },
                        *n,
                    );
                }
                Launch::Gemm { config, args, out } => {
                    let a = self.handle(args[0])?;
                    let b = self.handle(args[1])?;
                    // Without an epilogue `c` is never read; any buffer binds.
                    let c = match args.get(2) {
                        Some(c) => self.handle(*c)?,
                        None => a.clone(),
                    };
                    let o = self.handle(*out)?;
                    let t = kernels::TILE as u32;
                    let count = CubeCount::Static(
                        (config.n as u32).div_ceil(t),
                        (config.m as u32).div_ceil(t),
                        config.split_k as u32,
                    );
                    let units = kernels::UNITS as u32;
                    let c_len = if args.len() > 2 {
                        config.m * config.n
                    } else {
                        config.m * config.k
                    };
                    let b_len = match &config.im2col {
                        Some(c) => c.ci * c.h * c.w * c.b,
                        None => config.k * config.n,
                    };
                    // SAFETY: every access is guarded by the matrix bounds (i < m, j < n,
                    // p + kk < k; an im2col gather also by the image bounds) and the arrays
                    // have exactly the lengths given here.
                    unsafe {
                        kernels::gemm::launch_unchecked::<R>(
                            &self.client,
                            count,
                            CubeDim::new_2d(units, units),
                            ArrayArg::from_raw_parts(a, config.m * config.k),
                            ArrayArg::from_raw_parts(b, b_len),
                            ArrayArg::from_raw_parts(c, c_len),
                            ArrayArg::from_raw_parts(o, config.m * config.n * config.split_k),
                            config.clone(),
                        )
                    };
                }
                Launch::Gather {
                    config,
                    table,
                    input,
                    out,
                } => {
                    let (ptr, idx, weight) = self.tables[*table].clone();
                    let x = self.handle(*input)?;
                    let n_idx = idx.size() as usize / 4;
                    let weight = weight.unwrap_or_else(|| idx.clone());
                    let (count, dim) = grid_1d(config.outputs);
                    kernels_t::gather::launch::<R>(
                        &self.client,
                        count,
                        dim,
                        unsafe { ArrayArg::from_raw_parts(x, self.len_of(*input)) },
                        unsafe { ArrayArg::from_raw_parts(ptr, config.outputs + 1) },
                        unsafe { ArrayArg::from_raw_parts(idx, n_idx) },
                        unsafe { ArrayArg::from_raw_parts(weight, n_idx) },
                        unsafe { ArrayArg::from_raw_parts(self.handle(*out)?, self.len_of(*out)) },
                        config.clone(),
                    );
                }
                Launch::Spline { config, args, out } => {
                    let units = match config.out {
                        SplineOut::GradParam(3) => config.d * (config.bins - 1),
                        SplineOut::GradParam(_) => config.d * config.bins,
                        _ => config.d * config.n,
                    };
                    let (count, dim) = grid_1d(units);
                    let arg = |b: Buf| -> Result<ArrayArg<R>, ExecError> {
                        Ok(unsafe { ArrayArg::from_raw_parts(self.handle(b)?, self.len_of(b)) })
                    };
                    kernels_t::spline::launch::<R>(
                        &self.client,
                        count,
                        dim,
                        arg(args[0])?,
                        arg(args[1])?,
                        arg(args[2])?,
                        arg(args[3])?,
                        arg(args[4])?,
                        arg(args[5])?,
                        arg(*out)?,
                        config.clone(),
                    );
                }
                Launch::HostLinalg { slot, op, arg } => {
                    let x = self.read_buf(*arg)?;
                    // The operand is square, n × n.
                    let n = self.plan.instrs[self.plan.instrs[*slot].args[0]].shape[0];
                    let x64: Vec<f64> = x.iter().map(|v| *v as f64).collect();
                    let result: Vec<f32> = if *op == Op::LogDet {
                        vec![linalg::slogdet(&x64, n).1 as f32]
                    } else {
                        linalg::inverse(&x64, n)
                            .map_err(|source| ExecError::Linalg {
                                graph: self.plan.name.clone(),
                                node: *slot,
                                op: op.to_string(),
                                source,
                            })?
                            .iter()
                            .map(|v| *v as f32)
                            .collect()
                    };
                    let b = self.plan.buffers.of_slot[*slot].expect("a computed value");
                    self.buffers[b] = self.client.create_from_slice(f32::as_bytes(&result));
                }
            }
        }
        Ok(())
    }

    /// A slot's value in its logical (row-major) layout.
    fn read_buf(&self, b: Buf) -> Result<Vec<f32>, ExecError> {
        let data = self.read_handle(self.handle(b)?, self.len_of(b))?;
        match b {
            Buf::Slot(s) if transposed(&self.plan, s) => {
                let shape = &self.plan.instrs[s].shape;
                let (r, c) = (shape[0], shape[1]);
                // The buffer is the row-major c × r transpose.
                let mut out = vec![0.0; r * c];
                for i in 0..r {
                    for j in 0..c {
                        out[i * c + j] = data[j * r + i];
                    }
                }
                Ok(out)
            }
            _ => Ok(data),
        }
    }

    /// The slot of a plan output, by name.
    fn output_slot(&self, name: &str) -> Result<usize, ExecError> {
        self.plan
            .outputs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, s)| *s)
            .ok_or_else(|| ExecError::Missing {
                graph: self.plan.name.clone(),
                kind: "output",
                name: name.to_string(),
            })
    }

    /// A plan output by name.
    pub fn output(&self, name: &str) -> Result<Tensor<f32>, ExecError> {
        let slot = self.output_slot(name)?;
        Ok(Tensor {
            shape: self.plan.instrs[slot].shape.clone(),
            data: self.read_buf(Buf::Slot(slot))?,
        })
    }

    /// The first value of each named output, read back together (one device round trip).
    pub fn scalars(&self, names: &[String]) -> Result<Vec<f64>, ExecError> {
        let mut handles = Vec::with_capacity(names.len());
        for name in names {
            handles.push(self.handle(Buf::Slot(self.output_slot(name)?))?);
        }
        let read = self.client.read(handles);
        if read.len() != names.len() {
            return Err(ExecError::Device {
                graph: self.plan.name.clone(),
                message: format!("read back {} of {} outputs", read.len(), names.len()),
            });
        }
        read.iter()
            .zip(names)
            .map(|(bytes, name)| {
                f32::from_bytes(bytes)
                    .first()
                    .map(|&v| f64::from(v))
                    .ok_or_else(|| ExecError::Device {
                        graph: self.plan.name.clone(),
                        message: format!("output `{name}` read back empty"),
                    })
            })
            .collect()
    }

    /// Every output, in plan order.
    pub fn outputs(&self) -> Result<Vec<(String, Tensor<f32>)>, ExecError> {
        self.plan
            .outputs
            .iter()
            .map(|(n, _)| Ok((n.clone(), self.output(n)?)))
            .collect()
    }

    /// A fed tensor's current value (a parameter after device-side updates).
    pub fn fed(&self, name: &str) -> Result<Vec<f32>, ExecError> {
        let slot = self
            .plan
            .instrs
            .iter()
            .position(|i| matches!(&i.op, Op::Param { name: n, .. } | Op::Input { name: n, .. } if n == name))
            .ok_or_else(|| ExecError::Missing {
                graph: self.plan.name.clone(),
                kind: "param",
                name: name.to_string(),
            })?;
        self.read_buf(Buf::Slot(slot))
    }

    /// One Adam step on the device for every parameter with a `grad.<name>` output, with the
    /// gradients the last [`run`](Self::run) left in their buffers.
    pub fn adam_step(
        &mut self,
        lr: &crate::executors::adam::LearningRates,
        betas: [f64; 2],
        eps: f64,
        grad_scale: f64,
    ) -> Result<(), ExecError> {
        if self.profile.is_none() {
            return self.adam_launches(lr, betas, eps, grad_scale);
        }
        self.sync()?;
        let started = std::time::Instant::now();
        self.adam_launches(lr, betas, eps, grad_scale)?;
        self.sync()?;
        if let Some(p) = self.profile.as_mut() {
            p.add(Work::Adam, "adam update", started);
        }
        Ok(())
    }

    fn adam_launches(
        &mut self,
        lr: &crate::executors::adam::LearningRates,
        betas: [f64; 2],
        eps: f64,
        grad_scale: f64,
    ) -> Result<(), ExecError> {
        self.adam_t += 1;
        let t = self.adam_t;
        let c1 = 1.0 - betas[0].powi(t);
        let c2 = 1.0 - betas[1].powi(t);
        let c2s = (1.0 / c2.sqrt()) as f32;
        let grads: Vec<(String, usize)> = self
            .plan
            .outputs
            .iter()
            .filter_map(|(n, s)| n.strip_prefix("grad.").map(|p| (p.to_string(), *s)))
            .collect();
        for (param, gslot) in grads {
            let Some(pslot) = self.param_slot(&param) else {
                continue;
            };
            if transposed(&self.plan, gslot) {
                return Err(ExecError::Device {
                    graph: self.plan.name.clone(),
                    message: format!("gradient of `{param}` is stored transposed"),
                });
            }
            let n = numel(&self.plan.instrs[pslot].shape);
            let p = self.handle(Buf::Slot(pslot))?;
            let g = self.handle(Buf::Slot(gslot))?;
            let client = self.client.clone();
            let (m, v) = self
                .moments
                .entry(param.clone())
                .or_insert_with(|| {
                    let zeros = vec![0f32; n];
                    (
                        client.create_from_slice(f32::as_bytes(&zeros)),
                        client.create_from_slice(f32::as_bytes(&zeros)),
                    )
                })
                .clone();
            let step = (lr.of(&param) / c1) as f32;
            let (count, dim) = grid_1d(n);
            kernels::adam::launch::<R>(
                &self.client,
                count,
                dim,
                unsafe { ArrayArg::from_raw_parts(p, n) },
                unsafe { ArrayArg::from_raw_parts(g, n) },
                unsafe { ArrayArg::from_raw_parts(m, n) },
                unsafe { ArrayArg::from_raw_parts(v, n) },
                step,
                c2s,
                grad_scale as f32,
                f32_bits(betas[0]),
                f32_bits(betas[1]),
                f32_bits(eps),
                n,
            );
        }
        Ok(())
    }

    /// Σ g² of every `grad.<name>` output of the last run, per parameter name, reduced on the
    /// device to one partial per 256 values; only the partials are read back (summed in f64).
    pub fn grad_sum_squares(&mut self) -> Result<Vec<(String, f64)>, ExecError> {
        const CHUNK: usize = 256;
        let grads: Vec<(String, usize)> = self
            .plan
            .outputs
            .iter()
            .filter_map(|(n, s)| n.strip_prefix("grad.").map(|p| (p.to_string(), *s)))
            .collect();
        let mut pending = Vec::with_capacity(grads.len());
        for (name, slot) in grads {
            let n = numel(&self.plan.instrs[slot].shape);
            let units = n.div_ceil(CHUNK).max(1);
            let partials = self.client.empty(units * 4);
            if n > 0 {
                let g = self.handle(Buf::Slot(slot))?;
                let (count, dim) = grid_1d(units);
                kernels::sum_squares_partials::launch::<R>(
                    &self.client,
                    count,
                    dim,
                    unsafe { ArrayArg::from_raw_parts(g, n) },
                    unsafe { ArrayArg::from_raw_parts(partials.clone(), units) },
                    n,
                    CHUNK,
                );
            }
            pending.push((name, partials, units, n));
        }
        pending
            .into_iter()
            .map(|(name, h, units, n)| {
                let sum = if n == 0 {
                    0.0
                } else {
                    self.read_handle(h, units)?.iter().map(|&v| v as f64).sum()
                };
                Ok((name, sum))
            })
            .collect()
    }

    /// Adam's step count and moments, read back from the device.
    pub fn adam_state(&self) -> Result<AdamState<f32>, ExecError> {
        let mut moments = BTreeMap::new();
        for (name, (m, v)) in &self.moments {
            let n = self.param_len(name)?;
            moments.insert(
                name.clone(),
                (
                    self.read_handle(m.clone(), n)?,
                    self.read_handle(v.clone(), n)?,
                ),
            );
        }
        Ok(AdamState {
            t: self.adam_t,
            moments,
        })
    }

    /// Continue from a saved Adam state: its moments are uploaded.
    pub fn set_adam_state(&mut self, state: &AdamState<f32>) -> Result<(), ExecError> {
        let mut moments = HashMap::new();
        for (name, (m, v)) in &state.moments {
            let n = self.param_len(name)?;
            if m.len() != n || v.len() != n {
                return Err(ExecError::Device {
                    graph: self.plan.name.clone(),
                    message: format!(
                        "Adam moments of `{name}` have {} and {} values, the parameter {n}",
                        m.len(),
                        v.len()
                    ),
                });
            }
            moments.insert(
                name.clone(),
                (
                    self.client.create_from_slice(f32::as_bytes(m)),
                    self.client.create_from_slice(f32::as_bytes(v)),
                ),
            );
        }
        self.moments = moments;
        self.adam_t = state.t;
        Ok(())
    }

    /// The plan slot of parameter `name`.
    fn param_slot(&self, name: &str) -> Option<usize> {
        self.plan
            .instrs
            .iter()
            .position(|i| matches!(&i.op, Op::Param { name: n, .. } if n == name))
    }

    /// The number of values of parameter `name`.
    fn param_len(&self, name: &str) -> Result<usize, ExecError> {
        self.param_slot(name)
            .map(|s| numel(&self.plan.instrs[s].shape))
            .ok_or_else(|| ExecError::Missing {
                graph: self.plan.name.clone(),
                kind: "param",
                name: name.to_string(),
            })
    }

    /// The first `len` f32 values of a device buffer.
    fn read_handle(&self, h: Handle, len: usize) -> Result<Vec<f32>, ExecError> {
        let bytes = self.client.read_one(h).map_err(|e| ExecError::Device {
            graph: self.plan.name.clone(),
            message: format!("{e:?}"),
        })?;
        let values = f32::from_bytes(&bytes);
        if values.len() < len {
            return Err(ExecError::Device {
                graph: self.plan.name.clone(),
                message: format!("read back {} values from a buffer of {len}", values.len()),
            });
        }
        Ok(values[..len].to_vec())
    }

    /// Wait for every launched kernel (for timing).
    pub fn sync(&self) -> Result<(), ExecError> {
        cubecl::future::block_on(self.client.sync()).map_err(|e| ExecError::Device {
            graph: self.plan.name.clone(),
            message: format!("{e:?}"),
        })
    }

    /// The kernel specializations a plan launches, in order (for `--emit cuda,wgsl`).
    pub fn kernel_specs(plan: &Plan) -> Vec<source::KernelSpec> {
        lower_plan(plan, true)
            .launches
            .into_iter()
            .filter_map(|l| match l {
                Launch::Fused {
                    program, inputs, ..
                } => Some(source::KernelSpec::Fused {
                    program,
                    inputs: inputs.len(),
                }),
                Launch::Gemm { config, .. } => Some(source::KernelSpec::Gemm(config)),
                Launch::SumPartials { n, .. } => Some(source::KernelSpec::SumPartials(n)),
                Launch::Gather { config, .. } => Some(source::KernelSpec::Gather(config)),
                Launch::Spline { config, .. } => Some(source::KernelSpec::Spline(config)),
                Launch::HostLinalg { .. } => None,
            })
            .collect()
    }
}

/// The first op of `plan` that the GPU backends have no kernel for (none today: kept so that
/// an op added to the IR without a kernel is refused by name rather than miscomputed).
pub fn unsupported_op(plan: &Plan) -> Option<&Op> {
    plan.instrs
        .iter()
        .filter(|i| i.group.is_none() && i.is_kernel())
        .map(|i| &i.op)
        .find(|op| {
            !(op.is_elementwise()
                || index_tables::is_index_op(op)
                || matches!(
                    op,
                    Op::MatMul
                        | Op::Inverse
                        | Op::LogDet
                        | Op::Sum { .. }
                        | Op::Broadcast { .. }
                        | Op::Reshape { .. }
                        | Op::Conv2d
                        | Op::ConvKernelGrad { .. }
                        | Op::Spline { .. }
                        | Op::SplineGrad { .. }
                ))
        })
}

/// A plan lowered to launches: the launches in order, the sizes of their scratch buffers and
/// the index tables of their gathers.
struct Lowered {
    launches: Vec<Launch>,
    temps: Vec<usize>,
    tables: Vec<IndexTable>,
}

/// The most entries one unit of a gather sums; longer sums (a bias gradient over H·W·B
/// positions) take two passes.
const GATHER_CHUNK: usize = 256;

impl Lowered {
    fn gather(&mut self, table: IndexTable, input: Buf, out: Buf) {
        self.launches.push(Launch::Gather {
            config: GatherConfig {
                outputs: table.outputs(),
                weighted: table.weight.is_some(),
            },
            table: self.tables.len(),
            input,
            out,
        });
        self.tables.push(table);
    }

    fn temp(&mut self, len: usize) -> Buf {
        self.temps.push(len);
        Buf::Temp(self.temps.len() - 1)
    }

    /// `slot` in row-major layout: a transposed view is copied into a scratch buffer first.
    fn contiguous(&mut self, plan: &Plan, slot: usize) -> Buf {
        if !transposed(plan, slot) {
            return Buf::Slot(slot);
        }
        let shape = &plan.instrs[slot].shape;
        let (rows, cols) = (shape[0], shape[1]);
        let t = self.temp(rows * cols);
        self.launches.push(Launch::Fused {
            program: FusedProgram {
                mode: Mode::Elements,
                rows,
                cols,
                ops: vec![KOp::Load(0, Access::ElemT)],
                outputs: vec![(0, Store::Elem)],
            },
            inputs: vec![Buf::Slot(slot)],
            outputs: vec![t],
        });
        t
    }
}

/// Every launch of a plan, in order, the sizes of the scratch buffers and the index tables.
fn lower_plan(plan: &Plan, staged: bool) -> Lowered {
    let mut low = Lowered {
        launches: Vec::new(),
        temps: Vec::new(),
        tables: Vec::new(),
    };
    for &i in &plan.order {
        let ins = &plan.instrs[i];
        let operand_shape = |j: usize| plan.instrs[ins.args[j]].shape.clone();
        match (&ins.group, &ins.op) {
            (Some(group), _) => lower_fused(
                plan,
                ins,
                &group.kernel,
                &group.slots,
                &mut low.temps,
                &mut low.launches,
            ),
            (None, Op::MatMul) => {
                let t = |s: usize| transposed(plan, s);
                let (m, k) = (ins.shape[0], plan.instrs[ins.args[0]].shape[1]);
                let config = GemmConfig {
                    m,
                    n: ins.shape[1],
                    k,
                    a_t: t(ins.args[0]),
                    b_t: t(ins.args[1]),
                    epilogue: ins
                        .epilogue
                        .map(|e| (f32_bits(e.alpha), f32_bits(e.beta), t(ins.args[2]))),
                    staged,
                    im2col: None,
                    split_k: 1,
                };
                low.launches.push(Launch::Gemm {
                    config,
                    args: ins.args.iter().map(|a| Buf::Slot(*a)).collect(),
                    out: Buf::Slot(i),
                });
            }
            (None, Op::Inverse | Op::LogDet) => low.launches.push(Launch::HostLinalg {
                slot: i,
                op: ins.op.clone(),
                arg: Buf::Slot(ins.args[0]),
            }),
            (None, Op::Reshape { .. }) => {
                // A copy in row-major order (the plan gives the result a buffer of its own).
                let input = low.contiguous(plan, ins.args[0]);
                low.launches.push(Launch::Fused {
                    program: FusedProgram {
                        mode: Mode::Elements,
                        rows: 1,
                        cols: numel(&ins.shape),
                        ops: vec![KOp::Load(0, Access::Elem)],
                        outputs: vec![(0, Store::Elem)],
                    },
                    inputs: vec![input],
                    outputs: vec![Buf::Slot(i)],
                });
            }
            (None, Op::Conv2d) => {
                let (xs, ks) = (operand_shape(0), operand_shape(1));
                let image = kernels::Im2col {
                    ci: xs[0],
                    h: xs[1],
                    w: xs[2],
                    b: xs[3],
                    k: ks[2],
                };
                let (x, kernel) = (
                    low.contiguous(plan, ins.args[0]),
                    low.contiguous(plan, ins.args[1]),
                );
                // An implicit GEMM: kernel [co, ci·k²] times the im2col view of x, gathered
                // tile by tile and never stored.
                let gemm = GemmConfig {
                    m: ks[0],
                    n: image.h * image.w * image.b,
                    k: image.ci * image.k * image.k,
                    a_t: false,
                    b_t: false,
                    epilogue: None,
                    staged,
                    im2col: Some(image),
                    split_k: 1,
                };
                low.launches.push(Launch::Gemm {
                    config: gemm,
                    args: vec![kernel, x],
                    out: Buf::Slot(i),
                });
            }
            (None, Op::ConvKernelGrad { k }) => {
                let (dys, xs) = (operand_shape(0), operand_shape(1));
                let image = kernels::Im2col {
                    ci: xs[0],
                    h: xs[1],
                    w: xs[2],
                    b: xs[3],
                    k: *k,
                };
                let (m, n) = (dys[0], xs[0] * k * k);
                let positions = dys[1] * dys[2] * dys[3];
                // The same implicit GEMM with im2col(x) transposed: dy [co, h·w·b] ·
                // im2col(x)ᵀ. Its inner dimension is every pixel of the batch and its output
                // only co × ci·k², so the pixels are split across cube layers until about
                // 256 cubes run, each summing at least 512 of them; a row sum finishes.
                let tiles = m.div_ceil(kernels::TILE) * n.div_ceil(kernels::TILE);
                let split_k = 256usize.div_ceil(tiles).clamp(1, (positions / 512).max(1));
                let gemm = GemmConfig {
                    m,
                    n,
                    k: positions,
                    a_t: false,
                    b_t: true,
                    epilogue: None,
                    staged,
                    im2col: Some(image),
                    split_k,
                };
                let (dy, x) = (
                    low.contiguous(plan, ins.args[0]),
                    low.contiguous(plan, ins.args[1]),
                );
                if split_k == 1 {
                    low.launches.push(Launch::Gemm {
                        config: gemm,
                        args: vec![dy, x],
                        out: Buf::Slot(i),
                    });
                } else {
                    let partials = low.temp(m * n * split_k);
                    low.launches.push(Launch::Gemm {
                        config: gemm,
                        args: vec![dy, x],
                        out: partials,
                    });
                    low.launches.push(Launch::Fused {
                        program: FusedProgram {
                            mode: Mode::Rows,
                            rows: m * n,
                            cols: split_k,
                            ops: vec![KOp::Load(0, Access::Elem)],
                            outputs: vec![(0, Store::LineSum)],
                        },
                        inputs: vec![partials],
                        outputs: vec![Buf::Slot(i)],
                    });
                }
            }
            (None, Op::Spline { bins, bound, part }) => {
                let xs = operand_shape(0);
                let config = SplineConfig {
                    d: xs[0],
                    n: xs[1],
                    bins: *bins,
                    bound: f32_bits(f64::from_bits(*bound)),
                    out: match part {
                        SplinePart::Value => SplineOut::Value,
                        SplinePart::LogDet | SplinePart::Both => SplineOut::LogDet,
                    },
                    g_y: false,
                    g_l: false,
                };
                let a: Vec<Buf> = (0..4).map(|j| low.contiguous(plan, ins.args[j])).collect();
                low.launches.push(Launch::Spline {
                    config,
                    // No cotangents: any bound buffer of the batch's size.
                    args: [a[0], a[1], a[2], a[3], a[0], a[0]],
                    out: Buf::Slot(i),
                });
            }
            (
                None,
                Op::SplineGrad {
                    bins,
                    bound,
                    part,
                    wrt,
                },
            ) => {
                let xs = operand_shape(0);
                let config = SplineConfig {
                    d: xs[0],
                    n: xs[1],
                    bins: *bins,
                    bound: f32_bits(f64::from_bits(*bound)),
                    out: if *wrt == 0 {
                        SplineOut::GradX
                    } else {
                        SplineOut::GradParam(*wrt)
                    },
                    g_y: *part != SplinePart::LogDet,
                    g_l: *part != SplinePart::Value,
                };
                let a: Vec<Buf> = (0..ins.args.len())
                    .map(|j| low.contiguous(plan, ins.args[j]))
                    .collect();
                // The cotangents in (g_y, g_l) order; an unread one binds x.
                let (g_y, g_l) = match part {
                    SplinePart::Value => (a[4], a[0]),
                    SplinePart::LogDet => (a[0], a[4]),
                    SplinePart::Both => (a[4], a[5]),
                };
                low.launches.push(Launch::Spline {
                    config,
                    args: [a[0], a[1], a[2], a[3], g_y, g_l],
                    out: Buf::Slot(i),
                });
            }
            (None, op) if index_tables::is_index_op(op) => {
                let table =
                    index_tables::table(op, &operand_shape(0)).expect("an index op has a table");
                let input = low.contiguous(plan, ins.args[0]);
                match table.split(GATHER_CHUNK) {
                    None => low.gather(table, input, Buf::Slot(i)),
                    Some((first, second)) => {
                        let partial = low.temp(first.outputs());
                        low.gather(first, input, partial);
                        low.gather(second, partial, Buf::Slot(i));
                    }
                }
            }
            _ => {
                if let Some(k) = snfc_compiler::plan::single_op_kernel(ins, &plan.instrs) {
                    lower_fused(plan, ins, &k, &[i], &mut low.temps, &mut low.launches);
                }
                // leaves and transposes: no kernel
            }
        }
    }
    low
}

/// A launch's category for profiles.
fn launch_work(l: &Launch) -> Work {
    match l {
        Launch::Fused { .. } | Launch::SumPartials { .. } => Work::Elementwise,
        Launch::Gemm { config, .. } if config.im2col.is_some() => Work::Conv,
        Launch::Gemm { .. } => Work::Gemm,
        Launch::Gather { .. } => Work::Shape,
        Launch::Spline { .. } => Work::Spline,
        Launch::HostLinalg { .. } => Work::Linalg,
    }
}

/// A launch's kind for profiles: the kernel and its shape.
fn launch_kind(l: &Launch) -> String {
    match l {
        Launch::Fused { program, .. } => format!(
            "fused {:?} [{} x {}] ({} ops)",
            program.mode,
            program.rows,
            program.cols,
            program.ops.len()
        ),
        Launch::SumPartials { n, .. } => format!("sum of {n} partials"),
        Launch::Gemm { config: g, .. } if g.im2col.is_some() && g.b_t => {
            let c = g.im2col.clone().unwrap_or_default();
            format!(
                "conv kernel grad as implicit gemm {}->{} {}x{} k{} b{} ({} slices)",
                c.ci, g.m, c.h, c.w, c.k, c.b, g.split_k
            )
        }
        Launch::Gemm { config: g, .. } if g.im2col.is_some() => {
            let c = g.im2col.clone().unwrap_or_default();
            format!(
                "conv2d as implicit gemm {}->{} {}x{} k{} b{}",
                c.ci, g.m, c.h, c.w, c.k, c.b
            )
        }
        Launch::Gemm { config: g, .. } => format!(
            "gemm{} {}x{}x{} ({}{})",
            if g.epilogue.is_some() { "+acc" } else { "" },
            g.m,
            g.k,
            g.n,
            if g.a_t { "T" } else { "N" },
            if g.b_t { "T" } else { "N" }
        ),
        Launch::Gather { config, .. } => format!(
            "gather{} [{}]",
            if config.weighted { " weighted" } else { "" },
            config.outputs
        ),
        Launch::Spline { config: c, .. } => format!("spline {:?} [{} x {}]", c.out, c.d, c.n),
        Launch::HostLinalg { op, .. } => format!("{op} (host LU)"),
    }
}

fn kind_of(op: &Op) -> &'static str {
    match op {
        Op::Input { .. } => "input",
        Op::Param { .. } => "param",
        _ => "value",
    }
}

/// 1-D launch grid covering `units` units, 256 per cube.
fn grid_1d(units: usize) -> (CubeCount, CubeDim) {
    let per = 256u32;
    let cubes = (units.max(1) as u32).div_ceil(per);
    (CubeCount::Static(cubes, 1, 1), CubeDim::new_1d(per))
}

/// Whether a slot's storage holds the transpose of its logical value.
fn transposed(p: &Plan, s: usize) -> bool {
    p.view(s).1
}

/// Lower one fused group (or single op) to fused-kernel launches: one launch when its
/// reductions share an axis, else an elementwise launch followed by one launch per sum.
fn lower_fused(
    plan: &Plan,
    ins: &Instr,
    k: &FusedKernel,
    slots: &[usize],
    temps: &mut Vec<usize>,
    launches: &mut Vec<Launch>,
) {
    let (rows, cols) = (k.rows, k.cols);
    let mut ops: Vec<KOp> = Vec::new();
    let mut inputs: Vec<Buf> = Vec::new();
    let mut loads: HashMap<(usize, Access), usize> = HashMap::new();
    // Register of each member.
    let mut reg: Vec<usize> = Vec::with_capacity(k.members.len());
    let mut load = |ops: &mut Vec<KOp>, e: usize, access: Access| -> usize {
        let slot = ins.args[e];
        let st = plan.storage_slot(slot);
        if let Some(v) = plan.instrs[st].op.const_value() {
            ops.push(KOp::Const(f32_bits(v)));
            return ops.len() - 1;
        }
        let access = match access {
            Access::Elem if numel(&plan.instrs[slot].shape) == 1 => Access::Scalar,
            Access::Elem if transposed(plan, slot) => Access::ElemT,
            a => a,
        };
        *loads.entry((e, access)).or_insert_with(|| {
            let pos = match inputs.iter().position(|b| *b == Buf::Slot(slot)) {
                Some(p) => p,
                None => {
                    inputs.push(Buf::Slot(slot));
                    inputs.len() - 1
                }
            };
            ops.push(KOp::Load(pos, access));
            ops.len() - 1
        })
    };
    for m in &k.members {
        let mut arg = |ops: &mut Vec<KOp>, j: usize| -> usize {
            match m.args[j] {
                Src::Reg(r) => reg[r],
                Src::Ext(e) => load(ops, e, Access::Elem),
            }
        };
        let r = match &m.op {
            Op::Add | Op::Sub | Op::Mul => {
                let (a, b) = (arg(&mut ops, 0), arg(&mut ops, 1));
                ops.push(match m.op {
                    Op::Add => KOp::Add(a, b),
                    Op::Sub => KOp::Sub(a, b),
                    _ => KOp::Mul(a, b),
                });
                ops.len() - 1
            }
            Op::Neg => {
                let a = arg(&mut ops, 0);
                ops.push(KOp::Neg(a));
                ops.len() - 1
            }
            Op::Unary(u) => {
                let a = arg(&mut ops, 0);
                ops.push(KOp::Unary(a, *u));
                ops.len() - 1
            }
            // Identities: the register is the operand's.
            Op::StopGrad | Op::Sum { .. } => arg(&mut ops, 0),
            Op::Broadcast { new_axis, .. } => {
                let Src::Ext(e) = m.args[0] else {
                    unreachable!("a broadcast reads an external input (validated)")
                };
                let access = match new_axis {
                    None => Access::Scalar,
                    Some(0) => Access::Row,
                    Some(_) => Access::Col,
                };
                load(&mut ops, e, access)
            }
            other => unreachable!("{other} is not fusable (validated)"),
        };
        reg.push(r);
    }
    // Outputs by kind.
    let axes: Vec<Option<Option<usize>>> = k
        .outputs
        .iter()
        .map(|(m, _)| match k.members[*m].op {
            Op::Sum { axis } => Some(axis),
            _ => None,
        })
        .collect();
    let has = |a: Option<usize>| axes.contains(&Some(a));
    let split = has(Some(0)) && has(Some(1));
    let mode = if split {
        Mode::Elements
    } else if has(Some(1)) {
        Mode::Rows
    } else if has(Some(0)) || has(None) {
        Mode::Columns
    } else {
        Mode::Elements
    };
    let mut outputs = Vec::new();
    let mut out_regs = Vec::new();
    let mut after: Vec<Launch> = Vec::new();
    for (j, (m, _)) in k.outputs.iter().enumerate() {
        let r = reg[*m];
        let slot = Buf::Slot(slots[j]);
        match axes[j] {
            None => {
                out_regs.push((r, Store::Elem));
                outputs.push(slot);
            }
            Some(axis) if split => {
                // Write the summands, then reduce them in a launch of their own.
                temps.push(rows * cols);
                let t = Buf::Temp(temps.len() - 1);
                out_regs.push((r, Store::Elem));
                outputs.push(t);
                let (smode, line) = match axis {
                    Some(0) => (Mode::Columns, cols),
                    _ => (Mode::Rows, rows),
                };
                let sum_program = FusedProgram {
                    mode: smode,
                    rows,
                    cols,
                    ops: vec![KOp::Load(0, Access::Elem)],
                    outputs: vec![(0, Store::LineSum)],
                };
                if axis.is_none() {
                    temps.push(line);
                    let partial = Buf::Temp(temps.len() - 1);
                    after.push(Launch::Fused {
                        program: sum_program,
                        inputs: vec![t],
                        outputs: vec![partial],
                    });
                    after.push(Launch::SumPartials {
                        n: line,
                        from: partial,
                        to: slot,
                    });
                } else {
                    after.push(Launch::Fused {
                        program: sum_program,
                        inputs: vec![t],
                        outputs: vec![slot],
                    });
                }
            }
            Some(None) => {
                // Line sums into a partials buffer, then one pass over the partials.
                let line = if mode == Mode::Rows { rows } else { cols };
                temps.push(line);
                let partial = Buf::Temp(temps.len() - 1);
                out_regs.push((r, Store::LineSum));
                outputs.push(partial);
                after.push(Launch::SumPartials {
                    n: line,
                    from: partial,
                    to: slot,
                });
            }
            Some(Some(_)) => {
                out_regs.push((r, Store::LineSum));
                outputs.push(slot);
            }
        }
    }
    launches.push(Launch::Fused {
        program: FusedProgram {
            mode,
            rows,
            cols,
            ops,
            outputs: out_regs,
        },
        inputs,
        outputs,
    });
    launches.extend(after);
}
