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

pub mod commit;
pub mod cpu;
pub mod cuda;
pub mod error;
pub mod head;

pub use error::DeviceError;

/// Shape of one attention call.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AttnShape {
    /// Batch rows.
    pub b: usize,
    /// Tokens per batch row (queries = keys: full-sequence bidirectional attention).
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

/// Shape of one cached attention call (Fast-dLLM prefix / dual cache, reference §7): the
/// queries are the `TQ` tokens at absolute positions `[q0, q0 + TQ)` of each batch row, the keys
/// and values are all `L` rows of that batch row in the KV cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CachedAttnShape {
    /// Batch rows.
    pub b: usize,
    /// Query tokens per batch row.
    pub tq: usize,
    /// Cached keys per batch row (the full sequence length).
    pub l: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

impl CachedAttnShape {
    /// `(b, tq, l, nh, nkv, hd)`, in the fields' order.
    pub fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        (self.b, self.tq, self.l, self.nh, self.nkv, self.hd)
    }
}

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

    /// `out[i, :] = wte[ids[i], :]` for `i < n`; `wte` is `[V, C]`.
    fn embedding(
        &self,
        out: &mut Self::Act,
        wte: &Self::Weight,
        ids: &Self::Ints,
        n: usize,
        c: usize,
    ) -> Result<()>;

    /// RMSNorm without a residual: `out = w * round(x * rsqrt(mean(x²) + eps))`.
    fn rms_norm(
        &self,
        out: &mut Self::Act,
        x: &Self::Act,
        w: &Self::Weight,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;

    /// Residual add fused with RMSNorm: `x = round(x + d)`, then `out = rms_norm(x)`.
    #[allow(clippy::too_many_arguments)]
    fn add_rms_norm(
        &self,
        out: &mut Self::Act,
        x: &mut Self::Act,
        d: &Self::Act,
        w: &Self::Weight,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;

    /// Residual add: `x = round(x + d)` over `n·c` elements.
    fn add(&self, x: &mut Self::Act, d: &Self::Act, n: usize, c: usize) -> Result<()>;

    /// `out[N, M] = x[N, K] · wᵀ` with `w` `[M, K]`; f32 accumulation, output rounded.
    fn matmul(
        &self,
        out: &mut Self::Act,
        x: &Self::Act,
        w: &Self::Weight,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()>;

    /// RoPE, half rotation, in f32, in place on the q and k parts of a merged `qkv` buffer
    /// (`N` rows). Row `i` is rotated to position `pos[i]` using the tables of [`rope_tables`]
    /// (`cos`, `sin`: `[max_pos, HD/2]`): for `j < HD/2`,
    /// `out[j] = x[j]·cos − x[j+HD/2]·sin`, `out[j+HD/2] = x[j+HD/2]·cos + x[j]·sin`, in f32 from
    /// the stored values, rounded once.
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        qkv: &mut Self::Act,
        pos: &Self::Ints,
        cos: &Self::F32s,
        sin: &Self::F32s,
        n: usize,
        nh: usize,
        nkv: usize,
        hd: usize,
    ) -> Result<()>;

    /// Bidirectional attention over a merged `qkv` buffer `[B·T, (NH+2·NKV)·HD]` into
    /// `out` `[B·T, NH·HD]`, scale 1/√HD. `key_valid` (`[B·T]`, 1 = attend) masks padding keys;
    /// `None` attends to every key.
    fn attention(
        &self,
        out: &mut Self::Act,
        qkv: &Self::Act,
        key_valid: Option<&Self::Ints>,
        s: AttnShape,
    ) -> Result<()>;

    /// Write the (already rotated) k and v parts of a merged `qkv` buffer `[B·TQ, (NH+2·NKV)·HD]`
    /// into rows `[q0, q0 + TQ)` of each batch row of the caches `k_cache`, `v_cache`
    /// (`[B, L, NKV·HD]` each): `k_cache[bi·L + q0 + i] = k(qkv[bi·TQ + i])`. Exact copies.
    #[allow(clippy::too_many_arguments)]
    fn kv_store(
        &self,
        k_cache: &mut Self::Act,
        v_cache: &mut Self::Act,
        qkv: &Self::Act,
        q0: usize,
        s: CachedAttnShape,
    ) -> Result<()>;

    /// [`Backend::rope`] on the `B·TQ` rows of `qkv` (positions `rope.0`, tables `rope.1`,
    /// `rope.2`) fused with [`Backend::kv_store`] of the rotated k and the v into rows
    /// `[q0, q0 + TQ)` of `k_cache`, `v_cache`: one pass over the projection's output where the
    /// backend has the kernel (CUDA: `rope_kv_store_bf16`). This default runs the two ops in
    /// turn and is the reference; a fused kernel must equal it bit for bit.
    fn rope_kv_store(
        &self,
        qkv: &mut Self::Act,
        (k_cache, v_cache): (&mut Self::Act, &mut Self::Act),
        rope: (&Self::Ints, &Self::F32s, &Self::F32s),
        q0: usize,
        s: CachedAttnShape,
    ) -> Result<()> {
        let (pos, cos, sin) = rope;
        self.rope(qkv, pos, cos, sin, s.b * s.tq, s.nh, s.nkv, s.hd)?;
        self.kv_store(k_cache, v_cache, qkv, q0, s)
    }

    /// Bidirectional attention of the `TQ` queries per batch row in the q part of `qkv`
    /// (`[B·TQ, (NH+2·NKV)·HD]`; its k/v parts are ignored) over the `L` keys and values per batch
    /// row of `k_cache`, `v_cache` (`[B, L, NKV·HD]`), into `out` `[B·TQ, NH·HD]`, scale 1/√HD.
    /// `key_valid` is `[B·L]`. With `TQ = L` and caches holding the k/v parts of `qkv`, the result
    /// equals [`Backend::attention`] bit for bit (both backends run the same code for the two).
    fn attention_cached(
        &self,
        out: &mut Self::Act,
        qkv: &Self::Act,
        k_cache: &Self::Act,
        v_cache: &Self::Act,
        key_valid: Option<&Self::Ints>,
        s: CachedAttnShape,
    ) -> Result<()>;

    /// `out[N, F] = silu(gate) * up` on a merged `gate_up` `[N, 2F]`.
    fn swiglu(&self, out: &mut Self::Act, gate_up: &Self::Act, n: usize, f: usize) -> Result<()>;

    /// `out[r, :] = x[rows[r], :]` for `r < nrows`.
    fn gather_rows(
        &self,
        out: &mut Self::Act,
        x: &Self::Act,
        rows: &Self::Ints,
        nrows: usize,
        c: usize,
    ) -> Result<()>;

    /// The sampler's per-position head (see [`crate::backend::head::select_one`]) on logits `[R', V]`:
    /// with `p.cfg_scale > 0`, `R' = 2R` and rows `R..2R` are the unconditional logits of rows
    /// `0..R`. `keys` holds `2R` ints: (batch row, absolute position) per row for the RNG.
    /// Writes `tok[R]` and `conf[R]`. May overwrite `logits`.
    #[allow(clippy::too_many_arguments)]
    fn select(
        &self,
        tok: &mut Self::Ints,
        conf: &mut Self::F32s,
        logits: &mut Self::Act,
        keys: &Self::Ints,
        r: usize,
        v: usize,
        p: &SelectParams,
    ) -> Result<()>;

    /// The step's commit selection on the device ([`commit::commit_rows`] is the reference): per
    /// batch row `br`, the requested rows `seg[br]..seg[br+1]` whose token `ids[rows[i]]` is still
    /// `s.mask_id` are ranked by `conf` ([`commit::commit_select`]) and the ones `s.rule` keeps
    /// (with quota `plan[b + 1 + br]`) get `commit[i] = tok[i]`; every other of the `R` rows gets
    /// −1. `plan` is `[2B + 1]`: the offsets `seg`, then the quotas.
    #[allow(clippy::too_many_arguments)]
    fn commit_select(
        &self,
        commit: &mut Self::Ints,
        tok: &Self::Ints,
        conf: &Self::F32s,
        rows: &Self::Ints,
        ids: &Self::Ints,
        plan: &Self::Ints,
        s: commit::CommitShape,
    ) -> Result<()>;

    /// Log-probability of a target token under the softmax of each logits row (reference §5.1,
    /// the `F.cross_entropy` of `get_log_likelihood`, negated): for `i < r`,
    /// `out[i] = round(l[t_i] − m − ln Σ_v exp(l[v] − m))`, `m = max_v l[v]`, `t_i = targets[i]`,
    /// computed in f32 from the stored values and rounded once to the compute dtype (PyTorch's
    /// `log_softmax` on a bf16 tensor also computes in f32 and returns bf16). With
    /// `cfg_scale > 0`, `logits` holds `2R` rows, rows `R..2R` being the unconditional logits of
    /// rows `0..R`, and `l` is first mixed exactly as [`crate::backend::head::cfg_mix`] (each op rounded).
    /// CPU reference: [`crate::backend::cpu::log_prob_one`]. NaN logits give NaN; a row whose logits
    /// are all −∞ gives −∞. Targets must lie in `[0, V)`.
    #[allow(clippy::too_many_arguments)]
    fn log_prob(
        &self,
        out: &mut Self::F32s,
        logits: &Self::Act,
        targets: &Self::Ints,
        r: usize,
        v: usize,
        cfg_scale: f64,
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
