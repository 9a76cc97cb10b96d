//! Measured sensitivity of the model's output to each layer's error, for the rank allocation
//! (`blr compress --allocation sensitivity`).
//!
//! The error-based allocation minimises the sum of the layers' own (calibrated, output-weighted)
//! errors, so a unit of error in q_proj counts like one in down_proj, while compressing one
//! layer type alone moves SmolLM2's perplexity by +0.6 (k_proj) to +143 (down_proj) at the same
//! ratio (docs/compression.md). Here the layers are grouped by type and depth; for each group the
//! dense model is run once more on calibration tokens with that group's layers (and only those)
//! replaced by a probe approximation of known squared relative error `e_l` (the calibrated
//! low-rank fit at the layer's planned size), and the mean per-token KL divergence from the
//! dense model's next-token distribution is measured. A group's sensitivity is
//! `lambda = KL / sum_l e_l`: the divergence per unit of relative squared error (KL grows with
//! the square of a small perturbation, as the relative squared error does). The allocation then
//! minimises `sum_l lambda_l * curve_l(rank)`.
//!
//! Cost: one forward pass over the sensitivity tokens per group, plus one dense pass.

use crate::cmd::agree::{kl_divergence, log_softmax};
use anyhow::{bail, Result};
use blr_core::checkpoint::Checkpoint;
use blr_core::Linear;
use blr_models::cpu::Cpu;
use blr_models::llama::{Llama, LlamaConfig};
use blr_models::lm::CausalLm;

/// A set of layers whose sensitivity is measured together.
#[derive(Clone, Debug, PartialEq)]
pub struct Group {
    /// E.g. `mlp.up_proj @ blocks 6-11`.
    pub label: String,
    /// Indices into the layer list given to [`group_layers`].
    pub members: Vec<usize>,
}

/// The block index and the type (the name after `layers.N.`) of a layer name such as
/// `model.layers.12.mlp.up_proj`; names without a block index are their own type at depth 0.
fn block_and_type(name: &str) -> (usize, &str) {
    let mut parts = name.split('.').peekable();
    let mut offset = 0;
    while let Some(p) = parts.next() {
        offset += p.len() + 1;
        if p == "layers" || p == "h" || p == "blocks" {
            if let Some(d) = parts.peek().and_then(|d| d.parse::<usize>().ok()) {
                let digits = d.to_string().len() + 1;
                let rest = name.get(offset + digits..).unwrap_or(name);
                return (d, rest);
            }
        }
    }
    (0, name)
}

/// The block ranges `[first, last)` of `depth_groups` groups over `blocks` blocks. With three or
/// more groups the first and the last block are groups of their own (measured: SmolLM2's block-0
/// up_proj alone decides between perplexity ~77 and ~100 at 70% low-rank, and a group of six
/// blocks averages its sensitivity away) and the blocks between are split evenly.
fn depth_ranges(blocks: usize, depth_groups: usize) -> Vec<(usize, usize)> {
    let per = depth_groups.clamp(1, blocks.max(1));
    if per < 3 {
        return (0..per)
            .map(|g| (g * blocks / per, (g + 1) * blocks / per))
            .collect();
    }
    let inner = blocks - 2;
    let mid = per - 2;
    let mut out = vec![(0, 1)];
    out.extend((0..mid).map(|g| (1 + g * inner / mid, 1 + (g + 1) * inner / mid)));
    out.push((blocks - 1, blocks));
    out
}

/// Groups `names` by layer type and `depth_groups` contiguous ranges of blocks
/// ([`depth_ranges`]). Groups are ordered by type (first appearance), then depth.
pub fn group_layers(names: &[String], depth_groups: usize) -> Vec<Group> {
    let parsed: Vec<(usize, &str)> = names.iter().map(|n| block_and_type(n)).collect();
    let blocks = parsed.iter().map(|(d, _)| d + 1).max().unwrap_or(1);
    let ranges = depth_ranges(blocks, depth_groups);
    let mut types: Vec<&str> = Vec::new();
    for (_, t) in &parsed {
        if !types.contains(t) {
            types.push(t);
        }
    }
    let mut groups = Vec::new();
    for t in types {
        for &(first, last) in &ranges {
            let members: Vec<usize> = parsed
                .iter()
                .enumerate()
                .filter(|(_, (d, ty))| *ty == t && *d >= first && *d < last)
                .map(|(i, _)| i)
                .collect();
            if members.is_empty() {
                continue;
            }
            let label = if ranges.len() == 1 {
                t.to_string()
            } else if last - first == 1 {
                format!("{t} @ block {first}")
            } else {
                format!("{t} @ blocks {first}-{}", last - 1)
            };
            groups.push(Group { label, members });
        }
    }
    groups
}

