//! GPT-2: learned absolute positions, pre-LayerNorm blocks, fused QKV projection, GELU (tanh)
//! MLP, LM head tied to the token embedding. Written once over [`Backend`]; every linear layer
//! is a `blr_core::Linear` in any format.
//!
//! Per block, with `x (T, E)`:
//! ```text
//! qkv = ln_1(x) Wattn^T + b                  (T, 3E), split into q | k | v
//! x  += attention(q, k, v; causal) Wproj^T + b
//! x  += gelu_tanh(ln_2(x) Wfc^T + b) Wproj2^T + b
//! ```
//! then `logits = ln_f(x) Wte^T`.
//!
//! HF stores GPT-2's projections as `Conv1D` weights of shape `(in, out)` (`y = x W + b`);
//! [`from_safetensors`] transposes them once to the `(out, in)` layout of every other linear
//! layer here, so checkpoints and BLR factorizations never see the Conv1D convention.

use crate::backend::{AttnSpec, Backend};
use crate::lm::{BackendLm, KvCaches, LmShape};
use crate::weights::{self, put_tensor, take_linear, take_tensor};
use crate::{Error, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::rng::Rng;
use blr_core::{Dense, Linear};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Gpt2Config {
    pub vocab_size: usize,
    pub max_positions: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub eps: f64,
}

impl Gpt2Config {
    /// `gpt2s` (GPT-2 small, 124 M), `gpt2m` (355 M).
    pub fn named(name: &str) -> Option<Self> {
        let (hidden, layers, heads) = match name {
            "gpt2s" | "gpt2" => (768, 12, 12),
            "gpt2m" => (1024, 24, 16),
            _ => return None,
        };
        Some(Gpt2Config {
            vocab_size: 50257,
            max_positions: 1024,
            hidden,
            layers,
            heads,
            eps: 1e-5,
        })
    }

    pub fn validate(&self) -> Result<()> {
        if self.vocab_size == 0 || self.hidden == 0 || self.layers == 0 || self.max_positions == 0 {
            return Err(Error::config(
                "gpt2",
                format!("zero-sized dimension in {self:?}"),
            ));
        }
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) {
            return Err(Error::config(
                "gpt2",
                format!(
                    "{} heads do not divide hidden size {}",
                    self.heads, self.hidden
                ),
            ));
        }
        Ok(())
    }

    /// Every linear layer's name and `(out, in)` shape.
    pub fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        let e = self.hidden;
        let mut out = Vec::with_capacity(self.layers * 4);
        for i in 0..self.layers {
            let p = format!("transformer.h.{i}");
            out.push((format!("{p}.attn.c_attn"), 3 * e, e));
            out.push((format!("{p}.attn.c_proj"), e, e));
            out.push((format!("{p}.mlp.c_fc"), 4 * e, e));
            out.push((format!("{p}.mlp.c_proj"), e, 4 * e));
        }
        out
    }

    /// Bias and LayerNorm tensor names with their lengths.
    fn vectors(&self) -> Vec<(String, usize)> {
        let e = self.hidden;
        let mut out = Vec::new();
        for i in 0..self.layers {
            let p = format!("transformer.h.{i}");
            for n in [
                "ln_1.weight",
                "ln_1.bias",
                "ln_2.weight",
                "ln_2.bias",
                "attn.c_proj.bias",
                "mlp.c_proj.bias",
            ] {
                out.push((format!("{p}.{n}"), e));
            }
            out.push((format!("{p}.attn.c_attn.bias"), 3 * e));
            out.push((format!("{p}.mlp.c_fc.bias"), 4 * e));
        }
        out.push(("transformer.ln_f.weight".into(), e));
        out.push(("transformer.ln_f.bias".into(), e));
        out
    }
}

