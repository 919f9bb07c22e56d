//! Fused causal self-attention with backward: per sequence and head, `S = scale q k^T` (row `i`
//! keeps columns `j <= i`), `P = softmax(S)` row-wise, `y = P v`, in one op.
//!
//! No `[T, T]` tensor is allocated: each query row's scores live in a `T`-long scratch row.
//! The backward recomputes that row (scores, max, `exp` sum: the same `O(T d)` work as the
//! forward's) instead of keeping `P`, and from the saved output `y`:
//!
//! - `dP_ij = dy_i . v_j`, `delta_i = dy_i . y_i`, `dS_ij = P_ij (dP_ij - delta_i)`;
//! - `dq_i = scale sum_j dS_ij k_j`, `dk_j = scale sum_i dS_ij q_i`, `dv_j = sum_i P_ij dy_i`.
//!
//! Inputs `q [B, H, T, d]`, `k`, `v [B, H_kv, T, d]` (grouped-query attention when
//! `H_kv < H`: query head `h` reads key/value head `h / (H / H_kv)`) with any strides whose last
//! one is 1, so the transformer passes views of its fused `qkv` projection without copying.
//! The output is `[B, T, H d]`, the layout the output projection reads. Sequences run in
//! parallel on the rayon pool; on x86-64 CPUs with AVX-512 the row loops run in a copy of the
//! code compiled for it (chosen at run time), else in the baseline (SSE2) build.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

use super::fastmath::{reduce2, row_max, sum, Real};
use super::rows::{as_f32_mut, by_dtype};

/// Causal attention `softmax(scale q k^T) v` of `q [B, H, T, d]` and `k`, `v [B, H_kv, T, d]`,
/// returned as `[B, T, H d]` (heads side by side per token). f32/f64 on the CPU (see
/// [`super::fusable`]); the caller falls back to the composite elsewhere.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, t, d) = q.dims4()?;
    let (bk, hk, tk, dk) = k.dims4()?;
    if (bk, tk, dk) != (b, t, d) || k.dims() != v.dims() || hk == 0 || h % hk != 0 {
        bail!(
            "causal attention: expected q [B, H, T, d] and k, v [B, H_kv, T, d] with H_kv dividing H, got {:?}, {:?}, {:?}",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    let unit = |x: &Tensor| -> Result<Tensor> {
        if x.stride()[3] == 1 || d == 1 {
            Ok(x.clone())
        } else {
            x.contiguous()
        }
    };
    unit(q)?.apply_op3(&unit(k)?, &unit(v)?, Attention { scale })
}

struct Attention {
    scale: f64,
}

/// Strided access to a `[B, H, T, d]` input: element `(b, h, t, 0)` at `at(b, h, t)`.
#[derive(Clone, Copy)]
struct View {
    start: usize,
    sb: usize,
    sh: usize,
    st: usize,
}

impl View {
    fn of(l: &Layout) -> Self {
        let s = l.stride();
        View {
            start: l.start_offset(),
            sb: s[0],
            sh: s[1],
            st: s[2],
        }
    }
    #[inline(always)]
    fn at(&self, b: usize, h: usize, t: usize) -> usize {
        self.start + b * self.sb + h * self.sh + t * self.st
    }
}

/// Sizes shared by the forward and backward loops.
#[derive(Clone, Copy)]
struct Dims {
    heads: usize,
    kv_heads: usize,
    t: usize,
    d: usize,
}

fn storage_of<T: Real>(s: &CpuStorage) -> Result<&[T]> {
    match T::slice(s) {
        Some(v) => Ok(v),
        None => bail!("causal attention: expected {:?}, got {:?}", T::DTYPE, s.dtype()),
    }
}

/// Rows of one register block of the small matrix products below.
const R: usize = 4;
/// Columns of one register block (one AVX-512 register of f32); matrices are padded to it.
const W: usize = 16;

/// `c[r][0..n] = alpha * sum_{k0 <= kk < k1} a[r][kk] b[kk][0..n]` for the `R` rows of `a`,
/// element `a[r][kk]` at `a[r * lda + kk * ka]` (`ka = 1`: row-major rows; `lda = 1`, `ka` the
/// leading dim: the rows are columns of a stored matrix, so a transpose is read in place),
/// `b` row-major (`ldb`), `n` a multiple of `W`. The `R x W` accumulators stay in registers
/// across the `k` loop (the microkernel shape of a GEMM).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block<T: Real>(
    a: &[T],
    (lda, ka): (usize, usize),
    b: &[T],
    ldb: usize,
    (k0, k1): (usize, usize),
    n: usize,
    c: &mut [T],
    ldc: usize,
    alpha: T,
) {
    if k1 <= k0 {
        for r in 0..R {
            c[r * ldc..r * ldc + n].fill(T::ZERO);
        }
        return;
    }
    // The bounds every read and write below stays inside (a failure is a bug here).
    assert!(n.is_multiple_of(W) && (R - 1) * lda + (k1 - 1) * ka < a.len() && (k1 - 1) * ldb + n <= b.len());
    assert!((R - 1) * ldc + n <= c.len());
    #[cfg(target_arch = "x86_64")]
    if T::DTYPE == candle_core::DType::F32 && avx512_fma() {
        let f = |x: &[T]| x.as_ptr() as *const f32;
        #[allow(unsafe_code)]
        // SAFETY: T is f32 (checked through its dtype), so the casts keep the element type;
        // the CPU has AVX-512F and FMA (checked); the asserts above bound every access.
        unsafe {
            block_f32_avx512(
                f(a),
                (lda, ka),
                f(b),
                ldb,
                (k0, k1),
                n,
                c.as_mut_ptr() as *mut f32,
                ldc,
                alpha.to_f64() as f32,
            )
        };
        return;
    }
    for jc in (0..n).step_by(W) {
        let mut acc = [[T::ZERO; W]; R];
        for kk in k0..k1 {
            let bv: [T; W] = b[kk * ldb + jc..kk * ldb + jc + W].try_into().expect("W columns");
            let x = [a[kk * ka], a[lda + kk * ka], a[2 * lda + kk * ka], a[3 * lda + kk * ka]];
            for r in 0..R {
                for l in 0..W {
                    acc[r][l] = acc[r][l] + x[r] * bv[l];
                }
            }
        }
        for (r, acc) in acc.iter().enumerate() {
            for (o, &v) in c[r * ldc + jc..r * ldc + jc + W].iter_mut().zip(acc) {
                *o = v * alpha;
            }
        }
    }
}

