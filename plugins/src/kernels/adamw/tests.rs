use super::*;
use candle_core::Device;

/// Three steps from zero moments match the composite update in f64 and f32, with and
/// without decay and clipping.
#[test]
fn matches_the_composed_update() {
    let dev = Device::Cpu;
    let n = 40_003; // more than two work items, not a multiple of one
    let base = Tensor::arange(0f64, n as f64, &dev).expect("a");
    for dtype in [DType::F64, DType::F32] {
        for (wd, scale) in [(0.0, 1.0), (0.1, 0.37)] {
            let mut wf = (&base * 0.001)
                .and_then(|t| t.sin())
                .and_then(|t| t.to_dtype(dtype))
                .expect("w");
            let mut mf = wf.zeros_like().expect("m");
            let mut vf = wf.zeros_like().expect("v");
            let (mut wc, mut mc, mut vc) = (wf.clone(), mf.clone(), vf.clone());
            for t in 1..=3 {
                let g = (&base * (0.003 * t as f64))
                    .and_then(|x| x.cos())
                    .and_then(|x| x.to_dtype(dtype))
                    .expect("g");
                let s = AdamWStep {
                    beta1: 0.9,
                    beta2: 0.95,
                    bias_correction1: 1.0 - 0.9f64.powi(t),
                    bias_correction2: 1.0 - 0.95f64.powi(t),
                    eps: 1e-8,
                    lr: 3e-3,
                    weight_decay: wd,
                    grad_scale: scale,
                };
                (wf, mf, vf) = fused(&wf, &g, &mf, &vf, s).expect("fused");
                (wc, mc, vc) = composite::update(&wc, &g, &mc, &vc, s).expect("composite");
            }
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-6 };
            for (what, a, b) in [("w", &wf, &wc), ("m", &mf, &mc), ("v", &vf, &vc)] {
                let a: Vec<f64> = a.to_dtype(DType::F64).and_then(|t| t.to_vec1()).expect("a");
                let b: Vec<f64> = b.to_dtype(DType::F64).and_then(|t| t.to_vec1()).expect("b");
                for (i, (x, y)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (x - y).abs() <= tol * y.abs().max(1e-3),
                        "{dtype:?} wd {wd} {what}[{i}]: {x} vs {y}"
                    );
                }
            }
        }
    }
}

/// The scalars of a first step with decay `wd` (no clipping).
fn first_step(wd: f64) -> AdamWStep {
    AdamWStep {
        beta1: 0.9,
        beta2: 0.95,
        bias_correction1: 0.1,
        bias_correction2: 0.05,
        eps: 1e-8,
        lr: 1e-3,
        weight_decay: wd,
        grad_scale: 1.0,
    }
}

#[test]
fn mismatched_operands_are_refused() {
    let dev = Device::Cpu;
    let w = Tensor::zeros(4, DType::F32, &dev).expect("w");
    let g = Tensor::zeros(5, DType::F32, &dev).expect("g");
    let s = first_step(0.0);
    assert!(adamw_update(&w, &g, &w, &w, s).is_err());
    let g64 = Tensor::zeros(4, DType::F64, &dev).expect("g");
    assert!(!supports(&w, &g64, &w, &w));
}

#[test]
fn dispatch_follows_the_support_table() {
    let dev = Device::Cpu;
    let w = Tensor::new(&[1f32, -2.0, 0.5], &dev).expect("w");
    let s = first_step(0.1);
    assert!(supports(&w, &w, &w, &w));
    let half = w.to_dtype(DType::BF16).expect("bf16");
    assert!(!supports(&half, &half, &half, &half));
    assert!(fused(&half, &half, &half, &half, s).is_err());
    let (w2, _, _) = adamw_update(&half, &half, &half, &half, s).expect("composite");
    assert_eq!(w2.dtype(), DType::BF16);
}

