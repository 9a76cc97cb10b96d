//! Where calibration runs (`blr compress --calib-device`): the model backend of the forward
//! passes (the recording pass of `calibrate.rs`, the dense/compressed twin of `sequential.rs`)
//! and where the Grams `X X^T` and cross statistics `X X'^T` of every layer input are summed.
//!
//! - CPU: the f32 reference backend, statistics summed on the host in f64
//!   ([`HostGrams`]: `blr_compress::{Gram, CrossGram}::accumulate`). The reference, and what
//!   CI runs.
//! - CUDA: the bf16 CUDA backend (fp32 accumulation), statistics summed on the device
//!   ([`CudaGrams`]: cuBLAS bf16 GEMMs into an f64 sum, `blr_cuda::gram`) and downloaded once per
//!   layer. Activations in bf16 carry ~0.4% relative rounding, far below the ~10% output errors
//!   of the compressed layers they calibrate; the CPU-vs-GPU comparison on SmolLM2 is in
//!   docs/compression.md.
//!
//! Both passes are generic over `(B: Backend, G: GramOps<B>)`; [`HostGrams`] works over any
//! backend (downloading every input), which the tests use to separate the two GPU pieces.

use anyhow::{bail, Context, Result};
use blr_compress::{CrossGram, Gram};
use blr_cuda::gram::{GramEngine, GramSum};
use blr_models::backend::Backend;
use blr_models::cuda::Cuda;

/// Sums `sum_t a_t b_t^T` over the rows of backend tensors: a Gram (`b = a`) or a cross
/// statistic (`a` dense rows, `b` compressed rows).
pub trait GramOps<B: Backend> {
    /// One statistic being accumulated.
    type Acc;
    /// An empty statistic of `n` features.
    fn start(&self, backend: &B, n: usize) -> Result<Self::Acc>;
    /// Adds the rows of `a` (and `b`: `None` for a Gram of `a`).
    fn add(
        &self,
        backend: &B,
        acc: &mut Self::Acc,
        a: &B::Tensor,
        b: Option<&B::Tensor>,
    ) -> Result<()>;
    /// The accumulated Gram (`what` names it in errors).
    fn gram(&self, backend: &B, acc: Self::Acc, what: &str) -> Result<Gram>;
    /// The accumulated cross statistic.
    fn cross(&self, backend: &B, acc: Self::Acc, what: &str) -> Result<CrossGram>;
}

/// Host accumulation (the reference): downloads the rows, sums in f64 on the CPU.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostGrams;

/// A [`HostGrams`] statistic: a Gram or a cross statistic, made on the first rows added.
#[derive(Debug)]
pub struct HostAcc {
    n: usize,
    gram: Option<Gram>,
    cross: Option<CrossGram>,
}

impl<B: Backend> GramOps<B> for HostGrams {
    type Acc = HostAcc;
    fn start(&self, _: &B, n: usize) -> Result<HostAcc> {
        Ok(HostAcc {
            n,
            gram: None,
            cross: None,
        })
    }
    fn add(
        &self,
        backend: &B,
        acc: &mut HostAcc,
        a: &B::Tensor,
        b: Option<&B::Tensor>,
    ) -> Result<()> {
        let rows = backend.dims(a).0;
        let ha = backend.download(a)?;
        match b {
            None => {
                if acc.cross.is_some() {
                    bail!("calibration statistic: Gram rows added to a cross statistic");
                }
                acc.gram
                    .get_or_insert_with(|| Gram::new(acc.n))
                    .accumulate(&ha, rows)?;
            }
            Some(b) => {
                if acc.gram.is_some() {
                    bail!("calibration statistic: cross rows added to a Gram");
                }
                if backend.dims(b).0 != rows {
                    bail!(
                        "calibration statistic: dense and compressed streams have {} and {} rows",
                        rows,
                        backend.dims(b).0
                    );
                }
                let hb = backend.download(b)?;
                acc.cross
                    .get_or_insert_with(|| CrossGram::new(acc.n))
                    .accumulate(&ha, &hb, rows)?;
            }
        }
        Ok(())
    }
    fn gram(&self, _: &B, acc: HostAcc, _what: &str) -> Result<Gram> {
        Ok(acc.gram.unwrap_or_else(|| Gram::new(acc.n)))
    }
    fn cross(&self, _: &B, acc: HostAcc, _what: &str) -> Result<CrossGram> {
        Ok(acc.cross.unwrap_or_else(|| CrossGram::new(acc.n)))
    }
}

