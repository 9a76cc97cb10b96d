//! BLR layer forwards on the GPU: `Y (T, m) = X (T, n) W^T`, bf16 in and out, fp32 accumulation,
//! for every format of `blr_core` in several strategies (issue 5).
//!
//! Notation follows ../shared/BRIEF.md section 2: `m` outputs, `n` inputs, `T` tokens, `b_out`/
//! `b_in` blocks, `p = m / b_out`, `q = n / b_in`, rank `r` (Monarch: total rank `R`, `b` blocks).
//!
//! # Strategies
//! - [`Strategy::Unfused`]: what the PyTorch reference code does. cuBLASLt strided-batched GEMMs
//!   for the block stages, simple kernels in between (BLAST's mixing one thread per `(t, k)`,
//!   Monarch's permutation copies), every intermediate materialised in its natural layout.
//! - [`Strategy::Partial`]: BLAST: stage 1 is a cuBLASLt batched GEMM that writes `Z` already
//!   transposed, `Zt (b_in, r, T)` (operands swapped, no copy), so the tensor-core mixing kernel
//!   (blast.cu: `blr_blast_mix_tc4`, persistent and double-buffered, where its tiles fill the SMs
//!   and its 197 KB of shared memory fit; `blr_blast_mix_tc2` otherwise) can feed
//!   `ldmatrix.trans` straight from shared memory and write `W (b_out, T, r)`, exactly the A
//!   operand of stage 3 (cuBLASLt again). On sm_90a stage 1 + mixing can instead run as one
//!   kernel that keeps `Z` on chip ([`blast_s12`], `BLR_BLAST_STAGE12=fused`); it measured slower
//!   than this split path on every H100 row, so blr's rule keeps the split path. Monarch (monarch.rs): blr's own tensor-core stage 1
//!   (wgmma on sm_90a, mma.sync elsewhere) writes the permuted intermediate straight into the
//!   layout stage 2 (cuBLASLt) reads, from the one canonical copy of `w1` (mma.sync beyond
//!   n/b = 256: cuBLASLt stage 1 and a per-token transpose); the output permutation is a per-token shared-memory
//!   transpose (monarch.cu): no permutation pass in between. Low-rank `Partial` runs the two GEMMs on blr's own mma.sync kernel (gemm.cu): correct,
//!   but on H100 2-4x slower than cuBLASLt today, so [`GpuLinear::auto_strategy`] never picks it.
//! - [`Strategy::Decode`]: `T <= 16`. One persistent kernel (decode.cu, `blr_decode`, launched
//!   by [`decode`]) streams every weight once with 16-byte loads: phase 1 (stage 1 + mixing or
//!   permutation), a grid barrier, phase 2, with the phase-2 weights copied into shared memory
//!   while phase 1 runs. One launch per layer, graph-capturable, with programmatic dependent
//!   launch on sm_90+ so consecutive decode layers overlap (see [`auto_strategy`] for where it
//!   is chosen).
//!
//! Which strategy runs by default: the fastest one measured on this device for this shape and
//! T if `blr bench layer` recorded it ([`autotune::AutotuneCache`]), else [`auto_strategy`].
//! - [`Strategy::Fused`] (BLAST, sm_90): all three stages in one kernel
//!   ([`blast_fused`]): a thread-block cluster per 128 tokens, Z and W exchanged over
//!   distributed shared memory, nothing intermediate in DRAM. Correct wherever it applies, but on
//!   the H100 4-6.5x slower than `partial` (docs/perf/kernel-notes.md), so it runs only when named
//!   or when the autotune cache measured it fastest.
//!
//! # Device layouts
//! Factors keep the canonical row-major layouts of `blr_core` (BLAST `U (b_out, p, r)`,
//! `V^T (b_in, r, q)`; LR `U (m, r)`, `V (r, n)`; Monarch `w1 (b, R, n/b)`, `w2 (b, m/b, R)`):
//! each is already K-contiguous, which is what both cuBLASLt ("TN") and the tensor-core kernels
//! want. The one exception is BLAST's `S`: uploaded as `S_dev (r, 16, 16)`, `S_dev[k][i][j] =
//! s[i][j][k]` zero-padded to 16 x 16, the B operand of one m16n8k16 MMA per rank index (see
//! [`pack_blast_s`]). Hence `b_out, b_in <= 16` for BLAST on the GPU.
//!
//! Tensor-core strategies load rows with 16-byte copies, so they need `n, m, q, p, r` (Monarch:
//! `n/b`, `R`, and for `partial` `R/b`, with `R % b == 0`) to be multiples of 8;
//! [`GpuLinear::check`] says which requirement failed.

use cudarc::driver::LaunchConfig;
use half::bf16;

use blr_core::format::Shape;
use blr_core::{FormatKind, Linear};

use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::gemm::GemmShape;
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;

/// gemm.cu: `blr_gemm_nt_128x128`, `blr_gemm_nt_128x256`.
pub const GEMM_CU: KernelSource = crate::kernel_source!("gemm.cu", headers: ["common.cuh"]);
/// blast.cu: `blr_blast_mix_tc`, `blr_blast_mix_tc2`, `blr_blast_mix_naive`.
pub const BLAST_CU: KernelSource = crate::kernel_source!("blast.cu", headers: ["common.cuh"]);
/// decode.cu: `blr_decode` (launched by [`decode`]).
pub const DECODE_CU: KernelSource = crate::kernel_source!("decode.cu", headers: ["common.cuh"]);
/// monarch.cu: `blr_monarch_perm_mid`, `blr_monarch_perm_out`, `blr_monarch_stage1`,
/// `blr_monarch_stage1_wg`, `blr_monarch_out_transpose`, `blr_monarch_mid_transpose`,
/// `blr_monarch_mid_transpose_packed` (and `blr_batched_transpose`, a tiled variant the harness
/// compares; measured no faster, see docs/perf/kernel-notes.md).
pub const MONARCH_CU: KernelSource = crate::kernel_source!("monarch.cu", headers: ["common.cuh"]);

