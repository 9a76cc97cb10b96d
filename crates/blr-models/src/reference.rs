//! Reference bundles for checking each model against its PyTorch implementation: one
//! safetensors file holding random weights under the names the PyTorch model expects
//! (transformers Llama and GPT-2, timm ViT, the DiT reference code), a random input, and the
//! output of our CPU backend for it; the metadata carries the config the PyTorch side needs.
//! `crates/blr-models/tools/torch_reference.py` loads a bundle, builds the PyTorch model, runs
//! the same input and reports the relative error.
//!
//! Tensor names: weights as in the PyTorch state dict; `blr.reference.input_ids` (token ids
//! stored as f32, exact below 2^24), `blr.reference.image` / `blr.reference.latent`,
//! `blr.reference.t`, `blr.reference.y`, and `blr.reference.output`. Metadata:
//! `blr.reference.arch` and `blr.reference.config` (JSON). BLR layers are exported densified
//! (PyTorch reference models are dense).

use crate::backend::Backend;
use crate::cpu::Cpu;
use crate::lm::CausalLm;
use crate::{dit, gpt2, llama, vit, Error, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::rng::Rng;
use blr_core::safetensors::{Dtype, SafeTensors, TensorToWrite};
use serde_json::json;
use std::collections::BTreeMap;

/// Architectures a bundle can hold.
pub const ARCHS: &str = "llama, gpt2, vit, dit";

/// An owned tensor to write.
pub struct Owned {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A bundle ready to serialise.
pub struct Bundle {
    pub tensors: Vec<Owned>,
    pub metadata: BTreeMap<String, String>,
}

impl Bundle {
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let views: Vec<TensorToWrite> = self
            .tensors
            .iter()
            .map(|t| TensorToWrite {
                name: t.name.clone(),
                dtype: Dtype::F32,
                shape: t.shape.clone(),
                data: &t.data,
            })
            .collect();
        Ok(blr_core::safetensors::serialize(&views, &self.metadata)?)
    }
}

fn weights(ck: &Checkpoint, rename: impl Fn(&str) -> String) -> Result<Vec<Owned>> {
    let mut out = Vec::new();
    for (name, t) in &ck.tensors {
        out.push(Owned {
            name: rename(name),
            shape: t.shape.clone(),
            data: t.data.clone(),
        });
    }
    for (name, l) in &ck.layers {
        let d = l.to_dense()?;
        out.push(Owned {
            name: rename(&format!("{name}.weight")),
            shape: vec![d.m, d.n],
            data: d.weight,
        });
    }
    Ok(out)
}

fn meta(arch: &str, config: serde_json::Value) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    m.insert("blr.reference.arch".into(), arch.into());
    m.insert("blr.reference.config".into(), config.to_string());
    m
}

fn unknown(arch: &str, shape: &str, known: &str) -> Error {
    Error::input(
        "reference",
        format!("unknown {arch} shape '{shape}' (known: tiny, {known})"),
    )
}

