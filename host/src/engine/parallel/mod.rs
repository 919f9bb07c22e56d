//! Data-parallel training across processes on an existing collective engine: MPI for CPU
//! tensors (feature `mpi`), NCCL for CUDA tensors (feature `nccl`).
//!
//! A launcher (`mpirun`, `srun`, or torchrun-style variables) starts `W` ranks running the same
//! command. Each rank reads its `batch / W` windows of every global batch ([`Shard`]), computes
//! its gradient, and [`World::average_gradients`] averages the gradients across ranks in a few
//! large buckets; every rank then applies the same AdamW update. The loss values of every
//! micro-batch are averaged too ([`World::mean`]) before anything decides on them (the router,
//! the non-finite skip), so every rank takes the same branch. Rank 0 alone writes the run
//! directory; the others read what it wrote (a resume, a pretrained teacher).
//!
//! - [`launch`]: which launcher started this process, and the world it joins.
//! - [`buckets`]: the gradients, flattened into buckets, all-reduced, split back.
//! - [`drift`]: the cross-rank checksum of the parameters.

mod buckets;
mod drift;
pub mod launch;
#[cfg(test)]
pub(crate) mod local;
#[cfg(feature = "mpi")]
mod mpi;
#[cfg(feature = "nccl")]
mod nccl;
#[cfg(any(feature = "mpi", feature = "nccl", test))]
mod owner;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{Tensor, Var};

use retort_core::config::ParallelSection;
use retort_core::Result;

/// The collective operations a data-parallel run needs, on one backend. Every rank calls the
/// same operations in the same order; each returns the same result on every rank.
pub trait Collective: Send + Sync {
    /// This process's rank, from 0.
    fn rank(&self) -> usize;
    /// Number of ranks.
    fn size(&self) -> usize;
    /// The backend's name (`mpi`, `nccl`), for `retort check` and the logs.
    fn backend(&self) -> &'static str;
    /// The element-wise sum of a 1-D f32 tensor over the ranks.
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor>;
    /// The element-wise sum of `values` over the ranks, in place.
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()>;
    /// Every rank's `value`, by rank.
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>>;
    /// Returns once every rank has called it.
    fn barrier(&self) -> Result<()>;
    /// Ends every rank's process with exit code `code` (a failure on one rank must not leave
    /// the others waiting in a collective).
    fn abort(&self, code: i32) -> !;
}

/// Which of the ranks' windows this process reads: rows `[rank * b, (rank + 1) * b)` of every
/// global batch of `ranks * b` rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// This process's rank.
    pub rank: usize,
    /// Number of ranks.
    pub ranks: usize,
}

impl Shard {
    /// One process reading every row.
    pub const WHOLE: Shard = Shard { rank: 0, ranks: 1 };

    /// This rank's rows of `rows` (a global batch), which `ranks` divides.
    pub fn rows<T: Clone>(&self, rows: &[T]) -> Vec<T> {
        let per_rank = rows.len() / self.ranks;
        rows[self.rank * per_rank..(self.rank + 1) * per_rank].to_vec()
    }
}

/// The ranks of a run and how they cooperate; one process alone is a world of size 1, where
/// every operation is free.
#[derive(Clone)]
pub struct World {
    comm: Option<Arc<dyn Collective>>,
    bucket_bytes: usize,
    check_every: usize,
    /// Nanoseconds spent in the collectives of the training loop so far.
    comm_nanos: Arc<AtomicU64>,
}

impl std::fmt::Debug for World {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "World(rank {} of {}, {})", self.rank(), self.size(), self.backend())
    }
}

impl World {
    /// One process.
    pub fn single() -> Self {
        World {
            comm: None,
            bucket_bytes: 0,
            check_every: 0,
            comm_nanos: Arc::default(),
        }
    }

    /// The world of `comm` with the settings of `[parallel]`.
    pub fn new(comm: Arc<dyn Collective>, spec: &ParallelSection) -> Self {
        World {
            comm: Some(comm),
            bucket_bytes: spec.bucket_mb.max(1) << 20,
            check_every: spec.check_every,
            comm_nanos: Arc::default(),
        }
    }

    /// This process's rank.
    pub fn rank(&self) -> usize {
        self.comm.as_ref().map_or(0, |c| c.rank())
    }

    /// Number of ranks.
    pub fn size(&self) -> usize {
        self.comm.as_ref().map_or(1, |c| c.size())
    }

    /// Whether this process writes the run directory (rank 0).
    pub fn is_root(&self) -> bool {
        self.rank() == 0
    }

    /// The collective backend (`none` for one process).
    pub fn backend(&self) -> &'static str {
        self.comm.as_ref().map_or("none", |c| c.backend())
    }

    /// The rows this rank reads.
    pub fn shard(&self) -> Shard {
        Shard {
            rank: self.rank(),
            ranks: self.size(),
        }
    }

    /// Seconds this process has spent in the training loop's collectives (waiting for the
    /// other ranks included).
    pub fn comm_seconds(&self) -> f64 {
        self.comm_nanos.load(Ordering::Relaxed) as f64 * 1e-9
    }

    /// `f(comm)`, timed into [`Self::comm_seconds`]; `alone` in a world of one.
    fn timed<T>(&self, alone: T, f: impl FnOnce(&dyn Collective, T) -> Result<T>) -> Result<T> {
        let Some(c) = &self.comm else { return Ok(alone) };
        let started = Instant::now();
        let out = f(c.as_ref(), alone);
        self.comm_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        out
    }

    /// Sums `values` over the ranks, in place.
    pub fn sum(&self, values: &mut [f64]) -> Result<()> {
        self.timed((), |c, ()| c.all_reduce_sum_f64(values))
    }

    /// Averages `values` over the ranks, in place (a NaN on any rank is a NaN on every rank).
    pub fn mean(&self, values: &mut [f64]) -> Result<()> {
        self.sum(values)?;
        let n = self.size() as f64;
        values.iter_mut().for_each(|v| *v /= n);
        Ok(())
    }

    /// The gradients averaged over the ranks ([`buckets`]).
    pub fn average_gradients(&self, grads: Vec<Tensor>) -> Result<Vec<Tensor>> {
        let bucket_bytes = self.bucket_bytes;
        self.timed(grads, |c, g| buckets::average(c, g, bucket_bytes))
    }

    /// After step `step`: when the cross-rank check is due, an error unless every rank holds
    /// the parameters rank 0 holds ([`drift`]).
    pub fn check_same_parameters(&self, vars: &[(String, Var)], step: usize) -> Result<()> {
        match &self.comm {
            Some(c) if self.check_every > 0 && step.is_multiple_of(self.check_every) => {
                drift::check(c.as_ref(), vars, step)
            }
            _ => Ok(()),
        }
    }

    /// Waits for every rank (rank 0 has written what the others read next).
    pub fn barrier(&self) -> Result<()> {
        self.comm.as_ref().map_or(Ok(()), |c| c.barrier())
    }

    /// In a world of several ranks, ends every rank's process with `code` (after this rank
    /// printed why); returns in a world of one.
    pub fn abort_others(&self, code: i32) {
        if let Some(c) = self.comm.as_ref().filter(|c| c.size() > 1) {
            c.abort(code);
        }
    }
}
