//! SHA-256 digests of files and of file prefixes (hex), read in blocks.

use std::fs::File;
use std::io::Read;
use std::path::Path;

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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
