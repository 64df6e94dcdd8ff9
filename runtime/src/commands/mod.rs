//! What the `snfc` commands run: training, exact evaluation, sampling, gradients, timing. Each
//! drives a compiled plan through the [`crate::executors`] and reads and writes through
//! [`crate::io`].

pub mod angle;
pub mod bench;
pub mod eval;
pub mod grad;
pub mod plot;
pub mod progress;
pub mod sample;
pub mod train;
