//! The few cuBLAS (classic, not Lt) calls the factorization needs: fp32 strided-batched GEMM
//! (optionally on TF32 tensor cores). Column-major, as cuBLAS is;
//! operands are raw device addresses of buffers the caller owns (`DeviceBuffer::device_ptr`).
//!
//! cuBLASLt (crate::gemm) is wrapped for bf16 layer shapes with a cached plan per shape; the
//! factorization's many fp32 shapes go through the classic API on their own handle, bound to
//! the Gpu's stream.

use std::ffi::c_int;

use cudarc::cublas::sys as cb;

use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::libs;

/// Operand transposition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    N,
    T,
}

impl Op {
    fn raw(self) -> cb::cublasOperation_t {
        match self {
            Op::N => cb::cublasOperation_t::CUBLAS_OP_N,
            Op::T => cb::cublasOperation_t::CUBLAS_OP_T,
        }
    }
}

/// One column-major operand of a strided batch: address, leading dimension, batch stride
/// (elements).
#[derive(Clone, Copy, Debug)]
pub struct Operand {
    pub ptr: u64,
    pub ld: usize,
    pub stride: usize,
}

impl Operand {
    pub fn new(ptr: u64, ld: usize, stride: usize) -> Self {
        Operand { ptr, ld, stride }
    }
}

/// A cuBLAS handle bound to a Gpu's stream.
pub struct Cublas {
    handle: cb::cublasHandle_t,
}

impl std::fmt::Debug for Cublas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Cublas")
    }
}

fn check(status: cb::cublasStatus_t, during: impl FnOnce() -> String) -> Result<()> {
    if status == cb::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(Error::LibraryCall {
            during: during(),
            status: format!("{status:?}"),
        })
    }
}

fn int(v: usize, what: &str) -> Result<c_int> {
    c_int::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds cuBLAS's int range")))
}

impl Cublas {
    /// Creates a handle on `gpu`'s stream; fails cleanly when libcublas is missing.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        libs::ensure_cublas()?;
        let mut handle: cb::cublasHandle_t = std::ptr::null_mut();
        // SAFETY: the library is present (checked above); out-pointer valid.
        check(unsafe { cb::cublasCreate_v2(&mut handle) }, || {
            "creating a cuBLAS handle".into()
        })?;
        let this = Cublas { handle };
        // SAFETY: live handle; the stream belongs to the current context and outlives the
        // handle (the Gpu owns both; the factorization drops its handle first).
        check(
            unsafe {
                cb::cublasSetStream_v2(this.handle, gpu.stream().cu_stream() as cb::cudaStream_t)
            },
            || "binding cuBLAS to the stream".into(),
        )?;
        Ok(this)
    }

    /// `C_b = alpha op(A_b) op(B_b) + beta C_b` for `b` in `0..batch`; `C` is `(m, n)`, the
    /// inner dimension `k`. `tf32` runs it on TF32 tensor cores (fp32 in and out, 10-bit
    /// mantissa products, fp32 accumulate).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm(
        &self,
        ta: Op,
        tb: Op,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
        batch: usize,
        tf32: bool,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let compute = if tf32 {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F_FAST_TF32
        } else {
            cb::cublasComputeType_t::CUBLAS_COMPUTE_32F
        };
        let f32t = cb::cudaDataType_t::CUDA_R_32F;
        let during = || format!("fp32 GEMM {m}x{n}x{k} ({ta:?}{tb:?}) batch {batch}");
        let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
        // SAFETY: live handle; the caller passes addresses of live device buffers large
        // enough for these shapes, strides and leading dimensions (every caller derives them
        // from the buffers it allocated for exactly these shapes).
        let status = unsafe {
            cb::cublasGemmStridedBatchedEx(
                self.handle,
                ta.raw(),
                tb.raw(),
                mi,
                ni,
                ki,
                (&alpha as *const f32).cast(),
                a.ptr as *const std::ffi::c_void,
                f32t,
                int(a.ld.max(1), "lda")?,
                a.stride as i64,
                b.ptr as *const std::ffi::c_void,
                f32t,
                int(b.ld.max(1), "ldb")?,
                b.stride as i64,
                (&beta as *const f32).cast(),
                c.ptr as *mut std::ffi::c_void,
                f32t,
                int(c.ld.max(1), "ldc")?,
                c.stride as i64,
                int(batch, "batch")?,
                compute,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        check(status, during)
    }
}

