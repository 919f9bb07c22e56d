//! Which launcher started this process and the world it joins: `mpirun`/`mpiexec` (Open MPI,
//! MPICH), `srun`, or torchrun-style variables (`RANK`, `WORLD_SIZE`, `LOCAL_RANK`,
//! `MASTER_ADDR`, `MASTER_PORT`); none of them (or a world of one) is a single process.

use std::sync::Arc;

use retort_core::config::{ParallelBackend, ParallelSection};
use retort_core::{Error, Result};

use super::{Collective, World};

/// How this process was started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Launch {
    /// Alone (no launcher).
    Single,
    /// By an MPI launcher, which MPI itself joins.
    Mpi {
        /// Ranks the launcher started.
        ranks: usize,
        /// This one.
        rank: usize,
        /// The launcher, for messages.
        launcher: &'static str,
    },
    /// With torchrun-style variables (NCCL bootstraps from `MASTER_ADDR:MASTER_PORT`).
    Torchrun {
        /// `WORLD_SIZE`.
        ranks: usize,
        /// `RANK`.
        rank: usize,
        /// `LOCAL_RANK` (the GPU of this rank on its node); default `RANK`.
        local_rank: usize,
        /// `MASTER_ADDR:MASTER_PORT`.
        master: String,
    },
}

/// The (size, rank) variables of the MPI launchers, in the order they are looked for.
const MPI_LAUNCHERS: [(&str, &str, &str); 3] = [
    ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "mpirun (Open MPI)"),
    ("PMI_SIZE", "PMI_RANK", "mpiexec (MPICH)"),
    ("SLURM_STEP_NUM_TASKS", "SLURM_PROCID", "srun"),
];

impl Launch {
    /// The launch `var` (an environment lookup) describes.
    pub fn detect(var: &dyn Fn(&str) -> Option<String>) -> Result<Launch> {
        let number = |name: &str| -> Result<Option<usize>> {
            var(name)
                .map(|v| {
                    v.trim().parse::<usize>().map_err(|_| {
                        Error::input(
                            format!("environment variable {name}"),
                            format!("is `{v}`, expected a count"),
                        )
                    })
                })
                .transpose()
        };
        for (size, rank, launcher) in MPI_LAUNCHERS {
            if let (Some(ranks), Some(rank)) = (number(size)?, number(rank)?) {
                return Ok(Launch::Mpi { ranks, rank, launcher });
            }
        }
        let (Some(ranks), Some(rank)) = (number("WORLD_SIZE")?, number("RANK")?) else {
            return Ok(Launch::Single);
        };
        let local_rank = number("LOCAL_RANK")?.unwrap_or(rank);
        let master = match (var("MASTER_ADDR"), var("MASTER_PORT")) {
            (Some(addr), Some(port)) => format!("{addr}:{port}"),
            _ if ranks <= 1 => String::new(),
            _ => {
                return Err(Error::input(
                    "the torchrun-style launch (RANK, WORLD_SIZE)",
                    "has no MASTER_ADDR and MASTER_PORT: set both to rank 0's address and a free port",
                ))
            }
        };
        Ok(Launch::Torchrun {
            ranks,
            rank,
            local_rank,
            master,
        })
    }

    /// The launch of this process's environment.
    pub fn from_env() -> Result<Launch> {
        Launch::detect(&|k| std::env::var(k).ok())
    }

    /// This process's rank (0 alone).
    pub fn rank(&self) -> usize {
        match self {
            Launch::Single => 0,
            Launch::Mpi { rank, .. } | Launch::Torchrun { rank, .. } => *rank,
        }
    }

    /// Ranks this launch starts.
    pub fn ranks(&self) -> usize {
        match self {
            Launch::Single => 1,
            Launch::Mpi { ranks, .. } | Launch::Torchrun { ranks, .. } => *ranks,
        }
    }

    /// What started the ranks, for messages.
    pub fn describe(&self) -> String {
        match self {
            Launch::Single => "one process".into(),
            Launch::Mpi { ranks, launcher, .. } => format!("{launcher} started {ranks} ranks"),
            Launch::Torchrun { ranks, .. } => format!("WORLD_SIZE is {ranks}"),
        }
    }
}

/// The collective backend a launch uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// MPI (CPU tensors; CUDA tensors through host memory).
    Mpi,
    /// NCCL (CUDA tensors).
    Nccl,
}

