//! `retort cache CONFIG`: run the config's teacher once over every aligned window of the data
//! and write a logit cache; `retort cache inspect PATH`: what a cache holds, its size against
//! dense storage and the seed design, and (with the teacher's config) its fidelity.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Tensor, D};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use retort_core::{Error, Registry, Result, Split, TapSet, Teacher};
use retort_plugins::cache::build::topk_rows;
use retort_plugins::cache::store::fingerprint;
use retort_plugins::cache::{build_cache, BuildOptions, BuildSummary, LogitStore, ReadState, ValueCoding};

use crate::assemble::config;
use crate::assemble::{Pipeline, TeacherPlan};

/// Options of `retort cache`.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// The run config whose teacher and data are cached.
    pub config: Option<PathBuf>,
    /// `--set` overrides.
    pub sets: Vec<String>,
    /// Destination (default `runs/cache/<run.name>`).
    pub out: Option<PathBuf>,
    /// Entries per token.
    pub k: usize,
    /// How values are stored.
    pub coding: CodingArgs,
    /// Tokens per shard.
    pub shard_tokens: usize,
    /// Windows per teacher forward (default `train.batch_size`).
    pub batch_windows: Option<usize>,
    /// A declared teacher id instead of the checkpoint hash.
    pub teacher_id: Option<String>,
    /// Replace a cache with other settings.
    pub force: bool,
    /// Show a progress bar.
    pub progress: bool,
}

/// How a cache stores values (`--values`, `--max-kl`, `--levels`, `--zstd-level`).
#[derive(Debug, Clone, clap::Args)]
pub struct CodingArgs {
    /// Value coding: sqrt (quantised sqrt-probabilities) or f32 (exact log-probs).
    #[arg(long, default_value = "sqrt")]
    pub values: String,
    /// With sqrt: the KL(exact || stored) per token, in nats, the quantisation levels are
    /// chosen for (levels = ceil(sqrt(k / (6 max_kl)))).
    #[arg(long, default_value_t = 4e-4)]
    pub max_kl: f64,
    /// With sqrt: use this many levels instead of those --max-kl picks.
    #[arg(long)]
    pub levels: Option<u32>,
    /// zstd level of the frames (1-22); 0 stores them uncompressed (larger, faster to read).
    #[arg(long, default_value_t = 9)]
    pub zstd_level: i32,
}

impl CodingArgs {
    /// The value coding these ask for at `k` (zstd level checked too).
    pub fn value_coding(&self, k: usize) -> Result<ValueCoding> {
        if !(0..=22).contains(&self.zstd_level) {
            return Err(Error::input(
                "--zstd-level",
                format!("expected 0 (no compression) ..= 22, got {}", self.zstd_level),
            ));
        }
        Ok(match (self.values.as_str(), self.levels) {
            ("f32", _) => ValueCoding::F32,
            ("sqrt", Some(levels)) if (1..=65535).contains(&levels) => ValueCoding::Sqrt { levels },
            ("sqrt", Some(levels)) => {
                return Err(Error::input("--levels", format!("expected 1..=65535, got {levels}")))
            }
            ("sqrt", None) if self.max_kl > 0.0 && self.max_kl.is_finite() => ValueCoding::sqrt_for(k, self.max_kl),
            ("sqrt", None) => {
                return Err(Error::input(
                    "--max-kl",
                    format!("expected a number > 0, got {}", self.max_kl),
                ))
            }
            (other, _) => return Err(Error::input("--values", format!("expected sqrt or f32, got `{other}`"))),
        })
    }
}

impl Default for CodingArgs {
    fn default() -> Self {
        CodingArgs {
            values: "sqrt".into(),
            max_kl: 4e-4,
            levels: None,
            zstd_level: 9,
        }
    }
}

/// Builds (or completes) the cache; returns where, what it did and the seconds taken.
pub fn run_cache(registry: &Registry, opts: &CacheOptions) -> Result<(PathBuf, BuildSummary, f64)> {
    let values = opts.coding.value_coding(opts.k)?;
    if opts.shard_tokens == 0 || opts.k == 0 {
        return Err(Error::input("--k/--shard-tokens", "must be >= 1"));
    }
    let (cfg, _) = config::load(opts.config.as_deref(), &opts.sets)?;
    let pipeline = Pipeline::assemble(cfg, registry)?;
    let teacher = live_teacher(&pipeline)?;
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
    let bar = if opts.progress {
        ProgressBar::new(0)
    } else {
        ProgressBar::hidden()
    };
    bar.set_style(
        ProgressStyle::with_template("cache [{bar:30}] {pos}/{len} tokens {per_sec} ETA {eta}")
            .map_err(|e| Error::Runtime(e.to_string()))?
            .progress_chars("=> "),
    );
    let t0 = Instant::now();
    let summary = build_cache(
        &out,
        teacher,
        pipeline.data.as_ref(),
        &build,
        &pipeline.device,
        &mut |p| {
            bar.set_length(p.tokens_total as u64);
            bar.set_position(p.tokens_done as u64);
        },
    )?;
    bar.finish_and_clear();
    Ok((out, summary, t0.elapsed().as_secs_f64()))
}

