//! BLAST factorization on the GPU: the same preconditioned alternating iteration as
//! `blr_compress::blast_report` (data-free), with every product in cuBLAS fp32 and the damped
//! Gauss-Newton solves as batched Cholesky factorizations on the device.
//!
//! Notation (BRIEF sections 2-3, as in blr-compress's blast.rs): `A = W / scale` (m, n), blocks
//! `A_ij` (p, q), `p = m / b_out`, `q = n / b_in`; `U_i` (p, r), `V_j` (q, r), `s_ij` (r);
//! `J_i = U_i^T U_i`, `K_j = V_j^T V_j`. One iteration, at step `2 lr` (lr decayed linearly):
//! - U: `P_i = sum_j (s_ij s_ij^T) ⊙ K_j`, `grad_i = U_i P_i - sum_j A_ij V_j diag(s_ij)`,
//!   `U_i -= step grad_i (P_i + eps I)^-1`;
//! - V: `Q_j = sum_i (s_ij s_ij^T) ⊙ J_i`, `grad_j^T = Q_j V_j^T - sum_i diag(s_ij) U_i^T A_ij`,
//!   `V_j^T -= step (Q_j + eps I)^-1 grad_j^T`;
//! - S: `H_ij = J_i ⊙ K_j`, `grad_ij = H_ij s_ij - diag(U_i^T A_ij V_j)`,
//!   `s_ij -= step (H_ij + eps I)^-1 grad_ij`;
//!
//! with `eps = damping * ||A - Â||_F` evaluated before each sub-step from the factored terms
//! (`||A||^2 - 2 <A, Â> + ||Â||^2`, accumulated in f64 on the device so no step waits for the
//! host). The start (random, low-rank or spectral) and the normalisation come from
//! `blr_compress::blast_start`, so both paths begin from the same factors; restarts probe the
//! same way. Calibrated (Gram-weighted) BLAST is calibrated.rs ([`blast_report_calibrated`]);
//! the plain-gradient baseline is not ported: [`unsupported`] says so and the caller runs the
//! CPU path.
//!
//! Cost per iteration at 4096 x 11008, b = 16, r = 1488: the two data GEMM families
//! `A_j V_j` and `U_i^T A_i` (2 m n r = 134 GFLOP each), the Grams and the gradient GEMMs
//! (~135 GFLOP), and 16 + 16 + 256 Cholesky factorizations of 1488 x 1488 (~320 GFLOP, 3/4 of
//! it in the batched trailing-update GEMMs) with their triangular solves (~70 GFLOP).
//!
//! Layouts are column-major (cuBLAS's) and chosen so that no transpose is ever copied: `at` =
//! `A^T` (n, m) ld n, which is `W / scale` as stored row-major; `U^T` (r, m) ld r (= blr's
//! row-major U) and `V^T` (r, n) ld r, so `U_i^T` and `V_j^T` are column offsets and every
//! gradient is formed transposed, (r, p) or (r, q), where the preconditioner solves act from
//! the left; r x r matrices back to back.

pub(crate) mod blas;
mod calibrated;
mod chol;
mod core;
mod monarch;
pub mod svd;
#[cfg(test)]
mod tests;

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use blr_compress::{
    blast_start, BlastInit, BlastMethod, BlastOptions, BlastReport, BlastStart, Progress, Target,
};
use blr_core::{Linear, LowRank};

use self::core::{iterate, not_finite, not_positive_definite, report, Core, Iteration, Shape};
use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;
use blas::{Cublas, Op, Operand};
pub use calibrated::{blast_report_calibrated, lowrank_calibrated, CALIBRATED_CU};
use chol::CholKernels;
pub use monarch::monarch;

/// The source of `factorize.cu`.
pub const FACTORIZE_CU: KernelSource = crate::kernel_source!("factorize.cu");

/// Which GEMMs run on TF32 tensor cores (fp32 in and out, 10-bit-mantissa products, fp32
/// accumulate) instead of fp32 CUDA cores.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum GemmPrecision {
    /// Every GEMM in fp32.
    #[default]
    Fp32,
    /// The two data GEMM families, `V_j^T A_j^T` and `U_i^T A_i` (2 m n r flops each), on TF32.
    Tf32Data,
    /// Every large GEMM of the iteration on TF32: data, Grams, gradients and the Cholesky
    /// factorizations. The triangular solves and the final exact error stay fp32.
    Tf32,
}

