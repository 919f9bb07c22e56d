//! One shard file: a fixed number of windows of one split, each window a zstd frame that
//! decodes on its own (random access by sequence), and a checksum over the whole file.
//!
//! Layout (little endian; docs/cache-format.md):
//!
//! ```text
//! 0   magic "RTLCSHD1"                      8 bytes
//! 8   format version, split (0 train, 1 val), shard index, k, seq_len, vocab,
//!     value coding (bit 31 set: frames not compressed), windows   8 x u32
//! 40  first window                          u64
//! 48  table length n, table bytes z         2 x u32
//! 56  frequency table: n ids, zstd          z bytes (u16 ids if vocab <= 65,536, else u32)
//!     frame offsets                         (windows + 1) x u64, from the first frame
//!     frames                                one zstd frame per window
//!     xxh3-64 of every byte before it       u64
//!     magic "RTLCEND1"                      8 bytes
//! ```

use std::fs::File;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use rayon::prelude::*;
use xxhash_rust::xxh3::xxh3_64;

use retort_core::{Error, Result, Split};

use super::codec::{decode_frame, encode_frame, ValueCoding, ValueLut};

/// Shard format version.
pub const SHARD_VERSION: u32 = 1;
const MAGIC: &[u8; 8] = b"RTLCSHD1";
const END: &[u8; 8] = b"RTLCEND1";
const HEADER_LEN: usize = 56;
/// Flag in the coding field: the frames are stored without zstd.
const RAW_FRAMES: u32 = 1 << 31;

/// What a shard must say about itself (checked against the store's header on open).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ShardSpec {
    /// The split.
    pub split: Split,
    /// Index among the split's shards.
    pub index: u32,
    /// Entries per token.
    pub k: u32,
    /// Tokens per window.
    pub seq_len: u32,
    /// Vocabulary size.
    pub vocab: u32,
    /// Value coding.
    pub coding: ValueCoding,
    /// Frames are zstd-compressed (`false`: stored as encoded, for the fastest reads).
    pub compressed: bool,
    /// Windows in the shard.
    pub windows: u32,
    /// Index of its first window in the split.
    pub first_window: u64,
}

/// The file name of shard `index` of `split`.
pub fn shard_file_name(split: Split, index: u32) -> String {
    let s = match split {
        Split::Train => "train",
        Split::Val => "val",
    };
    format!("{s}-{index:05}.shard")
}

fn split_id(s: Split) -> u32 {
    match s {
        Split::Train => 0,
        Split::Val => 1,
    }
}

