//! Batched Cholesky `A_b = L_b L_b^T` of many r x r SPD matrices at once (the damped
//! Gauss-Newton preconditioners: b_out, b_in and b_out * b_in of them per BLAST iteration),
//! and the solves with the factors.
//!
//! Two-level left-looking blocked algorithm, every step over the whole batch in one launch,
//! `L` written out of place (to a buffer of this workspace, so that no panel is ever copied
//! back). The columns go in groups of `outer` (256) = `2^k nb` (nb = 64). For each group G:
//! 1. one strided-batched GEMM applies all finished columns to it,
//!    `A[g0.., G] -= L[g0.., ..g0] L[G, ..g0]^T` (N = 256: the matrix is read once per group,
//!    not once per 64 columns, which made the one-level version memory-bound);
//! 2. the `outer x outer` diagonal block is factored by 64-wide left-looking steps confined to
//!    it (small GEMMs and `chol_diag_q8`, which also writes each `L11^-1`);
//! 3. the group's inverse `L_GG^-1` is built from the 64-wide diagonal-block inverses in one
//!    launch (`chol_inv_group`: block forward substitution, one thread block per column block
//!    and matrix); for nb != 64 they are combined pairwise into 2 nb-, 4 nb-.. wide ones,
//!    `[La 0; Lba Lc]^-1 = [La^-1 0; -Lc^-1 Lba La^-1, Lc^-1]` (`chol_inv_place` plus two
//!    GEMMs per pair);
//! 4. one GEMM forms the whole panel below it, `L[below, G] = A[below, G] L_GG^-T`.
//!
//! The solves then run in 256-wide blocks through the stored `L_GG^-1`: 2 GEMMs per block
//! and pass (24 launches per solve at r = 1488 instead of 96 with 64-wide blocks).
//! `BLR_FACTORIZE_OUTER=64|128|256|512` and `BLR_FACTORIZE_NB=32|64|128` override the widths
//! (measurement aids; docs/perf/factorize-h100.md has the numbers).
//!
//! Why not cuSOLVER: its dense potrf is one matrix per call (hundreds of calls per iteration)
//! and its batched potrf targets tiny matrices (measured: docs/perf/factorize-h100.md).

use cudarc::driver::LaunchConfig;

use super::blas::{Cublas, Op, Operand};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;

/// Shared memory the diagonal kernel needs for a block of width `nb`: L and L^-1, nb x (nb + 1)
/// each.
fn diag_smem(nb: usize) -> usize {
    2 * nb * (nb + 1) * 4
}

const F: u64 = 4;

/// Workspace for factorizing up to `batch` r x r matrices and solving with the factors.
pub struct BatchedCholesky {
    r: usize,
    batch: usize,
    /// Width of the diagonal steps (64; 33 KB of shared memory for `chol_diag_q8`).
    nb: usize,
    /// Width of the column groups, of the panel GEMMs and of the solve blocks: `nb 2^k`.
    outer: usize,
    /// The factors `L_b` of the last factorization, `batch` r x r matrices (lower; zero above).
    lfac: DeviceBuffer<f32>,
    /// `levels[l]`: inverses of the diagonal blocks of width `nb 2^l` of the last
    /// factorization, `[block][matrix][w x w]` (ld w, zero above the diagonal); the last level
    /// has width `outer`.
    levels: Vec<DeviceBuffer<f32>>,
    /// `L_ba L_a^-1` of one pair while its inverse is combined.
    scratch: DeviceBuffer<f32>,
    info: DeviceBuffer<i32>,
    kernels: CholKernels,
    /// The diagonal-step kernel and its block size.
    diag: Kernel,
    diag_threads: u32,
    /// How a group's inverse is built (one launch for nb = 64, or pair by pair through GEMMs).
    inverse: GroupInverse,
}

/// How the group inverses `L_GG^-1` are formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum GroupInverse {
    /// Pair by pair: `chol_inv_place` and two GEMMs per pair (any nb).
    Pairs,
    /// `chol_inv_group`, fp32 on CUDA cores, whatever the GEMM precision.
    Cuda,
    /// `chol_inv_group_tc` (TF32 tensor cores) when the factorization runs its GEMMs on TF32,
    /// `chol_inv_group` otherwise (the default for nb = 64).
    Auto,
    /// `chol_inv_group_tc3` (3 TF32 products per product: about fp32 accuracy), always.
    Tc3,
    /// `chol_inv_group_tc`, always.
    Tc,
}

