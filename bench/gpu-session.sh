#!/usr/bin/env bash
# One prepared GPU session (runs from the bundle on the GPU machine; no cargo there):
# the GPU check (parity tests, CPU/GPU CLI comparison, standard benchmark, PyTorch reference),
# the switches not yet passed on a GPU (LLADA_DEVICE_SELECT, LLADA_FUSED, LLADA_STEP_GRAPH: parity +
# one bench line),
# then the Fast-dLLM cache rows and the offline batch rows, each beside its PyTorch reference,
# the likelihood rows, and training throughput (llada-1b, bf16 and f32 GEMMs) beside the PyTorch
# training reference (torch_reference.py --train), with the ratio, and a short LoRA run of the
# llada-8b preset at 2048 tokens (tokens/s, peak memory).
#   bash gpu-bundle/gpu-session.sh RESULTS_DIR
#   GPU_SESSION_ONLY=fa2 bash gpu-bundle/gpu-session.sh RESULTS_DIR   (only the FA2 attention checks)
#   GPU_SESSION_ONLY=step bash gpu-bundle/gpu-session.sh RESULTS_DIR  (only the LLADA_DEVICE_SELECT /
#     LLADA_FUSED / LLADA_STEP_GRAPH checks: their parity tests and one bench line each way)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
res=${1:-results}
mkdir -p "$res"; res=$(cd "$res" && pwd)
cd "$here"
[ -f COMMIT ] && export LLADA_COMMIT="$(cat COMMIT)"
# On the device NCCL must load: the data-parallel tests fail instead of printing SKIP.
export LLADA_REQUIRE_NCCL=1

# FA2-class attention (LLADA_ATTN=fa2, off by default until this passes): the GPU parity suite
# (its fa2_* tests call the kernel explicitly; with the variable set every other test, the graph
# and generation ones included, runs on it too), the Fast-dLLM cache tests and the model tests
# (lockstep generation), then the same llada-bench rows with and without it (the kernel harness,
# run by gpu-check.sh, also checks and times both kernels).
# GPU_SESSION_ONLY=fa2 runs just this and the kernel harness (a short device call).
fa2_checks() {
    echo "== LLADA_ATTN=fa2: cuda_parity, cache gpu_ and cuda_model tests on the FA2 attention kernels"
    for t in "test-cuda_parity" "test-cache gpu_" "test-cuda_model"; do
        LLADA_ATTN=fa2 LLADA_REQUIRE_GPU=1 timeout "${T_FA2_TEST:-180}" test-bins/$t >"$res/fa2-${t%% *}.log" 2>&1
        echo "exit $? ($t): $(grep -E '^test result' "$res/fa2-${t%% *}.log" | tail -n 1)"
        grep -E '^test .* FAILED$|panicked at' "$res/fa2-${t%% *}.log" | head -n 10
    done
    echo "== llada-bench: attention kernels, default vs LLADA_ATTN=fa2 (cache none and dual, steps 64, batch 1 and 8)"
    for attn in mma fa2; do
        LLADA_ATTN=$attn timeout "${T_FA2_BENCH:-150}" bin/llada-bench --cache none,dual --steps 64 --batch 1,8 \
            --json "$res/bench-attn-$attn.json" 2>&1 | tee "$res/bench-attn-$attn.log" | grep -v '^note'
    done
}
if [ "${GPU_SESSION_ONLY:-}" = fa2 ]; then
    echo "== kernel-check (standalone kernel harness: FA2 parity and timings)"
    timeout "${T_FA2_TEST:-180}" bin/kernel-check >"$res/kernel-check.log" 2>&1
    echo "exit $?"; grep -E "attention_fa2|TIMING attention|FAIL|ALL OK" "$res/kernel-check.log"
    fa2_checks
    exit 0
fi

