//! The LLaDA forward pass, written once over [`crate::backend::Backend`] (reference §2.2).
//!
//! ```text
//! x = wte[ids]                                              [N, C]
//! per layer:  h = rms_norm(x; attn_norm)      (layers > 0: x += d fused in, add_rms_norm)
//!             qkv = h · W_qkvᵀ                              [N, (NH+2·NKV)·HD]
//!             rope(q, k) at positions 0..T per batch row (absolute; left padding not compensated)
//!             a = attention(qkv; key_valid)                 [N, NH·HD]   bidirectional
//!             d = a · W_oᵀ                                  [N, C]
//!             x = x + d ; h = rms_norm(x; ff_norm)          (add_rms_norm)
//!             gu = h · W_gate_upᵀ                           [N, 2F]
//!             m = silu(gate) · up                           [N, F]
//!             d = m · W_downᵀ                               [N, C]
//! on the R requested rows only:  xr = x[rows] + d[rows] ; hr = rms_norm(xr; ln_f)
//! logits = hr · W_lm_headᵀ                                  [R, V]
//! ```
//!
//! `q|k|v` and `gate|up` are merged into one weight each (one matmul). Every buffer lives in a
//! [`Workspace`] allocated once for a capacity, so a forward pass allocates nothing.

use std::ffi::CStr;
use std::sync::atomic::{AtomicU64, Ordering};

use anyhow::{bail, ensure, Context, Result};

use crate::backend::{rope_tables, Backend, CachedAttnShape, Gather, Kv, MatMul, Norm, OpClass};
use crate::backend::{Rope, Rows};
use crate::engine::graphs::*;
use crate::engine::stepbufs::StepBufs;
use crate::hf::checkpoint::WeightSource;
use crate::hf::config::ModelConfig;
use crate::nvtx;
use crate::quant::fp8::Fp8Weight;

/// NVTX names of the layer ranges (static: no allocation per call); deeper layers are `layer`.
static LAYER_NAMES: [&CStr; 64] = [
    c"layer 0",
    c"layer 1",
    c"layer 2",
    c"layer 3",
    c"layer 4",
    c"layer 5",
    c"layer 6",
    c"layer 7",
    c"layer 8",
    c"layer 9",
    c"layer 10",
    c"layer 11",
    c"layer 12",
    c"layer 13",
    c"layer 14",
    c"layer 15",
    c"layer 16",
    c"layer 17",
    c"layer 18",
    c"layer 19",
    c"layer 20",
    c"layer 21",
    c"layer 22",
    c"layer 23",
    c"layer 24",
    c"layer 25",
    c"layer 26",
    c"layer 27",
    c"layer 28",
    c"layer 29",
    c"layer 30",
    c"layer 31",
    c"layer 32",
    c"layer 33",
    c"layer 34",
    c"layer 35",
    c"layer 36",
    c"layer 37",
    c"layer 38",
    c"layer 39",
    c"layer 40",
    c"layer 41",
    c"layer 42",
    c"layer 43",
    c"layer 44",
    c"layer 45",
    c"layer 46",
    c"layer 47",
    c"layer 48",
    c"layer 49",
    c"layer 50",
    c"layer 51",
    c"layer 52",
    c"layer 53",
    c"layer 54",
    c"layer 55",
    c"layer 56",
    c"layer 57",
    c"layer 58",
    c"layer 59",
    c"layer 60",
    c"layer 61",
    c"layer 62",
    c"layer 63",
];

/// How [`Model::load_fp8`] obtains a linear layer's FP8 weight by tensor name.
type GetFp8<'a> = dyn Fn(&str) -> Result<Fp8Weight> + 'a;

/// Unique ids of models and KV caches, so a graph is replayed only on the buffers it captured.
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

/// Run one op (or a few of one class): open its profiling interval and its NVTX range.
#[inline]
fn op<B: Backend, T>(
    be: &B,
    class: OpClass,
    name: &CStr,
    f: impl FnOnce() -> Result<T>,
) -> Result<T> {
    be.prof_mark(Some(class));
    let _r = nvtx::range(name);
    f()
}

