//! The llama decoder (Touvron et al., 2023): token embedding, pre-RMSNorm blocks of causal
//! grouped-query attention with rotary positions and a SwiGLU MLP (or a sparse mixture of
//! SwiGLU experts, Jiang et al., 2024 "Mixtral"), a final RMSNorm and an output head, tied to
//! the embedding or not.
//!
//! Parameter names follow Hugging Face's `LlamaForCausalLM` (`model.embed_tokens.weight`,
//! `model.layers.0.self_attn.q_proj.weight`, ..., `model.norm.weight`, `lm_head.weight`), so a
//! saved student is a Hugging Face directory. Every op on the training path is differentiable
//! (see `nn.rs`); weights may instead be quantized GGUF tensors for a frozen teacher.
//!
//! The architecture only: fresh weights are drawn in `init.rs`, retort's `Model`/`Student`
//! contracts are in `traits.rs`, and weights are read and written by `checkpoint.rs` (Hugging
//! Face directories), `gguf.rs` and `source.rs`.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;

use candle_core::quantized::QTensor;
use candle_core::{DType, Device, Tensor, TensorId, Var, D};

use retort_core::taps::LM_HEAD_BF16_PRODUCTS;
use retort_core::{Error, Outputs, Result, TapSet, LM_HEAD_TAP};

use super::config::LlamaConfig;
use super::linear::{Linear, Weight};
use super::rope::Rope;
use crate::kernels::{attention, rms_norm::rms_norm, softmax::causal_mask, softmax::softmax_last, swiglu};
use crate::models::lm_head_outputs;
use crate::models::nn::matmul;

/// How a parameter is initialised.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// Normal with this std.
    Normal(f64),
    /// All zeros (biases).
    Zeros,
    /// All ones (norm weights).
    Ones,
}

/// `(name, shape, init)` of every parameter, in checkpoint order (Hugging Face names).
pub fn param_specs(c: &LlamaConfig) -> Vec<(String, Vec<usize>, Init)> {
    let (d, hd, i) = (c.n_embd, c.head_dim(), c.intermediate);
    let kv = c.n_kv_head * hd;
    let std = Init::Normal(c.init_std);
    let mut v = vec![("model.embed_tokens.weight".to_string(), vec![c.vocab_size, d], std)];
    for l in 0..c.n_layer {
        let p = |n: &str| format!("model.layers.{l}.{n}");
        v.push((p("input_layernorm.weight"), vec![d], Init::Ones));
        for (name, rows) in [("q_proj", d), ("k_proj", kv), ("v_proj", kv)] {
            v.push((p(&format!("self_attn.{name}.weight")), vec![rows, d], std));
            if c.qkv_bias {
                v.push((p(&format!("self_attn.{name}.bias")), vec![rows], Init::Zeros));
            }
        }
        v.push((p("self_attn.o_proj.weight"), vec![d, d], std));
        if c.o_bias {
            v.push((p("self_attn.o_proj.bias"), vec![d], Init::Zeros));
        }
        v.push((p("post_attention_layernorm.weight"), vec![d], Init::Ones));
        if c.n_experts == 0 {
            v.push((p("mlp.gate_proj.weight"), vec![i, d], std));
            v.push((p("mlp.up_proj.weight"), vec![i, d], std));
            v.push((p("mlp.down_proj.weight"), vec![d, i], std));
        } else {
            v.push((p("block_sparse_moe.gate.weight"), vec![c.n_experts, d], std));
            for e in 0..c.n_experts {
                v.push((p(&format!("block_sparse_moe.experts.{e}.w1.weight")), vec![i, d], std));
                v.push((p(&format!("block_sparse_moe.experts.{e}.w2.weight")), vec![d, i], std));
                v.push((p(&format!("block_sparse_moe.experts.{e}.w3.weight")), vec![i, d], std));
            }
        }
    }
    v.push(("model.norm.weight".to_string(), vec![d], Init::Ones));
    if !c.tie_embeddings {
        v.push(("lm_head.weight".to_string(), vec![c.vocab_size, d], std));
    }
    v
}

/// A weight as loaded from a checkpoint: dense, or a quantized GGUF tensor.
#[derive(Debug, Clone)]
pub enum Part {
    /// Dense tensor.
    Dense(Tensor),
    /// Quantized tensor (matmuls through the CPU block kernels or `QMatMul`, see `linear.rs`;
    /// norms and embeddings are dequantized).
    Quantized(Arc<QTensor>),
}

impl Part {
    fn dims(&self) -> Vec<usize> {
        match self {
            Part::Dense(t) => t.dims().to_vec(),
            Part::Quantized(q) => q.shape().dims().to_vec(),
        }
    }
    fn dense(&self, device: &Device, dtype: DType) -> Result<Tensor> {
        Ok(match self {
            Part::Dense(t) => t.to_dtype(dtype)?,
            Part::Quantized(q) => q.dequantize(device)?.to_dtype(dtype)?,
        })
    }
}

/// The SwiGLU MLP `down(silu(gate(x)) * up(x))`, or a sparse mixture of such experts.
enum Mlp {
    Dense {
        gate: Linear,
        up: Linear,
        down: Linear,
    },
    Moe {
        router: Linear,
        /// `(w1 = gate, w2 = down, w3 = up)` per expert, Mixtral's names.
        experts: Vec<(Linear, Linear, Linear)>,
        top_k: usize,
    },
}

