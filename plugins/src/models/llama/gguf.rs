//! A llama-family model in GGUF files (llama.cpp): its architecture from the metadata, its
//! weights (quantized ones stay quantized for a frozen teacher, or dequantized for a student),
//! and writing a model back. The file format itself is [`crate::formats::gguf`].
//!
//! Names map from llama.cpp's to Hugging Face's (`token_embd` -> `model.embed_tokens`,
//! `blk.N.attn_q` -> `model.layers.N.self_attn.q_proj`, `blk.N.ffn_gate` -> `mlp.gate_proj`,
//! `output_norm` -> `model.norm`, `output` -> `lm_head`; no `output` means a tied head).
//! llama.cpp's converter permutes the rows of llama's q/k weights so that its interleaved
//! RoPE reproduces Hugging Face's `rotate_half`; the quantized rows are kept as they are and
//! the model runs the interleaved variant (`rope_interleaved`), exactly as candle-transformers'
//! `quantized_llama` does. Qwen2 GGUF files are not permuted (NEOX RoPE). Mixture-of-experts
//! files (`llama.expert_count`) map `ffn_gate_inp` to Mixtral's router and the experts, stacked
//! (`ffn_gate_exps` `[experts, rows, cols]`) or one tensor each (`ffn_gate.E`), to
//! `block_sparse_moe.experts.E.{w1,w2,w3}`.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device, Tensor};

use retort_core::{Error, Result};

use super::config::LlamaConfig;
use super::model::{Llama, Part};
use crate::formats::gguf::{self, GgufFile};

/// The Hugging Face name of a llama.cpp tensor name, if it is one the model uses.
pub fn hf_name(gguf: &str) -> Option<String> {
    let top = match gguf {
        "token_embd.weight" => Some("model.embed_tokens.weight"),
        "output_norm.weight" => Some("model.norm.weight"),
        "output.weight" => Some("lm_head.weight"),
        _ => None,
    };
    if let Some(t) = top {
        return Some(t.to_string());
    }
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (base, kind) = rest.rsplit_once('.')?;
    // Older MoE files: one tensor per expert, `blk.N.ffn_gate.E.weight`.
    if let Some((w, e)) = base.split_once('.') {
        let e: usize = e.parse().ok()?;
        return Some(format!(
            "model.layers.{layer}.block_sparse_moe.experts.{e}.{}.{kind}",
            expert_w(w)?
        ));
    }
    let mapped = match base {
        "ffn_gate_inp" => "block_sparse_moe.gate",
        "attn_norm" => "input_layernorm",
        "ffn_norm" => "post_attention_layernorm",
        "attn_q" => "self_attn.q_proj",
        "attn_k" => "self_attn.k_proj",
        "attn_v" => "self_attn.v_proj",
        "attn_output" => "self_attn.o_proj",
        "ffn_gate" => "mlp.gate_proj",
        "ffn_up" => "mlp.up_proj",
        "ffn_down" => "mlp.down_proj",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{mapped}.{kind}"))
}

/// Mixtral's expert matrix name for llama.cpp's `ffn_gate`/`ffn_down`/`ffn_up`.
fn expert_w(ffn: &str) -> Option<&'static str> {
    match ffn {
        "ffn_gate" => Some("w1"),
        "ffn_down" => Some("w2"),
        "ffn_up" => Some("w3"),
        _ => None,
    }
}

/// `(layer, w1|w2|w3)` of a stacked expert tensor `blk.N.ffn_{gate,down,up}_exps.weight`
/// (`[experts, rows, cols]`, the current llama.cpp layout of MoE weights).
pub fn stacked_experts(gguf: &str) -> Option<(usize, &'static str)> {
    let rest = gguf.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let base = rest.strip_suffix("_exps.weight")?;
    Some((layer.parse().ok()?, expert_w(base)?))
}

/// The llama.cpp name of a Hugging Face tensor name (the inverse of [`hf_name`]).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once('.')?;
    let (base, kind) = rest.rsplit_once('.')?;
    let mapped = match base {
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "block_sparse_moe.gate" => "ffn_gate_inp",
        _ => return None,
    };
    Some(format!("blk.{layer}.{mapped}.{kind}"))
}

