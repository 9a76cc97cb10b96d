//! Output-side weights for `blr compress --output-weights` (see `blr_compress::OutputWeights`
//! for the math): which output channels of a Llama layer matter how much downstream, measured
//! on the calibration rows. `auto` weights up_proj only; `all` also gate_proj and v_proj, which
//! measured worse on SmolLM2 (docs/compression.md, "Output-side weights").
//!
//! - `mlp.up_proj`: its output `u` is multiplied by `silu(g)` (g = gate_proj's output on the
//!   same input rows) before down_proj, so an error `e_c` costs `E[silu(g_c)^2] e_c^2`:
//!   `d_c = E[silu(g_c)^2]`.
//! - `mlp.gate_proj`: to first order an error `e_c` in `g_c` moves `silu(g_c) u_c` by
//!   `u_c silu'(g_c) e_c`: `d_c = E[(u_c silu'(g_c))^2]`.
//! - `self_attn.v_proj`: channel `c` (kv head `c / head_dim`, dimension `c % head_dim`) feeds
//!   the o_proj column of that dimension in every query head sharing the kv head:
//!   `d_c = sum_h ||W_o[:, h * head_dim + c % head_dim]||^2`.
//! - every other layer: no weights (all channels count the same).
//!
//! The statistics use the dense weights of the sibling layers and the rows the calibration pass
//! gives the layer itself (gate and up share their input). Raw statistics become weights by
//! `blr_compress::OutputWeights::from_statistics` (floor, exponent `--output-weight-alpha`,
//! mean 1).

use anyhow::{bail, Context, Result};
use blr_compress::OutputWeights;
use blr_core::gemm;
use blr_models::llama::LlamaConfig;

/// Raw statistics below this fraction of their mean are raised to it (a channel that never
/// fires would otherwise be unscaled by a huge factor).
pub const FLOOR: f64 = 1e-3;

/// How one layer's weights are measured.
#[derive(Debug)]
enum Rule {
    /// `d_c = E[silu(g_c)^2]`, `g = x W_gate^T` (gate `(f, h)`).
    SiluOfGate { gate: Vec<f32> },
    /// `d_c = E[(u_c silu'(g_c))^2]`, `u = x W_up^T`, `g = x W_gate^T`.
    GateSlope { gate: Vec<f32>, up: Vec<f32> },
    /// Weights that need no activations (v_proj's o_proj column norms).
    Fixed(Vec<f64>),
}

/// The rules of every planned layer (by plan index; `None`: unweighted).
#[derive(Debug)]
pub struct OutputWeightRules {
    rules: Vec<Option<(Rule, usize, usize)>>,
    alpha: f64,
}

fn silu(z: f32) -> f64 {
    let z = z as f64;
    z / (1.0 + (-z).exp())
}

fn silu_slope(z: f32) -> f64 {
    let z = z as f64;
    let s = 1.0 / (1.0 + (-z).exp());
    s * (1.0 + z * (1.0 - s))
}

impl OutputWeightRules {
    /// Rules for the layers `names` (with their `(m, n)`), reading sibling weights through
    /// `weight_of(name) -> Option<Vec<f32>>`. `all`: weight gate_proj and v_proj too (else
    /// up_proj only); `alpha`: the exponent applied to the statistics.
    pub fn new(
        cfg: &LlamaConfig,
        layers: &[(String, usize, usize)],
        weight_of: impl Fn(&str) -> Option<Vec<f32>>,
        all: bool,
        alpha: f64,
    ) -> Result<Self> {
        if !(alpha.is_finite() && (0.0..=4.0).contains(&alpha)) {
            bail!("--output-weight-alpha must be in [0, 4], got {alpha}");
        }
        let sibling = |name: &str, own: &str, other: &str| -> Result<Vec<f32>> {
            let sib = format!("{}{other}", &name[..name.len() - own.len()]);
            weight_of(&sib).with_context(|| {
                format!("output weights for {name}: the model has no dense layer {sib}")
            })
        };
        let mut rules = Vec::with_capacity(layers.len());
        for (name, m, n) in layers {
            let (m, n) = (*m, *n);
            if !all && !name.ends_with("mlp.up_proj") {
                rules.push(None);
                continue;
            }
            let rule = if name.ends_with("mlp.up_proj") {
                Some(Rule::SiluOfGate {
                    gate: sibling(name, "up_proj", "gate_proj")?,
                })
            } else if name.ends_with("mlp.gate_proj") {
                Some(Rule::GateSlope {
                    gate: sibling(name, "gate_proj", "gate_proj")?,
                    up: sibling(name, "gate_proj", "up_proj")?,
                })
            } else if name.ends_with("self_attn.v_proj") {
                let o = sibling(name, "v_proj", "o_proj")?;
                let (hd, heads, kv) = (cfg.head_dim, cfg.heads, cfg.kv_heads.max(1));
                let q_dim = heads * hd;
                if m != kv * hd || o.len() % q_dim != 0 {
                    bail!(
                        "output weights for {name}: {m} outputs and o_proj of {} values do not \
                         match {kv} kv heads x {hd} and {heads} query heads",
                        o.len()
                    );
                }
                let mut col = vec![0.0f64; q_dim];
                for row in o.chunks(q_dim) {
                    for (c, &v) in col.iter_mut().zip(row) {
                        *c += (v as f64) * (v as f64);
                    }
                }
                let group = heads / kv;
                let d = (0..m)
                    .map(|c| {
                        let (kvh, j) = (c / hd, c % hd);
                        (kvh * group..(kvh + 1) * group)
                            .map(|h| col[h * hd + j])
                            .sum()
                    })
                    .collect();
                Some(Rule::Fixed(d))
            } else {
                None
            };
            if let Some(r) = &rule {
                let expect = m * n;
                let bad = match r {
                    Rule::SiluOfGate { gate, .. } => gate.len() != expect,
                    Rule::GateSlope { gate, up, .. } => gate.len() != expect || up.len() != expect,
                    Rule::Fixed(d) => d.len() != m,
                };
                if bad {
                    bail!("output weights for {name}: sibling layer shapes do not match {m} x {n}");
                }
            }
            rules.push(rule.map(|r| (r, m, n)));
        }
        Ok(OutputWeightRules { rules, alpha })
    }

