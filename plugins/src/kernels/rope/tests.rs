use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};

/// Tables `[context, d/2]` of base 10000 (angles `p * 10000^(-2i/d)`), as a model makes them.
fn tables(context: usize, d: usize, dev: &Device) -> (Tensor, Tensor) {
    let half = d / 2;
    let angle = |p: usize, i: usize| p as f64 * 10_000f64.powf(-((2 * i) as f64) / d as f64);
    let (mut c, mut s) = (Vec::new(), Vec::new());
    for p in 0..context {
        for i in 0..half {
            c.push(angle(p, i).cos());
            s.push(angle(p, i).sin());
        }
    }
    let t = |v: Vec<f64>| Tensor::from_vec(v, (context, half), dev).expect("table");
    (t(c), t(s))
}

/// Deterministic values in `[-2, 2)`.
fn noise(n: usize, seed: u64) -> Vec<f64> {
    let mut x = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((x >> 11) as f64 / (1u64 << 53) as f64 * 4.0) - 2.0
        })
        .collect()
}

/// `(y, dx)` of `f` on `x` with cotangent `w` (values as f64).
fn value_and_grad(f: &dyn Fn(&Tensor) -> Result<Tensor>, x: &Tensor, w: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let var = Var::from_tensor(x).expect("var");
    let y = f(var.as_tensor()).expect("op");
    let grads = (&y * w)
        .and_then(|l| l.sum_all())
        .and_then(|l| l.backward())
        .expect("bwd");
    let g = grads.get(var.as_tensor()).expect("dx");
    (values(&y), values(g))
}

/// The largest `|a - b|` over the elements, relative to the largest `|b|` (at least 1).
fn error(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    a.iter().zip(b).fold(0f64, |m, (x, y)| m.max((x - y).abs() / scale))
}

/// The fused op against the composite, values and gradients, f64 (1e-12) and f32 (1e-6), both
/// layouts, head dims 2, 8, 64, positions from 0 and from an offset, for a contiguous `x` and
/// one that is a transposed view (as `q` before `.contiguous()`).
#[test]
fn matches_the_composite_in_both_layouts_at_offsets() {
    let dev = Device::Cpu;
    let (b, h, t) = (2, 3, 5);
    for d in [2, 8, 64] {
        let (cos, sin) = tables(32, d, &dev);
        let x0 = Tensor::from_vec(noise(b * h * t * d, d as u64), (b, t, h, d), &dev).expect("x");
        let w0 = Tensor::from_vec(noise(b * h * t * d, 99), (b, h, t, d), &dev).expect("w");
        for offset in [0, 7, 27] {
            let c = cos.narrow(0, offset, t).expect("n");
            let s = sin.narrow(0, offset, t).expect("n");
            for interleaved in [false, true] {
                for dtype in [DType::F64, DType::F32] {
                    let cast = |x: &Tensor| x.to_dtype(dtype).expect("cast");
                    let (cd, sd, wd) = (cast(&c), cast(&s), cast(&w0));
                    let viewed = cast(&x0).transpose(1, 2).expect("t");
                    for x in [viewed.contiguous().expect("c"), viewed] {
                        let fused_op = |x: &Tensor| fused(x, &cd, &sd, interleaved);
                        let comp = |x: &Tensor| composite::rope(x, &cd, &sd, interleaved);
                        let (fy, fg) = value_and_grad(&fused_op, &x, &wd);
                        let (cy, cg) = value_and_grad(&comp, &x, &wd);
                        let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
                        let (ey, eg) = (error(&fy, &cy), error(&fg, &cg));
                        assert!(
                            ey <= tol && eg <= tol,
                            "d {d} offset {offset} interleaved {interleaved} {dtype:?}: value {ey:e}, grad {eg:e}"
                        );
                    }
                }
            }
        }
    }
}

/// The gradient against central differences of `sum(w * rope(x))` in f64, both layouts.
#[test]
fn the_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    let (b, h, t, d) = (1, 2, 3, 8);
    let (cos, sin) = tables(8, d, &dev);
    let (c, s) = (cos.narrow(0, 4, t).expect("n"), sin.narrow(0, 4, t).expect("n"));
    let xs = noise(b * h * t * d, 3);
    let w = Tensor::from_vec(noise(b * h * t * d, 4), (b, h, t, d), &dev).expect("w");
    for interleaved in [false, true] {
        let loss = |v: &[f64]| -> f64 {
            let x = Tensor::from_vec(v.to_vec(), (b, h, t, d), &dev).expect("x");
            let y = rope(&x, &c, &s, interleaved).expect("rope");
            (y * &w)
                .and_then(|l| l.sum_all())
                .and_then(|l| l.to_scalar::<f64>())
                .expect("loss")
        };
        let x = Tensor::from_vec(xs.clone(), (b, h, t, d), &dev).expect("x");
        let (_, g) = value_and_grad(&|x| rope(x, &c, &s, interleaved), &x, &w);
        let eps = 1e-6;
        for (i, gi) in g.iter().enumerate() {
            let (mut up, mut down) = (xs.clone(), xs.clone());
            up[i] += eps;
            down[i] -= eps;
            let fd = (loss(&up) - loss(&down)) / (2.0 * eps);
            assert!((fd - gi).abs() < 1e-8, "interleaved {interleaved} [{i}]: {fd} vs {gi}");
        }
    }
}

