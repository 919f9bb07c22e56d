//! Vocabulary agreement between the data's tokenizer, the teacher and the student.
//!
//! - A checkpoint that carries its tokenizer (a GGUF file, a Hugging Face directory with
//!   `tokenizer.json`) must have been trained with the data's tokenizer: same identity (kind,
//!   size and a hash of the vocabulary), or assembly fails naming both sides.
//! - A model may have *more* output rows than the tokenizer has tokens (vocabularies padded to
//!   a multiple of 64 or 128 for fast kernels). Those rows are never a target and never an
//!   input, so the pipeline narrows the logits to the tokenizer's vocabulary explicitly, with a
//!   log line, before any loss sees them: softmaxes then run over real tokens only. Fewer rows
//!   than tokens is an error.

use candle_core::{Var, D};

use retort_core::model::dense_topk;
use retort_core::taps::{parse_topk_tap, LM_HEAD_WEIGHT};
use retort_core::{Batch, Decoder, Error, Model, ModelInfo, Outputs, Result, Student, TapSet, Teacher, Tokenizer};

/// What is known of the token ids a model's output rows stand for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RowProof {
    /// Built for this data (fresh, or trained by this run): rows past the data's vocabulary are
    /// padding no input or target ever uses.
    ThisData,
    /// Loaded from a checkpoint trained with the data's tokenizer (same identity).
    SameTokenizer,
    /// Loaded from a checkpoint that does not say which tokenizer it was trained with.
    Unknown,
}

/// Checks that `who`'s tokenizer (`identity`, when its checkpoint says) is the data's, and says
/// what that proves of its rows. A checkpoint that names no tokenizer is accepted with a
/// warning (its rows must then match the data's vocabulary exactly).
pub fn check_tokenizer(
    who: &str,
    identity: Option<String>,
    data: &dyn Tokenizer,
    from_checkpoint: bool,
) -> Result<RowProof> {
    match identity {
        Some(id) if id != data.identity() => Err(Error::Incompatible(format!(
            "the {who}'s tokenizer `{id}` (from its checkpoint) differs from the data's tokenizer `{}` \
             ({} tokens); tokenize the data with the {who}'s tokenizer, e.g. \
             data.tokenizer = {{ kind = \"hf\", path = \"<the {who} checkpoint>\" }}",
            data.identity(),
            data.vocab_size()
        ))),
        Some(_) => Ok(RowProof::SameTokenizer),
        None if from_checkpoint => {
            tracing::warn!(
                "the {who}'s checkpoint does not say which tokenizer it was trained with (no tokenizer.json \
                 or retort_tokenizer.json beside its weights): retort cannot check it against the data's"
            );
            Ok(RowProof::Unknown)
        }
        None => Ok(RowProof::ThisData),
    }
}

fn rows_check(who: &str, rows: usize, data_vocab: usize, proof: RowProof) -> Result<bool> {
    if rows < data_vocab {
        return Err(Error::Incompatible(format!(
            "the {who} has a vocabulary of {rows} tokens, the data's tokenizer has {data_vocab}"
        )));
    }
    if rows > data_vocab && proof == RowProof::Unknown {
        return Err(Error::Incompatible(format!(
            "the {who} has {rows} output rows, the data's tokenizer {data_vocab} tokens, and its checkpoint \
             does not say which tokenizer it was trained with: nothing proves that rows {data_vocab}..{rows} \
             are unused padding. Put the tokenizer.json it was trained with beside its weights, or \
             tokenize the data with it (data.tokenizer = {{ kind = \"hf\", path = ... }})"
        )));
    }
    if rows > data_vocab {
        tracing::info!(
            "the {who} has {rows} output rows for a tokenizer of {data_vocab} tokens (padded vocabulary): \
             its logits are narrowed to the first {data_vocab}"
        );
    }
    Ok(rows > data_vocab)
}

