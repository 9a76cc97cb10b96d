//! Llama (Llama-2/3, Llama-3.2-1B, SmolLM2): grouped-query attention with rotary embeddings,
//! RMSNorm, SwiGLU MLP, optionally tied embeddings. Written once over [`Backend`]; every linear
//! layer is a `blr_core::Linear` in any format.
//!
//! Per layer, with `x (T, hidden)`:
//! ```text
//! h = rms_norm(x) * attn_norm
//! q, k, v = h Wq^T, h Wk^T, h Wv^T          (T, heads*hd), (T, kv*hd), (T, kv*hd)
//! q, k = rope(q), rope(k)                    half-split pairs (i, i + hd/2)
//! x += attention(q, k, v; causal, GQA) Wo^T
//! h = rms_norm(x) * ffn_norm
//! x += (silu(h Wg^T) * (h Wu^T)) Wd^T
//! ```
//! then `logits = rms_norm(x) * norm  W_lm^T` (`W_lm` = the embedding table when tied).
//!
//! Tensor names are Hugging Face's (`model.layers.{i}.self_attn.q_proj`, ...). GGUF files
//! name them differently and store the Q and K rows of each head interleaved for ggml's
//! adjacent-pair RoPE (llama.cpp's converter permutes HF's half-split rows); [`from_gguf`]
//! undoes that permutation so that one RoPE convention serves both sources.

use crate::backend::{AttnSpec, Backend};
use crate::gguf::GgufFile;
use crate::lm::{BackendLm, KvCaches, LmShape};
use crate::weights::{self, put_tensor, take_linear, take_tensor};
use crate::{Error, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::rng::Rng;
use blr_core::{Dense, Linear};
use serde::{Deserialize, Serialize};

/// How rotary frequencies are stretched for long contexts.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, Default)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    #[default]
    None,
    /// Positions divided by `factor` (every frequency divided by `factor`).
    Linear { factor: f64 },
    /// Llama-3.1/3.2: low frequencies divided by `factor`, high ones kept, a smooth blend
    /// between (wavelengths measured against `original_max_positions`).
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_positions: usize,
    },
    /// Per-frequency divisors, as GGUF stores them in `rope_freqs.weight`.
    Factors { factors: Vec<f32> },
}

/// Shapes and hyper-parameters of a Llama model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub rope_theta: f64,
    #[serde(default)]
    pub rope_scaling: RopeScaling,
    pub rms_eps: f64,
    pub tie_embeddings: bool,
    pub max_positions: usize,
}

/// Names accepted by [`LlamaConfig::named`].
pub const NAMED: &str = "llama7b, llama3.2-1b, smollm2-135m";

impl LlamaConfig {
    /// Published shapes: Llama-2-7B, Llama-3.2-1B, SmolLM2-135M.
    pub fn named(name: &str) -> Option<Self> {
        Some(match name {
            "llama7b" | "llama2-7b" => LlamaConfig {
                vocab_size: 32000,
                hidden: 4096,
                intermediate: 11008,
                layers: 32,
                heads: 32,
                kv_heads: 32,
                head_dim: 128,
                rope_theta: 1e4,
                rope_scaling: RopeScaling::None,
                rms_eps: 1e-5,
                tie_embeddings: false,
                max_positions: 4096,
            },
            "llama3.2-1b" => LlamaConfig {
                vocab_size: 128_256,
                hidden: 2048,
                intermediate: 8192,
                layers: 16,
                heads: 32,
                kv_heads: 8,
                head_dim: 64,
                rope_theta: 5e5,
                rope_scaling: RopeScaling::Llama3 {
                    factor: 32.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_positions: 8192,
                },
                rms_eps: 1e-5,
                tie_embeddings: true,
                max_positions: 131_072,
            },
            "smollm2-135m" => LlamaConfig {
                vocab_size: 49152,
                hidden: 576,
                intermediate: 1536,
                layers: 30,
                heads: 9,
                kv_heads: 3,
                head_dim: 64,
                rope_theta: 1e5,
                rope_scaling: RopeScaling::None,
                rms_eps: 1e-5,
                tie_embeddings: true,
                max_positions: 8192,
            },
            _ => return None,
        })
    }

