//! CUDA backend: the hand-written kernels of `kernels/*.cu` (contract: `kernels/ABI.md`) plus
//! cuBLAS for the GEMMs, driven through cudarc's driver API.
//!
//! - Storage and compute dtype is always bf16 ([`Backend::compute_dtype`]); f32/f16 checkpoints are
//!   converted on upload (RNE, by the `convert` kernels), random and constant weights are generated
//!   on the device by the `init` kernels with the same formula as [`WeightSource::read_range`].
//! - Everything runs on one non-default stream (capturable into a CUDA graph, see
//!   [`CudaBackend::capture`]); cudarc's per-buffer event tracking is disabled (single stream).
//! - Every launcher validates its buffers' lengths and sizes and returns an error naming the op
//!   and the argument; kernels only hold bounds guards.
//! - Kernel launches are asynchronous: a fault inside a kernel surfaces at the next
//!   [`Backend::synchronize`] or read-back.
//!
//! Construction never panics on a machine without CUDA: the driver and cuBLAS libraries are
//! probed before the first call into them (cudarc panics on a missing library).
//!
//! Files: `launch` (the launch convention and argument checks, shared with training; the
//! `kernel_table!` that declares each kernel's handle and symbol once, for inference and
//! training), `device` (context, stream, modules, memory), `ints` ([`DevInts`], the int buffer
//! of inference and training, which carries the values the host wrote, and `check_ints`, the
//! one bounds check of ids, rows and positions before a launch), `weights` (weight upload),
//! `gemm` (the one cuBLAS wrapper, shared with training), `graph` (CUDA graphs, timers,
//! profiling), `attention` (geometry, split-KV, the route between the kernels, kv_store), `head`
//! (select, log_prob, top-k), `fused` (the RoPE input checks); the short row-wise ops (embedding, norms, add, rope, swiglu, gather),
//! `rope_kv_store` and `attend` (both attention ops) are launched directly in the [`Backend`]
//! impl below, each a signature, its checks and one `launch!`.

use std::cell::RefCell;
use std::ffi::{c_void, CString};
use std::sync::Arc;

use anyhow::{anyhow, bail, ensure, Context, Result};
use cudarc::cublas::{self, CudaBlas};
use cudarc::driver::{
    result as dres, sys as dsys, CudaContext, CudaEvent, CudaGraph, CudaSlice, CudaStream,
    DevicePtr, DevicePtrMut, DriverError,
};
use half::bf16;

use super::{attention_name, AttnShape, Backend, CachedAttnShape, DeviceError, GraphExec, OpClass};
use super::{CommitIn, Gather, HeadDims, Kv, LogProb, MatMul, Norm, Rope, Rows, SelectIo, StepIn};
use crate::backend::commit::CommitShape;
use crate::backend::head::{Remasking, SelectParams};
use crate::backend::step::StepShape;
use crate::hf::checkpoint::WeightSource;
use crate::hf::dtype::DType;

#[macro_use]
mod launch;
mod attention;
mod attention_fa2;
mod device;
pub mod fp8;
mod fused;
mod gemm;
mod graph;
mod head;
mod ints;
pub mod lt;
mod weights;

use attention::*;
pub use attention::{
    attn_split_chunk, ATTN_HEAD_DIMS, ATTN_SCRATCH, ATTN_SPLIT_CHUNK, ATTN_SPLIT_MIN_KEYS,
};
use attention_fa2::Fa2Kernels;
pub use attention_fa2::{fa2_chunk, fa2_plan, AttnImpl, Fa2Plan, Fa2Split, ATTN_ENV};
use device::*;
pub use device::{
    device_count, driver_present, driver_version, KERNELS, KERNELS_BUILT, NO_KERNELS_MSG,
};
pub(crate) use gemm::Gemm;
use graph::*;
pub use graph::{Graph, Timer};
pub(crate) use ints::check_ints;
pub(crate) use ints::DevBuf;
pub use ints::DevInts;
use launch::*;
pub(crate) use launch::{
    check_dyn_smem, check_len, check_lens, driver_err, grid_yz, int, kernel_table, launch,
    stride_blocks, Geom, GRID_YZ_MAX,
};
pub use weights::CudaWeight;

