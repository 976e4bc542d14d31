/* Fused self-attention for the vision encoders on AVX-512 CPUs: softmax(q k^T * scale) v per head.

   What PyTorch does in three passes over a (tokens x tokens) score matrix per head (two batched
   products and a softmax, the scores written to memory and read back twice), this does per block of
   48 query rows whose scores stay in the core's L2 cache: the products run as register-tiled
   micro-kernels (6 rows x 64 columns of float32 accumulators), the softmax is one pass over the
   block, and its normalisation is applied to the 64 outputs of a row instead of its 577 weights.

   q, k and v are read in place through their strides (views of the fused qkv projection: no copies),
   and the context is written as (batch, tokens, heads, dim), the layout the output projection reads.
   Heads of 64 only (every BLIP size). Scores and the softmax are float32 in both entry points; the
   bfloat16 one multiplies with vdpbf16ps (pairs of bfloat16 products summed into float32) and rounds
   the softmax weights to bfloat16 for the second product, as the eager bfloat16 code does.

   Threads: OpenMP over the (image, head) pairs. Linked against the OpenMP runtime PyTorch already
   loaded (same soname), so it shares PyTorch's threads instead of starting a second team. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DIM 64      /* head size */
#define MR 6        /* query rows per micro-tile */
#ifndef BLOCK
#define BLOCK 48 /* query rows per block: BLOCK x tokens float32 scores stay in L2 */
#endif

typedef uint16_t bf16;

static inline int64_t round_up(int64_t value, int64_t step) { return (value + step - 1) / step * step; }

/* e^x for x <= 0: x = n ln2 + r with |r| <= ln2/2, a degree-6 polynomial for e^r, then scaled by 2^n
   (vscalefps). Relative error below 2e-7; x below -87 gives about 1e-38, not 0. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* One block's softmax, in place on `rows` rows of `width` float32 scores of which the first `length`
   are real: the rest are set to 0. Returns 1/sum per row in `inverse`. */
static inline void softmax_rows(float *scores, int64_t rows, int64_t width, int64_t length, float scale,
                                float *inverse) {
    const int64_t whole = length / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (length - whole)) - 1u);
    for (int64_t row = 0; row < rows; row++) {
        float *s = scores + row * width;
        __m512 top = _mm512_set1_ps(-3.4e38f);
        for (int64_t n = 0; n < whole; n += 16) top = _mm512_max_ps(top, _mm512_loadu_ps(s + n));
        if (tail) top = _mm512_mask_max_ps(top, tail, top, _mm512_maskz_loadu_ps(tail, s + whole));
        const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(top));
        const __m512 factor = _mm512_set1_ps(scale);
        __m512 sum = _mm512_setzero_ps();
        for (int64_t n = 0; n < whole; n += 16) {
            __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + n), shift), factor));
            _mm512_storeu_ps(s + n, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (whole < width) {
            __m512 e = exp_nonpositive(_mm512_mul_ps(_mm512_sub_ps(_mm512_loadu_ps(s + whole), shift), factor));
            e = _mm512_maskz_mov_ps(tail, e);
            _mm512_storeu_ps(s + whole, e);
            sum = _mm512_add_ps(sum, e);
            for (int64_t n = whole + 16; n < width; n += 16) _mm512_storeu_ps(s + n, _mm512_setzero_ps());
        }
        inverse[row] = 1.0f / _mm512_reduce_add_ps(sum);
    }
}

/* float32 ------------------------------------------------------------------------------------------ */

/* scores[r][n..n+16*nv) = sum_d q[r][d] * kt[d][n..] for r < mr. */
static inline __attribute__((always_inline)) void scores_tile_f32(const float *q, int64_t q_stride,
                                                                 const float *kt, int64_t kt_stride,
                                                                 float *scores, int64_t s_stride,
                                                                 const int mr, const int nv) {
    __m512 acc[MR][4];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nv; j++) acc[r][j] = _mm512_setzero_ps();
    for (int d = 0; d < DIM; d++) {
        __m512 b[4];
        for (int j = 0; j < nv; j++) b[j] = _mm512_loadu_ps(kt + d * kt_stride + 16 * j);
        for (int r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(q[r * q_stride + d]);
            for (int j = 0; j < nv; j++) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nv; j++) _mm512_storeu_ps(scores + r * s_stride + 16 * j, acc[r][j]);
}

