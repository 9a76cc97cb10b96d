#!/usr/bin/env bash
# Build and run the layer-kernel harness on the GPU machine (CUDA 13.0, nvcc, cuBLAS).
#   bench/kernels/run.sh [check|sanitize|bench|all]   (default: all)
# Writes logs and JSON under $OUT (or ./out when $OUT is unset).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${OUT:-$here/out}"
mkdir -p "$out"
what="${1:-all}"
export PATH=/usr/local/cuda/bin:$PATH
nvcc -std=c++17 -O3 -lineinfo --default-stream per-thread -gencode=arch=compute_90a,code=sm_90a \
    -Xptxas -v -I"$here/../../crates/blr-cuda/src/layers" "$here/harness.cu" -o /tmp/blr_harness -lcublas \
    >"$out/build.log" 2>&1 || { cat "$out/build.log"; exit 1; }
grep -E "Compiling entry function 'blr|Used [0-9]+ registers" "$out/build.log" | grep -A1 "'blr" | grep -v "^--" | paste - - | sed -E "s/ptxas info *: //g" | cut -c1-150
if [[ $what == check || $what == all || $what == sanitize ]]; then
    echo "== correctness (small shapes)"
    /tmp/blr_harness --check-only --small 2>&1 | tee "$out/check.log" | tail -40
fi
if [[ $what == sanitize || $what == all ]]; then
    for tool in memcheck racecheck; do
        echo "== compute-sanitizer $tool"
        timeout 240 compute-sanitizer --tool $tool --print-limit 20 /tmp/blr_harness --check-only --tiny \
            >"$out/sanitize-$tool.log" 2>&1
        echo "exit $?"; grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed" "$out/sanitize-$tool.log" | tail -3
    done
fi
if [[ $what == bench || $what == all ]]; then
    echo "== bench"
    /tmp/blr_harness --iters 30 --json "$out/layers.json" 2>&1 | tee "$out/bench.log"
fi
if [[ $what == profile ]]; then
    # Per-kernel duration and DRAM bytes (caches flushed before each kernel by ncu).
    cfg="${2:-llama7b-qkvo}"; toks="${3:-1,1024}"
    ncu --clock-control none --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,launch__grid_size,launch__registers_per_thread,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,l1tex__data_bank_conflicts_pipe_lsu_mem_shared.sum \
        --csv /tmp/blr_harness --check-only --only "$cfg" --tokens "$toks" >"$out/ncu-$cfg.csv" 2>"$out/ncu-$cfg.err"
    python3 "$here/ncu_summary.py" "$out/ncu-$cfg.csv"
fi
if [[ $what == phases ]]; then
    # Decode phase timing (%globaltimer marks in decode.cu), qkvo by default.
    nvcc -std=c++17 -O3 --default-stream per-thread -gencode=arch=compute_90a,code=sm_90a -DBLR_DEC_TIMING \
        -I"$here/../../crates/blr-cuda/src/layers" "$here/harness.cu" -o /tmp/blr_harness_t -lcublas \
        >"$out/build-phases.log" 2>&1 || { cat "$out/build-phases.log"; exit 1; }
    /tmp/blr_harness_t --only "${2:-llama7b-qkvo}" --tokens "${3:-1,16}" 2>&1 | grep -E "decode|phases|FAIL"
fi
