#!/usr/bin/env bash
# CPU dry run of bench/gpu-session.sh's `curve` group: the same script, commands and paths as the
# GPU call, on the tiny preset (llada f32 on the CPU, PyTorch replays in f32 and bf16 autocast on
# the CPU, loss_curve.py's verdict, the #17 target steps), from a bundle laid out like the GPU
# one, so a typo cannot waste device time. Needs a release build and a python3 with torch.
#   cargo build --release && PYTHON=/tmp/peftenv/bin/python bash bench/curve-dry-run.sh [OUT]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
out=${1:-$root/target/curve-dry-run}
b=$out/bundle
rm -rf "$out"
mkdir -p "$b/bin"
cp "$root/target/release/llada" "$b/bin/"
cp "$root/bench/gpu-session.sh" "$root/bench/torch_reference.py" "$root/bench/loss_curve.py" "$b/"
GPU_SESSION_ONLY=curve CURVE_DEVICE=cpu CURVE_PRESET=tiny CURVE_STEPS="${CURVE_STEPS:-20}" \
    CURVE_BATCH=2 CURVE_SEQ=32 CURVE_LR=1e-3 CURVE_BUDGET="${CURVE_BUDGET:-450}" \
    TARGET_DEVICE=cpu TARGET_PRESET=tiny TARGET_BATCH=2 TARGET_SEQ=64 LORA_PRESET=tiny LORA_SEQ=64 \
    bash "$b/gpu-session.sh" "$out/results"
# Every file the GPU call is to produce exists, and the f32 comparison passed.
"${PYTHON:-python3}" - "$out/results" <<'PY'
import glob, json, sys
d = glob.glob(f"{sys.argv[1]}/*-cpu")
assert len(d) == 1, d
for f in ("loss-curve.json", "train-throughput.json", "lora-8b.json", "torch-replay-f32.json",
          "torch-replay-bf16.json", "llada-f32.dump.jsonl"):
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
