//! `retort cache inspect`: what a cache holds, its size against dense storage and the seed
//! design, optionally its read speed, and (with the live teacher's pipeline) its fidelity.

use std::fmt;
use std::path::Path;
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::Serialize;

use retort_core::{Error, Result, Split};
use retort_plugins::cache::store::fingerprint;
use retort_plugins::cache::{LogitStore, ReadState};

use super::fidelity::{fidelity, Fidelity};
use super::live_teacher;
use crate::assemble::Pipeline;

/// Options of `retort cache inspect`.
#[derive(Debug, Clone, clap::Args)]
pub struct InspectOptions {
    /// Validation windows in the fidelity sample.
    #[arg(long, default_value_t = 8)]
    pub sample_windows: usize,
    /// Also time reading every window (single thread, shuffled, median of 5 passes).
    #[arg(long)]
    pub bench_read: bool,
}

/// What a cache is, as `retort cache inspect` reports it.
#[derive(Debug, Clone, Serialize)]
pub struct Inspection {
    /// The cache directory.
    pub path: String,
    /// Format version.
    pub format_version: u32,
    /// Entries per token.
    pub k: usize,
    /// Vocabulary of the teacher.
    pub vocab: usize,
    /// Value coding.
    pub values: String,
    /// Expected KL of the coding per token.
    pub expected_coding_kl: f64,
    /// zstd level of the frames.
    pub zstd_level: i32,
    /// Tokens per window.
    pub seq_len: usize,
    /// The teacher's description.
    pub teacher: String,
    /// The teacher's identity.
    pub teacher_id: String,
    /// Tokens stored.
    pub tokens: usize,
    /// Training windows.
    pub train_windows: usize,
    /// Validation windows.
    pub val_windows: usize,
    /// Shards of both splits.
    pub shards: usize,
    /// Bytes of the shards.
    pub bytes: usize,
    /// Bytes per token.
    pub bytes_per_token: f64,
    /// Dense f32 logits over the cache's size.
    pub compression_vs_dense_f32: f64,
    /// Dense bf16 logits over the cache's size.
    pub compression_vs_dense_bf16: f64,
    /// The seed design (top-k f32 values and i64 ids, before gzip), bytes per token.
    pub seed_design_raw_bytes_per_token: f64,
    /// Seconds to open and verify the cache.
    pub open_and_verify_seconds: f64,
    /// The cache this one was re-encoded from.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recoded_from: Option<String>,
    /// Read throughput, when measured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub read: Option<ReadSpeed>,
    /// Fidelity against the live teacher, when its config was given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fidelity: Option<Fidelity>,
}

/// Single-thread read throughput over every window.
#[derive(Debug, Clone, Serialize)]
pub struct ReadSpeed {
    /// Tokens read per pass.
    pub tokens_per_pass: usize,
    /// Tokens/s of each pass.
    pub passes: Vec<f64>,
    /// The median pass.
    pub median_tokens_per_s: f64,
}

/// Inspects the cache at `path`; with `teacher` (the pipeline of the live teacher's config,
/// named by `config_label`) also its fidelity.
pub fn inspect(path: &Path, teacher: Option<(&Pipeline, &str)>, opts: &InspectOptions) -> Result<Inspection> {
    let t0 = Instant::now();
    let store = LogitStore::open(path)?;
    let open_s = t0.elapsed().as_secs_f64();
    let h = store.header().clone();
    let tokens = (h.train.windows + h.val.windows) * h.seq_len;
    let bytes = store.shard_bytes();
    let per_token = bytes as f64 / tokens.max(1) as f64;
    let mut report = Inspection {
        path: path.display().to_string(),
        format_version: h.version,
        k: h.k,
        vocab: h.vocab,
        values: h.values.name(),
        expected_coding_kl: h.values.expected_kl(h.k),
        zstd_level: h.zstd_level,
        seq_len: h.seq_len,
        teacher: h.teacher.describe.clone(),
        teacher_id: h.teacher.id.clone(),
        tokens,
        train_windows: h.train.windows,
        val_windows: h.val.windows,
        shards: store.shards(Split::Train).len() + store.shards(Split::Val).len(),
        bytes,
        bytes_per_token: per_token,
        compression_vs_dense_f32: (h.vocab * 4) as f64 / per_token,
        compression_vs_dense_bf16: (h.vocab * 2) as f64 / per_token,
        seed_design_raw_bytes_per_token: (h.k * (4 + 8)) as f64,
        open_and_verify_seconds: open_s,
        recoded_from: h.recoded_from.clone(),
        read: None,
        fidelity: None,
    };
    if opts.bench_read {
        report.read = Some(bench_read(&store, 5)?);
    }
    if let Some((pipeline, label)) = teacher {
        let val = pipeline.data.tokens(Split::Val);
        if fingerprint(val, h.seq_len) != h.val.fingerprint {
            return Err(Error::input(
                format!("--config {label}"),
                "its validation tokens are not those the cache was built on",
            ));
        }
        let n = opts.sample_windows.min(h.val.windows);
        report.fidelity = Some(fidelity(&store, live_teacher(pipeline)?, val, n, &pipeline.device)?);
    }
    Ok(report)
}