/// `down(silu(gate(x)) * up(x))`; with `candle_ops` (a frozen model) candle's `silu` and `mul`,
/// the ops candle-transformers runs, else the fused differentiable kernel where it applies.
fn swiglu(x: &Tensor, gate: &Linear, up: &Linear, down: &Linear, candle_ops: bool) -> Result<Tensor> {
    let (g, u) = (gate.forward(x)?, up.forward(x)?);
    let h = if candle_ops {
        (g.silu()? * u)?
    } else {
        swiglu::swiglu(&g, &u)?
    };
    Ok(down.forward(&h)?)
}

impl Mlp {
    /// The MLP's output and, for a mixture, the router logits `[batch, seq, experts]`;
    /// `candle_ops` as in [`swiglu`].
    fn forward(&self, x: &Tensor, candle_ops: bool) -> Result<(Tensor, Option<Tensor>)> {
        match self {
            Mlp::Dense { gate, up, down } => Ok((swiglu(x, gate, up, down, candle_ops)?, None)),
            Mlp::Moe { router, experts, top_k } => {
                // Mixtral routing: softmax over experts, keep the top-k, renormalise. Every expert
                // runs on every token (dense compute, differentiable through the kept weights);
                // ties at the k-th probability may keep more than k experts.
                let logits = router.forward(x)?;
                let probs = softmax_last(&logits)?;
                let sorted = probs.detach().contiguous()?.arg_sort_last_dim(false)?;
                let kth_idx = sorted.narrow(D::Minus1, top_k - 1, 1)?.contiguous()?;
                let kth = probs.detach().contiguous()?.gather(&kth_idx, D::Minus1)?;
                let keep = probs.detach().broadcast_ge(&kth)?.to_dtype(probs.dtype())?;
                let w = (probs * keep)?;
                let w = w.broadcast_div(&w.sum_keepdim(D::Minus1)?)?;
                let mut out: Option<Tensor> = None;
                for (e, (w1, w2, w3)) in experts.iter().enumerate() {
                    let y = swiglu(x, w1, w3, w2, candle_ops)?.broadcast_mul(&w.narrow(D::Minus1, e, 1)?)?;
                    out = Some(match out {
                        Some(o) => (o + y)?,
                        None => y,
                    });
                }
                let out = out.ok_or_else(|| Error::Runtime("mixture with no experts".into()))?;
                Ok((out, Some(logits)))
            }
        }
    }

