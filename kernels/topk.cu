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
// commit_select_f32 (bottom of the file): the sampler's per-step commit selection on ragged batch
// rows, same order, with the quota / threshold / factor rules.
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

// Ascending bitonic sort of keys[0, p) in shared memory, p a power of two; the whole block calls
// it (it ends with a barrier).
LLADA_DEVICE void bitonic_sort(unsigned long long* keys, int p) {
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
}

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
        bitonic_sort(keys, p);
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

// commit_select_f32: the step's commit selection (twin of backend::commit::commit_rows).
//   commit [r] int32 (out), tok [r] int32, conf [r] f32, rows [r] int32 (token index of each
//   requested row in ids), ids [n] int32, plan [2b+1] int32 = segment offsets seg[0..=b] of the
//   batch rows in the requested rows, then quotas [b].
// Per batch row br (one block): the rows i in [seg[br], seg[br+1]) with ids[rows[i]] == mask_id
// are the candidates, keyed by (conf[i], i − seg[br]) in the order above; the rule keeps the
// first `keep` of them: mode 0 min(quota, n); mode 1 (threshold, f64 compare) the best, then
// while conf ≥ param; mode 2 (factor) stop at the first rank f ≥ 1 with
// conf < 1 − param/(f+2) and keep f, unless f is the last rank (or none fails): keep n.
// commit[i] = tok[i] for kept rows, −1 for every other row of the segment. Rows no segment
// covers are not written (the host plan covers all r). Non-candidates get the key
// 0xFFFFFFFF << 32 | index, after every candidate's (a candidate's high word is ≤ 0xFF800000).
// Launch: grid b, block 1024 (any power of two ≥ 32 up to 1024). Exact.
LLADA_DEVICE bool commit_fails(int mode, double param, float c, int f) {
    if (mode == 1) return !((double)c >= param);
    if (mode == 2) return (double)c < __dsub_rn(1.0, __ddiv_rn(param, (double)(f + 2)));
    return false;
}

LLADA_DEVICE int commit_keep(int mode, int n, int quota, int first_fail) {
    if (n == 0) return 0;
    if (mode == 0) return quota < n ? (quota < 0 ? 0 : quota) : n;
    if (mode == 1) return first_fail < n ? first_fail : n;
    return first_fail < n - 1 ? first_fail : n;
}

LLADA_DEVICE unsigned long long commit_key(const float* conf, const int* rows, const int* ids, int mask_id, int s0, int j) {
    return ids[rows[s0 + j]] == mask_id ? sort_key(conf[s0 + j], j) : ((0xFFFFFFFFull << 32) | (uint32_t)j);
}

extern "C" __global__ void __launch_bounds__(1024)
commit_select_f32(int* __restrict__ commit, const int* __restrict__ tok, const float* __restrict__ conf,
                  const int* __restrict__ rows, const int* __restrict__ ids, const int* __restrict__ plan, int r, int b,
                  int mask_id, int mode, double param) {
    __shared__ unsigned long long keys[TOPK_SMEM];
    __shared__ int s_live, s_fail;
    const int br = blockIdx.x;
    if (br >= b) return;
    int s0 = plan[br], s1 = plan[br + 1];
    s0 = s0 < 0 ? 0 : (s0 > r ? r : s0);
    s1 = s1 < s0 ? s0 : (s1 > r ? r : s1);
    const int nc = s1 - s0;
    const int quota = plan[b + 1 + br];
    if (threadIdx.x == 0) {
        s_live = 0;
        s_fail = 0x7fffffff;
    }
    for (int j = threadIdx.x; j < nc; j += blockDim.x) commit[s0 + j] = -1;
    __syncthreads();
    if (nc <= TOPK_SMEM) {
        int p = 1;
        while (p < nc) p <<= 1;
        int live = 0;
        for (int i = threadIdx.x; i < p; i += blockDim.x) {
            const unsigned long long k = i < nc ? commit_key(conf, rows, ids, mask_id, s0, i) : ~0ULL;
            live += (k >> 32) != 0xFFFFFFFFull;
            keys[i] = k;
        }
        atomicAdd(&s_live, live);
        __syncthreads();
        bitonic_sort(keys, p);
        const int n = s_live;
        for (int j = 1 + threadIdx.x; j < n; j += blockDim.x) {
            if (commit_fails(mode, param, conf[s0 + (uint32_t)keys[j]], j)) atomicMin(&s_fail, j);
        }
        __syncthreads();
        const int keep = commit_keep(mode, n, quota, s_fail);
        for (int j = threadIdx.x; j < keep; j += blockDim.x) {
            const int i = s0 + (int)(uint32_t)keys[j];
            commit[i] = tok[i];
        }
    } else {
        // Rank counting (O(nc²), correct but slow; not expected on the hot path): a candidate's
        // rank is the number of smaller keys, non-candidates ranking after every candidate.
        int live = 0;
        for (int i = threadIdx.x; i < nc; i += blockDim.x) live += ids[rows[s0 + i]] == mask_id;
        atomicAdd(&s_live, live);
        __syncthreads();
        const int n = s_live;
        for (int i = threadIdx.x; i < nc; i += blockDim.x) {
            const unsigned long long ki = commit_key(conf, rows, ids, mask_id, s0, i);
            if ((ki >> 32) == 0xFFFFFFFFull) continue;
            int rank = 0;
            for (int j = 0; j < nc; ++j) rank += commit_key(conf, rows, ids, mask_id, s0, j) < ki;
            if (rank > 0 && commit_fails(mode, param, conf[s0 + i], rank)) atomicMin(&s_fail, rank);
        }
        __syncthreads();
        const int keep = commit_keep(mode, n, quota, s_fail);
        for (int i = threadIdx.x; i < nc; i += blockDim.x) {
            const unsigned long long ki = commit_key(conf, rows, ids, mask_id, s0, i);
            if ((ki >> 32) == 0xFFFFFFFFull) continue;
            int rank = 0;
            for (int j = 0; j < nc; ++j) rank += commit_key(conf, rows, ids, mask_id, s0, j) < ki;
            if (rank < keep) commit[s0 + i] = tok[s0 + i];
        }
    }
}
