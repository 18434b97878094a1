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
// attention_fwd_bf16s, attention_bwd_dq_bf16s, attention_bwd_dkv_bf16s: the same three kernels in
// bf16 storage (src/train/mixed.rs): q, k, v, o, dout, dq, dk, dv bf16, lse and delta f32; the same
// f32 math on the loaded values, each bf16 output rounded once (RNE) after its f32 accumulation.
//
// Opt-in tiled f32 training attention (LLADA_TRAIN_KERNELS=tiled, src/train/cuda/tiled.rs; never
// run on a GPU yet). The kernels above give one block to each query (or key) row and re-read all
// of K/V (or Q/dO) of the head from L2 for every row; these give a block a tile of 32 rows that
// shares 32-row tiles of the other operand through shared memory, so each K/V (Q/dO) row is read
// once per 32 rows. Same interface, layouts, scale and GQA mapping as the kernels above; HD ≤ 128
// (the launcher runs the kernels above for larger HD). Block 128 threads: thread (r = tid/4,
// q4 = tid%4) owns tile row r, tile columns q4 + 4m (m < 8) of a 32×32 score tile and head columns
// q4 + 4m (m < 32) of its output row. Shared rows are padded to ld = HD | 1 floats (odd: the 8 rows
// a warp reads at once sit in distinct banks).
// Numerics: plain f32 on the CUDA cores — dot products and weighted sums as explicit __fmaf_rn
// chains in index order, the other operations explicit IEEE intrinsics, expf/logf as the kernels
// above — so nvcc contracts nothing and every GPU gives the same bits. TF32 tensor cores would
// round q, k, v, dO to 10 mantissa bits (~1e-3 relative) and break the f32 parity with the CPU
// reference; they are left out on purpose. No atomics: every sum has one owner thread and a fixed
// order, so a step is bit-reproducible (not bit-exact with the CPU: FMA, and the forward's online
// softmax; the bounds are derived in tests/cuda_train_tiled.rs).
// attention_fwd_tiled_f32(o, lse, q, k, v, b, t, nh, nkv, hd): grid (⌈T/32⌉, NH, B), dynamic shared
//   memory (64·ld + 32·33)·4 bytes (Q tile, K-then-V tile, P tile). Per 32-key tile: S = Q·Kᵀ·scale
//   (−∞ past T), m' = max(m, rowmax S), α = expf(m − m'), P = expf(S − m'), l = l·α + Σ_j P_j
//   (j ascending), O = O·α + Σ_j P_j·V_j (j ascending); at the end o = O / l, lse = m + logf(l).
//   Online softmax: each weight passes ≤ ⌈T/32⌉ rescalings, each an expf (≤ 2 ulp) and a product.
// attention_bwd_dq_tiled_f32(dq, delta, dout, q, k, v, o, lse, b, t, nh, nkv, hd): writes delta
//   [B·T, NH] = dO·O (HD ascending) for its rows, then per 32-key tile P = expf(S − lse),
//   dS = (P·(dO·V − δ))·scale, dQ += dS·K (keys ascending). Grid (⌈T/32⌉, NH, B), dynamic shared
//   memory (128·ld + 32·33)·4 bytes (Q, dO, K, V tiles, dS tile).
// attention_bwd_dkv_tiled_f32(dk, dv, delta, dout, q, k, v, lse, b, t, nh, nkv, hd): launched after
//   the first (reads its delta). A block owns 32 keys of kv head g and walks the group's heads
//   (ascending) and their 32-query tiles (ascending): dV += P·dO, dK += dS·Q, queries ascending —
//   the order of attention_bwd_dkv_f32. Grid (⌈T/32⌉, NKV, B), dynamic shared memory
//   (128·ld + 2·32·33 + 64)·4 bytes (K, V, Q, dO tiles, P and dS tiles, lse and δ of the queries).
// The backward kernels use more than 48 KB of shared memory at HD = 128 (70 KB, 75 KB): the
// launcher raises their limit once (every sm_80+ GPU allows ≥ 99 KB per block).
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


// Max over the 4 lanes of a quad (the threads holding one row of an mma accumulator).
LLADA_DEVICE float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// P of 8-key n-tile n (accumulator layout p[0..3]) as bf16 into its A fragment: the k-step's
// registers 0, 1 (n even) or 2, 3 (n odd).
LLADA_DEVICE void store_p_frag(uint32_t* a, int odd, const float* p) {
    a[odd * 2 + 0] = pack_bf16x2(p[0], p[1]);
    a[odd * 2 + 1] = pack_bf16x2(p[2], p[3]);
}

// Two mma n-tiles from one ldmatrix.x4: d0 += a · {r0, r1}, d1 += a · {r2, r3}.
LLADA_DEVICE void mma_pair(float* d0, float* d1, const uint32_t* a, const uint32_t* r) {
    const uint32_t b0[2] = {r[0], r[1]};
    const uint32_t b1[2] = {r[2], r[3]};
    mma_bf16_16816(d0, a, b0);
    mma_bf16_16816(d1, a, b1);
}

