//! Output-side loss weights: minimise `||D^1/2 (W - Ŵ) X||_F` with `D = diag(d)`, `d` (m) one
//! positive weight per output channel.
//!
//! The calibrated fits weight the error by the input side only (the Gram of `X`): every output
//! channel counts the same. When the layer's output is consumed unevenly (a Llama up_proj is
//! multiplied elementwise by `silu(gate)`, a few channels of which are huge, before down_proj),
//! an error that is small in `||(W - Ŵ) X||` can be large where it matters. Weighting rows by
//! `d` fixes the objective, and it costs nothing structurally: for every format the output
//! rows of `Ŵ` are the rows of one factor (low-rank: `u`; BLAST: the rows of `U_i`; Monarch:
//! the rows of the second-stage blocks `w2[l]`), so with `Ŵ' ≈ D^1/2 W` fitted by any
//! (calibrated or data-free) algorithm, `D^-1/2 Ŵ'` has the same format and
//!
//! `||D^1/2 (W - D^-1/2 Ŵ') X|| = ||(D^1/2 W - Ŵ') X||`,
//!
//! so the scaled fit's optimum (exact for low-rank, the algorithm's own for the others) is the
//! weighted problem's. [`weighted_fit`] does the scaling and unscaling around any fit, which
//! also lets the GPU back ends run unchanged.

use crate::error::{CompressError, Result};
use crate::target::Target;
use blr_core::Linear;

/// Per-output-channel loss weights `d` (m), all finite and > 0.
#[derive(Clone, Debug, PartialEq)]
pub struct OutputWeights {
    d: Vec<f64>,
}

impl OutputWeights {
    /// Weights used as given; every entry must be finite and > 0.
    pub fn new(layer: &str, d: Vec<f64>) -> Result<Self> {
        if d.is_empty() {
            return Err(CompressError::input(layer, "output weights: none given"));
        }
        if let Some(c) = d.iter().position(|v| !(v.is_finite() && *v > 0.0)) {
            return Err(CompressError::input(
                layer,
                format!(
                    "output weight of channel {c} is {}: weights must be finite and > 0",
                    d[c]
                ),
            ));
        }
        Ok(OutputWeights { d })
    }

    /// From raw per-channel statistics (e.g. `E[silu(g_c)^2]`, >= 0): `d_c = max(raw_c, floor *
    /// mean(raw))^alpha`, then scaled to mean 1. `alpha` in `[0, 1]` smooths the weights
    /// (`0` = all equal, the unweighted fit); `floor` > 0 keeps channels whose statistic is
    /// ~0 from being unscaled by a huge factor.
    pub fn from_statistics(layer: &str, raw: &[f64], alpha: f64, floor: f64) -> Result<Self> {
        if !(alpha.is_finite() && alpha >= 0.0) {
            return Err(CompressError::input(
                layer,
                format!("output-weight exponent must be finite and >= 0, got {alpha}"),
            ));
        }
        if !(floor.is_finite() && floor > 0.0) {
            return Err(CompressError::input(
                layer,
                format!("output-weight floor must be finite and > 0, got {floor}"),
            ));
        }
        if let Some(c) = raw.iter().position(|v| !(v.is_finite() && *v >= 0.0)) {
            return Err(CompressError::input(
                layer,
                format!(
                    "output statistic of channel {c} is {}: expected a finite value >= 0",
                    raw[c]
                ),
            ));
        }
        let mean = raw.iter().sum::<f64>() / raw.len().max(1) as f64;
        if mean <= 0.0 {
            // No signal at all: every channel counts the same.
            return OutputWeights::new(layer, vec![1.0; raw.len()]);
        }
        let lo = floor * mean;
        let mut d: Vec<f64> = raw.iter().map(|&v| v.max(lo).powf(alpha)).collect();
        let dm = d.iter().sum::<f64>() / d.len() as f64;
        d.iter_mut().for_each(|v| *v /= dm);
        OutputWeights::new(layer, d)
    }

    /// The weights `d`.
    pub fn values(&self) -> &[f64] {
        &self.d
    }

