//! Tests of the layer forwards. Host-only tests always run; the parity test runs every format x
//! strategy on the GPU against `blr_core`'s CPU forward and is skipped (with a message) when no
//! GPU/driver is present, as on CI.

use super::monarch::{MidTranspose, MonarchOptions, Stage1Mma};
use super::*;
use blr_core::rng::Rng;

fn shape(format: FormatKind, m: usize, n: usize, b_out: usize, b_in: usize, rank: usize) -> Shape {
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
fn pack_s_places_every_entry_and_pads_with_zeros() {
    let (b_out, b_in, r) = (3, 5, 7);
    let mut rng = Rng::new(11);
    let s = rng.normal_vec(b_out * b_in * r, 1.0);
    let packed = pack_blast_s(&s, b_out, b_in, r).expect("valid shape");
    assert_eq!(packed.len(), r * 256);
    for k in 0..r {
        for i in 0..16 {
            for j in 0..16 {
                let got = packed[k * 256 + i * 16 + j];
                let want = if i < b_out && j < b_in {
                    s[(i * b_in + j) * r + k]
                } else {
                    0.0
                };
                assert_eq!(got, want, "k={k} i={i} j={j}");
            }
        }
    }
    assert!(pack_blast_s(&s, 17, 1, 1).is_err());
    assert!(pack_blast_s(&s[1..], b_out, b_in, r).is_err());
}

#[test]
fn strategy_names_round_trip_and_fused_is_explained() {
    for st in Strategy::ALL {
        let back: Strategy = st.name().parse().expect("own name parses");
        assert_eq!(back, st);
    }
    assert_eq!("fused".parse::<Strategy>().ok(), Some(Strategy::Fused));
    let lr = shape(FormatKind::LowRank, 128, 128, 1, 1, 32);
    let err = check_strategy(&lr, Strategy::Fused, 128)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(err.contains("BLAST only"), "{err}");
    assert!("nonsense".parse::<Strategy>().is_err());
}

#[test]
fn strategy_checks_name_the_failing_dimension() {
    let blast = shape(FormatKind::Blast, 4096, 4096, 16, 16, 1024);
    for st in Strategy::ALL {
        assert!(check_strategy(&blast, st, 16).is_ok(), "{st}");
    }
    let msg = check_strategy(&blast, Strategy::Decode, 17)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("at most 16 tokens"), "{msg}");
    let odd = shape(FormatKind::Blast, 64, 104, 4, 4, 16); // q = 26
    let msg = check_strategy(&odd, Strategy::Partial, 8)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("q = n/b_in = 26"), "{msg}");
    assert!(check_strategy(&odd, Strategy::Unfused, 8).is_ok());
    let wide = shape(FormatKind::Blast, 64 * 17, 64, 17, 1, 16);
    assert!(check_strategy(&wide, Strategy::Partial, 8).is_err());
    let mon = shape(FormatKind::Monarch, 128, 128, 4, 4, 32);
    assert!(check_strategy(&mon, Strategy::Partial, 128).is_ok());
    assert!(check_strategy(&mon, Strategy::Decode, 1).is_ok());
    // Monarch partial stores element by element where R/b is not a multiple of 8 or b does not
    // divide R (DiT: 384 % 9 != 0); only n/b must be a multiple of 8.
    let mon_odd = shape(FormatKind::Monarch, 120, 96, 4, 4, 40); // R/b = 10
    assert!(check_strategy(&mon_odd, Strategy::Partial, 8).is_ok());
    let mon_ragged = shape(FormatKind::Monarch, 3456, 1152, 9, 9, 384);
    assert!(check_strategy(&mon_ragged, Strategy::Partial, 8).is_ok());
    let mon_narrow = shape(FormatKind::Monarch, 120, 60, 4, 4, 40); // n/b = 15
    let msg = check_strategy(&mon_narrow, Strategy::Partial, 8)
        .map(|_| ())
        .unwrap_err()
        .to_string();
    assert!(msg.contains("n/b = 15"), "{msg}");
    let dense = shape(FormatKind::Dense, 128, 128, 1, 1, 128);
    assert!(check_strategy(&dense, Strategy::Decode, 1).is_err());
}

