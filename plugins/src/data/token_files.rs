//! Data kind `tokens`: pre-tokenized corpora as flat little-endian `uint16` or `uint32` id
//! files (nanoGPT's `train.bin` / `val.bin` layout), memory-mapped, so a corpus larger than
//! memory trains without being read into it (the OS pages the windows in).
//!
//! `uint32` files are used in place (zero-copy). A `uint16` file is widened once into a `uint32`
//! sidecar, `<file>.<xxh3-128 of the file's bytes>.u32` beside it or under `cache_dir`, written
//! atomically. The key is the source's content, never its name, size or time: two corpora with
//! the same file names share a `cache_dir` safely, and an edited source gets a new sidecar. A
//! sidecar is reused only if it holds exactly the source's ids (checked on every open). Every
//! id is checked against the tokenizer's vocabulary at load (one sequential pass, also for a
//! reused sidecar), and an out-of-range id is an error naming the file and the token's index.
//! The files must not change while a run uses them.
//!
//! ```toml
//! [data]
//! kind = "tokens"
//! dir = "data/shakespeare"              # train.bin and val.bin inside
//! dtype = "u16"                         # nanoGPT's default; "u32" for vocabularies > 65536
//! tokenizer = { kind = "hf", path = "models/SmolLM2-135M-Instruct.Q4_1.gguf" }
//! ```

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;
use xxhash_rust::xxh3::xxh3_128;

use retort_core::config::ComponentSpec;
use retort_core::registry::Factory;
use retort_core::{BuildContext, DataSource, Error, Params, Result, Split, Tokenizer};

/// Width of the ids in the files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum IdWidth {
    /// 2 bytes per id (vocabularies up to 65,536).
    U16,
    /// 4 bytes per id.
    U32,
}

/// Params of `tokens`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TokenFilesParams {
    /// Directory holding `train.bin` and `val.bin`. Either this or both `train` and `val`.
    pub dir: Option<PathBuf>,
    /// Training id file (overrides `dir`).
    pub train: Option<PathBuf>,
    /// Validation id file (overrides `dir`).
    pub val: Option<PathBuf>,
    /// Id width. Default `u16`.
    #[serde(default = "default_width")]
    pub dtype: IdWidth,
    /// The tokenizer the ids come from (for decoding and the teacher/student checks). Required.
    pub tokenizer: ComponentSpec,
    /// Where widened `uint16` files go, as `<file>.<content hash>.u32` (several corpora may
    /// share one). Default: beside each file.
    pub cache_dir: Option<PathBuf>,
}

fn default_width() -> IdWidth {
    IdWidth::U16
}

/// Memory-mapped id files.
pub struct TokenFileSource {
    tokenizer: Box<dyn Tokenizer>,
    train: Mmap,
    val: Mmap,
    description: String,
}

#[allow(unsafe_code)]
fn map(file: &File) -> std::io::Result<Mmap> {
    // SAFETY: the map is read-only and retort never writes the file while it is mapped; a file
    // changed by another process during a run is outside what this source supports (module doc).
    unsafe { Mmap::map(file) }
}

fn ids(m: &Mmap) -> &[u32] {
    // Checked at open: the length is a multiple of 4 and a map is page-aligned.
    bytemuck::try_cast_slice(&m[..]).unwrap_or(&[])
}

/// The `uint16` ids of `src` are exactly the `uint32` ids of `sidecar` (both maps, so aligned;
/// little-endian machines only, checked at open).
fn same_ids(src: &[u8], sidecar: &[u8]) -> bool {
    match (
        bytemuck::try_cast_slice::<u8, u16>(src),
        bytemuck::try_cast_slice::<u8, u32>(sidecar),
    ) {
        (Ok(a), Ok(b)) => a.len() == b.len() && a.iter().zip(b).all(|(&x, &y)| u32::from(x) == y),
        _ => false,
    }
}

