//! The device-side BLAST core shared by the data-free iteration (mod.rs, [`super::Solver`])
//! and the calibrated one (calibrated.rs, `CalSolver`), as blr-compress has one
//! `blast_report` for both: the dims, the buffers both keep (the target `at`, the factors, the
//! Grams `J_i`, `P_i`, the data products in `big`, the S-step vectors, the f64 loss terms, the
//! batched-Cholesky workspace), the launch wrappers of the steps they share (the data GEMMs
//! with `X = A` or `T = A G'`, the U right-hand side and gradient, `diag(U^T X V)`, the V
//! right-hand side, the S Hessian blocks and gradient, the damped preconditioner solves, the
//! dense residual), the state upload and download, and the restart logic around the
//! iteration ([`iterate`]). Notation and layouts as in mod.rs.

use cudarc::driver::LaunchConfig;

use blr_compress::{blast_start, BlastOptions, BlastReport, BlastStart, Progress, Target};
use blr_core::{Blast, Linear};

use super::blas::{Cublas, Op, Operand};
use super::chol::BatchedCholesky;
use super::{grid, GemmPrecision, Kernels, F};
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use crate::memory::DeviceBuffer;

/// The factorization's dims: `A` (m, n), `b_out x b_in` blocks, rank r.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) r: usize,
    pub(super) b_out: usize,
    pub(super) b_in: usize,
}

/// A phase mark for the profile (see `Solver::mark`); `&|_| Ok(())` where none is kept.
pub(super) type Mark<'a> = &'a dyn Fn(&'static str) -> Result<()>;

/// The device state both BLAST iterations keep, and the launches they share.
pub(super) struct Core<'g> {
    pub(super) gpu: &'g Gpu,
    pub(super) k: Kernels,
    pub(super) blas: Cublas,
    /// TF32 for the two data GEMM families (`V_j^T X_j^T`, `U_i^T X_i`).
    pub(super) tf32: bool,
    /// TF32 for every other GEMM of the iteration (Grams, gradients, Cholesky).
    pub(super) tf32_rest: bool,
    pub(super) m: usize,
    pub(super) n: usize,
    pub(super) r: usize,
    pub(super) b_out: usize,
    pub(super) b_in: usize,
    pub(super) p: usize,
    pub(super) q: usize,
    /// `||A||^2` (data-free) or `tr(A G' A^T)` (calibrated).
    pub(super) norm_sq: f64,
    pub(super) damping: f64,
    /// `A^T` (n, m), overwritten by the residual in [`Core::subtract_approximation`].
    pub(super) at: DeviceBuffer<f32>,
    pub(super) u: DeviceBuffer<f32>,
    pub(super) vt: DeviceBuffer<f32>,
    pub(super) s: DeviceBuffer<f32>,
    /// `J_i = U_i^T U_i`, b_out r x r.
    pub(super) jm: DeviceBuffer<f32>,
    /// `P_i`, b_out r x r.
    pub(super) pm: DeviceBuffer<f32>,
    /// `V_j^T X_j^T` (U step), `U_i^T X_i` (V and S steps), `U_i diag(s_ij)` (the residual),
    /// the transposed `V^T` blocks (state up and down).
    pub(super) big: DeviceBuffer<f32>,
    /// The U step's right-hand side, gradient and direction (r, m).
    pub(super) rhs: DeviceBuffer<f32>,
    /// The S preconditioners, b_out b_in r x r.
    pub(super) h: DeviceBuffer<f32>,
    /// `diag(U_i^T X_ij V_j)`, b_out b_in r.
    pub(super) d: DeviceBuffer<f32>,
    /// `H s`, b_out b_in r.
    pub(super) hs: DeviceBuffer<f32>,
    /// The f64 loss terms (slots defined by each solver).
    pub(super) scal: DeviceBuffer<f64>,
    pub(super) chol: BatchedCholesky,
    /// Scratch for the blocked solves (the forward pass's result).
    pub(super) ysolve: DeviceBuffer<f32>,
}

