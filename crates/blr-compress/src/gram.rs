//! Calibration statistics: the Gram matrix `G = X X^T` of a layer's input activations.
//!
//! Minimising `||(W - Ŵ) X||_F^2 = tr((W - Ŵ) G (W - Ŵ)^T)` needs only `G` (n x n), never the
//! activations themselves, so calibration memory is `n^2` doubles whatever the token count:
//! tokens are streamed through [`Gram::accumulate`] in chunks and forgotten. Sums are kept in
//! f64 because a Gram over millions of tokens adds ~1e6 terms per entry.
//!
//! On disk a Gram is a safetensors file with one tensor `gram` of shape (n, n) and metadata
//! `blr.gram.tokens`; [`Gram::load`] also accepts a file holding raw activations as a tensor
//! `activations` of shape (T, n), accumulated on load.

use crate::error::{CompressError, Result};
use crate::linalg;
use blr_core::safetensors::{self, Dtype, SafeTensors, TensorToWrite};
use faer::Mat;
use std::collections::BTreeMap;
use std::path::Path;

/// Tokens per accumulation chunk: bounds the f64 copy of the activations to 2048 * n doubles.
const CHUNK_TOKENS: usize = 2048;

/// Checks that `x` holds `tokens` finite rows of `n` features (`what`: which activations, for
/// the message; `source`: the operation).
pub(crate) fn check_activations(
    x: &[f32],
    tokens: usize,
    n: usize,
    source: &str,
    what: &str,
) -> Result<()> {
    if x.len() != tokens * n {
        return Err(CompressError::Gram {
            source_name: source.into(),
            detail: format!(
                "{what} rows hold {} values, expected tokens * n = {tokens} * {n}",
                x.len()
            ),
        });
    }
    if let Some(pos) = x.iter().position(|v| !v.is_finite()) {
        return Err(CompressError::Gram {
            source_name: source.into(),
            detail: format!(
                "{what} value at token {}, feature {} is {} (NaN/inf)",
                pos / n,
                pos % n,
                x[pos]
            ),
        });
    }
    Ok(())
}

/// An `(n, n)` row-major f64 sum as a matrix, checking its length and that it is finite.
pub(crate) fn checked_sum(n: usize, sum: &[f64], source_name: &str) -> Result<Mat<f64>> {
    let bad = |detail: String| CompressError::Gram {
        source_name: source_name.to_string(),
        detail,
    };
    if sum.len() != n * n {
        return Err(bad(format!(
            "has {} values, expected n * n = {n} * {n}",
            sum.len()
        )));
    }
    if let Some(pos) = sum.iter().position(|v| !v.is_finite()) {
        return Err(bad(format!(
            "entry ({}, {}) is {} (NaN/inf)",
            pos / n,
            pos % n,
            sum[pos]
        )));
    }
    Ok(Mat::from_fn(n, n, |i, j| sum[i * n + j]))
}

/// A streaming accumulator of `sum_t x_t x_t^T` over activation rows `x_t` (n).
#[derive(Clone, Debug)]
pub struct Gram {
    n: usize,
    sum: Mat<f64>,
    tokens: u64,
}

impl Gram {
    /// An empty Gram for `n` input features.
    pub fn new(n: usize) -> Self {
        Gram {
            n,
            sum: Mat::zeros(n, n),
            tokens: 0,
        }
    }

    /// Input features.
    pub fn dim(&self) -> usize {
        self.n
    }

    /// Tokens accumulated so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }

