// fp8_quant_bf16: dynamic per-token FP8 (E4M3) quantization of activations, amax + scale + cast
// in one kernel (one block per token row).
//
//   amax_i = max_k |x[i, k]|          (NaN when any element is NaN: fmaxf alone would drop it)
//   s_i    = amax_i / 448             (1 when amax_i = 0; IEEE division, __fdiv_rn)
//   q[i,k] = e4m3(x[i, k] / s_i)      round to nearest even, saturating to ±448 (±inf too),
//                                     NaN -> 0x7F (__nv_cvt_float_to_fp8, __NV_SATFINITE)
//
// Exactly llada::quant::fp8::quantize_row_codes (src/quant/fp8.rs): codes and scales are
// bit-identical to the CPU reference, except that a NaN code is 0x7F here where the CPU keeps
// the sign of the NaN (0x7F or 0xFF): both decode to NaN. An infinite element makes s_i = inf and
// the row's codes 0 or NaN, so the GEMM's outputs for that token are NaN, as on the CPU.
// Layouts: x [N, K] bf16 row-major, q [N, K] uint8 E4M3 codes, scale [N] f32.
// Launch: grid N, block 256 (any multiple of 32 up to 1024). Any K; scalar loads (K is the model
// width C or F, read once; the kernel is bandwidth-bound at 3 bytes per element).
// Arch: all (the conversion is a hardware cvt on sm_89+, emulated bit-exactly below).
// Speed: not measured (no GPU has run it yet).
#include "common.cuh"
#include <cuda_fp8.h>

extern "C" __global__ void __launch_bounds__(1024)
fp8_quant_bf16(unsigned char* __restrict__ q, float* __restrict__ scale,
               const bf16* __restrict__ x, int n, int k) {
    const int row = blockIdx.x;
    if (row >= n) return;
    const bf16* xr = x + (long long)row * k;
    float m = 0.0f;
    int nan = 0;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        const float v = ld_bf16(xr + j);
        nan |= isnan(v) ? 1 : 0;
        m = fmaxf(m, fabsf(v));
    }
    m = block_max(m);
    nan = __syncthreads_or(nan);
    const float amax = nan ? __int_as_float(0x7fc00000) : m;
    const float s = amax == 0.0f ? 1.0f : __fdiv_rn(amax, 448.0f);
    if (threadIdx.x == 0) scale[row] = s;
    unsigned char* qr = q + (long long)row * k;
    for (int j = threadIdx.x; j < k; j += blockDim.x) {
        qr[j] = (unsigned char)__nv_cvt_float_to_fp8(__fdiv_rn(ld_bf16(xr + j), s), __NV_SATFINITE,
                                                     __NV_E4M3);
    }
}
