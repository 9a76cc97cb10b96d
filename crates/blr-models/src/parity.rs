//! One parity suite for every backend (in the spirit of ggml's `test-backend-ops`): each op and
//! each model runs on the backend under test and on the CPU reference with the same fresh random
//! inputs at odd shapes, and every result is reported with its shape and relative error
//! `||out - ref|| / ||ref||`. A bf16 backend is expected around 1e-3..1e-2 (BRIEF section 6); NaN
//! or Inf never passes.

use crate::backend::{AttnSpec, Backend};
use crate::cpu::{Cpu, CpuTensor};
use crate::lm::CausalLm;
use crate::{dit, gpt2, llama, vit, Result};
use blr_core::format::{FormatKind, Shape};
use blr_core::rng::Rng;
use blr_core::Linear;

/// One comparison.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Check {
    pub op: String,
    pub shape: String,
    pub rel_err: f64,
    pub ok: bool,
}

/// `||a - b|| / ||b||` in f64; infinite when `a` has a non-finite value or the lengths differ.
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    if a.len() != b.len() || a.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(&x, &y)| (f64::from(x) - f64::from(y)).powi(2))
        .sum();
    let den: f64 = b.iter().map(|&y| f64::from(y).powi(2)).sum();
    if den == 0.0 {
        return num.sqrt();
    }
    (num / den).sqrt()
}

struct Suite<'a, B: Backend> {
    b: &'a B,
    rng: Rng,
    tol: f64,
    out: Vec<Check>,
}

impl<B: Backend> Suite<'_, B> {
    fn rand(&mut self, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor {
            data: self.rng.normal_vec(rows * cols, 1.0),
            rows,
            cols,
        }
    }

    fn up(&self, t: &CpuTensor) -> Result<B::Tensor> {
        self.b.upload(&t.data, t.rows, t.cols)
    }

    fn record(&mut self, op: &str, shape: String, got: &B::Tensor, want: &CpuTensor) -> Result<()> {
        let g = self.b.download(got)?;
        let e = rel_err(&g, &want.data);
        self.out.push(Check {
            op: op.to_string(),
            shape,
            rel_err: e,
            ok: e <= self.tol,
        });
        Ok(())
    }
}

