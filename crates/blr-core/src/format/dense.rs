use super::{check_len, FormatKind, Shape};
use crate::gemm;
use crate::Result;

/// A dense layer: `weight (m, n)`, row-major (PyTorch `nn.Linear.weight` layout).
#[derive(Clone, Debug, PartialEq)]
pub struct Dense {
    pub m: usize,
    pub n: usize,
    pub weight: Vec<f32>,
}

impl Dense {
    pub fn new(m: usize, n: usize, weight: Vec<f32>) -> Result<Self> {
        let shape = Shape {
            format: FormatKind::Dense,
            m,
            n,
            b_out: 1,
            b_in: 1,
            rank: m.min(n).max(1),
        };
        shape.validate()?;
        check_len("dense", "weight", &[m, n], weight.len())?;
        Ok(Dense { m, n, weight })
    }

    pub fn shape(&self) -> Shape {
        Shape {
            format: FormatKind::Dense,
            m: self.m,
            n: self.n,
            b_out: 1,
            b_in: 1,
            rank: self.m.min(self.n),
        }
    }

    pub(super) fn forward(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        gemm::linear(x, &self.weight, tokens, self.m, self.n)
    }
}
