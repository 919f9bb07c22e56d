//! A trained model exported as a Hugging Face directory, with the data's tokenizer beside it
//! when it has a `tokenizer.json` form.

use std::path::Path;

use retort_core::{Result, Student, Tokenizer};

/// Saves `model` into `dir` with the record of its tokenizer (`retort_tokenizer.json`) and, when the data's tokenizer can be written as a Hugging Face
/// `tokenizer.json`, writes it beside the weights (and its special ids into
/// `generation_config.json` if the model wrote one).
pub fn save_with_tokenizer(model: &dyn Student, dir: &Path, tokenizer: &dyn Tokenizer) -> Result<()> {
    model.save(dir)?;
    super::tokenizer_record::write(dir, tokenizer)?;
    let Some(json) = tokenizer.hf_json() else {
        return Ok(());
    };
    retort_core::fsutil::write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    write_special_ids(&dir.join("generation_config.json"), tokenizer)
}

/// The tokenizer's BOS/EOS/PAD ids into `generation_config.json`, if the model wrote one.
fn write_special_ids(path: &Path, tokenizer: &dyn Tokenizer) -> Result<()> {
    let Some(mut v) = std::fs::read_to_string(path)
        .ok()
        .and_then(|text| serde_json::from_str::<serde_json::Value>(&text).ok())
    else {
        return Ok(());
    };
    for (k, id) in [
        ("bos_token_id", tokenizer.bos_id()),
        ("eos_token_id", tokenizer.eos_id()),
        ("pad_token_id", tokenizer.pad_id()),
    ] {
        if let Some(id) = id {
            v[k] = id.into();
        }
    }
    let bytes = serde_json::to_vec_pretty(&v)
        .map_err(|e| retort_core::Error::failed("serialising generation_config.json", e))?;
    retort_core::fsutil::write_atomic(path, &bytes)
}
