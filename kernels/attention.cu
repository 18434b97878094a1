// attention_fwd_bf16, attention_cached_fwd_bf16: bidirectional (non-causal) flash attention
// forward, bf16 in/out. Both are the same template (`attention_tile`), so for equal inputs they give
// bit-identical outputs: `attention_fwd_bf16` reads keys/values from the merged qkv buffer,
// `attention_cached_fwd_bf16` from a KV cache (Fast-dLLM prefix/dual cache, reference §7).
//
// Math, per batch b, query head h, query t (kv head g = h / (NH / NKV), GQA), over L keys:
//   s_j   = (q_t · k_j) · (1/sqrt(HD))                    q·k accumulated in f32 (tensor cores)
//   s_j   = −inf where key j is masked (key_valid[b·L + j] == 0; key_valid may be NULL = all valid)
//   p_j   = exp(s_j − max_j s_j),  out_t = (Σ_j p_j · v_j) / (Σ_j p_j)      online softmax in f32
//   out   = bf16(out_t); a query whose keys are all masked gets zeros.
// Like every flash kernel, p_j is rounded to bf16 before the P·V tensor-core product, while the
// denominator Σ p_j sums the f32 values; exp is exp2f on pre-scaled scores. Against an f32
// reference of bf16 inputs expect relative errors of a few bf16 ulps in the output.
//
// Layouts: qkv [B·TQ, (NH + 2·NKV)·HD] bf16, row = [q (NH·HD) | k (NKV·HD) | v (NKV·HD)], head h at
// columns h·HD..(h+1)·HD of its part; out [B·TQ, NH·HD] bf16; key_valid [B·L] int32 or NULL.
// attention_fwd_bf16: TQ = L = T, keys/values = the k/v parts of qkv.
// attention_cached_fwd_bf16: queries = the q part of qkv (TQ rows per batch row, k/v parts
// ignored), keys/values = k_cache, v_cache [B, L, NKV·HD] bf16 (all L rows of each batch row).
// Supported: HD ∈ {64, 128} (other values return immediately: the launcher must reject them),
// NH % NKV == 0, any TQ, L ≥ 1 (partial tiles are zero-filled and masked).
//
// Launch: grid (ceil(TQ / 64), NH, B), block 128 (4 warps), no dynamic shared memory
// (static: 3 tiles of [64 or 32 rows][HD + 8] bf16 = 34.8 KB at HD = 128).
// Each warp owns 16 query rows. Per 32-key tile: S = Q·Kᵀ with mma.sync.m16n8k16 (bf16 → f32),
// online-softmax update in registers (FA2 layout: thread holds rows lane/4 and lane/4 + 8), P is
// repacked from the S accumulators into A fragments, O += P·V with the same mma. The Q fragments
// are loaded into registers once; V's B fragments come from ldmatrix.x4.trans. Tiles are loaded
// with 16-byte loads when the base pointers are 16-byte aligned and the row strides multiples of 8
// elements (scalar fallback otherwise).
//
// Split-KV (flash-decoding) variant, attention_split_bf16 + attention_combine_bf16: the L keys are
// cut into S chunks of `chunk` keys (a multiple of 32; the launcher picks chunk from L alone, so a
// query row's result never depends on TQ, B or which rows share the call). Block (qt, h, b·S + s)
// runs the same tile loop over keys [s·chunk, min(L, (s+1)·chunk)) and writes its unnormalised
// f32 O, row max m (log2 domain) and row sum l to scratch: part_o [S, B·TQ, NH, HD],
// part_ml [S, B·TQ, NH, 2]. The combine kernel (grid (B·TQ, NH), block HD) forms
// M = max_s m_s, w_s = exp2(m_s − M) (0 for a fully masked chunk), out = bf16(Σ w_s O_s / Σ w_s l_s)
// (zeros when every key is masked). With S = 1 this is exactly the single-pass result.
//
// Training (f32) kernels below: the forward and backward of the training step. Training keeps f32
// activations and f32 master weights (the CPU reference `src/train/ops.rs` is plain f32 without
// bf16 rounding); kernels follow the reference's order with explicit IEEE intrinsics (__fmul_rn,
// __fadd_rn, ...) so nvcc cannot contract them into FMAs. Where the reference sums sequentially and
// a kernel reduces as a tree, results differ by f32 rounding only.
// attention_fwd_f32(o, lse, q, k, v, b, t, nh, nkv, hd)
//   bidirectional, scale 1/sqrt(hd), GQA (head h reads kv head h/(nh/nkv)); q, o [B·T, NH·HD],
//   k, v [B·T, NKV·HD], lse [B·T, NH] = max_j s_j + ln Σ_j exp(s_j − max). One block per
//   (query i, head h, batch b) = grid (t, nh, b), block 128; dynamic shared memory
//   (t + hd)·4 bytes (scores of the row, the query) plus the static 256 bytes of block_sum /
//   block_max. Scores: one warp per key (lanes over hd, warp tree sum). Output: thread per
//   column, Σ_j (p_j/Σp)·v_j sequential in j (CPU order). Any hd ≥ 1 (simple kernel: correct
//   over fast).
// attention_bwd_dq_f32, attention_bwd_dkv_f32: backward of bidirectional attention
// (`ops::attention_bwd`), f32, recomputing the probabilities from the saved log-sum-exp.
//
// Per batch b, query head h (kv head g = h / (NH/NKV)), query i, key j, scale = 1/sqrt(HD):
//   P[i,j]  = exp(q_i·k_j·scale − lse[i,h])
//   δ[i,h]  = dO_i · O_i
//   dS[i,j] = P·(dO_i·v_j − δ)·scale                  ((P·(dP − δ))·scale), CPU order
//   dQ_i    = Σ_j dS[i,j]·k_j                          j ascending
//   dK_j    = Σ_{h in group g} Σ_i dS[i,j]·q_i          h ascending, then i ascending
//   dV_j    = Σ_{h in group g} Σ_i P[i,j]·dO_i
// Dot products over HD are warp tree sums (CPU: sequential); every accumulation over keys or
// queries is sequential in the CPU's order with explicit IEEE intrinsics (no FMA contraction).
//
// attention_bwd_dq_f32(dq, delta, dout, q, k, v, o, lse, b, t, nh, nkv, hd):  writes dq and
//   delta [B·T, NH] (δ, read by the second kernel). Grid (t, nh, b), block 128, dynamic shared
//   memory (t + 2·hd)·4 bytes.
// attention_bwd_dkv_f32(dk, dv, delta, dout, q, k, v, lse, b, t, nh, nkv, hd): writes dk, dv;
//   launched after the first (same stream). Grid (t, nkv, b), block 128, dynamic shared memory
//   (2·t + 4·hd)·4 bytes.
// Layouts: q, dq, o, dout [B·T, NH·HD]; k, v, dk, dv [B·T, NKV·HD]; lse, delta [B·T, NH].
// NH % NKV == 0, any HD ≥ 1 (simple kernels: correct over fast; O(T²·HD) work per head).
#include "common.cuh"

