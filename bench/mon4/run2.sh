#!/usr/bin/env bash
# Device run 2 of helper "mon" (session 4): packed intermediate transpose and the wgmma stage 1
# of Monarch partial, variants side by side (env knobs), tests, ncu, sanitizers.
# Carry .carry/mon (blr, t = blr-cuda lib test binary). Logs under $OUT. (The 2026-11-25 run used
# 60 s bench timeouts, which cut each bench after the llama3.2-1b-gate T=16 rows: now 150 s.)
set -uo pipefail
B=.carry/mon/blr; T=.carry/mon/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
step tests; timeout 120 $T layers:: --nocapture --test-threads=1 > "$O/tests.log" 2>&1; echo "exit $?"
grep -E "^test |parity|panicked|rel err|test result" "$O/tests.log" | cut -c1-300
step sass; for f in /tmp/blr-kc/monarch*sm_90a*.cubin; do cuobjdump -sass "$f" > "$O/monarch.sass" 2>&1; done
awk '/Function :/{fn=$3} /HGMMA/{c[fn]++} /HMMA/{h[fn]++} END{for (f in c) print f, "HGMMA", c[f]; for (f in h) print f, "HMMA", h[f]}' "$O/monarch.sass"
cfg="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-gate --tokens 16,128,1024 --reps 20 --no-autotune"
step bench dense+unfused; timeout 150 $B bench layer $cfg --formats dense,monarch --strategy unfused --out "$O/b-ref.json" > "$O/b-ref.txt" 2>&1; grep -E "^llama" "$O/b-ref.txt"
for v in "mma pairs 256" "mma packed 256" "wgmma packed 256" "wgmma packed 100000"; do
  set -- $v
  step bench stage1=$1 mid=$2 own_max_nb=$3
  BLR_MONARCH_STAGE1=$1 BLR_MONARCH_MID=$2 BLR_MONARCH_OWN_MAX_NB=$3 timeout 150 $B bench layer $cfg --formats monarch --strategy partial --out "$O/b-$1-$2-$3.json" > "$O/b-$1-$2-$3.txt" 2>&1
  grep -E "^llama" "$O/b-$1-$2-$3.txt"
done
met=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum
step ncu packed; BLR_MONARCH_MID=packed timeout 60 ncu --cache-control none --kernel-name regex:blr_monarch_mid --launch-skip 1 --launch-count 1 --metrics $met $B bench layer --config llama7b-down --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune > "$O/ncu-packed.txt" 2>&1; grep -E "blr_monarch|\.sum|pct" "$O/ncu-packed.txt"
for s1 in mma wgmma; do
  step ncu stage1 $s1; BLR_MONARCH_STAGE1=$s1 timeout 60 ncu --cache-control none --kernel-name regex:blr_monarch_stage1 --launch-skip 1 --launch-count 1 --metrics $met $B bench layer --config llama7b-qkvo --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune > "$O/ncu-s1-$s1.txt" 2>&1; grep -E "blr_monarch|\.sum|pct" "$O/ncu-s1-$s1.txt"
done
for tool in memcheck racecheck; do
  step sanitizer $tool; timeout 200 compute-sanitizer --tool $tool --print-limit 20 $T layers::tests::gpu_monarch --test-threads=1 --nocapture > "$O/san-$tool.log" 2>&1; echo "exit $?"
  grep -E "^test |SUMMARY|test result|panicked" "$O/san-$tool.log" | cut -c1-300
done
step done