impl Backend {
    /// `parallel.backend` resolved for `launch` (of several ranks): `auto` is MPI under an MPI
    /// launcher and NCCL with torchrun-style variables.
    pub fn choose(launch: &Launch, spec: &ParallelSection) -> Result<Backend> {
        match (launch, spec.backend) {
            (_, ParallelBackend::None) => Err(Error::config(
                "parallel.backend",
                format!(
                    "is \"none\" (one process), and {}: run without the launcher, or set \
                     parallel.backend = \"auto\"",
                    launch.describe()
                ),
            )),
            (Launch::Torchrun { .. }, ParallelBackend::Mpi) => Err(Error::config(
                "parallel.backend",
                "is \"mpi\", and the ranks were started with torchrun-style variables, not by an \
                 MPI launcher: start them with mpirun or srun, or use \"nccl\" (GPUs)",
            )),
            (Launch::Torchrun { .. }, _) | (_, ParallelBackend::Nccl) => Ok(Backend::Nccl),
            _ => Ok(Backend::Mpi),
        }
    }

    /// Its name, and whether this build has it.
    pub fn describe(self) -> String {
        let (name, built) = match self {
            Backend::Mpi => ("mpi", cfg!(feature = "mpi")),
            Backend::Nccl => ("nccl", cfg!(feature = "nccl")),
        };
        match built {
            true => name.to_string(),
            false => format!("{name} (not in this build: rebuild with `--features {name}`)"),
        }
    }
}

/// The world this process joins, by the launcher in its environment and `[parallel]`: one
/// process without a launcher, or with a launcher of one rank unless `parallel.backend` names
/// a backend (a world of one, to try the backend). A process of a world of several ranks stops
/// with exit code 1 when the launcher ends the job (another rank failed).
pub fn join(spec: &ParallelSection) -> Result<World> {
    let launch = Launch::from_env()?;
    let named = matches!(spec.backend, ParallelBackend::Mpi | ParallelBackend::Nccl);
    if launch == Launch::Single || (launch.ranks() <= 1 && !named) {
        return Ok(World::single());
    }
    let backend = Backend::choose(&launch, spec)?;
    share_the_cores(&launch);
    let comm: Arc<dyn Collective> = match backend {
        Backend::Mpi => mpi_world()?,
        Backend::Nccl => nccl_world(&launch)?,
    };
    if comm.size() != launch.ranks() {
        return Err(Error::Runtime(format!(
            "{} but the {} world has {} ranks",
            launch.describe(),
            comm.backend(),
            comm.size()
        )));
    }
    stop_when_the_launcher_does(comm.rank(), comm.size())?;
    Ok(World::new(comm, spec))
}

#[cfg(feature = "mpi")]
fn mpi_world() -> Result<Arc<dyn Collective>> {
    Ok(Arc::new(super::mpi::MpiCollective::init()?))
}

#[cfg(not(feature = "mpi"))]
fn mpi_world() -> Result<Arc<dyn Collective>> {
    Err(not_built("mpi", "Open MPI or MPICH (`libopenmpi-dev`)"))
}

#[cfg(feature = "nccl")]
fn nccl_world(launch: &Launch) -> Result<Arc<dyn Collective>> {
    let Launch::Torchrun {
        ranks, rank, master, ..
    } = launch
    else {
        return Err(Error::config(
            "parallel.backend",
            "is \"nccl\", which bootstraps from torchrun-style variables (RANK, WORLD_SIZE, \
             LOCAL_RANK, MASTER_ADDR, MASTER_PORT): launch with those, or use \"mpi\"",
        ));
    };
    use_the_local_gpu(launch);
    Ok(Arc::new(super::nccl::NcclCollective::init(*rank, *ranks, master)?))
}

#[cfg(not(feature = "nccl"))]
fn nccl_world(_launch: &Launch) -> Result<Arc<dyn Collective>> {
    Err(not_built("nccl", "CUDA and NCCL"))
}

/// Each rank of a node computes on its own GPU: `CUDA_VISIBLE_DEVICES` narrowed to the
/// `LOCAL_RANK`-th of the devices it lists (of all, when unset), before CUDA starts, so that
/// `run.device = "cuda"` is that GPU.
#[cfg_attr(not(feature = "nccl"), allow(dead_code))]
fn use_the_local_gpu(launch: &Launch) {
    let Launch::Torchrun { local_rank, .. } = launch else {
        return;
    };
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").ok();
    let gpu = match visible
        .as_deref()
        .map(|v| v.split(',').map(str::trim).collect::<Vec<_>>())
    {
        Some(list) if list.len() > 1 => list[local_rank % list.len()].to_string(),
        Some(_) => return,
        None => local_rank.to_string(),
    };
    tracing::info!("rank {} uses GPU {gpu} (CUDA_VISIBLE_DEVICES)", launch.rank());
    std::env::set_var("CUDA_VISIBLE_DEVICES", gpu);
}

fn not_built(feature: &str, needs: &str) -> Error {
    Error::input(
        "this launch",
        format!(
            "starts several ranks, and this retort was built without the `{feature}` feature: \
             build it with `cargo build --release --features {feature}` (needs {needs}; see \
             docs/scaling.md)"
        ),
    )
}

