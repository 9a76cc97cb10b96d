//! ViT (Dosovitskiy et al. 2021; ViT-B/16 as in timm): patch embedding, CLS token, learned
//! positions, pre-LayerNorm encoder blocks with exact (erf) GELU, classifier on the CLS token.
//! Every linear layer, the patch embedding included, is a `blr_core::Linear` in any format.
//!
//! The patch embedding is a stride-P convolution, i.e. one linear layer `(D, C*P*P)` applied
//! to each flattened patch (index `c*P*P + ky*P + kx`, the layout of the conv weight
//! `(D, C, P, P)` flattened). The CLS token is handled without a concat op: the patch matrix
//! gets an all-zero row 0, so its embedding is 0, and one precomputed `(N+1, D)` table adds
//! `cls + pos[0]` to row 0 and `pos[i] + conv bias` to the others.
//!
//! Canonical tensor names are timm's (`blocks.{i}.attn.qkv`, ...); HF `ViTForImageClassification`
//! files are accepted too (separate query/key/value are stacked into qkv).

use crate::backend::{AttnSpec, Backend};
use crate::weights::{self, put_tensor, take_linear, take_tensor};
use crate::{Error, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::rng::Rng;
use blr_core::{Dense, Linear};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    pub image_size: usize,
    pub patch: usize,
    pub channels: usize,
    pub hidden: usize,
    pub layers: usize,
    pub heads: usize,
    pub mlp: usize,
    pub classes: usize,
    pub eps: f64,
}

impl VitConfig {
    /// `vit-b16`: ViT-B/16 at 224 px, 1000 classes (timm's LayerNorm eps 1e-6).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "vit-b16" => Some(VitConfig {
                image_size: 224,
                patch: 16,
                channels: 3,
                hidden: 768,
                layers: 12,
                heads: 12,
                mlp: 3072,
                classes: 1000,
                eps: 1e-6,
            }),
            _ => None,
        }
    }

    pub fn validate(&self) -> Result<()> {
        if self.patch == 0 || !self.image_size.is_multiple_of(self.patch) {
            return Err(Error::config(
                "vit",
                format!(
                    "patch {} must divide image size {}",
                    self.patch, self.image_size
                ),
            ));
        }
        if self.heads == 0
            || !self.hidden.is_multiple_of(self.heads)
            || self.layers == 0
            || self.classes == 0
        {
            return Err(Error::config(
                "vit",
                format!("inconsistent sizes in {self:?}"),
            ));
        }
        Ok(())
    }

    /// Patches per image.
    pub fn patches(&self) -> usize {
        (self.image_size / self.patch).pow(2)
    }

    fn patch_dim(&self) -> usize {
        self.channels * self.patch * self.patch
    }

    pub fn linear_shapes(&self) -> Vec<(String, usize, usize)> {
        let (d, f) = (self.hidden, self.mlp);
        let mut out = vec![("patch_embed.proj".to_string(), d, self.patch_dim())];
        for i in 0..self.layers {
            out.push((format!("blocks.{i}.attn.qkv"), 3 * d, d));
            out.push((format!("blocks.{i}.attn.proj"), d, d));
            out.push((format!("blocks.{i}.mlp.fc1"), f, d));
            out.push((format!("blocks.{i}.mlp.fc2"), d, f));
        }
        out.push(("head".into(), self.classes, d));
        out
    }

    /// Every non-linear tensor: name and shape.
    fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let d = self.hidden;
        let mut out = vec![
            ("cls_token".to_string(), vec![1, 1, d]),
            ("pos_embed".to_string(), vec![1, self.patches() + 1, d]),
            ("patch_embed.proj.bias".to_string(), vec![d]),
        ];
        for i in 0..self.layers {
            let p = format!("blocks.{i}");
            for (n, len) in [
                ("norm1.weight", d),
                ("norm1.bias", d),
                ("attn.qkv.bias", 3 * d),
                ("attn.proj.bias", d),
                ("norm2.weight", d),
                ("norm2.bias", d),
                ("mlp.fc1.bias", self.mlp),
                ("mlp.fc2.bias", d),
            ] {
                out.push((format!("{p}.{n}"), vec![len]));
            }
        }
        out.push(("norm.weight".into(), vec![d]));
        out.push(("norm.bias".into(), vec![d]));
        out.push(("head.bias".into(), vec![self.classes]));
        out
    }
}

