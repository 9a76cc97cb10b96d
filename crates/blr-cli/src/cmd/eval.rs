//! `blr eval`: accuracy of a model. `blr eval ppl` is sliding-window perplexity on a text file.

use anyhow::{bail, Context, Result};
use blr_models::cpu::Cpu;
use blr_models::cuda::Cuda;
use blr_models::gpt2::Gpt2;
use blr_models::llama::Llama;
use blr_models::lm::{perplexity, CausalLm};
use blr_models::loader::{self, LoadedLm};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::Write;
use std::path::PathBuf;

/// Measure a model's accuracy.
#[derive(clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub what: What,
}

#[derive(clap::Subcommand)]
pub enum What {
    /// Perplexity of a causal LM on a text file, with sliding windows.
    Ppl(PplArgs),
    /// Top-1 agreement and mean KL of a (compressed) model against its reference model.
    Agree(super::agree::AgreeArgs),
    /// Write a reference bundle (random weights + input + our CPU output) for the PyTorch check.
    Reference(ReferenceArgs),
}

/// Write one safetensors file with random weights under the PyTorch model's own tensor names
/// (transformers Llama / GPT-2, timm ViT, the DiT reference code), a random input, and this
/// engine's CPU output for it. On a machine with PyTorch:
///
///   python crates/blr-models/tools/torch_reference.py FILE ...
///
/// builds the PyTorch model from the recorded config, loads the weights, runs the input and
/// prints the relative error of our output against PyTorch's (f32 CPU vs f32 PyTorch: ~1e-6).
///
/// Examples:
///   blr eval reference --arch llama --shape tiny --out llama-tiny.safetensors
///   blr eval reference --arch llama --shape llama3.2-1b --layers 2 --tokens 64 --out l1b.safetensors
///   blr eval reference --arch dit --shape dit-xl2 --layers 2 --out dit.safetensors
#[derive(clap::Args)]
#[command(verbatim_doc_comment, after_help = REFERENCE_HELP)]
pub struct ReferenceArgs {
    /// llama, gpt2, vit or dit.
    #[arg(long)]
    pub arch: String,
    /// `tiny` (odd small shapes) or a named shape: llama7b, llama3.2-1b, smollm2-135m, gpt2s,
    /// gpt2m, vit-b16, dit-xl2.
    #[arg(long, default_value = "tiny")]
    pub shape: String,
    /// Keep only the first N blocks (real widths, fewer layers: llama7b in full is 27 GB of f32).
    #[arg(long)]
    pub layers: Option<usize>,
    /// Tokens in the input sequence (language models).
    #[arg(long, default_value_t = 16)]
    pub tokens: usize,
    /// Seed for the weights and the input.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use this Llama model's weights instead of random ones (`smollm2`, a GGUF, a blr
    /// checkpoint, an HF directory): checks GGUF loading (dequantisation, Q/K un-permutation)
    /// against transformers. BLR layers are exported densified.
    #[arg(long)]
    pub model: Option<String>,
    /// Output file (.safetensors).
    #[arg(long)]
    pub out: PathBuf,
    /// Also run the model on this backend and store its output beside the CPU one
    /// (`blr.reference.output_cuda`), so the PyTorch script checks the bf16 CUDA backend too.
    #[arg(long, value_parser = ["cuda"])]
    pub also: Option<String>,
    /// Print a JSON summary.
    #[arg(long)]
    pub json: bool,
}

