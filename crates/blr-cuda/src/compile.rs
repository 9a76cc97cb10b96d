//! Run-time kernel compilation: NVRTC -> cubin for the device's own arch, cached on disk.
//!
//! Why cubin and not PTX: PTX produced by an NVRTC newer than the driver is rejected at load
//! time (`CUDA_ERROR_UNSUPPORTED_PTX_VERSION`), whereas a cubin for the exact SM is loaded as is
//! and needs no JIT at start-up. Why the device's own arch: `wgmma`/`setmaxnreg` exist only on
//! `sm_90a`, and an `sm_80` cubin would run on Hopper without them.
//!
//! Cache: `<cache dir>/<stem>-<arch>-<key hash>.cubin`, where the key covers the full source
//! text, the arch, the NVRTC version and every compile option (include dir too). The key text
//! is stored in the file and compared on read, so a stale or colliding file is recompiled,
//! never loaded. The cache dir is `$BLR_KERNEL_CACHE` (`off` disables it),
//! else `$XDG_CACHE_HOME/blr/kernels`, else `~/.cache/blr/kernels`, else the temp dir.

use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};

use cudarc::nvrtc::result as nvrtc;
use cudarc::nvrtc::sys as nvrtc_sys;

use crate::error::{Error, Result};
use crate::libs;

/// A kernel source file, embedded in the binary with [`kernel_source!`](crate::kernel_source).
#[derive(Debug, Clone, Copy)]
pub struct KernelSource {
    /// File name, e.g. `fill.cu`: shown in NVRTC's error log and used as the cache file stem.
    pub name: &'static str,
    /// The CUDA C++ source text.
    pub code: &'static str,
    /// Headers the source `#include "..."`s, as `(path, contents)`, handed to NVRTC in memory
    /// (the binary carries no source tree) under their file name (the part after the last
    /// `/`). Embed with `kernel_source!("gemm.cu", headers: ["common.cuh"])`.
    pub headers: &'static [(&'static str, &'static str)],
}

/// Embeds a `.cu` file (and the local headers it includes) that sit next to the calling Rust
/// file:
///
/// ```ignore
/// const UTIL: KernelSource = kernel_source!("util.cu");
/// const GEMM: KernelSource = kernel_source!("gemm.cu", headers: ["common.cuh"]);
/// ```
#[macro_export]
macro_rules! kernel_source {
    ($file:literal) => {
        $crate::compile::KernelSource {
            name: $file,
            code: include_str!($file),
            headers: &[],
        }
    };
    ($file:literal, headers: [$($header:literal),* $(,)?]) => {
        $crate::compile::KernelSource {
            name: $file,
            code: include_str!($file),
            headers: &[$(($header, include_str!($header))),*],
        }
    };
}

/// A GPU architecture NVRTC can target (`compute capability major.minor`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub struct Arch {
    pub major: u32,
    pub minor: u32,
}

/// The archs blr supports and CI compiles every kernel for: A100 (8.0), RTX 30xx/A40 (8.6),
/// Jetson Orin (8.7), RTX 40xx/L4/L40 (8.9), H100/H200 (9.0, as `sm_90a`).
pub const SUPPORTED_ARCHS: [Arch; 5] = [
    Arch::new(8, 0),
    Arch::new(8, 6),
    Arch::new(8, 7),
    Arch::new(8, 9),
    Arch::new(9, 0),
];

impl Arch {
    pub const fn new(major: u32, minor: u32) -> Self {
        Self { major, minor }
    }

    /// NVRTC's `--gpu-architecture` value. Hopper gets `sm_90a` so kernels may use `wgmma`,
    /// `setmaxnreg` and the other arch-specific instructions; such a cubin runs only on 9.0,
    /// which is exactly the device it is built for.
    pub fn sm_name(&self) -> String {
        if (self.major, self.minor) == (9, 0) {
            "sm_90a".to_string()
        } else {
            format!("sm_{}{}", self.major, self.minor)
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.sm_name())
    }
}

