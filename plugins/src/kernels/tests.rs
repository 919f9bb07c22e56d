//! Tests of the kernels as a whole: where the raw code lives, and the support tables.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};

use super::Support;

/// Every `.rs` file below `dir`.
fn rust_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).expect("read kernels dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            out.extend(rust_files(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
    out
}

/// The kernels' code that opts out of the compiler's memory-safety checks lives in
/// `kernels/cpu/raw/`, `kernels/cuda/raw.rs` and `kernels/emulated/raw.rs` only: no other file under
/// `plugins/src/kernels` may write the keyword (which also rules out allowing the lint that
/// forbids it), not even in a comment.
#[test]
fn the_raw_code_stays_in_cpu_raw() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src").join("kernels");
    let raw = root.join("cpu").join("raw");
    let cuda_raw = root.join("cuda").join("raw.rs");
    let emulated_raw = root.join("emulated").join("raw.rs");
    // Spelled in two parts so that this file does not contain the word it looks for.
    let needle = ["un", "safe"].concat();
    let files = rust_files(&root);
    assert!(
        files.len() > 30,
        "read only {} files under {}",
        files.len(),
        root.display()
    );
    assert!(
        files.iter().any(|f| f.starts_with(&raw)),
        "no files under {}",
        raw.display()
    );
    let mut found = Vec::new();
    for file in files
        .iter()
        .filter(|f| !f.starts_with(&raw) && **f != cuda_raw && **f != emulated_raw)
    {
        let text = std::fs::read_to_string(file).expect("read source");
        for (i, line) in text.lines().enumerate() {
            if line.contains(&needle) {
                found.push(format!("{}:{}: {}", file.display(), i + 1, line.trim()));
            }
        }
    }
    assert!(
        found.is_empty(),
        "outside kernels/cpu/raw/, kernels/cuda/raw.rs and kernels/emulated/raw.rs:\n{}",
        found.join("\n")
    );
}

#[test]
fn support_admits_the_listed_dtypes_on_the_listed_devices() {
    let s = Support {
        cpu: &[DType::F32, DType::F64],
        cuda: &[],
    };
    let t = |dtype: DType| Tensor::zeros(3, dtype, &Device::Cpu).expect("t");
    assert!(s.admits(&t(DType::F32)) && s.admits(&t(DType::F64)));
    assert!(!s.admits(&t(DType::F16)) && !s.admits(&t(DType::BF16)) && !s.admits(&t(DType::U32)));
    assert!(s.admits_together(&t(DType::F32), &[&t(DType::F32), &t(DType::F32)]));
    assert!(!s.admits_together(&t(DType::F32), &[&t(DType::F32), &t(DType::F64)]));
    assert!(!s.admits_together(&t(DType::F16), &[]));
    let none = Support { cpu: &[], cuda: &[] };
    assert!(!none.admits(&t(DType::F32)));
}