/// The widened copy of the `uint16` file `src`: `<name>.<xxh3-128 of its bytes>.u32` in
/// `cache_dir`, or beside `src`. Keyed by the source's content, so corpora that share file
/// names (in one `cache_dir`) never share a sidecar, and an edited source (whatever its size
/// and modification time) gets a new one; a sidecar found under the key is reused only if it
/// holds exactly the source's ids, else it is rewritten. Beside the source, the sidecars of
/// its earlier contents are removed.
fn widened(src: &Path, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let what = || format!("token file {}", src.display());
    let file = File::open(src).map_err(|e| Error::input_failed(what(), "cannot open", e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::input_failed(what(), "cannot read", e))?
        .len();
    if len == 0 || len % 2 != 0 {
        return Err(Error::input(
            what(),
            format!("{len} bytes is not a non-empty whole number of uint16 ids"),
        ));
    }
    let source = map(&file).map_err(|e| Error::io("memory-mapping token file", src, e))?;
    let name = src
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let key = format!("{name}.{:032x}.u32", xxh3_128(&source));
    let dir = match cache_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io("creating the token cache directory", d, e))?;
            d.to_path_buf()
        }
        None => src.parent().map(Path::to_path_buf).unwrap_or_default(),
    };
    let out = dir.join(&key);
    if let Ok(existing) = File::open(&out) {
        if existing.metadata().is_ok_and(|m| m.len() == 2 * len) && map(&existing).is_ok_and(|m| same_ids(&source, &m))
        {
            return Ok(out);
        }
    }
    let tmp = dir.join(format!(".{key}.tmp-{}", std::process::id()));
    let file = File::create(&tmp).map_err(|e| Error::io("creating the widened token file", &tmp, e))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut wide = Vec::with_capacity(1 << 21);
    for chunk in source.chunks(1 << 20) {
        wide.clear();
        for pair in chunk.chunks_exact(2) {
            wide.extend_from_slice(&[pair[0], pair[1], 0, 0]);
        }
        writer
            .write_all(&wide)
            .map_err(|e| Error::io("writing the widened token file", &tmp, e))?;
    }
    let file = writer
        .into_inner()
        .map_err(|e| Error::io("writing the widened token file", &tmp, e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io("syncing the widened token file", &tmp, e))?;
    std::fs::rename(&tmp, &out).map_err(|e| Error::io("renaming the widened token file into place", &out, e))?;
    if cache_dir.is_none() {
        remove_stale_sidecars(&dir, &name, &key);
    }
    Ok(out)
}

/// Removes `<name>.<32 hex digits>.u32` files of `dir` other than `keep` (sidecars of earlier
/// contents of the source `name`). Best effort: a file that does not go stays.
fn remove_stale_sidecars(dir: &Path, name: &str, keep: &str) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let file = entry.file_name();
        let Some(file) = file.to_str() else {
            continue;
        };
        let hash = file
            .strip_prefix(name)
            .and_then(|r| r.strip_prefix('.'))
            .and_then(|r| r.strip_suffix(".u32"));
        if file != keep && hash.is_some_and(|h| h.len() == 32 && h.bytes().all(|b| b.is_ascii_hexdigit())) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn open_u32(path: &Path, origin: &Path, vocab: usize) -> Result<Mmap> {
    let what = || format!("token file {}", origin.display());
    let file =
        File::open(path).map_err(|e| Error::input_failed(what(), format!("cannot open {}", path.display()), e))?;
    let len = file
        .metadata()
        .map_err(|e| Error::io("reading token file", path, e))?
        .len();
    if len == 0 || len % 4 != 0 {
        return Err(Error::input(
            what(),
            format!("{len} bytes is not a non-empty whole number of uint32 ids"),
        ));
    }
    let m = map(&file).map_err(|e| Error::io("memory-mapping token file", path, e))?;
    if bytemuck::try_cast_slice::<u8, u32>(&m[..]).is_err() {
        return Err(Error::input(what(), "the map is not aligned for uint32 ids"));
    }
    if let Some((i, id)) = ids(&m).iter().enumerate().find(|(_, &id)| id as usize >= vocab) {
        return Err(Error::input(
            what(),
            format!("token {i} has id {id}, outside the tokenizer's vocabulary of {vocab}"),
        ));
    }
    Ok(m)
}