/// Whether the CPU runs AVX-512F with FMA (std caches the detection).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn avx512_fma() -> bool {
    std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("fma")
}

/// [`block`] for f32 with AVX-512 FMA intrinsics: LLVM does not contract the generic loop's
/// `acc + x * b` into fused multiply-adds (Rust forbids it), which doubled its instruction
/// count. Two `R x 16` accumulator blocks (32 columns) per pass where `n` allows, so each
/// broadcast of `a` feeds two FMAs.
///
/// # Safety
/// The CPU must have AVX-512F and FMA; `a[r * lda + kk * ka]` must be readable for rows
/// `0..R` and `kk` in `k0..k1`, rows `k0..k1` of `b` (`ldb`) at columns `0..n`, rows `0..R` of
/// `c` (`ldc`) writable at columns `0..n`; `n` a multiple of 16.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,fma")]
#[allow(unsafe_code, clippy::too_many_arguments)]
unsafe fn block_f32_avx512(
    a: *const f32,
    (lda, ka): (usize, usize),
    b: *const f32,
    ldb: usize,
    (k0, k1): (usize, usize),
    n: usize,
    c: *mut f32,
    ldc: usize,
    alpha: f32,
) {
    use std::arch::x86_64::*;
    let al = _mm512_set1_ps(alpha);
    let mut jc = 0;
    // SAFETY (all pointer reads/writes): inside the bounds of the function's contract.
    unsafe {
        while jc + 2 * W <= n {
            let mut acc = [_mm512_setzero_ps(); 2 * R];
            for kk in k0..k1 {
                let bp = b.add(kk * ldb + jc);
                let (b0, b1) = (_mm512_loadu_ps(bp), _mm512_loadu_ps(bp.add(W)));
                for r in 0..R {
                    let x = _mm512_set1_ps(*a.add(r * lda + kk * ka));
                    acc[2 * r] = _mm512_fmadd_ps(x, b0, acc[2 * r]);
                    acc[2 * r + 1] = _mm512_fmadd_ps(x, b1, acc[2 * r + 1]);
                }
            }
            for r in 0..R {
                let cp = c.add(r * ldc + jc);
                _mm512_storeu_ps(cp, _mm512_mul_ps(acc[2 * r], al));
                _mm512_storeu_ps(cp.add(W), _mm512_mul_ps(acc[2 * r + 1], al));
            }
            jc += 2 * W;
        }
        if jc < n {
            let mut acc = [_mm512_setzero_ps(); R];
            for kk in k0..k1 {
                let b0 = _mm512_loadu_ps(b.add(kk * ldb + jc));
                for (r, acc) in acc.iter_mut().enumerate() {
                    *acc = _mm512_fmadd_ps(_mm512_set1_ps(*a.add(r * lda + kk * ka)), b0, *acc);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                _mm512_storeu_ps(c.add(r * ldc + jc), _mm512_mul_ps(*acc, al));
            }
        }
    }
}

/// `x . y`, lane-wise (see [`reduce2`]): a plain f64 running sum is one dependent add per
/// element.
#[inline(always)]
fn dot<T: Real>(x: &[T], y: &[T]) -> f64 {
    reduce2(x, y, |a, b| [a * b])[0]
}

/// `n` rounded up to a multiple of `W`.
#[inline(always)]
fn pad(n: usize) -> usize {
    n.div_ceil(W) * W
}

/// Copies head `h` of sequence `b` into `out [.., ld]` row-major (`trans = false`: row `t` =
/// position `t`) or transposed (`out[di][t]`); padding is left as it is (zero).
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gather<T: Real>(x: &[T], view: &View, b: usize, h: usize, dm: Dims, out: &mut [T], ld: usize, trans: bool) {
    let Dims { t, d, .. } = dm;
    for ti in 0..t {
        let src = &x[view.at(b, h, ti)..view.at(b, h, ti) + d];
        if trans {
            for (di, &v) in src.iter().enumerate() {
                out[di * ld + ti] = v;
            }
        } else {
            out[ti * ld..ti * ld + d].copy_from_slice(src);
        }
    }
}

/// `x <- e^(x - max x)` in place; returns the sum of the new values.
#[inline(always)]
fn exp_shifted_sum<T: Real>(x: &mut [T]) -> f64 {
    #[cfg(target_arch = "x86_64")]
    if super::avx512::available() {
        if let Some(x) = as_f32_mut(x) {
            // SAFETY: the CPU has AVX-512F and FMA (checked above).
            #[allow(unsafe_code)]
            return unsafe { super::avx512::exp_shifted_sum(x) };
        }
    }
    let m = row_max(x);
    for v in x.iter_mut() {
        *v = (*v - m).exp();
    }
    sum(x)
}

/// Row-wise causal softmax of the `R` score rows `s [R, ld]` of queries `i0..i0 + R` (rows at
/// or past `t` are padding): row `i` keeps columns `0..=i`, the rest of its first `n` columns
/// become 0. Returns each row's `1 / sum exp`; with `normalize`, the rows are divided by it.
#[inline(always)]
fn softmax_rows<T: Real>(s: &mut [T], ld: usize, i0: usize, t: usize, n: usize, normalize: bool) -> [T; R] {
    let mut inv = [T::ZERO; R];
    for (r, inv) in inv.iter_mut().enumerate() {
        let i = i0 + r;
        let row = &mut s[r * ld..r * ld + n];
        if i >= t {
            row.fill(T::ZERO);
            continue;
        }
        let (live, dead) = row.split_at_mut(i + 1);
        dead.fill(T::ZERO);
        *inv = T::from_f64(1.0 / exp_shifted_sum(live));
        if normalize {
            for x in live.iter_mut() {
                *x = *x * *inv;
            }
        }
    }
    inv
}

/// Forward of sequence `b`: `out [T, H d]`.
#[inline(always)]
fn fwd_seq<T: Real>(x: (&[T], &[T], &[T]), views: (View, View, View), dm: Dims, scale: T, b: usize, out: &mut [T]) {
    let Dims { heads, kv_heads, t, d } = dm;
    let rep = heads / kv_heads;
    let (tp, dp) = (pad(t), pad(d));
    let mut qs = vec![T::ZERO; tp * dp]; // [tp, dp]
    let mut kt = vec![T::ZERO; dp * tp]; // [d, tp]
    let mut vs = vec![T::ZERO; tp * dp]; // [tp, dp]
    let mut s = vec![T::ZERO; R * tp];
    let mut y = vec![T::ZERO; R * dp];
    for h in 0..heads {
        gather(x.0, &views.0, b, h, dm, &mut qs, dp, false);
        if h % rep == 0 {
            gather(x.1, &views.1, b, h / rep, dm, &mut kt, tp, true);
            gather(x.2, &views.2, b, h / rep, dm, &mut vs, dp, false);
        }
        for i0 in (0..t).step_by(R) {
            let live = (i0 + R).min(t);
            let n = pad(live);
            block(&qs[i0 * dp..], (dp, 1), &kt, tp, (0, d), n, &mut s, tp, scale);
            let inv = softmax_rows(&mut s, tp, i0, t, n, false);
            block(&s, (tp, 1), &vs, dp, (0, live), dp, &mut y, dp, T::ONE);
            for r in 0..(live - i0) {
                let o = &mut out[(i0 + r) * heads * d + h * d..][..d];
                for (o, &y) in o.iter_mut().zip(&y[r * dp..r * dp + d]) {
                    *o = y * inv[r];
                }
            }
        }
    }
}

/// Backward of sequence `b`: `dq [H, T, d]`, `dk`, `dv [H_kv, T, d]` (zeroed on entry).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn bwd_seq<T: Real>(
    x: (&[T], &[T], &[T]),
    views: (View, View, View),
    y: &[T],
    dy: &[T],
    dm: Dims,
    scale: T,
    b: usize,
    grads: (&mut [T], &mut [T], &mut [T]),
) {
    let Dims { heads, kv_heads, t, d } = dm;
    let rep = heads / kv_heads;
    let hd = heads * d;
    let (tp, dp) = (pad(t), pad(d));
    let (dq, dk, dv) = grads;
    let mut qs = vec![T::ZERO; tp * dp]; // [tp, dp]
    let mut dys = vec![T::ZERO; tp * dp]; // [tp, dp]
    let mut ks = vec![T::ZERO; tp * dp]; // [tp, dp]
    let mut kt = vec![T::ZERO; dp * tp]; // [d, tp]
    let mut vt = vec![T::ZERO; dp * tp]; // [d, tp]
    let mut p = vec![T::ZERO; tp * tp]; // probabilities
    let mut ds = vec![T::ZERO; tp * tp]; // dP, then dS
    let mut acc = vec![T::ZERO; R * dp];
    let mut deltas = vec![T::ZERO; t];
    for h in 0..heads {
        let g = h / rep;
        gather(x.0, &views.0, b, h, dm, &mut qs, dp, false);
        if h % rep == 0 {
            gather(x.1, &views.1, b, g, dm, &mut ks, dp, false);
            gather(x.1, &views.1, b, g, dm, &mut kt, tp, true);
            gather(x.2, &views.2, b, g, dm, &mut vt, tp, true);
        }
        // The head's dy rows, and delta_i = dy_i . y_i in the same sweep (a streaming pass;
        // computed inside the row blocks below, the loads of y stalled on memory).
        for ti in 0..t {
            let at = (b * t + ti) * hd + h * d;
            dys[ti * dp..ti * dp + d].copy_from_slice(&dy[at..at + d]);
            deltas[ti] = T::from_f64(dot(&dy[at..at + d], &y[at..at + d]));
        }
        // P (recomputed), dP = dy v^T, dS = P (dP - delta) scale, row block by row block.
        for i0 in (0..t).step_by(R) {
            let live = (i0 + R).min(t);
            let n = pad(live);
            let pr = &mut p[i0 * tp..(i0 + R) * tp];
            block(&qs[i0 * dp..], (dp, 1), &kt, tp, (0, d), n, pr, tp, scale);
            softmax_rows(pr, tp, i0, t, n, true);
            let dr = &mut ds[i0 * tp..(i0 + R) * tp];
            block(&dys[i0 * dp..], (dp, 1), &vt, tp, (0, d), n, dr, tp, T::ONE);
            for r in 0..(live - i0) {
                let i = i0 + r;
                let delta = deltas[i];
                for (dsv, &pv) in dr[r * tp..r * tp + i + 1].iter_mut().zip(&pr[r * tp..r * tp + i + 1]) {
                    *dsv = pv * (*dsv - delta) * scale;
                }
                dr[r * tp + i + 1..r * tp + n].fill(T::ZERO);
            }
        }
        // The key-side products read P and dS transposed in place (`block`'s column mode);
        // entries past row i's diagonal are zero in both.
        let (dq, dk, dv) = (
            &mut dq[h * t * d..(h + 1) * t * d],
            &mut dk[g * t * d..(g + 1) * t * d],
            &mut dv[g * t * d..(g + 1) * t * d],
        );
        for i0 in (0..t).step_by(R) {
            let live = (i0 + R).min(t);
            // dq_i = sum_{j <= i} dS_ij k_j.
            block(&ds[i0 * tp..], (tp, 1), &ks, dp, (0, live), dp, &mut acc, dp, T::ONE);
            for r in 0..(live - i0) {
                dq[(i0 + r) * d..(i0 + r + 1) * d].copy_from_slice(&acc[r * dp..r * dp + d]);
            }
            // dk_j = sum_{i >= j} dS_ij q_i, dv_j = sum_{i >= j} P_ij dy_i (rows j = i0..).
            block(&ds[i0..], (1, tp), &qs, dp, (i0, t), dp, &mut acc, dp, T::ONE);
            for r in 0..(live - i0) {
                for (o, &a) in dk[(i0 + r) * d..(i0 + r + 1) * d].iter_mut().zip(&acc[r * dp..]) {
                    *o = *o + a;
                }
            }
            block(&p[i0..], (1, tp), &dys, dp, (i0, t), dp, &mut acc, dp, T::ONE);
            for r in 0..(live - i0) {
                for (o, &a) in dv[(i0 + r) * d..(i0 + r + 1) * d].iter_mut().zip(&acc[r * dp..]) {
                    *o = *o + a;
                }
            }
        }
    }
}

