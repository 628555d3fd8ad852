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
 * x and y are bf16, accumulation float32 (INT8 with AVX-512 VNNI: exact integers), one rounding of y to bf16.
 * Rows are split over the OpenMP threads (the libgomp torch has loaded, so torch.set_num_threads applies).
 * With AVX-512 BF16 the products run on vdpbf16ps: bf16 x bf16 products are exact in float32, and a 4-bit
 * value u is made an exact bf16 as 128 + u (bits 0x4300 | u) whose 128 * x part is taken out with the zero
 * point.  Without it the plain C loops below are what the compiler vectorises for the machine (AVX2, others).
 *
 * INT8 with AVX-512 VNNI: a row of x is written as integers X = round(x 2^-e), |X| <= 2^20, e from the row's
 * largest |x|, and X as three signed 7-bit digits (X = 2^14 d0 + 2^7 d1 + d2); vpdpbusd multiplies 64 weight
 * bytes (u = q + 128, unsigned) by 64 digits at once into int32, and y = scale 2^e (sum u X - 128 sum X), the
 * three digit sums (int32) combined in int64.  Every x within 2^12 of the row's largest |x| is exact (bf16
 * has 8 significant bits); a smaller one is off by at most 2^-21 of that largest |x|, below float32 summation
 * noise.  A row with inf or NaN, or K > 2^17, takes the float32 loop.  Why: the float32 loop spends 3
 * instructions per 16 weights (widen, convert, FMA) and reads DRAM at about 80% of what bf16 does; vpdpbusd
 * spends one per 64 weight x digit products.
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
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define FL_VNNI 1
#else
#define FL_VNNI 0
#endif
#include <math.h>

#define R 4                                   /* rows per block: one x load feeds R weight rows */
#define PF(a) __builtin_prefetch((const void *)(a), 0, 2)

static inline float bf2f(uint16_t h) { uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);                                              /* round to nearest even */
    return (uint16_t)(u >> 16);
}

/* bit 0: AVX-512 BF16 dot products (bf16, INT4); bit 1: AVX-512 VNNI integer dot products (INT8);
 * 0: the compiler-vectorised C loops */
int fl_isa(void) { return FL_BF16DOT | FL_VNNI << 1; }

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

#if FL_VNNI
/* x row -> digits d[0..K) = d0, d[K..2K) = d1, d[2K..3K) = d2, the exponent e and sum X; 0 if x has inf/NaN */
static int int8_digits(const uint16_t *xr, int8_t *d, int64_t K, int *e, int64_t *sx) {
    /* the largest |x| from the bf16 bits (non-negative floats order as their bits); from 0x7f80 on: inf, NaN */
    const __m512i absm = _mm512_set1_epi16(0x7fff);
    __m512i mv = _mm512_setzero_si512();
    for (int64_t k = 0; k < K; k += 32) {
        const __mmask32 mk = K - k >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << (K - k)) - 1);
        mv = _mm512_max_epu16(mv, _mm512_and_si512(_mm512_maskz_loadu_epi16(mk, xr + k), absm));
    }
    const uint32_t lo = _mm512_reduce_max_epu32(_mm512_and_si512(mv, _mm512_set1_epi32(0xffff)));
    const uint32_t hi = _mm512_reduce_max_epu32(_mm512_srli_epi32(mv, 16));
    const uint16_t mb = (uint16_t)(lo > hi ? lo : hi);
    if (mb >= 0x7f80) return 0;
    int ex;
    frexpf(bf2f(mb), &ex);                           /* max |x| < 2^ex, so |X| <= 2^20 */
    *e = ex - 20;
    const __m512 sc = _mm512_set1_ps((float)-*e);
    const __m512i c64 = _mm512_set1_epi32(64), c127 = _mm512_set1_epi32(127);
    __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0;
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 xv = _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, xr + k)), 16));
        const __m512i X = _mm512_cvt_roundps_epi32(_mm512_scalef_ps(xv, sc),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        const __m512i d2 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X, c64), c127), c64);
        const __m512i X1 = _mm512_srai_epi32(_mm512_sub_epi32(X, d2), 7);
        const __m512i d1 = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(X1, c64), c127), c64);
        const __m512i d0 = _mm512_srai_epi32(_mm512_sub_epi32(X1, d1), 7);           /* |d0| <= 64 */
        _mm512_mask_cvtepi32_storeu_epi8(d + k, mk, d0);
        _mm512_mask_cvtepi32_storeu_epi8(d + K + k, mk, d1);
        _mm512_mask_cvtepi32_storeu_epi8(d + 2 * K + k, mk, d2);
        s0 = _mm512_add_epi32(s0, d0); s1 = _mm512_add_epi32(s1, d1); s2 = _mm512_add_epi32(s2, d2);
    }
    /* |sum d| <= 64 K < 2^31 (K <= 2^17): int32 sums, as in int8_rows_vnni */
    *sx = (int64_t)_mm512_reduce_add_epi32(s0) * 16384 + (int64_t)_mm512_reduce_add_epi32(s1) * 128
          + (int64_t)_mm512_reduce_add_epi32(s2);
    return 1;
}