/// Sum over rows (of `vocab` log-probabilities each) of `KL(p || q)`.
fn kl_sum(log_p: &[f64], log_q: &[f64], vocab: usize) -> f64 {
    log_p
        .chunks(vocab)
        .zip(log_q.chunks(vocab))
        .map(|(p, q)| kl_divergence(p, q))
        .sum()
}

/// Runs `model` over the windows and returns the log-probabilities of every position.
fn log_probs(model: &Llama<Cpu>, windows: &[&[u32]], ctx: usize) -> Result<Vec<Vec<f64>>> {
    let mut cache = model.new_cache(ctx)?;
    let mut out = Vec::with_capacity(windows.len());
    for w in windows {
        model.clear_cache(&mut cache);
        let logits = model.forward(w, &mut cache, true)?;
        let vocab = logits.len() / w.len().max(1);
        out.push(logits.chunks(vocab).flat_map(log_softmax).collect());
    }
    Ok(out)
}

/// The mean per-token `KL(dense || perturbed)` for each group, where "perturbed" is the model
/// of `weights` with each member `i` of the group replaced by `probes[i]` (a layer name of
/// `weights` and the layer to put there). `ids` are cut into windows of `ctx` tokens. `done(g)` is called
/// after each group (progress).
pub fn group_divergence(
    cfg: &LlamaConfig,
    weights: &Checkpoint,
    probes: &[(String, Linear)],
    groups: &[Group],
    ids: &[u32],
    ctx: usize,
    done: &dyn Fn(usize),
) -> Result<Vec<f64>> {
    let ctx = ctx.min(cfg.max_positions).max(2);
    let windows: Vec<&[u32]> = ids.chunks(ctx).filter(|w| w.len() >= 2).collect();
    if windows.is_empty() {
        bail!("sensitivity: fewer than 2 calibration tokens");
    }
    let tokens: usize = windows.iter().map(|w| w.len()).sum();
    let dense = Llama::load(Cpu, cfg.clone(), weights.clone())?;
    let reference = log_probs(&dense, &windows, ctx)?;
    drop(dense);
    let vocab = reference[0].len() / windows[0].len();
    let mut out = Vec::with_capacity(groups.len());
    for (g, group) in groups.iter().enumerate() {
        let mut ck = weights.clone();
        for &i in &group.members {
            let Some((name, probe)) = probes.get(i) else {
                bail!(
                    "sensitivity: group {} names layer {i} of {}",
                    group.label,
                    probes.len()
                );
            };
            let before = ck.layers.len() + ck.tensors.len();
            ck.layers.retain(|(n, _)| n != name);
            ck.tensors.remove(&format!("{name}.weight"));
            if ck.layers.len() + ck.tensors.len() == before {
                bail!("sensitivity: layer {name} is not in the model");
            }
            ck.layers.push((name.clone(), probe.clone()));
        }
        let model = Llama::load(Cpu, cfg.clone(), ck)?;
        let perturbed = log_probs(&model, &windows, ctx)?;
        let kl: f64 = reference
            .iter()
            .zip(&perturbed)
            .map(|(p, q)| kl_sum(p, q, vocab))
            .sum();
        out.push(kl / tokens as f64);
        done(g);
    }
    Ok(out)
}

