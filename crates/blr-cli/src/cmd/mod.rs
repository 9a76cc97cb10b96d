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

/// Test fixture: a fresh temp folder `<tag>-<pid>` holding a tiny random Llama GGUF (`seed`)
/// and a WikiText-like text of `repeats` short paragraphs; returns (folder, model, text).
#[cfg(test)]
pub(crate) fn tiny_model_and_text(
    tag: &str,
    seed: u64,
    repeats: usize,
) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let model = dir.join("tiny.gguf");
    std::fs::write(
        &model,
        blr_models::testing::tiny_llama_gguf(seed, &["t h", "th e", "Ġ the"]).unwrap(),
    )
    .unwrap();
    let text = dir.join("text.txt");
    std::fs::write(
        &text,
        " = Heading = \n The cat sat on the mat . The dog 's 42 bones @-@ gone .\n".repeat(repeats),
    )
    .unwrap();
    (dir, model, text)
}
