//! GPU BLAST against the CPU path (`blr_compress::blast_report`) on odd shapes, and the batched
//! Cholesky against its definition. The GPU tests print SKIP and pass where no usable GPU is
//! (CI); the host-only ones always run.

use super::chol::BatchedCholesky;
use super::*;
use blr_compress::{BlastInit, BlastOptions, Silent};
use blr_core::rng::Rng;
use blr_core::Blast;

/// The GPU for `test`, or `None` after printing why it skips (no usable GPU: CI). Shared by
/// the GPU tests of every factorize module.
pub(super) fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match open_gpu() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIP {test}: no usable GPU here ({e})");
            None
        }
    }
}

/// The comma-separated sizes of a timing probe's environment variable `var` (`fields` names
/// them), or `None` after printing how to run `test` when it is unset.
pub(super) fn bench_spec(test: &str, var: &str, fields: &str) -> Option<Vec<usize>> {
    let Ok(spec) = std::env::var(var) else {
        eprintln!("SKIP {test}: set {var}={fields}");
        return None;
    };
    Some(spec.split(',').map(|x| x.trim().parse().unwrap()).collect())
}

fn rel_diff(a: &[f32], b: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        num += (f64::from(x) - f64::from(y)).powi(2);
        den += f64::from(y).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

#[test]
fn unsupported_requests_say_why() {
    let opts = BlastOptions::new(2, 3);
    assert!(unsupported(&opts, false).is_none());
    assert!(unsupported(&opts, true).is_none());
    let gd = BlastOptions {
        method: BlastMethod::GradientDescent,
        ..opts
    };
    assert!(unsupported(&gd, false).unwrap().contains("gradient"));
}

/// `||L L^T - A|| / ||A||` per matrix, from the lower triangles of `l` (column-major r x r).
fn recon_errors(l: &[f32], host: &[f32], r: usize, batch: usize) -> Vec<f64> {
    (0..batch)
        .map(|b| {
            let lb = &l[b * r * r..(b + 1) * r * r];
            let ab = &host[b * r * r..(b + 1) * r * r];
            let mut recon = vec![0f32; r * r];
            for c in 0..r {
                for row in c..r {
                    let mut acc = 0.0f64;
                    for t in 0..=c {
                        acc += f64::from(lb[t * r + row]) * f64::from(lb[t * r + c]);
                    }
                    recon[c * r + row] = acc as f32;
                    recon[row * r + c] = acc as f32;
                }
            }
            rel_diff(&recon, ab)
        })
        .collect()
}

#[test]
fn batched_cholesky_reconstructs_spd_matrices() {
    let Some(gpu) = gpu_or_skip("batched_cholesky_reconstructs_spd_matrices") else {
        return;
    };
    let k = Kernels::load(&gpu).unwrap();
    let blas = Cublas::new(&gpu).unwrap();
    // r below, at and across the panel and group widths (odd tails), odd batch sizes; every
    // (diagonal step, group) width pair the code accepts in use.
    for (r, batch) in [(37, 3), (128, 2), (301, 5), (601, 2)] {
        let mut rng = Rng::new(r as u64);
        let mut host = Vec::with_capacity(batch * r * r);
        for _ in 0..batch {
            // X X^T / r + 0.1 I with X (r, r + 5): SPD, condition ~1e2.
            let x = rng.normal_vec(r * (r + 5), 1.0);
            for c in 0..r {
                for row in 0..r {
                    let mut acc = 0.0f64;
                    for t in 0..r + 5 {
                        acc += f64::from(x[row * (r + 5) + t]) * f64::from(x[c * (r + 5) + t]);
                    }
                    host.push((acc / r as f64 + if row == c { 0.1 } else { 0.0 }) as f32);
                }
            }
        }
        let nrhs = 3;
        let rhs = rng.normal_vec(batch * r * nrhs, 1.0);
        // Both ways of building the group inverses (one kernel, or pair by pair through
        // GEMMs) at the default widths, the defaults at all widths.
        let cases = [
            (64, 64, ""),
            (64, 256, ""),
            (32, 128, ""),
            (64, 512, ""),
            (128, 128, ""),
            (128, 256, ""),
            (64, 256, "pairs"),
            (64, 512, "pairs"),
            (64, 256, "cuda"),
            (64, 256, "tc3"),
            (64, 512, "tc3"),
            (64, 256, "tc"),
        ];
        for (nb, outer, variant) in cases {
            eprintln!("group inverses '{variant}' nb={nb} outer={outer}");
            let mut chol =
                BatchedCholesky::with_widths(&gpu, &k.chol, r, batch, (nb, outer), variant)
                    .unwrap();
            let buf = gpu.upload(&host, "test SPD matrices").unwrap();
            chol.factor(&gpu, &blas, buf.device_ptr(), r * r, batch, false, &|_| {
                Ok(())
            })
            .unwrap();
            assert!(!chol.failed(&gpu).unwrap());
            let l = chol.factors(&gpu, batch).unwrap();
            for (b, err) in recon_errors(&l, &host, r, batch).into_iter().enumerate() {
                eprintln!(
                    "cholesky r={r} nb={nb} outer={} batch {b}: ||LL^T - A|| / ||A|| = {err:.2e}",
                    chol.outer()
                );
                // "tc" forms the group inverses on TF32 tensor cores even in an fp32
                // factorization: TF32's tolerance.
                let tol = if variant == "tc" { 1e-2 } else { 1e-5 };
                assert!(
                    err < tol,
                    "r={r} nb={nb} outer={outer} '{variant}' b={b}: {err}"
                );
            }
            // The blocked solve: (L L^T)^-1 B for B (r, 3) per matrix, checked by multiplying
            // back (fp32, and TF32 with a looser bound).
            for tf32 in [false, true] {
                let bbuf = gpu.upload(&rhs, "rhs").unwrap();
                let ybuf = gpu.alloc_zeros::<f32>(batch * r * nrhs, "y").unwrap();
                chol.solve(
                    &blas,
                    batch,
                    blas::Operand::new(bbuf.device_ptr(), r, r * nrhs),
                    blas::Operand::new(ybuf.device_ptr(), r, r * nrhs),
                    nrhs,
                    tf32,
                )
                .unwrap();
                let x = gpu.download(&bbuf).unwrap();
                for b in 0..batch {
                    let ab = &host[b * r * r..(b + 1) * r * r];
                    let mut back = vec![0f32; r * nrhs];
                    for c in 0..nrhs {
                        for row in 0..r {
                            let mut acc = 0.0f64;
                            for t in 0..r {
                                acc += f64::from(ab[t * r + row])
                                    * f64::from(x[b * r * nrhs + c * r + t]);
                            }
                            back[c * r + row] = acc as f32;
                        }
                    }
                    let err = rel_diff(&back, &rhs[b * r * nrhs..(b + 1) * r * nrhs]);
                    eprintln!(
                        "solve r={r} nb={nb} outer={outer} tf32={tf32} batch {b}: ||A x - b|| / ||b|| = {err:.2e}"
                    );
                    let tol = if tf32 || variant == "tc" { 1e-2 } else { 1e-4 };
                    assert!(err < tol, "r={r} '{variant}' b={b}: {err}");
                }
            }
            // TF32 GEMMs inside: a factor of a nearby matrix.
            let tf = gpu.upload(&host, "tf32").unwrap();
            chol.factor(
                &gpu,
                &blas,
                tf.device_ptr(),
                r * r,
                batch,
                true,
                &|_| Ok(()),
            )
            .unwrap();
            let lt = chol.factors(&gpu, batch).unwrap();
            for (b, err) in recon_errors(&lt, &host, r, batch).into_iter().enumerate() {
                eprintln!("cholesky tf32 r={r} nb={nb} outer={outer} batch {b}: {err:.2e}");
                assert!(err < 1e-2, "tf32 r={r} b={b}: {err}");
            }
            // A matrix that is not positive definite is reported, not silently factored.
            let mut bad = host.clone();
            bad[(r / 2) * (r + 1)] = -1.0;
            let buf = gpu.upload(&bad, "indefinite").unwrap();
            chol.reset(&gpu).unwrap();
            chol.factor(&gpu, &blas, buf.device_ptr(), r * r, batch, false, &|_| {
                Ok(())
            })
            .unwrap();
            assert!(chol.failed(&gpu).unwrap());
        }
    }
}

/// `g`'s U and V^T with column / row k negated where U_k points away from `c`'s.
fn align_signs(g: &Blast, c: &Blast) -> (Vec<f32>, Vec<f32>) {
    let (m, r) = (g.m, g.rank);
    let q = g.n / g.b_in;
    let (mut u, mut vt) = (g.u.clone(), g.vt.clone());
    for k in 0..r {
        let dot: f64 = (0..m)
            .map(|row| f64::from(g.u[row * r + k]) * f64::from(c.u[row * r + k]))
            .sum();
        if dot < 0.0 {
            for row in 0..m {
                u[row * r + k] = -u[row * r + k];
            }
            for j in 0..g.b_in {
                for col in 0..q {
                    let e = j * r * q + k * q + col;
                    vt[e] = -vt[e];
                }
            }
        }
    }
    (u, vt)
}

/// The GPU truncated SVD (f64 Gram + eigensolver) against the CPU's thin SVD: the same
/// rank-t approximation (the factors may differ by the sign of a singular pair), on wide,
/// tall, full-rank-kept and over-ranked odd shapes.
#[test]
fn gpu_svd_lowrank_matches_cpu() {
    let Some(gpu) = gpu_or_skip("gpu_svd_lowrank_matches_cpu") else {
        return;
    };
    for (m, n, t) in [
        (37, 91, 5),
        (120, 45, 45),
        (64, 50, 60),
        (200, 333, 17),
        (301, 97, 96),
    ] {
        let w = Rng::new((m * 1000 + n) as u64).normal_vec(m * n, 0.5);
        let target = Target::new("svd", m, n, &w).unwrap();
        let cpu = blr_compress::lowrank(&target, t, None).unwrap();
        let got = lowrank(&gpu, &target, t).unwrap();
        let (Linear::LowRank(c), Linear::LowRank(g)) = (&cpu, &got) else {
            panic!("not low-rank");
        };
        let product = |l: &LowRank| {
            let mut out = vec![0f32; m * n];
            for i in 0..m {
                for j in 0..n {
                    let mut acc = 0.0f64;
                    for k in 0..t {
                        acc += f64::from(l.u[i * t + k]) * f64::from(l.v[k * n + j]);
                    }
                    out[i * n + j] = acc as f32;
                }
            }
            out
        };
        let dprod = rel_diff(&product(g), &product(c));
        let ec = blr_compress::relative_error(&target, &cpu, None).unwrap();
        let eg = blr_compress::relative_error(&target, &got, None).unwrap();
        // Balanced: |U_k| = |V_k| = sqrt(s_k) on both paths.
        let norms = |l: &LowRank| -> Vec<f64> {
            (0..t)
                .map(|k| {
                    (0..m)
                        .map(|i| f64::from(l.u[i * t + k]).powi(2))
                        .sum::<f64>()
                })
                .collect()
        };
        let dn = rel_diff(
            &norms(g).iter().map(|&v| v as f32).collect::<Vec<_>>(),
            &norms(c).iter().map(|&v| v as f32).collect::<Vec<_>>(),
        );
        eprintln!(
            "svd {m}x{n} t={t}: product diff {dprod:.1e}, column norms diff {dn:.1e}, error cpu {ec:.7} gpu {eg:.7}"
        );
        assert!(dprod < 1e-5, "{m}x{n} t={t}: products differ by {dprod}");
        assert!(dn < 1e-5, "{m}x{n} t={t}: balance differs by {dn}");
        assert!((eg - ec).abs() <= 1e-6 * ec.max(1e-6), "{eg} vs {ec}");
    }
    // A rank-deficient matrix: the pairs past its rank are zero, the approximation exact.
    let (m, n, t) = (40, 70, 12);
    let mut rng = Rng::new(5);
    let (x, y) = (rng.normal_vec(m * 3, 1.0), rng.normal_vec(3 * n, 1.0));
    let w: Vec<f32> = (0..m * n)
        .map(|e| (0..3).map(|k| x[(e / n) * 3 + k] * y[k * n + e % n]).sum())
        .collect();
    let target = Target::new("rank3", m, n, &w).unwrap();
    let got = lowrank(&gpu, &target, t).unwrap();
    let err = blr_compress::relative_error(&target, &got, None).unwrap();
    eprintln!("svd rank-3 40x70 t=12: error {err:.2e}");
    assert!(err < 1e-6, "{err}");
}

/// GPU and CPU from the same start, a few iterations: factors and errors agree.
#[test]
fn gpu_blast_follows_the_cpu_iteration_on_odd_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_blast_follows_the_cpu_iteration_on_odd_shapes") else {
        return;
    };
    // (m, n, b_out, b_in, r, iterations, init, restarts): p, q not multiples of anything; r
    // below and above the block sizes; every init; restarts.
    let cases = [
        (72, 120, 4, 6, 7, 8, BlastInit::Random, 1),
        (90, 84, 3, 7, 13, 8, BlastInit::Random, 1),
        (100, 60, 5, 2, 9, 10, BlastInit::LowRank, 1),
        (84, 132, 4, 6, 11, 8, BlastInit::LowRank, 1),
        (96, 120, 4, 3, 6, 20, BlastInit::Random, 3),
        (66, 150, 3, 5, 140, 6, BlastInit::Random, 1),
    ];
    for (m, n, b_out, b_in, r, iterations, init, restarts) in cases {
        let w = Rng::new((m * n) as u64).normal_vec(m * n, 0.02);
        let target = Target::new("test", m, n, &w).unwrap();
        let opts = BlastOptions {
            b_out,
            b_in,
            iterations,
            init,
            restarts,
            seed: 3,
            ..BlastOptions::new(b_out, r)
        };
        let cpu = blr_compress::blast_report(&target, &opts, None, &Silent).unwrap();
        let got = blast_report(&gpu, &target, &opts, &GpuBlastOptions::default(), &Silent).unwrap();
        let (Linear::Blast(c), Linear::Blast(g)) = (&cpu.layer, &got.layer) else {
            panic!("not BLAST");
        };
        // A truncated-SVD start may flip singular pairs against the CPU's (U_k and V_k
        // together, which leaves every product unchanged): align before comparing factors.
        let (gu, gvt) = align_signs(g, c);
        let du = rel_diff(&gu, &c.u);
        let dv = rel_diff(&gvt, &c.vt);
        let ds = rel_diff(&g.s, &c.s);
        let check = blr_compress::relative_error(&target, &got.layer, None).unwrap();
        eprintln!(
            "{m}x{n} b={b_out}x{b_in} r={r} its={iterations} {init:?} restarts={restarts}: \
             error cpu {:.6} gpu {:.6} (gpu layer on cpu {check:.6}); \
             factor diffs U {du:.1e} V {dv:.1e} S {ds:.1e}",
            cpu.rel_error, got.rel_error
        );
        assert_eq!(got.history.len(), cpu.history.len());
        for (it, (a, b)) in got.history.iter().zip(&cpu.history).enumerate() {
            assert!(
                (a - b).abs() <= 1e-3 * b.max(1e-3) + 1e-5,
                "iteration {it}: gpu {a} cpu {b}"
            );
        }
        assert!(
            (got.rel_error - check).abs() < 1e-4 * check.max(1e-3),
            "{} vs {check}",
            got.rel_error
        );
        assert!(
            (got.rel_error - cpu.rel_error).abs() < 0.01 * cpu.rel_error,
            "final error gpu {} cpu {}",
            got.rel_error,
            cpu.rel_error
        );
        assert!(
            du < 1e-2 && dv < 1e-2 && ds < 1e-2,
            "factors differ: {du} {dv} {ds}"
        );
    }
}

