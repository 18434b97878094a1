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
    "tiny": dict(d=128, nh=2, nl=2, f=320, v=512, mask=502),
}


class Model:
    def __init__(self, cfg, device, dtype, seed):
        g = torch.Generator(device=device).manual_seed(seed)
        d, f, v = cfg["d"], cfg["f"], cfg["v"]
        self.nh, self.hd = cfg["nh"], d // cfg["nh"]

        def w(*shape):
            t = torch.empty(*shape, device=device, dtype=dtype)
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

    def forward(self, ids, rows=None, cache=None, q0=0):
        """Without `cache`: the whole sequence. With `cache` (list per layer of [K, V], each
        [B, NH, L, HD], keys stored after RoPE): `ids` are the tokens at positions [q0, q0+T);
        their K/V overwrite those cache rows and attention reads all L rows (Fast-dLLM
        prefix/dual cache, same design as the engine)."""
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
    a = ap.parse_args()
    dev = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
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