/// Encodes a whole shard: `ids`/`logprobs` are `[windows * seq_len * k]` (window-major).
pub fn encode_shard(spec: &ShardSpec, ids: &[u32], logprobs: &[f32], zstd_level: i32) -> Result<Vec<u8>> {
    let k = spec.k as usize;
    let per_window = spec.seq_len as usize * k;
    if ids.len() != spec.windows as usize * per_window || logprobs.len() != ids.len() {
        return Err(Error::Runtime(format!(
            "encode_shard: {} ids / {} log-probs for {} windows of {} x {k}",
            ids.len(),
            logprobs.len(),
            spec.windows,
            spec.seq_len
        )));
    }
    // Frequency table: ids by how often they occur in this shard's top-k lists (ties by id).
    let mut counts = vec![0u64; spec.vocab as usize];
    for &id in ids {
        let c = counts
            .get_mut(id as usize)
            .ok_or_else(|| Error::Runtime(format!("teacher id {id} outside the vocabulary of {}", spec.vocab)))?;
        *c += 1;
    }
    let mut table: Vec<u32> = (0..spec.vocab).filter(|&i| counts[i as usize] > 0).collect();
    table.sort_by_key(|&i| (std::cmp::Reverse(counts[i as usize]), i));
    let mut rank_of = vec![u32::MAX; spec.vocab as usize];
    for (r, &id) in table.iter().enumerate() {
        rank_of[id as usize] = r as u32;
    }
    let table_bytes: Vec<u8> = if spec.vocab <= 1 << 16 {
        table.iter().flat_map(|&i| (i as u16).to_le_bytes()).collect()
    } else {
        table.iter().flat_map(|i| i.to_le_bytes()).collect()
    };
    let ztable = zstd::bulk::compress(&table_bytes, zstd_level.max(1)).map_err(|e| Error::failed("zstd", e))?;
    let frames: Vec<Vec<u8>> = (0..spec.windows as usize)
        .into_par_iter()
        .map(|w| {
            let r = w * per_window..(w + 1) * per_window;
            let raw = encode_frame(&ids[r.clone()], &logprobs[r], k, spec.coding, &rank_of);
            if spec.compressed {
                zstd::bulk::compress(&raw, zstd_level).map_err(|e| Error::failed("zstd", e))
            } else {
                Ok(raw)
            }
        })
        .collect::<Result<_>>()?;
    let mut out = Vec::with_capacity(HEADER_LEN + ztable.len() + frames.iter().map(Vec::len).sum::<usize>() + 64);
    out.extend_from_slice(MAGIC);
    for v in [
        SHARD_VERSION,
        split_id(spec.split),
        spec.index,
        spec.k,
        spec.seq_len,
        spec.vocab,
        spec.coding.id() | if spec.compressed { 0 } else { RAW_FRAMES },
        spec.windows,
    ] {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out.extend_from_slice(&spec.first_window.to_le_bytes());
    out.extend_from_slice(&(table.len() as u32).to_le_bytes());
    out.extend_from_slice(&(ztable.len() as u32).to_le_bytes());
    out.extend_from_slice(&ztable);
    let mut offset = 0u64;
    out.extend_from_slice(&offset.to_le_bytes());
    for f in &frames {
        offset += f.len() as u64;
        out.extend_from_slice(&offset.to_le_bytes());
    }
    for f in &frames {
        out.extend_from_slice(f);
    }
    let sum = xxh3_64(&out);
    out.extend_from_slice(&sum.to_le_bytes());
    out.extend_from_slice(END);
    Ok(out)
}

/// An open, verified shard.
pub struct Shard {
    path: PathBuf,
    map: Mmap,
    spec: ShardSpec,
    id_of_rank: Vec<u32>,
    lut: ValueLut,
    offsets_at: usize,
    frames_at: usize,
}

#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: read-only map of a file retort wrote atomically and never rewrites in place; a
    // shard replaced or truncated by another process while mapped is outside what the cache
    // supports (docs/cache-format.md). The checksum is verified right after mapping.
    unsafe { Mmap::map(file) }
}

fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(a)
}

