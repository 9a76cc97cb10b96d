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
    blast_start, line_search, BlastInit, BlastOptions, BlastReport, BlastStart, Calibration,
    Progress, Target,
};
use blr_core::{Linear, LowRank};

use super::blas::{Cublas, Op, Operand};
use super::chol::BatchedCholesky;
use super::core::{iterate, not_finite, not_positive_definite, report, Core, Iteration, Shape};
use super::{
    grid, lowrank_layer, svd, unsupported, validate_lowrank, GemmPrecision, GpuBlastOptions,
    Kernels, F,
};
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

/// All device state of one calibrated factorization: the shared [`Core`] (with `T = A G'` as
/// the data of its products) and what only this iteration keeps.
struct CalSolver<'g> {
    core: Core<'g>,
    c: CalKernels,
    tt: DeviceBuffer<f32>,
    g: DeviceBuffer<f32>,
    /// `G'_jj^-1`, b_in q x q matrices.
    ginv: DeviceBuffer<f32>,
    vt_old: DeviceBuffer<f32>,
    s_old: DeviceBuffer<f32>,
    vgv: DeviceBuffer<f32>,
    gvt: DeviceBuffer<f32>,
    qm: DeviceBuffer<f32>,
    /// Diagonal blocks (Q_jj + eps I, or VGV_jj), b_in r x r.
    blocks: DeviceBuffer<f32>,
    grad: DeviceBuffer<f32>,
    grad_keep: DeviceBuffer<f32>,
    dir: DeviceBuffer<f32>,
    hs_scratch: DeviceBuffer<f32>,
    sg: DeviceBuffer<f32>,
    sg_keep: DeviceBuffer<f32>,
}

/// No profile marks in the calibrated iteration (it has its own per-step laps in `run`).
fn no_mark(_: &'static str) -> Result<()> {
    Ok(())
}

impl<'g> CalSolver<'g> {
    fn new(
        gpu: &'g Gpu,
        a: &[f32],
        gprime: &[f32],
        shape: Shape,
        (damping, precision): (f64, GemmPrecision),
        name: &str,
    ) -> Result<Self> {
        let Shape {
            m,
            n,
            r,
            b_out,
            b_in,
        } = shape;
        let q = n / b_in;
        let k = Kernels::load(gpu)?;
        let c = CalKernels::load(gpu)?;
        let blas = Cublas::new(gpu)?;
        let core = Core::new(
            gpu,
            (k, blas),
            a,
            shape,
            precision,
            damping,
            SLOTS,
            "calibrated BLAST",
            &|_| {},
        )?;
        let rr = r * r;
        let nblk = b_out * b_in;
        let g = gpu.upload(gprime, "calibrated BLAST G'")?;
        let tt = gpu.alloc_zeros::<f32>(n * m, "calibrated BLAST T^T")?;
        // T^T = G' A^T (G' symmetric), once, in fp32.
        core.blas.gemm(
            Op::N,
            Op::N,
            (n, m, n),
            1.0,
            Operand::new(g.device_ptr(), n, 0),
            Operand::new(core.at.device_ptr(), n, 0),
            0.0,
            Operand::new(tt.device_ptr(), n, 0),
            1,
            false,
        )?;
        let alloc = |len: usize, what: &str| {
            gpu.alloc_zeros::<f32>(len, &format!("calibrated BLAST {what}"))
        };
        let mut this = Self {
            core,
            c,
            tt,
            g,
            ginv: alloc(b_in * q * q, "G'_jj^-1")?,
            vt_old: alloc(r * n, "V^T before the step")?,
            s_old: alloc(nblk * r, "S before the step")?,
            vgv: alloc(b_in * b_in * rr, "V^T G' V blocks")?,
            gvt: alloc(b_in * r * n, "(G' V_j)^T")?,
            qm: alloc(b_in * b_in * rr, "Q_jj'")?,
            blocks: alloc(b_in * rr, "diagonal blocks")?,
            grad: alloc(r * n, "V gradient")?,
            grad_keep: alloc(r * n, "V gradient copy")?,
            dir: alloc(r * n, "V direction")?,
            hs_scratch: alloc(nblk * r, "H_jj s")?,
            sg: alloc(nblk * r, "S gradient")?,
            sg_keep: alloc(nblk * r, "S gradient copy")?,
        };
        let c = &this.core;
        c.dot(this.tt.device_ptr(), c.at.device_ptr(), m * n, NUM, 1.0)?;
        this.core.norm_sq = c.gpu.download(&c.scal)?[NUM as usize];
        this.invert_diag_gram(name)?;
        Ok(this)
    }

