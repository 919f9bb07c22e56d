//! The gradient of one optimizer step: every micro-batch through the teacher, the student and
//! the terms, weighed by the router, `total = sum_i w_i * term_i / accum` backpropagated and
//! the gradients summed, or the first non-finite quantity met on the way. In a data-parallel
//! run each micro-batch's term values are averaged across the ranks as soon as they are known
//! and the step's gradient before its norm, so that every rank routes, skips and updates alike.

use std::time::Instant;

use candle_core::{DType, Tensor};

use retort_core::config::LmHeadSpec;
use retort_core::{
    Batch, Error, Progress, Result, Router, StepContext, Student, TapSet, Teacher, TermSignals, LM_HEAD_TAP,
};
use retort_plugins::kernels::lm_head::{fused_loss, HeadTerm, WeightGradient};

use crate::assemble::TermSlot;
use crate::engine::batching::TrainBatcher;
use crate::engine::optim::{AdamW, GradNorms};
use crate::engine::parallel::World;
use crate::engine::rollout::{teacher_nll, Rollout, RolloutTotals};

use super::HeadPath;

/// What one step's micro-batches produced.
pub(super) enum Gradient {
    /// Every value finite: apply it.
    Finite(StepGradient),
    /// The first non-finite quantity: skip the step.
    NonFinite {
        /// What it was (`loss term \`kl\``, `the gradient norm`).
        what: String,
        /// Its value.
        value: f64,
        /// Whether it is the gradient (which a loss scale may have overflowed) rather than a
        /// value of the loss.
        gradient: bool,
    },
}

/// The summed gradient of a step and what the metrics report about it.
pub(super) struct StepGradient {
    /// One gradient per trainable parameter, in the optimizer's order.
    pub grads: Vec<Tensor>,
    /// Their norms (before clipping).
    pub norms: GradNorms,
    /// Each term's value, averaged over the micro-batches.
    pub term_values: Vec<f64>,
    /// The weights the router chose (on the first micro-batch).
    pub weights: Vec<f64>,
    /// What the samples of an on-policy step came to (`None`: the step trained on the data).
    pub rollout: Option<RolloutTotals>,
}

impl StepGradient {
    /// `sum_i w_i * term_i`.
    pub fn total(&self) -> f64 {
        self.term_values.iter().zip(&self.weights).map(|(v, w)| v * w).sum()
    }
}

/// The objective of a phase: its terms and router, and the models they read.
pub(super) struct Objective<'a> {
    label: &'a str,
    /// The terms, with their names.
    pub terms: &'a [TermSlot],
    /// Weighs the terms.
    pub router: Box<dyn Router>,
    student: &'a dyn Student,
    /// The teacher, only when a term reads it.
    teacher: Option<&'a dyn Teacher>,
    student_taps: TapSet,
    teacher_taps: TapSet,
    names: Vec<String>,
    reads_features: Vec<bool>,
    /// Tokens per chunk of the fused LM-head path; `None`: the full logits.
    fused_chunk: Option<usize>,
    /// The sampler of on-policy steps, when the phase has any.
    rollout: Option<Rollout<'a>>,
    /// The ranks training together.
    world: &'a World,
}

/// The terms of one micro-batch, still attached to the graph, or the first non-finite one.
enum TermValues {
    Finite { graph: Graph, scalars: Vec<f64> },
    NonFinite { what: String, value: f64 },
}

/// What a micro-batch's terms left in the graph.
enum Graph {
    /// Each term, unweighted (the full-logits path).
    Terms(Vec<Tensor>),
    /// `sum_i w_i * term_i` already (the fused LM-head path), attached to the student's head
    /// input, and the head's weight with its gradient, added to the weight's by the caller.
    Weighted(Tensor, Option<(Tensor, Tensor)>),
}

