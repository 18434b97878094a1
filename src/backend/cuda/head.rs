//! The LM head's selection and scoring ops: `select` (`kernels/head_select.cu`), `log_prob`
//! (`kernels/log_prob.cu`), the top-k / threshold selection kernels and the step's commit
//! selection `commit_select` (`kernels/topk.cu`).

use super::*;
use crate::backend::commit::{check_plan, CommitShape};

/// Threads per block of `head_select` (ABI: block 1024).
pub(crate) const HEAD_THREADS: u32 = 1024;

/// Threads per block of the top-k kernels.
pub(crate) const TOPK_THREADS: u32 = 1024;

/// Threads per block of `log_prob_bf16`.
pub(crate) const LOG_PROB_THREADS: u32 = 1024;

/// The buffers of one [`Backend::select`] call: outputs `tok`, `conf` `[R]`, the logits `[R, V]`
/// (or `[2R, V]` with CFG; modified in place) and the row keys `[2R]`.
pub(crate) struct SelectIo<'a> {
    pub tok: &'a mut Ints,
    pub conf: &'a mut F32s,
    pub logits: &'a mut Act,
    pub keys: &'a Ints,
}

impl CudaBackend {
    /// Per row, the `k[row]` best columns of `conf` `[nrows, ncols]` (confidence descending, ties
    /// to the lowest column, NaN = −∞) written in order into `sel` `[nrows, ncols]`, the rest -1.
    pub fn topk_select(
        &self,
        sel: &mut CudaSlice<i32>,
        conf: &CudaSlice<f32>,
        k: &CudaSlice<i32>,
        nrows: usize,
        ncols: usize,
    ) -> Result<()> {
        let op = "topk_select";
        check_len(op, "sel", sel.len(), nrows * ncols)?;
        check_len(op, "conf", conf.len(), nrows * ncols)?;
        check_len(op, "k", k.len(), nrows)?;
        if nrows == 0 || ncols == 0 {
            return Ok(());
        }
        self.forget_ints(sel);
        let (selp, confp, kp) = (
            dptr_mut(sel, &self.stream),
            dptr(conf, &self.stream),
            dptr(k, &self.stream),
        );
        let (nr, nc) = (int(op, "nrows", nrows)?, int(op, "ncols", ncols)?);
        launch!(&self.stream, op, self.k.topk_select, rows_geom(nrows, TOPK_THREADS); selp, confp,
            kp, nr, nc)
    }

    /// Per row, the best column plus every column with `conf ≥ threshold`, in the order of
    /// [`CudaBackend::topk_select`], the rest of the row -1.
    pub fn threshold_select(
        &self,
        sel: &mut CudaSlice<i32>,
        conf: &CudaSlice<f32>,
        threshold: f32,
        nrows: usize,
        ncols: usize,
    ) -> Result<()> {
        let op = "threshold_select";
        check_len(op, "sel", sel.len(), nrows * ncols)?;
        check_len(op, "conf", conf.len(), nrows * ncols)?;
        if nrows == 0 || ncols == 0 {
            return Ok(());
        }
        self.forget_ints(sel);
        let (selp, confp) = (dptr_mut(sel, &self.stream), dptr(conf, &self.stream));
        let (nr, nc) = (int(op, "nrows", nrows)?, int(op, "ncols", ncols)?);
        launch!(&self.stream, op, self.k.threshold_select, rows_geom(nrows, TOPK_THREADS); selp,
            confp, threshold, nr, nc)
    }

