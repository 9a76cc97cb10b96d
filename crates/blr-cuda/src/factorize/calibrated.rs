//! Calibrated (Gram-weighted) BLAST on the GPU: the iteration of `blr_compress::blast_report`
//! with a calibration, step for step, and the calibrated low-rank factorization it starts from
//! (the whitened SVD, [`lowrank_calibrated`]).
//!
//! Notation as in mod.rs and blr-compress's blast.rs: `A = W / scale` (m, n), blocks `p x q`,
//! `G'` (n, n) the normalised damped Gram (`Calibration::weight_f32`), `T = A G'` formed once,
//! `J_i = U_i^T U_i`, `VGV_jj' = V_j^T G'_jj' V_j'` (all b_in^2 pairs), `GV_j' = G'[:, j'] V_j'`.
//! One iteration, at step `2 lr` (lr decayed linearly), damping `eps = damping ||E||` from the
//! factored loss `1/2 (tr(A G' A^T) - 2 <T, Â> + tr(Â G' Â^T))` before each sub-step:
//! - U (exact Gauss-Newton, as data-free with `T` for `A`): `P_i = sum_jj' (s_ij s_ij'^T) ⊙
//!   VGV_jj'`, `grad_i = U_i P_i - sum_j T_ij V_j diag(s_ij)`, `U_i -= step grad_i (P_i + eps I)^-1`;
//! - V: `Q_jj' = sum_i (s_ij s_ij'^T) ⊙ J_i`, `grad_j^T = sum_j' Q_jj' V_j'^T G'_j'j -
//!   sum_i diag(s_ij) U_i^T T_ij`, direction `(Q_jj + eps I)^-1 grad_j^T G'_jj^-1`, then the
//!   exact line search of the CPU path (one more loss evaluation, step capped at `2 lr`);
//! - S: `grad_ij = sum_j' (J_i ⊙ VGV_jj') s_ij' - diag(U_i^T T_ij V_j)`, direction
//!   `(J_i ⊙ VGV_jj + eps I)^-1 grad_ij`, the same line search.
//!
//! Every product is a cuBLAS strided-batched GEMM (`T V_j`, `U_i^T T`, `G'[j rows] V_j`, the
//! `VGV` blocks, `Q_jj' (V_j'^T G'_j'j)`, the Grams and gradient GEMMs), the solves go through
//! the batched Cholesky of chol.rs (b_out, b_in, b_out b_in matrices of r x r per iteration,
//! and b_in of q x q once for `G'_jj^-1`), the Hadamard mixings are calibrated.cu. The line
//! searches read three loss terms back (two host synchronisations per iteration), so there is
//! no CUDA graph here. Layouts are column-major and match mod.rs: `at = A^T` (n, m), `tt = T^T`,
//! `U^T` (r, m), `V^T` (r, n), `GV_j'^T` (r, n) back to back.

use cudarc::driver::LaunchConfig;

use blr_compress::{
    blast_start, line_search, BlastInit, BlastMethod, BlastOptions, BlastReport, BlastStart,
    Calibration, Progress, Target,
};
use blr_core::{Blast, Linear, LowRank};

use super::blas::{Cublas, Op, Operand};
use super::chol::BatchedCholesky;
use super::{grid, svd, GemmPrecision, GpuBlastOptions, Kernels, F};
use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;

/// The source of `calibrated.cu`.
pub const CALIBRATED_CU: KernelSource = crate::kernel_source!("calibrated.cu");

/// Outputs per thread of the mixing kernels (CAL_X in calibrated.cu).
const CAL_X: usize = 8;

#[derive(Clone)]
struct CalKernels {
    mix_p: Kernel,
    mix_q: Kernel,
    hs: Kernel,
    copy_blocks: Kernel,
    gather_diag: Kernel,
    axpby: Kernel,
    add_diag: Kernel,
}

impl CalKernels {
    fn load(gpu: &Gpu) -> Result<Self> {
        let m = gpu.load_module(&CALIBRATED_CU, &CompileOptions::default())?;
        Ok(Self {
            mix_p: m.function("cal_mix_p")?,
            mix_q: m.function("cal_mix_q")?,
            hs: m.function("cal_hs")?,
            copy_blocks: m.function("cal_copy_blocks")?,
            gather_diag: m.function("cal_gather_diag")?,
            axpby: m.function("cal_axpby")?,
            add_diag: m.function("cal_add_diag")?,
        })
    }
}

/// f64 slots of the loss terms: (cross, quad) pairs, and the two `g . d` of the line searches.
const U_LOSS: i32 = 0;
const V_LOSS0: i32 = 2;
const V_GD: i32 = 4;
const V_LOSS1: i32 = 5;
const S_LOSS0: i32 = 7;
const S_GD: i32 = 9;
const S_LOSS1: i32 = 10;
const S_LOSS2: i32 = 12;
const NUM: i32 = 14;
const DEN: i32 = 15;
const SLOTS: usize = 16;

/// All device state of one calibrated factorization.
struct CalSolver<'g> {
    gpu: &'g Gpu,
    k: Kernels,
    c: CalKernels,
    blas: Cublas,
    /// TF32 for the two data GEMM families (`T V_j`, `U_i^T T`).
    tf32: bool,
    /// TF32 for the other iteration GEMMs and the Cholesky factorizations.
    tf32_rest: bool,
    m: usize,
    n: usize,
    r: usize,
    b_out: usize,
    b_in: usize,
    p: usize,
    q: usize,
    damping: f64,
    /// `tr(A G' A^T)`.
    norm_sq: f64,
    at: DeviceBuffer<f32>,
    tt: DeviceBuffer<f32>,
    g: DeviceBuffer<f32>,
    /// `G'_jj^-1`, b_in q x q matrices.
    ginv: DeviceBuffer<f32>,
    u: DeviceBuffer<f32>,
    vt: DeviceBuffer<f32>,
    vt_old: DeviceBuffer<f32>,
    s: DeviceBuffer<f32>,
    s_old: DeviceBuffer<f32>,
    jm: DeviceBuffer<f32>,
    vgv: DeviceBuffer<f32>,
    gvt: DeviceBuffer<f32>,
    qm: DeviceBuffer<f32>,
    /// Diagonal blocks (Q_jj + eps I, or VGV_jj), b_in r x r.
    blocks: DeviceBuffer<f32>,
    pm: DeviceBuffer<f32>,
    /// `T_j^T`-products of the U step / `U_i^T T_i` of the V and S steps / final residual.
    big: DeviceBuffer<f32>,
    rhs: DeviceBuffer<f32>,
    grad: DeviceBuffer<f32>,
    grad_keep: DeviceBuffer<f32>,
    dir: DeviceBuffer<f32>,
    h: DeviceBuffer<f32>,
    d: DeviceBuffer<f32>,
    hs: DeviceBuffer<f32>,
    hs_scratch: DeviceBuffer<f32>,
    sg: DeviceBuffer<f32>,
    sg_keep: DeviceBuffer<f32>,
    scal: DeviceBuffer<f64>,
    chol: BatchedCholesky,
    ysolve: DeviceBuffer<f32>,
}