/// Buffer types of the [`Backend`] impl, named for the launchers outside it.
type Act = CudaSlice<bf16>;
type Ints = DevInts;
type F32s = CudaSlice<f32>;

kernel_table!(
    /// Function handles of every kernel in the ABI.
    Kernels {
        embedding: "embedding_bf16",
        rms_norm: "rms_norm_bf16",
        add_rms_norm: "add_rms_norm_bf16",
        add: "add_bf16",
        rope: "rope_bf16",
        attention: "attention_fwd_bf16",
        attention_cached: "attention_cached_fwd_bf16",
        attention_split: "attention_split_bf16",
        attention_combine: "attention_combine_bf16",
        kv_store: "kv_store_bf16",
        swiglu: "swiglu_bf16",
        gather_rows: "gather_rows_bf16",
        head_select: "head_select_bf16",
        head_select_step: "head_select_step_bf16",
        step_advance: "step_advance_i32",
        topk_select: "topk_select_f32",
        threshold_select: "threshold_select_f32",
        commit_select: "commit_select_f32",
        rope_kv_store: "rope_kv_store_bf16",
        fill_random: "fill_random_bf16",
        fill_const: "fill_const_bf16",
        f32_to_bf16: "f32_to_bf16",
        f16_to_bf16: "f16_to_bf16",
    }
);

pub struct CudaBackend {
    // Field order is drop order: handles before the modules, modules before the context.
    /// FP8 GEMM state (cuBLASLt handle, activation scratch), created on the first FP8 weight.
    pub(crate) fp8: fp8::Fp8State,
    /// The bf16 cuBLASLt GEMM state when `LLADA_GEMM=lt` (`None`: cuBLAS).
    gemm_lt: RefCell<Option<lt::LtBf16>>,
    blas: CudaBlas,
    _blas_workspace: CudaSlice<u8>,
    k: Kernels,
    _modules: Vec<Module>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    device_id: usize,
    device_name: String,
    prof: RefCell<CudaProf>,
    /// Scratch of the split-KV attention path (partial outputs, row maxima and sums, f32),
    /// allocated once at construction so captured graphs never see it move.
    attn_scratch: CudaSlice<f32>,
    /// The attention kernels in use (`LLADA_ATTN`, [`CudaBackend::set_attention_impl`]).
    attn_impl: std::cell::Cell<AttnImpl>,
    /// The FA2-class attention kernels (`attention_fa2.rs`).
    fa2: Fa2Kernels,
}

// SAFETY: the raw CUfunction/CUmodule handles are plain driver handles valid in any thread once
// the context is bound (every entry point binds it); cudarc's own types are Send.
unsafe impl Send for CudaBackend {}

/// Threads per block of the row-wise kernels (norms, embedding, gather).
const ROW_THREADS: u32 = 256;

impl Backend for CudaBackend {
    type Act = CudaSlice<bf16>;
    type Weight = CudaWeight;
    type Ints = DevInts;
    type F32s = CudaSlice<f32>;

    fn name(&self) -> String {
        format!("cuda:{} ({})", self.device_id, self.device_name)
    }

    fn compute_dtype(&self) -> DType {
        DType::BF16
    }

    fn alloc_act(&self, len: usize) -> Result<Self::Act> {
        self.alloc("activation buffer", len)
    }
    fn alloc_ints(&self, len: usize) -> Result<Self::Ints> {
        self.alloc_dev_ints(len)
    }
    fn alloc_f32s(&self, len: usize) -> Result<Self::F32s> {
        self.alloc("f32 buffer", len)
    }

