//! `topk_kl`: KL on the teacher's top-`k` tokens (sparse / subset distillation; the form used
//! with stored top-k teacher logits, e.g. by DistillKit and in Raman et al. 2023).
//!
//! The teacher provides the sparse tap `topk.{k}`: ids `S` and log-probs `log p_t(v)`, `v in S`,
//! at temperature 1 (a dense teacher computes it from its logits; a cached teacher reads it).
//! The student's log-probs `log p_s = log_softmax(z_s / T)` are gathered at `S`. Tail handling:
//!
//! - `tail = "bucket"` (default): the mass outside `S` is one more outcome,
//!   `L = sum_{v in S} p_t (log p_t - log p_s) + m_t (log m_t - log m_s)`, with
//!   `m = 1 - sum_{v in S} p` (clamped at 1e-12). Exact when `S` is the whole vocabulary.
//!   At `T != 1` the teacher's `k + 1` outcomes are tempered together, the bucket as if it were
//!   one token (`log p_T(v) = log p_t(v) / T - log(sum_S p_t^(1/T) + m^(1/T))`), and the
//!   student's bucket is its tempered mass outside `S`. The true tempered tail,
//!   `sum_{v not in S} p_t(v)^(1/T)`, is at least `m^(1/T)`: the bucket under-weights it at
//!   `T > 1` (exactly right at `T = 1`, or when the tail is one token).
//! - `tail = "renormalize"`: drop the tail and renormalise both sides over `S`,
//!   `L = KL(softmax_S(log p_t / T) || softmax_S(log p_s))`.
//! - `tail = "uniform"`: rebuild a full teacher distribution by spreading the tail mass evenly
//!   over the `V - k` other tokens, `log p~_t(v) = log(m_t / (V - k))` for `v` not in `S`, then
//!   temper both sides: `L = KL(softmax(log p~_t / T) || softmax(z_s / T))`. With
//!   `u` the tempered tail probability of one token,
//!   `L = sum_{v in S} p_v (log p_v - log p_s(v)) + (V - k) u log u - u sum_{v not in S} log p_s(v)`,
//!   computed from the student's row sums without a dense teacher tensor. Composite path
//!   only. Spreading evenly maximises `sum_{v not in S} p^(1/T)`, so at `T > 1` this
//!   over-weights the tail (SmolLM2, top-64 of 49,152, `T = 2`: 93% of the target's mass on
//!   the tail against 82% for the true tempered teacher; the tempered bucket puts 7% there).
//!   It is what `kl` computes against a cached (top-k only) teacher.
//!
//! With `union_student = true` the set is `S` joined with the student's own top-`k` (duplicates
//! counted once; the teacher's log-probs there come from its dense logits), so the student is
//! also corrected where it puts mass the teacher's top-k does not cover.
//!
//! Then the mean over counted tokens, times `T^2` if `scale_by_t2` (default true). The term's own
//! tensors are `[tokens, k]`: besides the student's dense logits (inherent), it never builds a
//! dense `[tokens, vocab]` teacher tensor.
//!
//! ```toml
//! [[loss]]
//! kind = "topk_kl"
//! k = 64
//! tail = "bucket"
//! ```

use candle_core::{DType, Tensor, D};
use serde::Deserialize;

use retort_core::model::dense_topk;
use retort_core::registry::Factory;
use retort_core::taps::topk_tap;
use retort_core::{ops, BuildContext, Error, LossTerm, Params, Progress, Result, ScalarSpec, StepContext};

use super::as_float;
use super::logit::{one, yes, Tempered};
use crate::kernels::topk_divergence::{self, composite, TopkTail};

/// Params of `topk_kl`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TopkParams {
    /// Teacher tokens kept per position. Default 64.
    #[serde(default = "d_k")]
    pub k: usize,
    /// `"bucket"` (default) or `"renormalize"`.
    #[serde(default = "d_tail")]
    pub tail: String,
    /// Temperature `T > 0` (must be 1 with `tail = "bucket"`). Default 1.0.
    #[serde(default = "one")]
    pub temperature: ScalarSpec,
    /// Multiply by `T^2`. Default true.
    #[serde(default = "yes")]
    pub scale_by_t2: bool,
    /// Also keep the student's own top-k tokens (needs a teacher with dense logits). Default false.
    #[serde(default)]
    pub union_student: bool,
    /// Use the fused CPU kernel (default true); `false` composes candle ops.
    #[serde(default = "yes")]
    pub fused: bool,
}