    pub fn validate(&self) -> Result<()> {
        let bad = |d: String| Err(Error::config("llama", d));
        if self.vocab_size == 0 || self.hidden == 0 || self.intermediate == 0 || self.layers == 0 {
            return bad(format!("zero-sized dimension in {self:?}"));
        }
        if self.heads == 0 || self.kv_heads == 0 || !self.heads.is_multiple_of(self.kv_heads) {
            return bad(format!(
                "{} query heads must be a positive multiple of {} kv heads",
                self.heads, self.kv_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return bad(format!("head_dim {} must be even for RoPE", self.head_dim));
        }
        if let RopeScaling::Factors { factors } = &self.rope_scaling {
            if factors.len() != self.head_dim / 2 {
                return bad(format!(
                    "{} RoPE frequency factors for head_dim {} (need head_dim / 2)",
                    factors.len(),
                    self.head_dim
                ));
            }
        }
        Ok(())
    }

    /// Parameters (embedding counted once when tied).
    pub fn params(&self) -> usize {
        let attn = self.hidden * self.heads * self.head_dim * 2
            + self.hidden * self.kv_heads * self.head_dim * 2;
        let mlp = 3 * self.hidden * self.intermediate;
        let per_layer = attn + mlp + 2 * self.hidden;
        let embed = self.vocab_size * self.hidden * if self.tie_embeddings { 1 } else { 2 };
        self.layers * per_layer + embed + self.hidden
    }

    /// Reads the config from `llama.*` GGUF metadata (and `rope_freqs.weight` if present).
    pub fn from_gguf(f: &GgufFile) -> Result<Self> {
        let arch = f.get_str("general.architecture")?;
        if arch != "llama" {
            return Err(Error::Metadata {
                source_name: f.path().display().to_string(),
                key: "general.architecture".into(),
                detail: format!("is '{arch}'; this loader reads Llama-architecture files"),
            });
        }
        let key = |k: &str| format!("llama.{k}");
        let hidden = f.get_usize(&key("embedding_length"))?;
        let heads = f.get_usize(&key("attention.head_count"))?;
        let kv_heads = match f.get(&key("attention.head_count_kv")) {
            Some(_) => f.get_usize(&key("attention.head_count_kv"))?,
            None => heads,
        };
        let head_dim = match f.get(&key("rope.dimension_count")) {
            Some(_) => f.get_usize(&key("rope.dimension_count"))?,
            None => hidden / heads.max(1),
        };
        let vocab_size = match f.get(&key("vocab_size")) {
            Some(_) => f.get_usize(&key("vocab_size"))?,
            None => f.get_str_array("tokenizer.ggml.tokens")?.len(),
        };
        let rope_theta = match f.get(&key("rope.freq_base")) {
            Some(_) => meta_f64(f, &key("rope.freq_base"))?,
            None => 1e4,
        };
        let rope_scaling = if f.tensor_info("rope_freqs.weight").is_some() {
            let factors = f.tensor_f32("rope_freqs.weight")?.1;
            RopeScaling::Factors { factors }
        } else {
            match f.get(&key("rope.scaling.type")).and_then(|v| v.as_str()) {
                Some("linear") => RopeScaling::Linear {
                    factor: meta_f64(f, &key("rope.scaling.factor"))?,
                },
                None | Some("none") => RopeScaling::None,
                Some(other) => {
                    return Err(Error::Metadata {
                        source_name: f.path().display().to_string(),
                        key: key("rope.scaling.type"),
                        detail: format!(
                            "'{other}' is not supported (none, linear, or rope_freqs.weight)"
                        ),
                    })
                }
            }
        };
        let cfg = LlamaConfig {
            vocab_size,
            hidden,
            intermediate: f.get_usize(&key("feed_forward_length"))?,
            layers: f.get_usize(&key("block_count"))?,
            heads,
            kv_heads,
            head_dim,
            rope_theta,
            rope_scaling,
            rms_eps: meta_f64(f, &key("attention.layer_norm_rms_epsilon"))?,
            tie_embeddings: f.tensor_info("output.weight").is_none(),
            max_positions: match f.get(&key("context_length")) {
                Some(_) => f.get_usize(&key("context_length"))?,
                None => 2048,
            },
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Rotary inverse frequencies `theta^(-2i/hd)`, after scaling.
    pub fn inv_freq(&self) -> Vec<f32> {
        let half = self.head_dim / 2;
        (0..half)
            .map(|i| {
                let f = self
                    .rope_theta
                    .powf(-((2 * i) as f64) / self.head_dim as f64);
                let scaled = match &self.rope_scaling {
                    RopeScaling::None => f,
                    RopeScaling::Linear { factor } => f / factor,
                    RopeScaling::Factors { factors } => f / f64::from(factors[i]),
                    RopeScaling::Llama3 {
                        factor,
                        low_freq_factor,
                        high_freq_factor,
                        original_max_positions,
                    } => {
                        let old = *original_max_positions as f64;
                        let low_wavelen = old / low_freq_factor;
                        let high_wavelen = old / high_freq_factor;
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    }
                };
                scaled as f32
            })
            .collect()
    }

    fn q_dim(&self) -> usize {
        self.heads * self.head_dim
    }

    fn kv_dim(&self) -> usize {
        self.kv_heads * self.head_dim
    }

    /// Every linear layer's HF name and `(out, in)` shape, in forward order.
    pub fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        let (h, f) = (self.hidden, self.intermediate);
        let mut out = Vec::with_capacity(self.layers * 7 + 1);
        for i in 0..self.layers {
            let p = format!("model.layers.{i}");
            out.push((format!("{p}.self_attn.q_proj"), self.q_dim(), h));
            out.push((format!("{p}.self_attn.k_proj"), self.kv_dim(), h));
            out.push((format!("{p}.self_attn.v_proj"), self.kv_dim(), h));
            out.push((format!("{p}.self_attn.o_proj"), h, self.q_dim()));
            out.push((format!("{p}.mlp.gate_proj"), f, h));
            out.push((format!("{p}.mlp.up_proj"), f, h));
            out.push((format!("{p}.mlp.down_proj"), h, f));
        }
        if !self.tie_embeddings {
            out.push(("lm_head".into(), self.vocab_size, h));
        }
        out
    }
}

/// A float stored in GGUF metadata, as f64. GGUF usually stores hyper-parameters as f32; they
/// were written from decimal constants (1e-5, 1e5), so the shortest decimal that round-trips the
/// f32 is the intended value (f32 1e-5 widened directly would be 9.99999974e-6).
fn meta_f64(f: &GgufFile, key: &str) -> Result<f64> {
    match f.require(key)? {
        crate::gguf::Value::F32(v) => Ok(v.to_string().parse::<f64>().unwrap_or(f64::from(*v))),
        _ => f.get_f64(key),
    }
}

/// Undoes llama.cpp's Q/K permutation: within each head of `hd` rows, GGUF row `2i + j` holds
/// HF row `j * hd/2 + i` (j = 0, 1).
fn unpermute_rows(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols.max(1);
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut out = vec![0.0f32; w.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * hd + 2 * i + j) * cols;
                let dst = (h * hd + j * half + i) * cols;
                out[dst..dst + cols].copy_from_slice(&w[src..src + cols]);
            }
        }
    }
    out
}

