use super::*;
use crate::kernels::test_util::values;
use candle_core::{Device, Var};
use rand::{Rng, SeedableRng};

fn logits(rows: usize, v: usize, seed: u64, dtype: DType) -> Tensor {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let x: Vec<f64> = (0..rows * v).map(|_| rng.random_range(-4.0..4.0)).collect();
    Tensor::from_vec(x, (2, rows / 2, v), &Device::Cpu)
        .and_then(|t| t.to_dtype(dtype))
        .expect("logits")
}

/// Weighted sum of per-token values (non-uniform token weights), with the gradient.
fn value_and_grad(f: impl Fn(&Tensor) -> Tensor, z: &Tensor) -> (Vec<f64>, Vec<f64>) {
    let (b, s, _) = z.dims3().expect("3d");
    let w: Vec<f64> = (0..b * s).map(|i| 0.5 + (i % 3) as f64).collect();
    weighted_value_and_grad(f, z, &w)
}

/// Per-token values of `f(z)` `[b, s]` and the gradient of `sum_r w_r f(z)_r` w.r.t. `z`.
fn weighted_value_and_grad(f: impl Fn(&Tensor) -> Tensor, z: &Tensor, w: &[f64]) -> (Vec<f64>, Vec<f64>) {
    let var = Var::from_tensor(z).expect("var");
    let per = f(var.as_tensor());
    let (b, s) = per.dims2().expect("2d");
    let w = Tensor::from_vec(w.to_vec(), (b, s), &Device::Cpu)
        .and_then(|w| w.to_dtype(per.dtype()))
        .expect("w");
    let loss = (per.clone() * w).and_then(|x| x.sum_all()).expect("loss");
    let g = loss.backward().expect("bwd");
    let grad = g.get(var.as_tensor()).expect("grad");
    let flat = |t: &Tensor| -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1())
            .expect("vec")
    };
    (flat(&per), flat(grad))
}

fn assert_close(what: &str, a: &[f64], b: &[f64], rel: f64) {
    let scale = b.iter().fold(0f64, |m, x| m.max(x.abs())).max(1e-30);
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!(
            (x - y).abs() <= rel * scale,
            "{what}[{i}]: fused {x} vs composite {y} (scale {scale})"
        );
    }
}

#[test]
fn matches_composite_values_and_gradients() {
    for kind in [
        Divergence::Forward,
        Divergence::Reverse,
        Divergence::Jsd(0.3),
        Divergence::Jsd(0.9),
    ] {
        for (t, v) in [(1.0, 37), (2.0, 1000), (0.7, 5)] {
            let zs = logits(6, v, 1, DType::F64);
            let zt = logits(6, v, 2, DType::F64);
            let (fv, fg) = value_and_grad(|z| fused(z, &zt, t, kind).expect("fused"), &zs);
            let (cv, cg) = value_and_grad(|z| composite::per_token(z, &zt, t, kind).expect("composite"), &zs);
            assert_close(&format!("{kind:?} T={t} V={v} value"), &fv, &cv, 1e-10);
            assert_close(&format!("{kind:?} T={t} V={v} grad"), &fg, &cg, 1e-10);
            // f32 (fast exp/ln) against the f64 composite.
            let (fv, fg) = value_and_grad(
                |z| fused(z, &zt.to_dtype(DType::F32).expect("f32"), t, kind).expect("fused"),
                &zs.to_dtype(DType::F32).expect("f32"),
            );
            assert_close(&format!("{kind:?} T={t} V={v} f32 value"), &fv, &cv, 1e-5);
            assert_close(&format!("{kind:?} T={t} V={v} f32 grad"), &fg, &cg, 1e-5);
        }
    }
}

#[test]
fn value_and_grad_without_autograd_match_backward() {
    for dtype in [DType::F32, DType::F64] {
        for kind in [
            Divergence::Forward,
            Divergence::Reverse,
            Divergence::Jsd(0.4),
            Divergence::SkewForward(0.3),
            Divergence::SkewReverse(0.7),
            Divergence::Tvd,
        ] {
            let zs = logits(8, 301, 5, dtype);
            let zt = logits(8, 301, 6, dtype);
            let w = Tensor::from_vec(
                (0..8).map(|i| 0.25 + i as f64).collect::<Vec<_>>(),
                (2, 4),
                &Device::Cpu,
            )
            .and_then(|w| w.to_dtype(dtype))
            .expect("w");
            let (d, g) = per_token_and_grad(&zs, &zt, 1.5, kind, &w).expect("direct");
            let var = Var::from_tensor(&zs).expect("var");
            let per = fused(var.as_tensor(), &zt, 1.5, kind).expect("per");
            let grads = (per.clone() * &w)
                .and_then(|x| x.sum_all())
                .and_then(|x| x.backward())
                .expect("bwd");
            let want = grads.get(var.as_tensor()).expect("grad");
            let tol = if dtype == DType::F32 { 1e-6 } else { 1e-12 };
            assert_close(&format!("{kind:?} {dtype:?} value"), &values(&d), &values(&per), tol);
            assert_close(&format!("{kind:?} {dtype:?} grad"), &values(&g), &values(want), tol);
        }
    }
}

