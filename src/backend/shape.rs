//! The sizes of the [`crate::backend::Backend`] ops, one small struct per op family, so each
//! op's signature reads `outputs, inputs, shape`: the dimension letters of [`crate::backend`] as
//! fields, checked by every backend against its buffers. A leaf: it imports nothing of the
//! crate, so the CPU references outside the backend (the FP8 GEMM) take these shapes too.

/// `N` rows of `C` elements: the ops `add` (`x`, `d` `[N, C]`) and `swiglu` (`C = F`: `out`
/// `[N, F]` from `gate_up` `[N, 2F]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Rows {
    pub n: usize,
    pub c: usize,
}

/// An RMSNorm over `N` rows of `C` elements with epsilon `eps` (the ops `rms_norm`,
/// `add_rms_norm`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Norm {
    pub n: usize,
    pub c: usize,
    pub eps: f32,
}

impl Norm {
    pub fn new(n: usize, c: usize, eps: f32) -> Self {
        Norm { n, c, eps }
    }
}

/// `out[N, M] = x[N, K] · wᵀ` with `w` `[M, K]` (the op `matmul`, the FP8 GEMMs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MatMul {
    pub n: usize,
    pub k: usize,
    pub m: usize,
}

/// One layer's key and value caches, `[B, L, NKV·HD]` each (`T` is `&mut Act` where an op writes
/// them, `&Act` where it reads them).
pub struct Kv<T> {
    pub k: T,
    pub v: T,
}

impl<T> Kv<T> {
    pub fn new(k: T, v: T) -> Self {
        Kv { k, v }
    }
}

/// The sizes of the LM-head ops `select` and `log_prob`: `R` requested rows over a vocabulary
/// of `V`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HeadDims {
    pub r: usize,
    pub v: usize,
}

impl HeadDims {
    /// Rows of the logits the head reads: `R`, or `2R` with CFG (`cfg_scale > 0`; rows
    /// `R..2R` are the unconditional logits of rows `0..R`).
    pub fn logit_rows(&self, cfg_scale: f64) -> usize {
        if cfg_scale > 0.0 {
            2 * self.r
        } else {
            self.r
        }
    }
}

/// The sizes of one `log_prob`: `R` targets over a vocabulary of `V`; with `cfg_scale > 0` the
/// logits hold `2R` rows (rows `R..2R` the unconditional ones), mixed by that scale.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LogProb {
    pub r: usize,
    pub v: usize,
    pub cfg_scale: f64,
}

impl LogProb {
    pub fn new(r: usize, v: usize, cfg_scale: f64) -> Self {
        LogProb { r, v, cfg_scale }
    }

    /// [`HeadDims::logit_rows`] at this call's scale.
    pub fn logit_rows(&self) -> usize {
        HeadDims {
            r: self.r,
            v: self.v,
        }
        .logit_rows(self.cfg_scale)
    }
}

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

impl AttnShape {
    pub fn new(b: usize, t: usize, nh: usize, nkv: usize, hd: usize) -> Self {
        AttnShape { b, t, nh, nkv, hd }
    }

    /// Rows of the merged `qkv` buffer (`B·T`).
    pub fn rows(&self) -> usize {
        self.b * self.t
    }

    /// Columns of a merged `qkv` row: `(NH + 2·NKV)·HD`.
    pub fn qkv_width(&self) -> usize {
        (self.nh + 2 * self.nkv) * self.hd
    }

    /// The same call as a cached one whose `L = T` keys are the sequence's own (`q0 = 0`): both
    /// backends run full attention through the cached code.
    pub fn full(&self) -> CachedAttnShape {
        CachedAttnShape {
            b: self.b,
            tq: self.t,
            l: self.t,
            q0: 0,
            nh: self.nh,
            nkv: self.nkv,
            hd: self.hd,
        }
    }
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
    /// Absolute position of the first query token: `kv_store` writes cache rows `[q0, q0 + TQ)`
    /// (attention itself does not depend on it).
    pub q0: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
}

impl CachedAttnShape {
    /// `(b, tq, l, nh, nkv, hd)`, in the fields' order (without `q0`).
    pub fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        (self.b, self.tq, self.l, self.nh, self.nkv, self.hd)
    }

    /// The query side as an [`AttnShape`] (`B` rows of `TQ` tokens; RoPE's shape).
    pub fn queries(&self) -> AttnShape {
        AttnShape {
            b: self.b,
            t: self.tq,
            nh: self.nh,
            nkv: self.nkv,
            hd: self.hd,
        }
    }
}