    /// The same MLP with `f` applied to its dense tensors.
    fn map_dense<E>(
        &self,
        f: &mut dyn FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Self, E> {
        Ok(match self {
            Mlp::Dense { gate, up, down } => Mlp::Dense {
                gate: gate.map_dense(f)?,
                up: up.map_dense(f)?,
                down: down.map_dense(f)?,
            },
            Mlp::Moe { router, experts, top_k } => Mlp::Moe {
                router: router.map_dense(f)?,
                experts: experts
                    .iter()
                    .map(|(a, b, c)| Ok((a.map_dense(f)?, b.map_dense(f)?, c.map_dense(f)?)))
                    .collect::<std::result::Result<_, E>>()?,
                top_k: *top_k,
            },
        })
    }
}

/// The dense tensors of a model (see [`Llama::map_dense`]).
struct Parts {
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Linear,
}

struct Layer {
    input_norm: Tensor,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    post_norm: Tensor,
    mlp: Mlp,
}

/// A llama-family decoder: trainable (dense `Var`s) or frozen (possibly quantized).
pub struct Llama {
    pub(super) cfg: LlamaConfig,
    pub(super) vars: Vec<(String, Var)>,
    pub(super) embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    head: Linear,
    rope: Rope,
    /// Parameters (tied weights counted once).
    pub(super) n_params: usize,
    /// Where the weights came from (`fresh`, `from <dir>`, `GGUF <file>`).
    pub(super) source: String,
    /// The tokenizer the weights were trained with, when known.
    pub(super) tokenizer_id: Option<String>,
    /// Frozen: use candle's fused RMSNorm/softmax/RoPE kernels (no backward, not needed).
    fused: bool,
    /// Mixed precision: the dtype the forward pass computes in when it differs from the
    /// weights' (a trainable model asked for bf16 keeps f32 master weights, see
    /// [`Llama::from_parts`]).
    compute: Option<DType>,
    /// A bf16 model on the CPU: f32 activations, the projections multiplied in bf16 (frozen:
    /// packed bf16 weights; trainable: f32 master weights rounded in each product).
    bf16_products: bool,
    /// The head's weight in bf16, what such a model hands the fused LM-head losses.
    head_bf16: Option<Tensor>,
}

impl Llama {
    /// Builds the model from named parts (checked against [`param_specs`]). `trainable` wraps
    /// every weight in a `Var` (all parts must be dense); otherwise quantized parts stay
    /// quantized. `source` describes where the weights came from.
    pub fn from_parts(
        cfg: LlamaConfig,
        mut parts: HashMap<String, Part>,
        trainable: bool,
        device: &Device,
        source: &str,
    ) -> Result<Self> {
        let mut vars = Vec::new();
        let mut n_params = 0;
        let mut dense: HashMap<String, Tensor> = HashMap::new();
        let mut quant: HashMap<String, Arc<QTensor>> = HashMap::new();
        // A frozen bf16 model on the CPU keeps f32 activations and its projections packed in
        // bf16 for the tile products (candle's CPU backend has neither fast bf16 products nor
        // fast bf16 element-wise ops); the embedding, norms and head stay f32.
        let bf16_products = !trainable && cfg.dtype == DType::BF16 && device.is_cpu();
        // A bf16 student on the CPU (mixed precision) keeps f32 master weights and activations;
        // every product of its linear layers (the head's too, not the MoE router's) rounds both
        // factors to bf16 and sums in f32, forward and backward.
        let bf16_trainable = trainable && cfg.dtype == DType::BF16 && device.is_cpu();
        let tied_quant_head = match parts.get("model.embed_tokens.weight") {
            Some(Part::Quantized(q)) if cfg.tie_embeddings && !bf16_products => Some(q.clone()),
            _ => None,
        };
        // Mixed precision: a trainable model asked for half precision keeps f32 master weights
        // (what the optimizer updates) and computes in half precision.
        let stored = if bf16_products || (trainable && matches!(cfg.dtype, DType::BF16 | DType::F16)) {
            DType::F32
        } else {
            cfg.dtype
        };
        let mut packed: HashMap<String, Weight> = HashMap::new();
        for (name, shape, _) in param_specs(&cfg) {
            let part = parts
                .remove(&name)
                .ok_or_else(|| Error::input(format!("checkpoint ({source})"), format!("tensor `{name}` is missing")))?;
            if part.dims() != shape {
                return Err(Error::input(
                    format!("checkpoint ({source})"),
                    format!("tensor `{name}` has shape {:?}, expected {shape:?}", part.dims()),
                ));
            }
            n_params += shape.iter().product::<usize>();
            let is_matmul =
                name.ends_with("proj.weight") || name.contains("block_sparse_moe") || name == "lm_head.weight";
            let router = name.contains("block_sparse_moe.gate.");
            match part {
                part if bf16_products && is_matmul && !router && name != "lm_head.weight" => {
                    packed.insert(name, Weight::bf16(&part.dense(device, DType::F32)?)?);
                }
                Part::Quantized(q) if !trainable && is_matmul => {
                    quant.insert(name, q);
                }
                part => {
                    let t = part.dense(device, stored)?;
                    if trainable {
                        let var = Var::from_tensor(&t)?;
                        dense.insert(name.clone(), var.as_tensor().clone());
                        vars.push((name, var));
                    } else {
                        dense.insert(name, t);
                    }
                }
            }
        }
        let lin = |w: &str, b: Option<String>| -> Result<Linear> {
            let bias = match b {
                Some(b) => Some(
                    dense
                        .get(&b)
                        .cloned()
                        .ok_or_else(|| Error::Runtime(format!("missing tensor {b}")))?,
                ),
                None => None,
            };
            if let Some(weight) = packed.get(w) {
                return Ok(Linear {
                    weight: weight.clone(),
                    bias,
                });
            }
            let weight = match (dense.get(w), quant.get(w)) {
                (Some(t), _) if bf16_trainable && !w.contains("block_sparse_moe.gate.") => Weight::DenseBf16(t.clone()),
                (Some(t), _) => Weight::Dense(t.clone()),
                (None, Some(q)) => Weight::quantized(q.clone())?,
                (None, None) => return Err(Error::Runtime(format!("missing tensor {w}"))),
            };
            Ok(Linear { weight, bias })
        };
        let get = |n: &str| -> Result<Tensor> {
            dense
                .get(n)
                .cloned()
                .ok_or_else(|| Error::Runtime(format!("missing tensor {n}")))
        };
        let mut layers = Vec::with_capacity(cfg.n_layer);
        for l in 0..cfg.n_layer {
            let p = |n: &str| format!("model.layers.{l}.{n}");
            let proj = |n: &str, bias: bool| {
                lin(
                    &p(&format!("self_attn.{n}.weight")),
                    bias.then(|| p(&format!("self_attn.{n}.bias"))),
                )
            };
            let mlp = if cfg.n_experts == 0 {
                Mlp::Dense {
                    gate: lin(&p("mlp.gate_proj.weight"), None)?,
                    up: lin(&p("mlp.up_proj.weight"), None)?,
                    down: lin(&p("mlp.down_proj.weight"), None)?,
                }
            } else {
                let e = |e: usize, w: &str| lin(&p(&format!("block_sparse_moe.experts.{e}.{w}.weight")), None);
                Mlp::Moe {
                    router: lin(&p("block_sparse_moe.gate.weight"), None)?,
                    experts: (0..cfg.n_experts)
                        .map(|i| Ok((e(i, "w1")?, e(i, "w2")?, e(i, "w3")?)))
                        .collect::<Result<_>>()?,
                    top_k: cfg.n_experts_used,
                }
            };
            layers.push(Layer {
                input_norm: get(&p("input_layernorm.weight"))?,
                q: proj("q_proj", cfg.qkv_bias)?,
                k: proj("k_proj", cfg.qkv_bias)?,
                v: proj("v_proj", cfg.qkv_bias)?,
                o: proj("o_proj", cfg.o_bias)?,
                post_norm: get(&p("post_attention_layernorm.weight"))?,
                mlp,
            });
        }
        let embed = get("model.embed_tokens.weight")?;
        let head = if cfg.tie_embeddings {
            match tied_quant_head {
                // As llama.cpp and candle-transformers do: the tied head multiplies by the
                // quantized embedding, the lookup uses its dequantized copy.
                Some(q) => Linear {
                    weight: Weight::quantized(q)?,
                    bias: None,
                },
                None if bf16_trainable => Linear {
                    weight: Weight::DenseBf16(embed.clone()),
                    bias: None,
                },
                None => Linear::dense(embed.clone(), None),
            }
        } else {
            lin("lm_head.weight", None)?
        };
        let rope = Rope::new(
            cfg.head_dim(),
            cfg.rope_theta,
            cfg.context,
            cfg.rope_interleaved,
            DType::F32,
            device,
        )?;
        Ok(Llama {
            norm: get("model.norm.weight")?,
            embed,
            layers,
            rope,
            vars,
            n_params,
            source: source.to_string(),
            tokenizer_id: None,
            fused: false,
            compute: (stored != cfg.dtype && !bf16_products && !bf16_trainable).then_some(cfg.dtype),
            bf16_products: bf16_products || bf16_trainable,
            head_bf16: match (&head.weight, bf16_products) {
                (Weight::Dense(w), true) => Some(w.to_dtype(DType::BF16)?),
                _ => None,
            },
            head,
            cfg,
        })
    }

