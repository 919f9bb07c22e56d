//! End to end with llama-family models: a tiny GGUF teacher with a byte-level BPE in its
//! metadata (written by the test with candle's GGUF writer), the data tokenized with that
//! tokenizer, a llama student; tokenizer mismatches and padded vocabularies at assembly.

use std::path::Path;

use candle_core::quantized::GgmlDType;
use retort_core::{Model, TapSet};
use retort_host::assemble::config;
use retort_host::assemble::Pipeline;
use retort_host::engine::run::{run, RunOptions};
use retort_plugins::testing::{write_tiny_gguf, TINY_BPE_TOKENS};

const CORPUS: &str = "the theory of the thing is that the other one thinks the theme then thaws. ";

fn config(dir: &Path, gguf: &Path, tokenizer: &str, student_extra: &str) -> String {
    let corpus = dir.join("corpus.txt");
    std::fs::write(&corpus, CORPUS.repeat(60)).expect("corpus");
    format!(
        r#"
[run]
name = "llama-e2e"
seed = 3

[data]
kind = "text"
path = "{corpus}"
val_fraction = 0.2
tokenizer = {tokenizer}

[teacher]
kind = "llama"
checkpoint = "{gguf}"

[student]
kind = "llama"
n_layer = 1
n_embd = 16
n_head = 2
context = 32
{student_extra}

[[loss]]
kind = "kl"
weight = 0.7
temperature = 2.0

[[loss]]
kind = "ce"
weight = 0.3

[train]
steps = 12
batch_size = 4
seq_len = 16
log_every = 4
checkpoint_every = 0

[eval]
baseline = false
batches = 2
batch_size = 4
"#,
        corpus = corpus.display(),
        gguf = gguf.display(),
    )
}

fn assemble(dir: &Path, toml: &str) -> retort_core::Result<(retort_core::config::RunConfig, config::ConfigOrigin)> {
    let p = dir.join("config.toml");
    std::fs::write(&p, toml).expect("write config");
    config::load(Some(&p), &[])
}

#[test]
fn gguf_teacher_distills_into_a_llama_student_exported_as_hf_with_its_tokenizer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("teacher.gguf");
    write_tiny_gguf(&gguf, TINY_BPE_TOKENS, GgmlDType::Q8_0, 1).expect("gguf");
    let tok = format!(r#"{{ kind = "hf", path = "{}" }}"#, gguf.display());
    let (cfg, origin) = assemble(tmp.path(), &config(tmp.path(), &gguf, &tok, "")).expect("config");
    let registry = retort_host::builtin_registry().expect("registry");
    let pipeline = Pipeline::assemble(cfg, &registry).expect("assembles");
    assert_eq!(pipeline.vocab_size, TINY_BPE_TOKENS);
    let opts = RunOptions {
        out: Some(tmp.path().join("run")),
        ..Default::default()
    };
    let outcome = run(pipeline, &origin, &opts).expect("run");
    let student = outcome.dir.join("student");
    let cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(student.join("config.json")).expect("config")).expect("json");
    assert_eq!(cfg["architectures"][0], "LlamaForCausalLM");
    assert!(student.join("model.safetensors").is_file());
    let gen: serde_json::Value =
        serde_json::from_slice(&std::fs::read(student.join("generation_config.json")).expect("gen")).expect("json");
    assert_eq!(
        (gen["bos_token_id"].as_u64(), gen["eos_token_id"].as_u64()),
        (Some(1), Some(2))
    );
    // The export carries the data's tokenizer, and loads back as a teacher with the same logits.
    let t = retort_plugins::tokenizers::hf::HfTokenizer::from_path(&student).expect("tokenizer.json");
    assert_eq!(retort_core::Tokenizer::vocab_size(&t), TINY_BPE_TOKENS);
    let reg = retort_host::builtin_registry().expect("registry");
    let ctx = retort_core::BuildContext::new(&reg, candle_core::Device::Cpu, 0);
    let params = retort_core::Params::new(
        "teacher",
        serde_json::json!({"checkpoint": student})
            .as_object()
            .expect("o")
            .clone(),
    );
    let back = reg.teachers.build("llama", &params, &ctx).expect("load export");
    assert!(back.describe().contains("llama 1L/16d"), "{}", back.describe());
    let ids = candle_core::Tensor::new(&[[5u32, 9, 261, 40]], &candle_core::Device::Cpu).expect("ids");
    let batch = retort_core::Batch {
        input_ids: ids.clone(),
        targets: ids,
        mask: None,
        source: None,
    };
    let student_model = retort_plugins::students::llama::build_llama(
        &retort_core::Params::new(
            "student",
            serde_json::json!({"checkpoint": student})
                .as_object()
                .expect("o")
                .clone(),
        ),
        &ctx,
    )
    .expect("student");
    let a = back.forward(&batch, &TapSet::none()).expect("f").logits;
    let b = student_model.forward(&batch, &TapSet::none()).expect("f").logits;
    let d = (a - b)
        .expect("d")
        .abs()
        .expect("a")
        .max_all()
        .expect("m")
        .to_scalar::<f32>()
        .expect("s");
    assert!(d < 1e-5, "{d}");
    assert!(outcome.report.student.val_loss.is_finite());
}

