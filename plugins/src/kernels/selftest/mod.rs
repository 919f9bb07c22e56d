//! The selftest (`retort selftest`): every fused op against its composed reference, on one
//! device, on seeded random inputs at several shapes, dtypes, masks and temperatures.
//!
//! For each case: the op's fused entry (the dispatching one) runs in the dtype under test and
//! yields its outputs and, by candle's backward, the gradients of `L = sum_o sum(c_o * out_o)`
//! w.r.t. every differentiable input (`c_o`: per-row weights in `[0, 1]`, a quarter of the
//! rows zero, as a padding mask times router weights). The reference is the op's composite on
//! the same inputs cast to f64, on the same device. Each output and gradient is measured by
//! its largest absolute error and its normwise relative error `max|x - ref| / max|ref|`,
//! against a tolerance per dtype (f64 1e-10, f32 1e-5, bf16 1e-2, f16 2e-3); a non-finite
//! result where the reference is finite fails. Where the op's `supports` does not take the
//! device and dtype, the case is `composite only`: neither a pass nor a failure. Then the
//! fused forward and backward and the composite's are timed (median of a few calls after a
//! warm-up, the device synchronised around each), and the fused call's bandwidth is the bytes
//! its kernels must move over its time.
//!
//! A case that errors or panics is reported as failed with its message; the run goes on.
//!
//! - `cases.rs`: the case list (ops, variants, shapes, dtypes); `head.rs`: the fused LM-head
//!   loss's case;
//! - `inputs.rs`: seeded random inputs, made on the host;
//! - `eval.rs`: placing inputs, outputs and gradients, the reference by row chunks;
//! - `compare.rs`: the error measures and tolerances;
//! - `timing.rs`: the timed calls and the bandwidth;
//! - `report.rs`: the report, its table and verdict.

mod cases;
mod compare;
mod eval;
mod head;
mod inputs;
mod report;
mod rounding;
mod timing;

use std::panic::{catch_unwind, AssertUnwindSafe};

use candle_core::{DType, Device, DeviceLocation, Result};

pub use cases::op_names;
pub use compare::{tolerance, ErrorStat};
pub use report::{CaseLabel, CaseReport, Measured, SelftestReport, Status, Summary, Timing};

use cases::{Group, Input, Op, Role};
use eval::{against_reference, cotangents, evaluate, Placed};

/// Timed calls per measurement (after one warm-up call).
const REPEATS: usize = 3;

/// What to run.
#[derive(Debug, Clone, Default)]
pub struct SelftestOptions {
    /// Also the `N = 8192, V = 128256` logit cases on the CPU (they always run elsewhere).
    pub large: bool,
    /// Only the ops whose name contains this.
    pub filter: Option<String>,
}

impl SelftestOptions {
    /// Whether the op `name` is selected.
    pub fn matches(&self, name: &str) -> bool {
        self.filter.as_deref().is_none_or(|f| name.contains(f))
    }
}

/// Where a run is, for progress output.
#[derive(Debug, Clone, Copy)]
pub enum Progress<'a> {
    /// Case `index` (from 0) of `total` starts.
    Started {
        /// Its position.
        index: usize,
        /// The number of cases.
        total: usize,
        /// Which case.
        label: &'a CaseLabel,
    },
    /// Case `index` of `total` ended.
    Finished {
        /// Its position.
        index: usize,
        /// The number of cases.
        total: usize,
        /// How it ended.
        report: &'a CaseReport,
    },
}

/// Every case selected by `opts` on `device`.
pub fn run(device: &Device, opts: &SelftestOptions) -> Result<SelftestReport> {
    run_with(device, opts, |_| {})
}

/// [`run`], telling `progress` where it is.
pub fn run_with(
    device: &Device,
    opts: &SelftestOptions,
    mut progress: impl FnMut(Progress<'_>),
) -> Result<SelftestReport> {
    let groups = cases::plan(device, opts);
    let total = groups.iter().map(|g| g.dtypes.len()).sum();
    let mut reports = Vec::with_capacity(total);
    for group in &groups {
        let inputs = guarded(|| (group.op.inputs)(&group.dims));
        for &dtype in &group.dtypes {
            let label = CaseLabel {
                op: group.op.name,
                variant: group.op.variant.clone(),
                dtype: dtype_name(dtype),
                shape: group.dims.clone(),
            };
            let index = reports.len();
            progress(Progress::Started {
                index,
                total,
                label: &label,
            });
            let report = match &inputs {
                Ok(inputs) => run_case(device, group, inputs, dtype, label),
                Err(e) => CaseReport::without_comparison(label, Status::Fail, Some(format!("inputs: {e}"))),
            };
            progress(Progress::Finished {
                index,
                total,
                report: &report,
            });
            reports.push(report);
        }
    }
    Ok(SelftestReport::new(device_name(device), reports))
}

/// `cpu`, `cuda:N`, `metal:N`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `f32`, `bf16`, ...
fn dtype_name(dtype: DType) -> String {
    dtype.as_str().to_string()
}

/// `f()`, a panic turned into an error.
fn guarded<T>(f: impl FnOnce() -> Result<T>) -> Result<T> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|panic| {
        let msg = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic".into());
        Err(candle_core::Error::Msg(format!("panicked: {msg}")))
    })
}