impl<'g> Core<'g> {
    /// Uploads `a` (= `A^T`, column-major) and allocates the shared buffers (labelled
    /// `"{label} ..."`) and `slots` f64 loss terms; `norm_sq` is the solver's to set. `lap`
    /// reports set-up phases to the profile.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        gpu: &'g Gpu,
        (k, blas): (Kernels, Cublas),
        a: &[f32],
        shape: Shape,
        precision: GemmPrecision,
        damping: f64,
        slots: usize,
        label: &str,
        lap: &dyn Fn(&str),
    ) -> Result<Self> {
        let Shape {
            m,
            n,
            r,
            b_out,
            b_in,
        } = shape;
        let (p, q) = (m / b_out, n / b_in);
        let (rr, nblk) = (r * r, b_out * b_in);
        let at = gpu.upload(a, &format!("{label} target A^T"))?;
        lap("upload A");
        let alloc =
            |len: usize, what: &str| gpu.alloc_zeros::<f32>(len, &format!("{label} {what}"));
        let chol = BatchedCholesky::new(gpu, &k.chol, r, nblk.max(b_out).max(b_in))?;
        lap("cholesky ws");
        Ok(Self {
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
            norm_sq: 0.0,
            damping,
            at,
            u: alloc(m * r, "U^T")?,
            vt: alloc(r * n, "V^T")?,
            s: alloc(nblk * r, "S")?,
            jm: alloc(b_out * rr, "U_i^T U_i")?,
            pm: alloc(b_out * rr, "P_i")?,
            big: alloc(
                (b_in * m * r).max(b_out * r * n).max(nblk * p * r),
                "data products V^T X^T / U^T X",
            )?,
            rhs: alloc(m * r, "U gradient (transposed)")?,
            h: alloc(nblk * rr, "S preconditioners")?,
            d: alloc(nblk * r, "diag(U^T X V)")?,
            hs: alloc(nblk * r, "H s")?,
            scal: gpu.alloc_zeros::<f64>(slots, &format!("{label} loss terms"))?,
            chol,
            ysolve: alloc((r * m).max(r * n).max(nblk * r), "solve scratch")?,
            k,
        })
    }

    /// A GEMM of the iteration other than the data GEMMs (TF32 with `tf32_rest`).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gemm(
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

    /// `scal[slot] += weight <x, y>` over `len` floats (f64 accumulation).
    pub(super) fn dot(&self, x: u64, y: u64, len: usize, slot: i32, weight: f64) -> Result<()> {
        let n = len as i64;
        let scal = self.scal.device_ptr();
        // SAFETY: dot_acc(const float* x, const float* y, i64 n, double* scal, int slot,
        // double weight): x and y are live buffers of >= len floats; slot < scal.len().
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

    /// `A_b += eps I` for `batch` r x r matrices at `a`, `eps = damping ||E||` from the loss
    /// terms at `base`, `base + 1`.
    pub(super) fn add_eps(&self, a: u64, batch: usize, base: i32) -> Result<()> {
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

    /// `big = V_j^T X_j^T` (b_in (r, m) matrices), `xt = X^T` (n, m): the U step's data term
    /// (`X = A` data-free, `T = A G'` calibrated).
    pub(super) fn v_times_data(&self, xt: u64) -> Result<()> {
        let (m, n, q, r, b_in) = (self.m, self.n, self.q, self.r, self.b_in);
        // V_j^T X_j^T (r, m): X_j^T = rows jq.. of xt.
        self.blas.gemm(
            Op::N,
            Op::N,
            (r, m, q),
            1.0,
            Operand::new(self.vt.device_ptr(), r, q * r),
            Operand::new(xt, n, q),
            0.0,
            Operand::new(self.big.device_ptr(), r, r * m),
            b_in,
            self.tf32,
        )
    }

    /// `big = U_i^T X_i` (b_out (r, n) matrices), `xt = X^T`: the V and S steps' data term.
    pub(super) fn u_times_data(&self, xt: u64) -> Result<()> {
        let (n, p, r, b_out) = (self.n, self.p, self.r, self.b_out);
        // UT_i = U_i^T X_i (r, n): X_i = (columns ip.. of xt)^T.
        self.blas.gemm(
            Op::N,
            Op::T,
            (r, n, p),
            1.0,
            Operand::new(self.u.device_ptr(), r, p * r),
            Operand::new(xt, n, p * n),
            0.0,
            Operand::new(self.big.device_ptr(), r, r * n),
            b_out,
            self.tf32,
        )
    }

    /// `rhs_i^T = sum_j diag(s_ij) (V_j^T X_ij^T)` from `big` = [`Core::v_times_data`].
    pub(super) fn u_rhs(&self) -> Result<()> {
        let (m, r) = (self.m, self.r);
        let (rhs, big, s) = (
            self.rhs.device_ptr(),
            self.big.device_ptr(),
            self.s.device_ptr(),
        );
        let (mi, ri, pi, bi) = (m as i32, r as i32, self.p as i32, self.b_in as i32);
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
                .launch(grid(self.gpu, m * r))
        }
    }

    /// The rest of the U step's direction once `P_i` is in `pm` and the right-hand side in
    /// `rhs`: the loss terms at `base` (`<U, rhs>`, `<J, P>`), `grad_i^T = P_i U_i^T - rhs_i^T`
    /// and `(P_i + eps I)^-1 grad_i^T`, both in place of `rhs`.
    pub(super) fn u_direction(&self, base: i32, solve_tf32: bool, mark: Mark<'_>) -> Result<()> {
        let (m, p, r, b_out) = (self.m, self.p, self.r, self.b_out);
        let (u, rhs, pm) = (
            self.u.device_ptr(),
            self.rhs.device_ptr(),
            self.pm.device_ptr(),
        );
        self.dot(u, rhs, m * r, base, 1.0)?;
        self.dot(self.jm.device_ptr(), pm, b_out * r * r, base + 1, 1.0)?;
        // grad_i^T = P_i U_i^T - rhs_i^T, in place of rhs.
        self.gemm(
            (Op::N, Op::N),
            (r, p, r),
            1.0,
            Operand::new(pm, r, r * r),
            Operand::new(u, r, p * r),
            -1.0,
            Operand::new(rhs, r, p * r),
            b_out,
        )?;
        mark("u: rhs/P/grad")?;
        // (grad (P + eps I)^-1)^T = (P + eps I)^-1 grad^T, P symmetric.
        self.damped_solve(
            pm,
            b_out,
            Some(base),
            rhs,
            p,
            solve_tf32,
            mark,
            ["u: chol", "u: solve"],
        )
    }

    /// `x_b = (A_b + eps I)^-1 x_b` for `batch` r x r matrices `A_b` at `a` (eps from the loss
    /// terms at `base`; `None`: already added) and as many (r, cols) blocks `x_b` back to
    /// back; `phases` name the factorization and the solve for the profile.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn damped_solve(
        &self,
        a: u64,
        batch: usize,
        base: Option<i32>,
        x: u64,
        cols: usize,
        solve_tf32: bool,
        mark: Mark<'_>,
        phases: [&'static str; 2],
    ) -> Result<()> {
        let r = self.r;
        if let Some(base) = base {
            self.add_eps(a, batch, base)?;
        }
        self.chol
            .factor(self.gpu, &self.blas, a, r * r, batch, self.tf32_rest, mark)?;
        mark(phases[0])?;
        self.chol.solve(
            &self.blas,
            batch,
            Operand::new(x, r, cols * r),
            Operand::new(self.ysolve.device_ptr(), r, cols * r),
            cols,
            solve_tf32,
        )?;
        mark(phases[1])
    }

    /// `J_i = U_i^T U_i = U^T_i (U^T_i)^T`.
    pub(super) fn u_gram(&self) -> Result<()> {
        self.gram(
            self.u.device_ptr(),
            self.p,
            self.b_out,
            self.jm.device_ptr(),
        )
    }

    /// `out_b = X_b X_b^T` (r x r) for the `batch` (r, w) blocks `X_b` of `x` (ld r): the
    /// Grams `U_i^T U_i` (x = U^T, w = p) and `V_j^T V_j` (x = V^T, w = q).
    pub(super) fn gram(&self, x: u64, w: usize, batch: usize, out: u64) -> Result<()> {
        let r = self.r;
        self.gemm(
            (Op::N, Op::T),
            (r, r, w),
            1.0,
            Operand::new(x, r, w * r),
            Operand::new(x, r, w * r),
            0.0,
            Operand::new(out, r, r * r),
            batch,
        )
    }

    /// `d_ij = diag(U_i^T X_ij V_j)` from `big` = `U^T X` ([`Core::u_times_data`],
    /// `blast_diag` reading b_out r n floats) or, with `from_av`, from `big` = `V^T X^T`
    /// ([`Core::v_times_data`]) and U^T (b_in r m).
    pub(super) fn diag_products(&self, from_av: bool) -> Result<()> {
        let (other, len, width) = if from_av {
            (self.u.device_ptr(), self.m, self.p)
        } else {
            (self.vt.device_ptr(), self.n, self.q)
        };
        let from_av = i32::from(from_av);
        let (r, len, width, b_in) = (self.r as i32, len as i32, width as i32, self.b_in as i32);
        let cfg = LaunchConfig {
            grid_dim: (
                Gpu::grid_1d(self.r, 128),
                (self.b_out * self.b_in) as u32,
                1,
            ),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (d, big) = (self.d.device_ptr(), self.big.device_ptr());
        // SAFETY: blast_diag(float* d, const float* x, const float* y, int r, int len, int w,
        // int b_in, int from_av): d holds b_out*b_in*r; from_av = 0: x = big holds b_out (r, n)
        // matrices, y = vt (r, n); from_av = 1: big holds b_in (r, m) (big >= b_in*m*r),
        // y = u (r, m).
        unsafe {
            self.gpu
                .launch(&self.k.diag)
                .arg(&d)
                .arg(&big)
                .arg(&other)
                .arg(&r)
                .arg(&len)
                .arg(&width)
                .arg(&b_in)
                .arg(&from_av)
                .launch(cfg)
        }
    }

    /// `g_j^T = sum_i diag(s_ij) UT_ij` (r, n) into `g` from `big` = [`Core::u_times_data`].
    pub(super) fn v_rhs(&self, g: u64) -> Result<()> {
        let (r, n) = (self.r, self.n);
        let (big, s) = (self.big.device_ptr(), self.s.device_ptr());
        let (ri, ni, qi, bo, bi) = (
            r as i32,
            n as i32,
            self.q as i32,
            self.b_out as i32,
            self.b_in as i32,
        );
        // SAFETY: blast_v_rhs(float* g, const float* ut, const float* s, int r, int n, int q,
        // int b_out, int b_in): g (r, n), ut b_out (r, n) matrices, s b_out*b_in*r.
        unsafe {
            self.gpu
                .launch(&self.k.v_rhs)
                .arg(&g)
                .arg(&big)
                .arg(&s)
                .arg(&ri)
                .arg(&ni)
                .arg(&qi)
                .arg(&bo)
                .arg(&bi)
                .launch(grid(self.gpu, r * n))
        }
    }

    /// The S preconditioners `h_ij = J_i ⊙ K_j` for the b_in r x r blocks `K_j` at `km`, and
    /// `hs_ij = h_ij s_ij` into `hs`.
    pub(super) fn hadamard(&self, hs: u64, km: u64) -> Result<()> {
        let (r, b_in) = (self.r, self.b_in);
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(r, 128), (self.b_out * b_in) as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (h, jm, s, ri, bi) = (
            self.h.device_ptr(),
            self.jm.device_ptr(),
            self.s.device_ptr(),
            r as i32,
            b_in as i32,
        );
        // SAFETY: hadamard_blocks(float* h, float* hs, const float* jm, const float* km,
        // const float* s, int r, int b_in): h holds b_out*b_in r x r matrices, hs and s
        // b_out*b_in*r, jm b_out and km b_in r x r matrices.
        unsafe {
            self.gpu
                .launch(&self.k.hadamard)
                .arg(&h)
                .arg(&hs)
                .arg(&jm)
                .arg(&km)
                .arg(&s)
                .arg(&ri)
                .arg(&bi)
                .launch(cfg)
        }
    }

    /// The S sub-problem's loss terms for the current s at `base`, `base + 1`: `<s, d>` and
    /// `<s, H s>` (from `hs`).
    pub(super) fn s_loss(&self, base: i32) -> Result<()> {
        let len = self.b_out * self.b_in * self.r;
        let (s, d, hs) = (
            self.s.device_ptr(),
            self.d.device_ptr(),
            self.hs.device_ptr(),
        );
        self.dot(s, d, len, base, 1.0)?;
        self.dot(s, hs, len, base + 1, 1.0)
    }

    /// `g = hs - d` and its copy `g_keep` (b_out b_in r each).
    pub(super) fn s_grad(&self, g: u64, g_keep: u64) -> Result<()> {
        let nr = self.b_out * self.b_in * self.r;
        let (hs, d, len) = (self.hs.device_ptr(), self.d.device_ptr(), nr as i64);
        // SAFETY: blast_s_grad(float* g, float* g_keep, const float* hs, const float* d, i64 n):
        // all hold nblk*r floats.
        unsafe {
            self.gpu
                .launch(&self.k.s_grad)
                .arg(&g)
                .arg(&g_keep)
                .arg(&hs)
                .arg(&d)
                .arg(&len)
                .launch(grid(self.gpu, nr))
        }
    }

    /// `at = (A - Â)^T`: `big = U_i diag(s_ij)` (b_out b_in (r, p) blocks), then
    /// `A_ij^T -= V_j (diag(s_ij) U_i^T)` per block row (fp32). `at` is the residual afterwards.
    pub(super) fn subtract_approximation(&self) -> Result<()> {
        let (n, p, q, r, b_out, b_in) = (self.n, self.p, self.q, self.r, self.b_out, self.b_in);
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
        let (at, vt) = (self.at.device_ptr(), self.vt.device_ptr());
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
        Ok(())
    }

    /// Uploads a start (host layouts of [`BlastStart`]) into the column-major device factors
    /// (V^T's row-major blocks go up as they are, into `big`, and are transposed there).
    pub(super) fn set_state(&mut self, start: &BlastStart) -> Result<()> {
        let s: Vec<f32> = start.s.iter().map(|&v| v as f32).collect();
        // Row-major U (m, r) is the column-major U^T the solvers keep.
        self.gpu.copy_to_device(&start.u, &mut self.u)?;
        self.gpu.copy_to_device(&start.vt, &mut self.big)?;
        // Block j: V_j^T (r, q) row-major = (q x r, ld q) -> column-major (ld r).
        self.transpose_blocks(self.vt.device_ptr(), self.big.device_ptr(), self.q, self.r)?;
        self.gpu.copy_to_device(&s, &mut self.s)?;
        Ok(())
    }

    /// The factors in blr's layout: `U (m, r)` row-major, `V_j^T (r, q)` blocks, `s`
    /// (V^T's blocks transposed on the device, into `big`).
    pub(super) fn get_state(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
        let (n, r) = (self.n, self.r);
        self.transpose_blocks(self.big.device_ptr(), self.vt.device_ptr(), r, self.q)?;
        let u = self.gpu.download(&self.u)?;
        let vt = self.gpu.download_prefix(&self.big, r * n)?;
        Ok((u, vt, self.gpu.download(&self.s)?))
    }

    /// `dst_j = src_j^T` for the b_in blocks `src_j` (rows x cols, ld rows), rows * cols apart.
    fn transpose_blocks(&self, dst: u64, src: u64, rows: usize, cols: usize) -> Result<()> {
        let cfg = LaunchConfig {
            grid_dim: (
                Gpu::grid_1d(rows, 32),
                Gpu::grid_1d(cols, 32),
                self.b_in as u32,
            ),
            block_dim: (32, 8, 1),
            shared_mem_bytes: 0,
        };
        let (rows, cols) = (rows as i32, cols as i32);
        // SAFETY: transpose_blocks(float* dst, const float* src, int rows, int cols): block z
        // reads and writes rows*cols floats at z*rows*cols; dst and src (vt and big) hold at
        // least b_in*rows*cols = r*n floats and do not overlap.
        unsafe {
            self.gpu
                .launch(&self.k.transpose)
                .arg(&dst)
                .arg(&src)
                .arg(&rows)
                .arg(&cols)
                .launch(cfg)
        }
    }
}

/// A BLAST iteration on a [`Core`]: what [`iterate`] needs of the data-free and the
/// calibrated solvers.
pub(super) trait Iteration<'g> {
    fn core_mut(&mut self) -> &mut Core<'g>;
    /// Runs iterations `iters` from the state on the device; returns their relative errors.
    fn run(
        &mut self,
        opts: &BlastOptions,
        iters: std::ops::Range<usize>,
        done: &mut usize,
        progress: &dyn Progress,
        name: &str,
    ) -> Result<Vec<f64>>;
}

