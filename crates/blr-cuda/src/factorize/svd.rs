//! Truncated SVD on the GPU, in f64: the Gram matrix of the short side (one DGEMM), its
//! eigendecomposition (cuSOLVER `Dsyevd`), and the other side's singular vectors from one more
//! DGEMM. It gives the balanced factors of `blr_compress`'s truncated SVD (`left = U_t
//! sqrt(S_t)`, `right = sqrt(S_t) V_t^T`) up to the sign of each singular pair, which no
//! caller depends on (`left right` is the same).
//!
//! Squaring the matrix halves the relative accuracy of small singular values: in f64 a pair
//! with `s_k < 1e-6 s_0` comes out as noise, and such pairs (whose product with their
//! factors is below 1e-12 of the matrix) are returned as zero columns. At 4096 x 11008 the
//! Gram costs 2 m^2 n = 370 GFLOP of FP64 tensor-core work; the eigensolver on 4096 x 4096
//! is the larger part (docs/perf/factorize-h100.md).

use std::ffi::c_int;

use cudarc::cusolver::sys as cs;

use super::blas::{Cublas, Op, Operand};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::libs;

/// The balanced rank-`t` factors of a truncated SVD, column-major f64: `left` (m, t), `right_t`
/// (n, t) (the transposed right factor); columns past `min(m, n)` (or past the numerical rank)
/// are zero. `sigma` holds the kept singular values, largest first.
#[derive(Debug, Clone)]
pub struct Balanced {
    pub m: usize,
    pub n: usize,
    pub t: usize,
    pub left: Vec<f64>,
    pub right_t: Vec<f64>,
    pub sigma: Vec<f64>,
}

struct Solver {
    handle: cs::cusolverDnHandle_t,
}

impl Drop for Solver {
    fn drop(&mut self) {
        // SAFETY: handle created by cusolverDnCreate and not used after this.
        let _ = unsafe { cs::cusolverDnDestroy(self.handle) };
    }
}

fn check(status: cs::cusolverStatus_t, during: &str) -> Result<()> {
    if status == cs::cusolverStatus_t::CUSOLVER_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::LibraryCall {
            during: during.into(),
            status: format!("{status:?}"),
        })
    }
}

fn int(v: usize, what: &str) -> Result<c_int> {
    c_int::try_from(v)
        .map_err(|_| Error::Shape(format!("{what} = {v} exceeds cuSOLVER's int range")))
}

impl Solver {
    fn new(gpu: &Gpu) -> Result<Self> {
        libs::ensure_cusolver()?;
        let mut handle: cs::cusolverDnHandle_t = std::ptr::null_mut();
        // SAFETY: the library is present (checked above); out-pointer valid.
        check(
            unsafe { cs::cusolverDnCreate(&mut handle) },
            "creating a cuSOLVER handle",
        )?;
        let this = Solver { handle };
        // SAFETY: live handle; the stream belongs to the Gpu, which outlives this handle
        // (dropped at the end of truncated_svd).
        check(
            unsafe {
                cs::cusolverDnSetStream(this.handle, gpu.stream().cu_stream() as cs::cudaStream_t)
            },
            "binding cuSOLVER to the stream",
        )?;
        Ok(this)
    }
}

