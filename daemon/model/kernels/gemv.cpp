// Streaming GEMVs for a few rows of x: y[m, n] = sum_k x[m, k] * W[n, k], over a span of W's rows
// (step.cpp splits the rows over threads and dispatches by ISA). Each weight row is read from memory once
// for all M rows of x (decode rows of several sequences, or a short chunk of one prompt).
// Weights: bf16 or fp32 rows, int8 rows with one scale per row, or int4 groups of 32 with a bf16 scale
// and minimum per group (w = scale * q + min, q in 0..15). Weights are converted to fp32 in registers.
// x and y are fp32 ([M][K] and [M][N]). Built without -march: one function per ISA, picked at run time by
// `isa` (0 generic, 1 AVX2+FMA, 2 AVX512F/BW, 3 AVX512-BF16; on aarch64, arm.cpp: 1 NEON, 2 NEON with the
// dot-product instructions).
// Row independence: every (n, m) sum is accumulated in the same order whatever M and the tiling are, so a
// row of x gets bit for bit the same result alone or beside others (batched decode = decode alone).
#include <cstdint>
#include <cstring>
#include <vector>
#if defined(__x86_64__)
#include <immintrin.h>
#define X86 1
#endif

static inline float bf16f(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }
static inline uint16_t f2bf16(float f) {  // round to nearest even (x is finite)
    uint32_t u; std::memcpy(&u, &f, 4); return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

// ---- generic (any CPU; the compiler may vectorize) ----
static void bf16_generic(const uint16_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const uint16_t* w = W + n * K; const float* xm = x + m * K;
            for (int64_t k = 0; k < K; k++) s += bf16f(w[k]) * xm[k];
            y[m * N + n] = s;
        }
}
static void f32_generic(const float* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const float* w = W + n * K; const float* xm = x + m * K;
            for (int64_t k = 0; k < K; k++) s += w[k] * xm[k];
            y[m * N + n] = s;
        }
}
static void i8_generic(const int8_t* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const int8_t* w = W + n * K; const float* xm = x + m * K;
            for (int64_t k = 0; k < K; k++) s += (float)w[k] * xm[k];
            y[m * N + n] = s * sc[n];
        }
}
// xs[m, g]: sum of x over group g (for the minimum term)
static void i4_generic(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                       int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t G = K / 32;
    for (int64_t n = n0; n < n1; n++)
        for (int64_t m = 0; m < M; m++) {
            float s = 0; const float* xm = x + m * K;
            for (int64_t g = 0; g < G; g++) {
                const uint8_t* q = Q + n * (K / 2) + g * 16; float t = 0;
                for (int j = 0; j < 16; j++) t += (float)(q[j] & 15) * xm[g * 32 + j] + (float)(q[j] >> 4) * xm[g * 32 + 16 + j];
                s += t * bf16f(S[n * G + g]) + bf16f(Z[n * G + g]) * xs[m * G + g];
            }
            y[m * N + n] = s;
        }
}

#ifdef X86
// Tiles: NR weight rows x MR rows of x, each (row, x row) pair with its own accumulators (two chains, over
// even and odd blocks of k, so one row alone still has independent FMAs in flight). Weights are loaded and
// widened once per tile and used MR times.
#define AVX2 __attribute__((target("avx2,fma")))
#define AVX512 __attribute__((target("avx512f,avx512bw")))
#define AVX512BF __attribute__((target("avx512f,avx512bw,avx512bf16")))

// ---- AVX2 + FMA: 8 lanes ----
AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s)); s = _mm_add_ss(s, _mm_movehdup_ps(s)); return _mm_cvtss_f32(s);
}
AVX2 static inline __m256 w8(const uint16_t* p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16));
}
AVX2 static inline __m256 w8(const float* p) { return _mm256_loadu_ps(p); }
AVX2 static inline __m256 w8(const int8_t* p) {
    int64_t v; std::memcpy(&v, p, 8); return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_cvtsi64_si128(v)));
}
static inline float wf(const uint16_t* p, int64_t k) { return bf16f(p[k]); }
static inline float wf(const float* p, int64_t k) { return p[k]; }
static inline float wf(const int8_t* p, int64_t k) { return (float)p[k]; }

