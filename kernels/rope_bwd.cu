// rope_bwd_f32: backward of half-rotation RoPE (`ops::rope(.., inverse = true)`), f32, in place.
// A rotation's Jacobian is the rotation, so the gradient is rotated back (sin negated):
//   a' = a·c + b·s,  b' = b·c − a·s      with (a, b) = (x[j], x[j + hd/2]), c, s at pos[i]
// (written as the CPU does: a·c − b·(−s), b·c + a·(−s); bit-exact).
// Layouts: x [N, heads·HD]; cos, sin [max_pos, HD/2]; pos [N] in [0, max_pos) (launcher checks).
// Grid n, block 256.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
rope_bwd_f32(float* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
             const int* __restrict__ pos, int n, int heads, int hd) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const int half = hd / 2;
    const long long p = pos[i];
    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int h = idx / half, j = idx - h * half;
        float* base = x + (long long)i * heads * hd + (long long)h * hd;
        const float c = cos_t[p * half + j], s = -sin_t[p * half + j];
        const float a = base[j], b = base[j + half];
        base[j] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        base[j + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}