// O += P · V for one warp's 16 rows: P as KS 16-key A fragments, V row-major in shared memory
// (row stride LD, KS·16 keys). B fragment (k = key, n = head dim) of n-tile n: (keys 2tig,
// 2tig+1; dim g) and (keys 2tig+8, 2tig+9; dim g), i.e. V's 8x8 blocks transposed: one
// ldmatrix.x4.trans gives two n-tiles (matrices: keys 0-7 / 8-15 of the k-step at dims n·8..,
// then the same at dims (n+1)·8..).
template <int KS, int NT_O, int LD>
LLADA_DEVICE void pv_mma(float (&o)[NT_O][4], const uint32_t (&pa)[KS][4], const bf16* sV, int lane) {
    const int lm_key = ((lane >> 3) & 1) * 8 + (lane & 7);
    const int lm_col = (lane >> 4) * 8;
#pragma unroll
    for (int ks = 0; ks < KS; ++ks) {
        const bf16* vrow = sV + (ks * 16 + lm_key) * LD + lm_col;
#pragma unroll
        for (int n = 0; n < NT_O; n += 2) {
            uint32_t r[4];
            ldmatrix_x4_trans(r, vrow + n * 8);
            mma_pair(o[n], o[n + 1], pa[ks], r);
        }
    }
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
            tmax[r] = quad_max(tmax[r]);
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
            store_p_frag(pa[n >> 1], n & 1, p);
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

        // O += P · V (V's fragments from ldmatrix.x4.trans, see pv_mma).
        pv_mma<ATT_BK / 16, NT_O, LD>(o, pa, sV, lane);
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

// ---------------------------------------------------------------------------------------------
// attention_fa2_bf16_hd{64,128}_q{32,64} + attention_fa2_combine_bf16: the same op (bidirectional
// attention, bf16 in/out, the math and masking rules at the top of this file) as a
// flash-attention-2-class kernel. Selected by the CUDA backend with LLADA_ATTN=fa2 (default: the
// kernels above) until a GPU run has passed its parity tests (tests/cuda_parity.rs, fa2_*).
//
// One symbol per (head dim, query rows): hd64/hd128 × q32 (2 warps) / q64 (4 warps); each warp
// owns 16 query rows and does the same per-row arithmetic in every variant, so a row's result
// does not depend on the variant, on the tile it sits in, or on which rows share the call.
// Other head dims: no symbol (the launcher rejects them with the kernels' head-dim error).
//
// (out, part_o, part_ml, q, k, v, key_valid /* nullable [B·L] */, long long qstride,
//  long long kvstride, int b, int tq, int l, int nh, int nkv, int chunk, int splits)
// q: query row bi·TQ + i at q + row·qstride (head h at h·HD); k, v: key row bi·L + j at
// k/v + row·kvstride (kv head g = h / (NH/NKV) at g·HD). q, k, v 16-byte aligned and both strides
// multiples of 8 elements (the launcher checks; cp.async moves 16 bytes).
//
// Chunks: the L keys are cut into ceil(L / chunk) chunks of `chunk` keys (a positive multiple of
// 64 that the launcher derives from L alone). Each chunk is an independent online softmax over
// its 64-key tiles giving (O_c unnormalised f32, m_c row max in the log2 domain, l_c row sum), and
// the chunks are merged in ascending order from (M, L, O) = (−inf, 0, 0) by
//   M' = max(M, m_c), a = exp2(M − M') (0 when M = −inf), b = exp2(m_c − M') (0 when m_c = −inf),
//   O = O·a + O_c·b, L = L·a + l_c·b, M = M'   (each product and sum rounded: __fmul_rn/__fadd_rn)
// and out = bf16(O · (1/L)) (zeros when L = 0: every key masked). `fa2_merge` is that step; the
// kernel (splits = 1) runs it in registers, the combine kernel (splits > 1) runs it over the
// partials, so split and unsplit launches give the same bits and the launcher may choose either
// from the grid size (B·NH·ceil(TQ/rows) blocks vs the SM count) without changing any row.
// splits = 1: grid (ceil(TQ/rows), NH, B), every chunk in one block, bf16 rows to `out`.
// splits = ceil(L/chunk) > 1: grid (ceil(TQ/rows), NH, B·splits), block z = bi·splits + s writes
// chunk s raw to part_o [splits, B·TQ, NH, HD] and (m_s, l_s) to part_ml [splits, B·TQ, NH, 2]
// (the layout of attention_split_bf16), then attention_fa2_combine_bf16 merges them.
//
// Per 64-key tile: K, V and the tile's key mask (0/1 ints, 0 past the chunk end) go to shared
// memory with cp.async into one of two stages while the other stage is computed (double
// buffering; partial tiles are zero-filled by cp.async's src-size); S = Q·Kᵀ with
// mma.sync.m16n8k16 (bf16 → f32), K's B fragments from ldmatrix.x4, Q's A fragments loaded once
// with ldmatrix.x4; online softmax in registers (thread holds rows lane/4 and lane/4 + 8):
//   m' = max(m, max_j s_j·c), c = log2(e)/sqrt(HD); α = exp2(m − m'); p_j = exp2(fma(s_j, c, −m'))
//   l = fma(l, α, Σ p_j) per thread (quad-reduced at the chunk end); O = O·α + bf16(P)·V,
// V's B fragments from ldmatrix.x4.trans. Q's shared tile aliases stage 1 (read into registers
// before the first prefetch), so shared memory is 2 stages × (K + V) of [64][HD + 8] bf16 plus
// 2 × 64 mask ints: 70,144 B at HD 128 (dynamic, opt-in above 48 KiB), 37,376 B at HD 64.
// Block WARPS·32 threads (q64: 128, q32: 64).
#define FA2_BK 64
#define FA2_PAD 8

template <int HD>
struct Fa2Smem {
    static constexpr int LD = HD + FA2_PAD;
    static constexpr int TILE = FA2_BK * LD;  // elements of one K or V stage
    static constexpr int BYTES = 4 * TILE * 2 + 2 * FA2_BK * 4;
};

LLADA_DEVICE void cp_async16(void* smem, const void* gmem, int src_bytes) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
LLADA_DEVICE void cp_async4(void* smem, const void* gmem) {
    const uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(s), "l"(gmem) : "memory");
}
LLADA_DEVICE void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
LLADA_DEVICE void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory (not transposed): lanes 8i..8i+7 give the row
// addresses of matrix i; register i of lane t holds elements (t/4, 2·(t%4)) and (t/4, 2·(t%4)+1).
LLADA_DEVICE void ldmatrix_x4(uint32_t* r, const bf16* p) {
    const uint32_t a = (uint32_t)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// One merge step of the header's chunk merge: the weights of the running state (a) and of the
// chunk (b), and the new running max. Shared by the kernel and the combine kernel (same bits).
LLADA_DEVICE void fa2_merge(float& mrun, float mc, float& a, float& b) {
    const float mn = fmaxf(mrun, mc);
    a = mrun == -INFINITY ? 0.0f : exp2f(__fsub_rn(mrun, mn));
    b = mc == -INFINITY ? 0.0f : exp2f(__fsub_rn(mc, mn));
    mrun = mn;
}
LLADA_DEVICE float fa2_mix(float run, float a, float c, float b) { return __fadd_rn(__fmul_rn(run, a), __fmul_rn(c, b)); }
LLADA_DEVICE float fa2_inv(float lrun) { return lrun > 0.0f ? __fdiv_rn(1.0f, lrun) : 0.0f; }

// Online-softmax step of one row (log2 domain): the new max m' = max(m, tmax·c) from the tile's
// raw max, the old state's rescale α = exp2(m − m') and −m' for the exponents (α = 1 and 0 while
// every key of the chunk so far is masked, m' = −inf: O and l stay 0).
LLADA_DEVICE void fa2_row_max(float& m, float tmax, float c, float& alpha, float& mneg) {
    const float mnew = fmaxf(m, __fmul_rn(tmax, c));
    alpha = mnew == -INFINITY ? 1.0f : exp2f(__fsub_rn(m, mnew));
    mneg = mnew == -INFINITY ? 0.0f : -mnew;
    m = mnew;
}

// P = exp2(fma(S, c, −m')) of one tile as bf16 A fragments (two 8-key n-tiles per 16-key
// k-step) and the thread's f32 row sums of P (rows g, g + 8) in key order.
template <int NT_S>
LLADA_DEVICE void fa2_probs(uint32_t (&pa)[NT_S / 2][4], float (&psum)[2], const float (&s)[NT_S][4], float c,
                            const float* mneg) {
    psum[0] = psum[1] = 0.0f;
#pragma unroll
    for (int n = 0; n < NT_S; ++n) {
        float p[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            p[e] = exp2f(__fmaf_rn(s[n][e], c, mneg[e >> 1]));
            psum[e >> 1] = __fadd_rn(psum[e >> 1], p[e]);
        }
        store_p_frag(pa[n >> 1], n & 1, p);
    }
}

// S = Q·Kᵀ for one warp's 16 rows × NT_S·8 keys: Q A-fragments in registers, K [keys][LD] in
// shared memory read with ldmatrix.x4 at the lane offsets (k_row, k_col) (one load = b0, b1 of
// two key n-tiles).
template <int HD, int NT_S>
LLADA_DEVICE void fa2_scores(float (&s)[NT_S][4], const uint32_t (&qf)[HD / 16][4], const bf16* kt, int k_row,
                             int k_col) {
    constexpr int LD = Fa2Smem<HD>::LD;
#pragma unroll
    for (int n = 0; n < NT_S; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < HD / 16; ++ks) {
#pragma unroll
        for (int np = 0; np < NT_S; np += 2) {
            uint32_t r[4];
            ldmatrix_x4(r, kt + (np * 8 + k_row) * LD + ks * 16 + k_col);
            mma_pair(s[np], s[np + 1], qf[ks], r);
        }
    }
}

// K and V rows [k0, k0 + 64) (zero past kend) and their mask ints into stage `st`. Thread t
// copies 16-byte column t % (HD/8) of rows t / (HD/8) + i·(NTHREADS / (HD/8)).
template <int HD, int NTHREADS>
LLADA_DEVICE void fa2_load_kv(bf16* sK, bf16* sV, int* sM, const bf16* kbase, const bf16* vbase, const int* kvalid_row,
                              long long kvstride, int k0, int kend) {
    constexpr int LD = Fa2Smem<HD>::LD, CH = HD / 8, RSTEP = NTHREADS / CH;
    static_assert(NTHREADS % CH == 0 && FA2_BK % RSTEP == 0, "whole rows per pass");
    const int r0 = (int)threadIdx.x / CH, c = (int)threadIdx.x % CH;
    const long long off0 = (long long)(k0 + r0) * kvstride + c * 8;
    const long long step = (long long)RSTEP * kvstride;
#pragma unroll
    for (int i = 0; i < FA2_BK / RSTEP; ++i) {
        const int r = r0 + i * RSTEP;
        const bool ok = k0 + r < kend;
        const long long off = ok ? off0 + i * step : 0;
        cp_async16(sK + r * LD + c * 8, kbase + off, ok ? 16 : 0);
        cp_async16(sV + r * LD + c * 8, vbase + off, ok ? 16 : 0);
    }
    for (int r = threadIdx.x; r < FA2_BK; r += NTHREADS) {
        const int key = k0 + r;
        if (key < kend && kvalid_row != nullptr) {
            cp_async4(sM + r, kvalid_row + key);
        } else {
            sM[r] = key < kend ? 1 : 0;
        }
    }
}

template <int HD, int WARPS>
LLADA_DEVICE void fa2_body(bf16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml,
                           const bf16* __restrict__ q, const bf16* __restrict__ k, const bf16* __restrict__ v,
                           const int* __restrict__ key_valid, long long qstride, long long kvstride, int b, int tq,
                           int l, int nh, int nkv, int chunk, int splits) {
    constexpr int BQ = WARPS * 16, NTHREADS = WARPS * 32;
    constexpr int LD = Fa2Smem<HD>::LD, TILE = Fa2Smem<HD>::TILE;
    constexpr int NT_S = FA2_BK / 8;  // 8-key n-tiles of S per tile
    constexpr int NT_O = HD / 8;      // 8-dim n-tiles of O
    extern __shared__ __align__(16) unsigned char fa2_smem[];
    bf16* sK = reinterpret_cast<bf16*>(fa2_smem);  // [2][64][LD]
    bf16* sV = sK + 2 * TILE;                       // [2][64][LD]
    int* sM = reinterpret_cast<int*>(sV + 2 * TILE);  // [2][64]
    bf16* sQ = sK + TILE;                           // [BQ][LD], aliases K stage 1 until the first prefetch

    if (nkv <= 0 || nh % nkv != 0 || chunk <= 0 || chunk % FA2_BK != 0 || splits <= 0) return;
    const int nchunks = (l + chunk - 1) / chunk;
    if (splits > 1 && splits != nchunks) return;
    const int bi = (int)blockIdx.z / splits, sp = (int)blockIdx.z % splits;
    const int h = blockIdx.y;
    const int q0 = (int)blockIdx.x * BQ;
    if (bi >= b || h >= nh || q0 >= tq) return;
    const int kbeg = splits > 1 ? sp * chunk : 0;
    const int kend = splits > 1 ? min(l, kbeg + chunk) : l;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = lane >> 2, tig = lane & 3;
    const int kvh = h / (nh / nkv);
    const long long qrow0 = (long long)bi * tq, krow0 = (long long)bi * l;
    const bf16* qbase = q + (qrow0 + q0) * qstride + (long long)h * HD;
    const bf16* kbase = k + krow0 * kvstride + (long long)kvh * HD;
    const bf16* vbase = v + krow0 * kvstride + (long long)kvh * HD;
    const int* kvalid_row = key_valid != nullptr ? key_valid + krow0 : nullptr;

    // Prologue: Q (zero rows past TQ) into the stage-1 K buffer, tile 0 into stage 0.
    {
        constexpr int CH = HD / 8;
        const int qvalid = min(BQ, tq - q0);
#pragma unroll
        for (int i = 0; i < BQ * CH / NTHREADS; ++i) {
            const int idx = (int)threadIdx.x + i * NTHREADS;
            const int r = idx / CH, c = idx - r * CH;
            const bool ok = r < qvalid;
            cp_async16(sQ + r * LD + c * 8, qbase + (ok ? (long long)r * qstride + c * 8 : 0), ok ? 16 : 0);
        }
    }
    fa2_load_kv<HD, NTHREADS>(sK, sV, sM, kbase, vbase, kvalid_row, kvstride, kbeg, kend);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();
    // This warp's Q A-fragments: matrix i of ldmatrix.x4 = rows (i&1)·8.., dims (i>>1)·8.. of a
    // 16-dim step, i.e. registers a0..a3 of the m16n8k16 A layout.
    uint32_t qf[HD / 16][4];
    {
        const int mi = lane >> 3;
        const bf16* qa = sQ + (warp * 16 + (mi & 1) * 8 + (lane & 7)) * LD + (mi >> 1) * 8;
#pragma unroll
        for (int ks = 0; ks < HD / 16; ++ks) ldmatrix_x4(qf[ks], qa + ks * 16);
    }
    __syncthreads();  // sQ is overwritten by the first prefetch

    const float scale_log2 = (1.0f / sqrtf((float)HD)) * 1.4426950408889634f;
    // Chunk state (reset per chunk) and the merged state (rows g and g + 8 of this warp).
    float o[NT_O][4], oacc[NT_O][4];
#pragma unroll
    for (int i = 0; i < NT_O; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) o[i][e] = oacc[i][e] = 0.0f;
    float mrow[2] = {-INFINITY, -INFINITY}, lrow[2] = {0.0f, 0.0f};
    float macc[2] = {-INFINITY, -INFINITY}, lacc[2] = {0.0f, 0.0f};

    // End of a chunk: full row sums over the quad; merge into the running state (splits = 1).
    auto finish_chunk = [&]() {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            lrow[r] = __fadd_rn(lrow[r], __shfl_xor_sync(0xffffffffu, lrow[r], 1));
            lrow[r] = __fadd_rn(lrow[r], __shfl_xor_sync(0xffffffffu, lrow[r], 2));
        }
        if (splits > 1) return;  // written raw below
        float a[2], bw[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            fa2_merge(macc[r], mrow[r], a[r], bw[r]);
            lacc[r] = fa2_mix(lacc[r], a[r], lrow[r], bw[r]);
            mrow[r] = -INFINITY;
            lrow[r] = 0.0f;
        }
#pragma unroll
        for (int i = 0; i < NT_O; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                oacc[i][e] = fa2_mix(oacc[i][e], a[e >> 1], o[i][e], bw[e >> 1]);
                o[i][e] = 0.0f;
            }
    };

    const int ntiles = (kend - kbeg + FA2_BK - 1) / FA2_BK;
    // ldmatrix lane offsets for K: matrix i = keys (i>>1)·8.., dims (i&1)·8.. of a 16-key pair of
    // n-tiles and a 16-dim step, i.e. b0, b1 of n-tile 2j and of n-tile 2j + 1.
    const int k_row = ((lane >> 4) & 1) * 8 + (lane & 7), k_col = ((lane >> 3) & 1) * 8;
    for (int it = 0; it < ntiles; ++it) {
        const int k0 = kbeg + it * FA2_BK, st = it & 1;
        if (it + 1 < ntiles) {
            const int ns = st ^ 1;
            fa2_load_kv<HD, NTHREADS>(sK + ns * TILE, sV + ns * TILE, sM + ns * FA2_BK, kbase, vbase, kvalid_row,
                                      kvstride, k0 + FA2_BK, kend);
            cp_async_commit();
        }
        if (k0 != kbeg && k0 % chunk == 0) finish_chunk();
        if (it + 1 < ntiles) {
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16* kt = sK + st * TILE;
        const bf16* vt = sV + st * TILE;
        const int* mt = sM + st * FA2_BK;

        float s[NT_S][4];
        fa2_scores<HD, NT_S>(s, qf, kt, k_row, k_col);
        // Mask and tile row max (log2 domain). Element (n, e): row g + 8·(e/2), key n·8 + 2·tig + (e&1).
        float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int n = 0; n < NT_S; ++n) {
            const int2 mk = *reinterpret_cast<const int2*>(mt + n * 8 + tig * 2);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const bool ok = (e & 1) ? mk.y != 0 : mk.x != 0;
                s[n][e] = ok ? s[n][e] : -INFINITY;
                tmax[e >> 1] = fmaxf(tmax[e >> 1], s[n][e]);
            }
        }
        float alpha[2], mneg[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) fa2_row_max(mrow[r], quad_max(tmax[r]), scale_log2, alpha[r], mneg[r]);
        uint32_t pa[FA2_BK / 16][4];
        float psum[2];
        fa2_probs<NT_S>(pa, psum, s, scale_log2, mneg);
#pragma unroll
        for (int r = 0; r < 2; ++r) lrow[r] = __fmaf_rn(lrow[r], alpha[r], psum[r]);
#pragma unroll
        for (int i = 0; i < NT_O; ++i)
#pragma unroll
            for (int e = 0; e < 4; ++e) o[i][e] = __fmul_rn(o[i][e], alpha[e >> 1]);
        // O += P·V (V's fragments from ldmatrix.x4.trans, two dim n-tiles per load).
        pv_mma<FA2_BK / 16, NT_O, LD>(o, pa, vt, lane);
        __syncthreads();  // stage st is refilled by the next iteration's prefetch
    }
    finish_chunk();

    const long long ostride = (long long)nh * HD;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int qi = q0 + warp * 16 + g + r * 8;
        if (qi >= tq) continue;
        if (splits > 1) {
            const long long prow = (long long)sp * b * tq + qrow0 + qi;
            float* po = part_o + (prow * nh + h) * HD + tig * 2;
#pragma unroll
            for (int n = 0; n < NT_O; ++n) *reinterpret_cast<float2*>(po + n * 8) = make_float2(o[n][2 * r], o[n][2 * r + 1]);
            if (tig == 0) {
                float* pm = part_ml + (prow * nh + h) * 2;
                pm[0] = mrow[r];
                pm[1] = lrow[r];
            }
            continue;
        }
        const float inv = fa2_inv(lacc[r]);
        bf16* orow = out + (qrow0 + qi) * ostride + (long long)h * HD + tig * 2;