avx512_dispatch!(fwd_seq_any, fwd_seq_avx512, fwd_seq, (x: (&[T], &[T], &[T]), views: (View, View, View), dm: Dims, scale: T, b: usize, out: &mut [T]));
avx512_dispatch!(bwd_seq_any, bwd_seq_avx512, bwd_seq, (x: (&[T], &[T], &[T]), views: (View, View, View), y: &[T], dy: &[T], dm: Dims, scale: T, b: usize, grads: (&mut [T], &mut [T], &mut [T])));

fn dims_of(l1: &Layout, l2: &Layout) -> Dims {
    let d = l1.dims();
    Dims {
        heads: d[1],
        kv_heads: l2.dims()[1],
        t: d[2],
        d: d[3],
    }
}

fn fwd_typed<T: Real>(
    scale: f64,
    s: (&CpuStorage, &CpuStorage, &CpuStorage),
    l: (&Layout, &Layout, &Layout),
) -> Result<(CpuStorage, Shape)> {
    let x = (storage_of::<T>(s.0)?, storage_of::<T>(s.1)?, storage_of::<T>(s.2)?);
    let views = (View::of(l.0), View::of(l.1), View::of(l.2));
    let dm = dims_of(l.0, l.1);
    let batch = l.0.dims()[0];
    let mut out = super::rows::output_vec(batch * dm.t * dm.heads * dm.d);
    if !out.is_empty() {
        let scale = T::from_f64(scale);
        out.par_chunks_mut(dm.t * dm.heads * dm.d)
            .enumerate()
            .for_each(|(b, o)| fwd_seq_any(x, views, dm, scale, b, o));
    }
    Ok((T::storage(out), Shape::from((batch, dm.t, dm.heads * dm.d))))
}