/// One transformer block's weights.
pub struct Layer<B: Backend> {
    pub attn_norm: B::Weight,
    /// `[q_proj; k_proj; v_proj]`: `[(NH + 2·NKV)·HD, C]`.
    pub qkv: B::Weight,
    /// `attn_out`: `[C, NH·HD]`.
    pub attn_out: B::Weight,
    pub ff_norm: B::Weight,
    /// `[ff_proj (gate); up_proj]`: `[2F, C]`.
    pub gate_up: B::Weight,
    /// Block `ff_out` (down): `[C, F]`.
    pub down: B::Weight,
}

/// A LLaDA model resident on a backend.
pub struct Model<B: Backend> {
    pub cfg: ModelConfig,
    pub backend: B,
    /// `[V, C]`.
    pub wte: B::Weight,
    pub layers: Vec<Layer<B>>,
    pub ln_f: B::Weight,
    /// `[V, C]`.
    pub lm_head: B::Weight,
    /// RoPE tables `[max_pos, HD/2]` (see [`rope_tables`]), uploaded once.
    rope_cos: B::F32s,
    rope_sin: B::F32s,
    rope_positions: usize,
    /// Unique per loaded model (keys the graphs of a workspace).
    pub(crate) id: u64,
    /// Fused glue kernels where a backend has them ([`Model::set_fused`]).
    fused: bool,
}

/// Buffers of one forward pass, sized once for at most `max_tokens` (= B·T) tokens and
/// `max_rows` LM-head rows.
pub struct Workspace<B: Backend> {
    pub max_tokens: usize,
    pub max_rows: usize,
    /// Token ids `[N]`.
    pub(crate) ids: B::Ints,
    /// Positions `[N]`.
    pos: B::Ints,
    /// Key validity `[N]` (1 = attend).
    key_valid: B::Ints,
    /// Flat token indices of the LM-head rows `[R]`.
    pub(crate) rows: B::Ints,
    /// RNG keys of the LM-head rows `[R, 2]`: (batch row, position).
    pub(crate) keys: B::Ints,
    /// Chosen tokens `[R]`.
    pub(crate) tok: B::Ints,
    /// Confidences `[R]`.
    pub(crate) conf: B::F32s,
    /// Residual stream `[N, C]`.
    x: B::Act,
    /// Normalised activations `[N, C]`.
    h: B::Act,
    /// `[N, (NH + 2·NKV)·HD]`.
    qkv: B::Act,
    /// Attention output `[N, NH·HD]`.
    att: B::Act,
    /// Branch output to add to the residual `[N, C]`.
    d: B::Act,
    /// `[N, 2F]`.
    gate_up: B::Act,
    /// `[N, F]`.
    mlp: B::Act,
    /// Gathered residual / branch / normalised rows `[R, C]`.
    xr: B::Act,
    dr: B::Act,
    hr: B::Act,
    /// `[R, V]`.
    pub(crate) logits: B::Act,
    // Host staging, sized once.
    h_ids: Vec<i32>,
    h_pos: Vec<i32>,
    h_mask: Vec<i32>,
    h_rows: Vec<i32>,
    /// Rows of the last forward pass.
    pub(crate) last_rows: usize,
    /// Captured layer passes and step graphs (CUDA graphs), see [`GraphCache`].
    pub(crate) graphs: GraphCache,
    /// The device buffers of step graphs ([`crate::engine::stepgraph`]), made on first use.
    pub(crate) step: Option<StepBufs<B>>,
}

impl<B: Backend> Workspace<B> {
    /// Use graphs for repeated shapes (default: on unless `LLADA_NO_GRAPHS=1`; profiling and
    /// backends without graphs always run eagerly). Turning them off drops the captured ones.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs.enabled = on;
        if !on {
            self.graphs.map.clear();
        }
    }

    /// (graphs captured, graph replays) so far.
    pub fn graph_stats(&self) -> (usize, usize) {
        (self.graphs.captures, self.graphs.replays)
    }
}