fn d_k() -> usize {
    64
}
fn d_tail() -> String {
    "bucket".into()
}

/// Tail treatment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tail {
    /// The tail is one extra outcome.
    Bucket,
    /// The tail is dropped, both sides renormalised over the top-k.
    Renormalize,
    /// The tail mass is spread uniformly over the other `V - k` tokens.
    Uniform,
}

impl Tail {
    /// The tail of the top-k KL op (`kernels::topk_divergence`), which has no uniform form.
    fn of_op(self) -> Option<TopkTail> {
        match self {
            Tail::Bucket => Some(TopkTail::Bucket),
            Tail::Renormalize => Some(TopkTail::Renormalize),
            Tail::Uniform => None,
        }
    }
}

/// Top-k KL.
pub struct TopkKl {
    k: usize,
    union_student: bool,
    tail: Tail,
    tempered: Tempered,
    fused: bool,
}

const EPS: f64 = 1e-12;

/// Per-token top-k KL from the student's full log-probs `ls_full` `[.., V]` (already tempered)
/// and the teacher's sparse `ids`, `lpt` `[.., n]`; `valid` (1/0, `[.., n]`) drops entries
/// (duplicates in a union of id sets). Bucket and renormalize are the top-k KL op's composite
/// (`kernels::topk_divergence::composite`); uniform is `uniform_per_token` below.
pub fn topk_per_token(
    ls_full: &Tensor,
    ids: &Tensor,
    lpt: &Tensor,
    valid: Option<&Tensor>,
    tail: Tail,
    t: f64,
) -> Result<Tensor> {
    match tail.of_op() {
        Some(tail) => Ok(composite::from_log_probs(ls_full, ids, lpt, valid, tail, t)?),
        None => uniform_per_token(ls_full, ids, lpt, valid, t),
    }
}

/// The uniform tail of [`topk_per_token`] (see the module doc): the teacher's tail mass spread
/// evenly over the `V - k` other tokens, both sides tempered.
fn uniform_per_token(ls_full: &Tensor, ids: &Tensor, lpt: &Tensor, valid: Option<&Tensor>, t: f64) -> Result<Tensor> {
    if valid.is_some() {
        return Err(Error::Runtime(
            "topk_kl: tail = \"uniform\" does not combine with union_student".into(),
        ));
    }
    let ls = ls_full.contiguous()?.gather(&ids.contiguous()?, D::Minus1)?;
    let lpt = lpt.to_dtype(ls.dtype())?;
    let v = ls_full.dim(D::Minus1)?;
    let k = lpt.dim(D::Minus1)?;
    let a = (&lpt / t)?;
    if v == k {
        let lt = ops::log_softmax(&a)?;
        return Ok((lt.exp()? * (&lt - &ls)?)?.sum(D::Minus1)?);
    }
    let n_tail = (v - k) as f64;
    let m = lpt.exp()?.sum_keepdim(D::Minus1)?.affine(-1.0, 1.0)?.maximum(EPS)?;
    // Tempered tail log-weight of one token, and the normaliser over all V tokens.
    let a_tail = ((m / n_tail)?.log()? / t)?;
    let all = Tensor::cat(&[&a, &(&a_tail + n_tail.ln())?], D::Minus1)?;
    let max = all.max_keepdim(D::Minus1)?;
    let log_z = (all.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    let lt = a.broadcast_sub(&log_z)?;
    let lu = (&a_tail - &log_z)?;
    let u = lu.exp()?;
    let head = (lt.exp()? * (&lt - &ls)?)?.sum(D::Minus1)?;
    let ls_tail_sum = (ls_full.sum_keepdim(D::Minus1)? - ls.sum_keepdim(D::Minus1)?)?;
    let tail = ((&u * (&lu * n_tail)?)? - (&u * ls_tail_sum)?)?.squeeze(D::Minus1)?;
    Ok((head + tail)?)
}

/// Teacher log-probs `lpt` `[.., k]` (temperature 1) tempered at `t` together with their tail
/// bucket `m = 1 - sum exp(lpt)` taken as one outcome:
/// `log p_T(v) = lpt_v / t - log(sum_S exp(lpt / t) + m^(1/t))`. The bucket's own tempered mass
/// is what remains, `1 - sum exp(log p_T)`.
pub fn temper_with_bucket(lpt: &Tensor, t: f64) -> Result<Tensor> {
    let lpt = lpt.to_dtype(if lpt.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    })?;
    let m = lpt.exp()?.sum_keepdim(D::Minus1)?.affine(-1.0, 1.0)?.maximum(EPS)?;
    let all = Tensor::cat(&[&(&lpt / t)?, &(m.log()? / t)?], D::Minus1)?;
    let max = all.max_keepdim(D::Minus1)?;
    let log_z = (all.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + &max)?;
    Ok((&lpt / t)?.broadcast_sub(&log_z)?)
}

