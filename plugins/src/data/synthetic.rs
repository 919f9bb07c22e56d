//! Data kind `synthetic`: a seeded generator built into the binary, so the quickstart needs no
//! files.
//!
//! The stream comes from a hidden-regime, second-order Markov source. A hidden regime
//! `r in {0..regimes}` persists and switches to another regime with probability `switch_prob`
//! per token; the next token is drawn from
//! `p(x_t | r, x_{t-1} = a, x_{t-2} = b) = softmax(A[r][a] + B[b])`, where every entry of the
//! regime tables `A` is `N(0, sharpness^2)` and of the shared table `B` is `N(0, order2^2)`.
//! Predicting well means inferring the regime from the window (evidence that accumulates over
//! tokens) and learning `regimes * vocab^2 + vocab^2` distributions: a task in which a larger
//! model is clearly better at equal budget and whose targets are genuinely uncertain, so a
//! teacher's full distribution carries more than the sampled token.
//!
//! The source keeps its tables: [`DataSource::likelihood`] scores any token sequence exactly
//! under it (the forward algorithm over the hidden regime), e.g. a student's generations.
//!
//! ```toml
//! [data]
//! kind = "synthetic"
//! vocab = 64
//! regimes = 4
//! ```

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use serde::Deserialize;

use retort_core::registry::Factory;

use super::streams::TokenStreams;
use retort_core::{BuildContext, DataSource, Error, Params, Result, SourceLikelihood, Split, Tokenizer};

/// Params of `synthetic`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SyntheticParams {
    /// Vocabulary size (2..=4096). Default 64.
    #[serde(default = "d_vocab")]
    pub vocab: usize,
    /// Hidden regimes (>= 1). Default 4.
    #[serde(default = "d_regimes")]
    pub regimes: usize,
    /// Per-token probability of switching regime, in `[0, 1]`. Default 0.02.
    #[serde(default = "d_switch")]
    pub switch_prob: f64,
    /// Std of the regime transition logits. Default 2.0.
    #[serde(default = "d_sharp")]
    pub sharpness: f64,
    /// Std of the second-order logits. Default 0.8.
    #[serde(default = "d_order2")]
    pub order2: f64,
    /// Training tokens. Default 200000.
    #[serde(default = "d_train")]
    pub train_tokens: usize,
    /// Validation tokens (the continuation of the same stream). Default 20000.
    #[serde(default = "d_val")]
    pub val_tokens: usize,
    /// Seed of the source; default: the run seed.
    pub seed: Option<u64>,
}

fn d_vocab() -> usize {
    64
}
fn d_regimes() -> usize {
    4
}
fn d_switch() -> f64 {
    0.02
}
fn d_sharp() -> f64 {
    2.0
}
fn d_order2() -> f64 {
    0.8
}
fn d_train() -> usize {
    200_000
}
fn d_val() -> usize {
    20_000
}

/// Ids rendered as space-separated integers.
pub struct IdTokenizer {
    vocab: usize,
}

impl Tokenizer for IdTokenizer {
    fn vocab_size(&self) -> usize {
        self.vocab
    }
    fn encode(&self, text: &str) -> Result<Vec<u32>> {
        text.split_whitespace()
            .map(|w| match w.parse::<u32>() {
                Ok(i) if (i as usize) < self.vocab => Ok(i),
                _ => Err(Error::input(
                    "text",
                    format!("`{w}` is not a token id below {}", self.vocab),
                )),
            })
            .collect()
    }
    fn decode(&self, ids: &[u32]) -> Result<String> {
        Ok(ids.iter().map(u32::to_string).collect::<Vec<_>>().join(" "))
    }
    fn identity(&self) -> String {
        format!("ids:{}", self.vocab)
    }
}

/// The source's distributions, drawn once from the seed: what the stream is sampled from, and
/// what the data source keeps to score any sequence exactly ([`SourceLikelihood`]).
pub struct SourceTables {
    vocab: usize,
    regimes: usize,
    switch_prob: f64,
    /// `log p(x_t = x | r, x_{t-1} = a, x_{t-2} = b)` at `((r * vocab + a) * vocab + b) * vocab + x`.
    logp: Vec<f64>,
}