/// Builds a bundle for `arch` at a named shape (or `tiny`), keeping `layers` blocks if given.
pub fn bundle(
    arch: &str,
    shape: &str,
    layers: Option<usize>,
    seed: u64,
    tokens: usize,
) -> Result<Bundle> {
    let mut rng = Rng::new(seed ^ 0x5EED);
    match arch {
        "llama" => {
            let cfg = if shape == "tiny" {
                llama::LlamaConfig {
                    vocab_size: 97,
                    hidden: 48,
                    intermediate: 80,
                    layers: 2,
                    heads: 6,
                    kv_heads: 2,
                    head_dim: 8,
                    rope_theta: 1e4,
                    rope_scaling: llama::RopeScaling::None,
                    rms_eps: 1e-5,
                    tie_embeddings: false,
                    max_positions: 128,
                }
            } else {
                llama::LlamaConfig::named(shape)
                    .ok_or_else(|| unknown(arch, shape, llama::NAMED))?
            };
            let (cfg, ck) = llama::random(&cfg, seed, layers)?;
            let ids: Vec<u32> = (0..tokens)
                .map(|_| rng.below(cfg.vocab_size) as u32)
                .collect();
            llama_bundle(&cfg, &ck, &ids)
        }
        "gpt2" => {
            let cfg = if shape == "tiny" {
                gpt2::Gpt2Config {
                    vocab_size: 101,
                    max_positions: 64,
                    hidden: 48,
                    layers: 2,
                    heads: 4,
                    eps: 1e-5,
                }
            } else {
                gpt2::Gpt2Config::named(shape)
                    .ok_or_else(|| unknown(arch, shape, "gpt2s, gpt2m"))?
            };
            let (cfg, ck) = gpt2::random(&cfg, seed, layers)?;
            let ids: Vec<u32> = (0..tokens)
                .map(|_| rng.below(cfg.vocab_size) as u32)
                .collect();
            let model = gpt2::Gpt2::load(Cpu, cfg.clone(), ck.clone())?;
            let mut cache = model.new_cache(tokens)?;
            let logits = model.forward(&ids, &mut cache, true)?;
            let mut t = gpt2_hf_tensors(&ck)?;
            t.push(Owned {
                name: "blr.reference.input_ids".into(),
                shape: vec![tokens],
                data: ids.iter().map(|&i| i as f32).collect(),
            });
            t.push(Owned {
                name: "blr.reference.output".into(),
                shape: vec![tokens, cfg.vocab_size],
                data: logits,
            });
            let config = json!({
                "model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.max_positions,
                "n_embd": cfg.hidden, "n_layer": cfg.layers, "n_head": cfg.heads,
                "layer_norm_epsilon": cfg.eps, "activation_function": "gelu_new",
                "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "tie_word_embeddings": true
            });
            Ok(Bundle {
                tensors: t,
                metadata: meta("gpt2", config),
            })
        }
        "vit" => {
            let cfg = if shape == "tiny" {
                vit::VitConfig {
                    image_size: 32,
                    patch: 8,
                    channels: 3,
                    hidden: 48,
                    layers: 2,
                    heads: 4,
                    mlp: 96,
                    classes: 10,
                    eps: 1e-6,
                }
            } else {
                vit::VitConfig::named(shape).ok_or_else(|| unknown(arch, shape, "vit-b16"))?
            };
            let (cfg, ck) = vit::random(&cfg, seed, layers)?;
            let img = rng.normal_vec(cfg.channels * cfg.image_size * cfg.image_size, 1.0);
            let logits = vit::Vit::load(Cpu, cfg.clone(), ck.clone())?.forward(&img)?;
            let mut t = weights(&ck, str::to_string)?;
            for o in &mut t {
                if o.name == "patch_embed.proj.weight" {
                    o.shape = vec![cfg.hidden, cfg.channels, cfg.patch, cfg.patch];
                }
            }
            t.push(Owned {
                name: "blr.reference.image".into(),
                shape: vec![1, cfg.channels, cfg.image_size, cfg.image_size],
                data: img,
            });
            t.push(Owned {
                name: "blr.reference.output".into(),
                shape: vec![1, cfg.classes],
                data: logits,
            });
            let config = json!({
                "img_size": cfg.image_size, "patch_size": cfg.patch, "in_chans": cfg.channels,
                "embed_dim": cfg.hidden, "depth": cfg.layers, "num_heads": cfg.heads,
                "mlp_hidden": cfg.mlp, "num_classes": cfg.classes, "eps": cfg.eps
            });
            Ok(Bundle {
                tensors: t,
                metadata: meta("vit", config),
            })
        }
        "dit" => {
            let cfg = if shape == "tiny" {
                dit::DitConfig {
                    input_size: 8,
                    patch: 2,
                    in_channels: 4,
                    hidden: 48,
                    layers: 2,
                    heads: 4,
                    mlp: 192,
                    classes: 10,
                    learn_sigma: true,
                }
            } else {
                dit::DitConfig::named(shape).ok_or_else(|| unknown(arch, shape, "dit-xl2"))?
            };
            let (cfg, ck) = dit::random(&cfg, seed, layers, false)?;
            let s = cfg.input_size;
            let lat = rng.normal_vec(cfg.in_channels * s * s, 1.0);
            let t_step = 1.0 + rng.below(999) as f32;
            let label = rng.below(cfg.classes);
            let out = dit::Dit::load(Cpu, cfg.clone(), ck.clone())?.forward(&lat, t_step, label)?;
            let mut t = weights(&ck, str::to_string)?;
            for o in &mut t {
                if o.name == "x_embedder.proj.weight" {
                    o.shape = vec![cfg.hidden, cfg.in_channels, cfg.patch, cfg.patch];
                }
            }
            t.push(Owned {
                name: "blr.reference.latent".into(),
                shape: vec![1, cfg.in_channels, s, s],
                data: lat,
            });
            t.push(Owned {
                name: "blr.reference.t".into(),
                shape: vec![1],
                data: vec![t_step],
            });
            t.push(Owned {
                name: "blr.reference.y".into(),
                shape: vec![1],
                data: vec![label as f32],
            });
            t.push(Owned {
                name: "blr.reference.output".into(),
                shape: vec![1, cfg.out_channels(), s, s],
                data: out,
            });
            let config = json!({
                "input_size": cfg.input_size, "patch_size": cfg.patch, "in_channels": cfg.in_channels,
                "hidden_size": cfg.hidden, "depth": cfg.layers, "num_heads": cfg.heads,
                "mlp_hidden": cfg.mlp, "num_classes": cfg.classes, "learn_sigma": cfg.learn_sigma
            });
            Ok(Bundle {
                tensors: t,
                metadata: meta("dit", config),
            })
        }
        other => Err(Error::input(
            "reference",
            format!("unknown architecture '{other}' (known: {ARCHS})"),
        )),
    }
}

