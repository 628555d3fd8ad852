/* fishlab's batch-1 CPU GEMV kernels (weight-only), built at first use by fishlab.quant.cgemv with the system
 * C compiler (-O3 -march=native -fopenmp).  Our own code; the weight layouts are fishlab's generic packed
 * streams (docs/packed-format.md), never a torch-internal layout.
 *
 *   fl_gemv_bf16   y[m, n] = sum_k x[m, k] w[n, k]                      w bf16 [N, K]
 *   fl_gemv_int8   y[m, n] = scale[n] sum_k x[m, k] q[n, k]             q int8 [N, K] (the generic INT8 stream)
 *   fl_gemv_int4   y[m, n] = sum_g scale[n, g] sum_{k in g} x[m, k] (u[n, k] - zero[n, g])
 *                  u: the generic INT4 stream (row-major, value 2j in the low nibble of byte j, u = q + 8 for
 *                  a symmetric scheme), passed as zc = scale * (zero + 128) (zero 8 for a symmetric scheme)
 *   fl_dequant_int4  the same weight as bf16 [N, K] (W' = (u - zero) * scale in float32, rounded once)
 *
 * x and y are bf16, accumulation float32, one rounding of y to bf16 (nearest even).  Rows are split over the
 * OpenMP threads (the libgomp torch has loaded, so torch.set_num_threads applies).  With AVX-512 BF16 the
 * products run on vdpbf16ps: bf16 x bf16 products are exact in float32, and a 4-bit value u is made an exact
 * bf16 as 128 + u (bits 0x4300 | u) whose 128 * x part is taken out with the zero point.  Without it the
 * plain C loops below are what the compiler vectorises for the machine (AVX2 and others).
 */
#include <stdint.h>
#include <string.h>
#if defined(__AVX512F__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define FL_BF16DOT 1
#else
#define FL_BF16DOT 0
#endif
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#define R 4                                   /* rows per block: one x load feeds R weight rows */
#define PF(a) __builtin_prefetch((const void *)(a), 0, 2)

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                              /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* 1: AVX-512 BF16 dot products; 0: the compiler-vectorised C loops */
int fl_isa(void) { return FL_BF16DOT; }

/* software prefetch distance in rows: about 64 KB ahead of the rows being read, at least two blocks */
static inline int64_t pf_rows(int64_t row_bytes, int64_t block) {
    const int64_t r = 65536 / row_bytes;
    return r < 2 * block ? 2 * block : r;
}

static inline int64_t rows_left(int64_t N, int64_t n0) { return N - n0 < R ? N - n0 : R; }

/* ---------------------------------------------------------------------------------------------- bf16 */

static void bf16_rows(const uint16_t *xr, const uint16_t *w, uint16_t *yr, int64_t n0, int64_t nr, int64_t K,
                      int64_t pfd) {
    float out[R];
#if FL_BF16DOT
    __m512 a[R];
    for (int r = 0; r < R; r++) a[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512bh xv = (__m512bh)_mm512_loadu_si512(xr + k);
        for (int r = 0; r < R; r++) if (r < nr) {
            PF(w + (n0 + pfd + r) * K + k);
            a[r] = _mm512_dpbf16_ps(a[r], (__m512bh)_mm512_loadu_si512(w + (n0 + r) * K + k), xv);
        }
    }
    for (int r = 0; r < nr; r++) {
        out[r] = _mm512_reduce_add_ps(a[r]);
        for (int64_t j = k; j < K; j++) out[r] += bf2f(w[(n0 + r) * K + j]) * bf2f(xr[j]);
    }
#else
    (void)pfd;
    for (int r = 0; r < nr; r++) {
        const uint16_t *wr = w + (n0 + r) * K;
        float acc[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            for (int j = 0; j < 16; j++) acc[j] += bf2f(wr[k + j]) * bf2f(xr[k + j]);
        float s = 0;
        for (int j = 0; j < 16; j++) s += acc[j];
        for (; k < K; k++) s += bf2f(wr[k]) * bf2f(xr[k]);
        out[r] = s;
    }
#endif
    for (int r = 0; r < nr; r++) yr[n0 + r] = f2bf(out[r]);
}

void fl_gemv_bf16(const uint16_t *x, const uint16_t *w, uint16_t *y, int64_t M, int64_t N, int64_t K) {
    const int64_t nb = (N + R - 1) / R, pfd = pf_rows(2 * K, R);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t m = 0; m < M; m++)
            bf16_rows(x + m * K, w, y + m * N, b * R, rows_left(N, b * R), K, pfd);
}

/* ---------------------------------------------------------------------------------------------- int8 */

