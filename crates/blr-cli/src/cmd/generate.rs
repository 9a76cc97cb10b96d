//! `blr generate`: text generation with a KV cache, streaming tokens as they are chosen.

use anyhow::{Context, Result};
use blr_models::cpu::Cpu;
use blr_models::cuda::Cuda;
use blr_models::gpt2::Gpt2;
use blr_models::llama::Llama;
use blr_models::lm::{generate, CausalLm, Sampler};
use blr_models::loader::{self, LoadedLm};
use blr_models::tokenizer::{StreamDecoder, Tokenizer};
use std::io::Write;

/// Generate text from a Llama-family or GPT-2 model, streaming tokens to stdout and reporting
/// speed.
///
/// The prompt is prefilled in one forward pass (all its tokens at once), then tokens are decoded
/// one at a time against the KV cache. Sampling is greedy with --temperature 0 (the default),
/// else softmax at that temperature restricted to the top-p nucleus, drawn from a generator
/// seeded by --seed: the same command always prints the same text.
///
/// Examples:
///   scripts/fetch-smollm2.sh                       # once: 98 MB into ~/.cache/blr
///   blr generate --model smollm2 --chat --prompt "What is the capital of France?"
///   blr generate --model model.gguf --prompt "Once upon a time" -n 128 --temperature 0.8 --top-p 0.95 --seed 7
///   blr generate --model compressed.safetensors --tokenizer model.gguf --prompt "Hello"
#[derive(clap::Args)]
#[command(verbatim_doc_comment, after_help = AFTER_HELP)]
pub struct Args {
    /// The model: `smollm2` (the cached SmolLM2-135M-Instruct), a Llama GGUF file, a blr
    /// checkpoint (.safetensors recording a Llama or GPT-2 config), a Hugging Face directory
    /// (config.json + model.safetensors; Llama or GPT-2, GPT-2 with its vocab.json/merges.txt),
    /// or random:NAME[:LAYERS] with NAME one of llama7b, llama3.2-1b, smollm2-135m, gpt2s, gpt2m
    /// (random weights; prints token ids). Models without a tokenizer need --tokenizer.
    #[arg(long)]
    pub model: String,
    /// A GGUF file to take the tokenizer from, when the model file has none.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// The prompt text. Special tokens written in it (e.g. <|im_start|>) are recognised.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the ChatML template (<|im_start|>user ... <|im_start|>assistant) that
    /// SmolLM2-Instruct was tuned on.
    #[arg(long)]
    pub chat: bool,
    /// Maximum number of new tokens (stops earlier at end-of-sequence).
    #[arg(short = 'n', long = "max-tokens", default_value_t = 64)]
    pub max_tokens: usize,
    /// Softmax temperature; 0 means greedy (always the most likely token).
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the most likely tokens until their probability reaches this.
    #[arg(long, default_value_t = 0.95)]
    pub top_p: f32,
    /// Seed of the sampling generator.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to run: cpu (f32 reference) or cuda (bf16).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    pub device: String,
    /// With --device cuda: cap on the device memory blr may allocate (weights, KV cache,
    /// activations, workspaces), e.g. 6GiB, 512MiB; an allocation past it fails with a message
    /// naming what did not fit. Default: BLR_MAX_GPU_MEM, else no cap beyond the device.
    #[arg(long, value_name = "SIZE", value_parser = super::doctor::parse_size)]
    pub max_gpu_mem: Option<blr_cuda::Bytes>,
    /// Choose each token on the host from the downloaded logits, as before device sampling
    /// existed (with --device cuda the choice is otherwise made on the GPU; same tokens): for
    /// comparing the two.
    #[arg(long)]
    pub host_sampling: bool,
    /// Print one JSON object (text, token ids, timings) instead of streaming.
    #[arg(long)]
    pub json: bool,
}

