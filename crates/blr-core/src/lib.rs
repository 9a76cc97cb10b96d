//! Block-low-rank (BLR) formats, their CPU reference forward, the cost model and the checkpoint
//! format. Nothing here depends on a GPU: this crate is what every backend is checked against.
//!
//! Notation (../shared/BRIEF.md section 2): a linear layer computes `y = W x` with `W` of shape
//! `(m, n)` (m outputs, n inputs); a batch of `T` tokens is `X (T, n) -> Y (T, m)`, all
//! row-major. `b` is a block count (`b_out` blocks along the outputs, `b_in` along the inputs),
//! `p = m / b_out` and `q = n / b_in` are block sizes, `r` (or `R` for Monarch) is the rank.

pub mod checkpoint;
pub mod cost;
pub mod error;
pub mod format;
pub mod gemm;
pub mod rng;
pub mod safetensors;

pub use error::{Error, Result};
pub use format::{Blast, Dense, FormatKind, Linear, LowRank, Monarch};
