//! `blr eval agree`: how closely a compressed model follows its dense reference, token by
//! token: top-1 agreement and mean KL(reference || model) of the next-token distributions.

use super::compress::encode_prefix;
use anyhow::{bail, Context, Result};
use blr_models::cpu::Cpu;
use blr_models::llama::Llama;
use blr_models::lm::CausalLm;
use blr_models::loader;
use std::path::PathBuf;

/// Compare a model's next-token predictions with a reference model's on the same text.
///
/// For every position of the first --tokens tokens (windows of --ctx tokens) both models
/// predict the next token; reported are the fraction of positions where their most likely
/// tokens agree and the mean KL divergence KL(reference || model) in nats. Perplexity says how
/// good a model is; agreement says how much compression changed it.
///
/// Example:
///   blr eval agree --model smol-blast.safetensors --reference smollm2 --data data/wikitext-2/test.txt
#[derive(clap::Args)]
#[command(verbatim_doc_comment)]
pub struct AgreeArgs {
    /// The model to check (same forms as `blr eval ppl --model`).
    #[arg(long)]
    pub model: String,
    /// The reference model, usually the dense original (e.g. `smollm2`).
    #[arg(long)]
    pub reference: String,
    /// A GGUF file to take the tokenizer from when neither model file carries one.
    #[arg(long)]
    pub tokenizer: Option<String>,
    /// UTF-8 text file.
    #[arg(long)]
    pub data: PathBuf,
    /// Positions to compare.
    #[arg(long, default_value_t = 2048)]
    pub tokens: usize,
    /// Window length.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

#[derive(serde::Serialize, Debug, PartialEq)]
pub struct Agreement {
    pub top1_agreement: f64,
    pub mean_kl: f64,
    pub positions: usize,
    pub ctx: usize,
}

/// The log-probabilities of one row of logits, in f64.
pub(crate) fn log_softmax(row: &[f32]) -> Vec<f64> {
    let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b)) as f64;
    let lse = row
        .iter()
        .map(|&v| (v as f64 - max).exp())
        .sum::<f64>()
        .ln()
        + max;
    row.iter().map(|&v| v as f64 - lse).collect()
}

/// `KL(p || q)` in nats from the log-probabilities of two distributions over the same outcomes.
pub(crate) fn kl_divergence(log_p: &[f64], log_q: &[f64]) -> f64 {
    log_p
        .iter()
        .zip(log_q)
        .map(|(&p, &q)| p.exp() * (p - q))
        .sum()
}

fn argmax(row: &[f32]) -> usize {
    row.iter()
        .enumerate()
        .fold((0, f32::NEG_INFINITY), |(bi, bv), (i, &v)| {
            if v > bv {
                (i, v)
            } else {
                (bi, bv)
            }
        })
        .0
}

/// Agreement of `model` with `reference` over `ids`, in disjoint windows of `ctx` tokens.
pub fn agreement<A: CausalLm, B: CausalLm>(
    model: &A,
    reference: &B,
    ids: &[u32],
    ctx: usize,
) -> Result<Agreement> {
    let v = reference.vocab_size();
    if model.vocab_size() != v {
        bail!(
            "the models have different vocabularies ({} vs {v} tokens)",
            model.vocab_size()
        );
    }
    if ctx < 1 {
        bail!("--ctx must be >= 1");
    }
    let (mut agree, mut kl, mut n) = (0usize, 0.0f64, 0usize);
    let mut cm = model.new_cache(ctx)?;
    let mut cr = reference.new_cache(ctx)?;
    for window in ids.chunks(ctx) {
        model.clear_cache(&mut cm);
        reference.clear_cache(&mut cr);
        let lm = model.forward(window, &mut cm, true)?;
        let lr = reference.forward(window, &mut cr, true)?;
        for (rm, rr) in lm.chunks(v).zip(lr.chunks(v)) {
            agree += usize::from(argmax(rm) == argmax(rr));
            let (pm, pr) = (log_softmax(rm), log_softmax(rr));
            kl += kl_divergence(&pr, &pm);
            n += 1;
        }
    }
    if n == 0 {
        bail!("no positions to compare: the text has no tokens");
    }
    Ok(Agreement {
        top1_agreement: agree as f64 / n as f64,
        mean_kl: kl / n as f64,
        positions: n,
        ctx,
    })
}

