//! Checkpoints that a killed run resumes from exactly, generic over the state they carry.
//!
//! `<root>/step-<NNNNNNNN>/` (and `<root>/best/`) holds one safetensors file per named group of
//! tensors (the engine writes `model` and `optimizer`), `state.json` (whatever serialisable
//! state the caller hands over; storage does not know its type) and `manifest.json`: the
//! SHA-256 of every other file, `state.json` included. A checkpoint is built in a temporary
//! directory, fsynced and renamed into place, so it either exists whole or not at all; on load
//! every checksum is verified before anything is parsed. The newest `keep` step checkpoints of
//! a root are kept; `best/` is never pruned.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use retort_core::{fsutil, Error, Result};

use super::digest::sha256_file;

/// Named tensors, as one safetensors file holds them.
pub type Tensors = HashMap<String, Tensor>;

/// What to write: the caller's state and its groups of tensors by file stem.
pub struct Snapshot<'a, S> {
    /// Saved as `state.json`.
    pub state: &'a S,
    /// `(stem, tensors)`: each group saved as `<stem>.safetensors`.
    pub tensors: Vec<(&'static str, &'a Tensors)>,
}

/// A checkpoint read back and verified.
pub struct Checkpoint<S> {
    /// Its directory.
    pub dir: PathBuf,
    /// The caller's state.
    pub state: S,
    groups: BTreeMap<String, Tensors>,
}

impl<S> Checkpoint<S> {
    /// The tensors saved under `stem` (empty if the checkpoint has none).
    pub fn tensors(&self, stem: &str) -> &Tensors {
        static EMPTY: std::sync::OnceLock<Tensors> = std::sync::OnceLock::new();
        self.groups.get(stem).unwrap_or_else(|| EMPTY.get_or_init(HashMap::new))
    }

    /// Takes the tensors saved under `stem` out of the checkpoint (empty if it has none).
    pub fn take_tensors(&mut self, stem: &str) -> Tensors {
        self.groups.remove(stem).unwrap_or_default()
    }

    /// The tensor `name` of group `stem`; a missing one is an input error naming the checkpoint.
    pub fn tensor(&self, stem: &str, name: &str) -> Result<Tensor> {
        self.tensors(stem).get(name).cloned().ok_or_else(|| {
            Error::input(
                format!("checkpoint {}", self.dir.display()),
                format!("tensor `{name}` is missing"),
            )
        })
    }
}

/// `manifest.json`: the checksum of every file of a checkpoint.
#[derive(Debug, Serialize, Deserialize)]
struct Manifest {
    /// SHA-256 (hex) by file name.
    sha256: BTreeMap<String, String>,
}

const STATE: &str = "state.json";
const MANIFEST: &str = "manifest.json";
const BEST: &str = "best";
const STEP_PREFIX: &str = "step-";

/// Writes a checkpoint of `snapshot` at `step` under `root` atomically and keeps the newest
/// `keep` step checkpoints (`best/` is not counted and never pruned).
pub fn write_step<S: Serialize>(root: &Path, step: usize, snapshot: &Snapshot<S>, keep: usize) -> Result<PathBuf> {
    let dir = write_dir(root, &format!("{STEP_PREFIX}{step:08}"), snapshot)?;
    let mut all = list(root)?;
    while all.len() > keep.max(1) {
        let old = all.remove(0);
        fs::remove_dir_all(&old).map_err(|e| Error::io("pruning old checkpoint", &old, e))?;
    }
    Ok(dir)
}

/// Writes (or replaces) `root/best` atomically.
pub fn write_best<S: Serialize>(root: &Path, snapshot: &Snapshot<S>) -> Result<PathBuf> {
    write_dir(root, BEST, snapshot)
}

/// The `best/` checkpoint under `root`, verified, if there is one.
pub fn load_best<S: DeserializeOwned>(root: &Path, device: &Device) -> Result<Option<Checkpoint<S>>> {
    let dir = root.join(BEST);
    if !dir.is_dir() {
        return Ok(None);
    }
    load(&dir, device).map(Some)
}

