//! GGUF files (llama.cpp): a frozen llama-family model with quantized weights.
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

use std::collections::HashMap;
use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file::{Content, Value};
use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::{DType, Device};

use retort_core::{Error, Result};

use super::config::LlamaConfig;
use super::model::{Llama, Part};

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

/// An opened GGUF file: its metadata and tensor directory.
pub struct GgufFile {
    /// Header: metadata and tensor infos.
    pub content: Content,
    file: File,
    path: std::path::PathBuf,
}

impl GgufFile {
    /// Opens and parses the header of `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let what = || format!("GGUF file {}", path.display());
        let mut file = File::open(path).map_err(|e| Error::input_failed(what(), "cannot open", e))?;
        let content =
            Content::read(&mut file).map_err(|e| Error::input_failed(what(), "not a readable GGUF file", e))?;
        Ok(GgufFile {
            content,
            file,
            path: path.to_path_buf(),
        })
    }

    fn error(&self, msg: impl Into<String>) -> Error {
        Error::input(format!("GGUF file {}", self.path.display()), msg)
    }

    /// [`Self::error`] caused by `source`, which is kept.
    fn failed(&self, msg: impl Into<String>, source: candle_core::Error) -> Error {
        Error::input_failed(format!("GGUF file {}", self.path.display()), msg, source)
    }

    /// Metadata value `key`.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    fn meta_u(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.error(format!("metadata `{key}` is missing")))?;
        value_usize(v).ok_or_else(|| self.error(format!("metadata `{key}` is not an integer")))
    }

    fn meta_f(&self, key: &str) -> Option<f64> {
        match self.meta(key)? {
            Value::F32(v) => Some(*v as f64),
            Value::F64(v) => Some(*v),
            v => value_usize(v).map(|u| u as f64),
        }
    }

    /// The architecture in the metadata (`general.architecture`).
    pub fn architecture(&self) -> Result<String> {
        match self.meta("general.architecture") {
            Some(Value::String(s)) => Ok(s.clone()),
            _ => Err(self.error("metadata `general.architecture` is missing")),
        }
    }

    /// The model's architecture from the metadata (`llama` or `qwen2`).
    pub fn config(&self) -> Result<LlamaConfig> {
        let arch = self.architecture()?;
        if !matches!(arch.as_str(), "llama" | "qwen2") {
            return Err(self.error(format!("architecture `{arch}` is not supported (llama, qwen2)")));
        }
        let k = |s: &str| format!("{arch}.{s}");
        let n_experts = self.meta(&k("expert_count")).and_then(value_usize).unwrap_or(0);
        let n_experts_used = self.meta(&k("expert_used_count")).and_then(value_usize).unwrap_or(2);
        if n_experts > 0 && !(1..=n_experts).contains(&n_experts_used) {
            return Err(self.error(format!("expert_used_count {n_experts_used} of {n_experts} experts")));
        }
        let n_embd = self.meta_u(&k("embedding_length"))?;
        let n_head = self.meta_u(&k("attention.head_count"))?;
        let head_dim = n_embd / n_head.max(1);
        if let Some(rd) = self.meta(&k("rope.dimension_count")).and_then(value_usize) {
            if rd != head_dim {
                return Err(self.error(format!("partial RoPE ({rd} of {head_dim} dims) is not supported")));
            }
        }
        let embd = self
            .content
            .tensor_infos
            .get("token_embd.weight")
            .ok_or_else(|| self.error("tensor `token_embd.weight` is missing"))?;
        let vocab_size = embd.shape.dims()[0];
        let qwen = arch == "qwen2";
        Ok(LlamaConfig {
            vocab_size,
            context: self.meta_u(&k("context_length")).unwrap_or(2048),
            n_layer: self.meta_u(&k("block_count"))?,
            n_embd,
            n_head,
            n_kv_head: self.meta_u(&k("attention.head_count_kv")).unwrap_or(n_head),
            intermediate: self.meta_u(&k("feed_forward_length"))?,
            rope_theta: self.meta_f(&k("rope.freq_base")).unwrap_or(10_000.0),
            rope_interleaved: !qwen,
            rms_norm_eps: self.meta_f(&k("attention.layer_norm_rms_epsilon")).unwrap_or(1e-5),
            tie_embeddings: !self.content.tensor_infos.contains_key("output.weight"),
            qkv_bias: self.content.tensor_infos.contains_key("blk.0.attn_q.bias"),
            o_bias: self.content.tensor_infos.contains_key("blk.0.attn_output.bias"),
            n_experts,
            n_experts_used,
            init_std: 0.02,
            dtype: DType::F32,
        })
    }

    /// Reads tensor `name` (llama.cpp name).
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<candle_core::quantized::QTensor> {
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| self.failed(format!("tensor `{name}`"), e))
    }

    /// Loads the frozen model. `cfg` is [`GgufFile::config`], possibly with a shorter context.
    pub fn load(&mut self, cfg: LlamaConfig, device: &Device) -> Result<Llama> {
        self.load_with(cfg, false, device)
    }

    /// Loads the frozen model; `dequantize` turns every weight into a dense f32 tensor.
    pub fn load_with(&mut self, cfg: LlamaConfig, dequantize: bool, device: &Device) -> Result<Llama> {
        let mut parts = HashMap::new();
        let names: Vec<String> = self.content.tensor_infos.keys().cloned().collect();
        for name in names {
            if let Some((layer, w)) = stacked_experts(&name) {
                let q = self.tensor(&name, device)?;
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
            let q = self
                .content
                .tensor(&mut self.file, &name, device)
                .map_err(|e| self.failed(format!("tensor `{name}`"), e))?;
            let part = if dequantize {
                Part::Dense(q.dequantize(device)?)
            } else {
                Part::Quantized(Arc::new(q))
            };
            parts.insert(hf, part);
        }
        let src = format!("GGUF {}", self.path.display());
        Llama::from_parts(cfg, parts, false, device, &src)
    }
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
/// [`GgufFile::load`].
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
    let mut experts: std::collections::BTreeMap<(usize, &str), Vec<candle_core::Tensor>> = Default::default();
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
        let stacked = candle_core::Tensor::stack(&ts, 0)?;
        tensors.push((
            format!("blk.{layer}.{ffn}_exps.weight"),
            QTensor::quantize(&stacked, quant)?,
        ));
    }
    let meta_refs: Vec<(&str, &Value)> = meta.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let temp = retort_core::fsutil::temp_path(path);
    let mut f = File::create(&temp).map_err(|e| Error::io("creating GGUF file", &temp, e))?;
    candle_core::quantized::gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    drop(f);
    retort_core::fsutil::commit_temp(&temp, path)
}

