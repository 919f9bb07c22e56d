//! The engine: runs what was assembled.
pub mod batching;
pub mod cache;
pub mod evaluate;
pub mod generate;
pub mod model_eval;
pub mod optim;
pub mod phase;
pub mod pool;
pub mod run;
