//! [`TrainOps`]: the training ops as one interface, so the model's forward and backward pass
//! ([`super::model::forward_backward_on`]) is written once and runs on the host
//! ([`HostOps`], over [`super::ops`]) or on a GPU ([`super::cuda::CudaOps`]).
//!
//! Every op has the meaning of its [`super::ops`] reference (same shapes, same argument order);
//! lengths are element counts. Weight gradients are accumulated (`+=`), activation gradients
//! written unless the op says otherwise. Buffers may be longer than an op reads.
//!
//! An op's arguments are its outputs (`&mut`), then what it reads: the buffers, and the sizes in
//! the op family's struct ([`Rows`], [`MatMul`], [`AttnShape`]); a backward pass reads its
//! saved operands from one struct ([`LinearGrad`], [`NormGrad`], [`AttnGrad`], [`SwigluGrad`]).

use std::marker::PhantomData;

use anyhow::{ensure, Result};
use serde::{Deserialize, Serialize};

use super::ops::{self, AttnShape, Real};
pub use super::ops::{LinearBwd, MatMul, Rows};
use crate::hf::dtype::DType;

/// How weights and activations are stored (`llada train --storage`; the names are `f32` and
/// `bf16`). What each buffer holds in bf16 storage is written in [`super::mixed`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Storage {
    /// Everything f32 (`--precision` f32 or bf16 only changes the GPU's GEMM compute type).
    #[default]
    F32,
    /// bf16 weights and activations (and activation gradients), f32 master weights, moments,
    /// weight gradients and per-row statistics; bf16 GEMMs with f32 accumulation.
    Bf16,
}

impl Storage {
    pub fn name(self) -> &'static str {
        crate::names::name_of(STORAGES, &self)
    }
}

/// The `--storage` names, for parsing and printing.
const STORAGES: &[(&str, Storage)] = &[("f32", Storage::F32), ("bf16", Storage::Bf16)];

crate::names::named_enum!(Storage, "storage", STORAGES);

/// The training ops over one kind of buffer (host vectors, or device memory).
pub trait TrainOps {
    /// A float buffer (f32 on the GPU; `T` on the host).
    type Buf;
    /// An index buffer (token ids, rows, positions).
    type Ints;

    /// `len` zeros (in the storage's activation dtype: bf16 in bf16 storage).
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
    /// `len` zeros in f32 whatever the storage: the per-row statistics (a norm's `r`,
    /// attention's `lse` and `delta`, the loss rows) the pass keeps beside its activations.
    fn zeros_f32(&self, len: usize) -> Result<Self::Buf> {
        self.zeros(len)
    }
    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf>;
    /// The first `n` elements of `src`, as f32 (a device synchronizes).
    fn download(&self, src: &Self::Buf, n: usize) -> Result<Vec<f32>>;
    /// A buffer holding `host` in the buffer's precision.
    fn upload_f64(&self, host: &[f64]) -> Result<Self::Buf>;
    /// An index buffer holding `host` (values are checked by the ops that read them).
    fn ints(&self, host: &[u32]) -> Result<Self::Ints>;
    /// `dst[..src.len()] = src`.
    fn copy(&self, dst: &mut Self::Buf, src: &Self::Buf) -> Result<()>;
    /// The queued work is done (a device surfaces a kernel fault here, naming `what`).
    fn finish(&self, what: &str) -> Result<()>;