/// `retort cache export`: the top-k of the first `windows` windows of `split` as raw little
/// endian arrays `ids.u32` and `logprobs.f32` (`[tokens, k]`, descending) and `meta.json`, for
/// tools outside retort (e.g. `scripts/seed_cache_size.py`).
pub fn export(path: &Path, out: &Path, split: Split, windows: usize) -> Result<Value> {
    let store = LogitStore::open(path)?;
    let h = store.header();
    let n = windows.min(h.split(split).windows);
    let mut st = ReadState::new()?;
    let (mut ids, mut lps) = (Vec::new(), Vec::new());
    for w in 0..n {
        store.read_window(&mut st, split, w, h.k, &mut ids, &mut lps)?;
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io("creating directory", out, e))?;
    let id_bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
    let lp_bytes: Vec<u8> = lps.iter().flat_map(|l| l.to_le_bytes()).collect();
    retort_core::fsutil::write_atomic(&out.join("ids.u32"), &id_bytes)?;
    retort_core::fsutil::write_atomic(&out.join("logprobs.f32"), &lp_bytes)?;
    let meta = json!({"tokens": n * h.seq_len, "k": h.k, "vocab": h.vocab, "values": h.values.name(), "split": split, "source": path.display().to_string()});
    retort_core::fsutil::write_atomic(&out.join("meta.json"), meta.to_string().as_bytes())?;
    Ok(meta)
}

/// Single-thread read throughput: every window of both splits in a shuffled order (fixed seed),
/// `passes` times; the median pass in tokens/s (the first pass also warms the page cache).
pub fn bench_read(store: &LogitStore, passes: usize) -> Result<Value> {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
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
    let all = rates.clone();
    rates.sort_by(f64::total_cmp);
    Ok(
        json!({"tokens_per_pass": order.len() * h.seq_len, "passes": all, "median_tokens_per_s": rates[rates.len() / 2]}),
    )
}

fn live_teacher<'a>(p: &'a Pipeline) -> Result<&'a dyn Teacher> {
    match (&p.teacher_plan, &p.teacher) {
        (TeacherPlan::Load, Some(t)) if t.sparse_topk().is_none() => Ok(t.as_ref()),
        (TeacherPlan::Load, Some(_)) => Err(Error::config(
            "teacher.kind",
            "the config's teacher is itself a cache; give the config of the live teacher",
        )),
        _ => Err(Error::config(
            "teacher.checkpoint",
            "a cache is built from a trained teacher: give teacher.checkpoint (e.g. runs/<name>/teacher after `retort run`)",
        )),
    }
}

