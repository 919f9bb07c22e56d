//! The NCCL backend (feature `nccl`): CUDA tensors reduced on the GPUs through cudarc's NCCL
//! bindings. The ranks meet through NCCL's own bootstrap: with `NCCL_COMM_ID` set (by default
//! to the torchrun-style `MASTER_ADDR:MASTER_PORT`), every rank's `ncclGetUniqueId` returns
//! the same id and rank 0 serves the bootstrap at that address. A communicator's handle may not
//! cross threads, so one thread owns it ([`Owner`]) and runs the collectives the others send
//! it.

use std::sync::mpsc::Sender;
use std::sync::Arc;

use candle_core::cuda_backend::cudarc::driver::{CudaContext, CudaStream};
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda_backend::CudaStorage;
use candle_core::op::BackpropOp;
use candle_core::{Storage, Tensor};

use retort_core::{Error, Result};

use super::owner::Owner;
use super::Collective;

/// One request to the NCCL thread, with where its answer goes.
enum Call {
    SumF32(Tensor, Sender<Result<Tensor>>),
    SumF64(Vec<f64>, Sender<Result<Vec<f64>>>),
    GatherU64(u64, Sender<Result<Vec<u64>>>),
}

/// An NCCL communicator over every rank, through its thread.
pub struct NcclCollective {
    rank: usize,
    size: usize,
    owner: Owner<Call>,
}

impl NcclCollective {
    /// Joins as `rank` of `ranks` on this process's GPU (ordinal 0 of the devices it sees:
    /// `join` narrowed `CUDA_VISIBLE_DEVICES` to `LOCAL_RANK`'s), bootstrapping at `master`
    /// (`host:port`) unless `NCCL_COMM_ID` says where.
    pub fn init(rank: usize, ranks: usize, master: &str) -> Result<Self> {
        if std::env::var_os("NCCL_COMM_ID").is_none() && !master.is_empty() {
            std::env::set_var("NCCL_COMM_ID", master);
        }
        let (owner, opened) = Owner::start("nccl", move || Ok((communicator(rank, ranks)?, ())), serve)?;
        opened.map_err(|e| Error::Runtime(format!("NCCL could not join rank {rank} of {ranks}: {e}")))?;
        Ok(NcclCollective {
            rank,
            size: ranks,
            owner,
        })
    }
}

/// The communicator of `rank` among `ranks` on GPU 0's stream.
fn communicator(rank: usize, ranks: usize) -> std::result::Result<Comm, String> {
    let context = CudaContext::new(0).map_err(|e| format!("CUDA device 0: {e}"))?;
    let stream: Arc<CudaStream> = context.default_stream();
    let id = Id::new().map_err(|e| format!("ncclGetUniqueId: {e:?}"))?;
    Comm::from_rank(stream, rank, ranks, id).map_err(|e| format!("ncclCommInitRank: {e:?}"))
}

fn nccl(what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Runtime(format!("NCCL {what} failed: {e:?}"))
}

fn serve(comm: &Comm, call: Call) {
    match call {
        Call::SumF32(flat, answer) => {
            let _ = answer.send(sum_tensor(comm, &flat));
        }
        Call::SumF64(values, answer) => {
            let _ = answer.send(sum_values(comm, &values));
        }
        Call::GatherU64(value, answer) => {
            let _ = answer.send(gather(comm, value));
        }
    }
}

/// The element-wise sum over the ranks of a contiguous 1-D f32 CUDA tensor, as a new tensor on
/// its device (the stream synchronised: the result is complete when returned).
fn sum_tensor(comm: &Comm, flat: &Tensor) -> Result<Tensor> {
    let n = flat.elem_count();
    let flat = flat.contiguous()?;
    let (storage, layout) = flat.storage_and_layout();
    let Storage::Cuda(cuda) = &*storage else {
        return Err(Error::Runtime(
            "the NCCL backend reduces CUDA tensors only (run.device = \"cuda\")".into(),
        ));
    };
    let start = layout.start_offset();
    let input = cuda.as_cuda_slice::<f32>()?.slice(start..start + n);
    let stream = comm.stream();
    let mut out = stream.alloc_zeros::<f32>(n).map_err(|e| nccl("allocation", e))?;
    comm.all_reduce(&input, &mut out, &ReduceOp::Sum)
        .map_err(|e| nccl("all-reduce", e))?;
    stream.synchronize().map_err(|e| nccl("synchronisation", e))?;
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(out, cuda.device.clone()));
    Ok(Tensor::from_storage(storage, n, BackpropOp::none(), false))
}

fn sum_values(comm: &Comm, values: &[f64]) -> Result<Vec<f64>> {
    let stream = comm.stream();
    let input = stream.clone_htod(values).map_err(|e| nccl("copy to the GPU", e))?;
    let mut out = stream
        .alloc_zeros::<f64>(values.len())
        .map_err(|e| nccl("allocation", e))?;
    comm.all_reduce(&input, &mut out, &ReduceOp::Sum)
        .map_err(|e| nccl("all-reduce", e))?;
    stream.clone_dtoh(&out).map_err(|e| nccl("copy from the GPU", e))
}

fn gather(comm: &Comm, value: u64) -> Result<Vec<u64>> {
    let stream = comm.stream();
    let input = stream.clone_htod(&[value]).map_err(|e| nccl("copy to the GPU", e))?;
    let mut out = stream
        .alloc_zeros::<u64>(comm.world_size())
        .map_err(|e| nccl("allocation", e))?;
    comm.all_gather(&input, &mut out).map_err(|e| nccl("all-gather", e))?;
    stream.clone_dtoh(&out).map_err(|e| nccl("copy from the GPU", e))
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn backend(&self) -> &'static str {
        "nccl"
    }
    fn all_reduce_sum(&self, flat: &Tensor) -> Result<Tensor> {
        let flat = flat.clone();
        self.owner.ask(|tx| Call::SumF32(flat, tx))?
    }
    fn all_reduce_sum_f64(&self, values: &mut [f64]) -> Result<()> {
        let sum = self.owner.ask(|tx| Call::SumF64(values.to_vec(), tx))??;
        values.copy_from_slice(&sum);
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        self.owner.ask(|tx| Call::GatherU64(value, tx))?
    }
    fn barrier(&self) -> Result<()> {
        self.all_reduce_sum_f64(&mut [0.0])
    }
    /// NCCL cannot end the other ranks: this one exits, and the launcher (torchrun's agent, a
    /// SLURM step) terminates the rest, which exit 1 on its SIGTERM.
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}
