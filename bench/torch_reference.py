#!/usr/bin/env python3
"""The PyTorch reference for llada-bench: the same workload in plain PyTorch.

A clean PyTorch implementation of the LLaDA architecture (bf16 weights, RMSNorm, RoPE with half
rotation in f32, non-causal `scaled_dot_product_attention`, SiLU-gated MLP, untied LM head) driven
by the upstream LLaDA `generate` loop (low-confidence remasking, temperature 0). Written for this
project from the published architecture; no upstream code is copied. Random weights, so no
download is needed.

    python3 bench/torch_reference.py                      # llada-8b shape on the GPU
    python3 bench/torch_reference.py --preset tiny --device cpu --steps 32

    python3 bench/torch_reference.py --cache none,prefix,dual --threshold 0.9   # Fast-dLLM rows

Prints the same table as `llada-bench` (steps, forward passes, tokens/s, ms per step) and, with
--json FILE, the same JSON fields (`device`, rows with `steps` and `tokens_per_s`).

--train: the training counterpart of `llada train` (the llada-1b preset on the GPU): upstream's
pretraining loss (reference §6.1, LM head + cross entropy on the masked rows only), backward,
gradient clipping at 1.0, fused AdamW (lr 1e-4, wd 0.1 on matrices), f32 master weights, random
N(0, 0.02²) init and random ids. `--train-precision bf16` autocasts forward + loss to bf16 (the
usual mixed precision, the counterpart of `llada train --precision bf16`); `f32` is plain f32
with TF32 off. The first steps are warm-up; tokens/s = B·T / median step time; TFLOP/s uses the
FLOP count of `llada::train::step_flops`; MFU is against --peak-tflops.

    python3 bench/torch_reference.py --train --preset llada-1b --train-precision bf16,f32
    python3 bench/torch_reference.py --train --preset tiny --device cpu --train-steps 3 \
        --train-batch 2 --train-seq 32

--train-replay DUMP --train-init DIR: loss-curve parity. Replays a `llada train --dump-batches
DUMP` run (same starting weights, masked batches, schedule, clipping and AdamW) on --device
(default cpu) in --train-precision f32 (default; TF32 off) or bf16 (autocast, f32 master
weights) and prints PyTorch's loss beside llada's at every step
(tests/fixtures/make_loss_curve_fixture.py commits such a curve; bench/loss_curve.py compares
f32 and bf16 replays with llada's runs; bench/gpu-session.sh `GPU_SESSION_ONLY=curve` runs it
all on the GPU).

    python3 bench/torch_reference.py --train-replay dump.jsonl --train-init init \
        --device cuda --train-precision bf16 --json replay-bf16.json
"""
import argparse
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F

PRESETS = {
    # d_model, n_heads, n_layers, mlp, vocab, mask_id
    "llada-8b": dict(d=4096, nh=32, nl=32, f=12288, v=126464, mask=126336),
    # The training benchmark's preset (src/presets.rs): 1,237,379,072 parameters.
    "llada-1b": dict(d=2048, nh=16, nl=14, f=5632, v=126464, mask=126336),
    "tiny": dict(d=128, nh=2, nl=2, f=320, v=512, mask=502),
}


