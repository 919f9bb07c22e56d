//! The data sources for real tokenizers, end to end: memory-mapped pre-tokenized files train
//! exactly like the same tokens read from text, and JSONL documents are packed with the
//! tokenizer's end-of-sequence token.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use candle_core::Device;
use retort_core::Split;
use retort_host::assemble::config;
use retort_host::assemble::Pipeline;
use retort_plugins::testing::{write_tiny_gguf, TINY_BPE_TOKENS};
use retort_tests::{max_abs_diff, run_in};

const CORPUS: &str = "the theory of the thing is that the other one thinks the theme then thaws. ";

fn config(data: &str, gguf: &Path) -> String {
    format!(
        r#"
[run]
name = "data"
seed = 11
{data}
[teacher]
kind = "llama"
checkpoint = "{gguf}"
[student]
kind = "llama"
n_layer = 1
n_embd = 16
n_head = 2
context = 32
[[loss]]
kind = "kl"
weight = 0.7
temperature = 2.0
[[loss]]
kind = "ce"
weight = 0.3
[train]
steps = 10
batch_size = 4
seq_len = 16
checkpoint_every = 0
[eval]
baseline = false
batches = 2
batch_size = 4
"#,
        gguf = gguf.display()
    )
}

fn write_u16(path: &Path, ids: &[u32]) {
    let bytes: Vec<u8> = ids
        .iter()
        .flat_map(|&i| u16::try_from(i).expect("fits u16").to_le_bytes())
        .collect();
    std::fs::write(path, bytes).expect("write ids");
}

#[test]
fn memory_mapped_token_files_train_exactly_like_the_same_tokens_from_text() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("teacher.gguf");
    write_tiny_gguf(&gguf, TINY_BPE_TOKENS, GgmlDType::Q8_0, 1).expect("gguf");
    let corpus = tmp.path().join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(60)).expect("corpus");
    let tokenizer = format!(r#"{{ kind = "hf", path = "{}" }}"#, gguf.display());
    let text = format!(
        "[data]\nkind = \"text\"\npath = \"{}\"\nval_fraction = 0.2\ntokenizer = {tokenizer}\n",
        corpus.display()
    );
    let registry = retort_host::builtin_registry().expect("registry");

    // The text source's token streams, written as nanoGPT uint16 files.
    let text_dir = tmp.path().join("text");
    std::fs::create_dir_all(&text_dir).expect("mkdir");
    let cfg_path = text_dir.join("probe.toml");
    std::fs::write(&cfg_path, config(&text, &gguf)).expect("cfg");
    let (cfg, _) = config::load(Some(&cfg_path), &[]).expect("load");
    let p = Pipeline::assemble(cfg, &registry).expect("assemble");
    let bins = tmp.path().join("bins");
    std::fs::create_dir_all(&bins).expect("mkdir");
    write_u16(&bins.join("train.bin"), p.data.tokens(Split::Train));
    write_u16(&bins.join("val.bin"), p.data.tokens(Split::Val));
    drop(p);

    let a = run_in(&registry, &text_dir, &config(&text, &gguf), &[], false).expect("text run");
    let tokens = format!(
        "[data]\nkind = \"tokens\"\ndir = \"{}\"\ndtype = \"u16\"\ncache_dir = \"{}\"\ntokenizer = {tokenizer}\n",
        bins.display(),
        tmp.path().join("cache").display()
    );
    let bin_dir = tmp.path().join("bin-run");
    std::fs::create_dir_all(&bin_dir).expect("mkdir");
    let b = run_in(&registry, &bin_dir, &config(&tokens, &gguf), &[], false).expect("token-file run");
    assert!(b.report.data.contains("memory-mapped"), "{}", b.report.data);
    // The sidecar is keyed by the content of its source: `train.bin.<xxh3-128>.u32`.
    let sidecars: Vec<String> = std::fs::read_dir(tmp.path().join("cache"))
        .expect("cache dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        sidecars
            .iter()
            .any(|n| n.starts_with("train.bin.") && n.ends_with(".u32") && n.len() == 46),
        "{sidecars:?}"
    );
    let load = |d: &Path| candle_core::safetensors::load(d.join("student/model.safetensors"), &Device::Cpu).expect("w");
    let (wa, wb) = (load(&a.dir), load(&b.dir));
    for (name, t) in &wa {
        assert_eq!(max_abs_diff(t, &wb[name]), 0.0, "{name}");
    }
    assert_eq!(a.report.student.val_loss, b.report.student.val_loss);
}

#[test]
fn jsonl_documents_are_packed_with_eos_and_train() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("teacher.gguf");
    write_tiny_gguf(&gguf, TINY_BPE_TOKENS, GgmlDType::Q8_0, 1).expect("gguf");
    let lines: String = (0..40)
        .map(|i| {
            format!(
                "{}\n",
                serde_json::json!({"id": i, "content": CORPUS.repeat(1 + i % 3)})
            )
        })
        .collect();
    let jsonl = tmp.path().join("docs.jsonl");
    std::fs::write(&jsonl, lines).expect("jsonl");
    let data = format!(
        "[data]\nkind = \"jsonl\"\npath = \"{}\"\nfield = \"content\"\ntokenizer = {{ kind = \"hf\", path = \"{}\" }}\n",
        jsonl.display(),
        gguf.display()
    );
    let registry = retort_host::builtin_registry().expect("registry");
    let cfg_path = tmp.path().join("probe.toml");
    std::fs::write(&cfg_path, config(&data, &gguf)).expect("cfg");
    let (cfg, _) = config::load(Some(&cfg_path), &[]).expect("load");
    let p = Pipeline::assemble(cfg, &registry).expect("assemble");
    let tok = p.data.tokenizer();
    let eos = tok.eos_id().expect("the tiny BPE has an eos");
    let train = p.data.tokens(Split::Train);
    let doc = tok.encode(CORPUS).expect("encode");
    // Document 0 is one copy of the corpus, then eos; 36 train documents, 4 validation ones.
    assert_eq!(&train[..doc.len()], &doc[..]);
    assert_eq!(train[doc.len()], eos);
    assert_eq!(train.iter().filter(|&&t| t == eos).count(), 36);
    assert_eq!(p.data.tokens(Split::Val).iter().filter(|&&t| t == eos).count(), 4);
    drop(p);
    let out = run_in(&registry, tmp.path(), &config(&data, &gguf), &[], false).expect("run");
    assert!(out.report.student.val_loss.is_finite());
}
