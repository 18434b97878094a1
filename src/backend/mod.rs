//! The op-level interface the LLaDA forward pass is written against.
//!
//! [`cpu::CpuBackend`] is the executable specification: plain loops (multi-threaded), emulating
//! PyTorch's rounding in the model's compute dtype. [`cuda::CudaBackend`] runs the same ops as
//! hand-written kernels plus cuBLAS. [`crate::engine::model`] calls only what is declared here, so a
//! backend plugs in without touching the model or the sampler.
//!
//! Conventions (letters as everywhere in the project): `N` rows (= B·T tokens), `C` model width,
//! `NH` query heads, `NKV` key/value heads, `HD` head dim, `F` MLP width, `V` vocab, `R` rows
//! the LM head is asked for. All activations are row-major `[N, width]`. A merged `qkv` row is
//! `[q (NH·HD) | k (NKV·HD) | v (NKV·HD)]`, head `h` at columns `h·HD .. (h+1)·HD` of its part.
//! A merged `gate_up` row is `[gate (F) | up (F)]`.
//!
//! Ops return `Result` because a device launch can fail; shapes are validated by the launcher
//! (the backend method) and reported with the op's name. Failures a caller branches on
//! (out of memory, a sticky device fault) carry an [`error::DeviceError`].

use anyhow::Result;

use crate::backend::head::SelectParams;
use crate::hf::checkpoint::WeightSource;
use crate::hf::dtype::DType;

pub mod args;
pub mod commit;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod head;
pub mod shape;
pub mod step;

pub use args::{CommitIn, Gather, Rope, SelectIo, StepIn};
pub use error::DeviceError;
pub use shape::{AttnShape, CachedAttnShape, HeadDims, Kv, LogProb, MatMul, Norm, Rows};

/// Op classes of the per-step time breakdown (`llada-bench --breakdown`, [`Backend::prof_mark`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpClass {
    /// Host→device uploads of ids, positions, masks, rows, keys (and any host work between).
    Io,
    /// Attention, including the KV-cache store of a cached step.
    Attention,
    /// The layer GEMMs (q|k|v, o, gate|up, down).
    Gemm,
    /// RMSNorm, residual adds, RoPE, SwiGLU, embedding, row gathers.
    NormElementwise,
    /// The LM-head GEMM on the requested rows.
    LmHead,
    /// The sampler's fused head (`select`) and its read-back.
    Head,
}

impl OpClass {
    pub const ALL: [OpClass; 6] = [
        OpClass::Io,
        OpClass::Attention,
        OpClass::Gemm,
        OpClass::NormElementwise,
        OpClass::LmHead,
        OpClass::Head,
    ];

    pub fn name(self) -> &'static str {
        match self {
            OpClass::Io => "io",
            OpClass::Attention => "attention",
            OpClass::Gemm => "gemm",
            OpClass::NormElementwise => "norm+elementwise",
            OpClass::LmHead => "lm_head",
            OpClass::Head => "sampler/head",
        }
    }
}

impl std::fmt::Display for OpClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A captured, replayable sequence of backend launches (a CUDA graph on the CUDA backend),
/// made by [`Backend::graph_capture`]. Opaque outside the backend that made it.
pub struct GraphExec(pub Box<dyn std::any::Any + Send>);

pub trait Backend {
    /// An activation buffer in the compute dtype.
    type Act;
    /// A weight resident on the backend (possibly several checkpoint tensors merged by rows).
    type Weight;
    /// A buffer of i32 (token ids, positions, row indices, masks).
    type Ints;
    /// A buffer of f32 (confidences).
    type F32s;

    fn name(&self) -> String;
    /// The dtype activations are stored and rounded in.
    fn compute_dtype(&self) -> DType;

    /// Make a weight from one or more sources concatenated along the first (output) dimension:
    /// `parts[i]` has shape `[rows_i, cols]` (or `[cols]` for norm weights, one part).
    fn load_weight(&self, parts: &[WeightSource]) -> Result<Self::Weight>;

    /// Make an FP8 linear weight ([`crate::quant::fp8`]) from parts stacked along the rows like
    /// [`Backend::load_weight`]; [`Backend::matmul`] on it quantizes the activations per token
    /// and runs the FP8 GEMM. Backends without an FP8 path refuse.
    fn load_weight_fp8(&self, parts: &[crate::quant::fp8::Fp8Weight]) -> Result<Self::Weight> {
        let _ = parts;
        anyhow::bail!(
            "{}: FP8 weights (--weights fp8) are not supported on this backend",
            self.name()
        )
    }

