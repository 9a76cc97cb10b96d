//! `blr factorize`: compress one dense matrix into low-rank, Monarch or BLAST form and report
//! the error, the parameters and the time.

use anyhow::{bail, Context, Result};
use blr_compress::{
    BlastInit, BlastMethod, BlastOptions, Calibration, Gram, MonarchOptions, Progress, Target,
};
use blr_core::checkpoint::Checkpoint;
use blr_core::format::{FormatKind, Shape};
use blr_core::rng::Rng;
use blr_core::safetensors::{Dtype, SafeTensors};
use blr_core::Linear;
use indicatif::{ProgressBar, ProgressStyle};
use std::path::PathBuf;
use std::time::Instant;

const LONG_HELP: &str = "\
The matrix comes from a safetensors file (--input FILE --tensor NAME, any float dtype, shape
(out, in) as in PyTorch's nn.Linear.weight) or is generated (--synthetic gaussian for i.i.d.
N(0,1) entries, the hardest case; --synthetic exact for a matrix that is exactly of the
requested format and rank, which a correct factorization recovers).

Algorithms (docs/compression.md has the math):
  lowrank  truncated SVD, factors balanced by sqrt(sigma): optimal (Eckart-Young)
  monarch  rank-R/b SVD of each block of the b x b grid: optimal; needs b | R
  blast    preconditioned alternating descent (300 iterations, lr 1 -> 0, damping 0.1)
           from the published random start; it has local minima: --init spectral starts
           from an algebraic solution (exact for exactly-BLAST matrices), --restarts K
           probes K random starts and keeps the best

With --calib GRAM_FILE the factorization minimises ||(W - Ŵ) X||_F over the calibration
activations X instead of ||W - Ŵ||_F. GRAM_FILE is a safetensors file with a tensor `gram`
(n x n, the sum of x x^T over tokens) or `activations` (tokens x n).

Examples:
  blr factorize --synthetic gaussian --m 768 --n 3072 --format blast --blocks 6 --rank 192
  blr factorize --synthetic exact --m 96 --n 120 --format blast --blocks-out 4 --blocks-in 3 \\
      --rank 6 --restarts 4
  blr factorize --input model.safetensors --tensor layers.0.mlp.up_proj.weight \\
      --format monarch --blocks 16 --ratio 0.5 --calib up_proj.gram.safetensors \\
      --out up.safetensors --json";

