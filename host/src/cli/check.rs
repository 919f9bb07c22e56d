//! `retort check [CONFIG] [--set K=V]...`: validate a config and build every plugin it names.

use clap::Args;

use retort_core::Result;

use super::common::ConfigArgs;
use crate::assemble::{HeadPath, Pipeline, TeacherPlan};
use crate::engine::parallel::launch::{Backend, Launch};

/// Arguments of `retort check`.
#[derive(Debug, Args)]
pub struct CheckArgs {
    /// The config to check.
    #[command(flatten)]
    config: ConfigArgs,
    /// Check for a data-parallel launch of this many ranks (default: the launcher's, when
    /// `retort check` runs under one; else 1).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    ranks: Option<u64>,
}

impl CheckArgs {
    /// Assembles the pipeline (training nothing) and prints what it is made of.
    pub fn run(self) -> Result<()> {
        let (cfg, origin, registry) = self.config.load()?;
        let launch = Launch::from_env()?;
        let ranks = self.ranks.map_or(launch.ranks(), |n| n as usize);
        crate::assemble::check_ranks(&cfg, ranks).map_err(|e| origin.annotate(e))?;
        let backend = match ranks {
            1 => "none (one process)".to_string(),
            _ => Backend::choose(&launch, &cfg.parallel)
                .map_err(|e| origin.annotate(e))?
                .describe(),
        };
        let p = Pipeline::assemble(cfg, &registry).map_err(|e| origin.annotate(e))?;
        println!("config OK ({})", origin.label());
        println!("  data:     {}", p.data.describe());
        match (&p.teacher_plan, &p.teacher) {
            (TeacherPlan::Load, Some(t)) => println!("  teacher:  {}", t.describe()),
            (TeacherPlan::Pretrain { steps, lr }, _) => println!(
                "  teacher:  `{}` pretrained by the pipeline for {steps} steps at lr {lr}",
                p.config.teacher.kind
            ),
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
        let path = HeadPath::choose(
            &p.config.train.lm_head,
            &p.terms,
            p.router()?.as_ref(),
            &p.student_taps,
            p.vocab_size,
            p.config.train.batch_size.saturating_mul(p.config.train.seq_len),
        );
        println!("  logits:   {path}");
        println!("  memory:   {}", p.memory);
        let t = &p.config.train;
        println!(
            "  budget:   {} steps x {} windows x {} tokens",
            p.student_steps(),
            t.batch_size,
            t.seq_len
        );
        println!(
            "  parallel: {ranks} rank(s) ({}), {} windows per rank of each batch, backend {backend}",
            if self.ranks.is_some() {
                "--ranks".to_string()
            } else {
                launch.describe()
            },
            t.batch_size / ranks
        );
        for (i, st) in p.config.stages.iter().enumerate() {
            println!("  stage {}: {} ({} steps)", i + 1, st.name_or_default(i), st.steps);
        }
        if let Some(plan) = &p.on_policy {
            let steps = p.student_steps();
            let sampled = plan.sampled_steps(&p.config);
            let reference = if p.compares_off_policy() {
                ", and an off-policy reference (phase `offpolicy`)"
            } else {
                ""
            };
            println!("  samples:  {sampled} of {steps} steps on {plan}{reference}");
        }
        Ok(())
    }
}
