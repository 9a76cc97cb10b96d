//! CI check: every `.cu` file under `crates/blr-cuda/src` compiles with NVRTC to a cubin for
//! every supported arch (sm_80, sm_86, sm_87, sm_89, sm_90a). Needs NVRTC and the CUDA headers,
//! not a GPU: on the CPU-only CI machine they come from the pip wheels that
//! `scripts/setup-cuda-wheels.sh` installs into `.venv-cuda` (found automatically, or through
//! BLR_NVRTC_LIB_DIR / BLR_CUDA_INCLUDE).
//!
//! Without them the tests print a SKIP line and pass when run by hand, but FAIL when the `CI`
//! environment variable is set (`CI=true`), so CI can never skip them silently.

use std::path::{Path, PathBuf};

use blr_cuda::compile::{
    compile_uncached, nvrtc_version, parse_ptxas_report, Arch, CompileOptions, KernelCache,
};
use blr_cuda::{libs, KernelSource, SUPPORTED_ARCHS};

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && v != "false")
}

/// `Some(())` when NVRTC and headers are usable; `None` (after printing SKIP) when they are
/// not and we are not in CI; panics when they are not and we are in CI.
fn toolchain_or_skip(test: &str) -> Option<()> {
    let problem = match (libs::ensure_nvrtc(), libs::cuda_include_dir()) {
        (Ok(()), Ok(_)) => return Some(()),
        (Err(e), _) | (_, Err(e)) => e.to_string(),
    };
    if in_ci() {
        panic!(
            "{test}: FAIL: CI=true but NVRTC / CUDA headers are missing: {problem}\n\
             CI must run scripts/setup-cuda-wheels.sh first"
        );
    }
    println!(
        "SKIP {test}: NVRTC or CUDA headers not found ({problem}). \
         Run scripts/setup-cuda-wheels.sh to enable this check; in CI (CI=true) it fails instead."
    );
    None
}

fn cu_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    entries.sort();
    for path in entries {
        if path.is_dir() {
            cu_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "cu") {
            out.push(path);
        }
    }
}

#[test]
fn every_kernel_compiles_for_every_supported_arch() {
    if toolchain_or_skip("every_kernel_compiles_for_every_supported_arch").is_none() {
        return;
    }
    let src_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    cu_files(&src_dir, &mut files);
    assert!(
        !files.is_empty(),
        "no .cu files under {} (the glob is broken)",
        src_dir.display()
    );
    let (major, minor) = nvrtc_version().unwrap_or((0, 0));
    println!(
        "NVRTC {major}.{minor}, headers in {}",
        libs::cuda_include_dir()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    );
    let mut failures = Vec::new();
    let mut compiled = 0usize;
    let mut resources = Vec::new();
    for file in &files {
        let rel = file
            .strip_prefix(&src_dir)
            .unwrap_or(file)
            .display()
            .to_string();
        let code = match std::fs::read_to_string(file) {
            Ok(c) => c,
            Err(e) => {
                failures.push(format!("{rel}: cannot read: {e}"));
                continue;
            }
        };
        let mut row = format!("  {rel:<40}");
        // Local headers (`#include "common.cuh"`) resolve from the file's own directory, as
        // they do at run time from the headers embedded with `kernel_source!`.
        let dir = file.parent().unwrap_or(&src_dir);
        // `-v` makes ptxas report registers / shared memory / spills per kernel: printed below,
        // so a register-pressure regression shows in CI without a GPU.
        let opts = CompileOptions::new([
            format!("--include-path={}", dir.display()),
            "--ptxas-options=-v".to_string(),
        ]);
        for arch in SUPPORTED_ARCHS {
            match compile_uncached(&rel, &code, arch, &opts) {
                Ok(cubin) if !cubin.image.is_empty() => {
                    compiled += 1;
                    row.push_str(&format!(
                        " {:>6}:ok {:>6}B",
                        arch.sm_name(),
                        cubin.image.len()
                    ));
                    resources.extend(
                        parse_ptxas_report(&cubin.log)
                            .into_iter()
                            .map(|k| (rel.clone(), k)),
                    );
                }
                Ok(_) => failures.push(format!("{rel} for {arch}: empty cubin")),
                Err(e) => {
                    row.push_str(&format!(" {:>6}:FAIL", arch.sm_name()));
                    failures.push(format!("{rel} for {arch}: {e}"));
                }
            }
        }
        println!("{row}");
    }
    println!("ptxas resources on sm_90a (registers, static smem, stack, spill stores/loads):");
    for (file, k) in resources.iter().filter(|(_, k)| k.arch == "sm_90a") {
        println!(
            "  {:<22} {:<34} {:>4} regs {:>7} B smem {:>5} B stack {:>5}/{:<5} B spill",
            file, k.name, k.registers, k.smem, k.stack_frame, k.spill_stores, k.spill_loads
        );
    }
    for (file, k) in resources
        .iter()
        .filter(|(_, k)| k.spill_stores + k.spill_loads > 0)
    {
        println!(
            "  WARNING spills: {file} {} on {}: {} B stores, {} B loads",
            k.name, k.arch, k.spill_stores, k.spill_loads
        );
    }
    let archs: Vec<String> = SUPPORTED_ARCHS.iter().map(Arch::sm_name).collect();
    println!(
        "compiled {compiled} of {} (kernel file, arch) pairs: {} .cu files x [{}]",
        files.len() * SUPPORTED_ARCHS.len(),
        files.len(),
        archs.join(", ")
    );
    assert!(
        failures.is_empty(),
        "NVRTC failures:\n{}",
        failures.join("\n\n")
    );
}

