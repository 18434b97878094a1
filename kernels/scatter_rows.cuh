// Segmented row scatter-add, the body of the opt-in scatter_add_rows_tiled_f32 (gather.cu) and
// embedding_bwd_tiled_f32 (embedding.cu) (LLADA_TRAIN_KERNELS=tiled; never run on a GPU yet):
//
//   dst[d, :] += Σ_{i : dest[i] = d} src[i, :]        i ascending within one destination row d
//
// The launcher (src/train/cuda/tiled.rs `ScatterPlan`) groups the host-known destinations:
// `order` lists the source rows grouped by destination, ascending within each group; each group is
// one piece, or, when it holds more than 64 rows (the mask token: half of all positions in
// embedding_bwd), k = min(⌈len/64⌉, 256) pieces of ⌈len/k⌉ rows (the last shorter). A function of
// the destinations alone: the same ids give the same pieces on every run and every GPU.
//   piece [P, 4] = {dest, from, to, slot}: rows order[from .. to], added in that order;
//     slot < 0: onto dst[dest] directly (the group's only piece: single writer, the CPU's order
//     and roundings, bit-exact); slot ≥ 0: from −0 (the additive identity) into part[slot, :].
//   fin [F, 3] = {dest, slot_from, slot_to}: dst[dest] = ((dst[dest] + part[slot_from]) + …) in slot
//     order, after the pieces (a second launch on the same stream).
// No atomics, a fixed order: deterministic. Groups of ≤ 64 rows are bit-exact with the CPU;
// split groups differ from its sequential sum by f32 rounding only:
// |Δ| ≤ (len + k + 2)·u·(|dst| + Σ|src terms|) per side (u = 2^-24).
// Launch: scatter_piece grid (P, ⌈C/256⌉), scatter_finish grid (F, ⌈C/256⌉), block 256, one thread
// per column. Layouts: dst [*, C], src [N, C], part [slots, C], order [N], all int32 indices valid
// (the launcher builds them from validated ids).
#pragma once
#include "common.cuh"

LLADA_DEVICE void scatter_piece(float* __restrict__ dst, float* __restrict__ part, const float* __restrict__ src,
                                const int* __restrict__ order, const int* __restrict__ piece, int c) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const int* p = piece + 4 * (long long)blockIdx.x;
    const int dest = p[0], from = p[1], to = p[2], slot = p[3];
    float* out = slot < 0 ? dst + (long long)dest * c + j : part + (long long)slot * c + j;
    float acc = slot < 0 ? *out : -0.0f;
    for (int e = from; e < to; ++e) acc = __fadd_rn(acc, src[(long long)order[e] * c + j]);
    *out = acc;
}

LLADA_DEVICE void scatter_finish(float* __restrict__ dst, const float* __restrict__ part, const int* __restrict__ fin,
                                 int c) {
    const int j = blockIdx.y * blockDim.x + threadIdx.x;
    if (j >= c) return;
    const int* f = fin + 3 * (long long)blockIdx.x;
    float* out = dst + (long long)f[0] * c + j;
    float acc = *out;
    for (int s = f[1]; s < f[2]; ++s) acc = __fadd_rn(acc, part[(long long)s * c + j]);
    *out = acc;
}

// LLADA_SCATTER_ROWS_TILED(op) defines the op's kernel pair (one body for every op that scatters
// rows, so the ops keep their own names):
//   op##_tiled_f32(dst, part, src, order, piece, npieces, c)   grid (npieces, ⌈C/256⌉), block 256
//   op##_tiled_sum_f32(dst, part, fin, nfin, c)                grid (nfin, ⌈C/256⌉), block 256
#define LLADA_SCATTER_ROWS_TILED(op)                                                                          \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
        op##_tiled_f32(float* __restrict__ dst, float* __restrict__ part, const float* __restrict__ src,     \
                       const int* __restrict__ order, const int* __restrict__ piece, int npieces, int c) {  \
        if ((int)blockIdx.x < npieces) scatter_piece(dst, part, src, order, piece, c);                      \
    }                                                                                                        \
    extern "C" __global__ void __launch_bounds__(256)                                                       \
        op##_tiled_sum_f32(float* __restrict__ dst, const float* __restrict__ part, const int* __restrict__ fin, \
                           int nfin, int c) {                                                                \
        if ((int)blockIdx.x < nfin) scatter_finish(dst, part, fin, c);                                       \
    }
