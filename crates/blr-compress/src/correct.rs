//! Error-propagation correction for sequential calibration.
//!
//! When the layers of a model are compressed one after the other, layer `l` no longer sees the
//! dense model's activations `X` but those of the partly compressed model, `X'`. What matters
//! is that its output stays close to the dense one: minimise `||W X - Ŵ X'||_F`. With
//! `G' = X' X'^T` and the cross statistic `C = X X'^T`, the unconstrained minimiser is
//! `W~ = W C G'^-1`, and for every `Ŵ`
//!
//! ```text
//! ||W X - Ŵ X'||^2 = ||W X - W~ X'||^2 + ||(W~ - Ŵ) X'||^2
//! ```
//!
//! (the least-squares residual is orthogonal to the row space of `X'`). So the constrained
//! problem is the ordinary calibrated factorization of the corrected target `W~` under the Gram
//! `G'`: any of the calibrated algorithms applies unchanged. `G'` gets the same relative ridge
//! as the factorizations (`damping` times its mean eigenvalue), which keeps `W~` bounded when
//! `X'` is rank-deficient and pulls it towards `W` when the calibration text is short.

use crate::error::{CompressError, Result};
use crate::gram::{check_activations, checked_sum, Gram};
use crate::linalg;
use faer::Mat;

/// Tokens per accumulation chunk (bounds the f64 copies to 2 * 2048 * n doubles).
const CHUNK_TOKENS: usize = 2048;

/// A streaming accumulator of `C = sum_t x_t x'_t^T` over pairs of activation rows: `x_t` as
/// the dense model produces it, `x'_t` as the partly compressed model does.
#[derive(Clone, Debug)]
pub struct CrossGram {
    n: usize,
    sum: Mat<f64>,
    tokens: u64,
}

impl CrossGram {
    /// An empty accumulator for `n` input features.
    pub fn new(n: usize) -> Self {
        CrossGram {
            n,
            sum: Mat::zeros(n, n),
            tokens: 0,
        }
    }

    /// Input features.
    pub fn dim(&self) -> usize {
        self.n
    }

    /// A cross statistic from an accumulated sum `X X'^T` (row-major `(n, n)`, f64: entry
    /// `(i, j)` = `sum_t x_t[i] x'_t[j]`, dense rows first) over `tokens` row pairs, e.g. summed
    /// on the GPU (`blr_cuda::gram`); it must be finite.
    pub fn from_sum(n: usize, sum: &[f64], tokens: u64, source_name: &str) -> Result<Self> {
        Ok(CrossGram {
            n,
            sum: checked_sum(n, sum, source_name)?,
            tokens,
        })
    }

    /// Entry `(i, j)` of the accumulated sum.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.sum[(i, j)]
    }

    /// Token pairs accumulated so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Adds `tokens` row pairs, both row-major `(tokens, n)`: `dense` from the reference model,
    /// `compressed` from the model being compressed, same tokens in the same order.
    pub fn accumulate(&mut self, dense: &[f32], compressed: &[f32], tokens: usize) -> Result<()> {
        let n = self.n;
        check_activations(dense, tokens, n, "cross accumulate", "dense activation")?;
        check_activations(
            compressed,
            tokens,
            n,
            "cross accumulate",
            "compressed activation",
        )?;
        for start in (0..tokens).step_by(CHUNK_TOKENS) {
            let rows = CHUNK_TOKENS.min(tokens - start);
            let d = linalg::to_f64(&dense[start * n..(start + rows) * n], rows, n);
            let c = linalg::to_f64(&compressed[start * n..(start + rows) * n], rows, n);
            linalg::gemm64(self.sum.as_mut(), true, d.transpose(), c.as_ref());
        }
        self.tokens += tokens as u64;
        Ok(())
    }
}

