//! LoRA training on one GPU, the device twin of [`crate::train::lora`]: the model's one pass
//! ([`crate::train::model::forward_backward_with`]) over [`CudaOps`] with a [`CudaLora`] set,
//! which makes every linear of the pass a LoRA linear over a **frozen bf16 base**:
//!
//! - the base weights are uploaded once as bf16 ([`crate::backend::cuda::CudaWeight`], straight
//!   from the checkpoint's tensors; never held in f32 on the device). The pass's parameter list
//!   holds a one-float placeholder for each matrix; the linears recognise the base weight by
//!   the placeholder's address (as the host's [`crate::train::lora::LoraLinear`] does by
//!   buffer). The norms' 1-D weights stay f32 (they are tiny);
//! - base GEMMs: the f32 input (`x`, or `dy` in the backward) is rounded to bf16 into one
//!   reused scratch buffer (`f32_to_bf16`, RNE), then `cublasGemmEx` with bf16 A/B, f32 C and
//!   f32 accumulation: `y = x·Wᵀ`, `dx = dy·W`. No base-weight gradient is computed;
//! - a targeted linear adds `s·(x·Aᵀ)·Bᵀ` in f32 (the adapter GEMMs run in the ops' precision),
//!   keeps `u = x·Aᵀ` `[N, r]` for its backward, and accumulates `dB += s·dyᵀ·u`,
//!   `dA += s·(dy·B)ᵀ·x`, `dx += s·(dy·B)·A`: [`crate::lora::train::lora_linear_bwd`]'s math;
//! - the embedding reads the bf16 table into f32 activations (`embedding_bf16_f32`, exact);
//! - the pass runs with the base frozen ([`PassOptions::frozen_base`]): no embedding, norm or
//!   linear weight gradient is computed.
//!
//! [`CudaLoraState`] is the trainer's step state: only the adapters, their gradients and
//! their AdamW moments are f32 (24 bytes per adapter parameter), each kind one flat buffer
//! ([`Flat`]); a step reads its gradient norm back once (one partial-sum slot per factor) and
//! the update is one launch of the full training's `adamw_f32` kernel over the flat buffers,
//! clipping folded in as a gradient scale.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ops::Range;

use super::*;
use crate::backend::cuda::CudaWeight;
use crate::hf::checkpoint::{expected_tensors, Checkpoint};
use crate::lora::train::LoraGrads;
use crate::lora::{Adapter, ModuleKind};
use crate::train::model::{forward_backward_with, PassOptions};
use cublas::sys::cudaDataType_t;

/// One trained module: where its factors lie in the [`Flat`] buffers, and its kept `u`.
struct Module {
    name: String,
    rank: usize,
    scale: f32,
    /// `A` `[r, K]` and `B` `[M, r]`: their elements in each of the [`Flat`] buffers (factors,
    /// gradients and moments alike).
    a: Range<usize>,
    b: Range<usize>,
    /// `u = x·Aᵀ` `[N, r]` of the last forward (grown as needed), and whether a backward may
    /// read it.
    u: Buf,
    fresh: bool,
}

/// Every module's factors, gradients and AdamW moments (f32, on the device), each kind one flat
/// buffer of `len` elements: the modules in order, `A` then `B` of each ([`Module::a`],
/// [`Module::b`]), each factor starting at a multiple of [`FLAT_ALIGN`] elements (the 256-byte
/// alignment of a buffer of its own, so cuBLAS sees the operands it saw before; the gaps are
/// zeros, which AdamW keeps zero). A step zeroes, all-reduces and updates each with one call.
struct Flat {
    len: usize,
    p: Buf,
    g: Buf,
    m: Buf,
    v: Buf,
}

/// Elements (f32) each factor's place in a [`Flat`] buffer is aligned to: 256 bytes.
const FLAT_ALIGN: usize = 64;

/// `n` rounded up to a multiple of [`FLAT_ALIGN`].
fn align(n: usize) -> usize {
    n.div_ceil(FLAT_ALIGN) * FLAT_ALIGN
}