static void int8_rows(const float *xr, const int8_t *q, const float *scale, uint16_t *yr, int64_t n0, int64_t nr,
                      int64_t K, int64_t pfd) {
    float out[R];
#if defined(__AVX512F__)
    __m512 a[R];
    for (int r = 0; r < R; r++) a[r] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 xv = _mm512_loadu_ps(xr + k);
        for (int r = 0; r < R; r++) if (r < nr) {
            if (k % 64 == 0) PF(q + (n0 + pfd + r) * K + k);
            a[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
                       _mm_loadu_si128((const __m128i *)(q + (n0 + r) * K + k)))), xv, a[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        out[r] = _mm512_reduce_add_ps(a[r]);
        for (int64_t j = k; j < K; j++) out[r] += (float)q[(n0 + r) * K + j] * xr[j];
    }
#else
    (void)pfd;
    for (int r = 0; r < nr; r++) {
        const int8_t *qr = q + (n0 + r) * K;
        float acc[16] = {0};
        int64_t k = 0;
        for (; k + 16 <= K; k += 16)
            for (int j = 0; j < 16; j++) acc[j] += (float)qr[k + j] * xr[k + j];
        float s = 0;
        for (int j = 0; j < 16; j++) s += acc[j];
        for (; k < K; k++) s += (float)qr[k] * xr[k];
        out[r] = s;
    }
#endif
    for (int r = 0; r < nr; r++) yr[n0 + r] = f2bf(scale[n0 + r] * out[r]);
}

/* xf: scratch of M * K float32 */
void fl_gemv_int8(const uint16_t *x, float *xf, const int8_t *q, const float *scale, uint16_t *y, int64_t M,
                  int64_t N, int64_t K) {
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf2f(x[i]);
    const int64_t nb = (N + R - 1) / R, pfd = pf_rows(K, R);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t m = 0; m < M; m++)
            int8_rows(xf + m * K, q, scale, y + m * N, b * R, rows_left(N, b * R), K, pfd);
}

/* ---------------------------------------------------------------------------------------------- int4 */

#define R4 8                                  /* int4 rows per block: more independent chains per x load */
static inline int64_t rows_left4(int64_t N, int64_t n0) { return N - n0 < R4 ? N - n0 : R4; }


/* Blocks of 128 weights: one 64-byte load of a row gives 4 bf16 vectors (nibble t of each 4-byte lane), lane i
 * of vector t holding k = 8i + t and 8i + t + 4; so x is re-ordered per block as xp[32t + 2i + h] = x[8i + t + 4h],
 * and a lane's two k lie in group (8i) / g: the block's scale vector spreads its 128 / g scales over the lanes. */
static void int4_rows(const uint16_t *xr, const uint16_t *xp, const float *xs, const uint8_t *p, const float *scale,
                      const float *zc, uint16_t *yr, int64_t n0, int64_t nr, int64_t K, int64_t g, int64_t pfd) {
    const int64_t G = K / g, KB = K / 2;
    float out[R4];
#if FL_BF16DOT
    (void)xr;
    const __m512i mask = _mm512_set1_epi16(0x000F), bias = _mm512_set1_epi16(0x4300);
    const int64_t gpb = g >= 128 ? 1 : 128 / g;                  /* groups per block */
    int idx[16];
    for (int i = 0; i < 16; i++) idx[i] = (int)(i / (16 / gpb));
    const __m512i sidx = _mm512_loadu_si512(idx);
    __m512 acc[R4];
    for (int r = 0; r < R4; r++) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 128) {
        const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp + k), x1 = (__m512bh)_mm512_loadu_si512(xp + k + 32),
                       x2 = (__m512bh)_mm512_loadu_si512(xp + k + 64), x3 = (__m512bh)_mm512_loadu_si512(xp + k + 96);
        const int64_t g0 = k / g;
        for (int r = 0; r < R4; r++) if (r < nr) {
            const uint8_t *pb = p + (n0 + r) * KB + k / 2;
            PF(pb + pfd * KB);
            const __m512i w = _mm512_loadu_si512(pb);
            /* two dependency chains of two dot products each (one chain of four waits on its latency) */
            __m512 ag = _mm512_dpbf16_ps(_mm512_setzero_ps(),
                                         (__m512bh)_mm512_ternarylogic_epi32(w, mask, bias, 0xEA), x0);
            __m512 ah = _mm512_dpbf16_ps(_mm512_setzero_ps(),
                                         (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 8), mask, bias, 0xEA), x2);
            ag = _mm512_dpbf16_ps(ag, (__m512bh)_mm512_ternarylogic_epi32(_mm512_srli_epi16(w, 4), mask, bias, 0xEA), x1);
            ah = _mm512_dpbf16_ps(ah, (__m512bh)_mm512_or_si512(_mm512_srli_epi16(w, 12), bias), x3);
            ag = _mm512_add_ps(ag, ah);
            const float *sr = scale + (n0 + r) * G + g0;
            const __m512 sv = gpb == 1 ? _mm512_set1_ps(sr[0])
                : _mm512_permutexvar_ps(sidx, _mm512_maskz_loadu_ps((__mmask16)((1u << gpb) - 1), sr));
            acc[r] = _mm512_fmadd_ps(ag, sv, acc[r]);
        }
    }
    for (int r = 0; r < nr; r++) {                         /* minus sum_g scale (zero + 128) sum_{k in g} x */
        const float *cr = zc + (n0 + r) * G;
        __m512 cv = _mm512_setzero_ps();
        int64_t gi = 0;
        for (; gi + 16 <= G; gi += 16) cv = _mm512_fmadd_ps(_mm512_loadu_ps(cr + gi), _mm512_loadu_ps(xs + gi), cv);
        if (gi < G) {
            const __mmask16 mk = (__mmask16)((1u << (G - gi)) - 1);
            cv = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(mk, cr + gi), _mm512_maskz_loadu_ps(mk, xs + gi), cv);
        }
        out[r] = _mm512_reduce_add_ps(acc[r]) - _mm512_reduce_add_ps(cv);
    }
