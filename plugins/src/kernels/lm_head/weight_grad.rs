//! `dL/dW = sum_c G_c^T h_c`, summed chunk by chunk: in place by the `gemm` crate for CPU
//! f32/f64 (no `[V, H]` temporary per chunk; straight into the weight's leaf-gradient buffer
//! where the thread's collector holds the weight), by candle's `matmul` and an add elsewhere.

use candle_core::{CpuStorage, DType, Device, InplaceOp3, Layout, Result, Storage, Tensor, Var, WithDType};

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::linear::{self, multiply, Products};
use crate::kernels::cpu::raw::gemm::{gemm_into, Mat};
use crate::kernels::cpu::raw::output_vec;
use crate::kernels::cpu::rows::{slice, slice_mut};
use crate::kernels::leaf_grads::Claim;

/// The running sum of `G_c^T h_c`, `[V, H]`.
pub enum WeightGrad {
    /// CPU f32, row-major.
    F32(Vec<f32>, (usize, usize)),
    /// CPU f64, row-major.
    F64(Vec<f64>, (usize, usize)),
    /// Any other device or dtype: a tensor (none before the first chunk).
    Tensor(Option<Tensor>),
    /// A CPU f32/f64 leaf-gradient buffer, `scale` times each chunk's product written into it
    /// (the first one overwriting it unless the claim says to add).
    Leaf(Claim, f64),
}

impl WeightGrad {
    /// Zero, for a weight of `dims` `(V, H)` of `dtype` on `device`.
    pub fn zeros(dims: (usize, usize), dtype: DType, device: &Device) -> Self {
        match (device, dtype) {
            (Device::Cpu, DType::F32) => WeightGrad::F32(vec![0.0; dims.0 * dims.1], dims),
            (Device::Cpu, DType::F64) => WeightGrad::F64(vec![0.0; dims.0 * dims.1], dims),
            _ => WeightGrad::Tensor(None),
        }
    }

    /// Whether the products can go into a leaf-gradient buffer shaped like `weight` (one on
    /// the CPU, f32 or f64).
    pub fn writes_into(weight: &Tensor) -> bool {
        weight.device().is_cpu() && matches!(weight.dtype(), DType::F32 | DType::F64)
    }

    /// Into a claimed leaf-gradient buffer, each product times `scale`; `None` where the
    /// buffer is not a contiguous CPU f32/f64 tensor (check [`WeightGrad::writes_into`]
    /// before claiming).
    pub fn leaf(claim: Claim, scale: f64) -> Option<Self> {
        let b = &claim.buffer;
        (Self::writes_into(b) && b.is_contiguous()).then_some(WeightGrad::Leaf(claim, scale))
    }

    /// Adds `g^T h` for `g [C, V]` and `h [C, H]` (contiguous, of the accumulator's dtype),
    /// multiplied as `products` says (bf16 products: CPU f32 only).
    pub fn add(&mut self, g: &Tensor, h: &Tensor, products: Products) -> Result<()> {
        match self {
            WeightGrad::Leaf(claim, scale) => {
                let h = if *scale == 1.0 { h.clone() } else { (h * *scale)? };
                let op = ProductInto {
                    accumulate: claim.accumulate,
                    products,
                };
                claim.buffer.inplace_op3(&g.contiguous()?, &h.contiguous()?, &op)?;
                claim.accumulate = true;
                Ok(())
            }
            WeightGrad::F32(acc, _) => add_in_place(acc, g, h, products),
            WeightGrad::F64(acc, _) => add_in_place(acc, g, h, products),
            WeightGrad::Tensor(_) if products == Products::Bf16 => {
                candle_core::bail!("lm_head: bf16 products of the weight's gradient need CPU f32 tensors")
            }
            WeightGrad::Tensor(acc) => {
                // Half-precision chunks (mixed precision) are summed in f32.
                let p = product(&g.t()?, h)?;
                let p = match p.dtype() {
                    DType::BF16 | DType::F16 => p.to_dtype(DType::F32)?,
                    _ => p,
                };
                *acc = Some(match acc.take() {
                    Some(a) => (a + p)?,
                    None => p,
                });
                Ok(())
            }
        }
    }

    /// The sum as a `[V, H]` tensor (zeros when nothing was added) of `dtype` on `device`;
    /// `None` when it went into a leaf-gradient buffer.
    pub fn finish(self, dims: (usize, usize), dtype: DType, device: &Device) -> Result<Option<Tensor>> {
        Ok(Some(match self {
            WeightGrad::F32(v, d) => Tensor::from_vec(v, d, device)?,
            WeightGrad::F64(v, d) => Tensor::from_vec(v, d, device)?,
            WeightGrad::Tensor(Some(t)) => t.to_dtype(dtype)?,
            WeightGrad::Tensor(None) => Tensor::zeros(dims, dtype, device)?,
            WeightGrad::Leaf(claim, _) if !claim.accumulate => {
                // Claimed, never written: the step's contribution is zero.
                claim.buffer.inplace_op1(&Zero)?;
                return Ok(None);
            }
            WeightGrad::Leaf(..) => return Ok(None),
        }))
    }
}

/// A chunk's logits `h w^T` (`h [C, H]`, `w [V, H]`) as a fresh variable of shape `dims`: for
/// CPU f32/f64 the product is written straight into the variable's storage, elsewhere
/// [`product`] is copied into one.
pub fn logits_var(h: &Tensor, w: &Tensor, dims: (usize, usize, usize)) -> Result<Var> {
    if linear::supports(h, w, None) {
        match h.dtype() {
            DType::F32 => return logits_var_cpu::<f32>(h, w, dims),
            DType::F64 => return logits_var_cpu::<f64>(h, w, dims),
            _ => {}
        }
    }
    Var::from_tensor(&product(h, &w.t()?)?.reshape(dims)?)
}