    /// Entry `(i, j)` of the accumulated sum.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.sum[(i, j)]
    }

    /// Adds `tokens` activation rows given row-major as `x (tokens, n)`.
    pub fn accumulate(&mut self, x: &[f32], tokens: usize) -> Result<()> {
        let n = self.n;
        check_activations(x, tokens, n, "accumulate", "activation")?;
        for start in (0..tokens).step_by(CHUNK_TOKENS) {
            let rows = CHUNK_TOKENS.min(tokens - start);
            let chunk = linalg::to_f64(&x[start * n..(start + rows) * n], rows, n);
            linalg::gemm64(self.sum.as_mut(), true, chunk.transpose(), chunk.as_ref());
        }
        self.tokens += tokens as u64;
        Ok(())
    }

    /// A Gram from an accumulated sum `X X^T` (row-major `(n, n)`, f64) over `tokens` rows,
    /// e.g. summed on the GPU (`blr_cuda::gram`): the sum is kept as given (no f32 round trip,
    /// unlike [`Gram::from_matrix`]); it must be finite with a non-negative diagonal.
    pub fn from_sum(n: usize, sum: &[f64], tokens: u64, source_name: &str) -> Result<Self> {
        let sum = checked_sum(n, sum, source_name)?;
        if let Some(i) = (0..n).find(|&i| sum[(i, i)] < 0.0) {
            return Err(CompressError::Gram {
                source_name: source_name.to_string(),
                detail: format!(
                    "diagonal entry {i} is negative ({}): not a Gram matrix X X^T",
                    sum[(i, i)]
                ),
            });
        }
        Ok(Gram { n, sum, tokens })
    }

    /// Builds a Gram from a full (n, n) matrix (row-major), checking it is symmetric, finite
    /// and has a non-negative diagonal.
    pub fn from_matrix(n: usize, data: &[f32], tokens: u64, source_name: &str) -> Result<Self> {
        let sum: Vec<f64> = data.iter().map(|&v| f64::from(v)).collect();
        let g = Gram::from_sum(n, &sum, tokens, source_name)?;
        let scale = (0..n).map(|i| g.sum[(i, i)].abs()).fold(0.0, f64::max);
        for i in 0..n {
            for j in 0..i {
                if (g.sum[(i, j)] - g.sum[(j, i)]).abs() > 1e-4 * scale {
                    return Err(CompressError::Gram {
                        source_name: source_name.to_string(),
                        detail: format!(
                            "not symmetric: ({i}, {j}) = {} but ({j}, {i}) = {}",
                            g.sum[(i, j)],
                            g.sum[(j, i)]
                        ),
                    });
                }
            }
        }
        Ok(g)
    }

    /// Writes the Gram as safetensors (tensor `gram`, F32, and `blr.gram.tokens`).
    pub fn save(&self, path: &Path) -> Result<()> {
        let data = linalg::to_row_major(self.sum.as_ref());
        let mut meta = BTreeMap::new();
        meta.insert("blr.gram.tokens".to_string(), self.tokens.to_string());
        safetensors::write(
            path,
            &[TensorToWrite {
                name: "gram".into(),
                dtype: Dtype::F32,
                shape: vec![self.n, self.n],
                data: &data,
            }],
            &meta,
        )?;
        Ok(())
    }

    /// Reads a Gram file: a tensor `gram` (n, n), or raw activations `activations` (T, n).
    pub fn load(path: &Path) -> Result<Self> {
        let st = SafeTensors::open(path)?;
        let name = path.display().to_string();
        let bad = |detail: String| CompressError::Gram {
            source_name: name.clone(),
            detail,
        };
        if let Some(info) = st.info("gram") {
            let [rows, cols] = info.shape[..] else {
                return Err(bad(format!(
                    "tensor 'gram' has shape {:?}, expected (n, n)",
                    info.shape
                )));
            };
            if rows != cols {
                return Err(bad(format!(
                    "tensor 'gram' has shape ({rows}, {cols}), expected square"
                )));
            }
            let tokens = st
                .metadata()
                .get("blr.gram.tokens")
                .and_then(|t| t.parse().ok())
                .unwrap_or(0);
            return Gram::from_matrix(rows, &st.read_f32("gram")?, tokens, &name);
        }
        if let Some(info) = st.info("activations") {
            let [tokens, n] = info.shape[..] else {
                return Err(bad(format!(
                    "tensor 'activations' has shape {:?}, expected (tokens, n)",
                    info.shape
                )));
            };
            let mut g = Gram::new(n);
            g.accumulate(&st.read_f32("activations")?, tokens)?;
            return Ok(g);
        }
        Err(bad(
            "has neither a tensor 'gram' (n, n) nor 'activations' (tokens, n); write one with \
             blr_compress::Gram::save or export the layer inputs as 'activations'"
                .into(),
        ))
    }

    /// The loss weight every calibrated algorithm minimises against:
    /// `G' = G * n / tr(G) + damping * I`.
    ///
    /// Scaling to unit mean eigenvalue makes the calibrated loss comparable to the data-free
    /// one (`G' = (1 + damping) I` for white activations), so the BLAST damping rule and the
    /// learning rate carry over unchanged. The ridge `damping * I` keeps `G'` invertible (a
    /// Gram over fewer tokens than features is singular) and spends a small share of the
    /// objective on directions calibration never saw, which protects held-out inputs.
    pub(crate) fn weight(&self, damping: f64, layer: &str) -> Result<Mat<f64>> {
        let n = self.n;
        let trace: f64 = (0..n).map(|i| self.sum[(i, i)]).sum();
        if !(trace > 0.0 && trace.is_finite()) {
            return Err(CompressError::Gram {
                source_name: format!("for layer '{layer}'"),
                detail: format!(
                    "trace is {trace} (no activation energy: were any tokens accumulated? tokens = {})",
                    self.tokens
                ),
            });
        }
        if !(damping >= 0.0 && damping.is_finite()) {
            return Err(CompressError::input(
                layer,
                format!("calibration damping must be a finite value >= 0, got {damping}"),
            ));
        }
        let scale = n as f64 / trace;
        Ok(Mat::from_fn(n, n, |i, j| {
            // Symmetrise: sums accumulated in different orders differ in the last bits.
            let v = 0.5 * (self.sum[(i, j)] + self.sum[(j, i)]) * scale;
            if i == j {
                v + damping
            } else {
                v
            }
        }))
    }
}
