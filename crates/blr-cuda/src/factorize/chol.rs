//! Batched Cholesky `A_b = L_b L_b^T` of many r x r SPD matrices at once (the damped
//! Gauss-Newton preconditioners: b_out, b_in and b_out * b_in of them per BLAST iteration).
//!
//! Left-looking blocked algorithm, every step over the whole batch in one launch: for each
//! panel of nb columns, (1) one strided-batched GEMM applies all finished columns to it,
//! `A[k0.., panel] -= L[k0.., ..k0] L[panel, ..k0]^T` (K = k0: large, efficient, and the
//! matrix is read once per panel instead of read and written as a right-looking trailing
//! update would: at 256 matrices of 1488^2 that is ~4 GB of traffic per factorization instead
//! of ~17 GB, and exactly the r^3/3 flops, none of the square update's waste); (2) `chol_diag`
//! factors the nb x nb diagonal block of every matrix in shared memory and writes `L11^-1`;
//! (3) one GEMM forms the panel `L21 = A21 L11^-T` (into a workspace, copied back). So the
//! O(r^3) work is cuBLAS SGEMM at batch sizes that fill the GPU,
//! and only `r / nb` small kernels are serial. The solves reuse the `L11^-1` blocks, so they
//! are GEMMs too (cuBLAS's batched trsm measured 1-1.6 ms per solve here, several times slower).
//!
//! Why not cuSOLVER: its dense potrf is one matrix per call (hundreds of calls per iteration)
//! and its batched potrf targets tiny matrices; this needs no extra library either.

use cudarc::driver::LaunchConfig;

use super::blas::{Cublas, Op, Operand};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;

/// Shared memory `chol_diag` needs for a panel of width `nb`: L and L^-1, nb x (nb + 1) each.
fn diag_smem(nb: usize) -> usize {
    2 * nb * (nb + 1) * 4
}

/// Workspace for factorizing up to `batch` r x r matrices and solving with the factors.
pub struct BatchedCholesky {
    r: usize,
    batch: usize,
    /// Panel width (64; 33 KB of shared memory for `chol_diag`).
    nb: usize,
    /// `L11^-1` of every panel of every matrix of the last factorization:
    /// `[panel][matrix][nb x nb]`, kept for the solves.
    linv: DeviceBuffer<f32>,
    panel: DeviceBuffer<f32>,
    info: DeviceBuffer<i32>,
    diag: Kernel,
    copy: Kernel,
}

impl BatchedCholesky {
    pub fn new(gpu: &Gpu, diag: &Kernel, copy: &Kernel, r: usize, batch: usize) -> Result<Self> {
        let optin = gpu.info().max_smem_per_block_optin.0 as usize;
        // Panel width 64, measured best on H100 at r = 1488 (docs/perf/factorize-h100.md):
        // 128 halves the diagonal-block steps' count but each is 4x the latency-bound work,
        // 32 makes the GEMMs too thin. BLR_FACTORIZE_NB=32|64|128 overrides (a measurement aid).
        let nb = std::env::var("BLR_FACTORIZE_NB")
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .filter(|&v| [32, 64, 128].contains(&v) && diag_smem(v) <= optin)
            .unwrap_or(64);
        diag.set_max_dynamic_smem(diag_smem(nb) as u32)?;
        let panels = r.div_ceil(nb);
        Ok(Self {
            r,
            batch,
            nb,
            linv: gpu.alloc_zeros::<f32>(panels * batch * nb * nb, "Cholesky L11^-1 blocks")?,
            panel: gpu.alloc_zeros::<f32>(batch * r * nb, "Cholesky panels")?,
            info: gpu.alloc_zeros::<i32>(batch, "Cholesky status")?,
            diag: diag.clone(),
            copy: copy.clone(),
        })
    }

    fn linv_of(&self, panel: usize) -> u64 {
        self.linv.device_ptr() + 4 * (panel * self.batch * self.nb * self.nb) as u64
    }