#define ATT_BQ 64
#define ATT_BK 32
#define ATT_WARPS 4
#define ATT_PAD 8
#define ATT_HDMAX 128

// D[16x8] += A[16x16] · B[16x8], bf16 inputs, f32 accumulators (PTX ISA fragment layouts:
// groupID = lane/4, tig = lane%4; A regs: (g, 2tig..), (g+8, 2tig..), (g, 2tig+8..), (g+8, 2tig+8..);
// B regs: (k = 2tig.., n = g), (k = 2tig+8.., n = g); C: (g, 2tig..), (g+8, 2tig..)).
LLADA_DEVICE void mma_bf16_16816(float* d, const uint32_t* a, const uint32_t* b) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

LLADA_DEVICE uint32_t ld_u32(const bf16* p) { return *reinterpret_cast<const uint32_t*>(p); }

// Four 8x8 b16 matrices from shared memory, transposed: lanes 8i..8i+7 give the row addresses of
// matrix i; register i of lane t holds elements (2·(t%4), t/4) and (2·(t%4)+1, t/4) of matrix i.
LLADA_DEVICE void ldmatrix_x4_trans(uint32_t* r, const bf16* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a));
}


// Copy `rows` rows of HD bf16 from global (row stride `gstride` elements) into shared memory
// (row stride HD + ATT_PAD); rows ≥ valid are zero-filled.
template <int HD>
LLADA_DEVICE void load_tile(bf16* __restrict__ dst, const bf16* __restrict__ src, long long gstride, int rows, int valid,
                            bool vec) {
    constexpr int LD = HD + ATT_PAD;
    if (vec) {
        constexpr int CH = HD / 8;  // 16-byte chunks per row
        for (int idx = threadIdx.x; idx < rows * CH; idx += blockDim.x) {
            const int r = idx / CH, c = idx - r * CH;
            uint4 v = make_uint4(0, 0, 0, 0);
            if (r < valid) v = *reinterpret_cast<const uint4*>(src + (long long)r * gstride + c * 8);
            *reinterpret_cast<uint4*>(dst + r * LD + c * 8) = v;
        }
    } else {
        for (int idx = threadIdx.x; idx < rows * HD; idx += blockDim.x) {
            const int r = idx / HD, c = idx - r * HD;
            dst[r * LD + c] = r < valid ? src[(long long)r * gstride + c] : __float2bfloat16_rn(0.0f);
        }
    }
}