    fn check(&self, layer: &str, m: usize) -> Result<()> {
        if self.d.len() != m {
            return Err(CompressError::input(
                layer,
                format!(
                    "{} output weights for a layer with m = {m} outputs",
                    self.d.len()
                ),
            ));
        }
        Ok(())
    }

    /// `D^1/2 W`: row `o` of the target times `sqrt(d_o)`.
    pub fn scale_rows(&self, target: &Target<'_>) -> Result<Vec<f32>> {
        self.check(target.name, target.m)?;
        let n = target.n;
        let mut out = target.weight.to_vec();
        for (row, &d) in out.chunks_mut(n).zip(&self.d) {
            let s = d.sqrt();
            row.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
        }
        Ok(out)
    }

    /// `D^-1/2 Ŵ'` in the format of `layer`: divides the factor holding output row `o` by
    /// `sqrt(d_o)`.
    pub fn unscale(&self, layer_name: &str, layer: Linear) -> Result<Linear> {
        let m = layer.out_features();
        self.check(layer_name, m)?;
        let inv: Vec<f64> = self.d.iter().map(|d| 1.0 / d.sqrt()).collect();
        let scale_row =
            |row: &mut [f32], s: f64| row.iter_mut().for_each(|v| *v = (*v as f64 * s) as f32);
        Ok(match layer {
            Linear::Dense(mut l) => {
                for (row, &s) in l.weight.chunks_mut(l.n).zip(&inv) {
                    scale_row(row, s);
                }
                Linear::Dense(l)
            }
            Linear::LowRank(mut l) => {
                for (row, &s) in l.u.chunks_mut(l.rank).zip(&inv) {
                    scale_row(row, s);
                }
                Linear::LowRank(l)
            }
            // u (b_out, p, r): row i * p + a is output i * p + a.
            Linear::Blast(mut l) => {
                for (row, &s) in l.u.chunks_mut(l.rank).zip(&inv) {
                    scale_row(row, s);
                }
                Linear::Blast(l)
            }
            // w2 (b, m/b, R): row s of block l is output s * b + l.
            Linear::Monarch(mut l) => {
                let (b, r) = (l.blocks, l.rank);
                let rows = m / b;
                for (k, row) in l.w2.chunks_mut(r).enumerate() {
                    let (blk, s) = (k / rows, k % rows);
                    scale_row(row, inv[s * b + blk]);
                }
                Linear::Monarch(l)
            }
        })
    }
}