impl Shard {
    /// Maps `path`, verifies its checksum and structure, and checks that it is the shard
    /// `expected` describes. Every failure names the file.
    pub fn open(path: &Path, expected: &ShardSpec) -> Result<Self> {
        let what = || format!("cache shard {}", path.display());
        let hint = "the shard is corrupt or truncated: delete it and rerun `retort cache` to rebuild it";
        let corrupt = |m: String| Error::input(what(), format!("{m}; {hint}"));
        let file = File::open(path).map_err(|e| Error::input_failed(what(), "cannot open", e))?;
        let map = map(&file).map_err(|e| Error::input_failed(what(), "cannot map", e))?;
        let n = map.len();
        if n < HEADER_LEN + 16 || &map[..8] != MAGIC {
            return Err(corrupt(format!("{n} bytes, no shard header")));
        }
        if &map[n - 8..] != END {
            return Err(corrupt("the end marker is missing".into()));
        }
        let stored = u64_at(&map, n - 16);
        if xxh3_64(&map[..n - 16]) != stored {
            return Err(corrupt("checksum mismatch".into()));
        }
        let version = u32_at(&map, 8);
        if version != SHARD_VERSION {
            return Err(Error::input(
                what(),
                format!("shard format version {version}; this retort reads version {SHARD_VERSION}"),
            ));
        }
        let coding_field = u32_at(&map, 32);
        let coding = ValueCoding::from_id(coding_field & !RAW_FRAMES)
            .ok_or_else(|| corrupt(format!("unknown value coding {coding_field}")))?;
        let split = match u32_at(&map, 12) {
            0 => Split::Train,
            1 => Split::Val,
            s => return Err(corrupt(format!("unknown split {s}"))),
        };
        let spec = ShardSpec {
            split,
            index: u32_at(&map, 16),
            k: u32_at(&map, 20),
            seq_len: u32_at(&map, 24),
            vocab: u32_at(&map, 28),
            coding,
            compressed: coding_field & RAW_FRAMES == 0,
            windows: u32_at(&map, 36),
            first_window: u64_at(&map, 40),
        };
        if spec != *expected {
            return Err(Error::input(
                what(),
                format!("the shard says {spec:?}, the cache header expects {expected:?}: it belongs to another cache"),
            ));
        }
        let table_len = u32_at(&map, 48) as usize;
        let ztable_len = u32_at(&map, 52) as usize;
        let offsets_at = HEADER_LEN + ztable_len;
        let frames_at = offsets_at + (spec.windows as usize + 1) * 8;
        if frames_at > n - 16 {
            return Err(corrupt("the frame index runs past the end".into()));
        }
        let id_bytes = if spec.vocab <= 1 << 16 { 2 } else { 4 };
        // The table holds distinct ids of the vocabulary: its length bounds what is allocated.
        if table_len > spec.vocab as usize {
            return Err(corrupt(format!(
                "a frequency table of {table_len} ids for a vocabulary of {}",
                spec.vocab
            )));
        }
        let mut table = Vec::new();
        table
            .try_reserve_exact(table_len * id_bytes)
            .map_err(|e| Error::input_failed(what(), "cannot allocate the frequency table", e))?;
        zstd::bulk::Decompressor::new()
            .and_then(|mut d| d.decompress_to_buffer(&map[HEADER_LEN..offsets_at], &mut table))
            .map_err(|e| Error::input_failed(what(), format!("frequency table ({hint})"), e))?;
        if table.len() != table_len * id_bytes {
            return Err(corrupt("frequency table has the wrong length".into()));
        }
        let id_of_rank: Vec<u32> = if id_bytes == 2 {
            table
                .chunks_exact(2)
                .map(|c| u16::from_le_bytes([c[0], c[1]]) as u32)
                .collect()
        } else {
            table.chunks_exact(4).map(|c| u32_at(c, 0)).collect()
        };
        if id_of_rank.iter().any(|&i| i >= spec.vocab) {
            return Err(corrupt("frequency table holds an id outside the vocabulary".into()));
        }
        let mut prev = 0u64;
        for w in 0..=spec.windows as usize {
            let o = u64_at(&map, offsets_at + 8 * w);
            let end = (frames_at as u64).checked_add(o);
            if o < prev || end.is_none_or(|end| end > (n - 16) as u64) {
                return Err(corrupt(format!("frame offset {w} is out of order or out of the file")));
            }
            prev = o;
        }
        if frames_at as u64 + prev != (n - 16) as u64 {
            return Err(corrupt("frames do not fill the file".into()));
        }
        Ok(Shard {
            path: path.to_path_buf(),
            map,
            spec,
            id_of_rank,
            lut: ValueLut::new(coding),
            offsets_at,
            frames_at,
        })
    }

    /// What the shard holds.
    pub fn spec(&self) -> &ShardSpec {
        &self.spec
    }

    /// Bytes on disk.
    pub fn bytes(&self) -> usize {
        self.map.len()
    }

