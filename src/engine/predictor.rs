//! The model as the sampler and the likelihood code see it: [`ModelPredictor`] (forward pass +
//! fused head, one call per denoising step) and [`ModelScorer`] (masked-token log-probabilities).

use super::model::*;
use crate::backend::commit::CommitShape;
use crate::backend::head::SelectParams;
use crate::backend::{Backend, OpClass};
use crate::engine::sampler::{
    BlockPlan, Commits, MasksLeft, PredictRequest, Predictor, SelectsCommits, SpanPredictor,
    SpanRequest, StepsOnDevice,
};
use crate::engine::stepgraph::{device_select_env, step_graph_env, BlockSteps};
use crate::nvtx;
use anyhow::{bail, ensure, Context, Result};

/// A [`Predictor`] running a [`Model`]: one forward pass per call (the conditional and, with
/// CFG, the unconditional batch together), then the backend's fused head (`select`).
///
/// Rows are laid out as `req.rows` (conditional) followed, with CFG, by the same rows of the
/// unconditional half (batch rows `b..2b`); the key-padding mask is duplicated for that half.
/// `select` may overwrite the logits, so [`Model::logits`] is not meaningful after `predict`.
pub struct ModelPredictor<'m, B: Backend> {
    model: &'m Model<B>,
    ws: Option<Workspace<B>>,
    cache: Option<KvCache<B>>,
    staged: Staged,
    /// Host copies of the head's outputs, grown once.
    tok_host: Vec<i32>,
    conf_host: Vec<f32>,
    /// Host copy of the tokens of device steps ([`StepsOnDevice::read_tokens`]), grown once.
    ids_host: Vec<i32>,
    params: Option<SelectParams>,
    /// Graph setting chosen with [`ModelPredictor::set_graphs`] (None: the default).
    graphs: Option<bool>,
    /// Make the commit selection on the backend ([`ModelPredictor::set_device_select`]).
    device_select: bool,
    /// Run whole steps on the backend ([`ModelPredictor::set_step_graph`]), and the current
    /// block of them.
    step_graph: bool,
    block: Option<(BlockSteps, Span)>,
    /// The commit plan `[2b + 1]` staged on the host, and its backend buffers.
    h_plan: Vec<i32>,
    commit_bufs: Option<CommitBufs<B>>,
}

/// The backend buffers of the commit selection: the plan `[2b + 1]` and the commits `[R]`,
/// allocated on the first step and grown only when a request outgrows them.
struct CommitBufs<B: Backend> {
    plan: B::Ints,
    commit: B::Ints,
    plan_len: usize,
    commit_len: usize,
}

/// A request staged on the host in the backend's layout: the tokens of the pass, its key mask
/// (duplicated with CFG), the flat token index of each requested row and its RNG key pair.
#[derive(Default)]
struct Staged {
    ids: Vec<u32>,
    mask: Vec<u8>,
    rows: Vec<u32>,
    keys: Vec<i32>,
}

