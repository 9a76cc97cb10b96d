#!/usr/bin/env bash
# Device run 2 of helper "bl": where blr_blast_s12_wg's time goes. Ablations (BLR_S12_ABLATE
# bits: 1 no wgmma, 2 no Z store/mixing/W store, 4 no stage loads, 8 no proxy fence), ncu
# sections of the kernel at q/k/v/o T=1024 and 128, dense rows for the table, racecheck.
set -uo pipefail
B=.carry/bl/blr; T=.carry/bl/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
step tests
timeout 100 $T layers::tests::gpu_blast_stage12 --nocapture --test-threads=1 > "$O/tests.log" 2>&1; rc=$?; echo "exit $rc"
grep -E "parity:|panicked|test result" "$O/tests.log" | head
if [ $rc -ne 0 ]; then tail -n 30 "$O/tests.log"; step stop; exit 1; fi
step dense
timeout 60 $B bench layer --config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-up --tokens 128,1024 --formats dense --strategy unfused --reps 20 --no-autotune --out "$O/dense.json" > "$O/dense.txt" 2>&1; echo "exit $?"
grep -E "^llama" "$O/dense.txt" | grep -v "graph of"
for a in 0 1 2 4 8 3 5 7; do
  step ablate $a
  BLR_BLAST_STAGE12=fused BLR_S12_ABLATE=$a timeout 40 $B bench layer --config llama7b-qkvo --tokens 128,1024 --formats blast --strategy partial --reps 20 --no-autotune > "$O/abl-$a.txt" 2>&1; echo "exit $?"
  grep -E "^llama" "$O/abl-$a.txt" | grep -v "graph of"
done
for tk in 1024 128; do
  step ncu s12 T=$tk
  BLR_BLAST_STAGE12=fused timeout 90 ncu --cache-control none --kernel-name regex:blr_blast_s12 --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --section Occupancy --section LaunchStats --section ComputeWorkloadAnalysis --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,lts__t_sectors_srcunit_tex_op_read.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum $B bench layer --config llama7b-qkvo --tokens $tk --formats blast --strategy partial --reps 2 --no-autotune > "$O/ncu-s12-$tk.txt" 2>&1; echo "exit $?"
  grep -vE "^==|^ *-+ *$|^\s*$|^    (OPT|INF|WRN)|^          " "$O/ncu-s12-$tk.txt" | cut -c1-140 | head -120
done
step ncu mix_tc4 T=1024
BLR_BLAST_STAGE12=split timeout 60 ncu --cache-control none --kernel-name regex:blr_blast_mix --launch-skip 1 --launch-count 1 --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum $B bench layer --config llama7b-qkvo --tokens 1024 --formats blast --strategy partial --reps 2 --no-autotune > "$O/ncu-mix.txt" 2>&1; echo "exit $?"
grep -E "blr_blast|\.sum" "$O/ncu-mix.txt"
step racecheck
BLR_S12_TEST_SMALL=1 timeout 200 compute-sanitizer --tool racecheck --kernel-name kns=blr_blast_s12_wg $T layers::tests::gpu_blast_stage12 --nocapture --test-threads=1 > "$O/racecheck.log" 2>&1; echo "exit $?"
grep -E "RACECHECK SUMMARY|ERROR SUMMARY|test result|panicked|parity:|hazard" "$O/racecheck.log" | head
step done
