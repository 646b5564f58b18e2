/* FP8 e4m3 quantization of a weight with one fp32 scale per b x b block: what a bf16 release
 * (DeepSeek-V2-Lite, Moonlight) goes through when it is loaded with fp8="quantize", the
 * DeepSeek-V3 report's recipe (sec. 3.3.2: 128 x 128 weight blocks, each scaled by its own
 * absolute maximum onto e4m3's range).
 *
 * Two calls, because the scale rule is the caller's (dsv3lab.fp8: amax / 448, or that rounded up
 * to a power of two for UE8M0 scales) and must stay one definition:
 *
 *   dsv3_block_amax   amax[i][j] = max |w| over block (i, j) (NaN when the block holds one)
 *   dsv3_quant_fp8    q = e4m3(clamp(w / s, -448, 448)) with s the block's scale (1 where it is 0)
 *
 * Bit for bit the values of dsv3lab.fp8.weight_quant: the division is one IEEE fp32 division
 * (no reciprocal), the clamp keeps a NaN, and the conversion rounds to nearest even as torch's
 * float -> float8_e4m3fn does (c10's rule: values from 464 up, infinities and NaN become the
 * NaN code 0x7f with the sign; below 2^-6, e4m3's smallest normal, the value is rounded on the
 * subnormal grid of 2^-9 by one fp32 addition of 2^14; above, the mantissa is rounded at bit 20
 * with the odd bit added for ties to even). On one thread of a 2-core AVX2 EPYC: 496 M weights/s
 * against 250 for torch's weight_quant in bands (fp32 temporaries for every step); a full-size
 * V2-Lite's load is bound by reading its 31 GB from disk either way.
 *
 * Threads over block rows (OpenMP, torch's runtime, as cpu/decode_bf16.c).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "vec.h"

static inline float at(int f32, const void *w, int64_t i) {
    return f32 ? ((const float *)w)[i] : bf2f(((const bf16 *)w)[i]);
}

static inline uint8_t f32_to_e4m3(float x) {
    uint32_t f;
    memcpy(&f, &x, 4);
    uint32_t sign = f & 0x80000000u;
    f ^= sign;
    uint8_t r;
    if (f >= (1087u << 20)) {                 /* >= 464.0f, infinities, NaN */
        r = 0x7f;
    } else if (f < (121u << 23)) {            /* < 2^-6: onto the subnormal grid */
        const uint32_t lift = 141u << 23;     /* 2^14: one ulp of it is 2^-9 */
        float v, l;
        memcpy(&v, &f, 4);
        memcpy(&l, &lift, 4);
        v += l;
        uint32_t vb;
        memcpy(&vb, &v, 4);
        r = (uint8_t)(vb - lift);
    } else {
        uint32_t odd = (f >> 20) & 1u;
        f += ((uint32_t)(7 - 127) << 23) + 0x7FFFFu;
        f += odd;
        r = (uint8_t)(f >> 20);
    }
    return (uint8_t)(r | (sign >> 24));
}

/* amax [ceil(M/b), ceil(N/b)] (lda apart) of w [M, N] (ldw elements apart; bf16, or fp32 with
   f32): lanes of running maxima per block, and lanes that saw a NaN, reduced once a block row */
static inline __attribute__((always_inline)) void amax_any(int f32, const void *w, int64_t ldw, int M, int N, int b,
                                                           float *amax, int64_t lda, int nt) {
    int mb = (M + b - 1) / b, nb = (N + b - 1) / b;
#pragma omp parallel num_threads(nt)
    {
        size_t vbytes = (sizeof(vf) * nb + 63) / 64 * 64;      /* vectors: aligned as the compiler assumes */
        vf *m = aligned_alloc(64, vbytes);
        vi *nan = aligned_alloc(64, vbytes);
        float *tail = malloc(sizeof(float) * nb);
#pragma omp for schedule(static)
        for (int i = 0; i < mb; i++) {
            for (int j = 0; j < nb; j++) { m[j] = vzero(); nan[j] = (vi){0}; tail[j] = 0.0f; }
            int r1 = (i + 1) * b < M ? (i + 1) * b : M;
            for (int r = i * b; r < r1; r++) {
                const void *wr = f32 ? (const void *)((const float *)w + (int64_t)r * ldw)
                                     : (const void *)((const bf16 *)w + (int64_t)r * ldw);
                for (int j = 0; j < nb; j++) {
                    int c = j * b, c1 = (j + 1) * b < N ? (j + 1) * b : N;
                    vf mm = m[j];
                    vi nn = nan[j];
                    for (; c + VL <= c1; c += VL) {
                        vf x = f32 ? vload((const float *)wr + c) : vload_bf((const bf16 *)wr + c);
                        vi xi;
                        memcpy(&xi, &x, sizeof xi);
                        xi &= 0x7fffffff;                    /* |x| */
                        memcpy(&x, &xi, sizeof x);
                        nn |= (vi)(x != x);
                        vi gt = (vi)(x > mm), mi;
                        memcpy(&mi, &mm, sizeof mi);
                        mi = (xi & gt) | (mi & ~gt);
                        memcpy(&mm, &mi, sizeof mm);
                    }
                    m[j] = mm;
                    nan[j] = nn;
                    float t = tail[j];
                    for (; c < c1; c++) {
                        float a = fabsf(at(f32, wr, c));
                        if (a != a) nan[j][0] = -1;
                        t = a > t ? a : t;
                    }
                    tail[j] = t;
                }
            }
            for (int j = 0; j < nb; j++) {
                float a = tail[j];
                int isnan = 0;
                for (int l = 0; l < VL; l++) {
                    a = m[j][l] > a ? m[j][l] : a;
                    isnan |= nan[j][l] != 0;
                }
                amax[(int64_t)i * lda + j] = isnan ? NAN : a;
            }
        }
        free(m);
        free(nan);
        free(tail);
    }
}

