//! snfc runtime, in three parts: [`executors`] run a compiled plan (the host executor and the
//! CubeCL GPU programs behind one `Backend` trait), [`commands`] are what `snfc train / eval /
//! sample / grad / bench` do with them, and [`io`] reads and writes data, arrays, images and
//! checkpoints. Each module is also reachable at the crate root (`snfc_runtime::host`,
//! `snfc_runtime::train`, …).

pub mod commands;
pub mod executors;
pub mod io;

pub use commands::{angle, bench, eval, grad, plot, sample, train};
pub use executors::{backend, cube, host};
pub use io::{atomic, batch, data, image, model, npy};
