//! `blr roofline`: the measured ceilings of the GPU as a roofline plot (SVG), with every
//! (config, format, strategy, T) point of a layer benchmark placed by arithmetic intensity
//! (FLOPs / minimum bytes) and achieved FLOP/s.

use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{bail, Context};

use super::bench::{collect, LayerArgs, Record};
use super::doctor::GpuArgs;

#[derive(clap::Args, Debug)]
#[command(
    about = "Draw the GPU's measured roofline with the layer benchmark points (SVG)",
    long_about = "Draws a roofline plot: x = arithmetic intensity (FLOPs per byte of the layer's \
minimum traffic, 2*(params + T*(m+n)) bytes), y = achieved TFLOP/s, both logarithmic. The two \
ceilings (copy bandwidth and bf16 GEMM rate) are the ones measured in the benchmark run. Each \
point is one (config, format, strategy, T) row of `blr bench layer`: colour = format, marker = \
strategy; its distance below the roof is the fraction of the roofline it reaches. The fastest \
strategy of each (config, format, T) is drawn large and labelled, the others small.\n\n\
Either reads records written by `blr bench layer --out FILE.json` (--from), or runs that \
benchmark itself with the flags below.\n\n\
Examples:\n  blr roofline --out roofline.svg\n  \
blr bench layer --config all --out layers.json && blr roofline --from layers.json --out roofline.svg"
)]
pub struct Args {
    /// The SVG file to write.
    #[arg(long, value_name = "FILE.svg")]
    out: PathBuf,
    /// Records of an earlier `blr bench layer --out FILE.json`; without it the benchmark runs.
    #[arg(long, value_name = "FILE.json")]
    from: Option<PathBuf>,
    /// Reference config(s) to benchmark when --from is not given (see `blr bench layer --help`);
    /// with --from, the configs of the file to plot (`all` keeps every record).
    #[arg(long, default_value = "llama7b-qkvo")]
    config: String,
    /// Token counts to benchmark when --from is not given.
    #[arg(long, default_value = "1,16,128,native")]
    tokens: String,
    /// Formats to benchmark when --from is not given.
    #[arg(long, default_value = "dense,lowrank,monarch,blast")]
    formats: String,
    /// Timed repetitions per point.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    #[command(flatten)]
    gpu: GpuArgs,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let records: Vec<Record> = match &args.from {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading {}", path.display()))?;
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "{} is not a list of `blr bench layer` records (write one with --out)",
                    path.display()
                )
            })?
        }
        None => collect(&LayerArgs {
            config: args.config.clone(),
            tokens: args.tokens.clone(),
            formats: args.formats.clone(),
            strategy: "all".into(),
            reps: args.reps,
            json: false,
            out: None,
            seed: 7,
            autotune: None,
            no_autotune: false,
            tune_gemms: false,
            prefill_chunk: None,
            gpu: args.gpu.clone(),
        })?,
    };
    let records: Vec<Record> = if args.config.trim() == "all" {
        records
    } else {
        let keep: Vec<&str> = args.config.split(',').map(str::trim).collect();
        records
            .into_iter()
            .filter(|r| keep.contains(&r.config.as_str()))
            .collect()
    };
    if records.is_empty() {
        bail!(
            "no benchmark records to plot for --config {} (use --config all for every record)",
            args.config
        );
    }
    let svg = render(&records)?;
    std::fs::write(&args.out, svg).with_context(|| format!("writing {}", args.out.display()))?;
    eprintln!("wrote {} points to {}", records.len(), args.out.display());
    Ok(())
}

const W: f64 = 1280.0;
const H: f64 = 820.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 280.0;
const TOP: f64 = 50.0;
const BOTTOM: f64 = 60.0;

fn color(format: &str) -> &'static str {
    match format {
        "dense" => "#555555",
        "lowrank" => "#1f77b4",
        "monarch" => "#2ca02c",
        "blast" => "#d62728",
        _ => "#9467bd",
    }
}

