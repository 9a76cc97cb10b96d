//! The one error type of `blr-core`: every variant names the layer, tensor, file or dimension
//! at fault so that a message can be acted on without a debugger.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A format's configuration is impossible (a block count that does not divide a dimension,
    /// rank 0, factors whose shapes disagree...).
    #[error("invalid {format} layer: {detail}")]
    InvalidConfig {
        format: &'static str,
        detail: String,
    },

    /// An input to a computation has the wrong size.
    #[error("shape mismatch in {what}: expected {expected}, got {got}")]
    Shape {
        what: String,
        expected: String,
        got: String,
    },

    /// Reading or writing a file failed at the operating-system level.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A file is malformed: bad header, truncated data, offsets out of range.
    #[error("{path}: {detail}")]
    Malformed { path: PathBuf, detail: String },

    /// A tensor inside a file is missing or does not match what its metadata promises.
    #[error("{path}: tensor '{tensor}': {detail}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        detail: String,
    },

    /// A name that should be one of a fixed set is not (format, dtype, strategy).
    #[error("unknown {what} '{got}' (expected one of: {expected})")]
    Unknown {
        what: &'static str,
        got: String,
        expected: &'static str,
    },
}

impl Error {
    pub(crate) fn config(format: &'static str, detail: impl Into<String>) -> Self {
        Error::InvalidConfig {
            format,
            detail: detail.into(),
        }
    }

    pub(crate) fn shape(
        what: impl Into<String>,
        expected: impl ToString,
        got: impl ToString,
    ) -> Self {
        Error::Shape {
            what: what.into(),
            expected: expected.to_string(),
            got: got.to_string(),
        }
    }
}
