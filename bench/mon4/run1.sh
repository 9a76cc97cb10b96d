#!/usr/bin/env bash
# Device run 1 of helper "mon" (session 4): Monarch mid transpose old vs new (bench + ncu), all
# layer GPU tests, compute-sanitizer on the decode / fused / Monarch tests, decode and fused
# bench spot check. Carry .carry/mon (blr, t = blr-cuda lib test binary). Logs under $OUT.
set -uo pipefail
B=.carry/mon/blr; T=.carry/mon/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
nvidia-smi -L
step tests; timeout 150 $T layers:: --nocapture --test-threads=1 2>&1 | tee "$O/tests.log" | grep -E "^test |SKIP|parity:|test result" 
common="--config llama7b-down,llama7b-qkvo --tokens 128,1024 --formats dense,monarch --strategy unfused,partial --reps 20 --no-autotune"
step bench generic; BLR_MONARCH_MID=generic timeout 120 $B bench layer $common --out "$O/mid-generic.json" > "$O/bench-generic.txt" 2>&1; tail -n 14 "$O/bench-generic.txt"
step bench mid; timeout 120 $B bench layer $common --out "$O/mid-new.json" > "$O/bench-new.txt" 2>&1; tail -n 14 "$O/bench-new.txt"
met=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,lts__t_bytes.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum,l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum,l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active
ncuargs="--cache-control none --kernel-name regex:blr_monarch_(mid|out)_transpose --launch-skip 2 --launch-count 1 --metrics $met"
one="bench layer --config llama7b-down --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune"
step ncu generic; BLR_MONARCH_MID=generic timeout 90 ncu $ncuargs $B $one > "$O/ncu-generic.txt" 2>&1; grep -E "blr_monarch|\.sum|pct" "$O/ncu-generic.txt"
step ncu mid; timeout 90 ncu $ncuargs $B $one > "$O/ncu-mid.txt" 2>&1; grep -E "blr_monarch|\.sum|pct" "$O/ncu-mid.txt"
san="layers::tests::gpu_monarch layers::decode::tests::gpu layers::blast_fused::tests::gpu --test-threads=1 --nocapture"
for tool in memcheck racecheck; do
  step sanitizer $tool; BLR_FUSED_TEST_SMALL=1 timeout 120 compute-sanitizer --tool $tool --print-limit 20 $T $san > "$O/san-$tool.log" 2>&1; echo "exit $?"
  grep -E "^test |SUMMARY|test result" "$O/san-$tool.log"
done
step spot decode; timeout 60 $B bench layer --config llama7b-qkvo,llama3.2-1b-qo --tokens 1,16 --formats dense,lowrank,monarch,blast --strategy decode,unfused --reps 20 --no-autotune --out "$O/spot-decode.json" > "$O/spot-decode.txt" 2>&1; echo "exit $?"; tail -n 40 "$O/spot-decode.txt"
step spot fused; timeout 60 $B bench layer --config llama7b-qkvo --tokens 128,1024 --formats dense,blast --strategy partial,fused --reps 20 --no-autotune --out "$O/spot-fused.json" > "$O/spot-fused.txt" 2>&1; echo "exit $?"; tail -n 12 "$O/spot-fused.txt"
step done
