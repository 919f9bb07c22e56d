//! retort-plugins: every built-in implementation, one concept a file, each registering itself
//! with `inventory::submit!` exactly as a statically linked third-party plugin would.

pub mod cache;
pub mod data;
pub mod formats;
#[cfg(test)]
pub(crate) mod fuzz;
pub mod kernels;
pub mod losses;
pub mod models;
pub mod observers;
pub mod routers;
pub mod schedules;
pub mod students;
pub mod teachers;
#[doc(hidden)]
pub mod testing;
pub mod tokenizers;

/// Forces this crate into the final binary so its `inventory` submissions are collected.
/// Call it once before `Registry::from_inventory()`.
#[inline(never)]
pub fn link() {
    // Referencing a function of the crate is enough for the linker to keep its objects.
    std::hint::black_box(kernels::softmax::softmax_last as *const ());
}