class Model:
    """`init="uniform"` (inference benchmark), `"normal"` (training: N(0, 0.02²)) or `"none"`
    (uninitialised, to be loaded); `trainable=True` makes every tensor a leaf that requires grad
    (the forward has no no_grad)."""

    def __init__(self, cfg, device, dtype, seed, init="uniform", trainable=False):
        g = torch.Generator(device=device).manual_seed(seed)
        d, f, v = cfg["d"], cfg["f"], cfg["v"]
        self.nh, self.hd = cfg["nh"], d // cfg["nh"]

        def w(*shape):
            t = torch.empty(*shape, device=device, dtype=dtype)
            if init == "none":  # filled by the caller (load_llada_folder)
                return t
            if init == "normal":
                t.normal_(0.0, 0.02, generator=g)
            else:
                t.uniform_(-0.02 * math.sqrt(3), 0.02 * math.sqrt(3), generator=g)
            return t

        self.wte = w(v, d)
        self.layers = []
        for _ in range(cfg["nl"]):
            self.layers.append(dict(
                attn_norm=torch.ones(d, device=device, dtype=dtype),
                wqkv=w(3 * d, d), wo=w(d, d),
                ff_norm=torch.ones(d, device=device, dtype=dtype),
                wgu=w(2 * f, d), wdown=w(d, f)))
        self.ln_f = torch.ones(d, device=device, dtype=dtype)
        self.lm_head = w(v, d)
        self.f = f
        self.rope_cache = {}
        self.device = device
        if trainable:
            for t in self.parameters():
                t.requires_grad_(True)

    def parameters(self):
        """Every tensor of the model (embedding, blocks, final norm, LM head)."""
        out = [self.wte]
        for L in self.layers:
            out += [L[k] for k in ("attn_norm", "wqkv", "wo", "ff_norm", "wgu", "wdown")]
        return out + [self.ln_f, self.lm_head]

    def rope(self, t):
        if t not in self.rope_cache:
            inv = 1.0 / (500000.0 ** (torch.arange(0, self.hd, 2, device=self.device, dtype=torch.float32) / self.hd))
            fr = torch.outer(torch.arange(t, device=self.device, dtype=torch.float32), inv)
            emb = torch.cat([fr, fr], dim=-1)
            self.rope_cache[t] = (emb.cos()[None, None], emb.sin()[None, None])
        return self.rope_cache[t]

    @staticmethod
    def rms(x, w):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + 1e-5)
        return w * y.to(x.dtype)

    def forward(self, ids, rows=None, cache=None, q0=0, flat_rows=None):
        """Without `cache`: the whole sequence. With `cache` (list per layer of [K, V], each
        [B, NH, L, HD], keys stored after RoPE): `ids` are the tokens at positions [q0, q0+T);
        their K/V overwrite those cache rows and attention reads all L rows (Fast-dLLM
        prefix/dual cache, same design as the engine). `rows`: the LM head on those positions of
        every sequence; `flat_rows`: on those rows `b·T + pos` only ([R, V] logits, training)."""
        b, t = ids.shape
        x = self.wte[ids]
        cos, sin = self.rope(q0 + t)
        cos, sin = cos[:, :, q0:q0 + t], sin[:, :, q0:q0 + t]
        for li, L in enumerate(self.layers):
            h = self.rms(x, L["attn_norm"])
            q, k, v = (h @ L["wqkv"].t()).split(h.shape[-1], dim=-1)
            q, k, v = (z.view(b, t, self.nh, self.hd).transpose(1, 2) for z in (q, k, v))

            def rot(z):
                zf = z.float()
                z1, z2 = zf[..., : self.hd // 2], zf[..., self.hd // 2:]
                return (zf * cos + torch.cat([-z2, z1], dim=-1) * sin).to(z.dtype)

            if cache is None:
                a = F.scaled_dot_product_attention(rot(q), rot(k), v, is_causal=False)
            else:
                kc, vc = cache[li]
                kc[:, :, q0:q0 + t] = rot(k)
                vc[:, :, q0:q0 + t] = v
                a = F.scaled_dot_product_attention(rot(q), kc, vc, is_causal=False)
            x = x + a.transpose(1, 2).reshape(b, t, -1) @ L["wo"].t()
            h = self.rms(x, L["ff_norm"])
            g, u = (h @ L["wgu"].t()).split(self.f, dim=-1)
            x = x + (F.silu(g) * u) @ L["wdown"].t()
        if rows is not None:
            x = x[:, rows]
        if flat_rows is not None:
            x = x.reshape(b * t, -1)[flat_rows]
        return self.rms(x, self.ln_f) @ self.lm_head.t()


def generate(model, prompt, steps, gen_length, block_length, mask_id):
    """Upstream LLaDA generate, temperature 0, low-confidence remasking, no CFG.
    The LM head runs on the current block's rows only (as the engine does)."""
    b, lp = prompt.shape
    x = torch.full((b, lp + gen_length), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :lp] = prompt
    nb = gen_length // block_length
    spb = steps // nb
    for blk in range(nb):
        s, e = lp + blk * block_length, lp + (blk + 1) * block_length
        n = (x[:, s:e] == mask_id).sum(1).tolist()
        sched = [[c // spb + (1 if i < c % spb else 0) for i in range(spb)] for c in n]
        for i in range(spb):
            logits = model.forward(x, rows=slice(s, e))
            x0 = logits.argmax(-1)
            p = F.softmax(logits, dim=-1)
            conf = torch.gather(p, -1, x0[..., None])[..., 0]
            masked = x[:, s:e] == mask_id
            conf = torch.where(masked, conf, torch.tensor(-float("inf"), dtype=conf.dtype, device=conf.device))
            for j in range(b):
                k = sched[j][i]
                if k > 0:
                    _, idx = torch.topk(conf[j], k)
                    x[j, s + idx] = torch.where(masked[j, idx], x0[j, idx], x[j, s + idx])
    return x


def generate_fd(model, prompt, steps, gen_length, block_length, mask_id, cache_mode, threshold):
    """Fast-dLLM decoding (FD-new control flow): a full pass at each block start refills the
    cache; then "block done?" is checked before each call; prefix runs [s, L), dual [s, e), none
    the whole sequence. Fixed schedule or threshold rule (top-1 + every conf >= threshold).
    Returns (x, nfe)."""
    b, lp = prompt.shape
    L = lp + gen_length
    x = torch.full((b, L), mask_id, dtype=torch.long, device=prompt.device)
    x[:, :lp] = prompt
    nb = gen_length // block_length
    spb = steps // nb
    kv = [[torch.empty(b, model.nh, L, model.hd, device=prompt.device, dtype=model.wte.dtype)
           for _ in range(2)] for _ in model.layers]
    nfe = 0
    for blk in range(nb):
        s, e = lp + blk * block_length, lp + (blk + 1) * block_length
        n = (x[:, s:e] == mask_id).sum(1).tolist()
        sched = [[c // spb + (1 if i < c % spb else 0) for i in range(spb)] for c in n]
        i = 0
        while i == 0 or (x[:, s:e] == mask_id).any():
            q0, q1 = (0, L) if i == 0 or cache_mode == "none" else ((s, L) if cache_mode == "prefix" else (s, e))
            logits = model.forward(x[:, q0:q1], rows=slice(s - q0, e - q0),
                                   cache=None if cache_mode == "none" else kv, q0=q0)
            nfe += 1
            x0 = logits.argmax(-1)
            conf = torch.gather(F.softmax(logits.double(), dim=-1), -1, x0[..., None])[..., 0]
            masked = x[:, s:e] == mask_id
            conf = torch.where(masked, conf, torch.tensor(-float("inf"), dtype=conf.dtype, device=conf.device))
            for j in range(b):
                m = int(masked[j].sum())
                if m == 0:
                    continue
                if threshold is None:
                    k = min(sched[j][i] if i < spb else 1, m)
                else:
                    srt = torch.sort(conf[j], descending=True).values
                    k = 1 + int((srt[1:m] >= threshold).sum())
                if k > 0:
                    _, idx = torch.topk(conf[j], k)
                    x[j, s + idx] = x0[j, idx]
            i += 1
    return x, nfe


def sync(dev):
    if dev.startswith("cuda"):
        torch.cuda.synchronize()


def step_flops(cfg, b, t, rows):
    """Model FLOPs of one forward + backward, exactly `llada::train::step_flops`
    (src/train/mod.rs): 6·(block matrix parameters per token) on every token, 6·V·C per loss
    row for the LM head, 12·L·B·T²·NH·HD for attention. NKV = NH in these presets."""
    c, f, l = float(cfg["d"]), float(cfg["f"]), float(cfg["nl"])
    hd = c / cfg["nh"]
    qw = kw = cfg["nh"] * hd
    per_tok = l * (c * (qw + 2.0 * kw) + qw * c + 3.0 * c * f)
    return 6.0 * per_tok * (b * t) + 6.0 * cfg["v"] * c * rows + 12.0 * l * b * (t * t) * qw


def pretrain_loss(model, ids, mask_id, gen, precision):
    """Reference §6.1 (upstream's pretraining loss): per row t ~ U(0,1), p = (1−1e-3)·t + 1e-3,
    every token masked with probability p, loss = Σ_masked CE/p / (B·L). The LM head and the
    cross entropy run on the masked rows only (as `llada train`). Returns (loss, masked rows)."""
    b, t = ids.shape
    eps = 1e-3
    p = (1 - eps) * torch.rand(b, 1, device=ids.device, generator=gen) + eps
    masked = torch.rand(b, t, device=ids.device, generator=gen) < p
    noisy = torch.where(masked, torch.full_like(ids, mask_id), ids)
    rows = masked.reshape(-1).nonzero().squeeze(1)
    with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        logits = model.forward(noisy, flat_rows=rows)
        ce = F.cross_entropy(logits, ids.reshape(-1)[rows], reduction="none")
    w = p.expand(b, t).reshape(-1)[rows]
    return (ce.float() / w).sum() / (b * t), int(rows.numel())


def train_bench(cfg, preset, dev, precision, a, name):
    """`--train`: AdamW steps of `pretrain_loss` on random ids; the last steps are timed."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(a.train_seed)
    model = Model(cfg, dev, torch.float32, seed=a.train_seed, init="normal", trainable=True)
    params = model.parameters()
    # Weight decay on matrices only (the RMSNorm weights are not decayed), as `llada train`.
    groups = [dict(params=[q for q in params if q.dim() >= 2], weight_decay=a.train_wd),
              dict(params=[q for q in params if q.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=a.train_lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=dev.startswith("cuda"))
    gen = torch.Generator(device=dev).manual_seed(a.train_seed + 1)
    hi = min(126000, cfg["mask"])  # clean ids never equal the mask id
    b, t, n = a.train_batch, a.train_seq, a.train_steps
    warm = 2 if n >= 5 else (1 if n >= 2 else 0)
    steps = []
    for i in range(n):
        ids = torch.randint(0, hi, (b, t), device=dev, generator=gen)
        sync(dev)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, rows = pretrain_loss(model, ids, cfg["mask"], gen, precision)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sync(dev)
        secs = time.perf_counter() - t0
        flops = step_flops(cfg, b, t, rows)
        loss, gnorm = float(loss.detach()), float(gnorm)
        steps.append(dict(step=i + 1, loss=loss, grad_norm=gnorm, rows=rows,
                          seconds=secs, flops=flops, timed=i >= warm))
        print(f"# {precision} step {i + 1}/{n} loss {loss:.4f} gnorm {gnorm:.3f} "
              f"masked {rows} {secs * 1e3:.1f} ms{'' if i >= warm else ' (warm-up)'}", flush=True)
    timed = [s for s in steps if s["timed"]]
    sec = statistics.median(s["seconds"] for s in timed)
    tflops = statistics.median(s["flops"] / s["seconds"] for s in timed) / 1e12
    mem = torch.cuda.max_memory_allocated() / 2**30 if dev.startswith("cuda") else None
    row = dict(precision=precision, batch=b, seq_len=t, steps=n, warmup_steps=warm,
               step_seconds_median=sec, tokens_per_s=b * t / sec, tflops=tflops,
               mfu=tflops / a.peak_tflops if a.peak_tflops > 0 else None,
               max_memory_gib=mem, step_log=steps)
    mfu = f"{100 * row['mfu']:.3g}%" if row["mfu"] is not None else "-"
    print(f"torch train {preset} {precision}: B={b} T={t}  {sec * 1e3:.1f} ms/step (median of "
          f"{len(timed)})  tok/s {row['tokens_per_s']:.0f}  TFLOP/s {tflops:.4g}  MFU {mfu} "
          f"(peak {a.peak_tflops:g})  loss {steps[-1]['loss']:.4f}", flush=True)
    return row


def train_main(a, dev):
    preset = a.preset or ("llada-1b" if dev.startswith("cuda") else "tiny")
    if preset not in PRESETS:
        raise SystemExit(f"unknown preset `{preset}` (known: {', '.join(PRESETS)})")
    precs = [x for x in a.train_precision.split(",") if x]
    bad = [x for x in precs if x not in ("bf16", "f32")]
    if bad or not precs:
        raise SystemExit(f"--train-precision: `{a.train_precision}` (give bf16, f32 or bf16,f32)")
    if a.train_batch < 1 or a.train_seq < 1 or a.train_steps < 1:
        raise SystemExit("--train-batch, --train-seq and --train-steps must be at least 1")
    cfg = PRESETS[preset]
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"# torch reference training  device: {name}  torch {torch.__version__}  preset {preset}"
          f"  batch {a.train_batch} x {a.train_seq}  AdamW lr {a.train_lr:g} wd {a.train_wd:g}"
          f"  clip 1.0", flush=True)
    rows = []
    for prec in precs:
        rows.append(train_bench(cfg, preset, dev, prec, a, name))
        if dev.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    if a.json:
        out = dict(engine="torch_reference", mode="train", torch=torch.__version__, device=name,
                   preset=preset, batch=a.train_batch, seq_len=a.train_seq, steps=a.train_steps,
                   lr=a.train_lr, weight_decay=a.train_wd, peak_tflops=a.peak_tflops, rows=rows)
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


def schedule_lr(o, step):
    """`llada::train::optim::Schedule::lr` for the options `o` (TrainOptions as JSON)."""
    peak, warmup, total = o["lr"], o["warmup"], o["steps"]
    if step < warmup:
        return peak * (step + 1) / warmup

    def lin(start, length, final_frac):
        f = min((step - start) / max(length, 1), 1.0)
        return peak * (1.0 - f * (1.0 - final_frac))

    if o["schedule"] == "constant":
        return peak
    if o["schedule"] == "linear":
        return lin(warmup, max(total - warmup, 0), 0.1)
    if o["schedule"] == "wsd":
        start = max(max(total - max(total // 10, 1), 0), warmup)
        return peak if step < start else lin(start, total - start, 0.1)
    raise SystemExit(f"unknown schedule {o['schedule']!r}")


def read_safetensors(path):
    """name -> f32 CPU tensor of one safetensors file, without the `safetensors` package (the
    GPU machine may lack it): 8-byte header length, JSON header, then each tensor's bytes
    (F32, BF16 or F16, little-endian), read one tensor at a time."""
    dtypes = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    out = {}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        for name, m in header.items():
            if name == "__metadata__":
                continue
            if m["dtype"] not in dtypes:
                raise SystemExit(f"{path}: tensor {name} has dtype {m['dtype']} (F32, BF16 or F16 only)")
            a, b = m["data_offsets"]
            f.seek(8 + n + a)
            buf = bytearray(f.read(b - a))
            if len(buf) != b - a:
                raise SystemExit(f"{path}: tensor {name} is cut short")
            t = torch.frombuffer(buf, dtype=dtypes[m["dtype"]]) if buf else torch.empty(0)
            out[name] = t.view(m["shape"]).float().clone()
    return out


def load_llada_folder(path, device="cpu"):
    """A llada / Hugging Face LLaDA folder's weights (model.safetensors, or the shards of
    model.safetensors.index.json) in f32 as this file's `Model` (q/k/v and gate/up concatenated
    into `wqkv` / `wgu`; exact copies) on `device`, trainable."""
    import os
    hf = json.load(open(os.path.join(path, "config.json")))
    if hf["rope_theta"] != 500000.0 or hf["rms_norm_eps"] != 1e-5 or hf["n_kv_heads"] != hf["n_heads"]:
        raise SystemExit(f"{path}: Model hard-codes rope_theta 5e5, eps 1e-5 and NKV = NH")
    cfg = dict(d=hf["d_model"], nh=hf["n_heads"], nl=hf["n_layers"], f=hf["mlp_hidden_size"],
               v=hf["embedding_size"], mask=hf["mask_token_id"])
    index = os.path.join(path, "model.safetensors.index.json")
    files = (sorted(set(json.load(open(index))["weight_map"].values())) if os.path.exists(index)
             else ["model.safetensors"])
    w = {}
    for fn in files:
        for k, v in read_safetensors(os.path.join(path, fn)).items():
            w[k[len("model.transformer."):]] = v
    m = Model(cfg, device, torch.float32, seed=0, init="none")
    dev = lambda t: t.to(device).contiguous()  # noqa: E731
    m.wte, m.ln_f, m.lm_head = dev(w.pop("wte.weight")), dev(w.pop("ln_f.weight")), dev(w.pop("ff_out.weight"))
    for i, L in enumerate(m.layers):
        b = lambda n: w.pop(f"blocks.{i}.{n}.weight")  # noqa: E731
        L.update(attn_norm=dev(b("attn_norm")), wo=dev(b("attn_out")), ff_norm=dev(b("ff_norm")),
                 wdown=dev(b("ff_out")),
                 wqkv=dev(torch.cat([b("q_proj"), b("k_proj"), b("v_proj")])),
                 wgu=dev(torch.cat([b("ff_proj"), b("up_proj")])))
    if w:
        raise SystemExit(f"{path}: unexpected tensors {sorted(w)[:5]}")
    for t in m.parameters():
        t.requires_grad_(True)
    return m, cfg


def train_replay(a):
    """`--train-replay DUMP --train-init DIR`: llada's training run, step for step, through
    PyTorch on `--device` (default cpu) in `--train-precision` f32 (default; TF32 off) or bf16
    (torch.autocast to bf16 around forward + loss, f32 master weights, gradients and AdamW: the
    usual mixed precision, which `llada train --precision bf16` mirrors). DUMP is `llada train
    --dump-batches` (its options, every micro-batch's masked ids, loss rows, targets and
    per-sequence mask probability p, llada's loss per step); DIR the starting weights. The loss
    is upstream's (reference §6.1) from p alone, Σ_masked CE/p / (B·L), over `accum`
    micro-batches; llada's loss weights are checked against it. Then PyTorch's clip_grad_norm_
    and AdamW (β 0.9/0.999, ε 1e-8, decay on matrices only) at llada's schedule, which is
    recomputed here and checked. Prints both loss curves; --json writes them
    (`bench/loss_curve.py` compares such replays with llada's runs)."""
    dev = a.device or "cpu"
    prec = a.train_precision or "f32"
    if prec not in ("f32", "bf16"):
        raise SystemExit(f"--train-replay: --train-precision {prec!r} (give f32 or bf16)")
    if dev.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    else:
        # One thread and no oneDNN: the CPU replay sums in a fixed order.
        torch.set_num_threads(1)
        torch.backends.mkldnn.enabled = False
    raw = [x for x in open(a.train_replay) if x.strip()]
    lines = []
    for i, x in enumerate(raw):
        try:
            lines.append(json.loads(x))
        except json.JSONDecodeError:
            # A run cut short by a timeout may leave its last line unfinished: replay what is
            # whole. A bad line anywhere else is a broken dump.
            if i + 1 < len(raw):
                raise SystemExit(f"--train-replay: line {i + 1} of {a.train_replay} is not JSON")
            print(f"warning: ignoring the unfinished last line of {a.train_replay}",
                  file=sys.stderr)
    o = lines[0]["options"]
    if o["sft"] or o["world"] != 1:
        raise SystemExit("--train-replay: pretraining dumps of one process only")
    t0 = time.perf_counter()
    model, cfg = load_llada_folder(a.train_init, dev)
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"
    print(f"# replay {a.train_replay} on {name} ({dev}), {prec}, torch {torch.__version__}; "
          f"weights loaded in {time.perf_counter() - t0:.1f} s", flush=True)
    params = model.parameters()
    groups = [dict(params=[q for q in params if q.dim() >= 2], weight_decay=o["weight_decay"]),
              dict(params=[q for q in params if q.dim() < 2], weight_decay=0.0)]
    opt = torch.optim.AdamW(groups, lr=o["lr"], betas=(0.9, 0.999), eps=1e-8, foreach=False)
    micro = {}
    llada_steps = {}
    for x in lines[1:]:
        if "micro" in x:
            micro.setdefault(x["step"], []).append(x)
        else:
            llada_steps[x["step"]] = x
    last = max(micro) if micro else None
    if last is not None and (len(micro[last]) != o["accum"] or last + 1 not in llada_steps):
        # The step a timeout cut short (its micro-batches or its result not all written).
        print(f"warning: ignoring step {last + 1}, unfinished in {a.train_replay}", file=sys.stderr)
        del micro[last]
    out = []
    for step in sorted(micro):
        mbs = micro[step]
        if len(mbs) != o["accum"]:
            raise SystemExit(f"step {step}: {len(mbs)} micro-batches, accum is {o['accum']}")
        lr = schedule_lr(o, step)
        ll = llada_steps.get(step + 1)
        if ll is not None and abs(lr - ll["lr"]) > 1e-12 * lr:
            raise SystemExit(f"step {step + 1}: lr {lr} here, {ll['lr']} in llada")
        ts = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for mb in mbs:
            b, t = mb["b"], mb["t"]
            ids = torch.tensor(mb["ids"], dtype=torch.long).view(b, t).to(dev)
            rows = torch.tensor(mb["rows"], dtype=torch.long)
            p = torch.tensor(mb["p"], dtype=torch.float64)[rows // t]
            want = 1.0 / (p * (b * t) * o["accum"])
            got = torch.tensor(mb["weights"], dtype=torch.float64)
            if not torch.allclose(got, want, rtol=1e-12, atol=0):
                raise SystemExit(f"step {step + 1}: llada's loss weights are not 1/(p·B·L·accum)")
            rows, p = rows.to(dev), p.to(dev)
            targets = torch.tensor(mb["targets"], dtype=torch.long).to(dev)
            with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=prec == "bf16"):
                logits = model.forward(ids, flat_rows=rows)
                ce = F.cross_entropy(logits, targets, reduction="none")
            loss = (ce.float() / p.float()).sum() / (b * t) / o["accum"]
            loss.backward()
            total += float(loss.detach())
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, o["clip"])) if o["clip"] > 0 else 0.0
        for g in opt.param_groups:
            g["lr"] = lr
        opt.step()
        sync(dev)
        secs = time.perf_counter() - ts
        row = dict(step=step + 1, loss=total, grad_norm=gnorm, lr=lr,
                   masked=sum(len(mb["rows"]) for mb in mbs), llada_loss=ll and ll["loss"],
                   seconds=secs)
        out.append(row)
        rel = "" if ll is None else f"  llada {ll['loss']:.7f} (rel {abs(total - ll['loss']) / total:.1e})"
        print(f"# replay step {step + 1}: torch loss {total:.7f} gnorm {gnorm:.5f}{rel}", flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(dict(engine="torch_reference", mode="train_replay", torch=torch.__version__,
                           device=name, precision=prec, options=o, steps=out), fh, indent=1)
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--gen-length", type=int, default=256)
    ap.add_argument("--block-length", type=int, default=32)
    ap.add_argument("--steps", default="256,128,64,32")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--forward-iters", type=int, default=20)
    ap.add_argument("--cache", default="", help="Fast-dLLM modes to add, comma separated: none,prefix,dual")
    ap.add_argument("--threshold", default="", help="Fast-dLLM thresholds, comma separated (rows per cache mode)")
    ap.add_argument("--json", default=None)
    ap.add_argument("--train", action="store_true",
                    help="training throughput instead (upstream's pretraining loss, AdamW)")
    ap.add_argument("--train-precision", default=None,
                    help="bf16 (autocast, f32 master weights), f32 (no TF32), or bf16,f32 "
                         "(--train; default bf16); f32 or bf16 with --train-replay (default f32)")
    ap.add_argument("--train-batch", type=int, default=8)
    ap.add_argument("--train-seq", type=int, default=512)
    ap.add_argument("--train-steps", type=int, default=6)
    ap.add_argument("--train-lr", type=float, default=1e-4)
    ap.add_argument("--train-wd", type=float, default=0.1)
    ap.add_argument("--train-seed", type=int, default=0)
    ap.add_argument("--train-replay", default=None, metavar="DUMP",
                    help="replay `llada train --dump-batches DUMP` (loss-curve parity; --device, "
                         "default cpu, and --train-precision f32|bf16)")
    ap.add_argument("--train-init", default=None, metavar="DIR",
                    help="with --train-replay: the starting weights (the llada folder the run "
                         "started from, any stored dtype)")
    ap.add_argument("--peak-tflops", type=float, default=989.0,
                    help="MFU denominator (default: H100 SXM dense bf16)")
    a = ap.parse_args()
    if a.train_replay:
        if not a.train_init:
            raise SystemExit("--train-replay needs --train-init DIR (the starting weights)")
        return train_replay(a)
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.train:
        a.train_precision = a.train_precision or "bf16"
        return train_main(a, dev)
    preset = a.preset or ("llada-8b" if dev.startswith("cuda") else "tiny")
    cfg = PRESETS[preset]
    dtype = torch.bfloat16
    torch.manual_seed(0)
    model = Model(cfg, dev, dtype, seed=0)
    prompt = torch.randint(0, min(cfg["mask"], 100000), (a.batch, a.prompt_len), device=dev)
    L = a.prompt_len + a.gen_length
    name = torch.cuda.get_device_name() if dev.startswith("cuda") else "cpu"

    with torch.no_grad():
        # Forward latency over the whole sequence (LM head on one block's rows).
        ids = torch.full((a.batch, L), cfg["mask"], device=dev, dtype=torch.long)
        ids[:, :a.prompt_len] = prompt
        for _ in range(3):
            model.forward(ids, rows=slice(a.prompt_len, a.prompt_len + a.block_length))
        sync(dev)
        times = []
        for _ in range(a.forward_iters):
            t0 = time.perf_counter()
            model.forward(ids, rows=slice(a.prompt_len, a.prompt_len + a.block_length))
            sync(dev)
            times.append((time.perf_counter() - t0) * 1e3)
        fwd_ms = statistics.median(times)

        rows = []
        for steps in [int(s) for s in a.steps.split(",") if s]:
            gts = []
            for _ in range(a.repeats):
                sync(dev)
                t0 = time.perf_counter()
                generate(model, prompt, steps, a.gen_length, a.block_length, cfg["mask"])
                sync(dev)
                gts.append(time.perf_counter() - t0)
            t = statistics.median(gts)
            rows.append(dict(steps=steps, forward_passes=steps, seconds=t,
                             tokens_per_s=a.batch * a.gen_length / t, ms_per_step=t * 1e3 / steps))

        caches = [c for c in a.cache.split(",") if c]
        ths = [float(t) for t in a.threshold.split(",") if t]
        nb = a.gen_length // a.block_length
        for cm in caches:
            configs = [(None, st) for st in [int(s) for s in a.steps.split(",") if s]]
            configs += [(th, nb) for th in ths]
            for th, steps in configs:
                gts, nfe = [], 0
                for _ in range(a.repeats):
                    sync(dev)
                    t0 = time.perf_counter()
                    _, nfe = generate_fd(model, prompt, steps, a.gen_length, a.block_length, cfg["mask"], cm, th)
                    sync(dev)
                    gts.append(time.perf_counter() - t0)
                t = statistics.median(gts)
                rows.append(dict(cache=cm, threshold=th, steps=steps, forward_passes=nfe, seconds=t,
                                 tokens_per_s=a.batch * a.gen_length / t, ms_per_step=t * 1e3 / nfe))

    out = dict(engine="torch_reference", torch=torch.__version__, device=name, preset=preset,
               batch=a.batch, prompt_len=a.prompt_len, gen_length=a.gen_length,
               block_length=a.block_length, forward_ms_median=fwd_ms, rows=rows)
    print(f"# torch reference  device: {name}  torch {torch.__version__}  preset {preset}  batch {a.batch}")
    print(f"# forward B={a.batch} L={L} (LM head on {a.block_length} rows): {fwd_ms:.2f} ms median")
    print(f"{'cache':>7} {'rule':>9} {'steps':>6} {'fwd':>5} {'tok/s':>9} {'ms/step':>9}")
    for r in rows:
        rule = "schedule" if r.get("threshold") is None else f"thr {r['threshold']}"
        print(f"{r.get('cache', '-'):>7} {rule:>9} {r['steps']:>6} {r['forward_passes']:>5} "
              f"{r['tokens_per_s']:>9.1f} {r['ms_per_step']:>9.2f}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
