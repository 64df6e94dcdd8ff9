//! snfc runtime: backends (host executor), data loading, training, evaluation and sampling.

pub mod backend;
pub mod batch;
pub mod bench;
pub mod cube;
pub mod data;
pub mod eval;
pub mod grad;
pub mod host;
pub mod image;
pub mod model;
pub mod npy;
pub mod sample;
pub mod train;