template <int NR, int MR, typename T>
AVX2 static inline void tile_avx2(const T* W, const float* x, float* y, int64_t n, int64_t m, int64_t K, int64_t N, const float* sc) {
    __m256 a[NR][MR], b[NR][MR];
    for (int i = 0; i < NR; i++) for (int j = 0; j < MR; j++) { a[i][j] = _mm256_setzero_ps(); b[i][j] = _mm256_setzero_ps(); }
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 w0[NR], w1[NR];
        for (int i = 0; i < NR; i++) { w0[i] = w8(W + (n + i) * K + k); w1[i] = w8(W + (n + i) * K + k + 8); }
        for (int j = 0; j < MR; j++) {
            const __m256 x0 = _mm256_loadu_ps(x + (m + j) * K + k), x1 = _mm256_loadu_ps(x + (m + j) * K + k + 8);
            for (int i = 0; i < NR; i++) { a[i][j] = _mm256_fmadd_ps(w0[i], x0, a[i][j]); b[i][j] = _mm256_fmadd_ps(w1[i], x1, b[i][j]); }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MR; j++) {
            float s = hsum8(_mm256_add_ps(a[i][j], b[i][j]));
            for (int64_t kk = k; kk < K; kk++) s += wf(W + (n + i) * K, kk) * x[(m + j) * K + kk];
            y[(m + j) * N + n + i] = sc ? s * sc[n + i] : s;
        }
}
template <typename T>
AVX2 static void rows_avx2(const T* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        int64_t m = 0;
        for (; m + 2 <= M; m += 2) tile_avx2<2, 2>(W, x, y, n, m, K, N, sc);
        if (m < M) tile_avx2<2, 1>(W, x, y, n, m, K, N, sc);
    }
    for (; n < n1; n++)
        for (int64_t m = 0; m < M; m++) tile_avx2<1, 1>(W, x, y, n, m, K, N, sc);
}
static void bf16_avx2(const uint16_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) { rows_avx2(W, nullptr, x, y, n0, n1, K, M, N); }
static void f32_avx2(const float* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) { rows_avx2(W, nullptr, x, y, n0, n1, K, M, N); }
static void i8_avx2(const int8_t* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) { rows_avx2(W, sc, x, y, n0, n1, K, M, N); }

// int4 groups: the 32 nibbles of a group widened once, then one sum per x row scaled by the group's scale
template <int MR>
AVX2 static inline void i4_tile_avx2(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                                     int64_t n, int64_t m, int64_t K, int64_t N) {
    const int64_t G = K / 32; const __m128i low = _mm_set1_epi8(15);
    __m256 acc[MR]; float zs[MR];
    for (int j = 0; j < MR; j++) { acc[j] = _mm256_setzero_ps(); zs[j] = 0; }
    for (int64_t g = 0; g < G; g++) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(Q + n * (K / 2) + g * 16));
        const __m128i lo = _mm_and_si128(v, low), hi = _mm_and_si128(_mm_srli_epi16(v, 4), low);
        const __m256 q0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo)), q1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 q2 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi)), q3 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        const __m256 scale = _mm256_set1_ps(bf16f(S[n * G + g])); const float mn = bf16f(Z[n * G + g]);
        for (int j = 0; j < MR; j++) {
            const float* xg = x + (m + j) * K + g * 32;
            __m256 t = _mm256_mul_ps(q0, _mm256_loadu_ps(xg));
            t = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xg + 8), t);
            t = _mm256_fmadd_ps(q2, _mm256_loadu_ps(xg + 16), t);
            t = _mm256_fmadd_ps(q3, _mm256_loadu_ps(xg + 24), t);
            acc[j] = _mm256_fmadd_ps(t, scale, acc[j]);
            zs[j] += mn * xs[(m + j) * G + g];
        }
    }
    for (int j = 0; j < MR; j++) y[(m + j) * N + n] = hsum8(acc[j]) + zs[j];
}
static void i4_avx2(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                    int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) i4_tile_avx2<4>(Q, S, Z, x, xs, y, n, m, K, N);
        for (; m < M; m++) i4_tile_avx2<1>(Q, S, Z, x, xs, y, n, m, K, N);
    }
}