impl<'a> Objective<'a> {
    /// The objective of `terms`; an error if a term reads a teacher and there is none.
    /// `lm_head` decides whether the terms run fused with the student's head ([`HeadPath`]) on
    /// micro-batches of `tokens` (this rank's). On-policy steps train on what `rollout`
    /// samples. The gradients and values are averaged across the ranks of `world`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        label: &'a str,
        terms: &'a [TermSlot],
        router: Box<dyn Router>,
        student: &'a dyn Student,
        teacher: Option<&'a dyn Teacher>,
        lm_head: &LmHeadSpec,
        tokens: usize,
        rollout: Option<Rollout<'a>>,
        world: &'a World,
    ) -> Result<Self> {
        let needs_teacher = terms.iter().any(|t| t.term.needs_teacher());
        if needs_teacher && teacher.is_none() {
            return Err(Error::Runtime(format!(
                "phase `{label}` has a term that needs a teacher, and none was given"
            )));
        }
        let teacher = teacher.filter(|_| needs_teacher);
        let path = HeadPath::choose(
            lm_head,
            terms,
            router.as_ref(),
            &student.available_taps(),
            student.vocab_size(),
            tokens,
        );
        let fused_chunk = match path {
            HeadPath::Fused { chunk } => Some(chunk),
            HeadPath::Full(_) => None,
        };
        let mut student_taps: TapSet = terms.iter().flat_map(|t| t.term.student_taps()).collect();
        let mut teacher_taps: TapSet = terms.iter().flat_map(|t| t.term.teacher_taps()).collect();
        if fused_chunk.is_some() {
            student_taps.insert(LM_HEAD_TAP);
            // A teacher that hands its head has its logits made chunk by chunk too; its other
            // taps (top-k) are made from its whole logits, so then it hands the logits.
            if teacher_taps.is_empty() && teacher.is_some_and(|t| t.supports_tap(LM_HEAD_TAP)) {
                teacher_taps.insert(LM_HEAD_TAP);
            }
        }
        Ok(Objective {
            label,
            terms,
            router,
            student,
            teacher,
            student_taps,
            teacher_taps,
            names: terms.iter().map(|t| t.name.clone()).collect(),
            reads_features: terms.iter().map(|t| !t.term.student_taps().is_empty()).collect(),
            fused_chunk,
            rollout,
            world,
        })
    }

    /// The names of the terms, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// One step over `accum` micro-batches drawn from `batcher` (all of them are drawn, even
    /// after a non-finite value, so that the batch stream stays aligned with an uninterrupted
    /// run). The router weighs once per step, on the first micro-batch's values.
    /// On the fused LM-head path the router weighs before the terms are computed (it reads
    /// none of their values, [`Router::reads_step_outputs`]).
    pub fn gradient(&mut self, batcher: &mut TrainBatcher, opt: &AdamW, step: StepInput) -> Result<Gradient> {
        let started = Instant::now();
        // The fused ops write the parameters' gradients into the optimizer's buffers.
        let leaf = opt.leaf_grads();
        leaf.clear();
        let _collecting = leaf.collect();
        let mut rollout = self
            .rollout
            .as_ref()
            .filter(|r| r.on_step(step.stage_lambda, step.stage_step))
            .map(|_| RolloutTotals {
                steps: 1,
                ..RolloutTotals::default()
            });
        let early = match self.fused_chunk {
            Some(_) => Some(self.route(&vec![f64::NAN; self.terms.len()], step.base_weights, step.progress)?),
            None => None,
        };
        let batch = self.next_batch(batcher, step.index, 0, rollout.as_mut())?;
        let (graph, scalars) = match self.terms_on(&batch, &step, early.as_deref(), rollout.as_mut())? {
            TermValues::Finite { graph, scalars } => (graph, scalars),
            TermValues::NonFinite { what, value } => {
                batcher.skip(step.accum - 1);
                return Ok(Gradient::NonFinite {
                    what,
                    value,
                    gradient: false,
                });
            }
        };
        let weights = match early {
            Some(w) => w,
            None => self.route(&scalars, step.base_weights, step.progress)?,
        };
        let mut partial = self.backward(graph, &weights, opt, &step)?;
        let mut sum = StepGradient::first(&scalars, weights, step.accum);
        for drawn in 2..=step.accum {
            let batch = self.next_batch(batcher, step.index, drawn - 1, rollout.as_mut())?;
            match self.terms_on(&batch, &step, Some(&sum.weights), rollout.as_mut())? {
                TermValues::Finite { graph, scalars } => {
                    let more = self.backward(graph, &sum.weights, opt, &step)?;
                    partial = sum_partial(partial, more)?;
                    sum.add_values(&scalars, step.accum);
                }
                TermValues::NonFinite { what, value } => {
                    batcher.skip(step.accum - drawn);
                    return Ok(Gradient::NonFinite {
                        what,
                        value,
                        gradient: false,
                    });
                }
            }
        }
        if let Some(r) = rollout.as_mut() {
            r.step_seconds = started.elapsed().as_secs_f64();
            r.sum_over(self.world)?;
        }
        sum.rollout = rollout;
        sum.grads = self.world.average_gradients(opt.finish_grads(partial)?)?;
        sum.grads = unscaled(std::mem::take(&mut sum.grads), step.loss_scale)?;
        sum.norms = opt.norms(&sum.grads)?;
        if !sum.norms.total.is_finite() {
            return Ok(Gradient::NonFinite {
                what: "the gradient norm".into(),
                value: sum.norms.total,
                gradient: true,
            });
        }
        Ok(Gradient::Finite(sum))
    }

    /// The next micro-batch (`micro` of step `index`): the batcher's windows, or on an on-policy
    /// step (`rollout` given) the windows sampled from their prompts, counted in `rollout` (each
    /// rank's samples with seeds of their own).
    fn next_batch(
        &self,
        batcher: &mut TrainBatcher,
        index: usize,
        micro: usize,
        rollout: Option<&mut RolloutTotals>,
    ) -> Result<Batch> {
        let batch = batcher.next_batch()?;
        let (Some(sampler), Some(totals)) = (self.rollout.as_ref(), rollout) else {
            return Ok(batch);
        };
        let seed_slot = micro * self.world.size() + self.world.rank();
        let (sampled, got) = sampler.sample(&batch, index, seed_slot)?;
        totals.add(&got);
        Ok(sampled)
    }

    /// Teacher and student forward on `batch`, the router's token weights, every term (fused
    /// with the student's head, weighed by `weights`, on the fused path: the head's `dL/dW`
    /// then goes into the optimizer's buffer, scaled as `backward` scales the loss). On an
    /// on-policy step the teacher's score of the sampled tokens is added to `rollout`.
    fn terms_on(
        &mut self,
        batch: &Batch,
        step: &StepInput,
        weights: Option<&[f64]>,
        rollout: Option<&mut RolloutTotals>,
    ) -> Result<TermValues> {
        let t_out = match self.teacher {
            Some(t) => Some(t.forward(batch, &self.teacher_taps)?),
            None => None,
        };
        if let (Some(out), Some(totals)) = (t_out.as_ref(), rollout) {
            let (nll, tokens) = teacher_nll(out, batch)?;
            totals.teacher_nll += nll;
            totals.scored_tokens += tokens;
        }
        let s_out = self.student.forward(batch, &self.student_taps)?;
        let mut ctx = StepContext {
            batch,
            student: &s_out,
            teacher: t_out.as_ref(),
            progress: step.progress,
            token_weights: None,
        };
        let token_weights = self.router.prepare(&ctx)?.map(|w| w.detach());
        ctx.token_weights = token_weights.as_ref();
        let (graph, scalars) = match (self.fused_chunk, weights) {
            (Some(chunk), Some(weights)) => {
                let terms: Vec<HeadTerm> = self
                    .terms
                    .iter()
                    .zip(weights)
                    .map(|(t, &weight)| HeadTerm {
                        term: t.term.as_ref(),
                        weight,
                    })
                    .collect();
                let scale = step.loss_scale / step.accum as f64;
                let loss = fused_loss(&terms, &ctx, chunk, WeightGradient::Collected { scale })?;
                (Graph::Weighted(loss.total, loss.weight_grad), loss.values)
            }
            _ => {
                let values: Vec<Tensor> = self.terms.iter().map(|t| t.term.compute(&ctx)).collect::<Result<_>>()?;
                let scalars: Vec<f64> = values.iter().map(scalar).collect::<Result<_>>()?;
                (Graph::Terms(values), scalars)
            }
        };
        let mut scalars = scalars;
        self.world.mean(&mut scalars)?;
        if let Some(i) = scalars.iter().position(|v| !v.is_finite()) {
            return Ok(TermValues::NonFinite {
                what: format!("loss term `{}`", self.names[i]),
                value: scalars[i],
            });
        }
        Ok(TermValues::Finite { graph, scalars })
    }

    /// The router's weights for this step.
    fn route(&mut self, values: &[f64], base_weights: &[f64], progress: Progress) -> Result<Vec<f64>> {
        let w = self.router.weights(&TermSignals {
            names: &self.names,
            values,
            base_weights,
            reads_features: &self.reads_features,
            progress,
        })?;
        if w.len() != self.terms.len() {
            return Err(Error::Runtime(format!(
                "router returned {} weights for {} terms",
                w.len(),
                self.terms.len()
            )));
        }
        Ok(w)
    }

    /// The gradients of `sum_i (w_i / accum) * term_i` over the terms with a non-zero weight:
    /// summed over the micro-batches, they are those of the mean over the whole effective batch.
    /// Returns what candle's gradient store holds for each parameter ([`AdamW::store_grads`]);
    /// the rest is in the optimizer's leaf-gradient buffers.
    fn backward(&self, graph: Graph, weights: &[f64], opt: &AdamW, step: &StepInput) -> Result<Vec<Option<Tensor>>> {
        let mut total: Option<Tensor> = None;
        let mut weight_grad = None;
        match graph {
            Graph::Weighted(t, wg) if weights.iter().any(|w| *w != 0.0) => {
                total = Some(if step.accum == 1 { t } else { (t / step.accum as f64)? });
                weight_grad = wg;
            }
            Graph::Weighted(..) => {}
            Graph::Terms(values) => {
                for (v, wi) in values.iter().zip(weights) {
                    if *wi == 0.0 {
                        continue;
                    }
                    let wv = (v * (*wi / step.accum as f64))?;
                    total = Some(match total {
                        Some(t) => (t + wv)?,
                        None => wv,
                    });
                }
            }
        }
        let total = total.ok_or_else(|| {
            Error::Runtime(format!(
                "phase `{}` stage `{}`: every term has weight 0",
                self.label, step.stage
            ))
        })?;
        let scale = step.loss_scale;
        let total = if scale == 1.0 { total } else { (total * scale)? };
        let grads = total.backward()?;
        if let Some((w, g)) = weight_grad {
            let g = if step.accum == 1 && scale == 1.0 {
                g
            } else {
                (g * (scale / step.accum as f64))?
            };
            // Added to whatever else the weight got (a tied head: the embedding's gradient);
            // a head that is not trained (not held by the optimizer) is left out.
            opt.leaf_grads().add(&w, g)?;
        }
        Ok(opt.store_grads(&grads))
    }
}

