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
//! - the embedding reads the bf16 table into f32 activations (`embedding_bf16_f32`, exact) and
//!   has no backward.
//!
//! [`CudaLoraState`] is the trainer's step state: only the adapters, their gradients and
//! their AdamW moments are f32 (24 bytes per adapter parameter); the update is the full
//! training's `adamw_f32` kernel per factor, clipping folded in as a gradient scale.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use super::*;
use crate::backend::cuda::CudaWeight;
use crate::hf::checkpoint::{expected_tensors, Checkpoint};
use crate::lora::train::LoraGrads;
use crate::lora::{Adapter, ModuleKind};
use crate::train::model::{forward_backward_with, PassOptions};
use cublas::sys::cudaDataType_t;

/// One trained module's factors, gradients and moments (f32, on the device).
struct Module {
    name: String,
    rank: usize,
    scale: f32,
    /// `A` `[r, K]`, `B` `[M, r]`, their gradients and AdamW moments.
    a: Buf,
    b: Buf,
    da: Buf,
    db: Buf,
    ma: Buf,
    mb: Buf,
    va: Buf,
    vb: Buf,
    /// `u = x·Aᵀ` `[N, r]` of the last forward (grown as needed), and whether a backward may
    /// read it.
    u: Buf,
    fresh: bool,
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
        self.be
            .stream()
            .alloc_zeros::<f64>(SUMSQ_BLOCKS)
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
        let (ap, bp, s) = (self.ptr(&md.a), self.ptr(&md.b), md.scale);
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
        let (ap, bp) = (self.ptr(&md.a), self.ptr(&md.b));
        let (dap, dbp) = (self.ptr_mut(&mut md.da), self.ptr_mut(&mut md.db));
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
/// adapters attached, the pass's parameter list (placeholders and f32 norms) and its gradient
/// scratch.
pub struct CudaLoraState {
    pub ops: CudaOps,
    /// The pass's parameters: one-float placeholders for the matrices, f32 norms.
    p: Vec<Buf>,
    /// Their "gradients": placeholders, and scratch for the norms' `dw` (discarded).
    g: Vec<Buf>,
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
        let (mut base, mut p, mut g) = (Vec::new(), Vec::new(), Vec::new());
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
                g.push(ops.zeros(1)?);
            } else {
                let v = ck
                    .read_f32(name)
                    .with_context(|| format!("reading `{name}`"))?;
                base.push(None);
                g.push(ops.zeros(v.len())?);
                p.push(ops.upload(&v)?);
            }
        }
        let mut modules = Vec::new();
        let mut module_of = HashMap::new();
        for (name, md) in &adapter.modules {
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
            let up = |v: &[f32]| ops.upload(v);
            let z = |len: usize| ops.zeros(len);
            let (la, lb) = (md.a.len(), md.b.len());
            module_of.insert(i, modules.len());
            modules.push(Module {
                name: name.clone(),
                rank: md.rank,
                scale: md.scale(adapter.config.use_rslora) as f32,
                a: up(&md.a)?,
                b: up(&md.b)?,
                da: z(la)?,
                db: z(lb)?,
                ma: z(la)?,
                mb: z(lb)?,
                va: z(la)?,
                vb: z(lb)?,
                u: z(1)?,
                fresh: false,
            });
        }
        let lora = CudaLora {
            base,
            by_key,
            module_of,
            modules: RefCell::new(modules),
            scratch: RefCell::new(ops.be.alloc::<bf16>("the LoRA bf16 GEMM scratch", 1)?),
            tmp: RefCell::new(ops.zeros(1)?),
            to_bf16: ops.be.function("f32_to_bf16")?,
            embed: ops.be.function("embedding_bf16_f32")?,
            peak: Cell::new(0),
        };
        ops.lora = Some(Box::new(lora));
        let partial = ops.sumsq_partials()?;
        Ok(CudaLoraState { ops, p, g, partial })
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
        let mods = self.ops.lora_state()?.modules.borrow();
        for md in mods.iter() {
            let Some(h) = into.modules.get_mut(&md.name) else {
                bail!(
                    "download_adapter: the host adapter has no module {}",
                    md.name
                );
            };
            h.a = self.ops.download(&md.a, h.a.len())?;
            h.b = self.ops.download(&md.b, h.b.len())?;
        }
        Ok(())
    }

    /// Copy the device's AdamW moments into `into` (same modules), for a checkpoint; its update
    /// count is the trainer's (`Trainer::opt.t`), not kept here. Compiles; has not run on a GPU.
    pub fn download_moments(&self, into: &mut crate::lora::train::LoraAdamW) -> Result<()> {
        let mods = self.ops.lora_state()?.modules.borrow();
        for md in mods.iter() {
            let (Some((ma, mb)), Some((va, vb))) = (
                into.m.modules.get_mut(&md.name),
                into.v.modules.get_mut(&md.name),
            ) else {
                bail!("download_moments: the host state has no module {}", md.name);
            };
            *ma = self.ops.download(&md.ma, ma.len())?;
            *mb = self.ops.download(&md.mb, mb.len())?;
            *va = self.ops.download(&md.va, va.len())?;
            *vb = self.ops.download(&md.vb, vb.len())?;
        }
        Ok(())
    }

    /// Replace the device's AdamW moments with `from`'s (a resumed run; its update count goes
    /// to the trainer's [`AdamW`]). Compiles; has not run on a GPU.
    pub fn upload_moments(&mut self, from: &crate::lora::train::LoraAdamW) -> Result<()> {
        let l = self.ops.lora_state()?;
        let mut mods = l.modules.borrow_mut();
        for md in mods.iter_mut() {
            let (Some((ma, mb)), Some((va, vb))) =
                (from.m.modules.get(&md.name), from.v.modules.get(&md.name))
            else {
                bail!("upload_moments: the host state has no module {}", md.name);
            };
            self.ops.write(&mut md.ma, ma)?;
            self.ops.write(&mut md.mb, mb)?;
            self.ops.write(&mut md.va, va)?;
            self.ops.write(&mut md.vb, vb)?;
        }
        Ok(())
    }

    /// The accumulated adapter gradients, shaped like `like`'s.
    pub fn grads(&self, like: &Adapter) -> Result<LoraGrads> {
        let mut out = LoraGrads::zeros_like(like);
        let mods = self.ops.lora_state()?.modules.borrow();
        for md in mods.iter() {
            let Some((a, b)) = out.modules.get_mut(&md.name) else {
                bail!("grads: the host adapter has no module {}", md.name);
            };
            *a = self.ops.download(&md.da, a.len())?;
            *b = self.ops.download(&md.db, b.len())?;
        }
        Ok(out)
    }
}

