//! All of the CUDA side's `unsafe` code, each block with the reason it is sound: the kernel
//! launch, the uninitialised output buffer, and the optimizer's in-place update (with the
//! device-address tables of the group kernels).
#![allow(unsafe_code)]

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DevicePtr, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use candle_core::{bail, Result, Storage, Tensor};

use super::Module;
use crate::kernels::grid::Grid;

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
        let cfg: candle_core::cuda_backend::cudarc::driver::LaunchConfig = $cfg;
        // An empty grid (no rows) launches nothing: CUDA refuses it, and there is nothing to do.
        if cfg.grid_dim.0 != 0 && cfg.grid_dim.1 != 0 && cfg.grid_dim.2 != 0 {
        let module: $crate::kernels::cuda::Module = $module;
        let func = $dev.get_or_load_custom_func(&$func, module.name, module.ptx)?;
        let mut builder = func.builder();
        $( candle_core::cuda_backend::cudarc::driver::PushKernelArg::arg(&mut builder, $arg); )*
        // SAFETY: the caller's contract above: the arguments match the kernel's signature and
        // the buffers cover what it touches for the sizes given.
        #[allow(unsafe_code)]
        let launched = unsafe { builder.launch(cfg) };
        candle_core::cuda_backend::WrapErr::w(launched)?;
        }
    }};
}
pub(crate) use launch;

/// Runs `kernel` of `module` once over a group of `[w, g, m, v]` quadruples (contiguous CUDA
/// tensors of `T` from their start, one length per quadruple, on one device): the kernel writes
/// every `w`, `m` and `v` in place. Its parameters are `(table, count: unsigned, scalars: 8 x
/// double)`, `table` the [`address_table`] of the ws, gs, ms and vs.
pub(crate) fn update_group_in_place<T: CudaDType + DeviceRepr>(
    module: Module,
    kernel: &str,
    group: &[[&Tensor; 4]],
    s: [f64; 8],
) -> Result<()> {
    if group
        .iter()
        .any(|[w, g, m, v]| [g, m, v].iter().any(|t| t.elem_count() != w.elem_count()))
    {
        bail!("{kernel}: a parameter, its gradient and its moments differ in size")
    }
    for chunk in group.chunks(MAX_GROUP) {
        let operands: Vec<Vec<&Tensor>> = (0..4).map(|k| chunk.iter().map(|q| q[k]).collect()).collect();
        let (table, dev) = address_table::<T>(kernel, &operands)?;
        let mut buffers = table[..4 * chunk.len()].to_vec();
        buffers.sort_unstable();
        buffers.dedup();
        if buffers.len() != 4 * chunk.len() {
            bail!("{kernel}: the parameters, their gradients and their moments must be separate buffers")
        }
        let longest = chunk.iter().map(|q| q[0].elem_count()).max().unwrap_or(0);
        let cfg = super::config(Grid::group(chunk.len(), longest, 65_535));
        let count = chunk.len() as u32;
        let table = dev.clone_htod(&table)?;
        // The kernel writes through the handles of the ws, ms and vs although only read locks
        // were held while their addresses were taken: the optimizer owns the moments alone, and
        // each w is a parameter it is updating (the same write `Var::set` makes); the write is
        // ordered on candle's stream after every op queued before it, and nothing reads these
        // buffers on another stream. The tensors outlive this call; a buffer freed later is
        // freed in stream order, after the kernel.
        launch!(
            dev,
            module,
            kernel,
            cfg,
            [&table, &count, &s[0], &s[1], &s[2], &s[3], &s[4], &s[5], &s[6], &s[7]]
        );
    }
    Ok(())
}

/// Tensors per launch of a group kernel: one grid row (`blockIdx.y`) each.
pub(crate) const MAX_GROUP: usize = 65_535;

/// The table of a group kernel, `table[k * count + t]`: the device address of operand `k` of
/// tensor `t` (`operands[k][t]`: contiguous CUDA tensors of `T` from their start), then the
/// element count of each `operands[0][t]`; with the tensors' device (one for all: checked).
pub(crate) fn address_table<T: CudaDType + DeviceRepr>(
    kernel: &str,
    operands: &[Vec<&Tensor>],
) -> Result<(Vec<u64>, CudaDevice)> {
    let mut table = Vec::new();
    let mut device: Option<CudaDevice> = None;
    for tensor in operands.iter().flatten() {
        let (storage, layout) = tensor.storage_and_layout();
        let Storage::Cuda(cs) = &*storage else {
            bail!("{kernel}: expected CUDA tensors")
        };
        if layout.start_offset() != 0 || !layout.is_contiguous() {
            bail!("{kernel}: expected contiguous tensors from their start")
        }
        if device.as_ref().is_some_and(|d| d.id() != cs.device.id()) {
            bail!("{kernel}: the tensors are on different devices")
        }
        let dev = device.get_or_insert_with(|| cs.device.clone());
        let stream = dev.cuda_stream();
        table.push(cs.as_cuda_slice::<T>()?.device_ptr(&stream).0);
    }
    let Some(dev) = device else {
        bail!("{kernel}: no operands")
    };
    table.extend(operands[0].iter().map(|t| t.elem_count() as u64));
    Ok((table, dev))
}
