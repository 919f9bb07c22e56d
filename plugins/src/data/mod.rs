//! Built-in data sources.

pub mod synthetic;
pub mod text;