/// Per layer, its group's divergence per unit of the group's summed error weight:
/// `lambda_l = kl_g / sum_{k in g} err_k` (0 where the group has no error). `err` is per layer
/// (e.g. the probe's squared relative error, optionally times a per-layer scale).
pub fn lambdas(groups: &[Group], kl: &[f64], err: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0; err.len()];
    for (group, &d) in groups.iter().zip(kl) {
        let total: f64 = group.members.iter().map(|&i| err[i]).sum();
        let lambda = if total > 0.0 { d.max(0.0) / total } else { 0.0 };
        for &i in &group.members {
            out[i] = lambda;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use blr_core::rng::Rng;

    #[test]
    fn layers_group_by_type_and_depth() {
        let names: Vec<String> = (0..6)
            .flat_map(|d| {
                ["self_attn.q_proj", "mlp.up_proj"].map(|t| format!("model.layers.{d}.{t}"))
            })
            .collect();
        let g = group_layers(&names, 2);
        assert_eq!(g.len(), 4);
        assert_eq!(g[0].label, "self_attn.q_proj @ blocks 0-2");
        assert_eq!(g[0].members, vec![0, 2, 4]);
        assert_eq!(g[3].label, "mlp.up_proj @ blocks 3-5");
        assert_eq!(g[3].members, vec![7, 9, 11]);
        // Three or more groups: the first and last block alone, the middle split evenly.
        let g4 = group_layers(&names, 4);
        let labels: Vec<&str> = g4.iter().map(|g| g.label.as_str()).collect();
        assert_eq!(
            &labels[..4],
            [
                "self_attn.q_proj @ block 0",
                "self_attn.q_proj @ blocks 1-2",
                "self_attn.q_proj @ blocks 3-4",
                "self_attn.q_proj @ block 5"
            ]
        );
        assert_eq!(
            depth_ranges(30, 5),
            [(0, 1), (1, 10), (10, 19), (19, 29), (29, 30)]
        );
        // More depth groups than blocks: one per block; one group: one per type.
        assert_eq!(group_layers(&names, 100).len(), 12);
        assert_eq!(group_layers(&names, 1)[1].members.len(), 6);
        assert_eq!(block_and_type("lm_head"), (0, "lm_head"));
        let l = lambdas(&g, &[1.0, 2.0, 0.0, 4.0], &[0.5; 12]);
        assert_eq!(
            (l[0], l[1], l[6], l[11]),
            (1.0 / 1.5, 0.0, 2.0 / 1.5, 4.0 / 1.5)
        );
    }

    /// On the tiny test model, an up_proj whose MLP output is scaled down 1000x (so its error
    /// barely reaches the residual stream) must measure far less sensitive than another block's
    /// up_proj perturbed by the same relative amount; and no perturbation, no divergence.
    #[test]
    fn a_layer_whose_error_matters_measures_more_sensitive() {
        let bytes = blr_models::testing::tiny_llama_gguf(3, &["t h", "th e"]).unwrap();
        let dir = std::env::temp_dir().join(format!("blr-sens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiny.gguf");
        std::fs::write(&path, bytes).unwrap();
        let mut loaded = blr_models::loader::load_llama(&path.display().to_string()).unwrap();
        let _ = std::fs::remove_dir_all(&dir);
        let weight = |ck: &Checkpoint, name: &str| -> Vec<f32> {
            match ck.layers.iter().find(|(n, _)| n == name) {
                Some((_, Linear::Dense(d))) => d.weight.clone(),
                _ => ck.tensors[&format!("{name}.weight")].data.clone(),
            }
        };
        let set = |ck: &mut Checkpoint, name: &str, w: Vec<f32>, m: usize, n: usize| {
            ck.layers.retain(|(l, _)| l != name);
            ck.tensors.remove(&format!("{name}.weight"));
            ck.layers.push((
                name.to_string(),
                Linear::Dense(blr_core::Dense::new(m, n, w).unwrap()),
            ));
        };
        let shapes = loaded.cfg.linear_shapes();
        let shape = |name: &str| {
            let (_, m, n) = shapes.iter().find(|(l, _, _)| l == name).unwrap();
            (*m, *n)
        };
        let down0 = "model.layers.0.mlp.down_proj";
        let (m, n) = shape(down0);
        let quiet: Vec<f32> = weight(&loaded.weights, down0)
            .iter()
            .map(|v| v * 1e-3)
            .collect();
        set(&mut loaded.weights, down0, quiet, m, n);
        let names: Vec<String> = (0..2)
            .map(|b| format!("model.layers.{b}.mlp.up_proj"))
            .collect();
        let mut rng = Rng::new(5);
        let probes: Vec<(String, Linear)> = names
            .iter()
            .map(|name| {
                let (m, n) = shape(name);
                let w = weight(&loaded.weights, name);
                let rms = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
                let noisy: Vec<f32> = w
                    .iter()
                    .map(|v| v + 0.3 * rms * rng.normal() as f32)
                    .collect();
                let layer = Linear::Dense(blr_core::Dense::new(m, n, noisy).unwrap());
                (name.clone(), layer)
            })
            .collect();
        let groups = group_layers(&names, 2);
        assert_eq!(groups.len(), 2);
        let ids: Vec<u32> = (0..48).map(|i| 3 + (i * 7) % 250).collect();
        let kl = group_divergence(
            &loaded.cfg,
            &loaded.weights,
            &probes,
            &groups,
            &ids,
            16,
            &|_| {},
        )
        .unwrap();
        let l = lambdas(&groups, &kl, &[0.09, 0.09]);
        assert!(kl.iter().all(|k| k.is_finite() && *k >= 0.0), "{kl:?}");
        assert!(l[1] > 100.0 * l[0] && l[1] > 0.0, "{kl:?}");
        // The unperturbed model diverges by nothing.
        let same: Vec<(String, Linear)> = names
            .iter()
            .map(|name| {
                let (m, n) = shape(name);
                let w = weight(&loaded.weights, name);
                (
                    name.clone(),
                    Linear::Dense(blr_core::Dense::new(m, n, w).unwrap()),
                )
            })
            .collect();
        let zero = group_divergence(
            &loaded.cfg,
            &loaded.weights,
            &same,
            &groups,
            &ids,
            16,
            &|_| {},
        )
        .unwrap();
        assert!(zero.iter().all(|k| k.abs() < 1e-9), "{zero:?}");
    }
}