/// The teacher as the pipeline uses it: logits narrowed to `data_vocab` if padded (and `proof`
/// allows it).
pub fn fit_teacher(t: Box<dyn Teacher>, data_vocab: usize, proof: RowProof) -> Result<Box<dyn Teacher>> {
    if t.sparse_topk().is_some() {
        // A stored top-k cannot be narrowed; its vocabulary is checked against the data's.
        return Ok(t);
    }
    Ok(if rows_check("teacher", t.vocab_size(), data_vocab, proof)? {
        Box::new(NarrowedTeacher {
            inner: t,
            vocab: data_vocab,
        })
    } else {
        t
    })
}

/// The student as the pipeline uses it: logits narrowed to `data_vocab` if padded (and `proof`
/// allows it).
pub fn fit_student(s: Box<dyn Student>, data_vocab: usize, proof: RowProof) -> Result<Box<dyn Student>> {
    Ok(if rows_check("student", s.vocab_size(), data_vocab, proof)? {
        Box::new(NarrowedStudent {
            inner: s,
            vocab: data_vocab,
        })
    } else {
        s
    })
}

/// `out` narrowed to the first `vocab` outputs: its logits, or the rows of its head's weight when
/// it handed its head (the `lm_head` tap; logits `[b, s, 0]` then).
fn narrow(mut out: Outputs, vocab: usize) -> Result<Outputs> {
    match out.taps.get_mut(LM_HEAD_WEIGHT) {
        Some(w) => *w = w.narrow(0, 0, vocab)?,
        None => out.logits = out.logits.narrow(D::Minus1, 0, vocab)?,
    }
    Ok(out)
}

/// A teacher with a padded vocabulary, narrowed to the first `vocab` logits (top-k taps are
/// computed after narrowing).
pub struct NarrowedTeacher {
    inner: Box<dyn Teacher>,
    vocab: usize,
}

impl Teacher for NarrowedTeacher {
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs> {
        let inner_taps: TapSet = taps.iter().filter(|t| parse_topk_tap(t).is_none()).collect();
        let mut out = narrow(self.inner.forward(batch, &inner_taps)?, self.vocab)?;
        for k in taps.iter().filter_map(parse_topk_tap) {
            let (ids, logprobs) = dense_topk(&out.logits, k)?;
            out.taps.insert(format!("topk.{k}.ids"), ids);
            out.taps.insert(format!("topk.{k}.logprobs"), logprobs);
        }
        Ok(out)
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn context_len(&self) -> usize {
        self.inner.context_len()
    }
    fn num_params(&self) -> usize {
        self.inner.num_params()
    }
    fn available_taps(&self) -> Vec<String> {
        self.inner.available_taps()
    }
    fn supports_tap(&self, name: &str) -> bool {
        match parse_topk_tap(name) {
            Some(k) => k >= 1 && k <= self.vocab,
            None => self.inner.supports_tap(name),
        }
    }
    fn describe(&self) -> String {
        format!("{} (logits narrowed to {})", self.inner.describe(), self.vocab)
    }
    fn info(&self) -> ModelInfo {
        ModelInfo {
            vocab: self.vocab,
            ..self.inner.info()
        }
    }
    fn tokenizer_identity(&self) -> Option<String> {
        self.inner.tokenizer_identity()
    }
    fn decoder(&self) -> Option<Box<dyn Decoder + '_>> {
        NarrowedDecoder::wrap(self.inner.decoder()?, self.vocab)
    }
}

/// The decoder of a model with a padded vocabulary, its logits narrowed to the first `vocab`.
struct NarrowedDecoder<'a> {
    inner: Box<dyn Decoder + 'a>,
    vocab: usize,
}

impl<'a> NarrowedDecoder<'a> {
    fn wrap(inner: Box<dyn Decoder + 'a>, vocab: usize) -> Option<Box<dyn Decoder + 'a>> {
        Some(Box::new(NarrowedDecoder { inner, vocab }))
    }
}

impl Decoder for NarrowedDecoder<'_> {
    fn next_logits(&mut self, new: &candle_core::Tensor) -> Result<candle_core::Tensor> {
        Ok(self.inner.next_logits(new)?.narrow(D::Minus1, 0, self.vocab)?)
    }
}