    /// `ginv_j = G'_jj^-1` by a batched Cholesky of the q x q diagonal blocks and a solve on
    /// the identity (fp32; the CPU path uses the f64 Cholesky of the same blocks).
    fn invert_diag_gram(&mut self, name: &str) -> Result<()> {
        let c = &self.core;
        let (n, q, b_in) = (c.n, c.q, c.b_in);
        let qq = q * q;
        let gd = c
            .gpu
            .alloc_zeros::<f32>(b_in * qq, "calibrated BLAST G'_jj")?;
        let y = c
            .gpu
            .alloc_zeros::<f32>(b_in * qq, "calibrated BLAST solve scratch")?;
        let (dst, eye, g) = (gd.device_ptr(), self.ginv.device_ptr(), self.g.device_ptr());
        let (ni, qi, bi) = (n as i32, q as i32, b_in as i32);
        // SAFETY: cal_gather_diag(float* dst, float* eye, const float* g, int n, int q,
        // int b_in): dst and eye hold b_in q x q matrices, g is n x n with n = b_in q.
        unsafe {
            c.gpu
                .launch(&self.c.gather_diag)
                .arg(&dst)
                .arg(&eye)
                .arg(&g)
                .arg(&ni)
                .arg(&qi)
                .arg(&bi)
                .launch(grid(c.gpu, b_in * qq))?;
        }
        let mut gchol = BatchedCholesky::new(c.gpu, &c.k.chol, q, b_in)?;
        gchol.reset(c.gpu)?;
        gchol.factor(c.gpu, &c.blas, dst, qq, b_in, false, &no_mark)?;
        gchol.solve(
            &c.blas,
            b_in,
            Operand::new(eye, q, qq),
            Operand::new(y.device_ptr(), q, qq),
            q,
            false,
        )?;
        if gchol.failed(c.gpu)? {
            return Err(Error::Numerical {
                during: format!("calibrated BLAST of {name} on the GPU"),
                reason: "a diagonal block of the calibration Gram is not positive definite in \
                         fp32; raise --calib-damping or use --device cpu"
                    .into(),
            });
        }
        Ok(())
    }

