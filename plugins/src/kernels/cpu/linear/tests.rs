use super::*;
use crate::kernels::test_util::values;
use candle_core::{DType, Device, Var};

fn assert_close(what: &str, a: &[f64], b: &[f64], tol: f64) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(1f64, |m, v| m.max(v.abs()));
    for (i, (u, v)) in a.iter().zip(b).enumerate() {
        assert!((u - v).abs() <= tol * scale, "{what}[{i}]: {u} vs {v}");
    }
}

/// Values and all three gradients against candle's `matmul` + `broadcast_add`, in f64
/// and f32, for a plain weight, a transposed (tied-head style) weight, and no bias; the
/// input is a strided view (a column slice) to exercise non-contiguous reads.
#[test]
fn matches_matmul_plus_bias_values_and_gradients() {
    let dev = Device::Cpu;
    let (rows, inp, out) = (37, 19, 23);
    let x_full = Tensor::arange(0f64, (rows * (inp + 3)) as f64, &dev)
        .and_then(|t| t.reshape((rows, inp + 3)))
        .and_then(|t| (t * 0.37)?.sin())
        .expect("x");
    let w0 = Tensor::arange(0f64, (inp * out) as f64, &dev)
        .and_then(|t| t.reshape((inp, out)))
        .and_then(|t| (t * 0.11)?.cos())
        .expect("w");
    let b0 = Tensor::arange(0f64, out as f64, &dev)
        .and_then(|t| (t * 0.7)?.sin())
        .expect("b");
    let c0 = Tensor::arange(0f64, (rows * out) as f64, &dev)
        .and_then(|t| t.reshape((rows, out)))
        .and_then(|t| (t * 0.05)?.cos())
        .expect("c");
    for dtype in [DType::F64, DType::F32] {
        for (transposed_w, with_bias) in [(false, true), (true, true), (false, false), (true, false)] {
            let run = |is_fused: bool| -> Vec<Vec<f64>> {
                let xv = Var::from_tensor(&x_full.to_dtype(dtype).expect("d")).expect("x");
                let x = xv.as_tensor().narrow(1, 2, inp).expect("narrow");
                // Transposed: the weight is stored [out, in] and used as `w.t()`.
                let wv = if transposed_w {
                    Var::from_tensor(
                        &w0.t()
                            .and_then(|t| t.contiguous())
                            .and_then(|t| t.to_dtype(dtype))
                            .expect("w"),
                    )
                } else {
                    Var::from_tensor(&w0.to_dtype(dtype).expect("w"))
                }
                .expect("w");
                let w = if transposed_w {
                    wv.as_tensor().t().expect("t")
                } else {
                    wv.as_tensor().clone()
                };
                let bv = Var::from_tensor(&b0.to_dtype(dtype).expect("b")).expect("b");
                let y = if is_fused {
                    linear(&x, &w, with_bias.then(|| bv.as_tensor())).expect("fused")
                } else {
                    let y = x.matmul(&w).expect("mm");
                    if with_bias {
                        y.broadcast_add(bv.as_tensor()).expect("add")
                    } else {
                        y
                    }
                };
                let g = (&y * c0.to_dtype(dtype).expect("d"))
                    .and_then(|l| l.sum_all())
                    .and_then(|l| l.backward())
                    .expect("bwd");
                let mut v = vec![
                    values(&y),
                    values(g.get(xv.as_tensor()).expect("dx")),
                    values(g.get(wv.as_tensor()).expect("dw")),
                ];
                if with_bias {
                    v.push(values(g.get(bv.as_tensor()).expect("db")));
                } else {
                    assert!(g.get(bv.as_tensor()).is_none(), "no bias, no gradient");
                }
                v
            };
            let (a, c) = (run(true), run(false));
            let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
            for (k, (p, q)) in a.iter().zip(&c).enumerate() {
                assert_close(
                    &format!("{dtype:?} transposed {transposed_w} bias {with_bias} out {k}"),
                    p,
                    q,
                    tol,
                );
            }
        }
    }
}

