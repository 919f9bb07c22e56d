//! The fingerprints of what a run reads (artifacts::run_inputs), taken from its pipeline.

use std::collections::BTreeMap;
use std::path::PathBuf;

use retort_core::{DataSource, Result, Split};

use crate::artifacts::digest::{checkpoint_files, xxh3_file};
use crate::artifacts::run_inputs::RunInputs;
use crate::assemble::tokenizer_identity::checkpoint_of;
use crate::assemble::Pipeline;

/// The inputs of `pipeline`: its data and the files of the models it loads.
pub fn run_inputs(pipeline: &Pipeline) -> Result<RunInputs> {
    let mut model_files = BTreeMap::new();
    for path in model_paths(pipeline) {
        for file in checkpoint_files(&path)? {
            model_files.insert(file.display().to_string(), xxh3_file(&file)?);
        }
    }
    Ok(RunInputs {
        data: data_fingerprint(pipeline.data.as_ref()),
        model_files,
    })
}

/// The checkpoints the teacher and the student load, and a cached teacher's cache header (its
/// shards carry their own checksums).
fn model_paths(pipeline: &Pipeline) -> Vec<PathBuf> {
    let config = &pipeline.config;
    let mut paths: Vec<PathBuf> = [&config.teacher.params, &config.student.params]
        .into_iter()
        .filter_map(checkpoint_of)
        .collect();
    if config.teacher.kind == "cached" {
        let dir = config.teacher.params.get("path").and_then(|p| p.as_str());
        paths.extend(dir.map(|d| PathBuf::from(d).join(retort_plugins::cache::store::HEADER_FILE)));
    }
    paths
}

/// XXH3-128 of the data's tokenizer identity and token streams (both splits), in hex.
fn data_fingerprint(data: &dyn DataSource) -> String {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    h.update(data.tokenizer().identity().as_bytes());
    for split in [Split::Train, Split::Val] {
        let tokens = data.tokens(split);
        h.update(&(tokens.len() as u64).to_le_bytes());
        let mut bytes = Vec::with_capacity(4 << 16);
        for chunk in tokens.chunks(1 << 16) {
            bytes.clear();
            bytes.extend(chunk.iter().flat_map(|t| t.to_le_bytes()));
            h.update(&bytes);
        }
    }
    format!("xxh3:{:032x}", h.digest128())
}
