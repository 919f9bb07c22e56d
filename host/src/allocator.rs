//! The process allocator of everything linking this crate (the `retort` binary, its examples and
//! benches), and how it treats freed memory.
//!
//! mimalloc keeps freed blocks for reuse instead of returning them to the OS and faulting them
//! in again on the next step, which glibc's malloc does with the multi-megabyte activations and
//! gradients of every step (docs/performance.md has the measurements). Its `override` feature
//! also replaces C `malloc`/`free`, so memory allocated by a dynamically loaded plugin (built
//! with Rust's default system allocator) and freed here, or the other way round, goes through
//! the same allocator. Turn it off with `--no-default-features`.

#[cfg(feature = "mimalloc")]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The environment variable that sets mimalloc's purge delay (milliseconds; -1: never).
pub const PURGE_DELAY_VAR: &str = "MIMALLOC_PURGE_DELAY";

/// Keeps memory freed during the run committed for reuse (mimalloc's purge delay -1), unless
/// [`PURGE_DELAY_VAR`] is set, which then decides.
///
/// By default mimalloc hands pages that stay free for a second back to the OS. A training step
/// frees the teacher's activations long before the next step allocates them again, so every
/// step faulted them back in and the kernel zeroed them: 20% of the samples of the SmolLM2 KD
/// step at 8 x 256 were `clear_page_erms`, and never purging made the step 10-20% faster for
/// 4% more peak RSS (docs/performance.md, session 25). What stays committed is what the run
/// already needed at its peak, as with PyTorch's caching allocator on a GPU.
pub fn keep_freed_memory() {
    #[cfg(feature = "mimalloc")]
    if std::env::var_os(PURGE_DELAY_VAR).is_none() {
        mimalloc_option::set(mimalloc_option::PURGE_DELAY, -1);
    }
}

/// mimalloc's run-time options (the C API of the version `libmimalloc-sys` builds, v3).
#[cfg(feature = "mimalloc")]
mod mimalloc_option {
    #![allow(unsafe_code)]

    use std::ffi::{c_int, c_long};

    /// `mi_option_purge_delay` in mimalloc v3's `mi_option_t` (checked by a test against the
    /// option's documented default).
    pub const PURGE_DELAY: c_int = 15;

    extern "C" {
        fn mi_option_set(option: c_int, value: c_long);
        #[cfg(test)]
        fn mi_option_get(option: c_int) -> c_long;
    }

    /// Sets an option.
    pub fn set(option: c_int, value: c_long) {
        // SAFETY: plain C call with integer arguments; mimalloc ignores unknown options.
        unsafe { mi_option_set(option, value) }
    }

    /// An option's value.
    #[cfg(test)]
    pub fn get(option: c_int) -> c_long {
        // SAFETY: plain C call with an integer argument.
        unsafe { mi_option_get(option) }
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        /// Option 15 is the purge delay: its default is v3's 1000 ms (its neighbours default
        /// to 1 and 0), or what a run or the environment set it to.
        #[test]
        fn option_15_is_the_purge_delay() {
            let want = match std::env::var(crate::allocator::PURGE_DELAY_VAR) {
                Ok(v) => v.parse().expect("MIMALLOC_PURGE_DELAY: an integer"),
                Err(_) => 1000,
            };
            let now = get(PURGE_DELAY);
            assert!(
                now == want || now == -1,
                "option {PURGE_DELAY} is {now}, expected {want}"
            );
            set(PURGE_DELAY, -1);
            assert_eq!(get(PURGE_DELAY), -1);
        }
    }
}
