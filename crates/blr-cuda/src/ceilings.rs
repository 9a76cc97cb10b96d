//! The two measured ceilings of the roofline (BRIEF §5): device memory bandwidth and the dense
//! bf16 tensor-core rate. Every kernel's floor is `max(bytes / bandwidth, flops / rate)` with
//! these numbers measured on the same device, not datasheet values (H100 SXM datasheet:
//! 3.35 TB/s, 989 TFLOP/s dense bf16; what code can reach is ~2.9-3.0 TB/s and ~650-750).
//!
//! Method (../.library/device/METHOD.md): random data (never zeros: a GEMM on zeros runs
//! faster), warm-up first, CUDA events around each repetition, median of many. The copy
//! counts bytes read + bytes written, on buffers of 1 GiB each, ~20x the H100's 50 MB L2, so
//! the cache cannot serve them.

use half::bf16;

use crate::error::Result;
use crate::gemm::GemmShape;
use crate::gpu::Gpu;
use crate::timing::{bench, bench_graph, BenchOptions};
use crate::util::UtilKernels;

/// One timed measurement.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Timing {
    /// What was timed (method and size).
    pub what: String,
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    pub reps: usize,
    /// GB/s (copies) or TFLOP/s (GEMMs) at the median time.
    pub rate: f64,
}

/// What `blr doctor` reports and the roofline uses.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Ceilings {
    /// Best device-to-device copy bandwidth, GB/s, counting read + written bytes.
    pub copy_gbs: f64,
    /// Best dense bf16 GEMM rate (fp32 accumulate), TFLOP/s.
    pub gemm_tflops: f64,
    /// Every measurement behind the two numbers.
    pub copies: Vec<Timing>,
    pub gemms: Vec<Timing>,
    /// Dense cuBLASLt linear layers at BRIEF §4's shape (4096 -> 4096), L2 flushed before each
    /// run: the "speedup vs dense" baselines, next to their roofline floor.
    pub dense_reference: Vec<DenseReference>,
    /// Host-side cost of queuing work, in microseconds per call (what CUDA graphs remove).
    pub host_overhead: HostOverhead,
}

/// Host time to queue one operation: the CPU cost a graph replay replaces.
#[derive(Debug, Clone, serde::Serialize)]
pub struct HostOverhead {
    /// First GEMM of a new shape: builds descriptors and asks the heuristic.
    pub gemm_plan_build_us: f64,
    /// Each later GEMM of that shape: one cublasLtMatmul with the cached plan.
    pub gemm_cached_us: f64,
    /// One launch of a small kernel through [`crate::Launch`].
    pub kernel_launch_us: f64,
}

/// One dense-layer baseline.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DenseReference {
    pub what: String,
    pub tokens: usize,
    pub m: usize,
    pub n: usize,
    pub median_ms: f64,
    pub p10_ms: f64,
    pub p90_ms: f64,
    /// max(bytes / copy_gbs, flops / gemm_tflops) with the ceilings measured in this run.
    pub floor_ms: f64,
}

/// Median, min and max of `reps` timed runs of `work` after `warmup` untimed ones (no L2
/// flush: the copy buffers are 20x L2 and the GEMMs are compute-bound).
pub fn time_reps(
    gpu: &Gpu,
    warmup: usize,
    reps: usize,
    work: impl FnMut() -> Result<()>,
) -> Result<(f64, f64, f64)> {
    let opts = BenchOptions {
        warmup,
        reps,
        flush_l2: false,
    };
    let s = bench(gpu, &opts, work)?;
    Ok((s.median_ms, s.min_ms, s.max_ms))
}