/// Factorize one matrix into a block-low-rank format and report relative error, parameters and
/// time.
#[derive(clap::Args)]
#[command(after_long_help = LONG_HELP)]
pub struct Args {
    /// safetensors file holding the matrix to factorize.
    #[arg(long, requires = "tensor", conflicts_with = "synthetic")]
    pub input: Option<PathBuf>,
    /// Name of the 2-D tensor inside --input.
    #[arg(long)]
    pub tensor: Option<String>,
    /// Generate the matrix instead: gaussian (i.i.d. N(0,1)) or exact (exactly of the requested
    /// format, blocks and rank, from random factors).
    #[arg(long, value_parser = ["gaussian", "exact"])]
    pub synthetic: Option<String>,
    /// Rows (output features) of the synthetic matrix.
    #[arg(long)]
    pub m: Option<usize>,
    /// Columns (input features) of the synthetic matrix.
    #[arg(long)]
    pub n: Option<usize>,
    /// Target format.
    #[arg(long, value_parser = ["lowrank", "monarch", "blast"])]
    pub format: String,
    /// Blocks per side (monarch, blast); 1 for lowrank.
    #[arg(long, short = 'b', default_value_t = 1)]
    pub blocks: usize,
    /// Output-side blocks for blast (overrides --blocks).
    #[arg(long)]
    pub blocks_out: Option<usize>,
    /// Input-side blocks for blast (overrides --blocks).
    #[arg(long)]
    pub blocks_in: Option<usize>,
    /// Rank: r for lowrank and blast, the total rank R for monarch (a multiple of --blocks).
    #[arg(long, short = 'r', conflicts_with = "ratio")]
    pub rank: Option<usize>,
    /// Instead of --rank: the largest rank whose parameters stay within RATIO * m * n.
    #[arg(long)]
    pub ratio: Option<f64>,
    /// Calibration Gram file: minimise the output error over those activations.
    #[arg(long)]
    pub calib: Option<PathBuf>,
    /// Ridge added to the unit-mean-eigenvalue calibration Gram.
    #[arg(long, default_value_t = Calibration::DEFAULT_DAMPING)]
    pub calib_damping: f64,
    /// BLAST iterations.
    #[arg(long, default_value_t = 300)]
    pub iterations: usize,
    /// BLAST initial learning rate (decays linearly to 0).
    #[arg(long, default_value_t = 1.0)]
    pub lr: f64,
    /// BLAST damping: eps = DAMPING * ||W - Ŵ||_F in each preconditioner.
    #[arg(long, default_value_t = 0.1)]
    pub damping: f64,
    /// BLAST starts to probe; the best after a tenth of the iterations is continued.
    #[arg(long, default_value_t = 1)]
    pub restarts: usize,
    /// BLAST start: random (published), lowrank (truncated SVD written as BLAST) or spectral
    /// (algebraic; exact for matrices that are exactly BLAST, see docs/compression.md).
    #[arg(long, default_value = "random", value_parser = ["random", "lowrank", "spectral"])]
    pub init: String,
    /// BLAST update rule: preconditioned (published) or gd (plain gradient descent, a baseline).
    #[arg(long, default_value = "preconditioned", value_parser = ["preconditioned", "gd"])]
    pub method: String,
    /// Calibrated Monarch: Gauss-Seidel sweeps of exact block updates.
    #[arg(long, default_value_t = 3)]
    pub sweeps: usize,
    /// Seed for the synthetic matrix and the BLAST initialisation.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Write the factorized layer as a blr checkpoint.
    #[arg(long, short = 'o')]
    pub out: Option<PathBuf>,
    /// Layer name inside --out (default: the tensor name, or "layer").
    #[arg(long)]
    pub name: Option<String>,
    /// Factor storage type in --out: f32 or bf16.
    #[arg(long, default_value = "f32", value_parser = ["f32", "bf16"])]
    pub dtype: String,
    /// Where BLAST, low-rank and Monarch run: auto (the GPU when one is usable: driver,
    /// device, cuBLAS, NVRTC; else the CPU), cpu, or cuda (an error when no GPU is usable).
    /// Calibrated BLAST and the calibrated (whitened) low-rank SVD run on the GPU too;
    /// data-free Monarch runs its batched block SVDs on the GPU with cuda only (auto keeps it
    /// on the CPU: measured no faster); --method gd and calibrated Monarch run on the CPU (auto
    /// says so; cuda refuses).
    #[arg(long, default_value = "auto", value_parser = ["auto", "cpu", "cuda"])]
    pub device: String,
    /// GEMM precision of data-free GPU BLAST (calibrated BLAST runs in fp32): fp32, tf32-data
    /// (the two large data GEMM families on TF32 tensor cores) or tf32 (every large GEMM, the
    /// Cholesky factorizations included; the triangular solves and the final error stay
    /// fp32). docs/perf/factorize-h100.md has the time and the error of each.
    #[arg(long, default_value = DEFAULT_GPU_PRECISION, value_parser = ["fp32", "tf32-data", "tf32"])]
    pub gpu_precision: String,
    /// Print one JSON object: {"format","m","n","blocks","rank","params","rel_error","seconds",
    /// "device"} (plus "blocks_in" and, with --calib, "calib_rel_error").
    #[arg(long)]
    pub json: bool,
}

/// The GPU BLAST precision `blr factorize` and `blr compress` use unless told otherwise.
pub(crate) const DEFAULT_GPU_PRECISION: &str = "tf32";

/// Where a factorization runs, and the words that say so.
pub(crate) struct FactorDevice {
    pub gpu: Option<blr_cuda::Gpu>,
    pub forced: bool,
    pub label: String,
}

impl FactorDevice {
    /// The CPU, for work that has no GPU path.
    pub(crate) fn cpu() -> Self {
        Self {
            gpu: None,
            forced: false,
            label: "cpu".into(),
        }
    }

