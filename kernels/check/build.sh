#!/usr/bin/env bash
# Standalone kernel checks that need no cargo on the GPU machine.
#   kernels/check/build.sh [OUTDIR]   (default target/kernel-check)
# 1. regenerates rngref.h from src/rng.rs (rustc) and checks kernels/rng.cuh against it on the
#    host (g++, intrinsics shimmed to IEEE ops): the RNG twin must be bit-exact;
# 2. if nvcc is found (NVCC, CUDA_HOME, PATH, .tools/cuda), builds OUTDIR/kernel-check, a static
#    binary that runs every kernel on the GPU against C++ references and prints timings.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${1:-$root/target/kernel-check}"
mkdir -p "$out"
rustc -O --edition 2021 -o "$out/rngref" "$here/rngref.rs"
"$out/rngref" > "$out/rngref.h"
g++ -std=c++17 -O2 -ffp-contract=off -I"$out" -o "$out/rnghost" "$here/rnghost.cpp"
"$out/rnghost"

nvcc="${NVCC:-}"
[[ -z "$nvcc" && -n "${CUDA_HOME:-}" && -x "$CUDA_HOME/bin/nvcc" ]] && nvcc="$CUDA_HOME/bin/nvcc"
[[ -z "$nvcc" ]] && nvcc="$(command -v nvcc || true)"
[[ -z "$nvcc" && -x "$root/.tools/cuda/nvidia/cu13/bin/nvcc" ]] && nvcc="$root/.tools/cuda/nvidia/cu13/bin/nvcc"
if [[ -z "$nvcc" ]]; then
    echo "build.sh: no nvcc; skipped the GPU harness" >&2
    exit 0
fi
libdir="$(dirname "$nvcc")/../lib"
"$nvcc" -O2 -std=c++17 -gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90a,code=sm_90a \
    -I"$out" -L"$libdir" -o "$out/kernel-check" "$here/harness.cu"
echo "$out/kernel-check"