static inline __attribute__((always_inline)) void
int8_rows_vnni(const int8_t *d, double pe, int64_t sx, const int8_t *q, const float *scale, uint16_t *yr,
               int64_t n0, int64_t nr, int64_t K, int64_t pfd) {
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i a0[R], a1[R], a2[R];
    for (int r = 0; r < R; r++) a0[r] = a1[r] = a2[r] = _mm512_setzero_si512();
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        const __m512i p0 = _mm512_loadu_si512(d + k), p1 = _mm512_loadu_si512(d + K + k),
                      p2 = _mm512_loadu_si512(d + 2 * K + k);
        for (int r = 0; r < R; r++) if (r < nr) {
            PF(q + (n0 + pfd + r) * K + k);
            const __m512i u = _mm512_xor_si512(_mm512_loadu_si512(q + (n0 + r) * K + k), flip);
            a0[r] = _mm512_dpbusd_epi32(a0[r], u, p0);
            a1[r] = _mm512_dpbusd_epi32(a1[r], u, p1);
            a2[r] = _mm512_dpbusd_epi32(a2[r], u, p2);
        }
    }
    if (k < K) {                                     /* the tail: masked loads, digits 0 beyond K */
        const __mmask64 mk = ((__mmask64)1 << (K - k)) - 1;
        const __m512i p0 = _mm512_maskz_loadu_epi8(mk, d + k), p1 = _mm512_maskz_loadu_epi8(mk, d + K + k),
                      p2 = _mm512_maskz_loadu_epi8(mk, d + 2 * K + k);
        for (int r = 0; r < R; r++) if (r < nr) {
            const __m512i u = _mm512_xor_si512(_mm512_maskz_loadu_epi8(mk, q + (n0 + r) * K + k), flip);
            a0[r] = _mm512_dpbusd_epi32(a0[r], u, p0);
            a1[r] = _mm512_dpbusd_epi32(a1[r], u, p1);
            a2[r] = _mm512_dpbusd_epi32(a2[r], u, p2);
        }
    }
    /* |sum u d| <= K 255 64 < 2^31: the sums are int32 whether or not a partial sum wraps */
    int32_t s[3][R];
    if (nr == R && R == 4) {                         /* the four rows' sums at once (a transposed reduction) */
        __m512i *acc[3] = {a0, a1, a2};
        for (int j = 0; j < 3; j++) {
            const __m512i *v = acc[j];
            const __m512i t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
            const __m512i t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
            const __m512i u = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
            const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(u), _mm512_extracti64x4_epi64(u, 1));
            _mm_storeu_si128((__m128i *)s[j], _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
        }
    } else {
        for (int r = 0; r < nr; r++) {
            s[0][r] = _mm512_reduce_add_epi32(a0[r]);
            s[1][r] = _mm512_reduce_add_epi32(a1[r]);
            s[2][r] = _mm512_reduce_add_epi32(a2[r]);
        }
    }
    for (int r = 0; r < nr; r++) {
        const int64_t t = (int64_t)s[0][r] * 16384 + (int64_t)s[1][r] * 128 + (int64_t)s[2][r] - 128 * sx;
        yr[n0 + r] = f2bf((float)((double)t * pe * (double)scale[n0 + r]));     /* t 2^e exact, one rounding */
    }
}
#endif

/* xf: scratch of M * K float32 (with VNNI: the 3 * M * K digit bytes) */
void fl_gemv_int8(const uint16_t *x, float *xf, const int8_t *q, const float *scale, uint16_t *y, int64_t M,
                  int64_t N, int64_t K) {
    const int64_t nb = (N + R - 1) / R, pfd = pf_rows(K, R);
#if FL_VNNI
    enum { MAXM = 64 };
    int e[MAXM], ok = M <= MAXM && K <= (1 << 17);
    double pe[MAXM];
    int64_t sx[MAXM];
    int8_t *d = (int8_t *)xf;
    for (int64_t m = 0; ok && m < M; m++) {
        ok = int8_digits(x + m * K, d + 3 * m * K, K, &e[m], &sx[m]);
        pe[m] = ok ? ldexp(1.0, e[m]) : 0.0;
    }
    if (ok) {
#pragma omp parallel for schedule(static)
        for (int64_t b = 0; b < nb; b++)
            for (int64_t m = 0; m < M; m++)
                if (rows_left(N, b * R) == R)   /* a full block: the row count a constant, the row loop unrolled */
                    int8_rows_vnni(d + 3 * m * K, pe[m], sx[m], q, scale, y + m * N, b * R, R, K, pfd);
                else
                    int8_rows_vnni(d + 3 * m * K, pe[m], sx[m], q, scale, y + m * N, b * R, rows_left(N, b * R), K, pfd);
        return;
    }
#endif
    for (int64_t i = 0; i < M * K; i++) xf[i] = bf2f(x[i]);
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
