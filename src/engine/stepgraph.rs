//! The whole denoising step on the device, one graph replay per step (`LLADA_STEP_GRAPH=1`):
//! the layers pass, the LM head on the requested rows, the head (`select`, its RNG step read
//! from device memory), the commit selection (`commit_select`, its quotas read from device
//! memory) and the token write (`step_advance`), captured once per launch shape
//! (`StepKey` in [`super::graphs`]) and replayed every step. Plain `generate` runs every step so;
//! Fast-dLLM every call without a KV cache, and with one (prefix, dual) the calls against the
//! cache after each block's full pass.
//!
//! What changes from step to step lives on the device: the pass's tokens (the workspace's
//! `ids`, which each step's commits are written into), the schedule of the block and the step
//! state of [`crate::backend::step`]. The host uploads a block once (`Model::begin_steps`),
//! then only launches; it reads back the masks left when the rule needs them (threshold,
//! factor, a schedule that may run out) and the tokens once per block.

use anyhow::{ensure, Context, Result};

use super::graphs::{GraphKey, StepKey};
use super::model::{KvCache, Model, Workspace};
use super::predict::{BlockPlan, MasksLeft};
use super::stepbufs::StepBufs;
use crate::backend::commit::{check_plan, CommitShape};
use crate::backend::head::{Remasking, SelectParams};
use crate::backend::step::{self, StepShape};
use crate::backend::{Backend, CommitIn, HeadDims, OpClass, SelectIo, StepIn};

/// Whether `LLADA_DEVICE_SELECT=1` asks for the commit selection on the device.
pub fn device_select_env() -> bool {
    std::env::var("LLADA_DEVICE_SELECT").is_ok_and(|v| v == "1")
}

/// Whether `LLADA_STEP_GRAPH=1` asks for whole steps on the device (it implies the commit
/// selection on the device, `LLADA_DEVICE_SELECT=1`).
pub fn step_graph_env() -> bool {
    std::env::var("LLADA_STEP_GRAPH").is_ok_and(|v| v == "1")
}

/// How [`super::Engine::generate`] makes each step's commit selection under the switches in
/// the environment: `step-graph` (whole steps on the device, `LLADA_STEP_GRAPH=1`; with a KV
/// cache every call after a block's full pass, that one with the device selection), `device`
/// (one `commit_select` per step, `LLADA_DEVICE_SELECT=1`) or `host` (the default). The
/// benchmark records it per row.
pub fn selection_mode() -> &'static str {
    match (step_graph_env(), device_select_env()) {
        (true, _) => "step-graph",
        (false, true) => "device",
        (false, false) => "host",
    }
}

/// One block of device steps: everything a step graph bakes in.
#[derive(Clone, Debug)]
pub struct BlockSteps {
    /// The layers pass and the step's scalars.
    key: GraphKey,
    /// LM-head rows (`2R` with CFG).
    head_rows: usize,
    select: SelectParams,
    commit: CommitShape,
    advance: StepShape,
}

impl BlockSteps {
    /// Whether the block's passes run against a KV cache.
    pub(crate) fn cached(&self) -> bool {
        self.key.cache != 0
    }
}

