//! The llama family's architecture: the config-file parameters ([`LlamaParams`]), the resolved
//! architecture ([`LlamaConfig`]) and its Hugging Face `config.json` (read and written).
//!
//! `config.json` follows `LlamaForCausalLM` (`hidden_size`, `intermediate_size`,
//! `num_hidden_layers`, `num_attention_heads`, `num_key_value_heads`, `rope_theta`,
//! `rms_norm_eps`, `tie_word_embeddings`, `attention_bias`); `Qwen2ForCausalLM` (biases on the
//! q/k/v projections only) and `MixtralForCausalLM` (sparse MoE MLP) are read too.

use std::path::{Path, PathBuf};

use candle_core::DType;
use serde::Deserialize;

use retort_core::{Error, Params, Result};

/// Config-file parameters of the `llama` student and teacher kinds. Architecture fields are
/// optional: with a `checkpoint` they come from it (and a given value must agree); without one,
/// the defaults below apply.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LlamaParams {
    /// Decoder blocks. Default 2.
    pub n_layer: Option<usize>,
    /// Width of the residual stream (`hidden_size`). Default 64.
    pub n_embd: Option<usize>,
    /// Query heads; must divide `n_embd`. Default 4.
    pub n_head: Option<usize>,
    /// Key/value heads (grouped-query attention); must divide `n_head`. Default `n_head`.
    pub n_kv_head: Option<usize>,
    /// Width of the SwiGLU MLP (`intermediate_size`). Default `ceil(8/3 * n_embd)` rounded up to 8.
    pub intermediate: Option<usize>,
    /// Longest window (RoPE has no learned positions; this bounds the tables). Default 256.
    pub context: Option<usize>,
    /// Output vocabulary. Default: the data's tokenizer vocabulary.
    pub vocab_size: Option<usize>,
    /// RoPE base `theta`. Default 10000.
    pub rope_theta: Option<f64>,
    /// RMSNorm epsilon. Default 1e-5.
    pub rms_norm_eps: Option<f64>,
    /// Output head tied to the token embedding. Default true.
    pub tie_embeddings: Option<bool>,
    /// Biases on the q/k/v projections (Qwen2). Default false.
    pub qkv_bias: Option<bool>,
    /// Sparse mixture-of-experts MLP with this many experts (Mixtral); 0 or absent: dense MLP.
    pub n_experts: Option<usize>,
    /// Experts used per token (top-k routing). Default 2.
    pub n_experts_used: Option<usize>,
    /// Parameter dtype: `f32` (default), `f64`, `bf16` or `f16`.
    pub dtype: Option<String>,
    /// Std of the normal init. Default 0.02.
    pub init_std: Option<f64>,
    /// A Hugging Face directory (`config.json`, `model.safetensors` or sharded with
    /// `model.safetensors.index.json`), or, for a teacher, a `.gguf` file.
    pub checkpoint: Option<PathBuf>,
    /// Teacher from a GGUF file only: dequantize every weight to f32 at load (about 4x the
    /// memory; plain f32 matmuls, often faster on CPUs than quantized ones). Default false.
    pub dequantize: Option<bool>,
    /// Student only: copy weights from a teacher checkpoint. `{ from_teacher = true, layers = [0, 29] }`
    /// takes the embedding, final norm and head and the listed teacher blocks (in order); widths
    /// must agree.
    pub init: Option<InitFrom>,
}

/// `init = { from_teacher = true, layers = [...] }`.
#[derive(Debug, Clone, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct InitFrom {
    /// Copy weights from the teacher's checkpoint.
    pub from_teacher: bool,
    /// Teacher blocks to copy, one per student block. Default: evenly spaced.
    #[serde(default)]
    pub layers: Option<Vec<usize>>,
    /// The teacher checkpoint (a HF directory or a `.gguf` file). Filled in by the host from
    /// `teacher.checkpoint` when absent.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
}

