#!/usr/bin/env python3
"""Loss-curve parity verdict: llada's training runs against PyTorch replaying them.

Inputs: llada runs (`llada train --dump-batches DUMP`, one per precision: same data, seed,
starting weights and options, so the same masked batches) and PyTorch replays of one of those
dumps (`bench/torch_reference.py --train-replay DUMP --train-init DIR --json OUT`) in f32 and,
optionally, bf16 autocast, on the same device. Standard library only (no torch, no numpy).

    python3 bench/loss_curve.py --llada f32=f32.dump.jsonl --llada bf16=bf16.dump.jsonl \\
        --torch f32=replay-f32.json --torch bf16=replay-bf16.json --json loss-curve.json

Criterion, per step s (every step the runs have in common must pass; a NaN fails):
- llada `f32` against torch f32: |llada − torch| ≤ F32_RTOL·|torch|. F32_RTOL = 1e-4 is an f32
  tolerance: on the CPU (tiny preset, K ≤ 320 terms per dot product) the two curves agree to
  1.2e-6 over 50 steps (tests/loss_curve.rs allows 1e-5); a GPU run of `llada-1b` sums up to
  K = 5632 terms per dot product in other orders (cuBLAS algorithms, split-K, atomics), so
  rounding differences grow like √K (√(5632/320) ≈ 4) and AdamW passes them on; 1e-4 leaves a
  further 2.5× for that. It is 1e-3 of the bf16 noise a GPU run shows (about 1e-2 relative).
- every other llada run (`bf16`, …; `bf16-storage` is report-only, below) against torch bf16,
  within bf16 noise. The noise is measured, not assumed: n(s) = |torch_bf16(s) − torch_f32(s)|, the distance between
  two runs of the same mathematics that differ only by bf16 rounding; its running maximum
  N(s) = max_{s' ≤ s} n(s') is the envelope (a single step's distance can cross zero by
  chance). Both bf16 runs carry a rounding error of that size relative to exact arithmetic:
  torch's is n(s) itself; llada's (which rounds only the GEMM operands to bf16 and keeps f32
  activations, where autocast also stores bf16 outputs) is at most as large. Their distance is
  then at most 2·N(s); K = 3 adds 50 % for two realisations of the same chaotic process being
  compared step by step. Pass: |llada(s) − torch_bf16(s)| ≤ K·N(s) + F32_RTOL·|torch_f32(s)|
  (the second term keeps a floor where the noise is still tiny).
  What this cannot see: a slip smaller than bf16 noise (on the CPU, dropping weight decay moves
  the tiny curve by 6e-4 relative); the f32 comparison catches those.
- the noise itself is checked first: bf16 rounding moves a loss by about 1e-2 relative, so if
  |torch_bf16(s) − torch_f32(s)| > NOISE_MAX_REL·|torch_f32(s)| (5e-2) at any step the bf16
  replay is broken, not noisy, and the bf16 runs are "not judged" (reason in the verdict). The
  JSON records noise/loss per step (noise_rel).
- `bf16-storage` (`llada train --storage bf16`) is report-only: printed and in the JSON with its
  ratio, left out of the verdict. The premise above (llada rounds no more than autocast) does not
  hold for it: bf16 storage keeps the residual stream and the activation gradients in bf16,
  which autocast (f32 residual adds, f32 gradients between its bf16 GEMMs) does not, so its
  rounding error can exceed torch bf16's and K·N(s) is no bound for it. `--precision bf16`
  (bf16 GEMM operands only) is judged as above.

Inputs that are partly missing still get a verdict on what can be judged: without --torch bf16
the f32 run is judged alone (the others "not judged", with the reason); runs and replays are
compared over the steps they all have (a run cut short; the count is printed and recorded); an
unparsable last line of a dump (a run killed mid-write) is dropped with a warning, anywhere else
it makes the dump unusable.

Prints a table (worst steps first lines, every step with --all) and a verdict; --json writes the
whole comparison (for bench/results/). Exit 0: every judged run passed; 1: a criterion failed;
2: unusable inputs, or nothing can be judged.
"""
import argparse
import datetime
import hashlib
import json
import math
import sys

