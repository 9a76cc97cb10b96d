use super::*;
use crate::cpu::Cpu;
use crate::gguf::{GgufBuilder, Value};
use crate::lm::{generate, perplexity, CausalLm, Sampler};
use blr_core::format::{FormatKind, Shape};

/// Odd shapes on purpose: q_dim (24) != hidden (20), 3 query heads per kv head, vocab 37.
fn tiny(tied: bool) -> LlamaConfig {
    LlamaConfig {
        vocab_size: 37,
        hidden: 20,
        intermediate: 28,
        layers: 2,
        heads: 6,
        kv_heads: 2,
        head_dim: 4,
        rope_theta: 1e4,
        rope_scaling: RopeScaling::None,
        rms_eps: 1e-5,
        tie_embeddings: tied,
        max_positions: 64,
    }
}

/// Replaces three layers by random layers in the three BLR formats.
fn mix_formats(ck: &mut Checkpoint, seed: u64) {
    let set = |ck: &mut Checkpoint, name: &str, shape: Shape, seed: u64| {
        let l = Linear::random(&shape, seed).unwrap();
        let slot = ck.layers.iter_mut().find(|(n, _)| n == name).unwrap();
        slot.1 = l;
    };
    let shape = |format, m, n, b_out, b_in, rank| Shape {
        format,
        m,
        n,
        b_out,
        b_in,
        rank,
    };
    set(
        ck,
        "model.layers.0.self_attn.q_proj",
        shape(FormatKind::LowRank, 24, 20, 1, 1, 5),
        seed,
    );
    set(
        ck,
        "model.layers.1.mlp.up_proj",
        shape(FormatKind::Monarch, 28, 20, 2, 2, 4),
        seed + 1,
    );
    set(
        ck,
        "model.layers.0.mlp.down_proj",
        shape(FormatKind::Blast, 20, 28, 2, 4, 3),
        seed + 2,
    );
}

/// The forward pass straight from the definitions, in f64, from the checkpoint's dense
/// matrices (each BLR layer densified by its own format definition).
fn reference_logits(cfg: &LlamaConfig, ck: &Checkpoint, ids: &[u32]) -> Vec<f64> {
    let dense = |name: &str| -> (usize, usize, Vec<f64>) {
        let l = ck.layer(name).unwrap().to_dense().unwrap();
        (l.m, l.n, l.weight.iter().map(|&x| f64::from(x)).collect())
    };
    let tensor = |name: &str| -> Vec<f64> {
        ck.tensors[name]
            .data
            .iter()
            .map(|&x| f64::from(x))
            .collect()
    };
    let lin = |x: &[f64], name: &str| -> Vec<f64> {
        let (m, n, w) = dense(name);
        let t = x.len() / n;
        let mut y = vec![0.0; t * m];
        for r in 0..t {
            for o in 0..m {
                y[r * m + o] = (0..n).map(|i| x[r * n + i] * w[o * n + i]).sum();
            }
        }
        y
    };
    let h = cfg.hidden;
    let rms = |x: &[f64], w: &[f64]| -> Vec<f64> {
        x.chunks(h)
            .flat_map(|row| {
                let ms = row.iter().map(|v| v * v).sum::<f64>() / h as f64;
                let inv = 1.0 / (ms + cfg.rms_eps).sqrt();
                row.iter()
                    .zip(w)
                    .map(move |(v, g)| v * inv * g)
                    .collect::<Vec<_>>()
            })
            .collect()
    };
    let d = cfg.head_dim;
    let rope = |x: &mut [f64], heads: usize| {
        let cols = heads * d;
        for (t, row) in x.chunks_mut(cols).enumerate() {
            for hh in 0..heads {
                for i in 0..d / 2 {
                    let theta = t as f64 * cfg.rope_theta.powf(-2.0 * i as f64 / d as f64);
                    let (a, b) = (row[hh * d + i], row[hh * d + i + d / 2]);
                    row[hh * d + i] = a * theta.cos() - b * theta.sin();
                    row[hh * d + i + d / 2] = a * theta.sin() + b * theta.cos();
                }
            }
        }
    };
    let emb = tensor("model.embed_tokens.weight");
    let t = ids.len();
    let mut x: Vec<f64> = ids
        .iter()
        .flat_map(|&i| emb[i as usize * h..(i as usize + 1) * h].to_vec())
        .collect();
    for l in 0..cfg.layers {
        let p = format!("model.layers.{l}");
        let hn = rms(&x, &tensor(&format!("{p}.input_layernorm.weight")));
        let mut q = lin(&hn, &format!("{p}.self_attn.q_proj"));
        let mut k = lin(&hn, &format!("{p}.self_attn.k_proj"));
        let v = lin(&hn, &format!("{p}.self_attn.v_proj"));
        rope(&mut q, cfg.heads);
        rope(&mut k, cfg.kv_heads);
        let (qc, kc) = (cfg.heads * d, cfg.kv_heads * d);
        let mut a = vec![0.0; t * qc];
        for hh in 0..cfg.heads {
            let kh = hh / (cfg.heads / cfg.kv_heads);
            for i in 0..t {
                let s: Vec<f64> = (0..=i)
                    .map(|j| {
                        (0..d)
                            .map(|e| q[i * qc + hh * d + e] * k[j * kc + kh * d + e])
                            .sum::<f64>()
                            / (d as f64).sqrt()
                    })
                    .collect();
                let m = s.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = s.iter().map(|v| (v - m).exp()).sum();
                for e in 0..d {
                    a[i * qc + hh * d + e] = (0..=i)
                        .map(|j| (s[j] - m).exp() / z * v[j * kc + kh * d + e])
                        .sum();
                }
            }
        }
        let o = lin(&a, &format!("{p}.self_attn.o_proj"));
        x.iter_mut().zip(&o).for_each(|(a, b)| *a += b);
        let hn = rms(&x, &tensor(&format!("{p}.post_attention_layernorm.weight")));
        let g = lin(&hn, &format!("{p}.mlp.gate_proj"));
        let u = lin(&hn, &format!("{p}.mlp.up_proj"));
        let m: Vec<f64> = g
            .iter()
            .zip(&u)
            .map(|(g, u)| g / (1.0 + (-g).exp()) * u)
            .collect();
        let dd = lin(&m, &format!("{p}.mlp.down_proj"));
        x.iter_mut().zip(&dd).for_each(|(a, b)| *a += b);
    }
    let x = rms(&x, &tensor("model.norm.weight"));
    if cfg.tie_embeddings {
        let v = cfg.vocab_size;
        let mut y = vec![0.0; t * v];
        for r in 0..t {
            for o in 0..v {
                y[r * v + o] = (0..h).map(|i| x[r * h + i] * emb[o * h + i]).sum();
            }
        }
        y
    } else {
        lin(&x, "lm_head")
    }
}