// ---- AVX512F/BW: 16 lanes ----
AVX512 static inline __m512 w16(const uint16_t* p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}
AVX512 static inline __m512 w16(const float* p) { return _mm512_loadu_ps(p); }
AVX512 static inline __m512 w16(const int8_t* p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)p))); }

template <int NR, int MR, typename T>
AVX512 static inline void tile512(const T* W, const float* x, float* y, int64_t n, int64_t m, int64_t K, int64_t N, const float* sc) {
    __m512 a[NR][MR], b[NR][MR];
    for (int i = 0; i < NR; i++) for (int j = 0; j < MR; j++) { a[i][j] = _mm512_setzero_ps(); b[i][j] = _mm512_setzero_ps(); }
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
        __m512 w0[NR], w1[NR];
        for (int i = 0; i < NR; i++) { w0[i] = w16(W + (n + i) * K + k); w1[i] = w16(W + (n + i) * K + k + 16); }
        for (int j = 0; j < MR; j++) {
            const __m512 x0 = _mm512_loadu_ps(x + (m + j) * K + k), x1 = _mm512_loadu_ps(x + (m + j) * K + k + 16);
            for (int i = 0; i < NR; i++) { a[i][j] = _mm512_fmadd_ps(w0[i], x0, a[i][j]); b[i][j] = _mm512_fmadd_ps(w1[i], x1, b[i][j]); }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MR; j++) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a[i][j], b[i][j]));
            for (int64_t kk = k; kk < K; kk++) s += wf(W + (n + i) * K, kk) * x[(m + j) * K + kk];
            y[(m + j) * N + n + i] = sc ? s * sc[n + i] : s;
        }
}
template <typename T>
AVX512 static void rows512(const T* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile512<2, 4>(W, x, y, n, m, K, N, sc);
        for (; m + 2 <= M; m += 2) tile512<2, 2>(W, x, y, n, m, K, N, sc);
        if (m < M) tile512<2, 1>(W, x, y, n, m, K, N, sc);
    }
    for (; n < n1; n++)
        for (int64_t m = 0; m < M; m++) tile512<1, 1>(W, x, y, n, m, K, N, sc);
}
static void bf16_avx512(const uint16_t* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) { rows512(W, nullptr, x, y, n0, n1, K, M, N); }
static void f32_avx512(const float* W, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) { rows512(W, nullptr, x, y, n0, n1, K, M, N); }
static void i8_avx512(const int8_t* W, const float* sc, const float* x, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) { rows512(W, sc, x, y, n0, n1, K, M, N); }

template <int MR>
AVX512 static inline void i4_tile512(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                                     int64_t n, int64_t m, int64_t K, int64_t N) {
    const int64_t G = K / 32; const __m128i low = _mm_set1_epi8(15);
    __m512 acc[MR]; float zs[MR];
    for (int j = 0; j < MR; j++) { acc[j] = _mm512_setzero_ps(); zs[j] = 0; }
    for (int64_t g = 0; g < G; g++) {
        const __m128i v = _mm_loadu_si128((const __m128i*)(Q + n * (K / 2) + g * 16));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(v, low)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), low)));
        const __m512 scale = _mm512_set1_ps(bf16f(S[n * G + g])); const float mn = bf16f(Z[n * G + g]);
        for (int j = 0; j < MR; j++) {
            const float* xg = x + (m + j) * K + g * 32;
            const __m512 t = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xg + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xg)));
            acc[j] = _mm512_fmadd_ps(t, scale, acc[j]);
            zs[j] += mn * xs[(m + j) * G + g];
        }
    }
    for (int j = 0; j < MR; j++) y[(m + j) * N + n] = _mm512_reduce_add_ps(acc[j]) + zs[j];
}
static void i4_avx512(const uint8_t* Q, const uint16_t* S, const uint16_t* Z, const float* x, const float* xs, float* y,
                      int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    for (int64_t n = n0; n < n1; n++) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) i4_tile512<4>(Q, S, Z, x, xs, y, n, m, K, N);
        for (; m < M; m++) i4_tile512<1>(Q, S, Z, x, xs, y, n, m, K, N);
    }
}

