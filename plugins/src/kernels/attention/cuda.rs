//! The CUDA attention: `attention.cu` (see the module doc of `mod.rs`), f32/f64/f16/bf16, the
//! per-row log-sum-exp and `delta` in f32 (f64 for f64). The launch plan (names, grids,
//! strides) is [`super::plan`], shared with the emulated tests.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::{bail, DType, Layout, Result, Shape, Storage};

use super::plan::{Sizes, Strides};
use super::{AttentionBwd, Packed, PackedBwd};
use crate::kernels::cuda::{
    by_float_dtype, config, kernel, launch, output, view, ATTENTION, ATTENTION_MMA, ATTENTION_MMA_BWD,
};
use crate::kernels::grid::int;

/// Whether bf16/f16 attention runs on the tensor-core kernels: yes unless the environment
/// variable `RETORT_TENSOR_CORES` is `0` (then the FMA kernels, to time or check one against
/// the other on a GPU). Read once.
fn tensor_cores(dtype: DType) -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let on = *ON.get_or_init(|| std::env::var("RETORT_TENSOR_CORES").map_or(true, |v| v != "0"));
    on && matches!(dtype, DType::BF16 | DType::F16)
}

/// A storage and its layout.
type Arg<'a> = (&'a CudaStorage, &'a Layout);

/// An input operand: its storage and the strides of its `[B, H, T, d]` view.
type Input<'a> = (&'a CudaStorage, Strides);

/// The forward's output `y [B, T, H d]` and the per-row log-sum-exp `[B, H, T]`.
pub(super) struct Forward {
    pub y: CudaStorage,
    pub lse: CudaStorage,
    pub shape: Shape,
}

/// The sizes of `q [B, H, T, d]`, `k [B, H_kv, T, d]` (checked against `v`).
fn sizes(q: &Layout, k: &Layout, v: &Layout) -> Result<Sizes> {
    let (b, h, t, d) = q.shape().dims4()?;
    let (bk, hk, tk, dk) = k.shape().dims4()?;
    if (bk, tk, dk) != (b, t, d) || k.dims() != v.dims() {
        bail!(
            "causal attention: q {:?}, k {:?}, v {:?} do not fit together",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    Sizes {
        batch: b,
        heads: h,
        kv_heads: hk,
        t,
        d,
    }
    .checked()
}

/// The sizes of a packed `qkv [B, T, (H + 2 H_kv) d]` (contiguous).
fn packed_sizes(l: &Layout, heads: usize, kv_heads: usize) -> Result<Sizes> {
    let (batch, t, w) = l.shape().dims3()?;
    if !l.is_contiguous() || heads + 2 * kv_heads == 0 || w % (heads + 2 * kv_heads) != 0 {
        bail!(
            "causal attention: qkv {:?} is not a contiguous [B, T, (H + 2 H_kv) d]",
            l.dims()
        )
    }
    Sizes {
        batch,
        heads,
        kv_heads,
        t,
        d: w / (heads + 2 * kv_heads),
    }
    .checked()
}

/// The forward on `(q, k, v)`.
pub(super) fn fwd(scale: f64, q: Arg, k: Arg, v: Arg) -> Result<Forward> {
    let sz = sizes(q.1, k.1, v.1)?;
    let x = [
        (q.0, Strides::of(q.1, "q")?),
        (k.0, Strides::of(k.1, "k")?),
        (v.0, Strides::of(v.1, "v")?),
    ];
    forward(sz, scale, x)
}

/// The packed forward on a contiguous `qkv`.
pub(super) fn packed_fwd(op: &Packed, s: &CudaStorage, l: &Layout) -> Result<Forward> {
    let sz = packed_sizes(l, op.heads, op.kv_heads)?;
    let [q, k, v] = sz.packed(l.start_offset());
    forward(sz, op.scale, [(s, q), (s, k), (s, v)])
}

fn forward(sz: Sizes, scale: f64, x: [Input; 3]) -> Result<Forward> {
    if x.iter().any(|(s, _)| s.dtype() != x[0].0.dtype()) {
        bail!("causal attention: q, k and v differ in dtype")
    }
    let (y, lse) = by_float_dtype!(x[0].0.dtype(), "fused-causal-attention", fwd_typed(sz, scale, x))?;
    Ok(Forward {
        y,
        lse,
        shape: Shape::from((sz.batch, sz.t, sz.heads * sz.d)),
    })
}

fn fwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    sz: Sizes,
    scale: f64,
    x: [Input; 3],
) -> Result<(CudaStorage, CudaStorage)> {
    let dev = x[0].0.device();
    let ops = operands::<T>(sz, &x)?;
    let y = output::<T>(dev, sz.rows() * sz.d)?;
    let lse = output::<A>(dev, sz.rows())?;
    launch_fwd(dev, sz, scale, &x, &ops, &y, &lse, x[0].0.dtype())?;
    Ok((
        CudaStorage::wrap_cuda_slice(y, dev.clone()),
        CudaStorage::wrap_cuda_slice(lse, dev.clone()),
    ))
}

/// The views of `q`, `k`, `v` from their first elements, each covering what its strides reach.
fn operands<'a, T: CudaDType + DeviceRepr>(sz: Sizes, x: &[Input<'a>; 3]) -> Result<[CudaView<'a, T>; 3]> {
    let one = |(s, st): &Input<'a>, heads: usize, what: &str| -> Result<CudaView<'a, T>> {
        let slice = s.as_cuda_slice::<T>()?;
        let end = st.end(sz.batch, heads, sz.t, sz.d);
        if end > slice.len() {
            bail!(
                "causal attention: {what} reaches element {end} of a {}-element buffer",
                slice.len()
            )
        }
        Ok(slice.slice(st.offset..end))
    };
    Ok([
        one(&x[0], sz.heads, "q")?,
        one(&x[1], sz.kv_heads, "k")?,
        one(&x[2], sz.kv_heads, "v")?,
    ])
}

