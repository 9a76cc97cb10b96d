#!/usr/bin/env bash
# Runs every GPU test suite under compute-sanitizer (memcheck, racecheck, initcheck, synccheck)
# on a machine with an NVIDIA GPU and the CUDA toolkit. Prints one summary line per
# (suite, tool) and exits non-zero if any finding or failure was reported.
#
#   scripts/sanitize.sh [path/to/blr]          (default: target/release/blr)
#
# Suites: the runtime self-tests (`blr doctor --self-test`: GEMM, graphs, cooperative launch,
# fill kernel), the model backend parity suite (`blr parity --backend cuda`: every fused op and
# every model against the CPU reference), and the layer-kernel harness (bench/kernels, built
# with nvcc: every BLR layer kernel on odd shapes). Logs go to $OUT (or ./sanitize-logs).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
blr="${1:-target/release/blr}"
out="${OUT:-sanitize-logs}"
mkdir -p "$out"
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE="${BLR_KERNEL_CACHE:-/tmp/blr-kcache}"
command -v compute-sanitizer >/dev/null || { echo "error: compute-sanitizer not found (CUDA toolkit)" >&2; exit 1; }

nvcc -std=c++17 -O3 -lineinfo -gencode=arch=compute_90a,code=sm_90a \
    -Icrates/blr-cuda/src/layers bench/kernels/harness.cu -o /tmp/blr_harness -lcublas >"$out/nvcc.log" 2>&1 \
    || { echo "harness build failed: see $out/nvcc.log"; tail -5 "$out/nvcc.log"; }

declare -A suites=(
    [runtime]="$blr doctor --self-test --no-measure"
    [parity]="$blr parity --backend cuda"
    [layers]="/tmp/blr_harness --check-only --tiny"
)
status=0
: >"$out/summary.txt"
# Warm the kernel cache outside the sanitizer (NVRTC under the sanitizer is slow, not wrong).
$blr doctor --self-test --no-measure >/dev/null 2>&1 || true
$blr parity --backend cuda >/dev/null 2>&1 || true
for suite in runtime parity layers; do
    for tool in memcheck racecheck initcheck synccheck; do
        log="$out/$suite-$tool.log"
        timeout 300 compute-sanitizer --tool "$tool" --print-limit 20 ${suites[$suite]} >"$log" 2>&1
        rc=$?
        summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1)
        errors=$(echo "$summary" | grep -oE "[0-9]+ (error|hazard)" | head -1 | grep -oE "^[0-9]+")
        verdict=ok
        if [[ $rc -ne 0 || -z "$summary" || "${errors:-1}" != 0 ]]; then verdict=FAIL; status=1; fi
        printf '%-8s %-10s exit %-3s %-5s %s\n' "$suite" "$tool" "$rc" "$verdict" "$summary" | tee -a "$out/summary.txt"
    done
done
exit $status
