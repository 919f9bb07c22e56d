//! How faithful a cache is to the live teacher it was built from, on validation windows.

use candle_core::{DType, Tensor, D};
use serde::Serialize;

use retort_core::{Batch, Result, Split, TapSet, Teacher};
use retort_plugins::cache::build::topk_rows;
use retort_plugins::cache::{LogitStore, ReadState};

/// Fidelity of a cache on the first validation windows, per token (means).
#[derive(Debug, Clone, Serialize)]
pub struct Fidelity {
    /// Windows compared.
    pub windows: usize,
    /// Tokens compared.
    pub tokens: usize,
    /// KL between the exact and the stored distribution over the `k + 1` outcomes the cache
    /// describes (the top-k ids and the tail bucket): the coding's error alone.
    pub kl_topk_bucket: f64,
    /// KL(full teacher || cached top-k + uniform tail), the truncation to `k` included (what
    /// `kl` trains against; the same for any top-k store with the same `k`).
    pub kl_full_vs_reconstructed: f64,
    /// The same with the exact top-k values (the truncation alone).
    pub kl_full_vs_exact_topk_uniform: f64,
    /// Agreement of the stored top-1 with the teacher's argmax.
    pub top1_agreement: f64,
}

/// One token: the teacher's full logits row with its log-sum-exp, and the top-k as stored and
/// as exact.
struct TokenRow<'a> {
    logits: &'a [f32],
    lse: f64,
    cached: (&'a [u32], &'a [f32]),
    exact: (&'a [u32], &'a [f32]),
}

impl TokenRow<'_> {
    fn log_p(&self, id: u32) -> f64 {
        self.logits[id as usize] as f64 - self.lse
    }

    /// KL over the cached ids and the tail (an id not in the exact top-k counts with its true
    /// probability, so a changed id set shows up).
    fn bucket_kl(&self) -> f64 {
        let (mut kl, mut head_exact, mut head_cached) = (0.0, 0.0, 0.0);
        for (&i, &l) in self.cached.0.iter().zip(self.cached.1) {
            let p = self.log_p(i).exp();
            kl += p * (self.log_p(i) - l as f64);
            head_exact += p;
            head_cached += (l as f64).exp();
        }
        let (m_e, m_c) = ((1.0 - head_exact).max(1e-12), (1.0 - head_cached).max(1e-12));
        kl + m_e * (m_e / m_c).ln()
    }

    /// KL(full || `ids, lps` + the rest of the mass spread uniformly); `neg_h` is `sum p ln p`.
    fn reconstruction_kl(&self, (ids, lps): (&[u32], &[f32]), neg_h: f64) -> f64 {
        let (v, k) = (self.logits.len(), ids.len());
        let m = (1.0 - lps.iter().map(|&l| (l as f64).exp()).sum::<f64>()).max(1e-12);
        let tail_lp = (m / (v - k).max(1) as f64).ln();
        let (mut cross_top, mut p_top) = (0.0, 0.0);
        for (&i, &l) in ids.iter().zip(lps) {
            let p = self.log_p(i).exp();
            cross_top += p * l as f64;
            p_top += p;
        }
        let cross_tail = if v > k { (1.0 - p_top).max(0.0) * tail_lp } else { 0.0 };
        neg_h - cross_top - cross_tail
    }

    fn neg_entropy(&self) -> f64 {
        self.logits
            .iter()
            .map(|&z| {
                let l = z as f64 - self.lse;
                l.exp() * l
            })
            .sum()
    }
}

/// Sums over tokens.
#[derive(Default)]
struct Sums {
    bucket: f64,
    full: f64,
    trunc: f64,
    agree: f64,
    n: usize,
}

impl Sums {
    fn add(&mut self, row: &TokenRow) {
        self.agree += f64::from(u8::from(row.cached.0[0] == row.exact.0[0]));
        self.bucket += row.bucket_kl();
        let neg_h = row.neg_entropy();
        self.full += row.reconstruction_kl(row.cached, neg_h);
        self.trunc += row.reconstruction_kl(row.exact, neg_h);
        self.n += 1;
    }
}

/// Fidelity of `store` on its first `windows` validation windows (`val` are the tokens of the
/// validation split it was built on) against `teacher`.
pub fn fidelity(
    store: &LogitStore,
    teacher: &dyn Teacher,
    val: &[u32],
    windows: usize,
    device: &candle_core::Device,
) -> Result<Fidelity> {
    let h = store.header();
    let (k, v, seq_len) = (h.k, h.vocab, h.seq_len);
    let mut st = ReadState::new()?;
    let mut sums = Sums::default();
    for w in 0..windows {
        let batch = Batch::from_windows(val, Split::Val, &[w * seq_len], seq_len, device)?;
        let logits = teacher.forward(&batch, &TapSet::none())?.logits;
        let logits = logits.to_dtype(DType::F32)?.reshape(((), v))?;
        let lse = log_sum_exp_rows(&logits)?;
        let dense: Vec<f32> = logits.flatten_all()?.to_vec1()?;
        let (eids, elps) = topk_rows(&logits, k)?;
        let (mut cids, mut clps) = (Vec::new(), Vec::new());
        store.read_window(&mut st, Split::Val, w, k, &mut cids, &mut clps)?;
        for (t, &lse) in lse.iter().enumerate().take(seq_len) {
            let (top, row) = (t * k..(t + 1) * k, t * v..(t + 1) * v);
            sums.add(&TokenRow {
                logits: &dense[row],
                lse,
                cached: (&cids[top.clone()], &clps[top.clone()]),
                exact: (&eids[top.clone()], &elps[top]),
            });
        }
    }
    let d = sums.n.max(1) as f64;
    Ok(Fidelity {
        windows,
        tokens: sums.n,
        kl_topk_bucket: sums.bucket / d,
        kl_full_vs_reconstructed: sums.full / d,
        kl_full_vs_exact_topk_uniform: sums.trunc / d,
        top1_agreement: sums.agree / d,
    })
}

fn log_sum_exp_rows(logits: &Tensor) -> Result<Vec<f64>> {
    let l = logits.to_dtype(DType::F64)?;
    let max = l.max_keepdim(D::Minus1)?;
    let lse = (l.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()? + max)?;
    Ok(lse.flatten_all()?.to_vec1()?)
}