#else
    (void)xp; (void)pfd;
    for (int r = 0; r < nr; r++) {
        const uint8_t *pr = p + (n0 + r) * KB;
        const float *sr = scale + (n0 + r) * G, *cr = zc + (n0 + r) * G;
        float acc[16] = {0}, corr = 0;
        for (int64_t gi = 0; gi < G; gi++) {
            float ag[16] = {0};
            for (int64_t k = gi * g; k < (gi + 1) * g; k += 16)
                for (int j = 0; j < 8; j++) {
                    const uint8_t b = pr[k / 2 + j];
                    ag[2 * j] += (float)(b & 15) * bf2f(xr[k + 2 * j]);
                    ag[2 * j + 1] += (float)(b >> 4) * bf2f(xr[k + 2 * j + 1]);
                }
            for (int j = 0; j < 16; j++) acc[j] += sr[gi] * ag[j];
            corr += (cr[gi] - 128.0f * sr[gi]) * xs[gi];
        }
        float t = 0;
        for (int j = 0; j < 16; j++) t += acc[j];
        out[r] = t - corr;
    }
#endif
    for (int r = 0; r < nr; r++) yr[n0 + r] = f2bf(out[r]);
}

/* K % 128 == 0, g a power of two >= 32 dividing K; xp: scratch of M * K bf16; xs: scratch of M * (K / g) fp32 */
void fl_gemv_int4(const uint16_t *x, uint16_t *xp, float *xs, const uint8_t *p, const float *scale,
                  const float *zc, uint16_t *y, int64_t M, int64_t N, int64_t K, int64_t g) {
    const int64_t G = K / g;
    for (int64_t m = 0; m < M; m++) {
        const uint16_t *xm = x + m * K;
        for (int64_t k = 0; k < K; k += 128)
            for (int t = 0; t < 4; t++)
                for (int i = 0; i < 16; i++)
                    for (int h = 0; h < 2; h++) xp[m * K + k + 32 * t + 2 * i + h] = xm[k + 8 * i + t + 4 * h];
        for (int64_t gi = 0; gi < G; gi++) {
            float s = 0;
            for (int64_t k = gi * g; k < (gi + 1) * g; k++) s += bf2f(xm[k]);
            xs[m * G + gi] = s;
        }
    }
    const int64_t nb = (N + R4 - 1) / R4, pfd = pf_rows(K / 2, R4);
#pragma omp parallel for schedule(static)
    for (int64_t b = 0; b < nb; b++)
        for (int64_t m = 0; m < M; m++)
            int4_rows(x + m * K, xp + m * K, xs + m * G, p, scale, zc, y + m * N, b * R4, rows_left4(N, b * R4), K, g,
                      pfd);
}

/* W' = (u - zero) * scale as bf16 [N, K] (zero = zc / scale - 128 is not formed: (u - zero) * scale =
 * u * scale - (zc - 128 * scale) would round differently, so the zero is passed as is) */
void fl_dequant_int4(const uint8_t *p, const float *scale, const float *zero, uint16_t *w, int64_t N, int64_t K,
                     int64_t g) {
    const int64_t G = K / g;
#pragma omp parallel for schedule(static)
    for (int64_t n = 0; n < N; n++)
        for (int64_t k = 0; k < K; k += 2) {
            const uint8_t b = p[n * (K / 2) + k / 2];
            const float s = scale[n * G + k / g], z = zero[n * G + k / g];
            w[n * K + k] = f2bf(((float)(b & 15) - z) * s);
            w[n * K + k + 1] = f2bf(((float)(b >> 4) - z) * s);
        }
}
