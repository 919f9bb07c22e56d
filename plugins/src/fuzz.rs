//! Strategies for the property tests of the file readers: arbitrary bytes, and small valid files
//! damaged by a few random edits (flipped bits, overwritten length fields, truncation, bytes
//! appended), plus the check every reader must pass: it succeeds, or fails with a user error
//! (exit code 2) that names the file.

use proptest::prelude::*;
use proptest::sample::Index;

use retort_core::Error;

/// Cases per property: enough to reach past the headers, few enough for a few seconds each.
pub const CASES: u32 = 256;

/// The config of the properties.
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: CASES,
        // Shrinking a failure stays quick: the inputs are small.
        max_shrink_iters: 2048,
        ..ProptestConfig::default()
    }
}

/// One edit of a file.
#[derive(Debug, Clone)]
pub enum Edit {
    /// XOR a byte with a non-zero mask.
    Flip(Index, u8),
    /// Overwrite 8 (or fewer, at the end) bytes with a little-endian value: lengths and counts.
    Word(Index, u64, bool),
    /// Cut the file at a point.
    Truncate(Index),
    /// Append bytes.
    Extend(Vec<u8>),
}

/// Values that break length and count fields: zero, huge, just past a 32-bit width, small.
fn word() -> impl Strategy<Value = u64> {
    prop_oneof![
        Just(0u64),
        Just(u64::MAX),
        Just(u32::MAX as u64),
        Just(1u64 << 32),
        Just(1u64 << 62),
        Just(i64::MAX as u64 + 1),
        0u64..300,
        any::<u64>(),
    ]
}

/// Up to `n` random edits.
pub fn edits(n: usize) -> impl Strategy<Value = Vec<Edit>> {
    let edit = prop_oneof![
        4 => (any::<Index>(), 1u8..=255).prop_map(|(i, m)| Edit::Flip(i, m)),
        3 => (any::<Index>(), word(), any::<bool>()).prop_map(|(i, w, narrow)| Edit::Word(i, w, narrow)),
        1 => any::<Index>().prop_map(Edit::Truncate),
        1 => prop::collection::vec(any::<u8>(), 1..16).prop_map(Edit::Extend),
    ];
    prop::collection::vec(edit, 1..=n)
}

/// `bytes` with `edits` applied in order.
pub fn apply(bytes: &[u8], edits: &[Edit]) -> Vec<u8> {
    let mut b = bytes.to_vec();
    for e in edits {
        match e {
            Edit::Flip(i, m) if !b.is_empty() => {
                let at = i.index(b.len());
                b[at] ^= m;
            }
            Edit::Word(i, w, narrow) if !b.is_empty() => {
                let at = i.index(b.len());
                let bytes = if *narrow {
                    (*w as u32).to_le_bytes().to_vec()
                } else {
                    w.to_le_bytes().to_vec()
                };
                let n = bytes.len().min(b.len() - at);
                b[at..at + n].copy_from_slice(&bytes[..n]);
            }
            Edit::Truncate(i) => {
                let at = i.index(b.len() + 1);
                b.truncate(at);
            }
            Edit::Extend(more) => b.extend_from_slice(more),
            _ => {}
        }
    }
    b
}

/// Arbitrary bytes, up to `max` of them, that start with `prefix` half of the time (so that a
/// reader gets past its magic).
pub fn bytes_after(prefix: &'static [u8], max: usize) -> impl Strategy<Value = Vec<u8>> {
    (any::<bool>(), prop::collection::vec(any::<u8>(), 0..max)).prop_map(move |(magic, rest)| {
        if magic {
            [prefix, &rest[..]].concat()
        } else {
            rest
        }
    })
}

/// The reader's verdict is acceptable: success, or a user error (exit code 2) naming `file`.
pub fn user_error_naming<T>(result: Result<T, Error>, file: &str) -> Result<Option<T>, TestCaseError> {
    match result {
        Ok(v) => Ok(Some(v)),
        Err(e) => {
            let msg = e.to_string();
            prop_assert_eq!(e.exit_code(), 2, "not a user error: {}", msg);
            prop_assert!(msg.contains(file), "the error does not name {}: {}", file, msg);
            Ok(None)
        }
    }
}