impl<'m, B: Backend> ModelPredictor<'m, B> {
    /// The final logits `[R, V]` of the last prediction (CFG-mixed and with the forbidden token
    /// at −∞, as the head saw them), for tests that explain a disagreement between devices.
    pub fn last_logits(&self, r: usize) -> Result<Vec<f32>> {
        let ws = self
            .ws
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("last_logits: no prediction has run yet"))?;
        self.model.logits(ws, r)
    }

    /// A predictor over `model`; the workspace is allocated on the first call and grows only
    /// when a request exceeds it.
    pub fn new(model: &'m Model<B>) -> Self {
        ModelPredictor {
            model,
            ws: None,
            cache: None,
            staged: Staged::default(),
            tok_host: Vec::new(),
            conf_host: Vec::new(),
            ids_host: Vec::new(),
            params: None,
            graphs: None,
            device_select: device_select_env() || step_graph_env(),
            step_graph: step_graph_env(),
            block: None,
            h_plan: Vec::new(),
            commit_bufs: None,
        }
    }

    /// Make each step's commit selection on the backend (`commit_select`) and read back only the
    /// committed tokens, instead of every (token, confidence) pair (default: `LLADA_DEVICE_SELECT=1`).
    /// Results are identical either way.
    pub fn set_device_select(&mut self, on: bool) {
        self.device_select = on;
    }

    /// Run whole denoising steps on the backend, one graph replay each where the backend has
    /// graphs ([`super::stepgraph`]; default `LLADA_STEP_GRAPH=1`): the sampler uploads a block
    /// and reads back only the tokens at its end (and, in Fast-dLLM decoding, the masks left
    /// after each step). Plain `generate` gives identical results either way; Fast-dLLM blocks
    /// ask the head for the block's first-step rows every step, identical on the CPU and on a GPU
    /// only if the head GEMM gives a row the same result at any row count (the GPU parity test
    /// `step_graph_generation_equals_host_select` checks it). Implies [`Self::set_device_select`]
    /// for the passes it does not cover (Fast-dLLM's KV caches).
    pub fn set_step_graph(&mut self, on: bool) {
        self.step_graph = on;
        self.device_select |= on;
    }

    /// Itself as its commit selector while device selection is on.
    fn selector(&mut self) -> Option<&mut dyn SelectsCommits> {
        if self.device_select {
            Some(self)
        } else {
            None
        }
    }

    /// Allocate the workspace up front for `b` batch rows of `t` tokens and `r` requested rows
    /// (CFG doubling included by the caller if wanted).
    pub fn reserve(&mut self, max_tokens: usize, max_rows: usize) -> Result<()> {
        let grow = match &self.ws {
            Some(ws) => ws.max_tokens < max_tokens || ws.max_rows < max_rows,
            None => true,
        };
        if grow {
            let (mt, mr) = match &self.ws {
                Some(ws) => (ws.max_tokens.max(max_tokens), ws.max_rows.max(max_rows)),
                None => (max_tokens, max_rows),
            };
            // Drop the old workspace (and its graphs) before allocating the new one.
            self.ws = None;
            let mut ws = self.model.workspace(mt, mr)?;
            if let Some(on) = self.graphs {
                ws.set_graphs(on);
            }
            self.ws = Some(ws);
        }
        Ok(())
    }

    pub fn model(&self) -> &Model<B> {
        self.model
    }

    /// Replay repeated shapes from graphs (default on unless `LLADA_NO_GRAPHS=1`, see
    /// [`Workspace::set_graphs`]); applies to the current workspace and any later one.
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = Some(on);
        if let Some(ws) = self.ws.as_mut() {
            ws.set_graphs(on);
        }
    }

    /// (graphs captured, graph replays) of the current workspace.
    pub fn graph_stats(&self) -> (usize, usize) {
        self.ws.as_ref().map_or((0, 0), |ws| ws.graph_stats())
    }

    /// Queue the LM-head sampler (`select`) on the first `r` rows of the last forward pass
    /// (keys in `self.staged.keys`); its outputs stay in the workspace's `tok` and `conf`.
    fn run_select(&mut self, r: usize, select: &SelectParams) -> Result<()> {
        let model = self.model;
        let ws = reserved(&mut self.ws, "predict")?;
        // The head rounds to the model's compute dtype whatever the caller set.
        let dtype = model.backend.compute_dtype();
        let p: &SelectParams = if select.dtype == dtype {
            select
        } else {
            let p = self.params.get_or_insert_with(|| select.clone());
            p.clone_from(select);
            p.dtype = dtype;
            p
        };
        let be = &model.backend;
        be.prof_mark(Some(OpClass::Head));
        let _r = nvtx::range(c"select");
        be.write_ints(&mut ws.keys, &self.staged.keys)?;
        let io = crate::backend::SelectIo::new(&mut ws.tok, &mut ws.conf, &mut ws.logits, &ws.keys);
        let v = model.cfg.embedding_size;
        be.select(io, crate::backend::HeadDims { r, v }, p)?;
        Ok(())
    }

    /// Run the LM-head sampler on the first `r` rows of the last forward pass (keys in
    /// `self.staged.keys`) and copy the results to `out`.
    fn select_into(
        &mut self,
        r: usize,
        select: &SelectParams,
        out: &mut [(u32, f32)],
    ) -> Result<()> {
        self.run_select(r, select)?;
        let be = &self.model.backend;
        let ws = self
            .ws
            .as_ref()
            .context("predict: workspace missing after reserve")?;
        // Host scratch grown once (no allocation per step).
        if self.tok_host.len() < r {
            self.tok_host.resize(r, 0);
            self.conf_host.resize(r, 0.0);
        }
        be.read_ints_into(&ws.tok, &mut self.tok_host[..r])?;
        be.read_f32s_into(&ws.conf, &mut self.conf_host[..r])?;
        be.prof_mark(None);
        for (o, (&tk, &cf)) in out
            .iter_mut()
            .zip(self.tok_host.iter().zip(&self.conf_host))
        {
            *o = (tk as u32, cf);
        }
        Ok(())
    }

    /// The head, then the commit selection on the backend for the requested `rows` (batch row,
    /// position; sorted) of a pass over `n` tokens in `b` batch rows; `out[i]` = the committed
    /// token of `rows[i]` or −1. Reads back only `out`.
    fn commit_into(
        &mut self,
        (rows, b, n): (&[(u32, u32)], usize, usize),
        select: &SelectParams,
        plan: &mut Commits<'_>,
    ) -> Result<()> {
        let r = rows.len();
        let out = &mut *plan.out;
        ensure!(
            out.len() == r && plan.quota.len() == b,
            "predict_commit: {} outputs and {} quotas for {r} rows of {b} batch rows",
            out.len(),
            plan.quota.len()
        );
        check_segments("predict_commit", rows, plan.seg, b)?;
        self.h_plan.clear();
        self.h_plan.extend(plan.seg.iter().map(|&o| o as i32));
        for &q in plan.quota {
            self.h_plan
                .push(i32::try_from(q.min(r)).context("predict_commit: quota overflows")?);
        }
        self.run_select(r, select)?;
        let be = &self.model.backend;
        if self
            .commit_bufs
            .as_ref()
            .map_or(true, |c| c.plan_len < self.h_plan.len() || c.commit_len < r)
        {
            let (pl, cl) = match &self.commit_bufs {
                Some(c) => (c.plan_len.max(self.h_plan.len()), c.commit_len.max(r)),
                None => (self.h_plan.len(), r),
            };
            self.commit_bufs = Some(CommitBufs {
                plan: be.alloc_ints(pl)?,
                commit: be.alloc_ints(cl.max(1))?,
                plan_len: pl,
                commit_len: cl,
            });
        }
        let bufs = self
            .commit_bufs
            .as_mut()
            .context("predict_commit: buffers missing after allocation")?;
        let ws = self
            .ws
            .as_ref()
            .context("predict_commit: workspace missing after reserve")?;
        let shape = CommitShape {
            r,
            b,
            n,
            mask_id: plan.mask_id,
            rule: plan.rule,
        };
        be.write_ints(&mut bufs.plan, &self.h_plan)?;
        let c = crate::backend::CommitIn {
            tok: &ws.tok,
            conf: &ws.conf,
            rows: &ws.rows,
            ids: &ws.ids,
            plan: &bufs.plan,
        };
        be.commit_select(&mut bufs.commit, c, shape)?;
        be.read_ints_into(&bufs.commit, out)?;
        be.prof_mark(None);
        Ok(())
    }
}

