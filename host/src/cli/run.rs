//! `retort run [CONFIG] [--set K=V]... [--out DIR] [--force] [--resume RUN_DIR]`.

use clap::Args;

use retort_core::Result;

use super::common::{progress_bars, ConfigArgs};
use crate::artifacts::run_dir::RunDir;
use crate::assemble::Pipeline;
use crate::engine::run::{run, RunOptions};

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
    /// Runs the pipeline and prints the report's table.
    pub fn run(mut self) -> Result<()> {
        if let Some(dir) = &self.options.resume {
            // A resumed run uses the configuration it was started with, as resolved then.
            self.config.config = Some(RunDir::open(dir)?.resolved_config());
        }
        let (cfg, origin, registry) = self.config.load()?;
        let pipeline = Pipeline::assemble(cfg, &registry).map_err(|e| origin.annotate(e))?;
        self.options.progress = progress_bars(self.quiet);
        let outcome = run(pipeline, &origin, &self.options).map_err(|e| origin.annotate(e))?;
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
