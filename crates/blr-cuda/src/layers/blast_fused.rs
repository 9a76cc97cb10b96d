//! [`Strategy::Fused`](super::Strategy::Fused) for BLAST prefill: all three stages in one kernel
//! (blast_fused.cu, `blr_blast_fused`), every intermediate in shared memory or registers.
//!
//! Notation of ../shared/BRIEF.md section 2 (`q = n / b_in`, `p = m / b_out`, rank `r`). One
//! thread-block cluster of `B = max(b_in, b_out)` CTAs (up to 16: the non-portable cluster size
//! on sm_90) owns a tile of 128 tokens and one pass of up to 256 columns of every output block;
//! the b x b mixing is exchanged over distributed shared memory. See the kernel's header for
//! the tiles and the pipeline, docs/perf/kernel-notes.md for what it measures.
//!
//! Where it applies: BLAST with `b_out, b_in <= 16`, `q, p, r` multiples of 8, and the kernel's
//! shared memory ([`fused_smem_bytes`], dominated by the resident `128 x q` tile of X) within
//! the sm_90 opt-in limit; on the device also compute capability >= 9.0 and a resident cluster.

use cudarc::driver::sys;
use half::bf16;

use blr_core::format::Shape;

use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::launch_ex::{launch_ex, max_active_clusters, KernelArg, LaunchAttr, LaunchEx};
use crate::memory::DeviceBuffer;

/// blast_fused.cu: `blr_blast_fused`.
pub const BLAST_FUSED_CU: KernelSource =
    crate::kernel_source!("blast_fused.cu", headers: ["common.cuh"]);

// Mirrored from blast_fused.cu (namespace blr_fused); a change there must be made here too.
/// Tokens per cluster.
pub const FUSED_TOKENS: usize = 128;
const RC: usize = 64;
/// Output columns per output block and pass; p > 256 runs ceil(p / 256) passes.
pub const FUSED_PASS_COLS: usize = 256;
const THREADS: u32 = 256;
const ZLD: usize = FUSED_TOKENS + 8;
const ULD: usize = RC + 8;
/// The opt-in shared memory per block of sm_90 (H100/H200): 227 KiB.
pub const SM90_SMEM_OPTIN: usize = 227 * 1024;
/// Largest cluster on sm_90 with the non-portable size allowed.
const MAX_CLUSTER: usize = 16;

/// Dynamic shared memory of `blr_blast_fused` for input block width `q` (the kernel's
/// `FusedSmem`): X tile, two weight-tile slots (with S), the Z/W staging tile, gathered Z, two W
/// buffers.
pub fn fused_smem_bytes(q: usize, b_in: usize, b_out: usize) -> usize {
    let cluster = b_in.max(b_out).max(1);
    let q16 = q.div_ceil(16) * 16;
    let xld = q16 + 8;
    let kown = 4 * 16usize.div_ceil(cluster);
    // A weight tile (V chunk or U chunk) plus the S rows of the CTA's rank units.
    let slot = (RC * xld).max(FUSED_PASS_COLS * ULD) + kown * 256;
    let st_rows = RC.max(b_out * kown);
    let elems =
        FUSED_TOKENS * xld + 2 * slot + st_rows * ZLD + b_in * kown * ZLD + 2 * RC * ZLD + 8;
    elems * 2
}

/// Why the fused kernel cannot run a BLAST layer of shape `s` (on any device), or None.
/// The caller has checked the format and the multiples of 8.
pub(crate) fn fused_shape_problem(s: &Shape) -> Option<String> {
    let cluster = s.b_in.max(s.b_out);
    if cluster == 0 || cluster > MAX_CLUSTER {
        return Some(format!(
            "runs one cluster of max(b_in, b_out) CTAs, at most {MAX_CLUSTER}"
        ));
    }
    let smem = fused_smem_bytes(s.n / s.b_in, s.b_in, s.b_out);
    if smem > SM90_SMEM_OPTIN {
        return Some(format!(
            "needs {} KiB of shared memory per CTA (a 128-token tile of X_j with q = {} stays on \
             chip), over the {} KiB of sm_90; use 'partial'",
            smem.div_ceil(1024),
            s.n / s.b_in,
            SM90_SMEM_OPTIN / 1024
        ));
    }
    None
}

