// log_prob_bf16: log-probability of a target token under the softmax of each logits row
// (twin of src/backend/cpu/log_prob.rs `log_prob_one` with dtype = bf16; upstream get_log_likelihood's
// F.cross_entropy, negated).
//
// Math, per row i < r, with l = the row's logits (CFG-mixed when cfg_scale > 0):
//   out[i] = bf16( (l[t_i] − m) − logf(Σ_v expf(l[v] − m)) ),  m = max_v l[v],  t_i = targets[i]
//   CFG: s = f32(cfg_scale + 1); l = bf16(u + bf16(s · bf16(c − u))), each op an f32 IEEE op then
//   RNE to bf16 (exactly head::cfg_mix), recomputed in each pass (logits are not modified).
//   Any NaN in the row → NaN; every l = −inf → −inf.
// Layouts: logits [R', V] bf16, R' = 2R with cfg_scale > 0 (rows R..2R are the unconditional
// logits of rows 0..R), else R' = R; targets [R] int32 in [0, V) (the launcher checks);
// out [R] f32 (a bf16 value).
// Launch: grid r, block 1024 (any multiple of 32 up to 1024). Two passes over the row (max, then
// the f32 sum of expf in a tree order): against the CPU's sequential sum and libm exp the result
// may differ by a few f32 ulps before the bf16 rounding, hence by at most one bf16 ulp.
// Speed: one read of 2 bytes per logit per pass (2R·V·2 bytes with CFG); not measured yet.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
log_prob_bf16(float* __restrict__ out, const bf16* __restrict__ logits, const int* __restrict__ targets,
              int r, int v, double cfg_scale) {
    const int row = blockIdx.x;
    if (row >= r) return;
    const bf16* crow = logits + (long long)row * v;
    const bf16* urow = logits + ((long long)row + r) * v;
    const bool cfg = cfg_scale > 0.0;
    const float s = __double2float_rn(__dadd_rn(cfg_scale, 1.0));

    // Pass 1: max (NaN ignored by fmaxf) and a NaN flag.
    float m = -INFINITY;
    float nan = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        const float l = cfg_mix(crow, urow, cfg, s, j);
        if (isnan(l)) nan = 1.0f;
        m = fmaxf(m, l);
    }
    m = block_max(m);
    nan = block_max(nan);
    if (nan > 0.0f || m == -INFINITY) {
        if (threadIdx.x == 0) out[row] = nan > 0.0f ? __int_as_float(0x7fc00000) : -INFINITY;
        return;
    }
    // Pass 2: softmax denominator.
    float sum = 0.0f;
    for (int j = threadIdx.x; j < v; j += blockDim.x) {
        sum = __fadd_rn(sum, expf(__fsub_rn(cfg_mix(crow, urow, cfg, s, j), m)));
    }
    sum = block_sum(sum);
    if (threadIdx.x == 0) {
        const int tg = targets[row];
        if (tg < 0 || tg >= v) {  // bounds guard only: the launcher checks host-written targets
            out[row] = __int_as_float(0x7fc00000);
            return;
        }
        const float lt = cfg_mix(crow, urow, cfg, s, tg);
        out[row] = round_bf16(__fsub_rn(__fsub_rn(lt, m), logf(sum)));
    }
}
