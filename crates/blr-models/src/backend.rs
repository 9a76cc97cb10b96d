//! The backend trait every model is written against, and the parameters its ops share.
//!
//! Activations are 2-D row-major `(rows, cols)` tensors: `rows` is tokens (or patches), `cols`
//! a feature dimension; multi-head tensors are `(tokens, heads * head_dim)` with each head's
//! slice contiguous, the layout a fused QKV projection writes. Keeping every op on this one
//! layout means no backend ever needs a transpose kernel between layers.
//!
//! The CPU backend ([`crate::cpu::Cpu`], f32) is the reference; a CUDA backend (bf16) implements
//! the same trait with fused kernels and is checked against it.

use crate::Result;

/// Attention shape: `heads` query heads of `head_dim`, sharing `kv_heads` key/value heads
/// (grouped-query attention: query head `h` reads kv head `h / (heads / kv_heads)`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AttnSpec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Query row `i` sees keys at positions `<=` its own (decoders), or all keys (ViT, DiT).
    pub causal: bool,
    /// Multiplies `q . k`; `1 / sqrt(head_dim)` for every model here.
    pub scale: f32,
}

impl AttnSpec {
    pub fn new(heads: usize, kv_heads: usize, head_dim: usize, causal: bool) -> Self {
        AttnSpec {
            heads,
            kv_heads,
            head_dim,
            causal,
            scale: 1.0 / (head_dim as f32).sqrt(),
        }
    }
}

/// Checks `q`, `k`, `v` (as `(rows, cols)`) against an attention shape: heads share kv heads
/// evenly, columns are heads x head_dim, and the three cover the same positions. Every
/// backend's attention ops start with this.
pub fn check_attn_dims(
    (q_rows, q_cols): (usize, usize),
    (k_rows, k_cols): (usize, usize),
    (v_rows, v_cols): (usize, usize),
    spec: AttnSpec,
) -> Result<()> {
    let AttnSpec {
        heads,
        kv_heads,
        head_dim,
        ..
    } = spec;
    if heads == 0 || kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(crate::Error::input(
            "attention",
            format!("{heads} query heads cannot share {kv_heads} kv heads evenly"),
        ));
    }
    if q_cols != heads * head_dim || k_cols != kv_heads * head_dim || v_cols != k_cols {
        return Err(crate::Error::input(
            "attention",
            format!(
                "q has {q_cols} columns (want {heads} x {head_dim}), k {k_cols} and v {v_cols} (want {kv_heads} x {head_dim})"
            ),
        ));
    }
    if k_rows != q_rows || v_rows != q_rows {
        return Err(crate::Error::input(
            "attention",
            format!("q, k, v have {q_rows}, {k_rows}, {v_rows} rows"),
        ));
    }
    Ok(())
}

/// Checks that `new` positions of an attention layer shaped `spec` fit a KV cache of
/// `(kv_heads, head_dim)` holding `len` of `capacity` positions; returns the first new position.
/// Every backend's `attention_cached` starts with this, so the messages are the same everywhere.
pub fn check_cache(
    (kv_heads, head_dim): (usize, usize),
    len: usize,
    capacity: usize,
    new: usize,
    spec: AttnSpec,
) -> Result<usize> {
    if kv_heads != spec.kv_heads || head_dim != spec.head_dim {
        return Err(crate::Error::input(
            "attention",
            format!(
                "cache holds {kv_heads} kv heads of {head_dim}, the layer has {} of {}",
                spec.kv_heads, spec.head_dim
            ),
        ));
    }
    if len + new > capacity {
        return Err(crate::Error::input(
            "attention",
            format!("{len} positions cached + {new} new exceed the cache capacity of {capacity}"),
        ));
    }
    Ok(len)
}

/// The primitive ops of a transformer forward pass.
pub trait Backend {
    /// A row-major `(rows, cols)` activation or parameter tensor on the device.
    type Tensor;
    /// A linear layer (any BLR format) resident on the device.
    type Linear;
    /// Keys and values of one attention layer for the positions seen so far.
    type KvCache;

