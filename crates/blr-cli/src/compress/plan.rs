//! Which layers to compress and into what: from a global `--ratio`, a built-in preset (the
//! published per-layer settings of ../shared/BRIEF.md section 3), or a TOML file of rules.
//!
//! A rule matches layer names with a regex and sets the format, the block counts and the size
//! (an explicit rank, or a parameter ratio from which the rank follows). The first matching
//! rule wins; a layer no rule matches stays dense. Presets are written as the same rules, so
//! there is one way to describe a plan.

use anyhow::{anyhow, bail, Context, Result};
use blr_compress::shape_for_ratio;
use blr_core::format::{FormatKind, Shape};
use regex::Regex;

/// How big a layer may be.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Sizing {
    /// An explicit rank (`r`, or Monarch's total rank `R`).
    Rank(usize),
    /// A fraction of the dense layer's parameters.
    Ratio(f64),
}

#[derive(Clone, Debug)]
pub struct Rule {
    pub layers: Regex,
    pub format: FormatKind,
    pub b_out: Option<usize>,
    pub b_in: Option<usize>,
    pub sizing: Sizing,
}

/// The decision for one layer.
#[derive(Clone, Debug, PartialEq)]
pub struct LayerPlan {
    pub name: String,
    pub shape: Shape,
    /// Whether the rank came from a ratio (and so may be re-allocated under a global budget).
    pub from_ratio: bool,
}

/// Block count used when none is given: the largest of 16, 12, 9, 8, 6, 4, 3, 2 that divides
/// both dimensions (16 is the published choice for Llama-sized layers; smaller layers get
/// fewer, larger blocks).
pub fn auto_blocks(m: usize, n: usize) -> usize {
    [16, 12, 9, 8, 6, 4, 3, 2]
        .into_iter()
        .find(|b| m.is_multiple_of(*b) && n.is_multiple_of(*b))
        .unwrap_or(1)
}

/// The built-in presets: name, description, TOML rules (with `{rank:blast/monarch/lowrank}`
/// choices per format written as separate rules keyed by format).
pub const PRESETS: &[(&str, &str)] = &[
    (
        "llama7b",
        "Llama-7B, published ~50% settings: q/k/v/o BLAST b=16 r=1024 (Monarch R=1024, LR r=1024); \
         gate/up/down BLAST r=1488 (Monarch R=1536, LR r=1488)",
    ),
    (
        "llama3.2-1b",
        "Llama-3.2-1B, published settings: q/o r=256, gate r=512, up/down r=768, b=16; k/v dense",
    ),
];