#[test]
fn compile_error_reports_nvrtc_log_with_line() {
    if toolchain_or_skip("compile_error_reports_nvrtc_log_with_line").is_none() {
        return;
    }
    let code = "#include <cuda_bf16.h>\nextern \"C\" __global__ void k(float* y) {\n  y[0] = undefined_name;\n}\n";
    let err = compile_uncached(
        "broken.cu",
        code,
        SUPPORTED_ARCHS[0],
        &CompileOptions::default(),
    )
    .err()
    .map(|e| e.to_string())
    .unwrap_or_default();
    assert!(err.contains("broken.cu"), "no file name in: {err}");
    assert!(err.contains("undefined_name"), "NVRTC log missing: {err}");
    assert!(err.contains("(3)"), "no line number in: {err}");
}

#[test]
fn disk_cache_hits_on_second_compile_and_misses_on_change() {
    if toolchain_or_skip("disk_cache_hits_on_second_compile_and_misses_on_change").is_none() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("blr-kcache-{}-{}", std::process::id(), line!()));
    let cache = KernelCache::at(&dir);
    let src = KernelSource {
        name: "cache_probe.cu",
        code: "#include \"probe.cuh\"\nextern \"C\" __global__ void probe(float* y, float a) { y[threadIdx.x] *= SCALE * a; }\n",
        headers: &[("probe.cuh", "#define SCALE 2.0f\n")],
    };
    let arch = SUPPORTED_ARCHS[4];
    let first = cache.compile(&src, arch, &CompileOptions::default());
    let second = cache.compile(&src, arch, &CompileOptions::default());
    let other_opts = cache.compile(&src, arch, &CompileOptions::new(["-DBLR_PROBE=1"]));
    let other_arch = cache.compile(&src, SUPPORTED_ARCHS[0], &CompileOptions::default());
    let _ = std::fs::remove_dir_all(&dir);
    let (first, second) = (
        first.map_err(|e| e.to_string()),
        second.map_err(|e| e.to_string()),
    );
    let (Ok(first), Ok(second)) = (first, second) else {
        panic!("compile failed");
    };
    assert!(!first.from_cache, "first compile claims a cache hit");
    assert!(second.from_cache, "second compile missed the cache");
    assert_eq!(first.image, second.image);
    assert!(
        other_opts.is_ok_and(|c| !c.from_cache),
        "new options must not hit the cache"
    );
    assert!(
        other_arch.is_ok_and(|c| !c.from_cache),
        "new arch must not hit the cache"
    );
}

#[test]
fn kernel_source_macro_embeds_headers_for_nvrtc() {
    if toolchain_or_skip("kernel_source_macro_embeds_headers_for_nvrtc").is_none() {
        return;
    }
    const PROBE: KernelSource =
        blr_cuda::kernel_source!("data/probe.cu", headers: ["data/probe.cuh"]);
    assert_eq!(PROBE.headers.len(), 1);
    let compiled = KernelCache::disabled()
        .compile(&PROBE, SUPPORTED_ARCHS[3], &CompileOptions::default())
        .map_err(|e| e.to_string());
    assert!(compiled.is_ok(), "{compiled:?}");
    // Without the header the same source must fail, naming the missing include.
    let bare = KernelSource {
        headers: &[],
        ..PROBE
    };
    let err = KernelCache::disabled()
        .compile(&bare, SUPPORTED_ARCHS[3], &CompileOptions::default())
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
    assert!(err.contains("probe.cuh"), "{err}");
}