/// Random weights (seeded): embeddings N(0, 0.02) as in GPT-2's init, LayerNorm weights near 1,
/// biases small, linear layers variance-preserving; `layers` keeps only the first blocks.
pub fn random(
    cfg: &Gpt2Config,
    seed: u64,
    layers: Option<usize>,
) -> Result<(Gpt2Config, Checkpoint)> {
    let mut cfg = cfg.clone();
    if let Some(l) = layers {
        cfg.layers = l.clamp(1, cfg.layers);
    }
    cfg.validate()?;
    let mut rng = Rng::new(seed);
    let mut ck = Checkpoint::default();
    let (v, p, e) = (cfg.vocab_size, cfg.max_positions, cfg.hidden);
    put_tensor(
        &mut ck,
        "transformer.wte.weight",
        vec![v, e],
        rng.normal_vec(v * e, 0.02),
    );
    put_tensor(
        &mut ck,
        "transformer.wpe.weight",
        vec![p, e],
        rng.normal_vec(p * e, 0.01),
    );
    for (name, len) in cfg.vectors() {
        let data = if name.contains("ln_") && name.ends_with("weight") {
            rng.normal_vec(len, 0.1)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect()
        } else {
            rng.normal_vec(len, 0.02)
        };
        put_tensor(&mut ck, &name, vec![len], data);
    }
    for (name, m, n) in cfg.linear_shapes() {
        let w = rng.normal_vec(m * n, 1.0 / (n as f32).sqrt());
        ck.layers.push((name, Linear::Dense(Dense::new(m, n, w)?)));
    }
    weights::put_config(&mut ck, "gpt2", &cfg, Some(format!("random (seed {seed})")))?;
    Ok((cfg, ck))
}

/// Reads an HF GPT-2 safetensors file (names with or without the `transformer.` prefix, as
/// `GPT2LMHeadModel` and `GPT2Model` save them), transposing the Conv1D weights.
pub fn from_safetensors(
    st: &blr_core::safetensors::SafeTensors,
    cfg: &Gpt2Config,
) -> Result<Checkpoint> {
    cfg.validate()?;
    let prefixed = st.info("transformer.wte.weight").is_some();
    let name = |n: &str| -> String {
        if prefixed {
            n.to_string()
        } else {
            n.strip_prefix("transformer.").unwrap_or(n).to_string()
        }
    };
    let read =
        |n: &str, shape: &[usize]| -> Result<Vec<f32>> { Ok(st.read_f32_shaped(&name(n), shape)?) };
    let mut ck = Checkpoint::default();
    let (v, p, e) = (cfg.vocab_size, cfg.max_positions, cfg.hidden);
    put_tensor(
        &mut ck,
        "transformer.wte.weight",
        vec![v, e],
        read("transformer.wte.weight", &[v, e])?,
    );
    put_tensor(
        &mut ck,
        "transformer.wpe.weight",
        vec![p, e],
        read("transformer.wpe.weight", &[p, e])?,
    );
    for (n, len) in cfg.vectors() {
        put_tensor(&mut ck, &n, vec![len], read(&n, &[len])?);
    }
    for (n, m, k) in cfg.linear_shapes() {
        // Conv1D: stored (in, out).
        let w_in_out = read(&format!("{n}.weight"), &[k, m])?;
        let mut w = vec![0.0f32; m * k];
        for i in 0..k {
            for o in 0..m {
                w[o * k + i] = w_in_out[i * m + o];
            }
        }
        ck.layers.push((n, Linear::Dense(Dense::new(m, k, w)?)));
    }
    weights::put_config(&mut ck, "gpt2", cfg, Some(st.path().display().to_string()))?;
    Ok(ck)
}

/// Reads a GPT-2 config from checkpoint metadata.
pub fn config_from_checkpoint(ck: &Checkpoint) -> Result<Gpt2Config> {
    let cfg: Gpt2Config = weights::config_from(ck, "GPT-2")?;
    cfg.validate()?;
    Ok(cfg)
}

struct Block<B: Backend> {
    ln1: (B::Tensor, B::Tensor),
    attn: B::Linear,
    attn_b: B::Tensor,
    proj: B::Linear,
    proj_b: B::Tensor,
    ln2: (B::Tensor, B::Tensor),
    fc: B::Linear,
    fc_b: B::Tensor,
    fc_proj: B::Linear,
    fc_proj_b: B::Tensor,
}

