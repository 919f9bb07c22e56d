//! `retort run [CONFIG] [--set K=V]... [--out DIR] [--force] [--resume RUN_DIR]`.

use clap::Args;

use retort_core::Result;

use super::common::{progress_bars, ConfigArgs};
use super::print_error;
use crate::artifacts::run_dir::RunDir;
use crate::assemble::Pipeline;
use crate::engine::parallel::launch;
use crate::engine::run::{run_in_world, RunOptions};

/// Arguments of `retort run`.
#[derive(Debug, Args)]
pub struct RunArgs {
    /// The run config.
    #[command(flatten)]
    config: ConfigArgs,
    /// Where and how to run.
    #[command(flatten)]
    options: RunOptions,
    /// No progress bars.
    #[arg(long)]
    quiet: bool,
}

impl RunArgs {
    /// Runs the pipeline and prints the report's table. Launched as several ranks (mpirun,
    /// srun), joins their world first; a rank that fails prints why and ends every rank.
    pub fn run(mut self) -> Result<()> {
        if let Some(dir) = &self.options.resume {
            // A resumed run uses the configuration it was started with, as resolved then.
            self.config.config = Some(RunDir::read(dir)?.resolved_config());
        }
        let (cfg, origin, registry) = self.config.load()?;
        let world = launch::join(&cfg.parallel).map_err(|e| origin.annotate(e))?;
        let outcome = Pipeline::assemble_for(cfg, &registry, world.size())
            .and_then(|pipeline| {
                self.options.progress = progress_bars(self.quiet) && world.is_root();
                run_in_world(pipeline, &origin, &self.options, &world)
            })
            .map_err(|e| origin.annotate(e));
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) if world.size() > 1 => {
                let code = print_error(e, Some(world.rank()));
                world.abort_others(code);
                return Err(retort_core::Error::Runtime("unreachable: aborted".into()));
            }
            Err(e) => return Err(e),
        };
        if !world.is_root() {
            return Ok(());
        }
        println!("\n{}", outcome.report.table());
        if let Some(gain) = outcome.report.distillation_gain {
            println!(
                "distillation gain over the scratch baseline: {gain:+.4} nats/token (positive = distilled student is better)"
            );
        }
        println!("run directory: {}", outcome.dir.display());
        Ok(())
    }
}
