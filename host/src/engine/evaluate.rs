//! Evaluation on the validation windows: loss in nats/token, and for a student its top-1
//! agreement with the teacher and its mean KL(teacher || student) at temperature 1.

use candle_core::{DType, Tensor, D};

use retort_core::model::dense_from_topk;
use retort_core::taps::topk_tap;
use retort_core::{Batch, Result, TapSet, Teacher};
use retort_plugins::losses::ce::cross_entropy;
use retort_plugins::losses::kl::kl_per_token;

pub use crate::artifacts::report::EvalResult;
use crate::engine::parallel::World;

/// Loss cap for perplexity, in nats, so that reports never show infinity.
pub const PERPLEXITY_LOSS_CAP: f64 = 50.0;

/// Perplexity from a (capped) loss.
pub fn perplexity(loss: f64) -> f64 {
    if loss.is_nan() {
        return f64::NAN;
    }
    loss.min(PERPLEXITY_LOSS_CAP).exp()
}

/// The teacher's logits for evaluation figures on `batch`: its dense logits, or for a teacher
/// with only a top-`k` distribution (a cached teacher) the dense log-probabilities rebuilt with
/// the tail mass spread uniformly ([`retort_core::model::dense_from_topk`]): its val loss, KL
/// and top-1 agreement then refer to that reconstruction (top-1 is exact).
pub fn teacher_eval_logits(teacher: &dyn Teacher, batch: &Batch) -> Result<Tensor> {
    match teacher.sparse_topk() {
        None => Ok(teacher.forward(batch, &TapSet::none())?.logits),
        Some(k) => {
            let out = teacher.forward(batch, &[topk_tap(k)].into_iter().collect())?;
            dense_from_topk(
                out.tap(&format!("topk.{k}.ids"))?,
                out.tap(&format!("topk.{k}.logprobs"))?,
                teacher.vocab_size(),
            )
        }
    }
}

/// Evaluates a model given by `logits_of(index, batch)` on `batches`; with `teacher_logits` (one tensor per
/// batch) also agreement and KL.
pub fn evaluate(
    logits_of: &dyn Fn(usize, &Batch) -> Result<Tensor>,
    batches: &[Batch],
    teacher_logits: Option<&[Tensor]>,
) -> Result<EvalResult> {
    evaluate_in(logits_of, batches, teacher_logits, &World::single())
}

/// [`evaluate`] of the ranks of `world` together, each on its own `batches`: the sums of
/// every rank's batches make one result, the same on every rank.
pub fn evaluate_in(
    logits_of: &dyn Fn(usize, &Batch) -> Result<Tensor>,
    batches: &[Batch],
    teacher_logits: Option<&[Tensor]>,
    world: &World,
) -> Result<EvalResult> {
    let (mut nll, mut kl, mut agree, mut tokens) = (0.0f64, 0.0f64, 0.0f64, 0usize);
    for (i, batch) in batches.iter().enumerate() {
        let logits = logits_of(i, batch)?.detach();
        let (b, t) = batch.dims()?;
        let n = b * t;
        let mean = cross_entropy(&logits, &batch.targets, None, 0.0)?
            .to_dtype(DType::F64)?
            .to_scalar::<f64>()?;
        nll += mean * n as f64;
        if let Some(tl) = teacher_logits {
            let tl = &tl[i];
            kl += kl_per_token(&logits, tl, 1.0)?
                .to_dtype(DType::F64)?
                .sum_all()?
                .to_scalar::<f64>()?;
            let same = logits.argmax(D::Minus1)?.eq(&tl.argmax(D::Minus1)?)?;
            agree += same.to_dtype(DType::F64)?.sum_all()?.to_scalar::<f64>()?;
        }
        tokens += n;
    }
    let mut sums = [nll, kl, agree, tokens as f64];
    world.sum(&mut sums)?;
    let [nll, kl, agree, tokens] = sums;
    let tokens = tokens as usize;
    let denom = tokens.max(1) as f64;
    let val_loss = nll / denom;
    Ok(EvalResult {
        val_loss,
        perplexity: perplexity(val_loss),
        tokens,
        top1_agreement: teacher_logits.map(|_| agree / denom),
        kl_to_teacher: teacher_logits.map(|_| kl / denom),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn perplexity_is_capped() {
        assert!((perplexity(1.0) - std::f64::consts::E).abs() < 1e-12);
        assert!(perplexity(f64::INFINITY).is_finite());
    }

    #[test]
    fn uniform_logits_give_log_vocab_and_self_agreement() {
        let dev = Device::Cpu;
        let ids = Tensor::zeros((2, 3), DType::U32, &dev).expect("ids");
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        };
        let zeros = Tensor::zeros((2, 3, 5), DType::F32, &dev).expect("z");
        let peaked = Tensor::new(&[[[0f32, 0., 9., 0., 0.]; 3]; 2], &dev).expect("p");
        let r = evaluate(
            &|_, _| Ok(peaked.clone()),
            std::slice::from_ref(&batch),
            Some(std::slice::from_ref(&peaked)),
        )
        .expect("eval");
        assert_eq!(r.top1_agreement, Some(1.0));
        assert!(r.kl_to_teacher.expect("kl").abs() < 1e-6);
        let u = evaluate(&|_, _| Ok(zeros.clone()), std::slice::from_ref(&batch), None).expect("eval");
        assert!((u.val_loss - 5f64.ln()).abs() < 1e-6 && u.tokens == 6);
    }
}
