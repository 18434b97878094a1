//! Weights of the CPU backend: dense, memory-mapped (decoded row by row) or a scalar constant,
//! and the checks of a weight source before it is used.

use super::*;

/// Where the rows of one part of a [`CpuWeight`] live.
#[derive(Debug)]
pub(super) enum Store {
    /// Row-major f32 values, representable in the compute dtype.
    Dense(Vec<f32>),
    /// Every element equal to this value.
    Scalar(f32),
    /// A memory-mapped tensor, decoded on use (and rounded to the compute dtype if it is a
    /// different dtype: `round` is `Some` then).
    Lazy {
        src: WeightSource,
        round: Option<DType>,
    },
    /// An FP8 weight (codes + per-row scales); rows decode dequantized.
    Fp8(crate::quant::fp8::Fp8Weight),
}

#[derive(Debug)]
pub(super) struct Part {
    pub(super) first_row: usize,
    pub(super) rows: usize,
    pub(super) store: Store,
}

/// A weight on the CPU: one or more parts stacked along the rows (`[rows, cols]`; a 1-D norm
/// weight is one row).
#[derive(Debug)]
pub struct CpuWeight {
    pub(super) rows: usize,
    pub(super) cols: usize,
    pub(super) parts: Vec<Part>,
    pub(super) name: String,
    /// The FP8 parts again, in order, when this is an FP8 weight (`matmul` takes the FP8 path).
    pub(super) fp8: Vec<crate::quant::fp8::Fp8Weight>,
}

impl CpuWeight {
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// Row `r` (`r < rows`), either borrowed from dense storage or decoded into `buf`
    /// (`buf.len() == cols`).
    pub(super) fn row<'a>(&'a self, r: usize, buf: &'a mut [f32]) -> &'a [f32] {
        // Invariant: parts cover 0..rows contiguously (built by `load_weight`), callers check r.
        let part = self
            .parts
            .iter()
            .find(|p| r < p.first_row + p.rows)
            .unwrap_or(&self.parts[self.parts.len() - 1]);
        let lr = r - part.first_row;
        let c = self.cols;
        match &part.store {
            Store::Dense(d) => &d[lr * c..(lr + 1) * c],
            Store::Scalar(v) => {
                buf.fill(*v);
                buf
            }
            Store::Lazy { src, round } => {
                src.read_range(lr * c, (lr + 1) * c, buf);
                if let Some(dt) = round {
                    dt.round_slice(buf);
                }
                buf
            }
            Store::Fp8(w) => {
                w.dequant_row(lr, buf);
                buf
            }
        }
    }

    /// All elements as one dense vector (small weights only: norm weights).
    pub(super) fn is_dense_single(&self) -> Option<&[f32]> {
        match self.parts.as_slice() {
            [Part {
                store: Store::Dense(d),
                ..
            }] => Some(d),
            _ => None,
        }
    }
}

pub(super) fn check_source(src: &WeightSource) -> Result<()> {
    let numel = src.numel();
    match src {
        WeightSource::Mapped {
            mmap,
            start,
            end,
            dtype,
            name,
            ..
        } => {
            ensure!(
                start <= end && *end <= mmap.len(),
                "load_weight: tensor `{name}` byte range {start}..{end} lies outside its file ({} bytes)",
                mmap.len()
            );
            ensure!(
                end - start == numel * dtype.size(),
                "load_weight: tensor `{name}` holds {} bytes, its shape {:?} in {dtype} needs {}",
                end - start,
                src.shape(),
                numel * dtype.size()
            );
        }
        WeightSource::Host { data, name, .. } => ensure!(
            data.len() == numel,
            "load_weight: host tensor `{name}` holds {} values, its shape {:?} needs {numel}",
            data.len(),
            src.shape()
        ),
        WeightSource::Random { .. } | WeightSource::Const { .. } => {}
        WeightSource::Lora { base, .. } => check_source(base)?,
    }
    Ok(())
}

impl CpuBackend {
    pub(super) fn materialise(&self, src: &WeightSource, numel: usize) -> Vec<f32> {
        let mut v = vec![0.0f32; numel];
        src.read_range(0, numel, &mut v);
        if src.dtype() != self.dtype {
            self.dtype.round_slice(&mut v);
        }
        v
    }
}
