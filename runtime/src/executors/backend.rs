//! One interface over every executor: a plan loaded on a device. The training loop, `grad`,
//! `bench` and the backend test suite drive `host`, `wgpu` and `cuda` through it alike.

use crate::cube::matmul::{MatmulOptions, MatmulPrecision};
use crate::cube::probe::Chosen;
use crate::cube::GpuProgram;
use crate::distributed::Communicator;
use crate::executors::adam::{Adam, AdamState, LearningRates};
use crate::executors::linalg::GemmShape;
use crate::executors::simd::call_on_widest_simd;
use crate::executors::values::{ExecError, Feeds, Real, Tensor};
use crate::host::exec::{Executor, Program};
use crate::profile::{Profile, ProfileRow, Work};
use snfc_compiler::ir::lower::carried_input;
use snfc_compiler::plan::{AllReduce, Plan};
use std::any::Any;
use std::sync::Arc;

/// A plan loaded on a device.
pub trait Backend<T: Real> {
    /// The device, in words (`host`, `wgpu (llvmpipe …)`).
    fn device(&self) -> String;
    /// Upload a fed tensor (an input or a parameter, by name); it stays until replaced.
    fn set(&mut self, name: &str, data: &[T]) -> Result<(), ExecError>;
    /// Run every kernel of the plan once.
    fn run(&mut self) -> Result<(), ExecError>;
    /// The outputs of the last run, in plan order (copied to the host).
    fn outputs(&mut self) -> Result<Vec<(String, Tensor<T>)>, ExecError>;
    /// One output of the last run.
    fn output(&mut self, name: &str) -> Result<Tensor<T>, ExecError>;
    /// The first value of each named output of the last run (the loss, GECO's per-layer
    /// reconstruction errors); on a GPU in one read-back, not one per name.
    fn scalars(&mut self, names: &[String]) -> Result<Vec<f64>, ExecError> {
        names
            .iter()
            .map(|n| Ok(self.output(n)?.scalar().as_f64()))
            .collect()
    }
    /// Feed each `next.<input>` output of the last run into `<input>` for the next run, where
    /// the values live (GECO's λ and reconstruction EMA: no round trip through the host). A
    /// later [`set`](Self::set) of such an input wins.
    fn carry(&mut self) -> Result<(), ExecError>;
    /// One Adam step, where the parameters live, for every parameter with a `grad.<name>`
    /// output of the last run, each at its rate in `lr`.
    /// Each gradient is multiplied by `grad_scale` first (1 unless clipping).
    fn adam_step(
        &mut self,
        lr: &LearningRates,
        betas: [f64; 2],
        eps: f64,
        grad_scale: f64,
    ) -> Result<(), ExecError>;
    /// Adam's step count and moments, read back from where they live (for `last.safetensors`).
    fn adam_state(&mut self) -> Result<AdamState<T>, ExecError>;
    /// Continue from a saved Adam state (a resumed run).
    fn set_adam_state(&mut self, state: &AdamState<T>) -> Result<(), ExecError>;
    /// The global norm ‖g‖₂ over every `grad.<name>` output of the last run (on a GPU reduced
    /// on the device; one partial sum per 256 values is read back).
    fn grad_norm(&mut self) -> Result<f64, ExecError> {
        Ok(grad_norm_of(&self.outputs()?))
    }
    /// The first parameter whose gradient in the last run has a NaN or infinite value (the
    /// divergence guard; on a GPU from the device-side sums of squares).
    fn first_nonfinite_grad(&mut self) -> Result<Option<String>, ExecError> {
        Ok(self
            .outputs()?
            .iter()
            .find(|(n, t)| n.starts_with("grad.") && t.data.iter().any(|v| !v.as_f64().is_finite()))
            .map(|(n, _)| n["grad.".len()..].to_string()))
    }
    /// What a training step reads back after [`run`](Self::run): the first value of each of
    /// `names` (loss, NLL, reconstruction errors) and the gradients' health — their global
    /// norm when `norm` is asked (clipping) and the first parameter whose gradient has a NaN
    /// or infinite value. A GPU computes Σ g² per gradient on the device and reads it with
    /// the scalars: one device read per step.
    fn step_readback(&mut self, names: &[String], norm: bool) -> Result<StepReadback, ExecError> {
        let scalars = self.scalars(names)?;
        let norm = if norm { Some(self.grad_norm()?) } else { None };
        // A finite norm means finite gradients; otherwise scan.
        let nonfinite = if norm.is_some_and(f64::is_finite) {
            None
        } else {
            self.first_nonfinite_grad()?
        };
        Ok(StepReadback {
            scalars,
            norm,
            nonfinite,
        })
    }
    /// Whether [`draw`](Self::draw) draws where the tensors live (a GPU); otherwise the
    /// caller draws on the host and uploads.
    fn draws_on_device(&self) -> bool {
        false
    }
    /// Fill the fed tensor `name` with values of `dist` drawn on the device from `seed` (the
    /// same seed gives the same values on the same device).
    fn draw(&mut self, name: &str, seed: u64, dist: Draw) -> Result<(), ExecError> {
        let _ = (seed, dist);
        Err(ExecError::Device {
            graph: String::new(),
            message: format!("`{name}`: this backend draws random numbers on the host"),
        })
    }
    /// Device reads, uploads and kernel launches so far (`None` on the host, which has no
    /// device to talk to).
    fn traffic(&self) -> Option<DeviceTraffic> {
        None
    }
    /// The plan's `all_reduce`: replace every gradient output of the last run by its mean over
    /// the ranks of `comm`, through one buffer holding them all and one collective call (the
    /// Horovod / DDP recipe), before the divergence check and Adam see the gradients (a GPU
    /// stages the buffer through the host). Nothing to do for a process that runs alone.
    fn all_reduce_grads(&mut self, comm: &dyn Communicator) -> Result<(), ExecError>;
    /// A fed tensor's current value (a parameter after updates).
    fn fed(&mut self, name: &str) -> Result<Vec<T>, ExecError>;
    /// Wait until the device is idle (for timing).
    fn sync(&mut self) -> Result<(), ExecError>;
    /// Kernel launches per run.
    fn kernels(&self) -> usize;
    /// Time each kernel kind, and the optimizer's updates, from now on (a GPU backend
    /// synchronizes after every launch to do so).
    fn enable_profile(&mut self) {}
    /// Seconds and launches per kernel kind since `enable_profile`.
    fn profile(&self) -> Vec<ProfileRow> {
        Vec::new()
    }
    /// The FLOPs and seconds of the matrix products a GPU ran since `enable_profile` (each
    /// launch waited for); `None` on the host, whose products [`gemm_calls`](Self::gemm_calls)
    /// lists.
    fn product_time(&self) -> Option<(f64, f64)> {
        None
    }
    /// The matrix products run on the host since `enable_profile`, one entry per call.
    fn gemm_calls(&self) -> Vec<GemmShape> {
        Vec::new()
    }
}

