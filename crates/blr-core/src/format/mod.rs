//! The four linear-layer formats of ../shared/BRIEF.md section 2, with validation, parameter
//! counts, the CPU reference forward `Y (T, m) = X (T, n) W^T`, `to_dense` and random init.
//!
//! Factors are f32, row-major, in the canonical layouts of the brief (and of the public
//! reference code), so that checkpoints and GPU uploads have one source of truth:
//! - [`Dense`]: `weight (m, n)`;
//! - [`LowRank`]: `u (m, r)`, `v (r, n)`;
//! - [`Monarch`]: `w1 (b, R, n/b)`, `w2 (b, m/b, R)`;
//! - [`Blast`]: `u (b_out, p, r)`, `vt (b_in, r, q)`, `s (b_out, b_in, r)`.

mod blast;
mod dense;
mod lowrank;
mod monarch;

pub use blast::Blast;
pub use dense::Dense;
pub use lowrank::LowRank;
pub use monarch::Monarch;

use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Which format a layer is stored in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FormatKind {
    Dense,
    LowRank,
    Monarch,
    Blast,
}

impl FormatKind {
    pub const ALL: [FormatKind; 4] = [
        FormatKind::Dense,
        FormatKind::LowRank,
        FormatKind::Monarch,
        FormatKind::Blast,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FormatKind::Dense => "dense",
            FormatKind::LowRank => "lowrank",
            FormatKind::Monarch => "monarch",
            FormatKind::Blast => "blast",
        }
    }
}

impl fmt::Display for FormatKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FormatKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "dense" => Ok(FormatKind::Dense),
            "lowrank" | "low-rank" | "lr" => Ok(FormatKind::LowRank),
            "monarch" => Ok(FormatKind::Monarch),
            "blast" => Ok(FormatKind::Blast),
            _ => Err(Error::Unknown {
                what: "format",
                got: s.to_string(),
                expected: "dense, lowrank, monarch, blast",
            }),
        }
    }
}

/// The structural hyper-parameters of a layer: everything but the factor values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub format: FormatKind,
    /// Output features.
    pub m: usize,
    /// Input features.
    pub n: usize,
    /// Blocks along the outputs (1 for dense and low-rank).
    pub b_out: usize,
    /// Blocks along the inputs (1 for dense and low-rank; equal to `b_out` for Monarch).
    pub b_in: usize,
    /// Rank: `r` for low-rank and BLAST, the total rank `R` for Monarch, `min(m, n)` for dense.
    pub rank: usize,
}

impl Shape {
    /// Parameters this shape stores, per the formulas of BRIEF section 2.
    pub fn params(&self) -> usize {
        let (m, n, r) = (self.m, self.n, self.rank);
        match self.format {
            FormatKind::Dense => m * n,
            FormatKind::LowRank | FormatKind::Monarch => r * (m + n),
            FormatKind::Blast => r * (m + n + self.b_out * self.b_in),
        }
    }

    /// Validates the shape the way the constructors do, without any factor data.
    pub fn validate(&self) -> Result<()> {
        let name = match self.format {
            FormatKind::Dense => "dense",
            FormatKind::LowRank => "lowrank",
            FormatKind::Monarch => "monarch",
            FormatKind::Blast => "blast",
        };
        if self.m == 0 || self.n == 0 {
            return Err(Error::config(
                name,
                format!("dimensions must be >= 1, got m={} n={}", self.m, self.n),
            ));
        }
        if self.b_out == 0 || self.b_in == 0 {
            return Err(Error::config(name, "block counts must be >= 1"));
        }
        if !self.m.is_multiple_of(self.b_out) {
            return Err(Error::config(
                name,
                format!(
                    "{} output blocks do not divide m={} (choose a block count that divides it)",
                    self.b_out, self.m
                ),
            ));
        }
        if !self.n.is_multiple_of(self.b_in) {
            return Err(Error::config(
                name,
                format!(
                    "{} input blocks do not divide n={} (choose a block count that divides it)",
                    self.b_in, self.n
                ),
            ));
        }
        if self.rank == 0 {
            return Err(Error::config(name, "rank must be >= 1"));
        }
        match self.format {
            FormatKind::Dense if self.b_out != 1 || self.b_in != 1 => {
                Err(Error::config(name, "dense layers have a single block"))
            }
            FormatKind::LowRank if self.b_out != 1 || self.b_in != 1 => Err(Error::config(
                name,
                "low-rank layers have a single block (use blast for blocks)",
            )),
            FormatKind::Monarch if self.b_out != self.b_in => Err(Error::config(
                name,
                format!(
                    "Monarch uses the same block count on both sides, got b_out={} b_in={}",
                    self.b_out, self.b_in
                ),
            )),
            _ => Ok(()),
        }
    }
}