/// The fused kernel, loaded on devices with thread-block clusters (sm_90 and newer).
#[derive(Debug, Clone)]
pub struct FusedKernel {
    kernel: Kernel,
    optin: usize,
    /// Clusters of size `B` (index B - 1) resident at once with the full opt-in shared memory.
    max_clusters: Vec<u32>,
}

impl FusedKernel {
    /// Compiles and configures the kernel; `None` on devices without clusters (before sm_90).
    pub fn load(gpu: &Gpu, opts: &CompileOptions) -> Result<Option<Self>> {
        if gpu.info().compute_capability.0 < 9 {
            return Ok(None);
        }
        let module = gpu.load_module(&BLAST_FUSED_CU, opts)?;
        let kernel = module.function("blr_blast_fused")?;
        let optin = usize::try_from(gpu.info().max_smem_per_block_optin.0).unwrap_or(0);
        let smem = u32::try_from(optin.min(SM90_SMEM_OPTIN)).unwrap_or(0);
        kernel.set_max_dynamic_smem(smem)?;
        kernel
            .cuda_function()
            .set_attribute(
                sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )
            .map_err(|e| Error::LaunchConfig {
                kernel: kernel.name().to_string(),
                reason: format!("cannot allow non-portable cluster sizes: {e}"),
            })?;
        let mut max_clusters = Vec::with_capacity(MAX_CLUSTER);
        for b in 1..=MAX_CLUSTER as u32 {
            let cfg = cluster_launch(b, b * 64, smem);
            max_clusters.push(max_active_clusters(gpu, &kernel, &cfg).unwrap_or(0));
        }
        Ok(Some(Self {
            kernel,
            optin,
            max_clusters,
        }))
    }

    /// Clusters of `b` CTAs this device holds at once (0: such a cluster never fits).
    pub fn max_active_clusters(&self, b: usize) -> u32 {
        b.checked_sub(1)
            .and_then(|i| self.max_clusters.get(i))
            .copied()
            .unwrap_or(0)
    }

    pub fn kernel(&self) -> &Kernel {
        &self.kernel
    }
}

fn cluster_launch(b: u32, grid: u32, smem: u32) -> LaunchEx {
    LaunchEx {
        grid,
        block: THREADS,
        smem,
        attr: LaunchAttr::Cluster(b),
    }
}

/// Measurement knob, not for use: `BLR_FUSED_ABLATE=<bits>` makes the kernel skip parts of its
/// work so that one timing run shows what each part costs (docs/perf/kernel-notes.md): 1 Z
/// exchange stores, 2 W exchange stores, 4 in-loop cluster barriers, 8 stage-1 MMAs, 16 stage-3
/// MMAs, 32 mixing MMAs, 64 weight loads, 128 unrotated exchange order, 512 return after the
/// start barrier, 1024 return after the first loads, 2048 no Y store. 256 is an option, not a
/// cut: each cluster barrier arrives just before its wait instead of one stage GEMM earlier.
/// Results are wrong with any cut; 0 (unset) is the kernel.
fn ablation() -> i32 {
    std::env::var("BLR_FUSED_ABLATE")
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .unwrap_or(0)
}