#pragma unroll
        for (int n = 0; n < NT_O; ++n) {
            const uint32_t w = pack_bf16x2(__fmul_rn(oacc[n][2 * r], inv), __fmul_rn(oacc[n][2 * r + 1], inv));
            *reinterpret_cast<uint32_t*>(orow + n * 8) = w;
        }
    }
}

#define FA2_ENTRY(HD, BQ, WARPS)                                                                                      \
    extern "C" __global__ void __launch_bounds__(WARPS * 32) attention_fa2_bf16_hd##HD##_q##BQ(                       \
        bf16* __restrict__ out, float* __restrict__ part_o, float* __restrict__ part_ml, const bf16* __restrict__ q, \
        const bf16* __restrict__ k, const bf16* __restrict__ v, const int* __restrict__ key_valid,                   \
        long long qstride, long long kvstride, int b, int tq, int l, int nh, int nkv, int chunk, int splits) {       \
        fa2_body<HD, WARPS>(out, part_o, part_ml, q, k, v, key_valid, qstride, kvstride, b, tq, l, nh, nkv, chunk,   \
                            splits);                                                                                 \
    }
FA2_ENTRY(64, 64, 4)
FA2_ENTRY(64, 32, 2)
FA2_ENTRY(128, 64, 4)
FA2_ENTRY(128, 32, 2)

