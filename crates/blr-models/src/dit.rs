//! DiT (Peebles & Xie 2023; DiT-XL/2): a transformer denoiser over latent patches conditioned on
//! a diffusion timestep and a class label through adaLN-Zero. Every linear layer (patch
//! embedding, timestep MLP, attention, MLP, adaLN modulations, final projection) is a
//! `blr_core::Linear` in any format.
//!
//! Forward for a latent `(C, H, W)`, timestep `t`, label `y` (tensor names as in the paper's
//! reference implementation):
//! ```text
//! x  = patchify(latent) Wx^T + b + pos_embed          (N, D), N = (H/p)(W/p), fixed 2-D sin-cos
//! c  = mlp(timestep_embedding(t, 256)) + y_table[y]   (1, D), mlp = Linear, SiLU, Linear
//! per block:  shift1, scale1, gate1, shift2, scale2, gate2 = silu(c) Wada^T + b   (6 x (1, D))
//!             x += gate1 * attn(modulate(LN(x), shift1, scale1))
//!             x += gate2 * mlp(modulate(LN(x), shift2, scale2))      mlp: fc1, GELU(tanh), fc2
//! final:      shift, scale = silu(c) Wf^T + b;  out = modulate(LN(x), shift, scale) Wo^T + b
//! unpatchify  (N, p*p*C_out) -> (C_out, H, W)
//! ```
//! LN has no affine parameters (eps 1e-6); `modulate(x, s, k) = x * (1 + k) + s`. adaLN-Zero
//! initialises every modulation to zero so that each block starts as the identity.

use crate::backend::{AttnSpec, Backend};
use crate::weights::{self, put_tensor, take_linear, take_tensor};
use crate::{Error, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::rng::Rng;
use blr_core::{Dense, Linear};
use serde::{Deserialize, Serialize};

/// Width of the sinusoidal timestep features fed to the timestep MLP.
pub const FREQ_DIM: usize = 256;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DitConfig {
    /// Latent side (32 for 256 px images through the SD VAE).
    pub input_size: usize,
    pub patch: usize,
    pub in_channels: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
    pub classes: usize,
    /// Predict the variance too: output channels are `2 * in_channels`.
    pub learn_sigma: bool,
}

impl DitConfig {
    /// `dit-xl2`: DiT-XL/2 for 256 px (latent 32x32x4), 1000 classes.
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "dit-xl2" => Some(DitConfig {
                input_size: 32,
                patch: 2,
                in_channels: 4,
                hidden: 1152,
                layers: 28,
                heads: 16,
                mlp: 4608,
                classes: 1000,
                learn_sigma: true,
            }),
            _ => None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch == 0 || !self.input_size.is_multiple_of(self.patch) {
            return Err(Error::config(
                "dit",
                format!(
                    "patch {} must divide input size {}",
                    self.patch, self.input_size
                ),
            ));
        }
        if self.heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || self.layers == 0
            || !self.hidden.is_multiple_of(4)
        {
            return Err(Error::config(
                "dit",
                format!(
                    "hidden {} must be a multiple of 4 and of the {} heads",
                    self.hidden, self.heads
                ),
            ));
        }
        Ok(())
    }

    pub fn out_channels(&self) -> usize {
        if self.learn_sigma {
            2 * self.in_channels
        } else {
            self.in_channels
        }
    }

    pub fn tokens(&self) -> usize {
        (self.input_size / self.patch).pow(2)
    }

    pub fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        let (d, p) = (self.hidden, self.patch);
        let mut out = vec![
            ("x_embedder.proj".to_string(), d, self.in_channels * p * p),
            ("t_embedder.mlp.0".to_string(), d, FREQ_DIM),
            ("t_embedder.mlp.2".to_string(), d, d),
        ];
        for i in 0..self.layers {
            let b = format!("blocks.{i}");
            out.push((format!("{b}.attn.qkv"), 3 * d, d));
            out.push((format!("{b}.attn.proj"), d, d));
            out.push((format!("{b}.mlp.fc1"), self.mlp, d));
            out.push((format!("{b}.mlp.fc2"), d, self.mlp));
            out.push((format!("{b}.adaLN_modulation.1"), 6 * d, d));
        }
        out.push(("final_layer.adaLN_modulation.1".into(), 2 * d, d));
        out.push(("final_layer.linear".into(), p * p * self.out_channels(), d));
        out
    }
}

