//! The run directory: what a run writes where, claimed fresh (or replaced with `--force`), and
//! reopened, verified, to resume.
//!
//! ```text
//! runs/<name>/
//!   run.json               the mark: run id, checksum of the resolved config (written last)
//!   config.resolved.toml   the config as resolved (what --resume reads)
//!   metrics.jsonl          one event per line (artifacts::events)
//!   progress.json          the phases finished, with their statistics (artifacts::progress)
//!   checkpoints/<phase>/   resumable checkpoints (artifacts::checkpoint)
//!   teacher/ student/ baseline/   the models, Hugging Face layout
//!   report.json report.md plots/
//! ```
//!
//! The rule: retort writes only into a directory that is empty or absent, or that it marked
//! as its own (`run.json`). `--force` replaces a marked run whole: the old directory is
//! renamed aside in one step, then deleted. A directory holding anything else is never
//! written to, `--force` or not. One process at a time writes a run: it holds an exclusive
//! lock on `.lock` while it runs, and a second `run --resume` or `--force` of it is refused.

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use retort_core::config::RunConfig;
use retort_core::{fsutil, Error, Result};

use super::digest::{sha256_file, sha256_hex, sha256_prefix};
use super::run_inputs::RunInputs;

/// The file that marks a directory as a retort run.
pub const MARK: &str = "run.json";
const RESOLVED_CONFIG: &str = "config.resolved.toml";
const METRICS: &str = "metrics.jsonl";
const LOCK: &str = fsutil::LOCK_FILE;

/// What a run writes at its top level: a directory holding only these (and no mark) is an
/// unfinished run of an older retort, which `--force` may replace.
const RUN_ENTRIES: &[&str] = &[
    MARK,
    LOCK,
    RESOLVED_CONFIG,
    METRICS,
    "progress.json",
    "report.json",
    "report.md",
    "plots",
    "checkpoints",
    "teacher",
    "student",
    "baseline",
];

/// `run.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct RunMark {
    /// Random id of the run; every checkpoint and progress record carries it.
    run_id: String,
    /// SHA-256 of `config.resolved.toml` as written.
    config_sha256: String,
    /// Fingerprint of the data the run trains on (tokenizer and token streams).
    data_fingerprint: String,
    /// Fingerprints of the model files the run loads (absent in runs of retort <= 0.4.0 that
    /// did not record them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    model_files: Option<BTreeMap<String, String>>,
    /// The retort that started the run.
    retort_version: String,
}

/// Where a log file stood at a point of the run: its length and the digest of those bytes,
/// so that a resume can check the file still begins with them before cutting it back.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogMark {
    /// Length in bytes.
    pub len: u64,
    /// SHA-256 of the first `len` bytes.
    pub sha256: String,
}

/// A run directory.
#[derive(Debug, Clone)]
pub struct RunDir {
    path: PathBuf,
    run_id: String,
    /// The inputs recorded when the run started; whether model files were recorded.
    inputs: RunInputs,
    models_recorded: bool,
    /// Held (locked) as long as any clone of this lives.
    _lock: Arc<Option<File>>,
}