// ---- AVX512-BF16: vdpbf16ps multiplies 32 bf16 pairs into 16 fp32 sums (x rounded to bf16 first: exact
// when the model runs in bf16, as x then came from bf16) ----
template <int NR, int MR>
AVX512BF static inline void tile_dp(const uint16_t* W, const uint16_t* xb, float* y, int64_t n, int64_t m, int64_t K, int64_t N) {
    __m512 a[NR][MR], b[NR][MR];
    for (int i = 0; i < NR; i++) for (int j = 0; j < MR; j++) { a[i][j] = _mm512_setzero_ps(); b[i][j] = _mm512_setzero_ps(); }
    int64_t k = 0;
    for (; k + 64 <= K; k += 64) {
        __m512bh w0[NR], w1[NR];
        for (int i = 0; i < NR; i++) {
            w0[i] = (__m512bh)_mm512_loadu_si512(W + (n + i) * K + k); w1[i] = (__m512bh)_mm512_loadu_si512(W + (n + i) * K + k + 32);
        }
        for (int j = 0; j < MR; j++) {
            const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xb + (m + j) * K + k), x1 = (__m512bh)_mm512_loadu_si512(xb + (m + j) * K + k + 32);
            for (int i = 0; i < NR; i++) { a[i][j] = _mm512_dpbf16_ps(a[i][j], w0[i], x0); b[i][j] = _mm512_dpbf16_ps(b[i][j], w1[i], x1); }
        }
    }
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < MR; j++) {
            float s = _mm512_reduce_add_ps(_mm512_add_ps(a[i][j], b[i][j]));
            for (int64_t kk = k; kk < K; kk++) s += bf16f(W[(n + i) * K + kk]) * bf16f(xb[(m + j) * K + kk]);
            y[(m + j) * N + n + i] = s;
        }
}
AVX512BF static void bf16_dp(const uint16_t* W, const uint16_t* xb, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    int64_t n = n0;
    for (; n + 2 <= n1; n += 2) {
        int64_t m = 0;
        for (; m + 4 <= M; m += 4) tile_dp<2, 4>(W, xb, y, n, m, K, N);
        for (; m + 2 <= M; m += 2) tile_dp<2, 2>(W, xb, y, n, m, K, N);
        if (m < M) tile_dp<2, 1>(W, xb, y, n, m, K, N);
    }
    for (; n < n1; n++)
        for (int64_t m = 0; m < M; m++) tile_dp<1, 1>(W, xb, y, n, m, K, N);
}
#endif

#if defined(__aarch64__)
#include "arm.cpp"
#endif

// rows [n0, n1) of this thread: split N into nearly equal, even-sized parts
static inline void span(int64_t N, int64_t& n0, int64_t& n1, int t, int T) {
    int64_t per = ((N + T - 1) / T + 1) & ~(int64_t)1;
    n0 = per * t < N ? per * t : N; n1 = n0 + per < N ? n0 + per : N;
}

#ifdef _OPENMP
#include <omp.h>
static inline int omp_get_thread_num_() { return omp_get_thread_num(); }
static inline int omp_get_num_threads_() { return omp_get_num_threads(); }
#else
static inline int omp_get_thread_num_() { return 0; }
static inline int omp_get_num_threads_() { return 1; }
#endif

static inline void add_bias(float* y, const float* bias, int64_t n0, int64_t n1, int64_t M, int64_t N) {
    if (bias) for (int64_t m = 0; m < M; m++) for (int64_t n = n0; n < n1; n++) y[m * N + n] += bias[n];
}

#ifndef EDGECHAT_SOURCE_HASH
#define EDGECHAT_SOURCE_HASH "unknown"
#endif

extern "C" {
// the hash of the sources this library was built from (kernels/build.py passes it)
const char* edgechat_source_hash() { return EDGECHAT_SOURCE_HASH; }

// 3: AVX512-BF16 too, 2: AVX512F+BW, 1: AVX2+FMA, 0: none of them; aarch64: 2 NEON+SDOT, 1 NEON
int edgechat_best_isa() {
#ifdef X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16")) return 3;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#elif defined(__aarch64__)
    return arm_best_isa();
#endif
    return 0;
}
}
