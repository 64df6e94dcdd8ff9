//! GPU backends: a [`Plan`] executed with CubeCL kernels, on CUDA (`cubecl-cuda`, NVRTC) or on
//! any GPU through wgpu (and, for checking kernels on a CPU, Mesa's lavapipe).
//!
//! Every fused group and every remaining elementwise, broadcast or sum instruction becomes one
//! specialization of the generic [`kernels::fused`] kernel; GEMMs run [`kernels::gemm`] with
//! their epilogue; the ops that only move, repeat, sum or scale elements (permute, expand,
//! reduce_sum, flip_kernel, toeplitz and its adjoint, multiplicity) run one
//! [`tensor_kernels::gather`] kernel through an index table built from the shapes; convolutions,
//! kernel gradients and splines have kernels of their own ([`tensor_kernels`]); inverses and
//! log-determinants (only in exact-gradient and sampling plans) run by Gauss–Jordan
//! elimination on the device ([`gauss_jordan`]), or on a CPU adapter by LU on the host.
//! Buffers follow the plan's static assignment; parameters and Adam moments stay resident on
//! the device between steps.

pub mod gauss_jordan;
pub mod index_tables;
pub mod kernels;
pub mod matmul;
pub mod probe;
pub mod source;
pub mod tensor_kernels;

use crate::executors::adam::AdamState;
use crate::executors::backend::{DeviceTraffic, Draw};
use crate::executors::linalg;
use crate::executors::values::{ExecError, Tensor};
use crate::profile::{Profile, ProfileRow, Work};
use cubecl::prelude::*;
use cubecl::server::Handle;
use index_tables::IndexTable;
use kernels::{Access, FusedProgram, Im2col, KOp};
use matmul::{MatmulKernel, MatmulOptions, MatmulPrecision, Product};
use snfc_compiler::ir::lower::carried_input;
use snfc_compiler::ir::{Op, SplinePart};
use snfc_compiler::plan::{numel, FusedKernel, Instr, Plan, Src};
use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use tensor_kernels as kernels_t;
use tensor_kernels::{GatherConfig, SplineConfig, SplineOut};

/// Where a kernel argument lives at run time.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Buf {
    /// The storage of a plan slot (a plan buffer, a fed tensor or a constant).
    Slot(usize),
    /// A scratch buffer of the program (summands of a reduction, product partials).
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
    /// Sums of `from` viewed as `[rows, cols]` through cubek-reduce: over axis 0 (`[cols]`),
    /// over axis 1 (`[rows]`) or of every value (`None`, one value).
    Reduce {
        rows: usize,
        cols: usize,
        axis: Option<usize>,
        from: Buf,
        to: Buf,
    },
    /// `out = a·b` through cubek-matmul; the kernel is chosen at the product's first launch.
    Matmul {
        product: Product,
        role: ProductRole,
        a: Buf,
        b: Buf,
        out: Buf,
    },
    /// The im2col matrix of a convolution's image, stored `[ci·k², h·w·b]` for a product.
    Im2col { image: Im2col, x: Buf, out: Buf },
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
    /// Inverse (`logdet: false`) or log-determinant of the n × n `input`, by blocked
    /// Gauss–Jordan on the device ([`gauss_jordan`]): `a` and `x` are the ping-pong pairs of
    /// the matrix and of its inverse (`x[⌈n/b⌉ % 2]` is the inverse's slot), `panel` and `ops`
    /// the panel and its row operations (n × b), `src` the row order (u32), `rows` the pivot
    /// rows (b × w), `update` their product (n × w), `ld` the log-determinant (its slot for a
    /// log-determinant).
    GaussJordan {
        /// The plan's instruction (for errors).
        node: usize,
        n: usize,
        logdet: bool,
        input: Buf,
        a: [Buf; 2],
        x: [Buf; 2],
        panel: Buf,
        ops: Buf,
        src: Buf,
        rows: Buf,
        update: Buf,
        ld: Buf,
    },
}

impl Launch {
    /// Kernel launches this entry makes per run.
    fn kernel_launches(&self) -> usize {
        match self {
            Launch::GaussJordan { n, .. } => gauss_jordan_launches(*n),
            _ => 1,
        }
    }
}

/// Launches of one blocked Gauss–Jordan elimination: the copy, then per panel its
/// elimination, the product and the update.
fn gauss_jordan_launches(n: usize) -> usize {
    1 + 3 * n.div_ceil(gauss_jordan::PANEL)
}

/// Σ g² of each gradient, by parameter name.
pub type GradSums = Vec<(String, f64)>;

/// What a matrix product computes (for profiles and `--emit`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProductRole {
    Gemm { epilogue: bool },
    Conv,
    ConvKernelGrad { slices: usize },
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
    matmul: MatmulOptions,
    /// The kernel each product shape runs, chosen at its first launch.
    matmul_kernels: RefCell<HashMap<Product, MatmulKernel>>,
    /// The kernel of each full-f32 product inside an elimination, once chosen.
    exact_kernels: RefCell<HashMap<Product, MatmulKernel>>,
    traffic: Cell<DeviceTraffic>,
    /// FLOPs and seconds of the products launched while profiling.
    product_time: (f64, f64),
    /// The plan's `next.*` outputs: (slot of the input it feeds, its own slot).
    carries: Vec<(usize, usize)>,
    /// Inputs to take their carried output's buffer at the next run (see [`carry`](Self::carry)).
    carry_pending: HashSet<usize>,
    /// Inverses and log-determinants by LU on the host (read back, f64, uploaded) instead of
    /// the device's elimination: for a CPU adapter, whose "device" runs on the host's cores
    /// anyway ([`invert_on_host`](Self::invert_on_host)).
    host_linalg: bool,
    /// Values `set` for names this plan does not read, returned by `fed`.
    unread: HashMap<String, Vec<f32>>,
}

