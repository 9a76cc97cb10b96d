//! What `blr doctor` finds out: which CUDA libraries load and their versions, the device, the
//! two measured roofline ceilings, and (optionally) the GPU self-tests. Never fails: each
//! missing piece becomes a line in [`DoctorReport::problems`], so the report is useful on a
//! machine with no GPU too.

use std::path::PathBuf;

use crate::ceilings::{self, Ceilings};
use crate::compile::{nvrtc_version, CompileOptions};
use crate::gemm::{cublas_version, cublaslt_version};
use crate::gpu::{device_count, DeviceInfo, Gpu, GpuOptions};
use crate::libs::{self, LibraryReport};
use crate::memory::{Bytes, MemUsage};
use crate::selftest::{self, Check};

/// Options for [`run`].
#[derive(Debug, Clone)]
pub struct DoctorOptions {
    /// Which device, memory cap, kernel cache.
    pub gpu: GpuOptions,
    /// Measure copy bandwidth and GEMM rate (a few seconds on an H100).
    pub measure: bool,
    /// Repetitions per measurement (median reported).
    pub reps: usize,
    pub self_test: bool,
    pub seed: u64,
}

/// How long compiling (or loading from the disk cache) `util.cu` took: the NVRTC path end to end.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CompileProbe {
    pub arch: String,
    pub millis: f64,
    pub from_disk_cache: bool,
    pub cache_dir: Option<PathBuf>,
}

/// Everything `blr doctor` prints.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DoctorReport {
    pub libraries: LibraryReport,
    /// CUDA version the driver supports, e.g. `13.0`.
    pub driver_cuda: Option<String>,
    pub nvrtc: Option<String>,
    pub cublaslt: Option<String>,
    pub cublas: Option<String>,
    pub device_count: usize,
    pub device: Option<DeviceInfo>,
    /// Free device memory (all processes), when a device was opened.
    pub free_mem: Option<Bytes>,
    pub compile: Option<CompileProbe>,
    pub ceilings: Option<Ceilings>,
    pub self_test: Option<Vec<Check>>,
    /// blr's own device memory at the end (buffers, workspace) against the cap.
    pub memory: Option<MemUsage>,
    /// Each thing that did not work, in words.
    pub problems: Vec<String>,
}

impl DoctorReport {
    /// True when a self-test was asked for and every check passed.
    pub fn self_test_passed(&self) -> bool {
        self.self_test
            .as_ref()
            .is_some_and(|c| !c.is_empty() && c.iter().all(|c| c.passed))
    }
}

/// Collects the report (see module docs).
pub fn run(opts: &DoctorOptions) -> DoctorReport {
    let mut problems = Vec::new();
    let libraries = libs::report();
    let mut note = |r: Result<String, crate::Error>| match r {
        Ok(v) => Some(v),
        Err(e) => {
            problems.push(e.to_string());
            None
        }
    };
    let driver_cuda = note(driver_cuda_version());
    let nvrtc = note(nvrtc_version().map(|(a, b)| format!("{a}.{b}")));
    let cublaslt = note(cublaslt_version().map(|(a, b, c)| format!("{a}.{b}.{c}")));
    let cublas = note(cublas_version().map(|(a, b, c)| format!("{a}.{b}.{c}")));
    let mut report = DoctorReport {
        libraries,
        driver_cuda,
        nvrtc,
        cublaslt,
        cublas,
        device_count: 0,
        device: None,
        free_mem: None,
        compile: None,
        ceilings: None,
        self_test: None,
        memory: None,
        problems,
    };
    if report.libraries.cuda_include.is_none() {
        if let Err(e) = libs::cuda_include_dir() {
            report.problems.push(e.to_string());
        }
    }
    if !report.libraries.driver {
        // Already explained by driver_cuda_version's error.
        return report;
    }
    match device_count() {
        Ok(n) => report.device_count = n,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    }
    let gpu = match Gpu::new(opts.gpu.clone()) {
        Ok(g) => g,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    report.device = Some(gpu.info().clone());
    report.free_mem = gpu.device_mem_info().ok().map(|(free, _)| free);
    match gpu.load_module(&crate::util::UTIL_CU, &CompileOptions::default()) {
        Ok(m) => {
            report.compile = Some(CompileProbe {
                arch: gpu.info().arch.clone(),
                millis: m.compile_ms,
                from_disk_cache: m.from_cache,
                cache_dir: gpu.kernel_cache().dir().map(Into::into),
            })
        }
        Err(e) => report.problems.push(e.to_string()),
    }
    if opts.self_test {
        report.self_test = Some(selftest::run_all(&gpu, opts.seed));
    }
    if opts.measure {
        match ceilings::measure_default(&gpu, opts.reps) {
            Ok(c) => report.ceilings = Some(c),
            Err(e) => report
                .problems
                .push(format!("measuring the ceilings failed: {e}")),
        }
    }
    report.memory = Some(gpu.mem_usage());
    report
}

fn driver_cuda_version() -> crate::Result<String> {
    libs::ensure_driver()?;
    let mut v = 0;
    // SAFETY: libcuda is loaded (checked above); cuDriverGetVersion needs no cuInit.
    unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) }
        .result()
        .map_err(crate::Error::driver("reading the driver's CUDA version"))?;
    Ok(format!("{}.{}", v / 1000, (v % 1000) / 10))
}