/// The resolved architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    /// Output vocabulary (rows of the embedding).
    pub vocab_size: usize,
    /// Longest window.
    pub context: usize,
    /// Decoder blocks.
    pub n_layer: usize,
    /// Residual width.
    pub n_embd: usize,
    /// Query heads.
    pub n_head: usize,
    /// Key/value heads.
    pub n_kv_head: usize,
    /// MLP width.
    pub intermediate: usize,
    /// RoPE base.
    pub rope_theta: f64,
    /// Pairs rotated by RoPE are adjacent (`2i, 2i+1`: llama.cpp's layout of GGUF q/k weights)
    /// instead of half a head apart (`i, i + d/2`: Hugging Face's `rotate_half`).
    pub rope_interleaved: bool,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// Head tied to the embedding.
    pub tie_embeddings: bool,
    /// Biases on q/k/v.
    pub qkv_bias: bool,
    /// Bias on the output projection (HF llama `attention_bias` sets both).
    pub o_bias: bool,
    /// Experts of the MoE MLP; 0 = dense.
    pub n_experts: usize,
    /// Experts used per token.
    pub n_experts_used: usize,
    /// Init std.
    pub init_std: f64,
    /// Parameter dtype.
    pub dtype: DType,
}

impl LlamaConfig {
    /// Parameters of the model (embedding, blocks with every expert, norms, untied head).
    /// In `f64`: exact below 2^53, never overflowing for the absurd sizes it exists to refuse.
    pub fn param_count(&self) -> f64 {
        let (e, v, l) = (self.n_embd as f64, self.vocab_size as f64, self.n_layer as f64);
        let (hd, heads, kv) = (self.head_dim() as f64, self.n_head as f64, self.n_kv_head as f64);
        let attention = e * hd * (heads + 2.0 * kv) + hd * heads * e;
        let experts = (self.n_experts as f64).max(1.0);
        let mlp = 3.0 * e * self.intermediate as f64 * experts + e * self.n_experts as f64;
        let head = if self.tie_embeddings { 0.0 } else { v * e };
        v * e + l * (attention + mlp + 2.0 * e) + e + head
    }

    /// `self`, unless its parameters cannot fit in this host's memory (a failed allocation
    /// aborts the process: refuse first).
    fn checked_size(self, params: &Params) -> Result<Self> {
        let bytes = (self.param_count() * self.dtype.size_in_bytes() as f64) as u128;
        let what = format!("a llama of {:.3e} parameters", self.param_count());
        retort_core::memory::ensure_host_can_allocate(params.path(), &what, bytes)?;
        Ok(self)
    }

    /// Width of one head.
    pub fn head_dim(&self) -> usize {
        self.n_embd / self.n_head
    }