/// The places of factors of `lens` (`A`, `B` elements per module, in order) in a [`Flat`]
/// buffer, and its length: each factor at the next multiple of [`FLAT_ALIGN`].
fn flat_layout(lens: &[(usize, usize)]) -> (Vec<[Range<usize>; 2]>, usize) {
    let mut len = 0;
    let places = lens
        .iter()
        .map(|&(la, lb)| {
            let a = len..len + la;
            let b = align(a.end)..align(a.end) + lb;
            len = align(b.end);
            [a, b]
        })
        .collect();
    (places, len)
}

impl Flat {
    /// `modules`' host tensors (`part(name)`: `A` and `B` of a module, `None` when the host has
    /// no such module) in the flat layout: one host vector of `len` elements. `what` names the
    /// host side in errors.
    fn gather<'h>(
        mods: &[Module],
        len: usize,
        what: &str,
        part: impl Fn(&str) -> Option<(&'h [f32], &'h [f32])>,
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; len];
        for md in mods {
            let Some((a, b)) = part(&md.name) else {
                bail!("{what} has no LoRA module {}", md.name);
            };
            for (r, h, f) in [(&md.a, a, "A"), (&md.b, b, "B")] {
                ensure!(
                    h.len() == r.len(),
                    "{what}: LoRA module {} has {} elements of {f}, the device {}",
                    md.name,
                    h.len(),
                    r.len()
                );
                out[r.clone()].copy_from_slice(h);
            }
        }
        Ok(out)
    }

    /// Each module's name, `A` and `B` in `flat`, a downloaded flat buffer.
    fn split<'a>(
        mods: &'a [Module],
        flat: &'a [f32],
    ) -> impl Iterator<Item = (&'a str, &'a [f32], &'a [f32])> {
        mods.iter()
            .map(move |md| (md.name.as_str(), &flat[md.a.clone()], &flat[md.b.clone()]))
    }
}

/// The frozen bf16 base and the trained adapters of a LoRA run ([`CudaOps`]'s `lora`).
pub(crate) struct CudaLora {
    /// The base matrices, by parameter index (`None`: a 1-D norm, kept f32 in the pass).
    base: Vec<Option<CudaWeight>>,
    /// Placeholder address → parameter index.
    by_key: HashMap<u64, usize>,
    /// Parameter index → index into `modules`.
    module_of: HashMap<usize, usize>,
    modules: RefCell<Vec<Module>>,
    flat: RefCell<Flat>,
    /// The bf16 copy of a base GEMM's f32 input, reused (grown, never shrunk).
    scratch: RefCell<CudaSlice<bf16>>,
    /// `dy·B` `[N, r]`, reused.
    tmp: RefCell<Buf>,
    to_bf16: dsys::CUfunction,
    embed: dsys::CUfunction,
    /// The most device memory seen in use (`cuMemGetInfo` total − free, the whole device),
    /// sampled at every linear's backward: all kept activations are alive then.
    peak: Cell<usize>,
}

/// `buf` holds at least `len` elements (reallocated, contents lost, when it does not).
fn ensure_len<T>(ops: &CudaOps, buf: &mut CudaSlice<T>, len: usize, what: &str) -> Result<()>
where
    T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits,
{
    if buf.len() < len {
        *buf = ops.be.alloc::<T>(what, len)?;
    }
    Ok(())
}

/// The address of element `r.start` of the f32 buffer at address `base`.
fn at(base: u64, r: &Range<usize>) -> u64 {
    base + 4 * r.start as u64
}

/// The gradient scale of PyTorch's `clip_grad_norm_` at global norm `norm` (1 when `max_norm`
/// is 0 or not exceeded), folded into the AdamW update.
pub(super) fn clip_scale(norm: f64, max_norm: f64) -> f32 {
    let coef = max_norm / (norm + 1e-6);
    if max_norm > 0.0 && coef < 1.0 {
        coef as f32
    } else {
        1.0
    }
}

/// The shape of one LoRA GEMM: the op's name, whether A and B are transposed, `[m, n, k]`.
struct GemmShape<'a> {
    op: &'a str,
    t: [bool; 2],
    mnk: [usize; 3],
}

