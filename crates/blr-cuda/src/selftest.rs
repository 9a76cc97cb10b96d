//! GPU self-tests, run by `blr doctor --self-test` on a machine with a GPU (CI has none, and
//! `cargo test` cannot run on the GPU machine, which has no Rust; so the checks live in the
//! binary). Each check draws fresh random inputs from `seed`, poisons outputs with NaN before
//! the run, and compares with a CPU reference in f64 by `||out - ref|| / ||ref||`.
//!
//! Thresholds: bf16 output rounding alone is ~2^-9 relative per element, ~1.6e-3 in norm, so
//! bf16 outputs must be under 8e-3; f32 outputs of bf16 inputs (the reference uses the same
//! bf16-rounded inputs) only see fp32 accumulation order, so under 1e-4. NaN never passes.

use half::bf16;

use crate::error::{Error, Result};
use crate::gemm::{gemm_reference, GemmShape, WeightLayout};
use crate::gpu::Gpu;
use crate::memory::Bytes;
use crate::util::{uniform_vec, UtilKernels};

/// One check's outcome.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Check {
    pub name: String,
    pub passed: bool,
    /// Measured error or the failure, in words.
    pub detail: String,
}

/// `||a - b|| / ||b||`, or infinity if any value is NaN/inf.
pub fn rel_error(out: &[f32], reference: &[f32]) -> f64 {
    if out.len() != reference.len() || out.iter().any(|v| !v.is_finite()) {
        return f64::INFINITY;
    }
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (&o, &r) in out.iter().zip(reference) {
        num += (f64::from(o) - f64::from(r)).powi(2);
        den += f64::from(r).powi(2);
    }
    (num / den.max(f64::MIN_POSITIVE)).sqrt()
}

fn round_bf16(v: &[f32]) -> Vec<f32> {
    v.iter().map(|&x| bf16::from_f32(x).to_f32()).collect()
}

/// Runs every check; a check that errors is reported as failed with the error, never aborts
/// the rest.
pub fn run_all(gpu: &Gpu, seed: u64) -> Vec<Check> {
    let mut checks = Vec::new();
    // BLR_SELFTEST_ONLY=TEXT runs only the checks whose name contains TEXT: for attributing a
    // compute-sanitizer report to one check (docs/reliability.md).
    let only = std::env::var("BLR_SELFTEST_ONLY").ok();
    let want = |name: &str| only.as_deref().is_none_or(|f| name.contains(f));
    let mut record = |name: &str, outcome: &dyn Fn() -> Result<String>| {
        if !want(name) {
            return;
        }
        checks.push(match outcome() {
            Ok(detail) => Check {
                name: name.into(),
                passed: true,
                detail,
            },
            Err(e) => Check {
                name: name.into(),
                passed: false,
                detail: e.to_string(),
            },
        });
    };
    record("upload/download round trip", &|| roundtrip(gpu, seed));
    record("NVRTC kernel: random fill matches host", &|| {
        fill_matches_host(gpu, seed)
    });
    for (i, (label, shape)) in gemm_cases().into_iter().enumerate() {
        let s = seed.wrapping_add(100 + i as u64);
        // Every other case starts its operands at odd element offsets (2-byte alignment).
        let offsets = if i % 2 == 1 { (3, 1, 5) } else { (0, 0, 0) };
        let label = if i % 2 == 1 {
            format!("{label}, odd offsets")
        } else {
            label
        };
        record(&format!("cuBLASLt GEMM {label} (bf16 out)"), &|| {
            gemm_case::<bf16>(gpu, &shape, offsets, s, 1.0, 0.0)
        });
    }
    record(
        "cuBLASLt GEMM f32 out, alpha=0.5 beta=1 (accumulate)",
        &|| {
            gemm_case::<f32>(
                gpu,
                &GemmShape::linear(19, 77, 301),
                (0, 0, 0),
                seed ^ 0xacc,
                0.5,
                1.0,
            )
        },
    );
    record(
        "cuBLASLt tuned plan (fastest of the heuristic's algorithms)",
        &|| tuned_gemm(gpu, seed),
    );
    record("CUDA graph capture + replay", &|| graph_replay(gpu, seed));
    record(
        "cooperative launch: grid-wide barrier over all SMs",
        &|| cooperative(gpu),
    );
    record("memory cap gives a clear error", &|| memory_cap(gpu));
    record("launch config checked before launch", &|| {
        bad_launch_rejected(gpu)
    });
    checks
}

