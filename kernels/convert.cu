// f32_to_bf16 / f16_to_bf16: checkpoint dtype conversion on the device.
//
//   out[i] = bf16(in[i])   RNE, for i < n   (f16 -> f32 is exact, then one rounding)
//
// NaN stays NaN, ±inf stays ±inf, f32 values beyond bf16's range round to ±inf (as
// half::bf16::from_f32). Layouts: flat [n]. Launch: grid-stride (block 256).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
f32_to_bf16(bf16* __restrict__ out, const float* __restrict__ in, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = to_bf16(in[i]);
}

extern "C" __global__ void __launch_bounds__(1024)
f16_to_bf16(bf16* __restrict__ out, const __half* __restrict__ in, long long n) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride)
        out[i] = to_bf16(__half2float(in[i]));
}