// q: base of the q part (row stride qstride; query row b·TQ + i); k, v: base of the key / value
// part for kv head 0 (row stride kvstride; key row b·L + j). Keys [kbeg, kend) of each row are
// visited (kbeg a multiple of ATT_BK). SPLIT = false: normalised bf16 rows to `out`; SPLIT = true:
// f32 partials of split `split` to part_o / part_ml (layouts in the header), `out` unused.
template <int HD, bool SPLIT>
LLADA_DEVICE void attention_tile(bf16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
                                 int split, long long prows, int b, const bf16* __restrict__ q, long long qstride,
                                 const bf16* __restrict__ k, const bf16* __restrict__ v, long long kvstride,
                                 const int* __restrict__ key_valid, int tq, int l, int kbeg, int kend, int nh,
                                 int nkv, bf16* sQ, bf16* sK, bf16* sV) {
    constexpr int LD = HD + ATT_PAD;
    constexpr int NT_S = ATT_BK / 8;  // n-tiles of S per warp (keys)
    constexpr int NT_O = HD / 8;      // n-tiles of O per warp (head dims)
    const int qt = blockIdx.x, h = blockIdx.y;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int group = nh / nkv;
    const int kvh = h / group;
    const long long qrow0 = (long long)b * tq;
    const long long krow0 = (long long)b * l;
    const int q0 = qt * ATT_BQ;
    // 16-byte tile loads need every row start aligned: the bases, and the row strides in whole
    // 16-byte units (head offsets h·HD are, HD ∈ {64, 128}). Otherwise the scalar path.
    const bool vec = aligned16(q) && aligned16(k) && aligned16(v) && (qstride & 7) == 0 && (kvstride & 7) == 0;

    const bf16* qbase = q + (qrow0 + q0) * qstride + (long long)h * HD;
    const bf16* kbase = k + krow0 * kvstride + (long long)kvh * HD;
    const bf16* vbase = v + krow0 * kvstride + (long long)kvh * HD;
    const int* kvalid_row = key_valid != nullptr ? key_valid + krow0 : nullptr;

    load_tile<HD>(sQ, qbase, qstride, ATT_BQ, min(ATT_BQ, tq - q0), vec);

    // log2 domain: s2 = s · log2(e), p = exp2(s2 − m2).
    const float scale_log2 = (1.0f / sqrtf((float)HD)) * 1.4426950408889634f;
    float o[NT_O][4];
#pragma unroll
    for (int i = 0; i < NT_O; ++i) o[i][0] = o[i][1] = o[i][2] = o[i][3] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY};
    float lrow[2] = {0.0f, 0.0f};
    // This warp's Q A-fragments, loaded once.
    __syncthreads();
    uint32_t qf[HD / 16][4];
    {
        const bf16* qw = sQ + warp * 16 * LD;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
            const bf16* qa = qw + ks * 16 + tig * 2;
            qf[ks][0] = ld_u32(qa + g * LD);
            qf[ks][1] = ld_u32(qa + (g + 8) * LD);
            qf[ks][2] = ld_u32(qa + g * LD + 8);
            qf[ks][3] = ld_u32(qa + (g + 8) * LD + 8);
        }
    }

    for (int k0 = kbeg; k0 < kend; k0 += ATT_BK) {
        const int kvalid = min(ATT_BK, kend - k0);
        __syncthreads();  // previous tile fully consumed (and sQ written on the first pass)
        load_tile<HD>(sK, kbase + (long long)k0 * kvstride, kvstride, ATT_BK, kvalid, vec);
        load_tile<HD>(sV, vbase + (long long)k0 * kvstride, kvstride, ATT_BK, kvalid, vec);
        __syncthreads();

        // S = Q · Kᵀ for this warp's 16 rows × 32 keys.
        float s[NT_S][4];
#pragma unroll
        for (int n = 0; n < NT_S; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) {
#pragma unroll
            for (int n = 0; n < NT_S; ++n) {
                uint32_t bb[2];
                const bf16* kb = sK + (n * 8 + g) * LD + ks * 16 + tig * 2;
                bb[0] = ld_u32(kb);
                bb[1] = ld_u32(kb + 8);
                mma_bf16_16816(s[n], qf[ks], bb);
            }
        }

        // Scale, mask, tile row max. Element (n, e): row g + 8·(e/2), key k0 + n·8 + 2·tig + (e&1).
        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = k0 + n * 8 + tig * 2 + (e & 1);
                bool ok = key < kend;
                if (ok && kvalid_row != nullptr) ok = kvalid_row[key] != 0;
                const float v = ok ? s[n][e] * scale_log2 : -INFINITY;
                s[n][e] = v;
                tmax[e >> 1] = fmaxf(tmax[e >> 1], v);
            }
        }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
            tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
            const float mnew = fmaxf(mrow[r], tmax[r]);
            // mnew == −inf: every key so far is masked; keep O = 0, l = 0.
            alpha[r] = mnew == -INFINITY ? 1.0f : exp2f(mrow[r] - mnew);
            mrow[r] = mnew;
        }
        // P = exp2(S − m), repacked as bf16 A fragments (two 8-key n-tiles = one 16-key k-step).
        uint32_t pa[ATT_BK / 16][4];
        float psum[2] = {0.0f, 0.0f};
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
            float p[4];
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const float mr = mrow[e >> 1];
                p[e] = mr == -INFINITY ? 0.0f : exp2f(s[n][e] - mr);
                psum[e >> 1] += p[e];
            }
            pa[n >> 1][(n & 1) * 2 + 0] = pack_bf16x2(p[0], p[1]);
            pa[n >> 1][(n & 1) * 2 + 1] = pack_bf16x2(p[2], p[3]);
        }
        lrow[0] = lrow[0] * alpha[0] + psum[0];
        lrow[1] = lrow[1] * alpha[1] + psum[1];
