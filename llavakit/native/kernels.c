/* Matrix-vector products for decoding on a CPU: a few rows of activations against a weight
 * matrix that is read once per call, straight from its stored form (bfloat16, or blocks of
 * int8 / int4 with one float16 scale per group).
 *
 * Decoding one token reads every weight of the decoder once, so its speed is set by how many
 * bytes a second the cores can stream. The kernels therefore touch each weight byte once, keep
 * the activations in L1, and split the output rows over the process's OpenMP threads (the same
 * runtime PyTorch uses, so the two share one thread pool).
 *
 * Quantised products follow the usual block scheme of CPU inference engines: the activations
 * of each call are quantised to int8 in blocks of 32 with one float scale per block, and each
 * block's dot product is an exact integer sum scaled by (weight scale * activation scale).
 *
 * Layouts (row-major, contiguous):
 *   x      (M, K)        activations, float32 (xdt 0) or bfloat16 (xdt 1)
 *   y      (M, N)        output, float32 (ydt 0) or bfloat16 (ydt 1)
 *   bias   (N,) float32  or NULL
 *   bf16   w (N, K) uint16, rows in order                      K % 16 == 0
 *   int8   w in tiles of 8 rows (see qtile8), scales (ceil(N / 8), K / G, 8) float16
 *   int4   the same tiles, two values a byte, each stored as q + 8 (q in [-8, 7])
 *                                                              K % G == 0, G % 32 == 0
 * Every function returns 0, or -1 when it cannot allocate its scratch memory.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#define QK 32 /* values per activation block */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define LK_VNNI 1 /* vpdpbusd: the 8-bit multiply-add and its widening sum in one instruction */
#endif
#ifndef PREFETCH
#define PREFETCH 2048 /* bytes ahead of each weight row the kernels ask the cache for */
#endif
#ifndef Q256
#define Q256 0 /* 1: the 256-bit tile kernel even where 512-bit VNNI is there (for comparison) */
#endif
#ifndef QSCALAR
#define QSCALAR 0 /* 1: activations quantised by the scalar loop even where AVX2 is there (for tests) */
#endif
#ifndef QPREFETCH
#define QPREFETCH 16 /* blocks ahead of a quantised tile the kernels ask the cache for */
#endif

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as PyTorch does */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, u;
    if (exp == 0) {
        if (man == 0) {
            u = sign;
        } else { /* subnormal: normalise */
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            u = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        u = sign | 0x7f800000u | (man << 13);
    } else {
        u = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline float load_x(const void *x, int xdt, size_t i) {
    return xdt ? bf16_to_f32(((const uint16_t *)x)[i]) : ((const float *)x)[i];
}

#ifdef __AVX2__
static inline __m256 load8(const void *x, int xdt, size_t i) { /* 8 values as float32 */
    if (!xdt) return _mm256_loadu_ps((const float *)x + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)x + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif

static inline void store_y(void *y, int ydt, size_t i, float v) {
    if (ydt) ((uint16_t *)y)[i] = f32_to_bf16(v);
    else ((float *)y)[i] = v;
}

#ifdef __AVX2__
static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---------------------------------------------------------------- scheduling */

/* OpenMP chunk (in tiles of tile_bytes weight bytes) for one activation row. A thread streams its
 * chunk's bytes in order; a chunk of a megabyte or more keeps each thread on one long run the
 * hardware prefetcher follows, where chunks of a few kilobytes, handed out in turn, broke both
 * streams: the 0.5B decoder's layers read 18 GB/s with 14-kB chunks and 25 GB/s with 1-MB ones
 * (2 threads, Zen 4). At most an even share per thread, so that every thread has work. */
#define CHUNK_BYTES (1 << 20)
static int decode_chunk(int tiles, size_t tile_bytes) {
#ifdef _OPENMP
    int threads = omp_get_max_threads();
#else
    int threads = 1;
#endif
    int even = (tiles + threads - 1) / threads, chunk = (int)(CHUNK_BYTES / (tile_bytes ? tile_bytes : 1));
    return chunk < 1 ? 1 : chunk > even ? even : chunk;
}

/* bytes of one weight row of K values: kind 32 / 16 float, 8 / 4 bits with a float16 scale per group of G */
static size_t row_bytes(int kind, int K, int G) {
    return kind == 32 ? (size_t)K * 4 : kind == 16 ? (size_t)K * 2 : (size_t)K * kind / 8 + (size_t)(K / G) * 2;
}

/* ---------------------------------------------------------------- bfloat16 weights */

#if defined(__AVX512BF16__) && defined(__AVX512F__)
#define LK_BF16DOT 1 /* AVX512-BF16: vdpbf16ps multiplies 32 bfloat16 pairs per instruction */
/* Rows per pass and per OpenMP chunk. With vdpbf16ps one row at a time streams fastest: the
 * 151,936 x 896 head read 29 GB/s against 21 GB/s four rows at a time (2 threads, Zen 4; one
 * stream per thread suits the hardware prefetcher). The AVX2 path needs four rows to hide its
 * conversions. */
#define BF16_ROWS 1
#define BF16_CHUNK 64
#else
#define BF16_ROWS 4
#define BF16_CHUNK 8
#endif

#ifdef LK_BF16DOT
/* x as bfloat16 pairs for vdpbf16ps: per row, K values hi = bf16(x), then K values lo =
 * bf16(x - hi), which together carry x to about 16 bits. Returns whether any lo is non-zero: a
 * bfloat16 model's activations are bfloat16 already, and its products then take one
 * instruction per 32 values, where float32 activations take two. */
static int bf16_prepare_x(const void *x, int xdt, int M, int K, float *xf) {
    int lo_used = 0;
    for (int m = 0; m < M; m++) {
        uint16_t *hi = (uint16_t *)(xf + (size_t)m * K), *lo = hi + K;
        for (int k = 0; k < K; k++) {
            float v = load_x(x, xdt, (size_t)m * K + k);
            uint16_t h = f32_to_bf16(v);
            hi[k] = h;
            lo[k] = f32_to_bf16(v - bf16_to_f32(h));
            lo_used |= lo[k] != 0;
        }
    }
    return lo_used;
}

/* out[r] = dot(w row r, x) for R (1..4) consecutive rows; x as bf16_prepare_x wrote it. */
static inline void bf16_rows(const uint16_t *w, const float *xf, int K, int R, float *out, int lo_used) {
    const uint16_t *xh = (const uint16_t *)xf, *xl = xh + K;
    if (R == 1 && !lo_used) { /* one row, bfloat16 activations: two sums, 128 bytes a pass */
        __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
        int k = 0;
        for (; k + 64 <= K; k += 64) {
            _mm_prefetch((const char *)(w + k) + PREFETCH, _MM_HINT_T0);
            _mm_prefetch((const char *)(w + k + 32) + PREFETCH, _MM_HINT_T0);
            c0 = _mm512_dpbf16_ps(c0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(xh + k));
            c1 = _mm512_dpbf16_ps(c1, (__m512bh)_mm512_loadu_si512(w + k + 32), (__m512bh)_mm512_loadu_si512(xh + k + 32));
        }
        for (; k + 32 <= K; k += 32)
            c0 = _mm512_dpbf16_ps(c0, (__m512bh)_mm512_loadu_si512(w + k), (__m512bh)_mm512_loadu_si512(xh + k));
        if (k < K)
            c1 = _mm512_dpbf16_ps(c1, (__m512bh)_mm512_maskz_loadu_epi16(0xffff, w + k), (__m512bh)_mm512_maskz_loadu_epi16(0xffff, xh + k));
        out[0] = _mm512_reduce_add_ps(_mm512_add_ps(c0, c1));
        return;
    }
    __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
    int k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh a = (__m512bh)_mm512_loadu_si512(xh + k), b = (__m512bh)_mm512_loadu_si512(xl + k);
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)(w + (size_t)r * K + k) + PREFETCH, _MM_HINT_T0);
            __m512bh v = (__m512bh)_mm512_loadu_si512(w + (size_t)r * K + k);
            acc[r] = _mm512_dpbf16_ps(acc[r], v, a);
            if (lo_used) acc[r] = _mm512_dpbf16_ps(acc[r], v, b);
        }
    }
    if (k < K) { /* K % 16 == 0: a last half block */
        __m512bh a = (__m512bh)_mm512_maskz_loadu_epi16(0xffff, xh + k), b = (__m512bh)_mm512_maskz_loadu_epi16(0xffff, xl + k);
        for (int r = 0; r < R; r++) {
            __m512bh v = (__m512bh)_mm512_maskz_loadu_epi16(0xffff, w + (size_t)r * K + k);
            acc[r] = _mm512_dpbf16_ps(acc[r], v, a);
            if (lo_used) acc[r] = _mm512_dpbf16_ps(acc[r], v, b);
        }
    }
    for (int r = 0; r < R; r++) out[r] = _mm512_reduce_add_ps(acc[r]);
}
#else
/* x as float32, each group of 16 reordered [even values, odd values]: a 32-byte load of 16
 * bfloat16 weights gives the even ones by a 16-bit shift and the odd ones by a mask, with no
 * widening shuffle. */