// Merge the split partials in chunk order (the header's merge, the same bits as the in-block
// merge): grid (rows = B·TQ, NH), block HD (one thread per output element).
extern "C" __global__ void __launch_bounds__(1024)
attention_fa2_combine_bf16(bf16* __restrict__ out, const float* __restrict__ part_o, const float* __restrict__ part_ml,
                           int rows, int nh, int hd, int splits) {
    const int row = blockIdx.x, h = blockIdx.y, d = threadIdx.x;
    if (row >= rows || h >= nh || d >= hd) return;
    const long long plane = (long long)rows * nh;
    const long long rh = (long long)row * nh + h;
    float mrun = -INFINITY, lrun = 0.0f, orun = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float* pm = part_ml + (s * plane + rh) * 2;
        float a, bw;
        fa2_merge(mrun, pm[0], a, bw);
        lrun = fa2_mix(lrun, a, pm[1], bw);
        orun = fa2_mix(orun, a, part_o[(s * plane + rh) * hd + d], bw);
    }
    out[rh * hd + d] = __float2bfloat16_rn(__fmul_rn(orun, fa2_inv(lrun)));
}

// The simple training kernels over the stored type S of q, k, v, o, dout, dq, dk, dv (common.cuh
// load_f/store_f); lse, delta and shared memory are f32 in both storages.
template <typename S>
LLADA_DEVICE void attention_fwd_t(S* __restrict__ o, float* __restrict__ lse, const S* __restrict__ q,
                                  const S* __restrict__ k, const S* __restrict__ v, int b, int t, int nh, int nkv,
                                  int hd) {
    extern __shared__ float att_smem[];
    float* s = att_smem;       // [t]
    float* qs = att_smem + t;  // [hd]
    const int i = blockIdx.x, h = blockIdx.y, bi = blockIdx.z;
    if (i >= t || h >= nh || bi >= b || nkv <= 0 || nh % nkv != 0) return;
    const int kh = h / (nh / nkv);
    const long long qw = (long long)nh * hd, kw = (long long)nkv * hd;
    const long long row = (long long)bi * t + i;
    const float scale = (float)(1.0 / sqrt((double)hd));
    for (int c = threadIdx.x; c < hd; c += blockDim.x) qs[c] = load_f(q + row * qw + (long long)h * hd + c);
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int j = warp; j < t; j += nwarps) {
        const S* kr = k + ((long long)bi * t + j) * kw + (long long)kh * hd;
        float acc = 0.0f;
        for (int c = lane; c < hd; c += 32) acc = __fadd_rn(acc, __fmul_rn(qs[c], load_f(kr + c)));
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
            acc = __fadd_rn(acc, __fmul_rn(s[j], load_f(v + ((long long)bi * t + j) * kw + (long long)kh * hd + c)));
        store_f(o + row * qw + (long long)h * hd + c, acc);
    }
}

