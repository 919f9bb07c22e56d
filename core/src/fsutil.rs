//! Atomic file writes (a crash never leaves a half-written file under the final name), and the
//! lock that keeps a second process out of a directory being written.

use std::fs::{self, File, TryLockError};
use std::io::Write;
use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A sibling temp path of `path` (same directory, so the rename is atomic).
pub fn temp_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".into());
    path.with_file_name(format!(".{name}.tmp-{}", std::process::id()))
}

/// Moves a finished temp file into place: fsync the file, rename, fsync the directory.
pub fn commit_temp(temp: &Path, path: &Path) -> Result<()> {
    File::open(temp)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io("syncing file", temp, e))?;
    fs::rename(temp, path).map_err(|e| Error::io("renaming into place", path, e))?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        // Directory fsync makes the rename durable; not every platform supports it.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

/// Writes `bytes` to `path` atomically (temp file + fsync + rename).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let temp = temp_path(path);
    let written = File::create(&temp)
        .map_err(|e| Error::io("creating file", &temp, e))
        .and_then(|mut f| f.write_all(bytes).map_err(|e| Error::io("writing file", path, e)))
        .and_then(|()| commit_temp(&temp, path));
    if written.is_err() {
        // A full disk leaves no half-written temp file behind; the old `path` is untouched.
        let _ = fs::remove_file(&temp);
    }
    written
}

/// The lock file of a directory a process writes (a run directory, a logit cache).
pub const LOCK_FILE: &str = ".lock";

/// An exclusive lock on `dir/.lock`, held until the returned file is dropped (or the process
/// ends, killed or not); `busy()` if another process holds it. `None`, with a warning, where
/// the file system cannot lock.
pub fn lock_dir(dir: &Path, busy: impl FnOnce() -> Error) -> Result<Option<File>> {
    let path = dir.join(LOCK_FILE);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| Error::io("opening the lock file", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(TryLockError::WouldBlock) => Err(busy()),
        Err(TryLockError::Error(e)) => {
            tracing::warn!(
                "cannot lock {} ({e}): nothing keeps a second process out",
                path.display()
            );
            Ok(None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file_and_leaves_no_temp() {
        let dir = std::env::temp_dir().join(format!("retort-fsutil-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("mkdir");
        let p = dir.join("a.json");
        write_atomic(&p, b"first").expect("write 1");
        write_atomic(&p, b"second").expect("write 2");
        assert_eq!(fs::read(&p).expect("read"), b"second");
        let names: Vec<_> = fs::read_dir(&dir)
            .expect("ls")
            .map(|e| e.expect("entry").file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
        fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn a_locked_directory_is_busy_until_its_lock_is_dropped() {
        let d = std::env::temp_dir().join(format!("retort-lock-{}", std::process::id()));
        fs::create_dir_all(&d).expect("mkdir");
        let busy = || Error::input("dir", "busy");
        let held = lock_dir(&d, busy).expect("first");
        let err = lock_dir(&d, busy).expect_err("held");
        assert_eq!(err.exit_code(), 2);
        drop(held);
        lock_dir(&d, busy).expect("released");
        fs::remove_dir_all(&d).expect("rm");
    }
}