/// Every backend op on odd shapes, against [`Cpu`].
pub fn check_ops<B: Backend>(b: &B, seed: u64, tol: f64) -> Result<Vec<Check>> {
    let mut s = Suite {
        b,
        rng: Rng::new(seed),
        tol,
        out: Vec::new(),
    };
    let c = Cpu;
    for &(t, d) in &[(1usize, 20usize), (7, 48), (33, 96)] {
        let x = s.rand(t, d);
        let w = s.rand(1, d);
        let bias = s.rand(1, d);
        let y = s.rand(t, d);
        let (xd, wd, bd, yd) = (s.up(&x)?, s.up(&w)?, s.up(&bias)?, s.up(&y)?);
        let shape = format!("({t}, {d})");
        s.record(
            "rms_norm",
            shape.clone(),
            &b.rms_norm(&xd, &wd, 1e-5)?,
            &c.rms_norm(&x, &w, 1e-5)?,
        )?;
        s.record(
            "layer_norm",
            shape.clone(),
            &b.layer_norm(&xd, &wd, &bd, 1e-6)?,
            &c.layer_norm(&x, &w, &bias, 1e-6)?,
        )?;
        let (mut r1, mut r2) = (s.up(&x)?, x.clone());
        b.add_assign(&mut r1, &yd)?;
        c.add_assign(&mut r2, &y)?;
        s.record("add_assign", shape.clone(), &r1, &r2)?;
        let (mut r1, mut r2) = (s.up(&x)?, x.clone());
        b.add_row(&mut r1, &bd)?;
        c.add_row(&mut r2, &bias)?;
        s.record("add_row", shape.clone(), &r1, &r2)?;
        let (mut r1, mut r2) = (s.up(&x)?, x.clone());
        b.modulate(&mut r1, &bd, &wd)?;
        c.modulate(&mut r2, &bias, &w)?;
        s.record("modulate", shape.clone(), &r1, &r2)?;
        let (mut r1, mut r2) = (s.up(&x)?, x.clone());
        b.add_gated(&mut r1, &yd, &wd)?;
        c.add_gated(&mut r2, &y, &w)?;
        s.record("add_gated", shape.clone(), &r1, &r2)?;
        s.record(
            "silu_mul",
            shape.clone(),
            &b.silu_mul(&xd, &yd)?,
            &c.silu_mul(&x, &y)?,
        )?;
        for tanh in [true, false] {
            let (mut r1, mut r2) = (s.up(&x)?, x.clone());
            b.gelu(&mut r1, tanh)?;
            c.gelu(&mut r2, tanh)?;
            s.record(
                if tanh { "gelu_tanh" } else { "gelu_erf" },
                shape.clone(),
                &r1,
                &r2,
            )?;
        }
        let (mut r1, mut r2) = (s.up(&x)?, x.clone());
        b.silu(&mut r1)?;
        c.silu(&mut r2)?;
        s.record("silu", shape.clone(), &r1, &r2)?;
        s.record(
            "slice_rows",
            shape.clone(),
            &b.slice_rows(&xd, t / 2, t)?,
            &c.slice_rows(&x, t / 2, t)?,
        )?;
        s.record(
            "slice_cols",
            shape.clone(),
            &b.slice_cols(&xd, d / 4, d / 2 + 1)?,
            &c.slice_cols(&x, d / 4, d / 2 + 1)?,
        )?;
        let table = s.rand(37, d);
        let ids: Vec<u32> = (0..t).map(|_| s.rng.below(37) as u32).collect();
        s.record(
            "embedding",
            format!("table (37, {d}), {t} ids"),
            &b.embedding(&s.up(&table)?, &ids)?,
            &c.embedding(&table, &ids)?,
        )?;
    }
    // RoPE: heads x head_dim with 4 frequencies, at a large starting position.
    for &(t, heads, hd, pos0) in &[(1usize, 3usize, 8usize, 0usize), (9, 5, 16, 1000)] {
        let x = s.rand(t, heads * hd);
        let freqs: Vec<f32> = (0..hd / 2)
            .map(|i| 10000f32.powf(-2.0 * i as f32 / hd as f32))
            .collect();
        let (mut r1, mut r2) = (s.up(&x)?, x.clone());
        b.rope(&mut r1, heads, pos0, &freqs)?;
        c.rope(&mut r2, heads, pos0, &freqs)?;
        s.record(
            "rope",
            format!("({t}, {heads}x{hd}) from position {pos0}"),
            &r1,
            &r2,
        )?;
    }
    // Linear layers in every format, at decode (T = 1) and prefill-like T.
    let shapes = [
        Shape {
            format: FormatKind::Dense,
            m: 40,
            n: 24,
            b_out: 1,
            b_in: 1,
            rank: 24,
        },
        Shape {
            format: FormatKind::LowRank,
            m: 40,
            n: 24,
            b_out: 1,
            b_in: 1,
            rank: 5,
        },
        Shape {
            format: FormatKind::Monarch,
            m: 40,
            n: 24,
            b_out: 4,
            b_in: 4,
            rank: 8,
        },
        Shape {
            format: FormatKind::Blast,
            m: 40,
            n: 24,
            b_out: 4,
            b_in: 3,
            rank: 6,
        },
    ];
    for (i, sh) in shapes.iter().enumerate() {
        let layer = Linear::random(sh, seed + i as u64)?;
        let bl = b.load_linear(layer.clone())?;
        for t in [1usize, 13] {
            let x = s.rand(t, sh.n);
            s.record(
                &format!("linear {}", sh.format),
                format!("T={t}, ({}, {})", sh.m, sh.n),
                &b.linear(&bl, &s.up(&x)?)?,
                &c.linear(&layer, &x)?,
            )?;
        }
    }
    // Attention: GQA, causal and bidirectional, then a cache fed in a prefill and decode steps.
    for &(t, heads, kv, hd, causal) in &[
        (1usize, 4usize, 2usize, 8usize, true),
        (19, 6, 2, 16, true),
        (17, 4, 4, 8, false),
        // Head sizes the CUDA backend runs on tensor cores (64, 128): several 64-row query
        // tiles with a ragged last one, causal and not.
        (77, 4, 2, 64, true),
        (130, 2, 1, 128, true),
        (45, 3, 3, 64, false),
        (1, 4, 2, 128, true),
    ] {
        let spec = AttnSpec::new(heads, kv, hd, causal);
        let (q, k, v) = (
            s.rand(t, heads * hd),
            s.rand(t, kv * hd),
            s.rand(t, kv * hd),
        );
        s.record(
            "attention",
            format!("T={t}, {heads} heads / {kv} kv x {hd}, causal={causal}"),
            &b.attention(&s.up(&q)?, &s.up(&k)?, &s.up(&v)?, spec)?,
            &c.attention(&q, &k, &v, spec)?,
        )?;
    }
    let spec = AttnSpec::new(6, 3, 8, true);
    let mut bc = b.new_kv_cache(3, 8, 24)?;
    let mut cc = c.new_kv_cache(3, 8, 24)?;
    for (step, t) in [11usize, 1, 1, 5].into_iter().enumerate() {
        let (q, k, v) = (s.rand(t, 48), s.rand(t, 24), s.rand(t, 24));
        let got = b.attention_cached(&s.up(&q)?, &s.up(&k)?, &s.up(&v)?, &mut bc, spec)?;
        let want = c.attention_cached(&q, &k, &v, &mut cc, spec)?;
        s.record(
            "attention_cached",
            format!("step {step}: {t} new after {}", c.kv_len(&cc) - t),
            &got,
            &want,
        )?;
    }
    // The same at head_dim 64: a prefill longer than one query tile, then decode steps.
    let spec = AttnSpec::new(4, 2, 64, true);
    let mut bc = b.new_kv_cache(2, 64, 90)?;
    let mut cc = c.new_kv_cache(2, 64, 90)?;
    for (step, t) in [70usize, 1, 1, 9].into_iter().enumerate() {
        let (q, k, v) = (s.rand(t, 256), s.rand(t, 128), s.rand(t, 128));
        let got = b.attention_cached(&s.up(&q)?, &s.up(&k)?, &s.up(&v)?, &mut bc, spec)?;
        let want = c.attention_cached(&q, &k, &v, &mut cc, spec)?;
        s.record(
            "attention_cached",
            format!(
                "head_dim 64, step {step}: {t} new after {}",
                c.kv_len(&cc) - t
            ),
            &got,
            &want,
        )?;
    }
    // head_dim 128: decode over a cache longer than one 128-key split of the decode kernel.
    let spec = AttnSpec::new(4, 2, 128, true);
    let mut bc = b.new_kv_cache(2, 128, 160)?;
    let mut cc = c.new_kv_cache(2, 128, 160)?;
    for (step, t) in [150usize, 1, 1].into_iter().enumerate() {
        let (q, k, v) = (s.rand(t, 512), s.rand(t, 256), s.rand(t, 256));
        let got = b.attention_cached(&s.up(&q)?, &s.up(&k)?, &s.up(&v)?, &mut bc, spec)?;
        let want = c.attention_cached(&q, &k, &v, &mut cc, spec)?;
        s.record(
            "attention_cached",
            format!(
                "head_dim 128, step {step}: {t} new after {}",
                c.kv_len(&cc) - t
            ),
            &got,
            &want,
        )?;
    }
    Ok(s.out)
}