#[test]
fn auto_strategy_follows_format_and_applicability() {
    let blast = shape(FormatKind::Blast, 4096, 4096, 16, 16, 1024);
    assert_eq!(auto_strategy(&blast, 1), Strategy::Partial);
    assert_eq!(auto_strategy(&blast, 16), Strategy::Partial);
    assert_eq!(auto_strategy(&blast, 1024), Strategy::Partial);
    // q = 26: the tensor-core paths do not apply.
    let odd_blast = shape(FormatKind::Blast, 64, 104, 4, 4, 16);
    assert_eq!(auto_strategy(&odd_blast, 1), Strategy::Unfused);
    let mon = shape(FormatKind::Monarch, 4096, 4096, 16, 16, 1024);
    assert_eq!(auto_strategy(&mon, 1), Strategy::Unfused);
    assert_eq!(auto_strategy(&mon, 1024), Strategy::Partial);
    // Partial applies, but stores element by element: not chosen without a measurement.
    let mon_ragged = shape(FormatKind::Monarch, 3456, 1152, 9, 9, 384);
    assert_eq!(auto_strategy(&mon_ragged, 1024), Strategy::Unfused);
    let mon_narrow = shape(FormatKind::Monarch, 120, 60, 4, 4, 40);
    assert_eq!(auto_strategy(&mon_narrow, 1024), Strategy::Unfused);
    let lr = shape(FormatKind::LowRank, 4096, 4096, 1, 1, 1024);
    assert_eq!(auto_strategy(&lr, 1024), Strategy::Unfused);
    let odd = shape(FormatKind::LowRank, 100, 100, 1, 1, 10);
    assert_eq!(auto_strategy(&odd, 1), Strategy::Unfused);
}

/// Rounds every factor to bf16 so the CPU reference sees exactly the GPU's weights.
fn bf16_rounded(layer: &Linear) -> Linear {
    let shape = layer.shape();
    let factors = layer
        .factors()
        .into_iter()
        .map(|(_, _, v)| v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect())
        .collect();
    Linear::from_factors(&shape, factors).expect("same shape")
}

/// The default GPU, or `None` after printing why `test` skips (no usable GPU: CI). Shared by
/// the layer test modules.
pub(super) fn gpu_or_skip(test: &str) -> Option<Gpu> {
    match Gpu::open_default() {
        Ok(g) => Some(g),
        Err(e) => {
            eprintln!("SKIP {test}: no usable GPU here ({e})");
            None
        }
    }
}

/// Relative Frobenius error of the finite outputs and the count of non-finite ones (poisoned
/// outputs left unwritten show up as NaN). Shared by the layer test modules.
pub(super) fn rel_err(got: &[f32], want: &[f32]) -> (f64, usize) {
    let mut num = 0.0f64;
    let mut den = 0.0f64;
    let mut bad = 0;
    for (&g, &w) in got.iter().zip(want) {
        if !g.is_finite() {
            bad += 1;
            continue;
        }
        num += (f64::from(g) - f64::from(w)).powi(2);
        den += f64::from(w).powi(2);
    }
    ((num / den.max(1e-30)).sqrt(), bad)
}

