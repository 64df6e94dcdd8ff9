//! Files and data: data sets (IDX, `.npy`, the embedded MNIST digits) and batching, `.npy`
//! arrays, PNG images, and parameters with their safetensors checkpoints.

pub mod atomic;
pub mod batch;
pub mod data;
pub mod image;
pub mod model;
pub mod npy;
