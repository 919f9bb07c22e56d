//! The offline teacher logit cache: run the teacher once, train many students from a compact
//! store of its top-`k` distribution per token (docs/cache-format.md).
//!
//! - [`build`]: runs a teacher over every aligned window of both splits, resumable by shard;
//! - [`store`]: `header.json`, opening and verifying a cache, reading windows;
//! - [`shard`]: one shard file (per-window zstd frames, checksum);
//! - [`codec`]: the per-token coding (frequency-ranked id gaps, `sqrt(p)` value codes).
//!
//! The teacher kind `cached` (`teachers/cached.rs`) serves a cache to the pipeline.

pub mod build;
pub mod codec;
pub mod shard;
pub mod store;

pub use build::{build_cache, recode_cache, BuildOptions, BuildProgress, BuildSummary};
pub use codec::ValueCoding;
pub use store::{CacheHeader, LogitStore, ReadState};
