//! What every causal language model offers (Llama, GPT-2), and what is built on it once:
//! sampling, generation with a KV cache, sliding-window perplexity.

use crate::{Error, Result};
use blr_core::rng::Rng;

/// A decoder-only language model with a KV cache.
pub trait CausalLm {
    type Cache;
    /// The backend's description (for reports).
    fn device(&self) -> String;
    fn vocab_size(&self) -> usize;
    /// Longest sequence the model was trained for.
    fn max_positions(&self) -> usize;
    /// A cache that holds `capacity` positions.
    fn new_cache(&self, capacity: usize) -> Result<Self::Cache>;
    fn clear_cache(&self, cache: &mut Self::Cache);
    /// Runs `ids` at the positions following those in `cache` (appending to it); returns host
    /// logits `(T, vocab)` row-major when `all_logits`, else the last position's `(vocab)`.
    fn forward(&self, ids: &[u32], cache: &mut Self::Cache, all_logits: bool) -> Result<Vec<f32>>;
}

/// Picks the next token from logits: greedy when `temperature == 0`, else softmax at
/// `temperature` restricted to the smallest set of tokens whose probability reaches `top_p`
/// (nucleus sampling), drawn from a seeded generator so that runs are reproducible.
pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Result<Self> {
        if !(temperature >= 0.0 && temperature.is_finite()) {
            return Err(Error::input(
                "sampler",
                format!("temperature {temperature} must be >= 0"),
            ));
        }
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(Error::input(
                "sampler",
                format!("top_p {top_p} must be in (0, 1]"),
            ));
        }
        Ok(Sampler {
            temperature,
            top_p,
            rng: Rng::new(seed),
        })
    }

    pub fn greedy() -> Self {
        Sampler {
            temperature: 0.0,
            top_p: 1.0,
            rng: Rng::new(0),
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(Error::input("sampler", "no logits"));
        }
        if logits.iter().any(|x| x.is_nan()) {
            return Err(Error::input(
                "sampler",
                "logits contain NaN: the model's forward pass diverged",
            ));
        }
        if self.temperature == 0.0 {
            return Ok(argmax(logits));
        }
        let inv_t = 1.0 / f64::from(self.temperature);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(f64, u32)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (((f64::from(l) - f64::from(max)) * inv_t).exp(), i as u32))
            .collect();
        let z: f64 = probs.iter().map(|p| p.0).sum();
        probs.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let target = f64::from(self.top_p) * z;
        let mut keep = 0;
        let mut mass = 0.0;
        for p in &probs {
            mass += p.0;
            keep += 1;
            if mass >= target {
                break;
            }
        }
        let u = self.rng.uniform() * mass;
        let mut acc = 0.0;
        for p in &probs[..keep] {
            acc += p.0;
            if u < acc {
                return Ok(p.1);
            }
        }
        Ok(probs[keep - 1].1)
    }
}

/// Index of the largest value (first on ties).
pub fn argmax(x: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in x.iter().enumerate() {
        if v > x[best] {
            best = i;
        }
    }
    best as u32
}

/// What [`generate`] did.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationStats {
    pub prompt_tokens: usize,
    pub generated: Vec<u32>,
    pub prefill_seconds: f64,
    pub decode_seconds: f64,
    /// Stopped on an end-of-sequence token.
    pub hit_eos: bool,
}

impl GenerationStats {
    /// Decode speed (tokens after the first, which comes out of the prefill).
    pub fn decode_tokens_per_second(&self) -> f64 {
        let n = self.generated.len().saturating_sub(1);
        if self.decode_seconds > 0.0 {
            n as f64 / self.decode_seconds
        } else {
            0.0
        }
    }
}

/// Generates up to `max_new` tokens after `prompt`, calling `on_token` for each as soon as it is
/// chosen (streaming); stops early at any id in `stop`.
pub fn generate<M: CausalLm>(
    model: &M,
    prompt: &[u32],
    max_new: usize,
    sampler: &mut Sampler,
    stop: &[u32],
    mut on_token: impl FnMut(u32) -> Result<()>,
) -> Result<GenerationStats> {
    if prompt.is_empty() {
        return Err(Error::input("generate", "the prompt has no tokens"));
    }
    let capacity = prompt.len() + max_new;
    if capacity > model.max_positions() {
        return Err(Error::input(
            "generate",
            format!(
                "prompt ({}) + new tokens ({max_new}) exceed the model's {} positions",
                prompt.len(),
                model.max_positions()
            ),
        ));
    }
    let mut cache = model.new_cache(capacity)?;
    let t0 = std::time::Instant::now();
    let mut stats = GenerationStats {
        prompt_tokens: prompt.len(),
        generated: Vec::with_capacity(max_new),
        prefill_seconds: 0.0,
        decode_seconds: 0.0,
        hit_eos: false,
    };
    if max_new == 0 {
        return Ok(stats);
    }
    let mut logits = model.forward(prompt, &mut cache, false)?;
    stats.prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    loop {
        let next = sampler.sample(&logits)?;
        stats.generated.push(next);
        if stop.contains(&next) {
            stats.hit_eos = true;
            break;
        }
        on_token(next)?;
        if stats.generated.len() == max_new {
            break;
        }
        logits = model.forward(&[next], &mut cache, false)?;
    }
    stats.decode_seconds = t1.elapsed().as_secs_f64();
    Ok(stats)
}