/* out[r][0..64) = inverse[r] * sum_n weights[r][n] * v[n][0..64) for r < mr. */
static inline __attribute__((always_inline)) void context_tile_f32(const float *weights, int64_t w_stride,
                                                                  const float *v, int64_t v_stride,
                                                                  int64_t length, const float *inverse,
                                                                  float *out, int64_t out_stride, const int mr) {
    __m512 acc[MR][4];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t n = 0; n < length; n++) {
        __m512 b[4];
        for (int j = 0; j < 4; j++) b[j] = _mm512_loadu_ps(v + n * v_stride + 16 * j);
        for (int r = 0; r < mr; r++) {
            const __m512 a = _mm512_set1_ps(weights[r * w_stride + n]);
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_fmadd_ps(a, b[j], acc[r][j]);
        }
    }
    for (int r = 0; r < mr; r++) {
        const __m512 norm = _mm512_set1_ps(inverse[r]);
        for (int j = 0; j < 4; j++) _mm512_storeu_ps(out + r * out_stride + 16 * j, _mm512_mul_ps(acc[r][j], norm));
    }
}

#define DISPATCH_ROWS(mr, CALL)      \
    switch (mr) {                    \
        case 6: CALL(6); break;      \
        case 5: CALL(5); break;      \
        case 4: CALL(4); break;      \
        case 3: CALL(3); break;      \
        case 2: CALL(2); break;      \
        default: CALL(1); break;     \
    }

static void head_f32(const float *q, int64_t q_stride, const float *k, int64_t k_stride, const float *v,
                     int64_t v_stride, float *out, int64_t out_stride, int64_t length, float scale, float *kt,
                     float *scores, float *inverse) {
    const int64_t width = round_up(length, 16);
    for (int64_t n = 0; n < length; n++)
        for (int d = 0; d < DIM; d++) kt[d * width + n] = k[n * k_stride + d];
    for (int d = 0; d < DIM; d++)
        for (int64_t n = length; n < width; n++) kt[d * width + n] = 0.0f;
    for (int64_t start = 0; start < length; start += BLOCK) {
        const int64_t rows = length - start < BLOCK ? length - start : BLOCK;
        for (int64_t row = 0; row < rows; row += MR) {
            const int mr = rows - row < MR ? (int)(rows - row) : MR;
            const float *qr = q + (start + row) * q_stride;
            float *sr = scores + row * width;
            int64_t n = 0;
            for (; n + 64 <= width; n += 64) {
#define QK4(m) scores_tile_f32(qr, q_stride, kt + n, width, sr + n, width, m, 4)
                DISPATCH_ROWS(mr, QK4)
            }
            for (; n < width; n += 16) {
#define QK1(m) scores_tile_f32(qr, q_stride, kt + n, width, sr + n, width, m, 1)
                DISPATCH_ROWS(mr, QK1)
            }
        }
        softmax_rows(scores, rows, width, length, scale, inverse);
        for (int64_t row = 0; row < rows; row += MR) {
            const int mr = rows - row < MR ? (int)(rows - row) : MR;
#define PV(m)                                                                                            \
    context_tile_f32(scores + row * width, width, v, v_stride, length, inverse + row,                   \
                     out + (start + row) * out_stride, out_stride, m)
            DISPATCH_ROWS(mr, PV)
#undef PV
        }
    }
}

/* bfloat16 ----------------------------------------------------------------------------------------- */
/* vdpbf16ps multiplies pairs: lane j adds a[2j] b[2j] + a[2j+1] b[2j+1]. The first product pairs the
   head dimension (a query's (d, d+1) against each key's), the second pairs tokens (weights of n, n+1
   against rows n, n+1 of v): both operands are packed as 32-bit pairs first. */

#define BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,avx512bf16")))

