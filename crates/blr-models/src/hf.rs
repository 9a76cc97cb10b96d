//! Hugging Face model directories: `config.json` next to `model.safetensors`. The config
//! decides the architecture (`model_type`) and the shapes; the safetensors file is then read
//! with that model's HF tensor names.

use crate::gpt2::Gpt2Config;
use crate::llama::{LlamaConfig, RopeScaling};
use crate::vit::VitConfig;
use crate::{Error, Result};
use serde_json::Value;
use std::path::Path;

/// A parsed HF config.
#[derive(Clone, Debug, PartialEq)]
pub enum HfConfig {
    Llama(LlamaConfig),
    Gpt2(Gpt2Config),
    Vit(VitConfig),
}

struct Json<'a> {
    v: &'a Value,
    src: &'a str,
}

impl Json<'_> {
    fn err(&self, key: &str, detail: &str) -> Error {
        Error::Metadata {
            source_name: self.src.to_string(),
            key: key.to_string(),
            detail: detail.to_string(),
        }
    }

    fn usize(&self, key: &str) -> Result<usize> {
        self.v
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| self.err(key, "missing or not a non-negative integer"))
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_f64().ok_or_else(|| self.err(key, "not a number")),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.v.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| self.err(key, "not a boolean")),
        }
    }
}

/// Parses `config.json` text; `src` names it in errors.
pub fn parse_config(text: &str, src: &str) -> Result<HfConfig> {
    let v: Value = serde_json::from_str(text).map_err(|e| Error::Metadata {
        source_name: src.to_string(),
        key: "(file)".into(),
        detail: format!("not valid JSON: {e}"),
    })?;
    let j = Json { v: &v, src };
    let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("");
    match model_type {
        "llama" => {
            let hidden = j.usize("hidden_size")?;
            let heads = j.usize("num_attention_heads")?;
            let rope_scaling = match v.get("rope_scaling") {
                None | Some(Value::Null) => RopeScaling::None,
                Some(rs) => {
                    let s = Json { v: rs, src };
                    let kind = rs
                        .get("rope_type")
                        .or_else(|| rs.get("type"))
                        .and_then(Value::as_str)
                        .unwrap_or("");
                    match kind {
                        "llama3" => RopeScaling::Llama3 {
                            factor: s.f64_or("factor", 8.0)?,
                            low_freq_factor: s.f64_or("low_freq_factor", 1.0)?,
                            high_freq_factor: s.f64_or("high_freq_factor", 4.0)?,
                            original_max_positions: s
                                .usize_or("original_max_position_embeddings", 8192)?,
                        },
                        "linear" => RopeScaling::Linear {
                            factor: s.f64_or("factor", 1.0)?,
                        },
                        "default" => RopeScaling::None,
                        other => {
                            return Err(j.err(
                                "rope_scaling",
                                &format!("type '{other}' is not supported (llama3, linear)"),
                            ))
                        }
                    }
                }
            };
            let cfg = LlamaConfig {
                vocab_size: j.usize("vocab_size")?,
                hidden,
                intermediate: j.usize("intermediate_size")?,
                layers: j.usize("num_hidden_layers")?,
                heads,
                kv_heads: j.usize_or("num_key_value_heads", heads)?,
                head_dim: j.usize_or("head_dim", hidden / heads.max(1))?,
                rope_theta: j.f64_or("rope_theta", 1e4)?,
                rope_scaling,
                rms_eps: j.f64_or("rms_norm_eps", 1e-6)?,
                tie_embeddings: j.bool_or("tie_word_embeddings", false)?,
                max_positions: j.usize_or("max_position_embeddings", 2048)?,
            };
            cfg.validate()?;
            Ok(HfConfig::Llama(cfg))
        }
        "gpt2" => {
            let cfg = Gpt2Config {
                vocab_size: j.usize("vocab_size")?,
                max_positions: j.usize_or("n_positions", 1024)?,
                hidden: j.usize("n_embd")?,
                layers: j.usize("n_layer")?,
                heads: j.usize("n_head")?,
                eps: j.f64_or("layer_norm_epsilon", 1e-5)?,
            };
            cfg.validate()?;
            Ok(HfConfig::Gpt2(cfg))
        }
        "vit" => {
            let classes = match v.get("id2label").and_then(Value::as_object) {
                Some(m) if !m.is_empty() => m.len(),
                _ => j.usize_or("num_labels", 1000)?,
            };
            let cfg = VitConfig {
                image_size: j.usize_or("image_size", 224)?,
                patch: j.usize_or("patch_size", 16)?,
                channels: j.usize_or("num_channels", 3)?,
                hidden: j.usize("hidden_size")?,
                layers: j.usize("num_hidden_layers")?,
                heads: j.usize("num_attention_heads")?,
                mlp: j.usize("intermediate_size")?,
                classes,
                eps: j.f64_or("layer_norm_eps", 1e-12)?,
            };
            cfg.validate()?;
            Ok(HfConfig::Vit(cfg))
        }
        other => Err(j.err(
            "model_type",
            &format!("'{other}' is not supported (llama, gpt2, vit)"),
        )),
    }
}

/// Reads `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<HfConfig> {
    let path = dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|source| Error::Io {
        path: path.clone(),
        source,
    })?;
    parse_config(&text, &path.display().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_3_2_1b_config() {
        // The fields of meta-llama/Llama-3.2-1B's config.json that matter here.
        let text = r#"{
            "model_type": "llama", "vocab_size": 128256, "hidden_size": 2048,
            "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 64, "rope_theta": 500000.0,
            "rope_scaling": {"factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                             "original_max_position_embeddings": 8192, "rope_type": "llama3"},
            "rms_norm_eps": 1e-05, "tie_word_embeddings": true, "max_position_embeddings": 131072
        }"#;
        let HfConfig::Llama(cfg) = parse_config(text, "config.json").unwrap() else {
            panic!("not llama")
        };
        assert_eq!(cfg, LlamaConfig::named("llama3.2-1b").unwrap());
    }

    #[test]
    fn gpt2_and_vit_configs_and_errors() {
        let g = r#"{"model_type": "gpt2", "vocab_size": 50257, "n_positions": 1024, "n_embd": 768,
                    "n_layer": 12, "n_head": 12, "layer_norm_epsilon": 1e-05}"#;
        assert_eq!(
            parse_config(g, "c").unwrap(),
            HfConfig::Gpt2(Gpt2Config::named("gpt2s").unwrap())
        );
        let v = r#"{"model_type": "vit", "hidden_size": 768, "num_hidden_layers": 12,
                    "num_attention_heads": 12, "intermediate_size": 3072, "image_size": 224,
                    "patch_size": 16, "num_channels": 3, "layer_norm_eps": 1e-12,
                    "id2label": {"0": "a", "1": "b", "2": "c"}}"#;
        let HfConfig::Vit(vc) = parse_config(v, "c").unwrap() else {
            panic!("not vit")
        };
        assert_eq!((vc.classes, vc.eps, vc.patches()), (3, 1e-12, 196));
        let e = parse_config(
            r#"{"model_type": "llama", "hidden_size": 8}"#,
            "dir/config.json",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("dir/config.json") && e.contains("num_attention_heads"),
            "{e}"
        );
        assert!(parse_config(r#"{"model_type": "bert"}"#, "c")
            .unwrap_err()
            .to_string()
            .contains("bert"));
        assert!(parse_config("{", "c").is_err());
    }
}