/// Measures both ceilings. `copy_bytes` per buffer (two are allocated) and the GEMM shapes are
/// chosen to fill an H100; smaller GPUs get proportionally smaller sizes from
/// [`measure_default`].
pub fn measure(
    gpu: &Gpu,
    copy_bytes: usize,
    gemm_sizes: &[(usize, usize, usize)],
    reps: usize,
) -> Result<Ceilings> {
    let util = UtilKernels::load(gpu)?;
    let copy_bytes = copy_bytes / 256 * 256;
    let mut copies = Vec::new();
    {
        let elems = copy_bytes / 2;
        let mut src = gpu.alloc::<bf16>(elems, "the bandwidth test's source")?;
        let mut dst = gpu.alloc::<bf16>(elems, "the bandwidth test's destination")?;
        util.fill_uniform_bf16(gpu, &mut src, 0x5eed, 1.0)?;
        gpu.memset_bytes(&mut dst, 0xFF)?;
        let moved = 2.0 * copy_bytes as f64;
        let (med, min, max) = time_reps(gpu, 3, reps, || gpu.copy_device(&src, &mut dst))?;
        copies.push(Timing {
            what: format!("cuMemcpyDtoDAsync, {}", crate::Bytes(copy_bytes as u64)),
            median_ms: med,
            min_ms: min,
            max_ms: max,
            reps,
            rate: moved / (med * 1e-3) / 1e9,
        });
        let (med, min, max) = time_reps(gpu, 3, reps, || util.copy_vec16(gpu, &src, &mut dst))?;
        copies.push(Timing {
            what: format!("copy_vec16 kernel, {}", crate::Bytes(copy_bytes as u64)),
            median_ms: med,
            min_ms: min,
            max_ms: max,
            reps,
            rate: moved / (med * 1e-3) / 1e9,
        });
        // The kernel must really have copied (dst was NaN-poisoned before the driver copy).
        let bits = |v: Vec<bf16>| v.into_iter().map(bf16::to_bits).collect::<Vec<u16>>();
        gpu.memset_bytes(&mut dst, 0xFF)?;
        util.copy_vec16(gpu, &src, &mut dst)?;
        if bits(gpu.download(&src)?) != bits(gpu.download(&dst)?) {
            return Err(crate::Error::Mismatch(
                "bandwidth test: copy_vec16 produced a different buffer".into(),
            ));
        }
    }
    let mut gemms = Vec::new();
    for &(m, n, k) in gemm_sizes {
        // Y (m, n) = X (m, k) W^T, W (n, k): the TN layout, inputs uniform in [-1, 1).
        let shape = GemmShape::linear(m, n, k);
        let mut x = gpu.alloc::<bf16>(m * k, "the GEMM test's X")?;
        let mut w = gpu.alloc::<bf16>(n * k, "the GEMM test's W")?;
        let mut y = gpu.alloc::<bf16>(m * n, "the GEMM test's Y")?;
        util.fill_uniform_bf16(gpu, &mut x, 1, 1.0)?;
        util.fill_uniform_bf16(gpu, &mut w, 2, 1.0)?;
        let (med, min, max) = time_reps(gpu, 5, reps, || gpu.gemm(&shape, &x, &w, &mut y))?;
        gemms.push(Timing {
            what: format!("cuBLASLt bf16 TN, T={m} m={n} n={k}"),
            median_ms: med,
            min_ms: min,
            max_ms: max,
            reps,
            rate: shape.flops() / (med * 1e-3) / 1e12,
        });
        if (m, n, k) == gemm_sizes[0] {
            // The same GEMM with the fastest of the heuristic's algorithms pinned.
            gpu.blas()?.tune(gpu, &shape, &x, &w, &mut y, 5)?;
            let (med, min, max) = time_reps(gpu, 3, reps, || gpu.gemm(&shape, &x, &w, &mut y))?;
            gemms.push(Timing {
                what: format!("cuBLASLt bf16 TN tuned, T={m} m={n} n={k}"),
                median_ms: med,
                min_ms: min,
                max_ms: max,
                reps,
                rate: shape.flops() / (med * 1e-3) / 1e12,
            });
        }
    }
    let best = |v: &[Timing]| v.iter().map(|t| t.rate).fold(0.0, f64::max);
    let (copy_gbs, gemm_tflops) = (best(&copies), best(&gemms));
    let dense_reference = dense_reference(gpu, &util, copy_gbs, gemm_tflops, reps)?;
    let host_overhead = host_overhead(gpu, &util)?;
    Ok(Ceilings {
        copy_gbs,
        gemm_tflops,
        copies,
        gemms,
        dense_reference,
        host_overhead,
    })
}

