//! Calibration: run the dense model over calibration text and accumulate, for every linear
//! layer, the Gram matrix `X X^T` of the activations entering it (n x n, whatever the token
//! count), which the calibrated factorizations minimise `||(W - Ŵ) X||_F` against.
//!
//! The model code is not touched: [`Recording`] wraps any backend and, in its `linear` op,
//! adds the input rows to the Gram of the layer being applied, through a [`GramOps`]: on the
//! host for the CPU backend, on the device for the CUDA one (`compress::device`). Layers are recognised by a
//! fingerprint of their weights taken at load time, so the wrapper needs no knowledge of the
//! order in which a model loads or calls its layers.

use crate::compress::device::GramOps;
use crate::compress::weights::OutputWeightRules;
use blr_compress::Gram;
use blr_models::backend::{AttnSpec, Backend};
use blr_models::Result;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};

/// A fingerprint of a layer's shape and values (not cryptographic: it only has to tell the
/// layers of one model apart).
pub fn fingerprint(layer: &blr_core::Linear) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let s = layer.shape();
    (s.m, s.n, s.b_out, s.b_in, s.rank).hash(&mut h);
    for (_, _, data) in layer.factors() {
        for v in data {
            v.to_bits().hash(&mut h);
        }
    }
    h.finish()
}

/// One slot's sums of an output-weight statistic (None until a row reaches it).
type StatSums = Mutex<Option<Vec<f64>>>;

/// A layer as the recording backend holds it: the inner backend's layer plus the slot of the
/// Gram it feeds (None for layers that are not being compressed).
pub struct RecordedLinear<L> {
    inner: L,
    slot: Option<usize>,
}

/// Wraps a backend; see the module docs.
pub struct Recording<B: Backend, G: GramOps<B>> {
    inner: B,
    ops: G,
    slots: HashMap<u64, usize>,
    /// Per slot: input features and the statistic (made when the first rows arrive).
    grams: Vec<(usize, Mutex<Option<G::Acc>>)>,
    /// Output-weight statistics (`--output-weights`): the rules and, per slot, the sums of
    /// the raw per-channel statistic over the rows seen (slots = the rules' layer indices).
    stats: Option<(Arc<OutputWeightRules>, Vec<StatSums>)>,
    /// The first accumulation error (the trait's ops cannot carry a compress error).
    failure: Mutex<Option<String>>,
}

impl<B: Backend, G: GramOps<B>> Recording<B, G> {
    /// `layers`: the layers to record, by fingerprint, with their input dimension; `ops` sums
    /// their Grams.
    pub fn new(inner: B, ops: G, layers: &[(u64, usize)]) -> Self {
        Recording {
            inner,
            ops,
            slots: layers
                .iter()
                .enumerate()
                .map(|(i, (f, _))| (*f, i))
                .collect(),
            grams: layers.iter().map(|(_, n)| (*n, Mutex::new(None))).collect(),
            stats: None,
            failure: Mutex::new(None),
        }
    }

    /// Also accumulates the output-weight statistics of `rules` (whose layer `i` is slot `i`).
    pub fn with_output_statistics(mut self, rules: Arc<OutputWeightRules>) -> Self {
        let sums = (0..self.grams.len()).map(|_| Mutex::new(None)).collect();
        self.stats = Some((rules, sums));
        self
    }

    /// The output-weight statistic sums per slot (None where the layer has none), taken out.
    pub fn take_output_statistics(&self) -> std::result::Result<Vec<Option<Vec<f64>>>, String> {
        let Some((_, sums)) = &self.stats else {
            return Ok(vec![None; self.grams.len()]);
        };
        sums.iter()
            .map(|s| Ok(s.lock().map_err(|e| e.to_string())?.take()))
            .collect()
    }

    fn accumulate_statistics(
        &self,
        slot: usize,
        x: &[f32],
        rows: usize,
    ) -> std::result::Result<(), String> {
        let Some((rules, sums)) = &self.stats else {
            return Ok(());
        };
        let Some(add) = rules.sums(slot, x, rows).map_err(|e| format!("{e:#}"))? else {
            return Ok(());
        };
        let mut held = sums[slot].lock().map_err(|e| e.to_string())?;
        match held.as_mut() {
            Some(acc) => acc.iter_mut().zip(&add).for_each(|(a, b)| *a += b),
            None => *held = Some(add),
        }
        Ok(())
    }

    /// The Grams, in the order of `layers` given to [`Recording::new`] (taken out: a second
    /// call gives empty ones; the model owning this backend is dropped right after).
    pub fn take_grams(&self) -> std::result::Result<Vec<Gram>, String> {
        if let Some(e) = self.failure.lock().map_err(|e| e.to_string())?.take() {
            return Err(e);
        }
        self.grams
            .iter()
            .enumerate()
            .map(|(slot, (n, g))| {
                let acc = g.lock().map_err(|e| e.to_string())?.take();
                match acc {
                    None => Ok(Gram::new(*n)),
                    Some(acc) => self
                        .ops
                        .gram(&self.inner, acc, &format!("calibration slot {slot}"))
                        .map_err(|e| format!("{e:#}")),
                }
            })
            .collect()
    }

