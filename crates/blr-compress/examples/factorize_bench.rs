//! CPU benchmark of factorization time at the reference shapes of BRIEF section 3 (not a
//! timed test: run it by hand and record the output in docs/perf/factorize-cpu.md).
//!
//!   cargo run --release -p blr-compress --example factorize_bench -- [--blast-iters N] [--only NAME]
//!
//! Matrices are i.i.d. Gaussian (no real weights offline at these shapes); factorization time
//! does not depend on the values except through BLAST's iteration count, which is fixed.
//! BLAST runs `--blast-iters` iterations (default: the full 300 on the GPT-2 shape, 3 on the
//! Llama shapes) and the table extrapolates to 300 from the measured per-iteration time, which
//! is constant: every iteration does the same GEMMs and solves.

use blr_compress::{BlastOptions, MonarchOptions, Silent, Target};
use blr_core::rng::Rng;
use std::time::Instant;

struct Case {
    name: &'static str,
    m: usize,
    n: usize,
    lr_rank: usize,
    monarch: (usize, usize),
    blast: (usize, usize),
}

const CASES: [Case; 3] = [
    Case {
        name: "llama7b-attn",
        m: 4096,
        n: 4096,
        lr_rank: 1024,
        monarch: (16, 1024),
        blast: (16, 1024),
    },
    Case {
        name: "llama7b-mlp",
        m: 4096,
        n: 11008,
        lr_rank: 1488,
        monarch: (16, 1536),
        blast: (16, 1488),
    },
    Case {
        name: "gpt2-mlp",
        m: 768,
        n: 3072,
        lr_rank: 192,
        monarch: (4, 192),
        blast: (6, 192),
    },
];

/// Process CPU seconds (user + system) from /proc/self/stat, so that timings taken while other
/// jobs share the two cores can be read as "wall" and "CPU" side by side. Clock ticks are
/// 100/s on Linux x86_64.
fn cpu_seconds() -> f64 {
    std::fs::read_to_string("/proc/self/stat")
        .ok()
        .and_then(|s| {
            let after = s.rsplit_once(')')?.1;
            let fields: Vec<&str> = after.split_whitespace().collect();
            let utime: f64 = fields.get(11)?.parse().ok()?;
            let stime: f64 = fields.get(12)?.parse().ok()?;
            Some((utime + stime) / 100.0)
        })
        .unwrap_or(f64::NAN)
}

/// Wall and CPU seconds of `f`.
fn timed<T>(f: impl FnOnce() -> T) -> (T, f64, f64) {
    let (start, cpu0) = (Instant::now(), cpu_seconds());
    let out = f();
    (out, start.elapsed().as_secs_f64(), cpu_seconds() - cpu0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut blast_iters: Option<usize> = None;
    let mut only: Option<String> = None;
    let mut formats = vec!["lowrank".to_string(), "monarch".into(), "blast".into()];
    let mut i = 0;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .cloned()
            .ok_or("missing value after a flag")?;
        match args[i].as_str() {
            "--blast-iters" => blast_iters = Some(value.parse()?),
            "--only" => only = Some(value),
            "--formats" => formats = value.split(',').map(str::to_string).collect(),
            other => return Err(format!("unknown flag {other}").into()),
        }
        i += 2;
    }
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "# factorize_bench: {cpu}, {threads} threads (rayon {})",
        rayon::current_num_threads()
    );
    println!(
        "| shape | format | config | params (% dense) | iters | wall s | CPU s | wall s/iter | est. 300 iters wall (s) | rel. error |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for case in CASES
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| c.name == o))
    {
        let (m, n) = (case.m, case.n);
        let w = Rng::new(1).normal_vec(m * n, 1.0);
        let t = Target::new(case.name, m, n, &w)?;
        let dense = (m * n) as f64;
        let shape = format!("{} {m}x{n}", case.name);
        if formats.iter().any(|f| f == "lowrank") {
            let (l, s, c) = timed(|| blr_compress::lowrank(&t, case.lr_rank, None));
            let l = l?;
            let e = blr_compress::relative_error(&t, &l, None)?;
            println!(
                "| {shape} | lowrank | r={} | {} ({:.1}%) | - | {s:.2} | {c:.2} | - | - | {e:.4} |",
                case.lr_rank,
                l.params(),
                100.0 * l.params() as f64 / dense
            );
        }
        if formats.iter().any(|f| f == "monarch") {
            let (b, rr) = case.monarch;
            let (l, s, c) =
                timed(|| blr_compress::monarch(&t, &MonarchOptions::new(b, rr), None, &Silent));
            let l = l?;
            let e = blr_compress::relative_error(&t, &l, None)?;
            println!(
                "| {shape} | monarch | b={b} R={rr} | {} ({:.1}%) | - | {s:.2} | {c:.2} | - | - | {e:.4} |",
                l.params(),
                100.0 * l.params() as f64 / dense
            );
        }
        if formats.iter().any(|f| f == "blast") {
            let (b, r) = case.blast;
            let iters = blast_iters.unwrap_or(if m * n > 4_000_000 { 3 } else { 300 });
            let opts = BlastOptions {
                iterations: iters,
                ..BlastOptions::new(b, r)
            };
            let (l, s, c) = timed(|| blr_compress::blast(&t, &opts, None, &Silent));
            let l = l?;
            let e = blr_compress::relative_error(&t, &l, None)?;
            let per = s / iters as f64;
            println!(
                "| {shape} | blast | b={b} r={r} | {} ({:.1}%) | {iters} | {s:.2} | {c:.2} | {per:.3} | {:.0} | {e:.4} |",
                l.params(),
                100.0 * l.params() as f64 / dense,
                per * 300.0
            );
        }
    }
    Ok(())
}