/// Perplexity = exp(mean negative log-likelihood of each token given the ones before it).
///
/// The whole file is tokenized with the model's tokenizer and the first --tokens tokens are
/// kept. Windows of --ctx tokens start every --stride tokens; each window scores only the
/// tokens the previous window did not, so with stride < ctx every token after the first is
/// scored once, with at least ctx - stride tokens of context (the Hugging Face recipe). Lower
/// is better; compare numbers only at the same tokens, ctx and stride.
///
/// Cost: about (tokens / stride) windows of ctx tokens each, i.e. ~ctx/stride times the work of
/// one pass over the text.
///
/// Example (the dense SmolLM2 baseline recorded in docs/models.md):
///   blr eval ppl --model smollm2 --data data/wikitext-2/test.txt --tokens 4096 --ctx 512 --stride 256
#[derive(clap::Args)]
#[command(verbatim_doc_comment, after_help = PPL_HELP)]
pub struct PplArgs {
    /// The model: `smollm2`, a Llama GGUF, a blr checkpoint, a Hugging Face directory (Llama
    /// or GPT-2; GPT-2 directories carry their tokenizer), or random:NAME[:LAYERS]. Without a
    /// tokenizer of its own, pass --tokenizer.
    #[arg(long)]
    pub model: String,
    /// A GGUF file to take the tokenizer from, when the model file has none.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// UTF-8 text file (e.g. data/wikitext-2/test.txt).
    #[arg(long)]
    pub data: PathBuf,
    /// Score the first N tokens of the file (0 = all of it).
    #[arg(long, default_value_t = 4096)]
    pub tokens: usize,
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Distance between window starts (<= ctx).
    #[arg(long, default_value_t = 256)]
    pub stride: usize,
    /// Where to run: cpu (f32 reference) or cuda (bf16).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
    /// With --device cuda: cap on the device memory blr may allocate, e.g. 6GiB, 512MiB.
    /// Default: BLR_MAX_GPU_MEM, else no cap beyond the device.
    #[arg(long, value_name = "SIZE", value_parser = super::doctor::parse_size)]
    pub max_gpu_mem: Option<blr_cuda::Bytes>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Shown after the options (the subcommand's one-line doc replaces the struct's).
const PPL_HELP: &str = "\
Perplexity = exp(mean negative log-likelihood of each token given the tokens before it); lower
is better. The whole file is tokenized with the model's tokenizer and the first --tokens tokens
kept. Windows of --ctx tokens start every --stride tokens; each window scores only the tokens
the previous one did not, so with stride < ctx every token after the first is scored once with
at least ctx - stride tokens of context (the Hugging Face recipe). The work is about ctx/stride
passes over the text. Compare numbers only at the same tokens, ctx and stride.

Example (the dense SmolLM2 baseline in docs/models.md: 22.24):
  blr eval ppl --model smollm2 --data data/wikitext-2/test.txt --tokens 4096 --ctx 512 --stride 256
  blr eval ppl --model compressed.safetensors --tokenizer smollm2 --data data/wikitext-2/test.txt";

const REFERENCE_HELP: &str = "\
Writes random weights under the PyTorch model's own state-dict names (transformers Llama and
GPT-2, timm ViT, the DiT reference code), a random input and this engine's CPU output. Then, on a
machine with PyTorch:
  python crates/blr-models/tools/torch_reference.py FILE...
prints ||blr - torch|| / ||torch|| per bundle (f32 on both sides: ~1e-6).

Examples:
  blr eval reference --arch llama --shape tiny --out llama-tiny.safetensors
  blr eval reference --arch llama --shape llama3.2-1b --layers 1 --tokens 32 --out l1b.safetensors
  blr eval reference --arch llama --model smollm2 --tokens 48 --out smollm2.safetensors
  blr eval reference --arch dit --shape dit-xl2 --layers 2 --out dit.safetensors";

#[derive(Debug, serde::Serialize)]
struct Report {
    model: String,
    data: String,
    device: String,
    perplexity: f64,
    nll_per_token: f64,
    tokens: usize,
    scored_tokens: usize,
    ctx: usize,
    stride: usize,
    windows: usize,
    seconds: f64,
    tokens_per_second: f64,
}

pub fn run(args: Args) -> Result<()> {
    match args.what {
        What::Ppl(a) => ppl(a),
        What::Agree(a) => super::agree::agree(a),
        What::Reference(a) => reference(a),
    }
}

