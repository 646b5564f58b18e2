/* bf16 decode kernels for the CPU: the memory-bound work of one decode step.
 *
 * A decode step multiplies one activation row by every weight it touches, so its speed is the
 * speed at which the weights stream from memory. torch's one-row bf16 GEMV reaches 15 % of the
 * copy bandwidth on an AVX512-BF16 CPU (docs/performance.md); these kernels stream each weight
 * row once, with AVX512-BF16 dot products (vdpbf16ps: bf16 products summed in fp32) where the
 * CPU has them and portable fp32 vectors (vec.h: AVX-512, AVX2+FMA, SSE or NEON, whatever the
 * library is built for) where it does not. Whether each kernel beats the torch call it replaces
 * on the CPU at hand is measured when the library is built (kernels/cpu_calibrate.py).
 *
 *   dsv3_gemv          Y[b,m,:] = X[b,m,:] W[b]^T     (b: a batch of weights, e.g. heads; m <= 8)
 *   dsv3_moe           sum_s w_s * down_s(silu(gate_s x) * up_s x) over a token's chosen experts
 *   dsv3_rmsnorm, dsv3_rope, dsv3_route, dsv3_index_scores, dsv3_latent_attn_f32  (see each)
 *
 * gemv, moe, rmsnorm and rope have fp32 twins (suffix _f32) for the fp32 model, through the
 * same drivers: fp32 fused multiply-adds, nothing rounded.
 *
 * Numerics follow the torch path they replace: inputs and weights bf16, every dot product in
 * fp32, each projection's output rounded to bf16 once (round to nearest even), exactly where
 * torch rounds it. Only the order of the fp32 additions inside a dot product differs.
 * Threads: OpenMP. Loaded after torch, this library binds to the OpenMP runtime torch already
 * loaded (same soname), so both share one pool; the caller passes torch.get_num_threads().
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

/* M dot products of one weight row w[K] with M activation rows x[m*ldx + k]: the row is read
   from memory once for all M. */
#define MAXM 8
static inline void dot_rows(const bf16 *w, const bf16 *x, int64_t ldx, int M, int K, float *out) {
    int k = 0;
#ifdef __AVX512BF16__
    __m512 acc[MAXM];
    for (int m = 0; m < M; m++) acc[m] = _mm512_setzero_ps();
    for (; k + 32 <= K; k += 32) {
        __m512bh wv = (__m512bh)_mm512_loadu_si512((const void *)(w + k));
        for (int m = 0; m < M; m++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + m * ldx + k));
            acc[m] = _mm512_dpbf16_ps(acc[m], wv, xv);
        }
    }
    for (int m = 0; m < M; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
#else
    vf acc[MAXM];
    for (int m = 0; m < M; m++) acc[m] = vzero();
    for (; k + VL <= K; k += VL) {
        vf wv = vload_bf(w + k);
        for (int m = 0; m < M; m++) acc[m] += wv * vload_bf(x + m * ldx + k);
    }
    for (int m = 0; m < M; m++) out[m] = vsum(acc[m]);
#endif
    for (; k < K; k++)
        for (int m = 0; m < M; m++) out[m] += bf2f(w[k]) * bf2f(x[m * ldx + k]);
}

/* PF (bf16.h): rows prefetched ahead; past a matrix's end a prefetch reads nothing and never faults.
   PFV: the same for the portable paths (0: none) */
#ifndef PFV
#define PFV 8           /* 4 -> 8: a Moonlight-sized bf16 head 26 -> 31 GB/s on the 2-core AVX2 EPYC */
#endif

/* Four weight rows (ld apart) against one activation row: four independent accumulator chains
   and four memory streams in flight, which one row at a time does not keep. */
static inline void dot4(const bf16 *w, int64_t ld, const bf16 *x, int K, float *out) {
    int k = 0;
#ifdef __AVX512BF16__
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + k));
        /* the rows PF ahead, into L1 now: rows are a few KB, too short for the hardware
           prefetcher to ramp up on each (measured: 6.7 -> 9.2 GB/s on one core) */
        PREFETCH(w + PF * ld + k);
        PREFETCH(w + (PF + 1) * ld + k);
        PREFETCH(w + (PF + 2) * ld + k);
        PREFETCH(w + (PF + 3) * ld + k);
        a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512((const void *)(w + k)), xv);
        a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512((const void *)(w + ld + k)), xv);
        a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512((const void *)(w + 2 * ld + k)), xv);
        a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512((const void *)(w + 3 * ld + k)), xv);
    }
    out[0] = _mm512_reduce_add_ps(a0);
    out[1] = _mm512_reduce_add_ps(a1);
    out[2] = _mm512_reduce_add_ps(a2);
    out[3] = _mm512_reduce_add_ps(a3);
#else
    /* the activation widened once for the four rows; one prefetch per 64-byte line */
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + VL <= K; k += VL) {
        if (PFV && (k * 2) % 64 == 0) {
            PREFETCH(w + PFV * ld + k);
            PREFETCH(w + (PFV + 1) * ld + k);
            PREFETCH(w + (PFV + 2) * ld + k);
            PREFETCH(w + (PFV + 3) * ld + k);
        }
        vf xv = vload_bf(x + k);
        a0 += vload_bf(w + k) * xv;
        a1 += vload_bf(w + ld + k) * xv;
        a2 += vload_bf(w + 2 * ld + k) * xv;
        a3 += vload_bf(w + 3 * ld + k) * xv;
    }
    out[0] = vsum(a0);
    out[1] = vsum(a1);
    out[2] = vsum(a2);
    out[3] = vsum(a3);
#endif
    for (int j = 0; j < 4; j++) {
        float s = 0.0f;
        for (int kk = k; kk < K; kk++) s += bf2f(w[j * ld + kk]) * bf2f(x[kk]);
        out[j] += s;
    }
}


/* Without vdpbf16ps, a bf16 row is widened in pairs: VL 32-bit lanes loaded from 2 VL weights hold
   one even and one odd weight each, so the even weights are the lanes shifted left by 16 and the
   odd ones the lanes with their low half cleared: two integer operations for 2 VL weights, where
   vload_bf's widening takes a cross-lane shuffle and a shift for VL. The activation is split to
   match once a call (split_bf16: each group of 2 VL values, its even ones then its odd ones, as
   fp32). On the 2-core AVX2 EPYC a Moonlight-sized head (163,840 x 2,048) read at 42 GB/s this
   way against 31 widened whole, where a plain reduction read 37 (docs/performance.md, session 12). */
#if !defined(__AVX512BF16__)
#define BF16_SPLIT 1
#else
#define BF16_SPLIT 0
#endif

static void split_bf16(const bf16 *x, int K, float *xs) {
    int k = 0;
    for (; k + 2 * VL <= K; k += 2 * VL)
        for (int i = 0; i < VL; i++) {
            xs[k + i] = bf2f(x[k + 2 * i]);
            xs[k + VL + i] = bf2f(x[k + 2 * i + 1]);
        }
    for (; k < K; k++) xs[k] = bf2f(x[k]);     /* a short last group: in order */
}

static inline void widen_pairs(const bf16 *w, vf *even, vf *odd) {
    vu v;
    memcpy(&v, w, sizeof v);
    vu lo = v << 16, hi = v & 0xFFFF0000u;
    memcpy(even, &lo, sizeof lo);
    memcpy(odd, &hi, sizeof hi);
}

/* dot4 against x split by split_bf16 (xs): two accumulator chains a row, eight in flight */
static inline void dot4_split(const bf16 *w, int64_t ld, const float *xs, int K, float *out) {
    vf a[4] = {vzero(), vzero(), vzero(), vzero()}, c[4] = {vzero(), vzero(), vzero(), vzero()};
    int k = 0;
    for (; k + 2 * VL <= K; k += 2 * VL) {
        if (PFV && (k * 2) % 64 == 0)
            for (int j = 0; j < 4; j++) PREFETCH(w + (PFV + j) * ld + k);
        vf xe = vload(xs + k), xo = vload(xs + k + VL);
        VREG(xe);
        VREG(xo);
        for (int j = 0; j < 4; j++) {
            vf e, o;
            widen_pairs(w + j * ld + k, &e, &o);
            a[j] += e * xe;
            c[j] += o * xo;
        }
    }
    for (int j = 0; j < 4; j++) {
        float s = 0.0f;
        for (int kk = k; kk < K; kk++) s += bf2f(w[j * ld + kk]) * xs[kk];
        out[j] = vsum(a[j] + c[j]) + s;
    }
}

/* The fp32 model's dot products: fp32 weights and activations, fused multiply-adds (vec.h:
   VL lanes of whatever the library was built for). */
static inline void dot_rows_f32(const float *w, const float *x, int64_t ldx, int M, int K, float *out) {
    int k = 0;
    vf acc[MAXM];
    for (int m = 0; m < M; m++) acc[m] = vzero();
    for (; k + VL <= K; k += VL) {
        vf wv = vload(w + k);
        for (int m = 0; m < M; m++) acc[m] += wv * vload(x + m * ldx + k);
    }
    for (int m = 0; m < M; m++) {
        float s = vsum(acc[m]);
        for (int kk = k; kk < K; kk++) s += w[kk] * x[m * ldx + kk];
        out[m] = s;
    }
}