impl std::str::FromStr for GemmPrecision {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "fp32" => Ok(Self::Fp32),
            "tf32-data" => Ok(Self::Tf32Data),
            "tf32" => Ok(Self::Tf32),
            other => Err(Error::Shape(format!(
                "unknown GEMM precision '{other}': use fp32, tf32-data or tf32"
            ))),
        }
    }
}

/// GPU-specific settings.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GpuBlastOptions {
    pub precision: GemmPrecision,
}

/// Why the GPU path cannot run this request (the caller then runs the CPU path), or `None`.
/// Calibrated requests run through [`blast_report_calibrated`].
pub fn unsupported(opts: &BlastOptions, _calibrated: bool) -> Option<&'static str> {
    if opts.method != BlastMethod::Preconditioned {
        return Some("the plain gradient-descent baseline runs on the CPU only");
    }
    None
}

/// Opens device 0 for factorization: the driver, a device, cuBLAS and NVRTC must all be
/// present; the kernels are compiled (or read from the cache) here so that a missing header or
/// compiler shows up before any work starts.
pub fn open_gpu() -> Result<Gpu> {
    let gpu = Gpu::open_default()?;
    crate::libs::ensure_cublas()?;
    Kernels::load(&gpu)?;
    Ok(gpu)
}

#[derive(Clone)]
struct Kernels {
    u_rhs: Kernel,
    mix: Kernel,
    dot: Kernel,
    add_eps: Kernel,
    diag: Kernel,
    v_rhs: Kernel,
    v_rhs_diag: Kernel,
    hadamard: Kernel,
    s_grad: Kernel,
    s_update: Kernel,
    record: Kernel,
    axpy: Kernel,
    scale_u: Kernel,
    transpose: Kernel,
    chol: CholKernels,
}

impl Kernels {
    fn load(gpu: &Gpu) -> Result<Self> {
        let m = gpu.load_module(&FACTORIZE_CU, &CompileOptions::default())?;
        Ok(Self {
            u_rhs: m.function("blast_u_rhs")?,
            mix: m.function("blast_mix")?,
            dot: m.function("dot_acc")?,
            add_eps: m.function("add_eps_diag")?,
            diag: m.function("blast_diag")?,
            v_rhs: m.function("blast_v_rhs")?,
            v_rhs_diag: m.function("blast_v_rhs_diag")?,
            hadamard: m.function("hadamard_blocks")?,
            s_grad: m.function("blast_s_grad")?,
            s_update: m.function("blast_s_update")?,
            record: m.function("blast_record")?,
            axpy: m.function("axpy_step")?,
            scale_u: m.function("blast_scale_u")?,
            transpose: m.function("transpose_blocks")?,
            chol: CholKernels {
                diag: m.function("chol_diag_q8")?,
                diag_wide: m.function("chol_diag_q8w")?,
                place: m.function("chol_inv_place")?,
                group: m.function("chol_inv_group")?,
                group_tc: m.function("chol_inv_group_tc")?,
                group_tc3: m.function("chol_inv_group_tc3")?,
            },
        })
    }
}

