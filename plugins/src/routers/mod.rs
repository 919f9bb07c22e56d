//! Built-in routers.

pub mod curriculum;
pub mod fixed;
pub mod magnitude;
pub mod student_aware;
