//! A decoder-only transformer in the GPT-2 architecture (Radford et al., 2019): learned token and
//! position embeddings, pre-LayerNorm blocks of causal multi-head attention and a 4x MLP, a final
//! LayerNorm and an output head tied to the token embedding.
//!
//! Weight names and layouts follow Hugging Face's `GPT2LMHeadModel` (`transformer.h.0.attn.c_attn.weight`,
//! linear weights stored `[in, out]` as in its `Conv1D`), so a saved student is a Hugging Face
//! model directory. Every op is differentiable (see `nn.rs`), and nothing assumes the CPU: the
//! device comes from the build context.

mod decode;

pub use decode::TransformerDecoder;

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor, Var};
use retort_core::LM_HEAD_TAP;

use crate::models::lm_head_outputs;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::{Deserialize, Serialize};

use retort_core::{fsutil, Batch, Error, Model, ModelInfo, Outputs, Params, Result, Student, TapSet};

use super::nn::{linear, matmul};
use crate::kernels::attention::causal_attention_packed;
use crate::kernels::cpu::gpt2_block::{self, gpt2_block, BlockParams};
use crate::kernels::gelu::gelu;
use crate::kernels::layer_norm::layer_norm;
use crate::kernels::softmax::{causal_mask, causal_softmax};

/// Activation of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Activation {
    /// GELU, tanh approximation (GPT-2's `gelu_new`).
    Gelu,
    /// ReLU.
    Relu,
}

impl Activation {
    fn hf_name(self) -> &'static str {
        match self {
            Activation::Gelu => "gelu_new",
            Activation::Relu => "relu",
        }
    }
    fn from_hf(name: &str) -> Option<Self> {
        match name {
            "gelu_new" | "gelu_pytorch_tanh" | "gelu" => Some(Activation::Gelu),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }
}

/// Config-file parameters of the `transformer` kind. Architecture fields are optional: with a
/// `checkpoint` they come from its `config.json` (and any given value must agree); without one,
/// the defaults below apply.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TransformerParams {
    /// Blocks. Default 2.
    pub n_layer: Option<usize>,
    /// Width of the residual stream. Default 64.
    pub n_embd: Option<usize>,
    /// Attention heads; must divide `n_embd`. Default 4.
    pub n_head: Option<usize>,
    /// Longest window (learned positions). Default 256.
    pub context: Option<usize>,
    /// Output vocabulary. Default: the data's tokenizer vocabulary.
    pub vocab_size: Option<usize>,
    /// `gelu` (default) or `relu`.
    pub activation: Option<Activation>,
    /// Parameter dtype: `f32` (default) or `f64`; a frozen teacher may also run in `bf16` or
    /// `f16` (matmuls in that type; LayerNorm and softmax computed in f32; outputs returned as
    /// f32). Set it for a teacher with `teacher.precision`.
    pub dtype: Option<String>,
    /// Std of the normal init (residual projections scaled by `1/sqrt(2 n_layer)`). Default 0.02.
    pub init_std: Option<f64>,
    /// LayerNorm epsilon. Default 1e-5.
    pub layer_norm_eps: Option<f64>,
    /// A Hugging Face directory (`config.json`, `model.safetensors`) to load weights from.
    pub checkpoint: Option<PathBuf>,
}

/// The resolved architecture.
#[derive(Debug, Clone, PartialEq)]
pub struct TransformerConfig {
    /// Output vocabulary.
    pub vocab_size: usize,
    /// Longest window.
    pub context: usize,
    /// Blocks.
    pub n_layer: usize,
    /// Residual width.
    pub n_embd: usize,
    /// Attention heads.
    pub n_head: usize,
    /// MLP activation.
    pub activation: Activation,
    /// LayerNorm epsilon.
    pub layer_norm_eps: f64,
    /// Init std.
    pub init_std: f64,
    /// Parameter dtype.
    pub dtype: DType,
}