/// The restarts of `blr_compress::blast_report` around a solver: with one start, `first`
/// goes up once and stays; with several, each (`first`, then `blast_start(.., k)`) runs
/// `iterations / 10` probe iterations, the best is kept (downloaded) and put back; then the
/// rest of the iterations run. Returns the error history (the kept start's probe, then the
/// rest); the solver holds the final state. `lap` marks the host-side profile.
pub(super) fn iterate<'g, S: Iteration<'g>>(
    solver: &mut S,
    first: &BlastStart,
    target: &Target<'_>,
    opts: &BlastOptions,
    progress: &dyn Progress,
    lap: &dyn Fn(&str),
) -> Result<Vec<f64>> {
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
        // One start: it goes up once and stays (no probe, no round trip through the host).
        solver.core_mut().set_state(first)?;
        best = Some((None, Vec::new()));
    }
    for k in (0..restarts).filter(|_| restarts > 1) {
        let start = if k == 0 {
            first.clone()
        } else {
            blast_start(target, opts, k)?
        };
        solver.core_mut().set_state(&start)?;
        let history = solver.run(opts, 0..probe, &mut done, progress, target.name)?;
        let better = match &best {
            None => true,
            Some((_, h)) => history.last() < h.last(),
        };
        if better {
            let (u, vt, s) = solver.core_mut().get_state()?;
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
        solver.core_mut().set_state(&kept)?;
    }
    lap("state");
    history.extend(solver.run(
        opts,
        probe..opts.iterations,
        &mut done,
        progress,
        target.name,
    )?);
    Ok(history)
}

