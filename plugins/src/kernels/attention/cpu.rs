//! The CPU attention: sequences on the rayon pool; per head, `R`-row blocks of queries whose
//! scores live in scratch rows, products in register blocks (the FMA microkernel of
//! `raw::avx512::gemm_rows` for f32 where the CPU has AVX-512), and the row loops in their
//! AVX-512 build where it helps.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, Layout, Result, Shape, Storage};
use rayon::prelude::*;

use super::{AttentionBwd, Packed, PackedBwd};
use crate::kernels::cpu::fastmath::{exp_shifted_sum, reduce2, Real};
use crate::kernels::cpu::raw::{as_f32, as_f32_mut, avx512_dispatch, output_vec};
use crate::kernels::cpu::rows::{by_dtype, slice};

/// The forward on `(q, k, v)` storages and layouts.
pub(super) fn fwd(
    scale: f64,
    s: (&CpuStorage, &CpuStorage, &CpuStorage),
    l: (&Layout, &Layout, &Layout),
) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "causal attention",
        &[s.0],
        || fwd_typed::<f32>(scale, s, l),
        || fwd_typed::<f64>(scale, s, l),
    )
}

/// The backward on the output `y` and `dy`: `dq`, `dk`, `dv` in one flat vector.
pub(super) fn bwd(op: &AttentionBwd, y: Arg, dy: Arg) -> Result<(CpuStorage, Shape)> {
    by_y_dy(y, dy, |y, dy| bwd_typed(op, y, dy), |y, dy| bwd_typed(op, y, dy))
}

/// The packed forward on a contiguous `qkv`.
pub(super) fn packed_fwd(op: &Packed, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    by_dtype(
        "causal attention",
        &[s],
        || packed_fwd_typed::<f32>(op, s, l),
        || packed_fwd_typed::<f64>(op, s, l),
    )
}

/// The packed backward on the output `y` and `dy`: `d qkv`.
pub(super) fn packed_bwd(op: &PackedBwd, y: Arg, dy: Arg) -> Result<(CpuStorage, Shape)> {
    by_y_dy(
        y,
        dy,
        |y, dy| packed_bwd_typed(op, y, dy),
        |y, dy| packed_bwd_typed(op, y, dy),
    )
}

/// A storage and its layout.
type Arg<'a> = (&'a CpuStorage, &'a Layout);

/// The dtype dispatch of both backwards: `f32_body` or `f64_body` on the contiguous slices of
/// the forward's output `y` and the incoming gradient `dy`.
fn by_y_dy<R>(
    y: Arg,
    dy: Arg,
    f32_body: impl FnOnce(&[f32], &[f32]) -> Result<R>,
    f64_body: impl FnOnce(&[f64], &[f64]) -> Result<R>,
) -> Result<R> {
    by_dtype(
        "causal attention backward",
        &[y.0, dy.0],
        || {
            f32_body(
                slice(y.0, y.1, "attention output")?,
                slice(dy.0, dy.1, "attention grad")?,
            )
        },
        || {
            f64_body(
                slice(y.0, y.1, "attention output")?,
                slice(dy.0, dy.1, "attention grad")?,
            )
        },
    )
}

/// Strided access to a `[B, H, T, d]` input: element `(b, h, t, 0)` at `at(b, h, t)`.
#[derive(Clone, Copy)]
pub(super) struct View {
    start: usize,
    sb: usize,
    sh: usize,
    st: usize,
}

impl View {
    pub(super) fn of(l: &Layout) -> Self {
        let s = l.stride();
        View {
            start: l.start_offset(),
            sb: s[0],
            sh: s[1],
            st: s[2],
        }
    }
    #[inline(always)]
    pub(super) fn at(&self, b: usize, h: usize, t: usize) -> usize {
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

pub(super) fn storage_of<T: Real>(s: &CpuStorage) -> Result<&[T]> {
    match T::slice(s) {
        Some(v) => Ok(v),
        None => bail!("causal attention: expected {:?}, got {:?}", T::DTYPE, s.dtype()),
    }
}

/// Rows of one register block of the small matrix products below.
const R: usize = 4;
// The AVX-512 product computes blocks of the same number of rows.
#[cfg(target_arch = "x86_64")]
const _: () = assert!(R == crate::kernels::cpu::raw::avx512::GEMM_ROWS);
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
    if let (Some(a), Some(b), Some(c)) = (as_f32(a), as_f32(b), as_f32_mut(c)) {
        return block_f32(a, (lda, ka), b, ldb, (k0, k1), n, c, ldc, alpha.to_f64() as f32);
    }
    block_loop(a, (lda, ka), b, ldb, (k0, k1), n, c, ldc, alpha)
}

/// [`block`]'s generic loop (the `R x W` accumulators in registers across the `k` loop).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn block_loop<T: Real>(
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

avx512_dispatch!(
    /// [`block`] for f32: the FMA microkernel of `raw::avx512::gemm_rows` where the CPU has
    /// AVX-512, the generic loop elsewhere.
    fn block_f32(
        a: &[f32],
        lda_ka: (usize, usize),
        b: &[f32],
        ldb: usize,
        k0_k1: (usize, usize),
        n: usize,
        c: &mut [f32],
        ldc: usize,
        alpha: f32,
    ) => crate::kernels::cpu::raw::avx512::gemm_rows, else block_loop::<f32>
);

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

avx512_dispatch!(fn fwd_seq_any<T: Real>(x: (&[T], &[T], &[T]), views: (View, View, View), dm: Dims, scale: T, b: usize, out: &mut [T]) => fwd_seq);
avx512_dispatch!(fn bwd_seq_any<T: Real>(x: (&[T], &[T], &[T]), views: (View, View, View), y: &[T], dy: &[T], dm: Dims, scale: T, b: usize, grads: (&mut [T], &mut [T], &mut [T])) => bwd_seq);

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
    let mut out = output_vec(batch * dm.t * dm.heads * dm.d);
    if !out.is_empty() {
        let scale = T::from_f64(scale);
        out.par_chunks_mut(dm.t * dm.heads * dm.d)
            .enumerate()
            .for_each(|(b, o)| fwd_seq_any(x, views, dm, scale, b, o));
    }
    Ok((T::storage(out), Shape::from((batch, dm.t, dm.heads * dm.d))))
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

fn packed_fwd_typed<T: Real>(op: &Packed, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
    let x = storage_of::<T>(s)?;
    let (q, k, v, dm, batch) = packed_views(l, op.heads, op.kv_heads);
    let out = packed_forward(x, (q, k, v), dm, batch, op.scale);
    Ok((T::storage(out), Shape::from((batch, dm.t, dm.heads * dm.d))))
}

/// Forward of the packed attention over `x` with the given views: `[B, T, H d]`.
fn packed_forward<T: Real>(x: &[T], (q, k, v): (View, View, View), dm: Dims, batch: usize, scale: f64) -> Vec<T> {
    let mut out = output_vec(batch * dm.t * dm.heads * dm.d);
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
    let mut out = output_vec(batch * t * w);
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

fn packed_bwd_typed<T: Real>(op: &PackedBwd, y: &[T], dy: &[T]) -> Result<(CpuStorage, Shape)> {
    let (s, l) = op.qkv.storage_and_layout();
    let Storage::Cpu(s) = &*s else {
        bail!("causal attention backward: expected a CPU tensor")
    };
    let x = storage_of::<T>(s)?;
    let (q, k, v, dm, batch) = packed_views(l, op.heads, op.kv_heads);
    let out = packed_backward(x, (q, k, v), dm, batch, op.scale, y, dy);
    Ok((T::storage(out), l.shape().clone()))
}