static inline void dot4_f32(const float *w, int64_t ld, const float *x, int K, float *out) {
    int k = 0;
    vf a0 = vzero(), a1 = a0, a2 = a0, a3 = a0;
    for (; k + VL <= K; k += VL) {
        if (PFV && (k * 4) % 64 == 0) {               /* as in dot4: one prefetch per line */
            PREFETCH(w + PFV * ld + k);
            PREFETCH(w + (PFV + 1) * ld + k);
            PREFETCH(w + (PFV + 2) * ld + k);
            PREFETCH(w + (PFV + 3) * ld + k);
        }
        vf xv = vload(x + k);
        a0 += vload(w + k) * xv;
        a1 += vload(w + ld + k) * xv;
        a2 += vload(w + 2 * ld + k) * xv;
        a3 += vload(w + 3 * ld + k) * xv;
    }
    out[0] = vsum(a0);
    out[1] = vsum(a1);
    out[2] = vsum(a2);
    out[3] = vsum(a3);
    for (int j = 0; j < 4; j++) {
        float s = 0.0f;
        for (int kk = k; kk < K; kk++) s += w[j * ld + kk] * x[kk];
        out[j] += s;
    }
}

/* Both element types through one set of drivers: f32 selects fp32 weights, activations and
   outputs (no rounding anywhere), else bf16 with each output rounded once. Pointers are void
   and offsets in elements; the branch is the same for a whole call. */
static inline void dot4_any(int f32, const void *w, int64_t ld, const void *x, const float *xs, int K, float *out) {
    if (f32) dot4_f32((const float *)w, ld, (const float *)x, K, out);
    else if (xs) dot4_split((const bf16 *)w, ld, xs, K, out);   /* xs: x split (split_bf16), or NULL */
    else dot4((const bf16 *)w, ld, (const bf16 *)x, K, out);
}

static inline void dot_rows_any(int f32, const void *w, const void *x, int64_t ldx, int M, int K, float *out) {
    if (f32) dot_rows_f32((const float *)w, (const float *)x, ldx, M, K, out);
    else dot_rows((const bf16 *)w, (const bf16 *)x, ldx, M, K, out);
}

static inline const void *at(int f32, const void *p, int64_t i) {
    return f32 ? (const void *)((const float *)p + i) : (const void *)((const bf16 *)p + i);
}

/* Stores v as the output type; bf16 rounds (to nearest even) here, once. */
static inline void put(int f32, void *p, int64_t i, float v) {
    if (f32) ((float *)p)[i] = v;
    else ((bf16 *)p)[i] = f2bf(v);
}

/* What a stored value reads back as (for torch's intermediate roundings: none in fp32). */
static inline float stored(int f32, float v) { return f32 ? v : round_bf(v); }

static inline float get(int f32, const void *p, int64_t i) {
    return f32 ? ((const float *)p)[i] : bf2f(((const bf16 *)p)[i]);
}

/* Y[b][m][n] = sum_k W[b][n][k] X[b][m][k] for b < nb, m < M (<= 8), n < N, rounded to bf16
   (or fp32 throughout, f32). W rows are ldw apart, batches sw apart (elements); X and Y likewise.
   Rows of every batch are split over the threads as one range, so a batch of small matrices
   (per-head W_UK) still keeps every thread busy.
   The streaming loops here and in the FP8 GEMV and MoE are scheduled guided, not static: on a
   2-vCPU VM one thread often ran ~8 % slower than the other (memory and neighbours), and a static
   split left the faster one waiting at each of the ~300 barriers of a token (perf: 12-14 % of
   the samples in libgomp's waits, 8-10 % guided; decode 4.65 -> 5.00 tok/s median of three). */
static void gemv_any(int f32, const void *W, int64_t ldw, int64_t sw, const void *X, int64_t ldx, int64_t sx,
                     void *Y, int64_t ldy, int64_t sy, int nb, int M, int N, int K, int nt) {
    int64_t rows = (int64_t)nb * N;
    if (M == 1 && N % 4 == 0) {
        /* bf16: each batch's activation split once for dot4_split (NULL: dot4 on the bf16 values) */
        float *xs = !f32 && BF16_SPLIT ? malloc(sizeof(float) * (size_t)nb * K) : NULL;
        for (int b = 0; xs && b < nb; b++) split_bf16((const bf16 *)X + b * sx, K, xs + (int64_t)b * K);
#pragma omp parallel for schedule(guided, 4) num_threads(nt)
        for (int64_t r = 0; r < rows; r += 4) {
            int64_t b = r / N, n = r % N;
            float out[4];
            dot4_any(f32, at(f32, W, b * sw + n * ldw), ldw, at(f32, X, b * sx), xs ? xs + b * K : NULL, K, out);
            for (int j = 0; j < 4; j++) put(f32, Y, b * sy + n + j, out[j]);
        }
        free(xs);
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; r++) {
        int64_t b = r / N, n = r % N;
        float out[MAXM];
        dot_rows_any(f32, at(f32, W, b * sw + n * ldw), at(f32, X, b * sx), ldx, M, K, out);
        for (int m = 0; m < M; m++) put(f32, Y, b * sy + m * ldy + n, out[m]);
    }
}

void dsv3_gemv(const bf16 *W, int64_t ldw, int64_t sw, const bf16 *X, int64_t ldx, int64_t sx,
               bf16 *Y, int64_t ldy, int64_t sy, int nb, int M, int N, int K, int nt) {
    gemv_any(0, W, ldw, sw, X, ldx, sx, Y, ldy, sy, nb, M, N, K, nt);
}

void dsv3_gemv_f32(const float *W, int64_t ldw, int64_t sw, const float *X, int64_t ldx, int64_t sx,
                   float *Y, int64_t ldy, int64_t sy, int nb, int M, int N, int K, int nt) {
    gemv_any(1, W, ldw, sw, X, ldx, sx, Y, ldy, sy, nb, M, N, K, nt);
}

/* ---- FP8 weights read as stored (e4m3 + one fp32 scale per 128 x 128 block) --------------------
 *
 * y[n] = sum_k dequant(W)[n][k] x[k] for one activation row x, dequant(W) = e4m3 *
 * weight_scale_inv[n/128][k/128]. Each weight byte is read once from memory and widened in
 * registers (vec.h's vload_e4m3_raw): 1 byte a weight where a dequantized bf16 copy streams 2.
 * The block's scale multiplies the block's partial sums (sum_b scale_b * sum_{k in b} e4m3_k x_k,
 * in fp32), not each weight: one fused multiply-add a weight. This is the exact product of the
 * stored weights; torch's path (dsv3lab/fp8.py) dequantizes into the activation's dtype first,
 * so in a bf16 model it multiplies weights rounded to bf16 (each within 2^-9 of the stored
 * value). Rounding each weight here as well took 2x the instructions: on an AVX2 EPYC the GEMV
 * ran at 2.1 G weights/s from L2 that way, 4.3 without (1.84 and 2.97 from memory, one thread).
 * The output is rounded to bf16 once in a bf16 model. Rows four at a time (four never straddle a
 * 128-row block, so one scale row serves them), threads over rows. */
static inline float e4m3_to_f32(uint8_t b) {
    /* (8 + m) 2^(e - 10) for a normal, m 2^-9 for a subnormal: an integer times a power of two,
       both exact, no subnormal anywhere (a flushing FPU changes nothing) */
    uint32_t e = (b >> 3) & 15, m = b & 7;
    uint32_t pbits = (uint32_t)((int)(e ? e : 1) - 10 + 127) << 23;
    float p;
    memcpy(&p, &pbits, 4);
    float v = (float)(e ? m + 8 : m) * p;
    return (b & 0x80) ? -v : v;
}

/* e4m3 rows prefetched ahead: at 1 byte a weight a row is half a bf16 row's bytes */
#ifndef PF8
#define PF8 8
#endif

/* The lifted form of the dot product, where the tier gains by it: the activation is copied once
 * into fp32 times X_LIFT = 2^100 (lift_activation) and the weights widened by vec.h's
 * vload_e4m3_tiny_pairs (value * 2^-120, five integer operations for two vectors) in place of
 * vcvtph2ps: each product is then 2^-20 of the true one, a normal fp32, and every partial sum
 * carries the same power of two (exact scalings: the lifted form rounds as an F16C computation
 * adding in the same order would), unless |x| >= 2^27, where x * 2^100 would overflow: such an
 * activation takes the F16C form. The pairs put even and odd weights in separate lanes, so the
 * lifted form adds in another order than the F16C form and the two agree to rounding. On an AVX2
 * EPYC (Zen 3) the lifted GEMV (one widening a vector, session 8) ran ~1.5x the F16C one from L1
 * and the MoE call 1.3x from memory (a ymm vcvtph2ps is two operations there; the integer
 * widening runs on any vector pipe); the pairs (one widening for two vectors, session 10) ran
 * ~1.2x that from L2. The lifted scale loses partial sums below 2^-106 to fp32's subnormals
 * (2^-118 at F16C's). AVX-512 converts 16 lanes in one vcvtph2ps and keeps it.
 *
 * The lifted form makes e4m3's subnormals (exponent field 0) fp32 subnormals, and Intel cores
 * take a microcode assist for a multiply with a subnormal input where AMD's do not: on a
 * Sapphire Rapids Xeon (session 13) the AVX2 tier's MoE call read 0.4 GB/s lifted against
 * 5.6 GB/s in the F16C form on weights of which 1/12 are subnormal (the bench's random codes),
 * and 6.8 against 5.6 on weights with none. So where the tier has both forms (AVX2 with F16C),
 * which one runs is chosen at run time (dsv3_e4m3_lifted), by measuring both on weights with
 * subnormals (kernels/cpu_calibrate.py): a form that is fast on every weight. Without F16C (SSE)
 * the lifted form is the only vector form that keeps products normal, so it stays. */