/// The balanced rank-`t` truncated SVD of `a` (m, n), row-major (as blr stores weights).
pub fn truncated_svd(gpu: &Gpu, a: &[f32], m: usize, n: usize, t: usize) -> Result<Balanced> {
    if a.len() != m * n || m == 0 || n == 0 {
        return Err(Error::Shape(format!(
            "truncated SVD of a {m} x {n} matrix given {} values",
            a.len()
        )));
    }
    let blas = Cublas::new(gpu)?;
    let solver = Solver::new(gpu)?;
    // Row-major A is column-major A^T (n, m), ld n.
    let host: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
    let at = gpu.upload(&host, "SVD input")?;
    drop(host);
    let k = m.min(n);
    let keep = t.min(k);
    let mut gram = gpu.alloc_zeros::<f64>(k * k, "SVD Gram matrix")?;
    let at_op = Operand::new(at.device_ptr(), n, 0);
    let g_op = Operand::new(gram.device_ptr(), k, 0);
    if m <= n {
        // A A^T = (A^T)^T A^T.
        blas.gemm64(Op::T, Op::N, (m, m, n), 1.0, at_op, at_op, 0.0, g_op)?;
    } else {
        // A^T A = A^T (A^T)^T.
        blas.gemm64(Op::N, Op::T, (n, n, m), 1.0, at_op, at_op, 0.0, g_op)?;
    }
    let during = format!("truncated SVD of a {m} x {n} matrix on the GPU");
    // The short side's eigenvectors, and the long side's A-product: A^T U (n, keep) for
    // m <= n, A V = (A^T)^T V (m, keep) otherwise.
    let long = if m <= n { n } else { m };
    let back = if m <= n { Op::N } else { Op::T };
    let (vecs, sigma, prod) = top_pairs_and_product(
        gpu,
        &solver,
        &blas,
        &mut gram,
        k,
        keep,
        (back, at_op, long),
        &during,
    )?;
    drop(gram);
    // Balanced factors: the short side's vector times sqrt(s), the long side's A-product
    // divided by sqrt(s) (= its singular vector times sqrt(s)).
    let mut left = vec![0f64; m * t];
    let mut right_t = vec![0f64; n * t];
    if m <= n {
        scatter_balanced(
            &sigma,
            (&mut left, m, &vecs, true),
            (&mut right_t, n, &prod, false),
        );
    } else {
        scatter_balanced(
            &sigma,
            (&mut left, m, &prod, false),
            (&mut right_t, n, &vecs, true),
        );
    }
    Ok(Balanced {
        m,
        n,
        t,
        left,
        right_t,
        sigma,
    })
}

/// Eigendecomposition of the symmetric `k x k` matrix in `mat` (f64, column-major, lower half
/// read) by cuSOLVER `Dsyevd`: returns the eigenvalues in ascending order and leaves the
/// eigenvectors in `mat` (column c belongs to eigenvalue c). `during` names the caller for the
/// error message.
fn sym_eig(
    gpu: &Gpu,
    solver: &Solver,
    mat: &mut crate::memory::DeviceBuffer<f64>,
    k: usize,
    during: &str,
) -> Result<Vec<f64>> {
    let eig = gpu.alloc_zeros::<f64>(k, "SVD eigenvalues")?;
    let info = gpu.alloc_zeros::<c_int>(1, "cuSOLVER status")?;
    let ki = int(k, "order")?;
    let (jobz, uplo) = (
        cs::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
        cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
    );
    let mut lwork: c_int = 0;
    // SAFETY: live handle; mat (k x k, ld k) and eig (k) are live device buffers; lwork is a
    // host out-pointer.
    check(
        unsafe {
            cs::cusolverDnDsyevd_bufferSize(
                solver.handle,
                jobz,
                uplo,
                ki,
                mat.device_ptr() as *const f64,
                ki,
                eig.device_ptr() as *const f64,
                &mut lwork,
            )
        },
        "sizing the eigensolver workspace",
    )?;
    let work = gpu.alloc_zeros::<f64>(
        usize::try_from(lwork).unwrap_or(0).max(1),
        "eigensolver workspace",
    )?;
    // SAFETY: as above, with work holding lwork doubles and info one int, all on the
    // solver's stream.
    check(
        unsafe {
            cs::cusolverDnDsyevd(
                solver.handle,
                jobz,
                uplo,
                ki,
                mat.device_ptr() as *mut f64,
                ki,
                eig.device_ptr() as *mut f64,
                work.device_ptr() as *mut f64,
                lwork,
                info.device_ptr() as *mut c_int,
            )
        },
        "the symmetric eigensolver (Dsyevd)",
    )?;
    let status = gpu.download(&info)?;
    if status.first().copied().unwrap_or(0) != 0 {
        return Err(Error::Numerical {
            during: during.to_string(),
            reason: format!(
                "the eigensolver did not converge (info {}); use --device cpu",
                status[0]
            ),
        });
    }
    gpu.download(&eig)
}