/// The sizes and scale as the kernels' `(heads, kv_heads, t, d)` ints.
fn ints(sz: Sizes) -> Result<[i32; 4]> {
    Ok([int(sz.heads)?, int(sz.kv_heads)?, int(sz.t)?, int(sz.d)?])
}

#[allow(clippy::too_many_arguments)]
fn launch_fwd<T: DeviceRepr, A>(
    dev: &CudaDevice,
    sz: Sizes,
    scale: f64,
    x: &[Input; 3],
    ops: &[CudaView<'_, T>; 3],
    y: &CudaSlice<T>,
    lse: &CudaSlice<A>,
    dtype: DType,
) -> Result<()> {
    let [h, hk, t, d] = ints(sz)?;
    let (qs, ks, vs) = (x[0].1.args(), x[1].1.args(), x[2].1.args());
    let plan = sz.forward(tensor_cores(dtype));
    let module = if plan.tensor_cores { ATTENTION_MMA } else { ATTENTION };
    launch!(
        dev,
        module,
        kernel(&plan.name, dtype)?,
        config(plan.grid),
        [
            &ops[0], &ops[1], &ops[2], y, lse, &h, &hk, &t, &d, &scale, &qs[0], &qs[1], &qs[2], &ks[0], &ks[1], &ks[2],
            &vs[0], &vs[1], &vs[2]
        ]
    );
    Ok(())
}

/// The CUDA storage and layout of a tensor the backward op holds.
fn held<'a>(
    guard: &'a (impl std::ops::Deref<Target = Storage> + 'a),
    l: &Layout,
    what: &str,
) -> Result<(&'a CudaStorage, Strides)> {
    let Storage::Cuda(s) = &**guard else {
        bail!("causal attention backward: {what} is not on a CUDA device")
    };
    Ok((s, Strides::of(l, what)?))
}

/// The backward on the output `y` and `dy`: `dq`, `dk`, `dv` in one flat tensor; `lse` the
/// forward's (recomputed where absent).
pub(super) fn bwd(op: &AttentionBwd, lse: Option<&CudaStorage>, y: Arg, dy: Arg) -> Result<(CudaStorage, Shape)> {
    let (qg, ql) = op.q.storage_and_layout();
    let (kg, kl) = op.k.storage_and_layout();
    let (vg, vl) = op.v.storage_and_layout();
    let sz = sizes(ql, kl, vl)?;
    let x = [held(&qg, ql, "q")?, held(&kg, kl, "k")?, held(&vg, vl, "v")?];
    let grads = sz.flat_grads();
    let total = grads[2].offset + sz.batch * sz.kv_heads * sz.t * sz.d;
    let out = backward(sz, op.scale, x, lse, y, dy, grads, total)?;
    Ok((out, Shape::from(total)))
}

/// The packed backward: `d qkv` in `qkv`'s (contiguous) layout.
pub(super) fn packed_bwd(op: &PackedBwd, lse: Option<&CudaStorage>, y: Arg, dy: Arg) -> Result<(CudaStorage, Shape)> {
    let (g, l) = op.qkv.storage_and_layout();
    let Storage::Cuda(s) = &*g else {
        bail!("causal attention backward: qkv is not on a CUDA device")
    };
    let sz = packed_sizes(l, op.heads, op.kv_heads)?;
    let [q, k, v] = sz.packed(l.start_offset());
    let grads = sz.packed(0);
    let out = backward(
        sz,
        op.scale,
        [(s, q), (s, k), (s, v)],
        lse,
        y,
        dy,
        grads,
        l.shape().elem_count(),
    )?;
    Ok((out, l.shape().clone()))
}

