//! Dense linear algebra helpers over faer: row-major <-> faer conversions, damped Cholesky with
//! a jitter fallback, and the (weighted) truncated SVD that low-rank, Monarch and their
//! calibrated variants all reduce to.
//!
//! Precision: SVDs, Cholesky factorizations and every r x r system run in f64. The big GEMMs of
//! BLAST (`A V`, `U^T A`: 2*m*n*r flops each) run in f32, where faer reaches ~100-200 GFLOP/s on
//! two cores, twice the f64 rate; the quantities they feed are then promoted to f64 before any
//! solve, because the damping eps = 0.1 ||A - Â|| goes to zero as the fit converges and the
//! preconditioners become ill-conditioned exactly when precision matters most.

use crate::error::{CompressError, Result};
use faer::linalg::solvers::{Llt, Solve};
use faer::{Accum, Mat, MatMut, MatRef, Par, Side};

/// Below this many multiply-adds a parallel GEMM costs more in synchronisation than it saves.
const PARALLEL_MIN_WORK: usize = 1 << 21;

pub(crate) fn par_for(work: usize) -> Par {
    if work >= PARALLEL_MIN_WORK {
        Par::rayon(0)
    } else {
        Par::Seq
    }
}

/// `dst (+)= a * b` in f32.
pub(crate) fn gemm32(
    dst: MatMut<'_, f32>,
    accumulate: bool,
    a: MatRef<'_, f32>,
    b: MatRef<'_, f32>,
) {
    let par = par_for(a.nrows() * a.ncols() * b.ncols());
    let beta = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    faer::linalg::matmul::matmul(dst, beta, a, b, 1.0f32, par);
}

/// `dst (+)= a * b` in f64.
pub(crate) fn gemm64(
    dst: MatMut<'_, f64>,
    accumulate: bool,
    a: MatRef<'_, f64>,
    b: MatRef<'_, f64>,
) {
    let par = par_for(a.nrows() * a.ncols() * b.ncols());
    let beta = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    faer::linalg::matmul::matmul(dst, beta, a, b, 1.0f64, par);
}

pub(crate) fn mul32(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> Mat<f32> {
    let mut c = Mat::zeros(a.nrows(), b.ncols());
    gemm32(c.as_mut(), false, a, b);
    c
}

pub(crate) fn mul64(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> Mat<f64> {
    let mut c = Mat::zeros(a.nrows(), b.ncols());
    gemm64(c.as_mut(), false, a, b);
    c
}

/// A row-major f32 slice as an f64 matrix (copied).
pub(crate) fn to_f64(data: &[f32], rows: usize, cols: usize) -> Mat<f64> {
    Mat::from_fn(rows, cols, |i, j| data[i * cols + j] as f64)
}

pub(crate) fn mat_to_f64(a: MatRef<'_, f32>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), a.ncols());
    for j in 0..a.ncols() {
        let dst = out.col_as_slice_mut(j);
        match a.col(j).try_as_col_major() {
            Some(src) => dst
                .iter_mut()
                .zip(src.as_slice())
                .for_each(|(d, &v)| *d = v as f64),
            None => dst
                .iter_mut()
                .enumerate()
                .for_each(|(i, d)| *d = a[(i, j)] as f64),
        }
    }
    out
}

pub(crate) fn mat_to_f32(a: MatRef<'_, f64>) -> Mat<f32> {
    Mat::from_fn(a.nrows(), a.ncols(), |i, j| a[(i, j)] as f32)
}

/// A faer matrix written out row-major (the canonical layout of `blr_core`).
pub(crate) fn to_row_major<T: Copy + Into<f64>>(a: MatRef<'_, T>) -> Vec<f32> {
    let mut out = Vec::with_capacity(a.nrows() * a.ncols());
    for i in 0..a.nrows() {
        for j in 0..a.ncols() {
            out.push(a[(i, j)].into() as f32);
        }
    }
    out
}

/// Frobenius inner product `<a, b>` accumulated in f64.
pub(crate) fn dot32(a: MatRef<'_, f32>, b: MatRef<'_, f32>) -> f64 {
    let mut s = 0.0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            s += a[(i, j)] as f64 * b[(i, j)] as f64;
        }
    }
    s
}

pub(crate) fn dot64(a: MatRef<'_, f64>, b: MatRef<'_, f64>) -> f64 {
    let mut s = 0.0f64;
    for j in 0..a.ncols() {
        for i in 0..a.nrows() {
            s += a[(i, j)] * b[(i, j)];
        }
    }
    s
}

/// Cholesky factorization of `p + eps I` (`p` symmetric positive semi-definite, lower triangle
/// read). Round-off can leave a PSD matrix numerically indefinite when eps is tiny; the jitter
/// then grows from 1e-12 of the mean diagonal by factors of 100 until it factors, which changes
/// the step by a negligible relative amount and never the fixed point.
pub(crate) fn damped_llt(
    p: MatRef<'_, f64>,
    eps: f64,
    layer: &str,
    what: &'static str,
) -> Result<Llt<f64>> {
    let n = p.nrows();
    let trace: f64 = (0..n).map(|i| p[(i, i)]).sum();
    let floor = (trace.abs() / n.max(1) as f64).max(f64::MIN_POSITIVE) * 1e-12;
    let mut jitter = if eps.is_finite() { eps.max(0.0) } else { 0.0 };
    let mut last_err = String::new();
    for _ in 0..10 {
        let mut a = p.to_owned();
        for i in 0..n {
            a[(i, i)] += jitter;
        }
        match a.llt(Side::Lower) {
            Ok(l) => return Ok(l),
            Err(e) => last_err = format!("{e:?}"),
        }
        jitter = jitter.max(floor) * 100.0;
    }
    Err(CompressError::numerical(
        layer,
        what,
        format!(
            "matrix of size {n} is not positive definite even with damping {jitter:e} ({last_err}); \
             the input probably contains huge or degenerate values"
        ),
    ))
}