/// GPT-2 resident on backend `B`.
pub struct Gpt2<B: Backend> {
    pub cfg: Gpt2Config,
    backend: B,
    wte: B::Tensor,
    wpe: B::Tensor,
    blocks: Vec<Block<B>>,
    ln_f: (B::Tensor, B::Tensor),
    lm_head: B::Linear,
}

impl<B: Backend> Gpt2<B> {
    pub fn load(backend: B, cfg: Gpt2Config, mut ck: Checkpoint) -> Result<Self> {
        cfg.validate()?;
        let (v, p, e) = (cfg.vocab_size, cfg.max_positions, cfg.hidden);
        let wte_host = take_tensor(&mut ck, "transformer.wte.weight", &[v, e])?;
        let lm_head = if ck.layers.iter().any(|(n, _)| n == "lm_head") {
            take_linear(&mut ck, "lm_head", v, e)?
        } else {
            Linear::Dense(Dense::new(v, e, wte_host.clone())?)
        };
        let wte = backend
            .upload(&wte_host, v, e)
            .map_err(|err| err.loading("transformer.wte.weight"))?;
        drop(wte_host);
        let wpe = backend
            .upload(
                &take_tensor(&mut ck, "transformer.wpe.weight", &[p, e])?,
                p,
                e,
            )
            .map_err(|err| err.loading("transformer.wpe.weight"))?;
        let lm_head = backend
            .load_linear(lm_head)
            .map_err(|err| err.loading("lm_head"))?;
        let vec = |ck: &mut Checkpoint, n: &str, len: usize| -> Result<B::Tensor> {
            backend
                .upload(&take_tensor(ck, n, &[len])?, 1, len)
                .map_err(|err| err.loading(n))
        };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let pf = format!("transformer.h.{i}");
            let ln1 = (
                vec(&mut ck, &format!("{pf}.ln_1.weight"), e)?,
                vec(&mut ck, &format!("{pf}.ln_1.bias"), e)?,
            );
            let ln2 = (
                vec(&mut ck, &format!("{pf}.ln_2.weight"), e)?,
                vec(&mut ck, &format!("{pf}.ln_2.bias"), e)?,
            );
            let attn_b = vec(&mut ck, &format!("{pf}.attn.c_attn.bias"), 3 * e)?;
            let proj_b = vec(&mut ck, &format!("{pf}.attn.c_proj.bias"), e)?;
            let fc_b = vec(&mut ck, &format!("{pf}.mlp.c_fc.bias"), 4 * e)?;
            let fc_proj_b = vec(&mut ck, &format!("{pf}.mlp.c_proj.bias"), e)?;
            let mut lin = |n: &str, m: usize, k: usize| -> Result<B::Linear> {
                let full = format!("{pf}.{n}");
                backend
                    .load_linear(take_linear(&mut ck, &full, m, k)?)
                    .map_err(|err| err.loading(&full))
            };
            blocks.push(Block {
                ln1,
                attn: lin("attn.c_attn", 3 * e, e)?,
                attn_b,
                proj: lin("attn.c_proj", e, e)?,
                proj_b,
                ln2,
                fc: lin("mlp.c_fc", 4 * e, e)?,
                fc_b,
                fc_proj: lin("mlp.c_proj", e, 4 * e)?,
                fc_proj_b,
            });
        }
        let ln_f = (
            vec(&mut ck, "transformer.ln_f.weight", e)?,
            vec(&mut ck, "transformer.ln_f.bias", e)?,
        );
        let leftover = ck.layers.len() + ck.tensors.len();
        if leftover > 0 {
            let first: Vec<&str> = ck
                .layers
                .iter()
                .map(|(n, _)| n.as_str())
                .chain(ck.tensors.keys().map(String::as_str))
                .take(3)
                .collect();
            return Err(Error::config(
                "gpt2",
                format!("{leftover} tensors in the weights are not used by a {}-layer model (first: {first:?}); is the config right?", cfg.layers),
            ));
        }
        Ok(Gpt2 {
            cfg,
            backend,
            wte,
            wpe,
            blocks,
            ln_f,
            lm_head,
        })
    }
}

