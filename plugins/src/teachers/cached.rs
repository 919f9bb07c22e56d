//! Teacher kind `cached`: a teacher's top-`k` distribution read from a logit cache built by
//! `retort cache CONFIG` (docs/cache-format.md), without loading the teacher.
//!
//! It provides the taps `topk.{j}` for `j <= k` and no dense logits (see
//! [`Teacher::sparse_topk`]): `topk_kl` reads the taps, `kl` switches to its sparse form (the
//! tail mass spread uniformly over the other tokens), terms that need dense teacher logits or
//! hidden states are refused at assembly. It serves only the windows it stores (the run uses
//! `train.windows = "aligned"` with the cache's `seq_len`), and at assembly it refuses a run
//! whose tokenizer, window length or token streams differ from those it was built on.
//!
//! ```toml
//! [teacher]
//! kind = "cached"
//! path = "runs/cache/smollm2"
//! ```

use std::path::PathBuf;
use std::sync::Mutex;

use candle_core::{DType, Tensor};
use serde::Deserialize;

use retort_core::registry::Factory;
use retort_core::taps::parse_topk_tap;
use retort_core::{Batch, BuildContext, DataSource, Error, ModelInfo, Outputs, Params, Result, Split, TapSet, Teacher};

use crate::cache::store::fingerprint;
use crate::cache::{LogitStore, ReadState};

/// Params of `cached`.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CachedParams {
    /// Directory of the cache (written by `retort cache`).
    pub path: PathBuf,
}

/// A teacher served from a [`LogitStore`].
pub struct CachedTeacher {
    store: LogitStore,
    key: String,
    state: Mutex<ReadState>,
}

impl CachedTeacher {
    /// Opens (and verifies) the cache at `path`; `key` is the config key path for errors.
    pub fn open(path: &std::path::Path, key: &str) -> Result<Self> {
        Ok(CachedTeacher {
            store: LogitStore::open(path)?,
            key: key.into(),
            state: Mutex::new(ReadState::new()?),
        })
    }

    /// The store.
    pub fn store(&self) -> &LogitStore {
        &self.store
    }

    fn mismatch(&self, what: &str, cache: impl std::fmt::Display, run: impl std::fmt::Display) -> Error {
        Error::config(
            self.key.clone(),
            format!(
                "the logit cache {} does not match this run: {what} is {cache} in the cache and {run} in the run; rebuild it with `retort cache` for this config",
                self.store.dir().display()
            ),
        )
    }
}