/// Result of [`perplexity`].
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Perplexity {
    pub perplexity: f64,
    /// Mean negative log-likelihood per scored token (nats).
    pub nll: f64,
    /// Tokens whose prediction was scored (all but the first).
    pub scored_tokens: usize,
    pub windows: usize,
    pub ctx: usize,
    pub stride: usize,
}

/// Sliding-window perplexity (the Hugging Face recipe): windows of `ctx` tokens starting every
/// `stride` tokens; each window scores only the targets the previous one did not, so with
/// `stride < ctx` every token after the first is predicted exactly once, with at least
/// `ctx - stride` tokens of context once the first window is past. `stride == ctx` gives
/// disjoint windows (fastest, least context), where the first token of each window has no
/// context inside it and is not scored.
/// `on_window(done, total)` reports progress.
pub fn perplexity<M: CausalLm>(
    model: &M,
    ids: &[u32],
    ctx: usize,
    stride: usize,
    mut on_window: impl FnMut(usize, usize),
) -> Result<Perplexity> {
    if ids.len() < 2 {
        return Err(Error::input("perplexity", "need at least 2 tokens"));
    }
    if ctx < 2 || stride == 0 || stride > ctx {
        return Err(Error::input(
            "perplexity",
            format!("need ctx >= 2 and 0 < stride <= ctx, got ctx {ctx}, stride {stride}"),
        ));
    }
    if ctx > model.max_positions() {
        return Err(Error::input(
            "perplexity",
            format!(
                "ctx {ctx} exceeds the model's {} positions",
                model.max_positions()
            ),
        ));
    }
    let v = model.vocab_size();
    let mut starts = Vec::new();
    let mut begin = 0;
    loop {
        starts.push(begin);
        if begin + ctx >= ids.len() {
            break;
        }
        begin += stride;
    }
    let total = starts.len();
    let mut cache = model.new_cache(ctx)?;
    let mut nll = 0.0f64;
    let mut scored = 0usize;
    // Index (into ids) of the first target not yet scored.
    let mut next_target = 1usize;
    for (w, &begin) in starts.iter().enumerate() {
        let end = (begin + ctx).min(ids.len());
        model.clear_cache(&mut cache);
        let logits = model.forward(&ids[begin..end], &mut cache, true)?;
        // Position p (absolute) predicts ids[p + 1].
        for target in next_target.max(begin + 1)..end {
            let row = &logits[(target - 1 - begin) * v..(target - begin) * v];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = f64::from(max)
                + row
                    .iter()
                    .map(|&l| f64::from(l - max).exp())
                    .sum::<f64>()
                    .ln();
            let tok = ids[target] as usize;
            if tok >= v {
                return Err(Error::input(
                    "perplexity",
                    format!("token {tok} is past the vocabulary ({v})"),
                ));
            }
            nll += lse - f64::from(row[tok]);
            scored += 1;
        }
        next_target = end;
        on_window(w + 1, total);
    }
    let mean = nll / scored.max(1) as f64;
    Ok(Perplexity {
        perplexity: mean.exp(),
        nll: mean,
        scored_tokens: scored,
        windows: total,
        ctx,
        stride,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_and_top_p_limits() {
        let logits = [0.1f32, 3.0, 2.9, -5.0];
        assert_eq!(Sampler::greedy().sample(&logits).unwrap(), 1);
        // top_p tiny: only the most likely token survives, whatever the seed.
        for seed in 0..20 {
            let mut s = Sampler::new(1.0, 1e-6, seed).unwrap();
            assert_eq!(s.sample(&logits).unwrap(), 1);
        }
        // top_p 0.9 with tokens 1 and 2 holding ~0.9 of the mass between them: never 0 or 3.
        let mut s = Sampler::new(1.0, 0.9, 3).unwrap();
        let mut seen = [0usize; 4];
        for _ in 0..2000 {
            seen[s.sample(&logits).unwrap() as usize] += 1;
        }
        assert_eq!(seen[3], 0);
        assert!(seen[1] > 800 && seen[2] > 700, "{seen:?}");
        assert!(Sampler::new(-1.0, 0.9, 0).is_err());
        assert!(Sampler::new(1.0, 0.0, 0).is_err());
        assert!(Sampler::greedy().sample(&[f32::NAN]).is_err());
    }

    #[test]
    fn sampling_frequencies_follow_softmax_and_seed_repeats() {
        let logits = [0.0f32, (2.0f32).ln(), (3.0f32).ln()]; // probabilities 1/6, 2/6, 3/6
        let mut s = Sampler::new(1.0, 1.0, 42).unwrap();
        let n = 30000;
        let mut c = [0usize; 3];
        for _ in 0..n {
            c[s.sample(&logits).unwrap() as usize] += 1;
        }
        for (i, want) in [1.0 / 6.0, 2.0 / 6.0, 3.0 / 6.0].iter().enumerate() {
            let got = c[i] as f64 / n as f64;
            assert!((got - want).abs() < 0.015, "token {i}: {got} vs {want}");
        }
        let draw = |seed| {
            let mut s = Sampler::new(0.8, 0.95, seed).unwrap();
            (0..50)
                .map(|_| s.sample(&logits).unwrap())
                .collect::<Vec<_>>()
        };
        assert_eq!(draw(9), draw(9));
        assert_ne!(draw(9), draw(10));
    }
}
