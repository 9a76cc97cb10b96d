//! The backend parity suite on the CUDA backend: every op at odd shapes and every model on
//! random weights against the CPU reference. Needs a GPU: without one (CI) it prints why and
//! passes. On a GPU machine without Rust, run the same suite as `blr parity --backend cuda`.

use blr_models::cuda::Cuda;
use blr_models::parity::{check_models, check_ops, check_sampling};

/// bf16 storage with fp32 accumulation: ~1e-3..1e-2 relative error (BRIEF section 6).
const TOL: f64 = 2e-2;

#[test]
fn cuda_backend_matches_cpu_reference() {
    let cuda = match Cuda::open_default() {
        Ok(c) => c,
        Err(e) => {
            println!("SKIP cuda_backend_matches_cpu_reference: no usable GPU ({e})");
            return;
        }
    };
    let mut checks = check_ops(&cuda, 11, TOL).expect("ops suite ran");
    checks.extend(check_models(&cuda, 12, TOL).expect("models suite ran"));
    checks.extend(check_sampling(&cuda, 13).expect("sampling suite ran"));
    for c in &checks {
        println!("{:<28} {:<48} {:.2e}", c.op, c.shape, c.rel_err);
    }
    let failed: Vec<_> = checks.iter().filter(|c| !c.ok).collect();
    assert!(failed.is_empty(), "over {TOL}: {failed:#?}");
}
