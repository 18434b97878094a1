// cross_entropy_f32: weighted cross-entropy forward + backward over R selected logit rows
// (`ops::cross_entropy`), f32, in place.
//   lse_r    = max_v z + ln Σ_v exp(z − max)          block tree reductions (CPU: sequential)
//   loss[r]  = w_r·(lse_r − z[r, t_r])                per row; the host sums rows in f64
//   z[r, v]  = w_r·exp(z − lse_r)  (− w_r at v = t_r)  the gradient, overwriting the logits
// Layouts: z [R, V]; loss [R]; targets [R] in [0, V) (launcher checks); weights [R].
// Grid r, block 1024 (any multiple of 32). Each element is read and written by one thread
// after both reductions (which end in barriers), so the in-place update is race-free.
// cross_entropy_bf16s: the same with z bf16 (bf16 storage; loss, weights f32): f32 math on the
// bf16 logits, the gradient rounded once (RNE).
#include "common.cuh"

template <typename S>
LLADA_DEVICE void cross_entropy_t(S* __restrict__ z, float* __restrict__ loss, const int* __restrict__ targets,
                                  const float* __restrict__ weights, int r, int v) {
    const int row = blockIdx.x;
    if (row >= r) return;
    S* zr = z + (long long)row * v;
    float mx = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, load_f(zr + j));
    mx = block_max(mx);
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) sum = __fadd_rn(sum, expf(__fsub_rn(load_f(zr + j), mx)));
    sum = block_sum(sum);
    const float lse = __fadd_rn(mx, logf(sum));
    const int tgt = targets[row];
    const float w = weights[row];
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float zj = load_f(zr + j);
        float gj = __fmul_rn(w, expf(__fsub_rn(zj, lse)));
        if (j == tgt) {
            loss[row] = __fmul_rn(w, __fsub_rn(lse, zj));
            gj = __fsub_rn(gj, w);
        }
        store_f(zr + j, gj);
    }
}

LLADA_STORED(1024, cross_entropy,
             (S* __restrict__ z, float* __restrict__ loss, const int* __restrict__ targets,
              const float* __restrict__ weights, int r, int v),
             cross_entropy_t(z, loss, targets, weights, r, v))