/// Position 0 is the identity, and a rotation keeps each pair's norm.
#[test]
fn position_zero_is_the_identity_and_pairs_keep_their_norm() {
    let dev = Device::Cpu;
    let (cos, sin) = tables(4, 4, &dev);
    let x = Tensor::from_vec(noise(2 * 4 * 4, 5), (1, 2, 4, 4), &dev).expect("x");
    for interleaved in [false, true] {
        let y = values(&rope(&x, &cos, &sin, interleaved).expect("rope"));
        let xv = values(&x);
        let pair = |v: &[f64], row: usize, i: usize| {
            let base = row * 4;
            if interleaved {
                (v[base + 2 * i], v[base + 2 * i + 1])
            } else {
                (v[base + i], v[base + i + 2])
            }
        };
        for row in 0..8 {
            for i in 0..2 {
                let ((a, b), (p, q)) = (pair(&xv, row, i), pair(&y, row, i));
                assert!(((a * a + b * b) - (p * p + q * q)).abs() < 1e-12);
                if row % 4 == 0 {
                    assert_eq!((a, b), (p, q), "position 0 moved a pair");
                }
            }
        }
    }
}

#[test]
fn bad_shapes_are_refused_naming_what_is_wrong() {
    let dev = Device::Cpu;
    let (cos, sin) = tables(4, 4, &dev);
    let x = Tensor::zeros((1, 1, 4, 4), DType::F64, &dev).expect("x");
    let odd = Tensor::zeros((1, 1, 4, 5), DType::F64, &dev).expect("odd");
    let e = rope(&odd, &cos, &sin, false).expect_err("odd d");
    assert!(e.to_string().contains("even"), "{e}");
    let short = cos.narrow(0, 0, 3).expect("n");
    let e = rope(&x, &short, &sin, true).expect_err("short table");
    assert!(e.to_string().contains("cos table"), "{e}");
    let e = rope(&x.squeeze(0).expect("s"), &cos, &sin, false).expect_err("rank 3");
    assert!(e.to_string().contains("rank") || e.to_string().contains("dims"), "{e}");
}

#[test]
fn dispatch_follows_the_support_table() {
    let dev = Device::Cpu;
    let (cos, sin) = tables(3, 4, &dev);
    let x = Tensor::from_vec(noise(12, 6), (1, 1, 3, 4), &dev).expect("x");
    assert!(supports(&x, &cos, &sin));
    let f32x = x.to_dtype(DType::F32).expect("f32");
    assert!(!supports(&f32x, &cos, &sin));
    let half = |t: &Tensor| t.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&half(&x), &half(&cos), &half(&sin)));
    let y = rope(&half(&x), &half(&cos), &half(&sin), false).expect("composite");
    assert_eq!(y.dtype(), DType::F16);
    let e = error(&values(&y), &values(&rope(&x, &cos, &sin, false).expect("f64")));
    assert!(e < 1e-2, "{e}");
}

/// Where a GPU opens (feature `cuda`): the fused op on it, each dtype, against the f64 op on
/// the CPU on the same rounded inputs, values and gradients.
#[cfg(feature = "cuda")]
#[test]
fn on_the_gpu_matches_the_cpu() {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no CUDA device opens ({e}): the GPU check is skipped");
            return;
        }
    };
    let dev = Device::Cpu;
    let (b, h, t, d) = (2, 3, 37, 64);
    let (cos, sin) = tables(64, d, &dev);
    let (c, s) = (cos.narrow(0, 9, t).expect("n"), sin.narrow(0, 9, t).expect("n"));
    let x = Tensor::from_vec(noise(b * h * t * d, 7), (b, h, t, d), &dev).expect("x");
    let w = Tensor::from_vec(noise(b * h * t * d, 8), (b, h, t, d), &dev).expect("w");
    for dtype in [DType::F32, DType::F64, DType::F16, DType::BF16] {
        let round = |v: &Tensor| v.to_dtype(dtype).and_then(|v| v.to_dtype(DType::F64)).expect("round");
        let (xr, cr, sr, wr) = (round(&x), round(&c), round(&s), round(&w));
        let on = |v: &Tensor| v.to_dtype(dtype).and_then(|v| v.to_device(&gpu)).expect("to gpu");
        for interleaved in [false, true] {
            assert!(supports(&on(&xr), &on(&cr), &on(&sr)));
            let (ry, rg) = value_and_grad(&|x| rope(x, &cr, &sr, interleaved), &xr, &wr);
            let (gy, gg) = value_and_grad(&|x| rope(x, &on(&cr), &on(&sr), interleaved), &on(&xr), &on(&wr));
            let tol = match dtype {
                DType::F64 => 1e-12,
                DType::F32 => 1e-6,
                DType::F16 => 2e-3,
                _ => 1e-2,
            };
            let (ey, eg) = (error(&gy, &ry), error(&gg, &rg));
            assert!(
                ey <= tol && eg <= tol,
                "{dtype:?} interleaved {interleaved}: value {ey:e}, grad {eg:e}"
            );
        }
    }
}