template <typename A, typename B>
LLADA_DEVICE float warp_dot(const A* a, const B* b, int hd, int lane) {
    float acc = 0.0f;
    for (int c = lane; c < hd; c += 32) acc = __fadd_rn(acc, __fmul_rn(load_f(a + c), load_f(b + c)));
    return warp_sum(acc);
}

template <typename S>
LLADA_DEVICE void attention_bwd_dq_t(S* __restrict__ dq, float* __restrict__ delta, const S* __restrict__ dout,
                                     const S* __restrict__ q, const S* __restrict__ k, const S* __restrict__ v,
                                     const S* __restrict__ o, const float* __restrict__ lse, int b, int t, int nh,
                                     int nkv, int hd) {
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
        qs[c] = load_f(q + qo + c);
        dos[c] = load_f(dout + qo + c);
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
            acc = __fadd_rn(acc, __fmul_rn(ds[j], load_f(k + ((long long)bi * t + j) * kw + (long long)kh * hd + c)));
        store_f(dq + qo + c, acc);
    }
}

template <typename S>
LLADA_DEVICE void attention_bwd_dkv_t(S* __restrict__ dk, S* __restrict__ dv, const float* __restrict__ delta,
                                      const S* __restrict__ dout, const S* __restrict__ q, const S* __restrict__ k,
                                      const S* __restrict__ v, const float* __restrict__ lse, int b, int t, int nh,
                                      int nkv, int hd) {
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
        ks[c] = load_f(k + kr + c);
        vs[c] = load_f(v + kr + c);
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
                bv = __fadd_rn(bv, __fmul_rn(ps[i], load_f(dout + qo)));
                a = __fadd_rn(a, __fmul_rn(ds[i], load_f(q + qo)));
            }
            adk[c] = a;
            adv[c] = bv;
        }
        __syncthreads();  // ps/ds are rewritten for the next head
    }
    for (int c = threadIdx.x; c < hd; c += blockDim.x) {
        store_f(dk + kr + c, adk[c]);
        store_f(dv + kr + c, adv[c]);
    }
}

