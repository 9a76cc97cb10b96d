//! Sequential calibration: compress the layers in the order the model runs them, each one
//! calibrated on the activations of the model compressed so far.
//!
//! Independent calibration (`calibrate.rs`) gives every layer the dense model's activations,
//! so layer `l` is fitted to inputs it will never see: the errors of layers `< l` shift them.
//! Here [`Twin`] runs two copies of the model in lockstep over one window of calibration
//! tokens: the dense reference stream and the compressed stream. When a planned layer is
//! reached for the first time, the hook receives both streams' inputs, factorizes the layer
//! (from the compressed stream's Gram `G'`, and optionally the correction target of
//! `blr_compress::corrected_target`, which also needs the dense stream), and from then on the
//! compressed stream goes through the compressed layer. One forward pass compresses the whole
//! model; the model code is untouched.
//!
//! Because a layer is factorized the first time it runs, every calibration token must pass
//! through it in that one call: the twin tensors hold all calibration windows side by side
//! (`--calib-ctx` tokens each, positions restarting per window, each with its own KV cache),
//! and one forward pass over the whole calibration text runs them together.

use crate::compress::calibrate::fingerprint;
use crate::compress::device::GramOps;
use blr_compress::{CrossGram, Gram};
use blr_models::backend::{AttnSpec, Backend};
use blr_models::{Error, Result};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// What the hook is given for planned layer `slot`: access to the layer's input in the dense
/// and in the compressed stream, over `tokens` rows.
pub struct HookInput<'x> {
    pub slot: usize,
    pub tokens: usize,
    pub input: &'x dyn LayerInput,
}

/// A planned layer's input as the hook sees it: statistics computed where the streams live
/// (on the GPU for the CUDA backend) and shared by layers reading the same input, or rows
/// downloaded (row-major `(tokens, n)`).
pub trait LayerInput {
    /// `G' = X' X'^T` of the compressed stream.
    fn gram(&self) -> anyhow::Result<Arc<Gram>>;
    /// `C = X X'^T` (dense rows first).
    fn cross(&self) -> anyhow::Result<Arc<CrossGram>>;
    /// The dense stream's rows.
    fn dense_rows(&self) -> anyhow::Result<Vec<f32>>;
    /// The compressed stream's rows (the tests compare them with the statistics).
    #[cfg_attr(not(test), allow(dead_code))]
    fn compressed_rows(&self) -> anyhow::Result<Vec<f32>>;
}

/// Factorizes one planned layer; see the module docs.
pub type Hook<'a> = dyn Fn(HookInput<'_>) -> anyhow::Result<blr_core::Linear> + 'a;

/// A pair of activations: the dense model's and the compressed model's.
pub struct Pair<T> {
    dense: T,
    compressed: T,
}

/// A twin tensor: one [`Pair`] per calibration window (rows of window `w` are tokens
/// `w * window ..`), or a single shared pair for parameters (norm weights, the embedding
/// table), which every window uses.
pub struct Streams<T> {
    parts: Vec<Pair<T>>,
    shared: bool,
    /// Identifies these values: new for every tensor and after every in-place op, so layers
    /// reading the same input (q/k/v, gate/up) share its statistics (`Twin::stats`).
    id: u64,
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

impl<T> Streams<T> {
    fn new(parts: Vec<Pair<T>>, shared: bool) -> Self {
        Streams {
            parts,
            shared,
            id: next_id(),
        }
    }
}

/// A layer of the twin model: the dense layer, and for planned layers their slot and, once
/// factorized, the compressed layer.
pub struct TwinLinear<L> {
    dense: L,
    slot: Option<usize>,
    compressed: Mutex<Option<L>>,
}

/// Per-window KV caches, created as windows first attend.
pub struct TwinCache<C> {
    parts: Vec<Pair<C>>,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
}

/// The statistics of one input (by [`Streams`] id), kept while layers read it.
#[derive(Default)]
struct StatsCache {
    id: u64,
    gram: Option<Arc<Gram>>,
    cross: Option<Arc<CrossGram>>,
}

/// Runs every op on both streams of every window; see the module docs.
pub struct Twin<'a, B: Backend, G: GramOps<B>> {
    inner: B,
    ops: G,
    stats: Mutex<StatsCache>,
    window: usize,
    slots: HashMap<u64, usize>,
    hook: &'a Hook<'a>,
    /// The hook's error (the trait's ops carry only the models' error type).
    failure: Mutex<Option<anyhow::Error>>,
    done: Mutex<Vec<bool>>,
}