fn logits_var_cpu<T: Real + WithDType>(h: &Tensor, w: &Tensor, dims: (usize, usize, usize)) -> Result<Var> {
    let ((c, width), (v, width2)) = (h.dims2()?, w.dims2()?);
    if width != width2 || dims.0 * dims.1 != c || dims.2 != v {
        candle_core::bail!(
            "lm_head: logits of {:?} and {:?} cannot be {dims:?}",
            h.dims(),
            w.dims()
        );
    }
    let mut out = output_vec::<T>(c * v);
    on_cpu_slices::<T, _>(h, w, ["lm_head input", "lm_head weight"], |hd, wd| {
        gemm_into(
            &mut out,
            false,
            &Mat::dense(hd, c, width),
            &Mat::dense(wd, v, width).t(),
        )
    })?;
    Var::from_vec(out, dims, h.device())
}

/// `a @ b` for matrices: the CPU linear kernel (`gemm`, the operands' strides read in place)
/// where it runs, candle's `matmul` elsewhere (cuBLAS on CUDA).
pub fn product(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if linear::supports(a, b, None) {
        return linear::linear(a, b, None);
    }
    a.matmul(b)
}

/// `buffer (+)= g^T h` (args: the buffer, `g`, `h`), adding when `accumulate`.
struct ProductInto {
    accumulate: bool,
    products: Products,
}

impl InplaceOp3 for ProductInto {
    fn name(&self) -> &'static str {
        "lm-head-dw-into"
    }

    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        g: &CpuStorage,
        gl: &Layout,
        h: &CpuStorage,
        hl: &Layout,
    ) -> Result<()> {
        match dst {
            CpuStorage::F32(_) => product_into::<f32>((dst, dl), (g, gl), (h, hl), self),
            CpuStorage::F64(_) => product_into::<f64>((dst, dl), (g, gl), (h, hl), self),
            _ => candle_core::bail!("lm_head: the weight's gradient buffer must be f32 or f64"),
        }
    }
}

fn product_into<T: Real>(
    dst: (&mut CpuStorage, &Layout),
    g: (&CpuStorage, &Layout),
    h: (&CpuStorage, &Layout),
    op: &ProductInto,
) -> Result<()> {
    let ((c, v), (c2, width)) = (g.1.shape().dims2()?, h.1.shape().dims2()?);
    if c != c2 || dst.1.shape().elem_count() != v * width {
        candle_core::bail!(
            "lm_head: chunk gradient {:?} and input {:?} do not match the buffer {:?}",
            g.1.dims(),
            h.1.dims(),
            dst.1.dims()
        );
    }
    let (gd, hd) = (
        slice::<T>(g.0, g.1, "lm_head gradient")?,
        slice::<T>(h.0, h.1, "lm_head input")?,
    );
    let acc = slice_mut::<T>(dst.0, dst.1, "lm_head weight gradient")?;
    dw_product(acc, op.accumulate, gd, hd, (c, v, width), op.products)
}

/// Zeroes a CPU f32/f64 buffer.
struct Zero;

impl candle_core::InplaceOp1 for Zero {
    fn name(&self) -> &'static str {
        "zero"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, l: &Layout) -> Result<()> {
        match dst {
            CpuStorage::F32(_) => slice_mut::<f32>(dst, l, "zeroed buffer")?.fill(0.0),
            CpuStorage::F64(_) => slice_mut::<f64>(dst, l, "zeroed buffer")?.fill(0.0),
            _ => candle_core::bail!("zero: expected f32 or f64"),
        }
        Ok(())
    }
}

/// `acc [V, H] += g^T h` by one `gemm` call.
fn add_in_place<T: Real>(acc: &mut [T], g: &Tensor, h: &Tensor, products: Products) -> Result<()> {
    let ((c, v), (c2, width)) = (g.dims2()?, h.dims2()?);
    if c != c2 || acc.len() != v * width {
        candle_core::bail!(
            "lm_head: chunk gradient {:?} and input {:?} do not match",
            g.dims(),
            h.dims()
        );
    }
    on_cpu_slices::<T, _>(g, h, ["lm_head gradient", "lm_head input"], |gd, hd| {
        dw_product(acc, true, gd, hd, (c, v, width), products)
    })?
}

/// `acc [V, H] (+)= g^T h` over row-major slices `g [C, V]`, `h [C, H]` (`dims = (C, V, H)`).
fn dw_product<T: Real>(
    acc: &mut [T],
    accumulate: bool,
    g: &[T],
    h: &[T],
    (c, v, width): (usize, usize, usize),
    products: Products,
) -> Result<()> {
    multiply(
        acc,
        accumulate,
        &Mat::dense(g, c, v).t(),
        &Mat::dense(h, c, width),
        products,
    )
}

/// `f` on the contiguous CPU slices of `a` and `b` (`names`: what each is, for errors).
fn on_cpu_slices<T: Real, R>(a: &Tensor, b: &Tensor, names: [&str; 2], f: impl FnOnce(&[T], &[T]) -> R) -> Result<R> {
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let (sa, la) = a.storage_and_layout();
    let (sb, lb) = b.storage_and_layout();
    let (Storage::Cpu(sa), Storage::Cpu(sb)) = (&*sa, &*sb) else {
        candle_core::bail!("lm_head: expected CPU tensors")
    };
    Ok(f(slice::<T>(sa, la, names[0])?, slice::<T>(sb, lb, names[1])?))
}