impl<B: Backend> ModelPredictor<'_, B> {
    /// The forward pass of a span request (everything before the head); returns the number of
    /// tokens in the pass. The cache and workspace are sized for `b·t` tokens on the first call
    /// (or when a request outgrows them); later calls allocate nothing on the device.
    fn span_forward(&mut self, req: &SpanRequest<'_>, outs: usize) -> Result<usize> {
        let span = self.stage_span(req, outs)?;
        let model = self.model;
        let ws = reserved(&mut self.ws, "predict_span")?;
        let cache = self
            .cache
            .as_mut()
            .context("predict_span: KV cache missing after reserve")?;
        let x = Tokens::new(&self.staged.ids, req.key_valid, &self.staged.rows);
        model.forward_span(ws, cache, x, span)?;
        Ok(span.b * (span.q1 - span.q0))
    }

    /// Stage a span request in the backend's layout (`self.staged`) and size the workspace and
    /// the KV cache for it; returns its span.
    fn stage_span(&mut self, req: &SpanRequest<'_>, outs: usize) -> Result<Span> {
        let (b, t, q0, q1) = (req.b, req.t, req.q0, req.q1);
        let n = b * t;
        let r = req.rows.len();
        check_request("predict_span", outs, r, req.x.len(), (b, t))?;
        ensure!(
            q0 < q1 && q1 <= t,
            "predict_span: span [{q0}, {q1}) is empty or exceeds the row length {t}"
        );
        ensure!(
            req.select.cfg_scale <= 0.0,
            "predict_span: classifier-free guidance is not supported with a KV cache"
        );
        self.reserve(n, n)?;
        if self.cache.as_ref().map_or(true, |c| c.max_tokens < n) {
            self.cache = None;
            self.cache = Some(self.model.kv_cache(n)?);
        }
        let tq = q1 - q0;
        self.staged.ids.clear();
        for row in req.x.chunks_exact(t) {
            self.staged.ids.extend_from_slice(&row[q0..q1]);
        }
        self.staged.rows.clear();
        self.staged.keys.clear();
        for (i, &(br, pos)) in req.rows.iter().enumerate() {
            ensure!(
                (br as usize) < b && (q0..q1).contains(&(pos as usize)),
                "predict_span: rows[{i}] = ({br}, {pos}) is outside the batch [{b}] × span [{q0}, {q1})"
            );
            self.staged.rows.push(br * tq as u32 + (pos - q0 as u32));
            let (kr, kp) = req.rng_key(br, pos)?;
            self.staged.keys.push(kr as i32);
            self.staged.keys.push(kp as i32);
        }
        if let Some(kv) = req.key_valid {
            ensure!(
                kv.len() == n,
                "predict_span: `key_valid` holds {} entries, expected {n}",
                kv.len()
            );
        }
        Ok(Span::new(b, t, q0, q1))
    }

    /// The forward pass of a full request (everything before the head); returns the number of
    /// tokens in the pass (doubled with CFG).
    fn full_forward(&mut self, req: &PredictRequest<'_>, outs: usize) -> Result<usize> {
        let (tokens, span) = self.stage_full(req, outs)?;
        let ws = reserved(&mut self.ws, "predict")?;
        let mask = req.key_valid.map(|_| self.staged.mask.as_slice());
        let x = Tokens::new(&self.staged.ids, mask, &self.staged.rows);
        self.model.forward(ws, x, span.b, span.l)?;
        Ok(tokens)
    }

    /// Stage a full request in the backend's layout (`self.staged`) and size the workspace for
    /// it; returns the number of tokens in the pass (doubled with CFG) and its span.
    fn stage_full(&mut self, req: &PredictRequest<'_>, outs: usize) -> Result<(usize, Span)> {
        let (b, t) = (req.b, req.t);
        let n = b * t;
        let r = req.rows.len();
        check_request("predict", outs, r, req.x.len(), (b, t))?;
        let cfg = req.select.cfg_scale > 0.0;
        let nb = if cfg { 2 * b } else { b };
        let rr = if cfg { 2 * r } else { r };
        self.reserve(nb * t, rr)?;

        stage_tokens(&mut self.staged.ids, "predict", req.x, req.uncond_x, cfg)?;
        self.staged.mask.clear();
        if let Some(kv) = req.key_valid {
            ensure!(
                kv.len() == n,
                "predict: `key_valid` holds {} entries, expected {n}",
                kv.len()
            );
            self.staged.mask.extend_from_slice(kv);
            if cfg {
                self.staged.mask.extend_from_slice(kv);
            }
        }
        self.staged.rows.clear();
        self.staged.keys.clear();
        for (i, &(br, pos)) in req.rows.iter().enumerate() {
            ensure!(
                (br as usize) < b && (pos as usize) < t,
                "predict: rows[{i}] = ({br}, {pos}) is outside the batch [{b}, {t}]"
            );
            self.staged.rows.push(br * t as u32 + pos);
            let (kr, kp) = req.rng_key(br, pos)?;
            self.staged.keys.push(kr as i32);
            self.staged.keys.push(kp as i32);
        }
        if cfg {
            for &(br, pos) in req.rows {
                self.staged.rows.push((b as u32 + br) * t as u32 + pos);
            }
        }
        Ok((nb * t, Span::new(nb, t, 0, t)))
    }
}