    /// `auto` takes the GPU when `blr_cuda` finds a usable one, `cuda` insists on it.
    pub(crate) fn pick(flag: &str) -> Result<Self> {
        match flag {
            "cpu" => Ok(Self {
                gpu: None,
                forced: true,
                label: "cpu".into(),
            }),
            "cuda" => {
                let gpu = blr_cuda::factorize::open_gpu().context(
                    "--device cuda: no usable GPU for factorization (use --device cpu or auto)",
                )?;
                let label = format!("cuda ({})", gpu.info().name);
                Ok(Self {
                    gpu: Some(gpu),
                    forced: true,
                    label,
                })
            }
            _ => match blr_cuda::factorize::open_gpu() {
                Ok(gpu) => {
                    let label = format!("cuda ({})", gpu.info().name);
                    Ok(Self {
                        gpu: Some(gpu),
                        forced: false,
                        label,
                    })
                }
                Err(e) => Ok(Self {
                    gpu: None,
                    forced: false,
                    label: format!("cpu (no usable GPU: {e})"),
                }),
            },
        }
    }

    /// The GPU to run this BLAST request on, or `None` for the CPU; an error when cuda was
    /// forced for a request the GPU path does not cover.
    pub(crate) fn for_blast(
        &self,
        opts: &BlastOptions,
        calibrated: bool,
    ) -> Result<Option<&blr_cuda::Gpu>> {
        let Some(gpu) = &self.gpu else {
            return Ok(None);
        };
        match blr_cuda::factorize::unsupported(opts, calibrated) {
            None => Ok(Some(gpu)),
            Some(why) if self.forced => bail!("--device cuda: {why}; use --device cpu or auto"),
            Some(_) => Ok(None),
        }
    }
}

/// BLAST on the chosen device; returns the report and the device it ran on.
pub(crate) fn blast_on(
    device: &FactorDevice,
    target: &Target<'_>,
    opts: &BlastOptions,
    calib: Option<&Calibration<'_>>,
    precision: &str,
    progress: &dyn Progress,
) -> Result<(blr_compress::BlastReport, String)> {
    let mut precision: blr_cuda::factorize::GemmPrecision = precision.parse()?;
    if calib.is_some() {
        // Calibrated BLAST keeps every GEMM in fp32: with TF32 its line searches take other
        // steps and the final error moved by 1.2% at 576x1536 (fp32: within 2e-5 of the CPU
        // path; docs/perf/factorize-h100.md).
        precision = blr_cuda::factorize::GemmPrecision::Fp32;
    }
    match device.for_blast(opts, calib.is_some())? {
        Some(gpu) => {
            let run = |precision| {
                let gpu_opts = blr_cuda::factorize::GpuBlastOptions { precision };
                match calib {
                    Some(c) => blr_cuda::factorize::blast_report_calibrated(
                        gpu, target, opts, c, &gpu_opts, progress,
                    ),
                    None => {
                        blr_cuda::factorize::blast_report(gpu, target, opts, &gpu_opts, progress)
                    }
                }
            };
            match run(precision) {
                Ok(report) => Ok((report, device.label.clone())),
                // TF32 Cholesky factors are those of a matrix ~1e-3 away: a preconditioner
                // that close to singular can lose definiteness where fp32 keeps it.
                Err(blr_cuda::Error::Numerical { .. })
                    if precision == blr_cuda::factorize::GemmPrecision::Tf32 =>
                {
                    match run(blr_cuda::factorize::GemmPrecision::Tf32Data) {
                        Ok(report) => Ok((
                            report,
                            format!(
                                "{} (TF32 Cholesky lost definiteness; reran with tf32-data)",
                                device.label
                            ),
                        )),
                        // Still not definite in fp32 (a calibration Gram block near singular
                        // in single precision): auto finishes on the CPU, in f64.
                        Err(blr_cuda::Error::Numerical { reason, .. }) if !device.forced => Ok((
                            blr_compress::blast_report(target, opts, calib, progress)?,
                            format!("cpu (the GPU run failed: {reason})"),
                        )),
                        Err(e) => Err(e.into()),
                    }
                }
                Err(blr_cuda::Error::Numerical { reason, .. }) if !device.forced => Ok((
                    blr_compress::blast_report(target, opts, calib, progress)?,
                    format!("cpu (the GPU run failed: {reason})"),
                )),
                Err(e) => Err(e.into()),
            }
        }
        None => {
            let label = match (
                &device.gpu,
                blr_cuda::factorize::unsupported(opts, calib.is_some()),
            ) {
                (Some(_), Some(why)) => format!("cpu ({why})"),
                _ => device.label.clone(),
            };
            Ok((
                blr_compress::blast_report(target, opts, calib, progress)?,
                label,
            ))
        }
    }
}

