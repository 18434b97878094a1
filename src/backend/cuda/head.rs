//! The LM head's selection and scoring ops: `select` (`kernels/head_select.cu`), `log_prob`
//! (`kernels/log_prob.cu`), the top-k / threshold selection kernels and the step's commit
//! selection `commit_select` (`kernels/topk.cu`).

use super::*;
use crate::backend::commit::check_plan;
use crate::backend::step::STATE_LEN;

/// Threads per block of `head_select` (ABI: block 1024).
pub(crate) const HEAD_THREADS: u32 = 1024;

/// Threads per block of the top-k kernels.
pub(crate) const TOPK_THREADS: u32 = 1024;

/// Threads per block of `step_advance_i32` (one block).
pub(crate) const STEP_THREADS: u32 = 1024;

/// Threads per block of `log_prob_bf16`.
pub(crate) const LOG_PROB_THREADS: u32 = 1024;

impl CudaBackend {
    /// Per row, the `k[row]` best columns of `conf` `[N, C]` (`s`: `N` rows of `C` columns;
    /// confidence descending, ties to the lowest column, NaN = −∞) written in order into `sel`
    /// `[N, C]`, the rest -1.
    pub fn topk_select(&self, sel: &mut Ints, conf: &F32s, k: &Ints, s: Rows) -> Result<()> {
        let op = "topk_select";
        self.select_rows(
            op,
            (sel, conf),
            s,
            &[("k", k.len(), s.n)],
            |f, g, sel, conf| {
                launch!(&self.stream, op, f.topk_select, g; sel, conf, self.ptr(k),
                int(op, "nrows", s.n)?, int(op, "ncols", s.c)?)
            },
        )
    }

    /// Per row, the best column plus every column with `conf ≥ threshold`, in the order of
    /// [`CudaBackend::topk_select`], the rest of the row -1.
    pub fn threshold_select(
        &self,
        sel: &mut Ints,
        conf: &F32s,
        threshold: f32,
        s: Rows,
    ) -> Result<()> {
        let op = "threshold_select";
        self.select_rows(op, (sel, conf), s, &[], |f, g, sel, conf| {
            launch!(&self.stream, op, f.threshold_select, g; sel, conf, threshold,
                int(op, "nrows", s.n)?, int(op, "ncols", s.c)?)
        })
    }

    /// The checks of the row selections (`sel`, `conf` `[N, C]`, then `more` lengths), then
    /// `launch` with the kernels, one block of [`TOPK_THREADS`] per row and the two buffers'
    /// addresses.
    fn select_rows(
        &self,
        op: &str,
        (sel, conf): (&mut Ints, &F32s),
        s: Rows,
        more: &[(&str, usize, usize)],
        launch: impl FnOnce(&Kernels, Geom, u64, u64) -> Result<()>,
    ) -> Result<()> {
        let numel = s.n * s.c;
        check_lens(
            op,
            &[("sel", sel.len(), numel), ("conf", conf.len(), numel)],
        )?;
        check_lens(op, more)?;
        if numel == 0 {
            return Ok(());
        }
        launch(
            &self.k,
            rows_geom(s.n, TOPK_THREADS),
            self.ptr_mut(sel),
            self.ptr(conf),
        )
    }

    /// Launcher of `commit_select_f32` (`kernels/topk.cu`, [`Backend::commit_select`]).
    pub(crate) fn launch_commit_select(
        &self,
        commit: &mut Ints,
        c: CommitIn<'_, Self>,
        s: CommitShape,
    ) -> Result<()> {
        let (op, CommitShape { r, b, n, .. }) = ("commit_select", s);
        let CommitIn {
            tok,
            conf,
            rows,
            ids,
            plan,
        } = c;
        check_lens(
            op,
            &[
                ("commit", commit.len(), r),
                ("tok", tok.len(), r),
                ("conf", conf.len(), r),
            ],
        )?;
        check_lens(
            op,
            &[
                ("rows", rows.len(), r),
                ("ids", ids.len(), n),
                ("plan", plan.len(), 2 * b + 1),
            ],
        )?;
        check_ints(op, "rows", rows, r, n, "the pass's tokens")?;
        // The plan is written by the host: its values are checked like the CPU backend checks it.
        if let Some(vals) = plan.host() {
            if vals.len() > 2 * b {
                check_plan(op, &vals[..2 * b + 1], r, b)?;
            }
        }
        let (mode, param) = s.rule.mode();
        if !param.is_finite() {
            bail!("{op}: the rule's parameter {param} is not finite");
        }
        if b == 0 || r == 0 {
            return Ok(());
        }
        let (r_, b_) = (int(op, "r", r)?, int(op, "b", b)?);
        int(op, "n", n)?;
        let mask = int(op, "mask_id", s.mask_id as usize)?;
        launch!(&self.stream, op, self.k.commit_select, rows_geom(b, TOPK_THREADS);
            self.ptr_mut(commit), self.ptr(tok), self.ptr(conf), self.ptr(rows), self.ptr(ids),
            self.ptr(plan), r_, b_, mask, mode, param)
    }

