//! What each `snfc` command does with its arguments, one file per command (the library calls are in
//! `snfc_runtime::commands`).

pub mod bench;
pub mod common;
pub mod compile;
pub mod eval;
pub mod grad;
pub mod plot;
pub mod sample;
pub mod train;