/// DiT's fixed 2-D sin-cos position table `(N, D)`: the first half of each row encodes the
/// patch column, the second half its row (the reference code's meshgrid puts w first), each
/// half `[sin(pos * w_k), cos(pos * w_k)]` with `w_k = 10000^(-k / (D/4))`.
pub fn pos_embed_2d(d: usize, grid: usize) -> Vec<f32> {
    let quarter = d / 4;
    let mut out = vec![0.0f32; grid * grid * d];
    for gy in 0..grid {
        for gx in 0..grid {
            let row = &mut out[(gy * grid + gx) * d..(gy * grid + gx + 1) * d];
            for (half, pos) in [(0usize, gx), (1, gy)] {
                for k in 0..quarter {
                    let w = 1.0 / 10000f64.powf(k as f64 / quarter as f64);
                    let a = pos as f64 * w;
                    row[half * 2 * quarter + k] = a.sin() as f32;
                    row[half * 2 * quarter + quarter + k] = a.cos() as f32;
                }
            }
        }
    }
    out
}

/// Sinusoidal timestep features `[cos(t f_k), sin(t f_k)]`, `f_k = 10000^(-k / 128)`.
pub fn timestep_embedding(t: f32) -> Vec<f32> {
    let half = FREQ_DIM / 2;
    let mut out = vec![0.0f32; FREQ_DIM];
    for k in 0..half {
        let f = (-(10000f64.ln()) * k as f64 / half as f64).exp();
        let a = f64::from(t) * f;
        out[k] = a.cos() as f32;
        out[half + k] = a.sin() as f32;
    }
    out
}

/// Random weights (seeded). Unlike DiT's adaLN-Zero init, modulations are random too (small),
/// so that every path of the network is exercised by a comparison; `zero_adaln` gives the
/// paper's init instead. `layers` keeps only the first blocks.
pub fn random(
    cfg: &DitConfig,
    seed: u64,
    layers: Option<usize>,
    zero_adaln: bool,
) -> Result<(DitConfig, Checkpoint)> {
    let mut cfg = cfg.clone();
    if let Some(l) = layers {
        cfg.layers = l.clamp(1, cfg.layers);
    }
    cfg.validate()?;
    let mut rng = Rng::new(seed);
    let mut ck = Checkpoint::default();
    let d = cfg.hidden;
    let grid = cfg.input_size / cfg.patch;
    put_tensor(
        &mut ck,
        "pos_embed",
        vec![1, grid * grid, d],
        pos_embed_2d(d, grid),
    );
    put_tensor(
        &mut ck,
        "y_embedder.embedding_table.weight",
        vec![cfg.classes + 1, d],
        rng.normal_vec((cfg.classes + 1) * d, 0.02),
    );
    for (name, m, n) in cfg.linear_shapes() {
        let ada = name.contains("adaLN");
        let std = if ada { 0.02 } else { 1.0 / (n as f32).sqrt() };
        let w = if ada && zero_adaln {
            vec![0.0; m * n]
        } else {
            rng.normal_vec(m * n, std)
        };
        let b = if ada && zero_adaln {
            vec![0.0; m]
        } else {
            rng.normal_vec(m, 0.02)
        };
        put_tensor(&mut ck, &format!("{name}.bias"), vec![m], b);
        ck.layers.push((name, Linear::Dense(Dense::new(m, n, w)?)));
    }
    weights::put_config(&mut ck, "dit", &cfg, Some(format!("random (seed {seed})")))?;
    Ok((cfg, ck))
}

