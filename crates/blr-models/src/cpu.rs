//! The CPU backend: f32 everywhere, the reference every other backend is checked against.
//!
//! Speed matters too (CI scores SmolLM2-135M perplexity on a few thousand tokens on 2 cores):
//! linear layers go through `blr_core::Linear::forward` (faer GEMMs, ~100-200 GFLOP/s here),
//! attention runs one rayon task per query head with faer GEMMs for `Q K^T` and `P V`, and the
//! element-wise ops are single passes over rows in parallel.

use crate::backend::{check_attn_dims, check_cache, AttnSpec, Backend};
use crate::{Error, Result};
use blr_core::gemm::{matmul, Layout};
use rayon::prelude::*;

/// A row-major `(rows, cols)` f32 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct CpuTensor {
    pub data: Vec<f32>,
    pub rows: usize,
    pub cols: usize,
}

impl CpuTensor {
    pub fn new(data: Vec<f32>, rows: usize, cols: usize) -> Result<Self> {
        if data.len() != rows * cols {
            return Err(Error::input(
                "tensor",
                format!(
                    "{} values cannot form a ({rows}, {cols}) matrix",
                    data.len()
                ),
            ));
        }
        Ok(CpuTensor { data, rows, cols })
    }
}

/// Keys and values of one layer, stored per kv head: `k[h][pos][d]`, so that one head's keys
/// are a contiguous `(positions, head_dim)` matrix that a GEMM reads without gathering.
#[derive(Clone, Debug)]
pub struct CpuKvCache {
    k: Vec<f32>,
    v: Vec<f32>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// The CPU backend (stateless: threads come from rayon's global pool).
#[derive(Clone, Copy, Debug, Default)]
pub struct Cpu;

/// Query rows per attention block: 64 rows x 1024 keys of scores is 256 KiB, cache-resident.
const QUERY_BLOCK: usize = 64;

/// Below this many elements an element-wise op runs on one thread: splitting costs more.
const PAR_MIN: usize = 1 << 15;

fn same_dims(what: &str, a: &CpuTensor, b: &CpuTensor) -> Result<()> {
    if (a.rows, a.cols) != (b.rows, b.cols) {
        return Err(Error::input(
            what,
            format!(
                "operands are ({}, {}) and ({}, {})",
                a.rows, a.cols, b.rows, b.cols
            ),
        ));
    }
    Ok(())
}

fn row_vector(what: &str, x: &CpuTensor, w: &CpuTensor) -> Result<()> {
    if w.data.len() != x.cols {
        return Err(Error::input(
            what,
            format!(
                "per-column parameter has {} values, rows have {}",
                w.data.len(),
                x.cols
            ),
        ));
    }
    Ok(())
}

/// Runs `f` over each row of `data` (`cols` wide), in parallel when the tensor is large.
fn for_rows(data: &mut [f32], cols: usize, f: impl Fn(&mut [f32]) + Sync + Send) {
    if cols == 0 {
        return;
    }
    if data.len() >= PAR_MIN {
        data.par_chunks_mut(cols).for_each(f);
    } else {
        data.chunks_mut(cols).for_each(f);
    }
}

fn gelu_tanh(x: f32) -> f32 {
    const C: f32 = 0.797_884_6; // sqrt(2 / pi)
    0.5 * x * (1.0 + (C * (x + 0.044_715 * x * x * x)).tanh())
}

/// erf by Abramowitz-Stegun 7.1.26 refined: max error 1.5e-7, below f32 resolution of GELU.
fn erf(x: f32) -> f32 {
    let x64 = f64::from(x);
    let t = 1.0 / (1.0 + 0.327_591_1 * x64.abs());
    let poly = t
        * (0.254_829_592
            + t * (-0.284_496_736
                + t * (1.421_413_741 + t * (-1.453_152_027 + t * 1.061_405_429))));
    let y = 1.0 - poly * (-x64 * x64).exp();
    (if x64 >= 0.0 { y } else { -y }) as f32
}

fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

use crate::math::silu;

/// Softmax of `scores (rows, keys)` in place, each row `r` seeing keys `< visible(r)`; masked
/// entries become 0.
fn softmax_rows(scores: &mut [f32], keys: usize, visible: impl Fn(usize) -> usize) {
    for (r, row) in scores.chunks_mut(keys).enumerate() {
        let n = visible(r).min(keys);
        let (live, dead) = row.split_at_mut(n);
        dead.fill(0.0);
        let max = live.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        for s in live.iter_mut() {
            *s = crate::math::exp(*s - max);
        }
        let sum: f32 = live.iter().sum();
        let inv = if sum > 0.0 { 1.0 / sum } else { 0.0 };
        for s in live.iter_mut() {
            *s *= inv;
        }
    }
}

impl Cpu {
    /// One head of attention: `q` rows `(T, head_dim)` at column offset `q_off` of a
    /// `(T, q_stride)` matrix; keys/values `(L, head_dim)` contiguous. Query row `t` sees the
    /// first `visible(t)` keys, non-decreasing in `t` (causal masks and full attention both are).
    ///
    /// Query rows go in blocks of [`QUERY_BLOCK`]: each block multiplies only the keys its last
    /// row can see, so a causal prefill skips the masked upper triangle (half the FLOPs of
    /// `Q K^T` and `P V`), and the score buffer is `QUERY_BLOCK x L` instead of `T x L`.
    #[allow(clippy::too_many_arguments)]
    fn head(
        q: &[f32],
        q_off: usize,
        q_stride: usize,
        t: usize,
        k: &[f32],
        v: &[f32],
        l: usize,
        d: usize,
        scale: f32,
        visible: impl Fn(usize) -> usize,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0.0f32; t * d];
        let mut scores = vec![0.0f32; QUERY_BLOCK.min(t) * l];
        let mut r0 = 0;
        while r0 < t {
            let r1 = (r0 + QUERY_BLOCK).min(t);
            let nb = r1 - r0;
            let lk = visible(r1 - 1).min(l);
            let sc = &mut scores[..nb * lk];
            let ql = Layout {
                offset: q_off + r0 * q_stride,
                rows: nb,
                cols: d,
                row_stride: q_stride,
                col_stride: 1,
            };
            matmul(
                sc,
                Layout::row_major(0, nb, lk),
                q,
                ql,
                k,
                Layout::row_major(0, lk, d).t(),
                false,
            )?;
            for s in sc.iter_mut() {
                *s *= scale;
            }
            softmax_rows(sc, lk, |i| visible(r0 + i));
            matmul(
                &mut out,
                Layout::row_major(r0 * d, nb, d),
                sc,
                Layout::row_major(0, nb, lk),
                v,
                Layout::row_major(0, lk, d),
                false,
            )?;
            r0 = r1;
        }
        Ok(out)
    }