/// `(p + eps I)^-1 rhs` for symmetric PSD `p`.
pub(crate) fn spd_solve(
    p: MatRef<'_, f64>,
    eps: f64,
    rhs: MatRef<'_, f64>,
    layer: &str,
    what: &'static str,
) -> Result<Mat<f64>> {
    let llt = damped_llt(p, eps, layer, what)?;
    Ok(llt.solve(rhs))
}

/// The largest eigenvalue bound of a symmetric matrix by Gershgorin (max absolute row sum):
/// the step 1/bound is a provably stable gradient step on a quadratic with that Hessian.
pub(crate) fn gershgorin(p: MatRef<'_, f64>) -> f64 {
    (0..p.nrows())
        .map(|i| (0..p.ncols()).map(|j| p[(i, j)].abs()).sum::<f64>())
        .fold(0.0, f64::max)
}

/// A rank-`t` factorization `left (rows, t) * right (t, cols)`.
pub(crate) struct Truncated {
    pub left: Mat<f64>,
    pub right: Mat<f64>,
    /// Every singular value of the (weighted) target, largest first.
    pub sigma: Vec<f64>,
}

/// The best rank-`t` approximation of `target` in the norm `||E L||_F`, where `chol` is the
/// lower Cholesky factor `L` of a positive-definite weight `G = L L^T` (identity when `None`).
///
/// Because `||E L||_F = ||E X||_F` for any `X` with `X X^T = G`, the minimiser is the
/// truncated SVD of `B = target L`, mapped back: `Ŵ = B_t L^-1` (Eckart-Young in the whitened
/// space). Factors are balanced: `left = U_t sqrt(S_t)`, `right = sqrt(S_t) V_t^T L^-1`.
/// When `t` exceeds `min(rows, cols)` the extra columns are zero (the fit is already exact).
pub(crate) fn weighted_truncated_svd(
    target: MatRef<'_, f64>,
    chol: Option<MatRef<'_, f64>>,
    t: usize,
    layer: &str,
) -> Result<Truncated> {
    let (rows, cols) = (target.nrows(), target.ncols());
    let weighted;
    let b = match chol {
        Some(l) => {
            weighted = mul64(target, l);
            weighted.as_ref()
        }
        None => target,
    };
    let svd = b.thin_svd().map_err(|e| {
        CompressError::numerical(layer, "SVD", format!("{e:?} on a {rows} x {cols} matrix"))
    })?;
    let k = rows.min(cols);
    let s = svd.S().column_vector();
    let sigma: Vec<f64> = (0..k).map(|i| s[i]).collect();
    let keep = t.min(k);
    let mut left = Mat::<f64>::zeros(rows, t);
    let mut right_t = Mat::<f64>::zeros(cols, t);
    let (u, v) = (svd.U(), svd.V());
    for c in 0..keep {
        let root = sigma[c].max(0.0).sqrt();
        for i in 0..rows {
            left[(i, c)] = u[(i, c)] * root;
        }
        for i in 0..cols {
            right_t[(i, c)] = v[(i, c)] * root;
        }
    }
    if let Some(l) = chol {
        // right^T = L^-T V_t sqrt(S_t): one upper-triangular solve with L^T.
        faer::linalg::triangular_solve::solve_upper_triangular_in_place(
            l.transpose(),
            right_t.as_mut(),
            par_for(cols * cols * t),
        );
    }
    Ok(Truncated {
        left,
        right: right_t.transpose().to_owned(),
        sigma,
    })
}

/// `dst[k, l] += sa[k] * sb[l] * a[k, l]`: one `(s s'^T) ⊙ A` term of the BLAST Gauss-Newton
/// matrices. Column slices keep the inner loop contiguous and vectorised; at r = 1024 with
/// b = 16 these terms are ~3e8 multiply-adds per step, indexed access made them dominate.
pub(crate) fn add_scaled_hadamard(dst: &mut Mat<f64>, a: &Mat<f64>, sa: &[f64], sb: &[f64]) {
    for (l, &sl) in sb.iter().enumerate().take(a.ncols()) {
        let src = a.col_as_slice(l);
        let out = dst.col_as_slice_mut(l);
        for ((o, &x), &sk) in out.iter_mut().zip(src).zip(sa) {
            *o += sk * sl * x;
        }
    }
}

/// `out[k] += sum_l a[k, l] b[k, l] s[l]`, i.e. `out += (A ⊙ B) s` without forming `A ⊙ B`.
pub(crate) fn add_hadamard_matvec(out: &mut [f64], a: &Mat<f64>, b: &Mat<f64>, s: &[f64]) {
    for (l, &sl) in s.iter().enumerate().take(a.ncols()) {
        let (ac, bc) = (a.col_as_slice(l), b.col_as_slice(l));
        for ((o, &x), &y) in out.iter_mut().zip(ac).zip(bc) {
            *o += x * y * sl;
        }
    }
}

/// `A ⊙ B`.
pub(crate) fn hadamard(a: &Mat<f64>, b: &Mat<f64>) -> Mat<f64> {
    let mut out = Mat::<f64>::zeros(a.nrows(), a.ncols());
    for l in 0..a.ncols() {
        let (ac, bc) = (a.col_as_slice(l), b.col_as_slice(l));
        for ((o, &x), &y) in out.col_as_slice_mut(l).iter_mut().zip(ac).zip(bc) {
            *o = x * y;
        }
    }
    out
}
