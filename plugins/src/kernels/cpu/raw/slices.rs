//! Slices seen as another element type, and outputs allocated without initialisation.

use crate::kernels::cpu::fastmath::Real;

/// `x` as `&[f32]` when `T` is `f32` (for f32-only fast paths inside generic kernels).
pub fn as_f32<T: Real>(x: &[T]) -> Option<&[f32]> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    // SAFETY: `T` is `f32` (same TypeId): the same element type, length and lifetime.
    Some(unsafe { std::slice::from_raw_parts(x.as_ptr().cast(), x.len()) })
}

/// `x` as `&mut [f32]` when `T` is `f32`.
pub fn as_f32_mut<T: Real>(x: &mut [T]) -> Option<&mut [f32]> {
    if std::any::TypeId::of::<T>() != std::any::TypeId::of::<f32>() {
        return None;
    }
    // SAFETY: as in `as_f32`; the borrow is moved into the result.
    Some(unsafe { std::slice::from_raw_parts_mut(x.as_mut_ptr().cast(), x.len()) })
}

/// An output vector of `len` elements that are not initialised: only for kernel outputs every
/// element of which the kernel writes before anything reads it (the same contract as candle's
/// own `alloc_uninit` for its CPU outputs). It skips the zero-filling `memset`, which cost as
/// much as a memory-bound kernel itself and, on fresh pages, faulted them in on one thread.
#[allow(clippy::uninit_vec)] // The point of the function; see the contract above.
pub fn output_vec<T: Real>(len: usize) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    // SAFETY: the capacity is `len`; `T` is f32 or f64 (plain bits, no drop glue), and the
    // caller writes every element before reading it (this function's contract).
    unsafe { v.set_len(len) };
    v
}