impl CustomOp3 for Attention {
    fn name(&self) -> &'static str {
        "fused-causal-attention"
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
        by_dtype(
            "causal attention",
            &[s1],
            || fwd_typed::<f32>(self.scale, (s1, s2, s3), (l1, l2, l3)),
            || fwd_typed::<f64>(self.scale, (s1, s2, s3), (l1, l2, l3)),
        )
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        y: &Tensor,
        dy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let op = AttentionBwd {
            q: q.detach(),
            k: k.detach(),
            v: v.detach(),
            scale: self.scale,
        };
        let packed = y.detach().apply_op2_no_bwd(&dy.contiguous()?, &op)?;
        let (nq, nk) = (q.elem_count(), k.elem_count());
        let dq = packed.narrow(0, 0, nq)?.reshape(q.dims())?;
        let dk = packed.narrow(0, nq, nk)?.reshape(k.dims())?;
        let dv = packed.narrow(0, nq + nk, nk)?.reshape(v.dims())?;
        Ok((Some(dq), Some(dk), Some(dv)))
    }
}

/// The backward: holds the forward's inputs and takes `(y, dy)`; returns `dq`, `dk`, `dv`
/// (each contiguous in its input's shape) one after the other in one flat tensor.
struct AttentionBwd {
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: f64,
}

