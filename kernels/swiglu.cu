// swiglu_bf16: SiLU-gated MLP activation on a merged gate|up buffer.
//
//   g = gate_up[i, j], u = gate_up[i, F + j]
//   out[i, j] = bf16( bf16(silu(g)) * u ),  silu(g) = g / (1 + exp(-g))  in f32
//
// Two roundings, as PyTorch bf16 `silu(g) * u` (silu's output is a bf16 tensor). expf is CUDA's
// accurate expf (≤ 2 ulp), so silu may differ from the CPU's libm by an ulp of f32 before the
// bf16 rounding: rare 1-ulp bf16 differences are expected.
// Layouts: gate_up [N, 2F] bf16, out [N, F] bf16. Launch: grid-stride over N·F (block 256);
// 8-wide vector path when F % 8 == 0 and pointers are 16-byte aligned, else scalar.
//
// Training (f32) kernels below: the forward and backward of the training step. Training keeps f32
// activations and f32 master weights (the CPU reference `src/train/ops.rs` is plain f32 without
// bf16 rounding); kernels follow the reference's order with explicit IEEE intrinsics (__fmul_rn,
// __fadd_rn, ...) so nvcc cannot contract them into FMAs. Where the reference sums sequentially and
// a kernel reduces as a tree, results differ by f32 rounding only.
// swiglu_fwd_f32(m, g, u, numel):               m = g·σ(g)·u, σ(x) = 1/(1+exp(−x)); grid-stride.
// swiglu_bwd_f32(dg, du, dm, g, u, numel): backward of m = silu(g)·u (`ops::swiglu_bwd`), element-wise.
//   s  = 1/(1 + exp(−g))
//   dg = dm·u·s·(1 + g·(1 − s))        (((dm·u)·s)·(1 + g·(1−s))), CPU order
//   du = dm·g·s                        ((dm·g)·s)
// Layouts: dg, du, dm, g, u [numel] (any shape). Grid-stride, block 256. Explicit IEEE
// intrinsics (no FMA contraction); only expf differs from the CPU's libm exp (≤ 2 f32 ulps).
// swiglu_fwd_bf16s, swiglu_bwd_bf16s: the same on bf16 buffers (bf16 storage): f32 math on the
// loaded values, each output rounded once (RNE).
#include "common.cuh"

LLADA_DEVICE float silu_f32(float g) { return __fdiv_rn(g, __fadd_rn(1.0f, expf(-g))); }

extern "C" __global__ void __launch_bounds__(1024)
swiglu_bf16(bf16* __restrict__ out, const bf16* __restrict__ gate_up, int n, int f) {
    const long long tid = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long stride = (long long)gridDim.x * blockDim.x;
    const long long total = (long long)n * f;
    if ((f & 7) == 0 && aligned16(out) && aligned16(gate_up)) {
        const long long fv = f / 8;
        const uint4* gu = reinterpret_cast<const uint4*>(gate_up);
        uint4* o = reinterpret_cast<uint4*>(out);
        for (long long i = tid; i < total / 8; i += stride) {
            const long long row = i / fv, col = i % fv;
            float g[8], u[8], r[8];
            unpack8(gu[row * 2 * fv + col], g);
            unpack8(gu[row * 2 * fv + fv + col], u);
#pragma unroll
            for (int k = 0; k < 8; ++k) r[k] = __fmul_rn(round_bf16(silu_f32(g[k])), u[k]);
            o[i] = pack8(r);
        }
    } else {
        for (long long i = tid; i < total; i += stride) {
            const long long row = i / f, col = i % f;
            const float g = ld_bf16(gate_up + row * 2 * f + col);
            const float u = ld_bf16(gate_up + row * 2 * f + f + col);
            out[i] = to_bf16(__fmul_rn(round_bf16(silu_f32(g)), u));
        }
    }
}

template <typename S>
LLADA_DEVICE void swiglu_fwd_t(S* __restrict__ m, const S* __restrict__ g, const S* __restrict__ u, long long numel) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x) {
        const float gv = load_f(g + i);
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-gv)));
        store_f(m + i, __fmul_rn(__fmul_rn(gv, s), load_f(u + i)));
    }
}

template <typename S>
LLADA_DEVICE void swiglu_bwd_t(S* __restrict__ dg, S* __restrict__ du, const S* __restrict__ dm,
                               const S* __restrict__ g, const S* __restrict__ u, long long numel) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < numel; i += (long long)gridDim.x * blockDim.x) {
        const float gv = load_f(g + i), d = load_f(dm + i);
        const float s = __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-gv)));
        store_f(dg + i,
                __fmul_rn(__fmul_rn(__fmul_rn(d, load_f(u + i)), s), __fadd_rn(1.0f, __fmul_rn(gv, __fsub_rn(1.0f, s)))));
        store_f(du + i, __fmul_rn(__fmul_rn(d, gv), s));
    }
}

LLADA_STORED(1024, swiglu_fwd, (S* __restrict__ m, const S* __restrict__ g, const S* __restrict__ u, long long numel),
             swiglu_fwd_t(m, g, u, numel))
LLADA_STORED(1024, swiglu_bwd,
             (S* __restrict__ dg, S* __restrict__ du, const S* __restrict__ dm, const S* __restrict__ g,
              const S* __restrict__ u, long long numel),
             swiglu_bwd_t(dg, du, dm, g, u, numel))