/// Runs `fit` on `D^1/2 W` (or on `W` when `weights` is `None`) and maps its result back, so
/// the result minimises `||D^1/2 (W - Ŵ) X||` in the fit's own sense (see the module docs).
/// Also returns what `fit` returned besides the layer (e.g. a report of the scaled fit).
pub fn weighted_fit<T, E: From<CompressError>>(
    target: &Target<'_>,
    weights: Option<&OutputWeights>,
    fit: impl FnOnce(&Target<'_>) -> std::result::Result<(Linear, T), E>,
) -> std::result::Result<(Linear, T), E> {
    let Some(w) = weights else {
        return fit(target);
    };
    let scaled = w.scale_rows(target)?;
    let t = Target::new(target.name, target.m, target.n, &scaled)?;
    let (layer, extra) = fit(&t)?;
    Ok((w.unscale(target.name, layer)?, extra))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{blast, lowrank, monarch, BlastOptions, Calibration, Gram, MonarchOptions, Silent};
    use blr_core::format::Shape;
    use blr_core::rng::Rng;
    use blr_core::FormatKind;

    /// `||D^1/2 (W - Ŵ) X||_F^2` directly from the activations.
    fn weighted_loss(w: &[f32], approx: &Linear, d: &[f64], x: &[f32], tokens: usize) -> f64 {
        let (m, n) = (approx.out_features(), approx.in_features());
        let dense = Linear::Dense(blr_core::Dense::new(m, n, w.to_vec()).unwrap());
        let y = dense.forward(x, tokens).unwrap();
        let y_hat = approx.forward(x, tokens).unwrap();
        y.chunks(m)
            .zip(y_hat.chunks(m))
            .map(|(a, b)| {
                (0..m)
                    .map(|o| d[o] * (a[o] as f64 - b[o] as f64).powi(2))
                    .sum::<f64>()
            })
            .sum()
    }

    /// Correlated activations with a decaying spectrum.
    fn activations(rng: &mut Rng, n: usize, tokens: usize) -> Vec<f32> {
        let mix = rng.normal_vec(n * n, 1.0);
        let mut x = vec![0.0f32; tokens * n];
        for t in 0..tokens {
            let z: Vec<f64> = (0..n)
                .map(|k| rng.normal() * 10f64.powf(-1.5 * k as f64 / n as f64))
                .collect();
            for i in 0..n {
                x[t * n + i] = (0..n).map(|k| mix[i * n + k] as f64 * z[k]).sum::<f64>() as f32;
            }
        }
        x
    }

    /// Heavy-tailed weights: a few channels 100x the others, as silu(gate) gives up_proj.
    fn spiky(rng: &mut Rng, m: usize) -> Vec<f64> {
        (0..m)
            .map(|o| {
                let base = 0.5 + rng.normal().abs();
                if o % 7 == 3 {
                    100.0 * base
                } else {
                    base
                }
            })
            .collect()
    }

    fn fit(
        format: FormatKind,
        t: &Target<'_>,
        calib: &Calibration<'_>,
        ow: Option<&OutputWeights>,
    ) -> Linear {
        weighted_fit(t, ow, |t: &Target<'_>| -> Result<(Linear, ())> {
            let layer = match format {
                FormatKind::LowRank => lowrank(t, 6, Some(calib))?,
                FormatKind::Monarch => {
                    monarch(t, &MonarchOptions::new(4, 8), Some(calib), &Silent)?
                }
                _ => {
                    let o = BlastOptions {
                        iterations: 40,
                        b_in: 3,
                        ..BlastOptions::new(4, 5)
                    };
                    blast(t, &o, Some(calib), &Silent)?
                }
            };
            Ok((layer, ()))
        })
        .unwrap()
        .0
    }

    /// On a random problem with spiky output weights, the weighted fit has a lower weighted
    /// loss than the unweighted fit (every format, well below: the weights are far from
    /// uniform), and with d = 1 it is the unweighted fit exactly.
    #[test]
    fn weighted_fit_lowers_the_weighted_loss_and_is_the_plain_fit_at_d_1() {
        let mut rng = Rng::new(11);
        let (m, n, tokens) = (36, 48, 300);
        let w = rng.normal_vec(m * n, 1.0);
        let t = Target::new("w", m, n, &w).unwrap();
        let x = activations(&mut rng, n, tokens);
        let mut gram = Gram::new(n);
        gram.accumulate(&x, tokens).unwrap();
        let calib = Calibration::new(&gram);
        let d = spiky(&mut rng, m);
        let ow = OutputWeights::new("w", d.clone()).unwrap();
        let ones = OutputWeights::new("w", vec![1.0; m]).unwrap();
        for format in [FormatKind::LowRank, FormatKind::Monarch, FormatKind::Blast] {
            let plain = fit(format, &t, &calib, None);
            let weighted = fit(format, &t, &calib, Some(&ow));
            assert_eq!(weighted.shape(), plain.shape(), "{format}");
            let (lp, lw) = (
                weighted_loss(&w, &plain, &d, &x, tokens),
                weighted_loss(&w, &weighted, &d, &x, tokens),
            );
            assert!(lw < 0.8 * lp, "{format}: weighted {lw} vs plain {lp}");
            // The unweighted loss moves the other way: the weights traded it away.
            let one = vec![1.0; m];
            assert!(
                weighted_loss(&w, &weighted, &one, &x, tokens)
                    > weighted_loss(&w, &plain, &one, &x, tokens),
                "{format}"
            );
            let same = fit(format, &t, &calib, Some(&ones));
            assert_eq!(same, plain, "{format}: d = 1 must give the plain fit");
        }
    }

    /// Unscaling divides output row o of the dense product by sqrt(d_o), for every format and
    /// block grid (rectangular, b_out != b_in for BLAST).
    #[test]
    fn unscale_divides_the_output_rows_in_every_format() {
        let mut rng = Rng::new(5);
        let shapes = [
            (FormatKind::Dense, 15, 21, 1, 1, 0),
            (FormatKind::LowRank, 15, 21, 1, 1, 4),
            (FormatKind::Monarch, 15, 21, 3, 3, 6),
            (FormatKind::Blast, 15, 21, 5, 3, 4),
            (FormatKind::Blast, 24, 12, 2, 4, 3),
        ];
        for (format, m, n, b_out, b_in, rank) in shapes {
            let shape = Shape {
                format,
                m,
                n,
                b_out,
                b_in,
                rank,
            };
            let layer = if format == FormatKind::Dense {
                Linear::Dense(blr_core::Dense::new(m, n, rng.normal_vec(m * n, 1.0)).unwrap())
            } else {
                Linear::random(&shape, rng.next_u64()).unwrap()
            };
            let shape = layer.shape();
            let before = layer.to_dense().unwrap().weight;
            let d: Vec<f64> = (0..m).map(|_| 0.1 + 4.0 * rng.normal().abs()).collect();
            let ow = OutputWeights::new("l", d.clone()).unwrap();
            let after = ow.unscale("l", layer).unwrap();
            assert_eq!(after.shape(), shape);
            let after = after.to_dense().unwrap().weight;
            for o in 0..m {
                for k in 0..n {
                    let want = before[o * n + k] as f64 / d[o].sqrt();
                    let got = after[o * n + k] as f64;
                    assert!(
                        (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{format} ({o}, {k}): {got} vs {want}"
                    );
                }
            }
            // scale_rows then unscale of a dense layer is the identity.
            let t = Target::new("l", m, n, &before).unwrap();
            let scaled = ow.scale_rows(&t).unwrap();
            let back = ow
                .unscale(
                    "l",
                    Linear::Dense(blr_core::Dense::new(m, n, scaled).unwrap()),
                )
                .unwrap()
                .to_dense()
                .unwrap()
                .weight;
            for (a, b) in back.iter().zip(&before) {
                assert!((a - b).abs() < 1e-5 * (1.0 + b.abs()), "{format}");
            }
        }
    }

    #[test]
    fn weights_are_validated_and_normalised() {
        assert!(OutputWeights::new("l", vec![1.0, 0.0]).is_err());
        assert!(OutputWeights::new("l", vec![1.0, f64::NAN]).is_err());
        assert!(OutputWeights::new("l", vec![]).is_err());
        assert!(OutputWeights::from_statistics("l", &[1.0, -1.0], 1.0, 1e-3).is_err());
        assert!(OutputWeights::from_statistics("l", &[1.0, 2.0], -1.0, 1e-3).is_err());
        assert!(OutputWeights::from_statistics("l", &[1.0, 2.0], 1.0, 0.0).is_err());
        // Floor at 1e-3 of the mean, exponent, mean 1.
        let w = OutputWeights::from_statistics("l", &[0.0, 1.0, 3.0], 0.5, 1e-3).unwrap();
        let raw = [(1e-3f64 * 4.0 / 3.0).sqrt(), 1.0, 3f64.sqrt()];
        let mean = raw.iter().sum::<f64>() / 3.0;
        for (a, r) in w.values().iter().zip(raw) {
            assert!((a - r / mean).abs() < 1e-12, "{a} vs {}", r / mean);
        }
        // All zero: unweighted; alpha 0: unweighted.
        let z = OutputWeights::from_statistics("l", &[0.0, 0.0], 1.0, 1e-3).unwrap();
        assert_eq!(z.values(), &[1.0, 1.0]);
        let a0 = OutputWeights::from_statistics("l", &[5.0, 1.0], 0.0, 1e-3).unwrap();
        assert_eq!(a0.values(), &[1.0, 1.0]);
        // Wrong length for the layer.
        let t = Target::new("l", 3, 1, &[1.0, 2.0, 3.0]).unwrap();
        assert!(z.scale_rows(&t).is_err());
    }
}
