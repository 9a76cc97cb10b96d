//! Monarch projection (BRIEF section 3) for rectangular `W (m, n)` and any `b` dividing both
//! dimensions, with `b | R`.
//!
//! Block grid (see `blr_core::format::Monarch`): output row `o = s*b + l` (`s < p = m/b`) and
//! input column `k*q + c` (`c < q = n/b`) put entry `(o, k*q + c)` in block `(l, k)`, of size
//! `p x q`. That block is `sum_{i ≡ l (mod b)} w2[l][:, (k R + i) div b] w1[k][i, :]`, a sum of
//! `t = R/b` rank-one terms with intermediate `i = l + b t'` landing at column
//! `j = k t + t'` of `w2[l]`. The `b^2` blocks have disjoint factors, so the Frobenius-optimal
//! Monarch approximation is a rank-`t` truncated SVD per block (Eckart-Young blockwise),
//! scattered back: `w1[k][l + b t', :] = sqrt(s_t') v_t'^T`, `w2[l][:, k t + t'] = u_t' sqrt(s_t')`.
//!
//! Calibrated ("best blockwise"): the loss `tr(E G' E^T)` separates over the `b` row groups
//! `l` (rows never interact through `G'`) but couples the `b` blocks of a row group through the
//! off-diagonal Gram blocks `G'_{k k'}`. Exact joint minimisation over all blocks of a row
//! group is not a low-rank problem. What is exact is the minimisation over one block with the
//! others fixed: writing `E_l = M_l - Ŵ_l` and `C = sum_{k' != k} E_{l k'} G'_{k' k}`, the loss
//! is `||(M_lk + C G'_kk^-1 - Ŵ_lk) L_k||_F^2 + const` with `G'_kk = L_k L_k^T`, solved by a
//! whitened truncated SVD. So we start from the block-diagonal-Gram solution (each block
//! whitened by its own `L_k`, exact when input groups are uncorrelated) and run `sweeps`
//! Gauss-Seidel passes of these exact block updates; the loss never increases.

use crate::error::{CompressError, Result};
use crate::linalg::{self, Truncated};
use crate::lowrank::tail_curve;
use crate::progress::Progress;
use crate::target::{Calibration, Target};
use blr_core::format::Shape;
use blr_core::{FormatKind, Linear, Monarch};
use faer::linalg::solvers::{Llt, Solve};
use faer::{Mat, MatRef};
use rayon::prelude::*;

/// Monarch projection settings.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MonarchOptions {
    /// Blocks per side `b` (must divide m, n and `rank`).
    pub blocks: usize,
    /// Total rank `R`; every block of the grid gets rank `R / b`.
    pub rank: usize,
    /// Gauss-Seidel sweeps of exact block updates for the calibrated variant (ignored
    /// data-free, where the blockwise SVD is already optimal).
    pub sweeps: usize,
}

impl MonarchOptions {
    pub fn new(blocks: usize, rank: usize) -> Self {
        MonarchOptions {
            blocks,
            rank,
            sweeps: 3,
        }
    }
}

fn check(target: &Target<'_>, opts: &MonarchOptions) -> Result<()> {
    let (b, r) = (opts.blocks, opts.rank);
    Shape {
        format: FormatKind::Monarch,
        m: target.m,
        n: target.n,
        b_out: b,
        b_in: b,
        rank: r,
    }
    .validate()
    .map_err(|e| CompressError::input(target.name, e.to_string()))?;
    if !r.is_multiple_of(b) {
        let lo = (r / b).max(1) * b;
        return Err(CompressError::input(
            target.name,
            format!(
                "Monarch projection needs the rank R = {r} to be a multiple of the block count \
                 b = {b} (each of the b x b blocks gets rank R/b); try R = {lo} or {}",
                lo + b
            ),
        ));
    }
    Ok(())
}

/// Projects `target` onto Monarch matrices with `opts.blocks` blocks and total rank
/// `opts.rank` (data-free when `calib` is `None`). Reports one progress step per row group.
pub fn monarch(
    target: &Target<'_>,
    opts: &MonarchOptions,
    calib: Option<&Calibration<'_>>,
    progress: &dyn Progress,
) -> Result<Linear> {
    check(target, opts)?;
    let (m, n, b, rr) = (target.m, target.n, opts.blocks, opts.rank);
    let (p, q, t) = (m / b, n / b, rr / b);
    let name = target.name;
    let weight = calib.map(|c| c.weight_for(target)).transpose()?;
    // Per input group k: the Cholesky factor of its diagonal Gram block G'_kk.
    let chols: Vec<Llt<f64>> = match &weight {
        Some(g) => (0..b)
            .map(|k| {
                linalg::damped_llt(
                    g.as_ref().submatrix(k * q, k * q, q, q),
                    0.0,
                    name,
                    "Cholesky of a calibration Gram block",
                )
            })
            .collect::<Result<_>>()?,
        None => Vec::new(),
    };
    progress.begin("monarch row groups", b);
    let done = std::sync::atomic::AtomicUsize::new(0);
    let groups: Vec<Vec<Truncated>> = (0..b)
        .into_par_iter()
        .map(|l| -> Result<Vec<Truncated>> {
            let rows = Mat::from_fn(p, n, |s, c| target.weight[(s * b + l) * n + c] as f64);
            let blocks = fit_row_group(
                rows.as_ref(),
                b,
                t,
                weight.as_ref(),
                &chols,
                opts.sweeps,
                name,
            )?;
            let finished = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            progress.advance(finished, None);
            Ok(blocks)
        })
        .collect::<Result<_>>()?;
    let mut w1 = vec![0.0f32; b * rr * q];
    let mut w2 = vec![0.0f32; b * p * rr];
    for (l, blocks) in groups.iter().enumerate() {
        for (k, f) in blocks.iter().enumerate() {
            for tt in 0..t {
                let i = l + b * tt;
                for c in 0..q {
                    w1[(k * rr + i) * q + c] = f.right[(tt, c)] as f32;
                }
                let j = k * t + tt;
                for s in 0..p {
                    w2[(l * p + s) * rr + j] = f.left[(s, tt)] as f32;
                }
            }
        }
    }
    Ok(Linear::Monarch(Monarch::new(m, n, b, rr, w1, w2)?))
}

