//! Monarch `partial` on the GPU: blr's own stage-1 GEMM writes the permuted intermediate
//! `P (T, b, R)` directly, cuBLASLt runs stage 2, one per-token transpose puts `y` in final order.
//!
//! Notation as in ../shared/BRIEF.md section 2: `b` blocks, total rank `R`, `nb = n/b`,
//! `mb = m/b`, `rb = R/b`; `w1 (b, R, nb)`, `w2 (b, mb, R)` in their canonical layouts (the only
//! copies on the device: unfused and decode read the same `w1`).
//!
//! Stage 1 (monarch.cu, `blr_monarch_stage1` on mma.sync, `blr_monarch_stage1_wg` on wgmma for
//! sm_90a; same tiles, loads and epilogue): one tensor-core GEMM per input block `k`
//! (`grid.z`), whose epilogue stores every output at its place in `P`: flat index
//! `f = k*R + c` of `out1 (T, b*R)` goes to `P[t][f % b][f / b]`. Where `R % b == 0` and
//! `rb % 8 == 0` the weight rows are gathered in the order `c = (j % rb)*b + j / rb` while the
//! tile loads, so the tile's columns fall into runs of `rb` contiguous elements of a `P` row
//! (16-byte stores from a shared-memory copy of the tile); otherwise each element is stored on
//! its own (any shape, slower).
//! This replaces cuBLASLt stage 1 on a reordered second copy of `w1` plus a chunk-copy kernel
//! (a DRAM round trip of the 32 MB intermediate at llama7b q/k/v/o, T=1024): see
//! docs/perf/kernel-notes.md, "Monarch partial v2" and "Monarch partial v3".
//!
//! Where the own stage 1 is slower than cuBLASLt's (the mma.sync kernel beyond `n/b = 256`,
//! llama7b down: 688), stage 1 runs on cuBLASLt from the same `w1` and one per-token
//! shared-memory transpose builds `P` (still one copy of `w1`, but the intermediate makes a
//! round trip): `blr_monarch_mid_transpose_packed` (16-byte accesses, `b % 8 == 0`,
//! `R % 8 == 0`) or `blr_monarch_mid_transpose` (any shape). On sm_90a the wgmma stage 1 is
//! used at every `n/b` ([`MonarchOptions::own_stage1`]). [`MonarchOptions`] (env knobs
//! `BLR_MONARCH_MID`, `BLR_MONARCH_STAGE1`, `BLR_MONARCH_OWN_MAX_NB`) selects the other kernels
//! for side-by-side measurements.

use cudarc::driver::LaunchConfig;
use half::bf16;

use blr_core::format::Shape;

use super::{i32_of, stage_gemm, GpuLinear, LayerKernels, Workspace};
use crate::error::{Error, Result};
use crate::gemm::GemmShape;
use crate::gpu::Gpu;
use crate::memory::DeviceBuffer;
use crate::tensor_map::{encode_tiled_bf16, TensorMap, TiledBf16};

