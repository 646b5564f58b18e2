/* bf16 helpers shared by the CPU kernels (decode_bf16.c, sparse_bf16.c): the storage type, its
 * conversions (round to nearest even, as torch's .to(torch.bfloat16)) and the one-row dot product.
 * Included, not linked: each library is one translation unit (kernels/cpu_decode.py builds them;
 * a change here rebuilds both). */
#ifndef DSV3_BF16_H
#define DSV3_BF16_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

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
        _mm_prefetch((const char *)(w + PF * ld + k), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + PF * ld + k + 32), _MM_HINT_T0);
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
    float acc[16] = {0};
    for (; k + 16 <= K; k += 16)              /* 16 independent partial sums: vectorised */
        for (int l = 0; l < 16; l++) acc[l] += bf2f(w[k + l]) * bf2f(x[k + l]);
    for (int l = 0; l < 16; l++) s += acc[l];
#endif
    for (; k < K; k++) s += bf2f(w[k]) * bf2f(x[k]);
    (void)ld;
    return s;
}

#endif