/// The full 300-iteration default run on a small odd shape: final errors within 1%, and TF32
/// data GEMMs within 1% too.
#[test]
fn gpu_blast_final_error_matches_cpu_at_300_iterations() {
    let Some(gpu) = gpu_or_skip("gpu_blast_final_error_matches_cpu_at_300_iterations") else {
        return;
    };
    let (m, n, b, r) = (120, 168, 4, 30);
    let w = Rng::new(9).normal_vec(m * n, 1.0);
    let target = Target::new("test", m, n, &w).unwrap();
    let opts = BlastOptions::new(b, r);
    let cpu = blr_compress::blast_report(&target, &opts, None, &Silent).unwrap();
    for precision in [
        GemmPrecision::Fp32,
        GemmPrecision::Tf32Data,
        GemmPrecision::Tf32,
    ] {
        let got = blast_report(
            &gpu,
            &target,
            &opts,
            &GpuBlastOptions { precision },
            &Silent,
        )
        .unwrap();
        eprintln!(
            "{m}x{n} b={b} r={r} 300 its {precision:?}: error cpu {:.6} gpu {:.6}",
            cpu.rel_error, got.rel_error
        );
        assert!(
            (got.rel_error - cpu.rel_error).abs() < 0.01 * cpu.rel_error,
            "{precision:?}: gpu {} cpu {}",
            got.rel_error,
            cpu.rel_error
        );
    }
}

