//! The metric observers. Assembly builds them once into a scratch directory, exactly as a run
//! builds them into its own, so that a bad observer kind or key refuses the run (and `check`
//! reports it) before the run directory is touched.

use std::path::Path;

use retort_core::config::RunConfig;
use retort_core::{BuildContext, Error, Observer, Result};

/// The configured observers, writing into `run_dir`.
pub fn build(config: &RunConfig, ctx: &BuildContext, run_dir: &Path) -> Result<Vec<Box<dyn Observer>>> {
    let mut ctx = ctx.clone();
    ctx.run_dir = Some(run_dir.to_path_buf());
    config
        .observers
        .iter()
        .enumerate()
        .map(|(i, o)| {
            let params = o.params_at(&format!("observers[{i}]"));
            ctx.registry.observers.build(&o.kind, &params, &ctx)
        })
        .collect()
}

/// Builds every observer into a scratch directory, closes them, and removes the directory.
pub(super) fn validate(config: &RunConfig, ctx: &BuildContext) -> Result<()> {
    let scratch = tempfile::Builder::new()
        .prefix("retort-check-observers")
        .tempdir()
        .map_err(|e| Error::failed("creating a scratch directory to check the observers", e))?;
    for mut observer in build(config, ctx, scratch.path())? {
        observer.finish()?;
    }
    Ok(())
}