    /// [`ops::embedding`]: `out[i, :] = wte[ids[i], :]` for the `N` rows of `ids`.
    fn embedding(&self, out: &mut Self::Buf, wte: &Self::Buf, ids: RowIds<Self>) -> Result<()>;
    /// [`ops::embedding_bwd`] (`dwte` accumulated; the ids are read on the host).
    fn embedding_bwd(&self, dwte: &mut Self::Buf, dx: &Self::Buf, ids: RowIds<Self>) -> Result<()>;
    /// [`ops::rms_norm`]: `y`, and `r` `[N]` for the backward pass.
    fn rms_norm(&self, y: &mut Self::Buf, r: &mut Self::Buf, a: Norm<Self>) -> Result<()>;
    /// [`ops::rms_norm_bwd`]: `dx` written, `dw` accumulated (`None`: a frozen weight, only
    /// `dx` is computed).
    fn rms_norm_bwd(
        &self,
        dx: &mut Self::Buf,
        dw: Option<&mut Self::Buf>,
        a: NormGrad<Self>,
    ) -> Result<()>;
    /// [`ops::linear`]: `y[N, M] = x[N, K]·wᵀ`.
    fn linear(&self, y: &mut Self::Buf, x: &Self::Buf, w: &Self::Buf, d: MatMul) -> Result<()>;
    /// [`ops::linear_bwd`]: `dx = dy·w` (as [`Dx`] says), `dw += dyᵀ·x` (`None`: a frozen
    /// weight, no `dw` work).
    fn linear_bwd(
        &self,
        dx: Dx<Self>,
        dw: Option<&mut Self::Buf>,
        a: LinearGrad<Self>,
    ) -> Result<()>;
    /// [`ops::rope`] in place on the first `t.n` rows of `heads` heads (`inverse`: the backward).
    fn rope(&self, x: &mut Self::Buf, t: &Rope<Self>, heads: usize, inverse: bool) -> Result<()>;
    /// [`ops::attention`]: `o`, and `lse` `[N, NH]` for the backward pass.
    fn attention(&self, o: &mut Self::Buf, lse: &mut Self::Buf, a: Qkv<Self>) -> Result<()>;
    /// [`ops::attention_bwd`]: writes `dq`, `dk`, `dv`; `delta` is scratch `[N, NH]` (unused
    /// on the host).
    fn attention_bwd(&self, g: QkvGrads<Self>, a: AttnGrad<Self>) -> Result<()>;
    /// [`ops::swiglu`] over `len` elements.
    fn swiglu(&self, m: &mut Self::Buf, g: &Self::Buf, u: &Self::Buf, len: usize) -> Result<()>;
    /// [`ops::swiglu_bwd`] (written).
    fn swiglu_bwd(&self, dg: &mut Self::Buf, du: &mut Self::Buf, a: SwigluGrad<Self>)
        -> Result<()>;
    /// `x[..len] += d[..len]`.
    fn add(&self, x: &mut Self::Buf, d: &Self::Buf, len: usize) -> Result<()>;
    /// `out[i, :] = x[rows[i], :]` for the `N` rows of `rows`.
    fn gather_rows(&self, out: &mut Self::Buf, x: &Self::Buf, rows: RowIds<Self>) -> Result<()>;
    /// Backward of [`TrainOps::gather_rows`]: `dx[rows[i], :] += dy[i, :]` in ascending `i`.
    fn scatter_add_rows(&self, dx: &mut Self::Buf, dy: &Self::Buf, at: RowIds<Self>) -> Result<()>;
    /// [`ops::cross_entropy`] on the `R` rows of `z` `[R, V]` (overwritten with the gradient);
    /// `loss` `[R]` is scratch for the per-row losses (unused on the host).
    fn cross_entropy(
        &self,
        z: &mut Self::Buf,
        loss: &mut Self::Buf,
        t: Targets<Self>,
    ) -> Result<f64>;
}

