//! The roofline cost model of ../shared/BRIEF.md section 5, as pure functions.
//!
//! For a layer shape, a token count and an execution strategy it gives the FLOPs, the minimum
//! bytes (weights + input + output, bf16), the bytes of materialised intermediates (each
//! written once and read once), the arithmetic intensity and the roofline floor for a given
//! bandwidth and peak. Kernels are reported against these numbers.

use crate::format::{FormatKind, Shape};
use crate::{Error, Result};
use std::fmt;
use std::str::FromStr;

/// Bytes per element of the GPU path (bf16).
pub const BYTES_PER_ELEMENT: f64 = 2.0;

/// How a BLR forward is executed, from the most to the least memory traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Strategy {
    /// One cuBLAS GEMM on the dense matrix (the baseline every format is compared with).
    Dense,
    /// Every intermediate materialised, as the PyTorch reference code does: BLAST writes Z and
    /// W; Monarch writes stage 1, its permuted copy and stage 2 before the output permute;
    /// low-rank writes X V^T.
    Unfused,
    /// BLAST stages 1+2 fused (W written once); Monarch stage 1 written straight into the
    /// permuted layout and the output in final order (one intermediate); low-rank keeps X V^T
    /// on chip.
    Partial,
    /// All stages in one kernel: no intermediate leaves the chip.
    Fused,
}

impl Strategy {
    pub const ALL: [Strategy; 4] = [
        Strategy::Dense,
        Strategy::Unfused,
        Strategy::Partial,
        Strategy::Fused,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Strategy::Dense => "dense",
            Strategy::Unfused => "unfused",
            Strategy::Partial => "partial",
            Strategy::Fused => "fused",
        }
    }
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Strategy {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        Strategy::ALL
            .into_iter()
            .find(|k| k.name() == s.to_ascii_lowercase())
            .ok_or_else(|| Error::Unknown {
                what: "strategy",
                got: s.to_string(),
                expected: "dense, unfused, partial, fused",
            })
    }
}

/// The cost of one forward of one layer.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize)]
pub struct Cost {
    pub flops: f64,
    /// Weights + input + output, each moved once.
    pub min_bytes: f64,
    /// Materialised intermediates, each written once and read once.
    pub intermediate_bytes: f64,
}

impl Cost {
    pub fn total_bytes(&self) -> f64 {
        self.min_bytes + self.intermediate_bytes
    }

    /// FLOPs per byte moved (including intermediates).
    pub fn intensity(&self) -> f64 {
        self.flops / self.total_bytes()
    }

    /// The roofline floor in seconds: `max(bytes / bandwidth, flops / peak)`.
    pub fn floor_seconds(&self, bandwidth_bytes_per_s: f64, peak_flops: f64) -> f64 {
        (self.total_bytes() / bandwidth_bytes_per_s).max(self.flops / peak_flops)
    }
}

/// FLOPs of one forward over `tokens` tokens (BRIEF section 2).
pub fn flops(shape: &Shape, tokens: usize) -> f64 {
    let t = tokens as f64;
    let (m, n, r) = (shape.m as f64, shape.n as f64, shape.rank as f64);
    match shape.format {
        FormatKind::Dense => 2.0 * t * m * n,
        FormatKind::LowRank | FormatKind::Monarch => 2.0 * t * r * (m + n),
        FormatKind::Blast => 2.0 * t * r * (m + n + (shape.b_out * shape.b_in) as f64),
    }
}

