//! GPU BLAST against the CPU path (`blr_compress::blast_report`) on odd shapes, and the batched
//! Cholesky against its definition. The GPU tests print SKIP and pass where no usable GPU is
//! (CI); the host-only ones always run.

use super::*;
use blr_compress::{BlastInit, BlastOptions, Silent};
use blr_core::rng::Rng;

fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match open_gpu() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIP {test}: no usable GPU here ({e})");
            None
        }
    }
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
    assert!(unsupported(&opts, true).unwrap().contains("calibrated"));
    let gd = BlastOptions {
        method: BlastMethod::GradientDescent,
        ..opts
    };
    assert!(unsupported(&gd, false).unwrap().contains("gradient"));
}

#[test]
fn batched_cholesky_reconstructs_spd_matrices() {
    let Some(gpu) = gpu_or_skip("batched_cholesky_reconstructs_spd_matrices") else {
        return;
    };
    let k = Kernels::load(&gpu).unwrap();
    let blas = Cublas::new(&gpu).unwrap();
    // r below, at and across the panel width (two panels + an odd tail), odd batch sizes.
    for (r, batch) in [(37, 3), (128, 2), (301, 5)] {
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
        let mut buf = gpu.upload(&host, "test SPD matrices").unwrap();
        let mut chol = BatchedCholesky::new(&gpu, &k.chol_diag, &k.copy_block, r, batch).unwrap();
        chol.factor(&gpu, &blas, buf.device_ptr(), r * r, batch, false, &|_| {
            Ok(())
        })
        .unwrap();
        assert!(!chol.failed(&gpu).unwrap());
        let l = gpu.download(&buf).unwrap();
        buf = gpu.upload(&l, "reuse").unwrap();
        drop(buf);
        for b in 0..batch {
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
            let err = rel_diff(&recon, ab);
            eprintln!("cholesky r={r} batch {b}: ||LL^T - A|| / ||A|| = {err:.2e}");
            assert!(err < 1e-5, "r={r} b={b}: {err}");
        }
        // The blocked solve: (L L^T)^-1 B for B (r, 3) per matrix, checked by multiplying back.
        let nrhs = 3;
        let rhs = rng.normal_vec(batch * r * nrhs, 1.0);
        let lbuf = gpu.upload(&l, "factors").unwrap();
        let mut bbuf = gpu.upload(&rhs, "rhs").unwrap();
        let ybuf = gpu.alloc_zeros::<f32>(batch * r * nrhs, "y").unwrap();
        chol.factor(&gpu, &blas, lbuf.device_ptr(), r * r, batch, false, &|_| {
            Ok(())
        })
        .unwrap_or(());
        let _ = &mut bbuf;
        drop(lbuf);
        let mut fresh = gpu.upload(&host, "refactor").unwrap();
        chol.factor(
            &gpu,
            &blas,
            fresh.device_ptr(),
            r * r,
            batch,
            false,
            &|_| Ok(()),
        )
        .unwrap();
        chol.solve(
            &blas,
            fresh.device_ptr(),
            r * r,
            batch,
            blas::Operand::new(bbuf.device_ptr(), r, r * nrhs),
            blas::Operand::new(ybuf.device_ptr(), r, r * nrhs),
            nrhs,
        )
        .unwrap();
        let x = gpu.download(&bbuf).unwrap();
        let _ = &mut fresh;
        for b in 0..batch {
            let ab = &host[b * r * r..(b + 1) * r * r];
            let mut back = vec![0f32; r * nrhs];
            for c in 0..nrhs {
                for row in 0..r {
                    let mut acc = 0.0f64;
                    for t in 0..r {
                        acc += f64::from(ab[t * r + row]) * f64::from(x[b * r * nrhs + c * r + t]);
                    }
                    back[c * r + row] = acc as f32;
                }
            }
            let err = rel_diff(&back, &rhs[b * r * nrhs..(b + 1) * r * nrhs]);
            eprintln!("solve r={r} batch {b}: ||A x - b|| / ||b|| = {err:.2e}");
            assert!(err < 1e-4, "r={r} b={b}: {err}");
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
        let lt = gpu.download(&tf).unwrap();
        for b in 0..batch {
            let lb = &lt[b * r * r..(b + 1) * r * r];
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
            let err = rel_diff(&recon, ab);
            eprintln!("cholesky tf32 r={r} batch {b}: ||LL^T - A|| / ||A|| = {err:.2e}");
            assert!(err < 1e-2, "tf32 r={r} b={b}: {err}");
        }
        // A matrix that is not positive definite is reported, not silently factored.
        let mut bad = host.clone();
        bad[0] = -1.0;
        let buf = gpu.upload(&bad, "indefinite").unwrap();
        chol.reset(&gpu).unwrap();
        chol.factor(&gpu, &blas, buf.device_ptr(), r * r, batch, false, &|_| {
            Ok(())
        })
        .unwrap();
        assert!(chol.failed(&gpu).unwrap());
    }
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
        let du = rel_diff(&g.u, &c.u);
        let dv = rel_diff(&g.vt, &c.vt);
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
    let Ok(spec) = std::env::var("BLR_FACT_BENCH") else {
        eprintln!("SKIP bench_gpu_blast: set BLR_FACT_BENCH=m,n,b,r,iterations");
        return;
    };
    let v: Vec<usize> = spec.split(',').map(|x| x.trim().parse().unwrap()).collect();
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