    /// Adds `x` to the Gram of `slot` (and, where a statistic needs them, its rows on the
    /// host to the output-weight sums).
    fn record(&self, slot: usize, x: &B::Tensor) -> std::result::Result<(), String> {
        let (n, held) = &self.grams[slot];
        let mut held = held.lock().map_err(|e| e.to_string())?;
        if held.is_none() {
            *held = Some(
                self.ops
                    .start(&self.inner, *n)
                    .map_err(|e| format!("{e:#}"))?,
            );
        }
        if let Some(acc) = held.as_mut() {
            self.ops
                .add(&self.inner, acc, x, None)
                .map_err(|e| format!("{e:#}"))?;
        }
        let needs_rows = self
            .stats
            .as_ref()
            .is_some_and(|(rules, _)| rules.needs_rows(slot));
        if needs_rows {
            let rows = self.inner.dims(x).0;
            let host = self.inner.download(x).map_err(|e| e.to_string())?;
            self.accumulate_statistics(slot, &host, rows)?;
        }
        Ok(())
    }
}

impl<B: Backend, G: GramOps<B>> Backend for Recording<B, G> {
    type Tensor = B::Tensor;
    type Linear = RecordedLinear<B::Linear>;
    type KvCache = B::KvCache;

    fn name(&self) -> String {
        format!("{} (recording activations)", self.inner.name())
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        self.inner.upload(data, rows, cols)
    }
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>> {
        self.inner.download(x)
    }
    fn dims(&self, x: &Self::Tensor) -> (usize, usize) {
        self.inner.dims(x)
    }
    fn slice_rows(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor> {
        self.inner.slice_rows(x, start, end)
    }
    fn slice_cols(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor> {
        self.inner.slice_cols(x, start, end)
    }
    fn load_linear(&self, layer: blr_core::Linear) -> Result<Self::Linear> {
        let slot = self.slots.get(&fingerprint(&layer)).copied();
        Ok(RecordedLinear {
            inner: self.inner.load_linear(layer)?,
            slot,
        })
    }
    fn linear_dims(&self, layer: &Self::Linear) -> (usize, usize) {
        self.inner.linear_dims(&layer.inner)
    }
    fn linear(&self, layer: &Self::Linear, x: &Self::Tensor) -> Result<Self::Tensor> {
        if let Some(slot) = layer.slot {
            if let Err(e) = self.record(slot, x) {
                if let Ok(mut f) = self.failure.lock() {
                    f.get_or_insert(e);
                }
            }
        }
        self.inner.linear(&layer.inner, x)
    }
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor> {
        self.inner.embedding(table, ids)
    }
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor> {
        self.inner.rms_norm(x, weight, eps)
    }
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        self.inner.layer_norm(x, weight, bias, eps)
    }
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> {
        self.inner.add_assign(x, y)
    }
    fn add_row(&self, x: &mut Self::Tensor, row: &Self::Tensor) -> Result<()> {
        self.inner.add_row(x, row)
    }
    fn modulate(
        &self,
        x: &mut Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<()> {
        self.inner.modulate(x, shift, scale)
    }
    fn add_gated(&self, x: &mut Self::Tensor, y: &Self::Tensor, gate: &Self::Tensor) -> Result<()> {
        self.inner.add_gated(x, y, gate)
    }
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor> {
        self.inner.silu_mul(gate, up)
    }
    fn gelu(&self, x: &mut Self::Tensor, tanh_approx: bool) -> Result<()> {
        self.inner.gelu(x, tanh_approx)
    }
    fn silu(&self, x: &mut Self::Tensor) -> Result<()> {
        self.inner.silu(x)
    }
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        pos0: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        self.inner.rope(x, heads, pos0, inv_freq)
    }
    fn new_kv_cache(
        &self,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self::KvCache> {
        self.inner.new_kv_cache(kv_heads, head_dim, capacity)
    }
    fn kv_len(&self, cache: &Self::KvCache) -> usize {
        self.inner.kv_len(cache)
    }
    fn kv_clear(&self, cache: &mut Self::KvCache) {
        self.inner.kv_clear(cache)
    }
    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::KvCache,
        spec: AttnSpec,
    ) -> Result<Self::Tensor> {
        self.inner.attention_cached(q, k, v, cache, spec)
    }
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: AttnSpec,
    ) -> Result<Self::Tensor> {
        self.inner.attention(q, k, v, spec)
    }
}