/// Low-rank on the chosen device (the truncated SVD, whitened with a calibration); returns the
/// layer and the device it ran on. Without cuSOLVER, `auto` falls back to the CPU.
pub(crate) fn lowrank_on(
    device: &FactorDevice,
    target: &Target<'_>,
    rank: usize,
    calib: Option<&Calibration<'_>>,
) -> Result<(Linear, String)> {
    let Some(gpu) = &device.gpu else {
        return Ok((
            blr_compress::lowrank(target, rank, calib)?,
            device.label.clone(),
        ));
    };
    let run = match calib {
        Some(c) => blr_cuda::factorize::lowrank_calibrated(gpu, target, rank, c),
        None => blr_cuda::factorize::lowrank(gpu, target, rank),
    };
    match run {
        Ok(layer) => Ok((layer, device.label.clone())),
        Err(blr_cuda::Error::LibraryNotFound { library, .. }) if !device.forced => Ok((
            blr_compress::lowrank(target, rank, calib)?,
            format!("cpu ({library} not found)"),
        )),
        Err(blr_cuda::Error::Numerical { reason, .. }) if !device.forced => Ok((
            blr_compress::lowrank(target, rank, calib)?,
            format!("cpu (the GPU SVD failed: {reason})"),
        )),
        Err(e) => Err(e.into()),
    }
}

/// Monarch on the chosen device (the blockwise SVDs batched on the GPU data-free; calibrated
/// Monarch runs on the CPU); returns the layer and the device it ran on.
pub(crate) fn monarch_on(
    device: &FactorDevice,
    target: &Target<'_>,
    opts: &MonarchOptions,
    calib: Option<&Calibration<'_>>,
    progress: &dyn Progress,
) -> Result<(Linear, String)> {
    let cpu = |label: String| -> Result<(Linear, String)> {
        Ok((blr_compress::monarch(target, opts, calib, progress)?, label))
    };
    let Some(gpu) = &device.gpu else {
        return cpu(device.label.clone());
    };
    if !device.forced {
        // Measured on the H100 box: the batched GPU block SVDs are no faster than the CPU's
        // (4096x11008 b=16: 0.89 s vs 0.81 s on 16 cores; 576x1536 b=4: 0.25 s vs 0.06 s), so
        // auto keeps Monarch on the CPU and --device cuda runs it on the GPU.
        return cpu("cpu (Monarch's block SVDs measured no faster on the GPU)".into());
    }
    if calib.is_some() {
        if device.forced {
            bail!(
                "--device cuda: calibrated Monarch runs on the CPU only; use --device cpu or auto"
            );
        }
        return cpu("cpu (calibrated Monarch runs on the CPU only)".into());
    }
    match blr_cuda::factorize::monarch(gpu, target, opts) {
        Ok(layer) => Ok((layer, device.label.clone())),
        Err(blr_cuda::Error::LibraryNotFound { library, .. }) if !device.forced => {
            cpu(format!("cpu ({library} not found)"))
        }
        Err(blr_cuda::Error::Numerical { reason, .. }) if !device.forced => {
            cpu(format!("cpu (the GPU SVDs failed: {reason})"))
        }
        Err(e) => Err(e.into()),
    }
}

/// Drives an indicatif bar from the library's progress events.
struct Bar(ProgressBar);

impl Progress for Bar {
    fn begin(&self, stage: &str, total: usize) {
        self.0.set_length(total as u64);
        self.0.set_position(0);
        self.0.set_prefix(stage.to_string());
    }
    fn advance(&self, done: usize, rel_error: Option<f64>) {
        self.0.set_position(done as u64);
        if let Some(e) = rel_error {
            self.0.set_message(format!("rel. error {e:.4e}"));
        }
    }
}

