//! Data-parallel training's view of the other processes: a small communicator trait, with one
//! implementation for a process that runs alone ([`Solo`]) and one on MPI ([`mpi`], behind the
//! cargo feature `mpi`). Nothing else in the runtime knows MPI: training asks for rank, size,
//! sums over ranks, a broadcast of bytes and a barrier, and leaves an NCCL implementation room
//! to replace the MPI one for GPU buffers later.

use std::fmt;
use std::rc::Rc;

#[cfg(feature = "mpi")]
pub mod mpi;

/// The processes of one data-parallel run. Every rank calls each method in the same order (they
/// are collective); a rank that stops calling leaves the others waiting, so a rank that fails
/// alone ends the job with [`Communicator::abort`].
pub trait Communicator: fmt::Debug {
    /// This process's rank, `0..size`.
    fn rank(&self) -> usize;
    /// How many processes take part.
    fn size(&self) -> usize;
    /// Element-wise sum over all ranks, in place, on every rank.
    fn all_reduce_sum_f64(&self, values: &mut [f64]);
    /// Element-wise sum over all ranks, in place, on every rank.
    fn all_reduce_sum_f32(&self, values: &mut [f32]);
    /// Rank `root`'s bytes on every rank (`bytes` is resized on the others).
    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>);
    /// Wait until every rank has arrived.
    fn barrier(&self);
    /// End every rank of the job with exit status `code` (a failure on one rank that the others
    /// cannot see).
    fn abort(&self, code: i32) -> !;
    /// What the run is, in words (`MPI, 4 ranks`).
    fn describe(&self) -> String;
}

/// A process that trains alone: every collective is the identity.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Communicator for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn all_reduce_sum_f64(&self, _: &mut [f64]) {}
    fn all_reduce_sum_f32(&self, _: &mut [f32]) {}
    fn broadcast_bytes(&self, _: usize, _: &mut Vec<u8>) {}
    fn barrier(&self) {}
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
    fn describe(&self) -> String {
        "one process".to_string()
    }
}

/// A shared handle on the run's communicator (one thread calls MPI: not `Send`).
pub type Comm = Rc<dyn Communicator>;

/// The communicator of a process that trains alone.
pub fn solo() -> Comm {
    Rc::new(Solo)
}

/// This process's place in its job: MPI's world when built with the `mpi` feature (under
/// `mpirun`, or alone as an MPI singleton), else [`Solo`]. MPI is initialized here, once per
/// process, and finalized when the last handle is dropped.
pub fn world() -> Comm {
    #[cfg(feature = "mpi")]
    if let Some(m) = mpi::Mpi::init() {
        return Rc::new(m);
    }
    solo()
}

/// Sum `values` over all ranks in place, for either precision of the host's values (a `Vec`,
/// not a slice, so that `Any` can name its type).
#[allow(clippy::ptr_arg)]
pub fn all_reduce_sum<T: 'static>(comm: &dyn Communicator, values: &mut Vec<T>) {
    if comm.size() == 1 {
        return;
    }
    let any: &mut dyn std::any::Any = values;
    if let Some(v) = any.downcast_mut::<Vec<f64>>() {
        comm.all_reduce_sum_f64(v);
    } else if let Some(v) = any.downcast_mut::<Vec<f32>>() {
        comm.all_reduce_sum_f32(v);
    } else {
        unreachable!("values are f32 or f64")
    }
}

/// The rows `[r·B/N, (r+1)·B/N)` of a global batch of `batch` that rank `r` of `n` takes.
pub fn shard(batch: usize, rank: usize, size: usize) -> std::ops::Range<usize> {
    rank * batch / size..(rank + 1) * batch / size
}

/// Columns `range` of a column-major `[D, batch]` batch, as a `[D, range.len()]` batch.
pub fn columns<T: Copy>(x: &[T], batch: usize, range: std::ops::Range<usize>) -> Vec<T> {
    let d = x.len() / batch.max(1);
    let mut out = Vec::with_capacity(d * range.len());
    for k in 0..d {
        out.extend_from_slice(&x[k * batch + range.start..k * batch + range.end]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_batch_in_order() {
        for (batch, size) in [(100, 1), (100, 2), (100, 4), (9, 3)] {
            let mut next = 0;
            for r in 0..size {
                let s = shard(batch, r, size);
                assert_eq!(s.start, next);
                assert_eq!(s.len(), batch / size);
                next = s.end;
            }
            assert_eq!(next, batch);
        }
    }

    #[test]
    fn columns_of_a_column_major_batch() {
        // [D = 2, B = 4]: row k holds k*10 + example.
        let x = [0, 1, 2, 3, 10, 11, 12, 13];
        assert_eq!(columns(&x, 4, 1..3), [1, 2, 11, 12]);
        assert_eq!(columns(&x, 4, 0..4), x);
    }

    #[test]
    fn solo_collectives_are_the_identity() {
        let c = Solo;
        let mut v = vec![1.5f32, -2.0];
        all_reduce_sum(&c, &mut v);
        assert_eq!(v, [1.5, -2.0]);
        let mut b = vec![1u8, 2];
        c.broadcast_bytes(0, &mut b);
        assert_eq!(b, [1, 2]);
        assert_eq!((c.rank(), c.size()), (0, 1));
    }
}