/// The corrected target `W~ = W (C + λ I)(G' + λ I)^-1` (row-major `(m, n)`), with
/// `λ = damping * tr(G') / n`: the minimiser of `||W X - W~ X'||^2 + λ ||W~ - W||^2`, a ridge
/// that pulls the correction towards `W` (never towards zero), so a large `λ` gives back plain
/// sequential calibration and a small one the full least-squares correction. The correction
/// has `n` free coefficients per output, estimated from the calibration tokens: with few tokens
/// per feature it overfits them, which the ridge controls. `gram` is `G'`, the Gram of the
/// compressed model's activations, accumulated over the same tokens as `cross`.
pub fn corrected_target(
    layer: &str,
    weight: &[f32],
    m: usize,
    n: usize,
    cross: &CrossGram,
    gram: &Gram,
    damping: f64,
) -> Result<Vec<f32>> {
    if weight.len() != m * n {
        return Err(CompressError::input(
            layer,
            format!(
                "weight holds {} values, expected m * n = {m} * {n}",
                weight.len()
            ),
        ));
    }
    if cross.dim() != n || gram.dim() != n {
        return Err(CompressError::input(
            layer,
            format!(
                "cross statistic is {0} x {0} and Gram {1} x {1}, but the layer has n = {n} inputs",
                cross.dim(),
                gram.dim()
            ),
        ));
    }
    if cross.tokens() != gram.tokens() {
        return Err(CompressError::input(
            layer,
            format!(
                "cross statistic has {} tokens but the Gram {}: accumulate both over the same tokens",
                cross.tokens(),
                gram.tokens()
            ),
        ));
    }
    if !(damping >= 0.0 && damping.is_finite()) {
        return Err(CompressError::input(
            layer,
            format!("calibration damping must be a finite value >= 0, got {damping}"),
        ));
    }
    let g = Mat::from_fn(n, n, |i, j| 0.5 * (gram.get(i, j) + gram.get(j, i)));
    let trace: f64 = (0..n).map(|i| g[(i, i)]).sum();
    if !(trace > 0.0 && trace.is_finite()) {
        return Err(CompressError::Gram {
            source_name: format!("for layer '{layer}'"),
            detail: format!("trace is {trace}: no activation energy to correct against"),
        });
    }
    let w = linalg::to_f64(weight, m, n);
    let lambda = damping * trace / n as f64;
    // (G' + λI) W~^T = (C + λI)^T W^T.
    let mut ct = cross.sum.transpose().to_owned();
    for i in 0..n {
        ct[(i, i)] += lambda;
    }
    let rhs = linalg::mul64(ct.as_ref(), w.transpose());
    let sol = linalg::spd_solve(
        g.as_ref(),
        lambda,
        rhs.as_ref(),
        layer,
        "error-propagation correction",
    )?;
    Ok(linalg::to_row_major(sol.transpose()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use blr_core::rng::Rng;

    fn matmul_rows(w: &[f32], m: usize, n: usize, x: &[f32], t: usize) -> Vec<f64> {
        // Y (t, m) = X (t, n) W^T
        let mut y = vec![0.0f64; t * m];
        for r in 0..t {
            for i in 0..m {
                y[r * m + i] = (0..n)
                    .map(|k| x[r * n + k] as f64 * w[i * n + k] as f64)
                    .sum();
            }
        }
        y
    }

    fn err(a: &[f64], b: &[f64]) -> f64 {
        a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum::<f64>()
    }

    /// W~ minimises ||W X - Ŵ X'|| over all Ŵ: it beats W itself and any perturbation of it.
    #[test]
    fn corrected_target_is_the_least_squares_optimum() {
        let (m, n, t) = (7, 11, 53);
        let mut rng = Rng::new(3);
        let w = rng.normal_vec(m * n, 1.0);
        let x = rng.normal_vec(t * n, 1.0);
        // X' = X plus a structured distortion (what upstream compression does).
        let noise = rng.normal_vec(t * n, 0.3);
        let xc: Vec<f32> = x
            .iter()
            .zip(&noise)
            .enumerate()
            .map(|(i, (a, e))| 0.8 * a + e + if i % n == 2 { 0.5 } else { 0.0 })
            .collect();
        let mut g = Gram::new(n);
        g.accumulate(&xc, t).unwrap();
        let mut c = CrossGram::new(n);
        c.accumulate(&x, &xc, t).unwrap();
        let wt = corrected_target("l", &w, m, n, &c, &g, 0.0).unwrap();

        let y = matmul_rows(&w, m, n, &x, t);
        let e_opt = err(&y, &matmul_rows(&wt, m, n, &xc, t));
        let e_plain = err(&y, &matmul_rows(&w, m, n, &xc, t));
        assert!(e_opt < 0.9 * e_plain, "{e_opt} vs {e_plain}");
        for trial in 0..5 {
            let d = Rng::new(100 + trial).normal_vec(m * n, 1e-2);
            let p: Vec<f32> = wt.iter().zip(&d).map(|(a, b)| a + b).collect();
            let e = err(&y, &matmul_rows(&p, m, n, &xc, t));
            assert!(e > e_opt, "perturbation {trial} improved: {e} < {e_opt}");
        }
    }

    /// With identical streams the correction is the identity (up to the ridge).
    #[test]
    fn no_distortion_means_no_correction() {
        let (m, n, t) = (5, 9, 40);
        let mut rng = Rng::new(8);
        let w = rng.normal_vec(m * n, 1.0);
        let x = rng.normal_vec(t * n, 1.0);
        let mut g = Gram::new(n);
        g.accumulate(&x, t).unwrap();
        let mut c = CrossGram::new(n);
        c.accumulate(&x, &x, t).unwrap();
        let wt = corrected_target("l", &w, m, n, &c, &g, 0.0).unwrap();
        for (a, b) in w.iter().zip(&wt) {
            assert!((a - b).abs() < 1e-4, "{a} vs {b}");
        }
    }

    /// The ridge pulls towards W: a huge damping gives W back.
    #[test]
    fn large_ridge_gives_back_the_weight() {
        let (m, n, t) = (4, 6, 30);
        let mut rng = Rng::new(5);
        let w = rng.normal_vec(m * n, 1.0);
        let x = rng.normal_vec(t * n, 1.0);
        let xc = rng.normal_vec(t * n, 1.0);
        let mut g = Gram::new(n);
        g.accumulate(&xc, t).unwrap();
        let mut c = CrossGram::new(n);
        c.accumulate(&x, &xc, t).unwrap();
        let wt = corrected_target("l", &w, m, n, &c, &g, 1e9).unwrap();
        for (a, b) in w.iter().zip(&wt) {
            assert!((a - b).abs() < 1e-5, "{a} vs {b}");
        }
        let wt = corrected_target("l", &w, m, n, &c, &g, 0.0).unwrap();
        assert!(w.iter().zip(&wt).any(|(a, b)| (a - b).abs() > 1e-2));
    }

    /// `from_sum` keeps a host-accumulated sum exactly and refuses bad sums.
    #[test]
    fn from_sum_round_trips_and_refuses_bad_sums() {
        let (n, t) = (5, 9);
        let mut rng = Rng::new(4);
        let (x, xc) = (rng.normal_vec(t * n, 1.0), rng.normal_vec(t * n, 1.0));
        let mut c = CrossGram::new(n);
        c.accumulate(&x, &xc, t).unwrap();
        let flat: Vec<f64> = (0..n * n).map(|k| c.get(k / n, k % n)).collect();
        let back = CrossGram::from_sum(n, &flat, c.tokens(), "test").unwrap();
        assert_eq!(back.tokens(), t as u64);
        assert!((0..n * n).all(|k| back.get(k / n, k % n) == flat[k]));
        assert!(
            (c.get(0, 1) - c.get(1, 0)).abs() > 1e-9,
            "not symmetric in general"
        );
        let mut g = Gram::new(n);
        g.accumulate(&xc, t).unwrap();
        let gflat: Vec<f64> = (0..n * n).map(|k| g.get(k / n, k % n)).collect();
        let gb = Gram::from_sum(n, &gflat, g.tokens(), "test").unwrap();
        assert!((0..n * n).all(|k| gb.get(k / n, k % n) == gflat[k]));
        assert!(CrossGram::from_sum(n, &flat[1..], 1, "test").is_err());
        let mut nan = gflat.clone();
        nan[7] = f64::NAN;
        let e = Gram::from_sum(n, &nan, 1, "gpu gram").unwrap_err();
        assert!(e.to_string().contains("(1, 2)"), "{e}");
        let mut neg = gflat;
        neg[0] = -1.0;
        assert!(Gram::from_sum(n, &neg, 1, "test").is_err());
    }

    #[test]
    fn mismatched_inputs_are_refused() {
        let mut g = Gram::new(4);
        g.accumulate(&[1.0; 8], 2).unwrap();
        let mut c = CrossGram::new(4);
        assert!(c.accumulate(&[1.0; 8], &[1.0; 4], 2).is_err());
        assert!(c.accumulate(&[f32::NAN; 8], &[1.0; 8], 2).is_err());
        c.accumulate(&[1.0; 4], &[1.0; 4], 1).unwrap();
        let e = corrected_target("l", &[0.0; 8], 2, 4, &c, &g, 0.01).unwrap_err();
        assert!(e.to_string().contains("same tokens"), "{e}");
        let e = corrected_target("l", &[0.0; 7], 2, 4, &c, &g, 0.01).unwrap_err();
        assert!(e.to_string().contains("expected m * n"), "{e}");
    }
}
