//! The one error type of retort's libraries, and how each kind maps to an exit code.

use std::path::{Path, PathBuf};

/// Result with retort's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Any error, boxed, kept as the source of an [`Error`].
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Everything that can go wrong in retort's libraries.
///
/// User errors (bad config, bad input files, unknown kinds) map to exit code 2; runtime
/// failures map to exit code 1. See [`Error::exit_code`].
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A config value is missing, of the wrong type or out of range.
    #[error("config error at `{path}`: {message}")]
    Config {
        /// Key path, e.g. `loss[1].temperature`.
        path: String,
        /// What was expected and what was found.
        message: String,
    },
    /// A component names a kind that no factory registered.
    #[error("unknown {category} kind `{kind}` at `{path}`{location}; known {category} kinds: {known}")]
    UnknownKind {
        /// Category of plugin (`loss`, `router`, ...).
        category: &'static str,
        /// The kind that was asked for.
        kind: String,
        /// Key path of the component.
        path: String,
        /// Comma-separated list of the registered kinds.
        known: String,
        /// Where the value came from, e.g. ` (config.toml:12)`; may be empty.
        location: String,
    },
    /// Two factories claim the same kind in one category.
    #[error("duplicate {category} kind `{kind}`: registered by {first} and by {second}")]
    DuplicateKind {
        /// Category of plugin.
        category: &'static str,
        /// The clashing kind.
        kind: String,
        /// Source of the first registration.
        first: String,
        /// Source of the second registration.
        second: String,
    },
    /// An input the user pointed at (data file, checkpoint, run directory) is unusable.
    #[error("{what}: {message}")]
    Input {
        /// The input, e.g. `data file ../x.txt`.
        what: String,
        /// What is wrong with it.
        message: String,
    },
    /// An input the user pointed at is unusable because of another error (it does not open,
    /// parse or decode), which is kept as the source.
    #[error("{what}: {message}: {source}")]
    InputFailed {
        /// The input, e.g. `data file ../x.txt`.
        what: String,
        /// What failed, e.g. `cannot open`.
        message: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// Two components that must agree do not (vocabulary, context length, tokenizer).
    #[error("incompatible components: {0}")]
    Incompatible(String),
    /// An I/O failure while doing work (not a bad user input).
    #[error("{context} ({}): {source}", path.display())]
    Io {
        /// What retort was doing.
        context: String,
        /// The file involved.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },
    /// A tensor operation failed.
    #[error("tensor error: {0}")]
    Candle(#[from] candle_core::Error),
    /// A runtime failure caused by another error (serialising, compressing, sampling, ...),
    /// which is kept as the source.
    #[error("{context}: {source}")]
    Failed {
        /// What retort was doing.
        context: String,
        /// The underlying error.
        #[source]
        source: BoxError,
    },
    /// Any other runtime failure (non-finite loss, corrupted checkpoint, ...).
    #[error("{0}")]
    Runtime(String),
}

impl Error {
    /// A config error at `path`.
    pub fn config(path: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Config {
            path: path.into(),
            message: message.into(),
        }
    }

    /// A bad user input.
    pub fn input(what: impl Into<String>, message: impl Into<String>) -> Self {
        Error::Input {
            what: what.into(),
            message: message.into(),
        }
    }

    /// A bad user input because of `source` (`{what}: {message}: {source}`).
    pub fn input_failed(what: impl Into<String>, message: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::InputFailed {
            what: what.into(),
            message: message.into(),
            source: source.into(),
        }
    }

    /// A runtime failure while doing `context`, caused by `source` (`{context}: {source}`).
    pub fn failed(context: impl Into<String>, source: impl Into<BoxError>) -> Self {
        Error::Failed {
            context: context.into(),
            source: source.into(),
        }
    }

    /// An I/O failure with context.
    pub fn io(context: impl Into<String>, path: &Path, source: std::io::Error) -> Self {
        Error::Io {
            context: context.into(),
            path: path.to_path_buf(),
            source,
        }
    }

    /// Whether this error was caused by the user's config or inputs.
    pub fn is_user_error(&self) -> bool {
        matches!(
            self,
            Error::Config { .. }
                | Error::UnknownKind { .. }
                | Error::DuplicateKind { .. }
                | Error::Input { .. }
                | Error::InputFailed { .. }
                | Error::Incompatible(_)
        )
    }

    /// The error without the backtraces candle attaches to its errors when `RUST_BACKTRACE` is
    /// set (in its own errors, and in those kept as sources, at any depth): a user error is
    /// printed as a message, never with stack frames.
    pub fn without_backtrace(self) -> Self {
        match self {
            Error::Candle(e) => Error::Candle(strip_candle(e)),
            Error::InputFailed { what, message, source } => Error::InputFailed {
                what,
                message,
                source: strip_source(source),
            },
            Error::Failed { context, source } => Error::Failed {
                context,
                source: strip_source(source),
            },
            other => other,
        }
    }

    /// Process exit code: 2 for user errors, 1 for runtime failures.
    pub fn exit_code(&self) -> i32 {
        if self.is_user_error() {
            2
        } else {
            1
        }
    }
}

/// A boxed source without candle backtraces (a candle error, or a retort error holding one).
fn strip_source(source: BoxError) -> BoxError {
    let source = match source.downcast::<candle_core::Error>() {
        Ok(e) => return Box::new(strip_candle(*e)),
        Err(other) => other,
    };
    match source.downcast::<Error>() {
        Ok(e) => Box::new(e.without_backtrace()),
        Err(other) => other,
    }
}

/// A candle error without its backtrace layers.
fn strip_candle(e: candle_core::Error) -> candle_core::Error {
    use candle_core::Error as C;
    match e {
        C::WithBacktrace { inner, .. } => strip_candle(*inner),
        C::Context { inner, context } => C::Context {
            inner: Box::new(strip_candle(*inner)),
            context,
        },
        C::WithPath { inner, path } => C::WithPath {
            inner: Box::new(strip_candle(*inner)),
            path,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_errors_exit_2_runtime_errors_exit_1() {
        assert_eq!(Error::config("loss[1].temperature", "must be > 0").exit_code(), 2);
        assert_eq!(Error::input("data file x", "missing").exit_code(), 2);
        assert_eq!(Error::Runtime("nan".into()).exit_code(), 1);
        let msg = Error::config("loss[1].temperature", "expected a number > 0, got -1").to_string();
        assert!(msg.contains("loss[1].temperature") && msg.contains("expected"), "{msg}");
    }

    #[test]
    fn backtraces_are_stripped_at_any_depth() {
        let with_bt = || candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("bad tensor".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert!(Error::Candle(with_bt()).to_string().contains("bad tensor\n"));
        let nested = Error::input_failed(
            "model x",
            "unreadable",
            Error::input_failed("file", "tensor", with_bt()),
        );
        let direct = Error::Candle(with_bt().context("loading"));
        for e in [nested, direct, Error::failed("reading", with_bt())] {
            let kind = e.exit_code();
            let stripped = e.without_backtrace();
            let msg = stripped.to_string();
            assert!(
                msg.contains("bad tensor") && !msg.contains("bad tensor\n") && !msg.contains("at "),
                "{msg}"
            );
            assert_eq!(stripped.exit_code(), kind);
        }
    }

    #[test]
    fn caused_errors_keep_their_source_and_kind() {
        use std::error::Error as _;
        let cause = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let input = Error::input_failed("data file x", "cannot open", cause());
        assert_eq!(input.to_string(), "data file x: cannot open: no such file");
        assert_eq!(input.exit_code(), 2);
        assert_eq!(input.source().map(ToString::to_string).as_deref(), Some("no such file"));
        let failed = Error::failed("zstd", cause());
        assert_eq!(failed.to_string(), "zstd: no such file");
        assert_eq!(failed.exit_code(), 1);
        assert!(failed
            .source()
            .is_some_and(|s| s.downcast_ref::<std::io::Error>().is_some()));
    }
}