static int bf16_prepare_x(const void *x, int xdt, int M, int K, float *xf) {
    for (int m = 0; m < M; m++)
        for (int g = 0; g < K; g += 16)
            for (int i = 0; i < 8; i++) {
                xf[(size_t)m * K + g + i] = load_x(x, xdt, (size_t)m * K + g + 2 * i);
                xf[(size_t)m * K + g + 8 + i] = load_x(x, xdt, (size_t)m * K + g + 2 * i + 1);
            }
    return 0;
}

/* out[r] = dot(w row r, xf) for R (1..4) consecutive rows. */
static inline void bf16_rows(const uint16_t *w, const float *xf, int K, int R, float *out, int lo_used) {
    (void)lo_used;
#ifdef __AVX2__
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    const __m256i hi = _mm256_set1_epi32((int)0xffff0000u);
    for (int k = 0; k < K; k += 16) {
        __m256 xe = _mm256_loadu_ps(xf + k), xo = _mm256_loadu_ps(xf + k + 8);
        for (int r = 0; r < R; r++) {
            if (!(k & 31)) _mm_prefetch((const char *)(w + (size_t)r * K + k) + PREFETCH, _MM_HINT_T0);
            __m256i v = _mm256_loadu_si256((const __m256i *)(w + (size_t)r * K + k));
            acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v, 16)), xe, acc[r]);
            acc[r] = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v, hi)), xo, acc[r]);
        }
    }
    for (int r = 0; r < R; r++) out[r] = hsum(acc[r]);
#else
    for (int r = 0; r < R; r++) {
        float s = 0.f;
        for (int k = 0; k < K; k += 16)
            for (int i = 0; i < 8; i++)
                s += bf16_to_f32(w[(size_t)r * K + k + 2 * i]) * xf[k + i] +
                     bf16_to_f32(w[(size_t)r * K + k + 2 * i + 1]) * xf[k + 8 + i];
        out[r] = s;
    }
#endif
}

#endif

int lk_linear_bf16(const void *x, int xdt, const uint16_t *w, const float *bias, void *y, int ydt,
                   int M, int N, int K) {
    float *xf = (float *)malloc(sizeof(float) * (size_t)M * K);
    if (!xf) return -1;
    int lo_used = bf16_prepare_x(x, xdt, M, K, xf);
    int tiles = (N + BF16_ROWS - 1) / BF16_ROWS;
    int chunk = M == 1 ? decode_chunk(tiles, (size_t)BF16_ROWS * K * 2) : BF16_CHUNK;
#pragma omp parallel for schedule(dynamic, chunk)
    for (int t = 0; t < tiles; t++) {
        int n0 = t * BF16_ROWS, R = N - n0 < BF16_ROWS ? N - n0 : BF16_ROWS;
        float out[4];
        for (int m = 0; m < M; m++) {
            bf16_rows(w + (size_t)n0 * K, xf + (size_t)m * K, K, R, out, lo_used);
            for (int r = 0; r < R; r++)
                store_y(y, ydt, (size_t)m * N + n0 + r, out[r] + (bias ? bias[n0 + r] : 0.f));
        }
    }
    free(xf);
    return 0;
}

/* ---------------------------------------------------------------- int8 / int4 weights */

/* Activations quantised per block of 32: q = round(x / d), d = max|x| / 127. */
typedef struct {
    int8_t *q;  /* (M, K) */
    uint8_t *a; /* |q|: the unsigned operand of the 8-bit multiply-add against int8 weights */
    float *d;   /* (M, K / 32) block scales */
    float *d8;  /* 8 * d * sum(q) per block: int4 values are stored as q + 8, this takes the 8 back off */
} qx;

static size_t qx_bytes(int M, int K) { return (size_t)M * K * 2 + (size_t)M * (K / QK) * 2 * sizeof(float) + 64; }

static qx qx_carve(char *mem, int M, int K) {
    qx x;
    x.d = (float *)mem;
    x.d8 = x.d + (size_t)M * (K / QK);
    x.q = (int8_t *)(x.d8 + (size_t)M * (K / QK));
    x.a = (uint8_t *)(x.q + (size_t)M * K);
    return x;
}

