//! What every causal language model offers (Llama, GPT-2), and what is built on it once:
//! sampling, generation with a KV cache, sliding-window perplexity.

use crate::backend::Backend;
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
    /// Runs `ids` like [`CausalLm::forward`] and picks the next token from the last position's
    /// logits with `sampler`. Models on a device backend override it to sample there (only the
    /// token id comes back); this default samples on the host.
    fn forward_sample(
        &self,
        ids: &[u32],
        cache: &mut Self::Cache,
        sampler: &mut Sampler,
    ) -> Result<u32> {
        let logits = self.forward(ids, cache, false)?;
        sampler.sample(&logits)
    }
}

/// The KV caches of a decoder over backend `B`, one per block.
pub struct KvCaches<B: Backend> {
    pub(crate) layers: Vec<B::KvCache>,
}

impl<B: Backend> KvCaches<B> {
    /// Positions cached so far (every block holds the same number).
    pub(crate) fn len(&self, backend: &B) -> usize {
        self.layers.first().map_or(0, |c| backend.kv_len(c))
    }

    /// The per-block caches, checked against the model's `blocks` (a cache made by another
    /// model is an error, not a silent partial run).
    pub(crate) fn blocks_mut(&mut self, blocks: usize, what: &str) -> Result<&mut [B::KvCache]> {
        if self.layers.len() != blocks {
            return Err(Error::input(
                what,
                format!(
                    "the cache has {} blocks, the model {blocks}: make the cache with this model's new_cache",
                    self.layers.len()
                ),
            ));
        }
        Ok(&mut self.layers)
    }
}

/// The sizes [`CausalLm`] and the KV cache need from a model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LmShape {
    pub vocab_size: usize,
    /// Longest sequence the model was trained for.
    pub max_positions: usize,
    pub blocks: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
}

/// A decoder-only model written over a [`Backend`]: what a model provides, from which
/// [`CausalLm`] follows once for every such model (cache handling, host logits, sampling on the
/// backend).
pub trait BackendLm {
    type B: Backend;
    fn backend(&self) -> &Self::B;
    fn lm_shape(&self) -> LmShape;
    /// Runs `ids` (positions continuing from the cache) and returns logits on the backend:
    /// `(T, vocab)` when `all_logits`, else `(1, vocab)` for the last position only.
    fn forward_device(
        &self,
        ids: &[u32],
        cache: &mut KvCaches<Self::B>,
        all_logits: bool,
    ) -> Result<<Self::B as Backend>::Tensor>;
}

impl<M: BackendLm> CausalLm for M {
    type Cache = KvCaches<M::B>;

    fn device(&self) -> String {
        self.backend().name()
    }

    fn vocab_size(&self) -> usize {
        self.lm_shape().vocab_size
    }

    fn max_positions(&self) -> usize {
        self.lm_shape().max_positions
    }

