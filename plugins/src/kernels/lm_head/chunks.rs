//! The chunk loop of [`fused_loss`].

use std::sync::Arc;

use candle_core::{DType, Tensor};

use retort_core::{Batch, Error, LossTerm, Outputs, Result, StepContext};

use super::inject::Precomputed;
use super::student_head::StudentHead;
use super::weight_grad::{product as matmul, WeightGrad};
use crate::kernels::cpu::bf16_matmul::{Bf16MatMul, Bf16Weight};
use crate::kernels::leaf_grads;

/// One term of the objective with its weight for this step.
pub struct HeadTerm<'a> {
    /// The term; its [`LossTerm::per_token_form`] must be true.
    pub term: &'a dyn LossTerm,
    /// Its weight `w_k` (0: computed for its value, left out of the gradient).
    pub weight: f64,
}

/// Where `dL/dW` goes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum WeightGradient {
    /// Into the graph: the loss is attached to the head's weight too, and candle's backward
    /// sums its gradient like any other (zero-filling a `[V, H]` first, then adding).
    InGraph,
    /// Back to the caller ([`HeadLoss::weight_grad`]), who adds it to the weight's gradient
    /// itself: the loss is attached to the head's input only. Saves two `[V, H]` buffers.
    /// Only for a weight that is a variable's tensor; any other (e.g. rows of a padded head,
    /// narrowed) goes [`WeightGradient::InGraph`], so its gradient reaches the variable.
    Returned,
    /// Into the weight's leaf-gradient buffer, in place, times `scale` (the factor the
    /// caller's backward multiplies `total` by: the loss scale over the micro-batches), where
    /// the thread's collector holds the weight and it is a CPU f32/f64 tensor
    /// (`kernels::leaf_grads`); otherwise as [`WeightGradient::Returned`] (unscaled).
    Collected {
        /// The factor applied to `dL/dW`.
        scale: f64,
    },
}

/// What [`fused_loss`] returns.
pub struct HeadLoss {
    /// `sum_k w_k term_k`, rank 0, attached to the student's head input (and weight, for
    /// [`WeightGradient::InGraph`]).
    pub total: Tensor,
    /// Each term's value (`term_k`, unweighted), as `LossTerm::compute` would give it.
    pub values: Vec<f64>,
    /// `(W, dL/dW)` for [`WeightGradient::Returned`]: the caller adds `dL/dW`, times the
    /// gradient flowing into `total`, to `W`'s gradient.
    pub weight_grad: Option<(Tensor, Tensor)>,
}

/// The objective of `terms` over the step `ctx`, whose student outputs hold the head
/// (`Outputs::lm_head`, the `lm_head` tap), in chunks of `chunk` tokens (see the module doc).
/// The teacher (`ctx.teacher`) hands its dense logits, its head (then its logits are made
/// chunk by chunk too), or only taps (`topk.{k}`) with logits `[b, s, 0]`. `dL/dW` goes where
/// `weight_gradient` says.
pub fn fused_loss(
    terms: &[HeadTerm],
    ctx: &StepContext,
    chunk: usize,
    weight_gradient: WeightGradient,
) -> Result<HeadLoss> {
    let (hidden, weight) = ctx
        .student
        .lm_head()
        .ok_or_else(|| Error::Runtime("the fused LM-head loss needs the student's `lm_head` tap".into()))?;
    if terms.iter().any(|t| !t.term.per_token_form()) {
        return Err(Error::Runtime(
            "the fused LM-head loss got a term without a per-token form".into(),
        ));
    }
    let (b, s, width) = hidden.dims3()?;
    let (n, vocab) = (b * s, weight.dim(0)?);
    let h = hidden.detach().reshape((n, width))?;
    let w = weight.detach();
    let head = StudentHead::new(&w, ctx.student.lm_head_bf16_products())?;
    let tokens = TokenWeights::of(ctx, n, h.dtype())?;
    let rows = Rows::new(ctx, n)?;
    let collected = match weight_gradient {
        // Claimed only where the product can be written into the buffer: a claim that went
        // unused would leave last step's values in it.
        WeightGradient::Collected { scale } if n > 0 && WeightGrad::writes_into(weight) => {
            leaf_grads::claim(weight)?.and_then(|c| WeightGrad::leaf(c, scale))
        }
        _ => None,
    };
    let mut grad_w = collected.unwrap_or_else(|| WeightGrad::zeros((vocab, width), w.dtype(), w.device()));
    let mut grad_h = Vec::new();
    let mut sums = vec![0f64; terms.len()];
    let chunk = chunk.max(1);
    for start in (0..n).step_by(chunk) {
        let len = chunk.min(n - start);
        let hc = h.narrow(0, start, len)?;
        let zs = head.logits(&hc, (1, len, vocab))?;
        let (teacher, batch) = (rows.teacher(start, len)?, rows.batch(start, len)?);
        let student = Outputs::logits_only(zs.as_tensor().clone());
        let cctx = StepContext {
            batch: &batch,
            student: &student,
            teacher: teacher.as_ref(),
            progress: ctx.progress,
            token_weights: None,
        };
        let g = match chunk_terms(terms, &cctx, &tokens.chunk(start, len)?, &mut sums)? {
            Some(total) => logits_grad(&total, zs.as_tensor())?,
            None => None,
        };
        let g = match g {
            Some(g) => g.reshape((len, vocab))?.to_dtype(w.dtype())?,
            None => Tensor::zeros((len, vocab), w.dtype(), w.device())?,
        };
        grad_h.push(head.input_grad(&g)?);
        grad_w.add(&g, &hc, head.products())?;
    }
    let total: f64 = terms.iter().zip(&sums).map(|(t, v)| t.weight * v).sum();
    let grad_hidden = Tensor::cat(&grad_h, 0)?
        .reshape((b, s, width))?
        .to_dtype(hidden.dtype())?;
    let grad_weight = grad_w
        .finish((vocab, width), w.dtype(), w.device())?
        .map(|g| g.to_dtype(weight.dtype()))
        .transpose()?;
    let value = Tensor::new(total, hidden.device())?.to_dtype(hidden.dtype())?;
    let returned = matches!(
        weight_gradient,
        WeightGradient::Returned | WeightGradient::Collected { .. }
    );
    let (in_graph, weight_grad) = match grad_weight {
        None => (None, None),
        Some(g) if returned && weight.is_variable() => (None, Some((weight.clone(), g))),
        Some(g) => (Some(g), None),
    };
    let total = Precomputed {
        value,
        grad_hidden,
        grad_weight: in_graph,
    }
    .attach(hidden, weight)?;
    Ok(HeadLoss {
        total,
        values: sums,
        weight_grad,
    })
}