#ifdef __AVX2__
/* One block of 32 values, as the scalar loop below quantises it, to the bit: the same float
 * products, rounded to nearest even (lrintf's mode) and clamped, and the same scale arithmetic. A
 * vector of Qwen2-0.5B's MLP (4,864 values) took 15-29 us the scalar way, run serially before each
 * product. */
static inline void quantize_block8(const void *x, int xdt, size_t o, int8_t *q, uint8_t *a, float *d_out, float *d8_out) {
    __m256 v[4], amax = _mm256_setzero_ps();
    const __m256 sign = _mm256_set1_ps(-0.f);
    for (int i = 0; i < 4; i++) {
        v[i] = load8(x, xdt, o + 8 * i);
        amax = _mm256_max_ps(_mm256_andnot_ps(sign, v[i]), amax); /* a NaN keeps the maximum so far, as `a > amax` does */
    }
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
    float mx = _mm_cvtss_f32(m4), d = mx / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    __m256i qi[4], sum = _mm256_setzero_si256();
    const __m256i hi = _mm256_set1_epi32(127), lo = _mm256_set1_epi32(-127);
    for (int i = 0; i < 4; i++) {
        __m256 f = _mm256_mul_ps(v[i], _mm256_set1_ps(id));
        qi[i] = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvtps_epi32(f), lo), hi);
        /* NaN to 0, as (int)lrintf(NaN) gives (the 64-bit conversion's "indefinite" value cut to 32 bits) */
        qi[i] = _mm256_and_si256(qi[i], _mm256_castps_si256(_mm256_cmp_ps(f, f, _CMP_ORD_Q)));
        sum = _mm256_add_epi32(sum, qi[i]);
    }
    __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)); /* packs work per 128-bit lane */
    _mm256_storeu_si256((__m256i *)q, p);
    _mm256_storeu_si256((__m256i *)a, _mm256_abs_epi8(p));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4e));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xb1));
    *d_out = d;
    *d8_out = 8.f * d * (float)_mm_cvtsi128_si32(s4);
}
#endif

static void quantize_x(const void *x, int xdt, int M, int K, qx out) {
    for (int m = 0; m < M; m++)
        for (int b = 0; b < K / QK; b++) {
            size_t o = (size_t)m * K + (size_t)b * QK, bi = (size_t)m * (K / QK) + b;
#ifdef __AVX2__
            if (!QSCALAR) {
                quantize_block8(x, xdt, o, out.q + o, out.a + o, out.d + bi, out.d8 + bi);
                continue;
            }
#endif
            float v[QK], amax = 0.f;
            for (int i = 0; i < QK; i++) {
                v[i] = load_x(x, xdt, o + i);
                float a = fabsf(v[i]);
                amax = a > amax ? a : amax;
            }
            float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
            int sum = 0;
            for (int i = 0; i < QK; i++) {
                int q = (int)lrintf(v[i] * id);
                q = q > 127 ? 127 : (q < -127 ? -127 : q);
                out.q[o + i] = (int8_t)q;
                out.a[o + i] = (uint8_t)(q < 0 ? -q : q);
                sum += q;
            }
            out.d[bi] = d;
            out.d8[bi] = 8.f * d * (float)sum;
        }
}

/* Quantised weights are stored in tiles of 8 rows (the row count padded to a multiple of 8), so
 * that one pass over a tile's bytes, in order, gives all 8 rows' dot products in the 8 lanes of
 * one vector: no horizontal sums, one conversion and one scale multiply per block for 8 rows, and
 * a single sequential stream per thread for the prefetcher. Per tile t and block b (32 values):
 *   int8: 256 bytes: for chunk c = 0..7 (values 4c..4c+3), for row r = 0..7: 4 int8 values.
 *   int4: 128 bytes: for load j = 0..3, for row r = 0..7, for i = 0..3: a byte whose low nibble
 *         is value 4j+i of row r and whose high nibble is value 4(j+4)+i, each stored as q + 8.
 *   scales: (tiles, K / G, 8) float16: a group's 8 row scales side by side.
 * Activation chunks of 4 bytes are broadcast against the 8 rows. int8: |x| * (w * sign(x)) fits
 * the unsigned-by-signed 8-bit multiply-add exactly. int4: the stored nibble q + 8 is unsigned,
 * multiplies x directly (8 products per lane stay within int16), and 8 * sum(x) per block is
 * taken off at the end. */
#if defined(LK_VNNI) && defined(__AVX512BW__)
/* The same tile product in 512-bit registers: each load takes two 32-byte groups of the block (the
 * 8 rows' bytes for two activation chunks), so a block needs half the loads and multiply-adds; the
 * two halves' integer sums are added before the conversion, so the result equals the 256-bit
 * path's to the bit. The int4 output head of Qwen2-0.5B (151,936 x 896) on a 2-core Zen 4: 2.5-3.2
 * ms with the 256-bit kernel, 2.0 ms with this one (2 threads; one thread reads 3.2 ms either way). */
static void qtile8_512(int bits, const uint8_t *tile, const uint16_t *tscales, int G, const int8_t *xq,
                       const uint8_t *xa, const float *xd, const float *xd8, int K, float *out) {
    int per = G / QK, nb = K / QK, si = 0, left = per;
    size_t block_bytes = bits == 8 ? 256 : 128;
    __m256 acc = _mm256_setzero_ps(), corr = _mm256_setzero_ps();
    const __m512i low = _mm512_set1_epi8(0x0f), zero = _mm512_setzero_si512();
    /* lanes 0-7 take activation chunk c, lanes 8-15 chunk c + 1 */
    const __m512i pair[4] = {_mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0),
                             _mm512_set_epi32(3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2),
                             _mm512_set_epi32(5, 5, 5, 5, 5, 5, 5, 5, 4, 4, 4, 4, 4, 4, 4, 4),
                             _mm512_set_epi32(7, 7, 7, 7, 7, 7, 7, 7, 6, 6, 6, 6, 6, 6, 6, 6)};
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = tile + (size_t)b * block_bytes;
        for (size_t line = 0; line < block_bytes; line += 64)
            _mm_prefetch((const char *)wb + QPREFETCH * block_bytes + line, _MM_HINT_T0);
        __m512i x = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xq + (size_t)b * QK)));
        __m512i s0 = zero, s1 = zero;
        __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tscales + (size_t)si * 8)));
        if (bits == 8) {
            __m512i a = _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)(xa + (size_t)b * QK)));
            for (int c = 0; c < 4; c++) {
                __m512i v = _mm512_loadu_si512(wb + c * 64), xs = _mm512_permutexvar_epi32(pair[c], x);
                v = _mm512_mask_sub_epi8(v, _mm512_movepi8_mask(xs), zero, v); /* w * sign(x) */
                if (c & 1) s1 = _mm512_dpbusd_epi32(s1, _mm512_permutexvar_epi32(pair[c], a), v);
                else s0 = _mm512_dpbusd_epi32(s0, _mm512_permutexvar_epi32(pair[c], a), v);
            }
        } else { /* bytes 0-63: low nibbles chunks 0, 1, high nibbles 4, 5; bytes 64-127: 2, 3 and 6, 7 */
            __m512i v0 = _mm512_loadu_si512(wb), v1 = _mm512_loadu_si512(wb + 64);
            s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v0, low), _mm512_permutexvar_epi32(pair[0], x));
            s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v0, 4), low), _mm512_permutexvar_epi32(pair[2], x));
            s0 = _mm512_dpbusd_epi32(s0, _mm512_and_si512(v1, low), _mm512_permutexvar_epi32(pair[1], x));
            s1 = _mm512_dpbusd_epi32(s1, _mm512_and_si512(_mm512_srli_epi16(v1, 4), low), _mm512_permutexvar_epi32(pair[3], x));
            corr = _mm256_fmadd_ps(ws, _mm256_set1_ps(xd8[b]), corr);
        }
        __m512i s = _mm512_add_epi32(s0, s1);
        __m256i s32 = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(ws, _mm256_set1_ps(xd[b])), acc);
        if (--left == 0) { si++; left = per; }
    }
    _mm256_storeu_ps(out, _mm256_sub_ps(acc, corr));
}
#define LK_Q512 1
#endif