#if VL <= 8
#define E4M3_LIFTED 1
#else
#define E4M3_LIFTED 0
#endif
#define X_LIFT 0x1p100f
#define X_LIFT_MAX 0x1p27f

/* whether the lifted form runs (where the tier has it): on by default; dsv3_e4m3_lifted sets it
   between calls, from the process's one thread that calls in */
static int e4m3_lifted_on = E4M3_LIFTED;

/* Sets whether the lifted form runs (on != 0), where this tier lets it be chosen (both forms
   vectorised: E4M3_LIFTED with F16C's raw form); returns the form in effect, 1 = lifted. A
   negative ``on`` only reads it. */
int dsv3_e4m3_lifted(int on) {
    if (on >= 0 && E4M3_LIFTED && !E4M3_RAW_TINY)
        e4m3_lifted_on = on != 0;
    return e4m3_lifted_on;
}

/* How a thread widens e4m3 in its vector loops: lifted (x lifted into xs, see above), raw
   (vec.h's vload_e4m3_raw against x), or not at all (the scalar loop, e4m3_to_f32): where the
   thread's FPU reads subnormal inputs as zero (denormals_flushed), the forms that make e4m3's
   subnormals fp32 subnormals -- the lifted one, and the raw one on tiers without F16C -- would
   lose them. MXCSR is per thread: each thread asks. */
enum { E4M3_SCALAR, E4M3_RAW, E4M3_LIFTED_FORM };
static inline int e4m3_form(const float *xs) {
    int flushed = denormals_flushed();
    if (E4M3_LIFTED && e4m3_lifted_on && xs && !flushed)
        return E4M3_LIFTED_FORM;
    return flushed && E4M3_RAW_TINY ? E4M3_SCALAR : E4M3_RAW;
}

/* Where the lifted activation holds x[k] (of K): in each whole group of 2 VL values, the even
   positions first, then the odd ones, the order in which vec.h's vload_e4m3_tiny_pairs widens a
   group of weights; the last group, if short, in place. Groups start at multiples of 2 VL, so
   every 128-column block is whole groups but the last. */
static inline int lifted_at(int k, int K) {
    int g = k - k % (2 * VL);
    if (g + 2 * VL > K)
        return k;
    int i = k - g;
    return g + (i & 1) * VL + i / 2;
}

/* xs[lifted_at(k)] = x[k] * X_LIFT in fp32 (x bf16, or fp32 with xf32); 1 if every |x[k]| <
   X_LIFT_MAX (a NaN passes: it makes NaN either way), else 0 (xs unusable). Whole groups are
   split as they are read (no index arithmetic a value: this runs once per call, on one thread,
   over every activation and MoE hidden value). */
static int lift_activation(int xf32, const void *x, int K, float *xs) {
    float amax = 0.0f;
    int k = 0;
    for (; k + 2 * VL <= K; k += 2 * VL)
        for (int i = 0; i < VL; i++) {
            float e = get(xf32, x, k + 2 * i), o = get(xf32, x, k + 2 * i + 1);
            float a = fabsf(e) > fabsf(o) ? fabsf(e) : fabsf(o);
            amax = a > amax ? a : amax;
            xs[k + i] = e * X_LIFT;
            xs[k + VL + i] = o * X_LIFT;
        }
    for (; k < K; k++) {                           /* the short last group, in place */
        float v = get(xf32, x, k);
        float a = fabsf(v);
        amax = a > amax ? a : amax;
        xs[k] = v * X_LIFT;
    }
    return amax < X_LIFT_MAX;
}

/* R (<= 4) e4m3 rows w (ld bytes apart, inside one 128-row block whose scales are srow) against
   one activation row x (bf16, or fp32 with xf32; in the lifted form fp32 times X_LIFT in
   lift_activation's order, see above): out[j] = sum_b srow[b] sum_{k in b} w[j][k] x[k]. A block
   whose scale * lift would overflow (no weight is that large), and every block in the scalar
   form, is summed by the scalar loop. The lifted form takes 2 VL weights a row at a time
   (vload_e4m3_tiny_pairs, two partial sums a row), then VL at a time for a short last group:
   its lanes add other weights together than the F16C form's, so the two agree to rounding, not
   bit for bit. */
