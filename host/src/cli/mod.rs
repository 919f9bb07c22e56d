//! The command line: one file per subcommand, each an `Args` struct that owns its flags and a
//! `run` that parses, calls into the engine and prints. Nothing else happens here.
//!
//! Exit codes: 0 success; 2 bad config, input or usage (the message names the key path and
//! where the value came from); 1 runtime failure. User errors never print a panic or a
//! backtrace.

mod cache;
mod check;
mod common;
mod eval;
mod generate;
mod new_plugin;
mod plot;
mod plugins;
mod run;
mod selftest;

use std::ffi::OsString;

use clap::{Parser, Subcommand};

use retort_core::Result;

/// retort: knowledge distillation of language models on candle.
#[derive(Debug, Parser)]
#[command(name = "retort", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pretrain the teacher (if it has no checkpoint), distill the student, train a scratch
    /// baseline, evaluate all three and write the run directory.
    Run(run::RunArgs),
    /// Continue a prompt with a model: a GGUF file, a Hugging Face directory or a retort export
    /// (greedy at temperature 0).
    Generate(generate::GenerateArgs),
    /// Loss and perplexity of a model (GGUF file, Hugging Face directory or retort export) on a
    /// text file tokenized with the model's own tokenizer.
    Eval(eval::EvalArgs),
    /// Run the config's teacher once over every aligned window of its data and write a logit
    /// cache (top-k per token); train from it with `teacher = { kind = "cached", path = ... }`.
    /// A killed build resumes: rerun the same command. `retort cache inspect PATH` reports on a
    /// cache.
    #[command(args_conflicts_with_subcommands = true)]
    Cache(cache::CacheArgs),
    /// Validate a config and build every plugin it names; trains nothing.
    Check(check::CheckArgs),
    /// Scaffold a plugin crate (cdylib against this retort's retort-sdk) that builds and loads
    /// without edits.
    NewPlugin(new_plugin::NewPluginArgs),
    /// Draw a run's charts (loss per term, learning rate, weights and schedules, evaluation
    /// curves) from its metrics into RUN_DIR/plots/ and embed them in its report.md.
    Plot(plot::PlotArgs),
    /// List every registered plugin kind by category (built-ins, `RETORT_PLUGIN_PATH`, and the
    /// `[plugins]` of CONFIG if given).
    Plugins(plugins::PluginsArgs),
    /// Check every fused kernel against its composed reference (values and gradients) on a
    /// device, with timings; exit 1 on a mismatch.
    Selftest(selftest::SelftestArgs),
}

/// Entry point of the binary: parses `std::env::args_os()` and returns the exit code.
pub fn main() -> i32 {
    main_with(std::env::args_os())
}

/// Parses `args` (including the program name), runs, prints errors, returns the exit code.
pub fn main_with<I, T>(args: I) -> i32
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let cli = match Cli::try_parse_from(args) {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return e.exit_code();
        }
    };
    init_tracing();
    match dispatch(cli.command) {
        Ok(()) => 0,
        Err(e) => print_error(e, None),
    }
}

/// Prints `e` (a user error without stack frames; `rank` of a data-parallel run named) and
/// returns its exit code.
pub(crate) fn print_error(e: retort_core::Error, rank: Option<usize>) -> i32 {
    let e = printable(e);
    match rank {
        Some(r) => eprintln!("error: rank {r}: {e}"),
        None => eprintln!("error: {e}"),
    }
    e.exit_code()
}

/// A user error without the stack frames candle captures when `RUST_BACKTRACE` is set; a
/// runtime failure keeps them, for a bug report.
fn printable(e: retort_core::Error) -> retort_core::Error {
    if e.is_user_error() {
        e.without_backtrace()
    } else {
        e
    }
}

fn dispatch(command: Command) -> Result<()> {
    match command {
        Command::Run(a) => a.run(),
        Command::Generate(a) => a.run(),
        Command::Eval(a) => a.run(),
        Command::Cache(a) => a.run(),
        Command::Check(a) => a.run(),
        Command::NewPlugin(a) => a.run(),
        Command::Plot(a) => a.run(),
        Command::Plugins(a) => a.run(),
        Command::Selftest(a) => a.run(),
    }
}

/// Logs at `RETORT_LOG` (default `info`; `warn` on the ranks of a data-parallel run but 0,
/// whose logs would repeat rank 0's).
fn init_tracing() {
    let rank = crate::engine::parallel::launch::Launch::from_env().map_or(0, |l| l.rank());
    let default = if rank == 0 { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("RETORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}
