//! The llama family: Llama, Qwen2 (q/k/v biases), Mixtral-style sparse MoE; trainable from
//! scratch, loaded from Hugging Face directories or (frozen, quantized) from GGUF files.
//!
//! - `config.rs`: parameters, resolved architecture, `config.json`.
//! - `model.rs`: the decoder and its forward pass with taps.
//! - `linear.rs`, `rope.rs`: dense-or-quantized linear layers; rotary embeddings.
//! - `checkpoint.rs`: Hugging Face directories in and out.
//! - `gguf.rs`: GGUF files (llama.cpp names, permuted q/k rows).

pub mod checkpoint;
pub mod config;
pub mod gguf;
pub mod linear;
pub mod model;
pub mod rope;

pub use config::{LlamaConfig, LlamaParams};
pub use model::Llama;
