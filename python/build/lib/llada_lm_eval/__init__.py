"""lm-evaluation-harness model ``llada``: a client of ``llada serve``.

``loglikelihood`` posts (context, continuation) pairs to ``/v1/loglikelihood`` (upstream
``get_log_likelihood``, the Monte-Carlo ELBO, with upstream's ``mc_num``, ``batch_size`` and
``cfg`` settings); ``generate_until`` posts the raw context to ``/v1/completions`` with the
task's stop sequences (greedy, no chat template, as upstream's ``eval_llada.py``).

    python -m llada_lm_eval --model llada \\
        --model_args base_url=http://127.0.0.1:8000,mc_num=128,cfg=0.5 --batch_size 8 --tasks arc_challenge

Model arguments: ``base_url`` (default ``http://127.0.0.1:8000``), ``api_key``, ``model`` (the
served name; default: the first of ``/v1/models``), ``mc_num`` (128), ``batch_size`` (the
Monte-Carlo mini-batch, upstream's ``--batch_size``; default: the server's), ``cfg`` or
``cfg_scale`` (0), ``seed``, ``steps``, ``gen_length``, ``block_length``, ``remasking``,
``temperature`` (0), ``cache``, ``threshold``, ``factor``, ``requests_per_call`` (pairs per HTTP
call, 32), ``timeout`` (seconds, 3600). Only the standard library is used for HTTP.
"""

import json
import urllib.error
import urllib.request

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

__all__ = ["LladaLM"]

_GEN_KEYS = ("steps", "gen_length", "block_length", "remasking", "temperature", "cache",
             "threshold", "factor", "seed", "cfg_scale")


def _num(v, kind):
    if v is None or v == "":
        return None
    return kind(v)


@register_model("llada")
class LladaLM(LM):
    def __init__(self, base_url="http://127.0.0.1:8000", api_key=None, model=None, mc_num=128,
                 batch_size=None, cfg=None, cfg_scale=None, seed=None, steps=None,
                 gen_length=None, block_length=None, remasking=None, temperature=0.0,
                 cache=None, threshold=None, factor=None, requests_per_call=32, timeout=3600,
                 max_batch_size=None, device=None, **kwargs):
        super().__init__()
        self.base_url = str(base_url).rstrip("/")
        if self.base_url.endswith("/v1"):
            self.base_url = self.base_url[:-3]
        self.api_key = api_key
        self.timeout = float(timeout)
        self.requests_per_call = max(1, int(requests_per_call))
        self.mc_num = int(mc_num)
        # lm-eval passes --batch_size as "auto" or an int; upstream uses it as the MC mini-batch.
        self.batch_size = None if batch_size in (None, "", "auto") else int(str(batch_size).split(":")[0])
        if self.batch_size is not None and self.mc_num % self.batch_size != 0:
            raise ValueError(f"mc_num {self.mc_num} is not a multiple of batch_size {self.batch_size}")
        c = cfg if cfg is not None else cfg_scale
        self.cfg = float(c) if c is not None else 0.0
        self.seed = _num(seed, int)
        self.gen = {
            "steps": _num(steps, int),
            "max_tokens": _num(gen_length, int),
            "block_length": _num(block_length, int),
            "remasking": remasking,
            "temperature": _num(temperature, float),
            "cache": cache,
            "threshold": _num(threshold, float),
            "factor": _num(factor, float),
            "seed": self.seed,
            "cfg_scale": self.cfg,
        }
        self.gen = {k: v for k, v in self.gen.items() if v is not None}
        self.model = model or self._get("/v1/models")["data"][0]["id"]

    # -- HTTP ---------------------------------------------------------------------------------
    def _request(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base_url + path, data=data, method=method)
        req.add_header("Content-Type", "application/json")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            try:
                detail = json.loads(detail)["error"]["message"]
            except (ValueError, KeyError, TypeError):
                pass
            raise RuntimeError(f"llada serve {path}: HTTP {e.code}: {detail}") from None

    def _get(self, path):
        return self._request("GET", path)

    def _post(self, path, body):
        return self._request("POST", path, body)

    # -- lm-eval API --------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm=False):
        pairs = [req.args for req in requests]
        out = []
        for i in range(0, len(pairs), self.requests_per_call):
            chunk = pairs[i:i + self.requests_per_call]
            body = {
                "model": self.model,
                "requests": [{"prompt": c, "continuation": x} for c, x in chunk],
                "mc_num": self.mc_num,
                "cfg_scale": self.cfg,
            }
            if self.batch_size is not None:
                body["batch_size"] = self.batch_size
            if self.seed is not None:
                body["seed"] = self.seed
            res = self._post("/v1/loglikelihood", body)["results"]
            # is_greedy: upstream's scripts run with is_check_greedy=False (always False).
            out.extend((float(r["loglikelihood"]), False) for r in res)
            for (ctx, cont), r in zip(chunk, res):
                self.cache_hook.add_partial("loglikelihood", (ctx, cont), (float(r["loglikelihood"]), False))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        raise NotImplementedError("loglikelihood_rolling is not supported by LLaDA (as upstream)")

    def generate_until(self, requests, disable_tqdm=False):
        out = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            if isinstance(until, str):
                until = [until]
            body = dict(self.gen)
            body.update({"model": self.model, "prompt": context})
            stops = [s for s in until if s]
            if stops:
                body["stop"] = stops[:4]
            text = self._post("/v1/completions", body)["choices"][0]["text"]
            # More than 4 stop sequences: the rest are applied here, as lm-eval does.
            for s in stops[4:]:
                text = text.split(s)[0]
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        return out