impl GemmShape<'_> {
    fn new(op: &str, t: [bool; 2], mnk: [usize; 3]) -> GemmShape<'_> {
        GemmShape { op, t, mnk }
    }
}

impl CudaOps {
    /// An f32 GEMM of the adapters in the ops' precision: column-major
    /// `C = alpha·op(A)·op(B) + beta·C` ([`Gemm`]), operands as (address, leading dimension).
    fn adapter_gemm(
        &self,
        f: GemmShape<'_>,
        (a, lda): (u64, usize),
        (b, ldb): (u64, usize),
        (c, ldc): (u64, usize),
        [alpha, beta]: [f32; 2],
    ) -> Result<()> {
        let ([ta, tb], [m, n, k]) = (f.t, f.mnk);
        let g = Gemm {
            ta,
            tb,
            m,
            n,
            k,
            a,
            lda,
            b,
            ldb,
            c,
            ldc,
            alpha,
            beta,
            ..Gemm::F32
        };
        self.gemm(f.op, g)
    }

    /// The partial sums of [`CudaOps::sumsq`] (`SUMSQ_BLOCKS` f64).
    pub(super) fn sumsq_partials(&self) -> Result<CudaSlice<f64>> {
        self.sumsq_slots(1)
    }

    /// Partial sums for `slots` norms queued at once ([`CudaOps::sumsq_queue`]).
    pub(super) fn sumsq_slots(&self, slots: usize) -> Result<CudaSlice<f64>> {
        self.be
            .stream()
            .alloc_zeros::<f64>(slots.max(1) * SUMSQ_BLOCKS)
            .map_err(|e| driver_err("allocating the gradient-norm partials".into(), e))
    }

    fn lora_state(&self) -> Result<&CudaLora> {
        self.lora
            .as_deref()
            .ok_or_else(|| anyhow!("LoRA training: no adapter is attached to the GPU ops"))
    }

    /// The bf16 base weight behind the placeholder `w`, checked to be `[m, k]`.
    fn lora_base(&self, op: &str, w: &Buf, m: usize, k: usize) -> Result<(&CudaWeight, usize)> {
        let l = self.lora_state()?;
        let i = *l.by_key.get(&self.ptr(w)).ok_or_else(|| {
            anyhow!("{op}: `w` is not a base weight of this LoRA run (its placeholder is unknown)")
        })?;
        let bw = l.base[i]
            .as_ref()
            .ok_or_else(|| anyhow!("{op}: parameter {i} is a norm, not a matrix"))?;
        ensure!(
            bw.rows == m && bw.cols == k,
            "{op}: base weight `{}` is [{}, {}], expected [{m}, {k}]",
            bw.name,
            bw.rows,
            bw.cols
        );
        Ok((bw, i))
    }

    /// The LoRA state and the index of the module adapting parameter `i` (`None`: not a
    /// target).
    fn lora_module(&self, i: usize) -> Result<(&CudaLora, Option<usize>)> {
        let l = self.lora_state()?;
        Ok((l, l.module_of.get(&i).copied()))
    }

    /// A frozen-base GEMM, column-major `C (f32) = op(W)·src_bf16 + beta·C` ([`Gemm`]): `w` the
    /// bf16 base (address, leading dimension), `src` the f32 operand (rounded to bf16 into the
    /// scratch first; its leading dimension), `c` the f32 output.
    fn base_gemm(
        &self,
        f: GemmShape<'_>,
        (w, ldw): (u64, usize),
        (src, ldb): (&Buf, usize),
        (c, ldc): (u64, usize),
        beta: f32,
    ) -> Result<()> {
        let (op, [ta, tb], [m, n, k]) = (f.op, f.t, f.mnk);
        let len = ldb * n;
        check_len(op, "src", src.len(), len)?;
        let l = self.lora_state()?;
        let mut scratch = l.scratch.borrow_mut();
        ensure_len(self, &mut scratch, len, "the LoRA bf16 GEMM scratch")?;
        let (sp, xp) = (self.ptr_mut(&mut *scratch), self.ptr(src));
        let cnt = len as i64;
        launch!(self, op, l.to_bf16, Geom::new((stride_grid(len), 1, 1), 256, 0); sp, xp, cnt)?;
        Gemm {
            ta,
            tb,
            m,
            n,
            k,
            a: w,
            lda: ldw,
            b: sp,
            ldb,
            beta,
            c,
            ldc,
            data: cudaDataType_t::CUDA_R_16BF,
            c_data: Some(cudaDataType_t::CUDA_R_32F),
            compute: cublas::sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ..Gemm::F32
        }
        .run(op, self.be.blas_handle())
        .with_context(|| format!("{op}: bf16 base GEMM"))
    }