/// Step checkpoint directories under `root`, oldest first.
pub fn list(root: &Path) -> Result<Vec<PathBuf>> {
    if !root.is_dir() {
        return Ok(Vec::new());
    }
    let mut v: Vec<PathBuf> = fs::read_dir(root)
        .map_err(|e| Error::io("listing checkpoints", root, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(STEP_PREFIX))
        })
        .collect();
    v.sort();
    Ok(v)
}

/// Tidies what a killed writer left under `root` (call only while holding the run's lock): a
/// checkpoint moved aside (`.<name>.old-<pid>`) whose replacement never took its place is put
/// back, one that was replaced is deleted, and half-written ones (`.<name>.tmp-<pid>`) are
/// deleted.
pub fn recover(root: &Path) -> Result<()> {
    if !root.is_dir() {
        return Ok(());
    }
    for entry in fs::read_dir(root).map_err(|e| Error::io("listing checkpoints", root, e))? {
        let path = entry.map_err(|e| Error::io("listing checkpoints", root, e))?.path();
        let Some(leftover) = path.file_name().and_then(|n| Leftover::parse(&n.to_string_lossy())) else {
            continue;
        };
        let target = root.join(leftover.name());
        if matches!(leftover, Leftover::MovedAside(_)) && !target.exists() {
            fs::rename(&path, &target).map_err(|e| Error::io("restoring a checkpoint moved aside", &target, e))?;
            tracing::warn!(
                "restored checkpoint {} (a killed run had moved it aside)",
                target.display()
            );
        } else {
            fs::remove_dir_all(&path).map_err(|e| Error::io("removing a killed run's leftover", &path, e))?;
        }
    }
    Ok(())
}

/// A directory a killed checkpoint write left behind, by the checkpoint's name.
enum Leftover {
    /// `.<name>.tmp-<pid>`: being written.
    HalfWritten(String),
    /// `.<name>.old-<pid>`: the previous `<name>`, moved aside to be replaced.
    MovedAside(String),
}

impl Leftover {
    fn parse(file_name: &str) -> Option<Self> {
        let rest = file_name.strip_prefix('.')?;
        let (stem, pid) = rest.rsplit_once('-')?;
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let (name, kind) = stem.rsplit_once('.')?;
        let valid = name == BEST
            || name
                .strip_prefix(STEP_PREFIX)
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()));
        match kind {
            "tmp" if valid => Some(Leftover::HalfWritten(name.to_string())),
            "old" if valid => Some(Leftover::MovedAside(name.to_string())),
            _ => None,
        }
    }

    fn name(&self) -> &str {
        match self {
            Leftover::HalfWritten(n) | Leftover::MovedAside(n) => n,
        }
    }
}

/// The newest valid step checkpoint under `root`. A corrupted newest one is an error, unless
/// `fall_back`, which skips to the previous good one (saying so).
pub fn latest<S: DeserializeOwned>(root: &Path, device: &Device, fall_back: bool) -> Result<Option<Checkpoint<S>>> {
    for dir in list(root)?.into_iter().rev() {
        match load(&dir, device) {
            Ok(c) => return Ok(Some(c)),
            Err(e) if fall_back => tracing::warn!("skipping a bad checkpoint: {e}"),
            Err(e) => {
                return Err(Error::input(
                    format!("resume from {}", dir.display()),
                    format!("{e}; pass --resume-from-last-good to fall back to the previous good checkpoint"),
                ))
            }
        }
    }
    Ok(None)
}

/// Reads and verifies one checkpoint; a missing, truncated or altered file is an input error
/// naming the file.
pub fn load<S: DeserializeOwned>(dir: &Path, device: &Device) -> Result<Checkpoint<S>> {
    let manifest = read_manifest(dir)?;
    for (file, want) in &manifest.sha256 {
        verify(&dir.join(file), want)?;
    }
    let state_path = dir.join(STATE);
    let text = fs::read_to_string(&state_path).map_err(|e| unreadable(&state_path, "unreadable", e))?;
    let state = serde_json::from_str(&text).map_err(|e| unreadable(&state_path, "corrupted", e))?;
    let mut groups = BTreeMap::new();
    for file in manifest.sha256.keys() {
        if let Some(stem) = file.strip_suffix(".safetensors") {
            groups.insert(
                stem.to_string(),
                candle_core::safetensors::load(dir.join(file), device)?,
            );
        }
    }
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        groups,
    })
}

