// kv_store_bf16: write the k and v parts of a merged qkv buffer into a KV cache (Fast-dLLM prefix /
// dual cache, reference §7), in place.
//
//   k_cache[bi·L + q0 + i, :] = qkv[bi·TQ + i, NH·HD       .. (NH+NKV)·HD]
//   v_cache[bi·L + q0 + i, :] = qkv[bi·TQ + i, (NH+NKV)·HD .. (NH+2·NKV)·HD]     for bi < B, i < TQ
//
// Layouts: qkv [B·TQ, (NH + 2·NKV)·HD] bf16 (k already rotated by rope_bf16); k_cache, v_cache
// [B, L, NKV·HD] bf16. q0 + TQ ≤ L (validated by the launcher). Launch: grid B·TQ, block 256 (any
// multiple of 32). 16-byte copies when NKV·HD % 8 == 0, (NH+2·NKV)·HD % 8 == 0 and the base
// pointers are 16-byte aligned, else scalar. Pure copy: bit-exact.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
kv_store_bf16(bf16* __restrict__ k_cache, bf16* __restrict__ v_cache, const bf16* __restrict__ qkv, int b, int tq,
              int l, int q0, int nh, int nkv, int hd) {
    const int row = blockIdx.x;
    if (row >= b * tq) return;
    const int bi = row / tq, i = row - bi * tq;
    const int kw = nkv * hd;
    const long long width = (long long)(nh + 2 * nkv) * hd;
    const bf16* src = qkv + (long long)row * width + (long long)nh * hd;
    const long long dst = ((long long)bi * l + q0 + i) * kw;
    if ((kw & 7) == 0 && (width & 7) == 0 && ((nh * hd) & 7) == 0 && aligned16(qkv) && aligned16(k_cache) &&
        aligned16(v_cache)) {
        const uint4* sk = reinterpret_cast<const uint4*>(src);
        const uint4* sv = reinterpret_cast<const uint4*>(src + kw);
        uint4* dk = reinterpret_cast<uint4*>(k_cache + dst);
        uint4* dv = reinterpret_cast<uint4*>(v_cache + dst);
        for (int j = threadIdx.x; j < kw / 8; j += blockDim.x) {
            dk[j] = sk[j];
            dv[j] = sv[j];
        }
    } else {
        for (int j = threadIdx.x; j < kw; j += blockDim.x) {
            k_cache[dst + j] = src[j];
            v_cache[dst + j] = src[kw + j];
        }
    }
}
