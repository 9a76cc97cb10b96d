//! The `decode` strategy's launch (`T <= 16`): one persistent kernel per BLR layer
//! (decode.cu, `blr_decode`), two weight-streaming phases around a grid barrier.
//!
//! Two ways to launch it ([`DecodeLaunch`]):
//! - [`DecodeLaunch::Pdl`] (default on sm_90+): an ordinary launch through `cuLaunchKernelEx`
//!   ([`crate::launch_ex`])
//!   with programmatic stream serialization allowed. The kernel issues its weight copies
//!   (phase-2 rows into shared memory, phase-1 rows into L2) before `griddepcontrol.wait`, so
//!   when the previous kernel in the stream is a PDL-aware kernel (another decode layer: it
//!   calls `griddepcontrol.launch_dependents` once past its grid barrier), this layer's blocks
//!   start and stream weights while that one drains. The grid is one block per SM with the
//!   occupancy query saying one fits: a plain launch can be delayed by other work, never
//!   deadlocked (see decode.cu).
//! - [`DecodeLaunch::Cooperative`]: the driver's cooperative launch (what the strategy used
//!   before; default below sm_90, where PDL does not exist).
//!
//! [`DecodeOptions::half_sm`] picks `blr_decode_half` (64 registers per thread, shared memory
//! under half the SM) instead of `blr_decode`, so that the next layer's block fits on the SM
//! beside this one's and its weight copies start before this layer ends.
//!
//! `BLR_DECODE_LAUNCH=cooperative|pdl`, `BLR_DECODE_PREFETCH=0|1` and `BLR_DECODE_HALF_SM=0|1`
//! override the defaults when the kernels are loaded (development knobs for side-by-side
//! measurements; see docs/perf/kernel-notes.md, "decode: PDL").

use half::bf16;

use blr_core::format::Shape;

use super::{i32_of, LayerKernels, Workspace, DECODE_CU};
use crate::compile::CompileOptions;
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::launch_ex::{launch_ex, KernelArg, LaunchAttr, LaunchEx};
use crate::memory::DeviceBuffer;

/// Threads per block of `blr_decode` (decode.cu `blr_dec::THREADS`).
pub(super) const DECODE_THREADS: u32 = 512;
/// decode.cu `blr_dec::S_TASKS`: phase-1 tasks per block whose BLAST S rows are staged.
const S_TASKS: usize = 4;
/// decode.cu `blr_dec::PREFETCH_W1`.
const FLAG_PREFETCH_W1: i32 = 1;

/// How the decode kernel is launched (module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecodeLaunch {
    Cooperative,
    Pdl,
}

impl std::str::FromStr for DecodeLaunch {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "cooperative" | "coop" => Ok(Self::Cooperative),
            "pdl" => Ok(Self::Pdl),
            other => Err(Error::Shape(format!(
                "unknown decode launch '{other}': expected 'cooperative' or 'pdl'"
            ))),
        }
    }
}

/// Launch options of the decode kernel, fixed per [`LayerKernels`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DecodeOptions {
    pub launch: DecodeLaunch,
    /// L2-prefetch every phase-1 weight row of the block before `griddepcontrol.wait`.
    pub prefetch_w1: bool,
    /// Run `blr_decode_half` (two blocks fit on one SM) instead of `blr_decode`.
    pub half_sm: bool,
}

impl DecodeOptions {
    /// blr's choice for a device of compute capability `major`: PDL where it exists (sm_90+),
    /// no phase-1 prefetch, the full-SM kernel (docs/perf/kernel-notes.md, "decode: PDL").
    pub fn for_device(major: u32) -> Self {
        Self {
            launch: if major >= 9 {
                DecodeLaunch::Pdl
            } else {
                DecodeLaunch::Cooperative
            },
            prefetch_w1: false,
            half_sm: false,
        }
    }

