//! Building a cache: the teacher runs once over every aligned window of both splits; each
//! finished shard is written atomically, so a killed build keeps its finished shards and redoes
//! only the one it was working on.

use std::fs::File;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use retort_core::{Batch, DataSource, Error, Result, Split, TapSet, Teacher};

use super::codec::ValueCoding;
use super::shard::{encode_shard, shard_file_name, Shard};
use super::store::{fingerprint, CacheHeader, SplitInfo, TeacherIdentity, FORMAT_NAME, FORMAT_VERSION};

/// How to build.
#[derive(Debug, Clone)]
pub struct BuildOptions {
    /// Entries per token. Default 64.
    pub k: usize,
    /// Value coding. Default `sqrt` with the levels for a 4e-4 nats/token KL target.
    pub values: ValueCoding,
    /// zstd level. Default 9.
    pub zstd_level: i32,
    /// Tokens per window (the run's `train.seq_len`).
    pub seq_len: usize,
    /// Tokens per shard (rounded down to whole windows, at least one). Default 131,072.
    pub shard_tokens: usize,
    /// Windows per teacher forward pass.
    pub batch_windows: usize,
    /// The teacher's identity (`sha256:...` of its checkpoint or `declared:...`).
    pub teacher_id: String,
    /// Replace a cache with other settings at the destination.
    pub force: bool,
}

/// Progress of a build, reported after every teacher batch.
#[derive(Debug, Clone, Copy)]
pub struct BuildProgress {
    /// Tokens whose top-k is done (kept shards included).
    pub tokens_done: usize,
    /// Tokens to do in all.
    pub tokens_total: usize,
}

/// What a build did.
#[derive(Debug, Clone)]
pub struct BuildSummary {
    /// The header written.
    pub header: CacheHeader,
    /// Shards found complete and kept.
    pub shards_kept: usize,
    /// Shards computed now.
    pub shards_built: usize,
    /// Tokens the teacher ran over now.
    pub tokens_computed: usize,
}

/// The header a build with `opts` writes for `teacher` on `data`.
pub fn header_for(teacher: &dyn Teacher, data: &dyn DataSource, opts: &BuildOptions) -> Result<CacheHeader> {
    let vocab = teacher.vocab_size();
    if opts.k == 0 || opts.k > vocab {
        return Err(Error::config(
            "cache.k",
            format!("expected 1 <= k <= vocabulary ({vocab}), got {}", opts.k),
        ));
    }
    let split = |s: Split| {
        let tokens = data.tokens(s);
        SplitInfo {
            tokens: tokens.len(),
            windows: tokens.len().saturating_sub(1) / opts.seq_len,
            fingerprint: fingerprint(tokens, opts.seq_len),
        }
    };
    Ok(CacheHeader {
        format: FORMAT_NAME.into(),
        version: FORMAT_VERSION,
        k: opts.k,
        vocab,
        values: opts.values,
        zstd_level: opts.zstd_level,
        seq_len: opts.seq_len,
        windows_per_shard: (opts.shard_tokens / opts.seq_len).max(1),
        teacher: TeacherIdentity {
            id: opts.teacher_id.clone(),
            describe: teacher.describe(),
            params: teacher.num_params(),
        },
        tokenizer: data.tokenizer().identity(),
        train: split(Split::Train),
        val: split(Split::Val),
        recoded_from: None,
    })
}

