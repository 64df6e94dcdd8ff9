//! Matrix products through cubek-matmul, CubeCL's own GEMM library: tiled kernels on plain
//! units everywhere, tensor cores (TF32 for f32 operands) where the device has them. cubek 0.2
//! ships no autotuner, so a program times the kernels a product can run on its first launch
//! and keeps the fastest (on GPUs; a CPU adapter takes the first that runs).

use cubecl::prelude::*;
use cubecl::server::Handle;
use cubecl::zspace::{Shape, Strides};
use cubek_matmul::components::tile::TileMatmulKind;
use cubek_matmul::definition::{MatmulElems, MatmulSetupError};
use cubek_matmul::launch::launch_tiling;
use cubek_matmul::routines::double_buffering::{
    CyclicDoubleBufferingAlgorithm, DoubleBufferingArgs,
};
use cubek_matmul::routines::double_unit::DoubleUnitAlgorithm;
use cubek_matmul::routines::simple::{SimpleAlgorithm, SimpleArgs};
use cubek_matmul::routines::simple_unit::SimpleUnitAlgorithm;
use cubek_matmul::routines::BlueprintStrategy;
use cubek_std::InputBinding;

/// The arithmetic of f32 matrix products on a GPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum MatmulPrecision {
    /// Tensor cores where the device has them: operands rounded to TF32 (10-bit mantissa,
    /// relative error about 1e-3), accumulation in f32. Elsewhere the same as `F32`.
    #[default]
    Tf32,
    /// Full f32 products on plain units, also on devices with tensor cores.
    F32,
}

impl std::str::FromStr for MatmulPrecision {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "tf32" => Ok(Self::Tf32),
            "f32" => Ok(Self::F32),
            _ => Err(format!("unknown matmul precision `{s}` (tf32 or f32)")),
        }
    }
}

/// The cubek-matmul kernels a product may run on, each launched through its own routine
/// type (cubek's `Strategy` dispatch would compile some forty routines for every runtime:
/// a third of a release build).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MatmulKernel {
    /// Register tiles on plain units: every device.
    SimpleUnit,
    /// The same, double-buffered.
    DoubleUnit,
    /// Tensor-core (cooperative-matrix) tiles, cyclic operand loading.
    SimpleCyclicCmma,
    /// Tensor-core tiles, double-buffered.
    DoubleCyclicCmma,
}

impl MatmulKernel {
    /// The kernels, in the order they are tried when no timing decides.
    pub const ALL: [MatmulKernel; 4] = [
        MatmulKernel::SimpleCyclicCmma,
        MatmulKernel::DoubleCyclicCmma,
        MatmulKernel::SimpleUnit,
        MatmulKernel::DoubleUnit,
    ];

    /// Whether the kernel runs on tensor cores (and so rounds f32 operands to TF32).
    pub fn tensor_cores(self) -> bool {
        matches!(
            self,
            MatmulKernel::SimpleCyclicCmma | MatmulKernel::DoubleCyclicCmma
        )
    }
}

/// How a program picks the kernel of each product.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MatmulOptions {
    pub precision: MatmulPrecision,
    /// Time every kernel that runs a product on its first launch and keep the fastest;
    /// otherwise the first of the candidates that runs.
    pub tune: bool,
    /// Only this kernel (the backend tests run each one); `None`: every kernel the
    /// precision allows.
    pub only: Option<MatmulKernel>,
}

impl MatmulOptions {
    /// The kernels to try, in order.
    pub fn candidates(&self) -> Vec<MatmulKernel> {
        MatmulKernel::ALL
            .into_iter()
            .filter(|k| self.only.is_none_or(|o| o == *k))
            .filter(|k| self.precision == MatmulPrecision::Tf32 || !k.tensor_cores())
            .collect()
    }
}

/// `out[s] = A[s]·B[s]` for `s < batch`: `A[s]` is `m × k`, `B[s]` is `k × n`, each read
/// through its strides (batch, row, column) in elements, so a transposed operand or a split
/// inner dimension is a view, not a copy; `out` is contiguous `[batch, m, n]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Product {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a_strides: [usize; 3],
    pub b_strides: [usize; 3],
}

impl Product {
    /// A single product of row-major operands, each possibly stored transposed.
    pub fn plain(m: usize, n: usize, k: usize, a_t: bool, b_t: bool) -> Product {
        Product {
            batch: 1,
            m,
            n,
            k,
            a_strides: if a_t { [0, 1, m] } else { [0, k, 1] },
            b_strides: if b_t { [0, 1, k] } else { [0, n, 1] },
        }
    }

    /// Floating-point operations of one launch.
    pub fn flops(&self) -> f64 {
        2.0 * (self.batch * self.m * self.n * self.k) as f64
    }
}

/// Launch `p` with `kernel`. An `Unavailable` error (no tensor cores, a tile size the device
/// lacks) means the kernel cannot run this product here; nothing was launched.
pub fn launch<R: Runtime>(
    client: &ComputeClient<R>,
    kernel: MatmulKernel,
    p: &Product,
    a: Handle,
    b: Handle,
    out: Handle,
) -> Result<(), MatmulSetupError> {
    let f32_type = f32::as_type_native_unchecked();
    let view = |h: Handle, strides: [usize; 3], rows: usize, cols: usize| {
        // SAFETY: the plan sizes every buffer for the tensor it holds, and the strides
        // describe that tensor (or a transposed / sliced view of it) inside its buffer.
        let binding = unsafe {
            TensorBinding::<R>::from_raw_parts(
                h,
                Strides::from(strides),
                Shape::from([p.batch, rows, cols]),
            )
        };
        InputBinding::new(binding, f32_type.storage_type())
    };
    let lhs = view(a, p.a_strides, p.m, p.k);
    let rhs = view(b, p.b_strides, p.k, p.n);
    // SAFETY: `out` holds batch·m·n values, written row-major.
    let out = unsafe {
        TensorBinding::<R>::from_raw_parts(
            out,
            Strides::from([p.m * p.n, p.n, 1]),
            Shape::from([p.batch, p.m, p.n]),
        )
    };
    let dtypes = &mut MatmulElems::from_single_dtype(f32_type);
    // One tiled routine, named by its type, with the strategy it infers its blueprint from.
    macro_rules! tiled {
        ($routine:ty, $strategy:expr) => {
            launch_tiling::launch_ref::<R, $routine>(client, lhs, rhs, out, &$strategy, dtypes)
        };
    }
    let cmma = TileMatmulKind::Cmma;
    match kernel {
        MatmulKernel::SimpleUnit => tiled!(SimpleUnitAlgorithm, BlueprintStrategy::default()),
        MatmulKernel::DoubleUnit => tiled!(DoubleUnitAlgorithm, BlueprintStrategy::default()),
        MatmulKernel::SimpleCyclicCmma => tiled!(
            SimpleAlgorithm,
            BlueprintStrategy::Inferred(SimpleArgs {
                tile_matmul: cmma,
                ..Default::default()
            })
        ),
        MatmulKernel::DoubleCyclicCmma => tiled!(
            CyclicDoubleBufferingAlgorithm,
            BlueprintStrategy::Inferred(DoubleBufferingArgs {
                tile_matmul: cmma,
                ..Default::default()
            })
        ),
    }
}

/// Whether a launch error means "this kernel cannot run here" (try the next one).
pub fn unavailable(e: &MatmulSetupError) -> bool {
    matches!(e, MatmulSetupError::Unavailable(_))
}

/// A readable one-line message (cubek's `Debug` output ends in blank lines).
pub fn message(e: &MatmulSetupError) -> String {
    format!("{e:?}").trim().replace('\n', " ")
}