    /// [`DecodeOptions::for_device`] with the `BLR_DECODE_LAUNCH` / `BLR_DECODE_PREFETCH`
    /// overrides applied. PDL asked for on a device without it is an error.
    pub fn from_env(major: u32) -> Result<Self> {
        let mut o = Self::for_device(major);
        if let Some(v) = std::env::var_os("BLR_DECODE_LAUNCH") {
            o.launch = v.to_string_lossy().parse()?;
        }
        let flag = |name: &str, default: bool| -> Result<bool> {
            match std::env::var_os(name) {
                None => Ok(default),
                Some(v) => match v.to_string_lossy().trim() {
                    "0" | "off" | "false" => Ok(false),
                    "1" | "on" | "true" => Ok(true),
                    other => Err(Error::Shape(format!("{name}='{other}': expected 0 or 1"))),
                },
            }
        };
        o.prefetch_w1 = flag("BLR_DECODE_PREFETCH", o.prefetch_w1)?;
        o.half_sm = flag("BLR_DECODE_HALF_SM", o.half_sm)?;
        o.check(major)?;
        Ok(o)
    }

    /// Whether a device of compute capability `major` can launch this way.
    pub fn check(&self, major: u32) -> Result<()> {
        if self.launch == DecodeLaunch::Pdl && major < 9 {
            return Err(Error::Shape(format!(
                "decode launch 'pdl' needs programmatic dependent launch (compute capability \
                 9.0 or newer), this device is {major}.x; use 'cooperative'"
            )));
        }
        Ok(())
    }
}

/// The two decode kernels and how to launch them; part of [`LayerKernels`].
#[derive(Debug, Clone)]
pub struct DecodeKernels {
    full: Kernel,
    half: Kernel,
    pub(super) opts: DecodeOptions,
    /// Largest dynamic shared memory of one block: the opt-in limit for `blr_decode`, half the
    /// SM (less the 1 KB the driver reserves per block) for `blr_decode_half`.
    smem_full: usize,
    smem_half: usize,
}

impl DecodeKernels {
    pub(super) fn load(gpu: &Gpu, opts: &CompileOptions) -> Result<Self> {
        let module = gpu.load_module(&DECODE_CU, opts)?;
        let info = gpu.info();
        let optin = usize::try_from(info.max_smem_per_block_optin.0).unwrap_or(usize::MAX);
        let per_sm = usize::try_from(info.max_smem_per_sm.0).unwrap_or(usize::MAX);
        let k = Self {
            full: module.function("blr_decode")?,
            half: module.function("blr_decode_half")?,
            opts: DecodeOptions::from_env(info.compute_capability.0)?,
            smem_full: optin,
            smem_half: optin.min((per_sm / 2).saturating_sub(1024)),
        };
        for (kernel, bytes) in [(&k.full, k.smem_full), (&k.half, k.smem_half)] {
            kernel.set_max_dynamic_smem(u32::try_from(bytes).unwrap_or(u32::MAX))?;
        }
        Ok(k)
    }
}

/// Stage dimensions of the decode kernel (see decode.cu).
#[derive(Debug, Clone, Copy)]
pub(super) struct DecodeDims {
    /// 0 BLAST, 1 low-rank, 2 Monarch.
    pub mode: i32,
    pub nb1: usize,
    pub r1: usize,
    pub q1: usize,
    pub nb2: usize,
    pub p2: usize,
    pub r2: usize,
}

/// Shared memory of one block: partial sums / reductions, staged S, and `smem_tasks` phase-2
/// row groups (16 rows of r2 + 8 bf16).
fn smem_layout(d: &DecodeDims) -> (usize, usize) {
    let zs_bytes = (d.nb1 * 128).max(1024) * 4 + S_TASKS * 4096;
    let task_bytes = 16 * (d.r2 + 8) * 2;
    (zs_bytes, task_bytes)
}

