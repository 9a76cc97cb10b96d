//! `blr doctor`: what CUDA pieces this machine has, what its GPU can do, and whether blr's GPU
//! runtime works on it.

use anyhow::{bail, Context};
use blr_cuda::doctor::{DoctorOptions, DoctorReport};
use blr_cuda::{Bytes, GpuOptions};

#[derive(clap::Args)]
#[command(after_long_help = "\
Reports which CUDA libraries load (driver, NVRTC, cuBLASLt, cuBLAS) and their versions, where \
the CUDA headers NVRTC needs were found, the device (name, compute capability and the arch \
kernels are compiled for, SMs, memory, L2, shared memory), and compiles a kernel to show the \
NVRTC path works. Then it measures the two numbers every roofline in blr uses:\n\n  \
copy bandwidth  device-to-device copy of 1 GiB, counting bytes read + bytes written\n  \
bf16 GEMM rate  cuBLASLt, bf16 in, fp32 accumulate, random data\n\n\
(median of --reps runs, timed with CUDA events). On a machine with no driver or GPU it says \
exactly what is missing; CPU commands keep working there.\n\n\
--self-test also runs the GPU checks (cuBLASLt GEMMs vs a CPU reference on odd shapes, \
CUDA graph capture + replay, the memory cap error, ...) and exits non-zero if any fails.\n\n\
Examples:\n  blr doctor\n  blr doctor --self-test --json > doctor.json\n  blr doctor --no-measure\n\n\
Environment: BLR_NVRTC_LIB_DIR (dir of libnvrtc.so.13), BLR_CUDA_INCLUDE (dir of cuda_bf16.h), \
BLR_KERNEL_CACHE (compiled-kernel cache dir, or 'off'), BLR_MAX_GPU_MEM (default cap), \
BLR_CUDA_SYNC=1 (check each kernel launch synchronously).")]
pub struct Args {
    #[command(flatten)]
    gpu: GpuArgs,
    /// Skip the bandwidth and GEMM measurements (seconds on a large GPU).
    #[arg(long)]
    no_measure: bool,
    /// Repetitions per measurement; the median is reported.
    #[arg(long, default_value_t = 20)]
    reps: usize,
    /// Run the GPU self-tests too; exit non-zero if any fails.
    #[arg(long)]
    self_test: bool,
    /// Seed for the self-tests' random inputs.
    #[arg(long, default_value_t = 0x5eed_2026)]
    seed: u64,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

/// The GPU flags every GPU command takes: add `#[command(flatten)] gpu: GpuArgs` to a
/// command's `Args` and open the device with `Gpu::new(args.gpu.options())`.
#[derive(clap::Args, Debug, Clone)]
pub struct GpuArgs {
    /// CUDA device ordinal (as CUDA_VISIBLE_DEVICES numbers them).
    #[arg(long, default_value_t = 0)]
    pub device: usize,
    /// Cap on the device memory blr may allocate (weights, activations, KV cache, workspaces),
    /// e.g. 8GiB, 512MiB, 6GB; an allocation past it fails with a message naming the buffer.
    /// Default: BLR_MAX_GPU_MEM, else no cap beyond the device.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_gpu_mem: Option<Bytes>,
}

impl GpuArgs {
    pub fn options(&self) -> GpuOptions {
        GpuOptions {
            ordinal: self.device,
            max_mem: self.max_gpu_mem,
            ..GpuOptions::default()
        }
    }
}

pub(crate) fn parse_size(text: &str) -> Result<Bytes, String> {
    text.parse::<Bytes>().map_err(|e| e.to_string())
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let report = blr_cuda::doctor::run(&DoctorOptions {
        gpu: args.gpu.options(),
        measure: !args.no_measure,
        reps: args.reps.max(1),
        self_test: args.self_test,
        seed: args.seed,
    });
    if args.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("serialising the doctor report")?
        );
    } else {
        print_text(&report);
    }
    if args.self_test {
        if report.self_test.is_none() {
            bail!(
                "--self-test needs a usable GPU: {}",
                report.problems.join("; ")
            );
        }
        if !report.self_test_passed() {
            bail!("GPU self-test failed (see the FAIL lines above)");
        }
    }
    Ok(())
}

fn yes_no(found: bool, version: &Option<String>) -> String {
    match (found, version) {
        (true, Some(v)) => v.clone(),
        (true, None) => "found".into(),
        (false, _) => "NOT FOUND".into(),
    }
}