LLADA_STORED(128, attention_fwd,
             (S* __restrict__ o, float* __restrict__ lse, const S* __restrict__ q, const S* __restrict__ k,
              const S* __restrict__ v, int b, int t, int nh, int nkv, int hd),
             attention_fwd_t(o, lse, q, k, v, b, t, nh, nkv, hd))
LLADA_STORED(128, attention_bwd_dq,
             (S* __restrict__ dq, float* __restrict__ delta, const S* __restrict__ dout, const S* __restrict__ q,
              const S* __restrict__ k, const S* __restrict__ v, const S* __restrict__ o,
              const float* __restrict__ lse, int b, int t, int nh, int nkv, int hd),
             attention_bwd_dq_t(dq, delta, dout, q, k, v, o, lse, b, t, nh, nkv, hd))
LLADA_STORED(128, attention_bwd_dkv,
             (S* __restrict__ dk, S* __restrict__ dv, const float* __restrict__ delta, const S* __restrict__ dout,
              const S* __restrict__ q, const S* __restrict__ k, const S* __restrict__ v,
              const float* __restrict__ lse, int b, int t, int nh, int nkv, int hd),
             attention_bwd_dkv_t(dk, dv, delta, dout, q, k, v, lse, b, t, nh, nkv, hd))

// ---- tiled f32 training attention (opt-in) ----
#define ATT_TR 32        // rows of a tile (queries or keys)
#define ATT_TH 128       // threads of a block (min 4 blocks/SM: ≤ 128 registers, no spills on sm_86/89)
#define ATT_HD_MAX 128   // largest head dim
#define ATT_NC (ATT_HD_MAX / 4)  // head columns per thread

// Rows row0 .. row0 + 31 of one head of a [*, stride] matrix (columns from `g`) into s [32][ld];
// rows at or past `valid` are zero-filled.
LLADA_DEVICE void att_tile_load(float* __restrict__ s, const float* __restrict__ g, long long row0, long long stride,
                                int valid, int hd, int ld) {
    for (int e = threadIdx.x; e < ATT_TR * hd; e += blockDim.x) {
        const int r = e / hd, d = e - r * hd;
        s[r * ld + d] = r < valid ? g[(row0 + r) * stride + d] : 0.0f;
    }
}

// A block's place and a thread's role: the tile's first row r0 (queries, or keys for dK/dV), head
// h (kv head for dK/dV, `heads` of them), batch bi, the kv head kh of query head h, the row
// stride ld of a shared tile (HD | 1), the row strides, the scale, thread (r, q4), the tile's valid
// rows n, and whether the launch is sane.
struct AttPlace {
    int r0, h, bi, kh, r, q4, n, ld;
    long long qw, kw;
    float scale;
    bool ok;
};
extern __shared__ float att_t_smem[];  // the tiled kernels' dynamic shared memory

LLADA_DEVICE AttPlace att_place(int b, int t, int nh, int nkv, int hd, int heads) {
    const int r0 = blockIdx.x * ATT_TR, h = blockIdx.y, bi = blockIdx.z;
    const bool ok = r0 < t && h < heads && bi < b && nkv > 0 && nh % nkv == 0 && hd <= ATT_HD_MAX;
    return AttPlace{r0, h, bi, ok ? h / (nh / nkv) : 0, (int)threadIdx.x >> 2, (int)threadIdx.x & 3,
                    min(ATT_TR, t - r0), hd | 1, (long long)nh * hd, (long long)nkv * hd,
                    (float)(1.0 / sqrt((double)hd)), ok};
}

// s[m] = Σ_d a[d]·tile[q4 + 4m][d] (m < 8, d ascending, one FMA chain each): 8 dot products of
// the row a against rows of a tile.
LLADA_DEVICE void att_dots8(float* s, const float* __restrict__ a, const float* __restrict__ tile, int hd, int ld,
                            int q4) {
#pragma unroll
    for (int m = 0; m < 8; ++m) s[m] = 0.0f;
    for (int d = 0; d < hd; ++d) {
        const float x = a[d];
#pragma unroll
        for (int m = 0; m < 8; ++m) s[m] = __fmaf_rn(x, tile[(q4 + 4 * m) * ld + d], s[m]);
    }
}

