//! Built-in routers.

pub mod fixed;
