//! Token embedding lookup as one candle op: `y[i] = W[ids[i]]` for `W [V, H]` and `ids` (u32,
//! any shape), `y` of shape `ids.dims() + [H]`; backward `dW[v] = sum_{i: ids[i] = v} dy[i]`.
//!
//! candle's `index_select` gives `W` its gradient as a zero-filled `[V, H]` tensor, a copy of it
//! by `index_add`, and an add into the gradient store (three `[V, H]` tensors per step, 113 MB
//! each at SmolLM2's vocabulary). Here the rows are scattered into the parameter's
//! leaf-gradient buffer in place where the engine collects them (`kernels::leaf_grads`; zeroed
//! first only when it is the step's first contribution), else into one fresh `[V, H]` tensor.
//! The scatter adds the tokens in order: deterministic.
//!
//! CPU only by design, like [`super::linear`]: [`embedding`] composes `index_select` where
//! [`supports`] says no.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp2, DType, InplaceOp2, Layout, Result, Shape, Tensor};

use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::rows::{by_dtype, slice, slice_mut, slice_u32};
use crate::kernels::{leaf_grads, Support};

/// Where the fused lookup runs: the CPU (table f32/f64, ids u32).
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: &[],
};

/// Whether [`embedding`] runs fused on `weight` and `ids`.
pub fn supports(weight: &Tensor, ids: &Tensor) -> bool {
    SUPPORT.admits(weight) && ids.dtype() == DType::U32 && ids.device().is_cpu() && weight.rank() == 2
}

/// The rows of `weight [V, H]` at `ids` (any shape): `[.., H]`. An id past the table is an
/// error.
pub fn embedding(weight: &Tensor, ids: &Tensor) -> Result<Tensor> {
    if !supports(weight, ids) {
        let (_, h) = weight.dims2()?;
        let rows = weight.index_select(&ids.flatten_all()?, 0)?;
        let mut dims = ids.dims().to_vec();
        dims.push(h);
        return rows.reshape(dims);
    }
    weight.contiguous()?.apply_op2(&ids.contiguous()?, Lookup)
}

/// The graph node: `CustomOp2(weight, ids)`.
struct Lookup;

/// `dW += scatter(dy)` into a leaf-gradient buffer (args: the buffer, `ids`, `dy`);
/// `overwrite`: zero the buffer first.
struct ScatterInto<'a> {
    ids: &'a Tensor,
    overwrite: bool,
}

/// The table's `(V, H)` and the ids, checked.
fn table_and_ids<'a>(w: &Layout, ids: (&'a CpuStorage, &Layout)) -> Result<((usize, usize), &'a [u32])> {
    let (v, h) = w.shape().dims2()?;
    let ids = slice_u32(ids.0, ids.1, "embedding ids")?;
    if let Some(bad) = ids.iter().find(|&&i| i as usize >= v) {
        bail!("embedding: token id {bad} is past the table's {v} rows")
    }
    Ok(((v, h), ids))
}

fn lookup<T: Real>(w: (&CpuStorage, &Layout), ids: (&CpuStorage, &Layout)) -> Result<(CpuStorage, Shape)> {
    let ((_, h), idx) = table_and_ids(w.1, ids)?;
    let table = slice::<T>(w.0, w.1, "embedding table")?;
    let mut out = Vec::with_capacity(idx.len() * h);
    for &i in idx {
        let start = i as usize * h;
        out.extend_from_slice(&table[start..start + h]);
    }
    let mut dims = ids.1.dims().to_vec();
    dims.push(h);
    Ok((T::storage(out), Shape::from(dims)))
}

/// `dst[ids[i]] += dy[i]` for every token in order.
fn scatter<T: Real>(dst: &mut [T], h: usize, ids: &[u32], dy: &[T]) -> Result<()> {
    if dy.len() != ids.len() * h {
        bail!(
            "embedding backward: {} gradient values for {} tokens of width {h}",
            dy.len(),
            ids.len()
        )
    }
    for (&i, row) in ids.iter().zip(dy.chunks_exact(h)) {
        let start = i as usize * h;
        for (d, &g) in dst[start..start + h].iter_mut().zip(row) {
            *d = *d + g;
        }
    }
    Ok(())
}

impl CustomOp2 for Lookup {
    fn name(&self) -> &'static str {
        "embedding"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "embedding",
            &[s1],
            || lookup::<f32>((s1, l1), (s2, l2)),
            || lookup::<f64>((s1, l1), (s2, l2)),
        )
    }

    fn bwd(&self, w: &Tensor, ids: &Tensor, _y: &Tensor, dy: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        if !w.track_op() {
            return Ok((None, None));
        }
        let dy = dy.contiguous()?;
        if let Some(claim) = leaf_grads::claim(w)? {
            let op = ScatterInto {
                ids,
                overwrite: !claim.accumulate,
            };
            claim.buffer.inplace_op2(&dy, &op)?;
            return Ok((None, None));
        }
        let dw = w.zeros_like()?;
        dw.inplace_op2(&dy, &ScatterInto { ids, overwrite: false })?;
        Ok((Some(dw), None))
    }
}