    /// [`TrainOps::embedding`] from the frozen bf16 table.
    /// The caller checked `out` and `c > 0`.
    pub(super) fn lora_embedding(&self, o: &mut Buf, wte: &Buf, ids: RowIds<Self>) -> Result<()> {
        let (Rows { n, c }, op) = (ids.d, "embedding (LoRA, bf16 table)");
        check_len(op, "out", o.len(), n * c)?;
        ensure!(c > 0, "{op}: C must be positive");
        let l = self.lora_state()?;
        let i = *l
            .by_key
            .get(&self.ptr(wte))
            .ok_or_else(|| anyhow!("{op}: `wte` is not the run's embedding placeholder"))?;
        let t = l.base[i]
            .as_ref()
            .ok_or_else(|| anyhow!("{op}: parameter {i} is not a matrix"))?;
        ensure!(
            t.cols == c,
            "{op}: the table has {} columns, C = {c}",
            t.cols
        );
        check_ints(op, "ids", ids.ids, n, t.rows, "the embedding rows")?;
        if n == 0 {
            return Ok(());
        }
        let (o, w, ip) = (self.ptr_mut(o), self.ptr(&t.buf), self.ptr(ids.ids));
        let (n_, c_) = (int(op, "n", n)?, int(op, "c", c)?);
        launch!(self, op, l.embed, Geom::new((n as u32, 1, 1), 256, 0); o, w, ip, n_, c_)
    }

    /// [`TrainOps::linear`] of a LoRA run: the bf16 base, plus the adapter's term when the
    /// weight is targeted (keeping `u`).
    pub(super) fn lora_linear(&self, y: &mut Buf, x: &Buf, w: &Buf, d: MatMul) -> Result<()> {
        let op = "linear (LoRA)";
        let MatMul { n, k, m } = d;
        check_len(op, "y", y.len(), n * m)?;
        check_len(op, "x", x.len(), n * k)?;
        let (bw, i) = self.lora_base(op, w, m, k)?;
        if n == 0 || m == 0 {
            return Ok(());
        }
        let (yp, xp) = (self.ptr_mut(y), self.ptr(x));
        // yᵀ (M×N) = W (stored [M, K] = col-major K×M, transposed) · xᵀ (K×N).
        let f = GemmShape::new(op, [true, false], [m, n, k]);
        self.base_gemm(f, (self.ptr(&bw.buf), k), (x, k), (yp, m), 0.0)?;
        let (l, Some(j)) = self.lora_module(i)? else {
            return Ok(());
        };
        let mut mods = l.modules.borrow_mut();
        let md = &mut mods[j];
        let r = md.rank;
        ensure_len(self, &mut md.u, n * r, "the LoRA `u` buffer")?;
        md.fresh = true;
        let up = self.ptr_mut(&mut md.u);
        let pp = self.ptr(&l.flat.borrow().p);
        let (ap, bp, s) = (at(pp, &md.a), at(pp, &md.b), md.scale);
        // uᵀ (r×N) = A (stored [r, K], transposed) · xᵀ.
        let f = GemmShape::new(op, [true, false], [r, n, k]);
        self.adapter_gemm(f, (ap, k), (xp, k), (up, r), [1.0, 0.0])?;
        // yᵀ += s·B (stored [M, r], transposed) · uᵀ.
        let f = GemmShape::new(op, [true, false], [m, n, r]);
        self.adapter_gemm(f, (bp, r), (up, r), (yp, m), [s, 1.0])
    }

