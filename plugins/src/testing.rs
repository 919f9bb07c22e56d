//! Fixtures for tests (here and in the end-to-end suites): tiny GGUF llama models with a real
//! byte-level BPE tokenizer in their metadata, written with candle's GGUF writer, so no test
//! depends on a download.

use std::path::Path;

use candle_core::quantized::gguf_file::Value;
use candle_core::quantized::GgmlDType;
use candle_core::Device;

use retort_core::{Params, Result};

use crate::models::llama::gguf::save_gguf;
use crate::models::llama::{Llama, LlamaConfig, LlamaParams};

/// Tokens of [`tiny_bpe_metadata`]: 3 control tokens, 256 byte symbols, 3 merges.
pub const TINY_BPE_TOKENS: usize = 262;

/// `tokenizer.ggml.*` metadata of a tiny byte-level BPE (SmolLM's pre-tokenizer): the control
/// tokens `<|endoftext|>` (0), `<|im_start|>` (1, bos), `<|im_end|>` (2, eos and pad), the 256
/// byte symbols, and the merges `Ġ t`, `h e`, `Ġt he`. With `pad_to` rows, the model may have
/// more rows than the tokenizer has tokens (a padded vocabulary).
pub fn tiny_bpe_metadata() -> Vec<(String, Value)> {
    let mut alphabet: Vec<char> = tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
        .into_iter()
        .collect();
    alphabet.sort();
    let mut tokens: Vec<String> = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    tokens.extend(alphabet.iter().map(|c| c.to_string()));
    tokens.extend(["Ġt", "he", "Ġthe"].iter().map(|s| s.to_string()));
    let types: Vec<Value> = (0..tokens.len())
        .map(|i| Value::I32(if i < 3 { 3 } else { 1 }))
        .collect();
    let s = |x: &str| Value::String(x.into());
    vec![
        ("tokenizer.ggml.model".into(), s("gpt2")),
        ("tokenizer.ggml.pre".into(), s("smollm")),
        (
            "tokenizer.ggml.tokens".into(),
            Value::Array(tokens.into_iter().map(Value::String).collect()),
        ),
        ("tokenizer.ggml.token_type".into(), Value::Array(types)),
        (
            "tokenizer.ggml.merges".into(),
            Value::Array(["Ġ t", "h e", "Ġt he"].iter().map(|m| s(m)).collect()),
        ),
        ("tokenizer.ggml.bos_token_id".into(), Value::U32(1)),
        ("tokenizer.ggml.eos_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.padding_token_id".into(), Value::U32(2)),
        ("tokenizer.ggml.add_bos_token".into(), Value::Bool(false)),
    ]
}

/// A fresh llama from JSON params (see [`LlamaParams`]).
pub fn llama(params: serde_json::Value, seed: u64) -> Result<Llama> {
    let params = Params::new("model", params.as_object().cloned().unwrap_or_default());
    let p: LlamaParams = params.parse()?;
    let cfg = LlamaConfig::resolve(&p, &params, None, None)?;
    Llama::init(cfg, seed, &Device::Cpu)
}

/// Writes a tiny GGUF llama teacher (`rows` output rows, at least [`TINY_BPE_TOKENS`]; width
/// 32, 2 blocks, GQA 4/2 heads) with the tiny BPE in its metadata; weights as `quant`.
pub fn write_tiny_gguf(path: &Path, rows: usize, quant: GgmlDType, seed: u64) -> Result<Llama> {
    let m = llama(
        serde_json::json!({"n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": 2, "intermediate": 64,
                           "context": 64, "vocab_size": rows, "init_std": 0.2}),
        seed,
    )?;
    save_gguf(&m, path, quant, &tiny_bpe_metadata())?;
    Ok(m)
}