/// A step's read-back ([`Backend::step_readback`]).
#[derive(Debug, Clone, PartialEq)]
pub struct StepReadback {
    /// The first value of each named output, in order.
    pub scalars: Vec<f64>,
    /// ‖g‖₂ over every gradient, when asked.
    pub norm: Option<f64>,
    /// The first parameter whose gradient has a NaN or infinite value.
    pub nonfinite: Option<String>,
}

/// A distribution [`Backend::draw`] draws from.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Draw {
    /// Uniform on [0, 1) (dequantization noise).
    Uniform,
    /// Normal with mean 0 and standard deviation `std` (a sampling latent at temperature
    /// `std`).
    Normal { std: f32 },
}

/// Blocking device-to-host reads, host-to-device uploads and kernel launches of a GPU program
/// since it was made (each counted once however many buffers it moves).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeviceTraffic {
    pub reads: u64,
    pub uploads: u64,
    pub launches: u64,
}

/// ‖g‖₂ over the `grad.<name>` tensors of a run's outputs.
fn grad_norm_of<T: Real>(outs: &[(String, Tensor<T>)]) -> f64 {
    outs.iter()
        .filter(|(n, _)| n.starts_with("grad."))
        .flat_map(|(_, t)| t.data.iter().map(|v| v.as_f64() * v.as_f64()))
        .sum::<f64>()
        .sqrt()
}

