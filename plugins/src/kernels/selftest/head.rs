//! The case of the fused LM-head loss (`kernels::lm_head`): `0.7 kl(T = 2) + 0.3 ce` from the
//! student's head input and weight and the teacher's, in chunks, against the full logits
//! (`h W^T`) and the same two terms. The terms are made of the loss kernels directly (the
//! `losses` plugins sit above `kernels`), with `kl`'s and `ce`'s per-token forms.

use std::rc::Rc;

use candle_core::{DType, Result, Tensor};
use retort_core::taps::{LM_HEAD_HIDDEN, LM_HEAD_WEIGHT};
use retort_core::{Batch, LossTerm, Outputs, Progress, StepContext};

use super::cases::{op, Input, InputsFn, Op, OpFn, Role};
use super::inputs::{class_ids, normal};
use crate::kernels::divergence::{self, Divergence};
use crate::kernels::lm_head::{fused_loss, HeadTerm, WeightGradient};
use crate::kernels::{cross_entropy, lm_head};

/// Tokens per chunk on the small shapes (several chunks and a ragged last one).
const SMALL_CHUNK: usize = 24;

/// A logit term of the check: forward KL at `T` (times `T^2`), or cross-entropy.
enum KernelTerm {
    Kl(f64),
    Ce,
}

impl LossTerm for KernelTerm {
    fn compute(&self, ctx: &StepContext) -> retort_core::Result<Tensor> {
        ctx.scaled_token_mean(self.per_token(ctx)?)
    }
    fn needs_teacher(&self) -> bool {
        matches!(self, KernelTerm::Kl(_))
    }
    fn per_token_form(&self) -> bool {
        true
    }
    fn per_token(&self, ctx: &StepContext) -> retort_core::Result<(Tensor, f64)> {
        let zs = &ctx.student.logits;
        Ok(match self {
            KernelTerm::Kl(t) => {
                let zt = &ctx.teacher.expect("the check hands a teacher").logits;
                let float = if zs.dtype() == DType::F64 {
                    DType::F64
                } else {
                    DType::F32
                };
                let zs = zs.to_dtype(float)?;
                let zt = zt.to_dtype(zs.dtype())?;
                (divergence::per_token(&zs, &zt, *t, Divergence::Forward)?, t * t)
            }
            KernelTerm::Ce => (cross_entropy::per_token(zs, &ctx.batch.targets, 0.0)?, 1.0),
        })
    }
}

/// `[hidden [N, H], weight [V, H], teacher hidden, teacher weight, targets [N]]`: the loss
/// `[1, 1]` (the tokens as one window).
fn loss(x: &[Tensor], chunk: Option<usize>) -> Result<Tensor> {
    let [h, w, th, tw, y] = x else {
        candle_core::bail!("lm_head: expected 5 inputs, got {}", x.len())
    };
    let (n, v) = (h.dim(0)?, w.dim(0)?);
    let (h, th, y) = (h.unsqueeze(0)?, th.unsqueeze(0)?, y.unsqueeze(0)?);
    let head = |hidden: &Tensor, weight: &Tensor| -> Result<Outputs> {
        let mut o = Outputs::logits_only(Tensor::zeros((1, n, 0), hidden.dtype(), hidden.device())?);
        o.taps.insert(LM_HEAD_HIDDEN.into(), hidden.clone());
        o.taps.insert(LM_HEAD_WEIGHT.into(), weight.clone());
        Ok(o)
    };
    let full = |hidden: &Tensor, weight: &Tensor| -> Result<Outputs> {
        Ok(Outputs::logits_only(
            hidden.broadcast_matmul(&weight.t()?)?.reshape((1, n, v))?,
        ))
    };
    let (student, teacher) = match chunk {
        Some(_) => (head(&h, w)?, head(&th.detach(), &tw.detach())?),
        None => (full(&h, w)?, full(&th.detach(), &tw.detach())?),
    };
    let batch = Batch {
        input_ids: y.clone(),
        targets: y.clone(),
        mask: None,
        source: None,
    };
    let ctx = StepContext {
        batch: &batch,
        student: &student,
        teacher: Some(&teacher),
        progress: Progress::new(0, 1),
        token_weights: None,
    };
    let terms = [(KernelTerm::Kl(2.0), 0.7), (KernelTerm::Ce, 0.3)];
    let err = |e: retort_core::Error| candle_core::Error::Msg(e.to_string());
    let total = match chunk {
        Some(c) => {
            let ht: Vec<HeadTerm> = terms
                .iter()
                .map(|(term, weight)| HeadTerm { term, weight: *weight })
                .collect();
            fused_loss(&ht, &ctx, c, WeightGradient::InGraph).map_err(err)?.total
        }
        None => {
            let kl = (terms[0].0.compute(&ctx).map_err(err)? * terms[0].1)?;
            (kl + (terms[1].0.compute(&ctx).map_err(err)? * terms[1].1)?)?
        }
    };
    total.reshape((1, 1))
}

/// The fused LM-head loss at shapes `[N, H, V]`.
pub fn lm_head_loss() -> Op {
    let inputs: InputsFn = Box::new(|d| {
        let &[n, h, v] = d else {
            candle_core::bail!("lm_head: expected a shape [N, H, V], got {d:?}")
        };
        let scale = 1.0 / (h as f32).sqrt();
        Ok(vec![
            Input::new("hidden", Role::Grad, normal(&[n, h], 0.0, 1.0, 1)?),
            Input::new("weight", Role::Grad, normal(&[v, h], 0.0, 2.0 * scale, 2)?),
            Input::new("t_hidden", Role::Const, normal(&[n, h], 0.0, 1.0, 3)?),
            Input::new("t_weight", Role::Const, normal(&[v, h], 0.0, 2.0 * scale, 4)?),
            Input::new("targets", Role::Index, class_ids(&[n], v, 5)?),
        ])
    });
    let fused: OpFn = Rc::new(|x| {
        let n = x.first().map_or(Ok(1), |h| h.dim(0))?;
        let v = x.get(1).map_or(Ok(1), |w| w.dim(0))?;
        let chunk = if n <= 4 * SMALL_CHUNK {
            SMALL_CHUNK
        } else {
            lm_head::chunk_tokens(0, v)
        };
        Ok(vec![loss(x, Some(chunk))?])
    });
    let composite: OpFn = Rc::new(|x| Ok(vec![loss(x, None)?]));
    Op {
        outputs: &["L"],
        rowwise: false,
        // Seven `[N, V]` sweeps (the student's and the teacher's logits written and read, their
        // gradient written and read twice) per element of `hidden [N, H]`, at V / H = 256 / 3,
        // the ratio of every shape here (SmolLM2's).
        traffic: 7.0 * 256.0 / 3.0,
        shapes: &[&[70, 12, 1024], &[33, 6, 512]],
        device_shapes: &[&[2048, 576, 49_152]],
        ..op(
            "lm_head",
            "0.7 kl(T=2) + 0.3 ce".into(),
            inputs,
            |_| true,
            fused,
            composite,
        )
    }
}
