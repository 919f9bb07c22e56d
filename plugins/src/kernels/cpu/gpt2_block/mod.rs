//! The pre-LayerNorm GPT-2 block as one fused node with a hand-written backward.
//!
//! Forward, per token (`x` the residual stream, weights stored `[in, out]`):
//! `h = LN1(x)`, `qkv = h Wa + ba`, `y = attn(qkv)` (causal, [`crate::kernels::attention`]),
//! `x1 = x + y Wp + bp`, `h2 = LN2(x1)`, `z = h2 Wf + bf`, `u = gelu(z)`, `out = x1 + u Wm + bm`.
//!
//! Backward from `g = d out`:
//! `dWm = u^T g`, `dbm = sum g`, `dz = (g Wm^T) * gelu'(z)`, `dWf = h2^T dz`, `dbf = sum dz`,
//! `dx1 = g + LN2'(dz Wf^T)`, `dWp = y^T dx1`, `dbp = sum dx1`, `dqkv = attn'(dx1 Wp^T)`,
//! `dWa = h^T dqkv`, `dba = sum dqkv`, `dx = dx1 + LN1'(dqkv Wa^T)` (sums over tokens).
//!
//! Why one node: candle's backward gives every intermediate tensor of a composed block its own
//! gradient, created as zeros and then added into (candle issue #1241), about twenty
//! activation-sized gradients per block. In the teacher's training step that was ~27% of the
//! wall time (`perf`, 1 thread for candle's element-wise ops). Here the intermediates are
//! buffers of the op: the residual adds are folded into the projections (their outputs start
//! as `x + b`), and only `dx` and the parameters' gradient leave the node.
//!
//! The node has two inputs: `x` and the block's twelve parameters concatenated (a `cat` node,
//! whose backward hands each parameter its slice of the gradient, so every parameter stays its
//! own `Var` for checkpoints, optimizer groups and exports). The forward keeps its
//! intermediates inside the op when a gradient can be asked for; the backward reads them (so a
//! graph can be differentiated more than once, as with composed ops).
//!
//! CPU only by design: the transformer takes it where [`supports`] says yes and composes the
//! block from the separate ops elsewhere (and when a tap needs the inside of a block).

#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex};

use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Result, Shape, Storage, Tensor};

use crate::kernels::attention::cpu::{packed_attention_bwd, packed_attention_fwd};
use crate::kernels::bias::cpu::column_sums;
use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::raw::gemm::{gemm_into, Mat};
use crate::kernels::cpu::raw::output_vec;
use crate::kernels::cpu::rows::{by_dtype, repeat_rows, slice};
use crate::kernels::gelu::cpu as gelu;
use crate::kernels::layer_norm::cpu as layer_norm;
use crate::kernels::Support;

/// Where the fused block runs: the CPU only.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: &[],
};

/// Whether [`gpt2_block`] runs on `x` with `params` (one dtype, the CPU).
pub fn supports(x: &Tensor, params: &BlockParams) -> bool {
    SUPPORT.admits_together(x, &params.list())
}

/// The block's parameters in the order they are concatenated: LayerNorm 1 weight and bias,
/// attention projection `[d, 3d]` and bias, output projection `[d, d]` and bias, LayerNorm 2
/// weight and bias, MLP in `[d, f]` and bias, MLP out `[f, d]` and bias.
pub struct BlockParams<'a> {
    /// `(weight [d], bias [d])` of the first LayerNorm.
    pub ln_1: (&'a Tensor, &'a Tensor),
    /// `(weight [d, 3d], bias [3d])` of the fused q, k, v projection.
    pub c_attn: (&'a Tensor, &'a Tensor),
    /// `(weight [d, d], bias [d])` of the attention output projection.
    pub attn_proj: (&'a Tensor, &'a Tensor),
    /// `(weight [d], bias [d])` of the second LayerNorm.
    pub ln_2: (&'a Tensor, &'a Tensor),
    /// `(weight [d, f], bias [f])` of the MLP's first layer.
    pub c_fc: (&'a Tensor, &'a Tensor),
    /// `(weight [f, d], bias [d])` of the MLP's second layer.
    pub mlp_proj: (&'a Tensor, &'a Tensor),
}

