//! The CUDA kernels run on the CPU (feature `cuda-emulate`, tests only): each `.cu` file
//! compiled as C++ against `kernels/cuda/emulate.h`, launched by name with the grid its
//! `cuda.rs` computes ([`crate::kernels::grid`]) on host buffers. Each op's `cuda_emulated.rs`
//! compares its kernels with the op's CPU implementation: the device code's arithmetic,
//! indexing, reductions and barriers are checked on machines without a GPU. What this cannot
//! check: the `cuda.rs` glue (views, allocation), timing, and the GPU's own math library (the
//! emulation uses the host's libm).

mod autograd;
mod raw;

pub(crate) use autograd::{reference, row_weights, value_and_grad};

use std::ffi::c_void;

use half::{bf16, f16};

use super::grid::Grid;

/// One kernel argument: a buffer's address or a scalar (what the kernel's parameter is).
#[derive(Debug, Clone, Copy)]
pub(crate) enum Arg {
    /// A device pointer (here: a host buffer's address).
    Ptr(*const c_void),
    I32(i32),
    U32(u32),
    U64(u64),
    F64(f64),
}

impl Arg {
    /// The address of a buffer the kernel reads.
    pub fn input<T>(buffer: &[T]) -> Arg {
        Arg::Ptr(buffer.as_ptr().cast())
    }

    /// The address of a buffer the kernel writes.
    pub fn output<T>(buffer: &mut [T]) -> Arg {
        Arg::Ptr(buffer.as_mut_ptr().cast::<c_void>().cast_const())
    }

    /// Where this argument's value lives (what the launch's `params[i]` holds).
    fn address(&self) -> *mut c_void {
        match self {
            Arg::Ptr(p) => (p as *const *const c_void).cast::<c_void>().cast_mut(),
            Arg::I32(v) => (v as *const i32).cast::<c_void>().cast_mut(),
            Arg::U32(v) => (v as *const u32).cast::<c_void>().cast_mut(),
            Arg::U64(v) => (v as *const u64).cast::<c_void>().cast_mut(),
            Arg::F64(v) => (v as *const f64).cast::<c_void>().cast_mut(),
        }
    }
}

/// Runs kernel `name` on `grid` with `args` (in the kernel's parameter order, buffers covering
/// what it touches); an empty grid runs nothing. Panics on an unknown name (a test's error).
pub(crate) fn launch(name: &str, grid: &Grid, args: &[Arg]) {
    if grid.is_empty() {
        return;
    }
    assert!(raw::launch(name, grid, args), "no emulated kernel named {name}");
}

/// An element type of the kernels' buffers, converted through f64 for the tests.
pub(crate) trait Element: Copy + Default + Send + Sync + 'static {
    /// The kernel-name suffix (`f32`, `f64`, `f16`, `bf16`).
    const SUFFIX: &'static str;
    /// The type of the kernels' row statistics for this storage: f64 for f64, else f32.
    type Acc: Element;
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
}

impl Element for f32 {
    const SUFFIX: &'static str = "f32";
    type Acc = f32;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        self as f64
    }
}

impl Element for f64 {
    const SUFFIX: &'static str = "f64";
    type Acc = f64;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
}

impl Element for f16 {
    const SUFFIX: &'static str = "f16";
    type Acc = f32;
    fn from_f64(x: f64) -> Self {
        f16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        f16::to_f64(self)
    }
}

impl Element for bf16 {
    const SUFFIX: &'static str = "bf16";
    type Acc = f32;
    fn from_f64(x: f64) -> Self {
        bf16::from_f64(x)
    }
    fn to_f64(self) -> f64 {
        bf16::to_f64(self)
    }
}

/// `values` in element type `T`.
pub(crate) fn buffer<T: Element>(values: &[f64]) -> Vec<T> {
    values.iter().map(|&x| T::from_f64(x)).collect()
}

/// `values` as f64.
pub(crate) fn widen<T: Element>(values: &[T]) -> Vec<f64> {
    values.iter().map(|x| x.to_f64()).collect()
}

/// Deterministic pseudo-random values in `[-scale, scale)`.
pub(crate) fn noise(n: usize, seed: u64, scale: f64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 2.0 - 1.0) * scale
        })
        .collect()
}

/// The largest `|a - b| / (1 + |b|)` over the elements (a mixed absolute/relative error).
pub(crate) fn max_error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "compared buffers differ in length");
    a.iter()
        .zip(b)
        .map(|(x, y)| if x == y { 0.0 } else { (x - y).abs() / (1.0 + y.abs()) })
        .fold(0.0, f64::max)
}

/// The tolerance of a kernel computing in f32 (f64 for f64) on `T` storage against an f64
/// reference: the rounding of `T` itself where it is half precision.
pub(crate) fn tolerance<T: Element>() -> f64 {
    match T::SUFFIX {
        "f64" => 1e-10,
        "f32" => 1e-5,
        "f16" => 4e-3,
        _ => 2e-2,
    }
}

/// `values` rounded to `T` and widened back: the inputs a kernel in `T` sees, for the reference.
pub(crate) fn rounded<T: Element>(values: &[f64]) -> Vec<f64> {
    widen(&buffer::<T>(values))
}

/// Panics naming `what` where `got` and `want` differ by more than `T`'s [`tolerance`].
pub(crate) fn assert_close<T: Element>(what: &str, got: &[f64], want: &[f64]) {
    let e = max_error(got, want);
    assert!(e <= tolerance::<T>(), "{what} ({}): error {e:e}", T::SUFFIX);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_kernel_is_reported() {
        let grid = Grid::rows(1, 1).expect("grid");
        let caught = std::panic::catch_unwind(|| launch("no_such_kernel", &grid, &[]));
        assert!(caught.is_err());
    }

    #[test]
    fn half_loads_widen_exactly() {
        // The emulator's `__half2float` / `__bfloat162float` against the `half` crate, through a
        // kernel: the cross-entropy forward on one-element rows writes lse = the element.
        let xs: Vec<f64> = noise(400, 7, 70_000.0)
            .into_iter()
            .enumerate()
            .map(|(i, x)| x * 10f64.powi(-((i % 12) as i32)))
            .collect();
        assert_eq!(round_trip::<f16>(&xs), widen(&buffer::<f16>(&xs)));
        assert_eq!(round_trip::<bf16>(&xs), widen(&buffer::<bf16>(&xs)));
    }

    /// `xs` stored as `T`, loaded by a kernel (a one-element row's cross-entropy `lse` is the
    /// element), one row each.
    fn round_trip<T: Element>(xs: &[f64]) -> Vec<f64> {
        let z: Vec<T> = buffer(xs);
        let y = vec![0u32; xs.len()];
        let mut out = vec![0f32; 2 * xs.len()];
        let grid = Grid::rows(xs.len(), 1).expect("grid");
        let args = [
            Arg::input(&z),
            Arg::input(&y),
            Arg::output(&mut out),
            Arg::I32(1),
            Arg::F64(0.0),
        ];
        launch(&format!("ce_fwd_{}", T::SUFFIX), &grid, &args);
        out.chunks(2).map(|r| r[1] as f64).collect()
    }
}
