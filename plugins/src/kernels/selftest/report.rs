//! What a selftest reports: one [`CaseReport`] per op, shape and dtype, serialisable (for
//! `--json`) and printed as a table with a one-line verdict.

use std::fmt;

use serde::Serialize;

use super::compare::ErrorStat;

/// Which case: op family, variant, dtype and shape.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseLabel {
    /// The op's folder in `kernels/`.
    pub op: &'static str,
    /// The variant, e.g. `Forward T=2`.
    pub variant: String,
    /// The dtype under test (`f32`, `bf16`, ...).
    pub dtype: String,
    /// The shape the inputs are made for.
    pub shape: Vec<usize>,
}

impl fmt::Display for CaseLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {} {}", self.op, self.variant, self.dtype, shape(&self.shape))
    }
}

/// How a case ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The fused op ran and agreed with the reference within the dtype's tolerance.
    Pass,
    /// The fused op disagreed, produced a non-finite value, or failed to run.
    Fail,
    /// The fused op does not run on this device and dtype (its `supports` says no): neither a
    /// pass nor a failure.
    CompositeOnly,
}

/// The error of one output or gradient.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measured {
    /// The output (`D`, `y`, `w'`, ...) or the gradient (`dstudent`, `dx`, ...).
    pub name: String,
    /// Its error against the reference.
    #[serde(flatten)]
    pub error: ErrorStat,
}

/// Wall time of one call of the fused forward and backward, and of the composite's, at the
/// dtype under test.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Timing {
    /// Median ms per call of the fused op's forward and backward.
    pub fused_ms: f64,
    /// The same of the composite; `None` where it was not timed (see the case's note).
    pub composite_ms: Option<f64>,
    /// The fused call's bandwidth: the bytes its kernels must read and write over its time.
    pub fused_gb_per_s: f64,
}

/// One case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseReport {
    /// Which case.
    #[serde(flatten)]
    pub label: CaseLabel,
    /// How it ended.
    pub status: Status,
    /// The normwise relative tolerance of its dtype.
    pub tolerance: Option<f64>,
    /// The error of each output.
    pub values: Vec<Measured>,
    /// The error of each gradient.
    pub grads: Vec<Measured>,
    /// Its timing, where it got that far.
    pub timing: Option<Timing>,
    /// Why it failed without a comparison, or why the composite was not timed.
    pub note: Option<String>,
}

impl CaseReport {
    /// A case that ended before a comparison, `status` with `note`.
    pub fn without_comparison(label: CaseLabel, status: Status, note: Option<String>) -> Self {
        Self {
            label,
            status,
            tolerance: None,
            values: vec![],
            grads: vec![],
            timing: None,
            note,
        }
    }
}

/// The counts of each status.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Cases that passed.
    pub passed: usize,
    /// Cases that failed.
    pub failed: usize,
    /// Cases whose fused op does not run here.
    pub composite_only: usize,
}

/// A whole selftest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SelftestReport {
    /// The device, e.g. `cpu`, `cuda:0`.
    pub device: String,
    /// The counts.
    pub summary: Summary,
    /// Every case, in the order they ran.
    pub cases: Vec<CaseReport>,
}

impl SelftestReport {
    /// The report of `cases` on `device`.
    pub fn new(device: String, cases: Vec<CaseReport>) -> Self {
        let count = |s: Status| cases.iter().filter(|c| c.status == s).count();
        let summary = Summary {
            passed: count(Status::Pass),
            failed: count(Status::Fail),
            composite_only: count(Status::CompositeOnly),
        };
        Self { device, summary, cases }
    }

    /// Whether no case failed.
    pub fn ok(&self) -> bool {
        self.summary.failed == 0
    }

    /// One line: PASS or FAIL and the counts.
    pub fn verdict(&self) -> String {
        let s = self.summary;
        let word = if !self.ok() {
            "FAIL"
        } else if s.passed == 0 {
            "PASS (no fused op runs on this device)"
        } else {
            "PASS"
        };
        format!(
            "selftest on {}: {word}: {} passed, {} failed, {} composite only",
            self.device, s.passed, s.failed, s.composite_only
        )
    }
}

/// `a x b x c`.
fn shape(dims: &[usize]) -> String {
    dims.iter().map(usize::to_string).collect::<Vec<_>>().join("x")
}

