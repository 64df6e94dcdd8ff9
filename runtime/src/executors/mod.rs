//! The executors of a plan, behind one trait ([`backend::Backend`]): the native `host`
//! executor (f32/f64, the numeric reference) and the CubeCL programs (`cube`: CUDA and wgpu).

pub mod backend;
pub mod cube;
pub mod elementwise;
pub mod host;
pub mod profile;
