//! The CPU ("host") executor.

pub mod exec;
pub mod fused;
pub mod linalg;
pub mod shape_ops;
pub mod spline;
#[cfg(test)]
mod test_rng;
