//! `blr compress`: a whole model into BLR form, optionally calibrated on text.

use crate::compress::calibrate::{fingerprint, Recording};
use crate::compress::device::{CalibDevice, CudaGrams, GramOps, HostGrams};
use crate::compress::plan::{self, LayerPlan, Sizing};
use crate::compress::sequential::{HookInput, Twin};
use crate::compress::weights::OutputWeightRules;
use crate::table::{bytes, si, Table};
use anyhow::{bail, Context, Result};
use blr_compress::{
    allocate, corrected_target, curve_candidates, lowrank_and_curve, lowrank_error_curve,
    monarch_error_curve, relative_error, weighted_fit, BlastInit, BlastOptions, Calibration,
    CrossGram, CurveRange, Gram, MonarchOptions, OutputWeights, Progress, Target,
};
use blr_core::format::{FormatKind, Shape};
use blr_core::safetensors::Dtype;
use blr_core::Linear;
use blr_models::backend::Backend;
use blr_models::cpu::Cpu;
use blr_models::llama::Llama;
use blr_models::lm::{BackendLm, CausalLm};
use blr_models::loader::{self, LoadedLlama};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use regex::Regex;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

/// Compress a model's linear layers into low-rank, Monarch or BLAST form and write a blr
/// checkpoint (atomically: an interrupted run leaves no output file).
///
/// Choose the sizes one of three ways:
///   --ratio 0.5            every transformer-block linear layer at 50% of its parameters
///                          (with --calibrate, ranks are re-allocated across layers under the
///                          same total budget by each layer type's measured effect on the
///                          model's output, some layers kept dense: see --allocation)
///   --preset llama7b       the published per-layer settings (see --list-presets)
///   --config layers.toml   your own rules:
///                            [[rule]]
///                            layers = 'mlp\.(gate|up)_proj$'   # regex on layer names
///                            format = "blast"                  # or monarch, lowrank, dense
///                            blocks = 16                       # optional (auto otherwise)
///                            rank = 96                         # or ratio = 0.5
///
/// Calibration (--calibrate TEXT) runs the dense model over the text, accumulates each layer's
/// input Gram matrix X X^T, and minimises ||(W - Ŵ) X|| instead of ||W - Ŵ||: much better
/// accuracy at the same size.
///
/// Examples:
///   blr compress --model smollm2 --out smol-blast.safetensors --format blast --ratio 0.7 \
///       --calibrate data/wikitext-2/valid.txt --calib-tokens 4096
///   blr compress --model llama.gguf --out l.safetensors --preset llama7b --format monarch
#[derive(clap::Args, Clone)]
#[command(verbatim_doc_comment)]
pub struct Args {
    /// Source model: `smollm2` (fetched by scripts/fetch-smollm2.sh), a Llama .gguf, a blr
    /// checkpoint, or random:NAME[:LAYERS].
    #[arg(long, short = 'm')]
    pub model: String,
    /// Output blr checkpoint (.safetensors).
    #[arg(long, short = 'o')]
    pub out: PathBuf,
    /// Target format.
    #[arg(long, default_value = "blast")]
    pub format: FormatKind,
    /// Fraction of each layer's dense parameters to keep.
    #[arg(long, conflicts_with_all = ["preset", "config"])]
    pub ratio: Option<f64>,
    /// A built-in per-layer preset (see --list-presets).
    #[arg(long, conflicts_with = "config")]
    pub preset: Option<String>,
    /// A TOML file of per-layer rules.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Blocks per side for Monarch/BLAST (default: the largest of 16, 12, 9, 8, ... dividing
    /// both dimensions of each layer).
    #[arg(long, short = 'b')]
    pub blocks: Option<usize>,
    /// Only compress layers whose name matches this regex (others stay dense).
    #[arg(long)]
    pub layers: Option<String>,
    /// Calibration text (plain UTF-8, e.g. data/wikitext-2/valid.txt).
    #[arg(long)]
    pub calibrate: Option<PathBuf>,
    /// Calibration tokens to run through the model [default: 16384 when calibration runs on a
    /// GPU, 4096 on the CPU]. More tokens estimate the correction better: 16384 with
    /// --correction-ridge 0.1 took SmolLM2 BLAST at 70% from perplexity 86.5 to 65.1 (30
    /// iterations, CPU) and from 58.6 to 49.1 (300 iterations on an H100; docs/accuracy.md),
    /// for ~1.3-3x the compression time on a CPU and little on a GPU. Calibration memory grows
    /// with the tokens (activations and KV caches of every window are held at once).
    #[arg(long)]
    pub calib_tokens: Option<usize>,
    /// Ridge added to the calibration Gram, relative to its mean eigenvalue: small trusts the
    /// calibration text, large moves towards the data-free fit.
    #[arg(long, default_value_t = Calibration::DEFAULT_DAMPING)]
    pub calib_damping: f64,
    /// Context window of the calibration forward passes.
    #[arg(long, default_value_t = 512)]
    pub calib_ctx: usize,
    /// Where the calibration forward passes run and the Grams X X^T (and, corrected, the
    /// cross statistics) are summed: auto (the GPU when the CUDA backend opens, else the CPU),
    /// cpu (f32 forwards, f64 sums on the host: the reference), or cuda (bf16 forwards with fp32
    /// accumulation, fp32 GEMM chunks summed in f64 on the device; an error without a GPU).
    /// Factorizations run where --device says.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub calib_device: String,
    /// How layers see calibration text: `independent` (every layer fitted to the dense
    /// model's activations), `sequential` (in model order, each layer fitted to the
    /// activations of the model compressed so far), `corrected` (sequential, and each layer's
    /// target corrected so its output tracks the dense model's: min ||W X - Ŵ X'||).
    #[arg(long, default_value = "corrected", value_parser = ["independent", "sequential", "corrected"])]
    pub calib_mode: String,
    /// `corrected` mode: ridge pulling each layer's corrected target towards its weight,
    /// relative to the Gram's mean eigenvalue (large: plain sequential; small: the full
    /// least-squares correction, which overfits short calibration texts) [default: 0.1 with
    /// 16384 or more calibration tokens, else 1; the best measured values, docs/accuracy.md].
    #[arg(long)]
    pub correction_ridge: Option<f64>,
    /// With --calibrate: weight a layer's output channels by how much their error costs
    /// downstream, in the fit (min ||D^1/2 (W - Ŵ) X||) and in the rank allocation. `auto`:
    /// up_proj channels by E[silu(gate)^2] on the calibration text (up's output is multiplied
    /// by silu(gate) before down_proj), other layers unweighted. `all`: also gate_proj by
    /// E[(up * silu'(gate))^2] and v_proj by the squared norms of the o_proj columns it feeds.
    /// `none`: every output channel counts the same. SmolLM2, 70%, perplexity: low-rank
    /// none 90.1, all 82.0, auto 78.8; BLAST (30 iterations) none 85.4, all 79.5, auto 76.7
    /// (docs/compression.md).
    #[arg(long, default_value = "auto", value_parser = ["auto", "all", "none"])]
    pub output_weights: String,
    /// Exponent applied to the output-weight statistics (0: unweighted, 1: the statistics as
    /// measured; smaller values temper channels with extreme weights).
    #[arg(long, default_value_t = 1.0)]
    pub output_weight_alpha: f64,
    /// With --calibrate and --ratio, how ranks are spent across layers under the total
    /// budget of the ratio. `sensitivity`: the layers are grouped by type and depth
    /// (--sensitivity-groups), each group is replaced alone by its calibrated low-rank fit and
    /// the KL divergence from the dense model is measured on --sensitivity-tokens calibration
    /// tokens (one forward pass per group); the allocation then minimises the sum over layers
    /// of sensitivity x calibrated error over ranks from 1/4 to 4x the uniform rank, and keeps
    /// a layer dense where that pays. `error`: minimise the sum of the layers' own calibrated
    /// errors (times ||W||^2), ranks within 1/2 to 2x of the uniform rank. `uniform`: every
    /// layer at the ratio's rank. SmolLM2 perplexity (CPU, 30 iterations; docs/accuracy.md):
    /// low-rank 70% uniform 79.9, error 78.8, sensitivity 70.2; low-rank 85% error 56.4,
    /// sensitivity 37.7; BLAST 70% error 76.7, sensitivity 69.1.
    #[arg(long, default_value = "sensitivity", value_parser = ["sensitivity", "error", "uniform"])]
    pub allocation: String,
    /// `--allocation sensitivity`: calibration tokens of each sensitivity forward pass (SmolLM2
    /// low-rank 70%: 512 -> perplexity 71.4, 1024 -> 70.8 for twice the passes' time).
    #[arg(long, default_value_t = 512)]
    pub sensitivity_tokens: usize,
    /// `--allocation sensitivity`: depth groups per layer type; from 3 on, the first and the
    /// last block are groups of their own and the blocks between are split evenly (SmolLM2:
    /// 7 types x 3 groups = 21 forward passes, plus one of the dense model; 5 groups measured
    /// no better: low-rank 70% 71.4 vs 70.2, 85% 38.1 vs 37.7).
    #[arg(long, default_value_t = 3)]
    pub sensitivity_groups: usize,
    /// Same as --allocation uniform.
    #[arg(long)]
    pub no_allocate: bool,
    /// BLAST iterations.
    #[arg(long, default_value_t = 300)]
    pub iterations: usize,
    /// BLAST initialisation: `lowrank` (start from the truncated SVD: never worse than
    /// low-rank at equal rank) or `random` (the published initialisation).
    #[arg(long, default_value = "lowrank", value_parser = ["lowrank", "random"])]
    pub blast_init: String,
    /// Where BLAST, low-rank and Monarch factorizations run: auto (the GPU when one is usable,
    /// else the CPU), cpu, or cuda (an error when no GPU is usable). Calibrated BLAST (in fp32)
    /// and the calibrated (whitened) low-rank SVD run on the GPU too; Monarch runs on the CPU
    /// with auto (its batched GPU block SVDs, data-free only, measured no faster) and on the
    /// GPU with cuda. The report says which device ran each layer.
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
    /// Storage type of the output.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Random seed (BLAST initialisation).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Print the per-layer report as JSON on stdout.
    #[arg(long)]
    pub json: bool,
    /// List the built-in presets and exit.
    #[arg(long)]
    pub list_presets: bool,
}

