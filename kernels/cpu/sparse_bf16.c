/* The V3.2 lightning indexer's per-token work in a bf16 decode step (model/indexer.py) and the
 * gather of the rows it selects (model/attn_sparse.py).
 *
 * A sparse decode step scores every cached indexer key: H_I dot products of D_I values per key,
 * where an AVX-512 dot-product loop (cpu/decode_bf16.c's dsv3_index_scores) is compute-bound --
 * a horizontal sum per head and key -- and AMX tile products stream the key cache at memory speed.
 * Around that product ran some twenty small torch ops per layer, each costing about as much in
 * dispatch as in arithmetic, and far more once the step's weight streaming has pushed the
 * interpreter's own data out of the caches. Three calls replace them all:
 *
 *   dsv3_index_qkw       one token's indexer query, key and head weights: the two projections,
 *                        the key's LayerNorm, RoPE of both, the fp32 head weights
 *   dsv3_index_topk      scores I[t] = sum_h w[h] relu(bf16(q[h] . keys[t])) straight from the key
 *                        cache by AMX tile products (where the CPU has them), then the top-k
 *                        positions by an exact radix selection with select_topk's tie rule (ties
 *                        at the k-th score: the earliest positions), no sort
 *   dsv3_index_select    the same scores and top-k from a bf16 GEMM's logits [T, H] (no AMX)
 *   dsv3_gather_sorted   the selected latent rows (in increasing position order) copied into one
 *                        contiguous buffer, every cache line of a row prefetched rows ahead
 *   dsv3_index_decode, dsv3_gather_packed   the decode step's calls of the above, arguments packed
 *
 * Numerics follow the torch code they replace: projections as bf16 dot products summed in fp32
 * and rounded to bf16 once (as the CPU GEMV kernels), LayerNorm in fp32 rounded to bf16, RoPE in
 * fp32 (half-split pairs (i, i + r/2) over the first r dims) rounded to bf16, head weights and
 * scores in fp32. Only the order of fp32 additions differs. Threads: OpenMP (torch's runtime, as
 * for cpu/decode_bf16.c), for the projections and the gather; the selection is one thread's work.
 */
#define _GNU_SOURCE                          /* syscall(): AMX needs the kernel's permission */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bf16.h"

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

/* sum_h w[h] * max(0, l[h]); a NaN stays NaN (max(zero, v) returns v when either is NaN), as
   torch's clamp_min keeps it, so that a NaN is reported, never scored as 0 */
static inline float weighted_relu_sum(const bf16 *l, const float *w, int H) {
    int h = 0;
    float s = 0.0f;
    if (H >= VL) {
        vf acc = vzero();
        for (; h + VL <= H; h += VL) acc += vmax(vzero(), vload_bf(l + h)) * vload(w + h);
        s = vsum(acc);
    }
    for (; h < H; h++) {
        float v = bf2f(l[h]);
        s += w[h] * (v < 0.0f ? 0.0f : v);
    }
    return s;
}

/* The k (1 <= k < T) best of scores[T] into idx[k], in increasing position order: every t scoring
 * above the k-th best score, and the earliest of those scoring exactly the k-th best to make k.
 * keys, cand: T scratch values each; idx: room for k + 1. Returns k, or -1 if a score is NaN.
 *
 * A radix selection of the k-th largest in three digits (11, 11 and 10 bits of the order key),
 * highest first: count the candidates (the keys sharing the digits fixed so far) per digit, fix
 * the digit that holds the k-th largest of them, keep only those. */