#[test]
fn gpu_parity_every_format_and_strategy_on_odd_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_parity_every_format_and_strategy_on_odd_shapes") else {
        return;
    };
    let kernels = LayerKernels::load(&gpu).expect("layer kernels compile and load");
    // T, p, q, r deliberately not multiples of any tile (only of 8 where 16-byte rows need it).
    let shapes = [
        shape(FormatKind::Dense, 120, 104, 1, 1, 104),
        shape(FormatKind::LowRank, 136, 104, 1, 1, 24),
        shape(FormatKind::Monarch, 120, 96, 4, 4, 40),
        // partial applies: n/b = 40, m/b = 34, R/b = 24; and b = 3, m/b = 40, R/b = 8.
        shape(FormatKind::Monarch, 136, 160, 4, 4, 96),
        shape(FormatKind::Monarch, 120, 72, 3, 3, 24),
        shape(FormatKind::Blast, 120, 112, 5, 7, 40),
        shape(FormatKind::Blast, 96, 96, 12, 12, 8),
        // q = 104/4 = 26: only the unfused path applies.
        shape(FormatKind::Blast, 64, 104, 4, 4, 16),
    ];
    let mut rng = Rng::new(0xB1A5);
    let mut checked = 0;
    for (si, sh) in shapes.iter().enumerate() {
        let layer = bf16_rounded(&Linear::random(sh, 100 + si as u64).expect("valid shape"));
        let dev = GpuLinear::upload(&gpu, &layer).expect("upload");
        let max_t = 77;
        let mut ws = dev.workspace(&gpu, max_t).expect("workspace");
        for &t in &[1usize, 5, 13, 16, 77] {
            let x: Vec<f32> = rng
                .normal_vec(t * sh.n, 1.0)
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect();
            let want = layer.forward(&x, t).expect("cpu forward");
            let xd = gpu.upload_bf16(&x, "x").expect("upload x");
            let mut yd = gpu.alloc::<bf16>(t * sh.m, "y").expect("alloc y");
            for st in Strategy::ALL {
                if check_strategy(sh, st, t).is_err() {
                    assert!(dev
                        .forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, st)
                        .is_err());
                    continue;
                }
                gpu.memset_bytes(&mut yd, 0xFF).expect("poison");
                dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, st)
                    .unwrap_or_else(|e| panic!("{} {st} T={t}: {e}", sh.format));
                let got = gpu.download_f32(&yd).expect("download");
                let (err, bad) = rel_err(&got, &want);
                assert_eq!(
                    bad, 0,
                    "{:?} {st} T={t}: {bad} outputs unwritten or NaN",
                    sh
                );
                assert!(err < 1.5e-2, "{:?} {st} T={t}: rel err {err:.3e}", sh);
                checked += 1;
                if st == Strategy::Partial && t > 24 {
                    // Token chunks of the first two passes (the last one ragged: 77 = 3*24 + 5).
                    ws.set_prefill_chunk(Some(24));
                    gpu.memset_bytes(&mut yd, 0xFF).expect("poison");
                    let run = dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, st);
                    ws.set_prefill_chunk(None);
                    run.unwrap_or_else(|e| panic!("{} {st} T={t} chunked: {e}", sh.format));
                    let got = gpu.download_f32(&yd).expect("download");
                    let (err, bad) = rel_err(&got, &want);
                    assert_eq!(bad, 0, "{:?} {st} T={t} chunked: {bad} unwritten", sh);
                    assert!(
                        err < 1.5e-2,
                        "{:?} {st} T={t} chunked: rel err {err:.3e}",
                        sh
                    );
                    checked += 1;
                }
            }
        }
    }
    eprintln!("gpu parity: {checked} (shape, strategy, T) cases within bf16 error");
    assert!(checked >= 40, "only {checked} cases ran");
}

#[test]
fn monarch_own_stage1_rule() {
    let d = MonarchOptions::default();
    // wgmma (sm_90a): blr's stage 1 at every n/b; elsewhere mma.sync up to n/b = 256.
    assert!(d.own_stage1(688, true));
    assert!(!d.own_stage1(688, false));
    assert!(d.own_stage1(256, false));
    let mma = MonarchOptions {
        stage1: Stage1Mma::MmaSync,
        ..d
    };
    assert!(!mma.own_stage1(688, true));
    assert!(mma.own_stage1(256, true));
    let pinned = MonarchOptions {
        own_max_nb: Some(100),
        ..d
    };
    assert!(!pinned.own_stage1(128, true));
    assert!(pinned.own_stage1(96, false));
}