impl TransformerConfig {
    /// Resolves params at `params.path()` against an optional checkpoint and the data vocab.
    pub fn resolve(params: &Params, data_vocab: Option<usize>) -> Result<(Self, Option<PathBuf>)> {
        let p: TransformerParams = params.parse()?;
        let from_ckpt = match &p.checkpoint {
            Some(dir) => Some(read_hf_config(dir, &params.key_path("checkpoint"))?),
            None => None,
        };
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
        let c = from_ckpt.as_ref();
        let n_layer = pick("n_layer", p.n_layer, c.map(|c| c.n_layer), 2)?;
        let n_embd = pick("n_embd", p.n_embd, c.map(|c| c.n_embd), 64)?;
        let n_head = pick("n_head", p.n_head, c.map(|c| c.n_head), 4)?;
        let context = pick("context", p.context, c.map(|c| c.context), 256)?;
        let vocab_default = data_vocab.unwrap_or(0);
        let vocab_size = pick("vocab_size", p.vocab_size, c.map(|c| c.vocab_size), vocab_default)?;
        for (key, v) in [
            ("n_layer", n_layer),
            ("n_embd", n_embd),
            ("n_head", n_head),
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
        let activation = match (p.activation, c.map(|c| c.activation)) {
            (Some(a), Some(b)) if a != b => {
                return Err(params.error("activation", "disagrees with the checkpoint"));
            }
            (a, b) => a.or(b).unwrap_or(Activation::Gelu),
        };
        let dtype = match p.dtype.as_deref().unwrap_or("f32") {
            "f32" => DType::F32,
            "f64" => DType::F64,
            "bf16" => DType::BF16,
            "f16" => DType::F16,
            other => {
                return Err(params.error(
                    "dtype",
                    format!("expected \"f32\", \"f64\", \"bf16\" or \"f16\", got \"{other}\""),
                ))
            }
        };
        let layer_norm_eps = p.layer_norm_eps.or(c.map(|c| c.layer_norm_eps)).unwrap_or(1e-5);
        params.require_positive("layer_norm_eps", layer_norm_eps)?;
        let init_std = p.init_std.or(c.map(|c| c.init_std)).unwrap_or(0.02);
        params.require_positive("init_std", init_std)?;
        let cfg = TransformerConfig {
            vocab_size,
            context,
            n_layer,
            n_embd,
            n_head,
            activation,
            layer_norm_eps,
            init_std,
            dtype,
        };
        Ok((cfg.checked_size(params)?, p.checkpoint))
    }

    /// Parameters of the model: embeddings, blocks (attention, MLP of 4x, two LayerNorms),
    /// final LayerNorm; the head is tied.
    /// In `f64`: exact below 2^53, never overflowing for the absurd sizes it exists to refuse.
    pub fn param_count(&self) -> f64 {
        let (e, v, l) = (self.n_embd as f64, self.vocab_size as f64, self.n_layer as f64);
        (v + self.context as f64) * e + l * (12.0 * e * e + 13.0 * e) + 2.0 * e
    }

    /// `self`, unless its parameters cannot fit in this host's memory (a failed allocation
    /// aborts the process: refuse first).
    fn checked_size(self, params: &Params) -> Result<Self> {
        let bytes = (self.param_count() * self.dtype.size_in_bytes() as f64) as u128;
        let what = format!("a transformer of {:.3e} parameters", self.param_count());
        retort_core::memory::ensure_host_can_allocate(params.path(), &what, bytes)?;
        Ok(self)
    }

    /// Hugging Face `config.json` for `GPT2LMHeadModel`.
    pub fn to_hf_json(&self) -> serde_json::Value {
        serde_json::json!({
            "model_type": "gpt2",
            "architectures": ["GPT2LMHeadModel"],
            "vocab_size": self.vocab_size,
            "n_positions": self.context,
            "n_ctx": self.context,
            "n_embd": self.n_embd,
            "n_layer": self.n_layer,
            "n_head": self.n_head,
            "n_inner": 4 * self.n_embd,
            "activation_function": self.activation.hf_name(),
            "layer_norm_epsilon": self.layer_norm_eps,
            "initializer_range": self.init_std,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
            "tie_word_embeddings": true,
            "torch_dtype": if self.dtype == DType::F64 { "float64" } else { "float32" },
        })
    }
}

fn read_hf_config(dir: &Path, key_path: &str) -> Result<TransformerConfig> {
    let file = dir.join("config.json");
    let text = std::fs::read_to_string(&file).map_err(|e| {
        Error::input_failed(
            format!("{key_path} = {}", dir.display()),
            format!("cannot read {}", file.display()),
            e,
        )
    })?;
    let what = || format!("checkpoint config {}", file.display());
    let bad = |m: String| Error::input(what(), m);
    let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Error::input_failed(what(), "not JSON", e))?;
    let get = |k: &str| -> Result<usize> {
        v.get(k)
            .and_then(serde_json::Value::as_u64)
            .map(|x| x as usize)
            .ok_or_else(|| bad(format!("missing integer `{k}`")))
    };
    if v.get("model_type").and_then(|m| m.as_str()) != Some("gpt2") {
        return Err(bad("expected \"model_type\": \"gpt2\"".into()));
    }
    let act = v
        .get("activation_function")
        .and_then(|a| a.as_str())
        .unwrap_or("gelu_new");
    let dtype = match v.get("torch_dtype").and_then(|d| d.as_str()) {
        Some("float64") => DType::F64,
        _ => DType::F32,
    };
    Ok(TransformerConfig {
        vocab_size: get("vocab_size")?,
        context: get("n_positions")?,
        n_layer: get("n_layer")?,
        n_embd: get("n_embd")?,
        n_head: get("n_head")?,
        activation: Activation::from_hf(act).ok_or_else(|| bad(format!("unsupported activation `{act}`")))?,
        layer_norm_eps: v.get("layer_norm_epsilon").and_then(|e| e.as_f64()).unwrap_or(1e-5),
        init_std: v.get("initializer_range").and_then(|e| e.as_f64()).unwrap_or(0.02),
        dtype,
    })
}

