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

mod blas;
mod calibrated;
mod chol;
mod monarch;
pub mod svd;
#[cfg(test)]
mod tests;

use cudarc::driver::LaunchConfig;
use rayon::prelude::*;

use blr_compress::{
    blast_start, BlastInit, BlastMethod, BlastOptions, BlastReport, BlastStart, Progress, Target,
};
use blr_core::{Blast, Linear, LowRank};

use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;
use blas::{Cublas, Op, Operand};
pub use calibrated::{blast_report_calibrated, lowrank_calibrated, CALIBRATED_CU};
use chol::{BatchedCholesky, CholKernels};
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

/// All device state of one factorization.
struct Solver<'g> {
    gpu: &'g Gpu,
    k: Kernels,
    blas: Cublas,
    /// TF32 for the two data GEMM families.
    tf32: bool,
    /// TF32 for every other GEMM of the iteration (Grams, gradients, Cholesky).
    tf32_rest: bool,
    /// TF32 for the triangular solves too: with `tf32`, unless `BLR_FACTORIZE_SOLVE_TF32=0`
    /// (0.8 s of 8.2 at 4096 x 11008, final error 1e-6 relative from the fp32 solves'; the
    /// solve residual goes from ~2e-6 to ~1.5e-3, well inside what the damped step needs).
    tf32_solve: bool,
    /// The V step's right-hand side and `diag(U^T A V)` in one pass over `U^T A`
    /// (`blast_v_rhs_diag`, b_out <= 16), unless `BLR_FACTORIZE_VFUSE=0`.
    fuse_v_rhs: bool,
    /// The U step's `V^T A^T` formed at the end of the S step and read by the S step's
    /// `diag(U^T A V)` (see [`Solver::av_product`]), unless `BLR_FACTORIZE_AVS=0`.
    av_in_s: bool,
    m: usize,
    n: usize,
    r: usize,
    b_out: usize,
    b_in: usize,
    p: usize,
    q: usize,
    norm_sq: f64,
    damping: f64,
    at: DeviceBuffer<f32>,
    u: DeviceBuffer<f32>,
    vt: DeviceBuffer<f32>,
    s: DeviceBuffer<f32>,
    jm: DeviceBuffer<f32>,
    km: DeviceBuffer<f32>,
    /// `A_j V_j` (U step), `U_i^T A_i` (V and S steps), `U_i diag(s_ij)` (final residual).
    big: DeviceBuffer<f32>,
    rhs: DeviceBuffer<f32>,
    pm: DeviceBuffer<f32>,
    qm: DeviceBuffer<f32>,
    gv: DeviceBuffer<f32>,
    h: DeviceBuffer<f32>,
    d: DeviceBuffer<f32>,
    hs: DeviceBuffer<f32>,
    g: DeviceBuffer<f32>,
    g_keep: DeviceBuffer<f32>,
    scal: DeviceBuffer<f64>,
    history: DeviceBuffer<f64>,
    chol: BatchedCholesky,
    /// Scratch for the blocked solves (the forward pass's result).
    ysolve: DeviceBuffer<f32>,
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
            let ev = self.gpu.event()?;
            ev.record(self.gpu)?;
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
        (k, blas): (Kernels, Cublas),
        a: &[f32],
        shape: Shape,
        iterations: usize,
        (lr, damping): (f64, f64),
        gpu_opts: &GpuBlastOptions,
    ) -> Result<Self> {
        let Shape {
            m,
            n,
            r,
            b_out,
            b_in,
        } = shape;
        let (p, q) = (m / b_out, n / b_in);
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
        let at = gpu.upload(a, "BLAST target A^T")?;
        lap("upload A");
        let rr = r * r;
        let nblk = b_out * b_in;
        // Fixed chunks summed in order (the same value whatever the thread count).
        let norm_sq: f64 = a
            .par_chunks(1 << 16)
            .map(|c| c.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>())
            .collect::<Vec<f64>>()
            .iter()
            .sum();
        let pm = gpu.alloc_zeros::<f32>(b_out * rr, "BLAST P_i")?;
        let qm = gpu.alloc_zeros::<f32>(b_in * rr, "BLAST Q_j")?;
        let h = gpu.alloc_zeros::<f32>(nblk * rr, "BLAST S Hessians")?;
        let rhs = gpu.alloc_zeros::<f32>(m * r, "BLAST U gradient (transposed)")?;
        let gv = gpu.alloc_zeros::<f32>(r * n, "BLAST V gradient")?;
        let g = gpu.alloc_zeros::<f32>(nblk * r, "BLAST S gradient")?;
        let steps: Vec<f32> = (0..iterations.max(1))
            .map(|it| (2.0 * lr * (1.0 - it as f64 / iterations.max(1) as f64)) as f32)
            .collect();
        let profile = std::env::var_os("BLR_FACTORIZE_PROFILE")
            .filter(|v| v != "0")
            .map(|_| std::cell::RefCell::new(Profile::default()));
        let chol = BatchedCholesky::new(gpu, &k.chol, r, nblk.max(b_out).max(b_in))?;
        lap("cholesky ws");
        let solver = Self {
            gpu,
            blas,
            tf32: gpu_opts.precision != GemmPrecision::Fp32,
            tf32_rest: gpu_opts.precision == GemmPrecision::Tf32,
            tf32_solve: gpu_opts.precision == GemmPrecision::Tf32
                && std::env::var_os("BLR_FACTORIZE_SOLVE_TF32").is_none_or(|v| v != "0"),
            fuse_v_rhs: b_out <= 16
                && std::env::var_os("BLR_FACTORIZE_VFUSE").is_none_or(|v| v != "0"),
            av_in_s: std::env::var_os("BLR_FACTORIZE_AVS").is_none_or(|v| v != "0"),
            m,
            n,
            r,
            b_out,
            b_in,
            p,
            q,
            norm_sq,
            damping,
            at,
            u: gpu.alloc_zeros::<f32>(m * r, "BLAST U^T")?,
            vt: gpu.alloc_zeros::<f32>(r * n, "BLAST V^T")?,
            s: gpu.alloc_zeros::<f32>(nblk * r, "BLAST S")?,
            jm: gpu.alloc_zeros::<f32>(b_out * rr, "BLAST U_i^T U_i")?,
            km: gpu.alloc_zeros::<f32>(b_in * rr, "BLAST V_j^T V_j")?,
            big: gpu.alloc_zeros::<f32>((b_in * m * r).max(b_out * r * n), "BLAST A V / U^T A")?,
            rhs,
            pm,
            qm,
            gv,
            h,
            d: gpu.alloc_zeros::<f32>(nblk * r, "BLAST diag(U^T A V)")?,
            hs: gpu.alloc_zeros::<f32>(nblk * r, "BLAST H s")?,
            g,
            g_keep: gpu.alloc_zeros::<f32>(nblk * r, "BLAST S gradient copy")?,
            scal: gpu.alloc_zeros::<f64>(SLOTS, "BLAST loss terms")?,
            history: gpu.alloc_zeros::<f64>(iterations.max(1), "BLAST error history")?,
            chol,
            ysolve: gpu
                .alloc_zeros::<f32>((r * m).max(r * n).max(nblk * r), "BLAST solve scratch")?,
            k,
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

    /// Uploads a start (host layouts of [`BlastStart`]) into the column-major device factors
    /// (V^T's row-major blocks go up as they are, into `big`, and are transposed there).
    fn set_state(&mut self, start: &BlastStart) -> Result<()> {
        let s: Vec<f32> = start.s.iter().map(|&v| v as f32).collect();
        // Row-major U (m, r) is the column-major U^T this solver keeps.
        self.gpu.copy_to_device(&start.u, &mut self.u)?;
        self.gpu.copy_to_device(&start.vt, &mut self.big)?;
        // Block j: V_j^T (r, q) row-major = (q x r, ld q) -> column-major (ld r).
        self.transpose_blocks(self.vt.device_ptr(), self.big.device_ptr(), self.q, self.r)?;
        self.gpu.copy_to_device(&s, &mut self.s)?;
        Ok(())
    }

    /// The factors in blr's layout: `U (m, r)` row-major, `V_j^T (r, q)` blocks, `s`
    /// (V^T's blocks transposed on the device, into `big`).
    fn get_state(&self) -> Result<(Vec<f32>, Vec<f32>, Vec<f32>)> {
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

    fn dot(&self, x: u64, y: u64, len: usize, slot: i32, weight: f64) -> Result<()> {
        let n = len as i64;
        let scal = self.scal.device_ptr();
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

    fn mix(&self, out: u64, g: u64, nx: usize, ny: usize, sx: usize, sy: usize) -> Result<()> {
        let rr = self.r * self.r;
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(rr, 256), nx.div_ceil(8) as u32, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let (s, r, nx, ny, sx, sy) = (
            self.s.device_ptr(),
            self.r as i32,
            nx as i32,
            ny as i32,
            sx as i32,
            sy as i32,
        );
        // SAFETY: blast_mix(float* out, const float* g, const float* s, int r, int nx, int ny,
        // int sx, int sy): out holds nx r x r matrices, g ny, s the b_out*b_in*r scales with
        // every index (x*sx + y*sy) < b_out*b_in.
        unsafe {
            self.gpu
                .launch(&self.k.mix)
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

    /// `y -= step x` with this iteration's step (from the device schedule).
    fn axpy_step(&self, y: u64, x: u64, len: usize) -> Result<()> {
        let n = len as i64;
        let (steps, itp) = (self.steps.device_ptr(), self.counter.device_ptr());
        // SAFETY: axpy_step(float* y, const float* x, const float* steps, const int* itp,
        // i64 n): y and x hold len floats; *itp < steps.len() (run() sets the counter to an
        // iteration index and each iteration moves it on by one).
        unsafe {
            self.gpu
                .launch(&self.k.axpy)
                .arg(&y)
                .arg(&x)
                .arg(&steps)
                .arg(&itp)
                .arg(&n)
                .launch(grid(self.gpu, len))
        }
    }

    /// `d_ij = diag(U_i^T A_ij V_j)` from `big` = `U^T A` (`blast_diag`, reading b_out r n
    /// floats) or, with `from_av`, from `big` = `V^T A^T` ([`Solver::av_product`]) and U^T
    /// (`blast_diag_av`, b_in r m).
    fn diag_products(&self, from_av: bool) -> Result<()> {
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

    /// `J_i = U_i^T U_i = U^T_i (U^T_i)^T`.
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

    /// `K_j = V_j^T V_j = V^T_j (V^T_j)^T`.
    fn v_gram(&self) -> Result<()> {
        let (q, r) = (self.q, self.r);
        let vt = self.vt.device_ptr();
        self.gemm(
            (Op::N, Op::T),
            (r, r, q),
            1.0,
            Operand::new(vt, r, q * r),
            Operand::new(vt, r, q * r),
            0.0,
            Operand::new(self.km.device_ptr(), r, r * r),
            self.b_in,
        )
    }

    /// `TVt_j = V_j^T A_j^T` (r, m) into `big`: the U step's data term. With `av_in_s` it is
    /// formed at the end of the S step (V does not change between it and the next U step), so
    /// that the S step's `diag(U_i^T A_ij V_j)` reads it (b_in r m floats) instead of
    /// `U^T A` (b_out r n), and once before the first iteration (`run`).
    fn av_product(&self) -> Result<()> {
        let (m, n, q, r, b_in) = (self.m, self.n, self.q, self.r, self.b_in);
        // TVt_j = V_j^T A_j^T (r, m): A_j^T = rows jq.. of at.
        self.blas.gemm(
            Op::N,
            Op::N,
            (r, m, q),
            1.0,
            Operand::new(self.vt.device_ptr(), r, q * r),
            Operand::new(self.at.device_ptr(), n, q),
            0.0,
            Operand::new(self.big.device_ptr(), r, r * m),
            b_in,
            self.tf32,
        )
    }

    fn step_u(&self) -> Result<()> {
        let (m, p, r, b_out, b_in) = (self.m, self.p, self.r, self.b_out, self.b_in);
        let (u, big, rhs, pm) = (
            self.u.device_ptr(),
            self.big.device_ptr(),
            self.rhs.device_ptr(),
            self.pm.device_ptr(),
        );
        if !self.av_in_s {
            self.av_product()?;
        }
        self.mark("u: A V")?;
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
        self.mix(pm, self.km.device_ptr(), b_out, b_in, b_in, 1)?;
        self.dot(u, rhs, m * r, U_LOSS, 1.0)?;
        self.dot(self.jm.device_ptr(), pm, b_out * r * r, U_LOSS + 1, 1.0)?;
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
        self.mark("u: rhs/P/grad")?;
        self.add_eps(pm, b_out, U_LOSS)?;
        self.chol.factor(
            self.gpu,
            &self.blas,
            pm,
            r * r,
            b_out,
            self.tf32_rest,
            &|n| self.mark(n),
        )?;
        self.mark("u: chol")?;
        // (grad (P + eps I)^-1)^T = (P + eps I)^-1 grad^T, P symmetric.
        self.chol.solve(
            &self.blas,
            b_out,
            Operand::new(rhs, r, p * r),
            Operand::new(self.ysolve.device_ptr(), r, p * r),
            p,
            self.tf32_solve,
        )?;
        self.mark("u: solve")?;
        self.axpy_step(u, rhs, m * r)?;
        self.u_gram()?;
        self.mark("u: gram")
    }

    fn step_v(&self) -> Result<()> {
        let (n, p, q, r, b_out, b_in) = (self.n, self.p, self.q, self.r, self.b_out, self.b_in);
        let (at, u, vt, big, gv, qm) = (
            self.at.device_ptr(),
            self.u.device_ptr(),
            self.vt.device_ptr(),
            self.big.device_ptr(),
            self.gv.device_ptr(),
            self.qm.device_ptr(),
        );
        // UT_i = U_i^T A_i (r, n): A_i = (columns ip.. of at)^T.
        self.blas.gemm(
            Op::N,
            Op::T,
            (r, n, p),
            1.0,
            Operand::new(u, r, p * r),
            Operand::new(at, n, p * n),
            0.0,
            Operand::new(big, r, r * n),
            b_out,
            self.tf32,
        )?;
        self.mark("v: U^T A")?;
        self.mix(qm, self.jm.device_ptr(), b_in, b_out, 1, b_in)?;
        let (ri, ni, qi, bo, bi) = (r as i32, n as i32, q as i32, b_out as i32, b_in as i32);
        let s = self.s.device_ptr();
        if self.fuse_v_rhs {
            let cfg = LaunchConfig {
                grid_dim: (Gpu::grid_1d(r, 32), b_in as u32, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            let d = self.d.device_ptr();
            // SAFETY: blast_v_rhs_diag(float* g, float* d, const float* ut, const float* vt,
            // const float* s, int r, int n, int q, int b_out, int b_in): g and vt (r, n), d and s
            // b_out*b_in*r, ut b_out (r, n) matrices; b_out <= 16 (fuse_v_rhs), grid r/32 x b_in.
            unsafe {
                self.gpu
                    .launch(&self.k.v_rhs_diag)
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
            self.diag_products(false)?;
        }
        let nblk = b_out * b_in;
        self.dot(
            self.s.device_ptr(),
            self.d.device_ptr(),
            nblk * r,
            V_LOSS,
            1.0,
        )?;
        self.dot(qm, self.km.device_ptr(), b_in * r * r, V_LOSS + 1, 1.0)?;
        if !self.fuse_v_rhs {
            // SAFETY: blast_v_rhs(float* g, const float* ut, const float* s, int r, int n,
            // int q, int b_out, int b_in): g (r, n), ut b_out (r, n) matrices, s b_out*b_in*r.
            unsafe {
                self.gpu
                    .launch(&self.k.v_rhs)
                    .arg(&gv)
                    .arg(&big)
                    .arg(&s)
                    .arg(&ri)
                    .arg(&ni)
                    .arg(&qi)
                    .arg(&bo)
                    .arg(&bi)
                    .launch(grid(self.gpu, r * n))?;
            }
        }
        // grad_j^T = Q_j V_j^T - sum_i diag(s_ij) UT_ij.
        self.gemm(
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
        self.add_eps(qm, b_in, V_LOSS)?;
        self.chol.factor(
            self.gpu,
            &self.blas,
            qm,
            r * r,
            b_in,
            self.tf32_rest,
            &|n| self.mark(n),
        )?;
        self.mark("v: chol")?;
        self.chol.solve(
            &self.blas,
            b_in,
            Operand::new(gv, r, q * r),
            Operand::new(self.ysolve.device_ptr(), r, q * r),
            q,
            self.tf32_solve,
        )?;
        self.mark("v: solve")?;
        self.axpy_step(vt, gv, r * n)?;
        self.v_gram()?;
        self.mark("v: gram")
    }

    fn step_s(&self) -> Result<()> {
        let (r, b_in) = (self.r, self.b_in);
        let nblk = self.b_out * b_in;
        let rr = r * r;
        if self.av_in_s {
            self.av_product()?;
        }
        self.diag_products(self.av_in_s)?;
        let (h, s, d, hs, g, gk) = (
            self.h.device_ptr(),
            self.s.device_ptr(),
            self.d.device_ptr(),
            self.hs.device_ptr(),
            self.g.device_ptr(),
            self.g_keep.device_ptr(),
        );
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(r, 128), nblk as u32, 1),
            block_dim: (128, 1, 1),
            shared_mem_bytes: 0,
        };
        let (jm, km, ri, bi) = (
            self.jm.device_ptr(),
            self.km.device_ptr(),
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
                .launch(cfg)?;
        }
        self.dot(s, d, nblk * r, S_LOSS, 1.0)?;
        self.dot(s, hs, nblk * r, S_LOSS + 1, 1.0)?;
        let len = (nblk * r) as i64;
        // SAFETY: blast_s_grad(float* g, float* g_keep, const float* hs, const float* d, i64 n):
        // all hold nblk*r floats.
        unsafe {
            self.gpu
                .launch(&self.k.s_grad)
                .arg(&g)
                .arg(&gk)
                .arg(&hs)
                .arg(&d)
                .arg(&len)
                .launch(grid(self.gpu, nblk * r))?;
        }
        self.mark("s: H/grad")?;
        self.add_eps(h, nblk, S_LOSS)?;
        self.chol
            .factor(self.gpu, &self.blas, h, rr, nblk, self.tf32_rest, &|n| {
                self.mark(n)
            })?;
        self.mark("s: chol")?;
        self.chol.solve(
            &self.blas,
            nblk,
            Operand::new(g, r, r),
            Operand::new(self.ysolve.device_ptr(), r, r),
            1,
            self.tf32_solve,
        )?;
        self.mark("s: solve")?;
        let scal = self.scal.device_ptr();
        let (base, slot) = (S_LOSS, S_AFTER);
        // SAFETY: blast_s_update(float* s, const float* dir, const float* g, const float* hs,
        // const float* d, i64 n, const float* steps, const int* itp, const double* scal_eps,
        // int base, double norm_sq, double damping, double* scal, int slot): all vectors hold
        // nblk*r floats; *itp < steps.len() (see axpy_step).
        let (steps, itp) = (self.steps.device_ptr(), self.counter.device_ptr());
        unsafe {
            self.gpu
                .launch(&self.k.s_update)
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
                .arg(&self.norm_sq)
                .arg(&self.damping)
                .arg(&scal)
                .arg(&slot)
                .launch(grid(self.gpu, nblk * r))
        }
    }

    /// One iteration (U, V, S steps and the error record) queued on the stream.
    fn iteration(&mut self) -> Result<()> {
        self.gpu.memset_bytes(&mut self.scal, 0)?;
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
        let (hist, scal, it, slot) = (
            self.history.device_ptr(),
            self.scal.device_ptr(),
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
            self.gpu
                .launch(&self.k.record)
                .arg(&hist)
                .arg(&it)
                .arg(&scal)
                .arg(&slot)
                .arg(&self.norm_sq)
                .launch(cfg)
        }
    }

    /// `||A - Â||_F / ||A||_F` from the dense residual, formed in place of `at` (which is
    /// therefore unusable afterwards).
    fn exact_error(&mut self) -> Result<f64> {
        let (m, n, p, q, r, b_out, b_in) = (
            self.m, self.n, self.p, self.q, self.r, self.b_out, self.b_in,
        );
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
        // int b_in): us holds b_out*b_in (r, p) blocks (big >= b_in*m*r), ut (r, m).
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
        self.dot(at, at, m * n, RESIDUAL, 1.0)?;
        let scal = self.gpu.download(&self.scal)?;
        let e2 = scal[RESIDUAL as usize].max(0.0);
        Ok(if self.norm_sq > 0.0 {
            (e2 / self.norm_sq).sqrt()
        } else {
            e2.sqrt()
        })
    }
}

#[derive(Clone, Copy)]
struct Shape {
    m: usize,
    n: usize,
    r: usize,
    b_out: usize,
    b_in: usize,
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
        let history = run(
            &mut solver,
            opts,
            0..probe,
            &mut done,
            progress,
            target.name,
        )?;
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
    lap("state");
    history.extend(run(
        &mut solver,
        opts,
        probe..opts.iterations,
        &mut done,
        progress,
        target.name,
    )?);

    lap("iterations");
    let (u, vt, s) = solver.get_state()?;
    lap("download");
    let rel_error = solver.exact_error()?;
    lap("exact error");
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
    let svd = svd::truncated_svd(gpu, target.weight, m, n, rank)?;
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
    let layer = LowRank::new(m, n, rank, u, v).map_err(|e| Error::Shape(e.to_string()))?;
    Ok(Linear::LowRank(layer))
}

/// Runs iterations `iters` from the state on the device; returns their relative errors.
fn run(
    solver: &mut Solver<'_>,
    opts: &BlastOptions,
    iters: std::ops::Range<usize>,
    done: &mut usize,
    progress: &dyn Progress,
    name: &str,
) -> Result<Vec<f64>> {
    let gpu = solver.gpu;
    let first = iters.start;
    let mut out = Vec::with_capacity(iters.len());
    if iters.is_empty() {
        return Ok(out);
    }
    solver.u_gram()?;
    solver.v_gram()?;
    if solver.av_in_s {
        solver.av_product()?;
    }
    solver.chol.reset(gpu)?;
    // Read the errors back every few iterations (a synchronisation), not after each.
    let every = 10usize;
    let mut read = first;
    let start = i32::try_from(first).map_err(|_| Error::Shape("too many iterations".into()))?;
    gpu.copy_to_device(&[start], &mut solver.counter)?;
    for it in iters.clone() {
        // The first iteration runs as queued launches; it is then captured as a CUDA graph
        // (the step and the iteration index live on the device) and the rest replay it: ~500
        // launches per iteration, mostly small, cost more to queue from the host than to run.
        if let Some(graph) = &solver.graph {
            graph.replay()?;
        } else {
            solver.iteration()?;
            if solver.use_graph {
                match gpu.capture(|| solver.iteration()) {
                    Ok(graph) => {
                        graph.upload()?;
                        solver.graph = Some(graph);
                    }
                    // No graph (a driver or library that refuses capture): keep queueing.
                    Err(_) => solver.use_graph = false,
                }
            }
        }
        if it + 1 == iters.end || (it + 1 - first).is_multiple_of(every) {
            let hist = gpu.download(&solver.history)?;
            if solver.chol.failed(gpu)? {
                return Err(Error::Numerical {
                    during: format!("BLAST factorization of {name} on the GPU"),
                    reason: format!(
                        "a preconditioner was not positive definite by iteration {it} \
                         (damping {}); raise --damping or use --device cpu",
                        opts.damping
                    ),
                });
            }
            for (i, &rel) in hist.iter().enumerate().take(it + 1).skip(read) {
                if !rel.is_finite() {
                    return Err(Error::Numerical {
                        during: format!("BLAST factorization of {name} on the GPU"),
                        reason: format!(
                            "error became {rel} at iteration {i}; lower the lr or raise the damping"
                        ),
                    });
                }
                out.push(rel);
                *done += 1;
                progress.advance(*done, Some(rel));
            }
            read = it + 1;
            solver.fold_profile()?;
        }
    }
    if iters.end == opts.iterations {
        solver.print_profile();
    }
    Ok(out)
}