// att_dots8 of two rows against two tiles in one pass over d (fewer live registers than two passes).
LLADA_DEVICE void att_dots8x2(float* s, float* t, const float* __restrict__ a, const float* __restrict__ ta,
                              const float* __restrict__ b, const float* __restrict__ tb, int hd, int ld, int q4) {
#pragma unroll
    for (int m = 0; m < 8; ++m) s[m] = t[m] = 0.0f;
    for (int d = 0; d < hd; ++d) {
        const float x = a[d], y = b[d];
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            s[m] = __fmaf_rn(x, ta[(q4 + 4 * m) * ld + d], s[m]);
            t[m] = __fmaf_rn(y, tb[(q4 + 4 * m) * ld + d], t[m]);
        }
    }
}

// acc[m] += Σ_j w[j]·tile[j][q4 + 4m] (j < n ascending, one FMA chain per column q4 + 4m < hd).
LLADA_DEVICE void att_axpy_rows(float* acc, const float* __restrict__ w, const float* __restrict__ tile, int n,
                                int hd, int ld, int q4) {
    for (int j = 0; j < n; ++j) {
        const float x = w[j];
        const float* row = tile + j * ld + q4;
#pragma unroll
        for (int m = 0; m < ATT_NC; ++m)
            if (q4 + 4 * m < hd) acc[m] = __fmaf_rn(x, row[4 * m], acc[m]);
    }
}

extern "C" __global__ void __launch_bounds__(ATT_TH, 4)
attention_fwd_tiled_f32(float* __restrict__ o, float* __restrict__ lse, const float* __restrict__ q,
                        const float* __restrict__ k, const float* __restrict__ v, int b, int t, int nh, int nkv,
                        int hd) {
    const auto [q0, h, bi, kh, r, q4, nq, ld, qw, kw, scale, ok] = att_place(b, t, nh, nkv, hd, nh);
    if (!ok) return;
    float* qs = att_t_smem;           // [32][ld]
    float* kvs = qs + ATT_TR * ld;    // [32][ld]: K, then V, of the current key tile
    float* ps = kvs + ATT_TR * ld;    // [32][33]
    att_tile_load(qs, q + (long long)h * hd, (long long)bi * t + q0, qw, nq, hd, ld);
    float acc[ATT_NC];
#pragma unroll
    for (int m = 0; m < ATT_NC; ++m) acc[m] = 0.0f;
    float mx = -INFINITY, l = 0.0f;
    for (int k0 = 0; k0 < t; k0 += ATT_TR) {
        const int nk = min(ATT_TR, t - k0);
        __syncthreads();  // the previous tile's V and P are read (and Q is loaded)
        att_tile_load(kvs, k + (long long)kh * hd, (long long)bi * t + k0, kw, nk, hd, ld);
        __syncthreads();
        float s[8];
        att_dots8(s, qs + r * ld, kvs, hd, ld, q4);
        float tmax = -INFINITY;
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            s[m] = q4 + 4 * m < nk ? __fmul_rn(s[m], scale) : -INFINITY;
            tmax = fmaxf(tmax, s[m]);
        }
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 1));
        tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, 2));
        const float mnew = fmaxf(mx, tmax);
        const float alpha = expf(__fsub_rn(mx, mnew));  // 0 on the first tile (mx = −∞)
#pragma unroll
        for (int m = 0; m < 8; ++m) ps[r * (ATT_TR + 1) + q4 + 4 * m] = expf(__fsub_rn(s[m], mnew));
        mx = mnew;
        __syncthreads();  // K is read, P written: load V over K
        att_tile_load(kvs, v + (long long)kh * hd, (long long)bi * t + k0, kw, nk, hd, ld);
        __syncthreads();
        float rs = 0.0f;
        for (int j = 0; j < nk; ++j) rs = __fadd_rn(rs, ps[r * (ATT_TR + 1) + j]);
        l = __fadd_rn(__fmul_rn(l, alpha), rs);
#pragma unroll
        for (int m = 0; m < ATT_NC; ++m) acc[m] = __fmul_rn(acc[m], alpha);
        att_axpy_rows(acc, ps + r * (ATT_TR + 1), kvs, nk, hd, ld, q4);
    }
    if (r >= nq) return;
    const long long row = (long long)bi * t + q0 + r;
#pragma unroll
    for (int m = 0; m < ATT_NC; ++m)
        if (q4 + 4 * m < hd) o[row * qw + (long long)h * hd + q4 + 4 * m] = __fdiv_rn(acc[m], l);
    if (q4 == 0) lse[row * nh + h] = __fadd_rn(mx, logf(l));
}

