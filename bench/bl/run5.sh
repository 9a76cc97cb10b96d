#!/usr/bin/env bash
# Device run 5 of helper "bl": racecheck of blr_blast_s12_wg/_wg2 with parts ablated, to find what
# makes racecheck abort ("Internal Sanitizer Error ... hardware exception", runs 3-4):
# 9 = no wgmma, no proxy fence; 8 = no proxy fence; 13 = also no stage loads.
set -uo pipefail
T=.carry/bl/t
export PATH=/usr/local/cuda/bin:$PATH BLR_KERNEL_CACHE=/tmp/blr-kc
for a in 9 8 13; do
  echo "=== racecheck BLR_S12_ABLATE=$a"
  BLR_S12_ABLATE=$a BLR_S12_TEST_SMALL=1 timeout 150 compute-sanitizer --tool racecheck --kernel-name kns=blr_blast_s12 $T layers::tests::gpu_blast_stage12 --nocapture --test-threads=1 2>&1 | grep -vE "^stage12" | grep -E "RACECHECK SUMMARY|ERROR SUMMARY|test result|panicked|parity:|Error|rror:|Hazard|hazard" | head -12
done
