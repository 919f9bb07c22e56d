//! What a run reads besides its config, fingerprinted when it starts and verified on resume:
//! the data (tokenizer and token streams) and the files of the models it loads (teacher and
//! student checkpoints, a teacher's logit cache header).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Fingerprints of a run's inputs, as `run.json` records them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunInputs {
    /// Fingerprint of the data the run trains on (tokenizer identity and token streams).
    pub data: String,
    /// `xxh3:<hex>` of each model file the run loads, by path as configured.
    pub model_files: BTreeMap<String, String>,
}

impl RunInputs {
    /// What differs in `now` from these inputs (recorded when the run started), in words;
    /// `None` if nothing. `model_files` is compared only when `with_models` (a run recorded by
    /// a retort that did not fingerprint them).
    pub fn difference(&self, now: &RunInputs, with_models: bool) -> Option<String> {
        if self.data != now.data {
            return Some(format!(
                "the data changed since the run started (fingerprint {}, run.json says {}): a resumed \
                 run must train on the data it started with; restore it, or start a new run",
                now.data, self.data
            ));
        }
        if !with_models {
            return None;
        }
        let changed = |file: &str, was: Option<&String>, is: Option<&String>| {
            let (was, is) = (was.map_or("absent", |s| s), is.map_or("absent", |s| s));
            format!(
                "model file {file} changed since the run started ({is}, run.json says {was}): a resumed run \
                 must load the models it started with; restore it, or start a new run"
            )
        };
        let files = self.model_files.keys().chain(now.model_files.keys());
        files
            .filter(|f| self.model_files.get(*f) != now.model_files.get(*f))
            .map(|f| changed(f, self.model_files.get(f), now.model_files.get(f)))
            .next()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inputs(data: &str, files: &[(&str, &str)]) -> RunInputs {
        RunInputs {
            data: data.into(),
            model_files: files.iter().map(|(f, h)| (f.to_string(), h.to_string())).collect(),
        }
    }

    #[test]
    fn names_the_changed_data_or_model_file() {
        let started = inputs("d1", &[("t.gguf", "xxh3:1"), ("s/model.safetensors", "xxh3:2")]);
        assert_eq!(started.difference(&started.clone(), true), None);
        let msg = started.difference(&inputs("d2", &[]), true).expect("data");
        assert!(msg.contains("the data changed"), "{msg}");
        let edited = inputs("d1", &[("t.gguf", "xxh3:9"), ("s/model.safetensors", "xxh3:2")]);
        let msg = started.difference(&edited, true).expect("teacher");
        assert!(
            msg.contains("t.gguf") && msg.contains("xxh3:9") && msg.contains("xxh3:1"),
            "{msg}"
        );
        let added = inputs(
            "d1",
            &[
                ("t.gguf", "xxh3:1"),
                ("s/model.safetensors", "xxh3:2"),
                ("s/extra", "xxh3:3"),
            ],
        );
        let msg = started.difference(&added, true).expect("new file");
        assert!(msg.contains("s/extra") && msg.contains("absent"), "{msg}");
        assert_eq!(
            started.difference(&edited, false),
            None,
            "not compared for an older run"
        );
    }
}
