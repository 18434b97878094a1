// fill_random_bf16 / fill_const_bf16: device-side weight initialisation for presets.
//
// fill_random_bf16(out, n, key, a):
//   out[i] = bf16( a · (2u − 1) ),  u = (f32) llada_uniform(llada_bits(key, i))   for i < n
// exactly `WeightSource::Random` (src/hf/checkpoint.rs) with key = rng::cell_key(seed,
// STREAM_WEIGHTS, 0, 0, 0) and a = std·√3 computed on the host in f32. The f32 ops are written
// with __fmul_rn/__fsub_rn (no contraction), so the result is bit-exact against the CPU.
// fill_const_bf16(out, n, value): out[i] = bf16(value) (RNE).
// Launch: grid-stride over n (block 256).
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
fill_random_bf16(bf16* __restrict__ out, long long n, unsigned long long key, float a) {
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const float u = __double2float_rn(llada_uniform(llada_bits(key, (unsigned long long)i)));
        out[i] = to_bf16(__fmul_rn(a, __fsub_rn(__fmul_rn(2.0f, u), 1.0f)));
    }
}

extern "C" __global__ void __launch_bounds__(1024)
fill_const_bf16(bf16* __restrict__ out, long long n, float value) {
    const bf16 v = to_bf16(value);
    const long long stride = (long long)gridDim.x * blockDim.x;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) out[i] = v;
}