/// `y[..t*m] = x[..t*n] W^T` for a BLAST layer in one launch. `u (b_out, p, r)`,
/// `vt (b_in, r, q)`, `s_dev (r, 16, 16)` as uploaded by `GpuLinear`; sizes checked here.
#[allow(clippy::too_many_arguments)]
pub(crate) fn blast_fused(
    gpu: &Gpu,
    fk: Option<&FusedKernel>,
    s: &Shape,
    t: usize,
    x: &DeviceBuffer<bf16>,
    u: &DeviceBuffer<bf16>,
    vt: &DeviceBuffer<bf16>,
    s_dev: &DeviceBuffer<bf16>,
    y: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let fk = fk.ok_or_else(|| {
        Error::Shape(format!(
            "strategy 'fused' needs thread-block clusters (compute capability 9.0 or newer); \
             this device is {}.{}: use 'partial'",
            gpu.info().compute_capability.0,
            gpu.info().compute_capability.1
        ))
    })?;
    let (bo, bi, r) = (s.b_out, s.b_in, s.rank);
    let (p, q) = (s.m / bo, s.n / bi);
    let cluster = bo.max(bi);
    let smem = fused_smem_bytes(q, bi, bo);
    let bad = |reason: String| Error::LaunchConfig {
        kernel: fk.kernel.name().to_string(),
        reason,
    };
    if smem > fk.optin.min(SM90_SMEM_OPTIN) {
        return Err(bad(format!(
            "needs {smem} B of shared memory per CTA, this device allows {}; use 'partial'",
            fk.optin
        )));
    }
    if fk.max_active_clusters(cluster) == 0 {
        return Err(bad(format!(
            "a cluster of {cluster} CTAs with {smem} B of shared memory each is never resident \
             on this device; use 'partial'"
        )));
    }
    if x.len() < t * s.n
        || y.len() < t * s.m
        || u.len() < bo * p * r
        || vt.len() < bi * r * q
        || s_dev.len() < r * 256
    {
        return Err(Error::Shape(format!(
            "fused BLAST {s:?} at T={t}: a factor, x or y buffer is smaller than the shape needs"
        )));
    }
    let npass = p.div_ceil(FUSED_PASS_COLS);
    let tiles = t.div_ceil(FUSED_TOKENS);
    let grid = cluster
        .checked_mul(tiles * npass)
        .and_then(|g| u32::try_from(g).ok())
        .ok_or_else(|| {
            bad(format!(
                "{tiles} token tiles x {npass} passes overflow the grid"
            ))
        })?;
    let i = |v: usize, what: &str| {
        i32::try_from(v)
            .map(KernelArg::I32)
            .map_err(|_| Error::Shape(format!("{what} = {v} exceeds i32::MAX")))
    };
    let args = [
        KernelArg::buf(x),
        KernelArg::buf(u),
        KernelArg::buf(vt),
        KernelArg::buf(s_dev),
        KernelArg::buf_mut(y),
        i(t, "T")?,
        i(s.n, "n")?,
        i(s.m, "m")?,
        i(r, "r")?,
        i(bi, "b_in")?,
        i(bo, "b_out")?,
        i(cluster, "cluster size")?,
        i(npass, "passes")?,
        KernelArg::I32(ablation()),
    ];
    let cfg = cluster_launch(
        u32::try_from(cluster).unwrap_or(1),
        grid,
        u32::try_from(smem).unwrap_or(u32::MAX),
    );
    // SAFETY: blr_blast_fused(const bf16* X, const bf16* U, const bf16* Vt, const bf16* S,
    // bf16* Y, int T, int n, int m, int r, int b_in, int b_out, int B, int npass, int ablate):
    // `args` holds five device pointers and nine ints in that order. The kernel reads X rows < T
    // (t*n elements, checked), U (b_out, p, r), Vt (b_in, r, q) and S (r, 16, 16) within the
    // lengths checked above, and writes Y rows < T of m columns. The grid is a whole number of
    // clusters of `cluster` CTAs (grid = cluster * tiles * npass), which the kernel's indexing
    // assumes; shared memory is within the limit set at load.
    unsafe { launch_ex(gpu, &fk.kernel, &cfg, &args) }?;
    gpu.check_after_launch(fk.kernel.name())
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gpu_or_skip, rel_err};
    use super::*;
    use crate::layers::{check_strategy, GpuLinear, LayerKernels, Strategy};
    use blr_core::rng::Rng;
    use blr_core::{FormatKind, Linear};

    fn blast(m: usize, n: usize, b_out: usize, b_in: usize, rank: usize) -> Shape {
        Shape {
            format: FormatKind::Blast,
            m,
            n,
            b_out,
            b_in,
            rank,
        }
    }

    #[test]
    fn smem_of_llama7b_qkvo_fits_sm90_and_wide_q_is_refused() {
        let qkvo = blast(4096, 4096, 16, 16, 1024);
        assert_eq!(fused_smem_bytes(256, 16, 16), 215_056);
        assert!(check_strategy(&qkvo, Strategy::Fused, 1024).is_ok());
        // llama7b down: q = 688, a 128 x 688 tile of X alone is 176 KiB.
        let down = blast(4096, 11008, 16, 16, 1488);
        let msg = check_strategy(&down, Strategy::Fused, 1024)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(
            msg.contains("shared memory") && msg.contains("q = 688"),
            "{msg}"
        );
        assert!(check_strategy(&down, Strategy::Partial, 1024).is_ok());
        // gate/up: p = 688 runs three passes; fits.
        assert!(check_strategy(&blast(11008, 4096, 16, 16, 1488), Strategy::Fused, 1024).is_ok());
        let mon = Shape {
            format: FormatKind::Monarch,
            ..qkvo
        };
        assert!(check_strategy(&mon, Strategy::Fused, 1024).is_err());
    }

    /// Every fused case against the CPU forward: block counts 2, 3, 4, 16 (and b_out != b_in),
    /// p, q, r not multiples of the 128 / 256 / 64 tiles (r < 64, ragged last rank chunk,
    /// p > 256 in two passes), T = 1, 5, 13, 77, 300 (three token tiles, the last ragged);
    /// outputs poisoned with NaN first, y exactly T x m.
    #[test]
    fn gpu_fused_matches_cpu_on_odd_shapes() {
        let Some(gpu) = gpu_or_skip("gpu_fused_matches_cpu_on_odd_shapes") else {
            return;
        };
        let kernels = LayerKernels::load(&gpu).expect("layer kernels compile and load");
        let Some(fk) = kernels.fused() else {
            eprintln!("SKIP gpu_fused_matches_cpu_on_odd_shapes: device before sm_90");
            return;
        };
        let clusters: Vec<u32> = (1..=16).map(|b| fk.max_active_clusters(b)).collect();
        eprintln!("fused: resident clusters of 1..16 CTAs: {clusters:?}");
        let shapes = [
            blast(2 * 40, 2 * 56, 2, 2, 72),
            blast(3 * 24, 3 * 88, 3, 3, 40),
            blast(4 * 264, 3 * 24, 4, 3, 136),
            blast(16 * 24, 16 * 40, 16, 16, 200),
            blast(16 * 8, 5 * 16, 16, 5, 24),
            blast(4096, 4096, 16, 16, 1024),
        ];
        let mut rng = Rng::new(0xF05E);
        let mut checked = 0;
        // Under compute-sanitizer (BLR_FUSED_TEST_SMALL=1) the llama-sized case takes minutes.
        let small_only = std::env::var_os("BLR_FUSED_TEST_SMALL").is_some();
        for (si, sh) in shapes.iter().enumerate() {
            if small_only && sh.m >= 4096 {
                continue;
            }
            let layer = Linear::random(sh, 300 + si as u64).expect("valid shape");
            let factors = layer
                .factors()
                .into_iter()
                .map(|(_, _, v)| v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
                .collect();
            let layer = Linear::from_factors(sh, factors).expect("same shape");
            let dev = GpuLinear::upload(&gpu, &layer).expect("upload");
            let mut ws = dev.workspace(&gpu, 300).expect("workspace");
            let ts: &[usize] = if sh.m >= 4096 {
                &[5, 300]
            } else {
                &[1, 5, 13, 77, 300]
            };
            for &t in ts {
                let x: Vec<f32> = rng
                    .normal_vec(t * sh.n, 1.0)
                    .into_iter()
                    .map(|v| bf16::from_f32(v).to_f32())
                    .collect();
                let want = layer.forward(&x, t).expect("cpu forward");
                let xd = gpu.upload_bf16(&x, "x").expect("upload x");
                let mut yd = gpu.alloc::<bf16>(t * sh.m, "y").expect("alloc y");
                gpu.memset_bytes(&mut yd, 0xFF).expect("poison");
                dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, Strategy::Fused)
                    .unwrap_or_else(|e| panic!("{sh:?} T={t}: {e}"));
                let got = gpu.download_f32(&yd).expect("download");
                let (err, bad) = rel_err(&got, &want);
                eprintln!("fused {sh:?} T={t}: rel err {err:.2e}");
                assert_eq!(bad, 0, "{sh:?} T={t}: {bad} outputs unwritten or NaN");
                assert!(err < 1.5e-2, "{sh:?} T={t}: rel err {err:.3e}");
                checked += 1;
            }
        }
        assert!(checked >= 25, "only {checked} cases ran");
    }
}