/// Extra NVRTC options for one module, e.g. `-DTILE_M=128`, `--use_fast_math`, `-lineinfo`.
/// `--gpu-architecture`, `--include-path` and `--std=c++17` are always added.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct CompileOptions {
    pub extra: Vec<String>,
}

impl CompileOptions {
    pub fn new<I, S>(extra: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            extra: extra.into_iter().map(Into::into).collect(),
        }
    }
}

/// A compiled kernel image.
#[derive(Debug, Clone)]
pub struct Cubin {
    pub image: Vec<u8>,
    /// NVRTC's log (warnings) for a fresh compile; empty when loaded from the cache.
    pub log: String,
    pub from_cache: bool,
    /// Wall time spent compiling (or reading the cache), in milliseconds.
    pub millis: f64,
}

/// NVRTC's version, e.g. `(13, 0)`.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    libs::ensure_nvrtc()?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC is loaded (checked above); both out-pointers are valid.
    unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
        .result()
        .map_err(Error::nvrtc("reading the NVRTC version"))?;
    Ok((major, minor))
}

/// The archs this NVRTC can emit code for, as `(major, minor)` pairs.
pub fn nvrtc_supported_archs() -> Result<Vec<Arch>> {
    libs::ensure_nvrtc()?;
    let mut count = 0;
    // SAFETY: NVRTC is loaded; out-pointer valid.
    unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut count) }
        .result()
        .map_err(Error::nvrtc("counting NVRTC's supported archs"))?;
    let mut archs = vec![0i32; usize::try_from(count).unwrap_or(0)];
    // SAFETY: `archs` holds `count` ints, as NVRTC requires.
    unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) }
        .result()
        .map_err(Error::nvrtc("listing NVRTC's supported archs"))?;
    Ok(archs
        .into_iter()
        .filter_map(|a| u32::try_from(a).ok())
        .map(|a| Arch::new(a / 10, a % 10))
        .collect())
}

/// Where compiled cubins are kept between runs; `None` = caching disabled.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: Option<PathBuf>,
}

impl KernelCache {
    /// The default location (see module docs).
    pub fn from_env() -> Self {
        let dir = match std::env::var_os("BLR_KERNEL_CACHE") {
            Some(v) if v == "off" || v == "0" || v.is_empty() => None,
            Some(v) => Some(PathBuf::from(v)),
            None => Some(
                std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .map(|c| c.join("blr").join("kernels"))
                    .unwrap_or_else(|| std::env::temp_dir().join("blr-kernels")),
            ),
        };
        Self { dir }
    }

    /// A cache in `dir` (tests use a fresh temp dir).
    pub fn at(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: Some(dir.into()),
        }
    }

    /// No caching: compile every time.
    pub fn disabled() -> Self {
        Self { dir: None }
    }

    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// Compiles `src` for `arch`, or loads the cubin a previous run stored.
    /// A cache that cannot be read or written is skipped silently: it only costs time.
    pub fn compile(&self, src: &KernelSource, arch: Arch, opts: &CompileOptions) -> Result<Cubin> {
        let include = libs::cuda_include_dir()?;
        let version = nvrtc_version()?;
        let args = nvrtc_args(arch, &include, opts);
        let mut hashed = src.code.to_string();
        for (name, text) in src.headers {
            hashed.push_str(&format!("\0{name}\0{text}"));
        }
        let key = format!(
            "blr-cubin v1\nfile={}\narch={}\nnvrtc={}.{}\nargs={}\nsource_fnv128={:032x}\n",
            src.name,
            arch,
            version.0,
            version.1,
            args.join(" "),
            fnv1a_128(hashed.as_bytes())
        );
        let path = self.dir.as_ref().map(|dir| {
            let stem = src.name.trim_end_matches(".cu");
            dir.join(format!(
                "{stem}-{arch}-{:032x}.cubin",
                fnv1a_128(key.as_bytes())
            ))
        });
        let start = std::time::Instant::now();
        if let Some(image) = path.as_deref().and_then(|p| read_cached(p, &key)) {
            return Ok(Cubin {
                image,
                log: String::new(),
                from_cache: true,
                millis: start.elapsed().as_secs_f64() * 1e3,
            });
        }
        let (image, log) =
            compile_with_args(src.name, src.code, src.headers, &arch.sm_name(), &args)?;
        if let Some(p) = path.as_deref() {
            write_cached(p, &key, &image);
        }
        Ok(Cubin {
            image,
            log,
            from_cache: false,
            millis: start.elapsed().as_secs_f64() * 1e3,
        })
    }
}

