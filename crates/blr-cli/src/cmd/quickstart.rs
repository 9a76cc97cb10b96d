//! `blr quickstart`: the tour a new user runs first (README command one).

use crate::table::{bytes, Table};
use anyhow::Result;
use blr_core::cost::{self, Strategy};
use blr_core::format::FormatKind;
use blr_core::rng::Rng;
use blr_core::Linear;
use std::time::Instant;

/// A guided first run: what each BLR format costs on the reference Llama-7B layer, then a real
/// BLAST layer built, checked against its dense matrix and timed on this machine.
#[derive(clap::Args)]
pub struct Args {
    /// Tokens for the CPU timing.
    #[arg(long, default_value_t = 64)]
    pub tokens: usize,
}

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn time<T>(f: impl Fn() -> Result<T>) -> Result<(T, f64)> {
    f()?; // warm up (page faults, thread pool)
    let mut best = f64::INFINITY;
    let mut out = None;
    for _ in 0..3 {
        let t0 = Instant::now();
        let v = f()?;
        best = best.min(t0.elapsed().as_secs_f64());
        out = Some(v);
    }
    Ok((out.ok_or_else(|| anyhow::anyhow!("no timing run"))?, best))
}

pub fn run(args: Args) -> Result<()> {
    let cfg = cost::reference_config("llama7b-qkvo")?;
    println!("== 1. The cost model: Llama-7B q/k/v/o (4096 x 4096) at ~50% parameters ==");
    println!(
        "   roofline floors on an H100 (3.0 TB/s, 700 TFLOP/s); `blr doctor` measures your GPU\n"
    );
    let mut t = Table::new(&[
        "<format",
        "rank",
        "params",
        "T",
        "<strategy",
        "floor ms",
        "vs dense",
    ]);
    for tokens in [1usize, 1024] {
        let dense = cost::cost(&cfg.shape(FormatKind::Dense), tokens, Strategy::Dense)?
            .floor_seconds(3.0e12, 700e12);
        for f in FormatKind::ALL {
            let s = cfg.shape(f);
            for &st in cost::strategies_for(f) {
                let floor = cost::cost(&s, tokens, st)?.floor_seconds(3.0e12, 700e12);
                t.row(vec![
                    f.to_string(),
                    s.rank.to_string(),
                    format!("{:.1}M", s.params() as f64 / 1e6),
                    tokens.to_string(),
                    st.to_string(),
                    format!("{:.4}", floor * 1e3),
                    format!("{:.2}x", dense / floor),
                ]);
            }
        }
    }
    print!("{}", t.render());
    println!("\n   Unfused BLR (what the PyTorch reference code does) is slower than dense at 1024 tokens;");
    println!("   fused kernels that keep intermediates on chip are what make BLR pay.\n");

    println!(
        "== 2. A BLAST layer on this CPU (b=16, r=1024, {} tokens) ==",
        args.tokens
    );
    let shape = cfg.shape(FormatKind::Blast);
    let layer = Linear::random(&shape, 1)?;
    let dense = Linear::Dense(layer.to_dense()?);
    let x = Rng::new(2).normal_vec(args.tokens * shape.n, 1.0);
    let (y_blast, t_blast) = time(|| Ok(layer.forward(&x, args.tokens)?))?;
    let (y_dense, t_dense) = time(|| Ok(dense.forward(&x, args.tokens)?))?;
    println!(
        "   dense : {} of weights, {:.2} ms\n   blast : {} of weights, {:.2} ms ({:.2}x), output rel. error vs dense {:.1e}",
        bytes((shape.m * shape.n * 4) as f64),
        t_dense * 1e3,
        bytes((shape.params() * 4) as f64),
        t_blast * 1e3,
        t_dense / t_blast,
        rel_err(&y_blast, &y_dense)
    );
    println!("\nNext: `blr cost --help`, `blr init-layer --help`, `blr info FILE`.");
    Ok(())
}
