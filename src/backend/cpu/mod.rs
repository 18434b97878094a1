//! CPU reference backend: the executable specification of every op in [`Backend`].
//!
//! Plain loops, multi-threaded with rayon, emulating PyTorch's rounding in the compute dtype
//! (reference §2.4, §2.6): every op reads values representable in the compute dtype, computes
//! in f32 and rounds its output once to the dtype (round-to-nearest-even), except where PyTorch
//! rounds twice (RMSNorm: normalise, round, multiply by the weight, round; SwiGLU: `silu(gate)`
//! rounded, then `· up` rounded).
//!
//! Buffers: `Act` is a `Vec<f32>` of dtype-representable values, `Ints` a `Vec<i32>`, `F32s` a
//! `Vec<f32>`. Weights stay zero-copy where it matters: a memory-mapped 2-D tensor
//! ([`WeightSource::Mapped`]) is decoded row by row inside `matmul` / `embedding`, so an 8B
//! checkpoint is never copied to f32; random, constant and host sources (presets, tests) are
//! materialised, except that a 1-D constant (a preset norm weight) stays a scalar.
//!
//! Orders of summation are fixed (8 interleaved f32 partial sums in dot products, sequential
//! elsewhere), so results are deterministic for any thread count.

use std::cell::RefCell;
use std::sync::Mutex;
use std::time::Instant;

use anyhow::{bail, ensure, Result};
use rayon::prelude::*;

use super::{
    attention_name, AttnShape, Backend, CachedAttnShape, Gather, Kv, MatMul, Norm, OpClass, Rope,
    Rows,
};
use super::{CommitIn, HeadDims, LogProb, SelectIo, StepIn};
use crate::backend::commit::CommitShape;
use crate::backend::head::{cfg_mix, select_one, SelectParams};
use crate::backend::step::StepShape;
use crate::hf::checkpoint::WeightSource;
use crate::hf::dtype::DType;

mod attention;
pub(crate) mod check;
pub(crate) mod dot;
mod log_prob;
mod norm;
mod weights;

use attention::{attend_rows, Strided};
use check::{first_outside, need};
use dot::dot;
pub use log_prob::log_prob_one;
use log_prob::*;
use norm::*;
pub use weights::CpuWeight;
use weights::*;

/// The CPU reference backend.
#[derive(Debug)]
pub struct CpuBackend {
    dtype: DType,
    /// Per-op-class wall-clock timing ([`Backend::prof_mark`]).
    prof: Mutex<CpuProf>,
}

impl Clone for CpuBackend {
    /// A backend with the same dtype and its own (disabled) profiler.
    fn clone(&self) -> Self {
        CpuBackend::new(self.dtype)
    }
}

/// Wall-clock intervals per [`OpClass`]: the open interval and the totals in seconds.
#[derive(Debug, Default)]
struct CpuProf {
    on: bool,
    open: Option<(OpClass, Instant)>,
    totals: [f64; OpClass::ALL.len()],
    seen: [bool; OpClass::ALL.len()],
}

impl CpuBackend {
    /// A backend that stores and rounds activations in `dtype`.
    pub fn new(dtype: DType) -> Self {
        CpuBackend {
            dtype,
            prof: Mutex::new(CpuProf::default()),
        }
    }

    fn prof_lock(&self) -> std::sync::MutexGuard<'_, CpuProf> {
        // A poisoned profiler only holds timings: keep using it.
        self.prof.lock().unwrap_or_else(|e| e.into_inner())
    }
}

thread_local! {
    /// Per-thread scratch for decoded weight rows and attention scores; grows once.
    static SCRATCH: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

fn with_scratch<R>(len: usize, f: impl FnOnce(&mut [f32]) -> R) -> R {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        if s.len() < len {
            s.resize(len, 0.0);
        }
        f(&mut s[..len])
    })
}

/// Rows of work per rayon task so that each thread gets a few tasks.
fn rows_per_task(n: usize) -> usize {
    let t = rayon::current_num_threads().max(1);
    n.div_ceil(t).max(1)
}