/// Next-token sampling on the backend against [`crate::lm::choose`] on the host, for the same
/// logits (bf16-representable, so every backend holds them exactly) and the same uniform
/// numbers: greedy and temperature + top-p (1, 0.9, 0.5, tiny), vocabularies of odd sizes,
/// logits with many ties and masked (-Inf) tokens, u at 0, near 1 and random. The choice must
/// be the same token every time; `rel_err` reports the number of mismatched draws.
pub fn check_sampling<B: Backend>(b: &B, seed: u64) -> Result<Vec<Check>> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::new();
    let params: [(f32, f32); 7] = [
        (0.0, 1.0),
        (1.0, 1.0),
        (0.7, 0.9),
        (1.3, 0.5),
        (1.0, 1e-6),
        (0.05, 0.95),
        (2.0, 0.999_999),
    ];
    for &vocab in &[49_157usize, 1000, 7, 1] {
        for ties in [false, true] {
            let mut logits: Vec<f32> = if ties {
                // Small integers: hundreds of exact ties at every value, the maximum included.
                (0..vocab).map(|_| rng.below(7) as f32 - 3.0).collect()
            } else {
                rng.normal_vec(vocab, 3.0)
            };
            // Round to bf16 as a bf16 backend stores them, so both sides see the same values.
            for l in &mut logits {
                *l = half::bf16::from_f32(*l).to_f32();
            }
            if vocab > 7 {
                for _ in 0..vocab / 10 {
                    let i = rng.below(vocab);
                    logits[i] = f32::NEG_INFINITY;
                }
                logits[vocab / 2] = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            }
            // Two rows: only the last one is sampled.
            let mut two = rng.normal_vec(vocab, 1.0);
            two.extend_from_slice(&logits);
            let dev = b.upload(&two, 2, vocab)?;
            let mut draws = 0usize;
            let mut mismatches = Vec::new();
            for &(t, p) in &params {
                let mut us = vec![0.0, 0.5, 0.999_999_999];
                us.extend((0..8).map(|_| rng.uniform()));
                for u in us {
                    let want = crate::lm::choose(&logits, t, p, u)?;
                    let got = b.sample_last(&dev, t, p, u)?;
                    draws += 1;
                    if got != want {
                        mismatches.push(format!("T={t} p={p} u={u}: {got} vs {want}"));
                    }
                }
            }
            out.push(Check {
                op: "sample".into(),
                shape: format!(
                    "vocab {vocab}{}, {draws} draws{}",
                    if ties { ", ties" } else { "" },
                    mismatches
                        .first()
                        .map(|m| format!(", first mismatch {m}"))
                        .unwrap_or_default()
                ),
                rel_err: mismatches.len() as f64,
                ok: mismatches.is_empty(),
            });
        }
    }
    // A diverged forward pass is an error on every backend, never a token.
    let nan = b.upload(&[0.0, f32::NAN, 1.0], 1, 3)?;
    let refused =
        b.sample_last(&nan, 0.0, 1.0, 0.0).is_err() && b.sample_last(&nan, 1.0, 0.9, 0.3).is_err();
    out.push(Check {
        op: "sample".into(),
        shape: "NaN logits refused".into(),
        rel_err: if refused { 0.0 } else { 1.0 },
        ok: refused,
    });
    Ok(out)
}

