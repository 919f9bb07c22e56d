//! Observer `jsonl`: appends every metrics record as one JSON line to `<run dir>/metrics.jsonl`,
//! flushed per record so a killed run keeps everything it logged.
//!
//! ```toml
//! observers = [{ kind = "jsonl", file = "metrics.jsonl" }]
//! ```

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Error, Observer, Params, Result};

#[derive(Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
struct JsonlParams {
    /// File name inside the run directory. Default `metrics.jsonl`.
    #[serde(default = "default_file")]
    file: String,
}

fn default_file() -> String {
    "metrics.jsonl".into()
}

/// Writes JSON lines.
pub struct JsonlObserver {
    path: PathBuf,
    out: BufWriter<File>,
}

impl Observer for JsonlObserver {
    fn record(&mut self, record: &serde_json::Value) -> Result<()> {
        let line = serde_json::to_string(record).map_err(|e| Error::failed("serialising a metrics record", e))?;
        writeln!(self.out, "{line}")
            .and_then(|_| self.out.flush())
            .map_err(|e| Error::io("writing metrics", &self.path, e))
    }
    fn finish(&mut self) -> Result<()> {
        self.out
            .flush()
            .map_err(|e| Error::io("writing metrics", &self.path, e))
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn Observer>> {
    let p: JsonlParams = params.parse()?;
    let dir = ctx
        .run_dir
        .as_ref()
        .ok_or_else(|| params.error("kind", "jsonl needs a run directory"))?;
    if !is_plain_file_name(&p.file) {
        return Err(params.error(
            "file",
            format!(
                "expected a file name inside the run directory (no `/`, `..` or absolute path), got `{}`",
                p.file
            ),
        ));
    }
    let path = dir.join(&p.file);
    let f = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&path)
        .map_err(|e| Error::io("opening metrics file", &path, e))?;
    Ok(Box::new(JsonlObserver {
        path,
        out: BufWriter::new(f),
    }))
}

/// One normal path component: the observer writes inside the run directory only.
fn is_plain_file_name(name: &str) -> bool {
    let mut parts = std::path::Path::new(name).components();
    matches!(
        (parts.next(), parts.next()),
        (Some(std::path::Component::Normal(_)), None)
    )
}

inventory::submit! {
    Factory::<dyn Observer> { kind: "jsonl", description: "one JSON object per record in <run dir>/metrics.jsonl", build, params: retort_core::registry::params_schema::<JsonlParams> }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_only_inside_the_run_directory() {
        assert!(is_plain_file_name("metrics.jsonl"));
        for bad in ["../metrics.jsonl", "/tmp/m.jsonl", "sub/m.jsonl", "..", ""] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
