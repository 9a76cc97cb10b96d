#!/usr/bin/env bash
# Device run 1 of helper "kern" (session 5, issue #5): low-rank prefill split-K and the pipelined
# wgmma Monarch stage 1, one binary, variants by environment knobs.
#   1. layer tests (low-rank split-K parity, Monarch parity with wgp3/wgp4, all-format parity);
#      stops if they fail.
#   2. the brief's side-by-side: dense + every low-rank strategy (unfused = two cuBLASLt GEMMs,
#      partial = split-K by blr's rule, decode at T=16) in one command.
#   3. forced split counts (BLR_LOWRANK_SPLITS) against the rule.
#   4. cuBLASLt's own candidates + its split-K variants for the low-rank GEMMs (tune, verbose).
#   5. ncu: kernels of low-rank unfused / partial at qkvo T=128 and 1024.
#   6. Monarch stage 1 variants (BLR_MONARCH_STAGE1=wgmma|wgp3|wgp4), bench and ncu.
# Carry .carry/kern (blr, t = blr-cuda lib test binary). Logs under $OUT.
set -uo pipefail
B=.carry/kern/blr; T=.carry/kern/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
nvidia-smi -L
step tests; timeout 150 $T layers:: --nocapture --test-threads=1 > "$O/tests.log" 2>&1; rc=$?; echo "exit $rc"
grep -E "^test |parity|panicked|rel err|test result|SKIP" "$O/tests.log" | cut -c1-300
if [ $rc -ne 0 ]; then tail -n 30 "$O/tests.log"; step stop; exit 1; fi
LR="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-qo,llama3.2-1b-up"
step bench A: brief command
timeout 120 $B bench layer $LR --tokens 16,128,1024 --formats lowrank,dense --reps 20 --no-autotune --out "$O/a.json" > "$O/a.txt" 2>&1; echo "exit $?"
grep -E "^(llama|config)" "$O/a.txt" | grep -v "graph of"
for v in "auto,1" "2,1" "8,1"; do
  step bench splits $v
  BLR_LOWRANK_SPLITS=$v timeout 60 $B bench layer $LR --tokens 128,1024 --formats lowrank --strategy partial --reps 20 --no-autotune --out "$O/s-${v/,/_}.json" > "$O/s-${v/,/_}.txt" 2>&1; echo "exit $?"
  grep -E "^llama" "$O/s-${v/,/_}.txt" | grep -v "graph of"
done
step tune cuBLASLt candidates + split-K
BLR_TUNE_SPLITK=1 BLR_TUNE_VERBOSE=1 BLR_TUNE_CANDIDATES=16 timeout 90 $B bench layer --config llama7b-qkvo,llama7b-gate-up --tokens 128,1024 --formats lowrank --strategy unfused --reps 10 --no-autotune --tune-gemms > "$O/tune.txt" 2>&1; echo "exit $?"
grep -E "tuned|#0 |^llama" "$O/tune.txt" | cut -c1-200
python3 - "$O/tune.txt" <<'PY'
import re,sys
best={}
cur=None
for line in open(sys.argv[1]):
    m=re.search(r"tune (\d+x\d+x\d+) batch (\d+): #(\d+) (.*) ws \d+ B: ([\d.]+) ms",line)
    if m:
        k=(m.group(1),m.group(2)); t=float(m.group(5))
        if k not in best or t<best[k][0]: best[k]=(t,m.group(3),m.group(4))
        if m.group(3)=="0": print("first", k, m.group(4), t)
for k,v in best.items(): print("best ", k, "#%s"%v[1], v[2], v[0])
PY
met=gpu__time_duration.sum,launch__grid_size,launch__block_size,dram__bytes_read.sum,sm__throughput.avg.pct_of_peak_sustained_elapsed
step ncu lowrank qkvo
timeout 90 ncu --cache-control none --kernel-name regex:"nvjet|splitk|gemm|cutlass|sm90|xmma|Kernel" --launch-count 400 --metrics $met --csv $B bench layer --config llama7b-qkvo --tokens 128,1024 --formats lowrank --strategy unfused,partial --reps 2 --no-autotune > "$O/ncu-lr.csv" 2> "$O/ncu-lr.err"; echo "exit $?"
python3 - "$O/ncu-lr.csv" <<'PY'
import csv,sys,collections
rows=[r for r in csv.reader(l for l in open(sys.argv[1]) if l.startswith('"'))]
if not rows: sys.exit("no ncu rows")
h=rows[0]; ki=h.index("Kernel Name"); mi=h.index("Metric Name"); vi=h.index("Metric Value"); ii=h.index("ID")
k=collections.OrderedDict()
for r in rows[1:]:
    d=k.setdefault(r[ii],{"name":r[ki][:90]}); d[r[mi]]=r[vi]
items=list(k.values())
print(len(items),"kernels; last 40:")
for d in items[-40:]:
    print("%-90s grid %-8s blk %-5s %8s ns dram %s sm%% %s"%(d["name"],d.get("launch__grid_size"),d.get("launch__block_size"),d.get("gpu__time_duration.sum"),d.get("dram__bytes_read.sum"),d.get("sm__throughput.avg.pct_of_peak_sustained_elapsed")))
PY
MC="--config llama7b-qkvo,llama7b-gate-up,llama7b-down --tokens 128,1024 --reps 20 --no-autotune"
for v in wgmma wgp3 wgp4; do
  step bench monarch stage1=$v
  BLR_MONARCH_STAGE1=$v timeout 60 $B bench layer $MC --formats monarch --strategy partial --out "$O/m-$v.json" > "$O/m-$v.txt" 2>&1; echo "exit $?"
  grep -E "^llama" "$O/m-$v.txt" | grep -v "graph of"
done
met2=gpu__time_duration.sum,lts__t_bytes.sum,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,smsp__inst_executed.sum,launch__grid_size,launch__registers_per_thread,launch__occupancy_limit_shared_mem
for v in wgmma wgp3 wgp4; do
  step ncu monarch stage1 $v; BLR_MONARCH_STAGE1=$v timeout 45 ncu --cache-control none --kernel-name regex:blr_monarch_stage1 --launch-skip 1 --launch-count 1 --metrics $met2 $B bench layer --config llama7b-qkvo --tokens 1024 --formats monarch --strategy partial --reps 2 --no-autotune > "$O/ncu-m-$v.txt" 2>&1; grep -E "blr_monarch|\.sum|pct|launch__" "$O/ncu-m-$v.txt"
done
step done