F32_RTOL = 1e-4
K = 3.0
NOISE_MAX_REL = 5e-2
# Runs shown with their ratio but left out of the verdict, and why (see the module docs).
REPORT_ONLY = {"bf16-storage": "report only: bf16 storage rounds the residual stream and the "
                               "activation gradients to bf16, which autocast does not, so torch bf16's "
                               "noise is no bound for it"}


class Unusable(Exception):
    """Inputs that cannot be compared (exit 2)."""


def pair(s, what):
    label, sep, path = s.partition("=")
    if not sep or not label or not path:
        raise Unusable(f"{what} {s!r}: give LABEL=PATH")
    return label, path


def read_dump(path):
    """A `--dump-batches` file: (options, sha256 of each step's micro-batch lines, {step: stats}).
    An unparsable last line (a run killed by `timeout` mid-write) is dropped with a warning; an
    unparsable line anywhere else makes the file unusable."""
    options, batches, steps = None, {}, {}
    try:
        with open(path) as fh:
            lines = [(n, line) for n, line in enumerate(fh, 1) if line.strip()]
    except OSError as e:
        raise Unusable(f"{path}: {e}")
    for i, (n, line) in enumerate(lines):
        try:
            x = json.loads(line)
        except ValueError as e:
            if i == len(lines) - 1 and i > 0:
                print(f"loss_curve: warning: {path}:{n}: the last line is not JSON ({e}); "
                      "ignored (a run cut short?)", file=sys.stderr)
                break
            raise Unusable(f"{path}:{n}: not JSON ({e})")
        if i == 0:
            if not isinstance(x, dict) or "options" not in x:
                raise Unusable(f"{path}: the first line is not the options line")
            options = x["options"]
        elif "micro" in x:
            h = batches.setdefault(x["step"] + 1, hashlib.sha256())
            h.update(json.dumps([x[k] for k in ("micro", "ids", "rows", "targets", "p")]).encode())
        elif "loss" in x:
            steps[x["step"]] = x
    if options is None or not steps:
        raise Unusable(f"{path}: no options line or no steps (is it a `llada train --dump-batches` file?)")
    return options, {s: h.hexdigest() for s, h in batches.items()}, steps


def read_replay(path):
    """A `torch_reference.py --train-replay --json` file: (options, {step: row}, metadata)."""
    try:
        r = json.load(open(path))
    except (OSError, ValueError) as e:
        raise Unusable(f"{path}: {e}")
    if not isinstance(r, dict) or "options" not in r or not r.get("steps"):
        raise Unusable(f"{path}: no options or steps (is it a --train-replay --json file?)")
    return r["options"], {s["step"]: s for s in r["steps"]}, r


def num(x):
    return x if isinstance(x, (int, float)) and not isinstance(x, bool) else float("nan")