/// blr_mon1 tile constants of monarch.cu (a change there must be made here too).
const STAGE1_BM: usize = 128;
const STAGE1_BN: usize = 128;
const STAGE1_THREADS: u32 = 256;
/// 3 stages x (128 + 128) rows x 64 bf16.
pub(super) const STAGE1_SMEM: u32 = 3 * (128 + 128) * 64 * 2;
/// blr_monarch_stage1_wg: the same plus 1024 bytes to align the stages for the 128-byte swizzle.
pub(super) const STAGE1_WG_SMEM: u32 = STAGE1_SMEM + 1024;
/// blr_monarch_stage1_tma: the wgmma kernel's plus 64 bytes for the three stage mbarriers.
pub(super) const STAGE1_TMA_SMEM: u32 = STAGE1_WG_SMEM + 64;
/// blr_mon1::BK: K elements per stage (one 128-byte swizzled row).
const STAGE1_BK: u32 = 64;
/// Shared memory blr_monarch_out_transpose and blr_monarch_mid_transpose may use (allowed at
/// load, capped by the device): one token's rows x (cols + 2) (mid: rows x mid_ld(cols)) bf16.
/// Larger tiles use the per-element kernels (or, for the intermediate, the own stage 1).
pub(super) const TRANSPOSE_SMEM_MAX: u32 = 96 * 1024;
/// Largest K = n/b for which stage 1 runs on blr's own mma.sync kernel. Beyond it cuBLASLt's
/// stage 1 (wgmma, ~2x blr's mma.sync rate on these shapes) plus a per-token transpose of the
/// intermediate is faster. Measured on the H100 (docs/perf/kernel-notes.md, "Monarch partial
/// v2", T=1024): with the own stage 1, llama7b q/k/v/o 74.3 -> 70.7 us and gate/up 143.2 ->
/// 134.8 (n/b = 256), llama3.2-1b gate 51.8 -> 45.2 (n/b = 128), but down (n/b = 688) 134.3 ->
/// 174.9; down with this cuBLASLt fallback: 150.2 with the generic transpose, 131.5 with the
/// packed one ("Monarch partial v3"). The wgmma kernel has no such limit.
const OWN_STAGE1_MAX_NB: usize = 256;

/// Why Monarch `partial` cannot run this shape (a sentence for the error message), or None.
pub(super) fn partial_requirement(s: &Shape) -> Option<String> {
    let b = s.b_in;
    if b == 0 || s.b_out != b || !s.n.is_multiple_of(b) || !s.m.is_multiple_of(b) {
        return Some(format!(
            "needs b_out == b_in dividing n and m (got b_out={}, b_in={b}); use 'unfused'",
            s.b_out
        ));
    }
    let nb = s.n / b;
    if !nb.is_multiple_of(8) {
        return Some(format!(
            "needs n/b = {nb} to be a multiple of 8 (16-byte row loads); use 'unfused'"
        ));
    }
    None
}

/// Shared-memory row length (elements) of blr_monarch_mid_transpose's tile: `b + 1`, or `b + 2`
/// for odd `b`, so that the row stride in 4-byte words is odd and the gather phase's 32 lanes
/// (rows 2p, 2p + 1 of one column) fall into 32 banks. A change in monarch.cu must be made here.
pub(super) fn mid_ld(b: usize) -> usize {
    b + 1 + (b & 1)
}

/// Words of blr_monarch_mid_transpose_packed's tile (monarch.cu): b rows of R/2 + 4 words, the
/// rows of group l / 8 shifted by `(32 / (b/8)) & !3` words. Only for `b % 8 == 0`, `R % 8 == 0`.
pub(super) fn packed_words(b: usize, rank: usize) -> usize {
    let b8 = b / 8;
    let sk = 32usize.checked_div(b8).unwrap_or(0) & !3;
    b * (rank / 2 + 4) + b8 * sk
}

/// How Monarch `partial` builds its intermediate `P` where stage 1 runs on cuBLASLt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MidTranspose {
    /// `blr_monarch_out_transpose` with rows = R, cols = b (the first kernel; 8-way bank
    /// conflict in its gather phase).
    Generic,
    /// `blr_monarch_mid_transpose`: conflict-free gather, 4-byte stores (any shape).
    Pairs,
    /// `blr_monarch_mid_transpose_packed` where `b % 8 == 0` and `R % 8 == 0` (16-byte accesses
    /// on both sides), else `Pairs`.
    Packed,
}

/// Which kernel blr's own stage 1 uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage1Mma {
    /// blr's rule ([`Stage1Mma::resolve`]): `Tma` where it measured faster on the H100, else
    /// `Wgmma` (the default).
    Auto,
    /// `blr_monarch_stage1`: mma.sync (sm_80+).
    MmaSync,
    /// `blr_monarch_stage1_wg`: wgmma, on compute capability 9.0 (sm_90a) only; elsewhere
    /// `MmaSync` runs.
    Wgmma,
    /// `blr_monarch_stage1_tma`: wgmma with its tiles loaded by the copy engine (TMA), on
    /// compute capability 9.0 only. Where a tensor map cannot describe the buffers (see
    /// [`stage1_tma_views`]) `Wgmma` runs; elsewhere `MmaSync`.
    Tma,
}