/// Random weights (seeded); `layers` keeps only the first blocks.
pub fn random(
    cfg: &VitConfig,
    seed: u64,
    layers: Option<usize>,
) -> Result<(VitConfig, Checkpoint)> {
    let mut cfg = cfg.clone();
    if let Some(l) = layers {
        cfg.layers = l.clamp(1, cfg.layers);
    }
    cfg.validate()?;
    let mut rng = Rng::new(seed);
    let mut ck = Checkpoint::default();
    for (name, shape) in cfg.tensor_shapes() {
        let len = shape.iter().product();
        let data = if name.contains("norm") && name.ends_with("weight") {
            rng.normal_vec(len, 0.1)
                .into_iter()
                .map(|x| 1.0 + x)
                .collect()
        } else {
            rng.normal_vec(len, 0.02)
        };
        put_tensor(&mut ck, &name, shape, data);
    }
    for (name, m, n) in cfg.linear_shapes() {
        let w = rng.normal_vec(m * n, 1.0 / (n as f32).sqrt());
        ck.layers.push((name, Linear::Dense(Dense::new(m, n, w)?)));
    }
    weights::put_config(&mut ck, "vit", &cfg, Some(format!("random (seed {seed})")))?;
    Ok((cfg, ck))
}

/// Reads timm (`blocks.0.attn.qkv.weight`, ...) or HF (`vit.encoder.layer.0...`) safetensors.
pub fn from_safetensors(
    st: &blr_core::safetensors::SafeTensors,
    cfg: &VitConfig,
) -> Result<Checkpoint> {
    cfg.validate()?;
    let hf = st.info("vit.embeddings.cls_token").is_some();
    let read = |n: &str, shape: &[usize]| -> Result<Vec<f32>> { Ok(st.read_f32_shaped(n, shape)?) };
    let (d, f, np1) = (cfg.hidden, cfg.mlp, cfg.patches() + 1);
    let mut ck = Checkpoint::default();
    let lin = |ck: &mut Checkpoint, name: &str, w: Vec<f32>, m: usize, n: usize| -> Result<()> {
        ck.layers
            .push((name.to_string(), Linear::Dense(Dense::new(m, n, w)?)));
        Ok(())
    };
    let (c, p) = (cfg.channels, cfg.patch);
    if !hf {
        for (name, shape) in cfg.tensor_shapes() {
            let data = read(&name, &shape)?;
            put_tensor(&mut ck, &name, shape, data);
        }
        for (name, m, n) in cfg.linear_shapes() {
            let w = if name == "patch_embed.proj" {
                read("patch_embed.proj.weight", &[d, c, p, p])?
            } else {
                read(&format!("{name}.weight"), &[m, n])?
            };
            lin(&mut ck, &name, w, m, n)?;
        }
    } else {
        let e = "vit.embeddings";
        put_tensor(
            &mut ck,
            "cls_token",
            vec![1, 1, d],
            read(&format!("{e}.cls_token"), &[1, 1, d])?,
        );
        put_tensor(
            &mut ck,
            "pos_embed",
            vec![1, np1, d],
            read(&format!("{e}.position_embeddings"), &[1, np1, d])?,
        );
        let pw = read(
            &format!("{e}.patch_embeddings.projection.weight"),
            &[d, c, p, p],
        )?;
        lin(&mut ck, "patch_embed.proj", pw, d, c * p * p)?;
        put_tensor(
            &mut ck,
            "patch_embed.proj.bias",
            vec![d],
            read(&format!("{e}.patch_embeddings.projection.bias"), &[d])?,
        );
        for i in 0..cfg.layers {
            let h = format!("vit.encoder.layer.{i}");
            let t = format!("blocks.{i}");
            let mut qkv_w = Vec::with_capacity(3 * d * d);
            let mut qkv_b = Vec::with_capacity(3 * d);
            for part in ["query", "key", "value"] {
                qkv_w.extend(read(
                    &format!("{h}.attention.attention.{part}.weight"),
                    &[d, d],
                )?);
                qkv_b.extend(read(&format!("{h}.attention.attention.{part}.bias"), &[d])?);
            }
            lin(&mut ck, &format!("{t}.attn.qkv"), qkv_w, 3 * d, d)?;
            put_tensor(&mut ck, &format!("{t}.attn.qkv.bias"), vec![3 * d], qkv_b);
            for (hn, tn, m, n) in [
                ("attention.output.dense", "attn.proj", d, d),
                ("intermediate.dense", "mlp.fc1", f, d),
                ("output.dense", "mlp.fc2", d, f),
            ] {
                lin(
                    &mut ck,
                    &format!("{t}.{tn}"),
                    read(&format!("{h}.{hn}.weight"), &[m, n])?,
                    m,
                    n,
                )?;
                put_tensor(
                    &mut ck,
                    &format!("{t}.{tn}.bias"),
                    vec![m],
                    read(&format!("{h}.{hn}.bias"), &[m])?,
                );
            }
            for (hn, tn) in [("layernorm_before", "norm1"), ("layernorm_after", "norm2")] {
                for wb in ["weight", "bias"] {
                    put_tensor(
                        &mut ck,
                        &format!("{t}.{tn}.{wb}"),
                        vec![d],
                        read(&format!("{h}.{hn}.{wb}"), &[d])?,
                    );
                }
            }
        }
        for wb in ["weight", "bias"] {
            put_tensor(
                &mut ck,
                &format!("norm.{wb}"),
                vec![d],
                read(&format!("vit.layernorm.{wb}"), &[d])?,
            );
        }
        let k = cfg.classes;
        lin(&mut ck, "head", read("classifier.weight", &[k, d])?, k, d)?;
        put_tensor(
            &mut ck,
            "head.bias",
            vec![k],
            read("classifier.bias", &[k])?,
        );
    }
    weights::put_config(&mut ck, "vit", cfg, Some(st.path().display().to_string()))?;
    Ok(ck)
}

