//! The CPU emulation's one foreign call (feature `cuda-emulate`, tests only): the launch of a
//! kernel compiled from its `.cu` file as C++ (`kernels/cuda/emulate.cpp`).
#![allow(unsafe_code)]

use std::ffi::{c_char, c_int, c_uint, c_void, CString};

use super::Arg;
use crate::kernels::grid::Grid;

extern "C" {
    fn retort_emu_launch(
        name: *const c_char,
        grid: *const c_uint,
        block: *const c_uint,
        shared_bytes: usize,
        params: *mut *mut c_void,
    ) -> c_int;
}

/// Runs kernel `name` on `grid` with `args`; `false` when no kernel has that name.
///
/// The caller's contract (as for a launch on the GPU): `args` match the kernel's parameters in
/// number, order and type, and every buffer an `Arg::Ptr` points into covers what the kernel
/// reads or writes for the sizes passed with it (and outlives the call).
pub(super) fn launch(name: &str, grid: &Grid, args: &[Arg]) -> bool {
    let Ok(name) = CString::new(name) else {
        return false;
    };
    let blocks = [grid.blocks.0, grid.blocks.1, grid.blocks.2];
    let threads = [grid.threads.0, grid.threads.1, grid.threads.2];
    // `params[i]` points at argument i's value, which lives in `args` for the whole call.
    let mut params: Vec<*mut c_void> = args.iter().map(Arg::address).collect();
    // SAFETY: the name is NUL-terminated, the grid arrays hold 3 elements each, `params` holds
    // one valid pointer per argument, and the caller's contract above covers what the kernel
    // does with them. The emulator runs the kernel to completion before returning.
    let status = unsafe {
        retort_emu_launch(
            name.as_ptr(),
            blocks.as_ptr(),
            threads.as_ptr(),
            grid.shared_bytes as usize,
            params.as_mut_ptr(),
        )
    };
    status == 0
}