/// The copy-engine views of Monarch stage 1 on TMA: the box heights of the seg-mode w1 gather,
/// and the buffers TMA cannot load (the launcher then runs the cp.async wgmma kernel).
#[test]
fn monarch_stage1_tma_views() {
    use super::monarch::stage1_tma_views;
    use crate::tensor_map::check_tiled_bf16;
    let (x, w) = (0x7f00_0000_0000u64, 0x7f10_0000_0000u64);
    // llama7b q/k/v/o: rb = 64 -> two 64-row boxes per 128-column tile.
    let qkvo = shape(FormatKind::Monarch, 4096, 4096, 16, 16, 1024);
    let (xv, wv, rbm, g) = stage1_tma_views(&qkvo, 1000, x, w).expect("TMA applies");
    assert_eq!((rbm, g), (64, 64));
    assert_eq!(xv.dims, vec![256, 16, 1000]);
    assert_eq!(xv.strides, vec![512, 8192]);
    assert_eq!(wv.dims, vec![256, 16, 64, 16]);
    assert_eq!(wv.strides, vec![512, 8192, 1024 * 512]);
    assert_eq!(wv.boxes, vec![64, 1, 64, 1]);
    assert_eq!(check_tiled_bf16(&xv), None);
    assert_eq!(check_tiled_bf16(&wv), None);
    // llama7b gate/up: rb = 96 -> 32-row boxes (a run boundary falls inside a tile).
    let gate = shape(FormatKind::Monarch, 11008, 4096, 16, 16, 1536);
    assert_eq!(stage1_tma_views(&gate, 7, x, w).map(|v| v.3), Ok(32));
    // rb = 10 (element stores): one plain 128-row box, rbm = R.
    let odd = shape(FormatKind::Monarch, 120, 96, 4, 4, 40);
    let (_, wv, rbm, g) = stage1_tma_views(&odd, 5, x, w).expect("TMA applies");
    assert_eq!((rbm, g), (40, 128));
    assert_eq!(wv.dims, vec![24, 1, 40, 4]);
    // A buffer that is not 16-byte aligned: the views are built, the check refuses them.
    let (xv, _, _, _) = stage1_tma_views(&qkvo, 3, x + 8, w).expect("views");
    assert!(check_tiled_bf16(&xv).is_some_and(|why| why.contains("aligned")));
    // n/b not a multiple of 8: no partial at all, so no TMA either.
    let narrow = shape(FormatKind::Monarch, 120, 60, 4, 4, 40);
    assert!(stage1_tma_views(&narrow, 5, x, w).is_err());
    // blr's rule: TMA only for 64-row boxes and n/b <= 256 (llama7b q/k/v/o), else cp.async.
    let auto = Stage1Mma::Auto;
    assert_eq!(auto.resolve(&qkvo), Stage1Mma::Tma);
    assert_eq!(auto.resolve(&gate), Stage1Mma::Wgmma);
    let down = shape(FormatKind::Monarch, 4096, 11008, 16, 16, 1536);
    assert_eq!(auto.resolve(&down), Stage1Mma::Wgmma);
    let small_gate = shape(FormatKind::Monarch, 8192, 2048, 16, 16, 512);
    assert_eq!(auto.resolve(&small_gate), Stage1Mma::Wgmma);
    assert_eq!(auto.resolve(&odd), Stage1Mma::Wgmma);
    assert_eq!(auto.resolve(&narrow), Stage1Mma::Wgmma);
    assert_eq!(Stage1Mma::MmaSync.resolve(&qkvo), Stage1Mma::MmaSync);
    assert_eq!(MonarchOptions::default().stage1, Stage1Mma::Auto);
}

