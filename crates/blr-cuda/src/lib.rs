//! CUDA runtime (cudarc, NVRTC, cuBLASLt) and the BLR layer kernels, compiled at run time for
//! the device's own arch.
//!
//! Nothing CUDA is linked: cudarc loads libcuda, NVRTC and cuBLASLt with `dlopen` on first use,
//! so the `blr` binary runs on a machine with no GPU, and every entry point here first checks
//! that the library it needs is present ([`libs`]), returning [`Error`] instead of panicking.
//!
//! The pieces, in the order a layer uses them:
//! - [`Gpu`] ([`gpu`]): opens a device (context + one stream), reads its [`DeviceInfo`], owns the
//!   memory cap, the module cache and the cuBLASLt plan cache.
//! - [`compile`]: `.cu` source -> NVRTC -> cubin for the device's arch (`sm_80/86/87/89/90a`),
//!   cached on disk by source hash + arch + NVRTC version + options. [`Gpu::load_module`] ->
//!   [`Module::function`] -> [`Kernel`]; launch with [`Gpu::launch`] (typed argument builder,
//!   config checked against the device, error checked after the launch).
//! - [`memory`]: [`DeviceBuffer`] (bf16/f32/...), uploads from `&[f32]` (converted to bf16 with
//!   [`Gpu::upload_bf16`]) and downloads, stream-ordered allocation under the `--max-gpu-mem` cap.
//! - [`gemm`]: dense GEMM through cuBLASLt (bf16 in, fp32 accumulate, bf16/f32 out,
//!   strided-batched, row-major conventions documented there), plans cached per shape.
//! - [`timing`] has [`timing::bench`] (events, warm-up, median/p10/p90, L2 flushed between runs)
//!   and [`timing::bench_graph`] (captured once, replays timed); [`Gpu::capture`] ->
//!   [`Graph::replay`] for CUDA graphs; [`Gpu::time_ms`] / [`Event`] for one-off timings.
//! - [`ceilings`]: the two measured roofline ceilings (copy bandwidth, bf16 GEMM rate).
//! - [`selftest`]: GPU checks against CPU references, run by `blr doctor --self-test`.
//! - [`factorize`]: BLAST factorization on the GPU (the iteration of `blr_compress::blast_report`
//!   in cuBLAS fp32/TF32 with batched Cholesky solves), used by `blr factorize` / `blr compress`
//!   `--device auto|cuda`.
//!
//! Writing a kernel: put `name.cu` next to `name.rs`, embed it with
//! `const SRC: KernelSource = kernel_source!("name.cu");` (local headers:
//! `kernel_source!("name.cu", headers: ["common.cuh"])`, handed to NVRTC in memory, so
//! `#include "common.cuh"` works unchanged), load it once with
//! `gpu.load_module(&SRC, &CompileOptions::default())?`, and launch as [`util`] does. Every
//! `.cu` under `src/` is compiled for every supported arch by the `nvrtc_compile` test in CI.

pub mod ceilings;
pub mod compile;
pub mod doctor;
pub mod error;
pub mod factorize;
pub mod gemm;
pub mod gpu;
pub mod gram;
mod launch_ex;
pub mod libs;
pub mod memory;
pub mod selftest;
mod tensor_map;
pub mod timing;
pub mod util;

// --- BLR layer kernels -------------------------------------------------------------------
pub mod layers;
// ------------------------------------------------------------------------------------------

pub use compile::{Arch, CompileOptions, KernelCache, KernelSource, SUPPORTED_ARCHS};
pub use cudarc::driver::LaunchConfig;
pub use error::{Error, Result};
pub use gemm::{GemmShape, MatMut, MatRef, WeightLayout};
pub use gpu::{device_count, DeviceInfo, Event, Gpu, GpuOptions, Graph, Kernel, Launch, Module};
pub use half::bf16;
pub use memory::{Bytes, DeviceBuffer, Element, MemUsage};
