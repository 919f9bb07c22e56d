//! Which path a phase's objective takes to the logits: fused with the student's output head,
//! in chunks of tokens (`kernels::lm_head`), or the full `[tokens, vocabulary]` logits.

use std::fmt;

use retort_core::config::LmHeadSpec;
use retort_core::{Router, LM_HEAD_TAP};
use retort_plugins::kernels::lm_head::chunk_tokens;

use super::TermSlot;

/// The path of a phase's logit terms.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeadPath {
    /// Fused with the student's head, `chunk` tokens at a time.
    Fused {
        /// Tokens per chunk.
        chunk: usize,
    },
    /// The full logits, and why.
    Full(String),
}

impl HeadPath {
    /// The path for `terms` weighed by `router`, for a student whose taps are `student_taps`
    /// and whose vocabulary is `vocab`, on micro-batches of `tokens`, under `spec`
    /// (`train.lm_head`). Fused only where it chunks: a micro-batch whose logits fit in one
    /// chunk of the automatic size takes the full path (the same products, less bookkeeping).
    pub fn choose(
        spec: &LmHeadSpec,
        terms: &[TermSlot],
        router: &dyn Router,
        student_taps: &[String],
        vocab: usize,
        tokens: usize,
    ) -> Self {
        if !spec.fused {
            return HeadPath::Full("train.lm_head.fused = false".into());
        }
        if let Some(t) = terms.iter().find(|t| !t.term.per_token_form()) {
            return HeadPath::Full(format!("term `{}` is not a per-token logit term", t.name));
        }
        if router.reads_step_outputs() {
            return HeadPath::Full("the router weighs by the step's term values or logits".into());
        }
        if !student_taps.iter().any(|t| t == LM_HEAD_TAP) {
            return HeadPath::Full("the student does not hand out its output head".into());
        }
        let chunk = chunk_tokens(spec.chunk_tokens, vocab);
        if spec.chunk_tokens == 0 && tokens <= chunk {
            return HeadPath::Full(format!(
                "a micro-batch's {tokens} x {vocab} logits fit in one chunk; set train.lm_head.chunk_tokens to fuse"
            ));
        }
        HeadPath::Fused { chunk }
    }
}

impl fmt::Display for HeadPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HeadPath::Fused { chunk } => write!(
                f,
                "fused with the student's output head, {chunk} tokens per chunk (train.lm_head)"
            ),
            HeadPath::Full(why) => write!(f, "full [tokens, vocabulary] logits ({why})"),
        }
    }
}
