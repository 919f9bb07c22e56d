//! `attention.cu` on the CPU emulation against the CPU attention in f64 on the same rounded
//! inputs: the forward's `y` and the backward's `dq`, `dk`, `dv`, for the three ways `cuda.rs`
//! launches the kernels (separate `q`, `k`, `v` with offsets; the unpacked op on strided views
//! of one `qkv`; the packed op, whose gradient has `qkv`'s layout), lengths that are not
//! multiples of the tiles, grouped-query heads, every head-dim bucket and every dtype. Outputs
//! start as NaN, so an element a kernel does not write fails the comparison.

use half::{bf16, f16};

use super::cpu::{packed_attention_bwd, packed_attention_fwd};
use super::plan::{Sizes, Strides};
use crate::kernels::emulated::{buffer, launch, max_error, noise, tolerance, widen, Arg, Element};

/// How the operands are laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    /// `q`, `k`, `v` in separate contiguous buffers, each after a few other elements; flat
    /// gradients.
    Dense,
    /// The unpacked op on the (strided) `q`, `k`, `v` views of one `qkv`; flat gradients.
    Views,
    /// The packed op: views of `qkv`, gradient in `qkv`'s layout.
    Packed,
}

/// Elements before each dense operand (a nonzero start offset).
const LEAD: usize = 3;

/// `x [B, T, w]` head `col` (of width `d`) as a contiguous `[B, heads, T, d]`.
fn gather(x: &[f64], sz: Sizes, col: usize, heads: usize) -> Vec<f64> {
    let w = (sz.heads + 2 * sz.kv_heads) * sz.d;
    let mut out = Vec::with_capacity(sz.batch * heads * sz.t * sz.d);
    for b in 0..sz.batch {
        for h in 0..heads {
            for t in 0..sz.t {
                let at = (b * sz.t + t) * w + (col + h) * sz.d;
                out.extend_from_slice(&x[at..at + sz.d]);
            }
        }
    }
    out
}

/// The kernels' `(sb, sh, st)` arguments.
fn strides(s: &Strides) -> [Arg; 3] {
    s.args().map(Arg::U64)
}

/// The ints and scale every kernel takes after its buffers.
fn sizes(sz: Sizes, scale: f64) -> [Arg; 5] {
    let i = |v: usize| Arg::I32(v as i32);
    [i(sz.heads), i(sz.kv_heads), i(sz.t), i(sz.d), Arg::F64(scale)]
}

fn name<T: Element>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

/// Runs the forward and backward kernels on `sz` laid out as `form` in `T`, and compares
/// with the CPU attention in f64; the kernels are the ones `cuda.rs` picks (on tensor cores for
/// half storage and head dims up to 128).
fn check<T: Element>(sz: Sizes, form: Form) {
    check_forward::<T>(sz, form, is_half::<T>());
}

fn is_half<T: Element>() -> bool {
    matches!(T::SUFFIX, "f16" | "bf16")
}

/// [`check`] with the kernels on tensor cores (where `cuda.rs` would use them) or not.
fn check_forward<T: Element>(sz: Sizes, form: Form, tensor_cores: bool) {
    let sz = sz.checked().expect("sizes");
    let Sizes {
        batch,
        heads,
        kv_heads,
        t,
        d,
    } = sz;
    let w = (heads + 2 * kv_heads) * d;
    let seed = (batch * 1000 + heads * 100 + kv_heads * 10 + t * 7 + d) as u64;
    let round = |x: Vec<f64>| widen(&buffer::<T>(&x));
    let qkv = round(noise(batch * t * w, seed, 2.0));
    let dy = round(noise(batch * t * heads * d, seed + 1, 1.0));
    let scale = 1.0 / (d as f64).sqrt();
    let what = format!("{} {sz:?} {form:?} tensor cores {tensor_cores}", T::SUFFIX);

    // The operands as the kernels see them: (buffer, strides from the buffer's start).
    let packed: Vec<T> = buffer(&qkv);
    let dense: Vec<Vec<T>> = [(0, heads), (heads, kv_heads), (heads + kv_heads, kv_heads)]
        .iter()
        .map(|&(col, n)| {
            let mut v = vec![0.5; LEAD];
            v.extend(gather(&qkv, sz, col, n));
            buffer(&v)
        })
        .collect();
    let views = sz.packed(0);
    let ops: [(&[T], Strides); 3] = std::array::from_fn(|i| match form {
        Form::Dense => {
            let n = if i == 0 { heads } else { kv_heads };
            let s = Strides {
                offset: LEAD,
                b: n * t * d,
                h: t * d,
                t: d,
            };
            (&dense[i][..], s)
        }
        Form::Views | Form::Packed => (&packed[..], views[i]),
    });
    let inputs: Vec<Arg> = ops.iter().map(|(x, s)| Arg::input(&x[s.offset..])).collect();
    let all_strides: Vec<Arg> = ops.iter().flat_map(|(_, s)| strides(s)).collect();

    // Forward.
    let rows = sz.rows();
    let nan_t = || T::from_f64(f64::NAN);
    let nan_a = || T::Acc::from_f64(f64::NAN);
    let mut y = vec![nan_t(); rows * d];
    let mut lse = vec![nan_a(); rows];
    let mut args = inputs.clone();
    args.extend([Arg::output(&mut y), Arg::output(&mut lse)]);
    args.extend(sizes(sz, scale));
    args.extend(&all_strides);
    let forward = sz.forward(tensor_cores);
    launch(&name::<T>(&forward.name), &forward.grid, &args);
    let want = packed_attention_fwd(&qkv, batch, t, heads, kv_heads, scale);
    let ey = max_error(&widen(&y), &want);
    assert!(ey <= tolerance::<T>(), "{what}: y error {ey:e}");

    // Backward, from the kernel's own y (as the op's backward gets it).
    let dy_t: Vec<T> = buffer(&dy);
    let mut delta = vec![nan_a(); rows];
    let i = |v: usize| Arg::I32(v as i32);
    let args = [
        Arg::input(&y),
        Arg::input(&dy_t),
        Arg::output(&mut delta),
        i(rows),
        i(heads),
        i(t),
        i(d),
    ];
    launch(&name::<T>("attn_delta"), &sz.delta_grid(), &args);
    let grads = if form == Form::Packed {
        sz.packed(0)
    } else {
        sz.flat_grads()
    };
    let total = if form == Form::Packed {
        batch * t * w
    } else {
        grads[2].offset + batch * kv_heads * t * d
    };
    let mut grad = vec![nan_t(); total];
    let common = |grad: &mut Vec<T>| {
        let mut a = inputs.clone();
        a.extend([
            Arg::input(&dy_t),
            Arg::input(&lse),
            Arg::input(&delta),
            Arg::output(grad),
        ]);
        a.extend(sizes(sz, scale));
        a.extend(&all_strides);
        a
    };
    let mut args = common(&mut grad);
    args.push(Arg::U64(grads[0].offset as u64));
    args.extend(strides(&grads[0]));
    let backward = sz.backward(tensor_cores);
    launch(&name::<T>(&backward.dq.0), &backward.dq.1, &args);
    let mut args = common(&mut grad);
    for g in &grads[1..] {
        args.push(Arg::U64(g.offset as u64));
        args.extend(strides(g));
    }
    launch(&name::<T>(&backward.dkdv.0), &backward.dkdv.1, &args);

    let want = packed_attention_bwd(&qkv, &widen(&y), &dy, batch, t, heads, kv_heads, scale);
    let want = if form == Form::Packed {
        want
    } else {
        let mut flat = gather(&want, sz, 0, heads);
        flat.extend(gather(&want, sz, heads, kv_heads));
        flat.extend(gather(&want, sz, heads + kv_heads, kv_heads));
        flat
    };
    let eg = max_error(&widen(&grad), &want);
    assert!(eg <= tolerance::<T>(), "{what}: gradient error {eg:e}");
}