/// The report: the factors `(u, vt, s)` (s of the normalised `A`, multiplied back by
/// `scale`) as a BLAST layer of `shape`.
pub(super) fn report(
    shape: Shape,
    scale: f64,
    (u, vt, s): (Vec<f32>, Vec<f32>, Vec<f32>),
    history: Vec<f64>,
    rel_error: f64,
) -> Result<BlastReport> {
    let Shape {
        m,
        n,
        r,
        b_out,
        b_in,
    } = shape;
    let s: Vec<f32> = s.iter().map(|&v| (f64::from(v) * scale) as f32).collect();
    let layer = Linear::Blast(
        Blast::new(m, n, b_out, b_in, r, u, vt, s).map_err(|e| Error::Shape(e.to_string()))?,
    );
    Ok(BlastReport {
        layer,
        history,
        rel_error,
    })
}

/// The errors of a run that went wrong on the device: a preconditioner that was not positive
/// definite by iteration `it`.
pub(super) fn not_positive_definite(what: &str, name: &str, it: usize, damping: f64) -> Error {
    Error::Numerical {
        during: format!("{what} factorization of {name} on the GPU"),
        reason: format!(
            "a preconditioner was not positive definite by iteration {it} \
             (damping {damping}); raise --damping or use --device cpu"
        ),
    }
}

/// ... and an error history that stopped being finite at iteration `it`.
pub(super) fn not_finite(what: &str, name: &str, it: usize, rel: f64) -> Error {
    Error::Numerical {
        during: format!("{what} factorization of {name} on the GPU"),
        reason: format!("error became {rel} at iteration {it}; lower the lr or raise the damping"),
    }
}
