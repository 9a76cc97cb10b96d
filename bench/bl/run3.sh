#!/usr/bin/env bash
# Device run 3 of helper "bl": the record run. The brief's bench command once per
# BLR_BLAST_STAGE12 value (split = the old path, fused = blr_blast_s12_wg) and dense, in one
# call; ncu of the fused kernel at q/k/v/o T=1024; the racecheck log. Everything in one log
# (the run returns only a few files). Starts with the parity tests (stops if they fail).
set -uo pipefail
B=.carry/bl/blr; T=.carry/bl/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"; L="$O/log.txt"
step() { echo "=== $(date +%T) $*" | tee -a "$L"; }
nvidia-smi -L | tee -a "$L"
step tests
timeout 100 $T layers::tests::gpu_blast_stage12 layers::tests::gpu_parity_every --nocapture --test-threads=1 > "$O/t.txt" 2>&1; rc=$?; echo "exit $rc"
grep -E "parity:|panicked|test result" "$O/t.txt" | tee -a "$L"
if [ $rc -ne 0 ]; then tail -n 30 "$O/t.txt"; step stop; exit 1; fi
CFG="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-up --tokens 128,1024"
step dense
timeout 60 $B bench layer $CFG --formats dense --strategy unfused --reps 20 --no-autotune --out "$O/dense.json" > "$O/b.txt" 2>&1; echo "exit $?"; cat "$O/b.txt" >> "$L"
for k in split fused split fused; do
  step bench BLR_BLAST_STAGE12=$k
  BLR_BLAST_STAGE12=$k timeout 90 $B bench layer $CFG --formats dense,blast --strategy partial --reps 20 --no-autotune --out "$O/$k.json" > "$O/b.txt" 2>&1; echo "exit $?"; cat "$O/b.txt" >> "$L"
  grep -E "^llama" "$O/b.txt" | grep -v "graph of"
done
for a in 1 2 4 7; do
  step ablate $a
  BLR_BLAST_STAGE12=fused BLR_S12_ABLATE=$a timeout 40 $B bench layer --config llama7b-qkvo --tokens 128,1024 --formats blast --strategy partial --reps 20 --no-autotune > "$O/b.txt" 2>&1; echo "exit $?"
  grep -E "^llama" "$O/b.txt" | grep -v "graph of" | tee -a "$L"
done
step ncu s12 T=1024
BLR_BLAST_STAGE12=fused timeout 90 ncu --cache-control none --kernel-name regex:blr_blast_s12 --launch-skip 1 --launch-count 1 --section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section SchedulerStats --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,sm__inst_executed_pipe_tensor_op_gmma.sum,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,smsp__inst_executed.sum,smsp__average_warp_latency_issue_stalled_barrier.pct,smsp__average_warp_latency_issue_stalled_long_scoreboard.pct,smsp__average_warp_latency_issue_stalled_wait.pct $B bench layer --config llama7b-qkvo --tokens 1024 --formats blast --strategy partial --reps 2 --no-autotune > "$O/n.txt" 2>&1; echo "exit $?"
grep -vE "^==|^ *-+ *$|^\s*$|^    (OPT|INF|WRN)|^          " "$O/n.txt" | cut -c1-140 | tee -a "$L" | grep -E "Duration|L2 Cache Thr|Hit Rate|lts__t_bytes|dram__bytes|gmma|Eligible|Issued Warp|stalled" 
step racecheck
BLR_S12_TEST_SMALL=1 timeout 200 compute-sanitizer --tool racecheck --kernel-name kns=blr_blast_s12_wg $T layers::tests::gpu_blast_stage12 --nocapture --test-threads=1 > "$O/r.txt" 2>&1; echo "exit $?"
grep -vE "^stage12" "$O/r.txt" | head -60 | tee -a "$L" | cut -c1-200 | head -40
step done
