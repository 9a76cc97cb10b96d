//! Finding the CUDA libraries and headers at run time.
//!
//! cudarc is built with `dynamic-loading`: nothing CUDA is linked, so `blr` starts on any
//! machine. cudarc `dlopen`s each library by bare name (`libnvrtc.so.13`, `libcuda.so.1`, ...)
//! the first time one of its functions is called, and *panics* if it is missing. So every entry
//! point of this crate first calls one of the `ensure_*` functions below, which turn absence
//! into an [`Error`] that says what to install.
//!
//! Libraries outside the loader's search path (NVRTC from the `nvidia-cuda-nvrtc` pip wheel in
//! CI, a toolkit under `$CUDA_PATH`) are made visible by loading them once by full path and
//! keeping them loaded: glibc's `dlopen("libnvrtc.so.13")` returns an already-loaded object whose
//! SONAME matches, so cudarc's later lookup by bare name finds ours. (Setting LD_LIBRARY_PATH
//! from inside the process would not work: glibc reads it once at start-up.)
//!
//! Search order, for NVRTC: `$BLR_NVRTC_LIB_DIR`, the loader's own path, the pip wheels in a
//! `.venv-cuda` (`$BLR_CUDA_VENV`, or in the current directory or any parent), `$CUDA_PATH/lib64`,
//! `/usr/local/cuda/lib64`. For the headers (NVRTC has no built-in `cuda_bf16.h`):
//! `$BLR_CUDA_INCLUDE`, the wheels' `nvidia/cu13/include`, `$CUDA_PATH/include`,
//! `/usr/local/cuda/include`.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};

use crate::error::{Error, Result};

/// Libraries loaded by full path and kept loaded for the life of the process (see module docs).
static PRELOADED: Mutex<Vec<libloading::Library>> = Mutex::new(Vec::new());

/// What `blr doctor` prints about each library.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LibraryReport {
    pub driver: bool,
    pub nvrtc: bool,
    pub cublaslt: bool,
    pub cublas: bool,
    /// Where the headers for NVRTC were found, if anywhere.
    pub cuda_include: Option<PathBuf>,
}

/// Checks every library without panicking. Loads NVRTC/cuBLASLt from the discovered
/// directories as a side effect, so a later `ensure_*` is cheap.
pub fn report() -> LibraryReport {
    LibraryReport {
        driver: ensure_driver().is_ok(),
        nvrtc: ensure_nvrtc().is_ok(),
        cublaslt: ensure_cublaslt().is_ok(),
        cublas: ensure_cublas().is_ok(),
        cuda_include: cuda_include_dir().ok(),
    }
}

/// The NVIDIA driver (libcuda) can be loaded.
pub fn ensure_driver() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    // SAFETY: only dlopens/dlcloses the library by name; no symbol is called.
    let present = *PRESENT.get_or_init(|| unsafe { cudarc::driver::sys::is_culib_present() });
    if present {
        Ok(())
    } else {
        Err(Error::DriverNotFound)
    }
}

/// NVRTC (run-time compiler) can be loaded; tries the directories of the module docs.
pub fn ensure_nvrtc() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        ensure_loaded(
            &["libnvrtc-builtins.so.13.0", "libnvrtc.so.13"],
            // SAFETY: only dlopens/dlcloses the library by name.
            || unsafe { cudarc::nvrtc::sys::is_culib_present() },
            &nvrtc_lib_dirs(),
            std::env::var_os("BLR_NVRTC_LIB_DIR").is_some(),
        )
    });
    if present {
        Ok(())
    } else {
        Err(Error::LibraryNotFound {
            library: "NVRTC",
            candidates: "libnvrtc.so.13".into(),
            hint: format!(
                "blr compiles its kernels at run time with NVRTC, which ships with the CUDA toolkit \
                 (not the driver). Install cuda-nvrtc 13.x, set BLR_NVRTC_LIB_DIR to the directory \
                 holding libnvrtc.so.13, or run scripts/setup-cuda-wheels.sh. Searched: {}",
                display_dirs(&nvrtc_lib_dirs())
            ),
        })
    }
}

/// cuBLASLt can be loaded.
pub fn ensure_cublaslt() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        ensure_loaded(
            &["libcublasLt.so.13"],
            // SAFETY: only dlopens/dlcloses the library by name.
            || unsafe { cudarc::cublaslt::sys::is_culib_present() },
            &toolkit_lib_dirs(),
            false,
        )
    });
    if present {
        Ok(())
    } else {
        Err(Error::LibraryNotFound {
            library: "cuBLASLt",
            candidates: "libcublasLt.so.13".into(),
            hint: format!(
                "dense GEMMs run through cuBLASLt, part of the CUDA toolkit (package libcublas 13.x). \
                 Searched the loader path and {}",
                display_dirs(&toolkit_lib_dirs())
            ),
        })
    }
}

/// cuBLAS (only used for its version number in `blr doctor`) can be loaded.
pub fn ensure_cublas() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        ensure_loaded(
            &["libcublas.so.13"],
            // SAFETY: only dlopens/dlcloses the library by name.
            || unsafe { cudarc::cublas::sys::is_culib_present() },
            &toolkit_lib_dirs(),
            false,
        )
    });
    if present {
        Ok(())
    } else {
        Err(Error::LibraryNotFound {
            library: "cuBLAS",
            candidates: "libcublas.so.13".into(),
            hint: "install libcublas 13.x from the CUDA toolkit".into(),
        })
    }
}