/// Elements of materialised intermediates for a strategy (each counted once; the bytes
/// are 2 (bf16) x 2 (written then read) per element).
pub fn intermediate_elements(shape: &Shape, tokens: usize, strategy: Strategy) -> Result<f64> {
    let t = tokens as f64;
    let r = shape.rank as f64;
    let elems = match (shape.format, strategy) {
        (_, Strategy::Fused) => 0.0,
        (FormatKind::Dense, Strategy::Dense) => 0.0,
        (FormatKind::Dense, _) | (_, Strategy::Dense) => {
            return Err(Error::Unknown {
                what: "strategy for this format",
                got: format!("{} with {}", strategy, shape.format),
                expected: "dense layers run as `dense`; BLR layers as unfused, partial or fused",
            })
        }
        (FormatKind::LowRank, Strategy::Unfused) => t * r,
        (FormatKind::LowRank, Strategy::Partial) => 0.0,
        // stage-1 output (T, b*R), its permuted copy, and stage 2 before the output permute.
        (FormatKind::Monarch, Strategy::Unfused) => {
            2.0 * t * shape.b_in as f64 * r + t * shape.m as f64
        }
        (FormatKind::Monarch, Strategy::Partial) => t * shape.b_in as f64 * r,
        // Z (b_in, T, r) and W (b_out, T, r).
        (FormatKind::Blast, Strategy::Unfused) => t * r * (shape.b_in + shape.b_out) as f64,
        (FormatKind::Blast, Strategy::Partial) => t * r * shape.b_out as f64,
    };
    Ok(elems)
}

/// The full cost of a strategy.
pub fn cost(shape: &Shape, tokens: usize, strategy: Strategy) -> Result<Cost> {
    let t = tokens as f64;
    let min_bytes = BYTES_PER_ELEMENT * (shape.params() as f64 + t * (shape.m + shape.n) as f64);
    Ok(Cost {
        flops: flops(shape, tokens),
        min_bytes,
        intermediate_bytes: 2.0
            * BYTES_PER_ELEMENT
            * intermediate_elements(shape, tokens, strategy)?,
    })
}

/// The strategies that apply to a format, cheapest traffic last.
pub fn strategies_for(format: FormatKind) -> &'static [Strategy] {
    match format {
        FormatKind::Dense => &[Strategy::Dense],
        _ => &[Strategy::Unfused, Strategy::Partial, Strategy::Fused],
    }
}

/// A named reference layer configuration (BRIEF section 3).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReferenceConfig {
    pub name: &'static str,
    pub m: usize,
    pub n: usize,
    /// The tokens the layer natively runs at (sequence length or patches).
    pub native_tokens: usize,
    pub blast_blocks: usize,
    pub blast_rank: usize,
    pub monarch_blocks: usize,
    pub monarch_rank: usize,
    pub lowrank_rank: usize,
}

impl ReferenceConfig {
    /// The layer shape of `format` in this configuration.
    pub fn shape(&self, format: FormatKind) -> Shape {
        let (b_out, b_in, rank) = match format {
            FormatKind::Dense => (1, 1, self.m.min(self.n)),
            FormatKind::LowRank => (1, 1, self.lowrank_rank),
            FormatKind::Monarch => (self.monarch_blocks, self.monarch_blocks, self.monarch_rank),
            FormatKind::Blast => (self.blast_blocks, self.blast_blocks, self.blast_rank),
        };
        Shape {
            format,
            m: self.m,
            n: self.n,
            b_out,
            b_in,
            rank,
        }
    }
}

