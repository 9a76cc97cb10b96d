//! Small, complete model files built in memory, so that the loaders, the CLI and CI can exercise
//! the whole path (GGUF parse, tokenizer, Q/K un-permutation, generation, perplexity) without
//! the 98 MB SmolLM2 download.

use crate::gguf::{GgufBuilder, Value};
use crate::llama::{self, LlamaConfig, RopeScaling};
use crate::Result;

/// GPT-2's byte-to-character table (the inverse of what the tokenizer decodes).
fn byte_chars() -> Vec<String> {
    let mut next = 256u32;
    (0..=255u8)
        .map(|b| {
            let printable = (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
            let cp = if printable {
                u32::from(b)
            } else {
                next += 1;
                next - 1
            };
            char::from_u32(cp).map(String::from).unwrap_or_default()
        })
        .collect()
}

/// A tiny Llama GGUF v3 with random weights (seeded) and a byte-level BPE tokenizer: tokens
/// `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` (control), the 256 byte characters, and the
/// merges given (each `"a b"` adds token `"ab"`). Q/K rows are stored permuted the way
/// llama.cpp's converter stores them.
pub fn tiny_llama_gguf(seed: u64, merges: &[&str]) -> Result<Vec<u8>> {
    let mut tokens: Vec<String> = vec![
        "<|endoftext|>".into(),
        "<|im_start|>".into(),
        "<|im_end|>".into(),
    ];
    tokens.extend(byte_chars());
    for m in merges {
        tokens.push(m.replace(' ', ""));
    }
    let mut types = vec![1i32; tokens.len()];
    types[..3].fill(3);
    let cfg = LlamaConfig {
        vocab_size: tokens.len(),
        hidden: 32,
        intermediate: 48,
        layers: 2,
        heads: 4,
        kv_heads: 2,
        head_dim: 8,
        rope_theta: 1e4,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        tie_embeddings: true,
        max_positions: 256,
    };
    let (cfg, ck) = llama::random(&cfg, seed, None)?;
    let mut b = GgufBuilder::new();
    let u = |v: usize| Value::U32(v as u32);
    b.meta("general.architecture", Value::Str("llama".into()))
        .meta("llama.block_count", u(cfg.layers))
        .meta("llama.context_length", u(cfg.max_positions))
        .meta("llama.embedding_length", u(cfg.hidden))
        .meta("llama.feed_forward_length", u(cfg.intermediate))
        .meta("llama.attention.head_count", u(cfg.heads))
        .meta("llama.attention.head_count_kv", u(cfg.kv_heads))
        .meta("llama.rope.dimension_count", u(cfg.head_dim))
        .meta("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_eps as f32),
        )
        .meta("llama.vocab_size", u(cfg.vocab_size))
        .meta("tokenizer.ggml.model", Value::Str("gpt2".into()))
        .meta("tokenizer.ggml.pre", Value::Str("smollm".into()))
        .meta(
            "tokenizer.ggml.tokens",
            Value::Array(tokens.into_iter().map(Value::Str).collect()),
        )
        .meta(
            "tokenizer.ggml.token_type",
            Value::Array(types.into_iter().map(Value::I32).collect()),
        )
        .meta(
            "tokenizer.ggml.merges",
            Value::Array(merges.iter().map(|m| Value::Str(m.to_string())).collect()),
        )
        .meta("tokenizer.ggml.bos_token_id", Value::U32(1))
        .meta("tokenizer.ggml.eos_token_id", Value::U32(2));
    let t = |n: &str| &ck.tensors[n];
    let e = t("model.embed_tokens.weight");
    b.tensor_f32("token_embd.weight", &e.shape, &e.data);
    let nw = t("model.norm.weight");
    b.tensor_f32("output_norm.weight", &nw.shape, &nw.data);
    let names = [
        ("attn_q", "self_attn.q_proj"),
        ("attn_k", "self_attn.k_proj"),
        ("attn_v", "self_attn.v_proj"),
        ("attn_output", "self_attn.o_proj"),
        ("ffn_gate", "mlp.gate_proj"),
        ("ffn_up", "mlp.up_proj"),
        ("ffn_down", "mlp.down_proj"),
    ];
    for i in 0..cfg.layers {
        for (gg, hf) in names {
            let Some(layer) = ck.layer(&format!("model.layers.{i}.{hf}")) else {
                continue;
            };
            let d = layer.to_dense()?;
            let heads = match gg {
                "attn_q" => cfg.heads,
                "attn_k" => cfg.kv_heads,
                _ => 0,
            };
            let w = if heads > 0 {
                permute_for_gguf(&d.weight, heads, d.n)
            } else {
                d.weight.clone()
            };
            b.tensor_f32(&format!("blk.{i}.{gg}.weight"), &[d.m, d.n], &w);
        }
        let a = t(&format!("model.layers.{i}.input_layernorm.weight"));
        b.tensor_f32(&format!("blk.{i}.attn_norm.weight"), &a.shape, &a.data);
        let f = t(&format!("model.layers.{i}.post_attention_layernorm.weight"));
        b.tensor_f32(&format!("blk.{i}.ffn_norm.weight"), &f.shape, &f.data);
    }
    Ok(b.build())
}

/// llama.cpp's converter permutation: within each head of `hd` rows, HF row `j * hd/2 + i`
/// goes to row `2i + j`.
fn permute_for_gguf(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols.max(1);
    let hd = rows / heads.max(1);
    let half = hd / 2;
    let mut out = vec![0.0; w.len()];
    for h in 0..heads {
        for r in 0..hd {
            let (i, j) = (r % half, r / half);
            let dst = (h * hd + 2 * i + j) * cols;
            out[dst..dst + cols].copy_from_slice(&w[(h * hd + r) * cols..(h * hd + r + 1) * cols]);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::Cpu;
    use crate::gguf::GgufFile;
    use crate::llama::Llama;
    use crate::lm::{generate, Sampler};
    use crate::tokenizer::Tokenizer;

    #[test]
    fn tiny_gguf_loads_tokenizes_and_generates() {
        let bytes = tiny_llama_gguf(1, &["h e", "l l", "he ll", "Ġ w"]).unwrap();
        let f = GgufFile::from_bytes("tiny.gguf", bytes).unwrap();
        let t = Tokenizer::from_gguf(&f).unwrap();
        let ids = t.encode("<|im_start|>hello w", true).unwrap();
        let strs: Vec<&str> = ids.iter().map(|&i| t.token_str(i).unwrap()).collect();
        assert_eq!(strs, vec!["<|im_start|>", "hell", "o", "Ġw"]);
        let (cfg, ck) = llama::from_gguf(&f).unwrap();
        let model = Llama::load(Cpu, cfg, ck).unwrap();
        let stats = generate(&model, &ids, 5, &mut Sampler::greedy(), &[], |_| Ok(())).unwrap();
        assert_eq!(stats.generated.len(), 5);
    }
}