/// An integer metadata value.
pub fn value_usize(v: &Value) -> Option<usize> {
    Some(match v {
        Value::U8(x) => *x as usize,
        Value::I8(x) => usize::try_from(*x).ok()?,
        Value::U16(x) => *x as usize,
        Value::I16(x) => usize::try_from(*x).ok()?,
        Value::U32(x) => *x as usize,
        Value::I32(x) => usize::try_from(*x).ok()?,
        Value::U64(x) => *x as usize,
        Value::I64(x) => usize::try_from(*x).ok()?,
        _ => return None,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::models::llama::model::tests::{batch, tiny, tiny_cfg};
    use crate::tokenizers::hf::HfTokenizer;
    use retort_core::{Model, TapSet, Tokenizer};

    use crate::testing::tiny_bpe_metadata as tiny_bpe_meta;

    fn max_diff(a: &candle_core::Tensor, b: &candle_core::Tensor) -> f32 {
        (a - b)
            .expect("d")
            .abs()
            .expect("a")
            .max_all()
            .expect("m")
            .to_scalar::<f32>()
            .expect("s")
    }

    #[test]
    fn f32_gguf_round_trip_gives_the_same_logits_with_interleaved_rope() {
        let m = tiny(serde_json::json!({"vocab_size": 262, "qkv_bias": true, "tie_embeddings": false}));
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tiny.gguf");
        save_gguf(&m, &path, GgmlDType::F32, &tiny_bpe_meta()).expect("save");
        let mut g = GgufFile::open(&path).expect("open");
        let cfg = g.config().expect("cfg");
        assert!(cfg.rope_interleaved && cfg.qkv_bias && !cfg.tie_embeddings);
        let back = g.load(cfg, &Device::Cpu).expect("load");
        let b = batch(6);
        let taps: TapSet = ["attn.1", "hidden.2"].into_iter().collect();
        let (x, y) = (m.forward(&b, &taps).expect("f"), back.forward(&b, &taps).expect("f"));
        let d = max_diff(&x.logits, &y.logits);
        assert!(d < 1e-5, "logits differ by {d}");
        // Attention probabilities are the same: the permutation pairs q and k dims alike.
        assert!(max_diff(x.tap("attn.1").expect("a"), y.tap("attn.1").expect("a")) < 1e-5);
        // And dequantizing + un-permuting gives back the Hugging Face weights.
        let (dcfg, w) = crate::models::llama::checkpoint::Source::Gguf(path.clone())
            .dense_weights(&Device::Cpu)
            .expect("dense");
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
        let cfg = g.config().expect("cfg");
        assert!(cfg.tie_embeddings);
        let back = g.load(cfg, &Device::Cpu).expect("load");
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
            let cfg = g.config().expect("cfg");
            assert_eq!((cfg.n_experts, cfg.n_experts_used), (3, 2));
            let back = g.load(cfg, &Device::Cpu).expect("load").frozen();
            let b = batch(6);
            let taps: TapSet = ["router_logits.1"].into_iter().collect();
            let (x, y) = (m.forward(&b, &taps).expect("f"), back.forward(&b, &taps).expect("f"));
            let d = max_diff(&x.logits, &y.logits);
            let tol = if quant == GgmlDType::F32 { 1e-5 } else { 0.2 };
            assert!(d < tol, "{quant:?}: logits differ by {d}");
            assert_eq!(y.tap("router_logits.1").expect("r").dims(), &[2, 6, 3]);
            // Dequantized for a student: every expert back in Mixtral's names.
            let (_, w) = crate::models::llama::checkpoint::Source::Gguf(path.clone())
                .dense_weights(&Device::Cpu)
                .expect("dense");
            assert_eq!(
                w["model.layers.1.block_sparse_moe.experts.2.w2.weight"].dims(),
                &[32, 64]
            );
        }
    }

    #[test]
    fn tokenizer_from_gguf_metadata_is_byte_level_bpe_with_specials() {
        let m = tiny(serde_json::json!({"vocab_size": 262}));
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("tok.gguf");
        save_gguf(&m, &path, GgmlDType::F32, &tiny_bpe_meta()).expect("save");
        let t = HfTokenizer::from_path(&path).expect("tokenizer");
        assert_eq!(t.vocab_size(), 262);
        assert_eq!(
            (t.bos_id(), t.eos_id(), t.pad_id(), t.add_bos()),
            (Some(1), Some(2), Some(2), false)
        );
        let ids = t.encode("<|im_start|> the 42").expect("enc");
        assert_eq!(ids[0], 1);
        assert!(ids.contains(&261), "`Ġthe` is one token: {ids:?}");
        // SmolLM's pre-tokenizer splits every digit: "4" and "2" are separate byte tokens.
        assert_eq!(t.decode(&ids).expect("dec"), "<|im_start|> the 42");
        assert_eq!(
            t.decode(&t.encode("hello there").expect("e")).expect("d"),
            "hello there"
        );
        // Written as tokenizer.json and read back, the identity is the same.
        let json = dir.path().join("tokenizer.json");
        std::fs::write(&json, t.hf_json().expect("json")).expect("write");
        let back = HfTokenizer::from_path(&json).expect("back");
        assert_eq!(back.identity(), t.identity());
        assert_eq!(back.encode("the 42").expect("e"), t.encode("the 42").expect("e"));
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