    /// Human-readable device description (for reports).
    fn name(&self) -> String;

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<Self::Tensor>;
    fn download(&self, x: &Self::Tensor) -> Result<Vec<f32>>;
    /// `(rows, cols)`.
    fn dims(&self, x: &Self::Tensor) -> (usize, usize);
    /// Rows `start..end` as a new tensor.
    fn slice_rows(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor>;
    /// Columns `start..end` as a new tensor (splitting a fused QKV or adaLN projection).
    fn slice_cols(&self, x: &Self::Tensor, start: usize, end: usize) -> Result<Self::Tensor>;

    /// Moves a layer to the device (the CPU backend keeps it as is).
    fn load_linear(&self, layer: blr_core::Linear) -> Result<Self::Linear>;
    /// `(out_features, in_features)`.
    fn linear_dims(&self, layer: &Self::Linear) -> (usize, usize);
    /// `Y (T, m) = X (T, n) W^T`.
    fn linear(&self, layer: &Self::Linear, x: &Self::Tensor) -> Result<Self::Tensor>;

    /// Rows `ids` of `table (vocab, dim)`.
    fn embedding(&self, table: &Self::Tensor, ids: &[u32]) -> Result<Self::Tensor>;
    /// `x / rms(x) * weight`, per row; `weight` is `(1, cols)`.
    fn rms_norm(&self, x: &Self::Tensor, weight: &Self::Tensor, eps: f32) -> Result<Self::Tensor>;
    /// `(x - mean) / std * weight + bias`, per row.
    fn layer_norm(
        &self,
        x: &Self::Tensor,
        weight: &Self::Tensor,
        bias: &Self::Tensor,
        eps: f32,
    ) -> Result<Self::Tensor>;
    /// `x += y` (residual connections).
    fn add_assign(&self, x: &mut Self::Tensor, y: &Self::Tensor) -> Result<()>;
    /// `x[r, :] += row[0, :]` for every row (biases, position embeddings of one row).
    fn add_row(&self, x: &mut Self::Tensor, row: &Self::Tensor) -> Result<()>;
    /// `x = x * (1 + scale) + shift`, with `shift`, `scale` `(1, cols)` (DiT's adaLN modulate).
    fn modulate(
        &self,
        x: &mut Self::Tensor,
        shift: &Self::Tensor,
        scale: &Self::Tensor,
    ) -> Result<()>;
    /// `x += gate * y`, with `gate` `(1, cols)` (DiT's gated residual).
    fn add_gated(&self, x: &mut Self::Tensor, y: &Self::Tensor, gate: &Self::Tensor) -> Result<()>;
    /// `silu(gate) * up` (SwiGLU).
    fn silu_mul(&self, gate: &Self::Tensor, up: &Self::Tensor) -> Result<Self::Tensor>;
    /// GELU, tanh approximation (GPT-2, DiT) or exact erf form (ViT).
    fn gelu(&self, x: &mut Self::Tensor, tanh_approx: bool) -> Result<()>;
    /// SiLU in place (DiT conditioning).
    fn silu(&self, x: &mut Self::Tensor) -> Result<()>;
    /// Rotary embedding in place on `x (T, heads * head_dim)` for positions `pos0..pos0+T`,
    /// half-split convention (HF `rotate_half`): pair `(i, i + head_dim/2)` turns by
    /// `pos * inv_freq[i]`. GGUF's interleaved Q/K rows are un-permuted at load so that one
    /// convention serves every checkpoint.
    fn rope(&self, x: &mut Self::Tensor, heads: usize, pos0: usize, inv_freq: &[f32])
        -> Result<()>;

    /// An empty cache for `capacity` positions.
    fn new_kv_cache(
        &self,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<Self::KvCache>;
    /// Positions stored.
    fn kv_len(&self, cache: &Self::KvCache) -> usize;
    /// Forgets everything (a new sequence).
    fn kv_clear(&self, cache: &mut Self::KvCache);
    /// Appends `k`, `v` (`(T, kv_heads * head_dim)`) to the cache at its current length, then
    /// attends `q (T, heads * head_dim)`, whose rows are those same `T` positions, over every
    /// cached position (causally when `spec.causal`). Returns `(T, heads * head_dim)`.
    fn attention_cached(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        cache: &mut Self::KvCache,
        spec: AttnSpec,
    ) -> Result<Self::Tensor>;
    /// Attention without a cache: `q`, `k`, `v` cover the same `T` positions.
    fn attention(
        &self,
        q: &Self::Tensor,
        k: &Self::Tensor,
        v: &Self::Tensor,
        spec: AttnSpec,
    ) -> Result<Self::Tensor>;
    /// The token [`crate::lm::choose`] picks from the last row of `logits` `(T, vocab)` with
    /// the uniform number `u`. This default downloads the row and chooses on the host; a
    /// device backend overrides it so that only the token id crosses the bus.
    fn sample_last(
        &self,
        logits: &Self::Tensor,
        temperature: f32,
        top_p: f32,
        u: f64,
    ) -> Result<u32> {
        let (rows, cols) = self.dims(logits);
        if rows == 0 {
            return Err(crate::Error::input("sampler", "no logits rows"));
        }
        let all = self.download(logits)?;
        crate::lm::choose(&all[(rows - 1) * cols..], temperature, top_p, u)
    }
}