def compare(llada, torch):
    """llada: {label: dump path}; torch: {"f32": json path, "bf16": json path (optional)}.
    Returns the comparison as a dict (see the module docs)."""
    if "f32" not in torch:
        raise Unusable("--torch f32=JSON is needed (the reference, and the base of the bf16 noise)")
    bad = [k for k in torch if k not in ("f32", "bf16")]
    if bad:
        raise Unusable(f"--torch labels are f32 and bf16, not {bad}")
    if not llada:
        raise Unusable("give at least one --llada LABEL=DUMP")
    runs = {k: read_dump(p) for k, p in llada.items()}
    refs = {k: read_replay(p) for k, p in torch.items()}
    first = next(iter(runs))
    options, batches, _ = runs[first]
    # Every run and reference over the steps all of them have (a run cut short ends early).
    common = set.intersection(*[set(st) for _, _, st in runs.values()], *[set(r) for _, r, _ in refs.values()])
    for k, (o, b, _) in runs.items():
        if o != options:
            raise Unusable(f"llada runs {first} and {k} have different options: {o} vs {options}")
        diff = sorted(s for s in common if b.get(s) != batches.get(s))
        if diff:
            raise Unusable(f"llada runs {first} and {k} saw different batches (first at step {diff[0]})")
    for k, (o, rows, _) in refs.items():
        if o != options:
            raise Unusable(f"torch {k} replayed a run with other options: {o} vs {options}")
    steps = sorted(common)
    if not steps:
        raise Unusable("the runs and replays have no step in common")
    counts = {f"llada {k}": len(st) for k, (_, _, st) in runs.items()}
    counts.update({f"torch {k}": len(r) for k, (_, r, _) in refs.items()})
    # Why a run is not judged (None: judged). Without torch bf16 the other runs have no reference;
    # an implausible noise (below) also leaves them unjudged; REPORT_ONLY runs are shown, not judged.
    why = {k: None for k in llada}
    for k in llada:
        if k in REPORT_ONLY:
            why[k] = REPORT_ONLY[k]
        elif k != "f32" and "bf16" not in refs:
            why[k] = "no torch bf16 replay (--torch bf16=JSON) to compare with"
    rows, env, implausible = [], 0.0, None
    worst = {k: (0.0, None) for k in llada}
    ok = {k: True for k in llada}
    for s in steps:
        t32 = num(refs["f32"][1].get(s, {}).get("loss"))
        t16 = num(refs["bf16"][1].get(s, {}).get("loss")) if "bf16" in refs else None
        noise = abs(t16 - t32) if t16 is not None else None
        noise_rel = noise / abs(t32) if noise is not None and t32 != 0 else None
        if noise is not None and not math.isnan(noise):
            env = max(env, noise)
        if noise_rel is not None and noise_rel > NOISE_MAX_REL and implausible is None:
            implausible = s
        row = dict(step=s, torch_f32=t32, torch_bf16=t16, noise=noise, noise_rel=noise_rel,
                   noise_envelope=env if t16 is not None else None, llada={})
        for k, (_, _, st) in runs.items():
            loss = num(st.get(s, {}).get("loss"))
            ref = t32 if k == "f32" else t16
            if ref is None:
                row["llada"][k] = dict(loss=loss, reference=None, distance=None, bound=None, ratio=None,
                                       grad_norm=num(st.get(s, {}).get("grad_norm")), passed=None)
                continue
            bound = F32_RTOL * abs(t32) + (0.0 if k == "f32" else K * env)
            dist = abs(loss - ref)
            ratio = dist / bound if bound > 0 else (0.0 if dist == 0 else float("inf"))
            passed = ratio <= 1.0  # NaN compares false: fails
            if not passed:
                ok[k] = False
            if not (ratio <= worst[k][0]):
                worst[k] = (ratio, s)
            row["llada"][k] = dict(loss=loss, reference=ref, distance=dist, bound=bound,
                                   ratio=ratio, grad_norm=num(st.get(s, {}).get("grad_norm")), passed=passed)
        rows.append(row)
    if implausible is not None:
        for k in llada:
            if k != "f32" and why[k] is None:
                why[k] = (f"noise implausible: |torch bf16 - torch f32| > {NOISE_MAX_REL:g}*|torch f32| "
                          f"at step {implausible} (a broken bf16 replay, not bf16 rounding)")
    verdict = {}
    for k in llada:
        judged = why[k] is None
        verdict[k] = dict(judged=judged, passed=ok[k] if judged else None, reason=why[k],
                          reference="torch f32" if k == "f32" else "torch bf16",
                          worst_ratio=worst[k][0] if worst[k][1] is not None else None, worst_step=worst[k][1])
    judged = [k for k in llada if verdict[k]["judged"]]
    if not judged:
        raise Unusable("nothing can be judged: " + "; ".join(f"llada {k}: {why[k]}" for k in llada))
    return dict(kind="loss_curve_parity", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                criterion=dict(f32_rtol=F32_RTOL, k=K, noise_max_rel=NOISE_MAX_REL,
                               rule="f32: |llada-torch_f32| <= f32_rtol*|torch_f32|; "
                               "others: |llada-torch_bf16| <= k*max_{s'<=s}|torch_bf16-torch_f32| + f32_rtol*|torch_f32|; "
                               "bf16 not judged if |torch_bf16-torch_f32| > noise_max_rel*|torch_f32| at any step",
                               report_only=sorted(REPORT_ONLY)),
                options=options, llada=llada, torch={k: dict(path=torch[k], device=refs[k][2].get("device"),
                                                             precision=refs[k][2].get("precision"),
                                                             version=refs[k][2].get("torch")) for k in torch},
                steps_compared=len(steps), steps_available=counts, noise_implausible_at=implausible,
                steps=rows, verdict=verdict, judged=judged, passed=all(ok[k] for k in judged))