/// The `keep` eigenpairs of largest eigenvalue, largest first, from [`sym_eig`]'s output:
/// (vectors `k x keep` column-major, eigenvalues).
fn top_pairs(all: &[f64], lambda: &[f64], k: usize, keep: usize) -> (Vec<f64>, Vec<f64>) {
    let mut vecs = vec![0f64; k * keep];
    for c in 0..keep {
        let src = (k - 1 - c) * k;
        vecs[c * k..(c + 1) * k].copy_from_slice(&all[src..src + k]);
    }
    let top = (0..keep).map(|c| lambda[k - 1 - c]).collect();
    (vecs, top)
}

/// The part every SVD here shares: the eigendecomposition of the symmetric `k x k` matrix in
/// `mat` (overwritten), its `keep` largest pairs (vectors `k x keep`, largest first), the
/// singular values `sqrt(max(lambda, 0))`, and the back-product `op(x) vectors` (`rows x keep`,
/// ld rows; empty when keep = 0), where `op(x)` is `rows x k`.
#[allow(clippy::too_many_arguments)]
fn top_pairs_and_product(
    gpu: &Gpu,
    solver: &Solver,
    blas: &Cublas,
    mat: &mut crate::memory::DeviceBuffer<f64>,
    k: usize,
    keep: usize,
    (op, x, rows): (Op, Operand, usize),
    during: &str,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    let lambda = sym_eig(gpu, solver, mat, k, during)?;
    let (vecs, top) = top_pairs(&gpu.download(mat)?, &lambda, k, keep);
    let sigma = top.iter().map(|l| l.max(0.0).sqrt()).collect();
    if keep == 0 {
        return Ok((vecs, sigma, Vec::new()));
    }
    let v_dev = gpu.upload(&vecs, "SVD singular vectors")?;
    let out = gpu.alloc_zeros::<f64>(rows * keep, "SVD back-product")?;
    blas.gemm64(
        op,
        Op::N,
        (rows, keep, k),
        1.0,
        x,
        Operand::new(v_dev.device_ptr(), k, 0),
        0.0,
        Operand::new(out.device_ptr(), rows, 0),
    )?;
    Ok((vecs, sigma, gpu.download(&out)?))
}

/// Balanced factors from per-pair columns: `left[:, c] = lsrc[:, c] root^±1`,
/// `right_t[c, :] = rsrc[:, c] root^±1` with `root = sqrt(sigma_c)` (multiplied where the flag
/// says so, divided otherwise); pairs with `sigma_c <= 1e-6 sigma_0` (or NaN) stay zero.
fn scatter_balanced(
    sigma: &[f64],
    (left, m, lsrc, lmul): (&mut [f64], usize, &[f64], bool),
    (right_t, n, rsrc, rmul): (&mut [f64], usize, &[f64], bool),
) {
    let floor = sigma.first().copied().unwrap_or(0.0) * 1e-6;
    for (c, &s) in sigma.iter().enumerate() {
        if s.is_nan() || s <= floor || s == 0.0 {
            continue;
        }
        let root = s.sqrt();
        let scale = |x: f64, mul: bool| if mul { x * root } else { x / root };
        for (o, &x) in left[c * m..(c + 1) * m].iter_mut().zip(&lsrc[c * m..]) {
            *o = scale(x, lmul);
        }
        for (o, &x) in right_t[c * n..(c + 1) * n].iter_mut().zip(&rsrc[c * n..]) {
            *o = scale(x, rmul);
        }
    }
}

