#!/usr/bin/env bash
# GPU vs CPU BLAST factorization benchmark (docs/perf/factorize-h100.md).
# Run on the GPU machine from the repository root: BLR=path/to/blr OUT=dir scripts/bench-factorize-gpu.sh
# Every line of $OUT/factorize.jsonl is one `blr factorize --json` result plus the command's
# label; stderr (progress, notes) goes to $OUT/factorize.log. GPU_ONLY=1 skips the CPU rows
# (~130 s on 16 cores; their values are recorded in docs/perf/factorize-h100.json).
set -euo pipefail
BLR=${BLR:-target/release/blr}
OUT=${OUT:-.}
CPU_ITERS=${CPU_ITERS:-30}
GPU_ONLY=${GPU_ONLY:-0}
log="$OUT/factorize.log"
jsonl="$OUT/factorize.jsonl"
: >"$jsonl"
{ date -u; nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv,noheader; nproc; } | tee -a "$log"

run() { # label, then blr factorize arguments (format blast unless given)
    local label=$1; shift
    local line
    local format=(--format blast)
    [[ " $* " == *" --format "* ]] && format=()
    line=$("$BLR" factorize --synthetic gaussian "${format[@]}" --json "$@" 2>>"$log")
    echo "{\"label\":\"$label\",\"args\":\"$*\",\"result\":$line}" | tee -a "$jsonl"
}

big=(--m 4096 --n 11008 --blocks 16 --rank 1488)
small=(--m 1024 --n 2752 --blocks 16 --rank 372)
# The target: 4096x11008 b=16 r=1488, 300 iterations, on the GPU.
for prec in fp32 tf32-data tf32; do
    run "gpu-$prec-4096-300" "${big[@]}" --device cuda --gpu-precision "$prec"
done
# Equal-iteration comparison with the CPU path at the big shape.
for prec in fp32 tf32-data tf32; do
    run "gpu-$prec-4096-$CPU_ITERS" "${big[@]}" --iterations "$CPU_ITERS" --device cuda --gpu-precision "$prec"
done
[[ $GPU_ONLY == 1 ]] || run "cpu-4096-$CPU_ITERS" "${big[@]}" --iterations "$CPU_ITERS" --device cpu
# The smaller shape, 300 iterations on both.
for prec in fp32 tf32-data tf32; do
    run "gpu-$prec-1024-300" "${small[@]}" --device cuda --gpu-precision "$prec"
done
[[ $GPU_ONLY == 1 ]] || run "cpu-1024-300" "${small[@]}" --device cpu
# The truncated-SVD start (blr compress's default) with the SVD on the GPU, and the low-rank
# factorization itself on both devices (the CPU one takes ~13 s on 16 cores).
run "gpu-tf32-4096-300-lowrank-init" "${big[@]}" --init lowrank --device cuda --gpu-precision tf32
run "gpu-lowrank-4096" --format lowrank --m 4096 --n 11008 --rank 1488 --device cuda
run "cpu-lowrank-4096" --format lowrank --m 4096 --n 11008 --rank 1488 --device cpu