/// GPT-2 weights as HF stores them: every tensor under its HF name, the projections as Conv1D
/// `(in, out)` matrices (BLR layers densified).
pub fn gpt2_hf_tensors(ck: &Checkpoint) -> Result<Vec<Owned>> {
    let mut t = weights(ck, str::to_string)?;
    let linear: std::collections::HashSet<String> = ck
        .layers
        .iter()
        .map(|(n, _)| format!("{n}.weight"))
        .collect();
    for o in &mut t {
        if linear.contains(&o.name) {
            let (m, n) = (o.shape[0], o.shape[1]);
            let mut w = vec![0.0f32; m * n];
            for r in 0..m {
                for c in 0..n {
                    w[c * m + r] = o.data[r * n + c];
                }
            }
            o.data = w;
            o.shape = vec![n, m];
        }
    }
    Ok(t)
}

/// A Llama bundle from given weights (random, or a real model's, e.g. SmolLM2 dequantised from
/// its GGUF, which checks the GGUF Q/K un-permutation against transformers) and token ids.
pub fn llama_bundle(cfg: &llama::LlamaConfig, ck: &Checkpoint, ids: &[u32]) -> Result<Bundle> {
    let tokens = ids.len();
    let model = llama::Llama::load(Cpu, cfg.clone(), ck.clone())?;
    let mut cache = model.new_cache(tokens)?;
    let logits = model.forward(ids, &mut cache, true)?;
    let mut t = weights(ck, str::to_string)?;
    t.push(Owned {
        name: "blr.reference.input_ids".into(),
        shape: vec![tokens],
        data: ids.iter().map(|&i| i as f32).collect(),
    });
    t.push(Owned {
        name: "blr.reference.output".into(),
        shape: vec![tokens, cfg.vocab_size],
        data: logits,
    });
    let rope_scaling = match &cfg.rope_scaling {
        llama::RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_positions,
        } => {
            json!({"rope_type": "llama3", "factor": factor, "low_freq_factor": low_freq_factor,
                    "high_freq_factor": high_freq_factor,
                    "original_max_position_embeddings": original_max_positions})
        }
        llama::RopeScaling::Linear { factor } => {
            json!({"rope_type": "linear", "factor": factor})
        }
        _ => serde_json::Value::Null,
    };
    let config = json!({
        "model_type": "llama", "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden,
        "intermediate_size": cfg.intermediate, "num_hidden_layers": cfg.layers,
        "num_attention_heads": cfg.heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "rope_theta": cfg.rope_theta, "rope_scaling": rope_scaling,
        "rms_norm_eps": cfg.rms_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "max_position_embeddings": cfg.max_positions, "hidden_act": "silu",
        "attention_bias": false, "mlp_bias": false
    });
    Ok(Bundle {
        tensors: t,
        metadata: meta("llama", config),
    })
}

/// The bundle's input token ids (stored as f32 so one tensor dtype serves every bundle).
fn input_ids(st: &SafeTensors) -> Result<Vec<u32>> {
    Ok(st
        .read_f32("blr.reference.input_ids")?
        .iter()
        .map(|&x| x as u32)
        .collect())
}