/// The w1 box height (tile columns per copy) of the TMA stage 1 for this shape: 128 / boxes per
/// stage ([`stage1_tma_views`]).
fn tma_box_rows(s: &Shape) -> usize {
    if segmented(s) {
        gcd(s.rank / s.b_in, STAGE1_BN)
    } else {
        STAGE1_BN
    }
}

impl Stage1Mma {
    /// What `Auto` means for this shape: `Tma` where stage 1 stores 16-byte runs (`segmented`),
    /// the w1 tile arrives in at most two copies (box height >= 64) and K = n/b <= 256 (at most
    /// 4 k-tiles), else `Wgmma`. Measured on the
    /// H100 (docs/perf/kernel-notes.md, "Monarch stage 1 on TMA"): llama7b q/k/v/o (rb = 64,
    /// n/b = 256) T=1024 61.8 / 62.1 -> 60.5 / 60.1 us (two pairs in one call), T=128 a tie;
    /// with 32-row boxes (gate/up rb = 96: 122.4 -> 125.6 us; llama3.2-1b gate rb = 32: 44.0 ->
    /// 44.5) and long K (down, n/b = 688, 11 k-tiles: 130.8 -> 143.5) the cp.async kernel wins.
    /// Other choices are returned unchanged.
    pub fn resolve(self, s: &Shape) -> Stage1Mma {
        match self {
            Stage1Mma::Auto => {
                let nb = s.n / s.b_in.max(1);
                if segmented(s)
                    && nb <= 256
                    && tma_box_rows(s) >= 64
                    && partial_requirement(s).is_none()
                {
                    Stage1Mma::Tma
                } else {
                    Stage1Mma::Wgmma
                }
            }
            other => other,
        }
    }

    /// Whether this choice loads through tensor maps (TMA).
    pub fn uses_tma(self) -> bool {
        matches!(self, Stage1Mma::Tma)
    }
}

/// Monarch `partial` choices (development knobs for side-by-side measurements; the defaults
/// are what measured fastest on the H100, docs/perf/kernel-notes.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MonarchOptions {
    pub mid: MidTranspose,
    pub stage1: Stage1Mma,
    /// Largest n/b for which stage 1 runs on blr's own kernel (beyond: cuBLASLt + `mid`);
    /// `None`: blr's rule ([`MonarchOptions::own_stage1`]).
    pub own_max_nb: Option<usize>,
}

impl Default for MonarchOptions {
    fn default() -> Self {
        Self {
            mid: MidTranspose::Packed,
            stage1: Stage1Mma::Auto,
            own_max_nb: None,
        }
    }
}

impl MonarchOptions {
    /// Whether stage 1 runs on blr's own kernel at n/b = `nb` (else cuBLASLt + the transpose
    /// `mid`), given whether wgmma runs on this device. blr's rule: the wgmma kernel at every
    /// n/b (H100, llama7b down, n/b = 688: T=1024 131.7 us against 131.5 for cuBLASLt + packed
    /// transpose, T=128 34.8 against 37.7), the mma.sync kernel up to n/b = 256
    /// (`OWN_STAGE1_MAX_NB`).
    pub fn own_stage1(&self, nb: usize, wgmma_here: bool) -> bool {
        match self.own_max_nb {
            Some(max) => nb <= max,
            None => (self.stage1 != Stage1Mma::MmaSync && wgmma_here) || nb <= OWN_STAGE1_MAX_NB,
        }
    }