/// Fits the `b` blocks `(l, 0..b)` of one row group `rows (p, n)`.
fn fit_row_group(
    rows: MatRef<'_, f64>,
    b: usize,
    t: usize,
    weight: Option<&Mat<f64>>,
    chols: &[Llt<f64>],
    sweeps: usize,
    name: &str,
) -> Result<Vec<Truncated>> {
    let (p, n) = (rows.nrows(), rows.ncols());
    let q = n / b;
    let block = |k: usize| rows.submatrix(0, k * q, p, q);
    let mut fits: Vec<Truncated> = (0..b)
        .map(|k| linalg::weighted_truncated_svd(block(k), chols.get(k).map(|c| c.L()), t, name))
        .collect::<Result<_>>()?;
    let Some(g) = weight else {
        return Ok(fits);
    };
    if b == 1 {
        return Ok(fits);
    }
    // Residual E_l = M_l - Ŵ_l, updated in place as blocks change.
    let mut resid = rows.to_owned();
    for (k, f) in fits.iter().enumerate() {
        let approx = linalg::mul64(f.left.as_ref(), f.right.as_ref());
        let mut dst = resid.as_mut().submatrix_mut(0, k * q, p, q);
        dst -= &approx;
    }
    for _ in 0..sweeps {
        for k in 0..b {
            // C = E_l G'[:, k] - E_lk G'_kk: the pull of the other blocks' residuals on block k.
            let mut c = linalg::mul64(resid.as_ref(), g.as_ref().submatrix(0, k * q, n, q));
            let own = linalg::mul64(
                resid.as_ref().submatrix(0, k * q, p, q),
                g.as_ref().submatrix(k * q, k * q, q, q),
            );
            c -= &own;
            // Shifted target M_lk + C G'_kk^-1 (G'_kk symmetric: solve G'_kk X^T = C^T).
            let shift = chols[k].solve(c.transpose()).transpose().to_owned();
            let shifted = block(k) + &shift;
            let fit =
                linalg::weighted_truncated_svd(shifted.as_ref(), Some(chols[k].L()), t, name)?;
            let approx = linalg::mul64(fit.left.as_ref(), fit.right.as_ref());
            let new_resid = block(k) - &approx;
            resid
                .as_mut()
                .submatrix_mut(0, k * q, p, q)
                .copy_from(&new_resid);
            fits[k] = fit;
        }
    }
    Ok(fits)
}

/// Squared relative error of the data-free (or block-diagonal-Gram) Monarch projection for
/// every per-block rank `t` in `0..=min(m/b, n/b)` (total rank `R = b t`): the sum over blocks
/// of their SVD tails. Entry `t` of the result is for `R = b * t`.
pub fn monarch_error_curve(
    target: &Target<'_>,
    blocks: usize,
    calib: Option<&Calibration<'_>>,
) -> Result<Vec<f64>> {
    check(target, &MonarchOptions::new(blocks, blocks))?;
    let (m, n, b) = (target.m, target.n, blocks);
    let (p, q) = (m / b, n / b);
    let weight = calib.map(|c| c.weight_for(target)).transpose()?;
    let mut sq_tails = vec![0.0f64; p.min(q) + 1];
    let mut total = 0.0;
    for l in 0..b {
        for k in 0..b {
            let mut blk = Mat::from_fn(p, q, |s, c| {
                target.weight[(s * b + l) * n + k * q + c] as f64
            });
            if let Some(g) = &weight {
                let llt = linalg::damped_llt(
                    g.as_ref().submatrix(k * q, k * q, q, q),
                    0.0,
                    target.name,
                    "Cholesky of a calibration Gram block",
                )?;
                blk = linalg::mul64(blk.as_ref(), llt.L());
            }
            let sigma = blk
                .singular_values()
                .map_err(|e| CompressError::numerical(target.name, "SVD", format!("{e:?}")))?;
            let block_total: f64 = sigma.iter().map(|s| s * s).sum();
            total += block_total;
            let curve = tail_curve(&sigma);
            for (acc, c) in sq_tails.iter_mut().zip(curve) {
                *acc += c * block_total;
            }
        }
    }
    if total > 0.0 {
        sq_tails.iter_mut().for_each(|v| *v /= total);
    }
    Ok(sq_tails)
}