/// Re-encodes the cache at `src` into `dst` with the top-`k` (`k <=` the source's) and
/// `values`, without the teacher: every window is decoded and encoded again, shard by shard
/// (same windows per shard), each shard written atomically. Exact when the source is `f32`;
/// from a quantised source the errors add up.
pub fn recode_cache(
    src: &Path,
    dst: &Path,
    k: usize,
    values: ValueCoding,
    zstd_level: i32,
    force: bool,
) -> Result<CacheHeader> {
    let store = super::LogitStore::open(src)?;
    let old = store.header();
    if k == 0 || k > old.k {
        return Err(Error::input(
            "--k",
            format!(
                "the source holds the top-{}; expected 1 <= k <= {}, got {k}",
                old.k, old.k
            ),
        ));
    }
    if src.canonicalize().ok() == dst.canonicalize().ok() {
        return Err(Error::input("--out", "must differ from the source cache"));
    }
    let header = CacheHeader {
        k,
        values,
        zstd_level,
        recoded_from: Some(format!("{} ({}, top-{})", src.display(), old.values.name(), old.k)),
        ..old.clone()
    };
    let _lock = prepare_destination(dst, &header, force, false)?;
    let mut state = super::ReadState::new()?;
    for split in [Split::Train, Split::Val] {
        for index in 0..header.split(split).shards(header.windows_per_shard) {
            let spec = header.shard_spec(split, index);
            let (mut ids, mut lps) = (Vec::new(), Vec::new());
            let first = spec.first_window as usize;
            for w in first..first + spec.windows as usize {
                store.read_window(&mut state, split, w, k, &mut ids, &mut lps)?;
            }
            let bytes = encode_shard(&spec, &ids, &lps, zstd_level)?;
            retort_core::fsutil::write_atomic(&dst.join(shard_file_name(split, index as u32)), &bytes)?;
        }
    }
    Ok(header)
}

/// Runs `teacher` over every window of `data` and writes the cache into `dir` (resuming a
/// build with the same header). `progress` is called after every teacher batch.
pub fn build_cache(
    dir: &Path,
    teacher: &dyn Teacher,
    data: &dyn DataSource,
    opts: &BuildOptions,
    device: &Device,
    progress: &mut dyn FnMut(BuildProgress),
) -> Result<BuildSummary> {
    if let Some(k) = teacher.sparse_topk() {
        return Err(Error::config(
            "teacher.kind",
            format!("the teacher is itself a top-{k} store; a cache is built from a live teacher"),
        ));
    }
    let header = header_for(teacher, data, opts)?;
    let _lock = prepare_destination(dir, &header, opts.force, true)?;

    let total = header.train.windows * header.seq_len + header.val.windows * header.seq_len;
    let mut done = 0usize;
    let (mut kept, mut built, mut computed) = (0, 0, 0);
    for split in [Split::Train, Split::Val] {
        let tokens = data.tokens(split);
        for index in 0..header.split(split).shards(header.windows_per_shard) {
            let spec = header.shard_spec(split, index);
            let path = dir.join(shard_file_name(split, index as u32));
            let shard_tokens = spec.windows as usize * header.seq_len;
            if path.exists() {
                match Shard::open(&path, &spec) {
                    Ok(_) => {
                        kept += 1;
                        done += shard_tokens;
                        progress(BuildProgress {
                            tokens_done: done,
                            tokens_total: total,
                        });
                        continue;
                    }
                    Err(e) => tracing::warn!("rebuilding {}: {e}", path.display()),
                }
            }
            let first = spec.first_window as usize;
            let windows: Vec<usize> = (first..first + spec.windows as usize).collect();
            let mut ids = Vec::with_capacity(shard_tokens * header.k);
            let mut lps = Vec::with_capacity(shard_tokens * header.k);
            for chunk in windows.chunks(opts.batch_windows.max(1)) {
                let batch = window_batch(tokens, split, chunk, header.seq_len, device)?;
                let logits = teacher.forward(&batch, &TapSet::none())?.logits;
                let (i, l) = topk_rows(&logits, header.k)?;
                ids.extend(i);
                lps.extend(l);
                done += chunk.len() * header.seq_len;
                computed += chunk.len() * header.seq_len;
                progress(BuildProgress {
                    tokens_done: done,
                    tokens_total: total,
                });
            }
            let bytes = encode_shard(&spec, &ids, &lps, header.zstd_level)?;
            retort_core::fsutil::write_atomic(&path, &bytes)?;
            built += 1;
        }
    }
    Ok(BuildSummary {
        header,
        shards_kept: kept,
        shards_built: built,
        tokens_computed: computed,
    })
}