struct Block {
    ln_1: (Tensor, Tensor),
    c_attn: (Tensor, Tensor),
    attn_proj: (Tensor, Tensor),
    ln_2: (Tensor, Tensor),
    c_fc: (Tensor, Tensor),
    mlp_proj: (Tensor, Tensor),
}

/// The GPT-2-style transformer. Trainable ([`Student`]) or, through `FrozenTeacher`, a teacher.
pub struct Transformer {
    cfg: TransformerConfig,
    vars: Vec<(String, Var)>,
    wte: Tensor,
    wpe: Tensor,
    blocks: Vec<Block>,
    ln_f: (Tensor, Tensor),
    mask: Tensor,
    /// Mixed precision: the dtype the forward pass computes in when it differs from the
    /// weights' (see [`Transformer::computing_in`]).
    compute: Option<DType>,
}

/// `(name, shape, init std)` of every parameter, in checkpoint order; std 0 = zeros, NaN = ones.
fn param_specs(c: &TransformerConfig) -> Vec<(String, Vec<usize>, f64)> {
    let d = c.n_embd;
    let std = c.init_std;
    let proj_std = std / (2.0 * c.n_layer as f64).sqrt();
    let mut v = vec![
        ("transformer.wte.weight".to_string(), vec![c.vocab_size, d], std),
        ("transformer.wpe.weight".to_string(), vec![c.context, d], std / 2.0),
    ];
    for i in 0..c.n_layer {
        let p = |n: &str| format!("transformer.h.{i}.{n}");
        v.push((p("ln_1.weight"), vec![d], f64::NAN));
        v.push((p("ln_1.bias"), vec![d], 0.0));
        v.push((p("attn.c_attn.weight"), vec![d, 3 * d], std));
        v.push((p("attn.c_attn.bias"), vec![3 * d], 0.0));
        v.push((p("attn.c_proj.weight"), vec![d, d], proj_std));
        v.push((p("attn.c_proj.bias"), vec![d], 0.0));
        v.push((p("ln_2.weight"), vec![d], f64::NAN));
        v.push((p("ln_2.bias"), vec![d], 0.0));
        v.push((p("mlp.c_fc.weight"), vec![d, 4 * d], std));
        v.push((p("mlp.c_fc.bias"), vec![4 * d], 0.0));
        v.push((p("mlp.c_proj.weight"), vec![4 * d, d], proj_std));
        v.push((p("mlp.c_proj.bias"), vec![d], 0.0));
    }
    v.push(("transformer.ln_f.weight".into(), vec![d], f64::NAN));
    v.push(("transformer.ln_f.bias".into(), vec![d], 0.0));
    v
}

const SAFETENSORS: &str = "model.safetensors";

