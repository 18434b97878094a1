#!/usr/bin/env bash
# GPU check in two steps, for GPU machines without a Rust toolchain.
#
#   bash bench/gpu-check.sh build [DIR]      # dev machine (no GPU): build a self-contained bundle
#   bash DIR/gpu-check.sh run [RESULTS_DIR]  # GPU machine (no cargo): run tests + bench, summarise
#
# build: release binaries (`cargo build --release --bins`) and every test executable
#   (`cargo test --release --no-run --message-format=json`; only the GPU tests unless
#   GPU_CHECK_ALL_TESTS=1), compiled with LLADA_REQUIRE_KERNELS=1
#   so a missing nvcc fails loudly, copied into DIR (default gpu-bundle/, git-ignored, also packed
#   as DIR.tgz) with this
#   script, bench/torch_reference.py and bench/loss_curve.py (if present), tests/fixtures (if
#   present) and a tiny checkpoint
#   (`llada init-tiny`, if that command exists).
# run: prints nvidia-smi, runs each test executable with LLADA_REQUIRE_GPU=1 (a missing GPU is a
#   failure, not a skip), then `llada-bench --json` and `python3 torch_reference.py` when present;
#   logs go to RESULTS_DIR (default results/); a summary table is printed LAST. Every command runs
#   under `timeout`, so the script never hangs.
set -uo pipefail

die() { echo "gpu-check: $*" >&2; exit 2; }

# The test executables that need a GPU ("binary[:filter]"); `run` runs these by default and
# `build` bundles only these unless GPU_CHECK_ALL_TESTS=1.
GPU_TESTS_DEFAULT="test-cuda_parity test-cuda_model test-cache:gpu_ test-cuda_train test-cuda_train_tiled test-cuda_dist test-cuda_fp8 test-lora_resume:cuda_ test-loss_curve:cuda_"

# Seconds allowed per step (override from the environment).
T_TEST=${GPU_CHECK_TEST_TIMEOUT:-600}
T_BENCH=${GPU_CHECK_BENCH_TIMEOUT:-900}
T_TORCH=${GPU_CHECK_TORCH_TIMEOUT:-900}

