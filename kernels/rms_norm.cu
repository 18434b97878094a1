// rms_norm_bf16 / add_rms_norm_bf16: RMSNorm (LLaMA / LLaDA `RMSLayerNorm`).
//
// rms_norm_bf16(out, x, w, n, c, eps):
//   r = 1 / sqrt( sum_j x[i,j]^2 / c + eps )          statistics in f32
//   y = bf16( x[i,j] * r )                             rounded to bf16 BEFORE the weight
//   out[i,j] = bf16( y * w[j] )
// add_rms_norm_bf16(out, x, d, w, n, c, eps): first x[i,j] = bf16(x[i,j] + d[i,j]) (written back
//   to x, the residual stream), then out = rms_norm(x) on the rounded values.
//
// Layouts: x, d, out [N, C] bf16 row-major; w [C] bf16. `out` must not alias x or d.
// Launch: grid n (one block per row), block 256 (any multiple of 32 up to 1024).
// Numerics: sqrt and division are IEEE (no rsqrtf); only the sum of squares is ordered
// differently from the CPU (tree instead of sequential), so r may differ by an f32 ulp and the
// bf16 output by one ulp, rarely. 16-byte vector path when C % 8 == 0 and all pointers are
// 16-byte aligned; scalar otherwise.
//
// Training (f32) kernels below: the forward and backward of the training step. Training keeps f32
// activations and f32 master weights (the CPU reference `src/train/ops.rs` is plain f32 without
// bf16 rounding); kernels follow the reference's order with explicit IEEE intrinsics (__fmul_rn,
// __fadd_rn, ...) so nvcc cannot contract them into FMAs. Where the reference sums sequentially and
// a kernel reduces as a tree, results differ by f32 rounding only.
// rms_norm_fwd_f32(y, r, x, w, n, c, eps):          r[i] = 1/sqrt(Σ_j x²/c + eps) (block tree sum),
//   y = w·(x·r); grid n, block 256 (multiple of 32). Layouts: y, x [N, C]; r [N]; w [C].
// rms_norm_bwd_f32(dx, dy, x, r, w, n, c):           written
//   gx[i]   = Σ_j dy[i,j]·w[j]·x[i,j]                (block tree sum; CPU: sequential)
//   coef[i] = r³·gx/c                                 ((r·r)·r)·gx / c, CPU order
//   dx[i,j] = r·w[j]·dy[i,j] − x[i,j]·coef
//   grid n, block 256 (multiple of 32).
// rms_norm_bwd_dw_f32(dw, dy, x, r, n, c):           accumulated (+=)
//   dw[j] += Σ_i (dy[i,j]·x[i,j])·r[i], one thread per column, rows in ascending order: the
//   CPU's order and roundings, bit-exact. Grid-stride over c (block 256).
// Layouts: dx, dy, x [N, C]; r [N]; w, dw [C].
// bf16 storage (`--storage bf16`, src/train/mixed.rs): rms_norm_fwd_bf16s, rms_norm_bwd_bf16s,
// rms_norm_bwd_dw_bf16s take the same arguments with y, x, w, dx, dy bf16 (r, dw f32): the same f32
// math on the loaded values, each bf16 output rounded once (RNE).
//
// Opt-in (LLADA_TRAIN_KERNELS=tiled, src/train/cuda/tiled.rs; never run on a GPU yet): the same
// dw[j] += Σ_i (dy[i,j]·x[i,j])·r[i] over many blocks. The one-pass kernel above has ⌈C/256⌉
// blocks (16 at C = 4096, a tenth of an H100/H200's SMs), each walking all N rows.
// rms_norm_bwd_dw_tiled_f32(part, dy, x, r, n, c, rows): the N rows are cut into S = ⌈N/rows⌉
//   chunks of `rows` rows (rows, S a function of (N, C) alone: tiled.rs `row_chunks`, about 512
//   blocks). Grid (⌈C/256⌉, S), block 256, one thread per (column, chunk):
//   part[s, j] = Σ_{i in chunk s} (dy·x)·r, rows ascending, from −0 (the additive identity, so the
//   first term enters exactly). Layout: part [S, C] scratch.
// rms_norm_bwd_dw_sum_f32(dw, part, s, c): dw[j] = ((dw[j] + part[0,j]) + part[1,j]) + …, chunks
//   ascending; grid-stride over c, block 256.
// Deterministic: no atomics, every sum in a fixed order for given (N, C), so a step is
// bit-reproducible. Not bit-exact with the CPU or the one-pass kernel when S > 1 (with S = 1 the
// launcher runs the one-pass kernel): the terms are the same f32 values, only the bracketing of
// the sum differs, so |Δ| ≤ (rows + S)·u·(|dw| + Σ_i |term_i|) per side (u = 2^-24, first order;
// rows·(S − 1) < N gives rows + S ≤ N + 1, and the CPU's sequential sum is within N·u·(…), so
// tests/cuda_train_tiled.rs allows (2N + 2)·u·(…) between them).
#include "common.cuh"