#[test]
fn tokenizer_mismatch_is_an_assembly_error_naming_both_sides() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("teacher.gguf");
    write_tiny_gguf(&gguf, TINY_BPE_TOKENS, GgmlDType::F32, 1).expect("gguf");
    let registry = retort_host::builtin_registry().expect("registry");
    // Char-level data against a BPE teacher: different tokenizers (and sizes).
    let (cfg, _) = assemble(tmp.path(), &config(tmp.path(), &gguf, r#"{ kind = "char" }"#, "")).expect("config");
    let err = Pipeline::assemble(cfg, &registry).err().expect("must fail");
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 2, "{msg}");
    assert!(
        msg.contains("teacher's tokenizer `bpe:262:") && msg.contains("data's tokenizer `char:"),
        "{msg}"
    );
}

#[test]
fn padded_teacher_vocabulary_is_narrowed_to_the_tokenizer() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("padded.gguf");
    // 320 output rows for a tokenizer of 262 tokens.
    write_tiny_gguf(&gguf, 320, GgmlDType::F32, 2).expect("gguf");
    let tok = format!(r#"{{ kind = "hf", path = "{}" }}"#, gguf.display());
    let registry = retort_host::builtin_registry().expect("registry");
    let (cfg, _) = assemble(tmp.path(), &config(tmp.path(), &gguf, &tok, "")).expect("config");
    let p = Pipeline::assemble(cfg, &registry).expect("assembles");
    let teacher = p.teacher.as_ref().expect("teacher");
    assert_eq!(teacher.vocab_size(), TINY_BPE_TOKENS);
    assert!(teacher.describe().contains("narrowed to 262"), "{}", teacher.describe());
    let ids = candle_core::Tensor::new(&[[5u32, 9, 261]], &candle_core::Device::Cpu).expect("ids");
    let batch = retort_core::Batch {
        input_ids: ids.clone(),
        targets: ids,
        mask: None,
        source: None,
    };
    let taps: TapSet = ["topk.4"].into_iter().collect();
    let out = teacher.forward(&batch, &taps).expect("forward");
    assert_eq!(out.logits.dims(), &[1, 3, TINY_BPE_TOKENS]);
    let top: Vec<u32> = out
        .tap("topk.4.ids")
        .expect("topk")
        .flatten_all()
        .expect("f")
        .to_vec1()
        .expect("v");
    assert!(top.iter().all(|&i| (i as usize) < TINY_BPE_TOKENS));
    // A student with fewer rows than the tokenizer has tokens is refused.
    let (cfg, _) = assemble(tmp.path(), &config(tmp.path(), &gguf, &tok, "vocab_size = 100")).expect("config");
    let msg = Pipeline::assemble(cfg, &registry).err().expect("must fail").to_string();
    assert!(
        msg.contains("student has a vocabulary of 100 tokens, the data's tokenizer has 262"),
        "{msg}"
    );
}