/// Compiles `code` for `arch` without any cache (the CI check uses this, with
/// `--include-path=<the file's dir>` in `opts` so local headers resolve from disk).
pub fn compile_uncached(
    name: &str,
    code: &str,
    arch: Arch,
    opts: &CompileOptions,
) -> Result<Cubin> {
    let include = libs::cuda_include_dir()?;
    let args = nvrtc_args(arch, &include, opts);
    let start = std::time::Instant::now();
    let (image, log) = compile_with_args(name, code, &[], &arch.sm_name(), &args)?;
    Ok(Cubin {
        image,
        log,
        from_cache: false,
        millis: start.elapsed().as_secs_f64() * 1e3,
    })
}

fn nvrtc_args(arch: Arch, include: &Path, opts: &CompileOptions) -> Vec<String> {
    let mut args = vec![
        format!("--gpu-architecture={}", arch.sm_name()),
        format!("--include-path={}", include.display()),
        "--std=c++17".to_string(),
    ];
    args.extend(opts.extra.iter().cloned());
    args
}

/// Owns an `nvrtcProgram` so that every exit path destroys it.
struct Program(nvrtc_sys::nvrtcProgram);

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: created by nvrtcCreateProgram and destroyed only here.
        let _ = unsafe { nvrtc::destroy_program(self.0) };
    }
}