    /// The resolved architecture.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// Records the identity of the tokenizer the weights were trained with.
    pub fn with_tokenizer_identity(mut self, id: Option<String>) -> Self {
        self.tokenizer_id = id;
        self
    }

    /// Trainable parameters (empty for a frozen model).
    pub fn vars(&self) -> &[(String, Var)] {
        &self.vars
    }

    /// The same model with its weights cut off from autograd and no `Var`s: a frozen
    /// teacher's forward pass builds no graph.
    ///
    /// A frozen model also switches to candle's fused RMSNorm, softmax and RoPE kernels and its
    /// `silu`: they have no backward (or need none), which a teacher never needs, and they match
    /// candle-transformers' inference code operation for operation.
    pub fn frozen(mut self) -> Self {
        self.vars.clear();
        self.fused = true;
        match self.map_dense::<Infallible>(&mut |t| Ok(t.detach())) {
            Ok(parts) => self.with_parts(parts),
            Err(never) => match never {},
        }
    }

    /// The model's dense tensors (embedding, norms, linear layers) with `f` applied to each;
    /// a tensor used twice (a tied head) is mapped once.
    fn map_dense<E>(
        &self,
        f: &mut dyn FnMut(&Tensor) -> std::result::Result<Tensor, E>,
    ) -> std::result::Result<Parts, E> {
        let mut seen: HashMap<TensorId, Tensor> = HashMap::new();
        let mut once = |t: &Tensor| -> std::result::Result<Tensor, E> {
            if let Some(m) = seen.get(&t.id()) {
                return Ok(m.clone());
            }
            let m = f(t)?;
            seen.insert(t.id(), m.clone());
            Ok(m)
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(Layer {
                    input_norm: once(&l.input_norm)?,
                    q: l.q.map_dense(&mut once)?,
                    k: l.k.map_dense(&mut once)?,
                    v: l.v.map_dense(&mut once)?,
                    o: l.o.map_dense(&mut once)?,
                    post_norm: once(&l.post_norm)?,
                    mlp: l.mlp.map_dense(&mut once)?,
                })
            })
            .collect::<std::result::Result<_, E>>()?;
        Ok(Parts {
            embed: once(&self.embed)?,
            layers,
            norm: once(&self.norm)?,
            head: self.head.map_dense(&mut once)?,
        })
    }

    /// The model with its tensors replaced by `parts`.
    fn with_parts(mut self, parts: Parts) -> Self {
        self.embed = parts.embed;
        self.layers = parts.layers;
        self.norm = parts.norm;
        self.head = parts.head;
        self
    }

    /// The model computing in `dtype`: every dense tensor cast (a differentiable cast, so the
    /// gradients reach the master weights in their own dtype), no variables of its own.
    fn computing_in(&self, dtype: DType) -> Result<Self> {
        let parts = self.map_dense(&mut |t| t.to_dtype(dtype))?;
        Ok(Llama {
            cfg: self.cfg.clone(),
            vars: Vec::new(),
            embed: parts.embed,
            layers: parts.layers,
            norm: parts.norm,
            head: parts.head,
            rope: self.rope.clone(),
            n_params: self.n_params,
            source: self.source.clone(),
            tokenizer_id: self.tokenizer_id.clone(),
            fused: self.fused,
            compute: None,
            bf16_products: self.bf16_products,
            head_bf16: self.head_bf16.clone(),
        })
    }

    /// The dtype the forward pass computes in, and the dtype the weights are kept in (the
    /// master weights of mixed precision when they differ).
    pub fn precision(&self) -> (DType, DType) {
        (self.compute.unwrap_or(self.embed.dtype()), self.embed.dtype())
    }

    /// Whether the projections multiply in bf16 products (a bf16 model on the CPU: frozen,
    /// packed bf16 weights; trainable, f32 master weights).
    pub fn bf16_products(&self) -> bool {
        self.bf16_products
    }

