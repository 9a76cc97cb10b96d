//! `blr e2e`: end-to-end Llama timing on the GPU (CUDA backend), dense against BLAST, at a
//! published shape with random weights: prefill of `--prefill` tokens and single-token decode
//! steps over the KV cache, each including the download of the last logits row (what
//! generation needs for sampling on the host).
//!
//! A Llama-7B-shape model does not fit one device call's transfer limit as a file, and a full
//! 32-layer random model takes minutes to generate on the host, so the stack is measured at two
//! depths: the difference gives the time of one transformer block, and
//! `t(d_min) + (layers - d_min) * per_block` the full model (embedding, final norm and LM head
//! counted once, in `t(d_min)`).

use std::time::Instant;

use anyhow::{bail, Context};
use blr_core::format::{FormatKind, Shape};
use blr_core::rng::Rng;
use blr_core::Linear;
use blr_models::backend::Backend;
use blr_models::cuda::Cuda;
use blr_models::llama::{self, Llama, LlamaConfig};
use blr_models::lm::{BackendLm, CausalLm};

use crate::cmd::doctor::GpuArgs;

#[derive(clap::Args)]
#[command(after_long_help = "\
Times a Llama-shape model on the GPU end to end with random weights: dense layers against the \
same model with every block's linear layers replaced by BLAST layers (b blocks per side; \
attention projections at --rank-attn, MLP at --rank-mlp; the LM head stays dense). Prefill: \
median wall time of --reps runs of --prefill tokens from an empty cache. Decode: median wall \
time per token of --decode single-token steps after that prefill. Both include the download \
of the last logits row.\n\n\
Two depths (--depths, e.g. 1,4) give the time per block and an estimate of the full model.\n\n\
Example (Llama-7B shape, BRIEF section 3 ranks):\n  \
blr e2e --shape llama7b --depths 1,4 --prefill 1024 --decode 32 --json e2e.json")]
pub struct Args {
    /// Named Llama shape (llama7b, llama3.2-1b, smollm2-135m).
    #[arg(long, default_value = "llama7b")]
    shape: String,
    /// Numbers of transformer blocks to build and time (two or more give a per-block time).
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    depths: Vec<usize>,
    /// Formats to compare: dense, blast.
    #[arg(long, value_delimiter = ',', default_value = "dense,blast")]
    formats: Vec<String>,
    /// BLAST blocks per side.
    #[arg(long, default_value_t = 16)]
    blocks: usize,
    /// BLAST rank of q/k/v/o.
    #[arg(long, default_value_t = 1024)]
    rank_attn: usize,
    /// BLAST rank of gate/up/down.
    #[arg(long, default_value_t = 1488)]
    rank_mlp: usize,
    /// Prompt tokens.
    #[arg(long, default_value_t = 1024)]
    prefill: usize,
    /// Decode steps timed (after 3 untimed ones).
    #[arg(long, default_value_t = 32)]
    decode: usize,
    /// Prefill repetitions (after one untimed warm-up).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// Force a layer strategy (unfused, partial, decode) where it applies.
    #[arg(long)]
    strategy: Option<String>,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    #[command(flatten)]
    gpu: GpuArgs,
}