static int topk_of_scores(const float *scores, int T, int k, uint32_t *keys, uint32_t *cand, int64_t *idx) {
    int nan = 0;
    for (int t = 0; t < T; t++) {
        nan |= scores[t] != scores[t];
        keys[t] = order_key(scores[t]);
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
    /* branch-free (about a quarter of the positions are taken, at random): each position is
       written at idx[n] and counted if taken; the loop stops with the k-th */
    n = 0;
    for (int t = 0; t < T && n < k; t++) {
        uint32_t key = keys[t];
        int eq = key == prefix, take = (key > prefix) | (eq & (need > 0));
        idx[n] = t;
        n += take;
        need -= eq & take;
    }
    return n;
}

/* topk_of_scores for scores computed elsewhere (decode_bf16.c's dsv3_index_scores, where no AMX) */
int dsv3_topk_scores(const float *scores, int T, int k, uint32_t *keys, uint32_t *cand, int64_t *idx) {
    return topk_of_scores(scores, T, k, keys, cand, idx);
}

/* scores[t] = sum_h w[h] * max(0, logits[t*ldl + h]) for t < T (logits: the bf16 q.k products of a
 * GEMM), then their top k as topk_of_scores (same return). */
int dsv3_index_select(const bf16 *logits, int64_t ldl, int T, int H, const float *w, int k,
                      float *scores, uint32_t *keys, uint32_t *cand, int64_t *idx) {
    for (int t = 0; t < T; t++) scores[t] = weighted_relu_sum(logits + (int64_t)t * ldl, w, H);
    return topk_of_scores(scores, T, k, keys, cand, idx);
}

#ifdef __AMX_BF16__
/* AMX tiles: the process asks the kernel once for the tile state (Linux: arch_prctl
   ARCH_REQ_XCOMP_PERM for XTILEDATA); a refusal leaves the caller's torch GEMM path. */
static int amx_state = 0;                     /* 0 unknown, 1 granted, -1 refused */
static int amx_ok(void) {
    if (amx_state == 0) amx_state = syscall(SYS_arch_prctl, 0x1023, 18) == 0 ? 1 : -1;
    return amx_state == 1;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

#define AMX_MAX_D 512
#define KPF 4                                 /* 16-key blocks prefetched ahead */

/* scores[t] for keys [t0, t1): 16 keys at a time, q.k by TDPBF16PS (bf16 pairs, fp32 sums) into a
   16 x 16 tile, each product rounded to bf16 as a bf16 GEMM's output would be, relu'd, times the
   head weights (zero past H), summed over the heads. qv: q in the tiles' pair-interleaved layout.
   The tiles of 16 tile-products (16 KB) are stored first and summed after: vector loads right
   behind a tile store stall on it (measured: the sums cost 10x more interleaved). */
static void amx_block_scores(const bf16 *keys, int64_t ldk, int t0, int t1, const bf16 *qv, int nblk, int nc,
                             const float *wpad, float *scores) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int i = 0; i < 3; i++) cfg.rows[i] = 16, cfg.colsb[i] = 64;
    _tile_loadconfig(&cfg);
    float cb[16 * 256];
    bf16 tail[16 * AMX_MAX_D];
    int D = nc * 32, per = 16 / nblk;         /* 16-key blocks per round of stores */
    for (int tr = t0; tr < t1; tr += 16 * per) {
        int te = tr + 16 * per < t1 ? tr + 16 * per : t1;
        for (int t = tr, j = 0; t < te; t += 16, j++) {
            const bf16 *a = keys + (int64_t)t * ldk;
            int64_t lda = ldk;
            int m = te - t < 16 ? te - t : 16;
            if (m < 16) {                     /* the last keys, zero-padded to a full tile */
                memset(tail, 0, sizeof(bf16) * 16 * (size_t)D);
                for (int i = 0; i < m; i++) memcpy(tail + i * D, a + i * ldk, sizeof(bf16) * (size_t)D);
                a = tail, lda = D;
            } else if (t + 16 * KPF + 16 <= t1) {
                const char *p = (const char *)(keys + (int64_t)(t + 16 * KPF) * ldk);
                for (int i = 0; i < 16; i++)
                    for (int b = 0; b < 2 * D; b += 64) PREFETCH(p + i * 2 * ldk + b);
            }
            for (int nb = 0; nb < nblk; nb++) {
                _tile_zero(0);
                for (int c = 0; c < nc; c++) {
                    _tile_loadd(1, a + c * 32, 2 * lda);
                    _tile_loadd(2, qv + ((int64_t)nb * nc + c) * 512, 64);
                    _tile_dpbf16ps(0, 1, 2);
                }
                _tile_stored(0, cb + (j * nblk + nb) * 256, 64);
            }
        }
        __m512 zero = _mm512_setzero_ps();
        for (int t = tr, j = 0; t < te; t += 16, j++) {
            int m = te - t < 16 ? te - t : 16;
            for (int i = 0; i < m; i++) {
                __m512 acc = zero;
                for (int nb = 0; nb < nblk; nb++) {
                    /* round to bf16 (nearest even, as f2bf) and back, relu, weight */
                    __m512 v = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
                        (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(cb + (j * nblk + nb) * 256 + 16 * i))), 16));
                    acc = _mm512_fmadd_ps(_mm512_max_ps(zero, v), _mm512_loadu_ps(wpad + nb * 16), acc);
                }
                scores[t + i] = _mm512_reduce_add_ps(acc);
            }
        }
    }
    _tile_release();
}
#endif

/* 1 where dsv3_index_topk can use AMX tiles (built for them, and the kernel grants the state). */
int dsv3_amx_available(void) {
#ifdef __AMX_BF16__
    return amx_ok();
#else
    return 0;
#endif
}

/* The indexer's decode selection straight from the key cache: scores[t] = sum_h w[h]
 * relu(bf16(q[h] . keys[t])) for t < T (keys rows ldk apart, q [H, D] bf16, w [H] fp32) by AMX
 * tiles, the keys split over nt threads, then their top k as topk_of_scores (same return and
 * scratch). Returns -2, having done nothing, where the CPU or the kernel offers no AMX, or the
 * shape does not fit the tiles (D % 32 != 0, D > 512, H > 64): the caller's GEMM path runs. */