fn bad(file: &Path, message: String) -> Error {
    Error::input(format!("checkpoint file {}", file.display()), message)
}

fn unreadable(file: &Path, what: &str, source: impl Into<retort_core::BoxError>) -> Error {
    Error::input_failed(format!("checkpoint file {}", file.display()), what, source)
}

fn read_manifest(dir: &Path) -> Result<Manifest> {
    let path = dir.join(MANIFEST);
    if !path.is_file() {
        return Err(bad(
            &path,
            "missing (an incomplete checkpoint, or one written by a retort before 0.2)".into(),
        ));
    }
    let text = fs::read_to_string(&path).map_err(|e| unreadable(&path, "unreadable", e))?;
    let manifest: Manifest = serde_json::from_str(&text).map_err(|e| unreadable(&path, "corrupted", e))?;
    if !manifest.sha256.contains_key(STATE) {
        return Err(bad(&path, format!("names no {STATE}")));
    }
    Ok(manifest)
}

fn verify(path: &Path, want: &str) -> Result<()> {
    if !path.is_file() {
        return Err(bad(path, "missing".into()));
    }
    let got = sha256_file(path)?;
    if got != want {
        return Err(bad(
            path,
            format!("checksum mismatch (truncated or corrupted): sha256 {got}, expected {want}"),
        ));
    }
    Ok(())
}

/// Writes every file of `snapshot` into a fresh temporary directory under `root`, then renames
/// it to `root/name` (moving an existing one aside first, so that a kill leaves the old or the
/// new one whole). A failed write (a full disk, a read-only directory) removes the temporary
/// directory and leaves the previous checkpoints as they were.
fn write_dir<S: Serialize>(root: &Path, name: &str, snapshot: &Snapshot<S>) -> Result<PathBuf> {
    fs::create_dir_all(root).map_err(|e| Error::io("creating checkpoint directory", root, e))?;
    let tmp = root.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        fs::remove_dir_all(&tmp).map_err(|e| Error::io("removing stale temp checkpoint", &tmp, e))?;
    }
    let final_dir = root.join(name);
    let written = fill(&tmp, snapshot).and_then(|()| replace_dir(root, &tmp, &final_dir, name));
    if written.is_err() && tmp.exists() {
        let _ = fs::remove_dir_all(&tmp);
    }
    written?;
    if let Ok(d) = fs::File::open(root) {
        let _ = d.sync_all();
    }
    Ok(final_dir)
}

/// The files of `snapshot` in the new directory `dir`: tensors, state, manifest, each synced.
fn fill<S: Serialize>(dir: &Path, snapshot: &Snapshot<S>) -> Result<()> {
    fs::create_dir_all(dir).map_err(|e| Error::io("creating temp checkpoint", dir, e))?;
    let mut manifest = Manifest {
        sha256: BTreeMap::new(),
    };
    for (stem, tensors) in &snapshot.tensors {
        let file = format!("{stem}.safetensors");
        let path = dir.join(&file);
        candle_core::safetensors::save(tensors, &path)
            .map_err(|e| Error::failed(format!("writing checkpoint file {}", path.display()), e))?;
        fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| Error::io("syncing checkpoint file", &path, e))?;
        manifest.sha256.insert(file, sha256_file(&path)?);
    }
    let state =
        serde_json::to_vec_pretty(snapshot.state).map_err(|e| Error::failed("serialising checkpoint state", e))?;
    fsutil::write_atomic(&dir.join(STATE), &state)?;
    manifest.sha256.insert(STATE.into(), sha256_file(&dir.join(STATE))?);
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| Error::failed("serialising checkpoint manifest", e))?;
    fsutil::write_atomic(&dir.join(MANIFEST), &json)
}

