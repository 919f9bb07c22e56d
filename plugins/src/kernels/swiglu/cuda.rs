//! The CUDA SwiGLU: `swiglu.cu`, element-wise grid-stride kernels, f32/f64/f16/bf16 (math in
//! f32, f64 for f64).

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::{CudaDType, CudaStorage};
use candle_core::{bail, Layout, Result, Shape};

use crate::kernels::cuda::{by_element_dtype, elements_config, kernel, launch, output, view, SWIGLU};

type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// Checks that `args` share the first one's shape and dtype.
fn same(what: &str, args: &[Arg]) -> Result<()> {
    let (s0, l0) = args[0];
    for (s, l) in &args[1..] {
        if l.shape() != l0.shape() || s.dtype() != s0.dtype() {
            bail!(
                "{what}: operands {:?}/{:?} and {:?}/{:?} differ",
                l0.shape(),
                s0.dtype(),
                l.shape(),
                s.dtype()
            )
        }
    }
    Ok(())
}

/// The forward on the gate (`s1`) and up (`s2`).
pub(super) fn fwd(s1: &CudaStorage, l1: &Layout, s2: &CudaStorage, l2: &Layout) -> Result<(CudaStorage, Shape)> {
    same("fused-swiglu", &[(s1, l1), (s2, l2)])?;
    let out = by_element_dtype!(s1.dtype(), "fused-swiglu", fwd_typed((s1, l1), (s2, l2)))?;
    Ok((out, l1.shape().clone()))
}

fn fwd_typed<T: CudaDType + DeviceRepr>(g: Arg, u: Arg) -> Result<CudaStorage> {
    let dev = g.0.device();
    let n = g.1.shape().elem_count();
    let gs = view::<T>(g.0, g.1, "gate")?;
    let us = view::<T>(u.0, u.1, "up")?;
    let out = output::<T>(dev, n)?;
    let n_arg = n as u64;
    launch!(
        dev,
        SWIGLU,
        kernel("swiglu_fwd", g.0.dtype())?,
        elements_config(n),
        [&gs, &us, &out, &n_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}

/// The backward on `(g, u, dy)`: `dg` then `du`, one flat `[2 n]`.
pub(super) fn bwd(st: [Arg; 3]) -> Result<(CudaStorage, Shape)> {
    same("fused-swiglu-grad", &st)?;
    let n = st[0].1.shape().elem_count();
    let out = by_element_dtype!(st[0].0.dtype(), "fused-swiglu-grad", bwd_typed(st))?;
    Ok((out, Shape::from(2 * n)))
}

fn bwd_typed<T: CudaDType + DeviceRepr>(st: [Arg; 3]) -> Result<CudaStorage> {
    let dev = st[0].0.device();
    let n = st[0].1.shape().elem_count();
    let gs = view::<T>(st[0].0, st[0].1, "gate")?;
    let us = view::<T>(st[1].0, st[1].1, "up")?;
    let dys = view::<T>(st[2].0, st[2].1, "grad")?;
    let out = output::<T>(dev, 2 * n)?;
    let n_arg = n as u64;
    launch!(
        dev,
        SWIGLU,
        kernel("swiglu_bwd", st[0].0.dtype())?,
        elements_config(n),
        [&gs, &us, &dys, &out, &n_arg]
    );
    Ok(CudaStorage::wrap_cuda_slice(out, dev.clone()))
}
