//! The reference side of the emulated kernels' tests: a CPU op's per-row values and its
//! gradient, weighted per row, through candle's autograd in f64.

use candle_core::{Device, Result, Tensor, Var};

use crate::kernels::test_util::values;

/// `(f(z) [rows], d(sum_r w_r f(z)_r)/dz)` of `f` on `z` `[rows, v]` (f64 on the CPU).
pub(crate) fn value_and_grad(
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    z: &[f64],
    rows: usize,
    w: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let z = Tensor::from_vec(z.to_vec(), (rows, z.len() / rows.max(1)), &Device::Cpu).expect("z");
    let var = Var::from_tensor(&z).expect("var");
    let out = f(var.as_tensor()).expect("reference op");
    let w = Tensor::from_vec(w.to_vec(), rows, &Device::Cpu).expect("w");
    let loss = (&out * &w).and_then(|x| x.sum_all()).expect("weighted sum");
    let grads = loss.backward().expect("backward");
    let g = grads.get(var.as_tensor()).expect("a gradient");
    (values(&out), values(g))
}

/// Row weights in `[0.5, 1.5)`, every third row 0 (a masked token).
pub(crate) fn row_weights(rows: usize, seed: u64) -> Vec<f64> {
    super::noise(rows, seed, 1.0)
        .iter()
        .enumerate()
        .map(|(i, x)| if i % 3 == 1 { 0.0 } else { 0.5 + x.abs() })
        .collect()
}
