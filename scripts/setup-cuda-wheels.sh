#!/usr/bin/env bash
# Install NVIDIA's CUDA 13.0 NVRTC + headers from PyPI wheels into a private venv, so that
# every .cu kernel in crates/blr-cuda can be compiled (NVRTC -> cubin, per arch) on a machine
# with no GPU and no CUDA toolkit, e.g. CI.
#
#   scripts/setup-cuda-wheels.sh            # creates/updates .venv-cuda in the repo root
#   BLR_CUDA_VENV=/some/dir scripts/setup-cuda-wheels.sh
#
# Idempotent: a second run only verifies. Prints the lib and include dirs, and on its last two
# lines `export` statements that the caller can eval:
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

if [[ ! -x "$venv/bin/python" ]]; then
    echo "setup-cuda-wheels: creating venv $venv" >&2
    "$python" -m venv "$venv"
fi
# The venv must never be committed nor sent along to the GPU machine.
[[ -f "$venv/.gitignore" ]] || echo '*' >"$venv/.gitignore"

if ! "$venv/bin/python" -m pip show -q nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cuda-cccl >/dev/null 2>&1; then
    echo "setup-cuda-wheels: installing ${wheels[*]}" >&2
    "$venv/bin/python" -m pip install -q --disable-pip-version-check "${wheels[@]}" >&2
fi

site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
lib_dir="$site/nvidia/cu13/lib"
include_dir="$site/nvidia/cu13/include"

nvrtc_lib="$(ls "$lib_dir"/libnvrtc.so.13* 2>/dev/null | head -n1 || true)"
if [[ -z "$nvrtc_lib" ]]; then
    echo "setup-cuda-wheels: libnvrtc.so.13 not found under $lib_dir" >&2
    exit 1
fi
if [[ ! -f "$include_dir/cuda_bf16.h" ]]; then
    echo "setup-cuda-wheels: cuda_bf16.h not found under $include_dir" >&2
    exit 1
fi

echo "lib dir:     $lib_dir"
echo "include dir: $include_dir"
echo "export BLR_NVRTC_LIB_DIR='$lib_dir'"
echo "export BLR_CUDA_INCLUDE='$include_dir'"
