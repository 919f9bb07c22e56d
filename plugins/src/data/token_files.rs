//! Data kind `tokens`: pre-tokenized corpora as flat little-endian `uint16` or `uint32` id
//! files (nanoGPT's `train.bin` / `val.bin` layout), memory-mapped, so a corpus larger than
//! memory trains without being read into it (the OS pages the windows in).
//!
//! `uint32` files are used in place (zero-copy). A `uint16` file is widened once, streaming, into
//! a `uint32` sidecar (`<file>.u32`, or under `cache_dir`) written atomically and reused while it
//! is newer than its source and of the matching size. Every id is checked against the tokenizer's
//! vocabulary at load (one sequential pass), and an out-of-range id is an error naming the file
//! and the token's index. The files must not change while a run uses them.
//!
//! ```toml
//! [data]
//! kind = "tokens"
//! dir = "data/shakespeare"              # train.bin and val.bin inside
//! dtype = "u16"                         # nanoGPT's default; "u32" for vocabularies > 65536
//! tokenizer = { kind = "hf", path = "models/SmolLM2-135M-Instruct.Q4_1.gguf" }
//! ```

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use serde::Deserialize;

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
    /// Where widened `uint16` files go. Default: beside each file, as `<file>.u32`.
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

/// The widened copy of a `uint16` file, made if missing or stale.
fn widened(src: &Path, cache_dir: Option<&Path>) -> Result<PathBuf> {
    let what = || format!("token file {}", src.display());
    let meta = std::fs::metadata(src).map_err(|e| Error::input_failed(what(), "cannot read", e))?;
    if meta.len() % 2 != 0 {
        return Err(Error::input(
            what(),
            format!("{} bytes is not a whole number of uint16 ids", meta.len()),
        ));
    }
    let name = format!(
        "{}.u32",
        src.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    );
    let out = match cache_dir {
        Some(d) => {
            std::fs::create_dir_all(d).map_err(|e| Error::io("creating the token cache directory", d, e))?;
            d.join(name)
        }
        None => src.with_file_name(name),
    };
    if let (Ok(m), Ok(src_time)) = (std::fs::metadata(&out), meta.modified()) {
        if m.len() == meta.len() * 2 && m.modified().is_ok_and(|t| t >= src_time) {
            return Ok(out);
        }
    }
    let tmp = out.with_file_name(format!(
        ".{}.tmp-{}",
        out.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        std::process::id()
    ));
    let input = File::open(src).map_err(|e| Error::input_failed(what(), "cannot open", e))?;
    let mut reader = BufReader::with_capacity(1 << 20, input);
    let file = File::create(&tmp).map_err(|e| Error::io("creating the widened token file", &tmp, e))?;
    let mut writer = BufWriter::with_capacity(1 << 20, file);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = reader
            .read(&mut buf)
            .map_err(|e| Error::io("reading token file", src, e))?;
        if n == 0 {
            break;
        }
        let mut chunk = &buf[..n];
        if n % 2 == 1 {
            // Keep ids whole across reads.
            let mut one = [0u8; 1];
            reader
                .read_exact(&mut one)
                .map_err(|e| Error::io("reading token file", src, e))?;
            buf[n] = one[0];
            chunk = &buf[..n + 1];
        }
        for pair in chunk.chunks_exact(2) {
            let id = u16::from_le_bytes([pair[0], pair[1]]) as u32;
            writer
                .write_all(&id.to_le_bytes())
                .map_err(|e| Error::io("writing the widened token file", &tmp, e))?;
        }
    }
    let file = writer
        .into_inner()
        .map_err(|e| Error::io("writing the widened token file", &tmp, e.into_error()))?;
    file.sync_all()
        .map_err(|e| Error::io("syncing the widened token file", &tmp, e))?;
    std::fs::rename(&tmp, &out).map_err(|e| Error::io("renaming the widened token file into place", &out, e))?;
    Ok(out)
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
        let sidecar = d.path().join("train.bin.u32");
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
}
