//! The one error type of this crate. Every variant says what went wrong, on which
//! library/kernel/buffer/shape, and what the user can do about it.

use std::path::PathBuf;

use cudarc::cublaslt::result::CublasError;
use cudarc::driver::DriverError;
use cudarc::nvrtc::result::NvrtcError;

/// Result alias used across blr-cuda.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything the CUDA runtime layer can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// libcuda could not be loaded: no NVIDIA driver on this machine.
    #[error(
        "no NVIDIA driver found (could not load libcuda.so.1 / libcuda.so): GPU commands are unavailable \
         on this machine; every CPU command still works. Install the NVIDIA driver (R580 or newer for \
         CUDA 13) or run on a machine with an NVIDIA GPU"
    )]
    DriverNotFound,

    /// The driver is there but shows no device (no GPU, or CUDA_VISIBLE_DEVICES hides them).
    #[error(
        "the NVIDIA driver is installed but reports no CUDA device (check `nvidia-smi` and \
         CUDA_VISIBLE_DEVICES); CPU commands still work"
    )]
    NoDevice,

    /// `--device N` past the number of visible devices.
    #[error("CUDA device {ordinal} does not exist: the driver reports {count} device(s) (valid: 0..{count})")]
    DeviceOutOfRange { ordinal: usize, count: usize },

    /// The device is older than Ampere.
    #[error(
        "device '{name}' has compute capability {major}.{minor}; blr's kernels need sm_80 or newer \
         (A100, RTX 30xx/40xx, Jetson Orin, H100, ...)"
    )]
    UnsupportedDevice {
        name: String,
        major: i32,
        minor: i32,
    },

    /// A CUDA library other than the driver could not be loaded.
    #[error("could not load the {library} library ({candidates}); {hint}")]
    LibraryNotFound {
        library: &'static str,
        candidates: String,
        hint: String,
    },

    /// A driver API call failed.
    #[error("CUDA driver call failed while {during}: {source}")]
    Driver {
        during: String,
        #[source]
        source: DriverError,
    },

    /// An NVRTC API call (other than the compilation itself) failed.
    #[error("NVRTC call failed while {during}: {source}")]
    Nvrtc {
        during: String,
        #[source]
        source: NvrtcError,
    },

    /// NVRTC rejected a kernel source: the log is NVRTC's own, with file:line of each error.
    #[error("NVRTC could not compile kernel source '{kernel}' for {arch}:\n{log}")]
    Compile {
        kernel: String,
        arch: String,
        log: String,
    },

    /// cuda_bf16.h and friends were not found: NVRTC has no built-in copy of them.
    #[error(
        "CUDA headers (cuda_bf16.h) not found; searched: {searched}. Set BLR_CUDA_INCLUDE to a CUDA \
         include dir (e.g. /usr/local/cuda/include), or run scripts/setup-cuda-wheels.sh"
    )]
    HeadersNotFound { searched: String },

    /// A kernel name not present in its compiled module.
    #[error("kernel '{function}' not found in module '{module}' (is it declared extern \"C\" __global__?): {source}")]
    FunctionNotFound {
        module: String,
        function: String,
        #[source]
        source: DriverError,
    },

    /// A cuBLAS / cuBLASLt call failed.
    #[error("cuBLASLt call failed while {during}: {source}")]
    Cublas {
        during: String,
        #[source]
        source: CublasError,
    },

    /// Another CUDA library call failed (status printed as the library names it).
    #[error("CUDA library call failed while {during}: {status}")]
    LibraryCall { during: String, status: String },

    /// No cuBLASLt algorithm exists for the requested GEMM.
    #[error("cuBLASLt has no algorithm for {gemm}; try another shape or alignment")]
    NoGemmAlgorithm { gemm: String },

    /// Bytes requested would exceed the configured device memory cap.
    #[error(
        "GPU memory cap exceeded: allocating {requested} for {what} would raise blr's device memory \
         from {in_use} to {would_be}, over the cap of {cap} (set by --max-gpu-mem / BLR_MAX_GPU_MEM). \
         Raise the cap, or reduce the batch/sequence length"
    )]
    MemoryCap {
        what: String,
        requested: crate::memory::Bytes,
        in_use: crate::memory::Bytes,
        would_be: crate::memory::Bytes,
        cap: crate::memory::Bytes,
    },

    /// A size string such as `8GiB` that does not parse.
    #[error("cannot read '{text}' as a memory size: write a number with an optional unit, e.g. 8GiB, 512MiB, 2GB, 1.5G or 1073741824")]
    InvalidSize { text: String },

    /// Inconsistent shapes, strides or buffer lengths given to a GEMM, copy or launch.
    #[error("{0}")]
    Shape(String),

    /// A GPU result that disagrees with its CPU reference (self-tests, benchmark checks).
    #[error("wrong result: {0}")]
    Mismatch(String),

    /// An invalid launch configuration, found before calling the driver.
    #[error("bad launch configuration for kernel '{kernel}': {reason}")]
    LaunchConfig { kernel: String, reason: String },

    /// The driver refused a kernel launch or the kernel faulted while running.
    #[error("kernel '{kernel}' failed: {source} (run with BLR_CUDA_SYNC=1 to check after each launch, or under compute-sanitizer)")]
    Launch {
        kernel: String,
        #[source]
        source: DriverError,
    },

    /// Stream capture could not produce a graph.
    #[error("CUDA graph capture failed while {during}: {reason}")]
    Graph { during: String, reason: String },

    /// A factorization input the compression library rejected (shape, options, values).
    #[error(transparent)]
    Compress(#[from] blr_compress::CompressError),

    /// A GPU computation that lost its numerical footing (a failed pivot, a non-finite error).
    #[error("{during} failed: {reason}")]
    Numerical { during: String, reason: String },

    /// Reading a kernel source file (CI compile check).
    #[error("cannot read kernel source {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub(crate) fn driver(during: impl Into<String>) -> impl FnOnce(DriverError) -> Error {
        let during = during.into();
        move |source| Error::Driver { during, source }
    }

    pub(crate) fn nvrtc(during: impl Into<String>) -> impl FnOnce(NvrtcError) -> Error {
        let during = during.into();
        move |source| Error::Nvrtc { during, source }
    }

    pub(crate) fn cublas(during: impl Into<String>) -> impl FnOnce(CublasError) -> Error {
        let during = during.into();
        move |source| Error::Cublas { during, source }
    }
}
