//! Timing for the layer benchmarks: events around each repetition, median of many, L2 flushed
//! before each repetition by *reading* a buffer 4x the size of L2 (see bench.cu for why not a
//! memset), and CUDA graphs for decode-sized work when capture works.

use cudarc::driver::LaunchConfig;

use crate::compile::{CompileOptions, KernelSource};
use crate::error::Result;
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;
use crate::timing::BenchStats;

/// bench.cu: `blr_flush_read`.
pub const BENCH_CU: KernelSource = crate::kernel_source!("bench.cu", headers: ["common.cuh"]);

/// Evicts L2 with reads only (clean lines, no write-back inside the next timed region).
#[derive(Debug)]
pub struct ReadFlusher {
    buf: DeviceBuffer<u8>,
    sink: DeviceBuffer<u32>,
    kernel: Kernel,
}

impl ReadFlusher {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let module = gpu.load_module(&BENCH_CU, &CompileOptions::default())?;
        let kernel = module.function("blr_flush_read")?;
        let l2 = usize::try_from(gpu.info().l2_cache.0).unwrap_or(64 << 20);
        let bytes = (l2.max(1 << 20) * 4).div_ceil(16) * 16;
        Ok(Self {
            buf: gpu.alloc_zeros::<u8>(bytes, "the L2 flush buffer")?,
            sink: gpu.alloc_zeros::<u32>(1, "the L2 flush sink")?,
            kernel,
        })
    }

    /// Queues the flush on the Gpu's stream.
    pub fn flush(&mut self, gpu: &Gpu) -> Result<()> {
        let n16 = (self.buf.len() / 16) as u64;
        let cfg = LaunchConfig {
            grid_dim: (gpu.info().sm_count.max(1) * 4, 1, 1),
            block_dim: (512, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: blr_flush_read(const uint4* p, u64 n16, unsigned* sink) reads n16 16-byte
        // vectors of `buf` (len is a multiple of 16) and writes at most one word of `sink`.
        unsafe {
            gpu.launch(&self.kernel)
                .arg(&self.buf)
                .arg(&n16)
                .arg(&mut self.sink)
                .launch(cfg)
        }
    }
}

/// Result of [`bench`]: the statistics and whether a CUDA graph was replayed.
#[derive(Debug, Clone, Copy)]
pub struct Timed {
    pub stats: BenchStats,
    pub graph: bool,
}

/// Times `work` (which must only queue work on `gpu`'s stream): 3 eager warm-ups, then, if
/// `try_graph`, one capture replayed `reps` times (falls back to eager launches when the work
/// cannot be captured), each repetition after a read flush of L2.
pub fn bench(
    gpu: &Gpu,
    flusher: &mut ReadFlusher,
    reps: usize,
    try_graph: bool,
    mut work: impl FnMut() -> Result<()>,
) -> Result<Timed> {
    for _ in 0..3 {
        work()?;
    }
    gpu.synchronize()?;
    let graph = if try_graph {
        match gpu.capture(&mut work) {
            Ok(g) => g.upload().ok().map(|_| g),
            Err(_) => None,
        }
    } else {
        None
    };
    let (start, end) = (gpu.event()?, gpu.event()?);
    let mut samples = Vec::with_capacity(reps.max(1));
    for _ in 0..reps.max(1) {
        flusher.flush(gpu)?;
        start.record(gpu)?;
        match &graph {
            Some(g) => g.replay()?,
            None => work()?,
        }
        end.record(gpu)?;
        samples.push(start.elapsed_ms(&end)?);
    }
    let stats = BenchStats::from_samples(samples)
        .ok_or_else(|| crate::Error::Shape("bench: no repetitions".into()))?;
    Ok(Timed {
        stats,
        graph: graph.is_some(),
    })
}
