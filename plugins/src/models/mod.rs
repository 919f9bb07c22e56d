//! Model architectures shared by the student and teacher factories.

pub mod generate;
pub mod llama;
pub mod nn;
pub mod transformer;
