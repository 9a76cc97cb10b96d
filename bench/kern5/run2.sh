#!/usr/bin/env bash
# Device run 2 of helper "kern" (session 5, issue #5): do cuBLASLt's own split-K variants help the
# low-rank GEMMs in situ? Same binary as run 1. Low-rank `unfused` (two cuBLASLt GEMMs) timed
# twice in one call: with the heuristic's first algorithm (as shipped), then with every GEMM
# tuned first (`--tune-gemms`: the heuristic's 16 candidates plus their split-K variants,
# SPLITK_NUM 2..16, each timed, the fastest pinned) and the row timed again.
# Carry .carry/kern. Few files under $OUT (at most 8 come back).
set -uo pipefail
B=.carry/kern/blr
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
LR="--config llama7b-qkvo,llama7b-gate-up,llama7b-down,llama3.2-1b-qo,llama3.2-1b-up --tokens 16,128,1024 --reps 20 --no-autotune"
step base; timeout 70 $B bench layer $LR --formats lowrank,dense --strategy unfused --out "$O/base.json" > "$O/base.txt" 2>&1; echo "exit $?"
step tuned; BLR_TUNE_SPLITK=1 BLR_TUNE_VERBOSE=1 BLR_TUNE_CANDIDATES=16 timeout 110 $B bench layer $LR --formats lowrank --strategy unfused --tune-gemms --out "$O/tuned.json" > "$O/tuned.txt" 2>&1; echo "exit $?"
python3 - "$O" <<'PY' | tee "$O/summary.txt"
import json,re,sys,os
o=sys.argv[1]
def load(n):
    try: return json.load(open(os.path.join(o,n)))
    except Exception as e: print("missing",n,e); return []
b,t,b2=load("base.json"),load("tuned.json"),[]
key=lambda r:(r["config"],r["tokens"],r["format"],r["layers_in_graph"])
B={key(r):r for r in b}; B2={key(r):r for r in b2}
print("config T graph | dense | lowrank base | tuned | base again | tuned/base")
for r in t:
    k=key(r); d=B.get((k[0],k[1],"dense",k[3]))
    x=B.get(k); y=B2.get(k)
    print(k[0],k[1],k[3],"|",d and "%.1f"%(d["ms"]*1e3),"|",x and "%.1f"%(x["ms"]*1e3),"|","%.1f"%(r["ms"]*1e3),"|",y and "%.1f"%(y["ms"]*1e3),"|",x and "%.3f"%(r["ms"]/x["ms"]), "err %.2e"%r["rel_error"])
# per GEMM: heuristic #0 vs best candidate (tune's own back-to-back timings, no flush)
first={}; best={}
for line in open(os.path.join(o,"tuned.txt")):
    m=re.search(r"tune (\d+x\d+x\d+) batch (\d+): #(\d+) (.*) ws (\d+) B: ([\d.]+) ms",line)
    if not m: continue
    k=m.group(1); tm=float(m.group(6))
    if m.group(3)=="0": first[k]=(tm,m.group(4))
    if k not in best or tm<best[k][0]: best[k]=(tm,"#"+m.group(3)+" "+m.group(4)+" ws "+m.group(5))
print("per GEMM (tune timings, us): heuristic #0 -> best")
for k in first:
    print(k, "%.1f -> %.1f"%(first[k][0]*1e3,best[k][0]*1e3), "|", first[k][1], "=>", best[k][1])
PY
grep -E "tuned llama" "$O/tuned.txt" | head -40
step done
