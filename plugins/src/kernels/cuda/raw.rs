//! All of the CUDA side's `unsafe` code, each block with the reason it is sound: the kernel
//! launch, the uninitialised output buffer, and the optimizer's in-place update.
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr, LaunchConfig};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, Result, Storage, Tensor};

use super::Module;

/// A device buffer of `n` elements for a kernel that writes every one of them.
pub(crate) fn output<T: DeviceRepr>(dev: &CudaDevice, n: usize) -> Result<CudaSlice<T>> {
    // SAFETY: the buffer's elements are plain numbers (any bit pattern is a value), and every
    // caller passes it to a kernel that writes all `n` elements before anything reads them
    // (each op's kernel writes every element of its output rows).
    unsafe { dev.alloc::<T>(n) }
}

/// Launches `$func` of module `$module` on the device's (candle's) stream with `$cfg`, pushing
/// `[$arg, ..]` (references) in the order of the kernel's parameter list; `?`s a candle error.
///
/// The caller's contract (kept by each op's `cuda.rs` and its `.cu`, written together): the
/// arguments match the kernel's parameters in number, order and type, and every buffer covers
/// the rows x width the kernel reads or writes for the sizes passed with it.
macro_rules! launch {
    ($dev:expr, $module:expr, $func:expr, $cfg:expr, [$($arg:expr),* $(,)?]) => {{
        let module: $crate::kernels::cuda::Module = $module;
        let func = $dev.get_or_load_custom_func(&$func, module.name, module.ptx)?;
        let mut builder = func.builder();
        $( candle_core::cuda_backend::cudarc::driver::PushKernelArg::arg(&mut builder, $arg); )*
        // SAFETY: the caller's contract above: the arguments match the kernel's signature and
        // the buffers cover what it touches for the sizes given.
        #[allow(unsafe_code)]
        let launched = unsafe { builder.launch($cfg) };
        candle_core::cuda_backend::WrapErr::w(launched)?;
    }};
}
pub(crate) use launch;

/// Runs `kernel` of `module` over `w`, `g`, `m`, `v` (contiguous CUDA tensors of `T`, one
/// length `n`): the kernel writes `w`, `m` and `v` in place; its parameters are
/// `(w, g, m, v, n: size_t, scalars: 8 x double)`.
pub(crate) fn update_in_place<T: CudaDType + DeviceRepr>(
    module: Module,
    kernel: &str,
    [w, g, m, v]: [&Tensor; 4],
    s: [f64; 8],
) -> Result<()> {
    let guards = [w, g, m, v].map(|t| t.storage_and_layout());
    let mut slices = Vec::with_capacity(4);
    let mut device = None;
    for (storage, layout) in &guards {
        let Storage::Cuda(cs) = &**storage else {
            bail!("{kernel}: expected CUDA tensors")
        };
        if layout.start_offset() != 0 || !layout.is_contiguous() {
            bail!("{kernel}: expected contiguous tensors from their start")
        }
        slices.push(cs.as_cuda_slice::<T>()?);
        device = Some(cs.device.clone());
    }
    let Some(dev) = device else {
        bail!("{kernel}: no operands")
    };
    let stream = dev.cuda_stream();
    let mut addresses: Vec<u64> = slices.iter().map(|s| s.device_ptr(&stream).0).collect();
    addresses.sort_unstable();
    addresses.dedup();
    if addresses.len() != 4 {
        bail!("{kernel}: the parameter, its gradient and its two moments must be four separate buffers")
    }
    let n = w.elem_count();
    if [g, m, v].iter().any(|t| t.elem_count() != n) {
        bail!("{kernel}: operands differ in size")
    }
    let n_arg = n as u64;
    let cfg = LaunchConfig {
        grid_dim: (n.div_ceil(256).clamp(1, 65_535) as u32, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    };
    // The kernel writes through the handles of `w`, `m` and `v` although only read locks are
    // held: the optimizer owns `m` and `v` alone, and `w` is the parameter it is updating (the
    // same write `Var::set` makes); the write is ordered on candle's stream after every op
    // queued before it, and nothing reads these buffers on another stream.
    let [sw, sg, sm, sv] = [slices[0], slices[1], slices[2], slices[3]];
    launch!(
        dev,
        module,
        kernel,
        cfg,
        [sw, sg, sm, sv, &n_arg, &s[0], &s[1], &s[2], &s[3], &s[4], &s[5], &s[6], &s[7]]
    );
    Ok(())
}
