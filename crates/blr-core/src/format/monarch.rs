use super::{check_len, Dense, FormatKind, Shape};
use crate::gemm::{self, Layout};
use crate::Result;
use rayon::prelude::*;

/// Monarch (Dao et al. 2022, in the generalised form of the public BLAST/fly code):
/// `b` blocks on each side, total rank `R`; `w1 (b, R, n/b)`, `w2 (b, m/b, R)`; params `R (m + n)`.
///
/// Forward for `X (T, n)` viewed `(T, b, n/b)`:
/// `out1[t, k, :] = w1[k] @ x[t, k, :]` -> `(T, b, R)`; flatten to `(T, b*R)`, view `(T, R, b)`,
/// transpose to `(T, b, R)` (the permutation P: `out1'[t, l, j] = out1_flat[t, j*b + l]`);
/// `out2[t, l, :] = w2[l] @ out1'[t, l, :]` -> `(T, b, m/b)`; output index `s*b + l`.
/// Seen as a `b x b` grid of `(m/b) x (n/b)` blocks (rows grouped by `o mod b`, columns by
/// `i div (n/b)`), each block has rank `R/b` when `b` divides `R`.
#[derive(Clone, Debug, PartialEq)]
pub struct Monarch {
    pub m: usize,
    pub n: usize,
    pub blocks: usize,
    pub rank: usize,
    pub w1: Vec<f32>,
    pub w2: Vec<f32>,
}

impl Monarch {
    pub fn new(
        m: usize,
        n: usize,
        blocks: usize,
        rank: usize,
        w1: Vec<f32>,
        w2: Vec<f32>,
    ) -> Result<Self> {
        let s = Monarch {
            m,
            n,
            blocks,
            rank,
            w1: Vec::new(),
            w2: Vec::new(),
        };
        s.shape().validate()?;
        check_len("monarch", "w1", &[blocks, rank, n / blocks], w1.len())?;
        check_len("monarch", "w2", &[blocks, m / blocks, rank], w2.len())?;
        Ok(Monarch { w1, w2, ..s })
    }

    pub fn shape(&self) -> Shape {
        Shape {
            format: FormatKind::Monarch,
            m: self.m,
            n: self.n,
            b_out: self.blocks,
            b_in: self.blocks,
            rank: self.rank,
        }
    }

    pub(super) fn forward(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let (b, r) = (self.blocks, self.rank);
        let (p, q) = (self.m / b, self.n / b);
        // Stage 1: out1 (T, b*R), block k in columns [k*R, (k+1)*R).
        let mut out1 = vec![0.0f32; tokens * b * r];
        for k in 0..b {
            gemm::matmul(
                &mut out1,
                Layout {
                    offset: k * r,
                    rows: tokens,
                    cols: r,
                    row_stride: b * r,
                    col_stride: 1,
                },
                x,
                Layout {
                    offset: k * q,
                    rows: tokens,
                    cols: q,
                    row_stride: self.n,
                    col_stride: 1,
                },
                &self.w1,
                Layout::row_major(k * r * q, r, q).t(),
                false,
            )?;
        }
        // Stage 2 reads the permuted view in place (column stride b, offset l) and writes the
        // output straight into its final order (column stride b, offset l): no permute copies.
        let mut y = vec![0.0f32; tokens * self.m];
        for l in 0..b {
            gemm::matmul(
                &mut y,
                Layout {
                    offset: l,
                    rows: tokens,
                    cols: p,
                    row_stride: self.m,
                    col_stride: b,
                },
                &out1,
                Layout {
                    offset: l,
                    rows: tokens,
                    cols: r,
                    row_stride: b * r,
                    col_stride: b,
                },
                &self.w2,
                Layout::row_major(l * p * r, p, r).t(),
                false,
            )?;
        }
        Ok(y)
    }

    /// `W[s*b + l, k*q + c] = sum over i with (k*R + i) mod b == l of
    /// w2[l][s, (k*R + i) div b] * w1[k][i, c]` — the block-grid definition, written out.
    pub(super) fn to_dense(&self) -> Result<Dense> {
        let (b, r) = (self.blocks, self.rank);
        let (p, q) = (self.m / b, self.n / b);
        let (m, n) = (self.m, self.n);
        let mut w = vec![0.0f32; m * n];
        // Parallel over output rows grouped by l: rows s*b + l for a fixed l are disjoint.
        let mut by_l: Vec<Vec<f32>> = vec![vec![0.0f32; p * n]; b];
        by_l.par_iter_mut().enumerate().for_each(|(l, rows)| {
            for k in 0..b {
                for i in 0..r {
                    let flat = k * r + i;
                    if flat % b != l {
                        continue;
                    }
                    let j = flat / b;
                    let w1_row = &self.w1[(k * r + i) * q..(k * r + i + 1) * q];
                    for s in 0..p {
                        let coef = self.w2[(l * p + s) * r + j];
                        let dst = &mut rows[s * n + k * q..s * n + (k + 1) * q];
                        for (d, &v) in dst.iter_mut().zip(w1_row) {
                            *d += coef * v;
                        }
                    }
                }
            }
        });
        for (l, rows) in by_l.iter().enumerate() {
            for s in 0..p {
                let o = s * b + l;
                w[o * n..(o + 1) * n].copy_from_slice(&rows[s * n..(s + 1) * n]);
            }
        }
        Dense::new(m, n, w)
    }
}