#[test]
fn teacher_gets_no_gradient_and_equal_inputs_give_zero() {
    let zs = Var::from_tensor(&logits(4, 50, 3, DType::F32)).expect("v");
    let zt = Var::from_tensor(&logits(4, 50, 4, DType::F32)).expect("v");
    let g = fused(zs.as_tensor(), zt.as_tensor(), 2.0, Divergence::Forward)
        .and_then(|x| x.sum_all())
        .and_then(|x| x.backward())
        .expect("bwd");
    assert!(g.get(zs.as_tensor()).is_some());
    assert!(g.get(zt.as_tensor()).is_none());
    let same = fused(zt.as_tensor(), zt.as_tensor(), 1.0, Divergence::Reverse)
        .and_then(|x| x.abs())
        .and_then(|x| x.max_all())
        .and_then(|x| x.to_scalar::<f32>())
        .expect("same");
    assert!(same < 1e-6, "{same}");
}

#[test]
fn nan_logits_give_nan_and_masked_logits_are_zero_mass() {
    let mut x: Vec<f32> = (0..8).map(|i| i as f32 * 0.3).collect();
    let zt = Tensor::from_vec(x.clone(), (1, 1, 8), &Device::Cpu).expect("t");
    x[3] = f32::NAN;
    let zs = Tensor::from_vec(x.clone(), (1, 1, 8), &Device::Cpu).expect("t");
    // A NaN on either side gives a NaN divergence.
    for kind in all_kinds() {
        for (s, t) in [(&zs, &zt), (&zt, &zs)] {
            let d = fused(s, t, 1.0, kind).expect("d");
            let d = d.flatten_all().and_then(|d| d.to_vec1::<f32>()).expect("v")[0];
            assert!(d.is_nan(), "{kind:?}: {d}");
        }
    }
    // A vocabulary entry masked to -inf on both sides carries no mass and no NaN.
    x[3] = f32::NEG_INFINITY;
    let zs = Tensor::from_vec(x, (1, 1, 8), &Device::Cpu).expect("t");
    for kind in all_kinds() {
        let d = fused(&zs, &zs, 1.0, kind).expect("d");
        let d = d.flatten_all().and_then(|d| d.to_vec1::<f32>()).expect("v")[0];
        assert!(d.abs() < 1e-6, "{kind:?}: {d}");
    }
}

#[test]
fn dispatch_follows_the_support_table() {
    let zs = logits(4, 20, 7, DType::F32);
    let zt = logits(4, 20, 8, DType::F64);
    // The teacher's dtype does not matter: it is cast to the student's.
    assert!(supports(&zs, &zt));
    let half = zs.to_dtype(DType::F16).expect("f16");
    assert!(!supports(&half, &zt));
    let want = values(&fused(&zs, &zt, 2.0, Divergence::Jsd(0.5)).expect("fused"));
    let got = values(&per_token(&half, &zt, 2.0, Divergence::Jsd(0.5)).expect("composite"));
    for (a, b) in got.iter().zip(&want) {
        assert!((a - b).abs() < 1e-2, "{a} vs {b}");
    }
    let err = per_token(&zs, &zt.narrow(2, 0, 5).expect("n"), 1.0, Divergence::Forward).expect_err("shapes");
    assert!(err.to_string().contains("differ in shape"), "{err}");
}

/// Every kind, the skew KLs and JSD at a few interior parameters.
fn all_kinds() -> Vec<Divergence> {
    let mut kinds = vec![
        Divergence::Forward,
        Divergence::Reverse,
        Divergence::Jsd(0.5),
        Divergence::Tvd,
    ];
    kinds.extend(skew_kinds());
    kinds
}

/// Both skew KLs at alpha 0.05, 0.5 and 0.9.
fn skew_kinds() -> Vec<Divergence> {
    [0.05, 0.5, 0.9]
        .into_iter()
        .flat_map(|a| [Divergence::SkewForward(a), Divergence::SkewReverse(a)])
        .collect()
}

/// The kinds without an AVX-512 row: both skew KLs and TVD.
fn generic_row_kinds() -> Vec<Divergence> {
    let mut kinds = skew_kinds();
    kinds.push(Divergence::Tvd);
    kinds
}

