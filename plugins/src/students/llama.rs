//! Student kind `llama`: a llama-family decoder (Llama, Qwen2-style q/k/v biases, Mixtral-style
//! MoE), freshly initialised from the run seed, loaded from `checkpoint` (a Hugging Face
//! directory, or a GGUF file, dequantized), or initialised from a teacher's blocks.
//!
//! ```toml
//! [student]
//! kind = "llama"
//! n_layer = 4
//! n_embd = 128
//! n_head = 4
//! n_kv_head = 2
//! context = 256
//! # init = { from_teacher = true, layers = [0, 10, 20, 29] }   # copy teacher blocks
//! ```

use std::collections::HashMap;

use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Result, Student, Tokenizer};

use super::check_precision;
use crate::models::llama::checkpoint::load_hf;
use crate::models::llama::model::Part;
use crate::models::llama::{Llama, LlamaConfig, LlamaParams, Source};

/// `n` teacher blocks out of `total`, evenly spaced, first and last included.
pub fn spread_layers(n: usize, total: usize) -> Vec<usize> {
    if n <= 1 {
        return vec![total.saturating_sub(1); n];
    }
    (0..n).map(|j| (j * (total - 1) + (n - 1) / 2) / (n - 1)).collect()
}

fn from_teacher(p: &LlamaParams, params: &Params, ctx: &BuildContext) -> Result<Llama> {
    let init = p.init.as_ref().ok_or_else(|| params.error("init", "missing"))?;
    let ckpt = init.checkpoint.as_ref().ok_or_else(|| {
        params.error(
            "init.checkpoint",
            "from_teacher needs the teacher's checkpoint (set teacher.checkpoint)",
        )
    })?;
    let src = Source::of(ckpt, &params.key_path("init.checkpoint"))?;
    let (tcfg, mut weights) = src.dense_weights(&ctx.device)?;
    let layers = match (&init.layers, p.n_layer) {
        (Some(l), Some(n)) if l.len() != n => {
            return Err(params.error("init.layers", format!("lists {} blocks but n_layer = {n}", l.len())))
        }
        (Some(l), _) => l.clone(),
        (None, n) => spread_layers(n.unwrap_or(tcfg.n_layer), tcfg.n_layer),
    };
    if layers.is_empty() {
        return Err(params.error("init.layers", "expected at least one teacher block"));
    }
    if let Some(bad) = layers.iter().find(|&&l| l >= tcfg.n_layer) {
        return Err(params.error(
            "init.layers",
            format!("block {bad} does not exist: the teacher has {}", tcfg.n_layer),
        ));
    }
    let mut ckcfg = tcfg.clone();
    ckcfg.n_layer = layers.len();
    let mut p2 = p.clone();
    p2.n_layer = Some(layers.len());
    let cfg = LlamaConfig::resolve(&p2, params, Some(&ckcfg), ctx.vocab_size)?;
    let mut parts = HashMap::new();
    for (name, t) in weights.drain() {
        if let Some(rest) = name.strip_prefix("model.layers.") {
            let (l, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let Ok(l) = l.parse::<usize>() else { continue };
            for (j, _) in layers.iter().enumerate().filter(|(_, &tl)| tl == l) {
                parts.insert(format!("model.layers.{j}.{tail}"), Part::Dense(t.clone()));
            }
        } else {
            parts.insert(name, Part::Dense(t));
        }
    }
    if cfg.tie_embeddings {
        parts.remove("lm_head.weight");
    } else if !parts.contains_key("lm_head.weight") {
        if let Some(Part::Dense(e)) = parts.get("model.embed_tokens.weight") {
            let e = e.clone();
            parts.insert("lm_head.weight".into(), Part::Dense(e));
        }
    }
    let src_desc = format!("init from teacher {} blocks {layers:?}", ckpt.display());
    Ok(Llama::from_parts(cfg, parts, true, &ctx.device, &src_desc)?
        .with_tokenizer_identity(src.tokenizer().map(|t| t.identity())))
}

/// Builds the student described by `params`.
pub fn build_llama(params: &Params, ctx: &BuildContext) -> Result<Llama> {
    let p: LlamaParams = params.parse()?;
    if p.dequantize.is_some() {
        return Err(params.error(
            "dequantize",
            "applies to GGUF teachers only (a student is always dense)",
        ));
    }
    if p.init.as_ref().is_some_and(|i| i.from_teacher) {
        if p.checkpoint.is_some() {
            return Err(params.error("init", "give either checkpoint or init.from_teacher, not both"));
        }
        return from_teacher(&p, params, ctx);
    }
    match &p.checkpoint {
        None => {
            let cfg = LlamaConfig::resolve(&p, params, None, ctx.vocab_size)?;
            Llama::init(cfg, ctx.seed, &ctx.device)
        }
        Some(path) => {
            let key = params.key_path("checkpoint");
            let src = Source::of(path, &key)?;
            let tok = src.tokenizer().map(|t| t.identity());
            let model = match &src {
                Source::HfDir(dir) => {
                    let ck = LlamaConfig::read_hf_dir(dir, &key)?;
                    let cfg = LlamaConfig::resolve(&p, params, Some(&ck), ctx.vocab_size)?;
                    load_hf(cfg, dir, true, &ctx.device)?
                }
                Source::Gguf(_) => {
                    let (ck, weights) = src.dense_weights(&ctx.device)?;
                    let cfg = LlamaConfig::resolve(&p, params, Some(&ck), ctx.vocab_size)?;
                    let parts = weights.into_iter().map(|(n, t)| (n, Part::Dense(t))).collect();
                    Llama::from_parts(
                        cfg,
                        parts,
                        true,
                        &ctx.device,
                        &format!("from {} (dequantized)", path.display()),
                    )?
                }
            };
            Ok(model.with_tokenizer_identity(tok))
        }
    }
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn Student>> {
    let model = build_llama(params, ctx)?;
    check_precision(model.config().dtype, true, params, &ctx.device)?;
    Ok(Box::new(model))
}

inventory::submit! {
    Factory::<dyn Student> {
        kind: "llama",
        description: "llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU, optional MoE; Hugging Face LlamaForCausalLM layout), fresh, from a checkpoint or from teacher blocks",
        build, params: retort_core::registry::params_schema::<LlamaParams> }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spread_layers_keeps_first_and_last() {
        assert_eq!(spread_layers(4, 30), vec![0, 10, 19, 29]);
        assert_eq!(spread_layers(2, 30), vec![0, 29]);
        assert_eq!(spread_layers(1, 30), vec![29]);
        assert_eq!(spread_layers(3, 3), vec![0, 1, 2]);
    }
}