/// What a step's gradient depends on besides the batches.
pub(super) struct StepInput<'s> {
    /// Name of the stage (for errors).
    pub stage: &'s str,
    /// Micro-batches per step.
    pub accum: usize,
    /// Progress within the stage.
    pub progress: Progress,
    /// The terms' configured weights at this step (what the router starts from).
    pub base_weights: &'s [f64],
    /// The step's index in the phase, from 0 (the samples' seeds).
    pub index: usize,
    /// The step's index in its stage, from 0, and the stage's fraction of steps on samples
    /// (`None`: `on_policy.lambda`): which steps sample.
    pub stage_step: usize,
    /// See `stage_step`.
    pub stage_lambda: Option<f64>,
    /// The loss is multiplied by this before the backward pass and the gradients divided by
    /// it after (1: no scaling; see `loss_scale.rs`).
    pub loss_scale: f64,
}

impl StepGradient {
    /// The sums after the first micro-batch (the gradients are filled in at the end).
    fn first(scalars: &[f64], weights: Vec<f64>, accum: usize) -> Self {
        let mut s = StepGradient {
            grads: Vec::new(),
            norms: GradNorms::default(),
            term_values: vec![0.0; scalars.len()],
            weights,
            rollout: None,
        };
        s.add_values(scalars, accum);
        s
    }

    fn add_values(&mut self, scalars: &[f64], accum: usize) {
        for (m, v) in self.term_values.iter_mut().zip(scalars) {
            *m += v / accum as f64;
        }
    }
}

/// The per-parameter sums of two micro-batches' gradient-store parts.
fn sum_partial(a: Vec<Option<Tensor>>, b: Vec<Option<Tensor>>) -> Result<Vec<Option<Tensor>>> {
    a.into_iter()
        .zip(b)
        .map(|pair| match pair {
            (Some(x), Some(y)) => Ok(Some((x + y)?)),
            (x, y) => Ok(x.or(y)),
        })
        .collect()
}

/// `grads / scale` (the gradients of the unscaled loss); as they are when `scale` is 1.
fn unscaled(grads: Vec<Tensor>, scale: f64) -> Result<Vec<Tensor>> {
    if scale == 1.0 {
        return Ok(grads);
    }
    Ok(grads
        .iter()
        .map(|g| g * (1.0 / scale))
        .collect::<candle_core::Result<_>>()?)
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}