static inline __attribute__((always_inline)) void dot_e4m3(int xf32, int form, int R, const uint8_t *w,
                                                           int64_t ld, const float *srow, const void *x, int K,
                                                           float *out) {
    const int lifted = form == E4M3_LIFTED_FORM;
    const float lift0 = lifted ? E4M3_TINY_LIFT / X_LIFT : E4M3_LIFT;
    vf a[4] = {vzero(), vzero(), vzero(), vzero()};
    float t[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int k0 = 0; k0 < K; k0 += 128) {
        int k1 = K - k0 < 128 ? K : k0 + 128;
        float sc = srow[k0 / 128];
        int k = k0;
        if (form != E4M3_SCALAR && sc < 0x1p127f / lift0) {
            vf b[4] = {vzero(), vzero(), vzero(), vzero()};
            if (lifted) {
                vf c[4] = {vzero(), vzero(), vzero(), vzero()};
                for (; k + 2 * VL <= k1; k += 2 * VL) {
                    vf xe = vload((const float *)x + k), xo = vload((const float *)x + k + VL);
                    if (PF8 && k % 64 == 0)
                        for (int j = 0; j < R; j++) PREFETCH(w + (PF8 + j) * ld + k);
                    for (int j = 0; j < R; j++) {
                        vf lo, hi;
                        vload_e4m3_tiny_pairs(w + j * ld + k, &lo, &hi);
                        b[j] += lo * xe;
                        c[j] += hi * xo;
                    }
                }
                for (int j = 0; j < R; j++) b[j] += c[j];
            }
            for (; k + VL <= k1; k += VL) {
                vf xv = xf32 ? vload((const float *)x + k) : vload_bf((const bf16 *)x + k);
                if (PF8 && k % 64 == 0)
                    for (int j = 0; j < R; j++) PREFETCH(w + (PF8 + j) * ld + k);
                for (int j = 0; j < R; j++)
                    b[j] += (lifted ? vload_e4m3_tiny(w + j * ld + k) : vload_e4m3_raw(w + j * ld + k)) * xv;
            }
            vf lift = vsplat(sc * lift0);
            for (int j = 0; j < R; j++) a[j] += b[j] * lift;
        }
        float tb[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (; k < k1; k++) {
            float xk = lifted ? ((const float *)x)[lifted_at(k, K)]
                              : xf32 ? ((const float *)x)[k] : bf2f(((const bf16 *)x)[k]);
            for (int j = 0; j < R; j++) tb[j] += e4m3_to_f32(w[j * ld + k]) * xk;
        }
        for (int j = 0; j < R; j++) t[j] += lifted ? (tb[j] * sc) / X_LIFT : tb[j] * sc;
    }
    for (int j = 0; j < R; j++) out[j] = vsum(a[j]) + t[j];
}

/* the rows in a thread's form (e4m3_form(xs)): against xs (fp32, lifted) in the lifted form,
   else against x (bf16, or fp32 with xf32); each case compiled with its branches folded */
static void dot_e4m3_rows(int xf32, int form, int R, const uint8_t *w, int64_t ld, const float *srow,
                          const void *x, const float *xs, int K, float *out) {
    if (E4M3_LIFTED && form == E4M3_LIFTED_FORM) {
        if (R == 4) dot_e4m3(1, E4M3_LIFTED_FORM, 4, w, ld, srow, xs, K, out);
        else dot_e4m3(1, E4M3_LIFTED_FORM, R, w, ld, srow, xs, K, out);
    } else if (form == E4M3_RAW && R == 4) {
        if (xf32) dot_e4m3(1, E4M3_RAW, 4, w, ld, srow, x, K, out);
        else dot_e4m3(0, E4M3_RAW, 4, w, ld, srow, x, K, out);
    } else {
        dot_e4m3(xf32, form, R, w, ld, srow, x, K, out);
    }
}

/* B activations (x_b = x + b * sx elements apart, K each) lifted into one new buffer, x_b's at
   b * K (free it), where the tier takes the lifted form and every x_b allows it, else NULL */
static float *lifted_copy(int xf32, const void *x, int64_t sx, int B, int K) {
    if (!E4M3_LIFTED || !e4m3_lifted_on)
        return NULL;
    float *xs = malloc(sizeof(float) * (size_t)B * K);
    for (int b = 0; xs && b < B; b++)
        if (!lift_activation(xf32, at(xf32, x, b * sx), K, xs + (int64_t)b * K)) {
            free(xs);
            xs = NULL;
        }
    return xs;
}

/* B bf16 activations (x_b = x + b * sx elements apart, K each) widened into one new fp32 buffer,
   x_b's at b * K (free it), for the F16C form (dot_e4m3 with xf32): widening a bf16 activation
   vector inside the loop takes two cross-lane shuffles and an insert for every four rows' worth
   of weights, and those share the shuffle port with vpmovsxbw and vcvtph2ps: a Sapphire Rapids
   Xeon's FP8 MoE call (Moonlight's 6 + 1 experts, 2 threads) read 13.4 GB/s against bf16
   activations and 14.0 GB/s against this copy (session 13; a GEMV on an fp32 activation, 21) */
static float *widened_copy(const bf16 *x, int64_t sx, int B, int K) {
    float *xw = malloc(sizeof(float) * (size_t)B * K);
    for (int b = 0; xw && b < B; b++)
        for (int k = 0; k < K; k++) xw[(int64_t)b * K + k] = bf2f(x[b * sx + k]);
    return xw;
}

/* B e4m3 GEMVs in one parallel loop, each against its own activation: batch b's rows r < N are
   the weight's rows b * rb + r0 + r (ldw bytes apart, scales S by that row's 128-row block, lds
   apart), its activation x_b = X + b * sx and output y_b = Y + b * sy (elements of the element
   type, or fp32 with xf32 / f32out). A head's slice of a stored matrix is a batch: W_UV is rows
   [n, n + v) of each head's n + v rows of kv_b as stored; one GEMV (Y[n] = x W^T) is B = 1 with
   rb = r0 = 0. rb and r0 multiples of 4 (four rows never straddle a 128-row block). */
static void gemv_fp8_batched(int xf32, int f32out, const uint8_t *W, int64_t ldw, int64_t rb, int64_t r0,
                             const float *S, int64_t lds, const void *X, int64_t sx, void *Y, int64_t sy, int B,
                             int N, int K, int nt) {
    float *xs = lifted_copy(xf32, X, sx, B, K);
    float *xw = !xs && !xf32 ? widened_copy((const bf16 *)X, sx, B, K) : NULL;
    int64_t groups = (N + 3) / 4;
#pragma omp parallel num_threads(nt)
    {
        int form = e4m3_form(xs);
#pragma omp for schedule(guided, 4)
        for (int64_t i = 0; i < B * groups; i++) {
            int64_t b = i / groups, r = (i % groups) * 4, row = b * rb + r0 + r;
            int rows = N - r < 4 ? (int)(N - r) : 4;
            float out[4];
            dot_e4m3_rows(xw ? 1 : xf32, form, rows, W + row * ldw, ldw, S + (row / 128) * lds,
                          xw ? (const void *)(xw + b * K) : at(xf32, X, b * sx), xs ? xs + b * K : NULL, K, out);
            for (int j = 0; j < rows; j++) put(f32out, Y, b * sy + r + j, out[j]);
        }
    }
    free(xs);
    free(xw);
}

/* x fp32 (a bf16 activation widened exactly by the caller); rnd: a bf16 model (bf16 output) */
void dsv3_gemv_fp8(const uint8_t *W, int64_t ldw, const float *S, int64_t lds, const float *x, void *Y, int rnd,
                   int N, int K, int nt) {
    gemv_fp8_batched(1, !rnd, W, ldw, 0, 0, S, lds, x, 0, Y, 0, 1, N, K, nt);
}

/* gemv_fp8_batched for the tests (x and y of the element type, fp32 with f32) */
void dsv3_gemv_fp8_batched(int f32, const uint8_t *W, int64_t ldw, int64_t rb, int64_t r0, const float *S,
                           int64_t lds, const void *X, int64_t sx, void *Y, int64_t sy, int B, int N, int K, int nt) {
    gemv_fp8_batched(f32, f32, W, ldw, rb, r0, S, lds, X, sx, Y, sy, B, N, K, nt);
}

/* out[n][k] (ldo apart) = dequant(W)[n][k] for e4m3 W [N, K] with scales S: fp32 (f32), or
   bf16 rounded to nearest even -- fp8.weight_dequant's values, for a prefill's GEMM (the torch
   conversion of e4m3 runs at ~45 M elements/s on an AVX2 EPYC). Threads over rows. */
void dsv3_dequant_fp8(const uint8_t *W, int64_t ldw, const float *S, int64_t lds, void *out, int64_t ldo, int f32,
                      int N, int K, int nt) {
#pragma omp parallel num_threads(nt)
    {
        int vec = e4m3_form(NULL) == E4M3_RAW;
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) {
            const uint8_t *w = W + n * ldw;
            const float *srow = S + (n / 128) * lds;
            for (int k0 = 0; k0 < K; k0 += 128) {
                int k1 = K - k0 < 128 ? K : k0 + 128;
                float sc = srow[k0 / 128];
                int k = k0;
                if (vec && sc < 0x1p127f / E4M3_LIFT) {
                    vf lift = vsplat(sc * E4M3_LIFT);
                    for (; k + VL <= k1; k += VL) {
                        vf v = vload_e4m3_raw(w + k) * lift;
                        if (f32) {
                            vstore((float *)out + n * ldo + k, v);
                        } else {
                            vu u;
                            v = vround_bf(v);
                            memcpy(&u, &v, sizeof u);
                            vh h = __builtin_convertvector(u >> 16, vh);
                            memcpy((bf16 *)out + n * ldo + k, &h, sizeof h);
                        }
                    }
                }
                for (; k < k1; k++) put(f32, out, n * ldo + k, e4m3_to_f32(w[k]) * sc);
            }
        }
    }
}

/* One projection of the fused step's calls: W e4m3 with scales S (contiguous, ceil(K/128) a row)
   when S is set, else a plain weight of the element type; one row x -> y, both of the element type. */
static void proj(int f32, const void *W, const float *S, const void *x, void *y, int N, int K, int nt) {
    if (S) gemv_fp8_batched(f32, f32, (const uint8_t *)W, K, 0, 0, S, (K + 127) / 128, x, 0, y, 0, 1, N, K, nt);
    else gemv_any(f32, W, K, 0, x, 0, 0, y, 0, 0, 1, 1, N, K, nt);
}

/* Rows [i, i+R) (R = 1 or 4) of one expert weight [., Kw] against x: e4m3 with its scales when
   sc (the weight's weight_scale_inv, contiguous) is set (xs: x lifted, or NULL), else of the
   element type (xsplit: a bf16 x split by split_bf16, or NULL). xw: x widened to fp32 for the F16C
   form (widened_copy), or NULL: the e4m3 rows then read it instead of x. */
static inline void expert_rows(int f32, const void *w, const float *sc, int64_t i, int R, const void *x,
                               const float *xw, int form, const float *xs, const float *xsplit, int Kw, float *o) {
    if (sc)
        dot_e4m3_rows(xw ? 1 : f32, form, R, (const uint8_t *)w + i * Kw, Kw, sc + (i / 128) * ((Kw + 127) / 128),
                      xw ? (const void *)xw : x, xs, Kw, o);
    else if (R == 4) dot4_any(f32, at(f32, w, i * Kw), Kw, x, xsplit, Kw, o);
    else dot_rows_any(f32, at(f32, w, i * Kw), x, 0, 1, Kw, o);
}

/* One token's MoE: nslot experts (routed and shared alike), expert s with gate/up weights
   g[s], u[s] [I_s, K] and down weight d[s] [K, I_s] (row-major, contiguous), weight ws[s];
   gs/us/ds (or NULL) hold each weight's FP8 scales (weight_scale_inv, contiguous), 0 for a
   weight of the element type: an expert kept FP8 is read as stored, one byte a weight, each
   block's scale applied to its partial sums (see dot_e4m3).
   h (scratch, sum I_s values of the element type) holds silu(gate x) * up x per expert, rounded
   as torch rounds in bf16 (each projection's output, silu's output, the product; nothing in
   fp32); y[n] = sum_s ws[s] * down_s(h_s)[n] in fp32 (each expert's output rounded to bf16
   first in bf16). Two parallel loops: every expert's intermediate rows, then every output row
   across all experts. */