fn assert_close(got: &[f32], want: &[f64], rel: f64) {
    assert_eq!(got.len(), want.len());
    let num: f64 = got
        .iter()
        .zip(want)
        .map(|(&a, b)| (f64::from(a) - b).powi(2))
        .sum();
    let den: f64 = want.iter().map(|b| b * b).sum();
    let err = (num / den).sqrt();
    assert!(err < rel, "relative error {err} >= {rel}");
}

fn random_ids(seed: u64, n: usize, vocab: usize) -> Vec<u32> {
    let mut rng = Rng::new(seed);
    (0..n).map(|_| rng.below(vocab) as u32).collect()
}

#[test]
fn forward_matches_reference_in_every_format() {
    for (tied, seed) in [(false, 1u64), (true, 2)] {
        let (cfg, mut ck) = random(&tiny(tied), seed, None).unwrap();
        mix_formats(&mut ck, seed * 10);
        let ids = random_ids(seed, 11, cfg.vocab_size);
        let want = reference_logits(&cfg, &ck, &ids);
        let model = Llama::load(Cpu, cfg.clone(), ck).unwrap();
        let mut cache = model.new_cache(16).unwrap();
        let got = model.forward(&ids, &mut cache, true).unwrap();
        assert_close(&got, &want, 1e-5);
    }
}

#[test]
fn kv_cache_decoding_equals_full_forward() {
    let (cfg, mut ck) = random(&tiny(true), 3, None).unwrap();
    mix_formats(&mut ck, 7);
    let model = Llama::load(Cpu, cfg.clone(), ck).unwrap();
    let ids = random_ids(4, 9, cfg.vocab_size);
    let mut cache = model.new_cache(9).unwrap();
    let full = model.forward(&ids, &mut cache, true).unwrap();
    let v = cfg.vocab_size;
    // Prefill 4, then one token at a time: each last-position output must match the row of
    // the full forward.
    let mut cache = model.new_cache(9).unwrap();
    let last = model.forward(&ids[..4], &mut cache, false).unwrap();
    assert_close(
        &last,
        &full[3 * v..4 * v]
            .iter()
            .map(|&x| f64::from(x))
            .collect::<Vec<_>>(),
        1e-5,
    );
    for p in 4..9 {
        let step = model.forward(&ids[p..=p], &mut cache, false).unwrap();
        let want: Vec<f64> = full[p * v..(p + 1) * v]
            .iter()
            .map(|&x| f64::from(x))
            .collect();
        assert_close(&step, &want, 1e-5);
    }
    assert!(
        model.forward(&ids[..1], &mut cache, false).is_err(),
        "cache overflow must be an error"
    );
}