impl SourceTables {
    /// Draws the tables of `p` from `rng`: the first draws of the stream's generator.
    fn draw(p: &SyntheticParams, rng: &mut ChaCha8Rng) -> Result<Self> {
        let v = p.vocab;
        let bad = |e: rand_distr::NormalError| Error::failed("synthetic stream parameters", e);
        let a = Normal::new(0.0, p.sharpness).map_err(bad)?;
        let b = Normal::new(0.0, p.order2).map_err(bad)?;
        let regime_logits: Vec<f64> = (0..p.regimes * v * v).map(|_| a.sample(rng)).collect();
        let order2_logits: Vec<f64> = (0..v * v).map(|_| b.sample(rng)).collect();
        let mut logp = vec![0f64; p.regimes * v * v * v];
        let mut z = vec![0f64; v];
        for r in 0..p.regimes {
            for pa in 0..v {
                for pb in 0..v {
                    let row = (r * v + pa) * v + pb;
                    for (x, zx) in z.iter_mut().enumerate() {
                        *zx = regime_logits[(r * v + pa) * v + x] + order2_logits[pb * v + x];
                    }
                    let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                    let lse = m + z.iter().map(|zi| (zi - m).exp()).sum::<f64>().ln();
                    for (lp, zx) in logp[row * v..(row + 1) * v].iter_mut().zip(&z) {
                        *lp = zx - lse;
                    }
                }
            }
        }
        Ok(SourceTables {
            vocab: v,
            regimes: p.regimes,
            switch_prob: p.switch_prob,
            logp,
        })
    }

    /// Index of the distribution of the next token in `regime` after `prev` (`x_{t-1}`) and
    /// `prev2` (`x_{t-2}`), in units of rows of `vocab` entries.
    fn row(&self, regime: usize, prev: usize, prev2: usize) -> usize {
        (regime * self.vocab + prev) * self.vocab + prev2
    }

    /// Samples `n` tokens with `rng` (after the tables' draws), starting in regime 0 after two
    /// 0s; returns them and the mean `-log p(x_t | regime, context)`.
    fn sample(&self, rng: &mut ChaCha8Rng, n: usize) -> (Vec<u32>, f64) {
        let v = self.vocab;
        // Cumulative distribution per row, only while sampling.
        let cdf: Vec<f64> = self
            .logp
            .chunks_exact(v)
            .flat_map(|row| {
                row.iter().scan(0.0, |acc: &mut f64, lp| {
                    *acc += lp.exp();
                    Some(*acc)
                })
            })
            .collect();
        let mut out = Vec::with_capacity(n);
        let (mut regime, mut prev, mut prev2) = (0usize, 0usize, 0usize);
        let mut nll = 0.0;
        for _ in 0..n {
            if self.regimes > 1 && rng.random::<f64>() < self.switch_prob {
                regime = (regime + rng.random_range(1..self.regimes)) % self.regimes;
            }
            let row = self.row(regime, prev, prev2);
            let c = &cdf[row * v..(row + 1) * v];
            let u = rng.random::<f64>() * c[v - 1];
            let x = c.partition_point(|&q| q < u).min(v - 1);
            nll -= self.logp[row * v + x];
            out.push(x as u32);
            prev2 = prev;
            prev = x;
        }
        (out, nll / n.max(1) as f64)
    }
}

