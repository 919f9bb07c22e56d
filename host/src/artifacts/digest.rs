//! Digests of files (SHA-256, and XXH3-128 where only change must be detected, fast), of file
//! prefixes, and the listing of the files a model checkpoint is made of.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use retort_core::{Error, Result};

/// Lower-case hex of `bytes`' SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex(Sha256::digest(bytes).as_slice())
}

/// SHA-256 of the whole file at `path`.
pub fn sha256_file(path: &Path) -> Result<String> {
    sha256_prefix(path, u64::MAX).map(|(digest, _)| digest)
}

/// SHA-256 of the first `len` bytes of `path` (all of it when shorter), and how many bytes
/// that was.
pub fn sha256_prefix(path: &Path, len: u64) -> Result<(String, u64)> {
    let file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut reader = file.take(len);
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    let mut read = 0u64;
    loop {
        let n = reader.read(&mut block).map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
        read += n as u64;
    }
    Ok((hex(hasher.finalize().as_slice()), read))
}

/// `xxh3:<hex>` of the XXH3-128 of the whole file at `path`.
pub fn xxh3_file(path: &Path) -> Result<String> {
    let mut file = File::open(path).map_err(|e| Error::io("reading", path, e))?;
    let mut hasher = xxhash_rust::xxh3::Xxh3::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut block).map_err(|e| Error::io("reading", path, e))?;
        if n == 0 {
            break;
        }
        hasher.update(&block[..n]);
    }
    Ok(format!("xxh3:{:032x}", hasher.digest128()))
}

/// The files of the checkpoint at `path`: the file itself, or the regular files of a directory
/// (its top level, as a Hugging Face model directory holds them) sorted by name.
pub fn checkpoint_files(path: &Path) -> Result<Vec<PathBuf>> {
    if !path.is_dir() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(|e| Error::io("listing", path, e))? {
        let file = entry.map_err(|e| Error::io("listing", path, e))?.path();
        if file.is_file() {
            files.push(file);
        }
    }
    files.sort();
    Ok(files)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_files_are_the_file_or_the_directory_files_sorted() {
        let d = tempfile::tempdir().expect("tmp");
        std::fs::write(d.path().join("b.safetensors"), b"b").expect("w");
        std::fs::write(d.path().join("a.json"), b"a").expect("w");
        std::fs::create_dir(d.path().join("sub")).expect("mkdir");
        let files = checkpoint_files(d.path()).expect("ls");
        assert_eq!(files, [d.path().join("a.json"), d.path().join("b.safetensors")]);
        assert_eq!(checkpoint_files(&files[0]).expect("file"), [files[0].clone()]);
        let (a, b) = (xxh3_file(&files[0]).expect("a"), xxh3_file(&files[1]).expect("b"));
        assert!(a.starts_with("xxh3:") && a.len() == 37 && a != b, "{a} {b}");
    }

    #[test]
    fn prefix_digest_equals_digest_of_the_prefix() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path().join("f");
        std::fs::write(&p, b"hello world").expect("w");
        assert_eq!(sha256_prefix(&p, 5).expect("p"), (sha256_hex(b"hello"), 5));
        assert_eq!(sha256_file(&p).expect("f"), sha256_hex(b"hello world"));
        assert_eq!(sha256_prefix(&p, 100).expect("p").1, 11);
        assert_eq!(
            sha256_hex(b""),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
