// embedding_bf16: token embedding lookup.
//
//   out[i, :] = wte[ids[i], :]        for i < n
//
// Layouts: out [N, C] bf16, wte [V, C] bf16, ids [N] int32. Every id must lie in [0, V): the
// launcher validates ids on the host (the kernel does not know V).
// Launch: grid n (one block per row), block 256 (any multiple of 32). 16-byte copies when C % 8 == 0
// and both base pointers are 16-byte aligned, else a scalar copy. Pure copy: bit-exact.
#include "common.cuh"

extern "C" __global__ void __launch_bounds__(1024)
embedding_bf16(bf16* __restrict__ out, const bf16* __restrict__ wte, const int* __restrict__ ids, int n, int c) {
    const int i = blockIdx.x;
    if (i >= n) return;
    const long long id = ids[i];
    const bf16* src = wte + id * (long long)c;
    bf16* dst = out + (long long)i * c;
    if ((c & 7) == 0 && aligned16(wte) && aligned16(out)) {
        const uint4* s = reinterpret_cast<const uint4*>(src);
        uint4* d = reinterpret_cast<uint4*>(dst);
        for (int j = threadIdx.x; j < c / 8; j += blockDim.x) d[j] = s[j];
    } else {
        for (int j = threadIdx.x; j < c; j += blockDim.x) dst[j] = src[j];
    }
}
