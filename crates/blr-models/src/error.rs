//! The one error type of `blr-models`. Every variant names the file, tensor, byte range, token
//! or dimension at fault and, where there is one, what to do about it.

use std::path::PathBuf;

/// Result alias for this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading a file failed at the operating-system level.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// A GGUF file is malformed: bad magic, unsupported version, a length or offset that points
    /// outside the file, a value of the wrong type.
    #[error("{path}: malformed GGUF at byte {offset}: {detail}")]
    Gguf {
        path: PathBuf,
        offset: u64,
        detail: String,
    },

    /// A tensor (in a GGUF or safetensors file, or asked for by a model) is missing, has the
    /// wrong shape, or has a data type that cannot be dequantised.
    #[error("{source_name}: tensor '{tensor}': {detail}")]
    Tensor {
        source_name: String,
        tensor: String,
        detail: String,
    },

    /// A metadata key the model needs is absent or has the wrong type.
    #[error("{source_name}: metadata '{key}': {detail}")]
    Metadata {
        source_name: String,
        key: String,
        detail: String,
    },

    /// The tokenizer's vocabulary or merges are inconsistent, or text cannot be encoded.
    #[error("tokenizer: {0}")]
    Tokenizer(String),

    /// A model configuration is impossible (heads that do not divide the hidden size, ...).
    #[error("invalid {model} config: {detail}")]
    Config { model: &'static str, detail: String },

    /// An input to a model has the wrong size or is out of range (a token id past the vocab,
    /// a sequence longer than the KV cache).
    #[error("{what}: {detail}")]
    Input { what: String, detail: String },

    /// A model file or data file the caller asked for is not where it was expected.
    #[error("{what} not found at {path}: {hint}")]
    NotFound {
        what: String,
        path: PathBuf,
        hint: String,
    },

    /// The CUDA backend failed: no driver or device, a kernel that did not compile or launch,
    /// device memory over the cap. `op` is the backend op that was running.
    /// (`error` is not marked as the source, so an error chain prints the reason once.)
    #[error("CUDA backend, {op}: {error}")]
    Cuda { op: String, error: blr_cuda::Error },

    /// An error from the format layer (a linear layer's shape or factors).
    #[error(transparent)]
    Core(#[from] blr_core::Error),
}

impl Error {
    pub(crate) fn config(model: &'static str, detail: impl Into<String>) -> Self {
        Error::Config {
            model,
            detail: detail.into(),
        }
    }

    pub fn input(what: impl Into<String>, detail: impl Into<String>) -> Self {
        Error::Input {
            what: what.into(),
            detail: detail.into(),
        }
    }

    /// Names the checkpoint tensor a backend error happened on (a weight that did not fit the
    /// GPU memory cap says which one).
    pub(crate) fn loading(self, tensor: &str) -> Self {
        match self {
            Error::Cuda { op, error } => Error::Cuda {
                op: format!("loading {tensor} ({op})"),
                error,
            },
            other => other,
        }
    }
}
