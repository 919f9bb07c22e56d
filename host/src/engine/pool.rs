//! Running a whole training phase (or a benchmarked step) on the rayon pool's own threads.
//!
//! The fused kernels split their loops over the rayon pool. Called from a thread outside the
//! pool (the process's main thread), every such loop is queued to the pool while the caller
//! sleeps on a lock until it is done: one cross-thread wake-up and sleep per kernel call (about
//! 130 per step of the reference teacher) and the calling core idle meanwhile. Called from one
//! of the pool's threads, the loop is split in place, the caller working on its share and the
//! other workers stealing the rest. Running the phase on the pool made the reference KD step
//! ~13% and the teacher's training step ~7% faster on the 2-core machine (docs/performance.md).
//!
//! The pool is rayon's default size (`RAYON_NUM_THREADS`, else one thread per core) with a
//! 64 MiB stack per thread (rayon's threads get 2 MiB by default; the main thread had 8 MiB, and
//! candle's graph walks recurse).

use std::sync::OnceLock;

/// Stack of each pool thread.
const STACK_BYTES: usize = 64 << 20;

fn pool() -> Option<&'static rayon::ThreadPool> {
    static POOL: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    POOL.get_or_init(|| {
        rayon::ThreadPoolBuilder::new()
            .thread_name(|i| format!("retort-{i}"))
            .stack_size(STACK_BYTES)
            .build()
            .map_err(|e| tracing::warn!("no rayon pool for the training loop ({e}); running it on the caller"))
            .ok()
    })
    .as_ref()
}

/// `f()` run on a thread of retort's rayon pool (in place when already on a pool thread, or
/// when the pool could not be built), so that the kernels it calls split their loops in place.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    if rayon::current_thread_index().is_some() {
        return f();
    }
    match pool() {
        Some(p) => p.install(f),
        None => f(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_on_a_pool_thread_and_returns_the_value() {
        assert!(rayon::current_thread_index().is_none());
        let (inside, name, v) = on_pool(|| {
            let name = std::thread::current().name().map(str::to_owned);
            (rayon::current_thread_index().is_some(), name, 6 * 7)
        });
        assert!(inside);
        assert!(name.is_some_and(|n| n.starts_with("retort-")));
        assert_eq!(v, 42);
        // Nested calls run in place.
        let nested = on_pool(|| on_pool(rayon::current_thread_index));
        assert!(nested.is_some());
    }

    #[test]
    fn a_deep_recursion_fits_the_stack() {
        // ~16 MiB of frames: more than a default 2 MiB thread stack holds.
        fn depth(n: usize) -> usize {
            let pad = std::hint::black_box([0u8; 1024]);
            if n == 0 {
                pad[0] as usize
            } else {
                depth(n - 1) + 1 + pad[1] as usize
            }
        }
        assert_eq!(on_pool(|| depth(16_000)), 16_000);
    }
}