void dsv3_block_amax(int f32, const void *w, int64_t ldw, int M, int N, int b, float *amax, int64_t lda, int nt) {
    if (f32) amax_any(1, w, ldw, M, N, b, amax, lda, nt);
    else amax_any(0, w, ldw, M, N, b, amax, lda, nt);
}

typedef uint8_t vb8 __attribute__((vector_size(VL)));

/* VL lanes x (|x| <= 448 or NaN) to e4m3 codes: f32_to_e4m3's three cases as lane masks */
static inline vb8 v_to_e4m3(vf x) {
    vu f;
    memcpy(&f, &x, sizeof f);
    vu sign = f & 0x80000000u;
    f ^= sign;
    vu norm = (f + (((uint32_t)(7 - 127) << 23) + 0x7FFFFu) + ((f >> 20) & 1u)) >> 20;
    vf v;
    memcpy(&v, &f, sizeof v);
    v += 0x1p14f;                              /* the subnormal grid: one ulp of 2^14 is 2^-9 */
    vu sub;
    memcpy(&sub, &v, sizeof sub);
    sub -= 141u << 23;
    vu small = (vu)(f < (121u << 23)), big = (vu)(f >= (1087u << 20));
    vu r = (sub & small) | (norm & ~small);
    r = (0x7fu & big) | (r & ~big);
    r |= sign >> 24;
    return __builtin_convertvector(r, vb8);
}

/* lanes clamped to [-448, 448], a NaN kept (as torch's clamp) */
static inline vf v_clamp448(vf x) {
    vi lo = (vi)(x < -448.0f), hi = (vi)(x > 448.0f), xi, l, h;
    vf lv = vsplat(-448.0f), hv = vsplat(448.0f);
    memcpy(&xi, &x, sizeof xi);
    memcpy(&l, &lv, sizeof l);
    memcpy(&h, &hv, sizeof h);
    xi = (l & lo) | (xi & ~lo);
    xi = (h & hi) | (xi & ~hi);
    vf y;
    memcpy(&y, &xi, sizeof y);
    return y;
}

static inline __attribute__((always_inline)) void quant_row(int f32, const void *w, float s, uint8_t *q, int c0,
                                                            int c1) {
    int c = c0;
    vf sv = vsplat(s);
    for (; c + VL <= c1; c += VL) {
        vf x = (f32 ? vload((const float *)w + c) : vload_bf((const bf16 *)w + c)) / sv;
        vb8 b = v_to_e4m3(v_clamp448(x));
        memcpy(q + c, &b, sizeof b);
    }
    for (; c < c1; c++) {
        float x = at(f32, w, c) / s;
        x = x < -448.0f ? -448.0f : (x > 448.0f ? 448.0f : x);
        q[c] = f32_to_e4m3(x);
    }
}

/* q [M, N] (ldq bytes apart) = e4m3(clamp(w / s, -448, 448)), s = S[r/b][c/b] (lds apart) where
   it is > 0, else 1 (an all-zero block; also a NaN scale, as torch.where(s > 0, s, 1) has it: the
   block's NaN weights stay NaN codes, its other weights are divided by 1) */
static inline __attribute__((always_inline)) void quant_any(int f32, const void *w, int64_t ldw, const float *S,
                                                            int64_t lds, uint8_t *q, int64_t ldq, int M, int N,
                                                            int b, int nt) {
    int mb = (M + b - 1) / b, nb = (N + b - 1) / b;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int i = 0; i < mb; i++) {
        int r1 = (i + 1) * b < M ? (i + 1) * b : M;
        for (int r = i * b; r < r1; r++) {
            const void *wr = f32 ? (const void *)((const float *)w + (int64_t)r * ldw)
                                 : (const void *)((const bf16 *)w + (int64_t)r * ldw);
            for (int j = 0; j < nb; j++) {
                float s = S[(int64_t)i * lds + j];
                s = s > 0.0f ? s : 1.0f;
                int c1 = (j + 1) * b < N ? (j + 1) * b : N;
                quant_row(f32, wr, s, q + (int64_t)r * ldq, j * b, c1);
            }
        }
    }
}

void dsv3_quant_fp8(int f32, const void *w, int64_t ldw, const float *S, int64_t lds, uint8_t *q, int64_t ldq,
                    int M, int N, int b, int nt) {
    if (f32) quant_any(1, w, ldw, S, lds, q, ldq, M, N, b, nt);
    else quant_any(0, w, ldw, S, lds, q, ldq, M, N, b, nt);
}