impl<B: Backend> BackendLm for Gpt2<B> {
    type B = B;

    fn backend(&self) -> &B {
        &self.backend
    }

    fn lm_shape(&self) -> LmShape {
        LmShape {
            vocab_size: self.cfg.vocab_size,
            max_positions: self.cfg.max_positions,
            blocks: self.cfg.layers,
            kv_heads: self.cfg.heads,
            head_dim: self.cfg.hidden / self.cfg.heads,
        }
    }

    fn forward_device(
        &self,
        ids: &[u32],
        cache: &mut KvCaches<B>,
        all_logits: bool,
    ) -> Result<B::Tensor> {
        if ids.is_empty() {
            return Err(Error::input("gpt2 forward", "no tokens"));
        }
        let b = &self.backend;
        let e = self.cfg.hidden;
        let eps = self.cfg.eps as f32;
        let pos0 = cache.len(b);
        if pos0 + ids.len() > self.cfg.max_positions {
            return Err(Error::input(
                "gpt2 forward",
                format!(
                    "positions {pos0}..{} exceed the {} learned position embeddings",
                    pos0 + ids.len(),
                    self.cfg.max_positions
                ),
            ));
        }
        let positions: Vec<u32> = (pos0..pos0 + ids.len()).map(|p| p as u32).collect();
        let mut x = b.embedding(&self.wte, ids)?;
        b.add_assign(&mut x, &b.embedding(&self.wpe, &positions)?)?;
        let spec = AttnSpec::new(self.cfg.heads, self.cfg.heads, e / self.cfg.heads, true);
        for (blk, kv) in self
            .blocks
            .iter()
            .zip(cache.blocks_mut(self.blocks.len(), "gpt2 forward")?)
        {
            let h = b.layer_norm(&x, &blk.ln1.0, &blk.ln1.1, eps)?;
            let mut qkv = b.linear(&blk.attn, &h)?;
            b.add_row(&mut qkv, &blk.attn_b)?;
            let q = b.slice_cols(&qkv, 0, e)?;
            let k = b.slice_cols(&qkv, e, 2 * e)?;
            let v = b.slice_cols(&qkv, 2 * e, 3 * e)?;
            let a = b.attention_cached(&q, &k, &v, kv, spec)?;
            let mut o = b.linear(&blk.proj, &a)?;
            b.add_row(&mut o, &blk.proj_b)?;
            b.add_assign(&mut x, &o)?;
            let h = b.layer_norm(&x, &blk.ln2.0, &blk.ln2.1, eps)?;
            let mut f = b.linear(&blk.fc, &h)?;
            b.add_row(&mut f, &blk.fc_b)?;
            b.gelu(&mut f, true)?;
            let mut d = b.linear(&blk.fc_proj, &f)?;
            b.add_row(&mut d, &blk.fc_proj_b)?;
            b.add_assign(&mut x, &d)?;
        }
        let x = if all_logits || ids.len() == 1 {
            x
        } else {
            b.slice_rows(&x, ids.len() - 1, ids.len())?
        };
        let x = b.layer_norm(&x, &self.ln_f.0, &self.ln_f.1, eps)?;
        b.linear(&self.lm_head, &x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;
    use crate::lm::CausalLm;
    use blr_core::format::{FormatKind, Shape};

    fn tiny() -> Gpt2Config {
        Gpt2Config {
            vocab_size: 29,
            max_positions: 16,
            hidden: 12,
            layers: 2,
            heads: 3,
            eps: 1e-5,
        }
    }

    /// GPT-2 from its definition in f64, reading the checkpoint's dense matrices.
    fn reference(cfg: &Gpt2Config, ck: &Checkpoint, ids: &[u32]) -> Vec<f64> {
        let e = cfg.hidden;
        let t = ids.len();
        let tensor =
            |n: &str| -> Vec<f64> { ck.tensors[n].data.iter().map(|&x| f64::from(x)).collect() };
        let lin = |x: &[f64], n: &str| -> Vec<f64> {
            let d = ck.layer(n).unwrap().to_dense().unwrap();
            let bias = tensor(&format!("{n}.bias"));
            let rows = x.len() / d.n;
            let mut y = vec![0.0; rows * d.m];
            for r in 0..rows {
                for o in 0..d.m {
                    y[r * d.m + o] = bias[o]
                        + (0..d.n)
                            .map(|i| x[r * d.n + i] * f64::from(d.weight[o * d.n + i]))
                            .sum::<f64>();
                }
            }
            y
        };
        let ln = |x: &[f64], p: &str| -> Vec<f64> {
            let (w, b) = (tensor(&format!("{p}.weight")), tensor(&format!("{p}.bias")));
            x.chunks(e)
                .flat_map(|r| {
                    let m = r.iter().sum::<f64>() / e as f64;
                    let v = r.iter().map(|x| (x - m) * (x - m)).sum::<f64>() / e as f64;
                    let inv = 1.0 / (v + cfg.eps).sqrt();
                    r.iter()
                        .enumerate()
                        .map(|(i, x)| (x - m) * inv * w[i] + b[i])
                        .collect::<Vec<_>>()
                })
                .collect()
        };
        let (wte, wpe) = (
            tensor("transformer.wte.weight"),
            tensor("transformer.wpe.weight"),
        );
        let mut x: Vec<f64> = ids
            .iter()
            .enumerate()
            .flat_map(|(p, &i)| (0..e).map(move |j| (i as usize, p, j)))
            .map(|(i, p, j)| wte[i * e + j] + wpe[p * e + j])
            .collect();
        let (hh, d) = (cfg.heads, e / cfg.heads);
        for l in 0..cfg.layers {
            let p = format!("transformer.h.{l}");
            let qkv = lin(&ln(&x, &format!("{p}.ln_1")), &format!("{p}.attn.c_attn"));
            let mut a = vec![0.0; t * e];
            for h in 0..hh {
                for i in 0..t {
                    let s: Vec<f64> = (0..=i)
                        .map(|j| {
                            (0..d)
                                .map(|c| {
                                    qkv[i * 3 * e + h * d + c] * qkv[j * 3 * e + e + h * d + c]
                                })
                                .sum::<f64>()
                                / (d as f64).sqrt()
                        })
                        .collect();
                    let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                    for c in 0..d {
                        a[i * e + h * d + c] = (0..=i)
                            .map(|j| (s[j] - m).exp() / z * qkv[j * 3 * e + 2 * e + h * d + c])
                            .sum();
                    }
                }
            }
            let o = lin(&a, &format!("{p}.attn.c_proj"));
            x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
            let f: Vec<f64> = lin(&ln(&x, &format!("{p}.ln_2")), &format!("{p}.mlp.c_fc"))
                .into_iter()
                .map(|v| {
                    0.5 * v
                        * (1.0
                            + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v))
                                .tanh())
                })
                .collect();
            let dd = lin(&f, &format!("{p}.mlp.c_proj"));
            x.iter_mut().zip(&dd).for_each(|(a, b)| *a += b);
        }
        let x = ln(&x, "transformer.ln_f");
        let v = cfg.vocab_size;
        let mut y = vec![0.0; t * v];
        for r in 0..t {
            for o in 0..v {
                y[r * v + o] = (0..e).map(|i| x[r * e + i] * wte[o * e + i]).sum();
            }
        }
        y
    }