    /// Factorizes `batch` matrices at `a` (`stride` elements apart, ld r) in place; the lower
    /// triangle then holds `L`, the upper one garbage. A failed pivot is recorded, not raised:
    /// see [`BatchedCholesky::failed`]. `mark` names the phases for the profile.
    #[allow(clippy::too_many_arguments)]
    pub fn factor(
        &self,
        gpu: &Gpu,
        blas: &Cublas,
        a: u64,
        stride: usize,
        batch: usize,
        tf32: bool,
        mark: &dyn Fn(&'static str) -> Result<()>,
    ) -> Result<()> {
        let (r, nb) = (self.r, self.nb);
        if batch > self.batch {
            return Err(Error::Shape(format!(
                "batched Cholesky of {batch} matrices with a workspace for {}",
                self.batch
            )));
        }
        let batch_i = u32::try_from(batch).map_err(|_| Error::Shape("batch too large".into()))?;
        let panel_ptr = self.panel.device_ptr();
        let info_ptr = self.info.device_ptr();
        let mut k0 = 0usize;
        while k0 < r {
            let kb = nb.min(r - k0);
            let linv_ptr = self.linv_of(k0 / nb);
            if k0 > 0 {
                // Left-looking: A[k0.., panel] -= L[k0.., ..k0] L[panel, ..k0]^T, one GEMM
                // with K = k0 that reads the finished columns once. (Updating two or four
                // panels per GEMM, N = 128 or 256, measured no faster in total.)
                blas.gemm(
                    Op::N,
                    Op::T,
                    (r - k0, kb, k0),
                    -1.0,
                    Operand::new(a + 4 * k0 as u64, r, stride),
                    Operand::new(a + 4 * k0 as u64, r, stride),
                    1.0,
                    Operand::new(a + 4 * (k0 * r + k0) as u64, r, stride),
                    batch,
                    tf32,
                )?;
            }
            mark("chol: update")?;
            let cfg = LaunchConfig {
                grid_dim: (batch_i, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: diag_smem(kb) as u32,
            };
            let (stride_l, lda, k0_i, kb_i, nb_i) =
                (stride as i64, r as i32, k0 as i32, kb as i32, nb as i32);
            // SAFETY: chol_diag(float* a, i64 stride, int lda, int k0, int kb, float* linv,
            // int nb, int* info): block b touches a[b*stride + (k0..k0+kb) x (k0..k0+kb)],
            // linv[b*nb*nb ..][kb x kb] and info[b]; a holds `batch` r x r matrices `stride`
            // apart (the caller's buffer), linv and info were sized for self.batch >= batch.
            unsafe {
                gpu.launch(&self.diag)
                    .arg(&a)
                    .arg(&stride_l)
                    .arg(&lda)
                    .arg(&k0_i)
                    .arg(&kb_i)
                    .arg(&linv_ptr)
                    .arg(&nb_i)
                    .arg(&info_ptr)
                    .launch(cfg)?;
            }
            mark("chol: diag")?;
            let rem = r - k0 - kb;
            if rem > 0 {
                let a21 = a + 4 * (k0 * r + k0 + kb) as u64;
                // panel = A21 L11^-T (rem x kb).
                blas.gemm(
                    Op::N,
                    Op::T,
                    (rem, kb, kb),
                    1.0,
                    Operand::new(a21, r, stride),
                    Operand::new(linv_ptr, nb, nb * nb),
                    0.0,
                    Operand::new(panel_ptr, r, r * nb),
                    batch,
                    tf32,
                )?;
                self.copy_back(gpu, a21, stride, rem, kb, batch_i)?;
                mark("chol: panel")?;
            }
            k0 += kb;
        }
        Ok(())
    }

    /// `B_b <- (L_b L_b^T)^-1 B_b` for the factors of the last [`BatchedCholesky::factor`]
    /// (`l`, `stride` as given there), `B_b` (r, nrhs); `y` is scratch of the same layout.
    /// Blocked substitution with the stored `L11^-1`: every step is a strided-batched GEMM
    /// (forward `Y_k = L11^-1 (B_k - L_k,<k Y_<k)`, then backward from Y into B). Always fp32:
    /// these GEMMs are thin (nb rows) and memory-bound, and TF32 measured slower here.
    #[allow(clippy::too_many_arguments)]
    pub fn solve(
        &self,
        blas: &Cublas,
        l: u64,
        stride: usize,
        batch: usize,
        b: Operand,
        y: Operand,
        nrhs: usize,
    ) -> Result<()> {
        let (r, nb) = (self.r, self.nb);
        let panels = r.div_ceil(nb);
        let at = |op: Operand, row: usize| Operand::new(op.ptr + 4 * row as u64, op.ld, op.stride);
        for k in 0..panels {
            let k0 = k * nb;
            let kb = nb.min(r - k0);
            if k0 > 0 {
                blas.gemm(
                    Op::N,
                    Op::N,
                    (kb, nrhs, k0),
                    -1.0,
                    Operand::new(l + 4 * k0 as u64, r, stride),
                    y,
                    1.0,
                    at(b, k0),
                    batch,
                    false,
                )?;
            }
            blas.gemm(
                Op::N,
                Op::N,
                (kb, nrhs, kb),
                1.0,
                Operand::new(self.linv_of(k), nb, nb * nb),
                at(b, k0),
                0.0,
                at(y, k0),
                batch,
                false,
            )?;
        }
        for k in (0..panels).rev() {
            let k0 = k * nb;
            let kb = nb.min(r - k0);
            let below = r - k0 - kb;
            if below > 0 {
                blas.gemm(
                    Op::T,
                    Op::N,
                    (kb, nrhs, below),
                    -1.0,
                    Operand::new(l + 4 * (k0 * r + k0 + kb) as u64, r, stride),
                    at(b, k0 + kb),
                    1.0,
                    at(y, k0),
                    batch,
                    false,
                )?;
            }
            blas.gemm(
                Op::T,
                Op::N,
                (kb, nrhs, kb),
                1.0,
                Operand::new(self.linv_of(k), nb, nb * nb),
                at(y, k0),
                0.0,
                at(b, k0),
                batch,
                false,
            )?;
        }
        Ok(())
    }

    fn copy_back(
        &self,
        gpu: &Gpu,
        dst: u64,
        stride: usize,
        rows: usize,
        cols: usize,
        batch: u32,
    ) -> Result<()> {
        let per = rows * cols;
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(per, 256).min(1024), batch, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ds, ldd, ss, lds, rows_i, cols_i) = (
            stride as i64,
            self.r as i32,
            (self.r * self.nb) as i64,
            self.r as i32,
            rows as i32,
            cols as i32,
        );
        let src = self.panel.device_ptr();
        // SAFETY: copy_block(float* dst, i64 dstride, int ldd, const float* src, i64 sstride,
        // int lds, int rows, int cols): copies a rows x cols block of each of `batch` matrices
        // from the panel workspace (sized batch * r * nb, rows <= r, cols <= nb) into the
        // caller's matrices.
        unsafe {
            gpu.launch(&self.copy)
                .arg(&dst)
                .arg(&ds)
                .arg(&ldd)
                .arg(&src)
                .arg(&ss)
                .arg(&lds)
                .arg(&rows_i)
                .arg(&cols_i)
                .launch(cfg)
        }
    }

    /// Whether any factorization since the last [`BatchedCholesky::reset`] hit a non-positive
    /// pivot (waits for the stream).
    pub fn failed(&self, gpu: &Gpu) -> Result<bool> {
        Ok(gpu.download(&self.info)?.iter().any(|&v| v != 0))
    }

    pub fn reset(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.memset_bytes(&mut self.info, 0)
    }
}
