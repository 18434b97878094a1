// embedding_bf16: token embedding lookup.
//
//   out[i, :] = wte[ids[i], :]        for i < n
//
// Layouts: out [N, C] bf16, wte [V, C] bf16, ids [N] int32. Every id must lie in [0, V): the
// launcher validates ids on the host (the kernel does not know V).
// Launch: grid n (one block per row), block 256 (any multiple of 32). 16-byte copies when C % 8 == 0
// and both base pointers are 16-byte aligned, else a scalar copy. Pure copy: bit-exact.
//
// Training (f32) kernels below: the forward and backward of the training step. Training keeps f32
// activations and f32 master weights (the CPU reference `src/train/ops.rs` is plain f32 without
// bf16 rounding); kernels follow the reference's order with explicit IEEE intrinsics (__fmul_rn,
// __fadd_rn, ...) so nvcc cannot contract them into FMAs. Where the reference sums sequentially and
// a kernel reduces as a tree, results differ by f32 rounding only.
// embedding_f32(out, wte, ids, n, c):           out[i,:] = wte[ids[i],:]; ids in [0,V) (launcher
//   checks); grid n, block 256. Pure copy: bit-exact.
// embedding_bf16_f32(out, wte, ids, n, c):      out[i,:] = f32(wte[ids[i],:]): the frozen bf16 table of
//   LoRA training into the f32 activations; ids in [0,V) (launcher checks); grid n, block 256.
//   bf16 -> f32 is exact: bit-exact.
// embedding_bwd_f32: backward of the embedding lookup (`ops::embedding_bwd`), f32, deterministic.
//   dwte[id, :] += Σ_{i : ids[i] = id} dx[i, :]      rows added in ascending i (the CPU's order)
// No atomics: the launcher groups the (host-known) ids into CSR form — `uniq[u]` the distinct
// ids, `order[off[u] .. off[u+1]]` the rows holding id uniq[u], ascending — and one block owns
// one distinct id, so every dwte element has a single writer and the result is bit-exact.
// Layouts: dwte [V, C]; dx [N, C]; uniq [nuniq] in [0, V) (launcher checks); off [nuniq + 1];
// order [N]. Grid nuniq, block 256.
// embedding_bwd_bf16s: the same with dx bf16 (bf16 storage; dwte f32). In bf16 storage the forward
// is embedding_bf16 (a copy of the bf16 table's rows).
// Opt-in (LLADA_TRAIN_KERNELS=tiled; never run on a GPU yet): the kernel above gives each distinct
// id to one block, so the mask token — half of all positions — is one block walking N/2 rows.
// The tiled pair cuts every id's rows into pieces of at most ⌈len/k⌉ rows, k = min(⌈len/64⌉, 256),
// summed into scratch and then onto dwte in a fixed order, see scatter_rows.cuh:
// embedding_bwd_tiled_f32(dwte, part, dx, order, piece, npieces, c)   grid (npieces, ⌈C/256⌉)
// embedding_bwd_tiled_sum_f32(dwte, part, fin, nfin, c)               grid (nfin, ⌈C/256⌉)
// Ids used ≤ 64 times are bit-exact with the CPU; more frequent ids differ by f32 rounding only;
// deterministic either way.
#include "common.cuh"
#include "scatter_rows.cuh"

LLADA_ROW_GATHER(embedding_bf16, bf16)

LLADA_ROW_GATHER(embedding_f32, float)

extern "C" __global__ void __launch_bounds__(1024)
embedding_bf16_f32(float* __restrict__ out, const bf16* __restrict__ wte, const int* __restrict__ ids, int n, int c) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const bf16* src = wte + (long long)ids[i] * c;
    float* dst = out + (long long)i * c;
    for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = __bfloat162float(src[j]);
}

template <typename S>
LLADA_DEVICE void embedding_bwd_t(float* __restrict__ dwte, const S* __restrict__ dx, const int* __restrict__ uniq,
                                  const int* __restrict__ off, const int* __restrict__ order, int nuniq, int c) {
    const int u = blockIdx.x;
    if (u >= nuniq) return;
    float* dst = dwte + (long long)uniq[u] * c;
    const int from = off[u], to = off[u + 1];
    for (int j = threadIdx.x; j < c; j += blockDim.x) {
        float acc = dst[j];
        for (int e = from; e < to; ++e) acc = __fadd_rn(acc, load_f(dx + (long long)order[e] * c + j));
        dst[j] = acc;
    }
}

LLADA_STORED(1024, embedding_bwd,
             (float* __restrict__ dwte, const S* __restrict__ dx, const int* __restrict__ uniq,
              const int* __restrict__ off, const int* __restrict__ order, int nuniq, int c),
             embedding_bwd_t(dwte, dx, uniq, off, order, nuniq, c))

// embedding_bwd_tiled_f32, embedding_bwd_tiled_sum_f32 (scatter_rows.cuh)
LLADA_SCATTER_ROWS_TILED(embedding_bwd)
