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
}

/// Median, min and max of `reps` timed runs of `work` after `warmup` untimed ones.
pub fn time_reps(
    gpu: &Gpu,
    warmup: usize,
    reps: usize,
    mut work: impl FnMut() -> Result<()>,
) -> Result<(f64, f64, f64)> {
    for _ in 0..warmup {
        work()?;
    }
    let mut times = Vec::with_capacity(reps);
    for _ in 0..reps.max(1) {
        times.push(gpu.time_ms(&mut work)?);
    }
    times.sort_by(f64::total_cmp);
    let median = times[times.len() / 2];
    Ok((median, times[0], times[times.len() - 1]))
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
            return Err(crate::Error::Shape(
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
    }
    let best = |v: &[Timing]| v.iter().map(|t| t.rate).fold(0.0, f64::max);
    Ok(Ceilings {
        copy_gbs: best(&copies),
        gemm_tflops: best(&gemms),
        copies,
        gemms,
    })
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
