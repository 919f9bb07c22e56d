//! Running an op: its inputs placed on the device in the dtype under test, its outputs, and
//! the gradients of `L = sum_o sum(c_o * out_o)` (seeded cotangents `c_o`, see
//! [`cotangents`]) w.r.t. its differentiable inputs by candle's backward; and the reference:
//! the same on those inputs cast to f64, compared with a result by chunks of rows where the op
//! is row-wise (the largest cases' f64 graph would not fit at once).

use candle_core::{bail, DType, Device, Result, Tensor, Var};

use super::cases::{Input, Op, OpFn, Role};
use super::compare::{measure, ErrorStat};
use super::inputs::row_weights;

/// Elements of the first input per chunk of the reference.
const CHUNK_ELEMS: usize = 1 << 24;

/// An op's inputs on one device in one dtype; the differentiable ones are variables.
pub struct Placed {
    /// The inputs, in the op's order.
    pub tensors: Vec<Tensor>,
    roles: Vec<Role>,
}

impl Placed {
    /// `inputs` on `device`, floats cast to `dtype`, ids as they are.
    pub fn new(inputs: &[Input], device: &Device, dtype: DType) -> Result<Self> {
        let tensors = inputs
            .iter()
            .map(|i| prepare(&i.host.to_device(device)?, i.role, dtype))
            .collect::<Result<_>>()?;
        Ok(Self {
            tensors,
            roles: inputs.iter().map(|i| i.role).collect(),
        })
    }

    /// These inputs cast to f64 (rows `rows` of each where given: `(start, len)` of dim 0).
    pub fn reference(&self, rows: Option<(usize, usize)>) -> Result<Self> {
        let tensors = self
            .tensors
            .iter()
            .zip(&self.roles)
            .map(|(t, &role)| prepare(&slice(t, rows)?, role, DType::F64))
            .collect::<Result<_>>()?;
        Ok(Self {
            tensors,
            roles: self.roles.clone(),
        })
    }

    /// The differentiable inputs.
    fn grad_inputs(&self) -> impl Iterator<Item = &Tensor> {
        self.tensors
            .iter()
            .zip(&self.roles)
            .filter(|(_, &r)| r == Role::Grad)
            .map(|(t, _)| t)
    }
}

/// `t` as an input of `role`: cast to `dtype` unless ids, a fresh variable if differentiable.
fn prepare(t: &Tensor, role: Role, dtype: DType) -> Result<Tensor> {
    match role {
        Role::Index => Ok(t.clone()),
        Role::Const => t.to_dtype(dtype),
        Role::Grad => Ok(Var::from_tensor(&t.detach().to_dtype(dtype)?)?.into_inner()),
    }
}

/// Rows `(start, len)` of `t` (all of it for `None`).
fn slice(t: &Tensor, rows: Option<(usize, usize)>) -> Result<Tensor> {
    match rows {
        Some((start, len)) => t.narrow(0, start, len),
        None => Ok(t.clone()),
    }
}

/// An op's outputs and the gradients of its differentiable inputs (none if it has none).
pub struct Outcome {
    /// The outputs.
    pub values: Vec<Tensor>,
    /// `dL/dx` per differentiable input, in order.
    pub grads: Vec<Tensor>,
}

/// `f` on `x`, and the gradients of `sum_o sum(cot_o * out_o)` w.r.t. its differentiable inputs.
pub fn evaluate(f: &OpFn, x: &Placed, cot: &[Tensor]) -> Result<Outcome> {
    let values = f(&x.tensors)?;
    if x.grad_inputs().next().is_none() {
        return Ok(Outcome { values, grads: vec![] });
    }
    if cot.len() != values.len() {
        bail!("{} outputs and {} cotangents", values.len(), cot.len())
    }
    let Some(first) = values.first() else {
        bail!("the op returned no outputs")
    };
    let mut loss = Tensor::zeros((), first.dtype(), first.device())?;
    for (v, c) in values.iter().zip(cot) {
        loss = (loss + (v * c)?.sum_all()?)?;
    }
    let store = loss.backward()?;
    let grads = x
        .grad_inputs()
        .enumerate()
        .map(|(i, t)| match store.get(t) {
            Some(g) => Ok(g.clone()),
            None => bail!("no gradient reached differentiable input {i}"),
        })
        .collect::<Result<_>>()?;
    Ok(Outcome { values, grads })
}

