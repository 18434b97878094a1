// Optimizer kernels (`optim::AdamW::step`, `optim::grad_norm`), f32 master weights and moments.
//
// adamw_f32(p, m, v, p_bf16, g, numel, b1, omb1, b2, omb2, step_size, bc2_sqrt, eps, decay, gscale)
//   gj = g·gscale (gscale = 1 exactly when not clipping; the CPU multiplies g in place by the
//        same f32 coefficient)
//   m  = b1·m + omb1·gj                       omb1 = 1 − b1 computed in f32 on the host
//   v  = b2·v + (omb2·gj)·gj
//   p  = p·decay                              decay = 1 − lr·wd (1 for 1-D tensors), host f32
//   p  = p − (step_size·m) / (sqrt(v)/bc2_sqrt + eps)
//   p_bf16 (nullable): bf16(p) RNE, the inference copy of the updated weight.
//   Every operation is an explicit IEEE intrinsic in the CPU's order: bit-exact with the CPU.
//   Grid-stride, block 256.
// sumsq_f32(partial, x, numel): partial[blockIdx.x] = Σ x² over the block's grid-stride share,
//   accumulated in f64 (block tree sum); the host adds the partials of a fixed grid in order
//   (deterministic; differs from the CPU's sequential f64 sum only by f64 rounding).
//   Grid ≤ the partial buffer's length, block 256 (exactly: the shared array below).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
adamw_f32(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v, bf16* __restrict__ p_bf16,
          const float* __restrict__ g, long long numel, float b1, float omb1, float b2, float omb2, float step_size,
          float bc2_sqrt, float eps, float decay, float gscale) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x) {
        const float gj = gscale == 1.0f ? g[i] : __fmul_rn(g[i], gscale);
        const float mj = __fadd_rn(__fmul_rn(b1, m[i]), __fmul_rn(omb1, gj));
        const float vj = __fadd_rn(__fmul_rn(b2, v[i]), __fmul_rn(__fmul_rn(omb2, gj), gj));
        float pj = __fmul_rn(p[i], decay);
        pj = __fsub_rn(pj, __fdiv_rn(__fmul_rn(step_size, mj), __fadd_rn(__fdiv_rn(__fsqrt_rn(vj), bc2_sqrt), eps)));
        m[i] = mj;
        v[i] = vj;
        p[i] = pj;
        if (p_bf16 != nullptr) p_bf16[i] = __float2bfloat16_rn(pj);
    }
}

extern "C" __global__ void __launch_bounds__(256)
sumsq_f32(double* __restrict__ partial, const float* __restrict__ x, long long numel) {
    __shared__ double red[256];
    double acc = 0.0;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x) {
        const double xv = (double)x[i];
        acc = __dadd_rn(acc, __dmul_rn(xv, xv));
    }
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int s = 128; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) red[threadIdx.x] = __dadd_rn(red[threadIdx.x], red[threadIdx.x + s]);
        __syncthreads();
    }
    if (threadIdx.x == 0) partial[blockIdx.x] = red[0];
}