    fn alloc_act(&self, len: usize) -> Result<Self::Act>;
    fn alloc_ints(&self, len: usize) -> Result<Self::Ints>;
    fn alloc_f32s(&self, len: usize) -> Result<Self::F32s>;
    /// Copy host ints into the first `src.len()` elements of `dst`.
    fn write_ints(&self, dst: &mut Self::Ints, src: &[i32]) -> Result<()>;
    /// Copy host f32s into the first `src.len()` elements of `dst`.
    fn write_f32s(&self, dst: &mut Self::F32s, src: &[f32]) -> Result<()>;
    /// Read the first `n` elements back to the host (as f32 values of the compute dtype).
    fn read_act(&self, src: &Self::Act, n: usize) -> Result<Vec<f32>>;
    fn read_ints(&self, src: &Self::Ints, n: usize) -> Result<Vec<i32>>;
    fn read_f32s(&self, src: &Self::F32s, n: usize) -> Result<Vec<f32>>;
    /// Read the first `dst.len()` ints into `dst` (no allocation: the denoising loop uses it).
    fn read_ints_into(&self, src: &Self::Ints, dst: &mut [i32]) -> Result<()> {
        let v = self.read_ints(src, dst.len())?;
        dst.copy_from_slice(&v);
        Ok(())
    }
    /// Read the first `dst.len()` f32s into `dst` (no allocation).
    fn read_f32s_into(&self, src: &Self::F32s, dst: &mut [f32]) -> Result<()> {
        let v = self.read_f32s(src, dst.len())?;
        dst.copy_from_slice(&v);
        Ok(())
    }