/// The largest `abs` and `rel` of `ms` (`-` when there are none).
fn worst(ms: &[Measured]) -> String {
    if ms.is_empty() {
        return "-".into();
    }
    let abs = ms.iter().map(|m| m.error.abs).fold(0.0, f64::max);
    let rel = ms.iter().map(|m| m.error.rel).fold(0.0, f64::max);
    let non_finite: usize = ms.iter().map(|m| m.error.non_finite).sum();
    let bad = if non_finite > 0 {
        format!(" +{non_finite} NaN/inf")
    } else {
        String::new()
    };
    format!("{abs:.1e} / {rel:.1e}{bad}")
}

/// A time in ms, `-` when absent.
fn ms(x: Option<f64>) -> String {
    x.map_or_else(|| "-".into(), |x| format!("{x:.3}"))
}

impl fmt::Display for SelftestReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "{:<15} {:<18} {:<5} {:<13} {:<14} {:<21} {:<21} {:>10} {:>10} {:>8}",
            "op",
            "case",
            "dtype",
            "shape",
            "status",
            "value abs / rel",
            "grad abs / rel",
            "fused ms",
            "comp. ms",
            "GB/s"
        )?;
        for c in &self.cases {
            let status = match c.status {
                Status::Pass => "pass",
                Status::Fail => "FAIL",
                Status::CompositeOnly => "composite only",
            };
            let t = c.timing.as_ref();
            writeln!(
                f,
                "{:<15} {:<18} {:<5} {:<13} {:<14} {:<21} {:<21} {:>10} {:>10} {:>8}",
                c.label.op,
                c.label.variant,
                c.label.dtype,
                shape(&c.label.shape),
                status,
                worst(&c.values),
                worst(&c.grads),
                ms(t.map(|t| t.fused_ms)),
                ms(t.and_then(|t| t.composite_ms)),
                t.map_or_else(|| "-".into(), |t| format!("{:.1}", t.fused_gb_per_s)),
            )?;
            if let Some(note) = &c.note {
                writeln!(f, "{:<15} ^ {note}", "")?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn case(status: Status, rel: f64) -> CaseReport {
        CaseReport {
            values: vec![Measured {
                name: "D".into(),
                error: ErrorStat::new(rel, 1.0, 0),
            }],
            ..CaseReport::without_comparison(
                CaseLabel {
                    op: "divergence",
                    variant: "Forward T=1".into(),
                    dtype: "f32".into(),
                    shape: vec![4, 10],
                },
                status,
                None,
            )
        }
    }

    #[test]
    fn the_verdict_fails_on_any_failure_and_composite_only_is_neither() {
        let r = SelftestReport::new(
            "cpu".into(),
            vec![case(Status::Pass, 1e-7), case(Status::CompositeOnly, 0.0)],
        );
        assert!(r.ok());
        assert_eq!(
            r.summary,
            Summary {
                passed: 1,
                failed: 0,
                composite_only: 1
            }
        );
        assert!(
            r.verdict().contains("PASS: 1 passed, 0 failed, 1 composite only"),
            "{}",
            r.verdict()
        );
        let only = SelftestReport::new("cuda:0".into(), vec![case(Status::CompositeOnly, 0.0)]);
        assert!(
            only.ok() && only.verdict().contains("no fused op runs"),
            "{}",
            only.verdict()
        );
        let bad = SelftestReport::new("cpu".into(), vec![case(Status::Pass, 0.0), case(Status::Fail, 0.1)]);
        assert!(!bad.ok() && bad.verdict().contains("FAIL"), "{}", bad.verdict());
    }

    #[test]
    fn the_table_has_a_row_per_case_and_the_json_names_the_fields() {
        let r = SelftestReport::new("cpu".into(), vec![case(Status::Pass, 2e-7), case(Status::Fail, 0.5)]);
        let table = r.to_string();
        assert_eq!(table.lines().count(), 3, "{table}");
        assert!(
            table.contains("divergence") && table.contains("4x10") && table.contains("FAIL"),
            "{table}"
        );
        assert!(table.contains("2.0e-7"), "{table}");
        let json = serde_json::to_value(&r).expect("json");
        assert_eq!(json["device"], "cpu");
        assert_eq!(json["summary"]["failed"], 1);
        let c = &json["cases"][0];
        assert_eq!(c["op"], "divergence");
        assert_eq!(c["status"], "pass");
        assert_eq!(c["values"][0]["name"], "D");
        assert_eq!(c["values"][0]["rel"], 2e-7);
        assert_eq!(json["cases"][1]["status"], "fail");
    }
}