impl Transformer {
    /// A freshly initialised model; the init depends only on `seed` (it is drawn on the host and
    /// copied to `device`, so CPU and GPU runs start from the same weights).
    pub fn init(cfg: TransformerConfig, seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut tensors = HashMap::new();
        for (name, shape, std) in param_specs(&cfg) {
            let n: usize = shape.iter().product();
            let data: Vec<f32> = if std.is_nan() {
                vec![1.0; n]
            } else if std == 0.0 {
                vec![0.0; n]
            } else {
                let normal = Normal::new(0.0f32, std as f32).map_err(|e| Error::failed("weight init", e))?;
                (0..n).map(|_| normal.sample(&mut rng)).collect()
            };
            let t = Tensor::from_vec(data, shape, device)?.to_dtype(cfg.dtype)?;
            tensors.insert(name, t);
        }
        Self::from_tensors(cfg, tensors, device)
    }

    /// Loads weights from a Hugging Face directory (`model.safetensors`), checking every name
    /// and shape.
    pub fn load(cfg: TransformerConfig, dir: &Path, device: &Device) -> Result<Self> {
        let file = dir.join(SAFETENSORS);
        if !file.is_file() {
            return Err(Error::input(
                format!("checkpoint {}", dir.display()),
                format!("{} is missing", file.display()),
            ));
        }
        let loaded = crate::formats::safetensors::load(&file, device, &format!("checkpoint {}", dir.display()))?;
        let mut tensors = HashMap::new();
        for (name, shape, _) in param_specs(&cfg) {
            let t = loaded.get(&name).ok_or_else(|| {
                Error::input(
                    format!("checkpoint {}", file.display()),
                    format!("tensor `{name}` is missing"),
                )
            })?;
            if t.dims() != shape.as_slice() {
                return Err(Error::input(
                    format!("checkpoint {}", file.display()),
                    format!("tensor `{name}` has shape {:?}, expected {shape:?}", t.dims()),
                ));
            }
            tensors.insert(name, t.to_dtype(cfg.dtype)?);
        }
        Self::from_tensors(cfg, tensors, device)
    }