static void qtile8(int bits, const uint8_t *tile, const uint16_t *tscales, int G, const int8_t *xq, const uint8_t *xa,
                   const float *xd, const float *xd8, int K, float *out) {
#ifdef LK_Q512
    if (!Q256) {
        qtile8_512(bits, tile, tscales, G, xq, xa, xd, xd8, K, out);
        return;
    }
#endif
    int per = G / QK, nb = K / QK;
    size_t block_bytes = bits == 8 ? 256 : 128;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), corr = _mm256_setzero_ps();
    const __m256i low = _mm256_set1_epi8(0x0f);
#ifndef LK_VNNI
    const __m256i ones = _mm256_set1_epi16(1);
#endif
    int si = 0, left = per;
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = tile + (size_t)b * block_bytes;
        const int32_t *xc = (const int32_t *)(xq + (size_t)b * QK);
        __m256 ws = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(tscales + (size_t)si * 8)));
        __m256i s32;
        for (size_t line = 0; line < block_bytes; line += 64) /* every cache line of the block QPREFETCH ahead */
            _mm_prefetch((const char *)wb + QPREFETCH * block_bytes + line, _MM_HINT_T0);
        if (bits == 8) {
            const int32_t *ac = (const int32_t *)(xa + (size_t)b * QK);
            s32 = _mm256_setzero_si256();
            for (int c = 0; c < 8; c++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + c * 32));
#ifdef LK_VNNI
                s32 = _mm256_dpbusd_epi32(s32, _mm256_set1_epi32(ac[c]), _mm256_sign_epi8(v, _mm256_set1_epi32(xc[c])));
#else
                __m256i p = _mm256_maddubs_epi16(_mm256_set1_epi32(ac[c]), _mm256_sign_epi8(v, _mm256_set1_epi32(xc[c])));
                s32 = _mm256_add_epi32(s32, _mm256_madd_epi16(p, ones));
#endif
            }
        } else {
#ifdef LK_VNNI
            s32 = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + j * 32));
                s32 = _mm256_dpbusd_epi32(s32, _mm256_and_si256(v, low), _mm256_set1_epi32(xc[j]));
                s32 = _mm256_dpbusd_epi32(s32, _mm256_and_si256(_mm256_srli_epi16(v, 4), low), _mm256_set1_epi32(xc[j + 4]));
            }
#else
            __m256i s16 = _mm256_setzero_si256();
            for (int j = 0; j < 4; j++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(wb + j * 32));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(v, low), _mm256_set1_epi32(xc[j])));
                s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), low),
                                                                 _mm256_set1_epi32(xc[j + 4])));
            }
            s32 = _mm256_madd_epi16(s16, ones);
#endif
            corr = _mm256_fmadd_ps(ws, _mm256_set1_ps(xd8[b]), corr);
        }
        acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s32), _mm256_mul_ps(ws, _mm256_set1_ps(xd[b])), acc);
        if (--left == 0) { si++; left = per; }
    }
    _mm256_storeu_ps(out, _mm256_sub_ps(acc, corr));
#else
    (void)xa; (void)xd8;
    for (int r = 0; r < 8; r++) out[r] = 0.f;
    for (int b = 0; b < nb; b++) {
        const uint8_t *wb = tile + (size_t)b * block_bytes;
        const int8_t *x = xq + (size_t)b * QK;
        for (int r = 0; r < 8; r++) {
            int32_t sum = 0;
            for (int c = 0; c < 8; c++)
                for (int i = 0; i < 4; i++) {
                    int wv;
                    if (bits == 8) {
                        wv = ((const int8_t *)wb)[c * 32 + r * 4 + i];
                    } else {
                        uint8_t byte = wb[(c & 3) * 32 + r * 4 + i];
                        wv = (c < 4 ? (byte & 15) : (byte >> 4)) - 8;
                    }
                    sum += wv * x[c * 4 + i];
                }
            out[r] += (float)sum * f16_to_f32(tscales[(size_t)(b / per) * 8 + r]) * xd[b];
        }
    }
#endif
}

/* Rows [n0, n0 + R) (n0 a multiple of 8, R <= 8) of a tiled quantised matrix against batch row m. */
static inline void qtile(int bits, const void *w, const uint16_t *scales, int G, int n0, int R, qx x, int m, int K,
                         float *out) {
    size_t tile_bytes = bits == 8 ? (size_t)K * 8 : (size_t)K * 4, nb = (size_t)(K / QK);
    float all[8];
    qtile8(bits, (const uint8_t *)w + (size_t)(n0 / 8) * tile_bytes, scales + (size_t)(n0 / 8) * (K / G) * 8, G,
           x.q + (size_t)m * K, x.a + (size_t)m * K, x.d + m * nb, x.d8 + m * nb, K, all);
    for (int r = 0; r < R; r++) out[r] = all[r];
}

#define MBLOCK 64 /* activation rows per pass over the weights: their int8 blocks stay in L2 */