impl TokenFileSource {
    /// Maps `train` and `val` (widening `uint16` files first), checking every id against
    /// `tokenizer`.
    pub fn open(
        train: &Path,
        val: &Path,
        width: IdWidth,
        tokenizer: Box<dyn Tokenizer>,
        cache_dir: Option<&Path>,
    ) -> Result<Self> {
        if cfg!(target_endian = "big") {
            return Err(Error::Runtime(
                "token files are little-endian; this machine is big-endian".into(),
            ));
        }
        let vocab = tokenizer.vocab_size();
        let load = |p: &Path| -> Result<Mmap> {
            match width {
                IdWidth::U32 => open_u32(p, p, vocab),
                IdWidth::U16 => open_u32(&widened(p, cache_dir)?, p, vocab),
            }
        };
        let (train_map, val_map) = (load(train)?, load(val)?);
        let description = format!(
            "tokens {} ({} train) / {} ({} val), {:?} ids, vocab {vocab}, memory-mapped",
            train.display(),
            ids(&train_map).len(),
            val.display(),
            ids(&val_map).len(),
            width
        );
        Ok(TokenFileSource {
            tokenizer,
            train: train_map,
            val: val_map,
            description,
        })
    }
}

impl DataSource for TokenFileSource {
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.tokenizer.as_ref()
    }
    fn tokens(&self, split: Split) -> &[u32] {
        match split {
            Split::Train => ids(&self.train),
            Split::Val => ids(&self.val),
        }
    }
    fn describe(&self) -> String {
        self.description.clone()
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn DataSource>> {
    let p: TokenFilesParams = params.parse()?;
    let from_dir = |name: &str| p.dir.as_ref().map(|d| d.join(name));
    let (Some(train), Some(val)) = (
        p.train.clone().or(from_dir("train.bin")),
        p.val.clone().or(from_dir("val.bin")),
    ) else {
        return Err(params.error(
            "dir",
            "give `dir` (holding train.bin and val.bin) or both `train` and `val`",
        ));
    };
    let tokenizer = ctx.registry.tokenizers.build(
        &p.tokenizer.kind,
        &p.tokenizer.params_at(&params.key_path("tokenizer")),
        ctx,
    )?;
    Ok(Box::new(TokenFileSource::open(
        &train,
        &val,
        p.dtype,
        tokenizer,
        p.cache_dir.as_deref(),
    )?))
}

inventory::submit! {
    Factory::<dyn DataSource> {
        kind: "tokens",
        description: "pre-tokenized uint16/uint32 id files (nanoGPT train.bin/val.bin), memory-mapped",
        build, params: retort_core::registry::params_schema::<TokenFilesParams> }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokenizers::char_level::CharTokenizer;

    fn tok() -> Box<dyn Tokenizer> {
        Box::new(CharTokenizer::from_corpus("abcdefghij"))
    }

    fn write_u16(path: &Path, ids: &[u16]) {
        let bytes: Vec<u8> = ids.iter().flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn u16_files_are_widened_once_and_read_back_exactly() {
        let d = tempfile::tempdir().expect("tmp");
        let train_ids: Vec<u16> = (0..100_001).map(|i| (i * 7 % 10) as u16).collect();
        write_u16(&d.path().join("train.bin"), &train_ids);
        write_u16(&d.path().join("val.bin"), &[1, 2, 3, 4, 5]);
        let src = TokenFileSource::open(
            &d.path().join("train.bin"),
            &d.path().join("val.bin"),
            IdWidth::U16,
            tok(),
            None,
        )
        .expect("open");
        let want: Vec<u32> = train_ids.iter().map(|&i| i as u32).collect();
        assert_eq!(src.tokens(Split::Train), &want[..]);
        assert_eq!(src.tokens(Split::Val), &[1, 2, 3, 4, 5]);
        let sidecar = std::fs::read_dir(d.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                let n = p
                    .file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default();
                n.starts_with("train.bin.") && n.ends_with(".u32")
            })
            .expect("sidecar");
        assert_eq!(std::fs::metadata(&sidecar).expect("sidecar").len(), 4 * 100_001);
        // Reused while fresh: its modification time does not move.
        let before = std::fs::metadata(&sidecar).and_then(|m| m.modified()).expect("mtime");
        drop(src);
        TokenFileSource::open(
            &d.path().join("train.bin"),
            &d.path().join("val.bin"),
            IdWidth::U16,
            tok(),
            None,
        )
        .expect("reopen");
        let after = std::fs::metadata(&sidecar).and_then(|m| m.modified()).expect("mtime");
        assert_eq!(before, after);
    }

    fn open_u16(train: &Path, val: &Path, cache: Option<&Path>) -> Result<TokenFileSource> {
        TokenFileSource::open(train, val, IdWidth::U16, tok(), cache)
    }

    #[test]
    fn corpora_with_the_same_file_names_share_no_sidecar_in_a_cache_dir() {
        let d = tempfile::tempdir().expect("tmp");
        let cache = d.path().join("cache");
        let (a, b) = (d.path().join("a"), d.path().join("b"));
        for (dir, ids) in [(&a, [1u16, 2, 3, 4]), (&b, [5u16, 6, 7, 8])] {
            std::fs::create_dir_all(dir).expect("mkdir");
            write_u16(&dir.join("train.bin"), &ids);
            write_u16(&dir.join("val.bin"), &ids[..2]);
        }
        let first = open_u16(&a.join("train.bin"), &a.join("val.bin"), Some(&cache)).expect("a");
        assert_eq!(first.tokens(Split::Train), &[1, 2, 3, 4]);
        // Same names, same sizes, and sources older than the first corpus's sidecars.
        let second = open_u16(&b.join("train.bin"), &b.join("val.bin"), Some(&cache)).expect("b");
        assert_eq!(second.tokens(Split::Train), &[5, 6, 7, 8]);
        assert_eq!(second.tokens(Split::Val), &[5, 6]);
        // Each corpus keeps its own sidecar: the first still reads its tokens.
        let again = open_u16(&a.join("train.bin"), &a.join("val.bin"), Some(&cache)).expect("a again");
        assert_eq!(again.tokens(Split::Train), &[1, 2, 3, 4]);
        let sidecars = std::fs::read_dir(&cache).expect("ls").count();
        assert_eq!(sidecars, 4, "one sidecar per distinct source");
    }

    #[test]
    fn a_sidecar_is_not_reused_once_its_source_changed_even_with_the_same_size_and_time() {
        let d = tempfile::tempdir().expect("tmp");
        let (train, val) = (d.path().join("train.bin"), d.path().join("val.bin"));
        write_u16(&train, &[1, 2, 3]);
        write_u16(&val, &[4, 5]);
        let mtime = std::fs::metadata(&train).and_then(|m| m.modified()).expect("mtime");
        drop(open_u16(&train, &val, None).expect("open"));
        // Rewritten in place with the same size, its modification time put back (`cp -p`).
        write_u16(&train, &[3, 2, 1]);
        let f = File::options().write(true).open(&train).expect("reopen");
        f.set_modified(mtime).expect("set mtime");
        drop(f);
        let src = open_u16(&train, &val, None).expect("reopen");
        assert_eq!(src.tokens(Split::Train), &[3, 2, 1]);
        // The stale sidecar beside the source is gone; the current one is there.
        let sidecars: Vec<String> = std::fs::read_dir(d.path())
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with("train.bin.") && n.ends_with(".u32"))
            .collect();
        assert_eq!(sidecars.len(), 1, "{sidecars:?}");
    }

    #[test]
    fn a_damaged_sidecar_is_rebuilt_and_ids_are_checked_on_every_open() {
        let d = tempfile::tempdir().expect("tmp");
        let (train, val) = (d.path().join("train.bin"), d.path().join("val.bin"));
        let cache = d.path().join("cache");
        write_u16(&train, &[1, 2, 9]);
        write_u16(&val, &[4, 5]);
        drop(open_u16(&train, &val, Some(&cache)).expect("open"));
        let sidecar = std::fs::read_dir(&cache)
            .expect("ls")
            .filter_map(|e| e.ok())
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("train.bin."))
            })
            .expect("train sidecar");
        // Overwritten with other ids of the same length: not trusted.
        let other: Vec<u8> = [7u32, 7, 7].iter().flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(&sidecar, other).expect("w");
        let src = open_u16(&train, &val, Some(&cache)).expect("reopen");
        assert_eq!(src.tokens(Split::Train), &[1, 2, 9]);
        drop(src);
        // A reused sidecar is still checked against the (now smaller) vocabulary.
        let small: Box<dyn Tokenizer> = Box::new(CharTokenizer::from_corpus("abcdefgh"));
        let err = TokenFileSource::open(&train, &val, IdWidth::U16, small, Some(&cache))
            .err()
            .expect("id 9 is outside a vocabulary of 8");
        let msg = err.to_string();
        assert!(msg.contains("train.bin") && msg.contains("token 2 has id 9"), "{msg}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn u32_files_map_in_place_and_bad_files_name_themselves() {
        let d = tempfile::tempdir().expect("tmp");
        let ids: Vec<u8> = [0u32, 9, 3, 4].iter().flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(d.path().join("t.bin"), &ids).expect("w");
        std::fs::write(d.path().join("v.bin"), &ids).expect("w");
        let src = TokenFileSource::open(
            &d.path().join("t.bin"),
            &d.path().join("v.bin"),
            IdWidth::U32,
            tok(),
            Some(&d.path().join("cache")),
        )
        .expect("open");
        assert_eq!(src.tokens(Split::Train), &[0, 9, 3, 4]);
        assert!(!d.path().join("cache").exists(), "u32 files are not copied");

        // An id outside the vocabulary (10 symbols): named by file and index.
        let bad: Vec<u8> = [0u32, 1, 10].iter().flat_map(|i| i.to_le_bytes()).collect();
        std::fs::write(d.path().join("bad.bin"), &bad).expect("w");
        let err = TokenFileSource::open(
            &d.path().join("bad.bin"),
            &d.path().join("v.bin"),
            IdWidth::U32,
            tok(),
            None,
        )
        .err()
        .expect("refused");
        let msg = err.to_string();
        assert!(msg.contains("bad.bin") && msg.contains("token 2 has id 10"), "{msg}");
        assert_eq!(err.exit_code(), 2);
        // A truncated file.
        std::fs::write(d.path().join("odd.bin"), [1u8, 0, 0]).expect("w");
        let err = TokenFileSource::open(
            &d.path().join("odd.bin"),
            &d.path().join("v.bin"),
            IdWidth::U16,
            tok(),
            None,
        )
        .err()
        .expect("refused");
        assert!(
            err.to_string().contains("odd.bin") && err.to_string().contains("uint16"),
            "{err}"
        );
    }

    proptest::proptest! {
        #![proptest_config(crate::fuzz::config())]

        /// Arbitrary bytes as a token file of either width, widened beside it or in a cache
        /// directory: refused naming the file, or read back exactly, every id in the vocabulary.
        #[test]
        fn arbitrary_token_files_are_refused_naming_the_file_or_read_exactly(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
            u32_ids: bool,
            cache: bool,
        ) {
            let d = tempfile::tempdir().expect("tmp");
            let (train, val) = (d.path().join("train.bin"), d.path().join("val.bin"));
            // Small ids (< 10) are likely, so that some files are valid.
            let bytes: Vec<u8> = bytes.iter().map(|b| if b % 3 == 0 { b % 10 } else { *b }).collect();
            std::fs::write(&train, &bytes).expect("w");
            write_u16(&val, &[1, 2]);
            let width = if u32_ids { IdWidth::U32 } else { IdWidth::U16 };
            let cache_dir = d.path().join("cache");
            let opened = TokenFileSource::open(&train, &val, width, tok(), cache.then_some(cache_dir.as_path()));
            if let Some(src) = crate::fuzz::user_error_naming(opened, &train.display().to_string())? {
                let want: Vec<u32> = if u32_ids {
                    bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
                } else {
                    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]]) as u32).collect()
                };
                proptest::prop_assert_eq!(src.tokens(Split::Train), &want[..]);
                proptest::prop_assert!(want.iter().all(|&i| i < 10));
            }
        }

    }

    proptest::proptest! {
        // Few cases: each writes and syncs six sidecars.
        #![proptest_config(proptest::prelude::ProptestConfig { cases: 32, ..crate::fuzz::config() })]

        /// Corpora that share file names, sizes and one cache directory each read their own ids.
        #[test]
        fn same_named_corpora_read_their_own_ids(
            a in proptest::collection::vec(0u16..10, 1..20),
            seed in 0u16..10,
        ) {
            let d = tempfile::tempdir().expect("tmp");
            let cache = d.path().join("cache");
            let b: Vec<u16> = a.iter().map(|i| (i + seed) % 10).collect();
            for (name, ids) in [("a", &a), ("b", &b), ("a", &a)] {
                let dir = d.path().join(name);
                std::fs::create_dir_all(&dir).expect("mkdir");
                write_u16(&dir.join("train.bin"), ids);
                write_u16(&dir.join("val.bin"), ids);
                let src = open_u16(&dir.join("train.bin"), &dir.join("val.bin"), Some(&cache)).expect("open");
                let want: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
                proptest::prop_assert_eq!(src.tokens(Split::Train), &want[..]);
            }
        }
    }
}