impl BlockParams<'_> {
    fn list(&self) -> [&Tensor; 12] {
        [
            self.ln_1.0,
            self.ln_1.1,
            self.c_attn.0,
            self.c_attn.1,
            self.attn_proj.0,
            self.attn_proj.1,
            self.ln_2.0,
            self.ln_2.1,
            self.c_fc.0,
            self.c_fc.1,
            self.mlp_proj.0,
            self.mlp_proj.1,
        ]
    }
}

/// The shapes of the twelve parameters (concatenation order) for width `d` and MLP width `f`.
fn param_shapes(d: usize, f: usize) -> [Vec<usize>; 12] {
    let (vd, vf) = (vec![d], vec![f]);
    [
        vd.clone(),
        vd.clone(),
        vec![d, 3 * d],
        vec![3 * d],
        vec![d, d],
        vd.clone(),
        vd.clone(),
        vd.clone(),
        vec![d, f],
        vf,
        vec![f, d],
        vd,
    ]
}

/// Start offsets of the twelve parameters in the concatenation, and its total length.
fn offsets(d: usize, f: usize) -> [usize; 13] {
    let mut o = [0; 13];
    for (i, shape) in param_shapes(d, f).iter().enumerate() {
        o[i + 1] = o[i] + shape.iter().product::<usize>();
    }
    o
}

/// One GPT-2 block (pre-LayerNorm, GELU tanh MLP, causal self-attention with `heads` heads,
/// LayerNorm `eps`) on `x [B, T, d]`, where [`supports`]; the result
/// is the block's output `[B, T, d]` (the residual stream after it).
pub fn gpt2_block(x: &Tensor, params: &BlockParams, heads: usize, eps: f64) -> Result<Tensor> {
    let (_, _, d) = x.dims3()?;
    let f = params.c_fc.0.dims2()?.1;
    let list = params.list();
    for (i, (p, w)) in list.iter().zip(param_shapes(d, f)).enumerate() {
        if p.dims() != w.as_slice() || p.dtype() != x.dtype() {
            bail!(
                "fused block: parameter {i} is {:?} {:?}, expected {w:?} {:?}",
                p.dims(),
                p.dtype(),
                x.dtype()
            )
        }
    }
    if heads == 0 || d % heads != 0 {
        bail!("fused block: width {d} does not split into {heads} heads")
    }
    let flat = Tensor::cat(&list.iter().map(|p| p.flatten_all()).collect::<Result<Vec<_>>>()?, 0)?;
    let keep = x.track_op() || flat.track_op();
    let shape = BlockShape { heads, d, f, eps };
    x.contiguous()?.apply_op2(
        &flat,
        Block {
            shape,
            keep,
            saved: Mutex::new(None),
        },
    )
}

/// The forward's intermediates, `[rows, width]` each: `h`, `qkv`, `y`, `x1`, `h2`, `z`, `u`.
struct Saved([CpuStorage; 7]);

/// The block's sizes: heads, width, MLP width, LayerNorm epsilon.
#[derive(Clone, Copy)]
struct BlockShape {
    heads: usize,
    d: usize,
    f: usize,
    eps: f64,
}

/// The fused block op.
struct Block {
    shape: BlockShape,
    /// Keep the intermediates for a backward (false when nothing can ask for a gradient).
    keep: bool,
    saved: Mutex<Option<Arc<Saved>>>,
}

impl BlockShape {
    fn scale(&self) -> f64 {
        1.0 / ((self.d / self.heads) as f64).sqrt()
    }