impl SourceLikelihood for SourceTables {
    /// The forward algorithm over the hidden regime. The sequence `s = prompt ++ continuation`
    /// is read as a window in the middle of the stream: the regime at `s[1]` has the stationary
    /// distribution, uniform (switching is symmetric), and is taken as independent of `s[0]`,
    /// `s[1]` (they are the context of `s[2]`, not scored); then at each position the regime
    /// stays with `1 - switch_prob` or moves to one of the others uniformly, and `s[t]` is drawn
    /// given it and `s[t-1]`, `s[t-2]`.
    fn continuation_nll(&self, prompt: &[u32], continuation: &[u32]) -> Result<f64> {
        if prompt.len() < 2 {
            return Err(Error::input(
                "prompt",
                format!(
                    "the synthetic source needs prompts of at least 2 tokens (the context of its \
                     second-order process), got {}",
                    prompt.len()
                ),
            ));
        }
        let v = self.vocab;
        if let Some(&x) = prompt.iter().chain(continuation).find(|&&x| x as usize >= v) {
            return Err(Error::input(
                "token sequence",
                format!("id {x} is outside the synthetic source's vocabulary (ids below {v})"),
            ));
        }
        if continuation.is_empty() {
            return Ok(0.0);
        }
        let k = self.regimes;
        let (stay, switch) = if k == 1 {
            (1.0, 0.0)
        } else {
            (1.0 - self.switch_prob, self.switch_prob / (k - 1) as f64)
        };
        let s: Vec<usize> = prompt.iter().chain(continuation).map(|&x| x as usize).collect();
        // Posterior over the regime at the previous position, up to a scale (its largest entry
        // is 1): the scale is kept out of it, in the accumulated NLL.
        let mut alpha = vec![1.0f64; k];
        let mut pred = vec![0.0f64; k];
        let mut nll = 0.0;
        for t in 2..s.len() {
            // Regime at `t`, same scale as `alpha`: it stays, or comes from one of the others
            // (their mass from prefix and suffix sums, not `total - alpha[r]`, which cancels).
            let mut total = 0.0;
            for r in (0..k).rev() {
                pred[r] = total;
                total += alpha[r];
            }
            let mut before = 0.0;
            for r in 0..k {
                let others = before + pred[r];
                before += alpha[r];
                pred[r] = stay * alpha[r] + switch * others;
            }
            // Joint with the token, in logs; some regime predicts a positive mass (the one
            // with alpha = 1 stays with `stay`, the others get `switch` from it), so `m` is finite.
            let (prev, prev2, x) = (s[t - 1], s[t - 2], s[t]);
            let mut m = f64::NEG_INFINITY;
            for (r, pr) in pred.iter_mut().enumerate() {
                *pr = pr.ln() + self.logp[self.row(r, prev, prev2) * v + x];
                m = m.max(*pr);
            }
            let mut sum = 0.0;
            for (a, score) in alpha.iter_mut().zip(&pred) {
                *a = (score - m).exp();
                sum += *a;
            }
            // log p(s_t | s_..t) = log sum_r pred(r) p(s_t | r) - log sum_r pred(r).
            if t >= prompt.len() {
                nll -= m + sum.ln() - total.ln();
            }
        }
        if nll.is_finite() {
            Ok(nll)
        } else {
            Err(Error::Runtime(format!(
                "the synthetic source's NLL of a {}-token continuation is not finite ({nll})",
                continuation.len()
            )))
        }
    }
}

/// Draws the source of `p` from `seed` and generates `n` tokens from it; returns the source's
/// tables, the tokens and the mean `-log p(x_t | regime, context)` (the loss of an oracle that
/// knows the hidden regime: a floor no model can beat).
pub fn generate_source(p: &SyntheticParams, seed: u64, n: usize) -> Result<(SourceTables, Vec<u32>, f64)> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let tables = SourceTables::draw(p, &mut rng)?;
    let (ids, floor) = tables.sample(&mut rng, n);
    Ok((tables, ids, floor))
}

/// Generates `n` tokens; returns them and the mean `-log p(x_t | regime, context)` (the loss of
/// an oracle that knows the hidden regime: a floor no model can beat).
pub fn generate(p: &SyntheticParams, seed: u64, n: usize) -> Result<(Vec<u32>, f64)> {
    let (_, ids, floor) = generate_source(p, seed, n)?;
    Ok((ids, floor))
}

/// The `synthetic` data source: its streams, and the tables they were drawn from, which score
/// any sequence exactly.
struct SyntheticSource {
    streams: TokenStreams,
    tables: SourceTables,
}

impl DataSource for SyntheticSource {
    fn tokenizer(&self) -> &dyn Tokenizer {
        self.streams.tokenizer()
    }
    fn tokens(&self, split: Split) -> &[u32] {
        self.streams.tokens(split)
    }
    fn describe(&self) -> String {
        self.streams.describe()
    }
    fn likelihood(&self) -> Option<&dyn SourceLikelihood> {
        Some(&self.tables)
    }
}

/// Refuses sizes this host cannot hold before generating: the source's tables (two `f64` per
/// entry of `regimes x vocab^3` while sampling: the log-probs, kept, and the cumulative
/// distribution) and the token stream (twice: the stream, and its validation part split off).
fn check_sizes(p: &SyntheticParams, params: &Params) -> Result<()> {
    let v = p.vocab as u128;
    let tables = (16 * v * v * v).saturating_mul(p.regimes as u128);
    let what = format!("the source's tables ({} regimes x vocab^3 entries)", p.regimes);
    retort_core::memory::ensure_host_can_allocate(&params.key_path("regimes"), &what, tables)?;
    let tokens = 2 * 4 * (p.train_tokens as u128 + p.val_tokens as u128);
    let what = format!("{} + {} tokens", p.train_tokens, p.val_tokens);
    retort_core::memory::ensure_host_can_allocate(&params.key_path("train_tokens"), &what, tokens)
}

