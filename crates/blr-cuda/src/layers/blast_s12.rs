//! BLAST `partial`, stage 1 + mixing in one kernel (blast_s12.cu, `blr_blast_s12_wg2`, sm_90a):
//! a CTA computes `Z_j = X_j V_j` for a tile of 64 tokens x 64 ranks and every input block `j`
//! on wgmma, keeps all `b_in` planes of `Z` in shared memory and mixes them into `W` there, so
//! `Z` never reaches device memory. Stage 3 stays the cuBLASLt batched GEMM that reads `W`.
//!
//! Notation of ../shared/BRIEF.md section 2 (`q = n / b_in`, rank `r`). [`Stage12`] chooses
//! between this kernel and the split path (cuBLASLt stage 1 writing `Zt` + `blr_blast_mix_tc4`
//! / `tc2`); `BLR_BLAST_STAGE12=fused|split|auto` overrides blr's rule for side-by-side runs.

use half::bf16;

use blr_core::format::Shape;

use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;
use cudarc::driver::LaunchConfig;

/// blast_s12.cu: `blr_blast_s12_wg2` (one load pipeline per warpgroup, wgmmas left in flight
/// across stages). A first version with one block-wide pipeline (11% slower) and a persistent
/// one (the next tile's first stages loading while a tile is mixed, W stored from registers:
/// 1.9x slower) were measured and taken out (commits e8f5d91, b2e692e; kernel-notes.md).
pub const BLAST_S12_CU: KernelSource =
    crate::kernel_source!("blast_s12.cu", headers: ["common.cuh"]);

// Mirrored from blast_s12.cu (namespace blr_s12); a change there must be made here too.
const TT: usize = 64;
const KC: usize = 64;
const THREADS: u32 = 256;
/// 3 slots of 32 KB + 16 Zt planes of (64 x 64 + 8) bf16, plus 1 KB to align the slots.
pub const S12_SMEM: u32 = 3 * 32768 + 16 * (64 * 64 + 8) * 2 + 1024;

/// Which kernels run BLAST `partial`'s stage 1 + mixing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage12 {
    /// blr's rule ([`Stage12::fused_here`]).
    Auto,
    /// `blr_blast_s12_wg2` wherever it applies (else the split path).
    Fused,
    /// cuBLASLt stage 1 + the mixing kernel.
    Split,
}

impl Stage12 {
    /// `BLR_BLAST_STAGE12=auto|fused|split`; unset or empty: `Auto`.
    pub fn from_env() -> Result<Self> {
        match std::env::var("BLR_BLAST_STAGE12") {
            Ok(v) if !v.trim().is_empty() => v.parse(),
            _ => Ok(Self::Auto),
        }
    }

    /// Whether the fused kernel runs for a layer of shape `s` at `tokens` tokens, given whether
    /// this device has it (`available`: sm_90a with its shared memory). Shapes it cannot take
    /// ([`shape_problem`]) always run split.
    pub fn fused_here(self, s: &Shape, tokens: usize, available: bool) -> bool {
        if !available || shape_problem(s).is_some() {
            return false;
        }
        match self {
            Stage12::Fused => true,
            Stage12::Split => false,
            Stage12::Auto => auto_rule(s, tokens),
        }
    }
}

impl std::str::FromStr for Stage12 {
    type Err = Error;
    fn from_str(v: &str) -> Result<Self> {
        match v.trim().to_ascii_lowercase().as_str() {
            "auto" => Ok(Stage12::Auto),
            "fused" => Ok(Stage12::Fused),
            "split" => Ok(Stage12::Split),
            other => Err(Error::Shape(format!(
                "BLR_BLAST_STAGE12 = '{other}': expected 'auto', 'fused' or 'split'"
            ))),
        }
    }
}

/// blr's rule for [`Stage12::Auto`]: always split. On the H100 (docs/perf/layers-h100.md,
/// "BLAST stage 1 + mixing in one kernel") the fused kernel lost on every measured row: llama7b
/// q/k/v/o T=1024 73.1 us (v2) / 81.3 (v1) against 70.0 split, T=128 33.9 / 38.8 against 23.6;
/// llama7b down T=1024 211 / 241 against 133. It is latency-bound (one CTA per SM, ~35% of
/// L2 throughput), not traffic-bound; see kernel-notes.md for what would change that.
fn auto_rule(_s: &Shape, _tokens: usize) -> bool {
    false
}

/// Why the fused kernel cannot run a BLAST layer of shape `s`, or None. (The caller has checked
/// the format; the kernel needs what `partial` needs: `b_in, b_out <= 16`, `n`, `q`, `r`
/// multiples of 8 for its 16-byte rows.)
pub fn shape_problem(s: &Shape) -> Option<String> {
    if s.b_in == 0 || s.b_out == 0 || s.b_in > 16 || s.b_out > 16 {
        return Some(format!(
            "needs 1..=16 blocks per side, got b_in = {}, b_out = {}",
            s.b_in, s.b_out
        ));
    }
    let q = s.n / s.b_in;
    for (name, v) in [("n", s.n), ("q = n/b_in", q), ("r", s.rank)] {
        if v == 0 || v % 8 != 0 {
            return Some(format!("needs {name} = {v} to be a nonzero multiple of 8"));
        }
    }
    None
}

/// `BLR_S12_ABLATE=<bits>`: parts of the fused kernel to skip, for measuring where its time
/// goes (the output is then wrong; see the kernel's header). Unset: 0.
fn ablate_from_env() -> Result<i32> {
    match std::env::var("BLR_S12_ABLATE") {
        Ok(v) if !v.trim().is_empty() => v.trim().parse::<i32>().map_err(|_| {
            Error::Shape(format!(
                "BLR_S12_ABLATE = '{v}': expected an integer (bit mask)"
            ))
        }),
        _ => Ok(0),
    }
}

