//! The run report: `report.json` (machine-readable), `report.md` and the table printed at the end.

use std::path::Path;

use serde::{Deserialize, Serialize};

use retort_core::{fsutil, Result};

/// What one evaluation measured on the validation windows.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean cross-entropy with the next token, nats/token.
    #[serde(deserialize_with = "super::lenient::f64")]
    pub val_loss: f64,
    /// `exp(min(val_loss, 50))`: never infinite.
    #[serde(deserialize_with = "super::lenient::f64")]
    pub perplexity: f64,
    /// Tokens evaluated.
    #[serde(skip)]
    pub tokens: usize,
    /// Fraction of tokens where the argmax agrees with the teacher's.
    pub top1_agreement: Option<f64>,
    /// Mean KL(teacher || model) per token, nats.
    pub kl_to_teacher: Option<f64>,
}

/// What one stage of a phase did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageStats {
    /// Stage name.
    pub name: String,
    /// Steps run (fewer than planned if early stopping ended the phase).
    pub steps: usize,
    /// First step of the stage within the phase (0-based).
    pub first_step: usize,
    /// Peak learning rate at the stage's start (before the schedule factor).
    pub lr: f64,
    /// Parameters the optimizer updated in this stage (the rest were frozen).
    pub trainable_params: usize,
    /// Mean total loss over the stage's last (up to) 10 applied steps.
    pub final_loss: Option<f64>,
    /// Validation loss at the end of the stage (multi-stage phases only).
    pub val_loss: Option<f64>,
}

/// The best evaluation of a phase under early stopping.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BestEval {
    /// Metric name.
    pub metric: String,
    /// Its value.
    pub value: f64,
    /// Step (of the phase) at which it was measured.
    pub step: usize,
}

/// What a training phase did.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseStats {
    /// Steps of the phase run (skipped ones included).
    pub steps: usize,
    /// Steps skipped for a non-finite loss or gradient (no update).
    pub skipped: usize,
    /// Training tokens seen.
    pub tokens: usize,
    /// Wall time in seconds (of the last process, for a resumed phase).
    pub wall_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Total loss of every step.
    pub losses: Vec<f64>,
    /// Per stage.
    #[serde(default)]
    pub stages: Vec<StageStats>,
    /// The best evaluation kept and exported (early stopping on).
    #[serde(default)]
    pub best: Option<BestEval>,
    /// Step at which early stopping ended the phase, if it did.
    #[serde(default)]
    pub stopped_early_at: Option<usize>,
}

/// Budget and speed of one training phase.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainReport {
    /// Steps (skipped ones included).
    pub steps: usize,
    /// Steps skipped for a non-finite loss or gradient.
    pub skipped_steps: usize,
    /// Training tokens.
    pub tokens: usize,
    /// Wall time, seconds.
    pub wall_s: f64,
    /// Tokens per second.
    pub tokens_per_s: f64,
    /// Mean total loss over the first 10% of steps.
    pub loss_start: f64,
    /// Mean total loss over the last 10% of steps.
    pub loss_end: f64,
    /// The stages (one, `main`, unless `[[stages]]` were configured).
    pub stages: Vec<StageStats>,
    /// The best evaluation, kept and exported, when early stopping is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub best: Option<BestEval>,
    /// Step at which early stopping ended the phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stopped_early_at: Option<usize>,
}

impl From<&PhaseStats> for TrainReport {
    fn from(s: &PhaseStats) -> Self {
        let k = (s.losses.len() / 10).max(1);
        let mean = |v: &[f64]| {
            if v.is_empty() {
                f64::NAN
            } else {
                v.iter().sum::<f64>() / v.len() as f64
            }
        };
        TrainReport {
            steps: s.steps,
            skipped_steps: s.skipped,
            tokens: s.tokens,
            wall_s: s.wall_s,
            tokens_per_s: s.tokens_per_s,
            loss_start: mean(&s.losses[..k.min(s.losses.len())]),
            loss_end: mean(&s.losses[s.losses.len().saturating_sub(k)..]),
            stages: s.stages.clone(),
            best: s.best.clone(),
            stopped_early_at: s.stopped_early_at,
        }
    }
}

/// One evaluated model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelReport {
    /// Architecture, one line.
    pub description: String,
    /// Parameter count.
    pub params: usize,
    /// Validation loss, nats/token.
    pub val_loss: f64,
    /// Perplexity (from a capped loss).
    pub perplexity: f64,
    /// Top-1 agreement with the teacher (students only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top1_agreement: Option<f64>,
    /// Mean KL(teacher || model), nats/token (students only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl_to_teacher: Option<f64>,
    /// `val_loss - teacher val_loss` (students only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gap_to_teacher: Option<f64>,
    /// How it was trained in this run (`None` for a teacher loaded from a checkpoint).
    pub train: Option<TrainReport>,
    /// What it generates, scored (`[eval.generation]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub generation: Option<GenerationResult>,
}

