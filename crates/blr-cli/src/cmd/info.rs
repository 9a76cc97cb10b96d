//! `blr info FILE`: what a checkpoint holds, layer by layer, read from the header alone.

use crate::table::{bytes, si, Table};
use anyhow::{Context, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::safetensors::SafeTensors;
use std::path::PathBuf;

/// Show every linear layer of a blr checkpoint: format, shape, blocks, rank, parameters,
/// fraction of the dense layer and bytes; then totals.
///
/// Only the header is read (and every factor's presence, shape and dtype checked), so this is
/// instant even on multi-gigabyte models.
#[derive(clap::Args)]
pub struct Args {
    /// A blr checkpoint (.safetensors), as written by `blr compress`, `blr factorize --out`
    /// or `blr init-layer`.
    pub file: PathBuf,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Also decode every tensor and check that all values are finite (reads the whole file).
    #[arg(long)]
    pub verify: bool,
}

#[derive(serde::Serialize)]
struct LayerRow {
    name: String,
    format: String,
    m: usize,
    n: usize,
    b_out: usize,
    b_in: usize,
    rank: usize,
    params: usize,
    dense_params: usize,
    fraction_of_dense: f64,
    bytes: usize,
}

#[derive(serde::Serialize)]
struct Report {
    file: String,
    dtype: String,
    file_bytes: u64,
    layers: Vec<LayerRow>,
    linear_params: usize,
    dense_equivalent_params: usize,
    fraction_of_dense: f64,
    other_tensors: usize,
    other_params: usize,
    metadata: std::collections::BTreeMap<String, String>,
}

pub fn run(args: Args) -> Result<()> {
    let st = SafeTensors::open(&args.file)?;
    let (dtype, shapes) = Checkpoint::inspect(&st)?;
    if args.verify {
        Checkpoint::from_safetensors(&st)?;
    }
    let file_bytes = std::fs::metadata(&args.file)
        .with_context(|| format!("reading the size of {}", args.file.display()))?
        .len();
    let layers: Vec<LayerRow> = shapes
        .iter()
        .map(|(name, s)| {
            let params = s.params();
            LayerRow {
                name: name.clone(),
                format: s.format.to_string(),
                m: s.m,
                n: s.n,
                b_out: s.b_out,
                b_in: s.b_in,
                rank: s.rank,
                params,
                dense_params: s.m * s.n,
                fraction_of_dense: params as f64 / (s.m * s.n) as f64,
                bytes: params * dtype.size(),
            }
        })
        .collect();
    let factor_names: std::collections::BTreeSet<String> = shapes
        .iter()
        .flat_map(|(name, s)| {
            blr_core::Linear::factor_shapes(s)
                .into_iter()
                .map(move |(f, _)| format!("{name}.{f}"))
        })
        .collect();
    let others: Vec<&str> = st.names().filter(|n| !factor_names.contains(*n)).collect();
    let other_params: usize = others
        .iter()
        .filter_map(|n| st.info(n).map(|i| i.elements()))
        .sum();
    let linear_params: usize = layers.iter().map(|l| l.params).sum();
    let dense_params: usize = layers.iter().map(|l| l.dense_params).sum();
    let report = Report {
        file: args.file.display().to_string(),
        dtype: dtype.to_string(),
        file_bytes,
        linear_params,
        dense_equivalent_params: dense_params,
        fraction_of_dense: linear_params as f64 / dense_params.max(1) as f64,
        other_tensors: others.len(),
        other_params,
        metadata: st
            .metadata()
            .iter()
            .filter(|(k, _)| !k.starts_with("blr."))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        layers,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "{}: blr checkpoint, factors in {}, {}",
        report.file,
        report.dtype,
        bytes(report.file_bytes as f64)
    );
    for (k, v) in &report.metadata {
        println!("  {k} = {v}");
    }
    let mut t = Table::new(&[
        "<layer", "<format", "m x n", "blocks", "rank", "params", "of dense", "bytes",
    ]);
    for l in &report.layers {
        t.row(vec![
            l.name.clone(),
            l.format.clone(),
            format!("{} x {}", l.m, l.n),
            format!("{} x {}", l.b_out, l.b_in),
            l.rank.to_string(),
            si(l.params as f64),
            format!("{:.1}%", 100.0 * l.fraction_of_dense),
            bytes(l.bytes as f64),
        ]);
    }
    t.row(vec![
        format!("total ({} linear layers)", report.layers.len()),
        String::new(),
        String::new(),
        String::new(),
        String::new(),
        si(report.linear_params as f64),
        format!("{:.1}%", 100.0 * report.fraction_of_dense),
        bytes((report.linear_params * dtype.size()) as f64),
    ]);
    print!("{}", t.render());
    if args.verify {
        println!("verified: every tensor decoded, all values finite");
    }
    if report.other_tensors > 0 {
        println!(
            "plus {} other tensors (norms, embeddings...): {} params",
            report.other_tensors,
            si(report.other_params as f64)
        );
    }
    Ok(())
}
