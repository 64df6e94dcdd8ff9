//! snfc compiler: spec → IR → exact training graph → e-graph rewrites.
//!
//! One stage per module, data flowing one way: [`spec`] (parse and validate), [`ir`] (the tensor
//! graph and the lowering of a spec to it), [`autodiff`] (exact gradients as IR), [`rewrite`]
//! (egg: the self-normalizing substitution and algebra), [`verify`] (what must hold after each
//! pass), [`compile`] (the pipeline).

pub mod autodiff;
pub mod compile;
pub mod fuse;
pub mod ir;
pub mod passes;
pub mod plan;
pub mod rewrite;
pub mod spec;
pub mod verify;