    fn check_attn(q: &CpuTensor, k: &CpuTensor, v: &CpuTensor, spec: AttnSpec) -> Result<()> {
        check_attn_dims((q.rows, q.cols), (k.rows, k.cols), (v.rows, v.cols), spec)
    }

    /// Runs every head in parallel over per-kv-head contiguous keys/values (`L` positions) and
    /// gathers the heads into `(T, heads * head_dim)`.
    fn all_heads(
        q: &CpuTensor,
        k_heads: &[f32],
        v_heads: &[f32],
        stride_per_kv_head: usize,
        l: usize,
        spec: AttnSpec,
        visible: impl Fn(usize) -> usize + Sync,
    ) -> Result<CpuTensor> {
        let (t, d) = (q.rows, spec.head_dim);
        let group = spec.heads / spec.kv_heads;
        let per_head: Vec<Result<Vec<f32>>> = (0..spec.heads)
            .into_par_iter()
            .map(|h| {
                let kvh = h / group;
                let base = kvh * stride_per_kv_head;
                Self::head(
                    &q.data,
                    h * d,
                    q.cols,
                    t,
                    &k_heads[base..base + l * d],
                    &v_heads[base..base + l * d],
                    l,
                    d,
                    spec.scale,
                    &visible,
                )
            })
            .collect();
        let mut out = vec![0.0f32; t * q.cols];
        for (h, res) in per_head.into_iter().enumerate() {
            let o = res?;
            for r in 0..t {
                out[r * q.cols + h * d..r * q.cols + (h + 1) * d]
                    .copy_from_slice(&o[r * d..(r + 1) * d]);
            }
        }
        CpuTensor::new(out, t, q.cols)
    }
}

