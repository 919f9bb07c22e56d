use super::*;
use crate::kernels::softmax::causal_mask;
use candle_core::{Device, Var, D};
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
                fused(&q, &k, &v, scale).expect("fused")
            } else if mode == 1 {
                fused_packed(x.as_tensor(), heads, kv, scale).expect("packed")
            } else {
                // Repeat each key/value head for its group of query heads.
                let rep = |z: &Tensor| {
                    let per: Vec<Tensor> = (0..heads)
                        .map(|h| z.narrow(1, h / (heads / kv), 1).expect("n"))
                        .collect();
                    Tensor::cat(&per, 1).expect("cat")
                };
                let mask = causal_mask(t, dtype, &Device::Cpu).expect("mask");
                composite::causal_attention(&q, &rep(&k), &rep(&v), scale, &mask).expect("composite")
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
    let y = fused(&q, &q, &q, 0.5).expect("attn");
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
    assert!(fused(&q, &k, &k, 0.5).is_err());
    // 4 query + 2 x 2 key/value heads need a width divisible by 8.
    let qkv = Tensor::zeros((2, 5, 12), DType::F32, &dev).expect("qkv");
    let err = fused_packed(&qkv, 4, 2, 0.5).expect_err("width");
    assert!(err.to_string().contains("cannot hold"), "{err}");
    assert!(fused_packed(&qkv, 4, 3, 0.5).is_err(), "kv heads must divide heads");
}

/// CPU f32/f64 take the fused ops; mixed dtypes and half types the composites, which agree.
#[test]
fn dispatch_follows_the_support_table() {
    let dev = Device::Cpu;
    let (b, t, heads, d) = (2, 5, 2, 4);
    let qkv = Tensor::randn(0f64, 1.0, (b, t, 3 * heads * d), &dev).expect("qkv");
    let mask = causal_mask(t, DType::F64, &dev).expect("mask");
    assert!(supports(&qkv, &qkv, &qkv));
    assert!(!supports(&qkv, &qkv.to_dtype(DType::F32).expect("f32"), &qkv));
    let got = flat(&causal_attention_packed(&qkv, heads, heads, 0.5, &mask).expect("fused"));
    let composed = flat(&composite::causal_attention_packed(&qkv, heads, heads, 0.5, &mask).expect("composite"));
    for (a, c) in got.iter().zip(&composed) {
        assert!((a - c).abs() < 1e-10, "{a} vs {c}");
    }
    let half = qkv.to_dtype(DType::BF16).expect("bf16");
    assert!(!supports(&half, &half, &half));
    let y = causal_attention_packed(&half, heads, heads, 0.5, &mask.to_dtype(DType::BF16).expect("bf16"))
        .expect("composite");
    assert_eq!(y.dims(), &[b, t, heads * d]);
}

/// On a GPU (skipped where none opens): the CUDA kernels through the ops (views of `qkv` with
/// their strides, the packed op, the saved lse) against the CPU attention in f64 on the same
/// rounded inputs, values and gradients, every CUDA dtype.
#[cfg(feature = "cuda")]
#[test]
fn on_the_gpu_matches_the_cpu() {
    let gpu = match Device::new_cuda(0) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("no CUDA device opens ({e}): the GPU attention check is skipped");
            return;
        }
    };
    // (b, heads, kv_heads, t, d).
    for (b, heads, kv, t, d) in [
        (2, 4, 2, 70, 64),
        (1, 4, 1, 129, 128),
        (1, 2, 2, 33, 24),
        (1, 2, 1, 40, 256),
    ] {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64((b + heads + t + d) as u64);
        let width = (heads + 2 * kv) * d;
        let xs: Vec<f64> = (0..b * t * width).map(|_| rng.random_range(-2.0..2.0)).collect();
        let cs: Vec<f64> = (0..b * t * heads * d).map(|_| rng.random_range(-1.0..1.0)).collect();
        let x0 = Tensor::from_vec(xs, (b, t, width), &Device::Cpu).expect("x");
        let c0 = Tensor::from_vec(cs, (b, t, heads * d), &Device::Cpu).expect("c");
        let scale = 1.0 / (d as f64).sqrt();
        // `packed`: the packed op, else the unpacked one on strided views.
        let run = |x: &Tensor, packed: bool| -> (Vec<f64>, Vec<f64>) {
            let x = Var::from_tensor(x).expect("var");
            let split = |from: usize, n: usize| {
                x.as_tensor()
                    .narrow(D::Minus1, from * d, n * d)
                    .and_then(|z| z.reshape((b, t, n, d)))
                    .and_then(|z| z.transpose(1, 2))
                    .expect("view")
            };
            let y = if packed {
                fused_packed(x.as_tensor(), heads, kv, scale).expect("packed")
            } else {
                fused(&split(0, heads), &split(heads, kv), &split(heads + kv, kv), scale).expect("fused")
            };
            let c = c0.to_device(y.device()).expect("c");
            let g = (y.to_dtype(DType::F64).expect("f64") * c)
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            (flat(&y), flat(g.get(x.as_tensor()).expect("grad")))
        };
        for dtype in [DType::F64, DType::F32, DType::BF16, DType::F16] {
            let xd = x0.to_dtype(dtype).expect("cast");
            let on_gpu = xd.to_device(&gpu).expect("to gpu");
            let tol = match dtype {
                DType::F64 => 1e-10,
                DType::F32 => 2e-5,
                DType::F16 => 5e-3,
                _ => 3e-2,
            };
            for packed in [false, true] {
                let (ry, rg) = run(&xd.to_dtype(DType::F64).expect("f64"), packed);
                let (gy, gg) = run(&on_gpu, packed);
                for (what, got, want) in [("y", &gy, &ry), ("d qkv", &gg, &rg)] {
                    let big = want.iter().fold(0f64, |m, v| m.max(v.abs())).max(1e-30);
                    let err = got.iter().zip(want.iter()).fold(0f64, |m, (a, r)| {
                        if a.is_finite() {
                            m.max((a - r).abs() / big)
                        } else {
                            f64::INFINITY
                        }
                    });
                    assert!(
                        err <= tol,
                        "{dtype:?} b={b} h={heads}/{kv} t={t} d={d} packed={packed} {what}: error {err:e}"
                    );
                }
            }
        }
    }
}
