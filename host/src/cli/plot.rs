//! `retort plot RUN_DIR`: (re)draw a run's charts and embed them in its report.

use std::path::PathBuf;

use clap::Args;

use retort_core::{Error, Result};

/// Arguments of `retort plot`.
#[derive(Debug, Args)]
pub struct PlotArgs {
    /// A run directory (holding metrics.jsonl).
    run_dir: PathBuf,
}

impl PlotArgs {
    /// Draws the charts and prints where they are.
    pub fn run(self) -> Result<()> {
        let dir = &self.run_dir;
        if !dir.join("metrics.jsonl").is_file() {
            return Err(Error::input(
                format!("run directory {}", dir.display()),
                "has no metrics.jsonl (is it a retort run directory?)",
            ));
        }
        let plots = crate::artifacts::plots::plot_and_embed(dir)?;
        for (title, path) in &plots {
            println!("{}  ({title})", dir.join(path).display());
        }
        if plots.is_empty() {
            println!(
                "nothing to plot yet: no training records in {}",
                dir.join("metrics.jsonl").display()
            );
        }
        Ok(())
    }
}
