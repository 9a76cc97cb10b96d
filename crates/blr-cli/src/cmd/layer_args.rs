//! The flags that describe one layer's shape, shared by `cost` and `init-layer`.

use anyhow::{bail, Result};
use blr_core::format::{FormatKind, Shape};

#[derive(clap::Args, Clone, Debug)]
pub struct LayerShapeArgs {
    /// Output features (rows of W).
    #[arg(long)]
    pub m: Option<usize>,
    /// Input features (columns of W).
    #[arg(long)]
    pub n: Option<usize>,
    /// Format: dense, lowrank, monarch or blast.
    #[arg(long, default_value = "blast")]
    pub format: FormatKind,
    /// Block count on both sides (monarch, blast).
    #[arg(long, short = 'b')]
    pub blocks: Option<usize>,
    /// Output-side blocks (blast; overrides --blocks).
    #[arg(long)]
    pub blocks_out: Option<usize>,
    /// Input-side blocks (blast; overrides --blocks).
    #[arg(long)]
    pub blocks_in: Option<usize>,
    /// Rank: r for lowrank and blast, the total rank R for monarch.
    #[arg(long, short = 'r')]
    pub rank: Option<usize>,
}

impl LayerShapeArgs {
    /// The shape described, validated (block counts divide the dimensions, rank >= 1).
    pub fn shape(&self) -> Result<Shape> {
        let (Some(m), Some(n)) = (self.m, self.n) else {
            bail!("give the layer's dimensions with --m OUT --n IN (e.g. --m 4096 --n 4096)");
        };
        let blocks = self.blocks.unwrap_or(1);
        let (b_out, b_in, rank) = match self.format {
            FormatKind::Dense => (1, 1, m.min(n)),
            FormatKind::LowRank => (1, 1, self.rank_or_bail()?),
            FormatKind::Monarch => (blocks, blocks, self.rank_or_bail()?),
            FormatKind::Blast => (
                self.blocks_out.unwrap_or(blocks),
                self.blocks_in.unwrap_or(blocks),
                self.rank_or_bail()?,
            ),
        };
        let shape = Shape {
            format: self.format,
            m,
            n,
            b_out,
            b_in,
            rank,
        };
        shape.validate()?;
        Ok(shape)
    }

    fn rank_or_bail(&self) -> Result<usize> {
        match self.rank {
            Some(r) => Ok(r),
            None => bail!(
                "{} needs a rank: pass --rank R (about half the dense parameters: R ~ m*n / (2*(m+n)))",
                self.format
            ),
        }
    }
}