/// The Fast-dLLM KV cache (reference §7): per layer a K and a V buffer `[B, L, NKV·HD]` on the
/// backend. Keys are stored **after** RoPE at their absolute positions (upstream stores them
/// before RoPE and re-rotates all keys at positions `0..L` on every call; since a key never
/// changes position, both give the same rotated values, rounded once). A step writes the K/V of
/// the tokens it runs into their rows and attends over all `L` rows, so one mechanism serves the
/// full pass (`[0, L)`), the prefix cache (`[s, L)`) and the dual cache (`[s, e)`).
pub struct KvCache<B: Backend> {
    /// Capacity in tokens (B·L).
    pub max_tokens: usize,
    k: Vec<B::Act>,
    v: Vec<B::Act>,
    /// Unique per cache (keys the graphs that captured its buffers).
    pub(crate) id: u64,
}

fn expect_shape(src: &WeightSource, want: &[usize]) -> Result<()> {
    ensure!(
        src.shape() == want,
        "tensor `{}` has shape {:?}, the config implies {:?}",
        src.name(),
        src.shape(),
        want
    );
    Ok(())
}

/// Positions `[q0, q1)` of `b` rows of length `l` (one forward pass's tokens).
#[derive(Clone, Copy, Debug)]
pub struct Span {
    pub b: usize,
    pub l: usize,
    pub q0: usize,
    pub q1: usize,
}

impl Span {
    pub fn new(b: usize, l: usize, q0: usize, q1: usize) -> Self {
        Span { b, l, q0, q1 }
    }
}

/// The tokens of one forward pass: `ids` (row-major over the pass's span), the key-padding mask
/// `key_valid` (nonzero = real token; `None` attends to every key) and the flat token indices
/// `rows` whose logits are wanted.
#[derive(Clone, Copy, Debug)]
pub struct Tokens<'a> {
    pub ids: &'a [u32],
    pub key_valid: Option<&'a [u8]>,
    pub rows: &'a [u32],
}

impl<'a> Tokens<'a> {
    pub fn new(ids: &'a [u32], key_valid: Option<&'a [u8]>, rows: &'a [u32]) -> Self {
        Tokens {
            ids,
            key_valid,
            rows,
        }
    }
}

impl<B: Backend> Model<B> {
    /// Load every tensor of reference §2.1 through `get(name)`, check its shape against `cfg`,
    /// and upload it (q|k|v and gate|up merged).
    pub fn load(
        backend: B,
        cfg: ModelConfig,
        get: impl Fn(&str) -> Result<WeightSource>,
    ) -> Result<Self> {
        Self::load_impl(backend, cfg, &get, None)
    }

    /// [`Model::load`] with the linear layers of every block (q|k|v, `attn_out`, gate|up, down)
    /// in FP8: `get_fp8(name)` gives each one ([`crate::quant::fp8_weight`]), uploaded with
    /// [`Backend::load_weight_fp8`]. Embedding, norms and LM head come from `get` as usual.
    pub fn load_fp8(
        backend: B,
        cfg: ModelConfig,
        get: impl Fn(&str) -> Result<WeightSource>,
        get_fp8: impl Fn(&str) -> Result<Fp8Weight>,
    ) -> Result<Self> {
        Self::load_impl(backend, cfg, &get, Some(&get_fp8))
    }

