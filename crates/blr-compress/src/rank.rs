//! Rank selection: the rank a format needs to hit a parameter ratio, and a global allocator
//! that spends one parameter budget across many layers where it buys the most error reduction.

use crate::error::{CompressError, Result};
use blr_core::format::Shape;
use blr_core::FormatKind;

/// The largest rank whose layer stays within `ratio * m * n` parameters (BRIEF section 2
/// counts: LR and Monarch `R (m + n)`, BLAST `r (m + n + b_out b_in)`). Monarch ranks are
/// rounded down to a multiple of `b` (each block gets `R / b`). `b_out`/`b_in` are ignored for
/// low-rank. Errors when the ratio leaves less than the smallest layer of that format.
///
/// Example: Llama-7B q_proj (4096 x 4096) at 0.5 with BLAST b = 16 gives r = 992
/// (8.31M params); the published config rounds up to r = 1024 (52%).
pub fn shape_for_ratio(
    format: FormatKind,
    m: usize,
    n: usize,
    b_out: usize,
    b_in: usize,
    ratio: f64,
) -> Result<Shape> {
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(CompressError::rank(format!(
            "parameter ratio must be in (0, 1], got {ratio}"
        )));
    }
    let budget = ratio * (m as f64) * (n as f64);
    let (b_out, b_in) = match format {
        FormatKind::Dense | FormatKind::LowRank => (1, 1),
        _ => (b_out, b_in),
    };
    let rank = match format {
        FormatKind::Dense => m.min(n),
        FormatKind::LowRank => (budget / (m + n) as f64).floor() as usize,
        FormatKind::Monarch => {
            if b_out != b_in {
                return Err(CompressError::rank(format!(
                    "Monarch uses one block count on both sides, got {b_out} and {b_in}"
                )));
            }
            let per = (budget / (m + n) as f64).floor() as usize;
            per / b_out.max(1) * b_out
        }
        FormatKind::Blast => (budget / (m + n + b_out * b_in) as f64).floor() as usize,
    };
    let shape = Shape {
        format,
        m,
        n,
        b_out,
        b_in,
        rank,
    };
    if rank == 0 {
        let smallest = Shape {
            rank: if format == FormatKind::Monarch {
                b_out
            } else {
                1
            },
            ..shape
        };
        return Err(CompressError::rank(format!(
            "ratio {ratio} of a {m} x {n} layer is {budget:.0} parameters, less than the smallest \
             {format} layer ({} parameters, ratio {:.4})",
            smallest.params(),
            smallest.params() as f64 / (m * n) as f64
        )));
    }
    shape
        .validate()
        .map_err(|e| CompressError::rank(e.to_string()))?;
    Ok(shape)
}

/// One option for one layer: its rank, parameter count and the error it leaves.
///
/// Errors must be in units comparable across layers, e.g. the absolute squared output error
/// `||(W - Ŵ) X||_F^2` over the same calibration tokens (relative errors would weigh a tiny
/// layer like a huge one).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Candidate {
    pub rank: usize,
    pub params: usize,
    pub error: f64,
    /// Keep the layer dense (`m n` parameters, no error) instead of factorizing it; `rank` is
    /// then `min(m, n)` and means nothing.
    pub dense: bool,
}

/// The options of one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerOptions {
    pub name: String,
    pub candidates: Vec<Candidate>,
}

impl LayerOptions {
    /// Candidates of `shape.format` at each `(rank, error)` of an error-vs-rank curve, e.g.
    /// from [`crate::lowrank_error_curve`] (scaled to absolute units) or from factorizations
    /// at a few ranks.
    pub fn from_curve(name: impl Into<String>, shape: Shape, curve: &[(usize, f64)]) -> Self {
        LayerOptions {
            name: name.into(),
            candidates: curve
                .iter()
                .map(|&(rank, error)| Candidate {
                    rank,
                    params: Shape { rank, ..shape }.params(),
                    error,
                    dense: false,
                })
                .collect(),
        }
    }
}

/// What the allocator chose.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    /// Per layer, the chosen candidate.
    pub chosen: Vec<Candidate>,
    pub params: usize,
    pub error: f64,
}