template <bool ADD>
LLADA_DEVICE void rms_norm_row(bf16* __restrict__ out, bf16* __restrict__ x, const bf16* __restrict__ d,
                               const bf16* __restrict__ w, int c, float eps) {
    const long long base = (long long)blockIdx.x * c;
    bf16* xr = x + base;
    bf16* orow = out + base;
    const bool vec = (c & 7) == 0 && aligned16(x) && aligned16(out) && aligned16(w) && (!ADD || aligned16(d));
    float ss = 0.0f;
    if (vec) {
        uint4* xv = reinterpret_cast<uint4*>(xr);
        for (int j = threadIdx.x; j < c / 8; j += blockDim.x) {
            float a[8];
            unpack8(xv[j], a);
            if (ADD) {
                float b[8];
                unpack8(reinterpret_cast<const uint4*>(d + base)[j], b);
#pragma unroll
                for (int k = 0; k < 8; ++k) a[k] = round_bf16(__fadd_rn(a[k], b[k]));
                xv[j] = pack8(a);  // exact: a[k] already bf16 values
            }
#pragma unroll
            for (int k = 0; k < 8; ++k) ss = __fmaf_rn(a[k], a[k], ss);
        }
    } else {
        for (int j = threadIdx.x; j < c; j += blockDim.x) {
            float a = ld_bf16(xr + j);
            if (ADD) {
                a = round_bf16(__fadd_rn(a, ld_bf16(d + base + j)));
                xr[j] = to_bf16(a);
            }
            ss = __fmaf_rn(a, a, ss);
        }
    }
    ss = block_sum(ss);  // contains __syncthreads: the writes to x above are visible below
    const float r = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)c), eps)));
    if (vec) {
        const uint4* xv = reinterpret_cast<const uint4*>(xr);
        const uint4* wv = reinterpret_cast<const uint4*>(w);
        uint4* ov = reinterpret_cast<uint4*>(orow);
        for (int j = threadIdx.x; j < c / 8; j += blockDim.x) {
            float a[8], g[8];
            unpack8(xv[j], a);
            unpack8(wv[j], g);
#pragma unroll
            for (int k = 0; k < 8; ++k) a[k] = __fmul_rn(round_bf16(__fmul_rn(a[k], r)), g[k]);
            ov[j] = pack8(a);
        }
    } else {
        for (int j = threadIdx.x; j < c; j += blockDim.x)
            orow[j] = to_bf16(__fmul_rn(round_bf16(__fmul_rn(ld_bf16(xr + j), r)), ld_bf16(w + j)));
    }
}

extern "C" __global__ void __launch_bounds__(1024)
rms_norm_bf16(bf16* __restrict__ out, const bf16* __restrict__ x, const bf16* __restrict__ w, int n, int c, float eps) {
    if ((int)blockIdx.x >= n) return;
    rms_norm_row<false>(out, const_cast<bf16*>(x), nullptr, w, c, eps);
}

extern "C" __global__ void __launch_bounds__(1024)
add_rms_norm_bf16(bf16* __restrict__ out, bf16* __restrict__ x, const bf16* __restrict__ d, const bf16* __restrict__ w,
                  int n, int c, float eps) {
    if ((int)blockIdx.x >= n) return;
    rms_norm_row<true>(out, x, d, w, c, eps);
}