fn first_difference(old: &CacheHeader, new: &CacheHeader) -> String {
    let o = serde_json::to_value(old).unwrap_or_default();
    let n = serde_json::to_value(new).unwrap_or_default();
    fn walk(path: &str, o: &serde_json::Value, n: &serde_json::Value) -> Option<String> {
        match (o, n) {
            (serde_json::Value::Object(a), serde_json::Value::Object(b)) => {
                for (k, v) in b {
                    let p = if path.is_empty() {
                        k.clone()
                    } else {
                        format!("{path}.{k}")
                    };
                    match a.get(k) {
                        Some(w) => {
                            if let Some(d) = walk(&p, w, v) {
                                return Some(d);
                            }
                        }
                        None => return Some(format!("{p} is new")),
                    }
                }
                None
            }
            _ if o != n => Some(format!("{path}: {o} there, {n} now")),
            _ => None,
        }
    }
    walk("", &o, &n).unwrap_or_else(|| "header differs".into())
}

/// Makes `dir` ready to receive the cache `header` describes, locks it against a second writer
/// (the lock is returned: hold it while writing) and writes the header. A cache with the same
/// header is kept when `resume` (its finished shards are reused); another cache is refused
/// unless `force`, which removes its files first; a directory holding anything but a cache is
/// refused, `force` or not.
fn prepare_destination(dir: &Path, header: &CacheHeader, force: bool, resume: bool) -> Result<Option<File>> {
    let what = || format!("cache directory {}", dir.display());
    if dir.exists() && !dir.is_dir() {
        return Err(Error::input(
            what(),
            "exists and is not a directory; choose another --out",
        ));
    }
    let foreign = foreign_entries(dir)?;
    if !foreign.is_empty() {
        return Err(Error::input(
            what(),
            format!(
                "holds files that are not a cache's ({}); a cache is written only into an empty directory or \
                 over a cache, --force or not: choose another --out",
                foreign.join(", ")
            ),
        ));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io("creating directory", dir, e))?;
    let busy = || {
        Error::input(
            what(),
            "another retort process is writing this cache; wait for it to end or stop it",
        )
    };
    let lock = retort_core::fsutil::lock_dir(dir, busy)?;
    if dir.join(super::store::HEADER_FILE).exists() {
        let old = CacheHeader::read(dir);
        let same = old.as_ref().is_ok_and(|o| o == header);
        if !(same && resume) {
            if !force {
                let instead = "choose another --out or pass --force to replace it";
                let old =
                    old.map_err(|e| Error::input_failed(what(), format!("holds an unreadable cache ({instead})"), e))?;
                let held = if same {
                    "a cache with these settings".to_string()
                } else {
                    format!(
                        "a cache built with other settings or data ({})",
                        first_difference(&old, header)
                    )
                };
                return Err(Error::input(what(), format!("holds {held}; {instead}")));
            }
            remove_cache_files(dir)?;
        }
    }
    header.write(dir)?;
    Ok(lock)
}

/// Whether `name` is a file a cache directory holds: its header, shards, their temp files and
/// the lock.
fn is_cache_entry(name: &str) -> bool {
    name == super::store::HEADER_FILE
        || name == retort_core::fsutil::LOCK_FILE
        || name.ends_with(".shard")
        || name.contains(".shard.tmp-")
        || name.starts_with(&format!(".{}.tmp-", super::store::HEADER_FILE))
}

/// The first few entries of `dir` that are not a cache's (none when `dir` is absent).
fn foreign_entries(dir: &Path) -> Result<Vec<String>> {
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut foreign = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))? {
        let name = entry.map_err(|e| Error::io("listing", dir, e))?.file_name();
        let name = name.to_string_lossy();
        if !is_cache_entry(&name) && foreign.len() < 5 {
            foreign.push(name.into_owned());
        }
    }
    foreign.sort();
    Ok(foreign)
}

