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