/// Operand structs of [`TrainOps`] (borrowing for `'a`, over the ops `B`), each with `new`
/// taking its fields in order.
macro_rules! operands {
    ($($(#[$m:meta])* $name:ident { $($f:ident: $t:ty),* $(,)? })*) => {$(
        $(#[$m])*
        pub struct $name<'a, B: TrainOps + ?Sized> {
            $(pub $f: $t,)*
        }

        impl<'a, B: TrainOps + ?Sized> $name<'a, B> {
            pub fn new($($f: $t),*) -> Self {
                $name { $($f),* }
            }
        }
    )*};
}

operands! {
    /// The rows an index buffer picks: row `i` of an op's `[N, C]` side is row `ids[i]` of the
    /// other side (an embedding table, or the buffer gathered from or scattered into). The op
    /// checks every id against the other side's rows.
    RowIds { ids: &'a B::Ints, d: Rows }
    /// What [`TrainOps::linear_bwd`] reads: the output gradient `dy` `[N, M]` and the forward's
    /// `x` `[N, K]`, `w` `[M, K]` (the device form of [`LinearBwd`]).
    LinearGrad { dy: &'a B::Buf, x: &'a B::Buf, w: &'a B::Buf, d: MatMul }
    /// An RMSNorm's forward ([`TrainOps::rms_norm`]): rows `x` `[N, C]`, weight `w` `[C]`, `eps`.
    Norm { x: &'a B::Buf, w: &'a B::Buf, d: Rows, eps: f32 }
    /// What [`TrainOps::rms_norm_bwd`] reads: the output gradient `dy` `[N, C]`, the forward's
    /// `x`, its `r` `[N]` and the weight `w` `[C]`.
    NormGrad { dy: &'a B::Buf, x: &'a B::Buf, r: &'a B::Buf, w: &'a B::Buf, d: Rows }
    /// Attention's inputs ([`TrainOps::attention`]): `q` `[N, NH·HD]`, `k`, `v` `[N, NKV·HD]`.
    Qkv { q: &'a B::Buf, k: &'a B::Buf, v: &'a B::Buf, d: AttnShape }
    /// What [`TrainOps::attention_bwd`] writes: `dq`, `dk`, `dv` (shaped as `q`, `k`, `v`), and
    /// the scratch `delta` `[N, NH]`.
    QkvGrads { dq: &'a mut B::Buf, dk: &'a mut B::Buf, dv: &'a mut B::Buf, delta: &'a mut B::Buf }
    /// What [`TrainOps::attention_bwd`] reads: the output gradient `dout`, the forward's inputs
    /// `qkv`, its output `o` and its `lse`.
    AttnGrad { dout: &'a B::Buf, qkv: Qkv<'a, B>, o: &'a B::Buf, lse: &'a B::Buf }
    /// What [`TrainOps::swiglu_bwd`] reads: the output gradient `dm` and the forward's `g`, `u`
    /// (`len` elements each).
    SwigluGrad { dm: &'a B::Buf, g: &'a B::Buf, u: &'a B::Buf, len: usize }
    /// The labels of [`TrainOps::cross_entropy`]: per row of the `[R, V]` logits (`d`) a target
    /// id in `[0, V)` and a loss weight.
    Targets { ids: &'a B::Ints, weights: &'a B::Buf, d: Rows }
}

/// What [`TrainOps::linear_bwd`] does with the input gradient `dx = dy·w`.
pub enum Dx<'a, B: TrainOps + ?Sized> {
    /// Not computed (only `dw`).
    Skip,
    /// Written.
    Write(&'a mut B::Buf),
    /// Added to what the buffer holds (several linears reading one input).
    Add(&'a mut B::Buf),
}

impl<'a, B: TrainOps + ?Sized> Dx<'a, B> {
    /// The buffer, and whether it is added to.
    pub fn split(self) -> (Option<&'a mut B::Buf>, bool) {
        match self {
            Dx::Skip => (None, false),
            Dx::Write(b) => (Some(b), false),
            Dx::Add(b) => (Some(b), true),
        }
    }
}

/// RoPE's operands ([`TrainOps::rope`]): row `i` of the `n` rows is at position `pos[i]`; the
/// tables `cos`, `sin` are `[max_pos, hd/2]` ([`crate::backend::rope_tables`]).
pub struct Rope<B: TrainOps + ?Sized> {
    pub pos: B::Ints,
    pub cos: B::Buf,
    pub sin: B::Buf,
    pub n: usize,
    pub hd: usize,
}

/// A gradient a host op writes or accumulates into, or `None` (not wanted: an input gradient
/// nobody reads, or a frozen weight's).
pub type Grad<'a, T> = Option<&'a mut [T]>;

/// What the linears of [`HostOps`] compute: [`PlainLinear`], or the LoRA linears over a frozen
/// base ([`super::lora::LoraLinear`]). Every other host op is the same for both.
pub trait HostLinear<T> {
    /// [`TrainOps::linear`].
    fn forward(&self, y: &mut [T], x: &[T], w: &[T], d: MatMul) -> Result<()>;
    /// [`TrainOps::linear_bwd`] with `dx` written (when given) and `dw` accumulated (when
    /// given: `None` is a frozen weight).
    fn backward(&self, dx: Grad<'_, T>, dw: Grad<'_, T>, a: LinearBwd<'_, T>) -> Result<()>;
}

/// [`ops::linear`] and [`ops::linear_bwd`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainLinear;

impl<T: Real> HostLinear<T> for PlainLinear {
    fn forward(&self, y: &mut [T], x: &[T], w: &[T], d: MatMul) -> Result<()> {
        ops::linear(y, x, w, d.n, d.k, d.m);
        Ok(())
    }
    fn backward(&self, dx: Grad<'_, T>, dw: Grad<'_, T>, a: LinearBwd<'_, T>) -> Result<()> {
        match (dx, dw) {
            (dx, Some(dw)) => ops::linear_bwd(dx, dw, a),
            (Some(dx), None) => ops::linear_dx(dx, a),
            (None, None) => {}
        }
        Ok(())
    }
}

/// The host ops ([`super::ops`]) in `T` (f32 for training, f64 for gradient checks), with the
/// linears of `L`, in a [`Storage`]: in bf16 storage (the CPU reference of the GPU's, see
/// [`super::mixed`]) every op computes in `T` as in f32 storage, refuses an operand the device
/// holds in bf16 that is not a bf16 value (naming the op and the operand), and rounds what it
/// writes into such a buffer to bf16 (RNE); weight gradients and the f32 per-row statistics
/// ([`TrainOps::zeros_f32`]) are neither checked nor rounded.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostOps<T, L = PlainLinear> {
    lin: L,
    store: Storage,
    t: PhantomData<T>,
}

impl<T> HostOps<T> {
    pub fn new() -> HostOps<T> {
        HostOps::with_linear(PlainLinear)
    }
}

impl<T, L> HostOps<T, L> {
    /// Host ops whose linears are `lin`'s.
    pub fn with_linear(lin: L) -> HostOps<T, L> {
        HostOps {
            lin,
            store: Storage::F32,
            t: PhantomData,
        }
    }

    /// The same ops in `store`.
    pub fn with_storage(self, store: Storage) -> HostOps<T, L> {
        HostOps { store, ..self }
    }
}

/// `x` rounded to bf16 (RNE; f64 through f32).
fn to_bf16<T: Real>(x: T) -> T {
    T::from_f64(DType::BF16.round(x.to_f64() as f32) as f64)
}

impl<T: Real, L> HostOps<T, L> {
    /// bf16 storage: every operand of `read` holds bf16 values (NaN passes: the loss check
    /// reports it).
    fn read(&self, op: &str, read: &[(&str, &[T])]) -> Result<()> {
        if self.store == Storage::F32 {
            return Ok(());
        }
        for (name, x) in read {
            let bad = x.iter().position(|&v| {
                let f = v.to_f64();
                !f.is_nan() && to_bf16(v).to_f64().to_bits() != f.to_bits()
            });
            if let Some(i) = bad {
                anyhow::bail!(
                    "{op}: `{name}`[{i}] = {:e} is not a bf16 value, and bf16 storage holds \
                     `{name}` in bf16",
                    x[i].to_f64()
                );
            }
        }
        Ok(())
    }

    /// bf16 storage: round what an op wrote into `x` (a bf16 buffer) to bf16.
    fn keep(&self, x: &mut [T]) -> Result<()> {
        if self.store == Storage::Bf16 {
            x.iter_mut().for_each(|v| *v = to_bf16(*v));
        }
        Ok(())
    }
}

impl<T: Real, L: HostLinear<T>> TrainOps for HostOps<T, L> {
    type Buf = Vec<T>;
    type Ints = Vec<u32>;

    fn zeros(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zero(); len])
    }
    fn upload(&self, host: &[f32]) -> Result<Vec<T>> {
        Ok(host.iter().map(|&x| T::from_f64(x as f64)).collect())
    }
    fn download(&self, src: &Vec<T>, n: usize) -> Result<Vec<f32>> {
        ensure!(
            src.len() >= n,
            "download: `src` holds {}, asked for {n}",
            src.len()
        );
        Ok(src[..n].iter().map(|x| x.to_f64() as f32).collect())
    }
    fn upload_f64(&self, host: &[f64]) -> Result<Vec<T>> {
        Ok(host.iter().map(|&x| T::from_f64(x)).collect())
    }
    fn ints(&self, host: &[u32]) -> Result<Vec<u32>> {
        Ok(host.to_vec())
    }
    fn copy(&self, dst: &mut Vec<T>, src: &Vec<T>) -> Result<()> {
        ensure!(
            dst.len() >= src.len(),
            "copy: `dst` holds {}, `src` {}",
            dst.len(),
            src.len()
        );
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn finish(&self, _what: &str) -> Result<()> {
        Ok(())
    }

    fn embedding(&self, out: &mut Vec<T>, wte: &Vec<T>, ids: RowIds<Self>) -> Result<()> {
        self.read("embedding", &[("wte", wte)])?;
        ops::embedding(out, wte, &ids.ids[..ids.d.n], ids.d.c);
        Ok(())
    }
    fn embedding_bwd(&self, dwte: &mut Vec<T>, dx: &Vec<T>, ids: RowIds<Self>) -> Result<()> {
        self.read("embedding_bwd", &[("dx", dx)])?;
        ops::embedding_bwd(dwte, dx, &ids.ids[..ids.d.n], ids.d.c);
        Ok(())
    }
    fn rms_norm(&self, y: &mut Vec<T>, r: &mut Vec<T>, a: Norm<Self>) -> Result<()> {
        self.read("rms_norm", &[("x", a.x), ("w", a.w)])?;
        ops::rms_norm(y, r, a.x, a.w, a.d, a.eps as f64);
        self.keep(y)
    }
    fn rms_norm_bwd(
        &self,
        dx: &mut Vec<T>,
        dw: Option<&mut Vec<T>>,
        a: NormGrad<Self>,
    ) -> Result<()> {
        self.read("rms_norm_bwd", &[("dy", a.dy), ("x", a.x), ("w", a.w)])?;
        match dw {
            Some(dw) => ops::rms_norm_bwd(dx, dw, a.dy, a.x, a.r, a.w, a.d),
            None => ops::rms_norm_dx(dx, a.dy, a.x, a.r, a.w, a.d),
        }
        self.keep(dx)
    }
    fn linear(&self, y: &mut Vec<T>, x: &Vec<T>, w: &Vec<T>, d: MatMul) -> Result<()> {
        self.read("linear", &[("x", x), ("w", w)])?;
        self.lin.forward(y, x, w, d)?;
        self.keep(y)
    }
    fn linear_bwd(&self, dx: Dx<Self>, dw: Option<&mut Vec<T>>, a: LinearGrad<Self>) -> Result<()> {
        self.read("linear_bwd", &[("dy", a.dy), ("x", a.x), ("w", a.w)])?;
        let dw = dw.map(|d| d.as_mut_slice());
        let (n, k) = (a.d.n, a.d.k);
        let a = LinearBwd {
            dy: a.dy,
            x: a.x,
            w: a.w,
            d: a.d,
        };
        match dx.split() {
            // Written into a scratch row set, then added: the same sums as writing `dx` alone.
            (Some(dx), true) => {
                let mut part = vec![T::zero(); n * k];
                self.lin.backward(Some(&mut part), dw, a)?;
                for (a, &b) in dx.iter_mut().zip(&part) {
                    *a += b;
                }
                self.keep(dx)
            }
            (Some(dx), false) => {
                self.lin.backward(Some(dx.as_mut_slice()), dw, a)?;
                self.keep(dx)
            }
            (None, _) => self.lin.backward(None, dw, a),
        }
    }
    fn rope(&self, x: &mut Vec<T>, t: &Rope<Self>, heads: usize, inverse: bool) -> Result<()> {
        self.read("rope", &[("x", x)])?;
        ops::rope(x, &t.pos[..t.n], (&t.cos, &t.sin), heads, t.hd, inverse);
        self.keep(x)
    }
    fn attention(&self, o: &mut Vec<T>, lse: &mut Vec<T>, a: Qkv<Self>) -> Result<()> {
        self.read("attention", &[("q", a.q), ("k", a.k), ("v", a.v)])?;
        ops::attention(o, lse, a.q, a.k, a.v, a.d);
        self.keep(o)
    }
    fn attention_bwd(&self, g: QkvGrads<Self>, a: AttnGrad<Self>) -> Result<()> {
        let (q, saved) = (a.qkv, (&a.dout[..], &a.o[..], &a.lse[..]));
        let read = [
            ("dout", saved.0),
            ("o", saved.1),
            ("q", q.q),
            ("k", q.k),
            ("v", q.v),
        ];
        self.read("attention_bwd", &read)?;
        ops::attention_bwd(
            (&mut *g.dq, &mut *g.dk, &mut *g.dv),
            saved,
            (q.q, q.k, q.v),
            q.d,
        );
        self.keep(g.dq)?;
        self.keep(g.dk)?;
        self.keep(g.dv)
    }
    fn swiglu(&self, m: &mut Vec<T>, g: &Vec<T>, u: &Vec<T>, len: usize) -> Result<()> {
        self.read("swiglu", &[("g", &g[..len]), ("u", &u[..len])])?;
        ops::swiglu(&mut m[..len], &g[..len], &u[..len]);
        self.keep(&mut m[..len])
    }
    fn swiglu_bwd(&self, dg: &mut Vec<T>, du: &mut Vec<T>, a: SwigluGrad<Self>) -> Result<()> {
        let n = a.len;
        let (dm, g, u) = (&a.dm[..n], &a.g[..n], &a.u[..n]);
        self.read("swiglu_bwd", &[("dm", dm), ("g", g), ("u", u)])?;
        ops::swiglu_bwd(&mut dg[..n], &mut du[..n], dm, g, u);
        self.keep(&mut dg[..n])?;
        self.keep(&mut du[..n])
    }
    fn add(&self, x: &mut Vec<T>, d: &Vec<T>, len: usize) -> Result<()> {
        self.read("add", &[("x", &x[..len]), ("d", &d[..len])])?;
        for (xv, &dv) in x[..len].iter_mut().zip(&d[..len]) {
            *xv += dv;
        }
        self.keep(&mut x[..len])
    }
    fn gather_rows(&self, out: &mut Vec<T>, x: &Vec<T>, rows: RowIds<Self>) -> Result<()> {
        self.read("gather_rows", &[("x", x)])?;
        let c = rows.d.c;
        for (i, &row) in rows.ids[..rows.d.n].iter().enumerate() {
            let row = row as usize;
            out[i * c..(i + 1) * c].copy_from_slice(&x[row * c..(row + 1) * c]);
        }
        Ok(())
    }
    fn scatter_add_rows(&self, dx: &mut Vec<T>, dy: &Vec<T>, at: RowIds<Self>) -> Result<()> {
        self.read("scatter_add_rows", &[("dx", dx), ("dy", dy)])?;
        let c = at.d.c;
        for (i, &row) in at.ids[..at.d.n].iter().enumerate() {
            let row = row as usize;
            let dst = &mut dx[row * c..(row + 1) * c];
            for (o, &g) in dst.iter_mut().zip(&dy[i * c..(i + 1) * c]) {
                *o += g;
            }
            // bf16 storage: every add rounds (as the kernel's), also for a repeated row.
            self.keep(dst)?;
        }
        Ok(())
    }
    fn cross_entropy(&self, z: &mut Vec<T>, _: &mut Vec<T>, t: Targets<Self>) -> Result<f64> {
        let Rows { n: r, c: v } = t.d;
        let (ids, w) = (&t.ids[..r], &t.weights[..r]);
        self.read("cross_entropy", &[("z", &z[..r * v])])?;
        let loss = ops::cross_entropy(&mut z[..r * v], ids, w, v);
        self.keep(&mut z[..r * v])?;
        Ok(loss)
    }
}
