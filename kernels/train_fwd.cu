// Training forward kernels, f32 (the forward half of the training step; backward kernels live in
// kernels/*_bwd.cu). Training keeps f32 activations and f32 master weights (src/train/ops.rs is
// the CPU reference, plain f32 without bf16 rounding), so these are f32 twins of the inference
// kernels, written op by op in the CPU reference's order with explicit IEEE intrinsics
// (__fmul_rn, __fadd_rn, ...) so nvcc cannot contract them into FMAs. Where the CPU reference
// sums sequentially and a kernel reduces as a tree (RMSNorm's sum of squares, attention's dot
// products and softmax sum) results differ by f32 rounding only; everything else is bit-exact.
//
// embedding_f32(out, wte, ids, n, c)            out[i,:] = wte[ids[i],:]; ids in [0,V) (launcher
//                                               checks); grid n, block 256.
// rms_norm_fwd_f32(y, r, x, w, n, c, eps)       r[i] = 1/sqrt(Σ_j x²/c + eps), y = w·(x·r);
//                                               grid n, block 256 (multiple of 32).
// rope_fwd_f32(x, cos, sin, pos, n, heads, hd)  half-rotation RoPE in place on x [N, heads·hd],
//                                               row i at position pos[i], tables [max_pos, hd/2];
//                                               grid n, block 256.
// swiglu_fwd_f32(m, g, u, numel)                m = g·σ(g)·u, σ(x) = 1/(1+exp(−x)); grid-stride.
// add_f32(x, d, numel)                          x += d; grid-stride.
// gather_rows_f32(out, x, rows, nrows, c)       out[i,:] = x[rows[i],:]; grid nrows, block 256.
// scatter_add_rows_f32(dx, src, rows, nrows, c) dx[rows[i],:] += src[i,:] for i ascending; one
//                                               thread per column loops over i in order, so
//                                               repeated rows are safe and the sums are in the
//                                               CPU's order (bit-exact); grid-stride over c.
// attention_fwd_f32(o, lse, q, k, v, b, t, nh, nkv, hd)
//   bidirectional, scale 1/sqrt(hd), GQA (head h reads kv head h/(nh/nkv)); q, o [B·T, NH·HD],
//   k, v [B·T, NKV·HD], lse [B·T, NH] = max_j s_j + ln Σ_j exp(s_j − max). One block per
//   (query i, head h, batch b) = grid (t, nh, b), block 128; dynamic shared memory
//   (t + hd)·4 bytes (scores of the row, the query). Scores: one warp per key (lanes over hd,
//   warp tree sum). Output: thread per column, Σ_j (p_j/Σp)·v_j sequential in j (CPU order).
//   Any hd ≥ 1 (simple kernel: correct over fast).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
embedding_f32(float* __restrict__ out, const float* __restrict__ wte, const int* __restrict__ ids, int n, int c) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const float* src = wte + (long long)ids[i] * c;
    float* dst = out + (long long)i * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = src[j];
}

extern "C" __global__ void __launch_bounds__(1024)
rms_norm_fwd_f32(float* __restrict__ y, float* __restrict__ r, const float* __restrict__ x, const float* __restrict__ w,
                 int n, int c, float eps) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const float* xr = x + (long long)i * c;
    float* yr = y + (long long)i * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) ss = __fadd_rn(ss, __fmul_rn(xr[j], xr[j]));
    ss = block_sum(ss);
    const float ri = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)c), eps)));
    if (threadIdx.x == 0) r[i] = ri;
    for (int j = threadIdx.x; j < c; j += blockDim.x) yr[j] = __fmul_rn(w[j], __fmul_rn(xr[j], ri));
}

extern "C" __global__ void __launch_bounds__(1024)
rope_fwd_f32(float* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
             const int* __restrict__ pos, int n, int heads, int hd) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const int half = hd / 2;
    const long long p = pos[i];
    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int h = idx / half, j = idx - h * half;
        float* base = x + (long long)i * heads * hd + (long long)h * hd;
        const float c = cos_t[p * half + j], s = sin_t[p * half + j];
        const float a = base[j], b = base[j + half];
        base[j] = __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s));
        base[j + half] = __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s));
    }
}

extern "C" __global__ void __launch_bounds__(1024)
swiglu_fwd_f32(float* __restrict__ m, const float* __restrict__ g, const float* __restrict__ u, long long numel) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x) {
        const float gv = g[i];
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-gv)));
        m[i] = __fmul_rn(__fmul_rn(gv, s), u[i]);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
add_f32(float* __restrict__ x, const float* __restrict__ d, long long numel) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x)
        x[i] = __fadd_rn(x[i], d[i]);
}

extern "C" __global__ void __launch_bounds__(1024)
gather_rows_f32(float* __restrict__ out, const float* __restrict__ x, const int* __restrict__ rows, int nrows, int c) {
    const int i = blockIdx.x;
    if (i >= nrows) return;
    const float* src = x + (long long)rows[i] * c;
    float* dst = out + (long long)i * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = src[j];
}

extern "C" __global__ void __launch_bounds__(1024)
scatter_add_rows_f32(float* __restrict__ dx, const float* __restrict__ src, const int* __restrict__ rows, int nrows,
                     int c) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < c; j += gridDim.x * blockDim.x) {
        for (int i = 0; i < nrows; ++i) {
            float* d = dx + (long long)rows[i] * c + j;
            *d = __fadd_rn(*d, src[(long long)i * c + j]);
        }
    }
}

extern "C" __global__ void __launch_bounds__(128)
attention_fwd_f32(float* __restrict__ o, float* __restrict__ lse, const float* __restrict__ q,
                  const float* __restrict__ k, const float* __restrict__ v, int b, int t, int nh, int nkv, int hd) {
    extern __shared__ float att_smem[];
    float* s = att_smem;       // [t]
    float* qs = att_smem + t;  // [hd]
    const int i = blockIdx.x, h = blockIdx.y, bi = blockIdx.z;
    if (i >= t || h >= nh || bi >= b || nkv <= 0 || nh % nkv != 0) return;
    const int kh = h / (nh / nkv);
    const long long qw = (long long)nh * hd, kw = (long long)nkv * hd;
    const long long row = (long long)bi * t + i;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int c = threadIdx.x; c < hd; c += blockDim.x) qs[c] = q[row * qw + (long long)h * hd + c];
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int j = warp; j < t; j += nwarps) {
        const float* kr = k + ((long long)bi * t + j) * kw + (long long)kh * hd;
        float acc = 0.0f;
        for (int c = lane; c < hd; c += 32) acc = __fadd_rn(acc, __fmul_rn(qs[c], kr[c]));
        acc = warp_sum(acc);
        if (lane == 0) s[j] = __fmul_rn(acc, scale);
    }
    __syncthreads();
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < t; j += blockDim.x) mx = fmaxf(mx, s[j]);
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < t; j += blockDim.x) sum = __fadd_rn(sum, expf(__fsub_rn(s[j], mx)));
    sum = block_sum(sum);  // ends after a __syncthreads: every s[j] read above is done
    for (int j = threadIdx.x; j < t; j += blockDim.x) s[j] = __fdiv_rn(expf(__fsub_rn(s[j], mx)), sum);
    if (threadIdx.x == 0) lse[row * nh + h] = __fadd_rn(mx, logf(sum));
    __syncthreads();
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < t; ++j)
            acc = __fadd_rn(acc, __fmul_rn(s[j], v[((long long)bi * t + j) * kw + (long long)kh * hd + c]));
        o[row * qw + (long long)h * hd + c] = acc;
    }
}