#[test]
fn student_initialised_from_teacher_blocks_copies_their_weights() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("teacher.gguf");
    let teacher = write_tiny_gguf(&gguf, TINY_BPE_TOKENS, GgmlDType::F32, 4).expect("gguf");
    let registry = retort_host::builtin_registry().expect("registry");
    let tok = format!(r#"{{ kind = "hf", path = "{}" }}"#, gguf.display());
    let toml = config(tmp.path(), &gguf, &tok, "").replace(
        "n_layer = 1\nn_embd = 16\nn_head = 2\ncontext = 32\n",
        "init = { from_teacher = true, layers = [1] }\ncontext = 32\n",
    );
    let (cfg, _) = assemble(tmp.path(), &toml).expect("config");
    let p = Pipeline::assemble(cfg, &registry).expect("assembles");
    let s = p.build_student(0).expect("student");
    let vars: std::collections::HashMap<String, candle_core::Var> = s.vars().into_iter().collect();
    let want = teacher
        .vars()
        .iter()
        .find(|(n, _)| n == "model.layers.1.mlp.up_proj.weight")
        .expect("t")
        .1
        .clone();
    let got = &vars["model.layers.0.mlp.up_proj.weight"];
    let d = (want.as_tensor() - got.as_tensor())
        .expect("d")
        .abs()
        .expect("a")
        .max_all()
        .expect("m")
        .to_scalar::<f32>()
        .expect("s");
    assert_eq!(d, 0.0);
    assert_eq!(s.info().layers, 1);
    assert_eq!(s.info().hidden, 32);
}

#[test]
fn llama_teacher_without_checkpoint_is_pretrained_saved_and_reloaded() {
    let tmp = tempfile::tempdir().expect("tmp");
    let toml = r#"
[run]
name = "llama-pretrain"
seed = 5

[data]
kind = "synthetic"
vocab = 16
train_tokens = 4000
val_tokens = 600

[teacher]
kind = "llama"
n_layer = 2
n_embd = 16
n_head = 2
context = 16

[teacher.pretrain]
steps = 8

[student]
kind = "llama"
n_layer = 1
n_embd = 8
n_head = 2
n_experts = 2
n_experts_used = 1
context = 16

[[loss]]
kind = "kl"

[train]
steps = 6
batch_size = 4
seq_len = 8
checkpoint_every = 0

[eval]
baseline = false
batches = 2
batch_size = 4
"#;
    let (cfg, origin) = assemble(tmp.path(), toml).expect("config");
    let registry = retort_host::builtin_registry().expect("registry");
    let pipeline = Pipeline::assemble(cfg, &registry).expect("assembles");
    let opts = RunOptions {
        out: Some(tmp.path().join("run")),
        ..Default::default()
    };
    let outcome = run(pipeline, &origin, &opts).expect("run");
    let teacher_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outcome.dir.join("teacher/config.json")).expect("teacher config"))
            .expect("json");
    assert_eq!(teacher_cfg["architectures"][0], "LlamaForCausalLM");
    let student_cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(outcome.dir.join("student/config.json")).expect("config")).expect("json");
    assert_eq!(student_cfg["architectures"][0], "MixtralForCausalLM");
    assert!(
        outcome.report.teacher.description.contains("llama 2L/16d"),
        "{}",
        outcome.report.teacher.description
    );
}

#[test]
fn student_checkpoint_with_another_tokenizer_is_refused_naming_both() {
    let tmp = tempfile::tempdir().expect("tmp");
    let gguf = tmp.path().join("teacher.gguf");
    write_tiny_gguf(&gguf, TINY_BPE_TOKENS, GgmlDType::F32, 1).expect("gguf");
    // A student checkpoint (Hugging Face directory) that carries the BPE's tokenizer.json.
    let student = retort_plugins::testing::llama(
        serde_json::json!({"n_layer": 1, "n_embd": 8, "n_head": 2, "context": 32, "vocab_size": TINY_BPE_TOKENS}),
        0,
    )
    .expect("student");
    let sdir = tmp.path().join("student");
    retort_core::Student::save(&student, &sdir).expect("save");
    let tok = retort_plugins::tokenizers::hf::HfTokenizer::from_path(&gguf).expect("tok");
    std::fs::write(
        sdir.join("tokenizer.json"),
        retort_core::Tokenizer::hf_json(&tok).expect("json"),
    )
    .expect("w");
    let toml = config(tmp.path(), &gguf, r#"{ kind = "char" }"#, "").replace(
        "n_layer = 1\nn_embd = 16\nn_head = 2\ncontext = 32\n",
        &format!("checkpoint = \"{}\"\n", sdir.display()),
    );
    let (cfg, _) = assemble(tmp.path(), &toml).expect("config");
    let registry = retort_host::builtin_registry().expect("registry");
    let err = Pipeline::assemble(cfg, &registry).err().expect("must fail");
    let msg = err.to_string();
    assert_eq!(err.exit_code(), 2);
    assert!(
        msg.contains("student's tokenizer `bpe:262:") && msg.contains("data's tokenizer `char:"),
        "{msg}"
    );
}
