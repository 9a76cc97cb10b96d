//! Resolving a `--model` argument to weights, config and tokenizer.
//!
//! Accepted forms:
//! - `smollm2`: SmolLM2-135M-Instruct from the cache (see [`crate::smollm2_path`]);
//! - `FILE.gguf`: a Llama-architecture GGUF (weights dequantised, tokenizer from its metadata);
//! - `FILE.safetensors`: a blr checkpoint whose metadata records `model.architecture` = llama
//!   and `model.config` (as written by [`save_checkpoint`]); layers may be in any BLR format;
//! - `DIR`: a Hugging Face model directory (`config.json` with `model_type` llama, and
//!   `model.safetensors`); no tokenizer (HF's tokenizer.json is not read: pass a GGUF);
//! - `random:NAME[:LAYERS]`: random weights of a named shape ([`crate::llama::NAMED`]), with only
//!   the first LAYERS blocks if given (seed 0). No tokenizer.

use crate::gguf::GgufFile;
use crate::llama::{self, LlamaConfig};
use crate::tokenizer::Tokenizer;
use crate::{weights, Error, Result};
use blr_core::checkpoint::Checkpoint;
use std::path::{Path, PathBuf};

/// Weights, config and (when the source has one) tokenizer of a Llama model.
pub struct LoadedLlama {
    pub cfg: LlamaConfig,
    pub weights: Checkpoint,
    pub tokenizer: Option<Tokenizer>,
    /// What was loaded, for reports.
    pub source: String,
}

/// Resolves `smollm2` to the cached file; other strings are paths.
pub fn resolve_path(spec: &str) -> Result<PathBuf> {
    if spec == "smollm2" {
        return crate::smollm2_path();
    }
    let p = PathBuf::from(spec);
    if !p.exists() {
        return Err(Error::NotFound {
            what: "model file".into(),
            path: p,
            hint: "pass a .gguf file, a blr checkpoint (.safetensors), `smollm2`, or random:NAME"
                .into(),
        });
    }
    Ok(p)
}

/// Loads a tokenizer from a GGUF file.
pub fn tokenizer_from_gguf(path: &Path) -> Result<Tokenizer> {
    Tokenizer::from_gguf(&GgufFile::open(path)?)
}

/// Loads a Llama model given as described in the module docs.
pub fn load_llama(spec: &str) -> Result<LoadedLlama> {
    if let Some(rest) = spec.strip_prefix("random:") {
        let (name, layers) = match rest.split_once(':') {
            Some((n, l)) => {
                let l: usize = l.parse().map_err(|_| {
                    Error::input("model", format!("'{l}' in '{spec}' is not a layer count"))
                })?;
                (n, Some(l))
            }
            None => (rest, None),
        };
        let cfg = LlamaConfig::named(name).ok_or_else(|| {
            Error::input(
                "model",
                format!("unknown shape '{name}' (known: {})", llama::NAMED),
            )
        })?;
        let (cfg, weights) = llama::random(&cfg, 0, layers)?;
        return Ok(LoadedLlama {
            cfg,
            weights,
            tokenizer: None,
            source: spec.to_string(),
        });
    }
    let path = resolve_path(spec)?;
    if path.is_dir() {
        let cfg = match crate::hf::read_config(&path)? {
            crate::hf::HfConfig::Llama(cfg) => cfg,
            other => {
                return Err(Error::input(
                    "model",
                    format!(
                        "{} holds {other:?}; generation and perplexity take Llama models",
                        path.display()
                    ),
                ))
            }
        };
        let st = blr_core::safetensors::SafeTensors::open(path.join("model.safetensors"))?;
        let weights = llama::from_safetensors(&st, &cfg)?;
        return Ok(LoadedLlama {
            cfg,
            weights,
            tokenizer: None,
            source: path.display().to_string(),
        });
    }
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    if is_gguf {
        let f = GgufFile::open(&path)?;
        let (cfg, weights) = llama::from_gguf(&f)?;
        let tokenizer = Some(Tokenizer::from_gguf(&f)?);
        return Ok(LoadedLlama {
            cfg,
            weights,
            tokenizer,
            source: path.display().to_string(),
        });
    }
    let ck = Checkpoint::load(&path)?;
    match weights::architecture(&ck) {
        Some("llama") => {}
        other => {
            return Err(Error::Metadata {
                source_name: path.display().to_string(),
                key: weights::KEY_ARCH.into(),
                detail: format!(
                    "is {other:?}; a Llama checkpoint records \"llama\" (written by blr from a GGUF or random model)"
                ),
            })
        }
    }
    let cfg = llama::config_from_checkpoint(&ck)?;
    Ok(LoadedLlama {
        cfg,
        weights: ck,
        tokenizer: None,
        source: path.display().to_string(),
    })
}