/// Calibration tokens when `--calib-tokens` is not given: calibration on a GPU affords 4x.
pub const CALIB_TOKENS_CPU: usize = 4096;
pub const CALIB_TOKENS_GPU: usize = 16384;

impl Args {
    /// Calibration tokens: `--calib-tokens`, else the default of the CPU path (see
    /// [`Args::resolve_calibration`] for the GPU's).
    pub fn calib_tokens(&self) -> usize {
        self.calib_tokens.unwrap_or(CALIB_TOKENS_CPU)
    }

    /// The correction ridge: `--correction-ridge`, else 0.1 with 16384 or more calibration
    /// tokens and 1 below (the best measured on SmolLM2: docs/accuracy.md).
    pub fn correction_ridge(&self) -> f64 {
        self.correction_ridge
            .unwrap_or(if self.calib_tokens() >= CALIB_TOKENS_GPU {
                0.1
            } else {
                1.0
            })
    }

    /// Fills in the calibration defaults that depend on where calibration runs.
    fn resolve_calibration(&mut self, on_gpu: bool) {
        if self.calib_tokens.is_none() {
            self.calib_tokens = Some(if on_gpu {
                CALIB_TOKENS_GPU
            } else {
                CALIB_TOKENS_CPU
            });
        }
    }
}

#[derive(serde::Serialize)]
pub struct LayerReport {
    pub name: String,
    pub format: FormatKind,
    pub m: usize,
    pub n: usize,
    pub b_out: usize,
    pub b_in: usize,
    pub rank: usize,
    pub params: usize,
    pub dense_params: usize,
    /// ||W - Ŵ||_F / ||W||_F.
    pub rel_error: f64,
    /// ||(W - Ŵ) X||_F / ||W X||_F over the calibration activations (when calibrated; with
    /// output weights D, the weighted ||D^1/2 (W - Ŵ) X||_F / ||D^1/2 W X||_F).
    pub rel_output_error: Option<f64>,
    pub seconds: f64,
    /// Where the factorization ran ("cpu", "cuda (NVIDIA H100 ...)", or "cpu (why not the GPU)").
    pub device: String,
}

#[derive(serde::Serialize)]
pub struct Report {
    pub model: String,
    pub out: String,
    pub format: FormatKind,
    pub calibrated: bool,
    pub calib_tokens: usize,
    pub layers: Vec<LayerReport>,
    pub compressed_params: usize,
    pub dense_params_of_compressed_layers: usize,
    pub model_params_before: usize,
    pub model_params_after: usize,
    pub seconds: f64,
}

/// Drives an indicatif bar from the library's progress events.
struct StageBar(ProgressBar);

impl Progress for StageBar {
    fn begin(&self, stage: &str, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(0);
        self.0.set_message(stage.to_string());
    }
    fn advance(&self, done: usize, rel_error: Option<f64>) {
        self.0.set_position(done as u64);
        if let Some(e) = rel_error {
            self.0.set_message(format!("error {e:.4}"));
        }
    }
}

fn params_of(ck: &blr_core::checkpoint::Checkpoint) -> usize {
    ck.layers.iter().map(|(_, l)| l.params()).sum::<usize>()
        + ck.tensors.values().map(|t| t.data.len()).sum::<usize>()
}

/// Takes the dense weight of layer `name` out of the checkpoint (as a layer or `name.weight`).
fn dense_weight(ck: &blr_core::checkpoint::Checkpoint, name: &str) -> Option<Vec<f32>> {
    if let Some((_, Linear::Dense(d))) = ck.layers.iter().find(|(n, _)| n == name) {
        return Some(d.weight.clone());
    }
    ck.tensors
        .get(&format!("{name}.weight"))
        .map(|t| t.data.clone())
}