static inline BF16_TARGET __attribute__((always_inline)) void scores_tile_bf16(
    const bf16 *q, int64_t q_stride, const uint32_t *kt, int64_t kt_stride, float *scores, int64_t s_stride,
    const int mr, const int nv) {
    __m512 acc[MR][4];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nv; j++) acc[r][j] = _mm512_setzero_ps();
    for (int p = 0; p < DIM / 2; p++) {
        __m512i b[4];
        for (int j = 0; j < nv; j++) b[j] = _mm512_loadu_si512((const void *)(kt + p * kt_stride + 16 * j));
        for (int r = 0; r < mr; r++) {
            uint32_t pair;
            memcpy(&pair, q + r * q_stride + 2 * p, sizeof pair);
            const __m512i a = _mm512_set1_epi32((int)pair);
            for (int j = 0; j < nv; j++)
                acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)a, (__m512bh)b[j]);
        }
    }
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < nv; j++) _mm512_storeu_ps(scores + r * s_stride + 16 * j, acc[r][j]);
}

static inline BF16_TARGET __attribute__((always_inline)) void context_tile_bf16(
    const bf16 *weights, int64_t w_stride, const uint32_t *vp, int64_t pairs, const float *inverse, bf16 *out,
    int64_t out_stride, const int mr) {
    __m512 acc[MR][4];
    for (int r = 0; r < mr; r++)
        for (int j = 0; j < 4; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512i b[4];
        for (int j = 0; j < 4; j++) b[j] = _mm512_loadu_si512((const void *)(vp + p * DIM + 16 * j));
        for (int r = 0; r < mr; r++) {
            uint32_t pair;
            memcpy(&pair, weights + r * w_stride + 2 * p, sizeof pair);
            const __m512i a = _mm512_set1_epi32((int)pair);
            for (int j = 0; j < 4; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], (__m512bh)a, (__m512bh)b[j]);
        }
    }
    for (int r = 0; r < mr; r++) {
        const __m512 norm = _mm512_set1_ps(inverse[r]);
        for (int j = 0; j < 4; j++) {
            __m256bh rounded = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[r][j], norm));
            _mm256_storeu_si256((__m256i *)(out + r * out_stride + 16 * j), (__m256i)rounded);
        }
    }
}

static BF16_TARGET void round_rows_bf16(const float *scores, bf16 *weights, int64_t rows, int64_t width) {
    for (int64_t i = 0; i < rows * width; i += 16) {
        __m256bh rounded = _mm512_cvtneps_pbh(_mm512_loadu_ps(scores + i));
        _mm256_storeu_si256((__m256i *)(weights + i), (__m256i)rounded);
    }
}

static BF16_TARGET void head_bf16(const bf16 *q, int64_t q_stride, const bf16 *k, int64_t k_stride,
                                  const bf16 *v, int64_t v_stride, bf16 *out, int64_t out_stride, int64_t length,
                                  float scale, uint32_t *kt, uint32_t *vp, float *scores, bf16 *weights,
                                  float *inverse) {
    const int64_t width = round_up(length, 16); /* even: token pairs of the second product */
    for (int64_t n = 0; n < length; n++)
        for (int p = 0; p < DIM / 2; p++) memcpy(kt + p * width + n, k + n * k_stride + 2 * p, sizeof(uint32_t));
    for (int p = 0; p < DIM / 2; p++)
        for (int64_t n = length; n < width; n++) kt[p * width + n] = 0;
    for (int64_t pair = 0; pair < width / 2; pair++) {
        const int64_t first = 2 * pair, second = 2 * pair + 1;
        for (int d = 0; d < DIM; d++) {
            const uint32_t low = first < length ? v[first * v_stride + d] : 0;
            const uint32_t high = second < length ? v[second * v_stride + d] : 0;
            vp[pair * DIM + d] = low | (high << 16);
        }
    }
    for (int64_t start = 0; start < length; start += BLOCK) {
        const int64_t rows = length - start < BLOCK ? length - start : BLOCK;
        for (int64_t row = 0; row < rows; row += MR) {
            const int mr = rows - row < MR ? (int)(rows - row) : MR;
            const bf16 *qr = q + (start + row) * q_stride;
            float *sr = scores + row * width;
            int64_t n = 0;
            for (; n + 64 <= width; n += 64) {
#define QKB4(m) scores_tile_bf16(qr, q_stride, kt + n, width, sr + n, width, m, 4)
                DISPATCH_ROWS(mr, QKB4)
            }
            for (; n < width; n += 16) {
#define QKB1(m) scores_tile_bf16(qr, q_stride, kt + n, width, sr + n, width, m, 1)
                DISPATCH_ROWS(mr, QKB1)
            }
        }
        softmax_rows(scores, rows, width, length, scale, inverse);
        round_rows_bf16(scores, weights, rows, width);
        for (int64_t row = 0; row < rows; row += MR) {
            const int mr = rows - row < MR ? (int)(rows - row) : MR;
#define PVB(m)                                                                                          \
    context_tile_bf16(weights + row * width, width, vp, width / 2, inverse + row,                        \
                      out + (start + row) * out_stride, out_stride, m)
            DISPATCH_ROWS(mr, PVB)
#undef PVB
        }
    }
}