build() {
    local dir=${1:-gpu-bundle}
    local root
    root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd) || die "cannot find the repository root"
    cd "$root" || die "cannot enter $root"
    command -v cargo >/dev/null || die "cargo not found: 'build' runs on the development machine"
    command -v python3 >/dev/null || die "python3 is needed to read cargo's JSON output"
    export LLADA_REQUIRE_KERNELS=1
    mkdir -p "$dir/bin" "$dir/test-bins" || die "cannot create $dir"
    dir=$(cd "$dir" && pwd)
    rm -f "$dir"/bin/* "$dir"/test-bins/*

    echo "== cargo build --release --bins"
    cargo build --release --bins || die "cargo build failed (nvcc missing? run: bash .ci/install-nvcc.sh)"
    local target=${CARGO_TARGET_DIR:-$root/target}
    for b in llada llada-bench; do
        [ -x "$target/release/$b" ] && cp "$target/release/$b" "$dir/bin/"
    done

    echo "== cargo test --release --no-run"
    local json
    json=$(mktemp)
    cargo test --release --no-run --message-format=json >"$json" || { rm -f "$json"; die "building the tests failed"; }
    # One line per test executable: "<kind>-<name> <path>" (lib and bin unit tests share names).
    python3 - "$json" <<'EOF' | while read -r name path; do cp "$path" "$dir/test-bins/$name" && echo "   $name"; done
import json, sys
for line in open(sys.argv[1]):
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m.get("profile", {}).get("test"):
        t = m["target"]
        print(f'{t["kind"][0]}-{t["name"]} {m["executable"]}')
EOF
    rm -f "$json"
    if [ "${GPU_CHECK_ALL_TESTS:-0}" != 1 ]; then
        # CPU-only tests ran here; leaving them out keeps the bundle small enough to carry.
        local keep=" " e f
        for e in $GPU_TESTS_DEFAULT; do keep+="${e%%:*} "; done
        for f in "$dir"/test-bins/*; do
            [[ "$keep" == *" $(basename "$f") "* ]] || rm -f "$f"
        done
    fi

    cp "$root/bench/gpu-check.sh" "$dir/gpu-check.sh"
    cp "$root/bench/gpu-session.sh" "$dir/gpu-session.sh"
    echo "$(git -C "$root" rev-parse --short=12 HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo -dirty)" >"$dir/COMMIT"
    if bash "$root/kernels/check/build.sh" "$dir/kc-build" >/dev/null 2>&1 && [ -x "$dir/kc-build/kernel-check" ]; then
        cp "$dir/kc-build/kernel-check" "$dir/bin/"
    fi
    rm -rf "$dir/kc-build"
    [ -f "$root/bench/torch_reference.py" ] && cp "$root/bench/torch_reference.py" "$dir/"
    [ -f "$root/bench/loss_curve.py" ] && cp "$root/bench/loss_curve.py" "$dir/"
    if [ -d "$root/tests/fixtures" ]; then
        mkdir -p "$dir/tests" && cp -r "$root/tests/fixtures" "$dir/tests/"
    fi
    # Debug info makes the bundle several times larger (device transfers are size-limited);
    # symbols stay, so backtraces still name functions. GPU_CHECK_NO_STRIP=1 keeps everything.
    if [ "${GPU_CHECK_NO_STRIP:-0}" != 1 ] && command -v strip >/dev/null; then
        strip --strip-debug "$dir"/bin/* "$dir"/test-bins/* 2>/dev/null || true
    fi
    if [ -x "$dir/bin/llada" ]; then
        rm -rf "$dir/tiny"
        if timeout 120 "$dir/bin/llada" init-tiny "$dir/tiny" >/dev/null 2>&1 && [ -e "$dir/tiny" ]; then
            echo "== tiny checkpoint in $dir/tiny"
        else
            echo "== no tiny checkpoint (llada init-tiny unavailable or failed)"
        fi
    fi
    # One compressed file as well (the kernels' fatbins compress about 3×), for transfers
    # limited in size: tar xzf gpu-bundle.tgz && bash gpu-bundle/gpu-session.sh results
    tar czf "$dir.tgz" -C "$(dirname "$dir")" "$(basename "$dir")" || die "cannot write $dir.tgz"
    echo "== bundle ready: $dir ($(du -sh "$dir" | cut -f1)), $dir.tgz ($(du -sh "$dir.tgz" | cut -f1)); on the GPU machine: bash $(basename "$dir")/gpu-check.sh run"
}

run() {
    local here res
    here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd) || die "cannot find the bundle"
    res=${1:-results}
    mkdir -p "$res" || die "cannot create $res"
    res=$(cd "$res" && pwd)
    cd "$here" || die "cannot enter $here"
    local rows=()

    echo "== nvidia-smi"
    timeout 60 nvidia-smi 2>&1 | tee "$res/nvidia-smi.log" || echo "(nvidia-smi failed or missing)"

    export LLADA_REQUIRE_GPU=1
    # Tests that start the CLI use the bundle's copy; NCCL (data-parallel tests) from the
    # environment, else from PyTorch's pip wheel when there is one.
    export LLADA_BIN="$here/bin/llada"
    if [ -z "${LLADA_NCCL_LIB:-}" ]; then
        local nccl
        nccl=$(python3 -c "import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], 'lib', 'libnccl.so.2'))" 2>/dev/null)
        [ -n "$nccl" ] && [ -f "$nccl" ] && export LLADA_NCCL_LIB="$nccl"
    fi
    echo "== NCCL: ${LLADA_NCCL_LIB:-libnccl.so.2 from the loader path, if any}"
    [ -f COMMIT ] && export LLADA_COMMIT="$(cat COMMIT)"
    local t name log rc passed failed
    # The GPU tests by default (CPU-only tests ran on the dev machine and refer to its paths).
    # GPU_CHECK_TESTS: space-separated "binary[:filter]" entries ('*' = every bundled binary).
    local entries=${GPU_CHECK_TESTS:-$GPU_TESTS_DEFAULT}
    [ "$entries" = "*" ] && entries=$(cd test-bins && ls)
    local entry filter
    for entry in $entries; do
        t="test-bins/${entry%%:*}"
        filter=""
        [[ "$entry" == *:* ]] && filter="${entry#*:}"
        [ -x "$t" ] || { rows+=("$(printf '%-40s %-16s' "$entry" "MISSING")"); continue; }
        name=$(basename "$t")${filter:+-$filter}
        log="$res/$name.log"
        echo "== $name"
        timeout "$T_TEST" "$t" $filter >"$log" 2>&1
        rc=$?
        passed=$(grep -Eo '[0-9]+ passed' "$log" | awk '{s+=$1} END {print s+0}')
        failed=$(grep -Eo '[0-9]+ failed' "$log" | awk '{s+=$1} END {print s+0}')
        local status=ok
        if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status="TIMEOUT(${T_TEST}s)"; elif [ "$rc" != 0 ]; then status="FAIL(rc=$rc)"; fi
        grep -E '^test .* FAILED$|panicked at' "$log" | head -20
        rows+=("$(printf '%-40s %-16s %6s %6s' "$name" "$status" "$passed" "$failed")")
    done

    # Whole-model CLI checks on the tiny checkpoint: the same command on both devices.
    if [ -x bin/llada ] && [ -d tiny ]; then
        echo "== llada CLI: tiny checkpoint, cpu vs cuda"
        local dev
        for dev in cpu cuda; do
            timeout 120 bin/llada generate --model tiny --device $dev --format json --prompt-ids 5,6,7,8,9 \
                --gen-length 32 --steps 16 --block-length 8 >"$res/generate-$dev.json" 2>>"$res/cli.log"
            timeout 120 bin/llada generate --model tiny --device $dev --format json --prompt-ids 5,6,7,8,9 \
                --gen-length 32 --steps 4 --block-length 8 --cache dual --threshold 0.5 >"$res/generate-dual-$dev.json" 2>>"$res/cli.log"
            timeout 120 bin/llada loglik --model tiny --device $dev --format json --prompt-ids 5,6,7,8,9 \
                --answer-ids 11 --mc-num 1 >"$res/loglik-$dev.json" 2>>"$res/cli.log"
        done
        python3 - "$res" <<'EOF' | tee "$res/cli-compare.log"
import json, sys, os
res = sys.argv[1]
for kind in ["generate", "generate-dual", "loglik"]:
    try:
        c = json.load(open(os.path.join(res, f"{kind}-cpu.json")))
        g = json.load(open(os.path.join(res, f"{kind}-cuda.json")))
    except Exception as e:
        print(f"{kind}: could not compare ({e})")
        continue
    if kind == "loglik":
        print(f"{kind}: cpu {c['loglik']:.6f} cuda {g['loglik']:.6f} diff {abs(c['loglik'] - g['loglik']):.2e}")
    else:
        a, b = c["ids"][0], g["ids"][0]
        same = sum(x == y for x, y in zip(a, b))
        print(f"{kind}: {same}/{len(a)} ids agree (nfe cpu {c['nfe']} cuda {g['nfe']})")
EOF
    fi

    if [ -x bin/kernel-check ]; then
        echo "== kernel-check (standalone kernel harness)"
        timeout "$T_TEST" bin/kernel-check >"$res/kernel-check.log" 2>&1
        local krc=$?
        tail -30 "$res/kernel-check.log"
        rows+=("$(printf '%-40s %-16s' kernel-check "$([ $krc = 0 ] && echo ok || echo "FAIL(rc=$krc)")")")
    fi

    local bench="not run"
    if [ -x bin/llada-bench ]; then
        echo "== llada-bench"
        timeout "$T_BENCH" bin/llada-bench --json "$res/bench.json" ${GPU_CHECK_BENCH_ARGS:-} 2>&1 | tee "$res/bench.log"
        local brc=${PIPESTATUS[0]}
        if [ "$brc" = 0 ] && [ -f "$res/bench.json" ]; then
            # Every "...tok..._per_s"-like number in the JSON, flattened.
            bench=$(python3 - "$res/bench.json" <<'EOF' 2>/dev/null || echo "ok (see bench.json)"
import json, sys
def walk(x, path=""):
    if isinstance(x, dict):
        for k, v in x.items():
            yield from walk(v, f"{path}.{k}" if path else k)
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from walk(v, f"{path}[{i}]")
    elif isinstance(x, (int, float)) and "tok" in path.lower() and "s" in path.lower():
        yield path, x
items = list(walk(json.load(open(sys.argv[1]))))
print("; ".join(f"{p}={v:.1f}" for p, v in items[:8]) or "ok (no tokens/s field)")
EOF
)
        elif [ "$brc" = 0 ]; then
            bench="no bench.json written (see bench.log)"
        else
            bench="FAIL(rc=$brc)"
        fi
    fi

    local torch="not run"
    if [ -f torch_reference.py ]; then
        if command -v python3 >/dev/null; then
            echo "== torch_reference.py"
            timeout "$T_TORCH" python3 torch_reference.py --json "$res/torch.json" ${GPU_CHECK_TORCH_ARGS:-} 2>&1 | tee "$res/torch_reference.log"
            local trc=${PIPESTATUS[0]}
            if [ "$trc" = 0 ]; then torch="ok (torch_reference.log)"; else torch="FAIL(rc=$trc)"; fi
        else
            torch="python3 missing"
        fi
    fi

    echo
    echo "================ summary ($(timeout 10 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)) ================"
    printf '%-40s %-16s %6s %6s\n' "test binary" "status" "passed" "failed"
    local r
    for r in "${rows[@]}"; do echo "$r"; done
    echo "llada-bench: $bench"
    echo "torch_reference: $torch"
    echo "logs: $res"
}

case "${1:-}" in
    build) shift; build "$@" ;;
    run) shift; run "$@" ;;
    *) die "usage: bash gpu-check.sh build [DIR]   |   bash gpu-check.sh run [RESULTS_DIR]" ;;
esac