/// llama.cpp's converter permutation (HF half-split rows -> ggml interleaved rows), written
/// forwards so that the loader's inverse is checked against an independent statement.
fn permute_for_gguf(w: &[f32], heads: usize, cols: usize) -> Vec<f32> {
    let rows = w.len() / cols;
    let hd = rows / heads;
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

fn to_gguf(cfg: &LlamaConfig, ck: &Checkpoint) -> Vec<u8> {
    let mut b = GgufBuilder::new();
    b.meta("general.architecture", Value::Str("llama".into()))
        .meta("llama.block_count", Value::U32(cfg.layers as u32))
        .meta("llama.context_length", Value::U32(cfg.max_positions as u32))
        .meta("llama.embedding_length", Value::U32(cfg.hidden as u32))
        .meta(
            "llama.feed_forward_length",
            Value::U32(cfg.intermediate as u32),
        )
        .meta("llama.attention.head_count", Value::U32(cfg.heads as u32))
        .meta(
            "llama.attention.head_count_kv",
            Value::U32(cfg.kv_heads as u32),
        )
        .meta(
            "llama.rope.dimension_count",
            Value::U32(cfg.head_dim as u32),
        )
        .meta("llama.rope.freq_base", Value::F32(cfg.rope_theta as f32))
        .meta(
            "llama.attention.layer_norm_rms_epsilon",
            Value::F32(cfg.rms_eps as f32),
        )
        .meta("llama.vocab_size", Value::U32(cfg.vocab_size as u32));
    let t = |n: &str| &ck.tensors[n];
    let e = t("model.embed_tokens.weight");
    b.tensor_f32("token_embd.weight", &e.shape, &e.data);
    let nw = t("model.norm.weight");
    b.tensor_f32("output_norm.weight", &nw.shape, &nw.data);
    if !cfg.tie_embeddings {
        let d = ck.layer("lm_head").unwrap().to_dense().unwrap();
        b.tensor_f32("output.weight", &[d.m, d.n], &d.weight);
    }
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
            let d = ck
                .layer(&format!("model.layers.{i}.{hf}"))
                .unwrap()
                .to_dense()
                .unwrap();
            let w = match gg {
                "attn_q" => permute_for_gguf(&d.weight, cfg.heads, d.n),
                "attn_k" => permute_for_gguf(&d.weight, cfg.kv_heads, d.n),
                _ => d.weight.clone(),
            };
            b.tensor_f32(&format!("blk.{i}.{gg}.weight"), &[d.m, d.n], &w);
        }
        let a = t(&format!("model.layers.{i}.input_layernorm.weight"));
        b.tensor_f32(&format!("blk.{i}.attn_norm.weight"), &a.shape, &a.data);
        let f = t(&format!("model.layers.{i}.post_attention_layernorm.weight"));
        b.tensor_f32(&format!("blk.{i}.ffn_norm.weight"), &f.shape, &f.data);
    }
    b.build()
}

#[test]
fn gguf_loading_undoes_the_qk_permutation() {
    for tied in [false, true] {
        let (cfg, ck) = random(&tiny(tied), 5, None).unwrap();
        let ids = random_ids(6, 10, cfg.vocab_size);
        let want = reference_logits(&cfg, &ck, &ids);
        let f = GgufFile::from_bytes("tiny.gguf", to_gguf(&cfg, &ck)).unwrap();
        let (cfg2, ck2) = from_gguf(&f).unwrap();
        assert_eq!(cfg2, cfg);
        let model = Llama::load(Cpu, cfg2, ck2).unwrap();
        let mut cache = model.new_cache(10).unwrap();
        let got = model.forward(&ids, &mut cache, true).unwrap();
        assert_close(&got, &want, 1e-5);
    }
}

#[test]
fn missing_and_extra_tensors_are_named() {
    let (cfg, mut ck) = random(&tiny(false), 8, None).unwrap();
    ck.layers
        .retain(|(n, _)| n != "model.layers.1.mlp.gate_proj");
    let e = Llama::load(Cpu, cfg.clone(), ck).err().unwrap().to_string();
    assert!(
        e.contains("model.layers.1.mlp.gate_proj") && e.contains("missing"),
        "{e}"
    );
    let (_, ck) = random(&tiny(false), 8, None).unwrap();
    let mut small = cfg.clone();
    small.layers = 1;
    let e = Llama::load(Cpu, small, ck).err().unwrap().to_string();
    assert!(e.contains("not used"), "{e}");
}