    fn attention(
        &self,
        l: &Layer,
        h: &Tensor,
        mask: Option<&Tensor>,
        want_probs: bool,
        offset: usize,
        cache: Option<&mut candle_nn::kv_cache::KvCache>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (b, t, d) = h.dims3()?;
        let (nh, nkv, hd) = (self.cfg.n_head, self.cfg.n_kv_head, self.cfg.head_dim());
        let q = l.q.forward(h)?.reshape((b, t, nh, hd))?.transpose(1, 2)?.contiguous()?;
        let k =
            l.k.forward(h)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let v =
            l.v.forward(h)?
                .reshape((b, t, nkv, hd))?
                .transpose(1, 2)?
                .contiguous()?;
        let (q, k) = if self.fused {
            (self.rope.apply_fused(&q, offset)?, self.rope.apply_fused(&k, offset)?)
        } else {
            (self.rope.apply_at(&q, offset)?, self.rope.apply_at(&k, offset)?)
        };
        let cached = cache.is_some();
        let (k, v) = match cache {
            // Decoding keeps no gradient: a cache attached to a trained model's graph would
            // hold every step's activations. The cache returns views of its filled part.
            Some(kv) => kv.append(&k.detach(), &v.detach())?,
            None => (k, v),
        };
        let scale = 1.0 / (hd as f64).sqrt();
        if cached && !want_probs && attention::decode::supports(&q, &k, &v) {
            // The new positions over the cache: grouped-query heads read in place, no copy.
            let y = attention::decode::cached_attention(&q, &k, &v, scale)?;
            return Ok((l.o.forward(&y)?, None));
        }
        if !cached && offset == 0 && !want_probs && attention::supports(&q, &k, &v) {
            // The fused kernel on CPU f32/f64: causal over the window, grouped-query heads
            // read in place (no repeated keys and values), no [T, T] tensor.
            let y = attention::fused(&q, &k, &v, scale)?;
            return Ok((l.o.forward(&y)?, None));
        }
        let k = repeat_kv(&k, nh / nkv)?;
        let v = repeat_kv(&v, nh / nkv)?;
        let scores = (matmul(&q, &k.contiguous()?.t()?)? * scale)?;
        let scores = match mask {
            Some(m) => scores.broadcast_add(m)?,
            None => scores,
        };
        let probs = if self.fused {
            candle_nn::ops::softmax_last_dim(&scores)?
        } else {
            softmax_last(&scores)?
        };
        let y = matmul(&probs, &v.contiguous()?)?.transpose(1, 2)?.reshape((b, t, d))?;
        Ok((l.o.forward(&y)?, want_probs.then_some(probs)))
    }

    /// The output head's weight `[vocab, width]` when it is dense and has no bias (what the
    /// [`LM_HEAD_TAP`] request hands out); `None` for a quantized head.
    pub fn dense_head(&self) -> Option<&Tensor> {
        match (&self.head.weight, &self.head.bias) {
            (Weight::Dense(w) | Weight::DenseBf16(w), None) => Some(w),
            _ => None,
        }
    }

    /// Forward pass over token ids `[batch, seq]`: logits `[batch, seq, vocab]` and the taps
    /// asked for (`hidden.{i}`, `attn.{i}`, `router_logits.{i}`).
    pub fn forward_ids(&self, ids: &Tensor, taps: &TapSet) -> Result<Outputs> {
        self.forward_inner(ids, taps, None)
    }

    /// An empty key/value cache for [`Llama::forward_cached`].
    pub fn new_cache(&self) -> KvCache {
        let capacity = KV_CAPACITY.min(self.cfg.context);
        KvCache {
            layers: vec![candle_nn::kv_cache::KvCache::new(2, capacity); self.cfg.n_layer],
            pos: 0,
        }
    }

    /// Incremental decoding: logits `[batch, seq, vocab]` of `ids` `[batch, seq]` at positions
    /// `cache.pos()..`, attending to every cached position; the new keys and values are
    /// appended to `cache`. No taps, no gradient needed (use on frozen models).
    pub fn forward_cached(&self, ids: &Tensor, cache: &mut KvCache) -> Result<Tensor> {
        Ok(self.forward_inner(ids, &TapSet::none(), Some(cache))?.logits)
    }