static void moe_any(int f32, const void *x, int K, int nslot, const int64_t *g, const int64_t *u, const int64_t *d,
                    const int64_t *gs, const int64_t *us, const int64_t *ds, const int *inter, const float *ws,
                    void *h, float *y, int nt) {
    int64_t off[65];
    off[0] = 0;
    for (int s = 0; s < nslot && s < 64; s++) off[s + 1] = off[s] + inter[s];
    int64_t total = off[nslot];
    int by4 = K % 4 == 0;
    for (int s = 0; s < nslot; s++) by4 &= inter[s] % 4 == 0;
    int64_t step = by4 ? 4 : 1;      /* rows per work item: four (dot4) when every width allows */
#define SC(arr, s) ((arr) && (arr)[s] ? (const float *)(arr)[s] : (const float *)0)
    /* FP8 experts take the lifted dot product (dot_e4m3) where the tier does: x lifted once, and
       h once every expert's rows are in it (hl), each used where its values allow */
    int any_fp8 = 0;
    for (int s = 0; s < nslot; s++) any_fp8 |= SC(gs, s) || SC(us, s) || SC(ds, s);
    float *xs = any_fp8 ? lifted_copy(f32, x, 0, 1, K) : NULL;
    float *hs = any_fp8 && E4M3_LIFTED && e4m3_lifted_on ? malloc(sizeof(float) * (size_t)(total > 0 ? total : 1)) : NULL;
    const float *hl = NULL;
    /* in the F16C form bf16 x and h are widened once (widened_copy), h's values after the first loop */
    float *xw = any_fp8 && !f32 && !xs ? widened_copy((const bf16 *)x, 0, 1, K) : NULL;
    float *hw = NULL;
    /* bf16 experts take dot4_split: x split once, h once every expert's rows are in it (each
       expert's values from its own off[s], where its rows' dot products start) */
    int any_bf16 = 0;
    for (int s = 0; s < nslot; s++) any_bf16 |= !(SC(gs, s) && SC(us, s) && SC(ds, s));
    int split = !f32 && BF16_SPLIT && any_bf16 && step == 4;
    float *xb = split ? malloc(sizeof(float) * (size_t)K) : NULL;
    float *hb = split ? malloc(sizeof(float) * (size_t)(total > 0 ? total : 1)) : NULL;
    if (xb) split_bf16((const bf16 *)x, K, xb);
#pragma omp parallel num_threads(nt)
    {
        int xform = e4m3_form(xs);
#pragma omp for schedule(guided, 4)
        for (int64_t r = 0; r < total; r += step) {
            int s = 0;
            while (r >= off[s + 1]) s++;
            int64_t i = r - off[s];
            float gv[4], uv[4];
            expert_rows(f32, (const void *)g[s], SC(gs, s), i, (int)step, x, xw, xform, xs, xb, K, gv);
            expert_rows(f32, (const void *)u[s], SC(us, s), i, (int)step, x, xw, xform, xs, xb, K, uv);
            for (int j = 0; j < step; j++) {
                float ga = stored(f32, gv[j]), ua = stored(f32, uv[j]);
                float act = stored(f32, ga / (1.0f + expf(-ga)));
                put(f32, h, r + j, act * ua);
            }
        }
#pragma omp single
        {   /* a few thousand values; each expert's own in its own groups (its dot product starts at off[s]) */
            int ok = hs != NULL;
            for (int s = 0; ok && s < nslot; s++) ok = lift_activation(f32, at(f32, h, off[s]), inter[s], hs + off[s]);
            hl = ok ? hs : NULL;
            if (any_fp8 && !f32 && !hl && total > 0) hw = widened_copy((const bf16 *)h, 0, 1, (int)total);
            for (int s = 0; hb && s < nslot; s++) split_bf16((const bf16 *)h + off[s], inter[s], hb + off[s]);
        }
        int hform = e4m3_form(hl);
#pragma omp for schedule(guided, 4)
        for (int n = 0; n < K; n += (int)step) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int s = 0; s < nslot; s++) {
                float o[4];
                expert_rows(f32, (const void *)d[s], SC(ds, s), n, (int)step, at(f32, h, off[s]),
                            hw ? hw + off[s] : NULL, hform, hl ? hl + off[s] : NULL, hb ? hb + off[s] : NULL,
                            inter[s], o);
                for (int j = 0; j < step; j++) acc[j] += ws[s] * stored(f32, o[j]);
            }
            for (int j = 0; j < step; j++) y[n + j] = acc[j];
        }
    }
    free(xs);
    free(hs);
    free(xw);
    free(hw);
    free(xb);
    free(hb);
#undef SC
}

void dsv3_moe(const bf16 *x, int K, int nslot, const int64_t *g, const int64_t *u, const int64_t *d,
              const int *inter, const float *ws, bf16 *h, float *y, int nt) {
    moe_any(0, x, K, nslot, g, u, d, NULL, NULL, NULL, inter, ws, h, y, nt);
}

void dsv3_moe_f32(const float *x, int K, int nslot, const int64_t *g, const int64_t *u, const int64_t *d,
                  const int *inter, const float *ws, float *h, float *y, int nt) {
    moe_any(1, x, K, nslot, g, u, d, NULL, NULL, NULL, inter, ws, h, y, nt);
}

/* The same with each expert of the element type or kept FP8 (gs/us/ds as moe_any's), bf16 or fp32 (f32). */
void dsv3_moe_mixed(int f32, const void *x, int K, int nslot, const int64_t *g, const int64_t *u, const int64_t *d,
                  const int64_t *gs, const int64_t *us, const int64_t *ds, const int *inter, const float *ws, void *h,
                  float *y, int nt) {
    moe_any(f32, x, K, nslot, g, u, d, gs, us, ds, inter, ws, h, y, nt);
}

/* RMSNorm of M rows x[m] (D wide, ldx apart) as the torch module computes it: in fp32,
   x / sqrt(mean(x^2) + eps) (rounded to bf16 in bf16), times the weight (rounded again). One
   row is a few kilobytes: no threads. */
static void rmsnorm_any(int f32, const void *x, int64_t ldx, const void *w, float eps, void *y, int64_t ldy,
                        int M, int D) {
    for (int m = 0; m < M; m++) {
        float ss = 0.0f;
        for (int i = 0; i < D; i++) { float v = get(f32, x, m * ldx + i); ss += v * v; }
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int i = 0; i < D; i++)
            put(f32, y, m * ldy + i, get(f32, w, i) * stored(f32, get(f32, x, m * ldx + i) * inv));
    }
}

void dsv3_rmsnorm(const bf16 *x, int64_t ldx, const bf16 *w, float eps, bf16 *y, int64_t ldy, int M, int D) {
    rmsnorm_any(0, x, ldx, w, eps, y, ldy, M, D);
}

void dsv3_rmsnorm_f32(const float *x, int64_t ldx, const float *w, float eps, float *y, int64_t ldy, int M, int D) {
    rmsnorm_any(1, x, ldx, w, eps, y, ldy, M, D);
}

/* RoPE on M rows of d values (ldx apart; one position, so one cos/sin row of d/2 values):
   interleaved pairs (2i, 2i+1) rotated in fp32, (x0 cos - x1 sin, x1 cos + x0 sin), stored
   (rounded to bf16 in bf16) into y (ldy apart). */
static void rope_any(int f32, const void *x, int64_t ldx, const float *cs, const float *sn, void *y, int64_t ldy,
                     int M, int d) {
    for (int m = 0; m < M; m++) {
        for (int i = 0; i < d / 2; i++) {
            float x0 = get(f32, x, m * ldx + 2 * i), x1 = get(f32, x, m * ldx + 2 * i + 1);
            put(f32, y, m * ldy + 2 * i, x0 * cs[i] - x1 * sn[i]);
            put(f32, y, m * ldy + 2 * i + 1, x1 * cs[i] + x0 * sn[i]);
        }
    }
}

void dsv3_rope(const bf16 *x, int64_t ldx, const float *cs, const float *sn, bf16 *y, int64_t ldy, int M, int d) {
    rope_any(0, x, ldx, cs, sn, y, ldy, M, d);
}

void dsv3_rope_f32(const float *x, int64_t ldx, const float *cs, const float *sn, float *y, int64_t ldy, int M, int d) {
    rope_any(1, x, ldx, cs, sn, y, ldy, M, d);
}

/* DeepSeek-V3's expert selection for T tokens from their scores s [T, E] (sigmoid of the router
   logits, fp32): s + bias chooses (bias may be NULL), the unbiased s weighs. With G groups of
   E/G experts and topk_group < G, a group scores the sum of its two best biased scores (its best
   one when there is no bias: V2's group-limited greedy) and only the topk_group best groups
   compete; then the k best experts, in descending order (ties: the lower index), and their
   weights s / (sum s + 1e-20) (norm) times scale. Exact arithmetic but the last sum: the same
   choice as the torch gate. */
void dsv3_route(const float *s, const float *bias, int T, int E, int G, int topk_group, int k, int norm,
                float scale, int64_t *ids, float *w) {
    float choice[1024];
    float gscore[256];
    int keep[256];
    int per = E / G;
    for (int t = 0; t < T; t++) {
        const float *st = s + (int64_t)t * E;
        for (int e = 0; e < E; e++) choice[e] = st[e] + (bias ? bias[e] : 0.0f);
        if (G > 1 && topk_group < G) {
            for (int g = 0; g < G; g++) {
                float b1 = -INFINITY, b2 = -INFINITY;
                for (int e = g * per; e < (g + 1) * per; e++) {
                    float v = choice[e];
                    if (v > b1) { b2 = b1; b1 = v; } else if (v > b2) b2 = v;
                }
                gscore[g] = bias ? b1 + b2 : b1;
                keep[g] = 0;
            }
            for (int n = 0; n < topk_group; n++) {
                int best = -1;
                for (int g = 0; g < G; g++)
                    if (!keep[g] && (best < 0 || gscore[g] > gscore[best])) best = g;
                keep[best] = 1;
            }
            for (int g = 0; g < G; g++)
                if (!keep[g])
                    for (int e = g * per; e < (g + 1) * per; e++) choice[e] = -INFINITY;
        }
        float sum = 0.0f;
        for (int j = 0; j < k; j++) {
            int best = -1;
            for (int e = 0; e < E; e++)
                if (choice[e] > -INFINITY && (best < 0 || choice[e] > choice[best])) best = e;
            if (best < 0) best = 0;
            ids[(int64_t)t * k + j] = best;
            w[(int64_t)t * k + j] = st[best];
            sum += st[best];
            choice[best] = -INFINITY;
        }
        for (int j = 0; j < k; j++) {
            float v = w[(int64_t)t * k + j];
            if (norm && k > 1) v = v / (sum + 1e-20f);
            w[(int64_t)t * k + j] = v * scale;
        }
    }
}

