//! The command line: `retort run`, `retort check`, `retort plugins`.
//!
//! Exit codes: 0 success; 2 bad config, input or usage (the message names the key path and
//! where the value came from); 1 runtime failure. User errors never print a panic.

use std::ffi::OsString;
use std::io::IsTerminal;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

use retort_core::{Registry, Result};

use crate::assemble::config::{self, ConfigOrigin};
use crate::assemble::{Pipeline, TeacherPlan};
use crate::engine::run::{run, RunOptions};

/// retort: knowledge distillation of language models on candle.
#[derive(Debug, Parser)]
#[command(name = "retort", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// `retort cache` subcommands.
#[derive(Debug, Subcommand)]
pub enum CacheAction {
    /// Tokens, shards, bytes per token, compression against dense storage and the seed design;
    /// with --config (the live teacher's run config) also the fidelity on a sample.
    Inspect {
        /// Cache directory.
        path: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
        /// Config of the teacher the cache was built from (for the fidelity sample).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Override a key of that config.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Validation windows in the fidelity sample.
        #[arg(long, default_value_t = 8)]
        sample_windows: usize,
        /// Also time reading every window (single thread, shuffled, median of 5 passes).
        #[arg(long)]
        bench_read: bool,
    },
    /// Re-encode a cache with a smaller k or another value coding, without the teacher (exact
    /// from an f32 cache).
    Recode {
        /// Source cache directory.
        src: PathBuf,
        /// Destination directory.
        #[arg(long)]
        out: PathBuf,
        /// Entries kept per token (at most the source's; default: the source's).
        #[arg(long)]
        k: Option<usize>,
        /// How values are stored.
        #[command(flatten)]
        coding: crate::engine::cache::CodingArgs,
        /// Replace what is at --out.
        #[arg(long)]
        force: bool,
    },
    /// Write the top-k of the first windows of a split as raw arrays (ids.u32, logprobs.f32,
    /// meta.json) for tools outside retort.
    Export {
        /// Cache directory.
        path: PathBuf,
        /// Output directory.
        #[arg(long)]
        out: PathBuf,
        /// train or val.
        #[arg(long, default_value = "val")]
        split: String,
        /// Windows to export at most.
        #[arg(long, default_value_t = 1_000_000)]
        windows: usize,
    },
}

/// Subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pretrain the teacher (if it has no checkpoint), distill the student, train a scratch
    /// baseline, evaluate all three and write the run directory.
    Run {
        /// Config file (TOML, YAML or JSON). Without one: the built-in quickstart.
        config: Option<PathBuf>,
        /// Override a key: `--set train.steps=100`, `--set loss[0].temperature=3`.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Run directory (default `runs/<run.name>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Replace a run directory that holds another run.
        #[arg(long)]
        force: bool,
        /// No progress bars.
        #[arg(long)]
        quiet: bool,
        /// Continue the run in RUN_DIR from its last checkpoint (its own resolved config).
        #[arg(long, value_name = "RUN_DIR", conflicts_with_all = ["config", "sets", "out", "force"])]
        resume: Option<PathBuf>,
        /// With --resume: if the newest checkpoint is corrupted, use the previous good one.
        #[arg(long, requires = "resume")]
        resume_from_last_good: bool,
    },
    /// Continue a prompt with a model: a GGUF file, a Hugging Face directory or a retort export
    /// (greedy at temperature 0).
    Generate {
        /// GGUF file or model directory (with its tokenizer: GGUF metadata or tokenizer.json).
        #[arg(long)]
        model: PathBuf,
        /// Prompt text.
        #[arg(long)]
        prompt: String,
        /// Tokens to generate at most.
        #[arg(long, default_value_t = 32)]
        max_tokens: usize,
        /// Softmax temperature; 0 = greedy.
        #[arg(long, default_value_t = 0.0)]
        temperature: f64,
        /// Nucleus sampling: keep the most likely tokens summing to P.
        #[arg(long, default_value_t = 1.0)]
        top_p: f64,
        /// Seed of the sampling stream.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Device: cpu, cuda, cuda:N, metal.
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Longest window fed to the model (default: its context, at most 2048 for llama models).
        #[arg(long)]
        context: Option<usize>,
    },
    /// Loss and perplexity of a model (GGUF file, Hugging Face directory or retort export) on a
    /// text file tokenized with the model's own tokenizer.
    Eval {
        /// GGUF file or model directory.
        #[arg(long)]
        model: PathBuf,
        /// UTF-8 text file.
        #[arg(long)]
        data: PathBuf,
        /// Evaluate the last fraction of the tokens (a run's validation split is 0.1); 1 = all.
        #[arg(long, default_value_t = 0.1)]
        val_fraction: f64,
        /// Tokens per window.
        #[arg(long, default_value_t = 64)]
        seq_len: usize,
        /// Windows per batch.
        #[arg(long, default_value_t = 4)]
        batch_size: usize,
        /// Batches at most.
        #[arg(long, default_value_t = 8)]
        batches: usize,
        /// Device.
        #[arg(long, default_value = "cpu")]
        device: String,
    },
    /// Run the config's teacher once over every aligned window of its data and write a logit
    /// cache (top-k per token); train from it with `teacher = { kind = "cached", path = ... }`.
    /// A killed build resumes: rerun the same command. `retort cache inspect PATH` reports on a
    /// cache.
    #[command(args_conflicts_with_subcommands = true)]
    Cache {
        /// `inspect`.
        #[command(subcommand)]
        action: Option<CacheAction>,
        /// Config file of the run whose teacher (with a checkpoint) and data are cached.
        config: Option<PathBuf>,
        /// Override a key of the config.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
        /// Cache directory (default `runs/cache/<run.name>`).
        #[arg(long)]
        out: Option<PathBuf>,
        /// Teacher entries kept per token.
        #[arg(long, default_value_t = 64)]
        k: usize,
        /// How values are stored.
        #[command(flatten)]
        coding: crate::engine::cache::CodingArgs,
        /// Tokens per shard (rounded down to whole windows).
        #[arg(long, default_value_t = 131072)]
        shard_tokens: usize,
        /// Windows per teacher forward pass (default: train.batch_size).
        #[arg(long)]
        batch: Option<usize>,
        /// Record this id as the teacher's identity instead of hashing its checkpoint.
        #[arg(long)]
        teacher_id: Option<String>,
        /// Replace a cache with other settings at --out.
        #[arg(long)]
        force: bool,
        /// No progress bar.
        #[arg(long)]
        quiet: bool,
    },
    /// Validate a config and build every plugin it names; trains nothing.
    Check {
        /// Config file. Without one: the built-in quickstart.
        config: Option<PathBuf>,
        /// Override a key.
        #[arg(long = "set", value_name = "KEY=VALUE")]
        sets: Vec<String>,
    },
    /// Scaffold a plugin crate (cdylib against this retort's retort-sdk) that builds and loads
    /// without edits.
    NewPlugin {
        /// Crate name; the kind is the name with '-' replaced by '_'.
        name: String,
        /// What the plugin provides.
        #[arg(long, value_enum)]
        kind: crate::artifacts::plugin_crate::PluginKind,
        /// Parent directory (default: the current directory).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
    },
    /// Draw a run's charts (loss per term, learning rate, weights and schedules, evaluation
    /// curves) from its metrics into RUN_DIR/plots/ and embed them in its report.md.
    Plot {
        /// A run directory (holding metrics.jsonl).
        run_dir: PathBuf,
    },
    /// List every registered plugin kind by category (built-ins, `RETORT_PLUGIN_PATH`, and the
    /// `[plugins]` of CONFIG if given).
    Plugins {
        /// Config whose `[plugins] paths` to load as well.
        config: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
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
    match dispatch(cli) {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {e}");
            e.exit_code()
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("RETORT_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Loads the config, and the registry with every plugin it and the environment name.
fn load_config_and_registry(
    config: Option<&std::path::Path>,
    sets: &[String],
) -> Result<(retort_core::config::RunConfig, ConfigOrigin, Registry)> {
    let (cfg, origin) = config::load(config, sets)?;
    let mut registry = crate::builtin_registry()?;
    crate::assemble::plugin_loader::load_all(&mut registry, &cfg.plugins.paths).map_err(|e| origin.annotate(e))?;
    Ok((cfg, origin, registry))
}

fn dispatch(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Run {
            config,
            sets,
            out,
            force,
            quiet,
            resume,
            resume_from_last_good,
        } => {
            // A resumed run uses the configuration it was started with, as resolved then.
            let config = match &resume {
                Some(run_dir) => Some(run_dir.join("config.resolved.toml")),
                None => config,
            };
            if let Some(c) = config.as_ref().filter(|c| resume.is_some() && !c.is_file()) {
                return Err(retort_core::Error::input(
                    format!(
                        "--resume {}",
                        c.parent().map(|p| p.display().to_string()).unwrap_or_default()
                    ),
                    "is not a retort run directory (no config.resolved.toml)",
                ));
            }
            let (cfg, origin, registry) = load_config_and_registry(config.as_deref(), &sets)?;
            let pipeline = Pipeline::assemble(cfg, &registry).map_err(|e| origin.annotate(e))?;
            let opts = RunOptions {
                out: resume.clone().or(out),
                force,
                progress: !quiet && std::io::stderr().is_terminal(),
                resume: resume.is_some(),
                resume_from_last_good,
            };
            let outcome = run(pipeline, &origin, &opts).map_err(|e| origin.annotate(e))?;
            println!("\n{}", outcome.report.table());
            if let Some(gain) = outcome.report.distillation_gain {
                println!(
                    "distillation gain over the scratch baseline: {gain:+.4} nats/token (positive = distilled student is better)"
                );
            }
            println!("run directory: {}", outcome.dir.display());
            Ok(())
        }
        Command::Check { config, sets } => {
            let (cfg, origin, registry) = load_config_and_registry(config.as_deref(), &sets)?;
            let p = Pipeline::assemble(cfg, &registry).map_err(|e| origin.annotate(e))?;
            println!("config OK ({})", origin.label());
            println!("  data:     {}", p.data.describe());
            match (&p.teacher_plan, &p.teacher) {
                (TeacherPlan::Load, Some(t)) => println!("  teacher:  {}", t.describe()),
                (TeacherPlan::Pretrain { steps, lr }, _) => {
                    println!(
                        "  teacher:  `{}` pretrained by the pipeline for {steps} steps at lr {lr}",
                        p.config.teacher.kind
                    )
                }
                (TeacherPlan::Load, None) => {}
            }
            println!("  student:  {}", p.student_description);
            let terms: Vec<String> = p
                .config
                .loss
                .iter()
                .zip(&p.terms)
                .map(|(spec, t)| format!("{} x {}", spec.weight, t.name))
                .collect();
            println!("  loss:     {}", terms.join(" + "));
            println!("  router:   {}", p.config.router.kind);
            println!(
                "  budget:   {} steps x {} windows x {} tokens",
                p.student_steps(),
                p.config.train.batch_size,
                p.config.train.seq_len
            );
            for (i, st) in p.config.stages.iter().enumerate() {
                println!("  stage {}: {} ({} steps)", i + 1, st.name_or_default(i), st.steps);
            }
            Ok(())
        }
        Command::Plot { run_dir } => {
            if !run_dir.join("metrics.jsonl").is_file() {
                return Err(retort_core::Error::input(
                    format!("run directory {}", run_dir.display()),
                    "has no metrics.jsonl (is it a retort run directory?)",
                ));
            }
            let plots = crate::artifacts::plots::plot_and_embed(&run_dir)?;
            for (title, path) in &plots {
                println!("{}  ({title})", run_dir.join(path).display());
            }
            if plots.is_empty() {
                println!(
                    "nothing to plot yet: no training records in {}",
                    run_dir.join("metrics.jsonl").display()
                );
            }
            Ok(())
        }
        Command::Generate {
            model,
            prompt,
            max_tokens,
            temperature,
            top_p,
            seed,
            device,
            context,
        } => {
            if !(temperature.is_finite() && temperature >= 0.0) {
                return Err(retort_core::Error::input(
                    "--temperature",
                    format!("expected a number >= 0, got {temperature}"),
                ));
            }
            let registry = crate::builtin_registry()?;
            let opts = crate::engine::generate::GenerateOptions {
                model,
                prompt: prompt.clone(),
                sampling: retort_plugins::models::generate::Sampling {
                    max_tokens,
                    temperature,
                    top_p,
                    seed,
                },
                device,
                context,
            };
            let g = crate::engine::generate::run_generate(&registry, &opts)?;
            println!("{prompt}{}", g.text);
            eprintln!(
                "{}: {} prompt tokens, {} generated in {:.2}s ({:.1} tokens/s)",
                g.model,
                g.prompt_tokens,
                g.tokens,
                g.seconds,
                g.tokens as f64 / g.seconds.max(1e-9)
            );
            Ok(())
        }
        Command::Eval {
            model,
            data,
            val_fraction,
            seq_len,
            batch_size,
            batches,
            device,
        } => {
            let registry = crate::builtin_registry()?;
            let opts = crate::engine::model_eval::EvalOptions {
                model,
                data,
                val_fraction,
                seq_len,
                batch_size,
                batches,
                device,
            };
            let (r, desc, secs) = crate::engine::model_eval::run_eval(&registry, &opts)?;
            println!("model:      {desc}");
            println!("tokens:     {}", r.tokens);
            println!("loss:       {:.4} nats/token", r.val_loss);
            println!("perplexity: {:.2}", r.perplexity);
            eprintln!("evaluated in {secs:.2}s");
            Ok(())
        }
        Command::Cache {
            action:
                Some(CacheAction::Inspect {
                    path,
                    json,
                    config,
                    sets,
                    sample_windows,
                    bench_read,
                }),
            ..
        } => {
            let registry = crate::builtin_registry()?;
            let opts = crate::engine::cache::InspectOptions {
                path,
                config,
                sets,
                sample_windows,
                bench_read,
            };
            let r = crate::engine::cache::inspect(&registry, &opts)?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&r).map_err(|e| retort_core::Error::Runtime(e.to_string()))?
                );
            } else {
                print!("{}", crate::engine::cache::inspect_text(&r));
            }
            Ok(())
        }
        Command::Cache {
            action:
                Some(CacheAction::Recode {
                    src,
                    out,
                    k,
                    coding,
                    force,
                }),
            ..
        } => {
            let old = retort_plugins::cache::CacheHeader::read(&src)?;
            let k = k.unwrap_or(old.k);
            let values = coding.value_coding(k)?;
            let t0 = std::time::Instant::now();
            let h = retort_plugins::cache::recode_cache(&src, &out, k, values, coding.zstd_level, force)?;
            println!(
                "cache {}: top-{} {} recoded from {} in {:.1}s",
                out.display(),
                h.k,
                h.values.name(),
                src.display(),
                t0.elapsed().as_secs_f64()
            );
            Ok(())
        }
        Command::Cache {
            action:
                Some(CacheAction::Export {
                    path,
                    out,
                    split,
                    windows,
                }),
            ..
        } => {
            let split = match split.as_str() {
                "train" => retort_core::Split::Train,
                "val" => retort_core::Split::Val,
                other => {
                    return Err(retort_core::Error::input(
                        "--split",
                        format!("expected train or val, got `{other}`"),
                    ))
                }
            };
            let meta = crate::engine::cache::export(&path, &out, split, windows)?;
            println!(
                "exported {} tokens x top-{} to {}",
                meta["tokens"],
                meta["k"],
                out.display()
            );
            Ok(())
        }
        Command::Cache {
            action: None,
            config,
            sets,
            out,
            k,
            coding,
            shard_tokens,
            batch,
            teacher_id,
            force,
            quiet,
        } => {
            let registry = crate::builtin_registry()?;
            let opts = crate::engine::cache::CacheOptions {
                config,
                sets,
                out,
                k,
                coding,
                shard_tokens,
                batch_windows: batch,
                teacher_id,
                force,
                progress: !quiet && std::io::stderr().is_terminal(),
            };
            let (path, s, secs) = crate::engine::cache::run_cache(&registry, &opts)?;
            let h = &s.header;
            let tokens = (h.train.windows + h.val.windows) * h.seq_len;
            println!(
                "cache {}: {tokens} tokens (top-{} {}), {} shards built, {} kept; teacher ran on {} tokens in {secs:.1}s ({:.0} tokens/s)",
                path.display(),
                h.k,
                h.values.name(),
                s.shards_built,
                s.shards_kept,
                s.tokens_computed,
                s.tokens_computed as f64 / secs.max(1e-9)
            );
            println!(
                "train from it with: teacher = {{ kind = \"cached\", path = \"{}\" }}",
                path.display()
            );
            Ok(())
        }
        Command::NewPlugin { name, kind, dir } => {
            let root = crate::artifacts::plugin_crate::new_plugin(&name, kind, &dir)?;
            println!("created {}", root.display());
            println!("build:   cd {} && cargo build --release", root.display());
            println!(
                "then add its library to `[plugins] paths` (see {}/README.md)",
                root.display()
            );
            Ok(())
        }
        Command::Plugins { config, json } => {
            let registry = match config {
                Some(c) => load_config_and_registry(Some(&c), &[])?.2,
                None => {
                    let mut r = crate::builtin_registry()?;
                    crate::assemble::plugin_loader::load_all(&mut r, &[])?;
                    r
                }
            };
            let listing = registry.listing();
            if json {
                let v: Vec<_> = listing
                    .iter()
                    .map(|k| {
                        serde_json::json!({"category": k.category, "kind": k.kind, "description": k.description,
                                           "source": k.source, "params": (k.params)()})
                    })
                    .collect();
                let text = serde_json::to_string_pretty(&v).map_err(|e| retort_core::Error::Runtime(e.to_string()))?;
                println!("{text}");
            } else {
                let mut last = "";
                for k in &listing {
                    if k.category != last {
                        println!("{}:", k.category);
                        last = k.category;
                    }
                    println!("  {:<14} {} [{}]", k.kind, k.description, k.source);
                }
            }
            Ok(())
        }
    }
}
