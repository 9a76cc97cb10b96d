//! `blr bench layer`: time every format and strategy of the reference layer configs on the GPU,
//! next to dense cuBLAS and the roofline measured in the same run.

use std::path::PathBuf;

use anyhow::{bail, Context};
use blr_core::cost::{reference_config, ReferenceConfig, REFERENCE_CONFIGS};
use blr_core::{FormatKind, Linear};
use blr_cuda::layers::autotune::AutotuneCache;
use blr_cuda::layers::timing::{bench, ReadFlusher};
use blr_cuda::layers::{auto_strategy, check_strategy, GpuLinear, LayerKernels, Strategy};
use blr_cuda::{bf16, Gpu};

use super::doctor::GpuArgs;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    what: What,
}

#[derive(clap::Subcommand, Debug)]
enum What {
    /// One linear layer: every format x strategy x token count of the chosen configs.
    #[command(long_about = "Benchmarks the GPU kernels.\n\n\
`blr bench layer` times one linear layer y = x W^T (bf16, fp32 accumulation) for every format \
(dense, lowrank, monarch, blast) and every strategy that applies:\n  \
unfused  cuBLAS GEMMs per block stage + simple kernels, every intermediate in memory (the \
PyTorch reference)\n  \
partial  BLAST: stage 1 writes Z transposed, tensor-core mixing writes W in the layout stage 3 \
reads; Monarch: blr's own stage-1 GEMM (wgmma on sm_90a) writes the permuted intermediate \
stage 2 reads (no permutation pass; without wgmma, for n/b > 256 cuBLAS stage 1 + a per-token \
transpose), a per-token transpose for the output; lowrank: blr's own tensor-core GEMMs\n  \
decode   T <= 16: one persistent kernel per layer (programmatic dependent launch on sm_90+), every weight streamed once with 16-byte loads\n  \
fused    BLAST, sm_90: all three stages in one kernel, a thread-block cluster per 128 tokens \
exchanging Z and W over distributed shared memory (no intermediate in DRAM)\n\
Each row shows the median time (CUDA events, L2 flushed by reads before every run, CUDA graphs \
for T <= 16), the roofline floor max(bytes/BW, FLOPs/peak) with BW and peak measured in the same \
run, the fraction of the floor reached, the speedup over dense cuBLAS at the same T, and the \
relative error of the first tokens against the CPU reference. Where some format's floor is \
under 5 us, every row is also timed as one CUDA graph over 24 weight sets of that layer (per-layer \
time; how a model runs small layers). '*' marks the strategy blr's \
heuristic picks. The fastest strategy of each (format, shape, T) is recorded in the autotune cache \
(--autotune, default ~/.cache/blr/autotune.tsv), which blr then uses instead of the heuristic.\n\n\
Examples:\n  blr bench layer\n  blr bench layer --config all --tokens 1,16,128,native\n  \
blr bench layer --config llama7b-qkvo --formats blast --tokens 1024 --json > blast.json")]
    Layer(LayerArgs),
}

/// Arguments of `blr bench layer` (also used by `blr roofline`).
#[derive(clap::Args, Debug, Clone)]
pub struct LayerArgs {
    /// Reference config(s), comma separated, or `all`: llama7b-qkvo, llama7b-gate-up,
    /// llama7b-down, llama3.2-1b-qo/gate/up/down, gpt2s-attn/fc/proj, vit-b16-qkv/fc1/fc2,
    /// dit-xl2-qkv/fc1 (shapes and ranks of BRIEF section 3).
    #[arg(long, default_value = "llama7b-qkvo")]
    pub config: String,
    /// Token counts, comma separated; `native` is the config's own sequence length.
    #[arg(long, default_value = "1,16,128,native")]
    pub tokens: String,
    /// Formats, comma separated.
    #[arg(long, default_value = "dense,lowrank,monarch,blast")]
    pub formats: String,
    /// `all` (every strategy that applies), `auto` (only blr's default choice), or a list.
    #[arg(long, default_value = "all")]
    pub strategy: String,
    /// Timed repetitions per row (median reported).
    #[arg(long, default_value_t = 30)]
    pub reps: usize,
    /// Print the records as JSON on stdout (the table goes to stderr).
    #[arg(long)]
    pub json: bool,
    /// Also write the JSON records to this file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Seed of the random weights and inputs.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Autotune cache to record the fastest strategy per (device, shape, T) in (merged with
    /// what it holds). Default: $BLR_AUTOTUNE, else ~/.cache/blr/autotune.tsv.
    #[arg(long, value_name = "FILE")]
    pub autotune: Option<PathBuf>,
    /// Do not write the autotune cache.
    #[arg(long)]
    pub no_autotune: bool,
    /// Before timing a row, time every algorithm cuBLASLt's heuristic offers for each of its
    /// GEMMs (L2 flushed) and pin the fastest; the row is timed before and after, and the
    /// pinned algorithms are kept only if the row got faster. Kept choices are written to the
    /// GEMM cache ($BLR_GEMM_CACHE, else ~/.cache/blr/gemm-algos.tsv; not with
    /// --no-autotune), which every later blr process on this device uses.
    #[arg(long)]
    pub tune_gemms: bool,
    /// Tokens per chunk of BLAST partial's first two passes (stage 1 + mixing), instead of
    /// blr's rule (experiments).
    #[arg(long, value_name = "TOKENS")]
    pub prefill_chunk: Option<usize>,
    #[command(flatten)]
    pub gpu: GpuArgs,
}