    /// Resolves params against an optional checkpoint config and the data vocabulary.
    /// `from_ckpt` is the checkpoint's architecture, if the params name one.
    pub fn resolve(
        p: &LlamaParams,
        params: &Params,
        from_ckpt: Option<&LlamaConfig>,
        data_vocab: Option<usize>,
    ) -> Result<Self> {
        let pick = |key: &str, given: Option<usize>, ckpt: Option<usize>, default: usize| -> Result<usize> {
            match (given, ckpt) {
                (Some(g), Some(c)) if g != c => Err(params.error(
                    key,
                    format!("{g} disagrees with the checkpoint's {c}; drop the key or use a matching checkpoint"),
                )),
                (Some(g), _) => Ok(g),
                (None, Some(c)) => Ok(c),
                (None, None) => Ok(default),
            }
        };
        let c = from_ckpt;
        let n_layer = pick("n_layer", p.n_layer, c.map(|c| c.n_layer), 2)?;
        let n_embd = pick("n_embd", p.n_embd, c.map(|c| c.n_embd), 64)?;
        let n_head = pick("n_head", p.n_head, c.map(|c| c.n_head), 4)?;
        let n_kv_head = pick("n_kv_head", p.n_kv_head, c.map(|c| c.n_kv_head), n_head)?;
        let default_inter = (8 * n_embd).div_ceil(3).div_ceil(8) * 8;
        let intermediate = pick("intermediate", p.intermediate, c.map(|c| c.intermediate), default_inter)?;
        // The context bounds only the RoPE tables: a checkpoint's is a default, not a constraint.
        let context = p.context.or(c.map(|c| c.context)).unwrap_or(256);
        let vocab_size = pick(
            "vocab_size",
            p.vocab_size,
            c.map(|c| c.vocab_size),
            data_vocab.unwrap_or(0),
        )?;
        let n_experts = pick("n_experts", p.n_experts, c.map(|c| c.n_experts), 0)?;
        let n_experts_used = pick(
            "n_experts_used",
            p.n_experts_used,
            c.map(|c| c.n_experts_used),
            if n_experts > 0 { 2.min(n_experts) } else { 2 },
        )?;
        for (key, v) in [
            ("n_layer", n_layer),
            ("n_embd", n_embd),
            ("n_head", n_head),
            ("n_kv_head", n_kv_head),
            ("intermediate", intermediate),
            ("context", context),
        ] {
            if v == 0 {
                return Err(params.error(key, "expected an integer >= 1, got 0"));
            }
        }
        if vocab_size == 0 {
            return Err(params.error("vocab_size", "unknown: set it, or build the model after the data"));
        }
        if n_embd % n_head != 0 {
            return Err(params.error("n_head", format!("must divide n_embd = {n_embd}, got {n_head}")));
        }
        if (n_embd / n_head) % 2 != 0 {
            return Err(params.error(
                "n_head",
                format!(
                    "the head width n_embd / n_head = {} must be even for RoPE",
                    n_embd / n_head
                ),
            ));
        }
        if n_head % n_kv_head != 0 {
            return Err(params.error("n_kv_head", format!("must divide n_head = {n_head}, got {n_kv_head}")));
        }
        if n_experts > 0 && !(1..=n_experts).contains(&n_experts_used) {
            return Err(params.error(
                "n_experts_used",
                format!("expected 1..={n_experts}, got {n_experts_used}"),
            ));
        }
        let bool_pick = |key: &str, given: Option<bool>, ckpt: Option<bool>, default: bool| -> Result<bool> {
            match (given, ckpt) {
                (Some(g), Some(c)) if g != c => {
                    Err(params.error(key, format!("{g} disagrees with the checkpoint's {c}")))
                }
                (g, c) => Ok(g.or(c).unwrap_or(default)),
            }
        };
        let tie_embeddings = bool_pick("tie_embeddings", p.tie_embeddings, c.map(|c| c.tie_embeddings), true)?;
        let qkv_bias = bool_pick("qkv_bias", p.qkv_bias, c.map(|c| c.qkv_bias), false)?;
        let dtype = match p.dtype.as_deref() {
            // Checkpoints stored in bf16/f16 compute in f32 unless asked otherwise.
            None => DType::F32,
            Some(s) => parse_dtype(s).ok_or_else(|| {
                params.error(
                    "dtype",
                    format!("expected \"f32\", \"f64\", \"bf16\" or \"f16\", got \"{s}\""),
                )
            })?,
        };
        let rope_theta = p.rope_theta.or(c.map(|c| c.rope_theta)).unwrap_or(10_000.0);
        params.require_positive("rope_theta", rope_theta)?;
        let rms_norm_eps = p.rms_norm_eps.or(c.map(|c| c.rms_norm_eps)).unwrap_or(1e-5);
        params.require_positive("rms_norm_eps", rms_norm_eps)?;
        let init_std = p.init_std.or(c.map(|c| c.init_std)).unwrap_or(0.02);
        params.require_positive("init_std", init_std)?;
        LlamaConfig {
            vocab_size,
            context,
            n_layer,
            n_embd,
            n_head,
            n_kv_head,
            intermediate,
            rope_theta,
            rope_interleaved: c.is_some_and(|c| c.rope_interleaved),
            rms_norm_eps,
            tie_embeddings,
            qkv_bias,
            o_bias: c.is_some_and(|c| c.o_bias),
            n_experts,
            n_experts_used,
            init_std,
            dtype,
        }
        .checked_size(params)
    }

    /// Hugging Face `config.json`: `LlamaForCausalLM` (`Qwen2ForCausalLM` with q/k/v biases only,
    /// `MixtralForCausalLM` with experts).
    pub fn to_hf_json(&self) -> serde_json::Value {
        let (arch, model_type) = if self.n_experts > 0 {
            ("MixtralForCausalLM", "mixtral")
        } else if self.qkv_bias && !self.o_bias {
            ("Qwen2ForCausalLM", "qwen2")
        } else {
            ("LlamaForCausalLM", "llama")
        };
        let mut v = serde_json::json!({
            "architectures": [arch],
            "model_type": model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.n_embd,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.n_layer,
            "num_attention_heads": self.n_head,
            "num_key_value_heads": self.n_kv_head,
            "head_dim": self.head_dim(),
            "max_position_embeddings": self.context,
            "rope_theta": self.rope_theta,
            "rope_scaling": null,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "initializer_range": self.init_std,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": self.qkv_bias && self.o_bias,
            "attention_dropout": 0.0,
            "mlp_bias": false,
            "use_cache": true,
            "torch_dtype": dtype_name(self.dtype),
        });
        if self.n_experts > 0 {
            v["num_local_experts"] = self.n_experts.into();
            v["num_experts_per_tok"] = self.n_experts_used.into();
        }
        v
    }