# Issue #14 switches, off by default until this passes (GPU_SESSION_ONLY=step runs just this, a
# short device call): LLADA_DEVICE_SELECT=1 (the commit selection on the device),
# LLADA_FUSED=1 (RoPE + KV-cache store in one pass) and LLADA_STEP_GRAPH=1 (the whole step as
# one graph replay: head, selection and token write on the device).
step_checks() {
    echo "== switches not yet passed on a GPU: LLADA_DEVICE_SELECT=1 (commit selection on the device), LLADA_FUSED=1 (rope_kv_store), LLADA_STEP_GRAPH=1 (whole step on the device)"
    # Their parity tests (also inside gpu-check's cuda_parity run), then one bench line with the
    # first two switches and one with the step graph beside the default, same run, same flags.
    for f in commit_select_matches_reference device_select_generation_equals_host_select \
             rope_kv_store_matches_rope_then_kv_store fused_generation_equals_unfused \
             step_advance_matches_reference select_at_step_equals_select_with_that_step \
             step_graph_generation_equals_host_select; do
        LLADA_REQUIRE_GPU=1 timeout "${T_SWITCH:-300}" test-bins/test-cuda_parity --exact "$f" \
            >"$res/switch-$f.log" 2>&1
        echo "exit $? $f: $(grep -Eo '[0-9]+ passed; [0-9]+ failed' "$res/switch-$f.log" | head -n 1)"
    done
    # graph: LLADA_STEP_GRAPH=1 alone (the dual-cache rows: each block's full pass per call with
    # the device selection, its cached calls as step graphs).
    for sw in off on graph; do
        if [ $sw = on ]; then export LLADA_DEVICE_SELECT=1 LLADA_FUSED=1; fi
        if [ $sw = graph ]; then export LLADA_STEP_GRAPH=1; fi
        timeout "${T_SWITCH:-300}" bin/llada-bench --cache none,dual --threshold 0.9 --steps 256 --breakdown \
            --json "$res/bench-switch-$sw.json" >"$res/bench-switch-$sw.log" 2>&1
        echo "exit $? (switches $sw)"
        unset LLADA_DEVICE_SELECT LLADA_FUSED LLADA_STEP_GRAPH
    done
    python3 - "$res" <<'PY' || echo "switch comparison: n/a"
import json, sys
res = sys.argv[1]
rows = {sw: json.load(open(f"{res}/bench-switch-{sw}.json"))["rows"] for sw in ("off", "on", "graph")}
print(f"{'cache':>6} {'rule':>9} {'tok/s off':>10} {'tok/s on':>10} {'tok/s graph':>12} {'ms off':>8} {'ms on':>8} {'ms graph':>9} {'graph select':>12} {'glue ms off/on':>15} {'head ms off/on':>15}")
for a, b, g in zip(rows["off"], rows["on"], rows["graph"]):
    cls = lambda r, c: dict(r.get("breakdown_ms_per_step") or []).get(c, float("nan"))
    rule = "thr %s" % a["threshold"] if a["threshold"] else "schedule"
    print(f"{a['cache']:>6} {rule:>9} {a['tokens_per_s']:>10.1f} {b['tokens_per_s']:>10.1f} {g['tokens_per_s']:>12.1f} "
          f"{a['ms_per_step_median']:>8.2f} {b['ms_per_step_median']:>8.2f} {g['ms_per_step_median']:>9.2f} "
          f"{g.get('select', '?'):>12} "
          f"{cls(a, 'norm+elementwise'):>7.3f}/{cls(b, 'norm+elementwise'):<7.3f} "
          f"{cls(a, 'sampler/head'):>7.3f}/{cls(b, 'sampler/head'):<7.3f}")
PY
}
if [ "${GPU_SESSION_ONLY:-}" = step ]; then
    step_checks
    exit 0
fi

GPU_CHECK_BENCH_ARGS="${GPU_CHECK_BENCH_ARGS:---breakdown}" bash gpu-check.sh run "$res" 2>&1 | tee "$res/gpu-check.log" | tail -n 60
fa2_checks

step_checks

echo "== llada-bench: Fast-dLLM caches (steps 256 schedule, and threshold 0.9)"
timeout "${T_CACHE:-150}" bin/llada-bench --cache none,prefix,dual --threshold 0.9 --steps 256 \
    --json "$res/bench-cache.json" 2>&1 | tee "$res/bench-cache.log" | grep -v '^note'
echo "== torch_reference: Fast-dLLM caches"
timeout "${T_CACHE:-150}" python3 torch_reference.py --steps 256 --cache prefix,dual --threshold 0.9 \
    --json "$res/torch-cache.json" 2>&1 | tee "$res/torch-cache.log"
echo "== llada-bench without CUDA graphs (LLADA_NO_GRAPHS=1), for the graphs' effect"
LLADA_NO_GRAPHS=1 timeout "${T_CACHE:-150}" bin/llada-bench --cache none,dual --steps 64 \
    --json "$res/bench-nographs.json" 2>&1 | tee "$res/bench-nographs.log" | grep -v '^note'
echo "== llada-bench: offline batches 8 and 32 (steps 32)"
timeout "${T_BATCH:-150}" bin/llada-bench --batch 8,32 --steps 32 \
    --json "$res/bench-batch.json" 2>&1 | tee "$res/bench-batch.log" | grep -v '^note'
echo "== llada loglik: Monte-Carlo ELBO on the 8B preset (prompt 128, answer 16, mc_num 128)"
prompt=$(seq -s, 1000 1127); answer=$(seq -s, 2000 2015)
for bs in 8 32; do
    timeout "${T_LOGLIK:-100}" bin/llada loglik --preset llada-8b --device cuda --format json \
        --prompt-ids "$prompt" --answer-ids "$answer" --mc-num 128 --batch-size $bs \
        >"$res/loglik-8b-bs$bs.json" 2>>"$res/loglik-8b.log"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(f'batch {sys.argv[2]}: {d[\"forward_passes\"]} forwards in {d[\"seconds\"]:.3f} s = {1/d[\"seconds\"]:.2f} loglik evaluations/s (mc_num 128)')" "$res/loglik-8b-bs$bs.json" $bs 2>&1
