// add_bf16: residual add in place.
//
//   x[i] = bf16(f32(x[i]) + f32(d[i]))   for i < numel   (one RNE rounding, as PyTorch bf16 add)
//
// Layouts: x, d flat bf16 [numel]. Launch: grid-stride (any grid, block 256). The vector path
// handles 8 elements (16 bytes) per step when both pointers are 16-byte aligned; the tail and
// unaligned buffers take the scalar path. Bit-exact against the CPU reference.
//
// add_f32(x, d, numel): x += d (training, f32; `__fadd_rn`), grid-stride. Bit-exact.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
add_bf16(bf16* __restrict__ x, const bf16* __restrict__ d, long long numel) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long done = 0;
    if (aligned16(x) && aligned16(d)) {
        const long long nvec = numel / 8;
        uint4* xv = reinterpret_cast<uint4*>(x);
        const uint4* dv = reinterpret_cast<const uint4*>(d);
        for (long long i = tid; i < nvec; i += stride) {
            float a[8], b[8];
            unpack8(xv[i], a);
            unpack8(dv[i], b);
#pragma unroll
            for (int k = 0; k < 8; ++k) a[k] = __fadd_rn(a[k], b[k]);
            xv[i] = pack8(a);
        }
        done = nvec * 8;
    }
    for (long long i = done + tid; i < numel; i += stride) x[i] = to_bf16(__fadd_rn(ld_bf16(x + i), ld_bf16(d + i)));
}

extern "C" __global__ void __launch_bounds__(1024)
add_f32(float* __restrict__ x, const float* __restrict__ d, long long numel) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(x[i], d[i]);
}
