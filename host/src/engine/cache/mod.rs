//! The teacher logit cache from the command line: build one from a run config's teacher
//! (`retort cache CONFIG`), inspect it, re-encode it, export its arrays.

mod build;
mod export;
mod fidelity;
mod inspect;

use retort_core::{Error, Result, Teacher};
use retort_plugins::cache::ValueCoding;

use crate::assemble::{Pipeline, TeacherPlan};

pub use build::{build, CacheOptions};
pub use export::{export, recode, ExportOptions, RecodeOptions};
pub use fidelity::Fidelity;
pub use inspect::{bench_read, inspect, InspectOptions, Inspection, ReadSpeed};

/// How a cache stores values (`--values`, `--max-kl`, `--levels`, `--zstd-level`).
#[derive(Debug, Clone, clap::Args)]
pub struct CodingArgs {
    /// Value coding: sqrt (quantised sqrt-probabilities) or f32 (exact log-probs).
    #[arg(long, default_value = "sqrt")]
    pub values: String,
    /// With sqrt: the KL(exact || stored) per token, in nats, the quantisation levels are
    /// chosen for (levels = ceil(sqrt(k / (6 max_kl)))).
    #[arg(long, default_value_t = 4e-4)]
    pub max_kl: f64,
    /// With sqrt: use this many levels instead of those --max-kl picks.
    #[arg(long)]
    pub levels: Option<u32>,
    /// zstd level of the frames (1-22); 0 stores them uncompressed (larger, faster to read).
    #[arg(long, default_value_t = 9)]
    pub zstd_level: i32,
}

impl CodingArgs {
    /// The value coding these ask for at `k` (zstd level checked too).
    pub fn value_coding(&self, k: usize) -> Result<ValueCoding> {
        if !(0..=22).contains(&self.zstd_level) {
            return Err(Error::input(
                "--zstd-level",
                format!("expected 0 (no compression) ..= 22, got {}", self.zstd_level),
            ));
        }
        Ok(match (self.values.as_str(), self.levels) {
            ("f32", _) => ValueCoding::F32,
            ("sqrt", Some(levels)) if (1..=65535).contains(&levels) => ValueCoding::Sqrt { levels },
            ("sqrt", Some(levels)) => {
                return Err(Error::input("--levels", format!("expected 1..=65535, got {levels}")))
            }
            ("sqrt", None) if self.max_kl > 0.0 && self.max_kl.is_finite() => ValueCoding::sqrt_for(k, self.max_kl),
            ("sqrt", None) => {
                return Err(Error::input(
                    "--max-kl",
                    format!("expected a number > 0, got {}", self.max_kl),
                ))
            }
            (other, _) => return Err(Error::input("--values", format!("expected sqrt or f32, got `{other}`"))),
        })
    }
}

impl Default for CodingArgs {
    fn default() -> Self {
        CodingArgs {
            values: "sqrt".into(),
            max_kl: 4e-4,
            levels: None,
            zstd_level: 9,
        }
    }
}

/// The live teacher of `p` (a cache is built from, and compared with, a trained teacher).
pub(crate) fn live_teacher<'a>(p: &'a Pipeline) -> Result<&'a dyn Teacher> {
    match (&p.teacher_plan, &p.teacher) {
        (TeacherPlan::Load, Some(t)) if t.sparse_topk().is_none() => Ok(t.as_ref()),
        (TeacherPlan::Load, Some(_)) => Err(Error::config(
            "teacher.kind",
            "the config's teacher is itself a cache; give the config of the live teacher",
        )),
        _ => Err(Error::config(
            "teacher.checkpoint",
            "a cache is built from a trained teacher: give teacher.checkpoint (e.g. runs/<name>/teacher after `retort run`)",
        )),
    }
}
