//! Rotary position embeddings (Su et al., 2021, "RoFormer"): the tables, applied by the fused
//! differentiable op [`kernels::rope`].
//!
//! Frequencies `inv_freq_i = theta^(-2i/d)` for `i < d/2`; position `p` rotates the pair
//! `(x_a, x_b)` by the angle `p * inv_freq_i`: `(x_a cos - x_b sin, x_a sin + x_b cos)`. Hugging
//! Face pairs `a = i, b = i + d/2` (`rotate_half`); llama.cpp pairs `a = 2i, b = 2i + 1` and
//! stores the q/k rows of GGUF llama weights permuted to match, so a GGUF model must use the
//! interleaved variant (as candle-transformers' `quantized_llama` does with `rope_i`).

use candle_core::{DType, Device, Result, Tensor};

use crate::kernels;

/// Cos/sin tables for every position up to the context.
#[derive(Debug, Clone)]
pub struct Rope {
    cos: Tensor,
    sin: Tensor,
    interleaved: bool,
}

impl Rope {
    /// Tables `[context, head_dim / 2]` for base `theta`, computed in f64 then cast to `dtype`.
    pub fn new(
        head_dim: usize,
        theta: f64,
        context: usize,
        interleaved: bool,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        // The context may come from a checkpoint's metadata: a fallible allocation, so that an
        // absurd one is an error rather than an abort.
        let n = context
            .checked_mul(half)
            .ok_or_else(|| candle_core::Error::Msg(format!("RoPE tables of {context} x {half} overflow")))?;
        let (mut cos, mut sin) = (Vec::new(), Vec::new());
        for table in [&mut cos, &mut sin] {
            table.try_reserve_exact(n).map_err(|_| {
                candle_core::Error::Msg(format!(
                    "RoPE tables for a context of {context} tokens cannot be allocated: set a shorter `context`"
                ))
            })?;
        }
        for p in 0..context {
            for i in 0..half {
                // Computed in f32 like Hugging Face and candle-transformers, so the angles agree.
                let inv = 1.0f32 / (theta as f32).powf((2 * i) as f32 / head_dim as f32);
                let a = p as f32 * inv;
                cos.push(a.cos() as f64);
                sin.push(a.sin() as f64);
            }
        }
        Ok(Rope {
            cos: Tensor::from_vec(cos, (context, half), device)?.to_dtype(dtype)?,
            sin: Tensor::from_vec(sin, (context, half), device)?.to_dtype(dtype)?,
            interleaved,
        })
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` for positions `0..seq`.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.apply_at(x, 0)
    }

    /// Rotates `x` `[batch, heads, seq, head_dim]` for positions `offset..offset + seq`,
    /// differentiable: [`kernels::rope::rope`], fused where it `supports` the dtype and device,
    /// else composed of candle ops.
    pub fn apply_at(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(x, offset)?;
        kernels::rope::rope(x, &cos, &sin, self.interleaved)
    }

    /// The same rotation for frozen models (no backward needed): the fused op where it runs
    /// (CPU f32/f64, CUDA), which is [`Rope::apply_at`] with the same arithmetic as candle's
    /// kernels; elsewhere (half precision on the CPU, Metal) candle's fused `rope` / `rope_i`,
    /// one pass where `apply_at` would compose a dozen ops.
    pub fn apply_fused(&self, x: &Tensor, offset: usize) -> Result<Tensor> {
        let (cos, sin) = self.tables(x, offset)?;
        if kernels::rope::supports(x, &cos, &sin) {
            return kernels::rope::rope(x, &cos, &sin, self.interleaved);
        }
        let x = x.contiguous()?;
        if self.interleaved {
            candle_nn::rotary_emb::rope_i(&x, &cos, &sin)
        } else {
            candle_nn::rotary_emb::rope(&x, &cos, &sin)
        }
    }

    /// The tables' rows `offset..offset + seq` for `x` `[batch, heads, seq, head_dim]`, in
    /// `x`'s dtype.
    fn tables(&self, x: &Tensor, offset: usize) -> Result<(Tensor, Tensor)> {
        let t = x.dim(2)?;
        let end = offset.saturating_add(t);
        if end > self.context() {
            candle_core::bail!(
                "RoPE: positions {offset}..{end} exceed the tables' context of {}",
                self.context()
            )
        }
        let cos = self.cos.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        let sin = self.sin.narrow(0, offset, t)?.to_dtype(x.dtype())?;
        Ok((cos, sin))
    }

    /// The longest sequence the tables cover.
    pub fn context(&self) -> usize {
        self.cos.dims()[0]
    }
}

/// Converts llama.cpp's row order of a q/k weight (`[heads * head_dim, in]`, rows permuted for
/// the interleaved RoPE) back to Hugging Face's: GGUF row `h*d + 2i + s` is HF row `h*d + s*d/2 + i`.
pub fn unpermute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    if w.rank() == 1 {
        return unpermute_rows(&w.unsqueeze(1)?, heads)?.squeeze(1);
    }
    let (out, inp) = w.dims2()?;
    let d = out / heads;
    w.reshape((heads, d / 2, 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

/// The inverse of [`unpermute_rows`]: Hugging Face's row order to llama.cpp's.
pub fn permute_rows(w: &Tensor, heads: usize) -> Result<Tensor> {
    if w.rank() == 1 {
        return permute_rows(&w.unsqueeze(1)?, heads)?.squeeze(1);
    }
    let (out, inp) = w.dims2()?;
    let d = out / heads;
    w.reshape((heads, 2, d / 2, inp))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((out, inp))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permutation_round_trips_and_interleaved_rope_matches_half_rope() {
        let dev = Device::Cpu;
        // One head of width 4: q = W x with W [4, 3]; rotating HF-ordered q with rotate_half
        // equals rotating GGUF-ordered q interleaved, then un-permuting.
        let w = Tensor::arange(0f64, 24., &dev).expect("a").reshape((8, 3)).expect("r");
        let p = permute_rows(&w, 2).expect("p");
        assert_eq!(
            unpermute_rows(&p, 2).expect("u").to_vec2::<f64>().expect("v"),
            w.to_vec2::<f64>().expect("v")
        );
        let x = Tensor::new(&[[0.3f64, -1.0, 2.0], [1.5, 0.2, -0.7], [0.1, 0.1, 0.9]], &dev).expect("x");
        let q_hf = x
            .matmul(&w.t().expect("t"))
            .expect("m")
            .reshape((1, 3, 2, 4))
            .expect("r")
            .transpose(1, 2)
            .expect("t");
        let q_gg = x
            .matmul(&p.t().expect("t"))
            .expect("m")
            .reshape((1, 3, 2, 4))
            .expect("r")
            .transpose(1, 2)
            .expect("t");
        let half = Rope::new(4, 100.0, 8, false, DType::F64, &dev).expect("rope");
        let inter = Rope::new(4, 100.0, 8, true, DType::F64, &dev).expect("rope");
        let a = half.apply(&q_hf.contiguous().expect("c")).expect("a");
        let b = inter.apply(&q_gg.contiguous().expect("c")).expect("b");
        let bf = inter.apply_fused(&q_gg.contiguous().expect("c"), 0).expect("b");
        let af = half.apply_fused(&q_hf.contiguous().expect("c"), 0).expect("a");
        let close = |x: &Tensor, y: &Tensor| {
            (x - y)
                .expect("d")
                .abs()
                .expect("a")
                .max_all()
                .expect("m")
                .to_scalar::<f64>()
                .expect("s")
        };
        assert!(close(&b, &bf) < 1e-12 && close(&a, &af) < 1e-12);
        // Un-permute b's last dim per head: [.., 2i + s] -> [.., s*2 + i].
        let b = b
            .reshape((1, 2, 3, 2, 2))
            .expect("r")
            .transpose(3, 4)
            .expect("t")
            .reshape((1, 2, 3, 4))
            .expect("r");
        let diff = (a - b)
            .expect("d")
            .abs()
            .expect("a")
            .max_all()
            .expect("m")
            .to_scalar::<f64>()
            .expect("s");
        assert!(diff < 1e-12, "{diff}");
    }

    #[test]
    fn the_frozen_path_agrees_with_the_differentiable_one_in_every_dtype() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f64, 48., &dev)
            .and_then(|t| (t * 0.37)?.sin())
            .and_then(|t| t.reshape((1, 2, 3, 8)))
            .expect("x");
        for (dtype, tol) in [
            (DType::F64, 1e-12),
            (DType::F32, 1e-6),
            (DType::F16, 2e-3),
            (DType::BF16, 2e-2),
        ] {
            for interleaved in [false, true] {
                let rope = Rope::new(8, 10_000.0, 16, interleaved, dtype, &dev).expect("rope");
                let xd = x.to_dtype(dtype).expect("cast");
                let a = rope.apply_at(&xd, 5).expect("apply_at");
                let b = rope.apply_fused(&xd, 5).expect("apply_fused");
                assert_eq!((a.dtype(), b.dtype()), (dtype, dtype));
                let d = (a.to_dtype(DType::F64).expect("a") - b.to_dtype(DType::F64).expect("b"))
                    .and_then(|d| d.abs())
                    .and_then(|d| d.max_all())
                    .and_then(|d| d.to_scalar::<f64>())
                    .expect("diff");
                assert!(d <= tol, "{dtype:?} interleaved {interleaved}: {d}");
            }
        }
        let rope = Rope::new(8, 10_000.0, 6, false, DType::F64, &dev).expect("rope");
        let e = rope.apply_at(&x, 4).expect_err("past the context");
        assert!(e.to_string().contains("context of 6"), "{e}");
    }

    #[test]
    fn position_zero_is_identity_and_norms_are_kept() {
        let dev = Device::Cpu;
        let x = Tensor::new(&[1f64, 2., 3., 4.], &dev)
            .expect("x")
            .reshape((1, 1, 1, 4))
            .expect("r");
        let x = Tensor::cat(&[&x, &x], 2).expect("cat");
        let r = Rope::new(4, 10_000.0, 4, false, DType::F64, &dev)
            .expect("rope")
            .apply(&x)
            .expect("apply");
        let v = r.flatten_all().expect("f").to_vec1::<f64>().expect("v");
        assert_eq!(&v[..4], &[1., 2., 3., 4.]);
        let n: f64 = v[4..].iter().map(|a| a * a).sum();
        assert!((n - 30.0).abs() < 1e-5, "{n}"); // angles are computed in f32
    }
}