static int linear_q(int bits, const void *x, int xdt, const void *w, const uint16_t *scales, int G,
                    const float *bias, void *y, int ydt, int M, int N, int K) {
    char *mem = (char *)malloc(qx_bytes(M, K));
    if (!mem) return -1;
    qx xq = qx_carve(mem, M, K);
    if (M > 8) {
#pragma omp parallel for schedule(static)
        for (int m = 0; m < M; m++) {
            qx row = {xq.q + (size_t)m * K, xq.a + (size_t)m * K, xq.d + (size_t)m * (K / QK), xq.d8 + (size_t)m * (K / QK)};
            quantize_x((const char *)x + (size_t)m * K * (xdt ? 2 : 4), xdt, 1, K, row);
        }
    } else {
        quantize_x(x, xdt, M, K, xq);
    }
    int tiles = (N + 7) / 8;
    /* one row: long runs of tiles per thread (see decode_chunk); many rows: small chunks balance the threads */
    int chunk = M == 1 ? decode_chunk(tiles, 8 * row_bytes(bits, K, G)) : 8;
    for (int m0 = 0; m0 < M; m0 += MBLOCK) {
        int m1 = M - m0 < MBLOCK ? M : m0 + MBLOCK;
#pragma omp parallel for schedule(dynamic, chunk)
        for (int t = 0; t < tiles; t++) {
            int n0 = t * 8, R = N - n0 < 8 ? N - n0 : 8;
            float out[8];
            for (int m = m0; m < m1; m++) {
                qtile(bits, w, scales, G, n0, R, xq, m, K, out);
                for (int r = 0; r < R; r++) store_y(y, ydt, (size_t)m * N + n0 + r, out[r] + (bias ? bias[n0 + r] : 0.f));
            }
        }
    }
    free(mem);
    return 0;
}

int lk_linear_int8(const void *x, int xdt, const int8_t *w, const uint16_t *scales, int G, const float *bias,
                   void *y, int ydt, int M, int N, int K) {
    return linear_q(8, x, xdt, w, scales, G, bias, y, ydt, M, N, K);
}

int lk_linear_int4(const void *x, int xdt, const uint8_t *w, const uint16_t *scales, int G, const float *bias,
                   void *y, int ydt, int M, int N, int K) {
    return linear_q(4, x, xdt, w, scales, G, bias, y, ydt, M, N, K);
}


/* Tiles back to a float32 (N, K) matrix, for a prompt's many rows: there a float32 GEMM beats
 * the tile kernels, and PyTorch's unpacking takes several passes over the weight (about a fifth
 * of the product's time at 1.5k rows). Layout as quantize_tiles writes it: per tile of 8 rows and
 * block of 32 columns, column c*4+j of row r is at [chunk c][r][j] (int4: chunks 4..7 are the high
 * nibbles of chunks 0..3); the scale of row r, group g is scales[(tile * groups + g) * 8 + r]. */
int lk_dequant_tiles(int bits, const void *w, const uint16_t *scales, int G, int N, int K, float *out) {
    int tiles = (N + 7) / 8, blocks = K / 32, groups = K / G;
#pragma omp parallel for schedule(static)
    for (int t = 0; t < tiles; t++) {
        for (int b = 0; b < blocks; b++) {
            int g = b * 32 / G;
            for (int r = 0; r < 8; r++) {
                int row = t * 8 + r;
                if (row >= N) break;
                float s = f16_to_f32(scales[((size_t)t * groups + g) * 8 + r]);
                float *o = out + (size_t)row * K + b * 32;
                if (bits == 8) {
                    const int8_t *q = (const int8_t *)w + (((size_t)t * blocks + b) * 8 * 8 + r) * 4;
                    for (int c = 0; c < 8; c++)
                        for (int j = 0; j < 4; j++) o[c * 4 + j] = s * q[c * 32 + j];
                } else {
                    const uint8_t *q = (const uint8_t *)w + (((size_t)t * blocks + b) * 4 * 8 + r) * 4;
                    for (int c = 0; c < 4; c++)
                        for (int j = 0; j < 4; j++) {
                            uint8_t v = q[c * 32 + j];
                            o[c * 4 + j] = s * ((int)(v & 15) - 8);
                            o[(c + 4) * 4 + j] = s * ((int)(v >> 4) - 8);
                        }
                }
            }
        }
    }
    return 0;
}


/* ---------------------------------------------------------------- greedy pick */

/* For each of M rows of N logits (float32 or bfloat16): the index of the first maximum, and the
 * maximum, NaN if the row holds one (what torch.max reports), so the caller can refuse the row.
 * PyTorch's CPU max over 152k bfloat16 logits took 0.45 ms with the conversion: a tenth of an
 * int4 token of the 0.5B decoder. */
int lk_argmax(const void *x, int xdt, int M, int N, int64_t *index, float *best) {
    for (int m = 0; m < M; m++) {
        size_t row = (size_t)m * N;
        float mx = -INFINITY;
        int nan = 0, i = 0;
#ifdef __AVX2__
        __m256 vmx = _mm256_set1_ps(-INFINITY), unord = _mm256_setzero_ps();
        for (; i + 8 <= N; i += 8) {
            __m256 v = load8(x, xdt, row + i);
            unord = _mm256_or_ps(unord, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
            vmx = _mm256_max_ps(vmx, v);
        }
        float lanes[8];
        _mm256_storeu_ps(lanes, vmx);
        for (int l = 0; l < 8; l++) mx = lanes[l] > mx ? lanes[l] : mx;
        nan = _mm256_movemask_ps(unord) != 0;
#endif
        for (int j = i; j < N; j++) {
            float v = load_x(x, xdt, row + j);
            nan |= v != v;
            mx = v > mx ? v : mx;
        }
        int64_t at = 0;
        if (nan) {
            mx = NAN;
        } else {
            int j = 0;
#ifdef __AVX2__
            __m256 target = _mm256_set1_ps(mx);
            for (; j + 8 <= N; j += 8)
                if (_mm256_movemask_ps(_mm256_cmp_ps(load8(x, xdt, row + j), target, _CMP_EQ_OQ))) break;
#endif
            while (j < N && load_x(x, xdt, row + j) != mx) j++;
            at = j < N ? j : 0; /* a row of -inf only: index 0, as torch.max */
        }
        index[m] = at;
        best[m] = mx;
    }
    return 0;
}

/* ---------------------------------------------------------------- float32 weights */

static inline float f32_dot(const float *w, const float *x, int K) {
#ifdef __AVX2__
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + k + 8), _mm256_loadu_ps(x + k + 8), a1);
    }
    float s = hsum(_mm256_add_ps(a0, a1));
#else
    float s = 0.f;
    int k = 0;
#endif
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}