/// Weights, config and tokenizer of a GPT-2 model.
pub struct LoadedGpt2 {
    pub cfg: crate::gpt2::Gpt2Config,
    pub weights: Checkpoint,
    pub tokenizer: Option<Tokenizer>,
    pub source: String,
}

/// Any causal LM the command line can run.
pub enum LoadedLm {
    Llama(LoadedLlama),
    Gpt2(LoadedGpt2),
}

impl LoadedLm {
    pub fn tokenizer(&self) -> Option<&Tokenizer> {
        match self {
            LoadedLm::Llama(l) => l.tokenizer.as_ref(),
            LoadedLm::Gpt2(g) => g.tokenizer.as_ref(),
        }
    }

    pub fn source(&self) -> &str {
        match self {
            LoadedLm::Llama(l) => &l.source,
            LoadedLm::Gpt2(g) => &g.source,
        }
    }
}

/// GPT-2's tokenizer files in an HF directory (`vocab.json` + `merges.txt`), if present.
fn gpt2_tokenizer_in(dir: &Path) -> Result<Option<Tokenizer>> {
    let (v, m) = (dir.join("vocab.json"), dir.join("merges.txt"));
    if !v.is_file() || !m.is_file() {
        return Ok(None);
    }
    let read = |p: &Path| {
        std::fs::read_to_string(p).map_err(|source| Error::Io {
            path: p.to_path_buf(),
            source,
        })
    };
    Ok(Some(Tokenizer::from_vocab_merges(
        &read(&v)?,
        &read(&m)?,
        crate::tokenizer::PreTokenizer::Gpt2,
    )?))
}

/// Loads a Llama or GPT-2 model: the forms of [`load_llama`], plus HF GPT-2 directories
/// (`config.json` with `model_type` gpt2, `model.safetensors`, and `vocab.json` + `merges.txt`
/// for the tokenizer), blr checkpoints recording `gpt2`, and `random:gpt2s` / `random:gpt2m`.
pub fn load_lm(spec: &str) -> Result<LoadedLm> {
    use crate::gpt2::{self, Gpt2Config};
    if let Some(rest) = spec.strip_prefix("random:") {
        let (name, layers) = rest.split_once(':').unwrap_or((rest, ""));
        if let Some(cfg) = Gpt2Config::named(name) {
            let layers = if layers.is_empty() {
                None
            } else {
                Some(layers.parse::<usize>().map_err(|_| {
                    Error::input(
                        "model",
                        format!("'{layers}' in '{spec}' is not a layer count"),
                    )
                })?)
            };
            let (cfg, weights) = gpt2::random(&cfg, 0, layers)?;
            return Ok(LoadedLm::Gpt2(LoadedGpt2 {
                cfg,
                weights,
                tokenizer: None,
                source: spec.to_string(),
            }));
        }
        return Ok(LoadedLm::Llama(load_llama(spec)?));
    }
    let path = resolve_path(spec)?;
    if path.is_dir() {
        if let crate::hf::HfConfig::Gpt2(cfg) = crate::hf::read_config(&path)? {
            let st = blr_core::safetensors::SafeTensors::open(path.join("model.safetensors"))?;
            let weights = gpt2::from_safetensors(&st, &cfg)?;
            return Ok(LoadedLm::Gpt2(LoadedGpt2 {
                cfg,
                weights,
                tokenizer: gpt2_tokenizer_in(&path)?,
                source: path.display().to_string(),
            }));
        }
    } else if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("safetensors"))
    {
        let st = blr_core::safetensors::SafeTensors::open(&path)?;
        if st.metadata().get(weights::KEY_ARCH).map(String::as_str) == Some("gpt2") {
            let ck = Checkpoint::load(&path)?;
            let cfg = gpt2::config_from_checkpoint(&ck)?;
            return Ok(LoadedLm::Gpt2(LoadedGpt2 {
                cfg,
                weights: ck,
                tokenizer: None,
                source: path.display().to_string(),
            }));
        }
    }
    Ok(LoadedLm::Llama(load_llama(spec)?))
}

