// head_select_bf16: the sampler's per-position head, fused (twin of src/backend/head.rs: cfg_mix +
// select_one with dtype = bf16).
//
// Inputs: logits [R', V] bf16 where R' = 2R when cfg_scale > 0 (rows R..2R are the unconditional
// logits of rows 0..R) else R' = R; keys [2R] int32 = (batch row, absolute position) per row.
// Outputs: tok [R] int32, conf [R] f32. Logits rows 0..R are overwritten with the mixed,
// forbidden-masked values.
//
// Per row (one block of up to 1024 threads; grid r):
//  1. CFG (only if cfg_scale > 0): s = f32(cfg_scale + 1); l = bf16(u + bf16(s · bf16(c − u))),
//     each op an f32 IEEE op then RNE to bf16, exactly head::cfg_mix.
//  2. forbid (≥ 0 and < V): l[forbid] = −inf.
//  3. token = argmax over v of score(v): score = l (temperature 0) or, in f64,
//     l + τ·g(v) with g(v) = llada_gumbel(llada_uniform(llada_bits(cell_key(seed, STREAM_GUMBEL,
//     step, row, pos), v))) — bit-exact with rng.rs. Rule: NaN scores never win; among the
//     others the largest wins, ties (−inf included) to the LOWEST id; all NaN → 0. This equals
//     the sequential scan of select_one. The reduction carries (found, score, id) triples.
//  4. conf:
//     remasking 1 (random): (f32) llada_uniform(llada_bits(cell_key(seed, STREAM_RANDOM_CONF,
//       step, row, pos), 0)) — bit-exact.
//     remasking 0 (low confidence): over v not in {sup0, sup1}: m = max l (NaN ignored);
//       if the token is suppressed or m = −inf → 0; else bf16( exp(l[tok] − m) / Σ exp(l − m) )
//       with expf and a tree-ordered f32 sum: it may differ from the CPU by a few f32 ulps before
//       the bf16 rounding (hence sometimes by one bf16 ulp). The TOKEN is always identical.
// Launch: grid r, block 1024 (any multiple of 32 up to 1024 works).
// head_select_step_bf16 (bottom): the same with the RNG step read from device memory (step graph).
#include "common.cuh"

struct ArgBest {
    double v;
    int i;      // token id
    int found;  // 0: no non-NaN score seen
};

// Is b better than a? (NaN never stored: found = 0 instead.)
LLADA_DEVICE bool better(const ArgBest& a, const ArgBest& b) {
    if (!b.found) return false;
    if (!a.found) return true;
    if (b.v > a.v) return true;
    if (b.v < a.v) return false;
    return b.i < a.i;
}

LLADA_DEVICE ArgBest shfl_best(const ArgBest& a, int o) {
    ArgBest b;
    b.v = __shfl_xor_sync(0xffffffffu, a.v, o);
    b.i = __shfl_xor_sync(0xffffffffu, a.i, o);
    b.found = __shfl_xor_sync(0xffffffffu, a.found, o);
    return b;
}

LLADA_DEVICE ArgBest warp_best(ArgBest a) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const ArgBest b = shfl_best(a, o);
        if (better(a, b)) a = b;
    }
    return a;
}

