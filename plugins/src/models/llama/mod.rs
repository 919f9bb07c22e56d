//! The llama family: Llama, Qwen2 (q/k/v biases), Mixtral-style sparse MoE; trainable from
//! scratch, loaded from Hugging Face directories or (frozen, quantized) from GGUF files.
//!
//! - `config.rs`: parameters, resolved architecture, `config.json`.
//! - `model.rs`: the architecture: parameter layout, the decoder and its forward pass with taps.
//! - `linear.rs`, `rope.rs`: dense-or-quantized linear layers; rotary embeddings.
//! - `init.rs`: fresh weights from a seed.
//! - `traits.rs`: retort's `Model` and `Student` contracts.
//! - `checkpoint.rs`: Hugging Face directories in and out.
//! - `gguf.rs`: GGUF files (llama.cpp names, permuted q/k rows).
//! - `source.rs`: a checkpoint path of either form, its weights and tokenizer.
//!
//! Imports point one way: `model.rs` imports only `config`, `linear` and `rope`; `init`,
//! `checkpoint` and `gguf` build on the model; `traits` on `checkpoint` (save); `source` on
//! `checkpoint` and `gguf`. The tokenizer is imported by `source.rs` alone.

pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod init;
pub mod linear;
pub mod model;
pub mod rope;
pub mod source;
#[cfg(test)]
pub(crate) mod test_support;
pub mod traits;

pub use config::{LlamaConfig, LlamaParams};
pub use model::Llama;
pub use source::Source;
