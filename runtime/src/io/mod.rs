//! Files and data: data sets (IDX, `.npy`, the embedded MNIST digits) and batching, `.npy`
//! arrays, PNG images, parameters with their safetensors checkpoints, and the lock that keeps one
//! training run per directory.

pub mod atomic;
pub mod batch;
pub mod data;
pub mod image;
pub mod model;
pub mod npy;
pub mod run_lock;
