//! File formats that several plugin categories read (a model's weights and its tokenizer may
//! share one file). Formats know no plugin: categories import them, never the reverse.

pub mod gguf;
pub mod safetensors;
