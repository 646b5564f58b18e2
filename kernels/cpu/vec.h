/* Portable fp32 vectors for the CPU kernels (GCC/Clang vector extensions): one source that the
 * compiler turns into AVX-512 (16 lanes), AVX2/AVX (8 lanes) or SSE / NEON (4 lanes), whatever
 * -march the library is built for (kernels/cpu_compile.py). The ISA-specific intrinsics left in
 * the kernels are the ones that pay beyond this: AVX512-BF16 dot products, AMX tiles.
 *
 * Why not plain loops: GCC does not vectorise a loop whose sum it would have to reorder (the
 * dot products' fp32 sums) unless told to reassociate everything; here the lanes ARE the
 * partial sums, written out, so the order of additions is fixed by the source on every tier
 * (and differs between tiers only in the lane count). Fused multiply-adds where the target has
 * them (-ffp-contract=fast, kernels/cpu_compile.py). */
#ifndef DSV3_VEC_H
#define DSV3_VEC_H

#include <stdint.h>
#include <string.h>
#if defined(__SSE__)
#include <immintrin.h>       /* vload_i8's sign extensions, the MXCSR */
#endif

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif

typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint32_t vu __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

/* unaligned loads and stores: memcpy of a vector's size is one vector move at -O2 and up */
static inline vf vload(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
static inline void vstore(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* x - (+0) folds to a bare broadcast (a broadcast of (vf){0} + x made GCC add a scalar 0 first:
   0 + -0 is +0) */
static inline vf vsplat(float x) { return x - (vf){0}; }
static inline vf vzero(void) { return (vf){0}; }
/* v held in a register from here: GCC otherwise may load a value again at each use, as a memory
   operand of each FMA, which made a tile's loads outnumber its FMAs */
#if defined(__x86_64__) || defined(__i386__)
#define VREG(v) __asm__("" : "+x"(v))
#elif defined(__aarch64__)
#define VREG(v) __asm__("" : "+w"(v))
#else
#define VREG(v) ((void)0)
#endif

/* VL bf16 values widened to fp32 (a bf16 is the top half of an fp32: exact) */
static inline vf vload_bf(const uint16_t *p) {
    vh h;
    memcpy(&h, p, sizeof h);
    vu u = __builtin_convertvector(h, vu) << 16;
    vf f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* VL e4m3 (OCP "fn": bias 7, no infinities) bytes as fp32 lanes holding value / E4M3_LIFT,
   exactly; multiplying by scale * E4M3_LIFT gives the dequantized weight in one rounding, the
   same as value * scale. (0x7f, e4m3fn's NaN, becomes 480: a stored weight is never NaN, the
   loader checks.) Two ways, the same values:
   - with F16C (x86-64-v3 and up): each byte sign-extended to 16 bits and shifted left by 7 is an
     fp16 with the e4m3's exponent and mantissa bits in place (e4m3 is fp16 with 3 exponent bits
     fewer, so value = fp16 * 2^8), the sign at bit 15, converted by vcvtph2ps. Every result is
     an fp32 normal.
   - elsewhere: vload_e4m3_tiny (value = fp32 * 2^120). */
typedef int8_t vsb __attribute__((vector_size(VL)));

/* VL bytes sign-extended to int32 lanes: pmovsxbd where the target has it (GCC 12 scalarises
   __builtin_convertvector from a vector of 4 or 8 bytes), the generic conversion elsewhere */
static inline vu vload_i8(const uint8_t *p) {
    vu v;
#if VL == 4 && defined(__SSE4_1__)
    int32_t w;
    memcpy(&w, p, 4);
    __m128i r = _mm_cvtepi8_epi32(_mm_cvtsi32_si128(w));
    memcpy(&v, &r, sizeof v);
#elif VL == 8 && defined(__AVX2__)
    __m256i r = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p));
    memcpy(&v, &r, sizeof v);
#elif VL == 16 && defined(__AVX512F__)
    __m512i r = _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p));
    memcpy(&v, &r, sizeof v);
#else
    vsb b;
    memcpy(&b, p, sizeof b);
    v = (vu)__builtin_convertvector(b, vi);
#endif
    return v;
}

/* VL e4m3 bytes as fp32 lanes holding value * 2^-120 exactly, in three integer operations: each
   byte sign-extended to 32 bits and shifted left by 20 puts its 7 magnitude bits under an fp32's
   exponent field (e4m3's exponent is fp32's low 4 exponent bits) and its sign at bit 31. e4m3's
   normals become fp32 normals (2^-126 and up), its subnormals fp32 subnormals: exact as long as
   the FPU does not treat subnormal inputs as zero (x86 MXCSR.DAZ, Arm FPCR.FZ; torch leaves them
   off: denormals_flushed() says). What keeps this exact and fast is the other operand: against an
   unscaled activation the products of these lanes sit at 2^-120 of their values, in or near
   fp32's subnormal range (where x86 arithmetic takes microcode assists and results keep fewer
   bits), whereas an activation lifted by X_LIFT (2^100) puts every product at 2^-20 of its value,
   a normal (decode_bf16.c's dot_e4m3). */