/// Device accumulation on the CUDA backend's stream (`blr_cuda::gram`).
#[derive(Debug)]
pub struct CudaGrams {
    engine: GramEngine,
}

impl CudaGrams {
    /// The cuBLAS handle and kernel on `cuda`'s device and stream.
    pub fn new(cuda: &Cuda) -> Result<Self> {
        Ok(CudaGrams {
            engine: GramEngine::new(cuda.gpu()).context("setting up GPU Gram accumulation")?,
        })
    }
}

impl GramOps<Cuda> for CudaGrams {
    type Acc = GramSum;
    fn start(&self, cuda: &Cuda, n: usize) -> Result<GramSum> {
        Ok(self.engine.start(cuda.gpu(), n)?)
    }
    fn add(
        &self,
        cuda: &Cuda,
        acc: &mut GramSum,
        a: &<Cuda as Backend>::Tensor,
        b: Option<&<Cuda as Backend>::Tensor>,
    ) -> Result<()> {
        let (rows, cols) = cuda.dims(a);
        if cols != acc.dim() {
            bail!(
                "calibration statistic of {} features given rows of {cols}",
                acc.dim()
            );
        }
        let b = b.unwrap_or(a);
        if cuda.dims(b) != (rows, cols) {
            bail!(
                "calibration statistic: streams are {:?} and {:?}",
                (rows, cols),
                cuda.dims(b)
            );
        }
        self.engine
            .add(cuda.gpu(), acc, a.buffer(), b.buffer(), rows)
            .context("accumulating a calibration Gram on the GPU")
    }
    fn gram(&self, cuda: &Cuda, acc: GramSum, what: &str) -> Result<Gram> {
        let sum = self.engine.finish(cuda.gpu(), &acc)?;
        Ok(Gram::from_sum(acc.dim(), &sum, acc.tokens(), what)?)
    }
    fn cross(&self, cuda: &Cuda, acc: GramSum, what: &str) -> Result<CrossGram> {
        let sum = self.engine.finish(cuda.gpu(), &acc)?;
        Ok(CrossGram::from_sum(acc.dim(), &sum, acc.tokens(), what)?)
    }
}

/// The device calibration runs on.
pub enum CalibDevice {
    Cpu,
    Cuda(Cuda),
}