/// Whole steps on the backend ([`super::stepgraph`]): a block's request staged and uploaded
/// once, then one `Model::device_step` per step.
impl<B: Backend> StepsOnDevice for ModelPredictor<'_, B> {
    fn begin_block(&mut self, req: &PredictRequest<'_>, plan: &BlockPlan<'_>) -> Result<()> {
        self.block = None;
        check_segments("begin_block", req.rows, plan.seg, req.b)?;
        let (_, span) = self.stage_full(req, req.rows.len())?;
        self.begin_steps(req.key_valid.is_some(), span, (req.select, plan), false)
    }

    fn begin_span_block(&mut self, req: &SpanRequest<'_>, plan: &BlockPlan<'_>) -> Result<()> {
        self.block = None;
        check_segments("begin_span_block", req.rows, plan.seg, req.b)?;
        let span = self.stage_span(req, req.rows.len())?;
        self.staged.mask.clear();
        self.staged
            .mask
            .extend_from_slice(req.key_valid.unwrap_or_default());
        self.begin_steps(req.key_valid.is_some(), span, (req.select, plan), true)
    }

    fn step(&mut self, count: bool) -> Result<Option<MasksLeft>> {
        let _step = nvtx::range(c"step");
        let model = self.model;
        let ws = reserved(&mut self.ws, "step")?;
        let (blk, _) = self.block.as_ref().context("step: no block was begun")?;
        let cache = self.cache.as_mut().filter(|_| blk.cached());
        model.device_step(ws, cache, blk)?;
        count.then(|| model.masks_left(ws)).transpose()
    }

    fn read_tokens(&mut self, x: &mut [u32]) -> Result<()> {
        let ws = reserved(&mut self.ws, "read_tokens")?;
        let (_, span) = self
            .block
            .as_ref()
            .context("read_tokens: no block was begun")?;
        let Span { b, l, q0, q1 } = *span;
        let tq = q1 - q0;
        ensure!(
            x.len() == b * l,
            "read_tokens: {} tokens for {b} rows of {l}",
            x.len()
        );
        // The device holds the pass's tokens: each row's [q0, q1) (whole rows without a cache).
        self.ids_host.resize(self.ids_host.len().max(b * tq), 0);
        let h = &mut self.ids_host[..b * tq];
        self.model.backend.read_ints_into(&ws.ids, h)?;
        for (row, span) in x.chunks_exact_mut(l).zip(h.chunks_exact(tq)) {
            for (o, &v) in row[q0..q1].iter_mut().zip(span) {
                *o = v as u32;
            }
        }
        Ok(())
    }
}