int dsv3_index_topk(const bf16 *keys, int64_t ldk, int T, const bf16 *q, int H, int D, const float *w, int k,
                    float *scores, uint32_t *okeys, uint32_t *cand, int64_t *idx, int nt) {
#ifdef __AMX_BF16__
    if (D % 32 || D > AMX_MAX_D || H > 64 || H < 1 || !amx_ok()) return -2;
    int nblk = (H + 15) / 16, nc = D / 32;
    /* q as the tiles' right operand: for each 16-head block and 32-dim chunk, 16 rows of dim
       pairs, each row the 16 heads' (d, d+1) values side by side; heads past H are zero */
    bf16 qv[4 * (AMX_MAX_D / 32) * 512];
    float wpad[64];
    memset(qv, 0, sizeof(bf16) * (size_t)nblk * nc * 512);
    for (int h = 0; h < 64; h++) wpad[h] = h < H ? w[h] : 0.0f;
    for (int h = 0; h < H; h++)
        for (int d = 0; d < D; d++) {
            int nb = h / 16, n = h % 16, c = d / 32, p = (d % 32) / 2, e = d % 2;
            qv[((int64_t)nb * nc + c) * 512 + p * 32 + n * 2 + e] = q[(int64_t)h * D + d];
        }
    int nblocks = (T + 15) / 16;
    if (nt < 1) nt = 1;
    if (nt > nblocks) nt = nblocks;
#pragma omp parallel num_threads(nt)
    {
        int nth = omp_get_num_threads(), me = omp_get_thread_num();
        int b0 = (int)((int64_t)nblocks * me / nth), b1 = (int)((int64_t)nblocks * (me + 1) / nth);
        int t0 = 16 * b0, t1 = 16 * b1 < T ? 16 * b1 : T;
        if (t0 < t1) amx_block_scores(keys, ldk, t0, t1, qv, nblk, nc, wpad, scores);
    }
    return topk_of_scores(scores, T, k, okeys, cand, idx);
#else
    (void)keys, (void)ldk, (void)T, (void)q, (void)H, (void)D, (void)w, (void)k, (void)scores, (void)okeys;
    (void)cand, (void)idx, (void)nt;
    return -2;
#endif
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
            for (size_t b = 0; b < bytes; b += 64) PREFETCH((const char *)(src + idx[i] * lds) + b);
        for (int i = i0; i < i1; i++) {
            if (i + GR < i1) {
                const char *p = (const char *)(src + idx[i + GR] * lds);
                for (size_t b = 0; b < bytes; b += 64) PREFETCH(p + b);
            }
            memcpy(dst + (int64_t)i * W, src + idx[i] * lds, bytes);
        }
    }
}

/* The decode step's calls with their arguments packed in one int64 array (and the two floats in a
 * double array): through ctypes each argument costs a conversion, about a microsecond warm and
 * several once the step has pushed the interpreter's data out of the caches, so one pointer beats
 * thirty arguments.
 *
 * dsv3_index_decode: dsv3_index_qkw, then (k < T) dsv3_index_topk on the cache the key was just
 * written to; returns 0 when k >= T (nothing to select), else dsv3_index_topk's result (-2: no
 * AMX, the caller scores the keys itself; -1: a NaN score).
 *   a: x, hidden, ql, qlr, wq, wk, lnw, lnb, cos, sin, wp, H, D, r, scratch, q_out, k_out, w_out,
 *      nt, keys, ldk, T, k, work (3 T four-byte values), idx        f: eps, wscale */
int dsv3_index_decode(const int64_t *a, const double *f) {
#define P_(i, type) ((type)(intptr_t)a[i])
    int H = (int)a[11], D = (int)a[12], T = (int)a[21], k = (int)a[22], nt = (int)a[18];
    dsv3_index_qkw(P_(0, const bf16 *), (int)a[1], P_(2, const bf16 *), (int)a[3], P_(4, const bf16 *),
                   P_(5, const bf16 *), P_(6, const bf16 *), P_(7, const bf16 *), (float)f[0], P_(8, const float *),
                   P_(9, const float *), P_(10, const float *), (float)f[1], H, D, (int)a[13], P_(14, bf16 *),
                   P_(15, bf16 *), P_(16, bf16 *), P_(17, float *), nt);
    if (k >= T) return 0;
    uint32_t *work = P_(23, uint32_t *);
    return dsv3_index_topk(P_(19, const bf16 *), a[20], T, P_(15, const bf16 *), H, D, P_(17, const float *), k,
                           (float *)work, work + T, work + 2 * (int64_t)T, P_(24, int64_t *), nt);
}

/* dsv3_gather_sorted with a: src, lds, idx, k, W, dst, nt. */
void dsv3_gather_packed(const int64_t *a) {
    dsv3_gather_sorted(P_(0, const bf16 *), a[1], P_(2, const int64_t *), (int)a[3], (int)a[4], P_(5, bf16 *),
                       (int)a[6]);
#undef P_
}