    fn from_tensors(cfg: TransformerConfig, mut tensors: HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let mut vars = Vec::new();
        for (name, _, _) in param_specs(&cfg) {
            let t = tensors
                .remove(&name)
                .ok_or_else(|| Error::Runtime(format!("missing tensor {name}")))?;
            vars.push((name, Var::from_tensor(&t)?));
        }
        let by_name: HashMap<&str, Tensor> = vars.iter().map(|(n, v)| (n.as_str(), v.as_tensor().clone())).collect();
        let get = |n: &str| -> Result<Tensor> {
            by_name
                .get(n)
                .cloned()
                .ok_or_else(|| Error::Runtime(format!("missing tensor {n}")))
        };
        let pair =
            |p: &str| -> Result<(Tensor, Tensor)> { Ok((get(&format!("{p}.weight"))?, get(&format!("{p}.bias"))?)) };
        let blocks = (0..cfg.n_layer)
            .map(|i| {
                let p = |n: &str| format!("transformer.h.{i}.{n}");
                Ok(Block {
                    ln_1: pair(&p("ln_1"))?,
                    c_attn: pair(&p("attn.c_attn"))?,
                    attn_proj: pair(&p("attn.c_proj"))?,
                    ln_2: pair(&p("ln_2"))?,
                    c_fc: pair(&p("mlp.c_fc"))?,
                    mlp_proj: pair(&p("mlp.c_proj"))?,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mask = causal_mask(cfg.context, cfg.dtype, device)?;
        Ok(Transformer {
            wte: get("transformer.wte.weight")?,
            wpe: get("transformer.wpe.weight")?,
            ln_f: pair("transformer.ln_f")?,
            blocks,
            vars,
            mask,
            compute: None,
            cfg,
        })
    }

    /// The resolved architecture.
    pub fn config(&self) -> &TransformerConfig {
        &self.cfg
    }

    /// Whether the model computes in a half type (bf16/f16): reductions then run in f32.
    fn is_half(&self) -> bool {
        matches!(self.cfg.dtype, DType::BF16 | DType::F16)
    }

    /// LayerNorm with `(weight, bias)`; in f32 for a half-precision model (a variance summed
    /// in bf16 loses most of its digits).
    fn norm(&self, x: &Tensor, wb: &(Tensor, Tensor), eps: f64) -> Result<Tensor> {
        if self.is_half() {
            let f = |t: &Tensor| t.to_dtype(DType::F32);
            Ok(layer_norm(&f(x)?, &f(&wb.0)?, &f(&wb.1)?, eps)?.to_dtype(self.cfg.dtype)?)
        } else {
            Ok(layer_norm(x, &wb.0, &wb.1, eps)?)
        }
    }

    fn block_forward(&self, blk: &Block, x: &Tensor, want_attn: bool) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, d) = x.dims3()?;
        let nh = self.cfg.n_head;
        let hd = d / nh;
        let eps = self.cfg.layer_norm_eps;
        let params = BlockParams {
            ln_1: (&blk.ln_1.0, &blk.ln_1.1),
            c_attn: (&blk.c_attn.0, &blk.c_attn.1),
            attn_proj: (&blk.attn_proj.0, &blk.attn_proj.1),
            ln_2: (&blk.ln_2.0, &blk.ln_2.1),
            c_fc: (&blk.c_fc.0, &blk.c_fc.1),
            mlp_proj: (&blk.mlp_proj.0, &blk.mlp_proj.1),
        };
        let whole_block = !want_attn && !self.is_half() && self.cfg.activation == Activation::Gelu;
        if whole_block && gpt2_block::supports(x, &params) {
            // The whole block as one node on CPU f32/f64 (`kernels::cpu::gpt2_block`): the same
            // arithmetic as below, with a hand-written backward.
            return Ok((gpt2_block(x, &params, nh, eps)?, None));
        }
        let h = self.norm(x, &blk.ln_1, eps)?;
        let qkv = linear(&h, &blk.c_attn.0, &blk.c_attn.1)?;
        let scale = 1.0 / (hd as f64).sqrt();
        let mask = self.mask.narrow(0, 0, t)?.narrow(1, 0, t)?;
        let (y, probs) = if !want_attn && !self.is_half() {
            // One fused node reading q, k, v in place from the projection where the kernel
            // runs (CPU f32/f64), the composite (device-generic) attention elsewhere.
            (causal_attention_packed(&qkv, nh, nh, scale, &mask)?, None)
        } else {
            let qkv = qkv.reshape((b, t, 3, nh, hd))?.permute((2, 0, 3, 1, 4))?;
            let q = (qkv.get(0)? * scale)?.contiguous()?;
            let k = qkv.get(1)?.contiguous()?;
            let v = qkv.get(2)?.contiguous()?;
            let scores = matmul(&q, &k.t()?)?;
            let probs = if self.is_half() {
                // Reductions in f32 for a half-precision teacher.
                causal_softmax(&scores.to_dtype(DType::F32)?, &mask.to_dtype(DType::F32)?)?.to_dtype(self.cfg.dtype)?
            } else {
                causal_softmax(&scores, &mask)?
            };
            let y = matmul(&probs, &v)?.transpose(1, 2)?.reshape((b, t, d))?;
            (y, Some(probs))
        };
        Ok((self.after_attention(blk, x, &y)?, probs.filter(|_| want_attn)))
    }

    /// The rest of a block after attention's output `y`: `x + proj(y)`, then the MLP with its
    /// residual.
    fn after_attention(&self, blk: &Block, x: &Tensor, y: &Tensor) -> Result<Tensor> {
        let x = (x + linear(y, &blk.attn_proj.0, &blk.attn_proj.1)?)?;
        let h = self.norm(&x, &blk.ln_2, self.cfg.layer_norm_eps)?;
        let a = linear(&h, &blk.c_fc.0, &blk.c_fc.1)?;
        let a = match self.cfg.activation {
            Activation::Gelu => gelu(&a)?,
            Activation::Relu => a.relu()?,
        };
        Ok((x + linear(&a, &blk.mlp_proj.0, &blk.mlp_proj.1)?)?)
    }
}

impl Model for Transformer {
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs> {
        if let Some(dtype) = self.compute {
            let mut cast = self.map_tensors(&mut |t| t.to_dtype(dtype))?;
            cast.cfg.dtype = dtype;
            return cast.forward(batch, taps);
        }
        let ids = &batch.input_ids;
        let (b, t) = ids.dims2()?;
        if t > self.cfg.context {
            return Err(Error::Incompatible(format!(
                "window of {t} tokens is longer than the model context {}",
                self.cfg.context
            )));
        }
        let d = self.cfg.n_embd;
        let tok = crate::kernels::cpu::embedding::embedding(&self.wte, ids)?;
        let mut x = tok.broadcast_add(&self.wpe.narrow(0, 0, t)?)?;
        let mut out = std::collections::BTreeMap::new();
        if taps.wants_hidden(0) {
            out.insert("hidden.0".to_string(), x.clone());
        }
        for (i, blk) in self.blocks.iter().enumerate() {
            let (nx, attn) = self.block_forward(blk, &x, taps.wants_attention(i))?;
            x = nx;
            if let Some(a) = attn {
                out.insert(format!("attn.{i}"), a);
            }
            if taps.wants_hidden(i + 1) {
                out.insert(format!("hidden.{}", i + 1), x.clone());
            }
        }
        let x = self.norm(&x, &self.ln_f, self.cfg.layer_norm_eps)?;
        if taps.contains(LM_HEAD_TAP) {
            // The head is the token embedding: logits = x wte^T.
            return Ok(lm_head_outputs(x, self.wte.clone(), out)?);
        }
        let logits = x
            .reshape((b * t, d))
            .and_then(|x| matmul(&x, &self.wte.t()?))?
            .reshape((b, t, self.cfg.vocab_size))?;
        Ok(Outputs { logits, taps: out })
    }

    fn vocab_size(&self) -> usize {
        self.cfg.vocab_size
    }

    fn context_len(&self) -> usize {
        self.cfg.context
    }

    fn num_params(&self) -> usize {
        self.vars.iter().map(|(_, v)| v.elem_count()).sum()
    }

    fn available_taps(&self) -> Vec<String> {
        let mut v = vec!["logits".to_string()];
        v.extend((0..=self.cfg.n_layer).map(|i| format!("hidden.{i}")));
        v.extend((0..self.cfg.n_layer).map(|i| format!("attn.{i}")));
        v.push(LM_HEAD_TAP.to_string());
        v
    }

    fn describe(&self) -> String {
        let c = &self.cfg;
        let (compute, stored) = self.precision();
        let precision = if compute == stored {
            format!("{compute:?}").to_lowercase()
        } else {
            format!("{compute:?} compute, {stored:?} master weights").to_lowercase()
        };
        format!(
            "transformer {}L/{}d/{}h ctx {} vocab {} ({} params, {precision})",
            c.n_layer,
            c.n_embd,
            c.n_head,
            c.context,
            c.vocab_size,
            self.num_params()
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
            dtype: self.cfg.dtype,
        }
    }

    fn decoder(&self) -> Option<Box<dyn retort_core::Decoder + '_>> {
        Some(Box::new(TransformerDecoder::new(self)))
    }
}

impl Transformer {
    /// The same model with its weights cut off from autograd (for a frozen teacher: its
    /// forward pass then builds no graph).
    pub fn frozen(self) -> Self {
        match self.map_tensors::<Infallible>(&mut |t| Ok(t.detach())) {
            Ok(model) => Transformer {
                vars: self.vars,
                compute: self.compute,
                ..model
            },
            Err(never) => match never {},
        }
    }