/// cuSOLVER (the GPU SVD's eigensolver) can be loaded, with the libraries it links against.
pub fn ensure_cusolver() -> Result<()> {
    static PRESENT: OnceLock<bool> = OnceLock::new();
    let present = *PRESENT.get_or_init(|| {
        ensure_cublas().is_ok()
            && ensure_loaded(
                &[
                    "libcublasLt.so.13",
                    "libnvJitLink.so.13",
                    "libcusparse.so.12",
                    "libcusolver.so.12",
                ],
                // SAFETY: only dlopens/dlcloses the library by name.
                || unsafe { cudarc::cusolver::sys::is_culib_present() },
                &toolkit_lib_dirs(),
                false,
            )
    });
    if present {
        Ok(())
    } else {
        Err(Error::LibraryNotFound {
            library: "cuSOLVER",
            candidates: "libcusolver.so.12".into(),
            hint: "the GPU SVD needs libcusolver 12.x from the CUDA 13 toolkit (with libcusparse \
                   and libnvJitLink); use --device cpu without it"
                .into(),
        })
    }
}

/// Loads `files` (in order, dependencies first) from the first directory holding the last of
/// them, before (`explicit`) or after asking the loader for the bare name.
fn ensure_loaded(
    files: &[&str],
    present_by_name: impl Fn() -> bool,
    dirs: &[PathBuf],
    explicit: bool,
) -> bool {
    if !explicit && present_by_name() {
        return true;
    }
    let Some(main) = files.last() else {
        return present_by_name();
    };
    for dir in dirs {
        if !dir.join(main).is_file() {
            continue;
        }
        let mut loaded = Vec::new();
        for file in files {
            let path = dir.join(file);
            if !path.is_file() {
                continue;
            }
            // SAFETY: loading a CUDA library runs only its initialisers, which have no
            // preconditions; the handle is kept alive for the rest of the process.
            match unsafe { libloading::Library::new(&path) } {
                Ok(lib) => loaded.push(lib),
                Err(_) => break,
            }
        }
        if loaded.len() == files.iter().filter(|f| dir.join(f).is_file()).count() {
            if let Ok(mut keep) = PRELOADED.lock() {
                keep.extend(loaded);
            }
            if present_by_name() {
                return true;
            }
        }
    }
    present_by_name()
}

/// Directories to look for NVRTC in, in order (see module docs).
pub fn nvrtc_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("BLR_NVRTC_LIB_DIR") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.extend(wheel_dirs("lib"));
    dirs.extend(toolkit_lib_dirs());
    dirs
}

fn toolkit_lib_dirs() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(PathBuf::from(&root).join("lib64"));
            dirs.push(PathBuf::from(root).join("lib"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.push(PathBuf::from("/usr/local/cuda/targets/x86_64-linux/lib"));
    dirs
}

/// The CUDA include directory to hand NVRTC (`--include-path`): the first candidate that
/// holds `cuda_bf16.h`.
pub fn cuda_include_dir() -> Result<PathBuf> {
    let candidates = include_dir_candidates();
    candidates
        .iter()
        .find(|dir| dir.join("cuda_bf16.h").is_file())
        .cloned()
        .ok_or_else(|| Error::HeadersNotFound {
            searched: display_dirs(&candidates),
        })
}

/// Include directories in search order (see module docs).
pub fn include_dir_candidates() -> Vec<PathBuf> {
    let mut dirs = Vec::new();
    if let Some(dir) = std::env::var_os("BLR_CUDA_INCLUDE") {
        dirs.push(PathBuf::from(dir));
    }
    dirs.extend(wheel_dirs("include"));
    for var in ["CUDA_PATH", "CUDA_HOME"] {
        if let Some(root) = std::env::var_os(var) {
            dirs.push(PathBuf::from(root).join("include"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/include"));
    dirs
}

/// `<venv>/lib/python3.*/site-packages/nvidia/cu13/<leaf>` for each `.venv-cuda` found: the
/// layout `pip install nvidia-cuda-nvrtc==13.0.*` produces.
fn wheel_dirs(leaf: &str) -> Vec<PathBuf> {
    let mut venvs = Vec::new();
    if let Some(v) = std::env::var_os("BLR_CUDA_VENV") {
        venvs.push(PathBuf::from(v));
    }
    if let Ok(cwd) = std::env::current_dir() {
        venvs.extend(cwd.ancestors().map(|d| d.join(".venv-cuda")));
    }
    let mut out = Vec::new();
    for venv in venvs {
        let Ok(entries) = std::fs::read_dir(venv.join("lib")) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with("python3"))
            })
            .collect();
        pythons.sort();
        for py in pythons {
            let dir = py.join("site-packages/nvidia/cu13").join(leaf);
            if dir.is_dir() {
                out.push(dir);
            }
        }
    }
    out
}

fn display_dirs(dirs: &[PathBuf]) -> String {
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
