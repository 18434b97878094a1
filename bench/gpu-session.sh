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
#   GPU_SESSION_ONLY=curve bash gpu-bundle/gpu-session.sh RESULTS_DIR (issue #17: the llada-1b
#     loss-curve parity against PyTorch in f32 and bf16, and the #17 targets; <= 8 minutes)
set -uo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
res=${1:-results}
mkdir -p "$res"; res=$(cd "$res" && pwd)
cd "$here"
[ -f COMMIT ] && export LLADA_COMMIT="$(cat COMMIT)"
# On the device NCCL must load: the data-parallel tests fail instead of printing SKIP.
export LLADA_REQUIRE_NCCL=1
PY=${PYTHON:-python3}
exec 3>&1
# Scratch space outside RESULTS_DIR for whatever is large and no result (the curve group's
# initial checkpoint, ~2.5 GB for llada-1b; every `llada train --out` folder; the token-id
# files): RESULTS_DIR comes back from the device machine only when it is small. Each step
# removes its scratch as soon as it is done with it; the trap removes the rest.
scratch=$(mktemp -d "${SCRATCH_DIR:-${TMPDIR:-/tmp}}/llada-session.XXXXXX") || { echo "mktemp failed" >&2; exit 1; }
case "$scratch/" in "$res"/*) echo "scratch $scratch is inside RESULTS_DIR $res: set SCRATCH_DIR" >&2; rm -rf "$scratch"; exit 1 ;; esac
trap 'rm -rf "$scratch"' EXIT
# step_timeout SECONDS CMD...: `timeout`, shortened to what is left of the group's budget
# (group_end, in $SECONDS) when one is set; with under 15 s left the step is skipped (rc 124).
step_timeout() {
    local cap=$1; shift
    if [ -n "${group_end:-}" ]; then
        local left=$(( group_end - SECONDS ))
        if [ "$left" -lt 15 ]; then
            echo "skipped, out of the group's time budget: ${*:1:3} ..." >&3
            return 124
        fi
        [ "$left" -lt "$cap" ] && cap=$left
    fi
    timeout "$cap" "$@"
}

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
    echo "== switches not yet passed on a GPU: LLADA_DEVICE_SELECT=1 (commit selection on the device), LLADA_FUSED=1 (rope_kv_store), LLADA_STEP_GRAPH=1 (whole step on the device), LLADA_GEMM=lt (bf16 GEMMs on cuBLASLt)"
    # Their parity tests (also inside gpu-check's cuda_parity run), then one bench line with the
    # first two switches and one with the step graph beside the default, same run, same flags.
    for f in commit_select_matches_reference device_select_generation_equals_host_select \
             rope_kv_store_matches_rope_then_kv_store fused_generation_equals_unfused \
             step_advance_matches_reference select_at_step_equals_select_with_that_step \
             step_graph_generation_equals_host_select gemm_lt_matches_cublas \
             gemm_lt_model_logits_match_cublas; do
        LLADA_REQUIRE_GPU=1 timeout "${T_SWITCH:-300}" test-bins/test-cuda_parity --exact "$f" \
            >"$res/switch-$f.log" 2>&1
        echo "exit $? $f: $(grep -Eo '[0-9]+ passed; [0-9]+ failed' "$res/switch-$f.log" | head -n 1)"
    done
    # graph: LLADA_STEP_GRAPH=1 alone (the dual-cache rows: each block's full pass per call with
    # the device selection, its cached calls as step graphs).
    # lt: LLADA_GEMM=lt alone (the bf16 GEMMs on cuBLASLt).
    for sw in off on graph lt; do
        if [ $sw = on ]; then export LLADA_DEVICE_SELECT=1 LLADA_FUSED=1; fi
        if [ $sw = graph ]; then export LLADA_STEP_GRAPH=1; fi
        if [ $sw = lt ]; then export LLADA_GEMM=lt; fi
        timeout "${T_SWITCH:-300}" bin/llada-bench --cache none,dual --threshold 0.9 --steps 256 --breakdown \
            --json "$res/bench-switch-$sw.json" >"$res/bench-switch-$sw.log" 2>&1
        echo "exit $? (switches $sw)"
        unset LLADA_DEVICE_SELECT LLADA_FUSED LLADA_STEP_GRAPH LLADA_GEMM
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
try:
    lt = json.load(open(f"{res}/bench-switch-lt.json"))["rows"]
    for a, l in zip(rows["off"], lt):
        print(f"LLADA_GEMM=lt {a['cache']:>6}: tok/s {a['tokens_per_s']:.1f} -> {l['tokens_per_s']:.1f}, "
              f"ms/step {a['ms_per_step_median']:.2f} -> {l['ms_per_step_median']:.2f}")
except (OSError, KeyError, ValueError) as e:
    print(f"LLADA_GEMM=lt comparison: n/a ({e})")
PY
}
if [ "${GPU_SESSION_ONLY:-}" = step ]; then
    step_checks
    exit 0
fi

# Issue #17's targets, in the full session and in the `curve` group: llada-1b full fine-tuning
# tokens/s and MFU beside the PyTorch training reference (same GPU, same run), and LoRA r16 of the
# llada-8b preset at 2048 tokens (tokens/s, peak memory). The `_at` variables let the CPU dry run
# (bench/curve-dry-run.sh) take the same path with the tiny preset.
# train_throughput DIR "PRECISIONS": llada train and torch_reference.py --train, 1b preset,
# batch 8 x 512, each precision; DIR/train-throughput.json holds the comparison.
train_throughput() {
    local out=$1 precs=$2 prec steps
    local preset=${TARGET_PRESET:-llada-1b} dev=${TARGET_DEVICE:-cuda}
    local b=${TARGET_BATCH:-8} t=${TARGET_SEQ:-512}
    echo "== llada train: $preset preset, batch $b x $t tokens, $precs GEMMs (issue #17 target: bf16 >= 45% MFU, >= 1.5x PyTorch)"
    # Random token ids (no tokenizer for the presets): 160 documents of 1000 ids below 126000
    # (below 500 for the tiny preset, whose mask id is 502).
    local hi=126000; [ "$preset" = tiny ] && hi=500
    "$PY" -c "import json,random,sys; random.seed(0); print('\n'.join(json.dumps({'ids':[random.randrange(int(sys.argv[1])) for _ in range(1000)]}) for _ in range(160)))" $hi >"$scratch/train-ids.jsonl"
    # MFU against PEAK_TFLOPS (default: H100/H200 SXM dense bf16, 989 TFLOP/s; the f32 run is
    # measured against the same peak, for comparison).
    for prec in $precs; do
        [ $prec = f32 ] && steps=3 || steps=6
        # bf16s: bf16 storage (--storage bf16: bf16 weights, activations and GEMMs, f32 master
        # weights, moments and weight gradients), PyTorch autocast's counterpart; not run on a GPU yet.
        local flags="--precision $prec"; [ $prec = bf16s ] && flags="--storage bf16"
        step_timeout "${T_TRAIN:-300}" bin/llada train --preset "$preset" --device "$dev" $flags \
            --data "$scratch/train-ids.jsonl" --out "$scratch/train-1b-$prec" --steps $steps --batch-size "$b" --seq-len "$t" \
            --warmup 1 --no-truncate --no-save --peak-tflops "${PEAK_TFLOPS:-989}" \
            >"$out/train-1b-$prec.log" 2>&1
        echo "exit $? ($prec); $(grep -m1 '^device:' "$out/train-1b-$prec.log")"
        rm -rf "$scratch/train-1b-$prec"
        grep '\] step ' "$out/train-1b-$prec.log" | tail -n 1 | sed 's/^.*\] //'
    done
    rm -f "$scratch/train-ids.jsonl"
    echo "== torch_reference --train: the same training step in PyTorch ($preset, batch $b x $t)"
    # bf16 = torch.autocast to bf16 around forward + loss with f32 master weights (the counterpart of
    # --precision bf16); f32 = plain f32 with TF32 off. One process per precision.
    local tprecs; tprecs=$(echo $precs | tr ' ' '\n' | sed 's/^bf16s$/bf16/' | sort -u)
    for prec in $tprecs; do
        step_timeout "${T_TRAIN:-300}" "$PY" torch_reference.py --train --preset "$preset" --device "$dev" \
            --train-precision $prec --train-batch "$b" --train-seq "$t" --train-steps 6 \
            --peak-tflops "${PEAK_TFLOPS:-989}" --json "$out/torch-train-$prec.json" \
            >"$out/torch-train-$prec.log" 2>&1
        echo "exit $? ($prec); $(grep '^torch train' "$out/torch-train-$prec.log" | tail -n 1)"
    done
    echo "== training throughput: llada train vs PyTorch (same device, same run; ratio = llada / torch)"
    "$PY" - "$out" $precs <<'PY' || echo "comparison: n/a (python3 failed)"
import json, re, sys
out, precs = sys.argv[1], sys.argv[2:]
rows = []
print(f"{'precision':>9} {'llada tok/s':>12} {'llada MFU':>10} {'torch tok/s':>12} {'torch MFU':>10} {'ratio':>7}")
for prec in precs:
    lt = lm = tt = tm = None
    try:
        steps = [l for l in open(f"{out}/train-1b-{prec}.log", errors="replace") if "] step " in l]
        m = re.search(r"tok/s (\S+) GFLOP/s \S+ MFU (\S+)", steps[-1]) if steps else None
        if m:
            lt, lm = float(m.group(1)), m.group(2)
    except (OSError, ValueError):
        pass
    try:
        tp = "bf16" if prec == "bf16s" else prec  # bf16 storage against autocast
        r = [r for r in json.load(open(f"{out}/torch-train-{tp}.json"))["rows"] if r["precision"] == tp][0]
        tt = r["tokens_per_s"]
        tm = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    f = lambda x: f"{x:.0f}" if x is not None else "n/a"
    ratio = lt / tt if lt and tt else None
    print(f"{prec:>9} {f(lt):>12} {lm or 'n/a':>10} {f(tt):>12} {tm or 'n/a':>10} {f'{ratio:.2f}' if ratio else 'n/a':>7}")
    mfu = float(lm.rstrip("%")) / 100 if lm and lm.endswith("%") else None
    rows.append(dict(precision=prec, llada_tokens_per_s=lt, llada_mfu=mfu, torch_tokens_per_s=tt,
                     torch_mfu=None if tm in (None, "-") else float(tm.rstrip("%")) / 100, ratio=ratio))
    if prec in ("bf16", "bf16s"):
        met = mfu is not None and ratio is not None and mfu >= 0.45 and ratio >= 1.5
        print(f"issue #17 target ({prec}: MFU >= 45% and >= 1.5x PyTorch): {'MET' if met else 'NOT MET'}"
              f" (MFU {lm or 'n/a'}, ratio {f'{ratio:.2f}' if ratio else 'n/a'})")
json.dump(dict(kind="train_throughput", rows=rows), open(f"{out}/train-throughput.json", "w"), indent=1)
PY
}

# lora_8b DIR: 3 LoRA r16 steps of the llada-8b preset at 1 x 2048 tokens; tokens/s, the run's
# own peak-memory line, and nvidia-smi's peak memory.used sampled every 250 ms during the run
# (issue #17 target: <= 60 GB). DIR/lora-8b.json holds them.
lora_8b() {
    local out=$1 preset=${LORA_PRESET:-llada-8b} dev=${TARGET_DEVICE:-cuda} seq=${LORA_SEQ:-2048}
    echo "== llada train --lora-rank 16: $preset preset, frozen bf16 base, 1 x $seq tokens, 3 steps"
    # Token ids (the presets have no tokenizer, so the pretraining loss; an SFT step costs the same).
    local hi=126000; [ "$preset" = tiny ] && hi=500
    "$PY" -c "import json,random,sys; random.seed(1); print('\n'.join(json.dumps({'ids':[random.randrange(int(sys.argv[1])) for _ in range(int(sys.argv[2]) + 52)]}) for _ in range(8)))" $hi "$seq" >"$scratch/lora-ids.jsonl"
    local smi=""
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 >"$out/lora-8b-smi.csv" 2>/dev/null &
        smi=$!
    fi
    step_timeout "${T_LORA:-120}" bin/llada train --preset "$preset" --device "$dev" --lora-rank 16 --data "$scratch/lora-ids.jsonl" \
        --out "$scratch/lora-8b" --steps 3 --batch-size 1 --seq-len "$seq" --warmup 1 --no-truncate --no-save >"$out/lora-8b.log" 2>&1
    echo "exit $?; $(grep -m1 '^LoRA GPU memory' "$out/lora-8b.log" | cut -c1-160)"
    rm -rf "$scratch/lora-8b" "$scratch/lora-ids.jsonl"
    [ -n "$smi" ] && kill "$smi" 2>/dev/null && wait "$smi" 2>/dev/null
    grep -E '^step |peak GPU memory' "$out/lora-8b.log" | tail -n 2
    "$PY" - "$out" <<'PY' || echo "lora summary: n/a"
import json, re, sys
out = sys.argv[1]
log = open(f"{out}/lora-8b.log", errors="replace").read()
steps = re.findall(r"^step (\d+)/\d+ loss (\S+) .* tok/s (\d+)", log, re.M)
peak = re.search(r"peak GPU memory in use: ([\d.]+) GiB", log)
try:
    smi = [int(x) for x in open(f"{out}/lora-8b-smi.csv") if x.strip().isdigit()]
except OSError:
    smi = []
r = dict(kind="lora_8b", steps=len(steps), tokens_per_s=float(steps[-1][2]) if steps else None,
         run_peak_gib=float(peak.group(1)) if peak else None,
         nvidia_smi_peak_gib=max(smi) / 1024 if smi else None, nvidia_smi_first_gib=smi[0] / 1024 if smi else None)
json.dump(r, open(f"{out}/lora-8b.json", "w"), indent=1)
gb = [x for x in (r["run_peak_gib"], r["nvidia_smi_peak_gib"]) if x is not None]
print(f"LoRA 8B: tok/s {r['tokens_per_s']}, peak {r['run_peak_gib']} GiB (run), {r['nvidia_smi_peak_gib']} GiB (nvidia-smi); "
      f"issue #17 target <= 60 GB: {'MET' if gb and max(gb) * 1.073741824 <= 60 else 'NOT MET or not measured'}")
PY
}

# compare_if_done RC FILE FLAG LABEL LOG PATTERN: a run that exited 0 with a non-empty FILE joins
# loss_curve.py's inputs (`FLAG LABEL=FILE`, into the caller's `cmp` array); another is reported
# with LOG's first lines matching PATTERN and left out, so the others' verdict stands.
compare_if_done() {
    if [ "$1" = 0 ] && [ -s "$2" ]; then
        cmp+=("$3" "$4=$2")
    else
        echo "${3#--} $4: left out of the comparison (exit $1)"
        grep -m3 -E "$6" "$5"
    fi
}

# Issue #17 item 6, loss-curve parity on the GPU (GPU_SESSION_ONLY=curve runs just this and the
# #17 targets, sized for one device call of at most 8 minutes: CURVE_BUDGET seconds, default
# 450, after which the remaining steps are skipped). The llada-1b preset with upstream's
# initialisation (`llada init --init mitchell`, bf16 folder: both sides start from exactly these
# values), 50 steps of `llada train --device cuda --dump-batches` with f32 and bf16 GEMMs (and
# `--storage bf16` when this build has it), PyTorch replaying the f32 run's batches in f32 and in
# bf16 autocast on the same GPU, and bench/loss_curve.py's verdict (criterion in its docs).
# Outputs: RESULTS_DIR/<date>-<gpu>/ (loss-curve.json, train-throughput.json, lora-8b.json are
# the files to commit under bench/results/; the logs and *.dump.jsonl.gz stay beside them). The
# checkpoint and the train --out folders go to the scratch dir (above), not RESULTS_DIR.
# CURVE_DEVICE=cpu CURVE_PRESET=tiny (and the TARGET_/LORA_ variables) is the CPU dry run.
curve_checks() {
    local dev=${CURVE_DEVICE:-cuda} preset=${CURVE_PRESET:-llada-1b} steps=${CURVE_STEPS:-50}
    local gpu slug out label
    gpu=$(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
    [ -n "$gpu" ] || gpu=$dev
    slug=$(echo "$gpu" | tr '[:upper:]' '[:lower:]' | sed -e 's/nvidia//g' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
    out="$res/$(date -u +%F)-$slug"
    mkdir -p "$out"
    echo "== loss-curve parity: $preset, $steps steps on $gpu ($dev); outputs in $out"
    if [ "$dev" != cpu ] && [ -x test-bins/test-loss_curve ]; then
        # The tiny CUDA check first (seconds): dumps on CUDA, f32 and bf16, against the CPU run.
        LLADA_BIN="$here/bin/llada" LLADA_REQUIRE_GPU=1 step_timeout 60 test-bins/test-loss_curve cuda_ \
            >"$out/test-loss_curve-cuda.log" 2>&1
        echo "exit $? (test-loss_curve cuda_): $(grep -E '^test result' "$out/test-loss_curve-cuda.log" | tail -n 1)"
        grep -E 'panicked|FAILED' "$out/test-loss_curve-cuda.log" | head -n 5
    fi
    # Structured ids (arithmetic progressions mod HI: the loss falls well within 50 steps, unlike
    # on random ids), 64 documents of 600 ids; HI below the mask id (502 for tiny).
    local hi=5000; [ "$preset" = tiny ] && hi=500
    "$PY" -c "
import json, random, sys
hi = int(sys.argv[1]); random.seed(2)
for _ in range(64):
    a, b = random.randrange(hi), random.randrange(1, 8)
    print(json.dumps({'ids': [1 + (a + b * i) % (hi - 1) for i in range(600)]}))" $hi >"$scratch/curve-ids.jsonl"
    # The initial checkpoint (~2.5 GB for llada-1b) and the runs' --out folders live in the
    # scratch dir, never under RESULTS_DIR, and go as soon as they are not needed.
    local init="$scratch/curve-init"
    rm -rf "$init"
    step_timeout "${T_CURVE_INIT:-90}" bin/llada init --preset "$preset" --out "$init" --init mitchell \
        --dtype bf16 --seed 0 >"$out/init.log" 2>&1
    echo "exit $? (llada init --preset $preset --init mitchell --dtype bf16): $(tail -n 1 "$out/init.log")"
    local runs="f32 bf16"
    if [ "$dev" = cpu ]; then
        runs="f32"; echo "(CPU: llada trains in f32 only; the bf16 runs need --device cuda)"
    elif bin/llada train --help 2>/dev/null | grep -q -- '--storage'; then
        runs="f32 bf16 bf16-storage"
    else
        echo "(this build has no --storage: no bf16-storage run)"
    fi
    local train=(--model "$init" --device "$dev" --data "$scratch/curve-ids.jsonl" --steps "$steps"
        --batch-size "${CURVE_BATCH:-4}" --accum 2 --seq-len "${CURVE_SEQ:-256}" --lr "${CURVE_LR:-1e-4}"
        --warmup 5 --schedule wsd --weight-decay 0.1 --clip 1.0 --seed 1 --no-dist --no-save
        --peak-tflops "${PEAK_TFLOPS:-989}")
    local args=() cmp=() rc dump
    for label in $runs; do
        case $label in
            f32) args=(--precision f32) ;;
            bf16) args=(--precision bf16) ;;
            bf16-storage) args=(--precision bf16 --storage bf16) ;;
        esac
        dump="$out/llada-$label.dump.jsonl"
        rm -f "$dump"
        step_timeout "${T_CURVE_TRAIN:-120}" bin/llada train "${train[@]}" "${args[@]}" --out "$scratch/train-$label" \
            --dump-batches "$dump" >"$out/llada-$label.log" 2>&1
        rc=$?
        rm -rf "$scratch/train-$label"
        echo "exit $rc (llada $label); $(grep -m1 'device:' "$out/llada-$label.log" | cut -c1-120)"
        grep '\] step ' "$out/llada-$label.log" | tail -n 1 | sed 's/^.*\] //'
        # Only a run that finished is compared (a failed or cut-short run is reported here; its
        # dump stays beside the logs). One failed run leaves the others' verdict standing.
        compare_if_done "$rc" "$dump" --llada "$label" "$out/llada-$label.log" '^error|panicked'
    done
    # PyTorch replays the f32 run's batches (its dump, complete or not, when there is one).
    for prec in f32 bf16; do
        if [ ! -s "$out/llada-f32.dump.jsonl" ]; then
            echo "torch replay $prec: skipped (no llada f32 dump to replay)"; continue
        fi
        rm -f "$out/torch-replay-$prec.json"
        step_timeout "${T_CURVE_TORCH:-120}" "$PY" torch_reference.py --train-replay "$out/llada-f32.dump.jsonl" \
            --train-init "$init" --device "$dev" --train-precision $prec --json "$out/torch-replay-$prec.json" \
            >"$out/torch-replay-$prec.log" 2>&1
        rc=$?
        echo "exit $rc (torch replay $prec); $(grep -m1 '^# replay ' "$out/torch-replay-$prec.log" | cut -c1-160)"
        compare_if_done "$rc" "$out/torch-replay-$prec.json" --torch "$prec" "$out/torch-replay-$prec.log" 'Error|error'
    done
    rm -rf "$init" "$scratch/curve-ids.jsonl"
    echo "== loss curves: llada vs PyTorch (bench/loss_curve.py)"
    "$PY" loss_curve.py "${cmp[@]}" --gpu "$gpu" --json "$out/loss-curve.json" 2>&1 | tee "$out/loss-curve.txt"
    echo "exit ${PIPESTATUS[0]} (loss_curve.py: 0 pass, 1 a criterion failed, 2 nothing to judge)"
    # The dumps (~2.5 MB each for llada-1b, 50 steps of 2 x 4 x 256 tokens) travel gzipped.
    gzip -f "$out"/llada-*.dump.jsonl 2>/dev/null || true
    echo "== issue #17 targets"
    # bf16 is the target's precision (the CPU dry run trains f32 only).
    if [ "$dev" = cpu ]; then train_throughput "$out" "f32"; else train_throughput "$out" "bf16"; fi
    lora_8b "$out"
    echo "== curve group done ($SECONDS s); files to commit: $out/{loss-curve,train-throughput,lora-8b}.json"
}
if [ "${GPU_SESSION_ONLY:-}" = curve ]; then
    group_end=$(( SECONDS + ${CURVE_BUDGET:-450} ))
    curve_checks
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
train_throughput "$res" "bf16 f32 bf16s"
lora_8b "$res"
echo "== done"; tail -n 12 "$res/gpu-check.log"