/* V3.2's index scores of one query against every cached indexer key: out[t] = sum_h w[h] *
   relu(bf16(q[h] . key[t])), fp32 (the dot rounded to bf16 as the torch scorer's bf16 product
   is). H query rows (D wide, contiguous) eight at a time against each key row (ldk apart),
   which is read once; the keys split over the threads. */
void dsv3_index_scores(const bf16 *keys, int64_t ldk, const bf16 *q, const float *w, float *out, int T, int H,
                       int D, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int t = 0; t < T; t++) {
        const bf16 *kr = keys + (int64_t)t * ldk;
        if (t + 8 < T) PREFETCH(kr + 8 * ldk);
        float acc = 0.0f;
        for (int h0 = 0; h0 < H; h0 += MAXM) {
            int m = H - h0 < MAXM ? H - h0 : MAXM;
            float s[MAXM];
            dot_rows(kr, q + (int64_t)h0 * D, D, m, D, s);
            for (int j = 0; j < m; j++) {
                float v = round_bf(s[j]);
                acc += w[h0 + j] * (v > 0.0f ? v : 0.0f);
            }
        }
        out[t] = acc;
    }
}

/* ---- attention of one fp32 query token over the latent cache (absorbed MLA decode) ----------
 *
 * MLA's decode in the latent space is multi-query attention with one key/value head: the H query
 * rows q[h] = [q_nope W_UK ; q_pe] (D = c + r wide) all attend to the same cache rows
 * [c_kv ; k_pe], whose first c values are also the values. Per head: o[h] = softmax(scale *
 * q[h] . K^T) V over the T rows. Every cache row is read from memory once for all H heads, in
 * blocks of ATT_BLK rows whose scores stay in cache (an online softmax over blocks, as flash
 * attention does); the rows split over the threads, each thread's partial (max, sum, unnormalised
 * output) merged by log-sum-exp at the end (flash decoding). Rows are ``lat + row * ld`` for
 * row = t, or row = idx[t] (V3.2: only the indexer's selection, read in place).
 *
 * A block's rows are first copied as fp32 (bf16 rows widened) into a buffer whose row stride is an
 * odd number of cache lines; both products are then GEMM tiles of outer products, with no
 * horizontal sums:
 *   scores  s[j][h] = scale * sum_k row_j[k] q[h][k], the query transposed once a call into
 *           qt[k][h] (its heads padded with zero rows to Hp, a multiple of 16): a k step of a
 *           tile is ATT_TR broadcast row values times the vectors of 16 heads;
 *   values  o[h][:] += sum_j p[j][h] row_j[:c]: VAL_H broadcast probabilities times VAL_V
 *           vectors of columns, column chunks outer so that a chunk's rows (ATT_BLK x VAL_V
 *           vectors) stay in L1 for every group of heads.
 * The online softmax runs across heads in vector lanes (the scores are laid out [row][head]).
 * The previous form (dot products of 4 rows x 4 heads closed by a horizontal-sum tree, the values'
 * heads outer) ran at ~43 % of one core's FMA peak with every operand in cache on a 2-core AVX2
 * EPYC (Zen 3), this one at ~58 % (docs/performance.md, session 12). Which of this kernel and
 * torch's flash attention runs is measured per CPU (kernels/cpu_calibrate.py). */

#define ATT_BLK 128             /* rows a block: their scores, 128 x Hp fp32, 8 KB at 16 heads */
/* Tiles of 12 accumulators (16 registers on AVX2 and SSE; 16 with AVX-512's 32): a scores
   tile is ATT_TR rows x the 16 heads of 16 / VL vectors, so it takes ATT_TR broadcasts and 16 / VL
   query loads a k step; a values tile is VAL_H heads x VAL_V vectors of columns. SSE has neither
   FMAs nor broadcast loads (a broadcast is a load and a shuffle), so its values tile keeps 2 heads
   x 4 vectors, one broadcast for 4 vectors. */
#define ATT_TR (3 * VL / 4)
#define ATT_TR_MAX 12           /* the most rows a scores tile (the block buffer's spare rows) */
#define VAL_H (VL == 4 ? 2 : 4)
#define VAL_V (VL == 8 ? 3 : 4)
#define ATT_HP(H) (((H) + 15) / 16 * 16)     /* heads padded: a whole number of tiles */

/* the block buffer's row stride: an odd number of 64-byte lines, so that a tile's rows fall in
   different L1 sets (576 floats, 36 lines, put every 16th row in the same set) */
static inline int64_t att_ld(int D) {
    int64_t lines = (D + 15) / 16;
    return (lines % 2 ? lines : lines + 1) * 16;
}

/* TR rows of the block buffer (LC apart) against HV vectors of heads, from head vector hv0:
   st[i][h] = scale * row_i . q[h]. TR, HV are constants where it is inlined; acc (TR x HV <= 12)
   stays in registers. Rows past the block (i >= nr) are computed from the buffer's spare rows and
   not stored. */
static inline __attribute__((always_inline)) void scores_tile(int TR, int HV, const float *r, int64_t LC, int nr,
                                                                const float *qt, int Hp, int hv0, int D, float scale,
                                                                float *st) {
    vf acc[ATT_TR_MAX][4];
    for (int i = 0; i < TR; i++)
        for (int u = 0; u < HV; u++) acc[i][u] = vzero();
    const float *q = qt + hv0 * VL;
    for (int k = 0; k < D; k++) {
        vf qv[4];
        for (int u = 0; u < HV; u++) {
            qv[u] = vload(q + (int64_t)k * Hp + u * VL);
            VREG(qv[u]);
        }
        for (int i = 0; i < TR; i++) {
            vf x = vsplat(r[i * LC + k]);
            for (int u = 0; u < HV; u++) acc[i][u] += x * qv[u];
        }
    }
    for (int i = 0; i < TR && i < nr; i++)
        for (int u = 0; u < HV; u++) vstore(st + (int64_t)i * Hp + (hv0 + u) * VL, acc[i][u] * scale);
}

/* o[h0 + i][i0 + u VL ...] += sum_j p[j][h0 + i] row_j[i0 + u VL ...], AH heads x UV vectors (both
   constants where it is inlined; AH x UV accumulators in registers) over the block's nb rows */
static inline __attribute__((always_inline)) void values_tile(int AH, int UV, const float *rb, int64_t LC, int nb,
                                                                const float *st, int Hp, int h0, float *o, int c,
                                                                int i0) {
    vf acc[4][4];
    for (int i = 0; i < AH; i++)
        for (int u = 0; u < UV; u++) acc[i][u] = vload(o + (int64_t)(h0 + i) * c + i0 + VL * u);
    for (int j = 0; j < nb; j++) {
        const float *rw = rb + j * LC + i0;
        vf v[4];
        for (int u = 0; u < UV; u++) {
            v[u] = vload(rw + VL * u);
            VREG(v[u]);
        }
        for (int i = 0; i < AH; i++) {
            vf p = vsplat(st[(int64_t)j * Hp + h0 + i]);
            for (int u = 0; u < UV; u++) acc[i][u] += p * v[u];
        }
    }
    for (int i = 0; i < AH; i++)
        for (int u = 0; u < UV; u++) vstore(o + (int64_t)(h0 + i) * c + i0 + VL * u, acc[i][u]);
}

static inline const void *row_at(int bf, const void *lat, int64_t ld, const int64_t *idx, int64_t t) {
    return (const char *)lat + (idx ? idx[t] : t) * ld * (bf ? 2 : 4);
}

/* One thread's part: rows [t0, t1) -> m[h], l[h], o[h][c] (unnormalised). a: Hp rescale factors,
   st: ATT_BLK x Hp scores, rb: (ATT_BLK + ATT_TR_MAX) x att_ld(D) rows. */
