//! Attention of new queries over a key/value cache (decoding): query `i` of `q [B, H, T, d]`
//! sits at position `L - T + i` and attends to positions `0..=L - T + i` of `k`,
//! `v [B, H_kv, L, d]`, i.e. `y_i = softmax_j(scale q_i . k_j) v_j` over those `j`.
//!
//! `k` and `v` may be any views whose last stride is 1 (the filled part of a preallocated
//! cache: nothing is copied per step), and grouped-query heads read their key/value head in
//! place (query head `h` reads `h / (H / H_kv)`: no repeated keys and values). The output is
//! `[B, T, H d]`, the layout the output projection reads. Forward only: decoding keeps no
//! gradient. CPU f32/f64; elsewhere the model composes the same attention from candle ops.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use super::cpu::{storage_of, View};
use crate::kernels::cpu::fastmath::Real;
use crate::kernels::cpu::few_rows::dots_into;
#[cfg(target_arch = "x86_64")]
use crate::kernels::cpu::raw::{as_f32, avx512_dispatch};
use crate::kernels::Support;

/// Where the decoding attention runs.
pub const SUPPORT: Support = Support {
    cpu: &[DType::F32, DType::F64],
    cuda: &[],
};

/// Whether [`cached_attention`] runs on `q`, `k`, `v` (one dtype, one device).
pub fn supports(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    SUPPORT.admits_together(q, &[k, v])
}

/// The attention of the `T` newest positions `q [B, H, T, d]` over all `L >= T` positions of
/// `k`, `v [B, H_kv, L, d]` (`H_kv` dividing `H`), as `[B, T, H d]`; only where [`supports`].
pub fn cached_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (bk, hk, l, dk) = k.dims4()?;
    if (bk, dk) != (b, d) || k.dims() != v.dims() || hk == 0 || h % hk != 0 || l < t {
        bail!(
            "cached attention: expected q [B, H, T, d] and k, v [B, H_kv, L >= T, d] with H_kv dividing H, got {:?}, {:?}, {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let unit = |x: &Tensor| {
        if x.stride()[3] == 1 || d == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    unit(q)?.apply_op3_no_bwd(&unit(k)?, &unit(v)?, &Decode { scale })
}

/// The op.
struct Decode {
    scale: f64,
}

/// Sizes of one call.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    t: usize,
    l: usize,
    d: usize,
}

impl CustomOp3 for Decode {
    fn name(&self) -> &'static str {
        "cached-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, heads, t, d) = l1.shape().dims4()?;
        let (_, kv_heads, l, _) = l2.shape().dims4()?;
        let dm = Dims {
            heads,
            kv_heads,
            t,
            l,
            d,
        };
        let views = (View::of(l1), View::of(l2), View::of(l3));
        let shape = Shape::from((b, t, heads * d));
        match s1.dtype() {
            DType::F32 => {
                let x = (storage_of::<f32>(s1)?, storage_of::<f32>(s2)?, storage_of::<f32>(s3)?);
                Ok((f32::storage(forward(x, views, dm, b, self.scale as f32)), shape))
            }
            DType::F64 => {
                let x = (storage_of::<f64>(s1)?, storage_of::<f64>(s2)?, storage_of::<f64>(s3)?);
                Ok((f64::storage(forward(x, views, dm, b, self.scale)), shape))
            }
            other => bail!("cached attention: expected f32 or f64, got {other:?}"),
        }
    }
}

/// `[B, T, H d]`: one task per (sequence, key/value head), results scattered after.
fn forward<T: Real>(x: (&[T], &[T], &[T]), views: (View, View, View), dm: Dims, b: usize, scale: T) -> Vec<T> {
    let Dims {
        heads, kv_heads, t, d, ..
    } = dm;
    let rep = heads / kv_heads;
    let groups: Vec<Vec<T>> = (0..b * kv_heads)
        .into_par_iter()
        .map(|task| group_dispatch(x, views, dm, (task / kv_heads, task % kv_heads), scale))
        .collect();
    let mut out = vec![T::ZERO; b * t * heads * d];
    for (task, y) in groups.iter().enumerate() {
        let (bi, g) = (task / kv_heads, task % kv_heads);
        for (row, yr) in y.chunks_exact(d).enumerate() {
            let (h, i) = (g * rep + row / t, row % t);
            out[(bi * t + i) * heads * d + h * d..][..d].copy_from_slice(yr);
        }
    }
    out
}

/// [`group`], in f32 through code compiled for AVX-512 where the CPU has it.
fn group_dispatch<T: Real>(
    x: (&[T], &[T], &[T]),
    views: (View, View, View),
    dm: Dims,
    bg: (usize, usize),
    scale: T,
) -> Vec<T> {
    #[cfg(target_arch = "x86_64")]
    if let (Some(q), Some(k), Some(v)) = (as_f32(x.0), as_f32(x.1), as_f32(x.2)) {
        let y = group_f32((q, k, v), views, dm, bg, scale.to_f64() as f32);
        return y.into_iter().map(|v| T::from_f64(v as f64)).collect();
    }
    group(x, views, dm, bg, scale)
}