    /// Decodes window `w` (index inside the shard) into its top-`k_out` entries per token,
    /// appended to `ids`/`lps` (`seq_len * k_out` each). `scratch` is a reusable buffer.
    pub fn read_window(
        &self,
        w: usize,
        k_out: usize,
        decompressor: &mut zstd::bulk::Decompressor<'_>,
        scratch: &mut Vec<u8>,
        ids: &mut Vec<u32>,
        lps: &mut Vec<f32>,
    ) -> Result<()> {
        let what = || format!("cache shard {}", self.path.display());
        let hint = "the shard is corrupt: delete it and rerun `retort cache` to rebuild it";
        let bad = |m: String| Error::input(what(), format!("window {w}: {m}; {hint}"));
        if w >= self.spec.windows as usize {
            return Err(Error::Runtime(format!(
                "{}: window {w} is outside the shard's {} windows",
                what(),
                self.spec.windows
            )));
        }
        let a = u64_at(&self.map, self.offsets_at + 8 * w) as usize;
        let b = u64_at(&self.map, self.offsets_at + 8 * (w + 1)) as usize;
        let frame = &self.map[self.frames_at + a..self.frames_at + b];
        let (t, k) = (self.spec.seq_len as usize, self.spec.k as usize);
        let frame: &[u8] = if self.spec.compressed {
            // At most 5 bytes of id gap per entry; a frame that decodes to more is refused.
            let per_token = k
                .checked_mul(self.spec.coding.value_bytes() + 5)
                .and_then(|b| b.checked_add(self.spec.coding.tail_bytes()));
            let cap = per_token
                .and_then(|b| b.checked_mul(t))
                .ok_or_else(|| bad(format!("{t} tokens of top-{k} overflow")))?;
            scratch.clear();
            scratch
                .try_reserve(cap)
                .map_err(|e| Error::input_failed(what(), format!("window {w}: cannot allocate {cap} bytes"), e))?;
            decompressor
                .decompress_to_buffer(frame, scratch)
                .map_err(|e| Error::input_failed(what(), format!("window {w}: zstd ({hint})"), e))?;
            scratch
        } else {
            frame
        };
        decode_frame(
            frame,
            t,
            k,
            k_out,
            self.spec.coding,
            &self.lut,
            &self.id_of_rank,
            ids,
            lps,
        )
        .map_err(|e| bad(e.to_string()))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::fuzz::{self, user_error_naming};
    use proptest::prelude::*;

    fn spec(windows: u32) -> ShardSpec {
        ShardSpec {
            split: Split::Train,
            index: 3,
            k: 4,
            seq_len: 5,
            vocab: 50,
            coding: ValueCoding::F32,
            compressed: true,
            windows,
            first_window: 12,
        }
    }

    fn data(windows: usize) -> (Vec<u32>, Vec<f32>) {
        let n = windows * 5;
        let mut ids = Vec::new();
        let mut lps = Vec::new();
        for t in 0..n {
            for j in 0..4u32 {
                ids.push((t as u32 * 3 + j * 11) % 50);
                lps.push(-0.5 - j as f32 - (t % 7) as f32 * 0.1);
            }
        }
        (ids, lps)
    }

    #[test]
    fn round_trip_and_every_corruption_is_refused_naming_the_file() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(shard_file_name(Split::Train, 3));
        let s = spec(3);
        let (ids, lps) = data(3);
        let bytes = encode_shard(&s, &ids, &lps, 3).expect("encode");
        std::fs::write(&path, &bytes).expect("write");
        let shard = Shard::open(&path, &s).expect("open");
        let mut dec = zstd::bulk::Decompressor::new().expect("zstd");
        let (mut scratch, mut oi, mut ol) = (Vec::new(), Vec::new(), Vec::new());
        for w in 0..3 {
            shard
                .read_window(w, 4, &mut dec, &mut scratch, &mut oi, &mut ol)
                .expect("read");
        }
        assert_eq!(oi, ids);
        assert_eq!(ol, lps);
        assert!(shard
            .read_window(3, 4, &mut dec, &mut scratch, &mut oi, &mut ol)
            .is_err());

        // Truncated, a flipped byte in a frame, and a shard of another cache.
        for (name, bad) in [
            ("truncated", bytes[..bytes.len() - 40].to_vec()),
            ("flipped", {
                let mut b = bytes.clone();
                let i = b.len() - 30;
                b[i] ^= 0x40;
                b
            }),
        ] {
            std::fs::write(&path, &bad).expect("write");
            let e = Shard::open(&path, &s)
                .err()
                .unwrap_or_else(|| panic!("{name} shard opened"));
            assert!(e.to_string().contains(&path.display().to_string()), "{name}: {e}");
            assert!(e.exit_code() == 2, "{name}");
        }
        std::fs::write(&path, &bytes).expect("write");
        let mut other = s;
        other.k = 8;
        let e = Shard::open(&path, &other).err().expect("mismatch refused");
        assert!(e.to_string().contains("another cache"), "{e}");
    }

