//! Value parsers shared by the commands' options.

/// A count flag's value: an integer >= 1.
pub fn at_least_one(raw: &str) -> std::result::Result<usize, String> {
    match raw.parse::<usize>() {
        Ok(n) if n >= 1 => Ok(n),
        _ => Err(format!("expected an integer >= 1, got `{raw}`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_start_at_one() {
        assert_eq!(at_least_one("3"), Ok(3));
        for bad in ["0", "-1", "x", ""] {
            assert!(at_least_one(bad).expect_err(bad).contains(">= 1"));
        }
    }
}