/// Queues one decode forward `y[..t*m] = layer(x[..t*n])` on the Gpu's stream.
#[allow(clippy::too_many_arguments)]
pub(super) fn decode(
    gpu: &Gpu,
    k: &LayerKernels,
    s: &Shape,
    t: usize,
    d: DecodeDims,
    x: &DeviceBuffer<bf16>,
    w1: &DeviceBuffer<bf16>,
    s_dev: &DeviceBuffer<bf16>,
    w2: &DeviceBuffer<bf16>,
    y: &mut DeviceBuffer<bf16>,
    ws: &mut Workspace,
) -> Result<()> {
    if w1.len() < d.nb1 * d.r1 * d.q1
        || w2.len() < d.nb2 * d.p2 * d.r2
        || ws.dec.len() < d.nb2 * 16 * d.r2
        || ws.barrier.len() < 2
    {
        return Err(Error::Shape(format!(
            "decode {d:?}: factor or workspace buffers smaller than the layer shape"
        )));
    }
    if d.mode == 0 && s_dev.len() < d.r1 * 256 {
        return Err(Error::Shape(format!(
            "decode: S has {} elements, need r*256 = {}",
            s_dev.len(),
            d.r1 * 256
        )));
    }
    let info = gpu.info();
    let dk = &k.decode;
    let opts = dk.opts;
    opts.check(info.compute_capability.0)?;
    let (kernel, name, optin) = if opts.half_sm {
        (&dk.half, "blr_decode_half", dk.smem_half)
    } else {
        (&dk.full, "blr_decode", dk.smem_full)
    };
    let grid = info.sm_count.max(1);
    let tasks2 = d.nb2 * d.p2.div_ceil(16);
    let (zs_bytes, task_bytes) = smem_layout(&d);
    if zs_bytes > optin {
        return Err(Error::Shape(format!(
            "decode: {} input blocks need {zs_bytes} B of shared memory, the device allows {optin}",
            d.nb1
        )));
    }
    let smem_tasks = tasks2
        .div_ceil(grid as usize)
        .min((optin - zs_bytes) / task_bytes);
    let smem = zs_bytes + smem_tasks * task_bytes;
    let per_sm = kernel
        .cuda_function()
        .occupancy_max_active_blocks_per_multiprocessor(DECODE_THREADS, smem, None)
        .map_err(Error::driver(format!("occupancy of {name}")))?;
    if per_sm < 1 {
        return Err(Error::LaunchConfig {
            kernel: name.into(),
            reason: format!("{smem} B of shared memory per block leave no block resident"),
        });
    }
    let flags = if opts.prefetch_w1 {
        FLAG_PREFETCH_W1
    } else {
        0
    };
    let i = |v: usize, what: &str| i32_of(v, what).map(KernelArg::I32);
    let args = [
        KernelArg::buf(x),
        KernelArg::buf(w1),
        KernelArg::buf(s_dev),
        KernelArg::buf(w2),
        KernelArg::buf_mut(y),
        KernelArg::buf_mut(&mut ws.dec),
        KernelArg::buf_mut(&mut ws.barrier),
        i(t, "T")?,
        i(s.n, "n")?,
        i(s.m, "m")?,
        KernelArg::I32(d.mode),
        i(d.nb1, "blocks")?,
        i(d.r1, "rank")?,
        i(d.q1, "block width")?,
        i(d.nb2, "blocks")?,
        i(d.p2, "block height")?,
        i(d.r2, "rank")?,
        i(smem_tasks, "smem tasks")?,
        KernelArg::I32(flags),
    ];
    let cfg = LaunchEx {
        grid,
        block: DECODE_THREADS,
        smem: u32::try_from(smem).unwrap_or(u32::MAX),
        attr: match opts.launch {
            DecodeLaunch::Pdl => LaunchAttr::Programmatic,
            DecodeLaunch::Cooperative => LaunchAttr::Cooperative,
        },
    };
    // SAFETY: blr_decode / blr_decode_half(const bf16* x, const bf16* w1, const bf16* s,
    // const bf16* w2, bf16* y, bf16* wbuf, unsigned* bar, int T, int n, int m, int mode,
    // int nb1, int r1, int q1, int nb2, int p2, int r2, int smem_tasks, int flags): `args` holds
    // 7 device pointers and 12 ints in that order. Buffer sizes were checked above and in
    // `forward`; the grid (one block per SM, occupancy >= 1) is co-resident, so the grid barrier
    // cannot deadlock (cooperative: the driver verifies it; PDL: see decode.cu, which touches
    // x / wbuf / y / the barrier words only after griddepcontrol.wait).
    unsafe { launch_ex(gpu, kernel, &cfg, &args) }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{gpu_or_skip, rel_err};
    use super::*;
    use crate::layers::{check_strategy, GpuLinear, Strategy};
    use blr_core::rng::Rng;
    use blr_core::{FormatKind, Linear};

    fn shape(format: FormatKind, m: usize, n: usize, b: (usize, usize), rank: usize) -> Shape {
        Shape {
            format,
            m,
            n,
            b_out: b.0,
            b_in: b.1,
            rank,
        }
    }

    fn bf16_vec(v: Vec<f32>) -> Vec<f32> {
        v.into_iter().map(|x| bf16::from_f32(x).to_f32()).collect()
    }

    fn rounded_layer(sh: &Shape, seed: u64) -> Linear {
        let layer = Linear::random(sh, seed).expect("valid shape");
        let factors = layer
            .factors()
            .into_iter()
            .map(|(_, _, v)| bf16_vec(v.to_vec()))
            .collect();
        Linear::from_factors(sh, factors).expect("same shape")
    }

    /// Every launch mode x kernel; the phase-1 prefetch with the half kernel only.
    const MODES: [DecodeOptions; 6] = [
        DecodeOptions {
            launch: DecodeLaunch::Cooperative,
            prefetch_w1: false,
            half_sm: false,
        },
        DecodeOptions {
            launch: DecodeLaunch::Cooperative,
            prefetch_w1: true,
            half_sm: false,
        },
        DecodeOptions {
            launch: DecodeLaunch::Pdl,
            prefetch_w1: false,
            half_sm: false,
        },
        DecodeOptions {
            launch: DecodeLaunch::Cooperative,
            prefetch_w1: false,
            half_sm: true,
        },
        DecodeOptions {
            launch: DecodeLaunch::Pdl,
            prefetch_w1: false,
            half_sm: true,
        },
        DecodeOptions {
            launch: DecodeLaunch::Pdl,
            prefetch_w1: true,
            half_sm: true,
        },
    ];

    #[test]
    fn launch_names_parse_and_pdl_needs_sm90() {
        assert_eq!(
            "cooperative".parse::<DecodeLaunch>().ok(),
            Some(DecodeLaunch::Cooperative)
        );
        assert_eq!(
            " PDL ".parse::<DecodeLaunch>().ok(),
            Some(DecodeLaunch::Pdl)
        );
        assert!("graph".parse::<DecodeLaunch>().is_err());
        assert_eq!(DecodeOptions::for_device(9).launch, DecodeLaunch::Pdl);
        assert_eq!(
            DecodeOptions::for_device(8).launch,
            DecodeLaunch::Cooperative
        );
        let msg = DecodeOptions::for_device(9)
            .check(8)
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(msg.contains("9.0"), "{msg}");
    }

    #[test]
    fn shared_memory_layout_matches_the_kernel() {
        // decode.cu: max(nb1*128, 1024)*4 + S_TASKS*4096, rows of r2 + 8 bf16.
        let d = DecodeDims {
            mode: 0,
            nb1: 16,
            r1: 1024,
            q1: 256,
            nb2: 16,
            p2: 256,
            r2: 1024,
        };
        assert_eq!(smem_layout(&d), (8192 + 16384, 16 * 1032 * 2));
        let lr = DecodeDims { nb1: 1, ..d };
        assert_eq!(smem_layout(&lr).0, 4096 + 16384);
    }

    /// Runs `cases` (shape, tokens) under every launch mode, outputs poisoned first, against
    /// the CPU forward of the same bf16 weights.
    fn parity(gpu: &Gpu, cases: &[Shape], tokens: &[usize]) -> usize {
        let mut kernels = LayerKernels::load(gpu).expect("layer kernels compile and load");
        let major = gpu.info().compute_capability.0;
        let mut rng = Rng::new(0xDEC0DE);
        let mut checked = 0;
        for (si, sh) in cases.iter().enumerate() {
            let layer = rounded_layer(sh, 700 + si as u64);
            let dev = GpuLinear::upload(gpu, &layer).expect("upload");
            let mut ws = dev.workspace(gpu, 16).expect("workspace");
            for &t in tokens {
                check_strategy(sh, Strategy::Decode, t).expect("decode applies");
                let x = bf16_vec(rng.normal_vec(t * sh.n, 1.0));
                let want = layer.forward(&x, t).expect("cpu forward");
                let xd = gpu.upload_bf16(&x, "x").expect("upload x");
                let mut yd = gpu.alloc::<bf16>(t * sh.m, "y").expect("alloc y");
                for opts in MODES {
                    if opts.check(major).is_err() {
                        continue;
                    }
                    kernels.decode.opts = opts;
                    gpu.memset_bytes(&mut yd, 0xFF).expect("poison");
                    dev.forward(gpu, &kernels, &xd, t, &mut yd, &mut ws, Strategy::Decode)
                        .unwrap_or_else(|e| panic!("{sh:?} {opts:?} T={t}: {e}"));
                    let got = gpu.download_f32(&yd).expect("download");
                    let (err, bad) = rel_err(&got, &want);
                    assert_eq!(bad, 0, "{sh:?} {opts:?} T={t}: {bad} unwritten or NaN");
                    assert!(err < 1.5e-2, "{sh:?} {opts:?} T={t}: rel err {err:.3e}");
                    checked += 1;
                }
            }
        }
        checked
    }

    #[test]
    fn gpu_decode_every_launch_mode_on_odd_shapes() {
        let Some(gpu) = gpu_or_skip("gpu_decode_every_launch_mode_on_odd_shapes") else {
            return;
        };
        // p, q, r not multiples of any tile (only of 8 where 16-byte rows need it); b_in != b_out.
        let cases = [
            shape(FormatKind::LowRank, 136, 104, (1, 1), 24),
            shape(FormatKind::LowRank, 72, 200, (1, 1), 40),
            shape(FormatKind::Monarch, 120, 96, (4, 4), 40),
            shape(FormatKind::Monarch, 136, 160, (4, 4), 96),
            shape(FormatKind::Monarch, 120, 72, (3, 3), 24),
            shape(FormatKind::Blast, 120, 112, (5, 7), 40),
            shape(FormatKind::Blast, 96, 96, (12, 12), 8),
            shape(FormatKind::Blast, 384, 128, (16, 16), 56),
        ];
        let n = parity(&gpu, &cases, &[1, 5, 13, 16]);
        eprintln!("gpu decode parity (small): {n} (shape, launch mode, T) cases");
        assert!(n >= cases.len() * 4);
    }

    #[test]
    fn gpu_decode_many_tasks_per_block_and_streamed_rows() {
        let Some(gpu) = gpu_or_skip("gpu_decode_many_tasks_per_block_and_streamed_rows") else {
            return;
        };
        // r = 1096: 137 phase-1 tasks (more than one per block on <= 136 SMs); m = 16392: 1025
        // phase-2 tasks, more than shared memory holds (the L2-prefetched, streamed path), the
        // last one ragged. BLAST with b = 16 and 8 phase-1 tasks per block of S staging overflow.
        let cases = [
            shape(FormatKind::LowRank, 16392, 72, (1, 1), 1096),
            shape(FormatKind::Blast, 2176, 1152, (16, 16), 1096),
        ];
        let n = parity(&gpu, &cases, &[1, 16]);
        eprintln!("gpu decode parity (large): {n} (shape, launch mode, T) cases");
        assert!(n >= cases.len() * 2);
    }

    /// Layers back to back, each reading the previous one's output (what PDL must order), the
    /// layers sharing nothing but the stream; then the same chain as a CUDA graph replayed
    /// three times (the barrier words reset themselves).
    #[test]
    fn gpu_decode_chain_eager_and_graph() {
        let Some(gpu) = gpu_or_skip("gpu_decode_chain_eager_and_graph") else {
            return;
        };
        let major = gpu.info().compute_capability.0;
        let mut kernels = LayerKernels::load(&gpu).expect("layer kernels compile and load");
        let a = shape(FormatKind::Blast, 160, 200, (4, 5), 40);
        let b = shape(FormatKind::Monarch, 200, 160, (4, 4), 48);
        let c = shape(FormatKind::LowRank, 200, 200, (1, 1), 32);
        let chain = [a, b, c, c, a, b];
        let layers: Vec<Linear> = chain
            .iter()
            .enumerate()
            .map(|(i, sh)| rounded_layer(sh, 900 + i as u64))
            .collect();
        let devs: Vec<GpuLinear> = layers
            .iter()
            .map(|l| GpuLinear::upload(&gpu, l).expect("upload"))
            .collect();
        let mut wss: Vec<Workspace> = devs
            .iter()
            .map(|d| d.workspace(&gpu, 16).expect("workspace"))
            .collect();
        let mut rng = Rng::new(77);
        for t in [1usize, 13] {
            let x = bf16_vec(rng.normal_vec(t * a.n, 1.0));
            // CPU: every intermediate rounded to bf16, as the GPU stores it.
            let mut want = x.clone();
            for l in &layers {
                want = bf16_vec(l.forward(&want, t).expect("cpu forward"));
            }
            let mut bufs: Vec<DeviceBuffer<bf16>> = vec![gpu.upload_bf16(&x, "x").expect("x")];
            for sh in &chain {
                bufs.push(gpu.alloc::<bf16>(t * sh.m, "h").expect("h"));
            }
            for opts in MODES {
                if opts.check(major).is_err() {
                    continue;
                }
                kernels.decode.opts = opts;
                let mut run = |bufs: &mut Vec<DeviceBuffer<bf16>>| -> Result<()> {
                    for (i, dev) in devs.iter().enumerate() {
                        let (lo, hi) = bufs.split_at_mut(i + 1);
                        dev.forward(
                            &gpu,
                            &kernels,
                            &lo[i],
                            t,
                            &mut hi[0],
                            &mut wss[i],
                            Strategy::Decode,
                        )?;
                    }
                    Ok(())
                };
                let poison = |bufs: &mut Vec<DeviceBuffer<bf16>>| {
                    for buf in bufs.iter_mut().skip(1) {
                        gpu.memset_bytes(buf, 0xFF).expect("poison");
                    }
                };
                let check = |bufs: &Vec<DeviceBuffer<bf16>>, what: &str| {
                    let got = gpu.download_f32(&bufs[chain.len()]).expect("download");
                    let (err, bad) = rel_err(&got, &want);
                    assert_eq!(bad, 0, "{opts:?} T={t} {what}: {bad} unwritten or NaN");
                    assert!(err < 2e-2, "{opts:?} T={t} {what}: rel err {err:.3e}");
                };
                poison(&mut bufs);
                run(&mut bufs).unwrap_or_else(|e| panic!("{opts:?} T={t}: {e}"));
                check(&bufs, "eager");
                let graph = gpu
                    .capture(|| run(&mut bufs))
                    .unwrap_or_else(|e| panic!("{opts:?} T={t} capture: {e}"));
                for rep in 0..3 {
                    poison(&mut bufs);
                    graph.replay().expect("replay");
                    check(&bufs, &format!("graph replay {rep}"));
                }
            }
        }
    }
}
