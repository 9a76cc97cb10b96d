//! `blr parity`: the backend parity suite (blr_models::parity) on a device, from the binary, so
//! it runs on a GPU machine that has no Rust toolchain. Every op at odd shapes and every model
//! (Llama, GPT-2, ViT, DiT) on random weights, against the f32 CPU reference.

use anyhow::{bail, Context};
use blr_models::cpu::Cpu;
use blr_models::cuda::Cuda;
use blr_models::parity::{check_models, check_ops, check_sampling, Check};

use crate::cmd::doctor::GpuArgs;

#[derive(clap::Args)]
#[command(after_long_help = "\
Runs each backend op (norms, RoPE, activations, residual ops, slices, embedding, linear layers \
in every format, attention with and without a KV cache) and each model on fresh random inputs \
on the chosen backend and on the CPU reference, and prints the relative error \
||out - ref|| / ||ref|| of each. bf16 on the GPU is expected around 1e-3..1e-2; NaN never \
passes. Exits non-zero if any check is over --tol.\n\n\
Examples:\n  blr parity --backend cuda\n  blr parity --backend cuda --json > parity.json")]
pub struct Args {
    /// Backend under test: cuda (bf16) or cpu (the reference against itself).
    #[arg(long, default_value = "cuda")]
    backend: String,
    #[command(flatten)]
    gpu: GpuArgs,
    /// Largest relative error that passes.
    #[arg(long, default_value_t = 2e-2)]
    tol: f64,
    /// Seed of the random inputs and weights.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Print the checks as JSON.
    #[arg(long)]
    json: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let (name, checks) = match args.backend.as_str() {
        "cuda" => {
            let b = Cuda::new(args.gpu.options()).context("opening the CUDA backend")?;
            let mut c = check_ops(&b, args.seed, args.tol)?;
            c.extend(check_models(&b, args.seed + 1, args.tol)?);
            c.extend(check_sampling(&b, args.seed + 2)?);
            (blr_models::backend::Backend::name(&b), c)
        }
        "cpu" => {
            let mut c = check_ops(&Cpu, args.seed, args.tol)?;
            c.extend(check_models(&Cpu, args.seed + 1, args.tol)?);
            c.extend(check_sampling(&Cpu, args.seed + 2)?);
            (blr_models::backend::Backend::name(&Cpu), c)
        }
        other => bail!("unknown backend '{other}': expected cuda or cpu"),
    };
    if args.json {
        let out = serde_json::json!({"backend": name, "tol": args.tol, "checks": checks});
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_table(&name, &checks, args.tol);
    }
    let failed: Vec<&Check> = checks.iter().filter(|c| !c.ok).collect();
    if !failed.is_empty() {
        bail!(
            "{} of {} parity checks over {:.0e} (first: {} {})",
            failed.len(),
            checks.len(),
            args.tol,
            failed[0].op,
            failed[0].shape
        );
    }
    Ok(())
}

fn print_table(name: &str, checks: &[Check], tol: f64) {
    println!("parity of {name} against the CPU reference (tol {tol:.0e})");
    let mut t = crate::table::Table::new(&["<op", "<shape", "rel err", "<"]);
    for c in checks {
        t.row(vec![
            c.op.clone(),
            c.shape.clone(),
            format!("{:.2e}", c.rel_err),
            if c.ok { "ok" } else { "FAIL" }.into(),
        ]);
    }
    print!("{}", t.render());
    let worst = checks.iter().map(|c| c.rel_err).fold(0.0f64, f64::max);
    println!(
        "{} checks, {} failed, worst {worst:.2e}",
        checks.len(),
        checks.iter().filter(|c| !c.ok).count()
    );
}
