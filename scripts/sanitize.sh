#!/usr/bin/env bash
# Runs every GPU test suite under compute-sanitizer (memcheck, racecheck, initcheck, synccheck)
# on a machine with an NVIDIA GPU and the CUDA toolkit. Prints one summary line per
# (suite, tool) and exits non-zero if any finding or failure was reported.
#
#   scripts/sanitize.sh [path/to/blr]          (default: target/release/blr)
#   SANITIZE_SUITES="runtime layers" SANITIZE_TOOLS="initcheck" SANITIZE_REPRO=0 scripts/sanitize.sh ...
#                                              (a subset; all suites, tools and the repro by default)
#
# Suites: the runtime self-tests (`blr doctor --self-test`: GEMM, graphs, cooperative launch,
# fill kernel), the model backend parity suite (`blr parity --backend cuda`: every fused op,
# every model and next-token sampling against the CPU reference), and the layer-kernel harness
# (bench/kernels, built with nvcc: every BLR layer kernel on odd shapes). Logs go to $OUT (or
# ./sanitize-logs).
#
# initcheck does not see the stores of cuBLAS/cuBLASLt kernels on sm_90, so every later read of
# a GEMM output would be reported as uninitialised (bench/sanitize/cublaslt_initcheck.cu
# reproduces it outside blr; this script runs it first and records what initcheck says). For
# initcheck, blr therefore runs with BLR_POISON_GEMM_OUTPUTS=1: every GEMM output is set to NaN
# just before the GEMM writes it, so initcheck checks everything else and an element cuBLASLt
# failed to write still fails the suite's NaN/accuracy checks. The harness NaN-fills the
# buffers cuBLAS writes once at allocation, for the same reason.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
blr="${1:-target/release/blr}"
out="${OUT:-sanitize-logs}"
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE="${BLR_KERNEL_CACHE:-/tmp/blr-kcache}"
command -v compute-sanitizer >/dev/null || { echo "error: compute-sanitizer not found (CUDA toolkit)" >&2; exit 1; }

run_suites="${SANITIZE_SUITES:-runtime parity layers}"
if [[ " $run_suites " == *" layers "* ]]; then
    nvcc -std=c++17 -O3 -lineinfo -gencode=arch=compute_90a,code=sm_90a \
        -Icrates/blr-cuda/src/layers bench/kernels/harness.cu -o /tmp/blr_harness -lcublas >"$out/nvcc.log" 2>&1 \
        || { echo "harness build failed: see $out/nvcc.log"; tail -5 "$out/nvcc.log"; }
fi

# The cuBLAS(Lt) reproduction: each case under initcheck, then its verdict line.
if [[ ${SANITIZE_REPRO:-1} == 1 ]] && nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a bench/sanitize/cublaslt_initcheck.cu \
    -o /tmp/blr_lt_repro -lcublasLt -lcublas >"$out/repro-nvcc.log" 2>&1; then
    for case in "write" "write --y-init" "odd" "odd --ws-init" "legacy" "legacy --y-init" "selftest" "selftest --ws-init"; do
        log="$out/repro-${case// /}.log"
        compute-sanitizer --tool initcheck --print-limit 4 /tmp/blr_lt_repro $case >"$log" 2>&1
        printf 'repro    %-18s exit %-3s %s | %s\n' "$case" "$?" "$(grep -E 'ERROR SUMMARY' "$log" | head -1)" \
            "$(grep -oE 'rel err [^ ]+ [a-zA-Z]+' "$log")" | tee -a "$out/repro.txt"
    done
elif [[ ${SANITIZE_REPRO:-1} == 1 ]]; then
    echo "repro build failed: see $out/repro-nvcc.log"
fi

declare -A suites=(
    [runtime]="$blr doctor --self-test --no-measure"
    [parity]="$blr parity --backend cuda"
    [layers]="/tmp/blr_harness --check-only --tiny"
)
status=0
: >"$out/summary.txt"
# Warm the kernel cache outside the sanitizer (NVRTC under the sanitizer is slow, not wrong).
$blr doctor --self-test --no-measure >/dev/null 2>&1 || true
[[ " $run_suites " == *" parity "* ]] && { $blr parity --backend cuda >/dev/null 2>&1 || true; }
for suite in $run_suites; do
    for tool in ${SANITIZE_TOOLS:-memcheck racecheck initcheck synccheck}; do
        log="$out/$suite-$tool.log"
        poison=0
        [[ $tool == initcheck ]] && poison=1
        start=$SECONDS
        BLR_POISON_GEMM_OUTPUTS=$poison timeout 300 compute-sanitizer --tool "$tool" --print-limit 20 \
            ${suites[$suite]} >"$log" 2>&1
        rc=$?
        summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
        errors=$(echo "$summary" | grep -oE "[0-9]+ (error|hazard)" | head -1 | grep -oE "^[0-9]+")
        verdict=ok
        if [[ $rc -ne 0 || -z "$summary" || "${errors:-1}" != 0 ]]; then verdict=FAIL; status=1; fi
        printf '%-8s %-10s exit %-3s %-5s %4ss %s\n' "$suite" "$tool" "$rc" "$verdict" "$((SECONDS - start))" \
            "$summary" | tee -a "$out/summary.txt"
    done
done
exit $status