fn build(params: &Params, ctx: &BuildContext) -> Result<Box<dyn DataSource>> {
    let p: SyntheticParams = params.parse()?;
    if !(2..=4096).contains(&p.vocab) {
        return Err(params.error("vocab", format!("expected 2..=4096, got {}", p.vocab)));
    }
    if p.regimes == 0 {
        return Err(params.error("regimes", "expected an integer >= 1, got 0"));
    }
    if !(0.0..=1.0).contains(&p.switch_prob) {
        return Err(params.error(
            "switch_prob",
            format!("expected a probability in [0, 1], got {}", p.switch_prob),
        ));
    }
    params.require_positive("sharpness", p.sharpness)?;
    if !(p.order2.is_finite() && p.order2 >= 0.0) {
        return Err(params.error("order2", format!("expected a number >= 0, got {}", p.order2)));
    }
    if p.order2 == 0.0 {
        // Normal::new(0, 0) is fine, but say so explicitly: a pure first-order source.
        tracing::debug!("synthetic source without second-order term");
    }
    if p.train_tokens == 0 || p.val_tokens == 0 {
        return Err(params.error("train_tokens", "train_tokens and val_tokens must be >= 1"));
    }
    check_sizes(&p, params)?;
    let seed = p.seed.unwrap_or(ctx.seed);
    // The oracle's loss is measured over the whole stream (train and validation).
    let (tables, mut all, floor) = generate_source(&p, seed, p.train_tokens + p.val_tokens)?;
    let val = all.split_off(p.train_tokens);
    let description = format!(
        "synthetic hidden-regime Markov source (vocab {}, {} regimes, switch {}, seed {seed}): {} train / {} val tokens; \
         oracle loss with the regime known: {floor:.3} nats/token",
        p.vocab, p.regimes, p.switch_prob, p.train_tokens, p.val_tokens
    );
    Ok(Box::new(SyntheticSource {
        streams: TokenStreams {
            tokenizer: Box::new(IdTokenizer { vocab: p.vocab }),
            train: all,
            val,
            description,
            prompts: None,
        },
        tables,
    }))
}

