//! The GGUF file format (llama.cpp's): a header of typed metadata (`general.architecture`,
//! `llama.block_count`, `tokenizer.ggml.tokens`, ...) followed by a directory of tensors,
//! quantized or not.
//!
//! Knows no model and no tokenizer: the llama loader reads tensors and architecture keys
//! through it, the `hf` tokenizer its `tokenizer.ggml.*` keys. Integers may be stored with any
//! width and sign; [`value_usize`] and [`value_f64`] read them all.
//!
//! The header is read here, not by candle's reader, so that a damaged or hostile file is refused
//! with the byte offset of the fault before anything is allocated from a count or length it
//! declares: every string, array and tensor must fit in what is left of the file, tensor
//! shapes must not overflow, a key or tensor name may appear once, `general.alignment` must be
//! a power of two and every tensor's bytes must lie inside the file. The result is candle's
//! [`Content`], so tensors are then read by candle.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use candle_core::quantized::gguf_file::{self, Content, TensorInfo, Value, VersionedMagic};
use candle_core::quantized::{GgmlDType, QTensor};
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
        let file = File::open(path).map_err(|e| Error::input_failed(subject.clone(), "cannot open", e))?;
        let size = file
            .metadata()
            .map_err(|e| Error::input_failed(subject.clone(), "cannot read", e))?
            .len();
        let content = read_header(BufReader::with_capacity(1 << 16, &file), size).map_err(|e| match e {
            HeaderError::Bad { at, msg } => Error::input(
                subject.clone(),
                format!("not a readable GGUF file: {msg} (at byte {at})"),
            ),
            HeaderError::Io(e) => Error::input_failed(subject.clone(), "cannot read", e),
        })?;
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

/// Deepest nesting of metadata arrays accepted (llama.cpp writes none).
const MAX_VALUE_DEPTH: usize = 16;
/// Most dimensions of a tensor (ggml's `GGML_MAX_DIMS`).
const MAX_DIMS: u32 = 4;
/// Alignment of the tensor data when `general.alignment` is absent.
const DEFAULT_ALIGNMENT: u64 = gguf_file::DEFAULT_ALIGNMENT;

/// Why a header does not read.
enum HeaderError {
    /// Malformed: at byte `at`, `msg`.
    Bad { at: u64, msg: String },
    /// The file could not be read.
    Io(std::io::Error),
}

type HeaderResult<T> = std::result::Result<T, HeaderError>;

/// A reader that knows its offset and how much of the file is left.
struct HeaderReader<R> {
    r: R,
    pos: u64,
    size: u64,
    /// Version 1 stores lengths and counts as `u32` (later versions: `u64`).
    v1: bool,
}

impl<R: Read> HeaderReader<R> {
    fn bad<T>(&self, at: u64, msg: impl Into<String>) -> HeaderResult<T> {
        Err(HeaderError::Bad { at, msg: msg.into() })
    }

    fn left(&self) -> u64 {
        self.size.saturating_sub(self.pos)
    }

    /// Fails unless `n` more bytes are in the file.
    fn need(&self, n: u64, what: &str) -> HeaderResult<()> {
        if n > self.left() {
            return self.bad(
                self.pos,
                format!(
                    "{what} needs {n} bytes, the file has {} left ({} bytes in all)",
                    self.left(),
                    self.size
                ),
            );
        }
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &str) -> HeaderResult<[u8; N]> {
        self.need(N as u64, what)?;
        let mut b = [0u8; N];
        self.r.read_exact(&mut b).map_err(HeaderError::Io)?;
        self.pos += N as u64;
        Ok(b)
    }

