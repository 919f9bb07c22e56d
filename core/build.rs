//! Captures the ABI fingerprint of this build: retort version, rustc version, candle version and
//! features, target triple. Dynamic plugins must match it field for field.

use std::process::Command;

fn main() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let rustc_version = Command::new(&rustc)
        .arg("--version")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|| "unknown".into());
    let target = std::env::var("TARGET").unwrap_or_else(|_| "unknown".into());
    let version = std::env::var("CARGO_PKG_VERSION").unwrap_or_default();
    let mut features = Vec::new();
    for f in ["CUDA", "METAL"] {
        if std::env::var(format!("CARGO_FEATURE_{f}")).is_ok() {
            features.push(f.to_lowercase());
        }
    }
    let features = if features.is_empty() {
        "cpu".to_string()
    } else {
        features.join("+")
    };
    // The candle version is pinned exactly in the workspace; a unit test keeps this in sync.
    let candle = "0.11.1";
    println!(
        "cargo:rustc-env=RETORT_FINGERPRINT=sdk={version};rustc={rustc_version};candle={candle};features={features};target={target}"
    );
    println!("cargo:rerun-if-changed=build.rs");
}