/// Monarch `partial` (monarch.rs) on shapes that exercise every path of its stage-1 kernel:
/// 16-byte run stores (R/b a multiple of 8) and element stores (R/b odd-sized, b not dividing
/// R), ragged token, rank and K tiles (T not a multiple of 128, R of 128, n/b of 64), several
/// column tiles, b from 2 to 16, m not a multiple of 8 (per-element output permutation), and
/// n/b > 256 (cuBLASLt stage 1 + each of the three intermediate transposes; odd b, odd R,
/// b*R not a multiple of 8, b = 16), each stage-1 MMA (mma.sync; wgmma with cp.async loads and
/// with TMA loads on sm_90a), also beyond n/b = 256.
/// Outputs and the intermediate P are NaN-poisoned before every run.
#[test]
fn gpu_monarch_partial_parity_on_odd_shapes() {
    let Some(gpu) = gpu_or_skip("gpu_monarch_partial_parity_on_odd_shapes") else {
        return;
    };
    let mut kernels = LayerKernels::load(&gpu).expect("layer kernels compile and load");
    let shapes = [
        // (m, n, b, R): runs of rb = 24, n/b = 40 (K ragged in one 64-wide tile)
        (136, 160, 4, 96),
        // rb = 8, b = 3
        (120, 72, 3, 24),
        // rb = 10: element stores
        (120, 96, 4, 40),
        // rb = 5, b = 9, m/b = 24
        (216, 144, 9, 45),
        // R % b != 0 (100 = 12*8 + 4): element stores with the general index map
        (200, 128, 8, 100),
        // rb = 50, R = 300: three column tiles, the last ragged
        (264, 288, 6, 300),
        // rb = 136, b = 2, n/b = 128 (two K tiles), R = 272: ragged third column tile
        (272, 256, 2, 272),
        // b = 16, rb = 16
        (512, 512, 16, 256),
        // m = 132 (m/b = 33, m % 8 != 0): the output permutation falls back to per element
        (132, 96, 4, 32),
        // rb = 64, n/b = 128: blr's rule picks the TMA kernel for the default choices
        (200, 256, 2, 128),
        // n/b = 272 > 256: cuBLASLt stage 1 + per-token transpose of the intermediate
        (136, 1088, 4, 96),
        // n/b = 264, R % b != 0 (b*R = 152)
        (120, 1056, 4, 38),
        // n/b = 264, b = 5 (odd: mid transpose rows of b + 2), R = 39 (odd: element stores),
        // b*R = 195 (not a multiple of 8: element loads)
        (105, 1320, 5, 39),
        // n/b = 264, b = 16 as in llama7b down, R = 48 (packed transpose: two row groups)
        (144, 4224, 16, 48),
        // n/b = 264, b = 8 (packed transpose: one row group), R = 40, m/b = 8
        (64, 2112, 8, 40),
    ];
    let mut rng = Rng::new(0x304A);
    let mut checked = 0;
    let mut expected = 0;
    for (si, &(m, n, b, rank)) in shapes.iter().enumerate() {
        let sh = shape(FormatKind::Monarch, m, n, b, b, rank);
        assert!(
            check_strategy(&sh, Strategy::Partial, 1).is_ok(),
            "{sh:?} should run partial"
        );
        let layer = bf16_rounded(&Linear::random(&sh, 700 + si as u64).expect("valid shape"));
        let dev = GpuLinear::upload(&gpu, &layer).expect("upload");
        let mut ws = dev.workspace(&gpu, 300).expect("workspace");
        // Every kernel choice that can run this shape: stage 1 on mma.sync and (sm_90a) wgmma;
        // where n/b > 256 also the three intermediate transposes after cuBLASLt's stage 1.
        let base = MonarchOptions::default();
        let mut runs = vec![
            ("partial (default choices)", Strategy::Partial, base),
            (
                "partial mma",
                Strategy::Partial,
                MonarchOptions {
                    stage1: Stage1Mma::MmaSync,
                    own_max_nb: Some(usize::MAX),
                    ..base
                },
            ),
            ("unfused", Strategy::Unfused, base),
        ];
        if kernels.monarch_wgmma_available() {
            let wg = MonarchOptions {
                stage1: Stage1Mma::Wgmma,
                own_max_nb: Some(usize::MAX),
                ..base
            };
            runs.push(("partial wgmma", Strategy::Partial, wg));
            let tma = MonarchOptions {
                stage1: Stage1Mma::Tma,
                ..wg
            };
            runs.push(("partial tma", Strategy::Partial, tma));
        }
        if n / b > 256 {
            for (label, mid) in [
                ("partial cuBLASLt + generic", MidTranspose::Generic),
                ("partial cuBLASLt + pairs", MidTranspose::Pairs),
                ("partial cuBLASLt + packed", MidTranspose::Packed),
            ] {
                let cublas_stage1 = MonarchOptions {
                    mid,
                    own_max_nb: Some(256),
                    ..base
                };
                runs.push((label, Strategy::Partial, cublas_stage1));
            }
        }
        for &t in &[1usize, 5, 13, 77, 300] {
            let x: Vec<f32> = rng
                .normal_vec(t * n, 1.0)
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect();
            let want = layer.forward(&x, t).expect("cpu forward");
            let xd = gpu.upload_bf16(&x, "x").expect("upload x");
            let mut yd = gpu.alloc::<bf16>(t * m, "y").expect("alloc y");
            for (label, st, opts) in &runs {
                kernels.set_monarch_options(*opts);
                gpu.memset_bytes(&mut yd, 0xFF).expect("poison");
                gpu.memset_bytes(&mut ws.b, 0xFF).expect("poison P");
                dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, *st)
                    .unwrap_or_else(|e| panic!("{sh:?} {label} T={t}: {e}"));
                if opts.stage1.uses_tma() {
                    // The TMA kernel itself ran (no silent fallback on these aligned buffers).
                    assert_eq!(
                        ws.monarch_tma_status(),
                        Some(Ok(())),
                        "{sh:?} {label} T={t}"
                    );
                }
                let got = gpu.download_f32(&yd).expect("download");
                let (err, bad) = rel_err(&got, &want);
                assert_eq!(
                    bad, 0,
                    "{sh:?} {label} T={t}: {bad} outputs unwritten or NaN"
                );
                assert!(err < 1.5e-2, "{sh:?} {label} T={t}: rel err {err:.3e}");
                checked += 1;
            }
            expected += runs.len();
        }
    }
    eprintln!("gpu monarch partial parity: {checked} (shape, strategy, T) cases within bf16 error");
    kernels.set_monarch_options(MonarchOptions::default());
    assert_eq!(checked, expected);
    assert!(checked >= shapes.len() * 5 * 2);
}