impl<B: Backend> ModelPredictor<'_, B> {
    /// Upload the staged pass over `span` (with the staged key mask when `masked`; against the
    /// KV cache when `cached`) and begin a block of device steps on it.
    fn begin_steps(
        &mut self,
        masked: bool,
        span: Span,
        (select, plan): (&SelectParams, &BlockPlan<'_>),
        cached: bool,
    ) -> Result<()> {
        let model = self.model;
        let ws = reserved(&mut self.ws, "begin_block")?;
        let mask = masked.then_some(self.staged.mask.as_slice());
        let x = Tokens::new(&self.staged.ids, mask, &self.staged.rows);
        let cache_id = match &self.cache {
            Some(c) if cached => {
                model.check_cache(c, span)?;
                c.id
            }
            None if cached => bail!("begin_span_block: no KV cache"),
            _ => 0,
        };
        let layers = model.upload(ws, cache_id, x, span)?;
        // The head rounds to the model's compute dtype whatever the caller set.
        let select = SelectParams {
            dtype: model.backend.compute_dtype(),
            ..select.clone()
        };
        let keys = &self.staged.keys;
        let blk = model.begin_steps(ws, layers, keys, (plan, &select))?;
        // read_tokens reads the conditional rows back (CFG doubles the pass's batch rows).
        let rows = if select.cfg_scale > 0.0 {
            span.b / 2
        } else {
            span.b
        };
        self.block = Some((blk, Span { b: rows, ..span }));
        Ok(())
    }
}