#pragma unroll
        for (int i = 0; i < NT_O; ++i) {
            o[i][0] *= alpha[0];
            o[i][1] *= alpha[0];
            o[i][2] *= alpha[1];
            o[i][3] *= alpha[1];
        }

        // O += P · V. B fragment (k = key, n = head dim) of n-tile n: (keys 2tig, 2tig+1; dim g) and
        // (keys 2tig+8, 2tig+9; dim g). V[key][d] is row-major in shared memory, so the fragments
        // are its 8x8 blocks transposed: one ldmatrix.x4.trans gives two n-tiles (matrices: keys
        // 0-7 / 8-15 of this k-step at dims n·8.., then the same at dims (n+1)·8..).
        const int lm_key = ((lane >> 3) & 1) * 8 + (lane & 7);
        const int lm_col = (lane >> 4) * 8;
#pragma unroll
        for (int ks = 0; ks < ATT_BK / 16; ++ks) {
            const bf16* vrow = sV + (ks * 16 + lm_key) * LD + lm_col;
#pragma unroll
            for (int n = 0; n < NT_O; n += 2) {
                uint32_t r[4];
                ldmatrix_x4_trans(r, vrow + n * 8);
                const uint32_t b0[2] = {r[0], r[1]};
                const uint32_t b1[2] = {r[2], r[3]};
                mma_bf16_16816(o[n], pa[ks], b0);
                mma_bf16_16816(o[n + 1], pa[ks], b1);
            }
        }
    }

    // Finish: full row sums over the quad, normalise, store bf16 pairs.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
        lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
    }
    const long long ostride = (long long)nh * HD;
    if constexpr (SPLIT) {
        // Partials of split `split`: row qrow0 + qi of the launch's `prows` = B·TQ rows.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int qi = q0 + warp * 16 + g + r * 8;
            if (qi >= tq) continue;
            const long long prow = (long long)split * prows + qrow0 + qi;
            float* po = part_o + (prow * nh + h) * HD + tig * 2;
#pragma unroll
            for (int n = 0; n < NT_O; ++n) {
                *reinterpret_cast<float2*>(po + n * 8) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
            }
            if (tig == 0) {
                float* pm = part_ml + (prow * nh + h) * 2;
                pm[0] = mrow[r];
                pm[1] = lrow[r];
            }
        }
        return;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int q = q0 + warp * 16 + g + r * 8;
        if (q >= tq) continue;
        const float inv = lrow[r] > 0.0f ? 1.0f / lrow[r] : 0.0f;
        bf16* orow = out + (qrow0 + q) * ostride + (long long)h * HD + tig * 2;
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            const uint32_t w = pack_bf16x2(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
            *reinterpret_cast<uint32_t*>(orow + n * 8) = w;
        }
    }
}

