//! A tensor read as `base + Δ` with a low-rank `Δ = scale·B·A` (a LoRA adapter merged as the
//! weights are read, `WeightSource::Lora` of [`super::checkpoint`]). The adapter format itself (PEFT's
//! folders, names, scaling rules) is [`crate::lora`]; this is only the arithmetic of the merge,
//! so the weight sources need nothing from the adapter code.

use rayon::prelude::*;

use super::dtype::DType;

/// What kind of module an adapter updates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModuleKind {
    /// `nn.Linear` `[out, in]`: `A` `[r, in]`, `B` `[out, r]`, `ΔW = s·B·A`.
    Linear,
    /// `nn.Embedding` `[V, C]`: `A` `[r, V]`, `B` `[C, r]`, `ΔW = s·(B·A)ᵀ`.
    Embedding,
}

/// The low-rank update of one tensor, applied as `WeightSource::Lora` reads it.
#[derive(Debug, PartialEq)]
pub struct Delta {
    pub kind: ModuleKind,
    pub rank: usize,
    /// Columns of the base tensor.
    pub cols: usize,
    pub scale: f32,
    pub a: Vec<f32>,
    pub b: Vec<f32>,
}

impl Delta {
    /// `scale·Σ_k B[i,k]·A[k,j]` (linear) or `scale·Σ_k B[j,k]·A[k,i]` (embedding), f32.
    #[inline]
    pub fn at(&self, i: usize, j: usize) -> f32 {
        let r = self.rank;
        let mut s = 0.0f32;
        match self.kind {
            ModuleKind::Linear => {
                let cols = self.cols;
                for (k, &bk) in self.b[i * r..(i + 1) * r].iter().enumerate() {
                    s += bk * self.a[k * cols + j];
                }
            }
            ModuleKind::Embedding => {
                let rows = self.a.len() / r;
                for (k, &bk) in self.b[j * r..(j + 1) * r].iter().enumerate() {
                    s += bk * self.a[k * rows + i];
                }
            }
        }
        s * self.scale
    }

    /// `out` holds elements `[from, from + out.len())` of the base tensor; add `Δ` to each and
    /// round it once to `dtype` (the base's).
    pub fn merge_into(&self, dtype: DType, from: usize, out: &mut [f32]) {
        let cols = self.cols.max(1);
        let merge = |first: usize, chunk: &mut [f32]| {
            for (o, idx) in chunk.iter_mut().zip(first..) {
                *o = dtype.round(*o + self.at(idx / cols, idx % cols));
            }
        };
        // One row at a time (the CPU backend's matmul) stays on the calling thread; whole
        // tensors (loaders, writers) are merged in parallel.
        const BLOCK: usize = 1 << 14;
        if out.len() <= BLOCK {
            merge(from, out);
        } else {
            out.par_chunks_mut(BLOCK)
                .enumerate()
                .for_each(|(c, chunk)| merge(from + c * BLOCK, chunk));
        }
    }
}