pub fn agree(args: AgreeArgs) -> Result<()> {
    let reference = loader::load_llama(&args.reference)?;
    let model = loader::load_llama(&args.model)?;
    let tok = match (&args.tokenizer, &reference.tokenizer, &model.tokenizer) {
        (Some(path), _, _) => loader::tokenizer_from_gguf(&loader::resolve_path(path)?)?,
        (None, Some(t), _) | (None, None, Some(t)) => t.clone(),
        (None, None, None) => {
            bail!("neither model carries a tokenizer: pass --tokenizer FILE.gguf")
        }
    };
    let text = std::fs::read_to_string(&args.data)
        .with_context(|| format!("reading {}", args.data.display()))?;
    let mut ids = encode_prefix(&tok, &text, args.tokens, false)?;
    ids.truncate(args.tokens);
    let ctx = args.ctx.min(reference.cfg.max_positions);
    let r = Llama::load(Cpu, reference.cfg, reference.weights)?;
    let m = Llama::load(Cpu, model.cfg, model.weights)?;
    let a = agreement(&m, &r, &ids, ctx)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&a)?);
    } else {
        println!(
            "top-1 agreement {:.2}%, mean KL(reference || model) {:.4} nats over {} positions (windows of {})",
            100.0 * a.top1_agreement,
            a.mean_kl,
            a.positions,
            a.ctx
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Logits = `scale` * one-hot((id + shift) mod vocab): predicts a fixed successor.
    struct Fake {
        shift: u32,
        scale: f32,
    }
    const V: usize = 7;

    impl CausalLm for Fake {
        type Cache = ();
        fn vocab_size(&self) -> usize {
            V
        }
        fn device(&self) -> String {
            "fake".into()
        }
        fn max_positions(&self) -> usize {
            64
        }
        fn new_cache(&self, _: usize) -> blr_models::Result<()> {
            Ok(())
        }
        fn clear_cache(&self, _: &mut ()) {}
        fn forward(&self, ids: &[u32], _: &mut (), _: bool) -> blr_models::Result<Vec<f32>> {
            let mut out = vec![0.0f32; ids.len() * V];
            for (t, &id) in ids.iter().enumerate() {
                out[t * V + ((id + self.shift) as usize % V)] = self.scale;
            }
            Ok(out)
        }
    }

    #[test]
    fn agreement_and_kl_of_known_distributions() {
        let ids: Vec<u32> = (0..20).map(|i| (i * 3 % 7) as u32).collect();
        let a = Fake {
            shift: 1,
            scale: 2.0,
        };
        let same = agreement(
            &a,
            &Fake {
                shift: 1,
                scale: 2.0,
            },
            &ids,
            8,
        )
        .unwrap();
        assert_eq!((same.top1_agreement, same.positions), (1.0, 20));
        assert!(same.mean_kl.abs() < 1e-12);
        // Same argmax, different confidence: full agreement, positive KL.
        let softer = agreement(
            &Fake {
                shift: 1,
                scale: 1.0,
            },
            &a,
            &ids,
            8,
        )
        .unwrap();
        assert_eq!(softer.top1_agreement, 1.0);
        assert!(softer.mean_kl > 0.05, "{}", softer.mean_kl);
        // Another successor: no agreement. KL of p = softmax(2 e_i) against q = softmax(2 e_j).
        let other = agreement(
            &Fake {
                shift: 2,
                scale: 2.0,
            },
            &a,
            &ids,
            8,
        )
        .unwrap();
        assert_eq!(other.top1_agreement, 0.0);
        let z = 2f64.exp() + (V as f64 - 1.0);
        let expected = (2f64.exp() / z) * 2.0 - (1.0 / z) * 2.0;
        assert!(
            (other.mean_kl - expected).abs() < 1e-9,
            "{} vs {expected}",
            other.mean_kl
        );
    }
}