/// Reads a Llama config from checkpoint metadata.
pub fn config_from_checkpoint(ck: &Checkpoint) -> Result<LlamaConfig> {
    let cfg: LlamaConfig = weights::config_from(ck, "Llama")?;
    cfg.validate()?;
    Ok(cfg)
}

/// Dequantises every tensor of a Llama GGUF into an HF-named checkpoint (all layers dense).
pub fn from_gguf(f: &GgufFile) -> Result<(LlamaConfig, Checkpoint)> {
    let cfg = LlamaConfig::from_gguf(f)?;
    let mut ck = Checkpoint::default();
    let (h, v) = (cfg.hidden, cfg.vocab_size);
    let embed = f.tensor_f32_shaped("token_embd.weight", &[v, h])?;
    put_tensor(&mut ck, "model.embed_tokens.weight", vec![v, h], embed);
    put_tensor(
        &mut ck,
        "model.norm.weight",
        vec![h],
        f.tensor_f32_shaped("output_norm.weight", &[h])?,
    );
    if !cfg.tie_embeddings {
        let w = f.tensor_f32_shaped("output.weight", &[v, h])?;
        ck.layers
            .push(("lm_head".into(), Linear::Dense(Dense::new(v, h, w)?)));
    }
    let names = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    let shapes = cfg.linear_shapes();
    for i in 0..cfg.layers {
        for (k, (gg, hf)) in names.iter().enumerate() {
            let (_, m, n) = &shapes[i * 7 + k];
            let mut w = f.tensor_f32_shaped(&format!("blk.{i}.{gg}.weight"), &[*m, *n])?;
            if *gg == "attn_q" {
                w = unpermute_rows(&w, cfg.heads, *n);
            } else if *gg == "attn_k" {
                w = unpermute_rows(&w, cfg.kv_heads, *n);
            }
            ck.layers.push((
                format!("model.layers.{i}.{hf}"),
                Linear::Dense(Dense::new(*m, *n, w)?),
            ));
        }
        for (gg, hf) in [
            ("attn_norm", "input_layernorm"),
            ("ffn_norm", "post_attention_layernorm"),
        ] {
            let w = f.tensor_f32_shaped(&format!("blk.{i}.{gg}.weight"), &[h])?;
            put_tensor(
                &mut ck,
                &format!("model.layers.{i}.{hf}.weight"),
                vec![h],
                w,
            );
        }
    }
    weights::put_config(&mut ck, "llama", &cfg, Some(f.path().display().to_string()))?;
    Ok((cfg, ck))
}