    fn load_impl(
        backend: B,
        cfg: ModelConfig,
        get: &dyn Fn(&str) -> Result<WeightSource>,
        get_fp8: Option<&GetFp8<'_>>,
    ) -> Result<Self> {
        let c = cfg.d_model;
        ensure!(
            cfg.n_heads > 0 && c % cfg.n_heads == 0,
            "config: d_model {c} is not a multiple of n_heads {}",
            cfg.n_heads
        );
        let hd = cfg.head_dim();
        ensure!(hd % 2 == 0, "config: head dim {hd} must be even for RoPE");
        ensure!(
            cfg.n_kv_heads > 0 && cfg.n_heads % cfg.n_kv_heads == 0,
            "config: n_heads {} is not a multiple of n_kv_heads {}",
            cfg.n_heads,
            cfg.n_kv_heads
        );
        let (nh, nkv, f, v) = (
            cfg.n_heads,
            cfg.n_kv_heads,
            cfg.mlp_hidden_size,
            cfg.embedding_size,
        );
        let fetch = |name: &str, shape: &[usize]| -> Result<WeightSource> {
            let s = get(name).with_context(|| format!("loading tensor `{name}`"))?;
            expect_shape(&s, shape)?;
            Ok(s)
        };
        let load = |parts: &[WeightSource]| -> Result<B::Weight> {
            backend.load_weight(parts).with_context(|| {
                format!(
                    "uploading `{}`",
                    parts.iter().map(|p| p.name()).collect::<Vec<_>>().join("|")
                )
            })
        };
        let p = "model.transformer.";
        let wte = load(&[fetch(&format!("{p}wte.weight"), &[v, c])?])?;
        let mut layers = Vec::with_capacity(cfg.n_layers);
        for i in 0..cfg.n_layers {
            let bp = format!("{p}blocks.{i}.");
            let t = |n: &str, shape: &[usize]| fetch(&format!("{bp}{n}.weight"), shape);
            // A linear layer: the parts stacked by rows, FP8 when `get_fp8` is given.
            let lin = |parts: &[(&str, [usize; 2])]| -> Result<B::Weight> {
                let Some(g) = get_fp8 else {
                    let srcs = parts
                        .iter()
                        .map(|(n, s)| t(n, s))
                        .collect::<Result<Vec<_>>>()?;
                    return load(&srcs);
                };
                let mut ws = Vec::with_capacity(parts.len());
                for (n, s) in parts {
                    let name = format!("{bp}{n}.weight");
                    let w = g(&name).with_context(|| format!("loading FP8 tensor `{name}`"))?;
                    ensure!(
                        [w.rows, w.cols] == *s,
                        "tensor `{name}` has shape [{}, {}], the config implies {s:?}",
                        w.rows,
                        w.cols
                    );
                    ws.push(w);
                }
                backend.load_weight_fp8(&ws).with_context(|| {
                    format!(
                        "uploading FP8 `{}`",
                        ws.iter()
                            .map(|w| w.name.as_str())
                            .collect::<Vec<_>>()
                            .join("|")
                    )
                })
            };
            layers.push(Layer {
                attn_norm: load(&[t("attn_norm", &[c])?])?,
                qkv: lin(&[
                    ("q_proj", [nh * hd, c]),
                    ("k_proj", [nkv * hd, c]),
                    ("v_proj", [nkv * hd, c]),
                ])?,
                attn_out: lin(&[("attn_out", [c, nh * hd])])?,
                ff_norm: load(&[t("ff_norm", &[c])?])?,
                gate_up: lin(&[("ff_proj", [f, c]), ("up_proj", [f, c])])?,
                down: lin(&[("ff_out", [c, f])])?,
            });
        }
        let ln_f = load(&[fetch(&format!("{p}ln_f.weight"), &[c])?])?;
        let lm_head = load(&[fetch(&format!("{p}ff_out.weight"), &[v, c])?])?;
        let rope_positions = cfg.max_sequence_length.max(1);
        let (cos, sin) = rope_tables(cfg.rope_theta, hd, rope_positions);
        let mut rope_cos = backend.alloc_f32s(cos.len())?;
        let mut rope_sin = backend.alloc_f32s(sin.len())?;
        backend.write_f32s(&mut rope_cos, &cos)?;
        backend.write_f32s(&mut rope_sin, &sin)?;
        Ok(Model {
            cfg,
            backend,
            wte,
            layers,
            ln_f,
            lm_head,
            rope_cos,
            rope_sin,
            rope_positions,
            id: next_id(),
            fused: std::env::var("LLADA_FUSED").is_ok_and(|v| v == "1"),
        })
    }