/// Spends at most `budget` parameters over `layers`, greedily on marginal gain per parameter.
///
/// Every layer starts at its cheapest candidate. Each round considers, for every layer, the
/// move from its current candidate to any larger one that still fits the remaining budget, and
/// takes the move with the largest `(error decrease) / (extra parameters)` over all layers.
/// Looking past the next candidate (to any larger one) means a non-convex curve, where one
/// step buys little but two buy a lot, is still handled. On convex curves with equal steps
/// this is exactly optimal; in general it is the classic greedy for separable budgeted
/// minimisation.
pub fn allocate(layers: &[LayerOptions], budget: usize) -> Result<Allocation> {
    let mut sorted: Vec<Vec<Candidate>> = Vec::with_capacity(layers.len());
    for layer in layers {
        if layer.candidates.is_empty() {
            return Err(CompressError::rank(format!(
                "layer '{}' has no candidates",
                layer.name
            )));
        }
        if let Some(c) = layer
            .candidates
            .iter()
            .find(|c| !(c.error.is_finite() && c.error >= 0.0))
        {
            return Err(CompressError::rank(format!(
                "layer '{}': candidate rank {} has error {} (must be finite and >= 0)",
                layer.name, c.rank, c.error
            )));
        }
        let mut c = layer.candidates.clone();
        c.sort_by(|a, b| a.params.cmp(&b.params).then(a.error.total_cmp(&b.error)));
        sorted.push(c);
    }
    let minimum: usize = sorted.iter().map(|c| c[0].params).sum();
    if minimum > budget {
        return Err(CompressError::rank(format!(
            "budget of {budget} parameters is below the {minimum} that the cheapest candidate of \
             every layer needs together; raise the budget or add smaller ranks"
        )));
    }
    let mut at = vec![0usize; sorted.len()];
    let mut spent = minimum;
    loop {
        let left = budget - spent;
        let mut best: Option<(f64, usize, usize)> = None;
        for (l, cands) in sorted.iter().enumerate() {
            let cur = cands[at[l]];
            for (idx, c) in cands.iter().enumerate().skip(at[l] + 1) {
                let extra = c.params - cur.params;
                if extra > left {
                    break;
                }
                let gain = cur.error - c.error;
                if gain <= 0.0 {
                    continue;
                }
                // A zero-cost improvement is infinitely good.
                let rate = if extra == 0 {
                    f64::INFINITY
                } else {
                    gain / extra as f64
                };
                if best.is_none_or(|(r, _, _)| rate > r) {
                    best = Some((rate, l, idx));
                }
            }
        }
        let Some((_, l, idx)) = best else { break };
        spent += sorted[l][idx].params - sorted[l][at[l]].params;
        at[l] = idx;
    }
    let chosen: Vec<Candidate> = sorted.iter().zip(&at).map(|(c, &i)| c[i]).collect();
    Ok(Allocation {
        params: spent,
        error: chosen.iter().map(|c| c.error).sum(),
        chosen,
    })
}

/// Which ranks [`curve_candidates`] offers a layer, and how it weighs the layer's error.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CurveRange {
    /// Smallest and largest rank offered (clamped to at least `step`).
    pub lo: usize,
    pub hi: usize,
    /// Ranks between `lo` and `hi`: `points + 1` evenly spaced ones.
    pub points: usize,
    /// Ranks are multiples of this (Monarch: the block count; the curve is indexed by
    /// `rank / step`).
    pub step: usize,
    /// The candidate's error is `weight * curve[rank / step]`: e.g. `||W||_F^2` (absolute
    /// squared error) or a measured sensitivity of the model's output to the layer's relative
    /// error (see `blr compress --allocation`).
    pub weight: f64,
    /// Also offer keeping the layer dense (its `m n` parameters, error 0): worth it where a
    /// layer's error costs so much that spending a whole dense layer's parameters on it buys
    /// more than the same parameters spread over other layers.
    pub allow_dense: bool,
}

/// The candidates of one layer of shape `shape` (whose `rank` is its uniform rank, always
/// offered) from its relative error-vs-rank curve `curve` (entry `k`: rank `k * step`, e.g.
/// [`crate::lowrank_error_curve`]). Ranks whose layer would have at least the dense layer's
/// parameters are left out (the dense layer is exact at that size).
pub fn curve_candidates(
    name: impl Into<String>,
    shape: Shape,
    curve: &[f64],
    range: CurveRange,
) -> Result<LayerOptions> {
    let name = name.into();
    if curve.is_empty() {
        return Err(CompressError::rank(format!(
            "layer '{name}': empty error curve"
        )));
    }
    if !(range.weight.is_finite() && range.weight >= 0.0) {
        return Err(CompressError::rank(format!(
            "layer '{name}': error weight {} must be finite and >= 0",
            range.weight
        )));
    }
    let step = range.step.max(1);
    let dense = shape.m * shape.n;
    let lo = range.lo.max(step);
    let hi = range.hi.max(lo);
    let points = range.points.max(1);
    let error_at = |rank: usize| range.weight * curve[(rank / step).min(curve.len() - 1)];
    let mut candidates: Vec<Candidate> = Vec::new();
    let ranks = (0..=points)
        .map(|k| ((lo + (hi - lo) * k / points) / step * step).max(step))
        .chain(std::iter::once(shape.rank));
    for rank in ranks {
        let s = Shape { rank, ..shape };
        let keep_uniform = rank == shape.rank;
        if (s.params() >= dense && !keep_uniform) || candidates.iter().any(|c| c.rank == rank) {
            continue;
        }
        candidates.push(Candidate {
            rank,
            params: s.params(),
            error: error_at(rank),
            dense: false,
        });
    }
    if range.allow_dense {
        candidates.push(Candidate {
            rank: shape.m.min(shape.n),
            params: dense,
            error: 0.0,
            dense: true,
        });
    }
    Ok(LayerOptions { name, candidates })
}
