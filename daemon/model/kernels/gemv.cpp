// Streaming GEMVs for a few rows of x: y[m, n] = sum_k x[m, k] * W[n, k], over a span of W's rows
// (step.cpp splits the rows over threads and dispatches by ISA). Each weight row is read from memory once
// for all M rows of x (decode rows of several sequences, or a short chunk of one prompt).
// Weights: bf16 or fp32 rows, int8 rows with one scale per row, or int4 groups of 32 with a bf16 scale
// and minimum per group (w = scale * q + min, q in 0..15). Weights are converted to fp32 in registers.
// x and y are fp32 ([M][K] and [M][N]). Built without -march: one function per ISA, picked at run time by
// `isa` (0 generic, 1 AVX2+FMA, 2 AVX512F/BW, 3 AVX512-BF16, 4 AMX-BF16 and AMX-INT8; on aarch64, arm.cpp:
// 1 NEON, 2 NEON with the dot-product instructions).
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

// ---- AMX-BF16: W's rows stream straight into an A tile (16 rows x 32 k); x goes into B tiles as k-pairs
// ([K/2][M][2], made per call: M x K is small); up to 4 C tiles hold 16 rows of W x 64 rows of x, so each
// A tile, loaded once, serves up to 64 rows of x. A step is then bound by reading the weights whatever M
// is. Rows past the last whole block of 16 run bf16_dp (a row always takes the same path whatever M is).
// Needs the kernel's permission (Linux arch_prctl, asked once by edgechat_best_isa) ----
struct TileConfig { uint8_t palette, start; uint8_t pad[14]; uint16_t colsb[16]; uint8_t rows[16]; };
#define AMX __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512bf16")))
// C tile j += A tile 4 x B tile 5 (16 rows of x), or B tile 6 for a narrower last part (tile numbers are
// immediates: one expansion per C tile)
#define AMX_DP(j) if (j < parts) { \
    const uint16_t* b = xp + (k >> 1) * M * 2 + (g + j * 16) * 2; \
    if (j == parts - 1 && narrow) { _tile_loadd(6, b, M * 4); _tile_dpbf16ps(j, 4, 6); } \
    else { _tile_loadd(5, b, M * 4); _tile_dpbf16ps(j, 4, 5); } }
#define AMX_OUT(j) if (j < parts) { _tile_stored(j, c + j * 256, cfg.colsb[j]); }
AMX static void bf16_amx(const uint16_t* W, const uint16_t* xb, float* y, int64_t n0, int64_t n1, int64_t K, int64_t M, int64_t N) {
    const int64_t whole = n0 + (n1 - n0) / 16 * 16;
    if ((K & 31) == 0 && whole > n0) {
        std::vector<uint16_t> pairs(K * M);  // x as k-pairs: [(k/2)*M*2 + m*2 + k%2]
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) pairs[(k >> 1) * M * 2 + m * 2 + (k & 1)] = xb[m * K + k];
        const uint16_t* xp = pairs.data();
        alignas(64) float c[4 * 256];
        for (int64_t g = 0; g < M; g += 64) {
            const int parts = (int)((M - g + 15) / 16 < 4 ? (M - g + 15) / 16 : 4);
            alignas(64) TileConfig cfg = {};
            cfg.palette = 1;
            for (int j = 0; j < parts; j++) {  // C j: 16 rows of W, mb fp32 sums; B: 16 k-pairs of mb rows
                const int64_t mb = M - g - j * 16 < 16 ? M - g - j * 16 : 16;
                cfg.rows[j] = 16; cfg.colsb[j] = (uint16_t)(mb * 4);
            }
            const bool narrow = cfg.colsb[parts - 1] < 64;
            cfg.rows[4] = 16; cfg.colsb[4] = 64;  // A: 16 rows of W, 32 bf16 of k
            cfg.rows[5] = 16; cfg.colsb[5] = 64;  // B: 16 k-pairs of 16 rows of x
            cfg.rows[6] = 16; cfg.colsb[6] = cfg.colsb[parts - 1];  // B of a narrower last part
            _tile_loadconfig(&cfg);
            for (int64_t n = n0; n < whole; n += 16) {
                for (int j = 0; j < 4; j++) if (j < parts) { if (j == 0) _tile_zero(0); else if (j == 1) _tile_zero(1); else if (j == 2) _tile_zero(2); else _tile_zero(3); }
                for (int64_t k = 0; k < K; k += 32) {
                    _tile_loadd(4, W + n * K + k, K * 2);
                    AMX_DP(0) AMX_DP(1) AMX_DP(2) AMX_DP(3)
                }
                AMX_OUT(0) AMX_OUT(1) AMX_OUT(2) AMX_OUT(3)
                for (int j = 0; j < parts; j++) {
                    const int64_t mb = cfg.colsb[j] / 4;
                    for (int64_t i = 0; i < 16; i++)
                        for (int64_t q = 0; q < mb; q++) y[(g + j * 16 + q) * N + n + i] = c[j * 256 + i * mb + q];
                }
            }
        }
        _tile_release();
        n0 = whole;
    }
    if (n0 < n1) bf16_dp(W, xb, y, n0, n1, K, M, N);
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

#ifdef X86
#include <sys/syscall.h>
#include <unistd.h>
// Linux gives a process AMX's tile state only when asked (arch_prctl ARCH_REQ_XCOMP_PERM, XTILEDATA)
static bool amx_usable() {
    unsigned a, b, c, d;
    __asm__("cpuid" : "=a"(a), "=b"(b), "=c"(c), "=d"(d) : "a"(7), "c"(0));
    if (!((d >> 22) & 1) || !((d >> 24) & 1) || !((d >> 25) & 1)) return false;  // AMX-BF16, -TILE, -INT8
    return syscall(SYS_arch_prctl, 0x1023, 18) == 0;
}
#endif

#ifndef EDGECHAT_SOURCE_HASH
#define EDGECHAT_SOURCE_HASH "unknown"
#endif

extern "C" {
// the hash of the sources this library was built from (kernels/build.py passes it)
const char* edgechat_source_hash() { return EDGECHAT_SOURCE_HASH; }

// 4: AMX (BF16 and INT8) too, 3: AVX512-BF16 too, 2: AVX512F+BW, 1: AVX2+FMA, 0: none of them;
// aarch64: 2 NEON+SDOT, 1 NEON
int edgechat_best_isa() {
#ifdef X86
    __builtin_cpu_init();
    const bool bf16 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
    if (bf16 && amx_usable()) return 4;
    if (bf16) return 3;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return 2;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 1;
#elif defined(__aarch64__)
    return arm_best_isa();
#endif
    return 0;
}
}