/// Reads a DiT state dict saved as safetensors (the reference implementation's names; the
/// patch-embedding conv weight `(D, C, p, p)` is flattened to `(D, C*p*p)`).
pub fn from_safetensors(
    st: &blr_core::safetensors::SafeTensors,
    cfg: &DitConfig,
) -> Result<Checkpoint> {
    cfg.validate()?;
    let d = cfg.hidden;
    let mut ck = Checkpoint::default();
    let n = cfg.tokens();
    put_tensor(
        &mut ck,
        "pos_embed",
        vec![1, n, d],
        st.read_f32_shaped("pos_embed", &[1, n, d])?,
    );
    let k = cfg.classes + 1;
    put_tensor(
        &mut ck,
        "y_embedder.embedding_table.weight",
        vec![k, d],
        st.read_f32_shaped("y_embedder.embedding_table.weight", &[k, d])?,
    );
    for (name, m, nn) in cfg.linear_shapes() {
        let w = if name == "x_embedder.proj" {
            st.read_f32_shaped(
                "x_embedder.proj.weight",
                &[d, cfg.in_channels, cfg.patch, cfg.patch],
            )?
        } else {
            st.read_f32_shaped(&format!("{name}.weight"), &[m, nn])?
        };
        put_tensor(
            &mut ck,
            &format!("{name}.bias"),
            vec![m],
            st.read_f32_shaped(&format!("{name}.bias"), &[m])?,
        );
        ck.layers.push((name, Linear::Dense(Dense::new(m, nn, w)?)));
    }
    weights::put_config(&mut ck, "dit", cfg, Some(st.path().display().to_string()))?;
    Ok(ck)
}

/// `(C, S, S)` latent -> `(N, C*p*p)` rows in conv-weight order `(c, ky, kx)`.
pub fn patchify(latent: &[f32], channels: usize, size: usize, patch: usize) -> Result<Vec<f32>> {
    if latent.len() != channels * size * size || patch == 0 || !size.is_multiple_of(patch) {
        return Err(Error::input(
            "dit latent",
            format!(
                "{} values for a ({channels}, {size}, {size}) latent with patch {patch}",
                latent.len()
            ),
        ));
    }
    let g = size / patch;
    let pd = channels * patch * patch;
    let mut out = vec![0.0f32; g * g * pd];
    for gy in 0..g {
        for gx in 0..g {
            for c in 0..channels {
                for ky in 0..patch {
                    for kx in 0..patch {
                        out[(gy * g + gx) * pd + c * patch * patch + ky * patch + kx] =
                            latent[c * size * size + (gy * patch + ky) * size + gx * patch + kx];
                    }
                }
            }
        }
    }
    Ok(out)
}

/// `(N, p*p*C)` rows with columns ordered `(ky, kx, c)` (the reference's unpatchify) ->
/// `(C, S, S)`.
pub fn unpatchify(x: &[f32], channels: usize, size: usize, patch: usize) -> Vec<f32> {
    let g = size / patch;
    let pd = patch * patch * channels;
    let mut out = vec![0.0f32; channels * size * size];
    for gy in 0..g {
        for gx in 0..g {
            for ky in 0..patch {
                for kx in 0..patch {
                    for c in 0..channels {
                        out[c * size * size + (gy * patch + ky) * size + gx * patch + kx] =
                            x[(gy * g + gx) * pd + (ky * patch + kx) * channels + c];
                    }
                }
            }
        }
    }
    out
}

type Affine<B> = (<B as Backend>::Linear, <B as Backend>::Tensor);

struct Block<B: Backend> {
    qkv: Affine<B>,
    proj: Affine<B>,
    fc1: Affine<B>,
    fc2: Affine<B>,
    ada: Affine<B>,
}

