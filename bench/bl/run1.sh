#!/usr/bin/env bash
# Device run 1 of helper "bl" (session 6, issue #5): BLAST partial with stage 1 + mixing fused
# (blr_blast_s12_wg) against the split path (cuBLASLt stage 1 + blr_blast_mix_tc4/tc2), one
# binary, the choice by BLR_BLAST_STAGE12.
#   1. tests: the new parity test (fused and split, odd shapes, W and y NaN-poisoned), the
#      all-format parity test, blast_s12 unit tests; stops if they fail.
#   2. the brief's bench command once per knob value (split, fused).
#   3. ncu of the new kernel and of the split path's kernels at llama7b q/k/v/o T=1024 and 128.
#   4. compute-sanitizer memcheck restricted to the new kernel (small cases).
# Carry .carry/bl (blr, t = blr-cuda lib test binary). Logs under $OUT.
set -uo pipefail
B=.carry/bl/blr; T=.carry/bl/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
nvidia-smi -L
step tests
timeout 150 $T layers::tests::gpu_blast_stage12 layers::tests::gpu_parity_every layers::blast_s12 --nocapture --test-threads=1 > "$O/tests.log" 2>&1; rc=$?; echo "exit $rc"
grep -E "^test |parity|panicked|rel err|test result|SKIP" "$O/tests.log" | cut -c1-250 | tail -n 40
if [ $rc -ne 0 ]; then tail -n 30 "$O/tests.log"; step stop; exit 1; fi
CFG="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-up --tokens 128,1024 --formats dense,blast --strategy partial --reps 20 --no-autotune"
for k in split fused; do
  step bench BLR_BLAST_STAGE12=$k
  BLR_BLAST_STAGE12=$k timeout 90 $B bench layer $CFG --out "$O/bench-$k.json" > "$O/bench-$k.txt" 2>&1; echo "exit $?"
  grep -E "^(llama|config)" "$O/bench-$k.txt" | grep -v "graph of"
done
met=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_sectors_srcunit_tex_op_read.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum,launch__grid_size,launch__registers_per_thread,smsp__warps_issue_stalled_long_scoreboard_per_issue_active.ratio,smsp__warps_issue_stalled_barrier_per_issue_active.ratio,smsp__issue_active.avg.pct_of_peak_sustained_active
for k in fused split; do
  for tk in 1024 128; do
    step ncu $k T=$tk
    BLR_BLAST_STAGE12=$k timeout 60 ncu --cache-control none --kernel-name regex:"blr_blast|nvjet|sm90|cutlass|gemm" --launch-skip 3 --launch-count 3 --metrics $met $B bench layer --config llama7b-qkvo --tokens $tk --formats blast --strategy partial --reps 2 --no-autotune > "$O/ncu-$k-$tk.txt" 2>&1; echo "exit $?"
    grep -E "^  [a-zA-Z_]|blr_blast|nvjet|\(\d+, \d+, \d+\)" "$O/ncu-$k-$tk.txt" | grep -vE "^  *(Section|----)" | cut -c1-150 | head -60
  done
done
step memcheck
BLR_S12_TEST_SMALL=1 timeout 150 compute-sanitizer --tool memcheck --kernel-name kns=blr_blast_s12_wg $T layers::tests::gpu_blast_stage12 --nocapture --test-threads=1 > "$O/memcheck.log" 2>&1; echo "exit $?"
grep -E "ERROR SUMMARY|test result|panicked|parity" "$O/memcheck.log" | head
step done
