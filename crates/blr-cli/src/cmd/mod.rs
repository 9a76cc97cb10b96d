//! One module per subcommand.
pub mod agree;
pub mod bench;
pub mod compress;
pub mod cost;
pub mod doctor;
pub mod e2e;
pub mod eval;
pub mod factorize;
pub mod generate;
pub mod info;
pub mod init_layer;
pub mod layer_args;
pub mod parity;
pub mod quickstart;
pub mod roofline;

/// Opens the CUDA backend for `--device cuda`, under the `--max-gpu-mem` cap.
pub fn open_cuda(max_gpu_mem: Option<blr_cuda::Bytes>) -> anyhow::Result<blr_models::cuda::Cuda> {
    use anyhow::Context;
    blr_models::cuda::Cuda::new(blr_cuda::GpuOptions {
        max_mem: max_gpu_mem,
        ..Default::default()
    })
    .context("--device cuda: opening the CUDA backend")
}
