//! safetensors files (Hugging Face weights): an 8-byte little-endian header length, a JSON
//! header (each tensor's dtype, shape and byte range), then the tensors' bytes.
//!
//! [`load`] checks what candle's reader takes on trust before handing the bytes to it: the
//! header length against the file size, and each tensor's shape (a product of dimensions that
//! overflows, with a zero dimension hiding it from the `safetensors` crate's own check, made
//! candle panic), and refuses the dtypes candle only holds as opaque bytes (`F4`, `F6_*`,
//! `F8_E8M0`), which no model here computes with. Everything else (offsets, dtypes, sizes) is
//! checked by the `safetensors` crate.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use retort_core::{Error, Result};

/// Largest JSON header read (the `safetensors` crate's limit).
const MAX_HEADER: u64 = 100_000_000;

/// Why the header is refused, if it is.
fn check_header(bytes: &[u8]) -> Option<String> {
    let len = bytes.len() as u64;
    let Some(n) = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap_or([0; 8])))
    else {
        return Some(format!("{len} bytes, shorter than the 8-byte header length"));
    };
    if n > MAX_HEADER {
        return Some(format!("a header of {n} bytes (at most {MAX_HEADER} are read)"));
    }
    if n > len - 8 {
        return Some(format!(
            "a header of {n} bytes runs past the end of the file ({len} bytes)"
        ));
    }
    // Malformed JSON is left to the `safetensors` crate, which says what is wrong.
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + n as usize]).ok()?;
    for (name, info) in header.as_object()? {
        if name == "__metadata__" {
            continue;
        }
        if let Some(dtype @ ("F4" | "F6_E2M3" | "F6_E3M2" | "F8_E8M0")) = info.get("dtype").and_then(|d| d.as_str()) {
            return Some(format!(
                "tensor `{name}` has dtype {dtype}, which retort cannot compute with"
            ));
        }
        let Some(shape) = info.get("shape").and_then(|s| s.as_array()) else {
            continue;
        };
        let dims: Vec<u64> = shape.iter().filter_map(|d| d.as_u64()).collect();
        let fits = dims
            .iter()
            .filter(|&&d| d > 0)
            .try_fold(1usize, |a, &d| usize::try_from(d).ok().and_then(|d| a.checked_mul(d)));
        if fits.is_none() {
            return Some(format!("tensor `{name}` has shape {dims:?}, whose size overflows"));
        }
    }
    None
}

