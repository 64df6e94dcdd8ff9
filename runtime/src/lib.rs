//! snfc runtime: backends (host executor), data loading, training, evaluation and sampling.

pub mod host;
pub mod data;
pub mod image;
pub mod npy;
pub mod model;