fn reference(args: ReferenceArgs) -> Result<()> {
    let t0 = std::time::Instant::now();
    let b = match &args.model {
        None => blr_models::reference::bundle(
            &args.arch,
            &args.shape,
            args.layers,
            args.seed,
            args.tokens.max(1),
        )?,
        Some(spec) => {
            if args.arch != "llama" {
                bail!("--model takes Llama models; use --arch llama");
            }
            let loaded =
                loader::load_llama(spec).with_context(|| format!("loading model '{spec}'"))?;
            let v = loaded.cfg.vocab_size;
            let mut rng = blr_core::rng::Rng::new(args.seed);
            let ids: Vec<u32> = (0..args.tokens.max(1))
                .map(|_| rng.below(v) as u32)
                .collect();
            blr_models::reference::llama_bundle(&loaded.cfg, &loaded.weights, &ids)?
        }
    };
    let mut b = b;
    if args.also.is_some() {
        let gpu = Cuda::open_default().context("--also cuda: opening the CUDA backend")?;
        blr_models::reference::add_backend_output(&mut b, gpu, "cuda")
            .context("running the bundle on the CUDA backend")?;
    }
    let bytes = b.to_bytes()?;
    blr_core::safetensors::write_atomic(&args.out, &bytes)
        .with_context(|| format!("writing {}", args.out.display()))?;
    let summary = serde_json::json!({
        "file": args.out.display().to_string(),
        "arch": args.arch,
        "shape": args.shape,
        "tensors": b.tensors.len(),
        "bytes": bytes.len(),
        "config": serde_json::from_str::<serde_json::Value>(
            b.metadata.get("blr.reference.config").map_or("null", String::as_str)
        )?,
        "seconds": t0.elapsed().as_secs_f64(),
    });
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&summary)?)?;
    } else {
        writeln!(
            out,
            "wrote {} ({} tensors, {:.1} MB): {} {} with input and CPU output; check it with\n  python crates/blr-models/tools/torch_reference.py {}",
            args.out.display(),
            b.tensors.len(),
            bytes.len() as f64 / 1e6,
            args.arch,
            args.model.as_deref().unwrap_or(&args.shape),
            args.out.display()
        )?;
    }
    Ok(())
}

fn ppl(args: PplArgs) -> Result<()> {
    let report = measure_ppl(&args)?;
    let mut out = std::io::stdout().lock();
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        writeln!(
            out,
            "perplexity {:.4} (nll {:.4} nats/token) over {} scored of {} tokens; ctx {}, stride {}, {} windows; {:.1} s on {} ({:.0} tokens/s processed)",
            report.perplexity,
            report.nll_per_token,
            report.scored_tokens,
            report.tokens,
            report.ctx,
            report.stride,
            report.windows,
            report.seconds,
            report.device,
            report.tokens_per_second
        )?;
    }
    Ok(())
}

fn measure_ppl(args: &PplArgs) -> Result<Report> {
    let loaded =
        loader::load_lm(&args.model).with_context(|| format!("loading model '{}'", args.model))?;
    let tokenizer = match (&args.tokenizer, loaded.tokenizer()) {
        (Some(path), _) => loader::tokenizer_from_gguf(&loader::resolve_path(path)?)?,
        (None, Some(t)) => t.clone(),
        (None, None) => bail!(
            "the model '{}' carries no tokenizer: pass --tokenizer FILE.gguf",
            args.model
        ),
    };
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let mut ids = tokenizer.encode(&text, false)?;
    if args.tokens > 0 {
        if ids.len() < args.tokens {
            eprintln!(
                "note: {} holds only {} tokens; scoring all of them",
                args.data.display(),
                ids.len()
            );
        }
        ids.truncate(args.tokens);
    }
    let source = loaded.source().to_string();
    let cuda = || super::open_cuda(args.max_gpu_mem);
    let loading = "loading the weights onto the GPU";
    match loaded {
        LoadedLm::Llama(l) if args.device == "cuda" => {
            let model = Llama::load(cuda()?, l.cfg, l.weights).context(loading)?;
            ppl_with(&model, &ids, args, source)
        }
        LoadedLm::Gpt2(g) if args.device == "cuda" => {
            let model = Gpt2::load(cuda()?, g.cfg, g.weights).context(loading)?;
            ppl_with(&model, &ids, args, source)
        }
        LoadedLm::Llama(l) => {
            let model = Llama::load(Cpu, l.cfg, l.weights)?;
            ppl_with(&model, &ids, args, source)
        }
        LoadedLm::Gpt2(g) => {
            let model = Gpt2::load(Cpu, g.cfg, g.weights)?;
            ppl_with(&model, &ids, args, source)
        }
    }
}