/// Whether every value is finite: `v · 0` is 0 for a finite `v` and NaN otherwise, summed in
/// 16 lanes without an early exit so that the loop vectorizes (the step's gradients are
/// scanned after every step).
fn all_finite<T: Real>(values: &[T]) -> bool {
    #[inline(always)]
    fn lanes<T: Real>(values: &[T]) -> bool {
        const LANES: usize = 16;
        let mut acc = [T::zero(); LANES];
        let chunks = values.chunks_exact(LANES);
        let tail = chunks.remainder();
        for chunk in chunks {
            for (a, &v) in acc.iter_mut().zip(chunk) {
                *a += v * T::zero();
            }
        }
        let tail_sum = tail.iter().fold(T::zero(), |s, &v| s + v * T::zero());
        acc.iter().fold(tail_sum, |s, &a| s + a) == T::zero()
    }
    call_on_widest_simd!(lanes [T: Real] [T] (values: &[T] = values) -> bool)
}

/// The host executor behind [`Backend`].
pub struct HostBackend<T> {
    program: Program,
    exec: Executor<T>,
    feeds: Feeds<T>,
    outs: Vec<(String, Tensor<T>)>,
    adam: Option<Adam<T>>,
    /// The Adam updates' times, when profiling (the executor times the kernels).
    adam_profile: Option<Profile>,
    /// The plan's gradient average over the ranks of a data-parallel run.
    all_reduce: Option<AllReduce>,
}

impl<T: Real> HostBackend<T> {
    pub fn new(plan: Plan) -> Self {
        HostBackend {
            all_reduce: plan.all_reduce.clone(),
            program: Program::from_plan(plan),
            exec: Executor::new(),
            feeds: Feeds::new(),
            outs: Vec::new(),
            adam: None,
            adam_profile: None,
        }
    }
}

fn missing(graph: &str, kind: &'static str, name: &str) -> ExecError {
    ExecError::Missing {
        graph: graph.to_string(),
        kind,
        name: name.to_string(),
    }
}