/// Every tensor of the safetensors file `path`, on `device`. Errors are input errors about
/// `what` (e.g. `checkpoint <dir>`) naming the file.
pub fn load(path: &Path, device: &Device, what: &str) -> Result<HashMap<String, Tensor>> {
    let subject = || format!("unreadable safetensors {}", path.display());
    let bytes = std::fs::read(path).map_err(|e| Error::input_failed(what, subject(), e))?;
    if let Some(msg) = check_header(&bytes) {
        return Err(Error::input(what, format!("{}: {msg}", subject())));
    }
    candle_core::safetensors::load_buffer(&bytes, device).map_err(|e| Error::input_failed(what, subject(), e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fuzz::{self, user_error_naming};
    use candle_core::DType;
    use proptest::prelude::*;

    /// A small valid file: tensors of several dtypes and shapes.
    fn sample() -> Vec<u8> {
        let dev = Device::Cpu;
        let t = Tensor::arange(0f32, 6.0, &dev)
            .and_then(|t| t.reshape((2, 3)))
            .expect("t");
        let mut m = HashMap::new();
        m.insert("w".to_string(), t.clone());
        m.insert("h".to_string(), t.to_dtype(DType::F16).expect("f16"));
        m.insert(
            "b".to_string(),
            t.to_dtype(DType::BF16).and_then(|t| t.flatten_all()).expect("bf16"),
        );
        m.insert("u".to_string(), t.to_dtype(DType::U8).expect("u8"));
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s.safetensors");
        candle_core::safetensors::save(&m, &path).expect("save");
        std::fs::read(&path).expect("read")
    }

    /// A file with `header` (JSON) and `data`.
    fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
        [&(header.len() as u64).to_le_bytes()[..], header.as_bytes(), data].concat()
    }

    /// Loads `bytes`: a user error naming the file, or tensors that convert without a panic.
    fn load_bytes(bytes: &[u8]) -> std::result::Result<(), TestCaseError> {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("case.safetensors");
        std::fs::write(&path, bytes).expect("write");
        let file = path.display().to_string();
        if let Some(tensors) = user_error_naming(load(&path, &Device::Cpu, "checkpoint x"), &file)? {
            for t in tensors.values() {
                let _ = t.to_dtype(DType::F32).and_then(|t| t.sum_all());
            }
        }
        Ok(())
    }

    #[test]
    fn a_valid_file_loads_and_header_faults_are_refused_naming_the_file() {
        let good = sample();
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("m.safetensors");
        std::fs::write(&path, &good).expect("write");
        let t = load(&path, &Device::Cpu, "checkpoint x").expect("load");
        assert_eq!(t["w"].dims(), &[2, 3]);
        let refuse = |bytes: &[u8], want: &str| {
            std::fs::write(&path, bytes).expect("write");
            let err = load(&path, &Device::Cpu, "checkpoint x").expect_err("refused");
            let msg = err.to_string();
            assert!(msg.contains("m.safetensors") && msg.contains(want), "{msg}");
            assert_eq!(err.exit_code(), 2);
        };
        // Zero elements, so the `safetensors` crate accepts it, but candle's strides overflow.
        let huge = 1u64 << 40;
        refuse(
            &with_header(
                &format!(r#"{{"x":{{"dtype":"F32","shape":[0,{huge},{huge}],"data_offsets":[0,0]}}}}"#),
                &[],
            ),
            "overflows",
        );
        refuse(
            &with_header(r#"{"x":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}"#, &[0]),
            "dtype F4",
        );
        refuse(&good[..4], "shorter than");
        let mut long = good.clone();
        long[..8].copy_from_slice(&(good.len() as u64).to_le_bytes());
        refuse(&long, "runs past the end");
        refuse(&good[..good.len() - 1], "unreadable safetensors");
    }

    /// Bytes per element of a safetensors dtype (1 for the sub-byte and unknown ones).
    fn dtype_bytes(d: &str) -> u64 {
        match d {
            "F64" | "I64" | "U64" => 8,
            "F32" | "I32" | "U32" => 4,
            "F16" | "BF16" | "I16" | "U16" => 2,
            _ => 1,
        }
    }

    /// A header from random parts: a known or odd dtype, a shape with zero, small and huge
    /// dimensions, laid out back to back over data of the right length (or, with `skew`, one
    /// byte off), so that most headers get past the `safetensors` crate's own checks.
    fn headers() -> impl Strategy<Value = (String, Vec<u8>)> {
        let dtype = prop::sample::select(vec![
            "F32", "F16", "BF16", "F64", "U8", "I8", "U16", "I16", "U32", "I32", "I64", "U64", "BOOL", "F8_E4M3",
            "F8_E5M2", "F4", "F6_E2M3", "F8_E8M0", "X",
        ]);
        let dim = prop_oneof![4 => 0u64..5, 1 => Just(1u64 << 32), 1 => Just(1u64 << 62), 1 => Just(u64::MAX)];
        let tensor = (dtype, prop::collection::vec(dim, 0..4), any::<bool>());
        prop::collection::vec(tensor, 1..4).prop_map(|ts| {
            let mut at = 0u64;
            let mut entries = Vec::new();
            for (i, (d, shape, skew)) in ts.iter().enumerate() {
                let elems = shape.iter().try_fold(1u64, |a, &d| a.checked_mul(d));
                let size = elems
                    .and_then(|e| e.checked_mul(dtype_bytes(d)))
                    .filter(|&b| b <= 64)
                    .unwrap_or(3);
                let end = at + size + u64::from(*skew);
                entries.push(format!(
                    r#""t{i}":{{"dtype":"{d}","shape":{shape:?},"data_offsets":[{at},{end}]}}"#
                ));
                at = end;
            }
            (format!("{{{}}}", entries.join(",")), vec![0x3c; at as usize])
        })
    }

    proptest! {
        #![proptest_config(fuzz::config())]

        /// Arbitrary bytes are refused naming the file.
        #[test]
        fn arbitrary_bytes_are_refused_naming_the_file(bytes in fuzz::bytes_after(b"\x20\0\0\0\0\0\0\0{", 300)) {
            load_bytes(&bytes)?;
        }

        /// A valid file, damaged, is refused naming the file or loads.
        #[test]
        fn damaged_files_are_refused_naming_the_file(edits in fuzz::edits(4)) {
            load_bytes(&fuzz::apply(&sample(), &edits))?;
        }

        /// Well-formed headers with odd dtypes, shapes and offsets are refused or load.
        #[test]
        fn odd_headers_are_refused_naming_the_file((header, data) in headers()) {
            load_bytes(&with_header(&header, &data))?;
        }
    }
}
