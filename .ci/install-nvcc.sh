#!/usr/bin/env bash
# Install the pinned CUDA 13.0 compiler from PyPI wheels into the project-local .tools/cuda
# (ignored by git), unless it is already there. Idempotent. Prints the nvcc path on stdout.
#
# Pins (docs: newer wheels emit PTX a CUDA 13.0 / r580 driver refuses, and unpinned dependencies
# pull the newest nvvm): nvcc, nvvm and crt 13.0.88, runtime 13.0.96, cccl 13.0.85 (<nv/target>),
# nvtx 13.0.85 (the header-only NVTX3 API for the profiler ranges).
# build.rs finds .tools/cuda/nvidia/cu13/bin/nvcc by itself; NVCC=... overrides.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
dest="${LLADA_CUDA_TOOLS:-$root/.tools/cuda}"
nvcc="$dest/nvidia/cu13/bin/nvcc"
want="release 13.0, V13.0.88"

if [[ -x "$nvcc" ]] && "$nvcc" --version 2>/dev/null | grep -q "$want" \
    && [[ -d "$dest/nvidia/cu13/include/cccl" || -d "$dest/nvidia/cu13/include/nv" ]] \
    && [[ -f "$dest/nvidia/cu13/include/nvtx3/nvToolsExt.h" ]]; then
    echo "$nvcc"
    exit 0
fi

mkdir -p "$dest"
python3 -m pip install --quiet --disable-pip-version-check --no-warn-script-location --upgrade \
    --target "$dest" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-nvtx==13.0.85 >&2

if ! "$nvcc" --version | grep -q "$want"; then
    echo "install-nvcc.sh: $nvcc is not nvcc 13.0.88 after installing" >&2
    exit 1
fi
echo "$nvcc"
