#!/usr/bin/env bash
# Device run 3 of helper "kern" (session 5, issue #5): the measured cuBLASLt choice (GEMM cache)
# for low-rank prefill, before -> after in one call:
#   before: GEMM cache off (the heuristic's first algorithm, as shipped before);
#   tune:   `--tune-gemms` on the low-rank rows (L2-flushed candidate timing incl. split-K
#           variants; a row's choices kept only if the layer got faster), written to the cache;
#   after:  the same bench as `before`, reading the cache (what every blr process now does);
#   then the GEMM cache GPU test (tune -> save -> fresh handle uses it; damaged entry ignored).
# Carry .carry/kern (blr, t). At most 8 files under $OUT.
set -uo pipefail
B=.carry/kern/blr; T=.carry/kern/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
C="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-qo,llama3.2-1b-up --tokens 128,1024 --reps 20"
step before; BLR_GEMM_CACHE=off timeout 60 $B bench layer $C --formats lowrank,dense --strategy unfused --no-autotune --out "$O/before.json" > "$O/before.txt" 2>&1; echo "exit $?"
step tune; BLR_GEMM_CACHE="$O/gemm-algos.tsv" BLR_TUNE_SPLITK=1 BLR_TUNE_CANDIDATES=16 timeout 100 $B bench layer $C --formats lowrank --strategy unfused --tune-gemms --autotune /tmp/at.tsv > "$O/tune.txt" 2>&1; echo "exit $?"
grep -E "tuned|gemm cache" "$O/tune.txt" | cut -c1-260
step after; BLR_GEMM_CACHE="$O/gemm-algos.tsv" timeout 60 $B bench layer $C --formats lowrank,dense --strategy unfused --no-autotune --out "$O/after.json" > "$O/after.txt" 2>&1; echo "exit $?"
grep -E "gemm cache" "$O/after.txt"
python3 - "$O" <<'PY'
import json,os,sys
o=sys.argv[1]
b=json.load(open(os.path.join(o,"before.json"))); a=json.load(open(os.path.join(o,"after.json")))
k=lambda r:(r["config"],r["tokens"],r["format"],r["layers_in_graph"])
A={k(r):r for r in a}
print("config T graph format | before us (vs dense) | after us (vs dense, frac floor) | after/before | err")
for r in b:
    x=A.get(k(r))
    if not x: continue
    print(r["config"],r["tokens"],r["layers_in_graph"],r["format"],"| %.1f (%.2fx)"%(r["ms"]*1e3,r["speedup_vs_dense"]),"| %.1f (%.2fx, %.0f%%)"%(x["ms"]*1e3,x["speedup_vs_dense"],100*x["roofline_frac"]),"| %.3f"%(x["ms"]/r["ms"]),"| %.2e"%x["rel_error"])
PY
step gemm tests; timeout 60 $T gemm:: --nocapture --test-threads=1 > "$O/tests.log" 2>&1; echo "exit $?"
grep -E "^test |test result|panicked|SKIP" "$O/tests.log" | cut -c1-200
step done
