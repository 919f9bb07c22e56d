//! Built-in teacher providers.

pub mod transformer;
