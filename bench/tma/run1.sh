#!/usr/bin/env bash
# Device run 1 of helper "tma" (session 6, issue #5): Monarch stage 1 with TMA loads
# (blr_monarch_stage1_tma: cp.async.bulk.tensor issued by one thread, completion on mbarriers)
# against the cp.async wgmma kernel (blr_monarch_stage1_wg, the default before), side by side
# through BLR_MONARCH_STAGE1 in one binary: parity test (stops the TMA part if it fails), SASS
# check, compute-sanitizer memcheck + racecheck restricted to the new kernel, the brief's bench
# per variant, ncu of stage 1 at llama7b-qkvo T=1024 per variant.
# Carry .carry/tma (blr, t = blr-cuda lib test binary). Logs under $OUT.
set -uo pipefail
B=.carry/tma/blr; T=.carry/tma/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
nvidia-smi -L
step tests; timeout 100 $T layers::tests::gpu_monarch layers::tests::monarch --nocapture --test-threads=1 > "$O/tests.log" 2>&1; rc=$?; echo "exit $rc"
grep -E "^test |parity|panicked|rel err|test result" "$O/tests.log" | cut -c1-300
if [ $rc -ne 0 ]; then tail -n 30 "$O/tests.log"; fi
step sass; for f in /tmp/blr-kc/monarch*sm_90a*.cubin; do cuobjdump -sass "$f" > "$O/monarch.sass" 2>&1; cuobjdump -res-usage "$f" 2>&1 | grep -A1 stage1 | cut -c1-200; done
awk '/Function :/{fn=$3} /HGMMA/{c[fn]++} /UTMALDG/{u[fn]++} /LDGSTS/{g[fn]++} /LDL|STL/{l[fn]++} END{for (f in c) print f, "HGMMA", c[f]; for (f in u) print f, "UTMALDG", u[f]; for (f in g) print f, "LDGSTS", g[f]; for (f in l) print f, "LDL/STL", l[f]}' "$O/monarch.sass"
if [ $rc -eq 0 ]; then
for tool in memcheck racecheck; do
  step sanitizer $tool; timeout 120 compute-sanitizer --tool $tool --kernel-name kns=blr_monarch_stage1_tma --print-limit 20 $T layers::tests::gpu_monarch --test-threads=1 --nocapture > "$O/san-$tool.log" 2>&1; echo "exit $?"
  grep -E "^test |SUMMARY|test result|panicked|parity|Error|error" "$O/san-$tool.log" | head -20 | cut -c1-300
done
fi
cfg="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-gate --tokens 128,1024 --reps 20 --no-autotune"
vars="wgmma"; [ $rc -eq 0 ] && vars="wgmma tma"
for v in $vars; do
  step bench stage1=$v dense+monarch partial
  BLR_MONARCH_STAGE1=$v timeout 120 $B bench layer $cfg --formats dense,monarch --strategy partial --out "$O/b-$v.json" > "$O/b-$v.txt" 2>&1; echo "exit $?"
  grep -E "^llama" "$O/b-$v.txt"
done
for v in $vars; do
  step bench again stage1=$v monarch partial
  BLR_MONARCH_STAGE1=$v timeout 80 $B bench layer $cfg --formats monarch --strategy partial --out "$O/b2-$v.json" > "$O/b2-$v.txt" 2>&1; echo "exit $?"
done
met=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum,launch__grid_size,launch__registers_per_thread,smsp__warps_eligible.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active
for v in $vars; do
  step ncu stage1 $v; BLR_MONARCH_STAGE1=$v timeout 60 ncu --cache-control none --kernel-name regex:blr_monarch_stage1 --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --metrics $met $B bench layer --config llama7b-qkvo --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune > "$O/ncu-s1-$v.txt" 2>&1; grep -E "blr_monarch|Duration|Throughput|\.sum|pct|launch__|per_cycle" "$O/ncu-s1-$v.txt" | cut -c1-150
done
python3 bench/tma/table.py "$O" $vars
step done
