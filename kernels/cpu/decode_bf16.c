/* bf16 decode kernels for the CPU: the memory-bound work of one decode step.
 *
 * A decode step multiplies one activation row by every weight it touches, so its speed is the
 * speed at which the weights stream from memory. torch's one-row bf16 GEMV reaches 15 % of this
 * CPU's copy bandwidth (docs/performance.md); these kernels stream each weight row once, with
 * AVX512-BF16 dot products (vdpbf16ps: bf16 products summed in fp32) where the CPU has them and a
 * plain fp32 loop the compiler vectorises where it does not.
 *
 *   dsv3_gemv          Y[b,m,:] = X[b,m,:] W[b]^T     (b: a batch of weights, e.g. heads; m <= 8)
 *   dsv3_moe           sum_s w_s * down_s(silu(gate_s x) * up_s x) over a token's chosen experts
 *
 * Numerics follow the torch path they replace: inputs and weights bf16, every dot product in
 * fp32, each projection's output rounded to bf16 once (round to nearest even), exactly where
 * torch rounds it. Only the order of the fp32 additions inside a dot product differs.
 * Threads: OpenMP. Loaded after torch, this library binds to the OpenMP runtime torch already
 * loaded (same soname), so both share one pool; the caller passes torch.get_num_threads().
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

static inline bf16 f2bf(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

static inline float round_bf(float f) { return bf2f(f2bf(f)); }

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
    for (int m = 0; m < M; m++) out[m] = 0.0f;
    for (; k + 16 <= K; k += 16) {
        for (int m = 0; m < M; m++) {
            float part[16];
            for (int j = 0; j < 16; j++) part[j] = bf2f(w[k + j]) * bf2f(x[m * ldx + k + j]);
            float s = 0.0f;
            for (int j = 0; j < 16; j++) s += part[j];
            out[m] += s;
        }
    }
#endif
    for (; k < K; k++)
        for (int m = 0; m < M; m++) out[m] += bf2f(w[k]) * bf2f(x[m * ldx + k]);
}

#define PF 8   /* rows prefetched ahead (past a matrix's end a prefetch reads nothing and never faults) */

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
        _mm_prefetch((const char *)(w + PF * ld + k), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + (PF + 1) * ld + k), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + (PF + 2) * ld + k), _MM_HINT_T0);
        _mm_prefetch((const char *)(w + (PF + 3) * ld + k), _MM_HINT_T0);
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
    for (int j = 0; j < 4; j++) out[j] = 0.0f;
#endif
    for (int j = 0; j < 4; j++) {
        float s = 0.0f;
        int kk = k;
#ifndef __AVX512BF16__
        dot_rows(w + j * ld, x, 0, 1, K, &s);
        kk = K;
#endif
        for (; kk < K; kk++) s += bf2f(w[j * ld + kk]) * bf2f(x[kk]);
        out[j] += s;
    }
}

static inline float dot1(const bf16 *w, const bf16 *x, int K) {
    float o;
    dot_rows(w, x, 0, 1, K, &o);
    return o;
}

/* Y[b][m][n] = bf16(sum_k W[b][n][k] X[b][m][k]) for b < nb, m < M (<= 8), n < N.
   W rows are ldw apart, batches sw apart (elements); X and Y likewise. Rows of every batch are
   split over the threads as one range, so a batch of small matrices (per-head W_UK) still keeps
   every thread busy. */
void dsv3_gemv(const bf16 *W, int64_t ldw, int64_t sw, const bf16 *X, int64_t ldx, int64_t sx,
               bf16 *Y, int64_t ldy, int64_t sy, int nb, int M, int N, int K, int nt) {
    int64_t rows = (int64_t)nb * N;
    if (M == 1 && N % 4 == 0) {
#pragma omp parallel for schedule(static) num_threads(nt)
        for (int64_t r = 0; r < rows; r += 4) {
            int64_t b = r / N, n = r % N;
            float out[4];
            dot4(W + b * sw + n * ldw, ldw, X + b * sx, K, out);
            for (int j = 0; j < 4; j++) Y[b * sy + n + j] = f2bf(out[j]);
        }
        return;
    }
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < rows; r++) {
        int64_t b = r / N, n = r % N;
        float out[MAXM];
        dot_rows(W + b * sw + n * ldw, X + b * sx, ldx, M, K, out);
        for (int m = 0; m < M; m++) Y[b * sy + m * ldy + n] = f2bf(out[m]);
    }
}

/* One token's MoE: nslot experts (routed and shared alike), expert s with gate/up weights
   g[s], u[s] [I_s, K] and down weight d[s] [K, I_s] (row-major, contiguous), weight ws[s].
   h (scratch, sum I_s bf16 values) holds silu(gate x) * up x per expert, rounded as torch rounds
   (each projection's output to bf16, silu's output to bf16, the product to bf16);
   y[n] = sum_s ws[s] * bf16(down_s h_s)[n] in fp32. Two parallel loops: every expert's
   intermediate rows, then every output row across all experts. */
