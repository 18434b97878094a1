#!/usr/bin/env bash
# CPU dry run of bench/gpu-session.sh's `curve` group: the same script, commands and paths as the
# GPU call, on the tiny preset (llada f32 on the CPU, PyTorch replays in f32 and bf16 autocast on
# the CPU, loss_curve.py's verdict, the #17 target steps), from a bundle laid out like the GPU
# one, so a typo cannot waste device time. Needs a release build and a python3 with torch.
#   cargo build --release && PYTHON=/tmp/peftenv/bin/python bash bench/curve-dry-run.sh [OUT]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
default=$root/target/curve-dry-run
out=${1:-$default}
b=$out/bundle
# Only its own output is removed: the default dir, or a dir an earlier dry run made (it holds
# the marker below). Any other existing path is refused, never `rm -rf`ed.
if [ -e "$out" ]; then
    if [ "$out" != "$default" ] && [ ! -f "$out/.curve-dry-run" ]; then
        echo "curve-dry-run: $out exists and is not a curve-dry-run output (no $out/.curve-dry-run); not removing it" >&2
        exit 2
    fi
    rm -rf "$out"
fi
mkdir -p "$b/bin" "$out/scratch"
touch "$out/.curve-dry-run"
cp "$root/target/release/llada" "$b/bin/"
cp "$root/bench/gpu-session.sh" "$root/bench/torch_reference.py" "$root/bench/loss_curve.py" "$b/"
GPU_SESSION_ONLY=curve CURVE_DEVICE=cpu CURVE_PRESET=tiny CURVE_STEPS="${CURVE_STEPS:-20}" \
    CURVE_BATCH=2 CURVE_SEQ=32 CURVE_LR=1e-3 CURVE_BUDGET="${CURVE_BUDGET:-450}" \
    TARGET_DEVICE=cpu TARGET_PRESET=tiny TARGET_BATCH=2 TARGET_SEQ=64 LORA_PRESET=tiny LORA_SEQ=64 \
    SCRATCH_DIR="$out/scratch" bash "$b/gpu-session.sh" "$out/results"
# The results dir is what comes back from the device: it must stay small (no checkpoint, no
# train --out folder), and the session must have removed its scratch.
kb=$(du -sk "$out/results" | cut -f1)
du -sh "$out/results"
if [ "$kb" -gt "${MAX_RESULTS_KB:-4096}" ]; then
    echo "curve-dry-run: FAIL: $out/results is ${kb} KiB (> ${MAX_RESULTS_KB:-4096}); large files:" >&2
    find "$out/results" -size +256k -exec ls -l {} + >&2
    exit 1
fi
# (the tiny checkpoint is only ~1 MB, under the size limit: look for checkpoints by name too)
big=$(find "$out/results" -name '*.safetensors' -o -name 'config.json' | head -n 5)
if [ -n "$big" ]; then
    echo "curve-dry-run: FAIL: checkpoint files under the results dir: $big" >&2
    exit 1
fi
if [ -n "$(ls -A "$out/scratch")" ]; then
    echo "curve-dry-run: FAIL: the session left scratch behind: $(ls -A "$out/scratch")" >&2
    exit 1
fi
# Every file the GPU call is to produce exists, and the f32 comparison passed.
"${PYTHON:-python3}" - "$out/results" <<'PY'
import glob, json, sys
d = glob.glob(f"{sys.argv[1]}/*-cpu")
assert len(d) == 1, d
for f in ("loss-curve.json", "train-throughput.json", "lora-8b.json", "torch-replay-f32.json",
          "torch-replay-bf16.json", "llada-f32.dump.jsonl.gz"):
    assert glob.glob(f"{d[0]}/{f}"), f"missing {f}"
c = json.load(open(f"{d[0]}/loss-curve.json"))
assert c["verdict"]["f32"]["passed"], c["verdict"]
noise = [r["noise"] for r in c["steps"]]
assert all(n is not None for n in noise) and max(noise) > 0, "no bf16 noise measured"
t = json.load(open(f"{d[0]}/train-throughput.json"))["rows"]
assert t and t[0]["llada_tokens_per_s"] and t[0]["torch_tokens_per_s"], t
l = json.load(open(f"{d[0]}/lora-8b.json"))
assert l["steps"] == 3 and l["tokens_per_s"], l
print(f"dry run OK: {d[0]} (f32 worst distance/bound {c['verdict']['f32']['worst_ratio']:.3g}, "
      f"bf16 noise up to {max(noise):.3g})")
PY