/// Largest token count the decode kernel handles: its MMAs have M = 16 token rows.
pub const DECODE_MAX_TOKENS: usize = 16;
/// BLAST block counts the tensor-core mixing supports (K = b_in and N = b_out of one MMA pair).
pub const BLAST_MAX_BLOCKS: usize = 16;

// Tile constants mirrored from the .cu files (a change there must be made here too).
const GEMM_THREADS: u32 = 256;
const GEMM_SMEM_128X128: u32 = 4 * (128 + 128) * 32 * 2;
const GEMM_SMEM_128X256: u32 = 4 * (128 + 256) * 32 * 2;
const MIX2_BT: usize = 64;
const MIX2_BKR: usize = 32;
const MIX2_THREADS: u32 = 256;
/// blr_mix2::SMEM_BYTES: max(16 planes x (32x64+8) bf16, 16 x (64x40+8) bf16) + 32 x 256 bf16.
const MIX2_SMEM: u32 = 16 * (64 * 40 + 8) * 2 + 32 * 256 * 2;

/// How a layer is run on the GPU (see module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    Unfused,
    Partial,
    Decode,
    /// BLAST only: all three stages in one kernel (blast_fused.rs).
    Fused,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Unfused,
        Strategy::Partial,
        Strategy::Decode,
        Strategy::Fused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Unfused => "unfused",
            Strategy::Partial => "partial",
            Strategy::Decode => "decode",
            Strategy::Fused => "fused",
        }
    }
}

impl std::fmt::Display for Strategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "unfused" => Ok(Strategy::Unfused),
            "partial" => Ok(Strategy::Partial),
            "decode" => Ok(Strategy::Decode),
            "fused" => Ok(Strategy::Fused),
            other => Err(Error::Shape(format!(
                "unknown strategy '{other}': expected unfused, partial, decode or fused"
            ))),
        }
    }
}

/// `S (b_out, b_in, r)` (canonical) -> `S_dev (r, 16, 16)` with `S_dev[k][i][j] = s[i][j][k]`
/// and zeros for `i >= b_out` or `j >= b_in`: per rank index `k`, a 16x16 tile with `j`
/// contiguous, the B operand of the mixing MMA (K = j, N = i).
pub fn pack_blast_s(s: &[f32], b_out: usize, b_in: usize, r: usize) -> Result<Vec<f32>> {
    if b_out > BLAST_MAX_BLOCKS || b_in > BLAST_MAX_BLOCKS {
        return Err(Error::Shape(format!(
            "BLAST on the GPU supports at most {BLAST_MAX_BLOCKS} blocks per side, got b_out={b_out} \
             b_in={b_in}; compress with fewer blocks"
        )));
    }
    if s.len() != b_out * b_in * r {
        return Err(Error::Shape(format!(
            "BLAST s has {} elements, expected b_out*b_in*r = {b_out}*{b_in}*{r}",
            s.len()
        )));
    }
    let mut out = vec![0.0f32; r * 256];
    for i in 0..b_out {
        for j in 0..b_in {
            let src = &s[(i * b_in + j) * r..(i * b_in + j + 1) * r];
            for (k, &v) in src.iter().enumerate() {
                out[k * 256 + i * 16 + j] = v;
            }
        }
    }
    Ok(out)
}

/// Tokens per chunk of the first two passes of BLAST's partial path: the workspace's override
/// if set, else blr's rule. (Monarch's partial path has no middle pass to chunk.)
fn prefill_chunk(ws: &Workspace, t: usize) -> usize {
    match ws.prefill_chunk {
        Some(c) if c > 0 => c.min(t),
        _ => t,
    }
}

/// Why `strategy` cannot run a layer of this shape at `tokens` tokens, or Ok.
pub fn check_strategy(s: &Shape, strategy: Strategy, tokens: usize) -> Result<()> {
    let unsupported = |why: String| {
        Err(Error::Shape(format!(
            "{} layer {}x{} (b_out={}, b_in={}, rank={}): strategy '{strategy}' {why}",
            s.format, s.m, s.n, s.b_out, s.b_in, s.rank
        )))
    };
    let need8 = |dims: &[(&str, usize)]| -> Result<()> {
        for &(name, v) in dims {
            if v % 8 != 0 {
                return unsupported(format!(
                    "needs {name} = {v} to be a multiple of 8 (16-byte row loads); use 'unfused'"
                ));
            }
        }
        Ok(())
    };
    if strategy == Strategy::Decode && tokens > DECODE_MAX_TOKENS {
        return unsupported(format!(
            "handles at most {DECODE_MAX_TOKENS} tokens, got {tokens}; use 'partial' or 'unfused'"
        ));
    }
    match (s.format, strategy) {
        (_, Strategy::Unfused) => Ok(()),
        (_, Strategy::Fused) if s.format != FormatKind::Blast => {
            unsupported("is BLAST only; use 'partial' or 'unfused'".into())
        }
        (FormatKind::Dense, _) => unsupported(
            "is not defined for dense layers (they run as one cuBLASLt GEMM: use 'unfused')".into(),
        ),
        (FormatKind::LowRank, _) => need8(&[("n", s.n), ("m", s.m), ("rank", s.rank)]),
        (FormatKind::Monarch, Strategy::Partial) => match monarch::partial_requirement(s) {
            Some(why) => unsupported(why),
            None => Ok(()),
        },
        (FormatKind::Monarch, _) => need8(&[("n", s.n), ("n/b", s.n / s.b_in), ("R", s.rank)]),
        (FormatKind::Blast, _) => {
            if s.b_out > BLAST_MAX_BLOCKS || s.b_in > BLAST_MAX_BLOCKS {
                return unsupported(format!(
                    "supports at most {BLAST_MAX_BLOCKS} blocks per side"
                ));
            }
            need8(&[
                ("n", s.n),
                ("m", s.m),
                ("q = n/b_in", s.n / s.b_in),
                ("p = m/b_out", s.m / s.b_out),
                ("r", s.rank),
            ])?;
            match blast_fused::fused_shape_problem(s) {
                Some(why) if strategy == Strategy::Fused => unsupported(why),
                _ => Ok(()),
            }
        }
    }
}

