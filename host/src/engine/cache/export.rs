//! `retort cache recode` and `retort cache export`: a cache re-encoded without the teacher, and
//! its top-k as raw arrays for tools outside retort.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value};

use retort_core::{Error, Result, Split};
use retort_plugins::cache::{recode_cache, CacheHeader, LogitStore, ReadState};

use super::CodingArgs;

/// Options of `retort cache recode`.
#[derive(Debug, Clone, clap::Args)]
pub struct RecodeOptions {
    /// Source cache directory.
    pub src: PathBuf,
    /// Destination directory.
    #[arg(long)]
    pub out: PathBuf,
    /// Entries kept per token (at most the source's; default: the source's).
    #[arg(long)]
    pub k: Option<usize>,
    /// How values are stored.
    #[command(flatten)]
    pub coding: CodingArgs,
    /// Replace what is at --out.
    #[arg(long)]
    pub force: bool,
}

/// Re-encodes a cache with a smaller k or another value coding (exact from an f32 cache);
/// returns the new header and the seconds taken.
pub fn recode(opts: &RecodeOptions) -> Result<(CacheHeader, f64)> {
    let old = CacheHeader::read(&opts.src)?;
    let k = opts.k.unwrap_or(old.k);
    let values = opts.coding.value_coding(k)?;
    let t0 = Instant::now();
    let h = recode_cache(&opts.src, &opts.out, k, values, opts.coding.zstd_level, opts.force)?;
    Ok((h, t0.elapsed().as_secs_f64()))
}

/// Options of `retort cache export`.
#[derive(Debug, Clone, clap::Args)]
pub struct ExportOptions {
    /// Cache directory.
    pub path: PathBuf,
    /// Output directory.
    #[arg(long)]
    pub out: PathBuf,
    /// train or val.
    #[arg(long, default_value = "val", value_parser = parse_split)]
    pub split: Split,
    /// Windows to export at most.
    #[arg(long, default_value_t = 1_000_000)]
    pub windows: usize,
    /// Replace the arrays of an earlier export at --out.
    #[arg(long)]
    pub force: bool,
}

/// The files an export writes.
const EXPORT_FILES: [&str; 3] = ["ids.u32", "logprobs.f32", "meta.json"];

/// `out` can take an export: a directory (or nothing yet) without an earlier export's files,
/// unless `force`.
fn check_export_destination(out: &Path, force: bool) -> Result<()> {
    let what = || format!("--out {}", out.display());
    if out.exists() && !out.is_dir() {
        return Err(Error::input(what(), "exists and is not a directory"));
    }
    let found: Vec<&str> = EXPORT_FILES.into_iter().filter(|f| out.join(f).exists()).collect();
    if !found.is_empty() && !force {
        return Err(Error::input(
            what(),
            format!(
                "already holds {}; choose another --out, or pass --force to replace them",
                found.join(", ")
            ),
        ));
    }
    Ok(())
}

fn parse_split(s: &str) -> std::result::Result<Split, String> {
    match s {
        "train" => Ok(Split::Train),
        "val" => Ok(Split::Val),
        other => Err(format!("expected train or val, got `{other}`")),
    }
}

/// `retort cache export`: the top-k of the first `windows` windows of `split` as raw little
/// endian arrays `ids.u32` and `logprobs.f32` (`[tokens, k]`, descending) and `meta.json`, for
/// tools outside retort (e.g. `scripts/seed_cache_size.py`).
pub fn export(opts: &ExportOptions) -> Result<Value> {
    let (path, out, split, windows) = (opts.path.as_path(), opts.out.as_path(), opts.split, opts.windows);
    check_export_destination(out, opts.force)?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_earlier_export_or_a_file_is_refused_without_force() {
        let d = tempfile::tempdir().expect("tmp");
        assert!(check_export_destination(&d.path().join("new"), false).is_ok());
        assert!(check_export_destination(d.path(), false).is_ok());
        std::fs::write(d.path().join("meta.json"), "{}").expect("w");
        let err = check_export_destination(d.path(), false).expect_err("earlier export");
        assert_eq!(err.exit_code(), 2);
        assert!(
            err.to_string().contains("meta.json") && err.to_string().contains("--force"),
            "{err}"
        );
        assert!(check_export_destination(d.path(), true).is_ok());
        let file = d.path().join("meta.json");
        let err = check_export_destination(&file, true).expect_err("a file");
        assert!(err.to_string().contains("not a directory"), "{err}");
    }
}