    fn new_cache(&self, capacity: usize) -> Result<KvCaches<M::B>> {
        let s = self.lm_shape();
        let layers = (0..s.blocks)
            .map(|_| {
                self.backend()
                    .new_kv_cache(s.kv_heads, s.head_dim, capacity)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(KvCaches { layers })
    }

    fn clear_cache(&self, cache: &mut KvCaches<M::B>) {
        for c in &mut cache.layers {
            self.backend().kv_clear(c);
        }
    }

    fn forward(
        &self,
        ids: &[u32],
        cache: &mut KvCaches<M::B>,
        all_logits: bool,
    ) -> Result<Vec<f32>> {
        let logits = self.forward_device(ids, cache, all_logits)?;
        self.backend().download(&logits)
    }

    fn forward_sample(
        &self,
        ids: &[u32],
        cache: &mut KvCaches<M::B>,
        sampler: &mut Sampler,
    ) -> Result<u32> {
        let logits = self.forward_device(ids, cache, false)?;
        let u = sampler.draw();
        self.backend()
            .sample_last(&logits, sampler.temperature, sampler.top_p, u)
    }
}

/// Picks the next token from logits: greedy when `temperature == 0`, else softmax at
/// `temperature` restricted to the smallest set of tokens whose probability reaches `top_p`
/// (nucleus sampling), drawn from a seeded generator so that runs are reproducible.
///
/// The uniform number of each draw comes from the host generator ([`Sampler::draw`]); the choice
/// itself is [`choose`], which the CUDA backend reproduces bit for bit on the device
/// (`cuda/sample.cu`), so a GPU run picks the same tokens as a CPU run given the same logits.
pub struct Sampler {
    pub temperature: f32,
    pub top_p: f32,
    rng: Rng,
}

impl Sampler {
    pub fn new(temperature: f32, top_p: f32, seed: u64) -> Result<Self> {
        check_sampling(temperature, top_p)?;
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

    /// The uniform number in [0, 1) for the next choice; greedy sampling draws none (returns 0
    /// and leaves the generator where it is).
    pub fn draw(&mut self) -> f64 {
        if self.temperature == 0.0 {
            0.0
        } else {
            self.rng.uniform()
        }
    }

    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        let u = self.draw();
        choose(logits, self.temperature, self.top_p, u)
    }
}

fn check_sampling(temperature: f32, top_p: f32) -> Result<()> {
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
    Ok(())
}

/// Fixed-point scale of the sampling weights: `weight = floor(exp((l - max) / T) * 2^40)`.
/// Integer weights make every sum exact and independent of the order it is taken in, which is
/// what lets a parallel GPU reduction agree with this sequential reference to the last bit.
/// A token under 2^-40 of the most likely one's probability gets weight 0 and is never drawn.
pub const SAMPLE_WEIGHT_BITS: u32 = 40;

/// `exp(x)` for `x <= 0`, to about 1e-16 relative, from IEEE-rounded +, -, * alone (no fused
/// multiply-add, no library `exp`), so that `cuda/sample.cu` computes the same bits: Cody-Waite
/// reduction `x = n ln2 + r`, `|r| <= ln2/2`, a degree-13 Taylor polynomial, exact scaling by
/// 2^n. Below -30 the result (< 1e-13) is returned as 0: its weight would be 0 anyway.
pub fn sampling_exp(x: f64) -> f64 {
    if x < -30.0 || x.is_nan() {
        return 0.0;
    }
    let x = x.min(0.0);
    let log2e = f64::from_bits(0x3ff7_1547_652b_82fe);
    let ln2_hi = f64::from_bits(0x3fe6_2e42_fee0_0000);
    let ln2_lo = f64::from_bits(0x3dea_39ef_3579_3c76);
    // 1/k! for k = 13 down to 1 (correctly rounded).
    const INV_FACT: [u64; 13] = [
        0x3de6_1246_13a8_6d09,
        0x3e21_eed8_eff8_d898,
        0x3e5a_e645_67f5_44e4,
        0x3e92_7e4f_b778_9f5c,
        0x3ec7_1de3_a556_c734,
        0x3efa_01a0_1a01_a01a,
        0x3f2a_01a0_1a01_a01a,
        0x3f56_c16c_16c1_6c17,
        0x3f81_1111_1111_1111,
        0x3fa5_5555_5555_5555,
        0x3fc5_5555_5555_5555,
        0x3fe0_0000_0000_0000,
        0x3ff0_0000_0000_0000,
    ];
    let n = (x * log2e + 0.5).floor();
    let r = (x - n * ln2_hi) - n * ln2_lo;
    let mut p = f64::from_bits(INV_FACT[0]);
    for &c in &INV_FACT[1..] {
        p = p * r + f64::from_bits(c);
    }
    p = p * r + 1.0;
    // n is in [-44, 0]: 2^n is a normal number built from its exponent bits.
    let scale = f64::from_bits(((1023 + n as i64) as u64) << 52);
    p * scale
}

/// The sampling weight of a logit `l` given the row's maximum `max` and `1 / temperature`.
pub fn sampling_weight(l: f32, max: f32, inv_t: f64) -> u64 {
    if l == f32::NEG_INFINITY {
        return 0;
    }
    let d = (f64::from(l) - f64::from(max)) * inv_t;
    (sampling_exp(d) * (1u64 << SAMPLE_WEIGHT_BITS) as f64) as u64
}

/// The token [`Sampler`] picks from `logits` with the uniform number `u` in [0, 1): the
/// reference every backend's sampler must match exactly.
///
/// - Greedy (`temperature == 0`): the largest logit, the first one on ties.
/// - Otherwise tokens are ordered by weight ([`sampling_weight`], descending; ties by index,
///   ascending); the nucleus is the shortest prefix whose weight reaches
///   `ceil(top_p * total)` (all tokens when `top_p == 1`); the choice is the first token of
///   the nucleus whose running weight exceeds `floor(u * nucleus weight)`.
///
/// NaN or +Inf logits are an error (the forward pass diverged); -Inf logits (masked tokens)
/// are never drawn.
pub fn choose(logits: &[f32], temperature: f32, top_p: f32, u: f64) -> Result<u32> {
    check_sampling(temperature, top_p)?;
    if logits.is_empty() {
        return Err(Error::input("sampler", "no logits"));
    }
    if logits.iter().any(|x| x.is_nan() || *x == f32::INFINITY) {
        return Err(Error::input(
            "sampler",
            "logits contain NaN or +Inf: the model's forward pass diverged",
        ));
    }
    if temperature == 0.0 {
        return Ok(argmax(logits));
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return Err(Error::input("sampler", "every logit is -Inf"));
    }
    let inv_t = 1.0 / f64::from(temperature);
    let mut order: Vec<(u64, u32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (sampling_weight(l, max, inv_t), i as u32))
        .collect();
    let total: u64 = order.iter().map(|p| p.0).sum();
    order.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    let target = nucleus_target(top_p, total);
    let mut mass = 0u64;
    let mut keep = 0;
    for p in &order {
        mass += p.0;
        keep += 1;
        if mass >= target {
            break;
        }
    }
    let r = draw_threshold(u, mass);
    let mut acc = 0u64;
    for p in &order[..keep] {
        acc += p.0;
        if acc > r {
            return Ok(p.1);
        }
    }
    // Unreachable: r < mass = the nucleus's total weight.
    Ok(order[keep - 1].1)
}

/// The weight the nucleus must reach: `ceil(top_p * total)`, at least 1, `total` when
/// `top_p == 1` (computed as the CUDA kernel computes it).
pub fn nucleus_target(top_p: f32, total: u64) -> u64 {
    if top_p >= 1.0 {
        total
    } else {
        ((f64::from(top_p) * total as f64).ceil() as u64).clamp(1, total)
    }
}

/// `floor(u * mass)`, kept below `mass`.
pub fn draw_threshold(u: f64, mass: u64) -> u64 {
    ((u.max(0.0) * mass as f64) as u64).min(mass.saturating_sub(1))
}

/// A model whose next-token choice is always made on the host (logits downloaded each step,
/// [`Sampler::sample`]), even where its backend samples on the device: for comparing the two
/// (`blr generate --host-sampling`).
pub struct HostSampling<'a, M>(pub &'a M);

impl<M: CausalLm> CausalLm for HostSampling<'_, M> {
    type Cache = M::Cache;
    fn device(&self) -> String {
        self.0.device()
    }
    fn vocab_size(&self) -> usize {
        self.0.vocab_size()
    }
    fn max_positions(&self) -> usize {
        self.0.max_positions()
    }
    fn new_cache(&self, capacity: usize) -> Result<Self::Cache> {
        self.0.new_cache(capacity)
    }
    fn clear_cache(&self, cache: &mut Self::Cache) {
        self.0.clear_cache(cache)
    }
    fn forward(&self, ids: &[u32], cache: &mut Self::Cache, all_logits: bool) -> Result<Vec<f32>> {
        self.0.forward(ids, cache, all_logits)
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
    let mut next = model.forward_sample(prompt, &mut cache, sampler)?;
    stats.prefill_seconds = t0.elapsed().as_secs_f64();
    let t1 = std::time::Instant::now();
    loop {
        stats.generated.push(next);
        if stop.contains(&next) {
            stats.hit_eos = true;
            break;
        }
        on_token(next)?;
        if stats.generated.len() == max_new {
            break;
        }
        next = model.forward_sample(&[next], &mut cache, sampler)?;
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
    fn sampling_exp_is_exp() {
        let mut worst = 0.0f64;
        for i in 0..=30_000 {
            let x = -(i as f64) * 1e-3;
            let rel = (sampling_exp(x) - x.exp()).abs() / x.exp();
            worst = worst.max(rel);
        }
        assert!(worst < 1e-14, "worst relative error {worst:e}");
        assert_eq!(sampling_exp(0.0), 1.0);
        assert_eq!(sampling_exp(-31.0), 0.0);
        assert_eq!(sampling_exp(f64::NEG_INFINITY), 0.0);
    }

    #[test]
    fn choose_orders_ties_by_index_and_honours_the_nucleus() {
        // Three tokens tie for the top: tiny top_p keeps only the first of them.
        let logits = [1.0f32, 2.0, -1.0, 2.0, 2.0, f32::NEG_INFINITY];
        for u in [0.0, 0.5, 0.999_999] {
            assert_eq!(choose(&logits, 1.0, 1e-7, u).unwrap(), 1);
        }
        assert_eq!(choose(&logits, 0.0, 1.0, 0.9).unwrap(), 1); // greedy: first maximum
                                                                // top_p = 1: u walks tokens in (weight desc, index asc) order: 1, 3, 4, 0, 2; the
                                                                // masked token 5 is never drawn.
        let w = |l: f32| sampling_weight(l, 2.0, 1.0);
        let total = 3 * w(2.0) + w(1.0) + w(-1.0);
        let at = |mass: u64| (mass as f64 + 0.5) / total as f64;
        assert_eq!(choose(&logits, 1.0, 1.0, 0.0).unwrap(), 1);
        assert_eq!(choose(&logits, 1.0, 1.0, at(w(2.0))).unwrap(), 3);
        assert_eq!(choose(&logits, 1.0, 1.0, at(2 * w(2.0))).unwrap(), 4);
        assert_eq!(choose(&logits, 1.0, 1.0, at(3 * w(2.0))).unwrap(), 0);
        assert_eq!(choose(&logits, 1.0, 1.0, 0.999_999_999).unwrap(), 2);
        // A nucleus of exactly the three tied tokens: u near 1 lands on the third.
        let p = (3 * w(2.0)) as f32 / total as f32;
        assert_eq!(choose(&logits, 1.0, p * 0.999, 0.999_999).unwrap(), 4);
        assert!(choose(&[f32::NEG_INFINITY; 3], 1.0, 1.0, 0.5).is_err());
        assert!(choose(&[0.0, f32::INFINITY], 1.0, 1.0, 0.5).is_err());
        assert!(choose(&[], 1.0, 1.0, 0.5).is_err());
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