/// One case, whatever happens in it.
fn run_case(device: &Device, group: &Group, inputs: &[Input], dtype: DType, label: CaseLabel) -> CaseReport {
    match guarded(|| check(device, group, inputs, dtype)) {
        Ok(Some(checked)) => checked.into_report(label, &group.op, inputs, dtype),
        Ok(None) => CaseReport::without_comparison(label, Status::CompositeOnly, None),
        Err(e) => CaseReport::without_comparison(label, Status::Fail, Some(e.to_string())),
    }
}

/// What a case measured.
struct Checked {
    values: Vec<ErrorStat>,
    grads: Vec<ErrorStat>,
    timing: Timing,
    note: Option<String>,
}

/// The fused op against the reference, then timed; `None` where the fused op does not take
/// these inputs.
fn check(device: &Device, group: &Group, inputs: &[Input], dtype: DType) -> Result<Option<Checked>> {
    let op = &group.op;
    let x = Placed::new(inputs, device, dtype)?;
    if !(op.supports)(&x.tensors) {
        return Ok(None);
    }
    let cot = cotangents(&(op.fused)(&x.tensors)?, op.per_token, dtype)?;
    let fused = evaluate(&op.fused, &x, &cot)?;
    let (values, grads) = against_reference(op, &x, &cot, &fused)?;
    drop(fused);
    let fused_ms = timing::median_ms(device, REPEATS, || evaluate(&op.fused, &x, &cot).map(drop))?;
    // On the CPU the large cases' composite would hold tens of full-size temporaries in host
    // memory; elsewhere running out of memory is an error like any other.
    let (composite_ms, note) = if group.large && device.is_cpu() {
        (None, Some("composite not timed at this size on the CPU".to_string()))
    } else {
        match timing::median_ms(device, REPEATS, || evaluate(&op.composite, &x, &cot).map(drop)) {
            Ok(ms) => (Some(ms), None),
            Err(e) => (None, Some(format!("composite not timed: {e}"))),
        }
    };
    let first = x.tensors.first().map_or(0, |t| t.elem_count());
    let bytes = op.traffic * first as f64 * dtype.size_in_bytes() as f64;
    let timing = Timing {
        fused_ms,
        composite_ms,
        fused_gb_per_s: timing::gb_per_s(bytes, fused_ms),
    };
    Ok(Some(Checked {
        values,
        grads,
        timing,
        note,
    }))
}

