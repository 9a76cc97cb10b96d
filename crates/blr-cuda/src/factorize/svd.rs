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
    let mut eig = gpu.alloc_zeros::<f64>(k, "SVD eigenvalues")?;
    let mut info = gpu.alloc_zeros::<c_int>(1, "cuSOLVER status")?;
    let ki = int(k, "order")?;
    let (jobz, uplo) = (
        cs::cusolverEigMode_t::CUSOLVER_EIG_MODE_VECTOR,
        cs::cublasFillMode_t::CUBLAS_FILL_MODE_LOWER,
    );
    let mut lwork: c_int = 0;
    // SAFETY: live handle; gram (k x k, ld k) and eig (k) are live device buffers; lwork is a
    // host out-pointer.
    check(
        unsafe {
            cs::cusolverDnDsyevd_bufferSize(
                solver.handle,
                jobz,
                uplo,
                ki,
                gram.device_ptr() as *const f64,
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
                gram.device_ptr() as *mut f64,
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
            during: format!("truncated SVD of a {m} x {n} matrix on the GPU"),
            reason: format!(
                "the eigensolver did not converge (info {}); use --device cpu",
                status[0]
            ),
        });
    }
    let lambda = gpu.download(&eig)?;
    // The keep largest eigenpairs, largest first: columns k-1, k-2, .. of the eigenvectors.
    let all = gpu.download(&gram)?;
    drop(work);
    let mut vecs = vec![0f64; k * keep];
    for c in 0..keep {
        let src = (k - 1 - c) * k;
        vecs[c * k..(c + 1) * k].copy_from_slice(&all[src..src + k]);
    }
    drop(all);
    let sigma: Vec<f64> = (0..keep)
        .map(|c| lambda[k - 1 - c].max(0.0).sqrt())
        .collect();
    let vecs_dev = gpu.upload(&vecs, "SVD singular vectors")?;
    let long = if m <= n { n } else { m };
    let other = gpu.alloc_zeros::<f64>(long * keep.max(1), "SVD other side")?;
    let v_op = Operand::new(vecs_dev.device_ptr(), k, 0);
    let o_op = Operand::new(other.device_ptr(), long, 0);
    if keep > 0 {
        if m <= n {
            // A^T U (n, keep).
            blas.gemm64(Op::N, Op::N, (n, keep, m), 1.0, at_op, v_op, 0.0, o_op)?;
        } else {
            // A V (m, keep) = (A^T)^T V.
            blas.gemm64(Op::T, Op::N, (m, keep, n), 1.0, at_op, v_op, 0.0, o_op)?;
        }
    }
    let prod = gpu.download(&other)?;
    let _ = &mut gram;
    let _ = &mut info;
    let _ = &mut eig;
    // Balanced factors: the short side's vector times sqrt(s), the long side's A-product
    // divided by sqrt(s) (= its singular vector times sqrt(s)).
    let floor = sigma.first().copied().unwrap_or(0.0) * 1e-6;
    let mut left = vec![0f64; m * t];
    let mut right_t = vec![0f64; n * t];
    for c in 0..keep {
        let s = sigma[c];
        if s.is_nan() || s <= floor || s == 0.0 {
            continue;
        }
        let root = s.sqrt();
        let short = &vecs[c * k..(c + 1) * k];
        let longv = &prod[c * long..(c + 1) * long];
        let (u_col, v_col) = if m <= n {
            (
                &mut left[c * m..(c + 1) * m],
                &mut right_t[c * n..(c + 1) * n],
            )
        } else {
            (
                &mut right_t[c * n..(c + 1) * n],
                &mut left[c * m..(c + 1) * m],
            )
        };
        for (o, &x) in u_col.iter_mut().zip(short) {
            *o = x * root;
        }
        for (o, &x) in v_col.iter_mut().zip(longv) {
            *o = x / root;
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
