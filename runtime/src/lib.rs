//! snfc runtime, in three parts: [`executors`] run a compiled plan (the host executor and the
//! CubeCL GPU programs behind one `Backend` trait), [`commands`] are what `snfc train / eval /
//! sample / grad / bench` do with them, and [`io`] reads and writes data, arrays, images and
//! checkpoints; [`distributed`] is what data-parallel training knows of the other processes (a
//! communicator: alone, or MPI with the `mpi` feature). Each module is also reachable at the crate root (`snfc_runtime::host`,
//! `snfc_runtime::train`, …).

pub mod commands;
pub mod distributed;
pub mod executors;
pub mod io;

pub use commands::{angle, bench, eval, grad, plot, progress, sample, train};
pub use executors::{backend, cube, host, profile};
pub use io::{atomic, batch, data, image, model, npy, run_lock};

/// A training step allocates and frees tensors of tens of MB hundreds of times (a Glow
/// coupling's activations are 40 MB at B = 100). glibc serves each from a fresh `mmap` and
/// unmaps it on free, so every one is page-faulted in again: about 10 ms per 40 MB here, over a
/// second per mnist_glow step. Serving them from the heap, which keeps freed memory (up to 2 GB
/// at its top), removes half the page faults and 12 % of that step (bench/results/
/// 2026-11-29-host-glow-conv-forms.txt). The process's resident size then stays near its peak,
/// so this is for the application to choose (the `snfc` binary does, first thing in `main`);
/// it does nothing outside Linux with glibc.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
pub fn keep_freed_memory() {
    // Safety: `mallopt` only changes allocator parameters (under the allocator's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
    }
}

/// See the Linux version: other allocators are left as they are.
#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
pub fn keep_freed_memory() {}