    #[test]
    fn forward_matches_reference_with_blr_layers_and_cache() {
        let (cfg, mut ck) = random(&tiny(), 4, None).unwrap();
        let shape = |format, m, n, b_out, b_in, rank| Shape {
            format,
            m,
            n,
            b_out,
            b_in,
            rank,
        };
        let swap = |ck: &mut Checkpoint, name: &str, s: Shape| {
            ck.layers.iter_mut().find(|(n, _)| n == name).unwrap().1 =
                Linear::random(&s, 5).unwrap();
        };
        swap(
            &mut ck,
            "transformer.h.0.attn.c_attn",
            shape(FormatKind::Blast, 36, 12, 3, 2, 4),
        );
        swap(
            &mut ck,
            "transformer.h.1.mlp.c_fc",
            shape(FormatKind::Monarch, 48, 12, 4, 4, 8),
        );
        swap(
            &mut ck,
            "transformer.h.1.attn.c_proj",
            shape(FormatKind::LowRank, 12, 12, 1, 1, 3),
        );
        let mut rng = Rng::new(8);
        let ids: Vec<u32> = (0..9).map(|_| rng.below(cfg.vocab_size) as u32).collect();
        let want = reference(&cfg, &ck, &ids);
        let model = Gpt2::load(Cpu, cfg.clone(), ck).unwrap();
        let mut cache = model.new_cache(16).unwrap();
        let got = model.forward(&ids, &mut cache, true).unwrap();
        let num: f64 = got
            .iter()
            .zip(&want)
            .map(|(&a, b)| (f64::from(a) - b).powi(2))
            .sum();
        let den: f64 = want.iter().map(|b| b * b).sum();
        assert!(
            (num / den).sqrt() < 1e-5,
            "relative error {}",
            (num / den).sqrt()
        );
        // Decode the last 3 positions one at a time after a 6-token prefill.
        let mut cache = model.new_cache(16).unwrap();
        model.forward(&ids[..6], &mut cache, false).unwrap();
        let v = cfg.vocab_size;
        for p in 6..9 {
            let step = model.forward(&ids[p..=p], &mut cache, false).unwrap();
            for (a, b) in step.iter().zip(&got[p * v..(p + 1) * v]) {
                assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
            }
        }
        // Past the learned positions: a clear error.
        let mut cache = model.new_cache(32).unwrap();
        let long: Vec<u32> = vec![1; 17];
        assert!(model
            .forward(&long, &mut cache, false)
            .unwrap_err()
            .to_string()
            .contains("position"));
    }