    /// [`TrainOps::linear_bwd`] of a LoRA run: `dx` through the frozen bf16 base (written, or
    /// added when `acc`), plus the adapter's `dx` term and its `dA`, `dB` when targeted. The
    /// base weight gets no gradient.
    pub(super) fn lora_linear_bwd(&self, dx: Dx<Self>, a: LinearGrad<Self>) -> Result<()> {
        let (op, (dx, acc)) = ("linear_bwd (LoRA)", dx.split());
        let LinearGrad { dy, x, w, d } = a;
        let MatMul { n, k, m } = d;
        check_len(op, "dy", dy.len(), n * m)?;
        check_len(op, "x", x.len(), n * k)?;
        let (bw, i) = self.lora_base(op, w, m, k)?;
        if let Ok((free, total)) = self.be.mem_info() {
            let l = self.lora_state()?;
            l.peak.set(l.peak.get().max(total.saturating_sub(free)));
        }
        let dxp = match dx {
            Some(dx) => {
                check_len(op, "dx", dx.len(), n * k)?;
                Some(self.ptr_mut(dx))
            }
            None => None,
        };
        if n == 0 || k == 0 {
            return Ok(());
        }
        // (M = 0: cuBLAS with an empty inner dimension writes beta·C, so `dx` is still set.)
        if let Some(dxp) = dxp {
            // dxᵀ (K×N) = Wᵀ (col-major K×M, as stored) · dyᵀ (M×N).
            let f = GemmShape::new(op, [false, false], [k, n, m]);
            let beta = if acc { 1.0 } else { 0.0 };
            self.base_gemm(f, (self.ptr(&bw.buf), k), (dy, m), (dxp, k), beta)?;
        }
        let (l, Some(j)) = self.lora_module(i)? else {
            return Ok(());
        };
        let mut mods = l.modules.borrow_mut();
        let md = &mut mods[j];
        ensure!(md.fresh, "LoRA backward of {} without its forward", md.name);
        md.fresh = false;
        let (r, s) = (md.rank, md.scale);
        let mut tmp = l.tmp.borrow_mut();
        ensure_len(self, &mut tmp, n * r, "the LoRA `dy·B` buffer")?;
        let (dyp, xp, up, ep) = (
            self.ptr(dy),
            self.ptr(x),
            self.ptr(&md.u),
            self.ptr_mut(&mut *tmp),
        );
        let mut fl = l.flat.borrow_mut();
        let (pp, gp) = (self.ptr(&fl.p), self.ptr_mut(&mut fl.g));
        let (ap, bp) = (at(pp, &md.a), at(pp, &md.b));
        let (dap, dbp) = (at(gp, &md.a), at(gp, &md.b));
        // dBᵀ (r×M) += s·uᵀ (col-major r×N, as stored) · dy (N×M, the stored M×N transposed).
        let f = GemmShape::new(op, [false, true], [r, m, n]);
        self.adapter_gemm(f, (up, r), (dyp, m), (dbp, r), [s, 1.0])?;
        // eᵀ (r×N) = Bᵀ (col-major r×M, as stored) · dyᵀ: e = dy·B.
        let f = GemmShape::new(op, [false, false], [r, n, m]);
        self.adapter_gemm(f, (bp, r), (dyp, m), (ep, r), [1.0, 0.0])?;
        // dAᵀ (K×r) += s·xᵀ (col-major K×N) · e (N×r, the stored r×N transposed).
        let f = GemmShape::new(op, [false, true], [k, r, n]);
        self.adapter_gemm(f, (xp, k), (ep, r), (dap, k), [s, 1.0])?;
        if let Some(dxp) = dxp {
            // dxᵀ (K×N) += s·Aᵀ (col-major K×r, as stored) · eᵀ (r×N).
            let f = GemmShape::new(op, [false, false], [k, n, r]);
            self.adapter_gemm(f, (ap, k), (ep, r), (dxp, k), [s, 1.0])?;
        }
        Ok(())
    }
}

