//! [`Communicator`] on MPI (rsmpi, any MPI-3.1 library; CI uses Debian's Open MPI 4.1). The
//! process initializes MPI once, in [`Mpi::init`], and finalizes it when the returned value is
//! dropped. Started without `mpirun`, the process is an MPI singleton: one rank, as alone.
//! Only the thread that initialized MPI calls it (`Funneled`): rayon's workers never do.

use super::Communicator;
use mpi::collective::SystemOperation;
use mpi::environment::Universe;
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator as _, CommunicatorCollectives as _, Root as _};
use std::fmt;

/// MPI's world communicator, and the environment that finalizes MPI when dropped.
pub struct Mpi {
    world: SimpleCommunicator,
    // Dropped after `world`: finalizes MPI.
    _universe: Universe,
}

impl fmt::Debug for Mpi {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Mpi {{ rank: {}, size: {} }}", self.rank(), self.size())
    }
}

impl Mpi {
    /// Initialize MPI for this process; `None` when it was initialized already.
    pub fn init() -> Option<Mpi> {
        let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)?;
        Some(Mpi {
            world: universe.world(),
            _universe: universe,
        })
    }
}

impl Communicator for Mpi {
    fn rank(&self) -> usize {
        self.world.rank() as usize
    }
    fn size(&self) -> usize {
        self.world.size() as usize
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) {
        // rsmpi has no MPI_IN_PLACE: one copy of the buffer to send from.
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
    }
    fn all_reduce_sum_f32(&self, values: &mut [f32]) {
        let send = values.to_vec();
        self.world
            .all_reduce_into(&send[..], values, SystemOperation::sum());
    }
    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) {
        let root = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        // MPI counts are i32: send long buffers in pieces.
        for chunk in bytes.chunks_mut(1 << 30) {
            root.broadcast_into(chunk);
        }
    }
    fn barrier(&self) {
        self.world.barrier();
    }
    fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
    fn describe(&self) -> String {
        format!("MPI, {} ranks", self.size())
    }
}
