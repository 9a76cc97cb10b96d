//! Calibration statistics on the GPU: `R = sum_t a_t b_t^T` over bf16 activation rows, the Gram
//! `X X^T` (`a = b`) and the cross statistic `X X'^T` of `blr_compress::{Gram, CrossGram}`,
//! accumulated where the activations already are (the CUDA model backend) instead of
//! downloading every layer input and summing on the host.
//!
//! Rows are taken [`CHUNK_ROWS`] at a time: one cuBLAS GEMM (bf16 in, fp32 accumulate, fp32 out)
//! per chunk into a scratch matrix, then added to an f64 running sum on the device
//! (`gram.cu`), so a long run's rounding is that of one chunk. [`GramEngine::finish`] downloads
//! the sum once per layer, row-major `(n, n)` in f64, for `Gram::from_sum` /
//! `CrossGram::from_sum`. Cost per chunk: `2 rows n^2` FLOPs on tensor cores (down_proj,
//! n = 1536, 2048 rows: 9.7 GFLOP, ~20 us on an H100) and the n^2 f64 add.
//!
//! Layout: a row-major `(rows, n)` activation is the column-major `(n, rows)` matrix `A^T`
//! with leading dimension n. The column-major result `C (n, n) = B^T-view * A^T-view^T`, i.e.
//! `C[p + q n] = sum_t b[t, p] a[t, q]`, is `R` read row-major (`R[q][p]` at `q n + p`), so no
//! transpose is copied.

use cudarc::driver::LaunchConfig;
use half::bf16;

use crate::compile::{CompileOptions, KernelSource};
use crate::error::{Error, Result};
use crate::factorize::blas::{Cublas, Op, Operand};
use crate::gpu::{Gpu, Kernel};
use crate::memory::DeviceBuffer;

/// gram.cu: `blr_gram_add_f64`.
pub const GRAM_CU: KernelSource = crate::kernel_source!("gram.cu");

/// Tokens per fp32 GEMM before the partial joins the f64 sum (the CPU path's chunk too).
pub const CHUNK_ROWS: usize = 2048;

const BLOCK: u32 = 256;

/// The cuBLAS handle (bound to the [`Gpu`]'s stream, so Grams are ordered after the forward
/// ops that produced their rows) and the add kernel.
pub struct GramEngine {
    blas: Cublas,
    add: Kernel,
    grid_cap: u32,
}

impl std::fmt::Debug for GramEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("GramEngine")
    }
}

/// One statistic being accumulated on the device: the f64 sum, the fp32 scratch of the
/// current chunk, and the tokens added so far.
#[derive(Debug)]
pub struct GramSum {
    n: usize,
    sum: DeviceBuffer<f64>,
    scratch: DeviceBuffer<f32>,
    tokens: u64,
}

impl GramSum {
    /// Features (the statistic is n x n).
    pub fn dim(&self) -> usize {
        self.n
    }

    /// Token rows added so far.
    pub fn tokens(&self) -> u64 {
        self.tokens
    }
}

impl GramEngine {
    /// Creates the cuBLAS handle on `gpu`'s stream and loads `gram.cu`.
    pub fn new(gpu: &Gpu) -> Result<Self> {
        let blas = Cublas::new(gpu)?;
        let module = gpu.load_module(&GRAM_CU, &CompileOptions::default())?;
        let add = module.function("blr_gram_add_f64")?;
        let grid_cap = gpu.info().sm_count.max(1) * 8;
        Ok(GramEngine {
            blas,
            add,
            grid_cap,
        })
    }

    /// An empty (zero) statistic for `n` features.
    pub fn start(&self, gpu: &Gpu, n: usize) -> Result<GramSum> {
        if n == 0 {
            return Err(Error::Shape(
                "a calibration Gram needs at least one feature (n = 0)".into(),
            ));
        }
        let nn = n
            .checked_mul(n)
            .ok_or_else(|| Error::Shape(format!("Gram of n = {n} features overflows")))?;
        Ok(GramSum {
            n,
            sum: gpu.alloc_zeros::<f64>(nn, "calibration Gram (f64 sum)")?,
            scratch: gpu.alloc::<f32>(nn, "calibration Gram (fp32 chunk)")?,
            tokens: 0,
        })
    }

    /// `acc += sum_t a_t b_t^T` over `rows` rows of `a` and `b`, both row-major `(rows, n)`
    /// bf16 (pass the same buffer twice for a Gram). `a` indexes the result's rows.
    pub fn add(
        &self,
        gpu: &Gpu,
        acc: &mut GramSum,
        a: &DeviceBuffer<bf16>,
        b: &DeviceBuffer<bf16>,
        rows: usize,
    ) -> Result<()> {
        let n = acc.n;
        let need = rows
            .checked_mul(n)
            .ok_or_else(|| Error::Shape(format!("{rows} rows x {n} features overflows")))?;
        if a.len() < need || b.len() < need {
            return Err(Error::Shape(format!(
                "Gram accumulation of {rows} rows x {n} features: operands hold {} and {} \
                 elements, need {need}",
                a.len(),
                b.len()
            )));
        }
        let nn = n * n;
        let cfg = LaunchConfig {
            grid_dim: (Gpu::grid_1d(nn, BLOCK).min(self.grid_cap), 1, 1),
            block_dim: (BLOCK, 1, 1),
            shared_mem_bytes: 0,
        };
        let nn64 = nn as u64;
        for start in (0..rows).step_by(CHUNK_ROWS) {
            let chunk = CHUNK_ROWS.min(rows - start);
            let off = start * n;
            // C (n, n) col-major = b-view (n, chunk) * a-view (n, chunk)^T: see module docs.
            self.blas.gemm_bf16_f32(
                Op::N,
                Op::T,
                (n, n, chunk),
                1.0,
                Operand::new(b.device_ptr_at(off)?, n, 0),
                Operand::new(a.device_ptr_at(off)?, n, 0),
                0.0,
                Operand::new(acc.scratch.device_ptr(), n, 0),
            )?;
            // SAFETY: blr_gram_add_f64(sum, part, n): both buffers hold n * n elements.
            unsafe {
                gpu.launch(&self.add)
                    .arg(&mut acc.sum)
                    .arg(&acc.scratch)
                    .arg(&nn64)
                    .launch(cfg)?;
            }
        }
        acc.tokens += rows as u64;
        Ok(())
    }