fn preset_rules(name: &str, format: FormatKind) -> Result<Vec<Rule>> {
    let pick = |blast: usize, monarch: usize, lowrank: usize| match format {
        FormatKind::Blast => blast,
        FormatKind::Monarch => monarch,
        _ => lowrank,
    };
    let rule = |pattern: &str, rank: usize| -> Result<Rule> {
        Ok(Rule {
            layers: Regex::new(pattern)?,
            format,
            b_out: Some(16),
            b_in: Some(16),
            sizing: Sizing::Rank(rank),
        })
    };
    Ok(match name {
        "llama7b" => vec![
            rule(r"self_attn\.(q|k|v|o)_proj$", pick(1024, 1024, 1024))?,
            rule(r"mlp\.(gate|up|down)_proj$", pick(1488, 1536, 1488))?,
        ],
        "llama3.2-1b" => vec![
            rule(r"self_attn\.(q|o)_proj$", 256)?,
            rule(r"mlp\.gate_proj$", 512)?,
            rule(r"mlp\.(up|down)_proj$", 768)?,
        ],
        other => bail!(
            "unknown preset '{other}' (known: {})",
            PRESETS
                .iter()
                .map(|(n, _)| *n)
                .collect::<Vec<_>>()
                .join(", ")
        ),
    })
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlPlan {
    #[serde(default)]
    rule: Vec<TomlRule>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct TomlRule {
    layers: String,
    format: Option<String>,
    blocks: Option<usize>,
    blocks_out: Option<usize>,
    blocks_in: Option<usize>,
    rank: Option<usize>,
    ratio: Option<f64>,
}

/// Parses a rules file:
/// ```toml
/// [[rule]]
/// layers = 'mlp\.(gate|up)_proj$'   # regex on the layer name
/// format = "blast"                  # optional (default: --format); "dense" keeps the layer
/// blocks = 16                       # optional (default: auto); or blocks_out / blocks_in
/// rank = 96                         # or ratio = 0.5; neither: --ratio
/// ```
pub fn rules_from_toml(
    text: &str,
    default_format: FormatKind,
    default_ratio: Option<f64>,
) -> Result<Vec<Rule>> {
    let plan: TomlPlan = toml::from_str(text)
        .context("layer config is not valid TOML for blr (see `blr compress --help`)")?;
    if plan.rule.is_empty() {
        bail!("the layer config has no [[rule]] entries");
    }
    plan.rule
        .into_iter()
        .enumerate()
        .map(|(i, r)| {
            let layers = Regex::new(&r.layers)
                .with_context(|| format!("rule {}: bad regex '{}'", i + 1, r.layers))?;
            let format = match &r.format {
                Some(f) => f
                    .parse::<FormatKind>()
                    .with_context(|| format!("rule {}", i + 1))?,
                None => default_format,
            };
            let sizing = match (r.rank, r.ratio, default_ratio) {
                (Some(_), Some(_), _) => bail!(
                    "rule {} ('{}'): give rank or ratio, not both",
                    i + 1,
                    r.layers
                ),
                (Some(rank), None, _) => Sizing::Rank(rank),
                (None, Some(ratio), _) | (None, None, Some(ratio)) => Sizing::Ratio(ratio),
                (None, None, None) if format == FormatKind::Dense => Sizing::Ratio(1.0),
                (None, None, None) => bail!(
                    "rule {} ('{}'): no rank or ratio, and no --ratio given",
                    i + 1,
                    r.layers
                ),
            };
            Ok(Rule {
                layers,
                format,
                b_out: r.blocks_out.or(r.blocks),
                b_in: r.blocks_in.or(r.blocks),
                sizing,
            })
        })
        .collect()
}

/// One rule for every layer (the `--ratio` / `--rank` form).
pub fn uniform_rules(format: FormatKind, blocks: Option<usize>, sizing: Sizing) -> Vec<Rule> {
    vec![Rule {
        // Every linear layer; the tied/untied LM head is excluded by default because it is
        // the layer most sensitive to compression and is often shared with the embedding.
        layers: Regex::new(r"^model\.layers\.").unwrap_or_else(|_| unreachable!("constant regex")),
        format,
        b_out: blocks,
        b_in: blocks,
        sizing,
    }]
}

pub fn preset(name: &str, format: FormatKind) -> Result<Vec<Rule>> {
    preset_rules(name, format)
}

/// Applies the rules to the model's linear layers `(name, m, n)`; `filter` further restricts
/// which layers may change. Layers left dense are not listed.
pub fn resolve(
    rules: &[Rule],
    linears: &[(String, usize, usize)],
    filter: Option<&Regex>,
) -> Result<Vec<LayerPlan>> {
    let mut out = Vec::new();
    for (name, m, n) in linears {
        if filter.is_some_and(|f| !f.is_match(name)) {
            continue;
        }
        let Some(rule) = rules.iter().find(|r| r.layers.is_match(name)) else {
            continue;
        };
        if rule.format == FormatKind::Dense {
            continue;
        }
        let auto = auto_blocks(*m, *n);
        let (b_out, b_in) = match rule.format {
            FormatKind::LowRank => (1, 1),
            FormatKind::Monarch => {
                let b = rule.b_out.or(rule.b_in).unwrap_or(auto);
                (b, b)
            }
            _ => (rule.b_out.unwrap_or(auto), rule.b_in.unwrap_or(auto)),
        };
        let (shape, from_ratio) = match rule.sizing {
            Sizing::Ratio(ratio) => (
                shape_for_ratio(rule.format, *m, *n, b_out, b_in, ratio)
                    .map_err(|e| anyhow!("layer {name} ({m} x {n}): {e}"))?,
                true,
            ),
            Sizing::Rank(rank) => {
                let s = Shape {
                    format: rule.format,
                    m: *m,
                    n: *n,
                    b_out,
                    b_in,
                    rank,
                };
                s.validate()
                    .map_err(|e| anyhow!("layer {name} ({m} x {n}): {e}"))?;
                (s, false)
            }
        };
        out.push(LayerPlan {
            name: name.clone(),
            shape,
            from_ratio,
        });
    }
    if out.is_empty() {
        bail!("no layer selected for compression: check --layers / the rules' `layers` regexes against the model's layer names (e.g. model.layers.0.mlp.up_proj)");
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn linears() -> Vec<(String, usize, usize)> {
        let mut v = Vec::new();
        for i in 0..2 {
            let p = format!("model.layers.{i}");
            v.push((format!("{p}.self_attn.q_proj"), 576, 576));
            v.push((format!("{p}.self_attn.k_proj"), 192, 576));
            v.push((format!("{p}.mlp.up_proj"), 1536, 576));
            v.push((format!("{p}.mlp.down_proj"), 576, 1536));
        }
        v
    }

    #[test]
    fn uniform_ratio_plan() {
        let rules = uniform_rules(FormatKind::Blast, None, Sizing::Ratio(0.5));
        let plan = resolve(&rules, &linears(), None).unwrap();
        assert_eq!(plan.len(), 8);
        for p in &plan {
            assert_eq!(p.shape.b_out, 16);
            let ratio = p.shape.params() as f64 / (p.shape.m * p.shape.n) as f64;
            assert!(ratio <= 0.5 && ratio > 0.45, "{}: {ratio}", p.name);
        }
        let only_mlp = Regex::new("mlp").unwrap();
        assert_eq!(
            resolve(&rules, &linears(), Some(&only_mlp)).unwrap().len(),
            4
        );
        assert!(resolve(&rules, &linears(), Some(&Regex::new("nothing").unwrap())).is_err());
    }

    #[test]
    fn toml_rules_first_match_wins() {
        let text = r#"
            [[rule]]
            layers = 'k_proj$'
            format = "dense"
            [[rule]]
            layers = 'mlp\.'
            format = "monarch"
            blocks = 4
            rank = 64
            [[rule]]
            layers = '.'
            ratio = 0.3
        "#;
        let rules = rules_from_toml(text, FormatKind::Blast, None).unwrap();
        let plan = resolve(&rules, &linears(), None).unwrap();
        assert_eq!(plan.len(), 6);
        let up = plan
            .iter()
            .find(|p| p.name.ends_with("0.mlp.up_proj"))
            .unwrap();
        assert_eq!(
            (up.shape.format, up.shape.b_out, up.shape.rank),
            (FormatKind::Monarch, 4, 64)
        );
        assert!(!up.from_ratio);
        let q = plan
            .iter()
            .find(|p| p.name.ends_with("0.self_attn.q_proj"))
            .unwrap();
        assert_eq!(q.shape.format, FormatKind::Blast);
        assert!(q.from_ratio);
        assert!(
            rules_from_toml("[[rule]]\nlayers = '('\nrank = 2", FormatKind::Blast, None).is_err()
        );
        assert!(rules_from_toml(
            "[[rule]]\nlayers = 'x'\nrank = 2\nratio = 0.5",
            FormatKind::Blast,
            None
        )
        .is_err());
        assert!(rules_from_toml("[[rule]]\nlayers = 'x'", FormatKind::Blast, None).is_err());
        assert!(
            rules_from_toml("[[rule]]\nlayers = 'x'\nrnak = 3", FormatKind::Blast, None).is_err()
        );
    }

    #[test]
    fn presets_resolve_on_llama_shapes() {
        let l: Vec<(String, usize, usize)> = vec![
            ("model.layers.0.self_attn.q_proj".into(), 4096, 4096),
            ("model.layers.0.mlp.gate_proj".into(), 11008, 4096),
        ];
        let plan = resolve(&preset("llama7b", FormatKind::Blast).unwrap(), &l, None).unwrap();
        assert_eq!(plan[0].shape.rank, 1024);
        assert_eq!(plan[1].shape.rank, 1488);
        assert!(preset("gpt5", FormatKind::Blast).is_err());
    }

    #[test]
    fn bad_blocks_name_the_layer() {
        let rules = uniform_rules(FormatKind::Blast, Some(5), Sizing::Ratio(0.5));
        let err = resolve(&rules, &linears(), None).unwrap_err().to_string();
        assert!(err.contains("model.layers.0.self_attn.q_proj"), "{err}");
    }
}