// The training kernels over the stored type S of y, x, w, dx, dy (common.cuh load_f/store_f);
// r and dw are f32 in both storages.
template <typename S>
LLADA_DEVICE void rms_norm_fwd_t(S* __restrict__ y, float* __restrict__ r, const S* __restrict__ x,
                                 const S* __restrict__ w, int n, int c, float eps) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const S* xr = x + (long long)i * c;
    S* yr = y + (long long)i * c;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        const float a = load_f(xr + j);
        ss = __fadd_rn(ss, __fmul_rn(a, a));
    }
    ss = block_sum(ss);
    const float ri = __fdiv_rn(1.0f, __fsqrt_rn(__fadd_rn(__fdiv_rn(ss, (float)c), eps)));
    if (threadIdx.x == 0) r[i] = ri;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        store_f(yr + j, __fmul_rn(load_f(w + j), __fmul_rn(load_f(xr + j), ri)));
}

template <typename S>
LLADA_DEVICE void rms_norm_bwd_t(S* __restrict__ dx, const S* __restrict__ dy, const S* __restrict__ x,
                                 const float* __restrict__ r, const S* __restrict__ w, int n, int c) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const long long base = (long long)i * c;
    float gx = 0.0f;
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        gx = __fadd_rn(gx, __fmul_rn(__fmul_rn(load_f(dy + base + j), load_f(w + j)), load_f(x + base + j)));
    gx = block_sum(gx);
    const float ri = r[i];
    const float coef = __fdiv_rn(__fmul_rn(__fmul_rn(__fmul_rn(ri, ri), ri), gx), (float)c);
    for (int j = threadIdx.x; j < c; j += blockDim.x)
        store_f(dx + base + j, __fsub_rn(__fmul_rn(__fmul_rn(ri, load_f(w + j)), load_f(dy + base + j)),
                                         __fmul_rn(load_f(x + base + j), coef)));
}

template <typename S>
LLADA_DEVICE void rms_norm_bwd_dw_t(float* __restrict__ dw, const S* __restrict__ dy, const S* __restrict__ x,
                                    const float* __restrict__ r, int n, int c) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < c; j += gridDim.x * blockDim.x) {
        float acc = dw[j];
        for (int i = 0; i < n; ++i) {
            const long long e = (long long)i * c + j;
            acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(load_f(dy + e), load_f(x + e)), r[i]));
        }
        dw[j] = acc;
    }
}

LLADA_STORED(1024, rms_norm_fwd,
             (S* __restrict__ y, float* __restrict__ r, const S* __restrict__ x, const S* __restrict__ w, int n, int c,
              float eps),
             rms_norm_fwd_t(y, r, x, w, n, c, eps))
LLADA_STORED(1024, rms_norm_bwd,
             (S* __restrict__ dx, const S* __restrict__ dy, const S* __restrict__ x, const float* __restrict__ r,
              const S* __restrict__ w, int n, int c),
             rms_norm_bwd_t(dx, dy, x, r, w, n, c))
LLADA_STORED(1024, rms_norm_bwd_dw,
             (float* __restrict__ dw, const S* __restrict__ dy, const S* __restrict__ x, const float* __restrict__ r,
              int n, int c),
             rms_norm_bwd_dw_t(dw, dy, x, r, n, c))

extern "C" __global__ void __launch_bounds__(256)
rms_norm_bwd_dw_tiled_f32(float* __restrict__ part, const float* __restrict__ dy, const float* __restrict__ x,
                          const float* __restrict__ r, int n, int c, int rows) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c || rows <= 0) return;
    const int from = blockIdx.y * rows, to = min(n, from + rows);
    float acc = -0.0f;
    for (int i = from; i < to; ++i) {
        const long long e = (long long)i * c + j;
        acc = __fadd_rn(acc, __fmul_rn(__fmul_rn(dy[e], x[e]), r[i]));
    }
    part[(long long)blockIdx.y * c + j] = acc;
}

extern "C" __global__ void __launch_bounds__(256)
rms_norm_bwd_dw_sum_f32(float* __restrict__ dw, const float* __restrict__ part, int s, int c) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < c; j += gridDim.x * blockDim.x) {
        float acc = dw[j];
        for (int k = 0; k < s; ++k) acc = __fadd_rn(acc, part[(long long)k * c + j]);
        dw[j] = acc;
    }
}