/// A `[2, 3, in]` input gives the rows of the `[6, in]` product, and its gradient comes
/// back in the input's shape.
#[test]
fn batched_input_folds_into_rows() {
    let dev = Device::Cpu;
    let x = Tensor::arange(0f32, 2.0 * 3.0 * 5.0, &dev)
        .and_then(|t| t.reshape((2, 3, 5)))
        .expect("x");
    let x = Var::from_tensor(&(x * 0.1).expect("s")).expect("var");
    let w = Tensor::arange(0f32, 5.0 * 4.0, &dev)
        .and_then(|t| t.reshape((5, 4)))
        .expect("w");
    let y = linear(x.as_tensor(), &w, None).expect("y");
    assert_eq!(y.dims(), [2, 3, 4]);
    let flat = x.as_tensor().reshape((6, 5)).and_then(|x| x.matmul(&w)).expect("mm");
    assert_close("values", &values(&y), &values(&flat), 1e-6);
    let g = y.sum_all().and_then(|l| l.backward()).expect("bwd");
    let dx = g.get(x.as_tensor()).expect("dx");
    assert_eq!(dx.dims(), [2, 3, 5]);
    let want = Tensor::ones((6, 4), DType::F32, &dev)
        .and_then(|o| o.matmul(&w.t()?))
        .expect("want");
    assert_close("dx", &values(dx), &values(&want), 1e-6);
}

/// Shapes that do not fit are refused with a message, not a panic.
#[test]
fn mismatched_shapes_are_errors() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 3), DType::F32, &dev).expect("x");
    let w = Tensor::zeros((5, 2), DType::F32, &dev).expect("w");
    let err = linear(&x, &w, None).expect_err("inner dims");
    assert!(err.to_string().contains("inner dims"), "{err}");
    let w = Tensor::zeros((3, 2), DType::F32, &dev).expect("w");
    let b = Tensor::zeros(3, DType::F32, &dev).expect("b");
    let err = linear(&x, &w, Some(&b)).expect_err("bias");
    assert!(err.to_string().contains("bias"), "{err}");
}

#[test]
fn supports_one_dtype_on_the_cpu() {
    let dev = Device::Cpu;
    let x = Tensor::zeros((4, 3), DType::F32, &dev).expect("x");
    let w = Tensor::zeros((3, 2), DType::F32, &dev).expect("w");
    let b = Tensor::zeros(2, DType::F64, &dev).expect("b");
    assert!(supports(&x, &w, None));
    assert!(!supports(&x, &w, Some(&b)));
    let h = |t: &Tensor| t.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&h(&x), &h(&w), None));
}

/// `linear_t` (weight `[out, in]` as the operand): values and gradients of a weight used twice
/// against `matmul` of `w.t()`, once with the gradients through candle and twice with a
/// leaf-gradient collector holding the weight: then candle's store has no gradient for it and
/// the buffer holds the sum of both uses, overwritten (not added to) at the next step.
#[test]
fn an_out_in_weight_gets_its_gradient_in_place_where_collected() {
    let dev = Device::Cpu;
    let (rows, inp, out) = (29, 13, 17);
    let data = |n: usize, f: f64| {
        Tensor::arange(0f64, n as f64, &dev)
            .and_then(|t| (t * f)?.sin())
            .expect("data")
    };
    let x1 = Var::from_tensor(&data(rows * inp, 0.31).reshape((rows, inp)).expect("x1")).expect("x1");
    let x2 = data(5 * inp, 0.17).reshape((5, inp)).expect("x2");
    let w = Var::from_tensor(&data(out * inp, 0.07).reshape((out, inp)).expect("w")).expect("w");
    let b = Var::from_tensor(&data(out, 0.5)).expect("b");
    let (c1, c2) = (
        data(rows * out, 0.05).reshape((rows, out)).expect("c1"),
        data(5 * out, 0.09).reshape((5, out)).expect("c2"),
    );
    let loss = |fused: bool| {
        let f = |x: &Tensor, bias: Option<&Tensor>| {
            if fused {
                linear_t(x, w.as_tensor(), bias)
            } else {
                let y = x.matmul(&w.as_tensor().t()?)?;
                match bias {
                    Some(b) => y.broadcast_add(b),
                    None => Ok(y),
                }
            }
        };
        let y1 = f(x1.as_tensor(), Some(b.as_tensor())).expect("y1");
        let y2 = f(&x2, None).expect("y2");
        ((&y1 * &c1).and_then(|l| l.sum_all()).expect("l1") + (&y2 * &c2).and_then(|l| l.sum_all()).expect("l2"))
            .expect("loss")
    };
    let want = loss(false).backward().expect("reference");
    let plain = loss(true).backward().expect("fused");
    for (what, t) in [("x", x1.as_tensor()), ("w", w.as_tensor()), ("b", b.as_tensor())] {
        let (a, r) = (plain.get(t).expect("fused grad"), want.get(t).expect("reference grad"));
        assert_close(what, &values(a), &values(r), 1e-12);
    }
    let collector = crate::kernels::leaf_grads::LeafGrads::new([w.as_tensor()]);
    for step in 0..2 {
        collector.clear();
        let store = collector.collecting(|| loss(true).backward()).expect("collected");
        assert!(
            store.get(w.as_tensor()).is_none(),
            "step {step}: w's gradient went to candle"
        );
        assert_close(
            "dx",
            &values(store.get(x1.as_tensor()).expect("dx")),
            &values(want.get(x1.as_tensor()).expect("x")),
            1e-12,
        );
        let dw = collector.take(w.as_tensor()).expect("collected dw");
        assert_close(
            &format!("step {step} dw"),
            &values(&dw),
            &values(want.get(w.as_tensor()).expect("w")),
            1e-12,
        );
    }
}

