//! Low-rank `partial`: the two GEMMs of `Y = (X V^T) U^T` on cuBLASLt, each split along K when
//! its output alone has too few tiles to fill the SMs.
//!
//! Notation (../shared/BRIEF.md section 2): `T` tokens, `n` inputs, `m` outputs, rank `r`.
//! Stage 1 is `Z (T, r) = X (T, n) V^T` (K = n long, output small: at llama7b q/k/v/o T=1024,
//! r=1024 it is 64 tiles of 128 x 128 for 132 SMs; at T=128 only 8), stage 2 `Y (T, m) = Z U^T`
//! (K = r). Split-K into `s` slices is one strided-batched cuBLASLt GEMM (batch = slice, the
//! operands' column offsets as batch strides, no copies) writing `s` fp32 partial products,
//! then `blr_splitk_reduce` (gemm.cu) sums them into the bf16 output. Extra traffic: `s` fp32
//! partials written and read once (8 MB at qkvo T=1024 with s = 2, L2-resident on the H100).

use crate::error::{Error, Result};

/// Most K slices one GEMM is split into.
pub const MAX_SPLITS: usize = 16;
/// Shortest K slice the rule makes (elements): shorter slices spend more time in prologue and
/// epilogue than in MMAs.
pub const MIN_SLICE: usize = 256;
/// cuBLASLt tile edge the rule counts tiles with.
const TILE: usize = 128;

/// How low-rank `partial` splits its two GEMMs (default: [`LowRankOptions::rule_splits`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LowRankOptions {
    /// Forced K-slice counts of stage 1 and stage 2 (`None`: the rule). A forced count is
    /// lowered to the largest one that splits K into multiples of 8.
    pub splits: [Option<usize>; 2],
    /// Run both GEMMs on blr's own mma.sync kernel (gemm.cu `blr_gemm_nt_*`) instead: the
    /// earlier `partial`, 2-4x slower than cuBLASLt on the H100 (`BLR_LOWRANK_PARTIAL=own`).
    pub own_gemm: bool,
}

impl LowRankOptions {
    /// `BLR_LOWRANK_SPLITS=s1,s2` (each a count, or `auto` for the rule) and
    /// `BLR_LOWRANK_PARTIAL=own|splitk`: experiments.
    pub fn from_env() -> Result<Self> {
        let mut o = Self::default();
        if let Some(v) = std::env::var("BLR_LOWRANK_PARTIAL")
            .ok()
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
        {
            o.own_gemm = match v.as_str() {
                "own" => true,
                "splitk" => false,
                other => {
                    return Err(Error::Shape(format!(
                        "BLR_LOWRANK_PARTIAL='{other}': expected own or splitk"
                    )))
                }
            };
        }
        let Some(v) = std::env::var("BLR_LOWRANK_SPLITS")
            .ok()
            .map(|v| v.trim().to_ascii_lowercase())
            .filter(|v| !v.is_empty())
        else {
            return Ok(o);
        };
        let parts: Vec<&str> = v.split(',').map(str::trim).collect();
        if parts.len() != 2 {
            return Err(Error::Shape(format!(
                "BLR_LOWRANK_SPLITS='{v}': expected two comma-separated counts (or 'auto'), e.g. 2,1"
            )));
        }
        for (i, p) in parts.iter().enumerate() {
            o.splits[i] = match *p {
                "auto" => None,
                p => match p.parse::<usize>() {
                    Ok(s) if (1..=MAX_SPLITS).contains(&s) => Some(s),
                    _ => {
                        return Err(Error::Shape(format!(
                            "BLR_LOWRANK_SPLITS='{v}': '{p}' is not 'auto' or a count in 1..={MAX_SPLITS}"
                        )))
                    }
                },
            };
        }
        Ok(o)
    }

    /// K slices for the GEMM `(rows x cols) = (rows x inner) (cols x inner)^T` of `stage`
    /// (0 or 1) on a device with `sms` SMs.
    pub fn splits(
        &self,
        stage: usize,
        rows: usize,
        cols: usize,
        inner: usize,
        sms: usize,
    ) -> usize {
        let want = match self.splits.get(stage).copied().flatten() {
            Some(s) => s,
            None => Self::rule_splits(rows, cols, inner, sms),
        };
        fit_splits(want, inner)
    }

