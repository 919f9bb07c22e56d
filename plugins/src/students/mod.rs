//! Built-in trainable student models.

pub mod llama;
pub mod transformer;
