//! bf16 storage on the device (`llada train --device cuda --storage bf16`; the semantics and
//! which buffer holds what are [`crate::train::mixed`]'s): [`CudaBf16`], the training ops over
//! dtype-tagged buffers ([`SBuf`]), launching the `*_bf16s` kernels (f32 math, bf16 loads and
//! one RNE rounding per bf16 store; `kernels/ABI.md`) and bf16 cuBLAS GEMMs (`CUDA_R_16BF` A/B,
//! f32 accumulation, bf16 C, f32 C for weight gradients) through the same launch bodies as the
//! f32 ops (`raw.rs`). The pass is the same [`crate::train::model::forward_backward_with`].
//!
//! The CPU reference is [`crate::train::backend::HostOps::with_storage`]: the two differ only by
//! f32 summation order (GEMMs, tree reductions), which can move a bf16 rounding by one ulp.
//! Not with the tiled kernels (`LLADA_TRAIN_KERNELS=tiled`, f32 only) or a LoRA run.

use super::raw::{Arg, GemmData};
use super::*;

/// A training buffer in bf16 storage: bf16 (working weights, activations, activation
/// gradients) or f32 (per-row statistics, weight gradients, RoPE tables, loss weights).
pub enum SBuf {
    F32(Buf),
    Bf16(CudaSlice<bf16>),
}

impl SBuf {
    /// Elements.
    pub fn len(&self) -> usize {
        match self {
            SBuf::F32(b) => b.len(),
            SBuf::Bf16(b) => b.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn dtype(&self) -> &'static str {
        match self {
            SBuf::F32(_) => "f32",
            SBuf::Bf16(_) => "bf16",
        }
    }
}

/// [`TrainOps`] in bf16 storage on `ops`' device ([`crate::train::mixed`]).
pub struct CudaBf16<'a> {
    pub ops: &'a CudaOps,
}

impl<'a> CudaBf16<'a> {
    /// The bf16-storage ops over `ops`: refused with the tiled kernels or a LoRA adapter.
    pub fn new(ops: &'a CudaOps) -> Result<CudaBf16<'a>> {
        ensure!(
            ops.tiled.is_none(),
            "bf16 storage has no tiled kernels: unset {}",
            super::TRAIN_KERNELS_ENV
        );
        ensure!(
            ops.lora.is_none(),
            "bf16 storage trains the full model: these ops carry a LoRA adapter"
        );
        Ok(CudaBf16 { ops })
    }

    /// `b` as a bf16 operand (an error naming `op` and `arg` otherwise).
    fn bf(&self, op: &str, arg: &str, b: &SBuf) -> Result<Arg> {
        match b {
            SBuf::Bf16(s) => Ok(Arg::r(self.ops, s)),
            SBuf::F32(_) => bail!("{op}: `{arg}` is f32, bf16 storage holds it in bf16"),
        }
    }

    /// [`CudaBf16::bf`] of each `(arg, b)`.
    fn bfs<const N: usize>(&self, op: &str, args: [(&str, &SBuf); N]) -> Result<[Arg; N]> {
        let mut out = [Arg { p: 0, len: 0 }; N];
        for (o, (arg, b)) in out.iter_mut().zip(args) {
            *o = self.bf(op, arg, b)?;
        }
        Ok(out)
    }

    fn bf_mut(&self, op: &str, arg: &str, b: &mut SBuf) -> Result<Arg> {
        match b {
            SBuf::Bf16(s) => Ok(Arg::w(self.ops, s)),
            SBuf::F32(_) => bail!("{op}: `{arg}` is f32, bf16 storage holds it in bf16"),
        }
    }

    /// `b` as an f32 operand (an error naming `op` and `arg` otherwise).
    fn f32_mut<'b>(&self, op: &str, arg: &str, b: &'b mut SBuf) -> Result<&'b mut Buf> {
        match b {
            SBuf::F32(s) => Ok(s),
            SBuf::Bf16(_) => bail!("{op}: `{arg}` is bf16, bf16 storage holds it in f32"),
        }
    }

    fn f32(&self, op: &str, arg: &str, b: &SBuf) -> Result<Arg> {
        match b {
            SBuf::F32(s) => Ok(Arg::r(self.ops, s)),
            SBuf::Bf16(_) => bail!("{op}: `{arg}` is bf16, bf16 storage holds it in f32"),
        }
    }

    fn zero_bf16(&self, b: &mut SBuf) -> Result<()> {
        if let SBuf::Bf16(s) = b {
            self.ops
                .be
                .stream()
                .memset_zeros(s)
                .map_err(|e| driver_err("clearing a GPU buffer".into(), e))?;
        }
        Ok(())
    }
}