#define E4M3_TINY_LIFT 0x1p120f
static inline vf vload_e4m3_tiny(const uint8_t *p) {
    vu bits = (vload_i8(p) << 20) & 0x87F00000u;        /* unsigned: no signed shift */
    vf f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

/* 2 VL e4m3 bytes as two vectors of the same values as vload_e4m3_tiny's: the bytes at even
   offsets in *lo, the odd ones in *hi (lane i: bytes 2i and 2i + 1). Each byte sign-extended to 16
   bits, a pair of them is one 32-bit lane: shifted left by 20, the low byte's magnitude lands
   under the exponent field and its sign copies above it (the high byte shifts out); shifted left
   by 4, the high byte's (the low byte sits below bit 20, under the mask). One widening, two shifts
   and two masks for 2 VL weights where vload_e4m3_tiny takes two widenings: the widenings and
   shifts share two of Zen 3's four vector pipes with the fused multiply-adds, and the GEMV of the
   AVX2 EPYC ran ~1.2x as fast from L2 this way (the caller pairs the lanes with an activation
   whose even and odd positions it split the same way: decode_bf16.c's lift_activation). */
static inline void vload_e4m3_tiny_pairs(const uint8_t *p, vf *lo, vf *hi) {
    vu v;
#if VL == 8 && defined(__AVX2__)
    __m256i r = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    memcpy(&v, &r, sizeof v);
#elif VL == 4 && defined(__SSE4_1__)
    __m128i r = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    memcpy(&v, &r, sizeof v);
#else
    typedef int8_t vb2 __attribute__((vector_size(2 * VL)));
    typedef int16_t vs2 __attribute__((vector_size(4 * VL)));
    vb2 b;
    memcpy(&b, p, sizeof b);
    vs2 s = __builtin_convertvector(b, vs2);
    memcpy(&v, &s, sizeof v);
#endif
    vu l = (v << 20) & 0x87F00000u, h = (v << 4) & 0x87F00000u;
    memcpy(lo, &l, sizeof l);
    memcpy(hi, &h, sizeof h);
}

#if defined(__F16C__) && defined(__AVX__) && (VL == 8 || (VL == 16 && defined(__AVX512F__)))
#define E4M3_LIFT 0x1p8f
#define E4M3_RAW_TINY 0
static inline vf vload_e4m3_raw(const uint8_t *p) {
    vf v;
#if VL == 16
    __m256i h = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)p));
    h = _mm256_and_si256(_mm256_slli_epi16(h, 7), _mm256_set1_epi16((short)0xBF80));
    __m512 f = _mm512_cvtph_ps(h);
#else
    __m128i h = _mm_cvtepi8_epi16(_mm_loadl_epi64((const __m128i *)p));
    h = _mm_and_si128(_mm_slli_epi16(h, 7), _mm_set1_epi16((short)0xBF80));
    __m256 f = _mm256_cvtph_ps(h);
#endif
    memcpy(&v, &f, sizeof v);
    return v;
}
#else
#define E4M3_LIFT E4M3_TINY_LIFT
#define E4M3_RAW_TINY 1                  /* its subnormals are fp32 subnormals */
static inline vf vload_e4m3_raw(const uint8_t *p) { return vload_e4m3_tiny(p); }
#endif

/* Whether this thread's FPU reads subnormal inputs as zero (then vload_e4m3_tiny's subnormals
   would be lost): x86's MXCSR.DAZ, Arm's FPCR.FZ; MXCSR and FPCR are per thread. */
static inline int denormals_flushed(void) {
#if defined(__SSE__)
    return (_mm_getcsr() & 0x0040) != 0;
#elif defined(__aarch64__)
    return (__builtin_aarch64_get_fpcr() & (1u << 24)) != 0;
#else
    return 1;                            /* unknown: take the path that never makes a subnormal */
#endif
}

/* VL e4m3 bytes widened to their fp32 values exactly */
static inline vf vload_e4m3(const uint8_t *p) { return vload_e4m3_raw(p) * E4M3_LIFT; }

