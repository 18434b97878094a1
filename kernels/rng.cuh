// Counter-based RNG: the bit-exact twin of src/rng.rs (included by common.cuh).
//
// Every f64 operation is an explicit IEEE intrinsic (__dadd_rn, __dsub_rn, __dmul_rn, __ddiv_rn,
// __fma_rn) in the same order as the Rust code, so nvcc cannot contract or reorder it. Constants
// are hex float literals equal to what Rust computes (1.0/23.0 etc. are correctly rounded
// quotients; LN_2 and SQRT_2 are std::f64::consts). Changing either side means changing both.
// Self-contained (only needs LLADA_DEVICE) so a host build can check it against Rust values.
#pragma once

#ifndef LLADA_DEVICE
#define LLADA_DEVICE __device__ __forceinline__
#endif

// ---------------------------------------------------------------------------------------------
// Counter-based RNG: twin of src/rng.rs (bit for bit).
// ---------------------------------------------------------------------------------------------

#define LLADA_GOLDEN 0x9E3779B97F4A7C15ULL
#define LLADA_STREAM_GUMBEL 1ULL
#define LLADA_STREAM_RANDOM_CONF 2ULL
#define LLADA_STREAM_WEIGHTS 3ULL

LLADA_DEVICE unsigned long long llada_mix64(unsigned long long z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

LLADA_DEVICE unsigned long long llada_cell_key(unsigned long long seed, unsigned long long stream,
                                               unsigned long long step, unsigned long long row,
                                               unsigned long long col) {
    unsigned long long h = llada_mix64(seed + LLADA_GOLDEN);
    h = llada_mix64(h ^ (stream * LLADA_GOLDEN));
    h = llada_mix64(h ^ step);
    h = llada_mix64(h ^ row);
    return llada_mix64(h ^ col);
}

LLADA_DEVICE unsigned long long llada_bits(unsigned long long key, unsigned long long index) {
    return llada_mix64(key ^ (index * LLADA_GOLDEN));
}

// ((bits >> 12) as f64 + 0.5) * 2^-52 (exact): open interval (0, 1), as rng::uniform.
LLADA_DEVICE double llada_uniform(unsigned long long bits) {
    return __dmul_rn(__dadd_rn(__ull2double_rn(bits >> 12), 0.5), 0x1p-52);
}

// Natural log of a positive, finite, normal f64 (same algorithm and op order as rng::ln).
LLADA_DEVICE double llada_ln(double x) {
    const double SQRT2 = 0x1.6a09e667f3bcdp+0;  // std::f64::consts::SQRT_2
    const double LN2 = 0x1.62e42fefa39efp-1;    // std::f64::consts::LN_2
    const unsigned long long b = (unsigned long long)__double_as_longlong(x);
    long long e = (long long)((b >> 52) & 0x7ffULL) - 1023;
    double m = __longlong_as_double((long long)((b & 0x000fffffffffffffULL) | 0x3ff0000000000000ULL));
    if (m > SQRT2) {
        m = __dmul_rn(m, 0.5);
        e += 1;
    }
    const double s = __ddiv_rn(__dsub_rn(m, 1.0), __dadd_rn(m, 1.0));
    const double s2 = __dmul_rn(s, s);
    // ATANH_C = 1/(2k+1), k = 11 down to 1 (correctly rounded quotients).
    double p = 0x1.642c8590b2164p-5;         // 1/23
    p = __fma_rn(p, s2, 0x1.8618618618618p-5);  // 1/21
    p = __fma_rn(p, s2, 0x1.af286bca1af28p-5);  // 1/19
    p = __fma_rn(p, s2, 0x1.e1e1e1e1e1e1ep-5);  // 1/17
    p = __fma_rn(p, s2, 0x1.1111111111111p-4);  // 1/15
    p = __fma_rn(p, s2, 0x1.3b13b13b13b14p-4);  // 1/13
    p = __fma_rn(p, s2, 0x1.745d1745d1746p-4);  // 1/11
    p = __fma_rn(p, s2, 0x1.c71c71c71c71cp-4);  // 1/9
    p = __fma_rn(p, s2, 0x1.2492492492492p-3);  // 1/7
    p = __fma_rn(p, s2, 0x1.999999999999ap-3);  // 1/5
    p = __fma_rn(p, s2, 0x1.5555555555555p-2);  // 1/3
    const double two_s = __dmul_rn(2.0, s);
    const double lnm = __fma_rn(__dmul_rn(two_s, s2), p, two_s);
    return __fma_rn((double)e, LN2, lnm);
}

// Standard Gumbel sample -ln(-ln u), u in (0, 1).
LLADA_DEVICE double llada_gumbel(double u) { return -llada_ln(-llada_ln(u)); }
