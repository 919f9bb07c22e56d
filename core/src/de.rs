//! Messages of config values that do not deserialize: what the key accepts and what it got,
//! e.g. `expected a number or a schedule table { kind = "linear", ... }; got a string "abc"`.

use serde::de::Unexpected;

/// A value as a user wrote it: `a string "abc"`, `the number 3`, `a boolean true`, `a list`.
pub fn describe(value: Unexpected<'_>) -> String {
    match value {
        Unexpected::Bool(b) => format!("a boolean {b}"),
        Unexpected::Unsigned(n) => format!("the number {n}"),
        Unexpected::Signed(n) => format!("the number {n}"),
        Unexpected::Float(x) => format!("the number {x}"),
        Unexpected::Char(c) => format!("a string {:?}", c.to_string()),
        Unexpected::Str(s) => format!("a string {s:?}"),
        Unexpected::Unit | Unexpected::Option => "an empty value".into(),
        Unexpected::Seq => "a list".into(),
        Unexpected::Map => "a table".into(),
        other => other.to_string(),
    }
}

/// The error `expected {expected}; got {value}`.
pub fn expected_got<E: serde::de::Error>(expected: &str, value: Unexpected<'_>) -> E {
    E::custom(format!("expected {expected}; got {}", describe(value)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_what_was_expected_and_what_came() {
        let e: serde_json::Error = expected_got("a number", Unexpected::Str("abc"));
        assert_eq!(e.to_string(), "expected a number; got a string \"abc\"");
        assert_eq!(describe(Unexpected::Seq), "a list");
        assert_eq!(describe(Unexpected::Bool(true)), "a boolean true");
    }
}