/* fp32 lanes rounded to bf16 precision (nearest even), kept as fp32: what .to(bfloat16) keeps.
   By the hardware's own rounding: C = 1.5 * 2^(e + 16) for x's exponent e (x's exponent bits
   times 1.5 * 2^16) is a multiple of 2^(e + 15), so x + C has its last bit where bf16's last bit
   of x is, its rounding (nearest even) is bf16's, and subtracting C is exact. Four float
   operations (two fused) where the integer form (add 0x7FFF plus the parity bit, mask) took
   five, two of them shifts (1.1x the rate of a loop of these on an AVX2 EPYC). For normal x
   with |x| < 2^111 (dequantized weights; zeros stay zero; fp32 subnormals are left as they are). */
static inline vf vround_bf(vf x) {
    vu u, e;
    memcpy(&u, &x, sizeof u);
    e = u & 0xFF800000u;                 /* sign and exponent: +-2^e */
    vf c;
    memcpy(&c, &e, sizeof c);
    c = c * 98304.0f;                    /* 1.5 * 2^16 */
    return (x + c) - c;
}

/* the lanes' sum, pairwise (a tree, as the hardware reductions add) */
static inline float vsum(vf v) {
    float a[VL];
    memcpy(a, &v, sizeof a);
    for (int w = VL / 2; w >= 1; w /= 2)
        for (int i = 0; i < w; i++) a[i] += a[i + w];
    return a[0];
}

/* The sums of VL vectors at once, as one vector (r[n] = sum of v[n]'s lanes): a tree of
   pairwise lane additions (shuffles and adds, ~1.5 per vector) in place of VL separate
   horizontal sums (VL - 1 scalar adds each). For the attention's score blocks, where a
   horizontal sum comes every few dozen fused multiply-adds. VL = 4 or 8 (AVX-512 keeps its
   intrinsic tree, cpu/decode_bf16.c). */
#if VL == 8
static inline vf vpairs(vf a, vf b) {      /* [a0+a1, a2+a3, b0+b1, b2+b3, a4+a5, a6+a7, b4+b5, b6+b7] */
    return __builtin_shufflevector(a, b, 0, 2, 8, 10, 4, 6, 12, 14)
         + __builtin_shufflevector(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}
static inline vf vsums(const vf *v) {
    vf q0 = vpairs(vpairs(v[0], v[1]), vpairs(v[2], v[3]));    /* v0..v3: low half + high half */
    vf q1 = vpairs(vpairs(v[4], v[5]), vpairs(v[6], v[7]));
    return __builtin_shufflevector(q0, q1, 0, 1, 2, 3, 8, 9, 10, 11)
         + __builtin_shufflevector(q0, q1, 4, 5, 6, 7, 12, 13, 14, 15);
}
#elif VL == 4
static inline vf vpairs(vf a, vf b) {      /* [a0+a1, a2+a3, b0+b1, b2+b3] */
    return __builtin_shufflevector(a, b, 0, 2, 4, 6) + __builtin_shufflevector(a, b, 1, 3, 5, 7);
}
static inline vf vsums(const vf *v) { return vpairs(vpairs(v[0], v[1]), vpairs(v[2], v[3])); }
#endif

/* lanewise a > b ? a : b (C has no vector ?:): a NaN in b comes back (the comparison is false) */
static inline vf vmax(vf a, vf b) {
    vi m = (vi)(a > b), ai, bi;
    memcpy(&ai, &a, sizeof ai);
    memcpy(&bi, &b, sizeof bi);
    vi r = (ai & m) | (bi & ~m);
    vf y;
    memcpy(&y, &r, sizeof y);
    return y;
}

/* exp(x) for x <= 0 lanes (softmax: scores minus their max): 2^n * 2^f, n = round(x log2 e),
   f in [-1/2, 1/2], 2^f by a degree-6 polynomial (relative error ~2e-7); x clamped at -87
   (e^-87 ~ 1.6e-38: a probability no sum notices); a NaN stays NaN. n is rounded by the 1.5 * 2^23 trick, and
   2^n built in the exponent bits (n >= -126 after the clamp). */
static inline vf vexp_neg(vf x) {
    x = vmax(vsplat(-87.0f), x);
    vf t = x * 1.44269504088896341f;
    vf n = (t + 12582912.0f) - 12582912.0f;
    vf f = t - n;
    vf y = vsplat(1.5403530393381609e-4f);
    y = y * f + 1.3333558146428443e-3f;
    y = y * f + 9.6181291076284772e-3f;
    y = y * f + 5.5504108664821580e-2f;
    y = y * f + 2.4022650695910071e-1f;
    y = y * f + 6.9314718055994531e-1f;
    y = y * f + 1.0f;
    vi e = (__builtin_convertvector(n, vi) + 127) << 23;
    vf p;
    memcpy(&p, &e, sizeof p);
    return y * p;
}

/* a prefetch that every target has (a no-op where the compiler knows none) */
#define PREFETCH(p) __builtin_prefetch((const void *)(p), 0, 3)

#endif