    /// Mixed precision: the same model computing its forward pass in `dtype` (bf16) from its
    /// weights in their own dtype (f32 master weights, what the optimizer updates), through a
    /// differentiable cast of every weight per forward pass.
    pub fn computing_in(mut self, dtype: DType) -> Self {
        self.compute = (dtype != self.cfg.dtype).then_some(dtype);
        self
    }

    /// The dtype the forward pass computes in, and the dtype the weights are kept in.
    pub fn precision(&self) -> (DType, DType) {
        (self.compute.unwrap_or(self.cfg.dtype), self.cfg.dtype)
    }

    /// The model's tensors with `f` applied to each (the token embedding, also the head, once);
    /// no variables, computing in the tensors' own dtype.
    fn map_tensors<E>(
        &self,
        f: &mut dyn FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        let mut pair = |p: &(Tensor, Tensor)| -> std::result::Result<(Tensor, Tensor), E> { Ok((f(&p.0)?, f(&p.1)?)) };
        let blocks = self
            .blocks
            .iter()
            .map(|b| {
                Ok(Block {
                    ln_1: pair(&b.ln_1)?,
                    c_attn: pair(&b.c_attn)?,
                    attn_proj: pair(&b.attn_proj)?,
                    ln_2: pair(&b.ln_2)?,
                    c_fc: pair(&b.c_fc)?,
                    mlp_proj: pair(&b.mlp_proj)?,
                })
            })
            .collect::<std::result::Result<_, E>>()?;
        let ln_f = pair(&self.ln_f)?;
        Ok(Transformer {
            cfg: self.cfg.clone(),
            vars: Vec::new(),
            wte: f(&self.wte)?,
            wpe: f(&self.wpe)?,
            blocks,
            ln_f,
            mask: f(&self.mask)?,
            compute: None,
        })
    }
}

impl Student for Transformer {
    fn vars(&self) -> Vec<(String, Var)> {
        self.vars.clone()
    }