/// Copies `x (T, kv_heads * d)` into per-head storage `dst[h][pos0 + t][:]`.
fn scatter_heads(
    dst: &mut [f32],
    x: &CpuTensor,
    kv_heads: usize,
    d: usize,
    capacity: usize,
    pos0: usize,
) {
    for t in 0..x.rows {
        for h in 0..kv_heads {
            let src = &x.data[t * x.cols + h * d..t * x.cols + (h + 1) * d];
            let at = (h * capacity + pos0 + t) * d;
            dst[at..at + d].copy_from_slice(src);
        }
    }
}

impl Backend for Cpu {
    type Tensor = CpuTensor;
    type Linear = blr_core::Linear;
    type KvCache = CpuKvCache;

    fn name(&self) -> String {
        format!("cpu (f32, {} threads)", rayon::current_num_threads())
    }

    fn upload(&self, data: &[f32], rows: usize, cols: usize) -> Result<CpuTensor> {
        CpuTensor::new(data.to_vec(), rows, cols)
    }

    fn download(&self, x: &CpuTensor) -> Result<Vec<f32>> {
        Ok(x.data.clone())
    }

    fn dims(&self, x: &CpuTensor) -> (usize, usize) {
        (x.rows, x.cols)
    }

    fn slice_rows(&self, x: &CpuTensor, start: usize, end: usize) -> Result<CpuTensor> {
        if start > end || end > x.rows {
            return Err(Error::input(
                "slice_rows",
                format!("rows {start}..{end} of a {}-row tensor", x.rows),
            ));
        }
        CpuTensor::new(
            x.data[start * x.cols..end * x.cols].to_vec(),
            end - start,
            x.cols,
        )
    }

    fn slice_cols(&self, x: &CpuTensor, start: usize, end: usize) -> Result<CpuTensor> {
        if start > end || end > x.cols {
            return Err(Error::input(
                "slice_cols",
                format!("columns {start}..{end} of a {}-column tensor", x.cols),
            ));
        }
        let mut out = Vec::with_capacity(x.rows * (end - start));
        for row in x.data.chunks(x.cols.max(1)) {
            out.extend_from_slice(&row[start..end]);
        }
        CpuTensor::new(out, x.rows, end - start)
    }

    fn load_linear(&self, layer: blr_core::Linear) -> Result<blr_core::Linear> {
        Ok(layer)
    }

    fn linear_dims(&self, layer: &blr_core::Linear) -> (usize, usize) {
        (layer.out_features(), layer.in_features())
    }

    fn linear(&self, layer: &blr_core::Linear, x: &CpuTensor) -> Result<CpuTensor> {
        let y = layer.forward(&x.data, x.rows)?;
        CpuTensor::new(y, x.rows, layer.out_features())
    }

    fn embedding(&self, table: &CpuTensor, ids: &[u32]) -> Result<CpuTensor> {
        let mut out = Vec::with_capacity(ids.len() * table.cols);
        for &id in ids {
            let r = id as usize;
            if r >= table.rows {
                return Err(Error::input(
                    "embedding",
                    format!("token id {id} is past the {}-row table", table.rows),
                ));
            }
            out.extend_from_slice(&table.data[r * table.cols..(r + 1) * table.cols]);
        }
        CpuTensor::new(out, ids.len(), table.cols)
    }

    fn rms_norm(&self, x: &CpuTensor, weight: &CpuTensor, eps: f32) -> Result<CpuTensor> {
        row_vector("rms_norm", x, weight)?;
        let mut out = x.clone();
        let w = &weight.data;
        for_rows(&mut out.data, x.cols, |row| {
            let ms = row.iter().map(|&v| v * v).sum::<f32>() / row.len() as f32;
            let inv = 1.0 / (ms + eps).sqrt();
            for (v, &g) in row.iter_mut().zip(w) {
                *v *= inv * g;
            }
        });
        Ok(out)
    }

    fn layer_norm(
        &self,
        x: &CpuTensor,
        weight: &CpuTensor,
        bias: &CpuTensor,
        eps: f32,
    ) -> Result<CpuTensor> {
        row_vector("layer_norm weight", x, weight)?;
        row_vector("layer_norm bias", x, bias)?;
        let mut out = x.clone();
        let (w, b) = (&weight.data, &bias.data);
        for_rows(&mut out.data, x.cols, |row| {
            let n = row.len() as f32;
            let mean = row.iter().sum::<f32>() / n;
            let var = row.iter().map(|&v| (v - mean) * (v - mean)).sum::<f32>() / n;
            let inv = 1.0 / (var + eps).sqrt();
            for ((v, &g), &bb) in row.iter_mut().zip(w).zip(b) {
                *v = (*v - mean) * inv * g + bb;
            }
        });
        Ok(out)
    }