void dsv3_moe(const bf16 *x, int K, int nslot, const int64_t *g, const int64_t *u, const int64_t *d,
              const int *inter, const float *ws, bf16 *h, float *y, int nt) {
    int64_t off[65];
    off[0] = 0;
    for (int s = 0; s < nslot && s < 64; s++) off[s + 1] = off[s] + inter[s];
    int64_t total = off[nslot];
    int by4 = K % 4 == 0;
    for (int s = 0; s < nslot; s++) by4 &= inter[s] % 4 == 0;
    int64_t step = by4 ? 4 : 1;      /* rows per work item: four (dot4) when every width allows */
#pragma omp parallel num_threads(nt)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < total; r += step) {
            int s = 0;
            while (r >= off[s + 1]) s++;
            int64_t i = r - off[s];
            float gv[4], uv[4];
            if (by4) {
                dot4((const bf16 *)g[s] + i * K, K, x, K, gv);
                dot4((const bf16 *)u[s] + i * K, K, x, K, uv);
            } else {
                gv[0] = dot1((const bf16 *)g[s] + i * K, x, K);
                uv[0] = dot1((const bf16 *)u[s] + i * K, x, K);
            }
            for (int j = 0; j < step; j++) {
                float gr = round_bf(gv[j]), ur = round_bf(uv[j]);
                float act = round_bf(gr / (1.0f + expf(-gr)));
                h[r + j] = f2bf(act * ur);
            }
        }
#pragma omp for schedule(static)
        for (int n = 0; n < K; n += (int)step) {
            float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            for (int s = 0; s < nslot; s++) {
                float o[4];
                const bf16 *rows = (const bf16 *)d[s] + (int64_t)n * inter[s];
                if (by4) dot4(rows, inter[s], h + off[s], inter[s], o);
                else o[0] = dot1(rows, h + off[s], inter[s]);
                for (int j = 0; j < step; j++) acc[j] += ws[s] * round_bf(o[j]);
            }
            for (int j = 0; j < step; j++) y[n + j] = acc[j];
        }
    }
}

/* RMSNorm of M rows x[m] (D wide, ldx apart) as the torch module computes it: in fp32,
   x / sqrt(mean(x^2) + eps) rounded to bf16, then times the bf16 weight, rounded again. One
   row is a few kilobytes: no threads. */
void dsv3_rmsnorm(const bf16 *x, int64_t ldx, const bf16 *w, float eps, bf16 *y, int64_t ldy, int M, int D) {
    for (int m = 0; m < M; m++) {
        const bf16 *xr = x + m * ldx;
        float ss = 0.0f;
        for (int i = 0; i < D; i++) { float v = bf2f(xr[i]); ss += v * v; }
        float inv = 1.0f / sqrtf(ss / (float)D + eps);
        for (int i = 0; i < D; i++) y[m * ldy + i] = f2bf(bf2f(w[i]) * round_bf(bf2f(xr[i]) * inv));
    }
}

/* RoPE on M rows of d values (ldx apart; one position, so one cos/sin row of d/2 values):
   interleaved pairs (2i, 2i+1) rotated in fp32, (x0 cos - x1 sin, x1 cos + x0 sin), rounded to
   bf16 into y (ldy apart). */
void dsv3_rope(const bf16 *x, int64_t ldx, const float *cs, const float *sn, bf16 *y, int64_t ldy, int M, int d) {
    for (int m = 0; m < M; m++) {
        const bf16 *xr = x + m * ldx;
        bf16 *yr = y + m * ldy;
        for (int i = 0; i < d / 2; i++) {
            float x0 = bf2f(xr[2 * i]), x1 = bf2f(xr[2 * i + 1]);
            yr[2 * i] = f2bf(x0 * cs[i] - x1 * sn[i]);
            yr[2 * i + 1] = f2bf(x1 * cs[i] + x0 * sn[i]);
        }
    }
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
        if (t + 8 < T) _mm_prefetch((const char *)(kr + 8 * ldk), _MM_HINT_T0);
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

/* dst[i] = src[idx[i]] for k rows of W elements (src rows lds apart, dst rows contiguous): the
   selected latent rows of a sparse decode step, copied once, rows split over the threads. */
void dsv3_gather_rows(const bf16 *src, int64_t lds, const int64_t *idx, int k, int W, bf16 *dst, int nt) {
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int i = 0; i < k; i++) {
        if (i + 4 < k) _mm_prefetch((const char *)(src + idx[i + 4] * lds), _MM_HINT_T0);
        memcpy(dst + (int64_t)i * W, src + idx[i] * lds, sizeof(bf16) * (size_t)W);
    }
}
