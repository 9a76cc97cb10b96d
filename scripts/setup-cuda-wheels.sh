#!/usr/bin/env bash
# Install NVIDIA's CUDA 13.0 NVRTC + headers from PyPI wheels into a private venv, so that
# every .cu kernel in crates/blr-cuda can be compiled (NVRTC -> cubin, per arch) on a machine
# with no GPU and no CUDA toolkit, e.g. CI.
#
#   scripts/setup-cuda-wheels.sh            # creates/updates .venv-cuda in the repo root
#   BLR_CUDA_VENV=/some/dir scripts/setup-cuda-wheels.sh
#
# Idempotent: once the libraries and headers are in place, a second run installs nothing.
# Without the `venv` module (Debian's python3-venv missing) it falls back to
# `pip install --target <dir>/lib/python3/site-packages`, a layout blr-cuda also searches.
# Prints the lib and include dirs, and `export` lines the caller can eval:
#
#   eval "$(scripts/setup-cuda-wheels.sh | grep '^export ')"
#
# The NVRTC compile test (`cargo test -p blr-cuda --test nvrtc_compile`) finds the wheels
# through BLR_NVRTC_LIB_DIR / BLR_CUDA_INCLUDE, or by itself under .venv-cuda.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${BLR_CUDA_VENV:-$repo_root/.venv-cuda}"
python="${PYTHON:-python3}"

# Pinned to the CUDA major/minor the GPU machines run (driver 580, CUDA 13.0): a cubin from a
# newer NVRTC can use features this driver rejects.
wheels=('nvidia-cuda-nvrtc==13.0.*' 'nvidia-cuda-runtime==13.0.*' 'nvidia-cuda-cccl==13.0.*')

installed() {
    [[ -n "$(ls "$1"/nvidia/cu13/lib/libnvrtc.so.13* 2>/dev/null | head -n1)" ]] &&
        [[ -f "$1/nvidia/cu13/include/cuda_bf16.h" ]]
}

mkdir -p "$venv"
# The venv must never be committed nor sent along to the GPU machine.
[[ -f "$venv/.gitignore" ]] || echo '*' >"$venv/.gitignore"

site=""
if [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv" >/dev/null 2>&1; then
    site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    if ! installed "$site"; then
        echo "setup-cuda-wheels: installing ${wheels[*]} into $venv" >&2
        "$venv/bin/python" -m pip install -q --disable-pip-version-check "${wheels[@]}" >&2
    fi
else
    site="$venv/lib/python3/site-packages"
    if ! installed "$site"; then
        echo "setup-cuda-wheels: no venv module; pip install --target $site" >&2
        "$python" -m pip install -q --disable-pip-version-check --target "$site" "${wheels[@]}" >&2
    fi
fi

lib_dir="$site/nvidia/cu13/lib"
include_dir="$site/nvidia/cu13/include"
if ! installed "$site"; then
    echo "setup-cuda-wheels: libnvrtc.so.13 or cuda_bf16.h missing under $site/nvidia/cu13" >&2
    exit 1
fi

echo "lib dir:     $lib_dir"
echo "include dir: $include_dir"
echo "export BLR_NVRTC_LIB_DIR='$lib_dir'"
echo "export BLR_CUDA_INCLUDE='$include_dir'"
