use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};

/// Values and both gradients against candle's `silu` times `u`, f64 (1e-10) and f32 (1e-5
/// relative to the largest magnitude), over gates from -30 to 30 (both saturations).
#[test]
fn matches_candle_silu_times_up() {
    let dev = Device::Cpu;
    let n = 40_001;
    let g0 = Tensor::arange(0f64, n as f64, &dev)
        .and_then(|t| (t / 666.0)? - 30.0)
        .expect("g");
    let u0 = Tensor::arange(0f64, n as f64, &dev)
        .and_then(|t| (t * 0.01)?.sin())
        .expect("u");
    let c0 = Tensor::arange(0f64, n as f64, &dev)
        .and_then(|t| (t * 0.003)?.cos())
        .expect("c");
    for dtype in [DType::F64, DType::F32] {
        let run = |is_fused: bool| -> Vec<Vec<f64>> {
            let g = Var::from_tensor(&g0.to_dtype(dtype).expect("d")).expect("g");
            let u = Var::from_tensor(&u0.to_dtype(dtype).expect("d")).expect("u");
            let y = if is_fused {
                fused(g.as_tensor(), u.as_tensor()).expect("fused")
            } else {
                composite::swiglu(g.as_tensor(), u.as_tensor()).expect("mul")
            };
            let grads = (&y * c0.to_dtype(dtype).expect("d"))
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            vec![
                values(&y),
                values(grads.get(g.as_tensor()).expect("dg")),
                values(grads.get(u.as_tensor()).expect("du")),
            ]
        };
        let (a, c) = (run(true), run(false));
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        for (k, (p, q)) in a.iter().zip(&c).enumerate() {
            let scale = q.iter().fold(1f64, |m, v| m.max(v.abs()));
            for (i, (x, y)) in p.iter().zip(q).enumerate() {
                assert!((x - y).abs() <= tol * scale, "{dtype:?} out {k}[{i}]: {x} vs {y}");
            }
        }
    }
    let e = swiglu(&g0, &g0.narrow(0, 0, 10).expect("n")).expect_err("shapes");
    assert!(e.to_string().contains("differ in shape"), "{e}");
}

#[test]
fn dispatch_follows_the_support_table() {
    let g = Tensor::new(&[-1f32, 0.5, 2.0], &Device::Cpu).expect("g");
    assert!(supports(&g, &g));
    assert!(!supports(&g, &g.to_dtype(DType::F64).expect("f64")));
    let half = g.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&half, &half));
    assert_eq!(swiglu(&half, &half).expect("composite").dtype(), DType::F16);
}