pub fn run(args: Args) -> Result<()> {
    let format: FormatKind = args.format.parse()?;
    let (b_out, b_in) = match format {
        FormatKind::Blast => (
            args.blocks_out.unwrap_or(args.blocks),
            args.blocks_in.unwrap_or(args.blocks),
        ),
        FormatKind::Monarch => {
            if args.blocks_out.is_some() || args.blocks_in.is_some() {
                bail!("Monarch uses one block count on both sides: use --blocks");
            }
            (args.blocks, args.blocks)
        }
        _ => (1, 1),
    };
    let (name, m, n, weight) = load_matrix(&args, format, b_out, b_in)?;
    let shape = layer_shape(&args, format, m, n, b_out, b_in)?;
    let target = Target::new(&name, m, n, &weight)?;
    let gram = match &args.calib {
        Some(path) => Some(
            Gram::load(path).with_context(|| format!("reading calibration {}", path.display()))?,
        ),
        None => None,
    };
    let calib = gram.as_ref().map(|g| Calibration {
        gram: g,
        damping: args.calib_damping,
    });

    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        if let Ok(style) = ProgressStyle::with_template(
            "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        ) {
            b.set_style(style.progress_chars("=> "));
        }
        b
    };
    let progress = Bar(bar);
    let device = if matches!(
        format,
        FormatKind::Blast | FormatKind::LowRank | FormatKind::Monarch
    ) {
        FactorDevice::pick(&args.device)?
    } else {
        FactorDevice::cpu()
    };
    let ran_on;
    let start = Instant::now();
    // BLAST's report already holds ||W - Ŵ||_F / ||W||_F (from the dense residual, on the
    // device it ran on); recomputing it on the CPU costs 2 m n r flops.
    let mut blast_error = None;
    let mut blast_calib_error = None;
    let layer = match format {
        FormatKind::LowRank => {
            let (layer, label) = lowrank_on(&device, &target, shape.rank, calib.as_ref())?;
            ran_on = label;
            layer
        }
        FormatKind::Monarch => {
            let opts = MonarchOptions {
                sweeps: args.sweeps,
                ..MonarchOptions::new(b_out, shape.rank)
            };
            let (layer, label) = monarch_on(&device, &target, &opts, calib.as_ref(), &progress)?;
            ran_on = label;
            layer
        }
        FormatKind::Blast => {
            let opts = BlastOptions {
                b_out,
                b_in,
                rank: shape.rank,
                iterations: args.iterations,
                lr: args.lr,
                damping: args.damping,
                seed: args.seed,
                method: if args.method == "gd" {
                    BlastMethod::GradientDescent
                } else {
                    BlastMethod::Preconditioned
                },
                init: match args.init.as_str() {
                    "lowrank" => BlastInit::LowRank,
                    "spectral" => BlastInit::Spectral,
                    _ => BlastInit::Random,
                },
                restarts: args.restarts,
            };
            let (report, label) = blast_on(
                &device,
                &target,
                &opts,
                calib.as_ref(),
                &args.gpu_precision,
                &progress,
            )?;
            ran_on = label;
            // The report's error is in the norm it minimised: Frobenius data-free, the raw
            // calibration Gram's with --calib (recomputing that one costs 4 m n^2 f64 flops).
            if calib.is_none() {
                blast_error = Some(report.rel_error);
            } else {
                blast_calib_error = Some(report.rel_error);
            }
            report.layer
        }
        FormatKind::Dense => bail!("dense is not a factorization target"),
    };
    let seconds = start.elapsed().as_secs_f64();
    progress.0.finish_and_clear();
    let rel_error = match blast_error {
        Some(e) => e,
        None => blr_compress::relative_error(&target, &layer, None)?,
    };
    let calib_error = match (&gram, blast_calib_error) {
        (Some(_), Some(e)) => Some(e),
        (Some(g), None) => Some(blr_compress::relative_error(&target, &layer, Some(g))?),
        (None, _) => None,
    };
    let params = layer.params();

    if let Some(out) = &args.out {
        let dtype = if args.dtype == "bf16" {
            Dtype::BF16
        } else {
            Dtype::F32
        };
        let ck = Checkpoint {
            layers: vec![(args.name.clone().unwrap_or_else(|| name.clone()), layer)],
            ..Default::default()
        };
        ck.save(out, dtype)
            .with_context(|| format!("writing {}", out.display()))?;
    }

    if args.json {
        let mut obj = serde_json::json!({
            "format": format.name(),
            "m": m,
            "n": n,
            "blocks": b_out,
            "blocks_in": b_in,
            "rank": shape.rank,
            "params": params,
            "rel_error": rel_error,
            "seconds": seconds,
            "device": ran_on,
        });
        if let (Some(e), Some(map)) = (calib_error, obj.as_object_mut()) {
            map.insert("calib_rel_error".into(), serde_json::json!(e));
        }
        println!("{obj}");
    } else {
        let blocks = if b_out == b_in {
            format!("b={b_out}")
        } else {
            format!("b={b_out}x{b_in}")
        };
        println!(
            "{name}: {m}x{n} -> {format} {blocks} rank={}: {params} params ({:.1}% of dense)",
            shape.rank,
            100.0 * params as f64 / (m * n) as f64
        );
        println!("  relative error ||W - Ŵ||_F / ||W||_F = {rel_error:.6e}");
        if let Some(e) = calib_error {
            println!("  calibrated error ||(W - Ŵ) X||_F / ||W X||_F = {e:.6e}");
        }
        println!("  time {seconds:.3} s on {ran_on}");
        if let Some(out) = &args.out {
            println!("  wrote {}", out.display());
        }
    }
    Ok(())
}