impl Backend for CpuBackend {
    type Act = Vec<f32>;
    type Weight = CpuWeight;
    type Ints = Vec<i32>;
    type F32s = Vec<f32>;

    fn prof_enable(&self, on: bool) {
        let mut p = self.prof_lock();
        p.on = on;
        p.open = None;
    }

    fn prof_enabled(&self) -> bool {
        self.prof_lock().on
    }

    fn prof_mark(&self, class: Option<OpClass>) {
        let mut p = self.prof_lock();
        if !p.on {
            return;
        }
        let now = Instant::now();
        if let Some((c, t0)) = p.open.take() {
            let i = c as usize;
            p.totals[i] += (now - t0).as_secs_f64();
            p.seen[i] = true;
        }
        p.open = class.map(|c| (c, now));
    }

    fn prof_take(&self) -> Result<Vec<(OpClass, f64)>> {
        let mut p = self.prof_lock();
        let out = OpClass::ALL
            .iter()
            .filter(|&&c| p.seen[c as usize])
            .map(|&c| (c, p.totals[c as usize] * 1e3))
            .collect();
        p.totals = Default::default();
        p.seen = Default::default();
        Ok(out)
    }

    fn name(&self) -> String {
        format!(
            "cpu ({}, {} threads)",
            self.dtype,
            rayon::current_num_threads()
        )
    }

    fn compute_dtype(&self) -> DType {
        self.dtype
    }

    fn load_weight(&self, parts: &[WeightSource]) -> Result<CpuWeight> {
        ensure!(!parts.is_empty(), "load_weight: no parts given");
        let name = parts.iter().map(|p| p.name()).collect::<Vec<_>>().join("|");
        let one_d = parts[0].shape().len() == 1;
        if one_d {
            ensure!(
                parts.len() == 1,
                "load_weight: 1-D weight `{name}` must be a single part, got {}",
                parts.len()
            );
        }
        let cols = *parts[0].shape().last().unwrap_or(&0);
        let mut out = Vec::with_capacity(parts.len());
        let mut rows = 0usize;
        for p in parts {
            check_source(p)?;
            let shape = p.shape();
            let (r, c) = match shape {
                [c] if one_d => (1, *c),
                [r, c] if !one_d => (*r, *c),
                _ => bail!(
                    "load_weight: tensor `{}` has shape {shape:?}; expected {} like the first part",
                    p.name(),
                    if one_d { "[cols]" } else { "[rows, cols]" }
                ),
            };
            ensure!(
                c == cols,
                "load_weight: tensor `{}` has {c} columns, the first part `{}` has {cols}",
                p.name(),
                parts[0].name()
            );
            let store = match p {
                WeightSource::Const { value, .. } if one_d => {
                    Store::Scalar(self.dtype.round(p.dtype().round(*value)))
                }
                // A LoRA-merged tensor is merged row by row as it is read (no f32 copy of it).
                WeightSource::Mapped { .. } | WeightSource::Lora { .. } if !one_d => Store::Lazy {
                    src: p.clone(),
                    round: (p.dtype() != self.dtype && self.dtype != DType::F32)
                        .then_some(self.dtype),
                },
                _ => Store::Dense(self.materialise(p, r * c)),
            };
            out.push(Part {
                first_row: rows,
                rows: r,
                store,
            });
            rows += r;
        }
        Ok(CpuWeight {
            rows,
            cols,
            parts: out,
            name,
            fp8: Vec::new(),
        })
    }

    fn load_weight_fp8(&self, parts: &[crate::quant::fp8::Fp8Weight]) -> Result<CpuWeight> {
        ensure!(!parts.is_empty(), "load_weight_fp8: no parts given");
        let name = parts
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>()
            .join("|");
        let cols = parts[0].cols;
        let mut out = Vec::with_capacity(parts.len());
        let mut rows = 0usize;
        for p in parts {
            ensure!(
                p.cols == cols,
                "load_weight_fp8: tensor `{}` has {} columns, the first part `{}` has {cols}",
                p.name,
                p.cols,
                parts[0].name
            );
            out.push(Part {
                first_row: rows,
                rows: p.rows,
                store: Store::Fp8(p.clone()),
            });
            rows += p.rows;
        }
        Ok(CpuWeight {
            rows,
            cols,
            parts: out,
            name,
            fp8: parts.to_vec(),
        })
    }