    /// Per-channel sums of the raw statistic over the rows `x (tokens, n)` of layer `i`'s input
    /// (None for unweighted layers and those needing no activations).
    pub fn sums(&self, i: usize, x: &[f32], tokens: usize) -> Result<Option<Vec<f64>>> {
        let Some(Some((rule, m, n))) = self.rules.get(i) else {
            return Ok(None);
        };
        let (m, n) = (*m, *n);
        let mut s = vec![0.0f64; m];
        match rule {
            Rule::Fixed(_) => return Ok(None),
            Rule::SiluOfGate { gate } => {
                let g = gemm::linear(x, gate, tokens, m, n)?;
                for row in g.chunks(m) {
                    for (acc, &z) in s.iter_mut().zip(row) {
                        *acc += silu(z).powi(2);
                    }
                }
            }
            Rule::GateSlope { gate, up } => {
                let g = gemm::linear(x, gate, tokens, m, n)?;
                let u = gemm::linear(x, up, tokens, m, n)?;
                for (gr, ur) in g.chunks(m).zip(u.chunks(m)) {
                    for ((acc, &z), &uv) in s.iter_mut().zip(gr).zip(ur) {
                        *acc += (uv as f64 * silu_slope(z)).powi(2);
                    }
                }
            }
        }
        Ok(Some(s))
    }

    /// The weights of layer `i` from its statistic sums (`sums`, over `tokens` rows; ignored
    /// for rules needing no activations). None: unweighted.
    pub fn weights(
        &self,
        i: usize,
        name: &str,
        sums: Option<&[f64]>,
    ) -> Result<Option<OutputWeights>> {
        let Some(Some((rule, _, _))) = self.rules.get(i) else {
            return Ok(None);
        };
        let raw: &[f64] = match rule {
            Rule::Fixed(d) => d,
            Rule::SiluOfGate { .. } | Rule::GateSlope { .. } => sums.with_context(|| {
                format!("output weights for {name}: no calibration rows reached the layer")
            })?,
        };
        Ok(Some(OutputWeights::from_statistics(
            name, raw, self.alpha, FLOOR,
        )?))
    }

    /// Whether layer `i`'s statistic is measured on its input rows (so calibration must hand
    /// them to [`OutputWeightRules::sums`]; the others need none).
    pub fn needs_rows(&self, i: usize) -> bool {
        matches!(
            self.rules.get(i),
            Some(Some((
                Rule::SiluOfGate { .. } | Rule::GateSlope { .. },
                _,
                _
            )))
        )
    }

    /// Weights of layer `i` straight from its input rows (the sequential hook's case).
    pub fn weights_from_rows(
        &self,
        i: usize,
        name: &str,
        x: &[f32],
        tokens: usize,
    ) -> Result<Option<OutputWeights>> {
        let sums = self.sums(i, x, tokens)?;
        self.weights(i, name, sums.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blr_core::rng::Rng;

    fn cfg() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 11,
            hidden: 6,
            intermediate: 5,
            layers: 1,
            heads: 4,
            kv_heads: 2,
            head_dim: 3,
            rope_theta: 1e4,
            rope_scaling: blr_models::llama::RopeScaling::None,
            rms_eps: 1e-5,
            tie_embeddings: true,
            max_positions: 8,
        }
    }

