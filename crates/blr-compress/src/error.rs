//! The one error type of `blr-compress`: every variant names the layer (or Gram file, or
//! allocation input) at fault and says what to change.

/// Result alias for this crate.
pub type Result<T, E = CompressError> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum CompressError {
    /// The request cannot be satisfied as asked (a block count that does not divide a
    /// dimension, Monarch rank not a multiple of the block count, a weight buffer of the wrong
    /// length, NaN in the weights, a Gram of the wrong size...).
    #[error("layer '{layer}': {detail}")]
    InvalidInput { layer: String, detail: String },

    /// A decomposition failed numerically (SVD did not converge, a Gram matrix that stays
    /// indefinite after damping).
    #[error("layer '{layer}': {what} failed: {detail}")]
    Numerical {
        layer: String,
        what: &'static str,
        detail: String,
    },

    /// A calibration Gram matrix is malformed (not square, not symmetric, not finite, no
    /// tokens).
    #[error("calibration Gram {source_name}: {detail}")]
    Gram { source_name: String, detail: String },

    /// Rank selection or the global allocator was given something impossible (a ratio outside
    /// (0, 1], a budget below the sum of minimum sizes, a non-monotone curve).
    #[error("rank selection: {detail}")]
    Rank { detail: String },

    /// An error from the format layer (invalid shapes, checkpoint I/O).
    #[error(transparent)]
    Core(#[from] blr_core::Error),
}

impl CompressError {
    pub(crate) fn input(layer: &str, detail: impl Into<String>) -> Self {
        CompressError::InvalidInput {
            layer: layer.to_string(),
            detail: detail.into(),
        }
    }

    pub(crate) fn numerical(layer: &str, what: &'static str, detail: impl ToString) -> Self {
        CompressError::Numerical {
            layer: layer.to_string(),
            what,
            detail: detail.to_string(),
        }
    }

    pub(crate) fn rank(detail: impl Into<String>) -> Self {
        CompressError::Rank {
            detail: detail.into(),
        }
    }
}