/// The balanced rank-`t` factors minimising `||(A - left right) L||_F` for `G' = L L^T` (the
/// calibrated low-rank problem; `g` is `G'`, n x n, symmetric positive definite, f32), i.e.
/// the truncated SVD of `A L` mapped back (the whitened SVD of blr-compress's lowrank.rs), in
/// f64, up to the sign of each singular pair:
/// - `m <= n`: `A G' A^T = U S^2 U^T` (one m x m eigenproblem) gives `left = U_t sqrt(S_t)`
///   and `right^T = A^T U_t S_t^-1/2` directly (whatever L is, the left singular vectors of
///   `A L` are those of `A G' A^T`, and `L^-T (A L)^T U S^-1 = A^T U S^-1`);
/// - `m > n`: whitening by `G' = E Λ E^T`, `L = E Λ^1/2`; `B = A L` (m, n),
///   `B^T B = V S^2 V^T`, `left = B V_t S_t^-1/2`, `right^T = E Λ^-1/2 V_t S_t^1/2`.
///
/// Pairs with `s_k <= 1e-6 s_0` come back as zero columns, as in [`truncated_svd`].
pub fn weighted_truncated_svd(
    gpu: &Gpu,
    a: &[f32],
    g: &[f32],
    m: usize,
    n: usize,
    t: usize,
) -> Result<Balanced> {
    if a.len() != m * n || g.len() != n * n || m == 0 || n == 0 {
        return Err(Error::Shape(format!(
            "weighted truncated SVD of a {m} x {n} matrix given {} values and a weight of {}",
            a.len(),
            g.len()
        )));
    }
    let blas = Cublas::new(gpu)?;
    let solver = Solver::new(gpu)?;
    let during = format!("calibrated (whitened) SVD of a {m} x {n} matrix on the GPU");
    let to64 = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| f64::from(x)).collect() };
    let at = gpu.upload(&to64(a), "SVD input")?;
    let gd = gpu.upload(&to64(g), "SVD weight")?;
    let keep = t.min(m.min(n));
    let at_op = Operand::new(at.device_ptr(), n, 0);
    // (vecs of the short side's eigenproblem, squared singular values, left, right^T products).
    let mut left = vec![0f64; m * t];
    let mut right_t = vec![0f64; n * t];
    let sigma: Vec<f64>;
    if m <= n {
        // K = A G' A^T: Y = G' A^T (n, m), K = (A^T)^T Y.
        let y = gpu.alloc_zeros::<f64>(n * m, "SVD G' A^T")?;
        let y_op = Operand::new(y.device_ptr(), n, 0);
        blas.gemm64(
            Op::N,
            Op::N,
            (n, m, n),
            1.0,
            Operand::new(gd.device_ptr(), n, 0),
            at_op,
            0.0,
            y_op,
        )?;
        let mut kmat = gpu.alloc_zeros::<f64>(m * m, "SVD weighted Gram")?;
        blas.gemm64(
            Op::T,
            Op::N,
            (m, m, n),
            1.0,
            at_op,
            y_op,
            0.0,
            Operand::new(kmat.device_ptr(), m, 0),
        )?;
        drop(y);
        let (vecs, top_sigma, prod) = top_pairs_and_product(
            gpu,
            &solver,
            &blas,
            &mut kmat,
            m,
            keep,
            (Op::N, at_op, n),
            &during,
        )?;
        drop(kmat);
        sigma = top_sigma;
        scatter_balanced(
            &sigma,
            (&mut left, m, &vecs, true),
            (&mut right_t, n, &prod, false),
        );
    } else {
        // G' = E Λ E^T; L = E Λ^1/2.
        let mut ebuf = gd;
        let lam_g = sym_eig(gpu, &solver, &mut ebuf, n, &during)?;
        let lam_max = lam_g.last().copied().unwrap_or(0.0);
        if !(lam_g.first().copied().unwrap_or(0.0) > lam_max * 1e-12 && lam_max.is_finite()) {
            return Err(Error::Numerical {
                during,
                reason: format!(
                    "the calibration weight is not positive definite (eigenvalues {:e} ..                      {lam_max:e}); raise --calib-damping or use --device cpu",
                    lam_g.first().copied().unwrap_or(0.0)
                ),
            });
        }
        let e_host = gpu.download(&ebuf)?;
        let mut l_host = e_host.clone();
        for (c, &l) in lam_g.iter().enumerate() {
            let root = l.sqrt();
            for v in &mut l_host[c * n..(c + 1) * n] {
                *v *= root;
            }
        }
        let l_dev = gpu.upload(&l_host, "SVD whitening factor")?;
        drop(l_host);
        // B^T = L^T A^T (n, m); K = B^T B = B^T (B^T)^T (n, n).
        let bt = gpu.alloc_zeros::<f64>(n * m, "SVD whitened input")?;
        let bt_op = Operand::new(bt.device_ptr(), n, 0);
        blas.gemm64(
            Op::T,
            Op::N,
            (n, m, n),
            1.0,
            Operand::new(l_dev.device_ptr(), n, 0),
            at_op,
            0.0,
            bt_op,
        )?;
        drop(l_dev);
        let mut kmat = gpu.alloc_zeros::<f64>(n * n, "SVD weighted Gram")?;
        blas.gemm64(
            Op::N,
            Op::T,
            (n, n, m),
            1.0,
            bt_op,
            bt_op,
            0.0,
            Operand::new(kmat.device_ptr(), n, 0),
        )?;
        // left = B V S^-1/2 = (B^T)^T V S^-1/2; right^T = E (Λ^-1/2 V) S^1/2.
        let (vecs, top_sigma, bv) = top_pairs_and_product(
            gpu,
            &solver,
            &blas,
            &mut kmat,
            n,
            keep,
            (Op::T, bt_op, m),
            &during,
        )?;
        drop(kmat);
        sigma = top_sigma;
        if keep > 0 {
            let mut scaled = vecs.clone();
            for c in 0..keep {
                for (row, v) in scaled[c * n..(c + 1) * n].iter_mut().enumerate() {
                    *v /= lam_g[row].sqrt();
                }
            }
            let sv_dev = gpu.upload(&scaled, "SVD unwhitened vectors")?;
            let e_dev = gpu.upload(&e_host, "SVD weight eigenvectors")?;
            let ev = gpu.alloc_zeros::<f64>(n * keep, "SVD E Λ^-1/2 V")?;
            blas.gemm64(
                Op::N,
                Op::N,
                (n, keep, n),
                1.0,
                Operand::new(e_dev.device_ptr(), n, 0),
                Operand::new(sv_dev.device_ptr(), n, 0),
                0.0,
                Operand::new(ev.device_ptr(), n, 0),
            )?;
            let ev = gpu.download(&ev)?;
            scatter_balanced(
                &sigma,
                (&mut left, m, &bv, false),
                (&mut right_t, n, &ev, true),
            );
        }
    }
    Ok(Balanced {
        m,
        n,
        t,
        left,
        right_t,
        sigma,
    })
}