    fn add_assign(&self, x: &mut CpuTensor, y: &CpuTensor) -> Result<()> {
        same_dims("add", x, y)?;
        for (a, &b) in x.data.iter_mut().zip(&y.data) {
            *a += b;
        }
        Ok(())
    }

    fn add_row(&self, x: &mut CpuTensor, row: &CpuTensor) -> Result<()> {
        row_vector("add_row", x, row)?;
        let r = &row.data;
        for_rows(&mut x.data, x.cols, |xr| {
            for (a, &b) in xr.iter_mut().zip(r) {
                *a += b;
            }
        });
        Ok(())
    }

    fn modulate(&self, x: &mut CpuTensor, shift: &CpuTensor, scale: &CpuTensor) -> Result<()> {
        row_vector("modulate shift", x, shift)?;
        row_vector("modulate scale", x, scale)?;
        let (sh, sc) = (&shift.data, &scale.data);
        for_rows(&mut x.data, x.cols, |row| {
            for ((v, &a), &b) in row.iter_mut().zip(sh).zip(sc) {
                *v = *v * (1.0 + b) + a;
            }
        });
        Ok(())
    }

    fn add_gated(&self, x: &mut CpuTensor, y: &CpuTensor, gate: &CpuTensor) -> Result<()> {
        same_dims("add_gated", x, y)?;
        row_vector("add_gated gate", x, gate)?;
        let cols = x.cols;
        for (xr, yr) in x
            .data
            .chunks_mut(cols.max(1))
            .zip(y.data.chunks(cols.max(1)))
        {
            for ((a, &b), &g) in xr.iter_mut().zip(yr).zip(&gate.data) {
                *a += g * b;
            }
        }
        Ok(())
    }

    fn silu_mul(&self, gate: &CpuTensor, up: &CpuTensor) -> Result<CpuTensor> {
        same_dims("silu_mul", gate, up)?;
        let mut out = gate.clone();
        let f = |(g, u): (&mut [f32], &[f32])| {
            for (g, &u) in g.iter_mut().zip(u) {
                *g = silu(*g) * u;
            }
        };
        // Chunks, not elements, per rayon task: per-element tasks cost more than the math.
        if out.data.len() >= PAR_MIN {
            out.data
                .par_chunks_mut(PAR_MIN / 4)
                .zip(up.data.par_chunks(PAR_MIN / 4))
                .for_each(f);
        } else {
            f((&mut out.data, &up.data));
        }
        Ok(out)
    }

    fn gelu(&self, x: &mut CpuTensor, tanh_approx: bool) -> Result<()> {
        let f = if tanh_approx { gelu_tanh } else { gelu_erf };
        for_rows(&mut x.data, x.cols, |row| {
            row.iter_mut().for_each(|v| *v = f(*v))
        });
        Ok(())
    }

    fn silu(&self, x: &mut CpuTensor) -> Result<()> {
        for_rows(&mut x.data, x.cols, |row| {
            row.iter_mut().for_each(|v| *v = silu(*v))
        });
        Ok(())
    }

    fn rope(&self, x: &mut CpuTensor, heads: usize, pos0: usize, inv_freq: &[f32]) -> Result<()> {
        let half = inv_freq.len();
        let d = 2 * half;
        if heads == 0 || x.cols != heads * d {
            return Err(Error::input(
                "rope",
                format!(
                    "{} columns are not {heads} heads of {d} (2 x {half} frequencies)",
                    x.cols
                ),
            ));
        }
        let cols = x.cols;
        // Angles in f64 so large positions keep their precision (pos * freq up to ~1e4 rad).
        let rotate = |t: usize, row: &mut [f32]| {
            let pos = (pos0 + t) as f64;
            let cs: Vec<(f32, f32)> = inv_freq
                .iter()
                .map(|&f| {
                    let a = pos * f64::from(f);
                    (a.cos() as f32, a.sin() as f32)
                })
                .collect();
            for h in 0..heads {
                let hd = &mut row[h * d..(h + 1) * d];
                let (lo, hi) = hd.split_at_mut(half);
                for ((a, b), &(c, s)) in lo.iter_mut().zip(hi.iter_mut()).zip(&cs) {
                    let (x0, x1) = (*a, *b);
                    *a = x0 * c - x1 * s;
                    *b = x0 * s + x1 * c;
                }
            }
        };
        if x.data.len() >= PAR_MIN {
            x.data
                .par_chunks_mut(cols)
                .enumerate()
                .for_each(|(t, row)| rotate(t, row));
        } else {
            x.data
                .chunks_mut(cols)
                .enumerate()
                .for_each(|(t, row)| rotate(t, row));
        }
        Ok(())
    }