/// The union of the teacher's top-k ids with the student's top-k: ids, teacher log-probs and a
/// validity mask (student ids already among the teacher's are dropped). Needs dense teacher
/// logits for the teacher's log-probs at the student's ids.
pub fn union_with_student(
    student_logits: &Tensor,
    teacher_logits: &Tensor,
    ids: &Tensor,
    lpt: &Tensor,
    k: usize,
) -> Result<(Tensor, Tensor, Tensor)> {
    if student_logits.dims() != teacher_logits.dims() {
        return Err(Error::Runtime(format!(
            "topk_kl with union_student needs the teacher's dense logits (student {:?}, teacher {:?})",
            student_logits.dims(),
            teacher_logits.dims()
        )));
    }
    let (sids, _) = dense_topk(&student_logits.detach(), k)?;
    let lt_full = ops::log_softmax(&as_float(teacher_logits)?)?;
    let lpt_s = lt_full.contiguous()?.gather(&sids, D::Minus1)?.to_dtype(lpt.dtype())?;
    let dup = sids
        .unsqueeze(D::Minus1)?
        .broadcast_eq(&ids.unsqueeze(D::Minus2)?)?
        .to_dtype(DType::F32)?
        .sum(D::Minus1)?;
    let valid_s = dup.minimum(1.0)?.affine(-1.0, 1.0)?;
    let ids_u = Tensor::cat(&[ids, &sids], D::Minus1)?;
    let lpt_u = Tensor::cat(&[lpt, &lpt_s], D::Minus1)?;
    let valid = Tensor::cat(&[&valid_s.ones_like()?, &valid_s], D::Minus1)?;
    Ok((ids_u, lpt_u, valid))
}