    fn forward_inner(&self, ids: &Tensor, taps: &TapSet, mut cache: Option<&mut KvCache>) -> Result<Outputs> {
        if let Some(dtype) = self.compute {
            return self.computing_in(dtype)?.forward_inner(ids, taps, cache);
        }
        let (_, t) = ids.dims2()?;
        let offset = cache.as_ref().map_or(0, |c| c.pos);
        if offset + t > self.rope.context() {
            return Err(Error::Incompatible(format!(
                "window of {} tokens is longer than the model context {}",
                offset + t,
                self.rope.context()
            )));
        }
        let mut x = crate::kernels::cpu::embedding::embedding(&self.embed, ids)?;
        let mut out = BTreeMap::new();
        if taps.wants_hidden(0) {
            out.insert("hidden.0".to_string(), x.clone());
        }
        let mask = match t {
            1 => None,
            _ if offset == 0 => Some(causal_mask(t, x.dtype(), x.device())?),
            _ => Some(causal_mask(offset + t, x.dtype(), x.device())?.narrow(0, offset, t)?),
        };
        let eps = self.cfg.rms_norm_eps;
        let rms_norm = |x: &Tensor, w: &Tensor| -> Result<Tensor> {
            if self.fused {
                Ok(candle_nn::ops::rms_norm(x, w, eps as f32)?)
            } else {
                Ok(rms_norm(x, w, eps)?)
            }
        };
        for (i, l) in self.layers.iter().enumerate() {
            let h = rms_norm(&x, &l.input_norm)?;
            let slot = cache.as_deref_mut().map(|c| &mut c.layers[i]);
            let (a, probs) = self.attention(l, &h, mask.as_ref(), taps.wants_attention(i), offset, slot)?;
            x = (x + a)?;
            let h = rms_norm(&x, &l.post_norm)?;
            let (m, router) = l.mlp.forward(&h, self.fused)?;
            x = (x + m)?;
            if let Some(p) = probs {
                out.insert(format!("attn.{i}"), p);
            }
            if let Some(r) = router.filter(|_| taps.contains(&format!("router_logits.{i}"))) {
                out.insert(format!("router_logits.{i}"), r);
            }
            if taps.wants_hidden(i + 1) {
                out.insert(format!("hidden.{}", i + 1), x.clone());
            }
        }
        let x = rms_norm(&x, &self.norm)?;
        if let Some(w) = self.dense_head().filter(|_| taps.contains(LM_HEAD_TAP)) {
            // A bf16 model hands its head in bf16: the fused LM-head loss multiplies by it on
            // the tile products too.
            let w = self.head_bf16.clone().unwrap_or_else(|| w.clone());
            if matches!(self.head.weight, Weight::DenseBf16(_)) {
                // A bf16 student's head: f32, multiplied in bf16 products by the fused loss.
                out.insert(
                    LM_HEAD_BF16_PRODUCTS.to_string(),
                    Tensor::zeros((), DType::F32, x.device())?,
                );
            }
            return Ok(lm_head_outputs(x, w, out)?);
        }
        let logits = self.head.forward(&x)?;
        if let Some(c) = cache {
            c.pos += t;
        }
        Ok(Outputs { logits, taps: out })
    }
}

/// Positions a key/value cache holds before it grows (by as many again): keys and values are
/// written in place into preallocated tensors, so a decoding step copies only its new ones.
const KV_CAPACITY: usize = 256;

/// Keys and values of every position decoded so far, per layer (`[batch, kv_heads, pos,
/// head_dim]` views of candle's preallocated `kv_cache::KvCache`).
#[derive(Debug, Clone)]
pub struct KvCache {
    layers: Vec<candle_nn::kv_cache::KvCache>,
    pos: usize,
}

impl KvCache {
    /// Positions cached.
    pub fn pos(&self) -> usize {
        self.pos
    }
}