/// The strategy used when none is named and the autotune cache has no entry: BLAST's partial
/// path where it applies at every token count; Monarch's partial path for T > 16 where its
/// stage 1 stores whole rank runs (`R/b` a multiple of 8; measured in docs/perf/layers-h100.md,
/// "Monarch partial v2"); otherwise unfused (cuBLASLt).
///
/// Why not decode for small T: on the H100 (docs/perf/layers-h100.md, all 15 reference configs)
/// the decode kernel won only 2 of 60 (config, T <= 16) BLAST rows, by <= 6%, and never for
/// low-rank or Monarch: its ~12 us fixed cost (cold DRAM/TLB round trips in both phases plus a
/// grid barrier) loses to two or three cuBLAS GEMV launches. It stays selectable, and
/// [`autotune::AutotuneCache`] picks it wherever a device measures it faster.
pub fn auto_strategy(s: &Shape, tokens: usize) -> Strategy {
    let partial_ok = check_strategy(s, Strategy::Partial, tokens).is_ok();
    let wants_partial = match s.format {
        FormatKind::Blast => true,
        FormatKind::Monarch => tokens > DECODE_MAX_TOKENS && monarch::segmented(s),
        _ => false,
    };
    if partial_ok && wants_partial {
        Strategy::Partial
    } else {
        Strategy::Unfused
    }
}

/// The layer kernels, compiled (or loaded from the disk cache) once per device.
#[derive(Debug, Clone)]
pub struct LayerKernels {
    gemm_128x128: Kernel,
    gemm_128x256: Kernel,
    mix_tc2: Kernel,
    mix_tc4: Kernel,
    /// Whether this device's shared memory holds blr_blast_mix_tc4's two stages.
    mix_tc4_fits: bool,
    mix_naive: Kernel,
    decode: decode::DecodeKernels,
    perm_mid: Kernel,
    perm_out: Kernel,
    monarch_stage1: Kernel,
    /// Whether this device's shared memory holds blr_monarch_stage1's pipeline.
    monarch_stage1_fits: bool,
    out_transpose: Kernel,
    /// Monarch partial's intermediate transposes where stage 1 runs on cuBLASLt (monarch.rs).
    mid_transpose: Kernel,
    mid_transpose_packed: Kernel,
    /// blr_monarch_stage1 on wgmma, and whether this device runs it (sm_90a).
    monarch_stage1_wg: Kernel,
    monarch_stage1_wg_ok: bool,
    /// The same with TMA loads (sm_90a), and whether this device runs it.
    monarch_stage1_tma: Kernel,
    monarch_stage1_tma_ok: bool,
    /// Monarch partial's kernel choices ([`monarch::MonarchOptions::from_env`] at load).
    monarch: monarch::MonarchOptions,
    /// [`Strategy::Fused`]'s kernel; `None` before sm_90 (no thread-block clusters).
    fused: Option<blast_fused::FusedKernel>,
    /// BLAST partial's fused stage 1 + mixing (blast_s12.rs); `None` where it cannot run.
    s12: Option<blast_s12::Stage12Kernel>,
    /// Which stage 1 + mixing BLAST partial runs ([`blast_s12::Stage12::from_env`] at load).
    stage12: blast_s12::Stage12,
}

impl LayerKernels {
    /// The fused BLAST kernel, where this device has one (sm_90+).
    pub fn fused(&self) -> Option<&blast_fused::FusedKernel> {
        self.fused.as_ref()
    }

    /// How [`Strategy::Decode`] launches its kernel (default: [`decode::DecodeOptions::from_env`]).
    pub fn decode_options(&self) -> decode::DecodeOptions {
        self.decode.opts
    }

    pub fn set_decode_options(&mut self, opts: decode::DecodeOptions) {
        self.decode.opts = opts;
    }

    /// BLAST partial's stage 1 + mixing choice, and whether the fused kernel runs here.
    pub fn stage12(&self) -> (blast_s12::Stage12, bool) {
        (self.stage12, self.s12.is_some())
    }

    pub fn set_stage12(&mut self, choice: blast_s12::Stage12) {
        self.stage12 = choice;
    }

    /// Monarch `partial`'s kernel choices (default: [`monarch::MonarchOptions::from_env`]).
    pub fn monarch_options(&self) -> monarch::MonarchOptions {
        self.monarch
    }

    pub fn set_monarch_options(&mut self, opts: monarch::MonarchOptions) {
        self.monarch = opts;
    }

    /// Whether [`monarch::Stage1Mma::Wgmma`] runs on this device (else mma.sync runs).
    pub fn monarch_wgmma_available(&self) -> bool {
        self.monarch_stage1_wg_ok
    }