/// Tiny random Llama, GPT-2, ViT and DiT (odd shapes; one layer of each in a BLR format) on the
/// backend under test against the CPU.
pub fn check_models<B: Backend + Clone>(b: &B, seed: u64, tol: f64) -> Result<Vec<Check>> {
    let mut out = Vec::new();
    let mut rng = Rng::new(seed);
    let mut push = |op: &str, shape: String, got: &[f32], want: &[f32]| {
        let e = rel_err(got, want);
        out.push(Check {
            op: op.into(),
            shape,
            rel_err: e,
            ok: e <= tol,
        });
    };
    let blast = |m, n, b_out, b_in, rank| Shape {
        format: FormatKind::Blast,
        m,
        n,
        b_out,
        b_in,
        rank,
    };
    let swap = |ck: &mut blr_core::checkpoint::Checkpoint, name: &str, s: Shape| -> Result<()> {
        if let Some(slot) = ck.layers.iter_mut().find(|(n, _)| n == name) {
            slot.1 = Linear::random(&s, seed)?;
        }
        Ok(())
    };

    let cfg = llama::LlamaConfig {
        vocab_size: 53,
        hidden: 24,
        intermediate: 40,
        layers: 2,
        heads: 6,
        kv_heads: 2,
        head_dim: 6,
        rope_theta: 1e4,
        rope_scaling: llama::RopeScaling::None,
        rms_eps: 1e-5,
        tie_embeddings: true,
        max_positions: 64,
    };
    let (cfg, mut ck) = llama::random(&cfg, seed, None)?;
    swap(
        &mut ck,
        "model.layers.1.mlp.up_proj",
        blast(40, 24, 4, 3, 5),
    )?;
    let ids: Vec<u32> = (0..13).map(|_| rng.below(53) as u32).collect();
    let mb = llama::Llama::load(b.clone(), cfg.clone(), ck.clone())?;
    let mc = llama::Llama::load(Cpu, cfg, ck)?;
    let (mut cb, mut cc) = (mb.new_cache(16)?, mc.new_cache(16)?);
    push(
        "llama prefill logits",
        "13 tokens".into(),
        &mb.forward(&ids[..10], &mut cb, true)?,
        &mc.forward(&ids[..10], &mut cc, true)?,
    );
    for p in 10..13 {
        push(
            "llama decode logits",
            format!("position {p}"),
            &mb.forward(&ids[p..=p], &mut cb, false)?,
            &mc.forward(&ids[p..=p], &mut cc, false)?,
        );
    }

    // A Llama whose attention runs on the CUDA backend's tensor-core kernel (head_dim 64) and
    // whose BLAST layer has tile-aligned blocks (the GPU's fused strategies apply), prefilling
    // more than one 64-row query tile.
    let cfg = llama::LlamaConfig {
        vocab_size: 61,
        hidden: 128,
        intermediate: 96,
        layers: 2,
        heads: 2,
        kv_heads: 1,
        head_dim: 64,
        rope_theta: 1e4,
        rope_scaling: llama::RopeScaling::None,
        rms_eps: 1e-5,
        tie_embeddings: false,
        max_positions: 128,
    };
    let (cfg, mut ck) = llama::random(&cfg, seed + 1, None)?;
    swap(
        &mut ck,
        "model.layers.0.mlp.up_proj",
        blast(96, 128, 4, 4, 16),
    )?;
    let ids: Vec<u32> = (0..72).map(|_| rng.below(61) as u32).collect();
    let mb = llama::Llama::load(b.clone(), cfg.clone(), ck.clone())?;
    let mc = llama::Llama::load(Cpu, cfg, ck)?;
    let (mut cb, mut cc) = (mb.new_cache(80)?, mc.new_cache(80)?);
    push(
        "llama hd64 prefill logits",
        "70 tokens".into(),
        &mb.forward(&ids[..70], &mut cb, true)?,
        &mc.forward(&ids[..70], &mut cc, true)?,
    );
    for p in 70..72 {
        push(
            "llama hd64 decode logits",
            format!("position {p}"),
            &mb.forward(&ids[p..=p], &mut cb, false)?,
            &mc.forward(&ids[p..=p], &mut cc, false)?,
        );
    }

    let gcfg = gpt2::Gpt2Config {
        vocab_size: 41,
        max_positions: 32,
        hidden: 24,
        layers: 2,
        heads: 3,
        eps: 1e-5,
    };
    let (gcfg, mut ck) = gpt2::random(&gcfg, seed, None)?;
    swap(
        &mut ck,
        "transformer.h.0.attn.c_attn",
        blast(72, 24, 3, 2, 4),
    )?;
    let ids: Vec<u32> = (0..11).map(|_| rng.below(41) as u32).collect();
    let gb = gpt2::Gpt2::load(b.clone(), gcfg.clone(), ck.clone())?;
    let gc = gpt2::Gpt2::load(Cpu, gcfg, ck)?;
    let (mut cb, mut cc) = (gb.new_cache(16)?, gc.new_cache(16)?);
    push(
        "gpt2 logits",
        "11 tokens".into(),
        &gb.forward(&ids, &mut cb, true)?,
        &gc.forward(&ids, &mut cc, true)?,
    );

    let vcfg = vit::VitConfig {
        image_size: 12,
        patch: 4,
        channels: 3,
        hidden: 24,
        layers: 2,
        heads: 4,
        mlp: 40,
        classes: 9,
        eps: 1e-6,
    };
    let (vcfg, mut ck) = vit::random(&vcfg, seed, None)?;
    swap(&mut ck, "blocks.0.mlp.fc1", blast(40, 24, 4, 2, 6))?;
    let img = rng.normal_vec(3 * 12 * 12, 1.0);
    let vb = vit::Vit::load(b.clone(), vcfg.clone(), ck.clone())?;
    let vc = vit::Vit::load(Cpu, vcfg, ck)?;
    push(
        "vit logits",
        "3x12x12 image".into(),
        &vb.forward(&img)?,
        &vc.forward(&img)?,
    );

    let dcfg = dit::DitConfig {
        input_size: 8,
        patch: 2,
        in_channels: 3,
        hidden: 24,
        layers: 2,
        heads: 4,
        mlp: 40,
        classes: 5,
        learn_sigma: true,
    };
    let (dcfg, mut ck) = dit::random(&dcfg, seed, None, false)?;
    swap(&mut ck, "blocks.1.attn.qkv", blast(72, 24, 3, 2, 4))?;
    let lat = rng.normal_vec(3 * 64, 1.0);
    let db = dit::Dit::load(b.clone(), dcfg.clone(), ck.clone())?;
    let dc = dit::Dit::load(Cpu, dcfg, ck)?;
    push(
        "dit output",
        "3x8x8 latent, t=250, y=3".into(),
        &db.forward(&lat, 250.0, 3)?,
        &dc.forward(&lat, 250.0, 3)?,
    );
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The CPU backend with one op broken on purpose: RoPE turns the wrong way. (An off-by-one
    /// position would not do: it shifts q and k alike, and attention only sees differences.)
    /// `bad_ties`: greedy sampling also broken, taking the last of tied maxima instead of the
    /// first (a plausible GPU reduction bug the sampling check must catch).
    #[derive(Clone, Copy)]
    struct BackwardsRope {
        bad_ties: bool,
    }

    const BROKEN: BackwardsRope = BackwardsRope { bad_ties: false };

    impl Backend for BackwardsRope {
        type Tensor = CpuTensor;
        type Linear = Linear;
        type KvCache = <Cpu as Backend>::KvCache;
        fn name(&self) -> String {
            "broken".into()
        }
        fn upload(&self, d: &[f32], r: usize, c: usize) -> Result<CpuTensor> {
            Cpu.upload(d, r, c)
        }
        fn download(&self, x: &CpuTensor) -> Result<Vec<f32>> {
            Cpu.download(x)
        }
        fn dims(&self, x: &CpuTensor) -> (usize, usize) {
            Cpu.dims(x)
        }
        fn slice_rows(&self, x: &CpuTensor, a: usize, e: usize) -> Result<CpuTensor> {
            Cpu.slice_rows(x, a, e)
        }
        fn slice_cols(&self, x: &CpuTensor, a: usize, e: usize) -> Result<CpuTensor> {
            Cpu.slice_cols(x, a, e)
        }
        fn load_linear(&self, l: Linear) -> Result<Linear> {
            Cpu.load_linear(l)
        }
        fn linear_dims(&self, l: &Linear) -> (usize, usize) {
            Cpu.linear_dims(l)
        }
        fn linear(&self, l: &Linear, x: &CpuTensor) -> Result<CpuTensor> {
            Cpu.linear(l, x)
        }
        fn embedding(&self, t: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
            Cpu.embedding(t, ids)
        }
        fn rms_norm(&self, x: &CpuTensor, w: &CpuTensor, eps: f32) -> Result<CpuTensor> {
            Cpu.rms_norm(x, w, eps)
        }
        fn layer_norm(
            &self,
            x: &CpuTensor,
            w: &CpuTensor,
            b: &CpuTensor,
            eps: f32,
        ) -> Result<CpuTensor> {
            Cpu.layer_norm(x, w, b, eps)
        }
        fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
            Cpu.add_assign(x, y)
        }
        fn add_row(&self, x: &mut CpuTensor, r: &CpuTensor) -> Result<()> {
            Cpu.add_row(x, r)
        }
        fn modulate(&self, x: &mut CpuTensor, s: &CpuTensor, k: &CpuTensor) -> Result<()> {
            Cpu.modulate(x, s, k)
        }
        fn add_gated(&self, x: &mut CpuTensor, y: &CpuTensor, g: &CpuTensor) -> Result<()> {
            Cpu.add_gated(x, y, g)
        }
        fn silu_mul(&self, g: &CpuTensor, u: &CpuTensor) -> Result<CpuTensor> {
            Cpu.silu_mul(g, u)
        }
        fn gelu(&self, x: &mut CpuTensor, t: bool) -> Result<()> {
            Cpu.gelu(x, t)
        }
        fn silu(&self, x: &mut CpuTensor) -> Result<()> {
            Cpu.silu(x)
        }
        fn rope(&self, x: &mut CpuTensor, heads: usize, pos0: usize, f: &[f32]) -> Result<()> {
            let backwards: Vec<f32> = f.iter().map(|v| -v).collect();
            Cpu.rope(x, heads, pos0, &backwards)
        }
        fn new_kv_cache(&self, kv: usize, d: usize, cap: usize) -> Result<Self::KvCache> {
            Cpu.new_kv_cache(kv, d, cap)
        }
        fn kv_len(&self, c: &Self::KvCache) -> usize {
            Cpu.kv_len(c)
        }
        fn kv_clear(&self, c: &mut Self::KvCache) {
            Cpu.kv_clear(c)
        }
        fn attention_cached(
            &self,
            q: &CpuTensor,
            k: &CpuTensor,
            v: &CpuTensor,
            c: &mut Self::KvCache,
            s: AttnSpec,
        ) -> Result<CpuTensor> {
            Cpu.attention_cached(q, k, v, c, s)
        }
        fn attention(
            &self,
            q: &CpuTensor,
            k: &CpuTensor,
            v: &CpuTensor,
            s: AttnSpec,
        ) -> Result<CpuTensor> {
            Cpu.attention(q, k, v, s)
        }
        fn sample_last(&self, l: &CpuTensor, t: f32, p: f32, u: f64) -> Result<u32> {
            let (rows, cols) = (l.rows, l.cols);
            let row = &l.data[(rows - 1) * cols..];
            if self.bad_ties && t == 0.0 {
                let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                return Ok(row.iter().rposition(|&v| v == max).unwrap_or(0) as u32);
            }
            crate::lm::choose(row, t, p, u)
        }
    }

    #[test]
    fn cpu_passes_its_own_suite() {
        let ops = check_ops(&Cpu, 1, 1e-6).unwrap();
        assert!(ops.len() > 40, "{}", ops.len());
        assert!(ops.iter().all(|c| c.ok), "{ops:?}");
        let models = check_models(&Cpu, 2, 1e-6).unwrap();
        assert_eq!(models.len(), 10);
        assert!(models.iter().all(|c| c.ok), "{models:?}");
    }

    #[test]
    fn a_broken_op_is_caught_and_named() {
        let ops = check_ops(&BROKEN, 1, 1e-3).unwrap();
        let failed: Vec<&Check> = ops.iter().filter(|c| !c.ok).collect();
        assert!(!failed.is_empty());
        assert!(failed.iter().all(|c| c.op == "rope"), "{failed:?}");
        // In the models only Llama uses RoPE; GPT-2, ViT and DiT still pass.
        let models = check_models(&BROKEN, 2, 1e-3).unwrap();
        for c in &models {
            assert_eq!(c.ok, !c.op.starts_with("llama"), "{c:?}");
        }
        assert_eq!(rel_err(&[f32::NAN], &[1.0]), f64::INFINITY);
    }

    #[test]
    fn sampling_check_passes_the_reference_and_catches_a_tie_bug() {
        let good = check_sampling(&Cpu, 3).unwrap();
        assert_eq!(good.len(), 9);
        assert!(good.iter().all(|c| c.ok), "{good:?}");
        // Every row with several maxima fails: the tie-heavy ones and the large vocabularies
        // (their maximum is copied to the middle on purpose); the 7 distinct random logits and
        // the 1-token vocabulary have one maximum and pass. The broken greedy path also skips
        // the NaN check, which is caught too.
        let bad = check_sampling(&BackwardsRope { bad_ties: true }, 3).unwrap();
        let verdict: Vec<(&str, bool)> = bad.iter().map(|c| (c.shape.as_str(), c.ok)).collect();
        for (shape, ok) in &verdict {
            let single_max = shape.starts_with("vocab 7, 77") || shape.starts_with("vocab 1,");
            assert_eq!(*ok, single_max, "{verdict:?}");
        }
    }
}