impl Cublas {
    /// `C = alpha op(A) op(B) + beta C` in f64 (one matrix; the SVD's Gram and products):
    /// [`Cublas::gemm64_batched`] with a batch of 1.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm64(
        &self,
        ta: Op,
        tb: Op,
        mnk: (usize, usize, usize),
        alpha: f64,
        a: Operand,
        b: Operand,
        beta: f64,
        c: Operand,
    ) -> Result<()> {
        self.gemm64_batched(ta, tb, mnk, alpha, a, b, beta, c, 1)
    }
}

impl Drop for Cublas {
    fn drop(&mut self) {
        // SAFETY: handle created by cublasCreate and not used after this.
        let _ = unsafe { cb::cublasDestroy_v2(self.handle) };
    }
}

impl Cublas {
    /// `C_b = alpha op(A_b) op(B_b) + beta C_b` in f64 for `b` in `0..batch` (strided batch;
    /// Monarch's block SVDs).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm64_batched(
        &self,
        ta: Op,
        tb: Op,
        (m, n, k): (usize, usize, usize),
        alpha: f64,
        a: Operand,
        b: Operand,
        beta: f64,
        c: Operand,
        batch: usize,
    ) -> Result<()> {
        if m == 0 || n == 0 || batch == 0 {
            return Ok(());
        }
        let during = || format!("f64 GEMM {m}x{n}x{k} ({ta:?}{tb:?}) batch {batch}");
        let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
        // SAFETY: live handle; the caller passes addresses of live f64 device buffers large
        // enough for these shapes, strides and leading dimensions.
        let status = unsafe {
            cb::cublasDgemmStridedBatched(
                self.handle,
                ta.raw(),
                tb.raw(),
                mi,
                ni,
                ki,
                &alpha,
                a.ptr as *const f64,
                int(a.ld.max(1), "lda")?,
                a.stride as i64,
                b.ptr as *const f64,
                int(b.ld.max(1), "ldb")?,
                b.stride as i64,
                &beta,
                c.ptr as *mut f64,
                int(c.ld.max(1), "ldc")?,
                c.stride as i64,
                int(batch, "batch")?,
            )
        };
        check(status, during)
    }
}

impl Cublas {
    /// `C = alpha op(A) op(B) + beta C` with bf16 `A`, `B` and an fp32 `C`, fp32 accumulation
    /// (one matrix; calibration Grams of bf16 activations, crate::gram).
    #[allow(clippy::too_many_arguments)]
    pub fn gemm_bf16_f32(
        &self,
        ta: Op,
        tb: Op,
        (m, n, k): (usize, usize, usize),
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
    ) -> Result<()> {
        if m == 0 || n == 0 {
            return Ok(());
        }
        let during = || format!("bf16 GEMM {m}x{n}x{k} ({ta:?}{tb:?}), fp32 out");
        let (mi, ni, ki) = (int(m, "m")?, int(n, "n")?, int(k, "k")?);
        let bf16t = cb::cudaDataType_t::CUDA_R_16BF;
        // SAFETY: live handle; the caller passes addresses of live bf16 (A, B) and fp32 (C)
        // device buffers large enough for these shapes and leading dimensions.
        let status = unsafe {
            cb::cublasGemmEx(
                self.handle,
                ta.raw(),
                tb.raw(),
                mi,
                ni,
                ki,
                (&alpha as *const f32).cast(),
                a.ptr as *const std::ffi::c_void,
                bf16t,
                int(a.ld.max(1), "lda")?,
                b.ptr as *const std::ffi::c_void,
                bf16t,
                int(b.ld.max(1), "ldb")?,
                (&beta as *const f32).cast(),
                c.ptr as *mut std::ffi::c_void,
                cb::cudaDataType_t::CUDA_R_32F,
                int(c.ld.max(1), "ldc")?,
                cb::cublasComputeType_t::CUBLAS_COMPUTE_32F,
                cb::cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        };
        check(status, during)
    }
}
