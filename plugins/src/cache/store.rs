//! A logit cache directory: `header.json` (what was cached, from what) and the shards of each
//! split. Opening verifies every shard; reads are by window, from memory-mapped shards.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_128;

use retort_core::{Error, Result, Split};

use super::codec::ValueCoding;
use super::shard::{shard_file_name, Shard, ShardSpec};

/// Name of the header file inside a cache directory.
pub const HEADER_FILE: &str = "header.json";
/// The `format` field of every header.
pub const FORMAT_NAME: &str = "retort-logit-cache";
/// Header format version (bumped with any incompatible change of header or shards).
pub const FORMAT_VERSION: u32 = 1;

/// `header.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheHeader {
    /// Always `retort-logit-cache`.
    pub format: String,
    /// [`FORMAT_VERSION`].
    pub version: u32,
    /// Entries per token.
    pub k: usize,
    /// Vocabulary size of the teacher's outputs.
    pub vocab: usize,
    /// Value coding.
    pub values: ValueCoding,
    /// zstd level of the frames; 0: frames stored uncompressed.
    pub zstd_level: i32,
    /// Tokens per window (windows start at multiples of it).
    pub seq_len: usize,
    /// Windows per shard (the last shard of a split may hold fewer).
    pub windows_per_shard: usize,
    /// Who the teacher was.
    pub teacher: TeacherIdentity,
    /// [`retort_core::Tokenizer::identity`] of the data's tokenizer.
    pub tokenizer: String,
    /// The training split.
    pub train: SplitInfo,
    /// The validation split.
    pub val: SplitInfo,
    /// For a cache re-encoded from another (`retort cache recode`): that cache's path and
    /// coding. Absent for a cache built from the teacher.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recoded_from: Option<String>,
}

/// The teacher a cache was built from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TeacherIdentity {
    /// `sha256:<hex>` of the checkpoint file(s), or `declared:<id>`.
    pub id: String,
    /// The teacher's one-line description.
    pub describe: String,
    /// The teacher's parameter count (0 if unknown).
    #[serde(default)]
    pub params: usize,
}

/// One split in a cache.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SplitInfo {
    /// Tokens in the split's stream.
    pub tokens: usize,
    /// Windows cached: `(tokens - 1) / seq_len`.
    pub windows: usize,
    /// [`fingerprint`] of the stream.
    pub fingerprint: String,
}

impl SplitInfo {
    /// The split's shards.
    pub fn shards(&self, windows_per_shard: usize) -> usize {
        self.windows.div_ceil(windows_per_shard)
    }
}

/// xxh3-128 (hex) of the window length and the token ids, little endian.
pub fn fingerprint(tokens: &[u32], seq_len: usize) -> String {
    let mut bytes = Vec::with_capacity(8 + tokens.len() * 4);
    bytes.extend_from_slice(&(seq_len as u64).to_le_bytes());
    for t in tokens {
        bytes.extend_from_slice(&t.to_le_bytes());
    }
    format!("xxh3-128:{:032x}", xxh3_128(&bytes))
}

impl CacheHeader {
    /// The split's info.
    pub fn split(&self, split: Split) -> &SplitInfo {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// What shard `index` of `split` must hold.
    pub fn shard_spec(&self, split: Split, index: usize) -> ShardSpec {
        let info = self.split(split);
        let first = index * self.windows_per_shard;
        ShardSpec {
            split,
            index: index as u32,
            k: self.k as u32,
            seq_len: self.seq_len as u32,
            vocab: self.vocab as u32,
            coding: self.values,
            compressed: self.zstd_level > 0,
            windows: (info.windows - first).min(self.windows_per_shard) as u32,
            first_window: first as u64,
        }
    }

    /// Reads and checks `dir/header.json`.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(HEADER_FILE);
        let what = || format!("logit cache {}", dir.display());
        let text = std::fs::read_to_string(&path).map_err(|e| {
            Error::input_failed(
                what(),
                format!(
                    "cannot read {} (build a cache with `retort cache CONFIG --out {}`)",
                    path.display(),
                    dir.display()
                ),
                e,
            )
        })?;
        let h: CacheHeader = serde_json::from_str(&text).map_err(|e| {
            Error::input_failed(
                format!("{} (line {}, column {})", path.display(), e.line(), e.column()),
                "not a cache header",
                e,
            )
        })?;
        if h.format != FORMAT_NAME {
            return Err(Error::input(
                path.display().to_string(),
                format!("format `{}`, expected `{FORMAT_NAME}`", h.format),
            ));
        }
        if h.version != FORMAT_VERSION {
            return Err(Error::input(
                path.display().to_string(),
                format!(
                    "cache format version {}; this retort reads version {FORMAT_VERSION}: rebuild the cache",
                    h.version
                ),
            ));
        }
        if h.k == 0 || h.k > h.vocab || h.seq_len == 0 || h.windows_per_shard == 0 {
            return Err(Error::input(
                path.display().to_string(),
                format!(
                    "inconsistent header: k {} vocab {} seq_len {} windows_per_shard {}",
                    h.k, h.vocab, h.seq_len, h.windows_per_shard
                ),
            ));
        }
        Ok(h)
    }