/* ================================================================ one decode step, all layers
 *
 * The decoder of Llama / Mistral / Qwen2 for B rows of one new token each, against the engine's
 * paged key/value pool: the whole step in one call, so that no per-operation overhead is paid
 * between the matrix products. It computes what llavakit/model/text.py computes for a
 * single-token step; with bfloat16 activations (dt 1) every intermediate that PyTorch would
 * round to bfloat16 is rounded here at the same place, so the two paths agree to accumulation
 * order. Supports gated SiLU MLPs, biases on any projection, per-layer sliding windows and
 * grouped key/value heads; callers check everything else before choosing this path.
 */

typedef struct {
    const void *w;          /* weight: float32 (kind 32), bfloat16 (16), int8 (8) or int4 (4) */
    const uint16_t *scales; /* float16 group scales (kinds 8 and 4) */
    const void *bias;       /* (n,) in the model dtype, or NULL */
    int kind, group, n, k;
} lk_linear;

typedef struct {
    lk_linear q, k, v, o, gate, up, down;
    const void *attn_norm, *mlp_norm; /* (D,) model dtype */
    void *kpool, *vpool;              /* (slots, Hkv, hd) in the cache dtype */
    int window;                       /* sliding window, 0 for none */
} lk_layer;

#ifdef LK_PROFILE /* a build with -DLK_PROFILE times the step's phases; lk_prof_print() writes them to stderr */
#include <stdio.h>
#include <time.h>
static double prof[8];
static double prof_now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }
#define PROF_START double prof_t = prof_now()
#define PROF(i) do { double n_ = prof_now(); prof[i] += n_ - prof_t; prof_t = n_; } while (0)
void lk_prof_print(void) { for (int i = 0; i < 8; i++) fprintf(stderr, "phase %d: %.2f ms\n", i, prof[i] * 1e3); }
#else
#define PROF_START
#define PROF(i)
#endif

static inline float rnd(int dt, float v) { return dt ? bf16_to_f32(f32_to_bf16(v)) : v; }

static inline float load_t(const void *p, int dt, size_t i) {
    return dt ? bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

typedef struct {
    const lk_linear *m;
    const float *x; /* (B, k) float, already rounded to the model dtype */
    float *y;       /* (B, n) */
    void *y_dt;     /* or, when not NULL, (B, n) in the model dtype: the output head's logits, stored once */
    float *xf;      /* bf16 kind: x laid out for the kernel (bf16_prepare_x) */
    int lo_used;    /* bf16 kind: what bf16_prepare_x returned */
    qx xq;          /* int8 / int4 kinds: x quantised */
} job;

static size_t job_scratch(const lk_linear *m, int B) { return qx_bytes(B, m->k) + (size_t)B * m->k * sizeof(float); }

static void job_prepare(job *j, int B, char *scratch, const job *same) {
    const lk_linear *m = j->m;
    if (m->kind == 16) {
        j->xf = (float *)scratch;
        j->lo_used = bf16_prepare_x(j->x, 0, B, m->k, j->xf);
    } else if (m->kind == 8 || m->kind == 4) {
        if (same) { /* q, k and v (gate and up) read the same input: quantise it once */
            j->xq = same->xq;
            return;
        }
        j->xq = qx_carve(scratch, B, m->k);
        quantize_x(j->x, 0, B, m->k, j->xq);
    }
}

/* Rows [n0, n0 + R) of job j for every batch row, rounded to dt. */
static void job_rows(const job *j, int B, int n0, int R, int dt, int bias_dt) {
    const lk_linear *m = j->m;
    int K = m->k;
    for (int b = 0; b < B; b++) {
        float out[8];
        if (m->kind == 16) {
            bf16_rows((const uint16_t *)m->w + (size_t)n0 * K, j->xf + (size_t)b * K, K, R, out, j->lo_used);
        } else if (m->kind == 32) {
            for (int r = 0; r < R; r++) out[r] = f32_dot((const float *)m->w + (size_t)(n0 + r) * K, j->x + (size_t)b * K, K);
        } else {
            qtile(m->kind, m->w, m->scales, m->group, n0, R, j->xq, b, K, out);
        }
        for (int r = 0; r < R; r++) {
            float v = out[r] + (m->bias ? load_t(m->bias, bias_dt, n0 + r) : 0.f);
            if (j->y_dt) store_y(j->y_dt, dt, (size_t)b * m->n + n0 + r, v); /* the same bits rnd() would keep */
            else j->y[(size_t)b * m->n + n0 + r] = rnd(dt, v);
        }
    }
}

/* Several products in one parallel region (q, k and v; gate and up): their rows are one index space. */
static int run_jobs(job *jobs, int nj, int B, int dt) {
    size_t total = 0;
    for (int i = 0; i < nj; i++) total += job_scratch(jobs[i].m, B);
    char *scratch = (char *)malloc(total);
    if (!scratch) return -1;
    size_t off = 0;
    int tiles = 0, start[8], width[8];
    for (int i = 0; i < nj; i++) {
        const job *same = NULL;
        for (int e = 0; e < i; e++)
            if (jobs[e].x == jobs[i].x && jobs[e].m->kind == jobs[i].m->kind && jobs[e].m->k == jobs[i].m->k &&
                (jobs[i].m->kind == 8 || jobs[i].m->kind == 4))
                same = &jobs[e];
        job_prepare(&jobs[i], B, scratch + off, same);
        off += job_scratch(jobs[i].m, B);
        start[i] = tiles;
        width[i] = jobs[i].m->kind == 8 || jobs[i].m->kind == 4 ? 8 : jobs[i].m->kind == 16 ? BF16_ROWS : 4;  /* rows per tile */
        tiles += (jobs[i].m->n + width[i] - 1) / width[i];
    }
    int chunk = decode_chunk(tiles, (size_t)width[0] * row_bytes(jobs[0].m->kind, jobs[0].m->k, jobs[0].m->group));
#pragma omp parallel for schedule(dynamic, chunk)
    for (int t = 0; t < tiles; t++) {
        int i = nj - 1;
        while (start[i] > t) i--;
        int n0 = (t - start[i]) * width[i], n = jobs[i].m->n;
        job_rows(&jobs[i], B, n0, n - n0 < width[i] ? n - n0 : width[i], dt, dt);
    }
    free(scratch);
    return 0;
}

static void rms_norm(const float *x, const void *w, int dt, int B, int D, float eps, float *out) {
    for (int b = 0; b < B; b++) {
        const float *r = x + (size_t)b * D;
        float ss = 0.f;
        for (int i = 0; i < D; i++) ss += r[i] * r[i];
        float inv = 1.f / sqrtf(ss / D + eps);
        for (int i = 0; i < D; i++) out[(size_t)b * D + i] = rnd(dt, load_t(w, dt, i) * rnd(dt, r[i] * inv));
    }
}

/* x * cos + rotate_half(x) * sin for one head of hd values, each product and the sum rounded. */
static void rope(float *x, const float *cos, const float *sin, int hd, int dt) {
    float tmp[512];
    int half = hd / 2;
    for (int i = 0; i < hd; i++) {
        float rot = i < half ? -x[i + half] : x[i - half];
        tmp[i] = rnd(dt, rnd(dt, x[i] * cos[i]) + rnd(dt, rot * sin[i]));
    }
    memcpy(x, tmp, sizeof(float) * hd);
}

#ifdef __AVX2__
/* exp of 8 floats for SiLU and the softmax: Cephes' range reduction and polynomial, within 1 ulp of
 * expf over [-87, 88] (inputs clamped to +-88.38, past which expf overflows or leaves the normal range). */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-88.3762626647949f)), _mm256_set1_ps(88.3762626647949f));
    __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
    x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, x, _mm256_set1_ps(5.0000001201e-1f));
    __m256 y = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(x, x), x), _mm256_set1_ps(1.f));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* 8 floats rounded to bfloat16 (nearest even) and back, as rnd(1, .) does, NaN kept a NaN. */