impl<'g> CalSolver<'g> {
    #[allow(clippy::too_many_arguments)]
    fn new(
        gpu: &'g Gpu,
        a: &[f32],
        gprime: &[f32],
        (m, n, r, b_out, b_in): (usize, usize, usize, usize, usize),
        damping: f64,
        precision: GemmPrecision,
        name: &str,
    ) -> Result<Self> {
        let (p, q) = (m / b_out, n / b_in);
        let k = Kernels::load(gpu)?;
        let c = CalKernels::load(gpu)?;
        let blas = Cublas::new(gpu)?;
        let rr = r * r;
        let nblk = b_out * b_in;
        let at = gpu.upload(a, "calibrated BLAST A^T")?;
        let g = gpu.upload(gprime, "calibrated BLAST G'")?;
        let tt = gpu.alloc_zeros::<f32>(n * m, "calibrated BLAST T^T")?;
        // T^T = G' A^T (G' symmetric), once, in fp32.
        blas.gemm(
            Op::N,
            Op::N,
            (n, m, n),
            1.0,
            Operand::new(g.device_ptr(), n, 0),
            Operand::new(at.device_ptr(), n, 0),
            0.0,
            Operand::new(tt.device_ptr(), n, 0),
            1,
            false,
        )?;
        let chol = BatchedCholesky::new(gpu, &k.chol, r, nblk.max(b_out).max(b_in))?;
        let mut this = Self {
            gpu,
            blas,
            tf32: precision != GemmPrecision::Fp32,
            tf32_rest: precision == GemmPrecision::Tf32,
            m,
            n,
            r,
            b_out,
            b_in,
            p,
            q,
            damping,
            norm_sq: 0.0,
            at,
            tt,
            g,
            ginv: gpu.alloc_zeros::<f32>(b_in * q * q, "calibrated BLAST G'_jj^-1")?,
            u: gpu.alloc_zeros::<f32>(m * r, "calibrated BLAST U^T")?,
            vt: gpu.alloc_zeros::<f32>(r * n, "calibrated BLAST V^T")?,
            vt_old: gpu.alloc_zeros::<f32>(r * n, "calibrated BLAST V^T before the step")?,
            s: gpu.alloc_zeros::<f32>(nblk * r, "calibrated BLAST S")?,
            s_old: gpu.alloc_zeros::<f32>(nblk * r, "calibrated BLAST S before the step")?,
            jm: gpu.alloc_zeros::<f32>(b_out * rr, "calibrated BLAST U_i^T U_i")?,
            vgv: gpu.alloc_zeros::<f32>(b_in * b_in * rr, "calibrated BLAST V^T G' V blocks")?,
            gvt: gpu.alloc_zeros::<f32>(b_in * r * n, "calibrated BLAST (G' V_j)^T")?,
            qm: gpu.alloc_zeros::<f32>(b_in * b_in * rr, "calibrated BLAST Q_jj'")?,
            blocks: gpu.alloc_zeros::<f32>(b_in * rr, "calibrated BLAST diagonal blocks")?,
            pm: gpu.alloc_zeros::<f32>(b_out * rr, "calibrated BLAST P_i")?,
            big: gpu.alloc_zeros::<f32>(
                (b_in * m * r).max(b_out * r * n).max(nblk * p * r),
                "calibrated BLAST T V / U^T T",
            )?,
            rhs: gpu.alloc_zeros::<f32>(m * r, "calibrated BLAST U gradient")?,
            grad: gpu.alloc_zeros::<f32>(r * n, "calibrated BLAST V gradient")?,
            grad_keep: gpu.alloc_zeros::<f32>(r * n, "calibrated BLAST V gradient copy")?,
            dir: gpu.alloc_zeros::<f32>(r * n, "calibrated BLAST V direction")?,
            h: gpu.alloc_zeros::<f32>(nblk * rr, "calibrated BLAST S preconditioners")?,
            d: gpu.alloc_zeros::<f32>(nblk * r, "calibrated BLAST diag(U^T T V)")?,
            hs: gpu.alloc_zeros::<f32>(nblk * r, "calibrated BLAST H s")?,
            hs_scratch: gpu.alloc_zeros::<f32>(nblk * r, "calibrated BLAST H_jj s")?,
            sg: gpu.alloc_zeros::<f32>(nblk * r, "calibrated BLAST S gradient")?,
            sg_keep: gpu.alloc_zeros::<f32>(nblk * r, "calibrated BLAST S gradient copy")?,
            scal: gpu.alloc_zeros::<f64>(SLOTS, "calibrated BLAST loss terms")?,
            chol,
            ysolve: gpu.alloc_zeros::<f32>(
                (r * m).max(r * n).max(nblk * r),
                "calibrated BLAST solve scratch",
            )?,
            k,
            c,
        };
        this.dot(this.tt.device_ptr(), this.at.device_ptr(), m * n, NUM)?;
        this.norm_sq = this.gpu.download(&this.scal)?[NUM as usize];
        this.invert_diag_gram(name)?;
        Ok(this)
    }