// The body of both kernels: one row per block, `step` the RNG step.
LLADA_DEVICE void head_select_row(int* __restrict__ tok, float* __restrict__ conf, bf16* __restrict__ logits,
                                  const int* __restrict__ keys, int r, int v, double temperature, double cfg_scale,
                                  int remasking, unsigned long long seed, unsigned long long step, int forbid,
                                  int sup0, int sup1) {
    const int row = blockIdx.x;
    if (row >= r) return;
    __shared__ ArgBest s_best[32];
    __shared__ int s_tok;

    bf16* lrow = logits + (long long)row * v;
    const bf16* urow = logits + ((long long)row + r) * v;
    const bool cfg = cfg_scale > 0.0;
    const float cfg_s = __double2float_rn(__dadd_rn(cfg_scale, 1.0));
    const unsigned long long brow = (unsigned long long)(unsigned int)keys[2 * row];
    const unsigned long long bpos = (unsigned long long)(unsigned int)keys[2 * row + 1];
    const bool sample = temperature > 0.0;
    const unsigned long long gkey = llada_cell_key(seed, LLADA_STREAM_GUMBEL, step, brow, bpos);
    const bool low_conf = remasking == 0;

    // Pass 1: mix, forbid, argmax (+ the max over non-suppressed ids for the confidence).
    ArgBest best;
    best.v = -INFINITY;
    best.i = 0;
    best.found = 0;
    float m = -INFINITY;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        float l = cfg_mix(lrow, urow, cfg, cfg_s, j);
        if (j == forbid) l = -INFINITY;
        if (cfg || j == forbid) lrow[j] = to_bf16(l);  // exact: l is a bf16 value
        double sc = (double)l;
        if (sample) {
            const double g = llada_gumbel(llada_uniform(llada_bits(gkey, (unsigned long long)j)));
            sc = __dadd_rn(sc, __dmul_rn(temperature, g));
        }
        // j increases within a thread: the sequential rule of select_one.
        if (!isnan(sc) && (!best.found || sc > best.v)) {
            best.v = sc;
            best.i = j;
            best.found = 1;
        }
        if (j != sup0 && j != sup1 && l > m) m = l;
    }
    best = warp_best(best);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = (blockDim.x + 31) >> 5;
    if (lane == 0) s_best[warp] = best;
    __syncthreads();
    if (warp == 0) {
        ArgBest b;
        if (lane < nwarps) {
            b = s_best[lane];
        } else {
            b.v = -INFINITY;
            b.i = 0;
            b.found = 0;
        }
        b = warp_best(b);
        if (lane == 0) s_tok = b.found ? b.i : 0;
    }
    __syncthreads();
    const int x0 = s_tok;

    if (!low_conf) {
        if (threadIdx.x == 0) {
            tok[row] = x0;
            const unsigned long long ckey = llada_cell_key(seed, LLADA_STREAM_RANDOM_CONF, step, brow, bpos);
            conf[row] = __double2float_rn(llada_uniform(llada_bits(ckey, 0)));
        }
        return;
    }

    // Pass 2: softmax denominator over the non-suppressed ids. Each thread re-reads the elements it
    // wrote itself in pass 1, so no extra synchronisation is needed.
    m = block_max(m);
    const bool x0_sup = x0 == sup0 || x0 == sup1;
    if (x0_sup || m == -INFINITY) {
        if (threadIdx.x == 0) {
            tok[row] = x0;
            conf[row] = 0.0f;
        }
        return;
    }
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        if (j != sup0 && j != sup1) sum = __fadd_rn(sum, expf(__fsub_rn(ld_bf16(lrow + j), m)));
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        tok[row] = x0;
        conf[row] = round_bf16(__fdiv_rn(expf(__fsub_rn(ld_bf16(lrow + x0), m)), sum));
    }
}

extern "C" __global__ void __launch_bounds__(1024)
head_select_bf16(int* __restrict__ tok, float* __restrict__ conf, bf16* __restrict__ logits, const int* __restrict__ keys,
                 int r, int v, double temperature, double cfg_scale, int remasking, unsigned long long seed,
                 unsigned long long step, int forbid, int sup0, int sup1) {
    head_select_row(tok, conf, logits, keys, r, v, temperature, cfg_scale, remasking, seed, step, forbid, sup0, sup1);
}

// head_select_step_bf16: head_select_bf16 with the RNG step read from the device step state of the
// step graph (layout in src/backend/step.rs): step = (state[1] | state[2] << 32) + state[0], the
// block's first step plus the steps the block has made (u64, wrapping), so a captured graph
// draws new noise on every replay. Everything else as head_select_bf16.
extern "C" __global__ void __launch_bounds__(1024)
head_select_step_bf16(int* __restrict__ tok, float* __restrict__ conf, bf16* __restrict__ logits,
                      const int* __restrict__ keys, const int* __restrict__ state, int r, int v, double temperature,
                      double cfg_scale, int remasking, unsigned long long seed, int forbid, int sup0, int sup1) {
    const unsigned long long step0 =
        (unsigned long long)(unsigned int)state[1] | ((unsigned long long)(unsigned int)state[2] << 32);
    const unsigned long long step = step0 + (unsigned long long)(unsigned int)state[0];
    head_select_row(tok, conf, logits, keys, r, v, temperature, cfg_scale, remasking, seed, step, forbid, sup0, sup1);
}
