//! `blr cost`: the roofline cost model for one layer shape or the reference configurations.

use super::layer_args::LayerShapeArgs;
use crate::table::{bytes, si, Table};
use anyhow::Result;
use blr_core::cost::{self, Strategy, REFERENCE_CONFIGS};
use blr_core::format::{FormatKind, Shape};

/// What a layer costs in FLOPs and bytes for each execution strategy, and its roofline floor.
///
/// Strategies: `dense` (one GEMM on the dense matrix), `unfused` (every intermediate written
/// to memory, as the PyTorch reference does), `partial` (one intermediate), `fused` (none).
/// The floor is max(bytes / bandwidth, FLOPs / peak); pass your device's measured ceilings
/// (`blr doctor` measures them) with --bandwidth and --peak.
///
/// Examples:
///   blr cost --m 4096 --n 4096 --tokens 1024 --format blast --blocks 16 --rank 1024
///   blr cost --config all --tokens 1,1024
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct Args {
    #[command(flatten)]
    pub layer: LayerShapeArgs,
    /// Token counts (comma-separated), e.g. 1,16,128,1024.
    #[arg(long, short = 't', value_delimiter = ',', default_value = "1024")]
    pub tokens: Vec<usize>,
    /// A reference configuration of the published BLR papers instead of --m/--n/..., or
    /// `all`; every format is then shown at its reference block count and rank.
    #[arg(long)]
    pub config: Option<String>,
    /// Memory bandwidth in bytes/s (default: H100 SXM measured device-to-device copy).
    #[arg(long, default_value_t = 3.0e12)]
    pub bandwidth: f64,
    /// Peak bf16 tensor-core FLOP/s (default: a realistic H100 SXM figure).
    #[arg(long, default_value_t = 700e12)]
    pub peak: f64,
    /// Print JSON records instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize)]
struct Row {
    config: String,
    format: FormatKind,
    strategy: Strategy,
    m: usize,
    n: usize,
    b_out: usize,
    b_in: usize,
    rank: usize,
    tokens: usize,
    params: usize,
    flops: f64,
    min_bytes: f64,
    intermediate_bytes: f64,
    intensity: f64,
    floor_ms: f64,
    floor_vs_dense: f64,
}

pub fn run(args: Args) -> Result<()> {
    let mut layers: Vec<(String, Shape)> = Vec::new();
    match args.config.as_deref() {
        Some(name) => {
            let configs: Vec<_> = if name == "all" {
                REFERENCE_CONFIGS.iter().collect()
            } else {
                vec![cost::reference_config(name)?]
            };
            for c in configs {
                for f in FormatKind::ALL {
                    layers.push((c.name.to_string(), c.shape(f)));
                }
            }
        }
        None => {
            let shape = args.layer.shape()?;
            let dense = Shape {
                format: FormatKind::Dense,
                b_out: 1,
                b_in: 1,
                rank: shape.m.min(shape.n),
                ..shape
            };
            layers.push(("custom".into(), dense));
            if shape.format != FormatKind::Dense {
                layers.push(("custom".into(), shape));
            }
        }
    }
    let mut rows = Vec::new();
    for &t in &args.tokens {
        for (config, shape) in &layers {
            let dense = Shape {
                format: FormatKind::Dense,
                b_out: 1,
                b_in: 1,
                rank: shape.m.min(shape.n),
                ..*shape
            };
            let dense_floor =
                cost::cost(&dense, t, Strategy::Dense)?.floor_seconds(args.bandwidth, args.peak);
            for &strategy in cost::strategies_for(shape.format) {
                let c = cost::cost(shape, t, strategy)?;
                let floor = c.floor_seconds(args.bandwidth, args.peak);
                rows.push(Row {
                    config: config.clone(),
                    format: shape.format,
                    strategy,
                    m: shape.m,
                    n: shape.n,
                    b_out: shape.b_out,
                    b_in: shape.b_in,
                    rank: shape.rank,
                    tokens: t,
                    params: shape.params(),
                    flops: c.flops,
                    min_bytes: c.min_bytes,
                    intermediate_bytes: c.intermediate_bytes,
                    intensity: c.intensity(),
                    floor_ms: floor * 1e3,
                    floor_vs_dense: dense_floor / floor,
                });
            }
        }
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    println!(
        "roofline at {:.2} TB/s and {:.0} TFLOP/s (bf16 weights and activations)",
        args.bandwidth / 1e12,
        args.peak / 1e12
    );
    let mut t = Table::new(&[
        "<config",
        "m x n",
        "<format",
        "b",
        "rank",
        "T",
        "<strategy",
        "params",
        "FLOPs",
        "bytes",
        "interm.",
        "FLOP/B",
        "floor ms",
        "vs dense",
    ]);
    for r in &rows {
        t.row(vec![
            r.config.clone(),
            format!("{}x{}", r.m, r.n),
            r.format.to_string(),
            if r.b_out == r.b_in {
                r.b_out.to_string()
            } else {
                format!("{}x{}", r.b_out, r.b_in)
            },
            r.rank.to_string(),
            r.tokens.to_string(),
            r.strategy.to_string(),
            si(r.params as f64),
            si(r.flops),
            bytes(r.min_bytes),
            bytes(r.intermediate_bytes),
            format!("{:.1}", r.intensity),
            format!("{:.4}", r.floor_ms),
            format!("{:.2}x", r.floor_vs_dense),
        ]);
    }
    print!("{}", t.render());
    Ok(())
}