impl<B: Backend> Model<B> {
    /// Prepare a block of device steps after [`Model::upload`] wrote its pass (`layers` is the
    /// key it returned: a full pass, or a span against a KV cache; the requested rows are the
    /// first `plan.seg[b]` of the uploaded rows, the unconditional copies following with CFG):
    /// the RNG keys `keys` `[2R]`, the block's schedule, the plan of its first device step (the
    /// block's call `plan.first`) and the step state (that call's RNG step `select.step`).
    pub(crate) fn begin_steps(
        &self,
        ws: &mut Workspace<B>,
        layers: GraphKey,
        keys: &[i32],
        (plan, select): (&BlockPlan<'_>, &SelectParams),
    ) -> Result<BlockSteps> {
        let be = &self.backend;
        // A pass over `t` tokens per row from position q0 (the whole row without a cache).
        let (nb, t, q0) = (layers.shape.b, layers.shape.tq, layers.shape.q0);
        let cfg = select.cfg_scale > 0.0;
        let b = if cfg { nb / 2 } else { nb };
        let r = keys.len() / 2;
        ensure!(
            plan.seg.len() == b + 1 && plan.seg[b] == r,
            "begin_steps: {} segment offsets ending at {:?} for {b} batch rows of {r} requested rows",
            plan.seg.len(),
            plan.seg.last()
        );
        ensure!(
            plan.steps > 0 && plan.sched.len() == b * plan.steps,
            "begin_steps: a schedule of {} entries for {b} batch rows of {} steps",
            plan.sched.len(),
            plan.steps
        );
        ensure!(
            (layers.cache != 0 || (q0 == 0 && layers.shape.l == t)) && !(cfg && layers.cache != 0),
            "begin_steps: a pass without a KV cache covers whole rows, and CFG takes no cache"
        );
        let (s, e) = (plan.block.start, plan.block.end);
        ensure!(
            q0 <= s && s <= e && e <= q0 + t,
            "begin_steps: the block [{s}, {e}) lies outside the pass's positions [{q0}, {})",
            q0 + t
        );
        if ws.step.is_none() {
            ws.step = Some(StepBufs::new(be, ws.max_tokens, ws.max_rows)?);
        }
        let sb = ws
            .step
            .as_mut()
            .context("begin_steps: step buffers missing")?;
        ensure!(
            b * plan.steps <= sb.sched_len && 2 * b < sb.plan_len,
            "begin_steps: {b} batch rows of {} steps exceed the step buffers",
            plan.steps
        );
        let tables = (plan.seg, plan.sched, plan.steps);
        let h = (&mut sb.h_sched, &mut sb.h_plan);
        step::block_tables(tables, plan.first, h).context("begin_steps")?;
        check_plan("begin_steps", &sb.h_plan, r, b)?;
        // The state counts the block's calls from `first`, its span in the pass's positions.
        let step0 = select.step.wrapping_sub(plan.first as u64);
        sb.h_state = step::initial_state(step0, (s - q0, e - q0))?;
        sb.h_state[step::STATE_STEP] =
            i32::try_from(plan.first).context("begin_steps: the first call exceeds i32")?;
        be.prof_mark(Some(OpClass::Io));
        be.write_ints(&mut sb.sched, &sb.h_sched)?;
        be.write_ints(&mut sb.plan, &sb.h_plan)?;
        be.write_ints(&mut sb.state, &sb.h_state)?;
        be.write_ints(&mut ws.keys, keys)?;
        be.prof_mark(None);
        let commit = CommitShape {
            r,
            b,
            n: nb * t,
            mask_id: plan.mask_id,
            rule: plan.rule,
        };
        let advance = StepShape {
            r,
            b,
            t,
            n: nb * t,
            mirror: if cfg { b * t } else { 0 },
            mask_id: plan.mask_id,
            steps: plan.steps,
        };
        let (mode, param) = plan.rule.mode();
        let opt = |o: Option<u32>| o.map_or(u64::MAX, u64::from);
        let head = [
            select.temperature.to_bits(),
            select.cfg_scale.to_bits(),
            u64::from(select.remasking == Remasking::Random),
            select.seed,
            opt(select.forbid),
            opt(select.conf_suppress[0]),
            opt(select.conf_suppress[1]),
        ];
        let step = StepKey {
            shape: advance,
            rule: (mode, param.to_bits()),
            head,
        };
        Ok(BlockSteps {
            key: GraphKey {
                step: Some(step),
                ..layers
            },
            head_rows: if cfg { 2 * r } else { r },
            select: select.clone(),
            commit,
            advance,
        })
    }

    /// One device step of `blk` (against `cache`, the one its pass was uploaded for, if any):
    /// replayed from its graph once captured ([`Model::run_graphed`]).
    pub(crate) fn device_step(
        &self,
        ws: &mut Workspace<B>,
        cache: Option<&mut KvCache<B>>,
        blk: &BlockSteps,
    ) -> Result<()> {
        ensure!(
            cache.as_ref().map_or(0, |c| c.id) == blk.key.cache,
            "device step: not the KV cache the block was begun with"
        );
        self.run_graphed(ws, cache, blk.key, &|ws, cache| {
            self.step_body(ws, cache, blk)
        })?;
        // Host state outside the graph, so a replay keeps it as an eager run would.
        ws.last_rows = blk.head_rows;
        Ok(())
    }

    /// The launches of one device step (what its graph captures).
    fn step_body(
        &self,
        ws: &mut Workspace<B>,
        cache: Option<&mut KvCache<B>>,
        blk: &BlockSteps,
    ) -> Result<()> {
        let be = &self.backend;
        self.layers_pass(ws, cache, blk.key)?;
        self.head_pass(ws, blk.head_rows)?;
        let sb = ws
            .step
            .as_mut()
            .context("device step: step buffers missing")?;
        be.prof_mark(Some(OpClass::Head));
        let io = SelectIo::new(&mut ws.tok, &mut ws.conf, &mut ws.logits, &ws.keys);
        let dims = HeadDims {
            r: blk.commit.r,
            v: self.cfg.embedding_size,
        };
        be.select(io.at_step(&sb.state), dims, &blk.select)?;
        let c = CommitIn {
            tok: &ws.tok,
            conf: &ws.conf,
            rows: &ws.rows,
            ids: &ws.ids,
            plan: &sb.plan,
        };
        be.commit_select(&mut sb.commit, c, blk.commit)?;
        let c = StepIn {
            commit: &sb.commit,
            rows: &ws.rows,
            sched: &sb.sched,
        };
        be.step_advance((&mut ws.ids, &mut sb.state, &mut sb.plan), c, blk.advance)?;
        be.prof_mark(None);
        Ok(())
    }

    /// The masks left after the last device step (waits for it): one small read-back.
    pub(crate) fn masks_left(&self, ws: &mut Workspace<B>) -> Result<MasksLeft> {
        let sb = ws.step.as_mut().context("masks_left: no block begun")?;
        self.backend.read_ints_into(&sb.state, &mut sb.h_state)?;
        let get = |i: usize| usize::try_from(sb.h_state[i]).context("masks_left: negative count");
        Ok(MasksLeft {
            block: get(step::STATE_LEFT_BLOCK)?,
            rows: get(step::STATE_LEFT_ROWS)?,
        })
    }
}
