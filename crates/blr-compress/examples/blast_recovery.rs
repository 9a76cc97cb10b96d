//! How often BLAST factorization recovers a matrix that is exactly BLAST(b, r), from single
//! random starts (the published algorithm) and with restarts. Numbers quoted in
//! docs/compression.md.
//!
//!   cargo run --release -p blr-compress --example blast_recovery -- [MATRICES]

use blr_compress::{blast_report, BlastInit, BlastOptions, Silent, Target};
use blr_core::format::Shape;
use blr_core::{FormatKind, Linear};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let matrices: u64 = match std::env::args().nth(1) {
        Some(v) => v.parse()?,
        None => 8,
    };
    println!(
        "| shape | b_out x b_in | r | start | restarts | recovered (< 1e-3) | median error | worst error |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for &(m, n, b_out, b_in, r) in &[
        (128, 128, 4, 4, 8),
        (30, 42, 3, 3, 5),
        (96, 120, 4, 3, 6),
        (64, 96, 2, 4, 6),
        (256, 384, 4, 4, 16),
    ] {
        let shape = Shape {
            format: FormatKind::Blast,
            m,
            n,
            b_out,
            b_in,
            rank: r,
        };
        for (init, restarts) in [
            (BlastInit::Random, 1),
            (BlastInit::Random, 4),
            (BlastInit::Spectral, 1),
        ] {
            let mut errors = Vec::new();
            for k in 0..matrices {
                // Matrix seeds far from the init seeds: an init drawn from the same stream as
                // the true factors would start at the answer.
                let w = Linear::random(&shape, 1_000_003 * (k + 1))?
                    .to_dense()?
                    .weight;
                let t = Target::new("exact", m, n, &w)?;
                let opts = BlastOptions {
                    b_out,
                    b_in,
                    seed: k,
                    restarts,
                    init,
                    ..BlastOptions::new(1, r)
                };
                errors.push(blast_report(&t, &opts, None, &Silent)?.rel_error);
            }
            errors.sort_by(f64::total_cmp);
            let ok = errors.iter().filter(|&&e| e < 1e-3).count();
            println!(
                "| {m}x{n} | {b_out}x{b_in} | {r} | {init:?} | {restarts} | {ok}/{matrices} | {:.1e} | {:.1e} |",
                errors[errors.len() / 2],
                errors[errors.len() - 1]
            );
        }
    }
    Ok(())
}