/// The published per-layer settings of BRIEF section 3.
pub const REFERENCE_CONFIGS: &[ReferenceConfig] = &[
    ReferenceConfig {
        name: "llama7b-qkvo",
        m: 4096,
        n: 4096,
        native_tokens: 1024,
        blast_blocks: 16,
        blast_rank: 1024,
        monarch_blocks: 16,
        monarch_rank: 1024,
        lowrank_rank: 1024,
    },
    ReferenceConfig {
        name: "llama7b-gate-up",
        m: 11008,
        n: 4096,
        native_tokens: 1024,
        blast_blocks: 16,
        blast_rank: 1488,
        monarch_blocks: 16,
        monarch_rank: 1536,
        lowrank_rank: 1488,
    },
    ReferenceConfig {
        name: "llama7b-down",
        m: 4096,
        n: 11008,
        native_tokens: 1024,
        blast_blocks: 16,
        blast_rank: 1488,
        monarch_blocks: 16,
        monarch_rank: 1536,
        lowrank_rank: 1488,
    },
    ReferenceConfig {
        name: "llama3.2-1b-qo",
        m: 2048,
        n: 2048,
        native_tokens: 1024,
        blast_blocks: 16,
        blast_rank: 256,
        monarch_blocks: 16,
        monarch_rank: 256,
        lowrank_rank: 256,
    },
    ReferenceConfig {
        name: "llama3.2-1b-gate",
        m: 8192,
        n: 2048,
        native_tokens: 1024,
        blast_blocks: 16,
        blast_rank: 512,
        monarch_blocks: 16,
        monarch_rank: 512,
        lowrank_rank: 512,
    },
    ReferenceConfig {
        name: "llama3.2-1b-up",
        m: 8192,
        n: 2048,
        native_tokens: 1024,
        blast_blocks: 16,
        blast_rank: 768,
        monarch_blocks: 16,
        monarch_rank: 768,
        lowrank_rank: 768,
    },
    ReferenceConfig {
        name: "llama3.2-1b-down",
        m: 2048,
        n: 8192,
        native_tokens: 1024,
        blast_blocks: 16,
        blast_rank: 768,
        monarch_blocks: 16,
        monarch_rank: 768,
        lowrank_rank: 768,
    },
    ReferenceConfig {
        name: "gpt2s-attn",
        m: 2304,
        n: 768,
        native_tokens: 1024,
        blast_blocks: 6,
        blast_rank: 192,
        monarch_blocks: 4,
        monarch_rank: 192,
        lowrank_rank: 192,
    },
    ReferenceConfig {
        name: "gpt2s-fc",
        m: 3072,
        n: 768,
        native_tokens: 1024,
        blast_blocks: 6,
        blast_rank: 192,
        monarch_blocks: 4,
        monarch_rank: 192,
        lowrank_rank: 192,
    },
    ReferenceConfig {
        name: "gpt2s-proj",
        m: 768,
        n: 3072,
        native_tokens: 1024,
        blast_blocks: 6,
        blast_rank: 192,
        monarch_blocks: 4,
        monarch_rank: 192,
        lowrank_rank: 192,
    },
    ReferenceConfig {
        name: "vit-b16-qkv",
        m: 2304,
        n: 768,
        native_tokens: 197,
        blast_blocks: 3,
        blast_rank: 128,
        monarch_blocks: 4,
        monarch_rank: 128,
        lowrank_rank: 128,
    },
    ReferenceConfig {
        name: "vit-b16-fc1",
        m: 3072,
        n: 768,
        native_tokens: 197,
        blast_blocks: 3,
        blast_rank: 128,
        monarch_blocks: 4,
        monarch_rank: 128,
        lowrank_rank: 128,
    },
    ReferenceConfig {
        name: "vit-b16-fc2",
        m: 768,
        n: 3072,
        native_tokens: 197,
        blast_blocks: 3,
        blast_rank: 128,
        monarch_blocks: 4,
        monarch_rank: 128,
        lowrank_rank: 128,
    },
    ReferenceConfig {
        name: "dit-xl2-qkv",
        m: 3456,
        n: 1152,
        native_tokens: 256,
        blast_blocks: 9,
        blast_rank: 384,
        monarch_blocks: 9,
        monarch_rank: 384,
        lowrank_rank: 384,
    },
    ReferenceConfig {
        name: "dit-xl2-fc1",
        m: 4608,
        n: 1152,
        native_tokens: 256,
        blast_blocks: 9,
        blast_rank: 256,
        monarch_blocks: 9,
        monarch_rank: 256,
        lowrank_rank: 256,
    },
];

