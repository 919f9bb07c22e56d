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
        let fits = |n: usize| u32::try_from(n).is_ok();
        let windows_ok = |s: &SplitInfo| s.windows == s.tokens.saturating_sub(1) / h.seq_len.max(1);
        if h.k == 0
            || h.k > h.vocab
            || h.seq_len == 0
            || h.windows_per_shard == 0
            || ![h.vocab, h.seq_len, h.windows_per_shard].into_iter().all(fits)
            || !windows_ok(&h.train)
            || !windows_ok(&h.val)
        {
            return Err(Error::input(
                path.display().to_string(),
                format!(
                    "inconsistent header: k {} vocab {} seq_len {} windows_per_shard {} (each 1 to 2^32 - 1, \
                     k at most vocab), windows {} of {} train and {} of {} val tokens (expected (tokens - 1) / seq_len)",
                    h.k, h.vocab, h.seq_len, h.windows_per_shard, h.train.windows, h.train.tokens, h.val.windows, h.val.tokens
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::shard::tests::shard_bytes;
    use crate::fuzz::{self, user_error_naming};
    use proptest::prelude::*;

    /// A cache of 3 train windows (2 shards) and 1 val window of 5 tokens, top-4 of 50.
    fn write_cache(dir: &Path) -> CacheHeader {
        let split = |tokens: usize| SplitInfo {
            tokens,
            windows: (tokens - 1) / 5,
            fingerprint: "xxh3-128:0".into(),
        };
        let h = CacheHeader {
            format: FORMAT_NAME.into(),
            version: FORMAT_VERSION,
            k: 4,
            vocab: 50,
            values: ValueCoding::Sqrt { levels: 200 },
            zstd_level: 3,
            seq_len: 5,
            windows_per_shard: 2,
            teacher: TeacherIdentity {
                id: "declared:test".into(),
                describe: "test".into(),
                params: 0,
            },
            tokenizer: "test".into(),
            train: split(16),
            val: split(6),
            recoded_from: None,
        };
        for (split, shards) in [(Split::Train, 2), (Split::Val, 1)] {
            for i in 0..shards {
                let s = h.shard_spec(split, i);
                std::fs::write(dir.join(shard_file_name(split, i as u32)), shard_bytes(&s)).expect("shard");
            }
        }
        h.write(dir).expect("header");
        h
    }

    /// Opens the cache in `dir` and reads every window: each step succeeds or is a user error
    /// naming the cache directory.
    fn open_and_read(dir: &Path) -> std::result::Result<(), TestCaseError> {
        let name = dir.display().to_string();
        let Some(store) = user_error_naming(LogitStore::open(dir), &name)? else {
            return Ok(());
        };
        let mut state = ReadState::new().expect("state");
        let (mut ids, mut lps) = (Vec::new(), Vec::new());
        let h = store.header().clone();
        for split in [Split::Train, Split::Val] {
            for w in 0..h.split(split).windows {
                user_error_naming(store.read_window(&mut state, split, w, h.k, &mut ids, &mut lps), &name)?;
            }
        }
        Ok(())
    }

    /// Every leaf of `v` (a JSON pointer to it).
    fn leaves(v: &serde_json::Value, at: String, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => m.iter().for_each(|(k, v)| leaves(v, format!("{at}/{k}"), out)),
            serde_json::Value::Array(a) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| leaves(v, format!("{at}/{i}"), out)),
            _ => out.push(at),
        }
    }

    /// Values that a header's fields must not take unchecked.
    fn odd_value() -> impl Strategy<Value = serde_json::Value> {
        use serde_json::json;
        prop_oneof![
            Just(json!(0)),
            Just(json!(1)),
            Just(json!(-1)),
            Just(json!(u32::MAX)),
            Just(json!(1u64 << 32)),
            Just(json!(u64::MAX)),
            Just(json!(1.5)),
            Just(json!("x")),
            Just(json!(null)),
            (0u64..100).prop_map(|n| json!(n)),
        ]
    }

    #[test]
    fn a_valid_cache_reads_and_a_truncating_header_is_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        let h = write_cache(dir.path());
        assert!(open_and_read(dir.path()).is_ok());
        assert_eq!(LogitStore::open(dir.path()).expect("open").header(), &h);
        // k beyond 32 bits would have been cut to a shard's u32 field.
        let mut big = h.clone();
        big.k = (1 << 32) + 4;
        big.vocab = (1 << 33) + 50;
        big.write(dir.path()).expect("header");
        let e = LogitStore::open(dir.path()).err().expect("refused");
        assert!(e.to_string().contains("inconsistent header"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    proptest! {
        #![proptest_config(fuzz::config())]

        /// One field of header.json set to an odd value: refused naming the cache, or it reads.
        #[test]
        fn odd_header_fields_are_refused_naming_the_cache(pick in any::<prop::sample::Index>(), value in odd_value()) {
            let dir = tempfile::tempdir().expect("tmp");
            write_cache(dir.path());
            let path = dir.path().join(HEADER_FILE);
            let mut v: serde_json::Value =
                serde_json::from_str(&std::fs::read_to_string(&path).expect("read")).expect("json");
            let mut all = Vec::new();
            leaves(&v, String::new(), &mut all);
            if let Some(slot) = v.pointer_mut(&all[pick.index(all.len())]) {
                *slot = value;
            }
            std::fs::write(&path, serde_json::to_string(&v).expect("json")).expect("write");
            open_and_read(dir.path())?;
        }

        /// header.json damaged as bytes: refused naming the cache, or it reads.
        #[test]
        fn damaged_headers_are_refused_naming_the_cache(edits in fuzz::edits(3)) {
            let dir = tempfile::tempdir().expect("tmp");
            write_cache(dir.path());
            let path = dir.path().join(HEADER_FILE);
            let good = std::fs::read(&path).expect("read");
            std::fs::write(&path, fuzz::apply(&good, &edits)).expect("write");
            open_and_read(dir.path())?;
        }
    }
}