    fn alloc_act(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn alloc_ints(&self, len: usize) -> Result<Vec<i32>> {
        Ok(vec![0; len])
    }
    fn alloc_f32s(&self, len: usize) -> Result<Vec<f32>> {
        Ok(vec![0.0; len])
    }
    fn write_ints(&self, dst: &mut Vec<i32>, src: &[i32]) -> Result<()> {
        need("write_ints", "dst", dst.len(), src.len())?;
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn write_f32s(&self, dst: &mut Vec<f32>, src: &[f32]) -> Result<()> {
        need("write_f32s", "dst", dst.len(), src.len())?;
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn read_act(&self, src: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        need("read_act", "src", src.len(), n)?;
        Ok(src[..n].to_vec())
    }
    fn read_ints(&self, src: &Vec<i32>, n: usize) -> Result<Vec<i32>> {
        need("read_ints", "src", src.len(), n)?;
        Ok(src[..n].to_vec())
    }
    fn read_f32s(&self, src: &Vec<f32>, n: usize) -> Result<Vec<f32>> {
        need("read_f32s", "src", src.len(), n)?;
        Ok(src[..n].to_vec())
    }
    fn read_ints_into(&self, src: &Vec<i32>, dst: &mut [i32]) -> Result<()> {
        need("read_ints_into", "src", src.len(), dst.len())?;
        dst.copy_from_slice(&src[..dst.len()]);
        Ok(())
    }
    fn read_f32s_into(&self, src: &Vec<f32>, dst: &mut [f32]) -> Result<()> {
        need("read_f32s_into", "src", src.len(), dst.len())?;
        dst.copy_from_slice(&src[..dst.len()]);
        Ok(())
    }

    fn embedding(&self, out: &mut Vec<f32>, wte: &CpuWeight, g: Gather<'_, Self>) -> Result<()> {
        const OP: &str = "embedding";
        let Gather { idx: ids, n, c } = g;
        need(OP, "out", out.len(), n * c)?;
        need(OP, "ids", ids.len(), n)?;
        ensure!(
            wte.cols == c,
            "{OP}: weight `{}` has {} columns, expected C = {c}",
            wte.name,
            wte.cols
        );
        if let Some((i, id)) = first_outside(&ids[..n], wte.rows) {
            bail!(
                "{OP}: ids[{i}] = {id} is outside the {} rows of `{}`",
                wte.rows,
                wte.name
            );
        }
        if c == 0 {
            return Ok(());
        }
        let dt = self.dtype;
        out[..n * c]
            .par_chunks_mut(c)
            .zip(ids[..n].par_iter())
            .for_each(|(o, &id)| {
                with_scratch(c, |buf| {
                    let r = wte.row(id as usize, buf);
                    for (d, &s) in o.iter_mut().zip(r) {
                        *d = dt.round(s);
                    }
                })
            });
        Ok(())
    }

    fn rms_norm(&self, out: &mut Vec<f32>, x: &Vec<f32>, w: &CpuWeight, s: Norm) -> Result<()> {
        let Norm { n, c, eps } = s;
        let args = [("out", out.len()), ("x", x.len())];
        let wr = self.norm_args("rms_norm", &args, w, s)?;
        rms_rows(self.dtype, &mut out[..n * c], &x[..n * c], &wr, c, eps);
        Ok(())
    }

    fn add_rms_norm(
        &self,
        out: &mut Vec<f32>,
        x: &mut Vec<f32>,
        d: &Vec<f32>,
        w: &CpuWeight,
        s: Norm,
    ) -> Result<()> {
        let Norm { n, c, eps } = s;
        let args = [("out", out.len()), ("x", x.len()), ("d", d.len())];
        let wr = self.norm_args("add_rms_norm", &args, w, s)?;
        add_rounded(self.dtype, &mut x[..n * c], &d[..n * c]);
        rms_rows(self.dtype, &mut out[..n * c], &x[..n * c], &wr, c, eps);
        Ok(())
    }

    fn add(&self, x: &mut Vec<f32>, d: &Vec<f32>, s: Rows) -> Result<()> {
        const OP: &str = "add";
        let Rows { n, c } = s;
        need(OP, "x", x.len(), n * c)?;
        need(OP, "d", d.len(), n * c)?;
        add_rounded(self.dtype, &mut x[..n * c], &d[..n * c]);
        Ok(())
    }

    fn matmul(&self, out: &mut Vec<f32>, x: &Vec<f32>, w: &CpuWeight, s: MatMul) -> Result<()> {
        const OP: &str = "matmul";
        let MatMul { n, k, m } = s;
        need(OP, "out", out.len(), n * m)?;
        need(OP, "x", x.len(), n * k)?;
        ensure!(
            w.rows == m && w.cols == k,
            "{OP}: weight `{}` is [{}, {}], expected [M = {m}, K = {k}]",
            w.name,
            w.rows,
            w.cols
        );
        if !w.fp8.is_empty() {
            return crate::quant::fp8::matmul(self.dtype, out, x, &w.fp8, s);
        }
        if n == 0 || m == 0 {
            return Ok(());
        }
        let dt = self.dtype;
        // Tasks own contiguous blocks of output rows; inside, weight rows go in tiles of TM,
        // decoded once per task into the thread's scratch when the weight is mapped.
        const TM: usize = 8;
        let rpt = rows_per_task(n);
        out[..n * m]
            .par_chunks_mut(rpt * m)
            .zip(x[..n * k].par_chunks(rpt * k))
            .for_each(|(o, xs)| {
                let rows = xs.len() / k.max(1);
                with_scratch(TM * k.max(1), |scratch| {
                    let mut j0 = 0;
                    while j0 < m {
                        let tm = TM.min(m - j0);
                        let mut ws: [&[f32]; TM] = [&[]; TM];
                        for (t, buf) in scratch.chunks_mut(k.max(1)).take(tm).enumerate() {
                            ws[t] = w.row(j0 + t, &mut buf[..k]);
                        }
                        for i in 0..rows {
                            let xr = &xs[i * k..(i + 1) * k];
                            let orow = &mut o[i * m + j0..i * m + j0 + tm];
                            for (t, ov) in orow.iter_mut().enumerate() {
                                *ov = dt.round(dot(xr, ws[t]));
                            }
                        }
                        j0 += tm;
                    }
                })
            });
        Ok(())
    }

    fn rope(&self, qkv: &mut Vec<f32>, t: Rope<'_, Self>, s: AttnShape) -> Result<()> {
        const OP: &str = "rope";
        let Rope { pos, cos, sin } = t;
        let (n, nh, nkv, hd) = (s.rows(), s.nh, s.nkv, s.hd);
        ensure!(
            hd % 2 == 0 && hd > 0,
            "{OP}: head dim HD = {hd} must be even and positive"
        );
        let half = hd / 2;
        let width = (nh + 2 * nkv) * hd;
        need(OP, "qkv", qkv.len(), n * width)?;
        need(OP, "pos", pos.len(), n)?;
        ensure!(
            cos.len() == sin.len() && cos.len() % half == 0,
            "{OP}: tables `cos` ({}) and `sin` ({}) must both be [max_pos, HD/2 = {half}]",
            cos.len(),
            sin.len()
        );
        let max_pos = cos.len() / half;
        if let Some((i, p)) = first_outside(&pos[..n], max_pos) {
            bail!("{OP}: pos[{i}] = {p} is outside the RoPE table of {max_pos} positions");
        }
        let dt = self.dtype;
        qkv[..n * width]
            .par_chunks_mut(width)
            .zip(pos[..n].par_iter())
            .for_each(|(row, &p)| {
                let cs = &cos[p as usize * half..(p as usize + 1) * half];
                let sn = &sin[p as usize * half..(p as usize + 1) * half];
                // q heads then k heads: the first (NH + NKV)·HD columns.
                for head in row[..(nh + nkv) * hd].chunks_exact_mut(hd) {
                    let (a, b) = head.split_at_mut(half);
                    for j in 0..half {
                        let (x1, x2) = (a[j], b[j]);
                        a[j] = dt.round(x1 * cs[j] - x2 * sn[j]);
                        b[j] = dt.round(x2 * cs[j] + x1 * sn[j]);
                    }
                }
            });
        Ok(())
    }

    fn kv_store(&self, kv: Kv<&mut Vec<f32>>, qkv: &Vec<f32>, s: CachedAttnShape) -> Result<()> {
        const OP: &str = "kv_store";
        let (k_cache, v_cache, q0) = (kv.k, kv.v, s.q0);
        let (b, tq, l, nh, nkv, hd) = s.dims();
        ensure!(
            q0 + tq <= l,
            "{OP}: query rows [{q0}, {}) exceed the cache length {l}",
            q0 + tq
        );
        let width = (nh + 2 * nkv) * hd;
        let kw = nkv * hd;
        need(OP, "qkv", qkv.len(), b * tq * width)?;
        need(OP, "k_cache", k_cache.len(), b * l * kw)?;
        need(OP, "v_cache", v_cache.len(), b * l * kw)?;
        for bi in 0..b {
            for i in 0..tq {
                let src = &qkv[(bi * tq + i) * width..][..width];
                let dst = (bi * l + q0 + i) * kw;
                k_cache[dst..dst + kw].copy_from_slice(&src[nh * hd..nh * hd + kw]);
                v_cache[dst..dst + kw].copy_from_slice(&src[nh * hd + kw..nh * hd + 2 * kw]);
            }
        }
        Ok(())
    }

    fn attend(
        &self,
        out: &mut Vec<f32>,
        qkv: &Vec<f32>,
        kv: Option<Kv<&Vec<f32>>>,
        key_valid: Option<&Vec<i32>>,
        s: CachedAttnShape,
    ) -> Result<()> {
        let op = attention_name(kv.is_some());
        let (b, tq, l, nh, nkv, hd) = s.dims();
        ensure!(
            nkv > 0 && nh % nkv == 0,
            "{op}: NH = {nh} must be a positive multiple of NKV = {nkv}"
        );
        ensure!(
            tq <= l,
            "{op}: {tq} queries per row exceed the {l} cached keys"
        );
        let (width, kw) = ((nh + 2 * nkv) * hd, nkv * hd);
        need(op, "qkv", qkv.len(), b * tq * width)?;
        need(op, "out", out.len(), b * tq * nh * hd)?;
        let q = Strided::new(qkv, 0, width);
        let (k, v) = match kv {
            None => (
                Strided::new(qkv, nh * hd, width),
                Strided::new(qkv, (nh + nkv) * hd, width),
            ),
            Some(Kv { k, v }) => {
                need(op, "k_cache", k.len(), b * l * kw)?;
                need(op, "v_cache", v.len(), b * l * kw)?;
                (Strided::new(k, 0, kw), Strided::new(v, 0, kw))
            }
        };
        if let Some(m) = key_valid {
            need(op, "key_valid", m.len(), b * l)?;
        }
        attend_rows(self.dtype, out, q, k, v, key_valid.map(|m| m.as_slice()), s);
        Ok(())
    }

    fn swiglu(&self, out: &mut Vec<f32>, gate_up: &Vec<f32>, s: Rows) -> Result<()> {
        const OP: &str = "swiglu";
        let Rows { n, c: f } = s;
        need(OP, "out", out.len(), n * f)?;
        need(OP, "gate_up", gate_up.len(), n * 2 * f)?;
        if f == 0 {
            return Ok(());
        }
        let dt = self.dtype;
        out[..n * f]
            .par_chunks_mut(f)
            .zip(gate_up[..n * 2 * f].par_chunks(2 * f))
            .for_each(|(o, gu)| {
                let (g, u) = gu.split_at(f);
                for ((ov, &gv), &uv) in o.iter_mut().zip(g).zip(u) {
                    let s = dt.round(gv / (1.0 + (-gv).exp()));
                    *ov = dt.round(s * uv);
                }
            });
        Ok(())
    }

    fn gather_rows(&self, out: &mut Vec<f32>, x: &Vec<f32>, g: Gather<'_, Self>) -> Result<()> {
        const OP: &str = "gather_rows";
        let (rows, nrows, c) = (g.idx, g.n, g.c);
        need(OP, "out", out.len(), nrows * c)?;
        need(OP, "rows", rows.len(), nrows)?;
        if c == 0 {
            return Ok(());
        }
        let have = x.len() / c;
        if let Some((i, r)) = first_outside(&rows[..nrows], have) {
            bail!("{OP}: rows[{i}] = {r} is outside the {have} rows of `x`");
        }
        for (o, &r) in out[..nrows * c].chunks_mut(c).zip(&rows[..nrows]) {
            o.copy_from_slice(&x[r as usize * c..(r as usize + 1) * c]);
        }
        Ok(())
    }

    fn commit_select(
        &self,
        commit: &mut Vec<i32>,
        c: CommitIn<'_, Self>,
        s: CommitShape,
    ) -> Result<()> {
        crate::backend::commit::commit_rows(commit, (c.tok, c.conf), c.rows, c.ids, c.plan, s)
    }

    fn step_advance(
        &self,
        (ids, state, plan): (&mut Vec<i32>, &mut Vec<i32>, &mut Vec<i32>),
        c: StepIn<'_, Self>,
        s: StepShape,
    ) -> Result<()> {
        crate::backend::step::step_advance_ref((ids, state, plan), (c.commit, c.rows, c.sched), s)
    }

    fn select(&self, io: SelectIo<'_, Self>, s: HeadDims, p: &SelectParams) -> Result<()> {
        const OP: &str = "select";
        let (HeadDims { r, v }, keys) = (s, io.keys);
        let (tok, conf, logits) = (io.tok, io.conf, io.logits);
        let cfg = p.cfg_scale > 0.0;
        let rr = s.logit_rows(p.cfg_scale);
        need(OP, "logits", logits.len(), rr * v)?;
        need(OP, "keys", keys.len(), 2 * r)?;
        need(OP, "tok", tok.len(), r)?;
        need(OP, "conf", conf.len(), r)?;
        if let Some((i, &k)) = keys[..2 * r].iter().enumerate().find(|(_, &k)| k < 0) {
            bail!("{OP}: keys[{i}] = {k} is negative (expected batch row / position)");
        }
        if r == 0 {
            return Ok(());
        }
        ensure!(v > 0, "{OP}: vocabulary size V is 0");
        // A step graph's state gives the RNG step.
        let at_step;
        let p = match io.step {
            Some(st) => {
                need(OP, "state", st.len(), crate::backend::step::STATE_LEN)?;
                at_step = SelectParams {
                    step: crate::backend::step::rng_step(st),
                    ..p.clone()
                };
                &at_step
            }
            None => p,
        };
        let (cond, uncond) = logits[..rr * v].split_at_mut(r * v);
        let uncond: &[f32] = uncond;
        tok[..r]
            .par_iter_mut()
            .zip(conf[..r].par_iter_mut())
            .zip(cond.par_chunks_mut(v))
            .enumerate()
            .for_each(|(i, ((t, c), l))| {
                if cfg {
                    cfg_mix(l, &uncond[i * v..(i + 1) * v], p.cfg_scale, p.dtype);
                }
                let (tk, cf) = select_one(l, keys[2 * i] as u32, keys[2 * i + 1] as u32, p);
                *t = tk as i32;
                *c = cf;
            });
        Ok(())
    }

    fn log_prob(
        &self,
        out: &mut Vec<f32>,
        logits: &Vec<f32>,
        targets: &Vec<i32>,
        s: LogProb,
    ) -> Result<()> {
        cpu_log_prob(self.dtype, out, (logits, targets), s)
    }
}

#[cfg(test)]
mod tests;