fn bwd_typed<T: Real>(op: &AttentionBwd, y: &[T], dy: &[T]) -> Result<(CpuStorage, Shape)> {
    let (qs, ql) = op.q.storage_and_layout();
    let (ks, kl) = op.k.storage_and_layout();
    let (vs, vl) = op.v.storage_and_layout();
    let (Storage::Cpu(qs), Storage::Cpu(ks), Storage::Cpu(vs)) = (&*qs, &*ks, &*vs) else {
        bail!("causal attention backward: expected CPU tensors")
    };
    let x = (storage_of::<T>(qs)?, storage_of::<T>(ks)?, storage_of::<T>(vs)?);
    let views = (View::of(ql), View::of(kl), View::of(vl));
    let dm = dims_of(ql, kl);
    let batch = ql.dims()[0];
    let (nq, nk) = (ql.shape().elem_count(), kl.shape().elem_count());
    let mut out = vec![T::ZERO; nq + 2 * nk];
    if nq > 0 {
        let scale = T::from_f64(op.scale);
        let (dq, rest) = out.split_at_mut(nq);
        let (dk, dv) = rest.split_at_mut(nk);
        let (cq, ck) = (nq / batch, nk / batch);
        dq.par_chunks_mut(cq)
            .zip(dk.par_chunks_mut(ck))
            .zip(dv.par_chunks_mut(ck))
            .enumerate()
            .for_each(|(b, ((dq, dk), dv))| bwd_seq_any(x, views, y, dy, dm, scale, b, (dq, dk, dv)));
    }
    Ok((T::storage(out), Shape::from(nq + 2 * nk)))
}

