use super::*;
use crate::kernels::attention::causal_attention_packed;
use crate::kernels::gelu::gelu;
use crate::kernels::layer_norm::layer_norm;
use crate::kernels::softmax::causal_mask;
use crate::kernels::test_util::values;
use candle_core::{DType, Device, Var};
use rand::{Rng, SeedableRng};

/// The block composed of the separate kernels (each tested against candle's ops).
fn composite(x: &Tensor, p: &BlockParams, heads: usize, eps: f64) -> Tensor {
    let (_, t, d) = x.dims3().expect("x");
    let scale = 1.0 / ((d / heads) as f64).sqrt();
    let linear = |x: &Tensor, wb: (&Tensor, &Tensor)| crate::kernels::cpu::linear::linear(x, wb.0, Some(wb.1));
    let mask = causal_mask(t, x.dtype(), x.device()).expect("mask");
    let h = layer_norm(x, p.ln_1.0, p.ln_1.1, eps).expect("ln1");
    let qkv = linear(&h, p.c_attn).expect("qkv");
    let y = causal_attention_packed(&qkv, heads, heads, scale, &mask).expect("attn");
    let x1 = (x + linear(&y, p.attn_proj).expect("proj")).expect("res");
    let h2 = layer_norm(&x1, p.ln_2.0, p.ln_2.1, eps).expect("ln2");
    let u = gelu(&linear(&h2, p.c_fc).expect("fc")).expect("gelu");
    (x1 + linear(&u, p.mlp_proj).expect("mlp")).expect("res")
}

/// The fused block against the composite: output, `dx` and all twelve parameter gradients
/// (1e-10 relative in f64, 1e-4 in f32 where the two sum in different orders), with a
/// second backward through the same graph.
#[test]
fn matches_the_composed_block_values_and_every_gradient() {
    let (b, t, d, heads, f) = (2, 7, 12, 3, 20);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut rand = |shape: &[usize], s: f64| -> Tensor {
        let n: usize = shape.iter().product();
        let v: Vec<f64> = (0..n).map(|_| rng.random_range(-s..s)).collect();
        Tensor::from_vec(v, shape, &Device::Cpu).expect("t")
    };
    let p0: Vec<Tensor> = param_shapes(d, f)
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let t = rand(s, 0.5);
            // LayerNorm weights around 1.
            if i == 0 || i == 6 {
                (t + 1.0).expect("w")
            } else {
                t
            }
        })
        .collect();
    let x0 = rand(&[b, t, d], 1.5);
    let c0 = rand(&[b, t, d], 1.0);
    for dtype in [DType::F64, DType::F32] {
        let run = |is_fused: bool| -> Vec<Vec<f64>> {
            let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("x");
            let vars: Vec<Var> = p0
                .iter()
                .map(|p| Var::from_tensor(&p.to_dtype(dtype).expect("d")).expect("v"))
                .collect();
            let v = |i: usize| vars[i].as_tensor();
            let params = BlockParams {
                ln_1: (v(0), v(1)),
                c_attn: (v(2), v(3)),
                attn_proj: (v(4), v(5)),
                ln_2: (v(6), v(7)),
                c_fc: (v(8), v(9)),
                mlp_proj: (v(10), v(11)),
            };
            let out = if is_fused {
                gpt2_block(x.as_tensor(), &params, heads, 1e-5).expect("fused")
            } else {
                composite(x.as_tensor(), &params, heads, 1e-5)
            };
            let loss = (&out * c0.to_dtype(dtype).expect("d"))
                .and_then(|l| l.sum_all())
                .expect("loss");
            let g = loss.backward().expect("bwd");
            let again = loss.backward().expect("second bwd");
            assert_eq!(values(g.get(v(8)).expect("g")), values(again.get(v(8)).expect("g")));
            let mut all = vec![values(&out), values(g.get(x.as_tensor()).expect("dx"))];
            all.extend((0..12).map(|i| values(g.get(v(i)).unwrap_or_else(|| panic!("no gradient for parameter {i}")))));
            all
        };
        let (fu, co) = (run(true), run(false));
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-4 };
        for (k, (p, q)) in fu.iter().zip(&co).enumerate() {
            let scale = q.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
            for (i, (a, c)) in p.iter().zip(q).enumerate() {
                assert!(
                    (a - c).abs() <= tol * scale,
                    "{dtype:?} output {k} [{i}]: fused {a} vs composite {c}"
                );
            }
        }
    }
}

/// Without anything to differentiate, nothing is kept, and a wrong shape is an error.
#[test]
fn inference_keeps_nothing_and_shapes_are_checked() {
    let dev = Device::Cpu;
    let d = 8;
    let z = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev).expect("z");
    let ones = Tensor::ones(d, DType::F32, &dev).expect("1");
    let (qa, ba, pa, bp, fa, bf, ma, bm) = (
        z(&[d, 3 * d]),
        z(&[3 * d]),
        z(&[d, d]),
        z(&[d]),
        z(&[d, 16]),
        z(&[16]),
        z(&[16, d]),
        z(&[d]),
    );
    let params = BlockParams {
        ln_1: (&ones, &bp),
        c_attn: (&qa, &ba),
        attn_proj: (&pa, &bp),
        ln_2: (&ones, &bp),
        c_fc: (&fa, &bf),
        mlp_proj: (&ma, &bm),
    };
    let x = Tensor::arange(0f32, (2 * 3 * d) as f32, &dev)
        .and_then(|t| t.reshape((2, 3, d)))
        .expect("x");
    // Zero weights: the block is the identity on the residual stream.
    let y = gpt2_block(&x, &params, 2, 1e-5).expect("block");
    assert_eq!(values(&y), values(&x));
    let err = gpt2_block(&x, &params, 3, 1e-5).expect_err("heads");
    assert!(err.to_string().contains("heads"), "{err}");
    let bad = BlockParams {
        c_attn: (&pa, &ba),
        ..params
    };
    let err = gpt2_block(&x, &bad, 2, 1e-5).expect_err("shape");
    assert!(err.to_string().contains("parameter 2"), "{err}");
}