/// The terms on one chunk (`ctx`, token weights `w`): adds each term's share of its value to
/// `sums`, and returns `sum_k w_k s_k sum_i omega_i v_k / D` over the chunk, whose gradient
/// w.r.t. the chunk's logits is the chunk's `G` (`None` when every weight is 0).
fn chunk_terms(terms: &[HeadTerm], ctx: &StepContext, w: &ChunkWeights, sums: &mut [f64]) -> Result<Option<Tensor>> {
    let mut total: Option<Tensor> = None;
    for (k, t) in terms.iter().enumerate() {
        let (v, factor) = t.term.per_token(ctx)?;
        let scale = if t.term.router_token_weighted() {
            &w.routed
        } else {
            &w.masked
        };
        let part = (v.to_dtype(scale.dtype())? * scale)?.sum_all()?;
        sums[k] += factor * part.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if t.weight != 0.0 {
            let wp = (part * (t.weight * factor))?;
            total = Some(match total {
                Some(x) => (x + wp)?,
                None => wp,
            });
        }
    }
    Ok(total)
}

/// `omega_i / D` per token (see the module doc), with the router's token weights (`routed`,
/// for the distillation terms) and without (`masked`, for `ce`), `[N]` each.
struct TokenWeights {
    routed: Tensor,
    masked: Tensor,
}

/// [`TokenWeights`] of one chunk, `[1, len]` each.
struct ChunkWeights {
    routed: Tensor,
    masked: Tensor,
}

impl TokenWeights {
    fn of(ctx: &StepContext, n: usize, dtype: DType) -> Result<Self> {
        Ok(TokenWeights {
            routed: Self::scaled(ctx, ctx.token_weights, n, dtype)?,
            masked: Self::scaled(ctx, None, n, dtype)?,
        })
    }

    /// From the step's mask and the router's token weights `router`.
    fn scaled(ctx: &StepContext, router: Option<&Tensor>, n: usize, dtype: DType) -> Result<Tensor> {
        let dtype = if dtype == DType::F64 { DType::F64 } else { DType::F32 };
        let device = ctx.student.logits.device();
        let omega = match (router, ctx.batch.mask.as_ref()) {
            (Some(r), Some(m)) => Some((r.to_dtype(dtype)? * m.to_dtype(dtype)?)?),
            (Some(r), None) => Some(r.to_dtype(dtype)?),
            (None, m) => m.map(|m| m.to_dtype(dtype)).transpose()?,
        };
        Ok(match omega {
            None => Tensor::full(1.0 / n as f64, n, device)?.to_dtype(dtype)?,
            Some(o) => {
                let o = o.flatten_all()?;
                let d = o.sum_all()?.maximum(1.0)?;
                o.broadcast_div(&d)?
            }
        })
    }