    fn new_kv_cache(
        &self,
        kv_heads: usize,
        head_dim: usize,
        capacity: usize,
    ) -> Result<CpuKvCache> {
        let n = kv_heads
            .checked_mul(head_dim)
            .and_then(|x| x.checked_mul(capacity))
            .ok_or_else(|| Error::input("kv cache", "size overflows"))?;
        Ok(CpuKvCache {
            k: vec![0.0; n],
            v: vec![0.0; n],
            len: 0,
            capacity,
            kv_heads,
            head_dim,
        })
    }

    fn kv_len(&self, cache: &CpuKvCache) -> usize {
        cache.len
    }

    fn kv_clear(&self, cache: &mut CpuKvCache) {
        cache.len = 0;
    }

    fn attention_cached(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        cache: &mut CpuKvCache,
        spec: AttnSpec,
    ) -> Result<CpuTensor> {
        Self::check_attn(q, k, v, spec)?;
        let pos0 = check_cache(
            (cache.kv_heads, cache.head_dim),
            cache.len,
            cache.capacity,
            q.rows,
            spec,
        )?;
        let l = pos0 + q.rows;
        let d = spec.head_dim;
        scatter_heads(&mut cache.k, k, spec.kv_heads, d, cache.capacity, pos0);
        scatter_heads(&mut cache.v, v, spec.kv_heads, d, cache.capacity, pos0);
        cache.len = l;
        let causal = spec.causal;
        Self::all_heads(
            q,
            &cache.k,
            &cache.v,
            cache.capacity * d,
            l,
            spec,
            move |t| {
                if causal {
                    pos0 + t + 1
                } else {
                    l
                }
            },
        )
    }

