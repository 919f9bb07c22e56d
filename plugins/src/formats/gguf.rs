//! The GGUF file format (llama.cpp's): a header of typed metadata (`general.architecture`,
//! `llama.block_count`, `tokenizer.ggml.tokens`, ...) followed by a directory of tensors,
//! quantized or not.
//!
//! Knows no model and no tokenizer: the llama loader reads tensors and architecture keys
//! through it, the `hf` tokenizer its `tokenizer.ggml.*` keys. Integers may be stored with any
//! width and sign; [`value_usize`] and [`value_f64`] read them all.

use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, Value};
use candle_core::quantized::QTensor;
use candle_core::Device;

use retort_core::{fsutil, Error, Result};

/// Whether `path` is a file starting with the GGUF magic.
pub fn is_gguf(path: &Path) -> bool {
    let mut magic = [0u8; 4];
    path.is_file() && File::open(path).and_then(|mut f| f.read_exact(&mut magic)).is_ok() && &magic == b"GGUF"
}

/// An integer metadata value.
pub fn value_usize(v: &Value) -> Option<usize> {
    Some(match v {
        Value::U8(x) => *x as usize,
        Value::I8(x) => usize::try_from(*x).ok()?,
        Value::U16(x) => *x as usize,
        Value::I16(x) => usize::try_from(*x).ok()?,
        Value::U32(x) => *x as usize,
        Value::I32(x) => usize::try_from(*x).ok()?,
        Value::U64(x) => *x as usize,
        Value::I64(x) => usize::try_from(*x).ok()?,
        _ => return None,
    })
}

/// A numeric metadata value: a float, or a (non-negative) integer.
pub fn value_f64(v: &Value) -> Option<f64> {
    match v {
        Value::F32(v) => Some(*v as f64),
        Value::F64(v) => Some(*v),
        v => value_usize(v).map(|u| u as f64),
    }
}

/// An opened GGUF file: its metadata and tensor directory (tensors are read on demand).
pub struct GgufFile {
    /// Header: metadata and tensor infos.
    pub content: Content,
    file: File,
    path: PathBuf,
    /// What errors are about (`GGUF file x.gguf`, `tokenizer x.gguf`).
    subject: String,
}

impl GgufFile {
    /// Opens and parses the header of `path`; errors name `GGUF file <path>`.
    pub fn open(path: &Path) -> Result<Self> {
        Self::open_as(path, format!("GGUF file {}", path.display()))
    }