    /// The weights of tokens `start..start + len`.
    fn chunk(&self, start: usize, len: usize) -> Result<ChunkWeights> {
        let cut = |t: &Tensor| -> Result<Tensor> { Ok(t.narrow(0, start, len)?.reshape((1, len))?) };
        Ok(ChunkWeights {
            routed: cut(&self.routed)?,
            masked: cut(&self.masked)?,
        })
    }
}

/// The teacher's head as the chunks multiply by it: `(hidden [N, H_t], weight [V, H_t])`.
enum TeacherHead {
    /// The weight as it was handed.
    Dense(Tensor, Tensor),
    /// A bf16 weight on the CPU (a bf16 teacher), packed once per step for the bf16 tile
    /// products (`kernels::cpu::bf16_matmul`); the hidden rows read as f32.
    Bf16(Tensor, Bf16MatMul),
}

impl TeacherHead {
    fn new(h: Tensor, w: &Tensor) -> Result<Self> {
        Ok(if w.dtype() == DType::BF16 && w.device().is_cpu() {
            let packed = Bf16MatMul(Arc::new(Bf16Weight::from_tensor(w)?));
            TeacherHead::Bf16(h.to_dtype(DType::F32)?, packed)
        } else {
            TeacherHead::Dense(h, w.clone())
        })
    }

    /// The logits `[1, len, V]` of rows `start..start + len`.
    fn logits(&self, start: usize, len: usize) -> Result<Tensor> {
        Ok(match self {
            TeacherHead::Dense(h, w) => {
                let z = matmul(&h.narrow(0, start, len)?, &w.t()?)?;
                z.reshape((1, len, w.dim(0)?))?
            }
            TeacherHead::Bf16(h, w) => {
                let z = w.forward(&h.narrow(0, start, len)?)?;
                z.reshape((1, len, w.0.dims().0))?
            }
        })
    }
}

/// The step's per-token tensors flattened to rows, cut into chunks.
struct Rows<'a> {
    ctx: &'a StepContext<'a>,
    n: usize,
    /// The teacher's head, when it handed it.
    teacher_head: Option<TeacherHead>,
}

impl<'a> Rows<'a> {
    fn new(ctx: &'a StepContext<'a>, n: usize) -> Result<Self> {
        let teacher_head = match ctx.teacher.and_then(Outputs::lm_head) {
            Some((h, w)) => {
                let ht = h.dim(2)?;
                Some(TeacherHead::new(h.reshape((n, ht))?, w)?)
            }
            None => None,
        };
        Ok(Rows { ctx, n, teacher_head })
    }

    /// `x [b, s, ...]` as `[1, len, ...]` for rows `start..start + len`.
    fn cut(&self, x: &Tensor, start: usize, len: usize) -> Result<Tensor> {
        let mut dims = x.dims()[2..].to_vec();
        let flat = x.reshape([vec![self.n], dims.clone()].concat())?;
        dims.insert(0, len);
        dims.insert(0, 1);
        Ok(flat.narrow(0, start, len)?.reshape(dims)?)
    }

    fn batch(&self, start: usize, len: usize) -> Result<Batch> {
        let b = self.ctx.batch;
        Ok(Batch {
            input_ids: self.cut(&b.input_ids, start, len)?,
            targets: self.cut(&b.targets, start, len)?,
            mask: None,
            source: None,
        })
    }

    /// The teacher's outputs for the chunk: its logits rows (made by its head when it handed
    /// it) and every other tap's rows.
    fn teacher(&self, start: usize, len: usize) -> Result<Option<Outputs>> {
        let Some(t) = self.ctx.teacher else {
            return Ok(None);
        };
        let logits = match &self.teacher_head {
            Some(head) => head.logits(start, len)?,
            None => self.cut(&t.logits, start, len)?,
        };
        let mut out = Outputs::logits_only(logits);
        for (name, tap) in &t.taps {
            if !name.starts_with("lm_head.") && tap.rank() >= 2 && tap.dims()[..2] == t.logits.dims()[..2] {
                out.taps.insert(name.clone(), self.cut(tap, start, len)?);
            }
        }
        Ok(Some(out))
    }
}

/// `d total / d zs` (`None` when `total` does not depend on `zs`): the loss kernels hand their
/// gradients of `zs` to a collector holding it (no zero-filled `[C, V]` sum), the rest of the
/// graph leaves its part in candle's store.
fn logits_grad(total: &Tensor, zs: &Tensor) -> Result<Option<Tensor>> {
    let collector = leaf_grads::LeafGrads::new([zs]);
    let mut store = collector.collecting(|| total.backward())?;
    Ok(match (collector.take(zs), store.remove(zs)) {
        (Some(a), Some(b)) => Some((a + b)?),
        (a, b) => a.or(b),
    })
}
