//! Model architectures shared by the student and teacher factories.

pub mod nn;
pub mod transformer;