fn replace_dir(root: &Path, tmp: &Path, final_dir: &Path, name: &str) -> Result<()> {
    let rename =
        |from: &Path, to: &Path| fs::rename(from, to).map_err(|e| Error::io("renaming checkpoint into place", to, e));
    if !final_dir.exists() {
        return rename(tmp, final_dir);
    }
    let old = root.join(format!(".{name}.old-{}", std::process::id()));
    rename(final_dir, &old)?;
    if let Err(e) = rename(tmp, final_dir) {
        // Put the previous one back under its name before reporting.
        let _ = fs::rename(&old, final_dir);
        return Err(e);
    }
    fs::remove_dir_all(&old).map_err(|e| Error::io("removing replaced checkpoint", &old, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, Serialize, Deserialize, PartialEq)]
    struct State {
        step: usize,
        note: String,
    }

    fn tensors(v: f32) -> Tensors {
        HashMap::from([("w".to_string(), Tensor::new(&[v, 2.0], &Device::Cpu).expect("t"))])
    }

    fn write(root: &Path, step: usize, keep: usize) {
        let state = State { step, note: "x".into() };
        let (model, optimizer) = (tensors(step as f32), tensors(0.5));
        let snap = Snapshot {
            state: &state,
            tensors: vec![("model", &model), ("optimizer", &optimizer)],
        };
        write_step(root, step, &snap, keep).expect("write");
    }

    #[test]
    fn round_trip_keeps_the_newest_and_detects_corruption() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path().join("student");
        for step in [5, 10, 15] {
            write(&root, step, 2);
        }
        assert_eq!(list(&root).expect("list").len(), 2, "only the newest two are kept");
        let c: Checkpoint<State> = latest(&root, &Device::Cpu, false).expect("latest").expect("some");
        assert_eq!(c.state.step, 15);
        assert_eq!(c.tensors("model")["w"].to_vec1::<f32>().expect("v"), vec![15.0, 2.0]);
        // Truncate the newest model file: refused, naming the file; fall back on request.
        let f = c.dir.join("model.safetensors");
        let bytes = fs::read(&f).expect("read");
        fs::write(&f, &bytes[..bytes.len() / 2]).expect("truncate");
        let err = latest::<State>(&root, &Device::Cpu, false).err().expect("refused");
        assert!(
            err.to_string().contains("model.safetensors") && err.to_string().contains("checksum"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
        let c: Checkpoint<State> = latest(&root, &Device::Cpu, true).expect("fallback").expect("some");
        assert_eq!(c.state.step, 10);
        // No temp directories are left behind.
        let names: Vec<String> = fs::read_dir(&root)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| n.starts_with("step-")), "{names:?}");
    }

    #[test]
    fn an_altered_state_file_is_refused() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path().join("student");
        write(&root, 7, 2);
        let dir = list(&root).expect("list").remove(0);
        let state = dir.join(STATE);
        let text = fs::read_to_string(&state).expect("read");
        fs::write(&state, text.replace("\"step\": 7", "\"step\": 9")).expect("write");
        let err = load::<State>(&dir, &Device::Cpu).err().expect("refused");
        assert!(
            err.to_string().contains("state.json") && err.to_string().contains("checksum"),
            "{err}"
        );
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn recover_puts_back_what_a_kill_moved_aside_and_drops_half_written_ones() {
        let d = tempfile::tempdir().expect("tmp");
        let root = d.path().join("ck");
        write(&root, 10, 3);
        let state = State {
            step: 10,
            note: "best".into(),
        };
        let model = tensors(1.0);
        write_best(
            &root,
            &Snapshot {
                state: &state,
                tensors: vec![("model", &model)],
            },
        )
        .expect("best");
        // Killed between moving best/ aside and renaming its replacement in; and mid-write.
        fs::rename(root.join("best"), root.join(".best.old-77")).expect("aside");
        fs::create_dir_all(root.join(".best.tmp-77")).expect("half");
        fs::create_dir_all(root.join(".step-00000020.tmp-78")).expect("half");
        fs::write(root.join(".notes.tmp-1"), b"not ours").expect("w");
        recover(&root).expect("recover");
        let mut names: Vec<String> = fs::read_dir(&root)
            .expect("ls")
            .map(|e| e.expect("e").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, [".notes.tmp-1", "best", "step-00000010"]);
        let best: Checkpoint<State> = load_best(&root, &Device::Cpu).expect("load").expect("best");
        assert_eq!(best.state, state);
        // A replaced one, already superseded, is deleted.
        fs::create_dir_all(root.join(".step-00000010.old-5")).expect("old");
        recover(&root).expect("recover");
        assert!(!root.join(".step-00000010.old-5").exists());
    }
}