extern "C" __global__ void __launch_bounds__(ATT_TH, 4)
attention_bwd_dq_tiled_f32(float* __restrict__ dq, float* __restrict__ delta, const float* __restrict__ dout,
                           const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
                           const float* __restrict__ o, const float* __restrict__ lse, int b, int t, int nh, int nkv,
                           int hd) {
    const auto [q0, h, bi, kh, r, q4, nq, ld, qw, kw, scale, ok] = att_place(b, t, nh, nkv, hd, nh);
    if (!ok) return;
    float* qs = att_t_smem;          // [32][ld]
    float* dos = qs + ATT_TR * ld;   // [32][ld]
    float* ks = dos + ATT_TR * ld;   // [32][ld]
    float* vs = ks + ATT_TR * ld;    // [32][ld]
    float* dss = vs + ATT_TR * ld;   // [32][33]
    const long long row = (long long)bi * t + q0 + r;
    att_tile_load(qs, q + (long long)h * hd, (long long)bi * t + q0, qw, nq, hd, ld);
    att_tile_load(dos, dout + (long long)h * hd, (long long)bi * t + q0, qw, nq, hd, ld);
    __syncthreads();
    // δ = dO·O: the row's 4 threads each compute it whole (same operations, same value).
    float dl = 0.0f, l = 0.0f;
    if (r < nq) {
        const float* orow = o + row * qw + (long long)h * hd;
        for (int d = 0; d < hd; ++d) dl = __fmaf_rn(dos[r * ld + d], orow[d], dl);
        l = lse[row * nh + h];
        if (q4 == 0) delta[row * nh + h] = dl;
    }
    float acc[ATT_NC];
#pragma unroll
    for (int m = 0; m < ATT_NC; ++m) acc[m] = 0.0f;
    for (int k0 = 0; k0 < t; k0 += ATT_TR) {
        const int nk = min(ATT_TR, t - k0);
        __syncthreads();  // the previous tile's K and dS are read
        att_tile_load(ks, k + (long long)kh * hd, (long long)bi * t + k0, kw, nk, hd, ld);
        att_tile_load(vs, v + (long long)kh * hd, (long long)bi * t + k0, kw, nk, hd, ld);
        __syncthreads();
        float s[8], dp[8];
        att_dots8x2(s, dp, qs + r * ld, ks, dos + r * ld, vs, hd, ld, q4);
#pragma unroll
        for (int m = 0; m < 8; ++m) {
            float ds = 0.0f;
            if (q4 + 4 * m < nk && r < nq) {
                const float p = expf(__fsub_rn(__fmul_rn(s[m], scale), l));
                ds = __fmul_rn(__fmul_rn(p, __fsub_rn(dp[m], dl)), scale);
            }
            dss[r * (ATT_TR + 1) + q4 + 4 * m] = ds;
        }
        __syncwarp();  // row r's dS comes from its own 4 lanes
        att_axpy_rows(acc, dss + r * (ATT_TR + 1), ks, nk, hd, ld, q4);
    }
    if (r >= nq) return;
#pragma unroll
    for (int m = 0; m < ATT_NC; ++m)
        if (q4 + 4 * m < hd) dq[row * qw + (long long)h * hd + q4 + 4 * m] = acc[m];
}

extern "C" __global__ void __launch_bounds__(ATT_TH, 4)
attention_bwd_dkv_tiled_f32(float* __restrict__ dk, float* __restrict__ dv, const float* __restrict__ delta,
                            const float* __restrict__ dout, const float* __restrict__ q, const float* __restrict__ k,
                            const float* __restrict__ v, const float* __restrict__ lse, int b, int t, int nh, int nkv,
                            int hd) {
    const AttPlace place = att_place(b, t, nh, nkv, hd, nkv);  // a block per 32 keys of kv head g
    const auto [k0, g, bi, unused_kh, r, q4, nk, ld, qw, kw, scale, ok] = place;
    const int group = ok ? nh / nkv : 0;  // query heads per kv head
    if (!ok) return;
    float* ks = att_t_smem;                 // [32][ld] this block's keys
    float* vs = ks + ATT_TR * ld;           // [32][ld]
    float* qs = vs + ATT_TR * ld;           // [32][ld] the current query tile
    float* dos = qs + ATT_TR * ld;          // [32][ld]
    float* pss = dos + ATT_TR * ld;         // [32 keys][33]
    float* dss = pss + ATT_TR * (ATT_TR + 1);  // [32 keys][33]
    float* lses = dss + ATT_TR * (ATT_TR + 1);  // [32]
    float* dls = lses + ATT_TR;                 // [32]
    att_tile_load(ks, k + (long long)g * hd, (long long)bi * t + k0, kw, nk, hd, ld);
    att_tile_load(vs, v + (long long)g * hd, (long long)bi * t + k0, kw, nk, hd, ld);
    float ak[ATT_NC], av[ATT_NC];
#pragma unroll
    for (int m = 0; m < ATT_NC; ++m) ak[m] = av[m] = 0.0f;
    for (int hh = 0; hh < group; ++hh) {
        const int h = g * group + hh;
        for (int q0 = 0; q0 < t; q0 += ATT_TR) {
            const int nq = min(ATT_TR, t - q0);
            __syncthreads();  // the previous tile's Q, dO, P, dS are read
            att_tile_load(qs, q + (long long)h * hd, (long long)bi * t + q0, qw, nq, hd, ld);
            att_tile_load(dos, dout + (long long)h * hd, (long long)bi * t + q0, qw, nq, hd, ld);
            if (threadIdx.x < ATT_TR) {
                const long long row = (long long)bi * t + q0 + threadIdx.x;
                const bool valid = (int)threadIdx.x < nq;
                lses[threadIdx.x] = valid ? lse[row * nh + h] : 0.0f;
                dls[threadIdx.x] = valid ? delta[row * nh + h] : 0.0f;
            }
            __syncthreads();
            float s[8], dp[8];  // q_i·k_r and dO_i·v_r (the products commute: the CPU's bits)
            att_dots8x2(s, dp, ks + r * ld, qs, vs + r * ld, dos, hd, ld, q4);
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                const int i = q4 + 4 * m;
                float p = 0.0f, ds = 0.0f;
                if (i < nq && r < nk) {
                    p = expf(__fsub_rn(__fmul_rn(s[m], scale), lses[i]));
                    ds = __fmul_rn(__fmul_rn(p, __fsub_rn(dp[m], dls[i])), scale);
                }
                pss[r * (ATT_TR + 1) + i] = p;
                dss[r * (ATT_TR + 1) + i] = ds;
            }
            __syncwarp();  // key row r's P and dS come from its own 4 lanes
            att_axpy_rows(av, pss + r * (ATT_TR + 1), dos, nq, hd, ld, q4);
            att_axpy_rows(ak, dss + r * (ATT_TR + 1), qs, nq, hd, ld, q4);
        }
    }
    if (r >= nk) return;
    const long long kr = ((long long)bi * t + k0 + r) * kw + (long long)g * hd;
#pragma unroll
    for (int m = 0; m < ATT_NC; ++m) {
        if (q4 + 4 * m < hd) {
            dk[kr + q4 + 4 * m] = ak[m];
            dv[kr + q4 + 4 * m] = av[m];
        }
    }
}