/// A student with a padded vocabulary, narrowed to the first `vocab` logits (the padded rows
/// get no gradient from the logits; they are still saved).
pub struct NarrowedStudent {
    inner: Box<dyn Student>,
    vocab: usize,
}

impl Model for NarrowedStudent {
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs> {
        narrow(self.inner.forward(batch, taps)?, self.vocab)
    }
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn context_len(&self) -> usize {
        self.inner.context_len()
    }
    fn num_params(&self) -> usize {
        self.inner.num_params()
    }
    fn available_taps(&self) -> Vec<String> {
        self.inner.available_taps()
    }
    fn describe(&self) -> String {
        format!("{} (logits narrowed to {})", self.inner.describe(), self.vocab)
    }
    fn info(&self) -> ModelInfo {
        ModelInfo {
            vocab: self.vocab,
            ..self.inner.info()
        }
    }
    fn compute_dtype(&self) -> candle_core::DType {
        self.inner.compute_dtype()
    }
    fn tokenizer_identity(&self) -> Option<String> {
        self.inner.tokenizer_identity()
    }
    fn decoder(&self) -> Option<Box<dyn Decoder + '_>> {
        NarrowedDecoder::wrap(self.inner.decoder()?, self.vocab)
    }
}

impl Student for NarrowedStudent {
    fn vars(&self) -> Vec<(String, Var)> {
        self.inner.vars()
    }
    fn save(&self, dir: &std::path::Path) -> Result<()> {
        self.inner.save(dir)
    }
    fn config_json(&self) -> serde_json::Value {
        self.inner.config_json()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};
    use retort_core::{BuildContext, FrozenTeacher, Params, LM_HEAD_TAP};

    /// A transformer of 20 output rows, in f64.
    fn padded_student() -> Box<dyn Student> {
        let registry = crate::builtin_registry().expect("registry");
        let mut ctx = BuildContext::new(&registry, Device::Cpu, 3);
        ctx.vocab_size = Some(20);
        let params = serde_json::json!({"n_layer": 1, "n_embd": 8, "n_head": 2, "context": 8, "dtype": "f64"});
        let params = Params::new("student", params.as_object().expect("object").clone());
        registry.students.build("transformer", &params, &ctx).expect("student")
    }

    fn batch() -> Batch {
        let ids = Tensor::new(&[[1u32, 15, 7, 0]], &Device::Cpu).expect("ids");
        Batch {
            input_ids: ids.clone(),
            targets: ids,
            mask: None,
            source: None,
        }
    }

    #[test]
    fn a_narrowed_student_hands_the_first_rows_of_its_head() {
        let s = fit_student(padded_student(), 16, RowProof::ThisData).expect("fit");
        assert_eq!(s.vocab_size(), 16);
        retort_plugins::testing::check_lm_head_tap(s.as_ref(), &batch(), 1e-12);
    }

    #[test]
    fn padding_is_narrowed_only_when_the_rows_are_proven_unused() {
        let err = fit_student(padded_student(), 16, RowProof::Unknown)
            .err()
            .expect("refused");
        assert!(err.to_string().contains("nothing proves that rows 16..20"), "{err}");
        assert_eq!(err.exit_code(), 2);
        let t = Box::new(FrozenTeacher(padded_student()));
        assert!(fit_teacher(t, 16, RowProof::Unknown).is_err());
        assert!(
            fit_student(padded_student(), 20, RowProof::Unknown).is_ok(),
            "no padding: accepted"
        );
    }

    #[test]
    fn a_narrowed_teacher_hands_the_first_rows_of_its_head() {
        let t = fit_teacher(Box::new(FrozenTeacher(padded_student())), 16, RowProof::SameTokenizer).expect("fit");
        let head: TapSet = [LM_HEAD_TAP].into_iter().collect();
        let out = t.forward(&batch(), &head).expect("forward");
        let (_, w) = out.lm_head().expect("the head");
        assert_eq!(w.dims(), &[16, 8]);
        assert_eq!(out.logits.dims(), &[1, 4, 0]);
        let plain = t.forward(&batch(), &TapSet::none()).expect("forward");
        assert_eq!(plain.logits.dims(), &[1, 4, 16]);
    }
}