fn marker(strategy: &str, x: f64, y: f64, fill: &str) -> String {
    match strategy {
        "partial" => format!(
            r#"<rect x="{:.1}" y="{:.1}" width="9" height="9" fill="{fill}"/>"#,
            x - 4.5,
            y - 4.5
        ),
        "decode" => format!(
            r#"<polygon points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}" fill="{fill}"/>"#,
            x,
            y - 6.0,
            x - 5.5,
            y + 4.0,
            x + 5.5,
            y + 4.0
        ),
        "unfused" => format!(
            r#"<circle cx="{x:.1}" cy="{y:.1}" r="4.5" fill="none" stroke="{fill}" stroke-width="2"/>"#
        ),
        _ => format!(r#"<circle cx="{x:.1}" cy="{y:.1}" r="4.5" fill="{fill}"/>"#),
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// The SVG document for these records.
fn render(records: &[Record]) -> anyhow::Result<String> {
    let bw = records[0].bw_gbs * 1e9;
    let peak = records[0].peak_tflops * 1e12;
    if !(bw > 0.0 && peak > 0.0) {
        bail!("records carry no measured ceilings (bw_gbs, peak_tflops)");
    }
    let pts: Vec<(f64, f64, &Record)> = records
        .iter()
        // Single-layer rows only: the graph-of-24 rows of small layers are in the table.
        .filter(|r| r.layers_in_graph == 1 && r.ms > 0.0 && r.bytes > 0.0 && r.flops > 0.0)
        .map(|r| (r.flops / r.bytes, r.flops / (r.ms * 1e-3), r))
        .collect();
    if pts.is_empty() {
        bail!("no record has a positive time, FLOP count and byte count");
    }
    let ridge = peak / bw;
    let xmin = pts.iter().map(|p| p.0).fold(ridge, f64::min) / 3.0;
    let xmax = pts.iter().map(|p| p.0).fold(ridge, f64::max) * 3.0;
    let ymax = peak * 2.0;
    let ymin = pts.iter().map(|p| p.1).fold(bw * xmin, f64::min) / 3.0;
    let (lx0, lx1, ly0, ly1) = (xmin.log10(), xmax.log10(), ymin.log10(), ymax.log10());
    let px = |x: f64| LEFT + (x.log10() - lx0) / (lx1 - lx0) * (W - LEFT - RIGHT);
    let py = |y: f64| H - BOTTOM - (y.log10() - ly0) / (ly1 - ly0) * (H - TOP - BOTTOM);

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r#"<text x="{LEFT}" y="24" font-size="16">Roofline: {} — measured copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s</text>"#,
        esc(&records[0].device),
        bw / 1e9,
        peak / 1e12
    );
    // Grid and axes (decades).
    for e in (lx0.floor() as i32)..=(lx1.ceil() as i32) {
        let x = 10f64.powi(e);
        if x < xmin || x > xmax {
            continue;
        }
        let sx = px(x);
        let _ = writeln!(
            s,
            r##"<line x1="{sx:.1}" y1="{TOP}" x2="{sx:.1}" y2="{:.1}" stroke="#e5e5e5"/><text x="{sx:.1}" y="{:.1}" text-anchor="middle">{}</text>"##,
            H - BOTTOM,
            H - BOTTOM + 18.0,
            fmt_decade(e)
        );
    }
    for e in (ly0.floor() as i32)..=(ly1.ceil() as i32) {
        let y = 10f64.powi(e);
        if y < ymin || y > ymax {
            continue;
        }
        let sy = py(y);
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" y1="{sy:.1}" x2="{:.1}" y2="{sy:.1}" stroke="#e5e5e5"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            W - RIGHT,
            LEFT - 6.0,
            sy + 4.0,
            fmt_decade(e - 12)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">arithmetic intensity (FLOP / minimum byte)</text>"#,
        (LEFT + W - RIGHT) / 2.0,
        H - 18.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(20,{:.1}) rotate(-90)" text-anchor="middle">achieved TFLOP/s</text>"#,
        (TOP + H - BOTTOM) / 2.0
    );
    // The roof: bandwidth slope up to the ridge, then the flat compute ceiling.
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="black" stroke-width="2" points="{:.1},{:.1} {:.1},{:.1} {:.1},{:.1}"/>"#,
        px(xmin),
        py(bw * xmin),
        px(ridge),
        py(peak),
        px(xmax),
        py(peak)
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="end">{:.0} TFLOP/s</text>"#,
        px(xmax) - 4.0,
        py(peak) - 6.0,
        peak / 1e12
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}">{:.0} GB/s</text>"#,
        px(xmin) + 6.0,
        py(bw * xmin) - 8.0,
        bw / 1e9
    );
    // The fastest strategy per (config, format, T) is labelled; the others are drawn small.
    let mut fastest: std::collections::HashMap<(&str, &str, usize), f64> =
        std::collections::HashMap::new();
    for r in records {
        let e = fastest
            .entry((r.config.as_str(), r.format.as_str(), r.tokens))
            .or_insert(f64::INFINITY);
        *e = e.min(r.ms);
    }
    let mut placed: Vec<(f64, f64, f64)> = Vec::new();
    for (x, y, r) in &pts {
        let (sx, sy) = (px(*x), py(*y));
        let c = color(&r.format);
        let is_best = fastest
            .get(&(r.config.as_str(), r.format.as_str(), r.tokens))
            .is_some_and(|&b| r.ms <= b);
        if !is_best {
            let _ = writeln!(
                s,
                r#"<g opacity="0.45" transform="translate({sx:.1},{sy:.1}) scale(0.6) translate({:.1},{:.1})">{}</g>"#,
                -sx,
                -sy,
                marker(&r.strategy, sx, sy, c)
            );
            continue;
        }
        let _ = writeln!(s, "{}", marker(&r.strategy, sx, sy, c));
        let text = format!(
            "{} {}/{} T={} ({:.0}%)",
            esc(&r.config),
            esc(&r.format),
            esc(&r.strategy),
            r.tokens,
            r.roofline_frac * 100.0
        );
        // Greedy de-overlap: move a label down 11 px at a time until it clears the labels
        // already placed (boxes estimated at 5 px per character), with a leader line if moved.
        let width = 5.0 * text.len() as f64;
        let (lx, mut ly) = (sx + 7.0, sy + 3.0);
        for _ in 0..40 {
            let clash = placed
                .iter()
                .any(|&(x0, x1, y)| (ly - y).abs() < 10.0 && lx < x1 && x0 < lx + width);
            if !clash {
                break;
            }
            ly += 11.0;
        }
        placed.push((lx, lx + width, ly));
        if ly - (sy + 3.0) > 1.0 {
            let _ = writeln!(
                s,
                r#"<line x1="{sx:.1}" y1="{sy:.1}" x2="{lx:.1}" y2="{:.1}" stroke="{c}" stroke-width="0.5"/>"#,
                ly - 3.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{lx:.1}" y="{ly:.1}" font-size="9" fill="{c}">{text}</text>"#
        );
    }
    // Legend.
    // The region above the bandwidth slope at low intensity is always empty: legend goes there.
    let lx = LEFT + 20.0;
    let mut ly = TOP + 16.0;
    let _ = writeln!(
        s,
        r#"<text x="{lx}" y="{ly}" font-weight="bold">format (colour)</text>"#
    );
    for f in ["dense", "lowrank", "monarch", "blast"] {
        ly += 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{lx}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{ly}">{f}</text>"#,
            ly - 10.0,
            color(f),
            lx + 18.0
        );
    }
    ly += 30.0;
    let _ = writeln!(
        s,
        r#"<text x="{lx}" y="{ly}" font-weight="bold">strategy (marker)</text>"#
    );
    for st in ["cublas", "unfused", "partial", "decode"] {
        ly += 18.0;
        let _ = writeln!(s, "{}", marker(st, lx + 6.0, ly - 4.0, "#333333"));
        let _ = writeln!(s, r#"<text x="{:.1}" y="{ly}">{st}</text>"#, lx + 18.0);
    }
    ly += 30.0;
    let _ = writeln!(
        s,
        r#"<text x="{lx}" y="{ly}" font-size="10">label: config format/strategy T (fraction of roof)</text>"#
    );
    s.push_str("</svg>\n");
    Ok(s)
}

/// `10^e` written plainly for the axis labels (e is a power of ten of FLOP/B or TFLOP/s).
fn fmt_decade(e: i32) -> String {
    if (0..=4).contains(&e) {
        format!("{}", 10i64.pow(e as u32))
    } else if (-3..0).contains(&e) {
        format!("{}", 10f64.powi(e))
    } else {
        format!("1e{e}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(format: &str, strategy: &str, tokens: usize, ms: f64) -> Record {
        let (m, n) = (4096usize, 4096usize);
        let params = m * n;
        let flops = 2.0 * (tokens * m * n) as f64;
        let bytes = 2.0 * (params + tokens * (m + n)) as f64;
        Record {
            device: "Test <GPU>".into(),
            config: "llama7b-qkvo".into(),
            m,
            n,
            tokens,
            format: format.into(),
            strategy: strategy.into(),
            params,
            ms,
            floor_ms: 0.01,
            roofline_frac: 0.5,
            speedup_vs_dense: 1.0,
            rel_error: 1e-3,
            auto: true,
            best: true,
            graph: false,
            p10_ms: ms,
            p90_ms: ms,
            flops,
            bytes,
            bw_gbs: 3000.0,
            peak_tflops: 800.0,
            layers_in_graph: 1,
        }
    }

    #[test]
    fn svg_has_roof_points_labels_and_escapes() {
        let records = vec![
            rec("dense", "cublas", 1, 0.02),
            rec("blast", "decode", 16, 0.02),
            rec("blast", "partial", 1024, 0.08),
        ];
        let svg = render(&records).expect("renders");
        assert!(svg.starts_with("<svg"));
        assert!(svg.trim_end().ends_with("</svg>"));
        assert!(svg.contains("<polyline"), "no roof");
        assert_eq!(svg.matches("T=").count(), 3, "one label per fastest point");
        assert!(svg.contains("Test &lt;GPU&gt;"));
        assert!(svg.contains("800 TFLOP/s"));
        assert!(!svg.contains("NaN"));
    }

    #[test]
    fn only_the_fastest_strategy_of_a_group_is_labelled() {
        let records = vec![
            rec("blast", "partial", 16, 0.02),
            rec("blast", "decode", 16, 0.03),
            rec("blast", "unfused", 16, 0.05),
        ];
        let svg = render(&records).expect("renders");
        assert_eq!(svg.matches("T=16").count(), 1);
        assert!(svg.contains("blast/partial T=16"));
        assert_eq!(svg.matches("opacity=\"0.45\"").count(), 2);
    }

    #[test]
    fn render_refuses_records_without_ceilings() {
        let mut r = rec("dense", "cublas", 1, 0.02);
        r.bw_gbs = 0.0;
        assert!(render(&[r]).is_err());
    }
}