def finite(x):
    """`x` with every NaN or infinity replaced by None (strict JSON)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, list):
        return [finite(v) for v in x]
    return x


def fmt(x, w=11):
    return f"{'-':>{w}}" if x is None else f"{x:>{w}.6g}"


def show(c, every):
    labels = list(c["llada"])
    head = f"{'step':>4} {'torch f32':>11} {'torch bf16':>11} {'noise env':>11}"
    for k in labels:
        head += f" {('llada ' + k)[:14]:>14} {'/bound':>7}"
    print(head)
    rows = c["steps"]
    pick = rows if every or len(rows) <= 12 else rows[:5] + rows[-5:]
    for r in pick:
        line = f"{r['step']:>4} {fmt(r['torch_f32'])} {fmt(r['torch_bf16'])} {fmt(r['noise_envelope'])}"
        for k in labels:
            x = r["llada"][k]
            ratio = f"{x['ratio']:>7.3f}" if x["ratio"] is not None else f"{'-':>7}"
            line += f" {x['loss']:>14.7g} {ratio}"
        print(line)
    if pick is not rows:
        print(f"     ({len(rows) - len(pick)} steps not shown; --all prints every step)")
    avail = ", ".join(f"{k} {n}" for k, n in c["steps_available"].items())
    print(f"compared over {c['steps_compared']} common steps (steps available: {avail})")
    for k, v in c["verdict"].items():
        worst = (f"worst distance/bound {v['worst_ratio']:.3g} at step {v['worst_step']}"
                 if v["worst_step"] is not None else "no reference")
        state = ("PASS" if v["passed"] else "FAIL") if v["judged"] else f"NOT JUDGED ({v['reason']})"
        print(f"llada {k} vs {v['reference']}: {state} ({worst})")
    print(f"verdict: {'PASS' if c['passed'] else 'FAIL'} on {', '.join(c['judged'])} (f32 rtol {F32_RTOL:g}, "
          f"bf16: {K:g}x the torch bf16-vs-f32 noise envelope + the f32 tolerance)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--llada", action="append", default=[], metavar="LABEL=DUMP",
                    help="a `llada train --dump-batches` file; label f32 is judged against torch f32, "
                         "any other (bf16, ...) against torch bf16; bf16-storage is report-only")
    ap.add_argument("--torch", action="append", default=[], metavar="f32|bf16=JSON",
                    help="a `torch_reference.py --train-replay --json` file")
    ap.add_argument("--json", default=None, help="write the comparison here")
    ap.add_argument("--gpu", default=None, help="the device's name, recorded in the JSON")
    ap.add_argument("--all", action="store_true", help="print every step")
    a = ap.parse_args(argv)
    try:
        llada = dict(pair(x, "--llada") for x in a.llada)
        torch = dict(pair(x, "--torch") for x in a.torch)
        c = compare(llada, torch)
    except Unusable as e:
        print(f"loss_curve: {e}", file=sys.stderr)
        return 2
    c["gpu"] = a.gpu
    show(c, a.all)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(finite(c), fh, indent=1, allow_nan=False)
            fh.write("\n")
    return 0 if c["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
