//! Built-in metric observers.

pub mod jsonl;