    pub fn load(gpu: &Gpu) -> Result<Self> {
        let opts = CompileOptions::default();
        let gemm = gpu.load_module(&GEMM_CU, &opts)?;
        let blast = gpu.load_module(&BLAST_CU, &opts)?;
        let monarch = gpu.load_module(&MONARCH_CU, &opts)?;
        let mut k = Self {
            gemm_128x128: gemm.function("blr_gemm_nt_128x128")?,
            gemm_128x256: gemm.function("blr_gemm_nt_128x256")?,
            mix_tc2: blast.function("blr_blast_mix_tc2")?,
            mix_tc4: blast.function("blr_blast_mix_tc4")?,
            mix_tc4_fits: false,
            mix_naive: blast.function("blr_blast_mix_naive")?,
            decode: decode::DecodeKernels::load(gpu, &opts)?,
            perm_mid: monarch.function("blr_monarch_perm_mid")?,
            perm_out: monarch.function("blr_monarch_perm_out")?,
            monarch_stage1: monarch.function("blr_monarch_stage1")?,
            monarch_stage1_fits: false,
            out_transpose: monarch.function("blr_monarch_out_transpose")?,
            mid_transpose: monarch.function("blr_monarch_mid_transpose")?,
            mid_transpose_packed: monarch.function("blr_monarch_mid_transpose_packed")?,
            monarch_stage1_wg: monarch.function("blr_monarch_stage1_wg")?,
            monarch_stage1_wg_ok: false,
            monarch_stage1_tma: monarch.function("blr_monarch_stage1_tma")?,
            monarch_stage1_tma_ok: false,
            monarch: monarch::MonarchOptions::from_env()?,
            fused: blast_fused::FusedKernel::load(gpu, &opts)?,
            s12: blast_s12::Stage12Kernel::load(gpu, &opts)?,
            stage12: blast_s12::Stage12::from_env()?,
        };
        k.gemm_128x128.set_max_dynamic_smem(GEMM_SMEM_128X128)?;
        k.gemm_128x256.set_max_dynamic_smem(GEMM_SMEM_128X256)?;
        k.mix_tc2.set_max_dynamic_smem(MIX2_SMEM)?;
        let optin = u32::try_from(gpu.info().max_smem_per_block_optin.0).unwrap_or(u32::MAX);
        if optin >= 2 * MIX2_SMEM {
            k.mix_tc4.set_max_dynamic_smem(2 * MIX2_SMEM)?;
            k.mix_tc4_fits = true;
        }
        if optin >= monarch::STAGE1_SMEM {
            k.monarch_stage1
                .set_max_dynamic_smem(monarch::STAGE1_SMEM)?;
            k.monarch_stage1_fits = true;
        }
        k.out_transpose
            .set_max_dynamic_smem(optin.min(monarch::TRANSPOSE_SMEM_MAX))?;
        k.mid_transpose
            .set_max_dynamic_smem(optin.min(monarch::TRANSPOSE_SMEM_MAX))?;
        k.mid_transpose_packed
            .set_max_dynamic_smem(optin.min(monarch::TRANSPOSE_SMEM_MAX))?;
        // The wgmma body is compiled only for sm_90a (Hopper: compute capability 9.0).
        if gpu.info().compute_capability.0 == 9 && optin >= monarch::STAGE1_WG_SMEM {
            k.monarch_stage1_wg
                .set_max_dynamic_smem(monarch::STAGE1_WG_SMEM)?;
            k.monarch_stage1_wg_ok = true;
        }
        if gpu.info().compute_capability.0 == 9 && optin >= monarch::STAGE1_TMA_SMEM {
            k.monarch_stage1_tma
                .set_max_dynamic_smem(monarch::STAGE1_TMA_SMEM)?;
            k.monarch_stage1_tma_ok = true;
        }
        Ok(k)
    }
}

/// Factors on the device, bf16, in the layouts of the module docs.
#[derive(Debug)]
enum Factors {
    Dense {
        w: DeviceBuffer<bf16>,
    },
    LowRank {
        u: DeviceBuffer<bf16>,
        v: DeviceBuffer<bf16>,
    },
    Monarch {
        w1: DeviceBuffer<bf16>,
        w2: DeviceBuffer<bf16>,
    },
    Blast {
        u: DeviceBuffer<bf16>,
        vt: DeviceBuffer<bf16>,
        s_dev: DeviceBuffer<bf16>,
    },
}

/// A linear layer uploaded to the GPU.
#[derive(Debug)]
pub struct GpuLinear {
    shape: Shape,
    factors: Factors,
}

/// Scratch buffers for one layer up to `max_tokens` tokens. Allocate before capturing a graph.
#[derive(Debug)]
pub struct Workspace {
    max_tokens: usize,
    a: DeviceBuffer<bf16>,
    b: DeviceBuffer<bf16>,
    c: DeviceBuffer<bf16>,
    /// decode: the phase-1 -> phase-2 intermediate, (blocks, 16, rank).
    dec: DeviceBuffer<bf16>,
    /// decode: grid-barrier words (count, generation), zeroed once.
    barrier: DeviceBuffer<u32>,
    /// When set, every cuBLASLt stage GEMM is autotuned ([`crate::gemm::Blas::tune`]: each
    /// algorithm the heuristic offers is timed and the fastest pinned for that shape) instead of
    /// run once, and `(heuristic ms, best ms)` is recorded here.
    tune: Option<Vec<(f64, f64)>>,
    /// Tokens per chunk of the partial paths' first two passes, instead of blr's rule.
    prefill_chunk: Option<usize>,
    /// Monarch stage 1 on TMA: the tensor maps of the last launch (monarch.rs).
    mon_tma: Option<monarch::TmaMaps>,
}