    /// Launcher of `commit_select_f32` (`kernels/topk.cu`, [`Backend::commit_select`]).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch_commit_select(
        &self,
        commit: &mut CudaSlice<i32>,
        tok: &CudaSlice<i32>,
        conf: &CudaSlice<f32>,
        rows: &CudaSlice<i32>,
        ids: &CudaSlice<i32>,
        plan: &CudaSlice<i32>,
        s: CommitShape,
    ) -> Result<()> {
        let op = "commit_select";
        let CommitShape { r, b, n, .. } = s;
        check_len(op, "commit", commit.len(), r)?;
        check_len(op, "tok", tok.len(), r)?;
        check_len(op, "conf", conf.len(), r)?;
        check_len(op, "rows", rows.len(), r)?;
        check_len(op, "ids", ids.len(), n)?;
        check_len(op, "plan", plan.len(), 2 * b + 1)?;
        self.check_ints(op, "rows", rows, r, n, "the pass's tokens")?;
        // The plan is written by the host: its shadow is checked like the CPU backend checks it.
        if let Some(vals) = self.shadow.borrow().get(&dptr(plan, &self.stream)) {
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
        self.forget_ints(commit);
        let (cp, tp, fp, rp, ip, pp) = (
            dptr_mut(commit, &self.stream),
            dptr(tok, &self.stream),
            dptr(conf, &self.stream),
            dptr(rows, &self.stream),
            dptr(ids, &self.stream),
            dptr(plan, &self.stream),
        );
        let (r_, b_) = (int(op, "r", r)?, int(op, "b", b)?);
        int(op, "n", n)?;
        let mask = int(op, "mask_id", s.mask_id as usize)?;
        launch!(&self.stream, op, self.k.commit_select, rows_geom(b, TOPK_THREADS); cp, tp, fp,
            rp, ip, pp, r_, b_, mask, mode, param)
    }

    /// Launcher of `kernels/log_prob.cu` ([`Backend::log_prob`]).
    pub(crate) fn launch_log_prob(
        &self,
        out: &mut CudaSlice<f32>,
        logits: &CudaSlice<bf16>,
        targets: &CudaSlice<i32>,
        r: usize,
        v: usize,
        cfg_scale: f64,
    ) -> Result<()> {
        let op = "log_prob";
        if !(cfg_scale.is_finite() && cfg_scale >= 0.0) {
            bail!("{op}: cfg_scale must be finite and >= 0, got {cfg_scale}");
        }
        let lrows = if cfg_scale > 0.0 { 2 * r } else { r };
        check_len(op, "out", out.len(), r)?;
        check_len(op, "logits", logits.len(), lrows * v)?;
        check_len(op, "targets", targets.len(), r)?;
        // The kernel offsets logit rows (up to 2·r with CFG) in 64 bits: only r, v are ints.
        int(op, "rows", lrows)?;
        self.check_ints(op, "targets", targets, r, v, "the vocabulary")?;
        if r == 0 {
            return Ok(());
        }
        let f = self.kernel_fn("log_prob_bf16")?;
        let (op_, lp, tp) = (
            dptr_mut(out, &self.stream),
            dptr(logits, &self.stream),
            dptr(targets, &self.stream),
        );
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        launch!(&self.stream, op, f, rows_geom(r, LOG_PROB_THREADS); op_, lp, tp, r_, v_,
            cfg_scale)
    }

    /// Launcher of `kernels/head_select.cu` ([`Backend::select`]).
    pub(crate) fn launch_select(
        &self,
        io: SelectIo<'_>,
        r: usize,
        v: usize,
        p: &SelectParams,
    ) -> Result<()> {
        let SelectIo {
            tok,
            conf,
            logits,
            keys,
        } = io;
        let op = "select";
        if p.dtype != DType::BF16 {
            bail!(
                "{op}: SelectParams.dtype is {} but the CUDA backend computes in bf16",
                p.dtype
            );
        }
        let lrows = if p.cfg_scale > 0.0 { 2 * r } else { r };
        check_len(op, "tok", tok.len(), r)?;
        check_len(op, "conf", conf.len(), r)?;
        check_len(op, "logits", logits.len(), lrows * v)?;
        check_len(op, "keys", keys.len(), 2 * r)?;
        // The kernel offsets logit rows in 64 bits; it indexes `keys` at 2·row in int.
        int(op, "2·r", 2 * r)?;
        if r == 0 {
            return Ok(());
        }
        self.forget_ints(tok);
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
            dptr_mut(tok, &self.stream),
            dptr_mut(conf, &self.stream),
            dptr_mut(logits, &self.stream),
            dptr(keys, &self.stream),
        );
        let (r_, v_) = (int(op, "r", r)?, int(op, "v", v)?);
        let (temperature, cfg_scale) = (p.temperature, p.cfg_scale);
        let remasking: i32 = match p.remasking {
            Remasking::LowConfidence => 0,
            Remasking::Random => 1,
        };
        let (seed, step) = (p.seed, p.step);
        launch!(&self.stream, op, self.k.head_select, rows_geom(r, HEAD_THREADS); tp, cp, lp, kp,
            r_, v_, temperature, cfg_scale, remasking, seed, step, forbid, sup0, sup1)
    }
}
