/* uint8 quantization of bfloat16 activations for the int8 linear layers (worker/families/blip/quant.py): one scale and
   zero point over the whole input, its range widened to hold 0, as that module computes them; then
   q = clamp(round(x / scale) + zero, 0, 255), rounding half to even.

   PyTorch needs three passes and a float32 copy for this (the copy, a min/max, and a quantizer that
   runs on one thread); here it is two parallel passes over the bfloat16 input. With a scale and zero point
   calibrated beforehand (static quantization, modtag_quantize_bf16_static) the first pass goes. */

#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#define CHUNK 8192
/* Below this many values one thread quantizes alone: a caption step's 8 x 768 input is done in a few microseconds,
   less than two threads take to meet at the end of a parallel loop (far less on a loaded machine). */
#define PARALLEL_MIN 65536

static inline __m512 widen(const uint16_t *x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)x)), 16));
}

static inline float scalar(uint16_t x) {
    union {
        uint32_t bits;
        float value;
    } u = {.bits = (uint32_t)x << 16};
    return u.value;
}

/* q = clamp(round(x / scale) + zero, 0, 255) with a given scale and zero point; values outside the range
   saturate. Returns 0. */
int modtag_quantize_bf16_static(const uint16_t *x, int64_t n, uint8_t *out, double scale, int64_t zero,
                                int threads) {
    const float inverse = (float)(1.0 / scale);
    const int32_t zero_point = (int32_t)zero;
#pragma omp parallel for if (n >= PARALLEL_MIN) num_threads(threads) schedule(static)
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int64_t end = start + CHUNK < n ? start + CHUNK : n;
        const __m512 factor = _mm512_set1_ps(inverse);
        const __m512i offset = _mm512_set1_epi32(zero_point), least = _mm512_setzero_si512(),
                      most = _mm512_set1_epi32(255);
        int64_t i = start;
        for (; i + 16 <= end; i += 16) {
            __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(widen(x + i), factor)), offset);
            q = _mm512_min_epi32(_mm512_max_epi32(q, least), most);
            _mm_storeu_si128((__m128i *)(out + i), _mm512_cvtepi32_epi8(q));
        }
        for (; i < end; i++) {
            const float q = nearbyintf(scalar(x[i]) * inverse) + (float)zero_point;
            out[i] = (uint8_t)(q < 0.0f ? 0.0f : (q > 255.0f ? 255.0f : q));
        }
    }
    return 0;
}

/* Returns 0, writing the scale and zero point used. */
int modtag_quantize_bf16(const uint16_t *x, int64_t n, uint8_t *out, double *scale_out, int64_t *zero_out,
                         int threads) {
    float low = 0.0f, high = 0.0f;
#pragma omp parallel for if (n >= PARALLEL_MIN) num_threads(threads) reduction(min : low) reduction(max : high) schedule(static)
    for (int64_t start = 0; start < n; start += CHUNK) {
        const int64_t end = start + CHUNK < n ? start + CHUNK : n;
        __m512 lows = _mm512_setzero_ps(), highs = _mm512_setzero_ps();
        int64_t i = start;
        for (; i + 16 <= end; i += 16) {
            const __m512 v = widen(x + i);
            lows = _mm512_min_ps(lows, v);
            highs = _mm512_max_ps(highs, v);
        }
        float chunk_low = _mm512_reduce_min_ps(lows), chunk_high = _mm512_reduce_max_ps(highs);
        for (; i < end; i++) {
            const float v = scalar(x[i]);
            chunk_low = v < chunk_low ? v : chunk_low;
            chunk_high = v > chunk_high ? v : chunk_high;
        }
        low = chunk_low < low ? chunk_low : low;
        high = chunk_high > high ? chunk_high : high;
    }
    double scale = ((double)high - (double)low) / 255.0;
    if (scale == 0.0) scale = 1.0;
    double zero = nearbyint(-(double)low / scale);
    zero = zero < 0.0 ? 0.0 : (zero > 255.0 ? 255.0 : zero);
    *scale_out = scale;
    *zero_out = (int64_t)zero;
    return modtag_quantize_bf16_static(x, n, out, scale, (int64_t)zero, threads);
}