impl RunDir {
    /// Claims `path` for a new run of `config` (whose source is `source`) reading `inputs`:
    /// an absent or empty directory, or one holding a run when `force` (the
    /// old run is moved aside and deleted). Writes `config.resolved.toml`, then the mark with a
    /// fresh run id.
    pub fn create(path: &Path, force: bool, config: &RunConfig, source: &str, inputs: &RunInputs) -> Result<Self> {
        let lock = claim(path, force)?;
        let resolved =
            toml::to_string_pretty(config).map_err(|e| Error::failed("serialising the resolved config", e))?;
        let text = format!("# Resolved config of this run (source: {source}).\n{resolved}");
        fsutil::write_atomic(&path.join(RESOLVED_CONFIG), text.as_bytes())?;
        let mark = RunMark {
            run_id: format!("{:032x}", rand::random::<u128>()),
            config_sha256: sha256_hex(text.as_bytes()),
            data_fingerprint: inputs.data.clone(),
            model_files: Some(inputs.model_files.clone()),
            retort_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        let json = serde_json::to_vec_pretty(&mark).map_err(|e| Error::failed("serialising run.json", e))?;
        fsutil::write_atomic(&path.join(MARK), &json)?;
        Ok(RunDir {
            path: path.to_path_buf(),
            run_id: mark.run_id,
            inputs: inputs.clone(),
            models_recorded: true,
            _lock: Arc::new(lock),
        })
    }

    /// The run in `path`, to resume: its mark read and its resolved config verified against
    /// the mark's checksum.
    pub fn open(path: &Path) -> Result<Self> {
        let mark = read_mark(path)?;
        let lock = fsutil::lock_dir(path, || resume_error(path, in_use()))?;
        let config = path.join(RESOLVED_CONFIG);
        if !config.is_file() {
            return Err(resume_error(path, format!("{RESOLVED_CONFIG} is missing")));
        }
        let got = sha256_file(&config)?;
        if got != mark.config_sha256 {
            return Err(resume_error(
                path,
                format!(
                    "{RESOLVED_CONFIG} was changed after the run started (sha256 {got}, {MARK} says {}); \
                     a resumed run must use the config it started with",
                    mark.config_sha256
                ),
            ));
        }
        Ok(RunDir::of_mark(path, mark, lock))
    }

    /// The run in `path` for a process that only reads it (the ranks but 0 of a data-parallel
    /// run, which read what rank 0 resumes; `--resume` finding the run's config): its mark
    /// read, not locked, not verified, never written through.
    pub fn read(path: &Path) -> Result<Self> {
        Ok(RunDir::of_mark(path, read_mark(path)?, None))
    }

    fn of_mark(path: &Path, mark: RunMark, lock: Option<File>) -> Self {
        RunDir {
            path: path.to_path_buf(),
            run_id: mark.run_id,
            models_recorded: mark.model_files.is_some(),
            inputs: RunInputs {
                data: mark.data_fingerprint,
                model_files: mark.model_files.unwrap_or_default(),
            },
            _lock: Arc::new(lock),
        }
    }

    /// Refuses to resume on inputs other than the run started with (an edited corpus, another
    /// tokenizer, a changed teacher checkpoint).
    pub fn verify_inputs(&self, now: &RunInputs) -> Result<()> {
        match self.inputs.difference(now, self.models_recorded) {
            None => Ok(()),
            Some(message) => Err(resume_error(&self.path, message)),
        }
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The run's id (in `run.json`, every checkpoint and the progress record).
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// `config.resolved.toml` (verified when the directory was opened).
    pub fn resolved_config(&self) -> PathBuf {
        self.path.join(RESOLVED_CONFIG)
    }

    /// `metrics.jsonl`.
    pub fn metrics(&self) -> PathBuf {
        self.path.join(METRICS)
    }

    /// Where the checkpoints of `phase` go.
    pub fn checkpoints(&self, phase: &str) -> PathBuf {
        self.path.join("checkpoints").join(phase)
    }

    /// Where the trained model of `phase` is exported.
    pub fn model(&self, phase: &str) -> PathBuf {
        self.path.join(phase)
    }

    /// Where `metrics.jsonl` stands now (empty mark without one).
    pub fn mark_metrics(&self) -> Result<LogMark> {
        mark_log(&self.metrics())
    }

    /// Cuts `metrics.jsonl` back to `mark` after checking that it still begins with the bytes
    /// the mark saw; a log that was shortened or edited is refused, naming the file.
    pub fn restore_metrics(&self, mark: &LogMark) -> Result<()> {
        let p = self.metrics();
        if mark.len == 0 && !p.exists() {
            return Ok(());
        }
        let (digest, read) = if p.exists() {
            sha256_prefix(&p, mark.len)?
        } else {
            (String::new(), 0)
        };
        if read != mark.len || digest != mark.sha256 {
            return Err(Error::input(
                format!("resume: metrics file {}", p.display()),
                format!(
                    "does not begin with the {} bytes the checkpoint recorded (it was shortened or edited); \
                     restore it, or start the run again",
                    mark.len
                ),
            ));
        }
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .map_err(|e| Error::io("opening metrics to cut them back", &p, e))?;
        f.set_len(mark.len)
            .map_err(|e| Error::io("truncating metrics to the checkpoint", &p, e))?;
        f.sync_all().map_err(|e| Error::io("syncing metrics", &p, e))
    }
}

/// Where the log at `path` stands now.
pub fn mark_log(path: &Path) -> Result<LogMark> {
    if !path.exists() {
        return Ok(LogMark {
            len: 0,
            sha256: sha256_hex(b""),
        });
    }
    let (sha256, len) = sha256_prefix(path, u64::MAX)?;
    Ok(LogMark { len, sha256 })
}

fn read_mark(path: &Path) -> Result<RunMark> {
    let file = path.join(MARK);
    if !file.is_file() {
        let why = if path.join(RESOLVED_CONFIG).is_file() {
            format!("has no {MARK} (a run of a retort before 0.4, which cannot be resumed by this one)")
        } else {
            format!("is not a retort run directory (no {MARK})")
        };
        return Err(resume_error(path, why));
    }
    let text = std::fs::read_to_string(&file).map_err(|e| Error::io("reading the run mark", &file, e))?;
    serde_json::from_str(&text).map_err(|e| Error::input_failed(format!("run mark {}", file.display()), "corrupted", e))
}

fn resume_error(path: &Path, message: String) -> Error {
    Error::input(format!("--resume {}", path.display()), message)
}

fn out_error(path: &Path, message: String) -> Error {
    Error::input(format!("out dir {}", path.display()), message)
}

/// The message for a run directory another process is writing.
fn in_use() -> String {
    format!("another retort process is writing this run (it holds {LOCK}); wait for it to end or stop it")
}

/// Makes `path` an empty directory this run may write into, locked, or refuses.
fn claim(path: &Path, force: bool) -> Result<Option<File>> {
    let fresh = |path: &Path| {
        std::fs::create_dir_all(path).map_err(|e| Error::io("creating run directory", path, e))?;
        fsutil::lock_dir(path, || out_error(path, in_use()))
    };
    if !path.exists() {
        return fresh(path);
    }
    if !path.is_dir() {
        return Err(out_error(path, "exists and is not a directory".into()));
    }
    let entries = entry_names(path)?;
    if entries.is_empty() {
        return fresh(path);
    }
    let marked = entries.iter().any(|e| e == MARK);
    let foreign: Vec<&String> = entries.iter().filter(|e| !RUN_ENTRIES.contains(&e.as_str())).collect();
    if !marked && !foreign.is_empty() {
        return Err(out_error(
            path,
            format!(
                "is not empty and is not a retort run (it holds {}); retort writes only into an empty \
                 directory or one it marked as a run: choose another --out",
                listing(&foreign)
            ),
        ));
    }
    if !force {
        return Err(out_error(
            path,
            "holds another run; choose another --out, resume it with --resume, or pass --force to replace it \
             (everything in it is deleted)"
                .into(),
        ));
    }
    // The old run's lock, held while it is moved aside: a run still writing is not replaced.
    let _old = fsutil::lock_dir(path, || out_error(path, in_use()))?;
    replace(path)?;
    fresh(path)
}

/// Moves the old run aside in one rename, recreates the directory, then deletes the old run.
fn replace(path: &Path) -> Result<()> {
    let path = &path
        .canonicalize()
        .map_err(|e| Error::io("resolving the out dir", path, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let aside = path.with_file_name(format!(".{name}.replaced-{}", std::process::id()));
    std::fs::rename(path, &aside).map_err(|e| Error::io("moving the old run aside", &aside, e))?;
    std::fs::create_dir_all(path).map_err(|e| Error::io("creating run directory", path, e))?;
    tracing::info!("--force: replaced the run in {}", path.display());
    std::fs::remove_dir_all(&aside).map_err(|e| Error::io("deleting the replaced run", &aside, e))
}

fn entry_names(path: &Path) -> Result<Vec<String>> {
    let read = std::fs::read_dir(path).map_err(|e| Error::io("listing the out dir", path, e))?;
    let mut names = Vec::new();
    for entry in read {
        let entry = entry.map_err(|e| Error::io("listing the out dir", path, e))?;
        names.push(entry.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn listing(names: &[&String]) -> String {
    let shown: Vec<&str> = names.iter().take(5).map(|s| s.as_str()).collect();
    match names.len() {
        n if n > 5 => format!("{} and {} more", shown.join(", "), n - 5),
        _ => shown.join(", "),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> RunConfig {
        RunConfig::default()
    }

    fn data(fingerprint: &str) -> RunInputs {
        RunInputs {
            data: fingerprint.into(),
            ..RunInputs::default()
        }
    }

    fn create(path: &Path, force: bool) -> Result<RunDir> {
        RunDir::create(path, force, &config(), "test", &data("data-1"))
    }

    #[test]
    fn refuses_an_existing_run_without_force_and_replaces_it_whole_with_force() {
        let d = tempfile::tempdir().expect("tmp");
        let run = d.path().join("r");
        let first = create(&run, false).expect("fresh");
        std::fs::create_dir_all(run.join("checkpoints/student/step-00000010")).expect("mkdir");
        std::fs::write(run.join("report.json"), "{}").expect("w");
        let err = create(&run, false).expect_err("must fail");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("--force"), "{err}");
        assert_eq!(std::fs::read_to_string(run.join("report.json")).expect("r"), "{}");
        let busy = create(&run, true)
            .expect_err("the first run still holds it")
            .to_string();
        assert!(busy.contains("another retort process"), "{busy}");
        let busy = RunDir::open(&run).expect_err("held").to_string();
        assert!(busy.contains("another retort process"), "{busy}");
        assert!(run.join("report.json").exists(), "a refused --force deletes nothing");
        let first_id = first.run_id().to_string();
        drop(first);
        let second = create(&run, true).expect("forced");
        assert_ne!(first_id, second.run_id());
        assert!(!run.join("checkpoints").exists(), "the old run's checkpoints are gone");
        assert!(!run.join("report.json").exists());
        let names = entry_names(d.path()).expect("ls");
        assert_eq!(names, vec!["r".to_string()], "nothing left aside");
    }

    #[test]
    fn never_writes_into_a_directory_it_did_not_mark() {
        let d = tempfile::tempdir().expect("tmp");
        let out = d.path().join("models");
        std::fs::create_dir_all(out.join("teacher")).expect("mkdir");
        std::fs::write(out.join("teacher/model.safetensors"), b"weights").expect("w");
        std::fs::write(out.join("notes.txt"), b"mine").expect("w");
        for force in [false, true] {
            let err = create(&out, force).expect_err("refused");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("notes.txt"), "{err}");
        }
        assert_eq!(
            std::fs::read(out.join("teacher/model.safetensors")).expect("r"),
            b"weights"
        );
        assert!(!out.join(MARK).exists());
    }

    #[test]
    fn resume_verifies_the_mark_and_the_config() {
        let d = tempfile::tempdir().expect("tmp");
        let err = RunDir::open(d.path()).expect_err("no run");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("is not a retort run directory"), "{err}");
        let run = d.path().join("r");
        let made = create(&run, false).expect("fresh").run_id().to_string();
        let opened = RunDir::open(&run).expect("open");
        assert_eq!(opened.run_id(), made);
        opened.verify_inputs(&data("data-1")).expect("same data");
        let err = opened.verify_inputs(&data("data-2")).expect_err("other data");
        assert!(err.to_string().contains("the data changed"), "{err}");
        drop(opened);
        let cfg = run.join(RESOLVED_CONFIG);
        let text = std::fs::read_to_string(&cfg).expect("r");
        std::fs::write(&cfg, text.replace("seed = ", "seed = 9")).expect("w");
        let err = RunDir::open(&run).expect_err("edited config");
        assert!(err.to_string().contains("changed after the run started"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }

    #[test]
    fn metrics_are_cut_back_only_when_they_begin_with_the_marked_bytes() {
        let d = tempfile::tempdir().expect("tmp");
        let run = create(&d.path().join("r"), false).expect("fresh");
        std::fs::write(run.metrics(), b"{\"a\":1}\n").expect("w");
        let mark = run.mark_metrics().expect("mark");
        std::fs::write(run.metrics(), b"{\"a\":1}\n{\"b\":2}\n").expect("w");
        run.restore_metrics(&mark).expect("restore");
        assert_eq!(std::fs::read(run.metrics()).expect("r"), b"{\"a\":1}\n");
        std::fs::write(run.metrics(), b"{\"x\":1}\n{\"b\":2}\n").expect("w");
        let err = run.restore_metrics(&mark).expect_err("edited");
        assert!(err.to_string().contains("metrics.jsonl"), "{err}");
        std::fs::write(run.metrics(), b"{").expect("w");
        assert!(run.restore_metrics(&mark).is_err(), "shorter than the mark");
    }
}