static inline __m256 rnd8(__m256 v) {
    __m256i u = _mm256_castps_si256(v);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_and_si256(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)),
                                 _mm256_set1_epi32((int)0xffff0000u));
    __m256i quiet = _mm256_and_si256(_mm256_or_si256(u, _mm256_set1_epi32(0x00400000)), _mm256_set1_epi32((int)0xffff0000u));
    return _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(quiet), _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
}
#endif

#ifdef __AVX2__
/* Four key rows (4, hd), hd % 8 == 0, against one query: four sums, each in f32_dot1's order. */
static inline void f32_dot1x4(const float *k, int hd, const float *q, float *d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (int i = 0; i < hd; i += 8) {
        __m256 qq = _mm256_loadu_ps(q + i);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(k + i), qq, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(k + hd + i), qq, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 2 * hd + i), qq, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(k + 3 * hd + i), qq, a3);
    }
    d[0] = hsum(a0); d[1] = hsum(a1); d[2] = hsum(a2); d[3] = hsum(a3);
}
#endif

/* dot(k, q) over one head (hd values), one 8-wide sum: a bfloat16 key row is widened first (exact). */
static inline float f32_dot1(const float *k, const float *q, int hd) {
    int i = 0;
    float s = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; i + 8 <= hd; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(k + i), _mm256_loadu_ps(q + i), acc);
    s = hsum(acc);
#endif
    for (; i < hd; i++) s += k[i] * q[i];
    return s;
}

/* acc += w * v over one head (hd values); a bfloat16 value row is widened first (exact). */
static inline void f32_axpy1(float w, const float *v, float *acc, int hd) {
    int i = 0;
#ifdef __AVX2__
    __m256 wv = _mm256_set1_ps(w);
    for (; i + 8 <= hd; i += 8)
        _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(wv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
#endif
    for (; i < hd; i++) acc[i] += w * v[i];
}

static inline void widen_bf16(const uint16_t *x, float *out, int n) {
    for (int i = 0; i < n; i++) out[i] = bf16_to_f32(x[i]);
}

/* Attention of the `group` query heads that share one key/value head, for one row: each key and value
 * row is read and widened once for all of them (7 query heads a key/value head in Qwen2-0.5B), and each
 * head's dot products and weighted sums run in the order of a head computed alone.
 *   q     (group, hd) the heads' queries          slots  the row's read slots, by position
 *   probs (group, S) scratch                      out    (group, hd) the heads' outputs
 *   kv_off the head's offset within a slot (kh * hd); kvn values a slot */
static void attend_group(const float *q, int group, int hd, const void *kpool, const void *vpool, int cache_dt,
                         size_t kv_off, size_t kvn, const int64_t *slots, int64_t lo, int64_t pos, float scale,
                         float *probs, int S, float *out) {
    float row[4 * 512];
    int64_t s0 = lo;
#ifdef __AVX2__
    /* Four keys at a time: four independent sums hide the multiply-add latency one sum would wait on. */
    for (; cache_dt && hd % 8 == 0 && s0 + 4 <= pos + 1; s0 += 4) {
        for (int r = 0; r < 4; r++) widen_bf16((const uint16_t *)kpool + (size_t)slots[s0 + r] * kvn + kv_off, row + r * hd, hd);
        for (int j = 0; j < group; j++) {
            float d[4];
            f32_dot1x4(row, hd, q + (size_t)j * hd, d);
            for (int r = 0; r < 4; r++) probs[(size_t)j * S + s0 + r] = d[r] * scale;
        }
    }
#endif
    for (int64_t s = s0; s <= pos; s++) {
        size_t off = (size_t)slots[s] * kvn + kv_off;
        if (cache_dt) {
            widen_bf16((const uint16_t *)kpool + off, row, hd);
            for (int j = 0; j < group; j++) probs[(size_t)j * S + s] = f32_dot1(row, q + (size_t)j * hd, hd) * scale;
        } else {
            for (int j = 0; j < group; j++)
                probs[(size_t)j * S + s] = f32_dot((const float *)kpool + off, q + (size_t)j * hd, hd) * scale;
        }
    }
    for (int j = 0; j < group; j++) { /* softmax, each weight as the values will meet it */
        float *p = probs + (size_t)j * S, mx = -INFINITY, sum = 0.f;
        for (int64_t s = lo; s <= pos; s++) mx = p[s] > mx ? p[s] : mx;
        int64_t s = lo;
#ifdef __AVX2__
        __m256 sums = _mm256_setzero_ps(), top = _mm256_set1_ps(mx);
        for (; s + 8 <= pos + 1; s += 8) {
            __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + s), top));
            _mm256_storeu_ps(p + s, e);
            sums = _mm256_add_ps(sums, e);
        }
        sum = hsum(sums);
#endif
        for (; s <= pos; s++) {
            p[s] = expf(p[s] - mx);
            sum += p[s];
        }
        for (int64_t s = lo; s <= pos; s++) p[s] = cache_dt ? rnd(1, p[s] / sum) : p[s] / sum;
    }
    memset(out, 0, sizeof(float) * (size_t)group * hd);
    for (int64_t s = lo; s <= pos; s++) {
        size_t off = (size_t)slots[s] * kvn + kv_off;
        if (cache_dt) {
            widen_bf16((const uint16_t *)vpool + off, row, hd);
            for (int j = 0; j < group; j++) f32_axpy1(probs[(size_t)j * S + s], row, out + (size_t)j * hd, hd);
        } else {
            const float *vv = (const float *)vpool + off;
            for (int j = 0; j < group; j++) {
                float w = probs[(size_t)j * S + s], *acc = out + (size_t)j * hd;
                for (int i = 0; i < hd; i++) acc[i] += w * vv[i];
            }
        }
    }
    for (size_t i = 0; i < (size_t)group * hd; i++) out[i] = rnd(cache_dt, out[i]);
}