impl CalibDevice {
    /// `auto`: the GPU when the CUDA backend opens, else the CPU (the reason kept in the
    /// label); `cpu`; `cuda`: an error when no GPU is usable. Returns the device and a label
    /// for the log.
    pub fn pick(flag: &str) -> Result<(Self, String)> {
        let on_gpu = |cuda: Cuda| {
            let label = format!("cuda ({})", cuda.gpu().info().name);
            (CalibDevice::Cuda(cuda), label)
        };
        match flag {
            "cpu" => Ok((CalibDevice::Cpu, "cpu".into())),
            "cuda" => Ok(on_gpu(Cuda::open_default().context(
                "--calib-device cuda: the CUDA backend did not open (use --calib-device cpu or auto)",
            )?)),
            "auto" => Ok(match Cuda::open_default() {
                Ok(cuda) => on_gpu(cuda),
                Err(e) => (CalibDevice::Cpu, format!("cpu (no usable GPU: {e})")),
            }),
            other => bail!("--calib-device must be auto, cpu or cuda, got '{other}'"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::calibrate::{fingerprint, Recording};
    use crate::compress::sequential::{planned_layers, HookInput, Twin};
    use blr_models::cpu::Cpu;
    use blr_models::llama::{self, Llama, LlamaConfig, RopeScaling};
    use blr_models::lm::{BackendLm, CausalLm};
    use std::sync::Mutex;

    fn cuda_or_skip(test: &str) -> Option<Cuda> {
        match Cuda::open_default() {
            Ok(c) => Some(c),
            Err(e) => {
                eprintln!("SKIP {test}: no usable GPU here ({e})");
                None
            }
        }
    }

    /// Odd sizes everywhere (hidden 44, intermediate 75, head_dim 4 with 11 heads), so no
    /// dimension is a multiple of a tile.
    fn model() -> (LlamaConfig, blr_core::checkpoint::Checkpoint) {
        let cfg = LlamaConfig {
            vocab_size: 97,
            hidden: 44,
            intermediate: 75,
            layers: 2,
            heads: 11,
            kv_heads: 1,
            head_dim: 4,
            rope_theta: 1e4,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            tie_embeddings: true,
            max_positions: 64,
        };
        llama::random(&cfg, 5, None).unwrap()
    }

    fn ids(t: usize) -> Vec<u32> {
        (0..t as u32).map(|i| (i * 37 + 11) % 97).collect()
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    fn flat_gram(g: &Gram) -> Vec<f64> {
        let n = g.dim();
        (0..n * n).map(|k| g.get(k / n, k % n)).collect()
    }

    fn flat_cross(c: &CrossGram) -> Vec<f64> {
        let n = c.dim();
        (0..n * n).map(|k| c.get(k / n, k % n)).collect()
    }

    /// The recording pass's Grams: CPU backend + host sums (reference) against the CUDA backend
    /// with device sums and with host sums, 3 windows of 23 tokens (the last one short).
    #[test]
    fn recording_grams_cpu_vs_gpu() {
        let Some(cuda) = cuda_or_skip("recording_grams_cpu_vs_gpu") else {
            return;
        };
        let (cfg, ck) = model();
        let layers = planned_layers(&ck);
        let fps: Vec<(u64, usize)> = layers
            .iter()
            .map(|(_, l)| (fingerprint(l), l.shape().n))
            .collect();
        let text = ids(60);
        fn run<B: Backend, G: GramOps<B>>(
            rec: Recording<B, G>,
            cfg: &LlamaConfig,
            ck: &blr_core::checkpoint::Checkpoint,
            text: &[u32],
        ) -> Vec<Gram> {
            let model = Llama::load(rec, cfg.clone(), ck.clone()).unwrap();
            let mut cache = model.new_cache(23).unwrap();
            for w in text.chunks(23) {
                model.clear_cache(&mut cache);
                model.forward(w, &mut cache, false).unwrap();
            }
            model.backend().take_grams().unwrap()
        }
        let want = run(Recording::new(Cpu, HostGrams, &fps), &cfg, &ck, &text);
        let gpu_host = run(
            Recording::new(cuda.clone(), HostGrams, &fps),
            &cfg,
            &ck,
            &text,
        );
        let grams = CudaGrams::new(&cuda).unwrap();
        let gpu_dev = run(Recording::new(cuda.clone(), grams, &fps), &cfg, &ck, &text);
        for (i, (name, _)) in layers.iter().enumerate() {
            let w = flat_gram(&want[i]);
            let (eh, ed) = (
                rel(&flat_gram(&gpu_host[i]), &w),
                rel(&flat_gram(&gpu_dev[i]), &w),
            );
            let same = rel(&flat_gram(&gpu_dev[i]), &flat_gram(&gpu_host[i]));
            eprintln!("{name}: gpu-forward host-sum {eh:.2e}, gpu-forward gpu-sum {ed:.2e}, sums {same:.2e}");
            assert_eq!(gpu_dev[i].tokens(), 60);
            // bf16 activations: ~1e-2 relative at most; the two sums of the same bf16 rows
            // agree to fp32 rounding.
            assert!(eh < 3e-2 && ed < 3e-2, "{name}: {eh:.2e} {ed:.2e}");
            assert!(same < 1e-5, "{name}: {same:.2e}");
        }
    }

    /// The twin's statistics and corrected targets, CPU vs CUDA: every layer is "compressed" by
    /// a fixed perturbation (so the two streams differ from the second layer on), 13 + 13 + 9
    /// tokens.
    #[test]
    fn twin_statistics_cpu_vs_gpu() {
        let Some(cuda) = cuda_or_skip("twin_statistics_cpu_vs_gpu") else {
            return;
        };
        let (cfg, ck) = model();
        let layers = planned_layers(&ck);
        let fps: Vec<u64> = layers.iter().map(|(_, l)| fingerprint(l)).collect();
        let text = ids(35);
        type Seen = Vec<(Vec<f64>, Vec<f64>, Vec<f32>, u64)>;
        fn run<B: Backend, G: GramOps<B>>(
            backend: B,
            ops: G,
            fps: &[u64],
            layers: &[(String, blr_core::Linear)],
            cfg: &LlamaConfig,
            ck: &blr_core::checkpoint::Checkpoint,
            text: &[u32],
        ) -> Seen {
            let seen = Mutex::new(vec![(vec![], vec![], vec![], 0); layers.len()]);
            let hook = |x: HookInput<'_>| -> Result<blr_core::Linear> {
                let g = x.input.gram()?;
                let c = x.input.cross()?;
                let blr_core::Linear::Dense(d) = &layers[x.slot].1 else {
                    bail!("dense layers only")
                };
                let s = d.shape();
                let fit = blr_compress::corrected_target("t", &d.weight, s.m, s.n, &c, &g, 0.1)?;
                seen.lock().unwrap()[x.slot] =
                    (flat_gram(&g), flat_cross(&c), fit.clone(), g.tokens());
                // "Compress": scale by 0.9 (a 10% output error, the size of a real one).
                let w: Vec<f32> = d.weight.iter().map(|v| 0.9 * v).collect();
                Ok(blr_core::Linear::Dense(blr_core::Dense::new(s.m, s.n, w)?))
            };
            let twin = Twin::new(backend, ops, 13, fps, &hook);
            let model = Llama::load(twin, cfg.clone(), ck.clone()).unwrap();
            let mut cache = model.new_cache(13).unwrap();
            model.forward(text, &mut cache, false).unwrap();
            assert!(model.backend().missing().is_empty());
            drop(model);
            seen.into_inner().unwrap()
        }
        let want = run(Cpu, HostGrams, &fps, &layers, &cfg, &ck, &text);
        let grams = CudaGrams::new(&cuda).unwrap();
        let got = run(cuda.clone(), grams, &fps, &layers, &cfg, &ck, &text);
        for (i, (name, _)) in layers.iter().enumerate() {
            let (w, g) = (&want[i], &got[i]);
            assert_eq!(g.3, 35);
            let eg = rel(&g.0, &w.0);
            let ec = rel(&g.1, &w.1);
            let wf: Vec<f64> = w.2.iter().map(|&v| v as f64).collect();
            let gf: Vec<f64> = g.2.iter().map(|&v| v as f64).collect();
            let et = rel(&gf, &wf);
            eprintln!("{name}: gram {eg:.2e} cross {ec:.2e} corrected target {et:.2e}");
            assert!(
                eg < 3e-2 && ec < 3e-2 && et < 3e-2,
                "{name}: {eg:.2e} {ec:.2e} {et:.2e}"
            );
        }
    }

    /// The real model (SmolLM2-135M, when cached, on a GPU machine): Grams of the recording
    /// pass, and the twin's Grams, cross statistics and corrected targets (ridge 0.1), CPU
    /// reference vs the CUDA path, over `BLR_GRAM_TOKENS` (default 1024) tokens of
    /// `BLR_CALIB_TEXT` (default data/wikitext-2/valid.txt). The "compressed" layers are the
    /// dense ones with 20% fixed multiplicative noise, so both devices see the same model.
    /// Prints per-layer-type worst relative differences; the target difference is also given
    /// relative to the correction itself (`||W~gpu - W~cpu|| / ||W~cpu - W||`).
    #[test]
    fn smollm2_statistics_cpu_vs_gpu() {
        let test = "smollm2_statistics_cpu_vs_gpu";
        let Some(cuda) = cuda_or_skip(test) else {
            return;
        };
        let Ok(loaded) = blr_models::loader::load_llama("smollm2") else {
            eprintln!("SKIP {test}: SmolLM2 is not cached (scripts/fetch-smollm2.sh)");
            return;
        };
        let text_path = std::env::var("BLR_CALIB_TEXT").unwrap_or_else(|_| {
            [
                "data/wikitext-2/valid.txt",
                "../../data/wikitext-2/valid.txt",
            ]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("data/wikitext-2/valid.txt")
            .to_string()
        });
        let Ok(text) = std::fs::read_to_string(&text_path) else {
            eprintln!("SKIP {test}: no calibration text at {text_path}");
            return;
        };
        let tokens: usize = std::env::var("BLR_GRAM_TOKENS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(1024);
        let tok = loaded.tokenizer.as_ref().unwrap();
        let mut ids = crate::cmd::compress::encode_prefix(tok, &text, tokens, true).unwrap();
        ids.truncate(tokens);
        let dense: Vec<(String, blr_core::Dense)> = loaded
            .cfg
            .linear_shapes()
            .into_iter()
            .filter(|(name, _, _)| name.contains("layers."))
            .map(|(name, m, n)| {
                let w = match loaded.weights.layers.iter().find(|(l, _)| *l == name) {
                    Some((_, blr_core::Linear::Dense(d))) => d.weight.clone(),
                    _ => loaded.weights.tensors[&format!("{name}.weight")]
                        .data
                        .clone(),
                };
                (name, blr_core::Dense::new(m, n, w).unwrap())
            })
            .collect();
        let window = 512;

        // Recording pass.
        let fps: Vec<(u64, usize)> = dense
            .iter()
            .map(|(_, d)| {
                (
                    fingerprint(&blr_core::Linear::Dense(d.clone())),
                    d.shape().n,
                )
            })
            .collect();
        fn record<B: Backend, G: GramOps<B>>(
            rec: Recording<B, G>,
            loaded: &blr_models::loader::LoadedLlama,
            ids: &[u32],
            window: usize,
        ) -> (Vec<Gram>, f64) {
            let t0 = std::time::Instant::now();
            let model = Llama::load(rec, loaded.cfg.clone(), loaded.weights.clone()).unwrap();
            let mut cache = model.new_cache(window).unwrap();
            for w in ids.chunks(window) {
                model.clear_cache(&mut cache);
                model.forward(w, &mut cache, false).unwrap();
            }
            let g = model.backend().take_grams().unwrap();
            (g, t0.elapsed().as_secs_f64())
        }
        let (want, t_cpu) = record(Recording::new(Cpu, HostGrams, &fps), &loaded, &ids, window);
        let grams = CudaGrams::new(&cuda).unwrap();
        let (got, t_gpu) = record(
            Recording::new(cuda.clone(), grams, &fps),
            &loaded,
            &ids,
            window,
        );
        let kind = |name: &str| name.rsplit('.').next().unwrap_or(name).to_string();
        let mut worst: std::collections::BTreeMap<String, f64> = Default::default();
        for (i, (name, _)) in dense.iter().enumerate() {
            let e = rel(&flat_gram(&got[i]), &flat_gram(&want[i]));
            let w = worst.entry(kind(name)).or_insert(0.0);
            *w = w.max(e);
        }
        eprintln!(
            "recording pass, {} tokens: cpu {t_cpu:.1}s, gpu {t_gpu:.1}s; worst Gram rel diff per layer type: {worst:?}",
            ids.len()
        );
        assert!(worst.values().all(|&e| e < 3e-2), "{worst:?}");

        // Twin pass with fixed "compressed" layers.
        let twin_fps: Vec<u64> = fps.iter().map(|(f, _)| *f).collect();
        let perturbed: Vec<blr_core::Linear> = dense
            .iter()
            .enumerate()
            .map(|(i, (_, d))| {
                let noise = blr_core::rng::Rng::new(100 + i as u64).normal_vec(d.weight.len(), 0.2);
                let w = d
                    .weight
                    .iter()
                    .zip(&noise)
                    .map(|(v, e)| v * (1.0 + e))
                    .collect();
                blr_core::Linear::Dense(blr_core::Dense::new(d.shape().m, d.shape().n, w).unwrap())
            })
            .collect();
        type Seen = Vec<(Vec<f64>, Vec<f64>, Vec<f32>)>;
        #[allow(clippy::too_many_arguments)]
        fn twin<B: Backend, G: GramOps<B>>(
            backend: B,
            ops: G,
            fps: &[u64],
            dense: &[(String, blr_core::Dense)],
            perturbed: &[blr_core::Linear],
            loaded: &blr_models::loader::LoadedLlama,
            ids: &[u32],
            window: usize,
        ) -> (Seen, f64) {
            let t0 = std::time::Instant::now();
            let seen = Mutex::new(vec![(vec![], vec![], vec![]); dense.len()]);
            let hook = |x: HookInput<'_>| -> Result<blr_core::Linear> {
                let g = x.input.gram()?;
                let c = x.input.cross()?;
                let d = &dense[x.slot].1;
                let s = d.shape();
                let fit = blr_compress::corrected_target("t", &d.weight, s.m, s.n, &c, &g, 0.1)?;
                seen.lock().unwrap()[x.slot] = (flat_gram(&g), flat_cross(&c), fit);
                Ok(perturbed[x.slot].clone())
            };
            let model = Llama::load(
                Twin::new(backend, ops, window, fps, &hook),
                loaded.cfg.clone(),
                loaded.weights.clone(),
            )
            .unwrap();
            let mut cache = model.new_cache(window).unwrap();
            model.forward(ids, &mut cache, false).unwrap();
            assert!(model.backend().missing().is_empty());
            drop(model);
            (seen.into_inner().unwrap(), t0.elapsed().as_secs_f64())
        }
        let (want, t_cpu) = twin(
            Cpu, HostGrams, &twin_fps, &dense, &perturbed, &loaded, &ids, window,
        );
        let grams = CudaGrams::new(&cuda).unwrap();
        let (got, t_gpu) = twin(
            cuda.clone(),
            grams,
            &twin_fps,
            &dense,
            &perturbed,
            &loaded,
            &ids,
            window,
        );
        // Per layer type, every layer's [gram, cross, target, target diff / correction].
        let mut all: std::collections::BTreeMap<String, Vec<[f64; 4]>> = Default::default();
        for (i, (name, d)) in dense.iter().enumerate() {
            let (w, g) = (&want[i], &got[i]);
            let wf: Vec<f64> = w.2.iter().map(|&v| v as f64).collect();
            let gf: Vec<f64> = g.2.iter().map(|&v| v as f64).collect();
            let corr: Vec<f64> = wf
                .iter()
                .zip(&d.weight)
                .map(|(a, b)| a - *b as f64)
                .collect();
            let diff: Vec<f64> = gf.iter().zip(&wf).map(|(a, b)| a - b).collect();
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            all.entry(kind(name)).or_default().push([
                rel(&g.0, &w.0),
                rel(&g.1, &w.1),
                rel(&gf, &wf),
                norm(&diff) / norm(&corr).max(f64::MIN_POSITIVE),
            ]);
            eprintln!(
                "  {name:36} gram {:.2e} cross {:.2e} target {:.2e} diff/correction {:.2e}",
                rel(&g.0, &w.0),
                rel(&g.1, &w.1),
                rel(&gf, &wf),
                norm(&diff) / norm(&corr).max(f64::MIN_POSITIVE)
            );
        }
        eprintln!(
            "twin pass, {} tokens: cpu {t_cpu:.1}s, gpu {t_gpu:.1}s; per layer type, median / worst of [gram, cross, target, target diff / correction]:",
            ids.len()
        );
        let stat = |v: &[[f64; 4]], k: usize| {
            let mut x: Vec<f64> = v.iter().map(|e| e[k]).collect();
            x.sort_by(f64::total_cmp);
            (x[x.len() / 2], x[x.len() - 1])
        };
        for (k, v) in &all {
            let s: Vec<(f64, f64)> = (0..4).map(|j| stat(v, j)).collect();
            eprintln!(
                "  {k:10} {:.2e}/{:.2e} {:.2e}/{:.2e} {:.2e}/{:.2e} {:.2e}/{:.2e}",
                s[0].0, s[0].1, s[1].0, s[1].1, s[2].0, s[2].1, s[3].0, s[3].1
            );
            // The compressed stream is a perturbed model run 30 blocks deep: bf16 rounding
            // compounds there (up to 9% on the worst down_proj Gram, 2026-11-25 H100) while the
            // dense stream above stays within 2%. Typical layers must agree to bf16 level.
            for j in 0..3 {
                assert!(s[j].0 < 3e-2 && s[j].1 < 0.15, "{k}: statistic {j}: {s:?}");
            }
        }
    }

    /// The host accumulator refuses mixing the two kinds of statistic.
    #[test]
    fn host_statistic_kinds_do_not_mix() {
        let x = Cpu.upload(&[1.0, 2.0, 3.0, 4.0], 2, 2).unwrap();
        let mut acc = GramOps::<Cpu>::start(&HostGrams, &Cpu, 2).unwrap();
        HostGrams.add(&Cpu, &mut acc, &x, None).unwrap();
        assert!(HostGrams.add(&Cpu, &mut acc, &x, Some(&x)).is_err());
        let g = GramOps::<Cpu>::gram(&HostGrams, &Cpu, acc, "t").unwrap();
        assert_eq!(g.get(0, 1), 1.0 * 2.0 + 3.0 * 4.0);
        assert!(CalibDevice::pick("tpu").is_err());
    }
}