#[allow(clippy::too_many_arguments)]
fn backward(
    sz: Sizes,
    scale: f64,
    x: [Input; 3],
    lse: Option<&CudaStorage>,
    y: Arg,
    dy: Arg,
    grads: [Strides; 3],
    total: usize,
) -> Result<CudaStorage> {
    if x.iter().any(|(s, _)| s.dtype() != y.0.dtype()) || dy.0.dtype() != y.0.dtype() {
        bail!("causal attention backward: q, k, v, y and dy differ in dtype")
    }
    let n = sz.rows() * sz.d;
    if y.1.shape().elem_count() != n || dy.1.shape().elem_count() != n {
        bail!(
            "causal attention backward: y {:?} / dy {:?} are not [B, T, H d] of {sz:?}",
            y.1.dims(),
            dy.1.dims()
        )
    }
    by_float_dtype!(
        y.0.dtype(),
        "fused-causal-attention-grad",
        bwd_typed(sz, scale, x, lse, y, dy, grads, total)
    )
}

#[allow(clippy::too_many_arguments)]
fn bwd_typed<T: CudaDType + DeviceRepr, A: CudaDType + DeviceRepr>(
    sz: Sizes,
    scale: f64,
    x: [Input; 3],
    saved: Option<&CudaStorage>,
    y: Arg,
    dy: Arg,
    grads: [Strides; 3],
    total: usize,
) -> Result<CudaStorage> {
    let dev = y.0.device();
    let dtype = y.0.dtype();
    let ops = operands::<T>(sz, &x)?;
    let yv = view::<T>(y.0, y.1, "attention output")?;
    let dyv = view::<T>(dy.0, dy.1, "attention output gradient")?;
    let rows = sz.rows();
    // The forward's lse, or (absent) the forward run again for it.
    let recomputed;
    let lse: CudaView<'_, A> = match saved {
        Some(s) if s.as_cuda_slice::<A>()?.len() == rows => s.as_cuda_slice::<A>()?.slice(0..rows),
        Some(_) => bail!("causal attention backward: the saved log-sum-exp does not match {sz:?}"),
        None => {
            let scratch = output::<T>(dev, rows * sz.d)?;
            let fresh = output::<A>(dev, rows)?;
            launch_fwd(dev, sz, scale, &x, &ops, &scratch, &fresh, dtype)?;
            recomputed = fresh;
            recomputed.slice(0..rows)
        }
    };
    let [h, hk, t, d] = ints(sz)?;
    let delta = output::<A>(dev, rows)?;
    let rows_i = int(rows)?;
    launch!(
        dev,
        ATTENTION,
        kernel("attn_delta", dtype)?,
        config(sz.delta_grid()),
        [&yv, &dyv, &delta, &rows_i, &h, &t, &d]
    );
    let grad = output::<T>(dev, total)?;
    let (qs, ks, vs) = (x[0].1.args(), x[1].1.args(), x[2].1.args());
    let [dq, dk, dv] = grads;
    let (dqs, dks, dvs) = (dq.args(), dk.args(), dv.args());
    let offsets = [dq.offset as u64, dk.offset as u64, dv.offset as u64];
    let plan = sz.backward(tensor_cores(dtype));
    let module = if plan.tensor_cores {
        ATTENTION_MMA_BWD
    } else {
        ATTENTION
    };
    launch!(
        dev,
        module,
        kernel(&plan.dq.0, dtype)?,
        config(plan.dq.1),
        [
            &ops[0],
            &ops[1],
            &ops[2],
            &dyv,
            &lse,
            &delta,
            &grad,
            &h,
            &hk,
            &t,
            &d,
            &scale,
            &qs[0],
            &qs[1],
            &qs[2],
            &ks[0],
            &ks[1],
            &ks[2],
            &vs[0],
            &vs[1],
            &vs[2],
            &offsets[0],
            &dqs[0],
            &dqs[1],
            &dqs[2]
        ]
    );
    launch!(
        dev,
        module,
        kernel(&plan.dkdv.0, dtype)?,
        config(plan.dkdv.1),
        [
            &ops[0],
            &ops[1],
            &ops[2],
            &dyv,
            &lse,
            &delta,
            &grad,
            &h,
            &hk,
            &t,
            &d,
            &scale,
            &qs[0],
            &qs[1],
            &qs[2],
            &ks[0],
            &ks[1],
            &ks[2],
            &vs[0],
            &vs[1],
            &vs[2],
            &offsets[1],
            &dks[0],
            &dks[1],
            &dks[2],
            &offsets[2],
            &dvs[0],
            &dvs[1],
            &dvs[2]
        ]
    );
    Ok(CudaStorage::wrap_cuda_slice(grad, dev.clone()))
}