#define ATT_SMEM                                                  \
    __shared__ __align__(16) bf16 sQ[ATT_BQ * (ATT_HDMAX + ATT_PAD)]; \
    __shared__ __align__(16) bf16 sK[ATT_BK * (ATT_HDMAX + ATT_PAD)]; \
    __shared__ __align__(16) bf16 sV[ATT_BK * (ATT_HDMAX + ATT_PAD)];

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ qkv, const int* __restrict__ key_valid, int b, int t,
                   int nh, int nkv, int hd) {
    ATT_SMEM
    if ((int)blockIdx.z >= b || (int)blockIdx.y >= nh || nkv <= 0 || nh % nkv != 0) return;
    if ((int)blockIdx.x * ATT_BQ >= t) return;
    const long long stride = (long long)(nh + 2 * nkv) * hd;
    const int bi = blockIdx.z;
    if (hd == 128) {
        attention_tile<128, false>(out, nullptr, nullptr, 0, 0, bi, qkv, stride, qkv + (long long)nh * 128,
                                   qkv + (long long)(nh + nkv) * 128, stride, key_valid, t, t, 0, t, nh, nkv, sQ, sK,
                                   sV);
    } else if (hd == 64) {
        attention_tile<64, false>(out, nullptr, nullptr, 0, 0, bi, qkv, stride, qkv + (long long)nh * 64,
                                  qkv + (long long)(nh + nkv) * 64, stride, key_valid, t, t, 0, t, nh, nkv, sQ, sK, sV);
    }
}

extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_cached_fwd_bf16(bf16* __restrict__ out, const bf16* __restrict__ qkv, const bf16* __restrict__ k_cache,
                          const bf16* __restrict__ v_cache, const int* __restrict__ key_valid, int b, int tq, int l,
                          int nh, int nkv, int hd) {
    ATT_SMEM
    if ((int)blockIdx.z >= b || (int)blockIdx.y >= nh || nkv <= 0 || nh % nkv != 0) return;
    if ((int)blockIdx.x * ATT_BQ >= tq) return;
    const long long qstride = (long long)(nh + 2 * nkv) * hd;
    const long long kvstride = (long long)nkv * hd;
    const int bi = blockIdx.z;
    if (hd == 128) {
        attention_tile<128, false>(out, nullptr, nullptr, 0, 0, bi, qkv, qstride, k_cache, v_cache, kvstride,
                                   key_valid, tq, l, 0, l, nh, nkv, sQ, sK, sV);
    } else if (hd == 64) {
        attention_tile<64, false>(out, nullptr, nullptr, 0, 0, bi, qkv, qstride, k_cache, v_cache, kvstride,
                                  key_valid, tq, l, 0, l, nh, nkv, sQ, sK, sV);
    }
}

