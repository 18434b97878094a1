// swiglu_bwd_f32: backward of m = silu(g)·u (`ops::swiglu_bwd`), f32, element-wise.
//   s  = 1/(1 + exp(−g))
//   dg = dm·u·s·(1 + g·(1 − s))        (((dm·u)·s)·(1 + g·(1−s))), CPU order
//   du = dm·g·s                        ((dm·g)·s)
// Layouts: dg, du, dm, g, u [numel] (any shape). Grid-stride, block 256. Explicit IEEE
// intrinsics (no FMA contraction); only expf differs from the CPU's libm exp (≤ 2 f32 ulps).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
swiglu_bwd_f32(float* __restrict__ dg, float* __restrict__ du, const float* __restrict__ dm,
               const float* __restrict__ g, const float* __restrict__ u, long long numel) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x) {
        const float gv = g[i], d = dm[i];
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-gv)));
        dg[i] = __fmul_rn(__fmul_rn(__fmul_rn(d, u[i]), s), __fadd_rn(1.0f, __fmul_rn(gv, __fsub_rn(1.0f, s))));
        du[i] = __fmul_rn(__fmul_rn(d, gv), s);
    }
}