    fn write_ints(&self, dst: &mut Self::Ints, src: &[i32]) -> Result<()> {
        self.write_dev_ints(dst, src)
    }
    fn write_f32s(&self, dst: &mut Self::F32s, src: &[f32]) -> Result<()> {
        check_len("write_f32s", "dst", dst.len(), src.len())?;
        let p = dptr_mut(dst, &self.stream);
        self.htod(p, src)
    }
    fn read_act(&self, src: &Self::Act, n: usize) -> Result<Vec<f32>> {
        check_len("read_act", "src", src.len(), n)?;
        let h: Vec<bf16> = self.dtoh(dptr(src, &self.stream), n)?;
        Ok(h.into_iter().map(|x| x.to_f32()).collect())
    }
    fn read_ints(&self, src: &Self::Ints, n: usize) -> Result<Vec<i32>> {
        check_len("read_ints", "src", src.len(), n)?;
        self.dtoh(dptr(src, &self.stream), n)
    }
    fn read_f32s(&self, src: &Self::F32s, n: usize) -> Result<Vec<f32>> {
        check_len("read_f32s", "src", src.len(), n)?;
        self.dtoh(dptr(src, &self.stream), n)
    }
    fn read_ints_into(&self, src: &Self::Ints, dst: &mut [i32]) -> Result<()> {
        check_len("read_ints_into", "src", src.len(), dst.len())?;
        self.dtoh_into(dptr(src, &self.stream), dst)
    }
    fn read_f32s_into(&self, src: &Self::F32s, dst: &mut [f32]) -> Result<()> {
        check_len("read_f32s_into", "src", src.len(), dst.len())?;
        self.dtoh_into(dptr(src, &self.stream), dst)
    }

    fn embedding(&self, out: &mut Act, wte: &CudaWeight, g: Gather<'_, Self>) -> Result<()> {
        let (op, Gather { idx: ids, n, c }) = ("embedding", g);
        if wte.cols != c {
            bail!("{op}: `{}` has {} columns, C = {c}", wte.name, wte.cols);
        }
        check_lens(op, &[("out", out.len(), n * c), ("ids", ids.len(), n)])?;
        if n == 0 {
            return Ok(());
        }
        let vocab = format!("the vocabulary of `{}`", wte.name);
        check_ints(op, "ids", ids, n, wte.rows, &vocab)?;
        launch!(&self.stream, op, self.k.embedding, rows_geom(n, ROW_THREADS); self.ptr_mut(out),
            self.ptr(&wte.buf), self.ptr(ids), int(op, "n", n)?, int(op, "c", c)?)
    }

    fn rms_norm(&self, out: &mut Act, x: &Act, w: &CudaWeight, s: Norm) -> Result<()> {
        let op = "rms_norm";
        check_norm(op, w, s, &[("out", out.len()), ("x", x.len())])?;
        if s.n == 0 {
            return Ok(());
        }
        launch!(&self.stream, op, self.k.rms_norm, rows_geom(s.n, ROW_THREADS); self.ptr_mut(out),
            self.ptr(x), self.ptr(&w.buf), int(op, "n", s.n)?, int(op, "c", s.c)?, s.eps)
    }

    fn add_rms_norm(
        &self,
        out: &mut Act,
        x: &mut Act,
        d: &Act,
        w: &CudaWeight,
        s: Norm,
    ) -> Result<()> {
        let op = "add_rms_norm";
        check_norm(
            op,
            w,
            s,
            &[("out", out.len()), ("x", x.len()), ("d", d.len())],
        )?;
        if s.n == 0 {
            return Ok(());
        }
        launch!(&self.stream, op, self.k.add_rms_norm, rows_geom(s.n, ROW_THREADS);
            self.ptr_mut(out), self.ptr_mut(x), self.ptr(d), self.ptr(&w.buf), int(op, "n", s.n)?,
            int(op, "c", s.c)?, s.eps)
    }

    fn add(&self, x: &mut Act, d: &Act, s: Rows) -> Result<()> {
        let (op, numel) = ("add", s.n * s.c);
        check_lens(op, &[("x", x.len(), numel), ("d", d.len(), numel)])?;
        if numel == 0 {
            return Ok(());
        }
        launch!(&self.stream, op, self.k.add, stride_geom(numel); self.ptr_mut(x), self.ptr(d),
            numel as i64)
    }