    /// The output and, with `keep`, the intermediates.
    fn forward<T: Real>(&self, x: &[T], p: &[T], batch: usize, t: usize, keep: bool) -> (Vec<T>, Option<Saved>) {
        let (d, f, rows) = (self.d, self.f, batch * t);
        let o = offsets(d, f);
        let seg = |i: usize| &p[o[i]..o[i + 1]];
        let h = layer_norm::forward_rows(x, seg(0), seg(1), d, self.eps);
        let mut qkv = repeat_rows(None, seg(3), rows);
        gemm_into(&mut qkv, true, &Mat::dense(&h, rows, d), &Mat::dense(seg(2), d, 3 * d));
        let y = packed_attention_fwd(&qkv, batch, t, self.heads, self.heads, self.scale());
        let mut x1 = repeat_rows(Some(x), seg(5), rows);
        gemm_into(&mut x1, true, &Mat::dense(&y, rows, d), &Mat::dense(seg(4), d, d));
        let h2 = layer_norm::forward_rows(&x1, seg(6), seg(7), d, self.eps);
        let mut z = repeat_rows(None, seg(9), rows);
        gemm_into(&mut z, true, &Mat::dense(&h2, rows, d), &Mat::dense(seg(8), d, f));
        let u = gelu::fwd_typed(&z);
        let mut out = repeat_rows(Some(&x1), seg(11), rows);
        gemm_into(&mut out, true, &Mat::dense(&u, rows, f), &Mat::dense(seg(10), f, d));
        let saved = keep.then(|| Saved([h, qkv, y, x1, h2, z, u].map(T::storage)));
        (out, saved)
    }

    /// `dx` (`rows * d` values) followed by the parameters' gradient in concatenation order.
    #[allow(clippy::too_many_arguments)]
    fn backward<T: Real>(&self, x: &[T], p: &[T], s: [&[T]; 7], g: &[T], batch: usize, t: usize) -> Vec<T> {
        let (d, f, rows) = (self.d, self.f, batch * t);
        let o = offsets(d, f);
        let seg = |i: usize| &p[o[i]..o[i + 1]];
        let [h, qkv, y, x1, h2, z, u] = s;
        let mut out = output_vec(rows * d + o[12]);
        let (dx, dp) = out.split_at_mut(rows * d);
        let mut put_sums = |i: usize, v: &[T], n: usize| {
            for (o, s) in dp[o[i]..o[i + 1]].iter_mut().zip(column_sums(v, n)) {
                *o = T::from_f64(s);
            }
        };
        // MLP out: dWm = u^T g, dbm = sum g; dz = (g Wm^T) gelu'(z).
        put_sums(11, g, d);
        let mut du = output_vec(rows * f);
        gemm_into(&mut du, false, &Mat::dense(g, rows, d), &Mat::dense(seg(10), f, d).t());
        let dz = gelu::bwd_typed(z, &du);
        drop(du);
        put_sums(9, &dz, f);
        // LayerNorm 2 and the residual: dx1 = g + LN2'(dz Wf^T).
        let mut dh2 = output_vec(rows * d);
        gemm_into(
            &mut dh2,
            false,
            &Mat::dense(&dz, rows, f),
            &Mat::dense(seg(8), d, f).t(),
        );
        let mut dx1 = g.to_vec();
        let ln2 = layer_norm::backward_rows(x1, seg(6), &dh2, d, self.eps, &mut dx1, true);
        drop(dh2);
        // Attention: dy = dx1 Wp^T, dqkv = attn'(dy).
        put_sums(5, &dx1, d);
        let mut dy = output_vec(rows * d);
        gemm_into(
            &mut dy,
            false,
            &Mat::dense(&dx1, rows, d),
            &Mat::dense(seg(4), d, d).t(),
        );
        let dqkv = packed_attention_bwd(qkv, y, &dy, batch, t, self.heads, self.heads, self.scale());
        drop(dy);
        put_sums(3, &dqkv, 3 * d);
        // LayerNorm 1 and the residual: dx = dx1 + LN1'(dqkv Wa^T).
        let mut dh = output_vec(rows * d);
        gemm_into(
            &mut dh,
            false,
            &Mat::dense(&dqkv, rows, 3 * d),
            &Mat::dense(seg(2), d, 3 * d).t(),
        );
        dx.copy_from_slice(&dx1);
        let ln1 = layer_norm::backward_rows(x, seg(0), &dh, d, self.eps, dx, true);
        // Weight gradients (each overwrites its segment) and the LayerNorms' (weight, bias).
        gemm_into(
            &mut dp[o[10]..o[11]],
            false,
            &Mat::dense(u, rows, f).t(),
            &Mat::dense(g, rows, d),
        );
        gemm_into(
            &mut dp[o[8]..o[9]],
            false,
            &Mat::dense(h2, rows, d).t(),
            &Mat::dense(&dz, rows, f),
        );
        gemm_into(
            &mut dp[o[4]..o[5]],
            false,
            &Mat::dense(y, rows, d).t(),
            &Mat::dense(&dx1, rows, d),
        );
        gemm_into(
            &mut dp[o[2]..o[3]],
            false,
            &Mat::dense(h, rows, d).t(),
            &Mat::dense(&dqkv, rows, 3 * d),
        );
        for (at, wb) in [(o[0], &ln1), (o[6], &ln2)] {
            for (o, &v) in dp[at..at + 2 * d].iter_mut().zip(wb.iter()) {
                *o = T::from_f64(v);
            }
        }
        out
    }
}

