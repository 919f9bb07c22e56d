//! `retort run`: pretrain the teacher if needed, distill the student, train the scratch
//! baseline, evaluate all three, write the run directory.

mod inputs;
mod session;
mod summary;

use std::path::PathBuf;
use std::time::Instant;

use retort_core::Result;

use crate::artifacts::report::Report;
use crate::assemble::config::ConfigOrigin;
use crate::assemble::Pipeline;
use crate::engine::parallel::World;

use session::Session;

/// Options of `retort run` besides the config.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct RunOptions {
    /// Run directory (default `runs/<run.name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Replace a run directory that holds another run.
    #[arg(long)]
    pub force: bool,
    /// Continue the run in RUN_DIR from its last checkpoint (with its own resolved config).
    #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "sets", "out", "force"])]
    pub resume: Option<PathBuf>,
    /// With --resume: if the newest checkpoint is corrupted, use the previous good one.
    #[arg(long, requires = "resume")]
    pub resume_from_last_good: bool,
    /// Show progress bars.
    #[arg(skip)]
    pub progress: bool,
}

/// What a finished run produced.
pub struct RunOutcome {
    /// The run directory.
    pub dir: PathBuf,
    /// The report written there.
    pub report: Report,
}

/// Runs the whole pipeline: teacher (loaded or pretrained), distilled student, scratch
/// baseline (same init, same batches, same budget), evaluations, report.
/// One process.
pub fn run(pipeline: Pipeline, origin: &ConfigOrigin, opts: &RunOptions) -> Result<RunOutcome> {
    run_in_world(pipeline, origin, opts, &World::single())
}

/// [`run`] by every rank of `world` (a data-parallel run, [`crate::engine::parallel`]), rank 0
/// writing the run directory.
pub fn run_in_world(
    mut pipeline: Pipeline,
    origin: &ConfigOrigin,
    opts: &RunOptions,
    world: &World,
) -> Result<RunOutcome> {
    let started = Instant::now();
    let loaded_teacher = pipeline.teacher.take();
    let mut session = Session::open(&pipeline, origin, opts, world)?;
    let teacher = session.obtain_teacher(loaded_teacher)?;
    let students = summary::Students {
        student: session.train_student(pipeline.distillation()?, &teacher)?,
        off_policy: match pipeline.off_policy_reference()? {
            Some(setup) => Some(session.train_student(setup, &teacher)?),
            None => None,
        },
        baseline: match pipeline.baseline()? {
            Some(setup) => Some(session.train_student(setup, &teacher)?),
            None => None,
        },
    };
    let report = summary::report(&pipeline, origin, &session, &teacher, &students, started);
    session.finish(&report)?;
    Ok(RunOutcome {
        dir: session.dir().path().to_path_buf(),
        report,
    })
}