    /// The defaults, overridden by `BLR_MONARCH_MID=generic|pairs|packed`,
    /// `BLR_MONARCH_STAGE1=auto|mma|wgmma|tma` and `BLR_MONARCH_OWN_MAX_NB=<n/b>`.
    pub fn from_env() -> Result<Self> {
        let mut o = Self::default();
        let var = |name: &str| {
            std::env::var(name)
                .ok()
                .map(|v| v.trim().to_ascii_lowercase())
                .filter(|v| !v.is_empty())
        };
        if let Some(v) = var("BLR_MONARCH_MID") {
            o.mid = match v.as_str() {
                "generic" => MidTranspose::Generic,
                "pairs" => MidTranspose::Pairs,
                "packed" => MidTranspose::Packed,
                other => {
                    return Err(Error::Shape(format!(
                        "BLR_MONARCH_MID='{other}': expected generic, pairs or packed"
                    )))
                }
            };
        }
        if let Some(v) = var("BLR_MONARCH_STAGE1") {
            o.stage1 = match v.as_str() {
                "auto" => Stage1Mma::Auto,
                "mma" => Stage1Mma::MmaSync,
                "wgmma" => Stage1Mma::Wgmma,
                "tma" => Stage1Mma::Tma,
                other => {
                    return Err(Error::Shape(format!(
                        "BLR_MONARCH_STAGE1='{other}': expected auto, mma, wgmma or tma"
                    )))
                }
            };
        }
        if let Some(v) = var("BLR_MONARCH_OWN_MAX_NB") {
            o.own_max_nb = Some(v.parse().map_err(|_| {
                Error::Shape(format!(
                    "BLR_MONARCH_OWN_MAX_NB='{v}': expected a non-negative integer"
                ))
            })?);
        }
        Ok(o)
    }
}