/// Owns a `cusolverDnParams_t` (the 64-bit API's options object).
struct Params(cs::cusolverDnParams_t);

impl Drop for Params {
    fn drop(&mut self) {
        // SAFETY: created by cusolverDnCreateParams and not used after this.
        let _ = unsafe { cs::cusolverDnDestroyParams(self.0) };
    }
}

/// Eigendecompositions of `batch` symmetric `k x k` matrices stored back to back in `mats`
/// (f64, column-major, lower halves read) in one call (cuSOLVER `XsyevBatched`): the
/// eigenvalues, ascending within each matrix (`k` per matrix), with the eigenvectors left in
/// `mats`.
fn sym_eig_batched(
    gpu: &Gpu,
    solver: &Solver,
    mats: &mut crate::memory::DeviceBuffer<f64>,
    k: usize,
    batch: usize,
    during: &str,
) -> Result<Vec<f64>> {
    let eig = gpu.alloc_zeros::<f64>(k * batch, "batched eigenvalues")?;
    let info = gpu.alloc_zeros::<c_int>(batch, "cuSOLVER status")?;
    let mut params: cs::cusolverDnParams_t = std::ptr::null_mut();
    // SAFETY: out-pointer valid; the library is loaded (the Solver exists).
    check(
        unsafe { cs::cusolverDnCreateParams(&mut params) },
        "creating cuSOLVER parameters",
    )?;
    let params = Params(params);
    let (jobz, uplo, f64t) = (
        cs::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
        cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
        cs::cudaDataType::CUDA_R_64F,
    );
    let (kk, bb) = (k as i64, batch as i64);
    let (mut dev_bytes, mut host_bytes) = (0usize, 0usize);
    // SAFETY: live handle and params; mats holds batch k x k matrices (ld k), eig k * batch;
    // the two sizes are host out-pointers.
    check(
        unsafe {
            cs::cusolverDnXsyevBatched_bufferSize(
                solver.handle,
                params.0,
                jobz,
                uplo,
                kk,
                f64t,
                mats.device_ptr() as *const std::ffi::c_void,
                kk,
                f64t,
                eig.device_ptr() as *const std::ffi::c_void,
                f64t,
                &mut dev_bytes,
                &mut host_bytes,
                bb,
            )
        },
        "sizing the batched eigensolver workspace",
    )?;
    let work = gpu.alloc_zeros::<f64>(
        dev_bytes.div_ceil(8).max(1),
        "batched eigensolver workspace",
    )?;
    let mut host_work = vec![0u8; host_bytes.max(1)];
    // SAFETY: as above, with work holding >= dev_bytes bytes on the device, host_work
    // host_bytes on the host, info one int per matrix, all on the solver's stream.
    check(
        unsafe {
            cs::cusolverDnXsyevBatched(
                solver.handle,
                params.0,
                jobz,
                uplo,
                kk,
                f64t,
                mats.device_ptr() as *mut std::ffi::c_void,
                kk,
                f64t,
                eig.device_ptr() as *mut std::ffi::c_void,
                f64t,
                work.device_ptr() as *mut std::ffi::c_void,
                dev_bytes,
                host_work.as_mut_ptr().cast(),
                host_bytes,
                info.device_ptr() as *mut c_int,
                bb,
            )
        },
        "the batched symmetric eigensolver (XsyevBatched)",
    )?;
    let status = gpu.download(&info)?;
    if let Some(bad) = status.iter().position(|&s| s != 0) {
        return Err(Error::Numerical {
            during: during.to_string(),
            reason: format!(
                "the batched eigensolver did not converge on matrix {bad} (info {}); use \
                 --device cpu",
                status[bad]
            ),
        });
    }
    drop(work);
    gpu.download(&eig)
}

