//! `blr`: compress transformer models into block-low-rank form and run them fast.
//!
//! Each subcommand lives in its own module under `cmd/` with a clap `Args` struct and a
//! `run(args) -> anyhow::Result<()>` function; this file only dispatches.

mod cmd;
mod compress;
mod table;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "blr",
    version,
    about = "Compress transformers into block-low-rank form (low-rank, Monarch, BLAST) and run them fast",
    long_about = "blr compresses the linear layers of transformer models (Llama-family, GPT-2, ViT, DiT) \
into block-low-rank (BLR) forms -- low-rank, Monarch and BLAST -- checks their accuracy and runs them \
on NVIDIA GPUs (sm_80..sm_90) or the CPU.\n\n\
Formats, for a layer y = W x with W of shape (m, n):\n  \
dense    W                                   params m*n\n  \
lowrank  W = U V, U (m,r), V (r,n)           params r(m+n)\n  \
monarch  b x b blocks of rank R/b            params R(m+n)\n  \
blast    W_ij = U_i diag(s_ij) V_j^T         params r(m+n+b_out*b_in)\n\n\
Start with `blr cost --help` to see what a format costs, or `blr init-layer` + `blr info` to look at a checkpoint."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Each variant's help (short and long) comes from its Args struct's doc comment (a doc
// comment on the variant would replace the command's long help); only commands whose Args
// carry no doc of their own are described here.
enum Command {
    Quickstart(cmd::quickstart::Args),
    Compress(cmd::compress::Args),
    Info(cmd::info::Args),
    Cost(cmd::cost::Args),
    InitLayer(cmd::init_layer::Args),
    /// Check the CUDA setup (libraries, device) and measure the GPU's roofline ceilings.
    Doctor(cmd::doctor::Args),
    Generate(cmd::generate::Args),
    Eval(cmd::eval::Args),
    Factorize(cmd::factorize::Args),
    /// Benchmark BLR layers on the GPU (`blr bench layer`) against dense cuBLAS and the roofline.
    Bench(cmd::bench::Args),
    /// Check a model backend (cuda) against the CPU reference: every op and model, odd shapes.
    Parity(cmd::parity::Args),
    /// Time a Llama-shape model end to end on the GPU (prefill, decode), dense vs BLAST.
    E2e(cmd::e2e::Args),
    Roofline(cmd::roofline::Args),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Quickstart(args) => cmd::quickstart::run(args),
        Command::Bench(args) => cmd::bench::run(args),
        Command::Roofline(args) => cmd::roofline::run(args),
        Command::Compress(args) => cmd::compress::run(args),
        Command::Info(args) => cmd::info::run(args),
        Command::Cost(args) => cmd::cost::run(args),
        Command::InitLayer(args) => cmd::init_layer::run(args),
        Command::Doctor(args) => cmd::doctor::run(args),
        Command::Generate(args) => cmd::generate::run(args),
        Command::Eval(args) => cmd::eval::run(args),
        Command::Factorize(args) => cmd::factorize::run(args),
        Command::Parity(args) => cmd::parity::run(args),
        Command::E2e(args) => cmd::e2e::run(args),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