impl Workspace {
    /// Turns GEMM autotuning of the following forwards on (see the `tune` field) or off.
    pub fn set_tuning(&mut self, on: bool) {
        self.tune = if on { Some(Vec::new()) } else { None };
    }

    /// Overrides the token chunk of BLAST partial's stage 1 + mixing; `None` restores blr's
    /// rule. (Monarch partial has no middle pass: it ignores this.)
    pub fn set_prefill_chunk(&mut self, tokens: Option<usize>) {
        self.prefill_chunk = tokens;
    }

    /// `(heuristic ms, best ms)` of every stage GEMM tuned since tuning was turned on.
    pub fn tune_reports(&self) -> &[(f64, f64)] {
        self.tune.as_deref().unwrap_or(&[])
    }
}

/// One cuBLASLt stage GEMM, or its autotuning when `tune` is set (see [`Workspace`]).
fn stage_gemm<'x, 'w, 'y>(
    gpu: &Gpu,
    tune: &mut Option<Vec<(f64, f64)>>,
    shape: &GemmShape,
    x: impl Into<crate::gemm::MatRef<'x, bf16>>,
    w: impl Into<crate::gemm::MatRef<'w, bf16>>,
    y: impl Into<crate::gemm::MatMut<'y, bf16>>,
) -> Result<()> {
    match tune {
        Some(reports) => {
            let r = gpu.blas()?.tune(gpu, shape, x, w, y, 10)?;
            reports.push((r.heuristic_ms, r.best_ms));
            Ok(())
        }
        None => gpu.gemm(shape, x, w, y),
    }
}

fn round8(x: usize) -> usize {
    x.div_ceil(8) * 8
}

fn i32_of(v: usize, what: &str) -> Result<i32> {
    i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds i32::MAX")))
}

impl GpuLinear {
    /// Converts the f32 factors of `layer` to bf16 and uploads them.
    pub fn upload(gpu: &Gpu, layer: &Linear) -> Result<Self> {
        let shape = layer.shape();
        let factors = match layer {
            Linear::Dense(d) => Factors::Dense {
                w: gpu.upload_bf16(&d.weight, "dense weight")?,
            },
            Linear::LowRank(l) => Factors::LowRank {
                u: gpu.upload_bf16(&l.u, "low-rank U")?,
                v: gpu.upload_bf16(&l.v, "low-rank V")?,
            },
            Linear::Monarch(mo) => Factors::Monarch {
                w1: gpu.upload_bf16(&mo.w1, "Monarch w1")?,
                w2: gpu.upload_bf16(&mo.w2, "Monarch w2")?,
            },
            Linear::Blast(b) => {
                let packed = pack_blast_s(&b.s, b.b_out, b.b_in, b.rank)?;
                Factors::Blast {
                    u: gpu.upload_bf16(&b.u, "BLAST U")?,
                    vt: gpu.upload_bf16(&b.vt, "BLAST V^T")?,
                    s_dev: gpu.upload_bf16(&packed, "BLAST S")?,
                }
            }
        };
        Ok(Self { shape, factors })
    }

    pub fn shape(&self) -> &Shape {
        &self.shape
    }

    /// Why `strategy` cannot run this layer at `tokens` tokens, or Ok.
    pub fn check(&self, strategy: Strategy, tokens: usize) -> Result<()> {
        check_strategy(&self.shape, strategy, tokens)
    }

    /// See [`auto_strategy`].
    pub fn auto_strategy(&self, tokens: usize) -> Strategy {
        auto_strategy(&self.shape, tokens)
    }

    /// Scratch for up to `max_tokens` tokens and every strategy.
    pub fn workspace(&self, gpu: &Gpu, max_tokens: usize) -> Result<Workspace> {
        let s = &self.shape;
        let t = max_tokens.max(1);
        let (a, b, c, dec) = match s.format {
            FormatKind::Dense => (0, 0, 0, 0),
            FormatKind::LowRank => (t * s.rank, 0, 0, 16 * s.rank),
            FormatKind::Monarch => {
                let inter = t * s.b_in * s.rank;
                (inter, inter, t * s.m, s.b_in * 16 * s.rank)
            }
            FormatKind::Blast => {
                let z = (s.b_in * s.rank * round8(t)).max(s.b_in * t * s.rank);
                (z, s.b_out * t * s.rank, 0, s.b_out * 16 * s.rank)
            }
        };
        let alloc = |n: usize, what: &str| gpu.alloc::<bf16>(n.max(8), what);
        Ok(Workspace {
            max_tokens: t,
            // Zeroed once: BLAST `partial` keeps Z^T rows padded to round8(T) columns that no
            // GEMM writes, and blr_blast_mix_tc2 loads them in 16-byte vectors along with the
            // real columns (their products land only in outputs it never stores). Zero padding
            // keeps those loads finite and off initcheck's report (docs/reliability.md).
            a: gpu.alloc_zeros::<bf16>(a.max(8), "layer workspace (stage-1 output)")?,
            b: alloc(b, "layer workspace (mixed intermediate)")?,
            c: alloc(c, "layer workspace (stage-2 output)")?,
            dec: alloc(dec, "decode intermediate")?,
            barrier: gpu.alloc_zeros::<u32>(2, "decode grid barrier")?,
            tune: None,
            prefill_chunk: None,
            mon_tma: None,
        })
    }