/// The bf16 working weights of the f32 `master` weights (RNE, on the device).
pub fn bf16_weights(ops: &CudaOps, master: &[Buf]) -> Result<Vec<SBuf>> {
    master
        .iter()
        .map(|p| Ok(SBuf::Bf16(ops.to_bf16(p)?)))
        .collect()
}

/// [`crate::train::model::forward_backward_with`] in bf16 storage on `ops`' device, from the
/// bf16 working weights `work`, the f32 gradients `grad` lent to the pass as [`SBuf::F32`]
/// (and given back even when it fails).
pub fn forward_backward_bf16(
    ops: &CudaOps,
    cfg: &ModelConfig,
    o: PassOptions,
    work: &[SBuf],
    b: &Batch,
    grad: &mut Vec<Buf>,
) -> Result<crate::train::model::PassStats> {
    let st = CudaBf16::new(ops)?;
    let mut g: Vec<SBuf> = std::mem::take(grad).into_iter().map(SBuf::F32).collect();
    let r = crate::train::model::forward_backward_with(&st, cfg, o, work, b, &mut g);
    for x in g {
        if let SBuf::F32(x) = x {
            grad.push(x);
        }
    }
    r
}

impl CudaOps {
    /// A bf16 copy of `src` (RNE, `f32_to_bf16`): bf16 storage's working weights.
    pub fn to_bf16(&self, src: &Buf) -> Result<CudaSlice<bf16>> {
        let op = "f32_to_bf16";
        let len = src.len();
        self.bind()?;
        let mut out = self
            .be
            .stream()
            .alloc_zeros::<bf16>(len.max(1))
            .map_err(|e| driver_err(format!("allocating {len} bf16 on the GPU"), e))?;
        let (o, s, n) = (self.ptr_mut(&mut out), self.ptr(src), len as i64);
        if len > 0 {
            launch!(self, op, self.k.f32_to_bf16, Geom::new((stride_grid(len), 1, 1), 256, 0); o,
                s, n)?;
        }
        Ok(out)
    }
}

