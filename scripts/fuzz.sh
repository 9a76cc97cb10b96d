#!/usr/bin/env bash
# Fuzz the file readers for a bounded time each (not part of CI: minutes, not seconds).
#
#   scripts/fuzz.sh                 # every target, FUZZ_SECONDS (default 120) each
#   FUZZ_SECONDS=600 scripts/fuzz.sh safetensors
#
# Targets (fuzz/fuzz_targets): safetensors (reader + blr checkpoint), gguf (reader, dequant,
# tokenizer construction), tokenizer (SmolLM2's BPE: encode never fails, decode(encode(x)) == x).
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Rust stable works through RUSTC_BOOTSTRAP=1
# (cargo-fuzz passes -Z flags). A crash leaves its input in fuzz/artifacts/<target>/: fix the
# bug, then copy the input to fuzz/regressions/<target>/ so the test suite replays it forever.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${FUZZ_SECONDS:-120}"
targets=("$@")
[[ ${#targets[@]} -gt 0 ]] || targets=(safetensors gguf tokenizer)

command -v cargo-fuzz >/dev/null || { echo "error: cargo-fuzz missing: cargo install cargo-fuzz" >&2; exit 1; }
export RUSTC_BOOTSTRAP=1

# Seeds: small valid inputs to start from, plus every kept regression input.
blr=target/release/blr
[[ -x $blr ]] || cargo build --release -p blr-cli
for t in "${targets[@]}"; do
    corpus="fuzz/corpus/$t"
    mkdir -p "$corpus"
    case "$t" in
        safetensors)
            for f in dense lowrank monarch blast; do
                [[ -s $corpus/seed-$f ]] || "$blr" init-layer --m 6 --n 4 --format "$f" --blocks 2 --rank 2 --out "$corpus/seed-$f" >/dev/null
            done ;;
        gguf|tokenizer)
            model=$(scripts/fetch-smollm2.sh)
            [[ $t == gguf && ! -s $corpus/seed-prefix ]] && head -c 65536 "$model" >"$corpus/seed-prefix"
            [[ $t == tokenizer && ! -s $corpus/seed-text ]] &&
                printf ' = Robert Boulter = \n He had a guest @-@ starring role in 2000 , 3.14 ; don'"'"'t   stop\tnaïve café 東京 🙂 <|im_start|>' >"$corpus/seed-text"
            true ;;
    esac
    [[ -d fuzz/regressions/$t ]] && cp -n fuzz/regressions/$t/* "$corpus/" 2>/dev/null || true
done

summary=()
for t in "${targets[@]}"; do
    echo "== fuzzing $t for ${seconds}s" >&2
    log="fuzz/$t.log"
    if (cd fuzz && cargo fuzz run --sanitizer none --release "$t" "corpus/$t" -- \
            -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=4096) >"$log" 2>&1; then
        runs=$(grep -oE 'Done [0-9]+ runs' "$log" | tail -1 || true)
        summary+=("$t: ok, ${runs:-see $log}, corpus $(ls "fuzz/corpus/$t" | wc -l) inputs")
    else
        summary+=("$t: CRASH, see $log and fuzz/artifacts/$t/")
    fi
done
printf '%s\n' "${summary[@]}"
