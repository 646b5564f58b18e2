/* bf16 helpers shared by the CPU kernels (decode_bf16.c, sparse_bf16.c): the storage type, its
 * conversions (round to nearest even, as torch's .to(torch.bfloat16)) and the one-row dot product.
 * Included, not linked: each library is one translation unit (kernels/cpu_compile.py builds them;
 * a change here rebuilds both). */
#ifndef DSV3_BF16_H
#define DSV3_BF16_H

#include <stdint.h>
#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>       /* the AVX-512 paths' intrinsics (AVX512-BF16, the 4 x 4 score tree, AMX) */
#endif

#include "vec.h"

typedef uint16_t bf16;

static inline float bf2f(bf16 v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline bf16 f2bf(float f) {          /* round to nearest even, as torch's .to(bfloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

/* bf16 dot product of a weight row with an activation (fp32 sums), prefetching the row PF rows
 * (ld apart) ahead: a projection's rows are short, too short for the hardware prefetcher to ramp
 * up on each. */
#define PF 8
static inline float dot_bf16(const bf16 *w, int64_t ld, const bf16 *x, int K) {
    int k = 0;
    float s = 0.0f;
#ifdef __AVX512BF16__
    __m512 a0 = _mm512_setzero_ps(), a1 = a0;
    for (; k + 64 <= K; k += 64) {
        PREFETCH(w + PF * ld + k);
        PREFETCH(w + PF * ld + k + 32);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w + k)),
                              (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(w + k + 32)),
                              (__m512bh)_mm512_loadu_si512((const void *)(x + k + 32)));
    }
    for (; k + 32 <= K; k += 32)
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w + k)),
                              (__m512bh)_mm512_loadu_si512((const void *)(x + k)));
    s = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));
#else
    vf a0 = vzero(), a1 = vzero();
    for (; k + 2 * VL <= K; k += 2 * VL) {
        PREFETCH(w + PF * ld + k);
        a0 += vload_bf(w + k) * vload_bf(x + k);
        a1 += vload_bf(w + k + VL) * vload_bf(x + k + VL);
    }
    for (; k + VL <= K; k += VL) a0 += vload_bf(w + k) * vload_bf(x + k);
    s = vsum(a0 + a1);
#endif
    for (; k < K; k++) s += bf2f(w[k]) * bf2f(x[k]);
    return s;
}

#endif