    /// `ginv_j = G'_jj^-1` by a batched Cholesky of the q x q diagonal blocks and a solve on
    /// the identity (fp32; the CPU path uses the f64 Cholesky of the same blocks).
    fn invert_diag_gram(&mut self, name: &str) -> Result<()> {
        let (n, q, b_in) = (self.n, self.q, self.b_in);
        let qq = q * q;
        let gd = self
            .gpu
            .alloc_zeros::<f32>(b_in * qq, "calibrated BLAST G'_jj")?;
        let y = self
            .gpu
            .alloc_zeros::<f32>(b_in * qq, "calibrated BLAST solve scratch")?;
        let (dst, eye, g) = (gd.device_ptr(), self.ginv.device_ptr(), self.g.device_ptr());
        let (ni, qi, bi) = (n as i32, q as i32, b_in as i32);
        // SAFETY: cal_gather_diag(float* dst, float* eye, const float* g, int n, int q,
        // int b_in): dst and eye hold b_in q x q matrices, g is n x n with n = b_in q.
        unsafe {
            self.gpu
                .launch(&self.c.gather_diag)
                .arg(&dst)
                .arg(&eye)
                .arg(&g)
                .arg(&ni)
                .arg(&qi)
                .arg(&bi)
                .launch(grid(self.gpu, b_in * qq))?;
        }
        let mut gchol = BatchedCholesky::new(self.gpu, &self.k.chol, q, b_in)?;
        gchol.reset(self.gpu)?;
        gchol.factor(self.gpu, &self.blas, dst, qq, b_in, false, &|_| Ok(()))?;
        gchol.solve(
            &self.blas,
            b_in,
            Operand::new(eye, q, qq),
            Operand::new(y.device_ptr(), q, qq),
            q,
            false,
        )?;
        if gchol.failed(self.gpu)? {
            return Err(Error::Numerical {
                during: format!("calibrated BLAST of {name} on the GPU"),
                reason: "a diagonal block of the calibration Gram is not positive definite in \
                         fp32; raise --calib-damping or use --device cpu"
                    .into(),
            });
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn gemm(
        &self,
        ops: (Op, Op),
        dims: (usize, usize, usize),
        alpha: f32,
        a: Operand,
        b: Operand,
        beta: f32,
        c: Operand,
        batch: usize,
    ) -> Result<()> {
        self.blas.gemm(
            ops.0,
            ops.1,
            dims,
            alpha,
            a,
            b,
            beta,
            c,
            batch,
            self.tf32_rest,
        )
    }

    fn dot(&self, x: u64, y: u64, len: usize, slot: i32) -> Result<()> {
        let n = len as i64;
        let scal = self.scal.device_ptr();
        let weight = 1.0f64;
        // SAFETY: dot_acc(const float* x, const float* y, i64 n, double* scal, int slot,
        // double weight): x and y are live buffers of >= len floats; slot < SLOTS.
        unsafe {
            self.gpu
                .launch(&self.k.dot)
                .arg(&x)
                .arg(&y)
                .arg(&n)
                .arg(&scal)
                .arg(&slot)
                .arg(&weight)
                .launch(grid(self.gpu, len))
        }
    }

    /// `y = x - alpha d` over `len` floats (y may be x).
    fn axpby(&self, y: u64, x: u64, d: u64, alpha: f64, len: usize) -> Result<()> {
        let (alpha, n) = (alpha as f32, len as i64);
        // SAFETY: cal_axpby(float* y, const float* x, const float* d, float alpha, i64 n):
        // all three hold >= len floats.
        unsafe {
            self.gpu
                .launch(&self.c.axpby)
                .arg(&y)
                .arg(&x)
                .arg(&d)
                .arg(&alpha)
                .arg(&n)
                .launch(grid(self.gpu, len))
        }
    }

    /// `dst_b = src_(b src_stride)` (+ eps I from the loss terms at `base` when `base >= 0`).
    fn copy_blocks(
        &self,
        dst: u64,
        src: u64,
        src_stride: usize,
        batch: usize,
        base: i32,
    ) -> Result<()> {
        let (r, stride, b) = (self.r as i32, src_stride as i64, batch as i32);
        let scal = self.scal.device_ptr();
        // SAFETY: cal_copy_blocks(float* dst, const float* src, int r, i64 src_stride,
        // int batch, const double* scal, int base, double norm_sq, double damping): dst holds
        // batch r x r matrices, src (batch - 1) * src_stride + r^2 floats; base < SLOTS - 1.
        unsafe {
            self.gpu
                .launch(&self.c.copy_blocks)
                .arg(&dst)
                .arg(&src)
                .arg(&r)
                .arg(&stride)
                .arg(&b)
                .arg(&scal)
                .arg(&base)
                .arg(&self.norm_sq)
                .arg(&self.damping)
                .launch(grid(self.gpu, batch * self.r * self.r))
        }
    }

    fn add_eps(&self, a: u64, batch: usize, base: i32) -> Result<()> {
        let (stride, r, b) = ((self.r * self.r) as i64, self.r as i32, batch as i32);
        let scal = self.scal.device_ptr();
        // SAFETY: add_eps_diag(float* a, i64 stride, int r, int batch, const double* scal,
        // int base, double norm_sq, double damping): a holds batch r x r matrices.
        unsafe {
            self.gpu
                .launch(&self.k.add_eps)
                .arg(&a)
                .arg(&stride)
                .arg(&r)
                .arg(&b)
                .arg(&scal)
                .arg(&base)
                .arg(&self.norm_sq)
                .arg(&self.damping)
                .launch(grid(self.gpu, self.r * batch))
        }
    }

    /// `d_ij = diag(UT_i[:, j block] V_j)` from `big` = `U_i^T T_i` and the current V.
    fn diag_products(&self) -> Result<()> {
        let (r, n, q, b_in) = (
            self.r as i32,
            self.n as i32,
            self.q as i32,
            self.b_in as i32,
        );
        let cfg = LaunchConfig {
            grid_dim: (
                Gpu::grid_1d(self.r, 128),
                (self.b_out * self.b_in) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (d, ut, vt) = (
            self.d.device_ptr(),
            self.big.device_ptr(),
            self.vt.device_ptr(),
        );
        let from_av = 0i32;
        // SAFETY: blast_diag(float* d, const float* x, const float* y, int r, int len, int w,
        // int b_in, int from_av = 0): d holds b_out*b_in*r, x = ut b_out (r, n) matrices,
        // y = vt (r, n).
        unsafe {
            self.gpu
                .launch(&self.k.diag)
                .arg(&d)
                .arg(&ut)
                .arg(&vt)
                .arg(&r)
                .arg(&n)
                .arg(&q)
                .arg(&b_in)
                .arg(&from_av)
                .launch(cfg)
        }
    }

    /// `hs_ij = sum_j' (J_i ⊙ VGV_jj') s_ij'` for the current s.
    fn h_times_s(&self) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (
                Gpu::grid_1d(self.r, 128),
                self.b_in as u32,
                self.b_out.div_ceil(CAL_X) as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (hs, jm, vgv, s) = (
            self.hs.device_ptr(),
            self.jm.device_ptr(),
            self.vgv.device_ptr(),
            self.s.device_ptr(),
        );
        let (r, bo, bi) = (self.r as i32, self.b_out as i32, self.b_in as i32);
        // SAFETY: cal_hs(float* hs, const float* jm, const float* vgv, const float* s, int r,
        // int b_out, int b_in): hs and s hold b_out*b_in*r, jm b_out and vgv b_in^2 r x r.
        unsafe {
            self.gpu
                .launch(&self.c.hs)
                .arg(&hs)
                .arg(&jm)
                .arg(&vgv)
                .arg(&s)
                .arg(&r)
                .arg(&bo)
                .arg(&bi)
                .launch(cfg)
        }
    }

    fn u_gram(&self) -> Result<()> {
        let (p, r) = (self.p, self.r);
        let u = self.u.device_ptr();
        self.gemm(
            (Op::N, Op::T),
            (r, r, p),
            1.0,
            Operand::new(u, r, p * r),
            Operand::new(u, r, p * r),
            0.0,
            Operand::new(self.jm.device_ptr(), r, r * r),
            self.b_out,
        )
    }

    /// `GV_j'^T = V_j'^T G'[j' rows, :]` (r, n) and `VGV_jj' = V_j^T G'_jj' V_j'` for the
    /// current V.
    fn vgv(&self) -> Result<()> {
        let (n, q, r, b_in) = (self.n, self.q, self.r, self.b_in);
        let (vt, g, gvt, vgv) = (
            self.vt.device_ptr(),
            self.g.device_ptr(),
            self.gvt.device_ptr(),
            self.vgv.device_ptr(),
        );
        self.gemm(
            (Op::N, Op::N),
            (r, n, q),
            1.0,
            Operand::new(vt, r, q * r),
            Operand::new(g, n, q),
            0.0,
            Operand::new(gvt, r, r * n),
            b_in,
        )?;
        for j2 in 0..b_in {
            // VGV_jj' = V_j^T (GV_j'^T[:, j block])^T, batched over j.
            self.gemm(
                (Op::N, Op::T),
                (r, r, q),
                1.0,
                Operand::new(vt, r, q * r),
                Operand::new(gvt + F * (j2 * r * n) as u64, r, q * r),
                0.0,
                Operand::new(vgv + F * (j2 * r * r) as u64, r, b_in * r * r),
                b_in,
            )?;
        }
        Ok(())
    }

    fn step_u(&self, step: f64) -> Result<()> {
        let (m, n, p, q, r, b_out, b_in) = (
            self.m, self.n, self.p, self.q, self.r, self.b_out, self.b_in,
        );
        let (tt, u, vt, big, rhs, pm) = (
            self.tt.device_ptr(),
            self.u.device_ptr(),
            self.vt.device_ptr(),
            self.big.device_ptr(),
            self.rhs.device_ptr(),
            self.pm.device_ptr(),
        );
        // V_j^T T_j^T (r, m), T_j^T = rows jq.. of tt.
        self.blas.gemm(
            Op::N,
            Op::N,
            (r, m, q),
            1.0,
            Operand::new(vt, r, q * r),
            Operand::new(tt, n, q),
            0.0,
            Operand::new(big, r, r * m),
            b_in,
            self.tf32,
        )?;
        let (mi, ri, pi, bi) = (m as i32, r as i32, p as i32, b_in as i32);
        let s = self.s.device_ptr();
        // SAFETY: blast_u_rhs(float* rhs, const float* tv, const float* s, int m, int r,
        // int p, int b_in): rhs (r, m), tv b_in (r, m) matrices, s b_out*b_in*r.
        unsafe {
            self.gpu
                .launch(&self.k.u_rhs)
                .arg(&rhs)
                .arg(&big)
                .arg(&s)
                .arg(&mi)
                .arg(&ri)
                .arg(&pi)
                .arg(&bi)
                .launch(grid(self.gpu, m * r))?;
        }
        let rr = r * r;
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(rr, 256), b_out.div_ceil(CAL_X) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (vgv, bo) = (self.vgv.device_ptr(), b_out as i32);
        // SAFETY: cal_mix_p(float* out, const float* vgv, const float* s, int r, int b_out,
        // int b_in): out holds b_out, vgv b_in^2 r x r matrices, s b_out*b_in*r.
        unsafe {
            self.gpu
                .launch(&self.c.mix_p)
                .arg(&pm)
                .arg(&vgv)
                .arg(&s)
                .arg(&ri)
                .arg(&bo)
                .arg(&bi)
                .launch(cfg)?;
        }
        self.dot(u, rhs, m * r, U_LOSS)?;
        self.dot(self.jm.device_ptr(), pm, b_out * rr, U_LOSS + 1)?;
        // grad_i^T = P_i U_i^T - rhs_i^T, in place of rhs.
        self.gemm(
            (Op::N, Op::N),
            (r, p, r),
            1.0,
            Operand::new(pm, r, rr),
            Operand::new(u, r, p * r),
            -1.0,
            Operand::new(rhs, r, p * r),
            b_out,
        )?;
        self.add_eps(pm, b_out, U_LOSS)?;
        self.chol
            .factor(self.gpu, &self.blas, pm, rr, b_out, self.tf32_rest, &|_| {
                Ok(())
            })?;
        self.chol.solve(
            &self.blas,
            b_out,
            Operand::new(rhs, r, p * r),
            Operand::new(self.ysolve.device_ptr(), r, p * r),
            p,
            false,
        )?;
        self.axpby(u, u, rhs, step, m * r)?;
        self.u_gram()
    }

    /// Loss terms of the V sub-problem for the current V (d from `big`, quad from Q and VGV)
    /// into `base`, `base + 1`.
    fn v_loss(&self, base: i32) -> Result<()> {
        let nblk = self.b_out * self.b_in;
        let rr = self.r * self.r;
        self.diag_products()?;
        self.dot(
            self.s.device_ptr(),
            self.d.device_ptr(),
            nblk * self.r,
            base,
        )?;
        self.dot(
            self.qm.device_ptr(),
            self.vgv.device_ptr(),
            self.b_in * self.b_in * rr,
            base + 1,
        )
    }

    fn loss(&self, scal: &[f64], base: i32) -> f64 {
        let b = base as usize;
        0.5 * (self.norm_sq - 2.0 * scal[b] + scal[b + 1])
    }

    fn step_v(&self, step: f64) -> Result<()> {
        let (n, p, q, r, b_out, b_in) = (self.n, self.p, self.q, self.r, self.b_out, self.b_in);
        let rr = r * r;
        let (tt, u, vt, big, grad, qm) = (
            self.tt.device_ptr(),
            self.u.device_ptr(),
            self.vt.device_ptr(),
            self.big.device_ptr(),
            self.grad.device_ptr(),
            self.qm.device_ptr(),
        );
        // UT_i = U_i^T T_i (r, n): T_i = (columns ip.. of tt)^T.
        self.blas.gemm(
            Op::N,
            Op::T,
            (r, n, p),
            1.0,
            Operand::new(u, r, p * r),
            Operand::new(tt, n, p * n),
            0.0,
            Operand::new(big, r, r * n),
            b_out,
            self.tf32,
        )?;
        let cfg = LaunchConfig {
            grid_dim: (
                Gpu::grid_1d(rr, 256),
                b_in as u32,
                b_in.div_ceil(CAL_X) as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (jm, s) = (self.jm.device_ptr(), self.s.device_ptr());
        let (ri, ni, qi, bo, bi) = (r as i32, n as i32, q as i32, b_out as i32, b_in as i32);
        // SAFETY: cal_mix_q(float* out, const float* jm, const float* s, int r, int b_out,
        // int b_in): out holds b_in^2, jm b_out r x r matrices, s b_out*b_in*r.
        unsafe {
            self.gpu
                .launch(&self.c.mix_q)
                .arg(&qm)
                .arg(&jm)
                .arg(&s)
                .arg(&ri)
                .arg(&bo)
                .arg(&bi)
                .launch(cfg)?;
        }
        self.v_loss(V_LOSS0)?;
        // SAFETY: blast_v_rhs(float* g, const float* ut, const float* s, int r, int n, int q,
        // int b_out, int b_in): g (r, n), ut b_out (r, n) matrices, s b_out*b_in*r.
        unsafe {
            self.gpu
                .launch(&self.k.v_rhs)
                .arg(&grad)
                .arg(&big)
                .arg(&s)
                .arg(&ri)
                .arg(&ni)
                .arg(&qi)
                .arg(&bo)
                .arg(&bi)
                .launch(grid(self.gpu, r * n))?;
        }
        // grad_j^T += sum_j' Q_jj' (V_j'^T G'_j'j), batched over j.
        let gvt = self.gvt.device_ptr();
        for j2 in 0..b_in {
            self.gemm(
                (Op::N, Op::N),
                (r, q, r),
                1.0,
                Operand::new(qm + F * (j2 * rr) as u64, r, b_in * rr),
                Operand::new(gvt + F * (j2 * r * n) as u64, r, q * r),
                1.0,
                Operand::new(grad, r, q * r),
                b_in,
            )?;
        }
        let (grad_keep, dir, blocks) = (
            self.grad_keep.device_ptr(),
            self.dir.device_ptr(),
            self.blocks.device_ptr(),
        );
        self.axpby(grad_keep, grad, grad, 0.0, r * n)?;
        // (Q_jj + eps I)^-1 grad_j^T, then times G'_jj^-1 on the right.
        self.copy_blocks(blocks, qm, (b_in + 1) * rr, b_in, V_LOSS0)?;
        self.chol.factor(
            self.gpu,
            &self.blas,
            blocks,
            rr,
            b_in,
            self.tf32_rest,
            &|_| Ok(()),
        )?;
        self.chol.solve(
            &self.blas,
            b_in,
            Operand::new(grad, r, q * r),
            Operand::new(self.ysolve.device_ptr(), r, q * r),
            q,
            false,
        )?;
        self.gemm(
            (Op::N, Op::N),
            (r, q, q),
            1.0,
            Operand::new(grad, r, q * r),
            Operand::new(self.ginv.device_ptr(), q, q * q),
            0.0,
            Operand::new(dir, r, q * r),
            b_in,
        )?;
        self.dot(grad_keep, dir, r * n, V_GD)?;
        let vt_old = self.vt_old.device_ptr();
        self.axpby(vt_old, vt, vt, 0.0, r * n)?;
        self.axpby(vt, vt_old, dir, step, r * n)?;
        self.vgv()?;
        self.v_loss(V_LOSS1)?;
        let scal = self.gpu.download(&self.scal)?;
        let (loss0, loss1) = (self.loss(&scal, V_LOSS0), self.loss(&scal, V_LOSS1));
        let alpha = line_search(loss0, loss1, scal[V_GD as usize], step);
        if alpha != step {
            self.axpby(vt, vt_old, dir, alpha, r * n)?;
            self.vgv()?;
        }
        Ok(())
    }

    /// The S step; returns the loss after it.
    fn step_s(&self, step: f64) -> Result<f64> {
        let (r, b_in) = (self.r, self.b_in);
        let nblk = self.b_out * b_in;
        let rr = r * r;
        let (s, d, hs, sg, sg_keep, h) = (
            self.s.device_ptr(),
            self.d.device_ptr(),
            self.hs.device_ptr(),
            self.sg.device_ptr(),
            self.sg_keep.device_ptr(),
            self.h.device_ptr(),
        );
        self.diag_products()?;
        self.h_times_s()?;
        self.dot(s, d, nblk * r, S_LOSS0)?;
        self.dot(s, hs, nblk * r, S_LOSS0 + 1)?;
        let len = (nblk * r) as i64;
        // SAFETY: blast_s_grad(float* g, float* g_keep, const float* hs, const float* d, i64 n):
        // all hold nblk*r floats.
        unsafe {
            self.gpu
                .launch(&self.k.s_grad)
                .arg(&sg)
                .arg(&sg_keep)
                .arg(&hs)
                .arg(&d)
                .arg(&len)
                .launch(grid(self.gpu, nblk * r))?;
        }
        // H_ij = J_i ⊙ VGV_jj (+ eps I).
        let blocks = self.blocks.device_ptr();
        self.copy_blocks(blocks, self.vgv.device_ptr(), (b_in + 1) * rr, b_in, -1)?;
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(r, 128), nblk as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (jm, scratch, ri, bi) = (
            self.jm.device_ptr(),
            self.hs_scratch.device_ptr(),
            r as i32,
            b_in as i32,
        );
        // SAFETY: hadamard_blocks(float* h, float* hs, const float* jm, const float* km,
        // const float* s, int r, int b_in): h holds b_out*b_in r x r matrices, hs (scratch)
        // and s b_out*b_in*r, jm b_out and km (the VGV_jj copies) b_in r x r matrices.
        unsafe {
            self.gpu
                .launch(&self.k.hadamard)
                .arg(&h)
                .arg(&scratch)
                .arg(&jm)
                .arg(&blocks)
                .arg(&s)
                .arg(&ri)
                .arg(&bi)
                .launch(cfg)?;
        }
        self.add_eps(h, nblk, S_LOSS0)?;
        self.chol
            .factor(self.gpu, &self.blas, h, rr, nblk, self.tf32_rest, &|_| {
                Ok(())
            })?;
        self.chol.solve(
            &self.blas,
            nblk,
            Operand::new(sg, r, r),
            Operand::new(self.ysolve.device_ptr(), r, r),
            1,
            false,
        )?;
        self.dot(sg_keep, sg, nblk * r, S_GD)?;
        let s_old = self.s_old.device_ptr();
        self.axpby(s_old, s, s, 0.0, nblk * r)?;
        self.axpby(s, s_old, sg, step, nblk * r)?;
        self.h_times_s()?;
        self.dot(s, d, nblk * r, S_LOSS1)?;
        self.dot(s, hs, nblk * r, S_LOSS1 + 1)?;
        let scal = self.gpu.download(&self.scal)?;
        let (loss0, loss1) = (self.loss(&scal, S_LOSS0), self.loss(&scal, S_LOSS1));
        let alpha = line_search(loss0, loss1, scal[S_GD as usize], step);
        if alpha == step {
            return Ok(loss1);
        }
        self.axpby(s, s_old, sg, alpha, nblk * r)?;
        self.h_times_s()?;
        self.dot(s, d, nblk * r, S_LOSS2)?;
        self.dot(s, hs, nblk * r, S_LOSS2 + 1)?;
        let scal = self.gpu.download(&self.scal)?;
        Ok(self.loss(&scal, S_LOSS2))
    }

    fn relative(&self, loss: f64) -> f64 {
        if self.norm_sq > 0.0 {
            (2.0 * loss.max(0.0) / self.norm_sq).sqrt()
        } else {
            0.0
        }
    }

    fn set_state(&mut self, start: &BlastStart) -> Result<()> {
        let (n, r, q) = (self.n, self.r, self.q);
        let mut vt = vec![0f32; r * n];
        for j in 0..self.b_in {
            for k in 0..r {
                for c in 0..q {
                    vt[(j * q + c) * r + k] = start.vt[j * r * q + k * q + c];
                }
            }
        }
        let s: Vec<f32> = start.s.iter().map(|&v| v as f32).collect();
        self.gpu.copy_to_device(&start.u, &mut self.u)?;
        self.gpu.copy_to_device(&vt, &mut self.vt)?;
        self.gpu.copy_to_device(&s, &mut self.s)?;
        Ok(())
    }

    fn get_state(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (n, r, q) = (self.n, self.r, self.q);
        let u = self.gpu.download(&self.u)?;
        let vt_cm = self.gpu.download(&self.vt)?;
        let mut vt = vec![0f32; r * n];
        for j in 0..self.b_in {
            for k in 0..r {
                for c in 0..q {
                    vt[j * r * q + k * q + c] = vt_cm[(j * q + c) * r + k];
                }
            }
        }
        Ok((u, vt, self.gpu.download(&self.s)?))
    }

    /// Runs iterations `iters` (of `total`, for the lr schedule) from the state on the device.
    #[allow(clippy::too_many_arguments)]
    fn run(
        &mut self,
        opts: &BlastOptions,
        iters: std::ops::Range<usize>,
        done: &mut usize,
        progress: &dyn Progress,
        name: &str,
    ) -> Result<Vec<f64>> {
        let mut out = Vec::with_capacity(iters.len());
        if iters.is_empty() {
            return Ok(out);
        }
        self.u_gram()?;
        self.vgv()?;
        self.chol.reset(self.gpu)?;
        // BLR_FACTORIZE_PROFILE=1: wall time of each sub-step after a stream synchronisation
        // (a measurement aid; it adds one synchronisation per sub-step).
        let profile = std::env::var_os("BLR_FACTORIZE_PROFILE").is_some_and(|v| v != "0");
        let mut totals = [0.0f64; 3];
        let mut lap = |k: usize, t: &mut std::time::Instant| -> Result<()> {
            if profile {
                self.gpu.synchronize()?;
                totals[k] += t.elapsed().as_secs_f64();
                *t = std::time::Instant::now();
            }
            Ok(())
        };
        let count = iters.len();
        for it in iters {
            let lr = opts.lr * (1.0 - it as f64 / opts.iterations as f64);
            let step = 2.0 * lr;
            let mut t = std::time::Instant::now();
            self.gpu.memset_bytes(&mut self.scal, 0)?;
            self.step_u(step)?;
            lap(0, &mut t)?;
            self.step_v(step)?;
            lap(1, &mut t)?;
            let loss = self.step_s(step)?;
            lap(2, &mut t)?;
            let rel = self.relative(loss);
            if self.chol.failed(self.gpu)? {
                return Err(Error::Numerical {
                    during: format!("calibrated BLAST factorization of {name} on the GPU"),
                    reason: format!(
                        "a preconditioner was not positive definite at iteration {it} \
                         (damping {}); raise --damping or use --device cpu",
                        opts.damping
                    ),
                });
            }
            if !rel.is_finite() {
                return Err(Error::Numerical {
                    during: format!("calibrated BLAST factorization of {name} on the GPU"),
                    reason: format!(
                        "error became {rel} at iteration {it}; lower the lr or raise the damping"
                    ),
                });
            }
            out.push(rel);
            *done += 1;
            progress.advance(*done, Some(rel));
        }
        if profile {
            for (name, secs) in ["U", "V", "S"].iter().zip(totals) {
                eprintln!(
                    "profile calibrated {name} step: {:.2} ms per iteration ({count} iterations)",
                    1e3 * secs / count.max(1) as f64
                );
            }
        }
        Ok(out)
    }

    /// `||(A - Â) X|| / ||A X||` with the raw Gram (`G' - damping_calib I`, up to a positive
    /// scale), from the dense residual formed in place of `at`; `tt` and `g` are overwritten.
    fn exact_error(&mut self, calib_damping: f64) -> Result<f64> {
        let (m, n, p, q, r, b_out, b_in) = (
            self.m, self.n, self.p, self.q, self.r, self.b_out, self.b_in,
        );
        let (at, tt, g) = (
            self.at.device_ptr(),
            self.tt.device_ptr(),
            self.g.device_ptr(),
        );
        let (ni, v) = (n as i32, -calib_damping as f32);
        // SAFETY: cal_add_diag(float* a, int n, float v): g is n x n.
        unsafe {
            self.gpu
                .launch(&self.c.add_diag)
                .arg(&g)
                .arg(&ni)
                .arg(&v)
                .launch(grid(self.gpu, n))?;
        }
        self.gpu.memset_bytes(&mut self.scal, 0)?;
        let full = |out: u64, src: u64| {
            self.blas.gemm(
                Op::N,
                Op::N,
                (n, m, n),
                1.0,
                Operand::new(g, n, 0),
                Operand::new(src, n, 0),
                0.0,
                Operand::new(out, n, 0),
                1,
                false,
            )
        };
        full(tt, at)?;
        self.dot(tt, at, m * n, DEN)?;
        let (us, u, s) = (
            self.big.device_ptr(),
            self.u.device_ptr(),
            self.s.device_ptr(),
        );
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(p * r, 256).min(1024), (b_out * b_in) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (ri, pi, bi) = (r as i32, p as i32, b_in as i32);
        // SAFETY: blast_scale_u(float* us, const float* ut, const float* s, int r, int p,
        // int b_in): us holds b_out*b_in (r, p) blocks (big >= b_out*b_in*p*r), ut (r, m).
        unsafe {
            self.gpu
                .launch(&self.k.scale_u)
                .arg(&us)
                .arg(&u)
                .arg(&s)
                .arg(&ri)
                .arg(&pi)
                .arg(&bi)
                .launch(cfg)?;
        }
        let vt = self.vt.device_ptr();
        for i in 0..b_out {
            // A_ij^T (q, p) at at[jq.., ip..] -= V_j (diag(s_ij) U_i^T).
            self.blas.gemm(
                Op::T,
                Op::N,
                (q, p, r),
                -1.0,
                Operand::new(vt, r, q * r),
                Operand::new(us + F * (i * b_in * p * r) as u64, r, p * r),
                1.0,
                Operand::new(at + F * (i * p * n) as u64, n, q),
                b_in,
                false,
            )?;
        }
        full(tt, at)?;
        self.dot(tt, at, m * n, NUM)?;
        let scal = self.gpu.download(&self.scal)?;
        let (num, den) = (scal[NUM as usize].max(0.0), scal[DEN as usize]);
        Ok(if den > 0.0 {
            (num / den).sqrt()
        } else {
            num.sqrt()
        })
    }
}

/// The start of restart `k` exactly as the CPU path builds it with a calibration: the seeded
/// random start, or for `k = 0` the calibrated low-rank factors (whitened SVD, here on the
/// GPU) written as BLAST with `s = 1`, or the (data-free) spectral start.
fn calibrated_start(
    gpu: &Gpu,
    target: &Target<'_>,
    opts: &BlastOptions,
    calib: &Calibration<'_>,
    gprime: &[f32],
    k: usize,
) -> Result<BlastStart> {
    if k > 0 || opts.init != BlastInit::LowRank {
        return Ok(blast_start(target, opts, k)?);
    }
    let random = BlastOptions {
        init: BlastInit::Random,
        ..*opts
    };
    let mut st = blast_start(target, &random, 0)?;
    if st.scale == 0.0 {
        return Ok(st);
    }
    let (m, n, r, b_out, b_in) = (target.m, target.n, opts.rank, opts.b_out, opts.b_in);
    let q = n / b_in;
    let keep = r.min(m.min(n));
    let lr = match lowrank_with(gpu, target, keep, gprime) {
        Ok(layer) => layer,
        Err(Error::LibraryNotFound { .. }) => {
            match blr_compress::lowrank(target, keep, Some(calib))? {
                Linear::LowRank(lr) => lr,
                _ => {
                    return Err(Error::Shape(format!(
                        "{}: the low-rank start did not give low-rank factors",
                        target.name
                    )))
                }
            }
        }
        Err(e) => return Err(e),
    };
    let f = (1.0 / st.scale).sqrt();
    for row in 0..m {
        for kk in 0..r {
            st.u[row * r + kk] = if kk < keep {
                (f64::from(lr.u[row * keep + kk]) * f) as f32
            } else {
                0.0
            };
        }
    }
    for j in 0..b_in {
        for kk in 0..r {
            for c in 0..q {
                st.vt[j * r * q + kk * q + c] = if kk < keep {
                    (f64::from(lr.v[kk * n + j * q + c]) * f) as f32
                } else {
                    0.0
                };
            }
        }
    }
    for ij in 0..b_out * b_in {
        for kk in 0..r {
            st.s[ij * r + kk] = if kk < keep { 1.0 } else { 0.0 };
        }
    }
    Ok(st)
}

/// Calibrated BLAST on `gpu`: the iteration of `blr_compress::blast_report(.., Some(calib),
/// ..)`, same start, schedule, damping, line searches and restarts. The report's `rel_error`
/// is `||(W - Ŵ) X||_F / ||W X||_F` with the raw Gram, as on the CPU.
pub fn blast_report_calibrated(
    gpu: &Gpu,
    target: &Target<'_>,
    opts: &BlastOptions,
    calib: &Calibration<'_>,
    gpu_opts: &GpuBlastOptions,
    progress: &dyn Progress,
) -> Result<BlastReport> {
    if opts.method != BlastMethod::Preconditioned {
        return Err(Error::Shape(
            "the plain gradient-descent baseline runs on the CPU only: use --device cpu".into(),
        ));
    }
    let gprime = calib.weight_f32(target)?;
    let first = calibrated_start(gpu, target, opts, calib, &gprime, 0)?;
    if first.scale == 0.0 {
        return Ok(blr_compress::blast_report(
            target,
            opts,
            Some(calib),
            progress,
        )?);
    }
    let (m, n, r, b_out, b_in) = (target.m, target.n, opts.rank, opts.b_out, opts.b_in);
    let a: Vec<f32> = target
        .weight
        .iter()
        .map(|&v| (f64::from(v) / first.scale) as f32)
        .collect();
    let mut solver = CalSolver::new(
        gpu,
        &a,
        &gprime,
        (m, n, r, b_out, b_in),
        opts.damping,
        gpu_opts.precision,
        target.name,
    )?;
    drop(a);
    drop(gprime);
    let restarts = opts.restarts.max(1);
    let probe = if restarts > 1 {
        (opts.iterations / 10).clamp(1, opts.iterations.max(1))
    } else {
        0
    };
    progress.begin("blast", opts.iterations + (restarts - 1) * probe);
    let mut done = 0usize;
    let mut best: Option<(Option<BlastStart>, Vec<f64>)> = None;
    if restarts == 1 {
        solver.set_state(&first)?;
        best = Some((None, Vec::new()));
    }
    for k in (0..restarts).filter(|_| restarts > 1) {
        let start = if k == 0 {
            first.clone()
        } else {
            blast_start(target, opts, k)?
        };
        solver.set_state(&start)?;
        let history = solver.run(opts, 0..probe, &mut done, progress, target.name)?;
        let better = match &best {
            None => true,
            Some((_, h)) => history.last() < h.last(),
        };
        if better {
            let (u, vt, s) = solver.get_state()?;
            let kept = BlastStart {
                scale: first.scale,
                u,
                vt,
                s: s.iter().map(|&v| f64::from(v)).collect(),
            };
            best = Some((Some(kept), history));
        }
    }
    let Some((kept, mut history)) = best else {
        return Err(Error::Shape(format!(
            "{}: BLAST needs at least one start",
            target.name
        )));
    };
    if let Some(kept) = kept {
        solver.set_state(&kept)?;
    }
    history.extend(solver.run(
        opts,
        probe..opts.iterations,
        &mut done,
        progress,
        target.name,
    )?);
    let (u, vt, s) = solver.get_state()?;
    let rel_error = solver.exact_error(calib.damping)?;
    let s: Vec<f32> = s
        .iter()
        .map(|&v| (f64::from(v) * first.scale) as f32)
        .collect();
    let layer = Linear::Blast(
        Blast::new(m, n, b_out, b_in, r, u, vt, s).map_err(|e| Error::Shape(e.to_string()))?,
    );
    Ok(BlastReport {
        layer,
        history,
        rel_error,
    })
}

/// Calibrated low-rank `W ≈ U V` minimising `||(W - U V) X||_F` (damped Gram), by the whitened
/// SVD on the GPU ([`svd::weighted_truncated_svd`]): the factors of `blr_compress::lowrank(..,
/// Some(calib))` up to the sign of each singular pair.
pub fn lowrank_calibrated(
    gpu: &Gpu,
    target: &Target<'_>,
    rank: usize,
    calib: &Calibration<'_>,
) -> Result<Linear> {
    let (m, n) = (target.m, target.n);
    blr_core::format::Shape {
        format: blr_core::FormatKind::LowRank,
        m,
        n,
        b_out: 1,
        b_in: 1,
        rank,
    }
    .validate()
    .map_err(|e| Error::Shape(format!("{}: {e}", target.name)))?;
    let gprime = calib.weight_f32(target)?;
    Ok(Linear::LowRank(lowrank_with(gpu, target, rank, &gprime)?))
}

fn lowrank_with(gpu: &Gpu, target: &Target<'_>, rank: usize, gprime: &[f32]) -> Result<LowRank> {
    let (m, n) = (target.m, target.n);
    let svd = svd::weighted_truncated_svd(gpu, target.weight, gprime, m, n, rank)?;
    let mut u = vec![0f32; m * rank];
    let mut v = vec![0f32; rank * n];
    for k in 0..rank {
        for row in 0..m {
            u[row * rank + k] = svd.left[k * m + row] as f32;
        }
        for col in 0..n {
            v[k * n + col] = svd.right_t[k * n + col] as f32;
        }
    }
    LowRank::new(m, n, rank, u, v).map_err(|e| Error::Shape(e.to_string()))
}

#[cfg(test)]
mod tests {
    //! Calibrated GPU BLAST and the GPU whitened SVD against the CPU path on odd shapes, with
    //! real Grams of rank < n (fewer tokens than features, anisotropic features) plus the
    //! default ridge. Print SKIP and pass where no usable GPU is (CI).

    use super::super::tests::{bench_spec, gpu_or_skip};
    use super::*;
    use blr_compress::{Gram, Silent};
    use blr_core::rng::Rng;

    /// The Gram of `tokens` activation rows with per-feature scales `exp(0.7 N(0, 1))` and a
    /// shared component (correlated features): rank `min(tokens, n)`.
    fn test_gram(n: usize, tokens: usize, seed: u64) -> Gram {
        let mut rng = Rng::new(seed);
        let scales: Vec<f32> = (0..n).map(|_| (0.7 * rng.normal()).exp() as f32).collect();
        let common = rng.normal_vec(n, 1.0);
        let mut x = rng.normal_vec(tokens * n, 1.0);
        for t in 0..tokens {
            let c = rng.normal() as f32;
            for f in 0..n {
                x[t * n + f] = (x[t * n + f] + 0.5 * c * common[f]) * scales[f];
            }
        }
        let mut g = Gram::new(n);
        g.accumulate(&x, tokens).unwrap();
        g
    }

    fn json_num(v: f64) -> String {
        if v.is_finite() {
            format!("{v:.9}")
        } else {
            "null".into()
        }
    }

    fn rel(a: f64, b: f64) -> f64 {
        (a - b).abs() / b.abs().max(1e-300)
    }

    #[test]
    fn gpu_calibrated_blast_follows_the_cpu_iteration_on_odd_shapes() {
        let Some(gpu) = gpu_or_skip("gpu_calibrated_blast_follows_the_cpu_iteration_on_odd_shapes")
        else {
            return;
        };
        // (m, n, b_out, b_in, r, init, restarts): b_out != b_in, r not a multiple of
        // anything, r > p, q in the last two.
        let cases = [
            (90, 84, 3, 7, 13, BlastInit::LowRank, 1),
            (100, 60, 5, 2, 9, BlastInit::LowRank, 1),
            (84, 132, 4, 6, 11, BlastInit::Random, 1),
            (96, 120, 4, 3, 6, BlastInit::Random, 3),
            (66, 150, 3, 5, 37, BlastInit::LowRank, 1),
        ];
        for (m, n, b_out, b_in, r, init, restarts) in cases {
            let w = Rng::new((m * n) as u64).normal_vec(m * n, 1.0);
            let target = Target::new("cal", m, n, &w).unwrap();
            let gram = test_gram(n, n / 2 + 1, (m + n) as u64);
            let calib = Calibration::new(&gram);
            let opts = BlastOptions {
                b_out,
                b_in,
                iterations: 30,
                init,
                restarts,
                ..BlastOptions::new(b_out, r)
            };
            let cpu = blr_compress::blast_report(&target, &opts, Some(&calib), &Silent).unwrap();
            let g = blast_report_calibrated(
                &gpu,
                &target,
                &opts,
                &calib,
                &GpuBlastOptions {
                    precision: GemmPrecision::Fp32,
                },
                &Silent,
            )
            .unwrap();
            assert_eq!(g.history.len(), cpu.history.len());
            let worst = g
                .history
                .iter()
                .zip(&cpu.history)
                .map(|(a, b)| rel(*a, *b))
                .fold(0.0, f64::max);
            // The exact error of the GPU factors on the CPU (raw Gram), and the GPU's own.
            let on_cpu = blr_compress::relative_error(&target, &g.layer, Some(&gram)).unwrap();
            eprintln!(
                "calibrated {m}x{n} b={b_out}x{b_in} r={r} {init:?} restarts={restarts}: \
                 gpu {:.7} (its own {:.7}) cpu {:.7}, history first {:.6}/{:.6} \
                 worst per-iteration diff {worst:.2e}",
                on_cpu, g.rel_error, cpu.rel_error, g.history[0], cpu.history[0]
            );
            assert!(
                rel(g.rel_error, on_cpu) < 1e-4,
                "{} vs {on_cpu}",
                g.rel_error
            );
            assert!(
                rel(on_cpu, cpu.rel_error) < 1e-3,
                "{m}x{n}: gpu {on_cpu} cpu {}",
                cpu.rel_error
            );
            assert!(worst < 1e-2, "{m}x{n}: history differs by {worst}");
            // Calibrated BLAST from the calibrated low-rank start is never worse than it.
            if init == BlastInit::LowRank {
                let lr = lowrank_calibrated(&gpu, &target, r.min(m.min(n)), &calib).unwrap();
                let lr_err = blr_compress::relative_error(&target, &lr, Some(&gram)).unwrap();
                assert!(on_cpu <= lr_err * 1.001, "{on_cpu} > low-rank {lr_err}");
            }
        }
    }

    #[test]
    fn gpu_calibrated_blast_final_error_matches_cpu_at_300_iterations() {
        let Some(gpu) =
            gpu_or_skip("gpu_calibrated_blast_final_error_matches_cpu_at_300_iterations")
        else {
            return;
        };
        let (m, n, b, r) = (120, 168, 4, 30);
        let w = Rng::new(5).normal_vec(m * n, 1.0);
        let target = Target::new("cal300", m, n, &w).unwrap();
        let gram = test_gram(n, 97, 6);
        let calib = Calibration::new(&gram);
        let opts = BlastOptions {
            init: BlastInit::LowRank,
            ..BlastOptions::new(b, r)
        };
        let cpu = blr_compress::blast_report(&target, &opts, Some(&calib), &Silent).unwrap();
        for precision in [
            GemmPrecision::Fp32,
            GemmPrecision::Tf32Data,
            GemmPrecision::Tf32,
        ] {
            let g = blast_report_calibrated(
                &gpu,
                &target,
                &opts,
                &calib,
                &GpuBlastOptions { precision },
                &Silent,
            )
            .unwrap();
            eprintln!(
                "calibrated 300 its {precision:?}: gpu {:.7} cpu {:.7} ({:.2e} relative)",
                g.rel_error,
                cpu.rel_error,
                rel(g.rel_error, cpu.rel_error)
            );
            assert!(rel(g.rel_error, cpu.rel_error) < 1e-2);
        }
    }

    #[test]
    fn gpu_whitened_svd_matches_cpu_calibrated_lowrank() {
        let Some(gpu) = gpu_or_skip("gpu_whitened_svd_matches_cpu_calibrated_lowrank") else {
            return;
        };
        // m < n (one m x m eigenproblem), m > n (whitening by G''s eigenvectors), t > min(m, n),
        // all pairs kept.
        for (m, n, t, tokens) in [
            (37, 91, 5, 40),
            (200, 133, 17, 61),
            (64, 50, 60, 30),
            (120, 45, 45, 200),
        ] {
            let w = Rng::new((m + 7 * n) as u64).normal_vec(m * n, 1.0);
            let target = Target::new("lr", m, n, &w).unwrap();
            let gram = test_gram(n, tokens, (m * t) as u64);
            let calib = Calibration::new(&gram);
            let cpu = blr_compress::lowrank(&target, t, Some(&calib)).unwrap();
            let g = lowrank_calibrated(&gpu, &target, t, &calib).unwrap();
            let (ec, eg) = (
                blr_compress::relative_error(&target, &cpu, Some(&gram)).unwrap(),
                blr_compress::relative_error(&target, &g, Some(&gram)).unwrap(),
            );
            let (dc, dg) = (cpu.to_dense().unwrap(), g.to_dense().unwrap());
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (a, b) in dg.weight.iter().zip(&dc.weight) {
                num += f64::from(a - b).powi(2);
                den += f64::from(*b).powi(2);
            }
            let prod = (num / den.max(1e-300)).sqrt();
            eprintln!(
                "whitened SVD {m}x{n} t={t}: error gpu {eg:.9} cpu {ec:.9}, ||UV - UV_cpu|| / \
                 ||UV_cpu|| = {prod:.2e}"
            );
            // Relative to the error, or absolute where both are at rounding level (t >= the
            // rank: exact up to f32 storage of the factors).
            assert!(
                (eg - ec).abs() < 1e-5 * ec.max(1e-3),
                "{m}x{n} t={t}: {eg} vs {ec}"
            );
            assert!(prod < 1e-3, "{m}x{n} t={t}: products differ by {prod}");
        }
    }

    /// Timing probe for the device machine (not a CI test): `BLR_CAL_BENCH=m,n,b,r,its,cpu_its`
    /// runs calibrated BLAST on the GPU (`BLR_CAL_BENCH_PREC`, default tf32) for `its`
    /// iterations and on the CPU for `cpu_its` (0: none) on a N(0, 1) matrix with a Gram of
    /// `BLR_CAL_BENCH_TOKENS` (default n / 2) tokens, plus the calibrated low-rank SVD at rank r
    /// on both; prints one `BENCHJSON` line per run.
    #[test]
    #[ignore]
    fn bench_gpu_blast_calibrated() {
        let Some(v) = bench_spec(
            "bench_gpu_blast_calibrated",
            "BLR_CAL_BENCH",
            "m,n,b,r,its,cpu_its",
        ) else {
            return;
        };
        let (m, n, b, r, its, cpu_its) = (v[0], v[1], v[2], v[3], v[4], v[5]);
        let Some(gpu) = gpu_or_skip("bench_gpu_blast_calibrated") else {
            return;
        };
        let tokens = std::env::var("BLR_CAL_BENCH_TOKENS")
            .ok()
            .and_then(|t| t.parse().ok())
            .unwrap_or(n / 2);
        let w = Rng::new(0).normal_vec(m * n, 1.0);
        let target = Target::new("bench", m, n, &w).unwrap();
        let t0 = std::time::Instant::now();
        let gram = test_gram(n, tokens, 1);
        eprintln!(
            "gram of {tokens} tokens: {:.2} s",
            t0.elapsed().as_secs_f64()
        );
        let calib = Calibration::new(&gram);
        let shape = format!("\"m\":{m},\"n\":{n},\"b\":{b},\"r\":{r},\"tokens\":{tokens}");
        let t = std::time::Instant::now();
        let lg = lowrank_calibrated(&gpu, &target, r.min(m.min(n)), &calib).unwrap();
        let lg_s = t.elapsed().as_secs_f64();
        // The CPU's exact calibrated error costs 4 m n^2 f64 flops: skipped on large shapes.
        let small = m * n <= 4_000_000;
        let err = |layer: &Linear| -> f64 {
            if small {
                blr_compress::relative_error(&target, layer, Some(&gram)).unwrap()
            } else {
                f64::NAN
            }
        };
        let lg_e = err(&lg);
        println!(
            "BENCHJSON {{\"what\":\"calibrated lowrank\",\"device\":\"gpu\",{shape},\"seconds\":{lg_s:.3},\"calib_rel_error\":{}}}", json_num(lg_e)
        );
        if cpu_its > 0 {
            let t = std::time::Instant::now();
            let lc = blr_compress::lowrank(&target, r.min(m.min(n)), Some(&calib)).unwrap();
            let lc_s = t.elapsed().as_secs_f64();
            let lc_e = err(&lc);
            println!(
                "BENCHJSON {{\"what\":\"calibrated lowrank\",\"device\":\"cpu\",{shape},\"seconds\":{lc_s:.3},\"calib_rel_error\":{}}}", json_num(lc_e)
            );
        }
        let precs: Vec<GemmPrecision> = std::env::var("BLR_CAL_BENCH_PREC")
            .unwrap_or_else(|_| "tf32".into())
            .split(',')
            .map(|p| p.parse().unwrap())
            .collect();
        let opts = BlastOptions {
            iterations: its,
            init: BlastInit::LowRank,
            ..BlastOptions::new(b, r)
        };
        for precision in precs {
            let t = std::time::Instant::now();
            let rep = blast_report_calibrated(
                &gpu,
                &target,
                &opts,
                &calib,
                &GpuBlastOptions { precision },
                &Silent,
            )
            .unwrap();
            let secs = t.elapsed().as_secs_f64();
            println!(
                "BENCHJSON {{\"what\":\"calibrated blast\",\"device\":\"gpu\",\"precision\":\"{precision:?}\",{shape},\"iterations\":{its},\"seconds\":{secs:.3},\"calib_rel_error\":{:.9},\"history_last\":{:.9}}}",
                rep.rel_error,
                rep.history[its - 1]
            );
        }
        if cpu_its > 0 {
            let o = BlastOptions {
                iterations: cpu_its,
                ..opts
            };
            let t = std::time::Instant::now();
            let rep = blr_compress::blast_report(&target, &o, Some(&calib), &Silent).unwrap();
            let secs = t.elapsed().as_secs_f64();
            println!(
                "BENCHJSON {{\"what\":\"calibrated blast\",\"device\":\"cpu\",{shape},\"iterations\":{cpu_its},\"seconds\":{secs:.3},\"calib_rel_error\":{:.9},\"history_last\":{:.9}}}",
                rep.rel_error,
                rep.history[cpu_its - 1]
            );
            if cpu_its != its {
                let g = blast_report_calibrated(
                    &gpu,
                    &target,
                    &o,
                    &calib,
                    &GpuBlastOptions {
                        precision: GemmPrecision::Tf32,
                    },
                    &Silent,
                )
                .unwrap();
                println!(
                    "BENCHJSON {{\"what\":\"calibrated blast\",\"device\":\"gpu\",\"precision\":\"Tf32\",{shape},\"iterations\":{cpu_its},\"calib_rel_error\":{:.9},\"history_last\":{:.9}}}",
                    g.rel_error,
                    g.history[cpu_its - 1]
                );
            }
        }
    }
}
