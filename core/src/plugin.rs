//! Dynamic plugins: the registrar a plugin library fills, and the ABI fingerprint checked
//! before any Rust-ABI symbol of the library is touched.
//!
//! `inventory` registrations do not cross a `cdylib` boundary (a loaded library has its own
//! copy of the registry), so a plugin exports exactly two symbols, written by
//! `retort_sdk::export_plugin!`:
//!
//! - [`FINGERPRINT_SYMBOL`]: `extern "C" fn() -> *const c_char`, the NUL-terminated
//!   [`FINGERPRINT`] of the retort it was built against. C ABI, so reading it is sound whatever
//!   compiler built the library.
//! - [`REGISTER_SYMBOL`]: `fn(&mut dyn Registrar)`, Rust ABI: called only after the fingerprint
//!   matched field for field (same retort, rustc, candle and features, target), which is what
//!   makes passing `dyn` trait objects and candle tensors across the boundary sound.

pub use crate::registry::Registrar;

/// `sdk=..;rustc=..;candle=..;features=..;target=..` of this build.
pub const FINGERPRINT: &str = env!("RETORT_FINGERPRINT");

/// [`FINGERPRINT`] with a trailing NUL, for the C-ABI export.
pub const FINGERPRINT_NUL: &str = concat!(env!("RETORT_FINGERPRINT"), "\0");

/// Name of the exported fingerprint function.
pub const FINGERPRINT_SYMBOL: &str = "retort_plugin_fingerprint";

/// Name of the exported registration function.
pub const REGISTER_SYMBOL: &str = "retort_plugin_register";

/// Signature of the registration function.
pub type RegisterFn = fn(&mut dyn Registrar);

/// `(field, value)` pairs of a fingerprint string.
pub fn fingerprint_fields(fingerprint: &str) -> Vec<(&str, &str)> {
    fingerprint.split(';').filter_map(|kv| kv.split_once('=')).collect()
}

/// The first field where `theirs` differs from `ours`: `(field, ours, theirs)`.
pub fn fingerprint_mismatch<'a>(ours: &'a str, theirs: &'a str) -> Option<(&'a str, &'a str, &'a str)> {
    let t = fingerprint_fields(theirs);
    for (k, v) in fingerprint_fields(ours) {
        let other = t
            .iter()
            .find(|(tk, _)| *tk == k)
            .map(|(_, tv)| *tv)
            .unwrap_or("<missing>");
        if other != v {
            return Some((k, v, other));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_names_every_field_and_the_pinned_candle() {
        let fields: Vec<&str> = fingerprint_fields(FINGERPRINT).iter().map(|(k, _)| *k).collect();
        assert_eq!(fields, vec!["sdk", "rustc", "candle", "features", "target"]);
        // The candle version in build.rs must be the workspace's exact pin.
        let manifest =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml")).expect("Cargo.toml");
        let candle = fingerprint_fields(FINGERPRINT)
            .into_iter()
            .find(|(k, _)| *k == "candle")
            .expect("candle")
            .1;
        assert!(
            manifest.contains(&format!("candle-core = \"={candle}\"")),
            "build.rs candle {candle} is not the pin"
        );
    }

    #[test]
    fn mismatch_names_field_and_both_values() {
        let theirs = FINGERPRINT.replace("rustc=", "rustc=rustc 0.0.1 ");
        let (field, ours, other) = fingerprint_mismatch(FINGERPRINT, &theirs).expect("mismatch");
        assert_eq!(field, "rustc");
        assert!(other.starts_with("rustc 0.0.1") && ours != other);
        assert!(fingerprint_mismatch(FINGERPRINT, FINGERPRINT).is_none());
    }

    #[test]
    fn a_plugin_built_against_sdk_0_5_is_refused() {
        // 0.6.0 changed a trait layout (DataSource::prompts): a 0.5.0 plugin must be refused on
        // the `sdk` field, not crash.
        let ours_sdk = fingerprint_fields(FINGERPRINT)[0];
        assert_eq!(ours_sdk, ("sdk", "0.6.0"));
        let theirs = FINGERPRINT.replace("sdk=0.6.0;", "sdk=0.5.0;");
        assert_eq!(
            fingerprint_mismatch(FINGERPRINT, &theirs),
            Some(("sdk", "0.6.0", "0.5.0"))
        );
    }
}