/// The kernels of factorize.cu the factorization launches.
#[derive(Clone)]
pub struct CholKernels {
    /// `chol_diag_q8` (diagonal blocks up to 64 wide).
    pub diag: Kernel,
    /// `chol_diag_q8w` (up to 128 wide).
    pub diag_wide: Kernel,
    /// `chol_inv_place`.
    pub place: Kernel,
    /// `chol_inv_group`.
    pub group: Kernel,
    /// `chol_inv_group_tc` (TF32 tensor cores).
    pub group_tc: Kernel,
    /// `chol_inv_group_tc3` (3xTF32 tensor cores).
    pub group_tc3: Kernel,
}

fn env_width(name: &str, allowed: &[usize]) -> Option<usize> {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|v| allowed.contains(v))
}

impl BatchedCholesky {
    /// The measured defaults (nb = 64, groups of 256), or the `BLR_FACTORIZE_NB` /
    /// `BLR_FACTORIZE_OUTER` overrides.
    pub fn new(gpu: &Gpu, kernels: &CholKernels, r: usize, batch: usize) -> Result<Self> {
        let nb = env_width("BLR_FACTORIZE_NB", &[32, 64, 128]).unwrap_or(64);
        let outer = env_width("BLR_FACTORIZE_OUTER", &[32, 64, 128, 256, 512])
            .unwrap_or(256)
            .max(nb);
        let variant = std::env::var("BLR_FACTORIZE_INV").unwrap_or_default();
        Self::with_widths(gpu, kernels, r, batch, (nb, outer), &variant)
    }

    /// `nb` in 32, 64, 128; `outer` = `nb 2^k` (rounded down to one, at least nb). `variant`
    /// (`BLR_FACTORIZE_INV`, a measurement aid): "pairs" builds the group inverses pair by pair
    /// through GEMMs, as for nb != 64; "cuda", "tc", "tc3" use `chol_inv_group`,
    /// `chol_inv_group_tc` or `chol_inv_group_tc3` whatever the GEMM precision; anything else
    /// is the default (tensor cores with TF32 GEMMs, CUDA cores with fp32 ones).
    pub fn with_widths(
        gpu: &Gpu,
        kernels: &CholKernels,
        r: usize,
        batch: usize,
        (nb, outer): (usize, usize),
        variant: &str,
    ) -> Result<Self> {
        let optin = gpu.info().max_smem_per_block_optin.0 as usize;
        if ![32, 64, 128].contains(&nb) || diag_smem(nb) > optin {
            return Err(Error::Shape(format!(
                "Cholesky panel width {nb}: use 32, 64 or 128 (shared memory {optin} bytes)"
            )));
        }
        // BLR_FACTORIZE_DIAG_THREADS=128|256|512 (measurement aid): the diagonal kernel's
        // block size.
        let diag = if nb > 64 {
            kernels.diag_wide.clone()
        } else {
            kernels.diag.clone()
        };
        let diag_threads =
            env_width("BLR_FACTORIZE_DIAG_THREADS", &[128, 256, 512]).map_or(256, |t| t as u32);
        diag.set_max_dynamic_smem(diag_smem(nb) as u32)?;
        // Levels: nb, 2 nb, .. up to outer, but no wider than the matrix needs.
        let mut widths = vec![nb];
        while widths.last().is_some_and(|&w| 2 * w <= outer && w < r) {
            let w = 2 * widths[widths.len() - 1];
            widths.push(w);
        }
        let outer = widths[widths.len() - 1];
        let mut levels = Vec::with_capacity(widths.len());
        for &w in &widths {
            levels.push(gpu.alloc_zeros::<f32>(
                r.div_ceil(w) * batch * w * w,
                "Cholesky diagonal-block inverses",
            )?);
        }
        let half = (outer / 2).max(1);
        Ok(Self {
            r,
            batch,
            nb,
            outer,
            lfac: gpu.alloc_zeros::<f32>(batch * r * r, "Cholesky factors")?,
            levels,
            scratch: gpu.alloc_zeros::<f32>(batch * half * half, "Cholesky inverse scratch")?,
            info: gpu.alloc_zeros::<i32>(batch, "Cholesky status")?,
            kernels: kernels.clone(),
            diag,
            diag_threads,
            inverse: match variant {
                _ if nb != 64 => GroupInverse::Pairs,
                "pairs" => GroupInverse::Pairs,
                "cuda" => GroupInverse::Cuda,
                "tc" => GroupInverse::Tc,
                "tc3" => GroupInverse::Tc3,
                _ => GroupInverse::Auto,
            },
        })
    }

    /// The block width of the solves (and of the column groups).
    #[cfg(test)]
    pub fn outer(&self) -> usize {
        self.outer
    }