    /// Row-major `out[N, M] = x[N, K] · W[M, K]ᵀ`. cuBLAS is column-major: the row-major buffers
    /// read as column-major are `outᵀ` (M×N, ld M), `xᵀ` (K×N, ld K) and `Wᵀ` (K×M, ld K), so
    /// `outᵀ = W · xᵀ = op(A)·B` with `A = W` transposed (`transa = T`, lda = K) and `B = x` as is
    /// (`transb = N`, ldb = K), `m = M`, `n = N`, `k = K`, ldc = M.
    fn matmul(&self, out: &mut Act, x: &Act, w: &CudaWeight, s: MatMul) -> Result<()> {
        let (op, MatMul { n, k, m }) = ("matmul", s);
        if let Some(f) = &w.fp8 {
            return fp8::matmul(self, out, x, f, &w.name, s);
        }
        if w.rows != m || w.cols != k {
            bail!(
                "{op}: weight `{}` is [{}, {}], expected [M={m}, K={k}]",
                w.name,
                w.rows,
                w.cols
            );
        }
        check_lens(op, &[("out", out.len(), n * m), ("x", x.len(), n * k)])?;
        if n == 0 || m == 0 {
            return Ok(());
        }
        use cublas::sys::{cublasComputeType_t, cudaDataType_t};
        // outᵀ (M×N) = W (stored [M, K] = column-major K×M, transposed) · xᵀ (K×N).
        let g = Gemm {
            ta: true,
            tb: false,
            m,
            n,
            k,
            a: self.ptr(&w.buf),
            lda: k,
            b: self.ptr(x),
            ldb: k,
            beta: 0.0,
            c: self.ptr_mut(out),
            ldc: m,
            data: cudaDataType_t::CUDA_R_16BF,
            compute: cublasComputeType_t::CUBLAS_COMPUTE_32F,
            ..Gemm::F32
        };
        if let Some(l) = self.gemm_lt.borrow().as_ref() {
            if l.run(op, &g, &self.stream)? {
                return Ok(());
            }
        }
        g.run(op, *self.blas.handle())
    }

    fn rope(&self, qkv: &mut Act, t: Rope<'_, Self>, s: AttnShape) -> Result<()> {
        let (op, n, AttnShape { nh, nkv, hd, .. }) = ("rope", s.rows(), s);
        if hd == 0 || hd % 2 != 0 {
            bail!("{op}: head dim {hd} must be even and positive");
        }
        check_len(op, "qkv", qkv.len(), n * s.qkv_width())?;
        if !self.check_rope_inputs(op, t, n, hd)? {
            return Ok(());
        }
        let threads = ((nh + nkv) * hd / 2).clamp(32, 1024).next_multiple_of(32) as u32;
        launch!(&self.stream, op, self.k.rope, rows_geom(n, threads.min(1024)); self.ptr_mut(qkv),
            self.ptr(t.cos), self.ptr(t.sin), self.ptr(t.pos), int(op, "n", n)?,
            int(op, "nh", nh)?, int(op, "nkv", nkv)?, int(op, "hd", hd)?)
    }

    fn swiglu(&self, out: &mut Act, gate_up: &Act, s: Rows) -> Result<()> {
        let (op, Rows { n, c: f }) = ("swiglu", s);
        check_lens(
            op,
            &[
                ("out", out.len(), n * f),
                ("gate_up", gate_up.len(), n * 2 * f),
            ],
        )?;
        if n * f == 0 {
            return Ok(());
        }
        // The kernel indexes elements in 64 bits: only n and f themselves are ints.
        launch!(&self.stream, op, self.k.swiglu, stride_geom(n * f); self.ptr_mut(out),
            self.ptr(gate_up), int(op, "n", n)?, int(op, "f", f)?)
    }

    fn gather_rows(&self, out: &mut Act, x: &Act, g: Gather<'_, Self>) -> Result<()> {
        let (op, Gather { idx: rows, n, c }) = ("gather_rows", g);
        check_lens(
            op,
            &[
                ("out", out.len(), n * c),
                ("rows", rows.len(), n),
                ("x", x.len(), c),
            ],
        )?;
        if n == 0 || c == 0 {
            return Ok(());
        }
        check_ints(op, "rows", rows, n, x.len() / c, "the rows of `x`")?;
        launch!(&self.stream, op, self.k.gather_rows, rows_geom(n, ROW_THREADS); self.ptr_mut(out),
            self.ptr(x), self.ptr(rows), int(op, "nrows", n)?, int(op, "c", c)?)
    }

    fn commit_select(
        &self,
        commit: &mut Ints,
        c: CommitIn<'_, Self>,
        s: CommitShape,
    ) -> Result<()> {
        self.launch_commit_select(commit, c, s)
    }

    fn step_advance(
        &self,
        bufs: (&mut Ints, &mut Ints, &mut Ints),
        c: StepIn<'_, Self>,
        s: StepShape,
    ) -> Result<()> {
        self.launch_step_advance(bufs, c, s)
    }