/// Student and teacher logits `[2, rows / 2, v]` in f64, the student's second row equal to the
/// teacher's.
fn logits_with_equal_row(rows: usize, v: usize, seed: u64) -> (Tensor, Tensor) {
    let zt = logits(rows, v, seed + 1, DType::F64);
    let mut zs = values(&logits(rows, v, seed, DType::F64));
    zs[v..2 * v].copy_from_slice(&values(&zt)[v..2 * v]);
    let zs = Tensor::from_vec(zs, zt.shape(), &Device::Cpu).expect("zs");
    (zs, zt)
}

#[test]
fn skew_and_tvd_match_composite_values_and_gradients() {
    // Zero weights on some rows; row 1 has student == teacher.
    let w = [1.5, 0.0, 2.0, 0.5, 0.0, 3.0];
    for kind in generic_row_kinds() {
        for (t, v) in [(1.0, 37), (2.5, 1000)] {
            let (zs, zt) = logits_with_equal_row(6, v, 11);
            let what = format!("{kind:?} T={t} V={v}");
            let composite = |z: &Tensor| composite::per_token(z, &zt, t, kind).expect("composite");
            let (cv, cg) = weighted_value_and_grad(composite, &zs, &w);
            let (fv, fg) = weighted_value_and_grad(|z| fused(z, &zt, t, kind).expect("fused"), &zs, &w);
            assert_close(&format!("{what} value"), &fv, &cv, 1e-10);
            assert_close(&format!("{what} grad"), &fg, &cg, 1e-10);
            let zt32 = zt.to_dtype(DType::F32).expect("f32");
            let f32_fused = |z: &Tensor| fused(z, &zt32, t, kind).expect("fused");
            let (fv, fg) = weighted_value_and_grad(f32_fused, &zs.to_dtype(DType::F32).expect("f32"), &w);
            assert_close(&format!("{what} f32 value"), &fv, &cv, 1e-5);
            assert_close(&format!("{what} f32 grad"), &fg, &cg, 1e-5);
            // The zero-weight rows get no gradient; student == teacher gives D = 0.
            assert!(fv[1].abs() < 1e-6 && cv[1].abs() < 1e-12, "{what}: {} {}", fv[1], cv[1]);
        }
    }
}

/// `x` with the entries `masked[r]` of each row `r` (width `v`) set to -inf.
fn mask_rows(mut x: Vec<f64>, v: usize, masked: &[&[usize]]) -> Vec<f64> {
    for (r, cols) in masked.iter().enumerate() {
        for &c in *cols {
            x[r * v + c] = f64::NEG_INFINITY;
        }
    }
    x
}

/// Row `r` (width `v`) of `x` without the entries `masked`, as `[1, 1, kept]`.
fn kept_row(x: &[f64], v: usize, r: usize, masked: &[usize]) -> Tensor {
    let kept: Vec<f64> = (0..v).filter(|c| !masked.contains(c)).map(|c| x[r * v + c]).collect();
    let n = kept.len();
    Tensor::from_vec(kept, (1, 1, n), &Device::Cpu).expect("kept")
}

#[test]
fn masked_vocabulary_matches_composite_without_the_masked_entries() {
    // Entries at -inf on both sides are the same divergence as the vocabulary without them;
    // the composite (NaN at -inf entries: `0 * -inf`) runs on the kept entries of each row.
    let (v, t) = (40, 1.7);
    let masked: [&[usize]; 4] = [&[3, 17], &[0, 39], &[], &[5, 6, 7]];
    let w = [0.7, 0.0, 1.3, 2.0];
    let (zs, zt) = logits_with_equal_row(4, v, 21);
    let zs = mask_rows(values(&zs), v, &masked);
    let zt = mask_rows(values(&zt), v, &masked);
    for kind in all_kinds() {
        let mut want = (vec![], vec![]);
        for (r, cols) in masked.iter().enumerate() {
            let zt = kept_row(&zt, v, r, cols);
            let composite = |z: &Tensor| composite::per_token(z, &zt, t, kind).expect("composite");
            let (cv, cg) = weighted_value_and_grad(composite, &kept_row(&zs, v, r, cols), &[w[r]]);
            let mut cg = cg.into_iter();
            want.0.extend(cv);
            want.1.extend((0..v).map(|c| {
                if cols.contains(&c) {
                    0.0
                } else {
                    cg.next().unwrap_or(f64::NAN)
                }
            }));
        }
        for (dtype, tol) in [(DType::F64, 1e-10), (DType::F32, 1e-5)] {
            let tensor = |x: &[f64]| {
                Tensor::from_vec(x.to_vec(), (2, 2, v), &Device::Cpu)
                    .and_then(|x| x.to_dtype(dtype))
                    .expect("logits")
            };
            let teacher = tensor(&zt);
            let (fv, fg) = weighted_value_and_grad(|z| fused(z, &teacher, t, kind).expect("fused"), &tensor(&zs), &w);
            assert_close(&format!("{kind:?} {dtype:?} masked value"), &fv, &want.0, tol);
            assert_close(&format!("{kind:?} {dtype:?} masked grad"), &fg, &want.1, tol);
            for (r, cols) in masked.iter().enumerate() {
                for &c in *cols {
                    assert_eq!(fg[r * v + c], 0.0, "{kind:?} {dtype:?}: masked grad[{r}, {c}]");
                }
            }
        }
    }
}