    /// The accumulated sum, row-major `(n, n)` in f64 (`R[i][j] = sum_t a[t, i] b[t, j]`).
    pub fn finish(&self, gpu: &Gpu, acc: &GramSum) -> Result<Vec<f64>> {
        gpu.download(&acc.sum)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use blr_core::rng::Rng;

    fn gpu_or_skip(test: &str) -> Option<Gpu> {
        match crate::factorize::open_gpu() {
            Ok(g) => Some(g),
            Err(e) => {
                eprintln!("SKIP {test}: no usable GPU here ({e})");
                None
            }
        }
    }

    /// `sum_t a_t b_t^T` in f64 from the bf16-rounded rows (what the GPU sees).
    fn reference(a: &[f32], b: &[f32], rows: usize, n: usize) -> Vec<f64> {
        let r = |v: f32| f64::from(bf16::from_f32(v).to_f32());
        let mut out = vec![0.0f64; n * n];
        for t in 0..rows {
            for i in 0..n {
                let ai = r(a[t * n + i]);
                for j in 0..n {
                    out[i * n + j] += ai * r(b[t * n + j]);
                }
            }
        }
        out
    }

    fn rel(a: &[f64], b: &[f64]) -> f64 {
        let num: f64 = a.iter().zip(b).map(|(x, y)| (x - y).powi(2)).sum();
        let den: f64 = b.iter().map(|y| y * y).sum();
        (num / den.max(f64::MIN_POSITIVE)).sqrt()
    }

    /// Gram and cross statistic against the f64 CPU sum on odd shapes, over several calls and
    /// a call longer than one chunk (rows 2500 = 2048 + 452).
    #[test]
    fn gram_and_cross_match_the_cpu_sum() {
        let Some(gpu) = gpu_or_skip("gram_and_cross_match_the_cpu_sum") else {
            return;
        };
        let engine = GramEngine::new(&gpu).unwrap();
        let mut rng = Rng::new(11);
        for &(n, calls) in &[(37usize, &[5usize, 61][..]), (131, &[2500, 17, 1][..])] {
            let mut g = engine.start(&gpu, n).unwrap();
            let mut c = engine.start(&gpu, n).unwrap();
            let (mut want_g, mut want_c) = (vec![0.0f64; n * n], vec![0.0f64; n * n]);
            for &rows in calls {
                // A non-zero mean, as real activations have, and a distinct second stream.
                let a: Vec<f32> = rng
                    .normal_vec(rows * n, 1.0)
                    .iter()
                    .map(|v| v + 0.3)
                    .collect();
                let b: Vec<f32> = rng.normal_vec(rows * n, 0.5);
                let da = gpu.upload_bf16(&a, "a").unwrap();
                let db = gpu.upload_bf16(&b, "b").unwrap();
                engine.add(&gpu, &mut g, &da, &da, rows).unwrap();
                engine.add(&gpu, &mut c, &da, &db, rows).unwrap();
                for (w, v) in want_g.iter_mut().zip(reference(&a, &a, rows, n)) {
                    *w += v;
                }
                for (w, v) in want_c.iter_mut().zip(reference(&a, &b, rows, n)) {
                    *w += v;
                }
            }
            let total: usize = calls.iter().sum();
            assert_eq!(g.tokens(), total as u64);
            let got_g = engine.finish(&gpu, &g).unwrap();
            let got_c = engine.finish(&gpu, &c).unwrap();
            let (eg, ec) = (rel(&got_g, &want_g), rel(&got_c, &want_c));
            eprintln!("gram n={n} rows={calls:?}: rel diff gram {eg:.2e} cross {ec:.2e}");
            // bf16 products are exact in fp32; what remains is fp32 summation over a chunk.
            assert!(eg < 1e-5 && ec < 1e-5, "gram {eg:.2e} cross {ec:.2e}");
            // Orientation: the cross statistic is not symmetric; (i, j) is a_i b_j.
            let (i, j) = (1, n - 2);
            assert!(
                (got_c[i * n + j] - want_c[i * n + j]).abs()
                    < 1e-3 * want_c[i * n + j].abs().max(1.0)
            );
        }
    }

    #[test]
    fn bad_shapes_are_typed_errors() {
        let Some(gpu) = gpu_or_skip("bad_shapes_are_typed_errors") else {
            return;
        };
        let engine = GramEngine::new(&gpu).unwrap();
        assert!(matches!(engine.start(&gpu, 0), Err(Error::Shape(_))));
        let mut g = engine.start(&gpu, 8).unwrap();
        let x = gpu.upload_bf16(&[1.0; 20], "x").unwrap();
        let e = engine.add(&gpu, &mut g, &x, &x, 3).unwrap_err();
        assert!(e.to_string().contains("need 24"), "{e}");
        assert_eq!(g.tokens(), 0);
    }
}