    /// `y[..tokens*m] = x[..tokens*n] W^T` with the given strategy.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        gpu: &Gpu,
        k: &LayerKernels,
        x: &DeviceBuffer<bf16>,
        tokens: usize,
        y: &mut DeviceBuffer<bf16>,
        ws: &mut Workspace,
        strategy: Strategy,
    ) -> Result<()> {
        let s = self.shape;
        if tokens == 0 {
            return Ok(());
        }
        if x.len() < tokens * s.n || y.len() < tokens * s.m {
            return Err(Error::Shape(format!(
                "layer {}x{}: x has {} elements and y {}, need {} (T={tokens} x n) and {} (T x m)",
                s.m,
                s.n,
                x.len(),
                y.len(),
                tokens * s.n,
                tokens * s.m
            )));
        }
        if tokens > ws.max_tokens {
            return Err(Error::Shape(format!(
                "workspace was made for {} tokens, forward asked for {tokens}; make a larger one",
                ws.max_tokens
            )));
        }
        self.check(strategy, tokens)?;
        let t = tokens;
        match (&self.factors, strategy) {
            (Factors::Dense { w }, _) => {
                stage_gemm(gpu, &mut ws.tune, &GemmShape::linear(t, s.m, s.n), x, w, y)
            }
            (Factors::LowRank { u, v }, Strategy::Unfused) => {
                let r = s.rank;
                stage_gemm(
                    gpu,
                    &mut ws.tune,
                    &GemmShape::linear(t, r, s.n),
                    x,
                    v,
                    &mut ws.a,
                )?;
                stage_gemm(
                    gpu,
                    &mut ws.tune,
                    &GemmShape::linear(t, s.m, r),
                    &ws.a,
                    u,
                    y,
                )
            }
            (Factors::LowRank { u, v }, Strategy::Partial) => {
                let r = s.rank;
                gemm_nt(gpu, k, NtGemm::plain(t, r, s.n), x, v, &mut ws.a)?;
                gemm_nt(gpu, k, NtGemm::plain(t, s.m, r), &ws.a, u, y)
            }
            (Factors::LowRank { u, v }, Strategy::Decode) => {
                let d = decode::DecodeDims {
                    mode: 1,
                    nb1: 1,
                    r1: s.rank,
                    q1: s.n,
                    nb2: 1,
                    p2: s.m,
                    r2: s.rank,
                };
                decode::decode(gpu, k, &s, t, d, x, v, v, u, y, ws)
            }
            (Factors::Monarch { w1, w2 }, Strategy::Decode) => {
                let b = s.b_in;
                let d = decode::DecodeDims {
                    mode: 2,
                    nb1: b,
                    r1: s.rank,
                    q1: s.n / b,
                    nb2: b,
                    p2: s.m / b,
                    r2: s.rank,
                };
                decode::decode(gpu, k, &s, t, d, x, w1, w1, w2, y, ws)
            }
            (Factors::Monarch { w1, w2 }, Strategy::Partial) => {
                self.monarch_partial(gpu, k, t, x, w1, w2, y, ws)
            }
            (Factors::Monarch { w1, w2 }, _) => self.monarch_unfused(gpu, k, t, x, w1, w2, y, ws),
            (Factors::Blast { u, vt, s_dev }, Strategy::Decode) => {
                let d = decode::DecodeDims {
                    mode: 0,
                    nb1: s.b_in,
                    r1: s.rank,
                    q1: s.n / s.b_in,
                    nb2: s.b_out,
                    p2: s.m / s.b_out,
                    r2: s.rank,
                };
                decode::decode(gpu, k, &s, t, d, x, vt, s_dev, u, y, ws)
            }
            (Factors::Blast { u, vt, s_dev }, Strategy::Fused) => {
                blast_fused::blast_fused(gpu, k.fused(), &s, t, x, u, vt, s_dev, y)
            }
            (Factors::LowRank { .. }, Strategy::Fused) => Err(Error::Shape(
                "strategy 'fused' is BLAST only; use 'partial' or 'unfused'".into(),
            )),
            (Factors::Blast { u, vt, s_dev }, strat) => {
                self.blast_prefill(gpu, k, t, x, u, vt, s_dev, y, ws, strat)
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn monarch_unfused(
        &self,
        gpu: &Gpu,
        k: &LayerKernels,
        t: usize,
        x: &DeviceBuffer<bf16>,
        w1: &DeviceBuffer<bf16>,
        w2: &DeviceBuffer<bf16>,
        y: &mut DeviceBuffer<bf16>,
        ws: &mut Workspace,
    ) -> Result<()> {
        let s = &self.shape;
        let (b, rr) = (s.b_in, s.rank);
        let (nb, mb) = (s.n / b, s.m / b);
        // out1 (T, b, R): block k reads x[:, k*nb..], writes columns k*R..
        let st1 = GemmShape::linear(t, rr, nb)
            .batched(b, nb, rr * nb, rr)
            .with_ld(s.n, nb, b * rr);
        stage_gemm(gpu, &mut ws.tune, &st1, x, w1, &mut ws.a)?;
        let total = t * b * rr;
        let (ti, bi, ri) = (i32_of(t, "T")?, i32_of(b, "b")?, i32_of(rr, "R")?);
        // SAFETY: perm_mid(const bf16* flat, bf16* P, int T, int b, int R) reads and writes
        // T*b*R elements; the workspace buffers hold at least that many for T <= max_tokens.
        unsafe {
            gpu.launch(&k.perm_mid)
                .arg(&ws.a)
                .arg(&mut ws.b)
                .arg(&ti)
                .arg(&bi)
                .arg(&ri)
                .launch(grid_1d(total))?;
        }
        let st2 = GemmShape::linear(t, mb, rr)
            .batched(b, rr, mb * rr, mb)
            .with_ld(b * rr, rr, s.m);
        stage_gemm(gpu, &mut ws.tune, &st2, &ws.b, w2, &mut ws.c)?;
        let mbi = i32_of(mb, "m/b")?;
        // SAFETY: perm_out(const bf16* out2, bf16* y, int T, int b, int mb) touches T*b*mb = T*m
        // elements of each; y was checked to hold T*m.
        unsafe {
            gpu.launch(&k.perm_out)
                .arg(&ws.c)
                .arg(y)
                .arg(&ti)
                .arg(&bi)
                .arg(&mbi)
                .launch(grid_1d(t * s.m))
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn blast_prefill(
        &self,
        gpu: &Gpu,
        k: &LayerKernels,
        t: usize,
        x: &DeviceBuffer<bf16>,
        u: &DeviceBuffer<bf16>,
        vt: &DeviceBuffer<bf16>,
        s_dev: &DeviceBuffer<bf16>,
        y: &mut DeviceBuffer<bf16>,
        ws: &mut Workspace,
        strategy: Strategy,
    ) -> Result<()> {
        let s = &self.shape;
        let (bo, bi, r) = (s.b_out, s.b_in, s.rank);
        let (p, q) = (s.m / bo, s.n / bi);
        let (ti, ri, bii, boi) = (
            i32_of(t, "T")?,
            i32_of(r, "r")?,
            i32_of(bi, "b_in")?,
            i32_of(bo, "b_out")?,
        );
        if strategy == Strategy::Unfused {
            // Z (b_in, T, r): Z_j = X_j V_j, one batched GEMM.
            let st1 = GemmShape::linear(t, r, q)
                .batched(bi, q, r * q, t * r)
                .with_ld(s.n, q, r);
            stage_gemm(gpu, &mut ws.tune, &st1, x, vt, &mut ws.a)?;
            // SAFETY: mix_naive(const bf16* Z, const bf16* S, bf16* W, int T, int r, int b_in,
            // int b_out) reads Z (b_in,T,r) and S (r,16,16), writes W (b_out,T,r); the workspace
            // holds both for T <= max_tokens and S_dev has r*256 elements.
            unsafe {
                gpu.launch(&k.mix_naive)
                    .arg(&ws.a)
                    .arg(s_dev)
                    .arg(&mut ws.b)
                    .arg(&ti)
                    .arg(&ri)
                    .arg(&bii)
                    .arg(&boi)
                    .launch(grid_1d(t * r))?;
            }
            // Y[:, i*p..] = W_i U_i^T, written in final order (ld_y = m, batch stride p).
            let st3 = GemmShape::linear(t, p, r)
                .batched(bo, t * r, p * r, p)
                .with_ld(r, r, s.m);
            return stage_gemm(gpu, &mut ws.tune, &st3, &ws.b, u, y);
        }
        if ws.prefill_chunk.is_none() {
            if let Some(s12) = k.s12.as_ref().filter(|_| k.stage12.fused_here(s, t, true)) {
                s12.launch(gpu, s, t, x, vt, s_dev, &mut ws.b)?;
                let st3 = GemmShape::linear(t, p, r)
                    .batched(bo, t * r, p * r, p)
                    .with_ld(r, r, s.m);
                return stage_gemm(gpu, &mut ws.tune, &st3, &ws.b, u, y);
            }
        }
        // Partial: stage 1 and the mixing per token chunk (Zt of one chunk, reusing the front
        // of ws.a, is still in L2 when the mixing reads it; W for all T), then one stage 3.
        // Chunks need blr_blast_mix_tc4, which takes W's plane stride.
        let sms = usize::try_from(gpu.info().sm_count.max(1)).unwrap_or(1);
        let chunk = if k.mix_tc4_fits {
            prefill_chunk(ws, t)
        } else {
            t
        };
        let mut c0 = 0;
        while c0 < t {
            let tc = chunk.min(t - c0);
            // Zt (b_in, r, ldz): Zt_j = V_j^T X_j^T, the GEMM with its operands swapped.
            let ldz = round8(tc);
            let st1 = GemmShape::linear(r, tc, q)
                .batched(bi, r * q, q, r * ldz)
                .with_ld(q, s.n, ldz);
            stage_gemm(gpu, &mut ws.tune, &st1, vt, x.at(c0 * s.n), &mut ws.a)?;
            let (tci, ldzi) = (i32_of(tc, "T")?, i32_of(ldz, "T rounded up to 8")?);
            let tiles = tc.div_ceil(MIX2_BT) * r.div_ceil(MIX2_BKR);
            if k.mix_tc4_fits && (tc < t || tiles >= sms) {
                let w_chunk = ws.b.device_ptr_at(c0 * r)?;
                let ldwi = i64::try_from(t * r)
                    .map_err(|_| Error::Shape(format!("T*r = {} exceeds i64", t * r)))?;
                let cfg = LaunchConfig {
                    grid_dim: (u32::try_from(tiles.min(sms)).unwrap_or(1), 1, 1),
                    block_dim: (MIX2_THREADS, 1, 1),
                    shared_mem_bytes: 2 * MIX2_SMEM,
                };
                // SAFETY: mix_tc4(const bf16* Zt, const bf16* S, bf16* W, int T, int ldz, int r,
                // int b_in, int b_out, long long ldwi) reads Zt (b_in, r, ldz) from ws.a (which
                // holds b_in*r*round8(max_tokens)), S (r,16,16), and writes W[i][t][k] at
                // i*ldwi + t*r + k for i < b_out, t < tc, k < r from element c0*r of ws.b, i.e.
                // rows c0..c0+tc of W (b_out, T, r), inside ws.b's b_out*max_tokens*r elements.
                unsafe {
                    gpu.launch(&k.mix_tc4)
                        .arg(&ws.a)
                        .arg(s_dev)
                        .arg(&w_chunk)
                        .arg(&tci)
                        .arg(&ldzi)
                        .arg(&ri)
                        .arg(&bii)
                        .arg(&boi)
                        .arg(&ldwi)
                        .launch(cfg)?;
                }
            } else {
                let cfg = LaunchConfig {
                    grid_dim: (
                        u32::try_from(tc.div_ceil(MIX2_BT)).unwrap_or(u32::MAX),
                        u32::try_from(r.div_ceil(MIX2_BKR)).unwrap_or(u32::MAX),
                        1,
                    ),
                    block_dim: (MIX2_THREADS, 1, 1),
                    shared_mem_bytes: MIX2_SMEM,
                };
                // SAFETY: mix_tc2(const bf16* Zt, const bf16* S, bf16* W, int T, int ldz, int r,
                // int b_in, int b_out) reads Zt (b_in, r, ldz), S (r,16,16), writes W (b_out, T, r);
                // here tc == T (chunks only run with tc4); sizes as allocated by `workspace`.
                unsafe {
                    gpu.launch(&k.mix_tc2)
                        .arg(&ws.a)
                        .arg(s_dev)
                        .arg(&mut ws.b)
                        .arg(&tci)
                        .arg(&ldzi)
                        .arg(&ri)
                        .arg(&bii)
                        .arg(&boi)
                        .launch(cfg)?;
                }
            }
            c0 += tc;
        }
        let st3 = GemmShape::linear(t, p, r)
            .batched(bo, t * r, p * r, p)
            .with_ld(r, r, s.m);
        stage_gemm(gpu, &mut ws.tune, &st3, &ws.b, u, y)
    }
}

fn grid_1d(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (Gpu::grid_1d(n, 256), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// One row-major NT GEMM for gemm.cu: `C[z] (M x N) = A[z] (M x K) B[z]^T`, element strides.
#[derive(Debug, Clone, Copy)]
struct NtGemm {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    stride_a: usize,
    stride_b: usize,
    stride_c: usize,
    batch: usize,
}

impl NtGemm {
    fn plain(m: usize, n: usize, k: usize) -> Self {
        Self {
            m,
            n,
            k,
            lda: k,
            ldb: k,
            ldc: n,
            stride_a: 0,
            stride_b: 0,
            stride_c: 0,
            batch: 1,
        }
    }
}

fn gemm_nt(
    gpu: &Gpu,
    kernels: &LayerKernels,
    g: NtGemm,
    a: &DeviceBuffer<bf16>,
    b: &DeviceBuffer<bf16>,
    c: &mut DeviceBuffer<bf16>,
) -> Result<()> {
    let extent = |batch: usize, stride: usize, rows: usize, ld: usize, width: usize| {
        (batch - 1) * stride + (rows - 1) * ld + width
    };
    if g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0 {
        return Ok(());
    }
    for (name, v) in [("K", g.k), ("lda", g.lda), ("ldb", g.ldb), ("ldc", g.ldc)] {
        if v % 8 != 0 {
            return Err(Error::Shape(format!(
                "tensor-core GEMM needs {name} = {v} to be a multiple of 8"
            )));
        }
    }
    let checks = [
        ("A", a.len(), extent(g.batch, g.stride_a, g.m, g.lda, g.k)),
        ("B", b.len(), extent(g.batch, g.stride_b, g.n, g.ldb, g.k)),
        ("C", c.len(), extent(g.batch, g.stride_c, g.m, g.ldc, g.n)),
    ];
    for (name, len, need) in checks {
        if need > len {
            return Err(Error::Shape(format!(
                "tensor-core GEMM {g:?}: operand {name} needs {need} elements, buffer has {len}"
            )));
        }
    }
    let (kernel, bn) = if g.n >= 256 {
        (&kernels.gemm_128x256, 256)
    } else {
        (&kernels.gemm_128x128, 128)
    };
    let smem = if bn == 256 {
        GEMM_SMEM_128X256
    } else {
        GEMM_SMEM_128X128
    };
    let cfg = LaunchConfig {
        grid_dim: (
            u32::try_from(g.n.div_ceil(bn)).unwrap_or(u32::MAX),
            u32::try_from(g.m.div_ceil(128)).unwrap_or(u32::MAX),
            u32::try_from(g.batch).unwrap_or(u32::MAX),
        ),
        block_dim: (GEMM_THREADS, 1, 1),
        shared_mem_bytes: smem,
    };
    let (mi, ni, ki) = (i32_of(g.m, "M")?, i32_of(g.n, "N")?, i32_of(g.k, "K")?);
    let l = |v: usize| v as i64;
    let (lda, ldb, ldc) = (l(g.lda), l(g.ldb), l(g.ldc));
    let (sa, sb, sc) = (l(g.stride_a), l(g.stride_b), l(g.stride_c));
    // SAFETY: blr_gemm_nt_*(const bf16* A, const bf16* B, bf16* C, int M, int N, int K,
    // long long lda, ldb, ldc, strideA, strideB, strideC); every operand extent was checked
    // against its buffer above and the kernel guards rows/cols past M/N and K past K.
    unsafe {
        gpu.launch(kernel)
            .arg(a)
            .arg(b)
            .arg(c)
            .arg(&mi)
            .arg(&ni)
            .arg(&ki)
            .arg(&lda)
            .arg(&ldb)
            .arg(&ldc)
            .arg(&sa)
            .arg(&sb)
            .arg(&sc)
            .launch(cfg)
    }
}

pub mod autotune;
pub mod blast_fused;
pub mod blast_s12;
pub mod decode;
pub mod monarch;
pub mod timing;

#[cfg(test)]
mod tests;