    /// The statistics against a direct evaluation of their definitions.
    #[test]
    fn statistics_follow_their_definitions() {
        let c = cfg();
        let (h, f, t) = (c.hidden, c.intermediate, 7);
        let mut rng = Rng::new(3);
        let gate = rng.normal_vec(f * h, 1.0);
        let up = rng.normal_vec(f * h, 1.0);
        let o = rng.normal_vec(h * 12, 1.0);
        let x = rng.normal_vec(t * h, 1.0);
        let p = "model.layers.0.";
        let layers = vec![
            (format!("{p}mlp.up_proj"), f, h),
            (format!("{p}mlp.gate_proj"), f, h),
            (format!("{p}self_attn.v_proj"), 6, h),
            (format!("{p}self_attn.q_proj"), 12, h),
        ];
        let lookup = |n: &str| -> Option<Vec<f32>> {
            if n.ends_with("gate_proj") {
                Some(gate.clone())
            } else if n.ends_with("up_proj") {
                Some(up.clone())
            } else if n.ends_with("o_proj") {
                Some(o.clone())
            } else {
                None
            }
        };
        let rules = OutputWeightRules::new(&c, &layers, lookup, true, 1.0).unwrap();
        let dot = |w: &[f32], r: usize, tok: usize| -> f64 {
            (0..h)
                .map(|k| w[r * h + k] as f64 * x[tok * h + k] as f64)
                .sum()
        };
        let sig = |z: f64| 1.0 / (1.0 + (-z).exp());
        let up_s = rules.sums(0, &x, t).unwrap().unwrap();
        let gate_s = rules.sums(1, &x, t).unwrap().unwrap();
        for ch in 0..f {
            let mut want_up = 0.0;
            let mut want_gate = 0.0;
            for tok in 0..t {
                let g = dot(&gate, ch, tok);
                let u = dot(&up, ch, tok);
                want_up += (g * sig(g)).powi(2);
                // d/dg silu(g) by central differences.
                let eps = 1e-5;
                let slope = ((g + eps) * sig(g + eps) - (g - eps) * sig(g - eps)) / (2.0 * eps);
                want_gate += (u * slope).powi(2);
            }
            assert!(
                (up_s[ch] - want_up).abs() < 1e-4 * want_up.max(1.0),
                "up {ch}"
            );
            assert!(
                (gate_s[ch] - want_gate).abs() < 1e-4 * want_gate.max(1.0),
                "gate {ch}"
            );
        }
        // v: 2 kv heads of dim 3, 4 query heads: kv head 0 feeds query heads 0 and 1.
        let v = rules.weights(2, "v", None).unwrap().unwrap();
        let colsq = |col: usize| -> f64 { (0..h).map(|r| (o[r * 12 + col] as f64).powi(2)).sum() };
        let raw: Vec<f64> = (0..6)
            .map(|c| {
                let (kvh, j) = (c / 3, c % 3);
                colsq((2 * kvh) * 3 + j) + colsq((2 * kvh + 1) * 3 + j)
            })
            .collect();
        let want = OutputWeights::from_statistics("v", &raw, 1.0, FLOOR).unwrap();
        for (a, b) in v.values().iter().zip(want.values()) {
            assert!((a - b).abs() < 1e-9);
        }
        assert!(rules.sums(3, &x, t).unwrap().is_none());
        assert!(rules.weights(3, "q", None).unwrap().is_none());
        // Mean 1 after normalisation.
        let w = rules.weights(0, "up", Some(&up_s)).unwrap().unwrap();
        let mean = w.values().iter().sum::<f64>() / f as f64;
        assert!((mean - 1.0).abs() < 1e-12);
        // `auto` (all = false): up_proj only, with the same statistic.
        let up_only = OutputWeightRules::new(&c, &layers, lookup, false, 1.0).unwrap();
        assert_eq!(up_only.sums(0, &x, t).unwrap().unwrap(), up_s);
        for i in 1..4 {
            assert!(up_only.sums(i, &x, t).unwrap().is_none());
            assert!(up_only.weights(i, "l", None).unwrap().is_none());
        }
    }

    #[test]
    fn missing_sibling_and_bad_alpha_are_errors() {
        let c = cfg();
        let layers = vec![("model.layers.0.mlp.up_proj".to_string(), 5, 6)];
        let e = OutputWeightRules::new(&c, &layers, |_| None, false, 1.0).unwrap_err();
        assert!(format!("{e:#}").contains("gate_proj"), "{e:#}");
        let e = OutputWeightRules::new(&c, &[], |_| None, true, -1.0).unwrap_err();
        assert!(format!("{e:#}").contains("alpha"), "{e:#}");
    }
}