impl CustomOp2 for AttentionBwd {
    fn name(&self) -> &'static str {
        "fused-causal-attention-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "causal attention backward",
            &[s1, s2],
            || {
                bwd_typed::<f32>(
                    self,
                    super::rows::slice(s1, l1, "attention output")?,
                    super::rows::slice(s2, l2, "attention grad")?,
                )
            },
            || {
                bwd_typed::<f64>(
                    self,
                    super::rows::slice(s1, l1, "attention output")?,
                    super::rows::slice(s2, l2, "attention grad")?,
                )
            },
        )
    }
}

/// Causal attention read straight from a fused projection `qkv [B, T, (H + 2 H_kv) d]` (per
/// token: the `H` query heads, then the `H_kv` key heads, then the value heads, `d` wide each),
/// returned as `[B, T, H d]`: the same result as [`causal_attention`] on the `q`, `k`, `v`
/// views of `qkv`, as one graph node. Its gradient is one `[B, T, (H + 2 H_kv) d]` tensor, so
/// the backward accumulates no per-view zero-padded gradients (candle turns each `narrow`/`get`
/// of a view into a full-size zeroed tensor plus an add).
pub fn causal_attention_packed(qkv: &Tensor, heads: usize, kv_heads: usize, scale: f64) -> Result<Tensor> {
    let (_, _, w) = qkv.dims3()?;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) || w % (heads + 2 * kv_heads) != 0 {
        bail!(
            "causal attention: qkv {:?} cannot hold {heads} query and 2 x {kv_heads} key/value heads of one width",
            qkv.dims()
        )
    }
    qkv.contiguous()?.apply_op1(Packed { heads, kv_heads, scale })
}

/// The packed op: sizes of the heads in the last dim of `qkv`.
struct Packed {
    heads: usize,
    kv_heads: usize,
    scale: f64,
}

/// The `q`, `k`, `v` views of a contiguous `qkv` layout holding `heads` query and `kv_heads`
/// key/value heads per token, the sizes, and the batch.
fn packed_views(l: &Layout, heads: usize, kv_heads: usize) -> (View, View, View, Dims, usize) {
    let dims = l.dims();
    let (batch, t, w) = (dims[0], dims[1], dims[2]);
    let d = w / (heads + 2 * kv_heads);
    let at = |off: usize| View {
        start: l.start_offset() + off,
        sb: t * w,
        sh: d,
        st: w,
    };
    let dm = Dims { heads, kv_heads, t, d };
    (at(0), at(heads * d), at((heads + kv_heads) * d), dm, batch)
}

impl Packed {
    fn fwd<T: Real>(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = storage_of::<T>(s)?;
        let (q, k, v, dm, batch) = packed_views(l, self.heads, self.kv_heads);
        let out = packed_forward(x, (q, k, v), dm, batch, self.scale);
        Ok((T::storage(out), Shape::from((batch, dm.t, dm.heads * dm.d))))
    }
}

/// Forward of the packed attention over `x` with the given views: `[B, T, H d]`.
fn packed_forward<T: Real>(x: &[T], (q, k, v): (View, View, View), dm: Dims, batch: usize, scale: f64) -> Vec<T> {
    let mut out = super::rows::output_vec(batch * dm.t * dm.heads * dm.d);
    if !out.is_empty() {
        let scale = T::from_f64(scale);
        out.par_chunks_mut(dm.t * dm.heads * dm.d)
            .enumerate()
            .for_each(|(b, o)| fwd_seq_any((x, x, x), (q, k, v), dm, scale, b, o));
    }
    out
}

/// Backward of the packed attention: `d qkv` `[B, T, (H + 2 H_kv) d]` from the forward's
/// `qkv` (views as given), its output `y` and the incoming `dy`.
#[allow(clippy::too_many_arguments)]
fn packed_backward<T: Real>(
    x: &[T],
    (q, k, v): (View, View, View),
    dm: Dims,
    batch: usize,
    scale: f64,
    y: &[T],
    dy: &[T],
) -> Vec<T> {
    let Dims { heads, kv_heads, t, d } = dm;
    let w = (heads + 2 * kv_heads) * d;
    let mut out = super::rows::output_vec(batch * t * w);
    if !out.is_empty() {
        let scale = T::from_f64(scale);
        out.par_chunks_mut(t * w).enumerate().for_each(|(b, o)| {
            // One sequence's gradients in the per-head layout of the unpacked kernel, then
            // moved beside each other per token.
            let mut dq = vec![T::ZERO; heads * t * d];
            let mut dk = vec![T::ZERO; kv_heads * t * d];
            let mut dv = vec![T::ZERO; kv_heads * t * d];
            bwd_seq_any((x, x, x), (q, k, v), y, dy, dm, scale, b, (&mut dq, &mut dk, &mut dv));
            for ti in 0..t {
                let row = &mut o[ti * w..(ti + 1) * w];
                for h in 0..heads {
                    row[h * d..(h + 1) * d].copy_from_slice(&dq[(h * t + ti) * d..][..d]);
                }
                for g in 0..kv_heads {
                    let (ko, vo) = ((heads + g) * d, (heads + kv_heads + g) * d);
                    row[ko..ko + d].copy_from_slice(&dk[(g * t + ti) * d..][..d]);
                    row[vo..vo + d].copy_from_slice(&dv[(g * t + ti) * d..][..d]);
                }
            }
        });
    }
    out
}