    fn u32(&mut self, what: &str) -> HeaderResult<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &str) -> HeaderResult<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    /// A length or count (`u32` in version 1, `u64` after).
    fn count(&mut self, what: &str) -> HeaderResult<u64> {
        if self.v1 {
            self.u32(what).map(u64::from)
        } else {
            self.u64(what)
        }
    }

    fn count_bytes(&self) -> u64 {
        if self.v1 {
            4
        } else {
            8
        }
    }

    /// A length-prefixed string (invalid UTF-8 replaced, trailing NULs dropped, as candle does).
    fn string(&mut self, what: &str) -> HeaderResult<String> {
        let n = self.count(what)?;
        self.need(n, what)?;
        let mut v = vec![0u8; n as usize];
        self.r.read_exact(&mut v).map_err(HeaderError::Io)?;
        self.pos += n;
        while v.last() == Some(&0) {
            v.pop();
        }
        Ok(String::from_utf8_lossy(&v).into_owned())
    }

    /// Fewest bytes a value of type `ty` takes, or `None` for an unknown type.
    fn min_value_bytes(&self, ty: u32) -> Option<u64> {
        Some(match ty {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            8 => self.count_bytes(),
            9 => 4 + self.count_bytes(),
            _ => return None,
        })
    }

    /// A metadata value of type `ty` (metadata key `key`, for errors).
    fn value(&mut self, ty: u32, key: &str, depth: usize) -> HeaderResult<Value> {
        let at = self.pos;
        let what = || format!("metadata `{key}`");
        Ok(match ty {
            0 => Value::U8(self.array::<1>(&what())?[0]),
            1 => Value::I8(i8::from_le_bytes(self.array::<1>(&what())?)),
            2 => Value::U16(u16::from_le_bytes(self.array::<2>(&what())?)),
            3 => Value::I16(i16::from_le_bytes(self.array::<2>(&what())?)),
            4 => Value::U32(self.u32(&what())?),
            5 => Value::I32(i32::from_le_bytes(self.array::<4>(&what())?)),
            6 => Value::F32(f32::from_le_bytes(self.array::<4>(&what())?)),
            7 => match self.array::<1>(&what())?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => return self.bad(at, format!("{}: boolean byte {b}, expected 0 or 1", what())),
            },
            8 => Value::String(self.string(&what())?),
            9 => {
                if depth >= MAX_VALUE_DEPTH {
                    return self.bad(at, format!("{}: arrays nested deeper than {MAX_VALUE_DEPTH}", what()));
                }
                let elem = self.u32(&what())?;
                let Some(min) = self.min_value_bytes(elem) else {
                    return self.bad(at, format!("{}: unknown element type {elem}", what()));
                };
                let n = self.count(&what())?;
                let at = self.pos;
                if n.checked_mul(min).is_none_or(|b| b > self.left()) {
                    return self.bad(
                        at,
                        format!(
                            "{}: an array of {n} elements cannot fit in the {} bytes left",
                            what(),
                            self.left()
                        ),
                    );
                }
                let mut vs = Vec::new();
                for _ in 0..n {
                    vs.push(self.value(elem, key, depth + 1)?);
                }
                Value::Array(vs)
            }
            10 => Value::U64(self.u64(&what())?),
            11 => Value::I64(i64::from_le_bytes(self.array::<8>(&what())?)),
            12 => Value::F64(f64::from_le_bytes(self.array::<8>(&what())?)),
            t => return self.bad(at, format!("{}: unknown value type {t}", what())),
        })
    }
}

/// ggml's tensor type `id` (the types candle reads).
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

