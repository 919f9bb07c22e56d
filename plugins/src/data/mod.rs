//! Built-in data sources.

pub mod jsonl;
pub mod streams;
pub mod synthetic;
pub mod text;
pub mod token_files;
