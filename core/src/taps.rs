//! Taps: the named intermediate outputs a loss term asks a model for.
//!
//! Names: `logits` (always computed), `hidden.{i}` (the residual stream after block `i`,
//! `[batch, seq, width]`; `hidden.0` is the embedding output, so a model with `L` blocks has
//! `hidden.0 ..= hidden.L`), `attn.{i}` (attention probabilities of block `i`,
//! `[batch, heads, seq, seq]`), `topk.{k}` (a teacher's top-`k` next-token distribution in
//! sparse form: the request `topk.{k}` yields the tensors `topk.{k}.ids` `[batch, seq, k]` u32
//! and `topk.{k}.logprobs` `[batch, seq, k]`, log-probabilities at temperature 1, descending).
//! Models compute a tap only when the pipeline asked for it.

use std::collections::{BTreeMap, BTreeSet};

use candle_core::Tensor;

use crate::{Error, Result};

/// The tap asking a model for its output head's input instead of its logits, for losses fused
/// with the head (`kernels::lm_head`): the request `lm_head` yields `lm_head.hidden`
/// `[batch, seq, width]` (the head's input, after the final norm) and `lm_head.weight`
/// `[vocab, width]` (the head, `logits = hidden W^T`; a student's is its trainable tensor), and
/// the logits are then `[batch, seq, 0]`: never computed.
pub const LM_HEAD_TAP: &str = "lm_head";
/// The head's input, `[batch, seq, width]`, under the [`LM_HEAD_TAP`] request.
pub const LM_HEAD_HIDDEN: &str = "lm_head.hidden";
/// The head's weight, `[vocab, width]`, under the [`LM_HEAD_TAP`] request.
pub const LM_HEAD_WEIGHT: &str = "lm_head.weight";
/// Present (a rank-0 tensor, its value unused) beside [`LM_HEAD_WEIGHT`] when the model
/// multiplies its head in bf16 products (an f32 weight; both factors of every product rounded
/// to bf16, the sums f32: a bf16 mixed-precision student on the CPU), so that the fused losses
/// multiply it the same way.
pub const LM_HEAD_BF16_PRODUCTS: &str = "lm_head.bf16_products";

/// The tap name requesting a teacher's top-`k` distribution.
pub fn topk_tap(k: usize) -> String {
    format!("topk.{k}")
}

/// `Some(k)` for a tap name `topk.{k}`.
pub fn parse_topk_tap(name: &str) -> Option<usize> {
    name.strip_prefix("topk.")?.parse().ok()
}

/// The set of tap names a forward pass must produce (besides `logits`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TapSet(BTreeSet<String>);

impl TapSet {
    /// No taps: logits only.
    pub fn none() -> Self {
        TapSet::default()
    }

    /// Adds a tap name.
    pub fn insert(&mut self, name: impl Into<String>) {
        self.0.insert(name.into());
    }

    /// Whether `name` was asked for.
    pub fn contains(&self, name: &str) -> bool {
        self.0.contains(name)
    }

    /// Whether the hidden state after block `layer` was asked for.
    pub fn wants_hidden(&self, layer: usize) -> bool {
        self.0.contains(&format!("hidden.{layer}"))
    }

    /// Whether the attention probabilities of block `layer` were asked for.
    pub fn wants_attention(&self, layer: usize) -> bool {
        self.0.contains(&format!("attn.{layer}"))
    }

    /// Iterates over the names.
    pub fn iter(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(String::as_str)
    }

    /// Whether no tap besides logits is wanted.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl<S: Into<String>> FromIterator<S> for TapSet {
    fn from_iter<I: IntoIterator<Item = S>>(iter: I) -> Self {
        TapSet(iter.into_iter().map(Into::into).collect())
    }
}

/// What a forward pass returns: logits `[batch, seq, vocab]` and the taps asked for.
#[derive(Debug, Clone)]
pub struct Outputs {
    /// Next-token logits, `[batch, seq, vocab]`.
    pub logits: Tensor,
    /// Named intermediate tensors.
    pub taps: BTreeMap<String, Tensor>,
}

impl Outputs {
    /// Outputs with logits only.
    pub fn logits_only(logits: Tensor) -> Self {
        Outputs {
            logits,
            taps: BTreeMap::new(),
        }
    }

    /// The tap `name`, or an error saying which taps exist.
    pub fn tap(&self, name: &str) -> Result<&Tensor> {
        if name == "logits" {
            return Ok(&self.logits);
        }
        self.taps.get(name).ok_or_else(|| {
            let have: Vec<&str> = self.taps.keys().map(String::as_str).collect();
            Error::Runtime(format!(
                "tap `{name}` was not computed (computed: logits{}{})",
                if have.is_empty() { "" } else { ", " },
                have.join(", ")
            ))
        })
    }

    /// `(hidden [batch, seq, width], weight [vocab, width])` of the output head, when the
    /// forward pass was asked for [`LM_HEAD_TAP`].
    pub fn lm_head(&self) -> Option<(&Tensor, &Tensor)> {
        Some((self.taps.get(LM_HEAD_HIDDEN)?, self.taps.get(LM_HEAD_WEIGHT)?))
    }

    /// Whether the head handed under [`LM_HEAD_TAP`] multiplies in bf16 products (see
    /// [`LM_HEAD_BF16_PRODUCTS`]).
    pub fn lm_head_bf16_products(&self) -> bool {
        self.taps.contains_key(LM_HEAD_BF16_PRODUCTS)
    }

    /// The same outputs cut off from the autograd graph (for frozen teachers).
    pub fn detach(self) -> Self {
        Outputs {
            logits: self.logits.detach(),
            taps: self.taps.into_iter().map(|(k, v)| (k, v.detach())).collect(),
        }
    }
}
