// gather_rows_bf16: row gather.
//
//   out[r, :] = x[rows[r], :]         for r < nrows
//
// Layouts: out [R, C] bf16, x [N, C] bf16, rows [R] int32, each in [0, N) (validated by the
// launcher). Launch: grid nrows, block 256 (any multiple of 32). 16-byte copies when C % 8 == 0
// and the base pointers are 16-byte aligned, else scalar. Pure copy: bit-exact.
//
// Training (f32):
// gather_rows_f32(out, x, rows, nrows, c)        out[i,:] = x[rows[i],:]; grid nrows, block 256.
// scatter_add_rows_f32(dx, src, rows, nrows, c)  dx[rows[i],:] += src[i,:] for i ascending; one
//                                                thread per column loops over i in order, so
//                                                repeated rows are safe and the sums are in the
//                                                CPU's order (bit-exact); grid-stride over c.
// scatter_add_rows_bf16s: the same on bf16 dx, src (bf16 storage); every add rounds once (RNE).
// In bf16 storage gather_rows uses gather_rows_bf16 (a copy).
// Opt-in (LLADA_TRAIN_KERNELS=tiled; never run on a GPU yet): the one-pass kernel above has
// ⌈C/256⌉ blocks (16 at C = 4096) each walking all rows. The tiled pair spreads the destination
// rows over blocks instead (the rows are host-known), see scatter_rows.cuh:
// scatter_add_rows_tiled_f32(dx, part, src, order, piece, npieces, c)   grid (npieces, ⌈C/256⌉)
// scatter_add_rows_tiled_sum_f32(dx, part, fin, nfin, c)                grid (nfin, ⌈C/256⌉)
// Bit-exact with the CPU for destination rows repeated ≤ 64 times (every row, in the training
// pass, where the rows are distinct); f32 rounding otherwise; deterministic either way.
#include "common.cuh"
#include "scatter_rows.cuh"

LLADA_ROW_GATHER(gather_rows_bf16, bf16)

LLADA_ROW_GATHER(gather_rows_f32, float)

template <typename S>
LLADA_DEVICE void scatter_add_rows_t(S* __restrict__ dx, const S* __restrict__ src, const int* __restrict__ rows,
                                     int nrows, int c) {
    for (int j = blockIdx.x * blockDim.x + threadIdx.x; j < c; j += gridDim.x * blockDim.x) {
        for (int i = 0; i < nrows; ++i) {
            S* d = dx + (long long)rows[i] * c + j;
            store_f(d, __fadd_rn(load_f(d), load_f(src + (long long)i * c + j)));
        }
    }
}

LLADA_STORED(1024, scatter_add_rows,
             (S* __restrict__ dx, const S* __restrict__ src, const int* __restrict__ rows, int nrows, int c),
             scatter_add_rows_t(dx, src, rows, nrows, c))

// scatter_add_rows_tiled_f32, scatter_add_rows_tiled_sum_f32 (scatter_rows.cuh)
LLADA_SCATTER_ROWS_TILED(scatter_add_rows)