/// Seeded cotangents of `outputs` in `dtype` on their device: per-row weights in `[0, 1]`, a
/// quarter of the rows zero (a row: one element where `per_token`, else the last dim).
pub fn cotangents(outputs: &[Tensor], per_token: bool, dtype: DType) -> Result<Vec<Tensor>> {
    outputs
        .iter()
        .enumerate()
        .map(|(i, out)| {
            let row_len = if per_token {
                1
            } else {
                out.dims().last().copied().unwrap_or(1)
            };
            row_weights(out.dims(), row_len, 100 + i as u64)?
                .to_device(out.device())?
                .to_dtype(dtype)
        })
        .collect()
}

/// The errors of `fused` (the op's outputs and gradients on `x`) against the op's reference on
/// `x` cast to f64: `(values, grads)`, one stat per output and per differentiable input.
pub fn against_reference(
    op: &Op,
    x: &Placed,
    cot: &[Tensor],
    fused: &Outcome,
) -> Result<(Vec<ErrorStat>, Vec<ErrorStat>)> {
    against_reference_by(op, x, cot, fused, CHUNK_ELEMS)
}

/// [`against_reference`] in chunks of about `budget` elements of the first input.
fn against_reference_by(
    op: &Op,
    x: &Placed,
    cot: &[Tensor],
    fused: &Outcome,
    budget: usize,
) -> Result<(Vec<ErrorStat>, Vec<ErrorStat>)> {
    let mut values: Vec<ErrorStat> = Vec::new();
    let mut grads: Vec<ErrorStat> = Vec::new();
    for rows in chunks(op, x, budget)? {
        let xr = x.reference(rows)?;
        let cr = cot
            .iter()
            .map(|c| slice(c, rows)?.to_dtype(DType::F64))
            .collect::<Result<Vec<_>>>()?;
        let r = evaluate(&op.reference, &xr, &cr)?;
        let v = measure_all(&fused.values, &r.values, rows)?;
        let g = measure_all(&fused.grads, &r.grads, rows)?;
        values = merge(values, v);
        grads = merge(grads, g);
    }
    Ok((values, grads))
}

/// The row ranges the reference runs on: chunks of about `budget` elements of the first input
/// where the op is row-wise, else all of it at once (`[None]`).
fn chunks(op: &Op, x: &Placed, budget: usize) -> Result<Vec<Option<(usize, usize)>>> {
    let Some(first) = x.tensors.first().filter(|_| op.rowwise) else {
        return Ok(vec![None]);
    };
    let rows = first.dim(0)?;
    let per_row = (first.elem_count() / rows.max(1)).max(1);
    let step = (budget / per_row).max(1);
    if step >= rows {
        return Ok(vec![None]);
    }
    Ok((0..rows).step_by(step).map(|s| Some((s, step.min(rows - s)))).collect())
}

/// The error of each of `xs` (rows `rows`) against its reference.
fn measure_all(xs: &[Tensor], refs: &[Tensor], rows: Option<(usize, usize)>) -> Result<Vec<ErrorStat>> {
    if xs.len() != refs.len() {
        bail!("{} results against {} references", xs.len(), refs.len())
    }
    xs.iter().zip(refs).map(|(x, r)| measure(&slice(x, rows)?, r)).collect()
}