/// Flattens an image `(C, H, W)` into `(1 + N, C*P*P)` patch rows, row 0 all zeros (the CLS
/// slot), row `1 + py*(W/P) + px` the patch at `(py, px)` in conv-weight order `(c, ky, kx)`.
pub fn patchify_with_cls(
    image: &[f32],
    channels: usize,
    size: usize,
    patch: usize,
) -> Result<Vec<f32>> {
    if image.len() != channels * size * size || patch == 0 || !size.is_multiple_of(patch) {
        return Err(Error::input(
            "vit image",
            format!(
                "{} values for a ({channels}, {size}, {size}) image with patch {patch}",
                image.len()
            ),
        ));
    }
    let g = size / patch;
    let pd = channels * patch * patch;
    let mut out = vec![0.0f32; (1 + g * g) * pd];
    for py in 0..g {
        for px in 0..g {
            let row = &mut out[(1 + py * g + px) * pd..(2 + py * g + px) * pd];
            for c in 0..channels {
                for ky in 0..patch {
                    let src = c * size * size + (py * patch + ky) * size + px * patch;
                    row[c * patch * patch + ky * patch..c * patch * patch + (ky + 1) * patch]
                        .copy_from_slice(&image[src..src + patch]);
                }
            }
        }
    }
    Ok(out)
}

struct Block<B: Backend> {
    norm1: (B::Tensor, B::Tensor),
    qkv: (B::Linear, B::Tensor),
    proj: (B::Linear, B::Tensor),
    norm2: (B::Tensor, B::Tensor),
    fc1: (B::Linear, B::Tensor),
    fc2: (B::Linear, B::Tensor),
}

/// ViT resident on backend `B`.
pub struct Vit<B: Backend> {
    pub cfg: VitConfig,
    backend: B,
    patch_embed: B::Linear,
    /// `(N+1, D)`: row 0 `cls + pos[0]`, row i `pos[i] + patch bias`.
    embed_add: B::Tensor,
    blocks: Vec<Block<B>>,
    norm: (B::Tensor, B::Tensor),
    head: (B::Linear, B::Tensor),
}

