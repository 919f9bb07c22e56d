//! `retort cache CONFIG [...]` builds a teacher logit cache; `retort cache inspect|recode|export`
//! work on one.

use std::path::PathBuf;

use crate::engine::parallel::launch::Launch;
use clap::{Args, Subcommand};

use retort_core::Result;

use super::common::{progress_bars, ConfigArgs};
use crate::assemble::{config, Pipeline};
use crate::engine::cache::{self, CacheOptions, ExportOptions, InspectOptions, RecodeOptions};

/// Arguments of `retort cache`: a subcommand, or the config of the teacher to cache.
#[derive(Debug, Args)]
pub struct CacheArgs {
    /// `inspect`, `recode` or `export` an existing cache.
    #[command(subcommand)]
    action: Option<CacheAction>,
    /// The run config whose teacher (with a checkpoint) and data are cached.
    #[command(flatten)]
    config: ConfigArgs,
    /// What to build.
    #[command(flatten)]
    options: CacheOptions,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// `retort cache` subcommands.
#[derive(Debug, Subcommand)]
enum CacheAction {
    /// Tokens, shards, bytes per token, compression against dense storage and the seed design;
    /// with --config (the live teacher's run config) also the fidelity on a sample.
    Inspect(InspectArgs),
    /// Re-encode a cache with a smaller k or another value coding, without the teacher (exact
    /// from an f32 cache).
    Recode(RecodeOptions),
    /// Write the top-k of the first windows of a split as raw arrays (ids.u32, logprobs.f32,
    /// meta.json) for tools outside retort.
    Export(ExportOptions),
}

/// Arguments of `retort cache inspect`.
#[derive(Debug, Args)]
struct InspectArgs {
    /// Cache directory.
    path: PathBuf,
    /// Print JSON.
    #[arg(long)]
    json: bool,
    /// Config of the teacher the cache was built from (for the fidelity sample).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Override a key of that config.
    #[arg(long = "set", value_name = "KEY=VALUE")]
    sets: Vec<String>,
    /// What to measure.
    #[command(flatten)]
    options: InspectOptions,
}

impl CacheArgs {
    /// Runs the subcommand, or builds the cache and says how to train from it.
    pub fn run(mut self) -> Result<()> {
        let launch = Launch::from_env()?;
        if launch.ranks() > 1 {
            return Err(retort_core::Error::input(
                "this launch",
                format!(
                    "{}, and `retort cache` runs as one process (the ranks would write the same \
                     files): build the cache once, then train from it under the launcher",
                    launch.describe()
                ),
            ));
        }
        match self.action.take() {
            Some(CacheAction::Inspect(a)) => a.run(),
            Some(CacheAction::Recode(o)) => {
                let (h, secs) = cache::recode(&o)?;
                let (out, src) = (o.out.display(), o.src.display());
                println!(
                    "cache {out}: top-{} {} recoded from {src} in {secs:.1}s",
                    h.k,
                    h.values.name()
                );
                Ok(())
            }
            Some(CacheAction::Export(o)) => {
                let meta = cache::export(&o)?;
                println!(
                    "exported {} tokens x top-{} to {}",
                    meta["tokens"],
                    meta["k"],
                    o.out.display()
                );
                Ok(())
            }
            None => self.build(),
        }
    }

    fn build(mut self) -> Result<()> {
        let (cfg, origin, registry) = self.config.load()?;
        let pipeline = Pipeline::assemble(cfg, &registry).map_err(|e| origin.annotate(e))?;
        self.options.progress = progress_bars(self.quiet);
        let (path, s, secs) = cache::build(&pipeline, &self.options)?;
        let h = &s.header;
        let tokens = (h.train.windows + h.val.windows) * h.seq_len;
        println!(
            "cache {}: {tokens} tokens (top-{} {}), {} shards built, {} kept; teacher ran on {} tokens in {secs:.1}s ({:.0} tokens/s)",
            path.display(),
            h.k,
            h.values.name(),
            s.shards_built,
            s.shards_kept,
            s.tokens_computed,
            s.tokens_computed as f64 / secs.max(1e-9)
        );
        println!(
            "train from it with: teacher = {{ kind = \"cached\", path = \"{}\" }}",
            path.display()
        );
        Ok(())
    }
}

impl InspectArgs {
    fn run(self) -> Result<()> {
        let registry = crate::builtin_registry()?;
        let report = match &self.config {
            Some(file) => {
                let (cfg, origin) = config::load(Some(file), &self.sets)?;
                let pipeline = Pipeline::assemble(cfg, &registry).map_err(|e| origin.annotate(e))?;
                let label = file.display().to_string();
                cache::inspect(&self.path, Some((&pipeline, label.as_str())), &self.options)?
            }
            None => cache::inspect(&self.path, None, &self.options)?,
        };
        if self.json {
            let text = serde_json::to_string_pretty(&report)
                .map_err(|e| retort_core::Error::failed("serialising the report", e))?;
            println!("{text}");
        } else {
            print!("{report}");
        }
        Ok(())
    }
}
