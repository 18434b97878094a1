//! The one cuBLAS GEMM wrapper, used by the inference matmul (bf16 data) and by training (f32
//! data, f32 or bf16-product compute).

use super::*;
use cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType_t};

/// Column-major `C[m×n] = alpha·op(A)·op(B) + beta·C` on device addresses: `cublasGemmEx` with
/// one data type for A and B (and C, unless `c_data` names another: bf16 A/B with f32 C is the
/// LoRA trainer's frozen-base GEMM), host-side f32 alpha/beta (the scale type of both
/// `CUBLAS_COMPUTE_32F` and `CUBLAS_COMPUTE_32F_FAST_16BF`).
pub(crate) struct Gemm {
    /// `A` is transposed (`op(A) = Aᵀ`).
    pub ta: bool,
    /// `B` is transposed.
    pub tb: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub b: u64,
    pub ldb: usize,
    pub beta: f32,
    pub c: u64,
    pub ldc: usize,
    pub data: cudaDataType_t,
    pub compute: cublasComputeType_t,
    /// `alpha` (1 in [`Gemm::F32`]).
    pub alpha: f32,
    /// C's data type when it is not `data` (`None`: the same).
    pub c_data: Option<cudaDataType_t>,
}

impl Gemm {
    /// An empty f32 GEMM (no operands, `C = 0·C`), the base of `Gemm { .., ..Gemm::F32 }`.
    pub(crate) const F32: Gemm = Gemm {
        ta: false,
        tb: false,
        m: 0,
        n: 0,
        k: 0,
        a: 0,
        lda: 0,
        b: 0,
        ldb: 0,
        beta: 0.0,
        c: 0,
        ldc: 0,
        data: cudaDataType_t::CUDA_R_32F,
        compute: cublasComputeType_t::CUBLAS_COMPUTE_32F,
        alpha: 1.0,
        c_data: None,
    };

    /// Run on `handle` (bound to the caller's stream). Nothing to do when `m` or `n` is 0. The
    /// caller checked every operand's length against (m, n, k) and the leading dimensions.
    pub(crate) fn run(&self, op: &str, handle: cublas::sys::cublasHandle_t) -> Result<()> {
        let Gemm { m, n, k, .. } = *self;
        if m == 0 || n == 0 {
            return Ok(());
        }
        let t = |x: bool| {
            if x {
                cublasOperation_t::CUBLAS_OP_T
            } else {
                cublasOperation_t::CUBLAS_OP_N
            }
        };
        let (m_, n_, k_) = (int(op, "m", m)?, int(op, "n", n)?, int(op, "k", k)?);
        let (lda, ldb, ldc) = (
            int(op, "lda", self.lda.max(1))?,
            int(op, "ldb", self.ldb.max(1))?,
            int(op, "ldc", self.ldc.max(1))?,
        );
        let alpha = self.alpha;
        let c_data = self.c_data.unwrap_or(self.data);
        // SAFETY: the operands are live device allocations the caller validated against
        // (m, n, k) and the leading dimensions; alpha and beta are host f32 (pointer mode host).
        unsafe {
            cublas::result::gemm_ex(
                handle,
                t(self.ta),
                t(self.tb),
                m_,
                n_,
                k_,
                &alpha as *const f32 as *const c_void,
                self.a as *const c_void,
                self.data,
                lda,
                self.b as *const c_void,
                self.data,
                ldb,
                &self.beta as *const f32 as *const c_void,
                self.c as *mut c_void,
                c_data,
                ldc,
                self.compute,
                cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
            )
        }
        .map_err(|e| {
            anyhow!(
                "{op}: cuBLAS GEMM ({:?} data, {c_data:?} C, {:?}, m {m}, n {n}, k {k}) failed: {e:?}",
                self.data,
                self.compute
            )
        })
    }
}
