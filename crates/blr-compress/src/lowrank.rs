//! Low-rank: `W ≈ U V`, `u (m, r)`, `v (r, n)`, by truncated SVD (Eckart-Young), factors
//! balanced as `U_r sqrt(S_r)` and `sqrt(S_r) V_r^T` so neither factor carries all the scale
//! (which matters once they are stored in bf16).
//!
//! Calibrated: minimise `||(W - UV) X||_F`. With `G' = L L^T` (Cholesky of the damped Gram,
//! see `Gram::weight`) the loss is `||(W - UV) L||_F`, so the truncated SVD of `W L` mapped
//! back by `L^-1` is optimal (the whitened SVD of SVD-LLM).

use crate::error::{CompressError, Result};
use crate::linalg;
use crate::target::{Calibration, Target};
use blr_core::format::Shape;
use blr_core::{FormatKind, Linear, LowRank};

/// Factorizes `target` to rank `rank` (data-free when `calib` is `None`).
pub fn lowrank(
    target: &Target<'_>,
    rank: usize,
    calib: Option<&Calibration<'_>>,
) -> Result<Linear> {
    Ok(lowrank_and_curve(target, rank, calib)?.0)
}

/// [`lowrank`] at `rank` and [`lowrank_error_curve`] of the same target, from one SVD (the
/// rank allocation's sensitivity probes need both).
pub fn lowrank_and_curve(
    target: &Target<'_>,
    rank: usize,
    calib: Option<&Calibration<'_>>,
) -> Result<(Linear, Vec<f64>)> {
    let (m, n) = (target.m, target.n);
    Shape {
        format: FormatKind::LowRank,
        m,
        n,
        b_out: 1,
        b_in: 1,
        rank,
    }
    .validate()
    .map_err(|e| CompressError::input(target.name, e.to_string()))?;
    let w = target.to_f64();
    let t = match calib {
        Some(c) => {
            let g = c.weight_for(target)?;
            let llt = linalg::damped_llt(
                g.as_ref(),
                0.0,
                target.name,
                "Cholesky of the calibration Gram",
            )?;
            linalg::weighted_truncated_svd(w.as_ref(), Some(llt.L()), rank, target.name)?
        }
        None => linalg::weighted_truncated_svd(w.as_ref(), None, rank, target.name)?,
    };
    let layer = LowRank::new(
        m,
        n,
        rank,
        linalg::to_row_major(t.left.as_ref()),
        linalg::to_row_major(t.right.as_ref()),
    )?;
    Ok((Linear::LowRank(layer), tail_curve(&t.sigma)))
}

/// The squared relative error of the optimal rank-`r` approximation for every `r` in
/// `0..=min(m, n)` (entry `r`), from one SVD: `sum_{k >= r} s_k^2 / sum_k s_k^2`. With a
/// calibration it is measured in the damped-Gram norm that the calibrated factorization
/// minimises. This is the error-vs-rank curve the global allocator consumes.
pub fn lowrank_error_curve(
    target: &Target<'_>,
    calib: Option<&Calibration<'_>>,
) -> Result<Vec<f64>> {
    let w = target.to_f64();
    let sigma = match calib {
        Some(c) => {
            let g = c.weight_for(target)?;
            let llt = linalg::damped_llt(
                g.as_ref(),
                0.0,
                target.name,
                "Cholesky of the calibration Gram",
            )?;
            let b = linalg::mul64(w.as_ref(), llt.L());
            b.singular_values()
                .map_err(|e| CompressError::numerical(target.name, "SVD", format!("{e:?}")))?
        }
        None => w
            .singular_values()
            .map_err(|e| CompressError::numerical(target.name, "SVD", format!("{e:?}")))?,
    };
    Ok(tail_curve(&sigma))
}

/// `out[r] = sum_{k >= r} s_k^2 / sum_k s_k^2` for `r` in `0..=len`.
pub(crate) fn tail_curve(sigma: &[f64]) -> Vec<f64> {
    let total: f64 = sigma.iter().map(|s| s * s).sum();
    let mut out = vec![0.0; sigma.len() + 1];
    let mut tail = 0.0;
    for r in (0..sigma.len()).rev() {
        tail += sigma[r] * sigma[r];
        out[r] = if total > 0.0 { tail / total } else { 0.0 };
    }
    out
}