/// A linear layer in any of the four formats.
#[derive(Clone, Debug, PartialEq)]
pub enum Linear {
    Dense(Dense),
    LowRank(LowRank),
    Monarch(Monarch),
    Blast(Blast),
}

impl Linear {
    pub fn shape(&self) -> Shape {
        match self {
            Linear::Dense(l) => l.shape(),
            Linear::LowRank(l) => l.shape(),
            Linear::Monarch(l) => l.shape(),
            Linear::Blast(l) => l.shape(),
        }
    }

    pub fn kind(&self) -> FormatKind {
        self.shape().format
    }

    pub fn out_features(&self) -> usize {
        self.shape().m
    }

    pub fn in_features(&self) -> usize {
        self.shape().n
    }

    pub fn params(&self) -> usize {
        self.shape().params()
    }

    /// `Y (tokens, m) = X (tokens, n) W^T`: the CPU reference every backend is checked against.
    pub fn forward(&self, x: &[f32], tokens: usize) -> Result<Vec<f32>> {
        let s = self.shape();
        if x.len() != tokens * s.n {
            return Err(Error::shape(
                format!("{} forward input", s.format),
                format!("tokens * n = {tokens} * {} = {}", s.n, tokens * s.n),
                x.len(),
            ));
        }
        match self {
            Linear::Dense(l) => l.forward(x, tokens),
            Linear::LowRank(l) => l.forward(x, tokens),
            Linear::Monarch(l) => l.forward(x, tokens),
            Linear::Blast(l) => l.forward(x, tokens),
        }
    }

    /// The dense matrix this layer represents, computed from the factors by the format's own
    /// definition (not through `forward`, so the two can check each other).
    pub fn to_dense(&self) -> Result<Dense> {
        match self {
            Linear::Dense(l) => Ok(l.clone()),
            Linear::LowRank(l) => l.to_dense(),
            Linear::Monarch(l) => l.to_dense(),
            Linear::Blast(l) => l.to_dense(),
        }
    }

    /// Named factor tensors with their shapes, in checkpoint order.
    pub fn factors(&self) -> Vec<(&'static str, Vec<usize>, &[f32])> {
        match self {
            Linear::Dense(l) => vec![("weight", vec![l.m, l.n], &l.weight[..])],
            Linear::LowRank(l) => vec![
                ("u", vec![l.m, l.rank], &l.u[..]),
                ("v", vec![l.rank, l.n], &l.v[..]),
            ],
            Linear::Monarch(l) => {
                let (b, r) = (l.blocks, l.rank);
                vec![
                    ("w1", vec![b, r, l.n / b], &l.w1[..]),
                    ("w2", vec![b, l.m / b, r], &l.w2[..]),
                ]
            }
            Linear::Blast(l) => {
                let (p, q) = (l.m / l.b_out, l.n / l.b_in);
                vec![
                    ("u", vec![l.b_out, p, l.rank], &l.u[..]),
                    ("vt", vec![l.b_in, l.rank, q], &l.vt[..]),
                    ("s", vec![l.b_out, l.b_in, l.rank], &l.s[..]),
                ]
            }
        }
    }