fn print_text(r: &DoctorReport) {
    let lib = &r.libraries;
    println!("CUDA libraries");
    println!(
        "  driver (libcuda)      {}",
        yes_no(
            lib.driver,
            &r.driver_cuda.as_ref().map(|v| format!("supports CUDA {v}"))
        )
    );
    println!("  NVRTC                 {}", yes_no(lib.nvrtc, &r.nvrtc));
    println!(
        "  cuBLASLt              {}",
        yes_no(lib.cublaslt, &r.cublaslt)
    );
    println!("  cuBLAS                {}", yes_no(lib.cublas, &r.cublas));
    println!(
        "  CUDA headers          {}",
        lib.cuda_include
            .as_ref()
            .map_or("NOT FOUND".to_string(), |p| p.display().to_string())
    );
    match &r.device {
        None => println!("\nGPU: none usable ({} device(s) visible)", r.device_count),
        Some(d) => {
            println!("\nDevice {} of {}: {}", d.ordinal, r.device_count, d.name);
            println!(
                "  compute capability    {}.{} (kernels compiled for {})",
                d.compute_capability.0, d.compute_capability.1, d.arch
            );
            println!("  SMs                   {}", d.sm_count);
            println!(
                "  memory                {} total, {} free",
                d.total_mem,
                r.free_mem.map_or("?".into(), |f| f.to_string())
            );
            println!("  L2 cache              {}", d.l2_cache);
            println!(
                "  shared memory         {} per block (opt-in), {} per SM",
                d.max_smem_per_block_optin, d.max_smem_per_sm
            );
            println!(
                "  clocks                SM {} MHz, memory {} MHz x {}-bit bus ({:.0} GB/s datasheet)",
                d.sm_clock_mhz, d.mem_clock_mhz, d.mem_bus_bits, d.theoretical_mem_bw_gbs
            );
        }
    }
    if let Some(c) = &r.compile {
        println!(
            "  NVRTC check           util.cu -> {} cubin in {:.0} ms ({}; cache {})",
            c.arch,
            c.millis,
            if c.from_disk_cache {
                "from disk cache"
            } else {
                "compiled"
            },
            c.cache_dir
                .as_ref()
                .map_or("off".into(), |p| p.display().to_string())
        );
    }
    if let Some(c) = &r.ceilings {
        println!("\nRoofline ceilings (median of runs, CUDA events)");
        println!(
            "  copy bandwidth        {:.0} GB/s  (bytes read + written)",
            c.copy_gbs
        );
        println!(
            "  bf16 GEMM             {:.0} TFLOP/s  (fp32 accumulate)",
            c.gemm_tflops
        );
        println!(
            "  {:<44} {:>9} {:>9} {:>9} {:>10}",
            "measurement", "median", "min", "max", "rate"
        );
        for t in &c.copies {
            println!(
                "  {:<44} {:>6.3} ms {:>6.3} ms {:>6.3} ms {:>7.0} GB/s",
                t.what, t.median_ms, t.min_ms, t.max_ms, t.rate
            );
        }
        for t in &c.gemms {
            println!(
                "  {:<44} {:>6.3} ms {:>6.3} ms {:>6.3} ms {:>5.0} TFLOP/s",
                t.what, t.median_ms, t.min_ms, t.max_ms, t.rate
            );
        }
        let h = &c.host_overhead;
        println!(
            "  host cost per call      GEMM first call {:.0} us (plan), cached {:.1} us; kernel launch {:.1} us",
            h.gemm_plan_build_us, h.gemm_cached_us, h.kernel_launch_us
        );
        println!("\nDense baselines (cuBLASLt, weights from HBM: L2 flushed before each run)");
        println!(
            "  {:<44} {:>9} {:>9} {:>9} {:>9} {:>9}",
            "layer", "median", "p10", "p90", "floor", "of floor"
        );
        for d in &c.dense_reference {
            println!(
                "  {:<44} {:>6.4} ms {:>6.4} ms {:>6.4} ms {:>6.4} ms {:>8.0}%",
                d.what,
                d.median_ms,
                d.p10_ms,
                d.p90_ms,
                d.floor_ms,
                100.0 * d.floor_ms / d.median_ms
            );
        }
    }
    if let Some(checks) = &r.self_test {
        let passed = checks.iter().filter(|c| c.passed).count();
        println!("\nSelf-test: {passed}/{} passed", checks.len());
        for c in checks {
            println!(
                "  {} {:<58} {}",
                if c.passed { "ok  " } else { "FAIL" },
                c.name,
                c.detail
            );
        }
    }
    if let Some(m) = &r.memory {
        println!(
            "\nblr device memory: peak {}, cap {}",
            m.peak,
            m.cap
                .map_or("none (--max-gpu-mem)".into(), |c| c.to_string())
        );
    }
    if !r.problems.is_empty() {
        println!("\nProblems");
        for p in &r.problems {
            println!("  - {p}");
        }
        if r.device.is_none() {
            println!("  (GPU commands are unavailable; every CPU command still works.)");
        }
    }
}
