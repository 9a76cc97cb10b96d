use super::{check_len, Dense, FormatKind, Shape};
use crate::gemm::{self, Layout};
use crate::{Error, Result};
use rayon::prelude::*;

/// BLAST (Lee et al., NeurIPS 2024): `W` split into `b_out x b_in` blocks of size `p x q`,
/// `W_ij = U_i diag(s_ij) V_j^T`; `u (b_out, p, r)`, `vt (b_in, r, q)` (that is `V_j^T`),
/// `s (b_out, b_in, r)`. Params `r (m + n + b_out b_in)`.
///
/// Forward in three stages: `Z_j = X_j V_j` (b_in GEMMs, K = q), `W_i = sum_j s_ij ⊙ Z_j`
/// (mixing per rank index), `Y_i = W_i U_i^T` (b_out GEMMs, K = r).
#[derive(Clone, Debug, PartialEq)]
pub struct Blast {
    pub m: usize,
    pub n: usize,
    pub b_out: usize,
    pub b_in: usize,
    pub rank: usize,
    pub u: Vec<f32>,
    pub vt: Vec<f32>,
    pub s: Vec<f32>,
}

impl Blast {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        m: usize,
        n: usize,
        b_out: usize,
        b_in: usize,
        rank: usize,
        u: Vec<f32>,
        vt: Vec<f32>,
        s: Vec<f32>,
    ) -> Result<Self> {
        let layer = Blast {
            m,
            n,
            b_out,
            b_in,
            rank,
            u: Vec::new(),
            vt: Vec::new(),
            s: Vec::new(),
        };
        layer.shape().validate()?;
        check_len("blast", "u", &[b_out, m / b_out, rank], u.len())?;
        check_len("blast", "vt", &[b_in, rank, n / b_in], vt.len())?;
        check_len("blast", "s", &[b_out, b_in, rank], s.len())?;
        Ok(Blast { u, vt, s, ..layer })
    }

    pub fn shape(&self) -> Shape {
        Shape {
            format: FormatKind::Blast,
            m: self.m,
            n: self.n,
            b_out: self.b_out,
            b_in: self.b_in,
            rank: self.rank,
        }
    }

    pub fn block_rows(&self) -> usize {
        self.m / self.b_out
    }

    pub fn block_cols(&self) -> usize {
        self.n / self.b_in
    }

    pub(super) fn forward(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let (r, p, q) = (self.rank, self.block_rows(), self.block_cols());
        // Stage 1: Z (b_in, T, r).
        let mut z = vec![0.0f32; self.b_in * tokens * r];
        z.par_chunks_mut(tokens * r)
            .enumerate()
            .try_for_each(|(j, zj)| {
                gemm::matmul(
                    zj,
                    Layout::row_major(0, tokens, r),
                    x,
                    Layout {
                        offset: j * q,
                        rows: tokens,
                        cols: q,
                        row_stride: self.n,
                        col_stride: 1,
                    },
                    &self.vt,
                    Layout::row_major(j * r * q, r, q).t(),
                    false,
                )
            })?;
        // Stages 2 + 3 per output block row i, written into disjoint column ranges of Y.
        let outputs: Vec<Vec<f32>> = (0..self.b_out)
            .into_par_iter()
            .map(|i| -> Result<Vec<f32>> {
                let mut wi = vec![0.0f32; tokens * r];
                for j in 0..self.b_in {
                    let sij = &self.s[(i * self.b_in + j) * r..(i * self.b_in + j + 1) * r];
                    let zj = &z[j * tokens * r..(j + 1) * tokens * r];
                    for (w_row, z_row) in wi.chunks_mut(r).zip(zj.chunks(r)) {
                        for ((w, &zz), &s) in w_row.iter_mut().zip(z_row).zip(sij) {
                            *w += s * zz;
                        }
                    }
                }
                let mut yi = vec![0.0f32; tokens * p];
                gemm::matmul(
                    &mut yi,
                    Layout::row_major(0, tokens, p),
                    &wi,
                    Layout::row_major(0, tokens, r),
                    &self.u,
                    Layout::row_major(i * p * r, p, r).t(),
                    false,
                )?;
                Ok(yi)
            })
            .collect::<Result<_>>()?;
        let mut y = vec![0.0f32; tokens * self.m];
        for (i, yi) in outputs.iter().enumerate() {
            for t in 0..tokens {
                y[t * self.m + i * p..t * self.m + (i + 1) * p]
                    .copy_from_slice(&yi[t * p..(t + 1) * p]);
            }
        }
        Ok(y)
    }

    /// `W_ij = U_i diag(s_ij) V_j^T`, block by block.
    pub(super) fn to_dense(&self) -> Result<Dense> {
        let (r, p, q) = (self.rank, self.block_rows(), self.block_cols());
        let (m, n) = (self.m, self.n);
        let mut w = vec![0.0f32; m * n];
        // One block-row of W (p rows, all n columns) per task: disjoint writes.
        w.par_chunks_mut(p * n)
            .enumerate()
            .try_for_each(|(i, rows)| {
                let ui = &self.u[i * p * r..(i + 1) * p * r];
                let mut scaled = vec![0.0f32; p * r];
                for j in 0..self.b_in {
                    let sij = &self.s[(i * self.b_in + j) * r..(i * self.b_in + j + 1) * r];
                    for (dst, src) in scaled.chunks_mut(r).zip(ui.chunks(r)) {
                        for ((d, &u), &s) in dst.iter_mut().zip(src).zip(sij) {
                            *d = u * s;
                        }
                    }
                    gemm::matmul(
                        rows,
                        Layout {
                            offset: j * q,
                            rows: p,
                            cols: q,
                            row_stride: n,
                            col_stride: 1,
                        },
                        &scaled,
                        Layout::row_major(0, p, r),
                        &self.vt,
                        Layout::row_major(j * r * q, r, q),
                        false,
                    )?;
                }
                Ok::<(), Error>(())
            })?;
        Dense::new(m, n, w)
    }
}