/// Removes the header, shards and leftover temp files of a cache in `dir`.
fn remove_cache_files(dir: &Path) -> Result<()> {
    for entry in std::fs::read_dir(dir).map_err(|e| Error::io("listing", dir, e))? {
        let entry = entry.map_err(|e| Error::io("listing", dir, e))?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(".shard") || name == super::store::HEADER_FILE || name.contains(".shard.tmp-") {
            std::fs::remove_file(entry.path()).map_err(|e| Error::io("removing", &entry.path(), e))?;
        }
    }
    Ok(())
}

/// The aligned windows `windows` of `tokens` as a batch.
fn window_batch(tokens: &[u32], split: Split, windows: &[usize], seq_len: usize, device: &Device) -> Result<Batch> {
    let starts: Vec<usize> = windows.iter().map(|w| w * seq_len).collect();
    Batch::from_windows(tokens, split, &starts, seq_len, device)
}

/// The top-`k` ids and log-probabilities (temperature 1, descending, ties by ascending id) of
/// every row of `logits` `[.., vocab]`, computed on the host in parallel over rows, with the
/// log-normaliser in f64.
pub fn topk_rows(logits: &Tensor, k: usize) -> Result<(Vec<u32>, Vec<f32>)> {
    let v = logits.dim(candle_core::D::Minus1)?;
    let flat: Vec<f32> = logits
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_device(&Device::Cpu)?
        .to_vec1()?;
    let rows = flat.len() / v;
    let mut ids = vec![0u32; rows * k];
    let mut lps = vec![0f32; rows * k];
    flat.par_chunks(v)
        .zip(ids.par_chunks_mut(k).zip(lps.par_chunks_mut(k)))
        .try_for_each(|(row, (ids, lps))| -> Result<()> {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            if !max.is_finite() {
                return Err(Error::Runtime(format!(
                    "the teacher produced a non-finite logit row (max {max})"
                )));
            }
            let sum: f64 = row.iter().map(|&x| ((x - max) as f64).exp()).sum();
            let lse = max as f64 + sum.ln();
            let mut idx: Vec<u32> = (0..v as u32).collect();
            let cmp = |a: &u32, b: &u32| row[*b as usize].total_cmp(&row[*a as usize]).then(a.cmp(b));
            if k < v {
                idx.select_nth_unstable_by(k - 1, cmp);
            }
            let top = &mut idx[..k];
            top.sort_unstable_by(cmp);
            for (j, &i) in top.iter().enumerate() {
                ids[j] = i;
                lps[j] = (row[i as usize] as f64 - lse) as f32;
            }
            Ok(())
        })?;
    Ok((ids, lps))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topk_rows_matches_dense_topk() {
        let logits = Tensor::new(
            &[[1.0f32, 3.0, 2.0, 3.0, -1.0], [0.5, 0.1, 0.2, 0.3, 0.4]],
            &Device::Cpu,
        )
        .expect("t");
        let (ids, lps) = topk_rows(&logits, 3).expect("topk");
        // Ties (3.0 at ids 1 and 3) by ascending id.
        assert_eq!(ids, vec![1, 3, 2, 0, 4, 3]);
        let (ref_ids, ref_lps) = retort_core::model::dense_topk(&logits, 3).expect("dense");
        let ref_lps: Vec<f32> = ref_lps.flatten_all().expect("f").to_vec1().expect("v");
        for (a, b) in lps.iter().zip(&ref_lps) {
            assert!((a - b).abs() < 1e-6, "{a} vs {b}");
        }
        let ref_ids: Vec<u32> = ref_ids.flatten_all().expect("f").to_vec1().expect("v");
        assert_eq!(ids[3..], ref_ids[3..]);
    }
}