/// Runs a bundle's model on `backend`: the weights and input read back from the bundle through
/// the HF/timm loaders (as PyTorch reads them), the same forward pass as the bundle's CPU
/// output. `blr eval reference --device cuda` stores the CUDA result beside the CPU one, so the
/// PyTorch script checks both backends against the same reference.
pub fn rerun<B: Backend + Clone>(bundle: &Bundle, backend: B) -> Result<Vec<f32>> {
    let st = SafeTensors::from_bytes("bundle.safetensors", bundle.to_bytes()?)?;
    let arch = bundle
        .metadata
        .get("blr.reference.arch")
        .map(String::as_str)
        .unwrap_or("");
    let config_text = bundle
        .metadata
        .get("blr.reference.config")
        .ok_or_else(|| Error::input("reference", "bundle has no blr.reference.config"))?;
    let config: serde_json::Value = serde_json::from_str(config_text)
        .map_err(|e| Error::input("reference", format!("bad config JSON: {e}")))?;
    let num = |key: &str| -> Result<usize> {
        config[key]
            .as_u64()
            .map(|v| v as usize)
            .ok_or_else(|| Error::input("reference", format!("config has no integer '{key}'")))
    };
    let ids = || input_ids(&st);
    match arch {
        "llama" | "gpt2" => match crate::hf::parse_config(config_text, "bundle")? {
            crate::hf::HfConfig::Llama(cfg) => {
                let ck = llama::from_safetensors(&st, &cfg)?;
                let ids = ids()?;
                let m = llama::Llama::load(backend, cfg, ck)?;
                let mut c = m.new_cache(ids.len())?;
                m.forward(&ids, &mut c, true)
            }
            crate::hf::HfConfig::Gpt2(cfg) => {
                let ck = gpt2::from_safetensors(&st, &cfg)?;
                let ids = ids()?;
                let m = gpt2::Gpt2::load(backend, cfg, ck)?;
                let mut c = m.new_cache(ids.len())?;
                m.forward(&ids, &mut c, true)
            }
            other => Err(Error::input(
                "reference",
                format!("unexpected config for {arch}: {other:?}"),
            )),
        },
        "vit" => {
            let cfg = vit::VitConfig {
                image_size: num("img_size")?,
                patch: num("patch_size")?,
                channels: num("in_chans")?,
                hidden: num("embed_dim")?,
                layers: num("depth")?,
                heads: num("num_heads")?,
                mlp: num("mlp_hidden")?,
                classes: num("num_classes")?,
                eps: config["eps"].as_f64().unwrap_or(1e-6),
            };
            let ck = vit::from_safetensors(&st, &cfg)?;
            vit::Vit::load(backend, cfg, ck)?.forward(&st.read_f32("blr.reference.image")?)
        }
        "dit" => {
            let cfg = dit::DitConfig {
                input_size: num("input_size")?,
                patch: num("patch_size")?,
                in_channels: num("in_channels")?,
                hidden: num("hidden_size")?,
                layers: num("depth")?,
                heads: num("num_heads")?,
                mlp: num("mlp_hidden")?,
                classes: num("num_classes")?,
                learn_sigma: config["learn_sigma"].as_bool().unwrap_or(true),
            };
            let ck = dit::from_safetensors(&st, &cfg)?;
            let t = st.read_f32("blr.reference.t")?[0];
            let y = st.read_f32("blr.reference.y")?[0] as usize;
            dit::Dit::load(backend, cfg, ck)?.forward(&st.read_f32("blr.reference.latent")?, t, y)
        }
        other => Err(Error::input(
            "reference",
            format!("unknown bundle architecture '{other}'"),
        )),
    }
}

