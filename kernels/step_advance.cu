// step_advance_i32: the end of one denoising step on the device, the last kernel of the step graph
// (LLADA_STEP_GRAPH=1; twin of backend::step::step_advance_ref).
//
// Buffers (int32): ids [n] the pass's tokens (in/out; with CFG the unconditional half follows at
// `mirror`), state [7] the device step state (in/out; layout in src/backend/step.rs: 0 steps made
// in the block, 1-2 the block's first RNG step (lo, hi), 3-4 the block span [s, e), 5-6 the masks
// left), plan [2b+1] commit_select_f32's plan (out: its quotas [b] for the next step),
// commit [r] commit_select_f32's output (token or −1), rows [r] the requested rows' token
// indices in ids (each < mirror when mirror > 0), sched [b·steps] each batch row's schedule.
//   1. for j < r with commit[j] ≥ 0: ids[rows[j]] = commit[j]; with mirror > 0 also
//      ids[rows[j] + mirror] = commit[j] (the unconditional copy: a committed position is never
//      a prompt position, so it is the same token there).
//   2. state[5] = #{j < r : ids[rows[j]] == mask_id, s ≤ rows[j] mod t < e} (masks left in the
//      block), state[6] = #{j < r : ids[rows[j]] == mask_id} (masks left among the rows).
//   3. i = state[0] + 1; state[0] = i; plan[b + 1 + br] = i < steps ? sched[br·steps + i] : 1
//      (the sampler's quota of call i: past the schedule, one token per call).
// Launch: grid 1, block 1024 (any multiple of 32 up to 1024). Exact (integer only).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
step_advance_i32(int* ids, int* state, int* plan, const int* __restrict__ commit, const int* __restrict__ rows,
                 const int* __restrict__ sched, int r, int b, int t, int mirror, int mask_id, int steps) {
    __shared__ int s_block, s_rows;
    if (blockIdx.x != 0) return;
    // Every thread reads the state before the first barrier; thread 0 writes it after the last.
    const int i = state[0] + 1;
    const int s = state[3], e = state[4];
    if (threadIdx.x == 0) {
        s_block = 0;
        s_rows = 0;
    }
    for (int j = threadIdx.x; j < r; j += blockDim.x) {
        const int c = commit[j];
        if (c >= 0) {
            ids[rows[j]] = c;
            if (mirror > 0) ids[rows[j] + mirror] = c;
        }
    }
    // The barrier also makes the block's global writes above visible to every thread of it.
    __syncthreads();
    int left_block = 0, left_rows = 0;
    for (int j = threadIdx.x; j < r; j += blockDim.x) {
        const int k = rows[j];
        if (ids[k] == mask_id) {
            const int p = k % t;
            left_rows += 1;
            left_block += p >= s && p < e;
        }
    }
    atomicAdd(&s_block, left_block);
    atomicAdd(&s_rows, left_rows);
    for (int br = threadIdx.x; br < b; br += blockDim.x) {
        plan[b + 1 + br] = i < steps ? sched[(long long)br * steps + i] : 1;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        state[0] = i;
        state[5] = s_block;
        state[6] = s_rows;
    }
}