    /// The factor names and shapes a layer of this shape stores (what a loader must find).
    pub fn factor_shapes(shape: &Shape) -> Vec<(&'static str, Vec<usize>)> {
        let Shape {
            m,
            n,
            b_out,
            b_in,
            rank: r,
            ..
        } = *shape;
        match shape.format {
            FormatKind::Dense => vec![("weight", vec![m, n])],
            FormatKind::LowRank => vec![("u", vec![m, r]), ("v", vec![r, n])],
            FormatKind::Monarch => vec![
                ("w1", vec![b_in, r, n / b_in]),
                ("w2", vec![b_out, m / b_out, r]),
            ],
            FormatKind::Blast => vec![
                ("u", vec![b_out, m / b_out, r]),
                ("vt", vec![b_in, r, n / b_in]),
                ("s", vec![b_out, b_in, r]),
            ],
        }
    }

    /// Builds a layer from its shape and factors given in [`Linear::factor_shapes`] order.
    pub fn from_factors(shape: &Shape, mut factors: Vec<Vec<f32>>) -> Result<Linear> {
        shape.validate()?;
        let expected = Self::factor_shapes(shape).len();
        if factors.len() != expected {
            return Err(Error::shape(
                format!("{} factor list", shape.format),
                expected,
                factors.len(),
            ));
        }
        let mut take = || factors.remove(0);
        let Shape {
            m,
            n,
            b_out,
            b_in,
            rank,
            ..
        } = *shape;
        Ok(match shape.format {
            FormatKind::Dense => Linear::Dense(Dense::new(m, n, take())?),
            FormatKind::LowRank => {
                let u = take();
                let v = take();
                Linear::LowRank(LowRank::new(m, n, rank, u, v)?)
            }
            FormatKind::Monarch => {
                let w1 = take();
                let w2 = take();
                Linear::Monarch(Monarch::new(m, n, b_out, rank, w1, w2)?)
            }
            FormatKind::Blast => {
                let u = take();
                let vt = take();
                let s = take();
                Linear::Blast(Blast::new(m, n, b_out, b_in, rank, u, vt, s)?)
            }
        })
    }

    /// A layer of random factors, scaled so that output variance matches input variance
    /// (each stage's std is 1/sqrt(fan-in)), seeded for reproducibility.
    pub fn random(shape: &Shape, seed: u64) -> Result<Linear> {
        shape.validate()?;
        let mut rng = crate::rng::Rng::new(seed);
        let Shape {
            m,
            n,
            b_out,
            b_in,
            rank: r,
            ..
        } = *shape;
        let inv_sqrt = |k: usize| 1.0 / (k as f32).sqrt();
        let factors = match shape.format {
            FormatKind::Dense => vec![rng.normal_vec(m * n, inv_sqrt(n))],
            FormatKind::LowRank => vec![
                rng.normal_vec(m * r, inv_sqrt(r)),
                rng.normal_vec(r * n, inv_sqrt(n)),
            ],
            FormatKind::Monarch => {
                // Stage 1 reads n/b inputs per block, stage 2 mixes R intermediates.
                vec![
                    rng.normal_vec(r * n, inv_sqrt(n / b_in)),
                    rng.normal_vec(m * r, inv_sqrt(r)),
                ]
            }
            FormatKind::Blast => vec![
                rng.normal_vec(m * r, inv_sqrt(r)),
                rng.normal_vec(r * n, inv_sqrt(n / b_in)),
                rng.normal_vec(b_out * b_in * r, inv_sqrt(b_in)),
            ],
        };
        Self::from_factors(shape, factors)
    }
}

/// Checks that a factor has the number of elements its shape requires.
pub(crate) fn check_len(
    format: &'static str,
    name: &str,
    dims: &[usize],
    got: usize,
) -> Result<()> {
    let want: usize = dims.iter().product();
    if want != got {
        return Err(Error::config(
            format,
            format!("factor '{name}' of shape {dims:?} needs {want} elements, got {got}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
