//! CI check: the CUDA model backend's kernels (crates/blr-models/src/cuda/*.cu) compile with
//! NVRTC to a cubin for every supported arch (sm_80, sm_86, sm_87, sm_89, sm_90a), exactly as
//! `blr_cuda`'s own `nvrtc_compile` test does for the files under crates/blr-cuda/src (which
//! does not see these). Needs NVRTC and the CUDA headers, not a GPU: on CI they come from the
//! pip wheels of `scripts/setup-cuda-wheels.sh`.
//!
//! Without them the test prints a SKIP line and passes when run by hand, but FAILS when `CI`
//! is set, so CI can never skip it silently.

use blr_cuda::compile::{compile_uncached, parse_ptxas_report, CompileOptions};
use blr_cuda::{libs, SUPPORTED_ARCHS};
use blr_models::cuda::SOURCES;

#[test]
fn cuda_backend_kernels_compile_for_every_supported_arch() {
    if let Err(problem) = libs::ensure_nvrtc().and_then(|()| libs::cuda_include_dir().map(|_| ())) {
        let ci = std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false");
        assert!(
            !ci,
            "FAIL: CI=true but NVRTC / CUDA headers are missing: {problem}; \
             CI must run scripts/setup-cuda-wheels.sh first"
        );
        println!(
            "SKIP cuda_backend_kernels_compile_for_every_supported_arch: NVRTC or CUDA headers \
             not found ({problem}). Run scripts/setup-cuda-wheels.sh to enable this check."
        );
        return;
    }
    let opts = CompileOptions::new(["--ptxas-options=-v".to_string()]);
    let mut failures = Vec::new();
    for src in SOURCES {
        let mut row = format!("  {:<18}", src.name);
        for arch in SUPPORTED_ARCHS {
            match compile_uncached(src.name, src.code, arch, &opts) {
                Ok(cubin) if !cubin.image.is_empty() => {
                    row.push_str(&format!(" {}:ok", arch.sm_name()));
                    for k in parse_ptxas_report(&cubin.log) {
                        if k.spill_stores + k.spill_loads > 0 {
                            println!(
                                "  WARNING spills: {} {} on {}: {} B stores, {} B loads",
                                src.name, k.name, k.arch, k.spill_stores, k.spill_loads
                            );
                        }
                        if k.arch == "sm_90a" {
                            println!(
                                "    {:<24} {:>4} regs {:>7} B smem",
                                k.name, k.registers, k.smem
                            );
                        }
                    }
                }
                Ok(_) => failures.push(format!("{} for {arch}: empty cubin", src.name)),
                Err(e) => {
                    row.push_str(&format!(" {}:FAIL", arch.sm_name()));
                    failures.push(format!("{} for {arch}: {e}", src.name));
                }
            }
        }
        println!("{row}");
    }
    assert!(
        failures.is_empty(),
        "NVRTC failures:\n{}",
        failures.join("\n\n")
    );
}
