#!/usr/bin/env bash
# Device run 3 of helper "tma": diagnosis of the hang of run 2's parity test. The test binary
# carries a watchdog in tma_bar_wait (printf + trap after ~2 s of waiting on one mbarrier phase),
# so a deadlock reports which kernel (block size), block, thread, barrier and parity.
set -uo pipefail
T=.carry/tma/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
O=${OUT:-/tmp/out}; mkdir -p "$O"
step() { echo "=== $(date +%T) $*"; }
step tests; timeout 60 $T layers::tests::gpu_monarch --nocapture --test-threads=1 > "$O/tests.log" 2>&1; echo "exit $?"
grep -E "DBG|parity|panicked|test result" "$O/tests.log" | sort | uniq -c | sort -rn | head -30 | cut -c1-250
step sass; f=$(ls /tmp/blr-kc/monarch-sm_90a-*.cubin | head -1); nvdisasm -c "$f" > "$O/monarch.sass" 2>&1; echo "nvdisasm $?"
awk '/\.text\./{fn=$0} /HGMMA/{c[fn]++} /UTMALDG/{u[fn]++} /LDGSTS/{g[fn]++} /LDL|STL/{l[fn]++} /BAR.SYNC|BAR.ARV/{b[fn]++} END{for (f in c) print f, "HGMMA", c[f]; for (f in u) print f, "UTMALDG", u[f]; for (f in g) print f, "LDGSTS", g[f]; for (f in l) print f, "LDL/STL", l[f]; for (f in b) print f, "BAR", b[f]}' "$O/monarch.sass" | grep stage1
step done