/// The first `tokens` tokens of the calibration text (at least 2).
fn calibration_ids(
    loaded: &LoadedLlama,
    text_path: &std::path::Path,
    tokens: usize,
) -> Result<Vec<u32>> {
    let tok = loaded.tokenizer.as_ref().with_context(|| {
        format!(
            "{} has no tokenizer to encode the calibration text: calibrate from the .gguf model",
            loaded.source
        )
    })?;
    let text = std::fs::read_to_string(text_path)
        .with_context(|| format!("reading calibration text {}", text_path.display()))?;
    // Special tokens parsed: calibration text may hold chat-formatted samples (ChatML), which
    // the model sees with its special tokens.
    let mut ids = encode_prefix(tok, &text, tokens, true)?;
    if ids.len() < 2 {
        bail!(
            "{} holds fewer than 2 tokens: nothing to calibrate on",
            text_path.display()
        );
    }
    ids.truncate(tokens);
    Ok(ids)
}

/// Runs the dense model over the calibration tokens `ids` on `device` and returns one Gram per
/// planned layer, the output weights and the tokens used.
pub fn collect_grams(
    loaded: &LoadedLlama,
    plan: &[LayerPlan],
    ids: &[u32],
    ctx: usize,
    rules: Option<&Arc<OutputWeightRules>>,
    device: &CalibDevice,
    multi: &MultiProgress,
) -> Result<(Vec<Gram>, Vec<Option<OutputWeights>>, usize)> {
    let mut fps = Vec::with_capacity(plan.len());
    for p in plan {
        let w = dense_weight(&loaded.weights, &p.name).with_context(|| {
            format!(
                "layer {} is not dense in {}: calibrate from the dense model",
                p.name, loaded.source
            )
        })?;
        let layer = Linear::Dense(blr_core::Dense::new(p.shape.m, p.shape.n, w)?);
        fps.push((fingerprint(&layer), p.shape.n));
    }
    let (grams, sums, used) = match device {
        CalibDevice::Cpu => record_grams(
            Recording::new(Cpu, HostGrams, &fps),
            loaded,
            ids,
            ctx,
            rules,
            multi,
        )?,
        CalibDevice::Cuda(cuda) => record_grams(
            Recording::new(cuda.clone(), CudaGrams::new(cuda)?, &fps),
            loaded,
            ids,
            ctx,
            rules,
            multi,
        )?,
    };
    let mut out_weights = Vec::with_capacity(plan.len());
    for (i, p) in plan.iter().enumerate() {
        out_weights.push(match rules {
            Some(r) => r.weights(i, &p.name, sums[i].as_deref())?,
            None => None,
        });
    }
    Ok((grams, out_weights, used))
}

/// Output-weight statistic sums per planned layer (None where a layer has none).
type StatisticSums = Vec<Option<Vec<f64>>>;

/// The recording pass of [`collect_grams`] on one backend: the windows one after the other.
fn record_grams<B: Backend, G: GramOps<B>>(
    mut recording: Recording<B, G>,
    loaded: &LoadedLlama,
    ids: &[u32],
    ctx: usize,
    rules: Option<&Arc<OutputWeightRules>>,
    multi: &MultiProgress,
) -> Result<(Vec<Gram>, StatisticSums, usize)> {
    if let Some(r) = rules {
        recording = recording.with_output_statistics(Arc::clone(r));
    }
    let model = Llama::load(recording, loaded.cfg.clone(), loaded.weights.clone())?;
    let ctx = ctx.min(model.max_positions()).max(2);
    let windows: Vec<&[u32]> = ids.chunks(ctx).filter(|w| w.len() >= 2).collect();
    let bar = multi.add(ProgressBar::new(windows.len() as u64));
    bar.set_style(style("calibrating"));
    let mut cache = model.new_cache(ctx)?;
    for w in &windows {
        model.clear_cache(&mut cache);
        if let Err(e) = model.forward(w, &mut cache, false) {
            // A Gram failure is the more precise error (the forward pass only sees its echo).
            return Err(match model.backend().take_grams() {
                Err(g) => anyhow::anyhow!("accumulating calibration activations: {g}"),
                Ok(_) => anyhow::Error::new(e).context("calibration forward pass"),
            });
        }
        bar.inc(1);
    }
    bar.finish_and_clear();
    let used: usize = windows.iter().map(|w| w.len()).sum();
    let sums = model
        .backend()
        .take_output_statistics()
        .map_err(|e| anyhow::anyhow!("accumulating output-weight statistics: {e}"))?;
    let grams = model
        .backend()
        .take_grams()
        .map_err(|e| anyhow::anyhow!("accumulating calibration activations: {e}"))?;
    Ok((grams, sums, used))
}

/// Factorizes planned layer `i` to fit a weight under an optional Gram.
type FactorizeFn<'a> = dyn Fn(usize, &[f32], Option<&Gram>, Option<&OutputWeights>) -> Result<(Linear, LayerReport)>
    + 'a;
/// A factorized layer: its plan index, the layer, its report.
type Factorized = (usize, Linear, LayerReport);

/// Where the time of a sequential pass went (seconds; `--verbose` prints it).
#[derive(Debug, Default, Clone, Copy)]
struct SequentialTimes {
    /// The Grams and cross statistics (on the calibration device, downloads included).
    statistics: f64,
    /// Corrected targets and output weights (CPU).
    targets: f64,
    /// The factorizations (on the factorization device).
    factorize: f64,
    /// The whole pass; the rest is the forward passes of the two streams.
    total: f64,
}

impl std::fmt::Display for SequentialTimes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let forward = self.total - self.statistics - self.targets - self.factorize;
        write!(
            f,
            "forward passes {forward:.1}s, statistics {:.1}s, targets {:.1}s, factorizations {:.1}s",
            self.statistics, self.targets, self.factorize
        )
    }
}