/// Checks that `seg` (`[b + 1]`) splits the requested `rows` into their batch rows, each sorted
/// by position: the backend ranks a row's candidates by their index, which equals the position
/// order only then. Errors name `op` and the first pair out of place.
fn check_segments(op: &str, rows: &[(u32, u32)], seg: &[usize], b: usize) -> Result<()> {
    ensure!(
        seg.len() == b + 1 && seg[0] == 0 && seg[b] == rows.len(),
        "{op}: {} segment offsets {:?}… for {b} batch rows of {} rows",
        seg.len(),
        seg.first(),
        rows.len()
    );
    for br in 0..b {
        ensure!(
            seg[br] <= seg[br + 1],
            "{op}: segment offsets seg[{br}..={}] decrease",
            br + 1
        );
        let own = &rows[seg[br]..seg[br + 1]];
        if let Some(i) =
            (0..own.len()).find(|&i| own[i].0 != br as u32 || (i > 0 && own[i - 1].1 >= own[i].1))
        {
            bail!(
                "{op}: rows[{}] = {:?} is out of place in batch row {br}'s segment (rows must be sorted by batch row, then position)",
                seg[br] + i,
                own[i]
            );
        }
    }
    Ok(())
}

/// The workspace `reserve` made, or an error naming `op`.
fn reserved<'w, B: Backend>(
    ws: &'w mut Option<Workspace<B>>,
    op: &str,
) -> Result<&'w mut Workspace<B>> {
    ws.as_mut()
        .with_context(|| format!("{op}: workspace missing after reserve"))
}

/// One predictor trait on [`ModelPredictor`]: `$forward` runs the network, then the head
/// selects on the host; with device selection on, the model is its own commit selector.
macro_rules! model_predictor {
    ($trait:ident, $req:ident, $predict:ident, $forward:ident) => {
        impl<B: Backend> $trait for ModelPredictor<'_, B> {
            fn $predict(&mut self, req: &$req<'_>, out: &mut [(u32, f32)]) -> Result<()> {
                let _step = nvtx::range(c"step");
                self.$forward(req, out.len())?;
                self.select_into(req.rows.len(), req.select, out)
            }

            fn commit_selector(&mut self) -> Option<&mut dyn SelectsCommits> {
                self.selector()
            }

            fn steps_on_device(&mut self) -> Option<&mut dyn StepsOnDevice> {
                if self.step_graph {
                    Some(self)
                } else {
                    None
                }
            }
        }
    };
}
model_predictor!(SpanPredictor, SpanRequest, predict_span, span_forward);
model_predictor!(Predictor, PredictRequest, predict, full_forward);

