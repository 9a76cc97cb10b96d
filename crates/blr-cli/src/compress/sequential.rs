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
//! through it in that one call: the calibration text is one window (no multi-window batches).

use crate::compress::calibrate::fingerprint;
use blr_models::backend::{AttnSpec, Backend};
use blr_models::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// What the hook is given for planned layer `slot`: the layer's input rows in the dense and in
/// the compressed stream (both row-major `(tokens, n)`).
pub struct HookInput<'x> {
    pub slot: usize,
    pub dense: &'x [f32],
    pub compressed: &'x [f32],
    pub tokens: usize,
}

/// Factorizes one planned layer; see the module docs.
pub type Hook<'a> = dyn Fn(HookInput<'_>) -> anyhow::Result<blr_core::Linear> + 'a;

/// A pair of activations: the dense model's and the compressed model's.
pub struct Pair<T> {
    dense: T,
    compressed: T,
}

/// A layer of the twin model: the dense layer, and for planned layers their slot and, once
/// factorized, the compressed layer.
pub struct TwinLinear<L> {
    dense: L,
    slot: Option<usize>,
    compressed: Mutex<Option<L>>,
}

/// Runs every op on both streams; see the module docs.
pub struct Twin<'a, B: Backend> {
    inner: B,
    slots: HashMap<u64, usize>,
    hook: &'a Hook<'a>,
    /// The hook's error (the trait's ops carry only the models' error type).
    failure: Mutex<Option<anyhow::Error>>,
    done: Mutex<Vec<bool>>,
}