done
echo "== llada train: llada-1b preset (1.24 B parameters), batch 8 x 512 tokens, bf16 vs f32 GEMMs"
# Random token ids (no tokenizer for the presets): 160 documents of 1000 ids below 126000.
python3 -c "import json,random; random.seed(0); print('\n'.join(json.dumps({'ids':[random.randrange(126000) for _ in range(1000)]}) for _ in range(160)))" >"$res/train-ids.jsonl"
# MFU against PEAK_TFLOPS (default: H100 SXM dense bf16, 989 TFLOP/s; the f32 run is measured
# against the same peak, for comparison).
for prec in bf16 f32; do
    [ $prec = bf16 ] && steps=6 || steps=3
    timeout "${T_TRAIN:-300}" bin/llada train --preset llada-1b --device cuda --precision $prec \
        --data "$res/train-ids.jsonl" --out "$res/train-1b" --steps $steps --batch-size 8 --seq-len 512 \
        --warmup 1 --no-truncate --no-save --peak-tflops "${PEAK_TFLOPS:-989}" \
        >"$res/train-1b-$prec.log" 2>&1
    echo "exit $? ($prec); $(grep -m1 '^device:' "$res/train-1b-$prec.log")"
    grep '\] step ' "$res/train-1b-$prec.log" | tail -n 1 | sed 's/^.*\] //'
done
echo "== torch_reference --train: the same training step in PyTorch (llada-1b, batch 8 x 512)"
# bf16 = torch.autocast to bf16 around forward + loss with f32 master weights (the counterpart of
# --precision bf16); f32 = plain f32 with TF32 off. One process per precision.
for prec in bf16 f32; do
    timeout "${T_TRAIN:-300}" python3 torch_reference.py --train --preset llada-1b --device cuda \
        --train-precision $prec --train-batch 8 --train-seq 512 --train-steps 6 \
        --peak-tflops "${PEAK_TFLOPS:-989}" --json "$res/torch-train-$prec.json" \
        >"$res/torch-train-$prec.log" 2>&1
    echo "exit $? ($prec); $(grep '^torch train' "$res/torch-train-$prec.log" | tail -n 1)"
done
echo "== training throughput: llada train vs PyTorch (same GPU, same run; ratio = llada / torch)"
python3 - "$res" <<'PY' || echo "comparison: n/a (python3 failed)"
import json, re, sys
res = sys.argv[1]
print(f"{'precision':>9} {'llada tok/s':>12} {'llada MFU':>10} {'torch tok/s':>12} {'torch MFU':>10} {'ratio':>7}")
for prec in ("bf16", "f32"):
    lt = lm = tt = tm = None
    try:
        steps = [l for l in open(f"{res}/train-1b-{prec}.log", errors="replace") if "] step " in l]
        m = re.search(r"tok/s (\S+) GFLOP/s \S+ MFU (\S+)", steps[-1]) if steps else None
        if m:
            lt, lm = float(m.group(1)), m.group(2)
    except (OSError, ValueError):
        pass
    try:
        r = [r for r in json.load(open(f"{res}/torch-train-{prec}.json"))["rows"] if r["precision"] == prec][0]
        tt = r["tokens_per_s"]
        tm = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    f = lambda x: f"{x:.0f}" if x is not None else "n/a"
    ratio = f"{lt / tt:.2f}" if lt and tt else "n/a"
    print(f"{prec:>9} {f(lt):>12} {lm or 'n/a':>10} {f(tt):>12} {tm or 'n/a':>10} {ratio:>7}")
PY
echo "== llada train --lora-rank 16: llada-8b preset, frozen bf16 base, 1 x 2048 tokens, 3 steps (<= 120 s)"
# Token ids (the presets have no tokenizer, so the pretraining loss; an SFT step costs the same).
python3 -c "import json,random; random.seed(1); print('\n'.join(json.dumps({'ids':[random.randrange(126000) for _ in range(2100)]}) for _ in range(8)))" >"$res/lora-ids.jsonl"
timeout "${T_LORA:-120}" bin/llada train --preset llada-8b --device cuda --lora-rank 16 --data "$res/lora-ids.jsonl" \
    --out "$res/lora-8b" --steps 3 --batch-size 1 --seq-len 2048 --warmup 1 --no-truncate --no-save >"$res/lora-8b.log" 2>&1
echo "exit $?; $(grep -m1 '^LoRA GPU memory' "$res/lora-8b.log" | cut -c1-160)"
grep -E '^step |peak GPU memory' "$res/lora-8b.log" | tail -n 2
echo "== done"; tail -n 12 "$res/gpu-check.log"
