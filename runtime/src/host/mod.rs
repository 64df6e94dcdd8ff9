//! The CPU ("host") executor.

pub mod linalg;
pub mod exec;