fn host_overhead(gpu: &Gpu, util: &UtilKernels) -> Result<HostOverhead> {
    // A shape no other measurement uses, so its first call builds a plan.
    let shape = GemmShape::linear(3, 72, 56);
    let x = gpu.alloc_zeros::<bf16>(3 * 56, "overhead X")?;
    let w = gpu.alloc_zeros::<bf16>(72 * 56, "overhead W")?;
    let mut y = gpu.alloc::<bf16>(3 * 72, "overhead Y")?;
    let mut acc = gpu.alloc_zeros::<f32>(1024, "overhead acc")?;
    let small = gpu.alloc_zeros::<f32>(1024, "overhead x")?;
    gpu.synchronize()?;
    let start = std::time::Instant::now();
    gpu.gemm(&shape, &x, &w, &mut y)?;
    let gemm_plan_build_us = start.elapsed().as_secs_f64() * 1e6;
    gpu.synchronize()?;
    let calls = 200;
    let start = std::time::Instant::now();
    for _ in 0..calls {
        gpu.gemm(&shape, &x, &w, &mut y)?;
    }
    let gemm_cached_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(calls);
    gpu.synchronize()?;
    util.axpy(gpu, &mut acc, &small, 1.0)?;
    gpu.synchronize()?;
    let start = std::time::Instant::now();
    for _ in 0..calls {
        util.axpy(gpu, &mut acc, &small, 1.0)?;
    }
    let kernel_launch_us = start.elapsed().as_secs_f64() * 1e6 / f64::from(calls);
    gpu.synchronize()?;
    Ok(HostOverhead {
        gemm_plan_build_us,
        gemm_cached_us,
        kernel_launch_us,
    })
}

/// Dense `Y (T, 4096) = X (T, 4096) W^T` at T = 1 (graph replay: decode) and T = 1024
/// (prefill), weights read from HBM (L2 flushed before each run).
fn dense_reference(
    gpu: &Gpu,
    util: &UtilKernels,
    copy_gbs: f64,
    gemm_tflops: f64,
    reps: usize,
) -> Result<Vec<DenseReference>> {
    let (m, n) = (4096usize, 4096usize);
    let mut w = gpu.alloc::<bf16>(m * n, "the dense reference's W")?;
    util.fill_uniform_bf16(gpu, &mut w, 3, 0.02)?;
    let mut out = Vec::new();
    for &(t, graph) in &[(1usize, true), (1024usize, false)] {
        let shape = GemmShape::linear(t, m, n);
        let mut x = gpu.alloc::<bf16>(t * n, "the dense reference's X")?;
        let mut y = gpu.alloc::<bf16>(t * m, "the dense reference's Y")?;
        util.fill_uniform_bf16(gpu, &mut x, 4, 1.0)?;
        let opts = BenchOptions {
            warmup: 5,
            reps: reps.max(10),
            flush_l2: true,
        };
        let stats = if graph {
            bench_graph(gpu, &opts, || gpu.gemm(&shape, &x, &w, &mut y))?
        } else {
            bench(gpu, &opts, || gpu.gemm(&shape, &x, &w, &mut y))?
        };
        let bytes = 2.0 * (m * n + t * (m + n)) as f64;
        let floor_ms = (bytes / (copy_gbs * 1e9)).max(shape.flops() / (gemm_tflops * 1e12)) * 1e3;
        out.push(DenseReference {
            what: format!(
                "dense 4096x4096, T={t}{}",
                if graph { ", graph replay" } else { "" }
            ),
            tokens: t,
            m,
            n,
            median_ms: stats.median_ms,
            p10_ms: stats.p10_ms,
            p90_ms: stats.p90_ms,
            floor_ms,
        });
    }
    Ok(out)
}

/// [`measure`] with sizes that fit the device: 1 GiB copy buffers and 8192^3 / 16384x8192x8192
/// GEMMs on a large GPU, scaled down to a quarter of memory on small ones.
pub fn measure_default(gpu: &Gpu, reps: usize) -> Result<Ceilings> {
    let total = gpu.info().total_mem.0 as usize;
    let copy = (1usize << 30).min(total / 8);
    let sizes: Vec<(usize, usize, usize)> = if total >= (16usize << 30) {
        vec![(8192, 8192, 8192), (16384, 8192, 8192)]
    } else {
        vec![(4096, 4096, 4096)]
    };
    measure(gpu, copy, &sizes, reps)
}