impl InplaceOp2 for ScatterInto<'_> {
    fn name(&self) -> &'static str {
        "embedding-scatter"
    }

    fn cpu_fwd(&self, dst: &mut CpuStorage, dl: &Layout, dy: &CpuStorage, dyl: &Layout) -> Result<()> {
        let (ids_storage, ids_layout) = self.ids.storage_and_layout();
        let candle_core::Storage::Cpu(ids_cpu) = &*ids_storage else {
            bail!("embedding backward: expected CPU ids")
        };
        let ((_, h), ids) = table_and_ids(dl, (ids_cpu, ids_layout))?;
        match dst.dtype() {
            DType::F32 => self.apply::<f32>(dst, dl, (dy, dyl), h, ids),
            DType::F64 => self.apply::<f64>(dst, dl, (dy, dyl), h, ids),
            other => bail!("embedding backward: unsupported dtype {other:?}"),
        }
    }
}

impl ScatterInto<'_> {
    fn apply<T: Real>(
        &self,
        dst: &mut CpuStorage,
        dl: &Layout,
        dy: (&CpuStorage, &Layout),
        h: usize,
        ids: &[u32],
    ) -> Result<()> {
        let dst = slice_mut::<T>(dst, dl, "embedding gradient")?;
        if self.overwrite {
            use rayon::prelude::*;
            dst.par_chunks_mut(1 << 16).for_each(|c| c.fill(T::ZERO));
        }
        scatter(dst, h, ids, slice::<T>(dy.0, dy.1, "embedding output gradient")?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::leaf_grads::LeafGrads;
    use crate::kernels::test_util::values;
    use candle_core::{Device, Var};

    fn table(dtype: DType) -> Var {
        let t = Tensor::arange(0f64, 7.0 * 5.0, &Device::Cpu)
            .and_then(|t| (t * 0.3)?.sin())
            .and_then(|t| t.reshape((7, 5)))
            .and_then(|t| t.to_dtype(dtype))
            .expect("table");
        Var::from_tensor(&t).expect("var")
    }

    /// Values and the table's gradient (repeated ids included) against `index_select`, in f64
    /// and f32, through candle's store and through a leaf-gradient collector.
    #[test]
    fn matches_index_select_values_and_gradient() {
        let ids = Tensor::new(&[[3u32, 0, 3], [6, 3, 1]], &Device::Cpu).expect("ids");
        for dtype in [DType::F64, DType::F32] {
            let w = table(dtype);
            let c = Tensor::arange(0f64, 30.0, &Device::Cpu)
                .and_then(|t| (t * 0.7)?.cos())
                .and_then(|t| t.reshape((2, 3, 5)))
                .and_then(|t| t.to_dtype(dtype))
                .expect("c");
            let loss = |fused: bool| {
                let y = if fused {
                    embedding(w.as_tensor(), &ids).expect("fused")
                } else {
                    let rows = w
                        .as_tensor()
                        .index_select(&ids.flatten_all().expect("f"), 0)
                        .expect("sel");
                    rows.reshape((2, 3, 5)).expect("reshape")
                };
                assert_eq!(y.dims(), &[2, 3, 5]);
                (y.clone(), (&y * &c).and_then(|l| l.sum_all()).expect("loss"))
            };
            let (y_ref, l_ref) = loss(false);
            let want = l_ref.backward().expect("reference");
            let (y, l) = loss(true);
            assert_eq!(values(&y), values(&y_ref));
            let got = l.backward().expect("fused");
            let dw_ref = values(want.get(w.as_tensor()).expect("ref dw"));
            assert_eq!(values(got.get(w.as_tensor()).expect("dw")), dw_ref);
            let collector = LeafGrads::new([w.as_tensor()]);
            for _ in 0..2 {
                collector.clear();
                let store = collector.collecting(|| loss(true).1.backward()).expect("collected");
                assert!(store.get(w.as_tensor()).is_none());
                assert_eq!(values(&collector.take(w.as_tensor()).expect("dw")), dw_ref);
            }
        }
    }

    #[test]
    fn an_id_past_the_table_is_an_error() {
        let w = table(DType::F32);
        let ids = Tensor::new(&[1u32, 7], &Device::Cpu).expect("ids");
        let err = embedding(w.as_tensor(), &ids).expect_err("past the table");
        assert!(err.to_string().contains("token id 7"), "{err}");
    }

    #[test]
    fn other_dtypes_compose_index_select() {
        let w = table(DType::F32).as_tensor().to_dtype(DType::BF16).expect("bf16");
        let ids = Tensor::new(&[[2u32, 4]], &Device::Cpu).expect("ids");
        assert!(!supports(&w, &ids));
        assert_eq!(embedding(&w, &ids).expect("composed").dims(), &[1, 2, 5]);
    }
}
