//! retort's contracts for [`Llama`]: [`Model`] (a forward pass over a batch, shape facts, a
//! description) and [`Student`] (the trainable variables, saved in Hugging Face layout by
//! [`save_hf`]).

use std::path::Path;

use candle_core::Var;

use retort_core::{Batch, Model, ModelInfo, Outputs, Result, Student, TapSet};

use super::checkpoint::save_hf;
use super::model::Llama;

impl Model for Llama {
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs> {
        self.forward_ids(&batch.input_ids, taps)
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn context_len(&self) -> usize {
        self.cfg.context
    }

    fn num_params(&self) -> usize {
        self.n_params
    }

    fn available_taps(&self) -> Vec<String> {
        let mut v = vec!["logits".to_string()];
        v.extend((0..=self.cfg.n_layer).map(|i| format!("hidden.{i}")));
        v.extend((0..self.cfg.n_layer).map(|i| format!("attn.{i}")));
        if self.cfg.n_experts > 0 {
            v.extend((0..self.cfg.n_layer).map(|i| format!("router_logits.{i}")));
        }
        if self.dense_head().is_some() {
            v.push(retort_core::LM_HEAD_TAP.to_string());
        }
        v
    }

    fn describe(&self) -> String {
        let c = &self.cfg;
        let moe = if c.n_experts > 0 {
            format!(" moe {}x top-{}", c.n_experts, c.n_experts_used)
        } else {
            String::new()
        };
        let (compute, stored) = self.precision();
        let precision = if self.bf16_products() && !self.vars.is_empty() {
            "f32 master weights, bf16 products".to_string()
        } else if self.bf16_products() {
            "f32, bf16 products".to_string()
        } else if compute == stored {
            format!("{compute:?}").to_lowercase()
        } else {
            format!("{compute:?} compute, {stored:?} master weights").to_lowercase()
        };
        format!(
            "llama {}L/{}d/{}h/{}kv mlp {}{moe} ctx {} vocab {} ({} params, {precision}, {})",
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.n_kv_head,
            c.intermediate,
            c.context,
            c.vocab_size,
            self.n_params,
            self.source
        )
    }

    fn compute_dtype(&self) -> candle_core::DType {
        self.precision().0
    }

    fn info(&self) -> ModelInfo {
        ModelInfo {
            layers: self.cfg.n_layer,
            hidden: self.cfg.n_embd,
            heads: self.cfg.n_head,
            vocab: self.cfg.vocab_size,
            context: self.cfg.context,
            dtype: self.embed.dtype(),
        }
    }

    fn tokenizer_identity(&self) -> Option<String> {
        self.tokenizer_id.clone()
    }

    fn decoder(&self) -> Option<Box<dyn retort_core::Decoder + '_>> {
        Some(Box::new(crate::models::generate::LlamaDecoder::new(self)))
    }
}

impl Student for Llama {
    fn vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        save_hf(self, dir)
    }

    fn config_json(&self) -> serde_json::Value {
        self.cfg.to_hf_json()
    }
}