impl Block {
    fn fwd_typed<T: Real>(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice::<T>(s1, l1, "block input")?;
        let p = slice::<T>(s2, l2, "block parameters")?;
        let dims = l1.dims();
        let BlockShape { d, f, .. } = self.shape;
        if dims.len() != 3 || dims[2] != d || p.len() != offsets(d, f)[12] {
            bail!(
                "fused block: input {dims:?} or {} parameters do not fit width {d}",
                p.len()
            )
        }
        let (out, saved) = self.shape.forward(x, p, dims[0], dims[1], self.keep);
        if let Some(saved) = saved {
            *self
                .saved
                .lock()
                .map_err(|_| candle_core::Error::Msg("fused block: poisoned lock".into()))? = Some(Arc::new(saved));
        }
        Ok((T::storage(out), l1.shape().clone()))
    }
}

impl CustomOp2 for Block {
    fn name(&self) -> &'static str {
        "fused-gpt2-block"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused block",
            &[s1, s2],
            || self.fwd_typed::<f32>(s1, l1, s2, l2),
            || self.fwd_typed::<f64>(s1, l1, s2, l2),
        )
    }

    fn bwd(&self, x: &Tensor, flat: &Tensor, _out: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let saved = self
            .saved
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused block: poisoned lock".into()))?;
        let Some(saved) = saved.clone() else {
            bail!("fused block: backward without saved activations")
        };
        let op = BlockBwd {
            shape: self.shape,
            x: x.detach(),
            saved,
        };
        let packed = flat.detach().apply_op2_no_bwd(&g.contiguous()?, &op)?;
        let n = x.elem_count();
        let dx = packed.narrow(0, 0, n)?.reshape(x.dims())?;
        let dp = packed.narrow(0, n, flat.elem_count())?;
        Ok((Some(dx), Some(dp)))
    }
}

/// The backward as an op on `(parameters, d out)`, holding the input and the intermediates.
struct BlockBwd {
    shape: BlockShape,
    x: Tensor,
    saved: Arc<Saved>,
}

impl BlockBwd {
    fn run<T: Real>(&self, p: &[T], g: &[T]) -> Result<(CpuStorage, Shape)> {
        let (xs, xl) = self.x.storage_and_layout();
        let Storage::Cpu(xs) = &*xs else {
            bail!("fused block backward: expected a CPU tensor")
        };
        let x = slice::<T>(xs, xl, "block input")?;
        let dims = xl.dims();
        let mut s: [&[T]; 7] = [&[]; 7];
        for (slot, st) in s.iter_mut().zip(&self.saved.0) {
            *slot = match T::slice(st) {
                Some(v) => v,
                None => bail!("fused block backward: saved activations are not {:?}", T::DTYPE),
            };
        }
        if g.len() != x.len() {
            bail!(
                "fused block backward: gradient has {} values, the input {}",
                g.len(),
                x.len()
            )
        }
        let out = self.shape.backward(x, p, s, g, dims[0], dims[1]);
        let n = out.len();
        Ok((T::storage(out), Shape::from(n)))
    }
}

impl CustomOp2 for BlockBwd {
    fn name(&self) -> &'static str {
        "fused-gpt2-block-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "fused block backward",
            &[s1, s2],
            || self.run::<f32>(slice(s1, l1, "block parameters")?, slice(s2, l2, "block grad")?),
            || self.run::<f64>(slice(s1, l1, "block parameters")?, slice(s2, l2, "block grad")?),
        )
    }
}
