/* The V3.2 lightning indexer's per-token work in a bf16 decode step (model/indexer.py) and the
 * gather of the rows it selects (model/attn_sparse.py).
 *
 * A sparse decode step scores every cached indexer key with one bf16 GEMM (torch's: on a CPU with
 * AMX its tile multiplies stream the key cache at memory speed, where an AVX-512 dot-product loop
 * is compute-bound at this shape) and around that product ran some twenty small torch ops per
 * layer, each costing about as much in dispatch as in arithmetic -- and far more when the step's
 * weight streaming has pushed the interpreter's own data out of the caches. Three calls replace
 * them:
 *
 *   dsv3_index_qkw       one token's indexer query, key and head weights: the two projections,
 *                        the key's LayerNorm, RoPE of both, the fp32 head weights
 *   dsv3_index_select    scores I[t] = sum_h w[h] relu(logits[t,h]) from the GEMM's bf16 logits,
 *                        then the top-k positions by an exact radix selection with select_topk's
 *                        tie rule (ties at the k-th score: the earliest positions), no sort
 *   dsv3_gather_sorted   the selected latent rows (in increasing position order) copied into one
 *                        contiguous buffer, every cache line of a row prefetched rows ahead
 *
 * Numerics follow the torch code they replace: projections as bf16 dot products summed in fp32
 * and rounded to bf16 once (as the CPU GEMV kernels), LayerNorm in fp32 rounded to bf16, RoPE in
 * fp32 (half-split pairs (i, i + r/2) over the first r dims) rounded to bf16, head weights and
 * scores in fp32. Only the order of fp32 additions differs. Threads: OpenMP (torch's runtime, as
 * for cpu/decode_bf16.c), for the projections and the gather; the selection is one thread's work.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
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

/* Half-split RoPE of the first r values of x[d] (fp32 in, bf16 out), the rest copied. */
static void rope_half(const float *x, const float *cs, const float *sn, int d, int r, bf16 *y) {
    int h = r / 2;
    for (int i = 0; i < h; i++) {
        float x0 = x[i], x1 = x[i + h];
        y[i] = f2bf(x0 * cs[i] - x1 * sn[i]);
        y[i + h] = f2bf(x1 * cs[i] + x0 * sn[i]);
    }
    for (int i = r; i < d; i++) y[i] = f2bf(x[i]);
}

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

/* One token's indexer inputs (model/indexer.py, Indexer.project), B = S = 1:
 *   qraw = bf16(wq [H*D, qlr] @ ql)          then q_out [H*D] bf16: each head's first r dims rotated
 *   kraw = bf16(wk [D, hidden] @ x)          then k_out [D] bf16 = rope(bf16(LayerNorm(kraw)))
 *                                            (LayerNorm with weight and bias, fp32; what is cached)
 *   w_out [H] fp32 = (wp [H, hidden] fp32 @ x) * wscale
 * x [hidden], ql [qlr] bf16; cs, sn [r/2] fp32: the token's rotation; scratch: H*D + D bf16. The
 * projections' rows are split over nt threads; D <= 1024 (checked by the caller). */