    fn attention(
        &self,
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        spec: AttnSpec,
    ) -> Result<CpuTensor> {
        Self::check_attn(q, k, v, spec)?;
        let (t, d) = (q.rows, spec.head_dim);
        let mut kh = vec![0.0f32; k.data.len()];
        let mut vh = vec![0.0f32; v.data.len()];
        scatter_heads(&mut kh, k, spec.kv_heads, d, t, 0);
        scatter_heads(&mut vh, v, spec.kv_heads, d, t, 0);
        let causal = spec.causal;
        Self::all_heads(
            q,
            &kh,
            &vh,
            t * d,
            t,
            spec,
            move |r| if causal { r + 1 } else { t },
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blr_core::rng::Rng;

    fn rand(rng: &mut Rng, rows: usize, cols: usize) -> CpuTensor {
        CpuTensor::new(rng.normal_vec(rows * cols, 1.0), rows, cols).unwrap()
    }

    /// Attention straight from the definition, in f64.
    fn naive_attention(
        q: &CpuTensor,
        k: &CpuTensor,
        v: &CpuTensor,
        spec: AttnSpec,
        pos0: usize,
    ) -> Vec<f32> {
        let d = spec.head_dim;
        let group = spec.heads / spec.kv_heads;
        let mut out = vec![0.0f32; q.rows * q.cols];
        for h in 0..spec.heads {
            let kh = h / group;
            for t in 0..q.rows {
                let visible = if spec.causal { pos0 + t + 1 } else { k.rows };
                let s: Vec<f64> = (0..visible)
                    .map(|j| {
                        (0..d)
                            .map(|i| {
                                f64::from(q.data[t * q.cols + h * d + i])
                                    * f64::from(k.data[j * k.cols + kh * d + i])
                            })
                            .sum::<f64>()
                            * f64::from(spec.scale)
                    })
                    .collect();
                let max = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let e: Vec<f64> = s.iter().map(|x| (x - max).exp()).collect();
                let z: f64 = e.iter().sum();
                for i in 0..d {
                    let o: f64 = (0..visible)
                        .map(|j| e[j] / z * f64::from(v.data[j * v.cols + kh * d + i]))
                        .sum();
                    out[t * q.cols + h * d + i] = o as f32;
                }
            }
        }
        out
    }

    fn close(a: &[f32], b: &[f32], tol: f32) {
        assert_eq!(a.len(), b.len());
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!(
                (x - y).abs() <= tol * (1.0 + y.abs()),
                "index {i}: {x} vs {y}"
            );
        }
    }

    #[test]
    fn attention_matches_definition_gqa_and_causal() {
        let mut rng = Rng::new(11);
        for &(t, heads, kv, d, causal) in &[
            (1, 1, 1, 2, true),
            (7, 6, 2, 6, true),
            (13, 9, 3, 10, false),
            (150, 2, 1, 4, true),
            (130, 3, 3, 5, false),
            (5, 4, 4, 8, true),
        ] {
            let spec = AttnSpec::new(heads, kv, d, causal);
            let q = rand(&mut rng, t, heads * d);
            let k = rand(&mut rng, t, kv * d);
            let v = rand(&mut rng, t, kv * d);
            let got = Cpu.attention(&q, &k, &v, spec).unwrap();
            close(&got.data, &naive_attention(&q, &k, &v, spec, 0), 1e-4);
        }
    }

    #[test]
    fn cached_attention_in_pieces_equals_one_shot() {
        // Prefill 5 positions, then 1, then 3: each piece's output must equal the matching
        // rows of causal attention over all 9 at once.
        let mut rng = Rng::new(5);
        let (heads, kv, d) = (6, 3, 4);
        let spec = AttnSpec::new(heads, kv, d, true);
        let q = rand(&mut rng, 9, heads * d);
        let k = rand(&mut rng, 9, kv * d);
        let v = rand(&mut rng, 9, kv * d);
        let full = Cpu.attention(&q, &k, &v, spec).unwrap();
        let mut cache = Cpu.new_kv_cache(kv, d, 12).unwrap();
        let rows = |x: &CpuTensor, a: usize, b: usize| {
            CpuTensor::new(x.data[a * x.cols..b * x.cols].to_vec(), b - a, x.cols).unwrap()
        };
        for (a, b) in [(0, 5), (5, 6), (6, 9)] {
            let out = Cpu
                .attention_cached(
                    &rows(&q, a, b),
                    &rows(&k, a, b),
                    &rows(&v, a, b),
                    &mut cache,
                    spec,
                )
                .unwrap();
            close(&out.data, &full.data[a * q.cols..b * q.cols], 1e-5);
        }
        assert_eq!(Cpu.kv_len(&cache), 9);
        let e = Cpu
            .attention_cached(
                &rows(&q, 0, 4),
                &rows(&k, 0, 4),
                &rows(&v, 0, 4),
                &mut cache,
                spec,
            )
            .unwrap_err()
            .to_string();
        assert!(e.contains("capacity"), "{e}");
    }

    #[test]
    fn cached_prefill_longer_than_a_query_block_after_a_prefix() {
        // 10 cached positions, then 150 new ones (3 query blocks, the last partial).
        let mut rng = Rng::new(21);
        let (heads, kv, d) = (4, 2, 6);
        let spec = AttnSpec::new(heads, kv, d, true);
        let q = rand(&mut rng, 160, heads * d);
        let k = rand(&mut rng, 160, kv * d);
        let v = rand(&mut rng, 160, kv * d);
        let full = Cpu.attention(&q, &k, &v, spec).unwrap();
        let mut cache = Cpu.new_kv_cache(kv, d, 160).unwrap();
        let rows = |x: &CpuTensor, a: usize, b: usize| {
            CpuTensor::new(x.data[a * x.cols..b * x.cols].to_vec(), b - a, x.cols).unwrap()
        };
        Cpu.attention_cached(
            &rows(&q, 0, 10),
            &rows(&k, 0, 10),
            &rows(&v, 0, 10),
            &mut cache,
            spec,
        )
        .unwrap();
        let out = Cpu
            .attention_cached(
                &rows(&q, 10, 160),
                &rows(&k, 10, 160),
                &rows(&v, 10, 160),
                &mut cache,
                spec,
            )
            .unwrap();
        close(&out.data, &full.data[10 * q.cols..], 1e-5);
        close(&full.data, &naive_attention(&q, &k, &v, spec, 0), 1e-4);
    }

    #[test]
    fn norms_and_activations_by_hand() {
        let x = CpuTensor::new(vec![3.0, 4.0, 0.0, -2.0], 2, 2).unwrap();
        let w = CpuTensor::new(vec![1.0, 2.0], 1, 2).unwrap();
        // Row 0: rms = sqrt(12.5); row 1: rms = sqrt(2).
        let y = Cpu.rms_norm(&x, &w, 0.0).unwrap();
        close(
            &y.data,
            &[
                3.0 / 12.5f32.sqrt(),
                8.0 / 12.5f32.sqrt(),
                0.0,
                -4.0 / 2f32.sqrt(),
            ],
            1e-6,
        );
        let b = CpuTensor::new(vec![0.5, -0.5], 1, 2).unwrap();
        let y = Cpu.layer_norm(&x, &w, &b, 0.0).unwrap();
        close(&y.data, &[-0.5, 1.5, 1.5, -2.5], 1e-6);
        let mut g = CpuTensor::new(vec![0.0, 1.0, -1.0, 3.0], 1, 4).unwrap();
        Cpu.gelu(&mut g, false).unwrap();
        close(
            &g.data,
            &[0.0, 0.841_344_7, -0.158_655_26, 2.995_950_4],
            1e-6,
        );
        let mut g = CpuTensor::new(vec![0.0, 1.0, -1.0, 3.0], 1, 4).unwrap();
        Cpu.gelu(&mut g, true).unwrap();
        close(&g.data, &[0.0, 0.841_192, -0.158_808, 2.996_363_5], 1e-6);
        let s = Cpu
            .silu_mul(
                &CpuTensor::new(vec![0.0, 2.0], 1, 2).unwrap(),
                &CpuTensor::new(vec![5.0, 3.0], 1, 2).unwrap(),
            )
            .unwrap();
        close(&s.data, &[0.0, 3.0 * 2.0 / (1.0 + (-2.0f32).exp())], 1e-6);
    }

    #[test]
    fn rope_rotates_half_split_pairs() {
        // One head of 4 (two frequencies), position 3: pair (0, 2) turns by 3*f0, (1, 3) by 3*f1.
        let f = [0.5f32, 0.01];
        let mut x = CpuTensor::new(vec![1.0, 2.0, 3.0, 4.0], 1, 4).unwrap();
        Cpu.rope(&mut x, 1, 3, &f).unwrap();
        let (a0, a1) = (1.5f32, 0.03f32);
        let want = [
            a0.cos() - 3.0 * a0.sin(),
            2.0 * a1.cos() - 4.0 * a1.sin(),
            a0.sin() + 3.0 * a0.cos(),
            2.0 * a1.sin() + 4.0 * a1.cos(),
        ];
        close(&x.data, &want, 1e-6);
        // Relative property: q(m).k(n) depends only on m - n.
        let mut rng = Rng::new(2);
        let q = rng.normal_vec(8, 1.0);
        let k = rng.normal_vec(8, 1.0);
        let freqs = [1.0f32, 0.3, 0.05, 0.001];
        let dot_at = |m: usize, n: usize| {
            let mut qt = CpuTensor::new(q.clone(), 1, 8).unwrap();
            let mut kt = CpuTensor::new(k.clone(), 1, 8).unwrap();
            Cpu.rope(&mut qt, 1, m, &freqs).unwrap();
            Cpu.rope(&mut kt, 1, n, &freqs).unwrap();
            qt.data
                .iter()
                .zip(&kt.data)
                .map(|(a, b)| a * b)
                .sum::<f32>()
        };
        assert!((dot_at(10, 7) - dot_at(103, 100)).abs() < 1e-4);
    }

    #[test]
    fn shape_errors_name_the_op() {
        let x = CpuTensor::new(vec![0.0; 6], 2, 3).unwrap();
        let w = CpuTensor::new(vec![1.0; 2], 1, 2).unwrap();
        assert!(Cpu
            .rms_norm(&x, &w, 1e-5)
            .unwrap_err()
            .to_string()
            .contains("rms_norm"));
        let table = CpuTensor::new(vec![0.0; 6], 3, 2).unwrap();
        assert!(Cpu
            .embedding(&table, &[3])
            .unwrap_err()
            .to_string()
            .contains("token id 3"));
        assert!(CpuTensor::new(vec![0.0; 5], 2, 3).is_err());
    }
}