#[test]
fn bad_options_are_errors_on_the_gpu_path_too() {
    let Some(gpu) = gpu_or_skip("bad_options_are_errors_on_the_gpu_path_too") else {
        return;
    };
    let w = vec![1.0f32; 24 * 36];
    let target = Target::new("w", 24, 36, &w).unwrap();
    let bad = BlastOptions {
        lr: -1.0,
        ..BlastOptions::new(3, 2)
    };
    let err = blast_report(&gpu, &target, &bad, &GpuBlastOptions::default(), &Silent)
        .unwrap_err()
        .to_string();
    assert!(err.contains("lr"), "{err}");
    let err = blast_report(
        &gpu,
        &target,
        &BlastOptions::new(5, 2),
        &GpuBlastOptions::default(),
        &Silent,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("divide") || err.contains("block"), "{err}");
    let gd = BlastOptions {
        method: BlastMethod::GradientDescent,
        ..BlastOptions::new(3, 2)
    };
    assert!(blast_report(&gpu, &target, &gd, &GpuBlastOptions::default(), &Silent).is_err());
}

/// Timing probe for the device machine (not a CI test): `BLR_FACT_BENCH=m,n,b,r,iterations`
/// runs GPU BLAST (fp32 and TF32) on a N(0,1) matrix and prints the wall time and the error;
/// with `BLR_FACT_BENCH_CPU=1` also the CPU path at the same settings.
#[test]
#[ignore]
fn bench_gpu_blast() {
    let Some(v) = bench_spec("bench_gpu_blast", "BLR_FACT_BENCH", "m,n,b,r,iterations") else {
        return;
    };
    let (m, n, b, r, its) = (v[0], v[1], v[2], v[3], v[4]);
    let Some(gpu) = gpu_or_skip("bench_gpu_blast") else {
        return;
    };
    let w = Rng::new(0).normal_vec(m * n, 1.0);
    let target = Target::new("bench", m, n, &w).unwrap();
    let opts = BlastOptions {
        iterations: its,
        ..BlastOptions::new(b, r)
    };
    // BLR_FACT_BENCH_PREC=fp32,tf32 limits the precisions run.
    let wanted: Option<Vec<GemmPrecision>> = std::env::var("BLR_FACT_BENCH_PREC")
        .ok()
        .map(|v| v.split(',').map(|p| p.parse().unwrap()).collect());
    for precision in [
        GemmPrecision::Fp32,
        GemmPrecision::Tf32Data,
        GemmPrecision::Tf32,
    ] {
        if wanted.as_ref().is_some_and(|w| !w.contains(&precision)) {
            continue;
        }
        let t = std::time::Instant::now();
        let rep = blast_report(
            &gpu,
            &target,
            &opts,
            &GpuBlastOptions { precision },
            &Silent,
        )
        .unwrap();
        let secs = t.elapsed().as_secs_f64();
        eprintln!(
            "BENCH gpu {precision:?} {m}x{n} b={b} r={r} its={its}: {secs:.3} s, rel_error {:.6}, history[0] {:.6} last {:.6}",
            rep.rel_error,
            rep.history[0],
            rep.history[its - 1]
        );
    }
    if std::env::var_os("BLR_FACT_BENCH_CPU").is_some() {
        let t = std::time::Instant::now();
        let rep = blr_compress::blast_report(&target, &opts, None, &Silent).unwrap();
        eprintln!(
            "BENCH cpu {m}x{n} b={b} r={r} its={its}: {:.3} s, rel_error {:.6}, history[0] {:.6} last {:.6}",
            t.elapsed().as_secs_f64(),
            rep.rel_error,
            rep.history[0],
            rep.history[its - 1]
        );
    }
}