void dsv3_index_qkw(const bf16 *x, int hidden, const bf16 *ql, int qlr, const bf16 *wq, const bf16 *wk,
                    const bf16 *lnw, const bf16 *lnb, float eps, const float *cs, const float *sn,
                    const float *wp, float wscale, int H, int D, int r, bf16 *scratch, bf16 *q_out,
                    bf16 *k_out, float *w_out, int nt) {
    int nq = H * D, rows = nq + D + H;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int j = 0; j < rows; j++) {
        if (j < nq) {
            scratch[j] = f2bf(dot_bf16(wq + (int64_t)j * qlr, qlr, ql, qlr));
        } else if (j < nq + D) {
            int i = j - nq;
            scratch[j] = f2bf(dot_bf16(wk + (int64_t)i * hidden, hidden, x, hidden));
        } else {
            const float *wr = wp + (int64_t)(j - nq - D) * hidden;
            float acc[16] = {0}, s = 0.0f;
            int i = 0;
            for (; i + 16 <= hidden; i += 16)
                for (int l = 0; l < 16; l++) acc[l] += wr[i + l] * bf2f(x[i + l]);
            for (int l = 0; l < 16; l++) s += acc[l];
            for (; i < hidden; i++) s += wr[i] * bf2f(x[i]);
            w_out[j - nq - D] = s * wscale;
        }
    }
    const bf16 *kraw = scratch + nq;
    float buf[1024];
    float mean = 0.0f, var = 0.0f;
    for (int i = 0; i < D; i++) mean += bf2f(kraw[i]);
    mean /= (float)D;
    for (int i = 0; i < D; i++) {
        float c = bf2f(kraw[i]) - mean;
        var += c * c;
    }
    var /= (float)D;                          /* biased, as F.layer_norm */
    float rstd = 1.0f / sqrtf(var + eps);
    for (int i = 0; i < D; i++)               /* the LayerNorm's bf16 output, back in fp32 */
        buf[i] = bf2f(f2bf((bf2f(kraw[i]) - mean) * rstd * bf2f(lnw[i]) + bf2f(lnb[i])));
    rope_half(buf, cs, sn, D, r, k_out);
    for (int h = 0; h < H; h++) {
        const bf16 *qr = scratch + (int64_t)h * D;
        for (int i = 0; i < D; i++) buf[i] = bf2f(qr[i]);
        rope_half(buf, cs, sn, D, r, q_out + (int64_t)h * D);
    }
}

/* A float's bits mapped so that unsigned order is numeric order (-0.0 and 0.0 made equal). */
static inline uint32_t order_key(float f) {
    if (f == 0.0f) f = 0.0f;
    uint32_t u;
    memcpy(&u, &f, 4);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

/* sum_h w[h] * max(0, l[h]) */
static inline float weighted_relu_sum(const bf16 *l, const float *w, int H) {
    int h = 0;
    float s = 0.0f;
#ifdef __AVX512F__
    if (H >= 16) {
        __m512 acc = _mm512_setzero_ps(), zero = _mm512_setzero_ps();
        for (; h + 16 <= H; h += 16) {
            __m512i u = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const void *)(l + h))), 16);
            acc = _mm512_fmadd_ps(_mm512_max_ps(_mm512_castsi512_ps(u), zero), _mm512_loadu_ps(w + h), acc);
        }
        s = _mm512_reduce_add_ps(acc);
    }
    if (h + 8 <= H) {
        __m256i u = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const void *)(l + h))), 16);
        __m256 v = _mm256_mul_ps(_mm256_max_ps(_mm256_castsi256_ps(u), _mm256_setzero_ps()), _mm256_loadu_ps(w + h));
        __m128 q = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        q = _mm_add_ss(q, _mm_movehdup_ps(q));
        s += _mm_cvtss_f32(q);
        h += 8;
    }
#endif
    for (; h < H; h++) {
        float v = bf2f(l[h]);
        s += w[h] * (v > 0.0f ? v : 0.0f);
    }
    return s;
}

/* scores[t] = sum_h w[h] * max(0, logits[t*ldl + h]) for t < T (logits: the bf16 q.k products),
 * then the k (1 <= k < T) best positions into idx[k], in increasing position order: every t scoring
 * above the k-th best score, and the earliest of those scoring exactly the k-th best to make k.
 * keys, cand: T scratch values each; idx: room for k + 1. Returns k, or -1 (nothing selected) if a score is NaN. */