/// Odd shapes, batches, both weight layouts, and BLAST-style column blocks read in place.
pub fn gemm_cases() -> Vec<(String, GemmShape)> {
    let mut v = vec![
        (
            "T=1 m=97 n=131 (decode)".to_string(),
            GemmShape::linear(1, 97, 131),
        ),
        (
            "T=37 m=203 n=515".to_string(),
            GemmShape::linear(37, 203, 515),
        ),
        (
            "T=129 m=64 n=1000".to_string(),
            GemmShape::linear(129, 64, 1000),
        ),
        (
            "X W, W (n,m): T=33 m=45 n=71".to_string(),
            GemmShape::matmul(33, 45, 71),
        ),
        (
            "batched 3x T=17 m=45 n=33".to_string(),
            GemmShape::linear(17, 45, 33).batched(3, 17 * 33, 45 * 33, 17 * 45),
        ),
        (
            "batched 5x shared W T=9 m=31 n=40".to_string(),
            GemmShape::linear(9, 31, 40).batched(5, 9 * 40, 0, 9 * 31),
        ),
    ];
    // BLAST stage 1: Z_j (T, r) = X_j (T, q) V_j^T for j in 0..b, X_j = X[:, j*q..(j+1)*q]
    // read in place (ld_x = n = b*q, stride_x = q); V stored (b, r, q).
    let (t, b, q, r) = (23, 6, 40, 24);
    let mut blast = GemmShape::linear(t, r, q).batched(b, q, r * q, t * r);
    blast.ld_x = b * q;
    v.push((
        format!("BLAST stage 1 column blocks b={b} q={q} r={r} T={t}"),
        blast,
    ));
    v
}

fn roundtrip(gpu: &Gpu, seed: u64) -> Result<String> {
    let host = uniform_vec(seed, 1237, 3.0);
    let f = gpu.upload(&host, "self-test f32")?;
    let back = gpu.download(&f)?;
    let b = gpu.upload_bf16(&host, "self-test bf16")?;
    let back_b = gpu.download_f32(&b)?;
    if back != host {
        return Err(Error::Mismatch("f32 round trip changed values".into()));
    }
    if back_b != round_bf16(&host) {
        return Err(Error::Mismatch(
            "bf16 round trip differs from host bf16 rounding".into(),
        ));
    }
    Ok(format!("{} f32 and bf16 elements exact", host.len()))
}

fn fill_matches_host(gpu: &Gpu, seed: u64) -> Result<String> {
    let util = UtilKernels::load(gpu)?;
    let n = 100_003;
    let mut buf = gpu.alloc::<f32>(n, "self-test fill")?;
    gpu.memset_bytes(&mut buf, 0xFF)?;
    util.fill_uniform_f32(gpu, &mut buf, seed, 0.75)?;
    let got = gpu.download(&buf)?;
    let want = uniform_vec(seed, n, 0.75);
    let mismatches = got
        .iter()
        .zip(&want)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    if mismatches > 0 {
        return Err(Error::Mismatch(format!(
            "{mismatches} of {n} values differ from the host mirror"
        )));
    }
    let mut bb = gpu.alloc::<bf16>(n, "self-test fill bf16")?;
    gpu.memset_bytes(&mut bb, 0xFF)?;
    util.fill_uniform_bf16(gpu, &mut bb, seed, 0.75)?;
    if gpu.download_f32(&bb)? != round_bf16(&want) {
        return Err(Error::Mismatch(
            "bf16 fill differs from the host mirror".into(),
        ));
    }
    Ok(format!("{n} f32 + bf16 values bit-identical"))
}

fn gemm_case<O: crate::gemm::GemmOutput + ToF32>(
    gpu: &Gpu,
    s: &GemmShape,
    (ox, ow, oy): (usize, usize, usize),
    seed: u64,
    alpha: f32,
    beta: f32,
) -> Result<String> {
    let (w_rows, w_cols) = match s.w_layout {
        WeightLayout::OutIn => (s.cols, s.inner),
        WeightLayout::InOut => (s.inner, s.cols),
    };
    let len = |stride: usize, rows: usize, ld: usize, width: usize| {
        (s.batch - 1) * stride + (rows - 1) * ld + width
    };
    let x_host = round_bf16(&uniform_vec(
        seed,
        ox + len(s.stride_x, s.rows, s.ld_x, s.inner),
        1.0,
    ));
    let w_host = round_bf16(&uniform_vec(
        seed ^ 0x57,
        ow + len(s.stride_w, w_rows, s.ld_w, w_cols),
        1.0,
    ));
    let y_len = oy + len(s.stride_y, s.rows, s.ld_y, s.cols);
    let y_init = uniform_vec(seed ^ 0x99, y_len, 1.0);

    let x = gpu.upload_bf16(&x_host, "self-test X")?;
    let w = gpu.upload_bf16(&w_host, "self-test W")?;
    let mut y = gpu.alloc::<O>(y_len, "self-test Y")?;
    let y_init_o: Vec<O> = y_init.iter().map(|&v| O::from_f32(v)).collect();
    if beta == 0.0 {
        gpu.memset_bytes(&mut y, 0xFF)?; // NaN poison: beta = 0 must not read Y
    } else {
        gpu.copy_to_device(&y_init_o, &mut y)?;
    }
    gpu.blas()?
        .gemm(gpu, s, x.at(ox), w.at(ow), y.at_mut(oy), alpha, beta)?;
    let got: Vec<f32> = gpu.download(&y)?.into_iter().map(ToF32::to_f32).collect();

    let mut want: Vec<f32> = y_init_o.iter().map(|v| v.to_f32()).collect();
    gemm_reference(
        s,
        &x_host[ox..],
        &w_host[ow..],
        &mut want[oy..],
        alpha,
        beta,
    )?;
    // Compare only the elements the GEMM owns (rows x cols of each batch).
    let (mut g, mut r) = (Vec::new(), Vec::new());
    for b in 0..s.batch {
        for row in 0..s.rows {
            let start = oy + b * s.stride_y + row * s.ld_y;
            g.extend_from_slice(&got[start..start + s.cols]);
            r.extend_from_slice(&want[start..start + s.cols]);
        }
    }
    let err = rel_error(&g, &r);
    let limit = if std::mem::size_of::<O>() == 2 {
        8e-3
    } else {
        1e-4
    };
    if err <= limit {
        Ok(format!("rel err {err:.2e} (limit {limit:.0e})"))
    } else {
        Err(Error::Mismatch(format!(
            "rel err {err:.3e} over the limit {limit:.0e}"
        )))
    }
}

