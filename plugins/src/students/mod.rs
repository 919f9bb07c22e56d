//! Built-in trainable student models.

pub mod transformer;
