//! The CPU ("host") executor.

pub mod denormals;
pub mod exec;
pub mod fused;
pub mod linalg;
pub mod shape_ops;
pub mod spline;
#[cfg(test)]
mod test_rng;
pub mod vmath;