    /// Address of block `k` (matrix 0) of level `l` (width `nb 2^l`).
    fn inv_of(&self, l: usize, k: usize) -> u64 {
        let w = self.nb << l;
        self.levels[l].device_ptr() + F * (k * self.batch * w * w) as u64
    }

    /// The factors of the last factorization, `batch` r x r column-major matrices.
    #[cfg(test)]
    pub fn factors(&self, gpu: &Gpu, batch: usize) -> Result<Vec<f32>> {
        gpu.download_prefix(&self.lfac, batch.min(self.batch) * self.r * self.r)
    }

    /// Factorizes `batch` matrices at `a` (`stride` elements apart, ld r) into this
    /// workspace's factor buffer; `a` is overwritten with intermediate values. A failed pivot
    /// is recorded, not raised: see [`BatchedCholesky::failed`]. `mark` names the phases for
    /// the profile.
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
        let (r, nb, outer) = (self.r, self.nb, self.outer);
        if batch > self.batch {
            return Err(Error::Shape(format!(
                "batched Cholesky of {batch} matrices with a workspace for {}",
                self.batch
            )));
        }
        let batch_i = u32::try_from(batch).map_err(|_| Error::Shape("batch too large".into()))?;
        let lf = self.lfac.device_ptr();
        let rr = r * r;
        let a_at = |row: usize, col: usize| Operand::new(a + F * (col * r + row) as u64, r, stride);
        let l_at = |row: usize, col: usize| Operand::new(lf + F * (col * r + row) as u64, r, rr);
        let mut g0 = 0usize;
        while g0 < r {
            let gw = outer.min(r - g0);
            if g0 > 0 {
                // A[g0.., G] -= L[g0.., ..g0] L[G, ..g0]^T.
                blas.gemm(
                    Op::N,
                    Op::T,
                    (r - g0, gw, g0),
                    -1.0,
                    l_at(g0, 0),
                    l_at(g0, 0),
                    1.0,
                    a_at(g0, g0),
                    batch,
                    tf32,
                )?;
                mark("chol: update")?;
            }
            let g1 = g0 + gw;
            let mut k0 = g0;
            while k0 < g1 {
                let kb = nb.min(g1 - k0);
                if k0 > g0 {
                    // Inside the group: A[k0..g1, k0..k0+kb] -= L[k0..g1, g0..k0] L[k0.., g0..k0]^T.
                    blas.gemm(
                        Op::N,
                        Op::T,
                        (g1 - k0, kb, k0 - g0),
                        -1.0,
                        l_at(k0, g0),
                        l_at(k0, g0),
                        1.0,
                        a_at(k0, k0),
                        batch,
                        tf32,
                    )?;
                }
                self.launch_diag(gpu, a, stride, k0, kb, batch_i)?;
                let rem = g1 - k0 - kb;
                if rem > 0 {
                    // L[k0+kb..g1, k0..k0+kb] = A[..] L11^-T.
                    blas.gemm(
                        Op::N,
                        Op::T,
                        (rem, kb, kb),
                        1.0,
                        a_at(k0 + kb, k0),
                        Operand::new(self.inv_of(0, k0 / nb), nb, nb * nb),
                        0.0,
                        l_at(k0 + kb, k0),
                        batch,
                        tf32,
                    )?;
                }
                k0 += kb;
            }
            mark("chol: diag block")?;
            self.combine(gpu, blas, g0, g1, batch, tf32)?;
            mark("chol: inverses")?;
            if g1 < r {
                // L[g1.., G] = A[g1.., G] L_GG^-T.
                let top = self.levels.len() - 1;
                blas.gemm(
                    Op::N,
                    Op::T,
                    (r - g1, gw, gw),
                    1.0,
                    a_at(g1, g0),
                    Operand::new(self.inv_of(top, g0 / outer), outer, outer * outer),
                    0.0,
                    l_at(g1, g0),
                    batch,
                    tf32,
                )?;
                mark("chol: panel")?;
            }
            g0 = g1;
        }
        Ok(())
    }

    fn launch_diag(
        &self,
        gpu: &Gpu,
        a: u64,
        stride: usize,
        k0: usize,
        kb: usize,
        batch: u32,
    ) -> Result<()> {
        let (astride, lstride, lda, k0_i, kb_i, nb_i) = (
            stride as i64,
            (self.r * self.r) as i64,
            self.r as i32,
            k0 as i32,
            kb as i32,
            self.nb as i32,
        );
        let (l, linv, info) = (
            self.lfac.device_ptr(),
            self.inv_of(0, k0 / self.nb),
            self.info.device_ptr(),
        );
        let cfg = LaunchConfig {
            grid_dim: (batch, 1, 1),
            block_dim: (self.diag_threads, 1, 1),
            shared_mem_bytes: diag_smem(kb) as u32,
        };
        // SAFETY: chol_diag_q8 / chol_diag_q8w(const float* a, i64 astride, float* l, i64 lstride, int lda,
        // int k0, int kb, float* linv, int nb, int* info): block b reads
        // a[b*astride + (k0..k0+kb)^2] (the caller's `batch` r x r matrices, ld r), writes the
        // same entries of l (self.lfac, batch <= self.batch matrices r*r apart), linv[b*nb*nb..]
        // (block k0/nb of level 0, sized for self.batch) and info[b].
        unsafe {
            gpu.launch(&self.diag)
                .arg(&a)
                .arg(&astride)
                .arg(&l)
                .arg(&lstride)
                .arg(&lda)
                .arg(&k0_i)
                .arg(&kb_i)
                .arg(&linv)
                .arg(&nb_i)
                .arg(&info)
                .launch(cfg)
        }
    }

    /// Builds the inverses of the diagonal blocks of widths 2 nb .. outer inside the group
    /// of columns `g0..g1` from the nb-wide ones (`tf32`: the factorization's GEMM precision).
    fn combine(
        &self,
        gpu: &Gpu,
        blas: &Cublas,
        g0: usize,
        g1: usize,
        batch: usize,
        tf32: bool,
    ) -> Result<()> {
        let r = self.r;
        if self.levels.len() > 1 && self.inverse != GroupInverse::Pairs {
            let kernel = match self.inverse {
                GroupInverse::Tc => &self.kernels.group_tc,
                GroupInverse::Auto if tf32 => &self.kernels.group_tc,
                GroupInverse::Tc3 => &self.kernels.group_tc3,
                _ => &self.kernels.group,
            };
            let top = self.levels.len() - 1;
            let nbk =
                u32::try_from((g1 - g0).div_ceil(64)).map_err(|_| Error::Shape("nbk".into()))?;
            let batch_u = u32::try_from(batch).map_err(|_| Error::Shape("batch".into()))?;
            let cfg = LaunchConfig {
                grid_dim: (nbk, batch_u, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (lf, lstride, r_i, g0_i, gw_i) = (
                self.lfac.device_ptr(),
                (r * r) as i64,
                r as i32,
                g0 as i32,
                (g1 - g0) as i32,
            );
            let (lin, lin_block, out, outer_i) = (
                self.levels[0].device_ptr(),
                (self.batch * 64 * 64) as i64,
                self.inv_of(top, g0 / self.outer),
                self.outer as i32,
            );
            // SAFETY: chol_inv_group / _tc / _tc3 (same signature)(const float* lfac, i64 lstride, int r, int g0, int gw,
            // const float* linv0, i64 lin_block, float* out, int outer): block (j, b) reads
            // the factor entries of matrix b < batch <= self.batch inside rows/columns
            // g0..g0+gw (< r, guarded), level-0 inverses g0/64 .. (g0+gw).div_ceil(64) of
            // matrix b, and writes column block j < gw.div_ceil(64) of matrix b's outer x outer
            // slot of the top level (block g0 / outer), all inside their buffers.
            unsafe {
                gpu.launch(kernel)
                    .arg(&lf)
                    .arg(&lstride)
                    .arg(&r_i)
                    .arg(&g0_i)
                    .arg(&gw_i)
                    .arg(&lin)
                    .arg(&lin_block)
                    .arg(&out)
                    .arg(&outer_i)
                    .launch(cfg)?;
            }
            return Ok(());
        }
        for l in 0..self.levels.len() - 1 {
            let w = self.nb << l;
            let (t0, t1) = (g0 / (2 * w), g1.div_ceil(2 * w));
            let pairs = u32::try_from(t1 - t0).map_err(|_| Error::Shape("pairs".into()))?;
            let batch_u = u32::try_from(batch).map_err(|_| Error::Shape("batch".into()))?;
            let cfg = LaunchConfig {
                grid_dim: (Gpu::grid_1d(4 * w * w, 256).min(64), pairs, batch_u),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (lin, lout) = (self.inv_of(l, 0), self.inv_of(l + 1, 0));
            let (w_i, r_i, t0_i) = (w as i32, r as i32, t0 as i32);
            let (lin_block, lout_block) =
                ((self.batch * w * w) as i64, (self.batch * 4 * w * w) as i64);
            // SAFETY: chol_inv_place(const float* lin, float* lout, int w, int r, int t0,
            // i64 lin_block, i64 lout_block): reads blocks 2t, 2t+1 (those that exist, t in
            // t0..t1) of level l and writes block t of level l + 1, matrices 0..batch, all
            // inside the level buffers sized r.div_ceil(w) * self.batch * w * w.
            unsafe {
                gpu.launch(&self.kernels.place)
                    .arg(&lin)
                    .arg(&lout)
                    .arg(&w_i)
                    .arg(&r_i)
                    .arg(&t0_i)
                    .arg(&lin_block)
                    .arg(&lout_block)
                    .launch(cfg)?;
            }
            let lf = self.lfac.device_ptr();
            let scratch = self.scratch.device_ptr();
            for t in t0..t1 {
                let k0 = 2 * t * w;
                let w1 = w.min(r - k0);
                let w2 = (r - k0).saturating_sub(w).min(w);
                if w2 == 0 {
                    continue;
                }
                // S = L_ba L_a^-1 (w2 x w1), then the lower-left block -Lc^-1 S.
                blas.gemm(
                    Op::N,
                    Op::N,
                    (w2, w1, w1),
                    1.0,
                    Operand::new(lf + F * (k0 * r + k0 + w) as u64, r, r * r),
                    Operand::new(self.inv_of(l, 2 * t), w, w * w),
                    0.0,
                    Operand::new(scratch, w, w * w),
                    batch,
                    false,
                )?;
                blas.gemm(
                    Op::N,
                    Op::N,
                    (w2, w1, w2),
                    -1.0,
                    Operand::new(self.inv_of(l, 2 * t + 1), w, w * w),
                    Operand::new(scratch, w, w * w),
                    0.0,
                    Operand::new(self.inv_of(l + 1, t) + F * w as u64, 2 * w, 4 * w * w),
                    batch,
                    false,
                )?;
            }
        }
        Ok(())
    }

    /// `B_b <- (L_b L_b^T)^-1 B_b` for the factors of the last [`BatchedCholesky::factor`],
    /// `B_b` (r, nrhs); `y` is scratch of the same layout. Blocked substitution in `outer`-wide
    /// blocks through the stored block inverses: every step is a strided-batched GEMM
    /// (forward `Y_k = L_kk^-1 (B_k - L_k,<k Y_<k)`, then backward from Y into B). `tf32`
    /// runs them on TF32 tensor cores.
    #[allow(clippy::too_many_arguments)]
    pub fn solve(
        &self,
        blas: &Cublas,
        batch: usize,
        b: Operand,
        y: Operand,
        nrhs: usize,
        tf32: bool,
    ) -> Result<()> {
        let (r, w) = (self.r, self.outer);
        let l = self.lfac.device_ptr();
        let rr = r * r;
        let top = self.levels.len() - 1;
        let blocks = r.div_ceil(w);
        let at = |op: Operand, row: usize| Operand::new(op.ptr + F * row as u64, op.ld, op.stride);
        for k in 0..blocks {
            let k0 = k * w;
            let kb = w.min(r - k0);
            if k0 > 0 {
                blas.gemm(
                    Op::N,
                    Op::N,
                    (kb, nrhs, k0),
                    -1.0,
                    Operand::new(l + F * k0 as u64, r, rr),
                    y,
                    1.0,
                    at(b, k0),
                    batch,
                    tf32,
                )?;
            }
            blas.gemm(
                Op::N,
                Op::N,
                (kb, nrhs, kb),
                1.0,
                Operand::new(self.inv_of(top, k), w, w * w),
                at(b, k0),
                0.0,
                at(y, k0),
                batch,
                tf32,
            )?;
        }
        for k in (0..blocks).rev() {
            let k0 = k * w;
            let kb = w.min(r - k0);
            let below = r - k0 - kb;
            if below > 0 {
                blas.gemm(
                    Op::T,
                    Op::N,
                    (kb, nrhs, below),
                    -1.0,
                    Operand::new(l + F * (k0 * r + k0 + kb) as u64, r, rr),
                    at(b, k0 + kb),
                    1.0,
                    at(y, k0),
                    batch,
                    tf32,
                )?;
            }
            blas.gemm(
                Op::T,
                Op::N,
                (kb, nrhs, kb),
                1.0,
                Operand::new(self.inv_of(top, k), w, w * w),
                at(y, k0),
                0.0,
                at(b, k0),
                batch,
                tf32,
            )?;
        }
        Ok(())
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
