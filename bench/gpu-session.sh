#!/usr/bin/env bash
# One prepared GPU session (runs from the bundle on the GPU machine; no cargo there):
# the GPU check (parity tests, CPU/GPU CLI comparison, standard benchmark, PyTorch reference),
# then the Fast-dLLM cache rows and the offline batch rows, each beside its PyTorch reference.
#   bash gpu-bundle/gpu-session.sh RESULTS_DIR
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
res=${1:-results}
mkdir -p "$res"; res=$(cd "$res" && pwd)
cd "$here"
[ -f COMMIT ] && export LLADA_COMMIT="$(cat COMMIT)"

bash gpu-check.sh run "$res" 2>&1 | tee "$res/gpu-check.log" | tail -n 40

echo "== llada-bench: Fast-dLLM caches (steps 256 schedule, and threshold 0.9)"
timeout "${T_CACHE:-150}" bin/llada-bench --cache none,prefix,dual --threshold 0.9 --steps 256 \
    --json "$res/bench-cache.json" 2>&1 | tee "$res/bench-cache.log" | grep -v '^note'
echo "== torch_reference: Fast-dLLM caches"
timeout "${T_CACHE:-150}" python3 torch_reference.py --steps 256 --cache prefix,dual --threshold 0.9 \
    --json "$res/torch-cache.json" 2>&1 | tee "$res/torch-cache.log"
echo "== llada-bench: offline batches 8 and 32 (steps 32)"
timeout "${T_BATCH:-150}" bin/llada-bench --batch 8,32 --steps 32 \
    --json "$res/bench-batch.json" 2>&1 | tee "$res/bench-batch.log" | grep -v '^note'
echo "== done"; tail -n 12 "$res/gpu-check.log"
