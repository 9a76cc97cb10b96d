//! Dense -> block-low-rank compression: SVD low-rank, Monarch projection, BLAST preconditioned
//! factorization, their calibrated (activation-aware) variants, and rank allocation.
//!
//! Notation follows ../shared/BRIEF.md sections 2-3: a weight `W (m, n)` (m outputs, n inputs,
//! row-major), `b` blocks per side (`b_out`, `b_in` for BLAST), block sizes `p = m / b_out`,
//! `q = n / b_in`, rank `r` (`R` for Monarch). Every algorithm has one entry point that takes
//! a [`Target`] (the weight) and an optional [`Calibration`] (the activation Gram `X X^T`) and
//! returns a [`blr_core::Linear`]; data-free is the same code path with the identity Gram,
//! never formed.
//!
//! | format  | data-free                       | calibrated (min ||(W - Ŵ) X||_F)                   |
//! |---------|---------------------------------|-----------------------------------------------------|
//! | lowrank | truncated SVD (optimal)         | whitened SVD with Cholesky of the Gram (optimal)    |
//! | monarch | per-block SVD (optimal)         | block-whitened SVD + exact block Gauss-Seidel       |
//! | blast   | preconditioned alternating GD   | same, Gram-weighted loss and preconditioners        |
//!
//! Any calibrated fit can also weight the output channels (min ||D^1/2 (W - Ŵ) X||_F) through
//! [`weighted_fit`] with [`OutputWeights`]: it fits `D^1/2 W` and unscales the factor holding
//! the output rows, so every format and back end takes it unchanged.
//!
//! The library never prints: progress goes through [`Progress`]. The math, the calibrated
//! Monarch "best blockwise" scheme and measured behaviour are in docs/compression.md.
//!
//! ```
//! use blr_compress::{blast, shape_for_ratio, BlastOptions, Calibration, Gram, Silent, Target};
//! use blr_core::{rng::Rng, FormatKind};
//!
//! let (m, n) = (32, 48);
//! let w = Rng::new(0).normal_vec(m * n, 1.0);
//! let target = Target::new("layers.0.mlp.up_proj", m, n, &w)?;
//! // Calibration: stream the layer's input activations (tokens, n) into a Gram.
//! let mut gram = Gram::new(n);
//! gram.accumulate(&Rng::new(1).normal_vec(64 * n, 1.0), 64)?;
//! // Half the dense parameters with 4 x 4 blocks.
//! let shape = shape_for_ratio(FormatKind::Blast, m, n, 4, 4, 0.5)?;
//! let opts = BlastOptions { iterations: 20, ..BlastOptions::new(4, shape.rank) };
//! let layer = blast(&target, &opts, Some(&Calibration::new(&gram)), &Silent)?;
//! assert!(layer.params() <= m * n / 2);
//! # Ok::<(), blr_compress::CompressError>(())
//! ```

mod blast;
mod correct;
mod error;
mod gram;
mod linalg;
mod lowrank;
mod monarch;
mod output;
mod progress;
mod rank;
mod target;

pub use blast::{
    blast, blast_report, blast_start, line_search, BlastInit, BlastMethod, BlastOptions,
    BlastReport, BlastStart,
};
pub use correct::{corrected_target, CrossGram};
pub use error::{CompressError, Result};
pub use gram::Gram;
pub use lowrank::{lowrank, lowrank_and_curve, lowrank_error_curve};
pub use monarch::{monarch, monarch_error_curve, MonarchOptions};
pub use output::{weighted_fit, OutputWeights};
pub use progress::{Progress, Silent};
pub use rank::{
    allocate, curve_candidates, shape_for_ratio, Allocation, Candidate, CurveRange, LayerOptions,
};
pub use target::{relative_error, Calibration, Target};

#[cfg(test)]
mod tests;