#[test]
fn skew_and_tvd_gradients_match_finite_differences() {
    // Rows: plain; the teacher at -inf in one entry; the student at -inf in one entry (both
    // finite divergences for skew KL and TVD); both at -inf in one entry.
    let (v, t) = (9, 1.7);
    let zs = mask_rows(values(&logits(4, v, 31, DType::F64)), v, &[&[], &[], &[4], &[0]]);
    let zt = mask_rows(values(&logits(4, v, 32, DType::F64)), v, &[&[], &[2], &[], &[0]]);
    let w = [1.0, 0.5, 2.0, 1.5];
    let zt = Tensor::from_vec(zt, (2, 2, v), &Device::Cpu).expect("zt");
    for kind in generic_row_kinds() {
        let loss = |x: &[f64]| -> f64 {
            let z = Tensor::from_vec(x.to_vec(), (2, 2, v), &Device::Cpu).expect("z");
            let d = values(&fused(&z, &zt, t, kind).expect("fused"));
            d.iter().zip(&w).map(|(d, w)| d * w).sum()
        };
        let z = Tensor::from_vec(zs.clone(), (2, 2, v), &Device::Cpu).expect("z");
        let (d, g) = weighted_value_and_grad(|z| fused(z, &zt, t, kind).expect("fused"), &z, &w);
        assert!(d.iter().all(|d| d.is_finite() && *d > 0.0), "{kind:?}: {d:?}");
        for i in 0..zs.len() {
            if !zs[i].is_finite() {
                assert_eq!(g[i], 0.0, "{kind:?}: grad[{i}] at a -inf logit");
                continue;
            }
            let h = 1e-6;
            let (mut up, mut down) = (zs.clone(), zs.clone());
            up[i] += h;
            down[i] -= h;
            let num = (loss(&up) - loss(&down)) / (2.0 * h);
            assert!(
                (num - g[i]).abs() < 1e-8,
                "{kind:?} grad[{i}]: fused {} vs numeric {num}",
                g[i]
            );
        }
    }
}

#[test]
fn skew_at_alpha_zero_is_kl_and_alpha_one_is_refused() {
    let zs = logits(4, 30, 41, DType::F64);
    let zt = logits(4, 30, 42, DType::F64);
    let kind_of = |kind| prepare(&zs, &zt, 1.5, kind).map(|(_, _, op)| op.kind);
    for (skew, kl) in [
        (Divergence::SkewForward(0.0), Divergence::Forward),
        (Divergence::SkewForward(-0.2), Divergence::Forward),
        (Divergence::SkewReverse(0.0), Divergence::Reverse),
    ] {
        assert_eq!(kind_of(skew).expect("kind"), kl);
        let (a, b) = (
            fused(&zs, &zt, 1.5, skew).expect("skew"),
            fused(&zs, &zt, 1.5, kl).expect("kl"),
        );
        assert_eq!(values(&a), values(&b), "{skew:?}");
    }
    assert_eq!(
        kind_of(Divergence::SkewForward(0.3)).expect("kind"),
        Divergence::SkewForward(0.3)
    );
    for bad in [
        Divergence::SkewForward(1.0),
        Divergence::SkewReverse(1.5),
        Divergence::SkewReverse(f64::NAN),
    ] {
        let err = per_token(&zs, &zt, 1.0, bad).expect_err("alpha >= 1");
        assert!(err.to_string().contains("alpha"), "{bad:?}: {err}");
    }
}

#[test]
fn only_forward_reverse_and_jsd_reach_the_avx512_rows() {
    use super::cpu::Avx512Kind;
    assert_eq!(Avx512Kind::of(Divergence::Forward), Some(Avx512Kind::Forward));
    assert_eq!(Avx512Kind::of(Divergence::Reverse), Some(Avx512Kind::Reverse));
    assert_eq!(Avx512Kind::of(Divergence::Jsd(0.25)), Some(Avx512Kind::Jsd(0.25)));
    for kind in generic_row_kinds() {
        assert_eq!(Avx512Kind::of(kind), None, "{kind:?}");
    }
}