/// The commit selection on the backend (`Backend::commit_select`) after the forward pass.
impl<B: Backend> SelectsCommits for ModelPredictor<'_, B> {
    fn predict_commit(&mut self, req: &PredictRequest<'_>, c: &mut Commits<'_>) -> Result<()> {
        let _step = nvtx::range(c"step");
        let n = self.full_forward(req, c.out.len())?;
        self.commit_into((req.rows, req.b, n), req.select, c)
    }

    fn predict_span_commit(&mut self, req: &SpanRequest<'_>, c: &mut Commits<'_>) -> Result<()> {
        let _step = nvtx::range(c"step");
        let n = self.span_forward(req, c.out.len())?;
        self.commit_into((req.rows, req.b, n), req.select, c)
    }
}

/// A [`crate::engine::predictor::Scorer`] running a [`Model`]: one forward pass per call over the noisy
/// batch (and, with CFG, the unconditional batch as rows `b..2b`), the LM head on the scored
/// rows only, then the backend's `log_prob` at the targets.
pub struct ModelScorer<'m, B: Backend> {
    model: &'m Model<B>,
    ws: Option<Workspace<B>>,
    ids: Vec<u32>,
    rows: Vec<u32>,
    targets: Vec<i32>,
}

impl<'m, B: Backend> ModelScorer<'m, B> {
    pub fn new(model: &'m Model<B>) -> Self {
        ModelScorer {
            model,
            ws: None,
            ids: Vec::new(),
            rows: Vec::new(),
            targets: Vec::new(),
        }
    }

    fn grow(&mut self, max_tokens: usize, max_rows: usize) -> Result<()> {
        let (mt, mr) = match &self.ws {
            Some(ws) if ws.max_tokens >= max_tokens && ws.max_rows >= max_rows => return Ok(()),
            Some(ws) => (ws.max_tokens.max(max_tokens), ws.max_rows.max(max_rows)),
            None => (max_tokens, max_rows),
        };
        self.ws = Some(self.model.workspace(mt, mr)?);
        self.ids.reserve(mt);
        self.rows.reserve(mr);
        self.targets.reserve(mr);
        Ok(())
    }
}

impl<B: Backend> crate::engine::predictor::Scorer for ModelScorer<'_, B> {
    fn reserve(&mut self, max_tokens: usize, max_rows: usize, cfg: bool) -> Result<()> {
        let k = if cfg { 2 } else { 1 };
        self.grow(k * max_tokens, k * max_rows)
    }

    fn mask_id(&self) -> u32 {
        self.model.cfg.mask_token_id
    }

    fn max_len(&self) -> usize {
        self.model.cfg.max_sequence_length
    }

    fn score(
        &mut self,
        req: &crate::engine::predictor::ScoreRequest<'_>,
        out: &mut [f32],
    ) -> Result<()> {
        let (b, t) = (req.b, req.t);
        let n = b * t;
        let r = req.rows.len();
        let v = self.model.cfg.embedding_size;
        ensure!(
            req.x.len() == n,
            "score: `x` holds {} tokens, expected b·t = {b}·{t}",
            req.x.len()
        );
        ensure!(
            req.targets.len() == r && out.len() == r,
            "score: {} rows, {} targets and {} outputs differ",
            r,
            req.targets.len(),
            out.len()
        );
        if let Some((i, tg)) = first_at_or_above(req.targets, v) {
            bail!("score: targets[{i}] = {tg} is outside the vocabulary of {v}");
        }
        if let Some((i, rw)) = first_at_or_above(req.rows, n) {
            bail!("score: rows[{i}] = {rw} is outside the {n} tokens");
        }
        if r == 0 {
            return Ok(());
        }
        let cfg = req.cfg_scale > 0.0;
        let (nb, rr) = if cfg { (2 * b, 2 * r) } else { (b, r) };
        self.grow(nb * t, rr)?;
        stage_tokens(&mut self.ids, "score", req.x, req.uncond_x, cfg)?;
        self.rows.clear();
        self.rows.extend_from_slice(req.rows);
        if cfg {
            self.rows.extend(req.rows.iter().map(|&rw| rw + n as u32));
        }
        self.targets.clear();
        self.targets.extend(req.targets.iter().map(|&tg| tg as i32));
        let model = self.model;
        let ws = reserved(&mut self.ws, "score")?;
        model.forward(ws, Tokens::new(&self.ids, None, &self.rows), nb, t)?;
        let be = &model.backend;
        // `tok` [R] and `conf` [R] are free here: targets in, log-probabilities out.
        be.write_ints(&mut ws.tok, &self.targets)?;
        let s = crate::backend::LogProb::new(r, v, req.cfg_scale);
        be.log_prob(&mut ws.conf, &ws.logits, &ws.tok, s)?;
        let lp = be.read_f32s(&ws.conf, r)?;
        out.copy_from_slice(&lp);
        Ok(())
    }
}