/// Shown after the options (the subcommand's one-line doc in main.rs replaces the struct's).
const AFTER_HELP: &str = "\
The prompt is prefilled in one forward pass, then tokens are decoded one at a time against the
KV cache and printed as they come; speed is reported on stderr at the end. Sampling is greedy
with --temperature 0 (the default), else softmax at that temperature restricted to the top-p
nucleus, drawn from a generator seeded by --seed: the same command prints the same text. With
--device cuda the token is chosen on the GPU (only its id comes back), exactly as the host would
choose it from the same logits; --max-gpu-mem caps the device memory blr may use.

Examples:
  scripts/fetch-smollm2.sh        # once: SmolLM2-135M-Instruct (98 MB) into ~/.cache/blr
  blr generate --model smollm2 --chat --prompt \"What is the capital of France?\"
  blr generate --model smollm2 --prompt \"Once upon a time\" -n 128 --temperature 0.8 --top-p 0.95 --seed 7
  blr generate --model compressed.safetensors --tokenizer smollm2 --prompt \"Hello\"
  blr generate --model path/to/hf-gpt2-dir --prompt \"Hello\" --json";

#[derive(serde::Serialize)]
struct Report {
    model: String,
    device: String,
    prompt_tokens: usize,
    generated_tokens: usize,
    token_ids: Vec<u32>,
    text: Option<String>,
    stopped_at_eos: bool,
    prefill_seconds: f64,
    prefill_tokens_per_second: f64,
    decode_seconds: f64,
    decode_tokens_per_second: f64,
    load_seconds: f64,
    /// Peak device memory blr allocated (weights, KV cache, activations, workspaces); cuda only.
    #[serde(skip_serializing_if = "Option::is_none")]
    gpu_peak_bytes: Option<u64>,
}

pub fn run(args: Args) -> Result<()> {
    let t_load = std::time::Instant::now();
    let loaded =
        loader::load_lm(&args.model).with_context(|| format!("loading model '{}'", args.model))?;
    let tokenizer = match &args.tokenizer {
        Some(path) => {
            let p = loader::resolve_path(path)?;
            Some(
                loader::tokenizer_from_gguf(&p)
                    .with_context(|| format!("reading the tokenizer from {}", p.display()))?,
            )
        }
        None => loaded.tokenizer().cloned(),
    };
    let source = loaded.source().to_string();
    let cuda = || super::open_cuda(args.max_gpu_mem);
    let loading = "loading the weights onto the GPU";
    match loaded {
        LoadedLm::Llama(l) if args.device == "cuda" => {
            let gpu = cuda()?;
            let model = Llama::load(gpu.clone(), l.cfg, l.weights).context(loading)?;
            generate_with(&model, tokenizer, &args, source, t_load, Some(&gpu))
        }
        LoadedLm::Gpt2(g) if args.device == "cuda" => {
            let gpu = cuda()?;
            let model = Gpt2::load(gpu.clone(), g.cfg, g.weights).context(loading)?;
            generate_with(&model, tokenizer, &args, source, t_load, Some(&gpu))
        }
        LoadedLm::Llama(l) => {
            let model = Llama::load(Cpu, l.cfg, l.weights)?;
            generate_with(&model, tokenizer, &args, source, t_load, None)
        }
        LoadedLm::Gpt2(g) => {
            let model = Gpt2::load(Cpu, g.cfg, g.weights)?;
            generate_with(&model, tokenizer, &args, source, t_load, None)
        }
    }
}

