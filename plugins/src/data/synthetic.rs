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
use retort_core::{BuildContext, DataSource, Error, Params, Result, Tokenizer};

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

/// Generates `n` tokens; returns them and the mean `-log p(x_t | regime, context)` (the loss of
/// an oracle that knows the hidden regime: a floor no model can beat).
pub fn generate(p: &SyntheticParams, seed: u64, n: usize) -> Result<(Vec<u32>, f64)> {
    let v = p.vocab;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let bad = |e: rand_distr::NormalError| Error::failed("synthetic stream parameters", e);
    let a = Normal::new(0.0, p.sharpness).map_err(bad)?;
    let b = Normal::new(0.0, p.order2).map_err(bad)?;
    let regime_logits: Vec<f64> = (0..p.regimes * v * v).map(|_| a.sample(&mut rng)).collect();
    let order2_logits: Vec<f64> = (0..v * v).map(|_| b.sample(&mut rng)).collect();
    // Cumulative distribution and log-probs per (regime, prev, prev2).
    let rows = p.regimes * v * v;
    let mut cdf = vec![0f64; rows * v];
    let mut logp = vec![0f64; rows * v];
    for r in 0..p.regimes {
        for pa in 0..v {
            for pb in 0..v {
                let row = (r * v + pa) * v + pb;
                let z: Vec<f64> = (0..v)
                    .map(|x| regime_logits[(r * v + pa) * v + x] + order2_logits[pb * v + x])
                    .collect();
                let m = z.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|zi| (zi - m).exp()).sum::<f64>().ln();
                let mut acc = 0.0;
                for x in 0..v {
                    let lp = z[x] - lse;
                    logp[row * v + x] = lp;
                    acc += lp.exp();
                    cdf[row * v + x] = acc;
                }
            }
        }
    }
    let mut out = Vec::with_capacity(n);
    let (mut regime, mut prev, mut prev2) = (0usize, 0usize, 0usize);
    let mut nll = 0.0;
    for _ in 0..n {
        if p.regimes > 1 && rng.random::<f64>() < p.switch_prob {
            regime = (regime + rng.random_range(1..p.regimes)) % p.regimes;
        }
        let row = (regime * v + prev) * v + prev2;
        let c = &cdf[row * v..(row + 1) * v];
        let u = rng.random::<f64>() * c[v - 1];
        let x = c.partition_point(|&q| q < u).min(v - 1);
        nll -= logp[row * v + x];
        out.push(x as u32);
        prev2 = prev;
        prev = x;
    }
    Ok((out, nll / n.max(1) as f64))
}

/// Refuses sizes this host cannot hold before generating: the source's tables (two `f64` per
/// entry of `regimes x vocab^3`) and the token stream (generated twice: the stream, and again
/// for the oracle's loss).
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
    let (mut all, _) = generate(&p, seed, p.train_tokens + p.val_tokens)?;
    let val = all.split_off(p.train_tokens);
    let (_, floor) = {
        // Oracle floor measured on the validation continuation.
        let (v, f) = generate(&p, seed, p.train_tokens + p.val_tokens)?;
        debug_assert_eq!(&v[p.train_tokens..], &val[..]);
        (v, f)
    };
    let description = format!(
        "synthetic hidden-regime Markov source (vocab {}, {} regimes, switch {}, seed {seed}): {} train / {} val tokens; \
         oracle loss with the regime known: {floor:.3} nats/token",
        p.vocab, p.regimes, p.switch_prob, p.train_tokens, p.val_tokens
    );
    Ok(Box::new(TokenStreams {
        tokenizer: Box::new(IdTokenizer { vocab: p.vocab }),
        train: all,
        val,
        description,
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
}