/// Sliding-window perplexity of any causal LM over `ids`.
fn ppl_with<M: CausalLm>(model: &M, ids: &[u32], args: &PplArgs, source: String) -> Result<Report> {
    let bar = if args.json {
        ProgressBar::hidden()
    } else {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(
                "{spinner} windows {pos}/{len} [{bar:30}] {elapsed} (eta {eta})",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        b
    };
    let t0 = std::time::Instant::now();
    let r = perplexity(model, ids, args.ctx, args.stride, |done, total| {
        bar.set_length(total as u64);
        bar.set_position(done as u64);
    })?;
    bar.finish_and_clear();
    let seconds = t0.elapsed().as_secs_f64();
    let report = Report {
        model: source,
        data: args.data.display().to_string(),
        device: model.device(),
        perplexity: r.perplexity,
        nll_per_token: r.nll,
        tokens: ids.len(),
        scored_tokens: r.scored_tokens,
        ctx: r.ctx,
        stride: r.stride,
        windows: r.windows,
        seconds,
        tokens_per_second: (r.windows * r.ctx.min(ids.len())) as f64 / seconds.max(1e-9),
    };
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn perplexity_of_a_tiny_gguf_on_a_text_file() {
        let (dir, model, data) = crate::cmd::tiny_model_and_text("blr-cli-eval", 4, 4);
        let a = |tokens, ctx, stride, json| PplArgs {
            model: model.display().to_string(),
            tokenizer: None,
            data: data.clone(),
            tokens,
            ctx,
            stride,
            device: "cpu".into(),
            max_gpu_mem: None,
            json,
        };
        run(Args {
            what: What::Ppl(a(100, 32, 16, true)),
        })
        .unwrap();
        run(Args {
            what: What::Ppl(a(0, 64, 64, false)),
        })
        .unwrap();
        assert!(run(Args {
            what: What::Ppl(a(100, 32, 33, true))
        })
        .is_err());
        // The same model saved as a blr checkpoint, tokenizer taken from the GGUF: same result.
        let direct = measure_ppl(&a(100, 32, 16, true)).unwrap();
        let loaded = loader::load_llama(&model.display().to_string()).unwrap();
        let ck = dir.join("tiny.safetensors");
        loader::save_checkpoint(
            &ck,
            &loaded.cfg,
            &loaded.weights,
            blr_core::safetensors::Dtype::F32,
        )
        .unwrap();
        let mut via_ck = a(100, 32, 16, true);
        via_ck.model = ck.display().to_string();
        assert!(measure_ppl(&via_ck)
            .unwrap_err()
            .to_string()
            .contains("--tokenizer"));
        via_ck.tokenizer = Some(model.display().to_string());
        let r = measure_ppl(&via_ck).unwrap();
        assert_eq!(
            (r.perplexity, r.scored_tokens),
            (direct.perplexity, direct.scored_tokens)
        );
        assert!(direct.perplexity > 1.0 && direct.perplexity.is_finite());

        // A GPT-2 HF directory carries its own tokenizer (vocab.json + merges.txt).
        let gpt2 = crate::cmd::generate::tests::tiny_gpt2_dir("eval");
        let mut g = a(60, 16, 8, true);
        g.model = gpt2.display().to_string();
        let r = measure_ppl(&g).unwrap();
        assert_eq!(r.tokens, 60);
        assert!(r.perplexity > 1.0 && r.perplexity.is_finite());
        std::fs::remove_dir_all(&gpt2).ok();
        std::fs::remove_dir_all(&dir).ok();
    }
}