/// One benchmark row (the JSON record of issue 5, plus the ceilings and spread).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Record {
    pub device: String,
    pub config: String,
    pub m: usize,
    pub n: usize,
    pub tokens: usize,
    pub format: String,
    pub strategy: String,
    pub params: usize,
    pub ms: f64,
    pub floor_ms: f64,
    pub roofline_frac: f64,
    pub speedup_vs_dense: f64,
    pub rel_error: f64,
    /// Whether this is the strategy blr's heuristic picks for this layer and T (no cache).
    pub auto: bool,
    /// Whether this was the fastest strategy of its format for this layer and T in this run
    /// (what the autotune cache records).
    #[serde(default)]
    pub best: bool,
    pub graph: bool,
    pub p10_ms: f64,
    pub p90_ms: f64,
    pub flops: f64,
    /// Minimum bytes: 2 * (params + T * (m + n)).
    pub bytes: f64,
    /// Measured ceilings of this run.
    pub bw_gbs: f64,
    pub peak_tflops: f64,
    /// 1 for a single layer; GRAPH_SETS for a row timed as one CUDA graph running the layer
    /// over that many distinct weight sets back to back (`ms` and `floor_ms` are per layer).
    #[serde(default = "one")]
    pub layers_in_graph: usize,
}

fn one() -> usize {
    1
}

/// Layers per graph for the rows of small layers (issue 5 item 6: a layer whose floor is under
/// 5 us is launch-bound alone; a model runs it as one of many in a graph).
pub const GRAPH_SETS: usize = 24;
/// At a token count where some format's roofline floor is below this (ms), every row also gets a
/// GRAPH_SETS-layer graph row.
const SMALL_FLOOR_MS: f64 = 0.005;

pub fn run(args: Args) -> anyhow::Result<()> {
    match args.what {
        What::Layer(a) => {
            let records = collect(&a)?;
            emit(&a, &records)
        }
    }
}

fn emit(a: &LayerArgs, records: &[Record]) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(records).context("serialising the records")?;
    if let Some(path) = &a.out {
        std::fs::write(path, &text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("wrote {} records to {}", records.len(), path.display());
    }
    if a.json {
        println!("{text}");
    }
    Ok(())
}

fn parse_list<T>(
    text: &str,
    what: &str,
    parse: impl Fn(&str) -> anyhow::Result<T>,
) -> anyhow::Result<Vec<T>> {
    let items: Vec<T> = text
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| parse(s).with_context(|| format!("in --{what} '{text}'")))
        .collect::<anyhow::Result<_>>()?;
    if items.is_empty() {
        bail!("--{what} is empty");
    }
    Ok(items)
}

fn configs(text: &str) -> anyhow::Result<Vec<&'static ReferenceConfig>> {
    if text.trim() == "all" {
        return Ok(REFERENCE_CONFIGS.iter().collect());
    }
    parse_list(text, "config", |s| Ok(reference_config(s)?))
}

fn token_counts(text: &str, cfg: &ReferenceConfig) -> anyhow::Result<Vec<usize>> {
    let mut t = parse_list(text, "tokens", |s| {
        if s == "native" {
            Ok(cfg.native_tokens)
        } else {
            let v: usize = s
                .parse()
                .with_context(|| format!("'{s}' is not a token count"))?;
            if v == 0 {
                bail!("token counts must be >= 1");
            }
            Ok(v)
        }
    })?;
    t.sort_unstable();
    t.dedup();
    Ok(t)
}

fn rel_error(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            return f64::INFINITY;
        }
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    (num / den.max(1e-30)).sqrt()
}