/// Grid-stride launch over `n` elements.
fn grid(gpu: &Gpu, n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (
            Gpu::grid_1d(n, 256).min(gpu.info().sm_count.max(1) * 8),
            1,
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

const F: u64 = 4;

/// Slots of the f64 scalars: (cross, quad) of the U, V and S-before losses, the S-after loss
/// minus `||A||^2`, and the final exact residual.
const U_LOSS: i32 = 0;
const V_LOSS: i32 = 2;
const S_LOSS: i32 = 4;
const S_AFTER: i32 = 6;
const RESIDUAL: i32 = 7;
const SLOTS: usize = 8;

/// All device state of one data-free factorization: the shared [`Core`] and what only this
/// iteration keeps (the V-step Grams `K_j` and `Q_j`, the device step schedule, the graph).
struct Solver<'g> {
    core: Core<'g>,
    /// TF32 for the triangular solves too: with `tf32`, unless `BLR_FACTORIZE_SOLVE_TF32=0`
    /// (0.8 s of 8.2 at 4096 x 11008, final error 1e-6 relative from the fp32 solves'; the
    /// solve residual goes from ~2e-6 to ~1.5e-3, well inside what the damped step needs).
    tf32_solve: bool,
    /// The V step's right-hand side and `diag(U^T A V)` in one pass over `U^T A`
    /// (`blast_v_rhs_diag`, b_out <= 16), unless `BLR_FACTORIZE_VFUSE=0`.
    fuse_v_rhs: bool,
    /// The U step's `V^T A^T` ([`Core::v_times_data`]) formed at the end of the S step (V does
    /// not change between it and the next U step), so that the S step's `diag(U_i^T A_ij V_j)`
    /// reads it (b_in r m floats) instead of `U^T A` (b_out r n), and once before the first
    /// iteration (`run`); unless `BLR_FACTORIZE_AVS=0`.
    av_in_s: bool,
    km: DeviceBuffer<f32>,
    qm: DeviceBuffer<f32>,
    gv: DeviceBuffer<f32>,
    g: DeviceBuffer<f32>,
    g_keep: DeviceBuffer<f32>,
    history: DeviceBuffer<f64>,
    /// `2 lr` of every iteration (lr decayed linearly), read on the device at `counter`.
    steps: DeviceBuffer<f32>,
    /// The index of the iteration being run (moved on by its last launch).
    counter: DeviceBuffer<i32>,
    /// One captured iteration, replayed for the rest (see `run`).
    graph: Option<crate::gpu::Graph>,
    /// Whether to capture (off when profiling, or with `BLR_FACTORIZE_GRAPH=0`).
    use_graph: bool,
    /// `BLR_FACTORIZE_PROFILE=1`: events between the phases of each iteration, summed per
    /// phase and printed to stderr at the end (a measurement aid; it adds no synchronisation
    /// inside an iteration).
    profile: Option<std::cell::RefCell<Profile>>,
}

#[derive(Default)]
struct Profile {
    marks: Vec<(&'static str, crate::gpu::Event)>,
    totals: Vec<(&'static str, f64)>,
}

impl Solver<'_> {
    fn mark(&self, name: &'static str) -> Result<()> {
        if let Some(p) = &self.profile {
            let ev = self.core.gpu.event()?;
            ev.record(self.core.gpu)?;
            if let Ok(mut p) = p.try_borrow_mut() {
                p.marks.push((name, ev));
            }
        }
        Ok(())
    }

    /// Folds the recorded marks into per-phase totals (waits for the events).
    fn fold_profile(&self) -> Result<()> {
        let Some(p) = &self.profile else {
            return Ok(());
        };
        let Ok(mut p) = p.try_borrow_mut() else {
            return Ok(());
        };
        let marks = std::mem::take(&mut p.marks);
        for w in marks.windows(2) {
            let ms = w[0].1.elapsed_ms(&w[1].1)?;
            let name = w[1].0;
            match p.totals.iter_mut().find(|(n, _)| *n == name) {
                Some(t) => t.1 += ms,
                None => p.totals.push((name, ms)),
            }
        }
        Ok(())
    }

    fn print_profile(&self) {
        if let Some(p) = &self.profile {
            if let Ok(p) = p.try_borrow() {
                let total: f64 = p.totals.iter().map(|t| t.1).sum();
                for (name, ms) in &p.totals {
                    eprintln!(
                        "profile {name:>14}: {ms:10.1} ms ({:5.1}%)",
                        100.0 * ms / total.max(1e-9)
                    );
                }
            }
        }
    }
}

impl<'g> Solver<'g> {
    fn new(
        gpu: &'g Gpu,
        pre: (Kernels, Cublas),
        a: &[f32],
        shape: Shape,
        iterations: usize,
        (lr, damping): (f64, f64),
        gpu_opts: &GpuBlastOptions,
    ) -> Result<Self> {
        let Shape {
            n, r, b_out, b_in, ..
        } = shape;
        // BLR_FACTORIZE_PROFILE: where the set-up's time goes (host wall clock).
        let clock = std::time::Instant::now();
        let profiling = std::env::var_os("BLR_FACTORIZE_PROFILE").is_some_and(|v| v != "0");
        let lap = |what: &str| {
            if profiling {
                let _ = gpu.synchronize();
                eprintln!(
                    "profile set-up {what:>12}: {:8.1} ms",
                    clock.elapsed().as_secs_f64() * 1e3
                );
            }
        };
        let mut core = Core::new(
            gpu,
            pre,
            a,
            shape,
            gpu_opts.precision,
            damping,
            SLOTS,
            "BLAST",
            &lap,
        )?;
        // Fixed chunks summed in order (the same value whatever the thread count).
        core.norm_sq = a
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        let rr = r * r;
        let nblk = b_out * b_in;
        let steps: Vec<f32> = (0..iterations.max(1))
            .map(|it| (2.0 * lr * (1.0 - it as f64 / iterations.max(1) as f64)) as f32)
            .collect();
        let profile = std::env::var_os("BLR_FACTORIZE_PROFILE")
            .filter(|v| v != "0")
            .map(|_| std::cell::RefCell::new(Profile::default()));
        let solver = Self {
            core,
            tf32_solve: gpu_opts.precision == GemmPrecision::Tf32
                && std::env::var_os("BLR_FACTORIZE_SOLVE_TF32").is_none_or(|v| v != "0"),
            fuse_v_rhs: b_out <= 16
                && std::env::var_os("BLR_FACTORIZE_VFUSE").is_none_or(|v| v != "0"),
            av_in_s: std::env::var_os("BLR_FACTORIZE_AVS").is_none_or(|v| v != "0"),
            km: gpu.alloc_zeros::<f32>(b_in * rr, "BLAST V_j^T V_j")?,
            qm: gpu.alloc_zeros::<f32>(b_in * rr, "BLAST Q_j")?,
            gv: gpu.alloc_zeros::<f32>(r * n, "BLAST V gradient")?,
            g: gpu.alloc_zeros::<f32>(nblk * r, "BLAST S gradient")?,
            g_keep: gpu.alloc_zeros::<f32>(nblk * r, "BLAST S gradient copy")?,
            history: gpu.alloc_zeros::<f64>(iterations.max(1), "BLAST error history")?,
            steps: gpu.upload(&steps, "BLAST step schedule")?,
            counter: gpu.alloc_zeros::<i32>(1, "BLAST iteration counter")?,
            graph: None,
            use_graph: profile.is_none()
                && std::env::var_os("BLR_FACTORIZE_GRAPH").is_none_or(|v| v != "0"),
            profile,
        };
        lap("buffers");
        Ok(solver)
    }

    fn mix(&self, out: u64, g: u64, nx: usize, ny: usize, sx: usize, sy: usize) -> Result<()> {
        let c = &self.core;
        let rr = c.r * c.r;
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(rr, 256), nx.div_ceil(8) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s, r, nx, ny, sx, sy) = (
            c.s.device_ptr(),
            c.r as i32,
            nx as i32,
            ny as i32,
            sx as i32,
            sy as i32,
        );
        // SAFETY: blast_mix(float* out, const float* g, const float* s, int r, int nx, int ny,
        // int sx, int sy): out holds nx r x r matrices, g ny, s the b_out*b_in*r scales with
        // every index (x*sx + y*sy) < b_out*b_in.
        unsafe {
            c.gpu
                .launch(&c.k.mix)
                .arg(&out)
                .arg(&g)
                .arg(&s)
                .arg(&r)
                .arg(&nx)
                .arg(&ny)
                .arg(&sx)
                .arg(&sy)
                .launch(cfg)
        }
    }

    /// `y -= step x` with this iteration's step (from the device schedule).
    fn axpy_step(&self, y: u64, x: u64, len: usize) -> Result<()> {
        let n = len as i64;
        let (steps, itp) = (self.steps.device_ptr(), self.counter.device_ptr());
        // SAFETY: axpy_step(float* y, const float* x, const float* steps, const int* itp,
        // i64 n): y and x hold len floats; *itp < steps.len() (run() sets the counter to an
        // iteration index and each iteration moves it on by one).
        unsafe {
            self.core
                .gpu
                .launch(&self.core.k.axpy)
                .arg(&y)
                .arg(&x)
                .arg(&steps)
                .arg(&itp)
                .arg(&n)
                .launch(grid(self.core.gpu, len))
        }
    }

    /// `K_j = V_j^T V_j = V^T_j (V^T_j)^T`.
    fn v_gram(&self) -> Result<()> {
        let c = &self.core;
        c.gram(c.vt.device_ptr(), c.q, c.b_in, self.km.device_ptr())
    }

    fn step_u(&self) -> Result<()> {
        let c = &self.core;
        if !self.av_in_s {
            c.v_times_data(c.at.device_ptr())?;
        }
        self.mark("u: A V")?;
        c.u_rhs()?;
        self.mix(
            c.pm.device_ptr(),
            self.km.device_ptr(),
            c.b_out,
            c.b_in,
            c.b_in,
            1,
        )?;
        c.u_direction(U_LOSS, self.tf32_solve, &|n| self.mark(n))?;
        self.axpy_step(c.u.device_ptr(), c.rhs.device_ptr(), c.m * c.r)?;
        c.u_gram()?;
        self.mark("u: gram")
    }

    fn step_v(&self) -> Result<()> {
        let c = &self.core;
        let (n, q, r, b_out, b_in) = (c.n, c.q, c.r, c.b_out, c.b_in);
        let (vt, gv, qm) = (
            c.vt.device_ptr(),
            self.gv.device_ptr(),
            self.qm.device_ptr(),
        );
        c.u_times_data(c.at.device_ptr())?;
        self.mark("v: U^T A")?;
        self.mix(qm, c.jm.device_ptr(), b_in, b_out, 1, b_in)?;
        if self.fuse_v_rhs {
            let (ri, ni, qi, bo, bi) = (r as i32, n as i32, q as i32, b_out as i32, b_in as i32);
            let cfg = LaunchConfig {
                grid_dim: (Gpu::grid_1d(r, 32), b_in as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let (d, big, s) = (c.d.device_ptr(), c.big.device_ptr(), c.s.device_ptr());
            // SAFETY: blast_v_rhs_diag(float* g, float* d, const float* ut, const float* vt,
            // const float* s, int r, int n, int q, int b_out, int b_in): g and vt (r, n), d and s
            // b_out*b_in*r, ut b_out (r, n) matrices; b_out <= 16 (fuse_v_rhs), grid r/32 x b_in.
            unsafe {
                c.gpu
                    .launch(&c.k.v_rhs_diag)
                    .arg(&gv)
                    .arg(&d)
                    .arg(&big)
                    .arg(&vt)
                    .arg(&s)
                    .arg(&ri)
                    .arg(&ni)
                    .arg(&qi)
                    .arg(&bo)
                    .arg(&bi)
                    .launch(cfg)?;
            }
        } else {
            c.diag_products(false)?;
        }
        let nblk = b_out * b_in;
        c.dot(c.s.device_ptr(), c.d.device_ptr(), nblk * r, V_LOSS, 1.0)?;
        c.dot(qm, self.km.device_ptr(), b_in * r * r, V_LOSS + 1, 1.0)?;
        if !self.fuse_v_rhs {
            c.v_rhs(gv)?;
        }
        // grad_j^T = Q_j V_j^T - sum_i diag(s_ij) UT_ij.
        c.gemm(
            (Op::N, Op::N),
            (r, q, r),
            1.0,
            Operand::new(qm, r, r * r),
            Operand::new(vt, r, q * r),
            1.0,
            Operand::new(gv, r, q * r),
            b_in,
        )?;
        self.mark("v: rhs/Q/grad")?;
        c.damped_solve(
            qm,
            b_in,
            Some(V_LOSS),
            gv,
            q,
            self.tf32_solve,
            &|n| self.mark(n),
            ["v: chol", "v: solve"],
        )?;
        self.axpy_step(vt, gv, r * n)?;
        self.v_gram()?;
        self.mark("v: gram")
    }

    fn step_s(&self) -> Result<()> {
        let c = &self.core;
        let r = c.r;
        let nblk = c.b_out * c.b_in;
        if self.av_in_s {
            c.v_times_data(c.at.device_ptr())?;
        }
        c.diag_products(self.av_in_s)?;
        c.hadamard(c.hs.device_ptr(), self.km.device_ptr())?;
        c.s_loss(S_LOSS)?;
        let (g, gk) = (self.g.device_ptr(), self.g_keep.device_ptr());
        c.s_grad(g, gk)?;
        self.mark("s: H/grad")?;
        c.damped_solve(
            c.h.device_ptr(),
            nblk,
            Some(S_LOSS),
            g,
            1,
            self.tf32_solve,
            &|n| self.mark(n),
            ["s: chol", "s: solve"],
        )?;
        let (s, hs, d, scal) = (
            c.s.device_ptr(),
            c.hs.device_ptr(),
            c.d.device_ptr(),
            c.scal.device_ptr(),
        );
        let len = (nblk * r) as i64;
        let (base, slot) = (S_LOSS, S_AFTER);
        // SAFETY: blast_s_update(float* s, const float* dir, const float* g, const float* hs,
        // const float* d, i64 n, const float* steps, const int* itp, const double* scal_eps,
        // int base, double norm_sq, double damping, double* scal, int slot): all vectors hold
        // nblk*r floats; *itp < steps.len() (see axpy_step).
        let (steps, itp) = (self.steps.device_ptr(), self.counter.device_ptr());
        unsafe {
            c.gpu
                .launch(&c.k.s_update)
                .arg(&s)
                .arg(&g)
                .arg(&gk)
                .arg(&hs)
                .arg(&d)
                .arg(&len)
                .arg(&steps)
                .arg(&itp)
                .arg(&scal)
                .arg(&base)
                .arg(&c.norm_sq)
                .arg(&c.damping)
                .arg(&scal)
                .arg(&slot)
                .launch(grid(c.gpu, nblk * r))
        }
    }

    /// One iteration (U, V, S steps and the error record) queued on the stream.
    fn iteration(&mut self) -> Result<()> {
        self.core.gpu.memset_bytes(&mut self.core.scal, 0)?;
        self.mark("start")?;
        self.step_u()?;
        self.mark("start")?;
        self.step_v()?;
        self.mark("start")?;
        self.step_s()?;
        self.record()?;
        self.mark("s: update")
    }

    fn record(&self) -> Result<()> {
        let c = &self.core;
        let (hist, scal, it, slot) = (
            self.history.device_ptr(),
            c.scal.device_ptr(),
            self.counter.device_ptr(),
            S_AFTER,
        );
        let cfg = LaunchConfig {
            grid_dim: (1, 1, 1),
            block_dim: (32, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: blast_record(double* history, int* itp, const double* scal, int slot,
        // double norm_sq): *itp < history.len() (see axpy_step), slot < SLOTS.
        unsafe {
            c.gpu
                .launch(&c.k.record)
                .arg(&hist)
                .arg(&it)
                .arg(&scal)
                .arg(&slot)
                .arg(&c.norm_sq)
                .launch(cfg)
        }
    }

    /// `||A - Â||_F / ||A||_F` from the dense residual, formed in place of `at` (which is
    /// therefore unusable afterwards).
    fn exact_error(&mut self) -> Result<f64> {
        let c = &self.core;
        c.subtract_approximation()?;
        let at = c.at.device_ptr();
        c.dot(at, at, c.m * c.n, RESIDUAL, 1.0)?;
        let scal = c.gpu.download(&c.scal)?;
        let e2 = scal[RESIDUAL as usize].max(0.0);
        Ok(if c.norm_sq > 0.0 {
            (e2 / c.norm_sq).sqrt()
        } else {
            e2.sqrt()
        })
    }
}

/// Data-free BLAST on `gpu`: the iteration of `blr_compress::blast_report`, same start, same
/// schedule, same damping, same restarts. Fails with a message naming the alternative when
/// [`unsupported`] (calibration or the gradient-descent method) applies.
pub fn blast_report(
    gpu: &Gpu,
    target: &Target<'_>,
    opts: &BlastOptions,
    gpu_opts: &GpuBlastOptions,
    progress: &dyn Progress,
) -> Result<BlastReport> {
    if let Some(why) = unsupported(opts, false) {
        return Err(Error::Shape(format!("{why}: use --device cpu")));
    }
    // BLR_FACTORIZE_PROFILE: the host-side phases too (wall clock, after a stream sync).
    let profiling = std::env::var_os("BLR_FACTORIZE_PROFILE").is_some_and(|v| v != "0");
    let clock = std::time::Instant::now();
    let lap = |what: &str| {
        if profiling {
            eprintln!(
                "profile host {what:>14}: {:8.1} ms since start",
                clock.elapsed().as_secs_f64() * 1e3
            );
        }
    };
    let (m, n, r, b_out, b_in) = (target.m, target.n, opts.rank, opts.b_out, opts.b_in);
    let shape = Shape {
        m,
        n,
        r,
        b_out,
        b_in,
    };
    let solver_for = |scale: f64, pre: (Kernels, Cublas)| {
        let a: Vec<f32> = target
            .weight
            .par_iter()
            .map(|&v| (f64::from(v) / scale) as f32)
            .collect();
        Solver::new(
            gpu,
            pre,
            &a,
            shape,
            opts.iterations,
            (opts.lr, opts.damping),
            gpu_opts,
        )
    };
    // The kernels and the cuBLAS handle (~0.1 s, mostly loading cuBLAS) are made while a
    // host-side start (random, spectral) is computed on a second thread. (The start alone on a
    // second thread overlapping the upload measured slower when it was sequential: 1.39 s
    // against 1.17 s to the first iteration at 4096 x 11008.)
    let init_gpu = || -> Result<(Kernels, Cublas)> { Ok((Kernels::load(gpu)?, Cublas::new(gpu)?)) };
    let (first, pre) = match opts.init {
        BlastInit::LowRank => (lowrank_start(gpu, target, opts)?, init_gpu()?),
        _ => std::thread::scope(|sc| {
            let start = sc.spawn(|| blast_start(target, opts, 0));
            let pre = init_gpu();
            let first = start
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
            Ok::<_, Error>((first?, pre?))
        })?,
    };
    lap("start");
    if first.scale == 0.0 {
        // W = 0: the CPU path's answer (zero factors) costs nothing.
        return Ok(blr_compress::blast_report(target, opts, None, progress)?);
    }
    let mut solver = solver_for(first.scale, pre)?;
    if profiling {
        gpu.synchronize()?;
    }
    lap("solver+upload");
    let history = iterate(&mut solver, &first, target, opts, progress, &lap)?;
    lap("iterations");
    let state = solver.core.get_state()?;
    lap("download");
    let rel_error = solver.exact_error()?;
    lap("exact error");
    report(shape, first.scale, state, history, rel_error)
}

/// The truncated-SVD start of `blr_compress::blast_start` (`BlastInit::LowRank`) with the SVD
/// on the GPU ([`svd::truncated_svd`]): the same random factors underneath, the same
/// normalisation, columns `k < min(r, m, n)` set to `U_k sqrt(s_k)` and `V_k sqrt(s_k)` with
/// `s_ij = 1`. Singular pairs may differ in sign from the CPU's, which the iteration does not
/// see (`U_k` and `V_k` flip together). Without cuSOLVER the CPU start is used.
fn lowrank_start(gpu: &Gpu, target: &Target<'_>, opts: &BlastOptions) -> Result<BlastStart> {
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
    let a: Vec<f32> = target
        .weight
        .iter()
        .map(|&v| (f64::from(v) / st.scale) as f32)
        .collect();
    let svd = match svd::truncated_svd(gpu, &a, m, n, r) {
        Ok(svd) => svd,
        Err(Error::LibraryNotFound { .. }) => return Ok(blast_start(target, opts, 0)?),
        Err(e) => return Err(e),
    };
    let keep = r.min(m.min(n));
    for k in 0..keep {
        for row in 0..m {
            st.u[row * r + k] = svd.left[k * m + row] as f32;
        }
        for j in 0..b_in {
            for c in 0..q {
                st.vt[j * r * q + k * q + c] = svd.right_t[k * n + j * q + c] as f32;
            }
        }
        for ij in 0..b_out * b_in {
            st.s[ij * r + k] = 1.0;
        }
    }
    Ok(st)
}

/// Data-free low-rank factorization `W ≈ U V` by the truncated SVD on the GPU: the
/// factors of `blr_compress::lowrank` (balanced, `U_r sqrt(S_r)` and `sqrt(S_r) V_r^T`) up to
/// the sign of each singular pair.
pub fn lowrank(gpu: &Gpu, target: &Target<'_>, rank: usize) -> Result<Linear> {
    validate_lowrank(target, rank)?;
    let svd = svd::truncated_svd(gpu, target.weight, target.m, target.n, rank)?;
    Ok(Linear::LowRank(lowrank_layer(&svd)?))
}

/// Whether a rank-`rank` low-rank layer fits `target` (the error names the target).
fn validate_lowrank(target: &Target<'_>, rank: usize) -> Result<()> {
    blr_core::format::Shape {
        format: blr_core::FormatKind::LowRank,
        m: target.m,
        n: target.n,
        b_out: 1,
        b_in: 1,
        rank,
    }
    .validate()
    .map_err(|e| Error::Shape(format!("{}: {e}", target.name)))
}

/// The balanced factors of a truncated SVD as blr's low-rank layer: `U (m, t)` and `V (t, n)`
/// row-major, f32.
fn lowrank_layer(svd: &svd::Balanced) -> Result<LowRank> {
    let (m, n, rank) = (svd.m, svd.n, svd.t);
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

impl<'g> Iteration<'g> for Solver<'g> {
    fn core_mut(&mut self) -> &mut Core<'g> {
        &mut self.core
    }

    fn run(
        &mut self,
        opts: &BlastOptions,
        iters: std::ops::Range<usize>,
        done: &mut usize,
        progress: &dyn Progress,
        name: &str,
    ) -> Result<Vec<f64>> {
        let gpu = self.core.gpu;
        let first = iters.start;
        let mut out = Vec::with_capacity(iters.len());
        if iters.is_empty() {
            return Ok(out);
        }
        self.core.u_gram()?;
        self.v_gram()?;
        if self.av_in_s {
            self.core.v_times_data(self.core.at.device_ptr())?;
        }
        self.core.chol.reset(gpu)?;
        // Read the errors back every few iterations (a synchronisation), not after each.
        let every = 10usize;
        let mut read = first;
        let start = i32::try_from(first).map_err(|_| Error::Shape("too many iterations".into()))?;
        gpu.copy_to_device(&[start], &mut self.counter)?;
        for it in iters.clone() {
            // The first iteration runs as queued launches; it is then captured as a CUDA graph
            // (the step and the iteration index live on the device) and the rest replay it:
            // ~500 launches per iteration, mostly small, cost more to queue from the host than
            // to run.
            if let Some(graph) = &self.graph {
                graph.replay()?;
            } else {
                self.iteration()?;
                if self.use_graph {
                    match gpu.capture(|| self.iteration()) {
                        Ok(graph) => {
                            graph.upload()?;
                            self.graph = Some(graph);
                        }
                        // No graph (a driver or library that refuses capture): keep queueing.
                        Err(_) => self.use_graph = false,
                    }
                }
            }
            if it + 1 == iters.end || (it + 1 - first).is_multiple_of(every) {
                let hist = gpu.download(&self.history)?;
                if self.core.chol.failed(gpu)? {
                    return Err(not_positive_definite("BLAST", name, it, opts.damping));
                }
                for (i, &rel) in hist.iter().enumerate().take(it + 1).skip(read) {
                    if !rel.is_finite() {
                        return Err(not_finite("BLAST", name, i, rel));
                    }
                    out.push(rel);
                    *done += 1;
                    progress.advance(*done, Some(rel));
                }
                read = it + 1;
                self.fold_profile()?;
            }
        }
        if iters.end == opts.iterations {
            self.print_profile();
        }
        Ok(out)
    }
}