/// A model's continuations of the validation prompts, scored (`[eval.generation]`).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct GenerationResult {
    /// Prompts continued.
    pub samples: usize,
    /// Mean sampled tokens per prompt.
    pub completion_len: f64,
    /// Fraction of the samples that ended with the end-of-sequence token.
    pub eos_rate: f64,
    /// The teacher's mean `-log p` of the sampled tokens, nats/token (absent for a teacher that
    /// only serves stored outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub teacher_nll: Option<f64>,
    /// Their mean `-log p` under the data source's true distribution, nats/token (a source that
    /// knows it: `synthetic`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub true_nll: Option<f64>,
}

impl ModelReport {
    /// From an evaluation.
    pub fn new(
        description: String,
        params: usize,
        e: &EvalResult,
        teacher_loss: Option<f64>,
        train: Option<TrainReport>,
    ) -> Self {
        ModelReport {
            description,
            params,
            val_loss: e.val_loss,
            perplexity: e.perplexity,
            top1_agreement: e.top1_agreement,
            kl_to_teacher: e.kl_to_teacher,
            gap_to_teacher: teacher_loss.map(|t| e.val_loss - t),
            train,
            generation: None,
        }
    }

    /// With the scores of what it generates.
    pub fn with_generation(self, generation: Option<GenerationResult>) -> Self {
        ModelReport { generation, ..self }
    }
}

/// Identity of the run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunInfo {
    /// Run name.
    pub name: String,
    /// Seed.
    pub seed: u64,
    /// Device.
    pub device: String,
    /// Run directory.
    pub dir: String,
    /// Config file, or `built-in quickstart`.
    pub config: String,
}

/// One term of the objective.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TermReport {
    /// Metrics name.
    pub name: String,
    /// Kind.
    pub kind: String,
    /// Configured weight: a number or a schedule.
    pub weight: retort_core::ScalarSpec,
}

/// The whole report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    /// Run identity.
    pub run: RunInfo,
    /// Data description.
    pub data: String,
    /// Distillation objective.
    pub objective: Vec<TermReport>,
    /// The teacher.
    pub teacher: ModelReport,
    /// The distilled student.
    pub student: ModelReport,
    /// The same student trained from scratch on hard labels, same budget; `null` if disabled.
    pub baseline: Option<ModelReport>,
    /// An on-policy run's student trained off-policy (`lambda = 0`), same init, batches and
    /// budget (`on_policy.compare_off_policy`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub off_policy: Option<ModelReport>,
    /// The distillation phase (the contract's `train` block).
    pub train: TrainReport,
    /// `baseline.val_loss - student.val_loss`: what distillation gained (positive is better).
    pub distillation_gain: Option<f64>,
    /// Validation tokens per evaluation.
    pub eval_tokens: usize,
    /// Wall time of the whole run, seconds.
    pub total_wall_s: f64,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map(|x| format!("{x:.digits$}")).unwrap_or_else(|| "-".into())
}