/// Repeats each of the `kv` heads of `x` `[b, kv, t, d]` `n` times: `[b, kv * n, t, d]`
/// (query head `j` reads key/value head `j / n`).
fn repeat_kv(x: &Tensor, n: usize) -> Result<Tensor> {
    if n == 1 {
        return Ok(x.clone());
    }
    let (b, kv, t, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kv, n, t, d))?
        .reshape((b, kv * n, t, d))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::llama::test_support::{batch, max_diff, tiny, tiny_cfg};
    use crate::testing::mean_cross_entropy as cross_entropy;
    use retort_core::{Batch, Model};

    fn loss(m: &Llama, b: &Batch) -> Tensor {
        let out = m.forward(b, &TapSet::none()).expect("fwd");
        cross_entropy(&out.logits, &b.targets, None, 0.0).expect("ce")
    }

    #[test]
    fn every_parameter_gets_a_finite_nonzero_gradient() {
        for extra in [
            serde_json::json!({}),
            serde_json::json!({"tie_embeddings": false, "qkv_bias": true, "n_kv_head": 1}),
            serde_json::json!({"n_experts": 4, "n_experts_used": 2}),
        ] {
            let m = tiny(extra.clone());
            let grads = loss(&m, &batch(8)).backward().expect("bwd");
            assert!(!m.vars.is_empty());
            for (name, var) in &m.vars {
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{extra}: no gradient for {name}"));
                let v: Vec<f32> = g.flatten_all().expect("f").to_vec1().expect("v");
                assert!(
                    v.iter().all(|x| x.is_finite()),
                    "{extra}: non-finite gradient for {name}"
                );
                assert!(v.iter().any(|x| *x != 0.0), "{extra}: all-zero gradient for {name}");
            }
        }
    }

    #[test]
    fn gradients_match_finite_differences() {
        for extra in [
            serde_json::json!({"dtype": "f64", "tie_embeddings": false, "qkv_bias": true}),
            serde_json::json!({"dtype": "f64", "n_experts": 3, "n_experts_used": 2, "n_layer": 1}),
        ] {
            let m = tiny(extra.clone());
            let b = batch(5);
            crate::testing::check_gradients_by_finite_differences(&m.vars, || loss(&m, &b), &extra.to_string());
        }
    }

    #[test]
    fn the_lm_head_tap_hands_out_the_head_of_the_logits() {
        for extra in [
            serde_json::json!({"dtype": "f64", "tie_embeddings": false}),
            serde_json::json!({"dtype": "f64"}),
        ] {
            let m = tiny(extra);
            assert!(m.available_taps().iter().any(|t| t == LM_HEAD_TAP));
            crate::testing::check_lm_head_tap(&m, &batch(5), 1e-12);
        }
    }

    #[test]
    fn taps_have_the_transformer_names_and_shapes() {
        let m = tiny(serde_json::json!({"n_experts": 2, "n_experts_used": 1}));
        let b = batch(4);
        assert!(m.forward(&b, &TapSet::none()).expect("fwd").taps.is_empty());
        let taps: TapSet = ["hidden.0", "hidden.2", "attn.1", "router_logits.0"]
            .into_iter()
            .collect();
        let out = m.forward(&b, &taps).expect("fwd");
        assert_eq!(out.logits.dims(), &[2, 4, 11]);
        assert_eq!(out.tap("hidden.2").expect("h").dims(), &[2, 4, 8]);
        assert_eq!(out.tap("router_logits.0").expect("r").dims(), &[2, 4, 2]);
        let a: Vec<Vec<f32>> = out
            .tap("attn.1")
            .expect("a")
            .get(0)
            .expect("g")
            .get(3)
            .expect("g")
            .to_vec2()
            .expect("v");
        assert!((a[0][0] - 1.0).abs() < 1e-6 && a[0][1] == 0.0);
        for row in &a {
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        }
        assert!(m.available_taps().contains(&"router_logits.1".to_string()));
    }

    /// The gradient of the f32 cross-entropy of `m`'s logits, per variable, as f64 values.
    fn ce_gradients(m: &Llama) -> Vec<Vec<f64>> {
        let out = m.forward(&batch(4), &TapSet::none()).expect("fwd");
        let logits = out.logits.to_dtype(DType::F32).expect("f32");
        let l = cross_entropy(&logits, &batch(4).targets, None, 0.0).expect("ce");
        let grads = l.backward().expect("bwd");
        m.vars
            .iter()
            .map(|(n, v)| {
                let g = grads.get(v.as_tensor()).unwrap_or_else(|| panic!("{n}: no gradient"));
                assert_eq!(g.dtype(), v.dtype(), "{n}: gradient dtype");
                g.to_dtype(DType::F64)
                    .and_then(|g| g.flatten_all())
                    .and_then(|g| g.to_vec1())
                    .expect("grad")
            })
            .collect()
    }

    /// The gradients of `mixed` follow those of `full` (the same master weights) to half
    /// precision's rounding, and every variable, tied head included, gets one in f32.
    fn assert_gradients_follow(mixed: &Llama, full: &Llama, what: &str) {
        let (gm, gf) = (ce_gradients(mixed), ce_gradients(full));
        for (((name, _), a), b) in mixed.vars.iter().zip(&gm).zip(&gf) {
            let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-6);
            let err = a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs())) / scale;
            assert!(err < 0.1, "{name}: {what} gradient off by {err:.3} of its scale");
        }
    }

    /// Half-precision compute with f32 master weights, the CUDA way (the weights cast in the
    /// forward pass); f16 shows it on the CPU, where bf16 goes the way of the next test.
    #[test]
    fn half_mixed_precision_computes_in_half_and_trains_f32_master_weights() {
        let (mixed, full) = (tiny(serde_json::json!({"dtype": "f16"})), tiny(serde_json::json!({})));
        assert_eq!(mixed.precision(), (DType::F16, DType::F32));
        assert_eq!(full.precision(), (DType::F32, DType::F32));
        assert!(mixed.vars.iter().all(|(_, v)| v.dtype() == DType::F32));
        assert!(
            mixed.describe().contains("f16 compute, f32 master weights"),
            "{}",
            mixed.describe()
        );
        let out = mixed.forward(&batch(4), &TapSet::none()).expect("fwd");
        assert_eq!(out.logits.dtype(), DType::F16);
        assert_gradients_follow(&mixed, &full, "f16");
    }

    /// A bf16 student on the CPU: f32 master weights and activations, every linear layer (the
    /// tied head too, not the MoE router) in bf16 products; its head handed to the fused losses
    /// as the f32 variable with the bf16-products marker.
    #[test]
    fn a_bf16_student_on_the_cpu_trains_f32_weights_through_bf16_products() {
        let moe = serde_json::json!({"dtype": "bf16", "n_experts": 2, "n_experts_used": 1});
        let (mixed, full) = (
            tiny(moe.clone()),
            tiny(serde_json::json!({"n_experts": 2, "n_experts_used": 1})),
        );
        assert!(mixed.bf16_products() && !full.bf16_products());
        assert_eq!(mixed.precision(), (DType::F32, DType::F32));
        assert!(mixed.vars.iter().all(|(_, v)| v.dtype() == DType::F32));
        assert!(
            mixed.describe().contains("f32 master weights, bf16 products"),
            "{}",
            mixed.describe()
        );
        let layer = &mixed.layers[0];
        assert!(matches!(layer.q.weight, Weight::DenseBf16(_)) && matches!(mixed.head.weight, Weight::DenseBf16(_)));
        let Mlp::Moe { router, experts, .. } = &layer.mlp else {
            panic!("moe")
        };
        assert!(matches!(router.weight, Weight::Dense(_)), "the router stays f32");
        assert!(matches!(experts[0].0.weight, Weight::DenseBf16(_)));
        let logits = |m: &Llama| -> Vec<f32> {
            let out = m.forward(&batch(4), &TapSet::none()).expect("fwd");
            assert_eq!(out.logits.dtype(), DType::F32);
            out.logits.flatten_all().and_then(|t| t.to_vec1()).expect("logits")
        };
        let (got, want) = (logits(&mixed), logits(&full));
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst > 0.0 && worst < 2e-2 * scale,
            "bf16 products off by {worst} (logits up to {scale})"
        );
        assert_gradients_follow(&mixed, &full, "bf16 products");
        let taps: TapSet = [retort_core::LM_HEAD_TAP].into_iter().collect();
        let out = mixed.forward(&batch(4), &taps).expect("fwd with the head");
        let (_, weight) = out.lm_head().expect("the lm_head taps");
        assert!(weight.is_variable() && weight.dtype() == DType::F32 && out.lm_head_bf16_products());
        assert!(!full.forward(&batch(4), &taps).expect("f32").lm_head_bf16_products());
    }

    #[test]
    fn a_frozen_bf16_model_on_the_cpu_multiplies_in_bf16_with_f32_activations() {
        let cfg = tiny_cfg(serde_json::json!({"dtype": "bf16", "n_experts": 2, "n_experts_used": 1}));
        let parts = super::super::init::init_parts(&cfg, 7, &Device::Cpu).expect("parts");
        let full_cfg = LlamaConfig {
            dtype: DType::F32,
            ..cfg.clone()
        };
        let full = Llama::from_parts(full_cfg, parts.clone(), false, &Device::Cpu, "test").expect("f32");
        let m = Llama::from_parts(cfg, parts, false, &Device::Cpu, "test").expect("frozen");
        assert!(m.bf16_products() && !full.bf16_products());
        assert_eq!(m.precision(), (DType::F32, DType::F32));
        assert!(m.describe().contains("f32, bf16 products"), "{}", m.describe());
        let layer = &m.layers[0];
        assert!(matches!(layer.q.weight, Weight::Bf16(_)) && matches!(layer.o.weight, Weight::Bf16(_)));
        assert!(
            matches!(m.head.weight, Weight::Dense(_)),
            "the head stays f32 for the fused LM head"
        );
        let Mlp::Moe { router, experts, .. } = &layer.mlp else {
            panic!("moe")
        };
        assert!(matches!(router.weight, Weight::Dense(_)), "the router stays f32");
        assert!(matches!(experts[0].0.weight, Weight::Bf16(_)));
        let logits = |m: &Llama| -> Vec<f32> {
            let out = m.forward(&batch(4), &TapSet::none()).expect("fwd");
            assert_eq!(out.logits.dtype(), DType::F32);
            out.logits.flatten_all().and_then(|t| t.to_vec1()).expect("logits")
        };
        let (got, want) = (logits(&m), logits(&full));
        let scale = want.iter().fold(0f32, |a, v| a.max(v.abs()));
        let worst = got.iter().zip(&want).fold(0f32, |a, (g, w)| a.max((g - w).abs()));
        assert!(
            worst > 0.0 && worst < 2e-2 * scale,
            "bf16 products off by {worst} (logits up to {scale})"
        );
        let taps: TapSet = [retort_core::LM_HEAD_TAP].into_iter().collect();
        let out = m.forward(&batch(4), &taps).expect("fwd with the head");
        let (hidden, weight) = out.lm_head().expect("the lm_head taps");
        assert_eq!(
            (hidden.dtype(), weight.dtype()),
            (DType::F32, DType::BF16),
            "the head handed in bf16"
        );
    }

    #[test]
    fn cached_decoding_matches_full_forward() {
        for frozen in [false, true] {
            let m = tiny(serde_json::json!({"n_kv_head": 1}));
            let m = if frozen { m.frozen() } else { m };
            let ids = Tensor::new(&[[1u32, 2, 3, 4, 5, 6]], &Device::Cpu).expect("ids");
            let full = m.forward_ids(&ids, &TapSet::none()).expect("f").logits;
            let mut cache = m.new_cache();
            let a = m
                .forward_cached(&ids.narrow(1, 0, 3).expect("n"), &mut cache)
                .expect("prefill");
            let b = m
                .forward_cached(&ids.narrow(1, 3, 1).expect("n"), &mut cache)
                .expect("step");
            let c = m
                .forward_cached(&ids.narrow(1, 4, 2).expect("n"), &mut cache)
                .expect("step");
            assert_eq!(cache.pos(), 6);
            let inc = Tensor::cat(&[a, b, c], 1).expect("cat");
            let d = max_diff(&full, &inc);
            assert!(d < 1e-5, "frozen {frozen}: {d}");
        }
    }

    #[test]
    fn causal_logits_do_not_depend_on_later_tokens() {
        let m = tiny(serde_json::json!({}));
        let ids = Tensor::new(&[[1u32, 2, 3, 4]], &Device::Cpu).expect("ids");
        let ids2 = Tensor::new(&[[1u32, 2, 3, 9]], &Device::Cpu).expect("ids");
        let a = m
            .forward_ids(&ids, &TapSet::none())
            .expect("f")
            .logits
            .narrow(1, 0, 3)
            .expect("n");
        let b = m
            .forward_ids(&ids2, &TapSet::none())
            .expect("f")
            .logits
            .narrow(1, 0, 3)
            .expect("n");
        let d = max_diff(&a, &b);
        assert!(d < 1e-6, "{d}");
    }
}
