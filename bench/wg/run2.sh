#!/usr/bin/env bash
# Device run 2 of helper "wg": why the persistent warp-specialised stage 1 (ws) is slower than
# the 2-blocks-per-SM wgmma kernel (ncu warp-state / scheduler / memory sections at llama7b-qkvo
# T=1024), and the racecheck failure of run 1 with its log (default, then without cp.async
# race tracking). Carry .carry/wg (blr, t). Logs under $OUT (at most 8 files come back).
set -uo pipefail
B=.carry/wg/blr; T=.carry/wg/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
step racecheck default; timeout 60 compute-sanitizer --tool racecheck --kernel-name kns=blr_monarch_stage1_ws --print-limit 6 $T layers::tests::gpu_monarch --test-threads=1 --nocapture > "$O/san-race1.log" 2>&1; echo "exit $?"
grep -v "^\s*$" "$O/san-race1.log" | grep -v "^=========     Host Frame" | head -n 40 | cut -c1-250
step racecheck no-memcpy-async; timeout 60 compute-sanitizer --tool racecheck --racecheck-memcpy-async no --kernel-name kns=blr_monarch_stage1_ws --print-limit 6 $T layers::tests::gpu_monarch --test-threads=1 --nocapture > "$O/san-race2.log" 2>&1; echo "exit $?"
grep -E "^test |SUMMARY|test result|panicked|parity|Error|error" "$O/san-race2.log" | head -n 12 | cut -c1-250
for v in wgmma ws; do
  step ncu sections $v; BLR_MONARCH_STAGE1=$v timeout 60 ncu --cache-control none --kernel-name regex:blr_monarch_stage1 --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section MemoryWorkloadAnalysis --section Occupancy $B bench layer --config llama7b-qkvo --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune > "$O/ncu-$v.txt" 2>&1; echo "exit $?"
  grep -E "Duration|Throughput|Stall|stall|Warp Cycles|Issued|Eligible|No Eligible|Active Warps|Hit Rate|L2|Achieved Occ|Bandwidth" "$O/ncu-$v.txt" | grep -v "^    ---" | head -n 40 | cut -c1-160
done
step done
