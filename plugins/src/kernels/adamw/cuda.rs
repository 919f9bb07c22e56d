//! The CUDA AdamW update: `adamw.cu`, one in-place pass over the parameter and both moments
//! (f32, f64), in the parameter's element type as on the CPU.

use candle_core::{bail, DType, Result, Tensor};

use super::AdamWStep;
use crate::kernels::cuda::{kernel, update_in_place as launch_in_place, ADAMW};

/// `w`, `m` and `v` updated in place by one step (contiguous CUDA tensors of one dtype and
/// size, four separate buffers: checked).
pub(super) fn update_in_place(w: &Tensor, g: &Tensor, m: &Tensor, v: &Tensor, s: AdamWStep) -> Result<()> {
    let g = g.contiguous()?;
    let scalars = [
        s.beta1,
        s.beta2,
        s.bias_correction1,
        s.bias_correction2,
        s.eps,
        s.lr,
        1.0 - s.lr * s.weight_decay,
        s.grad_scale,
    ];
    let func = kernel("adamw", w.dtype())?;
    match w.dtype() {
        DType::F32 => launch_in_place::<f32>(ADAMW, &func, [w, &g, m, v], scalars),
        DType::F64 => launch_in_place::<f64>(ADAMW, &func, [w, &g, m, v], scalars),
        other => bail!("fused adamw: no CUDA kernel for {other:?}"),
    }
}