/// The copy-engine views of blr_monarch_stage1_tma (monarch.cu, where the layout is explained)
/// for `t` tokens of `x` at `x_addr` and `w1` at `w1_addr`: the x view, the w1 view, and the
/// kernel's `rbm` and `g` (rows per w1 box). `Err`: why TMA cannot load these buffers (the
/// caller runs the cp.async wgmma kernel instead).
pub(super) fn stage1_tma_views(
    s: &Shape,
    t: usize,
    x_addr: u64,
    w1_addr: u64,
) -> std::result::Result<(TiledBf16, TiledBf16, usize, usize), String> {
    let (b, rr) = (s.b_in, s.rank);
    if let Some(why) = partial_requirement(s) {
        return Err(why);
    }
    let nb = s.n / b;
    let seg = segmented(s);
    // seg: row c = a*b + l of w1[k] is element (k, a, l); else one "l" and rbm = R rows.
    let (bl, rbm) = if seg { (b, rr / b) } else { (1, rr) };
    let g = tma_box_rows(s);
    let u = |v: usize| v as u64;
    let xv = TiledBf16 {
        addr: x_addr,
        dims: vec![u(nb), u(b), u(t)],
        strides: vec![u(nb * 2), u(s.n * 2)],
        boxes: vec![STAGE1_BK, 1, STAGE1_BM as u32],
    };
    let wv = TiledBf16 {
        addr: w1_addr,
        dims: vec![u(nb), u(bl), u(rbm), u(b)],
        strides: vec![u(nb * 2), u(bl * nb * 2), u(rr * nb * 2)],
        boxes: vec![
            STAGE1_BK,
            1,
            u32::try_from(g).map_err(|_| "box rows".to_string())?,
            1,
        ],
    };
    Ok((xv, wv, rbm, g))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Tensor maps of Monarch stage 1 on TMA, kept in the [`Workspace`] for the pointers and token
/// count they were built for (a map embeds the buffers' addresses and T).
#[derive(Debug, Clone)]
pub(super) struct TmaMaps {
    key: (u64, u64, usize, Shape),
    /// The maps and the kernel's `rbm`, `g`; or why TMA cannot load these buffers.
    maps: std::result::Result<(TensorMap, TensorMap, i32, i32), String>,
}

impl Workspace {
    /// Whether the last Monarch `partial` stage 1 asked for TMA got it: `None` when none was
    /// asked for, `Some(Err(reason))` when it ran the cp.async wgmma kernel instead.
    pub fn monarch_tma_status(&self) -> Option<std::result::Result<(), String>> {
        self.mon_tma
            .as_ref()
            .map(|m| m.maps.as_ref().map(|_| ()).map_err(Clone::clone))
    }
}

/// Whether stage 1 stores whole `rb`-element runs with 16-byte vectors (see module docs).
pub(super) fn segmented(s: &Shape) -> bool {
    let (b, r) = (s.b_in, s.rank);
    b > 0 && r.is_multiple_of(b) && (r / b).is_multiple_of(8)
}

impl GpuLinear {
    /// Monarch `partial` (module docs): own stage 1 -> `P` (ws.b), cuBLASLt stage 2 ->
    /// `out2 (T, b, mb)` (ws.c), per-token transpose -> `y`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn monarch_partial(
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
        if let Some(why) = partial_requirement(s) {
            return Err(Error::Shape(format!("Monarch partial {why}")));
        }
        let (b, rr) = (s.b_in, s.rank);
        let (nb, mb) = (s.n / b, s.m / b);
        let inter = t * b * rr;
        if w1.len() < b * rr * nb
            || w2.len() < b * mb * rr
            || ws.a.len() < inter
            || ws.b.len() < inter
            || ws.c.len() < t * s.m
        {
            return Err(Error::Shape(format!(
                "Monarch partial {}x{} b={b} R={rr} T={t}: factor or workspace buffers smaller \
                 than the layer shape",
                s.m, s.n
            )));
        }
        let (ti, bi, ri, nbi) = (
            i32_of(t, "T")?,
            i32_of(b, "b")?,
            i32_of(rr, "R")?,
            i32_of(nb, "n/b")?,
        );
        let optin = usize::try_from(gpu.info().max_smem_per_block_optin.0).unwrap_or(0);
        let smem_cap = optin.min(TRANSPOSE_SMEM_MAX as usize);
        // The intermediate as one (R x b) -> (b x R) transpose per token (BRIEF section 2:
        // P[t][l][s] = out1[t][s*b + l]).
        let opts = k.monarch;
        let generic_smem = rr * (b + 2) * 2;
        let pairs_smem = rr * mid_ld(b) * 2;
        let packed_smem = packed_words(b, rr) * 4;
        let mid = match opts.mid {
            MidTranspose::Generic if (b * rr).is_multiple_of(8) && generic_smem <= smem_cap => {
                Some((&k.out_transpose, generic_smem))
            }
            MidTranspose::Packed
                if b.is_multiple_of(8) && rr.is_multiple_of(8) && packed_smem <= smem_cap =>
            {
                Some((&k.mid_transpose_packed, packed_smem))
            }
            _ if pairs_smem <= smem_cap => Some((&k.mid_transpose, pairs_smem)),
            _ => None,
        };
        if let (false, Some((kernel, smem))) = (opts.own_stage1(nb, k.monarch_stage1_wg_ok), mid) {
            let st1 = GemmShape::linear(t, rr, nb)
                .batched(b, nb, rr * nb, rr)
                .with_ld(s.n, nb, b * rr);
            stage_gemm(gpu, &mut ws.tune, &st1, x, w1, &mut ws.a)?;
            let blocks = u32::try_from(t)
                .unwrap_or(u32::MAX)
                .min(gpu.info().sm_count.max(1) * 16);
            // SAFETY: the three kernels take (const bf16* in, bf16* out, int T, int rows = R,
            // int cols = b), read T*R*b elements of ws.a and write T*b*R of ws.b (both checked
            // above). out_transpose moves 16-byte vectors (b*R % 8 == 0, checked) through a
            // shared tile of R*(b+2) bf16; mid_transpose uses 16-byte loads only where
            // b*R % 8 == 0 and 4-byte stores only where R is even (it checks both), through
            // R*mid_ld(b) bf16; mid_transpose_packed needs b % 8 == 0 and R % 8 == 0 (checked)
            // and packed_words(b, R) words. `smem` is the chosen tile's size, within what was
            // allowed at load.
            unsafe {
                gpu.launch(kernel)
                    .arg(&ws.a)
                    .arg(&mut ws.b)
                    .arg(&ti)
                    .arg(&ri)
                    .arg(&bi)
                    .launch(LaunchConfig {
                        grid_dim: (blocks, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: u32::try_from(smem).unwrap_or(u32::MAX),
                    })?;
            }
            return self.monarch_stage2(gpu, k, t, w2, y, ws);
        }
        if !k.monarch_stage1_fits {
            return Err(Error::LaunchConfig {
                kernel: "blr_monarch_stage1".into(),
                reason: format!(
                    "needs {STAGE1_SMEM} B of shared memory per block, more than this device \
                     allows; use 'unfused'"
                ),
            });
        }
        let seg = i32::from(segmented(s));
        let grid = (
            u32::try_from(rr.div_ceil(STAGE1_BN)).unwrap_or(u32::MAX),
            u32::try_from(t.div_ceil(STAGE1_BM)).unwrap_or(u32::MAX),
            u32::try_from(b).unwrap_or(u32::MAX),
        );
        if grid.1 > 65_535 || grid.2 > 65_535 {
            return Err(Error::Shape(format!(
                "Monarch partial: T = {t} or b = {b} exceeds the grid limit (65535 tiles of \
                 {STAGE1_BM} tokens, 65535 blocks)"
            )));
        }
        let stage1 = opts.stage1.resolve(s);
        if stage1 == Stage1Mma::Tma && k.monarch_stage1_tma_ok {
            let key = (x.device_ptr(), w1.device_ptr(), t, *s);
            if ws.mon_tma.as_ref().map(|m| &m.key) != Some(&key) {
                let maps = stage1_tma_views(s, t, key.0, key.1).and_then(|(xv, wv, rbm, g)| {
                    let rbm = i32::try_from(rbm).map_err(|_| "R too large".to_string())?;
                    let g = i32::try_from(g).map_err(|_| "box rows".to_string())?;
                    Ok((encode_tiled_bf16(&xv)?, encode_tiled_bf16(&wv)?, rbm, g))
                });
                ws.mon_tma = Some(TmaMaps { key, maps });
            }
            if let Some(TmaMaps {
                maps: Ok((xmap, wmap, rbm, g)),
                ..
            }) = ws.mon_tma.as_ref()
            {
                let (xmap, wmap, rbm, g) = (*xmap, *wmap, *rbm, *g);
                // SAFETY: blr_monarch_stage1_tma(blr_tmap xmap, blr_tmap wmap, bf16* P, int T,
                // int b, int R, int nb, int seg, int rbm, int g): the maps (128 bytes each, by
                // value) describe x as (T, b, nb) and w1 as (b, rbm, bl, nb) at the addresses of
                // `x` and `w1` for this T (rebuilt above whenever a pointer, T or the shape
                // changes), so the copy engine reads only inside them and zero-fills the rest;
                // g is the w1 map's box height. P is written as by blr_monarch_stage1 (T*b*R
                // elements of ws.b, checked above). Shared memory: STAGE1_TMA_SMEM, allowed at
                // load (`monarch_stage1_tma_ok`, sm_90a).
                unsafe {
                    gpu.launch(&k.monarch_stage1_tma)
                        .arg(&xmap)
                        .arg(&wmap)
                        .arg(&mut ws.b)
                        .arg(&ti)
                        .arg(&bi)
                        .arg(&ri)
                        .arg(&nbi)
                        .arg(&seg)
                        .arg(&rbm)
                        .arg(&g)
                        .launch(LaunchConfig {
                            grid_dim: grid,
                            block_dim: (STAGE1_THREADS, 1, 1),
                            shared_mem_bytes: STAGE1_TMA_SMEM,
                        })?;
                }
                return self.monarch_stage2(gpu, k, t, w2, y, ws);
            }
        }
        let wg = stage1 != Stage1Mma::MmaSync && k.monarch_stage1_wg_ok;
        let (stage1, stage1_smem) = if wg {
            (&k.monarch_stage1_wg, STAGE1_WG_SMEM)
        } else {
            (&k.monarch_stage1, STAGE1_SMEM)
        };
        // SAFETY: blr_monarch_stage1(const bf16* x, const bf16* w1, bf16* P, int T, int b, int R,
        // int nb, int seg) reads x rows t < T (n = b*nb elements each; x holds T*n, checked in
        // `forward`) and w1 (b*R*nb, checked above) with 16-byte copies (nb % 8 == 0 by
        // `partial_requirement`), and writes P[t][l*R + s] for t < T, l < b, s < R, i.e. T*b*R
        // elements of ws.b (checked above); 16-byte stores only when `segmented` (R, rb and so
        // every store offset multiples of 8). blr_monarch_stage1_wg takes the same arguments
        // and is chosen only where it was compiled (sm_90a, `monarch_stage1_wg_ok`). Shared
        // memory: STAGE1_SMEM / STAGE1_WG_SMEM, allowed at load.
        unsafe {
            gpu.launch(stage1)
                .arg(x)
                .arg(w1)
                .arg(&mut ws.b)
                .arg(&ti)
                .arg(&bi)
                .arg(&ri)
                .arg(&nbi)
                .arg(&seg)
                .launch(LaunchConfig {
                    grid_dim: grid,
                    block_dim: (STAGE1_THREADS, 1, 1),
                    shared_mem_bytes: stage1_smem,
                })?;
        }
        self.monarch_stage2(gpu, k, t, w2, y, ws)
    }

    /// Stage 2 of `partial` from `P` (ws.b) and the output permutation into `y`.
    fn monarch_stage2(
        &self,
        gpu: &Gpu,
        k: &LayerKernels,
        t: usize,
        w2: &DeviceBuffer<bf16>,
        y: &mut DeviceBuffer<bf16>,
        ws: &mut Workspace,
    ) -> Result<()> {
        let s = &self.shape;
        let (b, rr) = (s.b_in, s.rank);
        let mb = s.m / b;
        let (ti, bi, mbi) = (i32_of(t, "T")?, i32_of(b, "b")?, i32_of(mb, "m/b")?);
        let optin = usize::try_from(gpu.info().max_smem_per_block_optin.0).unwrap_or(0);
        let smem_cap = optin.min(TRANSPOSE_SMEM_MAX as usize);
        // out2 (T, b, mb): block l reads P[:, l*R..] (ld b*R), writes columns l*mb.. (ld m).
        let st2 = GemmShape::linear(t, mb, rr)
            .batched(b, rr, mb * rr, mb)
            .with_ld(b * rr, rr, s.m);
        stage_gemm(gpu, &mut ws.tune, &st2, &ws.b, w2, &mut ws.c)?;
        let smem = b * (mb + 2) * 2;
        if s.m.is_multiple_of(8) && smem <= smem_cap {
            let smem = u32::try_from(smem).unwrap_or(u32::MAX);
            let blocks = u32::try_from(t)
                .unwrap_or(u32::MAX)
                .min(gpu.info().sm_count.max(1) * 16);
            // SAFETY: out_transpose(const bf16* out2, bf16* y, int T, int b, int mb) reads T*m
            // elements of out2 (ws.c, checked above) and writes T*m of y (checked in `forward`)
            // as 16-byte vectors (m % 8 == 0); its shared tile is b*(mb+2) bf16 = `smem` bytes,
            // within what was allowed at load (condition above).
            unsafe {
                gpu.launch(&k.out_transpose)
                    .arg(&ws.c)
                    .arg(y)
                    .arg(&ti)
                    .arg(&bi)
                    .arg(&mbi)
                    .launch(LaunchConfig {
                        grid_dim: (blocks, 1, 1),
                        block_dim: (256, 1, 1),
                        shared_mem_bytes: smem,
                    })
            }
        } else {
            // SAFETY: perm_out(const bf16* out2, bf16* y, int T, int b, int mb) touches
            // T*b*mb = T*m elements of each; both were checked to hold that many.
            unsafe {
                gpu.launch(&k.perm_out)
                    .arg(&ws.c)
                    .arg(y)
                    .arg(&ti)
                    .arg(&bi)
                    .arg(&mbi)
                    .launch(super::grid_1d(t * s.m))
            }
        }
    }
}