static void attn_part(int bf, const void *lat, int64_t ld, const int64_t *idx, int64_t t0, int64_t t1,
                      const float *qt, int H, int D, int c, float scale, float *m, float *l, float *a, float *o,
                      float *st, float *rb) {
    int Hp = ATT_HP(H), nv = Hp / VL;
    int64_t LC = att_ld(D);
    for (int h = 0; h < Hp; h++) { m[h] = -INFINITY; l[h] = 0.0f; }
    memset(o, 0, sizeof(float) * (size_t)H * c);
    for (int64_t b0 = t0; b0 < t1; b0 += ATT_BLK) {
        int nb = (int)(t1 - b0 < ATT_BLK ? t1 - b0 : ATT_BLK);
        /* the block's rows as fp32, the next rows prefetched (V3.2's selection is in any order) */
        for (int j = 0; j < nb; j++) {
            if (j + 4 < nb) {
                const char *p = (const char *)row_at(bf, lat, ld, idx, b0 + j + 4);
                for (int64_t byte = 0; byte < (int64_t)D * (bf ? 2 : 4); byte += 64) PREFETCH(p + byte);
            }
            const void *src = row_at(bf, lat, ld, idx, b0 + j);
            float *d = rb + j * LC;
            int k = 0;
            if (bf) {
                for (; k + VL <= D; k += VL) vstore(d + k, vload_bf((const bf16 *)src + k));
                for (; k < D; k++) d[k] = bf2f(((const bf16 *)src)[k]);
            } else {
                memcpy(d, src, sizeof(float) * (size_t)D);
            }
        }
        /* scores: tiles of ATT_TR rows x 16 heads */
        for (int j0 = 0; j0 < nb; j0 += ATT_TR)
            for (int hv = 0; hv < nv; hv += 16 / VL)
                scores_tile(ATT_TR, 16 / VL, rb + j0 * LC, LC, nb - j0, qt, Hp, hv, D, scale, st + j0 * Hp);
        /* online softmax across the heads' lanes: the new running max, the factor a that rescales
           what is accumulated, p in place of s */
        for (int v = 0; v < nv; v++) {
            float *sv = st + v * VL;
            vf bm = vload(sv);
            for (int j = 1; j < nb; j++) bm = vmax(bm, vload(sv + (int64_t)j * Hp));
            vf mo = vload(m + v * VL), mn = vmax(bm, mo), sum = vzero();
            for (int j = 0; j < nb; j++) {
                vf p = vexp_neg(vload(sv + (int64_t)j * Hp) - mn);
                vstore(sv + (int64_t)j * Hp, p);
                sum += p;
            }
            vf f = vexp_neg(mo - mn);              /* e^-87 against a first block's -inf: l, o are 0 */
            vstore(a + v * VL, f);
            vstore(l + v * VL, vload(l + v * VL) * f + sum);
            vstore(m + v * VL, mn);
        }
        for (int h = 0; h < H; h++)
            if (a[h] != 1.0f)
                for (int i = 0; i < c; i++) o[(int64_t)h * c + i] *= a[h];
        /* values: VAL_H heads x VAL_V vectors of columns a tile, column chunks outer; then VAL_H x 1 */
        int i0 = 0;
        for (; i0 + VAL_V * VL <= c; i0 += VAL_V * VL)
            for (int h0 = 0; h0 < H; h0 += VAL_H) values_tile(VAL_H, VAL_V, rb, LC, nb, st, Hp, h0, o, c, i0);
        for (; i0 + VL <= c; i0 += VL)
            for (int h0 = 0; h0 < H; h0 += VAL_H) values_tile(VAL_H, 1, rb, LC, nb, st, Hp, h0, o, c, i0);
        for (int h = 0; h < H; h++)
            for (int j = 0; j < nb; j++) {
                float p = st[(int64_t)j * Hp + h];
                for (int i = i0; i < c; i++) o[(int64_t)h * c + i] += p * rb[j * LC + i];
            }
    }
}

/* out[h][:c] (ldo apart) = softmax_t(scale q[h] . row_t) row_t[:c] over T rows (see above): rows
   bf16 (bf) or fp32, q fp32 H x D contiguous, H a multiple of 4, out bf16 (rounded once) with bf,
   fp32 without. work: the floats cpu_decode.attention_work counts, D * Hp (the transposed query)
   + nt * (3 Hp + H c + ATT_BLK Hp + (ATT_BLK + ATT_TR_MAX) (D + 32)). */
void dsv3_latent_attn(int bf, const void *lat, int64_t ld, const int64_t *idx, int64_t T, const float *q, int H,
                      int D, int c, float scale, void *out, int64_t ldo, float *work, int nt) {
    if (nt > T / 256) nt = T / 256 > 1 ? (int)(T / 256) : 1;        /* a piece is worth a thread */
    if (nt > 64) nt = 64;                                            /* the merge's weights */
    int Hp = ATT_HP(H);
    float *qt = work;
    int64_t per_thread = 3 * (int64_t)Hp + (int64_t)H * c + (int64_t)ATT_BLK * Hp +
                         (int64_t)(ATT_BLK + ATT_TR_MAX) * (D + 32);
    float *parts = work + (int64_t)D * Hp;
#pragma omp parallel num_threads(nt)
    {
        int id = omp_get_thread_num(), n = omp_get_num_threads();
#pragma omp for schedule(static)
        for (int k = 0; k < D; k++)
            for (int h = 0; h < Hp; h++) qt[(int64_t)k * Hp + h] = h < H ? q[(int64_t)h * D + k] : 0.0f;
        float *w = parts + id * per_thread;
        int64_t t0 = T * id / n, t1 = T * (id + 1) / n;
        float *o = w + 3 * Hp, *st = o + (int64_t)H * c;
        attn_part(bf, lat, ld, idx, t0, t1, qt, H, D, c, scale, w, w + Hp, w + 2 * Hp, o, st,
                  st + (int64_t)ATT_BLK * Hp);
#pragma omp barrier
#pragma omp for schedule(static)
        for (int h = 0; h < H; h++) {
            float mx = -INFINITY, den = 0.0f, wt[64];
            for (int p = 0; p < n; p++) { float mp = parts[p * per_thread + h]; mx = mp > mx ? mp : mx; }
            for (int p = 0; p < n; p++) {
                float mp = parts[p * per_thread + h];
                wt[p] = mp == -INFINITY ? 0.0f : expf(mp - mx);
                den += wt[p] * parts[p * per_thread + Hp + h];
            }
            for (int i = 0; i < c; i++) {
                float acc = 0.0f;
                for (int p = 0; p < n; p++) acc += wt[p] * parts[p * per_thread + 3 * Hp + (int64_t)h * c + i];
                put(!bf, out, (int64_t)h * ldo + i, acc / den);
            }
        }
    }
}

void dsv3_latent_attn_f32(const float *lat, int64_t ld, const int64_t *idx, int64_t T, const float *q, int H, int D,
                          int c, float scale, float *out, int64_t ldo, float *work, int nt) {
    dsv3_latent_attn(0, lat, ld, idx, T, q, H, D, c, scale, out, ldo, work, nt);
}

/* ---- one layer of a decode token in two calls (dsv3lab/fast/step.py) -------------------------
 *
 * The fused decode step calls the kernels above some fifteen times per layer from Python; each
 * ctypes call converts its arguments one by one, which costs several microseconds, and far more
 * once the weights streamed since the last call have evicted the interpreter's data. These two
 * run a layer's sequence around the attention as one call each, their pointers and sizes in one
 * int64 array the plan fills once (and a few slots per step), with the same kernels and roundings
 * as the separate calls. Element type: bf16, or fp32 when f32. */

enum {  /* dsv3_mla_in's slots */
    IN_X, IN_NORM_W, IN_H, IN_QA_W, IN_QA, IN_QA_NORM_W, IN_QA_N, IN_QB_W, IN_Q, IN_KVA_W, IN_KV, IN_KV_NORM_W,
    IN_ROW, IN_COS, IN_SIN, IN_WUK, IN_QCAT, IN_D, IN_QLR, IN_H_HEADS, IN_NOPE, IN_ROPE, IN_C,
    IN_QA_S, IN_QB_S, IN_KVA_S,                /* _S: an FP8 weight's scales (0: a weight of the element type) */
    IN_Q32,                                    /* (or 0) q_cat again in fp32, the C attention's query */
    IN_WUK_S,                                  /* (or 0) W_UK^T e4m3 [H, c, n]: its scales [H c / 128, n / 128] */
    IN_NSLOTS
};

/* h = norm(x); q = q_b(norm(q_a h)) (or q_proj h); kv = kv_a h; the cache row gets [norm(kv[:c]) ;
   rope(kv[c:])]; q_cat[h] = [q_nope[h] W_UK^T[h] ; rope(q_pe[h])] (and its fp32 copy with Q32 set).
   eps: the three norms' eps. The projections q_a, q_b (q_proj) and kv_a may be e4m3 with scales
   (proj). */