    fn log_prob(&self, out: &mut F32s, logits: &Act, targets: &Ints, s: LogProb) -> Result<()> {
        self.launch_log_prob(out, (logits, targets), s)
    }

    fn graphs_supported(&self) -> bool {
        true
    }

    fn graph_capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<GraphExec> {
        let g = self.capture(|_| f())?;
        // Upload now so the first replay does not pay for it.
        g.0.upload()
            .map_err(|e| anyhow!("uploading a CUDA graph: {e:?}"))?;
        Ok(GraphExec(Box::new(g)))
    }

    fn graph_replay(&self, g: &GraphExec) -> Result<()> {
        match g.0.downcast_ref::<Graph>() {
            Some(g) => self.replay(g),
            None => bail!("graph_replay: the graph was not captured by the CUDA backend"),
        }
    }

    fn prof_enable(&self, on: bool) {
        let mut p = self.prof.borrow_mut();
        p.on = on;
        let marks = std::mem::take(&mut p.marks);
        p.pool.extend(marks.into_iter().map(|(_, e)| e));
    }

    fn prof_enabled(&self) -> bool {
        self.prof.borrow().on
    }

    fn prof_mark(&self, class: Option<OpClass>) {
        let mut p = self.prof.borrow_mut();
        if !p.on {
            return;
        }
        let ev = match p.pool.pop() {
            Some(e) => e,
            None => match self
                .ctx
                .new_event(Some(dsys::CUevent_flags::CU_EVENT_DEFAULT))
            {
                Ok(e) => e,
                // Profiling is best effort: a missing mark merges two intervals.
                Err(_) => return,
            },
        };
        if ev.record(&self.stream).is_err() {
            p.pool.push(ev);
            return;
        }
        p.marks.push((class, ev));
        if class.is_none() && p.marks.len() >= PROF_FOLD {
            let _ = self.prof_fold(&mut p);
        }
    }

    fn prof_take(&self) -> Result<Vec<(OpClass, f64)>> {
        let mut p = self.prof.borrow_mut();
        self.prof_fold(&mut p)?;
        let out = OpClass::ALL
            .iter()
            .filter(|&&c| p.seen[c as usize])
            .map(|&c| (c, p.totals[c as usize]))
            .collect();
        p.totals = Default::default();
        p.seen = Default::default();
        Ok(out)
    }

    fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| {
            driver_err(
                "CUDA stream synchronize failed (an earlier kernel faulted?)".into(),
                e,
            )
        })
    }

    fn memory_in_use(&self) -> Option<usize> {
        self.mem_info()
            .ok()
            .map(|(free, total)| total.saturating_sub(free))
    }

    fn memory_free(&self) -> Option<usize> {
        self.mem_info().ok().map(|(free, _)| free)
    }

    fn driver(&self) -> String {
        match driver_version() {
            Ok((a, b)) => format!("CUDA {a}.{b}"),
            Err(_) => "CUDA (version unknown)".to_string(),
        }
    }

    fn load_weight(&self, parts: &[WeightSource]) -> Result<CudaWeight> {
        self.upload_weight(parts)
    }

    fn load_weight_fp8(&self, parts: &[crate::quant::fp8::Fp8Weight]) -> Result<CudaWeight> {
        fp8::load_weight(self, parts)
    }

    fn select(&self, io: SelectIo<'_, Self>, s: HeadDims, p: &SelectParams) -> Result<()> {
        self.launch_select(io, s, p)
    }

    fn kv_store(&self, kv: Kv<&mut Act>, qkv: &Act, s: CachedAttnShape) -> Result<()> {
        self.launch_kv_store(kv, qkv, s)
    }

    /// `rope_kv_store_bf16` (`kernels/rope.cu`): the checks of `rope` and `kv_store` together.
    fn rope_kv_store(
        &self,
        qkv: &mut Act,
        kv: Kv<&mut Act>,
        t: Rope<'_, Self>,
        s: CachedAttnShape,
    ) -> Result<()> {
        let (op, (b, tq, l, nh, nkv, hd), q0) = ("rope_kv_store", s.dims(), s.q0);
        let n = b * tq;
        ensure!(
            hd > 0 && hd % 2 == 0 && q0 + tq <= l,
            "{op}: head dim {hd} must be even and positive, and the rows [{q0}, {}) lie in the cache length {l}",
            q0 + tq
        );
        let kw = b * l * nkv * hd;
        let qkv_len = n * s.queries().qkv_width();
        check_lens(
            op,
            &[
                ("qkv", qkv.len(), qkv_len),
                ("k_cache", kv.k.len(), kw),
                ("v_cache", kv.v.len(), kw),
            ],
        )?;
        if !self.check_rope_inputs(op, t, n, hd)? {
            return Ok(());
        }
        int(op, "b·tq", n)?;
        let threads = ((nh + nkv) * hd / 2).clamp(32, 256).next_multiple_of(32) as u32;
        launch!(&self.stream, op, self.k.rope_kv_store, rows_geom(n, threads);
            self.ptr_mut(qkv), self.ptr_mut(kv.k), self.ptr_mut(kv.v), self.ptr(t.cos),
            self.ptr(t.sin), self.ptr(t.pos), int(op, "b", b)?, int(op, "tq", tq)?,
            int(op, "l", l)?, int(op, "q0", q0)?, int(op, "nh", nh)?, int(op, "nkv", nkv)?,
            int(op, "hd", hd)?)
    }

    /// The attention launcher (`kernels/attention.cu`): the checks, then FA2, split-KV or the
    /// single-pass kernel (`attention_fwd_bf16` reading the keys from `qkv`, or
    /// `attention_cached_fwd_bf16` reading the caches).
    fn attend(
        &self,
        out: &mut Act,
        qkv: &Act,
        kv: Option<Kv<&Act>>,
        key_valid: Option<&Ints>,
        s: CachedAttnShape,
    ) -> Result<()> {
        let op = attention_name(kv.is_some());
        let (b, tq, l, nh, nkv, hd) = s.dims();
        check_heads(op, nh, nkv, hd)?;
        if tq > l {
            bail!("{op}: {tq} queries per row exceed the {l} cached keys");
        }
        let qs = s.queries().qkv_width();
        check_lens(
            op,
            &[
                ("out", out.len(), b * tq * nh * hd),
                ("qkv", qkv.len(), b * tq * qs),
            ],
        )?;
        if let Some(Kv { k, v }) = kv {
            check_lens(
                op,
                &[
                    ("k_cache", k.len(), b * l * nkv * hd),
                    ("v_cache", v.len(), b * l * nkv * hd),
                ],
            )?;
        }
        if let Some(m) = key_valid {
            check_len(op, "key_valid", m.len(), b * l)?;
        }
        if b * tq == 0 || nh == 0 {
            return Ok(());
        }
        let (o, q) = (self.ptr_mut(out), self.ptr(qkv));
        let key_valid = key_valid.map_or(0, |m| self.ptr(m));
        let (k, v, kvstride) = match &kv {
            // The k and v parts of each qkv row (bf16, 2 bytes).
            None => (
                q + (nh * hd * 2) as u64,
                q + ((nh + nkv) * hd * 2) as u64,
                qs,
            ),
            Some(Kv { k, v }) => (self.ptr(*k), self.ptr(*v), nkv * hd),
        };
        let chunk = attn_split_chunk(l).unwrap_or(0);
        let a = SplitArgs {
            q,
            k,
            v,
            key_valid,
            qstride: qs,
            kvstride,
            s,
            chunk,
        };
        // The single-pass kernels (when neither FA2 nor split-KV takes the call).
        self.attention_route(op, o, a, || {
            let g = attention_geom(op, b, tq, nh)?;
            let (b, tq, l) = (int(op, "b", b)?, int(op, "tq", tq)?, int(op, "l", l)?);
            let (nh, nkv, hd) = (int(op, "nh", nh)?, int(op, "nkv", nkv)?, int(op, "hd", hd)?);
            if kv.is_none() {
                launch!(&self.stream, op, self.k.attention, g; o, q, key_valid, b, tq, nh, nkv, hd)
            } else {
                launch!(&self.stream, op, self.k.attention_cached, g; o, q, k, v, key_valid, b, tq,
                    l, nh, nkv, hd)
            }
        })
    }
}

// Accessors for the training path (`crate::train::cuda`), which launches its own f32 kernels
// on this backend's context, stream and cuBLAS handle.
