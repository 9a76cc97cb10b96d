//! Property tests: over many random shapes (odd sizes, rectangular, b_out != b_in), every
//! format's forward equals its `to_dense()` applied to the input, and Monarch matches a literal
//! transcription of the brief's flatten/permute definition.

use super::*;
use crate::rng::Rng;

fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    let num: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).powi(2))
        .sum();
    let den: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
    (num / den.max(1e-30)).sqrt()
}

fn random_shape(rng: &mut Rng, format: FormatKind) -> Shape {
    let b_out = 1 + rng.below(5);
    let b_in = match format {
        FormatKind::Monarch => b_out,
        _ => 1 + rng.below(5),
    };
    let (b_out, b_in) = match format {
        FormatKind::Dense | FormatKind::LowRank => (1, 1),
        _ => (b_out, b_in),
    };
    let m = b_out * (1 + rng.below(13));
    let n = b_in * (1 + rng.below(13));
    let rank = 1 + rng.below(9);
    let rank = if format == FormatKind::Dense {
        m.min(n)
    } else {
        rank
    };
    Shape {
        format,
        m,
        n,
        b_out,
        b_in,
        rank,
    }
}

#[test]
fn forward_matches_to_dense_for_every_format() {
    let mut rng = Rng::new(11);
    for format in FormatKind::ALL {
        for case in 0..60 {
            let shape = random_shape(&mut rng, format);
            let layer = Linear::random(&shape, case).unwrap();
            assert_eq!(layer.params(), shape.params());
            let tokens = 1 + rng.below(9);
            let x = rng.normal_vec(tokens * shape.n, 1.0);
            let y = layer.forward(&x, tokens).unwrap();
            let dense = layer.to_dense().unwrap();
            let y_ref = Linear::Dense(dense).forward(&x, tokens).unwrap();
            let err = rel_err(&y, &y_ref);
            assert!(err < 1e-5, "{shape:?} tokens={tokens}: rel err {err}");
        }
    }
}

/// The brief's Monarch definition, transcribed literally with explicit reshapes.
fn monarch_literal(l: &Monarch, x: &[f32], tokens: usize) -> Vec<f32> {
    let (b, r) = (l.blocks, l.rank);
    let (p, q) = (l.m / b, l.n / b);
    let mut y = vec![0.0f32; tokens * l.m];
    for t in 0..tokens {
        // out1 (b, R)
        let mut out1 = vec![0.0f64; b * r];
        for k in 0..b {
            for i in 0..r {
                out1[k * r + i] = (0..q)
                    .map(|c| l.w1[(k * r + i) * q + c] as f64 * x[t * l.n + k * q + c] as f64)
                    .sum();
            }
        }
        // flatten (b*R) -> view (R, b) -> transpose (b, R)
        let mut out1p = vec![0.0f64; b * r];
        for j in 0..r {
            for ll in 0..b {
                out1p[ll * r + j] = out1[j * b + ll];
            }
        }
        // out2 (b, p) -> permute to (p, b) -> flatten
        for ll in 0..b {
            for s in 0..p {
                let v: f64 = (0..r)
                    .map(|j| l.w2[(ll * p + s) * r + j] as f64 * out1p[ll * r + j])
                    .sum();
                y[t * l.m + s * b + ll] = v as f32;
            }
        }
    }
    y
}

#[test]
fn monarch_matches_literal_definition() {
    let mut rng = Rng::new(5);
    for case in 0..40 {
        let shape = random_shape(&mut rng, FormatKind::Monarch);
        let Linear::Monarch(layer) = Linear::random(&shape, case).unwrap() else {
            unreachable!()
        };
        let tokens = 1 + rng.below(5);
        let x = rng.normal_vec(tokens * shape.n, 1.0);
        let y = Linear::Monarch(layer.clone()).forward(&x, tokens).unwrap();
        let err = rel_err(&y, &monarch_literal(&layer, &x, tokens));
        assert!(err < 1e-5, "{shape:?}: {err}");
    }
}

#[test]
fn monarch_blocks_have_rank_r_over_b() {
    // Rows grouped by o mod b, columns by i div q: each block is a sum of R/b outer products.
    let shape = Shape {
        format: FormatKind::Monarch,
        m: 12,
        n: 8,
        b_out: 4,
        b_in: 4,
        rank: 4,
    };
    let layer = Linear::random(&shape, 3).unwrap();
    let w = layer.to_dense().unwrap();
    let (b, p, q) = (4, 3, 2);
    for l in 0..b {
        for k in 0..b {
            // R/b = 1: every 2x2 minor of the (p x q) block vanishes.
            let blk = |s: usize, c: usize| w.weight[(s * b + l) * shape.n + k * q + c] as f64;
            for s1 in 0..p {
                for s2 in 0..p {
                    let det = blk(s1, 0) * blk(s2, 1) - blk(s1, 1) * blk(s2, 0);
                    assert!(det.abs() < 1e-5, "block ({l},{k}) is not rank 1: {det}");
                }
            }
        }
    }
}

#[test]
fn constructors_reject_bad_configs() {
    let bad = [
        Shape {
            format: FormatKind::Blast,
            m: 10,
            n: 12,
            b_out: 3,
            b_in: 4,
            rank: 2,
        },
        Shape {
            format: FormatKind::Blast,
            m: 12,
            n: 10,
            b_out: 3,
            b_in: 4,
            rank: 2,
        },
        Shape {
            format: FormatKind::Blast,
            m: 12,
            n: 12,
            b_out: 3,
            b_in: 4,
            rank: 0,
        },
        Shape {
            format: FormatKind::Monarch,
            m: 12,
            n: 12,
            b_out: 3,
            b_in: 4,
            rank: 3,
        },
        Shape {
            format: FormatKind::LowRank,
            m: 12,
            n: 12,
            b_out: 2,
            b_in: 1,
            rank: 3,
        },
        Shape {
            format: FormatKind::Dense,
            m: 0,
            n: 12,
            b_out: 1,
            b_in: 1,
            rank: 1,
        },
    ];
    for s in bad {
        let err = Linear::random(&s, 0).unwrap_err();
        assert!(
            matches!(err, crate::Error::InvalidConfig { .. }),
            "{s:?}: {err}"
        );
    }
    // Factor sizes that disagree with the shape.
    let err = LowRank::new(4, 5, 2, vec![0.0; 8], vec![0.0; 9]).unwrap_err();
    assert!(err.to_string().contains("'v'"), "{err}");
    let err = Blast::new(4, 4, 2, 2, 1, vec![0.0; 4], vec![0.0; 4], vec![0.0; 3]).unwrap_err();
    assert!(err.to_string().contains("'s'"), "{err}");
}

#[test]
fn forward_rejects_wrong_input_length() {
    let shape = Shape {
        format: FormatKind::Blast,
        m: 8,
        n: 6,
        b_out: 2,
        b_in: 3,
        rank: 2,
    };
    let layer = Linear::random(&shape, 1).unwrap();
    assert!(layer.forward(&[0.0; 7], 1).is_err());
}

#[test]
fn format_names_round_trip() {
    for f in FormatKind::ALL {
        assert_eq!(f.name().parse::<FormatKind>().unwrap(), f);
    }
    assert!("butterfly".parse::<FormatKind>().is_err());
}
