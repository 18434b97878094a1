// rope_bf16: rotary position embedding (half rotation, GPT-NeoX / HF-Llama `rotate_half`), in
// place on the q and k parts of a merged qkv buffer.
//
// For row i, head hh < NH + NKV (q heads then k heads, contiguous at the start of the row),
// j < HD/2, p = pos[i], c = cos[p, j], s = sin[p, j]:
//   x1 = qkv[i, hh·HD + j], x2 = qkv[i, hh·HD + j + HD/2]
//   x1' = bf16( x1·c − x2·s ),  x2' = bf16( x2·c + x1·s )
// Each product is rounded to f32, then the sum: written with __fmul_rn/__fadd_rn so nvcc cannot
// contract into an FMA (the CPU reference does the same), so the result is bit-exact.
// Layouts: qkv [N, (NH + 2·NKV)·HD] bf16; cos, sin [max_pos, HD/2] f32 (backend::rope_tables);
// pos [N] int32 in [0, max_pos) (validated by the launcher). V is untouched.
// Launch: grid n (one block per row), block 256 (any size): threads stride over (NH+NKV)·HD/2.
//
// rope_f32(x, cos, sin, pos, n, heads, hd, sign): training (f32), in place on x [N, heads·HD]
// (separate q or k buffers), row i at position pos[i]. sign = +1 rotates (forward, `ops::rope(..,
// inverse = false)`); sign = −1 rotates back (the backward: a rotation's Jacobian is the rotation,
// so the gradient is rotated by −θ, `ops::rope(.., inverse = true)`). With s = sign·sin[p, j]:
//   a' = a·c − b·s,  b' = b·c + a·s      (a, b) = (x[j], x[j + hd/2]), c = cos[p, j]
// Negation and multiplication by ±1 are exact, so both directions are bit-exact with the CPU.
// pos in [0, max_pos) (launcher checks). Grid n, block 256.
// rope_bf16s: the same on a bf16 x (bf16 storage): f32 math, each output rounded once (RNE).
//
// rope_kv_store_bf16 (below rope_bf16): rope_bf16 fused with kv_store_bf16 for a cached (Fast-dLLM)
// step: one pass over the q/k/v the qkv projection produced, instead of a RoPE pass and a
// cache-store pass.
// Twin of Backend::rope followed by Backend::kv_store (the trait's default rope_kv_store).
//
// For row = bi·TQ + i (bi < B, i < TQ), p = pos[row], head hh < NH + NKV, j < HD/2,
// c = cos[p, j], s = sin[p, j], h = qkv[row, hh·HD ..]:
//   h[j]        = bf16( h[j]·c − h[j+HD/2]·s )        (each product rounded to f32, then the sum:
//   h[j+HD/2]   = bf16( h[j+HD/2]·c + h[j]·s )         __fmul_rn/__fadd_rn, as rope_bf16)
//   and for a k head (hh ≥ NH) the same two values go to
//   k_cache[bi·L + q0 + i, (hh−NH)·HD + j] and [.. + j + HD/2];
//   v_cache[bi·L + q0 + i, :] = qkv[row, (NH+NKV)·HD ..] (copy).
// Bit-identical to rope_bf16 then kv_store_bf16 (same operations, same roundings).
// Layouts: qkv [B·TQ, (NH + 2·NKV)·HD] bf16 (q and k rotated in place); k_cache, v_cache
// [B, L, NKV·HD] bf16; cos, sin [max_pos, HD/2] f32; pos [B·TQ] int32 in [0, max_pos). q0 + TQ ≤ L
// (the launcher checks both). Launch: grid B·TQ, block 256 (any size).
#include "common.cuh"

// One RoPE pair of head h in place: (h[j], h[j+half]) rotated by (c, s), each product rounded to
// f32, then the sum (no FMA contraction), rounded once to bf16; returns the two bf16 values.
LLADA_DEVICE void rope_pair(bf16* h, int j, int half, float c, float s, bf16* o1, bf16* o2) {
    const float x1 = ld_bf16(h + j), x2 = ld_bf16(h + j + half);
    *o1 = to_bf16(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
    *o2 = to_bf16(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    h[j] = *o1;
    h[j + half] = *o2;
}

extern "C" __global__ void __launch_bounds__(1024)
rope_bf16(bf16* __restrict__ qkv, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
          const int* __restrict__ pos, int n, int nh, int nkv, int hd) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const int half = hd / 2;
    const long long p = pos[i];
    const float* cr = cos_t + p * half;
    const float* sr = sin_t + p * half;
    bf16* row = qkv + (long long)i * (nh + 2 * nkv) * hd;
    const int pairs = (nh + nkv) * half;
    for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
        const int hh = t / half, j = t - hh * half;
        bf16 o1, o2;
        rope_pair(row + (long long)hh * hd, j, half, cr[j], sr[j], &o1, &o2);
    }
}

extern "C" __global__ void __launch_bounds__(1024)
rope_kv_store_bf16(bf16* __restrict__ qkv, bf16* __restrict__ k_cache, bf16* __restrict__ v_cache,
                   const float* __restrict__ cos_t, const float* __restrict__ sin_t, const int* __restrict__ pos,
                   int b, int tq, int l, int q0, int nh, int nkv, int hd) {
    const int row = blockIdx.x;
    if (row >= b * tq) return;
    const int bi = row / tq, i = row - bi * tq;
    const int half = hd / 2;
    const int kw = nkv * hd;
    const long long p = pos[row];
    const float* cr = cos_t + p * half;
    const float* sr = sin_t + p * half;
    bf16* src = qkv + (long long)row * (nh + 2 * nkv) * hd;
    const long long dst = ((long long)bi * l + q0 + i) * kw;
    const int pairs = (nh + nkv) * half;
    for (int t = threadIdx.x; t < pairs; t += blockDim.x) {
        const int hh = t / half, j = t - hh * half;
        bf16 o1, o2;
        rope_pair(src + (long long)hh * hd, j, half, cr[j], sr[j], &o1, &o2);
        if (hh >= nh) {
            bf16* k = k_cache + dst + (long long)(hh - nh) * hd;
            k[j] = o1;
            k[j + half] = o2;
        }
    }
    const bf16* v = src + (long long)(nh + nkv) * hd;
    for (int j = threadIdx.x; j < kw; j += blockDim.x) v_cache[dst + j] = v[j];
}

template <typename S>
LLADA_DEVICE void rope_t(S* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                         const int* __restrict__ pos, int n, int heads, int hd, float sign) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const int half = hd / 2;
    const long long p = pos[i];
    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int h = idx / half, j = idx - h * half;
        S* base = x + (long long)i * heads * hd + (long long)h * hd;
        const float c = cos_t[p * half + j], s = sign * sin_t[p * half + j];
        const float a = load_f(base + j), b = load_f(base + j + half);
        store_f(base + j, __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        store_f(base + j + half, __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}

LLADA_STORED(1024, rope,
             (S* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
              const int* __restrict__ pos, int n, int heads, int hd, float sign),
             rope_t(x, cos_t, sin_t, pos, n, heads, hd, sign))