impl Teacher for CachedTeacher {
    fn forward(&self, batch: &Batch, taps: &TapSet) -> Result<Outputs> {
        let h = self.store.header();
        let (b, t) = batch.dims()?;
        let src = batch.source.as_ref().ok_or_else(|| {
            Error::Runtime("a cached teacher needs batches cut from the data's windows (Batch::source)".into())
        })?;
        if t != h.seq_len || src.starts.len() != b {
            return Err(Error::Runtime(format!(
                "batch of {b} x {t} tokens; the cache holds windows of {} tokens",
                h.seq_len
            )));
        }
        let wanted: Vec<usize> = taps.iter().filter_map(parse_topk_tap).collect();
        let k_read = wanted.iter().copied().max().unwrap_or(0);
        let mut out = Outputs::logits_only(Tensor::zeros((b, t, 0), DType::F32, batch.input_ids.device())?);
        if k_read == 0 {
            return Ok(out);
        }
        let mut ids = Vec::with_capacity(b * t * k_read);
        let mut lps = Vec::with_capacity(b * t * k_read);
        {
            let mut state = self
                .state
                .lock()
                .map_err(|_| Error::Runtime("cached teacher: reader state poisoned".into()))?;
            for &start in &src.starts {
                if start % h.seq_len != 0 {
                    return Err(Error::Runtime(format!(
                        "batch row starts at token {start}, not at a multiple of the cache's seq_len {} (train.windows must be \"aligned\")",
                        h.seq_len
                    )));
                }
                self.store
                    .read_window(&mut state, src.split, start / h.seq_len, k_read, &mut ids, &mut lps)?;
            }
        }
        let device = batch.input_ids.device();
        let ids = Tensor::from_vec(ids, (b, t, k_read), device)?;
        let lps = Tensor::from_vec(lps, (b, t, k_read), device)?;
        for k in wanted {
            let (i, l) = if k == k_read {
                (ids.clone(), lps.clone())
            } else {
                (ids.narrow(2, 0, k)?.contiguous()?, lps.narrow(2, 0, k)?.contiguous()?)
            };
            out.taps.insert(format!("topk.{k}.ids"), i);
            out.taps.insert(format!("topk.{k}.logprobs"), l);
        }
        Ok(out)
    }
    fn vocab_size(&self) -> usize {
        self.store.header().vocab
    }
    fn context_len(&self) -> usize {
        self.store.header().seq_len
    }
    /// The parameters of the teacher the cache was built from (none are loaded).
    fn num_params(&self) -> usize {
        self.store.header().teacher.params
    }
    fn available_taps(&self) -> Vec<String> {
        vec![format!("topk.{}", self.store.header().k)]
    }
    fn supports_tap(&self, name: &str) -> bool {
        parse_topk_tap(name).is_some_and(|k| k >= 1 && k <= self.store.header().k)
    }
    fn describe(&self) -> String {
        let h = self.store.header();
        format!(
            "cached top-{} ({}) of [{}] from {}",
            h.k,
            h.values.name(),
            h.teacher.describe,
            self.store.dir().display()
        )
    }
    fn info(&self) -> ModelInfo {
        let h = self.store.header();
        ModelInfo {
            layers: 0,
            hidden: 0,
            heads: 0,
            vocab: h.vocab,
            context: h.seq_len,
            dtype: DType::F32,
        }
    }
    fn tokenizer_identity(&self) -> Option<String> {
        Some(self.store.header().tokenizer.clone())
    }
    fn sparse_topk(&self) -> Option<usize> {
        Some(self.store.header().k)
    }
    fn aligned_windows(&self) -> Option<usize> {
        Some(self.store.header().seq_len)
    }
    fn check_data(&self, data: &dyn DataSource, seq_len: usize) -> Result<()> {
        let h = self.store.header();
        if seq_len != h.seq_len {
            return Err(self.mismatch("the window length (train.seq_len)", h.seq_len, seq_len));
        }
        if data.tokenizer().identity() != h.tokenizer {
            return Err(self.mismatch("the tokenizer", "another tokenizer", "the data's"));
        }
        if data.tokenizer().vocab_size() != h.vocab {
            return Err(self.mismatch("the vocabulary size", h.vocab, data.tokenizer().vocab_size()));
        }
        for split in [Split::Train, Split::Val] {
            let info = h.split(split);
            let tokens = data.tokens(split);
            if tokens.len() != info.tokens {
                return Err(self.mismatch(&format!("the {split:?} split's token count"), info.tokens, tokens.len()));
            }
            let fp = fingerprint(tokens, seq_len);
            if fp != info.fingerprint {
                return Err(self.mismatch(
                    &format!("the {split:?} split's token stream (fingerprint)"),
                    &info.fingerprint,
                    fp,
                ));
            }
        }
        Ok(())
    }
}

fn build(params: &Params, _ctx: &BuildContext) -> Result<Box<dyn Teacher>> {
    let p: CachedParams = params.parse()?;
    Ok(Box::new(CachedTeacher::open(&p.path, &params.key_path("path"))?))
}

inventory::submit! {
    Factory::<dyn Teacher> {
        kind: "cached",
        description: "a teacher's top-k log-probs read from a logit cache built by `retort cache` (no teacher forward)",
        build, params: retort_core::registry::params_schema::<CachedParams> }
}