/* Entry points --------------------------------------------------------------------------------------- */
/* Strides are in elements: s[0] image, s[1] head, s[2] token (the last dimension is contiguous).
   Returns 0, or -1 if a buffer could not be allocated (nothing is then written). */

int modtag_attention_f32(const float *q, const int64_t *qs, const float *k, const int64_t *ks, const float *v,
                         const int64_t *vs, float *out, const int64_t *os, int64_t images, int64_t heads,
                         int64_t length, float scale, int threads) {
    const int64_t width = round_up(length, 16);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        float *kt = aligned_alloc(64, sizeof(float) * DIM * width);
        float *scores = aligned_alloc(64, sizeof(float) * BLOCK * width);
        float *inverse = aligned_alloc(64, sizeof(float) * round_up(BLOCK, 16));
        if (!kt || !scores || !inverse) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < images * heads; item++) {
            if (failed) continue;
            const int64_t image = item / heads, head = item % heads;
            head_f32(q + image * qs[0] + head * qs[1], qs[2], k + image * ks[0] + head * ks[1], ks[2],
                     v + image * vs[0] + head * vs[1], vs[2], out + image * os[0] + head * os[1], os[2], length,
                     scale, kt, scores, inverse);
        }
        free(kt);
        free(scores);
        free(inverse);
    }
    return failed ? -1 : 0;
}

int modtag_attention_bf16(const bf16 *q, const int64_t *qs, const bf16 *k, const int64_t *ks, const bf16 *v,
                          const int64_t *vs, bf16 *out, const int64_t *os, int64_t images, int64_t heads,
                          int64_t length, float scale, int threads) {
    const int64_t width = round_up(length, 16);
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        uint32_t *kt = aligned_alloc(64, sizeof(uint32_t) * (DIM / 2) * width);
        uint32_t *vp = aligned_alloc(64, sizeof(uint32_t) * (width / 2) * DIM);
        float *scores = aligned_alloc(64, sizeof(float) * BLOCK * width);
        bf16 *weights = aligned_alloc(64, round_up(sizeof(bf16) * BLOCK * width, 64));
        float *inverse = aligned_alloc(64, sizeof(float) * round_up(BLOCK, 16));
        if (!kt || !vp || !scores || !weights || !inverse) failed = 1;
#pragma omp for schedule(dynamic, 1)
        for (int64_t item = 0; item < images * heads; item++) {
            if (failed) continue;
            const int64_t image = item / heads, head = item % heads;
            head_bf16(q + image * qs[0] + head * qs[1], qs[2], k + image * ks[0] + head * ks[1], ks[2],
                      v + image * vs[0] + head * vs[1], vs[2], out + image * os[0] + head * os[1], os[2], length,
                      scale, kt, vp, scores, weights, inverse);
        }
        free(kt);
        free(vp);
        free(scores);
        free(weights);
        free(inverse);
    }
    return failed ? -1 : 0;
}
