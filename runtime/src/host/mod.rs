//! The CPU ("host") executor.

pub mod exec;
pub mod linalg;