// Split-KV partials. q: query row bi·TQ + i at q + row·qstride (head h at h·HD); k, v: key row
// bi·L + j at k/v + row·kvstride (kv head g at g·HD); key_valid [B·L] or NULL. Grid
// (ceil(TQ/64), NH, B·splits), block 128; chunk a positive multiple of 32, splits = ceil(L/chunk).
extern "C" __global__ void __launch_bounds__(ATT_WARPS * 32)
attention_split_bf16(float* __restrict__ part_o, float* __restrict__ part_ml, const bf16* __restrict__ q,
                     const bf16* __restrict__ k, const bf16* __restrict__ v, const int* __restrict__ key_valid,
                     long long qstride, long long kvstride, int b, int tq, int l, int nh, int nkv, int hd, int chunk,
                     int splits) {
    ATT_SMEM
    if (splits <= 0 || chunk <= 0 || chunk % ATT_BK != 0) return;
    const int bi = (int)blockIdx.z / splits, sp = (int)blockIdx.z % splits;
    if (bi >= b || (int)blockIdx.y >= nh || nkv <= 0 || nh % nkv != 0) return;
    if ((int)blockIdx.x * ATT_BQ >= tq) return;
    const long long kb = (long long)sp * chunk;
    if (kb >= l) return;
    const int kbeg = (int)kb, kend = min(l, kbeg + chunk);
    const long long prows = (long long)b * tq;
    if (hd == 128) {
        attention_tile<128, true>(nullptr, part_o, part_ml, sp, prows, bi, q, qstride, k, v, kvstride, key_valid, tq,
                                  l, kbeg, kend, nh, nkv, sQ, sK, sV);
    } else if (hd == 64) {
        attention_tile<64, true>(nullptr, part_o, part_ml, sp, prows, bi, q, qstride, k, v, kvstride, key_valid, tq,
                                 l, kbeg, kend, nh, nkv, sQ, sK, sV);
    }
}