/// Single-thread read throughput: every window of both splits in a shuffled order (fixed seed),
/// `passes` times; the median pass in tokens/s (the first pass also warms the page cache).
pub fn bench_read(store: &LogitStore, passes: usize) -> Result<ReadSpeed> {
    let h = store.header();
    let mut order: Vec<(Split, usize)> = (0..h.train.windows)
        .map(|w| (Split::Train, w))
        .chain((0..h.val.windows).map(|w| (Split::Val, w)))
        .collect();
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(0));
    let mut st = ReadState::new()?;
    let (mut ids, mut lps) = (Vec::with_capacity(h.seq_len * h.k), Vec::with_capacity(h.seq_len * h.k));
    let mut rates = Vec::new();
    for _ in 0..passes.max(1) {
        let t0 = Instant::now();
        for &(split, w) in &order {
            ids.clear();
            lps.clear();
            store.read_window(&mut st, split, w, h.k, &mut ids, &mut lps)?;
        }
        rates.push((order.len() * h.seq_len) as f64 / t0.elapsed().as_secs_f64());
    }
    let mut sorted = rates.clone();
    sorted.sort_by(f64::total_cmp);
    Ok(ReadSpeed {
        tokens_per_pass: order.len() * h.seq_len,
        median_tokens_per_s: sorted[sorted.len() / 2],
        passes: rates,
    })
}

impl fmt::Display for Inspection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "cache        {}", self.path)?;
        writeln!(f, "teacher      {} ({})", self.teacher, self.teacher_id)?;
        writeln!(
            f,
            "format       v{}, top-{} of {} ids, values {} (expected coding KL {:.1e}), zstd {}",
            self.format_version, self.k, self.vocab, self.values, self.expected_coding_kl, self.zstd_level
        )?;
        writeln!(
            f,
            "tokens       {} ({} train + {} val windows of {})",
            self.tokens, self.train_windows, self.val_windows, self.seq_len
        )?;
        writeln!(f, "shards       {}", self.shards)?;
        writeln!(
            f,
            "bytes        {} ({:.1} bytes/token)",
            self.bytes, self.bytes_per_token
        )?;
        writeln!(
            f,
            "vs dense f32 {:.0}x smaller ({} bytes/token)",
            self.compression_vs_dense_f32,
            self.vocab * 4
        )?;
        writeln!(f, "vs dense bf16 {:.0}x smaller", self.compression_vs_dense_bf16)?;
        writeln!(
            f,
            "seed design  {} bytes/token before gzip (top-{} fp32 + int64 ids)",
            self.seed_design_raw_bytes_per_token, self.k
        )?;
        writeln!(f, "verified in  {:.3}s", self.open_and_verify_seconds)?;
        if let Some(rd) = &self.read {
            writeln!(
                f,
                "read         {:.0} tokens/s (single thread, shuffled windows, median of {} passes over {} tokens)",
                rd.median_tokens_per_s,
                rd.passes.len(),
                rd.tokens_per_pass
            )?;
        }
        if let Some(r) = &self.recoded_from {
            writeln!(f, "recoded from {r}")?;
        }
        if let Some(fi) = &self.fidelity {
            writeln!(f, "fidelity on {} val tokens:", fi.tokens)?;
            writeln!(
                f,
                "  KL over top-k + tail bucket (coding error) {:.3e} nats/token",
                fi.kl_topk_bucket
            )?;
            writeln!(
                f,
                "  KL(full || cached top-k + uniform tail)    {:.4} nats/token",
                fi.kl_full_vs_reconstructed
            )?;
            writeln!(
                f,
                "  KL(full || exact top-k + uniform tail)     {:.4} nats/token (truncation alone)",
                fi.kl_full_vs_exact_topk_uniform
            )?;
            writeln!(
                f,
                "  top-1 agreement                            {:.4}",
                fi.top1_agreement
            )?;
        }
        Ok(())
    }
}