impl TrainOps for CudaBf16<'_> {
    type Buf = SBuf;
    type Ints = DevInts;

    /// bf16 zeros (an activation).
    fn zeros(&self, len: usize) -> Result<SBuf> {
        self.ops.bind()?;
        let b = self.ops.be.stream().alloc_zeros::<bf16>(len.max(1));
        Ok(SBuf::Bf16(b.map_err(|e| {
            driver_err(format!("allocating {len} bf16 on the GPU"), e)
        })?))
    }
    fn zeros_f32(&self, len: usize) -> Result<SBuf> {
        Ok(SBuf::F32(self.ops.zeros(len)?))
    }
    /// An f32 buffer.
    fn upload(&self, host: &[f32]) -> Result<SBuf> {
        Ok(SBuf::F32(self.ops.upload(host)?))
    }
    fn download(&self, src: &SBuf, n: usize) -> Result<Vec<f32>> {
        let s = match src {
            SBuf::F32(s) => return self.ops.download(s, n),
            SBuf::Bf16(s) => s,
        };
        check_len("download", "src", s.len(), n)?;
        let mut out = vec![bf16::ZERO; n];
        if n > 0 {
            self.ops
                .be
                .stream()
                .memcpy_dtoh(&s.slice(..n), &mut out)
                .map_err(|e| driver_err("device→host copy".into(), e))?;
        }
        self.ops.sync()?;
        Ok(out.into_iter().map(bf16::to_f32).collect())
    }
    /// An f32 buffer.
    fn upload_f64(&self, host: &[f64]) -> Result<SBuf> {
        Ok(SBuf::F32(self.ops.upload_f64(host)?))
    }
    fn ints(&self, host: &[u32]) -> Result<DevInts> {
        self.ops.ints(host)
    }
    fn copy(&self, dst: &mut SBuf, src: &SBuf) -> Result<()> {
        let (dt, st) = (dst.dtype(), src.dtype());
        match (dst, src) {
            (SBuf::F32(d), SBuf::F32(s)) => self.ops.copy(d, s),
            (SBuf::Bf16(d), SBuf::Bf16(s)) => {
                check_len("copy", "dst", d.len(), s.len())?;
                self.ops.bind()?;
                let mut view = d.slice_mut(..s.len());
                self.ops
                    .be
                    .stream()
                    .memcpy_dtod(s, &mut view)
                    .map_err(|e| driver_err("device copy".into(), e))
            }
            _ => bail!("copy: `dst` is {dt}, `src` {st}"),
        }
    }
    fn finish(&self, what: &str) -> Result<()> {
        self.ops.finish(what)
    }

    fn embedding(&self, out: &mut SBuf, wte: &SBuf, ids: RowIds<Self>) -> Result<()> {
        let op = "embedding";
        let args = [self.bf_mut(op, "out", out)?, self.bf(op, "wte", wte)?];
        let (f, grid) = (self.ops.k.embedding_bf16s, ids.d.n as u32);
        let names = ["out", "ids", "the embedding rows"];
        self.ops
            .row_op((op, f, grid), args, (ids.ids, ids.d), names, false)
    }
    fn embedding_bwd(&self, dwte: &mut SBuf, dx: &SBuf, ids: RowIds<Self>) -> Result<()> {
        let op = "embedding_bwd";
        let dwte = Arg::w(self.ops, self.f32_mut(op, "dwte", dwte)?);
        let args = [dwte, self.bf(op, "dx", dx)?];
        let f = self.ops.k.embedding_bwd_bf16s;
        self.ops.embedding_bwd_rows(f, args, ids.ids, ids.d)
    }
    fn rms_norm(&self, y: &mut SBuf, r: &mut SBuf, a: Norm<Self>) -> Result<()> {
        let op = "rms_norm";
        let (y, r) = (self.bf_mut(op, "y", y)?, self.f32_mut(op, "r", r)?);
        let r = Arg::w(self.ops, r);
        let args = [y, r, self.bf(op, "x", a.x)?, self.bf(op, "w", a.w)?];
        self.ops
            .rms_norm_rows(self.ops.k.rms_norm_fwd_bf16s, args, a.d, a.eps)
    }
    fn rms_norm_bwd(&self, dx: &mut SBuf, dw: Option<&mut SBuf>, a: NormGrad<Self>) -> Result<()> {
        let op = "rms_norm_bwd";
        let dx = self.bf_mut(op, "dx", dx)?;
        let dw = match dw {
            Some(dw) => Some(Arg::w(self.ops, self.f32_mut(op, "dw", dw)?)),
            None => None,
        };
        let [dy, x, w] = self.bfs(op, [("dy", a.dy), ("x", a.x), ("w", a.w)])?;
        let k = &self.ops.k;
        let f = [k.rms_norm_bwd_bf16s, k.rms_norm_bwd_dw_bf16s];
        let ins = [dy, x, self.f32(op, "r", a.r)?, w];
        self.ops.rms_norm_bwd_rows(f, (dx, dw), ins, a.d)
    }
    fn linear(&self, y: &mut SBuf, x: &SBuf, w: &SBuf, d: MatMul) -> Result<()> {
        let op = "linear";
        let y = self.bf_mut(op, "y", y)?;
        let args = [y, self.bf(op, "x", x)?, self.bf(op, "w", w)?];
        self.ops.linear_rows(args, d, GemmData::Bf16)
    }
    fn linear_bwd(&self, dx: Dx<Self>, dw: Option<&mut SBuf>, a: LinearGrad<Self>) -> Result<()> {
        let op = "linear_bwd";
        let (mut dx, accumulate) = dx.split();
        let dxa = match dx.as_deref_mut() {
            Some(b) => Some((self.bf_mut(op, "dx", b)?, accumulate)),
            None => None,
        };
        let dw = match dw {
            Some(dw) => Some(Arg::w(self.ops, self.f32_mut(op, "dw", dw)?)),
            None => None,
        };
        let [dy, x, w] = self.bfs(op, [("dy", a.dy), ("x", a.x), ("w", a.w)])?;
        let zero = || dx.map_or(Ok(()), |b| self.zero_bf16(b));
        let data = GemmData::Bf16;
        self.ops
            .linear_bwd_rows((dxa, dw), [dy, x, w], a.d, data, zero)
    }
    fn rope(&self, x: &mut SBuf, t: &Rope<Self>, heads: usize, inverse: bool) -> Result<()> {
        let op = "rope";
        let x = self.bf_mut(op, "x", x)?;
        let tables = (
            &t.pos,
            self.f32(op, "cos", &t.cos)?,
            self.f32(op, "sin", &t.sin)?,
        );
        let f = self.ops.k.rope_bf16s;
        self.ops
            .rope_rows(f, x, tables, (t.n, t.hd), heads, inverse)
    }
    fn attention(&self, o: &mut SBuf, lse: &mut SBuf, a: Qkv<Self>) -> Result<()> {
        let op = "attention";
        let o = self.bf_mut(op, "o", o)?;
        let lse = Arg::w(self.ops, self.f32_mut(op, "lse", lse)?);
        let [q, k, v] = self.bfs(op, [("q", a.q), ("k", a.k), ("v", a.v)])?;
        let f = self.ops.k.attention_fwd_bf16s;
        let none: Option<fn() -> Result<()>> = None;
        self.ops.attention_rows(f, [o, lse], [q, k, v], a.d, none)
    }
    fn attention_bwd(&self, g: QkvGrads<Self>, a: AttnGrad<Self>) -> Result<()> {
        let op = "attention_bwd";
        let QkvGrads { dq, dk, dv, delta } = g;
        let dqa = self.bf_mut(op, "dq", dq)?;
        let (dka, dva) = (self.bf_mut(op, "dk", dk)?, self.bf_mut(op, "dv", dv)?);
        let delta = Arg::w(self.ops, self.f32_mut(op, "delta", delta)?);
        let qkv = a.qkv;
        let [dout, q, k, v] = self.bfs(
            op,
            [("dout", a.dout), ("q", qkv.q), ("k", qkv.k), ("v", qkv.v)],
        )?;
        let ins = [
            dout,
            q,
            k,
            v,
            self.bf(op, "o", a.o)?,
            self.f32(op, "lse", a.lse)?,
        ];
        let k = &self.ops.k;
        let f = [k.attention_bwd_dq_bf16s, k.attention_bwd_dkv_bf16s];
        let zero = || {
            self.zero_bf16(dk)?;
            self.zero_bf16(dv)
        };
        let none: Option<fn() -> Result<()>> = None;
        let outs = [dqa, dka, dva, delta];
        self.ops
            .attention_bwd_rows(f, outs, ins, qkv.d, (zero, none))
    }
    fn swiglu(&self, m: &mut SBuf, g: &SBuf, u: &SBuf, len: usize) -> Result<()> {
        let op = "swiglu";
        let m = self.bf_mut(op, "m", m)?;
        let args = [
            ("m", m),
            ("g", self.bf(op, "g", g)?),
            ("u", self.bf(op, "u", u)?),
        ];
        let f = self.ops.k.swiglu_fwd_bf16s;
        self.ops.elementwise((op, f), &args, len)
    }
    fn swiglu_bwd(&self, dg: &mut SBuf, du: &mut SBuf, a: SwigluGrad<Self>) -> Result<()> {
        let op = "swiglu_bwd";
        let (dg, du) = (self.bf_mut(op, "dg", dg)?, self.bf_mut(op, "du", du)?);
        let [dm, g, u] = self.bfs(op, [("dm", a.dm), ("g", a.g), ("u", a.u)])?;
        let args = [("dg", dg), ("du", du), ("dm", dm), ("g", g), ("u", u)];
        let f = self.ops.k.swiglu_bwd_bf16s;
        self.ops.elementwise((op, f), &args, a.len)
    }
    fn add(&self, x: &mut SBuf, d: &SBuf, len: usize) -> Result<()> {
        let op = "add";
        let args = [("x", self.bf_mut(op, "x", x)?), ("d", self.bf(op, "d", d)?)];
        self.ops.elementwise((op, self.ops.k.add_bf16s), &args, len)
    }
    fn gather_rows(&self, out: &mut SBuf, x: &SBuf, rows: RowIds<Self>) -> Result<()> {
        let op = "gather_rows";
        let args = [self.bf_mut(op, "out", out)?, self.bf(op, "x", x)?];
        let f = self.ops.k.gather_rows_bf16s;
        self.ops.move_rows(f, false, args, (rows.ids, rows.d))
    }
    fn scatter_add_rows(&self, dx: &mut SBuf, dy: &SBuf, at: RowIds<Self>) -> Result<()> {
        let op = "scatter_add_rows";
        let args = [self.bf_mut(op, "dx", dx)?, self.bf(op, "dy", dy)?];
        let f = self.ops.k.scatter_add_rows_bf16s;
        self.ops.move_rows(f, true, args, (at.ids, at.d))
    }
    fn cross_entropy(&self, z: &mut SBuf, loss: &mut SBuf, t: Targets<Self>) -> Result<f64> {
        let op = "cross_entropy";
        let z = self.bf_mut(op, "z", z)?;
        let loss = self.f32_mut(op, "loss", loss)?;
        let w = self.f32(op, "weights", t.weights)?;
        let f = self.ops.k.cross_entropy_bf16s;
        self.ops.cross_entropy_rows(f, (z, loss), (t.ids, w), t.d)
    }
}