/// The fused kernel, loaded where it runs: compute capability 9.0 (its wgmma body is compiled
/// only for sm_90a) with [`S12_SMEM`] of opt-in shared memory.
#[derive(Debug, Clone)]
pub struct Stage12Kernel {
    kernel: Kernel,
}

impl Stage12Kernel {
    /// Compiles and configures the kernel; `None` where it cannot run (not sm_90, too little
    /// shared memory): `partial` then runs split.
    pub fn load(gpu: &Gpu, opts: &CompileOptions) -> Result<Option<Self>> {
        let optin = u32::try_from(gpu.info().max_smem_per_block_optin.0).unwrap_or(0);
        if gpu.info().compute_capability.0 != 9 || optin < S12_SMEM {
            return Ok(None);
        }
        let module = gpu.load_module(&BLAST_S12_CU, opts)?;
        let kernel = module.function("blr_blast_s12_wg2")?;
        kernel.set_max_dynamic_smem(S12_SMEM)?;
        Ok(Some(Self { kernel }))
    }

    /// `W (b_out, t, r) = mix(X V)` for the first `t` tokens of `x (t, n)`. `w` must hold
    /// `b_out * t * r` elements.
    #[allow(clippy::too_many_arguments)]
    pub fn launch(
        &self,
        gpu: &Gpu,
        s: &Shape,
        t: usize,
        x: &DeviceBuffer<bf16>,
        vt: &DeviceBuffer<bf16>,
        s_dev: &DeviceBuffer<bf16>,
        w: &mut DeviceBuffer<bf16>,
    ) -> Result<()> {
        if let Some(why) = shape_problem(s) {
            return Err(Error::Shape(format!(
                "BLAST stage 1 + mixing kernel: {why}; use BLR_BLAST_STAGE12=split"
            )));
        }
        let (q, r) = (s.n / s.b_in, s.rank);
        let need = [
            ("x", x.len(), t * s.n),
            ("V^T", vt.len(), s.b_in * r * q),
            ("S", s_dev.len(), r * 256),
            ("W", w.len(), s.b_out * t * r),
        ];
        for (name, len, want) in need {
            if len < want {
                return Err(Error::Shape(format!(
                    "BLAST stage 1 + mixing kernel: {name} has {len} elements, needs {want}"
                )));
            }
        }
        let i = |v: usize, what: &str| {
            i32::try_from(v).map_err(|_| Error::Shape(format!("{what} = {v} exceeds i32::MAX")))
        };
        let (ti, ni, qi, ri) = (i(t, "T")?, i(s.n, "n")?, i(q, "q")?, i(r, "r")?);
        let (bii, boi) = (i(s.b_in, "b_in")?, i(s.b_out, "b_out")?);
        i(t * s.n, "T*n")?;
        let ablate = ablate_from_env()?;
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(t.div_ceil(TT)).unwrap_or(u32::MAX),
                u32::try_from(r.div_ceil(KC)).unwrap_or(u32::MAX),
                1,
            ),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: S12_SMEM,
        };
        // SAFETY: blr_blast_s12_wg2(const bf16* X, const bf16* Vt, const bf16* S, bf16* W, int T,
        // int n, int q, int r, int b_in, int b_out, int ablate) reads X (T, n), Vt (b_in, r, q), S (r, 16,
        // 16) and writes W[i][t][k] for i < b_out, t < T, k < r; every extent was checked above,
        // and the kernel guards every row past T / r and chunk past q.
        unsafe {
            gpu.launch(&self.kernel)
                .arg(x)
                .arg(vt)
                .arg(s_dev)
                .arg(w)
                .arg(&ti)
                .arg(&ni)
                .arg(&qi)
                .arg(&ri)
                .arg(&bii)
                .arg(&boi)
                .arg(&ablate)
                .launch(cfg)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blr_core::format::FormatKind;

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
    fn knob_parses_and_rejects_nonsense() {
        assert_eq!("fused".parse::<Stage12>().ok(), Some(Stage12::Fused));
        assert_eq!(" Split ".parse::<Stage12>().ok(), Some(Stage12::Split));
        assert_eq!("auto".parse::<Stage12>().ok(), Some(Stage12::Auto));
        let err = "both"
            .parse::<Stage12>()
            .map(|_| ())
            .unwrap_err()
            .to_string();
        assert!(err.contains("BLR_BLAST_STAGE12"), "{err}");
    }

    #[test]
    fn shapes_it_cannot_take_run_split() {
        let ok = blast(4096, 4096, 16, 16, 1024);
        assert!(shape_problem(&ok).is_none());
        assert!(Stage12::Fused.fused_here(&ok, 1024, true));
        assert!(!Stage12::Fused.fused_here(&ok, 1024, false));
        assert!(!Stage12::Split.fused_here(&ok, 1024, true));
        let odd_q = blast(64, 104, 4, 4, 16); // q = 26
        assert!(shape_problem(&odd_q)
            .unwrap_or_default()
            .contains("q = n/b_in = 26"));
        assert!(!Stage12::Fused.fused_here(&odd_q, 8, true));
        let odd_r = blast(64, 64, 4, 4, 12);
        assert!(shape_problem(&odd_r).is_some());
        let wide = blast(64 * 17, 64, 17, 1, 16);
        assert!(shape_problem(&wide).is_some());
    }
}