/// Looks a reference configuration up by name.
pub fn reference_config(name: &str) -> Result<&'static ReferenceConfig> {
    REFERENCE_CONFIGS.iter().find(|c| c.name == name).ok_or_else(|| Error::Unknown {
        what: "reference config",
        got: name.to_string(),
        expected: "llama7b-qkvo, llama7b-gate-up, llama7b-down, llama3.2-1b-qo, llama3.2-1b-gate, \
                   llama3.2-1b-up, llama3.2-1b-down, gpt2s-attn, gpt2s-fc, gpt2s-proj, vit-b16-qkv, \
                   vit-b16-fc1, vit-b16-fc2, dit-xl2-qkv, dit-xl2-fc1",
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol * b.abs()
    }

    #[test]
    fn llama7b_qkvo_blast_matches_the_brief() {
        let cfg = reference_config("llama7b-qkvo").unwrap();
        let s = cfg.shape(FormatKind::Blast);
        // r (m + n + b^2) = 1024 * (8192 + 256) = 8 650 752 params, 52% of dense.
        assert_eq!(s.params(), 8_650_752);
        assert!(close(s.params() as f64 / (4096.0 * 4096.0), 0.5156, 1e-3));
        // 2 T r (m + n + b^2) = 2 * 1024 * 1024 * 8448 = 17.7 GFLOP.
        let c = cost(&s, 1024, Strategy::Fused).unwrap();
        assert_eq!(c.flops, 2.0 * 1024.0 * 1024.0 * 8448.0);
        assert!(close(c.flops, 17.72e9, 1e-3));
        // 2 * (8 650 752 + 1024 * 8192) bytes = 34.1 MB (the brief's "33 MB").
        assert_eq!(c.min_bytes, 2.0 * (8_650_752.0 + 1024.0 * 8192.0));
        assert_eq!(c.intermediate_bytes, 0.0);
        // Floor at 700 TFLOP/s and 3.0 TB/s: compute-bound, 0.0253 ms.
        let floor = c.floor_seconds(3.0e12, 700e12);
        assert!(close(floor, 17.72e9 / 700e12, 1e-3), "{floor}");
        assert!(close(floor * 1e3, 0.0253, 0.01));
        // Unfused: Z and W, b r T elements each, written and read in bf16.
        let u = cost(&s, 1024, Strategy::Unfused).unwrap();
        assert_eq!(u.intermediate_bytes, 4.0 * 2.0 * 16.0 * 1024.0 * 1024.0);
        let p = cost(&s, 1024, Strategy::Partial).unwrap();
        assert_eq!(p.intermediate_bytes, 4.0 * 16.0 * 1024.0 * 1024.0);
    }

    #[test]
    fn dense_and_decode_figures() {
        let cfg = reference_config("llama7b-qkvo").unwrap();
        let d = cost(&cfg.shape(FormatKind::Dense), 1024, Strategy::Dense).unwrap();
        assert_eq!(d.flops, 2.0 * 1024.0 * 4096.0 * 4096.0);
        // T = 1: intensity ~1 FLOP/B for every format (memory-bound decode).
        for f in FormatKind::ALL {
            let s = cfg.shape(f);
            let strat = if f == FormatKind::Dense {
                Strategy::Dense
            } else {
                Strategy::Fused
            };
            let c = cost(&s, 1, strat).unwrap();
            assert!(
                c.intensity() > 0.9 && c.intensity() < 1.1,
                "{f}: {}",
                c.intensity()
            );
        }
    }

    #[test]
    fn monarch_and_lowrank_intermediates() {
        let cfg = reference_config("llama7b-gate-up").unwrap();
        let m = cfg.shape(FormatKind::Monarch);
        assert_eq!(m.params(), 1536 * (11008 + 4096));
        let t = 128.0;
        let un = intermediate_elements(&m, 128, Strategy::Unfused).unwrap();
        assert_eq!(un, 2.0 * t * 16.0 * 1536.0 + t * 11008.0);
        assert_eq!(
            intermediate_elements(&m, 128, Strategy::Partial).unwrap(),
            t * 16.0 * 1536.0
        );
        let lr = cfg.shape(FormatKind::LowRank);
        assert_eq!(
            intermediate_elements(&lr, 128, Strategy::Unfused).unwrap(),
            t * 1488.0
        );
        assert_eq!(
            intermediate_elements(&lr, 128, Strategy::Partial).unwrap(),
            0.0
        );
        assert!(intermediate_elements(&lr, 128, Strategy::Dense).is_err());
    }

    #[test]
    fn every_reference_config_is_valid_and_about_half_dense() {
        for cfg in REFERENCE_CONFIGS {
            let dense = (cfg.m * cfg.n) as f64;
            for f in [FormatKind::LowRank, FormatKind::Monarch, FormatKind::Blast] {
                let s = cfg.shape(f);
                s.validate().unwrap_or_else(|e| panic!("{}: {e}", cfg.name));
                let ratio = s.params() as f64 / dense;
                assert!(ratio > 0.2 && ratio < 0.75, "{} {f}: {ratio}", cfg.name);
            }
        }
    }
}
