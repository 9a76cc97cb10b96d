//! Header discovery order: `BLR_CUDA_INCLUDE` wins when it holds `cuda_bf16.h`, and is skipped
//! (not trusted blindly) when it does not. Its own test binary, because it sets environment
//! variables, which would race with other tests in the same process.

use std::path::PathBuf;

#[test]
fn blr_cuda_include_is_first_but_must_hold_the_header() {
    let base = std::env::temp_dir().join(format!("blr-discovery-{}", std::process::id()));
    let with = base.join("with");
    let without = base.join("without");
    let made = std::fs::create_dir_all(&with)
        .and_then(|()| std::fs::create_dir_all(&without))
        .and_then(|()| std::fs::write(with.join("cuda_bf16.h"), "// test header\n"));
    assert!(made.is_ok(), "cannot create temp dirs: {made:?}");

    std::env::set_var("BLR_CUDA_INCLUDE", &with);
    let candidates = blr_cuda::libs::include_dir_candidates();
    assert_eq!(candidates.first(), Some(&with));
    assert_eq!(blr_cuda::libs::cuda_include_dir().ok(), Some(with.clone()));

    std::env::set_var("BLR_CUDA_INCLUDE", &without);
    let found: Option<PathBuf> = blr_cuda::libs::cuda_include_dir().ok();
    assert_ne!(found.as_ref(), Some(&without));
    if let Err(e) = blr_cuda::libs::cuda_include_dir() {
        let msg = e.to_string();
        assert!(
            msg.contains("without") && msg.contains("BLR_CUDA_INCLUDE"),
            "{msg}"
        );
    }
    std::env::remove_var("BLR_CUDA_INCLUDE");
    let _ = std::fs::remove_dir_all(&base);
}