    /// Reads a Hugging Face `config.json` of a llama-family model.
    pub fn from_hf_json(v: &serde_json::Value, file: &Path) -> Result<Self> {
        let bad = |m: String| Error::input(format!("checkpoint config {}", file.display()), m);
        let get = |k: &str| -> Result<usize> {
            v.get(k)
                .and_then(serde_json::Value::as_u64)
                .map(|x| x as usize)
                .ok_or_else(|| bad(format!("missing integer `{k}`")))
        };
        let model_type = v.get("model_type").and_then(|m| m.as_str()).unwrap_or("");
        if !matches!(model_type, "llama" | "qwen2" | "mistral" | "mixtral") {
            return Err(bad(format!(
                "expected a llama-family \"model_type\" (llama, qwen2, mistral, mixtral), got \"{model_type}\""
            )));
        }
        if let Some(s) = v.get("rope_scaling").filter(|s| !s.is_null()) {
            return Err(bad(format!("rope_scaling {s} is not supported (only plain RoPE)")));
        }
        if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str()).filter(|a| *a != "silu") {
            return Err(bad(format!("hidden_act \"{act}\" is not supported (only silu)")));
        }
        if v.get("mlp_bias").and_then(|b| b.as_bool()) == Some(true) {
            return Err(bad("mlp_bias = true is not supported".into()));
        }
        let n_embd = get("hidden_size")?;
        let n_head = get("num_attention_heads")?;
        if let Some(hd) = v.get("head_dim").and_then(|h| h.as_u64()) {
            if hd as usize * n_head != n_embd {
                return Err(bad(format!(
                    "head_dim {hd} x {n_head} heads != hidden_size {n_embd} is not supported"
                )));
            }
        }
        let attention_bias = v.get("attention_bias").and_then(|b| b.as_bool()).unwrap_or(false);
        let qwen = model_type == "qwen2";
        let n_experts = if model_type == "mixtral" {
            get("num_local_experts")?
        } else {
            0
        };
        Ok(LlamaConfig {
            vocab_size: get("vocab_size")?,
            context: get("max_position_embeddings").unwrap_or(2048),
            n_layer: get("num_hidden_layers")?,
            n_embd,
            n_head,
            n_kv_head: get("num_key_value_heads").unwrap_or(n_head),
            intermediate: get("intermediate_size")?,
            rope_theta: v.get("rope_theta").and_then(|t| t.as_f64()).unwrap_or(10_000.0),
            rope_interleaved: false,
            rms_norm_eps: v.get("rms_norm_eps").and_then(|e| e.as_f64()).unwrap_or(1e-6),
            tie_embeddings: v.get("tie_word_embeddings").and_then(|t| t.as_bool()).unwrap_or(false),
            qkv_bias: attention_bias || qwen,
            o_bias: attention_bias,
            n_experts,
            n_experts_used: if n_experts > 0 { get("num_experts_per_tok")? } else { 2 },
            init_std: v.get("initializer_range").and_then(|e| e.as_f64()).unwrap_or(0.02),
            dtype: v
                .get("torch_dtype")
                .and_then(|d| d.as_str())
                .and_then(parse_dtype)
                .unwrap_or(DType::F32),
        })
    }

    /// Reads `dir/config.json`.
    pub fn read_hf_dir(dir: &Path, key_path: &str) -> Result<Self> {
        let file = dir.join("config.json");
        let text = std::fs::read_to_string(&file).map_err(|e| {
            Error::input_failed(
                format!("{key_path} = \"{}\"", dir.display()),
                format!("cannot read {}", file.display()),
                e,
            )
        })?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::input_failed(format!("checkpoint config {}", file.display()), "not JSON", e))?;
        Self::from_hf_json(&v, &file)
    }
}