    /// A valid shard of `windows` windows of [`data`] with `coding`, compressed or not.
    pub(crate) fn shard_bytes(s: &ShardSpec) -> Vec<u8> {
        let (ids, lps) = data(s.windows as usize);
        encode_shard(s, &ids, &lps, 3).expect("encode")
    }

    /// The shard's checksum and end marker recomputed over `body` (a shard less its last 16
    /// bytes), so that damage reaches the structural checks behind the checksum.
    fn resealed(body: &[u8]) -> Vec<u8> {
        let mut b = body.to_vec();
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        b.extend_from_slice(END);
        b
    }

    /// Opens `bytes` as the shard `s` and reads every window: each step succeeds or is a user
    /// error naming the file.
    fn open_and_read(bytes: &[u8], s: &ShardSpec) -> std::result::Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join(shard_file_name(s.split, s.index));
        std::fs::write(&path, bytes).expect("write");
        let file = path.display().to_string();
        let Some(shard) = user_error_naming(Shard::open(&path, s), &file)? else {
            return Ok(());
        };
        let mut dec = zstd::bulk::Decompressor::new().expect("zstd");
        let (mut scratch, mut ids, mut lps) = (Vec::new(), Vec::new(), Vec::new());
        for w in 0..s.windows as usize {
            user_error_naming(
                shard.read_window(w, s.k as usize, &mut dec, &mut scratch, &mut ids, &mut lps),
                &file,
            )?;
        }
        Ok(())
    }

    fn specs() -> impl Strategy<Value = ShardSpec> {
        let coding = prop_oneof![
            Just(ValueCoding::F32),
            Just(ValueCoding::Sqrt { levels: 200 }),
            Just(ValueCoding::Sqrt { levels: 300 }),
        ];
        (coding, any::<bool>(), 1u32..4).prop_map(|(coding, compressed, windows)| ShardSpec {
            coding,
            compressed,
            ..spec(windows)
        })
    }

    #[test]
    fn a_huge_frequency_table_length_is_refused_before_allocating() {
        let s = spec(2);
        let mut b = shard_bytes(&s);
        b[48..52].copy_from_slice(&u32::MAX.to_le_bytes());
        let n = b.len();
        let b = resealed(&b[..n - 16]);
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.shard");
        std::fs::write(&path, &b).expect("write");
        let e = Shard::open(&path, &s).err().expect("refused");
        assert!(e.to_string().contains("frequency table of 4294967295 ids"), "{e}");
        assert_eq!(e.exit_code(), 2);
    }

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Arbitrary bytes (half after the shard magic) are refused naming the file.
        #[test]
        fn arbitrary_bytes_are_refused_naming_the_file(bytes in fuzz::bytes_after(MAGIC, 300)) {
            open_and_read(&bytes, &spec(1))?;
        }

        /// A damaged shard is refused naming the file (mostly by its checksum).
        #[test]
        fn damaged_shards_are_refused_naming_the_file(s in specs(), edits in fuzz::edits(3)) {
            open_and_read(&fuzz::apply(&shard_bytes(&s), &edits), &s)?;
        }

        /// A shard damaged under a valid checksum (as by a faulty writer) is refused naming the
        /// file when opened or when a window is read, or reads.
        #[test]
        fn damaged_shards_with_a_valid_checksum_are_refused_naming_the_file(s in specs(), edits in fuzz::edits(3)) {
            let good = shard_bytes(&s);
            let body = fuzz::apply(&good[..good.len() - 16], &edits);
            open_and_read(&resealed(&body), &s)?;
        }
    }
}
