//! Built-in teacher providers.

pub mod llama;
pub mod transformer;