impl<T: Real> Backend<T> for HostBackend<T> {
    fn device(&self) -> String {
        "host".into()
    }
    fn set(&mut self, name: &str, data: &[T]) -> Result<(), ExecError> {
        match self.feeds.get_mut(name) {
            Some(buf) if buf.len() == data.len() => Arc::make_mut(buf).copy_from_slice(data),
            _ => {
                self.feeds.insert(name.to_string(), Arc::new(data.to_vec()));
            }
        }
        Ok(())
    }
    fn run(&mut self) -> Result<(), ExecError> {
        for (_, t) in self.outs.drain(..) {
            self.exec.reuse(t.data);
        }
        self.outs = self.exec.run(&self.program, &self.feeds)?;
        Ok(())
    }
    fn outputs(&mut self) -> Result<Vec<(String, Tensor<T>)>, ExecError> {
        Ok(self.outs.clone())
    }
    fn carry(&mut self) -> Result<(), ExecError> {
        for (name, t) in &self.outs {
            if let Some(input) = carried_input(name) {
                self.feeds
                    .insert(input.to_string(), Arc::new(t.data.clone()));
            }
        }
        Ok(())
    }
    fn output(&mut self, name: &str) -> Result<Tensor<T>, ExecError> {
        self.outs
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t.clone())
            .ok_or_else(|| missing(self.program.name(), "output", name))
    }
    fn adam_step(
        &mut self,
        lr: &LearningRates,
        betas: [f64; 2],
        eps: f64,
        grad_scale: f64,
    ) -> Result<(), ExecError> {
        let started = std::time::Instant::now();
        let adam = self.adam.get_or_insert_with(|| Adam::with(betas, eps));
        (adam.betas, adam.eps) = (betas, eps);
        // On a pool thread, like the plan (see `Executor::run`).
        rayon::scope(|_| adam.update_values(&mut self.feeds, &self.outs, lr, grad_scale));
        if let Some(p) = self.adam_profile.as_mut() {
            p.add(Work::Adam, "adam update", started);
        }
        Ok(())
    }
    fn first_nonfinite_grad(&mut self) -> Result<Option<String>, ExecError> {
        use rayon::prelude::*;
        Ok(self
            .outs
            .iter()
            .filter(|(n, _)| n.starts_with("grad."))
            .find(|(_, t)| t.data.par_chunks(1 << 14).any(|c| !all_finite(c)))
            .map(|(n, _)| n["grad.".len()..].to_string()))
    }
    fn grad_norm(&mut self) -> Result<f64, ExecError> {
        // The outputs in place, without the trait default's copy.
        Ok(grad_norm_of(&self.outs))
    }
    fn all_reduce_grads(&mut self, comm: &dyn Communicator) -> Result<(), ExecError> {
        let ranks = comm.size();
        let Some(reduce) = self.all_reduce.as_ref().filter(|_| ranks > 1) else {
            return Ok(());
        };
        // The plan's all-reduce: its outputs packed in its order into one buffer.
        let position = |name: &String| {
            self.outs
                .iter()
                .position(|(n, _)| n == name)
                .ok_or_else(|| missing(self.program.name(), "output", name))
        };
        let at: Vec<usize> = reduce
            .outputs
            .iter()
            .map(position)
            .collect::<Result<_, _>>()?;
        let mut fused: Vec<T> = Vec::with_capacity(reduce.elements);
        for &i in &at {
            fused.extend_from_slice(&self.outs[i].1.data);
        }
        crate::distributed::all_reduce_sum(comm, &mut fused);
        let scale = T::of_f64(1.0 / ranks as f64);
        let mut start = 0;
        for &i in &at {
            let data = &mut self.outs[i].1.data;
            let n = data.len();
            for (o, v) in data.iter_mut().zip(&fused[start..start + n]) {
                *o = *v * scale;
            }
            start += n;
        }
        Ok(())
    }
    fn adam_state(&mut self) -> Result<AdamState<T>, ExecError> {
        Ok(self.adam.as_ref().map(Adam::state).unwrap_or_default())
    }
    fn set_adam_state(&mut self, state: &AdamState<T>) -> Result<(), ExecError> {
        // betas and ε come with the next step.
        let adam = self
            .adam
            .get_or_insert_with(|| Adam::with([0.9, 0.999], 1e-8));
        adam.restore(state);
        Ok(())
    }
    fn fed(&mut self, name: &str) -> Result<Vec<T>, ExecError> {
        self.feeds
            .get(name)
            .map(|v| v.to_vec())
            .ok_or_else(|| missing(self.program.name(), "param", name))
    }
    fn sync(&mut self) -> Result<(), ExecError> {
        Ok(())
    }
    fn kernels(&self) -> usize {
        self.program.kernels()
    }
    fn enable_profile(&mut self) {
        self.exec.enable_profile();
        self.adam_profile = Some(Profile::default());
    }
    fn gemm_calls(&self) -> Vec<GemmShape> {
        self.exec.gemm_calls().to_vec()
    }
    fn profile(&self) -> Vec<ProfileRow> {
        let mut rows = self.exec.profile();
        rows.extend(self.adam_profile.iter().flat_map(Profile::rows));
        rows.sort_by(|a, b| b.seconds.total_cmp(&a.seconds));
        rows
    }
}

/// The first parameter whose Σ g² is non-finite: a NaN or ∞ in its gradient (or a square
/// beyond f32's range, a gradient above 1.8e19: diverging as well).
fn first_nonfinite(sums: Vec<(String, f64)>) -> Option<String> {
    sums.into_iter()
        .find(|(_, s)| !s.is_finite())
        .map(|(n, _)| n)
}

