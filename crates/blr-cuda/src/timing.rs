//! Timing GPU work the way BRIEF §6 and METHOD.md ask: warm-up first, CUDA events around each
//! repetition, median of many, and optionally a cold L2 before each repetition so weights
//! come from HBM (a layer's weights are read once per forward in a real model; a benchmark
//! that re-reads a 30 MB weight from the 50 MB L2 of an H100 measures the cache).
//!
//! For decode-sized work (microseconds per launch), [`bench_graph`] captures the work into a
//! CUDA graph once and times its replays, which removes the CPU launch gaps from the numbers,
//! as a real decode step does.

use crate::error::Result;
use crate::gpu::Gpu;
use crate::memory::DeviceBuffer;

/// How to time.
#[derive(Debug, Clone, Copy)]
pub struct BenchOptions {
    pub warmup: usize,
    pub reps: usize,
    /// Evict L2 before each timed repetition (outside the timed region).
    pub flush_l2: bool,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            warmup: 5,
            reps: 50,
            flush_l2: true,
        }
    }
}

/// Statistics over the repetitions, in milliseconds.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct BenchStats {
    pub median_ms: f64,
    pub min_ms: f64,
    pub max_ms: f64,
    /// 10th and 90th percentiles: the spread to compare versions against.
    pub p10_ms: f64,
    pub p90_ms: f64,
    pub reps: usize,
}

impl BenchStats {
    /// From unsorted samples; `None` if there are none.
    pub fn from_samples(mut ms: Vec<f64>) -> Option<Self> {
        if ms.is_empty() {
            return None;
        }
        ms.sort_by(f64::total_cmp);
        let at = |q: f64| ms[((ms.len() - 1) as f64 * q).round() as usize];
        Some(Self {
            median_ms: at(0.5),
            min_ms: ms[0],
            max_ms: ms[ms.len() - 1],
            p10_ms: at(0.1),
            p90_ms: at(0.9),
            reps: ms.len(),
        })
    }
}

/// A device buffer twice the size of L2; writing it evicts whatever L2 held.
#[derive(Debug)]
pub struct L2Flusher {
    scratch: DeviceBuffer<u8>,
}

impl L2Flusher {
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let bytes = (gpu.info().l2_cache.0 as usize).max(1 << 20) * 2;
        Ok(Self {
            scratch: gpu.alloc::<u8>(bytes, "the L2 flush buffer")?,
        })
    }

    /// Queues a write over the whole scratch buffer on the Gpu's stream.
    pub fn flush(&mut self, gpu: &Gpu) -> Result<()> {
        gpu.memset_bytes(&mut self.scratch, 0x5A)
    }
}

/// Times `work` (see module docs). `work` must only queue device work on `gpu`'s stream.
pub fn bench(
    gpu: &Gpu,
    opts: &BenchOptions,
    mut work: impl FnMut() -> Result<()>,
) -> Result<BenchStats> {
    let mut flusher = if opts.flush_l2 {
        Some(L2Flusher::new(gpu)?)
    } else {
        None
    };
    for _ in 0..opts.warmup {
        work()?;
    }
    let (start, end) = (gpu.event()?, gpu.event()?);
    let mut samples = Vec::with_capacity(opts.reps);
    for _ in 0..opts.reps.max(1) {
        if let Some(f) = flusher.as_mut() {
            f.flush(gpu)?;
        }
        start.record(gpu)?;
        work()?;
        end.record(gpu)?;
        samples.push(start.elapsed_ms(&end)?);
    }
    BenchStats::from_samples(samples)
        .ok_or_else(|| crate::Error::Shape("bench: no repetitions".into()))
}

/// Captures `work` into a CUDA graph once (after `opts.warmup` eager runs, which also build
/// any GEMM plans and load modules: a capture may not do either) and times graph replays.
pub fn bench_graph(
    gpu: &Gpu,
    opts: &BenchOptions,
    mut work: impl FnMut() -> Result<()>,
) -> Result<BenchStats> {
    for _ in 0..opts.warmup.max(1) {
        work()?;
    }
    gpu.synchronize()?;
    let graph = gpu.capture(&mut work)?;
    graph.upload()?;
    bench(gpu, &BenchOptions { warmup: 2, ..*opts }, || graph.replay())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stats_percentiles() {
        let s = BenchStats::from_samples((1..=11).rev().map(f64::from).collect());
        let s = s.map(|s| (s.median_ms, s.min_ms, s.max_ms, s.p10_ms, s.p90_ms, s.reps));
        assert_eq!(s, Some((6.0, 1.0, 11.0, 2.0, 10.0, 11)));
        assert!(BenchStats::from_samples(vec![]).is_none());
    }
}