impl Checked {
    /// The case's report: a pass where every output and gradient is within the dtype's
    /// tolerance.
    fn into_report(self, label: CaseLabel, op: &Op, inputs: &[Input], dtype: DType) -> CaseReport {
        let tol = tolerance(dtype);
        let named = |names: Vec<String>, stats: Vec<ErrorStat>| -> Vec<Measured> {
            names
                .into_iter()
                .zip(stats)
                .map(|(name, error)| Measured { name, error })
                .collect()
        };
        let value_names = op.outputs.iter().map(|s| s.to_string()).collect();
        let grad_names = inputs
            .iter()
            .filter(|i| i.role == Role::Grad)
            .map(|i| format!("d{}", i.name))
            .collect();
        let values = named(value_names, self.values);
        let grads = named(grad_names, self.grads);
        let pass = tol.is_some_and(|t| values.iter().chain(&grads).all(|m| m.error.within(t)));
        CaseReport {
            label,
            status: if pass { Status::Pass } else { Status::Fail },
            tolerance: tol,
            values,
            grads,
            timing: Some(self.timing),
            note: self.note,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Tensor;
    use std::rc::Rc;

    use cases::{InputsFn, OpFn};

    /// `x^2` of `x` `[8, 5]`, with `fused` as its fused entry.
    fn square(fused: OpFn, supports: fn(&[Tensor]) -> bool) -> Vec<CaseReport> {
        let inputs: InputsFn = Box::new(|d| {
            Ok(vec![Input {
                name: "x",
                role: Role::Grad,
                host: inputs::normal(d, 0.0, 1.0, 1)?,
            }])
        });
        let composite: OpFn = Rc::new(|x: &[Tensor]| Ok(vec![x[0].sqr()?]));
        let group = Group {
            op: Rc::new(cases::op("square", "test".into(), inputs, supports, fused, composite)),
            dims: vec![8, 5],
            dtypes: vec![DType::F32, DType::F64],
            large: false,
        };
        let inputs = (group.op.inputs)(&group.dims).expect("inputs");
        group
            .dtypes
            .iter()
            .map(|&d| {
                let label = CaseLabel {
                    op: "square",
                    variant: "test".into(),
                    dtype: dtype_name(d),
                    shape: group.dims.clone(),
                };
                run_case(&Device::Cpu, &group, &inputs, d, label)
            })
            .collect()
    }

    fn statuses(reports: &[CaseReport]) -> Vec<Status> {
        reports.iter().map(|r| r.status).collect()
    }

    fn yes(_: &[Tensor]) -> bool {
        true
    }

    #[test]
    fn the_exact_op_passes_with_errors_and_timings() {
        let r = square(Rc::new(|x: &[Tensor]| Ok(vec![(&x[0] * &x[0])?])), yes);
        assert_eq!(statuses(&r), [Status::Pass, Status::Pass]);
        assert_eq!(r[0].values[0].name, "y");
        assert_eq!(r[0].grads[0].name, "dx");
        assert!(
            r[0].values[0].error.abs > 0.0,
            "f32 against f64 has rounding: {:?}",
            r[0].values
        );
        assert!(r[0]
            .timing
            .as_ref()
            .is_some_and(|t| t.fused_ms > 0.0 && t.composite_ms.is_some()));
    }

    #[test]
    fn a_perturbed_value_fails() {
        let r = square(Rc::new(|x: &[Tensor]| Ok(vec![(x[0].sqr()? * (1.0 + 1e-4))?])), yes);
        assert_eq!(statuses(&r), [Status::Fail, Status::Fail]);
        assert!(r[0].values[0].error.rel > 1e-5 && r[0].note.is_none(), "{:?}", r[0]);
    }

    #[test]
    fn a_perturbed_gradient_fails_with_exact_values() {
        // y = x^2 + 1e-3 (x - x): the same values, the gradient off by 1e-3.
        let r = square(
            Rc::new(|x: &[Tensor]| Ok(vec![(x[0].sqr()? + ((&x[0] - x[0].detach())? * 1e-3)?)?])),
            yes,
        );
        assert_eq!(statuses(&r), [Status::Fail, Status::Fail]);
        assert!(r[1].values[0].error.within(1e-10), "{:?}", r[1].values);
        assert!(!r[1].grads[0].error.within(1e-5), "{:?}", r[1].grads);
    }

    #[test]
    fn a_nan_fails() {
        let r = square(Rc::new(|x: &[Tensor]| Ok(vec![(x[0].sqr()? + f64::NAN)?])), yes);
        assert_eq!(statuses(&r), [Status::Fail, Status::Fail]);
        assert_eq!(r[0].values[0].error.non_finite, 40);
    }

    #[test]
    fn an_unsupported_op_is_composite_only() {
        let r = square(Rc::new(|x: &[Tensor]| Ok(vec![x[0].sqr()?])), |_| false);
        assert_eq!(statuses(&r), [Status::CompositeOnly, Status::CompositeOnly]);
        assert!(r[0].values.is_empty() && r[0].timing.is_none());
        let report = SelftestReport::new("cpu".into(), r);
        assert!(report.ok() && report.summary.passed == 0);
    }

    #[test]
    fn an_op_that_errors_or_panics_fails_with_its_message() {
        let r = square(Rc::new(|_: &[Tensor]| candle_core::bail!("no kernel")), yes);
        assert_eq!(statuses(&r), [Status::Fail, Status::Fail]);
        assert!(
            r[0].note.as_deref().is_some_and(|n| n.contains("no kernel")),
            "{:?}",
            r[0].note
        );
        let r = square(Rc::new(|_: &[Tensor]| panic!("index out of bounds")), yes);
        assert_eq!(statuses(&r), [Status::Fail, Status::Fail]);
        assert!(r[0]
            .note
            .as_deref()
            .is_some_and(|n| n.contains("panicked: index out of bounds")));
    }

    #[test]
    fn a_panic_is_an_error() {
        let r: Result<()> = guarded(|| panic!("boom"));
        assert!(r.is_err_and(|e| e.to_string().contains("panicked: boom")));
        assert_eq!(guarded(|| Ok(3)).ok(), Some(3));
    }

    #[test]
    fn the_cpu_names() {
        assert_eq!(device_name(&Device::Cpu), "cpu");
        assert_eq!(dtype_name(DType::BF16), "bf16");
    }
}