    fn config_json(&self) -> serde_json::Value {
        self.cfg.to_hf_json()
    }

    fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io("creating model directory", dir, e))?;
        let map: HashMap<String, Tensor> = self
            .vars
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
            .collect();
        let file = dir.join(SAFETENSORS);
        let temp = fsutil::temp_path(&file);
        candle_core::safetensors::save(&map, &temp)?;
        fsutil::commit_temp(&temp, &file)?;
        let json =
            serde_json::to_vec_pretty(&self.config_json()).map_err(|e| Error::failed("serialising config.json", e))?;
        fsutil::write_atomic(&dir.join("config.json"), &json)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::mean_cross_entropy as cross_entropy;

    fn tiny(dtype: &str, act: &str) -> Transformer {
        let params = Params::new(
            "student",
            serde_json::json!({"n_layer": 2, "n_embd": 8, "n_head": 2, "context": 6, "vocab_size": 7,
                               "dtype": dtype, "activation": act, "init_std": 0.3})
            .as_object()
            .expect("object")
            .clone(),
        );
        let (cfg, _) = TransformerConfig::resolve(&params, None).expect("resolve");
        Transformer::init(cfg, 7, &Device::Cpu).expect("init")
    }

    fn batch(t: usize) -> Batch {
        let ids: Vec<u32> = (0..2 * t).map(|i| ((i * 5 + 3) % 7) as u32).collect();
        let tg: Vec<u32> = (0..2 * t).map(|i| ((i * 3 + 1) % 7) as u32).collect();
        Batch {
            input_ids: Tensor::from_vec(ids, (2, t), &Device::Cpu).expect("ids"),
            targets: Tensor::from_vec(tg, (2, t), &Device::Cpu).expect("tg"),
            mask: None,
            source: None,
        }
    }

    /// The cross-entropy gradient of every variable of `m`, as f64 values.
    fn ce_gradients(m: &Transformer) -> Vec<Vec<f64>> {
        let logits = m.forward(&batch(5), &TapSet::none()).expect("fwd").logits;
        let l = cross_entropy(&logits.to_dtype(DType::F32).expect("f32"), &batch(5).targets, None, 0.0).expect("ce");
        let grads = l.backward().expect("bwd");
        m.vars
            .iter()
            .map(|(n, v)| {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{n}: no gradient"));
                assert_eq!(g.dtype(), DType::F32, "{n}");
                g.to_dtype(DType::F64)
                    .and_then(|g| g.flatten_all())
                    .and_then(|g| g.to_vec1())
                    .expect("grad")
            })
            .collect()
    }