/* g = silu(g) * u over n values, each result rounded as PyTorch rounds it in dtype dt. A vector
 * exp instead of expf: within an ulp of float32, far below a bfloat16 step. */
static void silu_mul(float *g, const float *u, size_t n, int dt) {
    size_t blocks = (n + 511) / 512;
#pragma omp parallel for schedule(static) if (n >= 65536)
    for (size_t blk = 0; blk < blocks; blk++) {
        size_t i = blk * 512, end = i + 512 < n ? i + 512 : n;
#ifdef __AVX2__
        for (; i + 8 <= end; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i);
            __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
            if (dt) s = rnd8(s);
            __m256 r = _mm256_mul_ps(s, _mm256_loadu_ps(u + i));
            _mm256_storeu_ps(g + i, dt ? rnd8(r) : r);
        }
#endif
        for (; i < end; i++) g[i] = rnd(dt, rnd(dt, g[i] / (1.f + expf(-g[i]))) * u[i]);
    }
}

/* x_io (B, D): the new tokens' embeddings in, the final-normed hidden states out. cos, sin: rotary
 * tables (positions, hd) in float32, row p for position p, covering every position given. head, when
 * not NULL, is the output head, applied in the same call: logits (B, head->n) in the model dtype. */
int lk_decode_layers(const lk_layer *layers, int L, const void *final_norm, void *x_io, int B, int D, int H, int Hkv,
                     int hd, int I, float eps, const float *cos, const float *sin, const int64_t *write_slots,
                     const int64_t *read_slots, const int64_t *positions, int S, int dt, int cache_dt,
                     const lk_linear *head, void *logits) {
    if (hd > 512 || H % Hkv) return -2;
    size_t qn = (size_t)H * hd, kvn = (size_t)Hkv * hd;
    float *x = (float *)malloc(sizeof(float) * B * D), *h = (float *)malloc(sizeof(float) * B * D);
    float *q = (float *)malloc(sizeof(float) * B * qn), *k = (float *)malloc(sizeof(float) * B * kvn);
    float *v = (float *)malloc(sizeof(float) * B * kvn), *att = (float *)malloc(sizeof(float) * B * qn);
    float *g = (float *)malloc(sizeof(float) * B * I), *u = (float *)malloc(sizeof(float) * B * I);
    float *probs = (float *)malloc(sizeof(float) * (size_t)B * H * S);
    int rc = -1;
    if (!x || !h || !q || !k || !v || !att || !g || !u || !probs) goto done;
    for (size_t i = 0; i < (size_t)B * D; i++) x[i] = load_t(x_io, dt, i);
    float scale = 1.f / sqrtf((float)hd);
    int group = H / Hkv;
    PROF_START;
    for (int l = 0; l < L; l++) {
        const lk_layer *ly = &layers[l];
        rms_norm(x, ly->attn_norm, dt, B, D, eps, h);
        PROF(0);
        job qkv[3] = {{.m = &ly->q, .x = h, .y = q}, {.m = &ly->k, .x = h, .y = k}, {.m = &ly->v, .x = h, .y = v}};
        if (run_jobs(qkv, 3, B, dt)) goto done;
        PROF(1);
        for (int b = 0; b < B; b++) {
            const float *c = cos + (size_t)positions[b] * hd, *sn = sin + (size_t)positions[b] * hd;
            for (int hh = 0; hh < H; hh++) rope(q + b * qn + (size_t)hh * hd, c, sn, hd, dt);
            for (int hh = 0; hh < Hkv; hh++) rope(k + b * kvn + (size_t)hh * hd, c, sn, hd, dt);
            size_t slot = (size_t)write_slots[b] * kvn;
            for (size_t i = 0; i < kvn; i++) { /* the new key and value go into the pool first: a token sees itself */
                if (cache_dt) {
                    ((uint16_t *)ly->kpool)[slot + i] = f32_to_bf16(k[b * kvn + i]);
                    ((uint16_t *)ly->vpool)[slot + i] = f32_to_bf16(v[b * kvn + i]);
                } else {
                    ((float *)ly->kpool)[slot + i] = k[b * kvn + i];
                    ((float *)ly->vpool)[slot + i] = v[b * kvn + i];
                }
            }
        }
#pragma omp parallel for collapse(2) schedule(static)
        for (int b = 0; b < B; b++)
            for (int kh = 0; kh < Hkv; kh++) {
                int64_t pos = positions[b], lo = 0;
                if (ly->window > 0 && pos - ly->window + 1 > 0) lo = pos - ly->window + 1;
                attend_group(q + b * qn + (size_t)kh * group * hd, group, hd, ly->kpool, ly->vpool, cache_dt,
                             (size_t)kh * hd, kvn, read_slots + (size_t)b * S, lo, pos, scale,
                             probs + ((size_t)b * H + (size_t)kh * group) * S, S,
                             att + b * qn + (size_t)kh * group * hd);
            }
        PROF(2);
        job o = {.m = &ly->o, .x = att, .y = h};
        if (run_jobs(&o, 1, B, dt)) goto done;
        PROF(3);
        for (size_t i = 0; i < (size_t)B * D; i++) x[i] = rnd(dt, x[i] + h[i]);
        rms_norm(x, ly->mlp_norm, dt, B, D, eps, h);
        PROF(0);
        job gu[2] = {{.m = &ly->gate, .x = h, .y = g}, {.m = &ly->up, .x = h, .y = u}};
        if (run_jobs(gu, 2, B, dt)) goto done;
        PROF(4);
        silu_mul(g, u, (size_t)B * I, dt);
        PROF(5);
        job dn = {.m = &ly->down, .x = g, .y = h};
        if (run_jobs(&dn, 1, B, dt)) goto done;
        PROF(6);
        for (size_t i = 0; i < (size_t)B * D; i++) x[i] = rnd(dt, x[i] + h[i]);
        PROF(0);
    }
    rms_norm(x, final_norm, dt, B, D, eps, h);
    for (size_t i = 0; i < (size_t)B * D; i++) store_y(x_io, dt, i, h[i]);
    if (head) { /* the output head in the same call: no trip through Python between the two */
        job hj = {.m = head, .x = h, .y_dt = logits};
        if (run_jobs(&hj, 1, B, dt)) goto done;
    }
    rc = 0;
done:
    free(x); free(h); free(q); free(k); free(v); free(att); free(g); free(u); free(probs);
    return rc;
}