/// A LoRA run's step state on one GPU (module docs): the ops with the frozen bf16 base and the
/// adapters attached, and the pass's parameter list (placeholders and f32 norms; the pass runs
/// with the base frozen, [`PassOptions::frozen_base`], so the base has no gradient buffers).
pub struct CudaLoraState {
    pub ops: CudaOps,
    /// The pass's parameters: one-float placeholders for the matrices, f32 norms.
    p: Vec<Buf>,
    partial: CudaSlice<f64>,
}

impl CudaLoraState {
    /// Upload the base model of `ck` (matrices as bf16, norms as f32) and `adapter`'s factors
    /// (f32, with zero gradients and moments) onto `ops`' device. The AdamW hyper-parameters
    /// and update count are the trainer's ([`AdamW`], handed to every step).
    pub fn new(
        mut ops: CudaOps,
        cfg: &ModelConfig,
        ck: &Checkpoint,
        adapter: &Adapter,
    ) -> Result<CudaLoraState> {
        let tensors = expected_tensors(cfg);
        let (mut base, mut p) = (Vec::new(), Vec::new());
        let mut by_key = HashMap::new();
        for (i, (name, shape)) in tensors.iter().enumerate() {
            let src = ck.get(name)?;
            ensure!(
                src.shape() == shape.as_slice(),
                "tensor `{name}` has shape {:?}, the config implies {shape:?}",
                src.shape()
            );
            if shape.len() == 2 {
                let w = ops
                    .be
                    .upload_weight(std::slice::from_ref(src))
                    .with_context(|| format!("uploading `{name}` as bf16"))?;
                base.push(Some(w));
                let ph = ops.zeros(1)?;
                by_key.insert(ops.ptr(&ph), i);
                p.push(ph);
            } else {
                let v = ck
                    .read_f32(name)
                    .with_context(|| format!("reading `{name}`"))?;
                base.push(None);
                p.push(ops.upload(&v)?);
            }
        }
        let (mut modules, mut module_of) = (Vec::new(), HashMap::new());
        let lens: Vec<(usize, usize)> = adapter
            .modules
            .values()
            .map(|m| (m.a.len(), m.b.len()))
            .collect();
        let (places, len) = flat_layout(&lens);
        for ((name, md), [a, b]) in adapter.modules.iter().zip(places) {
            ensure!(
                md.kind == ModuleKind::Linear,
                "LoRA training: module {name} is an embedding; only linears are trained"
            );
            let wname = format!("{name}.weight");
            let Some(i) = tensors.iter().position(|(n, _)| *n == wname) else {
                bail!("LoRA training: the model has no weight {wname}");
            };
            ensure!(
                tensors[i].1.as_slice() == md.base_shape.as_slice(),
                "LoRA training: {name} does not match the model's weight shape"
            );
            module_of.insert(i, modules.len());
            modules.push(Module {
                name: name.clone(),
                rank: md.rank,
                scale: md.scale(adapter.config.use_rslora) as f32,
                a,
                b,
                u: ops.zeros(1)?,
                fresh: false,
            });
        }
        let host = Flat::gather(&modules, len, "the adapter", |n| {
            let md = adapter.modules.get(n)?;
            Some((&md.a[..], &md.b[..]))
        })?;
        // (At least one element: no zero-length device buffers.)
        let z = || ops.zeros(len.max(1));
        let mut factors = z()?;
        ops.write(&mut factors, &host)?;
        let flat = Flat {
            len,
            p: factors,
            g: z()?,
            m: z()?,
            v: z()?,
        };
        // One slot of norm partial sums per factor ([`CudaOps::sumsq_queue`]).
        let partial = ops.sumsq_slots(2 * modules.len())?;
        let lora = CudaLora {
            base,
            by_key,
            module_of,
            modules: RefCell::new(modules),
            flat: RefCell::new(flat),
            scratch: RefCell::new(ops.be.alloc::<bf16>("the LoRA bf16 GEMM scratch", 1)?),
            tmp: RefCell::new(ops.zeros(1)?),
            to_bf16: ops.be.function("f32_to_bf16")?,
            embed: ops.be.function("embedding_bf16_f32")?,
            peak: Cell::new(0),
        };
        ops.lora = Some(Box::new(lora));
        Ok(CudaLoraState { ops, p, partial })
    }