/// Tunes a GEMM (pins the fastest candidate algorithm), then checks that the pinned plan still
/// computes the right product on fresh inputs.
fn tuned_gemm(gpu: &Gpu, seed: u64) -> Result<String> {
    let shape = GemmShape::linear(64, 96, 200);
    let x_host = round_bf16(&uniform_vec(seed ^ 0x70, 64 * 200, 1.0));
    let w_host = round_bf16(&uniform_vec(seed ^ 0x71, 96 * 200, 1.0));
    let x = gpu.upload_bf16(&x_host, "tune X")?;
    let w = gpu.upload_bf16(&w_host, "tune W")?;
    let mut y = gpu.alloc::<bf16>(64 * 96, "tune Y")?;
    let report = gpu.blas()?.tune(gpu, &shape, &x, &w, &mut y, 5)?;
    gpu.memset_bytes(&mut y, 0xFF)?;
    gpu.gemm(&shape, &x, &w, &mut y)?;
    let got = gpu.download_f32(&y)?;
    let mut want = vec![0.0f32; 64 * 96];
    gemm_reference(&shape, &x_host, &w_host, &mut want, 1.0, 0.0)?;
    let err = rel_error(&got, &want);
    if err > 8e-3 {
        return Err(Error::Mismatch(format!(
            "after tuning (picked candidate {}), rel err {err:.3e}",
            report.best_index
        )));
    }
    Ok(format!(
        "{} candidates ran; picked #{} {:.4} ms vs heuristic #0 {:.4} ms; rel err {err:.2e}",
        report.candidates.len(),
        report.best_index,
        report.best_ms,
        report.heuristic_ms
    ))
}

/// Conversion for comparing GEMM outputs.
pub trait ToF32: Copy {
    fn to_f32(self) -> f32;
    fn from_f32(v: f32) -> Self;
}

impl ToF32 for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl ToF32 for bf16 {
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}