/// The matrix to factorize: (name, m, n, row-major values).
fn load_matrix(
    args: &Args,
    format: FormatKind,
    b_out: usize,
    b_in: usize,
) -> Result<(String, usize, usize, Vec<f32>)> {
    if let Some(path) = &args.input {
        let Some(tensor) = &args.tensor else {
            bail!("--input needs --tensor NAME");
        };
        let st = SafeTensors::open(path)?;
        let Some(info) = st.info(tensor) else {
            let names: Vec<&str> = st.names().take(8).collect();
            bail!(
                "{}: no tensor '{tensor}' (the file has {} tensors, e.g. {})",
                path.display(),
                st.names().count(),
                names.join(", ")
            );
        };
        let [m, n] = info.shape[..] else {
            bail!(
                "{}: tensor '{tensor}' has shape {:?}; factorize needs a 2-D (out, in) matrix",
                path.display(),
                info.shape
            );
        };
        return Ok((tensor.clone(), m, n, st.read_f32(tensor)?));
    }
    let Some(kind) = &args.synthetic else {
        bail!("give the matrix: --input FILE --tensor NAME, or --synthetic gaussian|exact --m M --n N");
    };
    let (Some(m), Some(n)) = (args.m, args.n) else {
        bail!("--synthetic needs the shape: --m OUT --n IN");
    };
    let name = format!("synthetic-{kind}");
    if kind == "gaussian" {
        return Ok((name, m, n, Rng::new(args.seed).normal_vec(m * n, 1.0)));
    }
    let shape = layer_shape(args, format, m, n, b_out, b_in)?;
    // A different seed from the BLAST init, which would otherwise start at the answer.
    let layer = Linear::random(&shape, args.seed ^ 0x005e_ed0f_ea57)?;
    Ok((name, m, n, layer.to_dense()?.weight))
}