    /// `out[i, :] = wte[ids[i], :]` for `i < N` (`ids` = `g.idx`); `wte` is `[V, C]`.
    fn embedding(&self, out: &mut Self::Act, wte: &Self::Weight, g: Gather<'_, Self>)
        -> Result<()>;

    /// RMSNorm without a residual: `out = w * round(x * rsqrt(mean(x²) + eps))`.
    fn rms_norm(&self, out: &mut Self::Act, x: &Self::Act, w: &Self::Weight, s: Norm)
        -> Result<()>;

    /// Residual add fused with RMSNorm: `x = round(x + d)`, then `out = rms_norm(x)`.
    fn add_rms_norm(
        &self,
        out: &mut Self::Act,
        x: &mut Self::Act,
        d: &Self::Act,
        w: &Self::Weight,
        s: Norm,
    ) -> Result<()>;

    /// Residual add: `x = round(x + d)` over `N·C` elements.
    fn add(&self, x: &mut Self::Act, d: &Self::Act, s: Rows) -> Result<()>;

    /// `out[N, M] = x[N, K] · wᵀ` with `w` `[M, K]`; f32 accumulation, output rounded.
    fn matmul(&self, out: &mut Self::Act, x: &Self::Act, w: &Self::Weight, s: MatMul)
        -> Result<()>;

    /// RoPE, half rotation, in f32, in place on the q and k parts of a merged `qkv` buffer
    /// (`B·T` rows). Row `i` is rotated to position `pos[i]` using the tables of [`rope_tables`]
    /// (`cos`, `sin`: `[max_pos, HD/2]`): for `j < HD/2`,
    /// `out[j] = x[j]·cos − x[j+HD/2]·sin`, `out[j+HD/2] = x[j+HD/2]·cos + x[j]·sin`, in f32 from
    /// the stored values, rounded once.
    fn rope(&self, qkv: &mut Self::Act, t: Rope<'_, Self>, s: AttnShape) -> Result<()>;

    /// Bidirectional attention over a merged `qkv` buffer `[B·T, (NH+2·NKV)·HD]` into
    /// `out` `[B·T, NH·HD]`, scale 1/√HD. `key_valid` (`[B·T]`, 1 = attend) masks padding keys;
    /// `None` attends to every key. Runs [`Backend::attend`] with the keys of `qkv`.
    fn attention(
        &self,
        out: &mut Self::Act,
        qkv: &Self::Act,
        key_valid: Option<&Self::Ints>,
        s: AttnShape,
    ) -> Result<()> {
        self.attend(out, qkv, None, key_valid, s.full())
    }

    /// Write the (already rotated) k and v parts of a merged `qkv` buffer `[B·TQ, (NH+2·NKV)·HD]`
    /// into rows `[q0, q0 + TQ)` (`q0 = s.q0`) of each batch row of the caches `kv.k`, `kv.v`
    /// (`[B, L, NKV·HD]` each): `kv.k[bi·L + q0 + i] = k(qkv[bi·TQ + i])`. Exact copies.
    fn kv_store(&self, kv: Kv<&mut Self::Act>, qkv: &Self::Act, s: CachedAttnShape) -> Result<()>;

    /// [`Backend::rope`] on the `B·TQ` rows of `qkv` (positions and tables `t`) fused with
    /// [`Backend::kv_store`] of the rotated k and the v into rows `[q0, q0 + TQ)` of `kv`: one
    /// pass over the projection's output where the backend has the kernel (CUDA:
    /// `rope_kv_store_bf16`). This default runs the two ops in turn and is the reference; a
    /// fused kernel must equal it bit for bit.
    fn rope_kv_store(
        &self,
        qkv: &mut Self::Act,
        kv: Kv<&mut Self::Act>,
        t: Rope<'_, Self>,
        s: CachedAttnShape,
    ) -> Result<()> {
        self.rope(qkv, t, s.queries())?;
        self.kv_store(kv, qkv, s)
    }

    /// Bidirectional attention of the `TQ` queries per batch row in the q part of `qkv`
    /// (`[B·TQ, (NH+2·NKV)·HD]`; its k/v parts are ignored) over the `L` keys and values per batch
    /// row of the caches `kv.k`, `kv.v` (`[B, L, NKV·HD]`), into `out` `[B·TQ, NH·HD]`, scale
    /// 1/√HD.
    /// `key_valid` is `[B·L]`. With `TQ = L` and caches holding the k/v parts of `qkv`, the result
    /// equals [`Backend::attention`] bit for bit (both run [`Backend::attend`]).
    fn attention_cached(
        &self,
        out: &mut Self::Act,
        qkv: &Self::Act,
        kv: Kv<&Self::Act>,
        key_valid: Option<&Self::Ints>,
        s: CachedAttnShape,
    ) -> Result<()> {
        self.attend(out, qkv, Some(kv), key_valid, s)
    }

    /// The attention behind both ops, which a backend implements once: [`Backend::attention`]
    /// with `kv = None` (the keys and values are the k and v parts of `qkv`, `TQ = L`, `q0 = 0`),
    /// [`Backend::attention_cached`] with the caches. Errors name the op ([`attention_name`]).
    fn attend(
        &self,
        out: &mut Self::Act,
        qkv: &Self::Act,
        kv: Option<Kv<&Self::Act>>,
        key_valid: Option<&Self::Ints>,
        s: CachedAttnShape,
    ) -> Result<()>;

    /// `out[N, F] = silu(gate) * up` on a merged `gate_up` `[N, 2F]` (`s.c = F`).
    fn swiglu(&self, out: &mut Self::Act, gate_up: &Self::Act, s: Rows) -> Result<()>;

    /// `out[i, :] = x[rows[i], :]` for `i < N` (`rows` = `g.idx`).
    fn gather_rows(&self, out: &mut Self::Act, x: &Self::Act, g: Gather<'_, Self>) -> Result<()>;

    /// The sampler's per-position head (see [`crate::backend::head::select_one`]) on logits `[R', V]`:
    /// with `p.cfg_scale > 0`, `R' = 2R` and rows `R..2R` are the unconditional logits of rows
    /// `0..R`. `keys` holds `2R` ints: (batch row, absolute position) per row for the RNG; with
    /// `io.step` (a step graph's state, [`step`]) the RNG step is [`step::rng_step`] of it
    /// instead of `p.step`. Writes `tok[R]` and `conf[R]`. May overwrite `logits`.
    fn select(&self, io: SelectIo<'_, Self>, s: HeadDims, p: &SelectParams) -> Result<()>;

    /// The step's commit selection on the device ([`commit::commit_rows`] is the reference): per
    /// batch row `br`, the requested rows `seg[br]..seg[br+1]` whose token `ids[rows[i]]` is still
    /// `s.mask_id` are ranked by `conf` ([`commit::commit_select`]) and the ones `s.rule` keeps
    /// (with quota `plan[b + 1 + br]`) get `commit[i] = tok[i]`; every other of the `R` rows gets
    /// −1. `plan` is `[2B + 1]`: the offsets `seg`, then the quotas.
    fn commit_select(
        &self,
        commit: &mut Self::Ints,
        c: CommitIn<'_, Self>,
        s: commit::CommitShape,
    ) -> Result<()>;

    /// The end of one denoising step on the device, the last op of a step graph
    /// ([`step::step_advance_ref`] is the reference, `kernels/step_advance.cu` the kernel): the
    /// step's `commit`s are written into the pass's tokens `ids`, the masks left are counted into
    /// the step state `state`, whose step counter advances, and the next step's quotas (from the
    /// schedule `sched`) go into `plan`, [`Backend::commit_select`]'s plan. `bufs` is
    /// `(ids, state, plan)`.
    fn step_advance(
        &self,
        bufs: (&mut Self::Ints, &mut Self::Ints, &mut Self::Ints),
        c: StepIn<'_, Self>,
        s: step::StepShape,
    ) -> Result<()>;

    /// Log-probability of a target token under the softmax of each logits row (reference §5.1,
    /// the `F.cross_entropy` of `get_log_likelihood`, negated): for `i < R`,
    /// `out[i] = round(l[t_i] − m − ln Σ_v exp(l[v] − m))`, `m = max_v l[v]`, `t_i = targets[i]`,
    /// computed in f32 from the stored values and rounded once to the compute dtype (PyTorch's
    /// `log_softmax` on a bf16 tensor also computes in f32 and returns bf16). With
    /// `s.cfg_scale > 0`, `logits` holds `2R` rows, rows `R..2R` being the unconditional logits of
    /// rows `0..R`, and `l` is first mixed exactly as [`crate::backend::head::cfg_mix`] (each op rounded).
    /// CPU reference: [`crate::backend::cpu::log_prob_one`]. NaN logits give NaN; a row whose logits
    /// are all −∞ gives −∞. Targets must lie in `[0, V)`.
    fn log_prob(
        &self,
        out: &mut Self::F32s,
        logits: &Self::Act,
        targets: &Self::Ints,
        s: LogProb,
    ) -> Result<()>;

    /// Wait for queued work to finish (no-op on the CPU).
    fn synchronize(&self) -> Result<()> {
        Ok(())
    }

    /// Device memory in use, in bytes, where the backend can tell (the benchmark reports it).
    fn memory_in_use(&self) -> Option<usize> {
        None
    }

    /// Free device memory in bytes, where the backend can tell (`llada batch` sizes its
    /// batches from it).
    fn memory_free(&self) -> Option<usize> {
        None
    }

    /// Driver / runtime description for reports.
    fn driver(&self) -> String {
        "-".to_string()
    }

    /// Whether [`Backend::graph_capture`] works on this backend (false: run eagerly).
    fn graphs_supported(&self) -> bool {
        false
    }

    /// Record every op `f` queues into a replayable graph; nothing executes during capture.
    /// `f` must not read back, synchronize, allocate or write host data; the graph replays on
    /// exactly the buffers and sizes it captured.
    fn graph_capture(&self, f: &mut dyn FnMut() -> Result<()>) -> Result<GraphExec> {
        let _ = f;
        anyhow::bail!("{}: graph capture is not supported", self.name())
    }

    /// Queue a graph made by [`Backend::graph_capture`] on this backend.
    fn graph_replay(&self, g: &GraphExec) -> Result<()> {
        let _ = g;
        anyhow::bail!("{}: graph replay is not supported", self.name())
    }

    /// Turn per-op-class timing on or off (off by default; a no-op where unsupported). While on,
    /// [`Backend::prof_mark`] records interval boundaries (device events on CUDA, `Instant` on the
    /// CPU) and the model runs without graphs.
    fn prof_enable(&self, on: bool) {
        let _ = on;
    }

    /// Whether timing is on.
    fn prof_enabled(&self) -> bool {
        false
    }

    /// Close the open interval (if any) and, with `Some(class)`, open a new one charged to
    /// `class`. Costs a flag test when timing is off.
    fn prof_mark(&self, class: Option<OpClass>) {
        let _ = class;
    }

    /// The time charged to each class since timing was enabled or last taken, in ms, classes
    /// with no interval left out; resets the totals (waits for queued work).
    fn prof_take(&self) -> Result<Vec<(OpClass, f64)>> {
        Ok(Vec::new())
    }
}

/// The op an [`Backend::attend`] call runs, for its errors: `attention_cached` when it reads
/// caches, else `attention`.
pub fn attention_name(cached: bool) -> &'static str {
    if cached {
        "attention_cached"
    } else {
        "attention"
    }
}

/// RoPE tables `(cos, sin)`, each `[max_pos, HD/2]` row-major, computed in f32 exactly as the
/// upstream `RotaryEmbedding`: `inv_freq[j] = 1 / theta^(2j/HD)`, `f = p · inv_freq[j]`.
/// Every backend uses these host-computed tables, so CPU and GPU rotate identically.
pub fn rope_tables(theta: f32, hd: usize, max_pos: usize) -> (Vec<f32>, Vec<f32>) {
    let half = hd / 2;
    let inv: Vec<f32> = (0..half)
        .map(|j| 1.0f32 / theta.powf((2 * j) as f32 / hd as f32))
        .collect();
    let mut cos = Vec::with_capacity(max_pos * half);
    let mut sin = Vec::with_capacity(max_pos * half);
    for p in 0..max_pos {
        for &f in &inv {
            let a = p as f32 * f;
            cos.push(a.cos());
            sin.push(a.sin());
        }
    }
    (cos, sin)
}
