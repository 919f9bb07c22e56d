//! Built-in teacher providers.

pub mod cached;
pub mod llama;
pub mod transformer;
