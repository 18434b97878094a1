//! Hugging Face safetensors checkpoints: single file or sharded, memory-mapped, zero-copy.
//!
//! TODO(helper): loader, validation against the config, errors naming tensor and file.

use std::sync::Arc;

use crate::dtype::DType;

/// Where the values of one weight tensor come from. Backends turn these into resident weights.
#[derive(Clone, Debug)]
pub enum WeightSource {
    /// A tensor inside a memory-mapped safetensors file (little-endian, row-major).
    Mapped {
        mmap: Arc<memmap2::Mmap>,
        /// Byte range of the tensor's data inside `mmap`.
        start: usize,
        end: usize,
        dtype: DType,
        shape: Vec<usize>,
        /// Tensor name, for error messages.
        name: String,
    },
    /// Pseudo-random values for the random-weight presets, generated identically on every
    /// backend: element `i` is `std · √3 · (2u − 1)` with
    /// `u = rng::uniform(rng::bits(rng::cell_key(seed, rng::STREAM_WEIGHTS, 0, 0, 0), i))`,
    /// rounded to `dtype` (uniform with standard deviation `std`).
    Random {
        seed: u64,
        std: f32,
        dtype: DType,
        shape: Vec<usize>,
        name: String,
    },
    /// Every element equal to `value` (norm weights of presets).
    Const {
        value: f32,
        dtype: DType,
        shape: Vec<usize>,
        name: String,
    },
    /// Host values (tests), already representable in `dtype`.
    Host {
        data: Arc<Vec<f32>>,
        dtype: DType,
        shape: Vec<usize>,
        name: String,
    },
}

impl WeightSource {
    pub fn shape(&self) -> &[usize] {
        match self {
            WeightSource::Mapped { shape, .. }
            | WeightSource::Random { shape, .. }
            | WeightSource::Const { shape, .. }
            | WeightSource::Host { shape, .. } => shape,
        }
    }
    pub fn dtype(&self) -> DType {
        match self {
            WeightSource::Mapped { dtype, .. }
            | WeightSource::Random { dtype, .. }
            | WeightSource::Const { dtype, .. }
            | WeightSource::Host { dtype, .. } => *dtype,
        }
    }
    pub fn name(&self) -> &str {
        match self {
            WeightSource::Mapped { name, .. }
            | WeightSource::Random { name, .. }
            | WeightSource::Const { name, .. }
            | WeightSource::Host { name, .. } => name,
        }
    }
    pub fn numel(&self) -> usize {
        self.shape().iter().product()
    }

    /// Decode elements `[from, to)` (flat, row-major) into f32 on the host.
    pub fn read_range(&self, from: usize, to: usize, out: &mut [f32]) {
        debug_assert_eq!(out.len(), to - from);
        match self {
            WeightSource::Mapped {
                mmap, start, dtype, ..
            } => {
                let s = dtype.size();
                dtype.decode_into(&mmap[start + from * s..start + to * s], out);
            }
            WeightSource::Random {
                seed, std, dtype, ..
            } => {
                let key = crate::rng::cell_key(*seed, crate::rng::STREAM_WEIGHTS, 0, 0, 0);
                let a = std * 3f32.sqrt();
                for (o, i) in out.iter_mut().zip(from..to) {
                    let u = crate::rng::uniform(crate::rng::bits(key, i as u64)) as f32;
                    *o = dtype.round(a * (2.0 * u - 1.0));
                }
            }
            WeightSource::Const { value, dtype, .. } => out.fill(dtype.round(*value)),
            WeightSource::Host { data, .. } => out.copy_from_slice(&data[from..to]),
        }
    }
}