inventory::submit! {
    Factory::<dyn DataSource> {
        kind: "synthetic",
        description: "seeded hidden-regime Markov token stream built into the binary (no files needed)",
        build, params: retort_core::registry::params_schema::<SyntheticParams> }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_this_host_cannot_hold_are_refused_before_generating() {
        let registry = retort_core::Registry::empty();
        let ctx = BuildContext::new(&registry, candle_core::Device::Cpu, 1);
        for (key, value) in [
            ("regimes", 1_000_000_000_000u64),
            ("train_tokens", 1_000_000_000_000_000),
        ] {
            let mut m = serde_json::Map::new();
            m.insert(key.into(), value.into());
            let err = build(&Params::new("data", m), &ctx).err().expect("refused");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains(&format!("data.{key}")), "{err}");
        }
    }

    fn params() -> SyntheticParams {
        serde_json::from_value(serde_json::json!({"vocab": 16, "train_tokens": 5000, "val_tokens": 500}))
            .expect("params")
    }

    #[test]
    fn deterministic_per_seed_and_in_range() {
        let p = params();
        let (a, fa) = generate(&p, 1, 3000).expect("gen");
        let (b, fb) = generate(&p, 1, 3000).expect("gen");
        let (c, _) = generate(&p, 2, 3000).expect("gen");
        assert_eq!(a, b);
        assert_eq!(fa, fb);
        assert_ne!(a, c);
        assert!(a.iter().all(|&x| x < 16));
        // Every symbol occurs: no degenerate stream.
        let mut seen = [false; 16];
        a.iter().for_each(|&x| seen[x as usize] = true);
        assert!(seen.iter().all(|&s| s));
    }

    #[test]
    fn oracle_floor_is_below_uniform_and_above_zero() {
        let (_, floor) = generate(&params(), 3, 20_000).expect("gen");
        assert!(floor > 0.3 && floor < (16f64).ln() - 0.3, "floor {floor}");
    }

    /// FNV-1a over the ids: a fingerprint of a stream.
    fn fingerprint(ids: &[u32]) -> u64 {
        ids.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
            (h ^ u64::from(x)).wrapping_mul(0x0000_0100_0000_01b3)
        })
    }

    /// The streams and the oracle loss recorded from the generator before the data source kept
    /// its tables (commit 5dd217d): keeping them must not change a single token or bit.
    #[test]
    fn stream_and_oracle_loss_are_the_recorded_ones() {
        let cases = [
            (
                serde_json::json!({"vocab": 16}),
                7u64,
                3000usize,
                0x680e_9bba_e524_e446u64,
                0x3ff8_944d_fca1_a0e9u64,
            ),
            (
                serde_json::json!({"vocab": 5, "regimes": 3, "switch_prob": 0.3, "order2": 0.0}),
                11,
                2000,
                0xf478_40a2_617c_f0cd,
                0x3fec_f8b8_dba9_d37a,
            ),
            (
                serde_json::json!({"vocab": 9, "regimes": 1, "sharpness": 1.5}),
                1234,
                1000,
                0x471b_4f9b_e523_79bb,
                0x3ff7_5a7d_2841_b83d,
            ),
        ];
        for (json, seed, n, stream, oracle) in cases {
            let p: SyntheticParams = serde_json::from_value(json.clone()).expect("params");
            let (ids, floor) = generate(&p, seed, n).expect("gen");
            assert_eq!(fingerprint(&ids), stream, "stream of {json} seed {seed}");
            assert_eq!(floor.to_bits(), oracle, "oracle loss of {json} seed {seed}: {floor}");
        }
        let registry = retort_core::Registry::empty();
        let ctx = BuildContext::new(&registry, candle_core::Device::Cpu, 99);
        let serde_json::Value::Object(m) = serde_json::json!({"vocab": 12, "train_tokens": 3000, "val_tokens": 700})
        else {
            unreachable!()
        };
        let source = build(&Params::new("data", m), &ctx).expect("build");
        assert_eq!(
            fingerprint(source.tokens(retort_core::Split::Train)),
            0xc259_9a45_6743_12ac
        );
        assert_eq!(
            fingerprint(source.tokens(retort_core::Split::Val)),
            0x7664_c618_c7e4_1d23
        );
        assert!(
            source
                .describe()
                .ends_with("oracle loss with the regime known: 1.351 nats/token"),
            "{}",
            source.describe()
        );
    }

    fn source(json: serde_json::Value, seed: u64, n: usize) -> (SourceTables, Vec<u32>, f64) {
        let p: SyntheticParams = serde_json::from_value(json).expect("params");
        generate_source(&p, seed, n).expect("gen")
    }

    /// `-log p(s[t] | r, s[t-1], s[t-2])`.
    fn nll_at(t: &SourceTables, r: usize, s: &[u32], i: usize) -> f64 {
        let v = t.vocab;
        -t.logp[((r * v + s[i - 1] as usize) * v + s[i - 2] as usize) * v + s[i] as usize]
    }

    #[test]
    fn with_one_regime_the_nll_is_the_sum_along_the_sequence() {
        let (t, ids, floor) = source(serde_json::json!({"vocab": 7, "regimes": 1, "order2": 1.5}), 5, 400);
        // The stream starts after two 0s: scored after them, it costs what the generator paid
        // for it (which also pins which of `x_{t-1}`, `x_{t-2}` indexes which table).
        let nll = t.continuation_nll(&[0, 0], &ids).expect("nll");
        assert!(
            (nll - floor * ids.len() as f64).abs() < 1e-9 * nll,
            "{nll} vs {}",
            floor * 400.0
        );
        for split in [2, 3, 10, 399] {
            let (prompt, cont) = ids.split_at(split);
            let want: f64 = (split..ids.len()).map(|i| nll_at(&t, 0, &ids, i)).sum();
            let got = t.continuation_nll(prompt, cont).expect("nll");
            assert!((got - want).abs() < 1e-9 * want, "split {split}: {got} vs {want}");
        }
        assert_eq!(t.continuation_nll(&ids[..5], &[]).expect("nll"), 0.0);
    }

    /// `-log P(s[2..n])` given `s[0]`, `s[1]`, summed over every path of regimes at `1..n`
    /// explicitly.
    fn brute_force_nll(t: &SourceTables, s: &[u32]) -> f64 {
        let (k, n) = (t.regimes, s.len());
        let trans = |a: usize, b: usize| match (k, a == b) {
            (1, _) => 1.0,
            (_, true) => 1.0 - t.switch_prob,
            _ => t.switch_prob / (k - 1) as f64,
        };
        let mut total = 0.0;
        for code in 0..k.pow((n - 1) as u32) {
            // path[i] = regime at position i + 1.
            let path: Vec<usize> = (0..n - 1).map(|i| code / k.pow(i as u32) % k).collect();
            let mut p = 1.0 / k as f64;
            for i in 2..n {
                p *= trans(path[i - 2], path[i - 1]) * (-nll_at(t, path[i - 1], s, i)).exp();
            }
            total += p;
        }
        -total.ln()
    }

    #[test]
    fn forward_algorithm_matches_enumerating_the_regime_paths() {
        let mut rng = ChaCha8Rng::seed_from_u64(17);
        for (regimes, switch_prob) in [(2, 0.3), (2, 0.0), (2, 1.0), (3, 0.1), (3, 0.9)] {
            let json = serde_json::json!({"vocab": 3, "regimes": regimes, "switch_prob": switch_prob});
            let (t, _, _) = source(json, 3, 10);
            for _ in 0..6 {
                let s: Vec<u32> = (0..6).map(|_| rng.random_range(0..3)).collect();
                for split in 2..=6 {
                    let want = brute_force_nll(&t, &s) - brute_force_nll(&t, &s[..split]);
                    let got = t.continuation_nll(&s[..split], &s[split..]).expect("nll");
                    assert!(
                        (got - want).abs() < 1e-10,
                        "{regimes} regimes, switch {switch_prob}, {s:?} split at {split}: {got} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn own_stream_scores_near_the_known_regime_floor_and_random_ids_far_worse() {
        let registry = retort_core::Registry::empty();
        let ctx = BuildContext::new(&registry, candle_core::Device::Cpu, 21);
        let json = serde_json::json!({"vocab": 16, "train_tokens": 20_000, "val_tokens": 20_000});
        let serde_json::Value::Object(m) = json.clone() else {
            unreachable!()
        };
        let data = build(&Params::new("data", m), &ctx).expect("build");
        let oracle = data.likelihood().expect("the synthetic source knows its distribution");
        let (_, floor) = generate(&serde_json::from_value(json).expect("params"), 21, 40_000).expect("gen");
        let val = data.tokens(Split::Val);
        let per_token = |s: &[u32]| oracle.continuation_nll(&s[..2], &s[2..]).expect("nll") / (s.len() - 2) as f64;
        let own = per_token(val);
        // The regime is inferred from the window: slightly above the loss with it known, by at most
        // the entropy rate of the regime's path (up to sampling noise: the floor is measured over
        // the whole stream).
        let path_entropy = -0.98f64 * 0.98f64.ln() - 0.02 * 0.02f64.ln() + 0.02 * 3f64.ln();
        assert!(
            own > floor - 0.03 && own < floor + path_entropy + 0.03,
            "own stream {own}, floor {floor}, path entropy {path_entropy}"
        );
        assert!(own < (16f64).ln() - 0.5, "own stream {own}");
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let random: Vec<u32> = (0..val.len()).map(|_| rng.random_range(0..16)).collect();
        let noise = per_token(&random);
        assert!(noise > own + 0.5, "random ids {noise}, own stream {own}");
    }

    #[test]
    fn short_prompts_and_ids_outside_the_vocabulary_are_errors() {
        let (t, ids, _) = source(serde_json::json!({"vocab": 8, "regimes": 2}), 1, 50);
        for prompt in [&[][..], &[3]] {
            let err = t.continuation_nll(prompt, &ids).expect_err("too short");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("at least 2 tokens"), "{err}");
        }
        for (prompt, cont) in [
            (&[1, 8][..], &[2, 3][..]),
            (&[1, 2], &[3, 9, 4]),
            (&[1, 2], &[u32::MAX]),
        ] {
            let err = t.continuation_nll(prompt, cont).expect_err("outside the vocabulary");
            assert_eq!(err.exit_code(), 2);
            assert!(err.to_string().contains("outside"), "{err}");
        }
        // Also with an empty continuation: the prompt is still checked.
        assert!(t.continuation_nll(&[0, 8], &[]).is_err());
        assert!(t.continuation_nll(&[0], &[]).is_err());
    }
}