/// The ranks this launch starts on this node (`None`: the launcher does not say).
fn local_ranks(var: &dyn Fn(&str) -> Option<String>) -> Option<usize> {
    ["OMPI_COMM_WORLD_LOCAL_SIZE", "MPI_LOCALNRANKS", "LOCAL_WORLD_SIZE"]
        .iter()
        .find_map(|k| var(k).and_then(|v| v.trim().parse().ok()))
}

/// Unless `RAYON_NUM_THREADS` says otherwise, the ranks of one node share its cores: a rank the
/// launcher bound to some cores (Open MPI binds each of a few ranks to one core) computes on
/// those; an unbound one on `cores / local ranks` threads. The kernels' pool and candle's
/// matmuls read the variable.
fn share_the_cores(launch: &Launch) {
    let var = |k: &str| std::env::var(k).ok();
    let (None, Some(local)) = (var("RAYON_NUM_THREADS"), local_ranks(&var)) else {
        return;
    };
    let usable = std::thread::available_parallelism().map_or(1, |n| n.get());
    let threads = match online_cpus() {
        Some(online) if usable < online => usable,
        _ => (usable / local.max(1)).max(1),
    };
    tracing::info!(
        "{}, {local} on this node; this rank may use {usable} core(s): {threads} thread(s)",
        launch.describe()
    );
    // Set before any thread reads the environment: the pools start later.
    std::env::set_var("RAYON_NUM_THREADS", threads.to_string());
}

/// The machine's online CPUs (`/sys/devices/system/cpu/online`, e.g. `0-3,8-11`).
fn online_cpus() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    count_cpu_list(&text)
}

fn count_cpu_list(text: &str) -> Option<usize> {
    text.trim().split(',').try_fold(0, |n, part| {
        let count = match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse::<usize>().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
        Some(n + count)
    })
}

/// A thread that turns the launcher's SIGTERM (sent to every rank when one fails) into exit
/// code 1 with a message, instead of death by signal mid-collective.
fn stop_when_the_launcher_does(rank: usize, ranks: usize) -> Result<()> {
    use signal_hook::consts::SIGTERM;
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM])
        .map_err(|e| Error::failed("watching for the launcher's SIGTERM", e))?;
    std::thread::spawn(move || {
        if signals.forever().next().is_some() {
            eprintln!(
                "error: rank {rank} of {ranks}: the launcher ended the job (a rank failed or the \
                 job was interrupted; the launcher's message names the rank)"
            );
            std::process::exit(1);
        }
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect(vars: &[(&str, &str)]) -> Result<Launch> {
        Launch::detect(&|k| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn launchers_are_told_apart_by_their_variables() {
        assert_eq!(detect(&[]).expect("none"), Launch::Single);
        let ompi = detect(&[("OMPI_COMM_WORLD_SIZE", "4"), ("OMPI_COMM_WORLD_RANK", "3")]).expect("ompi");
        assert!(matches!(ompi, Launch::Mpi { ranks: 4, rank: 3, .. }));
        let srun = detect(&[("SLURM_STEP_NUM_TASKS", "2"), ("SLURM_PROCID", "1")]).expect("srun");
        assert!(matches!(
            srun,
            Launch::Mpi {
                ranks: 2,
                rank: 1,
                launcher: "srun"
            }
        ));
        // A batch script's SLURM_NTASKS alone is not a launch of several ranks.
        assert_eq!(
            detect(&[("SLURM_NTASKS", "8"), ("SLURM_PROCID", "0")]).expect("sbatch"),
            Launch::Single
        );
        let torch = [
            ("WORLD_SIZE", "8"),
            ("RANK", "5"),
            ("LOCAL_RANK", "1"),
            ("MASTER_ADDR", "n0"),
            ("MASTER_PORT", "29500"),
        ];
        let t = detect(&torch).expect("torchrun");
        assert_eq!(
            t,
            Launch::Torchrun {
                ranks: 8,
                rank: 5,
                local_rank: 1,
                master: "n0:29500".into()
            }
        );
        // One rank is a launch too (`join` makes it a single process unless a backend is named).
        let one = detect(&[("OMPI_COMM_WORLD_SIZE", "1"), ("OMPI_COMM_WORLD_RANK", "0")]).expect("1");
        assert_eq!(one.ranks(), 1);
        assert_ne!(one, Launch::Single);
    }

    #[test]
    fn cpu_lists_are_counted() {
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,8-11,15"), Some(9));
        assert_eq!(count_cpu_list("x"), None);
        assert_eq!(count_cpu_list("3-1"), None);
    }

    #[test]
    fn bad_variables_are_named() {
        let e = detect(&[("WORLD_SIZE", "two"), ("RANK", "0")]).expect_err("not a number");
        assert!(e.to_string().contains("WORLD_SIZE") && e.is_user_error(), "{e}");
        let e = detect(&[("WORLD_SIZE", "2"), ("RANK", "0")]).expect_err("no master");
        assert!(e.to_string().contains("MASTER_ADDR"), "{e}");
    }
}