    /// Opens and parses the header of `path`; errors (here and later) name `subject`.
    pub fn open_as(path: &Path, subject: String) -> Result<Self> {
        let mut file = File::open(path).map_err(|e| Error::input_failed(subject.clone(), "cannot open", e))?;
        let content = Content::read(&mut file)
            .map_err(|e| Error::input_failed(subject.clone(), "not a readable GGUF file", e))?;
        Ok(GgufFile {
            content,
            file,
            path: path.to_path_buf(),
            subject,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// An input error about this file.
    pub fn error(&self, msg: impl Into<String>) -> Error {
        Error::input(self.subject.clone(), msg)
    }

    /// Metadata value `key`.
    pub fn meta(&self, key: &str) -> Option<&Value> {
        self.content.metadata.get(key)
    }

    /// Integer metadata `key`, if present and an integer.
    pub fn meta_usize(&self, key: &str) -> Option<usize> {
        self.meta(key).and_then(value_usize)
    }

    /// Integer metadata `key`; an error when it is missing or not an integer.
    pub fn require_usize(&self, key: &str) -> Result<usize> {
        let v = self
            .meta(key)
            .ok_or_else(|| self.error(format!("metadata `{key}` is missing")))?;
        value_usize(v).ok_or_else(|| self.error(format!("metadata `{key}` is not an integer")))
    }

    /// Numeric metadata `key` (see [`value_f64`]).
    pub fn meta_f64(&self, key: &str) -> Option<f64> {
        self.meta(key).and_then(value_f64)
    }

    /// String metadata `key`.
    pub fn meta_str(&self, key: &str) -> Option<&str> {
        match self.meta(key)? {
            Value::String(s) => Some(s),
            _ => None,
        }
    }

    /// Boolean metadata `key`.
    pub fn meta_bool(&self, key: &str) -> Option<bool> {
        match self.meta(key)? {
            Value::Bool(b) => Some(*b),
            _ => None,
        }
    }

    /// The architecture in the metadata (`general.architecture`).
    pub fn architecture(&self) -> Result<String> {
        self.meta_str("general.architecture")
            .map(str::to_string)
            .ok_or_else(|| self.error("metadata `general.architecture` is missing"))
    }

    /// Names of every tensor in the file.
    pub fn tensor_names(&self) -> Vec<String> {
        self.content.tensor_infos.keys().cloned().collect()
    }

    /// Reads tensor `name` (as stored: quantized or not).
    pub fn tensor(&mut self, name: &str, device: &Device) -> Result<QTensor> {
        let subject = &self.subject;
        self.content
            .tensor(&mut self.file, name, device)
            .map_err(|e| Error::input_failed(subject.clone(), format!("tensor `{name}`"), e))
    }
}

/// Writes a GGUF file at `path` with `metadata` and `tensors`, atomically (a temporary file
/// renamed into place).
pub fn write(path: &Path, metadata: &[(String, Value)], tensors: &[(String, QTensor)]) -> Result<()> {
    let meta_refs: Vec<(&str, &Value)> = metadata.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let tensor_refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(k, v)| (k.as_str(), v)).collect();
    let temp = fsutil::temp_path(path);
    let mut f = File::create(&temp).map_err(|e| Error::io("creating GGUF file", &temp, e))?;
    gguf_file::write(&mut f, &meta_refs, &tensor_refs)?;
    drop(f);
    fsutil::commit_temp(&temp, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::quantized::GgmlDType;
    use candle_core::Tensor;

    fn sample(dir: &Path) -> PathBuf {
        let path = dir.join("sample.gguf");
        let meta = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("a.u8".to_string(), Value::U8(7)),
            ("a.i64".to_string(), Value::I64(-1)),
            ("a.f32".to_string(), Value::F32(0.5)),
            ("a.flag".to_string(), Value::Bool(true)),
        ];
        let t = Tensor::new(&[[1f32, 2.0], [3.0, 4.0]], &Device::Cpu).expect("t");
        let q = QTensor::quantize(&t, GgmlDType::F32).expect("q");
        write(&path, &meta, &[("w".to_string(), q)]).expect("write");
        path
    }

    #[test]
    fn typed_metadata_and_tensors_read_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = sample(dir.path());
        assert!(is_gguf(&path));
        let mut g = GgufFile::open(&path).expect("open");
        assert_eq!(g.architecture().expect("arch"), "llama");
        assert_eq!(g.meta_usize("a.u8"), Some(7));
        assert_eq!(g.meta_usize("a.i64"), None, "negative is not a usize");
        assert_eq!((g.meta_f64("a.f32"), g.meta_f64("a.u8")), (Some(0.5), Some(7.0)));
        assert_eq!((g.meta_bool("a.flag"), g.meta_str("a.flag")), (Some(true), None));
        assert_eq!(g.tensor_names(), vec!["w".to_string()]);
        let w = g
            .tensor("w", &Device::Cpu)
            .expect("w")
            .dequantize(&Device::Cpu)
            .expect("d");
        assert_eq!(w.to_vec2::<f32>().expect("v"), vec![vec![1.0, 2.0], vec![3.0, 4.0]]);
        let err = g.require_usize("a.f32").expect_err("not an integer").to_string();
        assert!(
            err.contains("GGUF file") && err.contains("`a.f32` is not an integer"),
            "{err}"
        );
        assert!(g.tensor("nope", &Device::Cpu).is_err());
    }

    #[test]
    fn other_files_are_not_gguf_and_errors_name_the_subject() {
        let dir = tempfile::tempdir().expect("tmp");
        let other = dir.path().join("x.json");
        std::fs::write(&other, "{}").expect("w");
        assert!(!is_gguf(&other) && !is_gguf(dir.path()));
        let err = GgufFile::open_as(&other, "tokenizer x.json".into())
            .err()
            .expect("not gguf");
        assert!(err.to_string().contains("tokenizer x.json"), "{err}");
    }
}