fn sz(batch: usize, heads: usize, kv_heads: usize, t: usize, d: usize) -> Sizes {
    Sizes {
        batch,
        heads,
        kv_heads,
        t,
        d,
    }
}

#[test]
fn attention_matches_the_cpu_in_f64() {
    check::<f64>(sz(1, 4, 4, 1, 8), Form::Dense);
    check::<f64>(sz(2, 4, 2, 7, 24), Form::Views);
    check::<f64>(sz(1, 4, 1, 37, 64), Form::Packed);
    check::<f64>(sz(1, 4, 2, 70, 8), Form::Dense);
    check::<f64>(sz(1, 2, 2, 70, 24), Form::Packed);
    check::<f64>(sz(1, 2, 1, 70, 64), Form::Views);
}

#[test]
fn attention_matches_the_cpu_in_f32() {
    check::<f32>(sz(2, 4, 1, 7, 8), Form::Packed);
    check::<f32>(sz(1, 4, 2, 37, 24), Form::Dense);
    check::<f32>(sz(1, 4, 4, 70, 64), Form::Views);
}

#[test]
fn attention_matches_the_cpu_in_half_precision() {
    check::<f16>(sz(1, 4, 2, 37, 64), Form::Packed);
    check::<f16>(sz(2, 4, 4, 7, 24), Form::Views);
    check::<bf16>(sz(1, 4, 1, 37, 64), Form::Dense);
    check::<bf16>(sz(1, 4, 2, 70, 8), Form::Packed);
}

#[test]
fn wide_heads_match_the_cpu() {
    // The 128 and 256 buckets, whose staged tiles are shorter in f64 (16 and 8 rows) and in
    // f32 for d > 128 (16 rows).
    check::<f64>(sz(1, 2, 1, 37, 128), Form::Views);
    check::<f64>(sz(1, 2, 1, 20, 200), Form::Packed);
    check::<f32>(sz(1, 2, 2, 37, 100), Form::Dense);
    check::<bf16>(sz(1, 2, 1, 37, 256), Form::Views);
}

#[test]
fn the_tensor_core_kernels_match_the_cpu() {
    // Several query blocks and key tiles (t = 130: the last ones partial), grouped heads, each
    // bucket (d = 24 pads to 32), rows copied 8 values at a time (aligned views) and one by one
    // (the dense operands start 3 elements in).
    check::<bf16>(sz(1, 4, 2, 130, 64), Form::Packed);
    check::<f16>(sz(2, 2, 1, 130, 64), Form::Dense);
    check::<bf16>(sz(1, 2, 2, 70, 128), Form::Views);
    check::<f16>(sz(1, 4, 1, 65, 24), Form::Views);
    check::<bf16>(sz(1, 2, 1, 1, 32), Form::Dense);
    // d = 128: the backward's staged tiles have 32 rows.
    check::<f16>(sz(1, 2, 1, 130, 128), Form::Packed);
    check::<bf16>(sz(1, 2, 2, 45, 96), Form::Dense);
}

#[test]
fn the_fma_kernels_still_serve_half_storage() {
    check_forward::<bf16>(sz(1, 4, 2, 37, 64), Form::Views, false);
    check_forward::<f16>(sz(1, 2, 1, 37, 24), Form::Packed, false);
}
