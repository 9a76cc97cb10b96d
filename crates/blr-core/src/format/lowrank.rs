use super::{check_len, Dense, FormatKind, Shape};
use crate::gemm::{self, Layout};
use crate::Result;

/// Low-rank: `W = U V`, `u (m, r)`, `v (r, n)`. Params `r (m + n)`.
#[derive(Clone, Debug, PartialEq)]
pub struct LowRank {
    pub m: usize,
    pub n: usize,
    pub rank: usize,
    pub u: Vec<f32>,
    pub v: Vec<f32>,
}

impl LowRank {
    pub fn new(m: usize, n: usize, rank: usize, u: Vec<f32>, v: Vec<f32>) -> Result<Self> {
        let s = LowRank {
            m,
            n,
            rank,
            u: Vec::new(),
            v: Vec::new(),
        };
        s.shape().validate()?;
        check_len("lowrank", "u", &[m, rank], u.len())?;
        check_len("lowrank", "v", &[rank, n], v.len())?;
        Ok(LowRank { u, v, ..s })
    }

    pub fn shape(&self) -> Shape {
        Shape {
            format: FormatKind::LowRank,
            m: self.m,
            n: self.n,
            b_out: 1,
            b_in: 1,
            rank: self.rank,
        }
    }

    /// `Y = (X V^T) U^T`: two GEMMs through a (T, r) intermediate.
    pub(super) fn forward(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let z = gemm::linear(x, &self.v, tokens, self.rank, self.n)?;
        gemm::linear(&z, &self.u, tokens, self.m, self.rank)
    }

    pub(super) fn to_dense(&self) -> Result<Dense> {
        let mut w = vec![0.0f32; self.m * self.n];
        gemm::matmul(
            &mut w,
            Layout::row_major(0, self.m, self.n),
            &self.u,
            Layout::row_major(0, self.m, self.rank),
            &self.v,
            Layout::row_major(0, self.rank, self.n),
            false,
        )?;
        Dense::new(self.m, self.n, w)
    }
}