impl<R: cubecl::Runtime> Backend<f32> for (GpuProgram<R>, String) {
    fn device(&self) -> String {
        self.1.clone()
    }
    fn set(&mut self, name: &str, data: &[f32]) -> Result<(), ExecError> {
        self.0.set(name, data)
    }
    fn run(&mut self) -> Result<(), ExecError> {
        self.0.run()
    }
    fn outputs(&mut self) -> Result<Vec<(String, Tensor<f32>)>, ExecError> {
        self.0.outputs()
    }
    fn output(&mut self, name: &str) -> Result<Tensor<f32>, ExecError> {
        self.0.output(name)
    }
    fn carry(&mut self) -> Result<(), ExecError> {
        self.0.carry();
        Ok(())
    }
    fn scalars(&mut self, names: &[String]) -> Result<Vec<f64>, ExecError> {
        self.0.scalars(names)
    }
    fn adam_step(
        &mut self,
        lr: &LearningRates,
        betas: [f64; 2],
        eps: f64,
        grad_scale: f64,
    ) -> Result<(), ExecError> {
        self.0.adam_step(lr, betas, eps, grad_scale)
    }
    fn all_reduce_grads(&mut self, comm: &dyn Communicator) -> Result<(), ExecError> {
        let ranks = comm.size();
        let Some(reduce) = self.0.plan().all_reduce.clone().filter(|_| ranks > 1) else {
            return Ok(());
        };
        // Debian's Open MPI is not CUDA-aware: the packed gradients go through the host.
        self.0.map_outputs(&reduce.outputs, |packed| {
            comm.all_reduce_sum_f32(packed);
            let scale = 1.0 / ranks as f32;
            packed.iter_mut().for_each(|v| *v *= scale);
        })
    }
    fn grad_norm(&mut self) -> Result<f64, ExecError> {
        let (_, sums) = self.0.scalars_and_grad_sums(&[])?;
        Ok(sums.iter().map(|(_, s)| s).sum::<f64>().sqrt())
    }
    fn first_nonfinite_grad(&mut self) -> Result<Option<String>, ExecError> {
        let (_, sums) = self.0.scalars_and_grad_sums(&[])?;
        Ok(first_nonfinite(sums))
    }
    fn step_readback(&mut self, names: &[String], norm: bool) -> Result<StepReadback, ExecError> {
        let (scalars, sums) = self.0.scalars_and_grad_sums(names)?;
        Ok(StepReadback {
            scalars,
            norm: norm.then(|| sums.iter().map(|(_, s)| s).sum::<f64>().sqrt()),
            nonfinite: first_nonfinite(sums),
        })
    }
    fn traffic(&self) -> Option<DeviceTraffic> {
        Some(self.0.traffic())
    }
    fn product_time(&self) -> Option<(f64, f64)> {
        Some(self.0.product_time())
    }
    fn draws_on_device(&self) -> bool {
        true
    }
    fn draw(&mut self, name: &str, seed: u64, dist: Draw) -> Result<(), ExecError> {
        self.0.draw(name, seed, dist)
    }
    fn adam_state(&mut self) -> Result<AdamState<f32>, ExecError> {
        self.0.adam_state()
    }
    fn set_adam_state(&mut self, state: &AdamState<f32>) -> Result<(), ExecError> {
        self.0.set_adam_state(state)
    }
    fn fed(&mut self, name: &str) -> Result<Vec<f32>, ExecError> {
        self.0.fed(name)
    }
    fn sync(&mut self) -> Result<(), ExecError> {
        self.0.sync()
    }
    fn kernels(&self) -> usize {
        self.0.kernels()
    }
    fn enable_profile(&mut self) {
        self.0.enable_profile()
    }
    fn profile(&self) -> Vec<ProfileRow> {
        self.0.profile()
    }
}

/// Load `plan` on the chosen device in precision `T` (the GPU backends run f32 only), its
/// matrix products on a GPU at `precision`. A CPU adapter (lavapipe) takes its products'
/// first kernel without timing and its inverses from the host's LU
/// ([`GpuProgram::invert_on_host`](crate::cube::GpuProgram::invert_on_host)).
pub fn open<T: Real + 'static>(
    chosen: &Chosen,
    plan: Plan,
    precision: MatmulPrecision,
) -> Result<Box<dyn Backend<T>>, ExecError> {
    let cpu = chosen.is_cpu_adapter();
    let matmul = MatmulOptions {
        precision,
        tune: !cpu,
        only: None,
    };
    open_with(chosen, plan, false, matmul, cpu)
}