fn compile_with_args(
    name: &str,
    code: &str,
    headers: &[(&str, &str)],
    arch_name: &str,
    args: &[String],
) -> Result<(Vec<u8>, String)> {
    libs::ensure_nvrtc()?;
    let cstr = |text: &str, what: &str| {
        CString::new(text)
            .map_err(|_| Error::Shape(format!("{what} of {name} contains a NUL byte")))
    };
    let c_code = cstr(code, "the source")?;
    let c_name = cstr(name, "the file name")?;
    // A header embedded from "../common.cuh" is `#include "common.cuh"` in the source: NVRTC
    // matches include names exactly, so register each under its file name.
    let header_names: Vec<CString> = headers
        .iter()
        .map(|(n, _)| cstr(n.rsplit('/').next().unwrap_or(n), "a header name"))
        .collect::<Result<_>>()?;
    let header_texts: Vec<CString> = headers
        .iter()
        .map(|(_, t)| cstr(t, "a header"))
        .collect::<Result<_>>()?;
    let name_ptrs: Vec<*const c_char> = header_names.iter().map(|c| c.as_ptr()).collect();
    let text_ptrs: Vec<*const c_char> = header_texts.iter().map(|c| c.as_ptr()).collect();
    let mut raw_prog: nvrtc_sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: every pointer is to a NUL-terminated string that outlives the program's creation
    // (NVRTC copies them); the header arrays both hold `headers.len()` entries.
    unsafe {
        nvrtc_sys::nvrtcCreateProgram(
            &mut raw_prog,
            c_code.as_ptr(),
            c_name.as_ptr(),
            i32::try_from(headers.len()).unwrap_or(i32::MAX),
            if headers.is_empty() {
                std::ptr::null()
            } else {
                text_ptrs.as_ptr()
            },
            if headers.is_empty() {
                std::ptr::null()
            } else {
                name_ptrs.as_ptr()
            },
        )
    }
    .result()
    .map_err(Error::nvrtc(format!(
        "creating the NVRTC program for {name}"
    )))?;
    let prog = Program(raw_prog);
    // Options may not contain NUL: they come from our own code, but check rather than panic
    // inside cudarc.
    if let Some(bad) = args.iter().find(|a| a.contains('\0')) {
        return Err(Error::Shape(format!(
            "NVRTC option {bad:?} for {name} contains a NUL byte"
        )));
    }
    // SAFETY: `prog` is a live program; options are NUL-free (checked above).
    let compiled = unsafe { nvrtc::compile_program(prog.0, args) };
    // SAFETY: `prog` is live.
    let log = unsafe { nvrtc::get_program_log(prog.0) }
        .map(|raw| c_chars_to_string(&raw))
        .unwrap_or_default();
    match compiled {
        Ok(()) => {}
        Err(e) if e.0 == nvrtc_sys::nvrtcResult::NVRTC_ERROR_COMPILATION => {
            return Err(Error::Compile {
                kernel: name.to_string(),
                arch: arch_name.to_string(),
                log,
            });
        }
        Err(e) => {
            return Err(Error::Compile {
                kernel: name.to_string(),
                arch: arch_name.to_string(),
                log: format!("{e:?} (options: {})\n{log}", args.join(" ")),
            });
        }
    }
    let mut size = 0usize;
    // SAFETY: `prog` compiled successfully; out-pointer valid.
    unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog.0, &mut size) }
        .result()
        .map_err(Error::nvrtc(format!("getting the cubin size of {name}")))?;
    let mut image = vec![0u8; size];
    // SAFETY: `image` holds exactly the size NVRTC reported.
    unsafe { nvrtc_sys::nvrtcGetCUBIN(prog.0, image.as_mut_ptr().cast::<c_char>()) }
        .result()
        .map_err(Error::nvrtc(format!("getting the cubin of {name}")))?;
    if image.is_empty() {
        return Err(Error::Compile {
            kernel: name.to_string(),
            arch: arch_name.to_string(),
            log: format!("NVRTC produced an empty cubin (was a virtual arch given?)\n{log}"),
        });
    }
    Ok((image, log.trim().to_string()))
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// One kernel's resources as ptxas reports them (compile with `--ptxas-options=-v`).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct PtxasKernel {
    pub name: String,
    pub arch: String,
    pub registers: u32,
    /// Static shared memory, bytes.
    pub smem: u32,
    pub stack_frame: u32,
    /// Non-zero spills mean registers ran out (or a run-time-indexed array went to local memory).
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// Parses ptxas' `-v` lines out of an NVRTC log.
pub fn parse_ptxas_report(log: &str) -> Vec<PtxasKernel> {
    // "<n> <unit...>" pairs in a comma-separated ptxas line.
    fn number_before(line: &str, unit: &str) -> Option<u32> {
        line.split(',').find_map(|part| {
            let part = part
                .trim()
                .trim_start_matches("ptxas")
                .trim_start_matches(" info")
                .trim();
            let part = part.trim_start_matches(':').trim_start_matches('.').trim();
            let part = part.strip_prefix("Used ").unwrap_or(part);
            let (num, rest) = part.split_once(' ')?;
            (rest.trim() == unit).then(|| num.parse().ok()).flatten()
        })
    }
    let mut out: Vec<PtxasKernel> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let mut parts = rest.split('\'');
            let name = parts.next().unwrap_or_default().to_string();
            let arch = parts.nth(1).unwrap_or_default().to_string();
            out.push(PtxasKernel {
                name,
                arch,
                ..PtxasKernel::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("bytes stack frame") {
            k.stack_frame = number_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = number_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = number_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains(" registers") {
            k.registers = number_before(line, "registers").unwrap_or(0);
            k.smem = number_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

const CACHE_MAGIC: &[u8] = b"BLRCUBIN";

fn read_cached(path: &Path, key: &str) -> Option<Vec<u8>> {
    let data = std::fs::read(path).ok()?;
    let rest = data.strip_prefix(CACHE_MAGIC)?;
    let (len_bytes, rest) = rest.split_at_checked(8)?;
    let key_len = usize::try_from(u64::from_le_bytes(len_bytes.try_into().ok()?)).ok()?;
    let (stored_key, image) = rest.split_at_checked(key_len)?;
    (stored_key == key.as_bytes() && !image.is_empty()).then(|| image.to_vec())
}

fn write_cached(path: &Path, key: &str, image: &[u8]) {
    let Some(dir) = path.parent() else { return };
    if std::fs::create_dir_all(dir).is_err() {
        return;
    }
    let mut data = Vec::with_capacity(CACHE_MAGIC.len() + 8 + key.len() + image.len());
    data.extend_from_slice(CACHE_MAGIC);
    data.extend_from_slice(&(key.len() as u64).to_le_bytes());
    data.extend_from_slice(key.as_bytes());
    data.extend_from_slice(image);
    // Write-then-rename: a concurrent reader sees the old file or the whole new one.
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    if std::fs::write(&tmp, &data).is_ok() && std::fs::rename(&tmp, path).is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// 128-bit FNV-1a: stable across Rust releases (unlike `DefaultHasher`), no dependency.
pub(crate) fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013B;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sm_names() {
        let names: Vec<String> = SUPPORTED_ARCHS.iter().map(Arch::sm_name).collect();
        assert_eq!(names, ["sm_80", "sm_86", "sm_87", "sm_89", "sm_90a"]);
    }

    #[test]
    fn fnv_differs_on_one_byte() {
        assert_ne!(
            fnv1a_128(b"__global__ void k(){}"),
            fnv1a_128(b"__global__ void k(){ }")
        );
        assert_eq!(fnv1a_128(b""), 0x6c62272e07bb014262b821756295c58d);
    }

    #[test]
    fn parses_ptxas_verbose_log() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'k_a' for 'sm_90a'\n\
ptxas info    : Function properties for k_a\n\
ptxas         .     8 bytes stack frame, 12 bytes spill stores, 16 bytes spill loads\n\
ptxas info    : Used 168 registers, used 1 barriers, 49152 bytes smem, 400 bytes cmem[0]\n\
ptxas info    : Compiling entry function 'k_b' for 'sm_80'\n\
ptxas info    : Function properties for k_b\n\
ptxas         .     0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n\
ptxas info    : Used 12 registers, used 0 barriers\n";
        let r = parse_ptxas_report(log);
        assert_eq!(r.len(), 2);
        assert_eq!(
            (
                r[0].name.as_str(),
                r[0].arch.as_str(),
                r[0].registers,
                r[0].smem
            ),
            ("k_a", "sm_90a", 168, 49152)
        );
        assert_eq!(
            (r[0].stack_frame, r[0].spill_stores, r[0].spill_loads),
            (8, 12, 16)
        );
        assert_eq!(
            (
                r[1].name.as_str(),
                r[1].registers,
                r[1].smem,
                r[1].spill_loads
            ),
            ("k_b", 12, 0, 0)
        );
    }

    #[test]
    fn cache_roundtrip_rejects_other_key() {
        let dir = std::env::temp_dir().join(format!("blr-cache-test-{}", std::process::id()));
        let path = dir.join("k-sm_80-0.cubin");
        let image: Vec<u8> = (0..977u32).map(|i| (i * 7 + 3) as u8).collect();
        write_cached(&path, "key-a", &image);
        assert_eq!(read_cached(&path, "key-a").as_deref(), Some(&image[..]));
        assert!(read_cached(&path, "key-b").is_none());
        std::fs::write(&path, b"BLRCUBIN\xff").ok();
        assert!(read_cached(&path, "key-a").is_none());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