impl<'a, B: Backend, G: GramOps<B>> Twin<'a, B, G> {
    /// `layers`: fingerprints of the planned layers' dense weights, in slot order. A forward
    /// pass over `ids` runs them as independent windows of `window` tokens (positions restart
    /// at each window, as in the sliding-window evaluation). `ops` sums the statistics the
    /// hook asks for.
    pub fn new(inner: B, ops: G, window: usize, layers: &[u64], hook: &'a Hook<'a>) -> Self {
        Twin {
            inner,
            ops,
            stats: Mutex::new(StatsCache::default()),
            window: window.max(1),
            slots: layers.iter().enumerate().map(|(i, f)| (*f, i)).collect(),
            hook,
            failure: Mutex::new(None),
            done: Mutex::new(vec![false; layers.len()]),
        }
    }

    /// The hook's error, if it failed (taken out).
    pub fn take_failure(&self) -> Option<anyhow::Error> {
        self.failure.lock().ok().and_then(|mut f| f.take())
    }

    /// Slots the forward pass never reached (their layers were not compressed).
    pub fn missing(&self) -> Vec<usize> {
        self.done.lock().map_or_else(
            |_| Vec::new(),
            |d| (0..d.len()).filter(|&i| !d[i]).collect(),
        )
    }

    /// Applies `f` to both streams of every window of `x`.
    fn map(
        &self,
        x: &Streams<B::Tensor>,
        f: impl Fn(&B, &B::Tensor) -> Result<B::Tensor>,
    ) -> Result<Streams<B::Tensor>> {
        let parts = x
            .parts
            .iter()
            .map(|p| {
                Ok(Pair {
                    dense: f(&self.inner, &p.dense)?,
                    compressed: f(&self.inner, &p.compressed)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Streams::new(parts, x.shared))
    }

    /// Window `w` of `y`, or its single part when `y` is a shared parameter.
    fn part<T>(y: &Streams<T>, w: usize) -> Result<&Pair<T>> {
        let i = if y.shared { 0 } else { w };
        y.parts.get(i).ok_or_else(|| {
            Error::input("sequential calibration", "operands have different windows")
        })
    }

    /// Applies `f(x_w, y_w)` to both streams of every window of `x`.
    fn zip(
        &self,
        x: &Streams<B::Tensor>,
        y: &Streams<B::Tensor>,
        f: impl Fn(&B, &B::Tensor, &B::Tensor) -> Result<B::Tensor>,
    ) -> Result<Streams<B::Tensor>> {
        let mut parts = Vec::with_capacity(x.parts.len());
        for (w, p) in x.parts.iter().enumerate() {
            let q = Self::part(y, w)?;
            parts.push(Pair {
                dense: f(&self.inner, &p.dense, &q.dense)?,
                compressed: f(&self.inner, &p.compressed, &q.compressed)?,
            });
        }
        Ok(Streams::new(parts, x.shared && y.shared))
    }

    /// `f(x_w, y_w)` in place on both streams of every window of `x`.
    fn zip_mut(
        &self,
        x: &mut Streams<B::Tensor>,
        y: &Streams<B::Tensor>,
        f: impl Fn(&B, &mut B::Tensor, &B::Tensor) -> Result<()>,
    ) -> Result<()> {
        x.id = next_id();
        for (w, p) in x.parts.iter_mut().enumerate() {
            let q = Self::part(y, w)?;
            f(&self.inner, &mut p.dense, &q.dense)?;
            f(&self.inner, &mut p.compressed, &q.compressed)?;
        }
        Ok(())
    }

    /// The statistic of `x` (a Gram of the compressed stream, or the cross statistic), from
    /// the cache when the last layer read the same input.
    fn statistic<S>(
        &self,
        x: &Streams<B::Tensor>,
        cached: impl Fn(&mut StatsCache) -> &mut Option<Arc<S>>,
        compute: impl Fn(&mut G::Acc, &Pair<B::Tensor>) -> anyhow::Result<()>,
        finish: impl Fn(G::Acc) -> anyhow::Result<S>,
    ) -> anyhow::Result<Arc<S>> {
        let mut cache = self
            .stats
            .lock()
            .map_err(|_| anyhow::anyhow!("sequential calibration: statistics lock poisoned"))?;
        if cache.id != x.id {
            *cache = StatsCache {
                id: x.id,
                ..StatsCache::default()
            };
        }
        if let Some(s) = cached(&mut cache) {
            return Ok(Arc::clone(s));
        }
        let n = x
            .parts
            .first()
            .map_or(0, |p| self.inner.dims(&p.compressed).1);
        let mut acc = self.ops.start(&self.inner, n)?;
        for p in &x.parts {
            compute(&mut acc, p)?;
        }
        let s = Arc::new(finish(acc)?);
        *cached(&mut cache) = Some(Arc::clone(&s));
        Ok(s)
    }

    /// One stream's rows of every window, concatenated (host, row-major).
    fn rows(&self, x: &Streams<B::Tensor>, dense: bool) -> anyhow::Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in &x.parts {
            out.extend(
                self.inner
                    .download(if dense { &p.dense } else { &p.compressed })?,
            );
        }
        Ok(out)
    }

    fn compress_layer(
        &self,
        layer: &TwinLinear<B::Linear>,
        slot: usize,
        x: &Streams<B::Tensor>,
    ) -> Result<()> {
        let mut held = layer
            .compressed
            .lock()
            .map_err(|_| Error::input("sequential calibration", "a layer lock was poisoned"))?;
        if held.is_some() {
            return Ok(());
        }
        let tokens = x
            .parts
            .iter()
            .map(|p| self.inner.dims(&p.compressed).0)
            .sum();
        let result = (self.hook)(HookInput {
            slot,
            tokens,
            input: &TwinInput { twin: self, x },
        });
        match result {
            Ok(l) => {
                *held = Some(self.inner.load_linear(l)?);
                if let Ok(mut d) = self.done.lock() {
                    d[slot] = true;
                }
                Ok(())
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if let Ok(mut f) = self.failure.lock() {
                    f.get_or_insert(e);
                }
                Err(Error::input("sequential calibration", msg))
            }
        }
    }
}

/// A planned layer's input in the twin: see [`LayerInput`].
struct TwinInput<'t, 'a, B: Backend, G: GramOps<B>> {
    twin: &'t Twin<'a, B, G>,
    x: &'t Streams<B::Tensor>,
}

impl<B: Backend, G: GramOps<B>> LayerInput for TwinInput<'_, '_, B, G> {
    fn gram(&self) -> anyhow::Result<Arc<Gram>> {
        let t = self.twin;
        t.statistic(
            self.x,
            |c| &mut c.gram,
            |acc, p| t.ops.add(&t.inner, acc, &p.compressed, None),
            |acc| t.ops.gram(&t.inner, acc, "compressed-stream Gram"),
        )
    }
    fn cross(&self) -> anyhow::Result<Arc<CrossGram>> {
        let t = self.twin;
        t.statistic(
            self.x,
            |c| &mut c.cross,
            |acc, p| t.ops.add(&t.inner, acc, &p.dense, Some(&p.compressed)),
            |acc| t.ops.cross(&t.inner, acc, "dense x compressed statistic"),
        )
    }
    fn dense_rows(&self) -> anyhow::Result<Vec<f32>> {
        self.twin.rows(self.x, true)
    }
    fn compressed_rows(&self) -> anyhow::Result<Vec<f32>> {
        self.twin.rows(self.x, false)
    }
}

impl<B: Backend, G: GramOps<B>> Backend for Twin<'_, B, G> {
    type Tensor = Streams<B::Tensor>;
    type Linear = TwinLinear<B::Linear>;
    type KvCache = TwinCache<B::KvCache>;

    fn name(&self) -> String {
        format!("{} (dense and compressed streams)", self.inner.name())
    }
    /// Uploads a parameter, shared by every window.
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        let parts = vec![Pair {
            dense: self.inner.upload(data, rows, cols)?,
            compressed: self.inner.upload(data, rows, cols)?,
        }];
        Ok(Streams::new(parts, true))
    }
    /// The compressed stream (what the compressed model computes), windows concatenated.
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>> {
        let mut out = Vec::new();
        for p in &x.parts {
            out.extend(self.inner.download(&p.compressed)?);
        }
        Ok(out)
    }
    fn dims(&self, x: &Self::Tensor) -> (usize, usize) {
        let cols = x
            .parts
            .first()
            .map_or(0, |p| self.inner.dims(&p.compressed).1);
        let rows = x
            .parts
            .iter()
            .map(|p| self.inner.dims(&p.compressed).0)
            .sum();
        (rows, cols)
    }
    /// Rows `start..end` of the windows concatenated.
    fn slice_rows(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor> {
        let mut parts = Vec::new();
        let mut at = 0;
        for p in &x.parts {
            let rows = self.inner.dims(&p.compressed).0;
            let (lo, hi) = (start.max(at), end.min(at + rows));
            if lo < hi {
                parts.push(Pair {
                    dense: self.inner.slice_rows(&p.dense, lo - at, hi - at)?,
                    compressed: self.inner.slice_rows(&p.compressed, lo - at, hi - at)?,
                });
            }
            at += rows;
        }
        Ok(Streams::new(parts, x.shared))
    }
    fn slice_cols(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor> {
        self.map(x, |b, t| b.slice_cols(t, start, end))
    }
    fn load_linear(&self, layer: blr_core::Linear) -> Result<Self::Linear> {
        let slot = self.slots.get(&fingerprint(&layer)).copied();
        Ok(TwinLinear {
            dense: self.inner.load_linear(layer)?,
            slot,
            compressed: Mutex::new(None),
        })
    }
    fn linear_dims(&self, layer: &Self::Linear) -> (usize, usize) {
        self.inner.linear_dims(&layer.dense)
    }
    fn linear(&self, layer: &Self::Linear, x: &Self::Tensor) -> Result<Self::Tensor> {
        let Some(slot) = layer.slot else {
            return self.map(x, |b, t| b.linear(&layer.dense, t));
        };
        self.compress_layer(layer, slot, x)?;
        let held = layer
            .compressed
            .lock()
            .map_err(|_| Error::input("sequential calibration", "a layer lock was poisoned"))?;
        let Some(compressed) = held.as_ref() else {
            return Err(Error::input(
                "sequential calibration",
                "layer not compressed",
            ));
        };
        let parts = x
            .parts
            .iter()
            .map(|p| {
                Ok(Pair {
                    dense: self.inner.linear(&layer.dense, &p.dense)?,
                    compressed: self.inner.linear(compressed, &p.compressed)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Streams::new(parts, x.shared))
    }
    /// Splits `ids` into windows.
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor> {
        let t = Self::part(table, 0)?;
        let parts = ids
            .chunks(self.window)
            .map(|w| {
                Ok(Pair {
                    dense: self.inner.embedding(&t.dense, w)?,
                    compressed: self.inner.embedding(&t.compressed, w)?,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Streams::new(parts, false))
    }
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor> {
        self.zip(x, weight, |b, x, w| b.rms_norm(x, w, eps))
    }
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        let mut parts = Vec::with_capacity(x.parts.len());
        for (i, p) in x.parts.iter().enumerate() {
            let (w, c) = (Self::part(weight, i)?, Self::part(bias, i)?);
            parts.push(Pair {
                dense: self.inner.layer_norm(&p.dense, &w.dense, &c.dense, eps)?,
                compressed: self.inner.layer_norm(
                    &p.compressed,
                    &w.compressed,
                    &c.compressed,
                    eps,
                )?,
            });
        }
        Ok(Streams::new(parts, x.shared))
    }
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> {
        self.zip_mut(x, y, |b, x, y| b.add_assign(x, y))
    }
    fn add_row(&self, x: &mut Self::Tensor, row: &Self::Tensor) -> Result<()> {
        self.zip_mut(x, row, |b, x, r| b.add_row(x, r))
    }
    fn modulate(
        &self,
        x: &mut Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<()> {
        x.id = next_id();
        for (i, p) in x.parts.iter_mut().enumerate() {
            let (sh, sc) = (Self::part(shift, i)?, Self::part(scale, i)?);
            self.inner.modulate(&mut p.dense, &sh.dense, &sc.dense)?;
            self.inner
                .modulate(&mut p.compressed, &sh.compressed, &sc.compressed)?;
        }
        Ok(())
    }
    fn add_gated(&self, x: &mut Self::Tensor, y: &Self::Tensor, gate: &Self::Tensor) -> Result<()> {
        x.id = next_id();
        for (i, p) in x.parts.iter_mut().enumerate() {
            let (yy, g) = (Self::part(y, i)?, Self::part(gate, i)?);
            self.inner.add_gated(&mut p.dense, &yy.dense, &g.dense)?;
            self.inner
                .add_gated(&mut p.compressed, &yy.compressed, &g.compressed)?;
        }
        Ok(())
    }
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor> {
        self.zip(gate, up, |b, g, u| b.silu_mul(g, u))
    }
    fn gelu(&self, x: &mut Self::Tensor, tanh_approx: bool) -> Result<()> {
        x.id = next_id();
        for p in &mut x.parts {
            self.inner.gelu(&mut p.dense, tanh_approx)?;
            self.inner.gelu(&mut p.compressed, tanh_approx)?;
        }
        Ok(())
    }
    fn silu(&self, x: &mut Self::Tensor) -> Result<()> {
        x.id = next_id();
        for p in &mut x.parts {
            self.inner.silu(&mut p.dense)?;
            self.inner.silu(&mut p.compressed)?;
        }
        Ok(())
    }
    /// Positions restart at `pos0` in every window.
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        pos0: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        x.id = next_id();
        for p in &mut x.parts {
            self.inner.rope(&mut p.dense, heads, pos0, inv_freq)?;
            self.inner.rope(&mut p.compressed, heads, pos0, inv_freq)?;
        }
        Ok(())
    }
    fn new_kv_cache(
        &self,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self::KvCache> {
        Ok(TwinCache {
            parts: Vec::new(),
            kv_heads,
            head_dim,
            capacity: capacity.min(self.window),
        })
    }
    fn kv_len(&self, cache: &Self::KvCache) -> usize {
        cache
            .parts
            .first()
            .map_or(0, |p| self.inner.kv_len(&p.compressed))
    }
    fn kv_clear(&self, cache: &mut Self::KvCache) {
        cache.parts.clear();
    }
    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::KvCache,
        spec: AttnSpec,
    ) -> Result<Self::Tensor> {
        let mut parts = Vec::with_capacity(q.parts.len());
        for (i, p) in q.parts.iter().enumerate() {
            while cache.parts.len() <= i {
                let (h, d, c) = (cache.kv_heads, cache.head_dim, cache.capacity);
                cache.parts.push(Pair {
                    dense: self.inner.new_kv_cache(h, d, c)?,
                    compressed: self.inner.new_kv_cache(h, d, c)?,
                });
            }
            let (kk, vv) = (Self::part(k, i)?, Self::part(v, i)?);
            let c = &mut cache.parts[i];
            parts.push(Pair {
                dense: self.inner.attention_cached(
                    &p.dense,
                    &kk.dense,
                    &vv.dense,
                    &mut c.dense,
                    spec,
                )?,
                compressed: self.inner.attention_cached(
                    &p.compressed,
                    &kk.compressed,
                    &vv.compressed,
                    &mut c.compressed,
                    spec,
                )?,
            });
        }
        Ok(Streams::new(parts, q.shared))
    }
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: AttnSpec,
    ) -> Result<Self::Tensor> {
        let mut parts = Vec::with_capacity(q.parts.len());
        for (i, p) in q.parts.iter().enumerate() {
            let (kk, vv) = (Self::part(k, i)?, Self::part(v, i)?);
            parts.push(Pair {
                dense: self.inner.attention(&p.dense, &kk.dense, &vv.dense, spec)?,
                compressed: self.inner.attention(
                    &p.compressed,
                    &kk.compressed,
                    &vv.compressed,
                    spec,
                )?,
            });
        }
        Ok(Streams::new(parts, q.shared))
    }
}

/// Test fixture: the layers of a checkpoint's transformer blocks (`layers.N.*`), the ones a
/// compression plans, with their names, in checkpoint order.
#[cfg(test)]
pub(crate) fn planned_layers(
    ck: &blr_core::checkpoint::Checkpoint,
) -> Vec<(String, blr_core::Linear)> {
    ck.layers
        .iter()
        .filter(|(n, _)| n.contains("layers."))
        .cloned()
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compress::device::HostGrams;
    use blr_core::rng::Rng;
    use blr_models::cpu::Cpu;

    /// Two chained layers: the second one's hook sees the first one's compressed output in the
    /// compressed stream and the dense output in the dense stream.
    #[test]
    fn hook_sees_both_streams_in_order() {
        let (n, h, t) = (6, 5, 4);
        let mut rng = Rng::new(1);
        let w1 = blr_core::Linear::Dense(
            blr_core::Dense::new(h, n, rng.normal_vec(h * n, 1.0)).unwrap(),
        );
        let w2 = blr_core::Linear::Dense(
            blr_core::Dense::new(3, h, rng.normal_vec(3 * h, 1.0)).unwrap(),
        );
        let fps = [fingerprint(&w1), fingerprint(&w2)];
        let seen = Mutex::new(Vec::new());
        let hook = |x: HookInput<'_>| -> anyhow::Result<blr_core::Linear> {
            seen.lock()
                .unwrap()
                .push((x.slot, x.input.dense_rows()?, x.input.compressed_rows()?));
            // "Compress" every layer to zero.
            let (m, n) = if x.slot == 0 { (h, n) } else { (3, h) };
            Ok(blr_core::Linear::Dense(blr_core::Dense::new(
                m,
                n,
                vec![0.0; m * n],
            )?))
        };
        let twin = Twin::new(Cpu, HostGrams, 2, &fps, &hook);
        let l1 = twin.load_linear(w1).unwrap();
        let l2 = twin.load_linear(w2).unwrap();
        let x = twin.upload(&rng.normal_vec(t * n, 1.0), t, n).unwrap();
        let y1 = twin.linear(&l1, &x).unwrap();
        let y2 = twin.linear(&l2, &y1).unwrap();
        assert_eq!(twin.download(&y2).unwrap(), vec![0.0; t * 3]);
        assert!(twin.missing().is_empty());
        // A second pass does not factorize again.
        twin.linear(&l1, &x).unwrap();
        drop(twin);
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!(seen[0].1, seen[0].2, "layer 1 inputs are identical");
        assert_eq!(
            seen[1].2,
            vec![0.0; t * h],
            "layer 2 sees layer 1 compressed"
        );
        assert!(
            seen[1].1.iter().any(|v| *v != 0.0),
            "dense stream untouched"
        );
    }

    /// A whole Llama through the twin, windows of 5 over 13 tokens, every layer "compressed" to
    /// itself: the compressed stream equals the dense model run on each window separately, and
    /// every hook sees all 13 tokens with identical streams.
    #[test]
    fn windows_match_separate_forward_passes() {
        use blr_models::llama::{self, Llama, LlamaConfig, RopeScaling};
        use blr_models::lm::{BackendLm, CausalLm};
        let cfg = LlamaConfig {
            vocab_size: 41,
            hidden: 20,
            intermediate: 28,
            layers: 2,
            heads: 6,
            kv_heads: 2,
            head_dim: 4,
            rope_theta: 1e4,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            tie_embeddings: true,
            max_positions: 64,
        };
        let (cfg, ck) = llama::random(&cfg, 7, None).unwrap();
        let ids: Vec<u32> = (0..13u32).map(|i| (i * 7 + 3) % 41).collect();
        let planned: Vec<blr_core::Linear> =
            planned_layers(&ck).into_iter().map(|(_, l)| l).collect();
        let fps: Vec<u64> = planned.iter().map(fingerprint).collect();
        let calls = Mutex::new(0usize);
        let hook = |x: HookInput<'_>| -> anyhow::Result<blr_core::Linear> {
            assert_eq!(x.tokens, 13);
            assert_eq!(x.input.dense_rows()?, x.input.compressed_rows()?);
            *calls.lock().unwrap() += 1;
            Ok(planned[x.slot].clone())
        };
        let twin = Llama::load(
            Twin::new(Cpu, HostGrams, 5, &fps, &hook),
            cfg.clone(),
            ck.clone(),
        )
        .unwrap();
        let mut cache = twin.new_cache(13).unwrap();
        let got = twin.forward(&ids, &mut cache, true).unwrap();
        assert!(twin.backend().missing().is_empty());

        let dense = Llama::load(Cpu, cfg, ck).unwrap();
        let mut want = Vec::new();
        for w in ids.chunks(5) {
            let mut c = dense.new_cache(5).unwrap();
            want.extend(dense.forward(w, &mut c, true).unwrap());
        }
        assert_eq!(got.len(), want.len());
        for (a, b) in got.iter().zip(&want) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        drop(twin);
        assert_eq!(calls.into_inner().unwrap(), fps.len());
    }

    #[test]
    fn hook_failure_is_kept() {
        let w = blr_core::Linear::Dense(blr_core::Dense::new(2, 2, vec![1.0; 4]).unwrap());
        let hook = |_: HookInput<'_>| -> anyhow::Result<blr_core::Linear> {
            anyhow::bail!("rank too large for layer")
        };
        let twin = Twin::new(Cpu, HostGrams, 4, &[fingerprint(&w)], &hook);
        let l = twin.load_linear(w).unwrap();
        let x = twin.upload(&[1.0, 2.0], 1, 2).unwrap();
        let e = twin.linear(&l, &x).err().unwrap();
        assert!(e.to_string().contains("rank too large"), "{e}");
        assert!(twin.take_failure().is_some());
        assert_eq!(twin.missing(), vec![0]);
    }

    /// Counts the statistics actually computed.
    struct Counting(std::cell::Cell<usize>);

    impl GramOps<Cpu> for Counting {
        type Acc = <HostGrams as GramOps<Cpu>>::Acc;
        fn start(&self, b: &Cpu, n: usize) -> anyhow::Result<Self::Acc> {
            self.0.set(self.0.get() + 1);
            HostGrams.start(b, n)
        }
        fn add(
            &self,
            b: &Cpu,
            acc: &mut Self::Acc,
            x: &<Cpu as Backend>::Tensor,
            y: Option<&<Cpu as Backend>::Tensor>,
        ) -> anyhow::Result<()> {
            HostGrams.add(b, acc, x, y)
        }
        fn gram(&self, b: &Cpu, acc: Self::Acc, what: &str) -> anyhow::Result<Gram> {
            HostGrams.gram(b, acc, what)
        }
        fn cross(&self, b: &Cpu, acc: Self::Acc, what: &str) -> anyhow::Result<CrossGram> {
            HostGrams.cross(b, acc, what)
        }
    }

    /// q/k/v and gate/up read one input: its Gram and cross statistic are computed once per
    /// block (4 inputs per Llama block, 7 layers), and they equal a fresh computation.
    #[test]
    fn layers_sharing_an_input_share_its_statistics() {
        use blr_models::llama::{self, Llama, LlamaConfig, RopeScaling};
        use blr_models::lm::{BackendLm, CausalLm};
        let cfg = LlamaConfig {
            vocab_size: 23,
            hidden: 12,
            intermediate: 17,
            layers: 2,
            heads: 3,
            kv_heads: 1,
            head_dim: 4,
            rope_theta: 1e4,
            rope_scaling: RopeScaling::None,
            rms_eps: 1e-5,
            tie_embeddings: true,
            max_positions: 16,
        };
        let (cfg, ck) = llama::random(&cfg, 3, None).unwrap();
        let planned: Vec<blr_core::Linear> =
            planned_layers(&ck).into_iter().map(|(_, l)| l).collect();
        let fps: Vec<u64> = planned.iter().map(fingerprint).collect();
        let hook = |x: HookInput<'_>| -> anyhow::Result<blr_core::Linear> {
            let g = x.input.gram()?;
            let c = x.input.cross()?;
            let rows = x.input.compressed_rows()?;
            let mut fresh = Gram::new(g.dim());
            fresh.accumulate(&rows, x.tokens)?;
            let n = g.dim();
            for k in 0..n * n {
                let (a, b) = (g.get(k / n, k % n), fresh.get(k / n, k % n));
                assert!((a - b).abs() <= 1e-12 * b.abs().max(1.0), "{a} vs {b}");
            }
            assert_eq!(c.tokens(), 9);
            // Halve every layer so the streams differ and a stale statistic would show.
            let blr_core::Linear::Dense(d) = &planned[x.slot] else {
                anyhow::bail!("dense only")
            };
            let w = d.weight.iter().map(|v| 0.5 * v).collect();
            Ok(blr_core::Linear::Dense(blr_core::Dense::new(
                d.shape().m,
                n,
                w,
            )?))
        };
        let counting = Counting(std::cell::Cell::new(0));
        let model = Llama::load(Twin::new(Cpu, counting, 4, &fps, &hook), cfg, ck).unwrap();
        let mut cache = model.new_cache(9).unwrap();
        let ids: Vec<u32> = (0..9).collect();
        model.forward(&ids, &mut cache, false).unwrap();
        assert!(model.backend().missing().is_empty());
        // 2 blocks x 4 distinct inputs x (Gram + cross).
        assert_eq!(model.backend().ops.0.get(), 2 * 4 * 2);
    }
}
