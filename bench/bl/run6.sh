#!/usr/bin/env bash
# Device run 6 of helper "bl": v3 (blr_blast_s12_wg3, persistent v2: the next tile's first stages
# load while a tile is mixed, W written from registers) against v2 and split, in one call:
# parity tests (v1, v2, v3 also at 1 and 3 CTAs, split), the brief's bench command per choice
# (split and v3 twice), ncu of v3 at q/k/v/o T=1024, memcheck of the fused kernels.
set -uo pipefail
B=.carry/bl/blr; T=.carry/bl/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"; L="$O/log.txt"
step() { echo "=== $(date +%T) $*" | tee -a "$L"; }
nvidia-smi -L | tee -a "$L"
step tests
timeout 150 $T layers::tests::gpu_blast_stage12 layers::blast_s12 --nocapture --test-threads=1 > "$O/t.txt" 2>&1; rc=$?; echo "exit $rc"
grep -E "parity:|panicked|test result" "$O/t.txt" | tee -a "$L"
if [ $rc -ne 0 ]; then grep -vE "^stage12" "$O/t.txt" | tail -n 30; step stop; exit 1; fi
CFG="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-up --tokens 128,1024 --formats dense,blast --strategy partial --reps 20 --no-autotune"
for k in split:2 fused:3 fused:2 split:2 fused:3; do
  step bench BLR_BLAST_STAGE12=${k%:*} BLR_S12_VARIANT=${k#*:}
  BLR_BLAST_STAGE12=${k%:*} BLR_S12_VARIANT=${k#*:} timeout 90 $B bench layer $CFG --out "$O/${k%:*}${k#*:}.json" > "$O/b.txt" 2>&1; echo "exit $?"; cat "$O/b.txt" >> "$L"
  grep -E "^llama" "$O/b.txt" | grep -v "graph of"
done
step ncu v3 T=1024
BLR_BLAST_STAGE12=fused BLR_S12_VARIANT=3 timeout 90 ncu --cache-control none --kernel-name regex:blr_blast_s12 --launch-skip 1 --launch-count 1 --section SpeedOfLight --section SchedulerStats --metrics dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum $B bench layer --config llama7b-qkvo --tokens 1024 --formats blast --strategy partial --reps 2 --no-autotune > "$O/n.txt" 2>&1; echo "exit $?"
grep -E "blr_blast|Duration|L2 Cache Thr|lts__t_bytes|dram__bytes|gmma|Eligible|Issued Warp|inst_executed" "$O/n.txt" | cut -c1-140 | tee -a "$L"
step memcheck
BLR_S12_TEST_SMALL=1 timeout 150 compute-sanitizer --tool memcheck --kernel-name kns=blr_blast_s12 $T layers::tests::gpu_blast_stage12 --nocapture --test-threads=1 > "$O/m.txt" 2>&1; echo "exit $?"
grep -E "ERROR SUMMARY|test result|panicked|parity:" "$O/m.txt" | tee -a "$L"
step done