/// `acc` merged element by element with `next` (`next` itself when `acc` is empty).
fn merge(acc: Vec<ErrorStat>, next: Vec<ErrorStat>) -> Vec<ErrorStat> {
    if acc.is_empty() {
        return next;
    }
    acc.into_iter().zip(next).map(|(a, b)| a.merge(b)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    fn input(name: &'static str, role: Role, x: &[f32]) -> Input {
        Input {
            name,
            role,
            host: Tensor::new(x, &Device::Cpu).expect("t"),
        }
    }

    #[test]
    fn gradients_are_those_of_the_cotangent_weighted_sum() {
        // y = x * c0 (c0 constant): dL/dx = cot * c0.
        let inputs = [
            input("x", Role::Grad, &[1.0, 2.0, 3.0]),
            input("c", Role::Const, &[2.0, 2.0, 2.0]),
        ];
        let x = Placed::new(&inputs, &Device::Cpu, DType::F64).expect("placed");
        let f: OpFn = Rc::new(|x: &[Tensor]| Ok(vec![(&x[0] * &x[1])?]));
        let cot = [Tensor::new(&[0.5f64, 0.0, 1.0], &Device::Cpu).expect("cot")];
        let out = evaluate(&f, &x, &cot).expect("eval");
        assert_eq!(out.grads.len(), 1);
        assert_eq!(out.grads[0].to_vec1::<f64>().expect("g"), [1.0, 0.0, 2.0]);
    }

    #[test]
    fn inputs_without_gradients_skip_the_backward() {
        let inputs = [input("w", Role::Const, &[1.0, 2.0])];
        let x = Placed::new(&inputs, &Device::Cpu, DType::F32).expect("placed");
        let f: OpFn = Rc::new(|x: &[Tensor]| Ok(vec![x[0].clone(), x[0].clone()]));
        let out = evaluate(&f, &x, &[]).expect("eval");
        assert!(out.grads.is_empty() && out.values.len() == 2);
        assert_eq!(out.values[0].dtype(), DType::F32);
    }

    #[test]
    fn the_reference_by_chunks_of_rows_measures_as_at_once() {
        let opts = super::super::SelftestOptions {
            filter: Some("divergence".into()),
            ..Default::default()
        };
        let group = super::super::cases::plan(&Device::Cpu, &opts)
            .into_iter()
            .find(|g| g.op.name == "divergence" && g.dims.len() == 3)
            .expect("a divergence of [B, T, V]");
        let op = &group.op;
        let x = Placed::new(&(op.inputs)(&group.dims).expect("inputs"), &Device::Cpu, DType::F32).expect("x");
        let cot = cotangents(&(op.fused)(&x.tensors).expect("fwd"), op.per_token, DType::F32).expect("cot");
        let fused = evaluate(&op.fused, &x, &cot).expect("fused");
        let rows = group.dims[0];
        let per_row = x.tensors[0].elem_count() / rows;
        assert_eq!(chunks(op, &x, per_row).expect("chunks").len(), rows);
        assert_eq!(chunks(op, &x, CHUNK_ELEMS).expect("chunks"), [None]);
        let whole = against_reference_by(op, &x, &cot, &fused, CHUNK_ELEMS).expect("whole");
        let by_rows = against_reference_by(op, &x, &cot, &fused, per_row).expect("by rows");
        assert_eq!((whole.0.len(), whole.1.len()), (1, 1));
        for (a, b) in whole.0.iter().chain(&whole.1).zip(by_rows.0.iter().chain(&by_rows.1)) {
            assert!(a.abs > 0.0, "f32 against f64 has rounding");
            let close = |p: f64, q: f64| (p - q).abs() <= 1e-12 * p.abs();
            assert!(close(a.abs, b.abs) && close(a.rel, b.rel), "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn cotangents_weigh_rows_or_tokens() {
        let out = Tensor::zeros((40, 3), DType::F32, &Device::Cpu).expect("out");
        let per_row = cotangents(std::slice::from_ref(&out), false, DType::F64).expect("cot");
        let rows: Vec<Vec<f64>> = per_row[0].to_vec2().expect("rows");
        assert!(rows
            .iter()
            .all(|r| r.iter().all(|&x| x == 0.0) || r.iter().all(|&x| x > 0.0)));
        assert!(rows.iter().any(|r| r[0] == 0.0) && rows.iter().any(|r| r[0] > 0.0));
        assert_eq!(per_row[0].dtype(), DType::F64);
    }
}