#[test]
fn sums_of_squares_are_those_of_the_definition() {
    let dev = Device::Cpu;
    let a = Tensor::new(&[1f32, -2.0, 3.0], &dev).expect("a");
    let b = Tensor::new(&[[0.5f64, -1.5]], &dev).expect("b");
    let c = Tensor::new(&[3f32, 4.0], &dev)
        .and_then(|t| t.to_dtype(DType::BF16))
        .expect("c");
    // Mixed dtypes: composed.
    assert!(!sum_squares_supports(&[a.clone(), b.clone()]));
    assert_eq!(sum_squares(&[a, b, c]).expect("sums"), vec![14.0, 2.5, 25.0]);
    assert!(sum_squares(&[]).expect("none").is_empty());
    // Fused: several chunks, against the composite.
    let big: Vec<Tensor> = [100_003usize, 3]
        .iter()
        .map(|&n| Tensor::arange(0f32, n as f32, &dev).and_then(|t| (t * 1e-3)?.cos()))
        .collect::<Result<_>>()
        .expect("big");
    assert!(sum_squares_supports(&big));
    let (fused, composed) = (
        sum_squares(&big).expect("fused"),
        composite::sum_squares(&big).expect("composite"),
    );
    for (x, y) in fused.iter().zip(&composed) {
        assert!((x - y).abs() <= 1e-12 * y.abs(), "{x} vs {y}");
    }
}

/// A group step is the step of each of its parameters (on the CPU, one fused pass each).
#[test]
fn a_group_step_is_the_step_of_each_parameter() {
    let dev = Device::Cpu;
    let s = first_step(0.1);
    let make = |n: usize, seed: f64| {
        let x = Tensor::arange(0f64, n as f64, &dev).expect("x");
        (&x * seed).and_then(|t| t.sin()).expect("sin")
    };
    let params = [(make(5, 0.3), make(5, 0.7)), (make(11, 1.1), make(11, 0.2))];
    let mut grouped: Vec<(Var, Tensor, Tensor)> = params
        .iter()
        .map(|(w, _)| {
            (
                Var::from_tensor(w).expect("var"),
                w.zeros_like().expect("m"),
                w.zeros_like().expect("v"),
            )
        })
        .collect();
    let mut slots: Vec<AdamWSlot<'_>> = grouped
        .iter_mut()
        .zip(&params)
        .map(|((w, m, v), (_, g))| AdamWSlot { w: &*w, g, m, v })
        .collect();
    adamw_group_step(&mut slots, s).expect("group step");
    for ((w, m, v), (w0, g)) in grouped.iter().zip(&params) {
        let (m0, v0) = (w0.zeros_like().expect("m"), w0.zeros_like().expect("v"));
        let (w1, m1, v1) = adamw_update(w0, g, &m0, &v0, s).expect("single");
        for (a, b) in [(w.as_tensor(), &w1), (m, &m1), (v, &v1)] {
            let a: Vec<f64> = a.to_vec1().expect("a");
            assert_eq!(a, b.to_vec1::<f64>().expect("b"));
        }
    }
}

/// On the CPU the group step rewrites the parameter and both moments in place (the tensors the
/// optimizer holds stay the same tensors), while `adamw_update` leaves its inputs untouched.
#[test]
fn the_cpu_step_is_in_place_and_the_update_is_not() {
    let dev = Device::Cpu;
    let s = first_step(0.1);
    let w0 = Tensor::new(&[0.5f32, -1.0, 2.0], &dev).expect("w");
    let g = Tensor::new(&[0.1f32, 0.2, -0.3], &dev).expect("g");
    let (m0, v0) = (w0.zeros_like().expect("m"), w0.zeros_like().expect("v"));
    let (w1, m1, v1) = adamw_update(&w0, &g, &m0, &v0, s).expect("update");
    assert_eq!(w0.to_vec1::<f32>().expect("w0"), vec![0.5, -1.0, 2.0]);
    assert_eq!(m0.to_vec1::<f32>().expect("m0"), vec![0.0; 3]);
    let w = Var::from_tensor(&w0).expect("var");
    let (mut m, mut v) = (m0.copy().expect("m"), v0.copy().expect("v"));
    let (m_alias, v_alias) = (m.clone(), v.clone());
    adamw_step(&w, &g, &mut m, &mut v, s).expect("step");
    assert_eq!(m.id(), m_alias.id());
    for (a, b) in [(w.as_tensor(), &w1), (&m_alias, &m1), (&v_alias, &v1)] {
        assert_eq!(a.to_vec1::<f32>().expect("a"), b.to_vec1::<f32>().expect("b"));
    }
    assert!(m1.to_vec1::<f32>().expect("m1").iter().all(|x| *x != 0.0));
}