    #[test]
    fn bf16_mixed_precision_computes_in_bf16_and_trains_f32_master_weights() {
        let full = tiny("f32", "gelu");
        let mixed = tiny("f32", "gelu").computing_in(DType::BF16);
        assert_eq!(mixed.precision(), (DType::BF16, DType::F32));
        assert!(
            mixed.describe().contains("bf16 compute, f32 master weights"),
            "{}",
            mixed.describe()
        );
        let logits = mixed.forward(&batch(5), &TapSet::none()).expect("fwd").logits;
        assert_eq!(logits.dtype(), DType::BF16);
        for (((name, _), a), b) in mixed.vars.iter().zip(ce_gradients(&mixed)).zip(ce_gradients(&full)) {
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
            let err = a.iter().zip(&b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
            assert!(err < 0.1, "{name}: bf16 gradient off by {err:.3} of its scale");
        }
        // Frozen, it keeps computing in bf16.
        let frozen = mixed.frozen();
        assert_eq!(frozen.precision(), (DType::BF16, DType::F32));
    }

    #[test]
    fn the_lm_head_tap_hands_out_the_head_of_the_logits() {
        let m = tiny("f64", "gelu");
        assert!(m.available_taps().iter().any(|t| t == LM_HEAD_TAP));
        crate::testing::check_lm_head_tap(&m, &batch(5), 1e-12);
    }

    fn loss(m: &Transformer, b: &Batch) -> Tensor {
        let out = m.forward(b, &TapSet::none()).expect("fwd");
        cross_entropy(&out.logits, &b.targets, None, 0.0).expect("ce")
    }

    #[test]
    fn every_parameter_gets_a_finite_nonzero_gradient() {
        for act in ["gelu", "relu"] {
            let m = tiny("f32", act);
            let b = batch(6);
            let grads = loss(&m, &b).backward().expect("bwd");
            for (name, var) in m.vars() {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{act}: no gradient for {name}"));
                let v: Vec<f32> = g.flatten_all().expect("f").to_vec1().expect("v");
                assert!(v.iter().all(|x| x.is_finite()), "{act}: non-finite gradient for {name}");
                assert!(v.iter().any(|x| *x != 0.0), "{act}: all-zero gradient for {name}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        let m = tiny("f64", "gelu");
        let b = batch(5);
        let checked = crate::testing::check_gradients_by_finite_differences(&m.vars(), || loss(&m, &b), "transformer");
        assert!(checked >= 3 * 28);
    }

    #[test]
    fn taps_are_computed_only_when_asked() {
        let m = tiny("f32", "gelu");
        let b = batch(4);
        let none = m.forward(&b, &TapSet::none()).expect("fwd");
        assert!(none.taps.is_empty());
        let taps: TapSet = ["hidden.2", "attn.1"].into_iter().collect();
        let out = m.forward(&b, &taps).expect("fwd");
        assert_eq!(out.tap("hidden.2").expect("h").dims(), &[2, 4, 8]);
        let attn = out.tap("attn.1").expect("a");
        assert_eq!(attn.dims(), &[2, 2, 4, 4]);
        // Causal: row 0 attends only to position 0; rows sum to one.
        let a: Vec<Vec<f32>> = attn.get(0).expect("g").get(0).expect("g").to_vec2().expect("v");
        assert!((a[0][0] - 1.0).abs() < 1e-6 && a[0][1] == 0.0);
        for row in &a {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert!(out.tap("hidden.9").is_err());
    }

    #[test]
    fn save_and_load_round_trip_in_hf_layout() {
        let m = tiny("f32", "gelu");
        let dir = tempfile::tempdir().expect("tmp");
        m.save(dir.path()).expect("save");
        let cfg_json: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.path().join("config.json")).expect("read")).expect("json");
        assert_eq!(cfg_json["model_type"], "gpt2");
        assert_eq!(cfg_json["n_layer"], 2);
        let names = candle_core::safetensors::load(dir.path().join("model.safetensors"), &Device::Cpu).expect("load");
        assert!(names.contains_key("transformer.h.1.attn.c_attn.weight"));
        assert_eq!(names["transformer.h.0.mlp.c_fc.weight"].dims(), &[8, 32]);
        let params = Params::new(
            "teacher",
            serde_json::json!({"checkpoint": dir.path()})
                .as_object()
                .expect("o")
                .clone(),
        );
        let (cfg, ckpt) = TransformerConfig::resolve(&params, None).expect("resolve");
        assert_eq!(&cfg, m.config());
        let back = Transformer::load(cfg, &ckpt.expect("ckpt"), &Device::Cpu).expect("load");
        let b = batch(4);
        let a = m.forward(&b, &TapSet::none()).expect("f").logits;
        let c = back.forward(&b, &TapSet::none()).expect("f").logits;
        let diff = (a - c)
            .expect("d")
            .abs()
            .expect("a")
            .max_all()
            .expect("m")
            .to_scalar::<f32>()
            .expect("s");
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn checkpoint_disagreement_is_a_config_error() {
        let m = tiny("f32", "gelu");
        let dir = tempfile::tempdir().expect("tmp");
        m.save(dir.path()).expect("save");
        let params = Params::new(
            "teacher",
            serde_json::json!({"checkpoint": dir.path(), "n_layer": 3})
                .as_object()
                .expect("o")
                .clone(),
        );
        let err = TransformerConfig::resolve(&params, None).expect_err("must fail");
        assert_eq!(err.exit_code(), 2);
        assert!(err.to_string().contains("teacher.n_layer"), "{err}");
    }
}