/// The `q`, `k`, `v` views and sizes of a contiguous `qkv` of `len` elements.
fn dense_views(len: usize, batch: usize, t: usize, heads: usize, kv_heads: usize) -> ((View, View, View), Dims) {
    let w = len / (batch * t).max(1);
    let (q, k, v, dm, _) = packed_views(&Layout::contiguous((batch, t, w)), heads, kv_heads);
    ((q, k, v), dm)
}

/// [`causal_attention_packed`] on slices: `qkv` is a contiguous `[batch, t, (H + 2 H_kv) d]`;
/// returns `y [batch, t, H d]`. For ops that run several layers inside one node.
pub(crate) fn packed_attention_fwd<T: Real>(
    qkv: &[T],
    batch: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Vec<T> {
    let (views, dm) = dense_views(qkv.len(), batch, t, heads, kv_heads);
    packed_forward(qkv, views, dm, batch, scale)
}

/// The backward of [`packed_attention_fwd`]: `d qkv` from `qkv`, the output `y` and `dy`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn packed_attention_bwd<T: Real>(
    qkv: &[T],
    y: &[T],
    dy: &[T],
    batch: usize,
    t: usize,
    heads: usize,
    kv_heads: usize,
    scale: f64,
) -> Vec<T> {
    let (views, dm) = dense_views(qkv.len(), batch, t, heads, kv_heads);
    packed_backward(qkv, views, dm, batch, scale, y, dy)
}

impl CustomOp1 for Packed {
    fn name(&self) -> &'static str {
        "fused-causal-attention-qkv"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "causal attention",
            &[s],
            || self.fwd::<f32>(s, l),
            || self.fwd::<f64>(s, l),
        )
    }

    fn bwd(&self, qkv: &Tensor, y: &Tensor, dy: &Tensor) -> Result<Option<Tensor>> {
        let op = PackedBwd {
            qkv: qkv.detach(),
            heads: self.heads,
            kv_heads: self.kv_heads,
            scale: self.scale,
        };
        Ok(Some(y.detach().apply_op2_no_bwd(&dy.contiguous()?, &op)?))
    }
}

/// The packed backward: holds `qkv`, takes `(y, dy)`, returns `d qkv` in `qkv`'s layout.
struct PackedBwd {
    qkv: Tensor,
    heads: usize,
    kv_heads: usize,
    scale: f64,
}

impl PackedBwd {
    fn run<T: Real>(&self, y: &[T], dy: &[T]) -> Result<(CpuStorage, Shape)> {
        let (s, l) = self.qkv.storage_and_layout();
        let Storage::Cpu(s) = &*s else {
            bail!("causal attention backward: expected a CPU tensor")
        };
        let x = storage_of::<T>(s)?;
        let (q, k, v, dm, batch) = packed_views(l, self.heads, self.kv_heads);
        let out = packed_backward(x, (q, k, v), dm, batch, self.scale, y, dy);
        Ok((T::storage(out), l.shape().clone()))
    }
}

