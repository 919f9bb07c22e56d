//! Checks of single config values and of one component against the data, made before anything
//! trains; each failure names the key path and what was expected.

use retort_core::config::{EvalSection, ParallelSection, RunSection, TrainSection};
use retort_core::{DataSource, Error, Result, Split};

/// `run.name` names the run directory `runs/<name>`: one plain path component.
pub(super) fn run_name(run: &RunSection) -> Result<()> {
    let mut parts = std::path::Path::new(&run.name).components();
    match (parts.next(), parts.next()) {
        (Some(std::path::Component::Normal(_)), None) => Ok(()),
        _ => Err(Error::config(
            "run.name",
            format!(
                "expected a plain name for the run directory runs/<name> (no `/`, `..` or absolute \
                 path; choose the directory with --out), got {:?}",
                run.name
            ),
        )),
    }
}

/// A loss term's or a stage's `name` at `key`: an identifier (letters, digits, `_`, `-`, `.`;
/// 1 to 64 of them), as metrics, reports and `stages.loss_weights.<name>` use it as a key.
pub(super) fn identifier(key: &str, name: &str) -> Result<()> {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.');
    if (1..=64).contains(&name.len()) && name.chars().all(valid) {
        return Ok(());
    }
    Err(Error::config(
        key,
        format!("expected a name of 1 to 64 letters, digits, `_`, `-` or `.` (it keys metrics), got {name:?}"),
    ))
}

/// A global batch the ranks of a data-parallel run share evenly, and a bucket size.
pub(super) fn batch_over_ranks(t: &TrainSection, p: &ParallelSection, ranks: usize) -> Result<()> {
    if p.bucket_mb == 0 {
        return Err(Error::config("parallel.bucket_mb", "expected an integer >= 1, got 0"));
    }
    if ranks > 1 && !t.batch_size.is_multiple_of(ranks) {
        return Err(Error::config(
            "train.batch_size",
            format!(
                "is {}, not a multiple of the {ranks} ranks this run was launched with: every rank \
                 reads train.batch_size / ranks windows of each batch",
                t.batch_size
            ),
        ));
    }
    Ok(())
}

/// `[train]` and `[eval]` values that no component checks itself.
pub(super) fn train_and_eval(t: &TrainSection, eval: &EvalSection) -> Result<()> {
    for (key, v) in [
        ("train.steps", t.steps),
        ("train.batch_size", t.batch_size),
        ("train.seq_len", t.seq_len),
        ("train.grad_accum", t.grad_accum),
    ] {
        if v == 0 {
            return Err(Error::config(key, "expected an integer >= 1, got 0"));
        }
    }
    for (key, v) in [("train.beta1", t.beta1), ("train.beta2", t.beta2)] {
        if !(0.0..1.0).contains(&v) {
            return Err(Error::config(key, format!("expected a number in [0, 1), got {v}")));
        }
    }
    for (key, v) in [
        ("train.eps", t.eps),
        ("train.weight_decay", t.weight_decay),
        ("train.grad_clip", t.grad_clip),
    ] {
        if !(v.is_finite() && v >= 0.0) {
            return Err(Error::config(key, format!("expected a finite number >= 0, got {v}")));
        }
    }
    if let Some(d) = t.ema_decay.filter(|d| !(0.0..1.0).contains(d)) {
        return Err(Error::config(
            "train.ema_decay",
            format!("expected a number in [0, 1), got {d}"),
        ));
    }
    for (key, v) in [("eval.batches", eval.batches), ("eval.batch_size", eval.batch_size)] {
        if v == 0 {
            return Err(Error::config(key, "expected an integer >= 1, got 0"));
        }
    }
    Ok(())
}

/// Both splits hold at least one window of `seq_len` tokens plus its target.
pub(super) fn data_lengths(data: &dyn DataSource, seq_len: usize) -> Result<()> {
    for (split, name) in [(Split::Train, "training"), (Split::Val, "validation")] {
        let n = data.tokens(split).len();
        if n <= seq_len {
            return Err(Error::input(
                format!("data ({})", data.describe()),
                format!(
                    "the {name} split has {n} tokens, fewer than one window of train.seq_len = {seq_len} plus its \
                     target; use a longer corpus or a smaller train.seq_len"
                ),
            ));
        }
    }
    Ok(())
}

/// A model's vocabulary is the data's and its context holds a training window.
pub(super) fn model_fits(who: &str, vocab: usize, context: usize, data_vocab: usize, seq_len: usize) -> Result<()> {
    if vocab != data_vocab {
        return Err(Error::Incompatible(format!(
            "the {who} has a vocabulary of {vocab} tokens, the data's tokenizer has {data_vocab}"
        )));
    }
    if context < seq_len {
        return Err(Error::config(
            format!("{who}.context"),
            format!("the {who}'s context of {context} is shorter than train.seq_len = {seq_len}"),
        ));
    }
    Ok(())
}

/// `train.early_stopping` needs evaluations, a patience and a sane `min_delta`.
pub(super) fn early_stopping(t: &TrainSection) -> Result<()> {
    let Some(es) = &t.early_stopping else {
        return Ok(());
    };
    if t.eval_every == Some(0) {
        return Err(Error::config(
            "train.early_stopping",
            "early stopping evaluates every train.eval_every steps; set train.eval_every > 0 (or leave it out)",
        ));
    }
    if es.patience == 0 {
        return Err(Error::config(
            "train.early_stopping.patience",
            "expected an integer >= 1, got 0",
        ));
    }
    if !(es.min_delta.is_finite() && es.min_delta >= 0.0) {
        return Err(Error::config(
            "train.early_stopping.min_delta",
            format!("expected a finite number >= 0, got {}", es.min_delta),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_run_name_is_one_plain_path_component() {
        let named = |name: &str| RunSection {
            name: name.into(),
            ..RunSection::default()
        };
        assert!(run_name(&named("my-run_2")).is_ok());
        for bad in ["", ".", "..", "../x", "a/b", "/tmp/x"] {
            let err = run_name(&named(bad)).expect_err(bad);
            assert!(err.to_string().contains("run.name"), "{err}");
        }
    }

    #[test]
    fn names_are_identifiers() {
        for ok in ["kl", "hidden_mse-2", "stage.1"] {
            identifier("loss[0].name", ok).expect(ok);
        }
        for bad in ["", "a/b", "two words", &"x".repeat(65)] {
            let err = identifier("loss[0].name", bad).expect_err(bad).to_string();
            assert!(err.contains("loss[0].name"), "{err}");
        }
    }
}
