//! [`TrainOps`]: the training ops as one interface, so the model's forward and backward pass
//! ([`super::model::forward_backward_on`]) is written once and runs on the host
//! ([`HostOps`], over [`super::ops`]) or on a GPU ([`super::cuda::CudaOps`]).
//!
//! Every op has the meaning of its [`super::ops`] reference (same shapes, same argument order);
//! lengths are element counts. Weight gradients are accumulated (`+=`), activation gradients
//! written unless the op says otherwise. Buffers may be longer than an op reads.

use std::marker::PhantomData;

use anyhow::{ensure, Result};

use super::ops::{self, AttnShape, Real};

/// The training ops over one kind of buffer (host vectors, or device memory).
pub trait TrainOps {
    /// A float buffer (f32 on the GPU; `T` on the host).
    type Buf;
    /// An index buffer (token ids, rows, positions).
    type Ints;

    /// `len` zeros.
    fn zeros(&self, len: usize) -> Result<Self::Buf>;
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

    /// [`ops::embedding`] of the first `n` ids, rows of width `c`.
    fn embedding(
        &self,
        out: &mut Self::Buf,
        wte: &Self::Buf,
        ids: &Self::Ints,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// [`ops::embedding_bwd`] (`dwte` accumulated).
    fn embedding_bwd(
        &self,
        dwte: &mut Self::Buf,
        dx: &Self::Buf,
        ids: &[u32],
        c: usize,
    ) -> Result<()>;
    /// [`ops::rms_norm`]: `y`, and `r` `[N]` for the backward pass.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm(
        &self,
        y: &mut Self::Buf,
        r: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()>;
    /// [`ops::rms_norm_bwd`]: `dx` written, `dw` accumulated.
    #[allow(clippy::too_many_arguments)]
    fn rms_norm_bwd(
        &self,
        dx: &mut Self::Buf,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        r: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        c: usize,
    ) -> Result<()>;
    /// [`ops::linear`]: `y[N, M] = x[N, K]·wᵀ`.
    fn linear(
        &self,
        y: &mut Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()>;
    /// [`ops::linear_bwd`]: `dx = dy·w` (written, or added when `dx_accumulate`), `dw += dyᵀ·x`.
    #[allow(clippy::too_many_arguments)]
    fn linear_bwd(
        &self,
        dx: Option<&mut Self::Buf>,
        dx_accumulate: bool,
        dw: &mut Self::Buf,
        dy: &Self::Buf,
        x: &Self::Buf,
        w: &Self::Buf,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()>;
    /// [`ops::rope`] in place on the first `n` rows (tables from [`crate::backend::rope_tables`]).
    #[allow(clippy::too_many_arguments)]
    fn rope(
        &self,
        x: &mut Self::Buf,
        pos: &Self::Ints,
        cos: &Self::Buf,
        sin: &Self::Buf,
        n: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()>;
    /// [`ops::attention`]: `o`, and `lse` `[N, NH]` for the backward pass.
    fn attention(
        &self,
        o: &mut Self::Buf,
        lse: &mut Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        d: AttnShape,
    ) -> Result<()>;
    /// [`ops::attention_bwd`]: writes `dq`, `dk`, `dv`; `delta` is scratch `[N, NH]` (unused
    /// on the host).
    #[allow(clippy::too_many_arguments)]
    fn attention_bwd(
        &self,
        dq: &mut Self::Buf,
        dk: &mut Self::Buf,
        dv: &mut Self::Buf,
        delta: &mut Self::Buf,
        dout: &Self::Buf,
        q: &Self::Buf,
        k: &Self::Buf,
        v: &Self::Buf,
        o: &Self::Buf,
        lse: &Self::Buf,
        d: AttnShape,
    ) -> Result<()>;
    /// [`ops::swiglu`] over `len` elements.
    fn swiglu(&self, m: &mut Self::Buf, g: &Self::Buf, u: &Self::Buf, len: usize) -> Result<()>;
    /// [`ops::swiglu_bwd`] over `len` elements (written).
    #[allow(clippy::too_many_arguments)]
    fn swiglu_bwd(
        &self,
        dg: &mut Self::Buf,
        du: &mut Self::Buf,
        dm: &Self::Buf,
        g: &Self::Buf,
        u: &Self::Buf,
        len: usize,
    ) -> Result<()>;
    /// `x[..len] += d[..len]`.
    fn add(&self, x: &mut Self::Buf, d: &Self::Buf, len: usize) -> Result<()>;
    /// `out[i, :] = x[rows[i], :]` for the first `nrows` rows, width `c`.
    fn gather_rows(
        &self,
        out: &mut Self::Buf,
        x: &Self::Buf,
        rows: &Self::Ints,
        nrows: usize,
        c: usize,
    ) -> Result<()>;
    /// `dx[rows[i], :] += src[i, :]` in ascending `i`.
    fn scatter_add_rows(
        &self,
        dx: &mut Self::Buf,
        src: &Self::Buf,
        rows: &Self::Ints,
        nrows: usize,
        c: usize,
    ) -> Result<()>;
    /// [`ops::cross_entropy`] on the first `r` rows of `z` `[R, V]` (overwritten with the
    /// gradient); `loss_rows` `[R]` is scratch for the per-row losses (unused on the host).
    #[allow(clippy::too_many_arguments)]
    fn cross_entropy(
        &self,
        z: &mut Self::Buf,
        loss_rows: &mut Self::Buf,
        targets: &Self::Ints,
        weights: &Self::Buf,
        r: usize,
        v: usize,
    ) -> Result<f64>;
}

/// The sizes of one linear: `x` `[N, K]`, `w` `[M, K]`, `y` `[N, M]`.
#[derive(Clone, Copy, Debug)]
pub struct LinearDims {
    pub n: usize,
    pub k: usize,
    pub m: usize,
}

/// The inputs of a linear's backward pass.
#[derive(Clone, Copy, Debug)]
pub struct LinearBwd<'a, T> {
    pub dy: &'a [T],
    pub x: &'a [T],
    pub w: &'a [T],
    pub d: LinearDims,
}

/// What the linears of [`HostOps`] compute: [`PlainLinear`], or the LoRA linears over a frozen
/// base ([`super::lora::LoraLinear`]). Every other host op is the same for both.
pub trait HostLinear<T> {
    /// [`TrainOps::linear`].
    fn forward(&self, y: &mut [T], x: &[T], w: &[T], d: LinearDims) -> Result<()>;
    /// [`TrainOps::linear_bwd`] with `dx` written (when given).
    fn backward(&self, dx: Option<&mut [T]>, dw: &mut [T], a: LinearBwd<'_, T>) -> Result<()>;
    /// Whether the base model's weights train (false: no embedding gradient is computed).
    fn trains_base(&self) -> bool {
        true
    }
}

/// [`ops::linear`] and [`ops::linear_bwd`].
#[derive(Clone, Copy, Debug, Default)]
pub struct PlainLinear;

impl<T: Real> HostLinear<T> for PlainLinear {
    fn forward(&self, y: &mut [T], x: &[T], w: &[T], d: LinearDims) -> Result<()> {
        ops::linear(y, x, w, d.n, d.k, d.m);
        Ok(())
    }
    fn backward(&self, dx: Option<&mut [T]>, dw: &mut [T], a: LinearBwd<'_, T>) -> Result<()> {
        let LinearDims { n, k, m } = a.d;
        ops::linear_bwd(dx, dw, a.dy, a.x, a.w, n, k, m);
        Ok(())
    }
}

/// The host ops ([`super::ops`]) in `T` (f32 for training, f64 for gradient checks), with the
/// linears of `L`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostOps<T, L = PlainLinear> {
    lin: L,
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
            t: PhantomData,
        }
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

    fn embedding(
        &self,
        out: &mut Vec<T>,
        wte: &Vec<T>,
        ids: &Vec<u32>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        ops::embedding(out, wte, &ids[..n], c);
        Ok(())
    }
    fn embedding_bwd(&self, dwte: &mut Vec<T>, dx: &Vec<T>, ids: &[u32], c: usize) -> Result<()> {
        if self.lin.trains_base() {
            ops::embedding_bwd(dwte, dx, ids, c);
        }
        Ok(())
    }
    fn rms_norm(
        &self,
        y: &mut Vec<T>,
        r: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        c: usize,
        eps: f32,
    ) -> Result<()> {
        ops::rms_norm(y, r, x, w, n, c, eps as f64);
        Ok(())
    }
    fn rms_norm_bwd(
        &self,
        dx: &mut Vec<T>,
        dw: &mut Vec<T>,
        dy: &Vec<T>,
        x: &Vec<T>,
        r: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        c: usize,
    ) -> Result<()> {
        ops::rms_norm_bwd(dx, dw, dy, x, r, w, n, c);
        Ok(())
    }
    fn linear(
        &self,
        y: &mut Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        self.lin.forward(y, x, w, LinearDims { n, k, m })
    }
    fn linear_bwd(
        &self,
        dx: Option<&mut Vec<T>>,
        dx_accumulate: bool,
        dw: &mut Vec<T>,
        dy: &Vec<T>,
        x: &Vec<T>,
        w: &Vec<T>,
        n: usize,
        k: usize,
        m: usize,
    ) -> Result<()> {
        let a = LinearBwd {
            dy,
            x,
            w,
            d: LinearDims { n, k, m },
        };
        match dx {
            // Written into a scratch row set, then added: the same sums as writing `dx` alone.
            Some(dx) if dx_accumulate => {
                let mut part = vec![T::zero(); n * k];
                self.lin.backward(Some(&mut part), dw, a)?;
                for (a, &b) in dx.iter_mut().zip(&part) {
                    *a += b;
                }
                Ok(())
            }
            dx => self.lin.backward(dx.map(|d| d.as_mut_slice()), dw, a),
        }
    }
    fn rope(
        &self,
        x: &mut Vec<T>,
        pos: &Vec<u32>,
        cos: &Vec<T>,
        sin: &Vec<T>,
        n: usize,
        heads: usize,
        hd: usize,
        inverse: bool,
    ) -> Result<()> {
        ops::rope(x, &pos[..n], cos, sin, n, heads, hd, inverse);
        Ok(())
    }
    fn attention(
        &self,
        o: &mut Vec<T>,
        lse: &mut Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        d: AttnShape,
    ) -> Result<()> {
        ops::attention(o, lse, q, k, v, d);
        Ok(())
    }
    fn attention_bwd(
        &self,
        dq: &mut Vec<T>,
        dk: &mut Vec<T>,
        dv: &mut Vec<T>,
        _delta: &mut Vec<T>,
        dout: &Vec<T>,
        q: &Vec<T>,
        k: &Vec<T>,
        v: &Vec<T>,
        o: &Vec<T>,
        lse: &Vec<T>,
        d: AttnShape,
    ) -> Result<()> {
        ops::attention_bwd(dq, dk, dv, dout, q, k, v, o, lse, d);
        Ok(())
    }
    fn swiglu(&self, m: &mut Vec<T>, g: &Vec<T>, u: &Vec<T>, len: usize) -> Result<()> {
        ops::swiglu(&mut m[..len], &g[..len], &u[..len]);
        Ok(())
    }
    fn swiglu_bwd(
        &self,
        dg: &mut Vec<T>,
        du: &mut Vec<T>,
        dm: &Vec<T>,
        g: &Vec<T>,
        u: &Vec<T>,
        len: usize,
    ) -> Result<()> {
        ops::swiglu_bwd(
            &mut dg[..len],
            &mut du[..len],
            &dm[..len],
            &g[..len],
            &u[..len],
        );
        Ok(())
    }
    fn add(&self, x: &mut Vec<T>, d: &Vec<T>, len: usize) -> Result<()> {
        for (xv, &dv) in x[..len].iter_mut().zip(&d[..len]) {
            *xv += dv;
        }
        Ok(())
    }
    fn gather_rows(
        &self,
        out: &mut Vec<T>,
        x: &Vec<T>,
        rows: &Vec<u32>,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        for (i, &row) in rows[..nrows].iter().enumerate() {
            let row = row as usize;
            out[i * c..(i + 1) * c].copy_from_slice(&x[row * c..(row + 1) * c]);
        }
        Ok(())
    }
    fn scatter_add_rows(
        &self,
        dx: &mut Vec<T>,
        src: &Vec<T>,
        rows: &Vec<u32>,
        nrows: usize,
        c: usize,
    ) -> Result<()> {
        for (i, &row) in rows[..nrows].iter().enumerate() {
            let row = row as usize;
            for (o, &g) in dx[row * c..(row + 1) * c]
                .iter_mut()
                .zip(&src[i * c..(i + 1) * c])
            {
                *o += g;
            }
        }
        Ok(())
    }
    fn cross_entropy(
        &self,
        z: &mut Vec<T>,
        _loss_rows: &mut Vec<T>,
        targets: &Vec<u32>,
        weights: &Vec<T>,
        r: usize,
        v: usize,
    ) -> Result<f64> {
        Ok(ops::cross_entropy(
            &mut z[..r * v],
            &targets[..r],
            &weights[..r],
            v,
        ))
    }
}
