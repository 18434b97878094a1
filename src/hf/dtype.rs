//! Element types of checkpoints and of the CPU reference's activations.

use half::{bf16, f16};

/// Storage / compute element type.
///
/// The CPU reference computes in the checkpoint's dtype the way PyTorch does: every op takes
/// values representable in `DType`, computes in f32, and rounds its output back to `DType`
/// (round-to-nearest-even). `F32` therefore means plain f32 arithmetic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    BF16,
    F16,
    F32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::BF16 | DType::F16 => 2,
            DType::F32 => 4,
        }
    }

    /// The names flags and files use (`--dtype bf16`).
    pub const NAMES: &'static [(&'static str, DType)] = &[
        ("bf16", DType::BF16),
        ("f16", DType::F16),
        ("f32", DType::F32),
    ];

    pub fn name(self) -> &'static str {
        crate::names::name_of(Self::NAMES, &self)
    }

    /// Round an f32 to the nearest value representable in this dtype (RNE), returned as f32.
    #[inline(always)]
    pub fn round(self, x: f32) -> f32 {
        match self {
            DType::BF16 => bf16::from_f32(x).to_f32(),
            DType::F16 => f16::from_f32(x).to_f32(),
            DType::F32 => x,
        }
    }

    /// Round a slice in place.
    pub fn round_slice(self, xs: &mut [f32]) {
        if self != DType::F32 {
            for x in xs.iter_mut() {
                *x = self.round(*x);
            }
        }
    }

    /// Decode little-endian bytes of this dtype into f32s. `bytes.len()` must be `out.len() * size`.
    pub fn decode_into(self, bytes: &[u8], out: &mut [f32]) {
        debug_assert_eq!(bytes.len(), out.len() * self.size());
        match self {
            DType::BF16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = bf16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F16 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                    *o = f16::from_le_bytes([c[0], c[1]]).to_f32();
                }
            }
            DType::F32 => {
                for (o, c) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                    *o = f32::from_le_bytes([c[0], c[1], c[2], c[3]]);
                }
            }
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
