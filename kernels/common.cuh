// Shared device helpers for every kernel in kernels/*.cu.
//
// - bf16 <-> f32 conversion (round-to-nearest-even), 16-byte vector helpers;
// - warp / block reductions (f32 sum, f32 max); the row gather of embedding_* and gather_rows_*;
// - the bit-exact twin of src/rng.rs: llada_mix64, llada_cell_key, llada_bits, llada_uniform,
//   llada_ln, llada_gumbel. Every f64 operation is written with an explicit IEEE intrinsic
//   (__dadd_rn, __dsub_rn, __dmul_rn, __ddiv_rn, __fma_rn) in the same order as the Rust code, so
//   nvcc cannot contract or reorder it: the GPU produces the same bits as the CPU. Constants are
//   hex float literals equal to the values Rust computes (1.0/23.0 etc. are correctly rounded
//   quotients; LN_2 and SQRT_2 are std::f64::consts). Changing either side means changing both.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

typedef __nv_bfloat16 bf16;

#ifndef LLADA_DEVICE
#define LLADA_DEVICE __device__ __forceinline__
#endif

// ---------------------------------------------------------------------------------------------
// bf16 helpers
// ---------------------------------------------------------------------------------------------

LLADA_DEVICE float ld_bf16(const bf16* p) { return __bfloat162float(*p); }
LLADA_DEVICE bf16 to_bf16(float x) { return __float2bfloat16_rn(x); }
// Round an f32 to the nearest bf16 (RNE) and return it as f32: `DType::BF16.round`.
LLADA_DEVICE float round_bf16(float x) { return __bfloat162float(__float2bfloat16_rn(x)); }

// The training kernels' loads and stores over a stored type S (float in f32 storage, the `_f32`
// symbols; bf16 in bf16 storage, the `_bf16s` symbols): compute is f32 either way, a bf16 store
// rounds once (RNE). For float both are plain accesses, so the `_f32` code is unchanged.
LLADA_DEVICE float load_f(const float* p) { return *p; }
LLADA_DEVICE float load_f(const bf16* p) { return __bfloat162float(*p); }
LLADA_DEVICE void store_f(float* p, float v) { *p = v; }
LLADA_DEVICE void store_f(bf16* p, float v) { *p = __float2bfloat16_rn(v); }

// The two entry points of one training kernel: `name##_f32` (S = float) and `name##_bf16s`
// (S = bf16), each with the parameter list `params` (written over S) running `call` (C linkage
// ignores the namespaces, which only scope S).
#define LLADA_STORED(bounds, name, params, call)                                                   \
    namespace name##_f32_s {                                                                      \
    using S = float;                                                                               \
    extern "C" __global__ void __launch_bounds__(bounds) name##_f32 params { call; }                \
    }                                                                                              \
    namespace name##_bf16s_s {                                                                    \
    using S = bf16;                                                                                \
    extern "C" __global__ void __launch_bounds__(bounds) name##_bf16s params { call; }              \
    }

// Logit j of a row under classifier-free guidance (`backend::head::cfg_mix`, each op rounded to
// bf16): `u + s·(c − u)` with `s = cfg_scale + 1`, `c` from the conditional row `crow`, `u` from
// the unconditional row `urow`; without `cfg`, the stored conditional logit.
LLADA_DEVICE float cfg_mix(const bf16* crow, const bf16* urow, bool cfg, float s, int j) {
    float l = ld_bf16(crow + j);
    if (cfg) {
        const float u = ld_bf16(urow + j);
        const float d = round_bf16(__fsub_rn(l, u));
        const float m = round_bf16(__fmul_rn(s, d));
        l = round_bf16(__fadd_rn(u, m));
    }
    return l;
}

// Unpack 8 bf16 held in a uint4 (16 bytes) into f32.
LLADA_DEVICE void unpack8(uint4 v, float* f) {
    const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        f[2 * i] = __uint_as_float(w[i] << 16);
        f[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
    }
}

// Pack two f32 into a bf16x2 word (low half = first element), each rounded RNE.
LLADA_DEVICE uint32_t pack_bf16x2(float lo, float hi) {
    const uint32_t l = __bfloat16_as_ushort(__float2bfloat16_rn(lo));
    const uint32_t h = __bfloat16_as_ushort(__float2bfloat16_rn(hi));
    return l | (h << 16);
}

LLADA_DEVICE uint4 pack8(const float* f) {
    uint4 v;
    v.x = pack_bf16x2(f[0], f[1]);
    v.y = pack_bf16x2(f[2], f[3]);
    v.z = pack_bf16x2(f[4], f[5]);
    v.w = pack_bf16x2(f[6], f[7]);
    return v;
}

LLADA_DEVICE bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Row gather, the body of embedding_* and gather_rows_*: block blockIdx.x copies row
// `row` of src [*, C] to row blockIdx.x of out [*, C]. 16-byte copies when C % 8 == 0 and both
// base pointers are 16-byte aligned (bf16), else scalar. Pure copy: bit-exact.
LLADA_DEVICE void gather_row(bf16* __restrict__ out, const bf16* __restrict__ src, long long row, int c) {
    const bf16* s = src + row * c;
    bf16* d = out + (long long)blockIdx.x * c;
    if ((c & 7) == 0 && aligned16(src) && aligned16(out)) {
        const uint4* sv = reinterpret_cast<const uint4*>(s);
        uint4* dv = reinterpret_cast<uint4*>(d);
        for (int j = threadIdx.x; j < c / 8; j += blockDim.x) dv[j] = sv[j];
    } else {
        for (int j = threadIdx.x; j < c; j += blockDim.x) d[j] = s[j];
    }
}
LLADA_DEVICE void gather_row(float* __restrict__ out, const float* __restrict__ src, long long row, int c) {
    const float* s = src + row * c;
    float* d = out + (long long)blockIdx.x * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) d[j] = s[j];
}
// One row-gather kernel `name(out, src, idx, n, c)`: block i < n copies row idx[i] of src [*, C]
// to row i of out (T rows; grid n, block ≤ 1024). The embedding lookups (idx: token ids) and the
// activation row gathers (idx: rows) are this kernel under their op's name.
#define LLADA_ROW_GATHER(name, T)                                                                      \
    extern "C" __global__ void __launch_bounds__(1024)                                              \
    name(T* __restrict__ out, const T* __restrict__ src, const int* __restrict__ idx, int n, int c) { \
        if ((int)blockIdx.x < n) gather_row(out, src, idx[blockIdx.x], c);                          \
    }

// ---------------------------------------------------------------------------------------------
// Reductions. Block helpers work for any blockDim.x that is a multiple of 32 (≤ 1024) and must be
// called by every thread of the block; they end with the result broadcast to all threads.
// ---------------------------------------------------------------------------------------------

LLADA_DEVICE float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max that ignores NaN (fmaxf returns the non-NaN operand).
LLADA_DEVICE float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

LLADA_DEVICE float block_sum(float v) {
    __shared__ float red_sum[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();  // protect red_sum from a previous call
    if (lane == 0) red_sum[warp] = v;
    __syncthreads();
    v = lane < nwarps ? red_sum[lane] : 0.0f;
    return warp_sum(v);
}

LLADA_DEVICE float block_max(float v) {
    __shared__ float red_max[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) red_max[warp] = v;
    __syncthreads();
    v = lane < nwarps ? red_max[lane] : -INFINITY;
    return warp_max(v);
}

#include "rng.cuh"