#[cfg(target_arch = "x86_64")]
avx512_dispatch!(fn group_f32(x: (&[f32], &[f32], &[f32]), views: (View, View, View), dm: Dims, bg: (usize, usize), scale: f32) -> Vec<f32> => group::<f32>, else group::<f32>);

/// The query heads of key/value head `g` of sequence `b`: `[H / H_kv * T, d]` (head-major).
/// Every query row's scores against every key come from one few-rows product (the keys read
/// once for the group); each row then keeps its causal prefix.
#[inline(always)]
fn group<T: Real>(
    x: (&[T], &[T], &[T]),
    views: (View, View, View),
    dm: Dims,
    (b, g): (usize, usize),
    scale: T,
) -> Vec<T> {
    let Dims {
        heads,
        kv_heads,
        t,
        l,
        d,
    } = dm;
    let rep = heads / kv_heads;
    let m = rep * t;
    let qs: Vec<&[T]> = (0..m)
        .map(|row| &x.0[views.0.at(b, g * rep + row / t, row % t)..][..d])
        .collect();
    let ks: Vec<&[T]> = (0..l).map(|j| &x.1[views.1.at(b, g, j)..][..d]).collect();
    let mut scores = vec![T::ZERO; l * m]; // [l, m]: key-major
    dots_into(&qs, &ks, &mut scores);
    let mut y = vec![T::ZERO; m * d];
    let mut p = vec![T::ZERO; l];
    for (row, yr) in y.chunks_exact_mut(d).enumerate() {
        let n = l - t + row % t + 1;
        let mut max = T::NEG_INF;
        for (j, s) in p[..n].iter_mut().enumerate() {
            *s = scores[j * m + row] * scale;
            max = if *s > max { *s } else { max };
        }
        let mut sum = T::ZERO;
        for s in &mut p[..n] {
            *s = (*s - max).exp();
            sum = sum + *s;
        }
        for (j, &pj) in p[..n].iter().enumerate() {
            for (o, &vv) in yr.iter_mut().zip(&x.2[views.2.at(b, g, j)..][..d]) {
                *o = *o + pj * vv;
            }
        }
        let inv = T::ONE / sum;
        for o in yr.iter_mut() {
            *o = *o * inv;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, D};

    /// Against softmax(scale q k^T + causal mask shifted by L - T) v with repeated key/value
    /// heads, composed from candle ops in f64; keys and values as views of a larger cache.
    #[test]
    fn equals_the_composed_attention_over_a_cache_view() {
        let dev = Device::Cpu;
        for (b, h, hk, t, l, d) in [
            (2, 4, 2, 1, 7, 16),
            (1, 3, 1, 3, 3, 8),
            (3, 6, 3, 2, 9, 64),
            (1, 2, 2, 4, 5, 5),
        ] {
            let q = Tensor::randn(0f64, 1.0, (b, h, t, d), &dev).expect("q");
            let cache = |s| {
                Tensor::randn(0f64, 1.0, (b, hk, l + 4, d), &dev)
                    .expect("cache")
                    .narrow(2, s, l)
            };
            let (k, v) = (cache(0).expect("k"), cache(3).expect("v"));
            let scale = 0.3;
            let got = cached_attention(&q, &k, &v, scale).expect("decode");
            let rep = |x: &Tensor| {
                x.unsqueeze(2)
                    .and_then(|x| x.broadcast_as((b, hk, h / hk, l, d)))
                    .and_then(|x| x.reshape((b, h, l, d)))
                    .expect("repeat")
            };
            let (kr, vr) = (rep(&k), rep(&v));
            let s = (q.matmul(&kr.t().expect("t")).expect("qk") * scale).expect("scale");
            let mask: Vec<f64> = (0..t)
                .flat_map(|i| (0..l).map(move |j| if j <= l - t + i { 0.0 } else { f64::NEG_INFINITY }))
                .collect();
            let mask = Tensor::from_vec(mask, (t, l), &dev).expect("mask");
            let p = candle_nn::ops::softmax(&s.broadcast_add(&mask).expect("mask"), D::Minus1).expect("p");
            let want = p
                .matmul(&vr)
                .expect("pv")
                .transpose(1, 2)
                .expect("t")
                .reshape((b, t, h * d))
                .expect("r");
            let diff = (got - want)
                .expect("d")
                .abs()
                .expect("a")
                .max_all()
                .expect("m")
                .to_scalar::<f64>()
                .expect("s");
            assert!(diff < 1e-12, "{b} {h} {hk} {t} {l} {d}: {diff}");
        }
    }

    #[test]
    fn mismatched_shapes_are_refused() {
        let dev = Device::Cpu;
        let q = Tensor::zeros((1, 4, 3, 8), DType::F32, &dev).expect("q");
        let k = Tensor::zeros((1, 3, 5, 8), DType::F32, &dev).expect("k");
        assert!(cached_attention(&q, &k, &k, 1.0).is_err(), "3 kv heads for 4 heads");
        let k = Tensor::zeros((1, 2, 2, 8), DType::F32, &dev).expect("k");
        assert!(cached_attention(&q, &k, &k, 1.0).is_err(), "fewer keys than queries");
    }
}