impl super::super::StepState for CudaLoraState {
    fn zero_grad(&mut self) -> Result<()> {
        let l = self.ops.lora_state()?;
        for md in l.modules.borrow_mut().iter_mut() {
            self.ops.zero_fill(&mut md.da)?;
            self.ops.zero_fill(&mut md.db)?;
        }
        Ok(())
    }

    fn forward_backward(&mut self, cfg: &ModelConfig, b: &Batch, o: PassOptions) -> Result<f64> {
        let (p, g) = (&self.p, &mut self.g);
        Ok(forward_backward_with(&self.ops, cfg, o, p, b, g)?.loss)
    }

    /// Data parallel: the adapters' gradients are small, so they go through the host group
    /// (device → host, summed over the ranks, host → device) rather than NCCL. Compiles; has
    /// not run on a GPU.
    fn all_reduce_grads(&mut self, group: &mut super::super::dist::HostGroup) -> Result<()> {
        let l = self.ops.lora_state()?;
        let mut mods = l.modules.borrow_mut();
        for md in mods.iter_mut() {
            for g in [&mut md.da, &mut md.db] {
                let mut h = self.ops.download(g, g.len())?;
                group.all_reduce_f32(&mut h)?;
                self.ops.write(g, &h)?;
            }
        }
        Ok(())
    }

    /// Clip (folded into the update as a gradient scale, as full training on the GPU) and
    /// update every factor with `adamw_f32` (decay on both: they are matrices): AdamW update
    /// number `opt.t + 1` with `opt`'s hyper-parameters (advancing `opt.t`).
    fn clip_and_step(&mut self, opt: &mut AdamW, lr: f64, max_norm: f64) -> Result<f64> {
        let ops = &self.ops;
        let l = ops.lora_state()?;
        let mut mods = l.modules.borrow_mut();
        let mut sq = 0.0f64;
        for md in mods.iter() {
            sq += ops.sumsq(&md.da, md.da.len(), &mut self.partial)?;
            sq += ops.sumsq(&md.db, md.db.len(), &mut self.partial)?;
        }
        let norm = sq.sqrt();
        let gscale = clip_scale(norm, max_norm);
        let h = AdamWScalars::new(&opt.cfg, opt.t + 1, lr, gscale);
        let decay = AdamWScalars::decay(&opt.cfg, lr, &[1, 1]);
        for md in mods.iter_mut() {
            let Module {
                a,
                b,
                da,
                db,
                ma,
                mb,
                va,
                vb,
                ..
            } = md;
            let (la, lb) = (a.len(), b.len());
            ops.adamw((a, None), (ma, va), da, 0..la, &h, decay)?;
            ops.adamw((b, None), (mb, vb), db, 0..lb, &h, decay)?;
        }
        opt.t += 1;
        Ok(norm)
    }
}