/// The checks every prediction request starts with: one output per row, `b·t` tokens.
fn check_request(
    op: &str,
    out: usize,
    rows: usize,
    x: usize,
    (b, t): (usize, usize),
) -> Result<()> {
    ensure!(
        out == rows,
        "{op}: `out` holds {out} entries for {rows} rows"
    );
    ensure!(
        x == b * t,
        "{op}: `x` holds {x} tokens, expected b·t = {b}·{t}"
    );
    Ok(())
}

/// Stages a request's tokens `x` in `ids`, followed with CFG by its unconditional tokens
/// (which must be there, as many as `x`); `op` names the caller in errors.
fn stage_tokens(
    ids: &mut Vec<u32>,
    op: &str,
    x: &[u32],
    uncond_x: Option<&[u32]>,
    cfg: bool,
) -> Result<()> {
    ids.clear();
    ids.extend_from_slice(x);
    if cfg {
        let un = uncond_x.with_context(|| {
            format!("{op}: cfg_scale > 0 but the request has no unconditional tokens")
        })?;
        ensure!(
            un.len() == x.len(),
            "{op}: `uncond_x` holds {} tokens, expected {}",
            un.len(),
            x.len()
        );
        ids.extend_from_slice(un);
    }
    Ok(())
}

/// One batch of noisy sequences whose masked positions are to be scored.
pub struct ScoreRequest<'a> {
    /// Batch rows.
    pub b: usize,
    /// Tokens per row.
    pub t: usize,
    /// Noisy tokens `[b, t]`.
    pub x: &'a [u32],
    /// With `cfg_scale > 0`: the unconditional tokens `[b, t]` (prompt masked too).
    pub uncond_x: Option<&'a [u32]>,
    pub cfg_scale: f64,
    /// Flat token indices `b_i·t + pos` to score `[R]`.
    pub rows: &'a [u32],
    /// The token whose log-probability is wanted at each row `[R]`.
    pub targets: &'a [u32],
}

/// Scores masked positions: the model ([`crate::engine::predictor::ModelScorer`]) or a fake in tests.
pub trait Scorer {
    /// `out[i] = log p(targets[i] | x)` at `rows[i]` (CFG-mixed when `cfg_scale > 0`).
    fn score(&mut self, req: &ScoreRequest<'_>, out: &mut [f32]) -> Result<()>;
    /// Size buffers for at most `max_tokens` (= b·t, CFG doubling not included) tokens and
    /// `max_rows` scored rows, so the Monte-Carlo loop allocates nothing.
    fn reserve(&mut self, _max_tokens: usize, _max_rows: usize, _cfg: bool) -> Result<()> {
        Ok(())
    }
    /// The mask token id of the model.
    fn mask_id(&self) -> u32;
    /// Longest sequence the model accepts.
    fn max_len(&self) -> usize {
        usize::MAX
    }
}

/// The first index and value of `v` that is `≥ bound`.
fn first_at_or_above(v: &[u32], bound: usize) -> Option<(usize, u32)> {
    v.iter()
        .enumerate()
        .find(|(_, &x)| x as usize >= bound)
        .map(|(i, &x)| (i, x))
}
