//! The optimizer step on CUDA (`adamw.cu`), one launch per group of parameters: the AdamW
//! update in place over every parameter and both its moments (f32, f64: the parameter's
//! element type, as on the CPU), and the gradients' sums of squares in f64 (any float dtype).

use candle_core::cuda_backend::cudarc::driver::DeviceRepr;
use candle_core::cuda_backend::CudaDType;
use candle_core::{bail, DType, Result, Tensor};

use super::AdamWStep;
use crate::kernels::cuda::{address_table, config, kernel, launch, output, update_group_in_place, ADAMW, MAX_GROUP};
use crate::kernels::grid::Grid;

/// Blocks per tensor of the sum of squares (at most; fewer for small tensors).
const SUM_BLOCKS: usize = 64;

/// Every `[w, g, m, v]` of `group` updated in place by one step (contiguous CUDA tensors of
/// one dtype, each quadruple of one size and four separate buffers: checked).
pub(super) fn update_group(group: &[[&Tensor; 4]], s: AdamWStep) -> Result<()> {
    let Some(dtype) = group.first().map(|q| q[0].dtype()) else {
        return Ok(());
    };
    if group.iter().flatten().any(|t| t.dtype() != dtype) {
        bail!("fused adamw: the group's tensors differ in dtype")
    }
    let grads: Vec<Tensor> = group.iter().map(|q| q[1].contiguous()).collect::<Result<_>>()?;
    let group: Vec<[&Tensor; 4]> = group.iter().zip(&grads).map(|(q, g)| [q[0], g, q[2], q[3]]).collect();
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
    let func = kernel("adamw", dtype)?;
    match dtype {
        DType::F32 => update_group_in_place::<f32>(ADAMW, &func, &group, scalars),
        DType::F64 => update_group_in_place::<f64>(ADAMW, &func, &group, scalars),
        other => bail!("fused adamw: no CUDA kernel for {other:?}"),
    }
}

/// `sum(x^2)` of each of `xs` (CUDA tensors of one float dtype), accumulated in f64: one launch
/// per [`MAX_GROUP`] tensors and one transfer.
pub(super) fn sum_squares(xs: &[&Tensor]) -> Result<Vec<f64>> {
    let Some(dtype) = xs.first().map(|x| x.dtype()) else {
        return Ok(Vec::new());
    };
    if xs.iter().any(|x| x.dtype() != dtype) {
        bail!("sum of squares: the tensors differ in dtype")
    }
    let xs: Vec<Tensor> = xs.iter().map(|x| x.contiguous()).collect::<Result<_>>()?;
    let func = kernel("sum_squares", dtype)?;
    let mut sums = Vec::with_capacity(xs.len());
    for chunk in xs.chunks(MAX_GROUP) {
        let chunk: Vec<&Tensor> = chunk.iter().collect();
        sums.extend(match dtype {
            DType::F32 => sum_squares_launch::<f32>(&func, &chunk)?,
            DType::F64 => sum_squares_launch::<f64>(&func, &chunk)?,
            DType::F16 => sum_squares_launch::<half::f16>(&func, &chunk)?,
            DType::BF16 => sum_squares_launch::<half::bf16>(&func, &chunk)?,
            other => bail!("sum of squares: no CUDA kernel for {other:?}"),
        });
    }
    Ok(sums)
}

/// One launch of `sum_squares_<dtype>` over `xs` (at most [`MAX_GROUP`]): the blocks' partial
/// sums, added here in block order.
fn sum_squares_launch<T: CudaDType + DeviceRepr>(func: &str, xs: &[&Tensor]) -> Result<Vec<f64>> {
    let (table, dev) = address_table::<T>(func, &[xs.to_vec()])?;
    let longest = xs.iter().map(|x| x.elem_count()).max().unwrap_or(0);
    let cfg = config(Grid::group(xs.len(), longest, SUM_BLOCKS));
    let blocks = cfg.grid_dim.0 as usize;
    let count = xs.len() as u32;
    let table = dev.clone_htod(&table)?;
    let partial = output::<f64>(&dev, blocks * xs.len())?;
    launch!(dev, ADAMW, func, cfg, [&table, &count, &partial]);
    let partial = dev.clone_dtoh(&partial)?;
    Ok(partial.chunks(blocks).map(|b| b.iter().sum()).collect())
}