/// Sequential calibration (see `compress::sequential`): one forward pass of the dense and the
/// compressed model in lockstep over the calibration tokens `ids` on `device`, factorizing each planned
/// layer in `todo` when the pass first reaches it. Returns the layers (by plan index), the tokens
/// used and where the time went.
#[allow(clippy::too_many_arguments)]
fn run_sequential(
    loaded: &LoadedLlama,
    plan: &[LayerPlan],
    todo: &[usize],
    weights: &[Vec<f32>],
    ids: &[u32],
    args: &Args,
    rules: Option<&OutputWeightRules>,
    device: &CalibDevice,
    factorize: &FactorizeFn<'_>,
) -> Result<(Vec<Factorized>, usize, SequentialTimes)> {
    let t0 = Instant::now();
    let corrected = args.calib_mode == "corrected";
    let window = args.calib_ctx.min(loaded.cfg.max_positions).max(2);
    let mut fps = Vec::with_capacity(todo.len());
    for &i in todo {
        let p = &plan[i];
        let layer = Linear::Dense(blr_core::Dense::new(
            p.shape.m,
            p.shape.n,
            weights[i].clone(),
        )?);
        fps.push(fingerprint(&layer));
    }
    let results = std::sync::Mutex::new(Vec::with_capacity(todo.len()));
    let times = std::sync::Mutex::new(SequentialTimes::default());
    let hook = |x: HookInput<'_>| -> Result<Linear> {
        let i = todo[x.slot];
        let p = &plan[i];
        let ts = Instant::now();
        let g = x.input.gram()?;
        let c: Option<Arc<CrossGram>> = if corrected {
            Some(x.input.cross()?)
        } else {
            None
        };
        let tt = Instant::now();
        let fit = match &c {
            Some(c) => corrected_target(
                &p.name,
                &weights[i],
                p.shape.m,
                p.shape.n,
                c,
                &g,
                args.correction_ridge(),
            )?,
            None => weights[i].clone(),
        };
        // Output weights from the dense stream: how much each channel matters in the model
        // the compressed one should track.
        let ow = match rules {
            Some(r) if r.needs_rows(i) => {
                r.weights_from_rows(i, &p.name, &x.input.dense_rows()?, x.tokens)?
            }
            Some(r) => r.weights(i, &p.name, None)?,
            None => None,
        };
        let tf = Instant::now();
        let (layer, report) = factorize(i, &fit, Some(&g), ow.as_ref())?;
        if let Ok(mut t) = times.lock() {
            t.statistics += (tt - ts).as_secs_f64();
            t.targets += (tf - tt).as_secs_f64();
            t.factorize += tf.elapsed().as_secs_f64();
        }
        results
            .lock()
            .map_err(|_| anyhow::anyhow!("sequential calibration: results lock poisoned"))?
            .push((i, layer.clone(), report));
        Ok(layer)
    };
    match device {
        CalibDevice::Cpu => twin_pass(
            Twin::new(Cpu, HostGrams, window, &fps, &hook),
            window,
            loaded,
            ids,
            plan,
            todo,
        )?,
        CalibDevice::Cuda(cuda) => twin_pass(
            Twin::new(cuda.clone(), CudaGrams::new(cuda)?, window, &fps, &hook),
            window,
            loaded,
            ids,
            plan,
            todo,
        )?,
    }
    let results = results
        .into_inner()
        .map_err(|_| anyhow::anyhow!("sequential calibration: results lock poisoned"))?;
    let mut times = times
        .into_inner()
        .map_err(|_| anyhow::anyhow!("sequential calibration: timer lock poisoned"))?;
    times.total = t0.elapsed().as_secs_f64();
    Ok((results, ids.len(), times))
}

/// The forward pass of [`run_sequential`] on one backend.
fn twin_pass<B: Backend, G: GramOps<B>>(
    twin: Twin<'_, B, G>,
    window: usize,
    loaded: &LoadedLlama,
    ids: &[u32],
    plan: &[LayerPlan],
    todo: &[usize],
) -> Result<()> {
    let model = Llama::load(twin, loaded.cfg.clone(), loaded.weights.clone())?;
    let mut cache = model.new_cache(window)?;
    if let Err(e) = model.forward(ids, &mut cache, false) {
        return Err(match model.backend().take_failure() {
            Some(f) => f,
            None => anyhow::Error::new(e).context("sequential calibration forward pass"),
        });
    }
    let missing = model.backend().missing();
    if let Some(&slot) = missing.first() {
        bail!(
            "sequential calibration never ran layer {} ({} layers not reached): is it used by the model?",
            plan[todo[slot]].name,
            missing.len()
        );
    }
    Ok(())
}

/// The first `tokens` tokens of `text`, encoding only as much of it as needed (a whole
/// WikiText split is ~10x more than a calibration run uses). `parse_special`: special-token
/// texts (e.g. `<|im_start|>`) become their tokens, as in a chat prompt; evaluation text is
/// encoded without (plain text, as `blr eval ppl` does).
pub fn encode_prefix(
    tok: &blr_models::tokenizer::Tokenizer,
    text: &str,
    tokens: usize,
    parse_special: bool,
) -> Result<Vec<u32>> {
    let mut bytes = (tokens * 8).max(1024);
    loop {
        let mut end = bytes.min(text.len());
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        // Cut at a line break so no word is split mid-way.
        let cut = if end < text.len() {
            text[..end].rfind('\n').map_or(end, |i| i + 1)
        } else {
            end
        };
        let ids = tok.encode(&text[..cut], parse_special)?;
        if ids.len() >= tokens || end == text.len() {
            return Ok(ids);
        }
        bytes *= 2;
    }
}

fn style(prefix: &str) -> ProgressStyle {
    ProgressStyle::with_template(&format!(
        "{prefix:>12} [{{bar:30}}] {{pos}}/{{len}} ETA {{eta}} {{msg}}"
    ))
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ")
}

/// What `--allocation sensitivity` needs besides the curves: the dense model and the
/// calibration tokens its forward passes run on.
struct SensitivityInput<'a> {
    loaded: &'a LoadedLlama,
    ids: &'a [u32],
    ctx: usize,
    depth_groups: usize,
    multi: &'a MultiProgress,
}

