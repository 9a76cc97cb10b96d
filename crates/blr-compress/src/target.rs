//! What every factorization takes: the matrix (with a name for error messages) and, for the
//! calibrated variants, the activation Gram.

use crate::error::{CompressError, Result};
use crate::gram::Gram;
use crate::linalg;
use blr_core::Linear;
use faer::Mat;

/// A dense weight `W (m, n)`, row-major (PyTorch `nn.Linear.weight` layout), named so errors
/// can say which layer they are about.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub name: &'a str,
    pub m: usize,
    pub n: usize,
    pub weight: &'a [f32],
}

impl<'a> Target<'a> {
    /// Checks the size and that every value is finite.
    pub fn new(name: &'a str, m: usize, n: usize, weight: &'a [f32]) -> Result<Self> {
        if m == 0 || n == 0 {
            return Err(CompressError::input(
                name,
                format!("dimensions must be >= 1, got {m} x {n}"),
            ));
        }
        if weight.len() != m * n {
            return Err(CompressError::input(
                name,
                format!(
                    "weight holds {} values, expected m * n = {m} * {n} = {}",
                    weight.len(),
                    m * n
                ),
            ));
        }
        if let Some(pos) = weight.iter().position(|v| !v.is_finite()) {
            return Err(CompressError::input(
                name,
                format!(
                    "weight ({}, {}) is {}: factorize finite weights only",
                    pos / n,
                    pos % n,
                    weight[pos]
                ),
            ));
        }
        Ok(Target { name, m, n, weight })
    }

    pub(crate) fn to_f64(self) -> Mat<f64> {
        linalg::to_f64(self.weight, self.m, self.n)
    }
}

/// Calibration for the activation-aware variants: minimise `||(W - Ŵ) X||_F` where
/// `gram = X X^T` over the layer's input activations.
#[derive(Clone, Copy, Debug)]
pub struct Calibration<'a> {
    pub gram: &'a Gram,
    /// Ridge added to the unit-mean-eigenvalue Gram (see `Gram::weight`); 0.01 by default.
    pub damping: f64,
}

impl<'a> Calibration<'a> {
    pub const DEFAULT_DAMPING: f64 = 0.01;

    pub fn new(gram: &'a Gram) -> Self {
        Calibration {
            gram,
            damping: Self::DEFAULT_DAMPING,
        }
    }

    /// The normalised, damped weight for `target`, after checking the dimensions agree.
    pub(crate) fn weight_for(&self, target: &Target<'_>) -> Result<Mat<f64>> {
        if self.gram.dim() != target.n {
            return Err(CompressError::input(
                target.name,
                format!(
                    "calibration Gram is {0} x {0} but the layer has n = {1} inputs: \
                     collect the Gram from this layer's inputs",
                    self.gram.dim(),
                    target.n
                ),
            ));
        }
        self.gram.weight(self.damping, target.name)
    }

    /// The loss weight `G'` the calibrated algorithms minimise against (the unit-mean-
    /// eigenvalue Gram plus `damping * I`, see `Gram::weight`) for `target`, as n x n f32 values
    /// (symmetric, so row- and column-major alike), after the same checks as the CPU path: for
    /// back ends that run the calibrated iterations elsewhere (the GPU path in `blr-cuda`).
    pub fn weight_f32(&self, target: &Target<'_>) -> Result<Vec<f32>> {
        let g = self.weight_for(target)?;
        Ok(linalg::to_row_major(g.as_ref()))
    }
}

/// `||W - Ŵ||_F / ||W||_F`, or with a Gram `sqrt(tr(E G E^T) / tr(W G W^T))`, i.e.
/// `||(W - Ŵ) X||_F / ||W X||_F` over the calibration activations (raw Gram, no damping).
pub fn relative_error(target: &Target<'_>, approx: &Linear, gram: Option<&Gram>) -> Result<f64> {
    if approx.out_features() != target.m || approx.in_features() != target.n {
        return Err(CompressError::input(
            target.name,
            format!(
                "approximation is {} x {} but the weight is {} x {}",
                approx.out_features(),
                approx.in_features(),
                target.m,
                target.n
            ),
        ));
    }
    let dense = approx.to_dense()?;
    let (m, n) = (target.m, target.n);
    match gram {
        None => {
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (&w, &a) in target.weight.iter().zip(&dense.weight) {
                num += (w as f64 - a as f64).powi(2);
                den += (w as f64).powi(2);
            }
            Ok(if den > 0.0 {
                (num / den).sqrt()
            } else {
                num.sqrt()
            })
        }
        Some(g) => {
            if g.dim() != n {
                return Err(CompressError::input(
                    target.name,
                    format!(
                        "Gram is {0} x {0} but the layer has n = {n} inputs",
                        g.dim()
                    ),
                ));
            }
            let w = target.to_f64();
            let e = Mat::from_fn(m, n, |i, j| w[(i, j)] - dense.weight[i * n + j] as f64);
            let gm = Mat::from_fn(n, n, |i, j| g.get(i, j));
            let eg = linalg::mul64(e.as_ref(), gm.as_ref());
            let wg = linalg::mul64(w.as_ref(), gm.as_ref());
            let num = linalg::dot64(eg.as_ref(), e.as_ref()).max(0.0);
            let den = linalg::dot64(wg.as_ref(), w.as_ref());
            Ok(if den > 0.0 {
                (num / den).sqrt()
            } else {
                num.sqrt()
            })
        }
    }
}