/// Central finite differences (`h = 1e-5`, f64 parameters) against the analytic gradient of
/// `loss` on three entries of every tensor in `vars` (first, middle, last); panics naming the
/// entry when the relative error reaches 1e-4. Returns how many entries it checked.
///
/// # Panics
/// On a mismatch, a parameter without a gradient, or a non-f64 parameter.
#[allow(clippy::expect_used)]
pub fn check_gradients_by_finite_differences(
    vars: &[(String, candle_core::Var)],
    loss: impl Fn() -> candle_core::Tensor,
    tag: &str,
) -> usize {
    let grads = loss().backward().expect("backward");
    let h = 1e-5;
    let mut checked = 0;
    for (name, var) in vars {
        let g: Vec<f64> = grads
            .get(var.as_tensor())
            .expect("grad")
            .flatten_all()
            .expect("flatten")
            .to_vec1()
            .expect("f64 gradient");
        let w0: Vec<f64> = var
            .as_tensor()
            .flatten_all()
            .expect("flatten")
            .to_vec1()
            .expect("f64 parameter");
        for &idx in &[0, w0.len() / 2, w0.len() - 1] {
            let eval = |delta: f64| -> f64 {
                let mut w = w0.clone();
                w[idx] += delta;
                var.set(&candle_core::Tensor::from_vec(w, var.shape(), var.device()).expect("tensor"))
                    .expect("set");
                loss().to_scalar::<f64>().expect("scalar loss")
            };
            let numeric = (eval(h) - eval(-h)) / (2.0 * h);
            eval(0.0);
            let analytic = g[idx];
            let err = (numeric - analytic).abs() / (1e-6 + numeric.abs().max(analytic.abs()));
            assert!(
                err < 1e-4,
                "{tag} {name}[{idx}]: analytic {analytic} vs numeric {numeric}"
            );
            checked += 1;
        }
    }
    checked
}

/// Mean cross-entropy of `logits` against `targets`, label smoothing `eps` (the loss of the
/// models' gradient tests; the `_mask` slot keeps the call shape of `losses::ce`).
pub fn mean_cross_entropy(
    logits: &candle_core::Tensor,
    targets: &candle_core::Tensor,
    _mask: Option<&candle_core::Tensor>,
    eps: f64,
) -> candle_core::Result<candle_core::Tensor> {
    crate::kernels::cross_entropy::per_token(logits, targets, eps)?.mean_all()
}

/// Asserts that `model`'s [`retort_core::LM_HEAD_TAP`] hands out the head of its plain forward
/// pass: `lm_head.hidden W^T` equals the logits (within `tol`), and the logits are then
/// `[batch, seq, 0]`.
///
/// # Panics
/// On a mismatch or a missing tap.
#[allow(clippy::expect_used)]
pub fn check_lm_head_tap(model: &dyn retort_core::Model, batch: &retort_core::Batch, tol: f64) {
    use candle_core::DType;
    let plain = model
        .forward(batch, &retort_core::TapSet::none())
        .expect("forward")
        .logits;
    let taps: retort_core::TapSet = [retort_core::LM_HEAD_TAP].into_iter().collect();
    let out = model.forward(batch, &taps).expect("forward with the head");
    let (b, s, v) = plain.dims3().expect("logits");
    assert_eq!(out.logits.dims(), &[b, s, 0]);
    let (hidden, weight) = out.lm_head().expect("the lm_head taps");
    let z = hidden
        .broadcast_matmul(&weight.t().expect("t"))
        .and_then(|z| z.reshape((b, s, v)))
        .expect("hidden W^T");
    let diff = (z - &plain)
        .and_then(|d| d.abs())
        .and_then(|d| d.to_dtype(DType::F64))
        .and_then(|d| d.max_all())
        .and_then(|d| d.to_scalar::<f64>())
        .expect("difference");
    assert!(diff <= tol, "hidden W^T differs from the logits by {diff}");
}

/// The built-in loss term `kind` with `params` (a JSON object), built with the built-in
/// schedules on the CPU and nothing known of the models: for tests, benches and examples.
///
/// # Errors
/// An unknown kind, params that are not an object, or the term's own refusal.
pub fn loss_term(kind: &str, params: serde_json::Value) -> Result<Box<dyn retort_core::LossTerm>> {
    use retort_core::registry::Factory;
    crate::link();
    let mut reg = retort_core::Registry::empty();
    for f in inventory::iter::<Factory<dyn retort_core::Schedule>> {
        reg.schedules.register(f, "built-in")?;
    }
    let ctx = retort_core::BuildContext::new(&reg, Device::Cpu, 0);
    let f = inventory::iter::<Factory<dyn retort_core::LossTerm>>
        .into_iter()
        .find(|f| f.kind == kind)
        .ok_or_else(|| retort_core::Error::Runtime(format!("no loss kind `{kind}`")))?;
    let serde_json::Value::Object(p) = params else {
        return Err(retort_core::Error::Runtime("loss params must be a JSON object".into()));
    };
    (f.build)(&Params::new("loss", p), &ctx)
}
