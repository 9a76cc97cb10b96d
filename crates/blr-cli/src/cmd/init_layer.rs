//! `blr init-layer`: a checkpoint holding one layer of random factors, to try the tools on.

use super::layer_args::LayerShapeArgs;
use anyhow::{Context, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::safetensors::Dtype;
use blr_core::Linear;
use std::path::PathBuf;

/// Write a blr checkpoint with one layer of random factors (scaled so outputs have the
/// variance of the inputs), e.g. to look at it with `blr info` or time it with `blr bench`.
///
/// Example:
///   blr init-layer --m 4096 --n 4096 --format blast --blocks 16 --rank 1024 --out q.safetensors
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    pub layer: LayerShapeArgs,
    /// Where to write the checkpoint (written atomically).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// The layer's name inside the checkpoint.
    #[arg(long, default_value = "layer")]
    pub name: String,
    /// Factor storage type: f32 or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Random seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

pub fn run(args: Args) -> Result<()> {
    let shape = args.layer.shape()?;
    let layer = Linear::random(&shape, args.seed)?;
    let dtype = if args.dtype == "bf16" {
        Dtype::BF16
    } else {
        Dtype::F32
    };
    let params = layer.params();
    let ck = Checkpoint {
        layers: vec![(args.name.clone(), layer)],
        ..Default::default()
    };
    ck.save(&args.out, dtype)
        .with_context(|| format!("writing {}", args.out.display()))?;
    println!(
        "wrote {}: layer '{}' {} {}x{} ({} params, {:.1}% of dense)",
        args.out.display(),
        args.name,
        shape.format,
        shape.m,
        shape.n,
        params,
        100.0 * params as f64 / (shape.m * shape.n) as f64
    );
    Ok(())
}