/// Random weights for `cfg` (seeded), with only the first `layers` blocks when given, so that
/// huge shapes (llama7b) can be exercised a few layers at a time. Linear layers are dense with
/// variance-preserving init; norm weights are 1 plus small noise so that they matter.
pub fn random(
    cfg: &LlamaConfig,
    seed: u64,
    layers: Option<usize>,
) -> Result<(LlamaConfig, Checkpoint)> {
    let mut cfg = cfg.clone();
    if let Some(l) = layers {
        cfg.layers = l.min(cfg.layers).max(1);
    }
    cfg.validate()?;
    let mut rng = Rng::new(seed);
    let mut ck = Checkpoint::default();
    let (h, v) = (cfg.hidden, cfg.vocab_size);
    put_tensor(
        &mut ck,
        "model.embed_tokens.weight",
        vec![v, h],
        rng.normal_vec(v * h, 1.0),
    );
    let norm = |rng: &mut Rng| {
        rng.normal_vec(h, 0.1)
            .into_iter()
            .map(|x| 1.0 + x)
            .collect::<Vec<f32>>()
    };
    let final_norm = norm(&mut rng);
    put_tensor(&mut ck, "model.norm.weight", vec![h], final_norm);
    for i in 0..cfg.layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            let w = norm(&mut rng);
            put_tensor(&mut ck, &format!("model.layers.{i}.{n}.weight"), vec![h], w);
        }
    }
    for (name, m, n) in cfg.linear_shapes() {
        let w = rng.normal_vec(m * n, 1.0 / (n as f32).sqrt());
        ck.layers.push((name, Linear::Dense(Dense::new(m, n, w)?)));
    }
    weights::put_config(
        &mut ck,
        "llama",
        &cfg,
        Some(format!("random (seed {seed})")),
    )?;
    Ok((cfg, ck))
}

