//! The MPI backend (feature `mpi`, through the `mpi` crate over the system's Open MPI or
//! MPICH). MPI's handles may not cross threads, so one thread owns MPI ([`Owner`]): it
//! initialises it (`MPI_THREAD_FUNNELED`), runs every collective the other threads send it,
//! and finalises it when the world is dropped.

use std::sync::mpsc::Sender;

use candle_core::{Device, Tensor};
use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::traits::{Communicator, CommunicatorCollectives};

use retort_core::{Error, Result};

use super::owner::Owner;
use super::Collective;

/// One request to the MPI thread, with where its answer goes.
enum Call {
    SumF32(Vec<f32>, Sender<Vec<f32>>),
    SumF64(Vec<f64>, Sender<Vec<f64>>),
    GatherU64(u64, Sender<Vec<u64>>),
    Barrier(Sender<()>),
    Abort(i32),
}

/// `MPI_COMM_WORLD`, through its thread.
pub struct MpiCollective {
    rank: usize,
    size: usize,
    owner: Owner<Call>,
}

impl MpiCollective {
    /// Initialises MPI on its own thread.
    pub fn init() -> Result<Self> {
        let (owner, opened) = Owner::start(
            "mpi",
            || {
                let (universe, _) = mpi::initialize_with_threading(Threading::Funneled)
                    .ok_or("MPI_Init_thread failed (or MPI was initialised already)")?;
                let world = universe.world();
                let ranks = (world.rank() as usize, world.size() as usize);
                Ok((universe, ranks))
            },
            |universe: &Universe, call| serve(&universe.world(), call),
        )?;
        let (rank, size) = opened.map_err(|e| Error::Runtime(format!("MPI could not be initialised: {e}")))?;
        Ok(MpiCollective { rank, size, owner })
    }
}

fn serve(world: &mpi::topology::SimpleCommunicator, call: Call) {
    match call {
        Call::SumF32(mine, answer) => {
            let mut sum = vec![0f32; mine.len()];
            world.all_reduce_into(&mine[..], &mut sum[..], SystemOperation::sum());
            let _ = answer.send(sum);
        }
        Call::SumF64(mine, answer) => {
            let mut sum = vec![0f64; mine.len()];
            world.all_reduce_into(&mine[..], &mut sum[..], SystemOperation::sum());
            let _ = answer.send(sum);
        }
        Call::GatherU64(mine, answer) => {
            let mut all = vec![0u64; world.size() as usize];
            world.all_gather_into(&mine, &mut all[..]);
            let _ = answer.send(all);
        }
        Call::Barrier(answer) => {
            world.barrier();
            let _ = answer.send(());
        }
        Call::Abort(code) => world.abort(code),
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "mpi"
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let mine = flat.to_vec1::<f32>()?;
        let n = mine.len();
        let sum = self.owner.ask(|tx| Call::SumF32(mine, tx))?;
        let on_host = Tensor::from_vec(sum, n, &Device::Cpu)?;
        Ok(on_host.to_device(flat.device())?)
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let sum = self.owner.ask(|tx| Call::SumF64(values.to_vec(), tx))?;
        values.copy_from_slice(&sum);
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        self.owner.ask(|tx| Call::GatherU64(value, tx))
    }
    fn barrier(&self) -> Result<()> {
        self.owner.ask(Call::Barrier)
    }
    fn abort(&self, code: i32) -> ! {
        self.owner.send(Call::Abort(code));
        // MPI_Abort ends this process; should the MPI thread be gone, end it here.
        std::thread::sleep(std::time::Duration::from_secs(30));
        std::process::exit(code)
    }
}
