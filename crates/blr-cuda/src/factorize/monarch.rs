//! Monarch projection on the GPU (data-free): the `b x b` blockwise truncated SVDs of
//! `blr_compress::monarch` (Eckart-Young per block: the Frobenius-optimal Monarch matrix),
//! batched: one strided-batched f64 Gram per row group, one batched eigensolver call for all
//! `b^2` blocks, one batched product for the other side ([`svd::monarch_block_svds`]), then the
//! same scatter into `w1`, `w2`. Calibrated Monarch (block-whitened SVDs and Gauss-Seidel
//! sweeps over the off-diagonal Gram blocks) stays on the CPU.

use blr_compress::{MonarchOptions, Target};
use blr_core::format::Shape;
use blr_core::{FormatKind, Linear, Monarch};

use super::svd;
use crate::error::{Error, Result};
use crate::gpu::Gpu;

/// Data-free Monarch projection of `target` on `gpu`: the factors of `blr_compress::monarch(..,
/// None, ..)` up to the sign of each singular pair (the product is the same).
pub fn monarch(gpu: &Gpu, target: &Target<'_>, opts: &MonarchOptions) -> Result<Linear> {
    let (m, n, b, rr) = (target.m, target.n, opts.blocks, opts.rank);
    Shape {
        format: FormatKind::Monarch,
        m,
        n,
        b_out: b,
        b_in: b,
        rank: rr,
    }
    .validate()
    .map_err(|e| Error::Shape(format!("{}: {e}", target.name)))?;
    if !rr.is_multiple_of(b) {
        return Err(Error::Shape(format!(
            "{}: Monarch projection needs the rank R = {rr} to be a multiple of the block count \
             b = {b} (each of the b x b blocks gets rank R/b)",
            target.name
        )));
    }
    let (p, q, t) = (m / b, n / b, rr / b);
    let (left, right_t) = svd::monarch_block_svds(gpu, target.weight, m, n, b, t)?;
    let mut w1 = vec![0f32; b * rr * q];
    let mut w2 = vec![0f32; b * p * rr];
    for l in 0..b {
        for k in 0..b {
            let blk = l * b + k;
            for tt in 0..t {
                // Intermediate i = l + b t' of w1[k]; column j = k t + t' of w2[l].
                let i = l + b * tt;
                let src = &right_t[(blk * t + tt) * q..(blk * t + tt + 1) * q];
                for (c, &v) in src.iter().enumerate() {
                    w1[(k * rr + i) * q + c] = v as f32;
                }
                let j = k * t + tt;
                let src = &left[(blk * t + tt) * p..(blk * t + tt + 1) * p];
                for (s, &v) in src.iter().enumerate() {
                    w2[(l * p + s) * rr + j] = v as f32;
                }
            }
        }
    }
    let layer = Monarch::new(m, n, b, rr, w1, w2).map_err(|e| Error::Shape(e.to_string()))?;
    Ok(Linear::Monarch(layer))
}

#[cfg(test)]
mod tests {
    use super::super::tests::{bench_spec, gpu_or_skip};
    use super::*;
    use blr_compress::Silent;
    use blr_core::rng::Rng;

    #[test]
    fn gpu_monarch_matches_the_cpu_projection() {
        let Some(gpu) = gpu_or_skip("gpu_monarch_matches_the_cpu_projection") else {
            return;
        };
        // (m, n, b, R): p < q, p > q, full rank per block (t = p = q), t > min(p, q), b = 1,
        // odd sizes.
        for (m, n, b, rr) in [
            (48, 60, 4, 8),
            (60, 36, 3, 9),
            (64, 64, 4, 64),
            (90, 126, 3, 12),
            (28, 44, 2, 30),
            (35, 21, 1, 5),
        ] {
            let w = Rng::new((m * n + b) as u64).normal_vec(m * n, 1.0);
            let target = Target::new("mon", m, n, &w).unwrap();
            let opts = MonarchOptions::new(b, rr);
            let cpu = blr_compress::monarch(&target, &opts, None, &Silent);
            let gpu_res = monarch(&gpu, &target, &opts);
            let (cpu, g) = match (cpu, gpu_res) {
                (Ok(c), Ok(g)) => (c, g),
                (Err(_), Err(e)) => {
                    eprintln!("monarch {m}x{n} b={b} R={rr}: refused by both ({e})");
                    continue;
                }
                (c, g) => panic!(
                    "{m}x{n} b={b} R={rr}: cpu {:?} gpu {:?}",
                    c.is_ok(),
                    g.is_ok()
                ),
            };
            let ec = blr_compress::relative_error(&target, &cpu, None).unwrap();
            let eg = blr_compress::relative_error(&target, &g, None).unwrap();
            let (dc, dg) = (cpu.to_dense().unwrap(), g.to_dense().unwrap());
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (a, c) in dg.weight.iter().zip(&dc.weight) {
                num += f64::from(a - c).powi(2);
                den += f64::from(*c).powi(2);
            }
            let prod = (num / den.max(1e-300)).sqrt();
            eprintln!(
                "monarch {m}x{n} b={b} R={rr}: error gpu {eg:.9} cpu {ec:.9}, products differ \
                 by {prod:.2e}"
            );
            assert!((eg - ec).abs() < 1e-5 * ec.max(1e-3), "{eg} vs {ec}");
            assert!(prod < 1e-4, "{m}x{n} b={b} R={rr}: {prod}");
        }
    }

    /// Timing probe (not a CI test): `BLR_MON_BENCH=m,n,b,R` times the GPU and CPU projections
    /// of a N(0, 1) matrix and prints one `BENCHJSON` line each.
    #[test]
    #[ignore]
    fn bench_gpu_monarch() {
        let Some(v) = bench_spec("bench_gpu_monarch", "BLR_MON_BENCH", "m,n,b,R") else {
            return;
        };
        let (m, n, b, rr) = (v[0], v[1], v[2], v[3]);
        let Some(gpu) = gpu_or_skip("bench_gpu_monarch") else {
            return;
        };
        let w = Rng::new(0).normal_vec(m * n, 1.0);
        let target = Target::new("bench", m, n, &w).unwrap();
        let opts = MonarchOptions::new(b, rr);
        for device in ["gpu", "cpu"] {
            let t = std::time::Instant::now();
            let layer = if device == "gpu" {
                monarch(&gpu, &target, &opts).unwrap()
            } else {
                blr_compress::monarch(&target, &opts, None, &Silent).unwrap()
            };
            let secs = t.elapsed().as_secs_f64();
            let e = blr_compress::relative_error(&target, &layer, None).unwrap();
            println!(
                "BENCHJSON {{\"what\":\"monarch\",\"device\":\"{device}\",\"m\":{m},\"n\":{n},\"b\":{b},\"R\":{rr},\"seconds\":{secs:.3},\"rel_error\":{e:.9}}}"
            );
        }
    }
}
