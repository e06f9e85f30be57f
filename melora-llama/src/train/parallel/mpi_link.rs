//! The link between the processes (ranks) of a run started by an MPI
//! launcher (`mpirun -np N melora train ...`, `srun` on Slurm): rank and
//! size come from MPI, sums go through MPI's own reduce and broadcast.
//!
//! A sum is `MPI_Reduce` to rank 0 then `MPI_Bcast` of rank 0's total, not
//! `MPI_Allreduce`: the MPI standard does not require an all-reduce to give
//! every rank the same bits (an implementation may reduce in another order
//! on each rank), and the replicas must stay bit-identical. A rank that dies
//! ends the job (the launcher aborts the others and names the rank); a sum
//! that does not complete in the timeout ends this rank with a message, so
//! the launcher ends the rest.

use crate::error::LlamaError;
use mpi::collective::{CommunicatorCollectives, Root, SystemOperation};
use mpi::datatype::Equivalence;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::Threading;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// This process's MPI world: its rank, the number of ranks, and the sums
/// between them.
pub struct MpiLink {
    // Finalises MPI when dropped; the world communicator lives as long.
    _universe: Universe,
    world: SimpleCommunicator,
    rank: u32,
    size: u32,
    /// Milliseconds since `start` at which the sum in progress started;
    /// `u64::MAX` when none is.
    busy_since: Arc<AtomicU64>,
    start: Instant,
}

impl std::fmt::Debug for MpiLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MpiLink {{ rank: {}, size: {} }}", self.rank, self.size)
    }
}

// SAFETY: MPI is initialised with `Threading::Serialized` (checked in
// `init`): any thread may call it as long as no two do at once. The link is
// used through `&mut self` only (behind a `Mutex` where it is shared), so
// calls are serialised; the communicator is the world's handle, valid in
// every thread of the process.
unsafe impl Send for MpiLink {}

const IDLE: u64 = u64::MAX;

impl MpiLink {
    /// Initialises MPI (once per process; the sums are made by one thread
    /// at a time) and starts the watchdog that ends this rank when a sum
    /// takes longer than `timeout`.
    pub fn init(timeout: Duration) -> crate::Result<Self> {
        let (universe, provided) = mpi::initialize_with_threading(Threading::Serialized)
            .ok_or_else(|| LlamaError::Peers("MPI was initialised twice in this process".into()))?;
        if provided < Threading::Serialized {
            return Err(LlamaError::Peers(format!(
                "this MPI library offers thread support {provided:?}; melora's ranks need Serialized"
            )));
        }
        let world = universe.world();
        let (rank, size) = (world.rank() as u32, world.size() as u32);
        let busy_since = Arc::new(AtomicU64::new(IDLE));
        let start = Instant::now();
        let watched = busy_since.clone();
        std::thread::Builder::new()
            .name("melora-mpi-watchdog".into())
            .spawn(move || loop {
                std::thread::sleep(Duration::from_millis(200));
                let since = watched.load(Ordering::SeqCst);
                let now = start.elapsed().as_millis() as u64;
                if since != IDLE && now.saturating_sub(since) > timeout.as_millis() as u64 {
                    eprintln!(
                        "Error: rank {rank}: the other ranks did not answer in {} s (--peer-timeout): a rank hangs; ending this one",
                        timeout.as_secs()
                    );
                    // The launcher sees a rank end without finalising MPI and
                    // ends the job.
                    std::process::exit(124);
                }
            })
            .map_err(|e| LlamaError::Peers(format!("cannot start the MPI watchdog: {e}")))?;
        Ok(Self {
            _universe: universe,
            world,
            rank,
            size,
            busy_since,
            start,
        })
    }

    /// This process's rank, `0..size`; rank 0 leads.
    pub fn rank(&self) -> u32 {
        self.rank
    }

    /// The number of ranks.
    pub fn size(&self) -> u32 {
        self.size
    }

    /// `values` summed over the ranks, in place, in their own precision
    /// (f32 or f64): every rank gets rank 0's bits.
    pub fn sum<T: Equivalence + Default + Copy>(&mut self, values: &mut [T]) -> crate::Result<()> {
        self.watched(|world, rank| {
            let root = world.process_at_rank(0);
            if rank == 0 {
                let mut total = vec![T::default(); values.len()];
                root.reduce_into_root(&values[..], &mut total[..], SystemOperation::sum());
                values.copy_from_slice(&total);
            } else {
                root.reduce_into(&values[..], SystemOperation::sum());
            }
            root.broadcast_into(values);
        });
        Ok(())
    }

    /// `values` summed over the ranks by `MPI_Allreduce`, in place: what
    /// [`MpiLink::sum`] is measured against (`melora-bench allreduce`); the
    /// standard does not promise every rank the same bits from it.
    pub fn all_reduce_sum(&mut self, values: &mut [f32]) {
        self.watched(|world, _| {
            let mut total = vec![0f32; values.len()];
            world.all_reduce_into(&values[..], &mut total[..], SystemOperation::sum());
            values.copy_from_slice(&total);
        });
    }

    /// Rank 0's `bytes` on every rank (the others' are replaced).
    pub fn broadcast_bytes(&mut self, bytes: &mut Vec<u8>) {
        self.watched(|world, _| {
            let root = world.process_at_rank(0);
            let mut len = bytes.len() as u64;
            root.broadcast_into(&mut len);
            bytes.resize(len as usize, 0);
            root.broadcast_into(&mut bytes[..]);
        });
    }

    /// Runs a collective operation under the watchdog.
    fn watched<T>(&self, op: impl FnOnce(&SimpleCommunicator, u32) -> T) -> T {
        let now = self.start.elapsed().as_millis() as u64;
        self.busy_since.store(now, Ordering::SeqCst);
        let out = op(&self.world, self.rank);
        self.busy_since.store(IDLE, Ordering::SeqCst);
        out
    }
}
