//! `retort cache CONFIG`: run the config's teacher once over every aligned window of the data
//! and write a logit cache (resumable: a killed build continues where it stopped).

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde_json::Value;
use sha2::{Digest, Sha256};

use retort_core::{Error, Result};
use retort_plugins::cache::{build_cache, BuildOptions, BuildSummary};

use super::{live_teacher, CodingArgs};
use crate::artifacts::digest::checkpoint_files;
use crate::assemble::Pipeline;

/// Options of `retort cache` (building), besides the config.
#[derive(Debug, Clone, clap::Args)]
pub struct CacheOptions {
    /// Cache directory (default `runs/cache/<run.name>`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Teacher entries kept per token.
    #[arg(long, default_value_t = 64)]
    pub k: usize,
    /// How values are stored.
    #[command(flatten)]
    pub coding: CodingArgs,
    /// Tokens per shard (rounded down to whole windows).
    #[arg(long, default_value_t = 131072)]
    pub shard_tokens: usize,
    /// Windows per teacher forward pass (default: train.batch_size).
    #[arg(long = "batch", value_name = "WINDOWS", value_parser = crate::engine::flags::at_least_one)]
    pub batch_windows: Option<usize>,
    /// Record this id as the teacher's identity instead of hashing its checkpoint.
    #[arg(long)]
    pub teacher_id: Option<String>,
    /// Replace a cache with other settings at --out.
    #[arg(long)]
    pub force: bool,
    /// Show a progress bar.
    #[arg(skip)]
    pub progress: bool,
}

/// Builds (or completes) the cache of `pipeline`'s teacher; returns where, what it did and the
/// seconds taken.
pub fn build(pipeline: &Pipeline, opts: &CacheOptions) -> Result<(PathBuf, BuildSummary, f64)> {
    let values = opts.coding.value_coding(opts.k)?;
    if opts.shard_tokens == 0 || opts.k == 0 {
        return Err(Error::input("--k/--shard-tokens", "must be >= 1"));
    }
    let teacher = live_teacher(pipeline)?;
    let c = &pipeline.config;
    let out = opts
        .out
        .clone()
        .unwrap_or_else(|| PathBuf::from("runs/cache").join(&c.run.name));
    let teacher_id = match &opts.teacher_id {
        Some(id) => format!("declared:{id}"),
        None => checkpoint_hash(c.teacher.params.get("checkpoint"))?,
    };
    let build = BuildOptions {
        k: opts.k,
        values,
        zstd_level: opts.coding.zstd_level,
        seq_len: c.train.seq_len,
        shard_tokens: opts.shard_tokens,
        batch_windows: opts.batch_windows.unwrap_or(c.train.batch_size),
        teacher_id,
        force: opts.force,
    };
    let bar = progress_bar(opts.progress)?;
    let t0 = Instant::now();
    let data = pipeline.data.as_ref();
    let summary = build_cache(&out, teacher, data, &build, &pipeline.device, &mut |p| {
        bar.set_length(p.tokens_total as u64);
        bar.set_position(p.tokens_done as u64);
    })?;
    bar.finish_and_clear();
    Ok((out, summary, t0.elapsed().as_secs_f64()))
}

fn progress_bar(shown: bool) -> Result<ProgressBar> {
    let bar = if shown {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    let style = ProgressStyle::with_template("cache [{bar:30}] {pos}/{len} tokens {per_sec} ETA {eta}")
        .map_err(|e| retort_core::Error::failed("the progress bar's template", e))?;
    bar.set_style(style.progress_chars("=> "));
    Ok(bar)
}

/// `sha256:<hex>` of the checkpoint file, or of a checkpoint directory's files (sorted by name,
/// each name and its bytes); `unknown` without a checkpoint.
fn checkpoint_hash(checkpoint: Option<&Value>) -> Result<String> {
    let Some(Value::String(path)) = checkpoint else {
        return Ok("unknown".into());
    };
    let path = Path::new(path);
    let mut h = Sha256::new();
    let files = checkpoint_files(path)?;
    let mut buf = vec![0u8; 1 << 20];
    for f in files {
        h.update(
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
                .as_bytes(),
        );
        let mut file = std::fs::File::open(&f).map_err(|e| Error::io("reading", &f, e))?;
        loop {
            let n = file.read(&mut buf).map_err(|e| Error::io("reading", &f, e))?;
            if n == 0 {
                break;
            }
            h.update(&buf[..n]);
        }
    }
    Ok(format!("sha256:{:x}", h.finalize()))
}
