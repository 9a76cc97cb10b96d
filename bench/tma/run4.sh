#!/usr/bin/env bash
# Device run 4 of helper "tma" (session 6, issue #5), after the consumer-order fix of
# blr_monarch_stage1_tmapp (run 3 found the deadlock): parity test (every kernel choice, tmapp
# also at 1 and 3 blocks), SASS counts, compute-sanitizer memcheck + racecheck restricted to the
# TMA kernels, then in one call the brief's bench with the cp.async wgmma stage 1 (the default
# before; dense rows from the same command) and with tmapp, and ncu of stage 1 at
# llama7b-qkvo T=1024 for both. Stops after the tests if they fail.
# Carry .carry/tma (blr, t = blr-cuda lib test binary). Logs under $OUT.
set -uo pipefail
B=.carry/tma/blr; T=.carry/tma/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
nvidia-smi -L
step tests; timeout 60 $T layers::tests::gpu_monarch layers::tests::monarch --nocapture --test-threads=1 > "$O/tests.log" 2>&1; rc=$?; echo "exit $rc"
grep -E "^test |parity|panicked|rel err|test result" "$O/tests.log" | cut -c1-300
if [ $rc -ne 0 ]; then tail -n 20 "$O/tests.log"; step stop; exit 1; fi
step sass; f=$(ls /tmp/blr-kc/monarch-sm_90a-*.cubin | head -1); nvdisasm -c "$f" > "$O/monarch.sass" 2>&1; echo "nvdisasm $?"
awk '/^[ \t]*\.text\./{fn=$1} /\.section[ \t]+\.text\./{fn=$2} /HGMMA/{c[fn]++} /UTMALDG/{u[fn]++} /LDGSTS/{g[fn]++} /LDL|STL/{l[fn]++} END{for (f in c) print f, "HGMMA", c[f]; for (f in u) print f, "UTMALDG", u[f]; for (f in g) print f, "LDGSTS", g[f]; for (f in l) print f, "LDL/STL", l[f]}' "$O/monarch.sass" | grep stage1
for tool in memcheck racecheck; do
  step sanitizer $tool; timeout 100 compute-sanitizer --tool $tool --kernel-name kns=blr_monarch_stage1_tma --print-limit 10 $T layers::tests::gpu_monarch --test-threads=1 --nocapture > "$O/san-$tool.log" 2>&1; echo "exit $?"
  grep -E "SUMMARY|test result|parity|Error" "$O/san-$tool.log" | head -8 | cut -c1-300
done
cfg="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-gate --tokens 128,1024 --reps 20 --no-autotune"
step bench stage1=wgmma dense+monarch auto
BLR_MONARCH_STAGE1=wgmma timeout 110 $B bench layer $cfg --formats dense,monarch --strategy auto --out "$O/b-wgmma.json" > "$O/b-wgmma.txt" 2>&1; echo "exit $?"
step bench stage1=tmapp monarch partial
BLR_MONARCH_STAGE1=tmapp timeout 100 $B bench layer $cfg --formats monarch --strategy partial --out "$O/b-tmapp.json" > "$O/b-tmapp.txt" 2>&1; echo "exit $?"
python3 bench/tma/table.py "$O" wgmma tmapp
met=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum,launch__grid_size,launch__registers_per_thread,smsp__warps_eligible.avg.per_cycle_active,smsp__issue_active.avg.pct_of_peak_sustained_active
for v in wgmma tmapp; do
  step ncu stage1 $v; BLR_MONARCH_STAGE1=$v timeout 40 ncu --cache-control none --kernel-name regex:blr_monarch_stage1 --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --metrics $met $B bench layer --config llama7b-qkvo --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune > "$O/ncu-s1-$v.txt" 2>&1; grep -E "blr_monarch|Duration|L2 Cache Th|Compute|\.sum|pct|launch__|per_cycle" "$O/ncu-s1-$v.txt" | cut -c1-130
done
step done