/// Captures `Y = X W^T; acc += Y` once, then replays it with new X contents each time: the
/// graph must read the buffers' current contents and accumulate across replays.
fn graph_replay(gpu: &Gpu, seed: u64) -> Result<String> {
    let util = UtilKernels::load(gpu)?;
    let (t, m, n) = (21, 75, 130);
    let shape = GemmShape::linear(t, m, n);
    let w_host = round_bf16(&uniform_vec(seed ^ 1, m * n, 1.0));
    let w = gpu.upload_bf16(&w_host, "graph W")?;
    // Zeroed: the warm-up GEMM below reads X before the first replay's copy writes it
    // (compute-sanitizer initcheck reported those reads: 5,460 of them, all of this check's).
    let mut x = gpu.alloc_zeros::<bf16>(t * n, "graph X")?;
    let mut y = gpu.alloc::<f32>(t * m, "graph Y")?;
    let mut acc = gpu.alloc_zeros::<f32>(t * m, "graph acc")?;
    // Warm the plan and the module outside the capture (capture must not compile or plan).
    gpu.gemm(&shape, &x, &w, &mut y)?;
    gpu.synchronize()?;
    let graph = gpu.capture(|| {
        gpu.gemm(&shape, &x, &w, &mut y)?;
        util.axpy(gpu, &mut acc, &y, 1.0)
    })?;
    graph.upload()?;
    gpu.memset_bytes(&mut y, 0xFF)?;
    gpu.memset_bytes(&mut acc, 0)?;
    let replays = 3;
    let mut want_acc = vec![0.0f32; t * m];
    let mut want_y = vec![0.0f32; t * m];
    for r in 0..replays {
        let x_host = round_bf16(&uniform_vec(seed.wrapping_add(7 + r), t * n, 1.0));
        gpu.copy_to_device(
            &x_host
                .iter()
                .map(|&v| bf16::from_f32(v))
                .collect::<Vec<_>>(),
            &mut x,
        )?;
        graph.replay()?;
        gemm_reference(&shape, &x_host, &w_host, &mut want_y, 1.0, 0.0)?;
        for (a, yv) in want_acc.iter_mut().zip(&want_y) {
            *a += yv;
        }
    }
    let err_y = rel_error(&gpu.download(&y)?, &want_y);
    let err_acc = rel_error(&gpu.download(&acc)?, &want_acc);
    if err_y <= 1e-4 && err_acc <= 1e-4 {
        Ok(format!(
            "{replays} replays with fresh X: last Y rel err {err_y:.1e}, sum {err_acc:.1e}"
        ))
    } else {
        Err(Error::Mismatch(format!(
            "after {replays} replays: Y rel err {err_y:.2e}, accumulated rel err {err_acc:.2e}"
        )))
    }
}

fn memory_cap(gpu: &Gpu) -> Result<String> {
    let before = gpu.mem_usage();
    let cap = Bytes(before.in_use.0 + (1 << 20));
    gpu.set_mem_cap(Some(cap));
    let over = gpu.alloc::<f32>(1 << 19, "a 2 MiB test buffer");
    let under = gpu.alloc::<f32>(1 << 17, "a 512 KiB test buffer");
    gpu.set_mem_cap(before.cap);
    let message = match over {
        Ok(_) => {
            return Err(Error::Mismatch(
                "2 MiB allocation under a 1 MiB headroom cap succeeded".into(),
            ))
        }
        Err(e @ Error::MemoryCap { .. }) => e.to_string(),
        Err(e) => return Err(e),
    };
    under?;
    if !message.contains("2 MiB test buffer") || !message.contains("--max-gpu-mem") {
        return Err(Error::Mismatch(format!(
            "cap error does not name the buffer and the flag: {message}"
        )));
    }
    Ok(format!("refused with: {message}"))
}

fn bad_launch_rejected(gpu: &Gpu) -> Result<String> {
    // Push a block of 2048 threads through the public launch path: must fail before the driver.
    let module = gpu.load_module(&crate::util::UTIL_CU, &crate::CompileOptions::default())?;
    let k = module.function("fill_uniform_f32")?;
    let mut buf = gpu.alloc::<f32>(16, "launch test")?;
    let (n, s, scale) = (16u64, 1u64, 1.0f32);
    let cfg = cudarc::driver::LaunchConfig {
        grid_dim: (1, 1, 1),
        block_dim: (2048, 1, 1),
        shared_mem_bytes: 0,
    };
    // SAFETY: arguments match fill_uniform_f32(float*, u64, u64, float); the launch is refused
    // by the config check before reaching the driver.
    let res = unsafe {
        gpu.launch(&k)
            .arg(&mut buf)
            .arg(&n)
            .arg(&s)
            .arg(&scale)
            .launch(cfg)
    };
    match res {
        Err(e @ Error::LaunchConfig { .. }) => Ok(format!("refused: {e}")),
        Err(e) => Err(e),
        Ok(()) => Err(Error::Mismatch("a 2048-thread block was launched".into())),
    }
}

/// A cooperative launch filling every co-resident slot synchronises the whole grid; one block
/// more is refused before the driver sees it.
fn cooperative(gpu: &Gpu) -> Result<String> {
    let util = UtilKernels::load(gpu)?;
    let resident = gpu.persistent_grid(util.coop_kernel(), 128, 0)?;
    let got = util.coop_neighbour(gpu, resident)?;
    let wrong = (0..resident)
        .filter(|&b| got[b as usize] != ((b + 1) % resident) * 3 + 1)
        .count();
    if wrong > 0 {
        return Err(Error::Mismatch(format!(
            "{wrong} of {resident} blocks read a wrong neighbour value after the grid barrier"
        )));
    }
    match util.coop_neighbour(gpu, resident + 1) {
        Err(Error::LaunchConfig { .. }) => Ok(format!(
            "{resident} blocks ({} SMs) met at the barrier; {} blocks refused",
            gpu.info().sm_count,
            resident + 1
        )),
        Err(e) => Err(e),
        Ok(_) => Err(Error::Mismatch(
            "a cooperative grid larger than the device holds was launched".into(),
        )),
    }
}