/// DiT resident on backend `B`.
pub struct Dit<B: Backend> {
    pub cfg: DitConfig,
    backend: B,
    x_embed: Affine<B>,
    pos: B::Tensor,
    t_mlp: (Affine<B>, Affine<B>),
    y_table: B::Tensor,
    blocks: Vec<Block<B>>,
    final_ada: Affine<B>,
    final_linear: Affine<B>,
    ones: B::Tensor,
    zeros: B::Tensor,
}

impl<B: Backend> Dit<B> {
    pub fn load(backend: B, cfg: DitConfig, mut ck: Checkpoint) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden;
        let n = cfg.tokens();
        let lin = |ck: &mut Checkpoint, name: &str, m: usize, k: usize| -> Result<Affine<B>> {
            let l = backend.load_linear(take_linear(ck, name, m, k)?)?;
            let bias = take_tensor(ck, &format!("{name}.bias"), &[m])?;
            Ok((l, backend.upload(&bias, 1, m)?))
        };
        let p = cfg.patch;
        let x_embed = lin(&mut ck, "x_embedder.proj", d, cfg.in_channels * p * p)?;
        let pos = backend.upload(&take_tensor(&mut ck, "pos_embed", &[1, n, d])?, n, d)?;
        let t_mlp = (
            lin(&mut ck, "t_embedder.mlp.0", d, FREQ_DIM)?,
            lin(&mut ck, "t_embedder.mlp.2", d, d)?,
        );
        let k = cfg.classes + 1;
        let y_table = backend.upload(
            &take_tensor(&mut ck, "y_embedder.embedding_table.weight", &[k, d])?,
            k,
            d,
        )?;
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let b = format!("blocks.{i}");
            blocks.push(Block {
                qkv: lin(&mut ck, &format!("{b}.attn.qkv"), 3 * d, d)?,
                proj: lin(&mut ck, &format!("{b}.attn.proj"), d, d)?,
                fc1: lin(&mut ck, &format!("{b}.mlp.fc1"), cfg.mlp, d)?,
                fc2: lin(&mut ck, &format!("{b}.mlp.fc2"), d, cfg.mlp)?,
                ada: lin(&mut ck, &format!("{b}.adaLN_modulation.1"), 6 * d, d)?,
            });
        }
        let final_ada = lin(&mut ck, "final_layer.adaLN_modulation.1", 2 * d, d)?;
        let final_linear = lin(&mut ck, "final_layer.linear", p * p * cfg.out_channels(), d)?;
        if !ck.layers.is_empty() || !ck.tensors.is_empty() {
            return Err(Error::config(
                "dit",
                format!(
                    "{} tensors in the weights are not used by a {}-layer model; is the config right?",
                    ck.layers.len() + ck.tensors.len(),
                    cfg.layers
                ),
            ));
        }
        let ones = backend.upload(&vec![1.0; d], 1, d)?;
        let zeros = backend.upload(&vec![0.0; d], 1, d)?;
        Ok(Dit {
            cfg,
            backend,
            x_embed,
            pos,
            t_mlp,
            y_table,
            blocks,
            final_ada,
            final_linear,
            ones,
            zeros,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    fn affine(&self, l: &Affine<B>, x: &B::Tensor) -> Result<B::Tensor> {
        let mut y = self.backend.linear(&l.0, x)?;
        self.backend.add_row(&mut y, &l.1)?;
        Ok(y)
    }

    /// One denoiser evaluation: latent `(C, S, S)`, timestep, class label (`classes` is the
    /// "null" label used for classifier-free guidance). Returns `(C_out, S, S)`.
    pub fn forward(&self, latent: &[f32], t: f32, label: usize) -> Result<Vec<f32>> {
        let cfg = &self.cfg;
        let b = &self.backend;
        if label > cfg.classes {
            return Err(Error::input(
                "dit label",
                format!(
                    "{label} is past the {} classes (+1 null label)",
                    cfg.classes
                ),
            ));
        }
        let (d, p, n) = (cfg.hidden, cfg.patch, cfg.tokens());
        let patches = patchify(latent, cfg.in_channels, cfg.input_size, p)?;
        let mut x = self.affine(
            &self.x_embed,
            &b.upload(&patches, n, cfg.in_channels * p * p)?,
        )?;
        b.add_assign(&mut x, &self.pos)?;

        let mut temb = self.affine(
            &self.t_mlp.0,
            &b.upload(&timestep_embedding(t), 1, FREQ_DIM)?,
        )?;
        b.silu(&mut temb)?;
        let mut c = self.affine(&self.t_mlp.1, &temb)?;
        b.add_assign(&mut c, &b.embedding(&self.y_table, &[label as u32])?)?;
        b.silu(&mut c)?;
        let c_act = c;

        let eps = 1e-6f32;
        let spec = AttnSpec::new(cfg.heads, cfg.heads, d / cfg.heads, false);
        let chunk = |m: &B::Tensor, i: usize| b.slice_cols(m, i * d, (i + 1) * d);
        for blk in &self.blocks {
            let m = self.affine(&blk.ada, &c_act)?;
            let mut h = b.layer_norm(&x, &self.ones, &self.zeros, eps)?;
            b.modulate(&mut h, &chunk(&m, 0)?, &chunk(&m, 1)?)?;
            let qkv = self.affine(&blk.qkv, &h)?;
            let q = b.slice_cols(&qkv, 0, d)?;
            let k = b.slice_cols(&qkv, d, 2 * d)?;
            let v = b.slice_cols(&qkv, 2 * d, 3 * d)?;
            let a = self.affine(&blk.proj, &b.attention(&q, &k, &v, spec)?)?;
            b.add_gated(&mut x, &a, &chunk(&m, 2)?)?;
            let mut h = b.layer_norm(&x, &self.ones, &self.zeros, eps)?;
            b.modulate(&mut h, &chunk(&m, 3)?, &chunk(&m, 4)?)?;
            let mut f = self.affine(&blk.fc1, &h)?;
            b.gelu(&mut f, true)?;
            let f = self.affine(&blk.fc2, &f)?;
            b.add_gated(&mut x, &f, &chunk(&m, 5)?)?;
        }
        let m = self.affine(&self.final_ada, &c_act)?;
        let mut h = b.layer_norm(&x, &self.ones, &self.zeros, eps)?;
        b.modulate(&mut h, &chunk(&m, 0)?, &chunk(&m, 1)?)?;
        let out = b.download(&self.affine(&self.final_linear, &h)?)?;
        Ok(unpatchify(&out, cfg.out_channels(), cfg.input_size, p))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;

    fn tiny() -> DitConfig {
        DitConfig {
            input_size: 8,
            patch: 2,
            in_channels: 3,
            hidden: 16,
            layers: 2,
            heads: 4,
            mlp: 20,
            classes: 5,
            learn_sigma: true,
        }
    }

    #[test]
    fn patchify_unpatchify_orders_by_hand() {
        // patchify: pixel (c=1, y=3, x=4) of an 8x8, patch 2 -> token (1, 2) = 6, column
        // c*4 + ky*2 + kx = 4 + 2 + 0 = 6.
        let mut lat = vec![0.0f32; 3 * 64];
        lat[64 + 3 * 8 + 4] = 1.0;
        let p = patchify(&lat, 3, 8, 2).unwrap();
        assert_eq!(p.iter().position(|&v| v == 1.0), Some(6 * 12 + 6));
        // unpatchify reads columns as (ky, kx, c): column (1*2 + 0)*3 + 1 = 7 of token 6.
        let mut x = vec![0.0f32; 16 * 12];
        x[6 * 12 + 7] = 1.0;
        let img = unpatchify(&x, 3, 8, 2);
        assert_eq!(img.iter().position(|&v| v == 1.0), Some(64 + 3 * 8 + 4));
    }

    #[test]
    fn embeddings_by_hand() {
        let t = timestep_embedding(10.0);
        assert!((t[0] - 10f32.cos()).abs() < 1e-6 && (t[128] - 10f32.sin()).abs() < 1e-6);
        let f1 = (-(10000f64.ln()) / 128.0).exp();
        assert!((f64::from(t[1]) - (10.0 * f1).cos()).abs() < 1e-6);
        // Position table: token (gy=1, gx=2) of a 3x3 grid, D = 8 (quarter 2): first half
        // encodes gx = 2, second half gy = 1.
        let pe = pos_embed_2d(8, 3);
        let row = &pe[5 * 8..6 * 8];
        let w1 = 1.0 / 10000f64.powf(0.5);
        let want = [
            2f64.sin(),
            (2.0 * w1).sin(),
            2f64.cos(),
            (2.0 * w1).cos(),
            1f64.sin(),
            w1.sin(),
            1f64.cos(),
            w1.cos(),
        ];
        for (a, b) in row.iter().zip(want) {
            assert!((f64::from(*a) - b).abs() < 1e-6);
        }
    }

    #[test]
    fn adaln_zero_blocks_are_identity() {
        // With zeroed modulations every gate is 0, so the blocks pass x through and the final
        // layer sees LN(x_embed + pos) unmodulated: compute that directly and compare.
        let (cfg, ck) = random(&tiny(), 3, None, true).unwrap();
        let mut rng = Rng::new(4);
        let lat = rng.normal_vec(3 * 64, 1.0);
        let want = {
            let ck = ck.clone();
            let dense = |n: &str| ck.layer(n).unwrap().to_dense().unwrap();
            let bias = |n: &str| ck.tensors[&format!("{n}.bias")].data.clone();
            let p = patchify(&lat, 3, 8, 2).unwrap();
            let (we, be) = (dense("x_embedder.proj"), bias("x_embedder.proj"));
            let pos = &ck.tensors["pos_embed"].data;
            let (wo, bo) = (dense("final_layer.linear"), bias("final_layer.linear"));
            let mut out = vec![0.0f32; 16 * wo.m];
            for t in 0..16 {
                let x: Vec<f64> = (0..16)
                    .map(|o| {
                        f64::from(be[o] + pos[t * 16 + o])
                            + (0..12)
                                .map(|i| {
                                    f64::from(p[t * 12 + i]) * f64::from(we.weight[o * 12 + i])
                                })
                                .sum::<f64>()
                    })
                    .collect();
                let m = x.iter().sum::<f64>() / 16.0;
                let v = x.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / 16.0;
                let h: Vec<f64> = x.iter().map(|a| (a - m) / (v + 1e-6).sqrt()).collect();
                for o in 0..wo.m {
                    out[t * wo.m + o] = (f64::from(bo[o])
                        + (0..16)
                            .map(|i| h[i] * f64::from(wo.weight[o * 16 + i]))
                            .sum::<f64>()) as f32;
                }
            }
            unpatchify(&out, 6, 8, 2)
        };
        let model = Dit::load(Cpu, cfg, ck).unwrap();
        let got = model.forward(&lat, 500.0, 2).unwrap();
        assert_eq!(got.len(), 6 * 64);
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{a} vs {b}");
        }
    }

    #[test]
    fn conditioning_changes_the_output() {
        let (cfg, ck) = random(&tiny(), 7, None, false).unwrap();
        let model = Dit::load(Cpu, cfg, ck).unwrap();
        let lat = Rng::new(1).normal_vec(3 * 64, 1.0);
        let a = model.forward(&lat, 10.0, 1).unwrap();
        let b = model.forward(&lat, 900.0, 1).unwrap();
        let c = model.forward(&lat, 10.0, 5).unwrap();
        let differs = |x: &[f32], y: &[f32]| x.iter().zip(y).any(|(p, q)| (p - q).abs() > 1e-5);
        assert!(differs(&a, &b) && differs(&a, &c));
        assert!(a.iter().all(|v| v.is_finite()));
        assert!(model.forward(&lat, 10.0, 6).is_err());
    }
}