int dsv3_index_select(const bf16 *logits, int64_t ldl, int T, int H, const float *w, int k,
                      float *scores, uint32_t *keys, uint32_t *cand, int64_t *idx) {
    /* a radix selection of the k-th largest key in three digits of 11, 11 and 10 bits, highest
       first: count the candidates (the keys sharing the digits fixed so far) per digit, fix the
       digit that holds the k-th largest of them, keep only those */
    int nan = 0;
    for (int t = 0; t < T; t++) {
        float s = weighted_relu_sum(logits + (int64_t)t * ldl, w, H);
        nan |= s != s;
        scores[t] = s;
        keys[t] = order_key(s);
    }
    if (nan) return -1;
    /* four interleaved histograms: neighbouring keys often share a digit, and one histogram
       would chain every increment on the one before through memory */
    int hist4[4][2048];
    int *hist = hist4[0];
    memset(hist4, 0, sizeof hist4);
    int t = 0;
    for (; t + 4 <= T; t += 4) {
        hist4[0][keys[t] >> 21]++;
        hist4[1][keys[t + 1] >> 21]++;
        hist4[2][keys[t + 2] >> 21]++;
        hist4[3][keys[t + 3] >> 21]++;
    }
    for (; t < T; t++) hist[keys[t] >> 21]++;
    for (int i = 0; i < 2048; i++) hist[i] += hist4[1][i] + hist4[2][i] + hist4[3][i];
    static const int shift[3] = {21, 10, 0};
    int need = k;                                          /* still to take among the candidates */
    int d = 2047;
    while (hist[d] < need) need -= hist[d--];              /* digits above d hold fewer than need */
    uint32_t prefix = (uint32_t)d << 21;
    int n = 0;
    for (int t = 0; t < T; t++)
        if ((keys[t] >> 21) == (uint32_t)d) cand[n++] = keys[t];
    for (int p = 1; p < 3; p++) {
        int nb = p == 1 ? 2048 : 1024;
        memset(hist, 0, sizeof(int) * (size_t)nb);
        for (int i = 0; i < n; i++) hist[(cand[i] >> shift[p]) & (uint32_t)(nb - 1)]++;
        d = nb - 1;
        while (hist[d] < need) need -= hist[d--];
        prefix |= (uint32_t)d << shift[p];
        int m = 0;
        for (int i = 0; i < n; i++)
            if (((cand[i] >> shift[p]) & (uint32_t)(nb - 1)) == (uint32_t)d) cand[m++] = cand[i];
        n = m;
    }
    /* prefix is now the k-th best key; need = how many of the keys equal to it to take */
    /* branch-free (about a quarter of the positions are taken, at random): idx has room for
       k + 1 values, the last written and not counted */
    n = 0;
    for (int t = 0; t < T; t++) {
        uint32_t key = keys[t];
        int eq = key == prefix, take = (key > prefix) | (eq & (need > 0));
        idx[n] = t;
        n += take;
        need -= eq & take;
    }
    return n;
}

/* dst[i] = src[idx[i]] for k rows of W bf16 values (src rows lds apart, dst rows contiguous),
 * idx increasing or not. Each row spans several cache lines and rows are far apart: the copy is
 * bound by memory latency, so every line of the row GR ahead is prefetched, not just its first. */
#define GR 6
void dsv3_gather_sorted(const bf16 *src, int64_t lds, const int64_t *idx, int k, int W, bf16 *dst, int nt) {
    size_t bytes = sizeof(bf16) * (size_t)W;
#pragma omp parallel num_threads(nt)
    {
        int nth = omp_get_num_threads(), me = omp_get_thread_num();
        int i0 = (int)((int64_t)k * me / nth), i1 = (int)((int64_t)k * (me + 1) / nth);
        for (int i = i0; i < i1 && i < i0 + GR; i++)
            for (size_t b = 0; b < bytes; b += 64) _mm_prefetch((const char *)(src + idx[i] * lds) + b, _MM_HINT_T0);
        for (int i = i0; i < i1; i++) {
            if (i + GR < i1) {
                const char *p = (const char *)(src + idx[i + GR] * lds);
                for (size_t b = 0; b < bytes; b += 64) _mm_prefetch(p + b, _MM_HINT_T0);
            }
            memcpy(dst + (int64_t)i * W, src + idx[i] * lds, bytes);
        }
    }
}