impl<B: Backend> Vit<B> {
    pub fn load(backend: B, cfg: VitConfig, mut ck: Checkpoint) -> Result<Self> {
        cfg.validate()?;
        let (d, f, np1) = (cfg.hidden, cfg.mlp, cfg.patches() + 1);
        let cls = take_tensor(&mut ck, "cls_token", &[1, 1, d])?;
        let pos = take_tensor(&mut ck, "pos_embed", &[1, np1, d])?;
        let bias = take_tensor(&mut ck, "patch_embed.proj.bias", &[d])?;
        let mut add = pos;
        for (r, row) in add.chunks_mut(d).enumerate() {
            let extra = if r == 0 { &cls } else { &bias };
            row.iter_mut().zip(extra).for_each(|(a, b)| *a += b);
        }
        let embed_add = backend.upload(&add, np1, d)?;
        let patch_embed = backend.load_linear(take_linear(
            &mut ck,
            "patch_embed.proj",
            d,
            cfg.patch_dim(),
        )?)?;
        let vec = |ck: &mut Checkpoint, n: &str, len: usize| -> Result<B::Tensor> {
            backend.upload(&take_tensor(ck, n, &[len])?, 1, len)
        };
        let lin =
            |ck: &mut Checkpoint, n: &str, m: usize, k: usize| -> Result<(B::Linear, B::Tensor)> {
                let l = backend.load_linear(take_linear(ck, n, m, k)?)?;
                Ok((l, vec(ck, &format!("{n}.bias"), m)?))
            };
        let mut blocks = Vec::with_capacity(cfg.layers);
        for i in 0..cfg.layers {
            let p = format!("blocks.{i}");
            blocks.push(Block {
                norm1: (
                    vec(&mut ck, &format!("{p}.norm1.weight"), d)?,
                    vec(&mut ck, &format!("{p}.norm1.bias"), d)?,
                ),
                qkv: lin(&mut ck, &format!("{p}.attn.qkv"), 3 * d, d)?,
                proj: lin(&mut ck, &format!("{p}.attn.proj"), d, d)?,
                norm2: (
                    vec(&mut ck, &format!("{p}.norm2.weight"), d)?,
                    vec(&mut ck, &format!("{p}.norm2.bias"), d)?,
                ),
                fc1: lin(&mut ck, &format!("{p}.mlp.fc1"), f, d)?,
                fc2: lin(&mut ck, &format!("{p}.mlp.fc2"), d, f)?,
            });
        }
        let norm = (
            vec(&mut ck, "norm.weight", d)?,
            vec(&mut ck, "norm.bias", d)?,
        );
        let head = lin(&mut ck, "head", cfg.classes, d)?;
        if !ck.layers.is_empty() || !ck.tensors.is_empty() {
            return Err(Error::config(
                "vit",
                format!(
                    "{} tensors in the weights are not used by a {}-layer model; is the config right?",
                    ck.layers.len() + ck.tensors.len(),
                    cfg.layers
                ),
            ));
        }
        Ok(Vit {
            cfg,
            backend,
            patch_embed,
            embed_add,
            blocks,
            norm,
            head,
        })
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Class logits for one image `(C, H, W)` (already normalised as the model expects).
    pub fn forward(&self, image: &[f32]) -> Result<Vec<f32>> {
        let b = &self.backend;
        let cfg = &self.cfg;
        let patches = patchify_with_cls(image, cfg.channels, cfg.image_size, cfg.patch)?;
        let np1 = cfg.patches() + 1;
        let x_in = b.upload(&patches, np1, cfg.patch_dim())?;
        let mut x = b.linear(&self.patch_embed, &x_in)?;
        b.add_assign(&mut x, &self.embed_add)?;
        let d = cfg.hidden;
        let eps = cfg.eps as f32;
        let spec = AttnSpec::new(cfg.heads, cfg.heads, d / cfg.heads, false);
        for blk in &self.blocks {
            let h = b.layer_norm(&x, &blk.norm1.0, &blk.norm1.1, eps)?;
            let mut qkv = b.linear(&blk.qkv.0, &h)?;
            b.add_row(&mut qkv, &blk.qkv.1)?;
            let q = b.slice_cols(&qkv, 0, d)?;
            let k = b.slice_cols(&qkv, d, 2 * d)?;
            let v = b.slice_cols(&qkv, 2 * d, 3 * d)?;
            let a = b.attention(&q, &k, &v, spec)?;
            let mut o = b.linear(&blk.proj.0, &a)?;
            b.add_row(&mut o, &blk.proj.1)?;
            b.add_assign(&mut x, &o)?;
            let h = b.layer_norm(&x, &blk.norm2.0, &blk.norm2.1, eps)?;
            let mut m = b.linear(&blk.fc1.0, &h)?;
            b.add_row(&mut m, &blk.fc1.1)?;
            b.gelu(&mut m, false)?;
            let mut o = b.linear(&blk.fc2.0, &m)?;
            b.add_row(&mut o, &blk.fc2.1)?;
            b.add_assign(&mut x, &o)?;
        }
        let cls = b.slice_rows(&x, 0, 1)?;
        let cls = b.layer_norm(&cls, &self.norm.0, &self.norm.1, eps)?;
        let mut logits = b.linear(&self.head.0, &cls)?;
        b.add_row(&mut logits, &self.head.1)?;
        b.download(&logits)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;
    use blr_core::format::{FormatKind, Shape};
    use blr_core::safetensors::{self as st, Dtype, TensorToWrite};

    fn tiny() -> VitConfig {
        VitConfig {
            image_size: 12,
            patch: 4,
            channels: 3,
            hidden: 16,
            layers: 2,
            heads: 4,
            mlp: 24,
            classes: 7,
            eps: 1e-6,
        }
    }

    #[test]
    fn patchify_places_pixels_by_hand() {
        // Pixel (c=2, y=5, x=9) of a 12x12 image, patch 4: patch (py=1, px=2) -> row 1+1*3+2 = 6,
        // column c*16 + ky*4 + kx = 32 + 1*4 + 1 = 37.
        let mut img = vec![0.0f32; 3 * 12 * 12];
        img[2 * 144 + 5 * 12 + 9] = 1.0;
        let p = patchify_with_cls(&img, 3, 12, 4).unwrap();
        let nz: Vec<usize> = p
            .iter()
            .enumerate()
            .filter(|(_, &v)| v != 0.0)
            .map(|(i, _)| i)
            .collect();
        assert_eq!(nz, vec![6 * 48 + 37]);
        assert!(patchify_with_cls(&img[1..], 3, 12, 4).is_err());
    }

    #[test]
    fn timm_and_hf_files_give_the_same_logits_and_formats_plug_in() {
        let (cfg, ck) = random(&tiny(), 3, None).unwrap();
        let (d, c, p) = (cfg.hidden, cfg.channels, cfg.patch);
        // Write the same weights once in timm naming, once in HF naming.
        let mut timm: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        for (n, t) in &ck.tensors {
            timm.push((n.clone(), t.shape.clone(), t.data.clone()));
        }
        for (n, l) in &ck.layers {
            let w = l.to_dense().unwrap();
            let shape = if n == "patch_embed.proj" {
                vec![d, c, p, p]
            } else {
                vec![w.m, w.n]
            };
            timm.push((format!("{n}.weight"), shape, w.weight.clone()));
        }
        let get = |n: &str| timm.iter().find(|(k, _, _)| k == n).unwrap().clone();
        let mut hf: Vec<(String, Vec<usize>, Vec<f32>)> = Vec::new();
        let e = "vit.embeddings";
        let ren = |n: &str, new: String| {
            let (_, s, v) = get(n);
            (new, s, v)
        };
        hf.push(ren("cls_token", format!("{e}.cls_token")));
        hf.push(ren("pos_embed", format!("{e}.position_embeddings")));
        hf.push(ren(
            "patch_embed.proj.weight",
            format!("{e}.patch_embeddings.projection.weight"),
        ));
        hf.push(ren(
            "patch_embed.proj.bias",
            format!("{e}.patch_embeddings.projection.bias"),
        ));
        for i in 0..cfg.layers {
            let (t, h) = (format!("blocks.{i}"), format!("vit.encoder.layer.{i}"));
            let (_, _, qw) = get(&format!("{t}.attn.qkv.weight"));
            let (_, _, qb) = get(&format!("{t}.attn.qkv.bias"));
            for (j, part) in ["query", "key", "value"].iter().enumerate() {
                hf.push((
                    format!("{h}.attention.attention.{part}.weight"),
                    vec![d, d],
                    qw[j * d * d..(j + 1) * d * d].to_vec(),
                ));
                hf.push((
                    format!("{h}.attention.attention.{part}.bias"),
                    vec![d],
                    qb[j * d..(j + 1) * d].to_vec(),
                ));
            }
            for (tn, hn) in [
                ("attn.proj", "attention.output.dense"),
                ("mlp.fc1", "intermediate.dense"),
                ("mlp.fc2", "output.dense"),
                ("norm1", "layernorm_before"),
                ("norm2", "layernorm_after"),
            ] {
                for wb in ["weight", "bias"] {
                    hf.push(ren(&format!("{t}.{tn}.{wb}"), format!("{h}.{hn}.{wb}")));
                }
            }
        }
        for wb in ["weight", "bias"] {
            hf.push(ren(&format!("norm.{wb}"), format!("vit.layernorm.{wb}")));
            hf.push(ren(&format!("head.{wb}"), format!("classifier.{wb}")));
        }
        let file = |name: &str, ts: &[(String, Vec<usize>, Vec<f32>)]| {
            let w: Vec<TensorToWrite> = ts
                .iter()
                .map(|(n, s, d)| TensorToWrite {
                    name: n.clone(),
                    dtype: Dtype::F32,
                    shape: s.clone(),
                    data: d,
                })
                .collect();
            st::SafeTensors::from_bytes(name, st::serialize(&w, &Default::default()).unwrap())
                .unwrap()
        };
        let mut rng = Rng::new(1);
        let img = rng.normal_vec(3 * 12 * 12, 1.0);
        let run = |ck: Checkpoint| {
            Vit::load(Cpu, cfg.clone(), ck)
                .unwrap()
                .forward(&img)
                .unwrap()
        };
        let base = run(ck.clone());
        assert_eq!(base.len(), 7);
        assert_eq!(
            run(from_safetensors(&file("timm.safetensors", &timm), &cfg).unwrap()),
            base
        );
        assert_eq!(
            run(from_safetensors(&file("hf.safetensors", &hf), &cfg).unwrap()),
            base
        );

        // Any format plugs in: a random BLAST fc1 in block 1 runs and changes the output.
        let mut ck2 = ck.clone();
        let s = Shape {
            format: FormatKind::Blast,
            m: 24,
            n: 16,
            b_out: 3,
            b_in: 2,
            rank: 4,
        };
        ck2.layers
            .iter_mut()
            .find(|(n, _)| n == "blocks.1.mlp.fc1")
            .unwrap()
            .1 = Linear::random(&s, 2).unwrap();
        let other = run(ck2);
        assert!(other.iter().zip(&base).any(|(a, b)| (a - b).abs() > 1e-4));
    }

    #[test]
    fn attention_is_bidirectional_and_cls_reads_every_patch() {
        // Changing only the last patch must change the CLS logits (non-causal attention).
        let (cfg, ck) = random(&tiny(), 5, None).unwrap();
        let model = Vit::load(Cpu, cfg, ck).unwrap();
        let mut rng = Rng::new(2);
        let mut img = rng.normal_vec(3 * 12 * 12, 1.0);
        let a = model.forward(&img).unwrap();
        img[3 * 144 - 1] += 1.0; // bottom-right pixel of the last channel: last patch
        let b = model.forward(&img).unwrap();
        assert!(a.iter().zip(&b).any(|(x, y)| (x - y).abs() > 1e-6));
    }
}