/// Generation with any causal LM (Llama, GPT-2), already loaded.
fn generate_with<M: CausalLm>(
    model: &M,
    tokenizer: Option<Tokenizer>,
    args: &Args,
    source: String,
    t_load: std::time::Instant,
    gpu: Option<&Cuda>,
) -> Result<()> {
    let load_seconds = t_load.elapsed().as_secs_f64();

    let prompt_text = if args.chat {
        format!(
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
            args.prompt
        )
    } else {
        args.prompt.clone()
    };
    let (ids, stop) = match &tokenizer {
        Some(t) => {
            let mut stop: Vec<u32> = t.eos.into_iter().collect();
            // ChatML ends a turn with <|im_end|>, which is not always the file's EOS.
            if let Some(id) = t.token_id("<|im_end|>") {
                if t.is_special(id) && !stop.contains(&id) {
                    stop.push(id);
                }
            }
            (t.encode(&prompt_text, true)?, stop)
        }
        None => {
            // Random weights have no vocabulary: the prompt's bytes stand in as token ids.
            let v = model.vocab_size();
            let ids = prompt_text
                .bytes()
                .map(|b| u32::from(b) % v as u32)
                .collect();
            (ids, Vec::new())
        }
    };
    let mut sampler = Sampler::new(args.temperature, args.top_p, args.seed)?;

    let mut out = std::io::stdout().lock();
    let mut decoder = StreamDecoder::new();
    let streaming = !args.json;
    // The prompt is echoed with the first generated token, not before: a run that fails before
    // producing anything (the KV cache or the prefill over the GPU memory cap) prints nothing.
    let mut echoed = false;
    let on_token = |id| {
        if streaming {
            if !echoed {
                echoed = true;
                if write!(out, "{prompt_text}").is_err() {
                    return Err(blr_models::Error::input("stdout", "closed"));
                }
            }
            let piece = match &tokenizer {
                Some(t) => decoder.push(t, id),
                None => format!(" {id}"),
            };
            // A closed pipe (e.g. `| head`) ends generation quietly.
            if write!(out, "{piece}").and_then(|()| out.flush()).is_err() {
                return Err(blr_models::Error::input("stdout", "closed"));
            }
        }
        Ok(())
    };
    let stats = if args.host_sampling {
        let host = blr_models::lm::HostSampling(model);
        generate(&host, &ids, args.max_tokens, &mut sampler, &stop, on_token)
    } else {
        generate(model, &ids, args.max_tokens, &mut sampler, &stop, on_token)
    };
    let stats = match stats {
        Ok(s) => s,
        Err(blr_models::Error::Input { what, .. }) if what == "stdout" => return Ok(()),
        Err(e) => {
            return Err(anyhow::Error::from(e).context(match gpu {
                Some(_) => "generating on the GPU",
                None => "generating",
            }))
        }
    };
    if streaming && !echoed {
        write!(out, "{prompt_text}")?;
    }
    let text = tokenizer.as_ref().map(|t| t.decode(&stats.generated, true));
    let report = Report {
        model: source,
        device: model.device(),
        prompt_tokens: stats.prompt_tokens,
        generated_tokens: stats.generated.len(),
        token_ids: stats.generated.clone(),
        text,
        stopped_at_eos: stats.hit_eos,
        prefill_seconds: stats.prefill_seconds,
        prefill_tokens_per_second: stats.prompt_tokens as f64 / stats.prefill_seconds.max(1e-9),
        decode_seconds: stats.decode_seconds,
        decode_tokens_per_second: stats.decode_tokens_per_second(),
        load_seconds,
        gpu_peak_bytes: gpu.map(|g| g.gpu().mem_usage().peak.0),
    };
    if args.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
    } else {
        if tokenizer.is_some() {
            write!(out, "{}", decoder.finish())?;
        }
        writeln!(out)?;
        out.flush()?;
        eprintln!(
            "[{}] prompt {} tokens: prefill {:.3} s ({:.1} tokens/s); generated {} tokens: {:.1} tokens/s{} (load {:.2} s{})",
            report.device,
            report.prompt_tokens,
            report.prefill_seconds,
            report.prefill_tokens_per_second,
            report.generated_tokens,
            report.decode_tokens_per_second,
            if report.stopped_at_eos { ", stopped at end-of-sequence" } else { "" },
            load_seconds,
            match report.gpu_peak_bytes {
                Some(b) => format!("; GPU memory peak {}", blr_cuda::Bytes(b)),
                None => String::new(),
            }
        );
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn tiny_model_file(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("blr-cli-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        let bytes = blr_models::testing::tiny_llama_gguf(3, &["h e", "l l", "Ġ w"]).unwrap();
        std::fs::write(&path, bytes).unwrap();
        path
    }

    fn args(model: String) -> Args {
        Args {
            model,
            tokenizer: None,
            prompt: "hello world".into(),
            chat: true,
            max_tokens: 6,
            temperature: 0.7,
            top_p: 0.9,
            seed: 5,
            device: "cpu".into(),
            max_gpu_mem: None,
            host_sampling: false,
            json: true,
        }
    }

    /// An HF GPT-2 directory: config.json, model.safetensors (Conv1D layout), vocab.json and
    /// merges.txt, with random weights and a byte-level vocabulary of 256 + 3 tokens.
    pub(crate) fn tiny_gpt2_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("blr-cli-gpt2-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = blr_models::gpt2::Gpt2Config {
            vocab_size: 259,
            max_positions: 64,
            hidden: 16,
            layers: 2,
            heads: 2,
            eps: 1e-5,
        };
        let (cfg, ck) = blr_models::gpt2::random(&cfg, 1, None).unwrap();
        let owned = blr_models::reference::gpt2_hf_tensors(&ck).unwrap();
        let views: Vec<blr_core::safetensors::TensorToWrite> = owned
            .iter()
            .map(|t| blr_core::safetensors::TensorToWrite {
                name: t.name.clone(),
                dtype: blr_core::safetensors::Dtype::F32,
                shape: t.shape.clone(),
                data: &t.data,
            })
            .collect();
        blr_core::safetensors::write(&dir.join("model.safetensors"), &views, &Default::default())
            .unwrap();
        std::fs::write(
            dir.join("config.json"),
            format!(
                r#"{{"model_type": "gpt2", "vocab_size": {}, "n_positions": {}, "n_embd": {}, "n_layer": {}, "n_head": {}}}"#,
                cfg.vocab_size, cfg.max_positions, cfg.hidden, cfg.layers, cfg.heads
            ),
        )
        .unwrap();
        // GPT-2's byte table: printable Latin-1 bytes stand for themselves, others from U+0100.
        let mut next = 256u32;
        let mut vocab: Vec<String> = (0..=255u8)
            .map(|b| {
                let printable =
                    (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
                let cp = if printable {
                    u32::from(b)
                } else {
                    next += 1;
                    next - 1
                };
                char::from_u32(cp).unwrap().to_string()
            })
            .collect();
        vocab.extend([
            "Ġt".to_string(),
            "Ġth".to_string(),
            "<|endoftext|>".to_string(),
        ]);
        let json: Vec<String> = vocab
            .iter()
            .enumerate()
            .map(|(i, t)| format!("{}: {i}", serde_json::to_string(t).unwrap()))
            .collect();
        std::fs::write(dir.join("vocab.json"), format!("{{{}}}", json.join(", "))).unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\nĠ t\nĠt h\n").unwrap();
        dir
    }

    #[test]
    fn generates_from_an_hf_gpt2_directory() {
        let dir = tiny_gpt2_dir("generate");
        let mut a = args(dir.display().to_string());
        a.chat = false;
        a.prompt = "the three".into();
        run(a).unwrap();
        let mut a = args(dir.display().to_string());
        a.max_tokens = 100; // past the 64 learned positions
        assert!(format!("{:#}", run(a).unwrap_err()).contains("positions"));
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn generates_from_a_gguf_and_refuses_bad_input() {
        let path = tiny_model_file("generate");
        run(args(path.display().to_string())).unwrap();
        let mut a = args(path.display().to_string());
        a.json = false;
        a.temperature = 0.0;
        run(a).unwrap();
        let mut a = args(path.display().to_string());
        a.top_p = 1.5;
        assert!(run(a).is_err());
        let mut a = args(path.display().to_string());
        a.max_tokens = 1000; // past the tiny model's 256 positions
        assert!(format!("{:#}", run(a).unwrap_err()).contains("positions"));
        // --device cuda runs where a GPU is, and says what is missing where none is.
        let mut a = args(path.display().to_string());
        a.device = "cuda".into();
        if let Err(e) = run(a) {
            assert!(format!("{e:#}").contains("cuda"), "{e:#}");
        }
        assert!(run(args("/no/such.gguf".into())).is_err());
        std::fs::remove_dir_all(path.parent().unwrap()).ok();
    }
}