fn f32_bits(v: f64) -> u32 {
    (v as f32).to_bits()
}

impl<R: Runtime> GpuProgram<R> {
    /// Compile `plan` for `client` (kernels are JIT-compiled at their first launch), its
    /// matrix products chosen as `matmul` says.
    pub fn new(client: ComputeClient<R>, plan: Plan, matmul: MatmulOptions) -> GpuProgram<R> {
        let Lowered {
            launches,
            temps,
            tables,
        } = lower_plan(&plan);
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
        let carries = plan
            .outputs
            .iter()
            .filter_map(|(name, out)| {
                let input = carried_input(name)?;
                let slot = plan
                    .instrs
                    .iter()
                    .position(|i| matches!(&i.op, Op::Input { name: n, .. } if n == input))?;
                Some((slot, *out))
            })
            .collect();
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
            matmul,
            matmul_kernels: Default::default(),
            exact_kernels: Default::default(),
            traffic: Cell::new(DeviceTraffic::default()),
            product_time: (0.0, 0.0),
            carries,
            carry_pending: HashSet::new(),
            host_linalg: false,
            unread: HashMap::new(),
        }
    }

    /// Compute inverses and log-determinants by LU on the host in f64 (one read and one
    /// upload per matrix) instead of by the device's Gauss–Jordan elimination. On a CPU
    /// adapter such as lavapipe the elimination took 1.3–1.5 s for one 784 × 784 inverse, the
    /// host's LU 22–30 ms: the "device" is the host's cores there.
    pub fn invert_on_host(&mut self) {
        self.host_linalg = true;
    }

    /// Feed each `next.<input>` output of the last run into `<input>`: at the next run the
    /// input takes over the output's buffer and the output gets a fresh one (no copy, no
    /// transfer; until then the output stays readable). A [`set`](Self::set) of the input
    /// in between wins.
    pub fn carry(&mut self) {
        self.carry_pending = self.carries.iter().map(|(input, _)| *input).collect();
    }

    fn apply_carry(&mut self) -> Result<(), ExecError> {
        for (input, output) in self.carries.clone() {
            if !self.carry_pending.remove(&input) {
                continue;
            }
            let storage = self.plan.storage_slot(output);
            let handle = match self.plan.buffers.of_slot[storage] {
                Some(b) => {
                    let fresh = self.client.empty(self.buffers[b].size() as usize);
                    std::mem::replace(&mut self.buffers[b], fresh)
                }
                None => self.handle(Buf::Slot(output))?,
            };
            self.leaves.insert(input, handle);
        }
        Ok(())
    }

    /// Reads, uploads and launches since the program was made.
    pub fn traffic(&self) -> DeviceTraffic {
        self.traffic.get()
    }

    fn count(&self, f: impl FnOnce(&mut DeviceTraffic)) {
        let mut t = self.traffic.get();
        f(&mut t);
        self.traffic.set(t);
    }

    fn count_launch(&self) {
        self.count(|t| t.launches += 1);
    }

    /// A new device buffer holding `data` (one upload).
    fn upload(&self, data: &[f32]) -> Handle {
        self.count(|t| t.uploads += 1);
        self.client.create_from_slice(f32::as_bytes(data))
    }

    /// The f32 contents of `handles`, in one blocking read.
    fn read_all(&self, handles: Vec<Handle>) -> Result<Vec<Vec<f32>>, ExecError> {
        let n = handles.len();
        self.count(|t| t.reads += 1);
        let read = self.client.read(handles);
        if read.len() != n {
            return Err(ExecError::Device {
                graph: self.plan.name.clone(),
                message: format!("read back {} of {n} buffers", read.len()),
            });
        }
        Ok(read.iter().map(|b| f32::from_bytes(b).to_vec()).collect())
    }

    /// The kernel chosen for each product shape so far.
    pub fn matmul_kernels(&self) -> Vec<(Product, MatmulKernel)> {
        let mut v: Vec<_> = self
            .matmul_kernels
            .borrow()
            .iter()
            .map(|(p, k)| (p.clone(), *k))
            .collect();
        v.sort_by_key(|(p, _)| (p.m, p.n, p.k, p.batch));
        v
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
            .map(|l| match l {
                Launch::GaussJordan { .. } if self.host_linalg => 0,
                l => l.kernel_launches(),
            })
            .sum()
    }

    /// Upload a fed tensor (an input or a parameter, by name); it stays until replaced. A
    /// name the plan does not read (noise for a plan without dequantization, the learned
    /// inverses of an exact step) is not uploaded, only kept for [`fed`](Self::fed), as the
    /// host executor keeps unused feeds.
    pub fn set(&mut self, name: &str, data: &[f32]) -> Result<(), ExecError> {
        let mut read = false;
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
                    self.leaves.insert(s, self.upload(data));
                    self.carry_pending.remove(&s);
                    read = true;
                }
            }
        }
        if !read {
            // Kept for `fed`: a parameter this plan does not read (the learned inverses of an
            // exact-gradient spec) keeps the value it was given, as on the host.
            self.unread.insert(name.to_string(), data.to_vec());
        }
        Ok(())
    }

    /// Fill input `name` with values of `dist` drawn by cubek-random from `seed`: no upload.
    /// cubek-random keeps its seed in one process-wide generator, so the seeding and the draw
    /// hold a lock together (other programs of the process may draw meanwhile).
    pub fn draw(&mut self, name: &str, seed: u64, dist: Draw) -> Result<(), ExecError> {
        static DRAW: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let slot = self
            .plan
            .instrs
            .iter()
            .position(|i| matches!(&i.op, Op::Input { name: n, .. } if n == name))
            .ok_or_else(|| ExecError::Missing {
                graph: self.plan.name.clone(),
                kind: "input",
                name: name.to_string(),
            })?;
        let n = numel(&self.plan.instrs[slot].shape);
        if n == 0 {
            return Ok(());
        }
        let handle = match self.leaves.get(&slot) {
            Some(h) if h.size() as usize >= n * 4 => h.clone(),
            _ => {
                let h = self.client.empty(n * 4);
                self.leaves.insert(slot, h.clone());
                h
            }
        };
        // SAFETY: the buffer holds at least n values.
        let out = unsafe {
            TensorBinding::<R>::from_raw_parts(
                handle,
                cubecl::zspace::Strides::from([1usize]),
                cubecl::zspace::Shape::from([n]),
            )
        };
        let _held = DRAW.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        cubek_random::seed(seed);
        self.count_launch();
        let dtype = f32::as_type_native_unchecked().storage_type();
        match dist {
            Draw::Uniform => cubek_random::random_uniform(&self.client, 0.0, 1.0, out, dtype),
            Draw::Normal { std } => cubek_random::random_normal(&self.client, 0.0, std, out, dtype),
        }
        .map_err(|e| ExecError::Device {
            graph: self.plan.name.clone(),
            message: format!("drawing `{name}` with cubek-random: {e:?}"),
        })
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
        let mut whole = self.read_all(handles)?;
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
            let handle = self.upload(values);
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
        self.apply_carry()?;
        let launches = std::mem::take(&mut self.launches);
        let result = self.run_launches(&launches);
        self.launches = launches;
        result
    }

    /// Time every launch from now on (synchronizing after each: slower, but per kernel).
    pub fn enable_profile(&mut self) {
        self.profile = Some(Profile::default());
        self.product_time = (0.0, 0.0);
    }

    /// The FLOPs and seconds of every matrix product launched since
    /// [`enable_profile`](Self::enable_profile), each launch waited for.
    pub fn product_time(&self) -> (f64, f64) {
        self.product_time
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
                if let Launch::Matmul { product, .. } = l {
                    self.product_time.0 += product.flops();
                    self.product_time.1 += t.elapsed().as_secs_f64();
                }
                if let Some(p) = self.profile.as_mut() {
                    p.add(launch_work(l), launch_kind(l), t);
                }
            }
        }
        Ok(())
    }

    fn launch(&mut self, l: &Launch) -> Result<(), ExecError> {
        // Products, sums and eliminations count where they launch.
        if !matches!(
            l,
            Launch::Matmul { .. } | Launch::Reduce { .. } | Launch::GaussJordan { .. }
        ) {
            self.count_launch();
        }
        {
            match l {
                Launch::Fused {
                    program,
                    inputs,
                    outputs,
                } => {
                    let units = program.rows * program.cols;
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
                Launch::Reduce {
                    rows,
                    cols,
                    axis,
                    from,
                    to,
                } => {
                    let (f, t) = (self.handle(*from)?, self.handle(*to)?);
                    self.reduce(f, [*rows, *cols], *axis, t)?;
                }
                Launch::Matmul {
                    product, a, b, out, ..
                } => {
                    let (a, b, o) = (self.handle(*a)?, self.handle(*b)?, self.handle(*out)?);
                    self.product(product, a, b, o, false)?;
                }
                Launch::Im2col { image, x, out } => {
                    let (count, dim) = grid_1d(image.ci * image.k * image.k * image.positions());
                    kernels::im2col_matrix::launch::<R>(
                        &self.client,
                        count,
                        dim,
                        unsafe { ArrayArg::from_raw_parts(self.handle(*x)?, self.len_of(*x)) },
                        unsafe { ArrayArg::from_raw_parts(self.handle(*out)?, self.len_of(*out)) },
                        image.clone(),
                    );
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
                Launch::GaussJordan {
                    node,
                    n,
                    logdet,
                    input,
                    a,
                    x,
                    panel,
                    ops,
                    src,
                    rows,
                    update,
                    ld,
                } => {
                    use gauss_jordan::{
                        gj_combine, gj_init, gj_panel, PANEL, PANEL_UNITS, ROW_UNITS,
                    };
                    let (n, with_x) = (*n, !*logdet);
                    let panels = n.div_ceil(PANEL);
                    if self.host_linalg {
                        return self.host_lu(*node, n, *logdet, *input);
                    }
                    let f32s = |b: Buf, len: usize| -> Result<ArrayArg<R>, ExecError> {
                        Ok(unsafe { ArrayArg::from_raw_parts(self.handle(b)?, len) })
                    };
                    let x_len = if with_x { n * n } else { 1 };
                    let w = if with_x { 2 * n } else { n };
                    // One cube row per matrix row, ⌈columns/256⌉ cubes along it.
                    let rows_of = |columns: usize| {
                        CubeCount::Static(columns.div_ceil(ROW_UNITS) as u32, n as u32, 1)
                    };
                    let row_dim = CubeDim::new_1d(ROW_UNITS as u32);
                    self.count_launch();
                    gj_init::launch::<R>(
                        &self.client,
                        rows_of(n),
                        row_dim,
                        f32s(*input, n * n)?,
                        f32s(a[0], n * n)?,
                        f32s(x[0], x_len)?,
                        f32s(*ld, 1)?,
                        n,
                        with_x,
                    );
                    // The rank-b update in full f32: an inverse rounded to TF32 would carry
                    // its 1e-3 error into every exact gradient.
                    let product = Product::plain(n, w, PANEL, false, false);
                    for q in 0..panels {
                        let (now, next) = (q % 2, 1 - q % 2);
                        let k = q * PANEL;
                        self.count_launch();
                        gj_panel::launch::<R>(
                            &self.client,
                            CubeCount::Static(1, 1, 1),
                            CubeDim::new_1d(PANEL_UNITS as u32),
                            f32s(a[now], n * n)?,
                            f32s(x[now], x_len)?,
                            f32s(*panel, n * PANEL)?,
                            f32s(*ops, n * PANEL)?,
                            f32s(*src, n)?,
                            f32s(*rows, PANEL * w)?,
                            f32s(*ld, 1)?,
                            k as u32,
                            PANEL.min(n - k) as u32,
                            n,
                            with_x,
                        );
                        let (c, r, t) = (
                            self.handle(*ops)?,
                            self.handle(*rows)?,
                            self.handle(*update)?,
                        );
                        self.product(&product, c, r, t, true)?;
                        self.count_launch();
                        gj_combine::launch::<R>(
                            &self.client,
                            rows_of(w),
                            row_dim,
                            f32s(a[now], n * n)?,
                            f32s(x[now], x_len)?,
                            f32s(*update, n * w)?,
                            f32s(*src, n)?,
                            f32s(a[next], n * n)?,
                            f32s(x[next], x_len)?,
                            n,
                            with_x,
                        );
                    }
                }
            }
        }
        Ok(())
    }

    /// The inverse (or log-determinant) of the n × n matrix in `input` by LU on the host in
    /// f64, uploaded as the storage of the plan's instruction `node`, which it computes.
    fn host_lu(
        &mut self,
        node: usize,
        n: usize,
        logdet: bool,
        input: Buf,
    ) -> Result<(), ExecError> {
        let x: Vec<f64> = self.read_buf(input)?.iter().map(|v| *v as f64).collect();
        let result: Vec<f32> = if logdet {
            vec![linalg::slogdet(&x, n).1 as f32]
        } else {
            linalg::inverse(&x, n)
                .map_err(|source| ExecError::Linalg {
                    graph: self.plan.name.clone(),
                    node,
                    op: Op::Inverse.to_string(),
                    source,
                })?
                .iter()
                .map(|v| *v as f32)
                .collect()
        };
        let handle = self.upload(&result);
        let b = self.plan.buffers.of_slot[node].expect("a computed value");
        self.buffers[b] = handle;
        Ok(())
    }

    /// Sums of `input` viewed as `shape` = `[rows, cols]` into `out` through cubek-reduce: over
    /// `axis` (0: one sum per column, 1: one per row) or, for `None`, of every value. A line of
    /// at most [`UNIT_REDUCE_MAX`] values is summed by one unit (the slices of a conv kernel
    /// gradient: few rows, thousands of columns), a longer one by a cube, without plane
    /// operations (CPU adapters lack them).
    fn reduce(
        &self,
        input: Handle,
        [rows, cols]: [usize; 2],
        axis: Option<usize>,
        out: Handle,
    ) -> Result<(), ExecError> {
        use cubecl::zspace::{Shape, Strides};
        use cubek_reduce::components::instructions::ReduceOperationConfig;
        use cubek_reduce::launch::{RoutineStrategy, VectorizationStrategy};
        use cubek_reduce::routines::{cube::CubeStrategy, unit::UnitStrategy, BlueprintStrategy};
        let f32_storage = f32::as_type_native_unchecked().storage_type();
        // A whole-tensor sum is the axis-0 sum of its flat view.
        let (in_shape, in_strides, out_shape, out_strides, along) = match axis {
            None => (vec![rows * cols], vec![1], vec![1], vec![1], 0),
            Some(0) => (
                vec![rows, cols],
                vec![cols, 1],
                vec![1, cols],
                vec![cols, 1],
                0,
            ),
            Some(_) => (
                vec![rows, cols],
                vec![cols, 1],
                vec![rows, 1],
                vec![1, 1],
                1,
            ),
        };
        let line = in_shape[along];
        let routine = if line <= UNIT_REDUCE_MAX {
            RoutineStrategy::Unit(BlueprintStrategy::Inferred(UnitStrategy))
        } else {
            RoutineStrategy::Cube(BlueprintStrategy::Inferred(CubeStrategy {
                use_planes: false,
            }))
        };
        // SAFETY: `input` holds rows·cols values and `out` one per output line.
        let (input, output) = unsafe {
            (
                TensorBinding::<R>::from_raw_parts(
                    input,
                    Strides::from(in_strides),
                    Shape::from(in_shape),
                ),
                TensorBinding::<R>::from_raw_parts(
                    out,
                    Strides::from(out_strides),
                    Shape::from(out_shape),
                ),
            )
        };
        self.count_launch();
        cubek_reduce::reduce(
            &self.client,
            input,
            output,
            along,
            cubek_reduce::ReduceStrategy {
                routine,
                vectorization: VectorizationStrategy {
                    parallel_output_vectorization: false,
                },
            },
            ReduceOperationConfig::Sum,
            cubek_reduce::ReduceDtypes {
                input: f32_storage,
                output: f32_storage,
                accumulation: f32_storage,
            },
        )
        .map_err(|e| ExecError::Device {
            graph: self.plan.name.clone(),
            message: format!(
                "cubek-reduce {} of [{rows} x {cols}]: {e:?}",
                reduce_name(axis)
            ),
        })
    }

    /// Launch `p` with the kernel chosen for its shape on its first launch, and kept. With
    /// `full_f32` (an elimination's products) the candidates are the plain-unit kernels
    /// whatever the program's precision: no tensor core rounds the operands.
    fn product(
        &self,
        p: &Product,
        a: Handle,
        b: Handle,
        out: Handle,
        full_f32: bool,
    ) -> Result<(), ExecError> {
        let chosen = if full_f32 {
            &self.exact_kernels
        } else {
            &self.matmul_kernels
        };
        let kernel = chosen.borrow().get(p).copied();
        if let Some(kernel) = kernel {
            return self.launch_product(kernel, p, a, b, out);
        }
        let candidates = if full_f32 {
            // A tensor-core kernel that `only` names (the tests force each kernel in turn) is
            // not one of these.
            MatmulOptions {
                precision: MatmulPrecision::F32,
                tune: self.matmul.tune,
                only: self.matmul.only.filter(|k| !k.tensor_cores()),
            }
            .candidates()
        } else {
            self.matmul.candidates()
        };
        let kernel = self.choose_kernel(&candidates, p, a, b, out)?;
        chosen.borrow_mut().insert(p.clone(), kernel);
        Ok(())
    }

    fn launch_product(
        &self,
        kernel: MatmulKernel,
        p: &Product,
        a: Handle,
        b: Handle,
        out: Handle,
    ) -> Result<(), ExecError> {
        self.count_launch();
        matmul::launch(&self.client, kernel, p, a, b, out)
            .map_err(|e| self.product_error(kernel, p, &e))
    }

    fn product_error(
        &self,
        kernel: MatmulKernel,
        p: &Product,
        e: &cubek_matmul::definition::MatmulSetupError,
    ) -> ExecError {
        ExecError::Device {
            graph: self.plan.name.clone(),
            message: format!(
                "cubek-matmul {kernel:?} on the {}x{}x{} product (batch {}): {}",
                p.m,
                p.k,
                p.n,
                p.batch,
                matmul::message(e)
            ),
        }
    }

    /// Run `p` with the first of `candidates` that the device can run, or (tuning) with
    /// each, timed over a few launches, and then once more with the fastest so that `out`
    /// holds its result. Returns the kernel.
    fn choose_kernel(
        &self,
        candidates: &[MatmulKernel],
        p: &Product,
        a: Handle,
        b: Handle,
        out: Handle,
    ) -> Result<MatmulKernel, ExecError> {
        const TIMED: usize = 3;
        let mut best: Option<(std::time::Duration, MatmulKernel)> = None;
        let mut last_run = None;
        let mut unavailable = Vec::new();
        for &kernel in candidates {
            match matmul::launch(&self.client, kernel, p, a.clone(), b.clone(), out.clone()) {
                Ok(()) => self.count_launch(),
                Err(e) if matmul::unavailable(&e) => {
                    unavailable.push(format!("{kernel:?}: {}", matmul::message(&e)));
                    continue;
                }
                Err(e) => return Err(self.product_error(kernel, p, &e)),
            }
            if !self.matmul.tune {
                return Ok(kernel);
            }
            self.sync()?;
            let started = std::time::Instant::now();
            for _ in 0..TIMED {
                self.launch_product(kernel, p, a.clone(), b.clone(), out.clone())?;
            }
            self.sync()?;
            let took = started.elapsed();
            last_run = Some(kernel);
            if best.is_none_or(|(t, _)| took < t) {
                best = Some((took, kernel));
            }
        }
        let Some((_, kernel)) = best else {
            return Err(ExecError::Device {
                graph: self.plan.name.clone(),
                message: format!(
                    "no cubek-matmul kernel runs the {}x{}x{} product on this device ({})",
                    p.m,
                    p.k,
                    p.n,
                    unavailable.join("; ")
                ),
            });
        };
        if last_run != Some(kernel) {
            self.launch_product(kernel, p, a, b, out)?;
        }
        Ok(kernel)
    }

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

    /// The first value of each named output, read back together (one device read).
    pub fn scalars(&self, names: &[String]) -> Result<Vec<f64>, ExecError> {
        let read = self.read_all(self.output_handles(names)?)?;
        self.first_values(&read, names)
    }

    fn output_handles(&self, names: &[String]) -> Result<Vec<Handle>, ExecError> {
        names
            .iter()
            .map(|name| self.handle(Buf::Slot(self.output_slot(name)?)))
            .collect()
    }

    /// The first value of each read-back output, named for the error when one is empty.
    fn first_values(&self, read: &[Vec<f32>], names: &[String]) -> Result<Vec<f64>, ExecError> {
        read.iter()
            .zip(names)
            .map(|(values, name)| {
                values
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
        let slot = self.plan.instrs.iter().position(
            |i| matches!(&i.op, Op::Param { name: n, .. } | Op::Input { name: n, .. } if n == name),
        );
        let Some(slot) = slot else {
            return self
                .unread
                .get(name)
                .cloned()
                .ok_or_else(|| ExecError::Missing {
                    graph: self.plan.name.clone(),
                    kind: "param",
                    name: name.to_string(),
                });
        };
        // An input still to take a carried output's value has that value.
        let slot = match self.carries.iter().find(|(input, _)| *input == slot) {
            Some((_, output)) if self.carry_pending.contains(&slot) => *output,
            _ => slot,
        };
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
        // Every parameter's rate is the base rate, or for learned inverses the inverses'
        // rate: two launch scalars serve them all.
        let (base, inverse_rate) = (lr.base, lr.base * lr.inverse_scale);
        // (parameter, gradient, m, v, length, is a learned inverse)
        let mut entries = Vec::new();
        for (param, gslot) in self.gradients() {
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
            if n == 0 {
                continue;
            }
            if !self.moments.contains_key(&param) {
                let zeros = vec![0f32; n];
                let moments = (self.upload(&zeros), self.upload(&zeros));
                self.moments.insert(param.clone(), moments);
            }
            let (m, v) = self.moments[&param].clone();
            let p = self.handle(Buf::Slot(pslot))?;
            let g = self.handle(Buf::Slot(gslot))?;
            entries.push((p, g, m, v, n, lr.of(&param) != base));
        }
        // One launch for all of them, or as many as the device's bindings per kernel require
        // (four per parameter and one for the launch's scalars: CUDA takes 255 parameters
        // per launch, lavapipe 7).
        for group in entries.chunks(self.bindings_per_launch().saturating_sub(1).max(4) / 4) {
            let mut params = SequenceArg::<R, Array<f32>>::new();
            let mut grads = SequenceArg::<R, Array<f32>>::new();
            let mut ms = SequenceArg::<R, Array<f32>>::new();
            let mut vs = SequenceArg::<R, Array<f32>>::new();
            let mut config = kernels::AdamConfig {
                sizes: Vec::new(),
                inverse: Vec::new(),
                b1: f32_bits(betas[0]),
                b2: f32_bits(betas[1]),
                eps: f32_bits(eps),
            };
            for (p, g, m, v, n, inverse) in group {
                params.push(unsafe { ArrayArg::from_raw_parts(p.clone(), *n) });
                grads.push(unsafe { ArrayArg::from_raw_parts(g.clone(), *n) });
                ms.push(unsafe { ArrayArg::from_raw_parts(m.clone(), *n) });
                vs.push(unsafe { ArrayArg::from_raw_parts(v.clone(), *n) });
                config.sizes.push(*n);
                config.inverse.push(*inverse);
            }
            let (count, dim) = kernels::Segments::new(config.sizes.clone(), |n| n).grid(|n| n);
            self.count_launch();
            kernels::adam::launch::<R>(
                &self.client,
                count,
                dim,
                params,
                grads,
                ms,
                vs,
                (base / c1) as f32,
                (inverse_rate / c1) as f32,
                (1.0 / c2.sqrt()) as f32,
                grad_scale as f32,
                config,
            );
        }
        Ok(())
    }

    /// Buffers one kernel may bind on this device.
    fn bindings_per_launch(&self) -> usize {
        self.client.properties().hardware.max_bindings as usize
    }

    /// The `grad.<name>` outputs: parameter name and slot.
    fn gradients(&self) -> Vec<(String, usize)> {
        self.plan
            .outputs
            .iter()
            .filter_map(|(n, s)| n.strip_prefix("grad.").map(|p| (p.to_string(), *s)))
            .collect()
    }

    /// The first value of each named output, and Σ g² of every `grad.<name>` output per
    /// parameter name, of the last run, in one device read: the squares are summed on the
    /// device to one partial per 256 values (one launch for every gradient), and the partials
    /// come back with the scalars (summed in f64 here).
    pub fn scalars_and_grad_sums(
        &self,
        names: &[String],
    ) -> Result<(Vec<f64>, GradSums), ExecError> {
        const CHUNK: usize = 256;
        let mut handles = self.output_handles(names)?;
        let grads = self.gradients();
        let sizes: Vec<usize> = grads
            .iter()
            .map(|(_, s)| numel(&self.plan.instrs[*s].shape))
            .collect();
        // Every gradient in as few launches as the device's bindings allow (one per
        // gradient, one for the partials, one for the launch's scalars); each launch writes
        // its gradients' partials into a buffer of its own, and all are read back together
        // with the scalars.
        let per_launch = self.bindings_per_launch().saturating_sub(2).max(1);
        let mut groups = Vec::new();
        for (first, group) in sizes.chunks(per_launch).enumerate() {
            let first = first * per_launch;
            let segments = kernels::Segments::new(group.to_vec(), |n| n.div_ceil(CHUNK));
            let partials = self.client.empty(segments.total().max(1) * 4);
            if segments.total() > 0 {
                let mut args = SequenceArg::<R, Array<f32>>::new();
                for ((_, slot), &n) in grads[first..].iter().zip(group) {
                    let h = self.handle(Buf::Slot(*slot))?;
                    args.push(unsafe { ArrayArg::from_raw_parts(h, n.max(1)) });
                }
                let (count, dim) = segments.grid(|n| n.div_ceil(CHUNK));
                self.count_launch();
                kernels::sum_squares_partials::launch::<R>(
                    &self.client,
                    count,
                    dim,
                    args,
                    unsafe { ArrayArg::from_raw_parts(partials.clone(), segments.total()) },
                    segments.clone(),
                    CHUNK,
                );
            }
            handles.push(partials);
            groups.push(segments);
        }
        let mut read = self.read_all(handles)?;
        let partials = read.split_off(names.len());
        let scalars = self.first_values(&read, names)?;
        // Σ g² of gradient `j` of each group: the sum of its partials.
        let group_sums = groups.iter().zip(&partials).flat_map(|(seg, values)| {
            (0..seg.sizes.len()).map(move |j| {
                values
                    .get(seg.offsets[j]..seg.offsets[j + 1])
                    .map_or(f64::NAN, |p| p.iter().map(|&v| f64::from(v)).sum())
            })
        });
        let sums = grads
            .into_iter()
            .zip(group_sums)
            .map(|((name, _), sum)| (name, sum))
            .collect();
        Ok((scalars, sums))
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
            moments.insert(name.clone(), (self.upload(m), self.upload(v)));
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
        let values = self.read_all(vec![h])?.pop().unwrap_or_default();
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
        lower_plan(plan)
            .launches
            .into_iter()
            .map(|l| match l {
                Launch::Fused {
                    program, inputs, ..
                } => source::KernelSpec::Fused {
                    program,
                    inputs: inputs.len(),
                },
                Launch::Matmul { product, role, .. } => source::KernelSpec::Matmul {
                    product,
                    what: role_name(role),
                },
                Launch::Im2col { image, .. } => source::KernelSpec::Im2col(image),
                Launch::Reduce {
                    rows, cols, axis, ..
                } => source::KernelSpec::Reduce { rows, cols, axis },
                Launch::Gather { config, .. } => source::KernelSpec::Gather(config),
                Launch::Spline { config, .. } => source::KernelSpec::Spline(config),
                Launch::GaussJordan { n, logdet, .. } => source::KernelSpec::GaussJordan {
                    n,
                    inverse: !logdet,
                },
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

    /// The im2col matrix of `x`, stored in scratch.
    fn im2col(&mut self, image: &Im2col, x: Buf) -> Buf {
        let out = self.temp(image.rows() * image.positions());
        self.launches.push(Launch::Im2col {
            image: image.clone(),
            x,
            out,
        });
        out
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
                rows,
                cols,
                ops: vec![KOp::Load(0, Access::ElemT)],
                outputs: vec![0],
            },
            inputs: vec![Buf::Slot(slot)],
            outputs: vec![t],
        });
        t
    }
}

/// Every launch of a plan, in order, the sizes of the scratch buffers and the index tables.
fn lower_plan(plan: &Plan) -> Lowered {
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
                let product = Product::plain(m, ins.shape[1], k, t(ins.args[0]), t(ins.args[1]));
                let (a, b) = (Buf::Slot(ins.args[0]), Buf::Slot(ins.args[1]));
                let role = ProductRole::Gemm {
                    epilogue: ins.epilogue.is_some(),
                };
                let Some(e) = ins.epilogue else {
                    low.launches.push(Launch::Matmul {
                        product,
                        role,
                        a,
                        b,
                        out: Buf::Slot(i),
                    });
                    continue;
                };
                // cubek-matmul overwrites its output: the product goes to scratch, and
                // `alpha·product + beta·c` is one elementwise pass.
                let scratch = low.temp(m * ins.shape[1]);
                low.launches.push(Launch::Matmul {
                    product,
                    role,
                    a,
                    b,
                    out: scratch,
                });
                let c_access = if t(ins.args[2]) {
                    Access::ElemT
                } else {
                    Access::Elem
                };
                low.launches.push(Launch::Fused {
                    program: FusedProgram {
                        rows: m,
                        cols: ins.shape[1],
                        ops: vec![
                            KOp::Load(0, Access::Elem),
                            KOp::Load(1, c_access),
                            KOp::Const(f32_bits(e.alpha)),
                            KOp::Const(f32_bits(e.beta)),
                            KOp::Mul(2, 0),
                            KOp::Mul(3, 1),
                            KOp::Add(4, 5),
                        ],
                        outputs: vec![6],
                    },
                    inputs: vec![scratch, Buf::Slot(ins.args[2])],
                    outputs: vec![Buf::Slot(i)],
                });
            }
            (None, Op::Inverse | Op::LogDet) => {
                // The operand is square, n × n (shape inference checks it).
                let n = operand_shape(0)[0];
                let input = low.contiguous(plan, ins.args[0]);
                let logdet = ins.op == Op::LogDet;
                let a = [low.temp(n * n), low.temp(n * n)];
                use gauss_jordan::PANEL;
                let last = n.div_ceil(PANEL) % 2;
                let (x, ld) = if logdet {
                    ([low.temp(1), low.temp(1)], Buf::Slot(i))
                } else {
                    // The last panel writes x[⌈n/b⌉ % 2]: the output itself.
                    let other = low.temp(n * n);
                    let x = if last == 0 {
                        [Buf::Slot(i), other]
                    } else {
                        [other, Buf::Slot(i)]
                    };
                    (x, low.temp(1))
                };
                let w = if logdet { n } else { 2 * n };
                let (panel, ops, src) = (low.temp(n * PANEL), low.temp(n * PANEL), low.temp(n));
                let (rows, update) = (low.temp(PANEL * w), low.temp(n * w));
                low.launches.push(Launch::GaussJordan {
                    node: i,
                    n,
                    logdet,
                    input,
                    a,
                    x,
                    panel,
                    ops,
                    src,
                    rows,
                    update,
                    ld,
                });
            }
            (None, Op::Reshape { .. }) => {
                // A copy in row-major order (the plan gives the result a buffer of its own).
                let input = low.contiguous(plan, ins.args[0]);
                low.launches.push(Launch::Fused {
                    program: FusedProgram {
                        rows: 1,
                        cols: numel(&ins.shape),
                        ops: vec![KOp::Load(0, Access::Elem)],
                        outputs: vec![0],
                    },
                    inputs: vec![input],
                    outputs: vec![Buf::Slot(i)],
                });
            }
            (None, Op::Conv2d) => {
                let (xs, ks) = (operand_shape(0), operand_shape(1));
                let image = Im2col {
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
                // kernel [co, ci·k²] · im2col(x) [ci·k², h·w·b] = y [co, h, w, b].
                let columns = low.im2col(&image, x);
                low.launches.push(Launch::Matmul {
                    product: Product::plain(ks[0], image.positions(), image.rows(), false, false),
                    role: ProductRole::Conv,
                    a: kernel,
                    b: columns,
                    out: Buf::Slot(i),
                });
            }
            (None, Op::ConvKernelGrad { k }) => {
                let (dys, xs) = (operand_shape(0), operand_shape(1));
                let image = Im2col {
                    ci: xs[0],
                    h: xs[1],
                    w: xs[2],
                    b: xs[3],
                    k: *k,
                };
                let (dy, x) = (
                    low.contiguous(plan, ins.args[0]),
                    low.contiguous(plan, ins.args[1]),
                );
                let columns = low.im2col(&image, x);
                // dk [co, ci·k²] = dy [co, P] · im2col(x)ᵀ over the P pixels of the batch.
                // The output is small and P long, so the pixels are cut into `slices`
                // equal runs, one batch entry of the product each (a view: no copy), until
                // about 256 output tiles exist with at least 512 pixels per slice; a column
                // sum finishes.
                let (m, n, pixels) = (dys[0], image.rows(), image.positions());
                let tiles = m.div_ceil(64) * n.div_ceil(64);
                let wanted = 256usize.div_ceil(tiles).clamp(1, (pixels / 512).max(1));
                let slices = (1..=wanted).rev().find(|s| pixels % s == 0).unwrap_or(1);
                let run = pixels / slices;
                let product = Product {
                    batch: slices,
                    m,
                    n,
                    k: run,
                    a_strides: [run, pixels, 1],
                    b_strides: [run, 1, pixels],
                };
                let role = ProductRole::ConvKernelGrad { slices };
                if slices == 1 {
                    low.launches.push(Launch::Matmul {
                        product,
                        role,
                        a: dy,
                        b: columns,
                        out: Buf::Slot(i),
                    });
                } else {
                    let partials = low.temp(slices * m * n);
                    low.launches.push(Launch::Matmul {
                        product,
                        role,
                        a: dy,
                        b: columns,
                        out: partials,
                    });
                    low.launches.push(Launch::Reduce {
                        rows: slices,
                        cols: m * n,
                        axis: Some(0),
                        from: partials,
                        to: Buf::Slot(i),
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
                        SplinePart::Inverse => SplineOut::Inverse,
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
                    SplinePart::Inverse => unreachable!("the inverse spline has no gradient"),
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
        Launch::Fused { .. } | Launch::Reduce { .. } => Work::Elementwise,
        Launch::Matmul {
            role: ProductRole::Gemm { .. },
            ..
        } => Work::Gemm,
        Launch::Matmul { .. } | Launch::Im2col { .. } => Work::Conv,
        Launch::Gather { .. } => Work::Shape,
        Launch::Spline { .. } => Work::Spline,
        Launch::GaussJordan { .. } => Work::Linalg,
    }
}

/// The longest line a reduction sums with one unit per output (longer: a cube per output).
const UNIT_REDUCE_MAX: usize = 64;

/// What a reduction sums, in words (profiles and errors).
fn reduce_name(axis: Option<usize>) -> &'static str {
    match axis {
        None => "sum",
        Some(0) => "column sums",
        Some(_) => "row sums",
    }
}

/// What a product computes, in a word (a kernel's name in `--emit`).
fn role_name(role: ProductRole) -> &'static str {
    match role {
        ProductRole::Gemm { .. } => "matmul",
        ProductRole::Conv => "conv2d_matmul",
        ProductRole::ConvKernelGrad { .. } => "conv_kernel_grad_matmul",
    }
}

/// A launch's kind for profiles: the kernel and its shape.
fn launch_kind(l: &Launch) -> String {
    match l {
        Launch::Fused { program, .. } => format!(
            "fused [{} x {}] ({} ops)",
            program.rows,
            program.cols,
            program.ops.len()
        ),
        Launch::Reduce {
            rows, cols, axis, ..
        } => format!("{} [{rows} x {cols}]", reduce_name(*axis)),
        Launch::Matmul {
            product: p, role, ..
        } => {
            let layout = |s: [usize; 3]| if s[2] == 1 { "N" } else { "T" };
            let extra = match role {
                ProductRole::Gemm { epilogue: true } => " (+acc pass)".to_string(),
                ProductRole::ConvKernelGrad { slices } if *slices > 1 => {
                    format!(" ({slices} pixel slices)")
                }
                _ => String::new(),
            };
            format!(
                "{} {}x{}x{} ({}{}){extra}",
                role_name(*role),
                p.m,
                p.k,
                p.n,
                layout(p.a_strides),
                layout(p.b_strides)
            )
        }
        Launch::Im2col { image: c, .. } => {
            format!("im2col {}ch {}x{} k{} b{}", c.ci, c.h, c.w, c.k, c.b)
        }
        Launch::Gather { config, .. } => format!(
            "gather{} [{}]",
            if config.weighted { " weighted" } else { "" },
            config.outputs
        ),
        Launch::Spline { config: c, .. } => format!("spline {:?} [{} x {}]", c.out, c.d, c.n),
        Launch::GaussJordan { n, logdet, .. } => format!(
            "{} {n}x{n} (Gauss-Jordan, {} launches)",
            if *logdet { "logdet" } else { "inverse" },
            gauss_jordan_launches(*n)
        ),
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
    let mut outputs = Vec::new();
    let mut out_regs = Vec::new();
    let mut after: Vec<Launch> = Vec::new();
    for (j, (m, _)) in k.outputs.iter().enumerate() {
        let r = reg[*m];
        let slot = Buf::Slot(slots[j]);
        out_regs.push(r);
        match axes[j] {
            None => outputs.push(slot),
            Some(axis) => {
                // The summands, one unit per element; then their sums in a launch of their own.
                temps.push(rows * cols);
                let t = Buf::Temp(temps.len() - 1);
                outputs.push(t);
                after.push(Launch::Reduce {
                    rows,
                    cols,
                    axis,
                    from: t,
                    to: slot,
                });
            }
        }
    }
    launches.push(Launch::Fused {
        program: FusedProgram {
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
