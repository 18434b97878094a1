// rms_norm_bwd_f32, rms_norm_bwd_dw_f32: backward of RMSNorm (`ops::rms_norm_bwd`), f32.
//
// Forward (rms_norm_fwd_f32): y[i,j] = w[j]·(x[i,j]·r[i]), r[i] = 1/sqrt(mean_j x[i,j]² + eps).
// rms_norm_bwd_f32(dx, dy, x, r, w, n, c):           written
//   gx[i]   = Σ_j dy[i,j]·w[j]·x[i,j]                (block tree sum; CPU: sequential)
//   coef[i] = r³·gx/c                                 ((r·r)·r)·gx / c, CPU order
//   dx[i,j] = r·w[j]·dy[i,j] − x[i,j]·coef
//   grid n, block 256 (multiple of 32).
// rms_norm_bwd_dw_f32(dw, dy, x, r, n, c):           accumulated (+=)
//   dw[j] += Σ_i (dy[i,j]·x[i,j])·r[i], one thread per column, rows in ascending order: the
//   CPU's order and roundings, bit-exact. Grid-stride over c (block 256).
// Layouts: dx, dy, x [N, C]; r [N]; w, dw [C].
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
rms_norm_bwd_f32(float* __restrict__ dx, const float* __restrict__ dy, const float* __restrict__ x,
                 const float* __restrict__ r, const float* __restrict__ w, int n, int c) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const long long base = (long long)i * c;
    float gx = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        gx = __fadd_rn(gx, __fmul_rn(__fmul_rn(dy[base + j], w[j]), x[base + j]));
    gx = block_sum(gx);
    const float ri = r[i];
    const float coef = __fdiv_rn(__fmul_rn(__fmul_rn(__fmul_rn(ri, ri), ri), gx), (float)c);
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        dx[base + j] = __fsub_rn(__fmul_rn(__fmul_rn(ri, w[j]), dy[base + j]), __fmul_rn(x[base + j], coef));
}

extern "C" __global__ void __launch_bounds__(1024)
rms_norm_bwd_dw_f32(float* __restrict__ dw, const float* __restrict__ dy, const float* __restrict__ x,
                    const float* __restrict__ r, int n, int c) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < c; j += gridDim.x * blockDim.x) {
        float acc = dw[j];
        for (int i = 0; i < n; ++i) {
            const long long e = (long long)i * c + j;
            acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(dy[e], x[e]), r[i]));
        }
        dw[j] = acc;
    }
}