impl Report {
    /// The side-by-side table (Markdown, readable in a terminal).
    pub fn table(&self) -> String {
        let mut s = String::from(
            "| model | params | val loss (nats/tok) | perplexity | gap to teacher | top-1 agree | KL(teacher‖·) | train steps | wall s | tok/s |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut row = |name: &str, m: &ModelReport| {
            let (steps, wall, tps) = match &m.train {
                Some(t) => (
                    t.steps.to_string(),
                    format!("{:.1}", t.wall_s),
                    format!("{:.0}", t.tokens_per_s),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            s.push_str(&format!(
                "| {name} | {} | {:.4} | {:.3} | {} | {} | {} | {steps} | {wall} | {tps} |\n",
                m.params,
                m.val_loss,
                m.perplexity,
                opt(m.gap_to_teacher, 4),
                opt(m.top1_agreement, 3),
                opt(m.kl_to_teacher, 4),
            ));
        };
        row("teacher", &self.teacher);
        let distilled = match &self.off_policy {
            Some(_) => "student (on-policy)",
            None => "student (distilled)",
        };
        row(distilled, &self.student);
        if let Some(o) = &self.off_policy {
            row("student (off-policy)", o);
        }
        if let Some(b) = &self.baseline {
            row("baseline (scratch)", b);
        }
        s
    }

    /// The `## Generations` section: each model's continuations of the validation prompts,
    /// scored (empty when the run did not evaluate generations).
    fn generations(&self) -> String {
        let mut rows = vec![("teacher", &self.teacher)];
        let student = if self.off_policy.is_some() {
            "student (on-policy)"
        } else {
            "student (distilled)"
        };
        rows.push((student, &self.student));
        rows.extend(self.off_policy.iter().map(|m| ("student (off-policy)", m)));
        rows.extend(self.baseline.iter().map(|m| ("baseline (scratch)", m)));
        let scored: Vec<_> = rows.iter().filter_map(|(n, m)| Some((*n, m.generation?))).collect();
        let Some((_, first)) = scored.first() else {
            return String::new();
        };
        let mut s = format!(
            "\n## Generations\n\nEach model continues the same {} validation prompts with the same seed. Lower NLL of \
             its own samples is better: the teacher's NLL says how likely the teacher finds them{}.\n\n\
             | model | mean length | end-of-sequence rate | teacher NLL of samples | true NLL (source) |\n\
             |---|---:|---:|---:|---:|\n",
            first.samples,
            if first.true_nll.is_some() {
                "; the true NLL is their likelihood under the data's own source"
            } else {
                ""
            },
        );
        for (name, g) in scored {
            s.push_str(&format!(
                "| {name} | {:.1} | {:.2} | {} | {} |\n",
                g.completion_len,
                g.eos_rate,
                opt(g.teacher_nll, 4),
                opt(g.true_nll, 4)
            ));
        }
        s
    }

    /// `report.md`.
    pub fn markdown(&self) -> String {
        let mut s = format!("# retort run `{}`\n\n", self.run.name);
        s.push_str(&format!(
            "- config: {}\n- device: {}, seed {}\n- data: {}\n- teacher: {}\n- student: {}\n- objective: {}\n\n",
            self.run.config,
            self.run.device,
            self.run.seed,
            self.data,
            self.teacher.description,
            self.student.description,
            self.objective
                .iter()
                .map(|t| format!("{} x `{}`", t.weight, t.name))
                .collect::<Vec<_>>()
                .join(" + "),
        ));
        s.push_str(&self.table());
        s.push('\n');
        if let (Some(gain), Some(b)) = (self.distillation_gain, &self.baseline) {
            let verdict = if gain > 0.0 { "better" } else { "worse" };
            s.push_str(&format!(
                "Distillation: the student's val loss is {:.4} nats/token {verdict} than the scratch baseline \
                 ({:.4} vs {:.4}), on the same budget of {} steps ({} tokens) from the same init.\n",
                gain.abs(),
                self.student.val_loss,
                b.val_loss,
                self.train.steps,
                self.train.tokens
            ));
        }
        s.push_str(&self.generations());
        if self.train.stages.len() > 1 {
            s.push_str("\n## Stages of the distilled student\n\n| stage | steps | first step | peak lr | trainable params | train loss (end) | val loss (end) |\n|---|---:|---:|---:|---:|---:|---:|\n");
            for st in &self.train.stages {
                s.push_str(&format!(
                    "| {} | {} | {} | {:.2e} | {} | {} | {} |\n",
                    st.name,
                    st.steps,
                    st.first_step,
                    st.lr,
                    st.trainable_params,
                    opt(st.final_loss, 4),
                    opt(st.val_loss, 4)
                ));
            }
        }
        let early = [("student", Some(&self.student)), ("baseline", self.baseline.as_ref())];
        for (who, m) in early {
            if let Some(t) = m.and_then(|m| m.train.as_ref()) {
                if let Some(b) = &t.best {
                    let stop = match t.stopped_early_at {
                        Some(at) => format!("stopped early at step {at}"),
                        None => "ran its whole budget".into(),
                    };
                    s.push_str(&format!(
                        "\nEarly stopping ({who}): {stop}; best {} = {:.4} at step {}, and those weights are the ones \
                         evaluated and exported.\n",
                        b.metric, b.value, b.step
                    ));
                }
            }
        }
        s.push_str(&format!(
            "\nEvaluated on {} validation tokens. Loss is mean cross-entropy with the next token; perplexity = exp(min(loss, 50)). \
             Total wall time {:.1} s.\n",
            self.eval_tokens, self.total_wall_s
        ));
        s
    }

    /// Writes `report.json` and `report.md` into `dir` atomically.
    pub fn write(&self, dir: &Path) -> Result<()> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| retort_core::Error::failed("serialising the report", e))?;
        fsutil::write_atomic(&dir.join("report.json"), &json)?;
        fsutil::write_atomic(&dir.join("report.md"), self.markdown().as_bytes())
    }
}
