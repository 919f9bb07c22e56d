use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};

#[test]
fn matches_broadcast_add_values_and_gradients() {
    let dev = Device::Cpu;
    let x0 = Tensor::arange(0f64, 3.0 * 700.0 * 5.0, &dev)
        .and_then(|t| t.reshape((3, 700, 5)))
        .and_then(|t| t.sin())
        .expect("x");
    let b0 = Tensor::new(&[0.5f64, -1.0, 2.0, 0.0, 3.0], &dev).expect("b");
    let c0 = x0.cos().expect("c");
    for dtype in [DType::F64, DType::F32] {
        let run = |is_fused: bool| -> Vec<Vec<f64>> {
            let x = Var::from_tensor(&x0.to_dtype(dtype).expect("d")).expect("x");
            let b = Var::from_tensor(&b0.to_dtype(dtype).expect("d")).expect("b");
            let y = if is_fused {
                fused(x.as_tensor(), b.as_tensor()).expect("fused")
            } else {
                composite::add_bias(x.as_tensor(), b.as_tensor()).expect("composite")
            };
            let g = (&y * c0.to_dtype(dtype).expect("d"))
                .and_then(|l| l.sum_all())
                .and_then(|l| l.backward())
                .expect("bwd");
            vec![
                values(&y),
                values(g.get(x.as_tensor()).expect("dx")),
                values(g.get(b.as_tensor()).expect("db")),
            ]
        };
        let (a, c) = (run(true), run(false));
        let tol = if dtype == DType::F64 { 1e-10 } else { 1e-5 };
        for (k, (p, q)) in a.iter().zip(&c).enumerate() {
            let scale = q.iter().fold(1f64, |m, v| m.max(v.abs()));
            for (i, (u, v)) in p.iter().zip(q).enumerate() {
                assert!((u - v).abs() <= tol * scale, "{dtype:?} out {k}[{i}]: {u} vs {v}");
            }
        }
    }
}

#[test]
fn dispatch_follows_the_support_table() {
    let x = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).expect("x");
    let b = Tensor::new(&[0.5f32, -1.0], &Device::Cpu).expect("b");
    assert!(supports(&x, &b));
    let b64 = b.to_dtype(DType::F64).expect("f64");
    assert!(!supports(&x, &b64));
    let half = (
        x.to_dtype(DType::F16).expect("f16"),
        b.to_dtype(DType::F16).expect("f16"),
    );
    assert!(!supports(&half.0, &half.1));
    let y = add_bias(&half.0, &half.1)
        .and_then(|y| y.to_dtype(DType::F32))
        .and_then(|y| y.to_vec2::<f32>())
        .expect("composite");
    assert_eq!(y, vec![vec![1.5, 1.0], vec![3.5, 3.0]]);
}