// Combine the split partials: grid (rows = B·TQ, NH), block HD (one thread per output element).
extern "C" __global__ void __launch_bounds__(1024)
attention_combine_bf16(bf16* __restrict__ out, const float* __restrict__ part_o, const float* __restrict__ part_ml,
                       int rows, int nh, int hd, int splits) {
    const int row = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (row >= rows || h >= nh || d >= hd) return;
    const long long plane = (long long)rows * nh;  // (row, head) pairs per split
    const long long rh = (long long)row * nh + h;
    float m = -INFINITY;
    for (int s = 0; s < splits; ++s) m = fmaxf(m, part_ml[(s * plane + rh) * 2]);
    float acc = 0.0f, lsum = 0.0f;
    if (m != -INFINITY) {
        for (int s = 0; s < splits; ++s) {
            const float ms = part_ml[(s * plane + rh) * 2];
            if (ms == -INFINITY) continue;
            const float w = exp2f(ms - m);
            lsum += w * part_ml[(s * plane + rh) * 2 + 1];
            acc += w * part_o[(s * plane + rh) * hd + d];
        }
    }
    const float inv = lsum > 0.0f ? 1.0f / lsum : 0.0f;
    out[rh * hd + d] = __float2bfloat16_rn(acc * inv);
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

LLADA_DEVICE float warp_dot(const float* a, const float* b, int hd, int lane) {
    float acc = 0.0f;
    for (int c = lane; c < hd; c += 32) acc = __fadd_rn(acc, __fmul_rn(a[c], b[c]));
    return warp_sum(acc);
}

extern "C" __global__ void __launch_bounds__(128)
attention_bwd_dq_f32(float* __restrict__ dq, float* __restrict__ delta, const float* __restrict__ dout,
                     const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                     const float* __restrict__ o, const float* __restrict__ lse, int b, int t, int nh, int nkv,
                     int hd) {
    extern __shared__ float smem_dq[];
    float* ds = smem_dq;            // [t]
    float* qs = smem_dq + t;        // [hd]
    float* dos = smem_dq + t + hd;  // [hd]
    const int i = blockIdx.x, h = blockIdx.y, bi = blockIdx.z;
    if (i >= t || h >= nh || bi >= b || nkv <= 0 || nh % nkv != 0) return;
    const int kh = h / (nh / nkv);
    const long long qw = (long long)nh * hd, kw = (long long)nkv * hd;
    const long long row = (long long)bi * t + i;
    const long long qo = row * qw + (long long)h * hd;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        qs[c] = q[qo + c];
        dos[c] = dout[qo + c];
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    // δ: one warp, the same tree order in both kernels' use (the second reads it back).
    float dl = 0.0f;
    if (warp == 0) dl = warp_dot(dos, o + qo, hd, lane);
    __shared__ float dl_s;
    if (threadIdx.x == 0) {
        dl_s = dl;
        delta[row * nh + h] = dl;
    }
    __syncthreads();
    const float dlt = dl_s;
    const float l = lse[row * nh + h];
    for (int j = warp; j < t; j += nwarps) {
        const long long kr = ((long long)bi * t + j) * kw + (long long)kh * hd;
        const float s = __fmul_rn(warp_dot(qs, k + kr, hd, lane), scale);
        const float dp = warp_dot(dos, v + kr, hd, lane);
        if (lane == 0) {
            const float p = expf(__fsub_rn(s, l));
            ds[j] = __fmul_rn(__fmul_rn(p, __fsub_rn(dp, dlt)), scale);
        }
    }
    __syncthreads();
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        float acc = 0.0f;
        for (int j = 0; j < t; ++j)
            acc = __fadd_rn(acc, __fmul_rn(ds[j], k[((long long)bi * t + j) * kw + (long long)kh * hd + c]));
        dq[qo + c] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(128)
attention_bwd_dkv_f32(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ delta,
                      const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                      const float* __restrict__ v, const float* __restrict__ lse, int b, int t, int nh, int nkv,
                      int hd) {
    extern __shared__ float smem_dkv[];
    float* ps = smem_dkv;                 // [t]  P[i, j] for the current head
    float* ds = smem_dkv + t;             // [t]  dS[i, j]
    float* ks = smem_dkv + 2 * t;         // [hd]
    float* vs = smem_dkv + 2 * t + hd;    // [hd]
    float* adk = smem_dkv + 2 * t + 2 * hd;  // [hd] dk_j accumulator
    float* adv = smem_dkv + 2 * t + 3 * hd;  // [hd] dv_j accumulator
    const int j = blockIdx.x, g = blockIdx.y, bi = blockIdx.z;
    if (j >= t || g >= nkv || bi >= b || nkv <= 0 || nh % nkv != 0) return;
    const int group = nh / nkv;
    const long long qw = (long long)nh * hd, kw = (long long)nkv * hd;
    const long long kr = ((long long)bi * t + j) * kw + (long long)g * hd;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        ks[c] = k[kr + c];
        vs[c] = v[kr + c];
    }
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    // Column accumulators in shared memory: column c of dk_j / dv_j is owned by one thread
    // (c ≡ threadIdx.x mod blockDim.x), so they need no synchronisation of their own.
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        adk[c] = 0.0f;
        adv[c] = 0.0f;
    }
    for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        for (int i = warp; i < t; i += nwarps) {
            const long long row = (long long)bi * t + i;
            const long long qo = row * qw + (long long)h * hd;
            const float s = __fmul_rn(warp_dot(q + qo, ks, hd, lane), scale);
            const float dp = warp_dot(dout + qo, vs, hd, lane);
            if (lane == 0) {
                const float p = expf(__fsub_rn(s, lse[row * nh + h]));
                ps[i] = p;
                ds[i] = __fmul_rn(__fmul_rn(p, __fsub_rn(dp, delta[row * nh + h])), scale);
            }
        }
        __syncthreads();
        for (int c = threadIdx.x; c < hd; c += blockDim.x) {
            float a = adk[c], bv = adv[c];
            for (int i = 0; i < t; ++i) {
                const long long qo = ((long long)bi * t + i) * qw + (long long)h * hd + c;
                bv = __fadd_rn(bv, __fmul_rn(ps[i], dout[qo]));
                a = __fadd_rn(a, __fmul_rn(ds[i], q[qo]));
            }
            adk[c] = a;
            adv[c] = bv;
        }
        __syncthreads();  // ps/ds are rewritten for the next head
    }
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        dk[kr + c] = adk[c];
        dv[kr + c] = adv[c];
    }
}
