//! The reference side of the emulated kernels' tests: a CPU op's values and the gradients of
//! every input, through candle's autograd in f64.

use candle_core::{Device, Result, Tensor, Var};

/// The reference of a kernel's forward and backward, on the CPU in f64: `f(inputs)` and the
/// gradients `d sum(f(inputs) * gy) / d input` of every input (`(values, shape)` each).
pub(crate) fn reference(
    f: &dyn Fn(&[Tensor]) -> Result<Tensor>,
    inputs: &[(&[f64], &[usize])],
    gy: &[f64],
) -> (Vec<f64>, Vec<Vec<f64>>) {
    let vars: Vec<Var> = inputs
        .iter()
        .map(|(v, shape)| Var::from_vec(v.to_vec(), *shape, &Device::Cpu).expect("input"))
        .collect();
    let tensors: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&tensors).expect("reference forward");
    let g = Tensor::from_vec(gy.to_vec(), y.shape(), &Device::Cpu).expect("gy");
    let grads = (&y * &g)
        .and_then(|p| p.sum_all())
        .and_then(|l| l.backward())
        .expect("reference backward");
    let flat = |t: &Tensor| t.flatten_all().and_then(|t| t.to_vec1::<f64>()).expect("values");
    let dx = tensors
        .iter()
        .map(|t| grads.get(t).map(flat).unwrap_or_else(|| vec![0.0; t.elem_count()]))
        .collect();
    (flat(&y), dx)
}

/// `(f(z) [rows], d(sum_r w_r f(z)_r)/dz)` of `f` on `z` `[rows, v]` (f64 on the CPU): the
/// [`reference`] of a per-row op of one input, weighted per row.
pub(crate) fn value_and_grad(
    f: &dyn Fn(&Tensor) -> Result<Tensor>,
    z: &[f64],
    rows: usize,
    w: &[f64],
) -> (Vec<f64>, Vec<f64>) {
    let shape = [rows, z.len() / rows.max(1)];
    let (values, mut grads) = reference(&|x| f(&x[0]), &[(z, &shape)], w);
    (values, grads.remove(0))
}

/// Row weights in `[0.5, 1.5)`, every third row 0 (a masked token).
pub(crate) fn row_weights(rows: usize, seed: u64) -> Vec<f64> {
    super::noise(rows, seed, 1.0)
        .iter()
        .enumerate()
        .map(|(i, x)| if i % 3 == 1 { 0.0 } else { 0.5 + x.abs() })
        .collect()
}
