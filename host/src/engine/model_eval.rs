//! `retort eval`: the loss of a model file or directory (GGUF, Hugging Face, retort export) on
//! a text file tokenized with the model's own tokenizer: non-overlapping windows from the
//! start of the file (or of its last `--val-fraction`), as the run's evaluation does.

use std::path::PathBuf;
use std::time::Instant;

use retort_core::{Error, Registry, Result, TapSet};

use crate::engine::batching::val_batches;
use crate::engine::evaluate::{evaluate, EvalResult};

/// Options of `retort eval`.
#[derive(Debug, Clone, clap::Args)]
pub struct EvalOptions {
    /// GGUF file or model directory.
    #[arg(long)]
    pub model: PathBuf,
    /// UTF-8 text file.
    #[arg(long)]
    pub data: PathBuf,
    /// Evaluate the last fraction of the tokens (a run's validation split is 0.1); 1 = all.
    #[arg(long, default_value_t = 0.1)]
    pub val_fraction: f64,
    /// Tokens per window.
    #[arg(long, default_value_t = 64)]
    pub seq_len: usize,
    /// Windows per batch.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Batches at most.
    #[arg(long, default_value_t = 8)]
    pub batches: usize,
    /// Device.
    #[arg(long, default_value = "cpu")]
    pub device: String,
}

/// Evaluates the model; returns the result, its description and the seconds taken.
pub fn run_eval(registry: &Registry, opts: &EvalOptions) -> Result<(EvalResult, String, f64)> {
    if !(opts.val_fraction > 0.0 && opts.val_fraction <= 1.0) {
        return Err(Error::input(
            "--val-fraction",
            format!("expected a number in (0, 1], got {}", opts.val_fraction),
        ));
    }
    if opts.seq_len == 0 || opts.batch_size == 0 || opts.batches == 0 {
        return Err(Error::input("--seq-len/--batch-size/--batches", "must be >= 1"));
    }
    let device = crate::assemble::device::parse_device(&opts.device)?;
    let (model, tokenizer) =
        crate::assemble::model_file::load_model_file(registry, &opts.model, &device, Some(opts.seq_len))?;
    let text = std::fs::read_to_string(&opts.data).map_err(|e| {
        Error::input_failed(
            format!("--data {}", opts.data.display()),
            "cannot read as UTF-8 text",
            e,
        )
    })?;
    let ids = tokenizer.encode(&text)?;
    let start = ((ids.len() as f64) * (1.0 - opts.val_fraction)).round() as usize;
    let held_out = ids.len() - start.min(ids.len());
    if held_out <= opts.seq_len {
        return Err(Error::input(
            "--seq-len",
            format!(
                "the last {} of --data {} is {held_out} tokens, fewer than one window of {} plus its target: \
                 lower --seq-len or raise --val-fraction",
                opts.val_fraction,
                opts.data.display(),
                opts.seq_len
            ),
        ));
    }
    let batches = val_batches(&ids[start..], opts.batches, opts.batch_size, opts.seq_len, &device)?;
    let t0 = Instant::now();
    let r = evaluate(&|_, b| Ok(model.forward(b, &TapSet::none())?.logits), &batches, None)?;
    Ok((r, model.describe(), t0.elapsed().as_secs_f64()))
}
