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

use candle_core::DType;
use retort_core::registry::Factory;
use retort_core::{BuildContext, Params, Result, Student, Tokenizer};

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
    check_precision(model.precision(), params, &ctx.device)?;
    Ok(Box::new(model))
}

/// Mixed precision (`dtype = "bf16"`: bf16 compute, f32 master weights) runs on CUDA, where the
/// fused kernels and cuBLAS compute in bf16; elsewhere it is refused, as is f16 (it needs loss
/// scaling, which the training loop does not do).
fn check_precision((compute, stored): (DType, DType), params: &Params, device: &candle_core::Device) -> Result<()> {
    if compute == stored {
        return Ok(());
    }
    if compute == DType::F16 {
        return Err(params.error(
            "dtype",
            "f16 training needs loss scaling, which retort does not do yet: use \"bf16\" (mixed precision: bf16 \
             compute, f32 master weights) or \"f32\"",
        ));
    }
    if !device.is_cuda() {
        return Err(params.error(
            "dtype",
            "\"bf16\" trains in mixed precision (bf16 compute, f32 master weights) on CUDA devices; on the CPU \
             candle widens bf16 matrix products to f32 and the fused kernels run f32/f64 only, so it would be \
             slower and less precise than \"f32\": use \"f32\" here (run.device = \"cuda\" for bf16)",
        ));
    }
    Ok(())
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

    #[test]
    fn half_precision_students_are_refused_where_mixed_precision_does_not_run() {
        let params = Params::new("student", serde_json::Map::new());
        let cpu = candle_core::Device::Cpu;
        assert!(check_precision((DType::F32, DType::F32), &params, &cpu).is_ok());
        assert!(check_precision((DType::BF16, DType::BF16), &params, &cpu).is_ok());
        let bf16 = check_precision((DType::BF16, DType::F32), &params, &cpu).expect_err("bf16 on the CPU");
        let f16 = check_precision((DType::F16, DType::F32), &params, &cpu).expect_err("f16");
        for (err, says) in [(bf16, "CUDA"), (f16, "loss scaling")] {
            let text = err.to_string();
            assert!(text.contains("student.dtype") && text.contains(says), "{text}");
            assert_eq!(err.exit_code(), 2);
        }
    }
}
