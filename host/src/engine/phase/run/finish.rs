//! The end of a phase: the EMA or the best weights put in place, the statistics returned.

use candle_core::Tensor;

use retort_core::{Error, Result};

use crate::artifacts::checkpoint;
use crate::artifacts::events::{Event, Recorder};
use crate::artifacts::report::{BestEval, PhaseStats};

use crate::engine::phase::early_stopping::EarlyStopping;
use crate::engine::phase::state::BestState;

use super::{student_device, tensors_of, PhaseRun};

impl PhaseRun<'_> {
    /// Ends the phase: the EMA (if any) becomes the weights, early stopping puts back its best,
    /// and the statistics are returned.
    pub fn finish(mut self, rec: &mut Recorder) -> Result<PhaseStats> {
        self.bar.finish_and_clear();
        if let Some(ema) = self.ema.take() {
            // The phase ends with the averaged weights: they are what is evaluated and exported.
            for ((_, var), t) in self.model_vars.iter().zip(ema.weights()) {
                var.set(t)?;
            }
        }
        let steps_run = self.stopped_early_at.unwrap_or(self.plan.total());
        let best = match self.early.take() {
            Some(e) => self.settle_best(e, steps_run, rec)?,
            None => None,
        };
        let wall_s = self.started.elapsed().as_secs_f64();
        if self.world.size() > 1 {
            let comm = self.world.comm_seconds() - self.comm_at_start;
            tracing::info!(
                "{}: {} ranks, {:.1}% of the phase's {wall_s:.1} s in collectives ({} backend: loss values, gradients)",
                self.label,
                self.world.size(),
                100.0 * comm / wall_s.max(1e-9),
                self.world.backend()
            );
        }
        let tokens = self.plan.tokens_at(steps_run);
        let resumed_tokens = self.plan.tokens_at(self.first_step.min(steps_run));
        Ok(PhaseStats {
            steps: steps_run,
            skipped: self.skips.skipped,
            tokens,
            wall_s,
            tokens_per_s: (tokens - resumed_tokens) as f64 / wall_s.max(1e-9),
            losses: self.losses,
            stages: self.stages,
            best,
            stopped_early_at: self.stopped_early_at,
        })
    }

    /// The final weights are a candidate too (unless the last evaluation just saw them); the
    /// best weights are put back and reported.
    fn settle_best(&mut self, mut e: EarlyStopping, steps_run: usize, rec: &mut Recorder) -> Result<Option<BestEval>> {
        if !self.eval.due(steps_run) {
            let r = self.eval.current(self.student)?;
            e.consider_final(e.metric(&r)?, steps_run);
        }
        if e.state.best_step != steps_run {
            let weights = match e.best_weights.take() {
                Some(w) => w,
                None => self.load_best_weights()?,
            };
            for ((_, var), t) in self.model_vars.iter().zip(&weights) {
                var.set(t)?;
            }
        }
        let Some(value) = e.state.best else {
            return Ok(None);
        };
        let best = BestEval {
            metric: e.state.metric.clone(),
            value,
            step: e.state.best_step,
        };
        rec.record(&Event::Best(crate::artifacts::events::BestRecord {
            phase: self.label.to_string(),
            metric: best.metric.clone(),
            value,
            step: best.step,
        }))?;
        Ok(Some(best))
    }

    fn load_best_weights(&self) -> Result<Vec<Tensor>> {
        let root = self
            .checkpoints
            .as_ref()
            .map(|p| p.root.clone())
            .ok_or_else(|| Error::Runtime(format!("phase `{}`: the best weights were not kept", self.label)))?;
        let device = student_device(self.student)?;
        let ck = checkpoint::load_best::<BestState>(&root, &device)?
            .ok_or_else(|| Error::Runtime(format!("{}: no best checkpoint", root.display())))?;
        tensors_of(&ck, &self.model_vars)
    }
}