/// BLAST `partial` with stage 1 + mixing in one kernel (blast_s12.cu) against the CPU and the
/// split path, W poisoned with NaN before each run so an unwritten W element reaches y.
#[test]
fn gpu_blast_stage12_fused_parity_on_odd_shapes() {
    use super::blast_s12::Stage12;
    let Some(gpu) = gpu_or_skip("gpu_blast_stage12_fused_parity_on_odd_shapes") else {
        return;
    };
    let mut kernels = LayerKernels::load(&gpu).expect("layer kernels compile and load");
    if !kernels.stage12().1 {
        eprintln!("SKIP gpu_blast_stage12_fused_parity_on_odd_shapes: no sm_90a kernel here");
        return;
    }
    // q, r, p, T not multiples of the 64-wide tiles; b_in odd and != b_out; q > 256 (5 K
    // stages); b = 16 on both sides; one block per side.
    let shapes = [
        shape(FormatKind::Blast, 120, 112, 5, 7, 40),
        shape(FormatKind::Blast, 96, 96, 12, 12, 8),
        shape(FormatKind::Blast, 160, 216, 4, 3, 72),
        shape(FormatKind::Blast, 144, 1056, 2, 4, 136),
        shape(FormatKind::Blast, 1024, 1024, 16, 16, 200),
        shape(FormatKind::Blast, 48, 40, 1, 1, 24),
        shape(FormatKind::Blast, 256, 640, 16, 5, 64),
    ];
    // BLR_S12_TEST_SMALL=1 (for the sanitizers): the shapes up to 256 x 640 and T <= 77.
    // BLR_S12_ABLATE set (racecheck without the wgmmas, which racecheck cannot follow): the
    // cases run but their results are not checked.
    let ablated = std::env::var("BLR_S12_ABLATE").is_ok_and(|v| !matches!(v.trim(), "" | "0"));
    let small = std::env::var("BLR_S12_TEST_SMALL").is_ok_and(|v| v == "1");
    let tokens: &[usize] = if small {
        &[1, 5, 13, 77]
    } else {
        &[1, 5, 13, 77, 300]
    };
    let mut rng = Rng::new(0x512);
    let mut checked = 0;
    let mut expected = 0;
    for (si, sh) in shapes.iter().enumerate() {
        if small && sh.m * sh.n > 256 * 640 {
            continue;
        }
        expected += tokens.len() * 3;
        let layer = bf16_rounded(&Linear::random(sh, 500 + si as u64).expect("valid shape"));
        let dev = GpuLinear::upload(&gpu, &layer).expect("upload");
        let max_t = 300;
        let mut ws = dev.workspace(&gpu, max_t).expect("workspace");
        for &t in tokens {
            let x: Vec<f32> = rng
                .normal_vec(t * sh.n, 1.0)
                .into_iter()
                .map(|v| bf16::from_f32(v).to_f32())
                .collect();
            let want = layer.forward(&x, t).expect("cpu forward");
            let xd = gpu.upload_bf16(&x, "x").expect("upload x");
            let mut yd = gpu.alloc::<bf16>(t * sh.m, "y").expect("alloc y");
            for choice in [Stage12::Fused, Stage12::Split] {
                kernels.set_stage12(choice);
                gpu.memset_bytes(&mut yd, 0xFF).expect("poison y");
                gpu.memset_bytes(&mut ws.b, 0xFF).expect("poison W");
                dev.forward(&gpu, &kernels, &xd, t, &mut yd, &mut ws, Strategy::Partial)
                    .unwrap_or_else(|e| panic!("{sh:?} {choice:?} T={t}: {e}"));
                let got = gpu.download_f32(&yd).expect("download");
                let (err, bad) = rel_err(&got, &want);
                if ablated {
                    // Parts of the kernel skipped on purpose (racecheck of the rest): run only.
                    checked += 1;
                    continue;
                }
                assert_eq!(
                    bad, 0,
                    "{sh:?} {choice:?} T={t}: {bad} outputs unwritten or NaN"
                );
                assert!(err < 1.5e-2, "{sh:?} {choice:?} T={t}: rel err {err:.3e}");
                if si == 0 || t == 300 {
                    eprintln!("stage12 {choice:?} {sh:?} T={t}: rel err {err:.2e}");
                }
                checked += 1;
            }
        }
    }
    kernels.set_stage12(Stage12::Auto);
    eprintln!("gpu blast stage12 parity: {checked} (shape, choice, T) cases within bf16 error");
    assert_eq!(checked, expected);
    assert!(checked >= 40, "only {checked} cases ran");
}