/// Reads and checks the header of a GGUF file of `size` bytes (see the module doc).
fn read_header<R: Read>(r: R, size: u64) -> HeaderResult<Content> {
    let mut h = HeaderReader {
        r,
        pos: 0,
        size,
        v1: false,
    };
    if h.array::<4>("the magic")? != *b"GGUF" {
        return h.bad(0, "no GGUF magic");
    }
    let magic = match h.u32("the version")? {
        1 => VersionedMagic::GgufV1,
        2 => VersionedMagic::GgufV2,
        3 => VersionedMagic::GgufV3,
        v => return h.bad(4, format!("version {v}; versions 1 to 3 are read")),
    };
    h.v1 = magic == VersionedMagic::GgufV1;
    let n_tensors = h.count("the tensor count")?;
    let n_kv = h.count("the metadata count")?;
    // A metadata entry takes at least a key length, a type and one byte; a tensor entry a name
    // length, a dimension count, a type and an offset.
    let (min_kv, min_tensor) = (h.count_bytes() + 5, h.count_bytes() + 16);
    let needed = n_kv.checked_mul(min_kv).zip(n_tensors.checked_mul(min_tensor));
    if needed.and_then(|(a, b)| a.checked_add(b)).is_none_or(|n| n > h.left()) {
        let at = h.pos;
        return h.bad(
            at,
            format!(
                "{n_kv} metadata entries and {n_tensors} tensors cannot fit in the {} bytes left",
                h.left()
            ),
        );
    }
    let mut metadata = HashMap::new();
    for _ in 0..n_kv {
        let at = h.pos;
        let key = h.string("a metadata key")?;
        let ty = h.u32(&format!("the type of metadata `{key}`"))?;
        let value = h.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return h.bad(at, format!("metadata `{key}` appears twice"));
        }
    }
    let mut tensors: Vec<(String, Vec<usize>, GgmlDType, u64, u64)> = Vec::new();
    let mut names = std::collections::HashSet::new();
    for _ in 0..n_tensors {
        let at = h.pos;
        let name = h.string("a tensor name")?;
        let what = format!("tensor `{name}`");
        let n_dims = h.u32(&what)?;
        if n_dims > MAX_DIMS {
            return h.bad(
                at,
                format!("{what} has {n_dims} dimensions, at most {MAX_DIMS} are read"),
            );
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            let d = h.count(&what)?;
            dims.push(usize::try_from(d).map_err(|_| HeaderError::Bad {
                at,
                msg: format!("{what}: dimension {d} is too large"),
            })?);
        }
        let type_id = h.u32(&what)?;
        let Some(dtype) = ggml_dtype(type_id) else {
            return h.bad(at, format!("{what}: unknown tensor type {type_id}"));
        };
        let offset = h.u64(&what)?;
        let Some(elems) = dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)) else {
            return h.bad(at, format!("{what}: dimensions {dims:?} overflow"));
        };
        // An empty tensor is no weight, and candle would read it through a dangling pointer.
        if elems == 0 {
            return h.bad(at, format!("{what} has no elements (dimensions {dims:?})"));
        }
        let block = dtype.block_size();
        if dims.first().is_some_and(|d| d % block != 0) {
            return h.bad(
                at,
                format!(
                    "{what}: {dtype:?} rows of {} elements are not whole blocks of {block}",
                    dims[0]
                ),
            );
        }
        let bytes = (elems / block).checked_mul(dtype.type_size()).map(|b| b as u64);
        let Some(bytes) = bytes else {
            return h.bad(at, format!("{what}: dimensions {dims:?} overflow"));
        };
        if !names.insert(name.clone()) {
            return h.bad(at, format!("{what} appears twice"));
        }
        dims.reverse();
        tensors.push((name, dims, dtype, offset, bytes));
    }
    let end = h.pos;
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match value_usize(v) {
            Some(a) if a.is_power_of_two() => a as u64,
            _ => {
                return h.bad(
                    end,
                    format!("metadata `general.alignment` is {v:?}, expected a power of two"),
                )
            }
        },
    };
    let Some(data_at) = end.checked_next_multiple_of(alignment) else {
        return h.bad(end, format!("alignment {alignment} is past any file"));
    };
    let mut tensor_infos = HashMap::new();
    for (name, dims, ggml_dtype, offset, bytes) in tensors {
        if offset % alignment != 0 {
            return h.bad(
                end,
                format!("tensor `{name}` is at offset {offset}, not a multiple of the alignment {alignment}"),
            );
        }
        let stop = data_at.checked_add(offset).and_then(|a| a.checked_add(bytes));
        if stop.is_none_or(|s| s > size) {
            return h.bad(
                end,
                format!(
                    "tensor `{name}` ({bytes} bytes at offset {offset} from byte {data_at}) runs past the end of the file ({size} bytes)"
                ),
            );
        }
        let info = TensorInfo {
            ggml_dtype,
            shape: dims.into(),
            offset,
        };
        tensor_infos.insert(name, info);
    }
    Ok(Content {
        magic,
        metadata,
        tensor_infos,
        tensor_data_offset: data_at,
    })
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
    use crate::fuzz::{self, user_error_naming};
    use candle_core::Tensor;
    use proptest::prelude::*;

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

    /// A small file with every kind of metadata value, a custom alignment and an F32, an F16
    /// and a quantized tensor: what the damaged-file property starts from.
    fn rich_sample(dir: &Path) -> Vec<u8> {
        let path = dir.join("rich.gguf");
        let strings = Value::Array(["a", "bc", ""].iter().map(|s| Value::String(s.to_string())).collect());
        let meta = vec![
            ("general.architecture".to_string(), Value::String("llama".into())),
            ("general.alignment".to_string(), Value::U32(32)),
            ("a.i8".to_string(), Value::I8(-3)),
            ("a.u16".to_string(), Value::U16(9)),
            ("a.i16".to_string(), Value::I16(-9)),
            ("a.i32".to_string(), Value::I32(-7)),
            ("a.u64".to_string(), Value::U64(1 << 40)),
            ("a.f64".to_string(), Value::F64(0.25)),
            ("a.flag".to_string(), Value::Bool(false)),
            ("a.strings".to_string(), strings),
            ("a.ints".to_string(), Value::Array(vec![Value::I32(1), Value::I32(2)])),
            (
                "a.nested".to_string(),
                Value::Array(vec![Value::Array(vec![Value::U8(1)]), Value::Array(vec![])]),
            ),
        ];
        let t = Tensor::arange(0f32, 64.0, &Device::Cpu)
            .and_then(|t| t.reshape((2, 32)))
            .expect("t");
        let tensors = vec![
            ("f32".to_string(), QTensor::quantize(&t, GgmlDType::F32).expect("q")),
            ("f16".to_string(), QTensor::quantize(&t, GgmlDType::F16).expect("q")),
            ("q8".to_string(), QTensor::quantize(&t, GgmlDType::Q8_0).expect("q")),
        ];
        write(&path, &meta, &tensors).expect("write");
        std::fs::read(&path).expect("read")
    }

    /// Opens `bytes` as a GGUF file and reads every tensor: each step succeeds or is a user
    /// error naming the file, and nothing panics.
    fn open_everything(dir: &Path, bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
        let path = dir.join("case.gguf");
        std::fs::write(&path, bytes).expect("write");
        let file = path.display().to_string();
        let Some(mut g) = user_error_naming(GgufFile::open(&path), &file)? else {
            return Ok(());
        };
        for name in g.tensor_names() {
            if let Some(q) = user_error_naming(g.tensor(&name, &Device::Cpu), &file)? {
                // Dequantizing is not reading: any outcome but a panic.
                let _ = q.dequantize(&Device::Cpu);
            }
        }
        Ok(())
    }

    #[test]
    fn a_valid_rich_file_reads_back() {
        let dir = tempfile::tempdir().expect("tmp");
        let bytes = rich_sample(dir.path());
        let path = dir.path().join("rich.gguf");
        let mut g = GgufFile::open(&path).expect("open");
        assert_eq!(g.meta_usize("a.u64"), Some(1 << 40));
        assert_eq!(g.content.tensor_data_offset % 32, 0);
        let q8 = g.tensor("q8", &Device::Cpu).expect("q8");
        assert_eq!(q8.shape().dims(), &[2, 32]);
        assert!(open_everything(dir.path(), &bytes).is_ok());
    }

    /// Header faults found by the properties below, each refused with its offset.
    #[test]
    fn header_faults_are_refused_with_their_offset() {
        let dir = tempfile::tempdir().expect("tmp");
        let good = rich_sample(dir.path());
        let at = |needle: &[u8]| good.windows(needle.len()).position(|w| w == needle).expect("needle");
        let path = dir.path().join("bad.gguf");
        let refuse = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).expect("write");
            let err = GgufFile::open(&path).err().expect("refused");
            let msg = err.to_string();
            assert!(
                msg.contains("bad.gguf") && msg.contains(want) && msg.contains("(at byte"),
                "{msg}"
            );
            assert_eq!(err.exit_code(), 2);
        };
        // general.alignment = 0 (candle divides by it).
        let mut b = good.clone();
        let v = at(b"general.alignment") + "general.alignment".len() + 4;
        b[v..v + 4].copy_from_slice(&0u32.to_le_bytes());
        refuse(&b, "general.alignment");
        // A dimension so large that the element count overflows (candle multiplies unchecked).
        let mut b = good.clone();
        let d = at(b"f32") + 3 + 4;
        b[d..d + 8].copy_from_slice(&(1u64 << 62).to_le_bytes());
        b[d + 8..d + 16].copy_from_slice(&(1u64 << 62).to_le_bytes());
        refuse(&b, "overflow");
        // A string length past the end of the file.
        let mut b = good.clone();
        let s = at(b"general.architecture") - 8;
        b[s..s + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        refuse(&b, "needs");
        // Two tensors with one name.
        let mut b = good.clone();
        let n = at(b"f16");
        b[n..n + 3].copy_from_slice(b"f32");
        refuse(&b, "appears twice");
        // A tensor past the end of the file (the last one, 68 bytes, is padded to 96).
        refuse(&good[..good.len() - 40], "runs past the end");
        // A tensor without elements (candle casts the dangling pointer of its empty buffer).
        let mut b = good.clone();
        b[d..d + 8].copy_from_slice(&0u64.to_le_bytes());
        refuse(&b, "no elements");
    }

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Arbitrary bytes (half of them after a GGUF v3 magic) are refused or read.
        #[test]
        fn arbitrary_bytes_are_refused_naming_the_file(bytes in fuzz::bytes_after(b"GGUF\x03\0\0\0", 600)) {
            let dir = tempfile::tempdir().expect("tmp");
            open_everything(dir.path(), &bytes)?;
        }

        /// A valid file with a few bytes flipped, a length overwritten, cut or extended is
        /// refused or read.
        #[test]
        fn damaged_files_are_refused_naming_the_file(edits in fuzz::edits(4)) {
            let dir = tempfile::tempdir().expect("tmp");
            let good = rich_sample(dir.path());
            open_everything(dir.path(), &fuzz::apply(&good, &edits))?;
        }
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