/// Reads an HF Llama safetensors file (`model.embed_tokens.weight`, `model.layers.{i}...`,
/// `lm_head.weight`) into a checkpoint; the config comes from the caller (HF keeps it in
/// config.json, not in the safetensors file).
pub fn from_safetensors(
    st: &blr_core::safetensors::SafeTensors,
    cfg: &LlamaConfig,
) -> Result<Checkpoint> {
    cfg.validate()?;
    let mut ck = Checkpoint::default();
    let (h, v) = (cfg.hidden, cfg.vocab_size);
    let read =
        |name: &str, shape: &[usize]| -> Result<Vec<f32>> { Ok(st.read_f32_shaped(name, shape)?) };
    put_tensor(
        &mut ck,
        "model.embed_tokens.weight",
        vec![v, h],
        read("model.embed_tokens.weight", &[v, h])?,
    );
    put_tensor(
        &mut ck,
        "model.norm.weight",
        vec![h],
        read("model.norm.weight", &[h])?,
    );
    for i in 0..cfg.layers {
        for n in ["input_layernorm", "post_attention_layernorm"] {
            let name = format!("model.layers.{i}.{n}.weight");
            put_tensor(&mut ck, &name, vec![h], read(&name, &[h])?);
        }
    }
    for (name, m, n) in cfg.linear_shapes() {
        let w = read(&format!("{name}.weight"), &[m, n])?;
        ck.layers.push((name, Linear::Dense(Dense::new(m, n, w)?)));
    }
    weights::put_config(&mut ck, "llama", cfg, Some(st.path().display().to_string()))?;
    Ok(ck)
}

struct Block<B: Backend> {
    attn_norm: B::Tensor,
    q: B::Linear,
    k: B::Linear,
    v: B::Linear,
    o: B::Linear,
    ffn_norm: B::Tensor,
    gate: B::Linear,
    up: B::Linear,
    down: B::Linear,
}

/// A Llama model resident on backend `B`.
pub struct Llama<B: Backend> {
    pub cfg: LlamaConfig,
    backend: B,
    embed: B::Tensor,
    blocks: Vec<Block<B>>,
    norm: B::Tensor,
    lm_head: B::Linear,
    inv_freq: Vec<f32>,
}

impl<B: Backend> Llama<B> {
    /// Builds the model from an HF-named checkpoint, moving every tensor to the backend.
    /// Tensors the model does not use are an error (a misnamed checkpoint would otherwise run
    /// with missing layers silently replaced).
    pub fn load(backend: B, cfg: LlamaConfig, mut ck: Checkpoint) -> Result<Self> {
        cfg.validate()?;
        let (h, v) = (cfg.hidden, cfg.vocab_size);
        let embed_host = take_tensor(&mut ck, "model.embed_tokens.weight", &[v, h])?;
        let lm_head = if cfg.tie_embeddings {
            // A tied head may still have been replaced by a compressed layer.
            if ck.layers.iter().any(|(n, _)| n == "lm_head") {
                take_linear(&mut ck, "lm_head", v, h)?
            } else {
                Linear::Dense(Dense::new(v, h, embed_host.clone())?)
            }
        } else {
            take_linear(&mut ck, "lm_head", v, h)?
        };
        let embed = backend
            .upload(&embed_host, v, h)
            .map_err(|e| e.loading("model.embed_tokens.weight"))?;
        drop(embed_host);
        let lm_head = backend
            .load_linear(lm_head)
            .map_err(|e| e.loading("lm_head"))?;
        let norm_host = take_tensor(&mut ck, "model.norm.weight", &[h])?;
        let norm = backend
            .upload(&norm_host, 1, h)
            .map_err(|e| e.loading("model.norm.weight"))?;
        let (qd, kvd, f) = (cfg.q_dim(), cfg.kv_dim(), cfg.intermediate);
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("model.layers.{i}");
            let mut lin = |name: &str, m: usize, n: usize| -> Result<B::Linear> {
                let full = format!("{p}.{name}");
                backend
                    .load_linear(take_linear(&mut ck, &full, m, n)?)
                    .map_err(|e| e.loading(&full))
            };
            let q = lin("self_attn.q_proj", qd, h)?;
            let k = lin("self_attn.k_proj", kvd, h)?;
            let vv = lin("self_attn.v_proj", kvd, h)?;
            let o = lin("self_attn.o_proj", h, qd)?;
            let gate = lin("mlp.gate_proj", f, h)?;
            let up = lin("mlp.up_proj", f, h)?;
            let down = lin("mlp.down_proj", h, f)?;
            let attn_norm = take_tensor(&mut ck, &format!("{p}.input_layernorm.weight"), &[h])?;
            let ffn_norm = take_tensor(
                &mut ck,
                &format!("{p}.post_attention_layernorm.weight"),
                &[h],
            )?;
            let norm_up = |data: &[f32], name: &str| {
                backend
                    .upload(data, 1, h)
                    .map_err(|e| e.loading(&format!("{p}.{name}.weight")))
            };
            blocks.push(Block {
                attn_norm: norm_up(&attn_norm, "input_layernorm")?,
                q,
                k,
                v: vv,
                o,
                ffn_norm: norm_up(&ffn_norm, "post_attention_layernorm")?,
                gate,
                up,
                down,
            });
        }
        let leftover: Vec<&str> = ck
            .layers
            .iter()
            .map(|(n, _)| n.as_str())
            .chain(ck.tensors.keys().map(String::as_str))
            .collect();
        if !leftover.is_empty() {
            return Err(Error::config(
                "llama",
                format!(
                    "{} tensors in the weights are not used by a {}-layer model (first: {:?}); is the config right?",
                    leftover.len(),
                    cfg.layers,
                    &leftover[..leftover.len().min(3)]
                ),
            ));
        }
        let inv_freq = cfg.inv_freq();
        Ok(Llama {
            cfg,
            backend,
            embed,
            blocks,
            norm,
            lm_head,
            inv_freq,
        })
    }

    fn spec(&self) -> AttnSpec {
        AttnSpec::new(self.cfg.heads, self.cfg.kv_heads, self.cfg.head_dim, true)
    }
}