#[derive(Debug, Clone, serde::Serialize)]
struct Row {
    format: String,
    depth: usize,
    prefill_tokens: usize,
    prefill_ms: f64,
    prefill_tokens_per_s: f64,
    decode_ms_per_token: f64,
    decode_tokens_per_s: f64,
    /// One decode step captured as a CUDA graph and replayed (device time per step, no host
    /// launch overhead, logits left on the device); `None` when capture failed (see
    /// `graph_error`).
    decode_graph_ms_per_token: Option<f64>,
    graph_error: Option<String>,
    linear_params: usize,
    peak_gpu_mem_bytes: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// Replaces every block linear layer of `ck` by a random BLAST layer of the same shape.
fn to_blast(ck: &mut blr_core::checkpoint::Checkpoint, a: &Args) -> anyhow::Result<()> {
    for (i, (name, layer)) in ck.layers.iter_mut().enumerate() {
        if !name.starts_with("model.layers.") {
            continue;
        }
        let s = layer.shape();
        let rank = if name.contains(".mlp.") {
            a.rank_mlp
        } else {
            a.rank_attn
        };
        let shape = Shape {
            format: FormatKind::Blast,
            m: s.m,
            n: s.n,
            b_out: a.blocks,
            b_in: a.blocks,
            rank,
        };
        *layer = Linear::random(&shape, 1000 + i as u64)
            .with_context(|| format!("BLAST layer for {name}"))?;
    }
    Ok(())
}

fn measure(
    cuda: &Cuda,
    cfg: &LlamaConfig,
    ck: blr_core::checkpoint::Checkpoint,
    format: &str,
    a: &Args,
) -> anyhow::Result<Row> {
    let linear_params: usize = ck
        .layers
        .iter()
        .filter(|(n, _)| n.starts_with("model.layers."))
        .map(|(_, l)| l.params())
        .sum();
    let depth = cfg.layers;
    let model = Llama::load(cuda.clone(), cfg.clone(), ck)?;
    let mut rng = Rng::new(7);
    let ids: Vec<u32> = (0..a.prefill)
        .map(|_| rng.below(cfg.vocab_size) as u32)
        .collect();
    let mut cache = model.new_cache(a.prefill + a.decode + 8)?;
    let b = model.backend();
    let mut prefill = Vec::new();
    for rep in 0..=a.reps.max(1) {
        model.clear_cache(&mut cache);
        cuda.synchronize()?;
        let t0 = Instant::now();
        let logits = model.forward_device(&ids, &mut cache, false)?;
        let host = b.download(&logits)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        if host.iter().any(|v| v.is_nan()) {
            bail!("{format} depth {depth}: prefill logits contain NaN");
        }
        if rep > 0 {
            prefill.push(ms);
        }
    }
    let mut decode = Vec::new();
    let mut next = ids.last().copied().unwrap_or(0);
    for step in 0..a.decode + 3 {
        let t0 = Instant::now();
        let logits = model.forward_device(&[next], &mut cache, false)?;
        let host = b.download(&logits)?;
        let ms = t0.elapsed().as_secs_f64() * 1e3;
        next = blr_models::lm::argmax(&host) % cfg.vocab_size as u32;
        if step >= 3 {
            decode.push(ms);
        }
    }
    let (graph_ms, graph_error) = match decode_graph(cuda, &model, &mut cache, next, 50) {
        Ok(ms) => (Some(ms), None),
        Err(e) => (None, Some(format!("{e:#}"))),
    };
    let (p, d) = (median(prefill), median(decode));
    Ok(Row {
        format: format.to_string(),
        depth,
        prefill_tokens: a.prefill,
        prefill_ms: p,
        prefill_tokens_per_s: a.prefill as f64 / p * 1e3,
        decode_ms_per_token: d,
        decode_tokens_per_s: 1e3 / d,
        decode_graph_ms_per_token: graph_ms,
        graph_error,
        linear_params,
        peak_gpu_mem_bytes: cuda.gpu().mem_usage().peak.0,
    })
}

/// Captures one decode step (token `id` at the cache's current length) as a CUDA graph and
/// returns the mean device time of `reps` replays. Replaying is idempotent: every
/// replay writes the same K/V row at the same position and attends over the same keys, which
/// is the work of one decode step at that position.
fn decode_graph(
    cuda: &Cuda,
    model: &Llama<Cuda>,
    cache: &mut blr_models::lm::KvCaches<Cuda>,
    id: u32,
    reps: usize,
) -> anyhow::Result<f64> {
    let gpu = cuda.gpu();
    let mut failed = None;
    let graph = gpu.capture(|| {
        if let Err(e) = model.forward_device(&[id], cache, false) {
            failed = Some(e);
        }
        Ok(())
    });
    if let Some(e) = failed {
        return Err(e).context("running the decode step under capture");
    }
    let graph = graph.context("capturing a decode step")?;
    graph.upload()?;
    for _ in 0..3 {
        graph.replay()?;
    }
    cuda.synchronize()?;
    let ms = gpu.time_ms(|| {
        for _ in 0..reps {
            graph.replay()?;
        }
        Ok(())
    })?;
    Ok(ms / reps.max(1) as f64)
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let base = LlamaConfig::named(&a.shape)
        .with_context(|| format!("unknown shape '{}' (known: {})", a.shape, llama::NAMED))?;
    let mut depths = a.depths.clone();
    depths.sort_unstable();
    depths.dedup();
    if depths.is_empty() || depths[0] == 0 {
        bail!("--depths needs positive block counts, e.g. 1,4");
    }
    for f in &a.formats {
        if f != "dense" && f != "blast" {
            bail!("unknown format '{f}' (dense, blast)");
        }
    }
    let strategy = a
        .strategy
        .as_deref()
        .map(str::parse::<blr_cuda::layers::Strategy>)
        .transpose()?;
    let cuda =
        Cuda::with_strategy(a.gpu.options(), strategy).context("opening the CUDA backend")?;
    println!("device: {}", cuda.name());
    let mut rows = Vec::new();
    for &depth in &depths {
        let (cfg, ck) = llama::random(&base, 0, Some(depth))?;
        for f in &a.formats {
            let mut ck = ck.clone();
            if f == "blast" {
                to_blast(&mut ck, &a)?;
            }
            let row = measure(&cuda, &cfg, ck, f, &a)?;
            let graph = match (&row.decode_graph_ms_per_token, &row.graph_error) {
                (Some(ms), _) => format!("{ms:.3} ms/token"),
                (None, Some(e)) => format!("failed: {e}"),
                (None, None) => "-".into(),
            };
            println!(
                "{:<6} depth {:>2}: prefill {:>8.2} ms ({:>8.0} tok/s)  decode {:>7.3} ms/token ({:>6.1} tok/s)  decode as graph {graph}",
                row.format,
                row.depth,
                row.prefill_ms,
                row.prefill_tokens_per_s,
                row.decode_ms_per_token,
                row.decode_tokens_per_s
            );
            rows.push(row);
        }
    }
    // Per block and full-model estimates from the smallest and largest depth.
    let mut derived = Vec::new();
    if depths.len() >= 2 {
        let (d0, d1) = (depths[0], depths[depths.len() - 1]);
        for f in &a.formats {
            let get = |d: usize| rows.iter().find(|r| &r.format == f && r.depth == d);
            if let (Some(r0), Some(r1)) = (get(d0), get(d1)) {
                let span = (d1 - d0) as f64;
                let pb = (r1.prefill_ms - r0.prefill_ms) / span;
                let db = (r1.decode_ms_per_token - r0.decode_ms_per_token) / span;
                let gb = match (r0.decode_graph_ms_per_token, r1.decode_graph_ms_per_token) {
                    (Some(g0), Some(g1)) => Some((g1 - g0) / span),
                    _ => None,
                };
                let g_full = match (r0.decode_graph_ms_per_token, gb) {
                    (Some(g0), Some(gb)) => Some(g0 + base.layers.saturating_sub(d0) as f64 * gb),
                    _ => None,
                };
                let full = base.layers.saturating_sub(d0) as f64;
                derived.push(serde_json::json!({
                    "format": f,
                    "prefill_ms_per_block": pb,
                    "decode_ms_per_block": db,
                    "full_layers": base.layers,
                    "full_prefill_ms_estimate": r0.prefill_ms + full * pb,
                    "full_decode_ms_per_token_estimate": r0.decode_ms_per_token + full * db,
                    "decode_graph_ms_per_block": gb,
                    "full_decode_graph_ms_per_token_estimate": g_full,
                }));
            }
        }
        let field = |f: &str, k: &str| {
            derived
                .iter()
                .find(|d| d["format"] == f)
                .and_then(|d| d[k].as_f64())
        };
        println!("per block and {}-layer estimate:", base.layers);
        for d in &derived {
            println!(
                "{:<6} per block: prefill {:.3} ms, decode {:.4} ms/token; {} layers: prefill {:.1} ms, decode {:.3} ms/token",
                d["format"].as_str().unwrap_or(""),
                d["prefill_ms_per_block"].as_f64().unwrap_or(f64::NAN),
                d["decode_ms_per_block"].as_f64().unwrap_or(f64::NAN),
                base.layers,
                d["full_prefill_ms_estimate"].as_f64().unwrap_or(f64::NAN),
                d["full_decode_ms_per_token_estimate"].as_f64().unwrap_or(f64::NAN),
            );
        }
        for (k, what) in [
            ("prefill_ms_per_block", "prefill per block"),
            ("decode_ms_per_block", "decode per block"),
            ("full_prefill_ms_estimate", "prefill, full model"),
            ("full_decode_ms_per_token_estimate", "decode, full model"),
            (
                "decode_graph_ms_per_block",
                "decode as CUDA graph, per block",
            ),
            (
                "full_decode_graph_ms_per_token_estimate",
                "decode as CUDA graph, full model",
            ),
        ] {
            if let (Some(dn), Some(bl)) = (field("dense", k), field("blast", k)) {
                println!("speedup BLAST vs dense, {what}: {:.2}x", dn / bl);
            }
        }
    }
    if let Some(path) = &a.json {
        let out = serde_json::json!({
            "device": cuda.name(),
            "shape": a.shape,
            "blast": {"blocks": a.blocks, "rank_attn": a.rank_attn, "rank_mlp": a.rank_mlp},
            "strategy": a.strategy,
            "prefill_tokens": a.prefill,
            "decode_steps": a.decode,
            "reps": a.reps,
            "rows": rows,
            "derived": derived,
        });
        std::fs::write(path, serde_json::to_string_pretty(&out)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