#[test]
fn named_configs_are_consistent() {
    for name in ["llama7b", "llama3.2-1b", "smollm2-135m"] {
        let cfg = LlamaConfig::named(name).unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.inv_freq().len(), cfg.head_dim / 2);
    }
    // Published parameter counts.
    let p = LlamaConfig::named("llama7b").unwrap().params() as f64;
    assert!((p / 6.738e9 - 1.0).abs() < 0.01, "{p}");
    let p = LlamaConfig::named("llama3.2-1b").unwrap().params() as f64;
    assert!((p / 1.236e9 - 1.0).abs() < 0.01, "{p}");
    let p = LlamaConfig::named("smollm2-135m").unwrap().params() as f64;
    assert!((p / 134.5e6 - 1.0).abs() < 0.01, "{p}");
    // Layer shapes of llama7b (no allocation: 6.7 B parameters would not fit a test).
    let shapes = LlamaConfig::named("llama7b").unwrap().linear_shapes();
    assert_eq!(shapes.len(), 32 * 7 + 1);
    assert_eq!(
        shapes[4],
        ("model.layers.0.mlp.gate_proj".to_string(), 11008, 4096)
    );
    assert_eq!(shapes[224], ("lm_head".to_string(), 32000, 4096));
    // A random model with fewer blocks keeps the real widths.
    let mut narrow = tiny(false);
    narrow.layers = 5;
    let (cfg, ck) = random(&narrow, 1, Some(2)).unwrap();
    assert_eq!(cfg.layers, 2);
    assert_eq!(ck.layers.len(), 2 * 7 + 1);
}

#[test]
fn llama3_rope_scaling_bands() {
    let cfg = LlamaConfig::named("llama3.2-1b").unwrap();
    let mut plain = cfg.clone();
    plain.rope_scaling = RopeScaling::None;
    let (s, p) = (cfg.inv_freq(), plain.inv_freq());
    // Highest frequency (wavelength 2 pi < 8192/4): unchanged. Lowest (wavelength ~2pi*5e5):
    // divided by 32. In between: between the two.
    assert_eq!(s[0], p[0]);
    let last = s.len() - 1;
    assert!((s[last] / p[last] - 1.0 / 32.0).abs() < 1e-6);
    for i in 0..s.len() {
        assert!(s[i] <= p[i] && s[i] >= p[i] / 32.0 * 0.999_999);
    }
}

#[test]
fn generation_and_perplexity_run_on_a_tiny_model() {
    let (cfg, ck) = random(&tiny(true), 9, None).unwrap();
    let model = Llama::load(Cpu, cfg.clone(), ck).unwrap();
    let prompt = random_ids(1, 5, cfg.vocab_size);
    let mut streamed = Vec::new();
    let stats = generate(&model, &prompt, 7, &mut Sampler::greedy(), &[], |t| {
        streamed.push(t);
        Ok(())
    })
    .unwrap();
    assert_eq!(stats.generated, streamed);
    assert_eq!(stats.generated.len(), 7);
    // Greedy generation equals re-running the whole sequence and taking the argmax each time.
    let mut seq = prompt.clone();
    for &tok in &stats.generated {
        let mut cache = model.new_cache(seq.len()).unwrap();
        let logits = model.forward(&seq, &mut cache, false).unwrap();
        assert_eq!(crate::lm::argmax(&logits), tok);
        seq.push(tok);
    }
    // Perplexity: overlapping windows score every token but the first exactly once; disjoint
    // windows cannot score the first token of each window (its context is in the previous
    // window), as in the HF recipe. With ctx == the whole text, it equals exp(mean NLL) of one
    // forward.
    let ids = random_ids(2, 23, cfg.vocab_size);
    let a = perplexity(&model, &ids, 8, 8, |_, _| {}).unwrap();
    let b = perplexity(&model, &ids, 8, 3, |_, _| {}).unwrap();
    assert_eq!((a.scored_tokens, a.windows), (20, 3));
    assert_eq!(b.scored_tokens, 22);
    let whole = perplexity(&model, &ids, 23, 23, |_, _| {}).unwrap();
    let mut cache = model.new_cache(23).unwrap();
    let logits = model.forward(&ids, &mut cache, true).unwrap();
    let v = cfg.vocab_size;
    let mut nll = 0.0;
    for t in 1..23 {
        let row = &logits[(t - 1) * v..t * v];
        let z: f64 = row.iter().map(|&l| f64::from(l).exp()).sum();
        nll -= (f64::from(row[ids[t] as usize]).exp() / z).ln();
    }
    assert!((whole.perplexity - (nll / 22.0).exp()).abs() < 1e-6 * whole.perplexity);
    // A random model is roughly uniform-ish: perplexity within a broad band around the vocab.
    assert!(a.perplexity > 1.0 && a.perplexity.is_finite());
}