    /// `y = x - alpha d` over `len` floats (y may be x).
    fn axpby(&self, y: u64, x: u64, d: u64, alpha: f64, len: usize) -> Result<()> {
        let (alpha, n) = (alpha as f32, len as i64);
        // SAFETY: cal_axpby(float* y, const float* x, const float* d, float alpha, i64 n):
        // all three hold >= len floats.
        unsafe {
            self.core
                .gpu
                .launch(&self.c.axpby)
                .arg(&y)
                .arg(&x)
                .arg(&d)
                .arg(&alpha)
                .arg(&n)
                .launch(grid(self.core.gpu, len))
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
        let c = &self.core;
        let (r, stride, b) = (c.r as i32, src_stride as i64, batch as i32);
        let scal = c.scal.device_ptr();
        // SAFETY: cal_copy_blocks(float* dst, const float* src, int r, i64 src_stride,
        // int batch, const double* scal, int base, double norm_sq, double damping): dst holds
        // batch r x r matrices, src (batch - 1) * src_stride + r^2 floats; base < SLOTS - 1.
        unsafe {
            c.gpu
                .launch(&self.c.copy_blocks)
                .arg(&dst)
                .arg(&src)
                .arg(&r)
                .arg(&stride)
                .arg(&b)
                .arg(&scal)
                .arg(&base)
                .arg(&c.norm_sq)
                .arg(&c.damping)
                .launch(grid(c.gpu, batch * c.r * c.r))
        }
    }

    /// `hs_ij = sum_j' (J_i ⊙ VGV_jj') s_ij'` for the current s.
    fn h_times_s(&self) -> Result<()> {
        let c = &self.core;
        let cfg = LaunchConfig {
            grid_dim: (
                Gpu::grid_1d(c.r, 128),
                c.b_in as u32,
                c.b_out.div_ceil(CAL_X) as u32,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (hs, jm, vgv, s) = (
            c.hs.device_ptr(),
            c.jm.device_ptr(),
            self.vgv.device_ptr(),
            c.s.device_ptr(),
        );
        let (r, bo, bi) = (c.r as i32, c.b_out as i32, c.b_in as i32);
        // SAFETY: cal_hs(float* hs, const float* jm, const float* vgv, const float* s, int r,
        // int b_out, int b_in): hs and s hold b_out*b_in*r, jm b_out and vgv b_in^2 r x r.
        unsafe {
            c.gpu
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

    /// `GV_j'^T = V_j'^T G'[j' rows, :]` (r, n) and `VGV_jj' = V_j^T G'_jj' V_j'` for the
    /// current V.
    fn vgv(&self) -> Result<()> {
        let c = &self.core;
        let (n, q, r, b_in) = (c.n, c.q, c.r, c.b_in);
        let (vt, g, gvt, vgv) = (
            c.vt.device_ptr(),
            self.g.device_ptr(),
            self.gvt.device_ptr(),
            self.vgv.device_ptr(),
        );
        c.gemm(
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
            c.gemm(
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
        let c = &self.core;
        let (m, r, b_out, b_in) = (c.m, c.r, c.b_out, c.b_in);
        // V_j^T T_j^T (r, m) into big, then the right-hand side.
        c.v_times_data(self.tt.device_ptr())?;
        c.u_rhs()?;
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(r * r, 256), b_out.div_ceil(CAL_X) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (pm, vgv, s) = (c.pm.device_ptr(), self.vgv.device_ptr(), c.s.device_ptr());
        let (ri, bo, bi) = (r as i32, b_out as i32, b_in as i32);
        // SAFETY: cal_mix_p(float* out, const float* vgv, const float* s, int r, int b_out,
        // int b_in): out holds b_out, vgv b_in^2 r x r matrices, s b_out*b_in*r.
        unsafe {
            c.gpu
                .launch(&self.c.mix_p)
                .arg(&pm)
                .arg(&vgv)
                .arg(&s)
                .arg(&ri)
                .arg(&bo)
                .arg(&bi)
                .launch(cfg)?;
        }
        c.u_direction(U_LOSS, false, &no_mark)?;
        let (u, rhs) = (c.u.device_ptr(), c.rhs.device_ptr());
        self.axpby(u, u, rhs, step, m * r)?;
        c.u_gram()
    }

    /// Loss terms of the V sub-problem for the current V (d from `big`, quad from Q and VGV)
    /// into `base`, `base + 1`.
    fn v_loss(&self, base: i32) -> Result<()> {
        let c = &self.core;
        c.diag_products(false)?;
        c.dot(
            c.s.device_ptr(),
            c.d.device_ptr(),
            c.b_out * c.b_in * c.r,
            base,
            1.0,
        )?;
        c.dot(
            self.qm.device_ptr(),
            self.vgv.device_ptr(),
            c.b_in * c.b_in * c.r * c.r,
            base + 1,
            1.0,
        )
    }

    fn loss(&self, scal: &[f64], base: i32) -> f64 {
        let b = base as usize;
        0.5 * (self.core.norm_sq - 2.0 * scal[b] + scal[b + 1])
    }

    fn step_v(&self, step: f64) -> Result<()> {
        let c = &self.core;
        let (n, q, r, b_out, b_in) = (c.n, c.q, c.r, c.b_out, c.b_in);
        let rr = r * r;
        let (vt, grad, qm) = (
            c.vt.device_ptr(),
            self.grad.device_ptr(),
            self.qm.device_ptr(),
        );
        // UT_i = U_i^T T_i (r, n) into big.
        c.u_times_data(self.tt.device_ptr())?;
        let cfg = LaunchConfig {
            grid_dim: (
                Gpu::grid_1d(rr, 256),
                b_in as u32,
                b_in.div_ceil(CAL_X) as u32,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (jm, s) = (c.jm.device_ptr(), c.s.device_ptr());
        let (ri, bo, bi) = (r as i32, b_out as i32, b_in as i32);
        // SAFETY: cal_mix_q(float* out, const float* jm, const float* s, int r, int b_out,
        // int b_in): out holds b_in^2, jm b_out r x r matrices, s b_out*b_in*r.
        unsafe {
            c.gpu
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
        c.v_rhs(grad)?;
        // grad_j^T += sum_j' Q_jj' (V_j'^T G'_j'j), batched over j.
        let gvt = self.gvt.device_ptr();
        for j2 in 0..b_in {
            c.gemm(
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
        c.damped_solve(
            blocks,
            b_in,
            None,
            grad,
            q,
            false,
            &no_mark,
            ["v: chol", "v: solve"],
        )?;
        c.gemm(
            (Op::N, Op::N),
            (r, q, q),
            1.0,
            Operand::new(grad, r, q * r),
            Operand::new(self.ginv.device_ptr(), q, q * q),
            0.0,
            Operand::new(dir, r, q * r),
            b_in,
        )?;
        let (alpha, _) = self.line_step(
            (vt, self.vt_old.device_ptr(), dir, grad_keep),
            r * n,
            step,
            (V_LOSS0, V_GD, V_LOSS1),
            &|| {
                self.vgv()?;
                self.v_loss(V_LOSS1)
            },
        )?;
        if alpha != step {
            self.vgv()?;
        }
        Ok(())
    }

    /// The exact line search of the CPU path along `dir` from `x` (`len` floats each): `<keep,
    /// dir>` into slot `gd`, `x` kept in `old`, `x = old - step dir`, `loss1` evaluates the
    /// loss terms there into slot `l1`; `alpha` from those and the loss at `l0`, and
    /// `x = old - alpha dir` where it differs from `step`. Returns `alpha` and the loss at
    /// `step`.
    fn line_step(
        &self,
        (x, old, dir, keep): (u64, u64, u64, u64),
        len: usize,
        step: f64,
        (l0, gd, l1): (i32, i32, i32),
        loss1: &dyn Fn() -> Result<()>,
    ) -> Result<(f64, f64)> {
        let c = &self.core;
        c.dot(keep, dir, len, gd, 1.0)?;
        self.axpby(old, x, x, 0.0, len)?;
        self.axpby(x, old, dir, step, len)?;
        loss1()?;
        let scal = c.gpu.download(&c.scal)?;
        let (loss0, loss1) = (self.loss(&scal, l0), self.loss(&scal, l1));
        let alpha = line_search(loss0, loss1, scal[gd as usize], step);
        if alpha != step {
            self.axpby(x, old, dir, alpha, len)?;
        }
        Ok((alpha, loss1))
    }

    /// The S step; returns the loss after it.
    fn step_s(&self, step: f64) -> Result<f64> {
        let c = &self.core;
        let (r, b_in) = (c.r, c.b_in);
        let nblk = c.b_out * b_in;
        let rr = r * r;
        let (s, sg, sg_keep) = (
            c.s.device_ptr(),
            self.sg.device_ptr(),
            self.sg_keep.device_ptr(),
        );
        c.diag_products(false)?;
        self.h_times_s()?;
        c.s_loss(S_LOSS0)?;
        c.s_grad(sg, sg_keep)?;
        // H_ij = J_i ⊙ VGV_jj (+ eps I); its H s goes to scratch (hs is the coupled one).
        let blocks = self.blocks.device_ptr();
        self.copy_blocks(blocks, self.vgv.device_ptr(), (b_in + 1) * rr, b_in, -1)?;
        c.hadamard(self.hs_scratch.device_ptr(), blocks)?;
        c.damped_solve(
            c.h.device_ptr(),
            nblk,
            Some(S_LOSS0),
            sg,
            1,
            false,
            &no_mark,
            ["s: chol", "s: solve"],
        )?;
        let (alpha, loss1) = self.line_step(
            (s, self.s_old.device_ptr(), sg, sg_keep),
            nblk * r,
            step,
            (S_LOSS0, S_GD, S_LOSS1),
            &|| {
                self.h_times_s()?;
                c.s_loss(S_LOSS1)
            },
        )?;
        if alpha == step {
            return Ok(loss1);
        }
        self.h_times_s()?;
        c.s_loss(S_LOSS2)?;
        let scal = c.gpu.download(&c.scal)?;
        Ok(self.loss(&scal, S_LOSS2))
    }

    fn relative(&self, loss: f64) -> f64 {
        let norm_sq = self.core.norm_sq;
        if norm_sq > 0.0 {
            (2.0 * loss.max(0.0) / norm_sq).sqrt()
        } else {
            0.0
        }
    }

    /// `||(A - Â) X|| / ||A X||` with the raw Gram (`G' - damping_calib I`, up to a positive
    /// scale), from the dense residual formed in place of `at`; `tt` and `g` are overwritten.
    fn exact_error(&mut self, calib_damping: f64) -> Result<f64> {
        let (m, n) = (self.core.m, self.core.n);
        let (at, tt, g) = (
            self.core.at.device_ptr(),
            self.tt.device_ptr(),
            self.g.device_ptr(),
        );
        let (ni, v) = (n as i32, -calib_damping as f32);
        // SAFETY: cal_add_diag(float* a, int n, float v): g is n x n.
        unsafe {
            self.core
                .gpu
                .launch(&self.c.add_diag)
                .arg(&g)
                .arg(&ni)
                .arg(&v)
                .launch(grid(self.core.gpu, n))?;
        }
        self.core.gpu.memset_bytes(&mut self.core.scal, 0)?;
        let c = &self.core;
        let full = |out: u64, src: u64| {
            c.blas.gemm(
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
        c.dot(tt, at, m * n, DEN, 1.0)?;
        c.subtract_approximation()?;
        full(tt, at)?;
        c.dot(tt, at, m * n, NUM, 1.0)?;
        let scal = c.gpu.download(&c.scal)?;
        let (num, den) = (scal[NUM as usize].max(0.0), scal[DEN as usize]);
        Ok(if den > 0.0 {
            (num / den).sqrt()
        } else {
            num.sqrt()
        })
    }
}

impl<'g> Iteration<'g> for CalSolver<'g> {
    fn core_mut(&mut self) -> &mut Core<'g> {
        &mut self.core
    }

    /// Runs iterations `iters` (of `opts.iterations`, for the lr schedule) from the state on
    /// the device.
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
        let gpu = self.core.gpu;
        self.core.u_gram()?;
        self.vgv()?;
        self.core.chol.reset(gpu)?;
        // BLR_FACTORIZE_PROFILE=1: wall time of each sub-step after a stream synchronisation
        // (a measurement aid; it adds one synchronisation per sub-step).
        let profile = std::env::var_os("BLR_FACTORIZE_PROFILE").is_some_and(|v| v != "0");
        let mut totals = [0.0f64; 3];
        let mut lap = |k: usize, t: &mut std::time::Instant| -> Result<()> {
            if profile {
                gpu.synchronize()?;
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
            gpu.memset_bytes(&mut self.core.scal, 0)?;
            self.step_u(step)?;
            lap(0, &mut t)?;
            self.step_v(step)?;
            lap(1, &mut t)?;
            let loss = self.step_s(step)?;
            lap(2, &mut t)?;
            let rel = self.relative(loss);
            if self.core.chol.failed(gpu)? {
                return Err(not_positive_definite(
                    "calibrated BLAST",
                    name,
                    it,
                    opts.damping,
                ));
            }
            if !rel.is_finite() {
                return Err(not_finite("calibrated BLAST", name, it, rel));
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
    if let Some(why) = unsupported(opts, true) {
        return Err(Error::Shape(format!("{why}: use --device cpu")));
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
    let shape = Shape {
        m: target.m,
        n: target.n,
        r: opts.rank,
        b_out: opts.b_out,
        b_in: opts.b_in,
    };
    let a: Vec<f32> = target
        .weight
        .iter()
        .map(|&v| (f64::from(v) / first.scale) as f32)
        .collect();
    let mut solver = CalSolver::new(
        gpu,
        &a,
        &gprime,
        shape,
        (opts.damping, gpu_opts.precision),
        target.name,
    )?;
    drop(a);
    drop(gprime);
    let history = iterate(&mut solver, &first, target, opts, progress, &|_| {})?;
    let state = solver.core.get_state()?;
    let rel_error = solver.exact_error(calib.damping)?;
    report(shape, first.scale, state, history, rel_error)
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
    validate_lowrank(target, rank)?;
    let gprime = calib.weight_f32(target)?;
    Ok(Linear::LowRank(lowrank_with(gpu, target, rank, &gprime)?))
}

fn lowrank_with(gpu: &Gpu, target: &Target<'_>, rank: usize, gprime: &[f32]) -> Result<LowRank> {
    let svd = svd::weighted_truncated_svd(gpu, target.weight, gprime, target.m, target.n, rank)?;
    lowrank_layer(&svd)
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