/// Adds `blr.reference.output_<tag>`: the bundle's model run on another backend (see [`rerun`]).
pub fn add_backend_output<B: Backend + Clone>(
    bundle: &mut Bundle,
    backend: B,
    tag: &str,
) -> Result<()> {
    let out = rerun(bundle, backend)?;
    let shape = bundle
        .tensors
        .iter()
        .find(|t| t.name == "blr.reference.output")
        .map(|t| t.shape.clone())
        .ok_or_else(|| Error::input("reference", "bundle has no blr.reference.output"))?;
    bundle.tensors.push(Owned {
        name: format!("blr.reference.output_{tag}"),
        shape,
        data: out,
    });
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rerun_reproduces_every_bundle_output() {
        for (arch, tokens) in [("llama", 7), ("gpt2", 9), ("vit", 0), ("dit", 0)] {
            let mut b = bundle(arch, "tiny", None, 8, tokens).unwrap();
            add_backend_output(&mut b, Cpu, "cpu2").unwrap();
            let get = |name: &str| {
                b.tensors
                    .iter()
                    .find(|t| t.name == name)
                    .map(|t| t.data.clone())
                    .unwrap()
            };
            assert_eq!(
                get("blr.reference.output"),
                get("blr.reference.output_cpu2"),
                "{arch}"
            );
        }
    }

    #[test]
    fn bundles_reload_into_the_same_outputs() {
        // The exported weights, read back through the HF loaders, reproduce the stored output:
        // the names and layouts written are the ones the loaders (and PyTorch) expect.
        let b = bundle("gpt2", "tiny", None, 3, 9).unwrap();
        let st = SafeTensors::from_bytes("gpt2.safetensors", b.to_bytes().unwrap()).unwrap();
        let cfg = match crate::hf::parse_config(&b.metadata["blr.reference.config"], "m").unwrap() {
            crate::hf::HfConfig::Gpt2(c) => c,
            other => panic!("{other:?}"),
        };
        let ck = gpt2::from_safetensors(&st, &cfg).unwrap();
        let ids = input_ids(&st).unwrap();
        let m = gpt2::Gpt2::load(Cpu, cfg, ck).unwrap();
        let mut c = m.new_cache(9).unwrap();
        assert_eq!(
            m.forward(&ids, &mut c, true).unwrap(),
            st.read_f32("blr.reference.output").unwrap()
        );

        let b = bundle("llama", "tiny", None, 4, 7).unwrap();
        let st = SafeTensors::from_bytes("llama.safetensors", b.to_bytes().unwrap()).unwrap();
        let crate::hf::HfConfig::Llama(cfg) =
            crate::hf::parse_config(&b.metadata["blr.reference.config"], "m").unwrap()
        else {
            panic!("not llama")
        };
        let ck = llama::from_safetensors(&st, &cfg).unwrap();
        let ids = input_ids(&st).unwrap();
        let m = llama::Llama::load(Cpu, cfg, ck).unwrap();
        let mut c = m.new_cache(7).unwrap();
        assert_eq!(
            m.forward(&ids, &mut c, true).unwrap(),
            st.read_f32("blr.reference.output").unwrap()
        );

        let b = bundle("vit", "tiny", None, 5, 0).unwrap();
        let st = SafeTensors::from_bytes("vit.safetensors", b.to_bytes().unwrap()).unwrap();
        let cfg = vit::VitConfig {
            image_size: 32,
            patch: 8,
            channels: 3,
            hidden: 48,
            layers: 2,
            heads: 4,
            mlp: 96,
            classes: 10,
            eps: 1e-6,
        };
        let ck = vit::from_safetensors(&st, &cfg).unwrap();
        let out = vit::Vit::load(Cpu, cfg, ck)
            .unwrap()
            .forward(&st.read_f32("blr.reference.image").unwrap())
            .unwrap();
        assert_eq!(out, st.read_f32("blr.reference.output").unwrap());

        let b = bundle("dit", "tiny", None, 6, 0).unwrap();
        let st = SafeTensors::from_bytes("dit.safetensors", b.to_bytes().unwrap()).unwrap();
        let cfg = dit::DitConfig {
            input_size: 8,
            patch: 2,
            in_channels: 4,
            hidden: 48,
            layers: 2,
            heads: 4,
            mlp: 192,
            classes: 10,
            learn_sigma: true,
        };
        let ck = dit::from_safetensors(&st, &cfg).unwrap();
        let t = st.read_f32("blr.reference.t").unwrap()[0];
        let y = st.read_f32("blr.reference.y").unwrap()[0] as usize;
        let out = dit::Dit::load(Cpu, cfg, ck)
            .unwrap()
            .forward(&st.read_f32("blr.reference.latent").unwrap(), t, y)
            .unwrap();
        assert_eq!(out, st.read_f32("blr.reference.output").unwrap());

        assert!(bundle("bert", "tiny", None, 0, 4).is_err());
        assert!(bundle("llama", "nope", None, 0, 4).is_err());
    }
}