    /// Launcher of `kernels/log_prob.cu` ([`Backend::log_prob`]).
    pub(crate) fn launch_log_prob(
        &self,
        out: &mut F32s,
        (logits, targets): (&Act, &Ints),
        s: LogProb,
    ) -> Result<()> {
        let (op, LogProb { r, v, cfg_scale }) = ("log_prob", s);
        if !(cfg_scale.is_finite() && cfg_scale >= 0.0) {
            bail!("{op}: cfg_scale must be finite and >= 0, got {cfg_scale}");
        }
        let lrows = s.logit_rows();
        check_lens(
            op,
            &[
                ("out", out.len(), r),
                ("logits", logits.len(), lrows * v),
                ("targets", targets.len(), r),
            ],
        )?;
        // The kernel offsets logit rows (up to 2·r with CFG) in 64 bits: only r, v are ints.
        int(op, "rows", lrows)?;
        check_ints(op, "targets", targets, r, v, "the vocabulary")?;
        if r == 0 {
            return Ok(());
        }
        let f = self.kernel_fn("log_prob_bf16")?;
        launch!(&self.stream, op, f, rows_geom(r, LOG_PROB_THREADS); self.ptr_mut(out),
            self.ptr(logits), self.ptr(targets), int(op, "r", r)?, int(op, "v", v)?, cfg_scale)
    }

    /// Launcher of `kernels/head_select.cu` ([`Backend::select`]).
    pub(crate) fn launch_select(
        &self,
        io: SelectIo<'_, Self>,
        s: HeadDims,
        p: &SelectParams,
    ) -> Result<()> {
        let (op, HeadDims { r, v }) = ("select", s);
        let (tok, conf, logits, keys) = (io.tok, io.conf, io.logits, io.keys);
        if p.dtype != DType::BF16 {
            bail!(
                "{op}: SelectParams.dtype is {} but the CUDA backend computes in bf16",
                p.dtype
            );
        }
        let lrows = s.logit_rows(p.cfg_scale);
        check_lens(op, &[("tok", tok.len(), r), ("conf", conf.len(), r)])?;
        check_lens(
            op,
            &[
                ("logits", logits.len(), lrows * v),
                ("keys", keys.len(), 2 * r),
            ],
        )?;
        // The kernel offsets logit rows in 64 bits; it indexes `keys` at 2·row in int.
        int(op, "2·r", 2 * r)?;
        if r == 0 {
            return Ok(());
        }
        let opt = |o: Option<u32>, what: &str| -> Result<i32> {
            match o {
                None => Ok(-1),
                Some(t) if (t as usize) < v => Ok(t as i32),
                Some(t) => bail!("{op}: {what} token {t} is outside the vocabulary (V = {v})"),
            }
        };
        let forbid = opt(p.forbid, "forbidden")?;
        let sup0 = opt(p.conf_suppress[0], "suppressed")?;
        let sup1 = opt(p.conf_suppress[1], "suppressed")?;
        let (tp, cp, lp, kp) = (
            self.ptr_mut(tok),
            self.ptr_mut(conf),
            self.ptr_mut(logits),
            self.ptr(keys),
        );
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        let (temperature, cfg_scale) = (p.temperature, p.cfg_scale);
        let remasking: i32 = match p.remasking {
            Remasking::LowConfidence => 0,
            Remasking::Random => 1,
        };
        let (seed, step) = (p.seed, p.step);
        let g = rows_geom(r, HEAD_THREADS);
        match io.step {
            None => launch!(&self.stream, op, self.k.head_select, g; tp, cp, lp, kp, r_, v_,
                temperature, cfg_scale, remasking, seed, step, forbid, sup0, sup1),
            Some(st) => {
                check_len(op, "state", st.len(), STATE_LEN)?;
                launch!(&self.stream, op, self.k.head_select_step, g; tp, cp, lp, kp,
                    self.ptr(st), r_, v_, temperature, cfg_scale, remasking, seed, forbid, sup0,
                    sup1)
            }
        }
    }

    /// Launcher of `kernels/step_advance.cu` ([`Backend::step_advance`]).
    pub(crate) fn launch_step_advance(
        &self,
        (ids, state, plan): (&mut Ints, &mut Ints, &mut Ints),
        c: StepIn<'_, Self>,
        s: StepShape,
    ) -> Result<()> {
        let op = "step_advance";
        let StepIn {
            commit,
            rows,
            sched,
        } = c;
        check_lens(op, &[("rows", rows.len(), s.r)])?;
        let known_rows = rows.host().filter(|h| h.len() >= s.r).unwrap_or_default();
        crate::backend::step::check(
            op,
            (ids.len(), state.len(), plan.len()),
            (commit.len(), known_rows, sched.len()),
            s,
        )?;
        // Always launched, even without rows: the step counter advances every step.
        let i = |arg, v| int(op, arg, v);
        let (r, b, t) = (i("r", s.r)?, i("b", s.b)?, i("t", s.t)?);
        let (mirror, steps) = (i("mirror", s.mirror)?, i("steps", s.steps)?);
        // The kernel indexes `ids` (n entries) and `plan` (2b + 1) in int.
        i("n", s.n)?;
        i("2b + 1", 2 * s.b + 1)?;
        let mask = i("mask_id", s.mask_id as usize)?;
        launch!(&self.stream, op, self.k.step_advance, rows_geom(1, STEP_THREADS);
            self.ptr_mut(ids), self.ptr_mut(state), self.ptr_mut(plan), self.ptr(commit),
            self.ptr(rows), self.ptr(sched), r, b, t, mirror, mask, steps)
    }
}