    /// The pass's parameter list ([`Params`]' order): one-float placeholders standing for the
    /// bf16 matrices (what [`TrainOps::linear`] and [`TrainOps::embedding`] take as the weight
    /// on these ops), the norms in f32.
    pub fn params(&self) -> &[Buf] {
        &self.p
    }

    /// Bytes of the frozen base on the device (bf16 matrices + f32 norms).
    pub fn base_bytes(&self) -> Result<usize> {
        let l = self.ops.lora_state()?;
        let mats: usize = l.base.iter().flatten().map(|w| 2 * w.numel()).sum();
        let norms: usize = (l.base.iter().zip(&self.p))
            .filter(|(b, _)| b.is_none())
            .map(|(_, p)| 4 * p.len())
            .sum();
        Ok(mats + norms)
    }

    /// The most device memory seen in use so far (bytes; `cuMemGetInfo` total − free, sampled
    /// in every linear's backward, so the whole device: other processes and the CUDA context
    /// included).
    pub fn peak_bytes(&self) -> Result<usize> {
        Ok(self.ops.lora_state()?.peak.get())
    }

    /// Copy the device's factors into `into` (same modules).
    pub fn download_adapter(&self, into: &mut Adapter) -> Result<()> {
        let flat = self.download_flat(|f| &f.p)?;
        let mods = self.ops.lora_state()?.modules.borrow();
        for (name, a, b) in Flat::split(&mods, &flat) {
            let Some(h) = into.modules.get_mut(name) else {
                bail!("download_adapter: the host adapter has no module {name}");
            };
            (h.a, h.b) = (a.to_vec(), b.to_vec());
        }
        Ok(())
    }

    /// One of the [`Flat`] buffers, downloaded whole.
    fn download_flat(&self, which: impl Fn(&Flat) -> &Buf) -> Result<Vec<f32>> {
        let fl = self.ops.lora_state()?.flat.borrow();
        self.ops.download(which(&fl), fl.len)
    }

    /// One of the [`Flat`] buffers into `host`'s modules (the same; `what` names the call in
    /// errors).
    fn download_into(
        &self,
        which: impl Fn(&Flat) -> &Buf,
        host: &mut LoraGrads,
        what: &str,
    ) -> Result<()> {
        let flat = self.download_flat(which)?;
        let mods = self.ops.lora_state()?.modules.borrow();
        for (name, a, b) in Flat::split(&mods, &flat) {
            let Some(h) = host.modules.get_mut(name) else {
                bail!("{what}: the host state has no module {name}");
            };
            (h.0, h.1) = (a.to_vec(), b.to_vec());
        }
        Ok(())
    }

    /// Copy the device's AdamW moments into `into` (same modules), for a checkpoint; its update
    /// count is the trainer's (`Trainer::opt.t`), not kept here. Compiles; has not run on a GPU.
    pub fn download_moments(&self, into: &mut crate::lora::train::LoraAdamW) -> Result<()> {
        self.download_into(|f| &f.m, &mut into.m, "download_moments")?;
        self.download_into(|f| &f.v, &mut into.v, "download_moments")
    }

    /// Replace the device's AdamW moments with `from`'s (a resumed run; its update count goes
    /// to the trainer's [`AdamW`]). Compiles; has not run on a GPU.
    pub fn upload_moments(&mut self, from: &crate::lora::train::LoraAdamW) -> Result<()> {
        let l = self.ops.lora_state()?;
        let mods = l.modules.borrow();
        let mut fl = l.flat.borrow_mut();
        let host = |g: &crate::lora::train::LoraGrads| {
            Flat::gather(&mods, fl.len, "upload_moments: the host state", |n| {
                let (a, b) = g.modules.get(n)?;
                Some((&a[..], &b[..]))
            })
        };
        let (m, v) = (host(&from.m)?, host(&from.v)?);
        self.ops.write(&mut fl.m, &m)?;
        self.ops.write(&mut fl.v, &v)
    }

    /// The accumulated adapter gradients, shaped like `like`'s.
    pub fn grads(&self, like: &Adapter) -> Result<LoraGrads> {
        let mut out = LoraGrads::zeros_like(like);
        self.download_into(|f| &f.g, &mut out, "grads")?;
        Ok(out)
    }
}

