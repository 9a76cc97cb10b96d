#!/usr/bin/env bash
# Device run 1 of helper "wg" (session 4, issue #5): the persistent warp-specialised wgmma stage 1
# of Monarch partial (blr_monarch_stage1_ws, 128x128 tiles; _ws256, 128x256) against the
# non-persistent wgmma kernel (blr_monarch_stage1_wg, the default before), side by side through
# BLR_MONARCH_STAGE1 in one binary: parity test first (stops here if it fails), SASS check,
# compute-sanitizer (memcheck, racecheck) on the new kernels, benches, ncu of the stage-1 kernel at
# llama7b-qkvo T=1024.
# Carry .carry/wg (blr, t = blr-cuda lib test binary). Logs under $OUT.
set -uo pipefail
B=.carry/wg/blr; T=.carry/wg/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
nvidia-smi -L
step tests; timeout 90 $T layers::tests::gpu_monarch layers::tests::monarch --nocapture --test-threads=1 > "$O/tests.log" 2>&1; rc=$?; echo "exit $rc"
grep -E "^test |parity|panicked|rel err|test result" "$O/tests.log" | cut -c1-300
if [ $rc -ne 0 ]; then tail -n 30 "$O/tests.log"; step stop; exit 1; fi
step sass; for f in /tmp/blr-kc/monarch*sm_90a*.cubin; do cuobjdump -sass "$f" > "$O/monarch.sass" 2>&1; done
awk '/Function :/{fn=$3} /HGMMA/{c[fn]++} /HMMA/{h[fn]++} /LDL|STL/{l[fn]++} END{for (f in c) print f, "HGMMA", c[f]; for (f in h) print f, "HMMA", h[f]; for (f in l) print f, "LDL/STL", l[f]}' "$O/monarch.sass"
for tool in memcheck racecheck; do
  step sanitizer $tool; timeout 90 compute-sanitizer --tool $tool --kernel-name kns=blr_monarch_stage1_ws --print-limit 20 $T layers::tests::gpu_monarch --test-threads=1 --nocapture > "$O/san-$tool.log" 2>&1; echo "exit $?"
  grep -E "^test |SUMMARY|test result|panicked|parity" "$O/san-$tool.log" | cut -c1-300
done
cfg="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-gate --tokens 128,1024 --reps 20 --no-autotune"
step bench wgmma dense+monarch unfused+partial; BLR_MONARCH_STAGE1=wgmma timeout 150 $B bench layer $cfg --formats dense,monarch --strategy unfused,partial --out "$O/b-wgmma.json" > "$O/b-wgmma.txt" 2>&1; echo "exit $?"; grep -E "^llama" "$O/b-wgmma.txt"
for v in ws ws256 wgmma; do
  step bench stage1=$v partial
  BLR_MONARCH_STAGE1=$v timeout 100 $B bench layer $cfg --formats monarch --strategy partial --out "$O/b-$v-p.json" > "$O/b-$v-p.txt" 2>&1; echo "exit $?"
  grep -E "^llama" "$O/b-$v-p.txt"
done
met=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum,launch__grid_size,launch__registers_per_thread
for v in wgmma ws ws256; do
  step ncu stage1 $v; BLR_MONARCH_STAGE1=$v timeout 45 ncu --cache-control none --kernel-name regex:blr_monarch_stage1 --launch-skip 1 --launch-count 1 --metrics $met $B bench layer --config llama7b-qkvo --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune > "$O/ncu-s1-$v.txt" 2>&1; grep -E "blr_monarch|\.sum|pct|launch__" "$O/ncu-s1-$v.txt"
done
step done
