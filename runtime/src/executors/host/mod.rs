//! The CPU ("host") executor.

pub mod exec;
pub mod fused;
pub mod shape_ops;
pub mod spline;
#[cfg(test)]
pub(crate) mod test_rng;
pub mod vmath;

// Shared with the GPU executor, and reachable here as before.
pub use super::{denormals, linalg};