impl LossTerm for TopkKl {
    fn compute(&self, ctx: &StepContext) -> Result<Tensor> {
        ctx.scaled_token_mean(self.per_token(ctx)?)
    }
    fn per_token_form(&self) -> bool {
        true
    }
    fn per_token(&self, ctx: &StepContext) -> Result<(Tensor, f64)> {
        let teacher = ctx
            .teacher
            .ok_or_else(|| Error::Runtime("topk_kl needs teacher outputs".into()))?;
        let ids = teacher.tap(&format!("topk.{}.ids", self.k))?;
        let lpt = teacher.tap(&format!("topk.{}.logprobs", self.k))?;
        let t = self.tempered.temperature(ctx.progress);
        let zs = as_float(&ctx.student.logits)?;
        // A tempered bucket: the teacher's k + 1 outcomes tempered and renormalised, after which
        // the T = 1 bucket formula (teacher side) applies unchanged.
        let tempered_lpt;
        let lpt = if self.tail == Tail::Bucket && t != 1.0 {
            tempered_lpt = temper_with_bucket(lpt, t)?;
            &tempered_lpt
        } else {
            lpt
        };
        if let Some(tail) = self.tail.of_op().filter(|_| self.fused) {
            let per_token = if self.union_student {
                let (ids, lpt, valid) = union_with_student(&ctx.student.logits, &teacher.logits, ids, lpt, self.k)?;
                // The op skips entries whose teacher log-prob is -inf.
                let lpt = lpt.to_dtype(zs.dtype())?;
                let skip = Tensor::full(f64::NEG_INFINITY, lpt.dims(), lpt.device())?.to_dtype(zs.dtype())?;
                let lpt = valid.ne(0.0)?.where_cond(&lpt, &skip)?;
                topk_divergence::per_token(&zs, &ids, &lpt, tail, t)?
            } else {
                topk_divergence::per_token(&zs, ids, lpt, tail, t)?
            };
            return Ok((per_token, self.tempered.scale(t)));
        }
        let ls_full = ops::log_softmax(&(as_float(&ctx.student.logits)? / t)?)?;
        let per_token = if self.union_student {
            let (ids, lpt, valid) = union_with_student(&ctx.student.logits, &teacher.logits, ids, lpt, self.k)?;
            topk_per_token(&ls_full, &ids, &lpt, Some(&valid), self.tail, t)?
        } else {
            topk_per_token(&ls_full, ids, lpt, None, self.tail, t)?
        };
        Ok((per_token, self.tempered.scale(t)))
    }
    fn needs_teacher(&self) -> bool {
        true
    }
    fn needs_teacher_logits(&self) -> bool {
        self.union_student
    }
    fn teacher_taps(&self) -> Vec<String> {
        vec![topk_tap(self.k)]
    }
    fn scalars(&self, progress: Progress) -> Vec<(String, f64)> {
        self.tempered.scalars(progress)
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn LossTerm>> {
    let p: TopkParams = params.parse()?;
    if p.k == 0 {
        return Err(params.error("k", "expected an integer >= 1, got 0"));
    }
    if let Some(v) = ctx.vocab_size.filter(|v| p.k > *v) {
        return Err(params.error("k", format!("k = {} exceeds the vocabulary of {v}", p.k)));
    }
    let tail = match p.tail.as_str() {
        "bucket" => Tail::Bucket,
        "renormalize" => Tail::Renormalize,
        "uniform" => Tail::Uniform,
        other => {
            return Err(params.error(
                "tail",
                format!("expected \"bucket\", \"renormalize\" or \"uniform\", got \"{other}\""),
            ))
        }
    };
    if tail == Tail::Uniform && p.union_student {
        return Err(params.error("union_student", "does not combine with tail = \"uniform\""));
    }
    let tempered = Tempered::new(params, ctx, &p.temperature, p.scale_by_t2)?;
    if tail == Tail::Bucket && p.union_student {
        let t = p.temperature.build(&params.key_path("temperature"), ctx)?;
        t.check(
            &params.key_path("temperature"),
            |v| v == 1.0,
            "1.0 with tail = \"bucket\" and union_student (use \"renormalize\" to temper)",
        )?;
    }
    Ok(Box::new(TopkKl {
        k: p.k,
        union_student: p.union_student,
        tail,
        tempered,
        fused: p.fused,
    }))
}

impl TopkKl {
    /// `kl` against a teacher that has only its top-`k` (a cached teacher): the uniform-tail
    /// reconstruction at the term's temperature.
    pub fn sparse_kl(k: usize, tempered: Tempered) -> Self {
        TopkKl {
            k,
            union_student: false,
            tail: Tail::Uniform,
            tempered,
            fused: false,
        }
    }
}

inventory::submit! {
    Factory::<dyn LossTerm> {
        kind: "topk_kl",
        description: "KL on the teacher's top-k tokens, tail as one bucket or renormalised; cost scales with k",
        build, params: retort_core::registry::params_schema::<TopkParams> }
}

#[cfg(test)]
mod tests {
    use super::super::logit::testutil::*;
    use super::*;
    use candle_core::{DType, Device, Var};
    use retort_core::{Batch, Outputs};

    fn term_value(term: &dyn LossTerm, zs: &Tensor, k: usize) -> Tensor {
        let zt = Tensor::new(&[ZT], &Device::Cpu).expect("zt");
        let (ids, lp) = dense_topk(&zt, k).expect("topk");
        let mut t = Outputs::logits_only(zt);
        t.taps.insert(format!("topk.{k}.ids"), ids);
        t.taps
            .insert(format!("topk.{k}.logprobs"), lp.to_dtype(DType::F64).expect("f64"));
        let ids = Tensor::zeros((1, 2), DType::U32, &Device::Cpu).expect("ids");
        let batch = Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        };
        let s = Outputs::logits_only(zs.clone());
        term.compute(&StepContext {
            batch: &batch,
            student: &s,
            teacher: Some(&t),
            progress: Progress::new(0, 1),
            token_weights: None,
        })
        .expect("compute")
    }

    /// Reference in f64 for rows of ZS/ZT: top-k set of the teacher, then bucket or renormalised KL.
    fn reference_topk(k: usize, tail: Tail, t: f64) -> f64 {
        let mut total = 0.0;
        for r in 0..2 {
            let lt1 = logsm(&ZT[r], 1.0);
            let ls = logsm(&ZS[r], t);
            let mut order: Vec<usize> = (0..4).collect();
            order.sort_by(|a, b| lt1[*b].total_cmp(&lt1[*a]));
            let s = &order[..k];
            total += match tail {
                Tail::Bucket => {
                    // The k teacher entries and the tail bucket, tempered together.
                    let mt = (1.0 - s.iter().map(|&v| lt1[v].exp()).sum::<f64>()).max(1e-12);
                    let z = s.iter().map(|&v| (lt1[v] / t).exp()).sum::<f64>() + (mt.ln() / t).exp();
                    let ms = 1.0 - s.iter().map(|&v| ls[v].exp()).sum::<f64>();
                    let head: f64 = s
                        .iter()
                        .map(|&v| {
                            let p = (lt1[v] / t).exp() / z;
                            p * (p.ln() - ls[v])
                        })
                        .sum();
                    let pb = (mt.ln() / t).exp() / z;
                    head + if ms > 0.0 && mt > 1e-11 {
                        pb * (pb / ms).ln()
                    } else {
                        0.0
                    }
                }
                Tail::Renormalize => {
                    let zt: f64 = s.iter().map(|&v| (lt1[v] / t).exp()).sum();
                    let zs: f64 = s.iter().map(|&v| ls[v].exp()).sum();
                    s.iter()
                        .map(|&v| {
                            let pt = (lt1[v] / t).exp() / zt;
                            let ps = ls[v].exp() / zs;
                            pt * (pt / ps).ln()
                        })
                        .sum()
                }
                Tail::Uniform => unreachable!("checked against the dense reconstruction instead"),
            };
        }
        t * t * total / 2.0
    }

    #[test]
    fn matches_reference_values() {
        let zs = Tensor::new(&[ZS], &Device::Cpu).expect("zs");
        for (k, tail, t) in [
            (2, "bucket", 1.0),
            (3, "bucket", 1.0),
            (2, "bucket", 2.0),
            (3, "bucket", 0.5),
            (2, "renormalize", 2.0),
            (4, "renormalize", 1.0),
        ] {
            let term = build_term(
                super::build,
                serde_json::json!({"k": k, "tail": tail, "temperature": t}),
            )
            .expect("build");
            let got = term_value(term.as_ref(), &zs, k).to_scalar::<f64>().expect("s");
            let tl = if tail == "bucket" {
                Tail::Bucket
            } else {
                Tail::Renormalize
            };
            let want = reference_topk(k, tl, t);
            assert!((got - want).abs() < 1e-6, "k={k} {tail} T={t}: {got} vs {want}");
        }
        // With k = V the bucket form is the full forward KL.
        let term = build_term(super::build, serde_json::json!({"k": 4})).expect("build");
        let full = reference(1.0, |ls, lt| (0..4).map(|v| lt[v].exp() * (lt[v] - ls[v])).sum());
        assert!((term_value(term.as_ref(), &zs, 4).to_scalar::<f64>().expect("s") - full).abs() < 1e-6);
    }

    #[test]
    fn gradient_matches_finite_difference() {
        for (tail, t) in [("bucket", 1.0), ("bucket", 2.0), ("renormalize", 1.5)] {
            let term = build_term(
                super::build,
                serde_json::json!({"k": 2, "tail": tail, "temperature": t}),
            )
            .expect("b");
            let zs = Var::new(&[ZS], &Device::Cpu).expect("var");
            let g = term_value(term.as_ref(), zs.as_tensor(), 2).backward().expect("bwd");
            let g: Vec<f64> = g
                .get(zs.as_tensor())
                .expect("g")
                .flatten_all()
                .expect("f")
                .to_vec1()
                .expect("v");
            let base: Vec<f64> = ZS.iter().flatten().copied().collect();
            for i in 0..base.len() {
                let f = |d: f64| {
                    let mut w = base.clone();
                    w[i] += d;
                    let x = Tensor::from_vec(w, (1, 2, 4), &Device::Cpu).expect("t");
                    term_value(term.as_ref(), &x, 2).to_scalar::<f64>().expect("s")
                };
                let num = (f(1e-6) - f(-1e-6)) / 2e-6;
                assert!((num - g[i]).abs() < 1e-6, "{tail}[{i}]: {num} vs {}", g[i]);
            }
        }
    }

    #[test]
    fn union_with_student_counts_each_id_once() {
        let dev = Device::Cpu;
        let zs_v = [0.2f64, 1.5, -0.3, 0.8];
        let zt_v = [1.0f64, -0.5, 2.0, 0.1];
        let zs = Var::new(&[[zs_v]], &dev).expect("zs");
        let zt = Tensor::new(&[[zt_v]], &dev).expect("zt");
        let logsm1 = |z: &[f64; 4]| {
            let lse = z.iter().map(|x| x.exp()).sum::<f64>().ln();
            z.map(|x| x - lse)
        };
        let (ls, lt) = (logsm1(&zs_v), logsm1(&zt_v));
        // k = 1: teacher's top id 2, student's top id 1 -> union {2, 1}.
        // Reference (bucket): sum_{v in {1,2}} p_t (log p_t - log p_s) + m_t ln(m_t / m_s).
        let set = [2usize, 1];
        let head: f64 = set.iter().map(|&v| lt[v].exp() * (lt[v] - ls[v])).sum();
        let mt = 1.0 - set.iter().map(|&v| lt[v].exp()).sum::<f64>();
        let ms = 1.0 - set.iter().map(|&v| ls[v].exp()).sum::<f64>();
        let want = head + mt * (mt / ms).ln();
        let f = |x: &Tensor| {
            let (ids, lp) = dense_topk(&zt, 1).expect("topk");
            let lp = lp.to_dtype(DType::F64).expect("f64");
            let (ids, lp, valid) = union_with_student(x, &zt, &ids, &lp, 1).expect("union");
            let ls_full = ops::log_softmax(x).expect("lsm");
            topk_per_token(&ls_full, &ids, &lp, Some(&valid), Tail::Bucket, 1.0)
                .expect("kl")
                .sum_all()
                .expect("s")
        };
        let got = f(zs.as_tensor());
        assert!(
            (got.to_scalar::<f64>().expect("s") - want).abs() < 1e-6,
            "{got} vs {want}"
        );
        // When the student's top-1 is the teacher's (here: the student is the teacher), the
        // duplicate id is dropped.
        let (ids, lp) = dense_topk(&zt, 1).expect("topk");
        let (_, _, valid) = union_with_student(&zt, &zt, &ids, &lp, 1).expect("union");
        assert_eq!(
            valid.flatten_all().expect("f").to_vec1::<f32>().expect("v"),
            vec![1.0, 0.0]
        );
        // Gradient through the union path.
        let g = got.backward().expect("bwd");
        let g: Vec<f64> = g
            .get(zs.as_tensor())
            .expect("g")
            .flatten_all()
            .expect("f")
            .to_vec1()
            .expect("v");
        for i in 0..4 {
            let val = |d: f64| {
                let mut w = zs_v;
                w[i] += d;
                f(&Tensor::new(&[[w]], &dev).expect("t")).to_scalar::<f64>().expect("s")
            };
            let num = (val(1e-6) - val(-1e-6)) / 2e-6;
            assert!((num - g[i]).abs() < 1e-5, "[{i}]: {num} vs {}", g[i]);
        }
    }

    #[test]
    fn fused_matches_composite_with_weights_mask_and_temperature() {
        for p in [
            serde_json::json!({"k": 16}),
            serde_json::json!({"k": 16, "temperature": 2.0}),
            serde_json::json!({"k": 16, "tail": "renormalize", "temperature": 2.0}),
            serde_json::json!({"k": 16, "union_student": true}),
            serde_json::json!({"k": 16, "tail": "renormalize", "union_student": true, "temperature": 0.5}),
        ] {
            check_fused_matches_composite(super::build, p);
        }
    }

    #[test]
    fn bucket_with_union_needs_unit_temperature() {
        assert!(build_term(super::build, serde_json::json!({"k": 2, "temperature": 2.0})).is_ok());
        let err = build_term(
            super::build,
            serde_json::json!({"k": 2, "temperature": 2.0, "union_student": true}),
        )
        .err()
        .expect("must fail");
        assert!(
            err.to_string().contains("loss[0].temperature") && err.to_string().contains("renormalize"),
            "{err}"
        );
        assert!(build_term(super::build, serde_json::json!({"k": 0})).is_err());
    }

    #[test]
    fn uniform_tail_equals_dense_kl_to_the_reconstructed_teacher_and_has_its_gradient() {
        use retort_core::model::dense_from_topk;
        let zt = Tensor::new(&[ZT], &Device::Cpu).expect("zt");
        for (k, t) in [(1, 1.0), (2, 2.0), (3, 0.7), (4, 1.5)] {
            let (ids, lpt) = dense_topk(&zt, k).expect("topk");
            let lpt = lpt.to_dtype(DType::F64).expect("f64");
            let dense_teacher = dense_from_topk(&ids, &lpt, 4).expect("dense");
            let zs = Var::new(&[ZS], &Device::Cpu).expect("zs");
            // The reference: the dense KL to the uniform-tail reconstruction, composite.
            let (ls, lt) = super::super::logit::tempered_log_probs(zs.as_tensor(), &dense_teacher, t).expect("lp");
            let want = super::super::kl::forward_kl_from_log_probs(&ls, &lt).expect("kl");
            let ls_full = ops::log_softmax(&(zs.as_tensor() / t).expect("div")).expect("ls");
            let got = topk_per_token(&ls_full, &ids, &lpt, None, Tail::Uniform, t).expect("uniform");
            let (w, g): (Vec<f64>, Vec<f64>) = (
                want.flatten_all().expect("f").to_vec1().expect("v"),
                got.flatten_all().expect("f").to_vec1().expect("v"),
            );
            for (a, b) in w.iter().zip(&g) {
                assert!((a - b).abs() < 1e-10, "k={k} T={t}: {a} vs {b}");
            }
            let gw = want.sum_all().expect("s").backward().expect("b");
            let gg = got.sum_all().expect("s").backward().expect("b");
            let diff = (gw.get(&zs).expect("gw") - gg.get(&zs).expect("gg"))
                .expect("d")
                .abs()
                .expect("a")
                .max_all()
                .expect("m")
                .to_scalar::<f64>()
                .expect("s");
            assert!(diff < 1e-10, "k={k} T={t}: gradient differs by {diff}");
        }
        // The kl term against a top-k-only teacher is this form.
        let reg = retort_core::Registry::empty();
        let mut ctx = BuildContext::new(&reg, Device::Cpu, 0);
        ctx.teacher_topk = Some(2);
        let term = super::super::kl::build_for_test(
            &Params::new(
                "loss[0]",
                serde_json::from_value(serde_json::json!({"temperature": 2.0})).expect("m"),
            ),
            &ctx,
        )
        .expect("kl");
        assert!(!term.needs_teacher_logits());
        assert_eq!(term.teacher_taps(), vec!["topk.2".to_string()]);
    }
}
