//! Subnormal floats flushed to zero while the host executor computes.
//!
//! An LU of a banded, near-identity matrix (the Toeplitz matrix of a conv kernel near the
//! identity) fills its inverse with entries that decay geometrically away from the band, and in
//! f32 most of them end up subnormal. Intel cores take a microcode assist of about a hundred
//! cycles per subnormal operand: the nine 784×784 inverses of an exact CNN step ran ten times
//! slower than on random data, and slower than in f64. Setting the SSE control bits FTZ
//! (results that would be subnormal become zero) and DAZ (subnormal operands read as zero)
//! removes the stall; the values lost are below 1.2e-38 (f32) or 2.2e-308 (f64), far under
//! any tolerance of a training step. PyTorch offers the same switch as
//! `torch.set_flush_denormal(True)`.
//!
//! The bits live in each thread's MXCSR register, so [`flush_denormals`] sets them on the
//! calling thread and on every thread of the current rayon pool (where the GEMMs and the LU run),
//! and puts each thread's previous setting back afterwards, so that code around the library is
//! unaffected. Nested and concurrent uses count per thread: a thread flushes while any use is
//! active on it. On other architectures the functions run `f` unchanged.

use std::cell::Cell;

/// MXCSR bit 15: flush subnormal results to zero.
#[cfg(target_arch = "x86_64")]
const FTZ: u32 = 1 << 15;
/// MXCSR bit 6: treat subnormal operands as zero.
#[cfg(target_arch = "x86_64")]
const DAZ: u32 = 1 << 6;

#[cfg(target_arch = "x86_64")]
mod csr {
    /// The calling thread's MXCSR (`_mm_getcsr`, deprecated in `core::arch`, is this
    /// instruction).
    #[inline(never)]
    pub fn read() -> u32 {
        let mut csr: u32 = 0;
        // SAFETY: `stmxcsr` stores 4 bytes into `csr`, a valid, aligned u32.
        unsafe {
            core::arch::asm!("stmxcsr [{}]", in(reg) &mut csr, options(nostack, preserves_flags));
        }
        csr
    }

    /// Load `csr` into the calling thread's MXCSR.
    #[inline(never)]
    pub fn write(csr: u32) {
        // SAFETY: `ldmxcsr` reads 4 bytes from `csr`; callers only change the FTZ and DAZ bits
        // of a value read from the register, which are valid on every x86-64 CPU.
        unsafe {
            core::arch::asm!("ldmxcsr [{}]", in(reg) &csr, options(nostack, preserves_flags, readonly));
        }
    }
}

thread_local! {
    /// (active uses on this thread, the FTZ/DAZ bits it had before the first).
    static USES: Cell<(u32, u32)> = const { Cell::new((0, 0)) };
}

#[cfg(target_arch = "x86_64")]
fn enter() {
    USES.with(|uses| {
        let (n, saved) = uses.get();
        if n == 0 {
            let csr = csr::read();
            csr::write(csr | FTZ | DAZ);
            uses.set((1, csr & (FTZ | DAZ)));
        } else {
            uses.set((n + 1, saved));
        }
    });
}

#[cfg(target_arch = "x86_64")]
fn leave() {
    USES.with(|uses| {
        let (n, saved) = uses.get();
        if n == 1 {
            csr::write((csr::read() & !(FTZ | DAZ)) | saved);
        }
        uses.set((n.saturating_sub(1), saved));
    });
}

#[cfg(not(target_arch = "x86_64"))]
fn enter() {}

#[cfg(not(target_arch = "x86_64"))]
fn leave() {}

/// Leaves on every thread that [`flush_denormals`] entered, also when `f` panics.
struct Restore;

impl Drop for Restore {
    fn drop(&mut self) {
        rayon::broadcast(|_| leave());
        leave();
    }
}

/// Run `f` with subnormals flushed to zero on the calling thread and on every thread of the
/// current rayon pool; each thread's previous setting is restored when `f` returns or panics.
pub fn flush_denormals<R>(f: impl FnOnce() -> R) -> R {
    enter();
    rayon::broadcast(|_| enter());
    let _restore = Restore;
    f()
}

/// Whether the calling thread currently flushes subnormals (both FTZ and DAZ set).
pub fn flushing() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        csr::read() & (FTZ | DAZ) == FTZ | DAZ
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
mod tests {
    use super::*;
    use std::hint::black_box;

    /// Whether every thread of the current pool flushes.
    fn pool_flushing() -> Vec<bool> {
        rayon::broadcast(|_| flushing())
    }

    #[test]
    fn flushes_inside_and_restores_after() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(3)
            .build()
            .expect("pool");
        pool.install(|| {
            assert!(!flushing());
            assert_eq!(pool_flushing(), vec![false; 3]);
            let tiny = black_box(f32::MIN_POSITIVE);
            // Outside: a subnormal result survives.
            assert!(black_box(tiny / 4.0) > 0.0);
            flush_denormals(|| {
                assert!(flushing());
                assert_eq!(pool_flushing(), vec![true; 3]);
                // FTZ: a subnormal result is zero; DAZ: a subnormal operand reads as zero.
                assert_eq!(black_box(tiny) / black_box(4.0f32), 0.0);
                assert_eq!(black_box(f64::MIN_POSITIVE / 4.0) * 1.0, 0.0);
                // Nested use keeps flushing after the inner one ends.
                flush_denormals(|| assert!(flushing()));
                assert!(flushing());
                assert_eq!(pool_flushing(), vec![true; 3]);
            });
            assert!(!flushing());
            assert_eq!(pool_flushing(), vec![false; 3]);
            assert!(black_box(tiny / 4.0) > 0.0);
        });
    }

    #[test]
    fn restores_after_a_panic() {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .expect("pool");
        pool.install(|| {
            let caught = std::panic::catch_unwind(|| flush_denormals(|| panic!("inside")));
            assert!(caught.is_err());
            assert!(!flushing());
            assert_eq!(pool_flushing(), vec![false; 2]);
        });
    }
}