/// Saves Llama weights (any mix of formats) as a blr checkpoint that [`load_llama`] reads back.
pub fn save_checkpoint(
    path: &Path,
    cfg: &LlamaConfig,
    ck: &Checkpoint,
    dtype: blr_core::safetensors::Dtype,
) -> Result<()> {
    let mut ck = ck.clone();
    weights::put_config(&mut ck, "llama", cfg, None)?;
    ck.save(path, dtype)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;
    use crate::llama::Llama;
    use crate::lm::CausalLm;

    #[test]
    fn checkpoint_round_trip_and_random_specs() {
        let cfg = LlamaConfig {
            vocab_size: 19,
            hidden: 8,
            intermediate: 12,
            layers: 1,
            heads: 2,
            kv_heads: 1,
            head_dim: 4,
            rope_theta: 1e4,
            rope_scaling: llama::RopeScaling::Linear { factor: 2.0 },
            rms_eps: 1e-6,
            tie_embeddings: true,
            max_positions: 32,
        };
        let (cfg, ck) = llama::random(&cfg, 3, None).unwrap();
        let dir = std::env::temp_dir().join(format!("blr-models-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.safetensors");
        save_checkpoint(&path, &cfg, &ck, blr_core::safetensors::Dtype::F32).unwrap();
        let loaded = load_llama(path.to_str().unwrap()).unwrap();
        assert_eq!(loaded.cfg, cfg);
        let ids = [1u32, 5, 18, 0];
        let run = |ck: Checkpoint| {
            let m = Llama::load(Cpu, cfg.clone(), ck).unwrap();
            let mut c = m.new_cache(4).unwrap();
            m.forward(&ids, &mut c, true).unwrap()
        };
        assert_eq!(run(ck.clone()), run(loaded.weights));

        // The same weights as an HF directory: config.json + model.safetensors with HF names
        // (a dense blr checkpoint already uses them: `<layer>.weight`).
        let hf = dir.join("hf");
        std::fs::create_dir_all(&hf).unwrap();
        let mut plain = ck.clone();
        plain.metadata.clear();
        plain
            .save(
                &hf.join("model.safetensors"),
                blr_core::safetensors::Dtype::F32,
            )
            .unwrap();
        std::fs::write(
            hf.join("config.json"),
            r#"{"model_type": "llama", "vocab_size": 19, "hidden_size": 8, "intermediate_size": 12,
                "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1,
                "rope_theta": 10000.0, "rope_scaling": {"type": "linear", "factor": 2.0},
                "rms_norm_eps": 1e-6, "tie_word_embeddings": true, "max_position_embeddings": 32}"#,
        )
        .unwrap();
        let from_hf = load_llama(hf.to_str().unwrap()).unwrap();
        assert_eq!(from_hf.cfg, cfg);
        assert_eq!(run(from_hf.weights), run(ck.clone()));
        std::fs::remove_dir_all(&dir).ok();

        assert!(matches!(
            load_lm("random:gpt2s:1").unwrap(),
            LoadedLm::Gpt2(_)
        ));
        assert!(load_lm("random:gpt2s:x").is_err());
        assert!(load_llama("random:nope").is_err());
        assert!(load_llama("random:llama7b:x").is_err());
        let e = load_llama("/no/such/file.gguf").err().unwrap().to_string();
        assert!(e.contains("/no/such/file.gguf"), "{e}");
    }
}