/// [`open`], with every device buffer first filled with NaN when `poison` is set (so a test
/// sees any output element that no kernel wrote), the products' kernels chosen as `matmul`
/// says, and inverses by the device's elimination on every adapter (tests run each kernel).
pub fn open_variant<T: Real + 'static>(
    chosen: &Chosen,
    plan: Plan,
    poison: bool,
    matmul: MatmulOptions,
) -> Result<Box<dyn Backend<T>>, ExecError> {
    open_with(chosen, plan, poison, matmul, false)
}

fn open_with<T: Real + 'static>(
    chosen: &Chosen,
    plan: Plan,
    poison: bool,
    matmul: MatmulOptions,
    host_linalg: bool,
) -> Result<Box<dyn Backend<T>>, ExecError> {
    if *chosen == Chosen::Host {
        return Ok(Box::new(HostBackend::<T>::new(plan)));
    }
    let graph = plan.name.clone();
    let gpu = open_gpu(chosen, plan, poison, matmul, host_linalg)?;
    let any: Box<dyn Any> = Box::new(gpu);
    any.downcast::<Box<dyn Backend<T>>>()
        .map(|b| *b)
        .map_err(|_| ExecError::Device {
            graph,
            message: format!(
                "the {} backend computes in f32; use --dtype f32 (f64 runs on the host)",
                chosen.name()
            ),
        })
}

/// `plan` on a GPU backend. Not generic, so that the GPU program and the kernel library's
/// routines it launches are compiled once, here, rather than in every crate that opens a
/// backend (the binary and each test).
fn open_gpu(
    chosen: &Chosen,
    plan: Plan,
    poison: bool,
    matmul: MatmulOptions,
    host_linalg: bool,
) -> Result<Box<dyn Backend<f32>>, ExecError> {
    fn gpu<R: cubecl::Runtime>(
        client: cubecl::prelude::ComputeClient<R>,
        plan: Plan,
        (poison, host_linalg): (bool, bool),
        matmul: MatmulOptions,
        name: String,
    ) -> Box<dyn Backend<f32>> {
        let mut p = GpuProgram::new(client, plan, matmul);
        if poison {
            p.poison();
        }
        if host_linalg {
            p.invert_on_host();
        }
        Box::new((p, name))
    }
    if let Some(op) = crate::cube::unsupported_op(&plan) {
        return Err(ExecError::Device {
            graph: plan.name.clone(),
            message: format!(
                "the {} backend has no kernel for `{op}` yet; run this spec with --device host",
                chosen.name()
            ),
        });
    }
    Ok(match chosen {
        Chosen::Host => {
            return Err(ExecError::Device {
                graph: plan.name.clone(),
                message: "the host is not a GPU backend".into(),
            })
        }
        Chosen::Wgpu { .. } => gpu(
            crate::cube::probe::wgpu_client(),
            plan,
            (poison, host_linalg),
            matmul,
            chosen.to_string(),
        ),
        Chosen::Cuda { .. } => gpu(
            crate::cube::probe::cuda_client(),
            plan,
            (poison, host_linalg),
            matmul,
            chosen.to_string(),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::all_finite;

    /// A NaN or an infinity anywhere (in a full 16-lane chunk or in the tail) is found; the
    /// largest, smallest and subnormal finite values are not mistaken for one.
    #[test]
    fn all_finite_finds_every_nonfinite_value() {
        fn check<T: crate::executors::values::Real>(max: T, tiny: T) {
            for len in [0, 1, 15, 16, 17, 100] {
                let finite: Vec<T> = (0..len)
                    .map(|i| match i % 4 {
                        0 => max,
                        1 => T::zero() - max,
                        2 => tiny,
                        _ => T::of_f64(i as f64),
                    })
                    .collect();
                assert!(all_finite(&finite), "{len} finite values");
                for at in 0..len {
                    for bad in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY] {
                        let mut v = finite.clone();
                        v[at] = T::of_f64(bad);
                        assert!(!all_finite(&v), "{bad} at {at} of {len}");
                    }
                }
            }
        }
        check::<f32>(f32::MAX, f32::MIN_POSITIVE / 8.0);
        check::<f64>(f64::MAX, f64::MIN_POSITIVE / 8.0);
    }
}