fn layer_shape(
    args: &Args,
    format: FormatKind,
    m: usize,
    n: usize,
    b_out: usize,
    b_in: usize,
) -> Result<Shape> {
    let shape = match (args.rank, args.ratio) {
        (Some(rank), _) => Shape {
            format,
            m,
            n,
            b_out,
            b_in,
            rank,
        },
        (None, Some(ratio)) => blr_compress::shape_for_ratio(format, m, n, b_out, b_in, ratio)?,
        (None, None) => bail!("give --rank R or --ratio FRACTION_OF_DENSE_PARAMS"),
    };
    shape.validate()?;
    Ok(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(format: &str, blocks: usize, rank: usize, out: PathBuf) -> Args {
        Args {
            input: None,
            tensor: None,
            synthetic: Some("exact".into()),
            m: Some(24),
            n: Some(36),
            format: format.into(),
            blocks,
            blocks_out: None,
            blocks_in: None,
            rank: Some(rank),
            ratio: None,
            calib: None,
            calib_damping: Calibration::DEFAULT_DAMPING,
            iterations: 300,
            lr: 1.0,
            damping: 0.1,
            restarts: 4,
            init: "random".into(),
            method: "preconditioned".into(),
            sweeps: 3,
            seed: 5,
            out: Some(out),
            name: Some("layer0".into()),
            dtype: "f32".into(),
            device: "cpu".into(),
            gpu_precision: DEFAULT_GPU_PRECISION.into(),
            json: true,
        }
    }

    #[test]
    fn exact_synthetic_matrices_round_trip_through_the_checkpoint() {
        let dir = std::env::temp_dir().join(format!("blr-factorize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (format, blocks, rank) in [("lowrank", 1, 4), ("monarch", 3, 6), ("blast", 3, 2)] {
            let out = dir.join(format!("{format}.safetensors"));
            let a = args(format, blocks, rank, out.clone());
            let (_, m, n, w) = load_matrix(&a, format.parse().unwrap(), blocks, blocks).unwrap();
            run(a).unwrap();
            let ck = Checkpoint::load(&out).unwrap();
            let layer = ck.layer("layer0").unwrap();
            assert_eq!(layer.kind().name(), format);
            let t = Target::new("w", m, n, &w).unwrap();
            let e = blr_compress::relative_error(&t, layer, None).unwrap();
            assert!(e < 1e-3, "{format}: {e}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_a_tensor_from_safetensors_and_names_what_is_wrong() {
        use blr_core::safetensors::{write, TensorToWrite};
        let dir = std::env::temp_dir().join(format!("blr-factorize-in-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let input = dir.join("model.safetensors");
        let w = Rng::new(3).normal_vec(20 * 30, 1.0);
        let bias = vec![0.5f32; 20];
        let tensors = [
            TensorToWrite {
                name: "proj.weight".into(),
                dtype: Dtype::BF16,
                shape: vec![20, 30],
                data: &w,
            },
            TensorToWrite {
                name: "proj.bias".into(),
                dtype: Dtype::F32,
                shape: vec![20],
                data: &bias,
            },
        ];
        write(&input, &tensors, &Default::default()).unwrap();
        let mut a = args("lowrank", 1, 20, dir.join("out.safetensors"));
        a.synthetic = None;
        a.m = None;
        a.n = None;
        a.input = Some(input.clone());
        a.tensor = Some("proj.weight".into());
        a.name = None;
        run(a).unwrap();
        // Full rank: the factorization is exact up to f32 rounding, and the layer keeps the
        // tensor's name.
        let ck = Checkpoint::load(&dir.join("out.safetensors")).unwrap();
        let layer = ck.layer("proj.weight").unwrap();
        let dense = layer.to_dense().unwrap();
        let st = SafeTensors::open(&input).unwrap();
        let orig = st.read_f32("proj.weight").unwrap();
        for (x, y) in dense.weight.iter().zip(&orig) {
            assert!((x - y).abs() < 1e-4 * (1.0 + y.abs()), "{x} vs {y}");
        }
        for (tensor, want) in [("proj.bias", "2-D"), ("nope", "proj.weight")] {
            let mut a = args("lowrank", 1, 4, dir.join("unused.safetensors"));
            a.synthetic = None;
            a.input = Some(input.clone());
            a.tensor = Some(tensor.into());
            let err = run(a).unwrap_err().to_string();
            assert!(err.contains(want), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn calibrated_requests_follow_the_device_choice() {
        // Calibrated BLAST, calibrated low-rank and Monarch on auto (the GPU where one is
        // usable, else the CPU) land on the CPU path's (calibrated) error; cuda runs them or
        // says what is missing. The Gram has rank < n (fewer tokens than features) plus the
        // ridge.
        let dir = std::env::temp_dir().join(format!("blr-factorize-cal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let n = 36;
        let mut gram = blr_compress::Gram::new(n);
        gram.accumulate(&Rng::new(11).normal_vec(20 * n, 1.0), 20)
            .unwrap();
        let gpath = dir.join("gram.safetensors");
        gram.save(&gpath).unwrap();
        // (format, blocks, rank, calibrated): calibrated Monarch runs on the CPU (auto) or is
        // refused (cuda); data-free Monarch follows the device choice.
        for (format, blocks, rank, calibrated) in [
            ("blast", 3, 5, true),
            ("lowrank", 1, 7, true),
            ("monarch", 3, 6, false),
            ("monarch", 3, 6, true),
        ] {
            let mut errors = Vec::new();
            for device in ["cpu", "auto", "cuda"] {
                let out = dir.join(format!("{format}-{device}.safetensors"));
                let mut a = args(format, blocks, rank, out.clone());
                a.synthetic = Some("gaussian".into());
                a.calib = calibrated.then(|| gpath.clone());
                a.restarts = 1;
                a.iterations = 40;
                a.init = "lowrank".into();
                a.device = device.into();
                let (_, m, n, w) =
                    load_matrix(&a, format.parse().unwrap(), blocks, blocks).unwrap();
                match run(a) {
                    Ok(()) => {
                        let ck = Checkpoint::load(&out).unwrap();
                        let t = Target::new("w", m, n, &w).unwrap();
                        let layer = ck.layer("layer0").unwrap();
                        errors.push(blr_compress::relative_error(&t, layer, Some(&gram)).unwrap());
                    }
                    Err(e) if device == "cuda" => {
                        let msg = format!("{e:#}");
                        assert!(msg.contains("--device cpu"), "{msg}");
                    }
                    Err(e) => panic!("{format} on {device}: {e:#}"),
                }
            }
            for e in &errors[1..] {
                assert!(
                    (e - errors[0]).abs() <= 1e-3 * errors[0],
                    "{format}: {e} vs cpu {}",
                    errors[0]
                );
            }
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn device_choice_runs_or_says_what_is_missing() {
        let dir = std::env::temp_dir().join(format!("blr-factorize-dev-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        // auto: the GPU where one is usable, else the CPU; either way it succeeds and the
        // layer is exact on an exactly-BLAST matrix.
        let mut a = args("blast", 3, 2, dir.join("auto.safetensors"));
        a.device = "auto".into();
        run(a).unwrap();
        // cuda: runs where a GPU is, and where none is the error says so and what to do.
        let mut a = args("blast", 3, 2, dir.join("cuda.safetensors"));
        a.device = "cuda".into();
        a.restarts = 1;
        if let Err(e) = run(a) {
            let msg = format!("{e:#}");
            assert!(
                msg.contains("--device cuda") && msg.contains("--device cpu"),
                "{msg}"
            );
        }
        // Data-free low-rank follows the same choice (the SVD on the GPU where one is usable):
        // exact on an exactly rank-4 matrix either way.
        let out = dir.join("lowrank.safetensors");
        let mut a = args("lowrank", 1, 4, out.clone());
        a.device = "auto".into();
        let (_, m, n, w) = load_matrix(&a, FormatKind::LowRank, 1, 1).unwrap();
        run(a).unwrap();
        let ck = Checkpoint::load(&out).unwrap();
        let t = Target::new("w", m, n, &w).unwrap();
        let e = blr_compress::relative_error(&t, ck.layer("layer0").unwrap(), None).unwrap();
        assert!(e < 1e-3, "low-rank on auto: {e}");
        // cuda with a request only the CPU path covers: refused, naming it.
        let mut a = args("blast", 3, 2, dir.join("gd.safetensors"));
        a.device = "cuda".into();
        a.method = "gd".into();
        let msg = format!("{:#}", run(a).unwrap_err());
        assert!(msg.contains("--device"), "{msg}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_requests_explain_themselves() {
        let out = std::env::temp_dir().join("blr-factorize-unused.safetensors");
        let err = run(args("monarch", 4, 6, out.clone()))
            .unwrap_err()
            .to_string();
        assert!(err.contains("divide") || err.contains("multiple"), "{err}");
        let mut a = args("blast", 3, 2, out);
        a.rank = None;
        let err = run(a).unwrap_err().to_string();
        assert!(err.contains("--rank"), "{err}");
    }
}