void dsv3_mla_in(int f32, const int64_t *a, const float *eps, int nt) {
    size_t es = f32 ? 4 : 2;
    int64_t D = a[IN_D], qlr = a[IN_QLR], H = a[IN_H_HEADS], n = a[IN_NOPE], r = a[IN_ROPE], c = a[IN_C];
    char *q = (char *)a[IN_Q], *kv = (char *)a[IN_KV], *row = (char *)a[IN_ROW], *qcat = (char *)a[IN_QCAT];
    const float *cs = (const float *)a[IN_COS], *sn = (const float *)a[IN_SIN];
    rmsnorm_any(f32, (const void *)a[IN_X], 0, (const void *)a[IN_NORM_W], eps[0], (void *)a[IN_H], 0, 1, (int)D);
    if (qlr) {
        proj(f32, (const void *)a[IN_QA_W], (const float *)a[IN_QA_S], (const void *)a[IN_H], (void *)a[IN_QA],
             (int)qlr, (int)D, nt);
        rmsnorm_any(f32, (const void *)a[IN_QA], 0, (const void *)a[IN_QA_NORM_W], eps[1], (void *)a[IN_QA_N], 0, 1,
                    (int)qlr);
        proj(f32, (const void *)a[IN_QB_W], (const float *)a[IN_QB_S], (const void *)a[IN_QA_N], q,
             (int)(H * (n + r)), (int)qlr, nt);
    } else {
        proj(f32, (const void *)a[IN_QB_W], (const float *)a[IN_QB_S], (const void *)a[IN_H], q, (int)(H * (n + r)),
             (int)D, nt);
    }
    proj(f32, (const void *)a[IN_KVA_W], (const float *)a[IN_KVA_S], (const void *)a[IN_H], kv, (int)(c + r), (int)D,
         nt);
    rmsnorm_any(f32, kv, 0, (const void *)a[IN_KV_NORM_W], eps[2], row, 0, 1, (int)c);     /* c_kv */
    rope_any(f32, kv + c * es, 0, cs, sn, row + c * es, 0, 1, (int)r);                      /* k_pe */
    rope_any(f32, q + n * es, n + r, cs, sn, qcat + c * es, c + r, (int)H, (int)r);         /* q_pe */
    const void *wuk = (const void *)a[IN_WUK];                                              /* [H, c, n] */
    if (a[IN_WUK_S])                                                     /* q_lat, e4m3 as stored */
        gemv_fp8_batched(f32, f32, (const uint8_t *)wuk, n, c, 0, (const float *)a[IN_WUK_S], (n + 127) / 128, q,
                         n + r, qcat, c + r, (int)H, (int)c, (int)n, nt);
    else
        gemv_any(f32, wuk, n, c * n, q, 0, n + r, qcat, 0, c + r, (int)H, 1, (int)c, (int)n, nt);  /* q_lat */
    float *q32 = (float *)a[IN_Q32];
    for (int64_t i = 0; q32 && i < H * (c + r); i++) q32[i] = get(f32, qcat, i);
}

enum {  /* dsv3_mla_out's slots */
    OUT_OLAT, OUT_OLAT_LD, OUT_WUV, OUT_O, OUT_OPROJ_W, OUT_A, OUT_X, OUT_NORM_W, OUT_H2, OUT_GATE_W, OUT_BIAS,
    OUT_SCORES, OUT_X32, OUT_IDS, OUT_WEIGHTS, OUT_D, OUT_H_HEADS, OUT_V, OUT_C, OUT_E, OUT_GROUPS, OUT_TOPK_GROUP,
    OUT_K, OUT_NORM_TOPK, OUT_OPROJ_S,
    OUT_SOFTMAX,                               /* the router's scores: softmax (V2, V2-Lite), else sigmoid */
    OUT_WUV_S, OUT_NOPE,                       /* (or 0) WUV is kv_b as stored, e4m3 [H (n + v), c]: its scales */
    OUT_NSLOTS
};

/* o[h] = W_UV[h] o_lat[h] (W_UV bf16 / fp32 [H, v, c], or kv_b's e4m3 rows as stored with WUV_S);
   x += o_proj o (o_proj e4m3 with OPROJ_S set; rounded as the module's
   residual add); h2 = norm(x);
   then, with a gate weight (fp32 [E, D]), the gate: scores = sigmoid(h2 W^T) (softmax with
   SOFTMAX set) in fp32 and the expert choice (dsv3_route) into ids / weights. f: post-norm eps,
   routed scaling factor. */
void dsv3_mla_out(int f32, const int64_t *a, const float *f, int nt) {
    int64_t D = a[OUT_D], H = a[OUT_H_HEADS], v = a[OUT_V], c = a[OUT_C];
    void *x = (void *)a[OUT_X], *att = (void *)a[OUT_A];
    if (a[OUT_WUV_S])           /* each head's rows [n, n + v) of kv_b */
        gemv_fp8_batched(f32, f32, (const uint8_t *)a[OUT_WUV], c, a[OUT_NOPE] + v, a[OUT_NOPE],
                         (const float *)a[OUT_WUV_S], (c + 127) / 128, (const void *)a[OUT_OLAT], a[OUT_OLAT_LD],
                         (void *)a[OUT_O], v, (int)H, (int)v, (int)c, nt);
    else
        gemv_any(f32, (const void *)a[OUT_WUV], c, v * c, (const void *)a[OUT_OLAT], 0, a[OUT_OLAT_LD],
                 (void *)a[OUT_O], 0, v, (int)H, 1, (int)v, (int)c, nt);
    proj(f32, (const void *)a[OUT_OPROJ_W], (const float *)a[OUT_OPROJ_S], (const void *)a[OUT_O], att, (int)D,
         (int)(H * v), nt);
    for (int64_t i = 0; i < D; i++) put(f32, x, i, get(f32, x, i) + get(f32, att, i));
    rmsnorm_any(f32, x, 0, (const void *)a[OUT_NORM_W], f[0], (void *)a[OUT_H2], 0, 1, (int)D);
    if (!a[OUT_GATE_W]) return;
    float *x32 = (float *)a[OUT_X32], *scores = (float *)a[OUT_SCORES];
    for (int64_t i = 0; i < D; i++) x32[i] = get(f32, (const void *)a[OUT_H2], i);
    int E = (int)a[OUT_E];
    gemv_any(1, (const void *)a[OUT_GATE_W], D, 0, x32, 0, 0, scores, 0, 0, 1, 1, E, (int)D, nt);
    if (a[OUT_SOFTMAX]) {
        float mx = -INFINITY, sum = 0.0f;
        for (int e = 0; e < E; e++) mx = scores[e] > mx ? scores[e] : mx;
        for (int e = 0; e < E; e++) sum += scores[e] = expf(scores[e] - mx);
        float inv = 1.0f / sum;                       /* as torch's softmax: a product with 1 / sum */
        for (int e = 0; e < E; e++) scores[e] *= inv;
    } else {
        for (int e = 0; e < E; e++) scores[e] = 1.0f / (1.0f + expf(-scores[e]));
    }
    dsv3_route(scores, (const float *)a[OUT_BIAS], 1, E, (int)a[OUT_GROUPS], (int)a[OUT_TOPK_GROUP], (int)a[OUT_K],
               (int)a[OUT_NORM_TOPK], f[1], (int64_t *)a[OUT_IDS], (float *)a[OUT_WEIGHTS]);
}

enum {  /* dsv3_moe_routed's slots */
    MOE_X, MOE_K, MOE_NK, MOE_IDS, MOE_WEIGHTS, MOE_G, MOE_U, MOE_D, MOE_GS, MOE_US, MOE_DS, MOE_INTER,
    MOE_SHARED, MOE_H, MOE_Y, MOE_RESID, MOE_NSLOTS
};

/* One MoE layer of the fused step after dsv3_mla_out chose its experts: the NK experts ids[j]
   (weights[j]) and, with SHARED >= 0, the table's entry SHARED (weight 1) through moe_any, from
   tables over every expert (G, U, D: int64 weight pointers; GS, US, DS: their FP8 scales or 0;
   INTER: int32 widths); then RESID[i] += y[i] rounded as the module's residual add (y to the
   element type first). The caller has checked the chosen experts' references. */
void dsv3_moe_routed(int f32, const int64_t *a, int nt) {
    const int64_t *ids = (const int64_t *)a[MOE_IDS];
    const int64_t *tg = (const int64_t *)a[MOE_G], *tu = (const int64_t *)a[MOE_U], *td = (const int64_t *)a[MOE_D];
    const int64_t *tgs = (const int64_t *)a[MOE_GS], *tus = (const int64_t *)a[MOE_US];
    const int64_t *tds = (const int64_t *)a[MOE_DS];
    const int *tin = (const int *)a[MOE_INTER];
    const float *w = (const float *)a[MOE_WEIGHTS];
    int nk = (int)a[MOE_NK], K = (int)a[MOE_K], ns = 0;
    int64_t g[65], u[65], d[65], gs[65], us[65], ds[65];
    int inter[65];
    float ws[65];
    for (int j = 0; j <= nk && ns < 64; j++) {
        int64_t e = j < nk ? ids[j] : a[MOE_SHARED];
        if (e < 0)
            continue;
        g[ns] = tg[e], u[ns] = tu[e], d[ns] = td[e], gs[ns] = tgs[e], us[ns] = tus[e], ds[ns] = tds[e];
        inter[ns] = tin[e];
        ws[ns++] = j < nk ? w[j] : 1.0f;
    }
    float *y = (float *)a[MOE_Y];
    moe_any(f32, (const void *)a[MOE_X], K, ns, g, u, d, gs, us, ds, inter, ws, (void *)a[MOE_H], y, nt);
    void *x = (void *)a[MOE_RESID];
    for (int64_t i = 0; i < K; i++) put(f32, x, i, get(f32, x, i) + stored(f32, y[i]));
}