    #[test]
    fn hf_conv1d_safetensors_load_transposed() {
        use blr_core::safetensors::{self as st, Dtype, TensorToWrite};
        let (cfg, ck) = random(&tiny(), 6, None).unwrap();
        // Write the checkpoint in HF layout: no `transformer.` prefix, Conv1D (in, out) weights.
        let mut owned: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (n, t) in &ck.tensors {
            owned.push((
                n.strip_prefix("transformer.").unwrap().to_string(),
                t.shape.clone(),
                t.data.clone(),
            ));
        }
        for (n, l) in &ck.layers {
            let d = l.to_dense().unwrap();
            let mut w = vec![0.0f32; d.m * d.n];
            for o in 0..d.m {
                for i in 0..d.n {
                    w[i * d.m + o] = d.weight[o * d.n + i];
                }
            }
            owned.push((
                format!("{}.weight", n.strip_prefix("transformer.").unwrap()),
                vec![d.n, d.m],
                w,
            ));
        }
        let tensors: Vec<TensorToWrite> = owned
            .iter()
            .map(|(n, s, d)| TensorToWrite {
                name: n.clone(),
                dtype: Dtype::F32,
                shape: s.clone(),
                data: d,
            })
            .collect();
        let bytes = st::serialize(&tensors, &Default::default()).unwrap();
        let file =
            blr_core::safetensors::SafeTensors::from_bytes("hf-gpt2.safetensors", bytes).unwrap();
        let ck2 = from_safetensors(&file, &cfg).unwrap();
        let ids = [3u32, 1, 4, 1, 5];
        let run = |ck: Checkpoint| {
            let m = Gpt2::load(Cpu, cfg.clone(), ck).unwrap();
            let mut c = m.new_cache(8).unwrap();
            m.forward(&ids, &mut c, true).unwrap()
        };
        assert_eq!(run(ck), run(ck2));
    }
}
