// embedding_bwd_f32: backward of the embedding lookup (`ops::embedding_bwd`), f32, deterministic.
//   dwte[id, :] += Σ_{i : ids[i] = id} dx[i, :]      rows added in ascending i (the CPU's order)
// No atomics: the launcher groups the (host-known) ids into CSR form — `uniq[u]` the distinct
// ids, `order[off[u] .. off[u+1]]` the rows holding id uniq[u], ascending — and one block owns
// one distinct id, so every dwte element has a single writer and the result is bit-exact.
// Layouts: dwte [V, C]; dx [N, C]; uniq [nuniq] in [0, V) (launcher checks); off [nuniq + 1];
// order [N]. Grid nuniq, block 256.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
embedding_bwd_f32(float* __restrict__ dwte, const float* __restrict__ dx, const int* __restrict__ uniq,
                  const int* __restrict__ off, const int* __restrict__ order, int nuniq, int c) {
    const int u = blockIdx.x;
    if (u >= nuniq) return;
    float* dst = dwte + (long long)uniq[u] * c;
    const int from = off[u], to = off[u + 1];
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float acc = dst[j];
        for (int e = from; e < to; ++e) acc = __fadd_rn(acc, dx[(long long)order[e] * c + j]);
        dst[j] = acc;
    }
}