/// `t` rounded to bf16, as f64.
fn rounded(t: &Tensor) -> Tensor {
    t.to_dtype(DType::BF16)
        .and_then(|t| t.to_dtype(DType::F64))
        .expect("round")
}

/// bf16 products: the value and every gradient equal the f64 products of the bf16-rounded
/// factors (`y = b(x) b(W)^T + b`, `dx = b(dy) b(W)`, `dW = b(dy)^T b(x)`, `db = sum dy`), with
/// the gradients through candle and into a collected leaf buffer; shapes on and off the tile
/// blocks (32), a strided input.
#[test]
fn bf16_products_are_the_products_of_the_rounded_factors() {
    let dev = Device::Cpu;
    let data = |n: usize, f: f64| {
        Tensor::arange(0f64, n as f64, &dev)
            .and_then(|t| (t * f)?.sin())
            .and_then(|t| t.to_dtype(DType::F32))
            .expect("data")
    };
    for (rows, inp, out) in [(70, 45, 40), (64, 64, 96)] {
        let xv = Var::from_tensor(&data(rows * (inp + 2), 0.31).reshape((rows, inp + 2)).expect("x")).expect("x");
        let x = xv.as_tensor().narrow(1, 2, inp).expect("narrow");
        let w = Var::from_tensor(&data(out * inp, 0.07).reshape((out, inp)).expect("w")).expect("w");
        let b = Var::from_tensor(&data(out, 0.5)).expect("b");
        let c = data(rows * out, 0.05).reshape((rows, out)).expect("c");
        let loss = || {
            let y = linear_t_bf16(&x, w.as_tensor(), Some(b.as_tensor())).expect("y");
            let l = (&y * &c).and_then(|l| l.sum_all()).expect("loss");
            (y, l)
        };
        let (x64, w64, c64) = (rounded(&x), rounded(w.as_tensor()), rounded(&c));
        let b64 = b.as_tensor().to_dtype(DType::F64).expect("b");
        let want_y = x64
            .matmul(&w64.t().expect("t"))
            .and_then(|y| y.broadcast_add(&b64))
            .expect("y");
        let want_dx = c64.matmul(&w64).expect("dx");
        let want_dw = c64.t().and_then(|c| c.matmul(&x64)).expect("dw");
        let want_db = c.to_dtype(DType::F64).and_then(|c| c.sum(0)).expect("db");
        let (y, l) = loss();
        assert_close("y", &values(&y), &values(&want_y), 1e-6);
        let g = l.backward().expect("backward");
        let dx = g.get(xv.as_tensor()).expect("dx").narrow(1, 2, inp).expect("dx");
        assert_close("dx", &values(&dx), &values(&want_dx), 1e-6);
        assert_close(
            "dw",
            &values(g.get(w.as_tensor()).expect("dw")),
            &values(&want_dw),
            1e-6,
        );
        assert_close(
            "db",
            &values(g.get(b.as_tensor()).expect("db")),
            &values(&want_db),
            1e-6,
        );
        let collector = crate::kernels::leaf_grads::LeafGrads::new([w.as_tensor()]);
        let store = collector.collecting(|| loss().1.backward()).expect("collected");
        assert!(store.get(w.as_tensor()).is_none(), "w's gradient went to candle");
        let dw = collector.take(w.as_tensor()).expect("collected dw");
        assert_close("collected dw", &values(&dw), &values(&want_dw), 1e-6);
    }
}

#[test]
fn bf16_products_refuse_f64() {
    let x = Tensor::zeros((3, 4), DType::F64, &Device::Cpu).expect("x");
    let w = Tensor::zeros((5, 4), DType::F64, &Device::Cpu).expect("w");
    let err = linear_t_bf16(&x, &w, None).expect_err("f64").to_string();
    assert!(err.contains("bf16 products take f32"), "{err}");
}