/// Rounds every factor to bf16 so the CPU reference sees exactly the GPU's weights.
fn bf16_rounded(layer: &Linear) -> anyhow::Result<Linear> {
    let factors = layer
        .factors()
        .into_iter()
        .map(|(_, _, v)| v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
        .collect();
    Ok(Linear::from_factors(&layer.shape(), factors)?)
}

/// Runs the benchmark and prints the table to stderr; returns the records.
pub fn collect(a: &LayerArgs) -> anyhow::Result<Vec<Record>> {
    let cfgs = configs(&a.config)?;
    let formats = parse_list(&a.formats, "formats", |s| Ok(s.parse::<FormatKind>()?))?;
    let fixed: Option<Vec<Strategy>> = match a.strategy.trim() {
        "all" | "auto" => None,
        s => Some(parse_list(s, "strategy", |x| Ok(x.parse::<Strategy>()?))?),
    };
    let only_auto = a.strategy.trim() == "auto";

    let gpu = Gpu::new(a.gpu.options()).context("opening the GPU")?;
    let kernels = LayerKernels::load(&gpu).context("compiling the layer kernels")?;
    let mut flusher = ReadFlusher::new(&gpu)?;
    let ceil = blr_cuda::ceilings::measure_default(&gpu, 10).context("measuring the ceilings")?;
    let (bw, peak) = (ceil.copy_gbs * 1e9, ceil.gemm_tflops * 1e12);
    let info = gpu.info().clone();
    eprintln!(
        "device {} ({}, {} SMs, L2 {}) | measured: copy {:.0} GB/s, bf16 GEMM {:.0} TFLOP/s",
        info.name, info.arch, info.sm_count, info.l2_cache, ceil.copy_gbs, ceil.gemm_tflops
    );
    {
        let (n, problem) = gpu.blas()?.gemm_cache_status();
        let path = blr_cuda::gemm::gemm_cache_path()
            .map_or_else(|| "off".to_string(), |p| p.display().to_string());
        eprintln!("gemm cache: {n} measured cuBLASLt choices for this device ({path})");
        if let Some(p) = problem {
            eprintln!("gemm cache: {p}");
        }
    }
    eprintln!(
        "{:<18} {:>5} {:<8} {:<9} {:>9} {:>9} {:>6} {:>8} {:>9}",
        "config", "T", "format", "strategy", "ms", "floor_ms", "frac", "vs_dense", "rel_err"
    );

    let mut records: Vec<Record> = Vec::new();
    let mut tuned = AutotuneCache::default();
    let mut seed = a.seed;
    for cfg in cfgs {
        let tokens = token_counts(&a.tokens, cfg)?;
        let t_max = tokens.iter().copied().max().unwrap_or(1);
        let (m, n) = (cfg.m, cfg.n);
        seed += 1;
        let x_host: Vec<f32> = blr_core::rng::Rng::new(seed)
            .normal_vec(t_max * n, 1.0)
            .into_iter()
            .map(|v| bf16::from_f32(v).to_f32())
            .collect();
        let xd = gpu.upload_bf16(&x_host, "benchmark input")?;
        let mut yd = gpu.alloc::<bf16>(t_max * m, "benchmark output")?;
        // The first `check_t` tokens are compared against the CPU reference.
        let check_t = t_max.min(8);
        let mut dense_ms = vec![f64::NAN; tokens.len()];
        let mut dense24_ms = vec![f64::NAN; tokens.len()];
        // Token counts at which some format's floor is under SMALL_FLOOR_MS: every format
        // (dense included, for the speedup) then also gets the graph-of-GRAPH_SETS row.
        let floor_of = |shape: &blr_core::format::Shape, t: usize| {
            let bytes = 2.0 * (shape.params() as f64 + (t * (m + n)) as f64);
            (bytes / bw).max(blr_core::cost::flops(shape, t) / peak) * 1e3
        };
        let small: Vec<bool> = tokens
            .iter()
            .map(|&t| {
                formats
                    .iter()
                    .any(|&f| floor_of(&cfg.shape(f), t) < SMALL_FLOOR_MS)
            })
            .collect();
        for &format in &formats {
            let shape = cfg.shape(format);
            seed += 1;
            let layer = bf16_rounded(
                &Linear::random(&shape, seed).with_context(|| format!("{} {format}", cfg.name))?,
            )?;
            let want = layer.forward(&x_host[..check_t * n], check_t)?;
            let dev = GpuLinear::upload(&gpu, &layer)?;
            let mut ws = dev.workspace(&gpu, t_max)?;
            ws.set_prefill_chunk(a.prefill_chunk);
            let params = shape.params();
            // GRAPH_SETS distinct weight sets of this layer, made when a small row needs them.
            let mut sets: Option<Vec<GpuLinear>> = None;
            let mut graph_rows: Vec<Record> = Vec::new();
            for (ti, &t) in tokens.iter().enumerate() {
                let group_start = records.len();
                let auto = auto_strategy(&shape, t);
                let list: Vec<Strategy> = match (&fixed, only_auto) {
                    (_, true) => vec![auto],
                    (Some(l), _) => l.clone(),
                    (None, _) => Strategy::ALL.to_vec(),
                };
                for st in list {
                    if check_strategy(&shape, st, t).is_err() {
                        continue;
                    }
                    gpu.memset_bytes(&mut yd, 0xFF)?;
                    dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, st)
                        .with_context(|| format!("{} {format} {st} T={t}", cfg.name))?;
                    let got = gpu.download_f32(&yd)?;
                    let rows = t.min(check_t);
                    let err = rel_error(&got[..rows * m], &want[..rows * m]);
                    if a.tune_gemms {
                        let blas = gpu.blas()?;
                        let run_row = |ws: &mut _, yd: &mut _, flusher: &mut _| {
                            bench(&gpu, flusher, a.reps, t <= 16, || {
                                dev.forward(&gpu, &kernels, &xd, t, yd, ws, st)
                            })
                        };
                        let before = run_row(&mut ws, &mut yd, &mut flusher)?.stats.median_ms;
                        let mark = blas.tuned_len();
                        ws.set_tuning(true);
                        dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, st)?;
                        let rep: Vec<String> = ws
                            .tune_reports()
                            .iter()
                            .map(|(h, b)| format!("{:.4}->{:.4}", h, b))
                            .collect();
                        ws.set_tuning(false);
                        let after = run_row(&mut ws, &mut yd, &mut flusher)?.stats.median_ms;
                        // Keep the pinned algorithms only where the layer itself got faster
                        // (by more than 2%, above the run-to-run spread of these rows).
                        let keep = after < 0.98 * before;
                        if !keep {
                            blas.discard_tuned_since(mark);
                        }
                        eprintln!(
                            "  tuned {} {format} {st} T={t}: GEMMs {} (ms, heuristic->best, L2 flushed); layer {:.4} -> {:.4} ms: {}",
                            cfg.name,
                            rep.join(" "),
                            before,
                            after,
                            if keep { "kept" } else { "discarded" }
                        );
                    }
                    let timed = bench(&gpu, &mut flusher, a.reps, t <= 16, || {
                        dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, st)
                    })?;
                    let ms = timed.stats.median_ms;
                    let flops = blr_core::cost::flops(&shape, t);
                    let bytes = 2.0 * (params as f64 + (t * (m + n)) as f64);
                    let floor_ms = floor_of(&shape, t);
                    let strategy = if format == FormatKind::Dense {
                        "cublas".to_string()
                    } else {
                        st.name().to_string()
                    };
                    if format == FormatKind::Dense {
                        dense_ms[ti] = ms;
                    }
                    let rec = Record {
                        device: info.name.clone(),
                        config: cfg.name.to_string(),
                        m,
                        n,
                        tokens: t,
                        format: format.name().to_string(),
                        strategy,
                        params,
                        ms,
                        floor_ms,
                        roofline_frac: floor_ms / ms,
                        speedup_vs_dense: dense_ms[ti] / ms,
                        rel_error: err,
                        auto: st == auto,
                        best: false,
                        graph: timed.graph,
                        p10_ms: timed.stats.p10_ms,
                        p90_ms: timed.stats.p90_ms,
                        flops,
                        bytes,
                        bw_gbs: ceil.copy_gbs,
                        peak_tflops: ceil.gemm_tflops,
                        layers_in_graph: 1,
                    };
                    eprintln!(
                        "{:<18} {:>5} {:<8} {:<9} {:>9.4} {:>9.4} {:>6.2} {:>7.2}x {:>9.2e}{}{}",
                        rec.config,
                        t,
                        rec.format,
                        rec.strategy,
                        ms,
                        floor_ms,
                        rec.roofline_frac,
                        rec.speedup_vs_dense,
                        err,
                        if rec.auto { " *" } else { "" },
                        if err > 2e-2 {
                            "  <-- ERROR ABOVE BF16 NORMS"
                        } else {
                            ""
                        }
                    );
                    if small[ti] {
                        if sets.is_none() {
                            let mut v = Vec::with_capacity(GRAPH_SETS);
                            for i in 0..GRAPH_SETS {
                                let l = Linear::random(&shape, seed * 1000 + i as u64)?;
                                v.push(GpuLinear::upload(&gpu, &l)?);
                            }
                            sets = Some(v);
                        }
                        let layers = sets.as_deref().unwrap_or(&[]);
                        let timed = bench(&gpu, &mut flusher, a.reps, true, || {
                            for l in layers {
                                l.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, st)?;
                            }
                            Ok(())
                        })?;
                        let per = timed.stats.median_ms / GRAPH_SETS as f64;
                        let mut g = rec.clone();
                        g.ms = per;
                        g.roofline_frac = floor_ms / per;
                        g.p10_ms = timed.stats.p10_ms / GRAPH_SETS as f64;
                        g.p90_ms = timed.stats.p90_ms / GRAPH_SETS as f64;
                        g.graph = timed.graph;
                        g.auto = rec.auto;
                        g.layers_in_graph = GRAPH_SETS;
                        if format == FormatKind::Dense {
                            dense24_ms[ti] = per;
                        }
                        g.speedup_vs_dense = dense24_ms[ti] / per;
                        eprintln!(
                            "{:<18} {:>5} {:<8} {:<9} {:>9.4} {:>9.4} {:>6.2} {:>7.2}x  (per layer, graph of {GRAPH_SETS} weight sets)",
                            g.config,
                            t,
                            g.format,
                            g.strategy,
                            g.ms,
                            g.floor_ms,
                            g.roofline_frac,
                            g.speedup_vs_dense
                        );
                        graph_rows.push(g);
                    }
                    records.push(rec);
                }
                let group = &mut records[group_start..];
                if let Some(bi) = group
                    .iter()
                    .enumerate()
                    .min_by(|a, b| a.1.ms.total_cmp(&b.1.ms))
                    .map(|(i, _)| i)
                {
                    group[bi].best = true;
                    if format != FormatKind::Dense {
                        if let Ok(st) = group[bi].strategy.parse::<Strategy>() {
                            tuned.insert(&info.name, &shape, t, st);
                        }
                    }
                }
            }
            records.extend(graph_rows);
        }
    }
    if a.tune_gemms && !a.no_autotune {
        match blr_cuda::gemm::gemm_cache_path() {
            Some(path) => {
                let n = gpu.blas()?.save_tuned(&path)?;
                eprintln!(
                    "gemm cache: {n} measured cuBLASLt choices recorded in {}",
                    path.display()
                );
            }
            None => eprintln!("gemm cache: off (BLR_GEMM_CACHE=off or no HOME); not saved"),
        }
    }
    if !a.no_autotune {
        match a.autotune.clone().or_else(AutotuneCache::default_path) {
            Some(path) => {
                let mut cache = AutotuneCache::load(&path)?;
                let added = tuned.entries.len();
                cache.entries.extend(tuned.entries);
                cache.save(&path)?;
                eprintln!(
                    "autotune: {added} measured choices recorded in {} ({} entries)",
                    path.display(),
                    cache.entries.len()
                );
            }
            None => eprintln!("autotune: no cache location (set BLR_AUTOTUNE or HOME); not saved"),
        }
    }
    let bad: Vec<String> = records
        .iter()
        .filter(|r| r.rel_error.is_nan() || r.rel_error > 2e-2)
        .map(|r| format!("{} {} {} T={}", r.config, r.format, r.strategy, r.tokens))
        .collect();
    if !bad.is_empty() {
        emit(a, &records)?;
        bail!(
            "relative error above 2e-2 (bf16 norms) in: {}",
            bad.join(", ")
        );
    }
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_lists_resolve_native_and_reject_zero() {
        let cfg = reference_config("llama7b-qkvo").expect("known config");
        let t = token_counts("16,1,native,16", cfg).expect("valid list");
        assert_eq!(t, vec![1, 16, cfg.native_tokens]);
        assert!(token_counts("0", cfg).is_err());
        assert!(token_counts("x", cfg).is_err());
        assert!(token_counts("", cfg).is_err());
    }

    #[test]
    fn config_lists() {
        assert_eq!(configs("all").expect("all").len(), REFERENCE_CONFIGS.len());
        assert_eq!(configs("llama7b-qkvo, llama7b-down").expect("two").len(), 2);
        assert!(configs("llama7b-qkvo,nope").is_err());
    }

    #[test]
    fn rel_error_flags_nan_and_measures_difference() {
        assert_eq!(rel_error(&[1.0, 2.0], &[1.0, 2.0]), 0.0);
        assert!(rel_error(&[f32::NAN, 2.0], &[1.0, 2.0]).is_infinite());
        let e = rel_error(&[1.1, 2.0], &[1.0, 2.0]);
        assert!((e - 0.1 / 5f64.sqrt()).abs() < 1e-6);
    }
}