impl<B: Backend> BackendLm for Llama<B> {
    type B = B;

    fn backend(&self) -> &B {
        &self.backend
    }

    fn lm_shape(&self) -> LmShape {
        LmShape {
            vocab_size: self.cfg.vocab_size,
            max_positions: self.cfg.max_positions,
            blocks: self.cfg.layers,
            kv_heads: self.cfg.kv_heads,
            head_dim: self.cfg.head_dim,
        }
    }

    fn forward_device(
        &self,
        ids: &[u32],
        cache: &mut KvCaches<B>,
        all_logits: bool,
    ) -> Result<B::Tensor> {
        if ids.is_empty() {
            return Err(Error::input("llama forward", "no tokens"));
        }
        let b = &self.backend;
        let eps = self.cfg.rms_eps as f32;
        let pos0 = cache.len(b);
        let mut x = b.embedding(&self.embed, ids)?;
        for (blk, kv) in self
            .blocks
            .iter()
            .zip(cache.blocks_mut(self.blocks.len(), "llama forward")?)
        {
            let h = b.rms_norm(&x, &blk.attn_norm, eps)?;
            let mut q = b.linear(&blk.q, &h)?;
            let mut k = b.linear(&blk.k, &h)?;
            let v = b.linear(&blk.v, &h)?;
            b.rope(&mut q, self.cfg.heads, pos0, &self.inv_freq)?;
            b.rope(&mut k, self.cfg.kv_heads, pos0, &self.inv_freq)?;
            let a = b.attention_cached(&q, &k, &v, kv, self.spec())?;
            let o = b.linear(&blk.o, &a)?;
            b.add_assign(&mut x, &o)?;
            let h = b.rms_norm(&x, &blk.ffn_norm, eps)?;
            let g = b.linear(&blk.gate, &h)?;
            let u = b.linear(&blk.up, &h)?;
            let m = b.silu_mul(&g, &u)?;
            let d = b.linear(&blk.down, &m)?;
            b.add_assign(&mut x, &d)?;
        }
        let x = if all_logits || ids.len() == 1 {
            x
        } else {
            b.slice_rows(&x, ids.len() - 1, ids.len())?
        };
        let x = b.rms_norm(&x, &self.norm, eps)?;
        b.linear(&self.lm_head, &x)
    }
}

#[cfg(test)]
mod tests;