    /// Run the fused glue ops (today `rope_kv_store` in cached steps; default
    /// `LLADA_FUSED=1`): bit-identical results, fewer launches. A new id drops captured graphs.
    pub fn set_fused(&mut self, on: bool) {
        self.fused = on;
        self.id = next_id();
    }

    /// Buffers for forward passes of at most `max_tokens` (= B·T) tokens and `max_rows`
    /// LM-head rows.
    pub fn workspace(&self, max_tokens: usize, max_rows: usize) -> Result<Workspace<B>> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let (n, r, c) = (max_tokens, max_rows, cfg.d_model);
        let hd = cfg.head_dim();
        let qkv_w = (cfg.n_heads + 2 * cfg.n_kv_heads) * hd;
        let f = cfg.mlp_hidden_size;
        Ok(Workspace {
            max_tokens: n,
            max_rows: r,
            ids: be.alloc_ints(n)?,
            pos: be.alloc_ints(n)?,
            key_valid: be.alloc_ints(n)?,
            rows: be.alloc_ints(r)?,
            keys: be.alloc_ints(2 * r)?,
            tok: be.alloc_ints(r)?,
            conf: be.alloc_f32s(r)?,
            x: be.alloc_act(n * c)?,
            h: be.alloc_act(n * c)?,
            qkv: be.alloc_act(n * qkv_w)?,
            att: be.alloc_act(n * cfg.n_heads * hd)?,
            d: be.alloc_act(n * c)?,
            gate_up: be.alloc_act(n * 2 * f)?,
            mlp: be.alloc_act(n * f)?,
            xr: be.alloc_act(r * c)?,
            dr: be.alloc_act(r * c)?,
            hr: be.alloc_act(r * c)?,
            logits: be.alloc_act(r * cfg.embedding_size)?,
            h_ids: Vec::with_capacity(n),
            h_pos: Vec::with_capacity(n),
            h_mask: Vec::with_capacity(n),
            h_rows: Vec::with_capacity(r),
            last_rows: 0,
            graphs: GraphCache::new(),
            step: None,
        })
    }

    /// A KV cache for sequences of at most `max_tokens` (= B·L) tokens.
    pub fn kv_cache(&self, max_tokens: usize) -> Result<KvCache<B>> {
        let kw = self.cfg.n_kv_heads * self.cfg.head_dim();
        let mut k = Vec::with_capacity(self.layers.len());
        let mut v = Vec::with_capacity(self.layers.len());
        for _ in &self.layers {
            k.push(self.backend.alloc_act(max_tokens * kw)?);
            v.push(self.backend.alloc_act(max_tokens * kw)?);
        }
        Ok(KvCache {
            max_tokens,
            k,
            v,
            id: next_id(),
        })
    }

    /// Run the model on `x.ids` (`[b, t]` row-major) and leave the logits of the flat token
    /// indices `x.rows` (`b_i·t + pos`) in the workspace (`[R, V]`, see [`Model::logits`]).
    /// `x.key_valid` (`[b·t]`, nonzero = real token) masks padding keys.
    pub fn forward(&self, ws: &mut Workspace<B>, x: Tokens<'_>, b: usize, t: usize) -> Result<()> {
        self.run(ws, None, x, Span::new(b, t, 0, t))
    }

    /// One cached step (Fast-dLLM, reference §7): run the tokens at absolute positions
    /// `[q0, q1)` of each of the `b` rows of length `l` (`x.ids` = those tokens, `[b, q1 − q0]`
    /// row-major), write their K/V into rows `[q0, q1)` of `cache`, and attend over all `l` rows
    /// of the cache. `x.key_valid` is `[b·l]`; `x.rows` are flat indices into the span tokens
    /// (`b_i·(q1 − q0) + (pos − q0)`). With `[q0, q1) = [0, l)` the logits equal
    /// [`Model::forward`]'s bit for bit and the whole cache is (re)filled.
    pub fn forward_span(
        &self,
        ws: &mut Workspace<B>,
        cache: &mut KvCache<B>,
        x: Tokens<'_>,
        span: Span,
    ) -> Result<()> {
        self.check_cache(cache, span)?;
        self.run(ws, Some(cache), x, span)
    }

    /// The checks of a pass over `span` against `cache` ([`Model::forward_span`]): a non-empty
    /// span inside the rows, rows that fit the cache, one cache per layer.
    pub(crate) fn check_cache(&self, cache: &KvCache<B>, span: Span) -> Result<()> {
        let Span { b, l, q0, q1 } = span;
        ensure!(
            q0 < q1 && q1 <= l,
            "forward_span: span [{q0}, {q1}) is empty or exceeds the sequence length {l}"
        );
        ensure!(
            b * l <= cache.max_tokens,
            "forward_span: {b}·{l} tokens exceed the KV cache capacity of {}",
            cache.max_tokens
        );
        ensure!(
            cache.k.len() == self.layers.len(),
            "forward_span: the KV cache has {} layers, the model {}",
            cache.k.len(),
            self.layers.len()
        );
        Ok(())
    }

    /// The forward pass over `span`; without a cache the span must be the whole row.
    fn run(
        &self,
        ws: &mut Workspace<B>,
        cache: Option<&mut KvCache<B>>,
        x: Tokens<'_>,
        span: Span,
    ) -> Result<()> {
        let key = self.upload(ws, cache.as_deref().map_or(0, |c| c.id), x, span)?;
        // The layers: replayed from a graph when this shape has been seen before (the uploads
        // went to the fixed buffers the graph captured), else run eagerly.
        self.run_graphed(ws, cache, key, &|ws, cache| {
            self.layers_pass(ws, cache, key)
        })?;
        // The LM head on the requested rows (eager: its row count changes every step).
        self.head_pass(ws, x.rows.len())?;
        ws.last_rows = x.rows.len();
        Ok(())
    }

    /// The host part of a forward pass over `span`: checks `x` against the workspace and the
    /// model, and writes its ids, positions, key mask and rows into `ws`. Returns the key of the
    /// layers pass that reads them (`cache`: the id of the KV cache it runs against, 0 for none).
    pub(crate) fn upload(
        &self,
        ws: &mut Workspace<B>,
        cache: u64,
        x: Tokens<'_>,
        span: Span,
    ) -> Result<GraphKey> {
        let Tokens {
            ids,
            key_valid,
            rows,
        } = x;
        let Span { b, l, q0, q1 } = span;
        let tq = q1 - q0;
        let n = b * tq;
        ensure!(
            ids.len() == n,
            "forward: `ids` holds {} tokens, expected b·t = {b}·{tq}",
            ids.len()
        );
        ensure!(
            n <= ws.max_tokens,
            "forward: {n} tokens exceed the workspace capacity of {}",
            ws.max_tokens
        );
        ensure!(
            b * l <= ws.max_tokens || key_valid.is_none(),
            "forward: the key mask of {b}·{l} tokens exceeds the workspace capacity of {}",
            ws.max_tokens
        );
        ensure!(
            rows.len() <= ws.max_rows,
            "forward: {} rows exceed the workspace capacity of {}",
            rows.len(),
            ws.max_rows
        );
        ensure!(
            l <= self.rope_positions,
            "forward: sequence length {l} exceeds max_sequence_length {}",
            self.rope_positions
        );
        let v = self.cfg.embedding_size;
        if let Some((i, &id)) = ids.iter().enumerate().find(|(_, &id)| id as usize >= v) {
            bail!("forward: ids[{i}] = {id} is outside the vocabulary of {v}");
        }
        if let Some((i, &r)) = rows.iter().enumerate().find(|(_, &r)| r as usize >= n) {
            bail!("forward: rows[{i}] = {r} is outside the {n} tokens");
        }
        if let Some(kv) = key_valid {
            ensure!(
                kv.len() == b * l,
                "forward: `key_valid` holds {} entries, expected {}",
                kv.len(),
                b * l
            );
        }
        let be = &self.backend;
        let cfg = &self.cfg;

        be.prof_mark(Some(OpClass::Io));
        ws.h_ids.clear();
        ws.h_ids.extend(ids.iter().map(|&i| i as i32));
        be.write_ints(&mut ws.ids, &ws.h_ids)?;
        ws.h_pos.clear();
        for _ in 0..b {
            ws.h_pos.extend(q0 as i32..q1 as i32);
        }
        be.write_ints(&mut ws.pos, &ws.h_pos)?;
        if let Some(kv) = key_valid {
            ws.h_mask.clear();
            ws.h_mask.extend(kv.iter().map(|&m| (m != 0) as i32));
            be.write_ints(&mut ws.key_valid, &ws.h_mask)?;
        }
        ws.h_rows.clear();
        ws.h_rows.extend(rows.iter().map(|&r| r as i32));
        be.write_ints(&mut ws.rows, &ws.h_rows)?;
        let (nh, nkv, hd) = (cfg.n_heads, cfg.n_kv_heads, cfg.head_dim());
        Ok(GraphKey {
            shape: CachedAttnShape {
                b,
                tq,
                l,
                q0,
                nh,
                nkv,
                hd,
            },
            masked: key_valid.is_some(),
            cache,
            step: None,
        })
    }

    /// The LM head on the first `r` rows of `ws.rows` after a layers pass: gather the residual
    /// and branch rows, the final norm, the head GEMM into `ws.logits` (`[r, V]`). Device work
    /// only (a step graph captures it; the caller records `ws.last_rows`, host state a replay
    /// would not update).
    pub(crate) fn head_pass(&self, ws: &mut Workspace<B>, r: usize) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let (c, eps, v) = (cfg.d_model, cfg.rms_norm_eps, cfg.embedding_size);
        let (norm, head) = (Norm::new(r, c, eps), MatMul { n: r, k: c, m: v });
        op(be, OpClass::NormElementwise, c"gather", || {
            let g = Gather::new(&ws.rows, r, c);
            be.gather_rows(&mut ws.xr, &ws.x, g)?;
            if self.layers.is_empty() {
                be.rms_norm(&mut ws.hr, &ws.xr, &self.ln_f, norm)
            } else {
                be.gather_rows(&mut ws.dr, &ws.d, g)?;
                be.add_rms_norm(&mut ws.hr, &mut ws.xr, &ws.dr, &self.ln_f, norm)
            }
        })?;
        op(be, OpClass::LmHead, c"lm_head", || {
            be.matmul(&mut ws.logits, &ws.hr, &self.lm_head, head)
        })?;
        be.prof_mark(None);
        Ok(())
    }

    /// Embedding and every layer over the `B·TQ` tokens of `key.shape` whose ids, positions and
    /// mask are already in `ws`: exactly the launches a graph captures (no host data, no
    /// read-back).
    pub(crate) fn layers_pass(
        &self,
        ws: &mut Workspace<B>,
        mut cache: Option<&mut KvCache<B>>,
        key: GraphKey,
    ) -> Result<()> {
        let be = &self.backend;
        let cfg = &self.cfg;
        let (cshape, masked) = (key.shape, key.masked);
        let shape = cshape.queries();
        let (n, c, f) = (shape.rows(), cfg.d_model, cfg.mlp_hidden_size);
        let (nh, hd) = (shape.nh, shape.hd);
        let norm = Norm::new(n, c, cfg.rms_norm_eps);
        let mm = |k, m| MatMul { n, k, m };
        op(be, OpClass::NormElementwise, c"embedding", || {
            be.embedding(&mut ws.x, &self.wte, Gather { idx: &ws.ids, n, c })
        })?;
        for (i, layer) in self.layers.iter().enumerate() {
            let _layer = nvtx::range(LAYER_NAMES.get(i).copied().unwrap_or(c"layer"));
            op(be, OpClass::NormElementwise, c"attn_norm", || {
                if i == 0 {
                    be.rms_norm(&mut ws.h, &ws.x, &layer.attn_norm, norm)
                } else {
                    be.add_rms_norm(&mut ws.h, &mut ws.x, &ws.d, &layer.attn_norm, norm)
                }
            })?;
            op(be, OpClass::Gemm, c"qkv", || {
                be.matmul(&mut ws.qkv, &ws.h, &layer.qkv, mm(c, shape.qkv_width()))
            })?;
            let t = Rope::new(&ws.pos, &self.rope_cos, &self.rope_sin);
            // RoPE and, in a cached step, the store of the rotated k and v into the cache: one
            // pass with the fused glue (LLADA_FUSED=1, charged to the glue), else the two ops
            // (the store charged to attention).
            match cache.as_deref_mut() {
                Some(kc) if self.fused => {
                    op(be, OpClass::NormElementwise, c"rope_kv_store", || {
                        let kv = Kv::new(&mut kc.k[i], &mut kc.v[i]);
                        be.rope_kv_store(&mut ws.qkv, kv, t, cshape)
                    })?
                }
                Some(kc) => {
                    op(be, OpClass::NormElementwise, c"rope", || {
                        be.rope(&mut ws.qkv, t, shape)
                    })?;
                    op(be, OpClass::Attention, c"kv_store", || {
                        be.kv_store(Kv::new(&mut kc.k[i], &mut kc.v[i]), &ws.qkv, cshape)
                    })?
                }
                None => op(be, OpClass::NormElementwise, c"rope", || {
                    be.rope(&mut ws.qkv, t, shape)
                })?,
            }
            op(be, OpClass::Attention, c"attention", || {
                let mask = masked.then_some(&ws.key_valid);
                match cache.as_deref() {
                    None => be.attention(&mut ws.att, &ws.qkv, mask, shape),
                    Some(kc) => {
                        let kv = Kv::new(&kc.k[i], &kc.v[i]);
                        be.attention_cached(&mut ws.att, &ws.qkv, kv, mask, cshape)
                    }
                }
            })?;
            op(be, OpClass::Gemm, c"attn_out", || {
                be.matmul(&mut ws.d, &ws.att, &layer.attn_out, mm(nh * hd, c))
            })?;
            op(be, OpClass::NormElementwise, c"ff_norm", || {
                be.add_rms_norm(&mut ws.h, &mut ws.x, &ws.d, &layer.ff_norm, norm)
            })?;
            op(be, OpClass::Gemm, c"gate_up", || {
                be.matmul(&mut ws.gate_up, &ws.h, &layer.gate_up, mm(c, 2 * f))
            })?;
            op(be, OpClass::NormElementwise, c"swiglu", || {
                be.swiglu(&mut ws.mlp, &ws.gate_up, Rows { n, c: f })
            })?;
            op(be, OpClass::Gemm, c"down", || {
                be.matmul(&mut ws.d, &ws.mlp, &layer.down, mm(f, c))
            })?;
        }
        Ok(())
    }

    /// The logits `[r, V]` of the first `r` rows of the last forward pass, on the host.
    pub fn logits(&self, ws: &Workspace<B>, r: usize) -> Result<Vec<f32>> {
        ensure!(
            r <= ws.last_rows,
            "logits: asked for {r} rows, the last forward pass computed {}",
            ws.last_rows
        );
        self.backend
            .read_act(&ws.logits, r * self.cfg.embedding_size)
    }
}