    /// Writes `dir/header.json` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let text = serde_json::to_string_pretty(self).map_err(|e| Error::failed("serialising the cache header", e))?;
        retort_core::fsutil::write_atomic(&dir.join(HEADER_FILE), text.as_bytes())
    }
}

/// An open cache: the header and every shard, verified.
pub struct LogitStore {
    dir: PathBuf,
    header: CacheHeader,
    train: Vec<Shard>,
    val: Vec<Shard>,
}

impl LogitStore {
    /// Opens `dir`, verifying every shard's checksum and identity; a missing, truncated or
    /// corrupt shard is an error naming it.
    pub fn open(dir: &Path) -> Result<Self> {
        let header = CacheHeader::read(dir)?;
        let open_split = |split: Split| -> Result<Vec<Shard>> {
            let n = header.split(split).shards(header.windows_per_shard);
            (0..n)
                .map(|i| {
                    let path = dir.join(shard_file_name(split, i as u32));
                    if !path.exists() {
                        return Err(Error::input(
                            format!("logit cache {}", dir.display()),
                            format!(
                                "shard {} is missing ({} of {n} {split:?} shards expected): the build did not finish; rerun `retort cache` with the same config to complete it",
                                path.display(),
                                i + 1
                            ),
                        ));
                    }
                    Shard::open(&path, &header.shard_spec(split, i))
                })
                .collect()
        };
        let train = open_split(Split::Train)?;
        let val = open_split(Split::Val)?;
        Ok(LogitStore {
            dir: dir.to_path_buf(),
            header,
            train,
            val,
        })
    }

    /// The header.
    pub fn header(&self) -> &CacheHeader {
        &self.header
    }

    /// The directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of all shards (the header not counted).
    pub fn shard_bytes(&self) -> usize {
        self.train.iter().chain(&self.val).map(Shard::bytes).sum()
    }

    /// Shards of `split`.
    pub fn shards(&self, split: Split) -> &[Shard] {
        match split {
            Split::Train => &self.train,
            Split::Val => &self.val,
        }
    }

    /// Appends window `window` of `split`: `seq_len * k_out` ids and log-probs, each token's
    /// top-`k_out` (`k_out <= k`) in descending order. `state` is the caller's decoding state
    /// (one per thread).
    pub fn read_window(
        &self,
        state: &mut ReadState,
        split: Split,
        window: usize,
        k_out: usize,
        ids: &mut Vec<u32>,
        lps: &mut Vec<f32>,
    ) -> Result<()> {
        let h = &self.header;
        if k_out == 0 || k_out > h.k {
            return Err(Error::Runtime(format!(
                "the cache holds the top-{} per token; top-{k_out} was asked for",
                h.k
            )));
        }
        let info = h.split(split);
        if window >= info.windows {
            return Err(Error::Runtime(format!(
                "window {window} of the {split:?} split is not in the cache ({} windows)",
                info.windows
            )));
        }
        let shard = &self.shards(split)[window / h.windows_per_shard];
        shard.read_window(
            window % h.windows_per_shard,
            k_out,
            &mut state.decompressor,
            &mut state.scratch,
            ids,
            lps,
        )
    }
}

/// Decoding state of one reader: a zstd context and a frame buffer, reused across reads.
pub struct ReadState {
    decompressor: zstd::bulk::Decompressor<'static>,
    scratch: Vec<u8>,
}

impl ReadState {
    /// A fresh state.
    pub fn new() -> Result<Self> {
        Ok(ReadState {
            decompressor: zstd::bulk::Decompressor::new().map_err(|e| Error::failed("zstd", e))?,
            scratch: Vec::new(),
        })
    }
}