impl super::super::StepState for CudaLoraState {
    fn zero_grad(&mut self) -> Result<()> {
        let l = self.ops.lora_state()?;
        self.ops.zero_fill(&mut l.flat.borrow_mut().g)
    }

    fn forward_backward(&mut self, cfg: &ModelConfig, b: &Batch, o: PassOptions) -> Result<f64> {
        // The base is frozen: no weight-gradient work, no gradient buffers for it.
        Ok(forward_backward_with(&self.ops, cfg, o.frozen(), &self.p, b, &mut [])?.loss)
    }

    /// Data parallel: the adapters' gradients are small, so they go through the host group
    /// rather than NCCL: the one flat gradient buffer device → host, summed over the ranks (one
    /// all-reduce; element-wise, so the sums are those of a per-tensor all-reduce), host →
    /// device. Compiles; has not run on a GPU.
    fn all_reduce_grads(&mut self, group: &mut super::super::dist::HostGroup) -> Result<()> {
        let l = self.ops.lora_state()?;
        let mut fl = l.flat.borrow_mut();
        let mut h = self.ops.download(&fl.g, fl.len)?;
        group.all_reduce_f32(&mut h)?;
        self.ops.write(&mut fl.g, &h)
    }

    /// Clip (folded into the update as a gradient scale, as full training on the GPU) and
    /// update every factor with `adamw_f32` (decay on both: they are matrices): AdamW update
    /// number `opt.t + 1` with `opt`'s hyper-parameters (advancing `opt.t`).
    ///
    /// The norm: one `sumsq_f32` per factor into its own slot of one partial buffer, one
    /// read-back, then each factor's partials summed in order and the factors' sums added in
    /// module order (`A` then `B`): the summation order of one read-back per factor. The
    /// update: one `adamw_f32` over the flat buffers (element-wise, every factor decayed).
    fn clip_and_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let ops = &self.ops;
        let l = ops.lora_state()?;
        let mods = l.modules.borrow();
        let mut fl = l.flat.borrow_mut();
        let ranges = mods.iter().flat_map(|md| [&md.a, &md.b]);
        for (slot, r) in ranges.enumerate() {
            ops.sumsq_queue(&fl.g, r.start, r.len(), &mut self.partial, slot)?;
        }
        let sums = ops.sumsq_read(&self.partial, 2 * mods.len())?;
        let mut sq = 0.0f64;
        for x in sums {
            sq += x;
        }
        let norm = sq.sqrt();
        let gscale = clip_scale(norm, max_norm);
        let h = AdamWScalars::new(&opt.cfg, opt.t + 1, lr, gscale);
        let decay = AdamWScalars::decay(&opt.cfg, lr, &[1, 1]);
        let Flat { len, p, g, m, v } = &mut *fl;
        ops.adamw((p, None), (m, v), g, 0..*len, &h, decay)?;
        opt.t += 1;
        Ok(norm)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every factor in its own aligned place, in order, none overlapping, all inside the
    /// buffer.
    #[test]
    fn flat_layout_aligns_every_factor_without_overlap() {
        let lens = [(4 * 96, 256 * 4), (1, 1), (64, 63), (0, 5)];
        let (places, len) = flat_layout(&lens);
        assert_eq!(places.len(), lens.len());
        let mut end = 0;
        for ([a, b], &(la, lb)) in places.iter().zip(&lens) {
            assert_eq!((a.len(), b.len()), (la, lb));
            for r in [a, b] {
                assert_eq!(r.start % FLAT_ALIGN, 0, "{r:?} unaligned");
                assert!(r.start >= end, "{r:?} overlaps the factor before");
                end = r.end;
            }
        }
        assert!(
            end <= len && len % FLAT_ALIGN == 0,
            "length {len}, last end {end}"
        );
        assert_eq!(places[0], [0..384, 384..1408]);
        assert_eq!(places[1], [1408..1409, 1472..1473]);
        assert_eq!(flat_layout(&[]), (Vec::new(), 0));
    }
}
