// topk_select_f32 / threshold_select_f32: per-row commitment selection (twin of head::top_k and
// head::threshold_select).
//
// Order (head::conf_order): confidence descending, ties to the LOWEST column; NaN counts as −inf
// (so NaN ties with −inf and both go by column); −0.0 equals +0.0.
// topk_select_f32(sel, conf, k, nrows, ncols):
//   sel[row, 0..kk) = the kk best columns of conf[row, :] in that order, kk = clamp(k[row], 0, ncols);
//   sel[row, kk..ncols) = −1.
// threshold_select_f32(sel, conf, threshold, nrows, ncols):
//   walk the sorted order; keep position j while j == 0 or conf ≥ threshold (a NaN stops the
//   walk, as `NaN >= t` is false); write them in order, rest −1. (Equal to take_while.)
// Layouts: conf [nrows, ncols] f32, k [nrows] int32, sel [nrows, ncols] int32.
// Launch: grid nrows, block 1024 (any power of two ≥ 32 up to 1024).
// Algorithm: each (conf, col) becomes one 64-bit key, ascending key = the order above:
//   key = (~orderable(conf)) << 32 | col, orderable = the usual sign-flip of the f32 bits.
// ncols ≤ 4096: bitonic sort of the keys in shared memory (32 KB). Larger rows: each element's
// rank is counted against every other element (O(ncols²), correct but slow; not expected on the
// hot path). Keys are distinct (columns are), so both methods give the same order. Exact.
#include "common.cuh"

#define TOPK_SMEM 4096

LLADA_DEVICE unsigned long long sort_key(float c, int col) {
    if (isnan(c)) c = -INFINITY;
    if (c == 0.0f) c = 0.0f;  // −0 → +0
    uint32_t u = __float_as_uint(c);
    u = (u & 0x80000000u) ? ~u : (u | 0x80000000u);  // ascending u == ascending c
    return ((unsigned long long)(~u) << 32) | (unsigned long long)(uint32_t)col;
}

LLADA_DEVICE float key_conf(const float* crow, unsigned long long key) { return crow[(uint32_t)key]; }

// mode 0: top-k with kk = count; mode 1: threshold.
template <int MODE>
LLADA_DEVICE void select_row(int* __restrict__ sel, const float* __restrict__ conf, int kk, float threshold, int ncols) {
    __shared__ unsigned long long keys[TOPK_SMEM];
    __shared__ int s_keep;
    const int row = blockIdx.x;
    const float* crow = conf + (long long)row * ncols;
    int* srow = sel + (long long)row * ncols;
    if (threadIdx.x == 0) s_keep = MODE == 0 ? kk : ncols;
    if (ncols <= TOPK_SMEM) {
        int p = 1;
        while (p < ncols) p <<= 1;
        for (int i = threadIdx.x; i < p; i += blockDim.x) keys[i] = i < ncols ? sort_key(crow[i], i) : ~0ULL;
        __syncthreads();
        for (int size = 2; size <= p; size <<= 1) {
            for (int stride = size >> 1; stride > 0; stride >>= 1) {
                for (int i = threadIdx.x; i < p; i += blockDim.x) {
                    const int jx = i ^ stride;
                    if (jx > i) {
                        const bool up = (i & size) == 0;
                        const unsigned long long a = keys[i], b = keys[jx];
                        if ((a > b) == up) {
                            keys[i] = b;
                            keys[jx] = a;
                        }
                    }
                }
                __syncthreads();
            }
        }
        if (MODE == 1) {
            for (int j = threadIdx.x; j < ncols; j += blockDim.x) {
                if (j > 0 && !(key_conf(crow, keys[j]) >= threshold)) atomicMin(&s_keep, j);
            }
            __syncthreads();
        }
        const int keep = s_keep;
        for (int j = threadIdx.x; j < ncols; j += blockDim.x) srow[j] = j < keep ? (int)(uint32_t)keys[j] : -1;
    } else {
        // Rank counting: rank(i) = #{ j : key_j < key_i } is i's position in the sorted order.
        for (int j = threadIdx.x; j < ncols; j += blockDim.x) srow[j] = -1;
        __syncthreads();
        if (MODE == 1) {
            for (int i = threadIdx.x; i < ncols; i += blockDim.x) {
                const unsigned long long ki = sort_key(crow[i], i);
                int rank = 0;
                for (int j = 0; j < ncols; ++j) rank += sort_key(crow[j], j) < ki;
                if (rank > 0 && !(crow[i] >= threshold)) atomicMin(&s_keep, rank);
            }
            __syncthreads();
        }
        const int keep = s_keep;
        for (int i = threadIdx.x; i < ncols; i += blockDim.x) {
            const unsigned long long ki = sort_key(crow[i], i);
            int rank = 0;
            for (int j = 0; j < ncols; ++j) rank += sort_key(crow[j], j) < ki;
            if (rank < keep) srow[rank] = i;
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024)
topk_select_f32(int* __restrict__ sel, const float* __restrict__ conf, const int* __restrict__ k, int nrows, int ncols) {
    if ((int)blockIdx.x >= nrows) return;
    int kk = k[blockIdx.x];
    kk = kk < 0 ? 0 : (kk > ncols ? ncols : kk);
    select_row<0>(sel, conf, kk, 0.0f, ncols);
}

extern "C" __global__ void __launch_bounds__(1024)
threshold_select_f32(int* __restrict__ sel, const float* __restrict__ conf, float threshold, int nrows, int ncols) {
    if ((int)blockIdx.x >= nrows) return;
    select_row<1>(sel, conf, 0, threshold, ncols);
}