/// The balanced rank-`t` truncated SVDs of Monarch's `b x b` blocks of `a` (m, n) row-major:
/// block `(l, k)` holds rows `s b + l` (`s < p = m / b`) and columns `k q ..` (`q = n / b`).
/// Returns, per block `l * b + k`, `left` (p, t) and `right_t` (q, t), column-major f64, from
/// one batched Gram (f64 GEMMs on strided views of `a`, no copies), one batched eigensolver
/// call for all `b^2` blocks, and one batched product for the other side. Pairs with
/// `s <= 1e-6 s_0` of their block, and columns past `min(p, q)`, are zero.
pub fn monarch_block_svds(
    gpu: &Gpu,
    a: &[f32],
    m: usize,
    n: usize,
    b: usize,
    t: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if a.len() != m * n || b == 0 || !m.is_multiple_of(b) || !n.is_multiple_of(b) {
        return Err(Error::Shape(format!(
            "Monarch block SVDs of a {m} x {n} matrix ({} values) with b = {b}",
            a.len()
        )));
    }
    let (p, q) = (m / b, n / b);
    let k = p.min(q);
    let keep = t.min(k);
    let nb = b * b;
    let blas = Cublas::new(gpu)?;
    let solver = Solver::new(gpu)?;
    let during = format!("Monarch block SVDs of a {m} x {n} matrix (b = {b}) on the GPU");
    let host: Vec<f64> = a.iter().map(|&v| f64::from(v)).collect();
    let at = gpu.upload(&host, "Monarch input")?;
    drop(host);
    // Block (l, kk)^T (q, p) is a view of A^T (n, m): offset l n + kk q, ld b n; the b blocks
    // of a row group are q apart.
    let block_t = |l: usize| Operand::new(at.device_ptr() + 8 * (l * n) as u64, b * n, q);
    let mut grams = gpu.alloc_zeros::<f64>(nb * k * k, "Monarch block Grams")?;
    for l in 0..b {
        let c = Operand::new(grams.device_ptr() + 8 * (l * b * k * k) as u64, k, k * k);
        if p <= q {
            // M M^T (p, p) = (M^T)^T M^T.
            blas.gemm64_batched(
                Op::T,
                Op::N,
                (p, p, q),
                1.0,
                block_t(l),
                block_t(l),
                0.0,
                c,
                b,
            )?;
        } else {
            // M^T M (q, q) = M^T (M^T)^T.
            blas.gemm64_batched(
                Op::N,
                Op::T,
                (q, q, p),
                1.0,
                block_t(l),
                block_t(l),
                0.0,
                c,
                b,
            )?;
        }
    }
    let lambda = sym_eig_batched(gpu, &solver, &mut grams, k, nb, &during)?;
    let all = gpu.download(&grams)?;
    drop(grams);
    // The keep largest pairs of every block, largest first.
    let mut vecs = vec![0f64; nb * k * keep.max(1)];
    let mut sigma = vec![0f64; nb * keep.max(1)];
    for blk in 0..nb {
        let (v, top) = top_pairs(
            &all[blk * k * k..(blk + 1) * k * k],
            &lambda[blk * k..(blk + 1) * k],
            k,
            keep,
        );
        vecs[blk * k * keep..(blk + 1) * k * keep].copy_from_slice(&v);
        for (c, l) in top.iter().enumerate() {
            sigma[blk * keep + c] = l.max(0.0).sqrt();
        }
    }
    drop(all);
    let long = if p <= q { q } else { p };
    let mut prod = Vec::new();
    if keep > 0 {
        let v_dev = gpu.upload(&vecs, "Monarch singular vectors")?;
        let other = gpu.alloc_zeros::<f64>(nb * long * keep, "Monarch other side")?;
        for l in 0..b {
            let v_op = Operand::new(
                v_dev.device_ptr() + 8 * (l * b * k * keep) as u64,
                k,
                k * keep,
            );
            let o_op = Operand::new(
                other.device_ptr() + 8 * (l * b * long * keep) as u64,
                long,
                long * keep,
            );
            if p <= q {
                // M^T U (q, keep).
                blas.gemm64_batched(
                    Op::N,
                    Op::N,
                    (q, keep, p),
                    1.0,
                    block_t(l),
                    v_op,
                    0.0,
                    o_op,
                    b,
                )?;
            } else {
                // M V (p, keep) = (M^T)^T V.
                blas.gemm64_batched(
                    Op::T,
                    Op::N,
                    (p, keep, q),
                    1.0,
                    block_t(l),
                    v_op,
                    0.0,
                    o_op,
                    b,
                )?;
            }
        }
        prod = gpu.download(&other)?;
    }
    let mut left = vec![0f64; nb * p * t];
    let mut right_t = vec![0f64; nb * q * t];
    for blk in 0..nb {
        let floor = sigma[blk * keep.max(1)] * 1e-6;
        for c in 0..keep {
            let s = sigma[blk * keep + c];
            if s.is_nan() || s <= floor || s == 0.0 {
                continue;
            }
            let root = s.sqrt();
            let short = &vecs[(blk * keep + c) * k..(blk * keep + c + 1) * k];
            let longv = &prod[(blk * keep + c) * long..(blk * keep + c + 1) * long];
            let (u_col, v_col) = if p <= q {
                (
                    &mut left[(blk * t + c) * p..(blk * t + c + 1) * p],
                    &mut right_t[(blk * t + c) * q..(blk * t + c + 1) * q],
                )
            } else {
                (
                    &mut right_t[(blk * t + c) * q..(blk * t + c + 1) * q],
                    &mut left[(blk * t + c) * p..(blk * t + c + 1) * p],
                )
            };
            for (o, &x) in u_col.iter_mut().zip(short) {
                *o = x * root;
            }
            for (o, &x) in v_col.iter_mut().zip(longv) {
                *o = x / root;
            }
        }
    }
    Ok((left, right_t))
}