    /// The rule: no split once the output tiles fill half the SMs; below that, enough slices to
    /// give every SM a tile, each slice at least [`MIN_SLICE`] long.
    pub fn rule_splits(rows: usize, cols: usize, inner: usize, sms: usize) -> usize {
        let tiles = rows.div_ceil(TILE) * cols.div_ceil(TILE);
        if tiles == 0 || 2 * tiles > sms {
            return 1;
        }
        let want = sms.div_ceil(tiles).min(MAX_SPLITS);
        let mut s = want;
        while s > 1 && inner / s < MIN_SLICE {
            s -= 1;
        }
        fit_splits(s, inner)
    }
}

/// The largest count `<= want` that cuts `inner` into equal slices of a multiple of 8 elements
/// (16-byte aligned slice starts for cuBLASLt and the batch strides); 1 if none.
pub fn fit_splits(want: usize, inner: usize) -> usize {
    let mut s = want.clamp(1, MAX_SPLITS);
    while s > 1 && !inner.is_multiple_of(8 * s) {
        s -= 1;
    }
    s
}

/// fp32 elements of partial products a workspace for up to `max_tokens` tokens needs, for
/// rank `r` and `m` outputs (stage 1 writes `s1 * T * r`, stage 2 `s2 * T * m`), for the rule
/// and the options, and at least enough for every forced count on small layers (tests).
pub fn parts_capacity(
    opts: &LowRankOptions,
    n: usize,
    m: usize,
    r: usize,
    max_tokens: usize,
    sms: usize,
) -> usize {
    let mut need = (MAX_SPLITS * max_tokens * r.max(m)).min(1 << 20);
    for t in 1..=max_tokens {
        let s1 = opts.splits(0, t, r, n, sms);
        let s2 = opts.splits(1, t, m, r, sms);
        if s1 > 1 {
            need = need.max(s1 * t * r);
        }
        if s2 > 1 {
            need = need.max(s2 * t * m);
        }
    }
    need
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rule_splits_only_underfilled_gemms_and_keeps_slices_aligned() {
        // llama7b q/k/v/o, r = 1024, H100 (132 SMs).
        assert_eq!(LowRankOptions::rule_splits(1024, 1024, 4096, 132), 2);
        assert_eq!(LowRankOptions::rule_splits(128, 1024, 4096, 132), 16);
        assert_eq!(LowRankOptions::rule_splits(128, 4096, 1024, 132), 4);
        // Output fills the SMs: no split.
        assert_eq!(LowRankOptions::rule_splits(1024, 4096, 1024, 132), 1);
        // Short K: slices would drop under MIN_SLICE.
        assert_eq!(LowRankOptions::rule_splits(16, 64, 300, 132), 1);
        // K = 104 = 8 * 13: no split into multiples of 8 below 13.
        assert_eq!(fit_splits(4, 104), 1);
        assert_eq!(fit_splits(13, 104), 13);
        assert_eq!(fit_splits(3, 4096), 2);
        let forced = LowRankOptions {
            splits: [Some(3), None],
            own_gemm: false,
        };
        assert_eq!(forced.splits(0, 1024, 1024, 4096, 132), 2);
        assert_eq!(forced.splits(1, 1024, 4096, 1024, 132), 1);
    }

    #[test]
    fn capacity_covers_rule_and_forced_counts() {
        let o = LowRankOptions::default();
        let cap = parts_capacity(&o, 4096, 4096, 1024, 1024, 132);
        for t in [1, 16, 100, 128, 1000, 1024] {
            assert!(o.splits(0, t, 1024, 4096, 132) * t * 1024 <= cap.max(t * 1024));
            assert!(o.splits(1, t, 4096, 1024, 132) * t * 4096 <= cap.max(t * 4096));
        }
        let forced = LowRankOptions {
            splits: [Some(16), Some(16)],
            own_gemm: false,
        };
        let cap = parts_capacity(&forced, 1040, 136, 24, 77, 132);
        assert!(cap >= 16 * 77 * 136);
    }
}