impl CustomOp2 for PackedBwd {
    fn name(&self) -> &'static str {
        "fused-causal-attention-qkv-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        by_dtype(
            "causal attention backward",
            &[s1, s2],
            || {
                self.run::<f32>(
                    super::rows::slice(s1, l1, "attention output")?,
                    super::rows::slice(s2, l2, "attention grad")?,
                )
            },
            || {
                self.run::<f64>(
                    super::rows::slice(s1, l1, "attention output")?,
                    super::rows::slice(s2, l2, "attention grad")?,
                )
            },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::nn::{causal_attention_composite, causal_mask};
    use candle_core::{DType, Device, Var, D};
    use rand::{Rng, SeedableRng};

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("v")
    }

    /// `(b, heads, kv_heads, t, d)`: q, k, v cut as views out of one `[b, t, (H + 2 H_kv) d]`
    /// projection (the transformer's layout); k and v repeated per group for the composite.
    fn check(b: usize, heads: usize, kv: usize, t: usize, d: usize) {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64((b * 7 + heads * 5 + t * 3 + d) as u64);
        let width = (heads + 2 * kv) * d;
        let xs: Vec<f64> = (0..b * t * width).map(|_| rng.random_range(-2.0..2.0)).collect();
        let cs: Vec<f64> = (0..b * t * heads * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x0 = Tensor::from_vec(xs, (b, t, width), &Device::Cpu).expect("x");
        let c0 = Tensor::from_vec(cs, (b, t, heads * d), &Device::Cpu).expect("c");
        let scale = 1.0 / (d as f64).sqrt();
        for dtype in [DType::F64, DType::F32] {
            // 0: the fused kernel on q/k/v views, 1: the packed kernel on qkv, 2: composite.
            let run = |mode: u8| -> (Vec<f64>, Vec<f64>) {
                let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("v");
                let split = |from: usize, n: usize| {
                    x.as_tensor()
                        .narrow(D::Minus1, from * d, n * d)
                        .and_then(|z| z.reshape((b, t, n, d)))
                        .and_then(|z| z.transpose(1, 2))
                        .expect("view")
                };
                let (q, k, v) = (split(0, heads), split(heads, kv), split(heads + kv, kv));
                let y = if mode == 0 {
                    causal_attention(&q, &k, &v, scale).expect("fused")
                } else if mode == 1 {
                    causal_attention_packed(x.as_tensor(), heads, kv, scale).expect("packed")
                } else {
                    // Repeat each key/value head for its group of query heads.
                    let rep = |z: &Tensor| {
                        let per: Vec<Tensor> = (0..heads)
                            .map(|h| z.narrow(1, h / (heads / kv), 1).expect("n"))
                            .collect();
                        Tensor::cat(&per, 1).expect("cat")
                    };
                    let mask = causal_mask(t, dtype, &Device::Cpu).expect("mask");
                    causal_attention_composite(&q, &rep(&k), &rep(&v), scale, &mask).expect("composite")
                };
                assert_eq!(y.dims(), &[b, t, heads * d]);
                let g = (&y * c0.to_dtype(dtype).expect("d"))
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                (flat(&y), flat(g.get(x.as_tensor()).expect("grad")))
            };
            let ((fy, fg), (py, pg), (cy, cg)) = (run(0), run(1), run(2));
            // Reference: the composite's values; 1e-5 relative in f32 (1e-10 in f64), on a scale
            // of the largest magnitude so that entries near zero compare absolutely.
            let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
            for (what, f, c) in [
                ("y", &fy, &cy),
                ("dx", &fg, &cg),
                ("packed y", &py, &cy),
                ("packed dx", &pg, &cg),
            ] {
                let big = c.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
                for i in 0..f.len() {
                    assert!(
                        (f[i] - c[i]).abs() <= tol * big.max(c[i].abs()),
                        "{dtype:?} b={b} h={heads}/{kv} t={t} d={d} {what}[{i}]: {} vs {}",
                        f[i],
                        c[i]
                    );
                }
            }
        }
    }

    #[test]
    fn matches_composite_values_and_gradients() {
        check(2, 3, 3, 13, 8);
        check(3, 2, 2, 1, 4);
        check(1, 4, 4, 33, 17);
    }

    #[test]
    fn grouped_query_heads_match_repeated_keys_and_values() {
        check(2, 4, 2, 9, 8);
        check(2, 6, 1, 7, 4);
    }

    #[test]
    fn contiguous_inputs_and_shape_errors() {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 2, 5, 4), &dev).expect("q");
        let y = causal_attention(&q, &q, &q, 0.5).expect("attn");
        // Row 0 attends to itself only: y[b, 0, h] = v[b, h, 0].
        let y0 = y
            .narrow(1, 0, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("y");
        let v0 = q
            .narrow(2, 0, 1)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f32>())
            .expect("v");
        assert_eq!(&y0[..4], &v0[..4]);
        let k = Tensor::randn(0f32, 1.0, (2, 3, 5, 4), &dev).expect("k");
        assert!(causal_attention(&q, &k, &k, 0.5).is_err());
        // 4 query + 2 x 2 key/value heads need a width divisible by 8.
        let qkv = Tensor::zeros((2, 5, 12), DType::F32, &dev).expect("qkv");
        let err = causal_attention_packed(&qkv, 4, 2, 0.5).expect_err("width");
        assert!(err.to_string().contains("cannot hold"), "{err}");
        assert!(
            causal_attention_packed(&qkv, 4, 3, 0.5).is_err(),
            "kv heads must divide heads"
        );
    }
}
