//! The executors of a plan, behind one trait ([`backend::Backend`]): the native `host`
//! executor (f32/f64, the numeric reference) and the CubeCL programs (`cube`: CUDA and wgpu), and
//! the optimizer update they run where the parameters live ([`adam`]).

pub mod adam;
pub mod backend;
pub mod conv_taps;
pub mod cube;
pub mod denormals;
pub mod elementwise;
pub mod host;
pub mod linalg;
pub mod profile;
pub(crate) mod simd;
pub mod values;
