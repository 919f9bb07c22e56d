//! Built-in tokenizers.

pub mod char_level;
pub mod hf;