/// `f32`, `f64`, `bf16`, `f16` (and the `torch_dtype` spellings `float32`, ...).
pub fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "f32" | "float32" => Some(DType::F32),
        "f64" | "float64" => Some(DType::F64),
        "bf16" | "bfloat16" => Some(DType::BF16),
        "f16" | "float16" => Some(DType::F16),
        _ => None,
    }
}

fn dtype_name(d: DType) -> &'static str {
    match d {
        DType::F64 => "float64",
        DType::BF16 => "bfloat16",
        DType::F16 => "float16",
        _ => "float32",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hf(v: serde_json::Value) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_json(&v, Path::new("x/config.json"))
    }

    fn base() -> serde_json::Value {
        serde_json::json!({"model_type": "llama", "vocab_size": 100, "hidden_size": 16, "intermediate_size": 32,
                           "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
                           "rope_theta": 500000.0, "rms_norm_eps": 1e-5, "max_position_embeddings": 128,
                           "torch_dtype": "bfloat16"})
    }

    #[test]
    fn reads_llama_and_qwen2_configs_and_writes_them_back() {
        let c = hf(base()).expect("llama");
        assert_eq!(
            (c.n_kv_head, c.rope_theta, c.tie_embeddings, c.qkv_bias),
            (2, 500000.0, false, false)
        );
        assert_eq!(
            LlamaConfig::from_hf_json(&c.to_hf_json(), Path::new("y")).expect("again"),
            c
        );
        let mut q = base();
        q["model_type"] = "qwen2".into();
        q["tie_word_embeddings"] = true.into();
        let c = hf(q).expect("qwen2");
        assert!(c.qkv_bias && !c.o_bias && c.tie_embeddings);
        let out = c.to_hf_json();
        assert_eq!(out["architectures"][0], "Qwen2ForCausalLM");
        assert_eq!(LlamaConfig::from_hf_json(&out, Path::new("y")).expect("again"), c);
    }

    #[test]
    fn unsupported_configs_are_input_errors_that_say_why() {
        for (key, value, needle) in [
            (
                "rope_scaling",
                serde_json::json!({"rope_type": "llama3", "factor": 8.0}),
                "rope_scaling",
            ),
            ("hidden_act", serde_json::json!("gelu"), "hidden_act"),
            ("model_type", serde_json::json!("gpt2"), "llama-family"),
            ("mlp_bias", serde_json::json!(true), "mlp_bias"),
        ] {
            let mut v = base();
            v[key] = value;
            let err = hf(v).expect_err(key);
            assert_eq!(err.exit_code(), 2);
            assert!(
                err.to_string().contains(needle) && err.to_string().contains("x/config.json"),
                "{err}"
            );
        }
        let mut v = base();
        v.as_object_mut().expect("o").remove("hidden_size");
        assert!(hf(v).expect_err("missing").to_string().contains("hidden_size"));
    }

    #[test]
    fn params_are_checked_against_each_other_and_the_checkpoint() {
        let ck = hf(base()).expect("ck");
        let check = |json: serde_json::Value, ckpt: Option<&LlamaConfig>| -> Result<LlamaConfig> {
            let params = Params::new("student", json.as_object().expect("o").clone());
            let p: LlamaParams = params.parse()?;
            LlamaConfig::resolve(&p, &params, ckpt, Some(50))
        };
        assert_eq!(check(serde_json::json!({}), None).expect("defaults").vocab_size, 50);
        let err = check(serde_json::json!({"n_head": 3}), None).expect_err("divides");
        assert!(err.to_string().contains("student.n_head"), "{err}");
        let err = check(serde_json::json!({"n_kv_head": 3}), None).expect_err("gqa");
        assert!(err.to_string().contains("student.n_kv_head"), "{err}");
        let err = check(serde_json::json!({"n_layer": 5}), Some(&ck)).expect_err("disagrees");
        assert!(err.to_string().contains("disagrees with the checkpoint's 2"), "{err}");
        // A checkpoint's context is a default, not a constraint; bf16 checkpoints compute in f32.
        let c = check(serde_json::json!({"context": 64}), Some(&ck)).expect("ok");
        assert_eq!((c.context, c.vocab_size, c.dtype), (64, 100, DType::F32));
    }
}