impl<'a, B: Backend> Twin<'a, B> {
    /// `layers`: fingerprints of the planned layers' dense weights, in slot order.
    pub fn new(inner: B, layers: &[u64], hook: &'a Hook<'a>) -> Self {
        Twin {
            inner,
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

    fn pair(
        &self,
        x: &Pair<B::Tensor>,
        f: impl Fn(&B, &B::Tensor) -> Result<B::Tensor>,
    ) -> Result<Pair<B::Tensor>> {
        Ok(Pair {
            dense: f(&self.inner, &x.dense)?,
            compressed: f(&self.inner, &x.compressed)?,
        })
    }

    fn compress_layer(
        &self,
        layer: &TwinLinear<B::Linear>,
        slot: usize,
        x: &Pair<B::Tensor>,
    ) -> Result<()> {
        let mut held = layer
            .compressed
            .lock()
            .map_err(|_| Error::input("sequential calibration", "a layer lock was poisoned"))?;
        if held.is_some() {
            return Ok(());
        }
        let (tokens, _) = self.inner.dims(&x.compressed);
        let dense = self.inner.download(&x.dense)?;
        let compressed = self.inner.download(&x.compressed)?;
        let result = (self.hook)(HookInput {
            slot,
            dense: &dense,
            compressed: &compressed,
            tokens,
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

impl<B: Backend> Backend for Twin<'_, B> {
    type Tensor = Pair<B::Tensor>;
    type Linear = TwinLinear<B::Linear>;
    type KvCache = Pair<B::KvCache>;

    fn name(&self) -> String {
        format!("{} (dense and compressed streams)", self.inner.name())
    }
    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor> {
        Ok(Pair {
            dense: self.inner.upload(data, rows, cols)?,
            compressed: self.inner.upload(data, rows, cols)?,
        })
    }
    /// The compressed stream (what the compressed model computes).
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>> {
        self.inner.download(&x.compressed)
    }
    fn dims(&self, x: &Self::Tensor) -> (usize, usize) {
        self.inner.dims(&x.compressed)
    }
    fn slice_rows(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor> {
        self.pair(x, |b, t| b.slice_rows(t, start, end))
    }
    fn slice_cols(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor> {
        self.pair(x, |b, t| b.slice_cols(t, start, end))
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
        let dense = self.inner.linear(&layer.dense, &x.dense)?;
        let Some(slot) = layer.slot else {
            return Ok(Pair {
                dense,
                compressed: self.inner.linear(&layer.dense, &x.compressed)?,
            });
        };
        self.compress_layer(layer, slot, x)?;
        let held = layer
            .compressed
            .lock()
            .map_err(|_| Error::input("sequential calibration", "a layer lock was poisoned"))?;
        let compressed = match held.as_ref() {
            Some(l) => self.inner.linear(l, &x.compressed)?,
            None => {
                return Err(Error::input(
                    "sequential calibration",
                    "layer not compressed",
                ))
            }
        };
        Ok(Pair { dense, compressed })
    }
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor> {
        Ok(Pair {
            dense: self.inner.embedding(&table.dense, ids)?,
            compressed: self.inner.embedding(&table.compressed, ids)?,
        })
    }
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor> {
        Ok(Pair {
            dense: self.inner.rms_norm(&x.dense, &weight.dense, eps)?,
            compressed: self
                .inner
                .rms_norm(&x.compressed, &weight.compressed, eps)?,
        })
    }
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor> {
        Ok(Pair {
            dense: self
                .inner
                .layer_norm(&x.dense, &weight.dense, &bias.dense, eps)?,
            compressed: self.inner.layer_norm(
                &x.compressed,
                &weight.compressed,
                &bias.compressed,
                eps,
            )?,
        })
    }
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()> {
        self.inner.add_assign(&mut x.dense, &y.dense)?;
        self.inner.add_assign(&mut x.compressed, &y.compressed)
    }
    fn add_row(&self, x: &mut Self::Tensor, row: &Self::Tensor) -> Result<()> {
        self.inner.add_row(&mut x.dense, &row.dense)?;
        self.inner.add_row(&mut x.compressed, &row.compressed)
    }
    fn modulate(
        &self,
        x: &mut Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<()> {
        self.inner
            .modulate(&mut x.dense, &shift.dense, &scale.dense)?;
        self.inner
            .modulate(&mut x.compressed, &shift.compressed, &scale.compressed)
    }
    fn add_gated(&self, x: &mut Self::Tensor, y: &Self::Tensor, gate: &Self::Tensor) -> Result<()> {
        self.inner.add_gated(&mut x.dense, &y.dense, &gate.dense)?;
        self.inner
            .add_gated(&mut x.compressed, &y.compressed, &gate.compressed)
    }
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor> {
        Ok(Pair {
            dense: self.inner.silu_mul(&gate.dense, &up.dense)?,
            compressed: self.inner.silu_mul(&gate.compressed, &up.compressed)?,
        })
    }
    fn gelu(&self, x: &mut Self::Tensor, tanh_approx: bool) -> Result<()> {
        self.inner.gelu(&mut x.dense, tanh_approx)?;
        self.inner.gelu(&mut x.compressed, tanh_approx)
    }
    fn silu(&self, x: &mut Self::Tensor) -> Result<()> {
        self.inner.silu(&mut x.dense)?;
        self.inner.silu(&mut x.compressed)
    }
    fn rope(
        &self,
        x: &mut Self::Tensor,
        heads: usize,
        pos0: usize,
        inv_freq: &[f32],
    ) -> Result<()> {
        self.inner.rope(&mut x.dense, heads, pos0, inv_freq)?;
        self.inner.rope(&mut x.compressed, heads, pos0, inv_freq)
    }
    fn new_kv_cache(
        &self,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self::KvCache> {
        Ok(Pair {
            dense: self.inner.new_kv_cache(kv_heads, head_dim, capacity)?,
            compressed: self.inner.new_kv_cache(kv_heads, head_dim, capacity)?,
        })
    }
    fn kv_len(&self, cache: &Self::KvCache) -> usize {
        self.inner.kv_len(&cache.compressed)
    }
    fn kv_clear(&self, cache: &mut Self::KvCache) {
        self.inner.kv_clear(&mut cache.dense);
        self.inner.kv_clear(&mut cache.compressed);
    }
    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::KvCache,
        spec: AttnSpec,
    ) -> Result<Self::Tensor> {
        Ok(Pair {
            dense: self.inner.attention_cached(
                &q.dense,
                &k.dense,
                &v.dense,
                &mut cache.dense,
                spec,
            )?,
            compressed: self.inner.attention_cached(
                &q.compressed,
                &k.compressed,
                &v.compressed,
                &mut cache.compressed,
                spec,
            )?,
        })
    }
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: AttnSpec,
    ) -> Result<Self::Tensor> {
        Ok(Pair {
            dense: self.inner.attention(&q.dense, &k.dense, &v.dense, spec)?,
            compressed: self
                .inner
                .attention(&q.compressed, &k.compressed, &v.compressed, spec)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
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
                .push((x.slot, x.dense.to_vec(), x.compressed.to_vec()));
            // "Compress" every layer to zero.
            let (m, n) = if x.slot == 0 { (h, n) } else { (3, h) };
            Ok(blr_core::Linear::Dense(blr_core::Dense::new(
                m,
                n,
                vec![0.0; m * n],
            )?))
        };
        let twin = Twin::new(Cpu, &fps, &hook);
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

    #[test]
    fn hook_failure_is_kept() {
        let w = blr_core::Linear::Dense(blr_core::Dense::new(2, 2, vec![1.0; 4]).unwrap());
        let hook = |_: HookInput<'_>| -> anyhow::Result<blr_core::Linear> {
            anyhow::bail!("rank too large for layer")
        };
        let twin = Twin::new(Cpu, &[fingerprint(&w)], &hook);
        let l = twin.load_linear(w).unwrap();
        let x = twin.upload(&[1.0, 2.0], 1, 2).unwrap();
        let e = twin.linear(&l, &x).err().unwrap();
        assert!(e.to_string().contains("rank too large"), "{e}");
        assert!(twin.take_failure().is_some());
        assert_eq!(twin.missing(), vec![0]);
    }
}
