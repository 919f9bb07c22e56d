//! `retort selftest [--device cpu|cuda[:N]] [--json] [--large] [--filter OP]`: every fused op
//! against its composed reference on one device; exit 1 on a mismatch.

use clap::Args;

use retort_core::{Error, Result};
use retort_plugins::kernels::selftest::{self, op_names, Progress, SelftestOptions, Status};

use crate::assemble::device::parse_device;
use crate::engine::pool::on_pool;

/// Arguments of `retort selftest`.
#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// The device: `cpu`, `cuda`, `cuda:N` (a build with `--features cuda`) or `metal`.
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Print the report as JSON on stdout (progress and the verdict go to stderr).
    #[arg(long)]
    json: bool,
    /// Also the N=8192, V=128256 logit cases on the CPU (they always run on a GPU): minutes,
    /// and tens of GB of memory.
    #[arg(long)]
    large: bool,
    /// Only the ops whose name contains this (`divergence`, `adamw`, ...).
    #[arg(long, value_name = "OP")]
    filter: Option<String>,
}

impl SelftestArgs {
    /// Runs the cases (progress on stderr), prints the table (or the JSON) and the verdict;
    /// an error (exit 1) if any case failed.
    pub fn run(self) -> Result<()> {
        let device = parse_device(&self.device).map_err(|e| match e {
            Error::Config { message, .. } => Error::config("--device", message),
            e => e,
        })?;
        if let Some(f) = self
            .filter
            .as_deref()
            .filter(|f| !op_names().iter().any(|n| n.contains(f)))
        {
            return Err(Error::config(
                "--filter",
                format!("no op matches \"{f}\"; the ops: {}", op_names().join(", ")),
            ));
        }
        let opts = SelftestOptions {
            large: self.large,
            filter: self.filter,
        };
        let report = on_pool(|| selftest::run_with(&device, &opts, print_progress))?;
        if self.json {
            let json = serde_json::to_string_pretty(&report).map_err(|e| Error::failed("writing the report", e))?;
            println!("{json}");
            eprintln!("{}", report.verdict());
        } else {
            print!("{report}");
            println!("{}", report.verdict());
        }
        if !report.ok() {
            return Err(Error::Runtime(format!(
                "selftest: {} of {} cases failed",
                report.summary.failed,
                report.cases.len()
            )));
        }
        Ok(())
    }
}

/// One line on stderr as each case starts, and the failures as they end.
fn print_progress(p: Progress<'_>) {
    match p {
        Progress::Started { index, total, label } => eprintln!("[{}/{total}] {label}", index + 1),
        Progress::Finished { report, .. } if report.status == Status::Fail => {
            eprintln!("  FAIL {}", report.note.as_deref().unwrap_or("outside the tolerance"));
        }
        Progress::Finished { .. } => {}
    }
}