/// The model's architecture from the metadata of `g` (`general.architecture` `llama` or `qwen2`).
pub fn read_config(g: &GgufFile) -> Result<LlamaConfig> {
    let arch = g.architecture()?;
    if !matches!(arch.as_str(), "llama" | "qwen2") {
        return Err(g.error(format!("architecture `{arch}` is not supported (llama, qwen2)")));
    }
    let k = |s: &str| format!("{arch}.{s}");
    let n_experts = g.meta_usize(&k("expert_count")).unwrap_or(0);
    let n_experts_used = g.meta_usize(&k("expert_used_count")).unwrap_or(2);
    if n_experts > 0 && !(1..=n_experts).contains(&n_experts_used) {
        return Err(g.error(format!("expert_used_count {n_experts_used} of {n_experts} experts")));
    }
    let n_embd = g.require_usize(&k("embedding_length"))?;
    let n_head = g.require_usize(&k("attention.head_count"))?;
    let head_dim = n_embd / n_head.max(1);
    if let Some(rd) = g.meta_usize(&k("rope.dimension_count")) {
        if rd != head_dim {
            return Err(g.error(format!("partial RoPE ({rd} of {head_dim} dims) is not supported")));
        }
    }
    let tensors = &g.content.tensor_infos;
    let embd = tensors
        .get("token_embd.weight")
        .ok_or_else(|| g.error("tensor `token_embd.weight` is missing"))?;
    let Some(&vocab_size) = embd.shape.dims().first() else {
        return Err(g.error("tensor `token_embd.weight` has no dimensions"));
    };
    let qwen = arch == "qwen2";
    Ok(LlamaConfig {
        vocab_size,
        context: g.meta_usize(&k("context_length")).unwrap_or(2048),
        n_layer: g.require_usize(&k("block_count"))?,
        n_embd,
        n_head,
        n_kv_head: g.meta_usize(&k("attention.head_count_kv")).unwrap_or(n_head),
        intermediate: g.require_usize(&k("feed_forward_length"))?,
        rope_theta: g.meta_f64(&k("rope.freq_base")).unwrap_or(10_000.0),
        rope_interleaved: !qwen,
        rms_norm_eps: g.meta_f64(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
        tie_embeddings: !tensors.contains_key("output.weight"),
        qkv_bias: tensors.contains_key("blk.0.attn_q.bias"),
        o_bias: tensors.contains_key("blk.0.attn_output.bias"),
        n_experts,
        n_experts_used,
        init_std: 0.02,
        dtype: DType::F32,
    })
}

/// Every weight of `g` the model uses, in Hugging Face names and GGUF row order; quantized
/// weights stay quantized unless `dequantize` (then every part is a dense f32 tensor).
fn read_parts(g: &mut GgufFile, dequantize: bool, device: &Device) -> Result<HashMap<String, Part>> {
    let mut parts = HashMap::new();
    for name in g.tensor_names() {
        if let Some((layer, w)) = stacked_experts(&name) {
            let q = g.tensor(&name, device)?;
            for (e, part) in split_experts(&q, dequantize, device)?.into_iter().enumerate() {
                parts.insert(
                    format!("model.layers.{layer}.block_sparse_moe.experts.{e}.{w}.weight"),
                    part,
                );
            }
            continue;
        }
        let Some(hf) = hf_name(&name) else {
            tracing::debug!("GGUF tensor `{name}` is not used");
            continue;
        };
        let q = g.tensor(&name, device)?;
        let part = if dequantize {
            Part::Dense(q.dequantize(device)?)
        } else {
            Part::Quantized(Arc::new(q))
        };
        parts.insert(hf, part);
    }
    Ok(parts)
}

/// Loads the frozen model of `g`. `cfg` is [`read_config`], possibly with a shorter context;
/// `dequantize` turns every weight into a dense f32 tensor.
pub fn load(g: &mut GgufFile, cfg: LlamaConfig, dequantize: bool, device: &Device) -> Result<Llama> {
    let parts = read_parts(g, dequantize, device)?;
    let src = format!("GGUF {}", g.path().display());
    Llama::from_parts(cfg, parts, false, device, &src)
}

/// Every weight of `g` as a dense tensor in Hugging Face names and row order (dequantized, q/k
/// rows un-permuted), with the architecture they imply (always Hugging Face RoPE).
pub fn dense_weights(g: &mut GgufFile, device: &Device) -> Result<(LlamaConfig, HashMap<String, Tensor>)> {
    let mut cfg = read_config(g)?;
    let mut out = HashMap::new();
    for (hf, part) in read_parts(g, true, device)? {
        let Part::Dense(t) = part else {
            return Err(Error::Runtime(format!("`{hf}` is still quantized after dequantizing")));
        };
        let t = if cfg.rope_interleaved && hf.contains("self_attn.q_proj") {
            super::rope::unpermute_rows(&t, cfg.n_head)?
        } else if cfg.rope_interleaved && hf.contains("self_attn.k_proj") {
            super::rope::unpermute_rows(&t, cfg.n_kv_head)?
        } else {
            t
        };
        out.insert(hf, t);
    }
    cfg.rope_interleaved = false;
    Ok((cfg, out))
}

/// Splits a stacked expert tensor `[experts, rows, cols]` into one part per expert; quantized
/// experts stay quantized (each expert's blocks are a contiguous run of the bytes).
fn split_experts(q: &QTensor, dequantize: bool, device: &Device) -> Result<Vec<Part>> {
    let dims = q.shape().dims().to_vec();
    let [n, rows, cols] = dims[..] else {
        return Err(Error::Runtime(format!(
            "stacked experts of shape {dims:?}, expected 3 dims"
        )));
    };
    if dequantize || matches!(q.dtype(), GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16) {
        let t = q.dequantize(device)?;
        return (0..n).map(|e| Ok(Part::Dense(t.get(e)?))).collect();
    }
    if n == 0 {
        return Err(Error::Runtime("stacked experts of shape [0, ..]: no experts".into()));
    }
    let bytes = q.data()?;
    let per = bytes.len() / n;
    (0..n)
        .map(|e| {
            let storage = QStorage::from_data(
                std::borrow::Cow::Borrowed(&bytes[e * per..(e + 1) * per]),
                device,
                q.dtype(),
            )?;
            Ok(Part::Quantized(Arc::new(QTensor::new(storage, (rows, cols))?)))
        })
        .collect()
}

/// Writes a trainable `model` as a GGUF file in llama.cpp's layout (`general.architecture =
/// "llama"`, q/k rows permuted for the interleaved RoPE), matmul weights as `quant` (norms stay
/// f32), plus `extra` metadata (a tokenizer's `tokenizer.ggml.*`). The inverse of
/// [`load`].
pub fn save_gguf(model: &Llama, path: &Path, quant: GgmlDType, extra: &[(String, Value)]) -> Result<()> {
    let c = model.config();
    let u = |v: usize| Value::U32(v as u32);
    let mut meta: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String("llama".into())),
        ("llama.block_count".into(), u(c.n_layer)),
        ("llama.context_length".into(), u(c.context)),
        ("llama.embedding_length".into(), u(c.n_embd)),
        ("llama.feed_forward_length".into(), u(c.intermediate)),
        ("llama.attention.head_count".into(), u(c.n_head)),
        ("llama.attention.head_count_kv".into(), u(c.n_kv_head)),
        ("llama.rope.dimension_count".into(), u(c.head_dim())),
        ("llama.rope.freq_base".into(), Value::F32(c.rope_theta as f32)),
        (
            "llama.attention.layer_norm_rms_epsilon".into(),
            Value::F32(c.rms_norm_eps as f32),
        ),
    ];
    if c.n_experts > 0 {
        meta.push(("llama.expert_count".into(), u(c.n_experts)));
        meta.push(("llama.expert_used_count".into(), u(c.n_experts_used)));
    }
    meta.extend(extra.iter().cloned());
    let mut tensors = Vec::new();
    // Experts are written stacked, `blk.N.ffn_{gate,down,up}_exps.weight` `[experts, rows, cols]`.
    let mut experts: BTreeMap<(usize, &str), Vec<Tensor>> = Default::default();
    for (name, var) in model.vars() {
        if let Some(rest) = name.strip_prefix("model.layers.").filter(|n| n.contains(".experts.")) {
            let layer: usize = rest.split('.').next().and_then(|l| l.parse().ok()).unwrap_or(0);
            let ffn = ["ffn_gate", "ffn_down", "ffn_up"]
                .into_iter()
                .find(|f| expert_w(f).is_some_and(|w| name.ends_with(&format!(".{w}.weight"))))
                .ok_or_else(|| Error::Runtime(format!("unexpected expert tensor `{name}`")))?;
            experts
                .entry((layer, ffn))
                .or_default()
                .push(var.as_tensor().detach().to_dtype(DType::F32)?);
            continue;
        }
        let gname = gguf_name(name).ok_or_else(|| Error::Runtime(format!("no GGUF name for `{name}`")))?;
        let mut t = var.as_tensor().detach().to_dtype(DType::F32)?;
        if !c.rope_interleaved && name.contains("self_attn.q_proj") {
            t = super::rope::permute_rows(&t, c.n_head)?;
        } else if !c.rope_interleaved && name.contains("self_attn.k_proj") {
            t = super::rope::permute_rows(&t, c.n_kv_head)?;
        }
        // The router stays f32 (as llama.cpp writes it); other matrices are quantized.
        let dtype = if t.rank() == 2 && !name.contains("block_sparse_moe.gate") {
            quant
        } else {
            GgmlDType::F32
        };
        tensors.push((gname, QTensor::quantize(&t, dtype)?));
    }
    for ((layer, ffn), ts) in experts {
        let stacked = Tensor::stack(&ts, 0)?;
        tensors.push((
            format!("blk.{layer}.{ffn}_exps.weight"),
            QTensor::quantize(&stacked, quant)?,
        ));
    }
    gguf::write(path, &meta, &tensors)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::llama::test_support::{batch, max_diff, tiny, tiny_cfg};
    use retort_core::{Model, TapSet};

    use crate::testing::tiny_bpe_metadata as tiny_bpe_meta;

    #[test]
    fn f32_gguf_round_trip_gives_the_same_logits_with_interleaved_rope() {
        let m = tiny(serde_json::json!({"vocab_size": 262, "qkv_bias": true, "tie_embeddings": false}));
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tiny.gguf");
        save_gguf(&m, &path, GgmlDType::F32, &tiny_bpe_meta()).expect("save");
        let mut g = GgufFile::open(&path).expect("open");
        let cfg = read_config(&g).expect("cfg");
        assert!(cfg.rope_interleaved && cfg.qkv_bias && !cfg.tie_embeddings);
        let back = load(&mut g, cfg, false, &Device::Cpu).expect("load");
        let b = batch(6);
        let taps: TapSet = ["attn.1", "hidden.2"].into_iter().collect();
        let (x, y) = (m.forward(&b, &taps).expect("f"), back.forward(&b, &taps).expect("f"));
        let d = max_diff(&x.logits, &y.logits);
        assert!(d < 1e-5, "logits differ by {d}");
        // Attention probabilities are the same: the permutation pairs q and k dims alike.
        assert!(max_diff(x.tap("attn.1").expect("a"), y.tap("attn.1").expect("a")) < 1e-5);
        // And dequantizing + un-permuting gives back the Hugging Face weights.
        let (dcfg, w) = dense_weights(&mut GgufFile::open(&path).expect("open"), &Device::Cpu).expect("dense");
        assert!(!dcfg.rope_interleaved);
        for (name, var) in m.vars() {
            assert!(max_diff(var.as_tensor(), &w[name]) == 0.0, "{name}");
        }
    }

    #[test]
    fn q8_gguf_teacher_is_close_to_the_dense_model() {
        let cfg = tiny_cfg(serde_json::json!({"vocab_size": 262, "n_embd": 64, "intermediate": 96, "init_std": 0.1}));
        let m = Llama::init(cfg, 3, &Device::Cpu).expect("init");
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("q8.gguf");
        save_gguf(&m, &path, GgmlDType::Q8_0, &tiny_bpe_meta()).expect("save");
        let mut g = GgufFile::open(&path).expect("open");
        let cfg = read_config(&g).expect("cfg");
        assert!(cfg.tie_embeddings);
        let back = load(&mut g, cfg, false, &Device::Cpu).expect("load");
        let b = batch(6);
        let d = max_diff(
            &m.forward(&b, &TapSet::none()).expect("f").logits,
            &back.forward(&b, &TapSet::none()).expect("f").logits,
        );
        // Q8_0 weights and (in QMatMul) Q8 activations: close, not equal.
        assert!(d > 0.0 && d < 0.2, "Q8_0 logits differ by {d}");
        assert_eq!(back.num_params(), m.num_params());
    }

    #[test]
    fn moe_gguf_round_trip_with_stacked_experts() {
        for quant in [GgmlDType::F32, GgmlDType::Q8_0] {
            let cfg = tiny_cfg(
                serde_json::json!({"vocab_size": 262, "n_embd": 32, "intermediate": 64, "init_std": 0.1,
                                                  "n_experts": 3, "n_experts_used": 2}),
            );
            let m = Llama::init(cfg, 5, &Device::Cpu).expect("init");
            let dir = tempfile::tempdir().expect("tmp");
            let path = dir.path().join("moe.gguf");
            save_gguf(&m, &path, quant, &tiny_bpe_meta()).expect("save");
            let mut g = GgufFile::open(&path).expect("open");
            assert!(g.content.tensor_infos.contains_key("blk.1.ffn_down_exps.weight"));
            let cfg = read_config(&g).expect("cfg");
            assert_eq!((cfg.n_experts, cfg.n_experts_used), (3, 2));
            let back = load(&mut g, cfg, false, &Device::Cpu).expect("load").frozen();
            let b = batch(6);
            let taps: TapSet = ["router_logits.1"].into_iter().collect();
            let (x, y) = (m.forward(&b, &taps).expect("f"), back.forward(&b, &taps).expect("f"));
            let d = max_diff(&x.logits, &y.logits);
            let tol = if quant == GgmlDType::F32 { 1e-5 } else { 0.2 };
            assert!(d < tol, "{quant:?}: logits differ by {d}");
            assert_eq!(y.tap("router_logits.1").expect("r").dims(), &[2, 6, 3]);
            // Dequantized for a student: every expert back in Mixtral's names.
            let (_, w) = dense_weights(&mut GgufFile::open(&path).expect("open"), &Device::Cpu).expect("dense");
            assert_eq!(
                w["model.layers.1.block_sparse_moe.experts.2.w2.weight"].dims(),
                &[32, 64]
            );
        }
    }

    proptest::proptest! {
        // A model per case: fewer cases.
        #![proptest_config(proptest::prelude::ProptestConfig { cases: crate::fuzz::CASES / 4, ..crate::fuzz::config() })]

        /// A damaged llama GGUF: its header and config are refused naming the file, or they
        /// read; building the model then succeeds or fails (a context_length of billions
        /// cannot get its RoPE tables: a runtime error), and nothing panics or aborts.
        #[test]
        fn damaged_model_files_are_refused_naming_the_file(edits in crate::fuzz::edits(3)) {
            let dir = tempfile::tempdir().expect("tmp");
            let path = dir.path().join("m.gguf");
            let m = tiny(serde_json::json!({"vocab_size": 262}));
            save_gguf(&m, &path, GgmlDType::F32, &[]).expect("save");
            let good = std::fs::read(&path).expect("read");
            std::fs::write(&path, crate::fuzz::apply(&good, &edits)).expect("write");
            let file = path.display().to_string();
            let Some(mut g) = crate::fuzz::user_error_naming(GgufFile::open(&path), &file)? else {
                return Ok(());
            };
            if let Some(cfg) = crate::fuzz::user_error_naming(read_config(&g), &file)? {
                let _ = load(&mut g, cfg, false, &Device::Cpu);
            }
        }
    }

    #[test]
    fn an_absurd_context_is_an_error_not_an_abort() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.gguf");
        save_gguf(
            &tiny(serde_json::json!({"vocab_size": 262})),
            &path,
            GgmlDType::F32,
            &[],
        )
        .expect("save");
        let mut g = GgufFile::open(&path).expect("open");
        let mut cfg = read_config(&g).expect("cfg");
        cfg.context = usize::MAX / 2;
        assert!(load(&mut g, cfg, false, &Device::Cpu).is_err());
    }

    #[test]
    fn names_map_both_ways() {
        for (g, h) in [
            ("token_embd.weight", "model.embed_tokens.weight"),
            ("blk.3.attn_q.weight", "model.layers.3.self_attn.q_proj.weight"),
            ("blk.0.attn_k.bias", "model.layers.0.self_attn.k_proj.bias"),
            ("blk.12.ffn_down.weight", "model.layers.12.mlp.down_proj.weight"),
            (
                "blk.1.ffn_norm.weight",
                "model.layers.1.post_attention_layernorm.weight",
            ),
            ("output.weight", "lm_head.weight"),
            (
                "blk.2.ffn_gate_inp.weight",
                "model.layers.2.block_sparse_moe.gate.weight",
            ),
        ] {
            assert_eq!(hf_name(g).as_deref(), Some(h));
            assert_eq!(gguf_name(h).as_deref(), Some(g));
        }
        assert_eq!(hf_name("rope_freqs.weight"), None);
        assert_eq!(
            hf_name("blk.1.ffn_down.4.weight").as_deref(),
            Some("model.layers.1.block_sparse_moe.experts.4.w2.weight")
        );
        assert_eq!(stacked_experts("blk.7.ffn_up_exps.weight"), Some((7, "w3")));
    }
}