/// `sha256:<hex>` of the checkpoint file, or of a checkpoint directory's files (sorted by name,
/// each name and its bytes); `unknown` without a checkpoint.
fn checkpoint_hash(checkpoint: Option<&Value>) -> Result<String> {
    let Some(Value::String(path)) = checkpoint else {
        return Ok("unknown".into());
    };
    let path = Path::new(path);
    let mut h = Sha256::new();
    let mut files = Vec::new();
    if path.is_dir() {
        for e in std::fs::read_dir(path).map_err(|e| Error::io("listing", path, e))? {
            let e = e.map_err(|e| Error::io("listing", path, e))?;
            if e.path().is_file() {
                files.push(e.path());
            }
        }
        files.sort();
    } else {
        files.push(path.to_path_buf());
    }
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

/// Options of `retort cache inspect`.
#[derive(Debug, Clone)]
pub struct InspectOptions {
    /// The cache directory.
    pub path: PathBuf,
    /// The config of the live teacher (for the fidelity sample).
    pub config: Option<PathBuf>,
    /// `--set` overrides of that config.
    pub sets: Vec<String>,
    /// Validation windows in the fidelity sample.
    pub sample_windows: usize,
    /// Also time reading every window (single thread, 5 passes).
    pub bench_read: bool,
}

/// What `retort cache inspect` reports, as JSON.
pub fn inspect(registry: &Registry, opts: &InspectOptions) -> Result<Value> {
    let t0 = Instant::now();
    let store = LogitStore::open(&opts.path)?;
    let open_s = t0.elapsed().as_secs_f64();
    let h = store.header().clone();
    let tokens = (h.train.windows + h.val.windows) * h.seq_len;
    let bytes = store.shard_bytes();
    let per_token = bytes as f64 / tokens.max(1) as f64;
    let dense_f32 = (h.vocab * 4) as f64;
    let dense_bf16 = (h.vocab * 2) as f64;
    // The seed design: top-k fp32 values + int64 ids, before gzip.
    let seed_raw = (h.k * (4 + 8)) as f64;
    let mut report = json!({
        "path": opts.path.display().to_string(),
        "format_version": h.version,
        "k": h.k,
        "vocab": h.vocab,
        "values": h.values.name(),
        "expected_coding_kl": h.values.expected_kl(h.k),
        "zstd_level": h.zstd_level,
        "seq_len": h.seq_len,
        "teacher": h.teacher.describe,
        "teacher_id": h.teacher.id,
        "tokens": tokens,
        "train_windows": h.train.windows,
        "val_windows": h.val.windows,
        "shards": store.shards(Split::Train).len() + store.shards(Split::Val).len(),
        "bytes": bytes,
        "bytes_per_token": per_token,
        "compression_vs_dense_f32": dense_f32 / per_token,
        "compression_vs_dense_bf16": dense_bf16 / per_token,
        "seed_design_raw_bytes_per_token": seed_raw,
        "open_and_verify_seconds": open_s,
    });
    if let Some(r) = &h.recoded_from {
        report["recoded_from"] = json!(r);
    }
    if opts.bench_read {
        report["read"] = bench_read(&store, 5)?;
    }
    if let Some(config) = &opts.config {
        let (cfg, _) = config::load(Some(config), &opts.sets)?;
        let pipeline = Pipeline::assemble(cfg, registry)?;
        let teacher = live_teacher(&pipeline)?;
        let val = pipeline.data.tokens(Split::Val);
        if fingerprint(val, h.seq_len) != h.val.fingerprint {
            return Err(Error::input(
                format!("--config {}", config.display()),
                "its validation tokens are not those the cache was built on",
            ));
        }
        let n = opts.sample_windows.min(h.val.windows);
        report["fidelity"] = fidelity(&store, teacher, val, n, &pipeline.device)?;
    }
    Ok(report)
}

/// Fidelity of the cache on the first `windows` validation windows against the live teacher:
/// per token (means),
/// - `kl_topk_bucket`: KL between the exact and the stored distribution over the `k + 1`
///   outcomes the cache describes (top-k ids and the tail bucket): the coding's error alone;
/// - `kl_full_vs_reconstructed`: KL(full teacher || top-k + uniform tail), the truncation to `k`
///   included (what `kl` trains against; the same for any top-k store with the same `k`);
/// - `kl_full_vs_exact_topk_uniform`: the same with the exact top-k values (truncation alone);
/// - `top1_agreement` of the stored top-1 with the teacher's argmax.
fn fidelity(
    store: &LogitStore,
    teacher: &dyn Teacher,
    val: &[u32],
    windows: usize,
    device: &candle_core::Device,
) -> Result<Value> {
    let h = store.header();
    let (k, v) = (h.k, h.vocab);
    let mut st = ReadState::new()?;
    let (mut bucket, mut full, mut trunc, mut agree, mut n) = (0f64, 0f64, 0f64, 0f64, 0usize);
    for w in 0..windows {
        let batch = retort_core::Batch::from_windows(val, Split::Val, &[w * h.seq_len], h.seq_len, device)?;
        let logits = teacher.forward(&batch, &TapSet::none())?.logits;
        let logits = logits.to_dtype(DType::F32)?.reshape(((), v))?;
        let lse = log_sum_exp_rows(&logits)?;
        let dense: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let (eids, elps) = topk_rows(&logits, k)?;
        let (mut cids, mut clps) = (Vec::new(), Vec::new());
        store.read_window(&mut st, Split::Val, w, k, &mut cids, &mut clps)?;
        for t in 0..h.seq_len {
            let row = &dense[t * v..(t + 1) * v];
            let lse_t = lse[t];
            let lp_full = |i: u32| row[i as usize] as f64 - lse_t;
            let (ci, cl) = (&cids[t * k..(t + 1) * k], &clps[t * k..(t + 1) * k]);
            let (ei, el) = (&eids[t * k..(t + 1) * k], &elps[t * k..(t + 1) * k]);
            agree += f64::from(u8::from(ci[0] == ei[0]));
            // Bucket KL: exact p over the cached ids (any id not in the exact top-k counts with
            // its true probability, so a changed id set shows up) and the two tails.
            let mut kl_b = 0.0;
            let mut head_exact = 0.0;
            let mut head_cached = 0.0;
            for (&i, &l) in ci.iter().zip(cl) {
                let p = lp_full(i).exp();
                kl_b += p * (lp_full(i) - l as f64);
                head_exact += p;
                head_cached += (l as f64).exp();
            }
            let (m_e, m_c) = ((1.0 - head_exact).max(1e-12), (1.0 - head_cached).max(1e-12));
            kl_b += m_e * (m_e / m_c).ln();
            bucket += kl_b;
            // Full KL against the uniform-tail reconstruction of the cached and exact top-k.
            let neg_h: f64 = row
                .iter()
                .map(|&z| {
                    let l = z as f64 - lse_t;
                    l.exp() * l
                })
                .sum();
            let recon = |ids: &[u32], lps: &[f32]| -> f64 {
                let m = (1.0 - lps.iter().map(|&l| (l as f64).exp()).sum::<f64>()).max(1e-12);
                let tail_lp = (m / (v - k).max(1) as f64).ln();
                let mut cross_top = 0.0;
                let mut p_top = 0.0;
                for (&i, &l) in ids.iter().zip(lps) {
                    let p = lp_full(i).exp();
                    cross_top += p * l as f64;
                    p_top += p;
                }
                let cross_tail = if v > k { (1.0 - p_top).max(0.0) * tail_lp } else { 0.0 };
                neg_h - cross_top - cross_tail
            };
            full += recon(ci, cl);
            trunc += recon(ei, el);
            n += 1;
        }
    }
    let d = n.max(1) as f64;
    Ok(json!({
        "windows": windows,
        "tokens": n,
        "kl_topk_bucket": bucket / d,
        "kl_full_vs_reconstructed": full / d,
        "kl_full_vs_exact_topk_uniform": trunc / d,
        "top1_agreement": agree / d,
    }))
}

fn log_sum_exp_rows(logits: &Tensor) -> Result<Vec<f64>> {
    let l = logits.to_dtype(DType::F64)?;
    let max = l.max_keepdim(D::Minus1)?;
    let lse = (l.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    Ok(lse.flatten_all()?.to_vec1()?)
}

/// The human-readable form of [`inspect`]'s JSON.
pub fn inspect_text(r: &Value) -> String {
    let f = |k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let u = |k: &str| r[k].as_u64().unwrap_or(0);
    let mut s = format!(
        "cache        {}\nteacher      {} ({})\nformat       v{}, top-{} of {} ids, values {} (expected coding KL {:.1e}), zstd {}\ntokens       {} ({} train + {} val windows of {})\nshards       {}\nbytes        {} ({:.1} bytes/token)\nvs dense f32 {:.0}x smaller ({} bytes/token)\nvs dense bf16 {:.0}x smaller\nseed design  {} bytes/token before gzip (top-{} fp32 + int64 ids)\nverified in  {:.3}s\n",
        r["path"].as_str().unwrap_or(""),
        r["teacher"].as_str().unwrap_or(""),
        r["teacher_id"].as_str().unwrap_or(""),
        u("format_version"),
        u("k"),
        u("vocab"),
        r["values"].as_str().unwrap_or(""),
        f("expected_coding_kl"),
        u("zstd_level"),
        u("tokens"),
        u("train_windows"),
        u("val_windows"),
        u("seq_len"),
        u("shards"),
        u("bytes"),
        f("bytes_per_token"),
        f("compression_vs_dense_f32"),
        u("vocab") * 4,
        f("compression_vs_dense_bf16"),
        f("seed_design_raw_bytes_per_token"),
        u("k"),
        f("open_and_verify_seconds"),
    );
    if let Some(rd) = r.get("read") {
        s.push_str(&format!(
            "read         {:.0} tokens/s (single thread, shuffled windows, median of {} passes over {} tokens)\n",
            rd["median_tokens_per_s"].as_f64().unwrap_or(f64::NAN),
            rd["passes"].as_array().map_or(0, Vec::len),
            rd["tokens_per_pass"].as_u64().unwrap_or(0)
        ));
    }
    if let Some(r) = r.get("recoded_from").and_then(Value::as_str) {
        s.push_str(&format!("recoded from {r}\n"));
    }
    if let Some(fi) = r.get("fidelity") {
        let g = |k: &str| fi[k].as_f64().unwrap_or(f64::NAN);
        s.push_str(&format!(
            "fidelity on {} val tokens:\n  KL over top-k + tail bucket (coding error) {:.3e} nats/token\n  KL(full || cached top-k + uniform tail)    {:.4} nats/token\n  KL(full || exact top-k + uniform tail)     {:.4} nats/token (truncation alone)\n  top-1 agreement                            {:.4}\n",
            fi["tokens"].as_u64().unwrap_or(0),
            g("kl_topk_bucket"),
            g("kl_full_vs_reconstructed"),
            g("kl_full_vs_exact_topk_uniform"),
            g("top1_agreement"),
        ));
    }
    s
}