/// Re-spends the parameter budget of the ratio-sized layers where it reduces the (calibrated)
/// output error most, using each layer's error-vs-rank curve. Without `sensitivity` (the
/// `error` allocation) ranks move within [1/2, 2] of the uniform rank so no layer is starved
/// or bloated by a noisy curve, and errors count as `curve * ||W||^2`. With it, each layer's
/// relative error counts times its group's measured sensitivity (see
/// `compress::sensitivity`), ranks move within [1/4, 4] of the uniform rank and a layer may
/// stay dense. Returns a summary line for the log.
fn reallocate(
    plan: &mut [LayerPlan],
    weights: &[Vec<f32>],
    grams: &[Gram],
    out_weights: &[Option<OutputWeights>],
    damping: f64,
    sensitivity: Option<&SensitivityInput<'_>>,
) -> Result<String> {
    let idx: Vec<usize> = (0..plan.len()).filter(|&i| plan[i].from_ratio).collect();
    if idx.len() < 2 {
        return Ok("rank allocation: fewer than 2 ratio-sized layers, nothing to move".into());
    }
    let budget: usize = idx.iter().map(|&i| plan[i].shape.params()).sum();
    // Per layer: its curve (index = rank / step), step, ||D^1/2 W||^2, and with sensitivity
    // the probe (calibrated low-rank fit at the planned size) and its squared relative error.
    struct Curve {
        curve: Vec<f64>,
        step: usize,
        scale: f64,
        probe: Option<(Linear, f64)>,
    }
    let tc = Instant::now();
    let mut curves = Vec::with_capacity(idx.len());
    for &i in &idx {
        let p = &plan[i];
        let s = p.shape;
        let ow = out_weights.get(i).and_then(|w| w.as_ref());
        let plain = Target::new(&p.name, s.m, s.n, &weights[i])?;
        // With output weights the curve is that of the weighted problem, D^1/2 W.
        let scaled;
        let w: &[f32] = match ow {
            Some(ow) => {
                scaled = ow.scale_rows(&plain)?;
                &scaled
            }
            None => &weights[i],
        };
        let target = Target::new(&p.name, s.m, s.n, w)?;
        let calib = Calibration {
            gram: &grams[i],
            damping,
        };
        // Error of the best rank-r approximation (squared, relative); Monarch uses its own
        // blockwise curve (index = per-block rank), BLAST the low-rank curve as a proxy.
        // With sensitivity, the probe (the low-rank layer of the planned size; BLAST: of the
        // same parameters) comes from the same SVD as the low-rank curve.
        let probe_rank = (s.params() / (s.m + s.n)).clamp(1, s.m.min(s.n));
        let (lowrank_curve, probe_layer) = match sensitivity {
            Some(_) => {
                // Fitted to the weighted problem (`target`), the probe's rows unscaled back to W's.
                let (layer, curve) = lowrank_and_curve(&target, probe_rank, Some(&calib))?;
                let layer = match ow {
                    Some(ow) => ow.unscale(&p.name, layer)?,
                    None => layer,
                };
                (curve, Some(layer))
            }
            None => (lowrank_error_curve(&target, Some(&calib))?, None),
        };
        let probe = probe_layer.map(|layer| {
            let e = lowrank_curve[probe_rank.min(lowrank_curve.len() - 1)];
            (layer, e)
        });
        let (curve, step) = match s.format {
            FormatKind::Monarch => (
                monarch_error_curve(&target, s.b_out, Some(&calib))?,
                s.b_out,
            ),
            _ => (lowrank_curve, 1),
        };
        curves.push(Curve {
            curve,
            step,
            scale: w.iter().map(|&v| (v as f64) * (v as f64)).sum(),
            probe,
        });
    }
    let curve_seconds = tc.elapsed().as_secs_f64();
    let mut summary = String::new();
    let weight_of: Vec<f64> = match sensitivity {
        None => curves.iter().map(|c| c.scale).collect(),
        Some(input) => {
            let ts = Instant::now();
            let names: Vec<String> = idx.iter().map(|&i| plan[i].name.clone()).collect();
            let mut probes = Vec::with_capacity(curves.len());
            let mut errors = Vec::with_capacity(curves.len());
            for (c, name) in curves.iter_mut().zip(&names) {
                let (layer, e) = c
                    .probe
                    .take()
                    .context("sensitivity probe missing (internal error)")?;
                probes.push((name.clone(), layer));
                errors.push(e);
            }
            let groups = crate::compress::sensitivity::group_layers(&names, input.depth_groups);
            let bar = input.multi.add(ProgressBar::new(groups.len() as u64));
            bar.set_style(style("sensitivity"));
            let kl = crate::compress::sensitivity::group_divergence(
                &input.loaded.cfg,
                &input.loaded.weights,
                &probes,
                &groups,
                input.ids,
                input.ctx,
                &|_| bar.inc(1),
            )?;
            bar.finish_and_clear();
            let lambdas = crate::compress::sensitivity::lambdas(&groups, &kl, &errors);
            summary = format!(
                "sensitivity: {} groups x {} tokens in {:.1}s (KL per unit relative squared error: {})",
                groups.len(),
                input.ids.len(),
                ts.elapsed().as_secs_f64(),
                groups
                    .iter()
                    .zip(&kl)
                    .map(|(g, k)| format!("{} {:.4} (KL {k:.5})", g.label, lambdas[g.members[0]]))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            lambdas
        }
    };
    let mut options = Vec::with_capacity(idx.len());
    for ((&i, c), &weight) in idx.iter().zip(&curves).zip(&weight_of) {
        let s = plan[i].shape;
        let range = match sensitivity {
            None => CurveRange {
                lo: s.rank / 2,
                hi: s.rank * 2,
                points: 16,
                step: c.step,
                weight,
                allow_dense: false,
            },
            Some(_) => CurveRange {
                lo: s.rank / 4,
                hi: s.rank * 4,
                points: 48,
                step: c.step,
                weight,
                allow_dense: true,
            },
        };
        options.push(curve_candidates(plan[i].name.clone(), s, &c.curve, range)?);
    }
    let alloc = allocate(&options, budget)?;
    let mut kept_dense = 0;
    for (&i, c) in idx.iter().zip(&alloc.chosen) {
        let s = &mut plan[i].shape;
        if c.dense {
            *s = Shape {
                format: FormatKind::Dense,
                m: s.m,
                n: s.n,
                b_out: 1,
                b_in: 1,
                rank: s.m.min(s.n),
            };
            kept_dense += 1;
        } else {
            s.rank = c.rank;
        }
    }
    let head = format!(
        "rank allocation ({}): {} of {} parameters, {kept_dense} layers kept dense; error curves{} in {curve_seconds:.1}s",
        if sensitivity.is_some() {
            "sensitivity"
        } else {
            "error"
        },
        alloc.params,
        budget,
        if sensitivity.is_some() { " and probes" } else { "" },
    );
    Ok(if summary.is_empty() {
        head
    } else {
        format!("{head}; {summary}")
    })
}

pub fn run(args: Args) -> Result<()> {
    if args.list_presets {
        for (name, desc) in plan::PRESETS {
            println!("{name:14} {desc}");
        }
        return Ok(());
    }
    let report = compress(&args, !args.json, !args.json)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    print_summary(&report);
    Ok(())
}

/// Prints the size table and one summary line of a compression.
pub fn print_summary(report: &Report) {
    let (dense, compressed) = (
        report.dense_params_of_compressed_layers,
        report.compressed_params,
    );
    let (before, after) = (report.model_params_before, report.model_params_after);
    let mut t = Table::new(&["<", "params", "bytes (f32)", "bytes (bf16)"]);
    let row = |label: String, p: usize| {
        vec![
            label,
            si(p as f64),
            bytes(4.0 * p as f64),
            bytes(2.0 * p as f64),
        ]
    };
    t.row(row("compressed layers, dense".into(), dense));
    t.row(row(
        format!("compressed layers, {}", report.format),
        compressed,
    ));
    t.row(row("whole model, before".into(), before));
    t.row(row("whole model, after".into(), after));
    print!("{}", t.render());
    let mean_err =
        report.layers.iter().map(|l| l.rel_error).sum::<f64>() / report.layers.len().max(1) as f64;
    println!(
        "{} layers at {:.1}% of their dense parameters, mean relative weight error {:.4}; wrote {} in {:.1}s",
        report.layers.len(),
        100.0 * compressed as f64 / dense.max(1) as f64,
        mean_err,
        report.out,
        report.seconds
    );
}

/// Compresses the model as `args` says and writes the checkpoint; `log_layers` prints one line
/// per layer, `bars` draws progress bars (only when stderr is a terminal).
pub fn compress(args: &Args, log_layers: bool, bars: bool) -> Result<Report> {
    let t0 = Instant::now();
    if args.out.exists() && args.out.is_dir() {
        bail!(
            "--out {} is a directory; give a file name",
            args.out.display()
        );
    }
    let rules = match (&args.ratio, &args.preset, &args.config) {
        (Some(r), None, None) => plan::uniform_rules(args.format, args.blocks, Sizing::Ratio(*r)),
        (None, Some(p), None) => plan::preset(p, args.format)?,
        (None, None, Some(path)) => {
            let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
            plan::rules_from_toml(&text, args.format, None).with_context(|| format!("in {}", path.display()))?
        }
        _ => bail!("say how big the compressed layers should be: --ratio R, --preset NAME or --config FILE"),
    };
    let filter = args
        .layers
        .as_deref()
        .map(Regex::new)
        .transpose()
        .context("--layers is not a valid regex")?;

    let loaded = loader::load_llama(&args.model)?;
    let before = params_of(&loaded.weights);
    let linears = loaded.cfg.linear_shapes();
    let mut plan = plan::resolve(&rules, &linears, filter.as_ref())?;

    let multi = MultiProgress::new();
    if !bars {
        multi.set_draw_target(ProgressDrawTarget::hidden());
    }
    let log = |line: String| {
        if log_layers {
            if multi.is_hidden() {
                eprintln!("{line}");
            } else {
                let _ = multi.println(line);
            }
        }
    };
    log(format!(
        "{}: {} linear layers selected for {} ({})",
        loaded.source,
        plan.len(),
        args.format,
        loaded.cfg.linear_shapes().len()
    ));

    let weights: Vec<Vec<f32>> = plan
        .iter()
        .map(|p| {
            dense_weight(&loaded.weights, &p.name).with_context(|| {
                format!("layer {} is not a dense layer in {}", p.name, loaded.source)
            })
        })
        .collect::<Result<_>>()?;

    let sequential = args.calibrate.is_some() && args.calib_mode != "independent";
    let rules = match (&args.calibrate, args.output_weights.as_str()) {
        (Some(_), "auto" | "all") => {
            let layers: Vec<(String, usize, usize)> = plan
                .iter()
                .map(|p| (p.name.clone(), p.shape.m, p.shape.n))
                .collect();
            Some(Arc::new(OutputWeightRules::new(
                &loaded.cfg,
                &layers,
                |name| dense_weight(&loaded.weights, name),
                args.output_weights == "all",
                args.output_weight_alpha,
            )?))
        }
        _ => None,
    };
    let allocation = if args.no_allocate {
        "uniform"
    } else {
        args.allocation.as_str()
    };
    let allocate_ranks =
        args.calibrate.is_some() && allocation != "uniform" && args.ratio.is_some();
    // Where the calibration forward passes and their statistics run.
    let calib_device = match &args.calibrate {
        Some(_) => {
            let (d, label) = CalibDevice::pick(&args.calib_device)?;
            log(format!("calibration forward passes and Grams on {label}"));
            d
        }
        None => CalibDevice::Cpu,
    };
    let mut resolved = args.clone();
    resolved.resolve_calibration(matches!(calib_device, CalibDevice::Cuda(_)));
    let args = &resolved;
    // The calibration text, encoded once: the calibration passes run on its first
    // --calib-tokens tokens, the sensitivity passes on its first --sensitivity-tokens.
    let sensitivity_tokens = args.sensitivity_tokens.max(2);
    let encoded = match &args.calibrate {
        Some(path) => calibration_ids(&loaded, path, args.calib_tokens().max(sensitivity_tokens))?,
        None => Vec::new(),
    };
    let calib_ids = &encoded[..encoded.len().min(args.calib_tokens())];
    // The dense model's Grams: the calibration itself in independent mode, and the error
    // curves the rank allocation compares in every mode.
    let (grams, out_weights, mut calib_tokens) = match &args.calibrate {
        Some(path) if !sequential || allocate_ranks => {
            let tc = Instant::now();
            let (g, ow, used) = collect_grams(
                &loaded,
                &plan,
                calib_ids,
                args.calib_ctx,
                rules.as_ref(),
                &calib_device,
                &multi,
            )?;
            log(format!(
                "calibrated on {used} tokens of {} in {:.1}s",
                path.display(),
                tc.elapsed().as_secs_f64()
            ));
            (Some(g), ow, used)
        }
        _ => (None, Vec::new(), 0),
    };
    if let (Some(g), true) = (&grams, allocate_ranks) {
        let sensitivity = match (allocation, &args.calibrate) {
            ("sensitivity", Some(_)) => Some(SensitivityInput {
                loaded: &loaded,
                ids: &encoded[..encoded.len().min(sensitivity_tokens)],
                ctx: args.calib_ctx,
                depth_groups: args.sensitivity_groups,
                multi: &multi,
            }),
            _ => None,
        };
        let line = reallocate(
            &mut plan,
            &weights,
            g,
            &out_weights,
            args.calib_damping,
            sensitivity.as_ref(),
        )?;
        log(line);
    }

    let layer_bar = multi.add(ProgressBar::new(plan.len() as u64));
    layer_bar.set_style(style("layers"));
    let stage_bar = multi.add(ProgressBar::new(1));
    stage_bar.set_style(style("factorizing"));
    let stage = StageBar(stage_bar.clone());
    let init = if args.blast_init == "random" {
        BlastInit::Random
    } else {
        BlastInit::LowRank
    };
    let device = if plan.iter().any(|p| {
        matches!(
            p.shape.format,
            FormatKind::Blast | FormatKind::LowRank | FormatKind::Monarch
        )
    }) {
        let d = super::factorize::FactorDevice::pick(&args.device)?;
        log(format!("factorizations on {}", d.label));
        d
    } else {
        super::factorize::FactorDevice::cpu()
    };

    // Factorizes planned layer `i` to fit `fit` (the weight, or its sequential correction)
    // under the Gram `gram` of the activations it will see, and with output weights `ow` the
    // rows scaled by sqrt(d) (`weighted_fit`: the fit runs on D^1/2 fit and its output rows are
    // unscaled after, so the reported output error is that of the weighted problem).
    let factorize = |i: usize,
                     fit: &[f32],
                     gram: Option<&Gram>,
                     ow: Option<&OutputWeights>|
     -> Result<(Linear, LayerReport)> {
        let p = &plan[i];
        let s = p.shape;
        layer_bar.set_message(p.name.clone());
        let tl = Instant::now();
        let target = Target::new(&p.name, s.m, s.n, fit)?;
        let calib = gram.map(|g| Calibration {
            gram: g,
            damping: args.calib_damping,
        });
        let fit_one = |target: &Target<'_>| -> Result<(Linear, (String, Option<f64>))> {
            let mut output_error = None;
            let (layer, ran_on) = match s.format {
                FormatKind::LowRank => {
                    super::factorize::lowrank_on(&device, target, s.rank, calib.as_ref())?
                }
                FormatKind::Monarch => super::factorize::monarch_on(
                    &device,
                    target,
                    &MonarchOptions::new(s.b_out, s.rank),
                    calib.as_ref(),
                    &stage,
                )?,
                FormatKind::Blast => {
                    let mut o = BlastOptions::new(s.b_out, s.rank);
                    o.b_in = s.b_in;
                    o.iterations = args.iterations;
                    o.seed = args.seed.wrapping_add(i as u64);
                    o.init = init;
                    let (report, label) = super::factorize::blast_on(
                        &device,
                        target,
                        &o,
                        calib.as_ref(),
                        super::factorize::DEFAULT_GPU_PRECISION,
                        &stage,
                    )?;
                    // Calibrated, the report already holds ||(W - Ŵ) X|| / ||W X|| for this
                    // target and Gram (from the dense residual, on the device that ran it):
                    // recomputing it here costs 4 m n^2 f64 flops on the CPU (a TFLOP at
                    // 4096 x 11008).
                    if gram.is_some() {
                        output_error = Some(report.rel_error);
                    }
                    (report.layer, label)
                }
                FormatKind::Dense => {
                    bail!("layer {} is planned dense: nothing to factorize", p.name)
                }
            };
            let rel_output_error = match (output_error, gram) {
                (Some(e), _) => Some(e),
                (None, Some(g)) => Some(relative_error(target, &layer, Some(g))?),
                (None, None) => None,
            };
            Ok((layer, (ran_on, rel_output_error)))
        };
        let (layer, (ran_on, rel_output_error)) = weighted_fit(&target, ow, fit_one)?;
        let rel_error =
            relative_error(&Target::new(&p.name, s.m, s.n, &weights[i])?, &layer, None)?;
        let seconds = tl.elapsed().as_secs_f64();
        log(format!(
            "{:40} {:8} {:>5}x{:<5} b={:<2} r={:<5} error {:.4}{}  {:.1}s",
            p.name,
            s.format,
            s.m,
            s.n,
            s.b_out,
            s.rank,
            rel_error,
            rel_output_error
                .map(|e| format!(" (output {e:.4})"))
                .unwrap_or_default(),
            seconds
        ));
        layer_bar.inc(1);
        let report = LayerReport {
            name: p.name.clone(),
            format: s.format,
            m: s.m,
            n: s.n,
            b_out: s.b_out,
            b_in: s.b_in,
            rank: s.rank,
            params: layer.params(),
            dense_params: s.m * s.n,
            rel_error,
            rel_output_error,
            seconds,
            device: ran_on,
        };
        Ok((layer, report))
    };

    let todo: Vec<usize> = (0..plan.len())
        .filter(|&i| plan[i].shape.format != FormatKind::Dense)
        .collect();
    let mut done: Vec<Factorized> = Vec::with_capacity(todo.len());
    match (&args.calibrate, sequential) {
        (Some(path), true) => {
            let tc = Instant::now();
            let (results, used, times) = run_sequential(
                &loaded,
                &plan,
                &todo,
                &weights,
                calib_ids,
                args,
                rules.as_deref(),
                &calib_device,
                &factorize,
            )?;
            log(format!(
                "{} calibration (correction ridge {}) on {used} tokens of {} in {:.1}s ({times})",
                args.calib_mode,
                args.correction_ridge(),
                path.display(),
                tc.elapsed().as_secs_f64()
            ));
            calib_tokens = used;
            done = results;
        }
        _ => {
            for &i in &todo {
                let (layer, report) = factorize(
                    i,
                    &weights[i],
                    grams.as_ref().map(|g| &g[i]),
                    out_weights.get(i).and_then(|w| w.as_ref()),
                )?;
                done.push((i, layer, report));
            }
        }
    }

    // The loaded weights are not needed past this point: move them rather than copy a whole model.
    let mut ck = loaded.weights;
    let mut reports = Vec::with_capacity(plan.len());
    done.sort_by_key(|(i, _, _)| *i);
    for (i, layer, report) in done {
        let name = &plan[i].name;
        ck.layers.retain(|(n, _)| n != name);
        ck.tensors.remove(&format!("{name}.weight"));
        ck.layers.push((name.clone(), layer));
        reports.push((i, report));
    }
    // Layers the rank allocation kept dense count in the report at their full size, so its
    // totals compare with the budget of the ratio.
    for (i, p) in plan.iter().enumerate() {
        if p.shape.format == FormatKind::Dense {
            let s = p.shape;
            log(format!(
                "{:40} kept dense {:>5}x{:<5} (rank allocation)",
                p.name, s.m, s.n
            ));
            reports.push((
                i,
                LayerReport {
                    name: p.name.clone(),
                    format: FormatKind::Dense,
                    m: s.m,
                    n: s.n,
                    b_out: 1,
                    b_in: 1,
                    rank: s.m.min(s.n),
                    params: s.m * s.n,
                    dense_params: s.m * s.n,
                    rel_error: 0.0,
                    rel_output_error: grams.as_ref().map(|_| 0.0),
                    seconds: 0.0,
                    device: "kept dense".into(),
                },
            ));
        }
    }
    reports.sort_by_key(|(i, _)| *i);
    let reports: Vec<LayerReport> = reports.into_iter().map(|(_, r)| r).collect();
    stage_bar.finish_and_clear();
    layer_bar.finish_and_clear();

    ck.metadata
        .insert("compress.format".into(), args.format.to_string());
    ck.metadata.insert(
        "compress.calibrated".into(),
        args.calibrate.is_some().to_string(),
    );
    if allocate_ranks {
        ck.metadata
            .insert("compress.allocation".into(), allocation.to_string());
    }
    if args.calibrate.is_some() {
        ck.metadata
            .insert("compress.calib_mode".into(), args.calib_mode.clone());
        if args.calib_mode == "corrected" {
            ck.metadata.insert(
                "compress.correction_ridge".into(),
                args.correction_ridge().to_string(),
            );
        }
        ck.metadata.insert(
            "compress.output_weights".into(),
            args.output_weights.clone(),
        );
    }
    ck.metadata
        .insert("compress.calib_tokens".into(), calib_tokens.to_string());
    if let Some(r) = args.ratio {
        ck.metadata.insert("compress.ratio".into(), r.to_string());
    }
    if let Ok(src) = loader::resolve_path(&args.model) {
        if src
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
        {
            // Compressed checkpoints carry no vocabulary: point at the source for the tokenizer.
            let abs = std::fs::canonicalize(&src).unwrap_or(src);
            ck.metadata
                .insert("model.tokenizer".into(), abs.display().to_string());
        }
    }
    let dtype = if args.dtype == "bf16" {
        Dtype::BF16
    } else {
        Dtype::F32
    };
    loader::save_checkpoint(&args.out, &loaded.cfg, &ck, dtype)
        .with_context(|| format!("writing {}", args.out.display()))?;

    let after = params_of(&ck);
    let compressed: usize = reports.iter().map(|r| r.params).sum();
    let dense: usize = reports.iter().map(|r| r.dense_params).sum();
    Ok(Report {
        model: loaded.source.clone(),
        out: args.out.display().to_string(),
        format: args.format,
        calibrated: args.calibrate.is_some(),
        calib_tokens,
        compressed_params: compressed,
        dense_params_of_compressed_layers: dense,
        model_params_before: before,
        model_params_after: after,
        seconds: t0.elapsed().as_secs_f64(),
        layers: reports,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(model: &std::path::Path, text: &std::path::Path, out: PathBuf) -> Args {
        Args {
            model: model.display().to_string(),
            out,
            format: FormatKind::LowRank,
            ratio: Some(0.5),
            preset: None,
            config: None,
            blocks: None,
            layers: None,
            calibrate: Some(text.to_path_buf()),
            calib_tokens: Some(400),
            calib_damping: Calibration::DEFAULT_DAMPING,
            calib_ctx: 64,
            calib_device: "cpu".into(),
            calib_mode: "corrected".into(),
            correction_ridge: Some(1.0),
            output_weights: "auto".into(),
            output_weight_alpha: 1.0,
            allocation: "sensitivity".into(),
            sensitivity_tokens: 512,
            sensitivity_groups: 3,
            no_allocate: true,
            iterations: 5,
            blast_init: "lowrank".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            seed: 0,
            json: false,
            list_presets: false,
        }
    }

    fn errors(r: &Report) -> Vec<(String, f64)> {
        r.layers
            .iter()
            .map(|l| (l.name.clone(), l.rel_error))
            .collect()
    }

    /// `--allocation uniform | error | sensitivity` on the tiny test model: uniform keeps the
    /// ratio's rank everywhere; the other two move ranks (sensitivity to different ranks than
    /// error, with layers possibly kept dense) and never exceed the uniform budget; the
    /// checkpoint records the allocation and loads and runs with its dense and low-rank layers.
    #[test]
    fn allocation_switch_moves_ranks_within_the_budget() {
        let (dir, model, text) = crate::cmd::tiny_model_and_text("blr-cli-alloc", 7, 12);
        let run = |allocation: &str| -> Report {
            let mut a = args(&model, &text, dir.join(format!("{allocation}.safetensors")));
            a.no_allocate = false;
            a.allocation = allocation.into();
            a.sensitivity_tokens = 128;
            a.sensitivity_groups = 2;
            compress(&a, false, false).unwrap()
        };
        let ranks = |r: &Report| -> Vec<(FormatKind, usize)> {
            r.layers.iter().map(|l| (l.format, l.rank)).collect()
        };
        let uniform = run("uniform");
        let error = run("error");
        let sens = run("sensitivity");
        let budget = uniform.compressed_params;
        for r in [&uniform, &error, &sens] {
            assert_eq!(r.layers.len(), uniform.layers.len());
            assert_eq!(
                r.dense_params_of_compressed_layers,
                uniform.dense_params_of_compressed_layers
            );
            assert!(r.compressed_params <= budget);
        }
        for l in &uniform.layers {
            let s = shape_for_ratio_of(l);
            assert_eq!((l.format, l.rank), (FormatKind::LowRank, s), "{}", l.name);
        }
        assert_ne!(ranks(&error), ranks(&uniform));
        assert_ne!(ranks(&sens), ranks(&error));
        let ck =
            loader::load_llama(&dir.join("sensitivity.safetensors").display().to_string()).unwrap();
        assert_eq!(
            ck.weights
                .metadata
                .get("compress.allocation")
                .map(String::as_str),
            Some("sensitivity")
        );
        let dense_kept = sens
            .layers
            .iter()
            .filter(|l| l.format == FormatKind::Dense)
            .count();
        let lowrank_layers = ck
            .weights
            .layers
            .iter()
            .filter(|(_, l)| matches!(l, Linear::LowRank(_)))
            .count();
        assert_eq!(lowrank_layers + dense_kept, sens.layers.len());
        let lm = Llama::load(Cpu, ck.cfg.clone(), ck.weights).unwrap();
        let mut cache = lm.new_cache(8).unwrap();
        let logits = lm.forward(&[3, 4, 5], &mut cache, false).unwrap();
        assert!(logits.iter().all(|v| v.is_finite()));
        // BLAST and Monarch take the same path (low-rank probes of the same parameters, their
        // own curves) and stay within their uniform budgets.
        for format in [FormatKind::Blast, FormatKind::Monarch] {
            let budget_of = |allocation: &str| {
                let mut a = args(&model, &text, dir.join(format!("{format}-{allocation}.st")));
                a.format = format;
                a.blocks = Some(2);
                a.ratio = Some(0.7);
                a.no_allocate = false;
                a.allocation = allocation.into();
                a.sensitivity_tokens = 128;
                a.sensitivity_groups = 2;
                compress(&a, false, false).unwrap()
            };
            let (uniform, sens) = (budget_of("uniform"), budget_of("sensitivity"));
            assert!(
                sens.compressed_params <= uniform.compressed_params,
                "{format}"
            );
            assert_eq!(
                sens.dense_params_of_compressed_layers,
                uniform.dense_params_of_compressed_layers
            );
            let ck = loader::load_llama(
                &dir.join(format!("{format}-sensitivity.st"))
                    .display()
                    .to_string(),
            )
            .unwrap();
            let lm = Llama::load(Cpu, ck.cfg.clone(), ck.weights).unwrap();
            let mut cache = lm.new_cache(8).unwrap();
            let logits = lm.forward(&[3, 4, 5], &mut cache, false).unwrap();
            assert!(logits.iter().all(|v| v.is_finite()), "{format}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The uniform rank of a reported low-rank layer at the tests' ratio (0.5).
    fn shape_for_ratio_of(l: &LayerReport) -> usize {
        blr_compress::shape_for_ratio(FormatKind::LowRank, l.m, l.n, 1, 1, 0.5)
            .unwrap()
            .rank
    }

    /// `--output-weights auto` / `all` change exactly the weighted layers among those that see
    /// the same inputs in both runs (block 0: auto up_proj only, all also gate/v; q/k stay
    /// bit-identical), `--output-weight-alpha 0` is the unweighted fit, and the independent
    /// mode and the rank allocation take the weights too.
    #[test]
    fn output_weights_switch_reaches_the_weighted_layers() {
        let (dir, model, text) = crate::cmd::tiny_model_and_text("blr-cli-ow", 6, 12);
        let run = |tag: &str, f: &dyn Fn(&mut Args)| -> Report {
            let mut a = args(&model, &text, dir.join(format!("{tag}.safetensors")));
            f(&mut a);
            compress(&a, false, false).unwrap()
        };
        let none = errors(&run("none", &|a| a.output_weights = "none".into()));
        let zero = errors(&run("zero", &|a| a.output_weight_alpha = 0.0));
        let auto = errors(&run("auto", &|_| {}));
        let all = errors(&run("all", &|a| a.output_weights = "all".into()));
        assert_eq!(none, zero, "alpha 0 must be the unweighted fit");
        let get = |v: &[(String, f64)], name: &str| {
            v.iter()
                .find(|(n, _)| n == &format!("model.layers.0.{name}"))
                .unwrap()
                .1
        };
        // auto: block 0's attention and gate see the same inputs as without weights.
        for name in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "self_attn.o_proj",
            "mlp.gate_proj",
        ] {
            assert_eq!(get(&none, name), get(&auto, name), "{name}");
        }
        assert_ne!(get(&none, "mlp.up_proj"), get(&auto, "mlp.up_proj"));
        for name in ["self_attn.q_proj", "self_attn.k_proj"] {
            assert_eq!(get(&none, name), get(&all, name), "{name}");
        }
        for name in ["self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj"] {
            assert_ne!(get(&none, name), get(&all, name), "{name}");
        }
        let ck = loader::load_llama(&dir.join("auto.safetensors").display().to_string()).unwrap();
        assert_eq!(
            ck.weights
                .metadata
                .get("compress.output_weights")
                .map(String::as_str),
            Some("auto")
        );
        // Independent mode (the recording pass's statistics) and the allocation.
        let ind = |ow: &'static str| {
            move |a: &mut Args| {
                a.calib_mode = "independent".into();
                a.output_weights = ow.into();
                a.no_allocate = false;
            }
        };
        let ind_none = run("ind-none", &ind("none"));
        let ind_auto = run("ind-auto", &ind("auto"));
        let (en, ea) = (errors(&ind_none), errors(&ind_auto));
        assert_eq!(
            get(&en, "self_attn.q_proj") == get(&ea, "self_attn.q_proj"),
            {
                // Same rank: same inputs and fit; the allocation may move q's rank.
                let rank = |r: &Report| {
                    r.layers
                        .iter()
                        .find(|l| l.name == "model.layers.0.self_attn.q_proj")
                        .unwrap()
                        .rank
                };
                rank(&ind_none) == rank(&ind_auto)
            }
        );
        assert_ne!(get(&en, "mlp.up_proj"), get(&ea, "mlp.up_proj"));
        for r in [&ind_none, &ind_auto] {
            assert!(2 * r.compressed_params <= r.dense_params_of_compressed_layers);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
